"""Something other than TWS / IB Gateway at IBKR_PORT, and the client library's log.

Real servers on loopback answer the API handshake as a web server, a service that speaks
first, a peer sending junk, and one that closes at once: the sync says so at once, naming
the address and what answered (503 / exit 3, code `not_a_gateway`), instead of waiting for
the connect timeout and blaming it. One that accepts and says nothing stays a connect
timeout: a gateway showing a dialog does the same.

Whatever fails, `sync_ibkr` prints its one line on stderr, in a host project whose root
logger has a console handler, or none at all (Python's last resort prints warnings): the
client library's own log lines never reach the host's handlers during a read.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ibkr_sync.exceptions import NotAGateway
from ibkr_sync.gateway import IbkrGateway
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from tests.reliability.conftest import CONNECT_TIMEOUT
from tests.reliability.matrix import NOT_A_GATEWAY, free_port, not_a_gateway, silent_listener

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

PROJECT_DIR = Path(__file__).resolve().parents[2]
URL = "/portfolio/sync/ibkr"
# Long: an answer within a fraction of it was not waiting for it.
LONG_TIMEOUT = 10.0

SAID = {
    "http": "it speaks HTTP ('HTTP/1.1 400 Bad Request')",
    "junk": "its first frame would be 3,735,928,559 bytes long, which no answer to the API "
    "handshake is (it sent '\\xde\\xad\\xbe\\xef\\x00\\x01",
    "short frame": "its first frame is not an answer to the API handshake (a server version "
    "and a time): it sent '\\x00\\x00\\x00\\x06hello\\x00'",
    "ssh": "its first frame would be 1,397,966,893 bytes long, which no answer to the API "
    "handshake is (it sent 'SSH-2.0-OpenSSH_9.6p1 Debian-4\\r\\n'",
    "closes_at_once": (
        "it closed the connection without answering the API handshake",
        "reset it at once",
    ),
}
CHECK = (
    "Check that IBKR_HOST and IBKR_PORT name the API port of TWS / IB Gateway (its API "
    "settings' 'Socket port'"
)


def code_of(kind: str) -> str:
    """A peer that closes without a word may be a gateway refusing this client: that stays
    `gateway_unavailable`; what answered otherwise is `not_a_gateway`."""
    return "gateway_unavailable" if kind == "closes_at_once" else "not_a_gateway"


def assert_says_what_answered(message: str, kind: str, port: int) -> None:
    if kind == "closes_at_once":
        head = f"127.0.0.1:{port} accepted the connection, but "
        assert "trusted IPs" in message, message
    else:
        head = f"127.0.0.1:{port} answered, but not as TWS / IB Gateway: "
    assert message.startswith(head), message
    said = SAID[kind] if isinstance(SAID[kind], tuple) else (SAID[kind],)
    assert message[len(head) :].startswith(said), message
    assert CHECK in message


@pytest.fixture
def node_http():
    """Node.js's own HTTP server (a web server a developer runs), where installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (
        "const s = require('http').createServer((q, r) => r.end('hi'));"
        "s.listen(0, '127.0.0.1', () => console.log(s.address().port));"
    )
    process = subprocess.Popen([node, "-e", script], stdout=subprocess.PIPE, text=True)
    try:
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


# --- the API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NOT_A_GATEWAY))
def test_the_api_says_at_once_what_answered_instead_of_a_gateway(kind, ibkr, settings, sync_client):
    settings.IBKR_CONNECT_TIMEOUT = LONG_TIMEOUT
    with not_a_gateway(kind) as port:
        settings.IBKR_PORT = port
        started = time.monotonic()
        response = sync_client.post(URL)
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.content
    body = response.json()
    assert body["code"] == code_of(kind)
    assert_says_what_answered(body["detail"], kind, port)
    assert elapsed < 2.0, f"{elapsed:.2f} s: it waited"
    run = SyncRun.objects.get()
    assert (run.status, run.error_code) == (SyncRun.Status.FAILED, code_of(kind))


@pytest.mark.processes
def test_a_real_web_server_is_named_as_one(node_http, ibkr, settings, sync_client):
    settings.IBKR_CONNECT_TIMEOUT = LONG_TIMEOUT
    settings.IBKR_PORT = node_http

    started = time.monotonic()
    response = sync_client.post(URL)

    assert time.monotonic() - started < 2.0
    assert response.status_code == 503
    assert response.json()["code"] == "not_a_gateway"
    assert_says_what_answered(response.json()["detail"], "http", node_http)


def test_a_peer_that_accepts_and_says_nothing_stays_a_connect_timeout(ibkr, settings, sync_client):
    with silent_listener() as port:
        settings.IBKR_PORT = port
        started = time.monotonic()
        response = sync_client.post(URL)
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json()["code"] == "gateway_timeout"
    assert CONNECT_TIMEOUT * 0.9 <= elapsed <= CONNECT_TIMEOUT + 1.0


def test_a_gateway_still_syncs_and_the_next_sync_after_a_stranger_succeeds(ibkr, settings):
    with not_a_gateway("http") as port:
        settings.IBKR_PORT = port
        with pytest.raises(NotAGateway):
            sync_positions(trigger=SyncRun.Trigger.COMMAND)
    settings.IBKR_PORT = ibkr.port

    assert sync_positions(trigger=SyncRun.Trigger.COMMAND).created == 4


# --- the client library's log stays off the host's handlers ----------------------------------


class Probe(logging.Handler):
    """A host's root handler: what reaches it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def library(self) -> list[str]:
        names = ("ib_insync", "ib_async", "eventkit", "asyncio")
        return [
            f"{r.name}: {r.getMessage()}" for r in self.records if r.name.split(".")[0] in names
        ]


@pytest.fixture
def root_probe(caplog):
    caplog.set_level(logging.DEBUG, logger="ibkr_sync")
    probe, root = Probe(), logging.getLogger()
    root.addHandler(probe)
    saved = {n: logging.getLogger(n).propagate for n in ("ib_insync", "eventkit")}
    try:
        yield probe
    finally:
        root.removeHandler(probe)
    assert {n: logging.getLogger(n).propagate for n in saved} == saved, "put back as it was"


@pytest.fixture
def propagating_library(settings):
    """As in a host that configured nothing for the library: its records propagate."""
    loggers = [logging.getLogger(n) for n in ("ib_insync", "eventkit")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.propagate = True
    yield
    for lg, propagate in saved:
        lg.propagate = propagate


@pytest.mark.parametrize("target", ["closed port", "junk", "http", "gateway"])
def test_no_record_of_the_library_reaches_the_hosts_root_handlers_during_a_read(
    target, ibkr, settings, root_probe, propagating_library
):
    if target == "gateway":
        sync_positions(trigger=SyncRun.Trigger.COMMAND)
    elif target == "closed port":
        settings.IBKR_PORT = free_port()
        with pytest.raises(Exception, match="connection refused"):
            sync_positions(trigger=SyncRun.Trigger.COMMAND)
    else:
        with not_a_gateway(target) as port:
            settings.IBKR_PORT = port
            with pytest.raises(NotAGateway if code_of(target) == "not_a_gateway" else Exception):
                sync_positions(trigger=SyncRun.Trigger.COMMAND)

    assert root_probe.library() == []
    relogged = [r.getMessage() for r in root_probe.records if r.name == "ibkr_sync.gateway"]
    assert any(m.startswith("ib_insync.client ") for m in relogged), "kept, at DEBUG, as ours"
    if target == "closed port":
        assert any("ERROR: API connection failed: ConnectionRefusedError" in m for m in relogged)


def test_the_librarys_records_of_another_thread_still_reach_the_host(
    ibkr, root_probe, propagating_library
):
    gate = threading.Event()
    ibkr.set_faults(hold_positions=gate)
    # The gateway alone, in a thread of its own: the read, without the database.
    reading = threading.Thread(target=IbkrGateway().fetch_positions)
    reading.start()
    try:
        deadline = time.monotonic() + 10
        while not ibkr.active_client_ids:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        logging.getLogger("ib_insync.client").warning("the host's own use of the library")
    finally:
        gate.set()
        reading.join(10)

    assert root_probe.library() == ["ib_insync.client: the host's own use of the library"]


# --- the command, in a host project: one line on stderr --------------------------------------

HOST_LOGGING = {
    # A host's usual configuration: a console handler on the root logger at INFO.
    "root console": """
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
""",
    # Django's default: no handler on the root logger (Python prints WARNING and above).
    "django default": "LOGGING = {}\n",
    "this project's": "",
}


@pytest.fixture(scope="module")
def host_env(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per logging configuration, the environment of a host project's `manage.py` (our
    settings with the host's LOGGING) on a migrated SQLite file of its own."""
    directory = tmp_path_factory.mktemp("host")
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "DJANGO_")) and k not in {"DATABASE_URL", "DEBUG"}
    }
    base.update(
        DATABASE_URL=f"sqlite:///{directory / 'db.sqlite3'}",
        DEBUG="true",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=os.pathsep.join([str(directory), str(PROJECT_DIR)]),
        IBKR_CONNECT_TIMEOUT=str(LONG_TIMEOUT),
    )
    envs = {}
    for index, (name, logging_config) in enumerate(HOST_LOGGING.items()):
        module = f"host_settings_{index}"
        (directory / f"{module}.py").write_text(
            "from portfolio_site.settings import *  # noqa: F403\n" + logging_config
        )
        envs[name] = {**base, "DJANGO_SETTINGS_MODULE": module}
    manage("migrate", "--noinput", "-v", "0", env=envs["this project's"], check=True)
    return envs


def manage(*args: str, env: dict[str, str], check: bool = False):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


CASES = [
    *((config, "closed port") for config in HOST_LOGGING),
    *((config, "junk") for config in HOST_LOGGING),
    *(("root console", kind) for kind in NOT_A_GATEWAY if kind != "junk"),
    ("root console", "silent"),
    ("django default", "silent"),
]


@pytest.mark.processes
@pytest.mark.parametrize(("config", "target"), CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_the_command_prints_its_one_line_in_a_host_project(config, target, host_env):
    env = host_env[config]
    if target == "silent":
        env = {**env, "IBKR_CONNECT_TIMEOUT": "1"}
        with silent_listener() as port:
            result = manage("sync_ibkr", env={**env, "IBKR_PORT": str(port)})
        expected_exit = 4
    elif target == "closed port":
        port = free_port()
        result = manage("sync_ibkr", env={**env, "IBKR_PORT": str(port)})
        expected_exit = 3
    else:
        with not_a_gateway(target) as port:
            started = time.monotonic()
            result = manage("sync_ibkr", env={**env, "IBKR_PORT": str(port)})
            elapsed = time.monotonic() - started
        expected_exit = 3
        assert elapsed < LONG_TIMEOUT / 2, f"{elapsed:.1f} s: it waited for the timeout"

    assert result.returncode == expected_exit, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("CommandError: ")
    message = lines[0].removeprefix("CommandError: ")
    if target == "silent":
        assert message.startswith(f"The IB gateway at 127.0.0.1:{port} did not connect within 1 s")
    elif target == "closed port":
        assert message.startswith(f"Cannot connect to the IB gateway at 127.0.0.1:{port}: ")
    else:
        assert_says_what_answered(message, target, port)


@contextlib.contextmanager
def waiting_web_server():
    """A web server as Django's runserver and gunicorn are: it waits for the end of a
    request line, so it says nothing to the API handshake (which has none)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_server_that_waits_for_a_request_line_is_named_after_the_timeout(
    ibkr, settings, sync_client
):
    with waiting_web_server() as port:
        settings.IBKR_PORT = port
        started = time.monotonic()
        response = sync_client.post(URL)
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.content
    body = response.json()
    assert body["code"] == "not_a_gateway"
    assert body["detail"].startswith(f"127.0.0.1:{port} answered, but not as TWS / IB Gateway: ")
    assert "it speaks HTTP (" in body["detail"] and "HTTP/1.0 501" in body["detail"]
    assert CHECK in body["detail"]
    assert CONNECT_TIMEOUT * 0.9 <= elapsed <= CONNECT_TIMEOUT + 1.0
