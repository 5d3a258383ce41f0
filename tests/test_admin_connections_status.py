"""State per connection in the admin: the sync history's connection column, filter and
search, a run's connection on its page, the status panel's line per connection (on the
sync history and the overview), and which connection last reported each account on the
overview. In a fixed number of queries, and only to those who may view sync runs."""

import datetime as dt
import re

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from ibkr_sync.exceptions import GatewayUnavailable, IbkrSyncError, NoManagedAccounts
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.services import sync_positions
from tests.conftest import FakeGateway, position
from tests.test_admin import change, changelist, client_for
from tests.test_admin_overview import OVERVIEW, OVERVIEW_MAX_QUERIES, overview
from tests.test_health import run

pytestmark = pytest.mark.django_db

HISTORY = changelist(SyncRun)


@pytest.fixture
def home():
    return Connection.objects.create(name="home", host="gw-home.example", port=4001)


@pytest.fixture
def office():
    return Connection.objects.create(name="office", host="gw-office.example", port=4002)


def sync(connection, account="U1111111", fails=None) -> SyncRun:
    """A sync of `connection` through the service, as every entry point runs one; `fails`:
    the error its gateway fails with."""
    gateway = FakeGateway(accounts=(account,), positions=[position(account=account)], error=fails)
    try:
        sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway, connection=connection)
    except IbkrSyncError:
        if fails is None:
            raise
    return SyncRun.objects.filter(connection_name=connection.name).latest("started_at")


def reported(account, connection, as_of=None):
    """The account's report as a sync of `connection` at `as_of` leaves it (the sync
    before wrote one: set to the moment the test needs)."""
    report, _ = AccountReport.objects.update_or_create(
        broker="ibkr",
        external_id=account,
        defaults={
            "connection": connection,
            "connection_name": connection.name,
            "source": "tws",
            "as_of": as_of or timezone.now() - dt.timedelta(minutes=3),
            "applied_at": timezone.now(),
        },
    )
    return report


def held(connection, seconds) -> SyncRun:
    run = SyncRun.objects.create(
        trigger="command",
        connection=connection,
        connection_name=connection.name,
        lock_key=connection.lock_key,
    )
    SyncRun.objects.filter(pk=run.pk).update(
        started_at=timezone.now() - dt.timedelta(seconds=seconds), heartbeat_at=timezone.now()
    )
    return run


def panel(html: str) -> str:
    found = re.search(r'<div id="ibkr-sync-status".*?</div>', html, re.S)
    assert found, "no status panel"
    return found.group(0)


def lines(html: str) -> dict[str, str]:
    """The panel's line per connection, its text without tags and runs of spaces."""
    found = re.findall(
        r'<li class="ibkr-last-sync" data-connection="([^"]+)">(.*?)</li>', html, re.S
    )
    return {name: " ".join(re.sub(r"<[^>]+>", "", text).split()) for name, text in found}


# --- the sync history -------------------------------------------------------------------------


def test_the_history_names_each_runs_connection_and_filters_on_it(admin_client, home, office):
    first = sync(home)
    second = sync(office, "U2222222")
    before = run(ago=dt.timedelta(minutes=5))  # of the settings' gateway

    html = admin_client.get(HISTORY).text

    column = re.findall(r'<td class="field-connection_display">([^<]*)</td>', html)
    assert column == ["office", "home", "-"]
    assert f"?connection__id__exact={home.pk}" in html  # the filter's choice

    filtered = admin_client.get(HISTORY, {"connection__id__exact": office.pk})
    assert [run.pk for run in filtered.context["cl"].result_list] == [second.pk]
    searched = admin_client.get(HISTORY, {"q": "home"})
    assert [run.pk for run in searched.context["cl"].result_list] == [first.pk]
    gateway_only = admin_client.get(HISTORY, {"connection__isnull": "True"})
    assert [run.pk for run in gateway_only.context["cl"].result_list] == [before.pk]


def test_a_runs_page_names_its_connection_kept_after_it_is_removed(admin_client, home):
    run = sync(home)
    assert re.search(
        r"Connection:</label>\s*<div[^>]*>home</div>", admin_client.get(change(run)).text
    )

    home.delete()
    run.refresh_from_db()
    assert run.connection is None
    assert re.search(
        r"Connection:</label>\s*<div[^>]*>home</div>", admin_client.get(change(run)).text
    )


def test_a_run_of_the_settings_gateway_has_no_connection_row(admin_client):
    assert "Connection:</label>" not in admin_client.get(change(run())).text


def test_a_runs_page_lists_the_accounts_it_refused(admin_client, home):
    run = sync(home)
    SyncRun.objects.filter(pk=run.pk).update(
        accounts_refused={"U2222222": "a newer snapshot (from office) was applied already"}
    )

    html = admin_client.get(change(run)).text

    assert "Accounts refused:</label>" in html
    assert "<strong>U2222222</strong>: a newer snapshot (from office) was applied already" in html


def test_the_history_shows_the_status_panel_per_connection(admin_client, home, office):
    sync(home)
    sync(office, "U2222222")
    failed = sync(office, "U2222222", fails=GatewayUnavailable("Cannot connect to gw-office"))

    html = panel(admin_client.get(HISTORY).text)

    states = lines(html)
    assert list(states) == ["home", "office"]
    assert states["home"].startswith("home: last successful IBKR sync #")
    assert "latest failed: unreachable" in states["office"]
    assert f"#{failed.pk}</a>" in html
    assert "its gateway could not be reached" in html


def test_the_history_without_connections_shows_todays_single_line(admin_client):
    run(ago=dt.timedelta(minutes=5))

    html = panel(admin_client.get(HISTORY).text)

    assert "Last successful IBKR sync:" in html
    assert "ibkr-connection-states" not in html


# --- the status panel -------------------------------------------------------------------------


def test_each_connection_says_whether_its_gateway_is_logged_out_or_its_lock_is_held(
    admin_client, settings, home, office
):
    settings.IBKR_CONNECT_TIMEOUT, settings.IBKR_REQUEST_TIMEOUT = 5, 10
    settings.IBKR_SYNC_LOCK_TIMEOUT, settings.IBKR_READ_VALUES = 30, False  # 45 s
    spare = Connection.objects.create(name="spare", port=4003)
    sync(home)
    sync(office, fails=NoManagedAccounts("gw-office.example manages no account"))
    stuck = held(home, seconds=120)
    sync(spare, fails=GatewayUnavailable("Cannot connect to the spare gateway"))
    spare.enabled = False  # since
    spare.save()

    html = panel(overview(admin_client).text)

    states = lines(html)
    assert list(states) == ["home", "office", "spare"]
    assert "A sync is running (for 1" in states["home"]
    assert "no successful IBKR sync yet (latest failed: logged out)" in states["office"]
    assert states["spare"].startswith("spare (disabled):")
    warnings = re.findall(r'<li class="warning" data-connection="([^"]+)">', html)
    assert warnings == ["home", "office"]  # a disabled connection warns of nothing
    assert f"#{stuck.pk}</a>, has held its lock for 1" in html
    assert "longer than a sync can take (45 s): it still renews it." in html
    assert "its gateway is not logged in to IBKR" in html


def test_the_panel_takes_the_same_queries_however_many_connections(
    admin_client, django_assert_max_num_queries
):
    for index in range(12):
        connection = Connection.objects.create(name=f"c{index:02}", port=4000 + index)
        sync(connection, f"U{index + 1:07}")
        held(connection, seconds=2)
    overview(admin_client)  # warm the session and content-type caches

    # The overview's, with the panel's: the latest sync (with whether connections exist),
    # the connections with their runs' ids, and those runs.
    with django_assert_max_num_queries(OVERVIEW_MAX_QUERIES + 1):
        html = overview(admin_client).text

    assert len(lines(panel(html))) == 12


def test_the_panel_is_sync_run_data(django_user_model, home):
    sync(home)
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_position"))

    html = client_for(user).get(OVERVIEW).text

    assert "ibkr-sync-status" not in html
    assert "home" not in html


# --- the overview: which connection last reported each account -------------------------------


def test_each_account_says_which_connection_last_reported_it(admin_client, home, office):
    sync(home, "U1111111")
    sync(office, "U2222222")
    as_of = timezone.now() - dt.timedelta(minutes=7)
    reported("U1111111", home, as_of)
    reported("U2222222", office)
    office.name = "office-2"  # renamed since: its name now
    office.save()

    response = overview(admin_client)

    summaries = {a.external_id: a for a in response.context["overview"].accounts}
    assert summaries["U1111111"].reported_by == "home"
    assert summaries["U1111111"].reported_as_of == as_of
    assert summaries["U2222222"].reported_by == "office-2"
    html = response.text
    said = re.search(
        r'data-connection="home">Last reported by connection <strong>home</strong> \(as of '
        rf'<time datetime="{re.escape(as_of.isoformat())}">([^<]*)</time>\)\.</p>',
        html,
    )
    assert said, html
    # A time that ends in "p.m." is not followed by a second full stop.
    assert not re.search(r"\.\.|\.\.</p>", said.group(0))
    assert 'data-connection="office-2">Last reported by connection' in html


def test_a_removed_connection_is_named_as_it_was(admin_client, home):
    sync(home, "U1111111")
    reported("U1111111", home)
    home.delete()

    response = overview(admin_client)

    assert response.context["overview"].accounts[0].reported_by == "home"


def test_which_connection_reported_an_account_is_sync_run_data(django_user_model, home):
    sync(home, "U1111111")
    reported("U1111111", home)
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_position"))

    html = client_for(user).get(OVERVIEW).text

    assert "U1111111" in html
    assert "Last reported by" not in html

    user.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    assert (
        "Last reported by connection <strong>home</strong>" in client_for(user).get(OVERVIEW).text
    )


def test_reports_add_no_query_to_the_overview(admin_client, django_assert_max_num_queries):
    """Without connections, the overview's queries are as they were, reports or not."""
    gateway = FakeGateway(accounts=("U1111111",), positions=[position()])
    sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    overview(admin_client)

    with django_assert_max_num_queries(OVERVIEW_MAX_QUERIES - 1):  # the last sync succeeded
        response = overview(admin_client)

    assert response.context["overview"].accounts[0].reported_by == ""
    assert "Last reported by" not in response.text


def test_the_owner_of_a_logged_out_gateway_is_told_to_log_in_on_the_connections_pages(
    django_user_model, home, office
):
    """IB Gateway asks for a login once a week: the connections list and the connection's
    page tell whoever sees the connection (its owner) to log in again; another user who
    does not see it is told nothing of it."""
    from django.test import Client

    owner = django_user_model.objects.create_user("owner", password="pw-owner-1", is_staff=True)
    other = django_user_model.objects.create_user("other", password="pw-other-1", is_staff=True)
    codes = ["view_connection", "view_syncrun"]
    for user in (owner, other):
        user.user_permissions.add(*Permission.objects.filter(codename__in=codes))
    Connection.objects.filter(pk__in=[home.pk, office.pk]).update(owner=owner)
    failed = sync(office, fails=NoManagedAccounts("gw-office.example manages no account"))
    sync(home, fails=GatewayUnavailable("Cannot connect to the home gateway"))

    def warnings(user, url):
        browser = Client()
        browser.force_login(user)
        response = browser.get(url)
        assert response.status_code == 200
        return [str(m) for m in response.context["messages"] if m.level_tag == "warning"]

    said = warnings(owner, changelist(Connection))
    assert said == [
        f"Connection office: its IB gateway is not logged in to IBKR (sync #{failed.pk} "
        "failed so). Log in to TWS / IB Gateway again: IBKR asks for a login once a week, "
        "and no sync reads anything until then."
    ]  # an unreachable gateway (home) is not a login to do
    assert warnings(owner, change(office)) == said
    assert warnings(owner, change(home)) == []
    assert warnings(other, changelist(Connection)) == []
