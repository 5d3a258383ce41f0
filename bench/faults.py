"""The fault matrix, measured: every gateway fault, N syncs each, through the real client.

For each fault of `tests/reliability/matrix.py` it runs N syncs against the bundled IB
Gateway simulator (a sample portfolio already synced), and counts a failure as handled
cleanly when the sync raised the fault's own error (hence its HTTP status and exit code),
recorded a failed SyncRun with that code, left no running SyncRun, and changed no
position. It prints one Markdown table row per fault: runs, handled cleanly, positions
lost (a position changed, closed or deleted by a failed sync; must be 0) and the time to
the error (median and worst), with the timeouts it was measured under.

Usage:
  python bench/faults.py [--runs 20] [--timeout 1]
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/portfolio python bench/faults.py

It uses a throw-away database (a temporary SQLite file, or faults_<name> on PostgreSQL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portfolio_site.settings")
# Production-like settings (DEBUG off), with what they then require.
for name, value in {
    "DEBUG": "false",
    "SECRET_KEY": "benchmark-only",
    "ALLOWED_HOSTS": "testserver",
}.items():
    os.environ.setdefault(name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="syncs per fault")
    parser.add_argument("--timeout", type=float, default=1.0, help="connect and request timeout")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.models import SyncRun
    from ibkr_sync.services import sync_positions
    from ibkr_sync.testing import GatewaySimulator, load_sample_portfolio
    from portfolio.models import Position
    from tests.reliability.matrix import GATEWAY_FAULTS, provoke

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        db.setdefault("TEST", {})["NAME"] = str(Path(tempfile.mkdtemp()) / "faults.sqlite3")
    else:
        db.setdefault("TEST", {})["NAME"] = f"faults_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)

    simulator = GatewaySimulator(load_sample_portfolio())
    simulator.start_in_thread()
    settings.IBKR_HOST = "127.0.0.1"
    settings.IBKR_CLIENT_ID = 41
    settings.IBKR_CONNECT_TIMEOUT = settings.IBKR_REQUEST_TIMEOUT = args.timeout

    def state():
        return sorted(
            Position.objects.values_list(
                "account_id", "instrument_id", "quantity", "average_cost", "closed_at"
            )
        )

    try:
        settings.IBKR_PORT = simulator.port
        baseline = sync_positions(trigger=SyncRun.Trigger.COMMAND)
        before = state()
        engine = db["ENGINE"].rsplit(".", 1)[-1]
        print(
            f"{args.runs} syncs per fault, {baseline.processed} positions held, database "
            f"{engine}, client {settings.IBKR_CLIENT_LIBRARY}, connect and request timeouts "
            f"{args.timeout:g} s\n"
        )
        print("| fault | phase | runs | handled cleanly | positions lost | "
              "time to error, median / max | API | exit |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        total_lost = 0
        for fault in GATEWAY_FAULTS:
            clean, lost, times = 0, 0, []
            for _ in range(args.runs):
                with provoke(fault, simulator) as port:
                    settings.IBKR_PORT = port
                    started = time.perf_counter()
                    try:
                        sync_positions(trigger=SyncRun.Trigger.COMMAND)
                        error = None
                    except Exception as exc:
                        error = exc
                    times.append(time.perf_counter() - started)
                run = SyncRun.objects.first()
                after = state()
                lost += sum(1 for row in before if row not in after)
                clean += (
                    type(error) is fault.error
                    and (run.status, run.error_code) == ("failed", fault.code)
                    and not SyncRun.objects.filter(status="running").exists()
                    and after == before
                )
                # The gateway frees the client id once it notices the closed socket.
                deadline = time.monotonic() + 2
                while simulator.active_client_ids and time.monotonic() < deadline:
                    time.sleep(0.01)
            total_lost += lost
            print(
                f"| {fault.name} | {fault.phase} | {args.runs} | {clean} | {lost} | "
                f"{statistics.median(times):.3f} / {max(times):.3f} s | "
                f"{fault.http_status} | {fault.exit_code} |"
            )
        settings.IBKR_PORT = simulator.port
        assert sync_positions(trigger=SyncRun.Trigger.COMMAND).unchanged == baseline.processed
        print(f"\npositions lost in total: {total_lost}; the next sync after them all succeeded")
    finally:
        simulator.stop_thread()
        connection.creation.destroy_test_db(db["NAME"], verbosity=0)


if __name__ == "__main__":
    main()
