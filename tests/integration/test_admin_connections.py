"""The admin's connection pages, "Test connection" (the handshake, through the real client
over TCP against a simulator) and Sync now with several connections."""

from __future__ import annotations

import socket

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from ibkr_sync.models import Connection, SyncRun
from ibkr_sync.testing import GatewaySimulator, Portfolio
from ibkr_sync.testing.pytest_plugin import CLIENT_ID
from portfolio.models import Position
from tests.integration.conftest import negotiated_version

from .conftest import sim_position

pytestmark = pytest.mark.django_db(transaction=True)

LIST = reverse("admin:ibkr_sync_connection_changelist")
ADD = reverse("admin:ibkr_sync_connection_add")
SYNC_NOW = reverse("admin:ibkr_sync_syncrun_sync_now")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gateways(settings):
    settings.IBKR_CONNECT_TIMEOUT = 3
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_SYNC_THROTTLE_RATE = "none"
    settings.IBKR_PORT = 1
    first = Portfolio(accounts=["U1000001"], positions=[sim_position(account="U1000001")])
    second = Portfolio(
        accounts=["U2000002"], positions=[sim_position(account="U2000002", con_id=2, symbol="B")]
    )
    with GatewaySimulator(first) as home, GatewaySimulator(second) as office:
        yield {
            "home": Connection.objects.create(name="home", port=home.port, client_id=CLIENT_ID),
            "office": Connection.objects.create(
                name="office", port=office.port, client_id=CLIENT_ID
            ),
        }


def staff(django_user_model, *codenames: str) -> Client:
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def said(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def change_url(connection: Connection) -> str:
    return reverse("admin:ibkr_sync_connection_change", args=[connection.pk])


def test_the_list_shows_each_connection_and_its_last_sync(django_user_model, gateways):
    client = staff(django_user_model, "view_connection", "view_syncrun", "run_sync")
    client.post(SYNC_NOW, {"connection": "home"})

    html = client.get(LIST).text

    run = SyncRun.objects.get()
    for text in (
        "home", "office", f"127.0.0.1:{gateways['home'].port}", str(CLIENT_ID),
        "TWS / IB Gateway", reverse("admin:ibkr_sync_syncrun_change", args=[run.pk]),
        'class="ibkr-badge ibkr-badge-success"', "never",
    ):  # fmt: skip
        assert text in html, text
    # A sync's outcome is sync run data.
    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_connection"))
    without_runs = Client()
    without_runs.force_login(viewer)
    html = without_runs.get(LIST).text
    assert "home" in html and "ibkr-badge-success" not in html and "last sync" not in html


def test_the_form_shows_what_the_model_refuses_and_saves_nothing(django_user_model):
    client = staff(django_user_model, "view_connection", "add_connection", "change_connection")

    response = client.post(
        ADD, {"name": "no spaces", "kind": "tws", "enabled": "on", "host": "a/b",
              "port": "70000", "client_id": "1", "note": ""},
    )  # fmt: skip

    assert response.status_code == 200
    html = response.text
    assert "Please correct the errors below." in html
    assert "Enter a valid “slug”" in html
    assert "A host name or IP address" in html
    assert "Ensure this value is less than or equal to 65535." in html
    assert not Connection.objects.exists()

    response = client.post(
        ADD, {"name": "home", "kind": "tws", "enabled": "on", "host": "gw.lan",
              "port": "4002", "client_id": "7", "connect_timeout": "2.5", "note": "paper"},
    )  # fmt: skip
    assert response.status_code == 302
    home = Connection.objects.get()
    assert (home.address, home.client_id, home.connect_timeout) == ("gw.lan:4002", 7, 2.5)

    # `HOME` beside `home` would be taken for the same connection: refused.
    response = client.post(
        ADD, {"name": "HOME", "kind": "tws", "enabled": "on", "host": "gw.lan",
              "port": "4001", "client_id": "8", "note": ""},
    )  # fmt: skip
    assert response.status_code == 200
    assert "A connection with this name (in any case) exists." in response.text
    assert list(Connection.objects.values_list("name", flat=True)) == ["home"]


def test_test_connection_reports_the_server_version_and_accounts(django_user_model, gateways):
    client = staff(django_user_model, "view_connection", "run_sync")
    home = gateways["home"]

    page = client.get(change_url(home)).text
    response = client.post(reverse("admin:ibkr_sync_connection_test", args=[home.pk]))

    assert "Test connection" in page
    assert response.status_code == 302 and response.url == change_url(home)
    assert said(response) == [
        f"Connection home (127.0.0.1:{home.port}): ok: server version "
        f"{negotiated_version()}, accounts U1000001"
    ]
    assert not SyncRun.objects.exists() and not Position.objects.exists()


def test_test_connection_says_the_error_in_the_syncs_words(django_user_model, gateways):
    client = staff(django_user_model, "view_connection", "run_sync")
    port = closed_port()
    down = Connection.objects.create(name="down", port=port, client_id=CLIENT_ID)

    response = client.post(reverse("admin:ibkr_sync_connection_test", args=[down.pk]))

    (message,) = said(response)
    assert message.startswith(
        f"Connection down: Cannot connect to the IB gateway at 127.0.0.1:{port}"
    )


def test_the_action_tests_each_selected_connection(django_user_model, gateways):
    client = staff(django_user_model, "view_connection", "run_sync")
    down = Connection.objects.create(name="down", port=closed_port(), client_id=CLIENT_ID)
    chosen = [gateways["office"].pk, down.pk]

    response = client.post(
        LIST, {"action": "test_connections", "_selected_action": chosen}, follow=True
    )

    messages = said(response)
    assert len(messages) == 2
    assert messages[0].startswith("Connection down: Cannot connect to the IB gateway")
    assert messages[1].endswith(f"ok: server version {negotiated_version()}, accounts U2000002")


@pytest.mark.parametrize(
    "grant", [("view_connection",), ("run_sync",), ("view_connection", "change_connection")]
)
def test_testing_needs_view_connection_and_run_sync(django_user_model, gateways, grant):
    client = staff(django_user_model, *grant)
    home = gateways["home"]

    response = client.post(reverse("admin:ibkr_sync_connection_test", args=[home.pk]))

    assert response.status_code == 403
    if "view_connection" in grant:
        assert "Test connection" not in client.get(change_url(home)).text
        assert "test_connections" not in client.get(LIST).text


def test_viewing_is_not_editing(django_user_model, gateways):
    client = staff(django_user_model, "view_connection")
    home = gateways["home"]

    response = client.post(
        change_url(home), {"name": "renamed", "kind": "tws", "host": "x", "port": "1",
                           "client_id": "1"},
    )  # fmt: skip

    assert response.status_code == 403
    assert Connection.objects.get(pk=home.pk).name == "home"


def test_sync_now_offers_the_enabled_connections_and_syncs_the_chosen_one(
    django_user_model, gateways
):
    client = staff(django_user_model, "run_sync", "view_syncrun")
    Connection.objects.create(name="attic", port=closed_port(), enabled=False)

    page = client.get(reverse("admin:ibkr_sync_syncrun_changelist")).text
    response = client.post(SYNC_NOW, {"connection": "office"})

    assert 'name="connection"' in page
    assert '<option value="home">' in page and '<option value="office">' in page
    assert 'value="attic"' not in page
    run = SyncRun.objects.get()
    assert (run.connection_name, run.trigger, run.status) == ("office", "admin", "success")
    (message,) = said(response)
    assert f"Sync #{run.pk}</a> of connection office finished: 1 positions" in message
    assert set(Position.objects.values_list("account__external_id", flat=True)) == {"U2000002"}


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ("", "Sync not started: Several IBKR connections are configured"),
        ("nowhere", "Sync not started: No IBKR connection is named 'nowhere'"),
        ("attic", "Sync not started: Connection attic is disabled"),
    ],
)
def test_sync_now_of_a_connection_it_cannot_sync_starts_nothing(
    django_user_model, gateways, connection, message
):
    client = staff(django_user_model, "run_sync")
    Connection.objects.create(name="attic", port=closed_port(), enabled=False)

    response = client.post(SYNC_NOW, {"connection": connection})

    (said_,) = said(response)
    assert said_.startswith(message)
    assert not SyncRun.objects.exists()


def test_with_one_connection_sync_now_needs_no_choice(django_user_model, gateways):
    client = staff(django_user_model, "run_sync", "view_syncrun")
    gateways["office"].delete()

    page = client.get(reverse("admin:ibkr_sync_syncrun_changelist")).text
    assert "Sync now from IBKR" in page
    client.post(SYNC_NOW)

    assert 'name="connection"' not in page
    assert SyncRun.objects.get().connection_name == "home"
