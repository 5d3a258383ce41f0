"""Fixtures for the fault matrix: the simulator with short timeouts, and the database state.

Timeouts are short (1 s) so that faults which wait for one keep the suite fast; the
bounds asserted are the ones a deployment relies on: an error within the configured
timeout plus one second.
"""

from __future__ import annotations

import pytest

from portfolio.models import Instrument, Position

CONNECT_TIMEOUT = 1.0
REQUEST_TIMEOUT = 1.0


@pytest.fixture
def ibkr(settings, simulator):
    settings.IBKR_HOST = "127.0.0.1"
    settings.IBKR_PORT = simulator.port
    settings.IBKR_CLIENT_ID = 23
    settings.IBKR_CONNECT_TIMEOUT = CONNECT_TIMEOUT
    settings.IBKR_REQUEST_TIMEOUT = REQUEST_TIMEOUT
    return simulator


@pytest.fixture
def sync_client(api_client, syncer):
    api_client.force_authenticate(syncer)
    return api_client


def database_state() -> list[tuple]:
    """Every position and instrument as stored: equal before and after a failed sync."""
    positions = sorted(
        Position.objects.values_list(
            "account__external_id",
            "instrument__external_id",
            "quantity",
            "average_cost",
            "cost_basis",
            "opened_at",
            "last_synced_at",
            "closed_at",
        )
    )
    instruments = sorted(Instrument.objects.values_list("external_id", "symbol", "updated_at"))
    return [*positions, *instruments]
