"""Every entry point takes a connection: `sync_ibkr --connection` / `--all` and
`POST /portfolio/sync/ibkr?connection=`, each connection a simulator of its own, read by
the real client over TCP."""

from __future__ import annotations

import json
import re
import socket
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from ibkr_sync.models import Connection, SyncRun
from ibkr_sync.testing import GatewaySimulator, Portfolio
from ibkr_sync.testing.pytest_plugin import CLIENT_ID
from portfolio.models import Position

from .conftest import sim_position

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/portfolio/sync/ibkr"


@pytest.fixture
def gateways(settings):
    """Two connections, `home` and `office`, each a simulator with one account; the
    settings' gateway is nowhere (a sync that read it would fail)."""
    settings.IBKR_CONNECT_TIMEOUT = 5
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 3
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_SYNC_THROTTLE_RATE = "none"
    settings.IBKR_PORT = 1
    first = Portfolio(accounts=["U1000001"], positions=[sim_position(account="U1000001")])
    second = Portfolio(
        accounts=["U2000002", "U2000003"],
        positions=[
            sim_position(account="U2000002", con_id=2002, symbol="TWO"),
            sim_position(account="U2000003", con_id=2003, symbol="THREE"),
        ],
    )
    with GatewaySimulator(first) as home, GatewaySimulator(second) as office:
        Connection.objects.create(name="home", port=home.port, client_id=CLIENT_ID)
        Connection.objects.create(name="office", port=office.port, client_id=CLIENT_ID)
        yield home, office


def sync_ibkr(*args: str) -> tuple[str, str, int]:
    """The command's stdout, stderr and exit code."""
    out, err = StringIO(), StringIO()
    try:
        call_command("sync_ibkr", *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(f"CommandError: {exc}\n")
        return out.getvalue(), err.getvalue(), exc.returncode
    return out.getvalue(), err.getvalue(), 0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_accounts() -> set[str]:
    return set(Position.objects.open().values_list("account__external_id", flat=True))


# --- the command ------------------------------------------------------------------------------


def test_the_command_syncs_the_connection_named_and_says_which(gateways):
    out, err, code = sync_ibkr("--connection", "office")

    assert (code, err) == (0, "")
    run = SyncRun.objects.get()
    assert out.splitlines() == [
        f"IBKR sync #{run.pk} of connection office: 2 positions in 2 account(s): 2 created, "
        "0 updated, 0 unchanged, 0 reopened, 0 closed, 0 errors"
    ]
    assert (run.connection_name, run.trigger, run.status) == ("office", "command", "success")
    assert open_accounts() == {"U2000002", "U2000003"}


def test_the_command_takes_account_dry_run_and_json_with_a_connection(gateways):
    out, _, code = sync_ibkr("--connection", "office", "--account", "U2000003", "--dry-run")
    assert code == 0
    assert out.splitlines()[0].startswith(
        "IBKR sync dry run of connection office (nothing written): 1 positions in 1 account(s)"
    )
    assert not SyncRun.objects.exists() and not Position.objects.exists()

    out, err, code = sync_ibkr("--connection", "office", "--account", "U2000003", "--json")
    body = json.loads(out)
    assert (code, err) == (0, "")
    assert (body["connection"], body["accounts"], body["created"]) == ("office", ["U2000003"], 1)
    assert open_accounts() == {"U2000003"}

    out, err, code = sync_ibkr("--connection", "home", "--quiet")
    assert (code, out, err) == (0, "", "")
    assert open_accounts() == {"U2000003", "U1000001"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "Several IBKR connections are configured (attic, home, office): name"),
        (["--connection", "nowhere"], 2, "No IBKR connection is named 'nowhere'"),
        (["--connection", ""], 2, "--connection is empty"),
        (["--connection", "attic"], 2, "Connection attic is disabled"),
        (["--all", "--account", "U1000001"], 2, "--all syncs every account"),
    ],
)
def test_a_connection_that_cannot_be_synced_is_exit_2_with_one_line(gateways, args, code, message):
    Connection.objects.create(name="attic", port=closed_port(), enabled=False)

    out, err, returncode = sync_ibkr(*args)

    assert (returncode, out) == (code, "")
    assert len(err.splitlines()) == 1 and message in err, err
    assert not SyncRun.objects.exists() and not Position.objects.exists()


def test_json_names_the_error_of_a_connection_that_does_not_exist(gateways):
    out, _, code = sync_ibkr("--connection", "nowhere", "--json")

    assert code == 2
    assert json.loads(out) == {
        "status": "error",
        "code": "unknown_connection",
        "detail": "No IBKR connection is named 'nowhere'; `manage.py ibkr_connection list` "
        "lists them.",
    }


def test_all_syncs_every_enabled_connection_a_line_each(gateways):
    Connection.objects.create(name="attic", port=closed_port(), enabled=False)

    out, err, code = sync_ibkr("--all")

    assert (code, err) == (0, "")
    runs = {run.connection_name: run.pk for run in SyncRun.objects.all()}
    assert set(runs) == {"home", "office"}  # not the disabled one
    lines = out.splitlines()
    assert [re.sub(r"#\d+ ", "#N ", line.split(":")[0]) for line in lines] == [
        "IBKR sync #N of connection home",
        "IBKR sync #N of connection office",
    ]
    assert lines[1].startswith(f"IBKR sync #{runs['office']} of connection office: 2 positions")
    assert open_accounts() == {"U1000001", "U2000002", "U2000003"}


def test_all_goes_on_past_a_connection_that_is_down_and_exits_with_its_code(gateways):
    home, _ = gateways
    home.stop_thread()

    out, err, code = sync_ibkr("--all")

    assert code == 3  # gateway unavailable: the first failure's kind
    assert [line.split(":")[0] for line in out.splitlines()] == [
        f"IBKR sync #{SyncRun.objects.get(connection_name='office').pk} of connection office"
    ]
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(
        "IBKR sync of connection home: failed (gateway_unavailable): Cannot connect to the "
        f"IB gateway at 127.0.0.1:{home.port}"
    )
    assert lines[1] == (
        "CommandError: 1 of 2 IBKR connection(s) failed: home; the exit code is the first "
        "one's (gateway_unavailable)."
    )
    assert open_accounts() == {"U2000002", "U2000003"}
    failed = SyncRun.objects.get(connection_name="home")
    assert (failed.status, failed.error_code) == ("failed", "gateway_unavailable")


def test_all_with_json_prints_each_connections_answer_or_error(gateways):
    home, _ = gateways
    home.stop_thread()

    out, _, code = sync_ibkr("--all", "--json")

    assert code == 3
    first, second = json.loads(out)
    assert (first["status"], first["code"], first["connection"]) == (
        "error",
        "gateway_unavailable",
        "home",
    )
    assert (second["status"], second["connection"], second["created"]) == ("success", "office", 2)


def test_all_with_every_connection_disabled_syncs_nothing_and_says_so(gateways):
    Connection.objects.update(enabled=False)

    out, err, code = sync_ibkr("--all")

    assert (code, err) == (0, "")
    assert out == "No IBKR connection is enabled: nothing was synced.\n"
    assert not SyncRun.objects.exists()


def test_without_connections_the_command_reads_the_settings_gateway_and_json_says_null(
    ibkr_simulator,
):
    out, _, code = sync_ibkr("--json")
    assert code == 0
    assert json.loads(out)["connection"] is None

    out, err, code = sync_ibkr("--all")
    assert (code, err) == (0, "")
    run = SyncRun.objects.latest("pk")
    assert re.match(rf"IBKR sync #{run.pk}: \d+ positions in 3 account\(s\): 0 created", out), out
    assert run.connection_name == ""


# --- the API ----------------------------------------------------------------------------------


@pytest.fixture
def api(gateways, syncer):
    client = APIClient()
    client.force_authenticate(syncer)
    return client


def test_the_api_syncs_the_connection_named(api):
    response = api.post(f"{URL}?connection=home")

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["connection"], body["accounts"], body["created"]) == ("home", ["U1000001"], 1)
    run = SyncRun.objects.get(pk=body["sync_run_id"])
    assert (run.connection_name, run.trigger) == ("home", "api")

    body = api.post(f"{URL}?connection=office&ibkr_account_id=U2000002").json()
    assert (body["connection"], body["accounts"]) == ("office", ["U2000002"])
    assert open_accounts() == {"U1000001", "U2000002"}


@pytest.mark.parametrize(
    ("query", "status", "code", "detail"),
    [
        ("", 400, "connection_required", "Several IBKR connections are configured"),
        ("?connection=nowhere", 404, "unknown_connection", "No IBKR connection is named"),
        ("?connection=" + "x" * 300, 404, "unknown_connection", "No IBKR connection is named"),
        ("?connection=bad%00name", 404, "unknown_connection", "No IBKR connection is named"),
        ("?connection=attic", 409, "connection_disabled", "Connection attic is disabled"),
        ("?connection=", 400, "invalid_query", "connection is empty"),
        ("?connection=home&connection=office", 400, "invalid_query", "more than once"),
    ],
)
def test_a_connection_that_cannot_be_synced_is_refused_and_nothing_starts(
    api, query, status, code, detail
):
    Connection.objects.create(name="attic", port=closed_port(), enabled=False)

    response = api.post(f"{URL}{query}")

    assert response.status_code == status, response.content
    body = response.json()
    assert (body["status"], body["code"]) == ("error", code)
    assert detail in body["detail"]
    assert not SyncRun.objects.exists() and not Position.objects.exists()


def test_the_api_answers_a_connection_that_is_down_in_the_sync_words(api, gateways):
    home, _ = gateways
    home.stop_thread()

    response = api.post(f"{URL}?connection=home")

    assert response.status_code == 503
    assert response.json()["code"] == "gateway_unavailable"
    assert f"127.0.0.1:{home.port}" in response.json()["detail"]
    assert SyncRun.objects.get().connection_name == "home"


def test_with_one_connection_naming_it_is_optional(api):
    Connection.objects.filter(name="office").delete()

    body = api.post(URL).json()

    assert (body["connection"], body["accounts"]) == ("home", ["U1000001"])
