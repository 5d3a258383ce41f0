"""Database faults at the write step: the sync fails cleanly and the next one succeeds.

The gateway here is the fast fake (the database is what fails); the database is real,
and so are its errors: a trigger that rejects rows with a constraint error, a connection
the server terminates, a database that will not take writes.
"""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from django.db import DatabaseError, IntegrityError, connection

from ibkr_sync.exceptions import DatabaseUnavailable
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Position
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
            if "ibkr_sync_syncrun" in sql:
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
