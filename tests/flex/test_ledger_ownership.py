"""A Flex statement proves no login: a connection pointed at a fake Flex Web Service
reports whatever account ids and transaction ids it likes. An account another owner
holds gets nothing written by such a statement, its history (ledger rows, account
snapshots) neither, in a full sync as in a back-fill's history-only window, the ledger
streamed or whole; and a ledger row stored under one account is never moved to another
by a statement reporting its id. Alice's and an unowned connection try it on bob's
account and bob's ids. The real client over real HTTP against the fake Flex Web
Service, the source, mapping, the writer and the service, into the database (SQLite, or
PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import datetime as dt
import io
import logging

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db.models import Model
from django.utils.module_loading import import_string
from rest_framework.test import APIClient

from ibkr_sync import conf
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.services import sync_period, sync_positions
from ibkr_sync.sources.flex import source as flex_source
from ibkr_sync.sources.flex.source import yesterday

from .statements import _row, statement_with_values
from .test_flex_connection import flex_connection, service  # noqa: F401
from .test_repeat import parsing_fails

pytestmark = pytest.mark.django_db

ALICE, BOB, SHARED = "U1000001", "U2000002", "U3000003"
#: Bob's trade, cash transaction and corporate action: IBKR's ids.
BOBS = {"trades": "9000001", "cash_transactions": "9100001", "corporate_actions": "9200001"}
QUERIES = {"alice": "111111", "bob": "222222", "shared": "333333"}
NOT_YOURS = "{} was not written: this connection may not write it."
ELSEWHERE = "stored under another account"
END = yesterday()
#: Bob's own statement: a week, its ledger on the first day.
WEEK = (END - dt.timedelta(days=6), END)

SOURCES = {
    "streamed": "tests.flex.test_flex_connection.FastFlexSource",
    "whole": "tests.flex.test_ledger_stream.WholeFlexSource",
}


@pytest.fixture(params=sorted(SOURCES))
def source(request, settings, monkeypatch):
    """Each test with the ledger streamed in batches of two records (many batches), and
    with the whole ledger in memory."""
    settings.IBKR_SYNC_FLEX_SOURCE_CLASS = SOURCES[request.param]
    monkeypatch.setattr(flex_source, "LEDGER_BATCH", 2)
    return request.param


def ledger(account: str, day: dt.date, ids: dict[str, str], *, price: str = "100", mine=0):
    """The ledger sections of `account`'s statement: a trade, a dividend and a split of
    `ids`, and `mine` trades of the account's own (ids 5<n>)."""
    d = f"{day:%Y%m%d}"
    contract = dict(
        assetCategory="STK", symbol="AAPL", conid="265598", currency="USD", listingExchange="NASDAQ"
    )

    def trade(ident: str, quantity: str = "1") -> str:
        return _row(
            "Trade", accountId=account, transactionID=ident, tradeDate=d, dateTime=f"{d};101500",
            settleDateTarget=d, buySell="BUY", quantity=quantity, tradePrice=price,
            proceeds=f"-{price}", ibCommission="-1", ibCommissionCurrency="USD",
            fifoPnlRealized="0", fxRateToBase="1", levelOfDetail="EXECUTION", multiplier="1",
            **contract,
        )  # fmt: skip

    own = [trade(f"5{account[1:]}{n}", str(n + 2)) for n in range(mine)]
    return "\n".join(
        [
            "<Trades>",
            trade(ids["trades"]),
            *own,
            "</Trades>",
            "<CashTransactions>",
            _row(
                "CashTransaction", accountId=account, transactionID=ids["cash_transactions"],
                type="Dividends", dateTime=f"{d};202000", amount=price, actionID="4001",
                levelOfDetail="DETAIL", **contract,
            ),
            "</CashTransactions>",
            "<CorporateActions>",
            _row(
                "CorporateAction", accountId=account, transactionID=ids["corporate_actions"],
                actionID="4002", type="FS", reportDate=d, dateTime=f"{d};200000", quantity="2",
                amount="0", actionDescription=f"AAPL SPLIT {price}", levelOfDetail="DETAIL",
                **contract,
            ),
            "</CorporateActions>",
        ]
    )  # fmt: skip


def statement(fd: dt.date, td: dt.date, account: str, ids=BOBS, **options) -> str:
    """One account's statement of fd..td (positions, cash, each day's values, the
    ledger of `ledger`, dated fd)."""
    text = statement_with_values(fd, td, account=account)
    return text.replace(
        "</FlexStatement>", f"{ledger(account, fd, ids, **options)}\n</FlexStatement>"
    )


def download(*statements: str) -> str:
    """Several statements in one download (a query of several accounts, or overlapping
    periods)."""
    first, *rest = statements
    bodies = "".join(s[s.index("<FlexStatement ") : s.index("</FlexStatements>")] for s in rest)
    return first.replace(
        '<FlexStatements count="1">', f'<FlexStatements count="{len(statements)}">'
    ).replace("</FlexStatements>", f"{bodies}</FlexStatements>")


@pytest.fixture
def owners(service, django_user_model):  # noqa: F811
    """Alice's, bob's and an unowned Flex connection; bob's statement synced: his account
    with his trade, dividend and split."""
    users = {}
    for name in ("alice", "bob"):
        users[name] = django_user_model.objects.create_user(
            name, password=f"pw-{name}-123", is_staff=True
        )
        users[name].user_permissions.add(
            *Permission.objects.filter(codename__in=["run_sync", "view_syncrun", "view_trade"])
        )
    for name, query in QUERIES.items():
        row = flex_connection(name=name, query=query)
        if name in users:
            Connection.objects.filter(pk=row.pk).update(owner=users[name])
    service.add_statement(QUERIES["bob"], lambda fd, td: statement(fd, td, BOB))
    bobs = sync_positions(trigger="command", connection="bob")
    assert bobs.accounts == [BOB] and not bobs.errors
    assert all(bobs.ledger[kind]["created"] == 1 for kind in BOBS)
    assert AccountReport.objects.get(external_id=BOB).owner == users["bob"]
    return users


def written_models() -> list[type[Model]]:
    return [
        conf.position_model(),
        conf.cash_balance_model(),
        conf.account_snapshot_model(),
        *conf.ledger_models().values(),
    ]


def rows_of(account: str) -> dict[str, list[dict]]:
    """Every row of `account`, table by table (its account row and report too), and the
    ledger rows of bob's ids wherever they are."""
    rows = {
        model._meta.label: list(
            model._default_manager.filter(account__external_id=account).order_by("pk").values()
        )
        for model in written_models()
    }
    rows["account"] = list(conf.account_model().objects.filter(external_id=account).values())
    rows["report"] = list(AccountReport.objects.filter(external_id=account).values())
    for kind, model in conf.ledger_models().items():
        rows[f"{kind} of bob's id"] = list(
            model._default_manager.filter(external_id=BOBS[kind]).values()
        )
    return rows


def nothing_written(result) -> bool:
    """What a result counts: nothing written of any row."""
    ledger = all(not any(tally.values()) for tally in result.ledger.values())
    daily = not any(result.snapshots.values())
    return ledger and daily and result.created == result.updated == result.unchanged == 0


def elsewhere(result) -> list[tuple[str, str]]:
    """The result's errors of rows not written because their ids are another account's:
    (account, reason)."""
    return [(e["account"], e["reason"]) for e in result.errors if ELSEWHERE in e["reason"]]


def said_of_bob(result) -> str:
    return str(result) + str(SyncRun.objects.get(pk=result.sync_run_id).error_details)


# --- an account another owner holds -------------------------------------------------------


@pytest.mark.parametrize("connection", ["alice", "shared"])
def test_another_owners_account_gets_no_state_and_no_history(owners, service, source, connection):  # noqa: F811
    """Alice's connection (or an unowned one) reports bob's account, with bob's ids and
    other figures, next to an account of its own: bob's account is refused in the
    neutral words, and not one of its rows changes; none is counted; the connection's
    own account is written."""
    own = ALICE if connection == "alice" else SHARED
    service.add_statement(
        QUERIES[connection],
        lambda fd, td: download(
            statement(fd, td, BOB, price="666"),
            statement(fd, td, own, ids={k: f"7{v}" for k, v in BOBS.items()}),
        ),
    )
    bobs = rows_of(BOB)

    result = sync_positions(trigger="command", connection=connection)

    assert result.accounts == [own]
    assert result.accounts_refused == {BOB: NOT_YOURS.format(BOB)}
    assert BOB not in result.by_account and not [e for e in result.errors if e["account"] == BOB]
    assert rows_of(BOB) == bobs
    # What it counts is its own account's: one row of each kind, each day once.
    assert result.ledger == {kind: {"created": 1, "updated": 0, "unchanged": 0} for kind in BOBS}
    assert result.snapshots == {"created": 7, "updated": 0, "unchanged": 0}
    for model in conf.ledger_models().values():
        assert model._default_manager.filter(account__external_id=own).count() == 1
    run = SyncRun.objects.get(pk=result.sync_run_id)
    assert run.accounts_refused == {BOB: NOT_YOURS.format(BOB)} and run.accounts == [own]
    assert not run.statement["ranges"][BOB]  # nothing of it to count


def test_a_statement_of_another_owners_account_only_counts_nothing(owners, service, source):  # noqa: F811
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, BOB, price="666"))
    bobs = rows_of(BOB)

    result = sync_positions(trigger="command", connection="alice")

    assert result.accounts == [] and result.accounts_refused == {BOB: NOT_YOURS.format(BOB)}
    assert nothing_written(result) and not result.errors
    assert rows_of(BOB) == bobs
    # Bob's re-import (IBKR's corrections) still writes his rows.
    service.add_statement(QUERIES["bob"], lambda fd, td: statement(fd, td, BOB, price="101"))
    again = sync_positions(trigger="command", connection="bob")
    assert again.accounts == [BOB] and not again.accounts_refused and not again.errors
    assert again.ledger == {kind: {"created": 0, "updated": 1, "unchanged": 0} for kind in BOBS}
    trade = conf.ledger_models()["trades"]._default_manager.get(external_id=BOBS["trades"])
    assert (trade.account.external_id, trade.price) == (BOB, 101)


def test_the_api_answer_refuses_it_in_neutral_words(owners, service, source):  # noqa: F811
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, BOB, price="666"))
    bobs = rows_of(BOB)
    client = APIClient()
    client.force_authenticate(owners["alice"])

    answer = client.post("/portfolio/sync/ibkr?connection=alice")

    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["accounts"] == [] and body["accounts_refused"] == {BOB: NOT_YOURS.format(BOB)}
    assert all(not any(tally.values()) for tally in body["ledger"].values())
    assert "bob" not in str(body) and "another owner" not in str(body)
    assert rows_of(BOB) == bobs


def test_a_back_fill_writes_nothing_of_another_owners_account(owners, service, source):  # noqa: F811
    """A back-fill's older window writes history only: not of an account another owner
    holds either. Its window is refused as the newest is, counting nothing."""
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, BOB, price="666"))
    bobs = rows_of(BOB)
    start = END - dt.timedelta(days=400)

    outcome = sync_period(start, END, trigger="command", connection="alice")

    assert outcome.error is None and len(outcome.windows) == 2
    older, newest = (window.result for window in outcome.windows)
    assert older.history_only and not newest.history_only
    for result in (older, newest):
        assert result.accounts == [] and result.accounts_refused == {BOB: NOT_YOURS.format(BOB)}
        assert nothing_written(result) and not result.errors
        run = SyncRun.objects.get(pk=result.sync_run_id)
        assert run.accounts_refused == {BOB: NOT_YOURS.format(BOB)}
    assert rows_of(BOB) == bobs
    # The command says which accounts a window did not write.
    out = io.StringIO()
    call_command("sync_ibkr", "--connection", "alice", "--from", f"{start}", stdout=out)
    lines = out.getvalue().splitlines()
    assert "history only" in lines[0] and f"not written: {BOB}" in lines[0]
    assert f"not written: {BOB}" in lines[1]
    assert rows_of(BOB) == bobs


def test_the_owner_s_back_fill_writes_their_history(owners, service, source):  # noqa: F811
    service.add_statement(QUERIES["bob"], lambda fd, td: statement(fd, td, BOB, price="101"))
    start = END - dt.timedelta(days=400)

    outcome = sync_period(start, END, trigger="command", connection="bob")

    older = outcome.windows[0].result
    assert older.history_only and not older.accounts_refused and not older.errors
    assert older.snapshots["created"] == 365
    # Its own ids: bob's rows, corrected.
    assert older.ledger == {kind: {"created": 0, "updated": 1, "unchanged": 0} for kind in BOBS}
    trade = conf.ledger_models()["trades"]._default_manager.get(external_id=BOBS["trades"])
    assert (trade.account.external_id, trade.price) == (BOB, 101)


def test_the_same_statement_again_refuses_it_again_and_writes_nothing(
    owners,
    service,  # noqa: F811
    source,
    monkeypatch,
):
    """The Flex repeat: a statement of which nothing was written for an account another
    owner holds is not read again while that owner holds it, and writes nothing then
    either, in a back-fill's history-only window as in its newest; once the account is
    this connection's owner's, the statement is read whole and its history written."""
    if source == "whole":
        pytest.skip("the whole ledger's source tells no repeats")
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, BOB, price="666"))
    start = END - dt.timedelta(days=400)
    bobs = rows_of(BOB)
    sync_period(start, END, trigger="command", connection="alice")
    parsing_fails(monkeypatch)

    again = sync_period(start, END, trigger="command", connection="alice")

    for window in again.windows:
        result = window.result
        assert "repeats" in SyncRun.objects.get(pk=result.sync_run_id).statement
        assert result.accounts_refused == {BOB: NOT_YOURS.format(BOB)} and nothing_written(result)
    assert rows_of(BOB) == bobs
    monkeypatch.undo()
    # Bob's connection given to alice: the account is hers now, the statements read whole.
    bobs_connection = Connection.objects.get(name="bob")
    bobs_connection.owner = owners["alice"]
    bobs_connection.save()

    mine = sync_period(start, END, trigger="command", connection="alice")

    older, newest = (window.result for window in mine.windows)
    for result in (older, newest):
        assert "repeats" not in SyncRun.objects.get(pk=result.sync_run_id).statement
        assert not result.accounts_refused
    assert older.snapshots["created"] == 365 and newest.accounts == [BOB]
    assert older.ledger["trades"] == {"created": 0, "updated": 1, "unchanged": 0}


def test_a_connection_given_to_the_owner_while_it_reads_the_same_statement_reads_it(
    owners,
    service,  # noqa: F811
    source,
    monkeypatch,
):
    """The same statement again, its connection given to the owner of the account it was
    refused for while it read (after its sync began): that account is now its owner's to
    write, so the statement is no repeat (`services._applied_statement` asks with the
    connection's owner as it is now, not as the sync found it) and is read whole, the
    account written."""
    if source == "whole":
        pytest.skip("the whole ledger's source tells no repeats")
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, BOB, price="666"))
    first = sync_period(*WEEK, trigger="command", connection="alice").windows[0].result
    assert first.accounts_refused == {BOB: NOT_YOURS.format(BOB)}
    source_class = import_string(SOURCES[source])
    read = source_class.fetch_positions

    def given_to_bob_meanwhile(self, *args, **kwargs):
        row = Connection.objects.get(name="alice")
        row.owner = owners["bob"]
        row.save()
        return read(self, *args, **kwargs)

    monkeypatch.setattr(source_class, "fetch_positions", given_to_bob_meanwhile)

    again = sync_period(*WEEK, trigger="command", connection="alice").windows[0].result

    assert Connection.objects.get(name="alice").owner == owners["bob"]
    assert "repeats" not in SyncRun.objects.get(pk=again.sync_run_id).statement
    assert again.accounts == [BOB] and not again.accounts_refused
    assert AccountReport.objects.get(external_id=BOB).connection_name == "alice"


# --- a ledger row's id stored under another account ------------------------------------------


@pytest.mark.parametrize("connection", ["alice", "shared"])
def test_an_id_of_another_account_does_not_move_its_row(
    owners,
    service,  # noqa: F811
    source,
    connection,
    caplog,
):
    """The connection's own account reports bob's trade, dividend and split ids (and
    trades of its own): bob's rows stay his, exactly; each of the three is an error of
    the connection's account that does not say whose the id is; its other rows are
    written. The server log names the account the ids are stored under."""
    own = ALICE if connection == "alice" else SHARED
    service.add_statement(
        QUERIES[connection], lambda fd, td: statement(fd, td, own, price="666", mine=3)
    )
    bobs = rows_of(BOB)

    with caplog.at_level(logging.WARNING, logger="ibkr_sync.writer"):
        result = sync_positions(trigger="command", connection=connection)

    assert result.accounts == [own] and not result.accounts_refused
    assert rows_of(BOB) == bobs
    refused = elsewhere(result)
    assert sorted(refused) == sorted(
        (own, f"{label} ({BOBS[kind]}): not written: a row of this id is {ELSEWHERE}, and a "
              "stored row never changes account")
        for kind, label in (
            ("trades", "a trade"), ("cash_transactions", "a cash transaction"),
            ("corporate_actions", "a corporate action"),
        )
    )  # fmt: skip
    assert len(result.errors) == 3 and result.by_account[own]["errors"] == 3
    assert BOB not in said_of_bob(result) and "bob" not in said_of_bob(result)
    [error] = [e for e in result.errors if "a trade" in e["reason"]]
    assert (error["con_id"], error["symbol"], error["sec_type"]) == (265598, "AAPL", "STK")
    # Its own trades are written; bob's ids are counted as nothing.
    trades = conf.ledger_models()["trades"]._default_manager.filter(account__external_id=own)
    assert trades.count() == 3
    assert result.ledger["trades"] == {"created": 3, "updated": 0, "unchanged": 0}
    assert result.ledger["cash_transactions"] == {"created": 0, "updated": 0, "unchanged": 0}
    # The operator's log says where the ids are.
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{BOBS['trades']} (reported for {own}, stored under {BOB})" in logged
    # Again: the same, nothing moved.
    again = sync_positions(trigger="command", connection=connection)
    assert sorted(elsewhere(again)) == sorted(refused) and rows_of(BOB) == bobs


def test_an_id_of_another_account_in_a_back_fill_window(owners, service, source):  # noqa: F811
    """In a history-only window too: bob's rows stay his, the window says which rows it
    did not write."""
    service.add_statement(
        QUERIES["alice"], lambda fd, td: statement(fd, td, ALICE, price="666", mine=2)
    )
    bobs = rows_of(BOB)

    outcome = sync_period(END - dt.timedelta(days=400), END, trigger="command", connection="alice")

    assert outcome.error is None
    older, newest = (window.result for window in outcome.windows)
    assert older.history_only and not older.accounts_refused
    for result in (older, newest):
        assert len(elsewhere(result)) == 3 and {a for a, _ in elsewhere(result)} == {ALICE}
    # Her own trades: written by the older window, moved to the newer one's day by it.
    assert older.ledger["trades"] == {"created": 2, "updated": 0, "unchanged": 0}
    assert newest.ledger["trades"] == {"created": 0, "updated": 2, "unchanged": 0}
    assert rows_of(BOB) == bobs


def test_an_id_of_another_account_sent_twice_in_one_download(owners, service, source):  # noqa: F811
    """Two overlapping statements of alice's account in one download, both with bob's
    ids (rows sent twice: the stream holds them to its last batch): not written either."""
    older = (END - dt.timedelta(days=8), END - dt.timedelta(days=2))
    service.add_statement(
        QUERIES["alice"],
        lambda fd, td: download(
            statement(*older, ALICE, price="666", mine=1),
            statement(fd, td, ALICE, price="666", mine=4),
        ),
    )
    bobs = rows_of(BOB)

    result = sync_positions(trigger="command", connection="alice")

    assert rows_of(BOB) == bobs
    assert len(elsewhere(result)) == 3
    trades = conf.ledger_models()["trades"]._default_manager.filter(account__external_id=ALICE)
    assert trades.count() == 4


def test_an_account_s_own_ids_are_corrected_as_before(owners, service, source):  # noqa: F811
    """The rule takes nothing from a legitimate statement: alice's own rows, corrected
    by IBKR in the next statement, are updated in her account."""
    mine = {k: f"7{v}" for k, v in BOBS.items()}
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, ALICE, ids=mine))
    first = sync_positions(trigger="command", connection="alice")
    assert not first.errors
    service.add_statement(
        QUERIES["alice"], lambda fd, td: statement(fd, td, ALICE, ids=mine, price="99")
    )

    again = sync_positions(trigger="command", connection="alice")

    assert not again.errors
    assert again.ledger == {kind: {"created": 0, "updated": 1, "unchanged": 0} for kind in BOBS}
    trade = conf.ledger_models()["trades"]._default_manager.get(external_id=mine["trades"])
    assert (trade.account.external_id, trade.price) == (ALICE, 99)


def test_an_id_another_sync_inserted_meanwhile_is_not_taken_either(
    owners,
    service,  # noqa: F811
    source,
    monkeypatch,
):
    """Bob's trade inserted by his own sync between alice's read of the batch's stored
    rows and her insert (PostgreSQL: two syncs at once): her row is not inserted over
    it, and is an error of hers as a row found stored is, not an unchanged row."""
    from ibkr_sync import writer

    Trade = conf.ledger_models()["trades"]._default_manager
    bobs_trade = Trade.filter(external_id=BOBS["trades"]).values().get()
    Trade.filter(external_id=BOBS["trades"]).delete()
    insert_new = writer.insert_new

    def bob_first(model, rows, unique):
        rows = list(rows)
        if any(row.get("external_id") == BOBS["trades"] for row in rows):
            Trade.bulk_create([Trade.model(**bobs_trade)])
        return insert_new(model, rows, unique)

    monkeypatch.setattr(writer, "insert_new", bob_first)
    service.add_statement(QUERIES["alice"], lambda fd, td: statement(fd, td, ALICE, mine=2))

    result = sync_positions(trigger="command", connection="alice")

    stamps = {"created_at", "updated_at"}  # bob's insert stamps them anew
    after = Trade.filter(external_id=BOBS["trades"]).values().get()
    assert {k: v for k, v in after.items() if k not in stamps} == {
        k: v for k, v in bobs_trade.items() if k not in stamps
    }
    assert [reason for _, reason in elsewhere(result) if "a trade" in reason]
    assert result.ledger["trades"] == {"created": 2, "updated": 0, "unchanged": 0}
