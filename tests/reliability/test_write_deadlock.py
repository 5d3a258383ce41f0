"""Two writes that wait for each other's rows: PostgreSQL ends one of them ("deadlock
detected", 40P01) so that the other goes on. A sync whose write was the one ended writes
again, once, and succeeds: nothing of the first try was kept, and the other's rows are
committed by then.

The deadlock is made, not hoped for: another transaction (a thread with a connection of
its own) inserts the instrument the sync will insert second, waits until the sync's
write is blocked on it, then inserts the instrument the sync inserted first. PostgreSQL
finds the cycle in the sync's transaction (the other's deadlock_timeout is set longer),
ends it, and the other commits."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Instrument, Position
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db(transaction=True)

FIRST, SECOND = 910001, 910002  # the sync inserts instruments in conId order


def other_writer(held: threading.Event, done: threading.Event, errors: list) -> None:
    """Insert SECOND, wait until another session waits for it, insert FIRST, commit."""
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL deadlock_timeout = '20s'")
            now = timezone.now()
            Instrument.objects.create(
                broker="ibkr", external_id=str(SECOND), symbol="TWO", sec_type="STK",
                currency="USD", created_at=now, updated_at=now,
            )  # fmt: skip
            held.set()
            deadline = time.monotonic() + 20
            with connection.cursor() as cursor:
                while True:
                    # Live lock data (pg_locks), not the per-transaction statistics
                    # snapshot: a session that waits for a lock this one holds.
                    cursor.execute(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted "
                        "AND pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                    )
                    if cursor.fetchone()[0]:
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError("the sync's write never waited for SECOND")
                    time.sleep(0.02)
            Instrument.objects.create(
                broker="ibkr", external_id=str(FIRST), symbol="ONE", sec_type="STK",
                currency="USD", created_at=now, updated_at=now,
            )  # fmt: skip
    except Exception as exc:  # reported to the test
        errors.append(exc)
    finally:
        done.set()
        connections.close_all()


def test_a_write_ended_in_a_deadlock_is_written_again_and_succeeds(caplog):
    if connection.vendor != "postgresql":
        pytest.skip("deadlock detection is PostgreSQL's (SQLite has one writer at a time)")
    gateway = FakeGateway(
        positions=[
            position(con_id=FIRST, symbol="ONE", quantity="3"),
            position(con_id=SECOND, symbol="TWO", quantity="1.5"),
        ]
    )
    held, done, errors = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=other_writer, args=(held, done, errors))
    thread.start()
    try:
        assert held.wait(20)
        with caplog.at_level("INFO", logger="ibkr_sync.services"):
            result = sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    finally:
        thread.join(30)
    assert errors == [] and done.is_set()

    assert "met another's in a deadlock" in caplog.text  # it was the one ended, and wrote again
    assert (result.created, result.errors) == (2, [])
    run = SyncRun.objects.get(pk=result.sync_run_id)
    assert (run.status, run.created) == ("success", 2)
    held_now = dict(Position.objects.values_list("instrument__external_id", "quantity"))
    assert held_now == {str(FIRST): Decimal("3"), str(SECOND): Decimal("1.5")}
    # The instruments are the other writer's rows (committed first), not duplicated.
    assert Instrument.objects.filter(external_id__in=[str(FIRST), str(SECOND)]).count() == 2
