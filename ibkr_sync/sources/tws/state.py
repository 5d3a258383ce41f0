"""What one read has seen so far, filled by the client library's callbacks on the
private loop as each message is read; and each account's values read, in turn."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ...exceptions import IbkrSyncError
from ...snapshot import PositionRecord, PositionValue
from .errors import _cut


def _now() -> dt.datetime:
    """The moment a message was read, aware: what a snapshot says its data describes."""
    return dt.datetime.now(dt.UTC)


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

    # The position messages (`positions.PositionMessages`), where they are read off the wire.
    messages: Any = None

    def note_unreadable(self, description: str) -> None:
        if self.messages is not None and not self.positions_ended:
            # Every position message before this frame is decoded first: one that cannot
            # be read counts before it, as on the wire.
            self.messages.flush()
        self.unreadable += 1
        if len(self.unreadable_examples) < 3:
            self.unreadable_examples.append(description)

    positions: dict[tuple[str, int], PositionRecord] = field(default_factory=dict)
    # Whether our positions request was sent, and its end (positionEnd) read: the
    # positions are what came before it on the wire, complete if the session had not
    # failed by then. What comes after it is the values' business.
    positions_requested: bool = False
    positions_ended: bool = False
    positions_complete: bool = False
    # The moment the positions' end was read: what the snapshot's positions describe.
    positions_as_of: dt.datetime | None = None
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
        self.positions_as_of = _now()
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
    positions: dict[int, PositionValue] = field(default_factory=dict)
    problem: str | None = None
    unreadable_at_start: int = 0
    unreadable_at_end: int = 0
    # The moment its download end was read: what its values describe.
    as_of: dt.datetime | None = None
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


def _unreadable(state: _ReadState, fields: list[str], reason: object) -> None:
    """Record a frame that could not be read, named by its first fields (never a secret:
    message id, version, account, contract id)."""
    head = ",".join(repr(f)[1:-1][:40] for f in fields[:4])
    state.note_unreadable(f"[{head}]: {reason}")
