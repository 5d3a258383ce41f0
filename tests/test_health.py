"""`GET /healthz`: database, age and outcome of the last sync, optionally the gateway port."""

import datetime as dt
import logging
import socket

import pytest
from django.utils import timezone

from ibkr_sync.models import SyncRun

pytestmark = pytest.mark.django_db

URL = "/healthz"


def run(status="success", *, ago: dt.timedelta = dt.timedelta(minutes=5), **fields) -> SyncRun:
    started = timezone.now() - ago
    created = SyncRun.objects.create(trigger="command", status=status, **fields)
    # started_at is auto_now_add: set the past explicitly.
    SyncRun.objects.filter(pk=created.pk).update(
        started_at=started, finished_at=None if status == "running" else started
    )
    created.refresh_from_db()
    return created


@pytest.fixture
def listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(client, query=""):
    response = client.get(URL + query)
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    return response.status_code, response.json()


def test_healthy_after_a_recent_successful_sync(client):
    run(ago=dt.timedelta(minutes=10))

    status, body = get(client)

    assert status == 200
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"status": "ok"}
    last = body["checks"]["last_sync"]
    assert last["status"] == "ok"
    assert 599 <= last["age_seconds"] <= 610
    assert last["max_age_seconds"] == 86400
    assert "gateway" not in body["checks"]


def test_never_synced_is_503(client):
    status, body = get(client)

    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["checks"]["last_sync"]["status"] == "never"


def test_stale_after_the_configured_age(client, settings):
    settings.IBKR_SYNC_MAX_AGE = 3600
    run(ago=dt.timedelta(hours=2))

    status, body = get(client)

    assert status == 503
    assert body["checks"]["last_sync"]["status"] == "stale"
    assert body["checks"]["last_sync"]["age_seconds"] >= 7200


def test_age_check_can_be_turned_off(client, settings):
    settings.IBKR_SYNC_MAX_AGE = 0
    run(ago=dt.timedelta(days=30))

    assert get(client)[0] == 200


def test_latest_sync_failed_is_503_with_its_code_only(client):
    run(ago=dt.timedelta(hours=1))
    run(
        "failed",
        ago=dt.timedelta(minutes=1),
        error_code="gateway_unavailable",
        error_message="Cannot connect to the IB gateway at 10.1.2.3:4001",
        account_filter="U1234567",
    )

    status, body = get(client)

    assert status == 503
    assert body["checks"]["last_sync"]["status"] == "failed"
    assert body["checks"]["last_sync"]["error_code"] == "gateway_unavailable"
    text = str(body)
    for secret in ("10.1.2.3", "4001", "U1234567", "Cannot connect"):
        assert secret not in text


def test_a_success_after_a_failure_is_healthy_again(client):
    run("failed", ago=dt.timedelta(hours=1), error_code="gateway_timeout")
    run(ago=dt.timedelta(minutes=1))

    assert get(client)[0] == 200


def test_a_refused_or_running_sync_does_not_count_as_failure(client):
    run(ago=dt.timedelta(minutes=20))
    run("failed", ago=dt.timedelta(minutes=2), error_code="sync_already_running")
    run("running", ago=dt.timedelta(minutes=1))

    status, body = get(client)

    assert status == 200, body


def test_gateway_port_reachable(client, settings, listening_port):
    run()
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", listening_port

    status, body = get(client, "?gateway=1")

    assert status == 200
    assert body["checks"]["gateway"] == {"status": "ok"}


def test_gateway_port_closed_is_503(client, settings, closed_port):
    run()
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", closed_port

    status, body = get(client, "?gateway=1")

    assert status == 503
    assert body["checks"]["gateway"] == {"status": "unreachable"}
    assert str(closed_port) not in str(body)


def test_needs_no_login_and_ignores_bad_credentials(client):
    run()

    response = client.get(URL, HTTP_AUTHORIZATION="Token not-a-token")

    assert response.status_code == 200


def test_only_get(client):
    assert client.post(URL).status_code == 405


# --- logging: a monitor probes every few seconds ---------------------------------------------


@pytest.fixture
def health_log(caplog, monkeypatch):
    monkeypatch.setattr("ibkr_sync.api.views._last_health", {})  # as a fresh process
    caplog.set_level(logging.INFO)

    def records():
        found = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
        caplog.clear()
        return found

    return records


def test_unhealthy_is_one_warning_when_it_turns_then_info_and_never_an_error(client, health_log):
    assert get(client)[0] == 503
    assert health_log() == [
        ("ibkr_sync.health", "WARNING", "Health check unhealthy: last_sync=never")
    ]

    for _ in range(3):
        assert get(client)[0] == 503
        assert health_log() == [
            ("ibkr_sync.health", "INFO", "Health check unhealthy: last_sync=never")
        ]

    run()
    assert get(client)[0] == 200
    assert health_log() == [("ibkr_sync.health", "INFO", "Health check healthy again")]
    assert get(client)[0] == 200
    assert health_log() == []

    run("failed", ago=dt.timedelta(seconds=1), error_code="gateway_timeout")
    assert get(client)[0] == 503
    assert health_log() == [
        ("ibkr_sync.health", "WARNING", "Health check unhealthy: last_sync=failed")
    ]


def test_the_gateway_probe_has_its_own_state(client, settings, closed_port, health_log):
    run()
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", closed_port

    for _ in range(2):
        assert get(client)[0] == 200
        assert get(client, "?gateway=1")[0] == 503

    assert [level for _, level, _ in health_log()] == ["WARNING", "INFO"]
