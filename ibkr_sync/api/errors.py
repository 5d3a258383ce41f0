"""One error shape for every API answer that is not a success."""

import logging
import re
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import SuspiciousOperation
from django.http import Http404, QueryDict
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import (
    SessionAuthentication,
    TokenAuthentication,
    get_authorization_header,
)
from rest_framework.exceptions import APIException
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from ..database import DATABASE_UNAVAILABLE, is_unavailable, unavailable_message

logger = logging.getLogger("django.request")

_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9_.+-]{0,19}")


class InvalidQuery(APIException):
    """A query parameter (filter, page size, cursor) that cannot be used as given."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_query"
    default_detail = "Invalid query parameter."


def error_body(code: str, detail: str) -> dict[str, str]:
    return {"status": "error", "code": code, "detail": detail}


def error_response(http_status: int, code: str, detail: str) -> Response:
    return Response(error_body(code, detail), status=http_status)


def flatten(detail: Any) -> str:
    """A validation error's nested messages as one sentence naming each parameter."""
    if isinstance(detail, dict):
        parts = []
        for name, messages in detail.items():
            text = flatten(messages)
            named = name == "non_field_errors" or text.startswith(f"{name} ")
            parts.append(text if named else f"{name}: {text}")
        return " ".join(parts)
    if isinstance(detail, list | tuple):
        return " ".join(flatten(item) for item in detail)
    return str(detail)


def other_scheme(request: Request) -> str | None:
    """Why the request's Authorization header is not this API's (`Token <key>`), or None.

    Token authentication passes over any other scheme (`Bearer`, `Basic`, `JWT`), so a
    caller who sent one would otherwise hear that no credentials were provided, and look
    for the fault in the token. The scheme is compared as DRF compares it, without
    regard to case (`token` is taken). It is named only if it looks like a scheme: a
    bare key sent alone is not echoed.
    """
    header = get_authorization_header(request).split()
    keyword = TokenAuthentication.keyword
    if not header or header[0].lower() == keyword.lower().encode():
        return None
    if len(header) > 1 and _SCHEME.fullmatch(header[0]):
        given = f"not the {header[0].decode()!r} scheme"
    else:
        given = "not this header, which names no scheme"
    return (
        f"This API takes `Authorization: {keyword} <key>`, {given}; nothing was done. "
        "A user's key is made with `manage.py drf_create_token <username>`."
    )


class ErrorEnvelopeMixin:
    """Answer every error in one shape: authentication, permission, method, not found,
    input, a database that is unavailable (503, wherever in the request it fails: the
    token or session lookup, the permission check, the query), and (as a 500 that gives
    nothing away) the server's own unexpected errors.

    It also carries the API's own policy, so that it holds in a host project whatever
    that project's REST_FRAMEWORK setting says (and changes none of the host's views):
    token then session authentication (an anonymous caller gets 401 with
    `WWW-Authenticate: Token`, and one who sent credentials of another scheme a 401 that
    names the one it takes), JSON answers only, and no request bodies parsed."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]
    renderer_classes = [JSONRenderer]
    parser_classes = [JSONParser, FormParser, MultiPartParser]

    def permission_denied(self, request: Request, message=None, code=None) -> None:
        # Only a caller that no authenticator took: a browser session behind a proxy's
        # HTTP Basic login (which sends `Authorization: Basic` with every request) passes.
        if request.authenticators and not request.successful_authenticator:
            reason = other_scheme(request)
            if reason is not None:
                raise exceptions.AuthenticationFailed(reason)
        super().permission_denied(request, message, code)

    def handle_exception(self, exc: Exception) -> Response:
        if is_unavailable(exc):
            return self._database_unavailable(exc)
        # Django's own exceptions, as DRF's exception handler converts them.
        if isinstance(exc, Http404):
            exc = exceptions.NotFound(*exc.args)
        elif isinstance(exc, DjangoPermissionDenied):
            exc = exceptions.PermissionDenied(*exc.args)
        elif not isinstance(exc, APIException):
            # Logged with its traceback as Django logs a failed request; the caller gets
            # JSON like every other answer, without internals.
            logger.error(
                "Internal Server Error: %s",
                self.request.path,
                exc_info=exc,
                extra={"status_code": 500, "request": self.request},
            )
            response = error_response(
                status.HTTP_500_INTERNAL_SERVER_ERROR,
                "internal_error",
                "The server failed on an unexpected error; nothing was changed. "
                "The error is logged for its administrator.",
            )
            response._has_been_logged = True  # once, with the traceback, not twice
            return response
        response = super().handle_exception(exc)
        if isinstance(exc, APIException) and response is not None:
            codes = exc.get_codes()
            code = codes if isinstance(codes, str) else exc.default_code
            response.data = error_body(code, flatten(exc.detail))
        return response

    def _database_unavailable(self, exc: Exception) -> Response:
        # Not a bug: one line for the operator with the driver's reason, no traceback.
        logger.error(
            "Service Unavailable: %s: database unavailable: %s: %s",
            self.request.path,
            type(exc).__name__,
            str(exc).strip().replace("\n", " "),
            extra={"status_code": 503, "request": self.request},
        )
        response = error_response(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            DATABASE_UNAVAILABLE,
            unavailable_message(exc, outcome="the request was not carried out"),
        )
        response._has_been_logged = True
        return response


def _names(names) -> str:
    return ", ".join(name if name.isidentifier() else repr(name) for name in sorted(names))


def validated_query(
    request: Request,
    serializer_class: type,
    *,
    allowed: tuple[str, ...] = (),
    invalid: type[APIException] = InvalidQuery,
):
    """The query parameters, checked by `serializer_class`; unknown names are an error.

    A misspelt filter (`?sectype=STK`) would otherwise be ignored and silently return
    everything, which is worse than an error. An unknown name is `InvalidQuery`; a value
    the serializer refuses raises `invalid` (InvalidQuery unless the endpoint has a code
    of its own for it).
    """
    known = {*serializer_class().fields, *allowed}
    unknown = set(request.query_params) - known
    if unknown:
        raise InvalidQuery(
            f"Unknown query parameter(s): {_names(unknown)}. Known: {_names(known)}."
        )
    params = serializer_class(data=request.query_params)
    if not params.is_valid():
        raise invalid(flatten(params.errors))
    return params.validated_data


def refuse_request_body(request: Request, *, hint: str = "") -> None:
    """For an endpoint whose parameters are all in the query string: any request body is
    an error, naming the fields it holds (a form's, a JSON object's keys), since whatever
    was put there would otherwise be silently ignored. An empty form (no field, no file:
    what an HTML form without inputs and Django's test client send) is no body."""
    if not _has_body(request):
        return
    try:
        data = request.data
    except (APIException, SuspiciousOperation):  # unparseable, unsupported, too big
        data = None
    if isinstance(data, QueryDict) and not data:  # DRF's form data holds its files too
        return
    names = list(data)[:10] if isinstance(data, Mapping) else []
    got = f"a request body with {_names(str(n)[:40] for n in names)}" if names else "a request body"
    raise InvalidQuery(
        f"This endpoint takes no request body, got {got}: its parameters go in the query "
        f"string.{' ' + hint if hint else ''}"
    )


def _has_body(request: Request) -> bool:
    meta = request.META
    if "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    try:
        return int(meta.get("CONTENT_LENGTH") or 0) > 0
    except ValueError:
        return True  # something was sent, with a length that is not one


class ErrorSerializer(serializers.Serializer):
    """Documents the error shape in the OpenAPI schema."""

    status = serializers.ChoiceField(choices=["error"])
    code = serializers.CharField(help_text="Stable machine-readable reason, e.g. invalid_query.")
    detail = serializers.CharField(help_text="What went wrong, for the person reading it.")
