"""One connection synced twice at the same moment, in processes of their own, on a real
deployment's database (SQLite file or PostgreSQL): the second is refused (exit 5, 409)
while the first holds the connection's lock, and the connection cannot be removed
meanwhile. The connection is added with `manage.py ibkr_connection add`."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ibkr_sync.testing import GatewaySimulator
from tests.integration.conftest import starting_portfolio
from tests.reliability.deployment import Deployment

pytestmark = [pytest.mark.integration, pytest.mark.processes]


@pytest.fixture(scope="module")
def simulator():
    with GatewaySimulator(starting_portfolio()) as sim:
        yield sim


@pytest.fixture(scope="module")
def deployment(simulator, tmp_path_factory):
    # The settings' gateway is nowhere: every sync here reads the connection.
    site = Deployment(tmp_path_factory.mktemp("connections"), gateway_port=1)
    site.create()
    added = site.manage(
        "ibkr_connection", "add", "home", "--port", str(simulator.port), "--client-id", "41"
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"Added connection home: 127.0.0.1:{simulator.port}")
    site.start_server()
    yield site
    site.destroy()


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_same_connection_twice_at_once_is_refused_and_it_cannot_be_removed_meanwhile(
    deployment, simulator
):
    held = threading.Event()
    simulator.set_faults(hold_positions=held)
    first = deployment.start_sync("--connection", "home")
    try:
        assert _wait_for(
            lambda: (
                deployment.query("SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE status = 'running'")
                == [(1,)]
            )
        ), "the first sync never took its lock"

        second = deployment.manage("sync_ibkr", "--connection", "home")
        assert (second.returncode, second.stdout) == (5, "")
        assert second.stderr.splitlines() == [
            "CommandError: Another IBKR sync of connection 'home' is running; this one was "
            "not started. Try again when it finishes."
        ]

        reply = deployment.post("/portfolio/sync/ibkr?connection=home")
        assert reply.status == 409
        assert json.loads(reply.body)["code"] == "sync_already_running"

        removal = deployment.manage("ibkr_connection", "remove", "home")
        assert (removal.returncode, removal.stdout) == (5, "")
        assert removal.stderr.startswith("CommandError: Connection home is syncing (sync #")
        assert "it was not removed" in removal.stderr
    finally:
        held.set()
        out, err = first.communicate(timeout=60)
    simulator.clear_faults()

    assert first.returncode == 0, err
    assert out.startswith("IBKR sync #") and " of connection home: 4 positions" in out
    runs = deployment.query(
        "SELECT status, error_code, connection_name FROM ibkr_sync_syncrun ORDER BY id"
    )
    assert sorted(runs) == sorted(
        [
            ("success", "", "home"),
            ("failed", "sync_already_running", "home"),
            ("failed", "sync_already_running", "home"),
        ]
    )
    listed = deployment.manage("ibkr_connection", "list")
    assert "  last sync #" in listed.stdout and " success at " in listed.stdout

    # Free again: now it can be removed, its history kept.
    removal = deployment.manage("ibkr_connection", "remove", "home")
    assert (removal.returncode, removal.stdout) == (
        0,
        "Removed connection home (its 3 sync run(s) kept).\n",
    )
    assert deployment.query(
        "SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE connection_id IS NULL"
    ) == [(3,)]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["sync_ibkr", "--all", "--connection", "home"],
            "manage.py sync_ibkr: error: argument --connection: not allowed with argument "
            "--all (see --help)",
        ),
        (
            ["ibkr_connection", "add", "x", "--port", "abc", "--client-id", "1"],
            "manage.py ibkr_connection add: error: argument --port: --port takes a whole "
            "number, not 'abc' (see --help)",
        ),
        (
            ["ibkr_connection", "rename", "x"],
            "manage.py ibkr_connection: error: argument "
            "{add,list,remove,test,set-token,rotate-keys}: invalid choice: 'rename' (choose "
            "from 'add', 'list', 'remove', 'test', 'set-token', 'rotate-keys') (see --help)",
        ),
    ],
)
def test_bad_options_are_exit_2_with_one_line(deployment, args, line):
    result = deployment.manage(*args)

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [line]
