"""Pure functions from a source's records (`snapshot.py`) to model field values. No I/O,
no ORM, and nothing of any source: no tag, no wire message.

Validation comes first and fails with `MappingError(reason)`: the service counts such a
record in `errors` and leaves its stored row alone. Values are converted with `Decimal`
and tested with `is not None` (0 is a real quantity), never by truthiness.

Every value is checked against the column it goes to before anything is written, by one
mechanism (`fit`) that reads the bounds off the model fields themselves: a CharField's
length, a DecimalField's digits and places (and what SQLite can hand back), an integer
column's range, a field's choices. A value that does not fit is the record's error; it
never reaches the database, where it would fail the whole sync (PostgreSQL) or be stored
in a form that cannot be read back (SQLite).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from functools import cache
from typing import Any

from django.db import connection, models

from . import conf
from . import snapshot as snapshot_module
from .decimals import plain
from .exceptions import InvalidAccountId
from .models import Broker, SecType, is_rate
from .outcomes import RecordError, ValuesOutcome, storable
from .protocol import UNSET, WireValueError, is_unset_value, parse_decimal
from .snapshot import (
    CASH,
    EXCHANGE_RATE,
    TOTALS,
    AccountValues,
    CashTransaction,
    Contract,
    CorporateAction,
    CurrencyError,
    DeferredPositions,
    LedgerBatch,
    PositionRecord,
    Snapshot,
    Trade,
    link_withholding,
    positions_digest,
)
from .snapshot import currency_code as _currency_code
from .snapshot import shown as _short

BROKER = Broker.IBKR

_SEC_TYPES = frozenset(SecType.values)
_RIGHTS = {"C": "C", "CALL": "C", "P": "P", "PUT": "P", "": "", "0": "", "?": ""}
_ACCOUNT_ID = re.compile(r"^[A-Z]{1,3}[0-9]{3,12}$")
_EXPIRY = re.compile(r"^([0-9]{4})([0-9]{2})([0-9]{2})?(?:[ \-].*)?$", re.DOTALL)

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
#: The Position fields a sync fills from IBKR's portfolio values (and `valued_at`).
POSITION_VALUE_FIELDS = ("market_price", "market_value", "unrealized_pnl", "realized_pnl")


class MappingError(ValueError):
    """A record that cannot be stored faithfully; the message is the reason."""


def currency_code(value: Any) -> str:
    """A currency code in the one form the product stores and compares: three ASCII
    letters, upper case. IBKR's `usd` or `Usd` is USD (the same currency, so the same
    row); anything else is not a code, and MappingError says so (never a row of its own,
    never a base currency). The rule is `snapshot.currency_code`, which sources apply."""
    try:
        return _currency_code(value)
    except CurrencyError as exc:
        raise MappingError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class MappedPosition:
    account_id: str
    instrument_id: str
    instrument: dict[str, Any]
    position: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MappedValues:
    """One account's values as its columns store them.

    `cash` has a row per currency IBKR reported a cash balance for: the account's whole
    cash, which replaces the stored set, unless `cash_kept_reason` says why this download's
    cash cannot be trusted whole (then `cash` is empty and the stored rows are kept
    exactly as they are). `exchange_rates` are every rate IBKR reported that converts, to
    the base currency. `positions` has the
    values (in the order of POSITION_VALUE_FIELDS: a tuple, as 10,000s of them are held
    at once) by instrument (conId text) for every position whose values belong to the
    quantity synced; `stale` counts those whose portfolio row stated another
    quantity (a trade between the two reads), `unvalued` those IBKR sent no portfolio row
    for: both are left as they were.
    """

    account_id: str
    base_currency: str
    snapshot: dict[str, Any]
    cash: dict[str, dict[str, Any]]
    cash_kept_reason: str
    cash_reported: bool
    exchange_rates: dict[str, Decimal]
    positions: dict[str, tuple[Decimal | None, ...]]
    stale: int
    unvalued: int
    errors: list[RecordError]


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
    """A gateway number as a Decimal, or None for IBKR's "no value" markers.

    Text is read with the TWS wire grammar (`protocol.parse_decimal`), a float as the
    shortest decimal that round-trips; a Decimal (the gateway has read it already) is
    taken as it is, unless it is one of the markers (NaN, UNSET_DOUBLE, ...).
    """
    if value is None:
        return None
    if isinstance(value, Decimal):
        return None if is_unset_value(value) else value
    try:
        number = parse_decimal(repr(value) if isinstance(value, float) else str(value))
    except WireValueError as exc:
        raise MappingError(str(exc)) from None
    return None if number is UNSET else number


# --- column bounds --------------------------------------------------------------------------

# SQLite keeps 15 significant digits of a decimal and Django quantizes what it reads back
# within the column's digits: a value that rounds up past them cannot be read.
_SQLITE_DIGITS = Context(prec=15)


@dataclass(frozen=True, slots=True)
class _Column:
    """What one column holds, read off its model field once."""

    label: str
    null: bool
    decimal: bool = False
    text: bool = False
    integer: bool = False
    whole: int = 0  # digits before the decimal point
    places: int = 0
    quantum: Decimal | None = None
    limit: Decimal | None = None  # every stored decimal is below this in magnitude
    context: Context | None = None
    max_length: int | None = None
    low: int | None = None
    high: int | None = None
    choices: frozenset | None = None
    blank: bool = False


def _column(field: models.Field) -> _Column:
    common = {
        "label": str(field.verbose_name),
        "null": field.null,
        "blank": field.blank,
        "choices": frozenset(key for key, _ in field.flatchoices) if field.choices else None,
    }
    if isinstance(field, models.DecimalField):
        whole = field.max_digits - field.decimal_places
        return _Column(
            decimal=True,
            whole=whole,
            places=field.decimal_places,
            quantum=Decimal(1).scaleb(-field.decimal_places),
            limit=Decimal(10) ** whole,
            context=Context(prec=field.max_digits + 2),
            **common,
        )
    if isinstance(field, models.CharField):
        return _Column(text=True, max_length=field.max_length, **common)
    if isinstance(field, models.IntegerField):
        low, high = connection.ops.integer_field_range(field.get_internal_type())
        return _Column(integer=True, low=low, high=high, **common)
    return _Column(**common)


@cache
def _vendor() -> str:
    return connection.vendor


_columns: dict[type[models.Model], dict[str, _Column]] = {}


def _columns_of(model: type[models.Model]) -> dict[str, _Column]:
    """The model's columns by field name, read once (the sync maps 10,000s of records)."""
    columns = _columns.get(model)
    if columns is None:
        columns = {f.name: _column(f) for f in model._meta.concrete_fields}
        _columns[model] = columns
    return columns


def fit(model: type[models.Model], values: dict[str, Any], *, exact: tuple[str, ...] = ()):
    """`values` as `model`'s columns store them, or MappingError naming the one that does not
    fit. Decimals are rounded half-even to their column's places, except the fields named
    in `exact` (a quantity is never rounded: more places than the column has is an error)."""
    columns, vendor = _columns_of(model), _vendor()
    return {
        name: _fit(columns[name], value, name in exact, vendor) for name, value in values.items()
    }


def _fit(column: _Column, value: Any, exact: bool, vendor: str) -> Any:
    if value is None:
        if not column.null:
            raise MappingError(f"{column.label} is missing")
        return None
    if column.decimal:
        value = _fit_decimal(column, value, exact, vendor)
    elif column.text:
        if not (
            type(value) is str
            and len(value) <= column.max_length
            and value.isascii()
            and "\x00" not in value
        ):
            _fit_text(column, value)
    elif column.integer and not (
        isinstance(value, int)
        and (column.low is None or value >= column.low)
        and (column.high is None or value <= column.high)
    ):
        raise MappingError(f"{column.label} {_short(value)} is out of range")
    if (
        column.choices is not None
        and value not in column.choices
        and not (value == "" and column.blank)
    ):
        raise MappingError(f"{column.label} {_short(value)} is not one of the known values")
    return value


def _fit_decimal(column: _Column, value: Any, exact: bool, vendor: str) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise MappingError(f"{column.label} {_short(value)} is not a finite number")
    if value and value.adjusted() >= column.whole:
        raise _too_large(column, value)
    try:
        stored = value.quantize(column.quantum, rounding=ROUND_HALF_EVEN, context=column.context)
    except InvalidOperation:
        raise _too_large(column, value) from None
    if stored and stored.adjusted() >= column.whole - 1:  # rounding may reach the limit
        shown = _SQLITE_DIGITS.create_decimal(stored) if vendor == "sqlite" else stored
        if abs(stored) >= column.limit or abs(shown) >= column.limit:
            raise _too_large(column, value)
    if exact and stored != value:
        raise MappingError(
            f"{column.label} {_short(value)} has more than {column.places} decimal places"
        )
    return stored if stored else abs(stored)  # no negative zero


def _too_large(column: _Column, value: Decimal) -> MappingError:
    return MappingError(
        f"{column.label} {_short(value)} is too large to store (the column holds "
        f"{column.whole} digits before the decimal point)"
    )


def _fit_text(column: _Column, value: Any) -> None:
    """Text the column holds as it is: never silently cut, never a NUL or lone surrogate."""
    if not isinstance(value, str):
        raise MappingError(f"{column.label} is not text")
    if column.max_length is not None and len(value) > column.max_length:
        raise MappingError(
            f"{column.label} is {len(value)} characters long (at most {column.max_length})"
        )
    if "\x00" in value:
        raise MappingError(f"{column.label} contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MappingError(f"{column.label} is not valid text") from None


def contract_id_text(con_id: int) -> str:
    """The conId as the Instrument's external_id (a conId of any length, without int's
    4300-digit limit on str())."""
    return format(Decimal(con_id), "f")


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


def _describe(
    record: PositionRecord, sec_type: str, strike: Decimal | None, right: str, mult: Any
) -> str:
    """A readable one-line name, by the validated (upper-cased) security type."""
    parts = [(record.local_symbol or record.symbol).strip()]
    if sec_type in {"OPT", "FOP", "WAR"}:
        if record.local_symbol:
            parts = [record.symbol.strip()]
        parts += record.last_trade_date.split()[:1]
        if strike is not None:
            parts.append(plain(strike))
        if right:
            parts.append(right)
    elif sec_type == "FUT" and not record.local_symbol:
        parts += record.last_trade_date.split()[:1]
    if mult is not None and mult != 1:
        parts.append(f"x{plain(mult)}")
    return " ".join(parts)


def is_storable_account_id(value: str) -> bool:
    """Whether an account id as the gateway sent it fits the Account table as it is."""
    if not value:
        return False
    try:
        fit(conf.account_model(), {"external_id": value})
    except MappingError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _PositionColumns:
    """The columns `map_position` fits a record to, for one set of models and database:
    resolved once, not looked up field by field for each of 10,000s of records."""

    quantity: _Column
    average_cost: _Column
    cost_basis: _Column
    strike: _Column
    multiplier: _Column
    account_id: _Column
    instrument_id: _Column
    # The instrument's text fields, in the order they are checked.
    texts: tuple[tuple[str, _Column], ...]
    description_length: int | None
    # What decides how a record maps to these models here: equal signatures, equal rows.
    signature: str


_TEXT_FIELDS = (
    "symbol",
    "sec_type",
    "currency",
    "exchange",
    "local_symbol",
    "trading_class",
    "right",
    "contract_month",
    "description",
)
_position_columns: dict[tuple[type[models.Model], ...], _PositionColumns] = {}


def _columns_for_positions() -> _PositionColumns:
    models_ = (conf.position_model(), conf.instrument_model(), conf.account_model())
    found = _position_columns.get(models_)
    if found is None:
        held, contract = _columns_of(models_[0]), _columns_of(models_[1])
        found = _position_columns[models_] = _PositionColumns(
            signature=_signature(models_),
            quantity=held["quantity"],
            average_cost=held["average_cost"],
            cost_basis=held["cost_basis"],
            strike=contract["strike"],
            multiplier=contract["multiplier"],
            account_id=_columns_of(models_[2])["external_id"],
            instrument_id=contract["external_id"],
            texts=tuple((name, contract[name]) for name in _TEXT_FIELDS),
            description_length=contract["description"].max_length,
        )
    return found


def _signature(models_: tuple[type[models.Model], ...]) -> str:
    """What the rows of a record depend on besides the record: this code (the mapping's,
    the records' and the writer's modules, as installed), the models and every column's bounds, the
    database. A stored digest of an account's positions (`MappedSnapshot.digests`) holds
    only while all of it is the same: any upgrade, migration or other database maps
    every record again once."""
    digest = hashlib.blake2b(digest_size=20)
    writer = os.path.join(os.path.dirname(__file__), "writer.py")  # it imports this module
    for module in (__file__, snapshot_module.__file__, writer):
        try:
            with open(module, "rb") as source:
                digest.update(source.read())
        except OSError:  # no source to read (a frozen install): the models still count
            digest.update(module.encode())
    digest.update(_vendor().encode())
    for model in models_:
        digest.update(model._meta.label.encode())
        for name, column in sorted(_columns_of(model).items()):
            shape = (
                name,
                column.null,
                column.decimal,
                column.text,
                column.integer,
                column.whole,
                column.places,
                column.max_length,
                column.low,
                column.high,
                column.blank,
                sorted(map(str, column.choices or ())),
            )
            digest.update(repr(shape).encode())
    return digest.hexdigest()


def _fit_number(column: _Column, value: Any, exact: bool, vendor: str) -> Any:
    """`_fit` of a decimal column, with a fast path for the common case: a finite Decimal
    at least ten times below the column's limit, which no rounding can bring to it (and
    which SQLite's 15 digits cannot either), rounded to the column's places exactly as
    `_fit_decimal` rounds it. Anything else (None, too large, a quantity with too many
    places, a column with choices) takes `_fit`, which says what is wrong."""
    if (
        type(value) is Decimal
        and column.decimal
        and column.choices is None
        and value.is_finite()
        and value.adjusted() < column.whole - 1
    ):
        stored = value.quantize(column.quantum, rounding=ROUND_HALF_EVEN, context=column.context)
        if not exact or stored == value:
            return stored if stored else abs(stored)  # no negative zero
    return _fit(column, value, exact, vendor)


def _fit_texts(columns: tuple[tuple[str, _Column], ...], values: dict[str, Any], vendor: str):
    """`_fit` of each text column, in order, inline where a value plainly fits: short ASCII
    text without a NUL, in the column's choices (if it has any)."""
    for name, column in columns:
        value = values[name]
        if not _plainly_fits(column, value):
            _fit(column, value, False, vendor)


def _plainly_fits(column: _Column, value: Any) -> bool:
    return (
        column.text
        and column.max_length is not None
        and type(value) is str
        and len(value) <= column.max_length
        and value.isascii()
        and "\x00" not in value
        and (column.choices is None or value in column.choices)
    )


def _record_decimal(value: Any) -> Decimal | None:
    """`optional_decimal`, inline for what a source gives most: a Decimal it has read,
    far below every "no value" marker (all of them at least 2**31 - 1 in magnitude)."""
    if type(value) is Decimal and value.is_finite() and value.adjusted() < 9:
        return value
    return optional_decimal(value)


# What repeats across records, worked out once per distinct text: the multipliers (a
# handful), the expiries (dozens), the contract ids' texts are not (each is its own).
_CACHE_LIMIT = 4096
_multipliers: dict[str, Decimal | None] = {}
_expiries: dict[str, tuple[dt.date | None, str]] = {}


def _multiplier(value: Any) -> Decimal | None:
    if type(value) is not str:
        return optional_decimal(value)
    number = _multipliers.get(value, _multipliers)
    if number is _multipliers:
        number = optional_decimal(value)  # raises for text that is not a number: not kept
        if len(_multipliers) >= _CACHE_LIMIT:
            _multipliers.clear()
        _multipliers[value] = number
    return number


def _expiry(text: Any) -> tuple[dt.date | None, str]:
    if type(text) is not str:
        return parse_expiry(text)
    parsed = _expiries.get(text)
    if parsed is None:
        parsed = parse_expiry(text)  # raises for text that is not an expiry: not kept
        if len(_expiries) >= _CACHE_LIMIT:
            _expiries.clear()
        _expiries[text] = parsed
    return parsed


def _contract_id_text(con_id: int) -> str:
    # str() of an int is its digits, as contract_id_text gives them; past 18 digits (and
    # int's limit on str()), through contract_id_text.
    if type(con_id) is int and -(10**18) < con_id < 10**18:
        return str(con_id)
    return contract_id_text(con_id)


def map_position(record: PositionRecord) -> MappedPosition:
    """One gateway position -> field values for its Instrument and Position rows, each
    checked against its column (`fit`).

    10,000s of records a sync: the columns are resolved once (`_columns_for_positions`),
    values that plainly fit are checked inline and the rest by `_fit` (which words the
    error), and what repeats across records (multipliers, expiries) is read once."""
    if not record.account:
        raise MappingError("no account id")
    if record.con_id is None or int(record.con_id) <= 0:
        raise MappingError(f"invalid contract id {_short(record.con_id)}")
    if not (record.symbol or "").strip():
        raise MappingError(f"contract {_short(record.con_id)} has no symbol")
    sec_type = (record.sec_type or "").strip().upper()
    if sec_type not in _SEC_TYPES:
        raise MappingError(f"unsupported security type {_short(record.sec_type)!r}")
    right_text = (record.right or "").strip().upper()
    if right_text not in _RIGHTS:
        raise MappingError(f"unknown option right {_short(record.right)!r}")

    quantity = _record_decimal(record.quantity)
    if quantity is None:
        raise MappingError("quantity is missing")
    vendor = _vendor()
    columns = _columns_for_positions()
    quantity = _fit_number(columns.quantity, quantity, True, vendor)
    average_cost = record.average_cost
    if average_cost is not None:
        average_cost = _record_decimal(average_cost)
    average_cost = _fit_number(columns.average_cost, average_cost, False, vendor)
    # From the values as stored, so that it is exactly quantity x stored average cost.
    cost_basis = None if average_cost is None else quantity * average_cost
    position = {
        "quantity": quantity,
        "average_cost": average_cost,
        "cost_basis": _fit_number(columns.cost_basis, cost_basis, False, vendor),
    }

    strike = record.strike
    if strike is not None:
        strike = _record_decimal(strike)
    strike = _fit_number(columns.strike, None if strike == 0 else strike, False, vendor)
    multiplier = _multiplier(record.multiplier) if record.multiplier is not None else None
    multiplier = _fit_number(
        columns.multiplier, None if multiplier == 0 else multiplier, False, vendor
    )
    expiry, contract_month = _expiry(record.last_trade_date)
    right = _RIGHTS[right_text]
    account = record.account
    if not _plainly_fits(columns.account_id, account):
        _fit(columns.account_id, account, False, vendor)
    instrument_id = _contract_id_text(record.con_id)
    if not _plainly_fits(columns.instrument_id, instrument_id):
        _fit(columns.instrument_id, instrument_id, False, vendor)
    currency = record.currency
    instrument = {
        "symbol": record.symbol.strip(),
        "sec_type": sec_type,
        # IBKR may send none (stored empty: unknown); anything sent must be a code.
        "currency": currency_code(currency) if currency else "",
        "exchange": (record.exchange or record.primary_exchange or "").strip(),
        "local_symbol": (record.local_symbol or "").strip(),
        "trading_class": (record.trading_class or "").strip(),
        "right": right,
        "contract_month": contract_month,
        # Derived, so cut to its column rather than refused.
        "description": _describe(record, sec_type, strike, right, multiplier)[
            : columns.description_length
        ],
    }
    _fit_texts(columns.texts, instrument, vendor)
    instrument["strike"] = strike
    instrument["multiplier"] = multiplier
    instrument["expiry"] = expiry
    return MappedPosition(
        account_id=account,
        instrument_id=instrument_id,
        instrument=instrument,
        position=position,
    )


def map_account_values(
    values: AccountValues, held: dict[int, tuple[Decimal, str, str, str]]
) -> MappedValues:
    """An account's values -> AccountSnapshot, CashBalance and Position value fields.

    `held` is the account's positions being synced, by conId: (quantity, symbol, sec
    type, instrument id). A value that does not fit its column is an error entry and
    stored as nothing (never as zero): the snapshot's field is empty, the position's
    values are left as they were.

    Which figure is which, and in which currency, the source has decided (its
    `AccountValues`, every currency a code); what it could not interpret (`problems`)
    is an error entry each.

    Exchange rates: every rate IBKR sent is kept (in the snapshot, to the base currency),
    whether or not the account holds cash in its currency, if it converts (positive and
    finite); any other is an error entry naming the currency and the rate.

    Cash: the stored set is replaced only by a complete, readable set of per-currency
    balances. A download with none (nothing, or only IBKR's BASE total), or with any
    balance unset, unstorable or under a non-code (`cash_problems`), cannot be trusted
    whole: the stored rows are kept exactly as they are, and `cash_kept_reason` says why.
    """
    account = values.account
    errors: list[RecordError] = []
    snapshot_model = conf.account_snapshot_model()
    columns, vendor = _columns_of(snapshot_model), _vendor()
    cash_columns = _columns_of(conf.cash_balance_model())

    def refuse(label: str, reason: object, con_id: Any = None, **where: str) -> None:
        errors.append(
            RecordError(
                account=account,
                con_id=con_id,
                symbol=where.get("symbol", label),
                sec_type=where.get("sec_type", ""),
                reason=f"{label}: {reason}",
            )
        )

    def stored(column: _Column, value: Any, label: str, con_id: Any = None, **where) -> Any:
        try:
            fitted = _fit(column, value, False, vendor)
            if value and not fitted:  # a rate of 1E-12 is not a rate of 0
                raise MappingError(
                    f"{_short(value)} rounds to 0 at the column's {column.places} decimal places"
                )
            # The value as read where it fits as it is: 10,000s are held until written.
            return value if fitted and fitted == value else fitted
        except MappingError as exc:
            refuse(label, exc, con_id, **where)
            raise

    for problem in values.problems:
        refuse(problem.label, problem.reason)
    base = values.base_currency
    snapshot: dict[str, Any] = {"currency": base}
    for name in TOTALS:
        label = f"{values.name_of(name)} ({base or 'base'})"
        try:
            snapshot[name] = stored(columns[name], values.totals.get(name), label)
        except MappingError:
            snapshot[name] = None

    rates: dict[str, Decimal] = {}
    reported_rates: dict[str, Decimal] = {}  # as sent, where the column holds it
    rate_name = values.name_of(EXCHANGE_RATE)
    for currency, rate in values.exchange_rates.items():
        label = f"{rate_name} ({currency})"
        if rate is None:
            refuse(label, f"IBKR sent no value: {currency} amounts are not converted")
        elif not is_rate(rate):
            refuse(label, f"{_short(rate)} is not a positive rate: {currency} amounts are "
                          "not converted")  # fmt: skip
            # Kept with its balance as sent, so that what reads it can say why it is no rate.
            with contextlib.suppress(MappingError):
                reported_rates[currency] = _fit(cash_columns["exchange_rate"], rate, False, vendor)
        else:
            with contextlib.suppress(MappingError):
                rates[currency] = reported_rates[currency] = stored(
                    cash_columns["exchange_rate"], rate, label
                )
    # Rates convert to the base currency of the download: none known, nothing to keep.
    snapshot["exchange_rates"] = {c: plain(r) for c, r in sorted(rates.items())} if base else {}

    cash: dict[str, dict[str, Any]] = {}
    untrusted = list(values.cash_problems)
    cash_reported = bool(untrusted) or values.cash_total_reported or bool(values.cash)
    cash_name = values.name_of(CASH)
    for currency, amount in values.cash.items():
        if amount is None:
            untrusted.append(f"IBKR sent no value for the {currency} balance")
            continue
        try:
            amount = stored(cash_columns["amount"], amount, f"{cash_name} ({currency})")
        except MappingError:
            untrusted.append(f"the {currency} balance cannot be stored")
            continue
        rate = reported_rates.get(currency)
        cash[currency] = {
            "amount": amount,
            "exchange_rate": rate,
            "rate_currency": base if rate is not None else "",
        }
    if not cash_reported:
        untrusted.append("IBKR sent no cash balance")
    elif not cash and not untrusted:
        # No amount in a reason: sync run viewers read it, who may not view cash.
        untrusted.append("IBKR sent only the BASE total of the cash, no balance per currency")
    if untrusted:
        cash = {}

    position_columns = _columns_of(conf.position_model())
    value_columns = tuple((name, position_columns[name]) for name in POSITION_VALUE_FIELDS)
    positions: dict[str, tuple[Decimal | None, ...]] = {}
    stale = 0
    unvalued = sum(1 for con_id in held if con_id not in values.positions)
    for con_id, value in values.positions.items():
        position = held.get(con_id)
        if position is None:
            continue  # a position not synced (closed, or not mappable): nothing to value
        quantity, symbol, sec_type, instrument_id = position
        if value.quantity != quantity:
            stale += 1
            continue
        row = []
        try:
            for name, column in value_columns:
                number = getattr(value, name)
                fitted = _plain_value(column, number)  # 10,000s: inline where it plainly fits
                if fitted is _NOT_PLAIN:
                    label = str(column.label)
                    fitted = stored(column, number, label, con_id, symbol=symbol, sec_type=sec_type)
                row.append(fitted)
        except MappingError:
            continue
        positions[instrument_id] = tuple(row)
    return MappedValues(
        account_id=account,
        base_currency=snapshot["currency"],
        snapshot=snapshot,
        cash=cash,
        cash_kept_reason="; ".join(untrusted),
        cash_reported=cash_reported,
        exchange_rates=rates if base else {},
        positions=positions,
        stale=stale,
        unvalued=unvalued,
        errors=errors,
    )


_NOT_PLAIN = object()


def _plain_value(column: _Column, value: Any) -> Any:
    """A value as `map_account_values` stores it, where that plainly needs no check: None
    in a nullable column; a finite Decimal ten times below the column's limit, rounded to
    its places as `_fit_decimal` rounds it, that does not round to 0 (the value as read
    where it fits as it is; a zero as `_fit_decimal` stores it). Anything else is
    `_NOT_PLAIN`: `stored` decides, and words the error."""
    if value is None:
        return None if column.null else _NOT_PLAIN
    if (
        type(value) is Decimal
        and column.decimal
        and column.choices is None
        and value.is_finite()
        and value.adjusted() < column.whole - 1
    ):
        fitted = value.quantize(column.quantum, rounding=ROUND_HALF_EVEN, context=column.context)
        if fitted:
            return value if fitted == value else fitted
        if not value:
            return abs(fitted)  # no negative zero
    return _NOT_PLAIN


def _fits_quietly(column: _Column, value: Any, vendor: str) -> bool:
    try:
        _fit(column, value, False, vendor)
    except MappingError:
        return False
    return True


# --- a whole snapshot -------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedSnapshot:
    """A snapshot as its rows store it, mapped before the write transaction so that the
    writer only writes.

    - `accounts`: the accounts to reconcile, sorted: every account reported whose id the
      Account table can store (an id that cannot be stored belongs to records already
      counted as errors).
    - `positions`: the mapped positions by (account, conId text); `unmapped`: the
      (account, conId text) of records that could not be mapped (their stored rows are
      left exactly as they were, not closed).
    - `processed`: the records read per account (as the source named it).
    - `errors`: the records that could not be stored: positions, then values.
    - `values`: the mapped values of the accounts whose values were read, with the
      moment they describe (`values_as_of`, None if the source gave none); `outcomes`:
      per account, whether its values were read, when values were asked for
      (`values_read`).
    """

    source: str
    as_of: dt.datetime | None
    accounts: tuple[str, ...]
    positions: dict[tuple[str, str], MappedPosition]
    unmapped: frozenset[tuple[str, str]]
    processed: Counter
    errors: tuple[RecordError, ...]
    values_read: bool = False
    values: dict[str, MappedValues] = dataclass_field(default_factory=dict)
    values_as_of: dict[str, dt.datetime | None] = dataclass_field(default_factory=dict)
    outcomes: dict[str, ValuesOutcome] = dataclass_field(default_factory=dict)
    # The ledger, by kind (the kinds the host keeps: `conf.ledger_models()`), each row by
    # its external id; the instruments its rows name, by conId text. Empty when the
    # source read no ledger (`ledger_read`) or the host keeps none.
    ledger_read: bool = False
    ledger: dict[str, dict[str, MappedLedgerRow]] = dataclass_field(default_factory=dict)
    ledger_instruments: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)
    # A ledger handed on as a stream (`Snapshot.ledger`): its batches, each mapped when
    # the writer comes to it, inside the write transaction (`ledger` then holds an empty
    # dict per kind kept, and the batches' errors are not in `errors`).
    ledger_stream: Callable[[], Iterator[MappedLedger]] | None = None
    # Per account, the digest of its positions as this snapshot reports them, with the
    # number of its records (`<digest>:<records>`; "" when it cannot be told: a source
    # without fingerprints, a record that could not be mapped); `unchanged`: the accounts
    # whose digest is the one stored for them (`known`), so their stored positions are
    # exactly these records and were not mapped again, with the number of their records.
    digests: dict[str, str] = dataclass_field(default_factory=dict)
    unchanged: dict[str, int] = dataclass_field(default_factory=dict)
    # The history of each account's values (Flex: a day each), as AccountSnapshot fields
    # by the moment they describe (the day's end), oldest first.
    daily: dict[str, tuple[tuple[dt.datetime, dict[str, Any]], ...]] = dataclass_field(
        default_factory=dict
    )
    # The period the source read (both days included), None for a moment.
    period: tuple[dt.date, dt.date] | None = None
    # The source's digest of all it read (`Snapshot.statement_digest`), "" for none.
    statement_digest: str = ""

    def ledger_batches(self) -> Iterator[MappedLedger]:
        """The mapped ledger, batch by batch: the one mapped before the write (its errors
        counted in `errors` already), then the stream's, mapped as they come."""
        if any(self.ledger.values()):
            yield MappedLedger(self.ledger, self.ledger_instruments, {})
        if self.ledger_stream is not None:
            yield from self.ledger_stream()

    def as_of_of(self, account: str, now: dt.datetime) -> dt.datetime:
        """The moment an account's data describes: its values' if read, else the
        snapshot's, else (a source that gives none) `now`, the write's."""
        return self.values_as_of.get(account) or self.as_of or now

    def without(self, accounts: set[str] | frozenset[str]) -> MappedSnapshot:
        """The same snapshot with nothing of `accounts` (refused: not written, not counted):
        neither their state nor their history, the ledger's rows and errors of a stream's
        batches included (left out as each batch is mapped)."""
        if not accounts:
            return self
        stream = self.ledger_stream
        return replace(
            self,
            accounts=tuple(a for a in self.accounts if a not in accounts),
            positions={k: v for k, v in self.positions.items() if k[0] not in accounts},
            unmapped=frozenset(k for k in self.unmapped if k[0] not in accounts),
            processed=Counter({a: n for a, n in self.processed.items() if a not in accounts}),
            errors=tuple(e for e in self.errors if e.account not in accounts),
            values={a: v for a, v in self.values.items() if a not in accounts},
            values_as_of={a: t for a, t in self.values_as_of.items() if a not in accounts},
            outcomes={a: o for a, o in self.outcomes.items() if a not in accounts},
            ledger={
                kind: {k: row for k, row in rows.items() if row.account_id not in accounts}
                for kind, rows in self.ledger.items()
            },
            ledger_stream=None if stream is None else _stream_without(stream, accounts),
            digests={a: d for a, d in self.digests.items() if a not in accounts},
            unchanged={a: n for a, n in self.unchanged.items() if a not in accounts},
            daily={a: days for a, days in self.daily.items() if a not in accounts},
        )


def map_snapshot(snapshot: Snapshot, known: Mapping[str, str] | None = None) -> MappedSnapshot:
    """A whole snapshot -> its rows' field values (`map_position` per record, then the
    values of every account read, `map_account_values`). No I/O: the service runs it
    before the write transaction.

    `known`: per account, the digest of the positions last written for it. An account
    whose records have that digest now is not mapped again (`MappedSnapshot.unchanged`):
    its stored rows are exactly what mapping them would give. A source's positions that
    are decoded when asked for (`DeferredPositions`) are not even decoded for such an
    account, unless the values read need them."""
    keys = _digests(snapshot)
    # The accounts whose digest is the one stored: their stored text, and so the number
    # of their records (as many as when it was stored: the same messages).
    unchanged = {a: _written(known.get(a, ""), key) for a, key in keys.items() if key and known}
    unchanged = {a: written for a, written in unchanged.items() if written is not None}
    processed: Counter = Counter()
    errors: list[RecordError] = []
    mapped: dict[tuple[str, str], MappedPosition] = {}
    unmapped: set[tuple[str, str]] = set()
    held_unchanged: dict[str, dict[int, tuple[Decimal, str, str, str]]] = {}
    columns, vendor = _columns_for_positions(), _vendor()
    records: Iterable[PositionRecord] = snapshot.positions
    deferred = isinstance(records, DeferredPositions)
    if deferred and not snapshot.values_read:
        for account, (_, count) in unchanged.items():
            processed[account] = count
        records = records.records(skip=unchanged)
    for record in records:
        processed[record.account] += 1
        if record.account in unchanged:
            if snapshot.values_read:  # what the values are checked against
                held_unchanged.setdefault(record.account, {})[record.con_id] = _held(
                    record, columns, vendor
                )
            continue
        try:
            item = map_position(record)
        except MappingError as exc:
            unmapped.add((record.account, contract_id_text(record.con_id)))
            errors.append(
                RecordError(
                    account=record.account,
                    # A conId too long for any integer column: its reason says so.
                    con_id=record.con_id if abs(record.con_id) < 2**63 else None,
                    symbol=record.symbol,
                    sec_type=record.sec_type,
                    reason=str(exc),
                )
            )
            continue
        mapped[(item.account_id, item.instrument_id)] = item
    reported = {
        *snapshot.accounts,
        *(a for a, _ in mapped),
        *(a for a, _ in unmapped),
        *unchanged,
    }
    accounts = tuple(sorted(a for a in reported if is_storable_account_id(a)))
    if deferred:  # decoded now: an account found with a contract twice has none
        keys = _digests(snapshot)
    digests = {a: f"{key}:{processed[a]}" if key else "" for a, key in keys.items()}
    for account, (text, _) in unchanged.items():
        digests[account] = text
    # An account with a record that could not be mapped is never taken as unchanged: its
    # error is reported at every sync.
    for error in errors:
        digests[error.account] = ""

    values: dict[str, MappedValues] = {}
    values_as_of: dict[str, dt.datetime | None] = {}
    outcomes: dict[str, ValuesOutcome] = {}
    if snapshot.values_read:
        held = {a: held_unchanged.get(a, {}) for a in accounts}
        for (account_id, instrument_id), item in mapped.items():
            held[account_id][int(instrument_id)] = (
                item.position["quantity"],
                item.instrument["symbol"],
                item.instrument["sec_type"],
                instrument_id,
            )
        for account_id in accounts:
            read = snapshot.account_values.get(account_id)
            if read is None:
                reason = snapshot.values_missing.get(account_id, "not read")
                outcomes[account_id] = ValuesOutcome.missing(reason)
                continue
            item = map_account_values(read, held[account_id])
            values[account_id] = item
            values_as_of[account_id] = read.as_of
            errors.extend(item.errors)
            outcomes[account_id] = ValuesOutcome.read(
                base_currency=item.base_currency,
                positions_valued=len(item.positions),
                positions_stale=item.stale,
                positions_unvalued=item.unvalued,
                cash_currencies=tuple(item.cash),
                cash_reported=item.cash_reported,
                cash_kept_reason=item.cash_kept_reason,
            )
    daily: dict[str, tuple[tuple[dt.datetime, dict[str, Any]], ...]] = {}
    for account_id in accounts:
        days = []
        for read in snapshot.daily_values.get(account_id, ()):
            if read.as_of is None:
                continue
            item = map_account_values(read, {})
            errors.extend(item.errors)
            days.append((read.as_of, item.snapshot))
        if days:
            daily[account_id] = tuple(sorted(days, key=lambda day: day[0]))
    ledger, ledger_instruments = {}, {}
    ledger_stream = None
    if snapshot.ledger_read:
        ledger, ledger_instruments, ledger_errors = map_ledger(snapshot, set(accounts))
        errors.extend(ledger_errors)
        if snapshot.ledger is not None and ledger:
            ledger_stream = _mapped_stream(snapshot.ledger.batches, set(accounts))
    return MappedSnapshot(
        source=snapshot.source,
        as_of=snapshot.as_of,
        accounts=accounts,
        positions=mapped,
        unmapped=frozenset(unmapped),
        processed=processed,
        errors=tuple(errors),
        values_read=snapshot.values_read,
        values=values,
        values_as_of=values_as_of,
        outcomes=outcomes,
        ledger_read=snapshot.ledger_read,
        ledger=ledger,
        ledger_instruments=ledger_instruments,
        ledger_stream=ledger_stream,
        digests={a: digests.get(a, "") for a in accounts},
        unchanged={a: processed[a] for a in accounts if a in unchanged},
        daily=daily,
        period=snapshot.period,
        statement_digest=snapshot.statement_digest,
    )


def statement_key(digest: str) -> str:
    """A source's digest of a whole read (`Snapshot.statement_digest`) under this
    mapping: the same read is written the same way only while the code and the models it
    fills (positions, instruments, cash, values, the ledger) are the same; an upgrade or a
    migration reads it again once."""
    models_ = (
        conf.position_model(),
        conf.instrument_model(),
        conf.account_model(),
        conf.cash_balance_model(),
        conf.account_snapshot_model(),
        *conf.ledger_models().values(),
    )
    signature = _statement_signatures.get(models_)
    if signature is None:
        signature = _statement_signatures[models_] = _signature(models_)
    return hashlib.blake2b(f"{signature}:{digest}".encode(), digest_size=20).hexdigest()


_statement_signatures: dict[tuple[type[models.Model], ...], str] = {}


def _digests(snapshot: Snapshot) -> dict[str, str]:
    """Per account reported, the digest of its records under this mapping's signature:
    the source's own digest of an account's positions (`DeferredPositions.digest`), else
    `positions_digest` of its records' fingerprints; "" where none can be told."""
    signature = _columns_for_positions().signature.encode()
    positions = snapshot.positions
    if isinstance(positions, DeferredPositions):
        return {
            account: _salted(signature, positions.digest(account))
            for account in {*snapshot.accounts, *positions.accounts()}
        }
    by_account: dict[str, list[PositionRecord]] = {a: [] for a in snapshot.accounts}
    for record in positions:
        by_account.setdefault(record.account, []).append(record)
    return {
        account: _salted(signature, positions_digest(records))
        for account, records in by_account.items()
    }


def _written(stored: str, key: str) -> tuple[str, int] | None:
    """A stored digest (`<digest>:<records>`) and its number of records, if its digest is
    `key`; else None."""
    digest, _, count = stored.rpartition(":")
    if digest != key or not (count.isascii() and count.isdigit()):
        return None
    return stored, int(count)


def _salted(signature: bytes, digest: str) -> str:
    return (
        hashlib.blake2b(signature + digest.encode(), digest_size=20).hexdigest() if digest else ""
    )


def written_positions(stored: Mapping[str, str]) -> Callable[[str, str], bool]:
    """For a source that leaves undecoded the positions a sync has written already
    (`TwsSource.fetch_positions(written=...)`): whether a source's digest of an account's
    positions is, under this mapping, `stored` for it (what `writer.reported_digests`
    read). A hint to the source only: `map_snapshot` decides on what it reads after."""
    signature = _columns_for_positions().signature.encode()

    def written(account: str, digest: str) -> bool:
        key = _salted(signature, digest)
        return bool(key) and _written(stored.get(account, ""), key) is not None

    return written


def _held(
    record: PositionRecord, columns: _PositionColumns, vendor: str
) -> tuple[Decimal, str, str, str]:
    """What an account's values are checked against of a record mapped before (so it maps
    without error): its quantity, symbol, security type and conId text, exactly as
    `map_position` gives them."""
    quantity = _fit_number(columns.quantity, _record_decimal(record.quantity), True, vendor)
    sec_type = (record.sec_type or "").strip().upper()
    return quantity, record.symbol.strip(), sec_type, _contract_id_text(record.con_id)


# --- the ledger ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappedLedgerRow:
    """One ledger row as its columns store it: `fields` are every column but the account,
    the instrument (`instrument_id`: a conId text, None for none), the broker and the
    external id, which key it."""

    account_id: str
    external_id: str
    instrument_id: str | None
    fields: dict[str, Any]


#: The columns each kind of ledger row fills from its record (besides its keys).
LEDGER_FIELDS = {
    "trades": (
        "trade_date",
        "traded_at",
        "settle_date",
        "buy_sell",
        "quantity",
        "price",
        "proceeds",
        "commission",
        "commission_currency",
        "currency",
        "realized_pnl",
        "fx_rate_to_base",
        "cancelled",
        "raw",
    ),
    "cash_transactions": (
        "kind",
        "type",
        "date",
        "amount",
        "currency",
        "description",
        "fx_rate_to_base",
        "dividend_external_id",
        "raw",
    ),
    "corporate_actions": (
        "action_id",
        "date",
        "type",
        "quantity",
        "amount",
        "currency",
        "description",
        "raw",
    ),
}
_LEDGER_LABELS = {
    "trades": "a trade",
    "cash_transactions": "a cash transaction",
    "corporate_actions": "a corporate action",
}


@dataclass(frozen=True, slots=True)
class MappedLedger:
    """A ledger's batch as its rows store it (`map_ledger_batch`): the rows by kind and
    external id, the instruments they name by conId text, the errors by kind."""

    rows: dict[str, dict[str, MappedLedgerRow]]
    instruments: dict[str, dict[str, Any]]
    errors: dict[str, list[RecordError]]

    def without(self, accounts: set[str] | frozenset[str]) -> MappedLedger:
        """The same batch with no row and no error of `accounts`, and only the instruments
        its rows still name."""
        rows = {
            kind: {key: row for key, row in kind_rows.items() if row.account_id not in accounts}
            for kind, kind_rows in self.rows.items()
        }
        named = {row.instrument_id for kind_rows in rows.values() for row in kind_rows.values()}
        return MappedLedger(
            rows,
            {conid: fields for conid, fields in self.instruments.items() if conid in named},
            {
                kind: [error for error in kind_errors if error.account not in accounts]
                for kind, kind_errors in self.errors.items()
            },
        )


def map_ledger(
    snapshot: Snapshot, accounts: set[str]
) -> tuple[dict[str, dict[str, MappedLedgerRow]], dict[str, dict[str, Any]], list[RecordError]]:
    """The snapshot's ledger (its records in memory) -> its rows' field values, for the
    kinds the host keeps (`conf.ledger_models()`), each by its external id (IBKR's
    transactionID; the last of a row sent twice, as by two overlapping statements), and
    the instruments they name. A row that cannot be stored (no id, a value its column
    cannot hold) is an error of its account, never dropped silently; a contract that
    cannot be an instrument leaves the row without one (its raw attributes keep the
    contract) and says so. Each withholding tax is linked to its dividend
    (`link_withholding`)."""
    dividend_of = {
        tax.transaction_id: income.transaction_id
        for tax, income in link_withholding(snapshot.cash_transactions)
        if tax.transaction_id and income.transaction_id
    }
    batch = LedgerBatch(
        trades=snapshot.trades,
        cash_transactions=snapshot.cash_transactions,
        corporate_actions=snapshot.corporate_actions,
        dividend_of=dividend_of,
    )
    mapped = map_ledger_batch(batch, accounts, {})
    errors = [error for kind_errors in mapped.errors.values() for error in kind_errors]
    return mapped.rows, mapped.instruments, errors


def _mapped_stream(
    batches: Callable[[], Iterator[LedgerBatch]], accounts: set[str]
) -> Callable[[], Iterator[MappedLedger]]:
    """A ledger stream's batches, each mapped as the writer comes to it (`map_ledger_batch`;
    each contract mapped once over all of them)."""

    def mapped() -> Iterator[MappedLedger]:
        contracts: dict[Contract, tuple[str, dict[str, Any]] | MappingError] = {}
        for batch in batches():
            yield map_ledger_batch(batch, accounts, contracts)

    return mapped


def _stream_without(
    stream: Callable[[], Iterator[MappedLedger]], accounts: set[str] | frozenset[str]
) -> Callable[[], Iterator[MappedLedger]]:
    """A mapped stream whose batches hold nothing of `accounts` (`MappedSnapshot.without`)."""
    accounts = frozenset(accounts)

    def batches() -> Iterator[MappedLedger]:
        for part in stream():
            yield part.without(accounts)

    return batches


def map_ledger_batch(
    batch: LedgerBatch,
    accounts: set[str],
    mapped_contracts: dict[Contract, tuple[str, dict[str, Any]] | MappingError],
) -> MappedLedger:
    """A ledger's records -> their rows (`map_ledger`), the batch's taxes linked by its
    `dividend_of`; `mapped_contracts`: each contract mapped once (thousands of rows name
    the same one), its instrument or why it cannot be one, kept from batch to batch."""
    models_by_kind = conf.ledger_models()
    ledger: dict[str, dict[str, MappedLedgerRow]] = {}
    instruments: dict[str, dict[str, Any]] = {}
    errors: dict[str, list[RecordError]] = {}
    dividend_of = batch.dividend_of
    records = {
        "trades": batch.trades,
        "cash_transactions": batch.cash_transactions,
        "corporate_actions": batch.corporate_actions,
    }
    for kind, model in models_by_kind.items():
        rows: dict[str, MappedLedgerRow] = {}
        kind_errors = errors[kind] = []
        for record in records[kind]:
            contract = record.contract
            try:
                if record.account not in accounts:
                    raise MappingError(f"account {_short(record.account)} was not synced")
                external_id = record.transaction_id
                if not external_id:
                    raise MappingError(
                        "no transactionID (add Transaction ID to the query's section): not stored"
                    )
                values = _ledger_values(kind, record, dividend_of)
                raw = values.pop("raw")
                values = fit(model, {"external_id": external_id, **values}, exact=_EXACT)
                values.pop("external_id")
                values["raw"] = raw
            except MappingError as exc:
                kind_errors.append(_ledger_error(kind, record, contract, str(exc)))
                continue
            instrument_id = None
            if contract is not None and contract.con_id is not None:
                mapped = mapped_contracts.get(contract)
                if mapped is None:
                    try:
                        mapped = _ledger_instrument(record.account, contract)
                    except MappingError as exc:
                        mapped = exc
                    mapped_contracts[contract] = mapped
                if isinstance(mapped, MappingError):
                    kind_errors.append(
                        _ledger_error(
                            kind, record, contract, f"stored without its instrument: {mapped}"
                        )
                    )
                else:
                    instrument_id, fields = mapped
                    instruments.setdefault(instrument_id, fields)
            rows[external_id] = MappedLedgerRow(
                account_id=record.account,
                external_id=external_id,
                instrument_id=instrument_id,
                fields=values,
            )
        ledger[kind] = rows
    return MappedLedger(ledger, instruments, errors)


_EXACT = ("quantity",)


def _ledger_values(kind: str, record: Any, dividend_of: dict[str, str]) -> dict[str, Any]:
    raw = dict(record.raw)
    # The parser's attributes are texts: only one holding a NUL needs storable().
    if not all(type(k) is str and type(v) is str and "\x00" not in k + v for k, v in raw.items()):
        raw = {storable(str(k)): storable(str(v)) for k, v in raw.items()}
    if kind == "trades":
        trade: Trade = record
        return {
            "trade_date": trade.trade_date,
            "traded_at": trade.traded_at,
            "settle_date": trade.settle_date,
            "buy_sell": trade.buy_sell,
            "quantity": trade.quantity,
            "price": trade.price,
            "proceeds": trade.proceeds,
            "commission": trade.commission,
            "commission_currency": trade.commission_currency,
            "currency": trade.currency,
            "realized_pnl": trade.realized_pnl,
            "fx_rate_to_base": trade.fx_rate_to_base,
            "cancelled": trade.cancelled,
            "raw": raw,
        }
    if kind == "cash_transactions":
        tx: CashTransaction = record
        return {
            "kind": tx.kind,
            "type": tx.type_text,
            "date": tx.date,
            "amount": tx.amount,
            "currency": tx.currency,
            "description": storable(tx.description),
            "fx_rate_to_base": tx.fx_rate_to_base,
            "dividend_external_id": dividend_of.get(tx.transaction_id or "", ""),
            "raw": raw,
        }
    action: CorporateAction = record
    return {
        "action_id": action.action_id or "",
        "date": action.date,
        "type": action.type_code,
        "quantity": action.quantity,
        "amount": action.amount,
        "currency": action.currency,
        "description": storable(action.description),
        "raw": raw,
    }


def _ledger_instrument(account: str, contract: Contract) -> tuple[str, dict[str, Any]]:
    """A ledger row's contract as its Instrument row, mapped as a position's is."""
    record = PositionRecord(
        account=account,
        con_id=contract.con_id,
        symbol=contract.symbol,
        sec_type=contract.sec_type,
        quantity=Decimal(0),
        average_cost=None,
        currency=contract.currency,
        primary_exchange=contract.listing_exchange,
        multiplier="" if contract.multiplier is None else str(contract.multiplier),
        last_trade_date=contract.expiry.strftime("%Y%m%d") if contract.expiry else "",
        strike=contract.strike,
        right=contract.right,
    )
    item = map_position(record)
    return item.instrument_id, item.instrument


def ledger_row_error(
    kind: str, row: MappedLedgerRow, instruments: Mapping[str, Mapping[str, Any]], reason: str
) -> RecordError:
    """A mapped ledger row the writer did not store (`instruments`: its batch's, by conId
    text), said as a record that could not be mapped is (`_ledger_error`)."""
    instrument = instruments.get(row.instrument_id or "", {})
    con_id = None
    if row.instrument_id is not None and len(row.instrument_id) < 20:
        con_id = int(row.instrument_id)
    return RecordError(
        account=row.account_id,
        # A conId too long for any integer column: none, as `_ledger_error` gives.
        con_id=con_id if con_id is not None and abs(con_id) < 2**63 else None,
        symbol=instrument.get("symbol", ""),
        sec_type=instrument.get("sec_type", ""),
        reason=f"{_LEDGER_LABELS[kind]} ({row.external_id}): {reason}",
    )


def _ledger_error(kind: str, record: Any, contract: Contract | None, reason: str) -> RecordError:
    con_id = contract.con_id if contract is not None else None
    ident = record.transaction_id or "(no id)"
    return RecordError(
        account=record.account,
        con_id=con_id if con_id is not None and abs(con_id) < 2**63 else None,
        symbol=contract.symbol if contract is not None else "",
        sec_type=contract.sec_type if contract is not None else "",
        reason=f"{_LEDGER_LABELS[kind]} ({ident}): {reason}",
    )
