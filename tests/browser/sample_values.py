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


# The admin's pages, as a person with a few accounts sees them: a third account holding
# every common sec type, snapshots and sync runs minutes apart, and failed runs whose
# messages are long, so that a column, filter or label that does not fit shows.
TRUST = "U7777777"
TRUST_NAME = "Family trust with a long name"
LONG_FAILURE = (
    "Cannot connect to the IB gateway at 127.0.0.1:4002: connection refused. Is TWS or "
    "IB Gateway running there, with 'Enable ActiveX and Socket Clients' ticked and this "
    "host among the trusted IPs? Nothing was changed; the stored positions were kept."
)
TIMEOUT_FAILURE = (
    "No complete answer from the IB gateway within 30 s (positions of U1234567, "
    "DU7654321 and U7777777 asked for); the gateway may be busy or its market data farm "
    "disconnected. Nothing was changed."
)
#: Minutes between consecutive runs and between the trust's snapshots.
MINUTES_APART = 3


def create_admin_sample(now: dt.datetime | None = None) -> dict[str, object]:
    """`create_sample_values` and more: a third account with FUT, FUND, WAR, CASH and BOND
    positions (the others already hold STK, OPT and CRYPTO), six net liquidation snapshots
    minutes apart, and five sync runs minutes apart: successful ones (one with changes,
    one with an account whose values were missing) and failed ones with long messages."""
    from ibkr_sync.models import PositionChange

    now = now or timezone.now()
    accounts = create_sample_values(now)
    trust = Account.objects.create(
        broker="ibkr", external_id=TRUST, name=TRUST_NAME, base_currency="CHF",
        last_synced_at=now - dt.timedelta(minutes=MINUTES_APART),
    )  # fmt: skip
    es = _instrument(495512551, "ES", "FUT", "USD", exchange="CME", local_symbol="ESZ6",
                     multiplier=Decimal(50), expiry=dt.date(2026, 12, 18))  # fmt: skip
    fund = _instrument(48840001, "VWRL", "FUND", "CHF", exchange="FUNDSERV",
                       description="Vanguard FTSE All-World UCITS ETF fund units")  # fmt: skip
    warrant = _instrument(
        61110001, "UBSW", "WAR", "CHF", exchange="SWB", local_symbol="UBS WAR 251219 24",
        strike=Decimal(24), right="C",
    )  # fmt: skip
    forex = _instrument(12087792, "EUR", "CASH", "USD", exchange="IDEALPRO",
                        local_symbol="EUR.USD")  # fmt: skip
    bond = _instrument(
        52110001, "T", "BOND", "USD", exchange="SMART", local_symbol="T 4 1/4 11/15/34",
        description="US Treasury 4.25% 2034",
    )  # fmt: skip
    nestle = _instrument(39470001, "NESN", "STK", "CHF", exchange="EBS")
    held = [
        _position(trust, es, "-2", "251234.5", "5032.25", now, multiplier=50),
        _position(trust, fund, "310.125", "95.4321", "104.12", now),
        _position(trust, warrant, "5000", "0.412", "0.385", now),
        _position(trust, forex, "25000", "1.0712", "1.0850", now),
        _position(trust, bond, "100000", "0.9825", "0.99125", now),
        _position(trust, nestle, "80", "98.5", "84.32", now),
    ]
    for currency, amount, rate in (("CHF", "18250.4", "1"), ("USD", "-3200.55", "0.8841")):
        CashBalance.objects.create(
            account=trust, currency=currency, amount=Decimal(amount),
            exchange_rate=Decimal(rate), rate_currency="CHF",
            synced_at=now - dt.timedelta(minutes=MINUTES_APART),
        )  # fmt: skip
    AccountSnapshot.objects.bulk_create(
        AccountSnapshot(
            account=trust, taken_at=now - dt.timedelta(minutes=MINUTES_APART * (6 - i)),
            currency="CHF", net_liquidation=Decimal("812345.67") + 125 * i,
            total_cash_value=Decimal("15420.9"), gross_position_value=Decimal("796924.77"),
            unrealized_pnl=Decimal("-4321.09"), realized_pnl=Decimal("1234.5"),
            available_funds=Decimal("400123.45"), buying_power=Decimal("1600493.8"),
            exchange_rates={"CHF": "1", "USD": "0.8841"},
        )
        for i in range(6)
    )  # fmt: skip

    lock = {
        "host": "portfolio-app-7d9f8c6b5-x2k4q",
        "pid": 4242,
        "owner": "portfolio-app-7d9f8c6b5-x2k4q:4242:1764969600.123456",
        "database_session": "81234@2026-12-05 06:00:01.123456+00",
    }
    read = {
        "status": "read", "base_currency": "USD", "positions_valued": 7,
        "positions_stale": 0, "positions_unvalued": 0, "cash_currencies": ["EUR", "JPY", "USD"],
        "cash_reported": True,
    }  # fmt: skip
    runs = [
        # (minutes ago, status, trigger, error code, message, counts, values)
        (4 * MINUTES_APART, "success", "command", "", "",
         {"processed": 15, "created": 15}, {MAIN: read}),
        (3 * MINUTES_APART, "failed", "admin", "gateway_unavailable", LONG_FAILURE, {}, {}),
        (2 * MINUTES_APART, "success", "api", "", "",
         {"processed": 15, "updated": 2, "unchanged": 11, "closed": 1, "reopened": 1},
         {MAIN: read, PAPER: {"status": "missing", "reason": "no account values from IBKR "
                                                            "within 10 s (stored values kept)"},
          TRUST: {**read, "base_currency": "CHF", "cash_currencies": ["CHF", "USD"]}}),
        (MINUTES_APART, "failed", "command", "gateway_timeout", TIMEOUT_FAILURE, {}, {}),
    ]  # fmt: skip
    created = []
    for minutes, status, trigger, code, message, counts, values in runs:
        started = now - dt.timedelta(minutes=minutes)
        run = SyncRun.objects.create(
            trigger=trigger, status=status, accounts=[MAIN, PAPER, TRUST] if values else [],
            error_code=code, error_message=message, account_values=values,
            heartbeat_at=started + dt.timedelta(seconds=2), **lock, **counts,
        )  # fmt: skip
        SyncRun.objects.filter(pk=run.pk).update(
            started_at=started, finished_at=started + dt.timedelta(seconds=2.71828)
        )
        created.append(run)
    # The run `create_sample_values` recorded, before these.
    first = SyncRun.objects.exclude(pk__in=[run.pk for run in created]).get()
    SyncRun.objects.filter(pk=first.pk).update(
        started_at=now - dt.timedelta(minutes=5 * MINUTES_APART),
        finished_at=now - dt.timedelta(minutes=5 * MINUTES_APART, seconds=-3),
    )
    changed = created[2]
    for position, kind, before, after in (
        (held[0], "updated", "-1", "-2"),
        (held[1], "updated", "300", "310.125"),
        (held[2], "reopened", None, "5000"),
    ):
        PositionChange.objects.create(
            sync_run=changed, position=position, kind=kind,
            quantity_before=None if before is None else Decimal(before),
            quantity_after=Decimal(after), average_cost_after=position.average_cost,
        )  # fmt: skip
    closed = _position(trust, _instrument(77001, "OLD", "STK", "CHF"), "5", "10", "9", now)
    Position.objects.filter(pk=closed.pk).update(closed_at=now - dt.timedelta(minutes=6))
    PositionChange.objects.create(
        sync_run=changed, position=closed, kind="closed", quantity_before=Decimal(5),
        average_cost_before=Decimal(10),
    )  # fmt: skip
    return {**accounts, TRUST: trust, "runs": created}
