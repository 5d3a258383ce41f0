"""Cursor pagination: constant cost per page however deep, and stable while syncs write.

Offset pagination makes the database count every row on each page and skip all rows
before the page (slow at 100,000 positions), and a sync that inserts rows while a
client pages shifts offsets, so rows are skipped or repeated. A cursor encodes "after
id N": each page is one index range scan on the primary key, and rows never move.
The price: no total count and no jumping to page 50; clients follow `next`.
"""

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

    def decode_cursor(self, request):
        try:
            return super().decode_cursor(request)
        except NotFound:
            raise InvalidQuery(
                "cursor is not valid: use the `next` or `previous` link of a page as it is."
            ) from None


class NewestFirstCursorPagination(StableCursorPagination):
    ordering = "-id"
