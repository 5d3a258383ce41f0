"""Migration 0017 records each account's owner on its report (`AccountReport.owner`),
from the connection that reports it, so that an account keeps its owner once that
connection is removed. An account whose connection was removed before: whose it was is
not known, and it is taken for owned by a user no longer known (written by no sync),
never for everyone's."""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings

from ibkr_sync.models import AccountReport
from tests.migrations import migrate, migrate_to_latest

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("ibkr_sync", "0016_syncrun_statement")]
AFTER = [("ibkr_sync", "0017_account_report_owner")]


@pytest.fixture
def migrated():
    old = migrate(BEFORE)
    User = old.get_model(*settings.AUTH_USER_MODEL.split("."))
    OldConnection = old.get_model("ibkr_sync", "Connection")
    OldReport = old.get_model("ibkr_sync", "AccountReport")
    alice = User.objects.create(username="alice")
    owned = OldConnection.objects.create(name="alices", owner=alice, client_id=1)
    shared = OldConnection.objects.create(name="shared", client_id=2)
    moment = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
    reports = {
        "U1000001": (owned, "alices"),
        "U3000003": (shared, "shared"),
        "U4000004": (None, ""),  # the settings' gateway
        "U5000005": (None, "removed-before"),  # a connection removed before 0017
    }
    for account, (row, name) in reports.items():
        OldReport.objects.create(
            broker="ibkr", external_id=account, connection=row, connection_name=name,
            source="tws", as_of=moment, applied_at=moment,
        )  # fmt: skip
    try:
        migrate(AFTER)
        yield alice.pk
    finally:
        migrate_to_latest()


def test_each_report_records_its_connections_owner(migrated):
    recorded = {row.external_id: (row.owner_id, row.owned) for row in AccountReport.objects.all()}
    assert recorded == {
        "U1000001": (migrated, True),
        "U3000003": (None, False),
        "U4000004": (None, False),
        "U5000005": (None, True),
    }
