"""`manage.py ibkr_connection add|list|remove|test`: the connections a sync reads, from
the command line (the admin's *Connections* pages do the same).

One line per action, on stdout; a failure is one line on stderr, with `sync_ibkr`'s exit
codes (`sync_ibkr.EXITS`): 2 for what was given wrong (a field the model refuses, a name
no connection has), 5 to remove a connection while it syncs, and for `test` the code a
sync would exit with for the same error.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from ... import conf, connections, exceptions, lock, selectors
from ...models import Connection, SyncRun
from ...services import check_connection
from .sync_ibkr import EXITS, IbkrCommand, exit_code_for, one_line_errors

#: The timeouts a connection may set, as options: (option, field).
TIMEOUTS = (
    ("--connect-timeout", "connect_timeout"),
    ("--request-timeout", "request_timeout"),
    ("--values-timeout", "values_timeout"),
)


class Command(IbkrCommand):
    help = (
        "Manage the IBKR connections syncs read: add one, list them, remove one, test "
        "one (the handshake only). Exit codes as sync_ibkr's: "
        + "; ".join(f"{code} {meaning}" for code, _, meaning in EXITS)
        + "."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{add,list,remove,test}")
        actions.required = True

        add = actions.add_parser(
            "add",
            help="Add a connection: a TWS / IB Gateway at an address, with a client id.",
        )
        add.add_argument("name", help="Its name: letters, digits, - and _ (e.g. home).")
        add.add_argument("--host", default=Connection._meta.get_field("host").default)
        add.add_argument("--port", type=_integer("--port"), required=True)
        add.add_argument(
            "--client-id", type=_integer("--client-id"), required=True, dest="client_id"
        )
        for option, field in TIMEOUTS:
            add.add_argument(
                option,
                type=_number(option),
                dest=field,
                metavar="SECONDS",
                help=Connection._meta.get_field(field).help_text,
            )
        add.add_argument("--owner", metavar="USERNAME", help="The user it belongs to.")
        add.add_argument("--note", default="")
        add.add_argument(
            "--disabled",
            action="store_true",
            help="Add it disabled: left out of sync_ibkr --all, refused by a sync naming it.",
        )

        actions.add_parser(
            "list", help="One line per connection, with the outcome of its last sync."
        )
        remove = actions.add_parser(
            "remove", help="Remove a connection (not while it syncs); its sync history stays."
        )
        remove.add_argument("name")
        test = actions.add_parser(
            "test",
            help="Connect and disconnect (the handshake only): the server version and the "
            "accounts the gateway manages, or the error a sync would fail with.",
        )
        test.add_argument(
            "name", nargs="?", help="Optional with one connection, or none (the settings')."
        )
        if parser.called_from_command_line:
            for sub in actions.choices.values():
                one_line_errors(sub)

    def handle(self, *args, action: str, **options) -> None:
        try:
            getattr(self, f"_{action}")(**options)
        except exceptions.IbkrSyncError as exc:
            raise CommandError(str(exc), returncode=exit_code_for(exc)) from exc

    # --- actions ----------------------------------------------------------------------------

    def _add(self, *, name: str, owner: str | None, disabled: bool, **options) -> None:
        fields = {
            key: options[key]
            for key in ("host", "port", "client_id", "note", *(f for _, f in TIMEOUTS))
        }
        connection = Connection(name=name, enabled=not disabled, **fields)
        if owner is not None:
            connection.owner = _user(owner)
        try:
            connection.full_clean()
        except ValidationError as exc:
            raise CommandError(
                f"Connection {name!r} was not added: {_problems(exc)}", returncode=2
            ) from None
        connection.save()
        state = "" if connection.enabled else " (disabled)"
        self.stdout.write(
            f"Added connection {connection.name}{state}: {connection.address}, client id "
            f"{connection.client_id}. Test it: manage.py ibkr_connection test {connection.name}"
        )

    def _list(self, **options) -> None:
        rows = list(Connection.objects.select_related("owner").order_by("name"))
        if not rows:
            config = conf.GatewayConfig.from_settings()
            self.stdout.write(
                "No IBKR connection is configured: syncs read the settings' gateway at "
                f"{config.host}:{config.port} (client id {config.client_id})."
            )
            return
        for connection in rows:
            owner = connection.owner.get_username() if connection.owner else "-"
            self.stdout.write(
                "  ".join(
                    (
                        connection.name,
                        connection.kind,
                        "enabled" if connection.enabled else "disabled",
                        connection.address,
                        f"client id {connection.client_id}",
                        f"owner {owner}",
                        _last_sync(connection),
                    )
                )
            )

    def _remove(self, *, name: str, **options) -> None:
        connection = connections.find(name)
        # Its lock is free, or held by a sync that is gone (released here, as the next
        # sync would); a sync that still runs keeps it, and the connection.
        if not lock.release_abandoned(connection.lock_key):
            running = selectors.running_run(connection.lock_key)
            which = "" if running is None else f" (sync #{running.pk})"
            raise exceptions.SyncAlreadyRunning(
                f"Connection {connection.name} is syncing{which}: it was not removed. "
                "Remove it once the sync has finished."
            )
        kept = connection.sync_runs.count()
        connection.delete()  # its runs keep its name (connection_name)
        runs = f"its {kept} sync run(s) kept" if kept else "it had no sync runs"
        self.stdout.write(f"Removed connection {name} ({runs}).")

    def _test(self, *, name: str | None, **options) -> None:
        target = connections.resolve(name, enabled=False)
        handshake = check_connection(target.connection)
        accounts = ", ".join(handshake.accounts) or "none"
        self.stdout.write(f"ok: server version {handshake.server_version}, accounts {accounts}")


def _integer(option: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise _invalid(option, text, "a whole number") from None

    return parse


def _number(option: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise _invalid(option, text, "a number of seconds") from None

    return parse


def _invalid(option: str, text: str, expected: str):
    import argparse

    return argparse.ArgumentTypeError(f"{option} takes {expected}, not {text!r}")


def _user(username: str):
    model = get_user_model()
    try:
        return model._default_manager.get_by_natural_key(username)
    except model.DoesNotExist:
        raise CommandError(f"No user is named {username!r} (--owner).", returncode=2) from None


def _problems(error: ValidationError) -> str:
    """The model's validation errors as one line: `port: Ensure this value ...`."""
    if hasattr(error, "error_dict"):
        return " ".join(
            f"{'' if field == '__all__' else field.replace('_', ' ') + ': '}{' '.join(messages)}"
            for field, messages in error.message_dict.items()
        )
    return " ".join(error.messages)


def _last_sync(connection: Connection) -> str:
    """Its latest sync's outcome; a sync refused because another was running says nothing
    of the connection (as for /healthz), so it is passed over."""
    run = (
        SyncRun.objects.filter(connection=connection)
        .exclude(error_code__in=selectors.NOT_A_FAILURE)
        .order_by("-pk")
        .first()
    )
    if run is None:
        return "never synced"
    when = timezone.localtime(run.started_at).strftime("%Y-%m-%d %H:%M %Z")
    if run.status == SyncRun.Status.FAILED:
        return f"last sync #{run.pk} failed ({run.error_code or 'error'}) at {when}"
    return f"last sync #{run.pk} {run.status} at {when}"
