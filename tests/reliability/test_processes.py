"""Concurrency and crashes with real processes: a WSGI server, `manage.py sync_ibkr`, kill -9.

These tests start processes (a threaded WSGI server, the command) against a throw-away
database of their own (see `deployment.py`) and the gateway simulator over loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest

from ibkr_sync.testing import GatewaySimulator, generate_portfolio
from tests.integration.conftest import ACCOUNT, sim_position, starting_portfolio
from tests.reliability.deployment import ROOT, Deployment

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
                  "ibkr_sync_accountreport", "ibkr_sync_syncrun"):  # fmt: skip
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


# --- a frozen holder never blocks the next sync ------------------------------------------------

LOCK_TIMEOUT = 2.0  # seconds, short for the test (30 s by default)
# A sync process loads Django and reads the simulator (two loaded cores): the next sync
# takes this much more than the bounded wait on top of the lock timeout.
STARTUP = 15.0


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[-1].split()[0]


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[-1].split()[19]


def _frozen_sync(deployment, where: str):
    """A real `sync_ibkr` that reads the simulator, then stops itself (SIGSTOP) at `where`."""
    victim = deployment.start_sync(
        env={
            "IBKR_SYNC_GATEWAY_CLASS": f"tests.reliability.freezing.{where}",
            "IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
        }
    )
    assert _wait_for(lambda: victim.poll() is not None or _state(victim.pid) == "T", 60), (
        "never got to the point where it freezes"
    )
    assert victim.poll() is None, victim.communicate()
    return victim


def _next_sync(deployment):
    """The next sync, from another process, once the frozen one's heartbeat has lapsed."""
    time.sleep(LOCK_TIMEOUT + 0.5)
    started = time.monotonic()
    result = deployment.manage("sync_ibkr", env={"IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT)})
    return result, time.monotonic() - started


def _resume(victim):
    victim.send_signal(signal.SIGCONT)  # nothing if it is gone (and reaped)
    out, err = victim.communicate(timeout=60)
    return victim.returncode, out, err


def _kill(victim):
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)


@pytest.mark.parametrize("ending", ["resumes", "is killed"])
def test_a_sync_frozen_in_its_write_never_blocks_the_next_one(fresh, simulator, ending):
    """The next sync from another process ends the frozen holder's hold on the database and
    succeeds within IBKR_SYNC_LOCK_TIMEOUT plus its start-up. PostgreSQL: it ends the
    holder's session (its transaction rolls back, its row locks go); the holder, resumed,
    is fenced off (exit 5). SQLite: a stopped process's open write transaction holds the
    database's write lock until the process ends, so the next sync ends the process
    (SIGKILL; the kernel releases its locks, its transaction never commits)."""
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    simulator.upsert_position(sim_position(quantity="77"))  # a change for both to write
    _wait_for(lambda: simulator.active_client_ids == [])

    victim = _frozen_sync(fresh, "FrozenInWrite")
    held = fresh.runs()[-1]
    assert held[1] == "running"
    after, seconds = _next_sync(fresh)
    aapl = lambda: next(r for r in fresh.positions() if r[:2] == (ACCOUNT, "265598"))  # noqa: E731

    try:
        assert after.returncode == 0, after.stderr
        assert seconds < LOCK_TIMEOUT + STARTUP, seconds
        assert Decimal(str(aapl()[2])) == 77
        (message,) = fresh.query("SELECT error_message FROM ibkr_sync_syncrun WHERE id = ?",
                                 (held[0],))[0]  # fmt: skip
        assert "no heartbeat" in message, message
        if fresh.pg is not None:
            assert "database session" in message and "was ended" in message, message
        else:
            assert (
                f"its process {victim.pid} was stopped and was ended so that its database "
                "lock was released" in message
            ), message
            assert _wait_for(lambda: victim.poll() is not None, 5), "it is gone"
        synced = fresh.positions()
    finally:
        if ending == "resumes":
            code, _out, err = _resume(victim)
        else:
            _kill(victim)

    if ending == "resumes" and fresh.pg is not None:
        # Its transaction was rolled back with its session; it says its lock went.
        assert code == 5, err
        assert "lock was released while it ran" in err
    elif ending == "resumes":
        assert code == -signal.SIGKILL, "ended by the next sync, before it could resume"
    assert fresh.positions() == synced, "it wrote nothing after all"
    # Its end is recorded once: abandoned stays abandoned.
    runs = fresh.runs()
    assert runs[[r[0] for r in runs].index(held[0])][1:3] == ("failed", "abandoned")

    final = fresh.manage("sync_ibkr")  # no manual clean-up, whatever happened
    assert final.returncode == 0, final.stderr
    assert "0 created, 0 updated" in final.stdout, final.stdout
    assert Decimal(str(aapl()[2])) == 77
    rows = fresh.positions()
    assert len(rows) == len({row[:2] for row in rows}), "nothing written twice"
    assert not [run for run in fresh.runs() if run[1] == "running"]


def test_a_sync_frozen_after_its_read_is_fenced_off_once_another_took_its_lock(fresh, simulator):
    """On both databases: frozen before its write, its lock is taken by the next sync from
    another process; resumed, it writes nothing (exit 5) and its run stays `abandoned`."""
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    simulator.upsert_position(sim_position(quantity="55"))
    _wait_for(lambda: simulator.active_client_ids == [])

    victim = _frozen_sync(fresh, "FrozenAfterRead")
    held = fresh.runs()[-1]
    simulator.upsert_position(sim_position(quantity="66"))  # what the next one reads
    _wait_for(lambda: simulator.active_client_ids == [])
    try:
        after, seconds = _next_sync(fresh)
        assert after.returncode == 0, after.stderr
        assert seconds < LOCK_TIMEOUT + STARTUP, seconds
        synced = fresh.positions()
    finally:
        code, _out, err = _resume(victim)

    assert code == 5, err
    assert "lock was released while it ran" in err
    assert fresh.positions() == synced, "the stale read of 55 never landed"
    aapl = next(r for r in synced if r[:2] == (ACCOUNT, "265598"))
    assert Decimal(str(aapl[2])) == 66
    run = next(r for r in fresh.runs() if r[0] == held[0])
    assert run[1:3] == ("failed", "abandoned"), "the first reason stays"


# --- SQLite: a holder that is not stopped, or not the process, is never signalled ---------------

# A process that takes SQLite's write lock (an open write transaction) when it reads a line,
# then stops itself.
STOPPED_IN_A_WRITE = (
    "import os, signal, sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
    "sys.stdin.readline(); "
    "db.execute('BEGIN IMMEDIATE'); db.execute('UPDATE portfolio_position SET quantity = 0'); "
    "os.kill(os.getpid(), signal.SIGSTOP)"
)


def _sqlite_only(deployment):
    if deployment.pg is not None:
        pytest.skip(
            "SQLite's write lock. On PostgreSQL a sync's heartbeat goes on during its write, "
            "and the next sync ends a frozen holder's session, whatever its process: "
            "test_database_faults.py::test_postgresql_the_next_sync_ends_the_session_*"
        )


def test_sqlite_a_holder_hung_in_its_write_but_running_is_never_signalled(
    fresh, simulator, tmp_path
):
    """Stuck in its write, not stopped: its heartbeat cannot be written (its own write lock
    keeps it out), so its lock looks abandoned, but the process may still be working. It
    is never signalled; the next sync fails after the busy timeout, naming it and what to
    do; the holder, once it goes on, finishes its own sync (nobody took its lock)."""
    _sqlite_only(fresh)
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    simulator.upsert_position(sim_position(quantity="77"))
    _wait_for(lambda: simulator.active_client_ids == [])
    release = tmp_path / "release"
    holder = fresh.start_sync(
        env={
            "IBKR_SYNC_GATEWAY_CLASS": "tests.reliability.freezing.HungInWrite",
            "IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
            "HUNG_UNTIL": str(release),
        }
    )
    try:
        assert _wait_for(lambda: (tmp_path / "release.hung").exists(), 60), "never hung"
        held = fresh.runs()[-1]
        after, seconds = _next_sync(fresh)
        assert after.returncode == 9, after.stderr
        assert seconds < LOCK_TIMEOUT + STARTUP, seconds
        assert "locked" in after.stderr, after.stderr
        assert f"IBKR sync #{held[0]} is abandoned" in after.stderr, after.stderr
        assert f"pid {holder.pid} on host" in after.stderr, after.stderr
        assert "so it was not ended" in after.stderr and f"kill {holder.pid}" in after.stderr
        assert holder.poll() is None and _state(holder.pid) in "RS", "never signalled"
        assert fresh.runs()[-1][:2] == (held[0], "running"), "its lock is untouched"
    finally:
        release.touch()
    _out, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    aapl = next(r for r in fresh.positions() if r[:2] == (ACCOUNT, "265598"))
    assert Decimal(str(aapl[2])) == 77
    final = fresh.manage("sync_ibkr")
    assert final.returncode == 0, final.stderr
    assert "0 created, 0 updated" in final.stdout, final.stdout
    assert not [run for run in fresh.runs() if run[1] == "running"]


@pytest.mark.parametrize("holder", ["its pid reused by another process", "ended holders off"])
def test_sqlite_a_stopped_process_that_is_not_the_holder_is_never_signalled(
    fresh, simulator, holder
):
    """A stopped process holds SQLite's write lock, and an abandoned lock row names its
    pid, but another start time (the pid was reused), or ending frozen holders is turned
    off (IBKR_SYNC_END_FROZEN_HOLDERS=false): it is never signalled; the next sync fails
    after the busy timeout, saying why, and succeeds once that process is gone."""
    _sqlite_only(fresh)
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    before = fresh.positions()
    # A lock row left by a sync process that died, as the holder's rules see it.
    dead = _frozen_sync(fresh, "FrozenAfterRead")
    _kill(dead)
    (run_id, owner), = fresh.query("SELECT id, owner FROM ibkr_sync_syncrun "
                                   "WHERE status = 'running'")  # fmt: skip
    machine = owner.split("|")[0]
    stopped = subprocess.Popen(
        [sys.executable, "-c", STOPPED_IN_A_WRITE, str(fresh.db_path)], stdin=subprocess.PIPE
    )
    try:
        started = _start_time(stopped.pid)
        if holder == "its pid reused by another process":
            token, env = f"{machine}|{stopped.pid}|{int(started) - 100}|n", {}
        else:
            token = f"{machine}|{stopped.pid}|{started}|n"
            env = {"IBKR_SYNC_END_FROZEN_HOLDERS": "false"}
        fresh.query(
            "UPDATE ibkr_sync_syncrun SET owner = ?, "
            "heartbeat_at = STRFTIME('%Y-%m-%d %H:%M:%f', 'now', '-60 seconds') WHERE id = ?",
            (token, run_id),
        )
        stopped.stdin.write(b"go\n")
        stopped.stdin.flush()
        assert _wait_for(lambda: _state(stopped.pid) == "T", 30)
        result = fresh.manage("sync_ibkr", env={"IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT), **env})
        assert result.returncode == 9, result.stderr
        assert f"IBKR sync #{run_id} is abandoned" in result.stderr, result.stderr
        assert f"pid {stopped.pid} on host" in result.stderr, result.stderr
        if holder == "its pid reused by another process":
            assert "has ended; another connection holds" in result.stderr, result.stderr
        else:
            assert "IBKR_SYNC_END_FROZEN_HOLDERS is off" in result.stderr, result.stderr
        assert _state(stopped.pid) == "T", "never signalled"
    finally:
        stopped.kill()
        stopped.wait(10)
    assert fresh.positions() == before, "the stopped transaction never committed"
    after = fresh.manage("sync_ibkr")
    assert after.returncode == 0, after.stderr
    assert fresh.query("SELECT status, error_code FROM ibkr_sync_syncrun WHERE id = ?",
                       (run_id,)) == [("failed", "abandoned")]  # fmt: skip


# --- time is the database's, across real processes ----------------------------------------------

SKEW = 60  # seconds the second process's clock runs ahead


def test_a_process_whose_clock_runs_60_s_ahead_never_takes_a_renewed_lock(fresh, simulator):
    """A healthy sync renews its lock (held mid-read by a slow gateway); a second
    `sync_ibkr` whose clock runs 60 s ahead (libfaketime: every clock of that process,
    the C library's and so SQLite's too) is refused (exit 5), leaves the lock alone, and
    the healthy sync finishes (exit 0)."""
    faketime = shutil.which("faketime")
    if faketime is None:
        if os.environ.get("CI") == "true":  # CI installs it: a skip there would hide a gap
            pytest.fail("libfaketime's `faketime` is missing (.ci/run installs it)")
        pytest.skip("needs libfaketime's `faketime` (apt-get install faketime)")
    ahead = subprocess.run(
        [faketime, "-f", f"+{SKEW}s", sys.executable, "-c", "import time; print(time.time())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert float(ahead.stdout) - time.time() > SKEW - 5, "faketime moves the process's clock"
    first = fresh.manage("sync_ibkr")
    assert first.returncode == 0, first.stderr
    _wait_for(lambda: simulator.active_client_ids == [])

    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    healthy = fresh.start_sync(env={"IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT)})
    try:
        assert _wait_for(lambda: simulator.active_client_ids != [], 60), "never read"
        (held,) = fresh.query("SELECT id FROM ibkr_sync_syncrun WHERE status = 'running'")
        time.sleep(LOCK_TIMEOUT)  # renewed a few times meanwhile
        skewed = subprocess.run(
            [faketime, "-f", f"+{SKEW}s", sys.executable, "manage.py", "sync_ibkr"],
            cwd=ROOT,
            env={**fresh.env, "IBKR_SYNC_LOCK_TIMEOUT": str(LOCK_TIMEOUT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert skewed.returncode == 5, skewed.stderr
        assert "Another IBKR sync is running" in skewed.stderr, skewed.stderr
        assert fresh.query("SELECT status FROM ibkr_sync_syncrun WHERE id = ?", held) == [
            ("running",)
        ], "the healthy sync's lock was left alone"
        assert healthy.poll() is None
    finally:
        gate.set()
    _out, err = healthy.communicate(timeout=60)
    assert healthy.returncode == 0, err
    runs = {run[0]: run[1:3] for run in fresh.runs()}
    assert runs[held[0]] == ("success", "")
    assert not [run for run in runs.values() if run[0] == "running"]
