"""The sync lock: one `running` SyncRun row, held exactly as long as its holder works.

The lock is the one `running` SyncRun row (a partial unique constraint), and it is held
exactly as long as its holder works on it: a running sync renews the row's heartbeat
every IBKR_SYNC_LOCK_TIMEOUT / 3 seconds from a thread of its own, and stops when the
sync ends, however it ends. A row whose heartbeat is older than IBKR_SYNC_LOCK_TIMEOUT
belongs to no working sync (the process died, froze, or outlived a sync whose end it
could not record) and the next sync from any process on any host releases it. Why a
heartbeat rather than PostgreSQL's advisory locks: it works the same on SQLite, and a
pooled or proxied connection (pgbouncer) cannot keep a session lock anyway.

Two cases are released at once instead of after the timeout: a row of this very process
that is not among its running syncs, and a row of a process of this machine (same host
name, boot and pid namespace) that no longer exists, told apart from a reused pid by
its start time. Host name and pid alone are not an identity: containers share both.

Time is the database's: every time of a SyncRun (start, heartbeat, end) is the database's
now, and a heartbeat's age is measured against it, never against a host's clock (a host
whose clock runs ahead would otherwise take a lock its holder renews every second). On
SQLite, whose "database clock" is each process's own, a heartbeat silent by its age is
also watched for one beat before its lock is released (`_watch_heartbeat`).

A holder that lost its lock can never commit: it claims the lock again before it writes
(`claim`) and fences its write transaction with the row (`finish_holding`). Every wait on
the database during a sync is bounded (`bounded_waits`, `bound_transaction`), so a frozen
holder blocks the next sync for a bounded time at most, and the next sync ends what an
abandoned holder still holds of the database (`end_hold_on_database`): on PostgreSQL its
session, if it is in a transaction (recorded as `database_session` when it claimed the
lock to write), so its row locks go with it; on SQLite, whose write lock only the end of
the holding process gives back, its process, if it is a stopped process of this machine.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, OperationalError, connection, transaction
from django.db.models import CharField, Expression, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import selectors
from .conf import app_settings
from .database import unavailable_message
from .exceptions import DatabaseUnavailable, LockLost, SyncAlreadyRunning
from .models import DEFAULT_LOCK_KEY, Connection, SyncRun

logger = logging.getLogger(__name__)

# The runs this process has started and not yet finished.
_active_runs: set[int] = set()
_active_runs_lock = threading.Lock()


def acquire(
    *,
    trigger: str,
    user: Any,
    account_id: str | None,
    dry_run: bool,
    connection_row: Connection | None = None,
    queued: SyncRun | None = None,
) -> SyncRun:
    """Take the lock of the connection (`connection_row`; None: the settings' gateway): a
    `running` row with its key. A sync refused it is recorded as failed; a dry run, which
    leaves no record, is not.

    `queued`: a `queued` row (a sync a worker took from the task queue) becomes the lock
    itself, in one conditional UPDATE: claimed once, however often its task is delivered
    (`QueuedRunTaken` when it is no longer queued); refused, it is failed."""
    key = DEFAULT_LOCK_KEY if connection_row is None else connection_row.lock_key
    fields = {
        "trigger": trigger,
        "user": user if getattr(user, "is_authenticated", False) else None,
        "connection": connection_row,
        "connection_name": "" if connection_row is None else connection_row.name,
        "lock_key": key,
        "account_filter": account_id or "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "owner": process_identity().token,
    }
    if connection.vendor == "sqlite" and _write_lock_taken():
        # A holder stopped in its write keeps SQLite's write lock: the row below would wait
        # for it in vain. Released (and the holder ended) first, if it is abandoned,
        # whichever connection's lock it holds (SQLite has one write lock for all).
        for running in selectors.running_runs():
            release_abandoned(running.lock_key)
    for _attempt in range(2):
        try:
            # Registered as this process's in the same step: another thread of this
            # process must never see the row without it and take it for abandoned.
            with _active_runs_lock, transaction.atomic():
                bound_transaction("IBKR_SYNC_LOCK_TIMEOUT")
                if queued is not None:
                    run = _claim_queued(queued, fields)
                    _active_runs.add(run.pk)
                    return run
                run = SyncRun.objects.create(status=SyncRun.Status.RUNNING, **fields)
                # The database's clock, not this host's (auto_now_add takes the host's).
                SyncRun.objects.filter(pk=run.pk).update(started_at=Now(), heartbeat_at=Now())
                run.refresh_from_db(fields=["started_at", "heartbeat_at"])
                _active_runs.add(run.pk)
                return run
        except IntegrityError:
            if not release_abandoned(key):
                break
    of = "" if connection_row is None else f" of connection {connection_row.name!r}"
    error = SyncAlreadyRunning(
        f"Another IBKR sync{of} is running; this {'dry run' if dry_run else 'one'} was not "
        "started. Try again when it finishes."
    )
    if dry_run:
        raise error
    if queued is not None:
        fail_queued(queued, error.code, str(error))
        raise error
    with bounded_statements():
        refused = SyncRun.objects.create(
            status=SyncRun.Status.FAILED, error_code=error.code, error_message=str(error), **fields
        )
        # Finished when it started, on the database's clock (one statement, one now).
        SyncRun.objects.filter(pk=refused.pk).update(started_at=Now(), finished_at=Now())
    raise error


class QueuedRunTaken(Exception):
    """The queued run is no longer queued: another delivery of its task took it (or it
    was failed meanwhile). Nothing to do."""


def _claim_queued(queued: SyncRun, fields: dict[str, Any]) -> SyncRun:
    """Inside `acquire`'s transaction: the `queued` row turned `running` (the lock), or
    `QueuedRunTaken`; an IntegrityError if another row holds the connection's lock."""
    mine = {name: fields[name] for name in ("host", "pid", "owner")}
    claimed = SyncRun.objects.filter(pk=queued.pk, status=SyncRun.Status.QUEUED).update(
        status=SyncRun.Status.RUNNING, started_at=Now(), heartbeat_at=Now(), **mine
    )
    if not claimed:
        raise QueuedRunTaken(queued.pk)
    return SyncRun.objects.get(pk=queued.pk)


def fail_queued(run: SyncRun, code: str, message: str) -> bool:
    """Fail a run that is still `queued` (it never held the lock); True if it was."""
    with bounded_statements():
        failed = SyncRun.objects.filter(pk=run.pk, status=SyncRun.Status.QUEUED).update(
            status=SyncRun.Status.FAILED,
            error_code=code,
            error_message=message,
            started_at=Now(),
            finished_at=Now(),
        )
    return bool(failed)


def fail_all_queued(key: str, code: str, message: str) -> int:
    """Fail every `queued` run of lock `key` (none of them holds it); how many."""
    with bounded_statements():
        return SyncRun.objects.filter(lock_key=key, status=SyncRun.Status.QUEUED).update(
            status=SyncRun.Status.FAILED,
            error_code=code,
            error_message=message,
            started_at=Now(),
            finished_at=Now(),
        )


def release_abandoned(key: str = DEFAULT_LOCK_KEY) -> bool:
    """Fail the `running` row of lock `key` if no sync works on it any more; True if that
    lock is free."""
    running = selectors.running_run(key)
    if running is None:
        return True
    reason = abandoned_reason(running)
    if reason is None:
        return False
    if reason.startswith(SILENT) and connection.vendor == "sqlite":
        watched = _watch_heartbeat(running)
        if watched != "silent":
            return watched == "ended"
    # Its hold on the database goes before its lock: otherwise the next sync would wait on it.
    ended = end_hold_on_database(running)
    try:
        with bounded_statements():
            released = SyncRun.objects.filter(pk=running.pk, status=SyncRun.Status.RUNNING).update(
                status=SyncRun.Status.FAILED,
                error_code="abandoned",
                error_message=f"This sync stopped working on its lock before it finished "
                f"({reason}); the lock was released by a later sync{ended}.",
                finished_at=Now(),
            )
    except OperationalError as exc:
        if connection.vendor != "sqlite" or not _busy(exc):
            raise
        # Still locked: a holder this sync may not end. Say who it is, and what to do.
        raise DatabaseUnavailable(
            unavailable_message(exc, outcome="nothing was changed", retry="sync again")
            + " "
            + _holder_of_the_database(running, reason)
        ) from exc
    if released:
        logger.warning("Released the lock of abandoned IBKR sync #%s: %s", running.pk, reason)
    return True


def abandoned_reason(run: SyncRun, now: dt.datetime | None = None) -> str | None:
    """Why the `running` row `run` holds the lock for no working sync, or None if one
    still works on it. `now` is the database's (by default the `database_now` read with
    the row, else read now): a host's clock may be off by any amount."""
    me = process_identity()
    if run.owner == me.token:
        with _active_runs_lock:
            return None if run.pk in _active_runs else "its process is no longer running it"
    beat = run.heartbeat_at or run.started_at
    now = now or getattr(run, "database_now", None) or database_now()
    silent = (now - beat).total_seconds()
    if silent > app_settings.IBKR_SYNC_LOCK_TIMEOUT:
        return f"{SILENT} {silent:.0f} s"
    owner = _ProcessIdentity.parse(run.owner)
    on_this_machine = owner is not None and owner.machine and owner.machine == me.machine
    if on_this_machine and not _alive(owner.pid, owner.started):
        return "its process has ended"
    return None


#: How the reason of a lock released for its heartbeat's age starts.
SILENT = "no heartbeat for"


def _watch_heartbeat(run: SyncRun) -> str:
    """SQLite: whether the heartbeat of `run`, silent by its age, stays so for one beat on
    this process's monotonic clock: "silent", "renewed" (its holder works on it) or
    "ended" (its holder finished meanwhile). SQLite runs inside each process and reads
    that process's clock, so on SQLite "the database's clock" is only as right as two
    processes' clocks agree (a shared folder of another machine, a clock faked for one
    process); a holder that is still renewing is seen renewing, whatever the clocks say.
    Not watched: a holder known to have ended, or known stopped (it cannot renew)."""
    holder = _ProcessIdentity.parse(run.owner)
    if holder is not None and holder.machine and holder.machine == process_identity().machine:
        stat = _stat(holder.pid)
        if stat is None or stat[1] != holder.started or stat[0] in ("T", "t", "Z", "X"):
            return "silent"
    beat = run.heartbeat_at
    interval = app_settings.IBKR_SYNC_LOCK_TIMEOUT / 3
    deadline = time.monotonic() + 1.5 * interval + 0.5  # a beat, and its write's wait
    while time.monotonic() < deadline:
        time.sleep(min(0.1, interval / 4))
        now = SyncRun.objects.filter(pk=run.pk).values_list("status", "heartbeat_at").first()
        if now is None or now[0] != SyncRun.Status.RUNNING:
            return "ended"
        if now[1] != beat:
            return "renewed"
    return "silent"


@dataclass(frozen=True)
class _ProcessIdentity:
    """Who holds a lock: `machine` names where `pid` means one process (host name, boot id
    and pid namespace; empty where the system does not tell), `started` tells a reused pid
    apart, `nonce` makes the token unique to this process even so."""

    machine: str
    pid: int
    started: str
    nonce: str

    @property
    def token(self) -> str:
        return f"{self.machine}|{self.pid}|{self.started}|{self.nonce}"

    @classmethod
    def parse(cls, token: str) -> _ProcessIdentity | None:
        parts = (token or "").split("|")
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3])


_identity: _ProcessIdentity | None = None


def process_identity() -> _ProcessIdentity:
    """This process's identity; made anew after a fork (a pre-forking server's workers)."""
    global _identity
    if _identity is None or _identity.pid != os.getpid():
        pid = os.getpid()
        started = _start_time(pid) or ""
        boot, namespace = _read("/proc/sys/kernel/random/boot_id"), _pid_namespace()
        machine = f"{socket.gethostname()};{boot};{namespace}" if boot and namespace else ""
        _identity = _ProcessIdentity(machine, pid, started, uuid.uuid4().hex[:12])
    return _identity


def _alive(pid: int, started: str) -> bool:
    """Whether process `pid`, started at `started`, still runs: not gone, not another
    process under a reused pid, and not a zombie (ended, not yet reaped: in a container
    whose first process reaps no orphans, it never is)."""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[0] not in ("Z", "X")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), or None if
    there is no such process (or no /proc)."""
    stat = _stat(pid)
    return stat[1] if stat else None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process `pid` (fields 3 and 22 of /proc/PID/stat: `T` stopped
    by a signal, `t` by a debugger, `Z` ended but not yet reaped), or None if there is no
    such process (or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[-1].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


class Heartbeat:
    """Renews a running sync's lock from a thread of its own until stopped, or until the
    sync has run for IBKR_SYNC_STALE_AFTER (a sync that long is stuck: its lock lapses)."""

    def __init__(self, run_pk: int) -> None:
        self.run_pk = run_pk
        self.interval = app_settings.IBKR_SYNC_LOCK_TIMEOUT / 3
        self.deadline = time.monotonic() + app_settings.IBKR_SYNC_STALE_AFTER
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"ibkr-sync-heartbeat-{run_pk}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # A beat blocked on a busy database finishes by itself; the sync does not wait.
        self._thread.join(timeout=1)

    def _run(self) -> None:
        try:
            with bounded_waits():  # this thread's own connection
                while not self._stop.wait(self.interval):
                    if time.monotonic() > self.deadline:
                        logger.warning(
                            "IBKR sync #%s has run for longer than IBKR_SYNC_STALE_AFTER; its "
                            "lock is no longer renewed",
                            self.run_pk,
                        )
                        return
                    self.beat()
        except DatabaseError:
            logger.info("Could not renew the lock of IBKR sync #%s", self.run_pk, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def beat(self) -> None:
        try:
            with bounded_statements():
                SyncRun.objects.filter(pk=self.run_pk, status=SyncRun.Status.RUNNING).update(
                    heartbeat_at=Now()
                )
        except DatabaseError:
            # The sync itself meets the same database; a missed beat only shortens the lock.
            logger.info("Could not renew the lock of IBKR sync #%s", self.run_pk, exc_info=True)


def claim(run: SyncRun) -> None:
    """Before the write transaction: still the holder? Renews the lock and records the
    database session that will write (PostgreSQL), so that a later sync can end that
    session should this one be abandoned mid-write. Raises `LockLost` (nothing written)
    if the lock was released meanwhile."""
    with bounded_statements():
        held = SyncRun.objects.filter(pk=run.pk, status=SyncRun.Status.RUNNING).update(
            heartbeat_at=Now(), database_session=_database_session()
        )
    if not held:
        raise LockLost(LOCK_LOST)


def finish_holding(run: SyncRun) -> None:
    """Save the finished run, if it still holds the lock; otherwise undo the whole sync.

    Called inside the write transaction, just before its commit: the fencing token. A
    sync whose heartbeat stopped for longer than IBKR_SYNC_LOCK_TIMEOUT (a suspended
    machine, a frozen process) can find its lock released and taken by a later sync: its
    writes must not land as well. The check is a write, so that it holds on both
    databases until the commit: the row lock on PostgreSQL (a concurrent release waits,
    then finds the row no longer running), the database's write lock on SQLite (taken by
    the write, at the latest; a snapshot older than a release cannot write at all).
    The check and the save are one UPDATE: the run's row is written only if it is still
    running (still this sync's lock).
    """
    finished_at = database_now()
    held = SyncRun.objects.filter(pk=run.pk, status=SyncRun.Status.RUNNING).update(
        heartbeat_at=Now(),
        finished_at=finished_at,
        **{name: getattr(run, name) for name in SAVED_AT_THE_END},
    )
    if not held:
        raise LockLost(LOCK_LOST)
    run.finished_at = finished_at


#: What a finished sync records of itself (`finish_holding` saves these and its end).
SAVED_AT_THE_END = (
    "status", "accounts", "processed", "created", "updated", "unchanged", "reopened",
    "closed", "errors", "error_details", "account_values", "accounts_refused", "ledger",
    "period_from", "period_to", "history_only", "statement",
)  # fmt: skip

LOCK_LOST = (
    "This sync's lock was released while it ran (it looked abandoned) and another sync may "
    "have run meanwhile, so its changes were rolled back. Sync again."
)


def forget(run_pk: int) -> None:
    """This process no longer runs `run_pk` (it finished, however)."""
    with _active_runs_lock:
        _active_runs.discard(run_pk)


# --- the database's clock, and bounded waits ---------------------------------------------


def database_now() -> dt.datetime:
    """The database's now, as Django reads its datetimes back (aware in UTC with USE_TZ):
    every age of the lock is measured on it."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            # What Django's Now() writes on SQLite: UTC text, as the datetimes it stores.
            cursor.execute("SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'NOW')")
            now = parse_datetime(cursor.fetchone()[0])
            return timezone.make_aware(now, dt.UTC) if settings.USE_TZ else now
        # As Django's Now(): the statement's time, not its transaction's start.
        cursor.execute(
            "SELECT STATEMENT_TIMESTAMP()"
            if connection.vendor == "postgresql"
            else "SELECT CURRENT_TIMESTAMP"
        )
        return cursor.fetchone()[0]


def _milliseconds(setting: str) -> int:
    return max(1, round(getattr(app_settings, setting) * 1000))


@contextmanager
def bounded_waits() -> Iterator[None]:
    """For as long as a sync (or its heartbeat) works: on SQLite, this connection waits
    for another's write lock at most IBKR_SYNC_LOCK_TIMEOUT (the busy timeout), then
    fails with "database is locked"; set back afterwards. (PostgreSQL's waits are bounded
    per transaction: `bound_transaction`.)"""
    if connection.vendor != "sqlite":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        before = cursor.fetchone()[0]
        cursor.execute(f"PRAGMA busy_timeout = {_milliseconds('IBKR_SYNC_LOCK_TIMEOUT')}")
    try:
        yield
    finally:
        if connection.connection is not None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute(f"PRAGMA busy_timeout = {int(before)}")
            except DatabaseError:
                pass  # the connection went with the sync's error: a new one starts afresh


def bound_transaction(statement_setting: str = "IBKR_SYNC_STALE_AFTER") -> None:
    """Inside a transaction, on PostgreSQL: no wait for a row lock longer than
    IBKR_SYNC_LOCK_TIMEOUT (a frozen holder's rows, the lock row), no statement longer
    than `statement_setting`; then the statement fails (55P03 / 57014: the sync fails
    as "database unavailable", and is recorded). For the transaction only (SET LOCAL)."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('lock_timeout', %s, true), "
            "set_config('statement_timeout', %s, true)",
            [
                f"{_milliseconds('IBKR_SYNC_LOCK_TIMEOUT')}ms",
                f"{_milliseconds(statement_setting)}ms",
            ],
        )


@contextmanager
def bounded_statements() -> Iterator[None]:
    """The lock's own statements, none of them waiting or running longer than
    IBKR_SYNC_LOCK_TIMEOUT: on PostgreSQL in a transaction of their own that says so; on
    SQLite as they are (the connection's busy timeout bounds them: `bounded_waits`)."""
    if connection.vendor != "postgresql":
        yield
        return
    with transaction.atomic():
        bound_transaction("IBKR_SYNC_LOCK_TIMEOUT")
        yield


def end_hold_on_database(run: SyncRun) -> str:
    """End what abandoned `run`'s holder still holds of the database, so that the next sync
    need not wait for it: on PostgreSQL its session, if it is in a transaction; on SQLite
    (written only by processes of one machine) its process, if it is a stopped process of
    this machine and the database's write lock is taken. IBKR_SYNC_END_FROZEN_HOLDERS off:
    nothing is ended, and the next sync's waits end at IBKR_SYNC_LOCK_TIMEOUT. Returns a
    note for the run's error message."""
    if not app_settings.IBKR_SYNC_END_FROZEN_HOLDERS:
        return ""
    if connection.vendor == "postgresql":
        return _end_database_session(run)
    if connection.vendor == "sqlite":
        return _end_stopped_process(run)
    return ""


#: How long the next sync waits for a process it ended to be gone (its locks with it).
PROCESS_END_WAIT = 5.0


def _end_stopped_process(run: SyncRun) -> str:
    """SQLite: end the process of abandoned `run` if it is stopped (SIGSTOP, SIGTSTP, a
    debugger) while the database's write lock is taken: a stopped process holds the lock
    for as long as it stays stopped, and only its end gives it back (the kernel releases
    its file locks; its transaction never commits). SIGKILL, because a SIGTERM would wait
    for as long as the process stays stopped. Only that process: of this machine, by its
    pid and start time (a pid reused by another process is never signalled), never this
    process. Returns a note for the run's error message."""
    holder = _ProcessIdentity.parse(run.owner)
    me = process_identity()
    if holder is None or not holder.machine or holder.machine != me.machine:
        return ""
    if holder.pid == me.pid or not _write_lock_taken():
        return ""
    # A handle on the process itself: the signal cannot reach another that reuses its pid.
    try:
        handle = os.pidfd_open(holder.pid)
    except OSError:
        return ""  # gone already, or no pidfd (Linux < 5.3): it is not signalled
    try:
        stat = _stat(holder.pid)
        if stat is None or stat[1] != holder.started or stat[0] not in ("T", "t"):
            return ""  # another process now, or not stopped: it may be working
        try:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        except ProcessLookupError:
            return ""
        except PermissionError:
            logger.warning(
                "Could not end the stopped process %s of abandoned IBKR sync #%s: it holds "
                "the database's write lock until it is resumed or ended (not permitted).",
                holder.pid, run.pk,
            )  # fmt: skip
            return f"; its process {holder.pid} was stopped and could not be ended (not permitted)"
        gone = select.poll()
        gone.register(handle, select.POLLIN)  # readable once the process has ended
        ended = bool(gone.poll(PROCESS_END_WAIT * 1000))
    finally:
        os.close(handle)
    if not ended:
        return f"; its process {holder.pid} was stopped, and did not end in time when ended"
    logger.warning(
        "Ended the stopped process %s of abandoned IBKR sync #%s, which held the database's "
        "write lock",
        holder.pid, run.pk,
    )  # fmt: skip
    return (
        f"; its process {holder.pid} was stopped and was ended so that its database lock "
        "was released"
    )


def _write_lock_taken() -> bool:
    """SQLite: whether another connection holds the database's write lock right now (asked
    without waiting). False inside a transaction, where it cannot be asked."""
    if connection.in_atomic_block:
        return False
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        before = cursor.fetchone()[0]
        cursor.execute("PRAGMA busy_timeout = 0")
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except OperationalError as exc:
            return _busy(exc)
        else:
            cursor.execute("ROLLBACK")
            return False
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {int(before)}")


def _busy(exc: BaseException) -> bool:
    """SQLite's "database is locked": another connection holds the write lock."""
    return "database is locked" in str(exc)


def _holder_of_the_database(run: SyncRun, reason: str) -> str:
    """What an operator needs when an abandoned holder keeps the database locked: which
    process it is, why it was not ended, and what to do."""
    holder = _ProcessIdentity.parse(run.owner)
    where = f"pid {holder.pid if holder else run.pid} on host {run.host or 'unknown'}"
    text = f"The lock of IBKR sync #{run.pk} is abandoned ({reason}), but its process ({where})"
    if holder is None or not holder.machine or holder.machine != process_identity().machine:
        return (
            f"{text} is not of this machine, so it was not ended: end it there, or wait "
            "for it to end."
        )
    stat = _stat(holder.pid)
    if stat is None or stat[1] != holder.started:
        return (
            f"{text} has ended; another connection holds the database's write lock: find "
            "the process that has the database open in a long transaction."
        )
    if not app_settings.IBKR_SYNC_END_FROZEN_HOLDERS:
        return (
            f"{text} may hold the database; IBKR_SYNC_END_FROZEN_HOLDERS is off, so it was "
            f"not ended: resume it (kill -CONT {holder.pid}) or end it (kill {holder.pid})."
        )
    if stat[0] in ("T", "t"):
        return (
            f"{text} is stopped and could not be ended: resume it (kill -CONT {holder.pid}) "
            f"or end it (kill -KILL {holder.pid})."
        )
    return (
        f"{text} is running (state {stat[0]}), so it was not ended: it may still be "
        f"writing. If it hangs, end it (kill {holder.pid}), then sync again."
    )


def _database_session() -> Expression:
    """This connection's session on PostgreSQL, as `pid@backend start` (a pid alone may
    be reused by a later session; the start in ISO 8601, UTC, to the microsecond), taken
    by the statement that records it (no query of its own); empty elsewhere."""
    if connection.vendor != "postgresql":
        return Value("")
    return RawSQL(
        "COALESCE((SELECT pid::text || '@' || to_char(backend_start AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00' FROM pg_stat_activity "
        "WHERE pid = pg_backend_pid()), '')",
        (),
        output_field=CharField(),
    )


def _end_database_session(run: SyncRun) -> str:
    """End the database session of abandoned `run` if it is still in a transaction (a
    frozen process mid-write): its transaction rolls back and its row locks go, so the
    next sync need not wait for them. Needs the same database role or pg_signal_backend;
    without it the session is left and the next sync's waits end at lock_timeout.
    Returns a note for the run's error message."""
    pid, _, started = (run.database_session or "").partition("@")
    if connection.vendor != "postgresql" or not pid.isdigit() or not started:
        return ""
    wait = ", 5000" if connection.pg_version >= 140000 else ""  # wait for it to end
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "
                "WHERE pid = %s AND backend_start = %s AND xact_start IS NOT NULL "
                "AND pid <> pg_backend_pid()",
                [int(pid), dt.datetime.fromisoformat(started)],
            )
            row = cursor.fetchone()
    except DatabaseError as exc:
        logger.warning(
            "Could not end the database session %s of abandoned IBKR sync #%s (%s): its row "
            "locks stay until it ends; a sync waiting on them fails after "
            "IBKR_SYNC_LOCK_TIMEOUT. Let the database role signal it (pg_signal_backend).",
            pid, run.pk, str(exc).strip(),
        )  # fmt: skip
        return "; its database session could not be ended (not permitted)"
    if row is None:
        return ""  # not in a transaction (or gone): it holds no row locks
    if not row[0]:
        return "; its database session did not end in time"
    logger.warning("Ended the database session %s of abandoned IBKR sync #%s", pid, run.pk)
    return f"; its database session (pid {pid}) was ended, rolling back its writes"
