"""The ledger's admin: trades, cash transactions and corporate actions as a Flex sync
stored them (loaded through the real path: `tests.ledger`), read-only lists with filters,
search, dates and exact numbers, IBKR's attributes on a row's page; shown only to users
who may view them, and not at all while the project keeps no ledger."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from portfolio.models import CashTransaction, CorporateAction, Trade
from tests.flex.test_flex_connection import service  # noqa: F401
from tests.ledger import OUR_ACCOUNT, load_ledger
from tests.test_admin import add, change, changelist

pytestmark = pytest.mark.django_db

LEDGER = (Trade, CashTransaction, CorporateAction)


@pytest.fixture
def ledger(service):  # noqa: F811
    load_ledger(service)


def staff_with(django_user_model, *codenames: str) -> Client:
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def shown(response) -> list:
    assert response.status_code == 200, response.status_code
    return list(response.context["cl"].result_list)


@pytest.mark.parametrize("model", LEDGER)
def test_lists_and_row_pages_render(admin_client, ledger, model):
    rows = shown(admin_client.get(changelist(model)))
    assert len(rows) == model.objects.count() > 0

    obj = model.objects.get(external_id__in=("9000001", "9000011", "9000020"))
    response = admin_client.get(change(obj))
    assert response.status_code == 200
    assert obj.external_id in response.text


@pytest.mark.parametrize("model", LEDGER)
def test_rows_can_be_neither_added_changed_nor_deleted(admin_client, ledger, model):
    obj = model.objects.filter(account__external_id=OUR_ACCOUNT).first()
    before = model.objects.filter(pk=obj.pk).values().get()
    delete = reverse(
        f"admin:{model._meta.app_label}_{model._meta.model_name}_delete", args=[obj.pk]
    )

    assert admin_client.get(add(model)).status_code == 403
    assert admin_client.post(add(model), {"external_id": "X"}).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    page = admin_client.get(change(obj)).text
    for name in ("_save", "external_id", "currency", "amount", "quantity", "date", "raw"):
        assert f'name="{name}"' not in page, name
    admin_client.post(change(obj), {"currency": "XXX", "external_id": "changed"})
    assert model.objects.filter(pk=obj.pk).values().get() == before


def test_a_trade_s_numbers_exact_and_ibkr_s_attributes_readable(admin_client, ledger):
    trade = Trade.objects.get(external_id="9000001")

    html = admin_client.get(change(trade)).text

    assert 'title="-1.25">-1.25</span> <span class="currency">EUR</span>' in html
    assert 'title="-3000">-3,000.00</span> <span class="currency">EUR</span>' in html
    assert '<table class="ibkr-attributes">' in html
    assert '<th scope="row">ibCommission</th><td>-1.25</td>' in html
    assert '<th scope="row">notes</th><td>O</td>' in html


def test_a_trade_s_side_is_called_buy_sell_on_its_list_its_filter_and_its_page(
    admin_client, ledger
):
    trade = Trade.objects.get(external_id="9000001")
    listed = admin_client.get(changelist(Trade)).text
    page = admin_client.get(change(trade)).text

    assert "Buy/sell" in listed and "By buy/sell" in listed
    assert "<label>Buy/sell:</label>" in page
    for html in (listed, page):
        assert "buy sell" not in html.lower()


def test_the_trades_list_shows_amounts_in_cents_exact_on_hover(admin_client, ledger):
    html = admin_client.get(changelist(Trade), {"q": "SHIR"}).text

    assert 'title="4.3005">4.3005</span>' in html  # a price, to 4 decimals
    assert 'title="-1000">-1,000</span>' not in html  # a purchase: positive quantity
    assert 'title="1000">1,000</span>' in html


@pytest.mark.parametrize(
    ("model", "query", "expected"),
    [
        (Trade, {"currency__exact": "CHF"}, 4),
        (Trade, {"cancelled__exact": "0"}, 40),
        (Trade, {"cancelled__exact": "1"}, 0),
        (Trade, {"q": "voxr"}, 6),
        (Trade, {"q": "9000001"}, 1),  # an external id
        (Trade, {"trade_date__year": "2025", "trade_date__month": "12"}, 8),
        (CashTransaction, {"kind__exact": "fee"}, 4),
        (CashTransaction, {"kind__exact": "withholding_tax", "currency__exact": "CHF"}, 1),
        (CashTransaction, {"q": "PAYMENT IN LIEU"}, 6),  # the description
        (CashTransaction, {"q": "nlcp"}, 22),  # the symbol
        (CashTransaction, {"date__year": "2026"}, 2),
        (CorporateAction, {"q": "split"}, 1),
        (CorporateAction, {"type__exact": "FS"}, 1),
    ],
)
def test_filters_search_and_dates(admin_client, ledger, model, query, expected):
    rows = shown(admin_client.get(changelist(model), query))

    assert len(rows) == expected


def test_the_account_filter(admin_client, ledger):
    account = Trade.objects.get(external_id="9000001").account

    rows = shown(admin_client.get(changelist(CashTransaction), {"account__id__exact": account.pk}))

    assert {r.external_id for r in rows} == {"9000010", "9000011"}


def test_a_list_s_queries_do_not_grow_with_its_rows(admin_client, ledger):
    admin_client.get(changelist(Trade))
    with CaptureQueriesContext(connection) as queries:
        assert len(shown(admin_client.get(changelist(Trade)))) == 40

    assert len(queries.captured_queries) <= 12


@pytest.mark.parametrize(
    ("model", "codename"),
    [
        (Trade, "view_trade"),
        (CashTransaction, "view_cashtransaction"),
        (CorporateAction, "view_corporateaction"),
    ],
)
def test_each_list_needs_its_view_permission(django_user_model, ledger, model, codename):
    others = {"view_trade", "view_cashtransaction", "view_corporateaction"} - {codename}
    without = staff_with(django_user_model, *others)
    assert without.get(changelist(model)).status_code == 403
    assert without.get(change(model.objects.first())).status_code == 403
    index = without.get(reverse("admin:index")).text
    assert f'href="{changelist(model)}"' not in index

    django_user_model.objects.get(username="staff").user_permissions.add(
        Permission.objects.get(codename=codename)
    )
    assert len(shown(without.get(changelist(model)))) == model.objects.count()
    assert f'href="{changelist(model)}"' in without.get(reverse("admin:index")).text


def test_without_a_ledger_the_admin_shows_none_of_it(admin_client, ledger, settings):
    settings.IBKR_SYNC_TRADE_MODEL = None
    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None
    settings.IBKR_SYNC_CORPORATE_ACTION_MODEL = None

    index = admin_client.get(reverse("admin:index"))
    assert index.status_code == 200
    for model in LEDGER:
        assert changelist(model) not in index.text
        assert admin_client.get(changelist(model)).status_code == 403
    # The rest of the admin as before.
    assert admin_client.get(reverse("admin:portfolio_position_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:portfolio_overview")).status_code == 200


def test_a_kind_kept_on_another_model_hides_ours(admin_client, ledger, settings):
    """A project whose trades are another model's: ours (still registered) is not its
    ledger, and is not shown as one."""
    settings.IBKR_SYNC_TRADE_MODEL = "portfolio.CashTransaction"

    assert admin_client.get(changelist(Trade)).status_code == 403
    assert admin_client.get(changelist(CashTransaction)).status_code == 200
