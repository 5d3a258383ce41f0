"""What a database error means for the person who has to act on it.

A database that does not answer, cannot use its storage, stays locked, or was never set
up is not a bug of the code: every edge (the API, the sync command) answers it as
"database unavailable" (HTTP 503, exit 9) with a message saying what to check, instead
of an unexpected error with a traceback. Errors of a query (a constraint, bad SQL) are
not covered here: they are bugs, and stay so.

The driver's own code decides where it has one (SQLite's result code, PostgreSQL's
SQLSTATE); its message text is the fallback.
"""

from __future__ import annotations

from django.db import Error, InterfaceError, OperationalError

#: The error code of every answer about a database that is unavailable.
DATABASE_UNAVAILABLE = "database_unavailable"

# What went wrong, and what to check: `{outcome}` is what it means for the caller's
# request, `{retry}` what to do once it is fixed.
_MESSAGES = {
    "unreachable": (
        "The database did not answer, so {outcome}: check DATABASE_URL and that the "
        "database server is running and accepts connections, then {retry}."
    ),
    "cannot_open": (
        "The database file could not be opened, so {outcome}: check that DATABASE_URL names "
        "the right file and that it and its directory exist and may be read and written by "
        "this user, then {retry}."
    ),
    "storage": (
        "The database could not use its storage ({what}), so {outcome}: check the disk the "
        "database is on (free space, write permission, a read-only mount or server, "
        "hardware errors), then {retry}."
    ),
    "busy": (
        "The database stayed locked by another connection for too long, so {outcome}: "
        "{retry} in a moment."
    ),
    "not_set_up": (
        "The database is not set up (a table is missing), so {outcome}: run "
        "`manage.py migrate`, then {retry}."
    ),
}

# SQLite result codes (the primary code, as `sqlite_errorname` starts) -> (kind, what).
_SQLITE = {
    "SQLITE_IOERR": ("storage", "disk I/O error"),
    "SQLITE_FULL": ("storage", "database or disk is full"),
    "SQLITE_READONLY": ("storage", "the database is read-only"),
    "SQLITE_PERM": ("storage", "access to the database file was denied"),
    "SQLITE_CORRUPT": ("storage", "the database file is damaged"),
    "SQLITE_NOTADB": ("storage", "the file is not a database"),
    "SQLITE_CANTOPEN": ("cannot_open", ""),
    "SQLITE_BUSY": ("busy", ""),
    "SQLITE_LOCKED": ("busy", ""),
}

# PostgreSQL SQLSTATEs -> (kind, what).
_POSTGRESQL = {
    "53100": ("storage", "disk full"),
    "58030": ("storage", "disk I/O error"),
    "25006": ("storage", "the server is read-only"),
    "XX001": ("storage", "data corrupted"),
    "XX002": ("storage", "index corrupted"),
    "55P03": ("busy", ""),
    "40P01": ("busy", ""),
    "42P01": ("not_set_up", ""),  # undefined table
}

# Message fragments (lower case) -> (kind, what), for drivers that give no code.
_TEXTS = (
    ("disk i/o error", ("storage", "disk I/O error")),
    ("database or disk is full", ("storage", "database or disk is full")),
    ("no space left on device", ("storage", "no space left on the device")),
    ("could not extend file", ("storage", "disk full")),
    ("readonly database", ("storage", "the database is read-only")),
    ("read-only transaction", ("storage", "the server is read-only")),
    ("database disk image is malformed", ("storage", "the database file is damaged")),
    ("file is not a database", ("storage", "the file is not a database")),
    ("unable to open database file", ("cannot_open", "")),
    ("database is locked", ("busy", "")),
    ("database table is locked", ("busy", "")),
    ("no such table", ("not_set_up", "")),
)


def _classify(exc: BaseException) -> tuple[str, str] | None:
    """(kind, what) for an error of the database rather than of a query; else None."""
    chain, seen = [], set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:  # Django's error, then the driver's
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__
    for error in chain:
        name = getattr(error, "sqlite_errorname", None) or ""
        for prefix, found in _SQLITE.items():
            if name == prefix or name.startswith(prefix + "_"):
                return found
        sqlstate = getattr(error, "sqlstate", None)
        if sqlstate in _POSTGRESQL:
            return _POSTGRESQL[sqlstate]
    for error in chain:
        text = str(error).lower()
        for fragment, found in _TEXTS:
            if fragment in text:
                return found
    if isinstance(exc, OperationalError | InterfaceError):
        return ("unreachable", "")
    return None


#: PostgreSQL's "deadlock detected": it ended this transaction to free another.
DEADLOCK = "40P01"


def is_deadlock(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL ending this transaction in a deadlock (two transactions
    each waiting for a row the other wrote): everything it did was rolled back, and the
    same transaction run again no longer meets the other, which went on."""
    error: BaseException | None = exc
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "sqlstate", None) == DEADLOCK:
            return True
        error = error.__cause__
    return False


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database is unavailable (down, unreachable, out of storage,
    read-only, locked, not set up), as opposed to a query that is wrong."""
    return isinstance(exc, Error) and _classify(exc) is not None


def unavailable_message(
    exc: BaseException, *, outcome: str = "nothing was changed", retry: str = "try again"
) -> str:
    """One sentence for the person who has to act: what happened, and what to check."""
    kind, what = _classify(exc) or ("unreachable", "")
    return _MESSAGES[kind].format(outcome=outcome, retry=retry, what=what)
