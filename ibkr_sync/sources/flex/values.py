"""The rules for the values of a Flex statement: numbers, "no value", dates and times.

Every value of an Activity Flex statement is the text of an XML attribute. Standard
library only, pure: the parser reads by these rules, and nothing else decides them.

No value. IBKR leaves an attribute empty, or writes `--` or `N/A`, where it has no
value (an exchange of a book trade, an `exchOrderId`, a strike of a stock): each of them
is None for a number or a date, "" for a text.

Numbers. Plain decimal text as IBKR prints it: an optional minus sign, ASCII digits with
an optional fraction, an optional exponent. Read into a `Decimal` from the text itself,
never through a float, so `0.1` is exactly one tenth and `-0` stays what IBKR wrote.
Anything else (`1,234.5`, `+1`, `0x10`, `NaN`, a placeholder like `XXXXXCAD`) is not a
number: the field has no value, and the record says why (`ValueRuleError`); it never
ends the parse.

Dates. A Flex Query's date format is a setting of the query: `yyyyMMdd` (the default),
`yyyy-MM-dd`, `MM/dd/yyyy`, `MM/dd/yy`, `dd/MM/yyyy`, `dd/MM/yy` or `dd-MMM-yy`. All but
the slashed ones say which they are by their shape. A slashed date is ambiguous
(`03/04/2025`): which order a statement uses is decided once per statement, from the
statement's own `fromDate`, `toDate` and `whenGenerated` (`slash_order`): a part above 12
tells, and so does the only order in which the period runs forwards and was generated
after it began; a caller that knows the period it asked for (the client does) settles
the rest. What is still ambiguous is refused (`AmbiguousDateFormat`), never guessed.

Times. A date-time is the date, a separator (`;`, `,`, a space, none at all, or, in
older statements, a comma and a space: `2013-03-05, 19:45:00`) and the time (`HHmmss`,
`HH:mm:ss`, `HHmm` or `HH:mm`), and, when the query's time format is one "with
TimeZone", the zone's abbreviation after a space (`20250522;204157 AEST`). Without one,
a time is in US Eastern time (the zone of IBKR's statement day, and of the `timestamp`
the Flex Web Service itself writes, e.g. `EDT`), so it is read as America/New_York
unless the caller names the account's zone. With one, the abbreviation says the moment
(`zone_named`): the reader's zone where that is its own name at that time (EST and EDT
of US Eastern, which also settle the hour a clock change repeats), else its offset from
UTC for an abbreviation that names one offset only (`ZONE_OFFSETS`, `GMT+08:00`). One
that names several (CST: US Central or China; IST; BST) or none known is not guessed:
the value cannot be read (`ValueRuleError`). Every datetime returned is aware.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation
from typing import Final
from zoneinfo import ZoneInfo

#: The zone Flex statement times are in, unless the caller says otherwise.
EASTERN: Final = ZoneInfo("America/New_York")
#: What IBKR writes for "no value".
NO_VALUE: Final = frozenset({"", "--", "N/A"})

MONTH_DAY: Final = "MDY"
DAY_MONTH: Final = "DMY"

_DECIMAL: Final = re.compile(
    r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?"
).fullmatch
_INTEGER: Final = re.compile(r"-?[0-9]{1,30}").fullmatch
_MONTHS: Final = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
        start=1,
    )
}
# The date part of a value, by shape; the time part after it, if any.
_DATE: Final = (
    r"(?:(?P<compact>[0-9]{8})"
    r"|(?P<iso>[0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"|(?P<slashed>[0-9]{2}/[0-9]{2}/(?:[0-9]{4}|[0-9]{2}))"
    r"|(?P<named>[0-9]{2}-[A-Za-z]{3}-[0-9]{2}))"
)
_TIME: Final = (
    r"(?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2})?|[0-9]{6}|[0-9]{4})"
    r"(?: ?(?P<zone>(?:GMT|UTC)[+-][0-9]{1,2}(?::?[0-9]{2})?|[A-Za-z]{1,6}))?"
)
_DATE_TIME: Final = re.compile(rf"{_DATE}(?:(?:, |[;, ])?{_TIME})?").fullmatch
_TIME_ONLY: Final = re.compile(_TIME).fullmatch
_OFFSET: Final = re.compile(r"(?:GMT|UTC)([+-])([0-9]{1,2}):?([0-9]{2})?").fullmatch

#: The abbreviations of zones that name one offset from UTC only, as a query's time
#: format "with TimeZone" writes them. Abbreviations of several zones (CST: US Central
#: or China Standard; IST: India, Israel or Ireland; BST: British Summer or Bangladesh)
#: are not here: they are read only as the reader's own zone names itself.
ZONE_OFFSETS: Final = {
    name: dt.timedelta(minutes=minutes)
    for name, minutes in {
        "UTC": 0, "GMT": 0, "Z": 0, "WET": 0, "WEST": 60,
        "CET": 60, "CEST": 120, "MET": 60, "MEST": 120, "EET": 120, "EEST": 180, "MSK": 180,
        "EST": -300, "EDT": -240, "MST": -420, "MDT": -360, "PST": -480, "PDT": -420,
        "AKST": -540, "AKDT": -480, "HST": -600,
        "HKT": 480, "SGT": 480, "AWST": 480, "JST": 540, "KST": 540,
        "ACST": 570, "ACDT": 630, "AEST": 600, "AEDT": 660, "NZST": 720, "NZDT": 780,
    }.items()
}  # fmt: skip


class ValueRuleError(ValueError):
    """A text that is not a value of its kind; the message quotes it (cut)."""


class AmbiguousDateFormat(ValueRuleError):
    """Slashed dates whose order (month/day or day/month) the statement does not tell."""


def is_no_value(text: str | None) -> bool:
    return text is None or text.strip() in NO_VALUE


def text(value: str | None) -> str:
    """A text attribute: "" for no value, else as written (outer spaces removed)."""
    if value is None:
        return ""
    stripped = value.strip()
    return "" if stripped in NO_VALUE else stripped


def decimal(value: str | None) -> Decimal | None:
    """An exact number, None for no value; ValueRuleError for what is not a number."""
    if value is None:
        return None
    stripped = value.strip()
    if stripped in NO_VALUE:
        return None
    if _DECIMAL(stripped) is None:
        raise ValueRuleError(f"{shown(stripped)} is not a number")
    try:
        return Decimal(stripped)
    except InvalidOperation:  # pragma: no cover - the grammar admits only numbers
        raise ValueRuleError(f"{shown(stripped)} is not a number") from None


def integer(value: str | None) -> int | None:
    """A whole number (an id such as a conId), None for no value."""
    if is_no_value(value):
        return None
    stripped = value.strip()  # type: ignore[union-attr]
    if _INTEGER(stripped) is None:
        raise ValueRuleError(f"{shown(stripped)} is not a whole number")
    return int(stripped)


def date(value: str | None, order: str | None = None) -> dt.date | None:
    """A date in any of the query's formats (the date part of a date-time too)."""
    if is_no_value(value):
        return None
    match = _DATE_TIME(value.strip())  # type: ignore[union-attr]
    if match is None:
        raise ValueRuleError(f"{shown(value)} is not a date")
    return _date_of(match, order)


def date_time(
    value: str | None, order: str | None = None, zone: dt.tzinfo = EASTERN
) -> tuple[dt.date, dt.datetime | None] | None:
    """A date-time: its date, and the aware moment when a time came with it (None when
    the value is a date alone). None for no value."""
    if is_no_value(value):
        return None
    match = _DATE_TIME(value.strip())  # type: ignore[union-attr]
    if match is None:
        raise ValueRuleError(f"{shown(value)} is not a date-time")
    day = _date_of(match, order)
    if match["time"] is None:
        return day, None
    return day, zone_named(day, _time_of(match["time"]), match["zone"], zone)


def time_on(value: str | None, day: dt.date, zone: dt.tzinfo = EASTERN) -> dt.datetime | None:
    """A time alone (an old query's `tradeTime`, its zone's abbreviation after it or
    not) as the moment it is on `day`; None for no value."""
    if is_no_value(value):
        return None
    stripped = value.strip()  # type: ignore[union-attr]
    match = _TIME_ONLY(stripped)
    if match is None:
        raise ValueRuleError(f"{shown(stripped)} is not a time")
    return zone_named(day, _time_of(match["time"]), match["zone"], zone)


def zone_named(
    day: dt.date, time: dt.time, name: str | None, zone: dt.tzinfo = EASTERN
) -> dt.datetime:
    """The moment `time` on `day` is in the zone abbreviated `name` (None: in `zone`):
    `zone` itself where `name` is what it calls itself then (either side of a clock
    change: `fold`), else the one offset `name` stands for (`ZONE_OFFSETS`, `GMT+hh:mm`).
    ValueRuleError for an abbreviation of several zones, or of none known."""
    local = dt.datetime.combine(day, time, zone)
    if name is None:
        return local
    name = name.upper()
    for fold in (0, 1):
        moment = local.replace(fold=fold)
        if moment.tzname() == name:
            return moment
    offset = ZONE_OFFSETS.get(name)
    parts = _OFFSET(name)
    if parts is not None:
        sign = -1 if parts[1] == "-" else 1
        offset = sign * dt.timedelta(hours=int(parts[2]), minutes=int(parts[3] or 0))
    if offset is None or abs(offset) >= dt.timedelta(hours=24):
        raise ValueRuleError(
            f"{shown(name)} is a time zone abbreviation of several zones, or of none known: "
            "set the Flex Query's time format to one without TimeZone, or name the "
            "account's zone"
        )
    return dt.datetime.combine(day, time, dt.timezone(offset))


def is_slashed(value: str | None) -> bool:
    match = None if is_no_value(value) else _DATE_TIME(value.strip())  # type: ignore[union-attr]
    return match is not None and match["slashed"] is not None


def slash_order(
    from_date: str | None,
    to_date: str | None,
    generated: str | None,
    *,
    expected: tuple[dt.date, dt.date] | None = None,
) -> str | None:
    """Which order a statement's slashed dates are in, from its own period: MONTH_DAY,
    DAY_MONTH, or None when its dates are not slashed. `expected` is the period the
    caller asked for, if it knows it. AmbiguousDateFormat when nothing tells."""
    values = [v for v in (from_date, to_date, generated) if is_slashed(v)]
    if not values:
        return None
    candidates = []
    for order in (MONTH_DAY, DAY_MONTH):
        try:
            start, end, made = (
                None if is_no_value(v) else date(v, order) for v in (from_date, to_date, generated)
            )
        except ValueRuleError:
            continue
        if start is not None and end is not None and start > end:
            continue
        if start is not None and made is not None and made < start:
            continue
        if expected is not None and (start, end) != tuple(expected):
            continue
        candidates.append(order)
    if len(candidates) == 1:
        return candidates[0]
    period = f"fromDate {shown(from_date)}, toDate {shown(to_date)}"
    if not candidates:
        raise AmbiguousDateFormat(
            f"the statement's dates ({period}) are in no date format a Flex Query has"
        )
    raise AmbiguousDateFormat(
        f"the statement's dates ({period}) may be month/day or day/month: set the Flex "
        "Query's date format to yyyyMMdd (or yyyy-MM-dd) in Client Portal"
    )


def shown(value: object, limit: int = 40) -> str:
    """A text as a message quotes it: repr, cut to `limit` characters."""
    value = str(value)
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _date_of(match: re.Match, order: str | None) -> dt.date:
    try:
        if match["compact"]:
            c = match["compact"]
            return dt.date(int(c[:4]), int(c[4:6]), int(c[6:]))
        if match["iso"]:
            return dt.date.fromisoformat(match["iso"])
        if match["named"]:
            day, month, year = match["named"].split("-")
            if month.upper() not in _MONTHS:
                raise ValueRuleError(f"{shown(match.group(0))} is not a date")
            return dt.date(2000 + int(year), _MONTHS[month.upper()], int(day))
        first, second, year = match["slashed"].split("/")
        if order is None:
            raise AmbiguousDateFormat(
                f"{shown(match['slashed'])} may be month/day or day/month and the statement "
                "does not say which"
            )
        month, day = (first, second) if order == MONTH_DAY else (second, first)
        full_year = int(year) if len(year) == 4 else 2000 + int(year)
        return dt.date(full_year, int(month), int(day))
    except ValueError as error:
        if isinstance(error, ValueRuleError):
            raise
        raise ValueRuleError(f"{shown(match.group(0))} is not a date ({error})") from None


def _time_of(value: str) -> dt.time:
    digits = value.replace(":", "")
    try:
        return dt.time(int(digits[:2]), int(digits[2:4]), int(digits[4:6] or 0))
    except ValueError:
        raise ValueRuleError(f"{shown(value)} is not a time") from None
