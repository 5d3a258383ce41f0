"""Every entry point, end to end: real IB client over TCP, simulator, real database."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token

from ibkr_sync.models import SyncRun
from ibkr_sync.testing import WireClient
from portfolio.models import Account, Instrument, Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

URL = "/portfolio/sync/ibkr"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(api_client, syncer):
    api_client.force_authenticate(syncer)
    return api_client


def snapshot_of_database():
    return sorted(
        Position.objects.values_list(
            "account__external_id", "instrument__external_id", "quantity", "closed_at"
        )
    )


def test_first_sync_then_idempotent_resync(ibkr, client):
    first = client.post(URL)
    assert first.status_code == 200, first.content
    body = first.json()
    assert body["status"] == "success"
    assert (body["processed"], body["created"], body["closed"]) == (4, 4, 0)
    assert body["accounts"] == [ACCOUNT, OTHER, EMPTY]
    assert Account.objects.count() == 3
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert tsla.quantity == Decimal("0.12345678")
    # cost basis is kept to 10 decimal places: 29.89178224020768 -> 29.8917822402
    assert tsla.cost_basis == Decimal("29.8917822402")
    spy = Instrument.objects.get(symbol="SPY")
    assert (spy.sec_type, spy.right, spy.strike, spy.multiplier) == (
        "OPT", "C", Decimal(600), Decimal(100)
    )  # fmt: skip

    second = client.post(URL).json()
    assert (second["unchanged"], second["created"], second["updated"]) == (4, 0, 0)


def test_changes_closes_and_reopens(ibkr, client):
    client.post(URL)
    ibkr.upsert_position(sim_position(quantity="12.5"))
    ibkr.remove_position(ACCOUNT, 76792991)
    ibkr.upsert_position(sim_position(account=OTHER, con_id=8314, symbol="IBM", quantity="1"))

    body = client.post(URL).json()

    assert (body["updated"], body["closed"], body["created"], body["unchanged"]) == (1, 1, 1, 2)
    assert Position.objects.get(instrument__symbol="AAPL").quantity == Decimal("12.5")
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert tsla.closed_at is not None and tsla.quantity == Decimal("0.12345678")

    ibkr.upsert_position(sim_position(con_id=76792991, symbol="TSLA", quantity="2"))
    assert client.post(URL).json()["reopened"] == 1
    tsla.refresh_from_db()
    assert tsla.closed_at is None and tsla.quantity == 2


def test_account_filter(ibkr, client):
    client.post(URL)
    ibkr.set_positions([])

    body = client.post(URL, QUERY_STRING=f"ibkr_account_id={OTHER}").json()

    assert body["accounts"] == [OTHER] and body["closed"] == 1
    assert Position.objects.open().filter(account__external_id=ACCOUNT).count() == 3


def test_account_unknown_to_the_gateway_is_404(ibkr, client):
    response = client.post(URL + "?ibkr_account_id=U7777777")
    assert response.status_code == 404
    assert response.json()["code"] == "unknown_account"
    assert "U7777777" in response.json()["detail"]


def test_client_id_in_use(ibkr, client):
    with WireClient("127.0.0.1", ibkr.port).connect_api(client_id=17):
        response = client.post(URL)
    assert response.status_code == 502
    assert response.json()["code"] == "client_id_in_use"
    assert "IBKR_CLIENT_ID" in response.json()["detail"]


def test_gateway_down_is_503_with_host_and_port(ibkr, client, settings):
    ibkr.stop_thread()
    response = client.post(URL)
    assert response.status_code == 503
    assert f"127.0.0.1:{settings.IBKR_PORT}" in response.json()["detail"]
    assert SyncRun.objects.latest().error_code == "gateway_unavailable"


def test_drop_mid_positions_changes_nothing_and_records_the_failure(ibkr, client):
    client.post(URL)
    before = snapshot_of_database()
    ibkr.set_positions([sim_position(quantity="1")])  # would close three if trusted
    ibkr.set_faults(drop_after_positions=0)

    response = client.post(URL)

    assert response.status_code == 503
    assert snapshot_of_database() == before
    failed = SyncRun.objects.latest()
    assert failed.status == "failed" and failed.error_message


def test_hang_is_504_within_the_timeout(ibkr, client, settings):
    settings.IBKR_REQUEST_TIMEOUT = 0.5
    ibkr.set_faults(hang_positions=True)
    started = time.monotonic()
    response = client.post(URL)
    assert response.status_code == 504
    assert time.monotonic() - started < 3
    assert response.json()["code"] == "gateway_timeout"


def test_malformed_frame_is_a_clean_error(ibkr, client):
    client.post(URL)
    before = snapshot_of_database()
    ibkr.set_faults(malformed_position=True, malformed_kind="field_count")
    response = client.post(URL)
    assert response.status_code == 502
    assert response.json()["code"] == "incomplete_snapshot"
    assert snapshot_of_database() == before


def test_sync_ibkr_command(ibkr, settings):
    settings.IBKR_REQUEST_TIMEOUT = 0.5
    out, err = StringIO(), StringIO()
    call_command("sync_ibkr", stdout=out, stderr=err)
    assert out.getvalue().count("\n") == 1
    assert "4 positions in 3 account(s): 4 created" in out.getvalue()
    assert err.getvalue() == ""

    ibkr.set_faults(hang_positions=True)
    with pytest.raises(CommandError) as caught:
        call_command("sync_ibkr", "--account", ACCOUNT, stdout=StringIO())
    assert caught.value.returncode == 4


@pytest.mark.django_db(transaction=True)
def test_endpoint_through_a_real_wsgi_server_thread(ibkr, live_server, syncer, settings):
    """Django's threaded WSGI server: the request thread has no asyncio event loop."""
    settings.IBKR_REQUEST_TIMEOUT = 0.5
    token = Token.objects.create(user=syncer)
    request = urllib.request.Request(
        live_server.url + URL, method="POST", headers={"Authorization": f"Token {token.key}"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        body = json.load(response)
    assert body["status"] == "success" and body["created"] == 4

    ibkr.set_faults(hang_positions=True)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=20)
    assert caught.value.code == 504


@pytest.mark.processes
def test_sync_ibkr_in_a_real_process(ibkr, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "IBKR_HOST": "127.0.0.1",
        "IBKR_PORT": str(ibkr.port),
        "IBKR_CLIENT_ID": "5",
    }

    def manage(*args):
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert manage("migrate", "-v", "0").returncode == 0
    ok = manage("sync_ibkr")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("IBKR sync #1: 4 positions in 3 account(s)")
    assert ok.stderr == ""

    ibkr.set_faults(malformed_position=True)
    bad = manage("sync_ibkr")
    assert bad.returncode == 8
    assert bad.stdout == ""
    assert "could not be read" in bad.stderr
    assert "Traceback" not in bad.stderr and "Error handling fields" not in bad.stderr
