"""The sync endpoint (`POST /portfolio/sync/ibkr`) and the sync history (read-only).

Thin edges over `services.sync_positions` and the `SyncRun` table; the error shape and
pagination are the portfolio API's, so every endpoint answers alike.
"""

import logging
import threading

from django.db import transaction
from django.db.models import QuerySet
from django.urls import reverse
from django.utils.decorators import method_decorator
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions as api_exceptions
from rest_framework import status
from rest_framework.authentication import SessionAuthentication
from rest_framework.generics import RetrieveAPIView
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from .. import connections, exceptions, throttle, visibility
from ..health import check_health
from ..models import SyncRun
from ..permissions import Kind, may_view
from ..services import queue_sync, queues, sync_positions
from ..sources import flex
from .base import PAGE_PARAMS, ReadOnlyListView, error_responses
from .errors import (
    ErrorEnvelopeMixin,
    ErrorSerializer,
    InvalidQuery,
    error_response,
    refuse_request_body,
    validated_query,
)
from .pagination import NewestFirstCursorPagination
from .permissions import CanViewModel
from .serializers import (
    HealthSerializer,
    SyncQueuedSerializer,
    SyncRequestSerializer,
    SyncResultSerializer,
    SyncRunDetailSerializer,
    SyncRunFilterSerializer,
    SyncRunSerializer,
)

# One HTTP status per failure, decided here only. Anything else is our own bug: 500.
ERROR_STATUS = {
    exceptions.InvalidAccountId: status.HTTP_400_BAD_REQUEST,
    exceptions.InvalidPeriod: status.HTTP_400_BAD_REQUEST,
    exceptions.ConnectionRequired: status.HTTP_400_BAD_REQUEST,
    exceptions.UnknownConnection: status.HTTP_404_NOT_FOUND,
    exceptions.ConnectionDisabled: status.HTTP_409_CONFLICT,
    exceptions.DatabaseUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    exceptions.UnknownAccount: status.HTTP_404_NOT_FOUND,
    exceptions.SyncAlreadyRunning: status.HTTP_409_CONFLICT,
    exceptions.GatewayTimeout: status.HTTP_504_GATEWAY_TIMEOUT,
    exceptions.GatewayUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    exceptions.GatewayError: status.HTTP_502_BAD_GATEWAY,
    # The Flex Web Service, as the gateway: unreachable or throttled 503, still generating
    # the statement 504, its refusal of the token or query and anything else 502; a token
    # no configured key decrypts is this server's configuration: 503.
    flex.FlexUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    flex.FlexThrottled: status.HTTP_503_SERVICE_UNAVAILABLE,
    flex.FlexTimeout: status.HTTP_504_GATEWAY_TIMEOUT,
    flex.FlexError: status.HTTP_502_BAD_GATEWAY,
    exceptions.SecretUnreadable: status.HTTP_503_SERVICE_UNAVAILABLE,
    # The task queue's broker did not take the sync (IBKR_SYNC_TASK_QUEUE).
    exceptions.QueueUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    # A caller's programming error (the sync called inside its transaction): a bug, as
    # any other 500; the command exits 1 for it likewise.
    exceptions.SyncInsideTransaction: status.HTTP_500_INTERNAL_SERVER_ERROR,
}


def status_for(error: exceptions.IbkrSyncError) -> int:
    return exceptions.lookup(ERROR_STATUS, error, status.HTTP_500_INTERNAL_SERVER_ERROR)


class InvalidAccountIdQuery(InvalidQuery):
    """`ibkr_account_id` given, but not as one IBKR account id: the service's own code."""

    default_code = exceptions.InvalidAccountId.code


class CanRunSync(BasePermission):
    message = "You do not have permission to run an IBKR sync (ibkr_sync.run_sync)."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return request.user.has_perm("ibkr_sync.run_sync")


class SyncRateThrottle(BaseThrottle):
    """At most IBKR_SYNC_THROTTLE_RATE syncs per user (e.g. 6/minute; none: no limit), from
    the one budget the admin's "Sync now" takes from too (`ibkr_sync.throttle`).

    Checked by the view once the request is known to start a sync (after authentication,
    permission and the query's checks): a request refused as invalid takes nothing.
    """

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: APIView) -> bool:
        self._wait = throttle.take(request.user)
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait


def _sync_error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


# The schema of every answer of the sync endpoint; the codes are those of exceptions.py.
SYNC_RESPONSES = {
    200: OpenApiResponse(
        SyncResultSerializer,
        description="The sync ran; counts and errors (the default: no task queue).",
    ),
    202: OpenApiResponse(
        SyncQueuedSerializer,
        description="With a task queue (IBKR_SYNC_TASK_QUEUE=celery): the sync was queued "
        "for a worker. Its run, at the Location header's URL, goes `queued`, `running`, then "
        "`success` or `failed` with the same codes and counts as the synchronous answer.",
    ),
    400: _sync_error(
        "ibkr_account_id is not one IBKR account id (invalid_account_id); several "
        "connections are configured and none was named (connection_required); or the "
        "request has an unknown query parameter, an empty or repeated connection, or a body "
        "(invalid_query); nothing was started."
    ),
    401: _sync_error(
        "No or invalid credentials, or credentials of another scheme than "
        "`Authorization: Token <key>` (not_authenticated, authentication_failed)."
    ),
    403: _sync_error("Lacks ibkr_sync.run_sync (permission_denied), or no CSRF token."),
    404: _sync_error(
        "No connection has that name, or none the user may sync: another user's connection "
        "answers the same (unknown_connection); or the gateway does not manage that account "
        "(unknown_account)."
    ),
    405: _sync_error("Anything but POST (method_not_allowed)."),
    409: _sync_error(
        "Another sync of the same connection is running (sync_already_running), or the "
        "connection named is disabled (connection_disabled)."
    ),
    429: _sync_error(
        "Too many syncs by this user: more than IBKR_SYNC_THROTTLE_RATE (throttled). The "
        "Retry-After header says in how many seconds to try again."
    ),
    502: _sync_error(
        "The gateway refused the client id (client_id_in_use), sent something unreadable "
        "(incomplete_snapshot) or rejected the request (gateway_error)."
    ),
    500: _sync_error("An unexpected error of the server; nothing was changed (internal_error)."),
    503: _sync_error(
        "TWS / IB Gateway unreachable, refused, or dropped (gateway_unavailable), something "
        "else answering at its address (not_a_gateway), the database did not answer "
        "(database_unavailable), or the task queue did not take the sync "
        "(queue_unavailable)."
    ),
    504: _sync_error("No complete answer within the timeouts (gateway_timeout)."),
}


@method_decorator(transaction.non_atomic_requests, name="dispatch")
class IbkrSyncView(ErrorEnvelopeMixin, APIView):
    """Sync positions from the IB gateway; `?ibkr_account_id=U1234567` limits it to one
    account, `?connection=NAME` names the connection to sync."""

    permission_classes = [IsAuthenticated, CanRunSync]
    # Not DRF's throttling step, which comes before the request is validated: `post` takes
    # from the budget once the request is known to start a sync.
    throttle_classes: list = []
    sync_throttles = [SyncRateThrottle]

    def throttled(self, request: Request, wait: float | None) -> None:
        raise api_exceptions.Throttled(
            wait,
            detail=f"Too many syncs: at most {throttle.rate().text} per user "
            "(IBKR_SYNC_THROTTLE_RATE), through the API and the admin together.",
        )

    @extend_schema(
        tags=["sync"],
        summary="Sync positions from IBKR",
        description="Reads every position from the running TWS / IB Gateway and brings the "
        "database in line, all or nothing. Needs `ibkr_sync.run_sync`. By default the sync "
        "runs in the request (200); with a task queue (IBKR_SYNC_TASK_QUEUE=celery) it is "
        "queued for a worker (202, its run at the Location header's URL).",
        parameters=[
            OpenApiParameter(
                "connection",
                str,
                description="The connection to sync, by name (as `manage.py ibkr_connection "
                "list` shows it). Optional with one connection, or none (then the gateway of "
                "IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID); required with several.",
            ),
            OpenApiParameter(
                "ibkr_account_id",
                str,
                description="Sync (read and reconcile) only this account, e.g. U1234567.",
            ),
            OpenApiParameter(
                "Location",
                str,
                location=OpenApiParameter.HEADER,
                response=[202],
                description="The queued sync's run: GET it for its status and outcome.",
            ),
            OpenApiParameter(
                "Retry-After",
                int,
                location=OpenApiParameter.HEADER,
                response=[429],
                description="Seconds until this user's next sync is accepted.",
            ),
        ],
        request=None,
        responses=SYNC_RESPONSES,
    )
    def post(self, request: Request) -> Response:
        # As strict as the read API: a misspelt or misplaced parameter would otherwise
        # be ignored and sync every account. Nothing starts until the request is right.
        refuse_request_body(request, hint="e.g. POST /portfolio/sync/ibkr?ibkr_account_id=U1234567")
        params = validated_query(
            request, SyncRequestSerializer, allowed=("connection",), invalid=InvalidAccountIdQuery
        )
        try:
            # Which connection, before the budget is taken: a name that is wrong is the
            # caller's input, refused as such (nothing started, nothing recorded); another
            # owner's connection answers as a name no connection has.
            target = connections.resolve(_connection_param(request), user=request.user)
        except exceptions.IbkrSyncError as exc:
            return error_response(status_for(exc), exc.code, str(exc))
        for budget in (cls() for cls in self.sync_throttles):
            if not budget.allow_request(request, self):
                self.throttled(request, budget.wait())
        if queues():
            return self._queue(request, params.get("ibkr_account_id"), target)
        try:
            result = sync_positions(
                params.get("ibkr_account_id"),
                trigger=SyncRun.Trigger.API,
                user=request.user,
                connection=target.connection,
            )
        except exceptions.IbkrSyncError as exc:
            return error_response(status_for(exc), exc.code, str(exc))
        answer = SyncResultSerializer(result, context={"request": request}).data
        return Response(answer, status=status.HTTP_200_OK)

    def _queue(self, request: Request, account_id: str | None, target) -> Response:
        """IBKR_SYNC_TASK_QUEUE: the sync is queued; 202 and where its run is."""
        try:
            run = queue_sync(
                account_id,
                trigger=SyncRun.Trigger.API,
                user=request.user,
                connection=target.connection,
            )
        except exceptions.IbkrSyncError as exc:
            return error_response(status_for(exc), exc.code, str(exc))
        url = request.build_absolute_uri(reverse("ibkr_sync:sync-run", kwargs={"pk": run.pk}))
        answer = SyncQueuedSerializer(
            {"sync_run_id": run.pk, "connection": target.connection and target.name, "url": url}
        ).data
        return Response(answer, status=status.HTTP_202_ACCEPTED, headers={"Location": url})


def _connection_param(request: Request) -> str | None:
    """`?connection=NAME`: at most once, never empty; None when not given."""
    given = request.query_params.getlist("connection")
    if not given:
        return None
    if len(given) > 1:
        raise InvalidQuery(
            "connection was given more than once; give one connection's name, e.g. "
            "?connection=home."
        )
    if not given[0]:
        raise InvalidQuery(
            "connection is empty: give a connection's name (e.g. ?connection=home), or "
            "leave the parameter out when only one connection, or none, is configured."
        )
    return given[0]


# --- sync history ---------------------------------------------------------------------------
# Reading it needs `ibkr_sync.view_syncrun`, the permission that shows the history in the
# admin: error messages name the gateway's address, which plain position readers need not see.


@extend_schema(
    tags=["sync"],
    summary="List sync runs",
    description="Every sync attempt, newest first, failed ones included: of the settings' "
    "gateway and of the connections the user may see (their own, those without an owner; "
    "all with `ibkr_sync.view_all_connections`). Needs `ibkr_sync.view_syncrun`.",
    parameters=[SyncRunFilterSerializer],
    responses={200: SyncRunSerializer(many=True), **error_responses(400, 401, 403, 405)},
)
class SyncRunListView(ReadOnlyListView):
    pagination_class = NewestFirstCursorPagination
    serializer_class = SyncRunSerializer

    def get_queryset(self) -> QuerySet[SyncRun]:
        return visibility.visible_runs(SyncRun.objects.select_related("user"), self.request.user)

    def filter_queryset(self, queryset: QuerySet[SyncRun]) -> QuerySet[SyncRun]:
        filters = validated_query(self.request, SyncRunFilterSerializer, allowed=PAGE_PARAMS)
        return queryset.filter(**filters)


@extend_schema(
    tags=["sync"],
    summary="One sync run",
    description="A sync attempt with the positions it could not store and why. "
    "Needs `ibkr_sync.view_syncrun`.",
    responses={200: SyncRunDetailSerializer, **error_responses(401, 403, 404, 405)},
)
class SyncRunDetailView(ErrorEnvelopeMixin, RetrieveAPIView):
    permission_classes = [IsAuthenticated, CanViewModel]
    serializer_class = SyncRunDetailSerializer

    def get_queryset(self) -> QuerySet[SyncRun]:
        # Another owner's run: 404, as a run that does not exist.
        return visibility.visible_runs(SyncRun.objects.select_related("user"), self.request.user)


# --- health ---------------------------------------------------------------------------------

health_logger = logging.getLogger("ibkr_sync.health")
# This process's last answer per kind of probe (with or without ?gateway=1): a monitor
# asks every few seconds, and the log says when the answer changes, not every time.
_last_health: dict[bool, bool] = {}
_last_health_lock = threading.Lock()


def _log_health(gateway: bool, healthy: bool, report: dict) -> None:
    with _last_health_lock:
        previous = _last_health.get(gateway)
        _last_health[gateway] = healthy
    if healthy:
        if previous is False:
            health_logger.info("Health check healthy again")
        return
    failing = [
        ", ".join(
            f"{name}={check['status']}"
            for name, check in report["checks"].items()
            if check["status"] != "ok"
        )
    ]
    # Each unhealthy connection, by its id: `connection 2: last_sync=unreachable`.
    for entry in report.get("connections", ()):
        if entry["status"] in ("ok", "disabled"):
            continue
        checks = ", ".join(
            f"{name}={entry[name]['status']}"
            for name in ("last_sync", "sync_lock", "gateway")
            if name in entry and entry[name]["status"] != "ok"
        )
        failing.append(f"connection {entry['id']}: {checks}")
    failing = "; ".join(part for part in failing if part)
    level = logging.INFO if previous is False else logging.WARNING  # once when it turns
    health_logger.log(level, "Health check unhealthy: %s", failing)


class _AdminSessionIfAny(SessionAuthentication):
    """The admin's session, if the caller has one; never refuses a request (a health check
    answers everyone, whatever it sends: a bad token is not even read)."""

    def authenticate(self, request: Request):
        try:
            return super().authenticate(request)
        except api_exceptions.AuthenticationFailed:
            return None


def _names_shown(request: Request) -> bool | frozenset[int]:
    """Which connections the answer names: only to a staff user, logged in to the admin,
    who may view sync runs, and of those only the connections they may see
    (`visibility`: their own, unowned ones; all with `view_all_connections`). A name may
    tell who uses the installation; everyone else reads ids."""
    user = request.user
    if not (user.is_authenticated and user.is_staff and may_view(user, Kind.SYNC_RUNS)):
        return False
    if visibility.sees_all(user):
        return True
    return frozenset(visibility.visible_connections(user).values_list("pk", flat=True))


class HealthView(APIView):
    """`GET /healthz` for load balancers and monitoring: no login, nothing sensitive."""

    # Only to tell a staff user (who may read connections' names) from everyone else.
    authentication_classes = [_AdminSessionIfAny]
    permission_classes = [AllowAny]

    @extend_schema(
        tags=["operations"],
        summary="Health check",
        description="200 when the database answers and the last sync succeeded less than "
        "IBKR_SYNC_MAX_AGE seconds ago; 503 otherwise. `?gateway=1` also tries a TCP "
        "connection to TWS / IB Gateway (no API session). With connections, "
        "`connections` lists each one's state by id (named only to a staff user, logged "
        "in to the admin, who may view sync runs, and only the connections that user may "
        "see), and the answer is 503 when any enabled connection is unhealthy. With a task "
        "queue (IBKR_SYNC_TASK_QUEUE), `checks.queue`: the broker reachable, a worker seen "
        "recently, the oldest queued sync's age; 503 when it is not ok. No authentication.",
        parameters=[
            OpenApiParameter(
                "gateway",
                bool,
                description="Also check that the gateway's port (each enabled connection's) "
                "accepts.",
            )
        ],
        responses={200: HealthSerializer, 503: HealthSerializer},
        auth=[],
    )
    def get(self, request: Request) -> Response:
        wanted = request.query_params.get("gateway", "").lower() in {"1", "true", "yes"}
        healthy, report = check_health(gateway=wanted, names=_names_shown(request))
        response = Response(
            HealthSerializer(report).data,
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Cache-Control"] = "no-store"
        # A 503 here is an answer, not a failure of the server: logged by _log_health (a
        # warning when it turns unhealthy), not as an ERROR on every probe by Django.
        _log_health(wanted, healthy, report)
        response._has_been_logged = True
        return response
