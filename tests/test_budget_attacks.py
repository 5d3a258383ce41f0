"""Attacks on the one sync budget per user (`ibkr_sync.throttle`)."""

import threading

import pytest

from ibkr_sync import throttle

pytestmark = pytest.mark.django_db

SYNC = "/portfolio/sync/ibkr"


class User:
    pk = 4242


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.locmem.LocMemCache",
        "django.core.cache.backends.filebased.FileBasedCache",
    ],
)
def test_concurrent_syncs_never_take_more_than_the_budget(settings, tmp_path, backend):
    settings.IBKR_SYNC_THROTTLE_RATE = "3/minute"
    settings.CACHES = {"default": {"BACKEND": backend, "LOCATION": str(tmp_path)}}
    from django.core.cache import cache

    cache.clear()
    taken = []
    start = threading.Barrier(40)

    def one() -> None:
        start.wait()
        if throttle.take(User()) is None:
            taken.append(1)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 3
