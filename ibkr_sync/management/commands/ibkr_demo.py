"""`manage.py ibkr_demo`: the whole product on one machine, with no IBKR account.

Migrates the database, creates a demo admin login, starts the bundled IB Gateway
simulator with a sample portfolio, runs a first sync through the real IB client, then
serves the site so the admin and the REST endpoint can be tried at once. Ctrl-C stops
everything it started.
"""

import errno
import socket

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rest_framework.authtoken.models import Token

from ...testing import GatewaySimulator, PortfolioError, load_portfolio, load_sample_portfolio

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-portfolio"
IB_GATEWAY_PAPER_PORT = 4002


class Command(BaseCommand):
    help = "Run the product end to end against the bundled IB Gateway simulator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000", help="Where to serve the site.")
        parser.add_argument(
            "--gateway-port",
            type=int,
            default=IB_GATEWAY_PAPER_PORT,
            help="Simulator port (default 4002, IB Gateway's paper port; any free port "
            "is used if it is taken).",
        )
        parser.add_argument("--positions", help="Portfolio JSON file (default: the sample).")

    def handle(self, *args, addr: str, gateway_port: int, positions: str | None, **options):
        try:
            portfolio = load_portfolio(positions) if positions else load_sample_portfolio()
        except PortfolioError as exc:
            raise CommandError(str(exc)) from exc

        call_command("migrate", verbosity=0, interactive=False)
        token = self._demo_login()
        simulator = self._start_simulator(portfolio, gateway_port)
        try:
            # The app reads its gateway address from settings when it connects.
            settings.IBKR_HOST, settings.IBKR_PORT = simulator.host, simulator.port
            self.stdout.write(
                f"IB Gateway simulator listening on {simulator.host}:{simulator.port} "
                f"({len(portfolio.positions)} positions, accounts: "
                f"{', '.join(portfolio.all_accounts())})"
            )
            call_command("sync_ibkr", stdout=self.stdout, stderr=self.stderr)
            url = f"http://{addr}"
            self.stdout.write(
                self.style.SUCCESS("\nThe demo is up. Press Ctrl-C to stop it.\n")
                + f"  Admin:    {url}/admin/  (user {DEMO_USER!r}, password {DEMO_PASSWORD!r})\n"
                f"  Positions: {url}/admin/portfolio/position/\n"
                f"  Sync API: curl -X POST -H 'Authorization: Token {token}' "
                f"{url}/portfolio/sync/ibkr\n"
            )
            call_command("runserver", addr, use_reloader=False, use_threading=True)
        finally:
            simulator.stop_thread()
            self.stdout.write("IB Gateway simulator stopped.")

    def _demo_login(self) -> str:
        user, _ = get_user_model().objects.get_or_create(
            username=DEMO_USER, defaults={"is_staff": True, "is_superuser": True}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(DEMO_PASSWORD)
        user.save()
        return Token.objects.get_or_create(user=user)[0].key

    def _start_simulator(self, portfolio, port: int) -> GatewaySimulator:
        if not _port_free(port):
            self.stderr.write(f"Port {port} is taken; the simulator uses a free port instead.")
            port = 0
        simulator = GatewaySimulator(portfolio, host="127.0.0.1", port=port)
        simulator.start_in_thread()
        return simulator


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True
