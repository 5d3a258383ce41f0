"""`manage.py sync_ibkr`: sync from cron. Summary on stdout, one clear error on stderr.

Exit codes (stable, for monitoring): 0 success, 1 unexpected error, 2 bad arguments,
3 gateway unavailable, 4 gateway timeout, 5 a sync is already running, 6 account not
managed by the gateway, 7 client id in use, 8 other gateway error.
"""

import logging
import sys
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import exceptions
from ...models import SyncRun
from ...services import SyncResult, sync_positions

EXIT_CODES = {
    exceptions.InvalidAccountId: 2,
    exceptions.GatewayUnavailable: 3,
    exceptions.GatewayTimeout: 4,
    exceptions.SyncAlreadyRunning: 5,
    exceptions.UnknownAccount: 6,
    exceptions.ClientIdInUse: 7,
    exceptions.GatewayError: 8,
}

_LIBRARY_LOGGERS = ("ibkr_sync", "ib_insync", "ib_async", "eventkit")


def exit_code_for(error: exceptions.IbkrSyncError) -> int:
    return exceptions.lookup(EXIT_CODES, error, 1)


class Command(BaseCommand):
    help = (
        "Sync positions from the running TWS / IB Gateway (IBKR_HOST, IBKR_PORT, "
        "IBKR_CLIENT_ID) into the database. Exit codes: 0 ok, 2 bad arguments, 3 gateway "
        "unavailable, 4 timeout, 5 already running, 6 unknown account, 7 client id in use, "
        "8 other gateway error."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--account",
            metavar="ACCOUNT_ID",
            help="Sync only this IBKR account (e.g. U1234567); default: every managed account.",
        )

    def handle(self, *args, account: str | None = None, verbosity: int = 1, **options) -> None:
        try:
            with _library_logs_on_stderr(verbosity):
                result = sync_positions(account, trigger=SyncRun.Trigger.COMMAND)
        except exceptions.IbkrSyncError as exc:
            raise CommandError(str(exc), returncode=exit_code_for(exc)) from exc
        self._report(result, verbosity)

    def _report(self, result: SyncResult, verbosity: int) -> None:
        if verbosity < 1:
            return
        style = self.style.WARNING if result.errors else self.style.SUCCESS
        self.stdout.write(
            style(f"IBKR sync #{result.sync_run_id}: {result.scope}: {result.outcome}")
        )
        if verbosity < 2:
            return
        for account, counts in result.by_account.items():
            details = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "processed")
            self.stdout.write(f"  {account}: {counts['processed']} positions: {details}")
        for error in result.errors:
            self.stdout.write(
                f"  error: {error['account']} conId {error['con_id']} "
                f"{error['symbol']} ({error['sec_type']}): {error['reason']}"
            )


@contextmanager
def _library_logs_on_stderr(verbosity: int):
    """At -v 2 and up, show the sync's and the IB library's log on stderr."""
    if verbosity < 2:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if verbosity >= 3 else logging.INFO
    saved = []
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # shown once, here, not again by the root handler
    try:
        yield
    finally:
        for logger, old_level, old_propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate
