"""One sync budget per user: at most IBKR_SYNC_THROTTLE_RATE syncs (e.g. 6/minute), however
the user starts them (`POST /portfolio/sync/ibkr` and the admin's "Sync now" take from the
same budget). The management command is run by an operator, not a user: not counted.

Kept in the default cache under the key and in the form of DRF's `UserRateThrottle`
(`throttle_ibkr_sync_<user pk>`: the times of the user's syncs in the window, newest
first), so counts kept before still apply. Per server process with Django's in-memory
cache, across processes with a shared one (CACHES). Plain Django, no DRF: the admin
uses it as the API does.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache

from .conf import app_settings

SCOPE = "ibkr_sync"
SETTING = "IBKR_SYNC_THROTTLE_RATE"
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# How long a sync waits for another request of the same user to take from the budget, and
# how long the cache keeps the lock of a process that died holding it.
_LOCK_WAIT = 2.0
_LOCK_EXPIRY = 5
_threads = threading.Lock()


@dataclass(frozen=True)
class Rate:
    syncs: int
    seconds: int
    text: str  # as configured, e.g. "6/minute"


def rate() -> Rate | None:
    """The configured budget, or None for no limit (none, off, empty, or None)."""
    text = app_settings.IBKR_SYNC_THROTTLE_RATE
    if text is None:
        return None
    syncs, period = text.split("/")
    return Rate(int(syncs), _SECONDS[period[0]], text)


def cache_key(user: Any) -> str:
    """DRF's UserRateThrottle key for our scope."""
    return f"throttle_{SCOPE}_{user.pk}"


def take(user: Any, now: float | None = None) -> float | None:
    """Take one sync from `user`'s budget: None when it may start (and is counted), else
    the seconds until the next one may (nothing is counted). Call it only for a sync that
    is about to start, after authentication and permission checks."""
    budget = rate()
    if budget is None:
        return None
    key = cache_key(user)
    with _exclusive(key) as held:
        if not held:
            return 1.0
        now = time.time() if now is None else now
        history = [t for t in cache.get(key, []) if t > now - budget.seconds]
        if len(history) >= budget.syncs:
            # The oldest counted sync leaves the window first: then one more may start.
            return max(budget.seconds - (now - history[-1]), 0.0)
        cache.set(key, [now, *history], budget.seconds)
        return None


@contextmanager
def _exclusive(key: str) -> Iterator[bool]:
    """The user's count read and written by one request at a time: True once held, False
    if another held it for longer than _LOCK_WAIT."""
    lock, token = f"{key}:lock", uuid.uuid4().hex
    deadline = time.monotonic() + _LOCK_WAIT
    with _threads:
        while not cache.add(lock, token, _LOCK_EXPIRY):
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.005)
        try:
            yield True
        finally:
            if cache.get(lock) == token:
                cache.delete(lock)


def refusal(wait: float) -> str:
    """What a user over budget is told, by the API and the admin alike."""
    budget = rate()
    limit = f"at most {budget.text} per user" if budget else "over the limit"
    seconds = max(math.ceil(wait), 1)
    return (
        f"Too many syncs: {limit} ({SETTING}), through the API and the admin together. "
        f"Try again in {seconds} second{'s' if seconds != 1 else ''}."
    )
