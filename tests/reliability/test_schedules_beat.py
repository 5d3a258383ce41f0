"""Connections' schedules with real processes: `celery -A portfolio_site beat` (reading the
schedules from the database, django-celery-beat's DatabaseScheduler) and a `celery worker`,
Redis as the broker, the site's database shared with them (`deployment.py`), against the
gateway simulator. A schedule saved on a connection fires, each firing queues a sync that
the worker runs to success, and a paused schedule fires no more.

Redis is the one on 127.0.0.1:6379, database REDIS_DB (emptied before and after); the
tests skip without it, except with REQUIRE_REDIS=1, where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ibkr_sync.testing import GatewaySimulator
from tests.integration.conftest import starting_portfolio
from tests.reliability.deployment import ROOT, Deployment
from tests.reliability.test_task_queue import REDIS_HOST, REDIS_PORT, Worker, _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.processes]

REDIS_DB = 5
BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
EVERY_SECONDS = 2
STARTING_POSITIONS = len(starting_portfolio().positions)


@pytest.fixture(scope="module")
def redis_db():
    try:
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2)
        client.ping()
    except Exception as exc:  # not installed, or not answering
        reason = f"Redis is not available at {REDIS_HOST}:{REDIS_PORT} ({exc})"
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}; REQUIRE_REDIS=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    client.flushdb()  # this suite's database only
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def simulator():
    with GatewaySimulator(starting_portfolio()) as sim:
        yield sim


@pytest.fixture(scope="module")
def site(redis_db, simulator, tmp_path_factory):
    site = Deployment(tmp_path_factory.mktemp("beat"), gateway_port=simulator.port)
    site.env.update(IBKR_SYNC_TASK_QUEUE="celery", CELERY_BROKER_URL=BROKER_URL)
    site.create()
    yield site
    site.destroy()


class Beat:
    """`celery -A portfolio_site beat` with the database scheduler, in a process group of
    its own, its log in a file."""

    def __init__(self, site: Deployment, workdir: Path) -> None:
        self.log = workdir / "beat.log"
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "portfolio_site", "beat", "--loglevel",
             "DEBUG", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
             "--max-interval", "1", "--pidfile", str(workdir / "beat.pid")],
            cwd=ROOT,
            env=site.env,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.handle.close()


def _shell(site: Deployment, code: str) -> str:
    return site.manage("shell", "-c", code, check=True).stdout.strip()


def _scheduled_runs(site: Deployment) -> list[tuple]:
    return site.query(
        "SELECT id, status, error_code, processed FROM ibkr_sync_syncrun "
        "WHERE trigger = 'schedule' ORDER BY id"
    )


def test_a_schedule_fires_its_syncs_on_a_worker_and_a_paused_one_fires_no_more(
    site, simulator, tmp_path
):
    # Saved as the admin saves it: the connection's schedule, and so its periodic task.
    created = _shell(
        site,
        "from ibkr_sync.models import Connection; "
        f"c = Connection(name='home', host='127.0.0.1', port={simulator.port}, client_id=41, "
        f"schedule='interval', schedule_every={EVERY_SECONDS}, schedule_period='seconds'); "
        "c.full_clean(); c.save(); "
        "from ibkr_sync import schedules; t = schedules.periodic_task(c.pk); "
        "import json; print(json.dumps([c.pk, t.task, t.args, t.enabled]))",
    )
    connection_id, task, args, enabled = json.loads(created.splitlines()[-1])
    assert (task, json.loads(args), enabled) == ("ibkr_sync.sync_scheduled", [connection_id], True)

    worker = Worker(site, tmp_path / "worker.log", "w1")
    beat = Beat(site, tmp_path)
    try:
        # Fired again and again; each firing's sync run by the worker, to success.
        fired = _wait_for(
            lambda: len([r for r in _scheduled_runs(site) if r[1] == "success"]) >= 3 or None,
            timeout=90,
        )
        runs = _scheduled_runs(site)
        assert fired, (
            f"{runs}\n--- beat:\n{beat.output()[-3000:]}\n--- worker:\n{worker.output()[-3000:]}"
        )
        assert all(status in ("queued", "running", "success") for _, status, _, _ in runs), runs
        first = runs[0]
        assert (first[1], first[3]) == ("success", STARTING_POSITIONS)
        # Never two waiting at once: a firing while one is queued or running adds none.
        waiting = [r for r in runs if r[1] in ("queued", "running")]
        assert len(waiting) <= 1, runs
        assert len(site.positions()) == STARTING_POSITIONS

        # Paused: the beat reads the change from the database and fires no more.
        _shell(
            site,
            "from ibkr_sync.models import Connection; c = Connection.objects.get(name='home'); "
            "c.schedule_enabled = False; c.full_clean(); c.save()",
        )
        time.sleep(EVERY_SECONDS + 6)  # the beat's next look at the database, a sync's end
        settled = len(_scheduled_runs(site))
        time.sleep(3 * EVERY_SECONDS)
        assert len(_scheduled_runs(site)) == settled, "a paused schedule fires no more"
        count = site.query(
            "SELECT total_run_count, enabled FROM django_celery_beat_periodictask WHERE name = ?",
            (f"ibkr_sync: sync connection #{connection_id}",),
        )
        assert count[0][0] >= 3 and not count[0][1], count
    finally:
        beat.stop()
        worker.stop()


def _health(site: Deployment) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{site.base_url}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthz_sees_a_worker_while_it_runs_and_not_once_it_stopped(site, tmp_path):
    site.start_server()
    try:
        started = time.monotonic()
        code, report = _health(site)
        assert time.monotonic() - started < 5
        assert (code, report["checks"]["queue"]["status"]) == (503, "no_worker")
        assert report["checks"]["queue"]["broker"] == "ok"

        worker = Worker(site, tmp_path / "worker.log", "seen")
        try:
            rows = _wait_for(
                lambda: site.query("SELECT hostname, queues FROM ibkr_sync_queueworker"), 30
            )
            [(hostname, queues)] = rows
            assert hostname.startswith("seen@")
            assert set(queues.split(",")) >= {"ibkr_sync.gateway", "ibkr_sync.flex"}
            check = _wait_for(
                lambda: (c := _health(site)[1]["checks"]["queue"])["status"] == "ok" and c, 15
            )
            assert check and check["workers"] == 1, _health(site)
        finally:
            worker.stop()
        # Stopped: its row goes with it, and the queue has no worker.
        assert site.query("SELECT COUNT(*) FROM ibkr_sync_queueworker") == [(0,)]
        code, report = _health(site)
        assert (code, report["checks"]["queue"]["status"]) == (503, "no_worker")
    finally:
        site.stop_server()
