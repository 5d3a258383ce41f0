"""What the ledger says of a change the read API shows: the trades between a position's
changes (`GET /portfolio/positions?as_of=`), and an account's cash transactions between
two points of its history (`GET /portfolio/accounts/<external_id>/history`).

When a ledger row happened. A trade with its execution's moment (`traded_at`) happened
then. A row with only a date (a trade without `traded_at`, every cash transaction)
happened at the end of that day, 23:59:59 in US Eastern time: IBKR's statements date
their rows in that zone, and a Flex statement's day ends then (its `as_of`, and the
moment of that day's net asset value in an account's history). So a day's rows count
for a moment from the end of that day on, never earlier; a change or a point taken
during the day (a gateway's read) is explained by that day's date-only rows only at the
next one after the day ends. A row with neither is left out: it cannot be placed.

A change's trades: the ledger's trades of the position's account and instrument (the
same instrument row, matched on its foreign key, as a sync maps a trade's contract id to
it), not cancelled (IBKR's own cancellation rows count: `COUNTED`), that happened after
the position's previous change was read (ever before, for its first change) and at or
before this one was; oldest first (then by id). A change was read when its sync read the
positions (`read_moments`): a gateway's as its sync finished (when it took effect); a
Flex sync's at its statement's end, 23:59:59 US Eastern of the statement's last day,
the day before the sync ran (a purchase on the day of an evening sync is in the next
day's statement, and explains the next change). `explained`: their quantities add up
(exact decimals) to the change's quantity after minus before (a quantity not held
counting as zero). A cash flow of a point: the account's cash transactions after the
account's previous point and at or before this one, summed per kind and currency.

Each is one query for a page whatever its length (and one more for the point before a
history page; a page's trades read in chunks and gone through as they come, so that a
ledger of 100,000s of trades of one instrument is never held whole), run only when
the user may view that kind of ledger row (`ibkr_sync.permissions`), over the rows they
may see (`ibkr_sync.visibility`).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db.models import Q

from .. import conf, permissions, visibility
from ..decimals import exact_sum, running_sum
from .holdings import Change

#: The zone of IBKR's statements, whose dates the ledger's date-only rows are.
STATEMENT_ZONE = ZoneInfo("America/New_York")
#: A statement day's last moment (as a Flex statement's `as_of`).
END_OF_DAY = dt.time(23, 59, 59)
#: The most trades listed with one change: a page stays bounded, whatever the ledger.
TRADES_PER_CHANGE = 50


#: The trades that count: those not cancelled, and IBKR's cancellations. IBKR cancels an
#: execution with a row of its own (notes `Ca`, its own transaction id, the original's
#: side with the quantity reversed: `BUY (Ca.)`, -10), leaving the original as it was:
#: the two add up to nothing. A row marked cancelled whose quantity has its side's sign
#: is a cancelled execution itself (IBKR corrected the row): it does not count.
COUNTED = (
    Q(cancelled=False)
    | Q(cancelled=True, buy_sell="BUY", quantity__lt=0)
    | Q(cancelled=True, buy_sell="SELL", quantity__gt=0)
)


def day_end(day: dt.date) -> dt.datetime:
    """When a row dated `day` happened, for the read API: that day's end, US Eastern."""
    return dt.datetime.combine(day, END_OF_DAY, tzinfo=STATEMENT_ZONE)


def first_day_after(moment: dt.datetime) -> dt.date:
    """The first day whose end is after `moment`."""
    day = moment.astimezone(STATEMENT_ZONE).date()
    return day if day_end(day) > moment else day + dt.timedelta(days=1)


def last_day_by(moment: dt.datetime) -> dt.date:
    """The last day whose end is at or before `moment`."""
    day = moment.astimezone(STATEMENT_ZONE).date()
    return day if day_end(day) <= moment else day - dt.timedelta(days=1)


def read_moments(change: Change) -> tuple[dt.datetime | None, dt.datetime]:
    """The moments a change's state, and its previous change's, were read: the end of
    the statement's last day for a sync that applied one (a Flex statement's `as_of`),
    else when the change took effect (a gateway's read, as its sync finished)."""
    if change.after is None:
        start = None
    elif change.previous_statement_day is not None:
        start = day_end(change.previous_statement_day)
    else:
        start = change.after
    end = change.at if change.statement_day is None else day_end(change.statement_day)
    return start, end


def trade_moment(traded_at: dt.datetime | None, trade_date: dt.date | None) -> dt.datetime | None:
    """When a trade happened: its execution's moment, else its day's end (None: neither)."""
    if traded_at is not None:
        return traded_at
    return None if trade_date is None else day_end(trade_date)


def _between(day: str, after: dt.datetime | None, until: dt.datetime, moment: str = "") -> Q:
    """Rows that happened after `after` (None: ever before) and at or before `until`: by
    their `moment` field where they have one and it is set, else by their `day` field."""
    dated = Q(**{f"{day}__lte": last_day_by(until)})
    if after is not None:
        dated &= Q(**{f"{day}__gte": first_day_after(after)})
    if not moment:
        return dated
    timed = Q(**{f"{moment}__isnull": False, f"{moment}__lte": until})
    if after is not None:
        timed &= Q(**{f"{moment}__gt": after})
    return timed | (Q(**{f"{moment}__isnull": True}) & dated)


# --- a position's change and its trades ---------------------------------------------------


@dataclass
class ChangeStory:
    """A change, with the trades that explain it: None while the user may not view
    trades (or the project keeps none), and then `explained` is None too."""

    change: Change
    trades: list | None = None
    trades_truncated: bool = False
    explained: bool | None = None


#: The trades' columns a change lists (`ChangeTradeSerializer`), with what places them,
#: after the primary key.
TRADE_FIELDS = (
    "account_id", "instrument_id", "traded_at", "trade_date", "quantity",
    "external_id", "buy_sell", "price", "currency",
)  # fmt: skip
#: The rows read from the database at a time while a page's trades are gone through.
TRADE_CHUNK = 2000


class _Story:
    """A change's trades as they stream by, in any order: the first `TRADES_PER_CHANGE`
    by (moment, id) kept (at most twice as many held at a time), how many there were,
    and their quantities' exact sum (None once one has none: not explained)."""

    def __init__(self, start: dt.datetime | None, end: dt.datetime) -> None:
        self.start, self.end = start, end
        self.kept: list[tuple[dt.datetime, Any, tuple]] = []
        self.count = 0
        self.total: Decimal | None = Decimal(0)

    def add(self, moment: dt.datetime, pk: Any, row: tuple, quantity: Decimal | None) -> None:
        self.count += 1
        if quantity is None:
            self.total = None
        elif self.total is not None:
            self.total = running_sum(self.total, quantity)
        self.kept.append((moment, pk, row))
        if len(self.kept) >= 2 * TRADES_PER_CHANGE:
            self.kept.sort(key=_order)
            del self.kept[TRADES_PER_CHANGE:]

    def first(self) -> list[tuple]:
        return [row for _, _, row in sorted(self.kept, key=_order)[:TRADES_PER_CHANGE]]


def _order(item: tuple) -> tuple:
    return item[0], item[1]


def explain_changes(positions: Sequence, user) -> None:
    """Set `change_story` on each position of a page of `held_at()` whose `holding` has
    a change (None on the others), with its trades: one query for the whole page.

    Its rows are read in chunks as plain values and gone through as they come: a
    change keeps its first `TRADES_PER_CHANGE` trades and a running exact sum of every
    quantity (`decimals.running_sum`: SQLite's SUM is not exact), so a ledger of
    100,000s of trades of one instrument holds a chunk and a page's listed trades in
    memory, never all its rows; a model instance is made for a listed trade only."""
    changed = [p for p in positions if p.holding.change is not None]
    for position in positions:
        position.change_story = None
    if not changed:
        return
    model = conf.trade_model()
    if model is None or not permissions.may_view(user, permissions.Kind.TRADES):
        for position in changed:
            position.change_story = ChangeStory(position.holding.change)
        return
    stories = {
        (p.account_id, p.instrument_id): _Story(*read_moments(p.holding.change)) for p in changed
    }
    starts = [story.start for story in stories.values()]
    earliest = None if None in starts else min(starts)
    latest = max(story.end for story in stories.values())
    trades = model.objects.filter(
        _between("trade_date", earliest, latest, moment="traded_at"),
        COUNTED,
        account_id__in={p.account_id for p in changed},
        instrument_id__in={p.instrument_id for p in changed},
    )
    names = (model._meta.pk.attname, *TRADE_FIELDS)
    rows = visibility.visible(trades, user).order_by().values_list(*names)
    for row in rows.iterator(chunk_size=TRADE_CHUNK):
        pk, account_id, instrument_id, traded_at, trade_date, quantity = row[:6]
        story = stories.get((account_id, instrument_id))
        if story is None:
            continue
        moment = trade_moment(traded_at, trade_date)  # never None: `_between` wants one
        if (story.start is None or moment > story.start) and moment <= story.end:
            story.add(moment, pk, row, quantity)
    # An instance as `.only(*names)` would load it (its fields in the model's order).
    loaded = [f.attname for f in model._meta.concrete_fields if f.attname in names]
    order = [names.index(name) for name in loaded]
    for position in changed:
        change = position.holding.change
        story = stories[position.account_id, position.instrument_id]
        position.change_story = ChangeStory(
            change,
            trades=[
                model.from_db(rows.db, loaded, [row[i] for i in order]) for row in story.first()
            ],
            trades_truncated=story.count > TRADES_PER_CHANGE,
            explained=story.total is not None and story.total == change.quantity_changed,
        )


# --- an account's history and its cash flows ------------------------------------------------


@dataclass
class CashFlow:
    kind: str
    currency: str
    amount: Decimal = Decimal(0)
    count: int = 0


@dataclass
class _Point:
    flows: dict[tuple[str, str], CashFlow] = field(default_factory=dict)

    def add(self, kind: str, currency: str, amount: Decimal) -> None:
        flow = self.flows.setdefault((kind, currency), CashFlow(kind, currency))
        flow.amount = exact_sum((flow.amount, amount))
        flow.count += 1

    def listed(self) -> list[CashFlow]:
        return [self.flows[key] for key in sorted(self.flows)]


def explain_points(snapshots: Sequence, user) -> None:
    """Set `cash_flows` on each snapshot of a page of one account's history (in its
    order: taken_at, then id): the account's cash transactions since the point before
    it (on this page or not), per kind and currency. None for the account's first point
    (nothing before it to explain a change from), and for every point while the user
    may not view cash transactions (or the project keeps none). Two queries: the point
    before the page, and the page's cash transactions."""
    for snapshot in snapshots:
        snapshot.cash_flows = None
    model = conf.cash_transaction_model()
    if not snapshots or model is None:
        return
    if not permissions.may_view(user, permissions.Kind.CASH_TRANSACTIONS):
        return
    first, last = snapshots[0], snapshots[-1]
    before = (
        type(first)
        .objects.filter(account_id=first.account_id)
        .filter(Q(taken_at__lt=first.taken_at) | Q(taken_at=first.taken_at, pk__lt=first.pk))
        .order_by("-taken_at", "-pk")
        .values_list("taken_at", flat=True)
        .first()
    )
    moments = [snapshot.taken_at for snapshot in snapshots]
    points = [_Point() for _ in snapshots]
    rows = model.objects.filter(
        _between("date", before or first.taken_at, last.taken_at),
        account_id=first.account_id,
        amount__isnull=False,
    ).only("id", "kind", "currency", "amount", "date")
    for row in visibility.visible(rows, user):
        # The first point taken at or after the row: the one whose interval holds it.
        points[bisect.bisect_left(moments, day_end(row.date))].add(
            row.kind, row.currency, row.amount
        )
    for n, (snapshot, point) in enumerate(zip(snapshots, points, strict=True)):
        snapshot.cash_flows = None if n == 0 and before is None else point.listed()
