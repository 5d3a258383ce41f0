"""`manage.py ibkr_demo`: the whole product on one machine, with no IBKR account.

Checks that its three ports are free, then, in a SQLite file of its own (`demo.sqlite3`
in the project; never the database DATABASE_URL names), migrates, creates a demo admin
login, starts the bundled IB Gateway simulator and the fake Flex Web Service with the
same sample portfolio, creates a connection to each (`gateway`, and `flex` with its
token encrypted at rest), syncs both (`sync_ibkr --all`: the Flex statement's history
fills the ledger), and serves the site so the admin and the REST endpoint can be tried at
once. Ctrl-C stops everything it started.
"""

import contextlib
import datetime as dt
import errno
import os
import random
import re
import secrets
import socket
import sys
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.management.commands.runserver import naiveip_re
from django.db import DEFAULT_DB_ALIAS, connections
from rest_framework.authtoken.models import Token

from ibkr_sync import conf
from ibkr_sync.management.commands.ibkr_flex_simulator import DEFAULT_QUERY_ID, yesterday
from ibkr_sync.models import Connection
from ibkr_sync.testing import (
    GatewaySimulator,
    PortfolioError,
    load_portfolio,
    load_sample_portfolio,
)
from ibkr_sync.testing.flex_portfolio import RATES_TO_USD, FlexHistory
from ibkr_sync.testing.flex_service import FakeFlexService

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-portfolio"
DEMO_DATABASE = "demo.sqlite3"
IB_GATEWAY_PAPER_PORT = 4002
FLEX_SERVICE_PORT = 8760
#: The demo's two connections (synced in name order: the Flex statement, as of
#: yesterday's close, before the gateway's read of now).
GATEWAY_CONNECTION, FLEX_CONNECTION = "gateway", "flex"
# Days of made-up history the demo gives each account, so that its chart has a past.
HISTORY_DAYS = 90
CENT = Decimal("0.01")


class Command(BaseCommand):
    help = "Run the product end to end against the bundled IB Gateway simulator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--addr", default="127.0.0.1:8000", help="Where to serve the site (host:port)."
        )
        parser.add_argument(
            "--gateway-port",
            type=int,
            default=IB_GATEWAY_PAPER_PORT,
            help="Simulator port (default 4002, IB Gateway's paper port; 0: any free port).",
        )
        parser.add_argument(
            "--flex-port",
            type=int,
            default=FLEX_SERVICE_PORT,
            help=f"The fake Flex Web Service's port (default {FLEX_SERVICE_PORT}; 0: any free "
            "port).",
        )
        parser.add_argument("--positions", help="Portfolio JSON file (default: the sample).")
        parser.add_argument(
            "--database",
            metavar="FILE",
            help=f"The demo's own SQLite file (default: {DEMO_DATABASE} in the project). "
            "DATABASE_URL is never used: the demo touches no other database.",
        )

    def handle(
        self,
        *args,
        addr: str,
        gateway_port: int,
        flex_port: int,
        positions: str | None,
        database: str | None,
        **options,
    ):
        host, port = _host_and_port(addr)
        _check_ports_free(
            [
                (gateway_port, "127.0.0.1", "for the IB Gateway simulator, --gateway-port"),
                (port, host, "for the web server, --addr"),
                (flex_port, "127.0.0.1", "for the Flex Web Service simulator, --flex-port"),
            ]
        )
        try:
            portfolio = load_portfolio(positions) if positions else load_sample_portfolio()
        except PortfolioError as exc:
            raise CommandError(str(exc)) from exc

        database_file = Path(database) if database else _project_dir() / DEMO_DATABASE
        _use_sqlite_file(database_file)
        call_command("migrate", verbosity=0, interactive=False)
        token = self._demo_login()
        history = FlexHistory(portfolio, end=yesterday())
        simulator = self._start_simulator(portfolio, gateway_port, history)
        flex_token = secrets.token_hex(12)
        flex = FakeFlexService(tokens=(flex_token,), host="127.0.0.1", port=flex_port)
        try:
            flex.add_statement(DEFAULT_QUERY_ID, history)
            flex.start()
            # The Flex connection reads the service's address from settings when it syncs.
            settings.IBKR_FLEX_BASE_URL = flex.base_url
            self.stdout.write(
                f"IB Gateway simulator listening on {simulator.host}:{simulator.port} "
                f"({len(portfolio.positions)} positions, accounts: "
                f"{', '.join(portfolio.all_accounts())})"
            )
            self.stdout.write(
                f"Flex Web Service simulator listening on {flex.base_url} (query "
                f"{DEFAULT_QUERY_ID}, the same accounts; trades, cash transactions and option "
                f"events from {history.start} to {history.end})"
            )
            self._demo_connections(simulator, flex_token)
            call_command("sync_ibkr", "--all", stdout=self.stdout, stderr=self.stderr)
            seeded = seed_history()
            if seeded:
                self.stdout.write(
                    f"Added {HISTORY_DAYS} days of made-up history before the first sync to "
                    f"{seeded} account(s), so that the overview has a chart to show (demo "
                    "data, not from IBKR; each sync from now on adds a real point)."
                )
            url = f"http://{addr}"
            sync_command = (
                f"DEBUG=true DATABASE_URL=sqlite:///{_shown(database_file)} "
                f"IBKR_FLEX_BASE_URL={flex.base_url} "
                f"{_shown(Path(sys.executable))} manage.py sync_ibkr --all"
            )
            self.stdout.write(
                self.style.SUCCESS("\nThe demo is up. Press Ctrl-C to stop it.\n")
                + f"  Admin:     {url}/admin/  (user {DEMO_USER!r}, password {DEMO_PASSWORD!r})\n"
                f"  Positions: {url}/admin/portfolio/position/\n"
                + _ledger_links(url)
                + f"  Connections: {url}/admin/ibkr_sync/connection/ "
                f"({GATEWAY_CONNECTION!r}: the IB Gateway simulator; {FLEX_CONNECTION!r}: the "
                "Flex Web Service simulator)\n"
                f"  Sync API:  curl -X POST -H 'Authorization: Token {token}' "
                f"{url}/portfolio/sync/ibkr?connection={GATEWAY_CONNECTION}\n"
                f"  Sync command (another terminal): {sync_command}\n"
                f"  Database:  {_shown(database_file)} (the demo's own)\n"
            )
            call_command("runserver", addr, use_reloader=False, use_threading=True)
        finally:
            flex.stop()
            simulator.stop_thread()
            self.stdout.write("IB Gateway simulator stopped.")
            self.stdout.write("Flex Web Service simulator stopped.")

    def _demo_connections(self, simulator: GatewaySimulator, flex_token: str) -> None:
        """The demo's two connections, made or brought up to date (a demo started again
        may run its simulators on other ports; its Flex token is new at every start)."""
        Connection.objects.update_or_create(
            name=GATEWAY_CONNECTION,
            defaults={
                "kind": Connection.Kind.TWS,
                "enabled": True,
                "host": simulator.host,
                "port": simulator.port,
                "note": "The bundled IB Gateway simulator (demo).",
            },
        )
        flex = Connection.objects.filter(name=FLEX_CONNECTION).first() or Connection(
            name=FLEX_CONNECTION, kind=Connection.Kind.FLEX
        )
        flex.kind, flex.enabled, flex.flex_query_id = Connection.Kind.FLEX, True, DEFAULT_QUERY_ID
        flex.note = "The bundled Flex Web Service simulator (demo): a made-up week of history."
        flex.set_flex_token(flex_token)  # encrypted at rest, as a real token is
        flex.full_clean()
        flex.save()

    def _demo_login(self) -> str:
        user, _ = get_user_model().objects.get_or_create(
            username=DEMO_USER, defaults={"is_staff": True, "is_superuser": True}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(DEMO_PASSWORD)
        user.save()
        return Token.objects.get_or_create(user=user)[0].key

    def _start_simulator(self, portfolio, port: int, history: FlexHistory) -> GatewaySimulator:
        """The gateway simulator of `portfolio`, holding the cash the Flex history ends
        with, at its rates: the gateway's values carry on from the statement's last day,
        so that an account's chart goes on where the statement's days end."""
        # Prices move a little at every sync, so that values and their history change.
        simulator = GatewaySimulator(
            portfolio,
            host="127.0.0.1",
            port=port,
            price_drift="0.01",
            exchange_rates=dict(RATES_TO_USD),
        )
        for account in history.accounts:
            simulator.set_cash(account, history.ending_cash(account))
        simulator.start_in_thread()
        return simulator


def seed_history(days: int = HISTORY_DAYS, seed: int = 7) -> int:
    """Give each account a plausible past: a daily net liquidation for `days` days before
    its first snapshot, a seeded random walk that ends at the value the first sync read.
    Only for an account whose history is all the syncs' own (the Flex statement's days,
    each connection's read): a demo started again keeps what it has. The rows carry no
    sync run (none read them) and the account's name says the history is made up.
    Returns the number of accounts given a past."""
    Account, AccountSnapshot = conf.account_model(), conf.account_snapshot_model()
    rng = random.Random(seed)
    seeded = 0
    for account in Account.objects.order_by("pk"):
        snapshots = AccountSnapshot.objects.filter(account=account)
        if snapshots.filter(sync_run_id__isnull=True).count() > 1:
            continue  # made up already: a past is many rows that no sync read
        first = snapshots.filter(net_liquidation__isnull=False).order_by("taken_at").first()
        if first is None:
            continue
        value, past = first.net_liquidation, []
        for day in range(1, days + 1):
            # About 1 % a day, drifting up over time (so walking back, down).
            value = (value / Decimal(1 + rng.gauss(0.0004, 0.01))).quantize(CENT)
            past.append(
                AccountSnapshot(
                    account=account,
                    taken_at=first.taken_at - dt.timedelta(days=day),
                    currency=first.currency,
                    net_liquidation=value,
                )
            )
        AccountSnapshot.objects.bulk_create(past)
        if not account.name:
            account.name = "Demo account: history before the first sync is made up"
            account.save(update_fields=["name"])
        seeded += 1
    return seeded


def _ledger_links(url: str) -> str:
    """The ledger's admin pages (the Flex history's trades and cash transactions), for
    the kinds the site keeps and its admin shows."""
    from django.contrib import admin

    pages = [
        f"{url}/admin/{model._meta.app_label}/{model._meta.model_name}/"
        for model in conf.ledger_models().values()
        if model is not None and admin.site.is_registered(model)
    ]
    return f"  Ledger:    {', '.join(pages)}\n" if pages else ""


def _project_dir() -> Path:
    return Path(getattr(settings, "BASE_DIR", Path.cwd()))


def _use_sqlite_file(path: Path) -> None:
    """Make the SQLite file `path` this process's default database, in place of the one
    the settings name (DATABASE_URL, `.env`), before anything has connected to that."""
    connections.close_all()
    with contextlib.suppress(AttributeError):  # AttributeError: never connected
        del connections[DEFAULT_DB_ALIAS]
    demo = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path.resolve()),
        # As the project's settings open SQLite: the admin reads while a sync writes.
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
    # `connections.settings` is settings.DATABASES: both now name the demo's file.
    connections.settings[DEFAULT_DB_ALIAS] = connections.configure_settings(
        {DEFAULT_DB_ALIAS: demo}
    )[DEFAULT_DB_ALIAS]


def _host_and_port(addr: str) -> tuple[str, int]:
    """`--addr` read as runserver reads it: `port`, `host:port` or `[ipv6]:port`."""
    match = re.match(naiveip_re, addr)
    if match is None:
        raise CommandError(f"--addr {addr!r} is not a port number or a host:port pair.")
    host = (match["addr"] or "127.0.0.1").strip("[]")
    return host, int(match["port"])


def _check_ports_free(ports: list[tuple[int, str, str]]) -> None:
    """Stop before doing anything if a port the demo needs is taken (by a demo running
    already, say): one line naming each, and the options with ports that are free at this
    moment (each tried by binding it, as the servers will). Port 0 is any free port."""
    taken = [f"{port} ({what})" for port, host, what in ports if port and _port_taken(host, port)]
    if taken:
        (gateway_port, gateway_host, _), (web_port, web_host, _), (flex_port, flex_host, _) = ports
        gateway_port = gateway_port or IB_GATEWAY_PAPER_PORT
        flex_port = flex_port or FLEX_SERVICE_PORT
        free_gateway = _free_port_near(gateway_host, gateway_port, avoid={web_port, flex_port})
        free_web = _free_port_near(
            web_host, web_port, avoid={gateway_port, free_gateway, flex_port}
        )
        free_flex = _free_port_near(
            flex_host, flex_port, avoid={gateway_port, free_gateway, web_port, free_web}
        )
        web = f"[{web_host}]" if ":" in web_host else web_host
        named = taken[0] if len(taken) == 1 else f"{', '.join(taken[:-1])} and {taken[-1]}"
        raise CommandError(
            f"{'Port' if len(taken) == 1 else 'Ports'} {named} "
            f"{'is' if len(taken) == 1 else 'are'} already in use, "
            "perhaps by a demo that is running: stop it, or choose free ports, e.g. "
            f'make demo DEMO_ARGS="--gateway-port {free_gateway} --flex-port {free_flex} '
            f'--addr {web}:{free_web}" (free just now).'
        )


def _free_port_near(host: str, port: int, avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """A port of `host` that is free now: the first of port + 10, + 20, ... (easy to tell
    apart from the one asked for), or else one the system picks."""
    for candidate in range(port + 10, min(port + 200, 65536), 10):
        if candidate in avoid:
            continue
        try:
            if not _port_taken(host, candidate):
                return candidate
        except CommandError:  # not ours to bind (a privileged port, say): the next one
            continue
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        # As the servers bind: a port a demo just stopped left in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise CommandError(f"Cannot serve on {host}:{port}: {exc.strerror}.") from None
    return False


def _shown(path: Path) -> str:
    """`path` relative to the working directory if it is inside it (as a user types it)."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative
