"""How fast is a sync of a large portfolio, end to end?

Starts the bundled IB Gateway simulator with N generated positions across K accounts,
then times, through the real IB client library over TCP and a real database:

  read      connect + read every position (the gateway adapter alone)
  first     a sync into an empty database (everything created)
  unchanged the same sync again (nothing written)
  changed   a sync after 1% of quantities changed and 1% of positions closed

Usage:
  python bench/sync_benchmark.py [--positions 10000] [--accounts 5] [--repeat 3]
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/portfolio python bench/sync_benchmark.py

It uses a throw-away database (a temporary SQLite file, or bench_<name> on PostgreSQL).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portfolio_site.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; best is shown")
    parser.add_argument("--library", default=None, help="ib_insync or ib_async")
    args = parser.parse_args()
    if args.library:
        os.environ["IBKR_CLIENT_LIBRARY"] = args.library

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.gateway import IbkrGateway
    from ibkr_sync.models import SyncRun
    from ibkr_sync.services import sync_positions
    from ibkr_sync.testing import GatewaySimulator, generate_portfolio

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        db.setdefault("TEST", {})["NAME"] = str(Path(tempfile.mkdtemp()) / "bench.sqlite3")
    else:  # not test_<name>: a test run may be using that one
        db.setdefault("TEST", {})["NAME"] = f"bench_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)

    started = time.perf_counter()
    portfolio = generate_portfolio(args.positions, accounts=args.accounts, seed=1)
    generated = time.perf_counter() - started
    simulator = GatewaySimulator(portfolio, port=0)
    simulator.start_in_thread()
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", simulator.port
    settings.IBKR_REQUEST_TIMEOUT = 600

    def best(step, repeat=args.repeat):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = step()
            times.append(time.perf_counter() - t0)
        return min(times), result

    def sync():
        return sync_positions(trigger=SyncRun.Trigger.COMMAND)

    try:
        engine = db["ENGINE"].rsplit(".", 1)[-1]
        print(
            f"{args.positions} positions in {args.accounts} accounts, client library "
            f"{settings.IBKR_CLIENT_LIBRARY}, database {engine}, Python "
            f"{sys.version.split()[0]} (portfolio generated in {generated:.2f} s)"
        )
        read_time, snapshot = best(lambda: IbkrGateway().fetch_positions())
        assert len(snapshot.positions) == args.positions, len(snapshot.positions)
        report("read (connect + all positions)", read_time, args.positions)

        first_time, result = best(sync, repeat=1)
        assert result.created == args.positions, result
        report("first sync (all created)", first_time, args.positions)

        unchanged_time, result = best(sync)
        assert result.unchanged == args.positions, result
        report("re-sync, nothing changed", unchanged_time, args.positions)

        step = 100
        changed = portfolio.positions[::step]
        for pos in changed:
            simulator.upsert_position(
                dataclasses.replace(pos, quantity=pos.quantity + Decimal("0.5"))
            )
        for pos in portfolio.positions[step // 2 :: step]:
            simulator.remove_position(pos.account, pos.con_id)
        changed_time, result = best(sync, repeat=1)
        assert result.updated == len(changed), result
        report(
            f"re-sync, {result.updated} changed + {result.closed} closed", changed_time,
            args.positions,
        )  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak memory (whole process, incl. simulator): {peak:.0f} MiB")
    finally:
        simulator.stop_thread()
        connection.creation.destroy_test_db(db["NAME"], verbosity=0)


def report(label: str, seconds: float, n: int) -> None:
    print(f"  {label:<40} {seconds:8.3f} s  ({n / seconds:,.0f} positions/s)")


if __name__ == "__main__":
    main()
