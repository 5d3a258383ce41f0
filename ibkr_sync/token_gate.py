"""One Flex exchange at a time per token, across processes: a gate in the database.

IBKR allows one request at a time per Flex token (and answers 1018, "too many requests",
to more). The Flex client keeps to it inside a process (a lock per token); its `gate`
hook is for the rest: a cron sync, a worker and an admin's Sync now, each in its own
process, share the token. `DatabaseGate` is that gate, on the database every process
already shares (SQLite or PostgreSQL, no broker):

- A row per token (`FlexTokenGate`), keyed on the token's digest (`client.token_key`),
  never the token.
- Taken by one conditional UPDATE: free (no holder, or its lease run out) and past its
  `not_before`. The lease (`lease` seconds) is renewed at each request of the exchange
  (`renew`), so a holder that died frees the token within a lease, and one working never
  loses it. A holder that was a process of this machine (same host name, boot and pid
  namespace, as the sync lock tells them: `lock.process_identity`) and has ended (a
  worker killed mid-exchange) frees it at once: the next sync of its connection, which
  takes the lock once the dead worker's heartbeat is silent, does not wait out the lease
  too.
- `not_before`: when the gate is given back, the next request on the token may go no
  sooner than `spacing` seconds later (IBKR: one request a second); after a 1018, no
  sooner than the client's back-off (`throttled`): a later process waits it out too.
- Every moment is the database's clock (`lock.database_now`), so the machines' clocks do
  not matter. A process that waits longer than `wait` for the token gives up:
  `FlexThrottled` (exit 3), nothing was asked of IBKR.

Used outside any transaction (a sync reads its source before its write transaction):
each statement commits on its own, and is seen by the other processes at once.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final

from django.db import IntegrityError, transaction
from django.db.models import Q

from .lock import _alive, database_now, process_identity
from .models import FlexTokenGate
from .sources.flex.errors import FlexThrottled

#: Seconds a holder keeps the token without renewing it (each request renews it).
LEASE: Final = 300.0
#: Seconds a process waits for the token before giving up.
WAIT: Final = 900.0


class DatabaseGate:
    """The gate hook of `FlexClient`: `gate(key)` is a context manager that holds the
    token `key` (a digest) for one exchange; its value has `renew()` and
    `throttled(seconds)`, which the client calls."""

    def __init__(
        self,
        *,
        lease: float = LEASE,
        wait: float = WAIT,
        spacing: float = 1.0,
        poll: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lease = lease
        self.wait = wait
        self.spacing = spacing
        self.poll = poll
        self.sleep = sleep

    def __call__(self, key: str) -> Held:
        return Held(self, key)


class Held:
    """One hold of a token's gate (see `DatabaseGate`)."""

    def __init__(self, gate: DatabaseGate, key: str) -> None:
        self.gate = gate
        self.key = key
        self.holder = (
            f"{socket.gethostname()[:100]} pid {os.getpid()} thread "
            f"{threading.get_ident()} {uuid.uuid4().hex[:12]}{_whereabouts()}"
        )

    def __enter__(self) -> Held:
        self._ensure_row()
        deadline = time.monotonic() + self.gate.wait
        while not self._take():
            if self._free_if_ended():
                continue
            if time.monotonic() >= deadline:
                raise FlexThrottled(self._busy())
            self.sleep_a_little()
        return self

    def _busy(self) -> str:
        """Why the token could not be taken: its holder (and when the lease of one that
        stopped runs out), or IBKR's back-off."""
        row = FlexTokenGate.objects.filter(key=self.key).first()
        now = database_now()
        said = f"{self.gate.wait:g} s"
        if row is not None and row.holder and row.leased_until and row.leased_until > now:
            return (
                f"another process ({row.holder.rsplit(' thread ', 1)[0]}) has been using this "
                f"Flex token for over {said} (one request at a time per token): sync again "
                "later; nothing was asked of IBKR. If that process has stopped, the token "
                f"is free again at {row.leased_until:%Y-%m-%d %H:%M:%S} UTC, when its lease "
                "runs out"
            )
        if row is not None and row.not_before and row.not_before > now:
            return (
                f"IBKR asked for no request on this Flex token before "
                f"{row.not_before:%Y-%m-%d %H:%M:%S} UTC (too many requests, 1018), more "
                f"than {said} from now: sync again later; nothing was asked of IBKR"
            )
        return (
            f"another process has been using this Flex token for over {said} (one request "
            "at a time per token): sync again later; nothing was asked of IBKR"
        )

    def __exit__(self, *exc: object) -> None:
        now = database_now()
        spaced = now + dt.timedelta(seconds=self.gate.spacing)
        mine = FlexTokenGate.objects.filter(key=self.key, holder=self.holder)
        mine.filter(Q(not_before__isnull=True) | Q(not_before__lt=spaced)).update(not_before=spaced)
        mine.update(holder="", leased_until=None)

    # --- what the client calls ---

    def renew(self) -> None:
        """Before each request of the exchange: the lease runs from now again."""
        until = database_now() + dt.timedelta(seconds=self.gate.lease)
        FlexTokenGate.objects.filter(key=self.key, holder=self.holder).update(leased_until=until)

    def throttled(self, seconds: float) -> None:
        """IBKR answered 1018: no request on the token, from any process, for `seconds`."""
        until = database_now() + dt.timedelta(seconds=seconds)
        FlexTokenGate.objects.filter(key=self.key).filter(
            Q(not_before__isnull=True) | Q(not_before__lt=until)
        ).update(not_before=until)

    # --- taking it ---

    def _ensure_row(self) -> None:
        if FlexTokenGate.objects.filter(key=self.key).exists():
            return
        try:
            with transaction.atomic():
                FlexTokenGate.objects.create(key=self.key)
        except IntegrityError:
            pass  # another process made it meanwhile

    def _take(self) -> bool:
        now = database_now()
        return bool(
            FlexTokenGate.objects.filter(key=self.key)
            .filter(Q(holder="") | Q(leased_until__isnull=True) | Q(leased_until__lt=now))
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .update(holder=self.holder, leased_until=now + dt.timedelta(seconds=self.gate.lease))
        )

    def _free_if_ended(self) -> bool:
        """Free the token if its holder was a process of this machine that has ended;
        True if it was freed."""
        holder = FlexTokenGate.objects.filter(key=self.key).values_list("holder", flat=True)
        holder = holder.first()
        if not holder or not _ended_here(holder):
            return False
        return bool(
            FlexTokenGate.objects.filter(key=self.key, holder=holder).update(
                holder="", leased_until=None
            )
        )

    def sleep_a_little(self) -> None:
        self.gate.sleep(self.gate.poll)


def _whereabouts() -> str:
    """` @BOOT;NAMESPACE;START`: where this process's pid means this process (the boot, the
    pid namespace) and when it started, for `_ended_here`; empty where the system does not
    tell (then only the lease frees a holder that died)."""
    me = process_identity()
    if not me.machine or not me.started:
        return ""
    _host, boot, namespace = me.machine.rsplit(";", 2)
    return f" @{boot};{namespace};{me.started}"


def _ended_here(holder: str) -> bool:
    """Whether gate holder `holder` (as `Held` names it) was a process of this machine
    that no longer runs."""
    parts = holder.split(" ")
    if len(parts) != 7 or parts[1] != "pid" or not parts[2].isdigit():
        return False
    host, pid, where = parts[0], int(parts[2]), parts[6]
    mine = _whereabouts()
    if not mine or host != socket.gethostname()[:100] or where.count(";") != 2:
        return False
    boot, namespace, started = where.removeprefix("@").split(";")
    my_boot, my_namespace, _started = mine.strip().removeprefix("@").split(";")
    if (boot, namespace) != (my_boot, my_namespace):
        return False
    return not _alive(pid, started)
