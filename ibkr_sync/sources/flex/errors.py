"""The Flex Web Service's error codes, what each means for a request, and our exceptions.

Which codes are waited out, which retried and which end a request at once is decided
here and nowhere else; each message names what the person who reads it must do. No
message ever holds the token (the client scrubs every text it did not write itself).

IBKR's codes (Flex Web Service version 3):

- 1019 "Statement generation in progress": the normal answer while IBKR generates a
  statement; polled again, with back-off, for a bounded total time.
- 1018 "Too many requests have been made from this token" (IBKR allows one request a
  second and ten a minute per token): waited out, at least 10 s, and the client slows
  down for the rest of its requests.
- 1001, 1004-1009, 1021: IBKR could not generate or return the statement for now
  ("please try again shortly"): retried with back-off, a bounded number of times.
- 1003, 1010-1017, 1020, and any code not listed: fail at once.
"""

from __future__ import annotations

from typing import Final

from ...exceptions import IbkrSyncError

IN_PROGRESS: Final = 1019
TOO_MANY_REQUESTS: Final = 1018
RETRYABLE: Final = frozenset({1001, 1004, 1005, 1006, 1007, 1008, 1009, 1021})

_WHERE: Final = "Client Portal (Performance & Reports > Flex Queries > Flex Web Service)"
#: What the user must do, per code that fails at once.
ADVICE: Final = {
    1003: "the statement is not available for that period: check that the query is an "
    "Activity Flex Query and that the dates lie within the account's history",
    1010: "legacy Flex Queries are no longer supported: create an Activity Flex Query in "
    "Client Portal and use its query id",
    1011: f"the Flex Web Service is not active for this account: activate it in {_WHERE}",
    1012: f"the Flex token has expired: generate a new one in {_WHERE} and save it on "
    "the connection",
    1013: "the Flex token is restricted to another IP address: generate a token without "
    f"the restriction, or one for this server's address, in {_WHERE}",
    1014: "the query id is invalid: use the number Client Portal shows beside the Flex "
    "Query (Performance & Reports > Flex Queries)",
    1015: f"the Flex token is invalid: copy it again from {_WHERE}, or generate a new one",
    1016: "the account is invalid: the token's user cannot read the query's accounts",
    1017: "IBKR no longer knows the statement requested (its reference code expired): sync again",
    1020: "IBKR could not validate the request: check the token and the query id; if "
    "both are right, sync again later",
}


class FlexError(IbkrSyncError):
    """The Flex Web Service did not give a usable statement. `flex_code` is IBKR's
    error code, when it sent one."""

    code = "flex_error"

    def __init__(self, message: str, *, flex_code: int | None = None) -> None:
        super().__init__(message)
        self.flex_code = flex_code


class FlexAuthError(FlexError):
    """The token cannot be used: expired, invalid, restricted to another address, or the
    service is inactive (1011, 1012, 1013, 1015)."""

    code = "flex_token_rejected"


class FlexQueryError(FlexError):
    """The query cannot be run: invalid, legacy, or for accounts the token cannot read
    (1003, 1010, 1014, 1016)."""

    code = "flex_query_rejected"


class FlexThrottled(FlexError):
    """IBKR kept refusing requests on this token for too many (1018), past our waits."""

    code = "flex_throttled"


class FlexTimeout(FlexError):
    """IBKR was still generating the statement (1019) when our time for it ran out."""

    code = "flex_timeout"


class FlexUnavailable(FlexError):
    """The service could not be reached, timed out, or kept failing (an HTTP error, a
    truncated answer, a retryable code) past our retries."""

    code = "flex_unavailable"


class FlexFormatError(FlexError):
    """An answer that is not what the Flex Web Service sends: not XML, truncated, not a
    statement, or XML a statement never has (a DTD, entities). Nothing of it is used."""

    code = "flex_format_error"


_CLASSES: Final = {
    1003: FlexQueryError,
    1010: FlexQueryError,
    1011: FlexAuthError,
    1012: FlexAuthError,
    1013: FlexAuthError,
    1014: FlexQueryError,
    1015: FlexAuthError,
    1016: FlexQueryError,
}


def error_for(code: int | None, ibkr_message: str) -> FlexError:
    """The exception for an error code that ends a request: what IBKR said, and what to
    do about it."""
    said = (
        f"IBKR's Flex Web Service answered {code}"
        if code is not None
        else ("IBKR's Flex Web Service answered an error without a code")
    )
    if ibkr_message:
        said += f" ({ibkr_message.strip()[:200]})"
    advice = ADVICE.get(code) if code is not None else None
    if advice is None:
        advice = (
            "an answer this client does not know: check the connection's token and "
            "query id in Client Portal, and report the code if it persists"
        )
    if code == TOO_MANY_REQUESTS:
        return FlexThrottled(
            f"{said}: too many requests on this token; sync less often", flex_code=code
        )
    if code == IN_PROGRESS:
        return FlexTimeout(
            f"{said}: the statement is still being generated; sync again later", flex_code=code
        )
    if code in RETRYABLE:
        return FlexUnavailable(
            f"{said}: IBKR could not produce the statement now; sync again later", flex_code=code
        )
    return _CLASSES.get(code, FlexError)(f"{said}: {advice}", flex_code=code)
