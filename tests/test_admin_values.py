"""IBKR's values in the admin's lists and pages: the positions' market price, market value
and unrealized P&L; cash balances and account snapshots, read-only like every mirrored
row. Numbers are right-aligned and thousands separated, and never lose a digit: what a
list rounds (to cents, or a price to 4 decimals) is exact in the title and on the page."""

import datetime as dt
import re
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from ibkr_sync.admin.portfolio import PositionAdmin, number
from portfolio.models import AccountSnapshot, CashBalance, Position
from tests.test_admin import add, change, changelist
from tests.values import account, cash, held, snapshot

pytestmark = pytest.mark.django_db

# Session, user, the account filter's choices, the currency filter's values, the count,
# the page with accounts joined in; for snapshots, the date hierarchy's range and choices.
VALUES_CHANGELIST_MAX_QUERIES = 8


@pytest.fixture
def values():
    main = account("U1111111", name="Main")
    paper = account("DU2222222", base_currency="EUR", is_paper=True)
    aapl = held(main, "AAPL", quantity="120", cost_basis="18030", market_value="22731.852",
                unrealized_pnl="4701.852", market_price="189.4321", average_cost="150.25",
                realized_pnl="12.5")  # fmt: skip
    vti = held(main, "VTI", quantity="12500", cost_basis="2484567.90125",
               market_value="2932098.62654321", unrealized_pnl="447530.72529321",
               market_price="234.5678901234")  # fmt: skip
    # IBKR reported no values for this one.
    odd = held(main, "ODD", quantity="7", cost_basis="70")
    bmw = held(paper, "BMW", currency="EUR", quantity="40", cost_basis="3950.4",
               market_value="4052", unrealized_pnl="101.6", market_price="101.3")  # fmt: skip
    cash(main, "USD", "12345.67", "1")
    cash(main, "EUR", "-1000", "1.085")
    cash(main, "JPY", "150000")  # no rate
    cash(paper, "EUR", "50000", "1")
    now = timezone.now()
    snapshot(main, now - dt.timedelta(days=2), "250000", total_cash_value="12000.5")
    snapshot(main, now - dt.timedelta(days=1), "1234567.891", buying_power="4938271.564")
    snapshot(paper, now - dt.timedelta(days=1), "51234.5")
    return {"main": main, "paper": paper, "aapl": aapl, "vti": vti, "odd": odd, "bmw": bmw}


def cells(html: str, column: str) -> list[str]:
    """The cells of one list_display column, as HTML, top to bottom."""
    return re.findall(rf'<t[hd] class="field-{column}[^"]*">(.*?)</t[hd]>', html, re.S)


def listed(response) -> list:
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


# --- number -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "options", "html"),
    [
        ("2932098.62654321", {"places": 2, "min_places": 2},
         '<span class="num" title="2932098.62654321">2,932,098.63</span>'),
        ("-2501.005", {"places": 2, "min_places": 2},
         '<span class="num" title="-2501.005">-2,501.00</span>'),  # half even
        ("234.5678901234", {"places": 4, "min_places": 2},
         '<span class="num" title="234.5678901234">234.5679</span>'),
        ("1250.5", {"places": 4, "min_places": 2},
         '<span class="num" title="1250.5">1,250.50</span>'),
        ("0.12345678", {}, '<span class="num" title="0.12345678">0.12345678</span>'),
        ("12500.0000000000", {}, '<span class="num" title="12500">12,500</span>'),
        ("1.085", {"min_places": 4}, '<span class="num" title="1.085">1.0850</span>'),
        # The widest column value, exactly: 20 integer digits and 10 decimals.
        ("-12345678901234567890.1234567891", {"min_places": 2},
         '<span class="num" title="-12345678901234567890.1234567891">'
         "-12,345,678,901,234,567,890.1234567891</span>"),
        (None, {}, '<span class="num">-</span>'),
    ],
)  # fmt: skip
def test_number_is_grouped_and_keeps_the_exact_value(value, options, html):
    assert number(None if value is None else Decimal(value), **options) == html


# --- positions ------------------------------------------------------------------------------


def test_positions_list_shows_ibkr_values_right_aligned_and_exact_on_hover(admin_client, values):
    html = admin_client.get(changelist(Position)).text

    assert cells(html, "market_price_display") == [
        '<span class="num" title="189.4321">189.4321</span>',
        '<span class="num">-</span>',  # ODD: IBKR reported none
        '<span class="num" title="234.5678901234">234.5679</span>',
        '<span class="num" title="101.3">101.30</span>',
    ]
    assert cells(html, "market_value_display") == [
        '<span class="num" title="22731.852">22,731.85</span>',
        '<span class="num">-</span>',
        '<span class="num" title="2932098.62654321">2,932,098.63</span>',
        '<span class="num" title="4052">4,052.00</span>',
    ]
    assert cells(html, "unrealized_pnl_display") == [
        '<span class="num" title="4701.852">4,701.85</span>',
        '<span class="num">-</span>',
        '<span class="num" title="447530.72529321">447,530.73</span>',
        '<span class="num" title="101.6">101.60</span>',
    ]
    # The account by its id (its link opens the position), its name on hover.
    assert (
        '<span title="U1111111 (Interactive Brokers)">U1111111</span></a>'
        in (cells(html, "account_label")[0])
    )
    # The columns' headers, and the stylesheet that right-aligns them.
    for header in ("Market price", "Market value", "Unrealized P&amp;L"):
        assert f">{header}</a>" in html
    assert "ibkr_sync/admin.css" in html


@pytest.mark.parametrize(
    "column", ["market_price_display", "market_value_display", "unrealized_pnl_display"]
)
def test_the_value_columns_sort_by_their_field(admin_client, values, column):
    field = column.removesuffix("_display")
    assert getattr(PositionAdmin, column).admin_order_field == field
    index = PositionAdmin.list_display.index(column)

    ascending = listed(admin_client.get(f"{changelist(Position)}?o={index}"))
    descending = listed(admin_client.get(f"{changelist(Position)}?o=-{index}"))

    reported = [p for p in ascending if getattr(p, field) is not None]
    assert [getattr(p, field) for p in reported] == sorted(getattr(p, field) for p in reported)
    assert [p.pk for p in descending if getattr(p, field) is not None] == [
        p.pk for p in reversed(reported)
    ]


def test_position_page_shows_every_value_exactly(admin_client, values):
    html = admin_client.get(change(values["vti"])).text

    for exact in (
        '<span class="num" title="234.5678901234">234.5678901234</span>',
        '<span class="num" title="2932098.62654321">2,932,098.62654321</span>',
        '<span class="num" title="447530.72529321">447,530.72529321</span>',
        '<span class="num" title="2484567.90125">2,484,567.90125</span>',
        '<span class="num" title="12500">12,500</span>',
    ):
        assert exact in html
    page = admin_client.get(change(values["aapl"])).text
    assert "Realized P&amp;L" in page and '<span class="num" title="12.5">12.50</span>' in page
    assert "Valued at" in page
    for name in ("market_price", "market_value", "unrealized_pnl", "realized_pnl"):
        assert f'name="{name}"' not in page


# --- cash balances ------------------------------------------------------------------------


def test_cash_balances_list(admin_client, values):
    response = admin_client.get(changelist(CashBalance))

    rows = listed(response)
    assert [(c.account.external_id, c.currency) for c in rows] == [
        ("U1111111", "EUR"), ("U1111111", "JPY"), ("U1111111", "USD"), ("DU2222222", "EUR"),
    ]  # fmt: skip
    html = response.text
    assert cells(html, "amount_display")[:3] == [
        '<span class="num" title="-1000">-1,000.00</span>',
        '<span class="num" title="150000">150,000.00</span>',
        '<span class="num" title="12345.67">12,345.67</span>',
    ]
    assert cells(html, "exchange_rate_display")[:3] == [
        '<span class="num" title="1.085">1.0850</span>',
        '<span class="num">-</span>',
        '<span class="num" title="1">1.0000</span>',
    ]
    # In the account's base currency at IBKR's rate; never the amount as it is without one.
    assert cells(html, "base_amount_display") == [
        '<span class="num" title="-1085">-1,085.00 USD</span>',
        '<span class="num">-</span>',
        '<span class="num" title="12345.67">12,345.67 USD</span>',
        '<span class="num" title="50000">50,000.00 EUR</span>',
    ]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("currency__exact=EUR", [("U1111111", "EUR"), ("DU2222222", "EUR")]),
        ("currency__exact=JPY", [("U1111111", "JPY")]),
        ("account", [("DU2222222", "EUR")]),
    ],
)
def test_cash_balances_filter_by_account_and_currency(admin_client, values, query, expected):
    if query == "account":
        query = f"account__id__exact={values['paper'].pk}"

    rows = listed(admin_client.get(f"{changelist(CashBalance)}?{query}"))

    assert [(c.account.external_id, c.currency) for c in rows] == expected


def test_cash_balance_page(admin_client, values):
    eur = CashBalance.objects.get(account=values["main"], currency="EUR")

    html = admin_client.get(change(eur)).text

    assert '<span class="num" title="-1000">-1,000.00</span>' in html
    assert '<span class="num" title="1.085">1.0850</span>' in html
    assert '<span class="num" title="-1085">-1,085.00 USD</span>' in html
    assert 'name="amount"' not in html and 'name="_save"' not in html


# --- account snapshots ----------------------------------------------------------------------


def test_account_snapshots_list_each_accounts_history_newest_first(admin_client, values):
    response = admin_client.get(changelist(AccountSnapshot))

    rows = listed(response)
    assert [(s.account.external_id, s.net_liquidation) for s in rows] == [
        ("U1111111", Decimal("1234567.891")),
        ("U1111111", Decimal("250000")),
        ("DU2222222", Decimal("51234.5")),
    ]
    html = response.text
    assert cells(html, "net_liquidation_display")[0] == (
        '<span class="num" title="1234567.891">1,234,567.89</span>'
    )
    assert cells(html, "buying_power_display")[0] == (
        '<span class="num" title="4938271.564">4,938,271.56</span>'
    )
    assert cells(html, "total_cash_value_display")[:2] == [
        '<span class="num">-</span>', '<span class="num" title="12000.5">12,000.50</span>'
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("query", "expected"),
    [("currency__exact=EUR", ["DU2222222"]), ("account", ["U1111111", "U1111111"])],
)
def test_account_snapshots_filter_by_account_and_currency(admin_client, values, query, expected):
    if query == "account":
        query = f"account__id__exact={values['main'].pk}"

    rows = listed(admin_client.get(f"{changelist(AccountSnapshot)}?{query}"))

    assert [s.account.external_id for s in rows] == expected


def test_account_snapshot_page_shows_values_exactly(admin_client, values):
    latest = AccountSnapshot.objects.filter(account=values["main"]).latest()

    html = admin_client.get(change(latest)).text

    assert '<span class="num" title="1234567.891">1,234,567.891</span>' in html
    assert '<span class="num" title="4938271.564">4,938,271.564</span>' in html
    assert 'name="net_liquidation"' not in html and 'name="_save"' not in html


# --- read-only --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CashBalance, AccountSnapshot])
def test_values_are_mirrored_rows_nobody_adds_changes_or_deletes(admin_client, values, model):
    obj = model.objects.first()
    delete = reverse(f"admin:portfolio_{model._meta.model_name}_delete", args=[obj.pk])
    count = model.objects.count()

    assert "to view" in admin_client.get(changelist(model)).text
    assert admin_client.get(add(model)).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    admin_client.post(change(obj), {"amount": "1", "net_liquidation": "1", "currency": "XXX"})

    assert model.objects.count() == count
    fresh = model.objects.get(pk=obj.pk)
    assert (fresh.currency, getattr(fresh, "amount", None)) == (
        obj.currency, getattr(obj, "amount", None)
    )  # fmt: skip
    assert "Delete selected" not in admin_client.get(changelist(model)).text


@pytest.mark.parametrize("rows", [3, 60])
@pytest.mark.parametrize("model", [CashBalance, AccountSnapshot])
def test_values_lists_queries_do_not_grow_with_rows(
    admin_client, django_assert_max_num_queries, model, rows
):
    accounts = [account(f"U{i:07}") for i in range(3)]
    start = timezone.now() - dt.timedelta(days=rows)
    for i in range(rows):
        owner = accounts[i % 3]
        if model is CashBalance:
            cash(owner, f"C{i:02}", i, "1.1")
        else:
            snapshot(owner, start + dt.timedelta(days=i), i)
    url = changelist(model)
    admin_client.get(url)  # warm the session and content-type caches

    with django_assert_max_num_queries(VALUES_CHANGELIST_MAX_QUERIES):
        response = admin_client.get(url)

    assert len(listed(response)) == rows


# --- what IBKR reports is not editable ---------------------------------------------------------


@pytest.mark.parametrize("name", ["account", "instrument", "position", "cash_balance",
                                  "account_snapshot"])  # fmt: skip
def test_every_field_ibkr_reports_is_read_only_in_the_admin(rf, admin_user, values, name):
    """The rule, for every field of every synced model (those a host adds too): only the
    user's own fields (an account's name) are in a form the admin can save."""
    from django.contrib import admin

    from ibkr_sync import conf
    from ibkr_sync.admin.portfolio import USER_FIELDS

    model = getattr(conf, f"{name}_model")()
    model_admin = admin.site._registry[model]
    request = rf.get("/")
    request.user = admin_user
    obj = model.objects.first()

    editable = set(model_admin.get_form(request, obj).base_fields)
    if model_admin.has_change_permission(request, obj):
        assert editable <= USER_FIELDS, editable
    ibkrs = {f.name for f in model._meta.concrete_fields if not f.primary_key} - USER_FIELDS
    assert not ibkrs & editable or not model_admin.has_change_permission(request, obj)


def test_an_admin_cannot_change_the_base_currency_only_the_name(admin_client, values):
    main = values["main"]
    form = {"name": "Renamed", "base_currency": "EUR", "external_id": "U9", "is_paper": "on",
            "broker": "ibkr"}  # fmt: skip

    page = admin_client.get(change(main)).text
    response = admin_client.post(change(main), form)

    assert 'name="base_currency"' not in page and 'name="name"' in page
    assert response.status_code == 302
    main.refresh_from_db()
    assert (main.name, main.base_currency, main.external_id, main.is_paper) == (
        "Renamed", "USD", "U1111111", False
    )  # fmt: skip


def test_a_cash_rows_base_amount_is_labelled_with_its_rates_currency(admin_client, values):
    """IBKR switched the account to EUR while a row read in USD was kept: its amount is in
    USD, whatever the account says now; a rate that does not convert gives none."""
    main = values["main"]
    main.base_currency = "EUR"
    main.save()
    CashBalance.objects.filter(account=main, currency="JPY").update(
        exchange_rate=Decimal(0), rate_currency="USD"
    )

    html = admin_client.get(f"{changelist(CashBalance)}?account__id__exact={main.pk}").text

    assert cells(html, "base_amount_display") == [
        '<span class="num" title="-1085">-1,085.00 USD</span>',
        '<span class="num">-</span>',  # JPY at a rate of 0: no amount, never 0.00
        '<span class="num" title="12345.67">12,345.67 USD</span>',
    ]


def test_a_snapshot_page_lists_ibkrs_rates_with_their_currencies(admin_client, values):
    main = values["main"]
    taken = snapshot(main, timezone.now(), "1", exchange_rates={"EUR": "1.0825", "JPY": "0.0067"})

    html = admin_client.get(change(taken)).text

    assert "EUR-USD 1.0825<br>JPY-USD 0.0067" in html
