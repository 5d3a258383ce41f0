"""The parser's rules, each on a statement of our own in the real format: numbers exact,
no-value markers, the date formats a query can be set to, BASE_SUMMARY, summaries left
out, what IBKR may add, several statements, hostile and broken XML, bounded memory."""

from __future__ import annotations

import datetime as dt
import tracemalloc
import xml.etree.ElementTree as PlainXml
from decimal import Decimal

import pytest
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

from ibkr_sync.sources.flex import (
    FlexAuthError,
    FlexError,
    FlexFormatError,
    iter_records,
    parse_flex,
)
from ibkr_sync.sources.flex import values as V
from ibkr_sync.sources.flex.parser import _expat_parser
from ibkr_sync.sources.flex.records import Trade
from ibkr_sync.testing.flex_service import generate_statement, write_statement

EASTERN = V.EASTERN


def statement(
    body: str,
    *,
    account: str = "U7654321",
    from_date: str = "20250101",
    to_date: str = "20250131",
    generated: str = "20250201;061500",
) -> str:
    return (
        '<FlexQueryResponse queryName="Test" type="AF">\n<FlexStatements count="1">\n'
        f'<FlexStatement accountId="{account}" fromDate="{from_date}" toDate="{to_date}" '
        f'period="LastMonth" whenGenerated="{generated}">\n'
        f"{body}\n</FlexStatement>\n</FlexStatements>\n</FlexQueryResponse>\n"
    )


def trade(**attributes: str) -> str:
    defaults = {
        "accountId": "U7654321",
        "currency": "USD",
        "assetCategory": "STK",
        "symbol": "AAPL",
        "conid": "265598",
        "multiplier": "1",
        "transactionID": "111",
        "tradeDate": "20250110",
        "dateTime": "20250110;093001",
        "settleDateTarget": "20250113",
        "quantity": "10",
        "tradePrice": "150.125",
        "proceeds": "-1501.25",
        "ibCommission": "-1",
        "ibCommissionCurrency": "USD",
        "buySell": "BUY",
        "levelOfDetail": "EXECUTION",
    }
    defaults.update(attributes)
    return "<Trade " + " ".join(f'{k}="{v}"' for k, v in defaults.items()) + " />"


def one(xml: str):
    [result] = parse_flex(xml.encode()).statements
    return result


# --- values ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1", Decimal("0.1")),
        ("-0", Decimal("-0")),
        ("16469.40849844", Decimal("16469.40849844")),
        ("1.5E-7", Decimal("1.5E-7")),
        ("123456789012345678901234.5678", Decimal("123456789012345678901234.5678")),
        ("", None),
        ("--", None),
        ("N/A", None),
    ],
)
def test_numbers_are_exact_decimals_of_the_text(text, expected):
    value = V.decimal(text)
    assert value == expected
    if value is not None:
        assert isinstance(value, Decimal) and str(value) == str(Decimal(text))


@pytest.mark.parametrize("text", ["1,234.5", "+1", "NaN", "0x10", "1_000", "١٢", "XXXXXCAD"])
def test_what_is_no_number_is_said_and_never_read_as_one(text):
    with pytest.raises(V.ValueRuleError, match="is not a number"):
        V.decimal(text)


def test_a_value_that_cannot_be_read_is_none_with_its_reason_and_the_row_kept():
    result = one(statement(f"<Trades>{trade(tradePrice='12,50', conid='ABC')}</Trades>"))
    [row] = result.trades
    assert row.price is None and row.contract.con_id is None
    assert row.problems == (
        "conid: 'ABC' is not a whole number",
        "tradePrice: '12,50' is not a number",
    )
    assert row.raw["tradePrice"] == "12,50"
    assert result.end.problems == 2


def test_no_value_markers_in_a_row():
    result = one(
        statement(
            "<Trades>"
            + trade(
                exchange="--",
                strike="",
                expiry="N/A",
                fifoPnlRealized="--",
                ibCommissionCurrency="N/A",
            )
            + "</Trades>"
        )
    )
    [row] = result.trades
    assert row.realized_pnl is None and row.contract.strike is None
    assert row.contract.expiry is None and row.commission_currency == ""
    assert row.problems == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20250307", dt.date(2025, 3, 7)),
        ("2025-03-07", dt.date(2025, 3, 7)),
        ("07-Mar-25", dt.date(2025, 3, 7)),
    ],
)
def test_dates_in_each_unambiguous_format(text, expected):
    assert V.date(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "20250307;143005",
        "20250307,143005",
        "20250307 143005",
        "20250307143005",
        "2025-03-07;14:30:05",
        "2025-03-07, 14:30:05".replace(", ", ","),
        "2025-03-07 14:30:05",
        "03/07/2025;14:30:05",
    ],
)
def test_date_times_joined_every_way(text):
    order = V.MONTH_DAY if "/" in text else None
    assert V.date_time(text, order) == (
        dt.date(2025, 3, 7),
        dt.datetime(2025, 3, 7, 14, 30, 5, tzinfo=EASTERN),
    )


def test_date_times_without_seconds_and_a_date_alone():
    assert V.date_time("20250307;1430") == (
        dt.date(2025, 3, 7),
        dt.datetime(2025, 3, 7, 14, 30, tzinfo=EASTERN),
    )
    assert V.date_time("2025-03-07 14:30")[1] == dt.datetime(2025, 3, 7, 14, 30, tzinfo=EASTERN)
    assert V.date_time("20250307") == (dt.date(2025, 3, 7), None)


def test_times_are_us_eastern_unless_the_caller_names_the_zone():
    from zoneinfo import ZoneInfo

    xml = statement(f"<Trades>{trade(dateTime='20250110;093001')}</Trades>")
    [row] = parse_flex(xml.encode()).statements[0].trades
    assert row.traded_at == dt.datetime(2025, 1, 10, 9, 30, 1, tzinfo=EASTERN)
    assert row.traded_at.utcoffset() == dt.timedelta(hours=-5)
    zurich = ZoneInfo("Europe/Zurich")
    [row] = parse_flex(xml.encode(), zone=zurich).statements[0].trades
    assert row.traded_at == dt.datetime(2025, 1, 10, 9, 30, 1, tzinfo=zurich)


# A query's time format may name the zone ("HHmmss TimeZone", "HH:mm:ss TimeZone"): IBKR
# then writes its abbreviation after the time, as it does in `whenGenerated`.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240115;143052 EST", dt.datetime(2024, 1, 15, 14, 30, 52, tzinfo=EASTERN)),
        ("20250707;14:30:52 EDT", dt.datetime(2025, 7, 7, 14, 30, 52, tzinfo=EASTERN)),
        (
            "2025-05-22 20:41:57 AEST",
            dt.datetime(2025, 5, 22, 20, 41, 57, tzinfo=dt.timezone(dt.timedelta(hours=10))),
        ),
        ("15-Jan-24;14:30:52 UTC", dt.datetime(2024, 1, 15, 14, 30, 52, tzinfo=dt.UTC)),
        (
            "20250110;093001 CET",
            dt.datetime(2025, 1, 10, 9, 30, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        ),
        (
            "20250110;093001 GMT+08:00",
            dt.datetime(2025, 1, 10, 9, 30, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))),
        ),
    ],
)
def test_a_time_with_its_zone_is_that_moment(text, expected):
    day, moment = V.date_time(text)
    assert day == expected.date()
    assert moment == expected
    assert moment.utcoffset() == expected.utcoffset()


def test_the_zone_written_settles_the_hour_a_clock_change_repeats():
    # 01:30 on the day US Eastern falls back happens twice: EDT first, EST an hour later.
    _, first = V.date_time("20251102;013000 EDT")
    _, second = V.date_time("20251102;013000 EST")
    assert first.utcoffset() == dt.timedelta(hours=-4)
    assert second.utcoffset() == dt.timedelta(hours=-5)
    assert second.astimezone(dt.UTC) - first.astimezone(dt.UTC) == dt.timedelta(hours=1)


def test_an_abbreviation_of_several_zones_is_read_only_as_the_readers_own():
    from zoneinfo import ZoneInfo

    # CST is US Central time and China Standard Time: never guessed.
    with pytest.raises(V.ValueRuleError, match="CST"):
        V.date_time("20250110;093001 CST")
    chicago = ZoneInfo("America/Chicago")
    _, moment = V.date_time("20250110;093001 CST", zone=chicago)
    assert moment == dt.datetime(2025, 1, 10, 9, 30, 1, tzinfo=chicago)
    assert moment.utcoffset() == dt.timedelta(hours=-6)


def test_a_comma_and_a_space_between_date_and_time():
    # As a real statement's corporate actions have it: "2013-03-05, 19:45:00".
    assert V.date_time("2013-03-05, 19:45:00") == (
        dt.date(2013, 3, 5),
        dt.datetime(2013, 3, 5, 19, 45, tzinfo=EASTERN),
    )
    xml = statement(
        '<CorporateActions><CorporateAction accountId="U7654321" currency="USD" '
        'assetCategory="STK" symbol="AAPL" conid="265598" transactionID="9" type="FS" '
        'reportDate="20130306" dateTime="2013-03-05, 19:45:00" quantity="10" '
        'levelOfDetail="DETAIL" /></CorporateActions>'
    )
    [action] = one(xml).corporate_actions
    assert action.problems == ()
    assert action.happened_at == dt.datetime(2013, 3, 5, 19, 45, tzinfo=EASTERN)


def test_a_statement_of_slashed_dates_generated_with_its_zone_is_read():
    aest = dt.timezone(dt.timedelta(hours=10))
    xml = statement(
        f"<Trades>{trade(tradeDate='05/06/2025', dateTime='05/06/2025;10:00:00 AEST')}</Trades>",
        from_date="05/01/2025",
        to_date="05/21/2025",
        generated="05/22/2025 20:41:57 AEST",
    )
    result = one(xml)
    assert result.header.to_date == dt.date(2025, 5, 21)
    assert result.header.generated_at == dt.datetime(2025, 5, 22, 20, 41, 57, tzinfo=aest)
    assert result.header.problems == ()
    [row] = result.trades
    assert row.trade_date == dt.date(2025, 5, 6)
    assert row.traded_at == dt.datetime(2025, 5, 6, 10, 0, tzinfo=aest)
    assert row.problems == ()


def test_an_old_querys_trade_time_with_its_zone():
    xml = statement(f"<Trades>{trade(dateTime='', tradeTime='143052 EDT')}</Trades>")
    [row] = one(xml).trades
    assert row.traded_at == dt.datetime(
        2025, 1, 10, 14, 30, 52, tzinfo=dt.timezone(dt.timedelta(hours=-4))
    )
    assert row.problems == ()


def test_slashed_dates_month_first_told_by_the_statement_itself():
    xml = statement(
        f"<Trades>{trade(tradeDate='01/05/2025', dateTime='01/05/2025;10:00:00')}</Trades>",
        from_date="01/01/2025",
        to_date="01/31/2025",
        generated="02/01/2025;06:15:00",
    )
    result = one(xml)
    assert (result.header.from_date, result.header.to_date) == (
        dt.date(2025, 1, 1),
        dt.date(2025, 1, 31),
    )
    assert result.trades[0].trade_date == dt.date(2025, 1, 5)


def test_slashed_dates_day_first_told_by_the_statement_itself():
    xml = statement(
        f"<Trades>{trade(tradeDate='01/05/2025', dateTime='01/05/2025;10:00:00')}</Trades>",
        from_date="01/05/2025",
        to_date="31/05/2025",
        generated="01/06/2025;06:15:00",
    )
    assert one(xml).trades[0].trade_date == dt.date(2025, 5, 1)


def test_ambiguous_slashed_dates_are_refused_unless_the_period_asked_for_settles_them():
    xml = statement(
        f"<Trades>{trade(tradeDate='03/02/2025', dateTime='03/02/2025;10:00:00')}</Trades>",
        from_date="01/02/2025",
        to_date="03/04/2025",
        generated="03/05/2025;06:15:00",
    ).encode()
    with pytest.raises(FlexFormatError, match=r"month/day or day/month.*yyyyMMdd"):
        parse_flex(xml)
    [result] = parse_flex(xml, period=(dt.date(2025, 2, 1), dt.date(2025, 4, 3))).statements
    assert result.trades[0].trade_date == dt.date(2025, 2, 3)
    [result] = parse_flex(xml, period=(dt.date(2025, 1, 2), dt.date(2025, 3, 4))).statements
    assert result.trades[0].trade_date == dt.date(2025, 3, 2)


# --- sections ---


def test_base_summary_is_a_total_never_a_currency():
    result = one(
        statement(
            "<CashReport>"
            '<CashReportCurrency currency="BASE_SUMMARY" levelOfDetail="BaseCurrency" '
            'endingCash="1500.5" endingSettledCash="1400" />'
            '<CashReportCurrency currency="USD" levelOfDetail="Currency" endingCash="1000.25" '
            'endingSettledCash="900" />'
            '<CashReportCurrency currency="EUR" levelOfDetail="Currency" endingCash="-200" />'
            "</CashReport>"
            "<Trades>" + trade(currency="BASE_SUMMARY", transactionID="") + "</Trades>"
        )
    )
    assert [(c.currency, c.ending_cash) for c in result.cash] == [
        ("USD", Decimal("1000.25")),
        ("EUR", Decimal("-200")),
    ]
    assert result.cash_total.ending_cash == Decimal("1500.5")
    assert result.trades == ()
    assert result.end.rows_skipped == {"Trades/Trade": 1}


def test_summaries_are_never_transactions():
    result = one(
        statement(
            "<Trades>"
            + trade(transactionID="1")
            + trade(transactionID="", levelOfDetail="ORDER")
            + '<Order symbol="AAPL" levelOfDetail="ORDER" quantity="10" />'
            + '<SymbolSummary symbol="AAPL" levelOfDetail="SYMBOL_SUMMARY" quantity="10" />'
            + '<AssetSummary assetCategory="STK" levelOfDetail="ASSET_SUMMARY" />'
            + '<Lot symbol="AAPL" levelOfDetail="CLOSED_LOT" quantity="-5" />'
            + "</Trades><CashTransactions>"
            '<CashTransaction type="Dividends" amount="5" currency="USD" transactionID="7" '
            'levelOfDetail="DETAIL" dateTime="20250115;202000" />'
            '<CashTransaction type="Dividends" amount="5" currency="USD" '
            'levelOfDetail="SUMMARY" dateTime="20250115" />'
            "</CashTransactions><OpenPositions>"
            '<OpenPosition symbol="AAPL" conid="265598" position="10" levelOfDetail="SUMMARY" />'
            '<OpenPosition symbol="AAPL" conid="265598" position="10" levelOfDetail="LOT" />'
            "</OpenPositions>"
        )
    )
    assert [t.transaction_id for t in result.trades] == ["1"]
    assert [t.transaction_id for t in result.cash_transactions] == ["7"]
    assert len(result.positions) == 1
    assert result.end.rows_skipped == {
        "Trades/Trade": 1,
        "Trades/Order": 1,
        "Trades/SymbolSummary": 1,
        "Trades/AssetSummary": 1,
        "Trades/Lot": 1,
        "CashTransactions/CashTransaction": 1,
        "OpenPositions/OpenPosition": 1,
    }


def test_what_ibkr_adds_is_kept_and_ignored_never_fatal():
    result = one(
        statement(
            '<BrandNewSection><BrandNewRow a="1" /><BrandNewRow a="2" /></BrandNewSection>'
            '<ChangeInNAV startingValue="1" endingValue="2" />'
            "<Trades>"
            + trade(newAttribute="whatever", buySell="BUY").replace(
                " />", "><Nested x='1'/></Trade>"
            )
            + "</Trades><CashTransactions>"
            '<CashTransaction type="Crypto Staking Rewards" amount="0.5" currency="USD" '
            'transactionID="9" dateTime="20250120" />'
            "</CashTransactions><OptionEAE>"
            '<OptionEAE transactionType="Automatic Rollover" conid="1" symbol="X" quantity="1" '
            'date="20250117" />'
            "</OptionEAE>"
        )
    )
    [row] = result.trades
    assert row.raw["newAttribute"] == "whatever"
    [cash] = result.cash_transactions
    assert (cash.kind, cash.type_text) == ("other", "Crypto Staking Rewards")
    [event] = result.option_events
    assert (event.kind, event.type_text) == ("other", "Automatic Rollover")
    assert result.end.rows_ignored == {
        "BrandNewSection/BrandNewRow": 2,
        "ChangeInNAV": 1,
        "Trades/Trade/Nested": 1,
    }
    assert "BrandNewSection" in result.end.sections


@pytest.mark.parametrize(
    ("ibkr_type", "amount", "kind"),
    [
        ("Dividends", "10", "dividend"),
        ("Withholding Tax", "-1.5", "withholding_tax"),
        ("Withholding Tax", "1.5", "withholding_tax"),  # a refund keeps its sign
        ("Payment In Lieu Of Dividends", "3", "payment_in_lieu"),
        ("Broker Interest Paid", "-2", "interest"),
        ("Broker Interest Received", "2", "interest"),
        ("Bond Interest Received", "2", "interest"),
        ("Other Fees", "-10", "fee"),
        ("Deposits/Withdrawals", "1000", "deposit"),
        ("Deposits/Withdrawals", "-1000", "withdrawal"),
        ("Something New", "1", "other"),
    ],
)
def test_cash_transaction_kinds(ibkr_type, amount, kind):
    result = one(
        statement(
            f'<CashTransactions><CashTransaction type="{ibkr_type}" amount="{amount}" '
            'currency="usd" transactionID="1" dateTime="20250115;202000" /></CashTransactions>'
        )
    )
    [row] = result.cash_transactions
    assert (row.kind, row.amount, row.currency, row.contract) == (
        kind,
        Decimal(amount),
        "USD",
        None,
    )


def test_a_cancelled_trade_is_marked_and_keeps_ibkrs_sign():
    result = one(
        statement(
            "<Trades>"
            + trade(transactionID="1", quantity="10", buySell="BUY")
            + trade(transactionID="2", quantity="-10", buySell="BUY (Ca.)", notes="Ca")
            + "</Trades>"
        )
    )
    assert [(t.cancelled, t.quantity, t.buy_sell) for t in result.trades] == [
        (False, Decimal("10"), "BUY"),
        (True, Decimal("-10"), "BUY"),
    ]


def test_net_asset_value_one_per_day():
    result = one(
        statement(
            "<EquitySummaryInBase>"
            '<EquitySummaryByReportDateInBase reportDate="20250102" currency="USD" '
            'total="100000.5" cash="5000" stock="95000.5" options="0" />'
            '<EquitySummaryByReportDateInBase reportDate="20250103" currency="USD" total="1" />'
            '<EquitySummaryByReportDateInBase reportDate="20250103" currency="USD" '
            'total="101000" />'
            "</EquitySummaryInBase>"
        )
    )
    assert [(v.date, v.total) for v in result.net_asset_values] == [
        (dt.date(2025, 1, 2), Decimal("100000.5")),
        (dt.date(2025, 1, 3), Decimal("101000")),
    ]


def test_several_statements_accounts_and_periods_in_one_response():
    body = "<Trades>" + trade() + "</Trades>"
    xml = (
        '<FlexQueryResponse queryName="Two" type="AF"><FlexStatements count="3">'
        + statement(body, account="U1")
        .split('<FlexStatements count="1">\n')[1]
        .split("</FlexStatements>")[0]
        + statement(body, account="U2")
        .split('<FlexStatements count="1">\n')[1]
        .split("</FlexStatements>")[0]
        + statement(body, account="U1", from_date="20250201", to_date="20250228")
        .split('<FlexStatements count="1">\n')[1]
        .split("</FlexStatements>")[0]
        + "</FlexStatements></FlexQueryResponse>"
    )
    response = parse_flex(xml.encode())
    assert response.problems == ()
    assert [(s.account, s.header.to_date) for s in response.statements] == [
        ("U1", dt.date(2025, 1, 31)),
        ("U2", dt.date(2025, 1, 31)),
        ("U1", dt.date(2025, 2, 28)),
    ]
    assert response.statements[2].as_of == dt.datetime(2025, 2, 28, 23, 59, 59, tzinfo=EASTERN)


# --- XML that is no statement ---

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<FlexQueryResponse queryName="&lol3;" type="AF"><FlexStatements count="0"/></FlexQueryResponse>
"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<FlexQueryResponse queryName="&secret;" type="AF"><FlexStatements count="0"/></FlexQueryResponse>
"""


_STATEMENT_OF_NOTHING = (
    b'<FlexQueryResponse queryName="Q" type="AF"><FlexStatements count="0"/></FlexQueryResponse>'
)
# Every way a document type can come: each refuses the document before anything of it is
# read (a parameter entity, an external DTD: nothing is fetched or expanded).
DOCUMENT_TYPES = {
    "plain": b"<!DOCTYPE FlexQueryResponse>",
    "internal-subset": b"<!DOCTYPE FlexQueryResponse [<!ELEMENT FlexQueryResponse ANY>]>",
    "parameter-entity": b"<!DOCTYPE r [<!ENTITY % p \"<!ENTITY x 'y'>\"> %p;]>",
    "external-dtd": b'<!DOCTYPE FlexQueryResponse SYSTEM "http://127.0.0.1:9/flex.dtd">',
    "public-dtd": b'<!DOCTYPE FlexQueryResponse PUBLIC "-//X//Y//EN" "file:///etc/passwd">',
    "unparsed-entity": b'<!DOCTYPE r [<!NOTATION n SYSTEM "x"><!ENTITY u SYSTEM "y" NDATA n>]>',
}


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["laughs", "external"])
def test_hostile_xml_is_refused_whole(document):
    with pytest.raises(FlexFormatError, match="refused"):
        parse_flex(document)


@pytest.mark.parametrize("doctype", DOCUMENT_TYPES.values(), ids=DOCUMENT_TYPES.keys())
def test_any_document_type_is_refused_whole(doctype):
    records = []
    with pytest.raises(FlexFormatError, match=r"refused: it declares a document type \(DTD\)"):
        records.extend(iter_records(b'<?xml version="1.0"?>\n' + doctype + _STATEMENT_OF_NOTHING))
    assert records == []


def test_the_refusals_are_defusedxmls_own():
    """The parser is the one defusedxml arms: its handlers raise its exceptions."""
    with pytest.raises(DTDForbidden):
        _expat_parser().Parse(b"<!DOCTYPE r><r/>", True)
    # Behind a document type, which is refused first: armed all the same.
    parser = _expat_parser()
    with pytest.raises(EntitiesForbidden):
        parser.EntityDeclHandler("e", False, "v", None, None, None, None)
    with pytest.raises(EntitiesForbidden):
        parser.UnparsedEntityDeclHandler("u", None, "y", None, "n")
    with pytest.raises(ExternalReferenceForbidden):
        _expat_parser().ExternalEntityRefHandler("c", None, "file:///etc/passwd", None)


def test_a_truncated_statement_is_an_error_not_a_partial_result():
    whole = generate_statement(positions=3, trades=50).encode()
    with pytest.raises(FlexFormatError, match=r"not well-formed XML.*truncated"):
        parse_flex(whole[: len(whole) // 2])
    records = []
    with pytest.raises(FlexFormatError):
        records.extend(iter_records(whole[: len(whole) - 30]))  # cut in the closing tags


@pytest.mark.parametrize(
    "document",
    [b"", b"<html><body>Service Unavailable</body></html>", b"not xml at all", b"<Flex"],
)
def test_what_is_not_a_flex_statement_is_said(document):
    with pytest.raises(FlexFormatError):
        parse_flex(document)


def test_an_error_answer_is_an_error_with_its_code():
    document = (
        b"<FlexStatementResponse timestamp='01 January, 2026 08:00 AM EST'>"
        b"<Status>Fail</Status><ErrorCode>1012</ErrorCode>"
        b"<ErrorMessage>Token has expired.</ErrorMessage></FlexStatementResponse>"
    )
    with pytest.raises(FlexAuthError, match="generate a new one in Client Portal") as raised:
        parse_flex(document)
    assert raised.value.flex_code == 1012
    assert isinstance(raised.value, FlexError)


def test_a_generated_statement_reads_back_exactly():
    xml = generate_statement(positions=12, trades=300, cash_transactions=20)
    [result] = parse_flex(xml.encode()).statements
    assert (len(result.positions), len(result.trades), len(result.cash_transactions)) == (
        12,
        300,
        20,
    )
    assert result.base_currency == "USD"
    assert all(isinstance(t, Trade) and t.transaction_id for t in result.trades)
    assert all(t.problems == () for t in result.trades)
    assert {t.buy_sell for t in result.trades} == {"BUY", "SELL"}
    assert all((t.quantity < 0) == (t.buy_sell == "SELL") for t in result.trades)


def test_a_50_mb_statement_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.xml"
    size = write_statement(path, positions=2000, trades=52_000, cash_transactions=5000)
    assert size > 45_000_000
    counts = {"trades": 0, "other": 0}
    tracemalloc.start()
    try:
        for record in iter_records(str(path)):
            counts["trades" if isinstance(record, Trade) else "other"] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts["trades"] == 52_000
    # Measured: about 0.6 MB for the 50 MB file.
    assert peak < size / 25, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB statement"


def test_rows_raw_attributes_are_what_elementtree_reads():
    """The rows are read from expat's attributes, not from ElementTree's elements: the
    same names (a namespaced one as `{uri}name`), values (references resolved) and order."""
    row_xml = trade(symbol="A&amp;B&#x41;&lt;&quot; x", notes="P;&#10;Ca")
    row_xml = row_xml.replace("<Trade ", '<Trade xmlns:q="urn:q" q:extra="1" xml:lang="en" ')
    xml = statement(f"<Trades>{row_xml}</Trades>")
    [row] = [r for r in iter_records(xml.encode()) if isinstance(r, Trade)]
    element = PlainXml.fromstring(xml).find(".//Trade")
    assert list(row.raw.items()) == list(element.attrib.items())
    assert row.raw["{urn:q}extra"] == "1" and row.contract.symbol == 'A&BA<" x'


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        (
            b"<ErrorCode> 10<!-- c -->19 </ErrorCode>"
            b"<ErrorMessage>a &amp; <![CDATA[<b>]]></ErrorMessage>",
            1019,
            "a & <b>",
        ),
        (
            b"<ErrorCode>1020<i>x</i>9</ErrorCode><ErrorMessage>m&#233;<?pi x?>!</ErrorMessage>",
            1020,
            "mé!",
        ),
    ],
)
def test_an_error_answers_fields_are_their_text_as_elementtree_reads_it(fields, code, message):
    document = (
        b"<FlexStatementResponse><Status>Fail</Status>" + fields + b"</FlexStatementResponse>"
    )
    root = PlainXml.fromstring(document)
    assert int(root.find("ErrorCode").text.strip()) == code
    with pytest.raises(FlexError) as raised:
        parse_flex(document)
    assert raised.value.flex_code == code
    assert message in str(raised.value)


@pytest.mark.parametrize("encoding", ["shift_jis", "big5", "utf-32", "no-such-encoding"])
def test_an_encoding_the_parser_cannot_read_is_refused_as_a_format_error(encoding):
    """expat reads UTF-8, UTF-16 and single-byte encodings; another one declared (a
    multi-byte one, or one not known) is refused by the parser itself, which raised a bare
    ValueError or LookupError: the sync failed as an internal error, with a traceback."""
    document = f'<?xml version="1.0" encoding="{encoding}"?>'.encode() + _STATEMENT_OF_NOTHING
    records = []
    with pytest.raises(FlexFormatError, match=r"refused: its encoding cannot be read"):
        records.extend(iter_records(document))
    assert records == []


@pytest.mark.parametrize("encoding", ["iso-8859-1", "windows-1252", "utf-16"])
def test_an_encoding_the_parser_reads_is_read(encoding):
    declared = f'<?xml version="1.0" encoding="{encoding}"?>'
    document = (declared + _STATEMENT_OF_NOTHING.decode()).encode(encoding)
    assert parse_flex(document).query_name == "Q"


def test_a_value_error_of_a_rule_is_not_taken_for_an_encoding(monkeypatch):
    """Only expat's own refusal is the encoding's: an error raised while a row is read
    stays what it is."""
    from ibkr_sync.sources.flex import parser

    def broken(self, tag, attrs):
        raise ValueError("a rule's own fault")

    monkeypatch.setattr(parser._Reader, "_start", broken)
    with pytest.raises(ValueError, match="a rule's own fault"):
        parse_flex(_STATEMENT_OF_NOTHING)
