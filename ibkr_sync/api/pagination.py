"""Cursor pagination: constant cost per page however deep, and stable while syncs write.

Offset pagination makes the database count every row on each page and skip all rows
before the page (slow at 100,000 positions), and a sync that inserts rows while a
client pages shifts offsets, so rows are skipped or repeated. A cursor encodes "after
id N": each page is one index range scan on the primary key, and rows never move.
The price: no total count and no jumping to page 50; clients follow `next`.
"""

import datetime as dt

from django.core.exceptions import ValidationError
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
