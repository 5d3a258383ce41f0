"""The TWS API socket protocol (framing, handshake, message ids) and a raw-socket test client.

Both the gateway simulator and the tests use this module, so the byte layout lives in one
place. It is deliberately standard-library only: tests can talk to the simulator without
importing ``ib_insync``, which lets them check the exact bytes on the wire (e.g. that a
fractional quantity arrives as ``0.12345678`` and not as a rounded float).

Wire format (API version 100+, what every current TWS / IB Gateway speaks):

* The client opens with ``b"API\\0"`` followed by one length-prefixed frame holding
  ``v<min>..<max>`` (the range of server versions it understands).
* Every later message in both directions is a frame: a 4-byte big-endian length, then
  NUL-terminated text fields (``b"61\\x003\\x00DU123\\x00..."``). The first field is the
  message id; most messages continue with a per-message version number.
* The server answers the handshake with a frame of two fields: the chosen server version
  and the connection time. The client then sends startApi (71) with its client id and the
  server answers with nextValidId (9) and managedAccounts (15).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum

__all__ = [
    "API_PREFIX",
    "DEFAULT_MAX_CLIENT_VERSION",
    "DEFAULT_MIN_CLIENT_VERSION",
    "MIN_SERVER_VER_ADVANCED_ORDER_REJECT",
    "ClientMsg",
    "FrameBuffer",
    "ServerMsg",
    "WireClient",
    "WireError",
    "WireMessage",
    "WirePosition",
    "decode_payload",
    "encode_fields",
    "format_field",
    "frame",
    "handshake_bytes",
    "make_message",
    "parse_error_message",
    "parse_position",
]

API_PREFIX = b"API\0"

#: The version range ib_async 2.1 announces (ib_insync 0.9.86 announces 157..176).
DEFAULT_MIN_CLIENT_VERSION = 157
DEFAULT_MAX_CLIENT_VERSION = 178

#: From this server version on, the error message (4) carries an extra
#: ``advancedOrderRejectJson`` field; the client's decoder expects it to be there.
MIN_SERVER_VER_ADVANCED_ORDER_REJECT = 166

_LENGTH = struct.Struct(">I")
#: Refuse absurd frames instead of trying to buffer gigabytes from a confused peer.
MAX_FRAME_SIZE = 64 * 1024 * 1024


class ServerMsg(IntEnum):
    """Ids of messages the gateway sends to the client (ibapi's ``IN`` constants)."""

    ERROR = 4
    ACCT_VALUE = 6
    PORTFOLIO_VALUE = 7
    ACCT_UPDATE_TIME = 8
    NEXT_VALID_ID = 9
    MANAGED_ACCTS = 15
    CURRENT_TIME = 49
    CONTRACT_DATA_END = 52
    OPEN_ORDER_END = 53
    ACCT_DOWNLOAD_END = 54
    EXECUTION_DATA_END = 55
    POSITION_DATA = 61
    POSITION_END = 62
    ACCOUNT_SUMMARY = 63
    ACCOUNT_SUMMARY_END = 64
    POSITION_MULTI = 71
    POSITION_MULTI_END = 72
    ACCOUNT_UPDATE_MULTI = 73
    ACCOUNT_UPDATE_MULTI_END = 74
    COMPLETED_ORDERS_END = 102


class ClientMsg(IntEnum):
    """Ids of requests the client sends to the gateway (ibapi's ``OUT`` constants)."""

    REQ_OPEN_ORDERS = 5
    REQ_ACCT_DATA = 6
    REQ_EXECUTIONS = 7
    REQ_IDS = 8
    REQ_CONTRACT_DATA = 9
    REQ_AUTO_OPEN_ORDERS = 15
    REQ_ALL_OPEN_ORDERS = 16
    REQ_MANAGED_ACCTS = 17
    REQ_CURRENT_TIME = 49
    REQ_MARKET_DATA_TYPE = 59
    REQ_POSITIONS = 61
    REQ_ACCOUNT_SUMMARY = 62
    CANCEL_ACCOUNT_SUMMARY = 63
    CANCEL_POSITIONS = 64
    START_API = 71
    REQ_POSITIONS_MULTI = 74
    CANCEL_POSITIONS_MULTI = 75
    REQ_ACCOUNT_UPDATES_MULTI = 76
    CANCEL_ACCOUNT_UPDATES_MULTI = 77
    REQ_COMPLETED_ORDERS = 99


class WireError(ConnectionError):
    """The peer broke the protocol, closed the connection, or answered with an IB error."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


# -- encoding ---------------------------------------------------------------------------


def format_field(value: object) -> str:
    """Render one field the way TWS does.

    Decimals are written in plain notation (never ``1E+2``) so fractional quantities go on
    the wire exactly as configured; floats are not special-cased on purpose: callers that
    care about exactness must pass ``Decimal`` or ``str``.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def encode_fields(fields: Iterable[object]) -> bytes:
    """Encode fields as NUL-terminated UTF-8 text (the payload of one frame)."""
    return "".join(format_field(f) + "\0" for f in fields).encode()


def frame(payload: bytes) -> bytes:
    """Prefix a payload with its 4-byte big-endian length."""
    return _LENGTH.pack(len(payload)) + payload


def make_message(*fields: object) -> bytes:
    """Build one complete, length-prefixed message from its fields."""
    return frame(encode_fields(fields))


def decode_payload(payload: bytes) -> list[str]:
    """Split a frame's payload into its text fields (the trailing terminator is dropped)."""
    fields = payload.decode(errors="backslashreplace").split("\0")
    if fields and fields[-1] == "":
        fields.pop()
    return fields


def handshake_bytes(
    min_version: int = DEFAULT_MIN_CLIENT_VERSION,
    max_version: int = DEFAULT_MAX_CLIENT_VERSION,
    options: str = "",
) -> bytes:
    """The client's opening bytes: ``API\\0`` plus the framed version range."""
    text = f"v{min_version}..{max_version}"
    if options:
        text += f" {options}"
    return API_PREFIX + frame(text.encode())


class FrameBuffer:
    """Reassemble frames from a byte stream that TCP may split or merge arbitrarily."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads of all frames completed by them."""
        self._data += data
        payloads: list[bytes] = []
        pos = 0
        size = len(self._data)
        while size - pos >= 4:
            (length,) = _LENGTH.unpack_from(self._data, pos)
            if length > MAX_FRAME_SIZE:
                raise WireError(f"frame of {length} bytes exceeds the {MAX_FRAME_SIZE} limit")
            end = pos + 4 + length
            if end > size:
                break
            payloads.append(bytes(self._data[pos + 4 : end]))
            pos = end
        del self._data[:pos]
        return payloads

    def __len__(self) -> int:
        return len(self._data)


# -- decoded messages -------------------------------------------------------------------


@dataclass(frozen=True)
class WireMessage:
    """One decoded frame: the message id and all fields (including the id) as text."""

    fields: tuple[str, ...]

    @property
    def msg_id(self) -> int:
        return int(self.fields[0])

    def __getitem__(self, index: int) -> str:
        return self.fields[index]

    def __len__(self) -> int:
        return len(self.fields)


@dataclass(frozen=True)
class WirePosition:
    """A position row (message 61) with every value kept as the exact text sent."""

    account: str
    con_id: str
    symbol: str
    sec_type: str
    last_trade_date: str
    strike: str
    right: str
    multiplier: str
    exchange: str
    currency: str
    local_symbol: str
    trading_class: str
    quantity: str
    average_cost: str

    @property
    def quantity_decimal(self) -> Decimal:
        return Decimal(self.quantity)

    @property
    def average_cost_decimal(self) -> Decimal:
        return Decimal(self.average_cost)


#: Number of fields in a well-formed position message (id and version included).
POSITION_FIELD_COUNT = 16


def parse_position(msg: WireMessage | list[str] | tuple[str, ...]) -> WirePosition:
    """Decode a position message (61) exactly as ib_insync's decoder lays it out.

    Raises ``WireError`` for a wrong field count or a non-numeric number, which is also
    what makes the real client's decoder fail on the simulator's deliberately malformed
    frame.
    """
    fields = msg.fields if isinstance(msg, WireMessage) else tuple(msg)
    if int(fields[0]) != ServerMsg.POSITION_DATA:
        raise WireError(f"not a position message: {fields[0]}")
    if len(fields) != POSITION_FIELD_COUNT:
        raise WireError(f"position message has {len(fields)} fields, expected 16")
    position = WirePosition(*fields[2:])
    for name in ("con_id", "quantity", "average_cost"):
        text = getattr(position, name)
        try:
            float(text or 0)  # the client's own conversion, so we fail where it fails
        except ValueError:
            raise WireError(f"position message has a non-numeric {name}: {text!r}") from None
    return position


@dataclass(frozen=True)
class WireErrorMessage:
    """An IB error / notice message (4)."""

    req_id: int
    code: int
    message: str
    advanced_order_reject_json: str = ""


def parse_error_message(msg: WireMessage, server_version: int) -> WireErrorMessage:
    """Decode an error message (4) for the negotiated server version."""
    f = msg.fields
    advanced = ""
    if server_version >= MIN_SERVER_VER_ADVANCED_ORDER_REJECT and len(f) > 5:
        advanced = f[5]
    return WireErrorMessage(int(f[2]), int(f[3]), f[4], advanced)


# -- blocking test client ---------------------------------------------------------------


@dataclass
class PositionsResult:
    """What a reqPositions produced: the rows and whether positionEnd (62) arrived."""

    positions: list[WirePosition] = field(default_factory=list)
    end_received: bool = False
    malformed: list[WireMessage] = field(default_factory=list)
    errors: list[WireErrorMessage] = field(default_factory=list)
    closed: bool = False


class WireClient:
    """A tiny blocking TWS API client over a plain socket, for tests and debugging.

    It speaks just enough of the protocol to exercise a gateway (real or simulated)
    without ib_insync: handshake, startApi, sending arbitrary requests and reading frames.
    Messages that arrive while waiting for something else are kept in ``backlog`` and
    returned first by ``recv``, so nothing is silently lost.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.server_version = 0
        self.connection_time = ""
        self.next_valid_id: int | None = None
        self.managed_accounts: list[str] = []
        self.backlog: list[WireMessage] = []
        self._buffer = FrameBuffer()
        self._pending: list[bytes] = []
        self._eof = False

    # connection management

    def connect(self) -> WireClient:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self) -> WireClient:
        if self.sock is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handshake(
        self,
        min_version: int = DEFAULT_MIN_CLIENT_VERSION,
        max_version: int = DEFAULT_MAX_CLIENT_VERSION,
    ) -> int:
        """Send the ``API\\0`` greeting; return the server version the gateway chose."""
        if self.sock is None:
            self.connect()
        self._sendall(handshake_bytes(min_version, max_version))
        reply = self._recv_frame(self.timeout)
        if reply is None:
            raise WireError("connection closed during handshake")
        fields = decode_payload(reply)
        if len(fields) != 2:
            raise WireError(f"unexpected handshake reply: {fields!r}")
        self.server_version = int(fields[0])
        self.connection_time = fields[1]
        return self.server_version

    def start_api(self, client_id: int = 1, opt_capab: str = "") -> list[str]:
        """Send startApi and wait for nextValidId and managedAccounts, like ib_insync does.

        Raises ``WireError`` (with ``code``) if the gateway answers with an IB error that
        ends the session (e.g. 326, client id in use) or closes the connection.
        """
        self.send(ClientMsg.START_API, 2, client_id, opt_capab)
        got_id = got_accounts = False
        deadline = time.monotonic() + self.timeout
        while not (got_id and got_accounts):
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise WireError("connection closed before the API was ready")
            if msg.msg_id == ServerMsg.NEXT_VALID_ID:
                self.next_valid_id = int(msg[2])
                got_id = True
            elif msg.msg_id == ServerMsg.MANAGED_ACCTS:
                self.managed_accounts = [a for a in msg[2].split(",") if a]
                got_accounts = True
            elif msg.msg_id == ServerMsg.ERROR:
                err = parse_error_message(msg, self.server_version)
                if err.code == 326:
                    raise WireError(f"IB error {err.code}: {err.message}", code=err.code)
                self.backlog.append(msg)
            else:
                self.backlog.append(msg)
        return self.managed_accounts

    def connect_api(self, client_id: int = 1, **handshake_kwargs: int) -> WireClient:
        """Connect, handshake and start the API in one call."""
        if self.sock is None:
            self.connect()
        self.handshake(**handshake_kwargs)
        self.start_api(client_id)
        return self

    # messages

    def send(self, *fields: object) -> None:
        """Send one request made of the given fields."""
        self._sendall(make_message(*fields))

    def recv(self, timeout: float | None = None) -> WireMessage | None:
        """Return the next message, or ``None`` once the gateway closed the connection.

        Raises ``TimeoutError`` if nothing arrives within ``timeout`` seconds.
        """
        if self.backlog:
            return self.backlog.pop(0)
        payload = self._recv_frame(self.timeout if timeout is None else timeout)
        if payload is None:
            return None
        return WireMessage(tuple(decode_payload(payload)))

    def recv_until(self, msg_id: int, timeout: float | None = None) -> list[WireMessage]:
        """Read messages up to and including the first one with ``msg_id``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out: list[WireMessage] = []
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise WireError(f"connection closed while waiting for message {msg_id}")
            out.append(msg)
            if msg.msg_id == msg_id:
                return out

    def messages(self, timeout: float | None = None) -> Iterator[WireMessage]:
        """Iterate over messages until the connection closes (or a timeout raises)."""
        while (msg := self.recv(timeout)) is not None:
            yield msg

    def is_closed_by_peer(self, timeout: float = 1.0) -> bool:
        """True if the gateway closes the connection (EOF/reset) within ``timeout``.

        Any messages read meanwhile are kept in ``backlog``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                payload = self._recv_frame(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            except OSError:
                return True
            if payload is None:
                return True
            self.backlog.append(WireMessage(tuple(decode_payload(payload))))

    def request_positions(self, timeout: float | None = None) -> PositionsResult:
        """Send reqPositions and collect rows until positionEnd, EOF or timeout.

        A timeout is not an error here: it is how a hanging gateway shows up, so the
        result just has ``end_received=False``.
        """
        self.send(ClientMsg.REQ_POSITIONS, 1)
        result = PositionsResult()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                msg = self.recv(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return result
            except OSError:
                result.closed = True
                return result
            if msg is None:
                result.closed = True
                return result
            if msg.msg_id == ServerMsg.POSITION_DATA:
                try:
                    result.positions.append(parse_position(msg))
                except (WireError, ValueError):
                    result.malformed.append(msg)
            elif msg.msg_id == ServerMsg.POSITION_END:
                result.end_received = True
                return result
            elif msg.msg_id == ServerMsg.ERROR:
                result.errors.append(parse_error_message(msg, self.server_version))

    # socket plumbing

    def _sendall(self, data: bytes) -> None:
        if self.sock is None:
            raise WireError("not connected")
        self.sock.sendall(data)

    def _recv_frame(self, timeout: float) -> bytes | None:
        if self._pending:
            return self._pending.pop(0)
        if self._eof:
            return None
        if self.sock is None:
            raise WireError("not connected")
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the gateway in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(1 << 16)  # raises TimeoutError when nothing arrives
            if not data:
                self._eof = True
                return None
            self._pending.extend(self._buffer.feed(data))
        return self._pending.pop(0)
