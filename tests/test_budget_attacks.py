"""Attacks on the one sync budget per user (`ibkr_sync.throttle`)."""

import threading

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from ibkr_sync import throttle
from ibkr_sync.models import SyncRun

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


@pytest.mark.parametrize(
    "query",
    ["?ibkr_acount_id=U1234567", "?ibkr_account_id=not-an-id", "?ibkr_account_id=U1&x=1"],
)
def test_a_request_refused_as_invalid_takes_nothing_from_the_budget(
    django_user_model, settings, query
):
    settings.IBKR_SYNC_THROTTLE_RATE = "2/minute"
    user = django_user_model.objects.create_user("mallory", password="pw-123456")
    user.user_permissions.add(Permission.objects.get(codename="run_sync"))
    api = APIClient()
    api.force_authenticate(user)
    statuses = [api.post(SYNC + query).status_code for _ in range(4)]
    assert statuses == [400, 400, 400, 400]
    assert throttle.take(user) is None  # the budget is whole: no sync was started
    assert not SyncRun.objects.exists()
