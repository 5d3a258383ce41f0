"""Frames off the wire into records: positions (kept and decoded by `positions.py`),
portfolio rows, account values; and the guard every frame of the session goes through.

Positions and values are read from the message fields, not through the client library:
it turns them into floats (which would round fractional quantities) and keeps each
twice, which at 10,000s of positions is most of a read's time and memory. The numbers
are read with the TWS wire grammar (`protocol.py`), so IBKR's "no value" markers never
become numbers. A frame that cannot be read is recorded: during the positions it makes
the read incomplete (a position we could not read must never be closed as gone), during
an account's values it spoils that account's values only.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from decimal import Decimal
from sys import intern
from typing import Any

from ...conf import GatewayConfig
from ...exceptions import IncompleteSnapshot, NoManagedAccounts
from ...protocol import (
    ACCOUNT_DOWNLOAD_END_MESSAGE_ID,
    ACCOUNT_VALUE_FIELDS,
    ACCOUNT_VALUE_MESSAGE_ID,
    ACCOUNT_VALUE_VERSION,
    MAX_MESSAGE_LENGTH,
    PORTFOLIO_FIELDS,
    PORTFOLIO_MESSAGE_ID,
    PORTFOLIO_VERSION,
    POSITION_MESSAGE_ID,
    UNSET,
    WireValueError,
    parse_decimal,
    parse_integer,
)
from ...snapshot import PositionRecord, PositionValue
from .errors import TwsErrors, _cut, logger
from .positions import (  # noqa: F401  (_quantities, _repeated_decimal: for tests)
    PositionMessages,
    _position_from_wire,
    _quantities,
    _repeated_decimal,
)
from .state import _now, _ReadState, _unreadable
from .values import READ_TAGS

# Message ids of the TWS protocol that we read ourselves or look at.
_MSG_ERROR = 4
_MSG_NEXT_VALID_ID = 9
_MSG_MANAGED_ACCOUNTS = 15
_MSG_POSITION = POSITION_MESSAGE_ID
_MSG_POSITION_END = 62
# The exact field counts of the messages that start and end a read besides the positions
# (which `_position_from_wire` checks): the library would take a short one as it is.
_FIELD_COUNTS = {_MSG_MANAGED_ACCOUNTS: 3, _MSG_NEXT_VALID_ID: 3, _MSG_POSITION_END: 2}

# An account has a few dozen values a sync reads (a handful per currency it holds): far
# more is not an account's values, and would only cost memory.
_MAX_VALUES = 2000


class Decoding(TwsErrors):
    """How the source reads the frames of a session (mixed into the source)."""

    config: GatewayConfig
    address: str
    progress: Callable[[str, int], None] | None

    def _decode_positions_ourselves(self, ib: Any, state: _ReadState) -> None:
        """Read position messages straight off the wire, instead of through the library.

        The library turns each message into floats and two Contract objects, logs it,
        and keeps it twice; at 10,000s of positions that is most of a read's time and
        memory, and its floats would round fractional quantities. Here each message is
        kept as its bytes (`PositionMessages`) and becomes one PositionRecord with exact
        decimals, on arrival or, for an account the sync has written already, when asked
        for. A message that cannot be read is recorded: a read during which that happened
        is incomplete and must not close positions. The end-of-positions message still
        goes to the library, which ends its request. Should a library version not expose
        its decoder table, positions are taken from its position events instead.
        """
        handlers = getattr(ib.client.decoder, "handlers", None)
        if not isinstance(handlers, dict) or _MSG_POSITION not in handlers:
            ib.positionEvent += lambda position: self._on_position_event(state, position)
            return
        messages = state.messages = PositionMessages(state, self.address, self.progress)

        def on_position(fields: list[str]) -> None:
            # Decoded by the library (not cut by `Frames`): its text again, as it came.
            messages.add(("\0".join(fields) + "\0").encode(errors="surrogatepass"))

        handlers[_MSG_POSITION] = on_position

    def _position_frames(
        self, ib: Any, state: _ReadState, received: Callable[[bytes], None]
    ) -> Callable[[bytes], None]:
        """What takes the session's bytes after the API handshake (instead of the library's
        own `received`): a `Frames` that hands position messages straight to the read's
        `PositionMessages`, or `received` itself for a library without a decoder table. A length
        prefix longer than any message stops the read at once (the library would keep
        every byte that follows, waiting for the rest of it)."""
        handlers = getattr(ib.client.decoder, "handlers", None)
        if not isinstance(handlers, dict) or _MSG_POSITION not in handlers:
            return received

        def too_long(length: int) -> None:
            state.fail(
                IncompleteSnapshot(
                    f"The IB gateway at {self.address} sent a message of {length:,} bytes, "
                    f"longer than any message of the TWS API ({MAX_MESSAGE_LENGTH:,} at "
                    "most); the read was stopped and nothing was changed."
                )
            )

        return Frames(received, state.messages.add, too_long).feed

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
            if tag not in READ_TAGS:
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
                    read.as_of = _now()
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
        self._guard_framing(ib, state)
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

    def _guard_framing(self, ib: Any, state: _ReadState) -> None:
        """A frame the client library fails on before its decoder sees it fails the read.

        Until the API has started (nextValidId and managedAccounts read) the library
        looks at each frame itself, to tell when it has: a frame without a message id
        that is a number, or a nextValidId / managedAccounts in another layout, makes it
        raise there. Its event library only logs that, the frame is lost and the rest of
        the TCP segment held back until more bytes come, so the start never completes
        and the read would wait out the connect timeout, blamed on a gateway that "did
        not connect". It is a frame that could not be read: the read fails at once, and
        says so. (After the start every frame goes to the guarded decoder, which raises
        nothing; should the library fail on one all the same, the same holds.)
        """
        connection = getattr(ib.client, "conn", None)
        failures = getattr(getattr(connection, "hasData", None), "error_event", None)
        if failures is None:
            return

        def failed(_event: Any, exc: BaseException) -> None:
            what = f"{type(exc).__name__}: {_cut(str(exc), 80)}"
            logger.debug("The client library failed on a frame from %s (%s)", self.address, what)
            state.note_unreadable(f"a frame the client library could not take ({what})")
            state.fail(
                IncompleteSnapshot(
                    f"The IB gateway at {self.address} sent a message the client library "
                    f"could not read ({what}); what followed it cannot be trusted, so the "
                    "read was stopped and nothing was changed."
                )
            )

        failures += failed

    @staticmethod
    def _positions_end(state: _ReadState) -> None:
        # Ours, not one from before the request (or a second one).
        if state.positions_requested and not state.positions_ended:
            if state.messages is not None:
                state.messages.settle()  # what is left to decode, before it is counted
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

    def _received(self, state: _ReadState, position: PositionRecord) -> None:
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
        received = PositionRecord(
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


class Frames:
    """Cuts the session's bytes into frames (a four-byte length, then the message), as the
    client library does, so that position messages go straight to us (`position`, each
    message's bytes without its length): at
    10,000s of positions the library's own cutting (it copies the rest of its buffer at
    every message) and its dispatch cost more than reading them. Every other frame goes
    on to the library (`received`) as the very bytes it came in, complete, in the order
    of the wire; a frame not complete yet waits here for the rest of it. A length prefix
    beyond the protocol's longest message is no frame: `too_long` is told, and nothing
    more is taken.
    """

    def __init__(
        self,
        received: Callable[[bytes], None],
        position: Callable[[bytes], None],
        too_long: Callable[[int], None] = lambda length: None,
    ):
        self._received = received
        self._position = position
        self._too_long = too_long
        self._buffer = bytearray()
        self._stopped = False

    def feed(self, data: bytes) -> None:
        if self._stopped:
            return
        buffer = self._buffer
        buffer += data
        size, start, passed = len(buffer), 0, 0
        while size - start >= 4:
            length = _FRAME_LENGTH(buffer, start)[0]
            if length > MAX_MESSAGE_LENGTH:
                # No gateway's message: what came before it goes on, nothing after it.
                if passed < start:
                    self._received(bytes(buffer[passed:start]))
                self._stopped = True
                buffer.clear()
                self._too_long(length)
                return
            end = start + 4 + length
            if end > size:
                break  # not complete yet
            if buffer.startswith(_POSITION_PREFIX, start + 4):
                if passed < start:  # the library's frames before it, first
                    self._received(bytes(buffer[passed:start]))
                self._position(bytes(buffer[start + 4 : end]))
                passed = end
            start = end
        if passed < start:
            self._received(bytes(buffer[passed:start]))
        del buffer[:start]


_FRAME_LENGTH = struct.Struct(">I").unpack_from
_POSITION_PREFIX = f"{_MSG_POSITION}\0".encode()


def _float_decimal(value: float | None) -> Decimal | None:
    """A library float as the decimal the wire carried (repr() is the shortest text that
    round-trips), or None for IBKR's "no value" markers."""
    if value is None:
        return None
    number = parse_decimal(repr(float(value)))
    return None if number is UNSET else number


_PORTFOLIO_VALUES = slice(
    PORTFOLIO_FIELDS.index("market_price"), PORTFOLIO_FIELDS.index("realized_pnl") + 1
)
_PORTFOLIO_CON_ID = PORTFOLIO_FIELDS.index("con_id")
_PORTFOLIO_QUANTITY = PORTFOLIO_FIELDS.index("quantity")


def _position_value_from_wire(
    fields: list[str], positions: dict[tuple[str, int], PositionRecord], account: str
) -> PositionValue | None:
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
    return PositionValue(con_id, quantity, price, value, unrealized, realized)


def _optional_number(text: str) -> Decimal | None:
    number = _number(parse_decimal, text)
    return None if number is UNSET else number


def _number(parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except WireValueError as exc:
        raise WireValueError(f"has an unreadable number ({exc})") from None


def _values_layout(what: str, fields: list[str], expected: int) -> str:
    version = fields[1] if len(fields) > 1 else ""
    return (
        f"{what} message came in a layout this sync does not read ({len(fields)} fields, "
        f"version {_shown_field(version)}; expected {expected}); its stored values were kept"
    )


def _shown_field(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


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
