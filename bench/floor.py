"""The database floor of a step: the least any implementation pays to write its rows.

A benchmark's goal is a ratio to a bare read of the data; whether it can be met at all
depends on what the database takes to store what the step stores. The floor is measured
on the rows the product itself wrote: the primary keys of every table are noted before
the product's step, the rows with new keys read back after it (every column, as the
database holds it), deleted again, and written again, timed, with the fastest bulk path
the database has and no ORM, into the same tables (the product's migrated schema: its
indexes, constraints and foreign keys):

- PostgreSQL: one `COPY ... FROM STDIN` per table (psycopg's `cursor.copy()`, the rows'
  values as psycopg reads them: `Decimal`, aware `datetime`, JSON as its text), all in
  one transaction; and, as the server's own share, the same COPY of the rows' text as
  `COPY ... TO STDOUT` gave it (nothing left for the client to format);
- SQLite: one `executemany` of a plain `INSERT` per table, the values as stored, all in
  one transaction, on the product's connection (its PRAGMAs: WAL, synchronous=NORMAL,
  foreign keys).

Rows the step changed but did not create (rows that were there before it) are counted,
not rewritten; the benchmarks print how many. The first write is read back and compared
with the product's rows, so that the floor is known to store exactly them.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    name: str
    columns: list[str]
    key: str
    rows: list[tuple] = field(default_factory=list)
    old: set = field(default_factory=set)  # the keys it had before the step
    text: bytes = b""  # PostgreSQL: the rows as COPY ... TO STDOUT gives them

    @property
    def whole(self) -> bool:
        """Every row of the table is the step's: it can be emptied whole."""
        return not self.old


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _key_of(connection: Any, cursor: Any, table: str) -> str:
    return connection.introspection.get_primary_key_column(cursor, table) or "id"


def rows(connection: Any) -> dict[str, dict[Any, tuple]]:
    """Every table's rows by primary key, before the product's step (a fresh database:
    a few hundred rows)."""
    out = {}
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            key = _key_of(connection, cursor, table)
            cursor.execute(f"SELECT {_quote(key)}, * FROM {_quote(table)}")
            out[table] = {r[0]: r[1:] for r in cursor.fetchall()}
    return out


def _read(connection: Any, table: Table) -> None:
    """The table's rows but the old ones, by key, as the database holds them: SQLite's
    values as stored (a plain connection, no converters), PostgreSQL's as psycopg reads
    them with JSON as its text, and as COPY ... TO STDOUT gives them."""
    columns = ", ".join(_quote(c) for c in table.columns)
    select = f"SELECT {columns} FROM {_quote(table.name)}"
    if table.old:
        ids = ", ".join(str(int(k)) for k in sorted(table.old))
        select += f" WHERE {_quote(table.key)} NOT IN ({ids})"
    select += f" ORDER BY {_quote(table.key)}"
    if connection.vendor == "sqlite":
        reader = sqlite3.connect(connection.settings_dict["NAME"])
        try:
            table.rows = reader.execute(select).fetchall()
        finally:
            reader.close()
        return
    from psycopg.types.string import TextLoader

    raw = connection.connection
    with raw.cursor() as cursor:
        for json in ("json", "jsonb"):  # JSON as its text, as a writer holds it
            cursor.adapters.register_loader(json, TextLoader)
        cursor.execute(select)
        table.rows = cursor.fetchall()
    chunks = []
    with raw.cursor() as cursor, cursor.copy(f"COPY ({select}) TO STDOUT") as copy:
        chunks.extend(bytes(data) for data in copy)
    table.text = b"".join(chunks)


def written(connection: Any, before: dict[str, dict[Any, tuple]]) -> tuple[list[Table], int]:
    """The rows the step created (new primary keys), table by table, read back as the
    database holds them; and how many rows it changed that it did not create."""
    tables, changed = [], 0
    with connection.cursor() as cursor:
        for name in connection.introspection.table_names(cursor):
            old = before.get(name, {})
            key = _key_of(connection, cursor, name)
            if old:  # a table with rows before the step: which of them did it change?
                cursor.execute(f"SELECT {_quote(key)}, * FROM {_quote(name)}")
                now = {r[0]: r[1:] for r in cursor.fetchall()}
                changed += sum(1 for k, r in old.items() if k in now and now[k] != r)
                new = len(set(now) - set(old))
            else:
                cursor.execute(f"SELECT COUNT(*) FROM {_quote(name)}")
                (new,) = cursor.fetchone()
            if not new:
                continue
            description = connection.introspection.get_table_description(cursor, name)
            tables.append(Table(name, [c.name for c in description], key, old=set(old)))
    for table in tables:
        _read(connection, table)
    return tables, changed


def clear(connection: Any, tables: list[Table]) -> None:
    """Delete the step's rows again (not timed), leaving the tables as before the step:
    emptied whole where every row was the step's (as a fresh database's are)."""
    raw = connection.connection
    if connection.vendor == "sqlite":
        raw.execute("BEGIN IMMEDIATE")
        for table in tables:
            if table.whole:
                raw.execute(f"DELETE FROM {_quote(table.name)}")
            else:
                index = table.columns.index(table.key)
                raw.executemany(
                    f"DELETE FROM {_quote(table.name)} WHERE {_quote(table.key)} = ?",
                    [(r[index],) for r in table.rows],
                )
        raw.execute("COMMIT")
        raw.execute("VACUUM")  # the free pages given back, as in a fresh file
        return
    import psycopg

    whole = [t for t in tables if t.whole]
    rest = [t for t in tables if not t.whole]
    try:  # a table another one refers to can only be truncated with it
        if whole:
            with raw.transaction(), raw.cursor() as cursor:
                cursor.execute("TRUNCATE " + ", ".join(_quote(t.name) for t in whole))
    except psycopg.errors.FeatureNotSupported:
        rest = tables
    with raw.transaction(), raw.cursor() as cursor:
        for table in rest:
            index = table.columns.index(table.key)
            cursor.execute(
                f"DELETE FROM {_quote(table.name)} WHERE {_quote(table.key)} = ANY(%s)",
                [[r[index] for r in table.rows]],
            )
    with raw.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM ANALYZE {_quote(table.name)}")


def write(connection: Any, tables: list[Table], text: bool = False) -> float:
    """Write every table's rows in one transaction, with the bulk path of the database;
    the seconds it took. `text` (PostgreSQL): COPY the rows' text as read, not their
    values."""
    raw = connection.connection
    if connection.vendor == "sqlite":
        started = time.perf_counter()
        raw.execute("BEGIN IMMEDIATE")
        for table in tables:
            columns = ", ".join(_quote(c) for c in table.columns)
            marks = ", ".join("?" * len(table.columns))
            raw.executemany(
                f"INSERT INTO {_quote(table.name)} ({columns}) VALUES ({marks})", table.rows
            )
        raw.execute("COMMIT")
        return time.perf_counter() - started
    started = time.perf_counter()
    with raw.transaction(), raw.cursor() as cursor:
        for table in tables:
            columns = ", ".join(_quote(c) for c in table.columns)
            with cursor.copy(f"COPY {_quote(table.name)} ({columns}) FROM STDIN") as copy:
                if text:
                    copy.write(table.text)
                else:
                    for values in table.rows:
                        copy.write_row(values)
    return time.perf_counter() - started


def same_rows(connection: Any, tables: list[Table]) -> None:
    """The floor stored exactly the product's rows (raises if not)."""
    for table in tables:
        stored = Table(table.name, table.columns, table.key, old=table.old)
        _read(connection, stored)
        if stored.rows != table.rows:
            raise AssertionError(f"the floor's rows of {table.name} are not the product's")


def measure(connection: Any, before: dict[str, dict[Any, tuple]], repeat: int) -> dict[str, Any]:
    """The floor of the step just run (`before` it, every table's rows by key): the median of
    `repeat` writes of its rows, and on PostgreSQL of their text."""
    tables, changed = written(connection, before)
    variants = ["values"] + (["text"] if connection.vendor == "postgresql" else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for attempt in range(repeat):
        for variant in variants:
            clear(connection, tables)
            times[variant].append(write(connection, tables, text=variant == "text"))
            if attempt == 0:
                same_rows(connection, tables)
    return {
        "seconds": statistics.median(times["values"]),
        "times": times["values"],
        **(
            {"text_seconds": statistics.median(times["text"]), "text_times": times["text"]}
            if "text" in times
            else {}
        ),
        "rows": sum(len(t.rows) for t in tables),
        "tables": {t.name: len(t.rows) for t in tables},
        "changed_not_created": changed,
    }
