"""The portfolio the bundled IB Gateway simulator starts with in the tests.

The `simulator` and `ibkr` fixtures (tests/conftest.py) serve it; everything here drives
the real IB client library (ib_insync, or ib_async when IBKR_CLIENT_LIBRARY says so)
over TCP, through our gateway adapter.
"""

from decimal import Decimal

from ibkr_sync.testing import Portfolio, SimPosition

ACCOUNT = "DU1111111"
OTHER = "DU2222222"
EMPTY = "DU3333333"


def sim_position(account=ACCOUNT, con_id=265598, symbol="AAPL", quantity="10", **fields):
    fields.setdefault("average_cost", Decimal("150.25"))
    fields.setdefault("exchange", "NASDAQ")
    return SimPosition(
        account=account, con_id=con_id, symbol=symbol, quantity=Decimal(quantity), **fields
    )


def starting_portfolio() -> Portfolio:
    return Portfolio(
        accounts=[ACCOUNT, OTHER, EMPTY],
        positions=[
            sim_position(),
            sim_position(con_id=76792991, symbol="TSLA", quantity="0.12345678",
                         average_cost=Decimal("242.123456")),
            sim_position(con_id=495512551, symbol="ES", sec_type="FUT", quantity="-2",
                         average_cost=Decimal("251234.5"), multiplier="50",
                         last_trade_date="20261218", local_symbol="ESZ6", exchange="CME"),
            sim_position(account=OTHER, con_id=700001, symbol="SPY", sec_type="OPT",
                         quantity="3", average_cost=Decimal("512.34"), multiplier="100",
                         last_trade_date="20261218", strike=Decimal("600"), right="C",
                         local_symbol="SPY   261218C00600000", trading_class="SPY",
                         exchange="SMART"),
        ],
    )  # fmt: skip


#: How the simulator writes its answers: the same bytes, cut into other TCP segments. A
#: "pause" is the test's own: seconds of silence around the messages it scripts.
SEGMENTATIONS = {
    "one write": {},
    "7-byte pieces": {"segment_size": 7},
    "one byte at a time": {"segment_size": 1},
    "48-byte pieces 5 ms apart": {"segment_size": 48, "segment_delay": 0.005},
    "frame by frame 10 ms apart": {"message_delay": 0.01},
    "0.3 s pause around the scripted messages": {"pause": 0.3},
}


def scripted(segmentation: dict, items: list) -> list:
    """Scripted items (frames, IB error codes), with the segmentation's pause around them."""
    pause = segmentation.get("pause")
    return [pause, *items, pause] if pause else list(items)


def segmented(segmentation: dict, **faults) -> dict:
    """Simulator faults, written the segmentation's way."""
    return {**{k: v for k, v in segmentation.items() if k != "pause"}, **faults}


def negotiated_version() -> int:
    """The server version a handshake with the simulator settles on: the lower of the
    client library's highest and the simulator's (176 for ib_insync, 178 for ib_async)."""
    import importlib

    from django.conf import settings

    from ibkr_sync.testing.simulator import MAX_SERVER_VERSION

    library = importlib.import_module(settings.IBKR_CLIENT_LIBRARY)
    return min(library.client.Client.MaxClientVersion, MAX_SERVER_VERSION)
