"""The client against a Flex Web Service of the test's own, written on raw sockets from
IBKR's description of the protocol (not the bundled fake): answers that never end, or
arrive a few bytes at a time for ever, must end the download with a clear error within
the client's own bounds, never hang a sync or fill the disk.

Time is real here (the server's pace is real): the bounds are set small.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from ibkr_sync.sources.flex import FlexFormatError, FlexUnavailable
from ibkr_sync.sources.flex.client import FlexClient, RetryPolicy

TOKEN = "123456789012345678901234"
QUERY = "987654"
JAN_1, JAN_31 = dt.date(2025, 1, 1), dt.date(2025, 1, 31)
ACKNOWLEDGED = (
    b"<FlexStatementResponse timestamp='01 February, 2025 06:15 AM EST'>"
    b"<Status>Success</Status><ReferenceCode>1234567890</ReferenceCode>"
    b"<Url>https://ndcdyn.interactivebrokers.com/AccountManagement/FlexWebService/GetStatement</Url>"
    b"</FlexStatementResponse>"
)
STATEMENT_HEAD = (
    b'<FlexQueryResponse queryName="Test" type="AF"><FlexStatements count="1">'
    b'<FlexStatement accountId="U7654321" fromDate="20250101" toDate="20250131" '
    b'period="LastMonth" whenGenerated="20250201;061500"><OpenPositions>'
)


def acknowledged(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: "
        + str(len(ACKNOWLEDGED)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + ACKNOWLEDGED
    )


@contextmanager
def flex_service(
    get_statement: Callable[[socket.socket, threading.Event], None],
    send_request: Callable[[socket.socket, threading.Event], None] = acknowledged,
) -> Iterator[str]:
    """SendRequest is `send_request`'s (by default: acknowledged), GetStatement
    `get_statement`'s to write on the socket (after the request is read). Yields the
    base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                data = connection.recv(4096)
                if not data:
                    return
                request += data
            try:
                if b"/SendRequest?" in request.split(b"\r\n", 1)[0]:
                    send_request(connection, stop)
                else:
                    get_statement(connection, stop)
            except OSError:  # the client hung up: what it should do
                pass

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/AccountManagement/FlexWebService"
    finally:
        stop.set()
        thread.join()
        listener.close()


def client(base_url: str, **policy) -> FlexClient:
    policy = RetryPolicy(first_poll=0, min_interval=0, retry_delay=0, **policy)
    return FlexClient(TOKEN, base_url=base_url, read_timeout=2.0, policy=policy)


def dripping(first: bytes, drop: bytes, every: float) -> Callable:
    """A 200 whose body (without a length) begins with `first`, then `drop` every
    `every` seconds for as long as the client reads."""

    def answer(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n" + first)
        while not stop.is_set():
            time.sleep(every)
            connection.sendall(drop)

    return answer


def test_a_statement_that_drips_for_ever_ends_within_the_download_budget():
    with flex_service(dripping(STATEMENT_HEAD, b" ", every=0.05)) as base_url:
        started = time.monotonic()
        with pytest.raises(FlexUnavailable, match="did not arrive whole within 1 s"):
            client(base_url, download_budget=1.0).fetch(QUERY, JAN_1, JAN_31)
        assert time.monotonic() - started < 10


def test_an_acknowledgement_that_drips_for_ever_ends_within_the_download_budget():
    with flex_service(dripping(b"<FlexStatementResponse>", b" ", every=0.05)) as base_url:
        started = time.monotonic()
        with pytest.raises(FlexUnavailable, match="did not arrive whole"):
            client(base_url, download_budget=1.0).fetch(QUERY, JAN_1, JAN_31)
        assert time.monotonic() - started < 10


def test_a_statement_that_never_ends_is_refused_past_the_largest_one_taken():
    row = b'<OpenPosition accountId="U7654321" conid="1" position="1" />' * 1000
    with (
        flex_service(dripping(STATEMENT_HEAD, row, every=0)) as base_url,
        pytest.raises(FlexFormatError, match="larger than 2 MB"),
    ):
        client(base_url, max_statement_bytes=2 << 20).fetch(QUERY, JAN_1, JAN_31)


def test_a_statement_within_the_bounds_is_read():
    body = STATEMENT_HEAD + b"</OpenPositions></FlexStatement></FlexStatements></FlexQueryResponse>"

    def whole(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for start in range(0, len(body), 50):  # in chunks of a chunked body, at a pace
            part = body[start : start + 50]
            connection.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            time.sleep(0.01)
        connection.sendall(b"0\r\n\r\n")

    with flex_service(whole) as base_url:
        response = client(base_url, download_budget=5.0, max_statement_bytes=len(body)).fetch(
            QUERY, JAN_1, JAN_31
        )
    assert [s.account for s in response.statements] == ["U7654321"]


def test_an_acknowledgement_cut_short_of_its_length_is_asked_for_again():
    answers = iter([ACKNOWLEDGED[: len(ACKNOWLEDGED) // 2], ACKNOWLEDGED])

    def cut_once(connection: socket.socket, stop: threading.Event) -> None:
        body = next(answers, ACKNOWLEDGED)
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: "
            + str(len(ACKNOWLEDGED)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )

    body = STATEMENT_HEAD + b"</OpenPositions></FlexStatement></FlexStatements></FlexQueryResponse>"

    def whole(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )

    with flex_service(whole, send_request=cut_once) as base_url:
        response = client(base_url).fetch(QUERY, JAN_1, JAN_31)
    assert [s.account for s in response.statements] == ["U7654321"]
