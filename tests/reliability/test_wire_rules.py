"""The TWS wire's own rules, through the real IB client over TCP against the simulator.

(a) Numbers are read with the TWS wire grammar only, and IBKR's "no value" markers are
never numbers: an unset or unreadable quantity (or an unreadable average cost, strike or
contract id) makes the read incomplete, an unset average cost is NULL. (b) Any frame the
client library cannot decode, or that is not in the layout we read, makes the read
incomplete; a message id the library does not know stays harmless.

Each case tampers with the wire fields of a position that is already stored. Had the read
not been refused, that position would be closed (it is missing from what was read) or
given a made-up value: the database must be exactly as it was.

(c) The positions are what came before their end (positionEnd) on the wire: a failure
of the session, a frame that cannot be read or a position update after it is not theirs,
however the bytes were cut into TCP segments (each case is run at every segmentation).
"""

from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ibkr_sync import protocol
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.testing import Portfolio
from ibkr_sync.testing.simulator import _position_fields
from portfolio.models import Position
from tests.integration.conftest import (
    ACCOUNT,
    EMPTY,
    OTHER,
    SEGMENTATIONS,
    scripted,
    segmented,
    sim_position,
)
from tests.reliability.conftest import database_state

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

URL = "/portfolio/sync/ibkr"

UNSET_MARKERS = [
    "",
    "2147483647",
    "9223372036854775807",
    "-9223372036854775808",
    "1.7976931348623157E308",
    "1.7976931348623157e+308",
    "-1.7976931348623157E308",
    "170141183460469231731687303715884105727",
    "NaN",
    "nan",
    "1e999999999999999999",  # beyond Double.MAX_VALUE: no double at all
]
# Python's Decimal() and int() take all of these; the TWS wire grammar takes none.
NOT_WIRE_NUMBERS = [
    "abc",
    "sNaN",
    "1_000",
    " 12 ",
    "12 ",
    "+12",
    "\u0661\u0662",  # Arabic-Indic digits
    "\uff11\uff12",  # full-width digits
    "0x10",
    "1e",
    "--1",
    "1.2.3",
    "12\x00",
    "Infinityx",
    "1E99999999999999999999999",  # an exponent no decimal holds
]

INCOMPLETE = [
    *({"quantity": text} for text in UNSET_MARKERS),
    *({"quantity": text} for text in NOT_WIRE_NUMBERS),
    *({"average_cost": text} for text in NOT_WIRE_NUMBERS),
    *({"strike": text} for text in NOT_WIRE_NUMBERS),
    *({"con_id": text} for text in ["", "0", "-5", "2147483647", "1.5", "12a", "\u0663"]),
    {"account": ""},
    {"msg_id": "6l"},
    {"msg_id": ""},
    {"msg_id": "+61"},
    {"version": "4"},
    {"version": ""},
]


def tamper_ids(edits: dict[str, str]) -> str:
    return ",".join(f"{name}={text!r}" for name, text in edits.items())


@pytest.fixture
def stored(ibkr):
    """The simulator's portfolio, synced once: every tampered row is already stored."""
    first = sync_positions(trigger=SyncRun.Trigger.COMMAND)
    assert first.created == 4
    return database_state()


def aapl_row():
    return Position.objects.get(account__external_id=ACCOUNT, instrument__external_id="265598")


@pytest.mark.parametrize("edits", INCOMPLETE, ids=tamper_ids)
def test_an_unset_or_unreadable_position_field_makes_the_read_incomplete(
    edits, ibkr, stored, sync_client
):
    ibkr.set_faults(position_edits=edits)  # the first row: AAPL of DU1111111

    response = sync_client.post(URL)

    assert response.status_code == 502, response.content
    assert response.json()["code"] == "incomplete_snapshot"
    assert database_state() == stored
    run = SyncRun.objects.first()
    assert (run.status, run.error_code) == ("failed", "incomplete_snapshot")


@pytest.mark.parametrize("marker", UNSET_MARKERS)
def test_an_unset_average_cost_is_stored_as_null_never_as_a_number(marker, ibkr, stored):
    ibkr.set_faults(position_edits={"average_cost": marker})

    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)

    assert result.errors == []
    row = aapl_row()
    assert row.closed_at is None
    assert row.quantity == Decimal("10")
    assert row.average_cost is None
    assert row.cost_basis is None


@pytest.mark.parametrize("marker", UNSET_MARKERS)
def test_an_unset_strike_is_no_strike(marker, ibkr, stored):
    ibkr.set_faults(position_edits={"strike": marker})
    assert sync_positions(trigger=SyncRun.Trigger.COMMAND).errors == []
    assert aapl_row().instrument.strike is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0", Decimal("10")),
        ("1e1", Decimal("10")),
        ("1E+1", Decimal("10")),
        ("100E-1", Decimal("10")),
        ("0.10E2", Decimal("10")),
        ("10.", Decimal("10")),
    ],
)
def test_every_spelling_of_the_wire_grammar_is_read_exactly(text, expected, ibkr, stored):
    ibkr.set_faults(position_edits={"quantity": text})
    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
    assert (result.unchanged, result.errors) == (4, [])
    assert aapl_row().quantity == expected


def test_the_command_exits_8_on_an_incomplete_read(ibkr, stored):
    ibkr.set_faults(position_edits={"quantity": ""})
    stderr = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", stderr=stderr)
    assert raised.value.returncode == 8
    assert "could not be read" in str(raised.value)
    assert database_state() == stored


@pytest.mark.parametrize(
    "frame",
    [
        ["6l", "3", ACCOUNT, "265598"],  # a message id the decoder cannot read
        ["", "1"],
        ["9", "1"],  # nextValidId without its id: the library's handler fails on it
        ["62"],  # positionEnd without its version: the library takes it, we do not
        ["62", "1", "extra"],
        ["15", "1"],  # managedAccounts without its list
        ["61", "3", ACCOUNT],  # a position of 3 fields
        ["4", "2", "-1", "x2104", "farm"],  # an error whose code is not a number
    ],
    ids=repr,
)
def test_any_frame_the_client_cannot_decode_makes_the_read_incomplete(
    frame, ibkr, stored, sync_client
):
    ibkr.set_faults(extra_frames=[frame])
    ibkr.remove_position(ACCOUNT, 265598)  # a read taken as complete would close it

    response = sync_client.post(URL)

    assert response.status_code == 502, response.content
    assert response.json()["code"] == "incomplete_snapshot"
    assert database_state() == stored


@pytest.mark.parametrize("code", [1100, 2110])
def test_a_lost_link_in_an_error_layout_the_decoder_rejects_still_stops_the_read(
    code, ibkr, stored, sync_client
):
    """A 5-field error (no advancedOrderRejectJson after server version 166): the library
    drops it; its code still means "the gateway has lost IBKR", and nothing is closed."""
    ibkr.set_faults(extra_frames=[["4", "2", "-1", str(code), "Connectivity lost"]])
    ibkr.remove_position(ACCOUNT, 265598)

    response = sync_client.post(URL)

    assert response.status_code == 503, response.content
    assert response.json()["code"] == "gateway_unavailable"
    assert str(code) in response.json()["detail"]
    assert database_state() == stored


@pytest.mark.parametrize(
    "frame",
    [
        ["999", "1", "something", "new"],  # a newer server's message
        ["4", "2", "-1", "2104", "Market data farm connection is OK:usfarm", ""],
    ],
    ids=repr,
)
def test_messages_the_client_decodes_or_does_not_know_stay_harmless(frame, ibkr, stored):
    ibkr.set_faults(extra_frames=[frame])
    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
    assert (result.unchanged, result.errors) == (4, [])


def test_a_gateway_managing_no_account_has_its_own_clear_error(ibkr, sync_client):
    ibkr.set_portfolio(Portfolio(accounts=[], positions=[]))
    response = sync_client.post(URL)
    assert response.status_code == 502, response.content
    body = response.json()
    assert body["code"] == "no_managed_accounts"
    assert "no managed accounts" in body["detail"]
    assert "did not connect" not in body["detail"]


def test_the_unset_markers_are_the_protocol_modules():
    for text in UNSET_MARKERS:
        assert protocol.parse_decimal(text) is protocol.UNSET, text
    for text in NOT_WIRE_NUMBERS:
        with pytest.raises(protocol.WireValueError):
            protocol.parse_decimal(text)


def test_a_flood_of_unreadable_frames_is_counted_not_kept(ibkr, stored, sync_client):
    """A hostile peer sending frame after broken frame costs the read a count: the error
    names how many and shows the first, and nothing is changed."""
    ibkr.set_faults(extra_frames=[["6l", str(n)] for n in range(20_000)])

    response = sync_client.post(URL)

    assert response.status_code == 502
    detail = response.json()["detail"]
    assert "sent 20000 message(s) that could not be read" in detail
    assert "['6l',0" in detail or "[6l,0" in detail
    assert database_state() == stored


LINK_LOST = [1100, 2110, 1101]


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
@pytest.mark.parametrize("code", LINK_LOST)
def test_a_lost_link_before_the_positions_end_fails_the_read(
    code, segmentation, ibkr, stored, sync_client
):
    ibkr.set_faults(**segmented(segmentation, extra_frames=scripted(segmentation, [code])))
    ibkr.remove_position(ACCOUNT, 265598)  # a read taken as complete would close it

    response = sync_client.post(URL)

    assert response.status_code == 503, response.content
    assert response.json()["code"] == "gateway_unavailable"
    assert str(code) in response.json()["detail"]
    assert database_state() == stored


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
@pytest.mark.parametrize("code", LINK_LOST)
def test_a_lost_link_right_after_the_positions_end_spoils_only_the_values(
    code, segmentation, ibkr, stored, settings
):
    settings.IBKR_REQUEST_TIMEOUT = 10
    ibkr.set_faults(
        **segmented(segmentation, frames_after_positions=scripted(segmentation, [code]))
    )
    ibkr.remove_position(ACCOUNT, 265598)

    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)

    assert (result.closed, result.unchanged) == (1, 3)  # complete before the notice
    assert {a: v["status"] for a, v in result.account_values.items()} == dict.fromkeys(
        (ACCOUNT, OTHER, EMPTY), "missing"
    )
    assert all(str(code) in v["reason"] for v in result.account_values.values())


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
def test_a_frame_that_cannot_be_read_after_the_positions_end_spoils_the_first_values(
    segmentation, ibkr, stored, settings
):
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 5
    ibkr.set_faults(
        **segmented(segmentation, frames_after_positions=scripted(segmentation, [["6l", "2"]]))
    )
    ibkr.remove_position(ACCOUNT, 265598)

    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)

    assert (result.closed, result.unchanged) == (1, 3)
    outcome = result.account_values
    assert {a: v["status"] for a, v in outcome.items()} == {
        ACCOUNT: "missing", OTHER: "read", EMPTY: "read"
    }  # fmt: skip
    assert "could not be read" in outcome[ACCOUNT]["reason"]


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
def test_a_position_update_after_the_positions_end_is_not_part_of_the_read(
    segmentation, ibkr, stored, settings
):
    settings.IBKR_REQUEST_TIMEOUT = 10
    update = _position_fields(sim_position(quantity="999"))  # AAPL of ACCOUNT, traded
    ibkr.set_faults(
        **segmented(segmentation, frames_after_positions=scripted(segmentation, [update]))
    )

    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)

    assert (result.unchanged, result.updated, result.errors) == (4, 0, [])
    assert aapl_row().quantity == Decimal("10")
