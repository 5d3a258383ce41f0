"""The pieces that let a sync recognise unchanged positions cheaply: the digest of an
account's records, the positional record constructor a source uses at 10,000s of
records, the mapping's signature, and the TWS source's own framing of the session."""

import dataclasses
import random
import struct
from decimal import Decimal

import pytest

from ibkr_sync import mapping
from ibkr_sync.snapshot import PositionRecord, positions_digest
from ibkr_sync.sources.tws.decoding import Frames, _position_from_wire


def record(fingerprint="61\x003\x00U1\x001", **fields):
    values = {
        "account": "U1",
        "con_id": 1,
        "symbol": "A",
        "sec_type": "STK",
        "quantity": Decimal(1),
        "average_cost": None,
    }
    return PositionRecord(**{**values, **fields}, fingerprint=fingerprint)


def test_the_digest_is_of_the_set_in_any_order():
    a, b, c = record("a"), record("b"), record("c")
    assert positions_digest([a, b, c]) == positions_digest([c, a, b])
    assert positions_digest([a, b]) != positions_digest([a, b, c])
    assert positions_digest([]) == positions_digest(())
    assert positions_digest([]) != positions_digest([record("")])


def test_no_two_sets_join_to_one_text():
    assert positions_digest([record("ab")]) != positions_digest([record("a"), record("b")])
    assert positions_digest([record("a\nb")]) != positions_digest([record("a"), record("b")])


def test_a_record_without_a_fingerprint_makes_no_digest():
    assert positions_digest([record("a"), record(None)]) == ""


def test_the_fingerprint_is_no_part_of_a_records_equality():
    assert record("a") == record("b")
    assert "fingerprint" not in repr(record("secret"))


def test_make_builds_the_record_the_keywords_build():
    names = [f.name for f in dataclasses.fields(PositionRecord)]
    values = [f"v{i}" for i in range(len(names))]
    assert PositionRecord.make(*values) == PositionRecord(**dict(zip(names, values, strict=True)))
    assert PositionRecord.make(*values).fingerprint == values[-1]
    with pytest.raises(TypeError, match="takes 16 values"):
        PositionRecord.make(*values[:-1])
    made = PositionRecord.make(*values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.symbol = "other"


def test_a_position_message_decodes_to_the_keyword_record_with_its_text():
    fields = ["61", "3", "U1234567", "265598", "AAPL", "STK", "", "0.0", "", "", "NASDAQ",
              "USD", "AAPL", "NMS", "12.5", "150.25"]  # fmt: skip
    decoded = _position_from_wire(fields)
    assert decoded == PositionRecord(
        account="U1234567",
        con_id=265598,
        symbol="AAPL",
        sec_type="STK",
        quantity=Decimal("12.5"),
        average_cost=Decimal("150.25"),
        currency="USD",
        exchange="NASDAQ",
        local_symbol="AAPL",
        trading_class="NMS",
        strike=Decimal("0.0"),
    )
    # No fingerprint: the TWS source digests each account's messages themselves.
    assert decoded.fingerprint is None


@pytest.mark.django_db
def test_the_signature_changes_with_the_models_and_their_columns():
    from portfolio.models import Account, Instrument, Position

    models = (Position, Instrument, Account)
    before = mapping._signature(models)
    assert before == mapping._signature(models)
    assert before != mapping._signature((Position, Account, Instrument))
    field = Instrument._meta.get_field("symbol")
    original = field.max_length
    mapping._columns.pop(Instrument, None)
    try:
        field.max_length = original + 1
        changed = mapping._signature(models)
    finally:
        field.max_length = original
        mapping._columns.pop(Instrument, None)
    assert changed != before
    assert mapping._signature(models) == before


def frame(*fields: str) -> bytes:
    body = "".join(f"{f}\0" for f in fields).encode()
    return struct.pack(">I", len(body)) + body


STREAM = [
    ("library", frame("9", "1", "1")),
    ("library", frame("15", "1", "U1,U2")),
    ("position", frame("61", "3", "U1", "1", "A")),
    ("position", frame("61", "3", "U1", "2", "B\u00e9")),
    ("library", frame("4", "2", "-1", "2104", "Market data farm is OK")),
    ("position", frame("61", "3", "U2", "3", "C")),
    ("library", frame("62", "1")),
    ("library", frame("610", "1")),  # a message id that starts with 61: not a position
]


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
def test_frames_pass_every_other_frame_on_as_its_bytes_in_the_order_of_the_wire(cut):
    seen = []
    frames = Frames(
        received=lambda data: seen.append(("library", data)),
        position=lambda fields: seen.append(("position", fields)),
    )
    stream = b"".join(data for _, data in STREAM)
    if cut == "whole":
        pieces = [stream]
    elif cut == "bytes":
        pieces = [stream[i : i + 1] for i in range(len(stream))]
    else:
        rng, pieces, i = random.Random(7), [], 0
        while i < len(stream):
            step = rng.randint(1, 40)
            pieces.append(stream[i : i + step])
            i += step
    for piece in pieces:
        frames.feed(piece)

    # The library's frames, joined as it would have read them, between the positions.
    merged = []
    for kind, item in seen:
        if kind == "library" and merged and merged[-1][0] == "library":
            merged[-1] = ("library", merged[-1][1] + item)
        else:
            merged.append((kind, item))
    expected = []
    for kind, data in STREAM:
        if kind == "position":
            expected.append(("position", data[4:]))
        elif expected and expected[-1][0] == "library":
            expected[-1] = ("library", expected[-1][1] + data)
        else:
            expected.append(("library", data))
    assert merged == expected


def test_frames_hold_an_incomplete_frame_until_the_rest_comes():
    seen = []
    frames = Frames(received=seen.append, position=seen.append)
    data = frame("61", "3", "U1", "1", "A")
    frames.feed(data[:-1])
    assert seen == []
    frames.feed(data[-1:])
    assert seen == [data[4:]]


def test_a_length_prefix_beyond_any_message_stops_the_frames_at_once():
    """A peer that announces a frame longer than the TWS API's longest message (16 MB) is
    not waited for while it streams: what came before goes on, nothing after."""
    from ibkr_sync.protocol import MAX_MESSAGE_LENGTH

    seen, told = [], []
    frames = Frames(received=seen.append, position=seen.append, too_long=told.append)
    before = frame("62", "1")
    frames.feed(before + struct.pack(">I", MAX_MESSAGE_LENGTH + 1) + b"x" * 100)
    frames.feed(frame("61", "3", "U1", "1", "A"))
    assert seen == [before] and told == [MAX_MESSAGE_LENGTH + 1]
    # The longest message itself is a frame, waited for.
    whole = Frames(received=seen.append, position=seen.append, too_long=told.append)
    whole.feed(struct.pack(">I", MAX_MESSAGE_LENGTH) + b"y")
    assert told == [MAX_MESSAGE_LENGTH + 1]


# --- the TWS source's position messages: digests, and decoding left for later --------------


def message(account="U1", con_id="1", quantity="10", symbol="A"):
    fields = ["61", "3", account, con_id, symbol, "STK", "", "0.0", "", "", "NASDAQ",
              "USD", symbol, "NMS", quantity, "150.25"]  # fmt: skip
    return "".join(f"{f}\0" for f in fields).encode()


def read(messages, written=None):
    """The position messages of a read, as the source keeps them; `written` as a sync
    tells it (decoding deferred), else each decoded on arrival."""
    from ibkr_sync.sources.tws.positions import PositionMessages
    from ibkr_sync.sources.tws.state import _ReadState

    state = _ReadState()
    kept = state.messages = PositionMessages(state, "gateway:4001")
    if written is not None:
        kept.defer(written)
    for data in messages:
        kept.add(data)
    kept.settle()
    state.end_positions()
    return kept, state


MESSAGES = [message("U1", "1"), message("U2", "2"), message("U1", "3", "0"), message("U1", "4")]


def test_an_accounts_digest_is_of_its_messages_in_any_order_and_every_byte():
    kept, _ = read(MESSAGES)
    again, _ = read(list(reversed(MESSAGES)))
    assert kept.digest("U1") == again.digest("U1") != kept.digest("U2")
    for changed in (message("U1", "4", "10.0"), message("U1", "4", symbol="B")):
        other, _ = read([*MESSAGES[:3], changed])
        assert other.digest("U1") != kept.digest("U1")
        assert other.digest("U2") == kept.digest("U2")
    assert read([])[0].digest("U1") == read([message("U2")])[0].digest("U1")  # none read
    assert read([])[0].digest("U1") != kept.digest("U1")


def test_an_account_left_undecoded_decodes_to_the_records_read_on_arrival():
    eager, state = read(MESSAGES)
    assert state.unreadable == 0 and len(eager) == 3  # the zero row is no position
    left, state = read(MESSAGES, written=lambda account, digest: account == "U1")
    assert state.positions.keys() == {("U2", 2)}  # U1's messages left as they came
    assert left.records(skip={"U1"}) == eager.records(skip={"U1"})
    assert left.records() == eager.records() and list(left) == list(eager)
    assert [r.con_id for r in left] == [1, 2, 4]  # in the order of the wire


def test_a_message_that_cannot_be_read_is_found_in_the_order_of_the_wire():
    """Deferred or not, the same frames count as unreadable, in the same order: an
    account the sync does not know is decoded at the positions' end, and a frame that
    cannot be read decodes every message before it first."""
    bad = message("U2", "7", quantity="")
    stream = [MESSAGES[0], bad, MESSAGES[3]]
    _, eager = read(stream)
    _, deferred = read(stream, written=lambda account, digest: account == "U1")
    assert eager.unreadable == deferred.unreadable == 1
    assert eager.unreadable_examples == deferred.unreadable_examples

    from ibkr_sync.sources.tws.positions import PositionMessages
    from ibkr_sync.sources.tws.state import _ReadState

    state = _ReadState()
    kept = state.messages = PositionMessages(state, "gateway:4001")
    kept.defer(lambda account, digest: True)
    kept.add(bad)
    state.note_unreadable("[4,2]: another frame")  # before the positions' end
    assert state.unreadable_examples[0].startswith("[61,3,U2,7]: the quantity")
    assert state.unreadable_examples[1] == "[4,2]: another frame"


def test_an_account_with_a_contract_twice_has_no_digest():
    twice = [message("U1", "1", "10"), message("U2", "2"), message("U1", "1", "5")]
    kept, _ = read(twice)
    assert kept.digest("U1") == "" and kept.digest("U2") != ""
    assert [r.quantity for r in kept if r.account == "U1"] == [Decimal(5)]  # the last


def test_a_message_left_undecoded_that_cannot_be_read_makes_the_records_an_incomplete_read():
    """Never the case for a sync (it leaves only messages that were read before), but
    decoding them later is held to the read's rule all the same."""
    from ibkr_sync.exceptions import IncompleteSnapshot

    kept, state = read([message("U1", "1", "")], written=lambda account, digest: True)
    assert state.unreadable == 0
    assert kept.records(skip={"U1"}) == ()
    with pytest.raises(IncompleteSnapshot, match="gateway:4001 sent 1 message"):
        kept.records()
