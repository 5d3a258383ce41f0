"""A second TWS server for the tests, written from the client library's decoder.

The bundled simulator (`ibkr_sync.testing`) writes the protocol as this project
understands it; a test that only ever talks to it checks our reading against our own
idea of the wire. This server shares no code with it nor with `ibkr_sync.protocol`:
each frame it sends is built in the field order of the client library's decoder
(`Decoder.position`, `Decoder.updatePortfolio`, the `wrap` tables of
`updateAccountValue`, `accountDownloadEnd`, `managedAccounts`, `errorMsg`), with the
versions IBKR's own decoder reads them at. It speaks as little as a gateway must: it
answers the API handshake at the server version it is told (within or outside what
the client offers), sends the API start and every answer as scripted frames or raw
bytes, and writes them cut into TCP segments as it is told (all at once, n bytes at a
time), so a test can put any byte of any frame at any point of the stream.

A script is a dict from what the client asked to what is sent back, in order:
"start" (after startApi), "positions" (after reqPositions), ("values", account)
(after reqAccountUpdates for that account), and ("request", message id) for any other
request (its items may be a function of the request's fields). An item is a frame (a list of field
texts), raw bytes (sent as they are), `CLOSE` (the server closes the connection
there) or `SILENCE` (nothing more is sent on that request).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterable

CLOSE = object()
SILENCE = object()

# The request ids a client sends (IBKR's OUT constants) that this server answers.
_START_API = "71"
_REQ_POSITIONS = "61"
_REQ_ACCOUNT_UPDATES = "6"


def frame(fields: Iterable[str]) -> bytes:
    """A frame: a 4-byte big-endian length, then each field's text and a NUL."""
    body = b"".join(field.encode() + b"\0" for field in fields)
    return struct.pack(">I", len(body)) + body


# --- frames, in the order of the client library's decoder ------------------------------


def position(
    account: str,
    con_id: str,
    symbol: str = "AAPL",
    sec_type: str = "STK",
    last_trade_date: str = "",
    strike: str = "0.0",
    right: str = "",
    multiplier: str = "",
    exchange: str = "NASDAQ",
    currency: str = "USD",
    local_symbol: str = "",
    trading_class: str = "NMS",
    quantity: str = "1",
    average_cost: str = "1",
) -> list[str]:
    """`Decoder.position`: msg id 61, version 3, account, the contract, position, avgCost."""
    return [
        "61", "3", account, con_id, symbol, sec_type, last_trade_date, strike, right,
        multiplier, exchange, currency, local_symbol or symbol, trading_class, quantity,
        average_cost,
    ]  # fmt: skip


def position_end() -> list[str]:
    return ["62", "1"]


def managed_accounts(accounts: str) -> list[str]:
    """`managedAccounts`: the list as one text, comma-separated, as TWS writes it."""
    return ["15", "1", accounts]


def next_valid_id(order_id: str = "1") -> list[str]:
    return ["9", "1", order_id]


def error(req_id: int, code: int, text: str, server_version: int) -> list[str]:
    """`Decoder.errorMsg`: version 2, the request id, the code, the text; and from
    server version 166 on the advanced order reject JSON (empty here)."""
    fields = ["4", "2", str(req_id), str(code), text]
    return [*fields, ""] if server_version >= 166 else fields


def account_value(tag: str, value: str, currency: str, account: str) -> list[str]:
    """`updateAccountValue`, version 2: key, value, currency, account name."""
    return ["6", "2", tag, value, currency, account]


def portfolio(
    account: str,
    con_id: str,
    quantity: str,
    market_price: str,
    market_value: str,
    average_cost: str = "1",
    unrealized_pnl: str = "0",
    realized_pnl: str = "0",
    symbol: str = "AAPL",
) -> list[str]:
    """`Decoder.updatePortfolio`, version 8: the contract (primary exchange where the
    position has the exchange), position, market price and value, average cost, P&L,
    account name."""
    return [
        "7", "8", con_id, symbol, "STK", "", "0", "0", "", "NASDAQ", "USD", symbol, "NMS",
        quantity, market_price, market_value, average_cost, unrealized_pnl, realized_pnl,
        account,
    ]  # fmt: skip


def account_time(time: str = "14:34") -> list[str]:
    return ["8", "1", time]


def download_end(account: str) -> list[str]:
    return ["54", "1", account]


class DecoderServer:
    """One TWS on a free port of 127.0.0.1, serving the script to every connection."""

    def __init__(
        self,
        script: dict,
        *,
        server_version: int = 176,
        segment: int | None = None,
        handshake: bytes | None = None,
    ) -> None:
        self.script = script
        self.server_version = server_version
        # Bytes per TCP write (None: each answer in one write).
        self.segment = segment
        # The answer to the handshake as raw bytes, instead of the server version's.
        self.handshake = handshake
        # What each connection asked for, in order: (message id, fields).
        self.requests: list[list[str]] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)  # to see `_stopped` soon
        self.port = self._socket.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def __enter__(self) -> DecoderServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._socket.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(0.05)
        with connection, contextlib.suppress(OSError, _Closed):
            self._session(connection)

    def _session(self, connection: socket.socket) -> None:
        reader = _Reader(connection, self._stopped)
        if reader.exactly(4) != b"API\0":
            return
        reader.message()  # v<min>..<max>
        if self.handshake is not None:
            self._send(connection, [self.handshake])
        else:
            self._send(
                connection,
                [[str(self.server_version), "20260101 10:00:00 EST"]],
            )
        while not self._stopped.is_set():
            fields = reader.message().split(b"\0")[:-1]
            request = [f.decode() for f in fields]
            self.requests.append(request)
            key: object = None
            if request[0] == _START_API:
                key = "start"
            elif request[0] == _REQ_POSITIONS:
                key = "positions"
            elif request[0] == _REQ_ACCOUNT_UPDATES and request[2] == "1":
                key = ("values", request[3])
            elif ("request", request[0]) in self.script:
                key = ("request", request[0])
            answer = self.script.get(key)
            if callable(answer):
                answer = answer(request)
            if answer is not None:
                self._send(connection, answer)

    def _send(self, connection: socket.socket, items: list) -> None:
        data = bytearray()
        for item in items:
            if item is CLOSE or item is SILENCE:
                self._write(connection, bytes(data))
                if item is CLOSE:
                    connection.shutdown(socket.SHUT_RDWR)
                    raise _Closed
                return
            data += item if isinstance(item, bytes) else frame(item)
        self._write(connection, bytes(data))

    def _write(self, connection: socket.socket, data: bytes) -> None:
        step = self.segment or len(data) or 1
        for start in range(0, len(data), step):
            connection.sendall(data[start : start + step])


class _Closed(Exception):
    pass


class _Reader:
    def __init__(self, connection: socket.socket, stopped: threading.Event) -> None:
        self._connection = connection
        self._stopped = stopped
        self._buffer = b""

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if self._stopped.is_set():
                raise _Closed
            try:
                data = self._connection.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise _Closed
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def message(self) -> bytes:
        (length,) = struct.unpack(">I", self.exactly(4))
        return self.exactly(length)
