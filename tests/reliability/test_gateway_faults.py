"""Gateway faults at every phase, through the real IB client against the simulator.

For each fault of `matrix.GATEWAY_FAULTS`: the API answers its one HTTP status and the
command its one exit code, within the configured timeout plus one second, no position or
instrument changes, and the SyncRun records the failure. Then: a hundred failing syncs
leave no thread, socket or event loop behind, and a gateway restart closes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Position
from tests.reliability.conftest import CONNECT_TIMEOUT, REQUEST_TIMEOUT, database_state
from tests.reliability.matrix import GATEWAY_FAULTS, GatewayFault, provoke

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

URL = "/portfolio/sync/ibkr"
FAULT_IDS = [fault.name.replace(" ", "-") for fault in GATEWAY_FAULTS]


def bound(fault: GatewayFault) -> float:
    """The time within which the caller must have its answer."""
    waited = {"connect": CONNECT_TIMEOUT, "request": REQUEST_TIMEOUT, None: 0.0}
    return waited[fault.waits_for] + 1.0


@pytest.mark.parametrize("fault", GATEWAY_FAULTS, ids=FAULT_IDS)
def test_api_answers_the_faults_status_in_time_and_changes_nothing(
    fault, ibkr, settings, sync_client
):
    assert sync_client.post(URL).status_code == 200
    before = database_state()

    with provoke(fault, ibkr) as port:
        settings.IBKR_PORT = port
        started = time.monotonic()
        response = sync_client.post(URL)
        elapsed = time.monotonic() - started

    assert response.status_code == fault.http_status, response.content
    assert response.json()["code"] == fault.code
    assert elapsed <= bound(fault), f"{fault.name}: {elapsed:.2f} s"
    if fault.waits_for:
        assert elapsed >= 0.9 * bound(fault) - 1.0, "gave up before the configured timeout"
    assert database_state() == before
    run = SyncRun.objects.first()
    assert (run.status, run.error_code) == (SyncRun.Status.FAILED, fault.code)

    settings.IBKR_PORT = ibkr.port
    assert sync_client.post(URL).json()["unchanged"] == 4, "the next sync succeeds"


@pytest.mark.parametrize("fault", GATEWAY_FAULTS, ids=FAULT_IDS)
def test_command_exits_with_the_faults_code_in_time_and_changes_nothing(fault, ibkr, settings):
    call_command("sync_ibkr", stdout=StringIO())
    before = database_state()

    with provoke(fault, ibkr) as port:
        settings.IBKR_PORT = port
        started = time.monotonic()
        with pytest.raises(CommandError) as caught:
            call_command("sync_ibkr", stdout=StringIO(), stderr=StringIO())
        elapsed = time.monotonic() - started

    assert caught.value.returncode == fault.exit_code
    assert isinstance(caught.value.__cause__, fault.error)
    assert type(caught.value.__cause__).code == fault.code
    assert elapsed <= bound(fault)
    assert database_state() == before


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _live_event_loops(exclude) -> list:
    gc.collect()
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, asyncio.AbstractEventLoop) and not obj.is_closed() and obj not in exclude
    ]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_a_hundred_failing_syncs_leave_no_thread_socket_or_loop_behind(ibkr, settings):
    settings.IBKR_CONNECT_TIMEOUT = settings.IBKR_REQUEST_TIMEOUT = 0.2
    sync_positions(trigger=SyncRun.Trigger.COMMAND)  # opens the database connection
    simulator_loops = _live_event_loops(exclude=())
    threads, fds = set(threading.enumerate()), _open_fds()
    before = database_state()

    failures: dict[str, int] = {}
    for attempt in range(100):
        fault = GATEWAY_FAULTS[attempt % len(GATEWAY_FAULTS)]
        with provoke(fault, ibkr) as port:
            settings.IBKR_PORT = port
            with pytest.raises(fault.error):
                sync_positions(trigger=SyncRun.Trigger.COMMAND)
        failures[fault.name] = failures.get(fault.name, 0) + 1
    settings.IBKR_PORT = ibkr.port

    assert sum(failures.values()) == 100 and len(failures) == len(GATEWAY_FAULTS)
    assert database_state() == before
    assert SyncRun.objects.filter(status=SyncRun.Status.FAILED).count() == 100
    assert not SyncRun.objects.filter(status=SyncRun.Status.RUNNING).exists()
    assert _eventually(lambda: set(threading.enumerate()) <= threads), threading.enumerate()
    assert _eventually(lambda: _open_fds() <= fds), "file descriptors leaked"
    assert _live_event_loops(exclude=simulator_loops) == []
    assert _eventually(lambda: ibkr.active_client_ids == []), "a gateway session was left open"
    assert sync_positions(trigger=SyncRun.Trigger.COMMAND).unchanged == 4


def _eventually(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_gateway_restart_is_503_then_the_next_sync_succeeds_and_nothing_closes(ibkr, sync_client):
    assert sync_client.post(URL).json()["created"] == 4
    before = database_state()

    ibkr.stop_thread()  # the daily restart: the port is closed for a while
    try:
        response = sync_client.post(URL)
        assert response.status_code == 503
        assert response.json()["code"] == "gateway_unavailable"
        assert database_state() == before
    finally:
        ibkr.start_in_thread()  # back on the same port

    body = sync_client.post(URL).json()
    assert (body["status"], body["unchanged"], body["closed"]) == ("success", 4, 0)
    assert Position.objects.filter(closed_at__isnull=False).count() == 0


def test_gateway_dropping_every_session_mid_sync_closes_nothing(ibkr, settings, sync_client):
    """The restart hits during a read: the session drops half way through the positions."""
    assert sync_client.post(URL).status_code == 200
    before = database_state()
    ibkr.set_faults(message_delay=0.05)

    def restart_when_reading():
        time.sleep(0.3)  # handshake and a few rows at 50 ms per message
        ibkr.disconnect_all()

    restarter = threading.Thread(target=restart_when_reading)
    restarter.start()
    response = sync_client.post(URL)
    restarter.join()
    ibkr.clear_faults()

    assert response.status_code == 503, response.content
    assert database_state() == before
    assert _eventually(lambda: ibkr.active_client_ids == [])
    assert sync_client.post(URL).json()["closed"] == 0
