"""The sync service against a real database, with a fake gateway at the adapter boundary."""

import contextlib
import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from ibkr_sync import lock, writer
from ibkr_sync.exceptions import (
    GatewayUnavailable,
    InvalidAccountId,
    SyncAlreadyRunning,
    SyncInsideTransaction,
)
from ibkr_sync.models import PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, Instrument, Position
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db


def run(gateway, account_id=None):
    return sync_positions(account_id, trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


def test_first_sync_creates_accounts_instruments_and_positions(fake_gateway):
    result = run(fake_gateway)

    assert (result.processed, result.created, result.unchanged, result.closed) == (2, 2, 0, 0)
    assert result.accounts == ["U1111111"]
    account = Account.objects.get(external_id="U1111111")
    assert account.broker == "ibkr"
    assert not account.is_paper
    assert account.last_synced_at
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert tsla.quantity == Decimal("0.5")
    assert tsla.average_cost == Decimal("242.1")
    assert tsla.cost_basis == Decimal("121.05")
    assert tsla.closed_at is None
    assert tsla.opened_at == tsla.last_synced_at
    assert Instrument.objects.get(external_id="76792991").sec_type == "STK"
    sync_run = SyncRun.objects.get(pk=result.sync_run_id)
    assert sync_run.status == "success"
    assert sync_run.created == 2
    assert sync_run.finished_at


def test_resync_with_nothing_changed_writes_no_position_rows(fake_gateway):
    run(fake_gateway)
    before = list(Position.objects.values_list("pk", "last_synced_at"))

    with CaptureQueriesContext(connection) as queries:
        result = run(fake_gateway)

    assert (result.created, result.updated, result.unchanged, result.closed) == (0, 0, 2, 0)
    assert list(Position.objects.values_list("pk", "last_synced_at")) == before
    writes = [
        q["sql"]
        for q in queries
        if "portfolio_position" in q["sql"].split(" WHERE")[0]
        and q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
    ]
    assert writes == []


def test_quantity_change_updates_only_that_row(fake_gateway):
    run(fake_gateway)
    fake_gateway.positions[1] = position(
        con_id=76792991, symbol="TSLA", quantity="0.75", average_cost="240"
    )

    result = run(fake_gateway)

    assert (result.updated, result.unchanged) == (1, 1)
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert (tsla.quantity, tsla.average_cost, tsla.cost_basis) == (
        Decimal("0.75"),
        Decimal("240"),
        Decimal("180"),
    )


def test_position_no_longer_reported_is_closed_not_deleted_and_reopens(fake_gateway):
    run(fake_gateway)
    removed = fake_gateway.positions.pop(1)

    result = run(fake_gateway)

    assert (result.closed, result.unchanged) == (1, 1)
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert tsla.closed_at is not None
    assert tsla.quantity == Decimal("0.5"), "quantity is kept as last seen"
    assert Position.objects.open().count() == 1

    assert run(fake_gateway).closed == 0, "closing is not repeated"

    fake_gateway.positions.append(removed)
    result = run(fake_gateway)
    assert result.reopened == 1
    tsla.refresh_from_db()
    assert tsla.closed_at is None
    assert Position.objects.count() == 2


def changes_of(result):
    return [
        (c.kind, c.position.instrument.symbol, c.quantity_before, c.quantity_after)
        for c in PositionChange.objects.filter(sync_run_id=result.sync_run_id)
        .select_related("position__instrument")
        .order_by("position__instrument__symbol")
    ]


def test_each_run_records_what_it_changed_in_each_position(fake_gateway):
    first = run(fake_gateway)
    assert changes_of(first) == [
        ("created", "AAPL", None, Decimal("10")),
        ("created", "TSLA", None, Decimal("0.5")),
    ]
    created = PositionChange.objects.get(
        sync_run_id=first.sync_run_id, kind="created", position__instrument__symbol="TSLA"
    )
    assert (created.average_cost_before, created.average_cost_after) == (None, Decimal("242.1"))

    assert changes_of(run(fake_gateway)) == [], "an unchanged re-sync records nothing"

    removed = fake_gateway.positions.pop(1)
    fake_gateway.positions[0] = position(quantity="12.5", average_cost="151")
    second = run(fake_gateway)
    assert changes_of(second) == [
        ("updated", "AAPL", Decimal("10"), Decimal("12.5")),
        ("closed", "TSLA", Decimal("0.5"), None),
    ]
    updated = PositionChange.objects.get(sync_run_id=second.sync_run_id, kind="updated")
    assert (updated.average_cost_before, updated.average_cost_after) == (
        Decimal("150.25"),
        Decimal("151"),
    )

    fake_gateway.positions.append(removed)
    assert changes_of(run(fake_gateway)) == [("reopened", "TSLA", None, Decimal("0.5"))]


def test_accounts_the_gateway_does_not_report_are_never_touched(fake_gateway):
    run(fake_gateway)
    fake_gateway.accounts = ("U2222222",)
    fake_gateway.positions = [position(account="U2222222", con_id=8314, symbol="IBM")]

    result = run(fake_gateway)

    assert result.closed == 0
    assert Position.objects.filter(account__external_id="U1111111").open().count() == 2


def test_account_filter_limits_reading_and_reconciliation():
    gateway = FakeGateway(
        accounts=("U1111111", "U2222222"),
        positions=[position(), position(account="U2222222", con_id=8314, symbol="IBM")],
    )
    run(gateway)
    gateway.positions = []  # both accounts now empty

    result = run(gateway, "u2222222")

    assert gateway.calls[-1] == "U2222222"
    assert result.accounts == ["U2222222"]
    assert result.closed == 1
    assert Position.objects.get(account__external_id="U1111111").closed_at is None
    assert Position.objects.get(account__external_id="U2222222").closed_at is not None
    assert SyncRun.objects.get(pk=result.sync_run_id).account_filter == "U2222222"


def test_an_account_with_no_positions_closes_what_it_held(fake_gateway):
    run(fake_gateway)
    fake_gateway.positions = []
    assert run(fake_gateway).closed == 2


def test_unmappable_record_is_counted_and_its_row_left_alone(fake_gateway):
    run(fake_gateway)
    fake_gateway.positions[1] = position(
        con_id=76792991, symbol="TSLA", quantity="0.00000000001"
    )  # finer than we can store
    fake_gateway.positions.append(position(con_id=5, symbol="ODD", sec_type="NOPE"))

    result = run(fake_gateway)

    assert result.processed == 3
    assert [e["con_id"] for e in result.errors] == [76792991, 5]
    assert "more than 10 decimal places" in result.errors[0]["reason"]
    assert "unsupported security type" in result.errors[1]["reason"]
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert tsla.closed_at is None
    assert tsla.quantity == Decimal("0.5")
    assert SyncRun.objects.get(pk=result.sync_run_id).errors == 2


def test_a_record_with_an_unstorable_account_id_is_an_error_not_a_crash():
    garbage = "U" + "9" * 100
    gateway = FakeGateway(
        accounts=("U1111111", garbage, "U2\x003"),
        positions=[position(), position(account=garbage, con_id=42), position(account="U2\x003")],
    )

    result = run(gateway)

    assert (result.created, len(result.errors)) == (1, 2)
    assert result.accounts == ["U1111111"]
    assert list(Account.objects.values_list("external_id", flat=True)) == ["U1111111"]


def test_paper_accounts_are_marked():
    run(FakeGateway(accounts=("DU1234567",), positions=[position(account="DU1234567")]))
    assert Account.objects.get().is_paper


def test_instrument_changes_are_written(fake_gateway):
    run(fake_gateway)
    fake_gateway.positions[0] = position(exchange="NYSE", local_symbol="AAPL")
    run(fake_gateway)
    assert Instrument.objects.get(external_id="265598").exchange == "NYSE"


def test_gateway_failure_records_a_failed_run_and_changes_nothing(fake_gateway):
    run(fake_gateway)
    fake_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at 127.0.0.1:1")

    with pytest.raises(GatewayUnavailable):
        run(fake_gateway)

    failed = SyncRun.objects.latest()
    assert failed.status == "failed"
    assert failed.error_code == "gateway_unavailable"
    assert "127.0.0.1:1" in failed.error_message
    assert failed.finished_at
    assert Position.objects.open().count() == 2


def test_crash_midway_rolls_back_every_write(fake_gateway, monkeypatch):
    run(fake_gateway)
    fake_gateway.positions = [
        position(quantity="99"),
        position(con_id=42, symbol="NEW"),
    ]  # one update, one create, one close

    insert = writer.insert_rows

    def explode(model, rows):
        if model is PositionChange:  # the last write of a sync: all before it rolls back
            raise RuntimeError("disk full")
        return insert(model, rows)

    monkeypatch.setattr(writer, "insert_rows", explode)
    with pytest.raises(RuntimeError):
        run(fake_gateway)

    assert Position.objects.count() == 2
    assert Position.objects.get(instrument__symbol="AAPL").quantity == Decimal("10")
    assert Position.objects.open().count() == 2
    assert not Instrument.objects.filter(external_id="42").exists()
    failed = SyncRun.objects.latest()
    assert not failed.changes.exists()
    assert failed.status == "failed"
    assert failed.error_code == "internal_error"
    assert "disk full" in failed.error_message


def test_invalid_account_id_is_rejected_before_anything_runs(fake_gateway):
    with pytest.raises(InvalidAccountId):
        run(fake_gateway, "not-an-account")
    assert fake_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_a_second_sync_is_refused_while_one_runs(fake_gateway):
    SyncRun.objects.create(trigger="command", status="running", host="", pid=None)
    with pytest.raises(SyncAlreadyRunning):
        run(fake_gateway)
    refused = SyncRun.objects.latest("id")
    assert refused.status == "failed"
    assert refused.error_code == "sync_already_running"
    assert fake_gateway.calls == []


def test_a_sync_whose_lock_was_taken_away_meanwhile_writes_nothing(fake_gateway):
    class LockStolenDuringRead(FakeGateway):
        def fetch_positions(self, account_id=None):
            # As another process does after IBKR_SYNC_STALE_AFTER of silence.
            SyncRun.objects.filter(status="running").update(status="failed", error_code="abandoned")
            return super().fetch_positions(account_id)

    with pytest.raises(SyncAlreadyRunning, match="lock was released while it ran"):
        run(LockStolenDuringRead(positions=fake_gateway.positions))

    assert not Position.objects.exists()
    assert not Account.objects.exists()
    assert SyncRun.objects.get().status == "failed"


@pytest.mark.django_db(transaction=True)
def test_concurrent_syncs_one_runs_the_other_is_refused(fake_gateway):
    fake_gateway.release = threading.Event()
    outcome = {}

    def first():
        try:
            outcome["first"] = run(fake_gateway)
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    assert fake_gateway.entered.wait(10)
    try:
        with pytest.raises(SyncAlreadyRunning):
            run(FakeGateway())
    finally:
        fake_gateway.release.set()
        thread.join(10)
    assert outcome["first"].created == 2
    assert list(SyncRun.objects.order_by("id").values_list("status", flat=True)) == [
        "success",
        "failed",
    ]


def test_counts_are_also_given_per_account():
    gateway = FakeGateway(
        accounts=("U1111111", "U2222222", "U3333333"),
        positions=[position(), position(account="U2222222", con_id=8314, symbol="IBM")],
    )
    result = run(gateway)
    assert result.by_account["U1111111"]["created"] == 1
    assert result.by_account["U2222222"] == {
        "processed": 1, "created": 1, "updated": 0, "unchanged": 0, "reopened": 0,
        "closed": 0, "errors": 0,
    }  # fmt: skip
    assert result.by_account["U3333333"]["processed"] == 0


def test_resync_is_stable_for_values_with_many_digits():
    """Neither a long cost basis nor a 16-digit average cost makes a row look changed
    (SQLite keeps 15 significant digits of a decimal column)."""
    gateway = FakeGateway(
        positions=[position(quantity="0.12345678", average_cost="123456.1234567891")]
    )
    run(gateway)
    result = run(gateway)
    assert (result.unchanged, result.updated) == (1, 0)


def test_run_is_marked_done_in_the_same_transaction_as_its_writes(fake_gateway, monkeypatch):
    finish = lock.finish_holding

    def finish_then_lose_the_connection(run):
        finish(run)  # the run's row written as a success, in the write transaction
        assert SyncRun.objects.get(pk=run.pk).status == "success"
        raise RuntimeError("connection lost at commit")

    monkeypatch.setattr(lock, "finish_holding", finish_then_lose_the_connection)
    with pytest.raises(RuntimeError):
        run(fake_gateway)

    assert not Position.objects.exists()
    failed = SyncRun.objects.get()
    assert (failed.status, failed.error_code, failed.created) == ("failed", "internal_error", 0)


# --- never inside a caller's transaction ----------------------------------------------------


@contextlib.contextmanager
def callers_transaction(kind):
    if kind == "atomic":
        with transaction.atomic():
            yield
    elif kind == "nested atomic":
        with transaction.atomic(), transaction.atomic():
            yield
    else:  # autocommit off, as a caller may set it by hand
        transaction.set_autocommit(False)
        try:
            yield
        finally:
            transaction.rollback()
            transaction.set_autocommit(True)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("dry_run", [False, True], ids=["sync", "dry run"])
@pytest.mark.parametrize("kind", ["atomic", "nested atomic", "autocommit off"])
def test_a_sync_inside_a_callers_transaction_is_refused_before_anything_starts(
    fake_gateway, kind, dry_run
):
    """The review's finding: inside a caller's transaction the sync ran, and the record of
    the attempt went with the caller's rollback. Refused, before the lock or the gateway."""
    with callers_transaction(kind), pytest.raises(SyncInsideTransaction) as raised:
        sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=fake_gateway, dry_run=dry_run)
    assert raised.value.code == "sync_inside_transaction"
    assert "transaction.atomic()" in str(raised.value)
    assert fake_gateway.calls == []
    assert not SyncRun.objects.exists()
    # Outside it, the same call runs.
    assert run(fake_gateway).created == len(fake_gateway.positions)


def test_a_callers_atomic_inside_a_test_case_is_refused_too(fake_gateway):
    """A test case's wrapping transaction stands in for autocommit (as for Django's durable
    blocks); a transaction the caller opens is refused all the same."""
    with transaction.atomic(), pytest.raises(SyncInsideTransaction):
        run(fake_gateway)
    assert fake_gateway.calls == []


@pytest.mark.django_db(transaction=True)
def test_the_edges_answer_a_sync_inside_a_transaction_as_a_bug(use_gateway):
    """A programming error of the caller: 500 through the API's mapping, exit 1 (as any
    bug) from the command, with the message and no SyncRun."""
    from io import StringIO

    from django.core.management import CommandError, call_command

    from ibkr_sync.api.views import status_for

    with transaction.atomic(), pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", stdout=StringIO(), stderr=StringIO())
    assert raised.value.returncode == 1
    assert "inside a transaction" in str(raised.value)
    assert status_for(SyncInsideTransaction("x")) == 500
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()
