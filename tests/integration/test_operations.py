"""The operator's options end to end: real IB client over TCP, simulator, real database."""

import json
from io import StringIO

import pytest
from django.core.management import call_command

from ibkr_sync.management.commands import sync_ibkr as command_module
from ibkr_sync.testing import generate_portfolio
from portfolio.models import Account, Instrument, Position
from tests.integration.conftest import ACCOUNT, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


def sync_ibkr(*args, stderr=None) -> str:
    out = StringIO()
    call_command("sync_ibkr", *args, stdout=out, stderr=stderr or StringIO())
    return out.getvalue()


def database_state():
    return (
        list(Account.objects.order_by("pk").values()),
        list(Instrument.objects.order_by("pk").values()),
        list(Position.objects.order_by("pk").values()),
    )


def test_dry_run_against_the_gateway_reports_changes_and_writes_nothing(ibkr):
    sync_ibkr("--quiet")
    ibkr.remove_position(ACCOUNT, 76792991)  # TSLA sold
    ibkr.upsert_position(sim_position(quantity="15"))  # more AAPL
    ibkr.upsert_position(sim_position(con_id=8314, symbol="IBM", quantity="3"))
    before = database_state()

    body = json.loads(sync_ibkr("--dry-run", "--json"))

    assert body["dry_run"] is True
    assert body["sync_run_id"] is None
    assert (body["created"], body["updated"], body["closed"], body["unchanged"]) == (1, 1, 1, 2)
    assert database_state() == before
    # A real sync afterwards makes exactly those changes.
    after = json.loads(sync_ibkr("--json"))
    assert {k: after[k] for k in ("created", "updated", "closed", "unchanged")} == {
        "created": 1, "updated": 1, "closed": 1, "unchanged": 2,
    }  # fmt: skip


def test_progress_counts_positions_as_the_gateway_sends_them(ibkr, monkeypatch):
    monkeypatch.setattr(command_module._TerminalProgress, "DELAY", 0)
    monkeypatch.setattr(command_module._TerminalProgress, "INTERVAL", 0)
    ibkr.set_portfolio(generate_portfolio(300, accounts=[ACCOUNT], seed=3))
    terminal = Terminal()

    out = sync_ibkr(stderr=terminal)

    shown = terminal.getvalue()
    assert "Reading positions from the IB gateway: 1 received" in shown
    assert "Reading positions from the IB gateway: 300 received" in shown
    assert "Writing 300 positions to the database..." in shown
    assert shown.endswith("\r\033[K")
    assert "300 positions in" in out
