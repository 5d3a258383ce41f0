"""`GET /healthz` with a task queue (IBKR_SYNC_TASK_QUEUE=celery, a real broker: Redis):
the broker reachable, a worker seen recently (its heartbeat row), the oldest queued
sync's age; 503 when any is wrong, answered fast and never waiting on the broker twice
in a row."""

import datetime as dt
import socket
import time

import pytest
from django.db.models.functions import Now
from django.utils import timezone

from ibkr_sync import health, services
from ibkr_sync.models import QueueWorker, SyncRun
from tests.test_health import run

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/healthz"


@pytest.fixture
def queue(task_queue):
    health.forget_broker_check()
    yield task_queue
    health.forget_broker_check()


@pytest.fixture
def broker_down(queue, monkeypatch):
    """The project's Celery app pointed at a port nothing listens on (Celery reads
    CELERY_BROKER_URL from the environment first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{port}/5")
    health.forget_broker_check()
    yield
    health.forget_broker_check()


def worker(name: str = "w1@host", ago: float = 0.0) -> QueueWorker:
    QueueWorker.alive(name, "celery,ibkr_sync.flex,ibkr_sync.gateway")
    if ago:
        QueueWorker.objects.filter(hostname=name).update(
            seen_at=timezone.now() - dt.timedelta(seconds=ago)
        )
    return QueueWorker.objects.get(hostname=name)


def test_without_a_queue_healthz_says_nothing_of_one(client, settings):
    settings.IBKR_SYNC_TASK_QUEUE = ""
    run()

    response = client.get(URL)
    assert response.status_code == 200
    assert "queue" not in response.json()["checks"]


def test_a_reachable_broker_and_a_live_worker_are_healthy(client, queue):
    run()
    worker()

    response = client.get(URL)

    assert response.status_code == 200, response.json()
    check = response.json()["checks"]["queue"]
    assert check == {
        "status": "ok",
        "broker": "ok",
        "workers": 1,
        "worker_seen_seconds": check["worker_seen_seconds"],
        "max_queued_seconds": 900,
    }
    assert 0 <= check["worker_seen_seconds"] <= 2


def test_no_worker_ever_or_none_recently_is_503_no_worker(client, queue):
    run()

    response = client.get(URL)
    assert response.status_code == 503
    check = response.json()["checks"]["queue"]
    assert (check["status"], check["broker"], check["workers"]) == ("no_worker", "ok", 0)
    assert "worker_seen_seconds" not in check

    worker(ago=60)  # its heartbeat stopped a minute ago: killed
    check = client.get(URL).json()["checks"]["queue"]
    assert (check["status"], check["workers"]) == ("no_worker", 0)
    assert 59 <= check["worker_seen_seconds"] <= 62


def test_a_sync_queued_longer_than_a_sync_takes_is_a_backlog(client, queue, settings):
    settings.IBKR_SYNC_STALE_AFTER = 60
    run()
    worker()
    queued = services.queue_sync(trigger="api")

    check = client.get(URL).json()["checks"]["queue"]
    assert check["status"] == "ok" and 0 <= check["oldest_queued_seconds"] <= 2

    SyncRun.objects.filter(pk=queued.pk).update(queued_at=timezone.now() - dt.timedelta(seconds=90))
    response = client.get(URL)
    assert response.status_code == 503
    check = response.json()["checks"]["queue"]
    assert (check["status"], check["max_queued_seconds"]) == ("backlog", 60)
    assert 89 <= check["oldest_queued_seconds"] <= 92

    # Taken by a worker (running, then done): no longer waiting.
    SyncRun.objects.filter(pk=queued.pk).update(status="failed", finished_at=Now())
    check = client.get(URL).json()["checks"]["queue"]
    assert check["status"] == "ok" and "oldest_queued_seconds" not in check


def test_a_broker_that_does_not_answer_is_503_fast_and_tried_once_in_a_while(client, broker_down):
    run()
    worker()

    started = time.monotonic()
    response = client.get(URL)
    first = time.monotonic() - started

    assert response.status_code == 503
    check = response.json()["checks"]["queue"]
    assert (check["status"], check["broker"]) == ("broker_unreachable", "unreachable")
    assert first < health.BROKER_TIMEOUT + 1
    # Asked again at once: the answer kept, not tried again.
    started = time.monotonic()
    assert client.get(URL).json()["checks"]["queue"]["broker"] == "unreachable"
    assert time.monotonic() - started < 0.5
    assert health._broker["reachable"] is False


def test_the_heartbeat_row_is_one_per_worker_on_the_databases_clock():
    first = worker("a@host")
    again = worker("a@host")
    assert QueueWorker.objects.count() == 1
    assert again.started_at == first.started_at and again.seen_at >= first.seen_at
    QueueWorker.gone("a@host")
    assert not QueueWorker.objects.exists()
