"""The position messages of one read: kept as they came off the wire, decoded into
records as they arrive or, for the accounts whose positions the sync has written
already, only if asked for.

Each position message (id 61) is kept as its bytes, with the account it names. From
them each account's digest is taken (`PositionMessages.digest`): one hash over the
account's messages in sorted order, so the same messages in any order give the same
digest and any change of any byte of any of them gives another. A read told which
digests were written last (`defer`) does not decode on arrival: at the positions' end it
decodes, in the order of the wire, the messages of the accounts whose digest is not one
of those, and leaves the others undecoded (`settle`). Their messages are byte for byte
those a sync decoded, mapped and wrote before (a digest is written only for an account
whose every message was read and stored), so they decode as before: they are decoded
only if a sync asks for them after all (`records`).

A message that cannot be read makes the read incomplete, as a read that decodes
everything on arrival finds it: every message is decoded before the first frame that
could not be read is counted (so the first examples are in the order of the wire), and
from then on each message as it comes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Collection
from decimal import Decimal
from sys import intern
from typing import Any

from ... import protocol
from ...exceptions import IncompleteSnapshot
from ...protocol import (
    POSITION_FIELDS,
    POSITION_VERSION,
    UNSET,
    parse_decimal,
    parse_integer,
)
from ...snapshot import DeferredPositions, PositionRecord
from .state import _ReadState, _unreadable

#: Told, at the positions' end, an account and the digest of its messages: whether that
#: is the digest of the positions last written for it (then they are not decoded).
Written = Callable[[str, str], bool]

#: The most position messages one read keeps: ten times the largest portfolios this app
#: is measured at, far more than any login holds. A peer that sends more before their
#: end (a server that is no gateway, or a hostile one: a connection's address is its
#: owner's to set) fails the read there, instead of growing the process's memory until
#: the request's timeout.
MAX_POSITION_MESSAGES = 500_000


def _decoder_key() -> bytes:
    """What a digest of messages also stands for: the code that turns them into records
    (this module and the wire grammar). An upgrade of either changes every digest, so
    that messages decoded by other code are decoded again, once."""
    key = hashlib.blake2b(digest_size=32)
    for module in (__file__, protocol.__file__):
        try:
            with open(module, "rb") as source:
                key.update(source.read())
        except OSError:  # no source to read (a frozen install)
            key.update(os.path.basename(module).encode())
    return key.digest()


_DECODER_KEY = _decoder_key()


class PositionMessages(DeferredPositions):
    """Every position message of one read, in the order of the wire; the records of
    those decoded (`_ReadState.positions`); and, as a `DeferredPositions`, the snapshot's
    positions (of `account` only, if given)."""

    def __init__(
        self,
        state: _ReadState,
        address: str,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self._state = state
        self._address = address
        self._progress = progress
        self.account: str | None = None
        # In the order of the wire: each message and the account field's bytes (None:
        # a message too short to name one).
        self._messages: list[bytes] = []
        self._owners: list[bytes | None] = []
        # Each account's messages, by the account field's bytes.
        self._groups: dict[bytes | None, list[bytes]] = {}
        self._by_name: dict[str, list[bytes]] | None = None
        # Messages from this index on are not decoded yet (while deferring).
        self._pending = 0
        self._written: Written | None = None
        # Accounts whose messages were left undecoded at the positions' end.
        self._left: frozenset[str] = frozenset()
        # Accounts with two messages of one contract: what they hold depends on the
        # order of the messages, so their digest is "".
        self._repeated: set[str] = set()
        self._digests: dict[str, str] = {}
        self._all: tuple[PositionRecord, ...] | None = None

    # --- during the read, on the private loop --------------------------------------------

    def defer(self, written: Written) -> None:
        """Decode nothing on arrival; at the positions' end, the messages of the accounts
        `written` does not know (`settle`)."""
        self._written = written

    def add(self, message: bytes) -> None:
        """One position message (its bytes, without the length prefix)."""
        state = self._state
        if state.positions_ended:  # an update after the read: not part of it
            return
        if len(self._messages) >= MAX_POSITION_MESSAGES:
            state.fail(
                IncompleteSnapshot(
                    f"The IB gateway at {self._address} sent more than "
                    f"{MAX_POSITION_MESSAGES:,} positions before their end, more than any "
                    "login holds; the read was stopped and nothing was changed."
                )
            )
            return
        parts = message.split(b"\0", 3)
        owner = parts[2] if len(parts) > 2 else None
        self._messages.append(message)
        self._owners.append(owner)
        group = self._groups.get(owner)
        if group is None:
            self._groups[owner] = [message]
            self._by_name = None
        else:
            group.append(message)
        if self._written is None:
            self._decode(message)
            if self._progress is not None:
                self._progress("read", len(state.positions))
        elif self._progress is not None:
            self._progress("read", len(self._messages))

    def flush(self) -> None:
        """Decode every message not decoded yet, and each from now on as it comes: a frame
        that cannot be read was found, which makes the read incomplete (and its examples
        are to be in the order of the wire)."""
        if self._written is None:
            return
        self._written = None
        pending, self._pending = self._messages[self._pending :], len(self._messages)
        for message in pending:
            self._decode(message)

    def settle(self) -> None:
        """At the positions' end: decode, in the order of the wire, the messages of every
        account whose digest is not the one written last for it; leave the others."""
        written = self._written
        if written is None:
            return
        self._written = None
        start, self._pending = self._pending, len(self._messages)
        accounts = self._accounts()
        # An account that two spellings on the wire read as (bytes that are no text,
        # shown as escapes) is decoded, whatever its digest.
        left = {
            account
            for account, owners in accounts.items()
            if len(owners) == 1 and written(account, self.digest(account))
        }
        self._left = frozenset(left)
        skip = {owner for account in left for owner in accounts[account]}
        owners, messages = self._owners, self._messages
        for index in range(start, len(messages)):
            if owners[index] not in skip:
                self._decode(messages[index])

    def _decode(self, message: bytes) -> None:
        fields = message.decode(errors="backslashreplace").split("\0")
        fields.pop()  # after the last field's NUL: nothing (the library drops it too)
        try:
            record = _position_from_wire(fields)
        except (ValueError, ArithmeticError) as exc:
            _unreadable(self._state, fields, exc)
            return
        positions = self._state.positions
        key = (record.account, record.con_id)
        if key in positions:
            self._repeated.add(record.account)
        positions[key] = record

    # --- the snapshot's positions ----------------------------------------------------------

    def _accounts(self) -> dict[str, list[bytes]]:
        """Each account named on the wire, with the spellings of its field (its bytes)."""
        if self._by_name is None:
            by_name: dict[str, list[bytes]] = {}
            for owner in self._groups:
                if owner is not None:
                    name = intern(owner.decode(errors="backslashreplace"))
                    by_name.setdefault(name, []).append(owner)
            self._by_name = by_name
        return self._by_name

    def _of(self, account: str) -> list[bytes]:
        """The account's messages (every spelling's)."""
        groups = self._groups
        return [m for owner in self._accounts().get(account, ()) for m in groups[owner]]

    def accounts(self) -> Collection[str]:
        named = self._accounts()
        return named.keys() if self.account is None else [a for a in named if a == self.account]

    def digest(self, account: str) -> str:
        if account in self._repeated:
            return ""
        digest = self._digests.get(account)
        if digest is None:
            messages = sorted(self._of(account))
            hashed = hashlib.blake2b(b"".join(messages), digest_size=20, key=_DECODER_KEY)
            # The lengths too: no two lists of messages join to one text.
            hashed.update(struct.pack(f">{len(messages)}Q", *map(len, messages)))
            digest = self._digests[account] = hashed.hexdigest()
        return digest

    def records(self, skip: Collection[str] = ()) -> tuple[PositionRecord, ...]:
        if self._left and not self._left.issubset(skip):
            self._decode_left()
        if not skip:
            if self._all is None:
                self._all = self._kept(())
            return self._all
        return self._kept(set(skip))

    def _kept(self, skip: Collection[str]) -> tuple[PositionRecord, ...]:
        account = self.account
        return tuple(
            record
            for record in self._state.positions.values()
            if record.quantity != 0
            and (account is None or record.account == account)
            and record.account not in skip
        )

    def _decode_left(self) -> None:
        """Every message decoded again, in the order of the wire, as a read that decoded
        everything on arrival would have: the records in that order, and a message that
        cannot be read an incomplete read, as it would have been."""
        state = self._state
        seen, examples = state.unreadable, len(state.unreadable_examples)
        state.positions = {}
        self._repeated.clear()
        self._all = None
        self._left = frozenset()
        for message in self._messages:
            self._decode(message)
        if state.unreadable > seen:
            raise incomplete_read(
                self._address, state.unreadable - seen, state.unreadable_examples[examples:]
            )


def incomplete_read(address: str, count: int, examples: list[str]) -> IncompleteSnapshot:
    first = examples[0] if examples else "(no example kept)"
    return IncompleteSnapshot(
        f"The IB gateway at {address} sent {count} message(s) that could not be read, so "
        "the positions it reported may be incomplete; nothing was changed. "
        f"First: {first}"
    )


def _position_from_wire(fields: list[str]) -> PositionRecord:
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
    # Up to nine ASCII digits is a whole number below every "no value" marker (the least
    # of them has ten): read as it is; anything else by the wire grammar.
    if len(con_id) <= 9 and con_id.isascii() and con_id.isdigit():
        parsed_con_id = int(con_id)
    else:
        parsed_con_id = parse_integer(con_id)
    if parsed_con_id is UNSET or parsed_con_id <= 0:
        raise ValueError(f"contract id {con_id!r} is not a contract id")
    parsed_quantity = _repeated_decimal(_quantities, quantity)
    if parsed_quantity is UNSET:
        raise ValueError(f"the quantity of contract {parsed_con_id} is unset ({quantity!r})")
    parsed_cost = parse_decimal(average_cost)  # seldom the same text twice: not kept
    parsed_strike = _repeated_decimal(_strikes, strike)
    # Texts that repeat across positions (account, currency, ...) are kept once each.
    # Every field in PositionRecord's order (a test holds it to the keyword form).
    return _make_record(
        intern(account),
        parsed_con_id,
        symbol,
        intern(sec_type),
        parsed_quantity,
        None if parsed_cost is UNSET else parsed_cost,
        intern(currency),
        intern(exchange),
        "",  # primary exchange: not in a position message
        local_symbol,
        intern(trading_class),
        intern(multiplier),
        intern(last_trade_date),
        None if parsed_strike is UNSET else parsed_strike,
        intern(right),
        None,  # no fingerprint: the messages' digest is the account's (`digest`)
    )


_make_record = PositionRecord.make


# Quantities and strikes repeat across positions (100 shares, strike 150, none): each
# distinct text is read by the wire grammar once, and its Decimal (immutable) shared.
_CACHE_LIMIT = 4096
_quantities: dict[str, Decimal | Any] = {}
_strikes: dict[str, Decimal | Any] = {}


def _repeated_decimal(cache: dict[str, Decimal | Any], text: str) -> Decimal | Any:
    """`parse_decimal(text)`, read once per distinct text (a text that is no number raises
    WireValueError every time, and is never kept)."""
    value = cache.get(text)
    if value is None:
        value = parse_decimal(text)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[text] = value
    return value
