"""The overview's income per account and currency, from the ledger's cash transactions
synced from Flex statements (`tests.ledger`): dividends net of the tax withheld, payments
in lieu, interest, fees; in the base currency only at IBKR's own rates."""

from __future__ import annotations

import re
from decimal import Decimal
from html import unescape

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from ibkr_sync.decimals import exact_product, exact_sum, plain
from ibkr_sync.overview import INCOME_KINDS
from portfolio.models import CashTransaction
from tests.flex.test_flex_connection import service  # noqa: F401
from tests.ledger import OUR_ACCOUNT, REAL_ACCOUNT, load_ledger

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:portfolio_overview")
YEAR_2025 = {"from": "2025-01-01", "to": "2025-12-31"}


@pytest.fixture
def ledger(service):  # noqa: F811
    load_ledger(service)


def account_block(html: str, account: str) -> str:
    match = re.search(rf'data-account="{account}">(.*?)\n  </div>', html, re.S)
    assert match, account
    return match.group(1)


def income_row(block: str, currency: str) -> list[str]:
    """The exact values (titles) of an income row: the six kinds' columns and the total."""
    table = re.search(r'<table class="income">(.*?)</table>', block, re.S)
    assert table, "no income table"
    row = re.search(rf'<tr[^>]*data-currency="{currency}">(.*?)</tr>', table.group(1), re.S)
    assert row, currency
    return re.findall(r'<td class="num" title="([^"]*)"', row.group(1))


def expected(rows, kind) -> str:
    values = [r.amount for r in rows if r.kind == kind]
    return plain(exact_sum(values)) if values else ""


def test_income_per_currency_is_the_exact_sum_of_the_rows(admin_client, ledger):
    html = admin_client.get(OVERVIEW, YEAR_2025).text

    block = account_block(html, REAL_ACCOUNT)
    assert "Income, 2025-01-01 to 2025-12-31" in block
    for currency in ("USD", "CHF"):
        rows = CashTransaction.objects.filter(
            account__external_id=REAL_ACCOUNT, currency=currency, date__year=2025,
            kind__in=INCOME_KINDS,
        )  # fmt: skip
        dividends, tax = expected(rows, "dividend"), expected(rows, "withholding_tax")
        net = plain(exact_sum(Decimal(v) for v in (dividends, tax) if v))
        total = plain(exact_sum(r.amount for r in rows))
        assert income_row(block, currency) == [
            dividends, tax, net, expected(rows, "payment_in_lieu"),
            expected(rows, "interest"), expected(rows, "fee"), total,
        ], currency  # fmt: skip
    # Rows before the range are not in it (the 2024 taxes of NLCP).
    assert (
        not CashTransaction.objects.filter(date__year=2024)
        .filter(account__external_id=OUR_ACCOUNT)
        .exists()
    )


def test_our_statement_s_dividend_net_of_its_tax(admin_client, ledger):
    block = account_block(
        admin_client.get(OVERVIEW, {"from": "2026-03-13", "to": "2026-03-13"}).text, OUR_ACCOUNT
    )

    # 44 EUR, 15.05 withheld: 28.95 net; nothing else.
    assert income_row(block, "EUR") == ["44", "-15.05", "28.95", "", "", "", "28.95"]
    assert "28.95" in block


def test_in_base_each_row_at_ibkr_s_own_rate(admin_client, ledger):
    html = admin_client.get(OVERVIEW, YEAR_2025).text
    block = account_block(html, REAL_ACCOUNT)

    rows = CashTransaction.objects.filter(
        account__external_id=REAL_ACCOUNT, date__year=2025, kind__in=INCOME_KINDS
    )
    converted = exact_sum(exact_product(r.amount, r.fx_rate_to_base) for r in rows)
    base = re.search(r'<tr class="total" data-currency="base">(.*?)</tr>', block, re.S).group(1)
    assert re.findall(r'title="([^"]*)"', base)[-1] == plain(converted)
    assert "Not converted" not in block


def test_a_row_without_ibkr_s_rate_is_never_converted(admin_client, ledger):
    no_rate = CashTransaction.objects.filter(
        account__external_id=REAL_ACCOUNT, currency="USD", kind="dividend", date__year=2025
    ).first()
    CashTransaction.objects.filter(pk=no_rate.pk).update(fx_rate_to_base=None)

    block = account_block(admin_client.get(OVERVIEW, YEAR_2025).text, REAL_ACCOUNT)

    rows = CashTransaction.objects.filter(
        account__external_id=REAL_ACCOUNT, date__year=2025, kind__in=INCOME_KINDS
    ).exclude(pk=no_rate.pk)
    converted = exact_sum(exact_product(r.amount, r.fx_rate_to_base) for r in rows)
    base = re.search(r'<tr class="total" data-currency="base">(.*?)</tr>', block, re.S).group(1)
    assert re.findall(r'title="([^"]*)"', base)[-1] == plain(converted)
    assert "Not converted (IBKR gave no rate to the base currency): 1 in USD." in block
    # In its own currency it still counts.
    usd = CashTransaction.objects.filter(
        account__external_id=REAL_ACCOUNT, currency="USD", date__year=2025, kind__in=INCOME_KINDS
    )
    assert income_row(block, "USD")[-1] == plain(exact_sum(r.amount for r in usd))


def test_the_default_range_is_this_year(admin_client, ledger):
    today = timezone.localdate()
    CashTransaction.objects.filter(external_id="9000010").update(date=today)

    html = admin_client.get(OVERVIEW).text

    assert f"Income, {today.year}-01-01 to {today.isoformat()}" in html
    block = account_block(html, OUR_ACCOUNT)
    assert income_row(block, "EUR")[0] == "44"
    assert "No income in these days." in account_block(html, REAL_ACCOUNT)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ({"from": "2025-13-01"}, "from '2025-13-01' is not a date"),
        ({"to": "yesterday"}, "to 'yesterday' is not a date"),
        ({"from": "2025-12-01", "to": "2025-01-01"}, "from 2025-12-01 is after to 2025-01-01"),
    ],
)
def test_a_bad_range_is_said_and_this_year_shown(admin_client, ledger, query, problem):
    html = unescape(admin_client.get(OVERVIEW, query).text)

    assert problem in html
    assert f"Income, {timezone.localdate().year}-01-01 to" in html


def test_income_is_read_in_a_fixed_number_of_queries(admin_client, ledger):
    with CaptureQueriesContext(connection) as one_year:
        admin_client.get(OVERVIEW, YEAR_2025)
    with CaptureQueriesContext(connection) as all_years:
        admin_client.get(OVERVIEW, {"from": "2000-01-01", "to": "2026-12-31"})
    with CaptureQueriesContext(connection) as none:
        admin_client.get(OVERVIEW, {"from": "2001-01-01", "to": "2001-01-02"})

    assert len(one_year.captured_queries) == len(all_years.captured_queries)
    assert len(none.captured_queries) == len(one_year.captured_queries)


def staff_with(django_user_model, *codenames: str) -> Client:
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def test_only_users_who_may_view_cash_transactions_see_income(django_user_model, ledger):
    client = staff_with(django_user_model, "view_position")
    day = {"from": "2026-03-13", "to": "2026-03-13"}  # our statement's dividend: 44 EUR
    for html in (client.get(OVERVIEW, YEAR_2025).text, client.get(OVERVIEW, day).text):
        assert "Income, " not in html and 'class="income' not in html
        assert 'title="44"' not in html and 'title="-15.05"' not in html

    django_user_model.objects.get(username="staff").user_permissions.add(
        Permission.objects.get(codename="view_cashtransaction")
    )
    assert 'class="income"' in client.get(OVERVIEW, YEAR_2025).text
    block = account_block(client.get(OVERVIEW, day).text, OUR_ACCOUNT)
    assert income_row(block, "EUR")[:2] == ["44", "-15.05"]  # what was hidden


def test_without_a_ledger_the_overview_has_no_income(admin_client, ledger, settings):
    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None

    response = admin_client.get(OVERVIEW, YEAR_2025)

    assert response.status_code == 200
    assert "Income, " not in response.text and 'class="income-range"' not in response.text
