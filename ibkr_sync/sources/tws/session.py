"""The TWS source: one read of a running TWS / IB Gateway, through the IB client library.

Here: the event loop, timeouts, the connection's lifetime, the handshake and the race of
every request against the session's failures (the codes are `errors.py`'s, the frames
`decoding.py`'s, the values `values.py`'s). The rest of the project sees only
`TwsSource.fetch_positions()` and the source-neutral `snapshot.Snapshot` it returns,
with `Decimal` values and snake_case names, `source` "tws" and `as_of` the moment the
gateway's end of positions was read (each account's values: the moment its download
end was read), the moments the data describes rather than when it is written.

Why it is shaped this way:

- Each read runs in a private thread with its own event loop. A WSGI worker thread has
  no event loop (ib_insync needs one, even to be imported), and inside a running loop
  (ASGI, async views) the library's blocking calls fail while their work goes on in the
  background holding the client id. A private loop avoids both, and it is closed with
  its thread when the read ends, so nothing dangles.
- We connect with the bare API handshake and then ask for positions once, waiting for
  the gateway's end-of-positions marker. `IB.connect()` also reads positions, but it
  only logs a start-up request that timed out, so its position list may be silently
  incomplete; a snapshot here is complete or it is an error, never a short portfolio
  that would close positions that are still held.
- Quantities and average costs are taken from the wire text, not from the library's
  floats, so fractional shares arrive exactly as the gateway sent them, read with the TWS
  wire grammar (`protocol.py`): IBKR's "no value" markers never become numbers. The
  position messages are kept as they came (`positions.py`), with a digest of each
  account's: a sync that says which digests it wrote last (`written`) has the messages
  of those accounts left undecoded, which at 10,000s of positions is most of a read.
- Every frame of the session goes through one guard: a frame the client library cannot
  decode, or one in a layout we do not expect, makes the read incomplete. The library
  would only log it, and a position we could not read must never be closed as gone.
- One read at a time per gateway login (address and client id) in a process; reads of
  different gateways run side by side, each in its own thread and event loop, so a
  dropped connection of one cancels nothing of another.
- After the positions, in the same connection, each account's values (`_read_values`):
  one account-updates subscription at a time (`reqAccountUpdates`, which TWS serves for
  one account at a time), read up to its download-end marker, then cancelled. It is the
  one request that gives both the account's values (cash and exchange rate per currency,
  net liquidation, P&L) and every position's market value, for any number of accounts
  and for linked and advisor accounts alike (`reqAccountSummary` has no position values
  and refuses group "All" to an advisor with more than 50 sub-accounts; `reqPnLSingle`
  would be one subscription per position). The messages are read off the wire, exactly,
  like the positions. An account whose values time out, are refused (2100, 2101), are
  not ready or come in a frame that cannot be read is reported missing with the reason:
  it never fails the positions, which were complete before the first value was asked for.
- What a read decides follows the order of the messages on the wire, never how the bytes
  were cut into TCP segments or how long apart they came: the client library hands over
  every message of a segment at once, before our coroutine runs again. So each decision
  is taken in the message handlers, as each message is read: the positions end at their
  end marker (what follows is not theirs), an account's values end at their end marker
  or first problem, the next account's read opens right there, and a failure of the
  session (a lost link to IBKR: 1100, 2110, 1101) spoils the download it falls into.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ...conf import GatewayConfig
from ...exceptions import (
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    IbkrSyncError,
    NotAGateway,
    SyncAlreadyRunning,
    UnknownAccount,
)
from ...snapshot import PositionRecord, Snapshot
from .decoding import Decoding
from .errors import _cut, _port_checklist, _setup_checklist, _shown_bytes, logger
from .positions import Written, incomplete_read
from .state import _ReadState
from .values import ValuesRead

T = TypeVar("T")

#: What a snapshot of this source names as its source.
SOURCE = "tws"

# What a gateway answers the API handshake with: one frame of two NUL-terminated fields,
# its server version and the connection time (`176`, `20240105 10:00:00 EST`). A first
# frame longer than this, or empty, is not such an answer.
_MAX_HANDSHAKE_REPLY = 1024
# How long a connect timeout's follow-up asks the peer whether it speaks HTTP.
_HTTP_PROBE_TIMEOUT = 0.5

# One read at a time per gateway login (address and client id) in this process: a second
# would be refused by the gateway (client id in use) after its connect timeout. Reads of
# different gateways run side by side, each in a thread and event loop of its own.
_reads_lock = threading.Lock()
_reading: set[tuple[str, int, int]] = set()


@dataclass(frozen=True)
class Handshake:
    """What a gateway says when a client connects: no positions, no values."""

    address: str
    server_version: int
    accounts: tuple[str, ...]

    #: As `snapshot.ConnectionCheck` has them: what the edges print of any source's test.
    source = "tws"
    lacking: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return (
            f"server version {self.server_version}, accounts {', '.join(self.accounts) or 'none'}"
        )


class TwsSource(ValuesRead, Decoding):
    """Reads managed accounts and positions from a running TWS / IB Gateway."""

    def __init__(
        self,
        config: GatewayConfig | None = None,
        *,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config or GatewayConfig.from_settings()
        # Told ("read", positions received so far) as they arrive, for a progress display.
        self.progress = progress

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def port_is_open(self, timeout: float = 2.0) -> bool:
        """Whether the gateway's API port accepts a TCP connection. A plain connect, no API
        handshake: it takes no client id and disturbs no running sync."""
        try:
            with socket.create_connection(
                (self.config.host, self.config.port),
                timeout=min(timeout, self.config.connect_timeout),
            ):
                return True
        except OSError:
            return False

    #: `fetch_positions` takes `written`: it need not decode every position message.
    defers_positions = True

    def fetch_positions(
        self, account_id: str | None = None, *, written: Written | None = None
    ) -> Snapshot:
        """Connect read-only, read every position (of one account, if given), disconnect.

        `written(account, digest)`: whether `digest` (`PositionMessages.digest`) is that
        of the positions last written for the account. The messages of such an account
        are then left undecoded (its records are decoded if asked for); the others are
        decoded as always, and a message that cannot be read fails the read as always.
        Not used when the read takes values, which are read against every position."""
        with self._one_read():
            return _run_in_private_loop(lambda: self._read(account_id, written))

    def handshake(self) -> Handshake:
        """Connect, read what the gateway says of itself (its server version and the
        accounts it manages), disconnect: no positions, no values. Fails as a sync would,
        with the same errors (refused, not a gateway, timeout, client id in use)."""
        with self._one_read():
            return _run_in_private_loop(self._handshake)

    @contextlib.contextmanager
    def _one_read(self) -> Any:
        cfg = self.config
        login = (cfg.host, cfg.port, cfg.client_id)
        with _reads_lock:
            if login in _reading:
                raise SyncAlreadyRunning(
                    f"Another sync is reading from the IB gateway at {self.address} with "
                    f"client id {cfg.client_id} in this process; try again later."
                )
            _reading.add(login)
        try:
            with _library_log_kept(cfg.library):
                yield
        finally:
            with _reads_lock:
                _reading.discard(login)

    # --- everything below runs on the private event loop --------------------------------

    async def _handshake(self) -> Handshake:
        ib, state = self._session()
        cfg = self.config
        try:
            await self._connect(ib, state)
            client = ib.client
            return Handshake(
                address=self.address,
                server_version=client.serverVersion(),
                accounts=tuple(client.getAccounts()),
            )
        finally:
            await self._disconnect(ib)
            logger.debug("Handshake with %s (client id %s) done", self.address, cfg.client_id)

    def _session(self) -> tuple[Any, _ReadState]:
        """A client of the library, every message of its session going through our guards."""
        library = importlib.import_module(self.config.library)
        ib = library.IB()
        ib.RequestTimeout = self.config.request_timeout
        state = _ReadState(failure=asyncio.get_running_loop().create_future())
        # The library answers a 1102 ("connectivity restored, data maintained") by asking
        # for every account's summary (group "All"): a request of its own, which a read
        # never makes and TWS may refuse (an advisor of more than 50 accounts; a third
        # summary subscription at once). A read asks for positions and values only.
        own_reaction = getattr(ib, "_onError", None)
        if own_reaction is not None:
            ib.errorEvent -= own_reaction
        ib.errorEvent += lambda *args: self._on_error(state, *args)
        ib.client.apiError += lambda message: self._on_api_error(state, message)
        # The library reports a socket closed before the handshake finished only in its
        # log; without this the read would wait for the connect timeout.
        self._decode_positions_ourselves(ib, state)
        self._decode_values_ourselves(ib, state)
        self._guard_decoding(ib, state)
        connection = getattr(ib.client, "conn", None)
        if connection is not None and hasattr(connection, "disconnected"):
            connection.disconnected += lambda message: self._on_socket_closed(state, message)
            self._guard_handshake(connection, state, ib)
        return ib, state

    async def _connect(self, ib: Any, state: _ReadState) -> None:
        cfg = self.config
        ib.wrapper.clientId = cfg.client_id
        await self._race(
            ib.client.connectAsync(cfg.host, cfg.port, cfg.client_id, cfg.connect_timeout),
            state,
            "connect_timeout",
            "connect",
        )

    async def _read(self, account_id: str | None, written: Written | None = None) -> Snapshot:
        cfg = self.config
        ib, state = self._session()
        messages = state.messages
        if messages is not None:
            messages.account = account_id
            if written is not None and not cfg.read_values:
                messages.defer(written)
        try:
            await self._connect(ib, state)
            managed = tuple(ib.client.getAccounts())
            if account_id is not None and account_id not in managed:
                raise UnknownAccount(
                    f"Account {account_id} is not managed by the IB gateway at {self.address} "
                    f"(it manages: {', '.join(managed) or 'none'})."
                )
            accounts = (account_id,) if account_id is not None else managed
            if cfg.read_values:
                state.values_plan.extend((account, 1) for account in accounts)
            state.positions_requested = True
            try:
                await self._race(ib.reqPositionsAsync(), state, "request_timeout", "send positions")
            except IbkrSyncError:
                # A failure after the positions' end on the wire is the values' business,
                # however soon after it came.
                if not state.positions_complete:
                    raise
            if not state.positions_ended:  # a library without a decoder table: now
                if messages is not None:
                    messages.settle()
                state.end_positions()
            if not state.positions_complete:
                # The session failed before the positions' end on the wire, and the end
                # followed so soon (the same segment) that the request finished too.
                raise state.failure.result()
            if state.unreadable_at_positions_end:
                raise incomplete_read(
                    self.address, state.unreadable_at_positions_end, state.unreadable_examples
                )
            positions: Sequence[PositionRecord]
            if messages is not None:
                positions = messages
            else:  # read from the library's position events
                positions = tuple(
                    p
                    for p in state.positions.values()
                    if p.quantity != 0 and (account_id is None or p.account == account_id)
                )
            server_version = ib.client.serverVersion()
            read = {"source": SOURCE, "as_of": state.positions_as_of}
            if not cfg.read_values:
                return Snapshot(accounts, positions, managed, server_version, **read)
            values, missing = await self._read_values(ib, state)
            return Snapshot(
                accounts,
                positions,
                managed,
                server_version,
                values_read=True,
                account_values=values,
                values_missing=missing,
                **read,
            )
        finally:
            await self._disconnect(ib)

    async def _race(
        self, awaitable: Awaitable[T], state: _ReadState, timeout_name: str, what: str
    ) -> T:
        """Await a library call, but give up at once on a fatal gateway error or timeout
        (the config's `timeout_name`: a timeout says how long, and what set it)."""
        timeout = getattr(self.config, timeout_name)
        task = asyncio.ensure_future(awaitable)
        failure = state.failure
        done, _ = await asyncio.wait(
            {task, failure}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        if state.decisive_failure is not None or (failure in done and task not in done):
            await self._cancel(task)
            raise failure.result()
        if task not in done:
            await self._cancel(task)
            handshake = state.handshake
            if what == "connect" and handshake.connected and not handshake.received:
                # Accepted, and not a word back: a web server waiting for the end of a
                # request line does that, as does TWS showing its "accept?" dialog.
                status_line = await self._http_status_line()
                if status_line:
                    raise NotAGateway(
                        f"{self.address} answered, but not as TWS / IB Gateway: it did not "
                        f"answer the API handshake within {timeout:g} s, and it speaks "
                        f"HTTP ({_cut(status_line, 60)!r} to a request on a connection of "
                        "its own): a web server; nothing was changed. "
                        + _port_checklist(self.config)
                    )
            raise GatewayTimeout(
                f"The IB gateway at {self.address} did not {what} within "
                f"{self.config.timeout_said(timeout_name)}; nothing was changed."
            )
        try:
            return task.result()
        except TimeoutError:  # before OSError: in 3.11 it is a subclass of it
            raise GatewayTimeout(
                f"The IB gateway at {self.address} did not {what} within "
                f"{self.config.timeout_said(timeout_name)}; nothing was changed."
            ) from None
        except ConnectionRefusedError:
            raise GatewayUnavailable(
                f"Cannot connect to the IB gateway at {self.address}: connection refused. "
                + _setup_checklist(self.config)
            ) from None
        except ConnectionError as exc:
            if isinstance(exc, ConnectionResetError) and not state.handshake.answered:
                # Reset while connecting: it accepted the connection, then reset it at
                # once (as when it closes at once, only sooner).
                raise self._not_a_gateway("reset it at once", closed=True) from None
            raise GatewayUnavailable(
                f"The connection to the IB gateway at {self.address} was lost while waiting "
                f"for it to {what} ({exc}); nothing was changed. " + _setup_checklist(self.config)
            ) from None
        except OSError as exc:
            raise GatewayUnavailable(
                f"Cannot connect to the IB gateway at {self.address}: "
                f"{exc.strerror or exc}. " + _setup_checklist(self.config)
            ) from None

    async def _http_status_line(self, timeout: float = _HTTP_PROBE_TIMEOUT) -> str:
        """The status line the peer answers an HTTP request with, on a connection of its
        own, or "" (no answer within `timeout`, or not HTTP). Asked only after a connect
        timeout, when the peer accepted and said nothing."""
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.config.host, self.config.port)
                writer.write(f"HEAD / HTTP/1.0\r\nHost: {self.config.host}\r\n\r\n".encode())
                await writer.drain()
                line = await reader.readline()
        except (OSError, TimeoutError, ValueError):
            return ""
        finally:
            if writer is not None:
                writer.close()
        text = line.decode("latin-1").strip()
        return text if re.match(r"HTTP/\d(\.\d)? \d{3}", text) else ""

    @staticmethod
    async def _cancel(task: asyncio.Future) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _disconnect(self, ib: Any) -> None:
        try:
            ib.disconnect()
        except ConnectionError:
            # Socket up, API handshake unfinished (e.g. after error 326): IB.disconnect()
            # raises 'Not connected'; close the socket underneath instead.
            ib.client.disconnect()
        except Exception:
            logger.debug("Error while disconnecting from %s", self.address, exc_info=True)
        # Let the transport's close callbacks run before the loop goes away.
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    def _guard_handshake(self, connection: Any, state: _ReadState, ib: Any) -> None:
        """Look at what answers the API handshake before the client library does.

        The library takes the first four bytes it receives as a frame length and waits
        for that many bytes: a web server's `HTTP/1.1 400` is a frame of 1.2 GB to it,
        and a peer that sends something else (or nothing, and closes) leaves it waiting
        for the connect timeout, which is then blamed. Here the first frame is held back
        until it is complete and checked: a gateway's answer (two fields, the first its
        server version) goes on to the library, anything else fails the read at once,
        naming the address and what answered; so does a server version the library
        cannot read (`_unreadable_version`). What follows it is cut into frames here
        (`decoding.Frames`), position messages read by us, the rest passed on.
        """
        handshake = state.handshake
        made, received = connection.connection_made, connection.data_received
        lost = connection.connection_lost
        frames = self._position_frames(ib, state, received)

        def connection_made(transport: Any) -> None:
            handshake.connected = True
            made(transport)

        def connection_lost(exc: Exception | None) -> None:
            # Before the library hears of it (it would call it a lost connection).
            self._closed_unanswered(state)
            lost(exc)

        def data_received(data: bytes) -> None:
            if handshake.answered:
                frames(data)
                return
            if handshake.refused:
                return
            handshake.received += data
            verdict = _handshake_verdict(bytes(handshake.received))
            if verdict is None:  # not complete yet
                return
            if verdict:
                handshake.refused = True
                state.fail(self._not_a_gateway(verdict))
                return
            held, handshake.received = bytes(handshake.received), bytearray()
            answer = 4 + struct.unpack(">I", held[:4])[0]
            unreadable = self._unreadable_version(ib, int(held[4:answer].split(b"\0", 1)[0]))
            if unreadable is not None:
                handshake.refused = True
                state.fail(unreadable)
                return
            handshake.answered = True
            received(held[:answer])  # the answer, to the library; what came after it, framed
            if len(held) > answer:
                frames(held[answer:])

        # Instance attributes: asyncio calls the protocol's methods by name.
        connection.connection_made = connection_made
        connection.data_received = data_received
        connection.connection_lost = connection_lost

    def _unreadable_version(self, ib: Any, version: int) -> GatewayError | None:
        """Why a gateway's server version cannot be read by the client library, if so.

        The client offers a range of versions in the handshake (`v157..176`), and a
        gateway answers with the highest it speaks within it. Below it, TWS / IB Gateway
        is older than the library reads (the library itself only says "TWS/gateway
        version must be >= 972" and closes, which would read as a gateway that closed
        the connection); above it, the gateway's frames come in layouts the library does
        not know (from 194 on an error message has no version field, so even a data
        farm's "OK" could not be read), which no gateway does.
        """
        client = ib.client
        lowest = getattr(client, "MinClientVersion", None)
        highest = getattr(client, "MaxClientVersion", None)
        if lowest is None or highest is None or lowest <= version <= highest:
            return None
        library = self.config.library
        if version < lowest:
            return GatewayError(
                f"The IB gateway at {self.address} answered with server version {version}, "
                f"older than the client library ({library}) can read ({lowest} to "
                f"{highest}); nothing was changed. Upgrade TWS / IB Gateway to a current "
                "version."
            )
        return GatewayError(
            f"The IB gateway at {self.address} answered with server version {version}, "
            f"outside the versions the client library ({library}) offered ({lowest} to "
            f"{highest}): its messages would come in layouts the library does not read; "
            "nothing was changed. A TWS / IB Gateway answers within them: check what "
            "listens there. " + _port_checklist(self.config)
        )

    def _closed_unanswered(self, state: _ReadState) -> None:
        """A peer that accepted the connection and closed it (or reset it) before answering
        the API handshake: a gateway does not, unless it refuses this client. (After a
        connect timeout the read has failed already; the first failure stands.)"""
        handshake = state.handshake
        if not handshake.connected or handshake.answered or handshake.refused:
            return
        handshake.refused = True
        if handshake.received:
            what = (
                f"it sent {_shown_bytes(bytes(handshake.received))}, which is not an answer "
                "to the API handshake, and closed the connection"
            )
        else:
            what = "it closed the connection without answering the API handshake"
        state.fail(self._not_a_gateway(what, closed=True))


def _handshake_verdict(data: bytes) -> str | None:
    """What is wrong with `data` (the bytes received so far) as a gateway's answer to the
    API handshake: "" if it is one, None if it cannot be told yet, else what it is."""
    if data[:4] == b"HTTP"[: len(data)] and len(data) < 5:
        return None
    if data.startswith(b"HTTP/"):
        status = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        return f"it speaks HTTP ({_shown_bytes(status)})"
    if len(data) < 4:
        return None
    (length,) = struct.unpack(">I", data[:4])
    if length == 0 or length > _MAX_HANDSHAKE_REPLY:
        return (
            f"its first frame would be {length:,} bytes long, which no answer to the API "
            f"handshake is (it sent {_shown_bytes(data)})"
        )
    if len(data) < 4 + length:
        return None
    fields = data[4 : 4 + length].split(b"\0")
    if len(fields) != 3 or fields[2] != b"" or not fields[0].isdigit():
        return (
            "its first frame is not an answer to the API handshake (a server version and "
            f"a time): it sent {_shown_bytes(data[: 4 + length])}"
        )
    return ""


# The loggers of the client libraries (their client, wrapper, ib and decoder are children
# of these) and of the event library they emit through.
_LIBRARY_LOGGERS = {"ib_insync": ("ib_insync", "eventkit"), "ib_async": ("ib_async", "eventkit")}
_READ_THREAD = "ibkr-gateway-read"
# Marks the library's records as re-logged here, for a handler that shows both.
LIBRARY_RECORD = "ibkr_library_record"


class _LibraryLog(logging.Handler):
    """Takes the client library's records during a read: re-logged at DEBUG under
    `ibkr_sync.gateway`, for a host that wants them. A record another thread logs
    meanwhile (a host's own use of the library) goes on to the host's handlers, as if
    it had propagated."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName != _READ_THREAD:
            logging.getLogger().callHandlers(record)
            return
        logger.debug(
            "%s %s: %s",
            record.name,
            record.levelname,
            record.getMessage(),
            exc_info=record.exc_info,
            extra={LIBRARY_RECORD: True},
        )


@contextlib.contextmanager
def _library_log_kept(library: str) -> Any:
    """Keep the client library's log off the host's handlers for the duration of a read.

    The library logs what we turn into one clear error (`API connection failed: ...`,
    `Make sure API port on TWS/IBG is open`, a frame it could not decode) at ERROR. In a
    host whose root logger has a console handler, or none at all (Python then prints
    WARNING and above on stderr), those lines would appear before the error we raise:
    before the one line `sync_ibkr` promises, or in a web server's console. Handlers
    configured on the library's own loggers (IBKR_LIBRARY_LOG_LEVEL, `sync_ibkr -v 2`)
    still get every record. Reads of several gateways may overlap in a process: the
    first to start keeps the log, the last to end gives it back.
    """
    names = _LIBRARY_LOGGERS.get(library, (library, "eventkit"))
    with _log_lock:
        for name in names:
            if _log_holders[name] == 0:
                library_logger = logging.getLogger(name)
                _log_kept[name] = library_logger.propagate
                library_logger.addHandler(_log_handler)
                library_logger.propagate = False
            _log_holders[name] += 1
    try:
        yield
    finally:
        with _log_lock:
            for name in names:
                _log_holders[name] -= 1
                if _log_holders[name] == 0:
                    library_logger = logging.getLogger(name)
                    library_logger.removeHandler(_log_handler)
                    library_logger.propagate = _log_kept.pop(name)


_log_lock = threading.Lock()
_log_holders: collections.Counter[str] = collections.Counter()
_log_kept: dict[str, bool] = {}
_log_handler = _LibraryLog()


def _on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception the private loop would log (a callback of the library that failed):
    ours to record, not the host's console's; the read's own outcome says what failed."""
    logger.debug(
        "In the IB client's event loop: %s",
        context.get("message"),
        exc_info=context.get("exception"),
    )


def _run_in_private_loop(make_coroutine: Any) -> Any:
    """Run a coroutine on a new event loop in a new thread; return its result or raise."""
    outcome: dict[str, Any] = {}

    def worker() -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_on_loop_exception)
        asyncio.set_event_loop(loop)
        try:
            outcome["result"] = loop.run_until_complete(make_coroutine())
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    thread = threading.Thread(target=worker, name=_READ_THREAD, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
