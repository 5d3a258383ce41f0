"""A snapshot's moment (`as_of`) is what its values are stored as of: a position's
`valued_at` and an account snapshot's `taken_at`; the rows' sync stamps (`last_synced_at`,
a cash row's `synced_at`) stay the write's own time. At the service boundary, with a
fake source."""

import dataclasses
import datetime as dt
from decimal import Decimal

import pytest

from ibkr_sync.services import sync_positions
from ibkr_sync.snapshot import AccountValues, PositionValue, Snapshot
from portfolio.models import AccountSnapshot, CashBalance, Position
from tests.conftest import FakeGateway, position

pytestmark = pytest.mark.django_db

READ = dt.datetime(2024, 1, 2, 15, 30, tzinfo=dt.UTC)
VALUED = READ + dt.timedelta(seconds=4)


class DatedSource(FakeGateway):
    """A source whose snapshot and account values carry the moments they describe."""

    def __init__(self, *args, values_as_of=VALUED, **kwargs):
        super().__init__(*args, **kwargs)
        self.values_as_of = values_as_of

    def fetch_positions(self, account_id=None):
        snapshot = super().fetch_positions(account_id)
        values = {
            account: AccountValues(
                account,
                as_of=self.values_as_of,
                base_currency="USD",
                totals={"net_liquidation": Decimal("1000.5")},
                cash={"USD": Decimal(7)},
                positions={
                    p.con_id: PositionValue(p.con_id, p.quantity, Decimal(2), None, None, None)
                    for p in snapshot.positions
                    if p.account == account
                },
            )
            for account in snapshot.accounts
        }
        return dataclasses.replace(
            snapshot, values_read=True, account_values=values, source="fake", as_of=READ
        )


def sync(source):
    return sync_positions(trigger="command", gateway=source)


def test_values_are_stored_as_of_the_moment_they_describe():
    result = sync(DatedSource([position()]))

    held = Position.objects.get()
    assert held.valued_at == VALUED
    assert AccountSnapshot.objects.get().taken_at == VALUED
    # What a sync did stays the sync's own time.
    assert held.last_synced_at >= result.started_at > VALUED
    assert CashBalance.objects.get().synced_at >= result.started_at


def test_values_without_a_moment_of_their_own_take_the_snapshots():
    sync(DatedSource([position()], values_as_of=None))

    assert Position.objects.get().valued_at == READ
    assert AccountSnapshot.objects.get().taken_at == READ


def test_a_snapshot_without_a_moment_is_as_of_its_write():
    source = DatedSource([position()], values_as_of=None)
    plain_fetch = source.fetch_positions
    source.fetch_positions = lambda account_id=None: dataclasses.replace(
        plain_fetch(account_id), as_of=None
    )

    result = sync(source)

    assert result.started_at <= Position.objects.get().valued_at <= result.finished_at
    assert AccountSnapshot.objects.get().taken_at == Position.objects.get().valued_at


def test_a_snapshots_moment_is_an_aware_datetime():
    with pytest.raises(ValueError, match="aware"):
        Snapshot((), (), as_of=dt.datetime(2024, 1, 2, 15, 30))
