"""The sync: the one place that writes positions.

Order of work: take the lock (a `running` SyncRun row), read the gateway (network,
outside any transaction), map, then apply everything in one transaction. Any failure
leaves every position as it was and marks the SyncRun failed with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any, Protocol

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from portfolio.models import Account, Instrument, Position

from . import conf
from .exceptions import IbkrSyncError, SyncAlreadyRunning
from .gateway import GatewaySnapshot, IbkrGateway
from .mapping import (
    BROKER,
    INSTRUMENT_FIELDS,
    MappedPosition,
    MappingError,
    is_paper_account,
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
    sync_run_id: int
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

    @property
    def scope(self) -> str:
        return f"{self.processed} positions in {len(self.accounts)} account(s)"

    @property
    def outcome(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.reopened} reopened, {self.closed} closed, {len(self.errors)} errors"
        )


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
) -> SyncResult:
    """Bring the database in line with the gateway's positions (of one account, if given).

    Must not run inside a transaction: the SyncRun row (the lock and the audit record)
    has to be committed on its own so it is visible to other processes and survives a
    failed sync.
    """
    if account_id is not None:
        account_id = normalize_account_id(account_id)
    run = _start_run(trigger=trigger, user=user, account_id=account_id)
    try:
        snapshot = (gateway or IbkrGateway()).fetch_positions(account_id)
        with transaction.atomic():
            accounts, counts = _apply(snapshot, run, timezone.now())
            # In the same transaction: the run is marked done exactly when its writes are.
            totals = {kind: counts.total(kind) for kind in KINDS}
            for kind, value in totals.items():
                setattr(run, kind, value)
            run.status = SyncRun.Status.SUCCESS
            run.accounts = accounts
            run.error_details = counts.errors
            run.finished_at = timezone.now()
            run.save()
    except IbkrSyncError as exc:
        _fail_run(run, exc.code, str(exc))
        logger.info("IBKR sync #%s failed: %s", run.pk, exc)
        raise
    except BaseException as exc:
        code = "internal_error" if isinstance(exc, Exception) else "interrupted"
        _fail_run(run, code, f"{type(exc).__name__}: {exc}")
        logger.exception("IBKR sync #%s failed unexpectedly", run.pk)
        raise

    logger.info("IBKR sync #%s finished: %s", run.pk, totals)
    return SyncResult(
        sync_run_id=run.pk,
        accounts=accounts,
        **{kind: value for kind, value in totals.items() if kind != "errors"},
        errors=counts.errors,
        by_account=counts.by_account(accounts),
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


# --- the lock ------------------------------------------------------------------------------


def _start_run(*, trigger: str, user: Any, account_id: str | None) -> SyncRun:
    fields = {
        "trigger": trigger,
        "user": user if getattr(user, "is_authenticated", False) else None,
        "account_filter": account_id or "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    for _attempt in range(2):
        try:
            with transaction.atomic():
                return SyncRun.objects.create(status=SyncRun.Status.RUNNING, **fields)
        except IntegrityError:
            if not _release_stale_lock():
                break
    error = SyncAlreadyRunning(
        "Another IBKR sync is running; this one was not started. Try again when it finishes."
    )
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
    crashed_here = running.host == socket.gethostname() and not _process_alive(running.pid)
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
    try:
        # Only the failure: counts set on the instance by a rolled-back attempt are void.
        SyncRun.objects.filter(pk=run.pk).update(
            status=SyncRun.Status.FAILED,
            error_code=code,
            error_message=message,
            finished_at=timezone.now(),
        )
    except Exception:
        logger.exception("Could not record the failure of IBKR sync #%s", run.pk)


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

    reported = {*snapshot.accounts, *(a for a, _ in mapped), *(a for a, _ in unmapped)}
    account_ids = sorted(a for a in reported if a)
    accounts = _upsert_accounts(account_ids, now)
    instruments = _upsert_instruments(mapped.values(), now)

    # Plain rows, not model instances: building 10,000s of instances costs more than
    # the queries. Instances are made only for the rows that will be written.
    account_by_pk = {pk: account_id for account_id, pk in accounts.items()}
    rows = Position.objects.filter(account_id__in=accounts.values()).values(
        "pk", "account_id", "instrument__external_id", *_POSITION_STATE
    )
    existing = {
        (account_by_pk[row["account_id"]], row["instrument__external_id"]): row for row in rows
    }
    to_create: list[Position] = []
    to_update: list[Position] = []
    changes: list[PositionChange] = []
    for key, item in mapped.items():
        row = existing.get(key)
        if row is None:
            to_create.append(
                Position(
                    account_id=accounts[item.account_id],
                    instrument_id=instruments[item.instrument_id],
                    opened_at=now,
                    last_synced_at=now,
                    **item.position,
                )
            )
            counts.add(item.account_id, "created")
            continue
        if row["closed_at"] is not None:
            kind = PositionChange.Kind.REOPENED
            before = (None, None)
            row.update(closed_at=None, opened_at=now)
        elif _differs(row, item.position, ("quantity", "average_cost")):
            kind = PositionChange.Kind.UPDATED
            before = (row["quantity"], row["average_cost"])
        else:
            counts.add(item.account_id, "unchanged")
            continue
        counts.add(item.account_id, kind)
        row.update(item.position, last_synced_at=now)
        to_update.append(Position(pk=row["pk"], **{name: row[name] for name in _POSITION_STATE}))
        changes.append(_change(run, row["pk"], kind, before, row))

    gone = []
    for key, row in existing.items():
        if row["closed_at"] is None and key not in mapped and key not in unmapped:
            gone.append(row["pk"])
            counts.add(key[0], "closed")
            changes.append(
                _change(
                    run,
                    row["pk"],
                    PositionChange.Kind.CLOSED,
                    (row["quantity"], row["average_cost"]),
                    None,
                )
            )
    created = Position.objects.bulk_create(to_create, batch_size=BATCH_SIZE)
    changes.extend(
        _change(run, position.pk, PositionChange.Kind.CREATED, (None, None), vars(position))
        for position in created
    )
    Position.objects.bulk_update(to_update, _POSITION_STATE, batch_size=BATCH_SIZE)
    for chunk in _chunks(gone):
        Position.objects.filter(pk__in=chunk).update(closed_at=now, last_synced_at=now)
    PositionChange.objects.bulk_create(changes, batch_size=BATCH_SIZE)
    return account_ids, counts


def _change(
    run: SyncRun,
    position_pk: int,
    kind: str,
    before: tuple[Decimal | None, Decimal | None],
    after: dict[str, Any] | None,
) -> PositionChange:
    return PositionChange(
        sync_run_id=run.pk,
        position_id=position_pk,
        kind=kind,
        quantity_before=before[0],
        average_cost_before=before[1],
        quantity_after=None if after is None else after["quantity"],
        average_cost_after=None if after is None else after["average_cost"],
    )


_POSITION_STATE = (
    "quantity",
    "average_cost",
    "cost_basis",
    "opened_at",
    "last_synced_at",
    "closed_at",
)


def _differs(stored: dict[str, Any], values: dict[str, Any], names: Iterable[str]) -> bool:
    """Whether any of `names` in `values` differs from what the database holds.

    Derived fields (cost basis) are left out by the caller, so rounding in them can
    never make an unchanged row look changed. SQLite keeps 15 significant digits of a
    decimal column: compare at that precision there, exactly elsewhere."""
    if connection.vendor != "sqlite":
        return any(values[name] != stored[name] for name in names)
    return any(_sqlite_stored(values[name]) != stored[name] for name in names)


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
    to_update = []
    for chunk in _chunks(list(wanted)):
        rows = Instrument.objects.filter(broker=BROKER, external_id__in=chunk).values(
            "pk", "external_id", *INSTRUMENT_FIELDS
        )
        for row in rows:
            conid = row["external_id"]
            ids[conid] = row["pk"]
            if _differs(row, wanted[conid], INSTRUMENT_FIELDS):
                row.update(wanted[conid], updated_at=now)
                to_update.append(Instrument(broker=BROKER, **row))
    Instrument.objects.bulk_update(
        to_update, [*INSTRUMENT_FIELDS, "updated_at"], batch_size=BATCH_SIZE // 4
    )
    created = Instrument.objects.bulk_create(
        [
            Instrument(broker=BROKER, external_id=conid, **fields)
            for conid, fields in wanted.items()
            if conid not in ids
        ],
        batch_size=BATCH_SIZE // 4,
    )
    ids.update((i.external_id, i.pk) for i in created)
    return ids


def _chunks(items: Sequence[Any], size: int = BATCH_SIZE) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
