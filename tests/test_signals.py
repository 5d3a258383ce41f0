"""The host's hooks: signals after commit, and the gateway adapter chosen by a setting."""

from __future__ import annotations

import logging

import pytest
from django.db import connection

from ibkr_sync.exceptions import GatewayUnavailable
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.signals import positions_changed, sync_finished
from portfolio.models import Position
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db


@pytest.fixture
def heard():
    calls: list[tuple[str, dict]] = []

    def on_finished(sender, **kwargs):
        calls.append(("sync_finished", kwargs))

    def on_changed(sender, **kwargs):
        # After commit: what the receiver reads is what the sync wrote.
        kwargs["stored"] = sorted(Position.objects.values_list("quantity", flat=True))
        calls.append(("positions_changed", kwargs))

    sync_finished.connect(on_finished)
    positions_changed.connect(on_changed)
    yield calls
    sync_finished.disconnect(on_finished)
    positions_changed.disconnect(on_changed)


def sync(gateway, **options):
    return sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway, **options)


def test_signals_are_sent_after_the_sync_commits(heard, django_capture_on_commit_callbacks):
    gateway = FakeGateway([position(), position(con_id=2, symbol="B", quantity="5")])
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        result = sync(gateway)
    assert heard == [], "nothing before the commit"
    for callback in callbacks:
        callback()

    (name, finished), (name2, changed) = heard
    assert (name, name2) == ("sync_finished", "positions_changed")
    assert finished["sync_run"].pk == result.sync_run_id
    assert finished["result"] is result
    assert sorted((c["kind"], c["symbol"], c["quantity_after"]) for c in changed["changes"]) == [
        ("created", "AAPL", 10),
        ("created", "B", 5),
    ]
    assert changed["stored"] == [5, 10]


def test_positions_changed_carries_before_and_after(heard, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        sync(FakeGateway([position(), position(con_id=2, symbol="B")]))
    heard.clear()
    with django_capture_on_commit_callbacks(execute=True):
        sync(FakeGateway([position(quantity="12", average_cost="151")]))
    changes = {c["symbol"]: c for c in heard[1][1]["changes"]}
    assert changes["AAPL"]["kind"] == "updated"
    assert (changes["AAPL"]["quantity_before"], changes["AAPL"]["quantity_after"]) == (10, 12)
    assert changes["AAPL"]["average_cost_before"] == pytest.approx(150.25)
    assert changes["AAPL"]["average_cost_after"] == 151
    assert changes["B"]["kind"] == "closed"
    assert changes["B"]["quantity_after"] is None


def test_an_unchanged_sync_is_finished_but_changes_nothing(
    heard, django_capture_on_commit_callbacks
):
    gateway = FakeGateway([position()])
    with django_capture_on_commit_callbacks(execute=True):
        sync(gateway)
    heard.clear()
    with django_capture_on_commit_callbacks(execute=True):
        sync(gateway)
    assert [name for name, _ in heard] == ["sync_finished"]


def test_no_signal_for_a_failed_sync_or_a_dry_run(heard, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(GatewayUnavailable):
            sync(FakeGateway(error=GatewayUnavailable("down")))
        sync(FakeGateway([position()]), dry_run=True)
    assert heard == []


def test_a_failing_receiver_is_logged_and_the_sync_stands(
    caplog, django_capture_on_commit_callbacks
):
    def broken(sender, **kwargs):
        raise RuntimeError("the host's bug")

    positions_changed.connect(broken)
    try:
        with (
            caplog.at_level(logging.ERROR),
            django_capture_on_commit_callbacks(execute=True),
        ):
            result = sync(FakeGateway([position()]))
    finally:
        positions_changed.disconnect(broken)
    assert result.created == 1
    assert Position.objects.count() == 1
    assert SyncRun.objects.get(pk=result.sync_run_id).status == "success"
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.name == "django.dispatch"
    assert record.exc_info[1].args == ("the host's bug",)


@pytest.mark.django_db(transaction=True)
def test_outside_a_test_transaction_the_signals_come_at_once(heard):
    assert not connection.in_atomic_block
    sync(FakeGateway([position()]))
    assert [name for name, _ in heard] == ["sync_finished", "positions_changed"]


def test_the_gateway_adapter_is_a_setting(settings, use_gateway, client, syncer):
    """What the tests' `use_gateway` does is what a host's own tests can do."""
    assert settings.IBKR_SYNC_GATEWAY_CLASS == "tests.conftest.current_fake_gateway"
    client.force_login(syncer)
    assert client.post("/portfolio/sync/ibkr").json()["created"] == 2
    assert use_gateway.calls == [None]
