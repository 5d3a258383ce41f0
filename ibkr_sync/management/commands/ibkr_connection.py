"""`manage.py ibkr_connection add|list|remove|test|set-token|rotate-keys`: the
connections a sync reads, from the command line (the admin's *Connections* pages do the
same).

A Flex connection's token is never an argument (it would be in the shell's history and in
`ps`): `--token-from-env VAR` reads it from an environment variable, `--token-stdin` from
standard input. `rotate-keys` re-encrypts every stored token with the current key
(IBKR_SYNC_SECRET_KEY, else SECRET_KEY) after a key change.

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

from ... import conf, connections, exceptions, selectors
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
    #: `stdin`: where --token-stdin reads (call_command(..., stdin=stream)).
    stealth_options = ("stdin",)
    help = (
        "Manage the IBKR connections syncs read: add one, list them, remove one, test "
        "one (the handshake only). Exit codes as sync_ibkr's: "
        + "; ".join(f"{code} {meaning}" for code, _, meaning in EXITS)
        + "."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(
            dest="action", metavar="{add,list,remove,test,set-token,rotate-keys}"
        )
        actions.required = True

        add = actions.add_parser(
            "add",
            help="Add a connection: a TWS / IB Gateway at an address, with a client id "
            "(--port, --client-id), or IBKR's Flex Web Service (--kind flex, --query-id, "
            "and the token from an environment variable or stdin).",
        )
        add.add_argument("name", help="Its name: letters, digits, - and _ (e.g. home).")
        add.add_argument("--kind", choices=Connection.Kind.values, default=Connection.Kind.TWS)
        add.add_argument("--host", default=Connection._meta.get_field("host").default)
        add.add_argument("--port", type=_integer("--port"), help="TWS: required.")
        add.add_argument(
            "--client-id", type=_integer("--client-id"), dest="client_id", help="TWS: required."
        )
        add.add_argument(
            "--query-id", dest="flex_query_id", default="", help="Flex: the Flex Query's id."
        )
        _token_options(add)
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
        set_token = actions.add_parser(
            "set-token",
            help="Replace a Flex connection's token (IBKR's tokens expire: generate a new "
            "one in Client Portal), from an environment variable or stdin.",
        )
        set_token.add_argument("name")
        _token_options(set_token)
        actions.add_parser(
            "rotate-keys",
            help="Re-encrypt every stored Flex token with the current key "
            "(IBKR_SYNC_SECRET_KEY, else SECRET_KEY), read with it or a fallback.",
        )
        if parser.called_from_command_line:
            for sub in actions.choices.values():
                one_line_errors(sub)

    def handle(self, *args, action: str, **options) -> None:
        try:
            getattr(self, f"_{action.replace('-', '_')}")(**options)
        except exceptions.IbkrSyncError as exc:
            raise CommandError(str(exc), returncode=exit_code_for(exc)) from exc

    # --- actions ----------------------------------------------------------------------------

    def _add(self, *, name: str, kind: str, owner: str | None, disabled: bool, **options) -> None:
        fields = {
            key: options[key]
            for key in ("host", "note", "flex_query_id", *(f for _, f in TIMEOUTS))
        }
        flex = kind == Connection.Kind.FLEX
        if flex:
            if options["port"] is not None or options["client_id"] is not None:
                raise CommandError(
                    "A Flex connection has no gateway: leave out --port and --client-id.",
                    returncode=2,
                )
        else:
            missing = [
                o
                for o, k in (("--port", "port"), ("--client-id", "client_id"))
                if options[k] is None
            ]
            if missing:
                raise CommandError(
                    f"A TWS connection needs {' and '.join(missing)} (or --kind flex).",
                    returncode=2,
                )
            if options["flex_query_id"] or _token_given(options):
                raise CommandError(
                    "--query-id and the token are for a Flex connection (--kind flex).",
                    returncode=2,
                )
            fields.update(port=options["port"], client_id=options["client_id"])
        connection = Connection(name=name, kind=kind, enabled=not disabled, **fields)
        if owner is not None:
            connection.owner = _user(owner)
        token = self._token(options) if flex else None
        try:
            connections.add(connection, flex_token=token)
        except ValidationError as exc:
            raise CommandError(
                f"Connection {name!r} was not added: {_problems(exc)}", returncode=2
            ) from None
        state = "" if connection.enabled else " (disabled)"
        where = (
            f"{connection.address}, token saved encrypted"
            if flex
            else f"{connection.address}, client id {connection.client_id}"
        )
        self.stdout.write(
            f"Added connection {connection.name}{state}: {where}. Test it: manage.py "
            f"ibkr_connection test {connection.name}"
        )

    def _set_token(self, *, name: str, **options) -> None:
        connection = connections.find(name)
        if not connection.is_flex:
            raise CommandError(
                f"Connection {name} is a {connection.get_kind_display()} connection: it has "
                "no Flex token.",
                returncode=2,
            )
        try:
            connections.save_flex_token(connection, self._token(options))
        except ValidationError as exc:
            raise CommandError(
                f"The token of {name} was not changed: {_problems(exc)}", returncode=2
            ) from None
        self.stdout.write(f"Saved a new Flex token for connection {name} (encrypted).")

    def _rotate_keys(self, **options) -> None:
        rotation = connections.rotate_flex_tokens()
        self.stdout.write(
            f"{rotation.rotated} Flex token(s) re-encrypted, {rotation.current} current already."
        )
        unreadable = rotation.unreadable
        if unreadable:
            raise exceptions.SecretUnreadable(
                f"No configured key decrypts the Flex token of {', '.join(unreadable)}: put "
                "the former key in IBKR_SYNC_SECRET_KEY_FALLBACKS and run rotate-keys again, "
                "or save a new token (ibkr_connection set-token NAME --token-from-env VAR)."
            )

    def _token(self, options: dict) -> str:
        """The token from the environment variable or stdin the options name."""
        import os
        import sys

        variable, from_stdin = options.get("token_from_env"), options.get("token_stdin")
        if variable:
            token = os.environ.get(variable, "")
            if not token.strip():
                raise CommandError(
                    f"The environment variable {variable} is not set or empty: export the "
                    "Flex token in it (never on the command line).",
                    returncode=2,
                )
            return token.strip()
        if from_stdin:
            stream = options.get("stdin") or sys.stdin
            token = stream.readline().strip()
            if not token:
                raise CommandError("No Flex token was read from stdin.", returncode=2)
            return token
        raise CommandError(
            "A Flex connection needs its token: --token-from-env VAR (an environment "
            "variable holding it) or --token-stdin (never the token itself on the command "
            "line).",
            returncode=2,
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
            if connection.is_flex:
                credential = "token set" if connection.has_flex_token else "no token"
            else:
                credential = f"client id {connection.client_id}"
            self.stdout.write(
                "  ".join(
                    (
                        connection.name,
                        connection.kind,
                        "enabled" if connection.enabled else "disabled",
                        connection.address,
                        credential,
                        f"owner {owner}",
                        _last_sync(connection),
                    )
                )
            )

    def _remove(self, *, name: str, **options) -> None:
        kept = connections.remove(connections.find(name))
        runs = f"its {kept} sync run(s) kept" if kept else "it had no sync runs"
        self.stdout.write(f"Removed connection {name} ({runs}).")

    def _test(self, *, name: str | None, **options) -> None:
        target = connections.resolve(name, enabled=False)
        check = check_connection(target.connection)
        self.stdout.write(f"ok: {check.summary}")
        for lacking in check.lacking:
            self.stdout.write(self.style.WARNING(f"  lacking: {lacking}"))


def _token_options(parser: CommandParser) -> None:
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token-from-env",
        metavar="VAR",
        help="Flex: the name of an environment variable holding the token (the token "
        "itself is never an argument: shell history, ps).",
    )
    token.add_argument(
        "--token-stdin", action="store_true", help="Flex: read the token from stdin."
    )


def _token_given(options: dict) -> bool:
    return bool(options.get("token_from_env") or options.get("token_stdin"))


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
