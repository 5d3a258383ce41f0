"""`GET /portfolio/accounts`, `/portfolio/accounts/<external_id>/history`,
`/portfolio/positions`, `/portfolio/cash`, and the ledger's `/portfolio/trades` and
`/portfolio/cash-transactions`: read-only, filtered, paginated; and the JSON 404 for every
other path under `/portfolio/`."""

import datetime as dt
import difflib
import re

from django.db.models import Count, Q, QuerySet
from django.urls import (
    NoReverseMatch,
    Resolver404,
    URLPattern,
    URLResolver,
    get_resolver,
    resolve,
    reverse,
)
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

from .. import conf, permissions, visibility
from .base import PAGE_PARAMS, OldestFirstCursorPagination, ReadOnlyListView, error_responses
from .errors import ErrorEnvelopeMixin, validated_query
from .explanations import explain_changes, explain_points
from .holdings import held_at, holding, is_complete, log_start
from .pagination import DateThenIdCursorPagination
from .read_serializers import (
    AccountSerializer,
    AccountSnapshotSerializer,
    CashBalanceSerializer,
    CashFilterSerializer,
    CashTransactionFilterSerializer,
    CashTransactionSerializer,
    HistoryFilterSerializer,
    LedgerFilterSerializer,
    PositionAsOfPageSerializer,
    PositionAsOfSerializer,
    PositionFilterSerializer,
    PositionPageSerializer,
    PositionSerializer,
    TradeSerializer,
)


def needs(model) -> str:
    """The schema's words for the permission an endpoint needs: the model's own `view`
    permission, in whichever app the IBKR_SYNC_*_MODEL setting puts it; and whose rows
    it lists (`ibkr_sync.visibility`)."""
    return (
        f"Needs `{model._meta.app_label}.view_{model._meta.model_name}`. Only the accounts "
        "of the user's own connections, of connections without an owner and of none (all "
        "with `ibkr_sync.view_all_connections`)."
    )


@extend_schema(
    tags=["portfolio"],
    summary="List accounts",
    description="Every account known to the portfolio, with its count of open positions. "
    + needs(conf.account_model()),
    responses={200: AccountSerializer(many=True), **error_responses(400, 401, 403, 405)},
)
class AccountListView(ReadOnlyListView):
    serializer_class = AccountSerializer
    account_path = ""

    def get_queryset(self) -> QuerySet:
        return self.visible(
            conf.account_model().objects.annotate(
                open_positions=Count("positions", filter=Q(positions__closed_at__isnull=True))
            )
        )

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        validated_query(self.request, serializers.Serializer, allowed=PAGE_PARAMS)
        return queryset


@extend_schema(
    tags=["portfolio"],
    summary="An account's history",
    description="The account's values (net liquidation, cash, position value, P&L, funds, "
    "buying power, in its base currency) as each sync that read them found them, oldest "
    "first, between `from` and `to` (both included, both optional). A date-time without "
    "an offset, and a plain date, are read in the server's time zone; a date `to` "
    "includes that whole day. Each point's `cash_flows`: the account's cash transactions "
    "since its previous point, per kind and currency (they need the cash transaction "
    "model's view permission). " + needs(conf.account_snapshot_model()),
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

    def get_queryset(self) -> QuerySet:
        return self.visible(conf.account_snapshot_model().objects.select_related("account"))

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        external_id = self.kwargs["external_id"]
        # Another owner's account: 404 in the same words as an account that does not exist.
        if not _is_account(external_id, self.request.user):
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

    def paginate_queryset(self, queryset: QuerySet) -> list:
        page = super().paginate_queryset(queryset)
        explain_points(page, self.request.user)  # the cash flows: one or two queries
        return page


def _is_account(external_id: str, user) -> bool:
    """Whether an account has that id, and `user` may see it."""
    field = conf.account_model()._meta.get_field("external_id")
    if len(external_id) > field.max_length or "\x00" in external_id:
        return False  # no account has it; PostgreSQL would refuse the NUL in the query
    accounts = conf.account_model().objects.filter(external_id=external_id)
    return visibility.visible(accounts, user, "").exists()


@extend_schema(
    tags=["portfolio"],
    summary="List positions",
    description="Positions, oldest first, filtered by the query parameters (combined with "
    "AND). Follow `next` for the following page. " + needs(conf.position_model()) + "\n\n"
    "With `as_of`, the positions held at that past moment instead, rebuilt from the "
    "sync's change log: each with the quantity and average cost it had then and `since` "
    "(when they took effect), without today's market values; the page says `as_of` (the "
    "moment read) and `complete` (false when the moment is before the log begins and "
    "some positions are older than it, so what they held is unknown and they are not "
    "listed). A change takes effect when its sync finished. Each row's `change` is the "
    "change that set its state, with the ledger's trades since the position's previous "
    "change and whether they add up to it (`explained`); trades need the trade model's "
    "view permission.",
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

    def get_queryset(self) -> QuerySet:
        return self.visible(conf.position_model().objects.select_related("account", "instrument"))

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
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

    def paginate_queryset(self, queryset: QuerySet) -> list:
        page = super().paginate_queryset(queryset)
        if self.as_of is not None:
            for position in page:
                position.holding = holding(position)
            explain_changes(page, self.request.user)  # the changes' trades: one query
        return page

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
    "by the query parameters (combined with AND). " + needs(conf.cash_balance_model()),
    parameters=[CashFilterSerializer],
    responses={200: CashBalanceSerializer(many=True), **error_responses(400, 401, 403, 405)},
)
class CashBalanceListView(ReadOnlyListView):
    serializer_class = CashBalanceSerializer

    def get_queryset(self) -> QuerySet:
        return self.visible(conf.cash_balance_model().objects.select_related("account"))

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        filters = validated_query(self.request, CashFilterSerializer, allowed=PAGE_PARAMS)
        if "account" in filters:
            queryset = queryset.filter(account__external_id=filters["account"])
        if "currency" in filters:
            queryset = queryset.filter(currency=filters["currency"])
        return queryset


# --- the ledger ------------------------------------------------------------------------------


def needs_ledger(setting: str, model) -> str:
    """The schema's words for a ledger endpoint's permission, and its 404 without one."""
    perm = (
        f"`{model._meta.app_label}.view_{model._meta.model_name}`"
        if model is not None
        else f"the `view` permission of the {setting} model"
    )
    return (
        f"Needs {perm}. Answers 404 (code not_found) while the project keeps no ledger of "
        f"this kind ({setting} = None)."
    )


class LedgerListView(ReadOnlyListView):
    """A list of one kind of the ledger's rows (`kind`), oldest first by `date_field`
    then id, filtered by account, dates (both included), currency and symbol."""

    kind: permissions.Kind
    date_field = "date"
    filter_serializer: type[serializers.Serializer] = LedgerFilterSerializer

    def get_queryset(self) -> QuerySet:
        model = permissions.COVERED_BY[self.kind]()
        if model is None:
            raise NotFound(f"This project keeps no ledger of {self.kind.value.replace('_', ' ')}.")
        return self.visible(model.objects.select_related("account", "instrument"))

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        filters = validated_query(self.request, self.filter_serializer, allowed=PAGE_PARAMS)
        if filters.get("account"):
            queryset = queryset.filter(account__external_id=filters["account"])
        if "from" in filters:
            queryset = queryset.filter(**{f"{self.date_field}__gte": filters["from"]})
        if "to" in filters:
            queryset = queryset.filter(**{f"{self.date_field}__lte": filters["to"]})
        if "currency" in filters:
            queryset = queryset.filter(currency=filters["currency"])
        if filters.get("symbol"):
            text = filters["symbol"]
            queryset = queryset.filter(
                Q(instrument__symbol__icontains=text) | Q(instrument__local_symbol__icontains=text)
            )
        if "kind" in filters:
            queryset = queryset.filter(kind=filters["kind"])
        return queryset


class TradePagination(DateThenIdCursorPagination):
    date_field = "trade_date"


@extend_schema(
    tags=["portfolio"],
    summary="List trades",
    description="The executions a Flex connection read (stocks, options, futures, bonds, "
    "FX conversions), oldest trade date first (ties in the order they were stored; rows "
    "without a date first), filtered by the query parameters (combined with AND; from "
    "and to are trade dates, both included). Follow `next` for the following page. "
    + needs_ledger("IBKR_SYNC_TRADE_MODEL", conf.trade_model()),
    parameters=[LedgerFilterSerializer],
    responses={200: TradeSerializer(many=True), **error_responses(400, 401, 403, 404, 405)},
)
class TradeListView(LedgerListView):
    serializer_class = TradeSerializer
    pagination_class = TradePagination
    kind = permissions.Kind.TRADES
    date_field = "trade_date"


@extend_schema(
    tags=["portfolio"],
    summary="List cash transactions",
    description="The cash transactions a Flex connection read (dividends, withholding tax "
    "and its refunds, payments in lieu, interest, fees, deposits, withdrawals), oldest "
    "first (ties in the order they were stored; rows without a date first), filtered by "
    "the query parameters (combined with AND; from and to are dates, both included). "
    + needs_ledger("IBKR_SYNC_CASH_TRANSACTION_MODEL", conf.cash_transaction_model()),
    parameters=[CashTransactionFilterSerializer],
    responses={
        200: CashTransactionSerializer(many=True),
        **error_responses(400, 401, 403, 404, 405),
    },
)
class CashTransactionListView(LedgerListView):
    serializer_class = CashTransactionSerializer
    pagination_class = DateThenIdCursorPagination
    kind = permissions.Kind.CASH_TRANSACTIONS
    filter_serializer = CashTransactionFilterSerializer


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
    endpoints = api_paths(path)
    return (
        f"No API endpoint at {method} {path}.{_hint(path, endpoints)} The endpoints: "
        f"{', '.join(endpoints)}{_documented()}."
    )


def _documented() -> str:
    """Where the API's documentation is, if the project serves drf-spectacular's pages
    under the URL name `swagger-ui` (this project's); nothing where it does not."""
    try:
        return f" (documented at {reverse('swagger-ui')})"
    except NoReverseMatch:
        return ""


def _hint(path: str, endpoints: list[str]) -> str:
    stripped = path.rstrip("/")
    if stripped != path and _is_endpoint(stripped):
        return f" Did you mean {stripped}? The API's paths have no trailing slash."
    for endpoint in endpoints:  # the right shape, the wrong kind of id
        if "<id>" in endpoint and re.fullmatch(
            re.escape(endpoint).replace(re.escape("<id>"), "[^/]+"), path
        ):
            return f" Did you mean {endpoint}? <id> is a whole number."
    prefix = _mount(endpoints)
    tails = {endpoint.removeprefix(prefix): endpoint for endpoint in endpoints}
    close = difflib.get_close_matches(path.removeprefix(prefix), tails, n=1, cutoff=0.75)
    return f" Did you mean {tails[close[0]]}?" if close else ""


def _mount(endpoints: list[str]) -> str:
    """Where the API is mounted: the folder its endpoints share (`/portfolio/` for ours)."""
    if not endpoints:
        return "/"
    shared = endpoints[0]
    for endpoint in endpoints[1:]:
        while not endpoint.startswith(shared):
            shared = shared[:-1]
    return shared.rsplit("/", 1)[0] + "/"


def _is_endpoint(path: str) -> bool:
    try:
        match = resolve(path)
    except Resolver404:
        return False
    return getattr(match.func, "cls", None) is not NotFoundView


def api_paths(path: str = "/") -> list[str]:
    """The API's paths as a client writes them (`/portfolio/sync/runs/<id>`,
    `/portfolio/accounts/<external_id>/history`): those of the include that `path` falls
    in (wherever the project mounted it), or of every include of the app's URLs."""
    mounts: dict[str, list[str]] = {}

    def walk(patterns, prefix: str, found: list[str]) -> None:
        for entry in patterns:
            route = prefix + str(entry.pattern).lstrip("^").rstrip("$")
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, route, found)
            elif getattr(entry.callback, "cls", None) is NotFoundView:
                # The app's catch-all: the routes found beside it are the app's.
                mounts.setdefault(prefix, []).extend(
                    r for r in found if r.startswith(prefix) and r != prefix
                )
            elif isinstance(entry, URLPattern) and not _kept_no_ledger(entry):
                found.append(route)

    walk(get_resolver().url_patterns, "", [])
    local = path.lstrip("/")
    mounts.pop("", None)  # a project's own catch-all at the root is no include of ours
    matching = [p for p in mounts if local.startswith(p)] or list(mounts)
    routes = {r for prefix in matching for r in mounts[prefix]}
    return sorted("/" + re.sub(r"<(?:\w+:)?(\w+)>", _placeholder, r) for r in routes)


def _kept_no_ledger(entry: URLPattern) -> bool:
    """A ledger endpoint of a kind the project keeps no ledger of: it answers 404 itself,
    so the 404's list of endpoints leaves it out."""
    view = getattr(entry.callback, "cls", None)
    is_ledger = isinstance(view, type) and issubclass(view, LedgerListView)
    return is_ledger and permissions.COVERED_BY[view.kind]() is None


def _placeholder(match: re.Match) -> str:
    return "<id>" if match[1] == "pk" else f"<{match[1]}>"
