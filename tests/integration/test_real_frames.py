"""Frames captured from a real IB Gateway, read by the real client through our source.

Our simulator writes the protocol as we understand it; these frames are what a gateway
wrote (`tests/data/ibkr-go/`: payloads captured at server version 200 and published
with the ibkr-go project's tests, MIT; account ids and two amounts sanitised by its
authors, layouts exact). The simulator only carries them: it sends the managed accounts,
the API start and the end markers, and each captured frame as the bytes it was.

Two captured details our own frames never had: a stock's position carries strike `0.0`
and an empty multiplier, and its portfolio row carries strike `0` and right `0`; an
account value may come with an empty currency (`AccountCode`).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from ibkr_sync.services import sync_positions
from ibkr_sync.testing import GatewaySimulator, Portfolio
from portfolio.models import Instrument, Position

pytestmark = pytest.mark.django_db

CAPTURE = json.loads(
    (Path(__file__).parents[1] / "data" / "ibkr-go" / "sv200_text_frames.json").read_text()
)
ACCOUNT = "DU9000001"


def captured(name: str) -> list[str]:
    return next(list(f["fields"]) for f in CAPTURE["frames"] if f["name"] == name)


def aapl_position() -> list[str]:
    """A position frame for the captured AAPL portfolio row: the captured position
    frame's exact layout, with the contract, quantity and average cost of that row."""
    fields = captured("position")
    row = captured("update_portfolio")
    fields[3:6] = [row[2], row[3], row[4]]  # conId, symbol, secType
    fields[12] = row[11]  # localSymbol
    fields[14] = row[13]  # position
    fields[15] = row[16]  # averageCost
    return fields


@pytest.fixture
def gateway(settings):
    with GatewaySimulator(Portfolio(accounts=[ACCOUNT], positions=[])) as simulator:
        settings.IBKR_HOST = "127.0.0.1"
        settings.IBKR_PORT = simulator.port
        settings.IBKR_CLIENT_ID = 17
        settings.IBKR_CONNECT_TIMEOUT = 3
        settings.IBKR_REQUEST_TIMEOUT = 5
        settings.IBKR_VALUES_TIMEOUT = 3
        simulator.set_faults(
            extra_frames=[captured("position"), aapl_position()],
            value_frames={
                ACCOUNT: [
                    captured("update_account_value"),
                    captured("update_portfolio"),
                    captured("update_account_time"),
                ]
            },
        )
        yield simulator


def test_the_captured_positions_are_read_exactly(gateway):
    result = sync_positions(trigger="command")

    assert result.accounts == [ACCOUNT]
    assert (result.created, result.errors) == (2, [])
    amzn = Position.objects.select_related("instrument").get(instrument__symbol="AMZN")
    assert (amzn.quantity, amzn.average_cost) == (Decimal("15"), Decimal("200.25"))
    assert amzn.instrument.external_id == "3691937"
    assert (amzn.instrument.exchange, amzn.instrument.currency) == ("NASDAQ", "USD")
    assert (amzn.instrument.local_symbol, amzn.instrument.trading_class) == ("AMZN", "NMS")
    # A stock's strike 0.0 and empty multiplier are no strike and no multiplier.
    stock = Instrument.objects.get(external_id="3691937")
    assert (stock.strike, stock.multiplier, stock.right, stock.expiry) == (None, None, "", None)
    aapl = Position.objects.get(instrument__external_id="265598")
    assert (aapl.quantity, aapl.average_cost) == (Decimal("-100"), Decimal("291.2660812"))


def test_the_captured_portfolio_row_values_its_position_exactly(gateway):
    result = sync_positions(trigger="command")

    outcome = result.account_values[ACCOUNT]
    assert outcome["status"] == "read", outcome
    assert outcome["positions_valued"] == 1  # AAPL: the one row the capture has
    aapl = Position.objects.get(instrument__external_id="265598")
    assert aapl.market_price == Decimal("291.6234436")
    assert aapl.market_value == Decimal("-29162.34")
    assert aapl.unrealized_pnl == Decimal("-35.74")
    assert aapl.realized_pnl == Decimal("-71.44")
    # The portfolio row's strike 0 and right 0 change nothing of the stock's instrument.
    assert Instrument.objects.get(external_id="265598").right == ""
    amzn = Position.objects.get(instrument__symbol="AMZN")
    assert amzn.market_value is None and amzn.valued_at is None
