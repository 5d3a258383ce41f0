"""Each account's newest snapshot (`AccountReport`): which is older is decided by the
moment the snapshots describe, per account; an equal moment is not older.

A source of the host's that gives its snapshot a fixed moment (`Snapshot.as_of`), as a
statement of a past day does; the two-gateway cases over TCP are in
tests/integration/test_connections.py.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from ibkr_sync.models import AccountReport, SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.snapshot import AccountValues, Snapshot
from portfolio.models import Account, Position
from tests.conftest import position

pytestmark = pytest.mark.django_db

MORNING = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
NOON = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


class Statement:
    """A source whose snapshot describes a fixed moment."""

    def __init__(self, as_of, *positions, accounts=("U1111111",)):
        self.snapshot = Snapshot(
            accounts=tuple(accounts), positions=positions, source="statement", as_of=as_of
        )

    def fetch_positions(self, account_id=None):
        return self.snapshot


def sync(source, **options):
    return sync_positions(trigger="command", gateway=source, **options)


def test_the_same_moment_again_is_applied_not_refused():
    sync(Statement(NOON, position(quantity="10")))
    again = sync(Statement(NOON, position(quantity="11")))
    assert again.accounts_refused == {} and again.updated == 1
    report = AccountReport.objects.get()
    assert (report.as_of, report.source, report.sync_run_id) == (
        NOON,
        "statement",
        again.sync_run_id,
    )


def test_an_older_moment_is_refused_per_account_and_the_others_are_applied():
    sync(Statement(NOON, position(quantity="10")))
    older = sync(
        Statement(
            MORNING,
            position(quantity="5"),
            position(account="U2222222", con_id=42, symbol="NEW"),
            accounts=("U1111111", "U2222222"),
        )
    )
    assert list(older.accounts_refused) == ["U1111111"]
    assert "as of 2026-12-01 12:00:00.000 UTC" in older.accounts_refused["U1111111"]
    assert "(2026-12-01 09:00:00.000 UTC)" in older.accounts_refused["U1111111"]
    assert older.accounts == ["U2222222"] and (older.processed, older.created) == (1, 1)
    assert Position.objects.get(account__external_id="U1111111").quantity == Decimal("10")
    assert SyncRun.objects.get(pk=older.sync_run_id).accounts_refused == older.accounts_refused
    assert dict(AccountReport.objects.values_list("external_id", "as_of")) == {
        "U1111111": NOON,
        "U2222222": MORNING,
    }


def test_a_refused_account_keeps_every_stamp_and_its_errors_are_not_counted():
    sync(Statement(NOON, position(quantity="10")))
    synced_at = Account.objects.get().last_synced_at
    older = sync(Statement(MORNING, position(quantity="5"), position(con_id=-1, symbol="BAD")))
    assert older.accounts_refused and older.errors == [] and older.processed == 0
    assert Account.objects.get().last_synced_at == synced_at
    assert Position.objects.get().last_synced_at == synced_at


def test_a_source_without_a_moment_is_taken_as_of_the_write():
    first = sync(Statement(None, position()))
    second = sync(Statement(None, position()))
    assert first.accounts_refused == second.accounts_refused == {}
    report = AccountReport.objects.get()
    assert report.as_of == report.applied_at
    assert report.sync_run_id == second.sync_run_id


def test_positions_read_before_values_are_as_old_as_the_positions():
    """A TWS read takes the positions first and each account's values after: a snapshot
    whose values describe a later moment than its positions is, for its positions, as old
    as they are. A newer report of the account's positions (another login, read between
    the two) is not overwritten by these older positions, and refuses them."""
    between = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
    sync(Statement(between, position(quantity="20")))
    slow = Snapshot(
        accounts=("U1111111",),
        positions=(position(quantity="5"),),
        source="tws",
        as_of=MORNING,  # the positions: before the other login's read
        values_read=True,
        account_values={"U1111111": AccountValues("U1111111", as_of=NOON, base_currency="USD")},
    )
    older = sync(_Fixed(slow))
    assert list(older.accounts_refused) == ["U1111111"]
    assert Position.objects.get().quantity == Decimal("20")
    assert AccountReport.objects.get().as_of == between


def test_an_account_is_as_new_as_the_oldest_part_written():
    """Positions read before values: the report's moment is the positions', so a later
    read of positions alone (values off) that is newer than them is applied."""
    slow = Snapshot(
        accounts=("U1111111",),
        positions=(position(quantity="5"),),
        source="tws",
        as_of=MORNING,
        values_read=True,
        account_values={"U1111111": AccountValues("U1111111", as_of=NOON, base_currency="USD")},
    )
    sync(_Fixed(slow))
    assert AccountReport.objects.get().as_of == MORNING
    newer = sync(Statement(dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC), position(quantity="7")))
    assert newer.accounts_refused == {}
    assert Position.objects.get().quantity == Decimal("7")


class _Fixed:
    def __init__(self, snapshot):
        self.snapshot = snapshot

    def fetch_positions(self, account_id=None):
        return self.snapshot
