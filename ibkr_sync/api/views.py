"""`POST /portfolio/sync/ibkr`: a thin edge over `services.sync_positions`."""

from django.db import transaction
from django.utils.decorators import method_decorator
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import exceptions
from ..models import SyncRun
from ..services import sync_positions
from .serializers import SyncRequestSerializer, SyncResultSerializer

# One HTTP status per failure, decided here only. Anything else is our own bug: 500.
ERROR_STATUS = {
    exceptions.InvalidAccountId: status.HTTP_400_BAD_REQUEST,
    exceptions.UnknownAccount: status.HTTP_404_NOT_FOUND,
    exceptions.SyncAlreadyRunning: status.HTTP_409_CONFLICT,
    exceptions.GatewayTimeout: status.HTTP_504_GATEWAY_TIMEOUT,
    exceptions.GatewayUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    exceptions.GatewayError: status.HTTP_502_BAD_GATEWAY,
}


def status_for(error: exceptions.IbkrSyncError) -> int:
    return exceptions.lookup(ERROR_STATUS, error, status.HTTP_500_INTERNAL_SERVER_ERROR)


class CanRunSync(BasePermission):
    message = "You do not have permission to run an IBKR sync (ibkr_sync.run_sync)."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return request.user.has_perm("ibkr_sync.run_sync")


def error_response(http_status: int, code: str, detail: str) -> Response:
    return Response({"status": "error", "code": code, "detail": detail}, status=http_status)


@method_decorator(transaction.non_atomic_requests, name="dispatch")
class IbkrSyncView(APIView):
    """Sync positions from the IB gateway; `?ibkr_account_id=U1234567` limits it to one."""

    permission_classes = [IsAuthenticated, CanRunSync]

    def post(self, request: Request) -> Response:
        # A plain dict, not the QueryDict: DRF treats a blank form/query value of an
        # optional field as omitted, which would turn `?ibkr_account_id=` into "sync all".
        if len(request.query_params.getlist("ibkr_account_id")) > 1:
            return error_response(
                400,
                exceptions.InvalidAccountId.code,
                "ibkr_account_id was given more than once; give one account id, or none "
                "to sync every account.",
            )
        params = SyncRequestSerializer(data=request.query_params.dict())
        if not params.is_valid():
            detail = " ".join(str(m) for messages in params.errors.values() for m in messages)
            return error_response(400, exceptions.InvalidAccountId.code, detail)
        try:
            result = sync_positions(
                params.validated_data.get("ibkr_account_id"),
                trigger=SyncRun.Trigger.API,
                user=request.user,
            )
        except exceptions.IbkrSyncError as exc:
            return error_response(status_for(exc), exc.code, str(exc))
        return Response(SyncResultSerializer(result).data, status=status.HTTP_200_OK)

    def handle_exception(self, exc: Exception) -> Response:
        # Keep one error shape for every failure: auth, permission, method, parsing.
        response = super().handle_exception(exc)
        if isinstance(exc, APIException) and response is not None:
            codes = exc.get_codes()
            code = codes if isinstance(codes, str) else exc.default_code
            detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
            response.data = {"status": "error", "code": code, "detail": str(detail)}
        return response
