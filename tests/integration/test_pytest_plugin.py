"""The pytest plugin a host's own suite uses: its fixture serves a portfolio from the
simulator and points the app at it; syncs then go through the real IB client."""

from decimal import Decimal

import pytest

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.testing import Portfolio, SimPosition
from portfolio.models import Position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def test_the_fixture_serves_its_portfolio(ibkr_simulator, ibkr_portfolio):
    result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
    assert result.processed == len(ibkr_portfolio.positions) > 0
    assert Position.objects.count() == len(ibkr_portfolio.positions)


@pytest.fixture
def ibkr_portfolio():
    """A host overrides the portfolio in its conftest, as here."""
    return Portfolio(
        accounts=["DU7777777"],
        positions=[
            SimPosition(account="DU7777777", con_id=8314, symbol="IBM", quantity=Decimal("3.5"),
                        average_cost=Decimal("101.25"))
        ],
    )  # fmt: skip


def test_a_portfolio_of_the_hosts_own(ibkr_simulator, client, admin_user):
    client.force_login(admin_user)
    assert client.post("/portfolio/sync/ibkr").json()["created"] == 1
    (position,) = Position.objects.all()
    assert (position.instrument.symbol, position.quantity) == ("IBM", Decimal("3.5"))
    ibkr_simulator.remove_position("DU7777777", 8314)
    assert sync_positions(trigger=SyncRun.Trigger.COMMAND).closed == 1
