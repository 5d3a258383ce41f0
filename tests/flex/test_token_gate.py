"""One Flex exchange at a time per token across processes: the gate in the database
(`ibkr_sync.token_gate`), on SQLite and PostgreSQL, with the real client over real HTTP
against the fake Flex Web Service (which records when each request began and ended)."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from ibkr_sync import connections
from ibkr_sync.conf import FlexConfig
from ibkr_sync.lock import database_now
from ibkr_sync.models import Connection, FlexTokenGate
from ibkr_sync.services import sync_positions
from ibkr_sync.sources.flex.client import FlexClient, RetryPolicy, token_key
from ibkr_sync.sources.flex.errors import FlexThrottled
from ibkr_sync.sources.flex.source import FlexSource
from ibkr_sync.testing.flex_service import GET_STATEMENT, SEND_REQUEST, Answer, FakeFlexService
from ibkr_sync.token_gate import DatabaseGate
from tests.reliability.deployment import Deployment

from .statements import statement_with_values

TOKEN = "5566778899001122334455gateTOKEN"
QUERY = "778899"
FAST = RetryPolicy(
    first_poll=0.01, poll_interval=0.01, min_interval=0.01, retry_delay=0.01, retries=1
)


@pytest.fixture
def fake():
    with FakeFlexService(tokens=(TOKEN,)) as service:
        service.add_statement(QUERY, statement_with_values)
        yield service


class FastSource(FlexSource):
    policy = FAST


def client(fake, gate: DatabaseGate) -> FlexClient:
    return FlexClient(TOKEN, base_url=fake.base_url, policy=FAST, sleep=lambda _: None, gate=gate)


@pytest.mark.django_db
def test_the_gate_is_keyed_on_a_digest_and_given_back(fake):
    day = dt.date(2026, 3, 13)

    client(fake, DatabaseGate(spacing=0.01)).fetch(QUERY, day, day)

    [row] = FlexTokenGate.objects.all()
    assert row.key == token_key(TOKEN) and TOKEN not in repr(row.__dict__)
    assert (row.holder, row.leased_until) == ("", None)
    assert row.not_before is not None  # the next request on the token: spaced


@pytest.mark.django_db
def test_a_1018_holds_back_every_process_of_the_token(fake):
    """IBKR's back-off after a 1018 is stored with the token's gate: a client of another
    process (another gate) waits it out and, past its patience, gives up without asking
    IBKR anything."""
    day = dt.date(2026, 3, 13)
    fake.script(SEND_REQUEST, Answer.error(1018))
    before = database_now()

    client(fake, DatabaseGate(spacing=0.01)).fetch(QUERY, day, day)

    not_before = FlexTokenGate.objects.get().not_before
    assert not_before >= before + dt.timedelta(seconds=10)  # the client's 1018 wait
    asked = len(fake.requests)
    with pytest.raises(FlexThrottled) as caught:
        client(fake, DatabaseGate(spacing=0.01, wait=0.3)).fetch(QUERY, day, day)
    assert str(caught.value) == (
        f"IBKR asked for no request on this Flex token before {not_before:%Y-%m-%d %H:%M:%S} "
        "UTC (too many requests, 1018), more than 0.3 s from now: sync again later; nothing "
        "was asked of IBKR"
    )
    assert len(fake.requests) == asked


@pytest.mark.django_db
def test_a_holder_that_died_frees_the_token_after_its_lease(fake):
    day = dt.date(2026, 3, 13)
    now = database_now()
    FlexTokenGate.objects.create(
        key=token_key(TOKEN), holder="gone pid 1", leased_until=now + dt.timedelta(seconds=30)
    )
    with pytest.raises(FlexThrottled) as caught:
        client(fake, DatabaseGate(wait=0.3)).fetch(QUERY, day, day)
    assert not fake.requests  # held by a live lease: nothing asked
    # Who holds it, and when it is free again if that process has stopped.
    until = FlexTokenGate.objects.get().leased_until
    assert str(caught.value) == (
        "another process (gone pid 1) has been using this Flex token for over 0.3 s (one "
        "request at a time per token): sync again later; nothing was asked of IBKR. If that "
        f"process has stopped, the token is free again at {until:%Y-%m-%d %H:%M:%S} UTC, when "
        "its lease runs out"
    )

    FlexTokenGate.objects.update(leased_until=now - dt.timedelta(seconds=1))
    client(fake, DatabaseGate(wait=0.3, spacing=0.01)).fetch(QUERY, day, day)

    assert [r.endpoint for r in fake.requests] == [SEND_REQUEST, GET_STATEMENT]


# --- two real processes -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.processes
def test_two_processes_with_one_token_never_overlap(tmp_path):
    """Two connections with the same token, synced at the same moment by two `sync_ibkr`
    processes (each connection its own lock): their exchanges with IBKR take turns, one
    SendRequest and its statement, then the other's, never a request of one in flight
    during the other's exchange."""
    with FakeFlexService(tokens=(TOKEN,)) as service:
        service.add_statement(QUERY, statement_with_values)
        # Slow statements: an exchange lasts long enough for the other process to start.
        service.script(GET_STATEMENT, Answer.slow(1.0), Answer.slow(1.0))
        site = Deployment(tmp_path, gateway_port=1)
        site.env.update(
            IBKR_FLEX_BASE_URL=service.base_url,
            IBKR_SYNC_SECRET_KEY="gate-test-secret-key-0123456789-abcdefgh",
            IBKR_FLEX_TOKEN=TOKEN,
        )
        site.create()
        try:
            for name in ("first", "second"):
                added = site.manage(
                    "ibkr_connection", "add", name, "--kind", "flex", "--query-id", QUERY,
                    "--token-from-env", "IBKR_FLEX_TOKEN",
                )  # fmt: skip
                assert added.returncode == 0, added.stderr
            syncs = [site.start_sync("--connection", name) for name in ("first", "second")]
            outputs = [process.communicate(timeout=120) for process in syncs]
        finally:
            site.destroy()
        for process, (out, err) in zip(syncs, outputs, strict=True):
            assert process.returncode == 0, err
            assert "2 positions in 1 account(s)" in out

        requests = sorted(service.requests, key=lambda r: r.started)
        assert [r.endpoint for r in requests] == [SEND_REQUEST, GET_STATEMENT] * 2
        assert max(service.max_in_flight.values()) == 1
        # The second exchange begins after the first one's statement was answered.
        assert requests[2].started >= requests[1].ended


@pytest.mark.django_db
def test_a_connections_source_takes_turns_at_the_database_gate_a_bare_source_does_not(
    fake, settings
):
    """The gate is given to the source by whoever builds it: a Flex connection's source
    (`connections.Target.source`) holds the token in the database for its exchange; a
    `FlexSource` built without one reads behind this process's turn only."""
    settings.IBKR_FLEX_BASE_URL = fake.base_url
    settings.IBKR_SYNC_FLEX_SOURCE_CLASS = f"{__name__}.FastSource"
    settings.IBKR_SYNC_SECRET_KEY = "gate-test-secret-key-0123456789-abcdefgh"
    row = Connection(name="statements", kind="flex", flex_query_id=QUERY)
    row.set_flex_token(TOKEN)
    row.full_clean()
    row.save()
    day = dt.date.today() - dt.timedelta(days=1)

    bare = FastSource(FlexConfig(token=TOKEN, query_id=QUERY, base_url=fake.base_url))
    assert bare.gate is None
    bare.fetch(day, day)
    assert not FlexTokenGate.objects.exists()

    assert connections.resolve("statements").source().gate is DatabaseGate
    result = sync_positions(trigger="command", connection="statements")

    assert result.processed == 2
    gate = FlexTokenGate.objects.get()
    assert gate.key == token_key(TOKEN) and TOKEN not in gate.key
    assert gate.holder == "", "given back after the exchange"


@pytest.mark.django_db
@pytest.mark.processes
def test_a_holder_of_this_machine_that_ended_frees_the_token_at_once(fake):
    """A worker killed mid-exchange: its process is gone, which this machine can tell (as
    the sync lock tells it); the next exchange does not wait out its lease."""
    import subprocess
    import sys

    from ibkr_sync import lock
    from ibkr_sync.token_gate import Held

    day = dt.date(2026, 3, 13)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = lock._start_time(process.pid)
        # Named as that process's own gate would name it (its pid, its start time).
        mine = Held(DatabaseGate(), token_key(TOKEN)).holder
        holder = mine.replace(f" pid {os.getpid()} ", f" pid {process.pid} ").rsplit(";", 1)[0]
        holder = f"{holder};{started}"
        FlexTokenGate.objects.create(
            key=token_key(TOKEN),
            holder=holder,
            leased_until=database_now() + dt.timedelta(seconds=300),
        )
        # Alive: its lease holds.
        with pytest.raises(FlexThrottled):
            client(fake, DatabaseGate(wait=0.3)).fetch(QUERY, day, day)
    finally:
        process.kill()
        process.wait()

    client(fake, DatabaseGate(wait=0.3, spacing=0.01)).fetch(QUERY, day, day)

    assert [r.endpoint for r in fake.requests] == [SEND_REQUEST, GET_STATEMENT]
    assert FlexTokenGate.objects.get().holder == ""
