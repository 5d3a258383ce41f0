"""The parser over every real Activity Flex statement we have (tests/data/flex/<origin>/,
published by other projects for their own tests, each with its licence beside it).

Each file is read whole: for every statement, the rows of each section are counted here
independently, with a plain XML reader, and every one of them must be a record, a
summary skipped by rule, or a row of a section we do not read (counted as ignored). A row
dropped silently fails the count.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as PlainXml
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from ibkr_sync.sources.flex import parse_flex
from ibkr_sync.sources.flex.records import link_withholding
from ibkr_sync.sources.flex.values import EASTERN

DATA = Path(__file__).parent.parent / "data" / "flex"
REAL_FILES = sorted(DATA.rglob("*.xml"))
RECORDS_OF = {
    "OpenPositions/OpenPosition": "positions",
    "Trades/Trade": "trades",
    "CashTransactions/CashTransaction": "cash_transactions",
    "CorporateActions/CorporateAction": "corporate_actions",
    "OptionEAE/OptionEAE": "option_events",
    "ConversionRates/ConversionRate": "exchange_rates",
}


def file_counts(path: Path) -> list[Counter]:
    """Per statement, the rows of each section (`Section/Row`), a row's own children
    (`Section/Row/Child`), and the one-element sections, counted by a plain reader."""
    counts = []
    for statement in PlainXml.parse(path).getroot().iter("FlexStatement"):
        counter: Counter = Counter()
        for section in statement:
            if len(section) == 0 and section.attrib:
                counter[section.tag] += 1
            for row in section:
                counter[f"{section.tag}/{row.tag}"] += 1
                for child in row.iter():
                    if child is not row:
                        counter[f"{section.tag}/{row.tag}/{child.tag}"] += 1
        counts.append(counter)
    return counts


def test_every_origin_has_its_licence_beside_its_files():
    assert len(REAL_FILES) == 7
    for folder in {path.parent for path in REAL_FILES}:
        assert list(folder.glob("LICENSE*")), folder


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_row_of_every_real_statement_is_accounted_for(path):
    response = parse_flex(str(path))
    expected = file_counts(path)
    assert len(response.statements) == len(expected)
    for statement, counts in zip(response.statements, expected, strict=True):
        end = statement.end
        accounted = Counter(end.rows_read) + Counter(end.rows_skipped) + Counter(end.rows_ignored)
        assert accounted == counts, path.name
        for row_path, field_name in RECORDS_OF.items():
            assert len(getattr(statement, field_name)) == end.rows_read.get(row_path, 0)
        cash_rows = len(statement.cash) + (statement.cash_total is not None)
        assert cash_rows == end.rows_read.get("CashReport/CashReportCurrency", 0)
        # Every record keeps the broker's attributes exactly as they came.
        for record in statement.trades + statement.cash_transactions + statement.positions:
            assert record.raw and all(type(v) is str for v in record.raw.values())


def test_a_year_of_options_futures_and_their_expiry_assignment_and_exercise():
    [statement] = parse_flex(str(DATA / "opensteuerauszug/options_future_2025.xml")).statements
    header = statement.header
    assert (header.account, header.from_date, header.to_date) == (
        "U0000000",
        dt.date(2025, 1, 1),
        dt.date(2025, 12, 31),
    )
    # "20260419 144528": a date-time joined by a space; times are US Eastern.
    assert header.generated_at == dt.datetime(2026, 4, 19, 14, 45, 28, tzinfo=EASTERN)
    assert header.as_of == dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=EASTERN)
    assert len(statement.positions) == 11
    short_call = next(p for p in statement.positions if p.contract.sec_type == "FOP")
    assert short_call.quantity == Decimal("-1")
    assert short_call.contract.right == "C"
    assert short_call.mark_price == Decimal("0.0008")
    assert short_call.market_value == Decimal("-100")
    record = short_call.as_position_record()
    assert (record.con_id, record.quantity, record.multiplier) == (
        774001267,
        Decimal("-1"),
        "125000",
    )
    kinds = Counter(event.kind for event in statement.option_events)
    assert kinds == {"expiration": 3, "sell": 4, "buy": 2, "exercise": 2, "assignment": 1,
                     "cash_settlement": 1}  # fmt: skip
    expired = next(e for e in statement.option_events if e.contract.symbol.startswith("TLT"))
    assert (expired.kind, expired.quantity, expired.date) == (
        "expiration",
        Decimal("-3"),
        dt.date(2025, 6, 13),
    )
    future = next(t for t in statement.trades if t.contract.sec_type == "FUT")
    assert future.contract.multiplier == Decimal("125000")
    assert future.contract.expiry == dt.date(2025, 12, 15)
    # A withholding tax reversed: IBKR's sign is kept, and both belong to the dividend.
    igic = [t for t in statement.cash_transactions if t.action_id == "151346535"]
    assert sorted((t.kind, t.amount) for t in igic) == [
        ("dividend", Decimal("85")),
        ("withholding_tax", Decimal("-12.75")),
        ("withholding_tax", Decimal("12.75")),
    ]
    links = link_withholding(statement.cash_transactions)
    linked = [(tax.amount, income.amount) for tax, income in links if tax.action_id == "151346535"]
    assert sorted(linked) == [(Decimal("-12.75"), Decimal("85")), (Decimal("12.75"), Decimal("85"))]
    fees = [t for t in statement.cash_transactions if t.kind == "fee"]
    assert len(fees) == 4 and all(t.amount < 0 for t in fees)


def test_cash_per_currency_fx_trades_and_rates_ibkr_has_not():
    [statement] = parse_flex(
        str(DATA / "portfolio-performance/testIBFlexStatementFile18.xml")
    ).statements
    # BASE_SUMMARY is the total in the base currency, not a currency.
    assert {c.currency for c in statement.cash} == {"EUR", "USD"}
    assert statement.cash_total is not None
    assert statement.cash_total.ending_cash == Decimal("16469.40849844")
    eur = next(c for c in statement.cash if c.currency == "EUR")
    assert eur.ending_cash == Decimal("16469.4085")
    fx = next(t for t in statement.trades if t.contract.sec_type == "CASH")
    assert (fx.contract.symbol, fx.buy_sell, fx.quantity, fx.proceeds) == (
        "EUR.USD",
        "SELL",
        Decimal("-3634"),
        Decimal("3895.2846"),
    )
    assert (fx.commission, fx.commission_currency, fx.currency) == (
        Decimal("-1.8726"),
        "EUR",
        "USD",
    )
    assert fx.transaction_id == "1160254743"
    assert fx.traded_at == dt.datetime(2022, 5, 26, 15, 0, 54, tzinfo=EASTERN)
    assert len(statement.exchange_rates) == 9390
    no_rate = [r for r in statement.exchange_rates if r.rate is None]
    assert len(no_rate) == 366 and {r.raw["rate"] for r in no_rate} == {"-1"}
    chf = statement.exchange_rates[0]
    assert (chf.date, chf.from_currency, chf.to_currency, chf.rate) == (
        dt.date(2021, 12, 20),
        "CHF",
        "EUR",
        Decimal("0.96244"),
    )
    deposits = [t for t in statement.cash_transactions if t.kind == "deposit"]
    assert sorted(t.amount for t in deposits) == [Decimal("100"), Decimal("20000")]
    pairs = link_withholding(statement.cash_transactions)
    assert {(tax.transaction_id, income.transaction_id) for tax, income in pairs} == {
        ("1216874521", "1216874520"),
        ("1385409478", "1385409476"),
    }


def test_account_information_beside_the_statements_and_placeholder_ids():
    """A hand-edited file: AccountInformation outside FlexStatements, conIds that are
    placeholders. The rows are kept, the conId is None, and the problem says why."""
    response = parse_flex(str(DATA / "portfolio-performance/testIBFlexStatementFile12.xml"))
    assert [a.account for a in response.account_information] == ["XXXXXXXX"]
    assert response.account_information[0].base_currency == "EUR"
    [statement] = response.statements
    assert len(statement.trades) == 4 and len(statement.cash_transactions) == 14
    assert all(t.contract.con_id is None for t in statement.trades)
    assert statement.trades[0].problems == ("conid: 'XXXXXCAD' is not a whole number",)
    assert statement.end.problems == 14
    refund = [t for t in statement.cash_transactions if t.amount == Decimal("1.99")]
    assert [t.kind for t in refund] == ["withholding_tax"]  # a refund keeps its sign
    kinds = Counter(t.kind for t in statement.cash_transactions)
    assert kinds == {"withholding_tax": 6, "dividend": 4, "fee": 2, "deposit": 1, "interest": 1}


def test_several_statements_in_one_file():
    response = parse_flex(str(DATA / "portfolio-performance/testIBFlexStatementFile29.xml"))
    # The file says count="2" and holds three: all are read, and the response says so.
    assert len(response.statements) == 3
    assert response.problems == ("the response says it holds 2 statement(s) and holds 3",)
    assert [s.base_currency for s in response.statements] == ["EUR", "GBP", "EUR"]
    assert [s.header.index for s in response.statements] == [0, 1, 2]
    assert [len(s.cash_transactions) for s in response.statements] == [2, 2, 1]
    gbx = response.statements[1].cash_transactions[1]
    assert (gbx.currency, gbx.amount, gbx.fx_rate_to_base) == (
        "GBX",
        Decimal("138.00"),
        Decimal("0.01"),
    )
    krw = response.statements[2].cash_transactions[0]
    assert (krw.currency, krw.amount, krw.date) == ("KRW", Decimal("3100"), dt.date(2025, 3, 27))


def test_a_book_trade_of_an_option_expiring_keeps_ibkrs_no_values():
    [statement] = parse_flex(
        str(DATA / "portfolio-performance/testIBFlexStatementFile02.xml")
    ).statements
    assert statement.base_currency == "EUR"
    expiry = next(t for t in statement.trades if t.trade_id == "1908991474")
    assert expiry.contract.right == "P" and expiry.contract.strike == Decimal("50")
    assert expiry.raw["exchange"] == "--"
    assert expiry.proceeds == Decimal("-0") and str(expiry.proceeds) == "-0"
    assert (expiry.open_close, expiry.codes) == ("C", ("A",))
    assert expiry.traded_at == dt.datetime(2017, 9, 15, 16, 20, tzinfo=EASTERN)  # tradeTime
    assert expiry.raw["exchOrderId"] == "N/A"


def test_a_statement_of_funds_only_is_read_and_said_to_hold_nothing_we_read():
    [statement] = parse_flex(str(DATA / "ib-flex-reader/StatementOfFunds.xml")).statements
    assert statement.end.rows_ignored == {"StmtFunds/StatementOfFundsLine": 47}
    assert statement.end.sections == ("StmtFunds",)
    assert statement.trades == () and statement.cash_transactions == ()
