"""What an Activity Flex statement holds, as source-neutral records.

Frozen records in the product's own terms (exact `Decimal`s, None where the broker gave
no value, currencies as codes, aware datetimes); their fields name no Flex attribute, and
each keeps the broker's attributes as they came (`raw`: the element's attributes as
text) so that a field can be derived later without downloading the statement again, and
`problems`: the values that could not be read (the field is None and the problem says
why; the row is never dropped for it).

The ledger's records (`Trade`, `CashTransaction`, `CorporateAction`, their `Contract`)
are the sync's own, in `snapshot.py`, re-exported here. Standard library only (and `snapshot`,
`decimals`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Final

from ...decimals import product
from ...snapshot import (
    CASH_KINDS,
    CashTransaction,
    Contract,
    CorporateAction,
    PositionRecord,
    Trade,
    _empty_raw,
    link_withholding,
)

__all__ = [
    "CASH_KINDS",
    "CashTransaction",
    "Contract",
    "CorporateAction",
    "Trade",
    "link_withholding",
]

#: The kinds of option event (exercise, assignment, expiry, and the deliveries with them).
OPTION_EVENT_KINDS: Final = (
    "assignment",
    "exercise",
    "expiration",
    "cash_settlement",
    "buy",
    "sell",
    "other",
)


def frozen_raw(attributes: dict[str, str]) -> MappingProxyType:
    """The broker's attributes of a row, read-only."""
    return MappingProxyType(dict(attributes))


@dataclass(frozen=True, slots=True)
class AccountInformation:
    """An account the response describes (base currency, name, type), with its raw
    attributes. A response may carry it inside a statement or beside the statements."""

    account: str
    base_currency: str = ""
    name: str = ""
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatementHeader:
    """One statement's account and period, as its first record in a stream.

    `as_of` is the moment the statement describes: the end of its period's last day
    (`to_date` at 23:59:59 in the statement's zone), aware. `generated_at` is when IBKR
    generated it. `index` is the statement's place in the response (0, 1, ...).
    """

    index: int
    account: str
    from_date: dt.date | None
    to_date: dt.date | None
    as_of: dt.datetime | None
    generated_at: dt.datetime | None
    period: str = ""
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeldPosition:
    """An open position at the statement's end, with the broker's valuation of it.

    `quantity` is signed (negative: short). `cost_basis_price` is per unit (a share, one
    option's premium), as the broker reports it; `average_cost()` is per contract, as
    the TWS source reports a position's average cost (the price times the multiplier).
    """

    account: str
    contract: Contract
    quantity: Decimal | None
    mark_price: Decimal | None = None
    market_value: Decimal | None = None
    cost_basis_price: Decimal | None = None
    cost_basis: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    fx_rate_to_base: Decimal | None = None
    report_date: dt.date | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()

    def average_cost(self) -> Decimal | None:
        if self.cost_basis_price is None:
            return None
        multiplier = self.contract.multiplier
        if multiplier is None or multiplier == 0:
            return self.cost_basis_price
        return product(self.cost_basis_price, multiplier)

    def as_position_record(self) -> PositionRecord:
        """The position as the sync's records have it; ValueError when the broker gave
        no conId or no quantity (then the row cannot be a position)."""
        if self.contract.con_id is None or self.quantity is None:
            raise ValueError(
                f"{self.contract.symbol or 'a position'} of {self.account} has no "
                f"{'conId' if self.contract.con_id is None else 'quantity'}"
            )
        return PositionRecord(
            account=self.account,
            con_id=self.contract.con_id,
            symbol=self.contract.symbol,
            sec_type=self.contract.sec_type,
            quantity=self.quantity,
            average_cost=self.average_cost(),
            currency=self.contract.currency,
            primary_exchange=self.contract.listing_exchange,
            multiplier="" if self.contract.multiplier is None else str(self.contract.multiplier),
            last_trade_date=(
                self.contract.expiry.strftime("%Y%m%d") if self.contract.expiry else ""
            ),
            strike=self.contract.strike,
            right=self.contract.right,
        )


@dataclass(frozen=True, slots=True)
class CashBalance:
    """One currency's cash at the statement's end (never the total in the base)."""

    account: str
    currency: str
    ending_cash: Decimal | None
    ending_settled_cash: Decimal | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CashTotal:
    """The account's cash over all currencies, in its base currency (IBKR's
    `BASE_SUMMARY` row: a total, not a currency)."""

    account: str
    ending_cash: Decimal | None
    ending_settled_cash: Decimal | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetAssetValue:
    """The account's net asset value at the end of one day, in its base currency."""

    account: str
    date: dt.date | None
    currency: str
    total: Decimal | None
    cash: Decimal | None = None
    stock: Decimal | None = None
    options: Decimal | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExchangeRate:
    """The broker's rate of one day: 1 `from_currency` = `rate` `to_currency`."""

    date: dt.date | None
    from_currency: str
    to_currency: str
    rate: Decimal | None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OptionEvent:
    """An option's exercise, assignment or expiry, and the delivery that came with it
    (the stock or future bought or sold: kind `buy` / `sell`). `quantity` is signed as
    the broker signs it."""

    account: str
    transaction_id: str | None
    kind: str
    type_text: str
    contract: Contract
    date: dt.date | None
    quantity: Decimal | None
    price: Decimal | None = None
    mark_price: Decimal | None = None
    proceeds: Decimal | None = None
    realized_pnl: Decimal | None = None
    currency: str = ""
    trade_id: str | None = None
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A ledger row (a trade, cash transaction or corporate action) as a first pass over
    a statement sees it, its values not read: the row's `section` (`Trade`,
    `CashTransaction`, `CorporateAction`), account, transactionID, and for a cash
    transaction its kind and what ties a tax to its dividend (`action_id`, `con_id`).
    The rows are the same, in the same order, as a full read's records."""

    section: str
    account: str
    transaction_id: str | None
    kind: str = ""
    action_id: str | None = None
    con_id: int | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatementEnd:
    """The last record of one statement in a stream: what was read and what not.

    - `rows_read`: the rows turned into records, by `Section/Row`.
    - `rows_skipped`: rows left out by rule, by `Section/Row`: summaries of other rows
      (orders, symbol and asset summaries, closed lots, a position's lots, a cash
      transaction's summary), whose transactions are the rows read.
    - `rows_ignored`: rows of sections this source does not read, by `Section/Row` (a
      section without rows, such as `ChangeInNAV`, by its name).
    - `sections`: every section the statement holds (empty ones too): what the query
      contains.
    - `problems`: how many values could not be read (the records say which).
    """

    index: int
    account: str
    rows_read: dict[str, int] = field(default_factory=dict)
    rows_skipped: dict[str, int] = field(default_factory=dict)
    rows_ignored: dict[str, int] = field(default_factory=dict)
    sections: tuple[str, ...] = ()
    problems: int = 0


@dataclass(frozen=True)
class Statement:
    """One statement, whole: what `parse_statements` collects from a stream.

    `net_asset_values` holds one value per day (the last row of a day, should the broker
    send two). `base_currency` comes from the statement's account information, or from
    one beside the statements for the same account.
    """

    header: StatementHeader
    end: StatementEnd
    base_currency: str = ""
    account_information: AccountInformation | None = None
    positions: tuple[HeldPosition, ...] = ()
    cash: tuple[CashBalance, ...] = ()
    cash_total: CashTotal | None = None
    net_asset_values: tuple[NetAssetValue, ...] = ()
    exchange_rates: tuple[ExchangeRate, ...] = ()
    trades: tuple[Trade, ...] = ()
    cash_transactions: tuple[CashTransaction, ...] = ()
    corporate_actions: tuple[CorporateAction, ...] = ()
    option_events: tuple[OptionEvent, ...] = ()

    @property
    def account(self) -> str:
        return self.header.account

    @property
    def as_of(self) -> dt.datetime | None:
        return self.header.as_of


@dataclass(frozen=True)
class FlexResponse:
    """A whole response: its statements in order, and the account information that came
    beside them. `problems` are the response's own (a statement count that does not
    match the statements in it)."""

    query_name: str
    kind: str
    statements: tuple[Statement, ...]
    account_information: tuple[AccountInformation, ...] = ()
    problems: tuple[str, ...] = ()
