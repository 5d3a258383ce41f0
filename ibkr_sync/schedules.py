"""A connection's schedule: when the task queue syncs it without being asked.

A `Connection` holds its schedule in its own fields (`schedule`: none, `interval` or
`crontab`; `schedule_every` and `schedule_period`, or `schedule_crontab` in
`schedule_timezone`; `schedule_enabled`), edited on its admin page. Those fields are the
truth; django-celery-beat's `PeriodicTask` (one per connection, named by its id) is kept
in step with them whenever the connection is saved or deleted (`apply`, `forget`: in the
same transaction), so `celery -A <project> beat --scheduler
django_celery_beat.schedulers:DatabaseScheduler` fires
`ibkr_sync.sync_scheduled(connection_id)`, which queues a sync through
`services.queue_scheduled` (the lock and the sync history hold as for any queued sync).

Without django-celery-beat installed (in `INSTALLED_APPS`) a schedule is kept and does
nothing. Validation is the standard library's: a crontab expression is checked here field
by field, as Celery's `crontab` reads it, before it reaches the beat.

Defaults, per kind, when a schedule is chosen and its fields are left empty:

- A gateway (TWS / IB Gateway): every 15 minutes on weekdays, US Eastern (the exchanges'
  week; a logged-in gateway answers at any hour of it, and a sync that finds nothing
  changed writes nothing but its run).
- Flex: once a day at 05:30 US Eastern, Tuesday to Saturday: IBKR closes a business day's
  statement data overnight after the US close (its own guidance: available the next
  morning), and a Flex sync reads up to yesterday (from its last statement's end), so
  each morning after a trading day brings that day in, with hours to spare for IBKR's
  batch running late.
  Flex also limits how often a token may ask: once a day stays far from its limits.
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from django.apps import apps
from django.core.exceptions import ValidationError

if TYPE_CHECKING:
    from .models import Connection

#: The task beat sends for a connection (`tasks.sync_scheduled`).
TASK = "ibkr_sync.sync_scheduled"
DEFAULT_TIMEZONE = "America/New_York"
#: A connection kind's default crontab (minute hour day-of-month month day-of-week).
DEFAULT_CRONTAB = {"tws": "*/15 * * * mon-fri", "flex": "30 5 * * tue-sat"}
#: A connection kind's default interval: (every, period).
DEFAULT_INTERVAL = {"tws": (15, "minutes"), "flex": (1, "days")}

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# Each crontab field: its name, its range, and the names it takes (as Celery reads them).
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: n for n, name in enumerate(_MONTHS, 1)}),
    ("day of week", 0, 6, {name: n for n, name in enumerate(_DAYS)}),
)
_PART = re.compile(r"^(?:\*|(?P<low>\w+)(?:-(?P<high>\w+))?)(?:/(?P<step>\d+))?$")


def periodic_task_name(connection_id: int) -> str:
    """The name of a connection's `PeriodicTask` (by its id: a rename changes nothing)."""
    return f"ibkr_sync: sync connection #{connection_id}"


def validate_crontab(expression: str) -> str:
    """`expression` as five space-separated fields (minute hour day-of-month month
    day-of-week: numbers, names of months and days, `*`, ranges, lists, steps), normalised
    to single spaces and lower case; or ValidationError saying which field is wrong."""
    fields = expression.lower().split()
    if len(fields) != 5:
        raise ValidationError(
            "A crontab expression has five fields: minute hour day-of-month month "
            f"day-of-week (e.g. {DEFAULT_CRONTAB['tws']!r}); got {len(fields)}."
        )
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        for part in text.split(","):
            _check_part(part, name, low, high, names)
    return " ".join(fields)


def _check_part(part: str, name: str, low: int, high: int, names: dict[str, int]) -> None:
    found = _PART.match(part)
    if found is None:
        raise ValidationError(f"The {name} field's {part!r} is not a value, range or step.")

    def value(word: str) -> None:
        if word in names:
            return
        if not word.isdigit() or not low <= int(word) <= high:
            raise ValidationError(
                f"The {name} field's {word!r} is not {low}-{high}"
                + (f" or a name ({', '.join(names)})" if names else "")
                + "."
            )

    for word in (found["low"], found["high"]):
        if word is not None:
            value(word)  # a range may wrap around (fri-mon), as Celery reads it
    if found["step"] is not None and not 1 <= int(found["step"]) <= high:
        raise ValidationError(f"The {name} field's step in {part!r} is not 1-{high}.")


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())  # read off the disk once per process


def validate_timezone(name: str) -> str:
    """An IANA time zone's name (e.g. America/New_York), or ValidationError."""
    name = name.strip()
    try:
        if name and name in _zones():
            ZoneInfo(name)
            return name
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise ValidationError(f"{name!r} is not a time zone's name (e.g. {DEFAULT_TIMEZONE}).")


def clean(connection: Connection) -> None:
    """A connection's schedule fields made whole (its kind's default for what a chosen
    schedule leaves empty) and checked; ValidationError by field."""
    problems: dict[str, str] = {}
    kind = connection.kind if connection.kind in DEFAULT_CRONTAB else "tws"
    if not connection.schedule_period:
        connection.schedule_period = "minutes"
    if connection.schedule == "interval":
        if connection.schedule_every is None:
            connection.schedule_every, connection.schedule_period = DEFAULT_INTERVAL[kind]
        elif connection.schedule_every < 1:
            problems["schedule_every"] = "Every how many: at least 1."
    elif connection.schedule == "crontab":
        if not connection.schedule_crontab.strip():
            connection.schedule_crontab = DEFAULT_CRONTAB[kind]
        try:
            connection.schedule_crontab = validate_crontab(connection.schedule_crontab)
        except ValidationError as exc:
            problems["schedule_crontab"] = " ".join(exc.messages)
    try:
        connection.schedule_timezone = validate_timezone(
            connection.schedule_timezone or DEFAULT_TIMEZONE
        )
    except ValidationError as exc:
        problems["schedule_timezone"] = " ".join(exc.messages)
    if problems:
        raise ValidationError(problems)


def describe(connection: Connection) -> str:
    """The schedule in words: `every 15 minutes`, `crontab */15 * * * mon-fri
    (America/New_York)`, `none`; `(paused)` when it is not enabled."""
    if connection.schedule == "interval" and connection.schedule_every:
        text = f"every {connection.schedule_every} {connection.schedule_period}"
    elif connection.schedule == "crontab" and connection.schedule_crontab:
        text = f"crontab {connection.schedule_crontab} ({connection.schedule_timezone})"
    else:
        return "none"
    return text if connection.schedule_enabled else f"{text} (paused)"


def beat_installed() -> bool:
    return apps.is_installed("django_celery_beat")


def apply(connection: Connection) -> None:
    """Keep the connection's `PeriodicTask` in step with its schedule: created or changed
    to fire `sync_scheduled(connection.pk)` as it says, enabled while both the schedule
    and the connection are, deleted when it has none. Nothing without django-celery-beat."""
    if not beat_installed():
        return
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    name = periodic_task_name(connection.pk)
    if connection.schedule not in ("interval", "crontab"):
        PeriodicTask.objects.filter(name=name).delete()
        return
    interval = crontab = None
    if connection.schedule == "interval":
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=connection.schedule_every, period=connection.schedule_period
        )
    else:
        minute, hour, day_of_month, month, day_of_week = connection.schedule_crontab.split()
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
            timezone=ZoneInfo(connection.schedule_timezone),
        )
    PeriodicTask.objects.update_or_create(
        name=name,
        defaults={
            "task": TASK,
            "interval": interval,
            "crontab": crontab,
            "args": json.dumps([connection.pk]),
            "kwargs": "{}",
            "enabled": bool(connection.enabled and connection.schedule_enabled),
            "description": f"Sync connection {connection.name} ({describe(connection)}); "
            "kept in step with the connection's schedule: edit it there.",
        },
    )


def forget(connection_id: int) -> None:
    """A deleted connection's `PeriodicTask` goes with it."""
    if not beat_installed():
        return
    from django_celery_beat.models import PeriodicTask

    PeriodicTask.objects.filter(name=periodic_task_name(connection_id)).delete()


def periodic_task(connection_id: int):
    """The connection's `PeriodicTask`, or None (none, or no django-celery-beat)."""
    if not beat_installed():
        return None
    from django_celery_beat.models import PeriodicTask

    return (
        PeriodicTask.objects.select_related("interval", "crontab")
        .filter(name=periodic_task_name(connection_id))
        .first()
    )


def _saving(sender, instance: Connection, raw: bool = False, **kwargs) -> None:
    """Whatever saves a connection (a form, the shell, a command), its schedule is whole
    and valid first: a bad one is refused (ValidationError) before the row is written."""
    if not raw:
        clean(instance)


def _saved(sender, instance: Connection, raw: bool = False, **kwargs) -> None:
    if not raw:  # loaddata: fixtures load the beat's rows themselves, if at all
        apply(instance)


def _deleted(sender, instance: Connection, **kwargs) -> None:
    forget(instance.pk)


def connect_signals() -> None:
    """A connection's schedule is checked before each save, and its `PeriodicTask`
    follows each save and delete of it (`apps.ready`)."""
    from django.db.models.signals import post_delete, post_save, pre_save

    from .models import Connection

    pre_save.connect(_saving, sender=Connection, dispatch_uid="ibkr_sync.schedules.saving")
    post_save.connect(_saved, sender=Connection, dispatch_uid="ibkr_sync.schedules.saved")
    post_delete.connect(_deleted, sender=Connection, dispatch_uid="ibkr_sync.schedules.deleted")
