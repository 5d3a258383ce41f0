"""The ledger in `as_of`'s story: each position held at a past moment with the change
that set it and the trades that explain it (`GET /portfolio/positions?as_of=`), and each
point of an account's history with the cash flows since the one before
(`GET /portfolio/accounts/<external_id>/history`)."""

import datetime as dt
import tracemalloc
from decimal import Decimal
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ibkr_sync.api.explanations import TRADES_PER_CHANGE
from ibkr_sync.models import AccountReport, Connection, SyncRun
from portfolio.models import AccountSnapshot, CashTransaction, Trade
from tests.flex.test_flex_connection import flex_connection, service  # noqa: F401
from tests.flex.test_ledger import sync as flex_sync
from tests.test_read_api import account, instrument
from tests.test_read_api_as_of import at, change, iso, position, sync_run

pytestmark = pytest.mark.django_db

EDT = dt.timezone(dt.timedelta(hours=-4))  # US Eastern in June
READ = ["view_position", "view_trade", "view_accountsnapshot", "view_cashtransaction"]


def user_with(django_user_model, name: str, *codenames: str):
    user = django_user_model.objects.create_user(name, password=f"pw-{name}-123")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def client(api_client, django_user_model):
    api_client.force_authenticate(user_with(django_user_model, "reader", *READ))
    return api_client


def trade(acct, instr, external_id, quantity, price="100", *, moment=None, day=None, **fields):
    """A ledger trade as the writer stores one: with its execution's moment (and that
    moment's date in US Eastern as its trade date), or with a trade date only."""
    if moment is not None:
        day = moment.astimezone(EDT).date()
    quantity = Decimal(quantity)
    return Trade.objects.create(
        broker="ibkr", account=acct, instrument=instr, external_id=external_id,
        trade_date=day, traded_at=moment, buy_sell="BUY" if quantity > 0 else "SELL",
        quantity=quantity, price=Decimal(price), currency=instr.currency, **fields,
    )  # fmt: skip


def as_of(client, moment, **query):
    return client.get(f"/portfolio/positions?{urlencode({'as_of': iso(moment), **query})}")


def changes(response) -> dict[str, dict]:
    assert response.status_code == 200, response.content
    return {
        f"{p['account']} {p['instrument']['symbol']}": p["change"]
        for p in response.json()["results"]
    }


def listed(external_id, day, buy_sell, quantity, price, traded_at=None) -> dict:
    return {
        "external_id": external_id,
        "trade_date": day,
        "traded_at": traded_at,
        "buy_sell": buy_sell,
        "quantity": quantity,
        "price": price,
        "currency": "USD",
    }


@pytest.fixture
def story():
    """U1111111: AAPL created at 1h (10, bought at 0.5h: T1), updated at 25h (next day,
    10 -> 15: bought 3 at 5h, T2, and 2 on June 1 without a time, T3; a purchase of 7 at
    6h cancelled, T4; a sale dated June 2 counts after the update, T7); TSLA created at
    1h (10: T8), updated at 25h to 20 with only 4 in the ledger (T9); GOOG split at 25h,
    5 -> 10, no trade. U2222222: MSFT created at 1h (1: T10). Trades of other pairs in
    the window: U1111111's MSFT (T5), U2222222's AAPL (T6)."""
    a, b = account("U1111111"), account("U2222222")
    aapl, tsla = instrument(265598, "AAPL"), instrument(76792991, "TSLA")
    msft, goog = instrument(272093, "MSFT"), instrument(208813719, "GOOG")
    first, second = sync_run(at(1)), sync_run(at(25))
    rows = {
        "aapl": position(a, aapl, "15", "155", opened_at=at(1)),
        "tsla": position(a, tsla, "20", "200", opened_at=at(1)),
        "goog": position(a, goog, "10", "50", opened_at=at(1)),
        "msft": position(b, msft, "1", "400", opened_at=at(1)),
    }
    change(first, rows["aapl"], "created", after=("10", "150"))
    change(second, rows["aapl"], "updated", before=("10", "150"), after=("15", "155"))
    change(first, rows["tsla"], "created", after=("10", "200"))
    change(second, rows["tsla"], "updated", before=("10", "200"), after=("20", "200"))
    change(first, rows["goog"], "created", after=("5", "100"))
    change(second, rows["goog"], "updated", before=("5", "100"), after=("10", "50"))
    change(first, rows["msft"], "created", after=("1", "400"))
    trades = {
        "T1": trade(a, aapl, "T1", "10", "150", moment=at(0.5)),
        "T2": trade(a, aapl, "T2", "3", "160", moment=at(5)),
        "T3": trade(a, aapl, "T3", "2", "158.25", day=dt.date(2025, 6, 1)),
        "T4": trade(a, aapl, "T4", "7", "159", moment=at(6), cancelled=True),
        "T5": trade(a, msft, "T5", "1", "410", moment=at(6)),
        "T6": trade(b, aapl, "T6", "4", "161", moment=at(6)),
        "T7": trade(a, aapl, "T7", "-1", "162", day=dt.date(2025, 6, 2)),
        "T8": trade(a, tsla, "T8", "10", "200", moment=at(0.75)),
        "T9": trade(a, tsla, "T9", "4", "201.5", moment=at(7)),
        "T10": trade(b, msft, "T10", "1", "400", moment=at(0.25)),
    }
    return {**rows, "trades": trades}


def test_a_purchase_explains_an_update_and_nothing_else_is_listed(client, story):
    aapl = changes(as_of(client, at(30)))["U1111111 AAPL"]

    # T1 came before the previous change (the creation), T4 was cancelled, T5 and T6 are
    # other pairs, T7 (June 2, no time) counts at the end of June 2 US Eastern: later.
    # T3 (June 1, no time) counts at 23:59:59 EDT on June 1: between the two changes.
    assert aapl == {
        "kind": "updated",
        "quantity_before": "10",
        "quantity_after": "15",
        "at": iso(at(25)),
        "trades": [
            listed("T2", "2025-06-01", "BUY", "3", "160", iso(at(5))),
            listed("T3", "2025-06-01", "BUY", "2", "158.25"),
        ],
        "trades_truncated": False,
        "explained": True,
    }
    assert listed("T3", "2025-06-01", "BUY", "2", "158.25")["price"] == "158.25"


def test_the_first_change_is_explained_by_every_trade_before_it(client, story):
    found = changes(as_of(client, at(2)))

    assert found["U1111111 AAPL"] == {
        "kind": "created",
        "quantity_before": None,
        "quantity_after": "10",
        "at": iso(at(1)),
        "trades": [listed("T1", "2025-06-01", "BUY", "10", "150", iso(at(0.5)))],
        "trades_truncated": False,
        "explained": True,
    }
    assert found["U2222222 MSFT"]["trades"] == [
        listed("T10", "2025-06-01", "BUY", "1", "400", iso(at(0.25)))
    ]
    assert found["U2222222 MSFT"]["explained"] is True


def test_a_partial_ledger_and_a_split_are_not_explained(client, story):
    found = changes(as_of(client, at(30)))

    assert found["U1111111 TSLA"] == {
        "kind": "updated",
        "quantity_before": "10",
        "quantity_after": "20",
        "at": iso(at(25)),
        "trades": [listed("T9", "2025-06-01", "BUY", "4", "201.5", iso(at(7)))],
        "trades_truncated": False,
        "explained": False,  # the ledger has 4 of the 10 bought
    }
    goog = found["U1111111 GOOG"]
    assert (goog["kind"], goog["trades"], goog["explained"]) == ("updated", [], False)


@pytest.mark.parametrize(
    ("second", "trades", "explained"),
    [
        (58, [], False),  # a second before June 2 ends in US Eastern: not yet
        (59, [listed("T7", "2025-06-02", "SELL", "-1", "162")], True),  # its day's end
    ],
)
def test_a_date_only_trade_counts_from_the_end_of_its_day_in_us_eastern(
    client, story, second, trades, explained
):
    # Updated again late on June 2 (EDT), 15 -> 14: the sale dated June 2 without a time
    # (T7) happened at 23:59:59 EDT that day, after the update at 25h (09:00 EDT).
    moment = dt.datetime(2025, 6, 2, 23, 59, second, tzinfo=EDT)
    change(sync_run(moment), story["aapl"], "updated", before=("15", "155"), after=("14", "155"))

    aapl = changes(as_of(client, moment))["U1111111 AAPL"]

    assert aapl == {
        "kind": "updated",
        "quantity_before": "15",
        "quantity_after": "14",
        "at": iso(moment.astimezone(dt.UTC)),
        "trades": trades,
        "trades_truncated": False,
        "explained": explained,
    }


def test_a_cancelled_trade_is_not_counted(client, story):
    t = story["trades"]
    Trade.objects.filter(pk=t["T2"].pk).update(cancelled=True)

    aapl = changes(as_of(client, at(30)))["U1111111 AAPL"]

    assert aapl["trades"] == [listed("T3", "2025-06-01", "BUY", "2", "158.25")]
    assert aapl["explained"] is False  # 2 of the 5


def test_a_trade_ibkr_cancelled_by_a_row_of_its_own_nets_to_nothing(client, story):
    """IBKR cancels an execution with a row of its own (its own transaction id, notes
    `Ca`, the original's side, the quantity reversed: `BUY (Ca.)`, -4), the original
    left as it was: the purchase and its reversal add up to nothing, and the change is
    still explained by the trades that made it."""
    a, aapl = story["aapl"].account, story["aapl"].instrument
    trade(a, aapl, "T11", "4", "163", moment=at(8))
    Trade.objects.create(
        broker="ibkr", account=a, instrument=aapl, external_id="T11-Ca",
        trade_date=dt.date(2025, 6, 1), traded_at=at(9), buy_sell="BUY",
        quantity=Decimal("-4"), price=Decimal("163"), currency="USD", cancelled=True,
    )  # fmt: skip

    aapl_change = changes(as_of(client, at(30)))["U1111111 AAPL"]

    assert aapl_change["trades"] == [
        listed("T2", "2025-06-01", "BUY", "3", "160", iso(at(5))),
        listed("T11", "2025-06-01", "BUY", "4", "163", iso(at(8))),
        listed("T11-Ca", "2025-06-01", "BUY", "-4", "163", iso(at(9))),
        listed("T3", "2025-06-01", "BUY", "2", "158.25"),
    ]
    assert aapl_change["explained"] is True  # 3 + 4 - 4 + 2 = 15 - 10


def flex_run(day: dt.date) -> SyncRun:
    """A Flex sync in the evening (20:00 EDT) of `day`: it applies the statement that ends
    the day before (IBKR's last closed day), as of that day's end."""
    end = day - dt.timedelta(days=1)
    return SyncRun.objects.create(
        trigger="schedule", status="success", period_from=end - dt.timedelta(days=3),
        period_to=end, finished_at=dt.datetime.combine(day, dt.time(20), EDT),
    )  # fmt: skip


def test_a_flex_change_is_explained_by_the_trades_up_to_its_statement_s_end(client):
    """A Flex sync's change is what its statement says: the positions at the end of the
    statement's last day. The trades that explain it are those after the previous
    statement's end and up to its own, not those up to when the sync ran: a purchase on
    the day of an evening sync is in the next day's statement."""
    a, sap = account(), instrument(14204, "SAP")
    held = position(a, sap, "22", "150", opened_at=at(0))
    june = [dt.date(2025, 6, day) for day in range(1, 6)]
    change(flex_run(june[1]), held, "created", after=("10", "150"))  # June 1's statement
    change(flex_run(june[2]), held, "updated", before=("10", "150"), after=("15", "150"))
    change(flex_run(june[3]), held, "updated", before=("15", "150"), after=("22", "150"))
    for n, (day, quantity) in enumerate(zip(june[:3], ("10", "5", "7"), strict=True)):
        trade(a, sap, f"S{n}", quantity, "150", moment=dt.datetime.combine(day, dt.time(10), EDT))

    def row(sync_day: dt.date) -> dict:
        moment = dt.datetime.combine(sync_day, dt.time(21), EDT)
        return changes(as_of(client, moment))["U1111111 SAP"]

    assert [(t["external_id"], row(june[1])["explained"]) for t in row(june[1])["trades"]] == [
        ("S0", True)
    ]
    assert [t["external_id"] for t in row(june[2])["trades"]] == ["S1"]
    assert row(june[2])["explained"] is True
    assert [t["external_id"] for t in row(june[3])["trades"]] == ["S2"]
    assert row(june[3])["explained"] is True


def test_the_trades_listed_are_capped_and_the_sum_counts_them_all(client):
    a, aapl = account(), instrument(1, "AAPL")
    held = position(a, aapl, "55", "1", opened_at=at(1))
    change(sync_run(at(100)), held, "created", after=("55", "1"))
    for n in range(55):
        trade(a, aapl, f"B{n:02d}", "1", "1", moment=at(n + 1))

    row = changes(as_of(client, at(101)))["U1111111 AAPL"]

    assert TRADES_PER_CHANGE == 50
    assert [t["external_id"] for t in row["trades"]] == [f"B{n:02d}" for n in range(50)]
    assert (row["trades_truncated"], row["explained"]) == (True, True)
    # One more trade: the 56 no longer add up to 55.
    trade(a, aapl, "B55", "1", "1", moment=at(99))
    assert changes(as_of(client, at(101)))["U1111111 AAPL"]["explained"] is False


def test_no_change_no_story(client):
    a = account()
    kept = position(a, instrument(1, "KEPT"), "7", "10", opened_at=at(-100))
    change(sync_run(at(1)), position(a, instrument(2, "NEW"), "1", "1", at(1)), "created",
           after=("1", "1"))  # fmt: skip
    trade(a, kept.instrument, "K1", "7", "10", moment=at(-101))

    found = changes(as_of(client, at(2)))

    assert found["U1111111 KEPT"] is None  # since is null: no recorded change set it


def test_trades_need_their_view_permission(api_client, django_user_model, story):
    api_client.force_authenticate(user_with(django_user_model, "positions", "view_position"))

    aapl = changes(as_of(api_client, at(30)))["U1111111 AAPL"]

    assert (aapl["kind"], aapl["trades"], aapl["explained"]) == ("updated", None, None)


def test_the_queries_per_page_are_fixed_whatever_the_number_of_rows(
    client, django_assert_max_num_queries
):
    a = account()
    first, second = sync_run(at(1)), sync_run(at(2))

    def add(n: int) -> None:
        for _ in range(n):
            k = Trade.objects.count() + 1
            instr = instrument(10_000 + k, f"P{k}")
            held = position(a, instr, "2", "3", opened_at=at(1))
            change(first, held, "created", after=("1", "3"))
            change(second, held, "updated", before=("1", "3"), after=("2", "3"))
            trade(a, instr, f"X{k}", "1", "3", moment=at(0.5))
            trade(a, instr, f"Y{k}", "1", "3", moment=at(1.5))

    def queries():
        with CaptureQueriesContext(connection) as captured:
            body = as_of(client, at(3), page_size=1000).json()
        return [q["sql"] for q in captured.captured_queries], body["results"]

    add(3)
    queries()  # the user's permissions are cached after the first request
    few, rows = queries()
    assert [r["change"]["explained"] for r in rows] == [True] * 3
    add(60)
    with django_assert_max_num_queries(len(few)):
        many, rows = queries()

    assert len(rows) == 63
    assert all(r["change"]["trades"][0]["external_id"].startswith("Y") for r in rows)
    assert len(many) == len(few)
    assert len([sql for sql in many if 'FROM "portfolio_trade"' in sql]) == 1


def test_a_flex_sync_s_change_is_explained_by_its_statement_s_trade(
    service,  # noqa: F811
    admin_client,
):
    """Through the whole pipeline: the statement's SAP purchase of 20 (10:15 US Eastern
    on 2026-03-13) creates the position, and explains it; once IBKR cancels it, it no
    longer does."""
    flex_connection()
    flex_sync(service)
    now = iso(timezone.now())

    row = admin_client.get(f"/portfolio/positions?as_of={now}").json()["results"][0]

    assert row["instrument"]["symbol"] == "SAP"
    assert row["change"]["trades"] == [
        {
            "external_id": "9000001",
            "trade_date": "2026-03-13",
            "traded_at": "2026-03-13T14:15:00Z",
            "buy_sell": "BUY",
            "quantity": "20",
            "price": "150",
            "currency": "EUR",
        }
    ]
    assert (row["change"]["kind"], row["change"]["explained"]) == ("created", True)

    flex_sync(service, cancelled=True)  # the same position: no change recorded
    row = admin_client.get(f"/portfolio/positions?as_of={iso(timezone.now())}").json()
    assert row["results"][0]["change"]["trades"] == []
    assert row["results"][0]["change"]["explained"] is False


# --- the cash flows of an account's history -------------------------------------------------


def snapshot(acct, taken_at, net_liquidation) -> AccountSnapshot:
    return AccountSnapshot.objects.create(
        account=acct, taken_at=taken_at, currency="USD", net_liquidation=Decimal(net_liquidation)
    )


def cash(acct, external_id, kind, day, amount, currency="USD") -> CashTransaction:
    return CashTransaction.objects.create(
        broker="ibkr", account=acct, external_id=external_id, kind=kind, date=day,
        amount=Decimal(amount), currency=currency,
    )  # fmt: skip


def day_end(day: int) -> dt.datetime:
    """The moment of a Flex day's value: 23:59:59 US Eastern (EST in November)."""
    return dt.datetime(2026, 11, day, 23, 59, 59, tzinfo=dt.timezone(dt.timedelta(hours=-5)))


@pytest.fixture
def ledger_history():
    """U1111111's values at the end of Nov 2, 3 and 5 (Flex days), and a gateway's read
    at 15:00 UTC on Nov 6; a deposit on Nov 3, a dividend and its tax on Nov 4 in USD and
    EUR, a fee on Nov 6 (counts at its day's end: after the gateway's read), a deposit of
    another account on Nov 4."""
    a, b = account("U1111111", base_currency="USD"), account("U2222222")
    points = [
        snapshot(a, day_end(2), "1000"),
        snapshot(a, day_end(3), "6000"),
        snapshot(a, day_end(5), "6120.5"),
        snapshot(a, dt.datetime(2026, 11, 6, 15, tzinfo=dt.UTC), "6121"),
    ]
    cash(a, "C0", "deposit", dt.date(2026, 11, 2), "1000")  # before the second point
    cash(a, "C1", "deposit", dt.date(2026, 11, 3), "5000")
    cash(a, "C2", "dividend", dt.date(2026, 11, 4), "100.25")
    cash(a, "C3", "withholding_tax", dt.date(2026, 11, 4), "-15.0375")
    cash(a, "C4", "dividend", dt.date(2026, 11, 5), "40", "EUR")
    cash(a, "C5", "withholding_tax", dt.date(2026, 11, 5), "-10.55", "EUR")
    cash(a, "C6", "dividend", dt.date(2026, 11, 5), "0.75")
    cash(a, "C7", "fee", dt.date(2026, 11, 6), "-10")
    cash(b, "C8", "deposit", dt.date(2026, 11, 4), "999")
    return points


HISTORY = "/portfolio/accounts/U1111111/history"


def flows(response) -> list:
    assert response.status_code == 200, response.content
    return [point["cash_flows"] for point in response.json()["results"]]


def test_cash_flows_between_points_per_kind_and_currency(client, ledger_history):
    assert flows(client.get(HISTORY)) == [
        None,  # the account's first point: nothing before it
        [{"kind": "deposit", "currency": "USD", "amount": "5000", "count": 1}],
        [
            {"kind": "dividend", "currency": "EUR", "amount": "40", "count": 1},
            {"kind": "dividend", "currency": "USD", "amount": "101", "count": 2},
            {"kind": "withholding_tax", "currency": "EUR", "amount": "-10.55", "count": 1},
            {"kind": "withholding_tax", "currency": "USD", "amount": "-15.0375", "count": 1},
        ],
        [],  # the fee of Nov 6 counts at that day's end, after this read
    ]


def test_the_first_point_of_a_second_page_counts_from_the_last_of_the_first(client, ledger_history):
    first = client.get(f"{HISTORY}?page_size=2").json()
    second = client.get(first["next"])

    assert flows(second)[0] == [
        {"kind": "dividend", "currency": "EUR", "amount": "40", "count": 1},
        {"kind": "dividend", "currency": "USD", "amount": "101", "count": 2},
        {"kind": "withholding_tax", "currency": "EUR", "amount": "-10.55", "count": 1},
        {"kind": "withholding_tax", "currency": "USD", "amount": "-15.0375", "count": 1},
    ]
    # A lower bound is no beginning either: the point before it counts all the same.
    bounded = client.get(f"{HISTORY}?from=2026-11-04T12:00:00Z")  # after Nov 3 ends
    assert flows(bounded)[0] == flows(second)[0]


def test_the_history_s_queries_are_fixed_whatever_the_page(client, django_assert_max_num_queries):
    a = account("U1111111", base_currency="USD")

    def add(days: range) -> None:
        for day in days:
            snapshot(a, day_end(day), "1")
            cash(a, f"D{day}", "dividend", dt.date(2026, 11, day), "1.5")

    def queries():
        with CaptureQueriesContext(connection) as captured:
            body = client.get(f"{HISTORY}?page_size=1000").json()
        return len(captured.captured_queries), body["results"]

    add(range(1, 4))
    queries()
    few, rows = queries()
    add(range(4, 30))
    with django_assert_max_num_queries(few):
        many, rows = queries()

    assert len(rows) == 29
    assert many == few
    assert rows[-1]["cash_flows"] == [
        {"kind": "dividend", "currency": "USD", "amount": "1.5", "count": 1}
    ]


def test_cash_flows_need_their_view_permission(api_client, django_user_model, ledger_history):
    user = user_with(django_user_model, "values", "view_accountsnapshot")
    api_client.force_authenticate(user)

    assert flows(api_client.get(HISTORY)) == [None, None, None, None]


# --- whose ledger -----------------------------------------------------------------------------


def owned(user, acct) -> None:
    row = Connection.objects.create(name=f"{user.username}-login", owner=user)
    AccountReport.objects.create(
        broker="ibkr", external_id=acct.external_id, connection=row, connection_name=row.name,
        source="tws", as_of=at(0), applied_at=at(0),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("who", "accounts"),
    [
        ("alice", {"U1111111"}),
        ("bob", {"U2222222"}),
        ("auditor", {"U1111111", "U2222222"}),
    ],
)
def test_a_user_sees_only_the_trades_and_cash_of_accounts_they_may_see(
    api_client, django_user_model, story, who, accounts
):
    users = {name: user_with(django_user_model, name, *READ) for name in ("alice", "bob")}
    users["auditor"] = user_with(django_user_model, "auditor", *READ, "view_all_connections")
    a, b = story["aapl"].account, story["msft"].account
    owned(users["alice"], a)
    owned(users["bob"], b)
    snapshot(a, day_end(2), "1")
    snapshot(a, day_end(3), "2")
    snapshot(b, day_end(2), "1")
    snapshot(b, day_end(3), "2")
    cash(a, "A1", "deposit", dt.date(2026, 11, 3), "1")
    cash(b, "B1", "deposit", dt.date(2026, 11, 3), "2")
    api_client.force_authenticate(users[who])

    found = changes(as_of(api_client, at(30)))

    assert {key.split()[0] for key in found} == accounts
    traded = {t["external_id"] for row in found.values() for t in row["trades"]}
    expected = {"U1111111": {"T2", "T3", "T9"}, "U2222222": {"T10"}}
    assert traded == set().union(*(expected[acct] for acct in accounts))
    for acct, amount in (("U1111111", "1"), ("U2222222", "2")):
        response = api_client.get(f"/portfolio/accounts/{acct}/history")
        if acct in accounts:
            assert flows(response)[1] == [
                {"kind": "deposit", "currency": "USD", "amount": amount, "count": 1}
            ]
        else:
            assert response.status_code == 404


# --- exact decimals ----------------------------------------------------------------------------

WIDE = "1234567890123456789.0123456789"  # 29 digits: a column holds 30, arithmetic keeps 28


@pytest.fixture
def wide_decimals():
    if connection.vendor == "sqlite":
        pytest.skip("SQLite keeps 15 significant digits of a decimal (a float)")


def test_a_change_is_explained_by_the_exact_sum_of_its_trades(client, wide_decimals):
    """The quantities are added and compared with every digit the columns hold: a change
    one ten-billionth away from its trades' sum is not explained."""
    a, big = account(), instrument(1, "BIG")
    held = position(a, big, WIDE, "1", opened_at=at(1))
    change(sync_run(at(2)), held, "created", after=(WIDE, "1"))
    trade(a, big, "W1", WIDE[:-1] + "8", "1", moment=at(0.5))
    trade(a, big, "W2", "0.0000000002", "1", moment=at(0.75))  # 8 + 2 = 10: one too many

    row = changes(as_of(client, at(3)))["U1111111 BIG"]

    assert [t["quantity"] for t in row["trades"]] == [WIDE[:-1] + "8", "0.0000000002"]
    assert row["explained"] is False


def test_an_update_is_explained_by_the_exact_difference(client, wide_decimals):
    a, big = account(), instrument(1, "BIG")
    held = position(a, big, WIDE, "1", opened_at=at(1))
    change(sync_run(at(2)), held, "created", after=("0.0000000001", "1"))
    change(sync_run(at(4)), held, "updated", before=("0.0000000001", "1"), after=(WIDE, "1"))
    trade(a, big, "W1", WIDE[:-1] + "7", "1", moment=at(3))  # one ten-billionth short

    row = changes(as_of(client, at(5)))["U1111111 BIG"]

    assert (row["kind"], row["quantity_before"], row["explained"]) == (
        "updated",
        "0.0000000001",
        False,
    )
    trade(a, big, "W2", "0.0000000001", "1", moment=at(3.5))
    assert changes(as_of(client, at(5)))["U1111111 BIG"]["explained"] is True


def test_cash_flows_are_the_exact_sum_of_their_amounts(client, wide_decimals):
    a = account("U1111111", base_currency="USD")
    snapshot(a, day_end(2), "1")
    snapshot(a, day_end(3), "2")
    cash(a, "E1", "deposit", dt.date(2026, 11, 3), WIDE)
    cash(a, "E2", "deposit", dt.date(2026, 11, 3), "0.0000000002")

    assert flows(client.get(HISTORY))[1] == [
        {"kind": "deposit", "currency": "USD", "amount": WIDE[:-2] + "91", "count": 2}
    ]


def test_a_change_of_many_trades_is_told_in_bounded_memory(client, monkeypatch):
    """A position whose change 100,000s of trades explain: the page reads them in chunks
    as plain values, keeps the first listed and an exact running sum, and makes a model
    instance for a listed trade only; what it holds does not grow with the ledger."""
    a, aapl = account(), instrument(1, "AAPL")
    many = 20_000
    held = position(a, aapl, str(many), "1", opened_at=at(1))
    change(sync_run(at(100)), held, "created", after=(str(many), "1"))
    # Quantities that add up to `many` exactly, in an order that is not the trades' own:
    # the listed ones are the first by their moment, whatever order the rows come in.
    Trade.objects.bulk_create(
        Trade(
            broker="ibkr", account=a, instrument=aapl, external_id=f"B{n:06d}",
            traded_at=at(1) + dt.timedelta(seconds=(n * 7919) % many),
            trade_date=(at(1) + dt.timedelta(seconds=(n * 7919) % many)).astimezone(EDT).date(),
            buy_sell="BUY", quantity=Decimal("1.000000000001" if n % 2 else "0.999999999999"),
            price=Decimal(1), currency="USD",
        )
        for n in range(many)
    )  # fmt: skip
    as_of(client, at(101))  # once before: what a first request loads is not the page's
    built = []
    from_db = Trade.from_db.__func__
    monkeypatch.setattr(
        Trade, "from_db", classmethod(lambda cls, *args: built.append(1) or from_db(cls, *args))
    )
    tracemalloc.start()
    try:
        with CaptureQueriesContext(connection) as queries:
            row = changes(as_of(client, at(101)))["U1111111 AAPL"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    by_moment = sorted(range(many), key=lambda n: (n * 7919) % many)
    assert [t["external_id"] for t in row["trades"]] == [
        f"B{n:06d}" for n in by_moment[:TRADES_PER_CHANGE]
    ]
    assert (row["trades_truncated"], row["explained"]) == (True, True)
    assert len(built) == TRADES_PER_CHANGE  # an instance per trade listed, none other
    trade_queries = [q for q in queries.captured_queries if "portfolio_trade" in q["sql"]]
    assert len(trade_queries) == 1  # one query, its rows fetched in chunks
    # A chunk of rows and the listed trades: under 2.5 MB here on either database, the
    # same for 5,000 trades as for 20,000. Every trade an instance at once: over 20 MB.
    assert peak < 4 * 2**20, peak
