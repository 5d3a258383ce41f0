"""Our client of IBKR's Flex Web Service, version 3 (standard library HTTP).

The protocol is two GETs. `{base}/SendRequest?t=TOKEN&q=QUERY_ID&v=3&fd=YYYYMMDD&td=YYYYMMDD`
asks IBKR to generate a statement and answers a `<FlexStatementResponse>`: Status
`Success` with a `ReferenceCode` and the `Url` to fetch it from, or `Fail` with an
`ErrorCode` and `ErrorMessage`. Then `{Url}?t=TOKEN&q=REFERENCE_CODE&v=3` answers the
statement (`<FlexQueryResponse>`), or an error answer while it is not ready (1019).

What this client promises:

- Explicit periods: every request names `fd` and `td` (never the query's saved period),
  at most 365 days; `downloads()` splits a longer range into windows, oldest first.
- The User-Agent IBKR requires for programmatic access ("Technology/Version"):
  `django-ibkr-sync/<version> Python/<version>`.
- A connect timeout and a read timeout (each read of the socket), separately; and, as
  an answer that keeps coming a few bytes at a time never trips a read timeout, a bound
  on each whole answer: it must arrive within `download_budget` seconds and be no larger
  than `max_statement_bytes` (an answer past either is refused, not retried: it would
  be as long again).
- The statement is fetched from the host SendRequest names (its `Url`, followed only to
  an `https` host of interactivebrokers.com or the base URL's own host: the token goes
  with the request), and from the base URL's host when that one cannot be reached.
- Error codes as `errors.py` decides: 1019 polled with back-off for a bounded total
  time, 1018 waited out (at least 10 s) and every later request spaced further apart,
  1001 / 1004-1009 / 1021 and transport failures retried a bounded number of times,
  everything else raised at once with what to do.
- One exchange at a time per token in a process: a lock keyed by a hash of the token,
  held from SendRequest to the statement. `gate` is the hook for the same across
  processes: a function of that key returning a context manager (the database's:
  `ibkr_sync.token_gate`), entered inside the process lock; what it gives may have
  `renew()` (called before each request) and `throttled(seconds)` (after a 1018, so
  that other processes wait it out too).
- The token is never written anywhere: not in a log line (paths are logged without their
  query), an exception message, or the client's repr; texts from elsewhere are scrubbed.
- Sleeping and the clock are parameters (`sleep`, `clock`), so back-off can be tested
  instantly; the HTTP is always real.
- A statement is spooled to a temporary file as it arrives (bounded memory) and checked
  to end as a statement ends; a truncated one is fetched again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.client
import logging
import platform
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any, Final
from urllib.parse import urlencode, urlsplit

import defusedxml.ElementTree as SafeElementTree
from defusedxml import DefusedXmlException
from django.views.decorators.debug import sensitive_variables

from . import errors
from .errors import FlexError, FlexFormatError, FlexThrottled, FlexTimeout, FlexUnavailable
from .records import FlexResponse

logger = logging.getLogger("ibkr_sync.flex")

#: IBKR's documented address of the service (requests go to `{base}/SendRequest` and
#: `{base}/GetStatement`).
DEFAULT_BASE_URL: Final = "https://ndcdyn.interactivebrokers.com/AccountManagement/FlexWebService"
#: The longest period one request may ask for, in days (both ends included).
MAX_DAYS: Final = 365
_TRUSTED_HOST: Final = re.compile(r"(?:^|\.)interactivebrokers\.com$")
_FIRST_TAG: Final = re.compile(rb"<([A-Za-z_][\w.\-]*)")
_STATEMENT_END: Final = b"</FlexQueryResponse>"
_SMALL_ANSWER: Final = 1 << 20  # an acknowledgement or an error: never near this
_CHUNK: Final = 1 << 16


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("django-ibkr-sync")
    except Exception:  # a source checkout: not installed
        return "dev"


USER_AGENT: Final = f"django-ibkr-sync/{_version()} Python/{platform.python_version()}"


@dataclass(frozen=True)
class RetryPolicy:
    """How long the client waits, and how often it tries again (seconds)."""

    first_poll: float = 2.0  # after SendRequest, before the first GetStatement
    poll_interval: float = 2.0  # 1019: the first wait, growing by poll_backoff
    poll_backoff: float = 1.5
    max_poll_interval: float = 30.0
    poll_budget: float = 600.0  # 1019: the most time spent waiting for one statement
    retries: int = 4  # retryable codes and transport failures, per request
    retry_delay: float = 5.0  # doubled at each retry
    max_retry_delay: float = 60.0
    throttle_delay: float = 10.0  # 1018: at least this; doubled at each 1018
    max_throttle_delay: float = 120.0
    throttles: int = 5  # 1018s in a row before giving up
    min_interval: float = 1.0  # between two requests of this client (IBKR: 1 a second)
    download_budget: float = 3600.0  # the most time one answer's body may take to arrive
    max_statement_bytes: int = 4 << 30  # the largest statement taken (spooled to disk)


@dataclass
class Download:
    """A statement as downloaded: its period, IBKR's reference code, the XML (a spooled
    temporary file, at its start). Close it (or use it as a context manager)."""

    from_date: dt.date
    to_date: dt.date
    reference_code: str
    body: IO[bytes]
    size: int = 0

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transient(Exception):
    """A failure of one request that another may not have: a connection refused or
    reset, a timeout, an HTTP 5xx, a truncated body. Its text never holds the token."""


class _Unreached(_Transient):
    """A transient failure before any answer: no connection, or none that answered."""


class _Unresolvable(_Unreached):
    """The host name does not exist: asking again later finds the same, so it is not
    retried (another URL of the exchange, if any, still is tried)."""


@dataclass
class _Answer:
    root: str
    fields: dict[str, str] = field(default_factory=dict)
    body: IO[bytes] | None = None
    size: int = 0


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def token_key(token: str) -> str:
    """The name a token is known by (locks, gates, logs): a hash, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _token_lock(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def windows(from_date: dt.date, to_date: dt.date) -> list[tuple[dt.date, dt.date]]:
    """`from_date`..`to_date` (both included) as consecutive periods of at most MAX_DAYS
    days, oldest first."""
    if to_date < from_date:
        raise ValueError(f"the period ends ({to_date}) before it begins ({from_date})")
    result = []
    start = from_date
    while start <= to_date:
        end = min(to_date, start + dt.timedelta(days=MAX_DAYS - 1))
        result.append((start, end))
        start = end + dt.timedelta(days=1)
    return result


class FlexClient:
    """One token's client. `base_url` is the service's address (IBKR's by default; the
    setting `IBKR_FLEX_BASE_URL` names it, tests point it at a fake service)."""

    # The token, in this frame and those of each request (their `params`), is hidden from
    # the error reports Django makes of an unexpected failure (each frame's variables).
    @sensitive_variables("token")
    def __init__(
        self,
        token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        gate: Callable[[str], AbstractContextManager[Any]] | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        if not token or not token.strip():
            raise FlexError("the Flex token is empty: generate one in Client Portal")
        parts = _split(base_url)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise FlexError(f"the Flex base URL {base_url!r} is not an http(s) URL")
        self._token = token.strip()
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.clock = clock
        self.gate = gate
        self.user_agent = user_agent
        self.key = token_key(self._token)
        self._interval = self.policy.min_interval
        self._last_request: float | None = None
        self._held: Any = None  # the gate's hold during an exchange

    def __repr__(self) -> str:
        return f"FlexClient(base_url={self.base_url!r}, token=<hidden>)"

    # --- the public calls ---

    def fetch(self, query_id: str, from_date: dt.date, to_date: dt.date) -> FlexResponse:
        """One window's statement, parsed (see `download`)."""
        from .parser import parse_flex

        with self.download(query_id, from_date, to_date) as download:
            return parse_flex(download.body, period=(from_date, to_date))

    def downloads(self, query_id: str, from_date: dt.date, to_date: dt.date) -> Iterator[Download]:
        """The statements of a range of any length: one request per window of at most
        365 days, oldest first, each downloaded when the previous one was taken."""
        for start, end in windows(from_date, to_date):
            yield self.download(query_id, start, end)

    def download(self, query_id: str, from_date: dt.date, to_date: dt.date) -> Download:
        """The statement of `from_date`..`to_date` (at most 365 days), downloaded."""
        if windows(from_date, to_date) != [(from_date, to_date)]:
            raise ValueError(
                f"{from_date}..{to_date} is longer than {MAX_DAYS} days: use downloads()"
            )
        query_id = str(query_id).strip()
        gate = self.gate(self.key) if self.gate is not None else contextlib.nullcontext()
        with _token_lock(self.key), gate as held:
            self._held = held
            try:
                logger.info("Flex: requesting query %s for %s to %s", query_id, from_date, to_date)
                reference, url = self._send_request(query_id, from_date, to_date)
                answer = self._get_statement(reference, url)
            finally:
                self._held = None
        assert answer.body is not None
        return Download(from_date, to_date, reference, answer.body, answer.size)

    # --- the two steps ---

    @sensitive_variables("params")
    def _send_request(self, query_id: str, from_date: dt.date, to_date: dt.date) -> tuple[str, str]:
        params = {
            "t": self._token,
            "q": query_id,
            "v": "3",
            "fd": from_date.strftime("%Y%m%d"),
            "td": to_date.strftime("%Y%m%d"),
        }
        retry = _Retry(self)
        while True:
            try:
                answer = self._get(f"{self.base_url}/SendRequest", params)
            except _Transient as reason:
                retry.transient(reason)
                continue
            if answer.root != "FlexStatementResponse":
                raise FlexFormatError(
                    f"SendRequest answered a <{answer.root}>, not a <FlexStatementResponse>: "
                    "check the Flex base URL"
                )
            if answer.fields.get("status", "").lower() == "success" and answer.fields.get(
                "referencecode"
            ):
                return answer.fields["referencecode"], answer.fields.get("url", "")
            code = retry.code(answer.fields)
            if code == errors.IN_PROGRESS:  # not expected here; waited like a retry
                retry.retryable(code, "in progress")

    @sensitive_variables("params")
    def _get_statement(self, reference: str, url: str) -> _Answer:
        params = {"t": self._token, "q": reference, "v": "3"}
        base = f"{self.base_url}/GetStatement"
        urls = [u for u in (self._followed(url), base) if u]
        urls = list(dict.fromkeys(urls))
        deadline = self.clock() + self.policy.poll_budget
        wait = self.policy.poll_interval
        self.sleep(self.policy.first_poll)
        retry = _Retry(self)
        while True:
            try:
                answer = self._get(urls[0], params)
            except _Transient as reason:
                if len(urls) > 1:
                    logger.warning(
                        "Flex: %s could not be reached (%s); fetching from %s instead",
                        _shown_url(urls[0]),
                        reason,
                        _shown_url(urls[1]),
                    )
                    urls.pop(0)
                    continue
                retry.transient(reason)
                continue
            if answer.root == "FlexQueryResponse":
                return answer
            if answer.root != "FlexStatementResponse":
                raise FlexFormatError(f"GetStatement answered a <{answer.root}>, not a statement")
            code = _code(answer.fields)
            if code == errors.IN_PROGRESS:
                if self.clock() + wait > deadline:
                    raise FlexTimeout(
                        f"IBKR was still generating the statement after "
                        f"{self.policy.poll_budget:.0f} s (1019): sync again later; a long "
                        "period or a query with many sections takes longer",
                        flex_code=code,
                    )
                logger.info("Flex: statement not ready yet (1019); next look in %.1f s", wait)
                self.sleep(wait)
                wait = min(wait * self.policy.poll_backoff, self.policy.max_poll_interval)
                continue
            retry.code(answer.fields)

    def _followed(self, url: str) -> str:
        """The Url SendRequest named, if the token may go there."""
        if not url:
            return ""
        parts = _split(url.strip())
        if parts is None:
            logger.warning(
                "Flex: not following the statement Url (not a URL: its host or port cannot "
                "be read); fetching from the base URL"
            )
            return ""
        base = urlsplit(self.base_url)
        trusted = (parts.scheme == "https" and _TRUSTED_HOST.search(parts.hostname or "")) or (
            parts.scheme == base.scheme and parts.hostname == base.hostname
        )
        if not trusted:
            logger.warning(
                "Flex: not following the statement Url to %s (not IBKR's host, nor the "
                "base URL's); fetching from the base URL",
                parts.hostname,
            )
            return ""
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    # --- one request ---

    def _pace(self) -> None:
        now = self.clock()
        if self._last_request is not None:
            due = self._last_request + self._interval
            if due > now:
                self.sleep(due - now)
        self._last_request = self.clock()

    def slow_down(self) -> None:
        """After a 1018: the requests of this client further apart, from now on."""
        self._interval = min(max(self._interval * 2, 2.0), 60.0)

    def throttled(self, delay: float) -> None:
        """After a 1018: the gate is told to hold every process back for `delay` seconds
        (a gate whose hold has `throttled`: the database's)."""
        told = getattr(self._held, "throttled", None)
        if told is not None:
            told(delay)

    @sensitive_variables("params")
    def _get(self, url: str, params: dict[str, str]) -> _Answer:
        parts = urlsplit(url)
        shown = _shown_url(url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._pace()
        renew = getattr(self._held, "renew", None)
        if renew is not None:  # the gate's lease runs from each request
            renew()
        started = self.clock()
        connection = connection_class(parts.hostname, parts.port, timeout=self.connect_timeout)
        try:
            try:
                connection.connect()
                connection.sock.settimeout(self.read_timeout)
                connection.request(
                    "GET",
                    f"{parts.path}?{urlencode(params)}",
                    headers={"User-Agent": self.user_agent, "Accept": "application/xml, text/xml"},
                )
                response = connection.getresponse()
                answer = self._read(response, shown)
            except socket.gaierror as error:
                if error.errno != socket.EAI_NONAME:  # EAI_AGAIN: the resolver, for now
                    raise _Unreached(self._scrub(_describe(error, self))) from None
                raise _Unresolvable(
                    f"{parts.hostname} is not a host name this machine can resolve "
                    f"({error.strerror})"
                ) from None
            except OSError as error:
                raise _Unreached(self._scrub(_describe(error, self))) from None
            except http.client.HTTPException as error:
                raise _Transient(self._scrub(_describe(error, self))) from None
            logger.info(
                "Flex: GET %s -> %s <%s> (%.1f s)",
                shown,
                response.status,
                answer.root,
                self.clock() - started,
            )
            return answer
        finally:
            connection.close()

    def _read(self, response: http.client.HTTPResponse, shown: str) -> _Answer:
        body = _Body(response, shown, self.clock, self.policy)
        first = body.read(_CHUNK)
        match = _first_tag(first)
        root = match or ""
        if root not in ("FlexStatementResponse", "FlexQueryResponse"):
            if response.status >= 500 or response.status == 429:
                raise _Transient(f"HTTP {response.status} from {shown}")
            kind = response.getheader("Content-Type", "no content type")
            if 200 <= response.status < 300 and _delimited_text(first):
                raise FlexFormatError(
                    "the Flex Web Service sent the statement as CSV or text, not XML: the "
                    "Flex Query's format must be XML (Client Portal: Performance & Reports > "
                    "Flex Queries, edit the query, Delivery Configuration, Format: XML); "
                    "nothing of it was used"
                )
            raise FlexFormatError(
                f"{shown} answered HTTP {response.status} ({kind}), not the Flex Web "
                f"Service's XML: check the Flex base URL"
                + (f" (the answer begins with <{root}>)" if root else "")
            )
        if root == "FlexStatementResponse":
            rest = body.read(_SMALL_ANSWER)
            return _Answer(root, _fields(first + rest, self._scrub))
        spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115
        try:
            spool.write(first)
            size = len(first)
            tail = first[-256:]
            while chunk := body.read(_CHUNK):
                spool.write(chunk)
                size += len(chunk)
                tail = (tail + chunk)[-256:]
            if not tail.rstrip().endswith(_STATEMENT_END):
                raise _Transient(f"the statement from {shown} ended before its end ({size} bytes)")
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return _Answer(root, body=spool, size=size)

    def _scrub(self, text: str) -> str:
        from urllib.parse import quote, quote_plus

        for form in {self._token, quote(self._token, safe=""), quote_plus(self._token)}:
            text = text.replace(form, "[token]")
        return text


class _Body:
    """An answer's body as it arrives, within the policy's bounds on the whole of it: each
    read takes what the socket has (`read1`: a few bytes a second never add up to one
    read that waits for a whole chunk), and the time since the answer began and the bytes
    so far are checked after each. A body that ends before its `Content-Length` is cut
    short (`_Transient`: asked for again), whatever it is, as http.client does not say
    so itself."""

    def __init__(
        self,
        response: http.client.HTTPResponse,
        shown: str,
        clock: Callable[[], float],
        policy: RetryPolicy,
    ) -> None:
        self.response = response
        self.shown = shown
        self.clock = clock
        self.policy = policy
        self.deadline = clock() + policy.download_budget
        self.size = 0

    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes: fewer only at the body's end (b"" past it)."""
        parts: list[bytes] = []
        wanted = limit
        while wanted > 0:
            data = self.response.read1(min(wanted, _CHUNK))
            if not data:
                if self.response.length:  # the connection ended before the length said
                    raise _Transient(
                        f"the answer from {self.shown} ended after {self.size} bytes, "
                        f"{self.response.length} before the end its length says"
                    )
                break
            parts.append(data)
            wanted -= len(data)
            self.size += len(data)
            self._check()
        return b"".join(parts)

    def _check(self) -> None:
        if self.size > self.policy.max_statement_bytes:
            raise FlexFormatError(
                f"the answer from {self.shown} is larger than "
                f"{_size(self.policy.max_statement_bytes)}, more than any statement this "
                "client takes: ask for a shorter period; nothing of it was used"
            )
        if self.clock() > self.deadline:
            raise FlexUnavailable(
                f"the answer from {self.shown} did not arrive whole within "
                f"{self.policy.download_budget:g} s ({self.size} bytes so far): the service "
                "is too slow now; sync again later; nothing of it was used"
            )


def _size(count: int) -> str:
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= factor:
            return f"{count / factor:g} {unit}"
    return f"{count} bytes"


class _Retry:
    """The waits of one request: retryable codes and transport failures, and 1018."""

    def __init__(self, client: FlexClient) -> None:
        self.client = client
        self.retries = 0
        self.throttles = 0
        self.throttle_delay = client.policy.throttle_delay

    def transient(self, reason: _Transient) -> None:
        message = f"the Flex Web Service could not be used: {reason}"
        if isinstance(reason, _Unreached):
            message = (
                f"the Flex Web Service at {_shown_url(self.client.base_url)} could not be "
                f"reached: {reason}; check IBKR_FLEX_BASE_URL, and that this machine reaches "
                "it (network, firewall, proxy)"
            )
        if isinstance(reason, _Unresolvable):
            raise FlexUnavailable(message)
        self._again(FlexUnavailable(message), str(reason))

    def retryable(self, code: int, message: str) -> None:
        self._again(errors.error_for(code, message), f"IBKR answered {code}")

    def code(self, fields: dict[str, str]) -> int | None:
        code = _code(fields)
        message = fields.get("errormessage", "")
        if code == errors.TOO_MANY_REQUESTS:
            self.throttles += 1
            if self.throttles > self.client.policy.throttles:
                raise FlexThrottled(
                    f"IBKR answered 1018 (too many requests on this token) "
                    f"{self.throttles} times in a row: sync less often, and not from two "
                    "places with the same token",
                    flex_code=code,
                )
            delay = max(self.throttle_delay, 10.0)
            logger.warning("Flex: too many requests on this token (1018); waiting %.0f s", delay)
            self.client.slow_down()
            self.client.throttled(delay)
            self.client.sleep(delay)
            self.throttle_delay = min(delay * 2, self.client.policy.max_throttle_delay)
            return code
        if code in errors.RETRYABLE:
            self.retryable(code, message)
            return code
        if code == errors.IN_PROGRESS:
            return code
        raise errors.error_for(code, message)

    def _again(self, error: FlexError, reason: str) -> None:
        self.retries += 1
        policy = self.client.policy
        if self.retries > policy.retries:
            raise error
        delay = min(policy.retry_delay * 2 ** (self.retries - 1), policy.max_retry_delay)
        logger.warning("Flex: %s; trying again in %.0f s", reason, delay)
        self.client.sleep(delay)


def _code(fields: dict[str, str]) -> int | None:
    text = fields.get("errorcode", "").strip()
    return int(text) if text.isdigit() else None


def _first_tag(data: bytes) -> str | None:
    """The name of a document's first element (after a BOM, a declaration, comments)."""
    match = _FIRST_TAG.search(data)  # `<?xml` and `<!--` are no element: never matched
    return match.group(1).decode("ascii", "replace") if match else None


def _delimited_text(data: bytes) -> bool:
    """Whether an answer begins as a statement of a Flex Query set to CSV or text rather
    than XML does: no markup, and a first line of fields (IBKR quotes a CSV's fields and
    separates a text statement's with `|` or tabs). GetStatement then answers 200 with
    that body, which no XML reader can tell from a wrong address."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head or head.startswith(b"<"):
        return False
    line = head.split(b"\n", 1)[0]
    return any(separator in line for separator in (b'","', b",", b"|", b"\t"))


def _fields(data: bytes, scrub: Callable[[str], str]) -> dict[str, str]:
    """The children of a <FlexStatementResponse>, by lower-cased name."""
    try:
        root = SafeElementTree.fromstring(data, forbid_dtd=True)
    except (SafeElementTree.ParseError, DefusedXmlException) as error:
        raise FlexFormatError(
            f"the Flex Web Service's answer is not readable XML ({scrub(str(error))})"
        ) from None
    return {child.tag.lower(): scrub((child.text or "").strip()) for child in root}


def _split(url: str):
    """`url` split, its host and port read; None when they cannot be (a port that is no
    number or out of range, a broken IPv6 host): no request can go there."""
    try:
        parts = urlsplit(url)
        parts.hostname, parts.port  # noqa: B018 (each raises ValueError when unreadable)
    except ValueError:
        return None
    return parts


def _shown_url(url: str) -> str:
    """A URL as a log line shows it: scheme, host and path, never the query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _describe(error: BaseException, client: FlexClient) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return (
            f"timed out (connect timeout {client.connect_timeout:g} s, "
            f"read timeout {client.read_timeout:g} s)"
        )
    if isinstance(error, ConnectionRefusedError):
        return "the connection was refused"
    return f"{type(error).__name__}: {error}"
