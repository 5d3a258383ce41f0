"""A fake Flex Web Service over real HTTP, for tests and the demo (standard library only).

It answers as IBKR's service does (version 3): `GET {base}/SendRequest?t=&q=&v=3&fd=&td=`
with a `<FlexStatementResponse>` (Success, a reference code and the Url to fetch it
from; or Fail with an error code), then `GET {Url}?t=&q=REFERENCE&v=3` with the
statement, or an error answer while it is not ready. It serves:

- statements per query id: XML text or bytes, a file, or a function of the period asked
  for (`add_statement`); `from_directory` serves `<query id>.xml` files;
- scripted answers, consumed one per request to an endpoint (`script`): an error code
  (1019 a number of times, 1018, 1020, a code no one knows), a slow answer, a truncated
  body, content that is no statement, an HTTP status;
- the requests it got (`requests`: path, parameters, headers, when), and the most that
  were ever in flight at once per token (`max_in_flight`), so a test can hold a client to
  its promises;
- named scenarios of IBKR's error sequences (`SCENARIOS`, `play`): 1019 several times,
  1018, 1001, 1012, a truncated body, a body that is no XML, a huge body;
- generated statements of N positions and M trades in the real format
  (`generate_statement`, `write_statement`), for load tests; `flex_portfolio.py` makes
  the statements of a simulator portfolio, with a history that adds up to it.

It knows nothing of the Flex source: it writes the format, as IBKR does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import quoteattr

PATH: str = "/AccountManagement/FlexWebService"
SEND_REQUEST = "SendRequest"
GET_STATEMENT = "GetStatement"

MESSAGES = {
    1001: "Statement could not be generated at this time. Please try again shortly.",
    1003: "Statement is not available.",
    1009: "The server is under heavy load. Statement could not be generated at this time. "
    "Please try again shortly.",
    1012: "Token has expired.",
    1013: "IP restriction.",
    1014: "Query is invalid.",
    1015: "Token is invalid.",
    1017: "Reference code is invalid.",
    1018: "Too many requests have been made from this token. Please try again shortly.",
    1019: "Statement generation in progress. Please try again shortly.",
    1020: "Invalid request or unable to validate request.",
    1021: "Statement could not be retrieved at this time. Please try again shortly.",
}

Statement = str | bytes | Path | Callable[[dt.date | None, dt.date | None], str | bytes]


@dataclass(frozen=True)
class Answer:
    """A scripted answer: an error code, an HTTP status, a delay, a body of our own."""

    code: int | None = None
    message: str = ""
    status: int = 200
    delay: float = 0.0
    body: bytes | None = None
    content_type: str = "text/xml"
    truncate: bool = False
    #: A body of any size, written piece by piece as it is made (close-delimited).
    stream: Callable[[], Iterator[bytes]] | None = None

    @classmethod
    def error(cls, code: int, message: str = "") -> Answer:
        return cls(code=code, message=message or MESSAGES.get(code, "Unknown error."))

    @classmethod
    def in_progress(cls) -> Answer:
        return cls.error(1019)

    @classmethod
    def slow(cls, seconds: float) -> Answer:
        """The normal answer, after `seconds`."""
        return cls(delay=seconds)

    @classmethod
    def truncated(cls) -> Answer:
        """The normal answer, cut in the middle (the connection closes early)."""
        return cls(truncate=True)

    @classmethod
    def content(cls, body: bytes, content_type: str = "text/html", status: int = 200) -> Answer:
        return cls(body=body, content_type=content_type, status=status)

    @classmethod
    def streamed(
        cls, pieces: Callable[[], Iterator[bytes]], content_type: str = "text/xml"
    ) -> Answer:
        """A body made piece by piece while it is sent (a statement of any size)."""
        return cls(stream=pieces, content_type=content_type)

    @classmethod
    def http(cls, status: int, body: bytes = b"") -> Answer:
        return cls(status=status, body=body or f"HTTP {status}".encode(), content_type="text/plain")


@dataclass(frozen=True)
class Request:
    endpoint: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    token_hash: str
    started: float
    ended: float = 0.0


@dataclass
class _Pending:
    query_id: str
    from_date: dt.date | None
    to_date: dt.date | None


class FakeFlexService:
    """The service, on 127.0.0.1 and a free port; a context manager (start / stop).

    `tokens` are the tokens it accepts (any other: 1015); `expired_tokens` answer 1012.
    `statement_url` is the Url SendRequest tells clients to fetch from (default: its own
    GetStatement); point it at a dead address to test a client's fallback.
    """

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = ("flex-test-token",),
        expired_tokens: tuple[str, ...] = (),
        statement_url: str | None = None,
        timestamp: str = "01 January, 2026 08:00 AM EST",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.tokens = set(tokens)
        self.expired_tokens = set(expired_tokens)
        self.statements: dict[str, Statement] = {}
        self.requests: list[Request] = []
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.statement_url = statement_url
        self.timestamp = timestamp
        self._scripts: dict[str, list[Answer]] = defaultdict(list)
        self._pending: dict[str, _Pending] = {}
        self._in_flight: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- set-up ---

    @classmethod
    def from_directory(cls, directory: str | Path, **kwargs: Any) -> FakeFlexService:
        service = cls(**kwargs)
        for path in sorted(Path(directory).glob("*.xml")):
            service.add_statement(path.stem, path)
        return service

    def add_statement(self, query_id: str, statement: Statement) -> None:
        self.statements[str(query_id)] = statement

    def script(self, endpoint: str, *answers: Answer) -> None:
        """Answers for the next requests to `endpoint` (SendRequest or GetStatement), in
        order; once they are used up, the service answers normally again."""
        assert endpoint in (SEND_REQUEST, GET_STATEMENT), endpoint
        with self._lock:
            self._scripts[endpoint].extend(answers)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the service is not started"
        host, port = self._server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{PATH}"

    def play(self, scenario: str, **options: Any) -> None:
        """Script the answers of a named scenario (`SCENARIOS`): IBKR's error sequences."""
        for endpoint, answers in scenario_answers(scenario, **options):
            self.script(endpoint, *answers)

    def requests_to(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # --- lifecycle ---

    def start(self) -> FakeFlexService:
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                service._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests read `requests`

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-flex-service",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeFlexService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answering ---

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        endpoint = url.path.rsplit("/", 1)[-1]
        token = params.get("t", "")
        token_hash = hashlib.sha256(token.encode()).hexdigest()[:16]
        started = time.monotonic()
        with self._lock:
            self._in_flight[token_hash] += 1
            self.max_in_flight[token_hash] = max(
                self.max_in_flight[token_hash], self._in_flight[token_hash]
            )
            scripted = self._scripts[endpoint].pop(0) if self._scripts.get(endpoint) else None
        try:
            if scripted is not None and scripted.delay:
                time.sleep(scripted.delay)
            if scripted is not None and scripted.stream is not None:
                status, body, content_type = 200, b"", scripted.content_type
            elif scripted is not None and (scripted.code is not None or scripted.body is not None):
                status, body, content_type = self._scripted(scripted)
            else:
                status, body, content_type = self._answer(endpoint, params)
        finally:
            # A request is in flight until its answer is ready: recorded before it is sent,
            # so that the client's next request never overlaps it in the record.
            with self._lock:
                self._in_flight[token_hash] -= 1
                self.requests.append(
                    Request(
                        endpoint=endpoint,
                        path=url.path,
                        params=params,
                        headers=dict(handler.headers.items()),
                        token_hash=token_hash,
                        started=started,
                        ended=time.monotonic(),
                    )
                )
        if scripted is not None and scripted.stream is not None:
            self._send_stream(handler, scripted.stream(), content_type)
            return
        self._send(handler, status, body, content_type, scripted is not None and scripted.truncate)

    def _scripted(self, answer: Answer) -> tuple[int, bytes, str]:
        if answer.code is not None:
            return 200, self._error(answer.code, answer.message), "text/xml"
        assert answer.body is not None
        return answer.status, answer.body, answer.content_type

    def _answer(self, endpoint: str, params: dict[str, str]) -> tuple[int, bytes, str]:
        token = params.get("t", "")
        if endpoint not in (SEND_REQUEST, GET_STATEMENT):
            return 404, b"Not Found", "text/plain"
        if params.get("v") != "3":
            return 200, self._error(1020), "text/xml"
        if token in self.expired_tokens:
            return 200, self._error(1012), "text/xml"
        if token not in self.tokens:
            return 200, self._error(1015), "text/xml"
        if endpoint == SEND_REQUEST:
            return self._send_request(params)
        pending = self._pending.get(params.get("q", ""))
        if pending is None:
            return 200, self._error(1017), "text/xml"
        return 200, self._statement(pending), "text/xml"

    def _send_request(self, params: dict[str, str]) -> tuple[int, bytes, str]:
        query_id = params.get("q", "")
        if query_id not in self.statements:
            return 200, self._error(1014), "text/xml"
        try:
            from_date, to_date = (
                dt.datetime.strptime(params[k], "%Y%m%d").date() if params.get(k) else None
                for k in ("fd", "td")
            )
        except ValueError:
            return 200, self._error(1020), "text/xml"
        if from_date and to_date and (to_date < from_date or (to_date - from_date).days > 365):
            return (
                200,
                self._error(1020, "Invalid request: the period is over 365 days."),
                "text/xml",
            )
        reference = str(random.randrange(10**9, 10**10))
        with self._lock:
            self._pending[reference] = _Pending(query_id, from_date, to_date)
        url = self.statement_url or f"{self.base_url}/{GET_STATEMENT}"
        body = (
            f"<FlexStatementResponse timestamp={quoteattr(self.timestamp)}>\n"
            "<Status>Success</Status>\n"
            f"<ReferenceCode>{reference}</ReferenceCode>\n"
            f"<Url>{url}</Url>\n"
            "</FlexStatementResponse>\n"
        )
        return 200, body.encode(), "text/xml"

    def _statement(self, pending: _Pending) -> bytes:
        statement = self.statements[pending.query_id]
        if isinstance(statement, Path):
            return statement.read_bytes()
        if callable(statement):
            statement = statement(pending.from_date, pending.to_date)
        return statement.encode() if isinstance(statement, str) else statement

    def _error(self, code: int, message: str = "") -> bytes:
        status = "Warn" if code == 1019 else "Fail"
        return (
            f"<FlexStatementResponse timestamp={quoteattr(self.timestamp)}>\n"
            f"<Status>{status}</Status>\n"
            f"<ErrorCode>{code}</ErrorCode>\n"
            f"<ErrorMessage>{message or MESSAGES.get(code, 'Unknown error.')}</ErrorMessage>\n"
            "</FlexStatementResponse>\n"
        ).encode()

    @staticmethod
    def _send_stream(
        handler: http.server.BaseHTTPRequestHandler, pieces: Iterator[bytes], content_type: str
    ) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", f"{content_type}; charset=utf-8")
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for piece in pieces:
                handler.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: its choice
        handler.close_connection = True

    @staticmethod
    def _send(
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        content_type: str,
        truncate: bool,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", f"{content_type}; charset=utf-8")
        if truncate:
            # Close-delimited, as a proxy that lost its upstream would: no length to check.
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(body[: max(1, len(body) // 2)])
            handler.close_connection = True
            return
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


# --- scripted scenarios: what IBKR answers when things go wrong ---

#: The scenarios `play` and `manage.py ibkr_flex_simulator --script` know, in words.
SCENARIOS: dict[str, str] = {
    "in-progress": "GetStatement answers 1019 (statement generation in progress) three "
    "times, then the statement",
    "throttled": "SendRequest answers 1018 (too many requests on this token), then as usual",
    "unavailable": "GetStatement answers 1001 (could not be generated now), then the statement",
    "expired-token": "SendRequest answers 1012 (the token has expired)",
    "truncated": "GetStatement's answer is cut in the middle (the connection closes early), "
    "then the whole statement",
    "not-xml": "GetStatement answers a maintenance page (HTML, HTTP 200), not XML",
    "huge": "GetStatement answers a generated statement of --huge-rows trades, made while "
    "it is sent (about 46 MB at the default 50,000)",
}
_MAINTENANCE = (
    b"<!DOCTYPE html>\n<html><head><title>Scheduled maintenance</title></head>\n"
    b"<body><h1>Client Portal is down for scheduled maintenance</h1></body></html>\n"
)


def scenario_answers(name: str, *, huge_rows: int = 50_000) -> list[tuple[str, tuple[Answer, ...]]]:
    """The scripted answers of scenario `name`, per endpoint (KeyError for no scenario)."""
    if name not in SCENARIOS:
        raise KeyError(f"no scenario {name!r}: {', '.join(SCENARIOS)}")
    if name == "in-progress":
        return [(GET_STATEMENT, (Answer.in_progress(),) * 3)]
    if name == "throttled":
        return [(SEND_REQUEST, (Answer.error(1018),))]
    if name == "unavailable":
        return [(GET_STATEMENT, (Answer.error(1001),))]
    if name == "expired-token":
        return [(SEND_REQUEST, (Answer.error(1012),))]
    if name == "truncated":
        return [(GET_STATEMENT, (Answer.truncated(),))]
    if name == "not-xml":
        return [(GET_STATEMENT, (Answer.content(_MAINTENANCE),))]

    def pieces() -> Iterator[bytes]:
        buffer: list[str] = []
        for piece in iter_statement(positions=50, trades=huge_rows):
            buffer.append(piece)
            if len(buffer) >= 500:
                yield "".join(buffer).encode()
                buffer.clear()
        yield "".join(buffer).encode()

    return [(GET_STATEMENT, (Answer.streamed(pieces),))]


# --- generated statements, in the real format ---

_SYMBOLS = ("AAPL", "MSFT", "NESN", "SAP", "ASML", "TTE", "NOVN", "SHEL", "RIO", "CL")
_CURRENCIES = ("USD", "USD", "CHF", "EUR", "EUR", "EUR", "CHF", "GBP", "USD", "USD")


def generate_statement(
    *,
    account: str = "U1234567",
    positions: int = 10,
    trades: int = 100,
    cash_transactions: int = 0,
    from_date: dt.date = dt.date(2025, 1, 1),
    to_date: dt.date = dt.date(2025, 12, 31),
    seed: int = 1,
) -> str:
    """A statement of `positions` open positions and `trades` executions (and some
    dividends), as one text: for tests of ordinary size."""
    return "".join(
        iter_statement(
            account=account,
            positions=positions,
            trades=trades,
            cash_transactions=cash_transactions,
            from_date=from_date,
            to_date=to_date,
            seed=seed,
        )
    )


def write_statement(path: str | Path | BinaryIO, **kwargs: Any) -> int:
    """Writes a generated statement (same arguments as `generate_statement`) to `path`
    chunk by chunk, in bounded memory whatever its size; returns its size in bytes."""
    size = 0
    handle = open(path, "wb") if isinstance(path, str | Path) else path  # noqa: SIM115
    try:
        buffer: list[bytes] = []
        for chunk in iter_statement(**kwargs):
            data = chunk.encode()
            buffer.append(data)
            size += len(data)
            if len(buffer) >= 1000:
                handle.write(b"".join(buffer))
                buffer.clear()
        handle.write(b"".join(buffer))
    finally:
        if isinstance(path, str | Path):
            handle.close()
    return size


def iter_statement(
    *,
    account: str = "U1234567",
    positions: int = 10,
    trades: int = 100,
    cash_transactions: int = 0,
    from_date: dt.date = dt.date(2025, 1, 1),
    to_date: dt.date = dt.date(2025, 12, 31),
    seed: int = 1,
) -> Iterator[str]:
    """The statement's text, piece by piece (one row at a time)."""
    rng = random.Random(seed)
    days = max(1, (to_date - from_date).days + 1)
    generated = to_date + dt.timedelta(days=1)
    yield '<?xml version="1.0" encoding="UTF-8"?>\n'
    yield '<FlexQueryResponse queryName="Generated" type="AF">\n<FlexStatements count="1">\n'
    yield (
        f'<FlexStatement accountId="{account}" fromDate="{from_date:%Y%m%d}" '
        f'toDate="{to_date:%Y%m%d}" period="" whenGenerated="{generated:%Y%m%d};060000">\n'
    )
    yield (
        f'<AccountInformation accountId="{account}" acctAlias="" model="" currency="USD" '
        'name="Generated Account" accountType="Individual" customerType="Individual" />\n'
    )
    yield "<OpenPositions>\n"
    for n in range(positions):
        symbol, currency = _instrument(n)
        quantity = rng.randrange(1, 5000)
        price = Decimal(rng.randrange(100, 500_000)) / 100
        yield _row(
            "OpenPosition",
            accountId=account,
            acctAlias="",
            model="",
            currency=currency,
            fxRateToBase="1" if currency == "USD" else "0.91234",
            assetCategory="STK",
            subCategory="COMMON",
            symbol=symbol,
            description=f"{symbol} HOLDINGS",
            conid=str(100000 + n),
            isin="",
            listingExchange="NYSE",
            multiplier="1",
            reportDate=f"{to_date:%Y%m%d}",
            position=str(quantity),
            markPrice=str(price),
            positionValue=str(price * quantity),
            costBasisPrice=str(price - 1),
            costBasisMoney=str((price - 1) * quantity),
            fifoPnlUnrealized=str(quantity),
            side="Long",
            levelOfDetail="SUMMARY",
        )
    yield "</OpenPositions>\n<Trades>\n"
    for n in range(trades):
        symbol, currency = _instrument(n % max(positions, 1))
        day = from_date + dt.timedelta(days=n % days)
        quantity = rng.randrange(-500, 500) or 1
        price = Decimal(rng.randrange(100, 500_000)) / 100
        money = price * quantity
        yield _row(
            "Trade",
            accountId=account,
            acctAlias="",
            model="",
            currency=currency,
            fxRateToBase="1" if currency == "USD" else "0.91234",
            assetCategory="STK",
            symbol=symbol,
            description=f"{symbol} HOLDINGS",
            conid=str(100000 + n % max(positions, 1)),
            securityID="",
            securityIDType="",
            cusip="",
            isin="",
            listingExchange="NYSE",
            underlyingConid="",
            underlyingSymbol="",
            multiplier="1",
            strike="",
            expiry="",
            tradeID=str(500_000_000 + n),
            putCall="",
            reportDate=f"{day:%Y%m%d}",
            dateTime=f"{day:%Y%m%d};{10 + n % 6:02d}{n % 60:02d}{(n * 7) % 60:02d}",
            tradeDate=f"{day:%Y%m%d}",
            settleDateTarget=f"{day + dt.timedelta(days=2):%Y%m%d}",
            transactionType="ExchTrade",
            exchange="NYSE",
            quantity=str(quantity),
            tradePrice=str(price),
            tradeMoney=str(money),
            proceeds=str(-money),
            taxes="0",
            ibCommission="-1.0025",
            ibCommissionCurrency=currency,
            netCash=str(-money - Decimal("1.0025")),
            closePrice=str(price),
            openCloseIndicator="O" if quantity > 0 else "C",
            notes="",
            cost=str(money),
            fifoPnlRealized="0" if quantity > 0 else str(Decimal(rng.randrange(-9999, 9999)) / 100),
            fxPnl="0",
            mtmPnl="0",
            buySell="BUY" if quantity > 0 else "SELL",
            transactionID=str(1_000_000_000 + n),
            ibOrderID=str(300_000_000 + n),
            ibExecID=f"0000{n:08x}.01.01",
            orderType="LMT",
            levelOfDetail="EXECUTION",
        )
    yield "</Trades>\n<CashTransactions>\n"
    for n in range(cash_transactions):
        symbol, currency = _instrument(n % max(positions, 1))
        day = from_date + dt.timedelta(days=n % days)
        yield _row(
            "CashTransaction",
            accountId=account,
            currency=currency,
            fxRateToBase="1",
            assetCategory="STK",
            symbol=symbol,
            description=f"{symbol} CASH DIVIDEND {currency} 0.25 PER SHARE (Ordinary Dividend)",
            conid=str(100000 + n % max(positions, 1)),
            dateTime=f"{day:%Y%m%d};202000",
            settleDate=f"{day:%Y%m%d}",
            amount="25",
            type="Dividends",
            transactionID=str(2_000_000_000 + n),
            reportDate=f"{day:%Y%m%d}",
            actionID=str(700_000_000 + n),
            levelOfDetail="DETAIL",
        )
    yield "</CashTransactions>\n</FlexStatement>\n</FlexStatements>\n</FlexQueryResponse>\n"


def _instrument(n: int) -> tuple[str, str]:
    base = _SYMBOLS[n % len(_SYMBOLS)]
    return (base if n < len(_SYMBOLS) else f"{base}{n}"), _CURRENCIES[n % len(_CURRENCIES)]


def _row(tag: str, **attributes: str) -> str:
    return (
        f"<{tag} "
        + " ".join(f"{name}={quoteattr(value)}" for name, value in attributes.items())
        + " />\n"
    )


__all__ = [
    "GET_STATEMENT",
    "SCENARIOS",
    "SEND_REQUEST",
    "Answer",
    "FakeFlexService",
    "Request",
    "generate_statement",
    "iter_statement",
    "scenario_answers",
    "write_statement",
]
