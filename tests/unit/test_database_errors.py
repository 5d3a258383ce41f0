"""`ibkr_sync.database`: which database errors mean "unavailable", and what each says.

The errors are the drivers' own, provoked for real on scratch SQLite databases where
SQLite can be made to fail that way, and as PostgreSQL reports them (its SQLSTATE), then
wrapped as Django wraps them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from django.db import DatabaseError, Error
from django.db.utils import DatabaseErrorWrapper

from ibkr_sync.database import DATABASE_UNAVAILABLE, is_unavailable, unavailable_message
from ibkr_sync.exceptions import DatabaseUnavailable


def as_django(error: Exception, driver) -> Error:
    """`error` as Django raises it: its class of django.db, caused by the driver's."""

    class Connection:
        Database = driver
        errors_occurred = False

    try:
        with DatabaseErrorWrapper(Connection()):
            raise error
    except Error as exc:
        return exc
    raise AssertionError("not wrapped")


def sqlite_error(tmp_path: Path, provoke) -> Error:
    try:
        provoke(tmp_path)
    except sqlite3.Error as exc:
        return as_django(exc, sqlite3)
    raise AssertionError("SQLite did not fail")


def read_only(tmp_path):
    db = sqlite3.connect(tmp_path / "ro.db")
    db.execute("CREATE TABLE t (x)")
    db.execute("PRAGMA query_only = ON")
    db.execute("INSERT INTO t VALUES (1)")


def full(tmp_path):
    db = sqlite3.connect(tmp_path / "full.db")
    db.execute("CREATE TABLE t (x)")
    db.execute("PRAGMA max_page_count = 2")
    for _ in range(100):
        db.execute("INSERT INTO t VALUES (?)", ["x" * 1000])


def cannot_open(tmp_path):
    sqlite3.connect(tmp_path / "no-such-directory" / "db.sqlite3")


def locked(tmp_path):
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None, timeout=0)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    other = sqlite3.connect(tmp_path / "busy.db", isolation_level=None, timeout=0)
    other.execute("INSERT INTO t VALUES (2)")


def not_a_database(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not a database" * 512)
    sqlite3.connect(tmp_path / "junk.db").execute("SELECT * FROM sqlite_master")


def not_migrated(tmp_path):
    sqlite3.connect(tmp_path / "empty.db").execute("SELECT * FROM ibkr_sync_syncrun")


@pytest.mark.parametrize(
    ("provoke", "says"),
    [
        (read_only, "could not use its storage (the database is read-only)"),
        (full, "could not use its storage (database or disk is full)"),
        (not_a_database, "could not use its storage (the file is not a database)"),
        (cannot_open, "database file could not be opened"),
        (locked, "stayed locked by another connection"),
        (not_migrated, "run `manage.py migrate`"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_real_sqlite_failures_are_unavailable_with_an_accurate_message(tmp_path, provoke, says):
    error = sqlite_error(tmp_path, provoke)

    assert is_unavailable(error)
    message = unavailable_message(error, outcome="nothing was changed", retry="sync again")
    assert says in message
    assert message.startswith("The database")
    assert "nothing was changed" in message
    assert "server is running" not in message


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (psycopg.errors.DiskFull("could not extend file"), "storage (disk full)"),
        (psycopg.errors.IoError("could not read block"), "storage (disk I/O error)"),
        (
            psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only txn"),
            "storage (the server is read-only)",
        ),
        (psycopg.errors.DataCorrupted("invalid page"), "storage (data corrupted)"),
        (psycopg.errors.LockNotAvailable("could not obtain lock"), "stayed locked"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "stayed locked"),
        (psycopg.errors.UndefinedTable('relation "x" does not exist'), "manage.py migrate"),
        (psycopg.OperationalError("connection refused"), "server is running"),
        (psycopg.errors.AdminShutdown("terminating connection"), "server is running"),
        (psycopg.InterfaceError("the connection is closed"), "server is running"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_postgresql_failures_by_sqlstate(error, says):
    wrapped = as_django(error, psycopg)

    assert is_unavailable(wrapped)
    assert says in unavailable_message(wrapped)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("disk I/O error", "storage (disk I/O error)"),
        ("database or disk is full", "storage (database or disk is full)"),
        ("attempt to write a readonly database", "storage (the database is read-only)"),
        ("could not write to file: No space left on device", "no space left on the device"),
        ("database table is locked", "stayed locked"),
        ("connection to server at 127.0.0.1 failed: Connection refused", "server is running"),
    ],
)
def test_without_a_driver_code_the_message_decides(text, says):
    assert says in unavailable_message(as_django(sqlite3.OperationalError(text), sqlite3))


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.IntegrityError("UNIQUE constraint failed: portfolio_account.external_id"),
        sqlite3.ProgrammingError("Incorrect number of bindings supplied"),
        sqlite3.DataError("string or blob too big"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_of_a_query_are_bugs_not_unavailability(error):
    assert not is_unavailable(as_django(error, sqlite3))
    assert not is_unavailable(ValueError("not a database error at all"))


def test_the_sync_service_uses_the_same_code():
    assert DatabaseUnavailable.code == DATABASE_UNAVAILABLE
    assert issubclass(type(as_django(psycopg.errors.DiskFull("x"), psycopg)), DatabaseError)
