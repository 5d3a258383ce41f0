"""A portfolio with IBKR's values, written straight into the models: two accounts with
positions in several currencies (one, JPY, without an exchange rate), cash, and over a
year of daily net liquidation snapshots for one account, a single snapshot for the other.
The browser tests browse it, and the overview's screenshot in the docs shows it.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

from django.utils import timezone

from ibkr_sync.models import SyncRun
from portfolio.models import Account, AccountSnapshot, CashBalance, Instrument, Position

MAIN = "U1234567"
PAPER = "DU7654321"
HISTORY_DAYS = 420
CENT = Decimal("0.01")


def _instrument(con_id: int, symbol: str, sec_type: str, currency: str, **fields) -> Instrument:
    return Instrument.objects.create(
        broker="ibkr", external_id=str(con_id), symbol=symbol, sec_type=sec_type,
        currency=currency, **fields,
    )  # fmt: skip


def _position(account, instrument, quantity, average_cost, price, now, multiplier=1) -> Position:
    quantity, average_cost, price = Decimal(quantity), Decimal(average_cost), Decimal(price)
    cost_basis = quantity * average_cost
    market_value = quantity * price * multiplier
    return Position.objects.create(
        account=account, instrument=instrument, quantity=quantity, average_cost=average_cost,
        cost_basis=cost_basis, market_price=price, market_value=market_value,
        unrealized_pnl=market_value - cost_basis, realized_pnl=Decimal(0),
        opened_at=now - dt.timedelta(days=HISTORY_DAYS), last_synced_at=now, valued_at=now,
    )  # fmt: skip


def net_liquidation(day: int) -> Decimal:
    """A smooth, deterministic walk around 250,000 (day 0 is the oldest)."""
    value = 240_000 + 60 * day + 30_000 * math.sin(day / 45) + 1_500 * math.sin(day * 1.7)
    return Decimal(value).quantize(CENT)


def create_sample_values(now: dt.datetime | None = None) -> dict[str, Account]:
    now = now or timezone.now()
    main = Account.objects.create(
        broker="ibkr", external_id=MAIN, name="Main", base_currency="USD", last_synced_at=now
    )
    paper = Account.objects.create(
        broker="ibkr", external_id=PAPER, name="Paper", base_currency="EUR", is_paper=True,
        last_synced_at=now,
    )  # fmt: skip

    aapl = _instrument(265598, "AAPL", "STK", "USD", exchange="NASDAQ")
    msft = _instrument(272093, "MSFT", "STK", "USD", exchange="NASDAQ")
    vti = _instrument(12340001, "VTI", "STK", "USD", exchange="ARCA")
    spy_call = _instrument(
        700001, "SPY", "OPT", "USD", exchange="CBOE", local_symbol="SPY   261218C00600000",
        multiplier=Decimal(100), strike=Decimal(600), right="C",
    )  # fmt: skip
    btc = _instrument(479624278, "BTC", "CRYPTO", "USD", exchange="PAXOS")
    sap = _instrument(14204, "SAP", "STK", "EUR", exchange="IBIS")
    bmw = _instrument(14, "BMW", "STK", "EUR", exchange="IBIS")
    toyota = _instrument(13008, "7203", "STK", "JPY", exchange="TSEJ")

    _position(main, aapl, "120", "150.25", "189.4321", now)
    _position(main, msft, "40", "310.1", "415.87", now)
    _position(main, vti, "12500", "198.7654321", "234.5678901234", now)
    _position(main, spy_call, "-2", "1250.5", "14.325", now, multiplier=100)
    _position(main, btc, "0.12345678", "61234.56789012", "97001.25", now)
    _position(main, sap, "50", "120.3", "181.12", now)
    _position(main, toyota, "100", "2500", "2870", now)
    _position(paper, bmw, "40", "98.76", "101.3", now)
    _position(paper, aapl, "10", "170", "189.4321", now)

    for account, currency, amount, rate in (
        (main, "USD", "12345.67", "1"),
        (main, "EUR", "1000", "1.085"),
        (main, "JPY", "-150000", None),
        (paper, "EUR", "50000", "1"),
        (paper, "USD", "-2500", "0.9216"),
    ):
        CashBalance.objects.create(
            account=account, currency=currency, amount=Decimal(amount),
            exchange_rate=None if rate is None else Decimal(rate),
            rate_currency="" if rate is None else account.base_currency, synced_at=now,
        )  # fmt: skip

    closing = now.replace(hour=21, minute=0, second=0, microsecond=0)
    if closing > now:
        closing -= dt.timedelta(days=1)
    AccountSnapshot.objects.bulk_create(
        AccountSnapshot(
            account=main,
            taken_at=closing - dt.timedelta(days=HISTORY_DAYS - 1 - day),
            currency="USD",
            net_liquidation=net_liquidation(day),
            # IBKR's rates with the values (none for the yen: the overview leaves it out).
            exchange_rates={"USD": "1", "EUR": "1.085"},
        )
        for day in range(HISTORY_DAYS)
    )
    AccountSnapshot.objects.create(
        account=paper, taken_at=now - dt.timedelta(hours=1), currency="EUR",
        net_liquidation=Decimal("51234.5"), total_cash_value=Decimal("47696"),
        exchange_rates={"EUR": "1", "USD": "0.9216"},
    )  # fmt: skip
    SyncRun.objects.create(
        trigger=SyncRun.Trigger.COMMAND, status=SyncRun.Status.SUCCESS, accounts=[MAIN, PAPER],
        processed=9, created=9, finished_at=timezone.now(),
    )  # fmt: skip
    return {MAIN: main, PAPER: paper}
