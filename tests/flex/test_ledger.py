"""The ledger of a Flex connection (trades, cash transactions, corporate actions) synced
through the whole pipeline: the real client over real HTTP against the fake Flex Web
Service, the source, mapping and the writer, into the database (SQLite, or PostgreSQL
with DATABASE_URL). Real statements other projects published, and statements of our
own in the real format (IBKR's Flex Query reference)."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ibkr_sync import conf
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.services import sync_positions
from tests.conftest import FakeGateway, position

from .statements import _row
from .test_flex_connection import QUERY, flex_connection, period_end, service  # noqa: F401

pytestmark = pytest.mark.django_db

DATA = Path(__file__).parent.parent / "data" / "flex"
REAL = {
    "opensteuerauszug": DATA / "opensteuerauszug" / "options_future_2025.xml",
    "pp02": DATA / "portfolio-performance" / "testIBFlexStatementFile02.xml",
    "pp18": DATA / "portfolio-performance" / "testIBFlexStatementFile18.xml",
    "pp25": DATA / "portfolio-performance" / "testIBFlexStatementFile25.xml",
    "pp29": DATA / "portfolio-performance" / "testIBFlexStatementFile29.xml",
}


def Trade():
    return conf.ledger_model("IBKR_SYNC_TRADE_MODEL")


def CashTransaction():
    return conf.ledger_model("IBKR_SYNC_CASH_TRANSACTION_MODEL")


def CorporateAction():
    return conf.ledger_model("IBKR_SYNC_CORPORATE_ACTION_MODEL")


def with_open_positions(text: str) -> str:
    """A statement of a query without the Open Positions section, with an empty one: the
    sync refuses a statement without it (it would close every position)."""
    return re.sub(r"(<FlexStatement [^>]*>)", r"\1<OpenPositions />", text)


def counted(path: Path) -> dict[str, int]:
    """The rows a statement holds at the transaction's level, counted independently of
    the parser: executions (Trade rows of levelOfDetail EXECUTION, or none), cash
    transactions of levelOfDetail DETAIL (or none), never the BASE_SUMMARY totals."""
    root = ET.parse(path).getroot()

    def rows(tag: str, level: str) -> int:
        return sum(
            1
            for row in root.iter(tag)
            if row.get("levelOfDetail", "").upper() in ("", level)
            and row.get("currency") != "BASE_SUMMARY"
        )

    return {
        "trades": rows("Trade", "EXECUTION"),
        "cash_transactions": rows("CashTransaction", "DETAIL"),
        "corporate_actions": rows("CorporateAction", "DETAIL"),
    }


# --- real statements ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_transaction_of_a_real_statement_is_stored_once(service, name):  # noqa: F811
    path = REAL[name]
    text = path.read_text(encoding="utf-8")
    if "<OpenPositions" not in text:
        text = with_open_positions(text)
    service.add_statement(QUERY, text)
    flex_connection()
    expected = counted(path)

    result = sync_positions(trigger="command", connection="myflex")

    assert not [e for e in result.errors if "not stored" in e["reason"]]
    counts = {
        kind: model.objects.count()
        for kind, model in (
            ("trades", Trade()),
            ("cash_transactions", CashTransaction()),
            ("corporate_actions", CorporateAction()),
        )
    }
    assert counts == expected, result.errors
    for kind, model in (
        ("trades", Trade()),
        ("cash_transactions", CashTransaction()),
        ("corporate_actions", CorporateAction()),
    ):
        assert model.objects.count() == expected[kind], kind
        assert result.ledger[kind] == {"created": expected[kind], "updated": 0, "unchanged": 0}
    assert SyncRun.objects.get(pk=result.sync_run_id).ledger == result.ledger

    # The same statement again: nothing written, every row unchanged.
    with CaptureQueriesContext(connection) as queries:
        again = sync_positions(trigger="command", connection="myflex")
    for kind in ("trades", "cash_transactions", "corporate_actions"):
        assert again.ledger[kind] == {"created": 0, "updated": 0, "unchanged": expected[kind]}
        assert not [
            q
            for q in queries.captured_queries
            if re.match(r"\s*(INSERT|UPDATE)", q["sql"])
            and f"portfolio_{kind.replace('_', '')[:-1]}" in q["sql"].replace('"', "")
        ], kind


def test_the_real_statement_s_trades_and_income(service):  # noqa: F811
    service.add_statement(QUERY, REAL["opensteuerauszug"])
    flex_connection()

    sync_positions(trigger="command", connection="myflex")

    trades = Trade().objects.filter(account__external_id="U0000000")
    assert set(trades.values_list("instrument__sec_type", flat=True)) == {
        "STK",
        "OPT",
        "FUT",
        "FOP",
    }
    fhzn = trades.get(instrument__symbol="FHZN", trade_date=dt.date(2025, 1, 10))
    assert (fhzn.buy_sell, fhzn.quantity, fhzn.price, fhzn.commission) == (
        "BUY",
        Decimal("10"),
        Decimal("215"),
        Decimal("-2.09"),
    )
    assert (fhzn.currency, fhzn.commission_currency, fhzn.settle_date) == (
        "CHF",
        "CHF",
        dt.date(2025, 1, 14),
    )
    assert fhzn.raw["isin"] == "CH0319416936" and fhzn.raw["closePrice"] == "217"
    # A sale keeps IBKR's negative quantity.
    assert trades.filter(buy_sell="SELL").exists()
    assert not trades.filter(buy_sell="SELL", quantity__gt=0).exists()
    # Withholding tax linked to its dividend (the same action id and contract).
    cash = CashTransaction().objects.all()
    tax = cash.get(kind="withholding_tax", amount=Decimal("-15.05"))
    dividend = cash.get(external_id=tax.dividend_external_id)
    assert dividend.kind == "dividend" and dividend.instrument == tax.instrument
    assert dividend.raw["actionID"] == tax.raw["actionID"] == "152358998"
    # A reversed tax keeps IBKR's positive sign.
    assert cash.filter(kind="withholding_tax", amount=Decimal("5.1")).exists()
    assert cash.filter(kind="fee").count() == 4


def test_fx_trades_and_deposits_of_a_real_statement(service):  # noqa: F811
    service.add_statement(QUERY, with_open_positions(REAL["pp18"].read_text()))
    flex_connection()

    sync_positions(trigger="command", connection="myflex")

    fx = Trade().objects.filter(instrument__sec_type="CASH")
    assert fx.count() == 4
    assert all(t.instrument.symbol.count(".") == 1 for t in fx)  # EUR.USD and the like
    kinds = set(CashTransaction().objects.values_list("kind", flat=True))
    assert {"deposit", "dividend", "withholding_tax"} <= kinds
    # Every id is IBKR's own here (the query has Transaction ID).
    assert not Trade().objects.filter(external_id__startswith="~").exists()


# --- statements of our own: corrections, cancellations, reversals ------------------------

ACCOUNT = "U7654321"


def ledger_statement(
    *,
    to_date: dt.date = dt.date(2026, 3, 13),
    tax: str = "-15.05",
    cancelled: bool = False,
    refund: bool = False,
    split: bool = True,
    trade: bool = True,
) -> str:
    """One account with one open position, a purchase (maybe cancelled), a dividend, the
    tax withheld from it (and maybe its refund) and a split."""
    day = f"{to_date:%Y%m%d}"
    stock = {
        "assetCategory": "STK",
        "symbol": "SAP",
        "conid": "14204",
        "currency": "EUR",
        "multiplier": "1",
        "listingExchange": "IBIS",
    }
    rows = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<FlexQueryResponse queryName="Ledger" type="AF"><FlexStatements count="1">',
        f'<FlexStatement accountId="{ACCOUNT}" fromDate="{day}" toDate="{day}" period="" '
        f'whenGenerated="{day};073012">',
        _row("AccountInformation", accountId=ACCOUNT, currency="EUR"),
        "<OpenPositions>",
        _row(
            "OpenPosition",
            accountId=ACCOUNT,
            position="20",
            markPrice="180",
            positionValue="3600",
            costBasisPrice="150",
            reportDate=day,
            levelOfDetail="SUMMARY",
            **stock,
        ),
        "</OpenPositions>",
        "<Trades>",
        _row(
            "Trade",
            accountId=ACCOUNT,
            transactionID="9000001",
            tradeID="700001",
            tradeDate=day,
            dateTime=f"{day};101500",
            settleDateTarget=day,
            buySell="BUY (Ca.)" if cancelled else "BUY",
            quantity="20",
            tradePrice="150",
            proceeds="-3000",
            ibCommission="-1.25",
            ibCommissionCurrency="EUR",
            fifoPnlRealized="0",
            fxRateToBase="1",
            notes="Ca" if cancelled else "O",
            levelOfDetail="EXECUTION",
            **stock,
        ),
        _row(
            "Trade",
            accountId=ACCOUNT,
            buySell="BUY",
            quantity="20",
            levelOfDetail="ORDER",
            transactionID="",
            **stock,
        ),
        "</Trades>",
        "<CashTransactions>",
        _row(
            "CashTransaction",
            accountId=ACCOUNT,
            transactionID="9000010",
            actionID="555",
            type="Dividends",
            dateTime=f"{day};202000",
            amount="44",
            description="SAP(DE0007164600) CASH DIVIDEND EUR 2.20 PER SHARE",
            levelOfDetail="DETAIL",
            fxRateToBase="1",
            **stock,
        ),
        _row(
            "CashTransaction",
            accountId=ACCOUNT,
            transactionID="9000011",
            actionID="555",
            type="Withholding Tax",
            dateTime=f"{day};202000",
            amount=tax,
            description="SAP(DE0007164600) CASH DIVIDEND EUR 2.20 PER SHARE - DE TAX",
            levelOfDetail="DETAIL",
            fxRateToBase="1",
            **stock,
        ),
    ]
    if refund:
        rows.append(
            _row(
                "CashTransaction",
                accountId=ACCOUNT,
                transactionID="9000012",
                actionID="555",
                type="Withholding Tax",
                dateTime=f"{day};202000",
                amount="15.05",
                description="SAP(DE0007164600) CASH DIVIDEND - DE TAX (reversal)",
                levelOfDetail="DETAIL",
                fxRateToBase="1",
                **stock,
            )
        )
    rows.append(
        _row(
            "CashTransaction",
            accountId=ACCOUNT,
            type="Dividends",
            amount="44",
            currency="BASE_SUMMARY",
            levelOfDetail="SUMMARY",
        )
    )
    rows.append("</CashTransactions>")
    if split:
        rows += [
            "<CorporateActions>",
            _row(
                "CorporateAction",
                accountId=ACCOUNT,
                transactionID="9000020",
                actionID="556",
                type="FS",
                reportDate=day,
                dateTime=f"{day};200000",
                quantity="20",
                amount="0",
                actionDescription="SAP(DE0007164600) SPLIT 2 FOR 1",
                levelOfDetail="DETAIL",
                **stock,
            ),
            "</CorporateActions>",
        ]
    if not trade:
        rows = [row for row in rows if not row.startswith("<Trade ")]
    rows += ["</FlexStatement>", "</FlexStatements></FlexQueryResponse>"]
    return "\n".join(rows)


def sync(service, **statement):  # noqa: F811
    service.add_statement(QUERY, lambda fd, td: ledger_statement(**statement))
    return sync_positions(trigger="command", connection="myflex")


def test_our_statement_is_stored_with_its_keys_and_links(service):  # noqa: F811
    flex_connection()

    result = sync(service)

    assert result.ledger == {
        "trades": {"created": 1, "updated": 0, "unchanged": 0},
        "cash_transactions": {"created": 2, "updated": 0, "unchanged": 0},
        "corporate_actions": {"created": 1, "updated": 0, "unchanged": 0},
    }
    trade = Trade().objects.get()
    assert (trade.external_id, trade.quantity, trade.proceeds, trade.cancelled) == (
        "9000001",
        Decimal("20"),
        Decimal("-3000"),
        False,
    )
    assert trade.instrument == conf.instrument_model().objects.get(external_id="14204")
    assert trade.account.external_id == ACCOUNT
    tax = CashTransaction().objects.get(kind="withholding_tax")
    assert (tax.amount, tax.dividend_external_id) == (Decimal("-15.05"), "9000010")
    split = CorporateAction().objects.get()
    assert (split.external_id, split.type, split.quantity, split.action_id) == (
        "9000020",
        "FS",
        Decimal("20"),
        "556",
    )
    assert split.description == "SAP(DE0007164600) SPLIT 2 FOR 1"


def test_a_correction_updates_the_row_and_is_counted(service):  # noqa: F811
    flex_connection()
    sync(service)
    tax = CashTransaction().objects.get(external_id="9000011")

    result = sync(service, tax="-6.60")

    assert result.ledger["cash_transactions"] == {"created": 0, "updated": 1, "unchanged": 1}
    assert result.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 1}
    corrected = CashTransaction().objects.get(external_id="9000011")
    assert (corrected.pk, corrected.amount) == (tax.pk, Decimal("-6.60"))
    assert corrected.raw["amount"] == "-6.60"
    assert corrected.updated_at > tax.updated_at
    assert SyncRun.objects.get(pk=result.sync_run_id).ledger["cash_transactions"]["updated"] == 1


def test_a_cancelled_trade_is_marked_never_deleted(service):  # noqa: F811
    flex_connection()
    sync(service)

    result = sync(service, cancelled=True)

    assert result.ledger["trades"] == {"created": 0, "updated": 1, "unchanged": 0}
    trade = Trade().objects.get()
    assert trade.cancelled and trade.external_id == "9000001"
    # A statement without the trade (another period) deletes nothing.
    sync(service, to_date=dt.date(2026, 3, 14), split=False, trade=False)
    assert Trade().objects.filter(cancelled=True).count() == 1
    assert CorporateAction().objects.count() == 1


def test_a_reversal_keeps_its_sign_and_its_dividend(service):  # noqa: F811
    flex_connection()

    sync(service, refund=True)

    taxes = CashTransaction().objects.filter(kind="withholding_tax").order_by("external_id")
    assert [(t.external_id, t.amount) for t in taxes] == [
        ("9000011", Decimal("-15.05")),
        ("9000012", Decimal("15.05")),
    ]
    # Two taxes of one action: each tied to the action's one dividend.
    assert {t.dividend_external_id for t in taxes} == {"9000010"}


def test_the_ledger_of_an_account_refused_is_written_its_state_is_not(service, settings):  # noqa: F811
    """A statement older than what a gateway read of the account since is refused for
    that account's state (positions, cash, values); its ledger, IBKR's transactions keyed
    on their ids, is written all the same: it overwrites nothing newer."""
    Connection.objects.create(name="gateway", host="127.0.0.1", port=4002, client_id=3)
    flex_connection()
    gateway = FakeGateway(
        positions=[position(account=ACCOUNT, con_id=14204, symbol="SAP")], accounts=(ACCOUNT,)
    )
    sync_positions(trigger="command", connection="gateway", gateway=gateway)

    result = sync(service)

    assert ACCOUNT in result.accounts_refused
    assert result.ledger == {
        "trades": {"created": 1, "updated": 0, "unchanged": 0},
        "cash_transactions": {"created": 2, "updated": 0, "unchanged": 0},
        "corporate_actions": {"created": 1, "updated": 0, "unchanged": 0},
    }
    assert Trade().objects.count() == 1 and CashTransaction().objects.count() == 2
    assert AccountReport.objects.get(external_id=ACCOUNT).connection_name == "gateway"
    [held] = conf.position_model().objects.filter(account__external_id=ACCOUNT)
    assert held.instrument.symbol == "SAP"  # the gateway's, newer: not closed, not replaced


def test_a_dry_run_counts_the_ledger_and_writes_none_of_it(service):  # noqa: F811
    flex_connection()
    service.add_statement(QUERY, lambda fd, td: ledger_statement())

    result = sync_positions(trigger="command", connection="myflex", dry_run=True)

    assert result.ledger["trades"]["created"] == 1
    assert not Trade().objects.exists()


def test_a_row_without_an_id_is_keyed_on_its_attributes(service):  # noqa: F811
    """A query without the Transaction ID column: each row keyed on its own attributes,
    two identical fills kept apart, and the statement again writes nothing."""
    flex_connection()
    text = ledger_statement().replace('transactionID="9000001" ', "")
    fill = re.search(r"<Trade [^>]*EXECUTION[^>]*/>", text).group(0)
    text = text.replace(fill, fill + "\n" + fill)
    service.add_statement(QUERY, text)

    first = sync_positions(trigger="command", connection="myflex")
    again = sync_positions(trigger="command", connection="myflex")

    keys = sorted(Trade().objects.values_list("external_id", flat=True))
    assert len(keys) == 2 and keys[0].startswith("~") and keys[1] == keys[0] + ".2"
    assert first.ledger["trades"]["created"] == 2
    assert again.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 2}


def test_a_tws_sync_has_no_ledger(settings):
    gateway = FakeGateway([position(account="U1111111", con_id=1, symbol="A")])

    result = sync_positions(trigger="command", gateway=gateway)

    assert result.ledger == {}
    assert SyncRun.objects.get(pk=result.sync_run_id).ledger == {}


def test_without_ledger_models_the_ledger_is_skipped(service, settings):  # noqa: F811
    settings.IBKR_SYNC_TRADE_MODEL = None
    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None
    settings.IBKR_SYNC_CORPORATE_ACTION_MODEL = None
    flex_connection()

    result = sync(service)

    assert result.created == 1 and result.ledger == {}
    from portfolio.models import Trade as PortfolioTrade

    assert not PortfolioTrade.objects.exists()


def test_the_command_and_the_api_report_the_ledger(service, admin_client):  # noqa: F811
    import io

    from django.core.management import call_command
    from django.urls import reverse

    flex_connection()
    service.add_statement(QUERY, lambda fd, td: ledger_statement())
    out = io.StringIO()

    call_command("sync_ibkr", "--connection", "myflex", stdout=out)

    assert (
        "Ledger: trades 1 created, 0 updated, 0 unchanged; cash transactions 2 created, "
        "0 updated, 0 unchanged; corporate actions 1 created, 0 updated, 0 unchanged"
    ) in out.getvalue()
    run = SyncRun.objects.get()
    answer = admin_client.get(reverse("ibkr_sync:sync-run", args=[run.pk])).json()
    assert answer["ledger"]["cash_transactions"] == {"created": 2, "updated": 0, "unchanged": 0}
