"""Users own their connections: a connection's accounts, what is under them and its syncs
are its owner's, an unowned connection's everyone's, and every one's to a user with
`ibkr_sync.view_all_connections` (a superuser has it). On every read endpoint, every admin
page, the health check's names and every way a user starts a sync.

The rows are written by the real service and writer, one sync per connection: alice's
connection reports U1000001, bob's U2000002, the unowned `shared` U3000003; U4000004 was
synced from the settings' gateway before any connection existed. The same over TCP, with
a simulator per connection: tests/integration/test_ownership_gateways.py.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.db import connection as db_connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from rest_framework.test import APIClient

from ibkr_sync import visibility
from ibkr_sync.models import AccountReport, Connection, PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.snapshot import AccountValues, PositionValue, Snapshot
from portfolio.models import Account, AccountSnapshot, CashBalance, Instrument, Position
from tests.conftest import FakeGateway, position, reading_from

pytestmark = pytest.mark.django_db

NOON = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ALL = {"U1000001", "U2000002", "U3000003", "U4000004"}
# Who sees which accounts, and which connections' runs ("" the settings' gateway's).
SEES = {
    "alice": {"U1000001", "U3000003", "U4000004"},
    "bob": {"U2000002", "U3000003", "U4000004"},
    "carol": {"U3000003", "U4000004"},
    "auditor": ALL,
    "root": ALL,
}
RUNS = {
    "alice": {"", "alice", "shared"},
    "bob": {"", "bob", "shared"},
    "carol": {"", "shared"},
    "auditor": {"", "alice", "bob", "shared"},
    "root": {"", "alice", "bob", "shared"},
}
CONNECTIONS = {
    "alice": {"alice", "shared"},
    "bob": {"bob", "shared"},
    "carol": {"shared"},
    "auditor": {"alice", "bob", "shared"},
    "root": {"alice", "bob", "shared"},
}
VIEW = [
    "view_account", "view_position", "view_cashbalance", "view_accountsnapshot",
    "view_instrument", "view_syncrun", "view_connection", "run_sync",
]  # fmt: skip


class Statement:
    """A source whose snapshot is one account's position and values."""

    def __init__(self, account: str, con_id: int, as_of: dt.datetime = NOON) -> None:
        self.account = account
        self.con_id = con_id
        self.as_of = as_of

    def fetch_positions(self, account_id=None) -> Snapshot:
        held = position(account=self.account, con_id=self.con_id, symbol=f"S{self.con_id}")
        values = AccountValues(
            self.account,
            as_of=self.as_of,
            base_currency="USD",
            totals={"net_liquidation": Decimal("1000.5")},
            cash={"USD": Decimal(7)},
            exchange_rates={"USD": Decimal(1)},
            positions={
                self.con_id: PositionValue(
                    self.con_id, held.quantity, Decimal(2), Decimal(20), None, None
                )
            },
        )
        return Snapshot(
            accounts=(self.account,),
            positions=(held,),
            source="statement",
            as_of=self.as_of,
            values_read=True,
            account_values={self.account: values},
        )


def sync(account: str, con_id: int, connection: str | None = None, **options):
    source = Statement(account, con_id, **options)
    return sync_positions(trigger="command", gateway=source, connection=connection)


def staff(django_user_model, name: str, *extra: str, **fields):
    user = django_user_model.objects.create_user(
        name, password=f"pw-{name}-123", is_staff=True, **fields
    )
    user.user_permissions.add(*Permission.objects.filter(codename__in=[*VIEW, *extra]))
    return user


@pytest.fixture
def users(django_user_model):
    return {
        "alice": staff(django_user_model, "alice"),
        "bob": staff(django_user_model, "bob"),
        "carol": staff(django_user_model, "carol"),
        "auditor": staff(django_user_model, "auditor", "view_all_connections"),
        "root": django_user_model.objects.create_superuser("root", password="pw-root-123"),
    }


@pytest.fixture
def world(users):
    """The four accounts, each with a position, cash, a snapshot and a change, by the real
    writer; a run per connection and one of the settings' gateway."""
    cache.clear()  # the sync budgets
    sync("U4000004", 4)  # no connection yet: the settings' gateway
    Connection.objects.create(name="alice", owner=users["alice"], client_id=11)
    Connection.objects.create(name="bob", owner=users["bob"], client_id=12)
    Connection.objects.create(name="shared", client_id=13)
    sync("U1000001", 1, "alice")
    sync("U2000002", 2, "bob")
    sync("U3000003", 3, "shared")
    assert dict(AccountReport.objects.values_list("external_id", "connection_name")) == {
        "U1000001": "alice",
        "U2000002": "bob",
        "U3000003": "shared",
        "U4000004": "",
    }
    assert PositionChange.objects.count() == 4 and CashBalance.objects.count() == 4
    return users


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def account_ids(user) -> set[str]:
    return {row["external_id"] for row in api(user).get("/portfolio/accounts").json()["results"]}


def accounts_in(rows: list[dict]) -> set[str]:
    return {row["account"] for row in rows}


NAMES = list(SEES)


# --- the one filter ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_filter_answers_every_kind_of_row(world, name):
    user = world[name]
    accounts = visibility.visible(Account.objects.all(), user, "")
    assert set(accounts.values_list("external_id", flat=True)) == SEES[name]
    for model in (Position, CashBalance, AccountSnapshot):
        rows = visibility.visible(model.objects.all(), user)
        assert set(rows.values_list("account__external_id", flat=True)) == SEES[name]
    changes = visibility.visible(PositionChange.objects.all(), user, "position__account")
    assert set(changes.values_list("position__account__external_id", flat=True)) == SEES[name]
    runs = visibility.visible_runs(SyncRun.objects.all(), user)
    assert set(runs.values_list("connection_name", flat=True)) == RUNS[name]
    connections = visibility.visible_connections(user)
    assert set(connections.values_list("name", flat=True)) == CONNECTIONS[name]


def test_the_filter_is_part_of_the_rows_query(world, django_assert_num_queries):
    alice = world["alice"]
    alice.get_all_permissions()  # read once per request, as Django caches them
    with django_assert_num_queries(1):
        assert len(list(visibility.visible(Position.objects.all(), alice))) == 3
    with django_assert_num_queries(1):
        assert len(list(visibility.visible_runs(SyncRun.objects.all(), alice))) == 3


def test_an_anonymous_user_sees_only_what_no_owner_has(world):
    from django.contrib.auth.models import AnonymousUser

    anonymous = AnonymousUser()
    accounts = visibility.visible(Account.objects.all(), anonymous, "")
    assert set(accounts.values_list("external_id", flat=True)) == {"U3000003", "U4000004"}


# --- the read API -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_read_list_shows_the_users_accounts_only(world, name):
    client = api(world[name])
    accounts = client.get("/portfolio/accounts").json()["results"]
    assert {row["external_id"] for row in accounts} == SEES[name]
    for path in ("/portfolio/positions", "/portfolio/cash", "/portfolio/positions?status=open"):
        rows = client.get(path).json()["results"]
        assert accounts_in(rows) == SEES[name], path
    # The past, rebuilt from the change log: of the same accounts.
    now = dt.datetime.now(dt.UTC).isoformat()
    answer = client.get("/portfolio/positions", {"as_of": now}).json()
    assert answer["complete"] is True, answer
    assert accounts_in(answer["results"]) == SEES[name]
    runs = client.get("/portfolio/sync/runs").json()["results"]
    assert {row["connection"] or "" for row in runs} == RUNS[name]


@pytest.mark.parametrize("name", NAMES)
def test_a_detail_of_someone_elses_row_is_404_as_one_that_does_not_exist(world, name):
    client = api(world[name])
    for account in sorted(ALL):
        response = client.get(f"/portfolio/accounts/{account}/history")
        if account in SEES[name]:
            assert response.status_code == 200
            assert [row["net_liquidation"] for row in response.json()["results"]] == ["1000.5"]
        else:
            assert response.status_code == 404
            missing = client.get("/portfolio/accounts/U9999999/history").json()
            assert response.json()["code"] == missing["code"] == "not_found"
            assert response.json()["detail"] == missing["detail"].replace("U9999999", account)
    for run in SyncRun.objects.all():
        response = client.get(f"/portfolio/sync/runs/{run.pk}")
        assert response.status_code == (200 if run.connection_name in RUNS[name] else 404)


def test_filtering_on_someone_elses_account_finds_nothing(world):
    client = api(world["alice"])
    assert client.get("/portfolio/positions", {"account": "U2000002"}).json()["results"] == []
    assert client.get("/portfolio/cash", {"account": "U2000002"}).json()["results"] == []
    mine = client.get("/portfolio/positions", {"account": "U1000001"}).json()["results"]
    assert accounts_in(mine) == {"U1000001"}


# --- the admin --------------------------------------------------------------------------------


def changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change(model, pk) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[pk])


def result_rows(response) -> list:
    return list(response.context["cl"].result_list)


@pytest.mark.parametrize("name", NAMES)
def test_every_admin_list_and_page_shows_the_users_rows_only(world, name):
    client = browser(world[name])
    response = client.get(changelist(Account))
    assert {a.external_id for a in result_rows(response)} == SEES[name]
    for model in (Position, CashBalance, AccountSnapshot):
        response = client.get(changelist(model), {"status": "all"} if model is Position else {})
        assert response.status_code == 200
        assert {row.account.external_id for row in result_rows(response)} == SEES[name]
        # The account filter offers the accounts the user may see, no other.
        html = response.content.decode()
        for account in ALL:
            assert (f"{account} (Interactive Brokers)" in html) == (account in SEES[name])
        for row in model.objects.all():
            page = client.get(change(model, row.pk))
            if row.account.external_id in SEES[name]:
                assert page.status_code == 200
            else:
                # The admin's answer for a row that does not exist: back to the index.
                assert page.status_code == 302 and page.url == reverse("admin:index")
    for account in Account.objects.all():
        page = client.get(change(Account, account.pk))
        assert page.status_code == (200 if account.external_id in SEES[name] else 302)


@pytest.mark.parametrize("name", NAMES)
def test_the_overview_shows_the_users_accounts_and_totals_only(world, name):
    response = browser(world[name]).get(reverse("admin:portfolio_overview"))
    overview = response.context["overview"]
    assert {a.external_id for a in overview.accounts} == SEES[name]
    # The totals by currency are the sum of theirs only: 10 shares per account.
    assert overview.positions == len(SEES[name])
    assert all(a.history is not None for a in overview.accounts)
    html = response.content.decode()
    for account in ALL - SEES[name]:
        assert account not in html
    lines = set(re.findall(r'class="ibkr-last-sync" data-connection="([^"]+)"', html))
    assert lines == CONNECTIONS[name]


@pytest.mark.parametrize("name", NAMES)
def test_the_sync_history_shows_the_users_runs_only(world, name):
    client = browser(world[name])
    response = client.get(changelist(SyncRun))
    assert {run.connection_name for run in result_rows(response)} == RUNS[name]
    html = response.content.decode()
    # The status panel's lines and the connection filter: the user's connections only.
    lines = set(re.findall(r'class="ibkr-last-sync" data-connection="([^"]+)"', html))
    assert lines == CONNECTIONS[name]
    offered = set(re.findall(r"connection__id__exact=\d+\"[^>]*>([^<]+)<", html))
    assert offered & {"alice", "bob", "shared"} == CONNECTIONS[name]
    for run in SyncRun.objects.all():
        page = client.get(change(SyncRun, run.pk))
        if run.connection_name in RUNS[name]:
            assert page.status_code == 200
            assert [c.position.account.external_id for c in page.context["changes"]] == [
                run.accounts[0]
            ]
        else:
            assert page.status_code == 302


@pytest.mark.parametrize("name", NAMES)
def test_the_connections_list_and_pages_are_the_users_only(world, name):
    client = browser(world[name])
    response = client.get(changelist(Connection))
    assert {c.name for c in result_rows(response)} == CONNECTIONS[name]
    for row in Connection.objects.all():
        page = client.get(change(Connection, row.pk))
        assert page.status_code == (200 if row.name in CONNECTIONS[name] else 302)


def test_only_a_user_who_sees_every_connection_assigns_owners(world):
    alice, auditor = world["alice"], world["auditor"]
    shared = Connection.objects.get(name="shared")
    alice.user_permissions.add(Permission.objects.get(codename="change_connection"))
    form = {
        "name": "shared", "kind": "tws", "enabled": "on", "owner": alice.pk, "note": "",
        "host": "127.0.0.1", "port": "7497", "client_id": "13",
    }  # fmt: skip
    mine = Connection.objects.get(name="alice")
    page = browser(alice).get(change(Connection, mine.pk))
    assert 'name="owner"' not in page.content.decode()
    browser(alice).post(
        change(Connection, mine.pk),
        {**form, "name": "alice", "client_id": "11", "owner": bob_pk(world), "note": "bob's?"},
    )
    mine.refresh_from_db()
    assert (mine.owner_id, mine.note) == (alice.pk, "bob's?")  # the note, not the owner
    # Someone else's connection: not even found.
    bob = Connection.objects.get(name="bob")
    response = browser(alice).post(change(Connection, bob.pk), {**form, "name": "bob"})
    assert response.status_code == 302
    bob.refresh_from_db()
    assert bob.owner.username == "bob"
    auditor.user_permissions.add(Permission.objects.get(codename="change_connection"))
    response = browser(auditor).post(change(Connection, shared.pk), form)
    assert response.status_code == 302
    shared.refresh_from_db()
    assert shared.owner_id == alice.pk


def bob_pk(world) -> int:
    return world["bob"].pk


GATEWAY_FORM = {
    "kind": "tws", "enabled": "on", "note": "", "port": "7497", "schedule": "",
    "schedule_enabled": "on",
}  # fmt: skip


def test_only_a_user_who_sees_every_connection_changes_or_removes_an_unowned_one(world):
    """An unowned connection's data is everyone's. A user who could change where it reads
    could point it at a server of their own, which reports whatever positions and account
    ids it likes, into accounts everyone sees: only a user who sees every connection
    changes or removes one. Others see it read-only, as they may still see it."""
    carol, auditor = world["carol"], world["auditor"]
    for user in (carol, auditor):
        user.user_permissions.add(
            *Permission.objects.filter(codename__in=["change_connection", "delete_connection"])
        )
    shared = Connection.objects.get(name="shared")
    to_mine = {**GATEWAY_FORM, "name": "shared", "host": "10.6.6.6", "client_id": "13"}

    page = browser(carol).get(change(Connection, shared.pk))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="host"' not in html and 'name="_save"' not in html
    assert "127.0.0.1" in html  # shown, read-only
    assert browser(carol).post(change(Connection, shared.pk), to_mine).status_code == 403
    delete = reverse("admin:ibkr_sync_connection_delete", args=[shared.pk])
    assert browser(carol).get(delete).status_code == 403
    assert browser(carol).post(delete, {"post": "yes"}).status_code == 403
    shared.refresh_from_db()
    assert (shared.host, shared.owner_id) == ("127.0.0.1", None)

    # A connection of her own she changes as before.
    own = Connection.objects.create(name="carols", owner=carol, client_id=31)
    form = {**GATEWAY_FORM, "name": "carols", "host": "10.0.0.31", "client_id": "31"}
    assert browser(carol).post(change(Connection, own.pk), form).status_code == 302
    own.refresh_from_db()
    assert own.host == "10.0.0.31"

    # A user who sees every connection changes and removes an unowned one.
    response = browser(auditor).post(change(Connection, shared.pk), {**to_mine, "host": "gw"})
    assert response.status_code == 302
    shared.refresh_from_db()
    assert shared.host == "gw"
    assert browser(auditor).post(delete, {"post": "yes"}).status_code == 302
    assert not Connection.objects.filter(name="shared").exists()


def test_an_unowned_flex_connections_query_and_token_are_not_changed_by_others(world):
    carol = world["carol"]
    carol.user_permissions.add(Permission.objects.get(codename="change_connection"))
    flex = Connection(name="statements", kind="flex", flex_query_id="123456", client_id=15)
    flex.set_flex_token("1" * 24)
    flex.save()
    stored = flex.flex_token
    form = {
        "name": "statements", "kind": "flex", "enabled": "on", "note": "", "client_id": "15",
        "flex_query_id": "999999", "new_flex_token": "2" * 24, "schedule": "",
        "schedule_enabled": "on",
    }  # fmt: skip

    assert browser(carol).post(change(Connection, flex.pk), form).status_code == 403

    flex.refresh_from_db()
    assert (flex.flex_query_id, flex.flex_token) == ("123456", stored)


def test_a_connection_a_user_adds_is_theirs_unless_they_assign_owners(world):
    from django.urls import reverse

    alice, auditor = world["alice"], world["auditor"]
    for user in (alice, auditor):
        user.user_permissions.add(Permission.objects.get(codename="add_connection"))
    form = {
        "kind": "tws", "enabled": "on", "note": "", "host": "127.0.0.1", "port": "7497",
        "schedule": "", "schedule_enabled": "on",
    }  # fmt: skip
    add = reverse("admin:ibkr_sync_connection_add")
    response = browser(alice).post(add, {**form, "name": "alices-2nd", "client_id": "21"})
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Connection.objects.get(name="alices-2nd").owner == alice
    browser(auditor).post(add, {**form, "name": "unowned", "client_id": "22", "owner": ""})
    assert Connection.objects.get(name="unowned").owner is None


def test_testing_someone_elses_connection_is_refused_as_unknown(world):
    alice = world["alice"]
    bob = Connection.objects.get(name="bob")
    url = reverse("admin:ibkr_sync_connection_test", args=[bob.pk])
    assert browser(alice).post(url).status_code == 404


@pytest.mark.parametrize("name", NAMES)
def test_the_health_check_names_the_users_connections_only(world, name):
    answer = browser(world[name]).get("/healthz").json()
    named = {entry["name"] for entry in answer["connections"] if "name" in entry}
    assert named == CONNECTIONS[name]
    # Everyone reads every connection's state by id, as before.
    assert len(answer["connections"]) == 3


# --- starting a sync --------------------------------------------------------------------------


@pytest.fixture
def gateway(world, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "1/minute"
    fake = FakeGateway(positions=[position(account="U1000001", con_id=1)], accounts=["U1000001"])
    with reading_from(fake, settings):
        yield fake


def test_someone_elses_connection_answers_404_before_the_budget_is_taken(gateway, world):
    client = api(world["alice"])
    runs = SyncRun.objects.count()
    refused = client.post("/portfolio/sync/ibkr?connection=bob")
    missing = client.post("/portfolio/sync/ibkr?connection=nobody")
    assert refused.status_code == missing.status_code == 404
    assert refused.json()["code"] == "unknown_connection"
    assert refused.json()["detail"] == missing.json()["detail"].replace("nobody", "bob")
    assert SyncRun.objects.count() == runs and gateway.calls == []
    # The one sync a minute is still there, for alice's own connection.
    assert client.post("/portfolio/sync/ibkr?connection=alice").status_code == 200
    assert gateway.calls == [None]
    assert client.post("/portfolio/sync/ibkr?connection=alice").status_code == 429


def test_unowned_connections_are_everyones_to_sync(gateway, world):
    response = api(world["carol"]).post("/portfolio/sync/ibkr?connection=shared")
    assert response.status_code == 200
    assert response.json()["connection"] == "shared"


def test_a_user_who_sees_every_connection_syncs_any(gateway, world):
    response = api(world["auditor"]).post("/portfolio/sync/ibkr?connection=alice")
    assert response.status_code == 200


def test_without_a_name_the_choice_lists_the_users_connections_only(gateway, world):
    answer = api(world["carol"]).post("/portfolio/sync/ibkr").json()
    assert answer["code"] == "connection_required"
    assert "(shared)" in answer["detail"] and "alice" not in answer["detail"]


def test_the_only_connection_being_someone_elses_is_not_synced(gateway, world):
    Connection.objects.exclude(name="bob").delete()
    response = api(world["alice"]).post("/portfolio/sync/ibkr")
    assert response.status_code == 404
    assert response.json()["code"] == "unknown_connection"
    assert "bob" not in response.json()["detail"]
    assert gateway.calls == []


SYNC_NOW = reverse("admin:ibkr_sync_syncrun_sync_now")


def test_sync_now_offers_and_syncs_the_users_connections_only(gateway, world):
    client = browser(world["alice"])
    html = client.get(changelist(Position)).content.decode()
    form = re.search(rf'<form method="post" action="{SYNC_NOW}".*?</form>', html, re.S)[0]
    assert re.findall(r'<option value="([^"]*)"', form) == [
        "alice", "shared", "", "U1000001", "U3000003", "U4000004",
    ]  # fmt: skip
    response = client.post(SYNC_NOW, {"connection": "bob"}, follow=True)
    [message] = list(response.context["messages"])
    assert message.message == "Sync not started: No IBKR connection is named 'bob'; " \
        "`manage.py ibkr_connection list` lists them."  # fmt: skip
    assert gateway.calls == []
    response = client.post(SYNC_NOW, {"connection": "alice"}, follow=True)
    [message] = list(response.context["messages"])
    assert "of connection alice finished" in message.message
    assert gateway.calls == [None]


def test_the_command_is_the_operators_and_syncs_any_connection(gateway, world):
    from io import StringIO

    from django.core.management import call_command

    call_command("sync_ibkr", "--connection", "alice", stdout=StringIO())
    assert gateway.calls == [None]


# --- an account changes hands; a connection goes -------------------------------------------


def test_an_account_is_its_current_connections(world):
    """An account two connections of one owner report is recorded with the one whose
    snapshot of it was applied last; an older snapshot is refused. An account no owner
    has (an unowned connection's, the settings' gateway's) is taken by the owner whose
    connection reports it next: it is theirs from then on."""
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    Connection.objects.create(name="alice-adviser", owner=alice, client_id=14)
    sync("U1000001", 1, "alice-adviser", as_of=NOON + dt.timedelta(hours=1))
    assert AccountReport.objects.get(external_id="U1000001").connection_name == "alice-adviser"
    assert "U1000001" in account_ids(alice) and "U1000001" not in account_ids(bob)
    # An older snapshot from alice's other connection is refused, and changes nothing.
    refused = sync("U1000001", 1, "alice")
    assert list(refused.accounts_refused) == ["U1000001"]
    assert "reported it as of" in refused.accounts_refused["U1000001"]
    assert AccountReport.objects.get(external_id="U1000001").connection_name == "alice-adviser"
    # The unowned connection's account, reported by bob's: bob's now.
    sync("U3000003", 3, "bob", as_of=NOON + dt.timedelta(hours=1))
    assert "U3000003" in account_ids(bob)
    assert "U3000003" not in account_ids(alice) | account_ids(carol)


def test_a_removed_connections_data_is_only_for_those_who_see_all(world):
    Connection.objects.filter(name="alice").delete()
    seen = {name: account_ids(user) for name, user in world.items()}
    assert "U1000001" not in seen["alice"] | seen["bob"] | seen["carol"]
    assert "U1000001" in seen["auditor"] & seen["root"]
    answer = api(world["carol"]).get("/portfolio/sync/runs").json()
    runs = {row["connection"] for row in answer["results"]}
    assert "alice" not in runs


def test_a_removed_connections_accounts_stay_their_owners(world):
    """An account keeps its owner when its connection is removed (its report records it):
    another user's connection, pointed at a gateway that reports its id, is refused, and
    nothing of the account (its history, positions, cash) becomes the claimant's. Only a
    connection of the same owner writes it again, which shows it to them again."""
    alice, bob, carol = world["alice"], world["bob"], world["carol"]
    bobs_positions = list(Position.objects.filter(account__external_id="U2000002").values())
    Connection.objects.filter(name="bob").delete()
    report = AccountReport.objects.get(external_id="U2000002")
    assert (report.connection_id, report.owner_id, report.owned) == (None, bob.pk, True)

    later = NOON + dt.timedelta(hours=1)
    for claimant in ("alice", "shared"):
        taken = sync("U2000002", 9, claimant, as_of=later)
        assert taken.accounts_refused == {"U2000002": NOT_YOURS.format("U2000002")}
    report.refresh_from_db()
    assert (report.connection_name, report.owner_id) == ("bob", bob.pk)
    assert list(Position.objects.filter(account__external_id="U2000002").values()) == (
        bobs_positions
    )
    for user in (alice, bob, carol):
        assert "U2000002" not in account_ids(user)
        client = api(user)
        assert client.get("/portfolio/accounts/U2000002/history").status_code == 404
        for path in ("/portfolio/positions", "/portfolio/cash"):
            assert "U2000002" not in accounts_in(client.get(path).json()["results"])
    assert "U2000002" in account_ids(world["auditor"])

    # A connection of bob's takes it back, and he sees it again.
    Connection.objects.create(name="bobs-new", owner=bob, client_id=22)
    assert sync("U2000002", 2, "bobs-new", as_of=later).accounts_refused == {}
    assert "U2000002" in account_ids(bob) and "U2000002" not in account_ids(alice)

    # An unowned connection's account, removed with it, was everyone's: any connection
    # still takes it, as before.
    Connection.objects.filter(name="shared").delete()
    assert AccountReport.objects.get(external_id="U3000003").owned is False
    assert sync("U3000003", 3, "alice", as_of=later).accounts_refused == {}
    assert "U3000003" in account_ids(alice) and "U3000003" not in account_ids(carol)


class GivenAwayWhileRead(Statement):
    """A source during whose read the connection is given to another owner (a user who
    sees every connection saves its page while it syncs)."""

    def __init__(self, account: str, con_id: int, connection: str, owner, **options) -> None:
        super().__init__(account, con_id, **options)
        self.connection, self.owner = connection, owner

    def fetch_positions(self, account_id=None) -> Snapshot:
        row = Connection.objects.get(name=self.connection)
        row.owner = self.owner
        row.save()
        return super().fetch_positions(account_id)


def test_a_connection_given_to_another_owner_while_it_syncs_writes_as_its_new_owners(world):
    """The owner a sync writes as is the connection's as the write finds it (its row
    locked for the write, its name read then too), not the one it had when the sync
    began: a sync of alice's second connection, given to bob while it read, must not take
    alice's account into a connection that is now bob's, which would show it to bob."""
    alice, bob = world["alice"], world["bob"]
    Connection.objects.create(name="alice-2", owner=alice, client_id=21)
    source = GivenAwayWhileRead("U1000001", 1, "alice-2", bob, as_of=NOON + dt.timedelta(hours=1))

    result = sync_positions(trigger="command", gateway=source, connection="alice-2")

    assert Connection.objects.get(name="alice-2").owner == bob
    assert result.accounts_refused == {"U1000001": NOT_YOURS.format("U1000001")}
    report = AccountReport.objects.get(external_id="U1000001")
    assert (report.connection_name, report.owner_id) == ("alice", alice.pk)
    assert "U1000001" not in account_ids(bob)
    assert "U1000001" in account_ids(alice)

    # And the other way: a connection given to alice while it read writes her account.
    Connection.objects.create(name="bobs-spare", owner=bob, client_id=23)
    source = GivenAwayWhileRead(
        "U1000001", 1, "bobs-spare", alice, as_of=NOON + dt.timedelta(hours=2)
    )
    result = sync_positions(trigger="command", gateway=source, connection="bobs-spare")
    assert result.accounts_refused == {}
    report.refresh_from_db()
    assert (report.connection_name, report.owner_id) == ("bobs-spare", alice.pk)
    assert "U1000001" in account_ids(alice) and "U1000001" not in account_ids(bob)


def test_giving_a_connection_to_another_owner_moves_its_accounts_also_once_removed(world):
    """A user who sees every connection moves an account by giving its connection to
    another owner: the accounts' reports follow, so the new owner keeps them when the
    connection is removed, and the former owner's connections cannot take them back."""
    alice, bob, auditor = world["alice"], world["bob"], world["auditor"]
    auditor.user_permissions.add(Permission.objects.get(codename="change_connection"))
    connection = Connection.objects.get(name="alice")
    form = {
        **GATEWAY_FORM, "name": "alice", "host": "127.0.0.1", "client_id": "11",
        "owner": bob.pk,
    }  # fmt: skip
    response = browser(auditor).post(change(Connection, connection.pk), form)
    assert response.status_code == 302
    assert AccountReport.objects.get(external_id="U1000001").owner_id == bob.pk
    assert "U1000001" in account_ids(bob) and "U1000001" not in account_ids(alice)

    Connection.objects.filter(name="alice").delete()
    Connection.objects.create(name="alices-new", owner=alice, client_id=21)
    later = NOON + dt.timedelta(hours=1)
    assert list(sync("U1000001", 1, "alices-new", as_of=later).accounts_refused) == ["U1000001"]
    assert "U1000001" not in account_ids(alice)
    Connection.objects.create(name="bobs-new", owner=bob, client_id=22)
    assert sync("U1000001", 1, "bobs-new", as_of=later).accounts_refused == {}
    assert "U1000001" in account_ids(bob)
    # An unowned connection given to an owner: its accounts are theirs, and stay so.
    shared = Connection.objects.get(name="shared")
    shared.owner = alice
    shared.save()
    report = AccountReport.objects.get(external_id="U3000003")
    assert (report.owner_id, report.owned) == (alice.pk, True)


def test_an_owner_changed_without_save_is_the_one_a_removal_keeps(world):
    """A change of owner saved by `update()` (no signal) still decides while the
    connection exists, and is what its accounts keep once it is removed."""
    alice, bob = world["alice"], world["bob"]
    Connection.objects.filter(name="alice").update(owner=bob)
    assert "U1000001" in account_ids(bob) and "U1000001" not in account_ids(alice)
    Connection.objects.filter(name="alice").delete()
    report = AccountReport.objects.get(external_id="U1000001")
    assert (report.owner_id, report.owned) == (bob.pk, True)


def test_the_accounts_of_a_deleted_user_become_nobodys_to_write_and_stay_hidden(world):
    """A user whose connections are all removed may be deleted. Their accounts do not
    become everyone's, nor anyone's to take: they are written by no sync, and seen only
    by users who see every connection."""
    bob, carol = world["bob"], world["carol"]
    Connection.objects.filter(name="bob").delete()
    bob.delete()
    report = AccountReport.objects.get(external_id="U2000002")
    assert (report.owner_id, report.owned) == (None, True)
    Connection.objects.create(name="carols", owner=carol, client_id=31)
    later = NOON + dt.timedelta(hours=1)
    for claimant in ("carols", "shared", "alice"):
        assert list(sync("U2000002", 9, claimant, as_of=later).accounts_refused) == ["U2000002"]
    for name in ("alice", "carol"):
        assert "U2000002" not in account_ids(world[name])
    assert "U2000002" in account_ids(world["auditor"]) & account_ids(world["root"])


def test_a_user_who_owns_a_connection_cannot_be_deleted_so_their_data_never_becomes_everyones(
    world,
):
    from django.db.models import ProtectedError

    with pytest.raises(ProtectedError):
        world["alice"].delete()
    assert "U1000001" not in account_ids(world["carol"])
    Connection.objects.filter(name="alice").update(owner=world["bob"])
    world["alice"].delete()  # given to someone else first: then it may go
    assert "U1000001" in account_ids(world["bob"])
    assert "U1000001" not in account_ids(world["carol"])


def test_without_owners_everyone_with_the_permission_sees_everything(world):
    Connection.objects.update(owner=None)
    rows = api(world["carol"]).get("/portfolio/positions").json()["results"]
    assert accounts_in(rows) == ALL


def test_the_admin_list_takes_as_many_queries_for_many_accounts(world, users):
    client = browser(users["alice"])
    client.get(changelist(Position))  # warm the session
    with CaptureQueriesContext(db_connection) as few:
        client.get(changelist(Position))
    for n in range(5, 25):
        sync(f"U10000{n:02}", 100 + n, "alice")
        sync(f"U20000{n:02}", 200 + n, "bob")
    with CaptureQueriesContext(db_connection) as many:
        response = client.get(changelist(Position))
    assert len(result_rows(response)) == 3 + 20
    assert len(many) == len(few)


def test_the_instruments_listed_are_those_of_the_rows_the_user_may_see(world):
    def listed(user) -> set[str]:
        response = browser(user).get(changelist(Instrument))
        assert response.status_code == 200
        return {row.symbol for row in response.context["cl"].result_list}

    for user in ("alice", "bob", "carol"):
        world[user].user_permissions.add(Permission.objects.get(codename="view_instrument"))
    assert listed(world["alice"]) == {"S1", "S3", "S4"}
    assert listed(world["bob"]) == {"S2", "S3", "S4"}
    assert listed(world["carol"]) == {"S3", "S4"}
    assert listed(world["auditor"]) == listed(world["root"]) == {"S1", "S2", "S3", "S4"}


def test_a_connection_cannot_take_another_owners_account_by_reporting_it(world):
    """A gateway is no proof of a login: any server that speaks its protocol, at the
    address a user gives their connection, reports whatever account ids it likes. A
    snapshot of another owner's account, however new, is refused: nothing of it is
    written, and the account, its history and its positions stay its owner's."""
    alice, bob = world["alice"], world["bob"]
    bobs_positions = list(Position.objects.filter(account__external_id="U2000002").values())

    taken = sync("U2000002", 9, "alice", as_of=NOON + dt.timedelta(hours=1))

    assert list(taken.accounts_refused) == ["U2000002"]
    assert taken.accounts_refused["U2000002"] == NOT_YOURS.format("U2000002")
    assert AccountReport.objects.get(external_id="U2000002").connection_name == "bob"
    assert "U2000002" not in account_ids(alice)
    assert api(alice).get("/portfolio/accounts/U2000002/history").status_code == 404
    assert "U2000002" in account_ids(bob)
    assert list(Position.objects.filter(account__external_id="U2000002").values()) == (
        bobs_positions
    )
    # Nor by an unowned connection, which would make it everyone's.
    shared = sync("U2000002", 9, "shared", as_of=NOON + dt.timedelta(hours=2))
    assert list(shared.accounts_refused) == ["U2000002"]
    assert "U2000002" not in account_ids(world["carol"])


NOT_YOURS = "{} was not written: this connection may not write it."


def test_a_refusal_does_not_tell_the_syncing_user_that_another_owner_holds_the_account(
    world, settings, caplog
):
    """The run's outcome is its syncing user's to read: "another owner holds it" would
    confirm to someone trying account ids that one exists and is someone's. Each account
    the connection may not write is refused in the same words; whose it is goes to the
    server log, for the operator."""
    alice = world["alice"]
    alice.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    fake = FakeGateway(
        [position(account="U2000002", con_id=9), position(account="U5000005", con_id=9)],
        accounts=("U2000002", "U5000005"),
    )
    with reading_from(fake, settings), caplog.at_level("WARNING", logger="ibkr_sync.writer"):
        answer = api(alice).post("/portfolio/sync/ibkr?connection=alice").json()

    assert answer["accounts"] == ["U5000005"]
    assert answer["accounts_refused"] == {"U2000002": NOT_YOURS.format("U2000002")}
    run = SyncRun.objects.get(pk=answer["sync_run_id"])
    page = browser(alice).get(change(SyncRun, run.pk)).content.decode()
    assert NOT_YOURS.format("U2000002") in page
    for told in (str(answer), page):
        assert "another owner" not in told and "theirs" not in told and "bob" not in told
    # The operator's reason, in the log: whose it is, and which connection reported it.
    [record] = [r for r in caplog.records if "U2000002" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert f"held by user #{world['bob'].pk}" in record.getMessage()
    assert "last reported by bob" in record.getMessage()


def test_a_connection_cannot_change_the_contracts_another_owners_accounts_hold(world):
    """Instruments are shared by every connection. What a connection's gateway reports of
    a contract that another owner's account holds (its symbol, currency, multiplier)
    leaves it as it is: that owner's positions read as their own syncs wrote them."""
    fake = FakeGateway(
        [position(account="U7000007", con_id=2, symbol="OTHER", currency="JPY",
                  multiplier=Decimal(1000))],
        accounts=("U7000007",),
    )  # fmt: skip
    stored = Instrument.objects.filter(external_id="2").values().get()

    sync_positions(trigger="command", gateway=fake, connection="alice")

    assert Instrument.objects.filter(external_id="2").values().get() == stored
    rows = api(world["bob"]).get("/portfolio/positions").json()["results"]
    held = {row["instrument"]["symbol"] for row in rows if row["account"] == "U2000002"}
    assert held == {"S2"}
    # A contract only the syncing owner's accounts (or none) name is updated as before.
    mine = FakeGateway([position(account="U7000007", con_id=1, symbol="NEW")], ("U7000007",))
    sync_positions(trigger="command", gateway=mine, connection="alice")
    assert Instrument.objects.get(external_id="1").symbol == "NEW"
    # An unowned connection changes no owned account's contract either.
    sync_positions(trigger="command", gateway=fake, connection="shared")
    assert Instrument.objects.filter(external_id="2").values().get() == stored


def test_the_position_lists_filters_offer_only_the_users_contracts_kinds(world):
    """The position list's filters on its contracts' sec type and currency offer the
    values of the positions the user may see: not those of a contract only another
    owner's account holds (that someone holds a yen future is theirs to know)."""
    Instrument.objects.filter(external_id="2").update(sec_type="FUT", currency="JPY")

    def offered(user) -> dict[str, set[str]]:
        response = browser(user).get(changelist(Position), {"status": "all"})
        assert response.status_code == 200
        choices = {}
        for spec in response.context["cl"].filter_specs:
            if spec.title in ("sec type", "currency"):
                choices[spec.title] = {
                    str(choice["display"]) for choice in spec.choices(response.context["cl"])
                } - {"All"}
        return choices

    assert offered(world["alice"]) == {"sec type": {"STK"}, "currency": {"USD"}}
    assert offered(world["bob"]) == {"sec type": {"STK", "FUT"}, "currency": {"USD", "JPY"}}
    assert offered(world["auditor"]) == offered(world["bob"])
