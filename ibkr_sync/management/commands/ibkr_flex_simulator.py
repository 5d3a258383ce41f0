"""``manage.py ibkr_flex_simulator``: run the fake Flex Web Service in the foreground.

The Flex counterpart of ``ibkr_simulator``: IBKR's Flex Web Service (version 3) over HTTP,
answering a Flex connection's sync with Activity Flex statements of the simulator's
portfolio (the bundled sample, a JSON portfolio file or a generated one) and a made-up
history that adds up to it; `--script` plays IBKR's error sequences first. Point
``IBKR_FLEX_BASE_URL`` at the printed address, and give a Flex connection the query id
and token it prints.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import threading
from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ibkr_sync.management.commands.ibkr_simulator import add_portfolio_arguments, portfolio_of
from ibkr_sync.testing.flex_portfolio import FlexHistory
from ibkr_sync.testing.flex_service import SCENARIOS, FakeFlexService

#: The port the simulator listens on by default (no port of IBKR's: the service is HTTPS).
DEFAULT_PORT = 8760
DEFAULT_QUERY_ID = "1234567"
DEFAULT_TOKEN = "flex-simulator-token"
#: IBKR's statement zone: a day is closed after its end there.
STATEMENT_ZONE = ZoneInfo("America/New_York")


def yesterday() -> dt.date:
    """The last day IBKR has closed (US Eastern): the end of the history by default."""
    return dt.datetime.now(STATEMENT_ZONE).date() - dt.timedelta(days=1)


class Command(BaseCommand):
    help = (
        "Run a fake IBKR Flex Web Service that answers Activity Flex statements of the "
        "bundled sample portfolio, a JSON portfolio file or a generated one, with a history "
        "(trades, cash transactions, option events) that adds up to it. Stops on "
        "Ctrl-C/SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
        parser.add_argument(
            "--port",
            type=int,
            default=DEFAULT_PORT,
            help=f"Port to listen on (default {DEFAULT_PORT}); 0 picks a free one.",
        )
        add_portfolio_arguments(parser)
        parser.add_argument(
            "--query-id",
            default=DEFAULT_QUERY_ID,
            help=f"The Flex query id it answers (default {DEFAULT_QUERY_ID}).",
        )
        parser.add_argument(
            "--token",
            default=DEFAULT_TOKEN,
            help=f"The (made-up) token it accepts (default {DEFAULT_TOKEN}); any other is "
            "answered 1015.",
        )
        parser.add_argument(
            "--end-date",
            type=dt.date.fromisoformat,
            help="The history's last day, YYYY-MM-DD (default: yesterday, US Eastern).",
        )
        parser.add_argument(
            "--days", type=int, default=7, help="Days of history (default 7: a sync's period)."
        )
        parser.add_argument(
            "--script",
            action="append",
            choices=sorted(SCENARIOS),
            default=[],
            metavar="SCENARIO",
            help="Answer IBKR's error sequence first (repeatable, played in order): "
            + "; ".join(f"{name}: {what}" for name, what in SCENARIOS.items()),
        )
        parser.add_argument(
            "--huge-rows",
            type=int,
            default=50_000,
            help="Trades of --script huge's statement (default 50,000).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        portfolio = portfolio_of(options)
        port = options["port"]
        if not 0 <= port <= 65535:
            raise CommandError(f"--port must be between 0 and 65535, got {port}")
        if not 3 <= options["days"] <= 365:
            raise CommandError(f"--days must be between 3 and 365, got {options['days']}")
        if options["huge_rows"] < 0:
            raise CommandError("--huge-rows must be >= 0")
        token, query_id = options["token"].strip(), options["query_id"].strip()
        if not token or not query_id:
            raise CommandError("--token and --query-id must not be empty")
        history = FlexHistory(
            portfolio, end=options["end_date"] or yesterday(), days=options["days"]
        )
        service = FakeFlexService(tokens=(token,), host=options["host"], port=port)
        service.add_statement(query_id, history)
        for scenario in options["script"]:
            service.play(scenario, huge_rows=options["huge_rows"])
        try:
            service.start()
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{port}: {exc.strerror or exc}"
            ) from exc
        stop = threading.Event()
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.stdout.write(
                f"Flex Web Service simulator listening on {service.base_url} (query "
                f"{query_id}, token {token}, accounts: {', '.join(history.accounts)}; history "
                f"{history.start} to {history.end}"
                + (f"; scripted: {', '.join(options['script'])}" if options["script"] else "")
                + f"). Set IBKR_FLEX_BASE_URL={service.base_url}"
            )
            self.stdout.flush()
            sys.stdout.flush()
            while not stop.wait(0.2):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            service.stop()
        self.stdout.write("Flex Web Service simulator stopped")
