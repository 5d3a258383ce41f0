"""The names host code and settings know the TWS source and its records by.

`IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"` (the default) and imports of
`GatewaySnapshot` and its kin keep working: the source is `ibkr_sync.sources.tws`, the
records it returns are the source-neutral ones of `ibkr_sync.snapshot`.
"""

from .snapshot import AccountValues as GatewayAccountValues
from .snapshot import PositionRecord as GatewayPosition
from .snapshot import PositionValue as GatewayPositionValue
from .snapshot import Snapshot as GatewaySnapshot
from .sources.tws import LIBRARY_RECORD, GatewayConfig, IbkrGateway, TwsSource

__all__ = [
    "LIBRARY_RECORD",
    "GatewayAccountValues",
    "GatewayConfig",
    "GatewayPosition",
    "GatewayPositionValue",
    "GatewaySnapshot",
    "IbkrGateway",
    "TwsSource",
]
