"""The gateway adapter with the real IB client over TCP against the simulator."""

import asyncio
import socket
import sys
import threading
import time
from decimal import Decimal

import pytest

from ibkr_sync.exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    IncompleteSnapshot,
    UnknownAccount,
)
from ibkr_sync.gateway import IbkrGateway
from ibkr_sync.testing import WireClient
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = pytest.mark.integration


def by_con_id(snapshot):
    return {p.con_id: p for p in snapshot.positions}


def test_reads_accounts_and_positions_with_exact_decimals(ibkr):
    snapshot = IbkrGateway().fetch_positions()

    assert snapshot.accounts == (ACCOUNT, OTHER, EMPTY)
    positions = by_con_id(snapshot)
    assert len(positions) == 4
    tsla = positions[76792991]
    assert tsla.quantity == Decimal("0.12345678")
    assert str(tsla.quantity) == "0.12345678"
    assert tsla.average_cost == Decimal("242.123456")
    es = positions[495512551]
    assert (es.quantity, es.sec_type, es.multiplier) == (Decimal(-2), "FUT", "50")
    assert es.last_trade_date == "20261218"
    spy = positions[700001]
    assert (spy.account, spy.right, spy.strike) == (OTHER, "C", Decimal(600))
    assert spy.local_symbol == "SPY   261218C00600000"


def test_account_filter(ibkr):
    snapshot = IbkrGateway().fetch_positions(OTHER)
    assert snapshot.accounts == (OTHER,)
    assert [p.con_id for p in snapshot.positions] == [700001]


def test_unknown_account(ibkr):
    with pytest.raises(UnknownAccount, match="U9999999 is not managed"):
        IbkrGateway().fetch_positions("U9999999")


def test_positions_closed_during_the_session_arrive_as_zero_rows_and_are_dropped(ibkr):
    ibkr.remove_position(ACCOUNT, 76792991)
    snapshot = IbkrGateway().fetch_positions()
    assert 76792991 not in by_con_id(snapshot)
    assert len(snapshot.positions) == 3


def test_gateway_down_names_host_port_and_checklist(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", free_port
    with pytest.raises(GatewayUnavailable) as caught:
        IbkrGateway().fetch_positions()
    message = str(caught.value)
    assert f"127.0.0.1:{free_port}" in message
    assert "connection refused" in message
    assert "logged in" in message and "trusted IPs" in message


def test_client_id_in_use_fails_promptly_and_names_the_setting(ibkr):
    holder = WireClient("127.0.0.1", ibkr.port).connect_api(client_id=17)
    try:
        started = time.monotonic()
        with pytest.raises(ClientIdInUse, match="IBKR_CLIENT_ID"):
            IbkrGateway().fetch_positions()
        assert time.monotonic() - started < 2, "326 is reported at once, not after a timeout"
    finally:
        holder.close()
    assert len(IbkrGateway().fetch_positions().positions) == 4, "the id is free again"


def test_dropped_connection_mid_positions(ibkr):
    ibkr.set_faults(drop_after_positions=2)
    with pytest.raises(GatewayUnavailable, match=r"lost|closed"):
        IbkrGateway().fetch_positions()


def test_hang_times_out_within_the_request_timeout(ibkr, settings):
    settings.IBKR_REQUEST_TIMEOUT = 0.5
    ibkr.set_faults(hang_positions=True)
    started = time.monotonic()
    with pytest.raises(GatewayTimeout, match=r"within 0\.5 s"):
        IbkrGateway().fetch_positions()
    assert time.monotonic() - started < 2


def test_malformed_position_message_makes_the_snapshot_incomplete(ibkr):
    ibkr.set_faults(malformed_position=True, malformed_index=1)
    with pytest.raises(IncompleteSnapshot, match="could not be read"):
        IbkrGateway().fetch_positions()


def test_ib_error_on_positions_is_a_gateway_error(ibkr):
    ibkr.set_faults(error_on_positions=(321, "Error validating request"))
    with pytest.raises(GatewayError, match="321"):
        IbkrGateway().fetch_positions()


def test_connectivity_lost_error_on_connect_is_unavailable(ibkr):
    ibkr.set_faults(error_on_connect=(1100, "Connectivity between IB and TWS has been lost."))
    with pytest.raises(GatewayUnavailable, match="1100"):
        IbkrGateway().fetch_positions()


def test_reset_connection_is_unavailable(ibkr):
    ibkr.set_faults(refuse_connections=True)
    with pytest.raises(GatewayUnavailable):
        IbkrGateway().fetch_positions()


def test_works_from_a_thread_without_event_loop_and_leaves_nothing_behind(ibkr):
    before = set(threading.enumerate())
    outcome = {}

    def worker():
        outcome["snapshot"] = IbkrGateway().fetch_positions()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert len(outcome["snapshot"].positions) == 4
    assert set(threading.enumerate()) <= before
    assert _eventually(lambda: ibkr.active_client_ids == []), "no connection left open"


def test_works_inside_a_running_event_loop(ibkr):
    async def view():
        return IbkrGateway().fetch_positions()

    assert len(asyncio.run(view()).positions) == 4


def _eventually(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_quantities_come_from_the_wire_text_not_a_float(ibkr):
    # 21 significant digits: a float would give 12345678901.123457
    ibkr.upsert_position(sim_position(con_id=42, symbol="BIG", quantity="12345678901.1234567891"))
    snapshot = IbkrGateway().fetch_positions(ACCOUNT)
    assert by_con_id(snapshot)[42].quantity == Decimal("12345678901.1234567891")


def test_uses_the_configured_client_library(ibkr, settings):
    IbkrGateway().fetch_positions()
    assert settings.IBKR_CLIENT_LIBRARY in sys.modules


def test_the_library_decoding_fallback_reads_the_same_positions(ibkr, monkeypatch):
    """Positions come off the wire through our decoder; a library version without a
    decoder table falls back to its position events, with the same result."""
    ours = IbkrGateway().fetch_positions()
    monkeypatch.setattr("ibkr_sync.sources.tws.decoding._MSG_POSITION", -1)  # "no such handler"

    library = IbkrGateway().fetch_positions()

    assert by_con_id(library) == by_con_id(ours)
    assert len(ours.positions) == 4
