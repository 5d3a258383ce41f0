"""Syncs on the task queue (IBKR_SYNC_TASK_QUEUE=celery) with real processes: Redis as the
broker, `celery -A portfolio_site worker` processes, the site in its own process, on a
throw-away database they all share (`deployment.py`), against the gateway simulator.

Redis is the one on 127.0.0.1:6379 (database REDIS_DB, emptied before each test); the
tests skip without it, except with REQUIRE_REDIS=1 (as in CI), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ibkr_sync.testing import GatewaySimulator
from tests.integration.conftest import starting_portfolio
from tests.reliability.deployment import ROOT, Deployment

pytestmark = [pytest.mark.integration, pytest.mark.processes]

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 7
BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
LOCK_TIMEOUT = 5.0
STARTING_POSITIONS = len(starting_portfolio().positions)


def _redis():
    """A client of this suite's Redis database, or a skip (a failure with REQUIRE_REDIS=1)."""
    try:
        import redis
    except ImportError:
        reason = "the redis client is not installed (pip install 'celery[redis]')"
    else:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            reason = f"Redis does not answer at {REDIS_HOST}:{REDIS_PORT} ({exc})"
        else:
            return client
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason}; REQUIRE_REDIS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def redis_db():
    client = _redis()
    client.flushdb()  # this suite's database only
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def simulator():
    with GatewaySimulator(starting_portfolio()) as sim:
        yield sim


@pytest.fixture(scope="module")
def deployment(redis_db, simulator, tmp_path_factory):
    site = Deployment(tmp_path_factory.mktemp("queue"), gateway_port=simulator.port)
    site.env.update(
        IBKR_SYNC_TASK_QUEUE="celery",
        CELERY_BROKER_URL=BROKER_URL,
        IBKR_SYNC_LOCK_TIMEOUT=str(LOCK_TIMEOUT),
    )
    site.create()
    # The caller also reads the runs it started.
    site.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import Permission, User; "
        "User.objects.get(username='syncer').user_permissions.add("
        "Permission.objects.get(codename='view_syncrun'))",
        check=True,
    )
    site.start_server()
    yield site
    site.destroy()


class Worker:
    """`celery -A portfolio_site worker` in a process group of its own (its pool's children
    with it), its log in a file."""

    def __init__(self, site: Deployment, log: Path, name: str) -> None:
        self.log = log
        self.handle = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "portfolio_site", "worker",
             "--loglevel", "INFO", "--concurrency", "2", "--hostname", f"{name}@%h",
             "--without-gossip", "--without-mingle"],
            cwd=ROOT,
            env=site.env,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while " ready." not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the worker did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the worker and its pool: nothing of it runs any more."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.handle.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.handle.close()


@pytest.fixture
def fresh(deployment, simulator, redis_db):
    for table in ("ibkr_sync_positionchange", "portfolio_position", "portfolio_instrument",
                  "portfolio_cashbalance", "portfolio_accountsnapshot", "portfolio_account",
                  "ibkr_sync_accountreport", "ibkr_sync_syncrun"):  # fmt: skip
        deployment.query(f"DELETE FROM {table}")
    redis_db.flushdb()
    simulator.clear_faults()
    simulator.set_portfolio(starting_portfolio())
    _wait_for(lambda: simulator.active_client_ids == [])
    return deployment


@pytest.fixture
def workers(deployment, tmp_path):
    started: list[Worker] = []

    def start(name: str = "w1") -> Worker:
        worker = Worker(deployment, tmp_path / f"{name}-{len(started)}.log", name)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _run(site: Deployment, run_id: int) -> dict:
    rows = site.query(
        "SELECT status, error_code, processed, created, unchanged, owner, queued_at "
        "FROM ibkr_sync_syncrun WHERE id = ?",
        (run_id,),
    )
    status, code, processed, created, unchanged, owner, queued_at = rows[0]
    return {"status": status, "error_code": code, "processed": processed, "created": created,
            "unchanged": unchanged, "owner": owner, "queued_at": queued_at}  # fmt: skip


def _finished(site: Deployment, run_id: int, timeout: float = 60.0) -> dict:
    run = _wait_for(
        lambda: (r := _run(site, run_id))["status"] in ("success", "failed") and r, timeout
    )
    return run or _run(site, run_id)


def _queue(site: Deployment, *, times: int = 1) -> int:
    """Queue one sync from a process of its own, as the API does (the queued row, its task
    sent once its transaction commits); its task then sent `times - 1` more times."""
    result = site.manage(
        "shell",
        "-c",
        "from ibkr_sync import services, tasks; "
        "run = services.queue_sync(trigger='command'); "
        f"[tasks.enqueue(run.pk, 'tws') for _ in range({times - 1})]; "
        "print(run.pk)",
        check=True,
    )
    return int(result.stdout.strip().splitlines()[-1])


def test_a_queued_sync_is_queued_then_run_by_a_worker_to_success(fresh, workers, simulator):
    accepted = simulator.connections_accepted
    run_id = _queue(fresh)
    queued = _run(fresh, run_id)
    assert queued["status"] == "queued" and queued["queued_at"] is not None
    assert queued["owner"] == "", "a queued run holds no lock"
    # Nothing syncs it until a worker takes it from the queue.
    time.sleep(1)
    assert _run(fresh, run_id)["status"] == "queued"
    assert simulator.connections_accepted == accepted

    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    workers()
    running = _wait_for(lambda: (r := _run(fresh, run_id))["status"] == "running" and r)
    assert running, _run(fresh, run_id)
    assert running["owner"], "the worker holds the connection's lock"
    gate.set()

    run = _finished(fresh, run_id)
    assert run["status"] == "success", run
    assert (run["processed"], run["created"]) == (STARTING_POSITIONS, STARTING_POSITIONS)
    assert len(fresh.positions()) == STARTING_POSITIONS


def test_a_task_delivered_twice_runs_one_sync(fresh, workers, simulator):
    workers("a")
    workers("b")  # two workers, two processes each: the deliveries run side by side
    accepted = simulator.connections_accepted
    run_id = _queue(fresh, times=3)

    run = _finished(fresh, run_id)
    assert run["status"] == "success", run
    time.sleep(2)  # the other deliveries have run too (each found the run taken)
    assert fresh.runs() == [(run_id, "success", "", "command")], "one run, no refused ones"
    assert simulator.connections_accepted - accepted == 1, "the gateway was read once"


def test_a_worker_killed_mid_sync_blocks_the_connection_no_longer_than_the_lock_timeout(
    fresh, workers, simulator
):
    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    first = workers("doomed")
    killed_run = _queue(fresh)
    assert _wait_for(lambda: _run(fresh, killed_run)["status"] == "running")
    first.kill()
    killed_at = time.monotonic()
    gate.set()
    simulator.clear_faults()

    workers("next")
    next_run = _queue(fresh)
    run = _finished(fresh, next_run)
    assert run["status"] == "success", run
    assert time.monotonic() - killed_at < LOCK_TIMEOUT + 15  # a worker's start, the sync
    killed = _run(fresh, killed_run)
    assert (killed["status"], killed["error_code"]) == ("failed", "abandoned")
    running = fresh.query("SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE status = 'running'")
    assert running == [(0,)]


def test_a_sync_queued_while_another_holds_the_lock_is_refused_not_run_twice(
    fresh, workers, simulator
):
    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    workers()
    holding = _queue(fresh)
    assert _wait_for(lambda: _run(fresh, holding)["status"] == "running")
    refused = _queue(fresh)

    run = _finished(fresh, refused)
    assert (run["status"], run["error_code"]) == ("failed", "sync_already_running")
    gate.set()
    assert _finished(fresh, holding)["status"] == "success"


def test_a_task_taken_from_the_other_kinds_queue_is_sent_on_and_runs_there(
    fresh, workers, simulator
):
    """As after its connection changed kind while it waited: a TWS sync's task on the Flex
    queue. The worker sees where it took it from (the message's routing key)."""
    result = fresh.manage(
        "shell",
        "-c",
        "from unittest import mock; from ibkr_sync import services, tasks; "
        # Its one task on the Flex queue, none on its own.
        "held = mock.patch.object(services, '_dispatch'); held.start(); "
        "run = services.queue_sync(trigger='command'); held.stop(); "
        "tasks.sync_connection.apply_async(args=[run.pk], queue=tasks.FLEX_QUEUE); "
        "print(run.pk)",
        check=True,
    )
    run_id = int(result.stdout.strip().splitlines()[-1])
    worker = workers()

    run = _finished(fresh, run_id)
    assert run["status"] == "success", run
    assert f"IBKR sync #{run_id} taken from ibkr_sync.flex" in worker.output()
    assert fresh.runs() == [(run_id, "success", "", "command")]


# --- the API ----------------------------------------------------------------------------


def _get(site: Deployment, url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {site.token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_api_answers_202_and_the_run_goes_queued_running_success(fresh, workers, simulator):
    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    reply = fresh.post()
    assert reply.status == 202, reply.body
    body = json.loads(reply.body)
    assert body["status"] == "queued" and body["connection"] is None
    location = body["url"]
    assert location == f"{fresh.base_url}/portfolio/sync/runs/{body['sync_run_id']}"
    code, queued = _get(fresh, location)
    assert (code, queued["status"]) == (200, "queued")  # no worker yet

    workers()
    assert _wait_for(lambda: _get(fresh, location)[1]["status"] == "running")
    gate.set()
    run = _wait_for(lambda: (r := _get(fresh, location)[1])["status"] != "running" and r)
    assert run["status"] == "success", run
    assert (run["processed"], run["created"], run["errors"]) == (STARTING_POSITIONS,) * 2 + (0,)
    assert run["trigger"] == "api" and run["user"] == "syncer"
    assert run["error_code"] == ""


def test_a_queued_sync_fails_with_the_code_the_synchronous_answer_has(fresh, workers):
    workers()
    reply = fresh.post("/portfolio/sync/ibkr?ibkr_account_id=U9999999")
    assert reply.status == 202, reply.body
    run_id = json.loads(reply.body)["sync_run_id"]

    run = _finished(fresh, run_id)
    assert (run["status"], run["error_code"]) == ("failed", "unknown_account")
    # The same sync in the request, as without the queue: the same code.
    synchronous = fresh.manage("sync_ibkr", "--account", "U9999999")
    assert synchronous.returncode == 6, synchronous.stderr


def _queue_runs(site: Deployment, count: int) -> list[int]:
    """Queue `count` syncs of the same connection back to back, from one process."""
    result = site.manage(
        "shell",
        "-c",
        "from ibkr_sync import services; "
        f"print(*[services.queue_sync(trigger='command').pk for _ in range({count})])",
        check=True,
    )
    return [int(pk) for pk in result.stdout.strip().splitlines()[-1].split()]


def test_two_workers_given_two_syncs_of_one_connection_at_once_run_one_refuse_the_other(
    fresh, workers, simulator
):
    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    workers("a")
    workers("b")
    accepted = simulator.connections_accepted

    runs = _queue_runs(fresh, 2)
    refused = _wait_for(
        lambda: [r for r in runs if _run(fresh, r)["status"] == "failed"], timeout=60
    )
    assert len(refused) == 1, [_run(fresh, r) for r in runs]
    (holding,) = set(runs) - set(refused)
    assert _run(fresh, holding)["status"] == "running"
    assert _run(fresh, refused[0])["error_code"] == "sync_already_running"
    gate.set()

    assert _finished(fresh, holding)["status"] == "success"
    assert simulator.connections_accepted - accepted == 1, "the refused one never connected"
    assert len(fresh.positions()) == STARTING_POSITIONS
    running = fresh.query("SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE status = 'running'")
    assert running == [(0,)]


@pytest.fixture
def synchronous(fresh):
    """The same site without IBKR_SYNC_TASK_QUEUE (the default), Celery still installed
    and its broker running."""
    fresh.stop_server()
    queue = fresh.env.pop("IBKR_SYNC_TASK_QUEUE")
    fresh.start_server()
    yield fresh
    fresh.stop_server()
    fresh.env["IBKR_SYNC_TASK_QUEUE"] = queue
    fresh.start_server()


def test_without_the_setting_a_sync_runs_in_the_request_and_nothing_is_queued(
    synchronous, workers, redis_db
):
    worker = workers()

    reply = synchronous.post()

    assert reply.status == 200, reply.body
    body = json.loads(reply.body)
    assert (body["status"], body["created"]) == ("success", STARTING_POSITIONS)
    run = _run(synchronous, body["sync_run_id"])
    assert (run["status"], run["queued_at"]) == ("success", None)
    assert redis_db.llen("ibkr_sync.gateway") == 0 and redis_db.llen("ibkr_sync.flex") == 0
    time.sleep(1)
    assert "ibkr_sync.sync_connection[" not in worker.output(), "no task reached the worker"
    assert synchronous.runs() == [(body["sync_run_id"], "success", "", "api")]
