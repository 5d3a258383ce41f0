"""Activity Flex statements of a simulator portfolio, with a history that adds up to it.

`FlexHistory(portfolio, end=...)` makes up, for the gateway simulator's portfolio (the
bundled sample by default), the history a Flex query would report of it over the `days`
days ending `end`, and writes it as IBKR writes an Activity Flex statement: one
`FlexStatement` per account, with `AccountInformation`, `OpenPositions`, `CashReport`,
`EquitySummaryInBase`, `ConversionRates`, `Trades`, `CashTransactions` and `OptionEAE`.

What adds up, exactly (Decimal), in the statement of the whole history:

- each open position's quantity is the sum of its account's trades of the contract (the
  simulator's quantities; its forex positions are cash balances in a statement, so they
  come from FX conversions instead);
- each currency's ending cash is the sum of its account's deposits, trades' proceeds and
  commissions (an FX conversion: the quantity in the currency bought or sold, the
  proceeds in the other), dividends, withholding taxes (negative), interest and fees
  (negative);
- each day's net asset value in the base currency is the day's cash and the value of the
  positions held that day, at the statement's rates (futures and CFDs count for nothing:
  their value is margin, not equity), each part rounded to the cent and the total the
  sum of the parts.

What it holds besides: several accounts (one with no positions) and currencies (USD,
EUR, CHF, GBP), FX conversions, an option that expires worthless and a short put that is
assigned (the option's closing trade, the shares bought at the strike, and their
`OptionEAE` rows), a dividend with its withholding tax, the tax reversed and charged
again at the treaty rate.

A statement for a period (`statement(from_date, to_date)`, also the object itself: it is
a statement function for `FakeFlexService.add_statement`) holds that period's rows and,
as IBKR's does, the positions and cash as of its last day. Standard library only; it
knows nothing of the Flex source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, ROUND_UP, Decimal
from xml.sax.saxutils import quoteattr

from .portfolio import Portfolio, SimPosition, load_sample_portfolio

CENT = Decimal("0.01")
#: The rates to USD the statements use, every day (a base currency's own rate is 1).
RATES_TO_USD: dict[str, Decimal] = {
    "USD": Decimal(1),
    "EUR": Decimal("1.08345"),
    "GBP": Decimal("1.2661"),
    "CHF": Decimal("1.1134"),
}
#: Security types whose value is no equity (margin and daily settlement instead).
NO_EQUITY = frozenset({"FUT", "CFD"})
#: Security types with no cash at the trade (their trades' proceeds are 0).
NO_PROCEEDS = NO_EQUITY
OPTIONS = frozenset({"OPT", "FOP", "WAR"})
#: Cash added above what an account's trades need, per currency.
CUSHION = Decimal(10000)
BASE = "USD"


def _money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


def _text(value: Decimal) -> str:
    text = format(value.normalize(), "f") if value else "0"
    return text


@dataclass
class Contract:
    con_id: int
    symbol: str
    sec_type: str
    currency: str
    multiplier: Decimal = Decimal(1)
    expiry: str = ""
    strike: str = ""
    right: str = ""
    exchange: str = ""
    underlying_con_id: int | None = None
    underlying_symbol: str = ""
    price: Decimal = Decimal(0)

    def attrs(self) -> dict[str, str]:
        return {
            "currency": self.currency,
            "fxRateToBase": _text(RATES_TO_USD[self.currency]),
            "assetCategory": self.sec_type,
            "symbol": self.symbol,
            "description": f"{self.symbol} {self.sec_type}",
            "conid": str(self.con_id),
            "isin": "",
            "listingExchange": self.exchange,
            "underlyingConid": ""
            if self.underlying_con_id is None
            else str(self.underlying_con_id),
            "underlyingSymbol": self.underlying_symbol,
            "multiplier": _text(self.multiplier),
            "strike": self.strike,
            "expiry": self.expiry,
            "putCall": self.right,
        }

    def value(self, quantity: Decimal, price: Decimal | None = None) -> Decimal:
        """The market value of `quantity` at `price` (the contract's by default; bonds:
        per 100 face)."""
        value = quantity * (self.price if price is None else price) * self.multiplier
        return value / 100 if self.sec_type == "BOND" else value


@dataclass
class Row:
    """One row of the history: where it goes, its attributes, and what it does."""

    day: dt.date
    seconds: int  # of the day, for order and the row's time
    account: str
    section: str
    tag: str
    attrs: dict[str, str]
    position: tuple[int, Decimal] | None = None  # (conId, quantity change)
    cash: list[tuple[str, Decimal]] = field(default_factory=list)


class FlexHistory:
    """The made-up history of `portfolio` over the `days` days ending `end` (see the
    module's docstring). `portfolio` defaults to the bundled sample."""

    def __init__(
        self,
        portfolio: Portfolio | None = None,
        *,
        end: dt.date,
        days: int = 7,
        query_name: str = "Simulated portfolio",
    ) -> None:
        if days < 3:
            raise ValueError("a history needs at least 3 days")
        self.portfolio = portfolio or load_sample_portfolio()
        self.end = end
        self.start = end - dt.timedelta(days=days - 1)
        self.days = days
        self.query_name = query_name
        self.accounts = self.portfolio.all_accounts()
        self.contracts: dict[int, Contract] = {}
        self.prices: dict[tuple[str, int], Decimal] = {}
        self.rows: list[Row] = []
        self._sequence = 0
        for account in self.accounts:
            self._account_history(account)
        self.rows.sort(key=lambda row: (row.day, row.seconds, row.attrs["transactionID"]))

    # --- the history ---

    def _day(self, fraction: float) -> dt.date:
        return self.start + dt.timedelta(days=round((self.days - 1) * fraction))

    def _id(self, account: str, what: str) -> str:
        """A stable id: the same history gives every row the same id again."""
        digest = hashlib.sha256(f"{account}/{what}".encode()).hexdigest()
        return str(10**9 + int(digest[:12], 16) % (9 * 10**9))

    def _contract(self, position: SimPosition) -> Contract:
        contract = Contract(
            con_id=position.con_id,
            symbol=position.symbol,
            sec_type=position.sec_type,
            currency=position.currency,
            multiplier=position.multiplier_value,
            expiry=position.last_trade_date,
            strike=_text(position.strike) if position.strike else "",
            right=position.right,
            exchange=position.exchange,
            price=position.price,
        )
        return self.contracts.setdefault(contract.con_id, contract)

    def _trade(
        self,
        account: str,
        contract: Contract,
        quantity: Decimal,
        price: Decimal,
        day: dt.date,
        what: str,
        *,
        book: str = "",
        commission: Decimal | None = None,
        seconds: int | None = None,
    ) -> Row:
        self._sequence += 1
        if contract.sec_type in NO_PROCEEDS:
            proceeds = Decimal(0)
        else:
            proceeds = -_money(
                quantity * price * contract.multiplier / (100 if contract.sec_type == "BOND" else 1)
            )
        if commission is None:
            commission = Decimal(0) if book else -max(Decimal(1), _money(abs(quantity) * CENT))
            if contract.sec_type in OPTIONS and not book:
                commission = -_money(abs(quantity) * Decimal("0.65"))
        transaction_id = self._id(account, f"trade/{what}")
        if seconds is None:
            seconds = 34200 + (self._sequence * 97) % 23000
        row = Row(
            day=day,
            seconds=seconds,
            account=account,
            section="Trades",
            tag="Trade",
            attrs={
                "accountId": account,
                **contract.attrs(),
                "tradeID": str(int(transaction_id) // 2),
                "reportDate": f"{day:%Y%m%d}",
                "dateTime": f"{day:%Y%m%d};{_clock(seconds)}",
                "tradeDate": f"{day:%Y%m%d}",
                "settleDateTarget": f"{day + dt.timedelta(days=1):%Y%m%d}",
                "transactionType": "BookTrade" if book else "ExchTrade",
                "exchange": "--" if book else (contract.exchange or "IDEALPRO"),
                "quantity": _text(quantity),
                "tradePrice": _text(price),
                "proceeds": _text(proceeds),
                "taxes": "0",
                "ibCommission": _text(commission),
                "ibCommissionCurrency": contract.currency,
                "netCash": _text(proceeds + commission),
                "openCloseIndicator": "O" if not book else "C",
                "notes": book,
                "fifoPnlRealized": "0",
                "buySell": "BUY" if quantity > 0 else "SELL",
                "transactionID": transaction_id,
                "ibOrderID": "" if book else str(int(transaction_id) // 3),
                "ibExecID": "" if book else f"0000{int(transaction_id):x}.01.01",
                "orderType": "" if book else "LMT",
                "levelOfDetail": "EXECUTION",
            },
            position=None if contract.sec_type == "CASH" else (contract.con_id, quantity),
            cash=[(contract.currency, proceeds + commission)],
        )
        if contract.sec_type == "CASH":  # an FX conversion: the currency bought or sold
            row.cash.append((contract.symbol.split(".")[0], quantity))
        self.rows.append(row)
        return row

    def _cash(
        self,
        account: str,
        day: dt.date,
        kind: str,
        currency: str,
        amount: Decimal,
        description: str,
        what: str,
        *,
        contract: Contract | None = None,
        action_id: str = "",
        seconds: int = 72000,
    ) -> Row:
        transaction_id = self._id(account, f"cash/{what}")
        contract_attrs = (
            {
                "assetCategory": contract.sec_type,
                "symbol": contract.symbol,
                "conid": str(contract.con_id),
                "multiplier": _text(contract.multiplier),
            }
            if contract
            else {"assetCategory": "", "symbol": "", "conid": "", "multiplier": "0"}
        )
        row = Row(
            day=day,
            seconds=seconds,
            account=account,
            section="CashTransactions",
            tag="CashTransaction",
            attrs={
                "accountId": account,
                "currency": currency,
                "fxRateToBase": _text(RATES_TO_USD[currency]),
                **contract_attrs,
                "description": description,
                "dateTime": f"{day:%Y%m%d};{_clock(seconds)}",
                "settleDate": f"{day:%Y%m%d}",
                "reportDate": f"{day:%Y%m%d}",
                "amount": _text(amount),
                "type": kind,
                "transactionID": transaction_id,
                "actionID": action_id,
                "levelOfDetail": "DETAIL",
            },
            cash=[(currency, amount)],
        )
        self.rows.append(row)
        return row

    def _option_event(
        self,
        account: str,
        contract: Contract,
        day: dt.date,
        kind: str,
        quantity: Decimal,
        what: str,
    ) -> None:
        self.rows.append(
            Row(
                day=day,
                seconds=61200,
                account=account,
                section="OptionEAE",
                tag="OptionEAE",
                attrs={
                    "accountId": account,
                    **contract.attrs(),
                    "date": f"{day:%Y%m%d}",
                    "transactionType": kind,
                    "quantity": _text(quantity),
                    "tradePrice": "0",
                    "markPrice": "0",
                    "proceeds": "0",
                    "realizedPnl": "0",
                    "transactionID": self._id(account, f"eae/{what}"),
                    "tradeID": "",
                },
            )
        )

    def _account_history(self, account: str) -> None:
        held = [p for p in self.portfolio.positions if p.account == account]
        fx_positions: dict[str, Decimal] = defaultdict(Decimal)
        for index, position in enumerate(held):
            if position.sec_type == "CASH":
                # A forex position is a cash balance in a statement: bought by conversion.
                fx_positions[position.symbol] += position.quantity
                continue
            contract = self._contract(position)
            # Each account's own price, as the gateway simulator has it (its average cost).
            price = self.prices[account, contract.con_id] = position.price
            day = self._day(1 / 6 + (index % 4) / 6)
            quantity = position.quantity
            if index == 0 and position.sec_type == "STK" and quantity >= 100:
                # The first 100 shares come from a short put that is assigned.
                quantity -= self._assignment(account, contract)
            if not quantity:
                continue
            if index % 3 == 1:
                # Bought twice the quantity, then half of it sold a day later, dearer.
                self._trade(account, contract, quantity * 2, price, day, f"{index}/open")
                self._trade(
                    account,
                    contract,
                    -quantity,
                    price * Decimal("1.02"),
                    day + dt.timedelta(days=1),
                    f"{index}/reduce",
                )
            else:
                self._trade(account, contract, quantity, price, day, f"{index}/open")
        if held:
            self._expiry(account, held)
            self._dividends(account, held)
        # Interest and fees, on the last day.
        self._cash(
            account,
            self.end,
            "Broker Interest Received",
            BASE,
            Decimal("12.34"),
            f"{BASE} CREDIT INT FOR {self.end:%b-%Y}".upper(),
            "interest",
        )
        if held:
            self._cash(
                account,
                self.end,
                "Other Fees",
                BASE,
                Decimal("-10.00"),
                "MARKET DATA SUBSCRIPTION",
                "fee",
            )
        # The money the trades needed, in first: a deposit in the base currency, and each
        # other currency bought with it (its forex positions on top).
        flows: dict[str, Decimal] = defaultdict(Decimal)
        for row in self.rows:
            if row.account == account:
                for currency, amount in row.cash:
                    flows[currency] += amount
        for currency in sorted(set(flows) | set(fx_positions)):
            if currency == BASE:
                continue
            needed = max(Decimal(0), -flows[currency])
            bought = (needed / 1000).quantize(Decimal(1), rounding=ROUND_UP) * 1000 + CUSHION
            bought += fx_positions[currency]
            pair = Contract(
                con_id=_FX_CON_IDS.get(currency, 12087000 + sum(map(ord, currency))),
                symbol=f"{currency}.{BASE}",
                sec_type="CASH",
                currency=BASE,
                exchange="IDEALPRO",
                price=RATES_TO_USD[currency],
            )
            self.contracts.setdefault(pair.con_id, pair)
            row = self._trade(
                account, pair, bought, pair.price, self.start, f"fx/{currency}",
                commission=Decimal("-2.00"), seconds=36000,
            )  # fmt: skip
            flows[BASE] += row.cash[0][1]
        deposit = (max(Decimal(0), -flows[BASE]) / 1000).quantize(
            Decimal(1), rounding=ROUND_UP
        ) * 1000 + CUSHION * 5
        self._cash(
            account, self.start, "Deposits/Withdrawals", BASE, deposit,
            "CASH RECEIPTS / ELECTRONIC FUND TRANSFERS", "deposit", seconds=32400,
        )  # fmt: skip

    def _assignment(self, account: str, stock: Contract) -> Decimal:
        """A put sold, then assigned: 100 shares bought at its strike. Returns 100."""
        strike = stock.price.quantize(Decimal(1))
        day_sold, day_assigned = self._day(0), self._day(4 / 6)
        put = self.contracts.setdefault(
            stock.con_id * 10 + 7,
            Contract(
                con_id=stock.con_id * 10 + 7,
                symbol=f"{stock.symbol} {day_assigned:%d%b%y}".upper() + f" {strike} P",
                sec_type="OPT",
                currency=stock.currency,
                multiplier=Decimal(100),
                expiry=f"{day_assigned:%Y%m%d}",
                strike=_text(strike),
                right="P",
                exchange="CBOE",
                underlying_con_id=stock.con_id,
                underlying_symbol=stock.symbol,
                price=Decimal("2.50"),
            ),
        )
        self._trade(account, put, Decimal(-1), put.price, day_sold, "assigned-put/sell")
        self._trade(account, put, Decimal(1), Decimal(0), day_assigned, "assigned-put/A", book="A")
        self._trade(
            account, stock, Decimal(100), strike, day_assigned, "assigned-put/stock", book="A"
        )
        self._option_event(account, put, day_assigned, "Assignment", Decimal(1), "assigned-put")
        return Decimal(100)

    def _expiry(self, account: str, held: list[SimPosition]) -> None:
        """A call bought, expiring worthless."""
        stock = next((p for p in held if p.sec_type == "STK"), None)
        if stock is None:
            return
        day_bought, day_expired = self._day(1 / 6), self._day(5 / 6)
        strike = (stock.price * Decimal("1.5")).quantize(Decimal(1))
        call = self.contracts.setdefault(
            stock.con_id * 10 + 3,
            Contract(
                con_id=stock.con_id * 10 + 3,
                symbol=f"{stock.symbol} {day_expired:%d%b%y}".upper() + f" {strike} C",
                sec_type="OPT",
                currency=stock.currency,
                multiplier=Decimal(100),
                expiry=f"{day_expired:%Y%m%d}",
                strike=_text(strike),
                right="C",
                exchange="CBOE",
                underlying_con_id=stock.con_id,
                underlying_symbol=stock.symbol,
                price=Decimal("0.35"),
            ),
        )
        self._trade(account, call, Decimal(2), call.price, day_bought, "expired-call/buy")
        self._trade(
            account, call, Decimal(-2), Decimal(0), day_expired, "expired-call/Ep", book="Ep"
        )
        self._option_event(account, call, day_expired, "Expiration", Decimal(-2), "expired-call")

    def _dividends(self, account: str, held: list[SimPosition]) -> None:
        """A dividend of the first stock held and of the first in another currency, each
        with its withholding tax; for the first, the tax reversed and charged again at the
        treaty rate."""
        stocks = [p for p in held if p.sec_type == "STK"][:1]
        stocks += [p for p in held if p.sec_type == "STK" and p.currency != stocks[0].currency][:1]
        day = self._day(5 / 6)
        for index, position in enumerate(stocks):
            contract = self.contracts[position.con_id]
            per_share = Decimal("0.25") if index == 0 else Decimal("2.80")
            amount = _money(position.quantity * per_share)
            action = self._id(account, f"dividend/{index}/action")
            name = f"{contract.symbol}({contract.con_id})"
            self._cash(
                account, day, "Dividends", contract.currency, amount,
                f"{name} CASH DIVIDEND {contract.currency} {per_share} PER SHARE "
                "(Ordinary Dividend)", f"dividend/{index}", contract=contract, action_id=action,
            )  # fmt: skip
            tax = -_money(amount * Decimal("0.30"))
            self._cash(
                account, day, "Withholding Tax", contract.currency, tax,
                f"{name} CASH DIVIDEND {contract.currency} {per_share} PER SHARE - US TAX",
                f"dividend/{index}/tax", contract=contract, action_id=action,
            )  # fmt: skip
            if index == 0:
                later = day + dt.timedelta(days=1)
                self._cash(
                    account, later, "Withholding Tax", contract.currency, -tax,
                    f"{name} CASH DIVIDEND {contract.currency} {per_share} PER SHARE - US TAX "
                    "(REVERSAL)", f"dividend/{index}/tax-reversed", contract=contract,
                    action_id=action,
                )  # fmt: skip
                self._cash(
                    account, later, "Withholding Tax", contract.currency,
                    -_money(amount * Decimal("0.15")),
                    f"{name} CASH DIVIDEND {contract.currency} {per_share} PER SHARE - US TAX",
                    f"dividend/{index}/tax-treaty", contract=contract, action_id=action,
                    seconds=72060,
                )  # fmt: skip

    # --- what it adds up to ---

    def price(self, account: str, con_id: int) -> Decimal:
        """The price of a contract in an account's statement: the portfolio's for the
        account, else the contract's (an option of the history)."""
        return self.prices.get((account, con_id), self.contracts[con_id].price)

    def positions(self, on: dt.date) -> dict[tuple[str, int], Decimal]:
        """(account, conId) -> quantity at the end of `on`, for every contract held."""
        held: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
        for row in self.rows:
            if row.day <= on and row.position is not None:
                held[row.account, row.position[0]] += row.position[1]
        return {key: quantity for key, quantity in held.items() if quantity}

    def cash(self, on: dt.date) -> dict[tuple[str, str], Decimal]:
        """(account, currency) -> cash at the end of `on`."""
        cash: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for row in self.rows:
            if row.day <= on:
                for currency, amount in row.cash:
                    cash[row.account, currency] += amount
        return dict(cash)

    def ending_cash(self, account: str) -> dict[str, Decimal]:
        """An account's cash per currency at the end of the history (its forex positions
        included: a statement holds them as cash): what a gateway reading the account
        after the history reports as its cash balances."""
        return {
            currency: amount
            for (held, currency), amount in sorted(self.cash(self.end).items())
            if held == account
        }

    def net_asset_value(self, account: str, on: dt.date) -> tuple[Decimal, Decimal, Decimal]:
        """(cash, stock, options) in the base currency at the end of `on`, unrounded."""
        cash = sum(
            (amount * RATES_TO_USD[currency] for (a, currency), amount in self.cash(on).items()
             if a == account),
            Decimal(0),
        )  # fmt: skip
        stock = options = Decimal(0)
        for (a, con_id), quantity in self.positions(on).items():
            contract = self.contracts[con_id]
            if a != account or contract.sec_type in NO_EQUITY:
                continue
            value = (
                contract.value(quantity, self.price(a, con_id)) * RATES_TO_USD[contract.currency]
            )
            if contract.sec_type in OPTIONS:
                options += value
            else:
                stock += value
        return cash, stock, options

    # --- the statement ---

    def __call__(self, from_date: dt.date | None, to_date: dt.date | None) -> str:
        return self.statement(from_date, to_date)

    def statement(self, from_date: dt.date | None = None, to_date: dt.date | None = None) -> str:
        return "".join(self.iter_statement(from_date, to_date))

    def iter_statement(
        self, from_date: dt.date | None = None, to_date: dt.date | None = None
    ) -> Iterator[str]:
        to_date = to_date or self.end
        from_date = from_date or self.start
        yield '<?xml version="1.0" encoding="UTF-8"?>\n'
        yield f'<FlexQueryResponse queryName={quoteattr(self.query_name)} type="AF">\n'
        yield f'<FlexStatements count="{len(self.accounts)}">\n'
        for account in self.accounts:
            yield from self._account_statement(account, from_date, to_date)
        yield "</FlexStatements>\n</FlexQueryResponse>\n"

    def _account_statement(
        self, account: str, from_date: dt.date, to_date: dt.date
    ) -> Iterator[str]:
        generated = to_date + dt.timedelta(days=1)
        yield (
            f'<FlexStatement accountId="{account}" fromDate="{from_date:%Y%m%d}" '
            f'toDate="{to_date:%Y%m%d}" period="" whenGenerated="{generated:%Y%m%d};061500">\n'
        )
        yield _row(
            "AccountInformation", accountId=account, acctAlias="", currency=BASE,
            name=f"Simulated account {account}", accountType="Individual",
            customerType="Individual",
        )  # fmt: skip
        yield "<OpenPositions>\n"
        for (held_account, con_id), quantity in sorted(self.positions(to_date).items()):
            if held_account != account:
                continue
            contract = self.contracts[con_id]
            price = self.price(account, con_id)
            value = contract.value(quantity, price)
            yield _row(
                "OpenPosition",
                accountId=account,
                **contract.attrs(),
                reportDate=f"{to_date:%Y%m%d}",
                position=_text(quantity),
                markPrice=_text(price),
                positionValue=_text(_money(value)),
                costBasisPrice=_text(price),
                costBasisMoney=_text(_money(value)),
                fifoPnlUnrealized="0",
                side="Long" if quantity > 0 else "Short",
                levelOfDetail="SUMMARY",
            )
        yield "</OpenPositions>\n<CashReport>\n"
        cash = {c: a for (acc, c), a in sorted(self.cash(to_date).items()) if acc == account}
        yield _row(
            "CashReportCurrency",
            accountId=account,
            currency="BASE_SUMMARY",
            levelOfDetail="BaseCurrency",
            endingCash=_text(
                _money(sum((a * RATES_TO_USD[c] for c, a in cash.items()), Decimal(0)))
            ),
            endingSettledCash="",
        )
        for currency, amount in cash.items():
            yield _row(
                "CashReportCurrency",
                accountId=account,
                currency=currency,
                levelOfDetail="Currency",
                endingCash=_text(amount),
                endingSettledCash=_text(amount),
            )
        yield "</CashReport>\n<EquitySummaryInBase>\n"
        day = max(from_date, self.start)
        while day <= to_date:
            cash_value, stock, options = self.net_asset_value(account, day)
            yield _row(
                "EquitySummaryByReportDateInBase",
                accountId=account,
                currency=BASE,
                reportDate=f"{day:%Y%m%d}",
                cash=_text(_money(cash_value)),
                stock=_text(_money(stock)),
                options=_text(_money(options)),
                # As IBKR's: the total is the sum of its parts as shown.
                total=_text(_money(cash_value) + _money(stock) + _money(options)),
            )
            day += dt.timedelta(days=1)
        yield "</EquitySummaryInBase>\n<ConversionRates>\n"
        day = from_date
        while day <= to_date:
            for currency, rate in RATES_TO_USD.items():
                if currency != BASE:
                    yield _row(
                        "ConversionRate", reportDate=f"{day:%Y%m%d}", fromCurrency=currency,
                        toCurrency=BASE, rate=_text(rate),
                    )  # fmt: skip
            day += dt.timedelta(days=1)
        yield "</ConversionRates>\n"
        for section in ("Trades", "CashTransactions", "OptionEAE"):
            yield f"<{section}>\n"
            for row in self.rows:
                if (
                    row.account == account
                    and row.section == section
                    and (from_date <= row.day <= to_date)
                ):
                    yield _row(row.tag, **row.attrs)
            yield f"</{section}>\n"
        yield "</FlexStatement>\n"


#: IBKR's conIds of the currency pairs against USD.
_FX_CON_IDS = {"EUR": 12087792, "GBP": 12087797, "CHF": 12087802}


def _clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _row(tag: str, **attributes: str) -> str:
    return (
        f"<{tag} "
        + " ".join(f"{name}={quoteattr(value)}" for name, value in attributes.items())
        + " />\n"
    )


__all__ = ["RATES_TO_USD", "FlexHistory"]
