"""The portfolio overview.

Per account: IBKR's latest net liquidation and its history (a line chart), the cash by
currency and in the account's base currency, and the open positions' net cost basis,
market value and unrealized P&L by currency and sec type. Then the open positions of all
accounts by currency and sec type, with a small bar chart per currency. Everything is
aggregated in the database, in a fixed number of queries whatever the number of rows.

Amounts in different currencies are never added as they are. A total across currencies
is in the account's base currency as IBKR reported it with its latest values (the latest
snapshot's currency: never a field anyone can edit), each amount converted at IBKR's own
rate to that currency, with the conversion shown: the open positions' values at the rates
of that snapshot (every rate IBKR reported, with or without cash in the currency), each
cash balance at the rate read with it, only when that rate converts to the total's
currency. Only a positive rate converts. An amount without such a rate is shown but not
added, with the reason. Across accounts, totals are per currency only (accounts may have
different base currencies).

Where the project keeps the ledger's cash transactions, each account's income in a range
of days (default: this year): dividends, the tax withheld from them and the net, payments
in lieu, interest and fees, per currency and in the base currency at the rate IBKR gave
each row (`fx_rate_to_base`; a row without one is counted apart, never converted at a
rate of our own), in one query; shown only to users who may view cash transactions.

Each account also says which connection last reported it, and the moment that report
describes (`AccountReport`, by broker and account id): sync run data, which the page
shows only to users who may view sync runs.

It reads whichever models the IBKR_SYNC_*_MODEL settings name (our portfolio app's, or a
host's own); the admin shows it from the position model's admin (`admin.portfolio`), with
the sync's status panel (`status.py`: a line per connection when there are connections)
at the top.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest

from . import conf, history, visibility
from .decimals import exact_product, exact_sum, money, plain
from .decimals import rate as rate_text
from .models import AccountReport, is_rate
from .status import sync_status_panel

TIMES = "\N{MULTIPLICATION SIGN}"


def status_panels(request: HttpRequest) -> list[str]:
    """The panels at the top of the overview (safe HTML): the sync's status, to users who
    may see it."""
    return [html for html in (sync_status_panel(request),) if html]


def _plus(total: Decimal | None, value: Decimal | None) -> Decimal | None:
    """A sum of what was reported: None only while nothing was."""
    if value is None:
        return total
    return value if total is None else exact_sum((total, value))


@dataclass
class Subtotal:
    """Open positions of one group, in one currency."""

    currency: str
    positions: int = 0
    cost_basis: Decimal = Decimal(0)
    # Positions whose average cost the broker did not report: not in `cost_basis`.
    without_cost_basis: int = 0
    # IBKR's values: None when it reported none for any position of the group; the
    # positions it reported none for are counted apart, never taken as zero.
    market_value: Decimal | None = None
    without_market_value: int = 0
    unrealized_pnl: Decimal | None = None
    without_unrealized_pnl: int = 0

    @property
    def display(self) -> str:
        return money(self.cost_basis)

    @property
    def exact(self) -> str:
        return plain(self.cost_basis)

    def add(self, row: dict) -> None:
        """Add one row of the grouped query."""
        self.positions += row["n"]
        self.cost_basis = exact_sum((self.cost_basis, row["cost"] or 0))
        self.without_cost_basis += row["without_cost"]
        self.market_value = _plus(self.market_value, row["value"])
        self.without_market_value += row["without_value"]
        self.unrealized_pnl = _plus(self.unrealized_pnl, row["pnl"])
        self.without_unrealized_pnl += row["without_pnl"]

    def include(self, other: Subtotal) -> None:
        """Add another group's figures (e.g. a sec type's, to its currency's total)."""
        self.positions += other.positions
        self.cost_basis = exact_sum((self.cost_basis, other.cost_basis))
        self.without_cost_basis += other.without_cost_basis
        self.market_value = _plus(self.market_value, other.market_value)
        self.without_market_value += other.without_market_value
        self.unrealized_pnl = _plus(self.unrealized_pnl, other.unrealized_pnl)
        self.without_unrealized_pnl += other.without_unrealized_pnl


@dataclass
class Conversion:
    """An amount in one currency, and in the total's currency at IBKR's rate."""

    currency: str
    amount: Decimal | None
    rate: Decimal | None  # IBKR's, from `currency`, as reported; None if none
    base_currency: str  # the total's: IBKR's base currency of the latest values
    # What `rate` converts to, as IBKR reported it with the rate; None: `base_currency`
    # (a rate of the latest values). A rate to another currency is no rate for the total.
    rate_currency: str | None = None

    @property
    def same_currency(self) -> bool:
        """Already in the total's currency: no rate needed."""
        return bool(self.base_currency) and self.currency == self.base_currency

    @property
    def converts(self) -> bool:
        """Whether `rate` converts to the total's currency: positive, and to that one."""
        return is_rate(self.rate) and self.rate_currency in (None, self.base_currency)

    @property
    def converted(self) -> Decimal | None:
        """Exactly amount x rate; None when there is no amount, rate that converts to the
        total's currency, or total's currency."""
        if self.amount is None or not self.base_currency:
            return None
        if self.same_currency:
            return self.amount
        if not self.converts:
            return None
        return exact_product(self.amount, self.rate)

    @property
    def exact(self) -> str:
        return "" if self.converted is None else plain(self.converted)

    @property
    def why_not(self) -> str:
        """Why an amount is not converted (empty when it is)."""
        if self.amount is None or self.converted is not None:
            return ""
        currency, base = self.currency or "currency", self.base_currency
        if not base:
            return "the account's base currency is unknown"
        if self.rate is None:
            return f"IBKR reported no {currency}-{base} rate"
        if not is_rate(self.rate):
            return f"IBKR's {currency} rate {plain(self.rate)} is not a positive rate"
        if not self.rate_currency:
            return f"IBKR's {currency} rate was read without the currency it converts to"
        return f"IBKR's {currency} rate converts to {self.rate_currency}, not {base}"

    @property
    def text(self) -> str:
        """1,000.00 EUR x 1.0850 = 1,085.00 USD (with a multiplication sign), or why it is
        not converted."""
        if self.amount is None:
            return "-"
        shown = f"{money(self.amount)} {self.currency}".rstrip()
        if self.same_currency:
            return shown
        if self.converted is None:
            return f"{shown}: not added ({self.why_not})"
        converted = f"{money(self.converted)} {self.base_currency}"
        return f"{shown} {TIMES} {rate_text(self.rate)} = {converted}"


@dataclass
class Total:
    """A total in the base currency of the amounts converted; the others listed apart."""

    base_currency: str
    conversions: list[Conversion]

    @property
    def added(self) -> list[Conversion]:
        return [c for c in self.conversions if c.converted is not None]

    @property
    def not_added(self) -> list[Conversion]:
        return [c for c in self.conversions if c.amount is not None and c.converted is None]

    @property
    def amount(self) -> Decimal | None:
        added = self.added
        return exact_sum(c.converted for c in added) if added else None

    @property
    def display(self) -> str:
        return "-" if self.amount is None else money(self.amount)

    @property
    def exact(self) -> str:
        return "" if self.amount is None else plain(self.amount)


@dataclass
class CurrencySummary:
    total: Subtotal
    by_sec_type: list[tuple[str, Subtotal]] = field(default_factory=list)
    chart: dict | None = None


@dataclass
class AccountSummary:
    pk: int
    external_id: str
    name: str
    base_currency: str = ""
    currencies: list[CurrencySummary] = field(default_factory=list)
    # The latest snapshot with a net liquidation, if any.
    snapshot: object | None = None  # the account snapshot model's row
    cash: list[Conversion] = field(default_factory=list)
    # IBKR's exchange rates to the base currency, by currency: the latest snapshot's; and
    # rates to it that do not convert (a cash row's), to say why.
    rates: dict[str, Decimal] = field(default_factory=dict)
    not_rates: dict[str, Decimal] = field(default_factory=dict)
    history: history.History | None = None
    chart: dict | None = None
    # The connection that last reported the account (its name; empty: the settings'
    # gateway, or no report yet) and the moment that report describes.
    reported_by: str = ""
    reported_as_of: dt.datetime | None = None
    # Its income from the ledger in the range asked for (`ledger_income`), if shown.
    income: AccountIncome | None = None

    @property
    def by_currency(self) -> list[Subtotal]:
        return [c.total for c in self.currencies]

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.by_currency)

    @property
    def cash_total(self) -> Total:
        return Total(self.base_currency, self.cash)

    def _total(self, attribute: str) -> Total:
        return Total(
            self.base_currency,
            [
                Conversion(s.currency, getattr(s, attribute),
                           self.rates.get(s.currency, self.not_rates.get(s.currency)),
                           self.base_currency)
                for s in self.by_currency
            ],
        )  # fmt: skip

    @property
    def converts(self) -> bool:
        """Whether any open position is in another currency than the base currency."""
        return any(c.total.currency != self.base_currency for c in self.currencies)

    @property
    def in_base(self) -> list[tuple[str, Conversion, Conversion]]:
        """Per currency: its market value and unrealized P&L, converted."""
        pairs = zip(self.market_value.conversions, self.unrealized_pnl.conversions, strict=True)
        return [(value.currency, value, pnl) for value, pnl in pairs]

    @property
    def not_added(self) -> list[str]:
        """The currencies of positions with IBKR values left out of the totals."""
        left_out = {c.currency for c in self.market_value.not_added}
        left_out |= {c.currency for c in self.unrealized_pnl.not_added}
        return sorted(c or "(none)" for c in left_out)

    @property
    def market_value(self) -> Total:
        return self._total("market_value")

    @property
    def unrealized_pnl(self) -> Total:
        return self._total("unrealized_pnl")


@dataclass
class Overview:
    accounts: list[AccountSummary]
    currencies: list[CurrencySummary]
    history_range: history.Range = field(default_factory=lambda: history.chosen_range(None))
    ranges: tuple[history.Range, ...] = history.RANGES

    @property
    def positions(self) -> int:
        return sum(c.total.positions for c in self.currencies)


def _grouped_positions(user: Any = None):
    """Open positions (of the accounts `user` may see) summed by account, currency and sec
    type: one query."""
    return (
        _visible(conf.position_model().objects.filter(closed_at__isnull=True), user, "account")
        .values("account_id", "instrument__currency", "instrument__sec_type")
        .annotate(
            n=Count("id"),
            # (Named apart from the fields they sum: an alias may not shadow a column.)
            cost=Sum("cost_basis"),
            without_cost=Count("id", filter=Q(cost_basis__isnull=True)),
            value=Sum("market_value"),
            without_value=Count("id", filter=Q(market_value__isnull=True)),
            pnl=Sum("unrealized_pnl"),
            without_pnl=Count("id", filter=Q(unrealized_pnl__isnull=True)),
        )
        .order_by()
    )


def _summaries(groups: dict[str, dict[str, Subtotal]], chart: bool) -> list[CurrencySummary]:
    """Per currency (sorted), its total and its sec types, the largest first."""
    summaries = []
    for currency in sorted(groups):
        total = Subtotal(currency)
        for subtotal in groups[currency].values():
            total.include(subtotal)
        sec_types = sorted(
            groups[currency].items(), key=lambda item: (-abs(item[1].cost_basis), item[0])
        )
        summaries.append(
            CurrencySummary(
                total=total,
                by_sec_type=sec_types,
                chart=bar_chart([(t, s.cost_basis) for t, s in sec_types]) if chart else None,
            )
        )
    return summaries


def _latest_snapshots(accounts: Iterable) -> dict:
    ids = {pk for a in accounts for pk in (a.latest_snapshot, a.latest_values) if pk is not None}
    return conf.account_snapshot_model().objects.in_bulk(ids) if ids else {}


def _rates(snapshot) -> dict[str, Decimal]:
    """The rates of a snapshot that convert (a row written by hand may hold anything)."""
    rates = {}
    for currency, text in ((snapshot and snapshot.exchange_rates) or {}).items():
        try:
            rate = Decimal(str(text))
        except ArithmeticError:
            continue
        if is_rate(rate):
            rates[currency] = rate
    return rates


def _visible(queryset, user: Any, account: str):
    return queryset if user is None else visibility.visible(queryset, user, account)


def portfolio_overview(
    history_range: history.Range | str | None = None,
    now: dt.datetime | None = None,
    user: Any = None,
) -> Overview:
    """The whole overview in six queries (the accounts with their latest snapshot's key,
    those snapshots, the cash, the grouped open positions, and the history's two), however
    many accounts, positions and snapshots there are. With `user`, of the accounts that
    user may see only (`visibility`), the totals by currency included."""
    if not isinstance(history_range, history.Range):
        history_range = history.chosen_range(history_range)
    latest = (
        conf.account_snapshot_model()
        .objects.filter(account=OuterRef("pk"))
        .order_by("-taken_at", "-id")
    )
    report = AccountReport.objects.filter(
        broker=OuterRef("broker"), external_id=OuterRef("external_id")
    )
    accounts = list(
        _visible(conf.account_model().objects.all(), user, "")
        .only("id", "external_id", "name", "is_paper")
        .annotate(
            latest_snapshot=Subquery(latest.filter(net_liquidation__isnull=False).values("id")[:1]),
            # IBKR's latest values: their currency is the totals', their rates convert.
            latest_values=Subquery(latest.values("id")[:1]),
            # Its connection's name now (as it was, if it was removed since).
            reported_by=Subquery(
                report.values(name=Coalesce("connection__name", "connection_name"))[:1]
            ),
            reported_as_of=Subquery(report.values("as_of")[:1]),
        )
        # Paper-trading accounts after the real ones.
        .order_by("is_paper", "external_id", "id")
    )
    snapshots = _latest_snapshots(accounts)
    summaries: dict[int, AccountSummary] = {}
    for account in accounts:
        latest = snapshots.get(account.latest_values)
        summaries[account.pk] = AccountSummary(
            pk=account.pk,
            external_id=account.external_id,
            name=account.name,
            base_currency=latest.currency if latest else "",
            snapshot=snapshots.get(account.latest_snapshot),
            rates=_rates(latest),
            reported_by=account.reported_by or "",
            reported_as_of=account.reported_as_of,
        )

    # The queries are not one snapshot of the database: an account a sync adds meanwhile
    # is left out (of the page's accounts; its open positions still count by currency).
    cash_rows = (
        _visible(conf.cash_balance_model().objects.all(), user, "account")
        .order_by("account_id", "currency")
        .values_list("account_id", "currency", "amount", "exchange_rate", "rate_currency")
    )
    for account_id, currency, amount, exchange_rate, rate_currency in cash_rows:
        if (summary := summaries.get(account_id)) is None:
            continue
        summary.cash.append(
            Conversion(currency, amount, exchange_rate, summary.base_currency, rate_currency)
        )
        # A rate to the total's currency that converts nothing: why its positions are out.
        if rate_currency == summary.base_currency and not is_rate(exchange_rate):
            summary.not_rates[currency] = exchange_rate

    by_account: dict[int, dict[str, dict[str, Subtotal]]] = defaultdict(lambda: defaultdict(dict))
    by_currency: dict[str, dict[str, Subtotal]] = defaultdict(dict)
    for row in _grouped_positions(user):
        currency, sec_type = row["instrument__currency"], row["instrument__sec_type"]
        for groups in (by_account[row["account_id"]], by_currency):
            groups[currency].setdefault(sec_type, Subtotal(currency)).add(row)
    for pk, groups in by_account.items():
        if pk in summaries:
            summaries[pk].currencies = _summaries(groups, chart=False)

    since = history.range_start(history_range, now)
    for pk, account_history in history.histories(since, user).items():
        if (summary := summaries.get(pk)) is None:
            continue
        summary.history = account_history
        summary.chart = history.line_chart(summary.external_id, account_history, history_range)

    return Overview(
        accounts=list(summaries.values()),
        currencies=_summaries(by_currency, chart=True),
        history_range=history_range,
    )


# Chart geometry, in SVG user units.
CHART_WIDTH = 560
LABEL_WIDTH = 70
VALUE_WIDTH = 130
BAR_HEIGHT = 18
BAR_GAP = 8


def bar_chart(items: list[tuple[str, Decimal]]) -> dict | None:
    """Horizontal bars, one per label, around a zero line (shorts are negative), scaled
    to the largest amount. Plain numbers for an inline SVG: no script, nothing fetched."""
    if not items:
        return None
    plot = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    most = max(max((v for _, v in items), default=0), 0)
    least = min(min((v for _, v in items), default=0), 0)
    span = (most - least) or Decimal(1)
    zero = LABEL_WIDTH + float((-least) / span) * plot
    bars = []
    for index, (label, value) in enumerate(items):
        length = float(abs(value) / span) * plot
        y = BAR_GAP + index * (BAR_HEIGHT + BAR_GAP)
        bars.append(
            {
                "label": label,
                "value": money(value),
                "x": round(zero - length if value < 0 else zero, 1),
                "width": round(max(length, 1.0), 1),
                "y": y,
                "text_y": y + BAR_HEIGHT * 0.72,
                "negative": value < 0,
            }
        )
    return {
        "width": CHART_WIDTH,
        "height": BAR_GAP + len(items) * (BAR_HEIGHT + BAR_GAP),
        "zero": round(zero, 1),
        "value_x": CHART_WIDTH - VALUE_WIDTH + 6,
        "bars": bars,
    }


# --- income, from the ledger's cash transactions ---------------------------------------------

#: The kinds of cash transaction that are income (or its costs), in the table's order; net
#: dividends are dividends with the tax withheld from them.
INCOME_KINDS = ("dividend", "withholding_tax", "payment_in_lieu", "interest", "fee")


@dataclass
class IncomeLine:
    """One account's income in one currency (`currency`), or in its base currency at
    IBKR's rates (`in_base`): the amounts by kind, each the exact sum of the rows."""

    currency: str
    amounts: dict[str, Decimal] = field(default_factory=dict)
    in_base: bool = False

    def add(self, kind: str, amount: Decimal) -> None:
        self.amounts[kind] = exact_sum((self.amounts.get(kind, Decimal(0)), amount))

    def get(self, kind: str) -> Decimal | None:
        return self.amounts.get(kind)

    @property
    def net_dividends(self) -> Decimal | None:
        parts = [self.amounts[k] for k in ("dividend", "withholding_tax") if k in self.amounts]
        return exact_sum(parts) if parts else None

    @property
    def total(self) -> Decimal:
        return exact_sum(self.amounts.values())

    @property
    def columns(self) -> list[Decimal | None]:
        """The table's columns: dividends, tax, net dividends, in lieu, interest, fees."""
        return [
            self.get("dividend"), self.get("withholding_tax"), self.net_dividends,
            self.get("payment_in_lieu"), self.get("interest"), self.get("fee"),
        ]  # fmt: skip


@dataclass
class AccountIncome:
    by_currency: list[IncomeLine]
    base: IncomeLine  # what converts at IBKR's rates, in the account's base currency
    # Rows left out of `base`: IBKR gave no rate that converts (never a guessed one).
    not_converted: dict[str, int] = field(default_factory=dict)


@dataclass
class Income:
    start: dt.date
    end: dt.date
    accounts: dict[int, AccountIncome]
    problem: str = ""  # a bad ?from= / ?to=, said on the page (the default range used)


def income_range(query, today: dt.date) -> tuple[dt.date, dt.date, str]:
    """The days ?from= and ?to= name (YYYY-MM-DD, both included); default: this year up
    to today. A bad value is said, and the default used instead."""
    start, end, problems = dt.date(today.year, 1, 1), today, []
    for name in ("from", "to"):
        text = (query.get(name) or "").strip()
        if not text:
            continue
        try:
            day = dt.date.fromisoformat(text) if len(text) == 10 else None
        except ValueError:
            day = None
        if day is None:
            problems.append(f"{name} {text[:40]!r} is not a date (YYYY-MM-DD)")
        elif name == "from":
            start = day
        else:
            end = day
    if start > end:
        problems.append(f"from {start} is after to {end}")
        start, end = dt.date(today.year, 1, 1), today
    return start, end, "; ".join(problems)


def account_income(
    model, start: dt.date, end: dt.date, base_currencies: dict[int, str]
) -> dict[int, AccountIncome]:
    """Each account's income between `start` and `end` (both included), by currency and
    kind, and in its base currency (`base_currencies`, by account id: the accounts shown,
    those the user may see, and no other) at each row's own rate from IBKR
    (`fx_rate_to_base`): one query, summed in the database by account, currency, kind and
    rate, however many rows there are."""
    rows = (
        model.objects.filter(
            account_id__in=list(base_currencies),
            date__gte=start,
            date__lte=end,
            kind__in=INCOME_KINDS,
        )
        .values("account_id", "currency", "kind", "fx_rate_to_base")
        .annotate(total=Sum("amount"), n=Count("id"))
        .order_by("account_id", "currency", "kind")
    )
    lines: dict[int, dict[str, IncomeLine]] = defaultdict(dict)
    found: dict[int, AccountIncome] = {}
    for row in rows:
        pk, currency, kind, amount = row["account_id"], row["currency"], row["kind"], row["total"]
        if amount is None:
            continue
        lines[pk].setdefault(currency, IncomeLine(currency)).add(kind, amount)
        base = base_currencies.get(pk, "")
        income = found.setdefault(pk, AccountIncome([], IncomeLine(base, in_base=True)))
        converted = _to_base(amount, row["fx_rate_to_base"], currency, base)
        if converted is None:
            income.not_converted[currency] = income.not_converted.get(currency, 0) + row["n"]
        else:
            income.base.add(kind, converted)
    for pk, income in found.items():
        income.by_currency = [lines[pk][c] for c in sorted(lines[pk])]
    return found


def _to_base(amount: Decimal, rate: Decimal | None, currency: str, base: str) -> Decimal | None:
    """amount x IBKR's rate to the account's base currency, exactly; the amount itself in
    the base currency (where it is known) without a rate; else None: never a rate of our
    own."""
    if is_rate(rate):
        return exact_product(amount, rate)
    if base and currency == base:
        return amount
    return None


def ledger_income(query, base_currencies: dict[int, str], today: dt.date) -> Income | None:
    """The overview's income section, or None while the project keeps no cash
    transactions."""
    model = conf.cash_transaction_model()
    if model is None:
        return None
    start, end, problem = income_range(query, today)
    return Income(start, end, account_income(model, start, end, base_currencies), problem)
