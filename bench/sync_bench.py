"""How close to the gateway's own speed does a sync of a large portfolio run?

For each portfolio size N and account count K, the bundled IB Gateway simulator is
started in a process of its own with N generated positions across K accounts, and each
measurement runs in a fresh Python process (so its peak memory is its own):

  raw        the naive read: ib_insync `IB.connect()` + `reqPositions()`, no database
             (connect already streams every position, reqPositions streams them again)
  first      a sync into an empty database (every account, instrument, position created)
  unchanged  the same sync again (best of --repeat; nothing may be written)
  changed    a sync after 10% of quantities changed and 5% of positions closed
  with values  the product's sync as it runs by default: positions and, in the same
             connection, every account's values (cash, net liquidation, P&L, each
             position's market value), after every price moved (best of --repeat)

The first three steps read positions only (IBKR_READ_VALUES=false), as the naive baseline
does; "with values" is measured beside them in the same run, against the same raw read.

for the product's set-based sync and, as the baseline, a naive per-row
`update_or_create` sync kept only here. Each row shows seconds, the ratio to the raw
read, queries issued, rows written and the process's peak RSS up to the end of that step
(steps run in the order shown, in one process).

    python bench/sync_bench.py                                # the full matrix
    python bench/sync_bench.py --positions 10000 --accounts 1 --databases sqlite
    python bench/sync_bench.py --changelist 100000            # admin at scale
    python bench/sync_bench.py --models default,swapped       # also into a host's own models

PostgreSQL is reached with --postgres-url (default: postgres://postgres@127.0.0.1:5432/
portfolio); the benchmark creates and drops its own database `bench_<name>` there, and
uses a temporary SQLite file otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/portfolio"
CHANGED_EVERY, CLOSED_EVERY = 10, 20  # 10% of quantities changed, 5% of positions closed
SEED = 1


# --- the simulator, in a process of its own ------------------------------------------------


def _simulator_process(conn: Any, positions: int, accounts: int) -> None:
    from ibkr_sync.testing import GatewaySimulator, generate_portfolio

    portfolio = generate_portfolio(positions, accounts=accounts, seed=SEED)
    simulator = GatewaySimulator(portfolio, port=0)
    simulator.start_in_thread()
    conn.send(simulator.port)
    while True:
        command = conn.recv()
        if command == "mutate":
            rows = simulator.positions()
            changed = rows[::CHANGED_EVERY]
            closed = rows[CHANGED_EVERY // 2 :: CLOSED_EVERY]
            untouched = {p.key for p in rows} - {p.key for p in changed + closed}
            simulator.set_positions(
                [p.with_quantity(p.quantity + Decimal("0.5")) for p in changed]
                + [p for p in rows if p.key in untouched]
            )
            conn.send((len(changed), len(closed)))
        elif command == "move prices":
            simulator.move_prices("1.01")
            conn.send("moved")
        elif command == "stop":
            simulator.stop_thread()
            conn.send("stopped")
            return


class Simulator:
    def __init__(self, positions: int, accounts: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_simulator_process, args=(child, positions, accounts), daemon=True
        )
        self.process.start()
        if not self.conn.poll(300):
            raise RuntimeError("the simulator did not start")
        self.port = self.conn.recv()

    def mutate(self) -> tuple[int, int]:
        self.conn.send("mutate")
        return self.conn.recv()

    def move_prices(self) -> None:
        self.conn.send("move prices")
        self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.process.join(10)


# --- workers: one measurement each, in a fresh process --------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The naive read through ib_insync, with no database."""
    import ib_insync

    simulator = Simulator(args.positions, args.accounts)
    try:
        times = []
        for attempt in range(args.repeat):
            ib = ib_insync.IB()
            started = time.perf_counter()
            ib.connect(
                "127.0.0.1", simulator.port, clientId=100 + attempt, timeout=600, readonly=True
            )
            rows = [p for p in ib.reqPositions() if p.position != 0]
            times.append(time.perf_counter() - started)
            ib.disconnect()
            assert len(rows) == args.positions, len(rows)
    finally:
        simulator.stop()
    return {"seconds": min(times), "rss": peak_rss_mib()}


#: --models: the project's own models, or a host's (bench/swapped_host) named in the
#: IBKR_SYNC_*_MODEL settings, with our portfolio app left out.
SETTINGS_MODULES = {"default": "portfolio_site.settings", "swapped": "bench.swapped_settings"}


def setup_django(database: str, models: str = "default") -> None:
    """Production-like settings: DEBUG off (no query log), the given database."""
    os.environ.update(
        DATABASE_URL=database,
        DEBUG="false",
        SECRET_KEY="benchmark-only",
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="false",
    )
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULES[models]
    import django

    django.setup()


def worker_sync(args: argparse.Namespace) -> dict[str, Any]:
    setup_django(args.database, args.models)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.models import SyncRun
    from ibkr_sync.services import sync_positions

    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        db.setdefault("TEST", {})["NAME"] = str(Path(tempfile.mkdtemp()) / "bench.sqlite3")
    else:  # its own database, never one a test run may be using
        db.setdefault("TEST", {})["NAME"] = f"bench_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    simulator = Simulator(args.positions, args.accounts)
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", simulator.port
    settings.IBKR_REQUEST_TIMEOUT = 600
    settings.IBKR_VALUES_TIMEOUT = 600
    settings.IBKR_READ_VALUES = False
    if args.implementation == "naive":
        from ibkr_sync.gateway import IbkrGateway

        def sync() -> dict[str, int]:
            return naive_sync(IbkrGateway().fetch_positions())
    else:

        def sync() -> dict[str, int]:
            result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
            return {k: getattr(result, k) for k in ("created", "updated", "unchanged", "closed")}

    steps = {}
    try:
        steps["first"] = measure(connection, sync, repeat=1)
        assert steps["first"]["counts"]["created"] == args.positions, steps["first"]
        steps["unchanged"] = measure(connection, sync, repeat=args.repeat)
        assert steps["unchanged"]["counts"]["unchanged"] == args.positions, steps["unchanged"]
        changed, closed = simulator.mutate()
        steps["changed"] = measure(connection, sync, repeat=1)
        counts = steps["changed"]["counts"]
        assert (counts["updated"], counts["closed"]) == (changed, closed), counts
        if args.implementation != "naive":
            settings.IBKR_READ_VALUES = True

            def with_values() -> dict[str, int]:
                result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
                missing = [a for a, v in result.account_values.items() if v["status"] != "read"]
                assert not missing, result.account_values
                valued = sum(v["positions_valued"] for v in result.account_values.values())
                assert valued == args.positions - closed, valued
                return {"unchanged": result.unchanged, "valued": valued}

            steps["with values"] = measure(
                connection, with_values, repeat=args.repeat, before=simulator.move_prices
            )
    finally:
        simulator.stop()
        connection.creation.destroy_test_db(db["NAME"], verbosity=0)
    return {"steps": steps, "rss": peak_rss_mib()}


def measure(connection: Any, step: Any, repeat: int, before: Any = None) -> dict[str, Any]:
    """Best time of `repeat` runs, with the queries and rows written of the last; `before`
    (not timed) prepares each run."""
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        tally: Counter = Counter()
        with connection.execute_wrapper(_counting(tally)):
            started = time.perf_counter()
            counts = step()
            best = min(best, time.perf_counter() - started)
    return {
        "seconds": best,
        "rss": peak_rss_mib(),  # the process's peak so far: what this step added shows
        "queries": tally["queries"],
        "written": tally["written"],
        "mirrored": tally["positions+instruments"],
        "counts": counts,
    }


def _counting(tally: Counter) -> Any:
    mirrored = _mirrored_tables()

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        tally["queries"] += 1
        statement = sql.lstrip()[:6].upper()
        if statement.startswith("WITH"):  # WITH v AS (VALUES ...) UPDATE ...
            statement = "UPDATE" if " UPDATE " in sql else statement
        if statement in ("INSERT", "UPDATE", "DELETE"):
            rows = context["cursor"].rowcount
            if rows <= 0 and statement == "INSERT":  # SQLite with RETURNING: count the rows
                values = sql.split(" VALUES ", 1)[-1].split(" ON CONFLICT")[0]
                rows = values.split(" RETURNING")[0].count("(")
            elif rows <= 0 and sql.lstrip().upper().startswith("WITH"):
                # SQLite reports no row count for WITH ... UPDATE: the rows it was given
                rows = sql.split(" VALUES ", 1)[-1].split(") UPDATE ")[0].count("(")
            table = sql.split('"')[1] if '"' in sql else "?"
            tally["written"] += max(rows, 0)
            if table in mirrored:
                tally["positions+instruments"] += max(rows, 0)
        return result

    return wrapper


def _mirrored_tables() -> tuple[str, str]:
    from ibkr_sync import conf

    return (conf.position_model()._meta.db_table, conf.instrument_model()._meta.db_table)


def naive_sync(snapshot: Any) -> dict[str, int]:
    """The baseline: what a straightforward implementation does, one row at a time.

    One transaction (without it SQLite would commit per row and be far slower still),
    `update_or_create` per instrument and per position, a save per closed position.
    """
    from django.db import transaction
    from django.utils import timezone

    from ibkr_sync.mapping import BROKER, map_position
    from portfolio.models import Account, Instrument, Position

    counts: Counter = Counter()
    now = timezone.now()
    with transaction.atomic():
        seen = set()
        for record in snapshot.positions:
            item = map_position(record)
            account, _ = Account.objects.get_or_create(broker=BROKER, external_id=item.account_id)
            instrument, _ = Instrument.objects.update_or_create(
                broker=BROKER, external_id=item.instrument_id, defaults=item.instrument
            )
            existing = Position.objects.filter(account=account, instrument=instrument).first()
            if existing is None:
                kind = "created"
            elif (existing.quantity, existing.average_cost) != (
                item.position["quantity"],
                item.position["average_cost"],
            ):
                kind = "updated"
            else:
                kind = "unchanged"
            position, _ = Position.objects.update_or_create(
                account=account,
                instrument=instrument,
                defaults={**item.position, "last_synced_at": now, "closed_at": None},
                create_defaults={**item.position, "opened_at": now, "last_synced_at": now},
            )
            counts[kind] += 1
            seen.add(position.pk)
        for position in Position.objects.filter(closed_at__isnull=True).exclude(pk__in=seen):
            position.closed_at = now
            position.save()
            counts["closed"] += 1
    return {k: counts[k] for k in ("created", "updated", "unchanged", "closed")}


def worker_changelist(args: argparse.Namespace) -> dict[str, Any]:
    """Median time and queries of the positions changelist at N rows, by view."""
    setup_django(args.database)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, setup_test_environment

    from ibkr_sync.testing import generate_portfolio
    from portfolio.models import Account, Instrument, Position

    setup_test_environment()
    settings.ALLOWED_HOSTS = ["testserver"]
    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        db.setdefault("TEST", {})["NAME"] = str(Path(tempfile.mkdtemp()) / "bench.sqlite3")
    else:
        db.setdefault("TEST", {})["NAME"] = f"bench_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        _fill(generate_portfolio(args.positions, accounts=args.accounts, seed=SEED))
        admin = get_user_model().objects.create_superuser("bench", "", "bench")
        client = Client()
        client.force_login(admin)
        account = Account.objects.order_by("external_id").first().pk
        # A page deep in the list: the 100th, or the last of a smaller portfolio.
        deep_page = min(100, -(-Position.objects.filter(closed_at__isnull=True).count() // 100))
        views = {
            "first page": "",
            f"page {deep_page}": f"?p={deep_page}",
            "account filter": f"?account__id__exact={account}",
            "sec type OPT + status": "?instrument__sec_type=OPT&status=open",
            "search symbol": "?q=AAPL",
            "sorted by cost basis": "?o=-6",
        }
        rows = {}
        for label, query in views.items():
            url = f"/admin/portfolio/position/{query}"
            times, queries = [], 0
            for _ in range(args.repeat + 2):
                with CaptureQueriesContext(connection) as captured:
                    started = time.perf_counter()
                    response = client.get(url)
                    times.append(time.perf_counter() - started)
                assert response.status_code == 200, (url, response.status_code)
                queries = len(captured)
            rows[label] = {"url": url, "median": statistics.median(times), "queries": queries}
        counts = {"positions": Position.objects.count(), "instruments": Instrument.objects.count()}
    finally:
        connection.creation.destroy_test_db(db["NAME"], verbosity=0)
    return {"views": rows, "counts": counts, "rss": peak_rss_mib()}


def _fill(portfolio: Any) -> None:
    """Load a generated portfolio straight into the tables (setup, not measured)."""
    from django.utils import timezone

    from ibkr_sync.mapping import BROKER, map_position
    from portfolio.models import Account, Instrument, Position

    now = timezone.now()
    accounts = {
        a.external_id: a.pk
        for a in Account.objects.bulk_create(
            Account(broker=BROKER, external_id=a, last_synced_at=now) for a in portfolio.accounts
        )
    }
    mapped = [map_position(p.as_gateway_position()) for p in portfolio.positions]
    instruments = {
        i.external_id: i.pk
        for i in Instrument.objects.bulk_create(
            (
                Instrument(broker=BROKER, external_id=m.instrument_id, **m.instrument)
                for m in mapped
            ),
            batch_size=200,
        )
    }
    closed = {m.instrument_id for m in mapped[::10]}  # every 10th position is closed
    Position.objects.bulk_create(
        (
            Position(
                account_id=accounts[m.account_id],
                instrument_id=instruments[m.instrument_id],
                opened_at=now,
                last_synced_at=now,
                closed_at=now if m.instrument_id in closed else None,
                **m.position,
            )
            for m in mapped
        ),
        batch_size=500,
    )
    from django.db import connection

    if connection.vendor == "postgresql":  # as autovacuum soon would: planner statistics
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")


WORKERS = {"raw": worker_raw, "sync": worker_sync, "changelist": worker_changelist}


# --- the driver ------------------------------------------------------------------------------


def run_worker(kind: str, **options: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {' '.join(command)}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def database_urls(names: list[str], postgres_url: str) -> dict[str, str]:
    urls = {
        "sqlite": f"sqlite:///{Path(tempfile.gettempdir()) / 'bench-unused.sqlite3'}",
        "postgres": postgres_url,
    }
    return {name: urls[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="1000,10000,50000", help="comma-separated N")
    parser.add_argument("--accounts", default="1,20", help="comma-separated K")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the repeatable steps")
    parser.add_argument(
        "--naive-max", type=int, default=10_000, help="largest N to run the naive baseline at"
    )
    parser.add_argument(
        "--changelist",
        type=int,
        default=0,
        metavar="N",
        help="instead: the admin positions changelist with N positions",
    )
    parser.add_argument(
        "--models",
        default="default",
        help="comma-separated: default (the portfolio app's), swapped (a host's own models)",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="product", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.positions, args.accounts = int(args.positions), int(args.accounts)
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import django

    print(f"Python {sys.version.split()[0]}, Django {django.get_version()}, {os.cpu_count()} CPUs")
    dbs = database_urls(args.databases.split(","), args.postgres_url)
    if args.changelist:
        changelist_table(args, dbs)
        return
    row(
        "N",
        "K",
        "database",
        "sync",
        "step",
        "seconds",
        "x raw",
        "queries",
        "rows written",
        "position+instrument writes",
        "peak RSS MiB",
    )
    row(*["---"] * 11)
    for n in map(int, args.positions.split(",")):
        for k in map(int, args.accounts.split(",")):
            raw = run_worker("raw", positions=n, accounts=k, repeat=args.repeat)
            row(
                n,
                k,
                "-",
                "raw read",
                "read",
                f"{raw['seconds']:.3f}",
                "1.00",
                "-",
                "-",
                "-",
                f"{raw['rss']:.0f}",
            )
            for db_name, url in dbs.items():
                impls = [("product", m) for m in args.models.split(",")]
                impls += [("naive", "default")] if n <= args.naive_max else []
                for impl, models in impls:
                    out = run_worker(
                        "sync",
                        positions=n,
                        accounts=k,
                        repeat=args.repeat,
                        database=url,
                        implementation=impl,
                        models=models,
                    )
                    label = impl if models == "default" else f"{impl} ({models} models)"
                    for step, m in out["steps"].items():
                        row(
                            n,
                            k,
                            db_name,
                            label,
                            step,
                            f"{m['seconds']:.3f}",
                            f"{m['seconds'] / raw['seconds']:.2f}",
                            m["queries"],
                            m["written"],
                            m["mirrored"],
                            f"{m['rss']:.0f}",
                        )


def row(*cells: Any) -> None:
    """One line of a Markdown table, printed as soon as it is measured."""
    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


def changelist_table(args: argparse.Namespace, dbs: dict[str, str]) -> None:
    k = int(args.accounts.split(",")[-1])
    print(
        f"Admin positions changelist, {args.changelist} positions in {k} accounts (every "
        "10th closed), median of the requests through Django's test client, logged in.\n"
    )
    row("database", "view", "median ms", "queries")
    row(*["---"] * 4)
    for db_name, url in dbs.items():
        out = run_worker(
            "changelist", positions=args.changelist, accounts=k, repeat=args.repeat, database=url
        )
        for label, view in out["views"].items():
            row(db_name, label, f"{view['median'] * 1000:.1f}", view["queries"])


if __name__ == "__main__":
    main()
