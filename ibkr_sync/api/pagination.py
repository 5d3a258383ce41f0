"""Cursor pagination: constant cost per page however deep, and stable while syncs write.

Offset pagination makes the database count every row on each page and skip all rows
before the page (slow at 100,000 positions), and a sync that inserts rows while a
client pages shifts offsets, so rows are skipped or repeated. A cursor encodes "after
id N": each page is one index range scan on the primary key, and rows never move.
The price: no total count and no jumping to page 50; clients follow `next`.
"""

import datetime as dt

from django.core.exceptions import ValidationError
from django.db.models import F, Q
from django.utils import timezone
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination

from .errors import InvalidQuery

MAX_PAGE_SIZE = 1000


class StableCursorPagination(CursorPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = MAX_PAGE_SIZE
    ordering = "id"
    query_params = ("cursor", "page_size")

    def get_page_size(self, request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None or raw == "":
            return self.page_size
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= self.max_page_size:
            raise InvalidQuery(
                f"page_size must be a whole number from 1 to {self.max_page_size}, got {raw!r}."
            )
        return size

    def paginate_queryset(self, queryset, request, view=None):
        self._model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request):
        """The cursor, checked through and through: its offset and direction (DRF checks
        those), and its position, which must be a value of the ordering field (an id).

        DRF passes the position to the query as it is, so an edited cursor (`p=abc`,
        `p=1.5`, a NUL, SQL text, a number out of the column's range) would fail there as
        an unexpected error; here it is the caller's 400 like any other bad parameter.
        """
        try:
            cursor = super().decode_cursor(request)
            if cursor is not None and cursor.position is not None:
                cursor = cursor._replace(position=self._position(cursor.position))
        except (NotFound, ValidationError, ValueError, TypeError, OverflowError):
            raise InvalidQuery(
                "cursor is not valid: use the `next` or `previous` link of a page as it is."
            ) from None
        return cursor

    def _position(self, raw: str) -> str:
        field = self._model._meta.get_field(self.ordering[0].lstrip("-"))
        value = field.to_python(raw)
        if value is None:
            raise ValidationError("no position")
        field.run_validators(value)  # e.g. the column's integer range
        if isinstance(value, dt.datetime):
            # DRF writes a timestamp as the database gave it (aware, UTC); a naive one,
            # or one whose offset puts it beyond year 1 or 9999, was not written by it.
            if timezone.is_naive(value):
                raise ValidationError("naive time")
            value = value.astimezone(dt.UTC)
        return str(value)  # as DRF writes positions, so it compares them alike


class NewestFirstCursorPagination(StableCursorPagination):
    ordering = "-id"


class OldestFirstCursorPagination(StableCursorPagination):
    """Oldest first by the rows' timestamp (`taken_at`; a subclass names another field),
    ties in id order: for histories, whose rows need not have been written in the order
    of their time (a host may backfill). The cursor holds the timestamp; rows sharing one
    are told apart by DRF's offset within it."""

    ordering = ("taken_at", "id")


class DateThenIdCursorPagination(StableCursorPagination):
    """Oldest first by a date (`date_field`), ties in id order: the ledger's lists, whose
    rows arrive in any order of their dates (a statement of last year imported today).

    The cursor holds the last row's date and id together (`2026-03-13,812`; `,812` for a
    row without a date, listed first): every row has its own position, so a page is one
    range of the (date, id) order however many rows share a day, never an offset within
    a day (which DRF caps at 1,000 rows).
    """

    date_field = "date"

    def paginate_queryset(self, queryset, request, view=None):
        self._model = queryset.model
        self.request = request
        self.page_size = self.get_page_size(request)
        self.base_url = request.build_absolute_uri()
        self.ordering = (self.date_field, "id")
        self.cursor = self.decode_cursor(request)
        offset, reverse, position = self.cursor or (0, False, None)

        day = F(self.date_field)
        if reverse:
            queryset = queryset.order_by(day.desc(nulls_last=True), F("id").desc())
        else:
            queryset = queryset.order_by(day.asc(nulls_first=True), F("id").asc())
        if position is not None:
            queryset = queryset.filter(self._beyond(*self._parse(position), before=reverse))

        results = list(queryset[offset : offset + self.page_size + 1])
        self.page = results[: self.page_size]
        following = (
            self._get_position_from_instance(results[-1], self.ordering)
            if len(results) > len(self.page)
            else None
        )
        if reverse:
            self.page.reverse()
            self.has_next = position is not None or offset > 0
            self.has_previous = following is not None
            self.next_position, self.previous_position = position, following
        else:
            self.has_next = following is not None
            self.has_previous = position is not None or offset > 0
            self.next_position, self.previous_position = following, position
        return self.page

    def _beyond(self, day: dt.date | None, pk: int, *, before: bool) -> Q:
        """The rows after (`before`: before) the position (day, pk) in the list's order:
        rows without a date first, then by date, ties by id."""
        name = self.date_field
        if not before:
            if day is None:
                return Q(**{f"{name}__isnull": False}) | Q(
                    **{f"{name}__isnull": True, "id__gt": pk}
                )
            return Q(**{f"{name}__gt": day}) | Q(**{name: day, "id__gt": pk})
        if day is None:
            return Q(**{f"{name}__isnull": True, "id__lt": pk})
        return (
            Q(**{f"{name}__lt": day})
            | Q(**{f"{name}__isnull": True})
            | Q(**{name: day, "id__lt": pk})
        )

    def _get_position_from_instance(self, instance, ordering) -> str:
        day = getattr(instance, self.date_field)
        return f"{'' if day is None else day.isoformat()},{instance.pk}"

    def _parse(self, raw: str) -> tuple[dt.date | None, int]:
        """A position as this class writes it, checked: a date (or none) and an id, each
        a value of its column."""
        day_text, comma, pk_text = str(raw).partition(",")
        if not comma:
            raise ValidationError("no id")
        day = None
        if day_text:
            field = self._model._meta.get_field(self.date_field)
            day = field.to_python(day_text)
            field.run_validators(day)
        pk_field = self._model._meta.pk
        pk = pk_field.to_python(pk_text)
        if pk is None:
            raise ValidationError("no id")
        pk_field.run_validators(pk)
        return day, pk

    def _position(self, raw: str) -> str:
        day, pk = self._parse(raw)
        return f"{'' if day is None else day.isoformat()},{pk}"
