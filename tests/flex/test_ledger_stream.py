"""The ledger of a Flex statement handed on in batches (`Snapshot.ledger`, a
`LedgerStream`), mapped and written batch by batch inside the sync's transaction, against
the whole ledger in memory (`parse_flex`, `snapshot_of`, `keyed`, `link_withholding`):
the same rows, the same counts, the same keys and links, over real HTTP (the fake Flex
Web Service) into the database (SQLite, or PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import tracemalloc

import pytest

from ibkr_sync import conf, writer
from ibkr_sync.models import AccountReport, Connection, PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.snapshot import LedgerBatch
from ibkr_sync.sources.flex import source as flex_source
from ibkr_sync.sources.flex.parser import parse_flex
from ibkr_sync.sources.flex.source import snapshot_of, statement_digest
from ibkr_sync.testing.flex_service import generate_statement

from .statements import _row
from .test_flex_connection import QUERY, FastFlexSource, flex_connection, service  # noqa: F401

pytestmark = pytest.mark.django_db

TO = dt.date(2026, 3, 13)
STOCK = {"assetCategory": "STK", "symbol": "SAP", "conid": "14204", "currency": "EUR"}
OTHER = {"assetCategory": "STK", "symbol": "ASML", "conid": "117902840", "currency": "EUR"}


class WholeFlexSource(FastFlexSource):
    """The Flex source as it read before the ledger was streamed: the whole statement
    parsed into one response, every ledger record in the snapshot (`snapshot_of`)."""

    tells_repeats = False

    def fetch_positions(self, account_id=None, *, period=None, after=None, applied=None):
        period = period or self.period(after)
        with self.client().download(self.config.query_id, *period) as download:
            digest = statement_digest(download.body)
            download.body.seek(0)
            response = parse_flex(download.body, period=period)
        snapshot = snapshot_of(response, account_id, period=period)
        assert snapshot.ledger is None and snapshot.trades  # the whole ledger in memory
        return dataclasses.replace(snapshot, statement_digest=digest)


def trade(account: str, day: str, ident: str | None, quantity: str = "10", **extra) -> str:
    attributes = dict(
        accountId=account,
        tradeDate=day,
        dateTime=f"{day};101500",
        buySell="BUY",
        quantity=quantity,
        tradePrice="150",
        proceeds="-1500",
        ibCommission="-1",
        levelOfDetail="EXECUTION",
        **STOCK,
    )
    if ident is not None:
        attributes["transactionID"] = ident
    return _row("Trade", **{**attributes, **extra})


def cash(account: str, day: str, ident: str | None, kind: str, amount: str, action: str) -> str:
    attributes = dict(
        accountId=account,
        type=kind,
        dateTime=f"{day};202000",
        amount=amount,
        actionID=action,
        levelOfDetail="DETAIL",
        **STOCK,
    )
    if ident is not None:
        attributes["transactionID"] = ident
    return _row("CashTransaction", **attributes)


def statement(account: str, first: dt.date, last: dt.date, trades, cash_rows, actions=()) -> str:
    day = f"{last:%Y%m%d}"
    return "\n".join(
        [
            f'<FlexStatement accountId="{account}" fromDate="{first:%Y%m%d}" '
            f'toDate="{day}" period="" whenGenerated="{day};073012">',
            _row("AccountInformation", accountId=account, currency="EUR"),
            "<OpenPositions>",
            _row(
                "OpenPosition",
                accountId=account,
                position="20",
                markPrice="180",
                positionValue="3600",
                levelOfDetail="SUMMARY",
                **STOCK,
            ),
            "</OpenPositions>",
            "<Trades>",
            *trades,
            "</Trades>",
            "<CashTransactions>",
            *cash_rows,
            "</CashTransactions>",
            "<CorporateActions>",
            *actions,
            "</CorporateActions>",
            "</FlexStatement>",
        ]
    )


def response(*statements: str) -> str:
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<FlexQueryResponse queryName="Ledger" type="AF"><FlexStatements '
            f'count="{len(statements)}">',
            *statements,
            "</FlexStatements></FlexQueryResponse>",
        ]
    )


def hard_statement(amount: str = "44") -> str:
    """What the keys and links of a whole ledger depend on, spread over many batches:
    two accounts; an older statement of the first account overlapping the newer (rows
    sent twice, one corrected since); rows without an id in both (keyed on their
    attributes, two identical fills); ids redacted to one word; taxes before their
    dividend, a dividend without an id, an action with two dividends (its tax unlinked);
    a row its column cannot hold (an error of its account)."""
    a, b = "U1111111", "U2222222"
    day, older = f"{TO:%Y%m%d}", f"{TO - dt.timedelta(days=1):%Y%m%d}"
    plain = [trade(a, day, str(100 + n), quantity=str(n + 1)) for n in range(12)]
    newer = statement(
        a,
        TO - dt.timedelta(days=1),
        TO,
        [
            *plain,
            trade(a, day, None),
            trade(a, day, None),  # an identical fill: kept apart (.2)
            trade(a, day, "REDACTED", quantity="3"),
            trade(a, day, "REDACTED", quantity="4"),
            trade(a, day, "500", quantity="1" + "0" * 40),  # cannot be stored
            trade(a, day, "501", ibOrderID="77"),
        ],
        [
            cash(a, day, "9011", "Withholding Tax", "-6.60", "555"),
            cash(a, day, "9010", "Dividends", amount, "555"),
            cash(a, day, "9021", "Withholding Tax", "-3", "556"),
            cash(a, day, None, "Dividends", "20", "556"),
            cash(a, day, "9031", "Withholding Tax", "-1", "557"),
            cash(a, day, "9032", "Dividends", "5", "557"),
            cash(a, day, "9033", "Payment In Lieu Of Dividends", "5", "557"),
            cash(a, day, "9041", "Withholding Tax", "-2", "558"),
            cash(a, day, "9051", "Withholding Tax", "-2", "560"),
            cash(a, day, "9050", "Dividends", "12", "560"),
        ],
        [
            _row(
                "CorporateAction",
                accountId=a,
                transactionID="9100",
                actionID="600",
                type="FS",
                reportDate=day,
                dateTime=f"{day};200000",
                quantity="20",
                amount="0",
                actionDescription="SAP SPLIT 2 FOR 1",
                levelOfDetail="DETAIL",
                **STOCK,
            )
        ],
    )
    old = statement(
        a,
        TO - dt.timedelta(days=3),
        TO - dt.timedelta(days=1),
        [
            trade(a, older, "100", quantity="1"),
            trade(a, older, "101", quantity="99"),  # corrected in the newer statement
            trade(a, older, None, quantity="8"),
            trade(a, day, None),  # the newer statement's fill without an id, sent twice
        ],
        [cash(a, older, "9050", "Dividends", "11", "560")],  # sent twice, corrected
    )
    other = statement(
        b,
        TO - dt.timedelta(days=1),
        TO,
        [trade(b, day, str(200 + n), **OTHER) for n in range(7)],
        [cash(b, day, "9042", "Dividends", "9", "558")],
    )
    return response(old, newer, other)


def plain_statement(amount: str = "44") -> str:
    """A statement of ordinary ids only: nothing held to the stream's end."""
    a = "U1111111"
    day = f"{TO:%Y%m%d}"
    return response(
        statement(
            a,
            TO - dt.timedelta(days=6),
            TO,
            [trade(a, day, str(100 + n), quantity=str(n + 1)) for n in range(23)],
            [
                cash(a, day, "9010", "Dividends", amount, "555"),
                cash(a, day, "9011", "Withholding Tax", "-6.60", "555"),
            ],
        )
    )


def clear() -> None:
    """Everything a sync writes, gone: the next sync is a first import again."""
    for model in (
        PositionChange,
        *conf.ledger_models().values(),
        conf.position_model(),
        conf.cash_balance_model(),
        conf.account_snapshot_model(),
        AccountReport,
        SyncRun,
        conf.instrument_model(),
        conf.account_model(),
    ):
        model._default_manager.all().delete()


def stored() -> dict:
    """Every ledger row as stored, by kind and key: its account, instrument and columns."""
    rows = {}
    for kind, model in conf.ledger_models().items():
        fields = [f.attname for f in model._meta.concrete_fields]
        names = [
            n
            for n in fields
            if n not in ("id", "account_id", "instrument_id", "created_at", "updated_at")
            and not n.startswith("sync_run")
        ]
        rows[kind] = {
            row["external_id"]: row
            for row in model._default_manager.values(
                "account__external_id", "instrument__external_id", *names
            )
        }
    return rows


def run(settings, source: str, texts: list[str]) -> list:
    """Each statement synced in turn by `source`; what each sync said and left."""
    settings.IBKR_SYNC_FLEX_SOURCE_CLASS = source
    seen = []
    for _ in texts:
        result = sync_positions(trigger="command", connection="myflex")
        record = SyncRun.objects.get(pk=result.sync_run_id).statement
        seen.append(
            {
                "ledger": result.ledger,
                "errors": result.errors,
                "by_account": result.by_account,
                "refused": result.accounts_refused,
                "ranges": record["ranges"],
                "ledger rows": {
                    account: {t: c[0] for t, c in tables.items() if t in result.ledger}
                    for account, tables in record["counts"].items()
                },
                "rows": stored(),
            }
        )
    return seen


@pytest.mark.parametrize("make", [hard_statement, plain_statement])
def test_the_streamed_ledger_is_written_as_the_whole_one(service, settings, monkeypatch, make):  # noqa: F811
    monkeypatch.setattr(flex_source, "LEDGER_BATCH", 4)  # many batches
    flex_connection()
    texts = iter([make(), make(amount="45")])
    service.add_statement(QUERY, lambda fd, td: next(texts))
    streamed = run(settings, "tests.flex.test_flex_connection.FastFlexSource", [1, 2])
    clear()
    texts = iter([make(), make(amount="45")])
    whole = run(settings, f"{__name__}.WholeFlexSource", [1, 2])

    assert streamed == whole
    first = streamed[0]
    assert first["ledger"]["trades"]["created"] > 0
    if make is hard_statement:
        # The keys and links of the whole ledger, as `keyed` and `link_withholding` say.
        taxes = first["rows"]["cash_transactions"]
        assert taxes["9011"]["dividend_external_id"] == "9010"
        assert taxes["9021"]["dividend_external_id"].startswith("~")  # its dividend: no id
        assert taxes["9031"]["dividend_external_id"] == ""  # two incomes of one action
        assert taxes["9041"]["dividend_external_id"] == ""  # another account's dividend
        assert taxes["9050"]["amount"] == 12  # the newer statement's
        trades = first["rows"]["trades"]
        assert trades["101"]["quantity"] == 2  # the newer statement's, read last
        derived = sorted(k for k in trades if k.startswith("~"))
        assert len(derived) == 5 and sum(k.endswith(".2") for k in derived) == 1
        assert "500" not in trades and any("(500)" in e["reason"] for e in first["errors"])
    assert streamed[1]["ledger"]["cash_transactions"]["updated"] == 1  # the correction


def test_a_failure_mid_ledger_writes_nothing(service, settings, monkeypatch):  # noqa: F811
    monkeypatch.setattr(flex_source, "LEDGER_BATCH", 4)
    flex_connection()
    service.add_statement(QUERY, lambda fd, td: plain_statement())
    calls = []
    write_batch = writer._apply_ledger_batch

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two batches of rows written already
            raise RuntimeError("the database went away")
        return write_batch(*args, **kwargs)

    monkeypatch.setattr(writer, "_apply_ledger_batch", failing)

    with pytest.raises(RuntimeError):
        sync_positions(trigger="command", connection="myflex")

    assert len(calls) == 3
    for model in (*conf.ledger_models().values(), conf.position_model(), AccountReport):
        assert not model._default_manager.exists()
    assert SyncRun.objects.get().status == SyncRun.Status.FAILED


def test_the_snapshot_holds_no_ledger_record_and_a_batch_a_bounded_few(service, monkeypatch):  # noqa: F811
    """The snapshot a sync gets holds none of the ledger's records; its batches hold
    LEDGER_BATCH records at most, and reading them holds about one batch: far less
    memory than the whole ledger parsed."""
    monkeypatch.setattr(flex_source, "LEDGER_BATCH", 250)
    text = generate_statement(trades=6000, cash_transactions=1500, to_date=TO)
    service.add_statement(QUERY, lambda fd, td: text)
    row = flex_connection()
    config = conf.FlexConfig.from_settings(row)
    source = FastFlexSource(config, today=lambda: TO + dt.timedelta(days=1))

    tracemalloc.start()
    try:
        snapshot = source.fetch_positions(period=(TO - dt.timedelta(days=364), TO))
        assert (snapshot.trades, snapshot.cash_transactions) == ((), ())
        sizes = []
        for batch in snapshot.ledger.batches():
            assert isinstance(batch, LedgerBatch)
            sizes.append(len(batch))
            del batch
        streamed = tracemalloc.get_traced_memory()[1]
        snapshot.ledger.close()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        whole = parse_flex(io.BytesIO(text.encode()))
        parsed = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert sum(sizes) == 7500 and max(sizes) <= 250
    assert sum(len(s.trades) + len(s.cash_transactions) for s in whole.statements) == 7500
    assert streamed < parsed / 3, (streamed, parsed)


def test_a_stream_is_read_again_for_a_second_write(service, settings):  # noqa: F811
    """A write that is retried (another sync wrote positions meanwhile) reads the
    stream's batches again: the same rows."""
    flex_connection()
    service.add_statement(QUERY, lambda fd, td: plain_statement())
    config = conf.FlexConfig.from_settings(Connection.objects.get())
    source = FastFlexSource(config, today=lambda: TO + dt.timedelta(days=1))
    snapshot = source.fetch_positions()
    try:
        first = [[t.transaction_id for t in b.trades] for b in snapshot.ledger.batches()]
        again = [[t.transaction_id for t in b.trades] for b in snapshot.ledger.batches()]
    finally:
        snapshot.ledger.close()
    assert first == again and sum(map(len, first)) == 23


def test_a_write_done_again_reads_the_stream_again(service, settings, monkeypatch):  # noqa: F811
    """A write stopped by another sync's change of positions (`PositionsChanged`) is
    done again from a new mapping: the stream's batches read again, every row written
    once, counted once."""
    from ibkr_sync import services

    monkeypatch.setattr(flex_source, "LEDGER_BATCH", 4)
    flex_connection()
    service.add_statement(QUERY, lambda fd, td: plain_statement())
    apply = services.apply_snapshot
    calls = []

    def stopped_once(mapped, *args, **kwargs):
        calls.append(1)
        written = apply(mapped, *args, **kwargs)  # the ledger read and written ...
        if len(calls) == 1:
            raise writer.PositionsChanged(["U1111111"])  # ... then rolled back
        return written

    monkeypatch.setattr(services, "apply_snapshot", stopped_once)

    result = sync_positions(trigger="command", connection="myflex")

    assert len(calls) == 2
    assert result.ledger["trades"] == {"created": 23, "updated": 0, "unchanged": 0}
    assert result.ledger["cash_transactions"] == {"created": 2, "updated": 0, "unchanged": 0}
    trades = conf.ledger_models()["trades"]._default_manager
    assert sorted(trades.values_list("external_id", flat=True)) == [str(100 + n) for n in range(23)]
