"""Pure functions from the gateway's records to model field values. No I/O, no ORM.

Validation comes first and fails with `MappingError(reason)`: the service counts such a
record in `errors` and leaves its stored row alone. Values are converted with `Decimal`
and tested with `is not None` (0 is a real quantity), never by truthiness.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

from portfolio.decimals import plain
from portfolio.models import DECIMAL_QUANTUM, Account, Broker, Instrument, SecType

from .exceptions import InvalidAccountId
from .gateway import GatewayPosition

BROKER = Broker.IBKR

# IBKR marks "no value" with Double.MAX_VALUE (1.7976931348623157E308) or NaN.
_UNSET_THRESHOLD = Decimal("1e300")
# Integer digits our columns hold (max_digits 30, decimal_places 10).
_MAX_ABS = Decimal(10) ** 20
_MULTIPLIER_QUANTUM = Decimal("0.000001")
_WIDE = Context(prec=40)
_SEC_TYPES = frozenset(SecType.values)
_RIGHTS = {"C": "C", "CALL": "C", "P": "P", "PUT": "P", "": "", "0": "", "?": ""}
_ACCOUNT_ID = re.compile(r"^[A-Z]{1,3}[0-9]{3,12}$")
_EXPIRY = re.compile(r"^(\d{4})(\d{2})(\d{2})?(?:[ \-].*)?$")

# The fields of `Instrument` / `Position` that a sync owns; compared to detect changes.
INSTRUMENT_FIELDS = (
    "symbol",
    "sec_type",
    "currency",
    "exchange",
    "local_symbol",
    "trading_class",
    "multiplier",
    "expiry",
    "contract_month",
    "strike",
    "right",
    "description",
)
POSITION_FIELDS = ("quantity", "average_cost", "cost_basis")


class MappingError(ValueError):
    """A record that cannot be stored faithfully; the message is the reason."""


@dataclass(frozen=True, slots=True)
class MappedPosition:
    account_id: str
    instrument_id: str
    instrument: dict[str, Any]
    position: dict[str, Any]


def normalize_account_id(value: str) -> str:
    """Validate an IBKR account id (U1234567, DU1234567, F1234567, ...) from user input."""
    account_id = (value or "").strip().upper()
    if not _ACCOUNT_ID.match(account_id):
        raise InvalidAccountId(
            f"{value!r} is not an IBKR account id: expected letters then digits, e.g. U1234567."
        )
    return account_id


def is_paper_account(account_id: str) -> bool:
    # IBKR paper-trading accounts start with "D" (DU..., DF...).
    return account_id.startswith("D")


def optional_decimal(value: Decimal | float | str | None) -> Decimal | None:
    """A gateway number as a Decimal, or None for IBKR's unset markers and empty text."""
    if isinstance(value, Decimal):
        number = value
    else:
        text = repr(value) if isinstance(value, float) else str(value or "").strip()
        if not text:
            return None
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise MappingError(f"{value!r} is not a number") from None
    if not number.is_finite() or abs(number) >= _UNSET_THRESHOLD:
        return None
    return number


def _quantize(value: Decimal, what: str, *, exact: bool) -> Decimal:
    if abs(value) >= _MAX_ABS:
        raise MappingError(f"{what} {value} is too large to store")
    # Up to 20 integer and 10 decimal digits: more than the default 28-digit context.
    stored = value.quantize(DECIMAL_QUANTUM, rounding=ROUND_HALF_EVEN, context=_WIDE)
    if exact and stored != value:
        raise MappingError(f"{what} {value} has more than 10 decimal places")
    return stored


def parse_expiry(text: str) -> tuple[dt.date | None, str]:
    """IBKR's lastTradeDateOrContractMonth -> (expiry date or None, 'YYYYMM' or '')."""
    text = (text or "").strip()
    if not text:
        return None, ""
    match = _EXPIRY.match(text)
    if not match:
        raise MappingError(f"expiry {text!r} is not YYYYMM or YYYYMMDD")
    year, month, day = match.groups()
    try:
        parsed = dt.date(int(year), int(month), int(day or 1))
    except ValueError:
        raise MappingError(f"expiry {text!r} is not a valid date") from None
    return (parsed if day else None), f"{year}{month}"


def _describe(record: GatewayPosition, strike: Decimal | None, right: str, mult: Any) -> str:
    parts = [record.local_symbol or record.symbol]
    if record.sec_type in {"OPT", "FOP", "WAR"}:
        if record.local_symbol:
            parts = [record.symbol]
        if record.last_trade_date:
            parts.append(record.last_trade_date.split()[0])
        if strike is not None:
            parts.append(plain(strike))
        if right:
            parts.append(right)
    elif record.sec_type in {"FUT"} and record.last_trade_date and not record.local_symbol:
        parts.append(record.last_trade_date.split()[0])
    if mult is not None and mult != 1:
        parts.append(f"x{plain(mult)}")
    return " ".join(parts)[:255]


_TEXT_FIELDS = ("symbol", "currency", "exchange", "local_symbol", "trading_class")
_ACCOUNT_ID_LENGTH = Account._meta.get_field("external_id").max_length


def _max_length(name: str) -> int:
    return Instrument._meta.get_field(name).max_length


def is_storable_account_id(value: str) -> bool:
    """Whether an account id as the gateway sent it fits the Account table as it is."""
    return bool(value) and len(value) <= _ACCOUNT_ID_LENGTH and "\x00" not in value


def _check_text(value: str, what: str, max_length: int) -> None:
    """Text the columns can hold as it is: never silently cut, never a NUL byte."""
    if len(value) > max_length:
        raise MappingError(f"{what} is {len(value)} characters long (at most {max_length})")
    if "\x00" in value:
        raise MappingError(f"{what} contains a NUL character")


def map_position(record: GatewayPosition) -> MappedPosition:
    """One gateway position -> field values for its Instrument and Position rows."""
    if not record.account:
        raise MappingError("no account id")
    if record.con_id is None or int(record.con_id) <= 0:
        raise MappingError(f"invalid contract id {record.con_id!r}")
    if not (record.symbol or "").strip():
        raise MappingError(f"contract {record.con_id} has no symbol")
    sec_type = (record.sec_type or "").strip().upper()
    if sec_type not in _SEC_TYPES:
        raise MappingError(f"unsupported security type {record.sec_type!r}")
    right_text = (record.right or "").strip().upper()
    if right_text not in _RIGHTS:
        raise MappingError(f"unknown option right {record.right!r}")

    quantity = optional_decimal(record.quantity)
    if quantity is None:
        raise MappingError("quantity is missing")
    quantity = _quantize(quantity, "quantity", exact=True)
    average_cost = optional_decimal(record.average_cost)
    if average_cost is not None:
        average_cost = _quantize(average_cost, "average cost", exact=False)
    cost_basis = (
        _quantize(quantity * average_cost, "cost basis", exact=False)
        if average_cost is not None
        else None
    )

    strike = optional_decimal(record.strike)
    if strike is not None:
        strike = None if strike == 0 else _quantize(strike, "strike", exact=False)
    multiplier = optional_decimal(record.multiplier)
    if multiplier is not None:
        multiplier = None if multiplier == 0 else multiplier.quantize(_MULTIPLIER_QUANTUM)
    expiry, contract_month = parse_expiry(record.last_trade_date)
    right = _RIGHTS[right_text]

    _check_text(record.account, "account id", _ACCOUNT_ID_LENGTH)
    instrument = {
        "symbol": record.symbol.strip(),
        "sec_type": sec_type,
        "currency": (record.currency or "").strip().upper(),
        "exchange": (record.exchange or record.primary_exchange or "").strip(),
        "local_symbol": (record.local_symbol or "").strip(),
        "trading_class": (record.trading_class or "").strip(),
        "multiplier": multiplier,
        "expiry": expiry,
        "contract_month": contract_month,
        "strike": strike,
        "right": right,
        "description": _describe(record, strike, right, multiplier),
    }
    for name in _TEXT_FIELDS:
        _check_text(instrument[name], name.replace("_", " "), _max_length(name))
    return MappedPosition(
        account_id=record.account,
        instrument_id=str(int(record.con_id)),
        instrument=instrument,
        position={
            "quantity": quantity,
            "average_cost": average_cost,
            "cost_basis": cost_basis,
        },
    )
