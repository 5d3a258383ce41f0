"""The sync: the one place that writes positions.

Order of work: take the lock (a `running` SyncRun row), read the gateway (network,
outside any transaction), map, then apply everything in one transaction. Any failure
leaves every position as it was and marks the SyncRun failed with the reason.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any, Protocol

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    models,
    transaction,
)
from django.utils import timezone

from portfolio.models import Account, Instrument, Position

from . import conf
from .exceptions import DatabaseUnavailable, IbkrSyncError, SyncAlreadyRunning
from .gateway import GatewaySnapshot, IbkrGateway
from .mapping import (
    BROKER,
    INSTRUMENT_FIELDS,
    MappedPosition,
    MappingError,
    is_paper_account,
    is_storable_account_id,
    map_position,
    normalize_account_id,
)
from .models import PositionChange, SyncRun

logger = logging.getLogger(__name__)

# Rows per statement: below SQLite's bound-parameter limit for the widest statement.
BATCH_SIZE = 500


class PositionSource(Protocol):
    """What the service needs from a gateway (tests pass a fake)."""

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot: ...


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
    # A dry run only: what a sync would change, position by position.
    changes: list[dict[str, Any]] | None = None

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


KINDS = ("processed", "created", "updated", "unchanged", "reopened", "closed", "errors")


@dataclass
class _Counts:
    tally: Counter = field(default_factory=Counter)  # (account, kind) -> count
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, account: str, kind: str) -> None:
        self.tally[account, kind] += 1

    def total(self, kind: str) -> int:
        return sum(n for (_, k), n in self.tally.items() if k == kind)

    def by_account(self, accounts: Iterable[str]) -> dict[str, dict[str, int]]:
        return {a: {kind: self.tally[a, kind] for kind in KINDS} for a in accounts}


def sync_positions(
    account_id: str | None = None,
    *,
    trigger: str,
    user: Any = None,
    gateway: PositionSource | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> SyncResult:
    """Bring the database in line with the gateway's positions (of one account, if given).

    Must not run inside a transaction: the SyncRun row (the lock and the audit record)
    has to be committed on its own so it is visible to other processes and survives a
    failed sync.

    `dry_run` does everything a sync does, under the same lock, then rolls the writes
    back and deletes its SyncRun row: the result says what a sync would change now.
    """
    try:
        return _sync_positions(account_id, trigger, user, gateway, dry_run, progress)
    except (DatabaseError, InterfaceError) as exc:
        from portfolio.database import is_unavailable, unavailable_message

        if not is_unavailable(exc):
            raise
        # Down, unreachable, out of storage, read-only, locked, not migrated: say which.
        raise DatabaseUnavailable(
            unavailable_message(exc, outcome="nothing was changed", retry="sync again")
        ) from exc


# Errors of a database that is down, unreachable or locked (not of a query that is wrong).
_DATABASE_DOWN = (OperationalError, InterfaceError)


def _sync_positions(
    account_id: str | None,
    trigger: str,
    user: Any,
    gateway: PositionSource | None,
    dry_run: bool,
    progress: Progress | None,
) -> SyncResult:
    if account_id is not None:
        account_id = normalize_account_id(account_id)
    run = _start_run(trigger=trigger, user=user, account_id=account_id, dry_run=dry_run)
    clock = time.monotonic()
    log = {"run": run.pk, "trigger": trigger, "account": account_id or "all", "dry_run": dry_run}
    logger.info("IBKR sync started %s", _fields(log))
    try:
        if gateway is None:
            gateway = IbkrGateway(progress=progress) if progress else IbkrGateway()
        snapshot = gateway.fetch_positions(account_id)
        if progress:
            progress("apply", len(snapshot.positions))
        with transaction.atomic():
            accounts, counts = _apply(snapshot, run, timezone.now())
            totals = {kind: counts.total(kind) for kind in KINDS}
            if dry_run:
                preview = _changes_of(run)
                transaction.set_rollback(True)
            else:
                # In the same transaction: the run is marked done exactly when its writes are.
                for kind, value in totals.items():
                    setattr(run, kind, value)
                run.status = SyncRun.Status.SUCCESS
                run.accounts = accounts
                counts.errors = _storable(counts.errors)
                run.error_details = counts.errors
                run.finished_at = timezone.now()
                _finish_holding_the_lock(run)
    except IbkrSyncError as exc:
        if not dry_run:
            _fail_run(run, exc.code, str(exc))
        log.update(status="failed", code=exc.code, ib_code=getattr(exc, "ib_code", None))
        logger.info(
            "IBKR sync failed %s duration=%.3fs: %s", _fields(log), time.monotonic() - clock, exc
        )
        raise
    except BaseException as exc:
        if isinstance(exc, _DATABASE_DOWN):
            code = DatabaseUnavailable.code
        else:
            code = "internal_error" if isinstance(exc, Exception) else "interrupted"
        if not dry_run:
            _fail_run(run, code, f"{type(exc).__name__}: {exc}")
        log.update(status="failed", code=code)
        logger.exception("IBKR sync failed unexpectedly %s", _fields(log))
        raise
    finally:
        with _active_runs_lock:
            _active_runs.discard(run.pk)
        if dry_run:
            SyncRun.objects.filter(pk=run.pk).delete()

    log.update(status="success", accounts=",".join(accounts) or "none", **totals)
    logger.info("IBKR sync finished %s duration=%.3fs", _fields(log), time.monotonic() - clock)
    return SyncResult(
        sync_run_id=None if dry_run else run.pk,
        accounts=accounts,
        **{kind: value for kind, value in totals.items() if kind != "errors"},
        errors=counts.errors,
        by_account=counts.by_account(accounts),
        started_at=run.started_at,
        finished_at=timezone.now() if dry_run else run.finished_at,
        dry_run=dry_run,
        changes=preview if dry_run else None,
    )


def _finish_holding_the_lock(run: SyncRun) -> None:
    """Save the finished run, if it still holds the lock; otherwise undo the whole sync.

    A sync paused for longer than IBKR_SYNC_STALE_AFTER (a suspended machine, say) can
    find its lock released and taken by a later sync: its writes must not land as well.
    """
    # Row-locked until the commit, so the lock cannot be released between check and save.
    holding = SyncRun.objects.select_for_update().filter(pk=run.pk, status=SyncRun.Status.RUNNING)
    if not holding.exists():
        raise SyncAlreadyRunning(
            "This sync's lock was released while it ran (it looked abandoned) and another "
            "sync may have run meanwhile, so its changes were rolled back. Sync again."
        )
    run.save()


def _changes_of(run: SyncRun) -> list[dict[str, Any]]:
    """The position changes a run recorded, by account and symbol, as plain values."""
    rows = (
        PositionChange.objects.filter(sync_run=run)
        .order_by("position__account__external_id", "position__instrument__symbol", "id")
        .values_list(
            "kind",
            "position__account__external_id",
            "position__instrument__external_id",
            "position__instrument__symbol",
            "position__instrument__local_symbol",
            "quantity_before",
            "quantity_after",
        )
    )
    return [
        {
            "kind": kind,
            "account": account,
            "con_id": int(con_id),
            "symbol": local_symbol or symbol,
            "quantity_before": before,
            "quantity_after": after,
        }
        for kind, account, con_id, symbol, local_symbol, before, after in rows
    ]


def _fields(values: dict[str, Any]) -> str:
    """`key=value` pairs: one line per event that log search tools can split."""
    return " ".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in values.items()
    )


def _storable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The unmappable records' details as any JSON column takes them (PostgreSQL's jsonb
    refuses a NUL character, which a hostile record may carry in its symbol)."""
    return [
        {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in e.items()}
        for e in errors
    ]


# --- the lock ------------------------------------------------------------------------------

# The runs this process has started and not yet finished. A `running` row of this host
# and process that is not here belongs to a sync that ended without being able to record
# it (the database went away at the end): its lock is released at once, not after
# IBKR_SYNC_STALE_AFTER, which would block every sync from this server until then.
_active_runs: set[int] = set()
_active_runs_lock = threading.Lock()


def _start_run(*, trigger: str, user: Any, account_id: str | None, dry_run: bool) -> SyncRun:
    """Take the lock: a `running` row. A sync refused it is recorded as failed; a dry run,
    which leaves no record, is not."""
    fields = {
        "trigger": trigger,
        "user": user if getattr(user, "is_authenticated", False) else None,
        "account_filter": account_id or "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    for _attempt in range(2):
        try:
            # Registered as this process's in the same step: another thread of this
            # process must never see the row without it and take it for abandoned.
            with _active_runs_lock, transaction.atomic():
                run = SyncRun.objects.create(status=SyncRun.Status.RUNNING, **fields)
                _active_runs.add(run.pk)
                return run
        except IntegrityError:
            if not _release_stale_lock():
                break
    error = SyncAlreadyRunning(
        f"Another IBKR sync is running; this {'dry run' if dry_run else 'one'} was not "
        "started. Try again when it finishes."
    )
    if dry_run:
        raise error
    SyncRun.objects.create(
        status=SyncRun.Status.FAILED,
        error_code=error.code,
        error_message=str(error),
        finished_at=timezone.now(),
        **fields,
    )
    raise error


def _release_stale_lock() -> bool:
    """Fail a `running` row whose process is gone; True if the lock is free now."""
    running = SyncRun.objects.filter(status=SyncRun.Status.RUNNING).first()
    if running is None:
        return True
    age = (timezone.now() - running.started_at).total_seconds()
    crashed_here = running.host == socket.gethostname() and (
        not _process_alive(running.pid) or _ended_in_this_process(running)
    )
    if not crashed_here and age < float(conf.get("IBKR_SYNC_STALE_AFTER")):
        return False
    released = SyncRun.objects.filter(pk=running.pk, status=SyncRun.Status.RUNNING).update(
        status=SyncRun.Status.FAILED,
        error_code="abandoned",
        error_message="The process running this sync stopped before it finished; "
        "its lock was released by a later sync.",
        finished_at=timezone.now(),
    )
    if released:
        logger.warning("Released the lock of abandoned IBKR sync #%s", running.pk)
    return True


def _ended_in_this_process(run: SyncRun) -> bool:
    with _active_runs_lock:
        return run.pid == os.getpid() and run.pk not in _active_runs


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_run(run: SyncRun, code: str, message: str) -> None:
    """Record the failure if the database allows; never raise over the sync's own error."""
    for attempt in (1, 2):
        try:
            # Only the failure: counts set on the instance by a rolled-back attempt are void.
            SyncRun.objects.filter(pk=run.pk).update(
                status=SyncRun.Status.FAILED,
                error_code=code,
                error_message=message,
                finished_at=timezone.now(),
            )
            return
        except DatabaseError:
            if attempt == 1 and not connection.in_atomic_block:
                # The connection may have died with the sync (a database restart, a
                # network cut): try once more on a fresh one.
                connection.close()
                continue
            logger.exception("Could not record the failure of IBKR sync #%s", run.pk)
            return
        except Exception:
            logger.exception("Could not record the failure of IBKR sync #%s", run.pk)
            return


# --- applying a snapshot ----------------------------------------------------------------


def _apply(snapshot: GatewaySnapshot, run: SyncRun, now: dt.datetime) -> tuple[list[str], _Counts]:
    counts = _Counts()
    mapped: dict[tuple[str, str], MappedPosition] = {}
    unmapped: set[tuple[str, str]] = set()
    for record in snapshot.positions:
        counts.add(record.account, "processed")
        try:
            item = map_position(record)
        except MappingError as exc:
            unmapped.add((record.account, str(record.con_id)))
            counts.add(record.account, "errors")
            counts.errors.append(
                {
                    "account": record.account,
                    "con_id": record.con_id,
                    "symbol": record.symbol,
                    "sec_type": record.sec_type,
                    "reason": str(exc),
                }
            )
            continue
        mapped[(item.account_id, item.instrument_id)] = item

    # The accounts to reconcile: an account id that could not even be stored (too long,
    # a NUL) belongs to records already counted as errors, and creates no Account.
    reported = {*snapshot.accounts, *(a for a, _ in mapped), *(a for a, _ in unmapped)}
    account_ids = sorted(a for a in reported if is_storable_account_id(a))
    accounts = _upsert_accounts(account_ids, now)
    instruments = _upsert_instruments(mapped.values(), now)

    # Plain rows, not model instances: building 10,000s of instances costs more than
    # the queries. Instances are made only for the rows that will be written.
    account_by_pk = {pk: account_id for account_id, pk in accounts.items()}
    rows = Position.objects.filter(account_id__in=accounts.values()).values_list(
        "pk", "account_id", "instrument__external_id", "quantity", "average_cost", "closed_at"
    )
    existing = {(account_by_pk[row[1]], row[2]): row for row in rows}
    to_create: list[MappedPosition] = []
    to_change: dict[str, list[Position]] = {"updated": [], "reopened": []}
    changes: list[dict[str, Any]] = []
    for key, item in mapped.items():
        row = existing.get(key)
        if row is None:
            to_create.append(item)
            counts.add(item.account_id, "created")
            continue
        pk, _, _, quantity, average_cost, closed_at = row
        if closed_at is not None:
            kind, before = PositionChange.Kind.REOPENED, (None, None)
        elif _differs(
            (quantity, average_cost), (item.position["quantity"], item.position["average_cost"])
        ):
            kind, before = PositionChange.Kind.UPDATED, (quantity, average_cost)
        else:
            counts.add(item.account_id, "unchanged")
            continue
        counts.add(item.account_id, kind)
        to_change[kind].append(
            Position(
                account_id=accounts[item.account_id],
                instrument_id=instruments[item.instrument_id],
                opened_at=now,
                last_synced_at=now,
                closed_at=None,
                **item.position,
            )
        )
        changes.append(_change(run, pk, kind, before, item.position))

    gone = []
    for key, (pk, _, _, quantity, average_cost, closed_at) in existing.items():
        if closed_at is None and key not in mapped and key not in unmapped:
            gone.append(pk)
            counts.add(key[0], "closed")
            changes.append(
                _change(run, pk, PositionChange.Kind.CLOSED, (quantity, average_cost), None)
            )

    # New rows are made batch by batch as they are written: at 10,000s of positions,
    # holding them all at once would double the sync's memory.
    created_pks = _insert(
        Position,
        (
            {
                "account_id": accounts[item.account_id],
                "instrument_id": instruments[item.instrument_id],
                "opened_at": now,
                "last_synced_at": now,
                **item.position,
            }
            for item in to_create
        ),
    )
    # Changed rows are written as upserts on (account, instrument): one INSERT ... ON
    # CONFLICT DO UPDATE per batch, which both databases run far faster than the
    # CASE WHEN statements of bulk_update. A re-opened row also gets a new opened_at.
    for kind, fields in _CHANGED_FIELDS.items():
        Position.objects.bulk_create(
            to_change[kind],
            batch_size=BATCH_SIZE,
            update_conflicts=True,
            unique_fields=["account", "instrument"],
            update_fields=fields,
        )
    for chunk in _chunks(gone):
        Position.objects.filter(pk__in=chunk).update(closed_at=now, last_synced_at=now)
    _insert(
        PositionChange,
        itertools.chain(
            changes,
            (
                _change(run, pk, PositionChange.Kind.CREATED, (None, None), item.position)
                for pk, item in zip(created_pks, to_create, strict=True)
            ),
        ),
    )
    return account_ids, counts


_UPDATED = ("quantity", "average_cost", "cost_basis", "last_synced_at")
_CHANGED_FIELDS = {"updated": _UPDATED, "reopened": (*_UPDATED, "opened_at", "closed_at")}


def _change(
    run: SyncRun,
    position_pk: int,
    kind: str,
    before: tuple[Decimal | None, Decimal | None],
    after: dict[str, Any] | None,
) -> dict[str, Any]:
    """A PositionChange row, as the field values `_insert` takes."""
    return {
        "sync_run_id": run.pk,
        "position_id": position_pk,
        "kind": kind,
        "quantity_before": before[0],
        "average_cost_before": before[1],
        "quantity_after": None if after is None else after["quantity"],
        "average_cost_after": None if after is None else after["average_cost"],
    }


def _differs(stored: Sequence[Any], values: Sequence[Any]) -> bool:
    """Whether `values` differ from what the database holds (`stored`, in the same order).

    Callers leave derived fields (cost basis) out, so rounding in them can never make an
    unchanged row look changed. SQLite keeps 15 significant digits of a decimal column:
    compare at that precision there, exactly elsewhere."""
    if connection.vendor == "sqlite":
        values = [_sqlite_stored(value) for value in values]
    return any(value != held for value, held in zip(values, stored, strict=True))


def _sqlite_stored(value: Any) -> Any:
    return _SQLITE_DECIMAL.create_decimal(value) if isinstance(value, Decimal) else value


_SQLITE_DECIMAL = Context(prec=15)


def _upsert_accounts(account_ids: Sequence[str], now: dt.datetime) -> dict[str, int]:
    """Create the accounts not seen before, stamp all as synced; return id -> pk."""
    accounts = dict(
        Account.objects.filter(broker=BROKER, external_id__in=account_ids).values_list(
            "external_id", "pk"
        )
    )
    missing = [
        Account(broker=BROKER, external_id=a, is_paper=is_paper_account(a), last_synced_at=now)
        for a in account_ids
        if a not in accounts
    ]
    accounts.update((a.external_id, a.pk) for a in Account.objects.bulk_create(missing))
    Account.objects.filter(pk__in=accounts.values()).update(last_synced_at=now)
    return accounts


def _upsert_instruments(items: Iterable[MappedPosition], now: dt.datetime) -> dict[str, int]:
    """Create or update the instruments of the mapped positions; return conId -> pk."""
    wanted = {item.instrument_id: item.instrument for item in items}
    ids: dict[str, int] = {}
    changed = []
    for chunk in _chunks(list(wanted)):
        rows = Instrument.objects.filter(broker=BROKER, external_id__in=chunk).values_list(
            "pk", "external_id", *INSTRUMENT_FIELDS
        )
        for pk, conid, *stored in rows:
            ids[conid] = pk
            fields = wanted[conid]
            if _differs(stored, [fields[name] for name in INSTRUMENT_FIELDS]):
                changed.append(Instrument(broker=BROKER, external_id=conid, **fields))
    # Upserts on (broker, external_id), as for positions: cheaper than bulk_update.
    Instrument.objects.bulk_create(
        changed,
        batch_size=BATCH_SIZE // 4,
        update_conflicts=True,
        unique_fields=["broker", "external_id"],
        update_fields=[*INSTRUMENT_FIELDS, "updated_at"],
    )
    new = [conid for conid in wanted if conid not in ids]
    rows = (
        {
            "broker": BROKER,
            "external_id": conid,
            "created_at": now,
            "updated_at": now,
            **wanted[conid],
        }
        for conid in new
    )
    ids.update(zip(new, _insert(Instrument, rows), strict=True))
    return ids


def _insert(model: type[models.Model], rows: Iterable[dict[str, Any]]) -> list[int]:
    """INSERT rows given as {field attname: value}; return their new primary keys, in order.

    The fast path for the 10,000s of rows of a first sync. `bulk_create` runs every
    value of every object through the generic field API, which then costs more than the
    database does. The values here are already what the database adapters take (str,
    int, Decimal, date, None: the driver adapts them exactly as Django would), so only
    datetimes are prepared, once per distinct value. Fields a row leaves out get their
    model default. A batch is one statement of the form Django's own bulk_create issues
    (tests compare the two): on PostgreSQL INSERT ... SELECT * FROM UNNEST(one array per
    column), elsewhere a multi-row INSERT ... VALUES; both RETURNING the new keys.
    """
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    names = [f.attname for f in fields]
    defaults = {f.attname: f.get_default() for f in fields}
    prepare = {
        f.attname: _DatetimePreparer(f) for f in fields if isinstance(f, models.DateTimeField)
    }
    qn = connection.ops.quote_name
    head = f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in fields)}) "
    tail = f" RETURNING {qn(meta.pk.column)}"
    unnest = connection.vendor == "postgresql"
    if unnest:
        # Array types without their length/precision, as Django does: varchar[], numeric[].
        arrays = ", ".join(f"%s::{f.db_type(connection).split('(')[0]}[]" for f in fields)
        statement = f"{head}SELECT * FROM UNNEST({arrays}){tail}"
    one_row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    pks: list[int] = []
    with connection.cursor() as cursor:
        for chunk in _batches(rows, min(BATCH_SIZE, _MAX_PARAMETERS // len(fields))):
            values = [
                [
                    prepare[name](value) if name in prepare else value
                    for name in names
                    for value in (row[name] if name in row else defaults[name],)
                ]
                for row in chunk
            ]
            if unnest:
                cursor.execute(statement, [list(column) for column in zip(*values, strict=True)])
            else:
                sql = f"{head}VALUES {', '.join([one_row] * len(chunk))}{tail}"
                cursor.execute(sql, [value for row in values for value in row])
            pks.extend(pk for (pk,) in cursor.fetchall())
    return pks


# Below SQLite's default limit of bound parameters per statement (32766 since 3.32).
_MAX_PARAMETERS = 30_000


class _DatetimePreparer:
    """A DateTimeField's database form of a value, computed once per distinct value."""

    def __init__(self, field: models.Field) -> None:
        self.field = field
        self.cache: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        if value not in self.cache:
            self.cache[value] = self.field.get_db_prep_save(value, connection)
        return self.cache[value]


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _chunks(items: Sequence[Any], size: int = BATCH_SIZE) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
