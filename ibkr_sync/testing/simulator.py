"""An IB Gateway / TWS simulator speaking the real TWS API socket protocol.

The unmodified ``ib_insync`` (and ``ib_async``) client connects to it over TCP exactly as
to a real gateway, so integration tests exercise the real client library, its decoder and
its timeouts instead of a mock. Only the standard library is used (asyncio); in
particular the simulator never imports ib_insync, so it cannot accidentally agree with
the client's bugs instead of with the wire format.

What is simulated (see ``GatewaySimulator._handlers`` for the full list):

* the ``API\\0`` handshake and version negotiation, startApi with nextValidId and
  managedAccounts, and IB error 326 for a client id that is already connected;
* every request ``IB.connect(..., readonly=True)`` sends: positions, account updates,
  account updates multi, executions, plus open/completed orders, current time, ids,
  account summary and positions multi;
* portfolio changes from another thread, with closed positions reported as quantity 0
  and live position updates to clients that subscribed with reqPositions;
* each account's values for an account-updates subscription (reqAccountUpdates): cash
  and IBKR's exchange rate per currency, the totals in the account's base currency and
  a portfolio row per position, all consistent with its positions and prices and
  counted as IBKR counts them (a bond priced in percent of par; a future's notional in
  its row's market value but only its P&L in the net liquidation); one
  subscription at a time across clients, as TWS serves them (2100 when a client's own
  new subscription replaces its old one, 2101 when another client holds one for a
  different account); prices that move between syncs on demand (``set_market_price``,
  ``move_prices``);
* fault injection via ``Faults`` (refused connections, dropped connections, hangs,
  delays, malformed frames, IB errors, and per account: values that never end, refused
  subscriptions, unset markers and malformed value frames).

Version: the simulator picks the highest server version both sides support (up to
``MAX_SERVER_VERSION`` = 178, i.e. 176 for ib_insync 0.9.86 and 178 for ib_async 2.1) and
lays out every message for that version; the only layout that differs within the range
is the error message, which gains ``advancedOrderRejectJson`` from version 166 on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from ..protocol import (
    CONTRACT_FIELDS,
    PORTFOLIO_FIELDS,
    PORTFOLIO_MESSAGE_ID,
    PORTFOLIO_VERSION,
    POSITION_FIELDS,
    POSITION_MESSAGE_ID,
    POSITION_VERSION,
)
from .portfolio import Portfolio, SimPosition
from .wire import (
    API_PREFIX,
    MIN_SERVER_VER_ADVANCED_ORDER_REJECT,
    ClientMsg,
    ServerMsg,
    make_message,
)

__all__ = [
    "DUPLICATE_CLIENT_ID_MESSAGE",
    "MAX_SERVER_VERSION",
    "MIN_SERVER_VERSION",
    "Faults",
    "GatewaySimulator",
    "SimulatorThread",
]

logger = logging.getLogger(__name__)

#: Highest API server version the simulator implements (ib_async 2.1 asks for up to 178).
MAX_SERVER_VERSION = 178
#: Lowest version accepted; from 100 on the protocol uses length-prefixed frames.
MIN_SERVER_VERSION = 100

DUPLICATE_CLIENT_ID_MESSAGE = (
    "Unable to connect as the client id is already in use. Retry with a unique client id."
)

#: Error/notice texts TWS uses for the codes tests most often inject.
IB_ERROR_TEXTS = {
    326: DUPLICATE_CLIENT_ID_MESSAGE,
    502: 'Couldn\'t connect to TWS. Confirm that "Enable ActiveX and Socket Clients" is '
    'enabled and connection port is the same as "Socket Port" on the '
    'TWS "Edit->Global Configuration...->API->Settings" menu.',
    504: "Not connected",
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2110: "Connectivity between Trader Workstation and server is broken. It will be restored "
    "automatically.",
    2104: "Market data farm connection is OK:usfarm",
    2106: "HMDS data farm connection is OK:ushmds",
    2158: "Sec-def data farm connection is OK:secdefil",
}

_LENGTH = struct.Struct(">I")
_VERSION_RE = re.compile(r"^v(\d+)(?:\.\.(\d+))?(?:\s.*)?$", re.DOTALL)
_CENT = Decimal("0.01")
_PRICE_STEP = Decimal("0.00000001")
#: Security types whose market value (a notional) is no equity: only their P&L counts
#: in the account's values, as IBKR settles it (futures daily; CFDs as they move).
MARGIN_ONLY = frozenset({"FUT", "CFD"})
#: IBKR's exchange rates to the base currency (USD) the simulator sends unless told others.
DEFAULT_EXCHANGE_RATES = {
    "USD": Decimal(1),
    "EUR": Decimal("1.0845"),
    "GBP": Decimal("1.2671"),
    "CHF": Decimal("1.1312"),
    "CAD": Decimal("0.7325"),
    "JPY": Decimal("0.0067245"),
    "HKD": Decimal("0.12817"),
    "AUD": Decimal("0.6571"),
}
#: The handshake frame is a few bytes; anything larger is not a TWS API client.
_MAX_HANDSHAKE = 4096
_MAX_REQUEST = 1 << 20


@dataclass
class Faults:
    """Failure modes to inject; change them between syncs (``sim.faults.x = ...``).

    Each request reads a consistent snapshot of these settings when it starts, so a
    change made from the test thread takes effect at the next request.

    * ``refuse_connections``: accept and immediately reset (RST) every new connection.
      ib_insync's TCP connect succeeds, then the connection is reset before the
      handshake completes. For a truly *refused* port (ECONNREFUSED) stop the simulator
      (``stop()`` / ``stop_thread()``) and start it again later on the same port.
    * ``drop_during_handshake``: read the client's version request, then close the
      connection without answering (a gateway restarting, or a proxy in between).
    * ``drop_after_positions``: on reqPositions send this many rows, then close the
      connection (no positionEnd).
    * ``hang_positions``: never answer reqPositions (no rows, no positionEnd).
    * ``hold_positions``: a ``threading.Event``; reqPositions is answered only once it is
      set (a test holds a sync mid-read for exactly as long as it needs).
    * ``message_delay``: seconds to sleep before each outgoing message (including the
      handshake reply); messages are then written and drained one by one.
    * ``position_edits``: ``{field: text}`` written over the wire fields of the position
      row at ``malformed_index`` (names of ``protocol.POSITION_FIELDS``: ``"quantity"``,
      ``"average_cost"``, ``"con_id"``, ``"msg_id"``, ...), exactly as given: unset
      markers, texts outside the wire grammar, a broken message id.
    * ``extra_frames``: items sent among the position rows, before positionEnd: raw frames
      (lists of text fields, message id first: an error in another layout, a message id
      the client does not know, a frame it cannot decode), IB error codes (an ``int``:
      the error with reqId -1 and TWS's text, in the session's layout) and pauses (a
      ``float``: seconds during which nothing more is written).
    * ``frames_after_positions``: items of the same kinds, sent right after positionEnd.
    * ``malformed_position``: the position row at ``malformed_index`` (default the first)
      is replaced by a broken frame: ``malformed_kind="quantity"`` sends a non-numeric
      quantity, ``"field_count"`` omits the last field. The other rows and positionEnd
      are sent normally.
    * ``no_managed_accounts``: managedAccounts carries an empty list (a gateway that has
      not finished logging in).
    * ``error_on_connect``: ``(code, message)`` sent as IB error (reqId -1) right after
      nextValidId/managedAccounts; the session stays up. Code 326 instead behaves like a
      duplicate client id: error 326 *instead of* the API start, then the connection is
      closed. An empty message uses TWS's text for known codes.
    * ``error_on_positions``: ``(code, message)`` sent as IB error (reqId -1) in answer
      to reqPositions, with no rows and no positionEnd (like TWS failing the request).

    Per account, for its account-updates subscription (reqAccountUpdates):

    * ``values_hang``: accounts whose values are sent without the download-end marker.
    * ``values_error``: ``{account: (code, message)}`` sent (reqId -1) instead of its
      values (2101: another client holds the subscription; 2100: it was taken over).
    * ``values_not_ready``: accounts whose AccountReady value is ``false``.
    * ``values_empty``: accounts whose download ends at once, with no value.
    * ``values_taken_over``: accounts whose subscription another request takes over
      midway: warning 2100 after the first values, and no download end.
    * ``drop_during_values``: accounts whose subscription closes the connection instead.
    * ``value_edits``: ``{account: {"Tag" or "Tag:CCY": text}}`` written over the value
      texts sent (unset markers, texts outside the wire grammar).
    * ``portfolio_edits``: ``{account: {field: text}}`` written over the fields
      (names of ``protocol.PORTFOLIO_FIELDS``) of the account's first portfolio row.
    * ``value_frames``: ``{account: [fields, ...]}`` raw frames sent among its values.
    * ``value_inserts``: ``{account: [(index, [item, ...]), ...]}`` a scripted download:
      items of the kinds ``extra_frames`` takes, put into the account's download at
      ``index`` of its frames, as a slice assignment would (0: before the first value;
      -1: just before accountDownloadEnd; ``len`` or more: after it). Every index refers
      to the download as the simulator lays it out, whatever the other inserts.

    How the bytes are written, for every answer of every connection:

    * ``segment_size``: written in pieces of this many bytes (1: one byte at a time),
      each drained before the next, instead of one write per answer; the bytes are the
      same, only the TCP segments they travel in differ.
    * ``segment_delay``: seconds between those pieces.
    """

    refuse_connections: bool = False
    drop_during_handshake: bool = False
    drop_after_positions: int | None = None
    hang_positions: bool = False
    hold_positions: threading.Event | None = None
    message_delay: float = 0.0
    malformed_position: bool = False
    malformed_kind: Literal["quantity", "field_count"] = "quantity"
    malformed_index: int = 0
    no_managed_accounts: bool = False
    position_edits: dict[str, str] | None = None
    extra_frames: list[list[str] | int | float] | None = None
    frames_after_positions: list[list[str] | int | float] | None = None
    error_on_connect: tuple[int, str] | None = None
    error_on_positions: tuple[int, str] | None = None
    values_hang: frozenset[str] | set[str] = frozenset()
    values_error: dict[str, tuple[int, str]] | None = None
    values_not_ready: frozenset[str] | set[str] = frozenset()
    values_empty: frozenset[str] | set[str] = frozenset()
    values_taken_over: frozenset[str] | set[str] = frozenset()
    drop_during_values: frozenset[str] | set[str] = frozenset()
    value_edits: dict[str, dict[str, str]] | None = None
    portfolio_edits: dict[str, dict[str, str]] | None = None
    value_frames: dict[str, list[list[str]]] | None = None
    value_inserts: dict[str, list[tuple[int, list[list[str] | int | float]]]] | None = None
    segment_size: int | None = None
    segment_delay: float = 0.0


class _Connection:
    """Per-client state, touched only from the simulator's event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.server_version = 0
        self.client_id: int | None = None
        self.positions_subscribed = False
        self.task: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class _CloseConnection(Exception):
    """Raised by a handler to end the session after what it already sent."""


class GatewaySimulator:
    """Asyncio TCP server that behaves like IB Gateway for portfolio-reading clients.

    Use it either inside a running event loop (``await sim.start()`` / ``await
    sim.stop()`` / ``await sim.serve_forever()``) or from synchronous code in a background
    thread (``with GatewaySimulator(...) as sim:`` or ``sim.start_in_thread()`` /
    ``sim.stop_thread()``). Portfolio and fault changes are thread-safe and may be made
    from any thread at any time.
    """

    def __init__(
        self,
        portfolio: Portfolio | Iterable[SimPosition] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        report_closed_as_zero: bool = True,
        push_position_updates: bool = True,
        max_server_version: int = MAX_SERVER_VERSION,
        next_valid_id: int = 1,
        cash_balance: Decimal | int | str = Decimal("100000.00"),
        farm_status_messages: bool = False,
        base_currency: str = "USD",
        exchange_rates: dict[str, Decimal | str] | None = None,
        price_drift: Decimal | str | None = None,
    ) -> None:
        """Create a simulator; nothing listens until ``start``.

        ``portfolio`` defaults to one empty account (``DU0000001``): the client only
        considers the API ready once it has seen at least one managed account.
        ``report_closed_as_zero`` mirrors TWS, which keeps reporting a position closed
        during the session with quantity 0; ``push_position_updates`` sends changes to
        clients that called reqPositions (until cancelPositions), as TWS does.
        ``farm_status_messages`` sends the 2104/2106/2158 notices real gateways send on
        connect (ib_insync logs them as "Warning"); off by default to keep logs quiet.
        ``cash_balance`` is every account's cash in ``base_currency`` until ``set_cash``
        says otherwise (besides the balances its forex positions are: at IBKR a forex
        position is its currency's cash); ``exchange_rates`` are IBKR's rates of other
        currencies to it.
        ``price_drift`` (e.g. ``"0.01"``) moves each price of an account by up to that
        fraction, at random, whenever its values are asked for: a market that moves
        between syncs (the demo's).
        """
        if portfolio is None:
            portfolio = Portfolio(accounts=["DU0000001"])
        elif not isinstance(portfolio, Portfolio):
            portfolio = Portfolio(positions=list(portfolio))
        portfolio.validate()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.report_closed_as_zero = report_closed_as_zero
        self.push_position_updates = push_position_updates
        self.max_server_version = max_server_version
        self.farm_status_messages = farm_status_messages
        self.cash_balance = Decimal(str(cash_balance))
        self.base_currency = base_currency
        self._rates: dict[str, Decimal] = {**DEFAULT_EXCHANGE_RATES}
        self._rates.update({c: Decimal(str(r)) for c, r in (exchange_rates or {}).items()})
        self._cash: dict[str, dict[str, Decimal]] = {}
        # The one account-updates subscription TWS serves: (connection, account).
        self._account_subscription: tuple[_Connection, str] | None = None
        # Answer a cancelled account-updates subscription with warning 2100, as some TWS
        # versions do.
        self.confirm_unsubscribe = False
        self.price_drift = None if price_drift is None else Decimal(str(price_drift))
        self._random = random.Random(1)
        self._lock = threading.RLock()
        self._faults = faults or Faults()
        self._accounts: list[str] = list(portfolio.accounts)
        self._positions: dict[tuple[str, int], SimPosition] = {
            pos.key: pos for pos in portfolio.positions
        }
        self._closed: dict[tuple[str, int], SimPosition] = {}
        self._next_valid_id = next_valid_id
        # loop-side state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._client_ids: dict[int, _Connection] = {}
        self._stopped: asyncio.Event | None = None
        self._thread: SimulatorThread | None = None
        # statistics, handy in assertions
        self.connections_accepted = 0
        self.request_counts: Counter[int] = Counter()
        self._handlers: dict[int, Callable[[_Connection, list[str]], Any]] = {
            ClientMsg.REQ_POSITIONS: self._req_positions,
            ClientMsg.CANCEL_POSITIONS: self._cancel_positions,
            ClientMsg.REQ_ACCT_DATA: self._req_account_updates,
            ClientMsg.REQ_ACCOUNT_UPDATES_MULTI: self._req_account_updates_multi,
            ClientMsg.CANCEL_ACCOUNT_UPDATES_MULTI: self._ignore,
            ClientMsg.REQ_POSITIONS_MULTI: self._req_positions_multi,
            ClientMsg.CANCEL_POSITIONS_MULTI: self._ignore,
            ClientMsg.REQ_ACCOUNT_SUMMARY: self._req_account_summary,
            ClientMsg.CANCEL_ACCOUNT_SUMMARY: self._ignore,
            ClientMsg.REQ_EXECUTIONS: self._req_executions,
            ClientMsg.REQ_OPEN_ORDERS: self._req_open_orders,
            ClientMsg.REQ_ALL_OPEN_ORDERS: self._req_open_orders,
            ClientMsg.REQ_AUTO_OPEN_ORDERS: self._ignore,
            ClientMsg.REQ_COMPLETED_ORDERS: self._req_completed_orders,
            ClientMsg.REQ_CURRENT_TIME: self._req_current_time,
            ClientMsg.REQ_IDS: self._req_ids,
            ClientMsg.REQ_MANAGED_ACCTS: self._req_managed_accounts,
            ClientMsg.REQ_CONTRACT_DATA: self._req_contract_details,
            ClientMsg.REQ_MARKET_DATA_TYPE: self._ignore,
        }

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The real listening port (resolved once started when created with port 0)."""
        if self._port is None:
            if self._requested_port:
                return self._requested_port
            raise RuntimeError("simulator not started yet: the port is still unknown")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def is_running(self) -> bool:
        return self._server is not None

    # -- async lifecycle ----------------------------------------------------------------

    async def start(self) -> GatewaySimulator:
        """Start listening; returns once the socket is bound (``port`` is then known).

        After a ``stop`` the simulator can be started again; it rebinds the same port,
        which is how tests simulate a gateway restart.
        """
        if self._server is not None:
            raise RuntimeError("simulator already running")
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        port = self._port if self._port is not None else self._requested_port
        self._server = await asyncio.start_server(
            self._on_connect, self.host, port, reuse_address=True, limit=_MAX_REQUEST
        )
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "IB Gateway simulator listening on %s:%s (%d positions, accounts: %s)",
            self.host,
            self._port,
            len(self._positions),
            ",".join(self.accounts),
        )
        return self

    async def stop(self) -> None:
        """Stop listening and close every client connection; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        # Aborted connections make their handlers finish on their own (reads fail,
        # delays check ``closing``); cancel only stragglers, e.g. a handler blocked in
        # drain() towards a client that stopped reading.
        tasks = [conn.task for conn in connections if conn.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
        self._connections.clear()
        self._client_ids.clear()
        if self._stopped is not None:
            self._stopped.set()
        logger.info("IB Gateway simulator on %s:%s stopped", self.host, self._port)

    async def serve_forever(self) -> None:
        """Start if needed and run until ``stop`` is called (or the task is cancelled)."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> GatewaySimulator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- thread lifecycle ---------------------------------------------------------------

    def start_in_thread(self, timeout: float = 5.0) -> SimulatorThread:
        """Run the simulator on its own event loop in a daemon thread; wait until listening."""
        if self._thread is not None:
            raise RuntimeError("simulator already running in a thread")
        runner = SimulatorThread(self, startup_timeout=timeout)
        runner.start()
        self._thread = runner
        return runner

    def stop_thread(self, timeout: float = 5.0) -> None:
        """Stop the server, close all connections and join the thread started above."""
        runner, self._thread = self._thread, None
        if runner is not None:
            runner.stop(timeout)

    def __enter__(self) -> GatewaySimulator:
        self.start_in_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_thread()

    # -- portfolio (thread-safe) --------------------------------------------------------

    @property
    def accounts(self) -> list[str]:
        """Managed accounts as sent in managedAccounts (listed ones, then position-only)."""
        with self._lock:
            seen = dict.fromkeys(self._accounts)
            for account, _ in self._positions:
                seen.setdefault(account)
            return list(seen)

    def positions(self) -> list[SimPosition]:
        """Snapshot of the current (open) positions."""
        with self._lock:
            return list(self._positions.values())

    def set_accounts(self, accounts: Sequence[str]) -> None:
        """Replace the managed account list (accounts may have no positions).

        New sessions and reqManagedAccts see the change; like TWS, established sessions
        are not told.
        """
        accounts = list(accounts)
        Portfolio(accounts=accounts).validate()
        with self._lock:
            self._accounts = accounts

    def set_positions(
        self, positions: Iterable[SimPosition], accounts: Sequence[str] | None = None
    ) -> None:
        """Replace the whole portfolio: a reset, so closed-position zero rows are forgotten.

        Subscribed clients get zero rows for positions that disappeared and rows for new
        or changed ones.
        """
        new = Portfolio(accounts=list(accounts or []), positions=list(positions)).validate()
        with self._lock:
            old = self._positions
            self._positions = {pos.key: pos for pos in new.positions}
            self._closed = {}
            if accounts is not None:
                self._accounts = list(accounts)
            changed = [pos for key, pos in self._positions.items() if old.get(key) != pos]
            changed += [
                pos.with_quantity(0) for key, pos in old.items() if key not in self._positions
            ]
        self._push(changed)

    def set_portfolio(self, portfolio: Portfolio) -> None:
        """Replace accounts and positions from a ``Portfolio``."""
        self.set_positions(portfolio.positions, accounts=portfolio.accounts)

    def upsert_position(self, position: SimPosition) -> None:
        """Add a position or replace the one with the same (account, con_id)."""
        with self._lock:
            self._positions[position.key] = position
            self._closed.pop(position.key, None)
        self._push([position])

    def remove_position(self, account: str, con_id: int) -> bool:
        """Close a position; returns False if there was none.

        Until the next ``set_positions`` it is reported as a row with quantity 0 (when
        ``report_closed_as_zero``), the way TWS reports positions closed during the day.
        """
        with self._lock:
            pos = self._positions.pop((account, int(con_id)), None)
            if pos is None:
                return False
            zero = pos.with_quantity(0)
            self._closed[pos.key] = zero
        self._push([zero])
        return True

    def set_cash(self, account: str, balances: dict[str, Decimal | int | str]) -> None:
        """An account's cash per currency (replacing what it had), e.g. {"USD": "-1200.50",
        "EUR": "5000"}: each is a CashBalance of its currency in the account's values."""
        with self._lock:
            self._cash[account] = {c: Decimal(str(a)) for c, a in balances.items()}

    def set_exchange_rate(self, currency: str, rate: Decimal | str) -> None:
        """IBKR's exchange rate of `currency` to the base currency, as the values send it."""
        with self._lock:
            self._rates[currency] = Decimal(str(rate))

    def set_market_price(self, account: str, con_id: int, price: Decimal | str) -> None:
        """Move one position's market price (its portfolio row and the account's values
        follow); the position itself, quantity and average cost, does not change."""
        with self._lock:
            pos = self._positions[(account, int(con_id))]
            self._positions[pos.key] = dataclasses.replace(pos, market_price=Decimal(str(price)))

    def move_prices(self, factor: Decimal | str) -> None:
        """Multiply every position's market price by `factor` (a market move between
        syncs): only values change, no position."""
        factor = Decimal(str(factor))
        with self._lock:
            for key, pos in self._positions.items():
                price = (pos.price * factor).quantize(_PRICE_STEP)
                self._positions[key] = dataclasses.replace(pos, market_price=price)

    def _drift_prices(self, account: str) -> None:
        drift = float(self.price_drift)
        with self._lock:
            for key, pos in self._positions.items():
                if pos.account == account:
                    factor = Decimal(repr(1 + self._random.uniform(-drift, drift)))
                    price = (pos.price * factor).quantize(_PRICE_STEP)
                    self._positions[key] = dataclasses.replace(pos, market_price=price)

    # -- faults (thread-safe) -----------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The live fault settings; assign attributes or a new ``Faults`` at any time."""
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        with self._lock:
            self._faults = value

    def set_faults(self, **changes: Any) -> Faults:
        """Change several fault settings atomically (``sim.set_faults(hang_positions=True)``)."""
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **changes)
            return self._faults

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = Faults()

    def _fault_snapshot(self) -> Faults:
        with self._lock:
            return dataclasses.replace(self._faults)

    # -- other thread-safe controls -----------------------------------------------------

    @property
    def active_client_ids(self) -> list[int]:
        """Client ids of the sessions currently connected (after startApi)."""
        return sorted(self._call_in_loop(lambda: list(self._client_ids), default=[]))

    def disconnect_all(self) -> int:
        """Abort every client connection (a gateway crash / network drop); returns count.

        The listener stays up, so clients can reconnect right away.
        """

        def abort_all() -> int:
            connections = list(self._connections)
            for conn in connections:
                conn.abort()
            return len(connections)

        return self._call_in_loop(abort_all, default=0)

    def _call_in_loop(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run ``fn`` on the simulator's loop and return its result, from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._server is None:
            return default
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return fn()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=5)

    # -- connection handling ------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(reader, writer)
        conn.task = asyncio.current_task()
        self.connections_accepted += 1
        if self._fault_snapshot().refuse_connections:
            logger.info("Refusing connection from %s (fault injection)", conn.peer)
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                # linger 0 turns close() into a TCP reset, like a port that is not open
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.abort()
            return
        self._connections.add(conn)
        logger.debug("Connection from %s", conn.peer)
        try:
            if await self._handshake(conn):
                await self._serve(conn)
        except (asyncio.IncompleteReadError, ConnectionError, _CloseConnection):
            pass
        except asyncio.CancelledError:
            # Only ``stop`` (or loop shutdown) cancels a handler, and the connection is
            # finished either way. Re-raising would make asyncio's stream machinery log
            # "Exception in callback ... connection_made" on Python 3.11.
            pass
        except Exception:
            logger.exception("Simulator error on connection from %s", conn.peer)
        finally:
            self._connections.discard(conn)
            if conn.client_id is not None and self._client_ids.get(conn.client_id) is conn:
                del self._client_ids[conn.client_id]
            if not conn.closing:
                with contextlib.suppress(Exception):
                    writer.close()
            logger.debug("Connection from %s (client id %s) closed", conn.peer, conn.client_id)

    async def _handshake(self, conn: _Connection) -> bool:
        """Negotiate the version; False if the peer is not a compatible API client."""
        prefix = await conn.reader.readexactly(len(API_PREFIX))
        if prefix != API_PREFIX:
            logger.warning("Connection from %s did not start with API\\0; closing", conn.peer)
            return False
        (size,) = _LENGTH.unpack(await conn.reader.readexactly(4))
        if size > _MAX_HANDSHAKE:
            logger.warning("Oversized handshake from %s; closing", conn.peer)
            return False
        text = (await conn.reader.readexactly(size)).decode(errors="replace")
        match = _VERSION_RE.match(text)
        if not match:
            logger.warning("Unparsable version range %r from %s; closing", text, conn.peer)
            return False
        client_min = int(match.group(1))
        client_max = int(match.group(2) or client_min)
        version = min(client_max, self.max_server_version)
        if version < max(client_min, MIN_SERVER_VERSION):
            logger.warning(
                "No common version with %s (client %d..%d, server %d..%d); closing",
                conn.peer,
                client_min,
                client_max,
                MIN_SERVER_VERSION,
                self.max_server_version,
            )
            return False
        if self._fault_snapshot().drop_during_handshake:
            logger.info("Closing %s during the handshake (fault injection)", conn.peer)
            conn.abort()
            return False
        conn.server_version = version
        conn_time = time.strftime("%Y%m%d %H:%M:%S UTC", time.gmtime())
        await self._send(conn, [make_message(version, conn_time)])
        logger.debug("Handshake with %s: server version %d", conn.peer, version)
        return True

    async def _serve(self, conn: _Connection) -> None:
        """Read requests until the client goes away; answer each in order."""
        reader = conn.reader
        while True:
            (size,) = _LENGTH.unpack(await reader.readexactly(4))
            if size > _MAX_REQUEST:
                logger.warning("Oversized request (%d bytes) from %s; closing", size, conn.peer)
                return
            payload = await reader.readexactly(size)
            fields = payload.decode(errors="backslashreplace").split("\0")
            if fields and fields[-1] == "":
                fields.pop()
            if not fields or not fields[0].isdigit():
                logger.info("Ignoring unparsable request %r from %s", fields[:3], conn.peer)
                continue
            msg_id = int(fields[0])
            self.request_counts[msg_id] += 1
            if conn.client_id is None:
                if msg_id == ClientMsg.START_API:
                    await self._start_api(conn, fields)
                else:
                    logger.info("Ignoring request %d before startApi from %s", msg_id, conn.peer)
                continue
            handler = self._handlers.get(msg_id)
            if handler is None:
                logger.info(
                    "Ignoring unsupported request %d from client %s: %s",
                    msg_id,
                    conn.client_id,
                    ",".join(fields[:6]),
                )
                continue
            await handler(conn, fields)

    async def _send(
        self, conn: _Connection, frames: Sequence[bytes | float], delay: float | None = None
    ) -> None:
        """Write frames in one batch and drain once; with a delay, one by one. A float
        among the frames is a pause (a scripted answer's): what comes before it is
        written, then nothing for that many seconds."""
        if not frames or conn.closing:
            return
        faults = self._fault_snapshot()
        if delay is None:
            delay = faults.message_delay
        batch: list[bytes] = []
        for item in [*frames, None]:
            if isinstance(item, bytes) and delay <= 0:
                batch.append(item)
                continue
            if batch:
                await self._write(conn, b"".join(batch), faults)
                batch = []
            if item is None:
                return
            await asyncio.sleep(item if isinstance(item, float) else delay)
            if conn.closing:
                raise _CloseConnection
            if isinstance(item, bytes):
                await self._write(conn, item, faults)

    @staticmethod
    async def _write(conn: _Connection, data: bytes, faults: Faults) -> None:
        """Write bytes as one piece, or in the pieces ``segment_size`` asks for."""
        size = faults.segment_size
        if not size or size >= len(data):
            conn.writer.write(data)
            await conn.writer.drain()
            return
        for start in range(0, len(data), size):
            if start and faults.segment_delay > 0:
                await asyncio.sleep(faults.segment_delay)
                if conn.closing:
                    raise _CloseConnection
            conn.writer.write(data[start : start + size])
            await conn.writer.drain()

    def _script(
        self, conn: _Connection, items: Iterable[list[str] | int | float]
    ) -> list[bytes | float]:
        """A scripted answer's items as what ``_send`` writes: raw frames as they are, an
        IB error code as its error (reqId -1, TWS's text), a pause as it is."""
        out: list[bytes | float] = []
        for item in items:
            if isinstance(item, float):
                out.append(item)
            elif isinstance(item, int):
                out.append(self._error_frame(conn, -1, item, ""))
            else:
                out.append(_text_frame(list(item)))
        return out

    async def _close_after(self, conn: _Connection, frames: list[bytes], delay: float) -> None:
        """Send frames, then close gracefully so the client reads them before the EOF."""
        await self._send(conn, frames, delay)
        conn.writer.close()
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()
        raise _CloseConnection

    def _error_frame(self, conn: _Connection, req_id: int, code: int, message: str) -> bytes:
        """IB error message (4, version 2); the client's decoder needs the extra field >= 166."""
        message = message or IB_ERROR_TEXTS.get(code, f"Simulated error {code}")
        if conn.server_version >= MIN_SERVER_VER_ADVANCED_ORDER_REJECT:
            return make_message(ServerMsg.ERROR, 2, req_id, code, message, "")
        return make_message(ServerMsg.ERROR, 2, req_id, code, message)

    # -- request handlers ---------------------------------------------------------------

    async def _start_api(self, conn: _Connection, fields: list[str]) -> None:
        """startApi (71, version 2, clientId, optCapab) -> nextValidId + managedAccounts."""
        faults = self._fault_snapshot()
        try:
            client_id = int(fields[2])
        except (IndexError, ValueError):
            logger.warning("Malformed startApi %r from %s; closing", fields, conn.peer)
            raise _CloseConnection from None
        error = faults.error_on_connect
        if client_id in self._client_ids or (error is not None and error[0] == 326):
            message = error[1] if error is not None and error[0] == 326 else ""
            logger.info("Client id %d already in use; rejecting %s with 326", client_id, conn.peer)
            frame = self._error_frame(conn, -1, 326, message or DUPLICATE_CLIENT_ID_MESSAGE)
            await self._close_after(conn, [frame], faults.message_delay)
        conn.client_id = client_id
        self._client_ids[client_id] = conn
        frames = [
            make_message(ServerMsg.NEXT_VALID_ID, 1, self._next_valid_id),
            make_message(
                ServerMsg.MANAGED_ACCTS,
                1,
                "" if faults.no_managed_accounts else ",".join(self.accounts),
            ),
        ]
        if self.farm_status_messages:
            frames += [self._error_frame(conn, -1, code, "") for code in (2104, 2106, 2158)]
        if error is not None:
            frames.append(self._error_frame(conn, -1, error[0], error[1]))
        logger.info("API session started for client id %d from %s", client_id, conn.peer)
        await self._send(conn, frames, faults.message_delay)

    def _snapshot_rows(self) -> list[SimPosition]:
        """Positions to report: open ones, then zero rows for ones closed this session."""
        with self._lock:
            rows = list(self._positions.values())
            if self.report_closed_as_zero:
                rows += self._closed.values()
        return rows

    async def _req_positions(self, conn: _Connection, fields: list[str]) -> None:
        """reqPositions (61) -> position rows (61, version 3) + positionEnd (62)."""
        faults = self._fault_snapshot()
        conn.positions_subscribed = True
        if faults.error_on_positions is not None:
            code, message = faults.error_on_positions
            logger.info("Answering reqPositions with error %d (fault injection)", code)
            await self._send(
                conn, [self._error_frame(conn, -1, code, message)], faults.message_delay
            )
            return
        if faults.hang_positions:
            logger.info("Not answering reqPositions (fault injection)")
            return
        if faults.hold_positions is not None:
            while not faults.hold_positions.is_set() and not conn.closing:
                await asyncio.sleep(0.01)
        rows = self._snapshot_rows()
        frames = [_position_frame(pos) for pos in rows]
        index = min(max(faults.malformed_index, 0), max(len(rows) - 1, 0))
        if faults.position_edits and rows:
            fields = _position_fields(rows[index])
            for name, text in faults.position_edits.items():
                fields[POSITION_FIELDS.index(name)] = text
            frames[index] = _text_frame(fields)
        if faults.malformed_position:
            bad = rows[index] if rows else None
            frames[index : index + 1] = [_malformed_position_frame(bad, faults.malformed_kind)]
        frames += self._script(conn, faults.extra_frames or ())
        if faults.drop_after_positions is not None:
            count = max(faults.drop_after_positions, 0)
            logger.info("Dropping connection after %d position rows (fault injection)", count)
            await self._close_after(conn, frames[:count], faults.message_delay)
        frames.append(make_message(ServerMsg.POSITION_END, 1))
        frames += self._script(conn, faults.frames_after_positions or ())
        logger.debug("Sending %d positions to client %s", len(rows), conn.client_id)
        await self._send(conn, frames, faults.message_delay)

    async def _cancel_positions(self, conn: _Connection, fields: list[str]) -> None:
        """cancelPositions (64): stop pushing position updates to this client."""
        conn.positions_subscribed = False

    def _push(self, rows: list[SimPosition]) -> None:
        """Send changed rows to subscribed clients (from any thread), as TWS does."""
        loop = self._loop
        if not rows or not self.push_position_updates or loop is None or self._server is None:
            return
        frames = b"".join(_position_frame(pos) for pos in rows)

        def write() -> None:
            for conn in list(self._connections):
                if conn.positions_subscribed and not conn.closing:
                    conn.writer.write(frames)

        with contextlib.suppress(RuntimeError):  # loop closed meanwhile
            loop.call_soon_threadsafe(write)

    def _accounts_for(self, requested: str) -> list[str]:
        accounts = self.accounts
        if not requested or requested.lower() == "all":
            return accounts
        return [requested] if requested in accounts else []

    def _account_values(self, account: str) -> list[tuple[str, str, str]]:
        """(tag, value, currency) rows as TWS sends them for one account: per currency its
        cash, IBKR's exchange rate and P&L, and the totals in the base currency (also as
        currency BASE), all from the account's cash and positions at their prices, rounded
        to cents per position as the portfolio rows are, so that they add up exactly.

        As IBKR counts them: the net liquidation is the cash plus the market value of
        stocks, options, bonds and funds; a future's market value (its notional) is no
        equity, only its P&L is (in TotalCashValue, as FuturesPNL), and only a CFD's P&L
        as well; a forex position is the cash balance of its currency, counted once, as
        cash. The gross position value is the sum of the absolute market values that
        count."""
        base = self.base_currency
        with self._lock:
            positions = [p for p in self._positions.values() if p.account == account]
            cash = self._cash.get(account)
            if cash is None:
                cash = {base: self.cash_balance}
                for pos in positions:
                    if pos.sec_type == "CASH":  # the currency's balance, as IBKR holds it
                        cash[pos.symbol] = cash.get(pos.symbol, Decimal(0)) + pos.quantity
            cash = dict(cash)
            rates = dict(self._rates)
        rates[base] = Decimal(1)
        value: dict[str, Decimal] = {}
        gross: dict[str, Decimal] = {}
        unrealized: dict[str, Decimal] = {}
        futures: dict[str, Decimal] = {}
        cfds: dict[str, Decimal] = {}
        for pos in positions:
            market, pnl = _valuation(pos)[1:3]
            c = pos.currency
            unrealized[c] = unrealized.get(c, Decimal(0)) + pnl
            if pos.sec_type in MARGIN_ONLY:
                pnls = futures if pos.sec_type == "FUT" else cfds
                pnls[c] = pnls.get(c, Decimal(0)) + pnl
            elif pos.sec_type != "CASH":
                value[c] = value.get(c, Decimal(0)) + market
                gross[c] = gross.get(c, Decimal(0)) + abs(market)
        currencies = sorted({*cash, *value, *futures, *cfds})

        def in_base(amounts: dict[str, Decimal]) -> Decimal:
            total = sum((a * rates.get(c, Decimal(1)) for c, a in amounts.items()), Decimal(0))
            return _money_value(total)

        cash_base, value_base, futures_base = in_base(cash), in_base(value), in_base(futures)
        total_cash = cash_base + futures_base
        net = total_cash + value_base + in_base(cfds)
        rows = [
            ("AccountCode", account, ""),
            ("AccountType", "INDIVIDUAL", ""),
            ("AccountReady", "true", ""),
        ]
        for c in currencies:
            held = cash.get(c, Decimal(0))
            settled = futures.get(c, Decimal(0))
            rows += [
                ("Currency", c, c),
                ("CashBalance", _money(held), c),
                ("TotalCashBalance", _money(held), c),
                ("ExchangeRate", _dec(rates.get(c, Decimal(1))), c),
                ("FuturesPNL", _money(settled), c),
                (
                    "NetLiquidationByCurrency",
                    _money(held + settled + value.get(c, Decimal(0)) + cfds.get(c, Decimal(0))),
                    c,
                ),
                ("StockMarketValue", _money(value.get(c, Decimal(0))), c),
                ("UnrealizedPnL", _money(unrealized.get(c, Decimal(0))), c),
                ("RealizedPnL", "0.00", c),
            ]
        rows += [
            ("Currency", "BASE", "BASE"),
            ("CashBalance", _money(cash_base), "BASE"),
            ("TotalCashBalance", _money(cash_base), "BASE"),
            ("ExchangeRate", "1.00", "BASE"),
            ("FuturesPNL", _money(futures_base), "BASE"),
            ("NetLiquidationByCurrency", _money(net), "BASE"),
            ("UnrealizedPnL", _money(in_base(unrealized)), "BASE"),
            ("RealizedPnL", "0.00", "BASE"),
            ("TotalCashValue", _money(total_cash), base),
            ("GrossPositionValue", _money(in_base(gross)), base),
            ("NetLiquidation", _money(net), base),
            ("NetLiquidation-S", _money(net), base),
            ("EquityWithLoanValue", _money(net), base),
            ("AvailableFunds", _money(net), base),
            ("ExcessLiquidity", _money(net), base),
            ("BuyingPower", _money(net * 4), base),
        ]
        return rows

    async def _req_account_updates(self, conn: _Connection, fields: list[str]) -> None:
        """reqAccountUpdates (6, v2, subscribe, acct) -> values (6), portfolio rows (7),
        time (8), accountDownloadEnd (54). TWS serves one account at a time: a client's
        new subscription replaces its old one (2100), and one held by another client for
        a different account refuses it (2101)."""
        faults = self._fault_snapshot()
        subscribe = len(fields) > 2 and fields[2] in ("1", "True", "true")
        requested = fields[3] if len(fields) > 3 else ""
        holder = self._account_subscription
        if holder is not None and holder[0].closing:
            holder = self._account_subscription = None
        if not subscribe:
            if holder is not None and holder[0] is conn:
                self._account_subscription = None
                if self.confirm_unsubscribe:
                    message = "API client has been unsubscribed from account data."
                    await self._send(conn, [self._error_frame(conn, -1, 2100, message)])
            return
        accounts = self._accounts_for(requested)
        account = accounts[0] if accounts else requested
        if self.price_drift:
            self._drift_prices(account)
        frames: list[bytes] = []
        if holder is not None and holder[0] is not conn and holder[1] != account:
            message = "Unable to subscribe to account as the following clients are subscribed"
            message += f" to a different account: {holder[0].client_id}"
            await self._send(conn, [self._error_frame(conn, -1, 2101, message)])
            return
        if holder is not None and holder[0] is conn and holder[1] != account:
            message = "New account data requested from TWS.  API client has been unsubscribed "
            frames.append(self._error_frame(conn, -1, 2100, message + "from account data."))
        error = (faults.values_error or {}).get(account)
        if error is not None:  # a request refused subscribes to nothing
            frames.append(self._error_frame(conn, -1, error[0], error[1]))
            await self._send(conn, frames)
            return
        self._account_subscription = (conn, account)
        if account in faults.drop_during_values:
            logger.info("Dropping the connection instead of %s's values (fault)", account)
            await self._close_after(conn, frames, faults.message_delay)
        if account in faults.values_empty:
            frames.append(make_message(ServerMsg.ACCT_DOWNLOAD_END, 1, account))
            await self._send(conn, frames)
            return
        notices, frames = frames, []
        edits = (faults.value_edits or {}).get(account, {})
        for tag, value, currency in self._account_values(account) if accounts else []:
            if tag == "AccountReady" and account in faults.values_not_ready:
                value = "false"
            value = edits.get(f"{tag}:{currency}", edits.get(tag, value))
            frames.append(make_message(ServerMsg.ACCT_VALUE, 2, tag, value, currency, account))
        frames += [
            _text_frame(list(extra)) for extra in (faults.value_frames or {}).get(account, ())
        ]
        with self._lock:
            positions = [p for p in self._positions.values() if p.account == account and p.quantity]
        rows = [_portfolio_fields(pos) for pos in positions]
        portfolio_edits = (faults.portfolio_edits or {}).get(account)
        if portfolio_edits and rows:
            for name, text in portfolio_edits.items():
                rows[0][PORTFOLIO_FIELDS.index(name)] = text
        if account in faults.values_taken_over:
            message = "New account data requested from TWS.  API client has been unsubscribed "
            frames.append(self._error_frame(conn, -1, 2100, message + "from account data."))
            self._account_subscription = None
            await self._send(conn, notices + frames, faults.message_delay)
            return
        frames += [_text_frame(row) for row in rows]
        frames.append(make_message(ServerMsg.ACCT_UPDATE_TIME, 1, time.strftime("%H:%M")))
        if account not in faults.values_hang:
            frames.append(make_message(ServerMsg.ACCT_DOWNLOAD_END, 1, account))
        script: list[bytes | float] = list(frames)
        inserts = (faults.value_inserts or {}).get(account, ())
        # Each index of the download as laid out above; the last position first, so that
        # an insert does not move the places of the others.
        places = [
            (slice(index, index).indices(len(frames))[0], order, items)
            for order, (index, items) in enumerate(inserts)
        ]
        for place, _, items in sorted(places, reverse=True, key=lambda p: p[:2]):
            script[place:place] = self._script(conn, items)
        await self._send(conn, notices + script, faults.message_delay)

    async def _req_account_updates_multi(self, conn: _Connection, fields: list[str]) -> None:
        """reqAccountUpdatesMulti (76, v1, reqId, acct, model, ledger) -> 73 rows + end 74."""
        req_id = fields[2]
        model = fields[4] if len(fields) > 4 else ""
        frames = [
            make_message(ServerMsg.ACCOUNT_UPDATE_MULTI, 1, req_id, acct, model, tag, value, ccy)
            for acct in self._accounts_for(fields[3] if len(fields) > 3 else "")
            for tag, value, ccy in self._account_values(acct)
        ]
        frames.append(make_message(ServerMsg.ACCOUNT_UPDATE_MULTI_END, 1, req_id))
        await self._send(conn, frames)

    async def _req_positions_multi(self, conn: _Connection, fields: list[str]) -> None:
        """reqPositionsMulti (74, v1, reqId, acct, model) -> 71 rows + end 72."""
        req_id = fields[2]
        accounts = set(self._accounts_for(fields[3] if len(fields) > 3 else ""))
        model = fields[4] if len(fields) > 4 else ""
        frames = [
            make_message(ServerMsg.POSITION_MULTI, 1, req_id, *_position_fields(pos)[2:], model)
            for pos in self._snapshot_rows()
            if pos.account in accounts
        ]
        frames.append(make_message(ServerMsg.POSITION_MULTI_END, 1, req_id))
        await self._send(conn, frames)

    async def _req_account_summary(self, conn: _Connection, fields: list[str]) -> None:
        """reqAccountSummary (62, v1, reqId, group, tags) -> 63 rows + end 64."""
        req_id = fields[2]
        tags = set(fields[4].split(",")) if len(fields) > 4 else set()
        frames = [
            make_message(ServerMsg.ACCOUNT_SUMMARY, 1, req_id, acct, tag, value, ccy)
            for acct in self.accounts
            for tag, value, ccy in self._account_values(acct)
            if tag in tags
        ]
        frames.append(make_message(ServerMsg.ACCOUNT_SUMMARY_END, 1, req_id))
        await self._send(conn, frames)

    async def _req_executions(self, conn: _Connection, fields: list[str]) -> None:
        """reqExecutions (7, v3, reqId, filter...) -> execDetailsEnd (55); no fills today."""
        await self._send(conn, [make_message(ServerMsg.EXECUTION_DATA_END, 1, fields[2])])

    async def _req_open_orders(self, conn: _Connection, fields: list[str]) -> None:
        """reqOpenOrders (5) / reqAllOpenOrders (16) -> openOrderEnd (53); no orders."""
        await self._send(conn, [make_message(ServerMsg.OPEN_ORDER_END, 1)])

    async def _req_completed_orders(self, conn: _Connection, fields: list[str]) -> None:
        """reqCompletedOrders (99, apiOnly) -> completedOrdersEnd (102, no version field)."""
        await self._send(conn, [make_message(ServerMsg.COMPLETED_ORDERS_END)])

    async def _req_current_time(self, conn: _Connection, fields: list[str]) -> None:
        """reqCurrentTime (49) -> currentTime (49, v1, epoch seconds)."""
        await self._send(conn, [make_message(ServerMsg.CURRENT_TIME, 1, int(time.time()))])

    async def _req_ids(self, conn: _Connection, fields: list[str]) -> None:
        """reqIds (8) -> nextValidId (9)."""
        await self._send(conn, [make_message(ServerMsg.NEXT_VALID_ID, 1, self._next_valid_id)])

    async def _req_managed_accounts(self, conn: _Connection, fields: list[str]) -> None:
        """reqManagedAccts (17) -> managedAccounts (15)."""
        accounts = ",".join(self.accounts)
        await self._send(conn, [make_message(ServerMsg.MANAGED_ACCTS, 1, accounts)])

    async def _req_contract_details(self, conn: _Connection, fields: list[str]) -> None:
        """reqContractDetails (9): not simulated; answer error 200 so callers do not hang."""
        req_id = int(fields[2]) if len(fields) > 2 and fields[2].lstrip("-").isdigit() else -1
        message = "No security definition has been found for the request"
        await self._send(conn, [self._error_frame(conn, req_id, 200, message)])

    async def _ignore(self, conn: _Connection, fields: list[str]) -> None:
        """Requests that need no answer (cancellations, market data type, auto-bind)."""
        logger.debug("Ignoring request %s from client %s", fields[0], conn.client_id)


class SimulatorThread:
    """Runs a ``GatewaySimulator`` on a private event loop in a daemon thread.

    Meant for synchronous tests that drive a real client from the main thread. ``stop``
    closes the server and every client connection, stops the loop and joins the thread,
    so nothing (thread, loop, socket) outlives the test.
    """

    def __init__(self, simulator: GatewaySimulator, *, startup_timeout: float = 5.0) -> None:
        self.simulator = simulator
        self.startup_timeout = startup_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> GatewaySimulator:
        """Start the thread and return once the simulator listens (or raise its error)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="ib-gateway-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.startup_timeout):
            raise TimeoutError("gateway simulator did not start in time")
        if self._error is not None:
            self._thread.join(self.startup_timeout)
            self._thread = None
            raise self._error
        return self.simulator

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self.simulator.start())
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(self.simulator.stop())
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._loop = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the simulator and join the thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                future = asyncio.run_coroutine_threadsafe(self.simulator.stop(), loop)
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    future.result(timeout)
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("gateway simulator thread did not stop in time")
        self._thread = None

    def __enter__(self) -> GatewaySimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- frame builders (hot path: keep them lean) ------------------------------------------


def _dec(value: Decimal) -> str:
    return format(value, "f")


def _contract_fields(pos: SimPosition) -> list[str]:
    """The contract as position and portfolio messages carry it, in the order of
    `protocol.CONTRACT_FIELDS` (the layout the gateway reads by)."""
    return _static(pos)[0]


def _static(pos: SimPosition) -> tuple[list[str], Decimal]:
    """What a position's frames repeat at every request (its contract's texts, its
    multiplier), worked out once per position object: a gateway answers 10,000s of rows
    at once, and only their prices and values change."""
    cached = pos.__dict__.get("_wire")
    if cached is None:
        cached = (
            [_wire_text(getattr(pos, name)) for name in CONTRACT_FIELDS],
            pos.multiplier_value,
        )
        object.__setattr__(pos, "_wire", cached)  # frozen: a cache, not a field
    return cached


def _wire_text(value: object) -> str:
    return _dec(value) if isinstance(value, Decimal) else str(value)


_POSITION_ID = str(POSITION_MESSAGE_ID)


def _position_fields(pos: SimPosition) -> list[str]:
    """Position message (61, version 3) exactly as ib_insync's ``Decoder.position`` reads it."""
    return [
        _POSITION_ID,
        POSITION_VERSION,
        pos.account,
        *_contract_fields(pos),
        _dec(pos.quantity),
        _dec(pos.average_cost),
    ]


def _text_frame(fields: list[str]) -> bytes:
    payload = ("\0".join(fields) + "\0").encode()
    return _LENGTH.pack(len(payload)) + payload


def _position_frame(pos: SimPosition) -> bytes:
    return _text_frame(_position_fields(pos))


def _malformed_position_frame(pos: SimPosition | None, kind: str) -> bytes:
    """A position frame the client's decoder rejects (ValueError while unpacking/parsing)."""
    if pos is None:
        pos = SimPosition(account="DU0000000", con_id=1, symbol="BROKEN")
    fields = _position_fields(pos)
    if kind == "field_count":
        fields = fields[:-1]
    else:
        fields[14] = "n/a"
    return _text_frame(fields)


def _market_value(pos: SimPosition) -> Decimal:
    """What updatePortfolio states as the market value: quantity x price x multiplier (a
    future's notional, too), and a bond's price is a percent of its face value."""
    try:
        return _per_unit(pos, pos.quantity * _price(pos) * _static(pos)[1])
    except (InvalidOperation, ZeroDivisionError):
        return Decimal(0)


def _per_unit(pos: SimPosition, amount: Decimal) -> Decimal:
    """`amount` (quantity x a price) in money: IBKR quotes a bond in percent of par, so a
    bond's quantity (its face value) times its price is 100 times its value."""
    return amount / 100 if pos.sec_type == "BOND" else amount


def _price(pos: SimPosition) -> Decimal:
    if pos.market_price is not None:
        return pos.market_price
    if pos.sec_type == "BOND":  # a percent of par; the average cost is per 1 of face
        return pos.average_cost * 100
    return pos.average_cost / _static(pos)[1]


def _money(value: Decimal) -> str:
    try:
        return _dec(value.quantize(_CENT))
    except InvalidOperation:
        return _dec(value)


def _money_value(value: Decimal) -> Decimal:
    try:
        return value.quantize(_CENT)
    except InvalidOperation:
        return value


def _portfolio_frame(pos: SimPosition) -> bytes:
    return _text_frame(_portfolio_fields(pos))


def _portfolio_fields(pos: SimPosition) -> list[str]:
    """updatePortfolio (7, version 8): the 20 fields ``Decoder.updatePortfolio`` unpacks,
    in the order of ``protocol.PORTFOLIO_FIELDS``."""
    price, market, pnl = _valuation(pos)
    return [
        str(PORTFOLIO_MESSAGE_ID),
        PORTFOLIO_VERSION,
        *_contract_fields(pos),
        _dec(pos.quantity),
        _dec(price),
        _dec(market),
        _dec(pos.average_cost),
        _dec(pnl),
        "0",
        pos.account,
    ]


def _valuation(pos: SimPosition) -> tuple[Decimal, Decimal, Decimal]:
    """(market price, market value, unrealized P&L) as the portfolio row and the account's
    values state them (value and P&L to cents), worked out once per position object:
    the values and the portfolio rows of a request agree, and a price moves by a new
    object."""
    cached = pos.__dict__.get("_value")
    if cached is None:
        try:
            price = _price(pos).quantize(_PRICE_STEP)
        except (InvalidOperation, ZeroDivisionError):
            price = Decimal(0)
        value = _market_value(pos)
        cost = pos.quantity * pos.average_cost  # the cost of one unit of quantity, as IBKR's
        cached = (price, _money_value(value), _money_value(value - cost))
        object.__setattr__(pos, "_value", cached)  # frozen: a cache, not a field
    return cached
