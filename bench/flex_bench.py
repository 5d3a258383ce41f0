"""How close to a bare XML pass does the import of a large Flex statement run?

A statement of --transactions rows (trades and cash transactions, in --accounts accounts,
with --positions open positions; about 50 MB at 250,000) is generated once, in the
columns an Activity Flex Query for the ledger has, then measured, each step in a fresh
Python process (so that its peak RSS is its own):

  bare       `xml.etree.ElementTree.iterparse` over the file, each element cleared once
             read: the least any reader of the file pays
  parse      our parser (`parse_flex`, expat armed by defusedxml): every row a record,
             every value an exact Decimal, date or time, as an import reads it
  import     the whole sync of a Flex connection (`sync_positions`) into an empty
             database: the statement downloaded from the fake Flex Web Service over
             loopback HTTP (a process of its own), parsed, mapped, written (positions,
             values, every ledger row) in one transaction
  re-import  the same sync again, in a process of its own: the same statement downloaded
             again, recognised as the one applied last (its digest, and the database as its
             write left it), so neither parsed nor written

for SQLite (a temporary file) and PostgreSQL (--database-url; the benchmark creates and
drops its own database `bench_<name>` there). Each row shows seconds, the ratio to the
bare pass, rows, and the process's peak RSS; the goals are printed beside them.

--floor adds the floors: the bare pass keeping a tuple of each ledger row's texts (no
conversion), and the least the database itself takes to store the import's rows
(`bench/floor.py`: the rows the product's import created, written again with PostgreSQL's
COPY or SQLite's executemany in one transaction, no ORM), with the bound they imply
against the goal (an import at most twice the bare pass).

    python bench/flex_bench.py                                  # 250,000 rows, both databases
    python bench/flex_bench.py --transactions 20000 --databases sqlite
    python bench/flex_bench.py --profile 25 --databases sqlite  # cProfile of both syncs
    python bench/flex_bench.py --floor                          # and what no import goes below
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/portfolio"
TOKEN = "bench-flex-token-0123456789"
QUERY = "7654321"
FROM_DATE, TO_DATE = dt.date(2025, 1, 1), dt.date(2025, 12, 31)
#: Goals: the import at most this many times the bare pass, a re-import at most this,
#: and the import's peak RSS under this many MiB.
IMPORT_GOAL, REIMPORT_GOAL, RSS_GOAL = 2.0, 1.2, 300

_CURRENCIES = ("USD", "USD", "EUR", "CHF", "GBP")
_CASH_KINDS = (
    ("Dividends", "25.5"),
    ("Withholding Tax", "-3.83"),
    ("Broker Interest Received", "1.27"),
    ("Other Fees", "-10"),
)


# --- the statement ---------------------------------------------------------------------------


def _row(tag: str, **attributes: str) -> str:
    return f"<{tag} " + " ".join(f"{k}={quoteattr(v)}" for k, v in attributes.items()) + " />\n"


def write_statement(path: Path, transactions: int, positions: int, accounts: int) -> int:
    """A statement of `transactions` rows (4 trades to a cash transaction) spread over
    `accounts` accounts and the year 2025, and `positions` open positions; its size."""
    days = (TO_DATE - FROM_DATE).days + 1
    ids = [f"U{9_000_001 + n}" for n in range(accounts)]
    size = 0
    with open(path, "w", encoding="utf-8") as out:

        def write(text: str) -> None:
            nonlocal size
            out.write(text)
            size += len(text)

        write('<?xml version="1.0" encoding="UTF-8"?>\n')
        write('<FlexQueryResponse queryName="Ledger" type="AF">\n')
        write(f'<FlexStatements count="{accounts}">\n')
        for a, account in enumerate(ids):
            write(
                f'<FlexStatement accountId="{account}" fromDate="{FROM_DATE:%Y%m%d}" '
                f'toDate="{TO_DATE:%Y%m%d}" period="" whenGenerated="20260101;061500">\n'
            )
            write(_row("AccountInformation", accountId=account, currency="USD", name="Bench"))
            write("<OpenPositions>\n")
            mine = range(a, positions, accounts)
            for n in mine:
                currency = _CURRENCIES[n % len(_CURRENCIES)]
                write(
                    _row(
                        "OpenPosition", accountId=account, currency=currency,
                        assetCategory="STK", symbol=f"S{n}", conid=str(100_000 + n),
                        position=str(10 + n % 90), markPrice=f"{50 + n % 400}.25",
                        positionValue=str((10 + n % 90) * Decimal(f"{50 + n % 400}.25")),
                        levelOfDetail="SUMMARY",
                    )
                )  # fmt: skip
            write("</OpenPositions>\n<Trades>\n")
            share = range(a, transactions, accounts)
            cash_rows = []
            for n in share:
                if n % 5 == 4:
                    cash_rows.append(n)
                    continue
                con = n % max(positions, 1)
                day = FROM_DATE + dt.timedelta(days=n % days)
                quantity = (n % 200) - 100 or 7
                price = Decimal(1000 + n % 90000) / 100
                write(
                    _row(
                        "Trade", accountId=account, currency=_CURRENCIES[con % 5],
                        assetCategory="STK", symbol=f"S{con}", conid=str(100_000 + con),
                        dateTime=f"{day:%Y%m%d};{9 + n % 7:02d}{n % 60:02d}{n * 7 % 60:02d}",
                        quantity=str(quantity), tradePrice=str(price),
                        proceeds=str(-quantity * price), ibCommission="-1",
                        buySell="BUY" if quantity > 0 else "SELL",
                        transactionID=str(3_000_000_000 + n), levelOfDetail="EXECUTION",
                    )
                )  # fmt: skip
            write("</Trades>\n<CashTransactions>\n")
            for n in cash_rows:
                con = n % max(positions, 1)
                day = FROM_DATE + dt.timedelta(days=n % days)
                kind, amount = _CASH_KINDS[(n // 5) % len(_CASH_KINDS)]
                write(
                    _row(
                        "CashTransaction", accountId=account, currency=_CURRENCIES[con % 5],
                        assetCategory="STK",
                        symbol=f"S{con}", conid=str(100_000 + con),
                        dateTime=f"{day:%Y%m%d};202000", amount=amount, type=kind,
                        transactionID=str(3_000_000_000 + n), levelOfDetail="DETAIL",
                    )
                )  # fmt: skip
            write("</CashTransactions>\n</FlexStatement>\n")
        write("</FlexStatements>\n</FlexQueryResponse>\n")
    return size


# --- workers: one measurement each, in a fresh process ----------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_bare(args: argparse.Namespace) -> dict[str, Any]:
    import xml.etree.ElementTree as ElementTree

    started = time.perf_counter()
    rows = 0
    for _, element in ElementTree.iterparse(args.statement, events=("end",)):
        if element.get("levelOfDetail") in ("EXECUTION", "DETAIL"):
            rows += 1
        element.clear()
    return {"seconds": time.perf_counter() - started, "rows": rows, "rss": peak_rss_mib()}


#: The attributes of a ledger row the import keeps (its raw attributes hold every one the
#: statement has): those `write_statement` writes.
KEPT = {
    "Trade": (
        "accountId", "currency", "assetCategory", "symbol", "conid", "dateTime", "quantity",
        "tradePrice", "proceeds", "ibCommission", "buySell", "transactionID", "levelOfDetail",
    ),
    "CashTransaction": (
        "accountId", "currency", "assetCategory", "symbol", "conid", "dateTime", "amount",
        "type", "transactionID", "levelOfDetail",
    ),
}  # fmt: skip


def worker_parse_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The bare pass, and a tuple per ledger row of the texts the import keeps (no
    Decimal, no date): the least a reader that keeps them pays."""
    import xml.etree.ElementTree as ElementTree

    started = time.perf_counter()
    records = []
    for _, element in ElementTree.iterparse(args.statement, events=("end",)):
        names = KEPT.get(element.tag)
        if names is not None and element.get("levelOfDetail") in ("EXECUTION", "DETAIL"):
            get = element.get
            records.append(tuple([get(name) for name in names]))
        element.clear()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(records), "rss": peak_rss_mib()}


def worker_parse(args: argparse.Namespace) -> dict[str, Any]:
    from ibkr_sync.sources.flex.parser import parse_flex

    started = time.perf_counter()
    with open(args.statement, "rb") as body:
        response = parse_flex(body, period=(FROM_DATE, TO_DATE))
    seconds = time.perf_counter() - started
    rows = sum(len(s.trades) + len(s.cash_transactions) for s in response.statements)
    return {"seconds": seconds, "rows": rows, "rss": peak_rss_mib()}


def _serve(statement: str, conn: Any) -> None:
    """The fake Flex Web Service serving the statement file, in a process of its own."""
    from ibkr_sync.testing.flex_service import FakeFlexService

    service = FakeFlexService(tokens=(TOKEN,))
    service.add_statement(QUERY, Path(statement))
    service.start()
    conn.send(service.base_url)
    conn.recv()
    service.stop()


def setup_django(database: str) -> None:
    """Production-like settings: DEBUG off (no query log), the given database."""
    os.environ.update(
        DATABASE_URL=database,
        DEBUG="false",
        SECRET_KEY="benchmark-only",
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="false",
    )
    os.environ["DJANGO_SETTINGS_MODULE"] = "portfolio_site.settings"
    import django

    django.setup()


def create_bench_db() -> None:
    """The benchmark's own database: a temporary SQLite file, or `bench_<name>` on
    PostgreSQL, never one a test run may be using."""
    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        db.setdefault("TEST", {})["NAME"] = str(Path(tempfile.mkdtemp()) / "bench.sqlite3")
    else:
        db.setdefault("TEST", {})["NAME"] = f"bench_{db['NAME']}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)


def _start_service(statement: str, settings: Any) -> tuple[Any, Any]:
    """The fake Flex Web Service serving `statement`, in a process of its own, and the
    settings that point the Flex source at it: (the pipe that stops it, its process)."""
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(statement, child), daemon=True)
    server.start()
    settings.IBKR_FLEX_BASE_URL = parent.recv()
    settings.IBKR_SYNC_FLEX_SOURCE_CLASS = "bench.flex_bench.NoWaitFlexSource"
    settings.IBKR_FLEX_READ_TIMEOUT = 600
    return parent, server


def _add_connection() -> None:
    """The benchmark's Flex connection, `bench`, with its query and token."""
    from ibkr_sync.models import Connection

    flex = Connection(name="bench", kind=Connection.Kind.FLEX, flex_query_id=QUERY)
    flex.set_flex_token(TOKEN)
    flex.save()


def worker_import(args: argparse.Namespace) -> dict[str, Any]:
    """One sync of the Flex connection (`--step`): the import creates the benchmark's
    database and leaves it for the re-import, which drops it after."""
    setup_django(args.database)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.services import sync_positions

    if args.step == "import":
        create_bench_db()
    else:
        settings.DATABASES["default"]["NAME"] = connection.settings_dict["NAME"] = args.bench_db
    parent, server = _start_service(args.statement, settings)
    if args.step == "import":
        _add_connection()
    measured: dict[str, Any] = {"bench_db": connection.settings_dict["NAME"]}
    done = False
    try:
        started = time.perf_counter()
        if args.profile:
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            result = profiler.runcall(sync_positions, trigger="command", connection="bench")
            report = io.StringIO()
            pstats.Stats(profiler, stream=report).sort_stats("cumulative").print_stats(args.profile)
            measured["profile"] = report.getvalue()
        else:
            result = sync_positions(trigger="command", connection="bench")
        seconds = time.perf_counter() - started
        ledger = result.ledger or {}
        measured.update(
            seconds=seconds,
            rss=peak_rss_mib(),
            created=sum(c["created"] for c in ledger.values()),
            updated=sum(c["updated"] for c in ledger.values()),
            unchanged=sum(c["unchanged"] for c in ledger.values()),
            errors=len(result.errors or ()),
        )
        done = True
    finally:
        parent.send("stop")
        server.join(10)
        if args.step != "import" or not done:
            connection.close()
            connection.creation.destroy_test_db(
                connection.settings_dict["NAME"], verbosity=0, keepdb=False
            )
    return measured


def worker_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The database floor of the import (`bench/floor.py`): the product's import into an
    empty database (not timed), then the very rows it created written again, timed, with
    the bulk path of the database (PostgreSQL's COPY, SQLite's executemany) in one
    transaction, in a process of its own like the import."""
    from bench import floor

    setup_django(args.database)
    from django.conf import settings
    from django.db import connection

    from ibkr_sync.services import sync_positions

    create_bench_db()
    parent, server = _start_service(args.statement, settings)
    _add_connection()
    try:
        before = floor.rows(connection)
        try:
            result = sync_positions(trigger="command", connection="bench")
        finally:
            parent.send("stop")
            server.join(10)
        created = sum(c["created"] for c in (result.ledger or {}).values())
        measured = floor.measure(connection, before, repeat=1)
    finally:
        connection.close()
        connection.creation.destroy_test_db(
            connection.settings_dict["NAME"], verbosity=0, keepdb=False
        )
    return {**measured, "created": created, "rss": peak_rss_mib()}


try:  # the source the import reads through: the product's, without the waits for IBKR
    from ibkr_sync.sources.flex.client import RetryPolicy
    from ibkr_sync.sources.flex.source import FlexSource

    class NoWaitFlexSource(FlexSource):
        """IBKR's statement is ready at once here: no first wait, no pacing."""

        policy = RetryPolicy(first_poll=0, poll_interval=0.05, min_interval=0)

        def period(self, after: dt.date | None = None) -> tuple[dt.date, dt.date]:
            return FROM_DATE, TO_DATE

except Exception:
    pass


# --- the driver -------------------------------------------------------------------------------


def run_worker(kind: str, **options: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker failed: {' '.join(command)}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(*cells: Any) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=250_000)
    parser.add_argument("--positions", type=int, default=400)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--database-url", default=DEFAULT_POSTGRES, help="PostgreSQL's URL")
    parser.add_argument("--profile", type=int, default=0, help="cProfile lines of the import")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the floors: the bare pass keeping each ledger row's texts, and the "
        "database floor (the rows the import created, written again with COPY / "
        "executemany, no ORM)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--statement", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--bench-db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {
            "bare": worker_bare,
            "parse": worker_parse,
            "import": worker_import,
            "floor": worker_floor,
            "parse-floor": worker_parse_floor,
        }
        print(json.dumps(worker[args.worker](args)))
        return
    if args.transactions < 1 or args.positions < 1 or args.accounts < 1:
        raise SystemExit("--transactions, --positions and --accounts must be >= 1")
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    urls = {
        "sqlite": f"sqlite:///{Path(tempfile.gettempdir()) / 'bench-unused.sqlite3'}",
        "postgres": args.database_url,
    }
    unknown = [d for d in databases if d not in urls]
    if unknown:
        raise SystemExit(f"--databases: unknown {', '.join(unknown)} (sqlite, postgres)")

    with tempfile.TemporaryDirectory() as directory:
        statement = Path(directory) / "statement.xml"
        started = time.perf_counter()
        size = write_statement(statement, args.transactions, args.positions, args.accounts)
        print(
            f"Statement: {args.transactions:,} transactions, {args.positions:,} positions, "
            f"{args.accounts} accounts, {size / 1e6:.1f} MB (generated in "
            f"{time.perf_counter() - started:.1f} s); " + _load_average()
        )
        bare = run_worker("bare", statement=statement)
        parse = run_worker("parse", statement=statement)
        assert bare["rows"] == parse["rows"] == args.transactions, (bare, parse)
        print()
        row("database", "step", "seconds", "x bare", "goal", "rows", "peak RSS MiB")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        row("-", "bare iterparse", f"{bare['seconds']:.3f}", "1.00", "", bare["rows"],
            f"{bare['rss']:.0f}")  # fmt: skip
        row("-", "parse", f"{parse['seconds']:.3f}", f"{parse['seconds'] / bare['seconds']:.2f}",
            "", parse["rows"], f"{parse['rss']:.0f}")  # fmt: skip
        if args.floor:
            kept = run_worker("parse-floor", statement=statement)
            assert kept["rows"] == args.transactions, kept
            row("-", "parse floor (bare + a tuple of texts per row)", f"{kept['seconds']:.3f}",
                f"{kept['seconds'] / bare['seconds']:.2f}", "", kept["rows"],
                f"{kept['rss']:.0f}")  # fmt: skip
        profiles, bounds = [], []
        for name in databases:
            # Each sync in a process of its own (its peak RSS its own); the re-import
            # reads the database the import left.
            steps = {
                "import": run_worker(
                    "import",
                    statement=statement,
                    database=urls[name],
                    profile=args.profile,
                    step="import",
                )
            }
            steps["re-import"] = run_worker(
                "import", statement=statement, database=urls[name], profile=args.profile,
                step="re-import", bench_db=steps["import"]["bench_db"],
            )  # fmt: skip
            for step, goal in (("import", IMPORT_GOAL), ("re-import", REIMPORT_GOAL)):
                measured = steps[step]
                ratio = measured["seconds"] / bare["seconds"]
                rows = (
                    f"{measured['created']} created"
                    if step == "import"
                    else f"{measured['unchanged']} unchanged, "
                    f"{measured['created'] + measured['updated']} written"
                )
                if measured["errors"]:
                    rows += f", {measured['errors']} errors"
                row(
                    name, step, f"{measured['seconds']:.3f}", f"{ratio:.2f}",
                    f"<= {goal:g} ({'met' if ratio <= goal else 'missed'})", rows,
                    f"{measured['rss']:.0f} (< {RSS_GOAL}: "
                    f"{'met' if measured['rss'] < RSS_GOAL else 'missed'})",
                )  # fmt: skip
            profiles += [(name, step, steps[step]["profile"]) for step in ("import", "re-import")
                         if "profile" in steps[step]]  # fmt: skip
            if args.floor:
                bounds.append(floor_rows(name, urls[name], statement, bare, kept))
        for bound in bounds:
            print(f"\n{bound}")
        for name, step, profile in profiles:
            print(f"\n## {name}, {step} of {args.transactions} transactions\n")
            print(profile)


def floor_rows(
    name: str, url: str, statement: Path, bare: dict[str, Any], kept: dict[str, Any]
) -> str:
    """The import's database floor, as rows of the table; returns the bounds it implies
    (the bare pass and the floor, one after the other; the parse floor and the floor of
    the rows' text) against the goal."""
    out = run_worker("floor", statement=statement, database=url)
    assert out["created"] == bare["rows"], out
    variants = [("database floor", out["seconds"])]
    if "text_seconds" in out:
        variants.append(("database floor, text ready", out["text_seconds"]))
    for label, seconds in variants:
        row(name, label, f"{seconds:.3f}", f"{seconds / bare['seconds']:.2f}", "",
            f"{out['rows']} rows, {len(out['tables'])} tables", f"{out['rss']:.0f}")  # fmt: skip
    bound = (bare["seconds"] + out["seconds"]) / bare["seconds"]
    least = out.get("text_seconds", out["seconds"])
    verdict = "within reach" if bound <= IMPORT_GOAL else "out of reach"
    return (
        f"{name}: the import cannot take less than the bare pass and the database floor, "
        f"{bare['seconds']:.3f} + {out['seconds']:.3f} s = {bound:.2f} x the bare pass "
        f"(goal: <= {IMPORT_GOAL:g} x, {verdict} on this machine; the floor wrote "
        f"{out['rows']} rows in {len(out['tables'])} tables, changed "
        f"{out['changed_not_created']} rows it did not create); with the write overlapping "
        f"the pass on another core, no less than the longer of the two: "
        f"{max(bare['seconds'], out['seconds']) / bare['seconds']:.2f} x; a reader that keeps each "
        f"row's texts and hands them to the database as text: {kept['seconds']:.3f} + "
        f"{least:.3f} s = {(kept['seconds'] + least) / bare['seconds']:.2f} x"
    )


def _load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


if __name__ == "__main__":
    main()
