"""A timeout says how long was waited and what set it: the connection's own field (by its
admin label and the connection's name) where it sets one, else the setting. The real
client over TCP against the bundled simulator, or a port that never answers."""

from __future__ import annotations

import socket

import pytest

from ibkr_sync import services
from ibkr_sync.exceptions import GatewayTimeout
from ibkr_sync.models import Connection, SyncRun

from .conftest import ACCOUNT

pytestmark = pytest.mark.integration


@pytest.fixture
def silent_port():
    """A port that takes the connection and never says a word (a gateway stuck in its
    "accept incoming connection?" dialog)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def settings_timeouts(settings):
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_CONNECT_TIMEOUT = 0.6
    settings.IBKR_REQUEST_TIMEOUT = 0.7
    settings.IBKR_VALUES_TIMEOUT = 0.8
    return settings


def connection(port: int, **timeouts) -> Connection:
    return Connection.objects.create(
        name="slow", host="127.0.0.1", port=port, client_id=17, **timeouts
    )


def failed_with(error: pytest.ExceptionInfo) -> str:
    """The failure's message, which the run records word for word."""
    message = str(error.value)
    assert SyncRun.objects.get().error_message == message
    return message


@pytest.mark.django_db
def test_the_connection_s_own_connect_timeout_is_named(settings_timeouts, silent_port):
    connection(silent_port, connect_timeout=0.5)

    with pytest.raises(GatewayTimeout) as caught:
        services.sync_positions(trigger="command", connection="slow")

    message = failed_with(caught)
    assert "did not connect within 0.5 s, connection slow's connect timeout;" in message
    assert "IBKR_" not in message


@pytest.mark.django_db
def test_the_setting_is_named_where_the_connection_sets_no_timeout(settings_timeouts, silent_port):
    connection(silent_port, request_timeout=5)

    with pytest.raises(GatewayTimeout) as caught:
        services.sync_positions(trigger="command", connection="slow")

    assert "did not connect within 0.6 s, IBKR_CONNECT_TIMEOUT;" in failed_with(caught)


@pytest.mark.django_db
def test_the_connection_s_own_request_timeout_is_named(settings_timeouts, simulator):
    simulator.set_faults(hang_positions=True)
    connection(simulator.port, connect_timeout=3, request_timeout=0.5)

    with pytest.raises(GatewayTimeout) as caught:
        services.sync_positions(trigger="command", connection="slow")

    message = failed_with(caught)
    assert "did not send positions within 0.5 s, connection slow's request timeout;" in message
    assert "IBKR_" not in message


@pytest.mark.django_db
def test_the_settings_gateway_names_the_settings(settings_timeouts, ibkr):
    settings_timeouts.IBKR_REQUEST_TIMEOUT = 0.5
    ibkr.set_faults(hang_positions=True)

    with pytest.raises(GatewayTimeout) as caught:
        services.sync_positions(trigger="command")

    assert "did not send positions within 0.5 s, IBKR_REQUEST_TIMEOUT;" in failed_with(caught)


@pytest.mark.django_db
def test_an_account_s_values_name_the_connection_s_values_timeout(settings_timeouts, simulator):
    """The connection sets the values' timeout and not the request's: each is named as
    what set it."""
    settings_timeouts.IBKR_REQUEST_TIMEOUT = 10
    simulator.set_faults(values_hang={ACCOUNT})
    connection(simulator.port, connect_timeout=3, values_timeout=0.5)

    result = services.sync_positions(trigger="command", connection="slow")

    outcome = result.account_values[ACCOUNT]
    assert outcome["status"] == "missing"
    assert (
        "IBKR did not send the account's values within 0.5 s (connection slow's values "
        "timeout, or its share of IBKR_REQUEST_TIMEOUT); its stored values were kept"
    ) in outcome["reason"]
