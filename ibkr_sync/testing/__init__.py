"""Test tooling: an IB Gateway simulator that the real ib_insync client connects to.

``GatewaySimulator`` speaks the TWS API socket protocol; ``SimPosition``/``Portfolio``
describe what it reports; ``wire.WireClient`` is a raw-socket client for tests that must
not depend on ib_insync. Everything here is standard-library only.
"""

from .portfolio import (
    SAMPLE_PORTFOLIO_PATH,
    SEC_TYPES,
    Portfolio,
    PortfolioError,
    SimPosition,
    generate_portfolio,
    load_portfolio,
    load_sample_portfolio,
    portfolio_from_dict,
    save_portfolio,
)
from .simulator import (
    DUPLICATE_CLIENT_ID_MESSAGE,
    MAX_SERVER_VERSION,
    MIN_SERVER_VERSION,
    Faults,
    GatewaySimulator,
    SimulatorThread,
)
from .wire import WireClient, WireError

__all__ = [
    "DUPLICATE_CLIENT_ID_MESSAGE",
    "MAX_SERVER_VERSION",
    "MIN_SERVER_VERSION",
    "SAMPLE_PORTFOLIO_PATH",
    "SEC_TYPES",
    "Faults",
    "GatewaySimulator",
    "Portfolio",
    "PortfolioError",
    "SimPosition",
    "SimulatorThread",
    "WireClient",
    "WireError",
    "generate_portfolio",
    "load_portfolio",
    "load_sample_portfolio",
    "portfolio_from_dict",
    "save_portfolio",
]
