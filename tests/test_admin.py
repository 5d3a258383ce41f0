"""The Django admin over the synced portfolio and the SyncRun history, through the test client."""

import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import constants as message_levels
from django.test import Client
from django.urls import reverse

from ibkr_sync.exceptions import GatewayUnavailable
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, Instrument, Position
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db

SYNC_NOW = "admin:ibkr_sync_syncrun_sync_now"
SYNC_BUTTON = "Sync now from IBKR"
# Session, user, the account filter's choices, the sec type and currency filters' values,
# two counts (filtered and total), one page of rows with accounts and instruments joined
# in, and the accounts offered by the "Sync now" form.
POSITION_CHANGELIST_MAX_QUERIES = 9


def synced(gateway: FakeGateway) -> None:
    sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


@pytest.fixture
def portfolio():
    """Two accounts: AAPL and a fractional TSLA in one, a EUR option in the other; TSLA
    then closed."""
    gateway = FakeGateway(
        accounts=("U1111111", "U2222222"),
        positions=[
            position(),
            position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost="242.1"),
            position(
                account="U2222222", con_id=555, symbol="SAP", sec_type="OPT", currency="EUR",
                exchange="EUREX", local_symbol="SAP 261218C00120000", quantity="-2",
                average_cost="310", multiplier="100", strike=Decimal("120"), right="C",
                last_trade_date="20261218",
            ),
        ],
    )  # fmt: skip
    synced(gateway)
    del gateway.positions[1]
    synced(gateway)
    return {p.instrument.symbol: p for p in Position.objects.select_related("instrument")}


def listed(response) -> list[str]:
    """Symbols on a positions changelist page, in order."""
    assert response.status_code == 200
    return [p.instrument.symbol for p in response.context["cl"].result_list]


def changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change(obj) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


def add(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")


# --- pages render --------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Account, Instrument, Position, SyncRun])
def test_changelist_and_change_pages_render(admin_client, portfolio, model):
    response = admin_client.get(changelist(model))
    assert response.status_code == 200
    assert response.context["cl"].result_count > 0

    obj = model.objects.first()
    response = admin_client.get(change(obj))
    assert response.status_code == 200
    assert str(obj) in response.text


@pytest.mark.parametrize("model", [Account, Instrument, Position, SyncRun])
def test_rows_can_not_be_added_by_hand(admin_client, portfolio, model):
    count = model.objects.count()

    assert admin_client.get(add(model)).status_code == 403
    assert admin_client.post(add(model), {}).status_code == 403
    assert model.objects.count() == count


@pytest.mark.parametrize("model", [Account, Instrument, Position])
def test_synced_rows_can_not_be_deleted_by_hand(admin_client, portfolio, model):
    obj = model.objects.first()
    delete = reverse(
        f"admin:{model._meta.app_label}_{model._meta.model_name}_delete", args=[obj.pk]
    )

    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert model.objects.filter(pk=obj.pk).exists()


# --- positions changelist ------------------------------------------------------------------


def test_positions_changelist_shows_symbols_and_plain_decimals(admin_client, portfolio):
    response = admin_client.get(f"{changelist(Position)}?status=all")

    assert sorted(listed(response)) == ["AAPL", "SAP", "TSLA"]
    html = response.text
    assert ">SAP 261218C00120000<" in html, "derivatives show their local symbol"
    assert '<span class="num" title="0.5">0.5</span>' in html, "quantities exactly"
    assert '<span class="num" title="242.1">242.10</span>' in html, "prices with 2 decimals"
    assert '<span class="num" title="121.05">121.05</span>' in html
    assert '<span class="num" title="-2">-2</span>' in html
    assert "0.5000000000" not in html
    assert "242.1000000000" not in html


@pytest.mark.parametrize(
    ("query", "symbols"),
    [
        ("", ["AAPL", "SAP"]),  # open positions by default
        ("status=open", ["AAPL", "SAP"]),
        ("status=closed", ["TSLA"]),
        ("status=all", ["AAPL", "SAP", "TSLA"]),
        ("status=bogus", ["AAPL", "SAP"]),
        ("instrument__sec_type=OPT", ["SAP"]),
        ("instrument__sec_type=STK", ["AAPL"]),
        ("instrument__sec_type=STK&status=all", ["AAPL", "TSLA"]),
        ("instrument__currency__exact=EUR", ["SAP"]),
        ("instrument__currency__exact=USD&status=closed", ["TSLA"]),
        ("q=tsla", []),
        ("q=tsla&status=all", ["TSLA"]),
        ("q=76792991&status=all", ["TSLA"]),
        ("q=7679&status=all", []),  # conId search is exact, not a substring match
        ("q=C00120000", ["SAP"]),  # local symbol
    ],
)
def test_positions_filters_and_search(admin_client, portfolio, query, symbols):
    response = admin_client.get(f"{changelist(Position)}?{query}")

    assert sorted(listed(response)) == symbols


def test_positions_filter_by_account(admin_client, portfolio):
    account = Account.objects.get(external_id="U2222222")

    response = admin_client.get(f"{changelist(Position)}?account__id__exact={account.pk}")

    assert listed(response) == ["SAP"]
    assert "U1111111" in response.text, "the filter offers the other accounts"


@pytest.mark.parametrize("rows", [3, 60])
def test_positions_changelist_queries_do_not_grow_with_rows(
    admin_client, django_assert_max_num_queries, rows
):
    accounts = ("U1111111", "U2222222", "U3333333")
    synced(
        FakeGateway(
            accounts=accounts,
            positions=[
                position(account=accounts[i % 3], con_id=1000 + i, symbol=f"S{i:03}")
                for i in range(rows)
            ],
        )
    )
    url = changelist(Position)
    admin_client.get(url)  # warm the session and content-type caches

    with django_assert_max_num_queries(POSITION_CHANGELIST_MAX_QUERIES):
        response = admin_client.get(url)

    assert len(listed(response)) == rows


# --- synced data is read-only --------------------------------------------------------------


def test_position_change_page_has_no_inputs_for_synced_fields(admin_client, portfolio):
    aapl = portfolio["AAPL"]

    response = admin_client.get(change(aapl))

    assert response.status_code == 200
    html = response.text
    for name in ("quantity", "average_cost", "cost_basis", "closed_at", "account"):
        assert f'name="{name}"' not in html
    assert "U1111111 (Interactive Brokers)" in html, "shown, as text"


def test_change_pages_show_plain_decimals(admin_client, portfolio):
    tsla = admin_client.get(change(portfolio["TSLA"])).text
    assert "0.5" in tsla
    assert "121.05" in tsla
    assert "0.5000000000" not in tsla
    option = admin_client.get(change(portfolio["SAP"].instrument)).text
    assert "120" in option
    assert "120.0000000000" not in option
    assert "100.000000" not in option


def test_posting_a_position_change_does_not_change_it(admin_client, portfolio):
    aapl = portfolio["AAPL"]

    admin_client.post(change(aapl), {"quantity": "999", "average_cost": "1", "closed_at": ""})

    aapl.refresh_from_db()
    assert (aapl.quantity, aapl.average_cost) == (Decimal("10"), Decimal("150.25"))


def test_instrument_and_sync_run_change_pages_are_read_only(admin_client, portfolio):
    sap = Instrument.objects.get(symbol="SAP")
    admin_client.post(change(sap), {"symbol": "HACK", "strike": "1"})
    sap.refresh_from_db()
    assert (sap.symbol, sap.strike) == ("SAP", Decimal("120"))

    run = SyncRun.objects.first()
    assert 'name="status"' not in admin_client.get(change(run)).text


def test_account_name_is_editable_but_its_identity_is_not(admin_client, portfolio):
    account = Account.objects.get(external_id="U1111111")

    response = admin_client.post(
        change(account), {"name": "Retirement", "base_currency": "USD", "external_id": "U0"}
    )

    assert response.status_code == 302
    account.refresh_from_db()
    assert (account.name, account.external_id) == ("Retirement", "U1111111")


# --- "Sync now" ----------------------------------------------------------------------------


@pytest.fixture
def staff_viewer(django_user_model):
    """Staff who may browse sync runs but not start one."""
    user = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    return user


@pytest.fixture
def staff_syncer(staff_viewer):
    staff_viewer.user_permissions.add(Permission.objects.get(codename="run_sync"))
    return staff_viewer


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in response.context["messages"]]


def test_sync_runs_changelist_offers_the_button_to_users_who_may_sync(admin_client, staff_syncer):
    assert SYNC_BUTTON in admin_client.get(changelist(SyncRun)).text
    response = client_for(staff_syncer).get(changelist(SyncRun))
    assert SYNC_BUTTON in response.text
    assert reverse(SYNC_NOW) in response.text


def test_staff_without_the_permission_sees_no_button_and_may_not_sync(staff_viewer, use_gateway):
    client = client_for(staff_viewer)

    response = client.get(changelist(SyncRun))
    assert response.status_code == 200
    assert SYNC_BUTTON not in response.text

    assert client.post(reverse(SYNC_NOW)).status_code == 403
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_sync_now_runs_a_sync_and_reports_it(admin_client, admin_user, use_gateway):
    response = admin_client.post(reverse(SYNC_NOW), follow=True)

    assert response.redirect_chain == [(changelist(SyncRun), 302)]
    run = SyncRun.objects.get()
    assert (run.status, run.trigger, run.user, run.created) == ("success", "admin", admin_user, 2)
    assert messages_of(response) == [
        (
            message_levels.SUCCESS,
            f'<a href="{change(run)}">Sync #{run.pk}</a> finished: 2 positions in 1 account(s); '
            "2 created, 0 updated, 0 unchanged, 0 reopened, 0 closed, 0 errors.",
        )
    ]
    assert Position.objects.count() == 2


def test_sync_now_for_one_account(staff_syncer, use_gateway):
    use_gateway.accounts = ("U1111111", "U2222222")
    client = client_for(staff_syncer)

    client.post(reverse(SYNC_NOW), {"ibkr_account_id": " u2222222 "})

    assert use_gateway.calls == ["U2222222"]
    run = SyncRun.objects.get()
    assert (run.account_filter, run.user, run.trigger) == ("U2222222", staff_syncer, "admin")


def test_sync_now_with_unmappable_records_is_a_warning(admin_client, use_gateway):
    use_gateway.positions.append(position(con_id=5, symbol="ODD", sec_type="NOPE"))

    response = admin_client.post(reverse(SYNC_NOW), follow=True)

    [(level, text)] = messages_of(response)
    assert level == message_levels.WARNING
    assert "1 errors" in text


def test_sync_now_reports_a_gateway_failure(admin_client, use_gateway):
    use_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at 127.0.0.1:7497")

    response = admin_client.post(reverse(SYNC_NOW), follow=True)

    assert response.status_code == 200
    assert messages_of(response) == [
        (message_levels.ERROR, "Sync failed: Cannot connect to the IB gateway at 127.0.0.1:7497")
    ]
    assert SyncRun.objects.get().error_code == "gateway_unavailable"


def test_sync_now_reports_an_invalid_account_id(admin_client, use_gateway):
    response = admin_client.post(reverse(SYNC_NOW), {"ibkr_account_id": "bogus!"}, follow=True)

    [(level, text)] = messages_of(response)
    assert level == message_levels.ERROR
    assert "'bogus!' is not an IBKR account id" in text
    assert use_gateway.calls == []


def test_sync_now_only_accepts_post(admin_client, use_gateway):
    response = admin_client.get(reverse(SYNC_NOW))

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert use_gateway.calls == []


def test_sync_now_requires_a_csrf_token(admin_user, use_gateway):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    assert client.post(reverse(SYNC_NOW)).status_code == 403
    assert use_gateway.calls == []


@pytest.mark.parametrize("model", [Instrument, Position])
def test_mirrored_rows_are_offered_to_view_not_to_change(admin_client, portfolio, model):
    obj = model.objects.first()
    listing = admin_client.get(changelist(model)).text
    assert "to view" in listing
    page = admin_client.get(change(obj)).text
    assert 'name="_save"' not in page


def test_sync_runs_can_not_be_deleted_and_show_a_readable_duration(admin_client, portfolio):
    sync_run = SyncRun.objects.first()
    assert admin_client.post(change(sync_run).replace("/change/", "/delete/")).status_code == 403
    listing = admin_client.get(changelist(SyncRun)).text
    assert "Delete selected" not in listing
    assert re.search(r"\d+\.\d\d s", listing)


def test_sec_type_filter_offers_only_the_types_held(admin_client, portfolio):
    page = admin_client.get(changelist(Position)).text
    assert "?instrument__sec_type=OPT" in page
    assert "?instrument__sec_type=STK" in page
    assert "?instrument__sec_type=BOND" not in page


def test_view_site_leads_to_the_portfolio_overview(admin_client):
    index = admin_client.get(reverse("admin:index")).text
    view_site = re.search(r'<a href="([^"]*)">View site</a>', index).group(1)

    response = admin_client.get(view_site, follow=True)

    assert response.redirect_chain == [(reverse("admin:portfolio_overview"), 302)]
    assert response.status_code == 200
    assert response.context["title"] == "Portfolio overview"


def test_the_site_root_leads_everyone_else_to_the_admin(django_user_model, client):
    staff = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_syncrun"))

    anonymous = client.get("/", follow=True)
    without_positions = client_for(staff).get("/", follow=True)

    assert anonymous.redirect_chain[0] == (reverse("admin:index"), 302)
    assert anonymous.redirect_chain[-1][0].startswith(reverse("admin:login"))
    assert without_positions.redirect_chain == [(reverse("admin:index"), 302)]
    assert without_positions.status_code == 200
