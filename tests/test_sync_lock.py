"""The sync lock is held exactly as long as its holder works on it.

A `running` SyncRun row is the lock. Its holder renews a heartbeat; a row nobody renews
is released by the next sync from any process on any host, a row of a process of this
machine that has ended at once, and nothing else frees a lock: not a host name and pid
that happen to match (containers share both), not a process that is alive but idle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
from django.db import OperationalError, connection
from django.db.models.functions import Now
from django.utils import timezone

from ibkr_sync import lock, services
from ibkr_sync.exceptions import DatabaseUnavailable, SyncAlreadyRunning
from ibkr_sync.health import check_health
from ibkr_sync.lock import _ProcessIdentity, process_identity
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db


# Short, for tests that wait for a silent lock to be released: on SQLite the next sync
# watches a heartbeat that looks silent for a beat (a third of it) before it releases it.
LOCK_TIMEOUT = 3


def run(gateway=None):
    gateway = gateway or FakeGateway([position()])
    return sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


def held_by(owner: str, *, silent_for: float = 0.0, running_for: float = 0.0) -> SyncRun:
    """A running row as another process leaves it, last renewed `silent_for` s ago."""
    row = SyncRun.objects.create(trigger="api", status="running", owner=owner)
    now = timezone.now()
    SyncRun.objects.filter(pk=row.pk).update(
        started_at=now - dt.timedelta(seconds=max(running_for, silent_for)),
        heartbeat_at=now - dt.timedelta(seconds=silent_for),
    )
    row.refresh_from_db()
    return row


def other_process_token(pid: int, started: str, machine: str | None = None) -> str:
    me = process_identity()
    return _ProcessIdentity(me.machine if machine is None else machine, pid, started, "n").token


@pytest.fixture
def sleeper():
    """A live process of this machine that is not syncing."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_renewed_lock_of_another_host_is_respected():
    held = held_by("elsewhere;boot;ns|4242|99|n", silent_for=5)
    with pytest.raises(SyncAlreadyRunning):
        run()
    held.refresh_from_db()
    assert held.status == "running"


@pytest.mark.parametrize("owner", ["elsewhere;boot;ns|4242|99|n", "", "garbage"])
def test_a_lock_nobody_renews_is_released_whoever_left_it(settings, owner):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held = held_by(owner, silent_for=LOCK_TIMEOUT + 1)
    result = run()
    held.refresh_from_db()
    assert (held.status, held.error_code) == ("failed", "abandoned")
    assert "no heartbeat for 4 s" in held.error_message
    assert SyncRun.objects.get(pk=result.sync_run_id).status == "success"


@pytest.mark.processes
def test_a_live_idle_process_holds_no_lock_once_its_heartbeat_stopped(settings, sleeper):
    """The review's wedge: a web server whose sync could not record its failure is alive
    for hours; its row must not block every other process for IBKR_SYNC_STALE_AFTER."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    started = lock._start_time(sleeper.pid)
    held = held_by(other_process_token(sleeper.pid, started), silent_for=1)
    with pytest.raises(SyncAlreadyRunning):
        run()  # alive and renewed recently: it may be working
    SyncRun.objects.filter(pk=held.pk).update(
        heartbeat_at=timezone.now() - dt.timedelta(seconds=LOCK_TIMEOUT + 1)
    )
    assert run().created == 1
    held.refresh_from_db()
    assert held.error_code == "abandoned"


@pytest.mark.processes
def test_a_lock_of_an_ended_process_of_this_machine_is_released_at_once():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    held = held_by(other_process_token(int(dead.stdout), "12345"), silent_for=0)
    assert run().created == 1
    held.refresh_from_db()
    assert (held.status, held.error_code) == ("failed", "abandoned")
    assert "its process has ended" in held.error_message


@pytest.mark.processes
def test_a_lock_of_a_zombie_process_is_released_at_once():
    """A holder killed and not yet reaped (in a container whose first process reaps no
    orphans, never) is a zombie: ended, though its pid and start time are still there."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while lock._stat(child.pid)[0] != "Z":  # ended, not reaped: we do not wait()
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.02)
        started = lock._start_time(child.pid)
        held = held_by(other_process_token(child.pid, started), silent_for=0)
        assert run().created == 1
        held.refresh_from_db()
        assert (held.status, held.error_code) == ("failed", "abandoned")
        assert "its process has ended" in held.error_message
    finally:
        child.wait()


@pytest.mark.processes
def test_a_reused_pid_is_not_the_process_that_took_the_lock(sleeper):
    # Same machine, a live pid, but not the process that started then: released.
    held = held_by(other_process_token(sleeper.pid, "1"), silent_for=0)
    assert run().created == 1
    held.refresh_from_db()
    assert held.error_code == "abandoned"


def test_same_host_name_and_pid_in_another_container_is_not_taken_for_this_process():
    """Two containers share a host name; the pid of one's sync is alive in the other."""
    me = process_identity()
    other_container = other_process_token(me.pid, me.started, machine="same-host;boot;other-ns")
    held = held_by(other_container, silent_for=1)
    with pytest.raises(SyncAlreadyRunning):
        run()
    held.refresh_from_db()
    assert held.status == "running"


def test_a_run_of_this_process_is_never_taken_for_abandoned_while_it_runs(settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = 1
    row = lock.acquire(trigger="api", user=None, account_id=None, dry_run=False)
    try:
        SyncRun.objects.filter(pk=row.pk).update(
            heartbeat_at=timezone.now() - dt.timedelta(seconds=60)
        )
        assert lock.release_abandoned() is False, "running in this process"
        assert SyncRun.objects.get(pk=row.pk).status == "running"
    finally:
        lock._active_runs.discard(row.pk)
    # Once this process no longer runs it, its row is released at once.
    assert lock.release_abandoned() is True
    assert SyncRun.objects.get(pk=row.pk).error_code == "abandoned"


def test_refused_runs_take_no_time():
    held_by("elsewhere;boot;ns|4242|99|n")
    with pytest.raises(SyncAlreadyRunning):
        run()
    refused = SyncRun.objects.get(error_code="sync_already_running")
    assert refused.finished_at == refused.started_at
    assert refused.duration == dt.timedelta(0)


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_is_renewed_while_a_sync_works_and_stops_when_it_ends(settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = 0.6  # a beat every 0.2 s
    gateway = FakeGateway([position()])
    gateway.release = threading.Event()

    def sync_in_a_thread():
        try:
            run(gateway)
        finally:
            connection.close()  # the thread's own connection

    worker = threading.Thread(target=sync_in_a_thread)
    worker.start()
    try:
        assert gateway.entered.wait(10)
        row = SyncRun.objects.get(status="running")
        first = row.heartbeat_at
        deadline = time.monotonic() + 10
        while SyncRun.objects.get(pk=row.pk).heartbeat_at == first:
            assert time.monotonic() < deadline, "the heartbeat was never renewed"
            time.sleep(0.05)
        # Renewed for as long as the read takes, so nobody may take the lock meanwhile.
        time.sleep(1)
        assert lock.abandoned_reason(SyncRun.objects.get(pk=row.pk)) is None
    finally:
        gateway.release.set()
        worker.join(10)
    finished = SyncRun.objects.get(pk=row.pk)
    assert finished.status == "success"
    time.sleep(0.5)
    assert SyncRun.objects.get(pk=row.pk).heartbeat_at == finished.heartbeat_at
    assert not [t for t in threading.enumerate() if t.name.startswith("ibkr-sync-heartbeat")]


@pytest.mark.django_db(transaction=True)
def test_after_an_unrecordable_failure_the_next_sync_succeeds_within_the_lock_timeout(
    settings, monkeypatch
):
    """The database went away mid-sync and the failure could not be recorded: the process
    lives on (a web server), its row stays `running`. Another process (here: the same
    rules seen from another identity) gets the lock once the heartbeat lapses."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = 0.6

    monkeypatch.setattr(services, "_fail_run", lambda *args: None)  # cannot be recorded
    with pytest.raises(DatabaseUnavailable):
        run(FakeGateway(error=OperationalError("server closed the connection")))
    left = SyncRun.objects.get()
    assert left.status == "running"

    # As another process of this machine sees it (a new identity): the holder's pid is
    # alive, so only its heartbeat can tell that it no longer works on the lock.
    monkeypatch.setattr(lock, "_identity", None)
    assert process_identity().token != left.owner
    with pytest.raises(SyncAlreadyRunning):
        run()
    time.sleep(0.7)
    assert run().created == 1
    left.refresh_from_db()
    assert left.error_code == "abandoned"


def test_health_reports_a_lock_held_past_what_a_sync_can_take(settings):
    settings.IBKR_CONNECT_TIMEOUT, settings.IBKR_REQUEST_TIMEOUT = 10, 60
    settings.IBKR_SYNC_LOCK_TIMEOUT = 30  # a sync takes at most 100 s without values
    settings.IBKR_READ_VALUES = False
    run()
    healthy, report = check_health()
    assert healthy and report["checks"]["sync_lock"] == {"status": "ok"}

    held = held_by("elsewhere;boot;ns|4242|99|n", silent_for=1, running_for=50)
    healthy, report = check_health()
    assert healthy, report
    assert report["checks"]["sync_lock"]["status"] == "ok"

    SyncRun.objects.filter(pk=held.pk).update(started_at=timezone.now() - dt.timedelta(seconds=101))
    healthy, report = check_health()
    assert not healthy
    assert report["checks"]["sync_lock"]["status"] == "stuck"
    assert report["checks"]["sync_lock"]["limit_seconds"] == 100
    # The values get IBKR_REQUEST_TIMEOUT more in all: 160 s.
    settings.IBKR_READ_VALUES = True
    assert check_health()[1]["checks"]["sync_lock"]["status"] == "ok"
    SyncRun.objects.filter(pk=held.pk).update(started_at=timezone.now() - dt.timedelta(seconds=161))
    assert check_health()[1]["checks"]["sync_lock"]["limit_seconds"] == 160
    settings.IBKR_READ_VALUES = False

    SyncRun.objects.filter(pk=held.pk).update(
        heartbeat_at=timezone.now() - dt.timedelta(seconds=40)
    )
    healthy, report = check_health()
    assert not healthy
    assert report["checks"]["sync_lock"]["status"] == "abandoned"


# --- time is the database's -----------------------------------------------------------------


@contextlib.contextmanager
def host_clock_off_by(seconds: float):
    """This process's clock runs `seconds` ahead (or behind): Django's now and time.time."""
    real_now, real_time = timezone.now, time.time
    skew = dt.timedelta(seconds=seconds)
    with (
        mock.patch("django.utils.timezone.now", side_effect=lambda: real_now() + skew),
        mock.patch("time.time", side_effect=lambda: real_time() + seconds),
    ):
        yield


def renewed(row: SyncRun, seconds_ago: float) -> None:
    """As its holder left it: its heartbeat `seconds_ago` on the database's clock."""
    SyncRun.objects.filter(pk=row.pk).update(
        heartbeat_at=Now() - dt.timedelta(seconds=seconds_ago),
        started_at=Now() - dt.timedelta(seconds=seconds_ago),
    )


@pytest.mark.parametrize("skew", [60, -60, 3600])
def test_a_host_clock_ahead_or_behind_never_takes_a_renewed_lock(settings, skew):
    """The review's finding: a process whose clock ran 60 s ahead released a lock renewed
    every second. Ages are the database's: the taker's clock does not count."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = 30
    held = held_by("elsewhere;boot;ns|4242|99|n")
    renewed(held, 1)
    with host_clock_off_by(skew):
        with pytest.raises(SyncAlreadyRunning):
            run()
        assert lock.release_abandoned() is False
        assert check_health()[1]["checks"]["sync_lock"]["status"] == "ok"
    held.refresh_from_db()
    assert held.status == "running"


@pytest.mark.parametrize("skew", [60, -60, -3600])
def test_a_lock_silent_on_the_databases_clock_is_released_whatever_the_hosts_clock(settings, skew):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held = held_by("elsewhere;boot;ns|4242|99|n")
    renewed(held, LOCK_TIMEOUT + 1)
    with host_clock_off_by(skew):
        assert run().created == 1
    held.refresh_from_db()
    assert (held.status, held.error_code) == ("failed", "abandoned")
    assert "no heartbeat for 4 s" in held.error_message


@pytest.mark.parametrize("skew", [60, -60])
def test_a_holder_with_a_skewed_clock_writes_the_databases_time(skew):
    """The holder's side: its start, heartbeats and end are the database's now, so its
    lock's age is right however wrong its own clock is."""
    with host_clock_off_by(skew):
        row = lock.acquire(trigger="api", user=None, account_id=None, dry_run=False)
        try:
            lock.Heartbeat.beat(mock.Mock(run_pk=row.pk))
        finally:
            lock.forget(row.pk)
    row.refresh_from_db()
    database = lock.database_now()
    for stamp in (row.started_at, row.heartbeat_at):
        assert abs((database - stamp).total_seconds()) < 5, (stamp, database)
    with host_clock_off_by(skew):
        result = run()
    finished = SyncRun.objects.get(pk=result.sync_run_id)
    assert abs((lock.database_now() - finished.finished_at).total_seconds()) < 5
    assert dt.timedelta(0) <= finished.finished_at - finished.started_at < dt.timedelta(seconds=5)


@pytest.mark.parametrize("skew", [60, -60])
def test_health_measures_the_lock_and_the_last_sync_on_the_databases_clock(settings, skew):
    settings.IBKR_SYNC_LOCK_TIMEOUT, settings.IBKR_READ_VALUES = 30, False
    settings.IBKR_CONNECT_TIMEOUT, settings.IBKR_REQUEST_TIMEOUT = 10, 60
    run()
    held = held_by("elsewhere;boot;ns|4242|99|n")
    renewed(held, 50)
    SyncRun.objects.filter(pk=held.pk).update(heartbeat_at=Now())
    with host_clock_off_by(skew):
        healthy, report = check_health()
    assert healthy, report
    assert 49 <= report["checks"]["sync_lock"]["held_seconds"] <= 55
    assert report["checks"]["last_sync"]["age_seconds"] < 5


# --- a run's end is recorded once ---------------------------------------------------------------


@pytest.mark.parametrize("code", ["sync_already_running", "internal_error", "database_unavailable"])
def test_a_runs_end_is_recorded_once(settings, code):
    """The review's finding: a run released as `abandoned` was re-stamped when its process
    resumed. Whatever a late attempt says, the first end stays."""
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    held = held_by("elsewhere;boot;ns|4242|99|n")
    renewed(held, LOCK_TIMEOUT + 1)
    assert lock.release_abandoned() is True
    held.refresh_from_db()
    first = (held.status, held.error_code, held.error_message, held.finished_at)

    assert services._fail_run(held, code, "late") is False
    held.refresh_from_db()
    assert (held.status, held.error_code, held.error_message, held.finished_at) == first


def test_a_successful_runs_end_is_not_overwritten_either():
    result = run()
    done = SyncRun.objects.get(pk=result.sync_run_id)
    assert services._fail_run(done, "internal_error", "late") is False
    assert SyncRun.objects.get(pk=done.pk).status == "success"


def test_a_claim_records_the_database_session_that_will_write():
    """On PostgreSQL `pid@backend start` (ISO 8601, what the next sync reads back to end
    that very session should this one freeze mid-write), taken by the claim's own
    statement; empty elsewhere."""
    row = SyncRun.objects.create(trigger="api", status="running", owner="me")
    lock.claim(row)
    row.refresh_from_db()
    if connection.vendor != "postgresql":
        assert row.database_session == ""
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        pid, started = cursor.fetchone()
    recorded_pid, _, recorded_start = row.database_session.partition("@")
    assert int(recorded_pid) == pid
    assert dt.datetime.fromisoformat(recorded_start) == started
    assert row.database_session == f"{pid}@{started.astimezone(dt.UTC).isoformat()}" or (
        started.microsecond == 0  # isoformat() leaves out a zero fraction; we print it
    )
