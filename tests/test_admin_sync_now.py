"""The "Sync now" control on the positions and accounts changelists, the links from
accounts and instruments to their positions, and the open/closed/all status filter."""

import re

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import constants as message_levels
from django.db import connection
from django.test import Client
from django.urls import resolve, reverse
from django.utils.html import escape

from ibkr_sync.exceptions import GatewayUnavailable
from ibkr_sync.models import SyncRun
from portfolio.models import Account, Instrument, Position
from tests.conftest import FakeGateway, position, reading_from
from tests.test_account_reports import MORNING, NOON, Statement
from tests.test_admin import change, changelist, client_for, listed, messages_of, synced

pytestmark = pytest.mark.django_db

SYNC_NOW = reverse("admin:ibkr_sync_syncrun_sync_now")
SYNC_BUTTON = "Sync now from IBKR"
FORM = re.compile(rf'<form method="post" action="{SYNC_NOW}".*?</form>', re.S)


@pytest.fixture
def portfolio():
    """AAPL (open) and TSLA (closed) in U1111111, SAP (open) in U2222222."""
    gateway = FakeGateway(
        accounts=("U1111111", "U2222222"),
        positions=[
            position(),
            position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost="242.1"),
            position(account="U2222222", con_id=555, symbol="SAP", currency="EUR"),
        ],
    )
    synced(gateway)
    del gateway.positions[1]
    synced(gateway)


def staff(django_user_model, username: str, *codenames: str):
    user = django_user_model.objects.create_user(username, password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def browsing_staff(django_user_model):
    """May look at accounts and positions, may not sync."""
    return staff(django_user_model, "browser", "view_position", "view_account")


@pytest.fixture
def syncing_staff(django_user_model):
    return staff(django_user_model, "syncer", "view_position", "view_account", "run_sync")


@pytest.mark.parametrize("model", [Position, Account])
def test_the_button_shows_only_for_users_who_may_sync(browsing_staff, syncing_staff, model):
    page = client_for(syncing_staff).get(changelist(model))
    assert page.status_code == 200
    form = FORM.search(page.text).group()
    assert SYNC_BUTTON in form
    assert 'name="csrfmiddlewaretoken"' in form
    assert f'name="next" value="{changelist(model)}"' in form

    page = client_for(browsing_staff).get(changelist(model))
    assert page.status_code == 200
    assert SYNC_BUTTON not in page.text
    assert SYNC_NOW not in page.text


def test_the_form_offers_every_account_and_preselects_the_filtered_one(admin_client, portfolio):
    other = Account.objects.get(external_id="U2222222")

    form = FORM.search(admin_client.get(changelist(Position)).text).group()
    assert re.findall(r"<option value=\"([^\"]*)\"", form) == ["", "U1111111", "U2222222"]
    assert " selected" not in form

    page = admin_client.get(f"{changelist(Position)}?account__id__exact={other.pk}").text
    form = FORM.search(page).group()
    assert '<option value="U2222222" selected>' in form
    assert '<option value="U1111111">' in form


def test_sync_now_from_positions_returns_to_the_same_list_with_the_counts(
    syncing_staff, use_gateway
):
    back = f"{changelist(Position)}?status=all&q=TSLA"
    # The link to the run is for those who may view sync runs.
    syncing_staff.user_permissions.add(Permission.objects.get(codename="view_syncrun"))

    response = client_for(syncing_staff).post(SYNC_NOW, {"next": back}, follow=True)

    assert response.redirect_chain == [(back, 302)]
    run = SyncRun.objects.get()
    assert (run.status, run.trigger, run.user) == ("success", "admin", syncing_staff)
    [(level, text)] = messages_of(response)
    assert level == message_levels.SUCCESS
    assert text == (
        f'<a href="{change(run)}">Sync #{run.pk}</a> finished: 2 positions in 1 account(s); '
        "2 created, 0 updated, 0 unchanged, 0 reopened, 0 closed, 0 errors."
    )
    assert listed(response) == ["TSLA"], "the list the user was looking at, refreshed"
    # Shown as a link, not as escaped markup.
    assert f'<a href="{change(run)}">Sync #{run.pk}</a> finished' in response.text


def test_sync_now_says_which_accounts_values_were_not_read_and_the_run_shows_why(
    admin_client, use_gateway
):
    use_gateway.values_missing = {"U1111111": "IBKR refused the subscription (error 2101)"}

    response = admin_client.post(SYNC_NOW, {"next": changelist(Position)}, follow=True)

    run = SyncRun.objects.get()
    [(level, text)] = messages_of(response)
    assert level == message_levels.WARNING
    assert text.endswith(
        "0 errors. Values not read for U1111111 (their stored values were kept): "
        "U1111111: IBKR refused the subscription (error 2101)"
    )
    assert run.account_values == {
        "U1111111": {"status": "missing", "reason": "IBKR refused the subscription (error 2101)"}
    }
    page = admin_client.get(change(run)).text
    # Readable, not JSON: the account, that its values are missing, and why.
    assert (
        '<li><strong>U1111111</strong> <span class="ibkr-badge ibkr-badge-values-missing">'
        "values missing</span> IBKR refused the subscription (error 2101)</li>"
    ) in page


def test_sync_now_says_which_accounts_were_not_written_as_the_command_does(admin_client, settings):
    """A source's snapshot older than the one applied already writes nothing of those
    accounts: the message says so and why, as `sync_ibkr` does, rather than a bare
    "0 positions in 0 account(s)"."""
    newer = Statement(NOON, position(quantity="10"))
    with reading_from(newer, settings):
        admin_client.post(SYNC_NOW, {"next": changelist(Position)}, follow=True)
    older = Statement(MORNING, position(quantity="5"))
    with reading_from(older, settings):
        response = admin_client.post(SYNC_NOW, {"next": changelist(Position)}, follow=True)

    run = SyncRun.objects.latest("pk")
    [(level, text)] = messages_of(response)
    assert level == message_levels.WARNING
    assert "finished: 0 positions in 0 account(s)" in text
    assert text.endswith(f" {escape(run.accounts_refused['U1111111'])}")
    assert "U1111111 was not written: " in text
    assert "as of 2026-12-01 12:00:00.000 UTC" in text
    assert Position.objects.get().quantity == 10


def test_sync_now_for_the_chosen_account_from_accounts(syncing_staff, use_gateway):
    use_gateway.accounts = ("U1111111", "U2222222")

    response = client_for(syncing_staff).post(
        SYNC_NOW, {"ibkr_account_id": "U2222222", "next": changelist(Account)}
    )

    assert response.status_code == 302
    assert response["Location"] == changelist(Account)
    assert use_gateway.calls == ["U2222222"]
    assert SyncRun.objects.get().account_filter == "U2222222"


def test_a_gateway_failure_is_shown_on_the_page_it_came_from(admin_client, use_gateway):
    use_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at 127.0.0.1:4999")

    response = admin_client.post(SYNC_NOW, {"next": changelist(Position)}, follow=True)

    assert response.redirect_chain == [(changelist(Position), 302)]
    assert messages_of(response) == [
        (message_levels.ERROR, "Sync failed: Cannot connect to the IB gateway at 127.0.0.1:4999")
    ]
    assert "Sync failed: Cannot connect to the IB gateway at 127.0.0.1:4999" in response.text
    assert SyncRun.objects.get().status == "failed"


@pytest.mark.parametrize("target", ["https://evil.example.com/admin/", "//evil.example.com/"])
def test_sync_now_never_redirects_off_site(admin_client, use_gateway, target):
    response = admin_client.post(SYNC_NOW, {"next": target})

    assert response.status_code == 302
    assert response["Location"] == changelist(SyncRun)


def test_without_the_permission_the_post_is_refused(browsing_staff, use_gateway):
    response = client_for(browsing_staff).post(SYNC_NOW, {"next": changelist(Position)})

    assert response.status_code == 403
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_the_form_from_the_positions_page_passes_csrf_and_a_forged_post_does_not(
    syncing_staff, use_gateway
):
    client = Client(enforce_csrf_checks=True)
    client.force_login(syncing_staff)
    page = client.get(changelist(Position)).text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', FORM.search(page).group())

    assert client.post(SYNC_NOW, {"next": changelist(Position)}).status_code == 403
    assert use_gateway.calls == []

    response = client.post(
        SYNC_NOW, {"next": changelist(Position), "csrfmiddlewaretoken": token.group(1)}
    )
    assert response.status_code == 302
    assert use_gateway.calls == [None]


# --- status filter -------------------------------------------------------------------------


def status_choices(html: str) -> list[tuple[str, str, bool]]:
    """(label, query string, selected) of the status filter in the changelist sidebar."""
    block = re.search(r'<details data-filter-title="status".*?</details>', html, re.S).group()
    items = re.findall(r'<li([^>]*)>\s*<a href="([^"]*)"[^>]*>([^<]*)</a>', block)
    return [
        (label.strip(), href.replace("&amp;", "&"), "selected" in cls) for cls, href, label in items
    ]


def test_status_filter_defaults_to_open_and_offers_closed_and_all(admin_client, portfolio):
    response = admin_client.get(changelist(Position))

    assert sorted(listed(response)) == ["AAPL", "SAP"]
    assert status_choices(response.text) == [
        ("Open", "?status=open", True),
        ("Closed", "?status=closed", False),
        ("All", "?status=all", False),
    ]
    closed = admin_client.get(changelist(Position) + "?status=closed")
    assert listed(closed) == ["TSLA"]
    assert [c[2] for c in status_choices(closed.text)] == [False, True, False]


def test_status_filter_with_facet_counts(admin_client, portfolio):
    page = admin_client.get(changelist(Position) + "?_facets=True").text

    assert [label for label, _, _ in status_choices(page)] == ["Open (2)", "Closed (1)", "All (3)"]


# --- links to positions --------------------------------------------------------------------


def test_account_pages_link_to_the_accounts_positions(admin_client, portfolio):
    account = Account.objects.get(external_id="U1111111")
    link = f'href="{changelist(Position)}?account__id__exact={account.pk}"'

    assert link in admin_client.get(changelist(Account)).text
    assert link in admin_client.get(change(account)).text

    positions = admin_client.get(f"{changelist(Position)}?account__id__exact={account.pk}")
    assert listed(positions) == ["AAPL"], "its open positions; TSLA is closed"
    everything = f"{changelist(Position)}?account__id__exact={account.pk}&status=all"
    assert sorted(listed(admin_client.get(everything))) == ["AAPL", "TSLA"]


def test_instrument_pages_link_to_the_instruments_positions(admin_client, portfolio):
    tsla = Instrument.objects.get(symbol="TSLA")
    link = f'href="{changelist(Position)}?instrument__id__exact={tsla.pk}"'

    assert link in admin_client.get(changelist(Instrument)).text
    assert link in admin_client.get(change(tsla)).text

    url = f"{changelist(Position)}?instrument__id__exact={tsla.pk}"
    assert listed(admin_client.get(url)) == []
    assert listed(admin_client.get(url + "&status=closed")) == ["TSLA"]


# --- never inside a request-wide transaction ---------------------------------------------------


def test_sync_now_opts_out_of_atomic_requests():
    """As the API's view: with ATOMIC_REQUESTS on, a request-wide transaction would hide
    the SyncRun lock from other processes and roll back the record of a failed sync."""
    assert "default" in resolve(SYNC_NOW).func._non_atomic_requests


@pytest.fixture
def atomic_requests():
    settings_dict = connection.settings_dict
    saved = settings_dict["ATOMIC_REQUESTS"]
    settings_dict["ATOMIC_REQUESTS"] = True
    yield
    settings_dict["ATOMIC_REQUESTS"] = saved


class TransactionProbe(FakeGateway):
    """Notes, as the sync reads the gateway, whether a transaction is open around it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_transaction: list[bool] = []

    def fetch_positions(self, account_id=None):
        self.in_transaction.append(connection.in_atomic_block)
        return super().fetch_positions(account_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("entry", ["admin", "api"])
def test_with_atomic_requests_on_the_sync_runs_outside_any_transaction(
    admin_user, settings, atomic_requests, entry
):
    probe = TransactionProbe(positions=[position()])
    client = Client()
    client.force_login(admin_user)

    with reading_from(probe, settings):
        if entry == "admin":
            response = client.post(SYNC_NOW, {"next": changelist(Position)})
            assert response.status_code == 302
        else:
            assert client.post("/portfolio/sync/ibkr").status_code == 200

    assert probe.in_transaction == [False], "the lock row was committed before the read"
    assert SyncRun.objects.get().status == SyncRun.Status.SUCCESS
