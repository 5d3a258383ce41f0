"""`GET /portfolio/accounts`, `/portfolio/positions` and `/portfolio/sync/runs[/<id>]`."""

import base64
import datetime as dt
import logging
from decimal import Decimal
from urllib.parse import quote, urlencode

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from ibkr_sync.models import SyncRun
from portfolio.models import Account, Instrument, Position

pytestmark = pytest.mark.django_db

NOW = dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC)


def account(external_id="U1111111", **fields) -> Account:
    return Account.objects.create(broker="ibkr", external_id=external_id, **fields)


def instrument(con_id: int, symbol: str, **fields) -> Instrument:
    fields.setdefault("sec_type", "STK")
    fields.setdefault("currency", "USD")
    return Instrument.objects.create(
        broker="ibkr", external_id=str(con_id), symbol=symbol, **fields
    )


def hold(acct, instr, quantity, average_cost=None, *, closed=False) -> Position:
    quantity = Decimal(quantity)
    average_cost = None if average_cost is None else Decimal(average_cost)
    return Position.objects.create(
        account=acct,
        instrument=instr,
        quantity=quantity,
        average_cost=average_cost,
        cost_basis=None if average_cost is None else quantity * average_cost,
        opened_at=NOW,
        last_synced_at=NOW,
        closed_at=NOW if closed else None,
    )


def reader_with(django_user_model, *codenames: str):
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def reader(django_user_model):
    return reader_with(django_user_model, "view_account", "view_position", "view_syncrun")


@pytest.fixture
def client(api_client, reader) -> APIClient:
    api_client.force_authenticate(reader)
    return api_client


@pytest.fixture
def book():
    """Two accounts; stocks, an option, a future, a closed position, another currency."""
    a, b = account("U1111111"), account("U2222222", is_paper=False)
    aapl = instrument(265598, "AAPL", exchange="NASDAQ")
    tsla = instrument(76792991, "TSLA")
    spy = instrument(
        700001, "SPY", sec_type="OPT", local_symbol="SPY   261218C00600000",
        multiplier=Decimal("100"), strike=Decimal("600"), right="C",
        expiry=dt.date(2026, 12, 18),
    )  # fmt: skip
    es = instrument(495512551, "ES", sec_type="FUT", local_symbol="ESZ6", multiplier=50)
    sap = instrument(14204, "SAP", currency="EUR")
    return {
        "aapl": hold(a, aapl, "10", "150.25"),
        "tsla": hold(a, tsla, "0.12345678", "242.123456"),
        "spy": hold(b, spy, "3", "512.34"),
        "es": hold(a, es, "-2", "251234.5"),
        "sap": hold(b, sap, "7", "120", closed=True),
    }


def assert_error(response, http_status: int, code: str) -> dict:
    assert response.status_code == http_status, response.content
    body = response.json()
    assert set(body) == {"status", "code", "detail"}
    assert (body["status"], body["code"]) == ("error", code)
    assert body["detail"].strip()
    return body


def symbols(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [p["instrument"]["symbol"] for p in response.json()["results"]]


# --- positions -----------------------------------------------------------------------------


def test_positions_are_listed_with_account_instrument_and_exact_decimals(client, book):
    response = client.get("/portfolio/positions")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    assert body["next"] is None
    assert symbols(response) == ["AAPL", "TSLA", "SPY", "ES", "SAP"]  # oldest first
    by_symbol = {p["instrument"]["symbol"]: p for p in body["results"]}
    tsla = by_symbol["TSLA"]
    assert tsla["account"] == "U1111111"
    assert tsla["broker"] == "ibkr"
    # Strings with exactly the stored digits: never floats, no padding zeros.
    assert (tsla["quantity"], tsla["average_cost"]) == ("0.12345678", "242.123456")
    assert tsla["cost_basis"] == str(
        (Decimal("0.12345678") * Decimal("242.123456")).quantize(Decimal("1E-10")).normalize()
    )
    assert (by_symbol["ES"]["quantity"], by_symbol["ES"]["average_cost"]) == ("-2", "251234.5")
    spy = by_symbol["SPY"]["instrument"]
    assert spy == {
        "id": book["spy"].instrument_id, "broker": "ibkr", "external_id": "700001",
        "symbol": "SPY", "sec_type": "OPT", "currency": "USD", "exchange": "",
        "local_symbol": "SPY   261218C00600000", "trading_class": "", "multiplier": "100",
        "expiry": "2026-12-18", "contract_month": "", "strike": "600", "right": "C",
        "description": "",
    }  # fmt: skip
    assert (by_symbol["SAP"]["is_open"], by_symbol["AAPL"]["is_open"]) == (False, True)
    assert by_symbol["SAP"]["closed_at"] is not None


def test_large_decimals_keep_every_digit(client):
    value = "12345678901234.1234567891"  # 24 significant digits
    hold(account(), instrument(1, "BIG", sec_type="CRYPTO"), value, "0.0000000001")

    position = client.get("/portfolio/positions").json()["results"][0]

    assert position["average_cost"] == "0.0000000001"
    assert Decimal(position["quantity"]) == Position.objects.get().quantity


def test_positions_carry_ibkrs_values_exactly_and_null_where_it_reported_none(client, book):
    valued_at = NOW + dt.timedelta(minutes=5)
    Position.objects.filter(pk=book["aapl"].pk).update(
        market_price=Decimal("189.1234567891"),
        market_value=Decimal("1891.234567891"),
        unrealized_pnl=Decimal("-388.7654321"),
        realized_pnl=Decimal("0"),
        valued_at=valued_at,
    )

    by_symbol = {
        p["instrument"]["symbol"]: p for p in client.get("/portfolio/positions").json()["results"]
    }

    values = ("market_price", "market_value", "unrealized_pnl", "realized_pnl", "valued_at")
    assert [by_symbol["AAPL"][name] for name in values] == [
        "189.1234567891", "1891.234567891", "-388.7654321", "0",
        valued_at.isoformat().replace("+00:00", "Z"),
    ]  # fmt: skip
    # Never read from IBKR (or IBKR reported no value): null, never a made-up zero.
    assert [by_symbol["TSLA"][name] for name in values] == [None] * 5


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"account": "U2222222"}, ["SPY", "SAP"]),
        ({"sec_type": "OPT"}, ["SPY"]),
        ({"sec_type": "fut"}, ["ES"]),
        ({"currency": "eur"}, ["SAP"]),
        ({"status": "open"}, ["AAPL", "TSLA", "SPY", "ES"]),
        ({"status": "closed"}, ["SAP"]),
        ({"symbol": "a"}, ["AAPL", "TSLA", "SAP"]),
        ({"symbol": "esz"}, ["ES"]),  # local symbol
        ({"symbol": "261218C"}, ["SPY"]),
        ({"account": "U1111111", "sec_type": "STK", "status": "open"}, ["AAPL", "TSLA"]),
        ({"account": "U9999999"}, []),
        ({"account": ""}, ["AAPL", "TSLA", "SPY", "ES", "SAP"]),  # blank: no filter
    ],
)
def test_position_filters(client, book, query, expected):
    assert symbols(client.get(f"/portfolio/positions?{urlencode(query)}")) == expected


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ({"sec_type": "SHARES"}, ["sec_type", "SHARES", "STK"]),
        ({"currency": "dollars"}, ["currency", "DOLLARS"]),
        ({"status": "gone"}, ["status", "gone"]),
        ({"symbol": "x" * 65}, ["symbol"]),
        ({"sectype": "STK"}, ["Unknown", "sectype", "sec_type"]),
        ({"page_size": "0"}, ["page_size", "1000"]),
        ({"page_size": "ten"}, ["page_size", "ten"]),
        ({"page_size": "1001"}, ["page_size"]),
        ({"cursor": "not-a-cursor"}, ["cursor"]),
    ],
)
def test_bad_query_parameters_are_400_naming_the_parameter(client, book, query, mentions):
    body = assert_error(
        client.get(f"/portfolio/positions?{urlencode(query)}"), 400, "invalid_query"
    )

    for text in mentions:
        assert text in body["detail"]


def test_pages_follow_next_links_without_gaps_or_repeats(client, book):
    seen, url, pages = [], "/portfolio/positions?page_size=2", 0
    while url:
        body = client.get(url).json()
        assert len(body["results"]) <= 2
        seen += [p["id"] for p in body["results"]]
        url, pages = body["next"], pages + 1

    assert pages == 3
    assert seen == sorted(p.pk for p in book.values())


def test_a_page_stays_stable_while_rows_are_added_before_it(client, book):
    first = client.get("/portfolio/positions?page_size=2").json()
    # A sync inserts a new position meanwhile; the next page is unaffected by it.
    hold(Account.objects.get(external_id="U1111111"), instrument(9, "NEW"), "1")

    second = client.get(first["next"]).json()

    assert [p["instrument"]["symbol"] for p in second["results"]] == ["SPY", "ES"]


def test_filters_carry_over_to_the_next_page(client, book):
    body = client.get("/portfolio/positions?account=U1111111&page_size=2").json()

    assert symbols(client.get(body["next"])) == ["ES"]


def test_query_count_does_not_grow_with_the_page(client, book):
    def queries_for_one_page() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/portfolio/positions?page_size=1000").status_code == 200
        return [q["sql"] for q in captured.captured_queries]

    queries_for_one_page()  # the user's permissions are cached after the first request
    few = queries_for_one_page()
    a = Account.objects.get(external_id="U1111111")
    for n in range(20):
        hold(a, instrument(1000 + n, f"S{n}"), "1")
    many = queries_for_one_page()

    assert len(many) == len(few)
    page = [sql for sql in many if "portfolio_position" in sql]
    assert len(page) == 1, page  # account and instrument come in the same query
    assert "portfolio_instrument" in page[0]
    assert "portfolio_account" in page[0]


# --- accounts ------------------------------------------------------------------------------


def test_accounts_with_their_open_position_counts(client, book):
    response = client.get("/portfolio/accounts")

    assert response.status_code == 200
    results = response.json()["results"]
    assert [(a["external_id"], a["open_positions"]) for a in results] == [
        ("U1111111", 3),
        ("U2222222", 1),
    ]
    assert set(results[0]) == {
        "id", "broker", "external_id", "name", "base_currency", "is_paper", "last_synced_at",
        "open_positions",
    }  # fmt: skip


def test_accounts_reject_unknown_parameters(client, book):
    body = assert_error(client.get("/portfolio/accounts?account=U1"), 400, "invalid_query")
    assert "account" in body["detail"]


# --- sync runs -----------------------------------------------------------------------------


@pytest.fixture
def runs(reader):
    ok = SyncRun.objects.create(
        trigger="command", status="success", accounts=["U1111111"], processed=4, created=4,
        finished_at=timezone.now(),
    )  # fmt: skip
    failed = SyncRun.objects.create(
        trigger="api", user=reader, status="failed", error_code="gateway_unavailable",
        error_message="Cannot connect", finished_at=timezone.now(),
        error_details=[], errors=0,
    )  # fmt: skip
    partial = SyncRun.objects.create(
        trigger="admin", status="success", processed=2, errors=1, finished_at=timezone.now(),
        error_details=[{"account": "U1111111", "con_id": 5, "symbol": "ODD",
                        "sec_type": "NOPE", "reason": "unsupported security type 'NOPE'"}],
    )  # fmt: skip
    return ok, failed, partial


def test_sync_runs_newest_first(client, runs):
    ok, failed, partial = runs

    body = client.get("/portfolio/sync/runs").json()

    assert [r["id"] for r in body["results"]] == [partial.pk, failed.pk, ok.pk]
    listed = body["results"][1]
    assert listed["status"] == "failed"
    assert (listed["trigger"], listed["user"]) == ("api", "reader")
    assert (listed["error_code"], listed["error_message"]) == (
        "gateway_unavailable",
        "Cannot connect",
    )
    assert isinstance(listed["duration_seconds"], float)
    assert "error_details" not in listed
    assert body["results"][2]["user"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [("status=failed", [1]), ("trigger=admin", [2]), ("status=success", [2, 0])],
)
def test_sync_run_filters(client, runs, query, expected):
    body = client.get(f"/portfolio/sync/runs?{query}").json()

    assert [r["id"] for r in body["results"]] == [runs[i].pk for i in expected]


def test_sync_run_bad_filter_is_400(client, runs):
    body = assert_error(client.get("/portfolio/sync/runs?status=done"), 400, "invalid_query")
    assert "status" in body["detail"]


def test_one_sync_run_with_its_error_details(client, runs):
    partial = runs[2]

    body = client.get(f"/portfolio/sync/runs/{partial.pk}").json()

    assert body["id"] == partial.pk
    assert body["error_details"] == partial.error_details
    assert "host" in body


def test_a_runs_error_details_are_position_data(api_client, django_user_model, runs):
    """Each entry names an account's record (symbol, contract id, a value): a user who
    may view sync runs but not positions gets the count, not the entries."""
    partial = runs[2]
    Permission.objects.get(codename="view_position").user_set.remove(runs[1].user)
    api_client.force_authenticate(runs[1].user)

    body = api_client.get(f"/portfolio/sync/runs/{partial.pk}").json()

    assert body["errors"] == 1
    assert body["error_details"] is None
    assert "ODD" not in str(body)


def test_unknown_sync_run_is_404_in_the_error_shape(client, runs):
    assert_error(client.get("/portfolio/sync/runs/999999"), 404, "not_found")


# --- authentication and permissions --------------------------------------------------------

READ_URLS = ["/portfolio/accounts", "/portfolio/positions", "/portfolio/sync/runs"]


@pytest.mark.parametrize("url", READ_URLS)
def test_anonymous_is_401(api_client, url):
    response = api_client.get(url)

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize(
    ("url", "perm"),
    [
        ("/portfolio/accounts", "portfolio.view_account"),
        ("/portfolio/positions", "portfolio.view_position"),
        ("/portfolio/sync/runs", "ibkr_sync.view_syncrun"),
    ],
)
def test_without_the_view_permission_is_403_naming_it(api_client, viewer, url, perm):
    api_client.force_authenticate(viewer)

    body = assert_error(api_client.get(url), 403, "permission_denied")

    assert perm in body["detail"]


def test_sync_run_detail_needs_the_permission_too(api_client, viewer, runs):
    api_client.force_authenticate(viewer)
    assert_error(api_client.get(f"/portfolio/sync/runs/{runs[0].pk}"), 403, "permission_denied")


def test_each_permission_opens_only_its_own_endpoint(api_client, django_user_model, book):
    api_client.force_authenticate(reader_with(django_user_model, "view_position"))

    assert api_client.get("/portfolio/positions").status_code == 200
    assert api_client.get("/portfolio/accounts").status_code == 403
    assert api_client.get("/portfolio/sync/runs").status_code == 403


def test_token_authentication(reader, book):
    token = Token.objects.create(user=reader)
    client = APIClient()

    response = client.get("/portfolio/positions", HTTP_AUTHORIZATION=f"Token {token.key}")

    assert response.status_code == 200
    assert len(response.json()["results"]) == 5
    bad = client.get("/portfolio/positions", HTTP_AUTHORIZATION="Token nope")
    assert_error(bad, 401, "authentication_failed")


def test_session_authentication(reader, book):
    client = APIClient()
    client.login(username="reader", password="pw-reader-123")

    assert client.get("/portfolio/positions").status_code == 200


@pytest.mark.parametrize("url", READ_URLS)
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_read_endpoints_are_read_only(client, url, method):
    assert_error(getattr(client, method)(url), 405, "method_not_allowed")


# --- tampered cursors ----------------------------------------------------------------------


def cursor(querystring: str | bytes) -> str:
    """A cursor as DRF encodes one: base64 of a querystring such as `o=0&r=0&p=123`."""
    raw = querystring if isinstance(querystring, bytes) else querystring.encode()
    return base64.b64encode(raw).decode("ascii")


TAMPERED_CURSORS = {
    "p letters": cursor("o=0&r=0&p=abc"),
    "p fraction": cursor("p=1.5"),
    "p nan": cursor("p=nan"),
    "p inf": cursor("p=inf"),
    "p exponent": cursor("p=1e3"),
    "p empty": cursor("o=0&r=0&p="),
    "p nul": cursor("p=1%00"),
    "p raw nul": cursor("p=1\x00"),
    "p sql": cursor("p=" + quote("1; DROP TABLE portfolio_position; --")),
    "p sql quote": cursor("p=" + quote("1' OR '1'='1")),
    "p beyond bigint": cursor(f"p={2**63}"),
    "p 40 digits": cursor("p=" + "9" * 40),
    "p hex": cursor("p=0x10"),
    "o letters": cursor("o=abc&r=0&p=1"),
    "o negative": cursor("o=-1&p=1"),
    "o fraction": cursor("o=1.5"),
    "r letters": cursor("o=0&r=yes&p=1"),
    "r empty": cursor("r=&p=1"),
    "not base64": "!!!not-base64!!!",
    "binary": cursor(b"\xff\xfe\x00p=1"),
    "non-ascii": "p=\u00e9",
}
PAGED_URLS = ["/portfolio/positions", "/portfolio/accounts", "/portfolio/sync/runs"]


@pytest.mark.parametrize("name", list(TAMPERED_CURSORS))
@pytest.mark.parametrize("url", PAGED_URLS)
def test_a_tampered_cursor_is_400_never_a_500(client, book, runs, caplog, url, name):
    response = client.get(url, {"cursor": TAMPERED_CURSORS[name]})

    body = assert_error(response, 400, "invalid_query")
    assert "cursor" in body["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("url", PAGED_URLS)
def test_a_well_formed_cursor_written_by_hand_still_works(client, book, runs, url):
    first = client.get(url, {"page_size": 1}).json()["results"][0]["id"]

    for position in (str(first), f" {first} ", "-5", "0"):
        response = client.get(url, {"cursor": cursor(f"o=0&r=0&p={position}")})
        assert response.status_code == 200, (position, response.content)


# --- unknown paths under /portfolio/ ---------------------------------------------------------

ENDPOINTS = (
    "/portfolio/accounts, /portfolio/accounts/<external_id>/history, /portfolio/cash, "
    "/portfolio/cash-transactions, /portfolio/positions, /portfolio/sync/ibkr, "
    "/portfolio/sync/runs, /portfolio/sync/runs/<id>, /portfolio/trades"
)


@pytest.mark.parametrize(
    ("method", "path", "meant"),
    [
        ("post", "/portfolio/sync/ibkr/", "/portfolio/sync/ibkr"),
        ("get", "/portfolio/positions/", "/portfolio/positions"),
        ("get", "/portfolio/accounts//", "/portfolio/accounts"),
        ("get", "/portfolio/sync/runs/7/", "/portfolio/sync/runs/7"),
        ("delete", "/portfolio/sync/runs/", "/portfolio/sync/runs"),
        ("get", "/healthz/", "/healthz"),
    ],
)
def test_a_trailing_slash_is_a_json_404_naming_the_path_without_it(
    api_client, use_gateway, method, path, meant
):
    response = getattr(api_client, method)(path)

    body = assert_error(response, 404, "not_found")
    assert response["Content-Type"] == "application/json"
    assert f"Did you mean {meant}? The API's paths have no trailing slash." in body["detail"]
    assert ENDPOINTS in body["detail"]
    assert use_gateway.calls == []


@pytest.mark.parametrize(
    ("method", "path", "meant"),
    [
        ("get", "/portfolio/position", "/portfolio/positions"),
        ("post", "/portfolio/sync/ibrk", "/portfolio/sync/ibkr"),
        ("get", "/portfolio/sync/runs/abc", "/portfolio/sync/runs/<id>"),
        ("get", "/portfolio/", None),
        ("post", "/portfolio", None),
        ("put", "/portfolio/nothing/here", None),
        ("options", "/portfolio/x", None),
    ],
)
def test_any_other_unknown_path_under_portfolio_is_a_json_404_listing_the_endpoints(
    client, method, path, meant
):
    response = getattr(client, method)(path)

    body = assert_error(response, 404, "not_found")
    assert f"No API endpoint at {method.upper()} {path}." in body["detail"]
    assert ENDPOINTS in body["detail"]
    if meant:
        assert f"Did you mean {meant}?" in body["detail"]
    else:
        assert "Did you mean" not in body["detail"]


def test_a_known_path_with_an_unknown_row_is_still_the_views_own_404(client):
    body = assert_error(client.get("/portfolio/sync/runs/999999"), 404, "not_found")
    assert "No API endpoint" not in body["detail"]


def test_paths_outside_the_api_keep_djangos_pages(admin_client):
    assert admin_client.get("/admin/nothing/").status_code == 404
    assert admin_client.get("/admin").status_code == 301  # APPEND_SLASH, as before
