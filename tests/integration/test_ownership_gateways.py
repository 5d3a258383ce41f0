"""Users own their connections, over TCP: alice's and bob's connections and an unowned
one, each a simulator of its own read by the real client. Each user starts syncs of their
own connection (and the unowned one) through the API and the admin, is refused the
other's as a connection that does not exist, and reads what their syncs wrote and not
the other's. The rules on every page and endpoint: tests/test_ownership.py."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.testing import GatewaySimulator, Portfolio
from ibkr_sync.testing.pytest_plugin import CLIENT_ID

from .conftest import sim_position

pytestmark = pytest.mark.django_db(transaction=True)

SYNC = "/portfolio/sync/ibkr"
PERMISSIONS = ["run_sync", "view_syncrun", "view_position", "view_account", "view_connection"]


def portfolio(account: str, con_id: int, symbol: str) -> Portfolio:
    return Portfolio(
        accounts=[account], positions=[sim_position(account=account, con_id=con_id, symbol=symbol)]
    )


@pytest.fixture
def owners(settings, django_user_model):
    settings.IBKR_CONNECT_TIMEOUT = 5
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 3
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_PORT = 1  # the settings' gateway is nowhere
    settings.IBKR_SYNC_THROTTLE_RATE = "2/minute"
    cache.clear()
    users = {}
    for name in ("alice", "bob"):
        user = django_user_model.objects.create_user(name, password=f"pw-{name}-1", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(codename__in=PERMISSIONS))
        users[name] = user
    with (
        GatewaySimulator(portfolio("U1000001", 1001, "ALI")) as first,
        GatewaySimulator(portfolio("U2000002", 2002, "BOB")) as second,
        GatewaySimulator(portfolio("U3000003", 3003, "SHR")) as third,
    ):
        Connection.objects.create(
            name="alice", port=first.port, client_id=CLIENT_ID, owner=users["alice"]
        )
        Connection.objects.create(
            name="bob", port=second.port, client_id=CLIENT_ID, owner=users["bob"]
        )
        Connection.objects.create(name="shared", port=third.port, client_id=CLIENT_ID)
        yield users


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def symbols(user) -> set[tuple[str, str]]:
    rows = api(user).get("/portfolio/positions").json()["results"]
    return {(row["account"], row["instrument"]["symbol"]) for row in rows}


def test_each_owner_syncs_their_own_and_reads_their_own(owners):
    alice, bob = api(owners["alice"]), api(owners["bob"])

    refused = alice.post(f"{SYNC}?connection=bob")
    assert refused.status_code == 404 and refused.json()["code"] == "unknown_connection"
    assert not SyncRun.objects.exists()  # nothing started, nothing recorded

    # The refusal took nothing of alice's two syncs a minute.
    assert alice.post(f"{SYNC}?connection=alice").json()["accounts"] == ["U1000001"]
    assert alice.post(f"{SYNC}?connection=shared").json()["accounts"] == ["U3000003"]
    assert bob.post(f"{SYNC}?connection=bob").json()["accounts"] == ["U2000002"]
    assert dict(AccountReport.objects.values_list("external_id", "connection__name")) == {
        "U1000001": "alice",
        "U2000002": "bob",
        "U3000003": "shared",
    }

    assert symbols(owners["alice"]) == {("U1000001", "ALI"), ("U3000003", "SHR")}
    assert symbols(owners["bob"]) == {("U2000002", "BOB"), ("U3000003", "SHR")}
    runs = alice.get("/portfolio/sync/runs").json()["results"]
    assert sorted(run["connection"] for run in runs) == ["alice", "shared"]
    [bobs] = SyncRun.objects.filter(connection_name="bob")
    assert alice.get(f"/portfolio/sync/runs/{bobs.pk}").status_code == 404


def test_sync_now_syncs_the_users_connection_and_refuses_anothers(owners):
    client = Client()
    client.force_login(owners["bob"])
    url = reverse("admin:ibkr_sync_syncrun_sync_now")
    response = client.post(url, {"connection": "alice"}, follow=True)
    [message] = list(response.context["messages"])
    assert message.message.startswith("Sync not started: No IBKR connection is named 'alice'")
    response = client.post(url, {"connection": "bob"}, follow=True)
    [message] = list(response.context["messages"])
    assert "of connection bob finished" in message.message
    assert list(SyncRun.objects.values_list("connection_name", "status")) == [("bob", "success")]
