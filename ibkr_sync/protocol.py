"""The TWS API's rules for the values we read off the wire: numbers and "no value".

Pure and standard-library only, so the TWS source (which reads) and the simulator (which
writes) share one statement of them.

Numbers. TWS writes integers as plain decimal digits and decimals / doubles as Java and
the official clients print them: an optional minus sign, ASCII digits with an optional
fraction, an optional exponent (`1.5E-7`, `1e-05`, `1E+3`). Python's `Decimal()` and
`int()` accept much more (`+12`, ` 12 `, `1_000`, Arabic-Indic digits, `sNaN`); none of
that is a TWS number, so none of it is read as one.

No value. The TWS API marks a value it does not have with a sentinel, not an empty
field: UNSET_INTEGER (2147483647), UNSET_LONG (9223372036854775807, and its negative
counterpart on some paths), UNSET_DOUBLE (Double.MAX_VALUE, 1.7976931348623157E308),
UNSET_DECIMAL (the empty text, or 2**127 - 1 in the Python client) and NaN. Each of them
means "no value", never the number it happens to be: `parse_decimal` answers `UNSET`
for all of them, whatever the spelling (`1.7976931348623157e+308` is the same double).
"""

from __future__ import annotations

import re
from decimal import Decimal
from enum import Enum
from typing import Final

#: The contract as position and portfolio messages carry it, in wire order.
CONTRACT_FIELDS: Final = (
    "con_id",
    "symbol",
    "sec_type",
    "last_trade_date",
    "strike",
    "right",
    "multiplier",
    "exchange",
    "currency",
    "local_symbol",
    "trading_class",
)
#: The position message (id 61, version 3), field by field, as the client decodes it.
POSITION_MESSAGE_ID: Final = 61
POSITION_VERSION: Final = "3"
POSITION_FIELDS: Final = (
    "msg_id",
    "version",
    "account",
    *CONTRACT_FIELDS,
    "quantity",
    "average_cost",
)
#: The portfolio message (id 7, version 8) that an account-updates subscription sends, one
#: per position: the contract (primary exchange where the position message has the
#: exchange), then IBKR's values of the position and the account it belongs to.
PORTFOLIO_MESSAGE_ID: Final = 7
PORTFOLIO_VERSION: Final = "8"
PORTFOLIO_FIELDS: Final = (
    "msg_id",
    "version",
    *CONTRACT_FIELDS,
    "quantity",
    "market_price",
    "market_value",
    "average_cost",
    "unrealized_pnl",
    "realized_pnl",
    "account",
)
#: An account value (id 6, version 2): tag, value, currency, account. A subscription's
#: first download of them ends with accountDownloadEnd (id 54, version 1, account).
ACCOUNT_VALUE_MESSAGE_ID: Final = 6
ACCOUNT_VALUE_VERSION: Final = "2"
ACCOUNT_VALUE_FIELDS: Final = ("msg_id", "version", "tag", "value", "currency", "account")
ACCOUNT_DOWNLOAD_END_MESSAGE_ID: Final = 54


class _Unset(Enum):
    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


#: What a field that carries one of IBKR's "no value" markers parses to.
UNSET: Final = _Unset.UNSET

#: The longest message the TWS API frames (its clients' MAX_MSG_LEN, 16 MB less a byte): a
#: longer length prefix is no message of a gateway.
MAX_MESSAGE_LENGTH: Final = 0xFFFFFF
UNSET_INTEGER: Final = 2**31 - 1
UNSET_LONG: Final = 2**63 - 1
UNSET_DOUBLE: Final = Decimal("1.7976931348623157E308")
UNSET_DECIMAL: Final = Decimal(2**127 - 1)
# Nothing beyond Double.MAX_VALUE is a double: its full expansion is the same marker.

_UNSET_VALUES: Final = frozenset(
    {Decimal(UNSET_INTEGER), Decimal(UNSET_LONG), -Decimal(UNSET_LONG) - 1, UNSET_DECIMAL}
)
_UNSET_INTEGERS: Final = frozenset({UNSET_INTEGER, UNSET_LONG, -UNSET_LONG - 1})
_DECIMAL_MATCH: Final = re.compile(
    r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
).fullmatch
_INTEGER_MATCH: Final = re.compile(r"-?[0-9]+").fullmatch
_NAN: Final = frozenset({"NaN", "nan"})
_INFINITY: Final = {"Infinity": "Infinity", "inf": "Infinity"}


class WireValueError(ValueError):
    """A field that is not a number in the TWS wire grammar (nor a "no value" marker)."""


def parse_decimal(text: str) -> Decimal | _Unset:
    """A decimal or double field: its exact value, or UNSET for IBKR's "no value".

    Infinity (`Infinity`, as Java prints it) is a number here: whether it can be stored is
    the columns' concern, not the grammar's.
    """
    if type(text) is not str:
        raise WireValueError(f"{text!r} is not wire text")
    if _DECIMAL_MATCH(text) is not None:
        try:
            value = Decimal(text)
        except ArithmeticError:  # an exponent past what any decimal holds (~1e10**18)
            raise WireValueError(f"{_shown(text)} is out of any number's range") from None
        return UNSET if is_unset_value(value) else value
    if text == "" or text in _NAN:
        return UNSET
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    if body in _INFINITY:
        return Decimal(sign + _INFINITY[body])
    raise WireValueError(f"{_shown(text)} is not a number")


def parse_integer(text: str) -> int | _Unset:
    """An integer field: its value, or UNSET for the empty text and the integer markers."""
    if type(text) is not str:
        raise WireValueError(f"{text!r} is not wire text")
    if _INTEGER_MATCH(text) is None:
        if text == "":
            return UNSET
        raise WireValueError(f"{_shown(text)} is not a whole number")
    # Through Decimal past 18 digits: int() refuses texts of more than 4300 digits, and
    # such a field is a value that does not fit its column, not a frame that cannot be read.
    value = int(text) if len(text) <= 18 else int(Decimal(text))
    return UNSET if value in _UNSET_INTEGERS else value


def is_unset_value(value: Decimal) -> bool:
    """Whether a number already read is one of the "no value" markers (or NaN)."""
    if not value.is_finite():
        return value.is_nan()
    # Every marker is at least 2**31 - 1 in magnitude: only such values need a look.
    # copy_abs, not abs(): exact, so no exponent can overflow the context here.
    return value.adjusted() >= 9 and (value in _UNSET_VALUES or value.copy_abs() >= UNSET_DOUBLE)


def _shown(text: str, limit: int = 40) -> str:
    """The offending text for an error message: quoted, cut, never a raw control byte."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
