"""Net liquidation over time, per account, from the AccountSnapshot rows: the overview's
history chart, drawn on the server as inline SVG (no script, nothing fetched).

However long the history, two queries read it: the first counts each account's snapshots
in the range; the second returns at most about MAX_POINTS of them per account, picked in
the database: every snapshot when there are few, else the last one of each hour, day,
week or month (the finest period that keeps within MAX_POINTS), as a closing price is.
"""

from __future__ import annotations

import calendar
import datetime as dt
import itertools
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from django.db.models import Case, Count, DateTimeField, F, Max, Min, When, Window
from django.db.models.functions import RowNumber, Trunc
from django.utils import timezone

from . import conf, visibility
from .decimals import grouped, money


@dataclass(frozen=True)
class Range:
    key: str
    label: str
    months: int | None  # None: the whole history
    description: str


RANGES = (
    Range("1m", "1M", 1, "the last month"),
    Range("3m", "3M", 3, "the last 3 months"),
    Range("1y", "1Y", 12, "the last year"),
    Range("all", "All", None, "all history"),
)
DEFAULT_RANGE = "3m"
_BY_KEY = {r.key: r for r in RANGES}

# About one point per two pixels of the plot, at most.
MAX_POINTS = 300
# The periods a history is thinned to (each keeps the last snapshot in it), finest first,
# with their longest length in seconds.
PERIODS = (
    ("hour", 3600),
    ("day", 86400),
    ("week", 7 * 86400),
    ("month", 31 * 86400),
    ("year", 366 * 86400),
)
PERIOD_WORDS = {
    None: "every value",
    "hour": "the last value of each hour",
    "day": "the last value of each day",
    "week": "the last value of each week",
    "month": "the last value of each month",
    "year": "the last value of each year",
}


def chosen_range(key: str | None) -> Range:
    """The range a ?range= parameter names; the default (3M) for anything else."""
    return _BY_KEY.get((key or "").lower(), _BY_KEY[DEFAULT_RANGE])


def months_before(moment: dt.datetime, months: int) -> dt.datetime:
    """The same day and time `months` calendar months earlier (the 31st of a shorter
    month becomes its last day), in the current time zone."""
    local = timezone.localtime(moment)
    year, month0 = divmod(local.year * 12 + local.month - 1 - months, 12)
    day = min(local.day, calendar.monthrange(year, month0 + 1)[1])
    return local.replace(year=year, month=month0 + 1, day=day)


def range_start(history_range: Range, now: dt.datetime | None = None) -> dt.datetime | None:
    if history_range.months is None:
        return None
    return months_before(now or timezone.now(), history_range.months)


def period_for(count: int, first: dt.datetime, last: dt.datetime) -> str | None:
    """None (every snapshot) when there are at most MAX_POINTS, else the finest period of
    which the span holds at most MAX_POINTS."""
    if count <= MAX_POINTS:
        return None
    span = (last - first).total_seconds()
    for period, seconds in PERIODS:
        if span / seconds + 1 <= MAX_POINTS:
            return period
    return PERIODS[-1][0]


@dataclass
class Point:
    taken_at: dt.datetime
    value: Decimal
    currency: str


@dataclass
class History:
    points: list[Point]
    period: str | None  # None: every snapshot in the range
    # Earlier values in another currency than the latest (IBKR's base currency changed):
    # not drawn on the same axis.
    other_currency: int = 0

    @property
    def currency(self) -> str:
        return self.points[-1].currency if self.points else ""


def histories(since: dt.datetime | None, user: Any = None) -> dict[int, History]:
    """Each account's net liquidation since `since` (None: ever), in two queries; with
    `user`, of the accounts that user may see only (`visibility`)."""
    snapshots = conf.account_snapshot_model().objects.filter(net_liquidation__isnull=False)
    if user is not None:
        snapshots = visibility.visible(snapshots, user, "account")
    if since is not None:
        snapshots = snapshots.filter(taken_at__gte=since)
    stats = (
        snapshots.values("account_id")
        .annotate(n=Count("id"), first=Min("taken_at"), last=Max("taken_at"))
        .order_by()
    )
    periods = {row["account_id"]: period_for(row["n"], row["first"], row["last"]) for row in stats}
    if not periods:
        return {}
    thinned = {pk: period for pk, period in periods.items() if period is not None}
    # The partition a snapshot competes in: its account's period, or itself.
    bucket = F("taken_at")
    if thinned:
        bucket = Case(
            *[
                When(account_id=pk, then=Trunc("taken_at", period, output_field=DateTimeField()))
                for pk, period in sorted(thinned.items())
            ],
            default=F("taken_at"),
            output_field=DateTimeField(),
        )
    rows = (
        snapshots.annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("account_id"), bucket],
                order_by=[F("taken_at").desc(), F("id").desc()],
            )
        )
        .filter(rank=1)
        .order_by("account_id", "taken_at", "id")
        .values_list("account_id", "taken_at", "net_liquidation", "currency")
    )
    result = {pk: History(points=[], period=period) for pk, period in periods.items()}
    for account_id, taken_at, value, currency in rows:
        if account_id in result:  # not an account whose first snapshot came meanwhile
            result[account_id].points.append(Point(taken_at, value, currency))
    for history in result.values():
        latest = history.currency
        kept = [p for p in history.points if p.currency == latest]
        history.other_currency = len(history.points) - len(kept)
        history.points = kept
    return result


# --- the chart -----------------------------------------------------------------------------

# Geometry, in SVG user units.
WIDTH = 720
HEIGHT = 240
LEFT = 100  # the value labels
RIGHT = 24
TOP = 14
BOTTOM = 36  # the date labels
Y_TICKS = 4
X_TICKS = 5
# Points marked (each with its value on hover) when there are at most this many.
MARKED_POINTS = 60


def value_axis(low: Decimal, high: Decimal) -> list[Decimal]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) from at most `low`
    to at least `high`, in at most Y_TICKS + 1 steps."""
    if low == high:
        pad = abs(low) / 50 or Decimal(1)
        low, high = low - pad, high + pad
    magnitude = Decimal(1).scaleb(((high - low) / Y_TICKS).adjusted())
    for multiple in (1, 2, Decimal("2.5"), 5, 10, 20, 25, 50):
        step = multiple * magnitude
        first = (low / step).to_integral_value(ROUND_FLOOR) * step
        last = (high / step).to_integral_value(ROUND_CEILING) * step
        if (last - first) / step <= Y_TICKS + 1:
            break
    ticks, tick = [], first
    while tick <= last:
        ticks.append(tick)
        tick += step
    return ticks


def _when(moment: dt.datetime, with_time: bool) -> str:
    local = timezone.localtime(moment)
    return local.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")


def line_chart(account: str, history: History, history_range: Range) -> dict | None:
    """The net liquidation line of one account: value and date axes with round ticks, the
    line over a light area, each point marked when there are few, an SVG title and a
    description saying what the line shows. None without a point."""
    points = history.points
    if not points:
        return None
    currency = history.currency
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [p.value for p in points]
    ticks = value_axis(min(values), max(values))
    low, high = ticks[0], ticks[-1]

    def y(value: Decimal) -> float:
        return round(TOP + plot_height * (1 - float((value - low) / (high - low))), 1)

    first, last = points[0].taken_at, points[-1].taken_at
    seconds = (last - first).total_seconds()

    def x(moment: dt.datetime) -> float:
        if not seconds:
            return round(LEFT + plot_width / 2, 1)
        return round(LEFT + plot_width * (moment - first).total_seconds() / seconds, 1)

    with_time = seconds < 3 * 86400
    x_ticks = time_axis(first, last, LEFT, WIDTH - RIGHT)
    places = max(0, -min(t.as_tuple().exponent for t in ticks))
    y_ticks = [{"y": y(t), "label": grouped(t, places)} for t in ticks]

    coordinates = [(x(p.taken_at), y(p.value)) for p in points]
    line = " ".join(f"{'M' if i == 0 else 'L'}{cx},{cy}" for i, (cx, cy) in enumerate(coordinates))
    bottom = TOP + plot_height
    area = f"{line} L{coordinates[-1][0]},{bottom} L{coordinates[0][0]},{bottom} Z"
    marked = points if len(points) <= MARKED_POINTS else [points[-1]]
    markers = [
        {
            "x": x(p.taken_at),
            "y": y(p.value),
            "title": f"{_when(p.taken_at, True)}: {money(p.value)} {currency}",
            "value": f"{money(p.value)} {currency}",
        }
        for p in marked
    ]

    in_currency = currency or "its base currency"
    # The span drawn, not the range asked for: 3M of a history that began an hour ago
    # shows an hour.
    span = span_words(first, last)
    title = f"Net liquidation of {account} in {in_currency}, {span}"
    # A first point later than the range's start by more than a thinning period: the
    # history is younger than the range.
    slack = dt.timedelta(seconds=max(86400, dict(PERIODS).get(history.period, 0)))
    if history_range.months is not None and (
        first > months_before(last, history_range.months) + slack
    ):
        span += f" (all there is of {history_range.description})"
    lowest = min(points, key=lambda p: (p.value, p.taken_at))
    highest = max(points, key=lambda p: (p.value, p.taken_at))
    if len(points) == 1:
        description = f"One value: {money(points[0].value)} {currency} at {_when(first, True)}."
    else:
        description = (
            f"{len(points)} values ({PERIOD_WORDS[history.period]}) from "
            f"{_when(first, with_time)} ({money(points[0].value)} {currency}) to "
            f"{_when(last, with_time)} ({money(points[-1].value)} {currency}); lowest "
            f"{money(lowest.value)} at {_when(lowest.taken_at, with_time)}, highest "
            f"{money(highest.value)} at {_when(highest.taken_at, with_time)}."
        )
    if history.other_currency:
        description += (
            f" {history.other_currency} earlier values in another currency are not shown."
        )
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "bottom": bottom,
        "title": title,
        "span": span,
        "description": description,
        "y_ticks": y_ticks,
        "x_ticks": x_ticks,
        "x_label_y": bottom + 18,
        "y_label_x": LEFT - 8,
        "tick_end": bottom + 4,
        "line": line,
        "area": area,
        "markers": markers,
        "points": len(points),
        "currency": currency,
    }


# --- the time axis -------------------------------------------------------------------------

# A label's width in SVG units, per character of the 12 px chart font (generous: digits
# are about 7 px wide), and the least room between two labels.
CHAR_WIDTH = 7.5
LABEL_GAP = 16


@dataclass(frozen=True)
class _Step:
    """A tick interval of the time axis: a whole number of `unit`s, and the label format
    for ticks on it."""

    unit: str  # "second", "minute", "hour", "day", "month", "year"
    count: int
    format: str


_STEPS = (
    *(_Step("second", n, "%H:%M:%S") for n in (1, 2, 5, 10, 15, 30)),
    *(_Step("minute", n, "%H:%M") for n in (1, 2, 5, 10, 15, 30)),
    *(_Step("hour", n, "%H:%M") for n in (1, 2, 3, 6, 12)),
    *(_Step("day", n, "%-d %b") for n in (1, 2, 7, 14)),
    *(_Step("month", n, "%b %Y") for n in (1, 2, 3, 6)),
    *(_Step("year", n, "%Y") for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)),
)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _aligned(moment: dt.datetime, step: _Step) -> dt.datetime:
    """The first moment at or after `moment` (local time) that lies on `step`'s grid:
    a whole multiple of the step within its larger unit (15:30, the 1st of a quarter...)."""
    local = timezone.localtime(moment)
    if step.unit == "year":
        year = local.year + (
            local > local.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        )
        year += -year % step.count
        return _local(year, 1, 1)
    if step.unit == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        index = start.year * 12 + start.month - 1 + (local > start)
        index += -(index % 12) % step.count
        return _local(index // 12, index % 12 + 1, 1)
    if step.unit == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        day = start.date() + dt.timedelta(days=local > start)
        if step.count == 7:  # weeks start on Monday
            day += dt.timedelta(days=-day.weekday() % 7)
        elif step.count > 1:
            day += dt.timedelta(days=-(day.day - 1) % step.count)
        return _local(day.year, day.month, day.day)
    seconds = _UNIT_SECONDS[step.unit] * step.count
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = (local - midnight).total_seconds()
    return midnight + dt.timedelta(seconds=-(-elapsed // seconds) * seconds)


def _local(year: int, month: int, day: int) -> dt.datetime:
    return timezone.make_aware(dt.datetime(year, month, day))


def _advance(moment: dt.datetime, step: _Step) -> dt.datetime:
    local = timezone.localtime(moment)
    if step.unit == "year":
        return _local(local.year + step.count, 1, 1)
    if step.unit == "month":
        index = local.year * 12 + local.month - 1 + step.count
        return _local(index // 12, index % 12 + 1, 1)
    if step.unit == "day":
        day = local.date() + dt.timedelta(days=step.count)
        if step.count not in (1, 7) and day.month != local.month:
            day = day.replace(day=1)  # every 2nd / 14th day starts again each month
        return _local(day.year, day.month, day.day)
    return local + dt.timedelta(seconds=_UNIT_SECONDS[step.unit] * step.count)


def _tick_moments(first: dt.datetime, last: dt.datetime, step: _Step, limit: int) -> list:
    moments, moment = [], _aligned(first, step)
    while moment <= last and len(moments) <= limit:
        moments.append(moment)
        moment = _advance(moment, step)
    return moments


def _tick_label(moment: dt.datetime, step: _Step, first: dt.datetime, last: dt.datetime) -> str:
    local = timezone.localtime(moment)
    if (
        step.unit in ("second", "minute", "hour")
        and local.hour == local.minute == 0
        and (local.second == 0)
    ):
        return local.strftime("%-d %b")  # a new day on an axis of hours
    if step.unit == "day" and timezone.localtime(first).year != timezone.localtime(last).year:
        return local.strftime("%-d %b %Y")
    return local.strftime(step.format)


def _label_width(label: str) -> float:
    return len(label) * CHAR_WIDTH


def time_axis(
    first: dt.datetime, last: dt.datetime, left: float, right: float
) -> list[dict[str, Any]]:
    """Ticks for a time axis from `first` to `last` drawn between x = `left` and `right`:
    on round moments (the quarter hour, midnight, the 1st of a month, New Year), the
    finest step whose labels all fit side by side, so that no two labels ever overlap
    whatever the span, from seconds to centuries. Each tick: x, label and text anchor."""
    if last <= first:
        return [
            {"x": round((left + right) / 2, 1), "label": _when(first, True), "anchor": "middle"}
        ]
    seconds = (last - first).total_seconds()

    def x(moment: dt.datetime) -> float:
        return round(left + (right - left) * (moment - first).total_seconds() / seconds, 1)

    for step in _STEPS:
        # Cheap bound before the labels are made: no more ticks than could ever fit.
        room = (right - left) / (len(step.format) * 0.6 * CHAR_WIDTH + LABEL_GAP)
        moments = _tick_moments(first, last, step, limit=int(room) + 1)
        if not moments or len(moments) > room + 1:
            continue
        ticks = [
            {"x": x(m), "label": _tick_label(m, step, first, last), "anchor": "middle"}
            for m in moments
        ]
        if _fits(ticks, left, right):
            return ticks
    # Nothing finer fits: the two ends alone, dated in full.
    ends = [
        {"x": left, "label": _when(first, seconds < 3 * 86400), "anchor": "start"},
        {"x": right, "label": _when(last, seconds < 3 * 86400), "anchor": "end"},
    ]
    return ends if _fits(ends, left, right) else ends[1:]


def label_extent(tick: dict[str, Any]) -> tuple[float, float]:
    """Where a tick's label lies along the axis: (left edge, right edge)."""
    width = _label_width(tick["label"])
    if tick["anchor"] == "start":
        return tick["x"], tick["x"] + width
    if tick["anchor"] == "end":
        return tick["x"] - width, tick["x"]
    return tick["x"] - width / 2, tick["x"] + width / 2


def _fits(ticks: list[dict[str, Any]], left: float, right: float) -> bool:
    """Whether the labels fit side by side with LABEL_GAP between them; a label that
    would run past an end of the plot is anchored there instead (it must still fit)."""
    edge = left - LEFT + 8  # the value labels' column is free below the axis
    for tick in ticks:
        start, end = label_extent(tick)
        if start < edge:
            tick["anchor"] = "start"
        elif end > right + RIGHT:
            tick["anchor"] = "end"
    extents = [label_extent(t) for t in ticks]
    if any(start < edge or end > right + RIGHT for start, end in extents):
        return False
    return all(b[0] - a[1] >= LABEL_GAP for a, b in itertools.pairwise(extents))


def span_words(first: dt.datetime, last: dt.datetime) -> str:
    """What a chart spans, in words a title can carry: `5 Dec 2026, 21:40 to 21:48`,
    `7 Sep to 5 Dec 2026`, `one value, 5 Dec 2026 21:48`."""
    a, b = timezone.localtime(first), timezone.localtime(last)
    if a == b:
        return f"one value, {a:%-d %b %Y %H:%M}"
    if a.date() == b.date():
        return f"{a:%-d %b %Y}, {a:%H:%M} to {b:%H:%M}"
    if (b - a).total_seconds() < 3 * 86400:
        return f"{a:%-d %b %Y %H:%M} to {b:%-d %b %Y %H:%M}"
    if a.year == b.year:
        return f"{a:%-d %b} to {b:%-d %b %Y}"
    return f"{a:%-d %b %Y} to {b:%-d %b %Y}"
