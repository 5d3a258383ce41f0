"""`GET /portfolio/cash`: each account's cash per currency, with its base-currency amount."""

import datetime as dt
import logging
from decimal import Context, Decimal
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from portfolio.models import CashBalance
from tests.test_read_api import NOW, TAMPERED_CURSORS, account, assert_error, reader_with

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(api_client, django_user_model):
    api_client.force_authenticate(reader_with(django_user_model, "view_cashbalance"))
    return api_client


def cash(
    acct, currency, amount, exchange_rate=None, synced_at=NOW, rate_currency=None
) -> CashBalance:
    """A row as a sync writes it: a rate converts to the base currency of its read (the
    account's, unless `rate_currency` says otherwise)."""
    if rate_currency is None:
        rate_currency = "" if exchange_rate is None else acct.base_currency
    return CashBalance.objects.create(
        account=acct,
        currency=currency,
        amount=Decimal(amount),
        exchange_rate=None if exchange_rate is None else Decimal(exchange_rate),
        rate_currency=rate_currency,
        synced_at=synced_at,
    )


@pytest.fixture
def balances():
    a = account("U1111111", base_currency="USD")
    b = account("U2222222", base_currency="EUR")
    return {
        "a_usd": cash(a, "USD", "10500.25", "1"),
        "a_jpy": cash(a, "JPY", "-1234.5678901234", "0.0067245"),
        "a_chf": cash(a, "CHF", "300", None),  # IBKR reported no rate
        "b_eur": cash(b, "EUR", "0", "1"),
        "b_usd": cash(b, "USD", "99.99", "0.9234"),
    }


def rows(response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.content
    return [(r["account"], r["currency"]) for r in response.json()["results"]]


def test_cash_balances_with_the_exact_base_amount(client, balances):
    response = client.get("/portfolio/cash")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    assert rows(response) == [  # oldest row first: a stable order
        ("U1111111", "USD"), ("U1111111", "JPY"), ("U1111111", "CHF"),
        ("U2222222", "EUR"), ("U2222222", "USD"),
    ]  # fmt: skip
    jpy = body["results"][1]
    assert jpy == {
        "id": balances["a_jpy"].pk,
        "broker": "ibkr",
        "account": "U1111111",
        "currency": "JPY",
        "amount": "-1234.5678901234",
        "exchange_rate": "0.0067245",
        # -12345678901234 x 67245, every digit: no rounding, no float.
        "base_amount": "-8.3018517771348033",
        "base_currency": "USD",
        "synced_at": "2026-11-26T09:30:00Z",
    }
    assert (body["results"][0]["base_amount"], body["results"][3]["base_amount"]) == (
        "10500.25",
        "0",
    )
    assert body["results"][4]["base_amount"] == "92.330766"  # 99.99 x 0.9234
    assert body["results"][4]["base_currency"] == "EUR"


def test_an_unknown_rate_gives_no_base_amount_never_a_guess(client, balances):
    chf = client.get("/portfolio/cash?currency=CHF").json()["results"][0]

    assert (chf["amount"], chf["exchange_rate"], chf["base_amount"]) == ("300", None, None)


def test_a_product_beyond_28_digits_keeps_them_all(client):
    cash(account(base_currency="USD"), "JPY", "98765432101.1234567891", "0.0067245127")

    result = client.get("/portfolio/cash").json()["results"][0]

    # The stored digits; SQLite keeps 15 significant digits of a stored number, so the
    # product is checked against what the database gave back.
    stored = CashBalance.objects.get()
    assert Decimal(result["amount"]) == stored.amount
    wide = Context(prec=100)
    expected = int(stored.amount.scaleb(10, wide)) * int(stored.exchange_rate.scaleb(10, wide))
    assert Decimal(result["base_amount"]) == Decimal(expected).scaleb(-20, wide)
    if connection.vendor == "postgresql":
        assert result["base_amount"] == "664149402.48499236944620417157"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"account": "U2222222"}, [("U2222222", "EUR"), ("U2222222", "USD")]),
        ({"currency": "usd"}, [("U1111111", "USD"), ("U2222222", "USD")]),
        ({"currency": " JPY "}, [("U1111111", "JPY")]),
        ({"account": "U1111111", "currency": "EUR"}, []),
        ({"account": "U9999999"}, []),
        ({"account": ""}, 5),  # blank: no filter
    ],
)
def test_cash_filters(client, balances, query, expected):
    found = rows(client.get(f"/portfolio/cash?{urlencode(query)}"))

    assert found == expected if isinstance(expected, list) else len(found) == expected


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ({"currency": "dollars"}, ["currency", "DOLLARS"]),
        ({"currency": "EU"}, ["currency"]),
        ({"account": "U" * 33}, ["account"]),
        ({"account": "U1\x00"}, ["account"]),
        ({"accounts": "U1111111"}, ["Unknown", "accounts", "account"]),
        ({"page": "99999999999999999999"}, ["Unknown", "page"]),
        ({"page_size": "99999999999999999999"}, ["page_size"]),
        ({"page_size": "0"}, ["page_size"]),
        ({"cursor": "not-a-cursor"}, ["cursor"]),
    ],
)
def test_bad_cash_parameters_are_400_naming_the_parameter(client, balances, query, mentions):
    body = assert_error(client.get("/portfolio/cash", query), 400, "invalid_query")

    for text in mentions:
        assert text in body["detail"]


def test_cash_pages_follow_next_links_without_gaps_or_repeats(client, balances):
    seen, url = [], "/portfolio/cash?page_size=2"
    while url:
        body = client.get(url).json()
        seen += [r["id"] for r in body["results"]]
        url = body["next"]

    assert seen == sorted(c.pk for c in balances.values())


def test_cash_query_count_does_not_grow_with_the_page(client, balances):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/portfolio/cash?page_size=1000").status_code == 200
        return len(captured)

    queries()  # the user's permissions are cached after the first request
    few = queries()
    many = account("U3333333")
    for n in range(50):
        cash(many, f"C{n:02d}", str(n), "1.5")

    assert queries() == few


def test_cash_needs_its_own_view_permission(api_client, django_user_model, balances):
    api_client.force_authenticate(reader_with(django_user_model, "view_account", "view_position"))

    body = assert_error(api_client.get("/portfolio/cash"), 403, "permission_denied")

    assert "portfolio.view_cashbalance" in body["detail"]


def test_cash_anonymous_is_401(api_client):
    response = api_client.get("/portfolio/cash")

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_cash_is_read_only(client, method):
    assert_error(getattr(client, method)("/portfolio/cash"), 405, "method_not_allowed")


def test_synced_at_is_the_sync_that_read_it(client):
    later = NOW + dt.timedelta(hours=1, microseconds=250)
    cash(account(), "USD", "1", "1", synced_at=later)

    assert client.get("/portfolio/cash").json()["results"][0]["synced_at"] == (
        "2026-11-26T10:30:00.000250Z"
    )


@pytest.mark.parametrize("name", list(TAMPERED_CURSORS))
def test_a_tampered_cash_cursor_is_400_never_a_500(client, balances, caplog, name):
    response = client.get("/portfolio/cash", {"cursor": TAMPERED_CURSORS[name]})

    body = assert_error(response, 400, "invalid_query")
    assert "cursor" in body["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- the currency of base_amount is the one its rate converts to -----------------------------


def test_base_amount_is_labelled_with_its_rates_currency_not_the_accounts(client):
    """The account's base currency changed since the row was read (IBKR switched it, or it
    was edited before it became read-only): the amount is in the rate's currency."""
    switched = account("U1111111", base_currency="EUR")
    cash(switched, "EUR", "1000", "1.0825", rate_currency="USD")

    [row] = client.get("/portfolio/cash").json()["results"]

    assert (row["base_amount"], row["base_currency"]) == ("1082.5", "USD")


@pytest.mark.parametrize(
    ("rate", "rate_currency"),
    [("0", "USD"), ("-1.0825", "USD"), ("0.0000000001", ""), (None, "")],
)
def test_a_rate_that_does_not_convert_gives_no_base_amount(client, rate, rate_currency):
    cash(account(base_currency="USD"), "EUR", "1000", rate, rate_currency=rate_currency)

    [row] = client.get("/portfolio/cash").json()["results"]

    assert row["base_amount"] is None
    assert (row["exchange_rate"], row["base_currency"]) == (rate, rate_currency)
