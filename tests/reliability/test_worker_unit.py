"""deploy/celery-worker.service's command, run as systemd runs it and stopped as systemd
stops it (SIGTERM to the worker's main process alone, KillMode=mixed): Celery's warm
shutdown lets the sync it is running end, takes no new one, and exits cleanly; what is
queued meanwhile stays queued for the next worker. Real Redis (database 6), a real
worker, the site's database in `deployment.py`, the gateway simulator.

Skipped without Redis, except with REQUIRE_REDIS=1 (as in CI), where it fails."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ibkr_sync.testing import GatewaySimulator
from tests.integration.conftest import starting_portfolio
from tests.reliability.deployment import ROOT, Deployment
from tests.reliability.test_task_queue import _finished, _queue, _run, _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.processes]

REDIS_DB = 6
UNIT = ROOT / "deploy" / "celery-worker.service"


def unit_command() -> list[str]:
    """The unit's ExecStart, with this virtualenv's celery and systemd's %% undone."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    command = shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))
    assert command[0] == "/srv/portfolio/.venv/bin/celery"
    return [str(Path(sys.executable).with_name("celery")), *command[1:]]


@pytest.fixture
def redis_db():
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2)
        client.ping()
    except Exception as exc:  # not installed, or not answering
        reason = f"Redis does not answer at 127.0.0.1:6379 ({exc})"
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}; REQUIRE_REDIS=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def site(redis_db, tmp_path):
    with GatewaySimulator(starting_portfolio()) as simulator:
        deployment = Deployment(tmp_path, gateway_port=simulator.port)
        deployment.env.update(
            IBKR_SYNC_TASK_QUEUE="celery",
            CELERY_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        )
        deployment.create()
        deployment.simulator = simulator
        yield deployment
        deployment.destroy()


def test_the_units_worker_stops_warm_its_running_sync_ends_nothing_new_is_taken(
    site, redis_db, tmp_path
):
    gate = threading.Event()
    site.simulator.set_faults(hold_positions=gate)
    log = tmp_path / "worker.log"
    with log.open("w") as handle:
        worker = subprocess.Popen(
            unit_command(), cwd=ROOT, env=site.env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        assert _wait_for(lambda: " ready." in log.read_text(), timeout=60), log.read_text()
        assert "ibkr-sync@" in log.read_text(), "the unit's --hostname, with Celery's %h"
        held = _queue(site)
        assert _wait_for(lambda: _run(site, held)["status"] == "running"), _run(site, held)

        worker.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        assert _wait_for(lambda: "warm shutdown" in log.read_text().lower(), timeout=30)
        later = _queue(site)
        time.sleep(2)
        assert worker.poll() is None, "it waits for the running sync"
        gate.set()

        assert _finished(site, held)["status"] == "success"
        assert worker.wait(60) == 0, log.read_text()
        assert _run(site, later)["status"] == "queued", "left for the next worker"
        assert redis_db.llen("ibkr_sync.gateway") == 1, "still in the broker"
    finally:
        gate.set()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
