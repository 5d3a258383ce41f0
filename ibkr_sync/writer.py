"""The set-based writer: one mapped snapshot (`mapping.MappedSnapshot`) written to the
configured models. It maps nothing: the service maps the snapshot before the write
transaction, and the writer only writes (a streamed ledger's batches are mapped by
`mapping` as the writer takes them, inside the transaction: `ledger_batches()`).

Runs inside the sync's transaction (the service owns it). First the accounts
(`_claim_accounts`): each account's `AccountReport`, the newest snapshot applied to it,
locked for the transaction (in one order, so that two syncs reporting the same account
take turns, never wait in a circle); an account whose stored report is newer than this
snapshot's moment for it, or is held by another owner than this connection's (an owned
account never changes hands by a sync, nor when its connection is removed:
`visibility`), is refused (`Written.refused`): nothing of its state is written, and the
other accounts are applied as usual. The history (the ledger, each day's values) of an
account refused because a newer report stands is written all the same (it describes
what happened, keyed so that it is written once); of an account another owner holds,
nothing: neither in a full write nor in a history-only one (`_claim_history`), and no
ledger row stored under one account is ever moved to another (`_apply_ledger_batch`).

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
import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from django.db import connection
from django.db.models import Count, Max, Q
from django.utils import timezone

from . import bulk, conf, visibility
from .bulk import chunks, insert_missing, insert_new, insert_rows, touched, update_rows, upsert
from .mapping import (
    BROKER,
    INSTRUMENT_FIELDS,
    LEDGER_FIELDS,
    POSITION_VALUE_FIELDS,
    MappedLedger,
    MappedLedgerRow,
    MappedPosition,
    MappedSnapshot,
    is_paper_account,
    is_storable_account_id,
    ledger_row_error,
)
from .models import AccountReport, Connection, PositionChange, SyncRun
from .outcomes import RecordError, ValuesOutcome

logger = logging.getLogger(__name__)

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
    # The moment this snapshot was for each account refused (`_reported_moment`): what a
    # read of the same snapshot again is refused against (`refusals`).
    refused_as_of: dict[str, dt.datetime] = field(default_factory=dict)
    # The accounts of `refused` that another owner holds (`_owned_by_another`): nothing
    # of them was written, their history neither (an account refused because a newer
    # report of it stands has its history written).
    refused_owned: list[str] = field(default_factory=list)
    # The ledger rows, by kind: {"created": n, "updated": n, "unchanged": n}.
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)
    # A dry run's changes, as they would have been recorded (then rolled back).
    preview: list[dict[str, Any]] | None = None
    # The account snapshots (a sync's, and each day's of a period): the same counts.
    daily: dict[str, int] = field(default_factory=dict)
    # The accounts whose history only was written (`state` False: a back-fill's older
    # window).
    history_only: list[str] = field(default_factory=list)
    # Per account and ledger kind, the first and last day of the rows written ([] while
    # none is dated): what `statement_ranges` counts.
    ledger_days: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def add(self, account: str, kind: str) -> None:
        self.tally[account, kind] += 1

    def total(self, kind: str) -> int:
        return sum(n for (_, k), n in self.tally.items() if k == kind)

    def by_account(self, accounts: Iterable[str]) -> dict[str, dict[str, int]]:
        return {a: {kind: self.tally[a, kind] for kind in KINDS} for a in accounts}


#: The name it had before it said more than counts.
Counts = Written


class PositionsChanged(Exception):
    """Accounts the snapshot took as unchanged (`MappedSnapshot.unchanged`, by the digests
    read before its write transaction) whose stored positions were written since by
    another sync: nothing was written; map them again and write again."""

    def __init__(self, accounts: list[str]) -> None:
        super().__init__(", ".join(accounts))
        self.accounts = accounts


def stored_digests(
    accounts: Iterable[str], reported: Mapping[str, tuple[str, dt.datetime]] | None = None
) -> dict[str, str]:
    """Per account, the digest of the positions last written for it (`AccountReport`),
    for `mapping.map_snapshot(known=...)`: read before the write transaction, checked
    again inside it. `reported`: the reports read already (`reported_digests`, before
    the source read); only the accounts it lacks are read here.

    Instruments are shared by every connection and source: an account is left out (its
    positions mapped and compared again, their instruments written back as this source
    reports them) when an instrument of one of its open positions was changed after its
    report was last applied (`Instrument.updated_at` later than `applied_at`: another
    connection, a Flex import, an edit). Cheap when none changed, as at almost every
    sync: the reports, then whether any instrument changed since the oldest of them (one
    scan of the instruments, no join); only if one did, which open positions of these
    accounts hold such an instrument."""
    storable = [a for a in accounts if is_storable_account_id(a)]  # none other is stored
    reports = {a: reported[a] for a in storable if a in reported} if reported else {}
    missing = [a for a in storable if a not in reports]
    if missing:
        reports.update(
            (account, (digest, applied_at))
            for account, digest, applied_at in AccountReport.objects.filter(
                broker=BROKER, external_id__in=missing
            ).values_list("external_id", "positions_digest", "applied_at")
        )
    reports = {account: report for account, report in reports.items() if report[0]}
    stale = instruments_changed({account: applied for account, (_, applied) in reports.items()})
    return {account: digest for account, (digest, _) in reports.items() if account not in stale}


def instruments_changed(applied: dict[str, dt.datetime]) -> set[str]:
    """The accounts of `applied` (account -> when its report was last applied) holding an
    open position whose instrument was changed after that (`Instrument.updated_at`):
    another connection's or source's sync, or an edit, since; a sync of the account
    writes it back as its source reports it. One query while no instrument changed since
    the oldest of them; only if one did, one more for which positions hold it."""
    if not applied:
        return set()
    since = min(applied.values())
    if not conf.instrument_model().objects.filter(updated_at__gt=since).exists():
        return set()
    held = (
        conf.position_model()
        .objects.filter(
            account__broker=BROKER,
            account__external_id__in=list(applied),
            closed_at__isnull=True,
            instrument__updated_at__gt=since,
        )
        .values_list("account__external_id", "instrument__updated_at")
    )
    return {
        account
        for account, updated_at in held
        if account in applied and updated_at > applied[account]
    }


def reported_digests(connection_row: Connection | None) -> dict[str, tuple[str, dt.datetime]]:
    """Per account that `connection_row` (None: the settings' gateway) reported last, the
    digest of the positions written for it ("" for none) and when its report was applied:
    read before the source reads, to tell it the digests (`mapping.written_positions`:
    it may leave those positions undecoded), and as `stored_digests`' reports. Another
    sync may write an account after this: the write transaction finds it, as it finds a
    write after `stored_digests`."""
    reports = AccountReport.objects.filter(broker=BROKER)
    if connection_row is None:
        reports = reports.filter(connection__isnull=True, connection_name="")
    else:
        reports = reports.filter(connection=connection_row)
    return {
        account: (digest, applied_at)
        for account, digest, applied_at in reports.values_list(
            "external_id", "positions_digest", "applied_at"
        )
    }


#: Each ledger kind's date column (what a statement's period holds its rows by).
LEDGER_DATES = {"trades": "trade_date", "cash_transactions": "date", "corporate_actions": "date"}


def statement_ranges(
    snapshot: MappedSnapshot, state: Iterable[str], written: Written
) -> dict[str, dict[str, list[Any] | None]]:
    """What a snapshot of a period wrote (`written`), per account, as ranges to count
    (`statement_counts`): the open positions and the cash balances of the accounts whose
    state it applied (`state`), and per ledger kind and for the account snapshots the
    first and last day (moment) of its rows (none for a kind whose rows are all
    undated: `Written.ledger_days`); none of an account another owner holds
    (`Written.refused_owned`: nothing of it was written). JSON-ready (ISO texts)."""
    state = set(state)
    ranges: dict[str, dict[str, list[Any] | None]] = {a: {} for a in snapshot.accounts}
    for account in state & set(ranges):
        ranges[account]["positions"] = ranges[account]["cash"] = None
    for account, kinds in written.ledger_days.items():
        if account in ranges:
            for kind, days in kinds.items():
                ranges[account][kind] = list(days)
    for account, tables in ranges.items():
        if account in written.refused_owned:
            continue
        moments = [moment for moment, _ in snapshot.daily.get(account, ())]
        if account in state:  # the account's own snapshot, as of the state applied
            moment = snapshot.values_as_of.get(account) or snapshot.as_of
            if moment is not None:
                moments.append(moment)
        if moments:
            tables["snapshots"] = [min(moments), max(moments)]
    return {
        account: {
            table: None if bounds is None else [bound.isoformat() for bound in bounds]
            for table, bounds in sorted(tables.items())
        }
        for account, tables in sorted(ranges.items())
    }


def statement_counts(ranges: dict[str, dict[str, list[str] | None]]) -> dict[str, dict[str, Any]]:
    """What is stored now in `statement_ranges`' ranges, per account: a digest of every
    column of its open positions, of its cash balances and of its account snapshots
    taken in the range (a few rows each); of its ledger rows of each kind dated in the
    range (or undated), how many and when the last of them changed (`updated_at`, where
    the model has it: the ledger is 100,000s of rows, read whole only by a full import).
    A statement applied again is taken for unchanged only while these are as its write
    left them (`services._applied_statement`): a row deleted, added, or edited through
    the ORM since makes it read whole again."""
    Account = conf.account_model()
    storable = [a for a in ranges if is_storable_account_id(a)]
    pks = dict(
        Account.objects.filter(broker=BROKER, external_id__in=storable).values_list(
            "external_id", "pk"
        )
    )
    ledger = conf.ledger_models()
    counts: dict[str, dict[str, Any]] = {}
    for account, tables in ranges.items():
        pk = pks.get(account)
        counted = counts[account] = {}
        for table, bounds in tables.items():
            if pk is None:
                counted[table] = 0
            elif table == "positions":
                counted[table] = _rows_digest(
                    conf.position_model().objects.filter(account_id=pk, closed_at__isnull=True)
                )
            elif table == "cash":
                counted[table] = _rows_digest(
                    conf.cash_balance_model().objects.filter(account_id=pk)
                )
            elif table == "snapshots":
                low, high = (dt.datetime.fromisoformat(b) for b in bounds)
                counted[table] = _rows_digest(
                    conf.account_snapshot_model().objects.filter(
                        account_id=pk, taken_at__range=(low, high)
                    )
                )
            elif table in ledger:
                model = ledger[table]
                column = LEDGER_DATES[table]
                dated = Q(**{f"{column}__isnull": True})
                if bounds:
                    low, high = (dt.date.fromisoformat(b) for b in bounds)
                    dated |= Q(**{f"{column}__range": (low, high)})
                rows = model._default_manager.filter(dated, account_id=pk).order_by()
                figures = {"n": Count("pk")}
                if any(f.name == "updated_at" for f in model._meta.concrete_fields):
                    figures["changed"] = Max("updated_at")
                found = rows.aggregate(**figures)
                changed = found.get("changed")
                counted[table] = [found["n"], changed.isoformat() if changed else None]
            else:  # a kind the host no longer keeps: another mapping, never the same
                counted[table] = -1
    return counts


def _rows_digest(rows: Any) -> str:
    """A digest of every column of `rows` (in pk order), and how many."""
    columns = [field.attname for field in rows.model._meta.concrete_fields]
    digest = hashlib.blake2b(digest_size=16)
    n = 0
    for row in rows.order_by("pk").values_list(*columns).iterator(chunk_size=2000):
        digest.update(repr(row).encode())
        n += 1
    return f"{n}:{digest.hexdigest()}"


def reported_moments(run: SyncRun, account_ids: Iterable[str]) -> dict[str, dt.datetime]:
    """The accounts of `account_ids` whose state `run` applied (their report is its),
    with the moment it applied to each."""
    return dict(
        AccountReport.objects.filter(
            broker=BROKER, external_id__in=list(account_ids), sync_run=run
        ).values_list("external_id", "as_of")
    )


def apply_snapshot(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    *,
    connection_row: Connection | None = None,
    connection_name: str = "",
    state: bool = True,
) -> Written:
    """Write `snapshot`, reported by `connection_row` (None: the settings' gateway), as
    `run`; `now` is the write's moment. `state` False writes its history only (an older
    window of a back-fill: the ledger and the daily values, no position, cash or
    report), as for an account refused because a newer report of it stands.

    An account another owner holds (`_owned_by_another`) gets nothing written, its
    history neither, whatever `state`: a statement proves no login any more than a
    gateway does, and its ledger and days would overwrite the owner's (rows keyed by the
    broker's ids) or add to them."""
    Position = conf.position_model()
    written = Written()
    if state:
        written.refused, owned = _claim_accounts(
            snapshot, run, now, connection_row, connection_name
        )
        written.refused_as_of = {a: _reported_moment(snapshot, a, now) for a in written.refused}
    else:
        owned = _claim_history(snapshot, run, now, connection_row, connection_name)
        written.refused = {account: _owned_refusal(account) for account in owned}
    written.refused_owned = owned
    # What this sync writes the history of: every account reported but another owner's.
    whole = snapshot.without(set(owned))
    if state:
        snapshot = snapshot.without(set(written.refused))
    else:
        snapshot = snapshot.without(set(snapshot.accounts))
        written.history_only = list(whole.accounts)
    for account, count in snapshot.processed.items():
        written.tally[account, "processed"] += count
    for error in snapshot.errors:
        written.add(error.account, "errors")
    written.errors = list(snapshot.errors)
    written.values = dict(snapshot.outcomes)
    mapped, unmapped = snapshot.positions, snapshot.unmapped
    account_ids = written.accounts = list(snapshot.accounts)
    accounts = _upsert_accounts(account_ids, now)
    owner = None if connection_row is None else connection_row.owner_id
    instruments, taken, stamped = _upsert_instruments(mapped.values(), now, owner)
    if stamped and account_ids:
        # The instruments it wrote were stamped (`updated_at`) after this sync's reports
        # were applied: the reports take a moment after them, so that a sync's own writes
        # are not taken for another's change of the instruments (`stored_digests`).
        AccountReport.objects.filter(
            broker=BROKER, external_id__in=account_ids, sync_run_id=run.pk
        ).update(applied_at=timezone.now())
    if taken:
        # Instruments another sync inserted meanwhile are kept as it wrote them: the next
        # sync of the accounts holding them compares their rows again.
        AccountReport.objects.filter(
            broker=BROKER,
            external_id__in=sorted(
                {item.account_id for item in mapped.values() if item.instrument_id in taken}
            ),
        ).update(positions_digest="")
    # The accounts whose positions are as stored (the same digest): not compared again,
    # once their open rows are counted as many as their records (rows deleted behind the
    # sync's back, an account deleted and created again: compared whole).
    if snapshot.unchanged:
        held = dict(
            Position.objects.filter(
                account_id__in=[accounts[a] for a in snapshot.unchanged], closed_at__isnull=True
            )
            .order_by()
            .values("account_id")
            .annotate(n=Count("pk"))
            .values_list("account_id", "n")
        )
        gone = [a for a, n in snapshot.unchanged.items() if held.get(accounts[a], 0) != n]
        if gone:
            raise PositionsChanged(gone)
    for account, count in snapshot.unchanged.items():
        written.tally[account, "unchanged"] += count
    compared = [accounts[a] for a in account_ids if a not in snapshot.unchanged]

    # Plain rows, not model instances: building 10,000s of instances costs more than
    # the queries. Instances are made only for the rows that will be written.
    account_by_pk = {pk: account_id for account_id, pk in accounts.items()}
    rows = Position.objects.filter(account_id__in=compared).values_list(
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
    snapshots: list[tuple[Any, dt.datetime, dict[str, Any], bool]] = []
    if snapshot.values:
        position_pks = {key: row[0] for key, row in existing.items() if key in mapped}
        valued = [accounts[a] for a in snapshot.values if a in snapshot.unchanged]
        if valued:  # the open rows of the unchanged accounts valued: their keys only
            rows = Position.objects.filter(
                account_id__in=valued, closed_at__isnull=True
            ).values_list("account_id", "instrument__external_id", "pk")
            position_pks.update(((account_by_pk[a], conid), pk) for a, conid, pk in rows)
        position_pks.update(
            ((item.account_id, item.instrument_id), pk)
            for pk, item in zip(created_pks, to_create, strict=True)
        )
        snapshots += _apply_values(snapshot, run, now, accounts, position_pks)
    # The history (the ledger, each day's values) of every account reported, refused
    # because a newer report stands or not: it describes what happened, keyed so that it
    # is written once, and overwrites no newer state (see `_apply_snapshots`). Not of an
    # account another owner holds (`whole` has nothing of it).
    history = [a for a in whole.accounts if a not in accounts]
    if history and whole.daily:
        accounts = {**accounts, **_history_accounts(history)}
        history = []
    for account, days in whole.daily.items():
        snapshots += [(accounts[account], moment, fields, False) for moment, fields in days]
    if snapshots:
        written.daily = _apply_snapshots(snapshots, run)
    if whole.ledger:
        _apply_ledger(whole, now, accounts, history, written, run, connection_name)
    return written


def _claim_history(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    connection_row: Connection | None,
    connection_name: str,
) -> list[str]:
    """A history-only write's accounts (a back-fill's older window): each one's report
    inserted where none is stored (`_report_history`), then locked for this transaction
    (none changed), both in the order of the ids, as `_claim_accounts` does: a
    history-only write takes turns with a sync writing the same accounts. Returns the
    accounts another owner than this connection's holds (`_held_by`, `_owned_by_another`):
    their history is not written, as their state would not be."""
    _report_history(snapshot, run, now, connection_row, connection_name)
    stored = (
        AccountReport.objects.select_for_update(of=("self",))
        .filter(broker=BROKER, external_id__in=snapshot.accounts)
        .order_by("external_id")
        .values_list("external_id", "connection_name", *_HOLDER)
    )
    owner = None if connection_row is None else connection_row.owner_id
    refused = []
    for account, by, *holder in stored:
        owned, holder_pk = _held_by(*holder)
        if _owned_by_another(owned, holder_pk, owner):
            refused.append(account)
            _log_owned_refusal(account, run, connection_name, owner, holder_pk, by)
    return refused


def _report_history(
    snapshot: MappedSnapshot,
    run: SyncRun,
    now: dt.datetime,
    connection_row: Connection | None,
    connection_name: str,
) -> None:
    """An account first known by a history-only write (a back-fill's older window) gets a
    report all the same, of this connection as of this snapshot's moment, inserted where
    none is stored (ON CONFLICT DO NOTHING; a stored one is left as it is): whose the
    account is follows its report (`visibility`), and an account with none would be
    everyone's. Any newer snapshot's state still applies over it."""
    insert_new(
        AccountReport,
        (
            _report_of(snapshot, account, run, now, connection_row, connection_name)
            for account in snapshot.accounts
        ),
        _UNIQUE,
    )


def _history_accounts(account_ids: Sequence[str]) -> dict[str, Any]:
    """id -> pk of accounts whose history only is written: inserted where missing (ON
    CONFLICT DO NOTHING), a stored one left as it is (no `last_synced_at`: its state was
    not synced)."""
    Account = conf.account_model()
    accounts = dict(
        Account.objects.filter(broker=BROKER, external_id__in=account_ids).values_list(
            "external_id", "pk"
        )
    )
    created = insert_missing(
        Account,
        (
            {"broker": BROKER, "external_id": a, "is_paper": is_paper_account(a)}
            for a in sorted(account_ids)
            if a not in accounts
        ),
        _UNIQUE,
    )
    accounts.update((external_id, pk) for (_, external_id), pk in created.items())
    return accounts


def _apply_snapshots(
    rows: list[tuple[Any, dt.datetime, dict[str, Any], bool]], run: SyncRun
) -> dict[str, int]:
    """Store account snapshots, one per (account, taken_at): rows of (account pk, moment,
    fields, whole). A moment stored already is not stored again. A whole snapshot (a
    sync's values as of its moment, every figure and rate) replaces what is stored at its
    moment where it differs; a day's values read again (an overlapping statement, a
    re-run) correct the stored row where IBKR changed them since (`_corrected_day`: only
    the figures that differ, none the day does not carry), and an equal day writes
    nothing. A row changed names the run that changed it (`sync_run_id`), as the ledger's
    corrections are counted in the run. Decided on the rows read under the accounts' row
    locks (FOR UPDATE, in pk order), so two writers of one account take turns. Returns
    the counts: created, updated (corrected), unchanged."""
    Snapshot = conf.account_snapshot_model()
    wanted: dict[tuple[Any, dt.datetime], tuple[dict[str, Any], bool]] = {}
    for account_pk, moment, fields, whole in rows:
        if whole or (account_pk, moment) not in wanted:
            wanted[account_pk, moment] = (fields, whole)
    pks = sorted({account_pk for account_pk, _ in wanted}, key=str)
    Account = conf.account_model()
    list(Account.objects.select_for_update().filter(pk__in=pks).order_by("pk").values_list("pk"))
    names = list(next(iter(wanted.values()))[0])
    stored: dict[tuple[Any, dt.datetime], tuple[Any, ...]] = {}
    moments = sorted({moment for _, moment in wanted})
    for chunk in chunks(moments):
        for pk, account_pk, taken_at, *values in Snapshot.objects.filter(
            account_id__in=pks, taken_at__in=chunk
        ).values_list("pk", "account_id", "taken_at", *names):
            stored.setdefault((account_pk, taken_at), (pk, *values))
    counts = dict.fromkeys(LEDGER_COUNTS, 0)
    new, changed = [], []
    for (account_pk, moment), (fields, whole) in wanted.items():
        held = stored.get((account_pk, moment))
        if held is None:
            new.append(
                {"account_id": account_pk, "sync_run_id": run.pk, "taken_at": moment, **fields}
            )
        elif whole and _differs(held[1:], [fields[name] for name in names]):
            changed.append((held[0], fields))
        elif not whole and (corrected := _corrected_day(names, held[1:], fields)):
            changed.append((held[0], corrected))
        else:
            counts["unchanged"] += 1
    insert_rows(Snapshot, new)
    counts["created"] = len(new)
    for pk, fields in changed:
        Snapshot.objects.filter(pk=pk).update(sync_run_id=run.pk, **fields)
    counts["updated"] = len(changed)
    return counts


def _corrected_day(
    names: Sequence[str], stored: Sequence[Any], fields: dict[str, Any]
) -> dict[str, Any]:
    """The fields of a stored snapshot that a day's values read again correct: each
    figure the day carries (a value, not None) that differs from the stored one, and its
    rates merged into the stored ones where one differs or is new. What the day does not
    carry is kept (the period end's row is a whole snapshot: its other figures, its rates
    read with the cash). Empty: the day is as stored."""
    corrected: dict[str, Any] = {}
    for name, held in zip(names, stored, strict=True):
        value = fields[name]
        if name == "exchange_rates":
            merged = {**(held or {}), **(value or {})}
            if merged != (held or {}):
                corrected[name] = merged
        elif value is not None and value != "" and _differs([held], [value]):
            corrected[name] = value
    return corrected


#: What a ledger write counts of each kind.
LEDGER_COUNTS = ("created", "updated", "unchanged")


def _apply_ledger(
    snapshot: MappedSnapshot,
    now: dt.datetime,
    accounts: dict[str, Any],
    history: Sequence[str],
    written: Written,
    run: SyncRun,
    connection_name: str,
) -> None:
    """Store the ledger rows (`snapshot.ledger_batches()`: the ledger mapped before the
    write, or a stream's batches, each mapped as it comes), keyed on the broker's ids: a
    row not stored yet is inserted (ON CONFLICT (broker, external_id) DO NOTHING), a
    stored one that differs (the broker corrected it, cancelled it) is updated, an equal
    one is left alone; none is deleted, and none changes account (`_apply_ledger_batch`:
    a row whose id is stored under another account is not written, and is an error of
    the account it was reported for). A fixed number of statements per batch of rows,
    batch after batch in the order of the ids within a part of the ledger (so two
    writers wait for each other's rows in one order): the batch's stored rows read by
    their ids as plain tuples, its new ones inserted, its changed ones upserted; only
    one batch's stored rows are held at a time. The instruments the rows name are
    inserted where missing (a position's sync keeps them current). `history`: the
    accounts whose history only is written, given their rows (`_history_accounts`) once
    the ledger has any row. Counts into `written`: the ledger's tallies, its errors (of
    the accounts applied: a refused account's are not reported; but a row not written
    because its id is another account's is said for every account whose history is
    written), its days (of the rows written or found as stored)."""
    models_by_kind = conf.ledger_models()
    counts = written.ledger = {kind: dict.fromkeys(LEDGER_COUNTS, 0) for kind in snapshot.ledger}
    errors: dict[str, list[RecordError]] = {kind: [] for kind in counts}
    elsewhere: list[RecordError] = []
    instruments: dict[str, Any] = {}
    days = written.ledger_days
    for part in snapshot.ledger_batches():
        for kind, kind_errors in part.errors.items():
            errors.setdefault(kind, []).extend(kind_errors)
        if not any(part.rows.values()):
            continue
        if history:
            accounts = {**accounts, **_history_accounts(history)}
            history = ()
        instruments.update(_ledger_instruments(part, now, instruments))
        for kind, rows in part.rows.items():
            model = models_by_kind[kind]
            fields = LEDGER_FIELDS[kind]
            refused: dict[str, Any] = {}
            for chunk in chunks(sorted(rows), LEDGER_BATCH):
                refused.update(
                    _apply_ledger_batch(
                        model, fields, chunk, rows, accounts, instruments, counts[kind]
                    )
                )
            if refused:
                elsewhere += [
                    ledger_row_error(kind, rows[key], part.instruments, _ELSEWHERE)
                    for key in sorted(refused)
                ]
                _log_ledger_elsewhere(kind, rows, refused, run, connection_name)
            date = LEDGER_DATES[kind]
            for row in rows.values():
                if row.external_id in refused:
                    continue
                # An undated row (a query without its date) counts too: [] while none is
                # dated.
                kept = days.setdefault(row.account_id, {}).setdefault(kind, [])
                day = row.fields.get(date)
                if day is not None:
                    kept[:] = [min(kept[0], day), max(kept[1], day)] if kept else [day, day]
    # As `MappedSnapshot.without` leaves out the errors of the accounts not applied.
    left_out = set(snapshot.accounts) - set(written.accounts)
    for kind_errors in errors.values():
        for error in kind_errors:
            if error.account not in left_out:
                written.errors.append(error)
                written.add(error.account, "errors")
    for error in elsewhere:
        written.errors.append(error)
        written.add(error.account, "errors")


#: Why a ledger row was not written whose id is stored under another account (whose, the
#: server log says: `_log_ledger_elsewhere`).
_ELSEWHERE = (
    "not written: a row of this id is stored under another account, and a stored row "
    "never changes account"
)


def _log_ledger_elsewhere(
    kind: str,
    rows: Mapping[str, MappedLedgerRow],
    refused: Mapping[str, Any],
    run: SyncRun,
    connection_name: str,
) -> None:
    """For an operator reading the server log (at WARNING, as an account refused for
    another owner: a statement reporting another account's ids is either a login given to
    the wrong user or someone trying ids): the rows of a kind not written because their
    ids are stored under another account, with that account, the first few by id."""
    Account = conf.account_model()
    shown = sorted(refused)[:_LOGGED]
    stored = dict(
        Account.objects.filter(pk__in={refused[key] for key in shown}).values_list(
            "pk", "external_id"
        )
    )
    logger.warning(
        "Sync #%s of connection %s did not write %d %s whose ids are stored under another "
        "account: %s%s.",
        run.pk,
        connection_name or "(the settings' gateway)",
        len(refused),
        kind,
        ", ".join(
            f"{key} (reported for {rows[key].account_id}, stored under "
            f"{stored.get(refused[key], 'an account since removed')})"
            for key in shown
        ),
        "" if len(refused) <= len(shown) else ", ...",
    )


#: How many rows of a kind `_log_ledger_elsewhere` names.
_LOGGED = 10

#: A ledger kind's rows per batch (`_apply_ledger_batch`): its stored rows read by their
#: ids in one query, its new ones inserted in one step (on PostgreSQL COPYed, then one
#: INSERT: `bulk.insert_new`). The ids of one query stay far below SQLite's limit of
#: bound parameters.
LEDGER_BATCH = 5_000


def _apply_ledger_batch(
    model: type[Any],
    fields: tuple[str, ...],
    chunk: Sequence[str],
    rows: dict[str, Any],
    accounts: dict[str, Any],
    instruments: dict[str, Any],
    tally: dict[str, int],
) -> dict[str, Any]:
    """One batch of a ledger kind's rows (their external ids `chunk`, in order). Returns
    the rows not written because their id is stored under another account than the one
    they are reported for, each with that account's pk.

    A stored row keeps its account: the broker's id is unique to one transaction of one
    account, so the same id reported for another account is no correction of the row,
    and a statement proves no login (a connection pointed at a fake Flex service reports
    any ids it likes, for accounts of its own). Moving the row would hand another
    account's transaction, and whoever owns it, to this statement's account. So the
    stored rows are compared and upserted only under their own account, none is moved
    (the upsert does not set the account), and a row inserted by another sync since this
    one read the batch is checked the same way. A legitimate statement never meets the
    rule: the rows it sends twice (overlapping statements) are of one account, and an id
    that several different rows carry (redacted) keys them on their attributes, their
    account among them (`sources.flex.source.keyed`)."""
    stored: dict[str, tuple[Any, ...]] = {}
    for external_id, *values in model._default_manager.filter(
        broker=BROKER, external_id__in=chunk
    ).values_list("external_id", "account_id", "instrument_id", *fields):
        stored[external_id] = tuple(values)
    new, changed = [], []
    elsewhere: dict[str, Any] = {}
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
        elif held[0] != values["account_id"]:
            elsewhere[external_id] = held[0]
        elif _differs(held[1:], [values["instrument_id"], *map(row.fields.get, fields)]):
            changed.append(model(broker=BROKER, external_id=external_id, **values))
        else:
            tally["unchanged"] += 1
    inserted = insert_new(model, new, _UNIQUE)
    tally["created"] += len(inserted)
    if len(inserted) < len(new):  # inserted by another sync since: of which account?
        mine = {row["external_id"]: row["account_id"] for row in new}
        done = {key for _, key in inserted}
        taken = [key for key in mine if key not in done]
        for external_id, account_pk in model._default_manager.filter(
            broker=BROKER, external_id__in=taken
        ).values_list("external_id", "account_id"):
            if account_pk != mine[external_id]:
                elsewhere[external_id] = account_pk
        tally["unchanged"] += len(taken) - len(elsewhere.keys() & set(taken))
    upsert(
        model,
        changed,  # in the order of their ids, as the batch is
        batch_size=bulk.BATCH_SIZE // 4,
        unique_fields=list(_UNIQUE),
        update_fields=["instrument", *fields],
    )
    tally["updated"] += len(changed)
    return elsewhere


def _ledger_instruments(
    part: MappedLedger, now: dt.datetime, known: dict[str, Any]
) -> dict[str, Any]:
    """conId text -> the pk of every instrument a part of the ledger's rows name that is
    not `known` (found by an earlier part), inserted where missing (ON CONFLICT DO
    NOTHING, in conId order); a stored one is left as it is."""
    wanted = {
        row.instrument_id
        for rows in part.rows.values()
        for row in rows.values()
        if row.instrument_id is not None and row.instrument_id not in known
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
                **part.instruments[conid],
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
) -> list[tuple[Any, dt.datetime, dict[str, Any], bool]]:
    """Store the values of every account whose values were read. A fixed number of
    statements per batch of rows, whatever the number of accounts. Returns each
    account's snapshot row, for `_apply_snapshots`."""
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
    # Each account's snapshot as of its values' moment, whole (`_apply_snapshots`).
    return [
        (accounts[item.account_id], as_of[item.account_id], item.snapshot, True) for item in read
    ]


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
) -> tuple[dict[str, str], list[str]]:
    """Lock each reported account's `AccountReport` for this transaction; refuse the
    accounts whose stored report is newer than this snapshot's moment for them, or that
    another owner than this connection's holds (`_held_by`: its connection's owner, or
    the one recorded once that connection was removed), returned with the reason, and
    those of them another owner holds (nothing of them is written, their history
    neither); record this snapshot, and this connection's owner, as the newest of the
    others.

    An equal moment is not older: a snapshot may be applied again. The reports are
    inserted where missing (ON CONFLICT DO NOTHING: a report another sync is inserting
    makes this one wait for its commit), then locked FOR UPDATE, both in the order of
    the account ids: two syncs that report the same account take turns, and the later
    decides on what the earlier committed. (SQLite: a sync's write transaction is the
    only one at a time already, IMMEDIATE; FOR UPDATE is not needed there.)"""
    if not snapshot.accounts:
        return {}, []
    digests = snapshot.digests
    reports = {
        account: _report_of(
            snapshot, account, run, now, connection_row, connection_name, digests.get(account, "")
        )
        for account in snapshot.accounts
    }
    insert_new(AccountReport, reports.values(), _UNIQUE)
    stored = (
        AccountReport.objects.select_for_update(of=("self",))
        .filter(broker=BROKER, external_id__in=snapshot.accounts)
        .order_by("external_id")
        .values_list(
            "external_id", "as_of", "connection_name", "sync_run_id", "positions_digest",
            *_HOLDER,
        )
    )  # fmt: skip
    owner = _owner_of(connection_row)["owner_id"]
    refused: dict[str, str] = {}
    foreign: list[str] = []
    applied = []
    stale = []
    for account, stored_as_of, by, run_pk, stored_digest, *holder in stored:
        owned, holder_pk = _held_by(*holder)
        this = reports[account]["as_of"]
        reason = _refused(
            account, (stored_as_of, by, owned, holder_pk), this, owner, connection_name
        )
        if reason is not None:
            refused[account] = reason
            if _owned_by_another(owned, holder_pk, owner):
                foreign.append(account)
                _log_owned_refusal(account, run, connection_name, owner, holder_pk, by)
            continue
        if account in snapshot.unchanged and (
            run_pk == run.pk or stored_digest != digests[account]
        ):
            stale.append(account)  # written by another sync since its digest was read
        elif run_pk != run.pk:  # this sync's own report (inserted just now) is in place
            applied.append(AccountReport(**reports[account]))
    if stale:
        raise PositionsChanged(stale)
    upsert(
        AccountReport,
        applied,
        batch_size=bulk.BATCH_SIZE,
        unique_fields=list(_UNIQUE),
        update_fields=[
            "connection",
            "connection_name",
            "owner",
            "owned",
            "source",
            "as_of",
            "sync_run",
            "applied_at",
            "positions_digest",
        ],
    )
    return refused, foreign


def _report_of(
    snapshot: MappedSnapshot,
    account: str,
    run: SyncRun,
    now: dt.datetime,
    connection_row: Connection | None,
    connection_name: str,
    digest: str = "",
) -> dict[str, Any]:
    """The report of `account` that `snapshot`, applied by `connection_row` (named
    `connection_name`) as `run` at `now`, records: its moment for the account
    (`_reported_moment`), the connection and its owner, the positions' `digest`."""
    return {
        "broker": BROKER,
        "external_id": account,
        "as_of": _reported_moment(snapshot, account, now),
        "connection_id": None if connection_row is None else connection_row.pk,
        "connection_name": connection_name,
        **_owner_of(connection_row),
        "source": snapshot.source,
        "sync_run_id": run.pk,
        "applied_at": now,
        "positions_digest": digest,
    }


def _owner_of(connection_row: Connection | None) -> dict[str, Any]:
    """The owner a report applied by `connection_row` records (`AccountReport.owner`):
    its owner, if any; none for an unowned connection or the settings' gateway."""
    owner = None if connection_row is None else connection_row.owner_id
    return {"owner_id": owner, "owned": owner is not None}


#: The columns of a stored report that tell whose its account is (`_held_by`'s arguments).
_HOLDER = ("connection_id", "connection__owner_id", "owner_id", "owned")


def _held_by(
    connection_id: Any, connection_owner: Any, owner: Any, owned: bool
) -> tuple[bool, Any]:
    """Whether a stored report's account is owned, and by whom (a user's pk; None: by a
    user since deleted, or not known). While its connection exists, that connection's
    owner decides: a user who sees every connection moves an account by giving its
    connection to another owner, however that is saved. Once the connection is removed,
    the owner the report recorded (`AccountReport.owner`, `owned`): the account keeps
    it, and no other owner's connection takes it (with its history) by reporting its id."""
    if connection_id is not None:
        return connection_owner is not None, connection_owner
    return owned, owner


def _owned_by_another(owned: bool, holder: Any, owner: Any) -> bool:
    """Whether an account held so (`_held_by`) is another owner's than `owner`'s (a
    user's pk; None: an unowned connection or the settings' gateway): owned, and not by
    `owner` (an owner since deleted is nobody's to write as)."""
    return owned and (holder is None or holder != owner)


def _refused(
    account: str,
    stored: tuple[dt.datetime, str, bool, Any],
    this: dt.datetime,
    owner: Any,
    connection_name: str,
) -> str | None:
    """Why a snapshot of `account` as of `this`, reported by a connection of `owner`
    named `connection_name`, is refused over its stored report (`stored`: its moment,
    its connection's name, and whether and by whom the account is held, `_held_by`),
    None when it is not: the one rule `_claim_accounts` writes by and `refusals` tells
    again."""
    stored_as_of, by, owned, holder = stored
    if _owned_by_another(owned, holder, owner):
        return _owned_refusal(account)
    if stored_as_of > this:
        return _refusal(account, stored_as_of, by, this, connection_name)
    return None


def refusals(
    moments: Mapping[str, dt.datetime], connection_row: Connection | None, connection_name: str
) -> dict[str, str] | None:
    """Whether a snapshot of the accounts `moments` (account -> its moment for it, as
    `_reported_moment` took it) reported by `connection_row` named `connection_name` is
    refused for every one of them by the reports stored now, and why (in the order of
    the account ids, as `_claim_accounts` says them); None when one would be applied (its
    report gone, or no longer newer, or its owner's now). Read outside the write: a
    statement applied again whose refused accounts are refused again is not read again
    (`services._applied_statement`)."""
    owner = None if connection_row is None else connection_row.owner_id
    stored = (
        AccountReport.objects.filter(broker=BROKER, external_id__in=list(moments))
        .order_by("external_id")
        .values_list(
            "external_id", "as_of", "connection_name",
            *_HOLDER,
        )
    )  # fmt: skip
    reasons = {}
    for account, as_of, by, *holder in stored:
        report = (as_of, by, *_held_by(*holder))
        reason = _refused(account, report, moments[account], owner, connection_name)
        if reason is None:
            return None
        reasons[account] = reason
    return reasons if len(reasons) == len(moments) else None


def owned_refusals(accounts: Iterable[str], connection_row: Connection | None) -> dict[str, str]:
    """The accounts of `accounts` that another owner than `connection_row`'s holds by the
    reports stored now (`_held_by`, `_owned_by_another`), in the order of their ids, each
    with the reason `_claim_accounts` and `_claim_history` give: a snapshot of them
    reported by `connection_row` writes nothing of them, their history neither. Read
    outside the write, for `services._applied_statement`: a statement applied again is
    not read again while these are the accounts it was refused so for."""
    owner = None if connection_row is None else connection_row.owner_id
    stored = (
        AccountReport.objects.filter(broker=BROKER, external_id__in=list(accounts))
        .order_by("external_id")
        .values_list("external_id", *_HOLDER)
    )
    return {
        account: _owned_refusal(account)
        for account, *holder in stored
        if _owned_by_another(*_held_by(*holder), owner)
    }


def _reported_moment(snapshot: MappedSnapshot, account: str, now: dt.datetime) -> dt.datetime:
    """The moment that orders an account's reports: the oldest part of what this snapshot
    writes of it. A source reads the positions first and each account's values after (a
    TWS read: seconds or minutes later), so positions are as old as the positions' moment
    even when the values describe a later one; ordering by the values' moment would let
    older positions overwrite a newer report of them, and refuse newer ones."""
    positions = snapshot.as_of or now
    values = snapshot.values_as_of.get(account)
    return positions if values is None else min(positions, values)


def _owned_refusal(account: str) -> str:
    """Why an account another owner holds was refused, as the run says it to whoever may
    see it. A gateway proves no login (any server speaking its protocol, at the address a
    connection is given, reports whatever account ids it likes), so an owned account is
    written only by its owner's connections: never taken over, nor made everyone's by an
    unowned one.

    The same words for every account a connection may not write, whoever holds it: the
    run is its syncing user's to read, and "another owner holds it" would tell someone
    trying account ids that one exists and is someone's. Whose it is goes to the server
    log only (`_log_owned_refusal`), for the operator."""
    return _not_written(account, "this connection may not write it.")


def _log_owned_refusal(
    account: str, run: SyncRun, connection_name: str, owner: Any, held_by: Any, by: str
) -> None:
    """The details of an ownership refusal, for an operator reading the server log (at
    WARNING: a connection reporting an account another owner holds is either a login
    given to the wrong user or someone trying account ids)."""
    logger.warning(
        "Sync #%s of connection %s (owner: %s) did not write account %s: it is held by %s "
        "(last reported by %s).",
        run.pk,
        connection_name or "(the settings' gateway)",
        "none" if owner is None else f"user #{owner}",
        account,
        "a user since deleted, or not known" if held_by is None else f"user #{held_by}",
        by or "the settings' gateway",
    )


def _refusal(account: str, newer: dt.datetime, by: str, this: dt.datetime, mine: str) -> str:
    """Why an account was refused, for whoever reads the run (who may see this sync's
    connection, `mine`, not another's): that a newer report stands, and when."""
    if not by:
        source = "the settings' gateway"
    elif by == mine:
        source = "this connection"
    else:  # another connection's name is its owner's to see, not this run's readers'
        source = "another connection"
    return _not_written(
        account,
        f"{source} reported it as of {_moment(newer)}, after this snapshot "
        f"({_moment(this)}); that newer report stands.",
    )


def _not_written(account: str, why: str) -> str:
    """A refusal's reason, as the run records it: a sentence that names its account."""
    return f"{account} was not written: {why}"


def refusal_why(account: str, reason: str) -> str:
    """A refusal's reason without the account it names, for a line that names it already
    (`sync_ibkr`'s "Not written: <account>: ..."); a reason recorded otherwise, whole."""
    return reason.removeprefix(_not_written(account, ""))


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


def touch_accounts(account_ids: Sequence[str], now: dt.datetime) -> None:
    """Stamp stored accounts as synced at `now` (a read found them as they are)."""
    Account = conf.account_model()
    Account.objects.filter(broker=BROKER, external_id__in=list(account_ids)).update(
        **touched(Account, last_synced_at=now)
    )


def _upsert_instruments(
    items: Iterable[MappedPosition], now: dt.datetime, owner: Any = None
) -> tuple[dict[str, Any], set[str], bool]:
    """Create or update the instruments of the mapped positions; return conId -> pk, the
    conIds of those another sync inserted meanwhile (taken as it wrote them), and whether
    it wrote any (created or changed).

    A stored instrument that rows of another owner's accounts name (`owner`: the syncing
    connection's; `visibility.named_by_another_owner`) is left as it is: a gateway proves
    no login, and what one reports of a contract must not change how another owner's
    positions read (their symbol, currency, multiplier).

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
    kept: set[str] = set()
    for chunk in chunks([row.external_id for row in changed]):
        kept.update(
            visibility.named_by_another_owner(
                Instrument.objects.filter(broker=BROKER, external_id__in=chunk), owner
            ).values_list("external_id", flat=True)
        )
    changed = [row for row in changed if row.external_id not in kept]
    # Upserts on (broker, external_id), as for positions: cheaper than bulk_update.
    upsert(
        Instrument,
        sorted(changed, key=lambda instrument: instrument.external_id),
        batch_size=bulk.BATCH_SIZE // 4,
        unique_fields=list(_UNIQUE),
        update_fields=[*INSTRUMENT_FIELDS, "updated_at"],
    )
    taken: set[tuple[Any, ...]] = set()
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
        taken=taken,
    )
    ids.update((conid, pk) for (_, conid), pk in created.items())
    return ids, {conid for _, conid in taken}, bool(changed or created)


#: The unique key of an account and of an instrument.
_UNIQUE = ("broker", "external_id")
