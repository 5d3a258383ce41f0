"""`manage.py sync_ibkr`: sync from cron. Summary on stdout, one clear error on stderr.

Exit codes are stable, for monitoring: `EXITS` lists them all, and the help text and the
README's table are written from it.

`--json` prints the API's JSON (the same serializer), `--dry-run` reports what a sync
would change and writes nothing, `--quiet` prints nothing unless it fails (cron mails
only then). On a terminal, stderr shows progress while a large portfolio arrives.

`--connection NAME` syncs one configured connection (optional with one or none);
`--all` syncs every enabled connection one after another (`services.sync_all`), a line
each, and exits with the code of the first failure.

`--queue` hands the sync (of `--connection`, or of each connection with `--all`) to the
task queue (IBKR_SYNC_TASK_QUEUE) instead of running it here: a line per queued run, its
id first. Without it the command runs the sync itself, queue or no queue.
"""

import argparse
import datetime as dt
import logging
import sys
import threading
import time
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import exceptions
from ...api.errors import error_body
from ...api.serializers import SyncResultSerializer, render_json
from ...decimals import plain
from ...models import SyncRun
from ...services import (
    BackfillResult,
    ConnectionOutcome,
    QueuedOutcome,
    SyncResult,
    WindowOutcome,
    describe_values,
    queue_all,
    queue_sync,
    queues,
    refusal_why,
    sync_all,
    sync_period,
    sync_positions,
)
from ...sources import flex
from ...sources.tws import LIBRARY_RECORD

# Every exit code: what it means, and the error it stands for, if one. 78 is manage.py's
# (a malformed setting stops it before any command runs); argparse exits 2 on bad options.
# An exit code may stand for several errors (a tuple).
_Errors = type[exceptions.IbkrSyncError] | tuple[type[exceptions.IbkrSyncError], ...] | None
EXITS: tuple[tuple[int, _Errors, str], ...] = (
    (0, None, "success"),
    (1, None, "unexpected error (a bug: the traceback is printed)"),
    (
        2,
        (
            exceptions.InvalidAccountId,
            exceptions.InvalidPeriod,
            exceptions.UnknownConnection,
            exceptions.ConnectionRequired,
            exceptions.ConnectionDisabled,
            exceptions.QueueNotConfigured,
        ),
        "bad arguments (e.g. a malformed account id, an unknown or disabled connection, "
        "several connections and none named, --queue with no task queue configured, a bad "
        "period for --from, or --from for a TWS connection)",
    ),
    (
        3,
        (exceptions.GatewayUnavailable, flex.FlexUnavailable, flex.FlexThrottled),
        "gateway or Flex Web Service unavailable (or too many requests on the Flex token)",
    ),
    (
        4,
        (exceptions.GatewayTimeout, flex.FlexTimeout),
        "gateway timeout, or IBKR still generating the Flex statement",
    ),
    (5, exceptions.SyncAlreadyRunning, "another sync is running"),
    (6, exceptions.UnknownAccount, "account not managed by the gateway (or not in the statement)"),
    (7, exceptions.ClientIdInUse, "client id in use"),
    (
        8,
        (exceptions.GatewayError, flex.FlexError),
        "other gateway or Flex error (e.g. an unreadable message or statement)",
    ),
    (
        9,
        exceptions.DatabaseUnavailable,
        "the database is unavailable (down, out of disk space, read-only, locked, not "
        "migrated: the message says which)",
    ),
    (
        10,
        (flex.FlexAuthError, flex.FlexQueryError, exceptions.SecretUnreadable),
        "the connection's Flex token or query was refused (expired, invalid, restricted to "
        "another address, a query without Open Positions) or its stored token cannot be "
        "decrypted: the message says what to do",
    ),
    (
        11,
        exceptions.QueueUnavailable,
        "--queue: the task queue's broker did not take the sync (down or unreachable)",
    ),
    (78, None, "configuration error (a malformed setting, named in the message)"),
)
EXIT_CODES = {
    error: code
    for code, errors, _ in EXITS
    if errors is not None
    for error in (errors if isinstance(errors, tuple) else (errors,))
}

_LIBRARY_LOGGERS = ("ibkr_sync", "ib_insync", "ib_async", "eventkit")


def exit_code_for(error: exceptions.IbkrSyncError) -> int:
    return exceptions.lookup(EXIT_CODES, error, 1)


class IbkrCommand(BaseCommand):
    """What the app's commands share: a malformed setting is exit 78 in one line, and bad
    options are one line and exit 2 (`sync_ibkr`, `ibkr_connection`)."""

    def execute(self, *args, **options):
        """A malformed setting is a configuration error (exit 78, one line) in any project:
        in this project its settings module refuses it before any command runs; in a
        host's, whose settings leave the IBKR_* variables to the app, the app's own checks
        find it here, before Django's system checks would make it exit 1 with a report."""
        from ...checks import check_settings

        problems = [e for e in check_settings() if e.is_serious()]
        if problems:
            message = "Configuration error: " + " ".join(e.msg for e in problems)
            if getattr(self, "_called_from_command_line", False):
                self.stderr.write(message)
                sys.exit(78)
            raise CommandError(message, returncode=78)
        return super().execute(*args, **options)

    def create_parser(self, prog_name: str, subcommand: str, **kwargs) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if parser.called_from_command_line:
            # Bad options are one line and exit 2 too, not argparse's usage block first.
            one_line_errors(parser)
        return parser


def one_line_errors(parser: CommandParser) -> None:
    """Bad options are one line and exit 2, not argparse's usage block first."""

    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error


class Command(IbkrCommand):
    help = (
        "Sync positions from the running TWS / IB Gateway into the database: a "
        "configured connection's (--connection NAME, or every enabled one with --all), or "
        "with none configured IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID's. Exit codes: "
        + "; ".join(f"{code} {meaning}" for code, _, meaning in EXITS)
        + "."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group()
        which.add_argument(
            "--connection",
            metavar="NAME",
            help="Sync this connection (`manage.py ibkr_connection list`); optional with "
            "one connection or none (then IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID).",
        )
        which.add_argument(
            "--all",
            action="store_true",
            dest="sync_all",
            help="Sync every enabled connection, one after another: a line each, and the "
            "exit code of the first that failed (0 when all succeed).",
        )
        parser.add_argument(
            "--account",
            metavar="ACCOUNT_ID",
            help="Sync only this IBKR account (e.g. U1234567); default: every managed account.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Read the gateway and work out every change, then write nothing (no "
            "position, no sync record) and report what a sync would change.",
        )
        parser.add_argument(
            "--queue",
            action="store_true",
            help="Queue the sync for a worker (IBKR_SYNC_TASK_QUEUE) instead of running it "
            "here: one line per queued run, with its id (with --all, one per connection); "
            "exit 0 once queued. Without it the sync runs here, queue or no queue.",
        )
        parser.add_argument(
            "--from",
            metavar="DATE",
            dest="from_date",
            type=_date,
            help="Back-fill a Flex connection from this day (YYYY-MM-DD): its statements "
            "read in windows of at most 365 days, oldest first, a line each; the older "
            "windows write their history (trades, cash transactions, corporate actions, "
            "each day's net asset value), the newest its positions and cash too.",
        )
        parser.add_argument(
            "--to",
            metavar="DATE",
            dest="to_date",
            type=_date,
            help="The back-fill's last day (YYYY-MM-DD); default: yesterday, the last day "
            "IBKR has closed (US Eastern).",
        )
        output = parser.add_mutually_exclusive_group()
        output.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print the result (or the error) as the REST API's JSON, on stdout; with "
            "--all, a list of them, one per connection.",
        )
        output.add_argument(
            "--quiet",
            action="store_true",
            help="Print nothing on success; a failure is still printed on stderr.",
        )

    def handle(
        self,
        *args,
        account: str | None = None,
        connection: str | None = None,
        sync_all: bool = False,
        dry_run: bool = False,
        queue: bool = False,
        as_json: bool = False,
        quiet: bool = False,
        verbosity: int = 1,
        **options,
    ) -> None:
        quiet = quiet or verbosity < 1
        from_date, to_date = options.get("from_date"), options.get("to_date")
        if to_date is not None and from_date is None:
            self._usage_error("--to goes with --from (a back-fill's first day)")
        if from_date is not None and sync_all:
            self._usage_error("--from back-fills one Flex connection: name it (--connection NAME)")
        if from_date is not None and queue:
            self._usage_error("--from runs here, window by window: leave out --queue")
        if from_date is not None:
            self._handle_period(
                from_date, to_date, account, connection, dry_run, as_json, quiet, verbosity
            )
            return
        if queue:
            self._handle_queue(
                account=account,
                connection=connection,
                sync_all=sync_all,
                dry_run=dry_run,
                as_json=as_json,
                quiet=quiet,
                verbosity=verbosity,
            )
            return
        if sync_all:
            if account is not None:
                self._usage_error(
                    "--all syncs every account of every connection; --account goes with "
                    "one connection (--connection NAME)"
                )
            self._handle_all(dry_run=dry_run, as_json=as_json, quiet=quiet, verbosity=verbosity)
            return
        if connection is not None and not connection.strip():
            self._usage_error(
                "--connection is empty: give a connection's name (`manage.py "
                "ibkr_connection list` lists them)"
            )
        try:
            with (
                _sync_log_on(self.stderr, verbosity),
                _progress_on(self.stderr, enabled=not quiet) as progress,
            ):
                result = sync_positions(
                    account,
                    trigger=SyncRun.Trigger.COMMAND,
                    dry_run=dry_run,
                    progress=progress,
                    connection=connection,
                )
        except exceptions.IbkrSyncError as exc:
            raise self._failed(exc, as_json) from exc
        if as_json:
            self.stdout.write(render_json(SyncResultSerializer(result).data))
        elif not quiet:
            self._report(result, verbosity)

    def _failed(self, exc: exceptions.IbkrSyncError, as_json: bool) -> CommandError:
        """The command's error for a sync's: printed as the API's JSON error first, with
        --json; its exit code by `EXITS`."""
        if as_json:
            self.stdout.write(render_json(error_body(exc.code, str(exc))))
        return CommandError(str(exc), returncode=exit_code_for(exc))

    def _handle_period(
        self, from_date, to_date, account, connection, dry_run, as_json, quiet, verbosity
    ) -> None:
        """A back-fill (`services.sync_period`): a line per window as it ends (a success
        on stdout, a failure on stderr), then, after a failure, which windows were
        applied and which not tried, and the failure's exit code."""

        def told(outcome: WindowOutcome) -> None:
            if outcome.error is not None:
                self.stderr.write(
                    f"{_window(outcome)}: failed ({outcome.error.code}): {outcome.error}"
                )
            elif not quiet and not as_json:
                self.stdout.write(_describe_window(outcome))

        try:
            with (
                _sync_log_on(self.stderr, verbosity),
                _progress_on(self.stderr, enabled=not quiet) as progress,
            ):
                backfill = sync_period(
                    from_date,
                    to_date,
                    account,
                    trigger=SyncRun.Trigger.COMMAND,
                    connection=connection,
                    dry_run=dry_run,
                    progress=progress,
                    on_window=told,
                )
        except exceptions.IbkrSyncError as exc:
            raise self._failed(exc, as_json) from exc
        if as_json:
            self.stdout.write(render_json(_backfill_json(backfill)))
        error = backfill.error
        if error is None:
            return
        applied = ", ".join(_window(w) for w in backfill.applied) or "none"
        not_tried = ", ".join(f"{a} to {b}" for a, b in backfill.not_tried) or "none"
        raise CommandError(
            f"The back-fill stopped at {_window(backfill.windows[-1])} ({error.code}); "
            f"applied: {applied}; not tried: {not_tried}. Back-fill again from "
            f"{backfill.windows[-1].from_date} (the windows applied write nothing twice).",
            returncode=exit_code_for(error),
        )

    def _usage_error(self, message: str) -> None:
        """A combination of options that cannot go together: one line, exit 2, as
        argparse says of a bad option."""
        raise CommandError(f"{message}.", returncode=2)

    def _handle_queue(
        self,
        *,
        account: str | None,
        connection: str | None,
        sync_all: bool,
        dry_run: bool,
        as_json: bool,
        quiet: bool,
        verbosity: int,
    ) -> None:
        """`--queue`: the syncs handed to the task queue, a line each (`IBKR sync #12 of
        connection home queued`); with --all, a refused one is a line on stderr and the
        exit code is the first refusal's, as `--all` does for failures."""
        if dry_run:
            self._usage_error(
                "--dry-run runs here and writes nothing; it cannot be queued (leave out --queue)"
            )
        if sync_all and account is not None:
            self._usage_error(
                "--all syncs every account of every connection; --account goes with "
                "one connection (--connection NAME)"
            )
        if connection is not None and not connection.strip():
            self._usage_error(
                "--connection is empty: give a connection's name (`manage.py "
                "ibkr_connection list` lists them)"
            )
        try:
            with _sync_log_on(self.stderr, verbosity):
                outcomes = self._queue(account, connection, sync_all)
        except exceptions.IbkrSyncError as exc:
            raise self._failed(exc, as_json) from exc
        if as_json:
            body = [_queued_json(o) for o in outcomes]
            self.stdout.write(render_json(body if sync_all else body[0]))
        elif not outcomes and not quiet:
            self.stdout.write("No IBKR connection is enabled: nothing was queued.")
        failed = [o for o in outcomes if o.error is not None]
        for outcome in outcomes:
            if outcome.error is not None:
                self.stderr.write(
                    f"{_label(outcome.connection)}: not queued ({outcome.error.code}): "
                    f"{outcome.error}"
                )
            elif not quiet and not as_json:
                of = f" of connection {outcome.connection}" if outcome.connection else ""
                self.stdout.write(f"IBKR sync #{outcome.run.pk}{of} queued")
        if failed:
            first = failed[0]
            raise CommandError(
                f"{len(failed)} of {len(outcomes)} IBKR connection(s) not queued: "
                + ", ".join(_name(o.connection) for o in failed)
                + f"; the exit code is the first one's ({first.error.code}).",
                returncode=exit_code_for(first.error),
            )

    @staticmethod
    def _queue(account: str | None, connection: str | None, sync_all: bool) -> list[QueuedOutcome]:
        if not queues():
            raise exceptions.QueueNotConfigured(
                "--queue needs a task queue: set IBKR_SYNC_TASK_QUEUE=celery (and "
                "CELERY_BROKER_URL) and run a worker, or leave out --queue to sync here."
            )
        if sync_all:
            return queue_all(trigger=SyncRun.Trigger.COMMAND)
        run = queue_sync(account, trigger=SyncRun.Trigger.COMMAND, connection=connection)
        return [QueuedOutcome(run.connection_name, run=run)]

    def _handle_all(self, *, dry_run: bool, as_json: bool, quiet: bool, verbosity: int) -> None:
        """Every enabled connection, one after another: a line each (a success on stdout,
        a failure on stderr, each naming its connection), then the exit code of the first
        failure."""
        with (
            _sync_log_on(self.stderr, verbosity),
            _progress_on(self.stderr, enabled=not quiet) as progress,
        ):
            told = None if progress is None else (lambda _name, phase, n: progress(phase, n))
            try:
                outcomes = sync_all(trigger=SyncRun.Trigger.COMMAND, dry_run=dry_run, progress=told)
            except exceptions.IbkrSyncError as exc:  # the connections could not be listed
                raise self._failed(exc, as_json) from exc
        if as_json:
            self.stdout.write(render_json([_outcome_json(o) for o in outcomes]))
        if not outcomes:
            if not quiet and not as_json:
                self.stdout.write("No IBKR connection is enabled: nothing was synced.")
            return
        failed = [o for o in outcomes if o.error is not None]
        for outcome in outcomes:
            if outcome.error is not None:
                self.stderr.write(
                    f"{_label(outcome.connection)}: failed ({outcome.error.code}): {outcome.error}"
                )
            elif not quiet and not as_json:
                self._report(outcome.result, verbosity)
        if failed:
            first = failed[0]
            raise CommandError(
                f"{len(failed)} of {len(outcomes)} IBKR connection(s) failed: "
                + ", ".join(_name(o.connection) for o in failed)
                + f"; the exit code is the first one's ({first.error.code}).",
                returncode=exit_code_for(first.error),
            )

    def _report(self, result: SyncResult, verbosity: int) -> None:
        values = result.account_values or {}
        missing = [a for a, v in values.items() if v["status"] == "missing"]
        refused = result.accounts_refused
        style = self.style.WARNING if result.errors or missing or refused else self.style.SUCCESS
        of = f" of connection {result.connection}" if result.connection else ""
        if result.dry_run:
            title = f"IBKR sync dry run{of} (nothing written)"
        else:
            title = f"IBKR sync #{result.sync_run_id}{of}"
        self.stdout.write(style(f"{title}: {result.scope}: {result.outcome}"))
        for change in result.changes or ():
            self.stdout.write(_describe_change(change))
        if result.ledger:
            self.stdout.write(f"Ledger: {describe_ledger(result.ledger)}")
        if result.snapshots.get("updated"):
            self.stdout.write(
                f"Account values: {result.snapshots['updated']} stored snapshot(s) updated "
                "(a day's values corrected by IBKR since)"
            )
        for account, reason in refused.items():
            # Always said: an account a sync reported and did not write (the account
            # once: the recorded reason names it too).
            said = refusal_why(account, reason)
            self.stdout.write(self.style.WARNING(f"Not written: {account}: {said}"))
        if missing and verbosity < 2:
            self.stdout.write(
                self.style.WARNING(
                    f"Values not read for {len(missing)} account(s), their stored values "
                    f"kept: {', '.join(missing)} (-v 2 says why)"
                )
            )
        if verbosity < 2:
            return
        for account, counts in result.by_account.items():
            details = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "processed")
            self.stdout.write(f"  {account}: {counts['processed']} positions: {details}")
            if account in values:
                self.stdout.write(f"    values: {describe_values(values[account])}")
        for error in result.errors:
            self.stdout.write(
                f"  error: {error['account']} conId {error['con_id']} "
                f"{error['symbol']} ({error['sec_type']}): {error['reason']}"
            )


def _date(text: str) -> dt.date:
    """A day as --from and --to take it: YYYY-MM-DD (argparse says what is wrong)."""
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day as YYYY-MM-DD") from None


def _window(outcome: WindowOutcome) -> str:
    return f"{outcome.from_date} to {outcome.to_date}"


def _describe_window(outcome: WindowOutcome) -> str:
    """One window of a back-fill on one line: its run, what it wrote."""
    result = outcome.result
    title = "dry run" if result.dry_run else f"sync #{result.sync_run_id}"
    parts = [f"{_window(outcome)}: {title}"]
    if result.history_only:
        parts.append("history only")
    else:
        parts.append(f"{result.scope}: {result.outcome}")
    if result.accounts_refused:
        # A newer report stands, or (also in a history-only window) this connection may
        # not write the account: the run's page and --json say which, in neutral words.
        parts.append(f"not written: {', '.join(result.accounts_refused)}")
    if result.snapshots:
        daily = f"daily values {result.snapshots.get('created', 0)} created"
        if result.snapshots.get("updated"):
            daily += f", {result.snapshots['updated']} updated (corrected by IBKR)"
        parts.append(daily)
    if result.ledger:
        parts.append(f"ledger: {describe_ledger(result.ledger)}")
    return "; ".join(parts)


def _backfill_json(backfill: BackfillResult) -> dict:
    """`--from --json`: every window with its result (the API's shape) or its error."""

    def window(outcome: WindowOutcome) -> dict:
        data: dict = {"from": outcome.from_date.isoformat(), "to": outcome.to_date.isoformat()}
        if outcome.error is not None:
            data.update(status="failed", error=error_body(outcome.error.code, str(outcome.error)))
        else:
            data.update(
                status="success",
                history_only=outcome.result.history_only,
                snapshots=outcome.result.snapshots,
                result=SyncResultSerializer(outcome.result).data,
            )
        return data

    return {
        "connection": backfill.connection or None,
        "status": "failed" if backfill.error is not None else "success",
        "windows": [window(w) for w in backfill.windows],
        "not_tried": [{"from": a.isoformat(), "to": b.isoformat()} for a, b in backfill.not_tried],
    }


def _name(connection: str) -> str:
    return connection or "the settings' gateway"


def _label(connection: str) -> str:
    return f"IBKR sync of connection {connection}" if connection else "IBKR sync"


def _outcome_json(outcome: ConnectionOutcome) -> dict:
    """One connection's part of `--all --json`: the API's answer for it, or its error
    shape naming the connection."""
    if outcome.error is None:
        return SyncResultSerializer(outcome.result).data
    body = error_body(outcome.error.code, str(outcome.error))
    return {**body, "connection": outcome.connection or None}


def _queued_json(outcome: QueuedOutcome) -> dict:
    """One queued sync as JSON: `{"status": "queued", "sync_run_id", "connection"}` (the
    API's 202 answer without the URL, which needs a site), or its error shape."""
    if outcome.error is None:
        return {
            "status": "queued",
            "sync_run_id": outcome.run.pk,
            "connection": outcome.connection or None,
        }
    body = error_body(outcome.error.code, str(outcome.error))
    return {**body, "connection": outcome.connection or None}


def describe_ledger(ledger: dict[str, dict[str, int]]) -> str:
    """A sync's ledger counts on one line: `trades 12 created, 1 updated, 3 unchanged; ...`."""
    return "; ".join(
        f"{kind.replace('_', ' ')} "
        + ", ".join(f"{tally.get(name, 0)} {name}" for name in ("created", "updated", "unchanged"))
        for kind, tally in ledger.items()
    )


def _describe_change(change: dict) -> str:
    """One line of a dry run's changes: `  updated   U1234567  AAPL (265598): 10 -> 12`,
    and `, average cost 150.25 -> 151` when an open position's average cost changes too."""
    before, after = (
        "closed" if value is None else plain(value)
        for value in (change["quantity_before"], change["quantity_after"])
    )
    if change["kind"] == "created":
        before = "new"
    what = f"{change['symbol']} ({change['con_id']})"
    line = f"  {change['kind']:<9} {change['account']:<10} {what}: {before} -> {after}"
    costs = (change["average_cost_before"], change["average_cost_after"])
    if change["kind"] == "updated" and costs[0] != costs[1]:
        cost_before, cost_after = ("none" if value is None else plain(value) for value in costs)
        line += f", average cost {cost_before} -> {cost_after}"
    return line


class _TerminalProgress:
    """One self-overwriting line on a terminal: positions received, then being written.

    Appears only once a sync has taken a moment (small portfolios finish first) and is
    redrawn a few times a second at most; `clear()` leaves the terminal as it was. A phase
    reported too early to be drawn is drawn by a timer when its moment comes: the write
    reports only its start, however long it lasts.
    """

    DELAY = 0.5
    INTERVAL = 0.2

    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.drawn_at: float | None = None
        self.pending: str | None = None  # the latest text, not drawn yet
        self.timer: threading.Timer | None = None
        self.closed = False
        # The timer draws from its own thread.
        self.lock = threading.Lock()

    def __call__(self, phase: str, count: int) -> None:
        if phase == "read":
            text = f"Reading positions from the IB gateway: {count:,} received"
        else:
            text = f"Writing {count:,} positions to the database..."
        with self.lock:
            if self.closed:
                return
            self.pending = text
            now = time.monotonic()
            due = self.started + self.DELAY
            if phase == "read" and self.drawn_at is not None:
                due = max(due, self.drawn_at + self.INTERVAL)
            if now >= due:
                self._draw_pending(now)
            elif self.timer is None:
                self.timer = threading.Timer(due - now, self._when_due)
                self.timer.daemon = True
                self.timer.start()

    def _when_due(self) -> None:
        with self.lock:
            self.timer = None
            if not self.closed and self.pending is not None:
                self._draw_pending(time.monotonic())

    def _draw_pending(self, now: float) -> None:
        self._draw(f"\r\033[K{self.pending}")
        self.pending, self.drawn_at = None, now

    def _draw(self, text: str) -> None:
        # Plain, not in the error colour Django gives stderr on a terminal.
        self.stream.write(text, style_func=_plain, ending="")
        self.stream.flush()

    def clear(self) -> None:
        with self.lock:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
            if self.drawn_at is not None:
                self._draw("\r\033[K")


def _plain(text: str) -> str:
    return text


@contextmanager
def _progress_on(stream, *, enabled: bool):
    """A progress callback drawing on `stream` if it is a terminal, else None."""
    if not (enabled and stream.isatty()):
        yield None
        return
    progress = _TerminalProgress(stream)
    try:
        yield progress
    finally:
        progress.clear()


class _PlainLines:
    """The command's stderr as a stream for a log handler: text as it is, uncoloured."""

    def __init__(self, out) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text, style_func=_plain, ending="")

    def flush(self) -> None:
        self.out.flush()


def _is_sync_record(record: logging.LogRecord) -> bool:
    return any(record.name == n or record.name.startswith(n + ".") for n in _LIBRARY_LOGGERS)


def _console_handlers() -> list[logging.Handler]:
    """The configured handlers that write to this process's own stdout or stderr."""
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and id(getattr(handler, "stream", None)) in consoles
            ):
                found[id(handler)] = handler
    return list(found.values())


@contextmanager
def _sync_log_on(stderr, verbosity: int):
    """The sync's and the IB library's log is the command's to show, on its own stderr.

    At -v 2 and up it is shown there (INFO, or DEBUG at -v 3). Otherwise it stays off the
    console: the command reports every outcome itself (the summary, or one line and the
    exit code), which the log would repeat, with a traceback for a database that did not
    answer, and with a line per sync under LOG_LEVEL=INFO that cron would mail. Handlers
    that write elsewhere (a file, syslog) still get every record.
    """
    consoles = _console_handlers()
    for handler in consoles:
        handler.addFilter(_not_the_syncs)
    saved = []
    if verbosity >= 2:
        shown = logging.StreamHandler(_PlainLines(stderr))
        # The library's records reach it from the library's loggers: not a second time as
        # the gateway re-logs them (at DEBUG, -v 3).
        shown.addFilter(lambda record: not getattr(record, LIBRARY_RECORD, False))
        shown.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        level = logging.DEBUG if verbosity >= 3 else logging.INFO
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, logger.level))
            logger.addHandler(shown)
            logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old_level in saved:
            logger.removeHandler(shown)
            logger.setLevel(old_level)
        for handler in consoles:
            handler.removeFilter(_not_the_syncs)


def _not_the_syncs(record: logging.LogRecord) -> bool:
    return not _is_sync_record(record)
