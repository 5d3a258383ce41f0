"""The gateway simulator, driven through the raw-socket client (no ib_insync, no database).

Each test starts its own simulator in a background thread; the raw client checks the
exact bytes ib_insync's decoder will see, e.g. that fractional quantities are not rounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest

from ibkr_sync.testing import (
    DUPLICATE_CLIENT_ID_MESSAGE,
    SEC_TYPES,
    Faults,
    GatewaySimulator,
    Portfolio,
    PortfolioError,
    SimPosition,
    SimulatorThread,
    WireClient,
    WireError,
    generate_portfolio,
    load_portfolio,
    load_sample_portfolio,
    save_portfolio,
)
from ibkr_sync.testing.wire import (
    ClientMsg,
    FrameBuffer,
    ServerMsg,
    make_message,
    parse_error_message,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = load_sample_portfolio()
EMPTY_ACCOUNT = "DU5555555"


@pytest.fixture
def sim() -> Iterator[GatewaySimulator]:
    with GatewaySimulator(load_sample_portfolio()) as simulator:
        yield simulator


def connect(sim: GatewaySimulator, client_id: int = 1, **versions: int) -> WireClient:
    return WireClient(sim.host, sim.port, timeout=3).connect_api(client_id, **versions)


def by_key(rows) -> dict[tuple[str, int], object]:
    return {(row.account, int(row.con_id)): row for row in rows}


# -- handshake and session ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_min", "client_max", "expected"),
    [(157, 176, 176), (157, 178, 178), (157, 200, 178), (100, 150, 150)],
)
def test_handshake_picks_highest_common_version(sim, client_min, client_max, expected):
    with WireClient(sim.host, sim.port, timeout=3) as client:
        assert client.handshake(client_min, client_max) == expected
        assert client.connection_time.endswith("UTC")


def test_handshake_without_common_version_is_closed(sim):
    with WireClient(sim.host, sim.port, timeout=3) as client, pytest.raises(WireError):
        client.handshake(180, 190)


def test_garbage_instead_of_api_prefix_is_closed(sim):
    with socket.create_connection(sim.address, timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(100) == b""


def test_start_api_sends_next_valid_id_and_managed_accounts(sim):
    with connect(sim, client_id=5) as client:
        assert client.server_version == 178
        assert client.next_valid_id == 1
        assert client.managed_accounts == ["DU1234567", "DU7654321", EMPTY_ACCOUNT]
        assert sim.active_client_ids == [5]


def test_many_clients_one_after_another(sim):
    for _ in range(15):
        with connect(sim, client_id=1) as client:
            assert client.request_positions().end_received
    assert sim.connections_accepted == 15


def test_concurrent_clients(sim):
    def session(client_id: int) -> int:
        with connect(sim, client_id=client_id) as client:
            result = client.request_positions()
            assert result.end_received
            return len(result.positions)

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(session, range(1, 9)))
    assert counts == [25] * 8


def test_duplicate_client_id_gets_326_and_is_closed(sim):
    with connect(sim, client_id=1) as first:
        second = WireClient(sim.host, sim.port, timeout=3).connect()
        second.handshake()
        with pytest.raises(WireError) as excinfo:
            second.start_api(1)
        assert excinfo.value.code == 326
        assert DUPLICATE_CLIENT_ID_MESSAGE in str(excinfo.value)
        assert second.is_closed_by_peer(timeout=2)
        second.close()
        # the first session is unaffected
        assert first.request_positions().end_received
    # once the first session is gone the id is free again
    deadline = time.monotonic() + 2
    while sim.active_client_ids and time.monotonic() < deadline:
        time.sleep(0.01)
    with connect(sim, client_id=1) as again:
        assert again.managed_accounts


@pytest.mark.parametrize(("max_version", "field_count"), [(165, 5), (176, 6)])
def test_error_layout_follows_server_version(sim, max_version, field_count):
    """From version 166 the error carries advancedOrderRejectJson; ib_insync unpacks it."""
    with connect(sim, client_id=1):
        client = WireClient(sim.host, sim.port, timeout=3).connect()
        client.handshake(157, max_version)
        client.send(ClientMsg.START_API, 2, 1, "")
        msg = client.recv()
        client.close()
    assert msg is not None
    assert msg.msg_id == ServerMsg.ERROR
    assert len(msg) == field_count
    assert (msg[1], msg[2], msg[3]) == ("2", "-1", "326")


# -- positions ----------------------------------------------------------------------------


def test_positions_are_sent_exactly(sim):
    with connect(sim) as client:
        result = client.request_positions()
    assert result.end_received
    assert not result.malformed
    assert len(result.positions) == len(SAMPLE.positions) == 25
    rows = by_key(result.positions)
    for pos in SAMPLE.positions:
        row = rows[pos.key]
        assert row.quantity == format(pos.quantity, "f")
        assert row.average_cost == format(pos.average_cost, "f")
        assert (row.symbol, row.sec_type, row.currency) == (pos.symbol, pos.sec_type, pos.currency)
    msft = rows[("DU1234567", 272093)]
    assert msft.quantity == "3.14159265"
    assert rows[("DU1234567", 320227571)].quantity == "0.5"
    assert rows[("DU1234567", 479624278)].quantity == "0.12345678"
    option = rows[("DU1234567", 530041890)]
    assert (option.sec_type, option.strike, option.right) == ("OPT", "200", "C")
    assert (option.multiplier, option.last_trade_date) == ("100", "20270115")
    # the same contract held in two accounts is reported once per account
    assert rows[("DU7654321", 265598)].quantity == "10"


def test_account_without_positions(sim):
    with connect(sim) as client:
        assert EMPTY_ACCOUNT in client.managed_accounts
        result = client.request_positions()
        assert all(row.account != EMPTY_ACCOUNT for row in result.positions)
        client.send(ClientMsg.REQ_POSITIONS_MULTI, 1, 9, EMPTY_ACCOUNT, "")
        assert [m.msg_id for m in client.recv_until(ServerMsg.POSITION_MULTI_END)] == [72]
        client.send(ClientMsg.REQ_ACCT_DATA, 2, True, EMPTY_ACCOUNT)
        messages = client.recv_until(ServerMsg.ACCT_DOWNLOAD_END)
    assert messages[-1].fields == ("54", "1", EMPTY_ACCOUNT)
    assert ServerMsg.PORTFOLIO_VALUE not in {m.msg_id for m in messages}


def test_every_request_ib_insync_sends_while_connecting_is_answered(sim):
    """IB.connect(readonly=True) waits for each of these; a missing end message is a hang."""
    with connect(sim) as client:
        client.send(ClientMsg.REQ_POSITIONS, 1)
        client.send(ClientMsg.REQ_ACCT_DATA, 2, True, "DU1234567")
        for req_id, account in enumerate(client.managed_accounts, start=1):
            client.send(ClientMsg.REQ_ACCOUNT_UPDATES_MULTI, 1, req_id, account, "", False)
        client.send(ClientMsg.REQ_EXECUTIONS, 3, 10, 0, "", "", "", "", "", "")
        client.send(ClientMsg.REQ_OPEN_ORDERS, 1)
        client.send(ClientMsg.REQ_ALL_OPEN_ORDERS, 1)
        client.send(ClientMsg.REQ_COMPLETED_ORDERS, False)
        client.send(ClientMsg.REQ_CURRENT_TIME, 1)
        client.send(ClientMsg.REQ_MANAGED_ACCTS, 1)
        client.send(ClientMsg.REQ_IDS, 1, 1)
        client.send(1, 11, 99, 265598, "AAPL", "STK")  # reqMktData: unsupported, ignored
        client.send(ClientMsg.REQ_ACCOUNT_SUMMARY, 1, 11, "All", "NetLiquidation,AccountType")
        client.send(ClientMsg.REQ_CONTRACT_DATA, 8, 12, 0, "AAPL", "STK")
        messages = client.recv_until(ServerMsg.ERROR)
    ends = [m.fields for m in messages if m.msg_id not in (6, 7, 8, 61, 63, 73)]
    current_time = ends.pop(9)
    assert current_time[:2] == ("49", "1")
    assert abs(int(current_time[2]) - time.time()) < 5
    assert ends == [
        ("62", "1"),
        ("54", "1", "DU1234567"),
        ("74", "1", "1"),
        ("74", "1", "2"),
        ("74", "1", "3"),
        ("55", "1", "10"),
        ("53", "1"),
        ("53", "1"),
        ("102",),
        ("15", "1", "DU1234567,DU7654321,DU5555555"),
        ("9", "1", "1"),
        ("64", "1", "11"),
        ("4", "2", "12", "200", "No security definition has been found for the request", ""),
    ]
    portfolio_rows = [m for m in messages if m.msg_id == ServerMsg.PORTFOLIO_VALUE]
    assert len(portfolio_rows) == 16
    assert all(len(m) == 20 for m in portfolio_rows)  # Decoder.updatePortfolio unpacks 20
    values = {(m[2], m[4]): m[3] for m in messages if m.msg_id == ServerMsg.ACCT_VALUE}
    assert values[("AccountCode", "")] == "DU1234567"
    summary = [m for m in messages if m.msg_id == ServerMsg.ACCOUNT_SUMMARY]
    assert len(summary) == 6  # 3 accounts x 2 tags


def test_closed_positions_are_reported_as_zero_until_reset(sim):
    new = SimPosition("DU7654321", 999001, "TSLA", exchange="NASDAQ", quantity="0.25")
    with connect(sim) as client:
        client.request_positions()
        client.send(ClientMsg.CANCEL_POSITIONS, 1)
        sim.upsert_position(new)
        assert sim.remove_position("DU1234567", 272093)
        assert not sim.remove_position("DU1234567", 272093)
        sim.upsert_position(SAMPLE.positions[0].with_quantity("101.5"))
        rows = by_key(client.request_positions().positions)
    assert len(rows) == 26
    assert rows[("DU1234567", 272093)].quantity == "0"
    assert rows[("DU7654321", 999001)].quantity == "0.25"
    assert rows[("DU1234567", 265598)].quantity == "101.5"

    sim.set_positions([new], accounts=["DU7654321"])
    with connect(sim) as client:
        assert client.managed_accounts == ["DU7654321"]
        assert [r.con_id for r in client.request_positions().positions] == ["999001"]


def test_removed_then_readded_position_is_not_reported_twice(sim):
    pos = SAMPLE.positions[1]
    sim.remove_position(pos.account, pos.con_id)
    sim.upsert_position(pos)
    with connect(sim) as client:
        rows = [r for r in client.request_positions().positions if int(r.con_id) == pos.con_id]
    assert [r.quantity for r in rows] == ["3.14159265"]


def test_report_closed_as_zero_can_be_disabled():
    with GatewaySimulator(SAMPLE, report_closed_as_zero=False) as sim:
        sim.remove_position("DU1234567", 272093)
        with connect(sim) as client:
            assert len(client.request_positions().positions) == 24


def test_position_changes_are_pushed_until_cancel_positions(sim):
    with connect(sim) as client:
        client.request_positions()
        sim.remove_position("DU1234567", 265598)
        pushed = client.recv()
        assert pushed is not None
        assert (pushed.msg_id, pushed[3], pushed[14]) == (61, "265598", "0")
        client.send(ClientMsg.CANCEL_POSITIONS, 1)
        client.send(ClientMsg.REQ_CURRENT_TIME, 1)
        assert client.recv().msg_id == ServerMsg.CURRENT_TIME  # cancel processed
        sim.upsert_position(SimPosition("DU1234567", 5, "X", quantity="1"))
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.2)


def test_accounts_can_change_between_sessions(sim):
    sim.set_accounts(["DU1234567", "DU7654321", "DU0000009"])
    with connect(sim) as client:
        assert client.managed_accounts == ["DU1234567", "DU7654321", "DU0000009"]


# -- faults -------------------------------------------------------------------------------


def test_refuse_connections_resets_then_recovers(sim):
    sim.faults.refuse_connections = True
    client = WireClient(sim.host, sim.port, timeout=2)
    with pytest.raises((WireError, ConnectionError)):
        client.connect_api(1)
    client.close()
    sim.faults.refuse_connections = False
    with connect(sim) as client:
        assert client.managed_accounts


def test_stopped_simulator_refuses_and_restarts_on_same_port():
    sim = GatewaySimulator(SAMPLE)
    sim.start_in_thread()
    port = sim.port
    sim.stop_thread()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    sim.start_in_thread()
    try:
        assert sim.port == port
        with connect(sim) as client:
            assert client.request_positions().end_received
    finally:
        sim.stop_thread()


def test_drop_after_positions(sim):
    sim.faults = Faults(drop_after_positions=3)
    with connect(sim) as client:
        result = client.request_positions()
    assert len(result.positions) == 3
    assert not result.end_received
    assert result.closed


def test_hang_positions(sim):
    sim.set_faults(hang_positions=True)
    with connect(sim) as client:
        result = client.request_positions(timeout=0.3)
        assert not result.positions
        assert not result.end_received
        assert not result.closed
        # the session itself is alive; only positions hang
        client.send(ClientMsg.REQ_CURRENT_TIME, 1)
        assert client.recv().msg_id == ServerMsg.CURRENT_TIME


def test_message_delay(sim):
    with connect(sim) as client:
        sim.faults.message_delay = 0.02
        start = time.monotonic()
        result = client.request_positions()
        elapsed = time.monotonic() - start
    assert result.end_received
    assert elapsed >= 26 * 0.02


@pytest.mark.parametrize(("kind", "field_count"), [("quantity", 16), ("field_count", 15)])
def test_malformed_position(sim, kind, field_count):
    sim.set_faults(malformed_position=True, malformed_kind=kind)
    with connect(sim) as client:
        result = client.request_positions()
    assert result.end_received
    assert len(result.positions) == 24
    assert len(result.malformed) == 1
    bad = result.malformed[0]
    assert len(bad) == field_count
    if kind == "quantity":
        with pytest.raises(ValueError, match="could not convert"):
            float(bad[14])  # exactly what ib_insync's Decoder.position does


@pytest.mark.parametrize("code", [1100, 502, 504])
def test_error_on_connect_keeps_session(sim, code):
    sim.faults.error_on_connect = (code, "")
    with connect(sim) as client:
        msg = client.recv()
        error = parse_error_message(msg, client.server_version)
        assert (error.req_id, error.code) == (-1, code)
        assert error.message
        assert client.request_positions().end_received


def test_error_on_connect_326_behaves_like_duplicate_client_id(sim):
    sim.faults.error_on_connect = (326, "")
    client = WireClient(sim.host, sim.port, timeout=3)
    with pytest.raises(WireError) as excinfo:
        client.connect_api(42)
    assert excinfo.value.code == 326
    assert client.is_closed_by_peer()
    client.close()
    assert sim.active_client_ids == []


def test_error_on_positions(sim):
    sim.faults.error_on_positions = (321, "Error validating request")
    with connect(sim) as client:
        result = client.request_positions(timeout=0.3)
    assert [(e.req_id, e.code, e.message) for e in result.errors] == [
        (-1, 321, "Error validating request")
    ]
    assert not result.positions
    assert not result.end_received


# -- portfolio records, JSON and generator -------------------------------------------------


def test_sample_portfolio_is_realistic():
    types = {pos.sec_type for pos in SAMPLE.positions}
    assert set(SEC_TYPES) - {"IND"} <= types
    assert SAMPLE.all_accounts() == ["DU1234567", "DU7654321", EMPTY_ACCOUNT]
    assert any(pos.quantity == Decimal("3.14159265") for pos in SAMPLE.positions)


def test_json_round_trip_is_exact(tmp_path):
    portfolio = generate_portfolio(200, accounts=3, seed=7, empty_accounts=1)
    path = tmp_path / "portfolio.json"
    save_portfolio(portfolio, path)
    assert load_portfolio(path) == portfolio


def test_json_numbers_are_parsed_as_decimals(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"accounts": ["DU1", "DU2"], "positions": [{"account": "DU1", "con_id": 1, '
        '"symbol": "X", "quantity": 0.12345678, "average_cost": 1e2, "strike": 0}]}'
    )
    portfolio = load_portfolio(path)
    assert portfolio.positions[0].quantity == Decimal("0.12345678")
    assert format(portfolio.positions[0].average_cost, "f") == "100"
    assert portfolio.all_accounts() == ["DU1", "DU2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"positions": [{"account": "DU1", "symbol": "X"}]}', "missing position field"),
        ('{"positions": [{"account": "DU1", "con_id": 1, "symbol": "X", "qty": 1}]}', "qty"),
        (
            '{"positions": [{"account": "DU1", "con_id": 1, "symbol": "X", "quantity": "a"}]}',
            "quantity must be a number",
        ),
        (
            '{"positions": [{"account": "DU1", "con_id": 1, "symbol": "X"},'
            ' {"account": "DU1", "con_id": 1, "symbol": "Y"}]}',
            "duplicate con_id 1",
        ),
        ('{"positions": {}}', "'positions' must be a list"),
    ],
)
def test_bad_portfolio_file_has_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PortfolioError, match=message) as excinfo:
        load_portfolio(path)
    assert str(path) in str(excinfo.value)


def test_generator_count_uniqueness_types_and_determinism():
    portfolio = generate_portfolio(2_000, accounts=4, seed=3)
    assert len(portfolio.positions) == 2_000
    assert len({pos.con_id for pos in portfolio.positions}) == 2_000
    assert {pos.sec_type for pos in portfolio.positions} == set(SEC_TYPES)
    assert len(portfolio.all_accounts()) == 4
    assert generate_portfolio(2_000, accounts=4, seed=3) == portfolio
    assert generate_portfolio(2_000, accounts=4, seed=4) != portfolio
    assert {pos.sec_type for pos in generate_portfolio(11, seed=9).positions} == set(SEC_TYPES)
    options = [pos for pos in portfolio.positions if pos.sec_type in ("OPT", "FOP")]
    assert all(p.multiplier and p.strike > 0 and p.right in "CP" for p in options)
    assert all(len(p.last_trade_date) == 8 for p in options)
    fractional = [p for p in portfolio.positions if p.sec_type == "STK" and p.quantity % 1]
    assert fractional


def test_generated_10k_positions_are_served_quickly():
    start = time.monotonic()
    portfolio = generate_portfolio(10_000, accounts=3, seed=0)
    with GatewaySimulator(portfolio) as sim, connect(sim) as client:
        result = client.request_positions(timeout=10)
    assert result.end_received
    assert len(result.positions) == 10_000
    assert time.monotonic() - start < 5
    rows = by_key(result.positions)
    for pos in portfolio.positions[:500]:
        assert rows[pos.key].quantity == format(pos.quantity, "f")


def test_sim_position_validation():
    with pytest.raises(PortfolioError, match="con_id"):
        SimPosition("DU1", 0, "X")
    with pytest.raises(PortfolioError, match="last_trade_date"):
        SimPosition("DU1", 1, "X", last_trade_date="2024-01-01")
    pos = SimPosition("DU1", "7", "X", multiplier=100, quantity=0.1, strike=5)
    assert (pos.con_id, pos.multiplier, pos.quantity, pos.strike) == (
        7,
        "100",
        Decimal("0.1"),
        Decimal(5),
    )


def test_frame_buffer_handles_split_and_merged_frames():
    data = make_message(61, 3, "a") + make_message(62, 1)
    buffer = FrameBuffer()
    payloads = [p for i in range(len(data)) for p in buffer.feed(data[i : i + 1])]
    assert payloads == [b"61\x003\x00a\x00", b"62\x001\x00"]
    assert buffer.feed(data) == payloads


# -- runners ------------------------------------------------------------------------------


def test_thread_runner_leaves_nothing_behind():
    before = set(threading.enumerate())
    sim = GatewaySimulator(SAMPLE)
    with SimulatorThread(sim) as running:
        assert running is sim
        client = connect(sim)  # still connected when the simulator stops
        assert sim.active_client_ids == [1]
    assert client.is_closed_by_peer(timeout=2)
    client.close()
    assert set(threading.enumerate()) == before
    assert not sim.is_running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(sim.address, timeout=1)


def test_disconnect_all_drops_sessions_but_keeps_listening(sim):
    client = connect(sim)
    assert sim.disconnect_all() == 1
    assert client.is_closed_by_peer(timeout=2)
    client.close()
    with connect(sim) as again:
        assert again.managed_accounts


def test_async_api():
    async def main() -> int:
        sim = GatewaySimulator(SAMPLE)
        server = asyncio.create_task(sim.serve_forever())
        while not sim.is_running:
            await asyncio.sleep(0.01)

        def session() -> int:
            with connect(sim) as client:
                return len(client.request_positions().positions)

        count = await asyncio.to_thread(session)
        await sim.stop()
        await asyncio.wait_for(server, 2)
        async with GatewaySimulator(SAMPLE, port=0) as second:
            assert second.port > 0
        return count

    assert asyncio.run(main()) == 25


@pytest.mark.processes
def test_management_command_serves_and_stops_on_sigterm(tmp_path):
    portfolio = tmp_path / "p.json"
    save_portfolio(Portfolio(["DU1", "DU2"], [SimPosition("DU1", 1, "X", quantity="2")]), portfolio)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "manage.py", "ibkr_simulator", "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--positions", str(portfolio)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("IB Gateway simulator listening on 127.0.0.1:"), line
        assert "(1 positions, accounts: DU1, DU2)" in line
        port = int(line.split(":")[1].split()[0])
        with WireClient("127.0.0.1", port, timeout=3).connect_api(1) as client:
            assert [r.quantity for r in client.request_positions().positions] == ["2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    bad = subprocess.run(
        [*command, "--positions", str(tmp_path / "missing.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode != 0
    assert "portfolio file not found" in bad.stderr


def test_json_file_written_by_hand_matches_sample_schema():
    raw = json.loads((REPO_ROOT / "ibkr_sync/testing/sample_portfolio.json").read_text())
    assert set(raw) == {"accounts", "positions"}
    assert len(raw["positions"]) == 25


# -- account values ---------------------------------------------------------------------------


def _download(client: WireClient, account: str) -> tuple[dict, list]:
    client.send(ClientMsg.REQ_ACCT_DATA, 2, True, account)
    messages = client.recv_until(ServerMsg.ACCT_DOWNLOAD_END)
    texts = ("AccountCode", "AccountType", "AccountReady", "Currency")
    values = {
        (m[2], m[4]): Decimal(m[3])
        for m in messages
        if m.msg_id == ServerMsg.ACCT_VALUE and m[2] not in texts
    }
    rows = [m for m in messages if m.msg_id == ServerMsg.PORTFOLIO_VALUE]
    client.send(ClientMsg.REQ_ACCT_DATA, 2, False, account)
    return values, rows


def test_account_values_add_up_with_ibkrs_exchange_rates(sim):
    account = "DU1234567"
    sim.set_cash(account, {"USD": "-100.5", "EUR": "2000", "JPY": "150000"})
    with connect(sim) as client:
        values, rows = _download(client, account)
    currencies = {c for (tag, c) in values if tag == "CashBalance" and c != "BASE"}
    assert currencies >= {"USD", "EUR", "JPY"}
    cash_base = sum(values["CashBalance", c] * values["ExchangeRate", c] for c in currencies)
    assert values["TotalCashValue", "USD"] == cash_base.quantize(Decimal("0.01"))
    by_currency, futures = {}, {}
    for row in rows:  # market value per row, in the position's currency
        sec_type, currency, market = row[4], row[10], Decimal(row[15])
        if sec_type == "FUT":  # a notional: only the P&L is equity
            futures[currency] = futures.get(currency, 0) + Decimal(row[17])
        elif sec_type == "CFD":
            by_currency[currency] = by_currency.get(currency, 0) + Decimal(row[17])
        elif sec_type != "CASH":  # a forex position is its currency's cash, counted there
            by_currency[currency] = by_currency.get(currency, 0) + market
    assert {row[4] for row in rows} >= {"FUT", "CASH", "BOND"}
    value_base = sum(v * values["ExchangeRate", c] for c, v in by_currency.items())
    futures_base = sum(v * values["ExchangeRate", c] for c, v in futures.items())
    assert values["FuturesPNL", "BASE"] == futures_base.quantize(Decimal("0.01"))
    assert values["TotalCashValue", "USD"] == (cash_base + futures_base).quantize(Decimal("0.01"))
    assert values["NetLiquidation", "USD"] == (
        values["TotalCashValue", "USD"] + value_base.quantize(Decimal("0.01"))
    )
    assert values["ExchangeRate", "BASE"] == 1


def test_account_values_count_bonds_at_percent_of_par_and_futures_by_their_pnl(sim):
    """IBKR quotes a bond in percent of par (its value is quantity x price / 100; its
    average cost, as every position's, the cost of one unit of its quantity, 1 of face)
    and states a future's notional as its row's market value, but counts only the
    future's P&L in the net liquidation and none of it in the gross position value."""
    account = "DU1234567"
    sim.set_cash(account, {"USD": "1000"})
    with connect(sim) as client:
        before, rows = _download(client, account)
        bond = next(row for row in rows if row[4] == "BOND")
        future = next(row for row in rows if row[4] == "FUT")
        sim.set_market_price(account, int(future[2]), Decimal(future[14]) + 10)
        after, moved = _download(client, account)
        sim.set_market_price(account, int(bond[2]), "99.765")
        bond_moved = next(row for row in _download(client, account)[1] if row[4] == "BOND")
    assert [Decimal(bond[i]) for i in (13, 14, 15, 16)] == [
        10000,
        Decimal("98.765"),
        Decimal("9876.50"),
        Decimal("0.98765"),
    ]
    assert Decimal(bond[17]) == 0  # bought at the price it is worth
    assert Decimal(bond_moved[15]) == Decimal("9976.50")
    assert Decimal(bond_moved[17]) == 100  # 1 point of 10,000 face
    assert Decimal(future[15]) == Decimal(future[13]) * Decimal(future[14]) * 50  # notional
    future = next(row for row in moved if row[4] == "FUT")
    assert Decimal(future[17]) == 10 * 50  # 1 contract, 10 points, multiplier 50
    assert after["NetLiquidation", "USD"] - before["NetLiquidation", "USD"] == 500
    assert after["FuturesPNL", "USD"] == 500
    assert after["TotalCashValue", "USD"] == before["TotalCashValue", "USD"] + 500
    assert after["GrossPositionValue", "USD"] == before["GrossPositionValue", "USD"]
    assert before["GrossPositionValue", "USD"] < 200_000 < Decimal(future[15])


def test_prices_move_on_demand_and_only_the_values_change(sim):
    account = "DU1234567"
    with connect(sim) as client:
        before = {row[2]: row for row in _download(client, account)[1]}
        sim.move_prices("1.5")
        after = {row[2]: row for row in _download(client, account)[1]}
        client.send(ClientMsg.REQ_POSITIONS, 1)
        positions = client.recv_until(ServerMsg.POSITION_END)
    con_id = next(iter(before))
    assert Decimal(after[con_id][14]) == (Decimal(before[con_id][14]) * Decimal("1.5")).quantize(
        Decimal("0.00000001")
    )
    assert after[con_id][13] == before[con_id][13]  # quantity
    assert after[con_id][16] == before[con_id][16]  # average cost
    assert len([m for m in positions if m.msg_id == ServerMsg.POSITION_DATA]) == len(SAMPLE)


def test_one_account_subscription_at_a_time_across_clients(sim):
    with connect(sim, 1) as first, connect(sim, 2) as second:
        first.send(ClientMsg.REQ_ACCT_DATA, 2, True, "DU1234567")
        first.recv_until(ServerMsg.ACCT_DOWNLOAD_END)
        second.send(ClientMsg.REQ_ACCT_DATA, 2, True, "DU7654321")
        refused = second.recv_until(ServerMsg.ERROR)[-1]
        assert parse_error_message(refused, second.server_version).code == 2101
        # The same client switching accounts is told its old subscription ended.
        first.send(ClientMsg.REQ_ACCT_DATA, 2, True, "DU7654321")
        replaced = first.recv_until(ServerMsg.ERROR)[-1]
        assert parse_error_message(replaced, first.server_version).code == 2100
        first.send(ClientMsg.REQ_ACCT_DATA, 2, False, "DU7654321")
        second.send(ClientMsg.REQ_ACCT_DATA, 2, True, "DU7654321")
        assert second.recv_until(ServerMsg.ACCT_DOWNLOAD_END)[-1][2] == "DU7654321"


def test_prices_drift_between_syncs_when_asked_to():
    drifting = GatewaySimulator(load_sample_portfolio(), price_drift="0.02")
    with drifting, connect(drifting) as client:
        first = {row[2]: Decimal(row[14]) for row in _download(client, "DU1234567")[1]}
        second = {row[2]: Decimal(row[14]) for row in _download(client, "DU1234567")[1]}
    assert first.keys() == second.keys() and first != second
    assert all(abs(second[k] / first[k] - 1) <= Decimal("0.0201") for k in first if first[k])


# -- scripted answers and how they are cut into segments ---------------------------------------


def _raw_download(
    client: WireClient, account: str, after_end: int = 0
) -> tuple[list[bytes], list[list[str]]]:
    """The bytes of an account's download as each recv() returned them, and its frames
    (up to its end, and `after_end` frames more)."""
    client.send(ClientMsg.REQ_ACCT_DATA, 2, True, account)
    end = ["54", "1", account]
    chunks: list[bytes] = []
    buffer = FrameBuffer()
    frames: list[list[str]] = []
    client.sock.settimeout(3)
    while end not in frames or len(frames) - frames.index(end) - 1 < after_end:
        chunks.append(client.sock.recv(1 << 16))
        assert chunks[-1], "the simulator closed the connection"
        frames += [p.decode().split("\0")[:-1] for p in buffer.feed(chunks[-1])]
    client.send(ClientMsg.REQ_ACCT_DATA, 2, False, account)
    return chunks, frames


def _without_time(frames: list[list[str]]) -> list[list[str]]:
    return [f for f in frames if f[0] != str(int(ServerMsg.ACCT_UPDATE_TIME))]


@pytest.mark.parametrize(("size", "delay"), [(1, 0.0), (7, 0.0), (32, 0.005), (200, 0.02)])
def test_segmentation_cuts_the_same_bytes_into_other_segments(sim, size, delay):
    with connect(sim) as client:
        whole, frames = _raw_download(client, EMPTY_ACCOUNT)
        sim.set_faults(segment_size=size, segment_delay=delay)
        started = time.monotonic()
        pieces, cut = _raw_download(client, EMPTY_ACCOUNT)
        elapsed = time.monotonic() - started
    assert _without_time(cut) == _without_time(frames)
    count = -(-len(b"".join(whole)) // size)  # the pieces written
    assert len(pieces) > 1
    if delay:  # pieces that far apart arrive alone (allowing for a busy machine)
        assert len(pieces) >= count // 2
        assert sum(len(piece) <= size for piece in pieces) >= count // 2
        assert elapsed >= (count - 1) * delay


def test_value_inserts_go_where_their_index_says_in_the_given_order(sim):
    account = "DU1234567"
    late = ["6", "2", "NetLiquidation", "1", "USD", account]
    with connect(sim) as client:
        _, plain = _raw_download(client, account)
        sim.set_faults(
            value_inserts={account: [(0, [1100]), (10**6, [2104]), (-1, [late]), (0, [0.05, 1102])]}
        )
        started = time.monotonic()
        _, scripted = _raw_download(client, account, after_end=1)
        elapsed = time.monotonic() - started
    assert [int(f[3]) for f in scripted if f[0] == "4"] == [1100, 1102, 2104]
    assert scripted[0][3] == "1100" and scripted[1][3] == "1102"
    assert scripted[-3] == late and scripted[-2] == ["54", "1", account]
    assert scripted[-1][3] == "2104"
    assert _without_time([f for f in scripted if f[0] != "4" and f != late]) == _without_time(plain)
    assert elapsed >= 0.05  # the pause


def test_frames_after_positions_follow_the_position_end(sim):
    sim.set_faults(frames_after_positions=[1100, ["999", "1"]], extra_frames=[2104])
    with connect(sim) as client:
        result = client.request_positions()
        following = [client.recv(), client.recv()]
    assert result.end_received and len(result.positions) == len(SAMPLE)
    assert [e.code for e in result.errors] == [2104]
    assert parse_error_message(following[0], client.server_version).code == 1100
    assert following[1].fields == ("999", "1")
