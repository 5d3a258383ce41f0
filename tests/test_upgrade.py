"""An installation of the single-gateway version upgrades with `migrate` alone: its sync
history and a sync holding the lock at that moment carry over, and it syncs as before."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from ibkr_sync import services
from ibkr_sync.models import Connection, SyncRun
from tests.migrations import migrate, migrate_to_latest

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("ibkr_sync", "0005_sync_lock_database_session")]


@pytest.fixture
def upgraded_from_one_gateway():
    """The tables as the single-gateway version left them, with its history: a finished
    sync and one still running (its lock held), then `migrate` to the latest."""
    old = migrate(BEFORE)
    OldRun = old.get_model("ibkr_sync", "SyncRun")
    OldRun.objects.create(trigger="command", status="success", processed=2, created=2)
    OldRun.objects.create(trigger="command", status="running", owner="elsewhere")
    migrate_to_latest()


def test_the_history_and_a_held_lock_carry_over(upgraded_from_one_gateway):
    finished, running = SyncRun.objects.order_by("pk")
    assert (finished.status, finished.created, finished.connection_id) == ("success", 2, None)
    assert (finished.connection_name, finished.accounts_refused) == ("", {})
    # The lock held while upgrading is the settings' gateway's lock, and still held.
    assert (running.status, running.lock_key) == ("running", "")
    with pytest.raises(IntegrityError), transaction.atomic():
        SyncRun.objects.create(trigger="command", status="running")
    # A connection's lock is another: taken while the settings' gateway's is held.
    home = Connection.objects.create(name="home", port=4002)
    SyncRun.objects.create(trigger="command", status="running", lock_key=home.lock_key)


def test_after_the_upgrade_a_sync_reads_the_settings_gateway_as_before(
    upgraded_from_one_gateway, use_gateway
):
    SyncRun.objects.filter(status="running").update(status="failed", error_code="abandoned")
    result = services.sync_positions(trigger="command")
    assert (result.connection, result.created) == ("", 2)
    assert SyncRun.objects.get(pk=result.sync_run_id).lock_key == ""
