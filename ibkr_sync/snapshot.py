"""What a source hands the sync: frozen, source-neutral records of one read.

A source (TWS / IB Gateway today, `sources/tws/`; IBKR's Flex Web Service next) reads
the broker in its own terms and returns a `Snapshot` in these: exact `Decimal`s, None
where the broker gave no value, currencies as codes, and each account's values already
interpreted (which figure is the net liquidation, which currency is the base, which cash
balances came). No tag, no wire, no client library: mapping, the writer and the service
read these records and nothing of the source, so that any source fits them.

Standard library only (and `decimals`, for how a message shows a number).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from abc import abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, overload

from .decimals import plain

#: The account totals a source may report, by the AccountSnapshot field each fills, in the
#: base currency: the keys of `AccountValues.totals`.
TOTALS: Final = (
    "net_liquidation",
    "total_cash_value",
    "gross_position_value",
    "unrealized_pnl",
    "realized_pnl",
    "available_funds",
    "buying_power",
)
#: The names `AccountValues.names` may give, besides the totals: for error messages.
CASH: Final = "cash"
EXCHANGE_RATE: Final = "exchange_rate"


class CurrencyError(ValueError):
    """A value that is not a currency code; the message says so."""


def currency_code(value: Any) -> str:
    """A currency code in the one form the product stores and compares: three ASCII
    letters, upper case. IBKR's `usd` or `Usd` is USD (the same currency, so the same
    row); anything else is not a code, and CurrencyError says so."""
    if type(value) is str and len(value) == 3 and value.isascii() and value.isalpha():
        return value.upper()
    raise CurrencyError(f"{shown(value)!r} is not a currency code (three letters, e.g. USD)")


def shown(value: Any, limit: int = 40) -> str:
    """A value as a message quotes it: cut to `limit` characters, a huge number in
    scientific notation (never its thousands of digits)."""
    if isinstance(value, Decimal) and value.is_finite():
        text = format(value, "E") if abs(value.adjusted()) > limit else plain(value)
    elif isinstance(value, int) and value.bit_length() > 128:
        text = format(Decimal(value), ".6E")
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True, slots=True)
class PositionRecord:
    """One position row as the source reported it, before any mapping.

    `average_cost` is None when IBKR reported none (one of its "no value" markers); a
    quantity is always a number, since a read with an unset quantity is incomplete.
    """

    account: str
    con_id: int
    symbol: str
    sec_type: str
    quantity: Decimal
    average_cost: Decimal | None
    currency: str = ""
    exchange: str = ""
    primary_exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    multiplier: str = ""
    last_trade_date: str = ""
    strike: Decimal | None = None
    right: str = ""
    # What the source read the record from, exactly (a TWS position message's text), or
    # None: equal fingerprints are equal records, whatever else they would say. Lets the
    # sync recognise an account whose positions did not change without mapping them
    # (`positions_digest`). Opaque to everything but that digest; not part of equality.
    fingerprint: str | None = field(default=None, compare=False, repr=False)


def _positional_maker(cls: type) -> Any:
    """A constructor of a frozen, slotted record taking every field positionally, in the
    order of its fields, unchecked: for a source building 10,000s of records, where the
    generated `__init__` (one `object.__setattr__` per field, as frozen requires) costs
    several times the decoding itself. Sets the same slots; the record is the same."""
    setters = tuple(getattr(cls, f.name).__set__ for f in fields(cls))
    count, new = len(setters), object.__new__

    def make(*values: Any) -> Any:
        if len(values) != count:
            raise TypeError(f"{cls.__name__}.make() takes {count} values, not {len(values)}")
        record = new(cls)
        for set_field, value in zip(setters, values):  # noqa: B905 (counted above)
            set_field(record, value)
        return record

    return make


#: `PositionRecord.make(account, con_id, symbol, ..., right, fingerprint)`: every field,
#: in order, for a source that reads 10,000s (`_positional_maker`).
PositionRecord.make = staticmethod(_positional_maker(PositionRecord))  # type: ignore[attr-defined]


def positions_digest(records: Iterable[PositionRecord]) -> str:
    """One digest of a set of records (one account's positions), in any order: equal
    digests are equal sets of fingerprints. "" when a record has no fingerprint (its
    source gives none): such a set is never taken as unchanged."""
    prints = []
    for record in records:
        if record.fingerprint is None:
            return ""
        prints.append(record.fingerprint)
    prints.sort()
    digest = hashlib.blake2b(digest_size=20)
    for text in prints:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))  # so no two sets join to one text
        digest.update(data)
    return digest.hexdigest()


class DeferredPositions(Sequence[PositionRecord]):
    """A source's positions as it read them, each account's turned into records only
    when they are asked for, with a digest of each account's positions as read.

    A source that reads positions as messages (TWS) keeps the messages and hands them
    over in this form: a sync need not decode the messages of an account whose digest
    is the one last written for it (`records(skip=...)`). As a sequence it is
    every record, decoded once, in the order they were read: what a tuple of them would
    be. Decoding messages left undecoded may raise what the source's read would have
    raised for them (an incomplete read): a source leaves undecoded only the messages of
    accounts it was told were written already, which decoded before.
    """

    @abstractmethod
    def accounts(self) -> Collection[str]:
        """The accounts that positions were read of (without decoding them)."""

    @abstractmethod
    def digest(self, account: str) -> str:
        """A digest of the account's positions as read (equal digests: equal messages, in
        any order, so equal records), "" where none can be told. An account with no
        position read has the digest of none."""

    @abstractmethod
    def records(self, skip: Collection[str] = ()) -> tuple[PositionRecord, ...]:
        """The records of every account but those in `skip`, in the order read."""

    def __len__(self) -> int:
        return len(self.records())

    @overload
    def __getitem__(self, index: int) -> PositionRecord: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[PositionRecord, ...]: ...
    def __getitem__(self, index: Any) -> Any:
        return self.records()[index]

    def __iter__(self) -> Iterator[PositionRecord]:
        return iter(self.records())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeferredPositions | tuple):
            return self.records() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (a mutable cache inside: not hashable)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} positions>"


@dataclass(frozen=True, slots=True)
class PositionValue:
    """IBKR's values of one position, None where it sent "no value".

    `quantity` is the position's quantity as the same report states it: the values
    belong to that quantity, which may differ from the position read moments before if a
    trade happened in between.
    """

    con_id: int
    quantity: Decimal
    market_price: Decimal | None
    market_value: Decimal | None
    unrealized_pnl: Decimal | None
    realized_pnl: Decimal | None


@dataclass(frozen=True, slots=True)
class ValueProblem:
    """Something the source found while interpreting an account's values, that the sync
    records as an error entry of the account (`label: reason`): a value under a currency
    that is not a code, totals in two currencies, one value sent twice differently."""

    label: str
    reason: str


@dataclass(frozen=True)
class AccountValues:
    """One account's values as of `as_of`, interpreted by the source.

    - `base_currency`: the one currency the account's totals are in ("" if the source
      could not tell: then no total and no rate is taken).
    - `totals`: by AccountSnapshot field (`TOTALS`), in the base currency, None where the
      broker sent no value; a total not reported is absent.
    - `cash`: the balance per currency (a code), as reported, None where no value came.
    - `cash_total_reported`: a cash total in the base currency came (IBKR's BASE row),
      which says the account's cash was reported, but not per currency.
    - `cash_problems`: why the balances cannot be trusted whole, found while reading them
      (a balance under a currency that is not a code, one sent twice differently): any
      of them keeps the stored cash as it is.
    - `exchange_rates`: every rate reported, per currency, to the base currency.
    - `positions`: the position values, by conId.
    - `problems`: what could not be interpreted (error entries of the account).
    - `names`: what the source calls a figure (a total's field name, `CASH`,
      `EXCHANGE_RATE`), so that an error names it as the broker's own report does.
    """

    account: str
    as_of: dt.datetime | None = None
    base_currency: str = ""
    totals: dict[str, Decimal | None] = field(default_factory=dict)
    cash: dict[str, Decimal | None] = field(default_factory=dict)
    cash_total_reported: bool = False
    cash_problems: tuple[str, ...] = ()
    exchange_rates: dict[str, Decimal | None] = field(default_factory=dict)
    positions: dict[int, PositionValue] = field(default_factory=dict)
    problems: tuple[ValueProblem, ...] = ()
    names: dict[str, str] = field(default_factory=dict)

    def name_of(self, figure: str) -> str:
        """How an error message names a figure: the source's name, else the field's."""
        return self.names.get(figure, figure)


# --- the ledger: what happened in an account (a source that reads history: Flex) ---

#: The kinds of cash transaction.
CASH_KINDS: Final = (
    "dividend",
    "withholding_tax",
    "payment_in_lieu",
    "interest",
    "fee",
    "deposit",
    "withdrawal",
    "other",
)


def _empty_raw() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Contract:
    """The instrument a row is about, as the broker names it."""

    con_id: int | None
    symbol: str = ""
    sec_type: str = ""
    currency: str = ""
    multiplier: Decimal | None = None
    expiry: dt.date | None = None
    strike: Decimal | None = None
    right: str = ""  # "P" or "C", "" for what is no option
    description: str = ""
    isin: str = ""
    listing_exchange: str = ""
    underlying_con_id: int | None = None
    underlying_symbol: str = ""


@dataclass(frozen=True, slots=True)
class Trade:
    """One execution (never an order, symbol or asset summary, nor a closed lot).

    `quantity` is signed as the broker signs it (negative for a sale), `proceeds` and
    `commission` too (a commission paid is negative). `cancelled`: the broker marked the
    execution cancelled (`Ca`); `codes` are its notes (`O`, `C`, `A`, `Ep`, `Ex`, ...).
    `transaction_id` is the broker's key of the row (None where the query left it out).
    """

    account: str
    transaction_id: str | None
    trade_id: str | None
    contract: Contract
    trade_date: dt.date | None
    traded_at: dt.datetime | None
    settle_date: dt.date | None
    buy_sell: str  # "BUY", "SELL", or the broker's text when it is neither
    quantity: Decimal | None
    price: Decimal | None
    proceeds: Decimal | None
    commission: Decimal | None
    commission_currency: str
    currency: str
    realized_pnl: Decimal | None = None
    fx_rate_to_base: Decimal | None = None
    taxes: Decimal | None = None
    net_cash: Decimal | None = None
    open_close: str = ""
    codes: tuple[str, ...] = ()
    cancelled: bool = False
    transaction_type: str = ""
    order_id: str | None = None
    execution_id: str = ""
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CashTransaction:
    """One cash transaction (a dividend, a tax, interest, a fee, a deposit, ...).

    `amount` is signed as the broker signs it: a withholding tax is negative, its refund
    or reversal positive. `kind` is one of CASH_KINDS; `type_text` the broker's own type.
    `action_id` is the broker's id of the corporate action a dividend and the tax
    withheld from it share (`link_withholding` pairs them).
    """

    account: str
    transaction_id: str | None
    kind: str
    type_text: str
    date: dt.date | None
    happened_at: dt.datetime | None
    amount: Decimal | None
    currency: str
    contract: Contract | None
    description: str = ""
    action_id: str | None = None
    settle_date: dt.date | None = None
    report_date: dt.date | None = None
    ex_date: dt.date | None = None
    fx_rate_to_base: Decimal | None = None
    code: str = ""
    trade_id: str | None = None
    client_reference: str = ""
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CorporateAction:
    """One corporate action on a holding (split, spin-off, merger, ...); `type_code` is
    the broker's code (`FS`, `RS`, `SO`, `TC`, ...), `kind` our name for it."""

    account: str
    transaction_id: str | None
    action_id: str | None
    kind: str
    type_code: str
    contract: Contract | None
    report_date: dt.date | None
    happened_at: dt.datetime | None
    date: dt.date | None
    description: str = ""
    quantity: Decimal | None = None
    amount: Decimal | None = None
    proceeds: Decimal | None = None
    value: Decimal | None = None
    currency: str = ""
    realized_pnl: Decimal | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


def link_withholding(
    transactions: tuple[CashTransaction, ...] | list[CashTransaction],
) -> list[tuple[CashTransaction, CashTransaction]]:
    """Each withholding tax (or its reversal) with the dividend or payment in lieu it
    was withheld from, as (tax, income) pairs, where the broker's ids tie them: the
    same account, action id and contract. A tax whose action has no dividend, or
    several, is left unpaired."""
    income: dict[tuple, list[CashTransaction]] = {}
    for tx in transactions:
        if tx.kind in INCOME_KINDS and tx.action_id:
            income.setdefault(_action_key(tx), []).append(tx)
    links = []
    for tx in transactions:
        if tx.kind == TAX_KIND and tx.action_id:
            candidates = income.get(_action_key(tx), [])
            if len(candidates) == 1:
                links.append((tx, candidates[0]))
    return links


def _action_key(tx: CashTransaction) -> tuple:
    return action_key(tx.account, tx.action_id, tx.contract.con_id if tx.contract else None)


def action_key(account: str, action_id: str | None, con_id: int | None) -> tuple:
    """What ties a withholding tax to its dividend (`link_withholding`): the same
    account, action id and contract."""
    return (account, action_id, con_id)


#: The cash kinds a tax is withheld from, and the tax's (`link_withholding`).
INCOME_KINDS: Final = ("dividend", "payment_in_lieu")
TAX_KIND: Final = "withholding_tax"


@dataclass(frozen=True)
class LedgerBatch:
    """Part of a ledger handed on as a stream (`LedgerStream`): its records, each with
    its key (`transaction_id`), and the links of its withholding taxes (`dividend_of`:
    a tax's key -> its dividend's key, as `link_withholding` pairs them over the whole
    ledger)."""

    trades: tuple[Trade, ...] = ()
    cash_transactions: tuple[CashTransaction, ...] = ()
    corporate_actions: tuple[CorporateAction, ...] = ()
    dividend_of: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.trades) + len(self.cash_transactions) + len(self.corporate_actions)


@dataclass(frozen=True)
class LedgerStream:
    """A ledger too large to hold: its records in batches, read when they are written.

    `batches()` reads them (again at each call: a write that is retried reads them
    anew), in bounded memory: one batch at a time. What a whole ledger in memory
    promises holds across the batches: every record of one key (a row sent twice, as by
    two overlapping statements) is in one batch, and each batch's `dividend_of` links
    its taxes as `link_withholding` would over every record. `close()` frees what the
    stream reads from (a download); the sync closes it when done."""

    batches: Callable[[], Iterator[LedgerBatch]]
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Repeat:
    """A read applied already and found unchanged, as a sync's service tells a source
    that asks (`FlexSource.fetch_positions`'s `applied`): the sync run that last recorded
    it, its accounts, and the moment it describes; and the accounts it is refused for
    (a newer report of them stands, or another owner holds them: then its history is
    not written either), with the reason a full read would give now."""

    run: int
    accounts: tuple[str, ...]
    as_of: dt.datetime | None
    refused: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """Every open position of the accounts read, complete; and, when asked for, each
    account's values, or why they could not be read.

    `source` names where it came from ("tws"); `as_of` is the moment the positions
    describe (an aware datetime: for a TWS read, when the gateway's end of positions
    arrived). None (a host's fake source) means the moment the sync writes them.
    """

    accounts: tuple[str, ...]
    # A tuple of records, or a source's `DeferredPositions` (the same records, decoded
    # when asked for, with a digest of each account's).
    positions: Sequence[PositionRecord]
    managed_accounts: tuple[str, ...] = ()
    server_version: int | None = None
    # Whether values were asked for; then every account read is in exactly one of these.
    values_read: bool = False
    account_values: dict[str, AccountValues] = field(default_factory=dict)
    values_missing: dict[str, str] = field(default_factory=dict)
    source: str = ""
    as_of: dt.datetime | None = None
    # The ledger, from a source that reads history (Flex; a TWS read has none): every
    # execution, cash transaction and corporate action of the period read, at the
    # transaction's level (never a summary of others). `ledger_read`: the source read
    # it (then an empty tuple is "none happened", not "not read").
    ledger_read: bool = False
    trades: tuple[Trade, ...] = ()
    cash_transactions: tuple[CashTransaction, ...] = ()
    corporate_actions: tuple[CorporateAction, ...] = ()
    # Or, from a source whose ledger is too large to hold (Flex), the ledger as a stream
    # of batches (then the three tuples above are empty): mapped and written batch by
    # batch inside the sync's write transaction.
    ledger: LedgerStream | None = None
    # The history of an account's values, from a source that reads a period (Flex: each
    # day's net asset value in base and that day's exchange rates): per account, one
    # `AccountValues` per day, as of that day's end, oldest first. Stored as the account's
    # snapshot of each day, including for an account whose state is refused.
    daily_values: dict[str, tuple[AccountValues, ...]] = field(default_factory=dict)
    # The period the source read, both days included (Flex: the statement's fd..td);
    # None for a read of one moment (TWS).
    period: tuple[dt.date, dt.date] | None = None
    # A digest of what the source read as a whole (Flex: the statement, less the moment
    # it was generated), where one is cheap to take; "" where none was taken.
    statement_digest: str = ""
    # The sync run that last recorded this very read (`Repeat.run`), when the source was
    # told so and found it again (Flex: the same statement, with nothing of it changed since in the
    # database): then it read nothing more, and the snapshot holds its accounts and
    # moment only. A sync records it as unchanged, writing nothing.
    repeats: int | None = None

    def __post_init__(self) -> None:
        if self.as_of is not None and self.as_of.utcoffset() is None:
            raise ValueError("a snapshot's as_of must be an aware datetime")


@dataclass(frozen=True)
class ConnectionCheck:
    """What a source says when a connection is tested (no positions written): where it
    reads (`address`), the accounts it reports, one line for people (`summary`) and what
    it lacks for the sync's models (`lacking`: a line each, empty when nothing).

    The TWS source answers its `Handshake` (a server version, the managed accounts),
    which has the same `address`, `accounts`, `summary` and `lacking`."""

    source: str
    address: str
    accounts: tuple[str, ...]
    summary: str
    lacking: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
