"""`GET /portfolio/positions?as_of=`: the positions held at a past moment, rebuilt from
the change log (a change takes effect when its sync finished)."""

import datetime as dt
from decimal import Decimal
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ibkr_sync.models import PositionChange, SyncRun
from portfolio.models import Position
from tests.test_read_api import account, assert_error, instrument, reader_with

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2025, 6, 1, 12, tzinfo=dt.UTC)


def at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
def client(api_client, django_user_model):
    api_client.force_authenticate(reader_with(django_user_model, "view_position"))
    return api_client


def sync_run(finished_at: dt.datetime | None, status: str = "success") -> SyncRun:
    return SyncRun.objects.create(trigger="command", status=status, finished_at=finished_at)


def change(run, position, kind, before=(None, None), after=(None, None)) -> PositionChange:
    def number(value):
        return None if value is None else Decimal(value)

    return PositionChange.objects.create(
        sync_run=run,
        position=position,
        kind=kind,
        quantity_before=number(before[0]),
        average_cost_before=number(before[1]),
        quantity_after=number(after[0]),
        average_cost_after=number(after[1]),
    )


def position(acct, instr, quantity, average_cost, opened_at, closed_at=None) -> Position:
    quantity, average_cost = Decimal(quantity), Decimal(average_cost)
    return Position.objects.create(
        account=acct,
        instrument=instr,
        quantity=quantity,
        average_cost=average_cost,
        cost_basis=quantity * average_cost,
        opened_at=opened_at,
        last_synced_at=closed_at or opened_at,
        closed_at=closed_at,
    )


@pytest.fixture
def timeline():
    """AAPL in U1111111: created at 1h (10 @ 150), updated at 2h (15 @ 155.5), closed at
    3h, reopened at 4h (5 @ 160). TSLA in U2222222: created at 2h (0.12345678 @
    242.123456, in EUR). The rows are as the last sync left them."""
    a, b = account("U1111111"), account("U2222222")
    runs = {h: sync_run(at(h)) for h in (1, 2, 3, 4)}
    aapl = position(a, instrument(265598, "AAPL"), "5", "160", opened_at=at(4) - _lag)
    tsla = position(
        b, instrument(76792991, "TSLA", currency="EUR"), "0.12345678", "242.123456",
        opened_at=at(2) - _lag,
    )  # fmt: skip
    change(runs[1], aapl, "created", after=("10", "150"))
    change(runs[2], aapl, "updated", before=("10", "150"), after=("15", "155.5"))
    change(runs[2], tsla, "created", after=("0.12345678", "242.123456"))
    change(runs[3], aapl, "closed", before=("15", "155.5"))
    change(runs[4], aapl, "reopened", after=("5", "160"))
    return {"aapl": aapl, "tsla": tsla, "runs": runs}


# A sync stamps the rows it writes while it runs, a moment before it finishes.
_lag = dt.timedelta(seconds=2)


def held(response) -> dict[str, tuple]:
    assert response.status_code == 200, response.content
    return {
        p["instrument"]["symbol"]: (p["quantity"], p["average_cost"], p["cost_basis"])
        for p in response.json()["results"]
    }


def as_of(client, moment, **query):
    text = moment if isinstance(moment, str) else iso(moment)
    return client.get(f"/portfolio/positions?{urlencode({'as_of': text, **query})}")


def test_the_answer_says_it_is_a_reconstruction(client, timeline):
    response = as_of(client, at(2.5))

    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["as_of", "complete", "next", "previous", "results"]
    assert (body["as_of"], body["complete"]) == ("2025-06-01T14:30:00Z", True)
    aapl = body["results"][0]
    # What the change log records, and only that: no market values, no open/closed
    # state (every row listed was held), no sync times of today's rows.
    assert set(aapl) == {
        "id", "broker", "account", "instrument", "quantity", "average_cost", "cost_basis",
        "since", "change",
    }  # fmt: skip
    assert (aapl["id"], aapl["broker"], aapl["account"]) == (
        timeline["aapl"].pk,
        "ibkr",
        "U1111111",
    )
    assert aapl["instrument"]["symbol"] == "AAPL"
    assert (aapl["quantity"], aapl["average_cost"], aapl["cost_basis"]) == ("15", "155.5", "2332.5")
    assert aapl["since"] == iso(at(2))
    # The change that set it; its trades are the ledger's, which this reader may not view.
    assert aapl["change"] == {
        "kind": "updated", "quantity_before": "10", "quantity_after": "15", "at": iso(at(2)),
        "trades": None, "trades_truncated": False, "explained": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        (0, {}),  # before anything was created
        (1 - 1 / 3600, {}),  # a second before the first sync finished
        (1, {"AAPL": ("10", "150", "1500")}),  # the moment it finished: in effect
        (1.5, {"AAPL": ("10", "150", "1500")}),
        (
            2,
            {
                "AAPL": ("15", "155.5", "2332.5"),
                "TSLA": ("0.12345678", "242.123456", "29.8917822402"),
            },
        ),
        (3, {"TSLA": ("0.12345678", "242.123456", "29.8917822402")}),  # AAPL closed
        (3.9, {"TSLA": ("0.12345678", "242.123456", "29.8917822402")}),
        (4, {"AAPL": ("5", "160", "800"), "TSLA": ("0.12345678", "242.123456", "29.8917822402")}),
        (500, {"AAPL": ("5", "160", "800"), "TSLA": ("0.12345678", "242.123456", "29.8917822402")}),
    ],
)
def test_created_updated_closed_reopened(client, timeline, hours, expected):
    response = as_of(client, at(hours))

    assert held(response) == expected
    assert response.json()["complete"] is True


def test_the_cost_basis_is_quantity_times_average_cost_as_a_sync_stores_it(client, timeline):
    tsla = held(as_of(client, at(2)))["TSLA"]

    exact = Decimal("0.12345678") * Decimal("242.123456")  # 29.89178224024368
    assert tsla[2] == "29.8917822402" == str(exact.quantize(Decimal("1E-10")))


def test_as_of_now_agrees_with_the_open_positions(client, timeline):
    now = client.get("/portfolio/positions?status=open").json()["results"]
    then = as_of(client, timezone.now()).json()["results"]

    keys = ("id", "quantity", "average_cost", "cost_basis")
    assert [[p[k] for k in keys] for p in then] == [[p[k] for k in keys] for p in now]


def test_syncs_finishing_at_the_same_time_count_in_their_order(client):
    a = account()
    aapl = position(a, instrument(1, "AAPL"), "7", "1", opened_at=at(1))
    change(sync_run(at(1)), aapl, "created", after=("5", "1"))
    same = at(2)  # two syncs stamped with the same time, to the microsecond
    first, second = sync_run(same), sync_run(same)
    change(second, aapl, "updated", before=("6", "1"), after=("7", "1"))
    change(first, aapl, "updated", before=("5", "1"), after=("6", "1"))  # written later

    assert held(as_of(client, same)) == {"AAPL": ("7", "1", "7")}
    assert held(as_of(client, same - dt.timedelta(microseconds=1))) == {"AAPL": ("5", "1", "5")}


def test_a_close_and_a_reopen_in_syncs_of_the_same_second(client):
    a = account()
    aapl = position(a, instrument(1, "AAPL"), "3", "2", opened_at=at(1))
    change(sync_run(at(1)), aapl, "created", after=("1", "2"))
    close, reopen = sync_run(at(2)), sync_run(at(2) + dt.timedelta(microseconds=1))
    change(close, aapl, "closed", before=("1", "2"))
    change(reopen, aapl, "reopened", after=("3", "2"))

    assert held(as_of(client, at(2))) == {}
    assert held(as_of(client, at(2) + dt.timedelta(microseconds=1))) == {"AAPL": ("3", "2", "6")}


def test_only_changes_of_finished_successful_syncs_count(client):
    a = account()
    aapl = position(a, instrument(1, "AAPL"), "1", "1", opened_at=at(1))
    change(sync_run(at(1)), aapl, "created", after=("1", "1"))
    # Such rows cannot come from a sync (its writes roll back with it), but if a host
    # wrote them, they would not be what the database held.
    change(sync_run(at(2), status="failed"), aapl, "closed", before=("1", "1"))
    change(sync_run(None, status="running"), aapl, "updated", before=("1", "1"), after=("9", "1"))

    assert held(as_of(client, at(3))) == {"AAPL": ("1", "1", "1")}


def test_a_null_average_cost_gives_a_null_cost_basis(client):
    a = account()
    odd = Position.objects.create(
        account=a, instrument=instrument(1, "ODD"), quantity=Decimal("2"), average_cost=None,
        opened_at=at(1), last_synced_at=at(1),
    )  # fmt: skip
    change(sync_run(at(1)), odd, "created", after=("2", None))

    assert held(as_of(client, at(1))) == {"ODD": ("2", None, None)}


# --- positions older than the change log -----------------------------------------------------


@pytest.fixture
def older_than_the_log():
    """The log begins at 1h (the first sync that recorded a change: NEW created). Five
    positions are older than it: KEPT (never changed, 7 @ 10), UPD (3 @ 1 until updated
    to 4 @ 1 at 2h), GONE (8 @ 2 until closed at 2h), SOLD (closed before the log, never
    changed since), LATE (written at 2.5h without a change, as a host's import would)."""
    a = account("U1111111")
    before = at(-100)
    rows = {
        "kept": position(a, instrument(1, "KEPT"), "7", "10", opened_at=before),
        "upd": position(a, instrument(2, "UPD"), "4", "1", opened_at=before),
        "gone": position(a, instrument(3, "GONE"), "8", "2", opened_at=before, closed_at=at(2)),
        "sold": position(a, instrument(4, "SOLD"), "9", "1", opened_at=before, closed_at=at(-50)),
        "late": position(a, instrument(5, "LATE"), "6", "1", opened_at=at(2.5)),
        "new": position(account("U2222222"), instrument(6, "NEW"), "1", "1", opened_at=at(1)),
    }
    change(sync_run(at(1)), rows["new"], "created", after=("1", "1"))
    second = sync_run(at(2))
    change(second, rows["upd"], "updated", before=("3", "1"), after=("4", "1"))
    change(second, rows["gone"], "closed", before=("8", "2"))
    return rows


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        # From the moment the log begins, every change is in it: what a position older
        # than the log held is what its next change found, or, never changed, what it
        # holds now.
        (1, {"KEPT": ("7", "10", "70"), "UPD": ("3", "1", "3"), "GONE": ("8", "2", "16"),
             "NEW": ("1", "1", "1")}),
        (2, {"KEPT": ("7", "10", "70"), "UPD": ("4", "1", "4"), "NEW": ("1", "1", "1")}),
        (3, {"KEPT": ("7", "10", "70"), "UPD": ("4", "1", "4"), "LATE": ("6", "1", "6"),
             "NEW": ("1", "1", "1")}),
    ],
)  # fmt: skip
def test_positions_older_than_the_log_once_it_has_begun(
    client, older_than_the_log, hours, expected
):
    response = as_of(client, at(hours))

    assert held(response) == expected
    assert response.json()["complete"] is True
    since = {p["instrument"]["symbol"]: p["since"] for p in response.json()["results"]}
    assert since["KEPT"] is None  # the log does not say since when
    assert since["NEW"] == iso(at(1))


def test_before_the_log_begins_the_answer_is_incomplete_not_a_guess(client, older_than_the_log):
    response = as_of(client, at(0.5))

    body = response.json()
    assert (body["results"], body["complete"]) == ([], False)
    # An account whose positions all began in the log: its (empty) answer is complete.
    only_new = as_of(client, at(0.5), account="U2222222").json()
    assert (only_new["results"], only_new["complete"]) == ([], True)


def test_positions_but_no_change_log_at_all(client):
    position(account(), instrument(1, "KEPT"), "7", "10", opened_at=at(-100))

    body = as_of(client, at(1)).json()

    assert (body["results"], body["complete"]) == ([], False)


def test_no_positions_and_no_log_is_a_complete_empty_answer(client):
    body = as_of(client, at(1)).json()

    assert (body["results"], body["complete"]) == ([], True)


# --- filters, pages, queries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"account": "U1111111"}, ["AAPL"]),
        ({"account": "U9999999"}, []),
        ({"currency": "eur"}, ["TSLA"]),
        ({"sec_type": "STK"}, ["AAPL", "TSLA"]),
        ({"sec_type": "OPT"}, []),
        ({"symbol": "tsl"}, ["TSLA"]),
        ({"symbol": "a", "account": "U2222222"}, ["TSLA"]),
    ],
)
def test_filters_work_with_as_of(client, timeline, query, expected):
    assert list(held(as_of(client, at(2), **query))) == expected


def test_pages_of_an_as_of_answer_follow_next_with_as_of_kept(client):
    a = account()
    run = sync_run(at(1))
    for n in range(7):
        p = position(a, instrument(n + 1, f"S{n}"), "1", "1", opened_at=at(1))
        change(run, p, "created", after=(str(n + 1), "1"))
        if n % 2:  # every other one closed at 2h
            change(sync_run(at(2)), p, "closed", before=(str(n + 1), "1"))
    seen, url, pages = [], f"/portfolio/positions?as_of={iso(at(3))}&page_size=2", 0
    while url:
        body = client.get(url).json()
        assert body["as_of"] == iso(at(3))
        seen += [r["quantity"] for r in body["results"]]
        url, pages = body["next"], pages + 1

    assert seen == ["1", "3", "5", "7"]
    assert pages == 2


def test_the_queries_are_a_fixed_number_whatever_the_number_of_positions(
    client, django_assert_max_num_queries
):
    a = account()
    runs = [sync_run(at(h)) for h in (1, 2, 3)]

    def add(n: int) -> None:
        for i in range(n):
            p = position(a, instrument(10_000 + Position.objects.count(), f"P{i}"), "2", "3", at(1))
            change(runs[0], p, "created", after=("1", "3"))
            change(runs[1], p, "updated", before=("1", "3"), after=("2", "3"))
            if i % 3 == 0:
                change(runs[2], p, "closed", before=("2", "3"))

    def queries() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            response = as_of(client, at(2.5), page_size=1000)
            assert response.status_code == 200
        return [q["sql"] for q in captured.captured_queries], len(response.json()["results"])

    add(5)
    queries()  # the user's permissions are cached after the first request
    few, listed = queries()
    assert listed == 5
    add(195)
    with django_assert_max_num_queries(len(few)):
        many, listed = queries()

    assert listed == 200
    assert len(many) == len(few)
    pages = [sql for sql in many if 'FROM "portfolio_position"' in sql]
    assert len(pages) == 1, pages  # the changes are subqueries of the page's one query


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        ("yesterday", ["as_of", "'yesterday'", "ISO 8601", "date-time"]),
        ("2025-06-01", ["as_of", "is a date", "date-time"]),  # which moment of the day?
        ("2025-13-01T00:00:00Z", ["as_of", "2025-13-01"]),
        ("2025-06-01T24:00:00Z", ["as_of"]),
        ("2025-06-01T12:00:00 02:00", ["as_of", "%2B"]),  # an unescaped +
        ("1748779200", ["as_of"]),
        ("0001-01-01T00:00:00+01:00", ["as_of", "out of range"]),
        ("2025-06-01T12:00\x00", ["as_of"]),
        ("2" * 65, ["as_of"]),
    ],
)
def test_a_malformed_as_of_is_400_saying_what_is_expected(client, timeline, value, mentions):
    body = assert_error(as_of(client, value), 400, "invalid_query")

    for text in mentions:
        assert text in body["detail"], body["detail"]


def test_a_future_as_of_is_400(client, timeline):
    future = timezone.now() + dt.timedelta(minutes=5)

    body = assert_error(as_of(client, future), 400, "invalid_query")

    assert "as_of" in body["detail"] and "future" in body["detail"]


def test_as_of_with_status_is_400(client, timeline):
    body = assert_error(as_of(client, at(2), status="open"), 400, "invalid_query")

    assert "status" in body["detail"] and "as_of" in body["detail"]


def test_a_blank_as_of_is_no_as_of(client, timeline):
    body = client.get("/portfolio/positions?as_of=").json()

    assert "as_of" not in body
    assert "market_value" in body["results"][0]


def test_an_as_of_without_an_offset_is_read_in_the_servers_time_zone(client, timeline, settings):
    settings.TIME_ZONE = "Europe/Berlin"  # UTC+2 in June

    # 15:30 in Berlin is 13:30 UTC: after the 13:00 sync, before the 14:00 one.
    response = as_of(client, "2025-06-01T15:30:00")

    assert held(response)["AAPL"] == ("10", "150", "1500")
    assert dt.datetime.fromisoformat(response.json()["as_of"]) == at(1.5)
    # With an offset, the offset says it: 15:30+01:00 is 14:30 UTC.
    assert held(as_of(client, "2025-06-01T15:30:00+01:00"))["AAPL"] == ("15", "155.5", "2332.5")


def test_as_of_needs_the_position_view_permission(api_client, django_user_model, timeline):
    api_client.force_authenticate(reader_with(django_user_model, "view_account"))

    body = assert_error(as_of(api_client, at(2)), 403, "permission_denied")

    assert "portfolio.view_position" in body["detail"]


def test_as_of_anonymous_is_401(api_client, timeline):
    assert_error(as_of(api_client, at(2)), 401, "not_authenticated")


def test_every_kind_of_change_is_read():
    """A kind the sync might record one day must be placed here, not ignored."""
    from ibkr_sync.api.holdings import HELD_AFTER, HELD_BEFORE

    assert set(PositionChange.Kind.values) == {*HELD_AFTER, *HELD_BEFORE}
    assert set(HELD_AFTER) - set(HELD_BEFORE) == {"created", "reopened"}
