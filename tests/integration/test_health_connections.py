"""`GET /healthz` after real syncs of two connections, each a simulator of its own read by
the real client over TCP: a connection whose gateway is logged out, has lost its link to
IBKR's servers, or cannot be reached says so, with when it was last fine; the other one
stays fine."""

from __future__ import annotations

import pytest

from ibkr_sync import services
from ibkr_sync.exceptions import GatewayError
from ibkr_sync.models import Connection, SyncRun

from .test_connections import gateways  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def sync(name):
    return services.sync_positions(trigger="command", connection=name)


def health(client, query=""):
    response = client.get("/healthz" + query)
    body = response.json()
    by_id = {entry["id"]: entry for entry in body.get("connections", ())}
    names = {c.name: by_id[c.pk] for c in Connection.objects.all()}
    return response.status_code, body, names


def failing(name, code):
    with pytest.raises(GatewayError) as failure:
        sync(name)
    assert failure.value.code == code


def test_each_connection_says_how_its_gateway_stands(client, gateways):  # noqa: F811
    home, office = gateways
    sync("home")
    fine = sync("office")

    status, body, entries = health(client, "?gateway=1")
    assert status == 200, body
    assert {e["status"] for e in entries.values()} == {"ok"}
    assert {e["gateway"]["status"] for e in entries.values()} == {"ok"}

    # Logged out: the gateway answers, and manages no account.
    office.faults.no_managed_accounts = True
    failing("office", "no_managed_accounts")
    status, body, entries = health(client)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert entries["office"]["last_sync"]["status"] == "logged_out"
    last_fine = fine.finished_at.isoformat().replace("+00:00", "Z")
    assert entries["office"]["last_sync"]["last_success_at"] == last_fine
    assert entries["home"]["status"] == "ok"

    # Its link to IBKR's servers lost during the read (IB error 1100).
    office.faults.no_managed_accounts = False
    office.faults.error_on_positions = (1100, "")
    failing("office", "gateway_unavailable")
    status, body, entries = health(client)
    assert status == 503
    assert entries["office"]["last_sync"]["status"] == "logged_out"
    assert entries["office"]["last_sync"]["error_code"] == "gateway_unavailable"

    # Back: healthy again.
    office.faults.error_on_positions = None
    sync("office")
    assert health(client)[0] == 200

    # Not reachable at all: the sync fails, and the port probe says so too.
    office.stop_thread()
    failing("office", "gateway_unavailable")
    status, body, entries = health(client, "?gateway=1")
    assert status == 503
    assert entries["office"]["last_sync"]["status"] == "unreachable"
    assert entries["office"]["gateway"] == {"status": "unreachable"}
    assert entries["home"]["gateway"] == {"status": "ok"}
    assert entries["home"]["status"] == "ok"
    assert body["checks"]["gateway"] == {"status": "unreachable"}
    text = str(body)
    for secret in ("127.0.0.1", str(office.port), str(home.port), "U1000001", "U2000002"):
        assert secret not in text
    assert SyncRun.objects.filter(connection_name="office", status="failed").count() == 3
