"""Which gateway a sync reads: a `Connection` row, or the settings' gateway.

With no connection rows, a sync reads the gateway the settings (or the environment:
IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID) name, exactly as before connections existed. With
one row, naming it is optional; with several, a sync names one (or `sync_ibkr --all`
syncs every enabled one). Every entry point resolves its connection here, so each says
the same thing of a name that does not exist, and builds its source here, so each reads
a connection the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.utils.module_loading import import_string

from . import conf, lock, selectors, visibility
from .exceptions import (
    ConnectionDisabled,
    ConnectionRequired,
    SyncAlreadyRunning,
    UnknownConnection,
)
from .models import DEFAULT_LOCK_KEY, Connection

# A name as the model takes it (a slug): anything else names no connection, and is never
# sent to the database (PostgreSQL refuses a NUL in a query).
_NAME = re.compile(r"[-a-zA-Z0-9_]{1,64}")


@dataclass(frozen=True)
class Target:
    """What one sync reads: a connection, or (`connection` None) the settings' gateway."""

    connection: Connection | None

    @property
    def name(self) -> str:
        """The connection's name; empty for the settings' gateway."""
        return "" if self.connection is None else self.connection.name

    @property
    def label(self) -> str:
        """How messages name it."""
        return "the settings' gateway" if self.connection is None else f"connection {self.name}"

    @property
    def lock_key(self) -> str:
        return DEFAULT_LOCK_KEY if self.connection is None else self.connection.lock_key

    def config(self) -> conf.GatewayConfig:
        """The gateway's address, client id and timeouts: the connection's fields over the
        settings'."""
        return conf.GatewayConfig.from_settings(self.connection)

    @property
    def kind(self) -> str:
        return Connection.Kind.TWS if self.connection is None else self.connection.kind

    def source(self, progress: Any = None) -> Any:
        """The source that reads it: for a TWS connection IBKR_SYNC_GATEWAY_CLASS, given
        the connection's configuration (the settings' gateway's class is called as it
        always was); for a Flex connection IBKR_SYNC_FLEX_SOURCE_CLASS, given its
        `conf.FlexConfig` (the token decrypted here, for this read only) and the gate
        its client's exchanges take turns at with every process of the installation
        (`token_gate.DatabaseGate`, on the database they share)."""
        options: dict[str, Any] = {}
        if self.kind == Connection.Kind.FLEX:
            from .token_gate import DatabaseGate

            source_class = import_string(conf.get("IBKR_SYNC_FLEX_SOURCE_CLASS"))
            options["config"] = conf.FlexConfig.from_settings(self.connection)
            options["gate"] = DatabaseGate
        else:
            source_class = import_string(conf.get("IBKR_SYNC_GATEWAY_CLASS"))
        if self.connection is not None and "config" not in options:
            options["config"] = self.config()
        if progress is not None:
            options["progress"] = progress
        return source_class(**options)


def resolve(
    name: str | Connection | None = None, *, enabled: bool = True, user: Any = None
) -> Target:
    """The target a sync of `name` reads (None: the only connection, or the settings'
    gateway when there is none). Raises `UnknownConnection` for a name no connection
    has, `ConnectionRequired` when several exist and none is named, and, with
    `enabled`, `ConnectionDisabled` for a disabled one.

    With `user` (the API's and the admin's syncs; the command is the operator's and
    passes none): only a connection that user may sync (`visibility`): another owner's
    answers exactly as a name no connection has, so that it is not told to exist; and the
    names listed when one must be chosen are only theirs."""
    mine = Connection.objects.all() if user is None else visibility.visible_connections(user)
    if isinstance(name, Connection):
        # As it is now: a row read earlier (sync_ibkr --all's list, a form's choice) may
        # have been removed, disabled or edited since.
        connection = mine.filter(pk=name.pk).first()
        if connection is None:
            raise UnknownConnection(
                f"Connection {name.name} was removed; `manage.py ibkr_connection list` "
                "lists the connections."
            )
    elif name is None or name == "":
        connections = list(Connection.objects.order_by("name")[:2])
        if not connections:
            return Target(None)
        if len(connections) > 1:
            names = (
                ", ".join(mine.order_by("name").values_list("name", flat=True))
                or "none of them yours"
            )
            raise ConnectionRequired(
                f"Several IBKR connections are configured ({names}): name the one to sync "
                "(sync_ibkr --connection NAME, ?connection=NAME), or sync them all "
                "(sync_ibkr --all)."
            )
        connection = connections[0]
        if user is not None and not visibility.may_see_connection(user, connection):
            raise UnknownConnection(
                "No IBKR connection of yours to sync; `manage.py ibkr_connection list` lists them."
            )
    else:
        connection = find(name, mine)
    if enabled and not connection.enabled:
        raise ConnectionDisabled(
            f"Connection {connection.name} is disabled; enable it (on its admin page) to sync it."
        )
    return Target(connection)


def find(name: str, among: QuerySet[Connection] | None = None) -> Connection:
    """The connection named `name` (of `among`: by default every one), or
    `UnknownConnection`, in the same words whether no connection has the name or one
    outside `among` has it."""
    connection = None
    if isinstance(name, str) and _NAME.fullmatch(name):
        connection = (Connection.objects if among is None else among).filter(name=name).first()
    if connection is None:
        shown = name if isinstance(name, str) and len(name) <= 64 else f"{str(name)[:64]}..."
        raise UnknownConnection(
            f"No IBKR connection is named {shown!r}; `manage.py ibkr_connection list` lists them."
        )
    return connection


def enabled_targets() -> list[Target]:
    """What `sync_ibkr --all` syncs, in name order: every enabled connection, or the
    settings' gateway when no connection is configured."""
    connections = list(Connection.objects.order_by("name"))
    if not connections:
        return [Target(None)]
    return [Target(connection) for connection in connections if connection.enabled]


@dataclass(frozen=True)
class Rotation:
    """What `rotate_flex_tokens` did: tokens re-encrypted under the current key, tokens
    current already, and the connections whose token no configured key decrypts."""

    rotated: int
    current: int
    unreadable: tuple[str, ...]


def rotate_flex_tokens() -> Rotation:
    """Re-encrypt every stored Flex token under the current key (IBKR_SYNC_SECRET_KEY),
    reading it with any configured one (IBKR_SYNC_SECRET_KEY_FALLBACKS): after a key
    change, so that the former key can go. A token no key decrypts is left as it is."""
    from . import crypto
    from .exceptions import SecretUnreadable

    rotated = current = 0
    unreadable = []
    for connection in Connection.objects.exclude(flex_token="").order_by("name"):
        if crypto.is_current(connection.flex_token):
            current += 1
            continue
        try:
            connection.flex_token = crypto.rotate(
                connection.flex_token, what=f"The Flex token of connection {connection.name}"
            )
        except SecretUnreadable:
            unreadable.append(connection.name)
            continue
        connection.save(update_fields=["flex_token", "updated_at"])
        rotated += 1
    return Rotation(rotated, current, tuple(unreadable))


def add(connection: Connection, *, flex_token: str | None = None) -> Connection:
    """Save a new connection (a Flex one with its token, encrypted at rest), once it is
    valid as the admin's form would find it: `ValidationError` otherwise, nothing saved."""
    if flex_token is not None:
        connection.set_flex_token(flex_token)
    connection.full_clean()
    connection.save()
    return connection


def save_flex_token(connection: Connection, token: str) -> None:
    """A Flex connection's new token, encrypted at rest (`ValidationError` for a token
    that is none, nothing saved)."""
    connection.set_flex_token(token)
    connection.save(update_fields=["flex_token", "updated_at"])


def remove(connection: Connection) -> int:
    """Remove a connection, unless a sync of it still runs (`SyncAlreadyRunning`, and the
    connection stays): its lock must be free, or held by a sync that is gone (released
    here, as the next sync would release it). Its sync runs are kept, with its name
    (`connection_name`); returns how many. The command's `remove` and the admin's delete
    both remove through here.

    Its queued syncs (IBKR_SYNC_TASK_QUEUE) are failed with it, as their worker would fail
    them (`unknown_connection`): nothing can run them any more, and one whose task the
    broker lost, or that waits behind a long queue, would otherwise stay `queued` (a
    backlog in /healthz) for good. A task of one that comes later runs nothing."""
    if not lock.release_abandoned(connection.lock_key):
        running = selectors.running_run(connection.lock_key)
        which = "" if running is None else f" (sync #{running.pk})"
        raise SyncAlreadyRunning(
            f"Connection {connection.name} is syncing{which}: it was not removed. "
            "Remove it once the sync has finished."
        )
    kept = connection.sync_runs.count()
    key, name = connection.lock_key, connection.name
    connection.delete()
    lock.fail_all_queued(
        key,
        UnknownConnection.code,
        f"Connection {name} was removed after this sync was queued.",
    )
    return kept
