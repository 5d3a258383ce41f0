"""Fan-out: many connections synced by a few Celery workers, against syncing them one by one.

N connections (Connection rows), each an IB Gateway simulator in a process of its own
with M positions in accounts and contracts of its own, are synced

1. directly through the service, one after another (`services.sync_positions`): the sum
   of the single-sync times (their first syncs, which create the rows, come before and
   are not counted);
2. on the task queue (IBKR_SYNC_TASK_QUEUE=celery): all N queued at once
   (`services.queue_all`, as `sync_ibkr --all --queue`) and run by W workers
   (`celery -A portfolio_site worker --concurrency 1` each) on a real Redis: the wall time
   from the call to queue_all to the last run's end, and its ratio to (sum / W) (goal: at most 1.3);
3. one at a time on the idle queue: the queue's overhead per sync, the time from
   queue_sync to the run's end minus the run's own duration (its claim to its end),
   against the same for a direct service call (goal: at most 50 ms more, median);
4. the fan-out again with one more connection first in the queue, whose gateway accepts
   the connection and never answers (its connect timeout --hang-timeout): it fails on its
   timeout, every other sync succeeds, and they end later than in 2. by no more than its
   timeout.

The workers have run one round of syncs before 2. is timed (their imports and first
connections are not measured). Positions only (no account values) unless --values.

Usage:
  python bench/fanout_bench.py                      # 100 connections x 500 positions, 4 workers
  python bench/fanout_bench.py --connections 10 --positions 100 --workers 2
  python bench/fanout_bench.py --database-url postgres://postgres@127.0.0.1:5432/portfolio

Redis: --redis-url (default redis://127.0.0.1:6379), database --redis-db (default 6), which
must be empty (the benchmark refuses one holding keys, and empties its own at the end).
Database: a temporary SQLite file, or a fresh `fanout_<name>` on the PostgreSQL server
of --database-url (dropped at the end). --json prints the figures as one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Contract ids of one simulator start this far from the next one's (no contract shared).
CON_ID_SPACING = 10_000_000
GOAL_RATIO, GOAL_OVERHEAD = 1.3, 0.050
#: The connection whose gateway never answers: first in name order, so first in the queue.
HANGING = "a-hang"


def account_ids(index: int, accounts: int) -> list[str]:
    """The `index`th connection's own account ids."""
    return [f"DU{3_000_000 + index * 10 + i:07d}" for i in range(1, accounts + 1)]


# --- a simulator, in a process of its own -----------------------------------------------------


def serve_simulator(index: int, positions: int, accounts: int) -> None:
    """Serve a generated portfolio on a free port; print the port; stop when stdin closes."""
    from ibkr_sync.testing.portfolio import generate_portfolio
    from ibkr_sync.testing.simulator import GatewaySimulator

    portfolio = generate_portfolio(
        positions,
        accounts=account_ids(index, accounts),
        seed=index,
        first_con_id=100_000_000 + index * CON_ID_SPACING,
    )

    async def serve() -> None:
        simulator = GatewaySimulator(portfolio, host="127.0.0.1", port=0)
        await simulator.start()
        print(simulator.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await simulator.stop()

    asyncio.run(serve())


class Simulators:
    def __init__(self, count: int, positions: int, accounts: int) -> None:
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--simulator",
                    str(i),
                    "--positions",
                    str(positions),
                    "--accounts",
                    str(accounts),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(count)
        ]
        self.ports = []
        for process in self.processes:
            line = process.stdout.readline()
            if not line.strip().isdigit():
                raise SystemExit(f"a simulator did not start: {line!r}")
            self.ports.append(int(line))

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class SilentGateway:
    """Accepts connections and never says a word: a gateway that hangs."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.server.accept()[0])

    def stop(self) -> None:
        self.server.close()
        for conn in self.accepted:
            conn.close()


# --- workers ---------------------------------------------------------------------------------


class Workers:
    """W `celery -A portfolio_site worker --concurrency 1`, each in a process group of its
    own, their logs in files."""

    def __init__(self, count: int, env: dict[str, str], logs: Path, pool: str) -> None:
        self.processes: list[subprocess.Popen] = []
        self.logs = [logs / f"worker{i}.log" for i in range(count)]
        for i, log in enumerate(self.logs):
            with log.open("w") as handle:
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "celery",
                            "-A",
                            "portfolio_site",
                            "worker",
                            "--loglevel",
                            "INFO",
                            "--concurrency",
                            "1",
                            "--pool",
                            pool,
                            "--hostname",
                            f"fanout{i}@%h",
                            "--without-gossip",
                            "--without-mingle",
                            "--without-heartbeat",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 120
        for process, log in zip(self.processes, self.logs, strict=True):
            while " ready." not in log.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"a worker did not start:\n{log.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        """Celery's warm shutdown (SIGTERM), then SIGKILL to what is left."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- the database and Redis ----------------------------------------------------------------------


def create_database(url: str | None, workdir: Path) -> tuple[str, Any]:
    """A fresh database for the benchmark: its URL, and how to drop it."""
    if not url:
        path = workdir / "fanout.sqlite3"
        return f"sqlite:///{path}", lambda: None
    import environ
    import psycopg

    config = environ.Env.db_url_config(url)
    if not config["ENGINE"].endswith("postgresql"):
        raise SystemExit(f"--database-url must be a PostgreSQL URL (or left out): {url!r}")
    name = f"fanout_{config['NAME']}"
    server = {
        "host": config.get("HOST") or "127.0.0.1",
        "port": int(config.get("PORT") or 5432),
        "user": config.get("USER") or "postgres",
        "password": config.get("PASSWORD") or None,
    }

    def admin(statement: str) -> None:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as conn:
            conn.execute(statement)

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    return (
        urlunsplit(urlsplit(url)._replace(path=f"/{name}")),
        lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'),
    )


def empty_redis(url: str, db: int) -> Any:
    """A client of Redis database `db`, which must be empty (nothing of anyone's is lost)."""
    import redis

    client = redis.Redis.from_url(url, db=db, socket_timeout=5)
    try:
        keys = client.dbsize()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis does not answer at {url} (database {db}): {exc}") from None
    if keys:
        raise SystemExit(
            f"Redis database {db} at {url} holds {keys} keys: name an empty one with "
            "--redis-db (the benchmark empties its database when it ends)."
        )
    return client


# --- the measurements --------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis_client = empty_redis(args.redis_url, args.redis_db)
    broker = urlunsplit(urlsplit(args.redis_url)._replace(path=f"/{args.redis_db}"))
    database_url, drop_database = create_database(args.database_url, workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IBKR_", "CELERY_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="portfolio_site.settings",
        ENV_FILE="",  # no developer's .env
        DATABASE_URL=database_url,
        DEBUG="false",
        SECRET_KEY="benchmark-only",
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="false",
        IBKR_SYNC_TASK_QUEUE="celery",
        CELERY_BROKER_URL=broker,
        IBKR_READ_VALUES="true" if args.values else "false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    simulators = silent = None
    try:
        started = time.perf_counter()
        simulators = Simulators(args.connections, args.positions, args.accounts)
        print(f"{args.connections} simulators up in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)  # fmt: skip
        silent = SilentGateway()
        return run_phases(args, env, workdir, simulators, silent, lambda: Workers(
            args.workers, env, workdir, args.pool))  # fmt: skip
    finally:
        if simulators is not None:
            simulators.stop()
        if silent is not None:
            silent.stop()
        from django.db import connections

        connections.close_all()
        drop_database()
        redis_client.flushdb()  # it was empty: only the benchmark's keys
        redis_client.close()


def run_phases(args, env, workdir, simulators, silent, start_workers) -> dict[str, Any]:
    from ibkr_sync import services
    from ibkr_sync.models import Connection, SyncRun

    trigger = SyncRun.Trigger.COMMAND
    names = [f"gw{i:03d}" for i in range(args.connections)]
    for name, port in zip(names, simulators.ports, strict=True):
        Connection.objects.create(name=name, host="127.0.0.1", port=port, client_id=1)

    def direct(name: str) -> tuple[float, float]:
        """A direct sync: its wall time and its run's own duration."""
        began = time.perf_counter()
        result = services.sync_positions(connection=name, trigger=trigger)
        wall = time.perf_counter() - began
        run = SyncRun.objects.get(pk=result.sync_run_id)
        return wall, (run.finished_at - run.started_at).total_seconds()

    for name in names:  # the first syncs: every row created
        direct(name)
    singles = [direct(name) for name in names]
    sum_of_singles = sum(wall for wall, _ in singles)
    print(f"sum of {len(names)} single syncs: {sum_of_singles:.2f} s", file=sys.stderr)

    workers = start_workers()
    try:
        fan_out(names, services, trigger)  # warm-up: every worker's first syncs
        runs, began = fan_out(names, services, trigger)
        queued_in = runs[-1].queued_at.timestamp() - began
        failed = [r for r in runs if r.status != SyncRun.Status.SUCCESS]
        if failed:
            raise SystemExit(f"{len(failed)} queued syncs failed: {failed[0].error_message}")
        wall = max(r.finished_at.timestamp() for r in runs) - began
        durations = [(r.finished_at - r.started_at).total_seconds() for r in runs]

        overhead, direct_overhead = [], []
        for name in names[: args.overhead_samples]:
            began_one = time.time()
            run = services.queue_sync(connection=name, trigger=trigger)
            (run,) = wait_for([run.pk], SyncRun)
            overhead.append(
                run.finished_at.timestamp() - began_one
                - (run.finished_at - run.started_at).total_seconds()
            )  # fmt: skip
            one_wall, one_duration = direct(name)
            direct_overhead.append(one_wall - one_duration)

        Connection.objects.create(
            name=HANGING, host="127.0.0.1", port=silent.port, client_id=1,
            connect_timeout=args.hang_timeout, request_timeout=args.hang_timeout,
        )  # fmt: skip
        runs, began = fan_out([HANGING, *names], services, trigger)
        hung, others = runs[0], runs[1:]
        others_failed = [r for r in others if r.status != SyncRun.Status.SUCCESS]
        others_wall = max(r.finished_at.timestamp() for r in others) - began
    finally:
        workers.stop()

    ideal = sum_of_singles / args.workers
    median = statistics.median
    return {
        "cores": os.cpu_count(),
        "connections": args.connections,
        "positions": args.positions,
        "accounts": args.accounts,
        "workers": args.workers,
        "database": "postgresql" if args.database_url else "sqlite",
        "sum_of_singles": sum_of_singles,
        "single_median": median(w for w, _ in singles),
        "fan_out_wall": wall,
        "ratio": wall / ideal,
        # The machine cannot run more syncs at once than it has cores.
        "queued_in": queued_in,
        "fan_out_run_median": statistics.median(durations),
        "busy_workers": sum(durations) / wall,
        "ratio_to_cores": wall / (sum_of_singles / min(args.workers, os.cpu_count() or 1)),
        "load_average": os.getloadavg()[0],
        "queued_overhead_median": median(overhead),
        "queued_overhead_max": max(overhead),
        "direct_overhead_median": median(direct_overhead),
        "queue_overhead": median(overhead) - median(direct_overhead),
        "overhead_samples": len(overhead),
        "hang": {
            "timeout": args.hang_timeout,
            "status": hung.status,
            "error_code": hung.error_code,
            "duration": (hung.finished_at - hung.started_at).total_seconds(),
            "others_failed": len(others_failed),
            "others_wall": others_wall,
            "others_delay": others_wall - wall,
            "others_longest_sync": max(
                (r.finished_at - r.started_at).total_seconds() for r in others
            ),
        },
    }


def fan_out(names: list[str], services: Any, trigger: str) -> tuple[list[Any], float]:
    """Queue a sync of every connection at once, as `sync_ibkr --all --queue` does
    (`services.queue_all`, in name order: `names`, every enabled connection); wait for
    every run to end. The runs (in the order queued) and the moment they were queued."""
    from ibkr_sync.models import SyncRun

    began = time.time()
    outcomes = services.queue_all(trigger=trigger)
    if [o.connection for o in outcomes] != names or any(o.error for o in outcomes):
        raise SystemExit(f"queue_all did not queue {names[:3]}...: {outcomes[:3]}")
    return wait_for([o.run.pk for o in outcomes], SyncRun), began


def wait_for(ids: list[int], model: Any, timeout: float = 3600) -> list[Any]:
    ended = ("success", "failed")
    deadline = time.monotonic() + timeout
    while model.objects.filter(pk__in=ids, status__in=ended).count() < len(ids):
        if time.monotonic() > deadline:
            raise SystemExit("the queued syncs did not all end within an hour")
        time.sleep(0.01 if len(ids) == 1 else 0.1)
    runs = model.objects.in_bulk(ids)
    return [runs[pk] for pk in ids]


def report(figures: dict[str, Any]) -> None:
    f, hang = figures, figures["hang"]
    print(
        f"{f['connections']} connections x {f['positions']} positions ({f['accounts']} account"
        f"{'s' if f['accounts'] > 1 else ''} each), {f['workers']} workers, {f['database']}, "
        f"{f['cores']} cores (load average {f['load_average']:.1f} at the end)"
    )
    print("| measure | seconds | goal |")
    print("|---|---|---|")
    print(f"| sum of the single syncs (one after another, direct) | {f['sum_of_singles']:.2f} | |")
    print(f"| a single sync (median) | {f['single_median']:.3f} | |")
    print(f"| fan-out wall time (all queued at once) | {f['fan_out_wall']:.2f} | |")
    print(f"| of which queueing them all (`queue_all`) | {f['queued_in']:.3f} | |")
    print(
        f"| a sync in the fan-out (median; workers busy on average: "
        f"{f['busy_workers']:.2f}) | {f['fan_out_run_median']:.3f} | |"
    )
    print(
        f"| fan-out / (sum / {f['workers']}) | {f['ratio']:.2f}x | at most {GOAL_RATIO}x "
        f"({'met' if f['ratio'] <= GOAL_RATIO else 'NOT met'}) |"
    )
    cores = min(f["workers"], f["cores"])
    print(f"| fan-out / (sum / {cores}, the cores it can use) | {f['ratio_to_cores']:.2f}x | |")
    print(
        f"| queue_sync to the run's end, minus the run's duration (median of "
        f"{f['overhead_samples']}; max {f['queued_overhead_max'] * 1000:.0f} ms) | "
        f"{f['queued_overhead_median']:.4f} | |"
    )
    print(f"| the same for a direct service call (median) | {f['direct_overhead_median']:.4f} | |")
    met = "met" if f["queue_overhead"] <= GOAL_OVERHEAD else "NOT met"
    print(
        f"| the queue's overhead per sync | {f['queue_overhead']:.4f} | at most "
        f"{GOAL_OVERHEAD} ({met}) |"
    )
    print(
        f"| a hanging gateway (timeout {hang['timeout']:g} s): its run {hang['status']} "
        f"({hang['error_code']}) after | {hang['duration']:.2f} | its timeout |"
    )
    bound = "within" if hang["others_delay"] <= hang["timeout"] else "BEYOND"
    print(
        f"| the others ({hang['others_failed']} failed) ended later than without it by | "
        f"{hang['others_delay']:.2f} | {bound} its timeout |"
    )
    print(f"| the longest of the others' syncs | {hang['others_longest_sync']:.3f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100, help="N connections")
    parser.add_argument("--positions", type=int, default=500, help="M positions each")
    parser.add_argument("--accounts", type=int, default=1, help="accounts per connection")
    parser.add_argument("--workers", type=int, default=4, help="W worker processes")
    parser.add_argument(
        "--pool",
        default="prefork",
        choices=("prefork", "solo"),
        help="each worker's pool (prefork: a parent and its child process; "
        "solo: the task runs in the worker's own process)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=6, help="an empty Redis database")
    parser.add_argument("--database-url", help="PostgreSQL server (default: a SQLite file)")
    parser.add_argument("--hang-timeout", type=float, default=5.0,
                        help="the hanging gateway's connect timeout, seconds")  # fmt: skip
    parser.add_argument("--overhead-samples", type=int, default=20,
                        help="syncs queued one at a time for the overhead")  # fmt: skip
    parser.add_argument("--values", action="store_true", help="read account values too")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, last")
    parser.add_argument("--simulator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulator is not None:
        serve_simulator(args.simulator, args.positions, args.accounts)
        return
    for name in ("connections", "positions", "accounts", "workers", "overhead_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.redis_db <= 15:
        parser.error("--redis-db must be 0..15")
    if not 0 < args.hang_timeout <= 3600:
        parser.error("--hang-timeout must be more than 0 and at most 3600 seconds")
    with tempfile.TemporaryDirectory(prefix="fanout-") as workdir:
        figures = measure(args, Path(workdir))
    report(figures)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
