"""What the portfolio held at a past moment, rebuilt from the sync's change log.

A sync records each change it makes to a position (`ibkr_sync.models.PositionChange`:
created, updated, reopened, closed, with the quantity and average cost before and
after) in its own transaction, so a change takes effect when its sync committed: at the
`finished_at` of its successful `SyncRun`. The answer is what the database held at that
moment, as the syncs had recorded it, not what IBKR would have reported in between.

For a position at a moment T:

1. Its last change at or before T says it: held with that change's quantity and average
   cost unless the change closed it. Changes of syncs that finished at the same time
   are taken in the order of the syncs (their ids), then of the changes.
2. Without a change at or before T, the position is older than its first change (or
   has none). The log begins with the first sync that recorded a change (`log_start`);
   from then on every change is in it. So at a T from then on, such a position was
   held as its next change found it (quantity and cost before an update or a close;
   not held before it was created or reopened), or, if it never changed, as it is now
   (if it was opened by T and not closed by T).
3. At a T before the log begins, a position older than the log cannot be told: it is
   not listed, and the answer says it is incomplete.

The whole question is one query per page (the changes are correlated subqueries of the
positions' query), plus one for when the log begins and, before it, one for whether
any position is older than the log: a fixed number whatever the number of positions.
"""

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal

from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery

from ibkr_sync.decimals import exact_sum, product
from ibkr_sync.models import DECIMAL_QUANTUM, PositionChange, SyncRun

Kind = PositionChange.Kind
HELD_AFTER = (Kind.CREATED, Kind.UPDATED, Kind.REOPENED)  # the position is open after it
HELD_BEFORE = (Kind.UPDATED, Kind.CLOSED)  # ... and before it
_WIDE = Context(prec=100)  # a product of two columns rounded to the column's places


def _changes() -> QuerySet:
    """The changes of the outer query's position that took effect: their sync committed."""
    return PositionChange.objects.filter(
        position=OuterRef("pk"),
        sync_run__status=SyncRun.Status.SUCCESS,
        sync_run__finished_at__isnull=False,
    )


def log_start() -> dt.datetime | None:
    """When the change log begins: the finish of the first successful sync that recorded
    a change; None while no sync has."""
    recorded = PositionChange.objects.filter(sync_run=OuterRef("pk"))
    return (
        SyncRun.objects.filter(status=SyncRun.Status.SUCCESS, finished_at__isnull=False)
        .filter(Exists(recorded))
        .order_by("finished_at")
        .values_list("finished_at", flat=True)
        .first()
    )


def is_complete(positions: QuerySet, when: dt.datetime, start: dt.datetime | None) -> bool:
    """Whether the log tells the state at `when` of every position of `positions`: from
    the moment it begins, yes; before, only if none of them is older than it."""
    if start is not None and when >= start:
        return True
    created = PositionChange.objects.filter(position=OuterRef("pk"), kind=Kind.CREATED)
    return not positions.filter(~Exists(created)).exists()


def held_at(positions: QuerySet, when: dt.datetime, start: dt.datetime | None) -> QuerySet:
    """The positions of `positions` held at `when`, each annotated with what `holding()`
    reads (its last change at or before `when` and its next one after)."""
    last = _changes().filter(sync_run__finished_at__lte=when)
    last = last.order_by("-sync_run__finished_at", "-sync_run_id", "-id")
    following = _changes().filter(sync_run__finished_at__gt=when)
    following = following.order_by("sync_run__finished_at", "sync_run_id", "id")
    positions = positions.annotate(
        last_kind=Subquery(last.values("kind")[:1]),
        last_quantity=Subquery(last.values("quantity_after")[:1]),
        last_average_cost=Subquery(last.values("average_cost_after")[:1]),
        last_at=Subquery(last.values("sync_run__finished_at")[:1]),
        last_before=Subquery(last.values("quantity_before")[:1]),
        # The change before it (the second of the same order): the story's beginning.
        previous_at=Subquery(last.values("sync_run__finished_at")[1:2]),
        # The last day of the statements the two applied (a Flex sync's period), if any.
        last_statement_day=Subquery(last.values("sync_run__period_to")[:1]),
        previous_statement_day=Subquery(last.values("sync_run__period_to")[1:2]),
        next_kind=Subquery(following.values("kind")[:1]),
        next_quantity=Subquery(following.values("quantity_before")[:1]),
        next_average_cost=Subquery(following.values("average_cost_before")[:1]),
    )
    held = Q(last_kind__in=HELD_AFTER)
    if start is not None and when >= start:
        unchanged = Q(next_kind__isnull=True, opened_at__lte=when) & (
            Q(closed_at__isnull=True) | Q(closed_at__gt=when)
        )
        held |= Q(last_kind__isnull=True) & (Q(next_kind__in=HELD_BEFORE) | unchanged)
    return positions.filter(held)


@dataclass(frozen=True)
class Change:
    """The recorded change that set a holding's state: the sync's `kind`, the quantity
    before and after it (None: not held), when it took effect (`at`), and when the
    position's previous change did (`after`; None for its first change). A change of a
    sync that applied a statement (a Flex sync) says what held at the end of the
    statement's last day (`statement_day`), before its sync ran; `previous_statement_day`
    is the previous change's, if it applied one."""

    kind: str
    quantity_before: Decimal | None
    quantity_after: Decimal | None
    at: dt.datetime
    after: dt.datetime | None
    statement_day: dt.date | None = None
    previous_statement_day: dt.date | None = None

    @property
    def quantity_changed(self) -> Decimal:
        """quantity_after - quantity_before, a quantity not held counting as zero; every
        digit kept (`copy_negate` rounds nothing, as `-` would)."""
        before = (self.quantity_before or Decimal(0)).copy_negate()
        return exact_sum((self.quantity_after or Decimal(0), before))


@dataclass(frozen=True)
class Holding:
    quantity: Decimal
    average_cost: Decimal | None
    cost_basis: Decimal | None
    since: dt.datetime | None  # when this state took effect, if the log says
    change: Change | None = None  # the change that set it, with `since`


def holding(position) -> Holding:
    """What a position of `held_at()` held then."""
    if position.last_kind is not None:
        quantity, cost, since = position.last_quantity, position.last_average_cost, position.last_at
        change = Change(
            position.last_kind,
            position.last_before,
            quantity,
            since,
            position.previous_at,
            position.last_statement_day,
            position.previous_statement_day,
        )
        return Holding(quantity, cost, cost_basis(quantity, cost), since, change)
    if position.next_kind is not None:
        quantity, cost, since = position.next_quantity, position.next_average_cost, None
    else:  # never changed: as it is now
        return Holding(position.quantity, position.average_cost, position.cost_basis, None)
    return Holding(quantity, cost, cost_basis(quantity, cost), since)


def cost_basis(quantity: Decimal, average_cost: Decimal | None) -> Decimal | None:
    """quantity x average cost, to the column's 10 places as a sync stores it."""
    if average_cost is None:
        return None
    return product(quantity, average_cost).quantize(
        DECIMAL_QUANTUM, rounding=ROUND_HALF_EVEN, context=_WIDE
    )
