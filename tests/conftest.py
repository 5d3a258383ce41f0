"""Shared fixtures: users with and without the sync permission, a fake gateway, records."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from ibkr_sync.gateway import GatewayPosition, GatewaySnapshot

# What a host's tests get from the installed distribution (entry point pytest11); this
# source tree is not installed, so its fixtures are taken in here.
from ibkr_sync.testing.pytest_plugin import ibkr_portfolio, ibkr_simulator  # noqa: F401

# --- the `processes` marker holds: `make test-fast` leaves out every test that starts one ---

# Audit events of starting a program (subprocess, asyncio's subprocesses, os.system, ...).
_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork"}
)
# The running test, if it may start processes; what an unmarked one started.
_running: dict[str, Any] = {"test": None, "allowed": True, "started": []}


def _audit(event: str, args: tuple) -> None:
    if event in _PROCESS_EVENTS and not _running["allowed"]:
        _running["started"].append(f"{event} {str(args[1] if len(args) > 1 else args)[:120]}")


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    marked = any(item.get_closest_marker(name) for name in ("processes", "browser"))
    _running.update(test=item.nodeid, allowed=marked, started=[])
    try:
        return (yield)
    finally:
        _running.update(test=None, allowed=True, started=[])


# --- a second run on another database: only the tests a database can change ---------------

#: The fixtures through which a test reaches the database (pytest-django refuses any
#: other access).
_DATABASE_FIXTURES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_reset_sequences",
        "django_db_serialized_rollback",
        "live_server",
    }
)


def uses_a_database(item: pytest.Item) -> bool:
    """Whether a test can reach a database: through pytest-django (its marker, or a
    fixture that needs one), or through a process it starts (the `processes` and
    `browser` markers: an unmarked test that starts one fails). Every other test runs
    the same whatever DATABASE_URL names."""
    if any(item.get_closest_marker(name) for name in ("django_db", "processes", "browser")):
        return True
    return bool(_DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """IBKR_TESTS_DATABASE_ONLY=1 (CI's run on its second database) leaves out what ran,
    the same, on the first: the tests that reach no database, and the browser tests (a
    page's layout and scripts in Chromium; the views behind them, their queries
    included, are the admin tests', which run on every database)."""
    if os.environ.get("IBKR_TESTS_DATABASE_ONLY") != "1":
        return
    kept = [
        item for item in items if uses_a_database(item) and not item.get_closest_marker("browser")
    ]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture(autouse=True)
def _processes_are_marked():
    """A test that starts a process (in its fixtures too) must be marked `processes`."""
    yield
    if _running["started"]:
        pytest.fail(
            "started a process without the `processes` marker (make test-fast would run "
            "it): " + "; ".join(_running["started"][:3]),
            pytrace=False,
        )


def position(
    account: str = "U1111111",
    con_id: int = 265598,
    symbol: str = "AAPL",
    quantity: str | Decimal = "10",
    average_cost: str | Decimal | None = "150.25",
    **fields: Any,
) -> GatewayPosition:
    """A gateway position record with stock defaults; override any field."""
    fields.setdefault("sec_type", "STK")
    fields.setdefault("currency", "USD")
    fields.setdefault("exchange", "NASDAQ")
    return GatewayPosition(
        account=account,
        con_id=con_id,
        symbol=symbol,
        quantity=Decimal(quantity),
        average_cost=None if average_cost is None else Decimal(average_cost),
        **fields,
    )


class FakeGateway:
    """Stands in for IbkrGateway at the adapter boundary in fast service tests."""

    def __init__(self, positions=(), accounts=("U1111111",), error: Exception | None = None):
        self.accounts = tuple(accounts)
        self.positions = list(positions)
        self.error = error
        self.calls: list[str | None] = []
        self.entered = threading.Event()
        self.release: threading.Event | None = None
        # {account: reason}: the values were asked for, and these could not be read.
        self.values_missing: dict[str, str] | None = None

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot:
        self.calls.append(account_id)
        self.entered.set()
        if self.release is not None:
            self.release.wait(10)
        if self.error is not None:
            raise self.error
        if account_id is not None:
            from ibkr_sync.exceptions import UnknownAccount

            if account_id not in self.accounts:
                raise UnknownAccount(f"Account {account_id} is not managed by the gateway.")
            return GatewaySnapshot(
                accounts=(account_id,),
                positions=tuple(p for p in self.positions if p.account == account_id),
                managed_accounts=self.accounts,
                **self._values((account_id,)),
            )
        return GatewaySnapshot(
            accounts=self.accounts,
            positions=tuple(self.positions),
            managed_accounts=self.accounts,
            **self._values(self.accounts),
        )

    def _values(self, accounts) -> dict:
        if self.values_missing is None:
            return {}
        missing = {a: r for a, r in self.values_missing.items() if a in accounts}
        return {"values_read": True, "values_missing": missing}


@pytest.fixture
def fake_gateway() -> FakeGateway:
    return FakeGateway(
        positions=[
            position(),
            position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost="242.1"),
        ]
    )


_current_fake: list[FakeGateway] = []


def current_fake_gateway(**_options: Any) -> FakeGateway:
    """IBKR_SYNC_GATEWAY_CLASS for the tests: the fake gateway of the running test."""
    return _current_fake[-1]


@contextlib.contextmanager
def reading_from(gateway: Any, settings: Any) -> Iterator[Any]:
    """Every entry point (API, command, admin) reads from `gateway` meanwhile, through the
    setting a host's own tests use (IBKR_SYNC_GATEWAY_CLASS)."""
    _current_fake.append(gateway)
    settings.IBKR_SYNC_GATEWAY_CLASS = "tests.conftest.current_fake_gateway"
    try:
        yield gateway
    finally:
        _current_fake.remove(gateway)


@contextlib.contextmanager
def synced_rows_deleted_afterwards() -> Iterator[None]:
    """Everything syncs write is deleted at the end: how a test gives each hypothesis
    example a fresh start. (Not a rolled-back transaction: the sync refuses to run inside
    one, as its record of the attempt would go with the rollback.)"""
    from ibkr_sync import conf
    from ibkr_sync.models import PositionChange, SyncRun

    try:
        yield
    finally:
        for model in (
            PositionChange,
            conf.cash_balance_model(),
            conf.account_snapshot_model(),
            conf.position_model(),
            conf.instrument_model(),
            conf.account_model(),
            SyncRun,
        ):
            model.objects.all().delete()


@pytest.fixture
def use_gateway(settings, fake_gateway):
    """Make every entry point (API, command, admin) read from `fake_gateway`."""
    with reading_from(fake_gateway, settings):
        yield fake_gateway


@pytest.fixture
def syncer(django_user_model):
    user = django_user_model.objects.create_user("syncer", password="pw-syncer-123")
    user.user_permissions.add(Permission.objects.get(codename="run_sync"))
    return user


@pytest.fixture
def viewer(django_user_model):
    return django_user_model.objects.create_user("viewer", password="pw-viewer-123")


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts with an empty cache: no sync throttle count carries over."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # The default hasher is deliberately slow; tests log users in many times.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def simulator():
    """The bundled IB Gateway simulator on a free port, serving the starting portfolio."""
    from ibkr_sync.testing import GatewaySimulator
    from tests.integration.conftest import starting_portfolio

    with GatewaySimulator(starting_portfolio()) as sim:
        yield sim


@pytest.fixture
def ibkr(settings, simulator):
    """Point the app at the simulator, with short timeouts so failure tests stay fast."""
    settings.IBKR_HOST = "127.0.0.1"
    settings.IBKR_PORT = simulator.port
    settings.IBKR_CLIENT_ID = 17
    settings.IBKR_CONNECT_TIMEOUT = 3
    settings.IBKR_REQUEST_TIMEOUT = 3
    return simulator


@pytest.fixture
def task_queue(settings):
    """IBKR_SYNC_TASK_QUEUE=celery with a real broker (Redis, CELERY_BROKER_URL's database,
    emptied): the client to read what was sent (`tests.queue_broker.sent`)."""
    from tests.queue_broker import broker_client

    client = broker_client()
    settings.IBKR_SYNC_TASK_QUEUE = "celery"
    yield client
    client.flushdb()
    client.close()
