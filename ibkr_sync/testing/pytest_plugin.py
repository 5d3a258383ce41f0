"""A pytest plugin for a host project's own tests: sync from the bundled IB Gateway
simulator, with no broker, no TWS and no network.

Installing django-ibkr-sync registers it (entry point `pytest11`); without the entry
point, add `pytest_plugins = ["ibkr_sync.testing.pytest_plugin"]` to a conftest. It
needs pytest-django.

Fixtures:

- ``ibkr_portfolio``: the ``Portfolio`` the simulator serves; the bundled sample unless
  a conftest overrides it (``Portfolio(accounts=[...], positions=[SimPosition(...)])``).
- ``ibkr_simulator``: the simulator, running on a free loopback port for the test, with
  the app's settings pointed at it (IBKR_HOST, IBKR_PORT, a client id of its own, short
  timeouts). ``sync_positions(...)``, ``manage.py sync_ibkr`` and
  ``POST /portfolio/sync/ibkr`` then read from it through the real IB client. Change
  what it reports between syncs with ``set_positions``, ``upsert_position``,
  ``remove_position``, its values with ``set_cash``, ``set_exchange_rate``,
  ``set_market_price`` and ``move_prices``; inject faults with ``set_faults`` (values
  faults per account too: ``values_hang``, ``values_error``, ``value_edits``, ...).

Example::

    def test_my_receiver_hears_new_positions(ibkr_simulator, django_capture_on_commit_callbacks):
        with django_capture_on_commit_callbacks(execute=True):
            sync_positions(trigger="command")
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

#: The client id the fixture's syncs use (apart from a developer's usual 1).
CLIENT_ID = 971


@pytest.fixture
def ibkr_portfolio() -> Any:
    from . import load_sample_portfolio

    return load_sample_portfolio()


@pytest.fixture
def ibkr_simulator(request: pytest.FixtureRequest, ibkr_portfolio: Any) -> Iterator[Any]:
    from . import GatewaySimulator

    settings = request.getfixturevalue("settings")  # pytest-django's
    with GatewaySimulator(ibkr_portfolio) as simulator:
        settings.IBKR_HOST = "127.0.0.1"
        settings.IBKR_PORT = simulator.port
        settings.IBKR_CLIENT_ID = CLIENT_ID
        settings.IBKR_CONNECT_TIMEOUT = 5
        settings.IBKR_REQUEST_TIMEOUT = 10
        settings.IBKR_VALUES_TIMEOUT = 3
        settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
        yield simulator
