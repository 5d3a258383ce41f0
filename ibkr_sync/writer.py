"""The set-based writer: one source's snapshot applied to the configured models.

Runs inside the sync's transaction (the service owns it). Reads existing rows as plain
tuples in a fixed number of queries, inserts new rows batch by batch (one multi-row
INSERT ... RETURNING per batch; UNNEST arrays on PostgreSQL), upserts changed rows,
closes the rows no longer reported with one UPDATE per batch, writes nothing for rows
that did not change, and records every change as a PositionChange of the run.

Then the values of the accounts whose values were read (`_apply_values`): each valued
position's market price, value and P&L (one UPDATE ... FROM per batch: they change at
every sync, and they are not position changes), the cash balances per currency (the
stored set replaced by a whole one only: upserted, a currency no longer reported goes;
otherwise kept exactly) and one AccountSnapshot per account. An account
whose values are missing keeps what it had; the run records why (`SyncRun.account_values`).

Two kinds of time. What the data describes, the source's moment (`as_of`: of the
account's values, else of the snapshot): a position's `valued_at` and a snapshot's
`taken_at`, so that values read minutes before a slow write carry the minute they
describe. What a sync did, the write's own moment (`now`): `opened_at`, `closed_at`,
`last_synced_at`, a cash row's `synced_at`, which say when a sync wrote or confirmed
the row. A source that gives no moment (a host's fake) is taken as of the write.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from django.db import connection

from . import bulk, conf
from .bulk import chunks, insert_missing, insert_rows, touched, update_rows, upsert
from .mapping import (
    BROKER,
    INSTRUMENT_FIELDS,
    POSITION_VALUE_FIELDS,
    MappedPosition,
    MappedValues,
    MappingError,
    contract_id_text,
    is_paper_account,
    is_storable_account_id,
    map_account_values,
    map_position,
)
from .models import PositionChange, SyncRun
from .snapshot import Snapshot

KINDS = ("processed", "created", "updated", "unchanged", "reopened", "closed", "errors")


@dataclass
class Counts:
    tally: Counter = field(default_factory=Counter)  # (account, kind) -> count
    errors: list[dict[str, Any]] = field(default_factory=list)
    # Per account whose values were asked for: {"status": "read", ...} or
    # {"status": "missing", "reason": ...}; empty when values were not asked for.
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, account: str, kind: str) -> None:
        self.tally[account, kind] += 1

    def total(self, kind: str) -> int:
        return sum(n for (_, k), n in self.tally.items() if k == kind)

    def by_account(self, accounts: Iterable[str]) -> dict[str, dict[str, int]]:
        return {a: {kind: self.tally[a, kind] for kind in KINDS} for a in accounts}


def apply_snapshot(snapshot: Snapshot, run: SyncRun, now: dt.datetime) -> tuple[list[str], Counts]:
    Position = conf.position_model()
    counts = Counts()
    mapped: dict[tuple[str, str], MappedPosition] = {}
    unmapped: set[tuple[str, str]] = set()
    for record in snapshot.positions:
        counts.add(record.account, "processed")
        try:
            item = map_position(record)
        except MappingError as exc:
            # Its stored row, if any, is left exactly as it was (not closed).
            unmapped.add((record.account, contract_id_text(record.con_id)))
            counts.add(record.account, "errors")
            counts.errors.append(
                {
                    "account": record.account,
                    # A conId too long for any integer column: its reason says so.
                    "con_id": record.con_id if abs(record.con_id) < 2**63 else None,
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
    created_pks = insert_rows(
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
        upsert(
            Position,
            to_change[kind],
            batch_size=bulk.BATCH_SIZE,
            unique_fields=["account", "instrument"],
            update_fields=fields,
        )
    for chunk in chunks(gone):
        Position.objects.filter(pk__in=chunk).update(
            **touched(Position, closed_at=now, last_synced_at=now)
        )
    insert_rows(
        PositionChange,
        itertools.chain(
            changes,
            (
                _change(run, pk, PositionChange.Kind.CREATED, (None, None), item.position)
                for pk, item in zip(created_pks, to_create, strict=True)
            ),
        ),
    )
    if snapshot.values_read:
        position_pks = {key: row[0] for key, row in existing.items() if key in mapped}
        position_pks.update(
            ((item.account_id, item.instrument_id), pk)
            for pk, item in zip(created_pks, to_create, strict=True)
        )
        _apply_values(snapshot, run, now, accounts, mapped, position_pks, counts)
    return account_ids, counts


def _apply_values(
    snapshot: Snapshot,
    run: SyncRun,
    now: dt.datetime,
    accounts: dict[str, int],
    mapped: dict[tuple[str, str], MappedPosition],
    position_pks: dict[tuple[str, str], int],
    counts: Counts,
) -> None:
    """Store the values of every account whose values were read; record for each account
    synced whether they were read or why not. A fixed number of statements per batch of
    rows, whatever the number of accounts."""
    held: dict[str, dict[int, tuple[Decimal, str, str, str]]] = {a: {} for a in accounts}
    for (account_id, instrument_id), item in mapped.items():
        held[account_id][int(instrument_id)] = (
            item.position["quantity"],
            item.instrument["symbol"],
            item.instrument["sec_type"],
            instrument_id,
        )
    read: list[MappedValues] = []
    # The moment each account's values describe (see the module's docstring).
    as_of: dict[str, dt.datetime] = {}
    for account_id in accounts:
        values = snapshot.account_values.get(account_id)
        if values is None:
            reason = _reason(snapshot.values_missing.get(account_id, "not read"))
            counts.values[account_id] = {"status": "missing", "reason": reason}
            continue
        item = map_account_values(values, held[account_id])
        read.append(item)
        as_of[account_id] = values.as_of or snapshot.as_of or now
        for error in item.errors:
            counts.add(account_id, "errors")
            counts.errors.append(error)
        counts.values[account_id] = {
            "status": "read",
            "base_currency": item.base_currency,
            "positions_valued": len(item.positions),
            "positions_stale": item.stale,
            "positions_unvalued": item.unvalued,
            "cash_currencies": sorted(item.cash),
            "cash_reported": item.cash_reported,
        }
        if item.cash_kept_reason:
            counts.values[account_id]["cash_kept_reason"] = _reason(item.cash_kept_reason)
    if not read:
        return

    Position = conf.position_model()
    update_rows(
        Position,
        (*POSITION_VALUE_FIELDS, "valued_at"),
        (
            (position_pks[item.account_id, instrument_id], *values, as_of[item.account_id])
            for item in read
            for instrument_id, values in item.positions.items()
        ),
    )

    Cash = conf.cash_balance_model()
    # The stored set is replaced only by a whole one: an account whose cash this download
    # cannot be trusted whole keeps every row exactly as it is (none updated, none gone).
    replaced = [item for item in read if not item.cash_kept_reason]
    read_pks = [accounts[item.account_id] for item in replaced]
    keep = {(accounts[item.account_id], currency) for item in replaced for currency in item.cash}
    gone = [
        pk
        for pk, account_pk, currency in Cash.objects.filter(account_id__in=read_pks).values_list(
            "pk", "account_id", "currency"
        )
        if (account_pk, currency) not in keep
    ]
    for chunk in chunks(gone):
        Cash.objects.filter(pk__in=chunk).delete()
    upsert(
        Cash,
        [
            Cash(account_id=accounts[item.account_id], currency=currency, synced_at=now, **row)
            for item in replaced
            for currency, row in item.cash.items()
        ],
        batch_size=bulk.BATCH_SIZE,
        unique_fields=["account", "currency"],
        update_fields=["amount", "exchange_rate", "rate_currency", "synced_at"],
    )

    insert_rows(
        conf.account_snapshot_model(),
        (
            {
                "account_id": accounts[item.account_id],
                "sync_run_id": run.pk,
                "taken_at": as_of[item.account_id],
                **item.snapshot,
            }
            for item in read
        ),
    )
    # The base currency IBKR reports is the account's: one UPDATE per currency.
    Account = conf.account_model()
    by_currency: dict[str, list[int]] = {}
    for item in read:
        if item.base_currency:
            by_currency.setdefault(item.base_currency, []).append(accounts[item.account_id])
    for currency, pks in by_currency.items():
        Account.objects.filter(pk__in=pks).exclude(base_currency=currency).update(
            **touched(Account, base_currency=currency)
        )


def _reason(text: str, limit: int = 500) -> str:
    """A reason as the run records it: short, and storable in any JSON column (no NUL)."""
    text = text.replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[:limit] + "..."


_UPDATED = ("quantity", "average_cost", "cost_basis", "last_synced_at")
_CHANGED_FIELDS = {"updated": _UPDATED, "reopened": (*_UPDATED, "opened_at", "closed_at")}


def _change(
    run: SyncRun,
    position_pk: Any,
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


def _upsert_accounts(account_ids: Sequence[str], now: dt.datetime) -> dict[str, Any]:
    """Create the accounts not seen before, stamp all as synced; return id -> pk (of the
    model's own type: an integer, a UUID, a text). Inserted ON CONFLICT DO NOTHING: a
    sync of another connection may create the same account at the same moment."""
    Account = conf.account_model()
    accounts = dict(
        Account.objects.filter(broker=BROKER, external_id__in=account_ids).values_list(
            "external_id", "pk"
        )
    )
    created = insert_missing(
        Account,
        (
            {
                "broker": BROKER,
                "external_id": a,
                "is_paper": is_paper_account(a),
                "last_synced_at": now,
            }
            for a in account_ids
            if a not in accounts
        ),
        _UNIQUE,
    )
    accounts.update((external_id, pk) for (_, external_id), pk in created.items())
    Account.objects.filter(pk__in=accounts.values()).update(**touched(Account, last_synced_at=now))
    return accounts


def _upsert_instruments(items: Iterable[MappedPosition], now: dt.datetime) -> dict[str, Any]:
    """Create or update the instruments of the mapped positions; return conId -> pk.

    Instruments are shared by every connection: syncs of several connections holding the
    same contracts write them at the same moment. New ones are inserted ON CONFLICT DO
    NOTHING (one that another sync inserted meanwhile is taken as it is: the next sync
    updates it if it differs), changed ones upserted, each in the order of their conIds
    (two syncs that wait for each other's rows wait in one order)."""
    Instrument = conf.instrument_model()
    wanted = {item.instrument_id: item.instrument for item in items}
    ids: dict[str, Any] = {}
    changed = []
    for chunk in chunks(list(wanted)):
        rows = Instrument.objects.filter(broker=BROKER, external_id__in=chunk).values_list(
            "pk", "external_id", *INSTRUMENT_FIELDS
        )
        for pk, conid, *stored in rows:
            ids[conid] = pk
            fields = wanted[conid]
            if _differs(stored, [fields[name] for name in INSTRUMENT_FIELDS]):
                changed.append(Instrument(broker=BROKER, external_id=conid, **fields))
    # Upserts on (broker, external_id), as for positions: cheaper than bulk_update.
    upsert(
        Instrument,
        sorted(changed, key=lambda instrument: instrument.external_id),
        batch_size=bulk.BATCH_SIZE // 4,
        unique_fields=list(_UNIQUE),
        update_fields=[*INSTRUMENT_FIELDS, "updated_at"],
    )
    created = insert_missing(
        Instrument,
        (
            {
                "broker": BROKER,
                "external_id": conid,
                "created_at": now,
                "updated_at": now,
                **wanted[conid],
            }
            for conid in wanted
            if conid not in ids
        ),
        _UNIQUE,
    )
    ids.update((conid, pk) for (_, conid), pk in created.items())
    return ids


#: The unique key of an account and of an instrument.
_UNIQUE = ("broker", "external_id")
