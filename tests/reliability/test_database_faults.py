"""Database faults at the write step: the sync fails cleanly and the next one succeeds.

The gateway here is the fast fake (the database is what fails); the database is real,
and so are its errors: a trigger that rejects rows with a constraint error, a connection
the server terminates, a database that will not take writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
import time

import pytest
from django.db import DatabaseError, IntegrityError, connection
from django.db.models.functions import Now

from ibkr_sync.exceptions import DatabaseUnavailable, LockLost
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, Position
from tests.conftest import FakeGateway, position
from tests.reliability.conftest import database_state
from tests.reliability.matrix import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def sync(gateway):
    return sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


class BreakingGateway(FakeGateway):
    """Reads fine, then breaks the database before the sync writes (between read and write)."""

    def __init__(self, *args, breaker, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker = breaker

    def fetch_positions(self, account_id=None):
        snapshot = super().fetch_positions(account_id)
        self.breaker()
        return snapshot


def held_then_changed():
    held = [position(), position(con_id=76792991, symbol="TSLA", quantity="0.5")]
    changed = [
        position(quantity="11"),  # an update
        position(con_id=4242, symbol="NEW", quantity="1"),  # an insert
    ]  # and TSLA is gone: a close
    return held, changed


@contextlib.contextmanager
def rejecting_position_inserts():
    """A trigger that fails every insert into the position table with a constraint error."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "CREATE TRIGGER reliability_reject BEFORE INSERT ON portfolio_position "
                "BEGIN SELECT RAISE(ABORT, 'rejected by the reliability test'); END"
            )
        else:
            cursor.execute(
                "CREATE FUNCTION reliability_reject() RETURNS trigger AS $$ BEGIN "
                "RAISE unique_violation USING MESSAGE = 'rejected by the reliability test'; "
                "END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                "CREATE TRIGGER reliability_reject BEFORE INSERT ON portfolio_position "
                "FOR EACH ROW EXECUTE FUNCTION reliability_reject()"
            )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                "DROP TRIGGER reliability_reject"
                + ("" if connection.vendor == "sqlite" else " ON portfolio_position")
            )
            if connection.vendor != "sqlite":
                cursor.execute("DROP FUNCTION reliability_reject()")


def test_constraint_error_at_the_write_step_rolls_back_and_is_recorded():
    held, changed = held_then_changed()
    sync(FakeGateway(held))
    before = database_state()

    with rejecting_position_inserts(), pytest.raises(IntegrityError):
        sync(FakeGateway(changed))

    assert database_state() == before, "the update and the close were rolled back too"
    run = SyncRun.objects.first()
    assert (run.status, run.error_code) == (SyncRun.Status.FAILED, "internal_error")
    assert "IntegrityError" in run.error_message
    result = sync(FakeGateway(changed))
    assert (result.created, result.updated, result.closed) == (1, 1, 1)


class DatabaseOutage:
    """Cuts this process's database connection; `lasting` keeps it from reconnecting."""

    def __init__(self, *, lasting: bool) -> None:
        self.lasting = lasting
        self._undo = []

    def __call__(self) -> None:
        if connection.vendor == "postgresql":
            self._cut_postgresql()
        else:
            self._lock_sqlite()

    def _cut_postgresql(self) -> None:
        import psycopg

        pid = connection.connection.info.backend_pid
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(autocommit=True, **params) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        if self.lasting:  # and the server stays away: nothing listens where it was
            saved = connection.settings_dict["PORT"]
            connection.settings_dict["PORT"] = free_port()
            self._undo.append(lambda: connection.settings_dict.__setitem__("PORT", saved))

    def _lock_sqlite(self) -> None:
        # Another connection holds the write lock on every table the sync writes, so
        # each write fails with "database table is locked" at once.
        other = sqlite3.connect(connection.settings_dict["NAME"], uri=True)
        other.isolation_level = None
        other.execute("BEGIN IMMEDIATE")
        for table in ("portfolio_account", "portfolio_instrument", "portfolio_position"):
            other.execute(f"UPDATE {table} SET id = id")
        if self.lasting:
            other.execute("UPDATE ibkr_sync_syncrun SET id = id")
        self._undo.append(lambda: (other.rollback(), other.close()))

    def end(self) -> None:
        while self._undo:
            self._undo.pop()()

    def ending_before_the_failure_is_recorded(self):
        """For a brief SQLite outage: the lock goes away as the service records the failure.

        (On PostgreSQL the terminated connection is the whole outage: a new one works.)
        """

        def release_first(execute, sql, params, many, context):
            if "ibkr_sync_syncrun" in sql and "error_code" in sql:  # the failure's record
                self.end()
            return execute(sql, params, many, context)

        if self.lasting or connection.vendor != "sqlite":
            return contextlib.nullcontext()
        return connection.execute_wrapper(release_first)


@pytest.mark.parametrize("lasting", [False, True], ids=["brief", "lasting"])
def test_database_lost_at_the_write_step_then_the_next_sync_succeeds(lasting):
    held, changed = held_then_changed()
    sync(FakeGateway(held))
    before = database_state()
    outage = DatabaseOutage(lasting=lasting)

    try:
        with (
            outage.ending_before_the_failure_is_recorded(),
            pytest.raises(DatabaseUnavailable) as raised,
        ):
            sync(BreakingGateway(changed, breaker=outage))
    finally:
        outage.end()

    assert isinstance(raised.value.__cause__, DatabaseError)
    assert database_state() == before
    failed = SyncRun.objects.first()
    if lasting:  # it could not be recorded: the lock row is left behind, running
        assert failed.status == SyncRun.Status.RUNNING
    else:  # recorded on a fresh connection
        assert (failed.status, failed.error_code) == (SyncRun.Status.FAILED, "database_unavailable")

    result = sync(FakeGateway(changed))  # no manual clean-up
    assert (result.created, result.updated, result.closed) == (1, 1, 1)
    failed.refresh_from_db()
    assert failed.status == SyncRun.Status.FAILED
    assert failed.error_code == ("abandoned" if lasting else "database_unavailable")
    assert not SyncRun.objects.filter(status=SyncRun.Status.RUNNING).exists()
    assert Position.objects.filter(closed_at__isnull=True).count() == 2


# --- the API while the database is unavailable -----------------------------------------------


@contextlib.contextmanager
def database_down(tmp_path):
    """From here on, the default database cannot be reached at all: PostgreSQL refuses the
    connection (nothing listens on its port), SQLite cannot open its file (its directory
    does not exist). Django's open connection is set aside (an in-memory SQLite database
    lives only as long as it) and given back afterwards."""
    params = connection.settings_dict
    key = "PORT" if connection.vendor == "postgresql" else "NAME"
    saved, live = params[key], connection.connection
    params[key] = free_port() if key == "PORT" else str(tmp_path / "gone" / "db.sqlite3")
    connection.connection = None
    try:
        yield
    finally:
        connection.close()
        params[key] = saved
        connection.connection = live
        connection.errors_occurred = False


@pytest.fixture
def reader(django_user_model):
    user = django_user_model.objects.create_superuser("boss", password="pw-boss-123")
    run = SyncRun.objects.create(trigger="command", status="success")
    Account.objects.create(broker="ibkr", external_id="U1111111")  # for its history
    return user, run


def client_for(user, auth: str):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    if auth == "token":
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    else:
        assert client.login(username=user.username, password="pw-boss-123")
    return client


AS_OF = "2026-11-20T09:30:00Z"
API_REQUESTS = [
    ("get", "/portfolio/positions"),
    ("get", f"/portfolio/positions?as_of={AS_OF}"),
    ("get", "/portfolio/accounts"),
    ("get", "/portfolio/accounts/U1111111/history"),
    ("get", "/portfolio/cash"),
    ("get", "/portfolio/sync/runs"),
    ("get", "/portfolio/sync/runs/{run}"),
    ("post", "/portfolio/sync/ibkr"),
]


@pytest.mark.parametrize("auth", ["token", "session"])
@pytest.mark.parametrize(("method", "url"), API_REQUESTS)
def test_every_endpoint_answers_503_while_the_database_is_down(
    reader, use_gateway, tmp_path, caplog, method, url, auth
):
    user, run = reader
    client = client_for(user, auth)
    url = url.format(run=run.pk)

    with database_down(tmp_path):
        response = getattr(client, method)(url)

    assert response.status_code == 503, response.content
    body = response.json()
    assert (body["status"], body["code"]) == ("error", "database_unavailable")
    assert "DATABASE_URL" in body["detail"]
    assert use_gateway.calls == [], "nothing was synced"
    logged = [r for r in caplog.records if r.name == "django.request"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].levelname == "ERROR"
    assert logged[0].exc_info is None, "a database outage is not a bug: no traceback"
    assert url.partition("?")[0] in logged[0].getMessage()  # the path, as Django logs it
    # The database back, the same request is answered.
    assert getattr(client, method)(url).status_code == 200


def test_a_lost_connection_mid_request_is_503_too(reader, monkeypatch):
    """InterfaceError (the driver's connection object is already closed) is the other
    error of a database that does not answer."""
    from django.db import InterfaceError

    user, _ = reader
    client = client_for(user, "token")

    def closed(execute, sql, params, many, context):
        if "portfolio_position" in sql:
            raise InterfaceError("connection already closed")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(closed):
        response = client.get("/portfolio/positions")

    assert response.status_code == 503
    assert response.json()["code"] == "database_unavailable"


@contextlib.contextmanager
def read_only_database():
    """The database takes reads and refuses every write (SQLite's query_only; PostgreSQL's
    read-only transactions, as on a standby server)."""
    on, off = (
        ("PRAGMA query_only = ON", "PRAGMA query_only = OFF")
        if connection.vendor == "sqlite"
        else ("SET default_transaction_read_only = on", "SET default_transaction_read_only = off")
    )
    with connection.cursor() as cursor:
        cursor.execute(on)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(off)


def test_a_read_only_database_is_503_saying_so_not_check_the_server(reader, use_gateway):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(reader[0])

    with read_only_database():
        response = client.post("/portfolio/sync/ibkr")

    assert response.status_code == 503, response.content
    body = response.json()
    assert body["code"] == "database_unavailable"
    assert "read-only" in body["detail"]
    assert "storage" in body["detail"]
    assert "server is running" not in body["detail"]
    assert use_gateway.calls == []


def test_the_command_exits_9_naming_a_read_only_database(use_gateway):
    from io import StringIO

    from django.core.management import CommandError, call_command

    with read_only_database(), pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", stdout=StringIO(), stderr=StringIO())

    assert raised.value.returncode == 9
    assert "read-only" in str(raised.value)
    assert "server is running" not in str(raised.value)
    assert use_gateway.calls == []


# --- the lock: a holder that lost it never commits; every wait is bounded -------------------

LOCK_TIMEOUT = 1.5


class ReleasedMidWrite(FakeGateway):
    """After the read, another connection releases the lock (as a later sync does with a
    holder it took for abandoned) while this sync is in its write transaction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release_outcome: list[object] = []

    def fetch_positions(self, account_id=None):
        snapshot = super().fetch_positions(account_id)

        def release():
            try:
                released = SyncRun.objects.filter(status="running").update(
                    status="failed", error_code="abandoned", error_message="released"
                )
                self.release_outcome.append(released)
            except DatabaseError as exc:  # SQLite: the sync holds the write lock
                self.release_outcome.append(exc)
            finally:
                connection.close()

        def first_position_write(execute, sql, params, many, context):
            result = execute(sql, params, many, context)
            if not self.release_outcome and '"portfolio_position"' in sql:
                other = threading.Thread(target=release)
                other.start()
                other.join(LOCK_TIMEOUT + 2)
            return result

        connection.execute_wrappers.append(first_position_write)
        return snapshot


def test_a_sync_whose_lock_is_released_during_its_write_never_commits(settings):
    """The fencing token: the run's row is written inside the write transaction before it
    commits. Either the release wins (the sync rolls back, the run stays `abandoned`) or
    the sync does (the release changes nothing): never both."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held, changed = held_then_changed()
    sync(FakeGateway(held))
    before = database_state()
    gateway = ReleasedMidWrite(changed)
    try:
        result = sync(gateway)
    except LockLost:
        result = None
    finally:
        connection.execute_wrappers.clear()
    run = SyncRun.objects.first()
    if connection.vendor == "postgresql":  # the release committed first: fenced off
        assert gateway.release_outcome == [1]
        assert result is None
        assert database_state() == before, "nothing of the fenced-off sync landed"
        assert (run.status, run.error_code) == ("failed", "abandoned"), "first reason stays"
    else:  # SQLite: the sync holds the write lock until it commits; the release must wait
        assert result is not None and result.updated == 1
        assert gateway.release_outcome != [1]
        assert (run.status, run.error_code) == ("success", "")
    assert not SyncRun.objects.filter(status="running").exists()


def test_while_a_sync_runs_sqlite_waits_for_a_lock_at_most_the_lock_timeout(settings):
    """The busy timeout of the sync's connection is IBKR_SYNC_LOCK_TIMEOUT while it runs,
    and what it was before afterwards."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's busy timeout")
    settings.IBKR_SYNC_LOCK_TIMEOUT = 2.5

    def busy_timeout():
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA busy_timeout")
            return cursor.fetchone()[0]

    before = busy_timeout()
    seen = []

    class Probe(FakeGateway):
        def fetch_positions(self, account_id=None):
            seen.append(busy_timeout())
            return super().fetch_positions(account_id)

    sync(Probe([position()]))
    assert seen == [2500]
    assert busy_timeout() == before


@pytest.fixture
def postgresql_session():
    """Another session on the test database (a process that is frozen, or a host's own
    transaction), with its identity as the sync records it."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL sessions")
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    sessions = []

    def open_session():
        session = psycopg.connect(**params)
        pid, started = session.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
        sessions.append(session)
        return session, f"{pid}@{started.isoformat()}"

    yield open_session
    for session in sessions:
        with contextlib.suppress(Exception):
            session.close()


def abandoned_mid_write(session_token: str) -> SyncRun:
    row = SyncRun.objects.create(trigger="command", status="running", owner="elsewhere;b;n|42|9|n")
    SyncRun.objects.filter(pk=row.pk).update(
        heartbeat_at=Now() - dt.timedelta(seconds=LOCK_TIMEOUT + 1), database_session=session_token
    )
    return row


@pytest.mark.parametrize("state", ["in its write", "idle", "its pid, another session"])
def test_postgresql_the_next_sync_ends_the_session_of_a_holder_frozen_in_its_write(
    settings, postgresql_session, state
):
    """A frozen holder's row locks would keep the next sync waiting for as long as it stays
    frozen: its session is ended if it is in a transaction, and only then, and only that
    session (pid and start time), so the next sync succeeds at once."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held, changed = held_then_changed()
    sync(FakeGateway(held))
    holder, token = postgresql_session()
    if state == "in its write":
        holder.execute("UPDATE portfolio_position SET quantity = quantity + 1000")
    else:
        holder.commit()
    if state == "its pid, another session":
        pid, _, started = token.partition("@")
        token = f"{pid}@{(dt.datetime.fromisoformat(started) - dt.timedelta(1)).isoformat()}"
    row = abandoned_mid_write(token)

    clock = time.monotonic()
    result = sync(FakeGateway(changed))
    assert time.monotonic() - clock < LOCK_TIMEOUT
    assert (result.created, result.updated, result.closed) == (1, 1, 1)
    row.refresh_from_db()
    assert row.error_code == "abandoned"
    if state == "in its write":
        assert "was ended, rolling back its writes" in row.error_message
        with pytest.raises(psycopg_errors().OperationalError):
            holder.execute("SELECT 1")
        assert Position.objects.get(instrument__symbol="AAPL").quantity == 11, "rolled back"
    else:
        assert "database session" not in row.error_message
        assert holder.execute("SELECT 1").fetchone() == (1,), "left alone"


def test_postgresql_a_sync_waits_for_a_row_lock_at_most_the_lock_timeout(
    settings, postgresql_session
):
    """A lock the sync cannot end (a host's own transaction, or a frozen holder whose
    session may not be signalled): the sync fails after lock_timeout, cleanly and recorded,
    instead of waiting and renewing its own lock for as long as the other holds on."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held, changed = held_then_changed()
    sync(FakeGateway(held))
    before = database_state()
    other, _ = postgresql_session()
    other.execute("SELECT * FROM portfolio_position FOR UPDATE")

    clock = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="locked"):
        sync(FakeGateway(changed))
    assert LOCK_TIMEOUT <= time.monotonic() - clock < LOCK_TIMEOUT + 2
    assert database_state() == before
    failed = SyncRun.objects.first()
    assert (failed.status, failed.error_code) == ("failed", "database_unavailable")
    other.rollback()
    assert sync(FakeGateway(changed)).updated == 1


def psycopg_errors():
    import psycopg

    return psycopg
