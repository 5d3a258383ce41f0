"""One hierarchy for everything a sync can fail with.

The edges map each class to one HTTP status (`api/views.py`) and one exit code
(`management/commands/sync_ibkr.py`); messages are written for the person who has to act
on them, so the edges show them as they are.
"""

from typing import TypeVar

T = TypeVar("T")


def lookup(table: dict[type[Exception], T], error: Exception, default: T) -> T:
    """The value for the most specific class of `error` in `table` (edges' code maps)."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return default


class IbkrSyncError(Exception):
    """Base class; `code` is the stable machine-readable name used in API errors."""

    code = "sync_error"


class InvalidAccountId(IbkrSyncError, ValueError):
    code = "invalid_account_id"


class InvalidPeriod(IbkrSyncError, ValueError):
    """A back-fill's period that cannot be read: it ends before it begins, it holds a day
    not closed yet, or the connection reads no period (a TWS gateway)."""

    code = "invalid_period"


class SyncAlreadyRunning(IbkrSyncError):
    code = "sync_already_running"


class LockLost(SyncAlreadyRunning):
    """This sync's lock was released while it ran (it looked abandoned: frozen, suspended)
    and another sync may have run: everything it wrote was rolled back."""

    code = "lock_lost"


class SyncInsideTransaction(IbkrSyncError, RuntimeError):
    """`sync_positions()` was called inside an open transaction: a programming error of
    the caller (500 / exit 1, as any bug). Its lock would be invisible to other processes
    and the record of the attempt would go with the caller's rollback."""

    code = "sync_inside_transaction"


class DatabaseUnavailable(IbkrSyncError):
    """The database is unavailable: down, unreachable, out of storage or read-only, locked
    for too long, or not migrated (`ibkr_sync.database` says which, in the message)."""

    code = "database_unavailable"


class GatewayError(IbkrSyncError):
    """The gateway answered, but not with a usable snapshot."""

    code = "gateway_error"

    def __init__(self, message: str, *, ib_code: int | None = None) -> None:
        super().__init__(message)
        self.ib_code = ib_code


class GatewayUnavailable(GatewayError):
    """No API session could be established (refused, unreachable, or lost)."""

    code = "gateway_unavailable"


class NotAGateway(GatewayUnavailable):
    """Something answered at the gateway's address, but not as TWS / IB Gateway does: a
    web server, another service, a proxy with no gateway behind it. Said at once, rather
    than after the connect timeout, so that the port is checked and not the timeouts."""

    code = "not_a_gateway"


class GatewayTimeout(GatewayError):
    code = "gateway_timeout"


class ClientIdInUse(GatewayError):
    code = "client_id_in_use"


class UnknownAccount(GatewayError):
    code = "unknown_account"


class IncompleteSnapshot(GatewayError):
    """The gateway sent something we could not read; the snapshot cannot be trusted."""

    code = "incomplete_snapshot"


class NoManagedAccounts(GatewayError):
    """The gateway answered the handshake but manages no account (not logged in yet)."""

    code = "no_managed_accounts"


class SecretUnreadable(IbkrSyncError):
    """A secret stored encrypted (a connection's Flex token) that none of the configured
    keys decrypts: the key changed without the old one among the fallbacks."""

    code = "secret_unreadable"


class UnknownConnection(IbkrSyncError, LookupError):
    """No connection has the name asked for."""

    code = "unknown_connection"


class ConnectionRequired(IbkrSyncError, ValueError):
    """Several connections are configured and none was named."""

    code = "connection_required"


class ConnectionDisabled(IbkrSyncError):
    """The connection named is disabled: enable it to sync it."""

    code = "connection_disabled"


class QueueNotConfigured(IbkrSyncError):
    """A sync was to be queued (`sync_ibkr --queue`) and no task queue is configured
    (IBKR_SYNC_TASK_QUEUE is empty)."""

    code = "queue_not_configured"


class QueueUnavailable(IbkrSyncError):
    """The task queue (IBKR_SYNC_TASK_QUEUE) did not take the sync: its broker is down or
    unreachable, or the queue's library is not installed. The run is recorded as failed."""

    code = "queue_unavailable"
