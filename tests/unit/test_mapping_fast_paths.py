"""The per-record fast paths give exactly what the general rules give.

`map_position` checks a value that plainly fits its column inline and the frame decoder
reads repeated texts once; both must answer, value for value and error for error, what
`_fit` and the wire grammar answer (a fast path that rounds differently, or lets through
what `_fit` refuses, would store another number than the rules say).
"""

from decimal import Decimal

import pytest

from ibkr_sync import conf
from ibkr_sync.mapping import MappingError, _columns_of, _fit, _fit_number, _vendor
from ibkr_sync.protocol import UNSET, WireValueError, parse_decimal
from ibkr_sync.sources.tws.decoding import _quantities, _repeated_decimal

VALUES = [
    "0", "-0", "0.00000", "1", "-1", "0.5", "-0.5", "0.12345678", "0.123456789012",
    "0.00005", "0.00015", "0.000149999", "1.5E-7", "1E+3", "187.5", "-187.5",
    "99999999.99995", "999999999.9999", "9999999999.99995", "99999999999.9", "1E+11",
    "123456789012345.678", "-99999999999999.99995", "1E+20", "12345678901234567890.5",
]  # fmt: skip


def _outcome(call):
    try:
        value = call()
    except MappingError as exc:
        return ("error", str(exc))
    return ("value", value, str(value))


@pytest.mark.parametrize("field", ["quantity", "average_cost", "cost_basis"])
@pytest.mark.parametrize("exact", [False, True])
def test_fit_number_answers_what_fit_answers_on_position_columns(field, exact):
    column, vendor = _columns_of(conf.position_model())[field], _vendor()
    for text in VALUES:
        value = Decimal(text)
        fast = _outcome(lambda v=value: _fit_number(column, v, exact, vendor))
        general = _outcome(lambda v=value: _fit(column, v, exact, vendor))
        assert fast == general, (field, text)


@pytest.mark.parametrize("field", ["strike", "multiplier"])
def test_fit_number_answers_what_fit_answers_on_instrument_columns(field):
    column, vendor = _columns_of(conf.instrument_model())[field], _vendor()
    for text in VALUES:
        value = Decimal(text)
        fast = _outcome(lambda v=value: _fit_number(column, v, False, vendor))
        general = _outcome(lambda v=value: _fit(column, v, False, vendor))
        assert fast == general, (field, text)


def test_fit_number_leaves_what_is_not_a_plain_decimal_to_fit():
    column, vendor = _columns_of(conf.position_model())["quantity"], _vendor()
    for value in (None, Decimal("NaN"), Decimal("Infinity"), 1.5, "1"):
        fast = _outcome(lambda v=value: _fit_number(column, v, True, vendor))
        general = _outcome(lambda v=value: _fit(column, v, True, vendor))
        assert fast == general, value
        assert fast[0] == "error"


def test_a_repeated_text_reads_as_the_grammar_reads_it():
    texts = ["100", "100", "0.5", "", "1.7976931348623157E308", "2147483647", "-3", "1e-05"]
    for text in texts:
        assert _repeated_decimal(_quantities, text) == parse_decimal(text)
        assert (_repeated_decimal(_quantities, text) is UNSET) == (parse_decimal(text) is UNSET)


def test_a_text_that_is_no_number_raises_every_time_and_is_never_kept():
    for _ in range(2):
        with pytest.raises(WireValueError):
            _repeated_decimal(_quantities, "1_000")
    assert "1_000" not in _quantities


@pytest.mark.parametrize("field", ["market_price", "market_value", "unrealized_pnl"])
def test_a_position_value_that_plainly_fits_is_stored_as_the_general_rule_stores_it(field):
    """`_plain_value` (10,000s of position values a sync) answers what the general rule of
    `map_account_values` answers, value for value, or leaves the value to it."""
    from ibkr_sync.mapping import _NOT_PLAIN, _plain_value

    column, vendor = _columns_of(conf.position_model())[field], _vendor()
    taken = 0
    for text in [*VALUES, "1E-12", "-1E-12", "0.000000000049", "1E-10"]:
        value = Decimal(text)
        fast = _plain_value(column, value)
        if fast is _NOT_PLAIN:
            continue
        taken += 1
        fitted = _fit(column, value, False, vendor)
        assert value == 0 or fitted, text  # never a value the general rule refuses
        expected = value if fitted and fitted == value else fitted
        assert (fast, str(fast)) == (expected, str(expected)), text
    assert taken >= len(VALUES) // 2
    assert _plain_value(column, None) is None
