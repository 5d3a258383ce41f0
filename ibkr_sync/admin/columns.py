"""Columns and read-only fields shared by the app's admin classes: times that tell rows
apart, and amounts with their currency."""

from django.contrib import admin
from django.utils import timezone
from django.utils.html import format_html

#: How a list shows a moment: the date with the time, to the minute, in the site's time
#: zone. The admin's own format ("9:48 p.m." or "Dec. 5, 2026, 9:48 p.m.") wraps in a
#: narrow column and, cut to the time, reads the same on rows of different days.
WHEN_FORMAT = "%Y-%m-%d %H:%M"


def when(value) -> str:
    """`value` (an aware datetime, or None) as a list shows it, never wrapped: the full
    moment, to the second, in its `datetime` attribute and on hover."""
    if value is None:
        return "-"
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    return format_html(
        '<time class="when" datetime="{}" title="{}">{}</time>',
        local.isoformat(), local.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        local.strftime(WHEN_FORMAT),
    )  # fmt: skip


def when_column(field: str, description: str):
    """A ModelAdmin column showing the datetime `field` by `when`, sorted by the field."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        return when(getattr(obj, field))

    return column
