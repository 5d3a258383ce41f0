"""How close to the gateway's own speed does a sync of a large portfolio run?

For each portfolio size N and account count K, the bundled IB Gateway simulator is
started in a process of its own with N generated positions across K accounts (and read
once, untimed, so that it has every frame's texts at hand as a gateway does), and each
measurement runs in a fresh Python process (so its peak memory is its own):

  wire       the bare wire read, no client library: the TWS API handshake ("API\\0" and
             the version range), startApi, then reqPositions until positionEnd, every
             frame cut out of the stream and split into its fields
  raw        the naive read: ib_insync `IB.connect()` + `reqPositions()`, no database
             (connect already streams every position, reqPositions streams them again)
  first      a sync into an empty database (every account, instrument, position created)
  unchanged  the same sync again (median of --repeat; nothing may be written)
  changed    a sync after 10% of quantities changed and 5% of positions closed
  with values  the product's sync as it runs by default: positions and, in the same
             connection, every account's values (cash, net liquidation, P&L, each
             position's market value), after every price moved (median of --repeat)

The sync steps before "with values" read positions only (IBKR_READ_VALUES=false), as the
two reads do; "with values" is measured beside them in the same run.

--floor adds, after the product's steps, the least the database itself takes to store the
first sync's rows (`bench/floor.py`: the rows the product's first sync created, written
again with PostgreSQL's COPY or SQLite's executemany in one transaction, no ORM), and the
bound it implies: the wire read and that floor against the goal (at most 4 x the wire
read). With --connections, it adds the CPU seconds a sync alone costs in every process it
involves (its own, its simulator's, the database server's backend), and the least wall
time of two at once that this CPU allows on the machine's cores.

for the product's set-based sync and, as the baseline, a naive per-row
`update_or_create` sync kept only here. Each row shows seconds (the median of --repeat
runs, and of --runs fresh processes), the ratios to the raw and to the wire read, queries
issued, rows written and the process's peak RSS up to the end of that step (steps run in
the order shown, in one process).

    python bench/sync_bench.py                                # the full matrix
    python bench/sync_bench.py --positions 10000 --accounts 20 --runs 3 --naive-max 0
    python bench/sync_bench.py --profile 30 --positions 10000 --accounts 20  # cProfile
    python bench/sync_bench.py --connections 10 --positions 1000 --accounts 2
    python bench/sync_bench.py --positions 10000 --accounts 20 --naive-max 0 --floor
    python bench/sync_bench.py --changelist 100000            # admin at scale
    python bench/sync_bench.py --models default,swapped       # also into a host's own models

--connections C: C connections (Connection rows), each a simulator of its own process
with --positions positions in --accounts accounts of its own and no contract in common;
the C single syncs (`sync_positions(connection=name)`), `sync_all()`, and two connections
synced at the same moment by two processes, beside each of them synced alone.

PostgreSQL is reached with --postgres-url (default: postgres://postgres@127.0.0.1:5432/
portfolio); the benchmark creates and drops its own database `bench_<name>` there, and
uses a temporary SQLite file otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import statistics
import struct
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

from ibkr_sync.testing.wire import (  # noqa: E402  (standard library only, no Django)
    ClientMsg,
    ServerMsg,
    handshake_bytes,
    make_message,
)

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/portfolio"
CHANGED_EVERY, CLOSED_EVERY = 10, 20  # 10% of quantities changed, 5% of positions closed
SEED = 1


# --- the simulator, in a process of its own ------------------------------------------------


def _simulator_process(conn: Any, positions: int, accounts: Any, first_con_id: int) -> None:
    from ibkr_sync.testing import GatewaySimulator, generate_portfolio

    portfolio = generate_portfolio(
        positions, accounts=accounts, seed=SEED, first_con_id=first_con_id
    )
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
        elif command == "cpu":  # this process's CPU seconds, every thread's
            conn.send(time.process_time())
        elif command == "move prices":
            simulator.move_prices("1.01")
            conn.send("moved")
        elif command == "stop":
            simulator.stop_thread()
            conn.send("stopped")
            return


class Simulator:
    """A simulator in a process of its own: `accounts` a count or a list of account ids;
    `first_con_id` where its contract ids start (simulators that must hold no contract in
    common start far apart). `wait=False` starts it and returns; `ready()` waits."""

    def __init__(
        self,
        positions: int,
        accounts: Any,
        first_con_id: int = 100_000_000,
        wait: bool = True,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_simulator_process,
            args=(child, positions, accounts, first_con_id),
            daemon=True,
        )
        self.process.start()
        if wait:
            self.ready()

    def ready(self) -> Simulator:
        """Wait until it serves, then read it once (not timed): the simulator works out
        each position's contract texts at its first read (a gateway has its data at hand),
        and every measurement is of a reader, not of that."""
        if not self.conn.poll(300):
            raise RuntimeError("the simulator did not start")
        self.port = self.conn.recv()
        wire_read(self.port, client_id=999)
        return self

    def mutate(self) -> tuple[int, int]:
        self.conn.send("mutate")
        return self.conn.recv()

    def cpu(self) -> float:
        """The CPU seconds its process has spent so far (all its threads)."""
        self.conn.send("cpu")
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
    return {"seconds": statistics.median(times), "times": times, "rss": peak_rss_mib()}


def wire_read(port: int, client_id: int, timeout: float = 600) -> tuple[int, int]:
    """The bare wire read, with no client library: the TWS API handshake ("API\\0" and the
    length-prefixed version range), startApi until nextValidId and managedAccounts, then
    reqPositions until positionEnd, every frame cut out of the stream and split into its
    text fields. Returns (position frames, managed accounts)."""
    length = struct.Struct(">I").unpack_from
    position_id, end_id = str(int(ServerMsg.POSITION_DATA)), str(int(ServerMsg.POSITION_END))
    next_id, accounts_id = str(int(ServerMsg.NEXT_VALID_ID)), str(int(ServerMsg.MANAGED_ACCTS))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()

    def frames() -> Any:
        nonlocal buffer
        while True:
            data = sock.recv(1 << 18)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            buffer += data
            start, size = 0, len(buffer)
            while size - start >= 4:
                (n,) = length(buffer, start)
                if size - start - 4 < n:
                    break
                yield buffer[start + 4 : start + 4 + n].decode().split("\0")[:-1]
                start += 4 + n
            del buffer[:start]

    try:
        sock.sendall(handshake_bytes())
        incoming = frames()
        version, _ = next(incoming)  # the server version and its connection time
        assert int(version) > 0, version
        sock.sendall(make_message(ClientMsg.START_API, 2, client_id, ""))
        got_id, accounts = False, None
        while not (got_id and accounts is not None):
            fields = next(incoming)
            if fields[0] == next_id:
                got_id = True
            elif fields[0] == accounts_id:
                accounts = [a for a in fields[2].split(",") if a]
        sock.sendall(make_message(ClientMsg.REQ_POSITIONS, 1))
        positions = 0
        for fields in incoming:
            if fields[0] == position_id:
                positions += 1
            elif fields[0] == end_id:
                return positions, len(accounts)
    finally:
        sock.close()
    raise AssertionError("unreachable")


def worker_wire(args: argparse.Namespace) -> dict[str, Any]:
    """The bare wire read (`wire_read`), with no client library and no database."""
    simulator = Simulator(args.positions, args.accounts)
    try:
        times = []
        for attempt in range(args.repeat):
            started = time.perf_counter()
            positions, accounts = wire_read(simulator.port, client_id=200 + attempt)
            times.append(time.perf_counter() - started)
            assert (positions, accounts) == (args.positions, args.accounts), (positions, accounts)
    finally:
        simulator.stop()
    return {"seconds": statistics.median(times), "times": times, "rss": peak_rss_mib()}


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

    create_bench_db(connection, settings)
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
        profile = args.profile
        steps["first"] = measure(connection, sync, repeat=1, profile=profile)
        assert steps["first"]["counts"]["created"] == args.positions, steps["first"]
        steps["unchanged"] = measure(connection, sync, repeat=args.repeat, profile=profile)
        assert steps["unchanged"]["counts"]["unchanged"] == args.positions, steps["unchanged"]
        closed = 0
        if not profile:  # profiled: the first, the unchanged and the one with values
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
                connection,
                with_values,
                repeat=args.repeat,
                before=simulator.move_prices,
                profile=profile,
            )
    finally:
        simulator.stop()
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)
    return {"steps": steps, "rss": peak_rss_mib()}


def worker_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The database floor of the first sync (`bench/floor.py`): the product's first sync
    (not timed), then the very rows it created written again, timed, with the bulk path
    of the database (PostgreSQL's COPY, SQLite's executemany) in one transaction: the
    median of --repeat writes."""
    from bench import floor

    setup_django(args.database, args.models)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.models import SyncRun
    from ibkr_sync.services import sync_positions

    create_bench_db(connection, settings)
    simulator = Simulator(args.positions, args.accounts)
    settings.IBKR_HOST, settings.IBKR_PORT = "127.0.0.1", simulator.port
    positions_only(settings)
    try:
        before = floor.rows(connection)
        result = sync_positions(trigger=SyncRun.Trigger.COMMAND)
        assert result.created == args.positions, result.outcome
        simulator.stop()
        simulator = None
        measured = floor.measure(connection, before, repeat=args.repeat)
    finally:
        if simulator is not None:
            simulator.stop()
        connection.close()
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)
    return {**measured, "rss": peak_rss_mib()}


def measure(
    connection: Any, step: Any, repeat: int, before: Any = None, profile: int = 0
) -> dict[str, Any]:
    """Median time of `repeat` runs, with the queries and rows written of the last; `before`
    (not timed) prepares each run."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        tally: Counter = Counter()
        with connection.execute_wrapper(_counting(tally)):
            started = time.perf_counter()
            counts = profiled(step, profile) if profile else step()
            times.append(time.perf_counter() - started)
    if profile:
        counts, report = counts
    return {
        "seconds": statistics.median(times),
        "times": times,
        "rss": peak_rss_mib(),  # the process's peak so far: what this step added shows
        "queries": tally["queries"],
        "written": tally["written"],
        "mirrored": tally["positions+instruments"],
        "counts": counts,
        **({"profile": report} if profile else {}),
    }


def profiled(step: Any, lines: int) -> tuple[Any, str]:
    """Run `step` under cProfile: its result, and the top `lines` functions by their own
    time and by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(step)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return result, out.getvalue()


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
    create_bench_db(connection, settings)
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
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)
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


# --- connections: several gateways, one installation ------------------------------------------

#: Contract ids of one connection's simulator start this far from the next one's, so that
#: no two connections hold a contract in common (1,000s of positions span < 1,000,000).
CON_ID_SPACING = 10_000_000


def connection_accounts(index: int, accounts: int) -> list[str]:
    """The account ids of the `index`th connection: its own, shared with no other."""
    return [f"DU{2_000_000 + index * 100 + i:07d}" for i in range(1, accounts + 1)]


def create_bench_db(connection: Any, settings: Any) -> str:
    """Create the benchmark's own database (a temporary SQLite file, or `bench_<name>` on
    PostgreSQL, never one a test run may be using); return a DATABASE_URL that reaches it,
    for other processes."""
    from urllib.parse import urlsplit, urlunsplit

    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        path = str(Path(tempfile.mkdtemp()) / "bench.sqlite3")
        db.setdefault("TEST", {})["NAME"] = path
        connection.creation.create_test_db(verbosity=0, autoclobber=True)
        return f"sqlite:///{path}"
    db.setdefault("TEST", {})["NAME"] = f"bench_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path=f"/{connection.settings_dict['NAME']}"))


def positions_only(settings: Any) -> None:
    settings.IBKR_REQUEST_TIMEOUT = 600
    settings.IBKR_VALUES_TIMEOUT = 600
    settings.IBKR_READ_VALUES = False


def worker_connections(args: argparse.Namespace) -> dict[str, Any]:
    """C connections, each a simulator of its own (its own process) with N positions in K
    accounts of its own and contracts of its own; the ten single syncs, sync_all, and two
    connections synced at the same moment by two processes."""
    setup_django(args.database)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync import services
    from ibkr_sync.models import Connection, SyncRun

    url = create_bench_db(connection, settings)
    positions_only(settings)
    count, trigger = args.connections, SyncRun.Trigger.COMMAND
    simulators = [
        Simulator(
            args.positions,
            connection_accounts(i, args.accounts),
            first_con_id=100_000_000 + i * CON_ID_SPACING,
            wait=False,
        )
        for i in range(count)
    ]
    children: list[subprocess.Popen] = []
    try:
        names = [f"gw{i:02d}" for i in range(count)]
        for name, simulator in zip(names, simulators, strict=True):
            Connection.objects.create(
                name=name, host="127.0.0.1", port=simulator.ready().port, client_id=1
            )

        def single(name: str, expect: str) -> float:
            started = time.perf_counter()
            result = services.sync_positions(connection=name, trigger=trigger)
            elapsed = time.perf_counter() - started
            assert getattr(result, expect) == args.positions, (name, result.outcome)
            return elapsed

        def all_at_once() -> float:
            started = time.perf_counter()
            outcomes = services.sync_all(trigger=trigger)
            elapsed = time.perf_counter() - started
            assert [o.connection for o in outcomes] == names, outcomes
            failed = [o for o in outcomes if o.result is None]
            assert not failed, [(o.connection, str(o.error)) for o in failed]
            assert all(o.result.unchanged == args.positions for o in outcomes), outcomes
            return elapsed

        first = {name: single(name, "created") for name in names}
        singles: dict[str, list[float]] = {name: [] for name in names}
        everything: list[float] = []
        for _ in range(args.repeat):  # interleaved, so that both see the same load
            for name in names:
                singles[name].append(single(name, "unchanged"))
            everything.append(all_at_once())

        # Two connections at the same moment, each synced by a process of its own (started
        # and set up beforehand: what is timed is the sync, not Python's start).
        pair = names[:2]
        children = [_start_child(url, name) for name in pair]
        _go(children)  # a first sync in each, not timed: imports, connections, caches
        alone: dict[str, list[float]] = {name: [] for name in pair}
        cpu: dict[str, list[float]] = {name: [] for name in pair}
        # Every process a sync involves: its own, its simulator's, the database server's
        # backend (PostgreSQL; SQLite works in the sync's process).
        involved: dict[str, list[dict[str, float]]] = {name: [] for name in pair}
        backends = {name: stamp[3] for name, stamp in zip(pair, _go(children), strict=True)}
        together: list[float] = []
        for _ in range(args.repeat):
            for name, child, simulator in zip(pair, children, simulators[:2], strict=True):
                served, backend = simulator.cpu(), backend_cpu(backends[name])
                (start, end, spent, pid), *_ = _go([child])
                served, backend = simulator.cpu() - served, backend_cpu(pid) - backend
                if pid != backends[name]:  # another backend: its CPU cannot be told apart
                    backends[name], backend = pid, float("nan")
                alone[name].append(end - start)
                cpu[name].append(spent)
                involved[name].append({"sync": spent, "simulator": served, "server": backend})
            stamps = _go(children)
            together.append(max(s[1] for s in stamps) - min(s[0] for s in stamps))
    finally:
        for child in children:
            with contextlib.suppress(Exception):
                child.stdin.write("stop\n")
                child.stdin.flush()
                child.wait(30)
        for simulator in simulators:
            simulator.stop()
        connection.creation.destroy_test_db(settings.DATABASES["default"]["NAME"], verbosity=0)
    median = statistics.median
    return {
        "first": first,
        "singles": {name: median(times) for name, times in singles.items()},
        "singles_runs": singles,
        "sum_of_singles": sum(median(times) for times in singles.values()),
        "sync_all": median(everything),
        "sync_all_runs": everything,
        "pair": pair,
        "alone": {name: median(times) for name, times in alone.items()},
        "alone_runs": alone,
        "alone_cpu": {name: median(times) for name, times in cpu.items()},
        "alone_involved": {
            name: {part: median(m[part] for m in runs) for part in runs[0]}
            for name, runs in involved.items()
        },
        "together": median(together),
        "together_runs": together,
        "rss": peak_rss_mib(),
    }


def _start_child(url: str, name: str) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", "one-sync", "--database", url]
    child = subprocess.Popen(
        [*command, "--connection", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    if line.strip() != "ready":
        raise SystemExit(f"the sync process for {name} did not start: {line!r}")
    return child


def backend_cpu(pid: int | None) -> float:
    """The CPU seconds a database server's backend process has spent so far (0 without
    one: SQLite), read from /proc (`schedstat`: nanoseconds on a CPU)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")  # not on this machine, or not readable


def _go(children: list[subprocess.Popen]) -> list[tuple[float, float, float, int | None]]:
    """Tell the children to sync, all at once; each one's (start, end) wall-clock time,
    the CPU seconds its process spent on the sync, and its database backend's process id
    (PostgreSQL; None if it changed during the sync)."""
    for child in children:
        child.stdin.write("go\n")
    for child in children:
        child.stdin.flush()
    stamps = []
    for child in children:
        answer = json.loads(child.stdout.readline())
        if "error" in answer:
            raise SystemExit(f"a concurrent sync failed: {answer['error']}")
        stamps.append((answer["start"], answer["end"], answer["cpu"], answer["backend"]))
    return stamps


def worker_one_sync(args: argparse.Namespace) -> dict[str, Any]:
    """A process that syncs one connection each time it reads "go" (its database set up
    already), answering with the wall-clock start and end of the sync."""
    setup_django(args.database)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync import services
    from ibkr_sync.models import SyncRun

    positions_only(settings)
    connection.ensure_connection()
    print("ready", flush=True)
    syncs = 0
    for line in sys.stdin:
        if line.strip() != "go":
            break
        backend = _backend_pid(connection)
        start, cpu = time.time(), time.process_time()
        try:
            result = services.sync_positions(
                connection=args.connection, trigger=SyncRun.Trigger.COMMAND
            )
        except Exception as exc:  # reported to the driver, which stops the run
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        end, cpu = time.time(), time.process_time() - cpu
        syncs += 1
        same = _backend_pid(connection) == backend
        answer = {
            "start": start,
            "end": end,
            "cpu": cpu,
            "outcome": result.outcome,
            "backend": backend if same else None,
        }
        print(json.dumps(answer), flush=True)
    return {"syncs": syncs}


def _backend_pid(connection: Any) -> int | None:
    """The process id of this connection's PostgreSQL backend, as the driver knows it
    (no query); None on SQLite."""
    if connection.vendor != "postgresql" or connection.connection is None:
        return None
    return connection.connection.info.backend_pid


WORKERS = {
    "wire": worker_wire,
    "raw": worker_raw,
    "sync": worker_sync,
    "floor": worker_floor,
    "changelist": worker_changelist,
    "connections": worker_connections,
    "one-sync": worker_one_sync,
}


# --- the driver ------------------------------------------------------------------------------


def run_worker(kind: str, **options: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {' '.join(command)}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_worker_median(kind: str, runs: int, **options: Any) -> dict[str, Any]:
    """`runs` fresh worker processes; each figure (seconds, per step) the median of theirs,
    the rest as the last run measured it (queries and rows do not vary run to run)."""
    outs = [run_worker(kind, **options) for _ in range(runs)]
    out = outs[-1]
    if "steps" in out:
        for step, measured in out["steps"].items():
            times = [o["steps"][step]["seconds"] for o in outs]
            measured["seconds"], measured["runs"] = statistics.median(times), times
    else:
        times = [o["seconds"] for o in outs]
        out["seconds"], out["runs"] = statistics.median(times), times
        if "text_seconds" in out:
            out["text_seconds"] = statistics.median(o["text_seconds"] for o in outs)
    return out


def database_urls(names: list[str], postgres_url: str) -> dict[str, str]:
    urls = {
        "sqlite": f"sqlite:///{Path(tempfile.gettempdir()) / 'bench-unused.sqlite3'}",
        "postgres": postgres_url,
    }
    return {name: urls[name] for name in names}


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="1000,10000,50000", help="comma-separated N")
    parser.add_argument("--accounts", default="1,20", help="comma-separated K")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the repeatable steps")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="fresh processes per measurement (each figure is the median of them)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the database floor of the first sync (the rows it created, written again "
        "with COPY / executemany, no ORM) and, with --connections, the CPU a sync costs in "
        "every process it involves",
    )
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
        "--connections",
        type=int,
        default=0,
        metavar="C",
        help="instead: C connections (C simulators) of --positions each, synced one by "
        "one, all at once (sync_all), and two at the same moment in two processes",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="LINES",
        help="instead: profile the first, the unchanged and the with-values sync (cProfile), "
        "printing the top LINES functions by own and by cumulative time",
    )
    parser.add_argument(
        "--models",
        default="default",
        help="comma-separated: default (the portfolio app's), swapped (a host's own models)",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="product", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--connection", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker != "one-sync":  # which syncs what its connection holds
            args.positions, args.accounts = int(args.positions), int(args.accounts)
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import django

    print(
        f"Python {sys.version.split()[0]}, Django {django.get_version()}, {os.cpu_count()} CPUs, "
        f"{load_average()} at the start"
    )
    dbs = database_urls(args.databases.split(","), args.postgres_url)
    if args.changelist:
        changelist_table(args, dbs)
        return
    if args.connections:
        connections_table(args, dbs)
        return
    if args.profile:
        profile_report(args, dbs)
        return
    row(
        "N",
        "K",
        "database",
        "sync",
        "step",
        "seconds",
        "x raw",
        "x wire",
        "queries",
        "rows written",
        "position+instrument writes",
        "peak RSS MiB",
    )
    row(*["---"] * 12)
    bounds: list[str] = []
    for n in map(int, args.positions.split(",")):
        for k in map(int, args.accounts.split(",")):
            sizes = {"positions": n, "accounts": k, "repeat": args.repeat}
            wire = run_worker_median("wire", args.runs, **sizes)
            raw = run_worker_median("raw", args.runs, **sizes)
            for label, read in (("wire read", wire), ("raw read", raw)):
                row(
                    n,
                    k,
                    "-",
                    label,
                    "read",
                    f"{read['seconds']:.3f}",
                    f"{read['seconds'] / raw['seconds']:.2f}",
                    f"{read['seconds'] / wire['seconds']:.2f}",
                    "-",
                    "-",
                    "-",
                    f"{read['rss']:.0f}",
                )
            for db_name, url in dbs.items():
                impls = [("product", m) for m in args.models.split(",")]
                impls += [("naive", "default")] if n <= args.naive_max else []
                for impl, models in impls:
                    out = run_worker_median(
                        "sync",
                        args.runs,
                        **sizes,
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
                            f"{m['seconds'] / wire['seconds']:.2f}",
                            m["queries"],
                            m["written"],
                            m["mirrored"],
                            f"{m['rss']:.0f}",
                        )
                if args.floor:
                    bounds.append(floor_rows(args, sizes, db_name, url, wire, raw))
    for bound in bounds:
        print(f"\n{bound}")
    print(f"\n{load_average()} at the end")


#: The goal of the first sync: at most this many times the wire read.
FIRST_GOAL = 4.0


def floor_rows(
    args: argparse.Namespace,
    sizes: dict[str, int],
    db_name: str,
    url: str,
    wire: dict[str, Any],
    raw: dict[str, Any],
) -> str:
    """The first sync's database floor, as rows of the table; returns the bound it implies
    (the wire read and the floor, one after the other) against the goal."""
    n, k = sizes["positions"], sizes["accounts"]
    out = run_worker_median("floor", args.runs, **sizes, database=url, models="default")
    mirrored = sum(v for t, v in out["tables"].items() if t.endswith(("_position", "_instrument")))
    variants = [("database floor", out["seconds"])]
    if "text_seconds" in out:
        variants.append(("database floor, text ready", out["text_seconds"]))
    for label, seconds in variants:
        row(n, k, db_name, label, "first", f"{seconds:.3f}", f"{seconds / raw['seconds']:.2f}",
            f"{seconds / wire['seconds']:.2f}", len(out["tables"]), out["rows"], mirrored,
            f"{out['rss']:.0f}")  # fmt: skip
    bound = (wire["seconds"] + out["seconds"]) / wire["seconds"]
    overlapped = max(wire["seconds"], out["seconds"]) / wire["seconds"]
    verdict = "within reach" if bound <= FIRST_GOAL else "out of reach"
    return (
        f"{db_name}, N={n} K={k}: the first sync cannot take less than the wire read and the "
        f"database floor, {wire['seconds']:.3f} + {out['seconds']:.3f} s = {bound:.2f} x the "
        f"wire read (goal: <= {FIRST_GOAL:g} x, {verdict} on this machine; the floor wrote "
        f"{out['rows']} rows in {len(out['tables'])} tables, changed "
        f"{out['changed_not_created']} rows it did not create); with the write overlapping "
        f"the read on another core, no less than the longer of the two: {overlapped:.2f} x"
    )


def profile_report(args: argparse.Namespace, dbs: dict[str, str]) -> None:
    n, k = int(args.positions.split(",")[0]), int(args.accounts.split(",")[-1])
    for db_name, url in dbs.items():
        out = run_worker(
            "sync",
            positions=n,
            accounts=k,
            repeat=1,
            database=url,
            implementation="product",
            models="default",
            profile=args.profile,
        )
        for step, measured in out["steps"].items():
            print(f"\n## {db_name}, {step} sync of {n} positions in {k} accounts "
                  f"({measured['seconds']:.3f} s under the profiler)\n")  # fmt: skip
            print(measured["profile"])


def connections_table(args: argparse.Namespace, dbs: dict[str, str]) -> None:
    n, k, c = int(args.positions.split(",")[0]), int(args.accounts.split(",")[-1]), args.connections
    print(
        f"{c} connections, each a simulator of its own (its own process) with {n} positions in "
        f"{k} accounts of its own, no contract in common; positions only. Single and "
        f"sync_all: unchanged re-syncs, median of {args.repeat} (interleaved); two at once: "
        "unchanged re-syncs of two connections, each in a process of its own, median of "
        f"{args.repeat}; with --runs, the median of that many worker processes.\n"
    )
    row("database", "step", "seconds", "ratio", "goal")
    row(*["---"] * 5)
    floors: list[str] = []
    for db_name, url in dbs.items():
        outs = [
            run_worker(
                "connections",
                positions=n,
                accounts=k,
                connections=c,
                repeat=args.repeat,
                database=url,
            )
            for _ in range(args.runs)
        ]

        def median(figure: Any, outs: list[dict[str, Any]] = outs) -> float:
            return statistics.median(figure(out) for out in outs)

        first = median(lambda out: sum(out["first"].values()))
        singles = median(lambda out: out["sum_of_singles"])
        everything = median(lambda out: out["sync_all"])
        a, b = outs[-1]["pair"]
        alone = {name: median(lambda out, name=name: out["alone"][name]) for name in (a, b)}
        slower = max(alone.values())
        together = median(lambda out: out["together"])
        row(db_name, f"{c} single first syncs, summed", f"{first:.3f}", "-", "-")
        row(db_name, f"{c} single syncs, summed", f"{singles:.3f}", "1.00", "-")
        row(db_name, "sync_all", f"{everything:.3f}", f"{everything / singles:.2f}",
            "<= 1.2 x the singles")  # fmt: skip
        for name in (a, b):
            cpu = median(lambda out, name=name: out["alone_cpu"][name])
            row(db_name, f"{name} alone, in a process of its own", f"{alone[name]:.3f}",
                f"{alone[name] / slower:.2f}", f"- (its process's CPU: {cpu:.3f} s)")  # fmt: skip
        row(db_name, f"{a} and {b} at the same moment, two processes", f"{together:.3f}",
            f"{together / slower:.2f}", "<= 1.3 x the slower alone")  # fmt: skip
        if args.floor:
            floors.append(cpu_floor_rows(db_name, outs, alone, slower))
    for line in floors:
        print(f"\n{line}")
    print(f"\n{load_average()} at the end")


#: Two syncs at the same moment: at most this many times the slower one alone.
TOGETHER_GOAL = 1.3


def cpu_floor_rows(
    db_name: str, outs: list[dict[str, Any]], alone: dict[str, float], slower: float
) -> str:
    """What two syncs at once cannot go below on this machine's cores: the CPU seconds of
    each sync alone in every process it involves (its own, its simulator's, the database
    server's backend), as rows of the table; returns the bound their sum over the cores
    implies, against the goal."""
    cores = os.cpu_count() or 1
    totals = {}
    for name in alone:
        parts = {
            part: statistics.median(out["alone_involved"][name][part] for out in outs)
            for part in ("sync", "simulator", "server")
        }
        totals[name] = total = sum(parts.values())
        detail = ", ".join(f"{part} {seconds:.3f}" for part, seconds in parts.items())
        row(db_name, f"{name} alone: CPU of every process it involves", f"{total:.3f}",
            f"{total / alone[name]:.2f}", f"- (CPU s / its wall time; {detail})")  # fmt: skip
    least = sum(totals.values()) / cores
    row(db_name, f"two at once, least on {cores} cores: their CPU / {cores}", f"{least:.3f}",
        f"{least / slower:.2f}", f"<= {TOGETHER_GOAL:g} x the slower alone")  # fmt: skip
    if least / slower > TOGETHER_GOAL:
        verdict = "out of reach on this machine, whatever the sync does"
    else:
        verdict = (
            f"within reach: a margin of {TOGETHER_GOAL * slower - least:.3f} s "
            f"({TOGETHER_GOAL / (least / slower):.2f} x) for whatever else runs, the "
            "machine's other work included"
        )
    both = " + ".join(f"{t:.3f}" for t in totals.values())
    return (
        f"{db_name}: two syncs at once need the CPU of both, {both} s, on {cores} cores: "
        f"at least {least:.3f} s = "
        f"{least / slower:.2f} x the slower alone ({slower:.3f} s); goal <= "
        f"{TOGETHER_GOAL:g} x: {verdict}"
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
