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
import functools
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from django.db import connection, models
from django.db.models.fields import AutoFieldMixin

from . import conf
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

# Rows per statement: below SQLite's bound-parameter limit for the widest statement.
BATCH_SIZE = 500

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
            batch_size=BATCH_SIZE,
            unique_fields=["account", "instrument"],
            update_fields=fields,
        )
    for chunk in _chunks(gone):
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
    for chunk in _chunks(gone):
        Cash.objects.filter(pk__in=chunk).delete()
    upsert(
        Cash,
        [
            Cash(account_id=accounts[item.account_id], currency=currency, synced_at=now, **row)
            for item in replaced
            for currency, row in item.cash.items()
        ],
        batch_size=BATCH_SIZE,
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


def update_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
    **constants: Any,
) -> None:
    """UPDATE existing rows given as (pk, *values of `fields`), setting `constants` on each
    too, where bulk_update's CASE WHEN per field grows with the rows: on PostgreSQL one
    UPDATE ... FROM a temporary table the rows are COPYed into (UNNEST arrays per batch
    without psycopg 3), on SQLite one UPDATE ... FROM a VALUES list per batch. The model's
    `auto_now` fields are set too, as `Model.save()` would; keys and values are put in the
    database's form as `insert_rows` puts them (a UUID key as hex text on SQLite)."""
    meta = model._meta
    constants = {k: v for k, v in touched(model, **constants).items() if k not in fields}
    columns = [meta.get_field(name) for name in fields]
    preset = [(meta.get_field(name), value) for name, value in constants.items()]
    qn = connection.ops.quote_name
    table, pk = qn(meta.db_table), qn(meta.pk.column)
    names = ["pk", *(f"v{i}" for i in range(len(columns)))]
    assignments = [f"{qn(f.column)} = v.{name}" for f, name in zip(columns, names[1:], strict=True)]
    assignments += [f"{qn(f.column)} = %s" for f, _ in preset]
    preset_params = [f.get_db_prep_save(value, connection) for f, value in preset]
    vendor = connection.vendor
    if vendor == "sqlite" and connection.Database.sqlite_version_info < (3, 33):
        vendor = "other"  # no UPDATE ... FROM before SQLite 3.33
    if vendor not in ("postgresql", "sqlite"):
        for chunk in _batches(rows, BATCH_SIZE):
            model.objects.bulk_update(
                [
                    model(pk=row[0], **dict(zip(fields, row[1:], strict=True)), **constants)
                    for row in chunk
                ],
                [*fields, *constants],
            )
        return
    prepare = [_given_preparer(meta.pk), *map(_given_preparer, columns)]
    if any(prepare):
        rows = (
            tuple(v if p is None else p(v) for v, p in zip(row, prepare, strict=True))
            for row in rows
        )
    with connection.cursor() as cursor:
        if vendor == "postgresql" and _can_copy(cursor):
            _copy_to_scratch(cursor, meta.pk, columns, names, rows)
            cursor.execute(f"UPDATE {table} SET {', '.join(assignments)} FROM {_UPDATES} v "
                           f"WHERE {table}.{pk} = v.pk", preset_params)  # fmt: skip
            cursor.execute(f"DROP TABLE {_UPDATES}")
            return
        for chunk in _batches(rows, min(BATCH_SIZE, _MAX_PARAMETERS // len(names))):
            if vendor == "postgresql":
                types = [meta.pk.rel_db_type(connection).split("(")[0]]
                types += [_array_type(f) for f in columns]
                arrays = ", ".join(f"%s::{t}[]" for t in types)
                sql = (
                    f"UPDATE {table} SET {', '.join(assignments)} FROM UNNEST({arrays}) "
                    f"AS v({', '.join(names)}) WHERE {table}.{pk} = v.pk"
                )
                params = [list(column) for column in zip(*chunk, strict=True)]
                cursor.execute(sql, [*preset_params, *params])
            else:
                one_row = "(" + ", ".join(["%s"] * len(names)) + ")"
                sql = (
                    f"WITH v({', '.join(names)}) AS (VALUES {', '.join([one_row] * len(chunk))}) "
                    f"UPDATE {table} SET {', '.join(assignments)} FROM v "
                    f"WHERE {table}.{pk} = v.pk"
                )
                cursor.execute(sql, [*(value for row in chunk for value in row), *preset_params])


def _can_copy(cursor: Any) -> bool:
    return hasattr(cursor.cursor, "copy")  # psycopg 3 (psycopg2 copies otherwise)


#: The session's own scratch table for `update_rows` on PostgreSQL.
_UPDATES = "pg_temp.ibkr_sync_updates"


def _copy_to_scratch(
    cursor: Any,
    pk_field: models.Field,
    columns: Sequence[models.Field],
    names: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
) -> None:
    """PostgreSQL: the rows COPYed into a temporary table, for one UPDATE ... FROM it (three
    times faster than batches of UPDATE ... FROM UNNEST at 10,000 rows; a fixed number of
    statements whatever their number)."""
    types = [pk_field.rel_db_type(connection)]
    types += [f.db_type(connection) for f in columns]
    definition = ", ".join(f"{name} {kind}" for name, kind in zip(names, types, strict=True))
    cursor.execute(f"DROP TABLE IF EXISTS {_UPDATES}")
    cursor.execute(f"CREATE TEMPORARY TABLE {_UPDATES.split('.')[1]} ({definition})")
    with cursor.cursor.copy(f"COPY {_UPDATES} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


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
    model's own type: an integer, a UUID, a text)."""
    Account = conf.account_model()
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
    Account.objects.filter(pk__in=accounts.values()).update(**touched(Account, last_synced_at=now))
    return accounts


def _upsert_instruments(items: Iterable[MappedPosition], now: dt.datetime) -> dict[str, Any]:
    """Create or update the instruments of the mapped positions; return conId -> pk."""
    Instrument = conf.instrument_model()
    wanted = {item.instrument_id: item.instrument for item in items}
    ids: dict[str, Any] = {}
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
    upsert(
        Instrument,
        changed,
        batch_size=BATCH_SIZE // 4,
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
    ids.update(zip(new, insert_rows(Instrument, rows), strict=True))
    return ids


def insert_rows(model: type[models.Model], rows: Iterable[dict[str, Any]]) -> list[Any]:
    """INSERT rows given as {field attname: value}; return their new primary keys, in order.

    The fast path for the 10,000s of rows of a first sync. `bulk_create` runs every
    value of every object through the generic field API, which then costs more than the
    database does. The values a row gives are already what the database adapters take
    (str, int, Decimal, None: the driver adapts them exactly as Django would), so only
    the fields whose preparation is not that identity go through it (a datetime once per
    distinct value). Every other field of the model is filled as Django's `bulk_create`
    fills it (`_InsertPlan`): a host's models may have a UUID primary key, `auto_now`
    stamps, defaults and database defaults of their own. Every row gives the same fields.
    A batch is one statement of the form Django's own bulk_create issues (tests compare
    the two): on PostgreSQL INSERT ... SELECT * FROM UNNEST(one array per column), unless a
    column cannot be an array (as Django decides), elsewhere a multi-row INSERT ... VALUES;
    both RETURNING the new keys, in the rows' order.
    """
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return []
    plan = _InsertPlan(model, first.keys())
    meta = model._meta
    qn = connection.ops.quote_name
    columns = ", ".join(qn(f.column) for f in plan.fields)
    head = f"INSERT INTO {qn(meta.db_table)} ({columns}) "
    tail = f" RETURNING {qn(meta.pk.column)}"
    if plan.unnest:
        # Array types without their length/precision, as Django does: varchar[], numeric[].
        arrays = ", ".join(f"%s::{_array_type(f)}[]" for f in plan.fields)
        statement = f"{head}SELECT * FROM UNNEST({arrays}){tail}"
    one_row = "(" + ", ".join(["%s"] * len(plan.fields)) + ")"
    pks: list[Any] = []
    with connection.cursor() as cursor:
        size = min(BATCH_SIZE, _MAX_PARAMETERS // len(plan.fields))
        for chunk in _batches(itertools.chain([first], rows), size):
            values = plan.values(chunk)
            if plan.unnest:
                cursor.execute(statement, [list(column) for column in zip(*values, strict=True)])
            else:
                sql = f"{head}VALUES {', '.join([one_row] * len(chunk))}{tail}"
                cursor.execute(sql, [value for row in values for value in row])
            pks.extend(plan.key(pk) for (pk,) in cursor.fetchall())
    return pks


class _InsertPlan:
    """How each column of a model gets its value in `insert_rows`: as Django's bulk_create
    would give it, for fields the rows leave out as for those they give.

    - Left out of the statement, for the database to fill, as Django leaves them: a
      generated field, an auto-incremented primary key, and a field with a database
      default (`db_default`) and no Python default.
    - A field the rows leave out gets its default: a callable one (uuid4, say) called
      anew for every row, as `Model()` does; a primary key with a default too. A field
      with neither is NULL (or '' for a text field not null), as `Model()` leaves it; the
      system checks refuse the fields of a host's own that this cannot fill
      (`ibkr_sync.E007`).
    - Then `pre_save(obj, add=True)`, where the field's class has one of its own:
      `auto_now` and `auto_now_add` stamps are set whatever the row gave, once per
      statement (Django stamps each object microseconds apart; rows inserted by one
      statement are inserted at one time); any other field's own pre_save for each row.
    - Then the database's form (`get_db_prep_save`), except where that is the identity for
      the values the writer gives (text, integer, decimal and boolean fields, and foreign
      keys to such keys): a UUID key is its hex string on SQLite, for instance; a date or a
      datetime is prepared once per distinct value.
    """

    def __init__(self, model: type[models.Model], given: Iterable[str]) -> None:
        given = set(given)
        self.fields = [f for f in model._meta.concrete_fields if _inserted(f, given)]
        self.names = [f.attname for f in self.fields]
        # attname -> the prepared value every row gets (a default), or every row of a
        # statement (an auto_now / auto_now_add stamp, set by `values`).
        self.fixed: dict[str, Any] = {}
        self.stamps = [f for f in self.fields if _is_stamp(f)]
        self.per_row: list[models.Field] = []  # fields whose callable default each row calls
        defaults: dict[str, Any] = {}
        for f in self.fields:
            if f.attname in given or f in self.stamps:
                continue
            if f.has_default() and callable(f.default):
                self.per_row.append(f)
            else:
                defaults[f.attname] = f.get_default()
        self.hooks = [f for f in self.fields if _has_pre_save(f) and f not in self.stamps]
        self.defaults = defaults if self.hooks else {}  # what a hook may read
        for name, value in defaults.items():
            field = self.fields[self.names.index(name)]
            if field not in self.hooks:
                self.fixed[name] = field.get_db_prep_save(value, connection)
        self.prepare = [
            None
            if f.attname in self.fixed or f in self.stamps
            else _given_preparer(f)
            if f.attname in given and f not in self.hooks
            else functools.partial(f.get_db_prep_save, connection=connection)
            for f in self.fields
        ]
        self.unnest = connection.vendor == "postgresql" and all(map(_unnestable, self.fields))
        pk = model._meta.pk
        self.pk_column = pk.get_col(model._meta.db_table)
        self.converters = [
            *connection.ops.get_db_converters(self.pk_column),
            *pk.get_db_converters(connection),
        ]

    def values(self, rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """The rows of one statement in the database's form, one value per column."""
        instance = _Instance({})
        for f in self.stamps:
            self.fixed[f.attname] = f.get_db_prep_save(f.pre_save(instance, True), connection)
        fixed, names, prepare = self.fixed, self.names, self.prepare
        out = []
        for row in rows:
            if self.per_row or self.hooks:
                row = {**self.defaults, **row}
                for f in self.per_row:
                    row[f.attname] = f.get_default()
                instance = _Instance(row)
                for f in self.hooks:
                    row[f.attname] = f.pre_save(instance, True)
            out.append(
                [
                    fixed[name]
                    if name in fixed
                    else row[name]
                    if convert is None
                    else convert(row[name])
                    for name, convert in zip(names, prepare, strict=True)
                ]
            )
        return out

    def key(self, value: Any) -> Any:
        """A primary key RETURNING gave, as the ORM reads it (a UUID, not its hex text)."""
        for converter in self.converters:
            value = converter(value, self.pk_column, connection)
        return value


def _inserted(field: models.Field, given: set[str]) -> bool:
    """Whether an INSERT names the field, or leaves it to the database as Django does."""
    if field.generated:
        return False
    if field.attname in given:
        return True
    if isinstance(field, AutoFieldMixin):
        return False
    return field.has_default() or not field.has_db_default()


def _has_pre_save(field: models.Field) -> bool:
    """Whether the field's pre_save() may give another value than the one it holds."""
    return _is_stamp(field) or type(field).pre_save not in _PLAIN_PRE_SAVE


def _is_stamp(field: models.Field) -> bool:
    """An `auto_now` / `auto_now_add` field of Django's own date and time classes."""
    auto = getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
    return auto and type(field).pre_save in _PLAIN_PRE_SAVE


_PLAIN_PRE_SAVE = {
    models.Field.pre_save,
    models.DateField.pre_save,  # without auto_now / auto_now_add: the value held
    models.DateTimeField.pre_save,
    models.TimeField.pre_save,
}

#: Field classes whose database form of the writer's own values is the value itself.
_PLAIN_TYPES = {
    models.CharField,
    models.TextField,
    models.DecimalField,
    models.BooleanField,
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
    models.AutoField,
    models.BigAutoField,
    models.SmallAutoField,
}


def _given_preparer(field: models.Field) -> Any:
    """How a value the writer gives for `field` becomes the database's: None where it
    already is (the fast path), else as Django prepares it."""
    target = field.target_field if type(field) is models.ForeignKey else field
    if type(target) in _PLAIN_TYPES:
        return None
    if type(field) in (models.DateTimeField, models.DateField):
        return _CachedPreparer(field)
    return functools.partial(field.get_db_prep_save, connection=connection)


def _unnestable(field: models.Field) -> bool:
    """Django's own rule for a column of an INSERT ... UNNEST on PostgreSQL: a standard
    type, and one placeholder whatever the value."""
    target = field.target_field if field.is_relation else field
    return (
        not hasattr(field, "get_placeholder")
        and target.get_internal_type() in connection.data_types
    )


def _array_type(field: models.Field) -> str:
    return field.db_type(connection).split("(")[0]


class _Instance:
    """What a field's pre_save() reads and sets on a model instance: the row's values,
    by attname (a model instance per row would cost more than the INSERT)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__ = values


def touched(model: type[models.Model], **values: Any) -> dict[str, Any]:
    """`values` for an UPDATE of the model's rows, with its `auto_now` fields set as
    `Model.save()` would set them (a value given wins): Django's `QuerySet.update()` and
    `bulk_update()` leave them alone, so every UPDATE the writer issues sets them itself."""
    instance = _Instance({})
    stamps = {
        f.name: f.pre_save(instance, False)
        for f in model._meta.concrete_fields
        if getattr(f, "auto_now", False) and not f.generated
    }
    return {**stamps, **values}


def upsert(model: type[models.Model], objs: Sequence[models.Model], **options: Any) -> None:
    """`bulk_create(objs, update_conflicts=True, ...)`, with the model's `auto_now` fields
    among those a conflict updates (bulk_create stamps them on the rows it inserts, not on
    those it updates)."""
    update_fields = list(options.pop("update_fields"))
    update_fields += [name for name in touched(model) if name not in update_fields]
    model._default_manager.bulk_create(
        objs, update_conflicts=True, update_fields=update_fields, **options
    )


# Below SQLite's default limit of bound parameters per statement (32766 since 3.32).
_MAX_PARAMETERS = 30_000


class _CachedPreparer:
    """A field's database form of a value, computed once per distinct value (the dates and
    datetimes of a sync repeat: its own time, an option's expiry)."""

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
