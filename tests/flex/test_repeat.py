"""The same Flex statement downloaded again: recognised by its digest and not read again,
exactly when reading it would write nothing. The real client over real HTTP against the
fake Flex Web Service, the service and the writer, into the database (SQLite, or
PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import itertools

import pytest

from ibkr_sync import conf
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.services import sync_period
from ibkr_sync.sources.flex import source as flex_source
from ibkr_sync.sources.flex.source import statement_digest, yesterday

from .test_backfill import ACCOUNT, Trade, three_windows, window_statement
from .test_flex_connection import QUERY, flex_connection, period_end, service  # noqa: F401

pytestmark = pytest.mark.django_db

END = yesterday()
START = END - dt.timedelta(days=9)


_DOWNLOADS = itertools.count()


def regenerated(from_date: dt.date, to_date: dt.date) -> str:
    """The window's statement as IBKR generates it at each download: the same data, a
    new `whenGenerated`."""
    text = window_statement(from_date, to_date)
    return text.replace(
        f'whenGenerated="{to_date:%Y%m%d};073012"',
        f'whenGenerated="{to_date:%Y%m%d};07{next(_DOWNLOADS) % 60:02d}12"',
    )


def sync(**options):
    outcome = sync_period(START, END, trigger="command", connection="myflex", **options)
    assert outcome.error is None, outcome.error
    [window] = outcome.windows
    return window.result


def parsing_fails(monkeypatch) -> None:
    """From here on, a statement the source parses fails the test."""

    def parse(*args, **kwargs):
        raise AssertionError("the statement was parsed again")

    monkeypatch.setattr(flex_source, "parse_flex", parse)


def figures(result) -> dict:
    fields = dataclasses.asdict(result)
    for name in ("sync_run_id", "started_at", "finished_at"):
        fields.pop(name)
    return fields


# --- the digest -----------------------------------------------------------------------


def test_the_digest_leaves_out_when_the_statement_was_generated_and_nothing_else():
    one = regenerated(START, END).encode()
    two = regenerated(START, END).encode()
    assert one != two
    assert statement_digest(io.BytesIO(one)) == statement_digest(io.BytesIO(two))
    # One figure of the data changed: another statement.
    changed = one.replace(b'tradePrice="100"', b'tradePrice="100.01"')
    assert changed != one
    assert statement_digest(io.BytesIO(changed)) != statement_digest(io.BytesIO(one))
    # An attribute that merely ends in the same name is data.
    renamed = one.replace(b" whenGenerated=", b" xwhenGenerated=")
    assert statement_digest(io.BytesIO(renamed)) != statement_digest(io.BytesIO(one))


@pytest.mark.parametrize("chunk", [7, 64, 100, 129, 4096])
def test_the_digest_is_the_same_whatever_the_chunks(monkeypatch, chunk):
    """An attribute cut by a chunk's end is still left out: the digest of a body read in
    chunks of any size is the one of the whole body read at once."""
    bodies = [
        ("".join(regenerated(START, END) for _ in range(3))).encode(),
        b"<a whenGenerated='20250101;000000'/>" * 50,
    ]
    whole = [statement_digest(io.BytesIO(body)) for body in bodies]
    monkeypatch.setattr(flex_source, "_CHUNK", chunk)
    monkeypatch.setattr(flex_source, "_CARRY", 128)
    assert [statement_digest(io.BytesIO(body)) for body in bodies] == whole


# --- a sync ---------------------------------------------------------------------------


def test_the_same_statement_again_is_not_read_again_and_reports_what_a_full_read_would(
    service,  # noqa: F811
    monkeypatch,
):
    service.add_statement(QUERY, regenerated)
    flex_connection()
    first = sync()
    assert first.created == 2 and first.ledger["trades"]["created"] == 1
    # What reading the statement whole again reports: the first run's record forgotten.
    SyncRun.objects.filter(pk=first.sync_run_id).update(statement={})
    full = sync()
    assert full.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 1}
    counts = (Trade().objects.count(), conf.account_snapshot_model().objects.count())

    parsing_fails(monkeypatch)
    again = sync()

    assert figures(again) == figures(full)
    run = SyncRun.objects.get(pk=again.sync_run_id)
    assert run.status == "success" and run.statement["repeats"] == full.sync_run_id
    assert (run.unchanged, run.created, run.period_from, run.period_to) == (2, 0, START, END)
    assert (Trade().objects.count(), conf.account_snapshot_model().objects.count()) == counts
    # The account's report is the full read's: nothing was written but the account's
    # stamp, synced now.
    assert AccountReport.objects.get(external_id=ACCOUNT).sync_run_id == full.sync_run_id
    account = conf.account_model().objects.get(external_id=ACCOUNT)
    assert account.last_synced_at >= run.started_at
    # And again: a repeat of a repeat names the run that applied it.
    third = sync()
    assert SyncRun.objects.get(pk=third.sync_run_id).statement["repeats"] == full.sync_run_id
    assert figures(third) == figures(full)


def test_the_same_window_without_daily_values_again_says_none(service, monkeypatch):  # noqa: F811
    """A back-fill's older window whose statement holds no day's values (a query without
    the NAV section) writes no account snapshot: its repeat says none either, as a full
    read does, and succeeds."""
    from .statements import statement_with_values

    service.add_statement(
        QUERY,
        lambda fd, td: statement_with_values(fd, td, sections=("OpenPositions", "CashReport")),
    )
    flex_connection()
    start = END - dt.timedelta(days=400)
    first = sync_period(start, END, trigger="command", connection="myflex")
    older = first.windows[0].result
    assert older.history_only and older.snapshots == {}
    parsing_fails(monkeypatch)

    again = sync_period(start, END, trigger="command", connection="myflex")

    assert again.error is None, again.error
    repeat = again.windows[0].result
    assert SyncRun.objects.get(pk=repeat.sync_run_id).statement["repeats"] == older.sync_run_id
    assert repeat.history_only and repeat.snapshots == {}


def test_a_dry_run_of_the_same_statement_keeps_no_run(service, monkeypatch):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    runs = SyncRun.objects.count()
    parsing_fails(monkeypatch)

    preview = sync(dry_run=True)

    assert preview.dry_run and preview.created == 0 and preview.unchanged == 2
    assert SyncRun.objects.count() == runs


def test_a_corrected_statement_is_read_and_its_correction_written(service):  # noqa: F811
    corrected = False

    def statement(from_date, to_date):
        text = regenerated(from_date, to_date)
        return text.replace('tradePrice="100"', 'tradePrice="100.5"') if corrected else text

    service.add_statement(QUERY, statement)
    flex_connection()
    sync()
    corrected = True

    again = sync()

    assert again.ledger["trades"] == {"created": 0, "updated": 1, "unchanged": 0}
    assert str(Trade().objects.get().price) in ("100.5", "100.50", "100.5000000000")
    assert "repeats" not in SyncRun.objects.get(pk=again.sync_run_id).statement


def test_a_ledger_row_deleted_since_is_written_again(service):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    Trade().objects.all().delete()

    again = sync()

    assert again.ledger["trades"]["created"] == 1 and Trade().objects.count() == 1


def test_a_day_deleted_since_is_written_again(service):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    snapshots = conf.account_snapshot_model().objects
    total = snapshots.count()
    snapshots.filter(taken_at=period_end(START)).delete()

    again = sync()

    assert again.snapshots["created"] == 1 and snapshots.count() == total


def test_a_newer_snapshot_of_the_account_since_is_respected(service):  # noqa: F811
    """Another connection applied a newer snapshot of the account: the statement is read
    again and refused for the account's state, as any older statement is."""
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    other = Connection.objects.create(name="gateway", kind="tws", host="127.0.0.1", port=4001)
    AccountReport.objects.filter(external_id=ACCOUNT).update(
        connection=other, connection_name="gateway", as_of=period_end(END) + dt.timedelta(hours=1)
    )

    again = sync()

    assert ACCOUNT in again.accounts_refused
    assert "repeats" not in SyncRun.objects.get(pk=again.sync_run_id).statement


def test_another_period_or_account_filter_is_not_the_same_statement(service):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()

    narrower = sync_period(
        START + dt.timedelta(days=1), END, trigger="command", connection="myflex"
    )
    one_account = sync(account_id=ACCOUNT)

    assert "repeats" not in SyncRun.objects.get(pk=narrower.windows[0].result.sync_run_id).statement
    assert "repeats" not in SyncRun.objects.get(pk=one_account.sync_run_id).statement


def test_a_statement_applied_before_another_one_is_not_a_repeat(service):  # noqa: F811
    """Only the last run of the period counts: a statement that was applied, then
    replaced by a different one, is read again when it comes back."""
    version = {"price": "100"}

    def statement(from_date, to_date):
        text = regenerated(from_date, to_date)
        return text.replace('tradePrice="100"', f'tradePrice="{version["price"]}"')

    service.add_statement(QUERY, statement)
    flex_connection()
    sync()
    version["price"] = "101"
    sync()
    version["price"] = "100"

    back = sync()

    assert back.ledger["trades"] == {"created": 0, "updated": 1, "unchanged": 0}


def test_another_mapping_reads_the_statement_again(service, monkeypatch):  # noqa: F811
    """What the digest is compared under includes the code and the models: an upgrade
    reads every statement again once."""
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    from ibkr_sync import mapping

    monkeypatch.setattr(mapping, "_statement_signatures", {})
    monkeypatch.setattr(mapping, "_signature", lambda models_: "another version")

    again = sync()

    assert "repeats" not in SyncRun.objects.get(pk=again.sync_run_id).statement
    assert again.ledger["trades"]["unchanged"] == 1


def test_a_back_fill_again_reads_none_of_its_windows_again(service, monkeypatch):  # noqa: F811
    """The older windows (their history only) and the newest (the state too): each the
    same statement as before, none parsed again, none writing anything."""
    service.add_statement(QUERY, regenerated)
    flex_connection()
    windows = three_windows()
    first = sync_period(windows[0][0], trigger="command", connection="myflex")
    counts = (Trade().objects.count(), conf.account_snapshot_model().objects.count())
    parsing_fails(monkeypatch)

    again = sync_period(windows[0][0], trigger="command", connection="myflex")

    assert again.error is None and len(again.windows) == 3
    for before, after in zip(first.windows, again.windows, strict=True):
        run = SyncRun.objects.get(pk=after.result.sync_run_id)
        assert run.statement["repeats"] == before.result.sync_run_id
        assert run.history_only == before.result.history_only
        assert after.result.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 1}
        assert after.result.created == after.result.updated == 0
    assert again.windows[-1].result.unchanged == 2
    assert (Trade().objects.count(), conf.account_snapshot_model().objects.count()) == counts


def test_the_run_s_page_says_it_repeats_a_run(service, admin_client):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    first = sync()
    again = sync()

    page = admin_client.get(f"/admin/ibkr_sync/syncrun/{again.sync_run_id}/change/")

    assert page.status_code == 200
    text = page.content.decode()
    assert f"the same statement that run #{first.sync_run_id} applied" in text
    assert "not read again, nothing written" in text
    first_page = admin_client.get(f"/admin/ibkr_sync/syncrun/{first.sync_run_id}/change/")
    assert "the same statement" not in first_page.content.decode()
