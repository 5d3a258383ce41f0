"""What every read endpoint of the app, and of a host's portfolio app, is built from: the
error answers of the schema, and a read-only list view with the error shape, the view
permission of its model and cursor pagination (by id; oldest first by time for a
history)."""

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated

from .. import visibility
from .errors import ErrorEnvelopeMixin, ErrorSerializer
from .pagination import OldestFirstCursorPagination, StableCursorPagination
from .permissions import CanViewModel

__all__ = [
    "PAGE_PARAMS",
    "OldestFirstCursorPagination",
    "ReadOnlyListView",
    "error_responses",
]

PAGE_PARAMS = StableCursorPagination.query_params


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """Schema entries for the error answers a read endpoint can give."""
    reasons = {
        400: "A query parameter is malformed or unknown (code invalid_query).",
        401: "No or invalid credentials, or credentials of another scheme than "
        "`Authorization: Token <key>` (code not_authenticated / authentication_failed).",
        403: "The user lacks the permission named in detail (code permission_denied).",
        404: "No such row (code not_found).",
        405: "Only GET is allowed (code method_not_allowed).",
    }
    return {s: OpenApiResponse(ErrorSerializer, description=reasons[s]) for s in statuses}


class ReadOnlyListView(ErrorEnvelopeMixin, ListAPIView):
    """A list of rows that belong to accounts: `get_queryset` returns
    `self.visible(rows)`, the rows the user may see (`ibkr_sync.visibility`: their own
    connections' accounts, unowned ones', all with `view_all_connections`), `account_path`
    leading from a row to its account (empty for the account model itself)."""

    permission_classes = [IsAuthenticated, CanViewModel]
    pagination_class = StableCursorPagination
    account_path = "account"

    def visible(self, queryset: QuerySet) -> QuerySet:
        return visibility.visible(queryset, self.request.user, self.account_path)
