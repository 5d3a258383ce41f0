"""Activity Flex statements (XML) into the records of `records.py`.

- Safe: the standard library's XML parser (expat, in C) with `defusedxml`'s rules (a
  statement comes from the network): no DTD, no entity, no external reference; any of
  them refuses the whole document (`FlexFormatError`). The parser is the one
  `defusedxml`'s `DefusedXMLParser` creates and arms: its own handlers refuse a document
  type, an entity declaration and an external reference, raising its own exceptions.
  We set only the handlers of elements: a Flex row is an element whose attributes are
  its values, so a row is read from the attributes expat hands over (a dict built in C)
  and no element tree is built. (`defusedxml`'s `iterparse` runs the standard library's
  pure-Python `XMLParser` and `TreeBuilder` over the same expat, Python calls per
  element and per attribute name: a third of the parse's time went there.)
- Incremental: the document is fed to expat in chunks (`_CHUNK`), and the records of a
  chunk handed on before the next is read, so that a statement of any size is read in
  bounded memory. `iter_records` streams the records one by one; `parse_flex` collects
  them (for statements that fit in memory).
- All or nothing: XML that is not well formed (a truncated download) or in an encoding
  expat cannot read (`_expats_own`), a document that is no `FlexQueryResponse`, or an
  error answer (`FlexStatementResponse` with an `ErrorCode`) raise a `FlexError`.
  `parse_flex` then returns nothing; a consumer of `iter_records` must drop what it had
  from the same document.
- Lenient with what IBKR adds: an element, an attribute or an enum value we do not know
  is kept (a row's `raw`) or counted (`StatementEnd.rows_ignored`), never fatal; a value
  that cannot be read is None on its record with a problem that says why, and the row
  is kept.

Which rows are transactions. `Trades` holds executions (`<Trade levelOfDetail=
"EXECUTION">`) and, depending on the query, orders, symbol and asset summaries and
closed lots of them (other elements or other `levelOfDetail`s): only executions are
trades. `CashTransactions` rows are `DETAIL`s, or summaries of them: only details are
cash transactions. A row without `levelOfDetail` (a query that left the column out) is
what its section holds at the finest level. `OpenPositions` may add each position's lots
(`LOT`) to its `SUMMARY`: positions are the summaries. Rows in the currency
`BASE_SUMMARY` are totals over currencies, never a currency: the cash report's becomes
the statement's `CashTotal`; elsewhere they are skipped. What was skipped is counted.
A conversion rate of -1 is IBKR's "no rate that day" (None).

Values are read by `values.py` (numbers, no value, dates, the time zone).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, Final
from xml.parsers.expat import ExpatError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from ...snapshot import INCOME_KINDS, TAX_KIND, CurrencyError, _positional_maker, currency_code
from . import values as V
from .errors import FlexError, FlexFormatError, error_for
from .records import (
    AccountInformation,
    CashBalance,
    CashTotal,
    CashTransaction,
    Contract,
    CorporateAction,
    ExchangeRate,
    FlexResponse,
    HeldPosition,
    LedgerEntry,
    NetAssetValue,
    OptionEvent,
    Statement,
    StatementEnd,
    StatementHeader,
    Trade,
)

ROOT: Final = "FlexQueryResponse"
ERROR_ROOT: Final = "FlexStatementResponse"
STATEMENT: Final = "FlexStatement"
ACCOUNT_INFORMATION: Final = "AccountInformation"
BASE_SUMMARY: Final = "BASE_SUMMARY"
#: IBKR's rate for a currency it has no rate for on that day.
NO_RATE: Final = -1
#: The moment of a statement's day that its `as_of` is: the end of the period's last day.
END_OF_DAY: Final = dt.time(23, 59, 59)

_CASH_KINDS: Final = {
    "dividends": "dividend",
    "dividend": "dividend",
    "withholding tax": "withholding_tax",
    "871(m) withholding": "withholding_tax",
    "payment in lieu of dividends": "payment_in_lieu",
    "payment in lieu of dividend": "payment_in_lieu",
    "broker interest paid": "interest",
    "broker interest received": "interest",
    "bond interest paid": "interest",
    "bond interest received": "interest",
    "broker fees": "fee",
    "other fees": "fee",
    "commission adjustments": "fee",
    "advisor fees": "fee",
    "deposits": "deposit",
    "withdrawals": "withdrawal",
}
_DEPOSITS_WITHDRAWALS: Final = frozenset({"deposits/withdrawals", "deposits & withdrawals"})
_OPTION_EVENT_KINDS: Final = {
    "assignment": "assignment",
    "exercise": "exercise",
    "expiration": "expiration",
    "cash settlement": "cash_settlement",
    "buy": "buy",
    "sell": "sell",
}
_CORPORATE_ACTION_KINDS: Final = {
    "FS": "forward_split",
    "RS": "reverse_split",
    "SO": "spinoff",
    "SD": "stock_dividend",
    "TC": "merger",
    "TO": "tender",
    "DW": "delisted",
    "IC": "identifier_change",
    "RI": "rights_issue",
}


@dataclass(frozen=True, slots=True)
class ResponseEnd:
    """The last record of a stream: the response's name and kind, how many statements
    it held, and its own problems."""

    query_name: str
    kind: str
    statements: int
    problems: tuple[str, ...] = ()


def parse_flex(
    source: str | bytes | IO[bytes],
    *,
    zone: dt.tzinfo = V.EASTERN,
    period: tuple[dt.date, dt.date] | None = None,
    ledger: Callable[[Any], None] | None = None,
) -> FlexResponse:
    """A whole response, collected: every statement with its records.

    `source` is a path, a binary file, or the document itself as bytes. `zone` is the
    zone the statement's times are in; `period` the period the caller asked for, which
    settles slashed dates the statement's own do not.

    `ledger`, when given, is a first pass's: the statements are collected without their
    ledger (no trade, cash transaction or corporate action), and each ledger row is
    handed to `ledger` as a `LedgerEntry` (its values not read, its problems not
    counted in `StatementEnd.problems`), after its statement's `StatementHeader` and
    before its `StatementEnd`, which `ledger` is given too.
    """
    statements: list[Statement] = []
    outside: list[AccountInformation] = []
    parts: dict[str, Any] = {}
    end: ResponseEnd | None = None
    for record in iter_records(source, zone=zone, period=period, ledger=ledger is None):
        match record:
            case LedgerEntry():
                ledger(record)  # type: ignore[misc]
            case StatementHeader():
                parts = {"header": record, **{name: [] for name in _COLLECTED.values()}}
                if ledger is not None:
                    ledger(record)
            case StatementEnd():
                statements.append(_statement(parts, record, outside))
                parts = {}
                if ledger is not None:
                    ledger(record)
            case AccountInformation() if not parts:
                outside.append(record)
            case AccountInformation():
                parts["account_information"] = record
            case CashTotal():
                parts["cash_total"] = record
            case ResponseEnd():
                end = record
            case _:
                parts[_COLLECTED[type(record)]].append(record)
    assert end is not None
    return FlexResponse(
        query_name=end.query_name,
        kind=end.kind,
        statements=tuple(statements),
        account_information=tuple(outside),
        problems=end.problems,
    )


def iter_records(
    source: str | bytes | IO[bytes],
    *,
    zone: dt.tzinfo = V.EASTERN,
    period: tuple[dt.date, dt.date] | None = None,
    ledger: bool = True,
) -> Iterator[Any]:
    """The records of a response in document order, one at a time: for each statement a
    `StatementHeader`, its rows' records, a `StatementEnd`; `AccountInformation`
    wherever it stands; a `ResponseEnd` last. Raises FlexError (and yields nothing more)
    on a document that is not a whole, readable statement. `ledger` False: each ledger
    row a `LedgerEntry` (a first pass's: the same rows, their values not read)."""
    if isinstance(source, bytes | bytearray):
        import io

        source = io.BytesIO(source)
    reader = _Reader(zone, period, ledger)
    try:
        yield from reader.read(source)
    except ExpatError as error:
        raise FlexFormatError(
            f"the statement is not well-formed XML ({error}): truncated or damaged; "
            "nothing of it was used"
        ) from None
    except DefusedXmlException as error:
        raise FlexFormatError(
            f"the statement was refused: it declares {_what_was_refused(error)}, which "
            "a Flex statement never does; nothing of it was used"
        ) from None


def _what_was_refused(error: DefusedXmlException) -> str:
    name = type(error).__name__
    if "DTD" in name:
        return "a document type (DTD)"
    if "External" in name:
        return "an external reference"
    return "entities"


#: How much of a statement is fed to expat at a time (its records handed on after each).
_CHUNK: Final = 1 << 16


def _expat_parser() -> Any:
    """An expat parser armed by `defusedxml` (`DefusedXMLParser`: no DTD, no entity, no
    external reference), with none of ElementTree's handlers: `_Reader` sets its own.
    Attributes come as a dict; names in a namespace as `uri}name` (ElementTree's
    separator, so that a name reads as ElementTree reads it: `_named`)."""
    parser = DefusedXMLParser(forbid_dtd=True, forbid_entities=True, forbid_external=True).parser
    parser.DefaultHandlerExpand = None
    parser.CharacterDataHandler = None
    parser.CommentHandler = None
    parser.ProcessingInstructionHandler = None
    parser.ordered_attributes = False
    return parser


def _expats_own(error: BaseException) -> bool:
    """Whether `error` is expat's refusal of the document's declared encoding, raised by
    `Parse` itself (no handler of ours ran: its traceback ends in the caller's frame): a
    multi-byte one other than UTF-8 and UTF-16 (`ValueError`), or one Python does not
    know (`LookupError`). Not `ExpatError`: the document is not even read."""
    return isinstance(error, ValueError | LookupError) and (
        error.__traceback__ is not None and error.__traceback__.tb_next is None
    )


def _named(attrs: dict[str, str]) -> dict[str, str]:
    """The attributes with their names as ElementTree writes them: a name in a
    namespace as `{uri}name` (never in a Flex statement: checked in one step)."""
    if "}" not in "".join(attrs):
        return attrs
    return {("{" + name if "}" in name else name): value for name, value in attrs.items()}


_NO_VALUE: Final = V.NO_VALUE
#: The attributes a row's contract is read from (`_Row.contract`).
_CONTRACT_ATTRIBUTES: Final = (
    "conid",
    "symbol",
    "assetCategory",
    "putCall",
    "subCategory",
    "currency",
    "multiplier",
    "expiry",
    "strike",
    "description",
    "isin",
    "listingExchange",
    "underlyingConid",
    "underlyingSymbol",
)
#: The most contracts a statement's reader keeps read (rows of one contract share it):
#: the first ones, a bounded few (a statement of any size is read in bounded memory).
_CONTRACTS_KEPT: Final = 500


class _Row:
    """One element's attributes, read by the value rules; what could not be read is
    kept in `problems` (`attribute: why`). `contracts`: the contracts read so far in the
    statement, by their attributes' texts (thousands of rows name the same one)."""

    __slots__ = ("attrs", "contracts", "order", "problems", "zone")

    def __init__(
        self,
        attrs: dict[str, str],
        order: str | None,
        zone: dt.tzinfo,
        contracts: dict[tuple, tuple[Contract, tuple[str, ...]]] | None = None,
    ) -> None:
        self.attrs = attrs
        self.order = order
        self.zone = zone
        self.problems: list[str] = []
        self.contracts = contracts

    # Each reader looks its attribute up itself and calls its value rule once: a row of
    # the ledger reads some 30 of them, and a trade reads the most.

    def _read(self, name: str, reader: Callable, *args: Any) -> Any:
        value = self.attrs.get(name)
        if value is None:  # the query has no such column: no value (the common case)
            return None
        try:
            return reader(value, *args)
        except V.ValueRuleError as error:
            self.problems.append(f"{name}: {error}")
            return None

    def text(self, name: str) -> str:
        # `V.text`, inline (a trade reads a dozen texts): no value is "".
        value = self.attrs.get(name)
        if value is None:
            return ""
        value = value.strip()
        return "" if value in _NO_VALUE else value

    def ident(self, name: str) -> str | None:
        return self.text(name) or None

    def decimal(self, name: str) -> Any:
        value = self.attrs.get(name)
        if value is None:
            return None
        try:
            return V.decimal(value)
        except V.ValueRuleError as error:
            self.problems.append(f"{name}: {error}")
            return None

    def integer(self, name: str) -> Any:
        return self._read(name, V.integer)

    def date(self, name: str) -> dt.date | None:
        value = self.attrs.get(name)
        if value is None:
            return None
        try:
            return V.date(value, self.order)
        except V.ValueRuleError as error:
            self.problems.append(f"{name}: {error}")
            return None

    def date_time(self, name: str) -> tuple[dt.date | None, dt.datetime | None]:
        value = self.attrs.get(name)
        if value is None:
            return None, None
        try:
            read = V.date_time(value, self.order, self.zone)
        except V.ValueRuleError as error:
            self.problems.append(f"{name}: {error}")
            return None, None
        return read if read is not None else (None, None)

    def currency(self, name: str = "currency") -> str:
        value = self.text(name)
        if not value:
            return ""
        try:
            return currency_code(value)
        except CurrencyError as error:
            self.problems.append(f"{name}: {error}")
            return ""

    def contract(self) -> Contract:
        """The row's contract: read once per statement for the same attributes' texts
        (the same texts read the same way: the statement's date order is fixed), with
        the problems reading them found, which each row naming it carries."""
        if self.contracts is None:
            return self._contract()
        key = tuple(map(self.attrs.get, _CONTRACT_ATTRIBUTES))
        kept = self.contracts.get(key)
        if kept is None:
            before = len(self.problems)
            contract = self._contract()
            kept = (contract, tuple(self.problems[before:]))
            if len(self.contracts) < _CONTRACTS_KEPT:
                self.contracts[key] = kept
            return contract
        self.problems.extend(kept[1])
        return kept[0]

    def _contract(self) -> Contract:
        sec_type = self.text("assetCategory")
        right = self.text("putCall").upper()
        if not right and sec_type in ("OPT", "FOP", "FSFOP"):
            right = self.text("subCategory").upper()
        return Contract(
            con_id=self.integer("conid"),
            symbol=self.text("symbol"),
            sec_type=sec_type,
            currency=self.currency(),
            multiplier=self.decimal("multiplier"),
            expiry=self.date("expiry"),
            strike=self.decimal("strike"),
            right=right if right in ("P", "C") else "",
            description=self.text("description"),
            isin=self.text("isin"),
            listing_exchange=self.text("listingExchange"),
            underlying_con_id=self.integer("underlyingConid"),
            underlying_symbol=self.text("underlyingSymbol"),
        )

    def has_contract(self) -> bool:
        return bool(self.text("conid") or self.text("symbol"))

    def done(self) -> dict[str, Any]:
        # The attributes are the dict expat made for this element, which nothing changes
        # and nothing else keeps: the record's read-only view of it needs no copy.
        return {"raw": MappingProxyType(self.attrs), "problems": tuple(self.problems)}


class _Reader:
    """The records of one document, built in expat's handlers (`_start`, `_end`) as the
    document is fed to it, and handed on between chunks (`read`)."""

    def __init__(
        self, zone: dt.tzinfo, period: tuple[dt.date, dt.date] | None, ledger: bool = True
    ) -> None:
        self.zone = zone
        self.period = period
        self.handlers = _HANDLERS if ledger else _FIRST_PASS_HANDLERS
        self.statements = 0
        self.problems: list[str] = []
        # The document: the open elements' tags and attributes, the root's.
        self.tags: list[str] = []
        self.attributes: list[dict[str, str]] = []
        self.root = ""
        self.root_attrs: dict[str, str] = {}
        self.declared: list[str] = []
        # An error answer's fields: the text of each of the root's children.
        self.error_fields: dict[str, str] = {}
        self.text: list[str] = []
        # The records read and not yet handed on.
        self.records: list[Any] = []
        # The statement being read.
        self.statement: StatementHeader | None = None
        self.statement_depth = 0
        self.order: str | None = None
        self.read_counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self.sections: list[str] = []
        self.section_rows = 0
        self.row_problems = 0
        self.contracts: dict[tuple, tuple[Contract, tuple[str, ...]]] = {}

    def read(self, source: str | IO[bytes]) -> Iterator[Any]:
        opened = not hasattr(source, "read")
        file: IO[bytes] = open(source, "rb") if opened else source  # type: ignore[arg-type,assignment]  # noqa: SIM115
        self.parser = parser = _expat_parser()
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        records = self.records
        try:
            while True:
                data = file.read(_CHUNK)
                try:
                    parser.Parse(data, not data)
                except BaseException as error:
                    # What was read before the fault is handed on first, as the rows
                    # before it were; then the fault.
                    yield from records
                    records.clear()
                    if _expats_own(error):
                        raise FlexFormatError(
                            f"the statement was refused: its encoding cannot be read ({error}); "
                            "a Flex statement is UTF-8; nothing of it was used"
                        ) from None
                    raise
                if records:
                    yield from records
                    records.clear()
                if not data:
                    break
        finally:
            parser.StartElementHandler = parser.EndElementHandler = None
            parser.CharacterDataHandler = None
            self.parser = None
            if opened:
                file.close()
        counts = [int(c) for c in self.declared if c.isdigit()]
        if counts and sum(counts) != self.statements:
            self.problems.append(
                f"the response says it holds {sum(counts)} statement(s) and holds {self.statements}"
            )
        yield ResponseEnd(
            query_name=self.root_attrs.get("queryName", ""),
            kind=self.root_attrs.get("type", ""),
            statements=self.statements,
            problems=tuple(self.problems),
        )

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        if "}" in tag:  # a name in a namespace, as ElementTree writes it
            tag = "{" + tag
        tags = self.tags
        tags.append(tag)
        self.attributes.append(attrs)
        depth = len(tags)
        if depth == 1:
            if tag not in (ROOT, ERROR_ROOT):
                raise FlexFormatError(
                    f"not a Flex statement: the document is a <{tag[:40]}>, "
                    f"not a <{ROOT}>; nothing of it was used"
                )
            self.root = tag
            self.root_attrs = attrs
        elif self.root == ROOT:
            if tag == "FlexStatements" and depth == 2:
                self.declared.append(attrs.get("count", ""))
            if tag == STATEMENT and self.statement is None:
                self.records.append(self._start_statement(_named(attrs), depth))
            elif self.statement is not None and depth == self.statement_depth + 1:
                self.sections.append(tag)
                self.section_rows = 0
        elif depth == 2:  # a field of an error answer: its text up to its first child
            self.text = []
            self.parser.CharacterDataHandler = self.text.append
        elif depth == 3:
            self.parser.CharacterDataHandler = None

    def _end(self, _: str) -> None:
        tags = self.tags
        depth = len(tags)
        if self.root == ERROR_ROOT:
            if depth == 2:
                self.parser.CharacterDataHandler = None
                self.error_fields[tags[-1]] = "".join(self.text).strip()
            if depth == 1:
                raise self._error_response(self.error_fields)
        elif depth >= 2:
            self._end_element(tags[-1], self.attributes[-1], depth)
        tags.pop()
        self.attributes.pop()

    def _error_response(self, fields: dict[str, str]) -> FlexError:
        code_text = fields.get("ErrorCode", "")
        code = int(code_text) if code_text.isdigit() else None
        if code is None and fields.get("Status", "").lower() == "success":
            return FlexFormatError(
                "the answer is the Flex Web Service's acknowledgement of a request, not a statement"
            )
        return error_for(code, fields.get("ErrorMessage", ""))

    def _start_statement(self, attrs: dict[str, str], depth: int) -> StatementHeader:
        try:
            self.order = V.slash_order(
                attrs.get("fromDate"),
                attrs.get("toDate"),
                attrs.get("whenGenerated"),
                expected=self.period,
            )
        except V.AmbiguousDateFormat as error:
            raise FlexFormatError(f"statement {self.statements + 1}: {error}") from None
        row = _Row(attrs, self.order, self.zone)
        to_date = row.date("toDate")
        _, generated_at = row.date_time("whenGenerated")
        self.statement = StatementHeader(
            index=self.statements,
            account=row.text("accountId"),
            from_date=row.date("fromDate"),
            to_date=to_date,
            as_of=dt.datetime.combine(to_date, END_OF_DAY, self.zone) if to_date else None,
            generated_at=generated_at,
            period=row.text("period"),
            **row.done(),
        )
        self.statement_depth = depth
        self.read_counts, self.skipped, self.ignored = Counter(), Counter(), Counter()
        self.sections, self.row_problems = [], 0
        self.contracts = {}  # a statement's date order may differ from the last one's
        return self.statement

    def _end_element(self, tag: str, attrs: dict[str, str], depth: int) -> None:
        statement = self.statement
        if statement is None:
            if tag == ACCOUNT_INFORMATION:
                self.records.append(self._account_information(_named(attrs), None))
            return
        relative = depth - self.statement_depth
        if relative == 0:
            self.records.append(
                StatementEnd(
                    index=statement.index,
                    account=statement.account,
                    rows_read=dict(self.read_counts),
                    rows_skipped=dict(self.skipped),
                    rows_ignored=dict(self.ignored),
                    sections=tuple(self.sections),
                    problems=self.row_problems,
                )
            )
            self.statements += 1
            self.statement = None
        elif relative == 1:
            if tag == ACCOUNT_INFORMATION:
                record = self._account_information(_named(attrs), statement)
                self.read_counts[ACCOUNT_INFORMATION] += 1
                self.records.append(record)
            elif self.section_rows == 0 and attrs:
                self.ignored[tag] += 1  # a section of one element (ChangeInNAV)
        elif relative == 2:
            self.section_rows += 1
            path = f"{self.tags[self.statement_depth]}/{tag}"
            handler = self.handlers.get(path)
            if handler is None:
                self.ignored[path] += 1
                return
            row = _Row(_named(attrs), self.order, self.zone, self.contracts)
            record = handler(self, row, statement)
            if record is None:
                self.skipped[path] += 1
                return
            self.read_counts[path] += 1
            self.row_problems += len(record.problems)
            self.records.append(record)
        else:
            self.ignored["/".join(self.tags[self.statement_depth : depth])] += 1

    def _account_information(
        self, attrs: dict[str, str], statement: StatementHeader | None
    ) -> AccountInformation:
        row = _Row(attrs, self.order, self.zone)
        account = row.text("accountId") or (statement.account if statement else "")
        return AccountInformation(
            account=account, base_currency=row.currency(), name=row.text("name"), **row.done()
        )

    # --- the rows ---

    def _account(self, row: _Row, statement: StatementHeader) -> str:
        return row.text("accountId") or statement.account

    def position(self, row: _Row, statement: StatementHeader) -> HeldPosition | None:
        if row.text("levelOfDetail").upper() not in ("", "SUMMARY"):
            return None
        return HeldPosition(
            account=self._account(row, statement),
            contract=row.contract(),
            quantity=row.decimal("position"),
            mark_price=row.decimal("markPrice"),
            market_value=row.decimal("positionValue"),
            cost_basis_price=row.decimal("costBasisPrice"),
            cost_basis=row.decimal("costBasisMoney"),
            unrealized_pnl=row.decimal("fifoPnlUnrealized"),
            fx_rate_to_base=row.decimal("fxRateToBase"),
            report_date=row.date("reportDate"),
            **row.done(),
        )

    def cash(self, row: _Row, statement: StatementHeader) -> CashBalance | CashTotal:
        account = self._account(row, statement)
        if row.text("currency") == BASE_SUMMARY:
            return CashTotal(
                account=account,
                ending_cash=row.decimal("endingCash"),
                ending_settled_cash=row.decimal("endingSettledCash"),
                **row.done(),
            )
        return CashBalance(
            account=account,
            currency=row.currency(),
            ending_cash=row.decimal("endingCash"),
            ending_settled_cash=row.decimal("endingSettledCash"),
            **row.done(),
        )

    def net_asset_value(self, row: _Row, statement: StatementHeader) -> NetAssetValue | None:
        if row.text("currency") == BASE_SUMMARY:
            return None
        return NetAssetValue(
            account=self._account(row, statement),
            date=row.date("reportDate"),
            currency=row.currency(),
            total=row.decimal("total"),
            cash=row.decimal("cash"),
            stock=row.decimal("stock"),
            options=row.decimal("options"),
            **row.done(),
        )

    def exchange_rate(self, row: _Row, statement: StatementHeader) -> ExchangeRate:
        rate = row.decimal("rate")
        if rate == NO_RATE:
            rate = None
        elif rate is not None and rate <= 0:
            row.problems.append(f"rate: {V.shown(row.attrs.get('rate'))} is no rate")
            rate = None
        return ExchangeRate(
            date=row.date("reportDate"),
            from_currency=row.currency("fromCurrency"),
            to_currency=row.currency("toCurrency"),
            rate=rate,
            **row.done(),
        )

    # --- the ledger's rows: which are read (a first pass's and a full read's alike) ---

    @staticmethod
    def is_trade(row: _Row) -> bool:
        return (
            row.text("levelOfDetail").upper() in ("", "EXECUTION")
            and row.text("currency") != BASE_SUMMARY
        )

    @staticmethod
    def is_cash_transaction(row: _Row) -> bool:
        return (
            row.text("levelOfDetail").upper() in ("", "DETAIL")
            and row.text("currency") != BASE_SUMMARY
        )

    @staticmethod
    def is_corporate_action(row: _Row) -> bool:
        return row.text("levelOfDetail").upper() in ("", "DETAIL")

    @staticmethod
    def cash_kind(row: _Row) -> tuple[str, str, Any]:
        """A cash transaction's type text, kind and amount."""
        type_text = row.text("type")
        amount = row.decimal("amount")
        normalised = " ".join(type_text.lower().split())
        kind = _CASH_KINDS.get(normalised)
        if normalised in _DEPOSITS_WITHDRAWALS:
            kind = "withdrawal" if amount is not None and amount < 0 else "deposit"
        return type_text, kind or "other", amount

    def trade_entry(self, row: _Row, statement: StatementHeader) -> LedgerEntry | None:
        if not self.is_trade(row):
            return None
        return LedgerEntry("Trade", self._account(row, statement), row.ident("transactionID"))

    def cash_transaction_entry(self, row: _Row, statement: StatementHeader) -> LedgerEntry | None:
        if not self.is_cash_transaction(row):
            return None
        kind = _CASH_KINDS.get(" ".join(row.text("type").lower().split()), "other")
        action_id = row.ident("actionID")
        con_id = None
        if action_id and kind in (*INCOME_KINDS, TAX_KIND) and row.has_contract():
            con_id = row.contract().con_id
        return LedgerEntry(
            "CashTransaction",
            self._account(row, statement),
            row.ident("transactionID"),
            kind=kind,  # exact for the kinds a tax is linked by (a deposit's: other)
            action_id=action_id,
            con_id=con_id,
        )

    def corporate_action_entry(self, row: _Row, statement: StatementHeader) -> LedgerEntry | None:
        if not self.is_corporate_action(row):
            return None
        return LedgerEntry(
            "CorporateAction", self._account(row, statement), row.ident("transactionID")
        )

    def trade(self, row: _Row, statement: StatementHeader) -> Trade | None:
        if not self.is_trade(row):
            return None
        text, decimal = row.text, row.decimal
        day, traded_at = row.date_time("dateTime")
        trade_date = row.date("tradeDate") or day
        if traded_at is None and trade_date is not None and text("tradeTime"):
            traded_at = row._read("tradeTime", V.time_on, trade_date, self.zone)
        buy_sell = text("buySell")
        codes = tuple(code for code in text("notes").split(";") if code.strip())
        side = buy_sell.upper()
        # Every field in `Trade`'s order (`_make_trade`), each read in that order too (a
        # row's problems are in the order of its fields).
        return _make_trade(
            text("accountId") or statement.account,  # account
            row.ident("transactionID"),  # transaction_id
            row.ident("tradeID"),  # trade_id
            row.contract(),  # contract
            trade_date,
            traded_at,
            row.date("settleDateTarget"),  # settle_date
            "BUY"  # buy_sell
            if side.startswith("BUY")
            else "SELL"
            if side.startswith("SELL")
            else buy_sell,
            decimal("quantity"),  # quantity
            decimal("tradePrice"),  # price
            decimal("proceeds"),  # proceeds
            decimal("ibCommission"),  # commission
            row.currency("ibCommissionCurrency"),  # commission_currency
            row.currency(),  # currency
            decimal("fifoPnlRealized"),  # realized_pnl
            decimal("fxRateToBase"),  # fx_rate_to_base
            decimal("taxes"),  # taxes
            decimal("netCash"),  # net_cash
            text("openCloseIndicator"),  # open_close
            codes,
            "(CA.)" in side or "Ca" in codes,  # cancelled
            text("transactionType"),  # transaction_type
            row.ident("ibOrderID"),  # order_id
            text("ibExecID"),  # execution_id
            MappingProxyType(row.attrs),  # raw
            tuple(row.problems),  # problems
        )

    def cash_transaction(self, row: _Row, statement: StatementHeader) -> CashTransaction | None:
        if not self.is_cash_transaction(row):
            return None
        type_text, kind, amount = self.cash_kind(row)
        day, happened_at = row.date_time("dateTime")
        settle_date = row.date("settleDate")
        report_date = row.date("reportDate")
        # Every field in `CashTransaction`'s order, read in that order (`trade`).
        return _make_cash_transaction(
            row.text("accountId") or statement.account,  # account
            row.ident("transactionID"),  # transaction_id
            kind,
            type_text,
            day or settle_date or report_date,  # date
            happened_at,
            amount,
            row.currency(),  # currency
            row.contract() if row.has_contract() else None,  # contract
            row.text("description"),  # description
            row.ident("actionID"),  # action_id
            settle_date,
            report_date,
            row.date("exDate"),  # ex_date
            row.decimal("fxRateToBase"),  # fx_rate_to_base
            row.text("code"),  # code
            row.ident("tradeID"),  # trade_id
            row.text("clientReference"),  # client_reference
            MappingProxyType(row.attrs),  # raw
            tuple(row.problems),  # problems
        )

    def corporate_action(self, row: _Row, statement: StatementHeader) -> CorporateAction | None:
        if not self.is_corporate_action(row):
            return None
        type_code = row.text("type")
        day, happened_at = row.date_time("dateTime")
        return CorporateAction(
            account=self._account(row, statement),
            transaction_id=row.ident("transactionID"),
            action_id=row.ident("actionID"),
            kind=_CORPORATE_ACTION_KINDS.get(type_code.upper(), "other"),
            type_code=type_code,
            contract=row.contract() if row.has_contract() else None,
            report_date=row.date("reportDate"),
            happened_at=happened_at,
            date=day or row.date("reportDate"),
            description=row.text("description") or row.text("actionDescription"),
            quantity=row.decimal("quantity"),
            amount=row.decimal("amount"),
            proceeds=row.decimal("proceeds"),
            value=row.decimal("value"),
            currency=row.currency(),
            realized_pnl=row.decimal("fifoPnlRealized"),
            **row.done(),
        )

    def option_event(self, row: _Row, statement: StatementHeader) -> OptionEvent:
        type_text = row.text("transactionType")
        return OptionEvent(
            account=self._account(row, statement),
            transaction_id=row.ident("transactionID"),
            kind=_OPTION_EVENT_KINDS.get(" ".join(type_text.lower().split()), "other"),
            type_text=type_text,
            contract=row.contract(),
            date=row.date("date"),
            quantity=row.decimal("quantity"),
            price=row.decimal("tradePrice"),
            mark_price=row.decimal("markPrice"),
            proceeds=row.decimal("proceeds"),
            realized_pnl=row.decimal("realizedPnl"),
            currency=row.currency(),
            trade_id=row.ident("tradeID"),
            **row.done(),
        )


#: The rows read, by `Section/Row`; every other row is counted as ignored.
_HANDLERS: Final[dict[str, Callable]] = {
    "OpenPositions/OpenPosition": _Reader.position,
    "CashReport/CashReportCurrency": _Reader.cash,
    "EquitySummaryInBase/EquitySummaryByReportDateInBase": _Reader.net_asset_value,
    "ConversionRates/ConversionRate": _Reader.exchange_rate,
    "Trades/Trade": _Reader.trade,
    "Trades/Order": lambda *_: None,
    "Trades/SymbolSummary": lambda *_: None,
    "Trades/AssetSummary": lambda *_: None,
    "Trades/Lot": lambda *_: None,
    "Trades/WashSale": lambda *_: None,
    "CashTransactions/CashTransaction": _Reader.cash_transaction,
    "CorporateActions/CorporateAction": _Reader.corporate_action,
    "OptionEAE/OptionEAE": _Reader.option_event,
}
#: A first pass's (`iter_records(ledger=False)`): the ledger's rows as `LedgerEntry`s.
_FIRST_PASS_HANDLERS: Final[dict[str, Callable]] = {
    **_HANDLERS,
    "Trades/Trade": _Reader.trade_entry,
    "CashTransactions/CashTransaction": _Reader.cash_transaction_entry,
    "CorporateActions/CorporateAction": _Reader.corporate_action_entry,
}
#: A `Trade`, a `CashTransaction` from its fields, every one, in order (a ledger has
#: 100,000s: the generated `__init__` costs more than half as much again).
_make_trade: Final = _positional_maker(Trade)
_make_cash_transaction: Final = _positional_maker(CashTransaction)
_COLLECTED: Final = {
    HeldPosition: "positions",
    CashBalance: "cash",
    NetAssetValue: "net_asset_values",
    ExchangeRate: "exchange_rates",
    Trade: "trades",
    CashTransaction: "cash_transactions",
    CorporateAction: "corporate_actions",
    OptionEvent: "option_events",
}


def _statement(
    parts: dict[str, Any], end: StatementEnd, outside: list[AccountInformation]
) -> Statement:
    header: StatementHeader = parts["header"]
    information = parts.get("account_information")
    if information is None:
        information = next((a for a in outside if a.account == header.account), None)
    by_day: dict[Any, NetAssetValue] = {}
    for value in parts["net_asset_values"]:
        by_day[(value.account, value.date)] = value
    return Statement(
        header=header,
        end=end,
        base_currency=information.base_currency if information else "",
        account_information=information,
        cash_total=parts.get("cash_total"),
        **{name: tuple(parts[name]) for name in _COLLECTED.values() if name != "net_asset_values"},
        net_asset_values=tuple(by_day.values()),
    )
