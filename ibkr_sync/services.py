"""The sync: the one entry point that writes positions, for the API, command and admin.

Order of work: take the lock (`lock.py`: a `running` SyncRun row, renewed by a heartbeat
while the sync works), read the gateway (network, outside any transaction), map its
snapshot (`mapping.map_snapshot`, outside too), then write it in one short transaction
(`writer.py`), fenced by the lock and with every wait bounded. Any failure leaves every
position as it was and marks the SyncRun failed with the reason. Never inside a caller's
transaction: refused.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    connection,
    transaction,
)
from django.db.models import F, Max
from django.db.models.functions import Now
from django.utils import timezone

from . import connections, lock, signals
from .conf import app_settings
from .database import is_deadlock, is_unavailable, unavailable_message
from .exceptions import (
    ConnectionDisabled,
    DatabaseUnavailable,
    GatewayError,
    IbkrSyncError,
    InvalidPeriod,
    LockLost,
    QueueUnavailable,
    SyncInsideTransaction,
    UnknownConnection,
)
from .mapping import (
    BROKER,
    MappedSnapshot,
    map_snapshot,
    normalize_account_id,
    statement_key,
    written_positions,
)
from .models import (
    DEFAULT_LOCK_KEY,
    AccountReport,
    Connection,
    PositionChange,
    SyncRun,
)
from .outcomes import RecordError, ValuesOutcome
from .snapshot import Repeat, Snapshot
from .writer import (
    KINDS,
    PositionsChanged,
    Written,
    apply_snapshot,
    instruments_changed,
    owned_refusals,
    refusals,
    reported_digests,
    reported_moments,
    statement_counts,
    statement_ranges,
    stored_digests,
    touch_accounts,
)
from .writer import (
    refusal_why as refusal_why,  # for the entry points, which say refusals
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PositionSource(Protocol):
    """What the service needs from a source (tests pass a fake): one read, as a snapshot."""

    def fetch_positions(self, account_id: str | None = None) -> Snapshot: ...


@dataclass(frozen=True)
class SyncResult:
    sync_run_id: int | None  # None for a dry run, which keeps no record
    accounts: list[str]
    processed: int
    created: int
    updated: int
    unchanged: int
    reopened: int
    closed: int
    errors: list[dict[str, Any]]
    by_account: dict[str, dict[str, int]]
    started_at: dt.datetime
    finished_at: dt.datetime
    dry_run: bool = False
    # The connection synced (its name); empty: the settings' gateway.
    connection: str = ""
    # A dry run only: what a sync would change, position by position.
    changes: list[dict[str, Any]] | None = None
    # Per account, when values were asked for: {"status": "read", ...} or
    # {"status": "missing", "reason": ...} (its stored values were kept).
    account_values: dict[str, dict[str, Any]] | None = None
    # The accounts reported but not written, with the reason: a newer snapshot of them
    # (from another connection) was applied already. Not among `accounts`.
    accounts_refused: dict[str, str] = field(default_factory=dict)
    # The ledger rows written, by kind: {"trades": {"created": n, "updated": n,
    # "unchanged": n}, ...}; empty when the source read no ledger (TWS) or none is kept.
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)
    # The period the source read (a Flex statement's first and last day), else None.
    period: tuple[dt.date, dt.date] | None = None
    # Only the history was written (an older window of a back-fill).
    history_only: bool = False
    # The account snapshots written: {"created": n, "updated": n, "unchanged": n} (a
    # sync's own, and one per day of a Flex statement's period).
    snapshots: dict[str, int] = field(default_factory=dict)

    @property
    def scope(self) -> str:
        return f"{self.processed} positions in {len(self.accounts)} account(s)"

    @property
    def outcome(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.reopened} reopened, {self.closed} closed, {len(self.errors)} errors"
        )


#: Called with a phase ("read": positions received so far, "apply": positions to write).
Progress = Callable[[str, int], None]


def sync_positions(
    account_id: str | None = None,
    *,
    trigger: str,
    user: Any = None,
    gateway: PositionSource | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    connection: str | Connection | None = None,
) -> SyncResult:
    """Bring the database in line with the gateway's positions (of one account, if given).

    `connection` names the `Connection` to sync (its name, or the row); None: the only
    connection, or the settings' gateway when there is none (`connections.resolve`).
    Syncs of different connections run side by side; each connection has its own lock.

    Refuses to run inside a transaction (`SyncInsideTransaction`): the SyncRun row (the
    lock and the audit record) has to be committed on its own so it is visible to other
    processes and survives a failed sync; the caller's rollback would take it along.

    `dry_run` does everything a sync does, under the same lock, then rolls the writes
    back and deletes its SyncRun row: the result says what a sync would change now.
    """
    _refuse_inside_a_transaction()
    with _unavailable_says("nothing was changed", "sync again"), lock.bounded_waits():
        target = connections.resolve(connection)
        return _sync_positions(account_id, trigger, user, gateway, dry_run, progress, target)


@contextlib.contextmanager
def _unavailable_says(outcome: str, retry: str) -> Iterator[None]:
    """A database that is down, unreachable, out of storage, read-only, locked or not
    migrated, met in the block, is `DatabaseUnavailable` saying which, what became of the
    work (`outcome`) and what to do (`retry`); any other database error is raised as it is."""
    try:
        yield
    except (DatabaseError, InterfaceError) as exc:
        if not is_unavailable(exc):
            raise
        raise DatabaseUnavailable(unavailable_message(exc, outcome=outcome, retry=retry)) from exc


def queues() -> bool:
    """Whether syncs started by the API and the admin go to the task queue
    (IBKR_SYNC_TASK_QUEUE) rather than run in the request."""
    return bool(app_settings.IBKR_SYNC_TASK_QUEUE)


def queue_sync(
    account_id: str | None = None,
    *,
    trigger: str,
    user: Any = None,
    connection: str | Connection | None = None,
) -> SyncRun:
    """Record a `queued` sync of `connection` (resolved as `sync_positions` resolves it)
    and hand it to the task queue once the current transaction commits (at once outside
    one): a worker runs it (`run_queued`). The row is not the lock: any number of syncs
    of one connection may be queued; the worker takes the lock when it starts one, and a
    queued row that no worker ever takes blocks nothing.

    Raises what `sync_positions` raises for its arguments, `DatabaseUnavailable`, and
    `QueueUnavailable` when the queue refuses the task (the run is then failed)."""
    if account_id is not None:
        account_id = normalize_account_id(account_id)
    with _unavailable_says("nothing was queued", "sync again"):
        target = connections.resolve(connection)
        with lock.bounded_statements():
            run = SyncRun.objects.create(**_queued_row(target, trigger, user, account_id))
            # The database's clock, as every time of a run.
            SyncRun.objects.filter(pk=run.pk).update(queued_at=Now(), started_at=Now())
    run.refresh_from_db()
    _send_when_committed(run, target)
    return run


def _queued_row(target: connections.Target, trigger: str, user: Any, account_id: str | None):
    """The fields of a `queued` run of `target` (its times are set by the database)."""
    return {
        "status": SyncRun.Status.QUEUED,
        "trigger": trigger,
        "user": user if getattr(user, "is_authenticated", False) else None,
        "connection": target.connection,
        "connection_name": target.name,
        "lock_key": DEFAULT_LOCK_KEY if target.connection is None else target.connection.lock_key,
        "account_filter": account_id or "",
    }


def _send_when_committed(run: SyncRun, target: connections.Target) -> None:
    """Hand queued `run` to the queue once the current transaction commits (at once outside
    one); raises `QueueUnavailable` when the queue refuses it then."""
    kind = Connection.Kind.TWS if target.connection is None else target.connection.kind
    transaction.on_commit(functools.partial(_dispatch, run, kind))
    logger.info("IBKR sync queued %s", _fields({"run": run.pk, "trigger": run.trigger}))


def queue_scheduled(connection_id: int) -> SyncRun | None:
    """A connection's schedule came due (`tasks.sync_scheduled`): queue its sync, as
    `queue_sync` does (trigger `schedule`), unless a sync of it is queued already or
    running, which this one would only repeat (a worker down, a sync longer than the
    schedule's interval: no pile of identical syncs). Returns the run queued, or the
    queued run whose task was sent again (below); None when nothing was sent, and why is
    logged. Raises what `queue_sync` raises (a connection removed or disabled since:
    `UnknownConnection`, `ConnectionDisabled`).

    What only looks queued or running must not stop the schedule for good (nothing else
    would ever sync the connection again):

    - a `running` row whose holder stopped working on it (a worker killed mid-sync) is
      released first (`lock.release_abandoned`, as the next sync of any kind releases it);
    - a `queued` row that has waited longer than IBKR_SYNC_STALE_AFTER (`/healthz` calls
      that a backlog) may be one whose task the broker lost (restarted without its data,
      flushed, or the process that queued it killed before it sent the task), or one
      still waiting behind others: its task is sent again, no new run is queued. Lost, the
      new task runs it; waiting, whichever delivery comes first takes it and the other
      does nothing (`run_queued`). Replacing it by a new run instead would send the
      connection's sync to the back of a long queue at each firing, never to be reached.

    The check and the queued row are one transaction that holds the connection first
    (`_hold_for_queueing`), so two beats firing the same schedule at the same moment
    (two beat processes, a beat restarted) queue it once: the second decides on what the
    first committed. The task is sent once that transaction commits."""
    with _unavailable_says("nothing was queued", "sync again"):
        # Before the transaction that holds the connection: an abandoned holder may still
        # hold its row (a frozen write), which releasing it ends.
        lock.release_abandoned(Connection(pk=connection_id).lock_key)
        with transaction.atomic():
            row = _hold_for_queueing(connection_id)
            waiting = SyncRun.objects.filter(
                lock_key=row.lock_key, status__in=(SyncRun.Status.QUEUED, SyncRun.Status.RUNNING)
            )
            overdue = waiting.filter(
                status=SyncRun.Status.QUEUED,
                queued_at__lt=Now() - dt.timedelta(seconds=app_settings.IBKR_SYNC_STALE_AFTER),
            )
            live = waiting.exclude(pk__in=overdue.values("pk")).order_by("pk")
            live = live.values_list("pk", "status").first()
            if live is not None:
                logger.info(
                    "IBKR sync of connection %s not queued by its schedule: #%s is %s already",
                    row.name,
                    *live,
                )
                return None
            overdue = list(overdue.order_by("pk"))
            if not overdue:
                return queue_sync(trigger=SyncRun.Trigger.SCHEDULE, connection=row)
            for run in overdue:
                logger.warning(
                    "IBKR sync #%s of connection %s has waited in the queue longer than "
                    "IBKR_SYNC_STALE_AFTER: its task is sent again (lost by the broker, or "
                    "behind others: it runs once either way)",
                    run.pk,
                    row.name,
                )
                transaction.on_commit(functools.partial(_dispatch, run, row.kind))
            return overdue[0]


def _hold_for_queueing(connection_id: int) -> Connection:
    """Inside `queue_scheduled`'s transaction: the connection's row, held until the commit
    by whoever queues a scheduled sync of it, waited for at most IBKR_SYNC_LOCK_TIMEOUT.
    PostgreSQL: the row locked (FOR NO KEY UPDATE, which a sync's write transaction also
    takes; inserting a run that refers to it is not held up). SQLite, which locks the whole
    database and ignores FOR UPDATE: the transaction writes first (an UPDATE of the row to
    itself), which takes the database's write lock at once, whatever the transaction mode
    (a deferred transaction that read first could not write after another writer).
    `UnknownConnection` if it no longer exists."""
    if connection.vendor == "sqlite":
        held = Connection.objects.filter(pk=connection_id).update(name=F("name"))
        row = Connection.objects.filter(pk=connection_id).first() if held else None
    else:
        lock.bound_transaction("IBKR_SYNC_LOCK_TIMEOUT")
        row = Connection.objects.select_for_update(no_key=True).filter(pk=connection_id).first()
    if row is None:
        raise UnknownConnection(f"Connection #{connection_id} no longer exists.")
    return row


def _dispatch(run: SyncRun, kind: str) -> None:
    """Hand queued `run` to the queue (the task module imports Celery; nothing else of the
    app does). A refusal fails the run, and is `QueueUnavailable`."""
    try:
        from . import tasks

        tasks.enqueue(run.pk, kind)
    except Exception as exc:
        message = (
            f"The task queue (IBKR_SYNC_TASK_QUEUE={app_settings.IBKR_SYNC_TASK_QUEUE}) did "
            f"not take the sync: {type(exc).__name__}: {str(exc).rstrip('.')}. Is its broker "
            "running?"
        )
        logger.warning("IBKR sync #%s could not be queued: %s", run.pk, message)
        lock.fail_queued(run, QueueUnavailable.code, message)
        raise QueueUnavailable(message) from exc


def run_queued(sync_run_id: int, progress: Progress | None = None) -> SyncResult | None:
    """Run the queued sync `sync_run_id` (a worker's part): its row becomes the lock, and
    the sync goes as `sync_positions` does, recorded in that same row. None if the row is
    not `queued` (gone, or taken by another delivery of its task: nothing is run twice).
    A sync refused the lock fails the row as `sync_already_running`; every failure is
    recorded in the row and raised, as by `sync_positions`."""
    _refuse_inside_a_transaction()
    with _unavailable_says("nothing was changed", "sync again"), lock.bounded_waits():
        run = (
            SyncRun.objects.select_related("user", "connection")
            .filter(pk=sync_run_id, status=SyncRun.Status.QUEUED)
            .first()
        )
        if run is None:
            logger.info("IBKR sync #%s is not queued (any more): not run", sync_run_id)
            _end_if_abandoned(sync_run_id)
            return None
        try:
            target = _queued_target(run)
        except IbkrSyncError as exc:
            lock.fail_queued(run, exc.code, str(exc))
            raise
        try:
            return _sync_positions(
                run.account_filter or None, run.trigger, run.user, None, False, progress,
                target, queued=run,
            )  # fmt: skip
        except lock.QueuedRunTaken:
            logger.info("IBKR sync #%s was taken by another worker: not run", sync_run_id)
            return None


def queued_kind(sync_run_id: int) -> str | None:
    """The kind of the connection queued run `sync_run_id` syncs, as it is now (the
    settings' gateway's: TWS); None if the run is not queued (any more)."""
    with _unavailable_says("nothing was changed", "sync again"):
        found = (
            SyncRun.objects.filter(pk=sync_run_id, status=SyncRun.Status.QUEUED)
            .values_list("connection__kind")
            .first()
        )
    return None if found is None else found[0] or Connection.Kind.TWS


def _end_if_abandoned(sync_run_id: int) -> None:
    """A task delivered again after the worker that ran it died (`acks_late`: the broker
    hands an unacknowledged task to another worker): its run is still `running`, worked on
    by nobody. Its record is ended now (`lock.release_abandoned`, as the next sync of its
    connection would end it), not left `running` for whoever polls it until then; a run
    whose holder still works on it (a visibility timeout shorter than its sync) is left
    alone, and nothing is run again."""
    key = (
        SyncRun.objects.filter(pk=sync_run_id, status=SyncRun.Status.RUNNING)
        .values_list("lock_key", flat=True)
        .first()
    )
    if key is not None:
        lock.release_abandoned(key)


def _queued_target(run: SyncRun) -> connections.Target:
    """What queued `run` syncs, as things are now: its connection (removed or disabled
    since it was queued: refused), or the settings' gateway while no connection exists."""
    if run.connection is not None:
        return connections.resolve(run.connection)
    if run.connection_name:
        raise UnknownConnection(
            f"Connection {run.connection_name} was removed after this sync was queued."
        )
    target = connections.resolve(None)
    if target.connection is not None:
        raise UnknownConnection(
            "This sync of the settings' gateway was queued before a connection was "
            "configured; sync the connection instead."
        )
    return target


def _refuse_inside_a_transaction() -> None:
    """Django's own rule for a durable block: no transaction may be open around it. (A
    test case's wrapping transaction, which stands in for autocommit, does not count.)"""
    try:
        if connection.in_atomic_block:
            with transaction.atomic(durable=True):
                pass
        elif not connection.get_autocommit():
            raise RuntimeError("autocommit is off")
    except RuntimeError:
        raise SyncInsideTransaction(
            "sync_positions() was called inside a transaction: call it outside any "
            "transaction.atomic() block (and, with ATOMIC_REQUESTS, from a view marked "
            "transaction.non_atomic_requests). Its lock must be committed on its own to be "
            "seen by other processes, and the record of a failed sync must survive."
        ) from None


def _sync_positions(
    account_id: str | None,
    trigger: str,
    user: Any,
    gateway: PositionSource | None,
    dry_run: bool,
    progress: Progress | None,
    target: connections.Target,
    queued: SyncRun | None = None,
    period: tuple[dt.date, dt.date] | None = None,
    state: bool = True,
) -> SyncResult:
    if account_id is not None:
        account_id = normalize_account_id(account_id)
    run = lock.acquire(
        trigger=trigger,
        user=user,
        account_id=account_id,
        dry_run=dry_run,
        connection_row=target.connection,
        queued=queued,
    )
    heartbeat = lock.Heartbeat(run.pk)
    clock = time.monotonic()
    log = {"run": run.pk, "trigger": trigger, "account": account_id or "all", "dry_run": dry_run}
    if target.connection is not None:
        log["connection"] = target.name
    logger.info("IBKR sync started %s", _fields(log))
    snapshot: Snapshot | None = None
    try:
        if gateway is None:
            gateway = target.source(progress)
        options: dict[str, Any] = {}
        repeats: list[Repeat] = []
        if getattr(gateway, "tells_repeats", False):
            # A source that can tell the same read as the last one applied, with nothing
            # of it changed since, does not read it again (see `_applied_statement`).
            def applied(period: tuple[dt.date, dt.date], digest: str) -> Repeat | None:
                repeat = _applied_statement(target, account_id, state, period, digest)
                if repeat is not None:
                    repeats.append(repeat)  # what its write tells again (`_write_repeat`)
                return repeat

            options["applied"] = applied
        reported = None
        if getattr(gateway, "defers_positions", False) and _takes(
            gateway.fetch_positions, "written"
        ):
            # A source that need not decode the positions of an account as last written
            # is told the digests written for this connection's accounts (a hint: what
            # decides is `stored_digests` after the read, and the write transaction).
            reported = reported_digests(target.connection)
            written = {account: digest for account, (digest, _) in reported.items() if digest}
            if written:
                options["written"] = written_positions(written)
        if period is not None:
            # Recorded before the read: a window that fails says which it was.
            run.period_from, run.period_to = period
            SyncRun.objects.filter(pk=run.pk).update(period_from=period[0], period_to=period[1])
            snapshot = gateway.fetch_positions(account_id, period=period, **options)
        elif target.kind == Connection.Kind.FLEX and (
            after := _last_period_end(target, account_id)
        ):
            snapshot = gateway.fetch_positions(account_id, after=after, **options)
        else:
            snapshot = gateway.fetch_positions(account_id, **options)
        if snapshot.repeats is not None:
            if not dry_run:
                lock.claim(run)
            [repeat] = [r for r in repeats if r.run == snapshot.repeats]
            written = _write_repeat(snapshot, repeat, run, dry_run, state)
        else:
            # Mapped before the write transaction, which then only writes; an account
            # whose positions have the digest of those last written for it is not
            # mapped again.
            known = stored_digests(snapshot.accounts, reported)
            mapped = map_snapshot(snapshot, known)
            if progress:
                progress("apply", sum(mapped.processed.values()))
            if not dry_run:
                lock.claim(run)  # still ours? Then the write transaction, short and bounded.
            try:
                written = _write(mapped, run, target, dry_run, state)
            except PositionsChanged:
                # Another sync wrote one of those accounts since: map everything, write
                # again.
                written = _write(map_snapshot(snapshot), run, target, dry_run, state)
            except DatabaseError as exc:
                if not is_deadlock(exc):
                    raise
                # PostgreSQL ended the write in a deadlock with another sync's (both
                # inserting instruments they share, in orders of their own: a streamed
                # ledger's batches): nothing of it was kept, the other went on. Write
                # again, once, mapped whole.
                logger.info("IBKR sync #%s: its write met another's in a deadlock; again", run.pk)
                if not dry_run:
                    lock.claim(run)
                written = _write(map_snapshot(snapshot), run, target, dry_run, state)
        accounts = written.accounts
        totals = {kind: written.total(kind) for kind in KINDS}
        errors = [error.as_dict() for error in written.errors]
        values = {account: outcome.as_dict() for account, outcome in written.values.items()}
        preview = written.preview
    except IbkrSyncError as exc:
        if not dry_run:
            _fail_run(run, exc.code, str(exc))
        log.update(status="failed", code=exc.code, ib_code=getattr(exc, "ib_code", None))
        logger.info(
            "IBKR sync failed %s duration=%.3fs: %s", _fields(log), time.monotonic() - clock, exc
        )
        raise
    except BaseException as exc:
        unavailable = isinstance(exc, Exception) and is_unavailable(exc)
        if unavailable:
            code = DatabaseUnavailable.code
        else:
            code = "internal_error" if isinstance(exc, Exception) else "interrupted"
        recorded = None if dry_run else _fail_run(run, code, f"{type(exc).__name__}: {exc}")
        if unavailable and recorded is False:
            # Its end was recorded already: a later sync released its lock and ended its
            # database session (it was frozen mid-write). Say so, not "database down".
            log.update(status="failed", code=LockLost.code)
            logger.warning("IBKR sync failed %s: its lock was released while it ran", _fields(log))
            raise LockLost(lock.LOCK_LOST) from exc
        log.update(status="failed", code=code)
        if unavailable:  # not a bug: no traceback (the edges say what to check)
            logger.warning("IBKR sync failed %s: %s", _fields(log), exc)
        else:
            logger.exception("IBKR sync failed unexpectedly %s", _fields(log))
        raise
    finally:
        # The lock is held exactly as long as this sync works: however it ended (even if
        # the database refused to record it), it is renewed no more from here on.
        heartbeat.stop()
        lock.forget(run.pk)
        if snapshot is not None and snapshot.ledger is not None:
            snapshot.ledger.close()  # what its ledger was read from (a download)
        if dry_run:
            SyncRun.objects.filter(pk=run.pk).delete()

    log.update(status="success", accounts=",".join(accounts) or "none", **totals)
    if written.refused:
        log.update(refused=",".join(written.refused))
    for kind, tally in written.ledger.items():
        log[kind] = "/".join(str(tally[name]) for name in ("created", "updated", "unchanged"))
    if written.daily:  # the account snapshots: a day IBKR corrected since is updated
        log["snapshots"] = "/".join(
            str(written.daily[name]) for name in ("created", "updated", "unchanged")
        )
    if snapshot.values_read:
        missing = sorted(a for a, v in values.items() if v["status"] == "missing")
        log.update(values_missing=",".join(missing) or "none")
    logger.info("IBKR sync finished %s duration=%.3fs", _fields(log), time.monotonic() - clock)
    result = SyncResult(
        sync_run_id=None if dry_run else run.pk,
        accounts=accounts,
        **{kind: value for kind, value in totals.items() if kind != "errors"},
        errors=errors,
        by_account=written.by_account(accounts),
        started_at=run.started_at,
        finished_at=timezone.now() if dry_run else run.finished_at,
        dry_run=dry_run,
        connection=target.name,
        changes=preview if dry_run else None,
        account_values=values if snapshot.values_read else None,
        accounts_refused=dict(written.refused),
        ledger=written.ledger,
        period=snapshot.period,
        history_only=not state,
        snapshots=written.daily,
    )
    if not dry_run:
        # Committed already (never inside a caller's transaction): sent at once.
        transaction.on_commit(lambda: _announce(run, result))
    return result


def _write(
    mapped: MappedSnapshot,
    run: SyncRun,
    target: connections.Target,
    dry_run: bool,
    state: bool = True,
) -> Written:
    """The write transaction: the mapped snapshot written as `run` (`state` False: its
    history only), which is marked done in the same transaction (exactly when its writes
    are); a dry run's changes are read, then rolled back."""
    with transaction.atomic(durable=True):
        lock.bound_transaction()
        connection_row, connection_name = _hold_connection(target)
        written = apply_snapshot(
            mapped,
            run,
            timezone.now(),
            connection_row=connection_row,
            connection_name=connection_name,
            state=state,
        )
        if dry_run:
            written.preview = _changes_of(run)
            transaction.set_rollback(True)
            return written
        for kind in KINDS:
            setattr(run, kind, written.total(kind))
        run.status = SyncRun.Status.SUCCESS
        run.accounts = written.accounts
        run.error_details = [error.as_dict() for error in written.errors]
        run.account_values = {a: outcome.as_dict() for a, outcome in written.values.items()}
        run.accounts_refused = written.refused
        run.ledger = written.ledger
        if mapped.period is not None:
            run.period_from, run.period_to = mapped.period
        run.history_only = not state
        if mapped.statement_digest:
            run.statement = _statement_record(run, mapped, written)
        lock.finish_holding(run)
    return written


def _statement_record(run: SyncRun, mapped: MappedSnapshot, written: Written) -> dict[str, Any]:
    """What a run records of the statement it applied, for `_applied_statement` to tell
    the same statement, and the database as it left it, again: the statement's digest
    under this mapping, the accounts it covered with the moment it applied to each (None:
    refused, or its history only) and the one it was for each account refused (`refused`:
    a repeat is refused again against the reports stored then), the accounts of which it
    wrote nothing because another owner holds them (`refused_owned`: a repeat is taken
    only while these are the ones), what its write left per account
    (`statement_counts`), and its per-account tallies and account snapshots, which a
    repeat reports again."""
    moments = reported_moments(run, written.accounts)  # the accounts whose state it applied
    ranges = statement_ranges(mapped, moments, written)
    return {
        "digest": statement_key(mapped.statement_digest),
        "accounts": {
            account: moments[account].isoformat() if account in moments else None
            for account in mapped.accounts
        },
        "refused": {
            account: moment.isoformat() for account, moment in written.refused_as_of.items()
        },
        "refused_owned": sorted(written.refused_owned),
        "ranges": ranges,
        "counts": statement_counts(ranges),
        "by_account": written.by_account(written.accounts),
        "snapshots": written.daily,
    }


def _applied_statement(
    target: connections.Target,
    account_id: str | None,
    state: bool,
    period: tuple[dt.date, dt.date],
    digest: str,
) -> Repeat | None:
    """Whether the statement a Flex source downloaded (`digest`, for `period`) is the one
    this connection last applied for that period (the same account filter; a back-fill's
    older window or not), with nothing it wrote changed since: its accounts still hold
    the moment it applied to them (no newer snapshot of them applied, by any
    connection) and as many open positions, cash balances, ledger rows and account
    snapshots as it left, and no instrument of their open positions changed since (by
    another connection's sync or an edit: a full read writes it back), each reported
    under the connection's name as it is now; and each account it was refused for
    (applying their state: a newer report of it stood) refused again by the reports
    stored now (`writer.refusals`: none gone, none now older), the reason said as a full
    read would say it now, its history (ledger rows, days) as the statement left it too;
    and the accounts another owner holds now (`writer.owned_refusals`: a full read writes
    nothing of them, their history neither) exactly those it wrote nothing of for that
    reason, in a back-fill's older window as in a full sync (one held so since, or no
    longer: read whole, which writes or refuses it as things are now). Reading it again
    would then write nothing: it is not read again."""
    last = (
        SyncRun.objects.filter(
            connection=target.connection,
            status=SyncRun.Status.SUCCESS,
            period_from=period[0],
            period_to=period[1],
            account_filter=account_id or "",
            history_only=not state,
        )
        .order_by("-finished_at", "-pk")
        .first()
    )
    record = last.statement if last is not None else None
    if not record or record.get("digest") != statement_key(digest):
        return None
    moments = {
        account: None if moment is None else dt.datetime.fromisoformat(moment)
        for account, moment in record["accounts"].items()
    }
    applied = {account: moment for account, moment in moments.items() if moment is not None}
    # Its name as it is now (a full read records it in the reports: renamed since, the
    # statement is read again once; and says it in a refusal's reason).
    # Its owner as it is now too (given to another owner since, the accounts it may write
    # are that owner's: `_hold_connection`).
    connection_id, name, row = None, "", target.connection
    if row is not None:
        connection_id = row.pk
        found = Connection.objects.filter(pk=connection_id).values_list("name", "owner_id").first()
        if found is None:  # removed since: a full read says so
            return None
        name, owner = found
        row = _owned_now(row, owner)
    # An account another owner holds: nothing of it is written, its history neither. A
    # record without the list (kept before it was) wrote the history of every account.
    owned = owned_refusals(moments, row)
    if set(owned) != set(record.get("refused_owned") or ()):
        return None
    refused: dict[str, str] = {} if state else owned
    if state and len(applied) < len(moments):
        # An account refused (a newer report of it stood): a full read refuses it again
        # while that report (or a newer one) stands, and says why as of the reports
        # stored now; one that would now be applied (its report gone, or older) is read.
        recorded = record.get("refused") or {}  # none: recorded before it was kept
        if set(recorded) != set(moments) - set(applied):
            return None
        reasons = refusals(
            {a: dt.datetime.fromisoformat(moment) for a, moment in recorded.items()},
            row,
            name,
        )
        if reasons is None:
            return None
        refused = reasons
    reports = AccountReport.objects.filter(broker=BROKER, external_id__in=list(applied))
    held, applied_at = {}, {}
    for account, report_connection, report_name, as_of, when in reports.values_list(
        "external_id", "connection_id", "connection_name", "as_of", "applied_at"
    ):
        held[account], applied_at[account] = (report_connection, report_name, as_of), when
    if any(held.get(a) != (connection_id, name, moment) for a, moment in applied.items()):
        return None
    if instruments_changed(applied_at):
        # An instrument its accounts hold was changed since (instruments are shared by
        # every connection and source): a full read writes it back as the statement has it.
        return None
    if statement_counts(record["ranges"]) != record["counts"]:
        return None
    return Repeat(
        run=last.pk,
        accounts=tuple(moments),
        as_of=max(applied.values(), default=None),
        refused=refused,
    )


def _write_repeat(
    snapshot: Snapshot, repeat: Repeat, run: SyncRun, dry_run: bool, state: bool
) -> Written:
    """A statement applied already, found unchanged (`Snapshot.repeats`, as `repeat`
    found it): nothing is written; `run` records what the run that last recorded it
    found, every row now unchanged, and the accounts refused again with the reasons a
    full read gives now."""
    last = SyncRun.objects.get(pk=snapshot.repeats)
    record = last.statement
    written = Written(
        accounts=list(last.accounts),
        history_only=[] if state else [a for a in snapshot.accounts if a not in repeat.refused],
        refused=dict(repeat.refused),
    )
    for account, tally in record.get("by_account", {}).items():
        kept = sum(tally.get(kind, 0) for kind in ("created", "updated", "unchanged", "reopened"))
        written.tally[account, "processed"] += tally.get("processed", 0)
        written.tally[account, "unchanged"] += kept
        written.tally[account, "errors"] += tally.get("errors", 0)
    written.errors = [RecordError(**error) for error in last.error_details]
    written.values = {
        account: ValuesOutcome.from_dict(outcome)
        for account, outcome in last.account_values.items()
    }
    written.ledger = {
        kind: {**dict.fromkeys(tally, 0), "unchanged": sum(tally.values())}
        for kind, tally in last.ledger.items()
    }
    snapshots = record.get("snapshots", {})
    if snapshots:  # none written (an account refused, a statement without days): none said
        written.daily = {**dict.fromkeys(snapshots, 0), "unchanged": sum(snapshots.values())}
    if dry_run:
        written.preview = []
        return written
    with transaction.atomic(durable=True):
        lock.bound_transaction()
        if state:  # its accounts were synced, as a full read stamps them
            touch_accounts(written.accounts, timezone.now())
        for kind in KINDS:
            setattr(run, kind, written.total(kind))
        run.status = SyncRun.Status.SUCCESS
        run.accounts = written.accounts
        run.error_details = list(last.error_details)
        run.account_values = dict(last.account_values)
        run.accounts_refused = written.refused
        run.ledger = written.ledger
        run.period_from, run.period_to = snapshot.period or (None, None)
        run.history_only = not state
        run.statement = {**record, "repeats": record.get("repeats", last.pk)}
        lock.finish_holding(run)
    return written


def _last_period_end(target: connections.Target, account_id: str | None) -> dt.date | None:
    """The last day of the latest period the connection applied (a success recorded
    with a period, of every account or of this one), None when there is none."""
    runs = SyncRun.objects.filter(
        connection=target.connection,
        status=SyncRun.Status.SUCCESS,
        period_to__isnull=False,
        account_filter__in=["", account_id or ""],
    )
    return runs.aggregate(end=Max("period_to"))["end"]


@dataclass(frozen=True)
class WindowOutcome:
    """One window of a back-fill: its period, and its sync's result or its error."""

    from_date: dt.date
    to_date: dt.date
    result: SyncResult | None = None
    error: IbkrSyncError | None = None


@dataclass(frozen=True)
class BackfillResult:
    """What `sync_period` did: the windows synced, in order (the last one failed, if
    `error`), and those not tried after a failure."""

    connection: str
    windows: list[WindowOutcome]
    not_tried: list[tuple[dt.date, dt.date]] = field(default_factory=list)

    @property
    def error(self) -> IbkrSyncError | None:
        return next((w.error for w in self.windows if w.error is not None), None)

    @property
    def applied(self) -> list[WindowOutcome]:
        return [w for w in self.windows if w.error is None]


def sync_period(
    from_date: dt.date,
    to_date: dt.date | None = None,
    account_id: str | None = None,
    *,
    trigger: str,
    user: Any = None,
    connection: str | Connection | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_window: Callable[[WindowOutcome], None] | None = None,
) -> BackfillResult:
    """Back-fill a Flex connection: `from_date`..`to_date` (default: the last day the
    source has closed) read in consecutive windows of at most a year, oldest first, each
    a sync of its own (its lock, its `SyncRun` with its period, its transaction).

    The older windows write their history only (the ledger, each day's values): their
    positions and cash are older than the newest window's, which is synced as any sync
    (its accounts refused where a newer report of them stands). A window that fails
    stops the back-fill: the windows before it stay written, and the result says which
    were applied, which failed and which were not tried. `on_window` is told each
    window's outcome as it ends.

    Raises `InvalidPeriod` for a period the source cannot read, or a connection that
    reads no period (a TWS gateway), and what `sync_positions` raises for its arguments.
    """
    _refuse_inside_a_transaction()
    with _unavailable_says("nothing was changed", "sync again"), lock.bounded_waits():
        target = connections.resolve(connection)
        if target.kind != Connection.Kind.FLEX:
            raise InvalidPeriod(
                f"{target.label.capitalize()} reads a gateway's positions as they are "
                "now: only a Flex connection reads a period (--from); nothing was written."
            )
        source = target.source(progress)
        windows = source.windows(from_date, to_date)
        outcomes: list[WindowOutcome] = []
        for index, window in enumerate(windows):
            last = index == len(windows) - 1
            try:
                result = _sync_positions(
                    account_id, trigger, user, source, dry_run, progress, target,
                    period=window, state=last,
                )  # fmt: skip
                outcome = WindowOutcome(*window, result=result)
            except IbkrSyncError as exc:
                outcome = WindowOutcome(*window, error=exc)
            except (DatabaseError, InterfaceError) as exc:
                if not is_unavailable(exc):
                    raise
                message = unavailable_message(
                    exc, outcome="this window was not written", retry="back-fill again"
                )
                error = DatabaseUnavailable(message)
                outcome = WindowOutcome(*window, error=error)
            outcomes.append(outcome)
            if on_window is not None:
                on_window(outcome)
            if outcome.error is not None:
                return BackfillResult(target.name, outcomes, windows[index + 1 :])
        return BackfillResult(target.name, outcomes)


def _takes(method: Callable[..., Any], name: str) -> bool:
    """Whether `method` takes the keyword `name` (a host's subclass of a source may
    override it with the older signature)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _hold_connection(target: connections.Target) -> tuple[Connection | None, str]:
    """Inside the write transaction: the connection's row, locked until the commit, so that
    it cannot be removed or given to another owner under the write (its accounts' reports
    refer to it); the row with its owner as it is now, and its name as it is now (renamed
    or given to another owner while it synced: the new ones; the owner decides which
    accounts it may write, `writer._claim_accounts`). `UnknownConnection` if it was
    removed while it synced: nothing is written. (None, "") for the settings' gateway."""
    if target.connection is None:
        return None, ""
    found = (
        Connection.objects.select_for_update(no_key=True)
        .filter(pk=target.connection.pk)
        .values_list("name", "owner_id")
        .first()
    )
    if found is None:
        raise UnknownConnection(
            f"Connection {target.name} was removed while it synced; nothing was written."
        )
    name, owner = found
    return _owned_now(target.connection, owner), name


def _owned_now(row: Connection, owner: Any) -> Connection:
    """`row`, read when its sync began, with the owner the database holds now (`owner`):
    given to another owner since, a copy with the new one (the sync's own row is left as
    it was read)."""
    if row.owner_id == owner:
        return row
    row = copy.copy(row)
    row.owner_id = owner
    return row


@dataclass(frozen=True)
class ConnectionOutcome:
    """One connection's part of `sync_all`: its result, or the error it failed with."""

    connection: str  # its name; empty: the settings' gateway
    result: SyncResult | None = None
    error: IbkrSyncError | None = None


def sync_all(
    *,
    trigger: str,
    user: Any = None,
    dry_run: bool = False,
    progress: Callable[[str, str, int], None] | None = None,
) -> list[ConnectionOutcome]:
    """Sync every enabled connection, one after another, in name order (the settings'
    gateway when no connection is configured): one failing connection (down, locked)
    stops none of the others. `progress` is told (connection, phase, count)."""

    def sync(target: connections.Target) -> SyncResult:
        told = None if progress is None else functools.partial(progress, target.name)
        return sync_positions(
            trigger=trigger, user=user, dry_run=dry_run, progress=told, connection=target.connection
        )

    return _each_enabled(sync, ConnectionOutcome)


def _each_enabled(act: Callable[[connections.Target], Any], outcome: type[T]) -> list[T]:
    """`act` on every enabled connection in name order (the settings' gateway when none
    is configured), each one's `outcome` (its name and what `act` returned, or the error
    it raised): one failing stops none of the others; one disabled since the list was
    read is left out, as a disabled one is."""
    outcomes = []
    for target in connections.enabled_targets():
        try:
            done = act(target)
        except ConnectionDisabled:
            continue
        except IbkrSyncError as exc:
            outcomes.append(outcome(target.name, error=exc))
        else:
            outcomes.append(outcome(target.name, done))
    return outcomes


@dataclass(frozen=True)
class QueuedOutcome:
    """One connection's part of `queue_all`: its queued run, or the error it was refused
    with."""

    connection: str  # its name; empty: the settings' gateway
    run: SyncRun | None = None
    error: IbkrSyncError | None = None


def queue_all(*, trigger: str, user: Any = None) -> list[QueuedOutcome]:
    """Queue a sync of every enabled connection, in name order (the settings' gateway when
    no connection is configured), as `queue_sync` queues one: one the queue refuses is
    failed alone (`QueueUnavailable` in its outcome), the others are queued all the same.

    Their rows are recorded together, in one transaction of three statements whatever
    their number (a hundred connections queue in a few milliseconds, not one round of
    queries each, which the workers already running the first syncs would wait for), and
    each is handed to the queue once that commits. A database that cannot return the ids
    of a bulk insert, or a connection removed while its row was inserted, queues them one
    by one (`queue_sync` each) instead."""
    if not connection.features.can_return_rows_from_bulk_insert:
        return _queue_each(trigger, user)
    with _unavailable_says("nothing was queued", "sync again"):
        targets = connections.enabled_targets()
        try:
            # Writes first: on SQLite the transaction takes the write lock at once.
            with lock.bounded_statements(), transaction.atomic():
                runs = SyncRun.objects.bulk_create(
                    SyncRun(**_queued_row(target, trigger, user, None)) for target in targets
                )
                ids = [run.pk for run in runs]
                SyncRun.objects.filter(pk__in=ids).update(queued_at=Now(), started_at=Now())
        except IntegrityError:
            return _queue_each(trigger, user)
        stored = SyncRun.objects.select_related("user", "connection").in_bulk(ids)
    outcomes = []
    for pk, target in zip(ids, targets, strict=True):
        run = stored[pk]
        try:
            _send_when_committed(run, target)
        except QueueUnavailable as exc:
            outcomes.append(QueuedOutcome(target.name, error=exc))
        else:
            outcomes.append(QueuedOutcome(target.name, run))
    return outcomes


def _queue_each(trigger: str, user: Any) -> list[QueuedOutcome]:
    """`queue_all` one connection at a time."""
    return _each_enabled(
        lambda target: queue_sync(trigger=trigger, user=user, connection=target.connection),
        QueuedOutcome,
    )


def check_connection(connection: str | Connection | None = None) -> Any:
    """The handshake only, with the connection a sync of `connection` would read (resolved
    as a sync resolves it, disabled or not): what the gateway says of itself, its server
    version and the accounts it manages (a `Handshake`), or the error a sync would fail
    with, in the same words. Reads no positions and takes no lock: a running sync of the
    connection makes it fail as "client id in use", as a second client would."""
    target = connections.resolve(connection, enabled=False)
    source = target.source()
    if not hasattr(source, "handshake"):
        raise GatewayError(f"{type(source).__name__} cannot test a connection (no handshake).")
    return source.handshake()


def describe_values(outcome: dict[str, Any] | ValuesOutcome) -> str:
    """One account's values outcome in words, for the command and the admin:
    `read (base USD): 41 positions valued, cash in EUR, USD` or `missing: <reason>`
    (as a run stored it, or as a sync returned it)."""
    if not isinstance(outcome, ValuesOutcome):
        outcome = ValuesOutcome.from_dict(outcome)
    return outcome.describe()


def _announce(run: SyncRun, result: SyncResult) -> None:
    """Send the host's signals. A receiver's error changes nothing: `send_robust` logs it
    (logger `django.dispatch`, with its traceback) and goes on to the next receiver."""
    signals.sync_finished.send_robust(SyncRun, sync_run=run, result=result)
    changed = result.created + result.updated + result.reopened + result.closed
    if changed and signals.positions_changed.has_listeners(SyncRun):
        signals.positions_changed.send_robust(SyncRun, sync_run=run, changes=_changes_of(run))


def _changes_of(run: SyncRun) -> list[dict[str, Any]]:
    """The position changes a run recorded, by account and symbol, as plain values: the
    quantity and the average cost, before and after."""
    fields = ("quantity_before", "quantity_after", "average_cost_before", "average_cost_after")
    rows = (
        PositionChange.objects.filter(sync_run=run)
        .order_by("position__account__external_id", "position__instrument__symbol", "id")
        .values_list(
            "kind",
            "position__account__external_id",
            "position__instrument__external_id",
            "position__instrument__symbol",
            "position__instrument__local_symbol",
            *fields,
        )
    )
    return [
        {
            "kind": kind,
            "account": account,
            "con_id": int(con_id),
            "symbol": local_symbol or symbol,
            **dict(zip(fields, row, strict=True)),
        }
        for kind, account, con_id, symbol, local_symbol, *row in rows
    ]


def _fields(values: dict[str, Any]) -> str:
    """`key=value` pairs: one line per event that log search tools can split."""
    return " ".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in values.items()
    )


def _fail_run(run: SyncRun, code: str, message: str) -> bool | None:
    """Record the failure if the database allows; never raise over the sync's own error.

    A run's end is recorded once: only a `running` row is failed, so a run released as
    `abandoned` keeps that first reason. True if recorded, False if its end was recorded
    already, None if the database would not take it."""
    for attempt in (1, 2):
        try:
            # Only the failure: counts set on the instance by a rolled-back attempt are void.
            with lock.bounded_statements():
                recorded = SyncRun.objects.filter(pk=run.pk, status=SyncRun.Status.RUNNING).update(
                    status=SyncRun.Status.FAILED,
                    error_code=code,
                    error_message=message,
                    finished_at=Now(),
                )
            return bool(recorded)
        except DatabaseError:
            if attempt == 1 and not connection.in_atomic_block:
                # The connection may have died with the sync (a database restart, a
                # network cut): try once more on a fresh one.
                connection.close()
                continue
            logger.exception("Could not record the failure of IBKR sync #%s", run.pk)
            return None
        except Exception:
            logger.exception("Could not record the failure of IBKR sync #%s", run.pk)
            return None
    return None
