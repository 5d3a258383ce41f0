"""Several connections, each a simulator of its own, read by the real client over TCP.

Two connections sync at the same time (each has its own lock); the same connection twice
is refused as before; what they share (instruments) is written safely by both.
"""

from __future__ import annotations

import contextlib
import threading
from decimal import Decimal

import pytest
from django.db import connection as db_connection

from ibkr_sync import connections, services
from ibkr_sync.exceptions import (
    ClientIdInUse,
    ConnectionDisabled,
    ConnectionRequired,
    GatewayUnavailable,
    SyncAlreadyRunning,
    UnknownConnection,
)
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.testing import GatewaySimulator, Portfolio, WireClient
from ibkr_sync.testing.pytest_plugin import CLIENT_ID
from portfolio.models import Account, Instrument, Position

from .conftest import sim_position

pytestmark = pytest.mark.django_db(transaction=True)


def portfolio(account: str, *extra) -> Portfolio:
    # AAPL in every portfolio: the contract both connections write.
    return Portfolio(accounts=[account], positions=[sim_position(account=account), *extra])


@pytest.fixture
def gateways(settings):
    settings.IBKR_CONNECT_TIMEOUT = 5
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 3
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    # The settings' gateway is nowhere: a sync that read it would fail.
    settings.IBKR_PORT = 1
    first = portfolio("U1000001", sim_position(account="U1000001", con_id=1001, symbol="ONE"))
    second = portfolio("U2000002", sim_position(account="U2000002", con_id=2002, symbol="TWO"))
    with GatewaySimulator(first) as home, GatewaySimulator(second) as office:
        Connection.objects.create(name="home", port=home.port, client_id=CLIENT_ID)
        Connection.objects.create(name="office", port=office.port, client_id=CLIENT_ID)
        yield home, office


# Threads of one test process share Django's in-memory SQLite test database, whose table
# locks fail a second writer at once (a deployment's SQLite file makes it wait): on
# SQLite, syncs at the same moment are tested in processes of their own on a file.
@pytest.fixture
def concurrent_threads():
    if db_connection.vendor == "sqlite":
        pytest.skip("threads on the in-memory SQLite test database; processes cover SQLite")


def sync(name, **options):
    return services.sync_positions(trigger="command", connection=name, **options)


def test_each_connection_syncs_its_own_gateway_into_one_database(gateways):
    home = sync("home")
    office = sync("office")
    assert (home.connection, home.accounts) == ("home", ["U1000001"])
    assert (office.connection, office.accounts) == ("office", ["U2000002"])
    assert Instrument.objects.filter(external_id="265598").count() == 1
    assert set(Position.objects.values_list("account__external_id", "instrument__symbol")) == {
        ("U1000001", "AAPL"),
        ("U1000001", "ONE"),
        ("U2000002", "AAPL"),
        ("U2000002", "TWO"),
    }
    runs = {run.connection_name: run for run in SyncRun.objects.all()}
    assert runs["home"].connection.name == "home"
    assert runs["office"].status == "success"


def test_a_sync_of_one_connection_never_closes_what_another_reported(gateways):
    sync("home")
    sync("office")
    # The second sync of home does not see U2000002 and must leave it alone.
    again = sync("home")
    assert again.closed == 0
    assert Position.objects.open().filter(account__external_id="U2000002").count() == 2


def test_two_connections_sync_at_the_same_moment(gateways, concurrent_threads):
    home, office = gateways
    held = threading.Event()
    home.set_faults(hold_positions=held)
    office.set_faults(hold_positions=held)
    results, errors = {}, {}

    def run(name):
        try:
            results[name] = sync(name)
        except Exception as exc:  # pragma: no cover - reported below
            errors[name] = exc
        finally:
            db_connection.close()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("home", "office")]
    for thread in threads:
        thread.start()
    # Both hold their own lock at once: two running rows.
    deadline = threading.Event()
    for _ in range(100):
        if SyncRun.objects.filter(status="running").count() == 2:
            break
        deadline.wait(0.05)
    assert SyncRun.objects.filter(status="running").count() == 2
    held.set()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert results["home"].created == 2 and results["office"].created == 2


def test_the_same_connection_twice_is_refused_as_before(gateways, concurrent_threads):
    home, _ = gateways
    held = threading.Event()
    home.set_faults(hold_positions=held)
    outcome = {}

    def run():
        try:
            outcome["result"] = sync("home")
        finally:
            db_connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(100):
            if SyncRun.objects.filter(status="running").exists():
                break
            threading.Event().wait(0.05)
        with pytest.raises(SyncAlreadyRunning, match="connection 'home'"):
            sync("home")
        # Another connection is not held up by it.
        assert sync("office").created == 2
    finally:
        held.set()
        thread.join(30)
    assert outcome["result"].created == 2


def test_naming_a_connection_is_optional_with_one_and_required_with_several(gateways, settings):
    with pytest.raises(ConnectionRequired, match="home, office"):
        services.sync_positions(trigger="command")
    with pytest.raises(UnknownConnection, match="'nowhere'"):
        sync("nowhere")
    with pytest.raises(UnknownConnection):
        sync("bad\x00name")
    Connection.objects.filter(name="office").delete()
    assert services.sync_positions(trigger="command").connection == "home"
    Connection.objects.filter(name="home").update(enabled=False)
    with pytest.raises(ConnectionDisabled):
        services.sync_positions(trigger="command")


def test_sync_all_goes_on_past_a_connection_that_is_down(gateways):
    home, _ = gateways
    home.stop_thread()
    outcomes = services.sync_all(trigger="command")
    assert [o.connection for o in outcomes] == ["home", "office"]
    assert outcomes[0].error.code == "gateway_unavailable"
    assert outcomes[1].result.created == 2


def test_a_connections_failures_name_its_own_fields_not_the_settings(gateways):
    """A connection's gateway is at the connection's host and port, with its client id:
    what to check names those, not `IBKR_PORT` / `IBKR_CLIENT_ID`, which it does not read."""
    home, office = gateways
    home.stop_thread()
    with pytest.raises(GatewayUnavailable) as refused:
        sync("home")
    message = str(refused.value)
    assert f"127.0.0.1:{home.port}: connection refused" in message
    assert "the API port matches connection home's port" in message
    assert "IBKR_" not in message

    holder = WireClient("127.0.0.1", office.port).connect_api(client_id=CLIENT_ID)
    try:
        with pytest.raises(ClientIdInUse) as in_use:
            sync("office")
    finally:
        holder.close()
    assert "Set connection office's client id to a client id no other tool uses" in str(
        in_use.value
    )
    assert "IBKR_" not in str(in_use.value)


def test_a_connection_test_is_the_handshake_only(gateways):
    handshake = services.check_connection("office")
    assert handshake.accounts == ("U2000002",)
    assert handshake.server_version >= 100
    assert not SyncRun.objects.exists() and not Account.objects.exists()


def test_a_connections_fields_override_the_settings(gateways, settings):
    _, office = gateways
    Connection.objects.filter(name="office").update(connect_timeout=2.5, request_timeout=None)
    config = connections.resolve("office").config()
    assert (config.port, config.client_id) == (office.port, CLIENT_ID)
    assert (config.connect_timeout, config.request_timeout) == (2.5, 10.0)


def test_without_connections_the_settings_gateway_is_read_as_before(ibkr_simulator):
    result = services.sync_positions(trigger="command")
    assert result.connection == ""
    run = SyncRun.objects.get()
    assert (run.connection, run.connection_name, run.lock_key) == (None, "", "")
    assert Position.objects.filter(quantity=Decimal("10")).exists()


SHARED = [(300000 + i, f"S{i:02d}") for i in range(30)]  # the contracts every one holds


def test_twenty_first_syncs_at_the_same_moment_share_their_instruments(
    settings, concurrent_threads
):
    """Twenty connections, each its own gateway and account, all holding the same 30
    contracts: their first syncs, released at one moment, all succeed, and every contract
    is one instrument."""
    settings.IBKR_CONNECT_TIMEOUT = 10
    settings.IBKR_REQUEST_TIMEOUT = 60
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_PORT = 1
    held = threading.Event()
    names = [f"c{i:02d}" for i in range(20)]
    with contextlib.ExitStack() as stack:
        for i, name in enumerate(names):
            account = f"U30000{i:02d}"
            own = sim_position(account=account, con_id=400000 + i, symbol=f"OWN{i}")
            shared = [sim_position(account=account, con_id=c, symbol=s) for c, s in SHARED]
            simulator = stack.enter_context(
                GatewaySimulator(Portfolio(accounts=[account], positions=[own, *shared]))
            )
            simulator.set_faults(hold_positions=held)
            Connection.objects.create(name=name, port=simulator.port, client_id=CLIENT_ID)
        results, errors = {}, {}

        def run(name):
            try:
                results[name] = sync(name)
            except Exception as exc:  # reported below
                errors[name] = exc
            finally:
                db_connection.close()

        threads = [threading.Thread(target=run, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        try:
            for _ in range(400):  # every sync has its lock and waits for its positions
                if SyncRun.objects.filter(status="running").count() == len(names):
                    break
                threading.Event().wait(0.05)
            assert SyncRun.objects.filter(status="running").count() == len(names)
        finally:
            held.set()
            for thread in threads:
                thread.join(120)
    assert not errors, errors
    assert sorted(results) == names
    assert all(result.created == len(SHARED) + 1 for result in results.values())
    assert Instrument.objects.count() == len(SHARED) + len(names)
    assert Instrument.objects.filter(external_id__in=[str(c) for c, _ in SHARED]).count() == 30
    assert Position.objects.open().count() == len(names) * (len(SHARED) + 1)
    assert set(SyncRun.objects.values_list("status", flat=True)) == {"success"}


# --- an account two connections report (an adviser's login and the account's own) --------

SHARED_ACCOUNT = "U5000005"
ADVISER_ONLY = "U6000006"


@pytest.fixture
def two_logins(settings):
    settings.IBKR_CONNECT_TIMEOUT = 5
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 3
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_PORT = 1
    adviser = Portfolio(
        accounts=[SHARED_ACCOUNT, ADVISER_ONLY],
        positions=[
            sim_position(account=SHARED_ACCOUNT, quantity="10"),
            sim_position(account=SHARED_ACCOUNT, con_id=5001, symbol="ADV"),
            sim_position(account=ADVISER_ONLY, con_id=6001, symbol="SIX"),
        ],
    )
    own = Portfolio(
        accounts=[SHARED_ACCOUNT],
        positions=[
            sim_position(account=SHARED_ACCOUNT, quantity="20"),
            sim_position(account=SHARED_ACCOUNT, con_id=5002, symbol="OWN"),
        ],
    )
    with GatewaySimulator(adviser) as a, GatewaySimulator(own) as o:
        Connection.objects.create(name="adviser", port=a.port, client_id=CLIENT_ID)
        Connection.objects.create(name="own", port=o.port, client_id=CLIENT_ID)
        yield a, o


def held_in_the_shared_account():
    return dict(
        Position.objects.open()
        .filter(account__external_id=SHARED_ACCOUNT)
        .values_list("instrument__symbol", "quantity")
    )


def a_newer_sync_of(name, newer):
    """A progress callback: once this sync has read its gateway (its snapshot is now the
    older), sync `name` to the end (a newer snapshot), then let this one write."""

    def progress(phase, count):
        if phase == "apply" and name not in newer:
            newer[name] = sync(name)

    return progress


def test_the_newer_snapshot_of_an_account_wins_whichever_sync_writes_last(two_logins):
    from ibkr_sync.models import AccountReport
    from portfolio.models import AccountSnapshot

    sync("own")
    newer = {}
    older = sync("adviser", progress=a_newer_sync_of("own", newer))
    own = newer["own"]

    # The adviser's snapshot was read first: refused for the shared account, reported.
    assert list(older.accounts_refused) == [SHARED_ACCOUNT]
    reason = older.accounts_refused[SHARED_ACCOUNT]
    # The other connection is not named: it may be another owner's.
    assert "another connection reported it as of" in reason and "after this snapshot" in reason
    assert "connection own" not in reason
    assert older.accounts == [ADVISER_ONLY] and own.accounts == [SHARED_ACCOUNT]
    assert SHARED_ACCOUNT not in older.by_account
    assert (older.processed, older.created, older.closed) == (1, 1, 0)
    # Nothing of it written: the own login's positions stand, none closed, none added.
    assert held_in_the_shared_account() == {"AAPL": Decimal("20"), "OWN": Decimal("10")}
    run = SyncRun.objects.get(pk=older.sync_run_id)
    assert run.accounts_refused == older.accounts_refused
    assert (
        run.accounts == [ADVISER_ONLY]
        and not run.changes.filter(position__account__external_id=SHARED_ACCOUNT).exists()
    )
    account = Account.objects.get(external_id=SHARED_ACCOUNT)
    own_run = SyncRun.objects.get(pk=own.sync_run_id)
    assert account.last_synced_at <= own_run.finished_at
    # Values were read for both accounts; only the applied one's were stored.
    assert set(older.account_values) == {ADVISER_ONLY}
    assert AccountSnapshot.objects.filter(sync_run_id=run.pk).count() == 1
    assert not AccountSnapshot.objects.filter(account=account, sync_run_id=run.pk).exists()
    report = AccountReport.objects.get(external_id=SHARED_ACCOUNT)
    assert (report.connection.name, report.sync_run_id) == ("own", own.sync_run_id)
    assert AccountReport.objects.get(external_id=ADVISER_ONLY).connection_name == "adviser"

    # Read after the own login's: the adviser's snapshot is the newer now, and wins.
    latest = sync("adviser")
    assert latest.accounts_refused == {} and latest.accounts == [SHARED_ACCOUNT, ADVISER_ONLY]
    assert held_in_the_shared_account() == {"AAPL": Decimal("10"), "ADV": Decimal("10")}
    assert AccountReport.objects.get(external_id=SHARED_ACCOUNT).connection_name == "adviser"


def test_a_dry_run_reports_the_refusal_too(two_logins):
    sync("own")
    newer = {}
    preview = sync("adviser", dry_run=True, progress=a_newer_sync_of("own", newer))
    assert list(preview.accounts_refused) == [SHARED_ACCOUNT]
    assert preview.accounts == [ADVISER_ONLY]
    assert {change["account"] for change in preview.changes} == {ADVISER_ONLY}
    assert held_in_the_shared_account() == {"AAPL": Decimal("20"), "OWN": Decimal("10")}
    assert not Account.objects.filter(external_id=ADVISER_ONLY).exists()


def test_a_single_account_sync_reconciles_that_account_only(two_logins):
    sync("adviser")
    result = services.sync_positions(ADVISER_ONLY, trigger="command", connection="adviser")
    assert result.accounts == [ADVISER_ONLY] and result.closed == 0
    assert held_in_the_shared_account() == {"AAPL": Decimal("10"), "ADV": Decimal("10")}


def test_two_syncs_of_one_account_at_the_same_moment_take_turns(two_logins, concurrent_threads):
    adviser, own = two_logins
    held = threading.Event()
    adviser.set_faults(hold_positions=held)
    own.set_faults(hold_positions=held)
    results, errors = {}, {}

    def run(name):
        try:
            results[name] = sync(name)
        except Exception as exc:  # reported below
            errors[name] = exc
        finally:
            db_connection.close()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("adviser", "own")]
    for thread in threads:
        thread.start()
    for _ in range(200):
        if SyncRun.objects.filter(status="running").count() == 2:
            break
        threading.Event().wait(0.05)
    held.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    # Both wrote the shared account's positions (or one was refused as the older): never
    # a duplicate, and the account's report is the snapshot that stands.
    refused = [name for name, result in results.items() if result.accounts_refused]
    assert len(refused) <= 1
    from ibkr_sync.models import AccountReport

    report = AccountReport.objects.get(external_id=SHARED_ACCOUNT)
    stood = results[report.connection_name]
    assert SHARED_ACCOUNT in stood.accounts and not stood.accounts_refused
    assert report.sync_run_id == stood.sync_run_id
    expected = (
        {"AAPL": Decimal("10"), "ADV": Decimal("10")}
        if report.connection_name == "adviser"
        else {"AAPL": Decimal("20"), "OWN": Decimal("10")}
    )
    assert held_in_the_shared_account() == expected


def test_every_edge_says_which_accounts_were_not_written(two_logins, admin_client):
    """A newer snapshot of the shared account is applied already (its moment is ahead of
    any read now): the command, the API's answer and the run's record name it."""
    import datetime as dt
    from io import StringIO

    from django.core.management import call_command
    from django.utils import timezone

    from ibkr_sync.models import AccountReport

    sync("own")
    AccountReport.objects.filter(external_id=SHARED_ACCOUNT).update(
        as_of=timezone.now() + dt.timedelta(hours=1)
    )
    out = StringIO()
    call_command("sync_ibkr", "--connection", "adviser", stdout=out)
    assert f"Not written: {SHARED_ACCOUNT}: another connection reported it as of" in (
        out.getvalue()
    )
    assert "was not written" not in out.getvalue(), "the account and its refusal, said once"

    answer = admin_client.post("/portfolio/sync/ibkr?connection=adviser").json()
    assert list(answer["accounts_refused"]) == [SHARED_ACCOUNT]
    assert answer["accounts"] == [ADVISER_ONLY]
    run = admin_client.get(f"/portfolio/sync/runs/{answer['sync_run_id']}").json()
    assert run["connection"] == "adviser"
    assert run["accounts_refused"] == answer["accounts_refused"]
    assert held_in_the_shared_account() == {"AAPL": Decimal("20"), "OWN": Decimal("10")}


def test_a_connection_removed_while_it_syncs_fails_cleanly_and_writes_nothing(gateways):
    def remove_home(phase, count):
        if phase == "apply":
            Connection.objects.filter(name="home").delete()

    with pytest.raises(UnknownConnection, match="home was removed while it synced"):
        sync("home", progress=remove_home)
    run = SyncRun.objects.get()
    assert (run.status, run.error_code, run.connection_name) == (
        "failed",
        "unknown_connection",
        "home",
    )
    assert not Position.objects.exists() and not AccountReport.objects.exists()
    # The other connection's lock and syncs are untouched.
    assert sync("office").accounts == ["U2000002"]


def test_a_connection_renamed_while_it_syncs_reports_its_accounts_by_its_new_name(gateways):
    def rename_home(phase, count):
        if phase == "apply":
            Connection.objects.filter(name="home").update(name="house")

    result = sync("home", progress=rename_home)
    assert result.accounts == ["U1000001"]
    report = AccountReport.objects.get(external_id="U1000001")
    assert (report.connection.name, report.connection_name) == ("house", "house")


def test_sync_all_goes_on_past_a_connection_removed_before_its_turn(gateways):
    def remove_office(name, phase, count):
        if name == "home" and phase == "apply":
            Connection.objects.filter(name="office").delete()

    outcomes = services.sync_all(trigger="command", progress=remove_office)
    assert [outcome.connection for outcome in outcomes] == ["home", "office"]
    assert outcomes[0].result.accounts == ["U1000001"]
    assert isinstance(outcomes[1].error, UnknownConnection)
    assert "office" in str(outcomes[1].error)
    assert list(SyncRun.objects.values_list("connection_name", "status")) == [("home", "success")]


def test_sync_all_leaves_out_a_connection_disabled_before_its_turn(gateways):
    def disable_office(name, phase, count):
        if name == "home" and phase == "apply":
            Connection.objects.filter(name="office").update(enabled=False)

    outcomes = services.sync_all(trigger="command", progress=disable_office)
    assert [outcome.connection for outcome in outcomes] == ["home"]
    assert outcomes[0].result.accounts == ["U1000001"]
    assert not Position.objects.filter(account__external_id="U2000002").exists()
