"""`GET /portfolio/accounts`, `/portfolio/accounts/<external_id>/history`,
`/portfolio/positions` and `/portfolio/cash`: read-only, filtered, paginated; and the JSON
404 for every other path under `/portfolio/`."""

import datetime as dt
import difflib
import re

from django.db.models import Count, Q, QuerySet
from django.urls import Resolver404, URLPattern, URLResolver, get_resolver, resolve
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from ibkr_sync.api.base import (
    PAGE_PARAMS,
    OldestFirstCursorPagination,
    ReadOnlyListView,
    error_responses,
)
from ibkr_sync.api.errors import ErrorEnvelopeMixin, validated_query

from ..models import Account, AccountSnapshot, CashBalance, Position
from .holdings import held_at, is_complete, log_start
from .serializers import (
    AccountSerializer,
    AccountSnapshotSerializer,
    CashBalanceSerializer,
    CashFilterSerializer,
    HistoryFilterSerializer,
    PositionAsOfPageSerializer,
    PositionAsOfSerializer,
    PositionFilterSerializer,
    PositionPageSerializer,
    PositionSerializer,
)


@extend_schema(
    tags=["portfolio"],
    summary="List accounts",
    description="Every account known to the portfolio, with its count of open positions. "
    "Needs `portfolio.view_account`.",
    responses={200: AccountSerializer(many=True), **error_responses(400, 401, 403, 405)},
)
class AccountListView(ReadOnlyListView):
    serializer_class = AccountSerializer

    def get_queryset(self) -> QuerySet[Account]:
        return Account.objects.annotate(
            open_positions=Count("positions", filter=Q(positions__closed_at__isnull=True))
        )

    def filter_queryset(self, queryset: QuerySet[Account]) -> QuerySet[Account]:
        validated_query(self.request, serializers.Serializer, allowed=PAGE_PARAMS)
        return queryset


@extend_schema(
    tags=["portfolio"],
    summary="An account's history",
    description="The account's values (net liquidation, cash, position value, P&L, funds, "
    "buying power, in its base currency) as each sync that read them found them, oldest "
    "first, between `from` and `to` (both included, both optional). A date-time without "
    "an offset, and a plain date, are read in the server's time zone; a date `to` "
    "includes that whole day. Needs `portfolio.view_accountsnapshot`.",
    parameters=[
        OpenApiParameter(
            "external_id",
            str,
            location=OpenApiParameter.PATH,
            description="The broker's account id, e.g. U1234567.",
        ),
        HistoryFilterSerializer,
    ],
    responses={
        200: AccountSnapshotSerializer(many=True),
        **error_responses(400, 401, 403, 404, 405),
    },
)
class AccountHistoryView(ReadOnlyListView):
    serializer_class = AccountSnapshotSerializer
    pagination_class = OldestFirstCursorPagination

    def get_queryset(self) -> QuerySet[AccountSnapshot]:
        return AccountSnapshot.objects.select_related("account")

    def filter_queryset(self, queryset: QuerySet[AccountSnapshot]) -> QuerySet[AccountSnapshot]:
        external_id = self.kwargs["external_id"]
        if not _is_account(external_id):
            raise NotFound(
                f"No account {external_id!r}: GET /portfolio/accounts lists the accounts."
            )
        bounds = validated_query(self.request, HistoryFilterSerializer, allowed=PAGE_PARAMS)
        queryset = queryset.filter(account__external_id=external_id)
        if "from" in bounds:
            queryset = queryset.filter(taken_at__gte=bounds["from"].start)
        if "to" in bounds:
            to = bounds["to"]
            if not to.is_date:
                queryset = queryset.filter(taken_at__lte=to.start)
            elif to.end is not None:
                queryset = queryset.filter(taken_at__lt=to.end)
        return queryset


def _is_account(external_id: str) -> bool:
    field = Account._meta.get_field("external_id")
    if len(external_id) > field.max_length or "\x00" in external_id:
        return False  # no account has it; PostgreSQL would refuse the NUL in the query
    return Account.objects.filter(external_id=external_id).exists()


@extend_schema(
    tags=["portfolio"],
    summary="List positions",
    description="Positions, oldest first, filtered by the query parameters (combined with "
    "AND). Follow `next` for the following page. Needs `portfolio.view_position`.\n\n"
    "With `as_of`, the positions held at that past moment instead, rebuilt from the "
    "sync's change log: each with the quantity and average cost it had then and `since` "
    "(when they took effect), without today's market values; the page says `as_of` (the "
    "moment read) and `complete` (false when the moment is before the log begins and "
    "some positions are older than it, so what they held is unknown and they are not "
    "listed). A change takes effect when its sync finished.",
    parameters=[PositionFilterSerializer],
    responses={
        200: OpenApiResponse(
            PolymorphicProxySerializer(
                component_name="PositionPage",
                serializers=[PositionPageSerializer, PositionAsOfPageSerializer],
                resource_type_field_name=None,
                many=False,
            ),
            description="The positions now (PaginatedPositionList), or with as_of those "
            "held then (PaginatedPositionAsOfList).",
        ),
        **error_responses(400, 401, 403, 405),
    },
)
class PositionListView(ReadOnlyListView):
    serializer_class = PositionSerializer
    as_of: dt.datetime | None = None  # set by a request with ?as_of=
    complete = True

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return PositionSerializer if self.as_of is None else PositionAsOfSerializer

    def get_queryset(self) -> QuerySet[Position]:
        return Position.objects.select_related("account", "instrument")

    def filter_queryset(self, queryset: QuerySet[Position]) -> QuerySet[Position]:
        filters = validated_query(self.request, PositionFilterSerializer, allowed=PAGE_PARAMS)
        if "account" in filters:
            queryset = queryset.filter(account__external_id=filters["account"])
        if "sec_type" in filters:
            queryset = queryset.filter(instrument__sec_type=filters["sec_type"])
        if "currency" in filters:
            queryset = queryset.filter(instrument__currency=filters["currency"])
        if filters.get("status") == "open":
            queryset = queryset.open()
        elif filters.get("status") == "closed":
            queryset = queryset.closed()
        if filters.get("symbol"):
            text = filters["symbol"]
            queryset = queryset.filter(
                Q(instrument__symbol__icontains=text) | Q(instrument__local_symbol__icontains=text)
            )
        if "as_of" in filters:
            when, start = filters["as_of"].start, log_start()
            self.as_of, self.complete = when, is_complete(queryset, when, start)
            queryset = held_at(queryset, when, start)
        return queryset

    def get_paginated_response(self, data) -> Response:
        response = super().get_paginated_response(data)
        if self.as_of is not None:
            moment = serializers.DateTimeField().to_representation(self.as_of)
            response.data = {"as_of": moment, "complete": self.complete, **response.data}
        return response


@extend_schema(
    tags=["portfolio"],
    summary="List cash balances",
    description="The cash each account holds in each currency, as the last sync that read "
    "the account's values found it (one row per account and currency), with the amount in "
    "the account's base currency at IBKR's own exchange rate. Oldest row first, filtered "
    "by the query parameters (combined with AND). Needs `portfolio.view_cashbalance`.",
    parameters=[CashFilterSerializer],
    responses={200: CashBalanceSerializer(many=True), **error_responses(400, 401, 403, 405)},
)
class CashBalanceListView(ReadOnlyListView):
    serializer_class = CashBalanceSerializer

    def get_queryset(self) -> QuerySet[CashBalance]:
        return CashBalance.objects.select_related("account")

    def filter_queryset(self, queryset: QuerySet[CashBalance]) -> QuerySet[CashBalance]:
        filters = validated_query(self.request, CashFilterSerializer, allowed=PAGE_PARAMS)
        if "account" in filters:
            queryset = queryset.filter(account__external_id=filters["account"])
        if "currency" in filters:
            queryset = queryset.filter(currency=filters["currency"])
        return queryset


# --- unknown paths ----------------------------------------------------------------------------


@extend_schema(exclude=True)
class NotFoundView(ErrorEnvelopeMixin, APIView):
    """Any other path under `/portfolio/`, whatever the method: a 404 in the error shape
    naming the path that was probably meant (`/portfolio/sync/ibkr/` -> the same without
    the trailing slash), instead of Django's HTML page, which an API client cannot read.
    It needs no login: it reveals nothing the schema does not."""

    authentication_classes = []
    permission_classes = [AllowAny]

    def http_method_not_allowed(self, request, *args, **kwargs):
        raise NotFound(not_found_detail(request.method, request.path))

    options = http_method_not_allowed


def not_found_detail(method: str, path: str) -> str:
    endpoints = api_paths()
    return (
        f"No API endpoint at {method} {path}.{_hint(path, endpoints)} The endpoints: "
        f"{', '.join(endpoints)} (documented at /api/docs/)."
    )


def _hint(path: str, endpoints: list[str]) -> str:
    stripped = path.rstrip("/")
    if stripped != path and _is_endpoint(stripped):
        return f" Did you mean {stripped}? The API's paths have no trailing slash."
    for endpoint in endpoints:  # the right shape, the wrong kind of id
        if "<id>" in endpoint and re.fullmatch(
            re.escape(endpoint).replace(re.escape("<id>"), "[^/]+"), path
        ):
            return f" Did you mean {endpoint}? <id> is a whole number."
    prefix = "/portfolio/"
    tails = {endpoint.removeprefix(prefix): endpoint for endpoint in endpoints}
    close = difflib.get_close_matches(path.removeprefix(prefix), tails, n=1, cutoff=0.75)
    return f" Did you mean {tails[close[0]]}?" if close else ""


def _is_endpoint(path: str) -> bool:
    try:
        match = resolve(path)
    except Resolver404:
        return False
    return getattr(match.func, "cls", None) is not NotFoundView


def api_paths() -> list[str]:
    """The API's paths under /portfolio/ as a client writes them (`.../runs/<id>`,
    `.../accounts/<external_id>/history`)."""
    found = []

    def walk(patterns, prefix: str) -> None:
        for entry in patterns:
            route = prefix + str(entry.pattern)
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, route)
            elif (
                isinstance(entry, URLPattern)
                and route.startswith("portfolio/")
                and getattr(entry.callback, "cls", None) is not NotFoundView
            ):
                found.append("/" + re.sub(r"<(?:\w+:)?(\w+)>", _placeholder, route))

    walk(get_resolver().url_patterns, "")
    return sorted(found)


def _placeholder(match: re.Match) -> str:
    return "<id>" if match[1] == "pk" else f"<{match[1]}>"
