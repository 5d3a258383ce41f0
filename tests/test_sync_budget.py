"""One sync budget per user (IBKR_SYNC_THROTTLE_RATE) across every way a user starts a
sync: the API's POST and the admin's "Sync now" take from the same count; other users
have their own; the management command (an operator's, not a user's) is not counted.
Through the real client against the simulator."""

import re

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from ibkr_sync import throttle
from ibkr_sync.models import SyncRun

pytestmark = pytest.mark.django_db

SYNC = "/portfolio/sync/ibkr"
SYNC_NOW = reverse("admin:ibkr_sync_syncrun_sync_now")


def make_syncer(django_user_model, name: str):
    user = django_user_model.objects.create_user(name, password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["run_sync", "view_syncrun"]))
    return user


class Edges:
    """One user's two ways to start a sync."""

    def __init__(self, user) -> None:
        self.user = user
        self.api = APIClient()
        self.api.force_authenticate(user)
        self.browser = Client()
        self.browser.force_login(user)

    def by_api(self) -> int:
        return self.api.post(SYNC).status_code

    def by_admin(self) -> str:
        """Sync now; the message it comes back with."""
        response = self.browser.post(SYNC_NOW, {"next": reverse("admin:index")}, follow=True)
        assert response.status_code == 200
        [message] = list(response.context["messages"])
        return message.message


@pytest.fixture
def alice(django_user_model, ibkr, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "2/minute"
    return Edges(make_syncer(django_user_model, "alice"))


def runs_by(user) -> int:
    return SyncRun.objects.filter(user=user).count()


def assert_refused_by_the_admin(text: str) -> None:
    match = re.fullmatch(
        r"Too many syncs: at most 2/minute per user \(IBKR_SYNC_THROTTLE_RATE\), through the "
        r"API and the admin together\. Try again in (\d+) seconds?\.",
        text,
    )
    assert match, text
    assert 1 <= int(match[1]) <= 60


def test_api_syncs_use_up_the_admins_budget(alice):
    assert [alice.by_api(), alice.by_api()] == [200, 200]

    text = alice.by_admin()

    assert_refused_by_the_admin(text)
    assert runs_by(alice.user) == 2, "nothing started: no SyncRun"


def test_admin_syncs_use_up_the_apis_budget(alice):
    assert alice.by_admin().startswith('<a href="')
    assert alice.by_admin().startswith('<a href="')

    response = alice.api.post(SYNC)

    assert response.status_code == 429
    assert response.json()["code"] == "throttled"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert runs_by(alice.user) == 2


def test_one_each_way_is_the_whole_budget(alice):
    assert alice.by_api() == 200
    assert alice.by_admin().startswith('<a href="')

    assert alice.by_api() == 429
    assert_refused_by_the_admin(alice.by_admin())
    assert runs_by(alice.user) == 2


def test_other_users_have_their_own_budget(alice, django_user_model):
    assert [alice.by_api(), alice.by_api()] == [200, 200]
    assert_refused_by_the_admin(alice.by_admin())
    bob = Edges(make_syncer(django_user_model, "bob"))

    assert bob.by_admin().startswith('<a href="')
    assert bob.by_api() == 200
    assert runs_by(bob.user) == 2


def test_the_command_is_an_operators_and_not_counted(alice):
    for _ in range(3):
        call_command("sync_ibkr", verbosity=0)
    assert SyncRun.objects.filter(trigger="command", status="success").count() == 3

    assert [alice.by_api(), alice.by_api()] == [200, 200], "alice's budget untouched"


def test_a_refused_attempt_is_not_counted(alice, settings):
    """Over the budget, a user waits for the window to pass; refusals do not extend it."""
    assert [alice.by_api(), alice.by_api()] == [200, 200]
    history = cache.get(throttle.cache_key(alice.user))
    for _ in range(3):
        assert_refused_by_the_admin(alice.by_admin())
        assert alice.by_api() == 429

    assert cache.get(throttle.cache_key(alice.user)) == history
    assert len(history) == 2


def test_no_budget_when_the_rate_is_none(alice, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "none"

    for _ in range(3):
        assert alice.by_admin().startswith('<a href="')
    assert alice.by_api() == 200
    assert runs_by(alice.user) == 4


def test_the_wait_is_until_the_oldest_sync_leaves_the_window(settings, django_user_model):
    settings.IBKR_SYNC_THROTTLE_RATE = "2/minute"
    user = make_syncer(django_user_model, "carol")

    assert throttle.take(user, now=1000.0) is None
    assert throttle.take(user, now=1010.0) is None
    assert throttle.take(user, now=1030.0) == pytest.approx(30.0)  # 1000 + 60 - 1030
    assert throttle.take(user, now=1060.5) is None  # the first one left the window
    assert throttle.take(user, now=1061.0) == pytest.approx(9.0)  # 1010 + 60 - 1061
