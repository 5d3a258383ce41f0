import datetime as dt
from decimal import Decimal

import pytest

from ibkr_sync.exceptions import InvalidAccountId
from ibkr_sync.mapping import (
    MappingError,
    map_position,
    normalize_account_id,
    optional_decimal,
    parse_expiry,
)
from tests.conftest import position

UNSET = Decimal("1.7976931348623157E308")


@pytest.mark.parametrize(
    ("record", "instrument"),
    [
        (
            position(quantity="0.12345678", average_cost="187.5"),
            {"sec_type": "STK", "symbol": "AAPL", "strike": None, "multiplier": None,
             "expiry": None, "right": ""},
        ),
        (
            position(con_id=1001, symbol="AAPL", sec_type="OPT", quantity="-3",
                     average_cost="512.34", last_trade_date="20261218", strike=Decimal("150"),
                     right="C", multiplier="100", local_symbol="AAPL  261218C00150000",
                     trading_class="AAPL", exchange="SMART"),
            {"sec_type": "OPT", "strike": Decimal("150"), "right": "C",
             "multiplier": Decimal("100"), "expiry": dt.date(2026, 12, 18),
             "contract_month": "202612", "local_symbol": "AAPL  261218C00150000",
             "trading_class": "AAPL", "exchange": "SMART"},
        ),
        (
            position(con_id=1002, symbol="ES", sec_type="FOP", last_trade_date="20261218",
                     strike=Decimal("5000.25"), right="PUT", multiplier="50"),
            {"sec_type": "FOP", "strike": Decimal("5000.25"), "right": "P",
             "multiplier": Decimal("50")},
        ),
        (
            position(con_id=1003, symbol="ES", sec_type="FUT", last_trade_date="202612",
                     multiplier="50", local_symbol="ESZ6", exchange="CME"),
            {"sec_type": "FUT", "expiry": None, "contract_month": "202612",
             "local_symbol": "ESZ6", "exchange": "CME"},
        ),
        (
            position(con_id=1004, symbol="EUR", sec_type="CASH", currency="usd",
                     quantity="125000.5", local_symbol="EUR.USD", exchange="IDEALPRO"),
            {"sec_type": "CASH", "currency": "USD", "local_symbol": "EUR.USD"},
        ),
        (
            position(con_id=1005, symbol="US-T", sec_type="BOND", quantity="10000",
                     average_cost="98.765"),
            {"sec_type": "BOND"},
        ),
        (position(con_id=1006, symbol="IBUS500", sec_type="CFD"), {"sec_type": "CFD"}),
        (
            position(con_id=1007, symbol="DAX", sec_type="WAR", strike=Decimal("18000"),
                     right="C", multiplier="0.01", last_trade_date="20270115"),
            {"sec_type": "WAR", "multiplier": Decimal("0.01"), "right": "C"},
        ),
        (position(con_id=1008, symbol="VFIAX", sec_type="FUND"), {"sec_type": "FUND"}),
        (
            position(con_id=1009, symbol="BTC", sec_type="CRYPTO", quantity="0.00012345",
                     exchange="PAXOS"),
            {"sec_type": "CRYPTO", "exchange": "PAXOS"},
        ),
        (position(con_id=1010, symbol="SPX", sec_type="IND"), {"sec_type": "IND"}),
    ],
)  # fmt: skip
def test_every_sec_type_maps_without_loss(record, instrument):
    mapped = map_position(record)
    assert mapped.account_id == record.account
    assert mapped.instrument_id == str(record.con_id)
    for name, value in instrument.items():
        assert mapped.instrument[name] == value, name
    assert mapped.position["quantity"] == record.quantity
    assert mapped.position["cost_basis"] == record.quantity * record.average_cost


def test_fractional_quantity_is_exact_to_ten_places():
    mapped = map_position(position(quantity="3.1415926535", average_cost="0.0000000001"))
    assert mapped.position["quantity"] == Decimal("3.1415926535")
    assert str(mapped.position["quantity"]) == "3.1415926535"


def test_quantity_finer_than_storage_is_an_error_not_a_rounding():
    with pytest.raises(MappingError, match="more than 10 decimal places"):
        map_position(position(quantity="0.12345678901"))


@pytest.mark.parametrize("unset", [UNSET, Decimal("NaN"), None])
def test_unset_average_cost_becomes_null_and_so_does_cost_basis(unset):
    mapped = map_position(position(average_cost=unset))
    assert mapped.position["average_cost"] is None
    assert mapped.position["cost_basis"] is None


@pytest.mark.parametrize("unset", [UNSET, Decimal("NaN"), Decimal(0), None])
def test_unset_or_zero_strike_becomes_null(unset):
    assert map_position(position(strike=unset)).instrument["strike"] is None


def test_empty_strings_stay_empty_and_multiplier_is_null():
    mapped = map_position(
        position(currency="", exchange="", local_symbol="", trading_class="", multiplier="")
    )
    assert mapped.instrument["currency"] == ""
    assert mapped.instrument["exchange"] == ""
    assert mapped.instrument["multiplier"] is None
    assert mapped.instrument["contract_month"] == ""


def test_zero_quantity_is_a_real_value():
    assert map_position(position(quantity="0")).position["quantity"] == 0


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (position(sec_type="WHATEVER"), "unsupported security type"),
        (position(symbol=" "), "has no symbol"),
        (position(con_id=0), "invalid contract id"),
        (position(account=""), "no account id"),
        (position(right="X"), "unknown option right"),
        (position(last_trade_date="2026-13"), "expiry"),
        (position(last_trade_date="20261341"), "not a valid date"),
        (position(quantity=UNSET), "quantity is missing"),
        (position(quantity="1e25"), "too large"),
        (position(multiplier="abc"), "not a number"),
        (position(average_cost="Infinity"), "not a finite number"),
        (position(multiplier="1e15"), "too large"),
        (position(multiplier="1e25"), "too large"),
        (position(multiplier="1E99999999999999999999999"), "out of any number's range"),
    ],
)
def test_unmappable_records_fail_with_a_reason(record, reason):
    with pytest.raises(MappingError, match=reason):
        map_position(record)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20261218", (dt.date(2026, 12, 18), "202612")),
        ("202612", (None, "202612")),
        ("20261218 16:00:00 US/Eastern", (dt.date(2026, 12, 18), "202612")),
        ("", (None, "")),
    ],
)
def test_parse_expiry(text, expected):
    assert parse_expiry(text) == expected


def test_optional_decimal_from_float_keeps_the_wire_digits():
    assert optional_decimal(0.1) == Decimal("0.1")
    assert optional_decimal(1.7976931348623157e308) is None


@pytest.mark.parametrize(
    ("raw", "normalized"), [("U1234567", "U1234567"), (" du7654321 ", "DU7654321")]
)
def test_account_ids_are_normalized(raw, normalized):
    assert normalize_account_id(raw) == normalized


@pytest.mark.parametrize("raw", ["", "1234567", "U12", "U1234567; DROP TABLE", "ALL"])
def test_bad_account_ids_are_rejected(raw):
    with pytest.raises(InvalidAccountId, match="not an IBKR account id"):
        normalize_account_id(raw)


def test_the_gateway_reads_positions_in_the_protocols_layout():
    """The position layout is written once (protocol.POSITION_FIELDS): the gateway's
    unpacking names its fields in that order, and the simulator writes by it."""
    import ast
    import inspect

    from ibkr_sync import protocol
    from ibkr_sync.sources.tws import decoding

    tree = ast.parse(inspect.getsource(decoding._position_from_wire))
    (unpacking,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
    ]
    names = [element.id for element in unpacking.targets[0].elts]
    assert names[2:] == list(protocol.POSITION_FIELDS[2:])

    fields = [f"<{name}>" for name in protocol.POSITION_FIELDS]
    fields[:2] = [str(protocol.POSITION_MESSAGE_ID), protocol.POSITION_VERSION]
    fields[protocol.POSITION_FIELDS.index("con_id")] = "7"
    for name in ("strike", "quantity", "average_cost"):
        fields[protocol.POSITION_FIELDS.index(name)] = "1"
    read = decoding._position_from_wire(fields)
    assert (read.account, read.symbol, read.currency) == ("<account>", "<symbol>", "<currency>")
