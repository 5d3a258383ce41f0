"""The one adapter between this project and the IB client library (ib_insync or ib_async).

Everything library-specific lives here: the event loop, timeouts, the connection's
lifetime and the translation of IB errors into our exceptions. The rest of the project
sees only `IbkrGateway.fetch_positions()` and the frozen dataclasses it returns, with
`Decimal` values and snake_case names.

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
  wire grammar (`protocol.py`): IBKR's "no value" markers never become numbers.
- Every frame of the session goes through one guard: a frame the client library cannot
  decode, or one in a layout we do not expect, makes the read incomplete. The library
  would only log it, and a position we could not read must never be closed as gone.
- One read at a time per process: a dropped IB connection cancels blocking calls of
  every other IB instance in the process.
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
import contextlib
import importlib
import logging
import re
import socket
import struct
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from sys import intern
from typing import Any, TypeVar

from .conf import GatewayConfig
from .exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    IbkrSyncError,
    IncompleteSnapshot,
    NoManagedAccounts,
    NotAGateway,
    SyncAlreadyRunning,
    UnknownAccount,
)
from .protocol import (
    ACCOUNT_DOWNLOAD_END_MESSAGE_ID,
    ACCOUNT_VALUE_FIELDS,
    ACCOUNT_VALUE_MESSAGE_ID,
    ACCOUNT_VALUE_TAGS,
    ACCOUNT_VALUE_VERSION,
    PORTFOLIO_FIELDS,
    PORTFOLIO_MESSAGE_ID,
    PORTFOLIO_VERSION,
    POSITION_FIELDS,
    POSITION_MESSAGE_ID,
    POSITION_VERSION,
    UNSET,
    WireValueError,
    parse_decimal,
    parse_integer,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Message ids of the TWS protocol that we read ourselves or look at.
_MSG_ERROR = 4
_MSG_NEXT_VALID_ID = 9
_MSG_MANAGED_ACCOUNTS = 15
_MSG_POSITION = POSITION_MESSAGE_ID
_MSG_POSITION_END = 62
# The exact field counts of the messages that start and end a read besides the positions
# (which `_position_from_wire` checks): the library would take a short one as it is.
_FIELD_COUNTS = {_MSG_MANAGED_ACCOUNTS: 3, _MSG_NEXT_VALID_ID: 3, _MSG_POSITION_END: 2}

# IB error codes that end a read, decided here and nowhere else. Everything else the
# gateway says during a read is informational and only logged: the data farms' status
# (2104/2106/2158 OK, 2107/2108 inactive, 2119 connecting, and 2103/2105/2157 one farm's
# link broken: market, historical and contract data, not the account server the
# positions and values come from; TWS sends them routinely, at every connect), and 1102
# "connectivity restored, data maintained".
# 1100 and 2110 both mean TWS / Gateway has lost its link to IBKR's servers, and 1101
# that it is back but every request in flight was dropped ("data lost"; the client
# library's own watchdog restarts on 1100): what it reported around them may be stale or
# partial. Before the positions' end they fail the read and nothing is written (no
# position is closed because of an outage); after it, like every failure of the session,
# they spoil each account whose values had not ended before them on the wire. A 1101 or
# 1102 after them spoils nothing back. The next sync after it recovers reads afresh.
_CLIENT_ID_IN_USE = 326
_GATEWAY_DOWN_CODES = frozenset({502, 504, 1300})
_SERVER_LINK_DOWN_CODES = frozenset({1100, 1101, 2110})
_REQUEST_FAILED_CODES = frozenset({321, 322})
# The account-updates subscription was taken over (2100: TWS serves one account at a
# time) or refused because another client holds one for a different account (2101): the
# values of the account being read are then incomplete, its positions are not affected.
# An account has a few dozen such values (a handful per currency it holds): far more is
# not an account's values, and would only cost memory.
_MAX_VALUES = 2000
_ACCOUNT_DATA_UNSUBSCRIBED = 2100
_ACCOUNT_DATA_REFUSED = 2101
_ACCOUNT_DATA_CODES = {
    _ACCOUNT_DATA_UNSUBSCRIBED: ("ended", "warning", "another request took it over"),
    _ACCOUNT_DATA_REFUSED: ("refused", "error", "another client holds it for a different account"),
}

_SETUP_CHECKLIST = (
    "Check that TWS or IB Gateway is running and logged in, that 'Enable ActiveX and "
    "Socket Clients' is checked in its API settings, that the API port matches "
    "IBKR_PORT, and that this machine's IP address is in its trusted IPs."
)

# What a gateway answers the API handshake with: one frame of two NUL-terminated fields,
# its server version and the connection time (`176`, `20240105 10:00:00 EST`). A first
# frame longer than this, or empty, is not such an answer.
_MAX_HANDSHAKE_REPLY = 1024
_PORT_CHECKLIST = (
    "Check that IBKR_HOST and IBKR_PORT name the API port of TWS / IB Gateway (its API "
    "settings' 'Socket port'; by default 7496 live / 7497 paper for TWS, 4001 / 4002 for "
    "IB Gateway)."
)

# How long a connect timeout's follow-up asks the peer whether it speaks HTTP.
_HTTP_PROBE_TIMEOUT = 0.5

_process_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class GatewayPosition:
    """One position row as the gateway reported it, before any mapping.

    `average_cost` is None when IBKR reported none (one of its "no value" markers); a
    quantity is always a number, since a read with an unset quantity is incomplete.
    """

    account: str
    con_id: int
    symbol: str
    sec_type: str
    quantity: Decimal
    average_cost: Decimal | None
    currency: str = ""
    exchange: str = ""
    primary_exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    multiplier: str = ""
    last_trade_date: str = ""
    strike: Decimal | None = None
    right: str = ""


@dataclass(frozen=True, slots=True)
class GatewayPositionValue:
    """IBKR's values of one position (a portfolio message), None where it sent "no value".

    `quantity` is the position's quantity as the same message states it: the values
    belong to that quantity, which may differ from the position read moments before if a
    trade happened in between.
    """

    con_id: int
    quantity: Decimal
    market_price: Decimal | None
    market_value: Decimal | None
    unrealized_pnl: Decimal | None
    realized_pnl: Decimal | None


@dataclass(frozen=True)
class GatewayAccountValues:
    """One account's values, complete up to the end of its first download.

    `values` holds the tags a sync reads (`protocol.ACCOUNT_VALUE_TAGS`) by (tag,
    currency), None where IBKR sent "no value"; `positions` the position values by conId.
    """

    account: str
    values: dict[tuple[str, str], Decimal | None]
    positions: dict[int, GatewayPositionValue]


@dataclass(frozen=True)
class GatewaySnapshot:
    """Every open position of the accounts read, complete up to the end marker; and, when
    asked for, each account's values, or why they could not be read."""

    accounts: tuple[str, ...]
    positions: tuple[GatewayPosition, ...]
    managed_accounts: tuple[str, ...] = ()
    server_version: int | None = None
    # Whether values were asked for; then every account read is in exactly one of these.
    values_read: bool = False
    account_values: dict[str, GatewayAccountValues] = field(default_factory=dict)
    values_missing: dict[str, str] = field(default_factory=dict)


def _float_decimal(value: float | None) -> Decimal | None:
    """A library float as the decimal the wire carried (repr() is the shortest text that
    round-trips), or None for IBKR's "no value" markers."""
    if value is None:
        return None
    number = parse_decimal(repr(float(value)))
    return None if number is UNSET else number


@dataclass
class _Handshake:
    """What the peer sent in answer to the API handshake, until it is known to be TWS."""

    connected: bool = False
    # A gateway's handshake answer arrived: from then on the frames are the library's.
    answered: bool = False
    # It is known not to be a gateway: nothing more of its bytes is looked at.
    refused: bool = False
    received: bytearray = field(default_factory=bytearray)


@dataclass
class _ReadState:
    """What one read has seen so far; filled by library callbacks on the private loop."""

    failure: asyncio.Future | None = None
    handshake: _Handshake = field(default_factory=_Handshake)
    # Frames that could not be read: any of them makes the read incomplete.
    unreadable: int = 0
    # The first few, for the error message: a hostile peer's flood costs a count, no memory.
    unreadable_examples: list[str] = field(default_factory=list)

    def note_unreadable(self, description: str) -> None:
        self.unreadable += 1
        if len(self.unreadable_examples) < 3:
            self.unreadable_examples.append(description)

    positions: dict[tuple[str, int], GatewayPosition] = field(default_factory=dict)
    # Whether our positions request was sent, and its end (positionEnd) read: the
    # positions are what came before it on the wire, complete if the session had not
    # failed by then. What comes after it is the values' business.
    positions_requested: bool = False
    positions_ended: bool = False
    positions_complete: bool = False
    unreadable_at_positions_end: int = 0
    # The accounts whose values are to be read, in turn: (account, attempt).
    values_plan: deque[tuple[str, int]] = field(default_factory=deque)
    # The account whose values are being read. It is open from the moment the previous
    # download ended (or the positions did) on the wire, before it is even asked for.
    values: _AccountRead | None = None
    values_requested: bool = False
    # Every read opened, in turn, until the read's coroutine takes it: some end on the
    # wire before it gets to them.
    values_opened: deque[_AccountRead] = field(default_factory=deque)

    def fail(self, error: IbkrSyncError) -> None:
        # The first failure wins: a 326 is followed by the socket closing, and the
        # clear reason is the 326, not the close.
        if self.failure is not None and not self.failure.done():
            self.failure.set_result(error)
            # At this point of the wire, not when the read's coroutine next runs: what
            # follows the failure in the same segment must not complete the download.
            if self.values is not None:
                self.values.spoil(
                    "not read: the session with the IB gateway failed before the account's "
                    f"download ended ({_cut(str(error))}); its stored values were kept"
                )

    def end_positions(self) -> None:
        """The positions' end, read off the wire: the moment that decides what belongs to
        the positions and what to the values, whatever TCP segments the bytes came in."""
        self.positions_ended = True
        self.positions_complete = self.failure is None or not self.failure.done()
        self.unreadable_at_positions_end = self.unreadable
        self.open_next_values_read()

    def open_next_values_read(self) -> None:
        """Open the next account's read where the previous one ended on the wire.

        Whatever arrives after a download's end (or the positions' end) and before the
        next account's values is that next account's, however long the read's coroutine
        takes to ask for them: an undecodable frame, a refusal, a lost link in that gap
        count for it, as they would had the bytes come a moment later. After a failure of
        the session nothing more is opened: the accounts left are not read.
        """
        self.values = None
        if not self.values_plan or (self.failure is not None and self.failure.done()):
            return
        account, attempt = self.values_plan.popleft()
        self.values = _AccountRead(
            account,
            asyncio.get_running_loop().create_future(),
            attempt=attempt,
            after_cancel=self.values_requested,
            unreadable_at_start=self.unreadable,
            on_end=self.open_next_values_read,
        )
        self.values_opened.append(self.values)

    def reads_left(self, attempt: int) -> int:
        """The open read and those after it in the same attempt."""
        return 1 + sum(1 for _, planned in self.values_plan if planned == attempt)

    @property
    def decisive_failure(self) -> IbkrSyncError | None:
        """A failure the gateway stated with an error code, which explains it best."""
        if self.failure is None or not self.failure.done():
            return None
        error = self.failure.result()
        return error if getattr(error, "ib_code", None) is not None else None


@dataclass
class _AccountRead:
    """One account's values as they arrive; `done` is set at its download end or at the
    first problem (which then is the reason its values are missing). Once done, nothing
    more is taken into it: an update right behind the download end is not part of it,
    and the next account's read opens at once (`on_end`)."""

    account: str
    done: asyncio.Future
    attempt: int = 1
    # Whether a subscription of ours was asked for (and so cancelled) before this one (a
    # 2100 then may be the answer to that cancel).
    after_cancel: bool = False
    values: dict[tuple[str, str], Decimal | None] = field(default_factory=dict)
    positions: dict[int, GatewayPositionValue] = field(default_factory=dict)
    problem: str | None = None
    unreadable_at_start: int = 0
    unreadable_at_end: int = 0
    on_end: Callable[[], None] | None = None

    def spoil(self, reason: str) -> None:
        if self.done.done():
            return
        self.problem = reason
        self.end()

    def end(self) -> None:
        self.done.set_result(None)
        if self.on_end is not None:
            self.on_end()


class IbkrGateway:
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

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot:
        """Connect read-only, read every position (of one account, if given), disconnect."""
        if not _process_lock.acquire(blocking=False):
            raise SyncAlreadyRunning(
                "Another sync is reading from the IB gateway in this process; try again later."
            )
        try:
            with _library_log_kept(self.config.library):
                return _run_in_private_loop(lambda: self._read(account_id))
        finally:
            _process_lock.release()

    # --- everything below runs on the private event loop --------------------------------

    async def _read(self, account_id: str | None) -> GatewaySnapshot:
        cfg = self.config
        library = importlib.import_module(cfg.library)
        ib = library.IB()
        ib.RequestTimeout = cfg.request_timeout
        state = _ReadState(failure=asyncio.get_running_loop().create_future())
        ib.errorEvent += lambda *args: self._on_error(state, *args)
        ib.client.apiError += lambda message: self._on_api_error(state, message)
        # The library reports a socket closed before the handshake finished only in its
        # log; without this the read would wait for the connect timeout.
        connection = getattr(ib.client, "conn", None)
        if connection is not None and hasattr(connection, "disconnected"):
            connection.disconnected += lambda message: self._on_socket_closed(state, message)
            self._guard_handshake(connection, state)
        self._decode_positions_ourselves(ib, state)
        self._decode_values_ourselves(ib, state)
        self._guard_decoding(ib, state)
        try:
            ib.wrapper.clientId = cfg.client_id
            await self._race(
                ib.client.connectAsync(cfg.host, cfg.port, cfg.client_id, cfg.connect_timeout),
                state,
                cfg.connect_timeout,
                "connect",
            )
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
                await self._race(
                    ib.reqPositionsAsync(), state, cfg.request_timeout, "send positions"
                )
            except IbkrSyncError:
                # A failure after the positions' end on the wire is the values' business,
                # however soon after it came.
                if not state.positions_complete:
                    raise
            if not state.positions_ended:  # a library without a decoder table: now
                state.end_positions()
            if state.unreadable_at_positions_end:
                raise IncompleteSnapshot(
                    f"The IB gateway at {self.address} sent "
                    f"{state.unreadable_at_positions_end} message(s) that could not be read, "
                    "so the positions it reported may be incomplete; nothing was changed. "
                    f"First: {state.unreadable_examples[0]}"
                )
            positions = tuple(
                p
                for p in state.positions.values()
                if p.quantity != 0 and (account_id is None or p.account == account_id)
            )
            server_version = ib.client.serverVersion()
            if not cfg.read_values:
                return GatewaySnapshot(accounts, positions, managed, server_version)
            values, missing = await self._read_values(ib, state)
            return GatewaySnapshot(
                accounts,
                positions,
                managed,
                server_version,
                values_read=True,
                account_values=values,
                values_missing=missing,
            )
        finally:
            await self._disconnect(ib)

    async def _read_values(
        self, ib: Any, state: _ReadState
    ) -> tuple[dict[str, GatewayAccountValues], dict[str, str]]:
        """Each account's values in turn; an account that cannot be read is missing, with
        the reason, and the others are read all the same. Once the session itself has
        failed (the connection lost, the gateway's link to IBKR lost), every account whose
        download had not ended before it on the wire is missing too.

        What decides an account's outcome is the order of the messages on the wire, never
        how they were cut into TCP segments: each account's read is opened where the
        previous one ended (`_ReadState.open_next_values_read`), and ended by its download
        end or its first problem as the message is read (`_AccountRead.spoil`). This
        coroutine only asks for the values, waits, and tells a timeout.

        All accounts together get at most IBKR_REQUEST_TIMEOUT, so that a sync holds the
        lock for a bounded time however many accounts time out; each waits at most its
        share of what is left, so that accounts that never answer (some TWS versions send
        no download end for some accounts of a multi-account login) cannot starve the
        ones after them. Those that timed out are asked once more with what is left.
        """
        values: dict[str, GatewayAccountValues] = {}
        missing: dict[str, str] = {}
        with contextlib.suppress(ConnectionError):
            ib.client.cancelPositions()  # the positions are read: no updates of them now
        held = Counter(p.account for p in state.positions.values() if p.quantity != 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout
        while state.values_opened:
            read = state.values_opened.popleft()
            account = read.account
            left = deadline - loop.time()
            if read.done.done():
                pass  # ended on the wire before it was asked for (spoiled, say)
            elif left <= 0:
                read.spoil(
                    "not read: the values of the accounts before it took "
                    f"IBKR_REQUEST_TIMEOUT ({self.config.request_timeout:g} s) in all"
                )
                missing.setdefault(account, read.problem or "")
                continue
            else:
                share = min(self.config.values_timeout, left / state.reads_left(read.attempt))
                await self._read_account_values(ib, state, read, share)
            outcome = self._account_outcome(state, read, held)
            if isinstance(outcome, GatewayAccountValues):
                values[account] = outcome
                missing.pop(account, None)
            else:
                missing[account] = outcome
        failure = state.failure.result() if state.failure.done() else None
        for account, _ in state.values_plan:
            missing[account] = (
                "not read: the session with the IB gateway ended before its values were "
                f"asked for ({failure})"
            )
        state.values_plan.clear()
        for account, reason in missing.items():
            logger.warning("The values of account %s were not read: %s", account, reason)
        return values, missing

    async def _read_account_values(
        self, ib: Any, state: _ReadState, read: _AccountRead, timeout: float
    ) -> None:
        """Ask for an account's values and wait for its read to end, at most `timeout`."""
        state.values_requested = True
        try:
            ib.client.reqAccountUpdates(True, read.account)
            await asyncio.wait({read.done}, timeout=timeout)
        except ConnectionError as exc:
            read.spoil(f"not read: the connection to the IB gateway was lost ({exc})")
        finally:
            if not read.done.done():
                if read.attempt == 1:  # asked once more with what is left, after the others
                    state.values_plan.append((read.account, 2))
                read.spoil(
                    f"IBKR did not send the account's values within {timeout:.2g} s "
                    "(IBKR_VALUES_TIMEOUT, or its share of IBKR_REQUEST_TIMEOUT); its "
                    "stored values were kept"
                )
            # TWS serves one account's updates at a time: let go before the next one
            # (after a refusal too: a cancel ends only this client's subscription, if any).
            with contextlib.suppress(ConnectionError):
                ib.client.reqAccountUpdates(False, read.account)

    @staticmethod
    def _account_outcome(
        state: _ReadState, read: _AccountRead, held: Counter
    ) -> GatewayAccountValues | str:
        """An ended read: the account's values, or the reason they are missing."""
        if read.problem is not None:
            return read.problem
        if read.unreadable_at_end > read.unreadable_at_start:
            return (
                "a message that could not be read arrived with the account's values "
                f"({state.unreadable_examples[-1]}); its stored values were kept"
            )
        if held[read.account] and not read.positions:
            return (
                f"IBKR sent no portfolio row for any of the account's {held[read.account]} "
                "positions (as for some linked accounts), so their market values are "
                "unknown; its stored values were kept"
            )
        return GatewayAccountValues(read.account, read.values, read.positions)

    async def _race(
        self, awaitable: Awaitable[T], state: _ReadState, timeout: float, what: str
    ) -> T:
        """Await a library call, but give up at once on a fatal gateway error or timeout."""
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
                        "its own): a web server; nothing was changed. " + _PORT_CHECKLIST
                    )
            raise GatewayTimeout(
                f"The IB gateway at {self.address} did not {what} within {timeout:g} s "
                "(IBKR_CONNECT_TIMEOUT / IBKR_REQUEST_TIMEOUT); nothing was changed."
            )
        try:
            return task.result()
        except TimeoutError:  # before OSError: in 3.11 it is a subclass of it
            raise GatewayTimeout(
                f"The IB gateway at {self.address} did not {what} within {timeout:g} s; "
                "nothing was changed."
            ) from None
        except ConnectionRefusedError:
            raise GatewayUnavailable(
                f"Cannot connect to the IB gateway at {self.address}: connection refused. "
                + _SETUP_CHECKLIST
            ) from None
        except ConnectionError as exc:
            if isinstance(exc, ConnectionResetError) and not state.handshake.answered:
                # Reset while connecting: it accepted the connection, then reset it at
                # once (as when it closes at once, only sooner).
                raise self._not_a_gateway("reset it at once", closed=True) from None
            raise GatewayUnavailable(
                f"The connection to the IB gateway at {self.address} was lost while waiting "
                f"for it to {what} ({exc}); nothing was changed. " + _SETUP_CHECKLIST
            ) from None
        except OSError as exc:
            raise GatewayUnavailable(
                f"Cannot connect to the IB gateway at {self.address}: "
                f"{exc.strerror or exc}. " + _SETUP_CHECKLIST
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

    # --- library callbacks ---------------------------------------------------------------

    def _on_error(self, state: _ReadState, req_id: int, code: int, text: str, *_: Any) -> None:
        if code == _CLIENT_ID_IN_USE:
            state.fail(
                ClientIdInUse(
                    f"The IB gateway at {self.address} refused client id "
                    f"{self.config.client_id}: it is already in use by another API "
                    "connection. Set IBKR_CLIENT_ID to a client id no other tool uses.",
                    ib_code=code,
                )
            )
        elif code in _GATEWAY_DOWN_CODES:
            state.fail(
                GatewayUnavailable(
                    f"The IB gateway at {self.address} reported error {code}: {text}. "
                    + _SETUP_CHECKLIST,
                    ib_code=code,
                )
            )
        elif code in _SERVER_LINK_DOWN_CODES:
            state.fail(
                GatewayUnavailable(
                    f"The IB gateway at {self.address} lost its connection to IBKR's servers "
                    f"during the read (error {code}: {text}); nothing was changed. It "
                    "reconnects by itself: try again in a few minutes.",
                    ib_code=code,
                )
            )
        elif code in _ACCOUNT_DATA_CODES:
            logger.warning("IB gateway message %s (reqId %s): %s", code, req_id, _cut(text))
            read = state.values
            # TWS answers in order: a 2100 before any of this account's values ends the
            # subscription just cancelled (some versions confirm a cancel so), not this one.
            if read is not None and (
                code == _ACCOUNT_DATA_REFUSED
                or read.values
                or read.positions
                or not read.after_cancel
            ):
                what, kind, why = _ACCOUNT_DATA_CODES[code]
                read.spoil(
                    f"IBKR {what} the subscription to the account's values ({kind} {code}: "
                    f"{_cut(text)}). TWS serves one account's values at a time to all its API "
                    f"clients: {why}; its stored values were kept"
                )
        elif code in _REQUEST_FAILED_CODES and state.values is not None:
            # The account-updates request of one account: its values, not the session.
            state.values.spoil(
                f"IBKR rejected the request for the account's values (error {code}: "
                f"{_cut(text)}); its stored values were kept"
            )
        elif code in _REQUEST_FAILED_CODES:
            state.fail(
                GatewayError(
                    f"The IB gateway at {self.address} rejected a request "
                    f"(error {code}: {text}); nothing was changed.",
                    ib_code=code,
                )
            )
        else:
            logger.info("IB gateway message %s (reqId %s): %s", code, req_id, text)

    def _on_api_error(self, state: _ReadState, message: str) -> None:
        state.fail(
            GatewayUnavailable(
                f"The IB gateway at {self.address} closed the API connection ({message}). "
                + _SETUP_CHECKLIST
            )
        )

    def _on_socket_closed(self, state: _ReadState, message: str) -> None:
        state.fail(
            GatewayUnavailable(
                f"The IB gateway at {self.address} closed the connection"
                f"{f' ({message})' if message else ''} before the read finished; nothing "
                "was changed. " + _SETUP_CHECKLIST
            )
        )

    def _guard_handshake(self, connection: Any, state: _ReadState) -> None:
        """Look at what answers the API handshake before the client library does.

        The library takes the first four bytes it receives as a frame length and waits
        for that many bytes: a web server's `HTTP/1.1 400` is a frame of 1.2 GB to it,
        and a peer that sends something else (or nothing, and closes) leaves it waiting
        for the connect timeout, which is then blamed. Here the first frame is held back
        until it is complete and checked: a gateway's answer (two fields, the first its
        server version) goes on to the library, anything else fails the read at once,
        naming the address and what answered.
        """
        handshake = state.handshake
        made, received = connection.connection_made, connection.data_received
        lost = connection.connection_lost

        def connection_made(transport: Any) -> None:
            handshake.connected = True
            made(transport)

        def connection_lost(exc: Exception | None) -> None:
            # Before the library hears of it (it would call it a lost connection).
            self._closed_unanswered(state)
            lost(exc)

        def data_received(data: bytes) -> None:
            if handshake.answered:
                received(data)
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
            handshake.answered = True
            held, handshake.received = bytes(handshake.received), bytearray()
            received(held)

        # Instance attributes: asyncio calls the protocol's methods by name.
        connection.connection_made = connection_made
        connection.data_received = data_received
        connection.connection_lost = connection_lost

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

    def _not_a_gateway(self, what: str, *, closed: bool = False) -> GatewayUnavailable:
        """What answered is not TWS (`not_a_gateway`); or, for a peer that closed without a
        word, a gateway refusing this client as likely as another service, so it stays
        `gateway_unavailable`, saying both."""
        if closed:
            return GatewayUnavailable(
                f"{self.address} accepted the connection, but {what}; nothing was changed. "
                "TWS / IB Gateway does so to a client it refuses: check that this machine's "
                "IP address is in its trusted IPs (and 'Allow connections from localhost "
                "only' off for another machine), and that a proxy in front of it (a "
                "container's published port) has it running behind. Or something other "
                "than TWS listens there: " + _PORT_CHECKLIST
            )
        return NotAGateway(
            f"{self.address} answered, but not as TWS / IB Gateway: {what}; nothing was "
            "changed. " + _PORT_CHECKLIST
        )

    def _decode_positions_ourselves(self, ib: Any, state: _ReadState) -> None:
        """Read position messages straight off the wire, instead of through the library.

        The library turns each message into floats and two Contract objects, logs it,
        and keeps it twice; at 10,000s of positions that is most of a read's time and
        memory, and its floats would round fractional quantities. Here each message
        becomes one GatewayPosition with exact decimals. A message that cannot be read
        is recorded: a read during which that happened is incomplete and must not close
        positions. The end-of-positions message still goes to the library, which ends
        its request. Should a library version not expose its decoder table, positions
        are taken from its position events instead.
        """
        handlers = getattr(ib.client.decoder, "handlers", None)
        if not isinstance(handlers, dict) or _MSG_POSITION not in handlers:
            ib.positionEvent += lambda position: self._on_position_event(state, position)
            return

        def on_position(fields: list[str]) -> None:
            if state.positions_ended:  # an update after the read: not part of it
                return
            try:
                position = _position_from_wire(fields)
            except (ValueError, ArithmeticError) as exc:
                _unreadable(state, fields, exc)
            else:
                self._received(state, position)

        handlers[_MSG_POSITION] = on_position

    def _decode_values_ourselves(self, ib: Any, state: _ReadState) -> None:
        """Read account values, portfolio rows and the download-end marker off the wire.

        The library turns them into floats (and keeps them per account in a way that is
        empty for linked accounts); here they are read exactly, for the account being
        read only. A frame of another layout, or a value outside the wire grammar, spoils
        that account's values (never the positions, never another account's values).
        Frames arriving when no account is being read (a late update) are passed over.
        """
        handlers = getattr(ib.client.decoder, "handlers", None)
        if not isinstance(handlers, dict):
            return

        def on_account_value(fields: list[str]) -> None:
            read = state.values
            if read is None or read.done.done():
                return
            if len(fields) != len(ACCOUNT_VALUE_FIELDS) or fields[1] != ACCOUNT_VALUE_VERSION:
                read.spoil(_values_layout("an account value", fields, len(ACCOUNT_VALUE_FIELDS)))
                return
            _, _, tag, text, currency, account = fields
            if account != read.account:
                return
            if tag == "AccountReady":
                if text.strip().lower() == "false":
                    read.spoil(
                        "IBKR reported the account's values as not ready (AccountReady "
                        "false: it is resetting them); its stored values were kept"
                    )
                return
            if tag not in ACCOUNT_VALUE_TAGS:
                return
            try:
                value = parse_decimal(text)
            except WireValueError as exc:
                read.spoil(
                    f"its {tag} ({currency or 'no currency'}) is unreadable: {exc}; its "
                    "stored values were kept"
                )
                return
            key = (intern(tag), intern(currency))
            if key not in read.values and len(read.values) >= _MAX_VALUES:
                read.spoil(f"more than {_MAX_VALUES} distinct values; its stored values were kept")
                return
            read.values[key] = None if value is UNSET else value

        def on_portfolio(fields: list[str]) -> None:
            read = state.values
            if read is None or read.done.done():
                return
            if len(fields) != len(PORTFOLIO_FIELDS) or fields[1] != PORTFOLIO_VERSION:
                read.spoil(_values_layout("a portfolio", fields, len(PORTFOLIO_FIELDS)))
                return
            if fields[-1] != read.account:
                return
            try:
                value = _position_value_from_wire(fields, state.positions, read.account)
            except WireValueError as exc:
                read.spoil(
                    f"the portfolio row of contract {_shown_field(fields[2])} {exc}; "
                    "its stored values were kept"
                )
                return
            if value is not None:
                read.positions[value.con_id] = value

        def on_download_end(fields: list[str]) -> None:
            read = state.values
            if read is None or read.done.done():
                return
            if len(fields) != 3:
                read.spoil(_values_layout("an account download end", fields, 3))
            elif fields[2] == read.account:
                read.unreadable_at_end = state.unreadable
                if read.values:
                    read.end()
                else:  # complete, but empty: no reason to believe the account holds no cash
                    read.spoil(
                        "IBKR ended the account's values without sending any of those a "
                        "sync reads; its stored values were kept"
                    )

        handlers[ACCOUNT_VALUE_MESSAGE_ID] = on_account_value
        handlers[PORTFOLIO_MESSAGE_ID] = on_portfolio
        handlers[ACCOUNT_DOWNLOAD_END_MESSAGE_ID] = on_download_end

    def _guard_decoding(self, ib: Any, state: _ReadState) -> None:
        """Every frame of the session is decoded under our eye, not only positions.

        The library's own dispatch logs a frame it cannot decode (a message id that is not
        a number, too few fields for its layout) and carries on, and its generated
        handlers do the same one level down. Here both are caught: such a frame is
        recorded as unreadable. An error frame we cannot decode is still looked at for
        its code, so a "lost connection to IBKR" (1100) in an odd layout still stops the
        read with its own reason. A message id the library does not know is a newer
        server's message and stays harmless.
        """
        decoder = ib.client.decoder
        handlers = getattr(decoder, "handlers", None)
        decoder.logger = _DecoderLog(decoder.logger, state.note_unreadable)
        if not isinstance(handlers, dict):
            return

        read_position = handlers.get(_MSG_POSITION)
        position_id = str(_MSG_POSITION)

        def interpret(fields: list[str]) -> None:
            # Thousands a read: straight to our position decoder.
            if read_position is not None and fields and fields[0] == position_id:
                read_position(fields)
                return
            try:
                msg_id = parse_integer(fields[0]) if fields else UNSET
                if msg_id is UNSET:
                    raise WireValueError("no message id")
            except WireValueError as exc:
                _unreadable(state, fields, exc)
                return
            handler = handlers.get(msg_id)
            if handler is None:
                logger.debug("Ignoring message %s, unknown to the client library", msg_id)
                return
            expected = _FIELD_COUNTS.get(msg_id)
            if expected is not None and len(fields) != expected:
                _unreadable(state, fields, f"{len(fields)} fields instead of {expected}")
                return
            if msg_id == _MSG_MANAGED_ACCOUNTS:
                self._check_managed_accounts(state, fields)
            seen = state.unreadable
            try:
                handler(fields)
            except Exception as exc:
                _unreadable(state, fields, exc)
            if msg_id == _MSG_ERROR and state.unreadable > seen:
                self._undecodable_error(state, fields)
            elif msg_id == _MSG_POSITION_END and state.unreadable == seen:
                self._positions_end(state)

        decoder.interpret = interpret

    @staticmethod
    def _positions_end(state: _ReadState) -> None:
        # Ours, not one from before the request (or a second one).
        if state.positions_requested and not state.positions_ended:
            state.end_positions()

    def _check_managed_accounts(self, state: _ReadState, fields: list[str]) -> None:
        # The library waits for a non-empty list before it calls the session started, so
        # without this an empty one would surface as a connect timeout. (Its layout, three
        # fields, was checked before.)
        if not [account for account in fields[2].split(",") if account.strip()]:
            state.fail(
                NoManagedAccounts(
                    f"The IB gateway at {self.address} reports no managed accounts, so there "
                    "is nothing to read; nothing was changed. Check that TWS / IB Gateway has "
                    "finished logging in to an account (not only started), then sync again."
                )
            )

    def _undecodable_error(self, state: _ReadState, fields: list[str]) -> None:
        """An error frame the library could not decode: act on its code if it has one."""
        try:
            code = parse_integer(fields[3])
        except (IndexError, WireValueError):
            return
        if code is not UNSET:
            text = fields[4] if len(fields) > 4 else ""
            self._on_error(state, -1, code, text)

    def _received(self, state: _ReadState, position: GatewayPosition) -> None:
        state.positions[(position.account, position.con_id)] = position
        if self.progress is not None:
            self.progress("read", len(state.positions))

    def _on_position_event(self, state: _ReadState, position: Any) -> None:
        if state.positions_ended:
            return
        contract = position.contract
        quantity = _float_decimal(position.position)
        if quantity is None or not position.account or not contract.conId:
            state.note_unreadable(f"a position of contract {contract.conId!r}: unset fields")
            return
        received = GatewayPosition(
            account=position.account,
            con_id=contract.conId,
            symbol=contract.symbol,
            sec_type=contract.secType,
            quantity=quantity,
            average_cost=_float_decimal(position.avgCost),
            currency=contract.currency,
            exchange=contract.exchange,
            primary_exchange=contract.primaryExchange,
            local_symbol=contract.localSymbol,
            trading_class=contract.tradingClass,
            multiplier=str(contract.multiplier or ""),
            last_trade_date=contract.lastTradeDateOrContractMonth,
            strike=_float_decimal(contract.strike),
            right=contract.right,
        )
        self._received(state, received)


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


def _shown_bytes(data: bytes, limit: int = 40) -> str:
    """Bytes a peer sent, as a message quotes them: the first `limit`, printable."""
    return repr(data[:limit])[1:] + ("..." if len(data) > limit else "")


def _position_from_wire(fields: list[str]) -> GatewayPosition:
    """A position message (id 61, version 3), in the layout the client library decodes.

    Numbers are read with the TWS wire grammar, exactly. What makes the whole read
    incomplete (a ValueError here): another layout or version, a record that names no
    account or no valid contract id (we could not tell which stored position it is, so
    none could safely be closed), and an unset or unreadable quantity (never read as 0,
    which means "closed") or an unreadable average cost or strike. An unset average cost
    is None; an unset strike is None as well.
    """
    if len(fields) != len(POSITION_FIELDS):
        raise ValueError(f"{len(fields)} fields instead of {len(POSITION_FIELDS)}")
    (
        _,
        version,
        account,
        con_id,
        symbol,
        sec_type,
        last_trade_date,
        strike,
        right,
        multiplier,
        exchange,
        currency,
        local_symbol,
        trading_class,
        quantity,
        average_cost,
    ) = fields  # fmt: skip  (the order of protocol.POSITION_FIELDS; a test holds them equal)
    if version != POSITION_VERSION:
        raise ValueError(f"position message version {version!r} instead of {POSITION_VERSION}")
    if not account:
        raise ValueError("no account id")
    parsed_con_id = parse_integer(con_id)
    if parsed_con_id is UNSET or parsed_con_id <= 0:
        raise ValueError(f"contract id {con_id!r} is not a contract id")
    parsed_quantity = parse_decimal(quantity)
    if parsed_quantity is UNSET:
        raise ValueError(f"the quantity of contract {parsed_con_id} is unset ({quantity!r})")
    parsed_cost = parse_decimal(average_cost)
    parsed_strike = parse_decimal(strike)
    # Texts that repeat across positions (account, currency, ...) are kept once each.
    return GatewayPosition(
        account=intern(account),
        con_id=parsed_con_id,
        symbol=symbol,
        sec_type=intern(sec_type),
        quantity=parsed_quantity,
        average_cost=None if parsed_cost is UNSET else parsed_cost,
        currency=intern(currency),
        exchange=intern(exchange),
        local_symbol=local_symbol,
        trading_class=intern(trading_class),
        multiplier=intern(multiplier),
        last_trade_date=intern(last_trade_date),
        strike=None if parsed_strike is UNSET else parsed_strike,
        right=intern(right),
    )


_PORTFOLIO_VALUES = slice(
    PORTFOLIO_FIELDS.index("market_price"), PORTFOLIO_FIELDS.index("realized_pnl") + 1
)
_PORTFOLIO_CON_ID = PORTFOLIO_FIELDS.index("con_id")
_PORTFOLIO_QUANTITY = PORTFOLIO_FIELDS.index("quantity")


def _position_value_from_wire(
    fields: list[str], positions: dict[tuple[str, int], GatewayPosition], account: str
) -> GatewayPositionValue | None:
    """A portfolio message (layout checked) -> its values, or None for a position that was
    not read (a flood of rows for others costs no memory); WireValueError if unreadable.
    The average cost it repeats is the position message's business, and not read here."""
    con_id = _number(parse_integer, fields[_PORTFOLIO_CON_ID])
    if con_id is UNSET or con_id <= 0:
        raise WireValueError("has no valid contract id")
    position = positions.get((account, con_id))
    if position is None:
        return None
    quantity = _number(parse_decimal, fields[_PORTFOLIO_QUANTITY])
    if quantity is UNSET:
        raise WireValueError("has no quantity")
    if quantity == position.quantity:
        quantity = position.quantity  # one Decimal for both, not two
    price, value, _, unrealized, realized = fields[_PORTFOLIO_VALUES]
    price, value = _optional_number(price), _optional_number(value)
    unrealized, realized = _optional_number(unrealized), _optional_number(realized)
    return GatewayPositionValue(con_id, quantity, price, value, unrealized, realized)


def _optional_number(text: str) -> Decimal | None:
    number = _number(parse_decimal, text)
    return None if number is UNSET else number


def _number(parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except WireValueError as exc:
        raise WireValueError(f"has an unreadable number ({exc})") from None


def _cut(text: str, limit: int = 300) -> str:
    """A gateway's text as a message quotes it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _values_layout(what: str, fields: list[str], expected: int) -> str:
    version = fields[1] if len(fields) > 1 else ""
    return (
        f"{what} message came in a layout this sync does not read ({len(fields)} fields, "
        f"version {_shown_field(version)}; expected {expected}); its stored values were kept"
    )


def _shown_field(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _unreadable(state: _ReadState, fields: list[str], reason: object) -> None:
    """Record a frame that could not be read, named by its first fields (never a secret:
    message id, version, account, contract id)."""
    head = ",".join(repr(f)[1:-1][:40] for f in fields[:4])
    state.note_unreadable(f"[{head}]: {reason}")


class _DecoderLog:
    """Stands in for the client library decoder's logger: an exception it logs is a frame
    it could not decode (its handlers catch their own errors and only log them)."""

    def __init__(self, logger: logging.Logger, on_failure: Callable[[str], None]) -> None:
        self._logger = logger
        self._on_failure = on_failure

    def exception(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._on_failure(str(message).split(":", 1)[0] + " failed in the client library")
        self._logger.warning(message, *args, exc_info=True)

    error = exception

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


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
    still get every record. One read at a time per process, so nothing races the
    saving and restoring.
    """
    kept = []
    handler = _LibraryLog()
    for name in _LIBRARY_LOGGERS.get(library, (library, "eventkit")):
        library_logger = logging.getLogger(name)
        kept.append((library_logger, library_logger.propagate))
        library_logger.addHandler(handler)
        library_logger.propagate = False
    try:
        yield
    finally:
        for library_logger, propagate in kept:
            library_logger.removeHandler(handler)
            library_logger.propagate = propagate


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
