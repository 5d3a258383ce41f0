"""`GET /portfolio/trades` and `/portfolio/cash-transactions`: the ledger a Flex connection
stored, read back through the API (loaded through the real path: `tests.ledger`)."""

from __future__ import annotations

import datetime as dt
import logging
import re
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ibkr_sync import conf
from tests.flex.test_flex_connection import service  # noqa: F401
from tests.ledger import OUR_ACCOUNT, REAL_ACCOUNT, load_ledger
from tests.test_read_api import TAMPERED_CURSORS, assert_error, cursor, reader_with

pytestmark = pytest.mark.django_db

TRADES = "/portfolio/trades"
CASH = "/portfolio/cash-transactions"


@pytest.fixture
def ledger(service):  # noqa: F811
    load_ledger(service)


@pytest.fixture
def client(api_client, django_user_model):
    api_client.force_authenticate(
        reader_with(django_user_model, "view_trade", "view_cashtransaction", "view_position")
    )
    return api_client


def results(response) -> list[dict]:
    assert response.status_code == 200, response.content
    return response.json()["results"]


def every(client, url: str, **query) -> list[dict]:
    """Every row of a list, page after page, following `next` as a client does."""
    rows, page = [], client.get(url, {**query, "page_size": 1000})
    while True:
        rows += results(page)
        if page.json()["next"] is None:
            return rows
        page = client.get(page.json()["next"])


# --- what a row says -------------------------------------------------------------------------


def test_a_trade_with_its_instrument_and_exact_decimals(client, ledger):
    [trade] = results(client.get(TRADES, {"account": OUR_ACCOUNT}))

    stored = conf.trade_model().objects.get(external_id="9000001")
    assert {k: v for k, v in trade.items() if k != "instrument"} == {
        "id": stored.pk, "broker": "ibkr", "account": OUR_ACCOUNT, "external_id": "9000001",
        "trade_date": "2026-03-13", "traded_at": trade["traded_at"], "settle_date": "2026-03-13",
        "buy_sell": "BUY", "quantity": "20", "price": "150", "proceeds": "-3000",
        "commission": "-1.25", "commission_currency": "EUR", "currency": "EUR",
        "realized_pnl": "0", "fx_rate_to_base": "1", "cancelled": False,
    }  # fmt: skip
    assert trade["traded_at"] is not None
    # The instrument exactly as the positions endpoint nests it.
    [held] = results(client.get("/portfolio/positions", {"account": OUR_ACCOUNT}))
    assert held["instrument"]["symbol"] == "SAP"
    assert trade["instrument"] == held["instrument"]


def test_a_sale_is_negative_and_rates_keep_every_digit(client, ledger):
    voxr = results(client.get(TRADES, {"symbol": "voxr"}))

    assert {t["buy_sell"] for t in voxr} == {"SELL"}
    assert [t["quantity"] for t in voxr] == ["-200", "-100", "-100", "-100", "-100", "-400"]
    assert voxr[0]["price"] == "2.75" and voxr[0]["fx_rate_to_base"] == "0.87666"
    assert all(isinstance(t["commission"], str) for t in voxr)


def test_a_cash_transaction_with_its_kind_and_signed_amount(client, ledger):
    rows = results(client.get(CASH, {"account": OUR_ACCOUNT}))

    assert [(r["external_id"], r["kind"], r["amount"]) for r in rows] == [
        ("9000010", "dividend", "44"),
        ("9000011", "withholding_tax", "-15.05"),
    ]
    tax = rows[1]
    assert (tax["date"], tax["currency"], tax["fx_rate_to_base"]) == ("2026-03-13", "EUR", "1")
    assert tax["description"] == "SAP(DE0007164600) CASH DIVIDEND EUR 2.20 PER SHARE - DE TAX"
    assert tax["dividend_external_id"] == "9000010" and tax["type"] == "Withholding Tax"
    assert tax["instrument"]["symbol"] == "SAP" and tax["instrument"]["sec_type"] == "STK"


def test_a_cash_transaction_without_a_contract_has_a_null_instrument(client, ledger):
    model = conf.cash_transaction_model()
    row = model.objects.get(external_id="9000010")
    model.objects.filter(pk=row.pk).update(instrument=None)

    [dividend] = results(client.get(CASH, {"account": OUR_ACCOUNT, "kind": "dividend"}))

    assert dividend["instrument"] is None


def test_rows_are_oldest_first_then_in_the_order_stored(client, ledger):
    for url, field in ((TRADES, "trade_date"), (CASH, "date")):
        rows = every(client, url)
        keys = [(r[field], r["id"]) for r in rows]
        assert keys == sorted(keys), url
        assert len(rows) == {TRADES: 40, CASH: 54}[url]


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"account": OUR_ACCOUNT}, 1),
        ({"account": REAL_ACCOUNT}, 39),
        ({"account": " U7654321 "}, 1),
        ({"account": "U9999999"}, 0),
        ({"account": ""}, 40),  # blank: no filter
        ({"from": "2025-10-17", "to": "2025-10-17"}, 4),  # both included
        ({"from": "2025-12-19"}, 8),
        ({"to": "2025-01-10"}, 2),
        ({"currency": "chf"}, 4),
        ({"currency": "EUR", "account": REAL_ACCOUNT}, 0),
        ({"symbol": "SHIR"}, 3),
        ({"symbol": "tlt"}, 4),  # part of an option's symbol
        ({"symbol": "VOXR", "from": "2025-04-01", "to": "2025-04-30"}, 3),
    ],
)
def test_trade_filters(client, ledger, query, expected):
    rows = results(client.get(f"{TRADES}?{urlencode(query)}"))

    assert len(rows) == expected
    if "from" in query or "to" in query:
        days = {r["trade_date"] for r in rows}
        assert all(query.get("from", "0") <= day <= query.get("to", "9") for day in days)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"kind": "fee"}, 4),
        ({"kind": "dividend", "account": OUR_ACCOUNT}, 1),
        ({"kind": "withholding_tax", "currency": "CHF"}, 1),
        ({"kind": "payment_in_lieu"}, 0),
        ({"kind": "deposit"}, 0),
        ({"currency": "eur"}, 2),
        ({"from": "2025-04-22", "to": "2025-04-22"}, 7),
        ({"kind": ""}, 54),  # blank: no filter, as the other endpoints' parameters
        ({"symbol": "nlcp", "to": "2024-12-31"}, 12),
    ],
)
def test_cash_transaction_filters(client, ledger, query, expected):
    rows = results(client.get(f"{CASH}?{urlencode(query)}"))

    assert len(rows) == expected
    if query.get("kind"):
        assert {r["kind"] for r in rows} <= {query["kind"]}


@pytest.mark.parametrize(
    ("url", "query", "mentions"),
    [
        (TRADES, {"from": "2025-13-01"}, ["from", "2025-13-01", "YYYY-MM-DD"]),
        (TRADES, {"to": "20250101"}, ["to", "20250101"]),
        (TRADES, {"from": "yesterday"}, ["from"]),
        (TRADES, {"to": "2025-01-01T10:00:00"}, ["to"]),
        (TRADES, {"from": "2025-02-30"}, ["from"]),
        (TRADES, {"from": "+2025-01-01"}, ["from"]),
        (TRADES, {"from": "2025-03-01", "to": "2025-02-01"}, ["after"]),
        (TRADES, {"currency": "dollars"}, ["currency"]),
        (TRADES, {"account": "U" * 33}, ["account"]),
        (TRADES, {"symbol": "A\x00"}, ["symbol"]),
        (TRADES, {"kind": "dividend"}, ["Unknown", "kind"]),  # trades have no kind
        (TRADES, {"date": "2025-01-01"}, ["Unknown", "date"]),
        (CASH, {"kind": "bonus"}, ["kind", "bonus", "withholding_tax"]),
        (CASH, {"kind": "Dividend"}, ["kind"]),
        (CASH, {"from": "2025/01/01"}, ["from"]),
        (CASH, {"page_size": "0"}, ["page_size"]),
        (CASH, {"page_size": "1001"}, ["page_size"]),
    ],
)
def test_bad_parameters_are_400_naming_them(client, ledger, url, query, mentions):
    body = assert_error(client.get(url, query), 400, "invalid_query")

    for text in mentions:
        assert text in body["detail"], body["detail"]


def test_repeated_parameters_take_the_last_as_the_other_endpoints(client, ledger):
    rows = results(client.get(f"{CASH}?kind=bonus&kind=fee"))

    assert {r["kind"] for r in rows} == {"fee"}


# --- pages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "total"), [(TRADES, 40), (CASH, 54)])
def test_pages_follow_next_and_previous_without_gaps_or_repeats(client, ledger, url, total):
    """Small pages cut through days with several rows (five trades on 2025-12-19): each
    row once, in order, and `previous` leads back through the same pages."""
    pages, response = [], client.get(url, {"page_size": 2})
    while True:
        pages.append([r["id"] for r in results(response)])
        if response.json()["next"] is None:
            break
        response = client.get(response.json()["next"])

    ids = [pk for page in pages for pk in page]
    assert len(ids) == len(set(ids)) == total
    assert ids == [r["id"] for r in every(client, url)]
    back = []
    while response.json()["previous"] is not None:
        response = client.get(response.json()["previous"])
        back.append([r["id"] for r in results(response)])
    assert back == pages[-2::-1]


def test_rows_without_a_date_come_first_and_page_like_the_others(client, ledger):
    model = conf.trade_model()
    undated = list(model.objects.order_by("id").values_list("id", flat=True)[:3])
    model.objects.filter(pk__in=undated).update(trade_date=None)

    rows = every(client, TRADES)
    paged, response = [], client.get(TRADES, {"page_size": 2})
    while True:
        paged += [r["id"] for r in results(response)]
        if not response.json()["next"]:
            break
        response = client.get(response.json()["next"])

    assert [r["id"] for r in rows[:3]] == undated
    assert paged == [r["id"] for r in rows]
    # Dated filters leave the undated out; no filter keeps them.
    assert not {r["id"] for r in results(client.get(TRADES, {"to": "2030-01-01"}))} & set(undated)


def test_a_page_stays_stable_while_a_sync_adds_older_rows(client, ledger):
    first = client.get(TRADES, {"page_size": 20}).json()
    model = conf.trade_model()
    early = model.objects.get(external_id="9000001")
    early.pk, early.external_id, early.trade_date = None, "9000099", dt.date(2020, 1, 1)
    early.save()

    second = results(client.get(first["next"]))

    seen = {r["id"] for r in first["results"]}
    assert not seen & {r["id"] for r in second}
    assert len(second) == 20  # the older row is before the cursor, not on this page


@pytest.mark.parametrize("name", list(TAMPERED_CURSORS))
@pytest.mark.parametrize("url", [TRADES, CASH])
def test_a_tampered_cursor_is_400_never_a_500(client, ledger, caplog, url, name):
    body = assert_error(client.get(url, {"cursor": TAMPERED_CURSORS[name]}), 400, "invalid_query")

    assert "cursor" in body["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "position",
    [
        "2025-02-30,1",
        "2025-01-01",
        "2025-01-01,x",
        "x,1",
        f"2025-01-01,{2**63}",
        ",",
        "99999-01-01,1",
    ],
)
def test_a_position_that_is_no_date_and_id_is_400(client, ledger, position):
    body = assert_error(
        client.get(TRADES, {"cursor": cursor(f"o=0&r=0&p={position}")}), 400, "invalid_query"
    )

    assert "cursor" in body["detail"]


def test_a_well_formed_cursor_written_by_hand_still_works(client, ledger):
    for position, after in (("2025-12-19,0", 8), (",0", 40), ("2030-01-01,1", 0)):
        response = client.get(TRADES, {"cursor": cursor(f"o=0&r=0&p={position}")})
        assert len(results(response)) == after, position


def test_queries_do_not_grow_with_the_page(client, ledger):
    results(client.get(TRADES, {"page_size": 1}))  # the user's permissions, read once
    with CaptureQueriesContext(connection) as few:
        results(client.get(TRADES, {"page_size": 2}))
    with CaptureQueriesContext(connection) as many:
        assert len(results(client.get(TRADES, {"page_size": 40}))) == 40

    assert len(many.captured_queries) == len(few.captured_queries)


# --- who may read them -----------------------------------------------------------------------


@pytest.mark.parametrize("url", [TRADES, CASH])
def test_anonymous_is_401(api_client, url):
    assert_error(api_client.get(url), 401, "not_authenticated")


@pytest.mark.parametrize(
    ("codename", "opens", "refused", "perm"),
    [
        ("view_trade", TRADES, CASH, "portfolio.view_cashtransaction"),
        ("view_cashtransaction", CASH, TRADES, "portfolio.view_trade"),
    ],
)
def test_each_permission_opens_only_its_own_endpoint(
    api_client, django_user_model, ledger, codename, opens, refused, perm
):
    api_client.force_authenticate(reader_with(django_user_model, codename))

    assert len(results(api_client.get(opens))) > 0
    body = assert_error(api_client.get(refused), 403, "permission_denied")
    assert perm in body["detail"]


@pytest.mark.parametrize("url", [TRADES, CASH])
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_ledger_is_read_only(client, ledger, url, method):
    assert_error(getattr(client, method)(url), 405, "method_not_allowed")
    assert conf.trade_model().objects.count() == 40


def test_without_a_ledger_the_endpoints_are_a_json_404(client, ledger, settings):
    settings.IBKR_SYNC_TRADE_MODEL = None

    body = assert_error(client.get(TRADES), 404, "not_found")
    assert "no ledger of trades" in body["detail"]
    # The other kind is kept: still listed.
    assert len(results(client.get(CASH))) == 54

    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None
    assert_error(client.get(CASH, {"kind": "fee"}), 404, "not_found")
    assert_error(client.get(CASH, {"kind": "bogus"}), 404, "not_found")


def test_the_json_404_lists_only_the_ledger_endpoints_the_project_keeps(client, settings):
    """An unknown path's 404 names the endpoints: not one that answers 404 itself."""

    def listed() -> list[str]:
        detail = assert_error(client.get("/portfolio/nothing-here"), 404, "not_found")["detail"]
        return re.split(r" \(documented|\.$", detail.split("The endpoints: ")[1])[0].split(", ")

    assert {TRADES, CASH, "/portfolio/positions"} <= set(listed())

    settings.IBKR_SYNC_TRADE_MODEL = None
    assert TRADES not in listed()
    assert {CASH, "/portfolio/positions"} <= set(listed())


def test_without_a_ledger_anonymous_is_still_401(api_client, settings):
    settings.IBKR_SYNC_TRADE_MODEL = None

    assert_error(api_client.get(TRADES), 401, "not_authenticated")


# --- whose rows --------------------------------------------------------------------------------


def test_the_ledger_of_someone_elses_connection_is_not_listed(ledger, django_user_model):
    """Users own their connections: the trades and cash transactions of an owned
    connection's accounts are its owner's (and of whoever sees every connection), in the
    API and in the admin's lists; an unowned connection's are everyone's."""
    from django.contrib.auth.models import Permission
    from django.test import Client
    from rest_framework.test import APIClient

    from ibkr_sync.models import Connection

    codes = ["view_trade", "view_cashtransaction", "view_position"]
    people = {}
    for name in ("alice", "bob"):
        user = django_user_model.objects.create_user(name, password=f"pw-{name}-1", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(codename__in=codes))
        people[name] = user
    Connection.objects.filter(name="ours").update(owner=people["alice"])

    def accounts(user, url):
        api = APIClient()
        api.force_authenticate(user)
        return {row["account"] for row in every(api, url)}

    for url in (TRADES, CASH):
        assert accounts(people["alice"], url) == {OUR_ACCOUNT, REAL_ACCOUNT}
        assert accounts(people["bob"], url) == {REAL_ACCOUNT}
    api = APIClient()
    api.force_authenticate(people["bob"])
    assert results(api.get(TRADES, {"account": OUR_ACCOUNT})) == []

    browser = Client()
    browser.force_login(people["bob"])
    page = browser.get("/admin/portfolio/trade/")
    assert page.status_code == 200
    shown = {str(row.account.external_id) for row in page.context["cl"].result_list}
    assert shown == {REAL_ACCOUNT}
