"""Syncs of several connections at the same moment, each in a process of its own, on a
deployment's database (a SQLite file, or PostgreSQL): what they share (instruments) is
written safely by all of them at once.

Each process loads Django, says "ready", and syncs its connection through the service
when it reads a line, so that all of them start together; each connection's gateway
holds its positions until every sync has its lock, so that every write overlaps.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time

import pytest

from ibkr_sync.testing import GatewaySimulator, Portfolio
from tests.integration.conftest import sim_position
from tests.reliability.deployment import ROOT, Deployment

pytestmark = [pytest.mark.integration, pytest.mark.processes]

CONNECTIONS = 20
SHARED = [(300000 + i, f"S{i:02d}") for i in range(30)]  # the contracts every one holds

# One sync of the connection named by argv[1], through the service, once a line is read.
SYNC = (
    "import json, os, sys; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
    "'portfolio_site.settings'); import django; django.setup(); "
    "from ibkr_sync import services; import ibkr_sync.gateway; "
    "print('ready', flush=True); sys.stdin.readline(); "
    "r = services.sync_positions(trigger='command', connection=sys.argv[1]); "
    "print(json.dumps({'created': r.created, 'accounts': r.accounts}), flush=True)"
)


def account_of(i: int) -> str:
    return f"U30000{i:02d}"


@pytest.fixture
def gateways():
    held = threading.Event()
    with contextlib.ExitStack() as stack:
        simulators = []
        for i in range(CONNECTIONS):
            account = account_of(i)
            own = sim_position(account=account, con_id=400000 + i, symbol=f"OWN{i}")
            shared = [sim_position(account=account, con_id=c, symbol=s) for c, s in SHARED]
            simulator = stack.enter_context(
                GatewaySimulator(Portfolio(accounts=[account], positions=[own, *shared]))
            )
            simulator.set_faults(hold_positions=held)
            simulators.append(simulator)
        try:
            yield simulators, held
        finally:
            held.set()


@pytest.fixture
def site(gateways, tmp_path):
    simulators, _ = gateways
    deployment = Deployment(tmp_path, gateway_port=simulators[0].port).create()
    rows = ", ".join(f"('c{i:02d}', {sim.port})" for i, sim in enumerate(simulators))
    deployment.manage(
        "shell",
        "-c",
        "from ibkr_sync.models import Connection; "
        f"[Connection.objects.create(name=n, port=p, client_id=7) for n, p in [{rows}]]",
        check=True,
    )
    yield deployment
    deployment.destroy()


def warm(deployment: Deployment, name: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", SYNC, name],
        cwd=ROOT,
        env=deployment.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"the sync process did not start: {line}{process.stderr.read()}")
    return process


def test_twenty_first_syncs_at_the_same_moment_share_their_instruments(site, gateways):
    _, held = gateways
    names = [f"c{i:02d}" for i in range(CONNECTIONS)]
    processes = [warm(site, name) for name in names]
    try:
        for process in processes:
            Deployment.go(process)
        deadline = time.monotonic() + 60
        running = 0
        while time.monotonic() < deadline:
            query = "SELECT COUNT(*) FROM ibkr_sync_syncrun WHERE status = 'running'"
            running = site.query(query)[0][0]
            if running == CONNECTIONS:
                break
            time.sleep(0.05)
        # Every sync holds its own connection's lock at once, all waiting for positions.
        assert running == CONNECTIONS
        held.set()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        held.set()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()

    for i, (process, (out, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, err
        assert json.loads(out) == {"created": len(SHARED) + 1, "accounts": [account_of(i)]}
    instruments = site.query("SELECT external_id, COUNT(*) FROM portfolio_instrument GROUP BY 1")
    assert len(instruments) == len(SHARED) + CONNECTIONS
    assert {count for _, count in instruments} == {1}, "every instrument exists once"
    assert len(site.positions()) == CONNECTIONS * (len(SHARED) + 1)
    statuses = site.query("SELECT status, COUNT(*) FROM ibkr_sync_syncrun GROUP BY status")
    assert statuses == [("success", CONNECTIONS)]
