"""`sync_ibkr --json / --dry-run / --quiet`, the progress line, and the sync's log lines."""

import json
import logging
import threading
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from rest_framework.test import APIClient

from ibkr_sync.exceptions import ClientIdInUse, GatewayUnavailable
from ibkr_sync.management.commands import sync_ibkr as command_module
from ibkr_sync.models import SyncRun
from portfolio.models import Account, Instrument, Position
from tests.conftest import position

pytestmark = pytest.mark.django_db

VOLATILE = ("sync_run_id", "started_at", "finished_at")


def sync_ibkr(*args: str, stderr=None, **options) -> tuple[str, str]:
    out, err = StringIO(), stderr or StringIO()
    call_command("sync_ibkr", *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def database_state() -> dict:
    """Everything a sync may write, as plain values."""
    return {
        "accounts": list(Account.objects.order_by("pk").values()),
        "instruments": list(Instrument.objects.order_by("pk").values()),
        "positions": list(Position.objects.order_by("pk").values()),
        "runs": list(SyncRun.objects.order_by("pk").values()),
    }


def stable(body: dict) -> dict:
    return {key: value for key, value in body.items() if key not in VOLATILE}


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


# --- --json -------------------------------------------------------------------------------


def test_json_prints_exactly_what_the_api_answers(use_gateway, syncer):
    out, err = sync_ibkr("--json")
    from_command = json.loads(out)
    # The same sync through the API, from the same starting point.
    Position.objects.all().delete()
    Instrument.objects.all().delete()
    Account.objects.all().delete()
    client = APIClient()
    # The command is the operator's: as the API answers one who may view positions too.
    syncer.user_permissions.add(Permission.objects.get(codename="view_position"))
    client.force_authenticate(syncer)
    from_api = client.post("/portfolio/sync/ibkr").json()

    assert err == ""
    assert out.count("\n") == 1  # one line, as cron mails and `jq` read it
    assert list(from_command) == list(from_api)  # same keys, same order
    assert stable(from_command) == stable(from_api)
    assert (from_command["created"], from_command["dry_run"]) == (2, False)
    assert SyncRun.objects.get(pk=from_command["sync_run_id"]).trigger == "command"


def test_json_failure_prints_the_api_error_shape_and_keeps_the_exit_code(use_gateway):
    use_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at gw:4002")
    out = StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--json", stdout=out, stderr=StringIO())

    assert raised.value.returncode == 3
    assert json.loads(out.getvalue()) == {
        "status": "error",
        "code": "gateway_unavailable",
        "detail": "Cannot connect to the IB gateway at gw:4002",
    }


def test_json_and_quiet_do_not_mix(use_gateway):
    with pytest.raises(CommandError, match="not allowed"):
        sync_ibkr("--json", "--quiet")


# --- --dry-run ----------------------------------------------------------------------------


def test_dry_run_reports_the_changes_and_writes_nothing(use_gateway):
    sync_ibkr()
    use_gateway.accounts = ("U1111111", "U2222222")
    use_gateway.positions = [
        position(quantity="11"),  # updated
        position(account="U2222222", con_id=8314, symbol="IBM"),  # new account, instrument
    ]  # TSLA is gone: closed
    before = database_state()

    out, err = sync_ibkr("--dry-run")

    assert out.splitlines() == [
        "IBKR sync dry run (nothing written): 2 positions in 2 account(s): 1 created, "
        "1 updated, 0 unchanged, 0 reopened, 1 closed, 0 errors",
        "  updated   U1111111   AAPL (265598): 10 -> 11",
        "  closed    U1111111   TSLA (76792991): 0.5 -> closed",
        "  created   U2222222   IBM (8314): new -> 10",
    ]
    assert err == ""
    assert database_state() == before


def test_dry_run_json_has_no_sync_run(use_gateway):
    out, _ = sync_ibkr("--dry-run", "--json")

    body = json.loads(out)
    assert (body["dry_run"], body["sync_run_id"], body["created"]) == (True, None, 2)
    assert body["changes"] == [
        {"kind": "created", "account": "U1111111", "con_id": 265598, "symbol": "AAPL",
         "quantity_before": None, "quantity_after": "10",
         "average_cost_before": None, "average_cost_after": "150.25"},
        {"kind": "created", "account": "U1111111", "con_id": 76792991, "symbol": "TSLA",
         "quantity_before": None, "quantity_after": "0.5",
         "average_cost_before": None, "average_cost_after": "242.1"},
    ]  # fmt: skip
    assert database_state() == {"accounts": [], "instruments": [], "positions": [], "runs": []}


def test_dry_run_shows_a_change_of_average_cost_alone(use_gateway):
    sync_ibkr()
    use_gateway.positions = [
        position(average_cost="151"),
        position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost=None),
    ]

    text, _ = sync_ibkr("--dry-run")
    body = json.loads(sync_ibkr("--dry-run", "--json")[0])

    assert text.splitlines()[1:] == [
        "  updated   U1111111   AAPL (265598): 10 -> 10, average cost 150.25 -> 151",
        "  updated   U1111111   TSLA (76792991): 0.5 -> 0.5, average cost 242.1 -> none",
    ]
    assert [
        (c["symbol"], c["quantity_before"], c["quantity_after"],
         c["average_cost_before"], c["average_cost_after"])
        for c in body["changes"]
    ] == [("AAPL", "10", "10", "150.25", "151"), ("TSLA", "0.5", "0.5", "242.1", None)]  # fmt: skip


def test_a_failed_dry_run_leaves_no_record_and_keeps_the_exit_code(use_gateway):
    use_gateway.error = ClientIdInUse("client id 1 is in use", ib_code=326)

    with pytest.raises(CommandError) as raised:
        sync_ibkr("--dry-run")

    assert raised.value.returncode == 7
    assert not SyncRun.objects.exists()


def test_dry_run_waits_for_no_one_while_a_sync_runs(use_gateway):
    running = SyncRun.objects.create(trigger="api", status="running", pid=None)

    with pytest.raises(CommandError) as raised:
        sync_ibkr("--dry-run")

    assert raised.value.returncode == 5
    assert "dry run" in str(raised.value)
    assert list(SyncRun.objects.values_list("pk", flat=True)) == [running.pk]
    assert use_gateway.calls == []


# --- --quiet ------------------------------------------------------------------------------


def test_quiet_prints_nothing_on_success(use_gateway):
    assert sync_ibkr("--quiet") == ("", "")
    assert Position.objects.open().count() == 2


def test_quiet_still_fails_loudly(use_gateway):
    use_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at gw:4002")
    out = StringIO()

    with pytest.raises(CommandError, match="Cannot connect") as raised:
        call_command("sync_ibkr", "--quiet", stdout=out, stderr=StringIO())

    assert raised.value.returncode == 3
    assert out.getvalue() == ""


# --- progress -----------------------------------------------------------------------------


def test_progress_is_drawn_on_a_terminal_and_cleared(use_gateway, monkeypatch):
    monkeypatch.setattr(command_module._TerminalProgress, "DELAY", 0)
    terminal = Terminal()

    out, err = sync_ibkr(stderr=terminal)

    assert "Writing 2 positions to the database..." in err
    assert err.endswith("\r\033[K")  # the line is wiped before the summary stays
    assert out.startswith("IBKR sync #")


def test_no_progress_when_stderr_is_not_a_terminal_or_quiet(use_gateway, monkeypatch):
    monkeypatch.setattr(command_module._TerminalProgress, "DELAY", 0)

    assert sync_ibkr()[1] == ""
    assert sync_ibkr("--quiet", stderr=Terminal()) == ("", "")


class WatchedTerminal(Terminal):
    """A terminal that says when a line was drawn on it."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if text.replace("\r\033[K", ""):
            self.drawn.set()
        return written


def test_a_long_write_shows_the_progress_line_once_the_delay_has_passed(use_gateway):
    """The write reports only its start, before the delay is up: it still gets its line."""
    terminal = WatchedTerminal()

    def slow_write(execute, sql, params, many, context):
        # Writing the portfolio lasts until the line is drawn (at most 3 s).
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE")) and '"portfolio_' in sql:
            terminal.drawn.wait(3)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(slow_write):
        out, err = sync_ibkr(stderr=terminal)

    assert terminal.drawn.is_set()
    assert err == "\r\033[KWriting 2 positions to the database...\r\033[K"
    assert out.startswith("IBKR sync #")


def test_a_quick_sync_draws_nothing_even_on_a_terminal(use_gateway):
    _, err = sync_ibkr(stderr=Terminal())

    assert err == ""


# --- log lines ----------------------------------------------------------------------------


def test_one_structured_log_line_at_start_and_at_finish(use_gateway, caplog):
    caplog.set_level(logging.INFO, logger="ibkr_sync")
    use_gateway.accounts = ("U1111111", "U2222222")

    sync_ibkr("--account", "U1111111")

    lines = [r.getMessage() for r in caplog.records if r.name == "ibkr_sync.services"]
    assert len(lines) == 2, lines
    run = SyncRun.objects.get()
    assert lines[0] == (
        f"IBKR sync started run={run.pk} trigger=command account=U1111111 dry_run=false"
    )
    assert lines[1].startswith(
        f"IBKR sync finished run={run.pk} trigger=command account=U1111111 dry_run=false "
        "status=success accounts=U1111111 processed=2 created=2 updated=0 unchanged=0 "
        "reopened=0 closed=0 errors=0 duration="
    )
    assert lines[1].endswith("s")


def test_a_failure_is_logged_with_the_gateway_error_code(use_gateway, caplog):
    caplog.set_level(logging.INFO, logger="ibkr_sync")
    use_gateway.error = ClientIdInUse("client id 1 is in use", ib_code=326)

    with pytest.raises(CommandError):
        sync_ibkr()

    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1
    message = failed[0].getMessage()
    assert "status=failed code=client_id_in_use ib_code=326 duration=" in message
    assert message.endswith(": client id 1 is in use")
    assert "account=all" in message


def test_verbosity_2_shows_the_sync_log_on_the_commands_own_stderr(use_gateway):
    logger = logging.getLogger("ibkr_sync")
    before = (list(logger.handlers), logger.level)

    out, err = sync_ibkr(verbosity=2)

    lines = err.splitlines()
    assert len(lines) == 2, err
    assert "INFO ibkr_sync.services: IBKR sync started run=" in lines[0]
    assert "INFO ibkr_sync.services: IBKR sync finished run=" in lines[1]
    assert out.startswith("IBKR sync #")
    assert (list(logger.handlers), logger.level) == before, "put back as it was"


def test_verbosity_2_shows_the_failure_as_logged_then_the_error(use_gateway):
    use_gateway.error = ClientIdInUse("client id 1 is in use", ib_code=326)
    err = StringIO()

    with pytest.raises(CommandError):
        call_command("sync_ibkr", verbosity=2, stdout=StringIO(), stderr=err)

    assert "IBKR sync failed run=" in err.getvalue()
    assert "code=client_id_in_use" in err.getvalue()


def test_below_verbosity_2_the_log_stays_off_the_commands_stderr(use_gateway, caplog):
    caplog.set_level(logging.INFO, logger="ibkr_sync")

    _, err = sync_ibkr()

    assert err == ""
    assert any("IBKR sync finished" in r.getMessage() for r in caplog.records), (
        "log handlers other than the console still get the records"
    )
