"""Concurrency and crashes with real processes: a WSGI server, `manage.py sync_ibkr`, kill -9.

These tests start processes (a threaded WSGI server, the command) against a throw-away
database of their own (see `deployment.py`) and the gateway simulator over loopback.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from decimal import Decimal

import pytest

from ibkr_sync.testing import GatewaySimulator, generate_portfolio
from tests.integration.conftest import ACCOUNT, sim_position, starting_portfolio
from tests.reliability.deployment import Deployment

pytestmark = [pytest.mark.integration, pytest.mark.processes]

CALLERS = 20
REPEATS = 20
PROMPT = 5.0  # seconds within which a refused caller has its 409 (generous: 2 loaded cores)


@pytest.fixture(scope="module")
def simulator():
    sim = GatewaySimulator(starting_portfolio())
    with sim:
        yield sim


@pytest.fixture(scope="module")
def deployment(simulator, tmp_path_factory):
    site = Deployment(tmp_path_factory.mktemp("deployment"), gateway_port=simulator.port)
    site.create()
    site.start_server()
    yield site
    site.destroy()


@pytest.fixture
def fresh(deployment, simulator):
    """Empty tables and a fault-free gateway with the starting portfolio, for each test."""
    for table in ("ibkr_sync_positionchange", "portfolio_position", "portfolio_instrument",
                  "portfolio_cashbalance", "portfolio_accountsnapshot", "portfolio_account",
                  "ibkr_sync_syncrun"):  # fmt: skip
        deployment.query(f"DELETE FROM {table}")
    simulator.clear_faults()
    simulator.set_portfolio(starting_portfolio())
    _wait_for(lambda: simulator.active_client_ids == [])
    return deployment


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_twenty_simultaneous_triggers_and_a_command_run_exactly_one_sync(fresh, simulator):
    refused_in = []
    for repeat in range(REPEATS):
        quantity = Decimal(repeat + 1)
        simulator.upsert_position(sim_position(quantity=str(quantity)))
        _wait_for(lambda: simulator.active_client_ids == [])
        # The sync that gets the lock is held mid-read until every other caller has been
        # answered, so they all overlap with it however the machine schedules them.
        gate = threading.Event()
        simulator.set_faults(hold_positions=gate)
        command = fresh.warm_sync()
        start = threading.Barrier(CALLERS + 2)
        replies = [None] * CALLERS
        finished = {}
        refusals = threading.Semaphore(0)

        def call(i, start=start, replies=replies, refusals=refusals):
            start.wait()
            try:
                replies[i] = fresh.post(timeout=60)
            finally:
                refusals.release()

        def run_command(start=start, command=command, finished=finished, refusals=refusals):
            start.wait()
            fresh.go(command)
            try:
                finished["out"], finished["err"] = command.communicate(timeout=90)
            finally:
                refusals.release()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
        threads.append(threading.Thread(target=run_command))
        for thread in threads:
            thread.start()
        start.wait()
        # Every caller but the one holding the lock has its answer; then the winner goes on.
        deadline = time.monotonic() + 60
        answered = sum(refusals.acquire(timeout=max(deadline - time.monotonic(), 0.01))
                       for _ in range(CALLERS))  # fmt: skip
        gate.set()
        for thread in threads:
            thread.join(90)
        out, err = finished["out"], finished["err"]

        assert answered == CALLERS, "a caller neither ran nor was refused within 60 s"
        statuses = sorted(r.status for r in replies)
        ran = statuses.count(200) + (command.returncode == 0)
        assert ran == 1, (repeat, statuses, command.returncode, err)
        assert set(statuses) <= {200, 409}, statuses
        assert command.returncode in (0, 5), err
        if command.returncode == 5:
            assert "Another IBKR sync is running" in err and out == ""
        for reply in replies:
            if reply.status == 409:
                assert json.loads(reply.body)["code"] == "sync_already_running"
                refused_in.append(reply.seconds)
        assert max(refused_in) < PROMPT, max(refused_in)

        # The database is in the state of one clean sync of this repeat's portfolio.
        rows = fresh.positions()
        assert len(rows) == 4 and len({row[:2] for row in rows}) == 4
        assert all(row[-1] is None for row in rows), "nothing closed"
        aapl = next(row for row in rows if row[:2] == (ACCOUNT, "265598"))
        assert Decimal(str(aapl[2])) == quantity
        assert fresh.query("SELECT COUNT(*) FROM portfolio_instrument") == [(4,)]
        running = fresh.query("SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE status = 'running'")
        assert running == [(0,)], "no orphan running SyncRun"
    # Totals over all repeats: one success each time, everyone else refused.
    totals = dict(fresh.query("SELECT status, COUNT(*) FROM ibkr_sync_syncrun GROUP BY status"))
    assert totals == {"success": REPEATS, "failed": REPEATS * CALLERS}
    failed_codes = fresh.query("SELECT DISTINCT error_code FROM ibkr_sync_syncrun WHERE status = ?",
                               ("failed",))  # fmt: skip
    assert failed_codes == [("sync_already_running",)]


@pytest.mark.parametrize("phase", ["reading", "writing"])
def test_kill_9_mid_sync_changes_nothing_and_the_next_sync_needs_no_clean_up(
    fresh, simulator, phase
):
    simulator.set_portfolio(generate_portfolio(1500, accounts=3, seed=7))
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    before = fresh.positions()
    # The next run would change every quantity and close a tenth of the positions.
    changed = [
        pos.with_quantity(pos.quantity + 1)
        for i, pos in enumerate(generate_portfolio(1500, accounts=3, seed=7).positions)
        if i % 10
    ]
    simulator.set_positions(changed)
    if phase == "reading":
        simulator.set_faults(message_delay=0.002)  # a slow gateway: ~3 s to read
    _wait_for(lambda: simulator.active_client_ids == [])
    accepted = simulator.connections_accepted

    victim = fresh.start_sync()
    assert _wait_for(lambda: simulator.connections_accepted > accepted, 30)
    if phase == "reading":
        assert _wait_for(lambda: simulator.active_client_ids != [], 30)
        time.sleep(0.5)  # well inside the read
    else:
        # The read is over when the session closes; the process is then writing.
        assert _wait_for(lambda: simulator.active_client_ids != [], 30)
        assert _wait_for(lambda: simulator.active_client_ids == [], 30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    runs = fresh.runs()
    assert runs[-1][1] == "running", "killed before it finished: its lock row is left"
    assert fresh.positions() == before, "positions are exactly as before the run"

    simulator.clear_faults()
    after = fresh.manage("sync_ibkr")
    assert after.returncode == 0, after.stderr
    still_held = sum(1 for pos in changed if pos.quantity != 0)
    assert f"{still_held} positions in 3 account(s)" in after.stdout
    assert f"{1500 - still_held} closed" in after.stdout
    runs = fresh.runs()
    assert runs[-2][1:3] == ("failed", "abandoned")
    assert runs[-1][1] == "success"
    assert not [run for run in runs if run[1] == "running"]
