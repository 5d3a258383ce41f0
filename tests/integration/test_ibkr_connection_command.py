"""`manage.py ibkr_connection add|list|remove|test`: one line per action, `sync_ibkr`'s
exit codes, the model's own validation; `test` through the real client over TCP."""

from __future__ import annotations

import re
import socket
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ibkr_sync.models import Connection, SyncRun
from ibkr_sync.testing.pytest_plugin import CLIENT_ID
from tests.integration.conftest import negotiated_version

pytestmark = pytest.mark.django_db(transaction=True)


def ibkr_connection(*args: str) -> tuple[str, str, int]:
    out, err = StringIO(), StringIO()
    try:
        call_command("ibkr_connection", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return out.getvalue(), f"CommandError: {exc}\n", exc.returncode
    return out.getvalue(), err.getvalue(), 0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gateway(settings, ibkr_simulator):
    """The simulator, with the settings' gateway pointing nowhere."""
    settings.IBKR_PORT = 1
    settings.IBKR_CONNECT_TIMEOUT = 3
    return ibkr_simulator


def test_add_stores_the_connection_in_one_line(django_user_model):
    django_user_model.objects.create_user("alice")

    out, err, code = ibkr_connection(
        "add", "home", "--host", "gw.lan", "--port", "4002", "--client-id", "7",
        "--connect-timeout", "2.5", "--owner", "alice", "--note", "the paper login",
    )  # fmt: skip

    assert (code, err) == (0, "")
    assert out == (
        "Added connection home: gw.lan:4002, client id 7. Test it: manage.py "
        "ibkr_connection test home\n"
    )
    home = Connection.objects.get()
    assert (home.name, home.kind, home.enabled, home.host, home.port, home.client_id) == (
        "home", "tws", True, "gw.lan", 4002, 7,
    )  # fmt: skip
    assert (home.connect_timeout, home.request_timeout) == (2.5, None)
    assert (home.owner.username, home.note) == ("alice", "the paper login")


def test_add_disabled():
    out, _, code = ibkr_connection(
        "add", "attic", "--port", "4001", "--client-id", "3", "--disabled"
    )

    assert code == 0 and out.startswith("Added connection attic (disabled): 127.0.0.1:4001")
    assert Connection.objects.get().enabled is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no spaces", "--port", "4002", "--client-id", "1"], "name: Enter a valid “slug”"),
        (["home", "--port", "70000", "--client-id", "1"], "port: Ensure this value is less than"),
        (["home", "--port", "4002", "--client-id", "-1"], "client id: Ensure this value is"),
        (["home", "--host", "a b", "--port", "1", "--client-id", "1"], "host: A host name or IP"),
        (
            ["home", "--port", "4002", "--client-id", "1", "--connect-timeout", "0"],
            "connect timeout",
        ),
        (["home", "--port", "4002", "--client-id", "1", "--owner", "nobody"], "No user is named"),
        (
            ["taken", "--port", "4002", "--client-id", "1"],
            "name: Connection with this Name already",
        ),
        (
            ["Taken", "--port", "4002", "--client-id", "1"],
            "A connection with this name (in any case) exists.",
        ),
    ],
)
def test_add_refuses_what_the_model_refuses_in_one_line_and_adds_nothing(args, message):
    Connection.objects.create(name="taken", port=4001)

    out, err, code = ibkr_connection("add", *args)

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(Connection.objects.values_list("name", flat=True)) == ["taken"]


def test_list_says_one_line_per_connection_with_its_last_sync(gateway, django_user_model):
    alice = django_user_model.objects.create_user("alice")
    Connection.objects.create(name="home", port=gateway.port, client_id=CLIENT_ID, owner=alice)
    Connection.objects.create(name="office", port=closed_port(), client_id=5, enabled=False)
    call_command("sync_ibkr", "--connection", "home", stdout=StringIO())

    out, err, code = ibkr_connection("list")

    assert (code, err) == (0, "")
    home, office = out.splitlines()
    run = SyncRun.objects.get()
    assert re.fullmatch(
        rf"home  tws  enabled  127\.0\.0\.1:{gateway.port}  client id {CLIENT_ID}  owner alice  "
        rf"last sync #{run.pk} success at \d{{4}}-\d\d-\d\d \d\d:\d\d \w+",
        home,
    ), home
    assert office.startswith("office  tws  disabled  127.0.0.1:")
    assert office.endswith("client id 5  owner -  never synced")


def test_list_without_connections_names_the_settings_gateway(settings):
    settings.IBKR_HOST, settings.IBKR_PORT, settings.IBKR_CLIENT_ID = "gw", 4002, 9

    out, _, code = ibkr_connection("list")

    assert (code, out) == (
        0,
        "No IBKR connection is configured: syncs read the settings' gateway at gw:4002 "
        "(client id 9).\n",
    )


def test_remove_keeps_the_connections_sync_history(gateway):
    Connection.objects.create(name="home", port=gateway.port, client_id=CLIENT_ID)
    call_command("sync_ibkr", "--connection", "home", stdout=StringIO())

    out, err, code = ibkr_connection("remove", "home")

    assert (code, err) == (0, "")
    assert out == "Removed connection home (its 1 sync run(s) kept).\n"
    assert not Connection.objects.exists()
    run = SyncRun.objects.get()
    assert (run.connection, run.connection_name, run.status) == (None, "home", "success")


def test_remove_of_a_name_no_connection_has_is_exit_2():
    out, err, code = ibkr_connection("remove", "nowhere")

    assert (code, out) == (2, "")
    assert err == (
        "CommandError: No IBKR connection is named 'nowhere'; `manage.py ibkr_connection "
        "list` lists them.\n"
    )


def test_test_does_the_handshake_only_and_says_what_the_gateway_said(gateway):
    Connection.objects.create(name="home", port=gateway.port, client_id=CLIENT_ID, enabled=False)

    out, err, code = ibkr_connection("test", "home")

    assert (code, err) == (0, "")
    accounts = ", ".join(gateway.accounts)
    assert out == f"ok: server version {negotiated_version()}, accounts {accounts}\n"
    assert not SyncRun.objects.exists()


def test_test_without_connections_tests_the_settings_gateway(settings, ibkr_simulator):
    out, _, code = ibkr_connection("test")

    accounts = ", ".join(ibkr_simulator.accounts)
    assert (code, out) == (0, f"ok: server version {negotiated_version()}, accounts {accounts}\n")


def test_test_of_a_gateway_that_is_down_says_it_in_the_syncs_words_and_exit_code(gateway):
    port = closed_port()
    Connection.objects.create(name="home", port=port, client_id=CLIENT_ID)

    out, err, code = ibkr_connection("test", "home")

    assert (code, out) == (3, "")
    assert err.startswith(f"CommandError: Cannot connect to the IB gateway at 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1


def test_test_of_a_client_id_in_use_is_exit_7(gateway):
    Connection.objects.create(name="home", port=gateway.port, client_id=CLIENT_ID)
    gateway.set_faults(error_on_connect=(326, "client id is already in use"))

    _, err, code = ibkr_connection("test", "home")

    assert code == 7, err
    assert "client id" in err.lower()
