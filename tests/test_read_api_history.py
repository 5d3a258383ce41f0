"""`GET /portfolio/accounts/<external_id>/history`: an account's values, sync by sync."""

import base64
import datetime as dt
import logging
from decimal import Decimal
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ibkr_sync.models import SyncRun
from portfolio.models import AccountSnapshot
from tests.test_read_api import account, assert_error, reader_with

pytestmark = pytest.mark.django_db

URL = "/portfolio/accounts/U1111111/history"
DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)


@pytest.fixture
def client(api_client, django_user_model):
    api_client.force_authenticate(reader_with(django_user_model, "view_accountsnapshot"))
    return api_client


def snapshot(acct, taken_at, net_liquidation="1000", sync_run=None, **values) -> AccountSnapshot:
    return AccountSnapshot.objects.create(
        account=acct,
        sync_run_id=None if sync_run is None else sync_run.pk,
        taken_at=taken_at,
        currency=acct.base_currency,
        net_liquidation=None if net_liquidation is None else Decimal(net_liquidation),
        **{name: Decimal(value) for name, value in values.items()},
    )


@pytest.fixture
def history():
    """Snapshots of U1111111 at 08:00 and 16:00 on Nov 19, 20 and 21 (written newest
    first, as a backfill might: the order is by time, not by id), and one of another
    account."""
    a = account("U1111111", base_currency="USD")
    b = account("U2222222", base_currency="EUR")
    rows = {}
    for day in (21, 20, 19):
        for hour in (16, 8):
            at = dt.datetime(2026, 11, day, hour, tzinfo=dt.UTC)
            rows[at] = snapshot(a, at, net_liquidation=f"{day}{hour}.5")
    snapshot(b, DAY, net_liquidation="5")
    return rows


def times(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [r["taken_at"] for r in response.json()["results"]]


def iso(day: int, hour: int) -> str:
    return f"2026-11-{day}T{hour:02d}:00:00Z"


def test_the_history_is_oldest_first_with_exact_decimals(client, history):
    run = SyncRun.objects.create(trigger="command", status="success")
    acct = history[DAY.replace(hour=8)].account
    snapshot(
        acct, dt.datetime(2026, 11, 22, tzinfo=dt.UTC), net_liquidation="-1234.5678901234",
        total_cash_value="0.0067245", gross_position_value="12345678.9", unrealized_pnl="-0.01",
        realized_pnl="0", available_funds="1", buying_power="4", sync_run=run,
    )  # fmt: skip

    response = client.get(URL)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    assert times(response) == [
        iso(19, 8), iso(19, 16), iso(20, 8), iso(20, 16), iso(21, 8), iso(21, 16),
        "2026-11-22T00:00:00Z",
    ]  # fmt: skip
    assert body["results"][0]["net_liquidation"] == "198.5"
    last = body["results"][-1]
    assert last == {
        "id": last["id"],
        "broker": "ibkr",
        "account": "U1111111",
        "taken_at": "2026-11-22T00:00:00Z",
        "currency": "USD",
        "net_liquidation": "-1234.5678901234",
        "total_cash_value": "0.0067245",
        "gross_position_value": "12345678.9",
        "unrealized_pnl": "-0.01",
        "realized_pnl": "0",
        "available_funds": "1",
        "buying_power": "4",
        "sync_run": run.pk,
        "cash_flows": None,  # this reader may not view cash transactions
    }
    assert body["results"][0]["total_cash_value"] is None  # IBKR reported none: null
    assert body["results"][0]["sync_run"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"from": "2026-11-20"}, [(20, 8), (20, 16), (21, 8), (21, 16)]),
        ({"to": "2026-11-20"}, [(19, 8), (19, 16), (20, 8), (20, 16)]),  # the whole day
        ({"from": "2026-11-20", "to": "2026-11-20"}, [(20, 8), (20, 16)]),
        # Date-times are included at both ends.
        ({"from": iso(20, 8), "to": iso(21, 8)}, [(20, 8), (20, 16), (21, 8)]),
        ({"from": "2026-11-20T08:00:00.000001Z"}, [(20, 16), (21, 8), (21, 16)]),
        ({"to": "2026-11-20T15:59:59.999999Z"}, [(19, 8), (19, 16), (20, 8)]),
        ({"from": iso(20, 16), "to": iso(20, 16)}, [(20, 16)]),
        # An offset is that instant: 17:00+01:00 is 16:00 UTC.
        (
            {"from": "2026-11-20T17:00:00+01:00", "to": "2026-11-21T03:00-05:00"},
            [(20, 16), (21, 8)],
        ),
        # Without an offset: the server's time zone (UTC here).
        ({"from": "2026-11-21T08:00:00"}, [(21, 8), (21, 16)]),
        ({"from": "2026-11-21 08:00"}, [(21, 8), (21, 16)]),
        ({"to": "2026-11-19T08:00"}, [(19, 8)]),
        ({"from": "2026-11-22"}, []),
        ({"to": "2026-11-18"}, []),
        ({"from": "", "to": ""}, "all"),  # blank: no bound
        ({"to": "9999-12-31"}, "all"),
        ({"from": "0001-01-01"}, "all"),
    ],
)
def test_from_and_to(client, history, query, expected):
    found = times(client.get(URL, query))

    if expected == "all":
        assert len(found) == 6
    else:
        assert found == [iso(day, hour) for day, hour in expected]


def test_a_plain_date_is_a_day_in_the_servers_time_zone(client, history, settings):
    settings.TIME_ZONE = "America/New_York"  # UTC-5 in November

    def instants(query) -> list[dt.datetime]:
        return [dt.datetime.fromisoformat(t) for t in times(client.get(URL, query))]

    # Nov 20 in New York: 05:00 UTC on Nov 20 up to 05:00 UTC on Nov 21 (excluded).
    assert instants({"from": "2026-11-20", "to": "2026-11-20"}) == [
        DAY.replace(hour=8),
        DAY.replace(hour=16),
    ]
    # A date-time without an offset: New York's 03:00 is 08:00 UTC.
    assert instants({"from": "2026-11-21T03:00"}) == [
        DAY.replace(day=21, hour=8),
        DAY.replace(day=21, hour=16),
    ]
    assert instants({"to": "2026-11-19T02:59"}) == []


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ({"from": "yesterday"}, ["from", "'yesterday'", "ISO 8601"]),
        ({"from": "2026-13-01"}, ["from", "2026-13-01"]),
        ({"to": "2026-02-30"}, ["to", "2026-02-30"]),
        ({"to": "2026-11-20T25:00"}, ["to"]),
        ({"to": "20/11/2026"}, ["to"]),
        ({"from": "1732000000"}, ["from"]),
        ({"from": "2026-11-20T10:00:00 01:00"}, ["from", "%2B"]),  # an unescaped +
        ({"from": "0001-01-01T00:00:00+01:00"}, ["from", "out of range"]),
        ({"to": "9999-12-31T23:00:00-05:00"}, ["to", "out of range"]),
        ({"from": "2026-11-20T10:00\x00"}, ["from"]),
        ({"from": "2" * 65}, ["from"]),
        ({"from": "2026-11-21", "to": "2026-11-20"}, ["from", "after", "to"]),
        ({"from": "2026-11-20T10:00:00Z", "to": "2026-11-20T09:59:59Z"}, ["after"]),
        ({"from": "2026-11-21T00:00:00Z", "to": "2026-11-20"}, ["after"]),
        ({"since": "2026-11-20"}, ["Unknown", "since", "from", "to"]),
        ({"page": "99999999999999999999"}, ["Unknown", "page"]),
        ({"page_size": "1001"}, ["page_size"]),
        ({"page_size": "99999999999999999999"}, ["page_size"]),
    ],
)
def test_bad_bounds_are_400_naming_the_parameter(client, history, query, mentions):
    body = assert_error(client.get(URL, query), 400, "invalid_query")

    for text in mentions:
        assert text in body["detail"], body["detail"]


def test_from_equal_to_to_is_that_one_instant(client, history):
    assert times(client.get(URL, {"from": iso(19, 8), "to": iso(19, 8)})) == [iso(19, 8)]


@pytest.mark.parametrize(
    "external_id", ["U9999999", "u1111111", "U1111111 ", "x" * 40, "U1%00", "%F0%9F%92%A5"]
)
def test_an_unknown_account_is_404_in_the_error_shape(client, history, external_id):
    body = assert_error(client.get(f"/portfolio/accounts/{external_id}/history"), 404, "not_found")

    assert "No account" in body["detail"]
    assert "No API endpoint" not in body["detail"]


def test_an_account_without_snapshots_has_an_empty_history(client, history):
    account("U3333333")

    assert times(client.get("/portfolio/accounts/U3333333/history")) == []


def test_pages_follow_next_links_in_time_order_without_gaps_or_repeats(client, history):
    seen, url, pages = [], f"{URL}?page_size=4", 0
    while url:
        body = client.get(url).json()
        seen += [r["taken_at"] for r in body["results"]]
        url, pages = body["next"], pages + 1

    assert pages == 2
    assert seen == [iso(d, h) for d in (19, 20, 21) for h in (8, 16)]


def test_snapshots_sharing_a_time_page_in_id_order(client):
    acct = account("U1111111")
    same = [snapshot(acct, DAY, net_liquidation=str(n)) for n in range(5)]
    seen, url = [], f"{URL}?page_size=2"
    while url:
        body = client.get(url).json()
        seen += [r["id"] for r in body["results"]]
        url = body["next"]

    assert seen == [s.pk for s in same]


def test_bounds_carry_over_to_the_next_page(client, history):
    body = client.get(URL, {"from": "2026-11-20", "page_size": 3}).json()

    assert [r["taken_at"] for r in body["results"]] == [iso(20, 8), iso(20, 16), iso(21, 8)]
    assert times(client.get(body["next"])) == [iso(21, 16)]


def cursor(position: str) -> str:
    """A cursor as DRF writes one (offset 0, forwards), at `position`."""
    querystring = urlencode({"o": 0, "r": 0, "p": position})
    return base64.b64encode(querystring.encode()).decode("ascii")


@pytest.mark.parametrize(
    "position",
    [
        "abc",
        "1",
        "2026-11-20 08:00:00",  # naive: not what a page writes
        "0001-01-01 00:00:00+05:00",  # before year 1 in UTC
        "9999-12-31 23:59:59-05:00",  # after 9999 in UTC
        "2026-11-20 08:00:00+00:00'; DROP TABLE portfolio_accountsnapshot; --",
        "2026-02-30 08:00:00+00:00",
    ],
)
def test_a_tampered_history_cursor_is_400_never_a_500(client, history, caplog, position):
    response = client.get(URL, {"cursor": cursor(position)})

    body = assert_error(response, 400, "invalid_query")
    assert "cursor" in body["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_cursor_position_with_another_offset_is_the_same_instant(client, history):
    # 09:00+01:00 is 08:00 UTC: the rows after it are the same as after 08:00 UTC.
    response = client.get(URL, {"cursor": cursor("2026-11-20 09:00:00+01:00")})

    assert times(response) == [iso(20, 16), iso(21, 8), iso(21, 16)]


def test_the_query_count_does_not_grow_with_the_page(client, history):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(f"{URL}?page_size=1000").status_code == 200
        return len(captured)

    queries()
    few = queries()
    acct = history[DAY.replace(hour=8)].account
    for n in range(100):
        snapshot(acct, DAY + dt.timedelta(minutes=n + 1))

    assert queries() == few


def test_the_history_needs_its_own_view_permission(api_client, django_user_model, history):
    api_client.force_authenticate(reader_with(django_user_model, "view_account"))

    # Also for an account that does not exist: a caller without the permission learns
    # nothing about which accounts do.
    for url in (URL, "/portfolio/accounts/U9999999/history"):
        body = assert_error(api_client.get(url), 403, "permission_denied")
        assert "portfolio.view_accountsnapshot" in body["detail"]


def test_the_history_anonymous_is_401(api_client, history):
    response = api_client.get(URL)

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_history_is_read_only(client, history, method):
    assert_error(getattr(client, method)(URL), 405, "method_not_allowed")


def test_a_trailing_slash_names_the_path_without_it(client, history):
    body = assert_error(client.get(f"{URL}/"), 404, "not_found")

    assert f"Did you mean {URL}?" in body["detail"]
    assert "/portfolio/accounts/<external_id>/history" in body["detail"]


def test_previous_links_lead_back_through_the_same_pages(client, history):
    first = client.get(URL, {"page_size": 2}).json()
    second = client.get(first["next"]).json()
    third = client.get(second["next"]).json()

    assert times(client.get(third["previous"])) == [r["taken_at"] for r in second["results"]]
    assert times(client.get(second["previous"])) == [r["taken_at"] for r in first["results"]]


@pytest.mark.parametrize("offset", ["99999999999999999999", str(2**63), "1000000"])
def test_a_huge_cursor_offset_is_never_a_500(client, history, offset):
    querystring = urlencode({"o": offset, "r": 0, "p": "2026-11-19 08:00:00+00:00"})
    response = client.get(URL, {"cursor": base64.b64encode(querystring.encode()).decode()})

    # DRF caps a cursor's offset (at 1000): past the rows there are, an empty page.
    assert response.status_code == 200, response.content
    assert response.json()["results"] == []
