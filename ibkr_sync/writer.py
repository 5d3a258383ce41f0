"""The set-based writer: one mapped snapshot (`mapping.MappedSnapshot`) written to the
configured models. It maps nothing: the service maps the snapshot before the write
transaction, and the writer only writes.

Runs inside the sync's transaction (the service owns it). First the accounts
(`_claim_accounts`): each account's `AccountReport`, the newest snapshot applied to it,
locked for the transaction (in one order, so that two syncs reporting the same account
take turns, never wait in a circle); an account whose stored report is newer than this
snapshot's moment for it is refused (`Written.refused`): nothing of it is written, and
the other accounts are applied as usual.

Then the positions of the accounts applied: existing rows read as plain tuples in a
fixed number of queries, new rows inserted batch by batch (`bulk.insert_rows`), changed
rows upserted, the rows no longer reported closed with one UPDATE per batch, nothing
written for rows that did not change, every change recorded as a PositionChange of the
run. Only the accounts the snapshot reported are reconciled: no sync closes a position
of an account it did not report. Instruments and accounts, which syncs of several
connections share, are inserted ON CONFLICT DO NOTHING (`bulk.insert_missing`).

Then the values of the accounts whose values were read (`_apply_values`): each valued
position's market price, value and P&L (one UPDATE ... FROM per batch: they change at
every sync, and they are not position changes), the cash balances per currency (the
stored set replaced by a whole one only: upserted, a currency no longer reported goes;
otherwise kept exactly) and one AccountSnapshot per account. An account
whose values are missing keeps what it had; the run records why (`SyncRun.account_values`).

Two kinds of time. What the data describes, the source's moment (`as_of`: of the
account's values, else of the snapshot): a position's `valued_at`, a snapshot's
`taken_at`, so that values read minutes before a slow write carry the minute they
describe; and an account's report, which takes the oldest part written of the account
(its positions', read before its values: `_reported_moment`). What a sync did, the
write's own moment (`now`): `opened_at`, `closed_at`, `last_synced_at`, a cash row's
`synced_at`, which say when a sync wrote or confirmed the row. A source that gives no
moment (a host's fake) is taken as of the write.
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
from .bulk import chunks, insert_missing, insert_new, insert_rows, touched, update_rows, upsert
from .mapping import (
    BROKER,
    INSTRUMENT_FIELDS,
    LEDGER_FIELDS,
    POSITION_VALUE_FIELDS,
    MappedPosition,
    MappedSnapshot,
    is_paper_account,
)
from .models import AccountReport, Connection, PositionChange, SyncRun
from .outcomes import RecordError, ValuesOutcome

KINDS = ("processed", "created", "updated", "unchanged", "reopened", "closed", "errors")


@dataclass
class Written:
    """What the writer did: the accounts applied, counted per kind, the records that
    could not be stored, each account's values outcome (when values were read), and the
    accounts refused with the reason."""

    accounts: list[str] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)  # (account, kind) -> count
    errors: list[RecordError] = field(default_factory=list)
    values: dict[str, ValuesOutcome] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    # The ledger rows, by kind: {"created": n, "updated": n, "unchanged": n}.
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, account: str, kind: str) -> None:
        self.tally[account, kind] += 1

    def total(self, kind: str) -> int:
        return sum(n for (_, k), n in self.tally.items() if k == kind)

    def by_account(self, accounts: Iterable[str]) -> dict[str, dict[str, int]]:
        return {a: {kind: self.tally[a, kind] for kind in KINDS} for a in accounts}


#: The name it had before it said more than counts.
Counts = Written


def apply_snapshot(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    *,
    connection_row: Connection | None = None,
    connection_name: str = "",
) -> Written:
    """Write `snapshot`, reported by `connection_row` (None: the settings' gateway), as
    `run`; `now` is the write's moment."""
    Position = conf.position_model()
    written = Written()
    written.refused = _claim_accounts(snapshot, run, now, connection_row, connection_name)
    snapshot = snapshot.without(set(written.refused))
    for account, count in snapshot.processed.items():
        written.tally[account, "processed"] += count
    for error in snapshot.errors:
        written.add(error.account, "errors")
    written.errors = list(snapshot.errors)
    written.values = dict(snapshot.outcomes)
    mapped, unmapped = snapshot.positions, snapshot.unmapped
    account_ids = written.accounts = list(snapshot.accounts)
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
            written.add(item.account_id, "created")
            continue
        pk, _, _, quantity, average_cost, closed_at = row
        if closed_at is not None:
            kind, before = PositionChange.Kind.REOPENED, (None, None)
        elif _differs(
            (quantity, average_cost), (item.position["quantity"], item.position["average_cost"])
        ):
            kind, before = PositionChange.Kind.UPDATED, (quantity, average_cost)
        else:
            written.add(item.account_id, "unchanged")
            continue
        written.add(item.account_id, kind)
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
            written.add(key[0], "closed")
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
    if snapshot.values:
        position_pks = {key: row[0] for key, row in existing.items() if key in mapped}
        position_pks.update(
            ((item.account_id, item.instrument_id), pk)
            for pk, item in zip(created_pks, to_create, strict=True)
        )
        _apply_values(snapshot, run, now, accounts, position_pks)
    if snapshot.ledger:
        written.ledger = _apply_ledger(snapshot, now, accounts)
    return written


#: What a ledger write counts of each kind.
LEDGER_COUNTS = ("created", "updated", "unchanged")


def _apply_ledger(
    snapshot: MappedSnapshot, now: dt.datetime, accounts: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Store the ledger rows of the accounts applied, keyed on the broker's ids: a row
    not stored yet is inserted (ON CONFLICT (broker, external_id) DO NOTHING), a stored
    one that differs (the broker corrected it, cancelled it) is updated, an equal one is
    left alone; none is deleted. A fixed number of statements per batch of rows, batch
    after batch in the order of the ids (so two writers wait for each other's rows in
    one order): the batch's stored rows read by their ids as plain tuples, its new ones
    inserted, its changed ones upserted; only one batch's stored rows are held at a
    time. The instruments the rows name are inserted where missing (a position's sync
    keeps them current)."""
    instruments = _ledger_instruments(snapshot, now)
    models_by_kind = conf.ledger_models()
    counts: dict[str, dict[str, int]] = {}
    for kind, rows in snapshot.ledger.items():
        model = models_by_kind[kind]
        fields = LEDGER_FIELDS[kind]
        tally = dict.fromkeys(LEDGER_COUNTS, 0)
        counts[kind] = tally
        for chunk in chunks(sorted(rows)):
            _apply_ledger_batch(model, fields, chunk, rows, accounts, instruments, tally)
    return counts


def _apply_ledger_batch(
    model: type[Any],
    fields: tuple[str, ...],
    chunk: Sequence[str],
    rows: dict[str, Any],
    accounts: dict[str, Any],
    instruments: dict[str, Any],
    tally: dict[str, int],
) -> None:
    """One batch of a ledger kind's rows (their external ids `chunk`, in order)."""
    stored: dict[str, tuple[Any, ...]] = {}
    for external_id, *values in model._default_manager.filter(
        broker=BROKER, external_id__in=chunk
    ).values_list("external_id", "account_id", "instrument_id", *fields):
        stored[external_id] = tuple(values)
    new, changed = [], []
    for external_id in chunk:
        row = rows[external_id]
        values = {
            "account_id": accounts[row.account_id],
            "instrument_id": None
            if row.instrument_id is None
            else instruments.get(row.instrument_id),
            **row.fields,
        }
        held = stored.get(external_id)
        if held is None:
            new.append({"broker": BROKER, "external_id": external_id, **values})
        elif _differs(
            held, [values["account_id"], values["instrument_id"], *map(row.fields.get, fields)]
        ):
            changed.append(model(broker=BROKER, external_id=external_id, **values))
        else:
            tally["unchanged"] += 1
    inserted = insert_new(model, new, _UNIQUE)
    tally["created"] += len(inserted)
    tally["unchanged"] += len(new) - len(inserted)  # inserted by another sync since
    upsert(
        model,
        changed,  # in the order of their ids, as the batch is
        batch_size=bulk.BATCH_SIZE // 4,
        unique_fields=list(_UNIQUE),
        update_fields=["account", "instrument", *fields],
    )
    tally["updated"] += len(changed)


def _ledger_instruments(snapshot: MappedSnapshot, now: dt.datetime) -> dict[str, Any]:
    """conId text -> the pk of every instrument the ledger's rows name, inserted where
    missing (ON CONFLICT DO NOTHING, in conId order); a stored one is left as it is."""
    wanted = {
        row.instrument_id
        for rows in snapshot.ledger.values()
        for row in rows.values()
        if row.instrument_id is not None
    }
    if not wanted:
        return {}
    Instrument = conf.instrument_model()
    ids: dict[str, Any] = {}
    for chunk in chunks(sorted(wanted)):
        ids.update(
            Instrument.objects.filter(broker=BROKER, external_id__in=chunk).values_list(
                "external_id", "pk"
            )
        )
    created = insert_missing(
        Instrument,
        (
            {
                "broker": BROKER,
                "external_id": conid,
                "created_at": now,
                "updated_at": now,
                **snapshot.ledger_instruments[conid],
            }
            for conid in sorted(wanted)
            if conid not in ids
        ),
        _UNIQUE,
    )
    ids.update((conid, pk) for (_, conid), pk in created.items())
    return ids


def _apply_values(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    accounts: dict[str, Any],
    position_pks: dict[tuple[str, str], Any],
) -> None:
    """Store the values of every account whose values were read. A fixed number of
    statements per batch of rows, whatever the number of accounts."""
    read = list(snapshot.values.values())
    # The moment each account's values describe (see the module's docstring).
    as_of = {account: snapshot.as_of_of(account, now) for account in snapshot.values}
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


def _claim_accounts(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    connection_row: Connection | None,
    connection_name: str,
) -> dict[str, str]:
    """Lock each reported account's `AccountReport` for this transaction; refuse the
    accounts whose stored report is newer than this snapshot's moment for them (returned,
    with the reason); record this snapshot as the newest of the others.

    An equal moment is not older: a snapshot may be applied again. The reports are
    inserted where missing (ON CONFLICT DO NOTHING: a report another sync is inserting
    makes this one wait for its commit), then locked FOR UPDATE, both in the order of
    the account ids: two syncs that report the same account take turns, and the later
    decides on what the earlier committed. (SQLite: a sync's write transaction is the
    only one at a time already, IMMEDIATE; FOR UPDATE is not needed there.)"""
    if not snapshot.accounts:
        return {}
    as_of = {account: _reported_moment(snapshot, account, now) for account in snapshot.accounts}
    mine = {
        "connection_id": None if connection_row is None else connection_row.pk,
        "connection_name": connection_name,
        "source": snapshot.source,
        "sync_run_id": run.pk,
        "applied_at": now,
    }
    insert_new(
        AccountReport,
        (
            {"broker": BROKER, "external_id": a, "as_of": as_of[a], **mine}
            for a in snapshot.accounts
        ),
        _UNIQUE,
    )
    stored = (
        AccountReport.objects.select_for_update()
        .filter(broker=BROKER, external_id__in=snapshot.accounts)
        .order_by("external_id")
        .values_list("external_id", "as_of", "connection_name", "sync_run_id")
    )
    refused: dict[str, str] = {}
    applied = []
    for account, stored_as_of, by, run_pk in stored:
        if stored_as_of > as_of[account]:
            refused[account] = _refusal(account, stored_as_of, by, as_of[account])
        elif run_pk != run.pk:  # this sync's own report (inserted just now) is in place
            applied.append(
                AccountReport(broker=BROKER, external_id=account, as_of=as_of[account], **mine)
            )
    upsert(
        AccountReport,
        applied,
        batch_size=bulk.BATCH_SIZE,
        unique_fields=list(_UNIQUE),
        update_fields=[
            "connection",
            "connection_name",
            "source",
            "as_of",
            "sync_run",
            "applied_at",
        ],
    )
    return refused


def _reported_moment(snapshot: MappedSnapshot, account: str, now: dt.datetime) -> dt.datetime:
    """The moment that orders an account's reports: the oldest part of what this snapshot
    writes of it. A source reads the positions first and each account's values after (a
    TWS read: seconds or minutes later), so positions are as old as the positions' moment
    even when the values describe a later one; ordering by the values' moment would let
    older positions overwrite a newer report of them, and refuse newer ones."""
    positions = snapshot.as_of or now
    values = snapshot.values_as_of.get(account)
    return positions if values is None else min(positions, values)


def _refusal(account: str, newer: dt.datetime, by: str, this: dt.datetime) -> str:
    """Why an account was refused, for whoever reads the run: which report is newer."""
    source = f"connection {by}" if by else "the settings' gateway"
    return (
        f"{account} was not written: {source} reported it as of {_moment(newer)}, after "
        f"this snapshot ({_moment(this)}); that newer report stands."
    )


def _moment(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


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
