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
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, models, transaction
from django.utils import timezone

from . import conf
from .exceptions import SyncAlreadyRunning
from .models import SyncRun

logger = logging.getLogger(__name__)

# The runs this process has started and not yet finished.
_active_runs: set[int] = set()
_active_runs_lock = threading.Lock()


def acquire(*, trigger: str, user: Any, account_id: str | None, dry_run: bool) -> SyncRun:
    """Take the lock: a `running` row. A sync refused it is recorded as failed; a dry run,
    which leaves no record, is not."""
    fields = {
        "trigger": trigger,
        "user": user if getattr(user, "is_authenticated", False) else None,
        "account_filter": account_id or "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "owner": process_identity().token,
    }
    for _attempt in range(2):
        try:
            # Registered as this process's in the same step: another thread of this
            # process must never see the row without it and take it for abandoned.
            with _active_runs_lock, transaction.atomic():
                run = SyncRun.objects.create(
                    status=SyncRun.Status.RUNNING, heartbeat_at=timezone.now(), **fields
                )
                _active_runs.add(run.pk)
                return run
        except IntegrityError:
            if not release_abandoned():
                break
    error = SyncAlreadyRunning(
        f"Another IBKR sync is running; this {'dry run' if dry_run else 'one'} was not "
        "started. Try again when it finishes."
    )
    if dry_run:
        raise error
    refused = SyncRun.objects.create(
        status=SyncRun.Status.FAILED, error_code=error.code, error_message=str(error), **fields
    )
    # Finished when it started (auto_now_add stamps started_at as the row is saved).
    SyncRun.objects.filter(pk=refused.pk).update(finished_at=models.F("started_at"))
    raise error


def release_abandoned() -> bool:
    """Fail the `running` row if no sync works on it any more; True if the lock is free."""
    running = SyncRun.objects.filter(status=SyncRun.Status.RUNNING).first()
    if running is None:
        return True
    reason = abandoned_reason(running)
    if reason is None:
        return False
    released = SyncRun.objects.filter(pk=running.pk, status=SyncRun.Status.RUNNING).update(
        status=SyncRun.Status.FAILED,
        error_code="abandoned",
        error_message=f"This sync stopped working on its lock before it finished ({reason}); "
        "the lock was released by a later sync.",
        finished_at=timezone.now(),
    )
    if released:
        logger.warning("Released the lock of abandoned IBKR sync #%s: %s", running.pk, reason)
    return True


def abandoned_reason(run: SyncRun, now: dt.datetime | None = None) -> str | None:
    """Why the `running` row `run` holds the lock for no working sync, or None if one
    still works on it."""
    me = process_identity()
    if run.owner == me.token:
        with _active_runs_lock:
            return None if run.pk in _active_runs else "its process is no longer running it"
    beat = run.heartbeat_at or run.started_at
    silent = ((now or timezone.now()) - beat).total_seconds()
    if silent > float(conf.get("IBKR_SYNC_LOCK_TIMEOUT")):
        return f"no heartbeat for {silent:.0f} s"
    owner = _ProcessIdentity.parse(run.owner)
    on_this_machine = owner is not None and owner.machine and owner.machine == me.machine
    if on_this_machine and _start_time(owner.pid) != owner.started:
        return "its process has ended"
    return None


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


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), or None if
    there is no such process (or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


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
        self.interval = float(conf.get("IBKR_SYNC_LOCK_TIMEOUT")) / 3
        self.deadline = time.monotonic() + float(conf.get("IBKR_SYNC_STALE_AFTER"))
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
            while not self._stop.wait(self.interval):
                if time.monotonic() > self.deadline:
                    logger.warning(
                        "IBKR sync #%s has run for longer than IBKR_SYNC_STALE_AFTER; its lock "
                        "is no longer renewed",
                        self.run_pk,
                    )
                    return
                self.beat()
        finally:
            connection.close()  # this thread's own connection

    def beat(self) -> None:
        try:
            SyncRun.objects.filter(pk=self.run_pk, status=SyncRun.Status.RUNNING).update(
                heartbeat_at=timezone.now()
            )
        except DatabaseError:
            # The sync itself meets the same database; a missed beat only shortens the lock.
            logger.info("Could not renew the lock of IBKR sync #%s", self.run_pk, exc_info=True)


def finish_holding(run: SyncRun) -> None:
    """Save the finished run, if it still holds the lock; otherwise undo the whole sync.

    A sync whose heartbeat stopped for longer than IBKR_SYNC_LOCK_TIMEOUT (a suspended
    machine, a stalled process) can find its lock released and taken by a later sync: its
    writes must not land as well.
    """
    # Row-locked until the commit, so the lock cannot be released between check and save.
    holding = SyncRun.objects.select_for_update().filter(pk=run.pk, status=SyncRun.Status.RUNNING)
    if not holding.exists():
        raise SyncAlreadyRunning(
            "This sync's lock was released while it ran (it looked abandoned) and another "
            "sync may have run meanwhile, so its changes were rolled back. Sync again."
        )
    run.save()


def forget(run_pk: int) -> None:
    """This process no longer runs `run_pk` (it finished, however)."""
    with _active_runs_lock:
        _active_runs.discard(run_pk)
