"""`manage.py sync_ibkr`: in-process with `call_command`, and as cron runs it (a subprocess)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from ibkr_sync.exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    IncompleteSnapshot,
)
from ibkr_sync.models import SyncRun
from portfolio.models import Position
from tests.conftest import position

PROJECT_DIR = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"^IBKR sync #(?P<id>\d+): (?P<processed>\d+) positions in (?P<accounts>\d+) account\(s\): "
    r"(?P<created>\d+) created, (?P<updated>\d+) updated, (?P<unchanged>\d+) unchanged, "
    r"(?P<reopened>\d+) reopened, (?P<closed>\d+) closed, (?P<errors>\d+) errors$"
)


def sync_ibkr(*args: str, **options) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("sync_ibkr", *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


# --- in process, against the fake gateway ----------------------------------------------------


@pytest.mark.django_db
def test_success_prints_one_summary_line_on_stdout_only(use_gateway):
    out, err = sync_ibkr()

    lines = out.splitlines()
    assert len(lines) == 1, out
    summary = SUMMARY.match(lines[0])
    assert summary, lines[0]
    assert summary.groupdict() == {
        "id": summary["id"], "processed": "2", "accounts": "1", "created": "2", "updated": "0",
        "unchanged": "0", "reopened": "0", "closed": "0", "errors": "0",
    }  # fmt: skip
    assert err == ""
    run = SyncRun.objects.get(pk=int(summary["id"]))
    assert (run.status, run.trigger, run.user) == ("success", "command", None)
    assert Position.objects.open().count() == 2


@pytest.mark.django_db
def test_the_summary_reports_changes_since_the_last_run(use_gateway):
    sync_ibkr()
    use_gateway.positions.pop()
    use_gateway.positions[0] = position(quantity="12")

    out, _ = sync_ibkr()

    summary = SUMMARY.match(out.strip())
    assert (summary["updated"], summary["closed"], summary["unchanged"]) == ("1", "1", "0")


@pytest.mark.django_db
def test_verbosity_2_adds_a_line_per_account_and_per_error(use_gateway):
    use_gateway.accounts = ("U1111111", "U2222222")
    use_gateway.positions.append(position(account="U2222222", con_id=5, sec_type="NOPE"))

    out, _ = sync_ibkr(verbosity=2)

    lines = out.splitlines()
    assert SUMMARY.match(lines[0])
    assert lines[1:] == [
        "  U1111111: 2 positions: 2 created, 0 updated, 0 unchanged, 0 reopened, 0 closed, "
        "0 errors",
        "  U2222222: 1 positions: 0 created, 0 updated, 0 unchanged, 0 reopened, 0 closed, "
        "1 errors",
        "  error: U2222222 conId 5 AAPL (NOPE): unsupported security type 'NOPE'",
    ]


@pytest.mark.django_db
def test_verbosity_0_prints_nothing_but_still_syncs(use_gateway):
    out, err = sync_ibkr(verbosity=0)

    assert (out, err) == ("", "")
    assert Position.objects.count() == 2


@pytest.mark.django_db
def test_account_option_limits_the_sync(use_gateway):
    use_gateway.accounts = ("U1111111", "U2222222")

    out, _ = sync_ibkr("--account", "u2222222")

    assert use_gateway.calls == ["U2222222"]
    assert SUMMARY.match(out.strip())["accounts"] == "1"
    assert SyncRun.objects.get().account_filter == "U2222222"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("error", "returncode"),
    [
        (GatewayUnavailable("Cannot connect to the IB gateway at gw:4002"), 3),
        (GatewayTimeout("The IB gateway at gw:4002 did not connect within 10 s"), 4),
        (ClientIdInUse("Client id 1 is already in use", ib_code=326), 7),
        (IncompleteSnapshot("1 position message could not be read"), 8),
        (GatewayError("Something odd from the gateway"), 8),
    ],
)
def test_gateway_errors_exit_with_their_own_code_and_print_nothing(use_gateway, error, returncode):
    use_gateway.error = error
    out = StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", stdout=out, stderr=StringIO())

    assert raised.value.returncode == returncode
    assert str(raised.value) == str(error)
    assert out.getvalue() == ""
    assert SyncRun.objects.get().error_code == error.code


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("account", "returncode"), [("bogus!", 2), ("U9999999", 6)], ids=["invalid", "unknown"]
)
def test_account_errors_exit_with_their_own_code(use_gateway, account, returncode):
    out = StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--account", account, stdout=out, stderr=StringIO())

    assert raised.value.returncode == returncode
    assert account in str(raised.value)
    assert out.getvalue() == ""


@pytest.mark.django_db
def test_sync_already_running_exits_5(use_gateway):
    SyncRun.objects.create(trigger="api", status="running", pid=None)
    out = StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", stdout=out, stderr=StringIO())

    assert raised.value.returncode == 5
    assert "running" in str(raised.value)
    assert out.getvalue() == ""
    assert use_gateway.calls == []


@pytest.mark.django_db
def test_unexpected_error_is_not_disguised_as_a_sync_error(use_gateway):
    use_gateway.error = RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sync_ibkr()

    assert SyncRun.objects.get().error_code == "internal_error"


# --- as a subprocess: real exit codes and stderr ---------------------------------------------


@pytest.fixture(scope="module")
def command_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `manage.py` in a subprocess: its own migrated SQLite file."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "DJANGO_")) and k not in {"DATABASE_URL", "DEBUG"}
    }
    db = tmp_path_factory.mktemp("command") / "db.sqlite3"
    env.update(
        DATABASE_URL=f"sqlite:///{db}",
        DEBUG="true",  # as on a developer's machine; production settings are tested apart
        IBKR_CONNECT_TIMEOUT="5",
        PYTHONDONTWRITEBYTECODE="1",
    )
    manage("migrate", "--noinput", "-v", "0", env=env, check=True)
    return env


def manage(*args: str, env: dict[str, str], check: bool = False):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.processes
def test_gateway_not_listening_exits_3_with_one_clear_line(command_env, closed_port):
    result = manage("sync_ibkr", env={**command_env, "IBKR_PORT": str(closed_port)})

    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("CommandError: Cannot connect to the IB gateway at ")
    assert f"127.0.0.1:{closed_port}" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.processes
def test_invalid_account_exits_2(command_env):
    result = manage("sync_ibkr", "--account", "bogus!", env=command_env)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "CommandError: 'bogus!' is not an IBKR account id: expected letters then digits, "
        "e.g. U1234567."
    ]


@pytest.mark.processes
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--json", "--quiet"], "argument --quiet: not allowed with argument --json"),
        (["--account"], "argument --account: expected one argument"),
        (["-v", "7"], "argument -v/--verbosity: invalid choice: 7 (choose from 0, 1, 2, 3)"),
    ],
)
def test_bad_options_exit_2_with_one_line(command_env, args, message):
    result = manage("sync_ibkr", *args, env=command_env)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"manage.py sync_ibkr: error: {message} (see --help)"]


@pytest.mark.django_db
def test_a_malformed_setting_the_app_reads_itself_is_a_configuration_error(settings):
    """As in a host project, whose settings leave the IBKR_* values to the app: the
    command's own check says so (exit 78), not Django's system-check report (exit 1)."""
    settings.IBKR_PORT = "abc"

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr")

    assert raised.value.returncode == 78
    assert str(raised.value) == "Configuration error: IBKR_PORT must be an integer, got 'abc'."
    assert not SyncRun.objects.exists()


@pytest.mark.processes
def test_malformed_port_setting_stops_with_a_message_naming_it(command_env):
    result = manage("sync_ibkr", env={**command_env, "IBKR_PORT": "abc"})

    assert result.returncode == 78  # EX_CONFIG
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "Configuration error: IBKR_PORT must be an integer, got 'abc'."
    ]


@pytest.mark.processes
def test_quiet_under_cron_prints_only_the_error_and_exits_3(command_env, closed_port):
    result = manage("sync_ibkr", "--quiet", env={**command_env, "IBKR_PORT": str(closed_port)})

    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("CommandError: Cannot connect to the IB gateway at ")
    assert len(result.stderr.strip().splitlines()) == 1


# --- one line on stderr, whatever fails, whatever the log level -----------------------------


@pytest.mark.processes
def test_log_level_info_under_cron_prints_only_the_error(command_env, closed_port):
    """LOG_LEVEL=INFO (the README's production setting) does not add the sync's log lines
    to what cron mails: those are for `-v 2`."""
    env = {**command_env, "IBKR_PORT": str(closed_port), "LOG_LEVEL": "INFO"}

    result = manage("sync_ibkr", "--quiet", env=env)

    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.processes
def test_log_level_info_quiet_success_prints_nothing(command_env, simulator):
    env = {**command_env, "IBKR_PORT": str(simulator.port), "LOG_LEVEL": "INFO"}

    result = manage("sync_ibkr", "--quiet", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def sync_losing_the_database(env, simulator, lose):
    """`manage.py sync_ibkr` in its own process, its database lost while it reads."""
    gate = threading.Event()
    simulator.set_faults(hold_positions=gate)
    process = subprocess.Popen(
        [sys.executable, "manage.py", "sync_ibkr"],
        cwd=PROJECT_DIR,
        env={**env, "IBKR_PORT": str(simulator.port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: simulator.active_client_ids != [])
        lose()
    finally:
        gate.set()
        out, err = process.communicate(timeout=60)
    return process.returncode, out, err


@pytest.mark.processes
def test_database_file_damaged_mid_sync_is_exit_9_with_one_line(command_env, simulator, tmp_path):
    source = Path(command_env["DATABASE_URL"].removeprefix("sqlite:///"))
    copy = tmp_path / "db.sqlite3"
    shutil.copy(source, copy)
    env = {**command_env, "DATABASE_URL": f"sqlite:///{copy}"}

    returncode, out, err = sync_losing_the_database(env, simulator, lambda: os.truncate(copy, 0))

    assert (returncode, out) == (9, "")
    assert err.strip().splitlines() == [
        "CommandError: The database could not use its storage (the database file is "
        "damaged), so nothing was changed: check the disk the database is on (free space, "
        "write permission, a read-only mount or server, hardware errors), then sync again."
    ]


@pytest.fixture
def postgresql_env(command_env):
    """`command_env` on a throw-away PostgreSQL database, when the tests run on one."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        pytest.skip("needs DATABASE_URL=postgres://...")
    import environ
    import psycopg

    config = environ.Env.db_url_config(url)
    server = {
        "host": config.get("HOST") or "127.0.0.1",
        "port": int(config.get("PORT") or 5432),
        "user": config.get("USER") or "postgres",
        "password": config.get("PASSWORD") or None,
    }
    name = f"{config['NAME']}_command"

    def admin(sql: str):
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as conn:
            return conn.execute(sql, [name] if "%s" in sql else None)

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    env = {**command_env, "DATABASE_URL": url.rsplit("/", 1)[0] + f"/{name}"}
    manage("migrate", "--noinput", "-v", "0", env=env, check=True)

    def server_gone():
        admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s")

    yield env, server_gone
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.processes
def test_database_server_gone_mid_sync_is_exit_9_with_one_line(postgresql_env, simulator):
    env, server_gone = postgresql_env

    returncode, out, err = sync_losing_the_database(env, simulator, server_gone)

    assert (returncode, out) == (9, "")
    assert err.strip().splitlines() == [
        "CommandError: The database did not answer, so nothing was changed: check "
        "DATABASE_URL and that the database server is running and accepts connections, "
        "then sync again."
    ]


# --- exit codes: one table, the help text and the README ----------------------------------------


def readme_exit_codes() -> list[tuple[int, str]]:
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    table = readme.split("Exit codes:\n\n| Exit | Meaning |\n|---|---|\n", 1)[1].split("\n\n")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()]
    return [(int(code), meaning.strip()) for code, meaning in rows]


def test_the_readme_the_help_and_the_table_list_the_same_exit_codes():
    import manage
    from ibkr_sync.management.commands.sync_ibkr import EXIT_CODES, EXITS, Command

    table = [(code, meaning) for code, _, meaning in EXITS]
    help_text = " ".join(Command().create_parser("manage.py", "sync_ibkr").format_help().split())

    assert readme_exit_codes() == table
    for code, meaning in table:
        assert f" {code} {meaning}" in help_text, code
    assert sorted(set(EXIT_CODES.values())) == [c for c, e, _ in EXITS if e is not None]
    assert manage.EXIT_CONFIG_ERROR in dict(table)
    assert {0, 1, 2, 9, 78} <= dict(table).keys()
