"""`manage.py ibkr_demo` (`make demo`) as a new user runs it: in a SQLite file of its own,
whatever DATABASE_URL names, with two connections (the IB Gateway simulator's and the
fake Flex Web Service's, its token encrypted at rest) synced, and stopping at once,
saying why, when a port it needs is taken (by a demo already running, say)."""

import datetime as dt
import itertools
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone

from portfolio.models import Account, AccountSnapshot
from portfolio_site.demo.management.commands import ibkr_demo

PROJECT_DIR = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.processes]


def demo_env(**values: str) -> dict[str, str]:
    """As `make demo` runs it (DEBUG=true), with no gateway or database settings of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IBKR_") and k != "DATABASE_URL"}
    env.update(DEBUG="true", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(values)
    return env


def manage(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120, check=check,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture
def site_database(tmp_path) -> tuple[Path, str]:
    """Another SQLite database, migrated, holding a user called `demo` of its own."""
    directory = tmp_path / "site"
    directory.mkdir()
    url = f"sqlite:///{directory / 'db.sqlite3'}"
    env = demo_env(DATABASE_URL=url)
    manage("migrate", "--noinput", "-v", "0", env=env)
    manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        "User.objects.create_user('demo', password='not-the-demo-password')",
        env=env,
    )
    return directory, url


class Demo:
    """`manage.py ibkr_demo` in a process of its own, until it says it is up."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "ibkr_demo", *args],
            cwd=PROJECT_DIR, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} never came:\n" + "\n".join(self.output))

    def serving(self, url: str, timeout: float = 60) -> int:
        """The status of GET `url` once the web server answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.process.stdout.close()


def run_printed_sync_command(output: list[str], env: dict[str, str]):
    """The `sync_ibkr` line the demo prints, run as a user pastes it into a terminal."""
    line = next(line for line in output if line.startswith("  Sync command (another terminal): "))
    words = line.split(": ", 1)[1].split()
    assignments = dict(word.split("=", 1) for word in words if "=" in word)
    command = [word for word in words if "=" not in word]
    return subprocess.run(
        command, cwd=PROJECT_DIR, env={**env, **assignments},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_readme_syncs_the_running_demo_as_the_demo_says():
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    block = readme.split("To sync the running demo from the command line", 1)[1]
    command = block.split("```sh", 1)[1].split("```", 1)[0]

    assert f"DATABASE_URL=sqlite:///{ibkr_demo.DEMO_DATABASE} " in command
    flex = f"http://127.0.0.1:{ibkr_demo.FLEX_SERVICE_PORT}/AccountManagement/FlexWebService"
    assert f"IBKR_FLEX_BASE_URL={flex} " in command
    assert "manage.py sync_ibkr --all" in command


@pytest.mark.parametrize("named_in", ["environment", "dotenv"])
def test_the_demo_runs_in_its_own_database_whatever_database_url_names(
    site_database, tmp_path, named_in
):
    site, site_url = site_database
    if named_in == "environment":
        env = demo_env(DATABASE_URL=site_url)
    else:
        dotenv = tmp_path / "developer.env"
        dotenv.write_text(f"DATABASE_URL={site_url}\n", encoding="utf-8")
        env = demo_env(ENV_FILE=str(dotenv))
    before = files(site)
    demo_file = tmp_path / "demo" / "demo.sqlite3"
    demo_file.parent.mkdir()
    web = f"127.0.0.1:{free_port()}"
    demo = Demo(
        "--addr", web, "--gateway-port", "0", "--flex-port", "0", "--database", str(demo_file),
        env=env,
    )  # fmt: skip
    try:
        demo.wait_for("The demo is up")
        demo.wait_for("Database:")
        assert demo.serving(f"http://{web}/admin/login/") == 200
        synced = run_printed_sync_command(demo.output, env)
    finally:
        stopped = demo.stop()

    assert stopped == 0, "\n".join(demo.output)
    assert synced.returncode == 0, synced.stderr
    # The demo's first syncs: the Flex statement (as of yesterday's close), then the
    # gateway's read of now; the Flex statement, older than that read, is written no more.
    started = "\n".join(demo.output)
    assert "IBKR sync #1 of connection flex: 23 positions in 3 account(s): 23 created" in started
    assert "IBKR sync #2 of connection gateway: 25 positions in 3 account(s)" in started
    lines = synced.stdout.splitlines()
    assert lines[0].startswith("IBKR sync #3 of connection flex: 0 positions in 0 account(s)")
    assert sum("Not written: DU" in line for line in lines) == 3
    assert any(
        line.startswith(
            "IBKR sync #4 of connection gateway: 25 positions in 3 account(s): 0 created"
        )
        for line in lines
    ), synced.stdout
    assert files(site) == before, "the site's database was touched"
    assert f"  Database:  {demo_file} (the demo's own)" in demo.output
    with sqlite3.connect(demo_file) as db:
        assert db.execute("SELECT username, is_superuser FROM auth_user").fetchall() == [
            ("demo", 1)
        ]
        assert db.execute("SELECT count(*) FROM portfolio_position").fetchone()[0] > 0
        # Each account's made-up past (90 days, no sync run), and the syncs' snapshots:
        # each day of the Flex statement, its period end, each gateway sync's.
        per_account = db.execute(
            "SELECT count(*) - count(sync_run_id), count(sync_run_id) "
            "FROM portfolio_accountsnapshot GROUP BY account_id"
        ).fetchall()
        assert len(per_account) == 3
        assert {made_up for made_up, _ in per_account} == {ibkr_demo.HISTORY_DAYS}
        assert all(synced >= 3 for _, synced in per_account), per_account
        connections = db.execute(
            "SELECT name, kind, flex_query_id, flex_token FROM ibkr_sync_connection ORDER BY name"
        ).fetchall()
        assert [row[:3] for row in connections] == [
            ("flex", "flex", "1234567"),
            ("gateway", "tws", ""),
        ]
        assert connections[0][3].startswith("gAAAA"), "the token is stored encrypted (Fernet)"
        # The Flex statement's history: trades (an FX conversion, an assignment, an
        # expiry), dividends with their taxes, interest, fees, deposits.
        assert db.execute("SELECT count(*) FROM portfolio_trade").fetchone()[0] == 40
        kinds = dict(
            db.execute("SELECT kind, count(*) FROM portfolio_cashtransaction GROUP BY kind")
        )
        assert kinds == {"deposit": 3, "dividend": 4, "withholding_tax": 8, "interest": 3, "fee": 2}
    assert any("days of made-up history" in line for line in demo.output)


def test_the_demos_gateway_values_carry_on_from_its_flex_history(tmp_path):
    """The gateway simulator and the Flex statement tell of the same accounts: the
    gateway's net liquidation of each, read after the statement's last day, is what that
    day's net asset value was, but for the prices' drift between syncs (1 % at most); so
    the overview's chart goes on from the statement's days without a jump."""
    demo_file = tmp_path / "demo.sqlite3"
    web = f"127.0.0.1:{free_port()}"
    demo = Demo(
        "--addr", web, "--gateway-port", "0", "--flex-port", "0", "--database", str(demo_file),
        env=demo_env(),
    )  # fmt: skip
    try:
        demo.wait_for("The demo is up")
        demo.wait_for("Database:")
        assert demo.serving(f"http://{web}/admin/login/") == 200
    finally:
        stopped = demo.stop()
    assert stopped == 0, "\n".join(demo.output)

    with sqlite3.connect(demo_file) as db:
        rows = db.execute(
            "SELECT a.external_id, s.taken_at, s.net_liquidation, r.connection_name "
            "FROM portfolio_accountsnapshot s JOIN portfolio_account a ON a.id = s.account_id "
            "LEFT JOIN ibkr_sync_syncrun r ON r.id = s.sync_run_id "
            "WHERE s.net_liquidation IS NOT NULL ORDER BY a.external_id, s.taken_at, s.id"
        ).fetchall()
        held = db.execute(
            "SELECT a.external_id, p.market_value FROM portfolio_position p "
            "JOIN portfolio_account a ON a.id = p.account_id "
            "WHERE p.closed_at IS NULL AND p.market_value IS NOT NULL"
        ).fetchall()
    # What the drift of 1 % a price can move an account by: 1 % of its positions' market
    # values (a future's notional included: its P&L is what the drift moves).
    drift: dict[str, Decimal] = {}
    for account, value in held:
        drift[account] = drift.get(account, Decimal(0)) + abs(Decimal(str(value))) / 100
    by_account: dict[str, list[tuple[Decimal, str | None]]] = {}
    for account, _, value, connection in rows:
        by_account.setdefault(account, []).append((Decimal(str(value)), connection))
    assert set(by_account) == {"DU1234567", "DU7654321", "DU5555555"}
    for account, points in by_account.items():
        flex = [value for value, connection in points if connection == ibkr_demo.FLEX_CONNECTION]
        gateway = [
            value for value, connection in points if connection == ibkr_demo.GATEWAY_CONNECTION
        ]
        assert flex and gateway, (account, points)
        assert abs(gateway[-1] - flex[-1]) <= drift.get(account, 0) + 1, (account, flex, gateway)
        assert abs(gateway[-1] / flex[-1] - 1) < Decimal("0.05"), (account, flex[-1], gateway)
        values = [value for value, _ in points]
        moves = [abs(b / a - 1) for a, b in itertools.pairwise(values)]
        assert max(moves) < Decimal("0.06"), (account, values)
    # The sample account with a bond and a future: worth what its statement says (about
    # 166,000), not the future's notional nor the bond's face value times its price.
    gateway_value = next(
        v for v, c in reversed(by_account["DU1234567"]) if c == ibkr_demo.GATEWAY_CONNECTION
    )
    assert 150_000 < gateway_value < 185_000


def hold(port: int) -> socket.socket | None:
    """Take `port` on loopback as a running server does (None if it cannot be had)."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", port))
    except OSError:
        holder.close()
        return None
    holder.listen()
    return holder


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize(
    "taken", [("gateway",), ("web",), ("flex",), ("gateway", "web"), ("gateway", "web", "flex")]
)
def test_a_port_in_use_stops_the_demo_at_once_suggesting_ports_that_are_free(tmp_path, taken):
    ports = {"gateway": free_port(), "web": free_port(), "flex": free_port()}
    holders = [hold(ports[name]) for name in taken]
    # The first ports a suggestion would try (the port asked for + 10) are taken too: a
    # suggestion must be tried, not assumed.
    holders += [hold(ports[name] + 10) for name in ports]
    demo_file = tmp_path / "demo.sqlite3"
    try:
        result = manage(
            "ibkr_demo", "--gateway-port", str(ports["gateway"]),
            "--flex-port", str(ports["flex"]),
            "--addr", f"127.0.0.1:{ports['web']}", "--database", str(demo_file),
            env=demo_env(), check=False,
        )  # fmt: skip
        lines = result.stderr.splitlines()
        suggested = re.search(
            r'make demo DEMO_ARGS="--gateway-port (\d+) --flex-port (\d+) '
            r'--addr 127\.0\.0\.1:(\d+)" \(free just now\)\.$',
            lines[0] if lines else "",
        )
        assert suggested, result.stderr
        gateway, flex, web = (int(port) for port in suggested.groups())
        assert bindable(gateway) and bindable(web) and bindable(flex), (
            "the suggested ports are free"
        )
    finally:
        for holder in holders:
            if holder is not None:
                holder.close()

    named = {
        "gateway": f"{ports['gateway']} (for the IB Gateway simulator, --gateway-port)",
        "web": f"{ports['web']} (for the web server, --addr)",
        "flex": f"{ports['flex']} (for the Flex Web Service simulator, --flex-port)",
    }
    which = [named[name] for name in taken]
    which = which[0] if len(which) == 1 else f"{', '.join(which[:-1])} and {which[-1]}"
    assert result.returncode == 1
    assert result.stdout == ""
    assert lines == [
        f"CommandError: {'Port' if len(taken) == 1 else 'Ports'} {which} "
        f"{'is' if len(taken) == 1 else 'are'} already in use, perhaps by a demo that is "
        'running: stop it, or choose free ports, e.g. make demo DEMO_ARGS="--gateway-port '
        f'{gateway} --flex-port {flex} --addr 127.0.0.1:{web}" (free just now).'
    ]
    assert len({gateway, web, flex}) == 3
    assert gateway not in (ports["gateway"], ports["gateway"] + 10, ports["web"], ports["flex"])
    assert web not in (ports["web"], ports["web"] + 10, ports["gateway"], ports["flex"])
    assert flex not in (ports["flex"], ports["flex"] + 10, ports["gateway"], ports["web"])
    assert not demo_file.exists(), "nothing is done before the ports are checked"


@pytest.mark.django_db
def test_the_demo_history_is_a_plausible_past_that_ends_at_the_first_sync():
    now = timezone.now()
    owner = Account.objects.create(broker="ibkr", external_id="DU1111111", base_currency="USD")
    named = Account.objects.create(broker="ibkr", external_id="DU2222222", name="Mine")
    read = AccountSnapshot.objects.create(
        account=owner, taken_at=now, currency="USD", net_liquidation=Decimal("100000.12")
    )
    AccountSnapshot.objects.create(account=named, taken_at=now, net_liquidation=Decimal(5))

    assert ibkr_demo.seed_history() == 2
    assert ibkr_demo.seed_history() == 0, "a demo started again keeps the past it has"

    past = list(AccountSnapshot.objects.filter(account=owner).exclude(pk=read.pk))
    assert len(past) == ibkr_demo.HISTORY_DAYS
    assert {p.currency for p in past} == {"USD"} and all(p.sync_run_id is None for p in past)
    assert min(p.taken_at for p in past) == now - dt.timedelta(days=ibkr_demo.HISTORY_DAYS)
    values = [p.net_liquidation for p in sorted(past, key=lambda p: p.taken_at)]
    moves = [abs(b / a - 1) for a, b in itertools.pairwise([*values, read.net_liquidation])]
    assert max(moves) < Decimal("0.06"), "a day's move stays plausible"
    assert len(set(values)) > 80, "it moves"
    owner.refresh_from_db()
    named.refresh_from_db()
    assert "made up" in owner.name
    assert named.name == "Mine", "a name of the user's own is kept"


def test_the_demo_started_twice_suggests_ports_the_first_one_does_not_hold(tmp_path):
    """`make demo` run twice: the second says the first holds its ports, and suggests
    ports the first does not hold (they were the same ones before)."""
    web = f"127.0.0.1:{free_port()}"
    gateway, flex = str(free_port()), str(free_port())
    first = Demo("--addr", web, "--gateway-port", gateway, "--flex-port", flex, "--database",
                 str(tmp_path / "first.sqlite3"), env=demo_env())  # fmt: skip
    try:
        first.wait_for("The demo is up")
        second = manage(
            "ibkr_demo", "--addr", web, "--gateway-port", gateway, "--flex-port", flex,
            "--database", str(tmp_path / "second.sqlite3"), env=demo_env(), check=False,
        )  # fmt: skip
        suggested = re.search(
            r'--gateway-port (\d+) --flex-port (\d+) --addr 127\.0\.0\.1:(\d+)"', second.stderr
        )
        assert suggested, second.stderr
        assert all(bindable(int(port)) for port in suggested.groups()), second.stderr
    finally:
        first.stop()

    assert second.returncode == 1
    assert "are already in use, perhaps by a demo that is running" in second.stderr
    assert len(second.stderr.splitlines()) == 1
