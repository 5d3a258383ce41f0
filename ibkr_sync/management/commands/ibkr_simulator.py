"""``manage.py ibkr_simulator``: run the IB Gateway simulator in the foreground.

Lets developers and CI exercise ``sync_ibkr`` and the API end to end without an IB
account: point ``IBKR_HOST``/``IBKR_PORT`` at the printed address.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ibkr_sync.testing.portfolio import (
    SAMPLE_PORTFOLIO_PATH,
    Portfolio,
    PortfolioError,
    generate_portfolio,
    load_portfolio,
)
from ibkr_sync.testing.simulator import GatewaySimulator


class Command(BaseCommand):
    help = (
        "Run an IB Gateway simulator that speaks the TWS API protocol, serving the bundled "
        "sample portfolio, a JSON portfolio file or a generated one. Stops on Ctrl-C/SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
        parser.add_argument(
            "--port", type=int, default=4002, help="Port to listen on; 0 picks a free one."
        )
        add_portfolio_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        portfolio = portfolio_of(options)
        port = options["port"]
        if not 0 <= port <= 65535:
            raise CommandError(f"--port must be between 0 and 65535, got {port}")
        simulator = GatewaySimulator(portfolio, host=options["host"], port=port)
        try:
            asyncio.run(self._serve(simulator))
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{port}: {exc.strerror or exc}"
            ) from exc
        except KeyboardInterrupt:
            pass  # Ctrl-C before the signal handler was installed (non-Unix): still clean
        self.stdout.write("IB Gateway simulator stopped")

    async def _serve(self, simulator: GatewaySimulator) -> None:
        """Listen until SIGINT/SIGTERM, then close the server and all connections."""
        await simulator.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        self.stdout.write(
            f"IB Gateway simulator listening on {simulator.host}:{simulator.port} "
            f"({len(simulator.positions())} positions, "
            f"accounts: {', '.join(simulator.accounts)})"
        )
        self.stdout.flush()
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await simulator.stop()


def add_portfolio_arguments(parser: CommandParser) -> None:
    """The options that choose the portfolio a simulator serves (this command's and
    `ibkr_flex_simulator`'s): the sample, a JSON file, or a generated one."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--positions",
        metavar="FILE",
        type=Path,
        help=f"Portfolio JSON file (default: {SAMPLE_PORTFOLIO_PATH.name}).",
    )
    source.add_argument(
        "--generate", metavar="N", type=int, help="Serve N generated positions instead."
    )
    parser.add_argument(
        "--accounts", metavar="K", type=int, default=2, help="Accounts for --generate."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for --generate.")


def portfolio_of(options: dict[str, Any]) -> Portfolio:
    """The portfolio `add_portfolio_arguments`' options choose; CommandError if they are
    wrong."""
    if options["generate"] is not None:
        if options["generate"] < 0 or options["accounts"] < 1:
            raise CommandError("--generate must be >= 0 and --accounts >= 1")
        return generate_portfolio(
            options["generate"], accounts=options["accounts"], seed=options["seed"]
        )
    path = options["positions"] or SAMPLE_PORTFOLIO_PATH
    try:
        return load_portfolio(path)
    except PortfolioError as exc:
        raise CommandError(str(exc)) from exc
