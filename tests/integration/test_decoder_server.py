"""The TWS source against a second server, written from the client library's decoder.

`decoder_server.py` shares no code with the bundled simulator nor with our protocol
module: what it sends is the field order of the client library's decoder, at the
versions IBKR's decoder reads. Each test checks the sync's result against IBKR's rules
(exact decimals from the wire text, "no value" never a number, every managed account,
each error code as IBKR documents it), at every server version the client library
negotiates and however the bytes are cut into TCP segments.
"""

from __future__ import annotations

import importlib
import time
from decimal import Decimal

import pytest

from ibkr_sync.exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayUnavailable,
    IncompleteSnapshot,
    NoManagedAccounts,
)
from ibkr_sync.gateway import IbkrGateway
from tests.integration.decoder_server import (
    CLOSE,
    SILENCE,
    DecoderServer,
    account_time,
    account_value,
    download_end,
    error,
    frame,
    managed_accounts,
    next_valid_id,
    portfolio,
    position,
    position_end,
)

pytestmark = pytest.mark.integration

A1, A2 = "U1234567", "U7654321"


def library_versions() -> tuple[int, int]:
    """The server versions the configured client library offers, lowest and highest."""
    from django.conf import settings

    client = importlib.import_module(settings.IBKR_CLIENT_LIBRARY).client.Client
    return client.MinClientVersion, client.MaxClientVersion


def start(accounts: str = f"{A1},{A2}") -> list:
    return [next_valid_id(), managed_accounts(accounts)]


@pytest.fixture
def serve(settings):
    """Start a DecoderServer with a script; point the settings at it."""
    servers = []

    def serve(script: dict, **options) -> DecoderServer:
        server = DecoderServer(script, **options).__enter__()
        servers.append(server)
        settings.IBKR_HOST = "127.0.0.1"
        settings.IBKR_PORT = server.port
        settings.IBKR_CLIENT_ID = 23
        settings.IBKR_CONNECT_TIMEOUT = 3
        settings.IBKR_REQUEST_TIMEOUT = 4
        settings.IBKR_VALUES_TIMEOUT = 2
        settings.IBKR_READ_VALUES = False
        return server

    yield serve
    for server in servers:
        server.__exit__(None, None, None)


def read(account: str | None = None):
    return IbkrGateway().fetch_positions(account)


def by_con_id(snapshot):
    return {(p.account, p.con_id): p for p in snapshot.positions}


def version_of(name: str) -> int:
    """A server version named by what it is to the client library: its lowest, the last
    before the error message's advancedOrderRejectJson (165), the first with it (166),
    its highest."""
    lowest, highest = library_versions()
    return {"lowest": lowest, "165": 165, "166": 166, "highest": highest}[name]


VERSIONS = ["lowest", "165", "166", "highest"]
#: Bytes per TCP write: each answer in one, one byte at a time, and cuts across fields.
SEGMENTS = [None, 1, 3, 7]


def positions_script(*frames: list, accounts: str = f"{A1},{A2}", before: tuple = ()) -> dict:
    return {"start": [*start(accounts), *before], "positions": [*frames, position_end()]}


# --- positions: exact, and "no value" never a number ---------------------------------------


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_positions_are_the_wire_texts_exactly_at_every_version_and_cut(serve, version, segment):
    version = version_of(version)
    serve(
        positions_script(
            position(A1, "265598", quantity="0.12345678", average_cost="1.0E-4"),
            position(A1, "3691937", symbol="AMZN", quantity="1E+2",
                     average_cost="291.2660812"),
            position(A2, "76792991", symbol="TSLA", quantity="-3",
                     average_cost="1.7976931348623157E308", strike="1.7976931348623157E308"),
            before=[error(-1, 2104, "Market data farm connection is OK:usfarm", version)],
        ),
        server_version=version,
        segment=segment,
    )  # fmt: skip

    snapshot = read()

    assert snapshot.accounts == (A1, A2)
    assert snapshot.server_version == version
    got = by_con_id(snapshot)
    assert set(got) == {(A1, 265598), (A1, 3691937), (A2, 76792991)}
    assert str(got[A1, 265598].quantity) == "0.12345678"
    assert got[A1, 265598].average_cost == Decimal("0.0001")
    assert got[A1, 3691937].quantity == 100
    assert got[A1, 3691937].average_cost == Decimal("291.2660812")
    tsla = got[A2, 76792991]
    assert (tsla.quantity, tsla.average_cost, tsla.strike) == (Decimal(-3), None, None)


# --- the API handshake: a server version the client library can read -----------------------


@pytest.mark.parametrize("offset", [-1, -57])
def test_a_gateway_older_than_the_client_library_reads_is_named_as_such(serve, offset):
    """A gateway answers with the highest version both sides speak; one below the client
    library's lowest is a TWS / IB Gateway too old for it: no setup checklist helps."""
    lowest, highest = library_versions()
    serve(positions_script(position(A1, "1")), server_version=lowest + offset)

    with pytest.raises(GatewayError) as raised:
        read()

    message = str(raised.value)
    assert f"server version {lowest + offset}" in message
    assert f"{lowest} to {highest}" in message
    assert "upgrade" in message.lower()
    assert "Enable ActiveX" not in message


@pytest.mark.parametrize("offset", [1, 24])
def test_a_server_version_above_what_the_client_offered_is_refused(serve, offset):
    """IBKR's handshake: the client offers a range, the gateway answers with a version in
    it. Above it, the gateway's frames are in layouts the client library does not know:
    at server version 200 an error message has no version field, so a farm's "OK"
    (captured from a real gateway) would be read as an unreadable frame, or worse."""
    lowest, highest = library_versions()
    farm_ok = ["4", "-1", "2104", "Market data farm connection is OK:usfarm", "",
               "1775425766350"]  # fmt: skip
    serve(positions_script(position(A1, "1"), before=[farm_ok]), server_version=highest + offset)

    with pytest.raises(GatewayError) as raised:
        read()

    assert not isinstance(raised.value, IncompleteSnapshot)
    message = str(raised.value)
    assert f"server version {highest + offset}" in message
    assert f"{lowest} to {highest}" in message


# --- the API start: frames the client library cannot take before it is ready --------------


@pytest.mark.parametrize(
    "frame_",
    [
        [],  # an empty message: no message id
        ["abc", "1"],  # a message id that is no number
        ["9", "1"],  # nextValidId without its id
        ["15", "1"],  # managedAccounts without its list
        ["9", "1", "x"],  # nextValidId whose id is no number
    ],
    ids=repr,
)
def test_a_frame_the_library_cannot_take_at_the_api_start_fails_at_once(serve, frame_):
    """Until the API start (nextValidId and managedAccounts) the client library looks at
    each frame itself, and a frame it cannot take there is dropped with only a log line,
    the rest of its TCP segment held back: the start never completes and the read would
    wait out the connect timeout, blamed on a gateway that "did not connect". It is a
    frame that could not be read: the read fails at once and says so."""
    serve(positions_script(position(A1, "1"), before=()) | {"start": [frame_, *start()]})

    began = time.monotonic()
    with pytest.raises(IncompleteSnapshot) as raised:
        read()

    assert time.monotonic() - began < 1.5  # not the connect timeout (3 s)
    assert "could not" in str(raised.value)


# --- every managed account ------------------------------------------------------------------


@pytest.mark.parametrize("accounts", [f"{A1},{A2}", f"{A1},{A2},", f"{A1},,{A2}"])
def test_every_managed_account_is_read_whatever_commas_the_list_has(serve, accounts):
    """managedAccounts is one comma-separated text (some gateways end it with a comma):
    every account in it is read, the one holding nothing too (its stored positions are
    then closed, as they should be: IBKR said it holds none)."""
    serve(positions_script(position(A1, "1"), accounts=accounts))

    snapshot = read()

    assert snapshot.accounts == (A1, A2)
    assert [(p.account, p.con_id) for p in snapshot.positions] == [(A1, 1)]


# --- error codes, as IBKR documents them ----------------------------------------------------

# Information: the data farms' status (OK, inactive, connecting, broken: market,
# historical and contract data, not the account server positions come from),
# connectivity restored with its data maintained, market data subscriptions, the
# account-updates subscription's (2100, 2101: no account's values are being read), and
# codes the client itself makes (503, 507: never sent by a gateway).
INFORMATIONAL = [2104, 2106, 2158, 2107, 2108, 2119, 2103, 2105, 2157, 1102, 10089, 10167,
                 10197, 2109, 2150, 100, 162, 200, 354, 2100, 2101, 503, 507]  # fmt: skip
EXPECTED = {
    # TWS / IB Gateway lost IBKR's servers, or its data was lost on reconnecting.
    1100: GatewayUnavailable,
    1101: GatewayUnavailable,
    2110: GatewayUnavailable,
    # Not connected to TWS; its socket port was reset.
    502: GatewayUnavailable,
    504: GatewayUnavailable,
    1300: GatewayUnavailable,
    326: ClientIdInUse,
    # A request that could not be validated or processed: the positions' own.
    321: GatewayError,
    322: GatewayError,
}


@pytest.mark.parametrize("version", ["lowest", "highest"])
@pytest.mark.parametrize("code", [*INFORMATIONAL, *EXPECTED], ids=str)
def test_each_error_code_during_the_positions_means_what_ibkr_documents(serve, code, version):
    """Each code in an error frame of the layout of the version (5 fields before 166,
    6 from it on), between two positions, with the "no request" id -1."""
    version = version_of(version)
    serve(
        positions_script(position(A1, "1"), error(-1, code, "text", version), position(A1, "2")),
        server_version=version,
    )

    if code in EXPECTED:
        with pytest.raises(EXPECTED[code]) as raised:
            read()
        assert raised.value.ib_code == code
        assert str(code) in str(raised.value) or code == 326
    else:
        snapshot = read()
        assert {p.con_id for p in snapshot.positions} == {1, 2}


# --- the stream: closed mid-frame, lengths at the protocol's limits -----------------------


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("cut", [1, 4, 9, 20])
def test_a_gateway_closing_mid_frame_before_the_positions_end_fails_the_read(serve, cut, segment):
    """Closed `cut` bytes into a position frame (inside its length prefix, just after
    it, mid-field): what came before it is no complete portfolio."""
    serve(
        {
            "start": start(),
            "positions": [position(A1, "1"), frame(position(A2, "2"))[:cut], CLOSE],
        },
        segment=segment,
    )

    began = time.monotonic()
    with pytest.raises(GatewayUnavailable, match=r"lost|closed"):
        read()
    assert time.monotonic() - began < 2  # not the request timeout (4 s)


def test_a_length_prefix_beyond_the_protocols_longest_message_stops_the_read_at_once(serve):
    serve({"start": start(), "positions": [position(A1, "1"), b"\x01\x00\x00\x00", SILENCE]})

    began = time.monotonic()
    with pytest.raises(IncompleteSnapshot, match="16,777,216 bytes"):
        read()
    assert time.monotonic() - began < 2


@pytest.mark.parametrize("segment", SEGMENTS)
def test_an_empty_frame_among_the_positions_makes_the_read_incomplete(serve, segment):
    """A length of 0: a frame with no message id, which no decoder can read."""
    serve(
        positions_script(position(A1, "1"), b"\x00\x00\x00\x00", position(A2, "2")),
        segment=segment,
    )

    with pytest.raises(IncompleteSnapshot):
        read()


# --- account values: exact, and "no value" never a number ---------------------------------


def values_script(*rows: list) -> dict:
    return {
        "start": start(A1),
        "positions": [
            position(A1, "265598", quantity="-100", average_cost="291.2660812"),
            position_end(),
        ],
        ("values", A1): [*rows, account_time(), download_end(A1)],
    }


@pytest.mark.django_db
@pytest.mark.parametrize("unset", ["", "1.7976931348623157E308", "2147483647"])
def test_account_values_are_exact_and_an_unset_one_is_no_value(serve, settings, unset):
    from ibkr_sync.services import sync_positions
    from portfolio.models import Position

    serve(
        values_script(
            account_value("NetLiquidation", "1E+3", "USD", A1),
            account_value("TotalCashValue", "100.015", "USD", A1),
            account_value("CashBalance", unset, "USD", A1),
            account_value("ExchangeRate", "1.00", "USD", A1),
            portfolio(A1, "265598", "-100", unset, "-29162.34", "291.2660812", unset,
                      "-71.44"),
        )
    )  # fmt: skip
    settings.IBKR_READ_VALUES = True

    result = sync_positions(trigger="command")

    assert result.errors == []
    outcome = result.account_values[A1]
    assert outcome["status"] == "read", outcome
    assert outcome["cash_kept_reason"] == "IBKR sent no value for the USD balance"
    aapl = Position.objects.get()
    assert (aapl.market_price, aapl.unrealized_pnl) == (None, None)
    assert aapl.market_value == Decimal("-29162.34")
    assert aapl.realized_pnl == Decimal("-71.44")


# --- errors that answer another request ----------------------------------------------------

RESTORED = "Connectivity between IB and Trader Workstation has been restored - data maintained."
# What TWS answers an account summary of group "All" for an advisor of more than 50
# accounts (or a third summary subscription at once), to that request's id.
SUMMARY_REFUSED = "Error processing request.-'bd' : cause - Group 'All' is not allowed"
REQ_ACCOUNT_SUMMARY = "62"


@pytest.mark.parametrize("at", ["start", "positions"])
@pytest.mark.parametrize("version", ["lowest", "highest"])
def test_connectivity_restored_during_the_read_sends_no_request_of_its_own(serve, version, at):
    """A 1102 ("restored, data maintained") is information. The client library answers
    it by asking for every account's summary (group "All"), a request the read never
    makes: TWS may refuse it (an advisor of more than 50 accounts, or a third summary
    subscription at once), and that refusal is no failure of the positions."""
    version = version_of(version)
    restored = error(-1, 1102, RESTORED, version)
    if at == "start":
        script = positions_script(position(A1, "1"), position(A1, "2"), before=[restored])
    else:
        script = positions_script(position(A1, "1"), restored, position(A1, "2"))
    server = serve(
        script
        | {
            ("request", REQ_ACCOUNT_SUMMARY): lambda request: [
                error(int(request[2]), 322, SUMMARY_REFUSED, version)
            ]
        },
        server_version=version,
    )

    snapshot = read()

    assert {p.con_id for p in snapshot.positions} == {1, 2}
    assert [r[0] for r in server.requests if r[0] == REQ_ACCOUNT_SUMMARY] == []


@pytest.mark.parametrize("code", [321, 322])
def test_a_request_error_for_another_requests_id_fails_no_positions(serve, code):
    """A read's requests (positions, account updates) carry no request id, and TWS
    answers them with the id -1. An error with the id of a request concerns that request:
    not the read's (another request of the client, as the library's own account summary
    was), so the positions stand."""
    serve(
        positions_script(position(A1, "1"), error(7, code, SUMMARY_REFUSED, 176), position(A1, "2"))
    )

    snapshot = read()

    assert {p.con_id for p in snapshot.positions} == {1, 2}


@pytest.mark.django_db
@pytest.mark.parametrize("code", [321, 322])
def test_a_request_error_for_another_requests_id_spoils_no_accounts_values(serve, settings, code):
    from ibkr_sync.services import sync_positions

    serve(
        values_script(
            account_value("NetLiquidation", "1000", "USD", A1),
            account_value("CashBalance", "10", "USD", A1),
            error(7, code, SUMMARY_REFUSED, 176),
            portfolio(A1, "265598", "-100", "291.6234436", "-29162.34", "291.2660812"),
        )
    )
    settings.IBKR_READ_VALUES = True

    result = sync_positions(trigger="command")

    assert result.account_values[A1]["status"] == "read", result.account_values[A1]
    assert result.account_values[A1]["positions_valued"] == 1


@pytest.mark.django_db
def test_a_request_error_without_a_request_id_still_spoils_the_accounts_values(serve, settings):
    """The same code with the id -1 answers the account-updates request itself."""
    from ibkr_sync.services import sync_positions

    serve(
        values_script(
            account_value("NetLiquidation", "1000", "USD", A1),
            error(-1, 321, "Error validating request.-'bB' : cause - x", 176),
        )
    )
    settings.IBKR_READ_VALUES = True

    result = sync_positions(trigger="command")

    assert result.account_values[A1]["status"] != "read"
    assert "321" in str(result.account_values[A1])


@pytest.mark.django_db
@pytest.mark.parametrize("segment", [None, 1])
def test_a_gateway_closing_mid_frame_during_the_values_keeps_the_positions(
    serve, settings, segment
):
    """The positions ended on the wire before the values were asked for: they are
    complete and written; the account whose download the close cut is missing, with why."""
    from ibkr_sync.services import sync_positions
    from portfolio.models import Position

    script = values_script()
    script["values", A1] = [
        account_value("NetLiquidation", "1000", "USD", A1),
        frame(account_value("CashBalance", "10", "USD", A1))[:11],
        CLOSE,
    ]
    serve(script, segment=segment)
    settings.IBKR_READ_VALUES = True

    result = sync_positions(trigger="command")

    assert (result.created, result.errors) == (1, [])
    assert Position.objects.get().quantity == Decimal(-100)
    outcome = result.account_values[A1]
    assert outcome["status"] == "missing", outcome
    assert "closed" in outcome["reason"] or "lost" in outcome["reason"], outcome


# --- a failure of the session before the positions' end, in the same TCP segment ----------


@pytest.mark.parametrize("segment", SEGMENTS)
def test_a_failure_before_the_positions_end_fails_them_in_any_segment(serve, segment):
    """The positions are what came before their end on the wire, complete only if the
    session had not failed by then. A failure the gateway states without an IB code (here
    a managedAccounts that names no account, among the positions) came before the end,
    however soon the end followed it: no snapshot."""
    serve(
        positions_script(position(A1, "1"), managed_accounts(","), position(A1, "2")),
        segment=segment,
    )

    with pytest.raises(NoManagedAccounts):
        read()


@pytest.mark.django_db
@pytest.mark.parametrize("code", [1100, 2110, 502, 504, 1300, 321, 322])
def test_a_huge_error_text_that_fails_the_read_is_not_stored_whole(serve, code):
    """An error frame may carry up to 16 MB of text: the failure quotes it cut, as an
    account's missing values do, never whole into the run, the API's answer or the
    command's one line."""
    from ibkr_sync.models import SyncRun
    from ibkr_sync.services import sync_positions

    serve(positions_script(position(A1, "1"), error(-1, code, "x" * 1_000_000, 176)))

    with pytest.raises(GatewayError) as raised:
        sync_positions(trigger="command")

    assert raised.value.ib_code == code
    assert len(str(raised.value)) < 10_000
    assert len(SyncRun.objects.get().error_message) < 10_000
