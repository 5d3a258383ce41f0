"""Read-side questions about the sync history, answered once for every page that asks.

`/healthz`, the admin overview and the API all need "the last sync that counts": a
finished sync, success or failure, but not an attempt refused because another sync was
running (that says nothing about the data) and not one still running. With connections,
each connection has its own (`connection_states`), and its own lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import Exists, OuterRef, QuerySet, Subquery
from django.db.models.functions import Now

from . import visibility
from .models import DEFAULT_LOCK_KEY, Connection, SyncRun

# A sync refused because another one was running says nothing about the data's age.
NOT_A_FAILURE = ("sync_already_running",)


def counting_runs(connections: Iterable[int] | None = None) -> QuerySet[SyncRun]:
    """Finished syncs that tell how the data stands, newest first; with `connections`
    (ids), only the syncs of those connections."""
    runs = (
        SyncRun.objects.filter(status__in=(SyncRun.Status.SUCCESS, SyncRun.Status.FAILED))
        .exclude(error_code__in=NOT_A_FAILURE)
        .order_by("-started_at", "-id")
    )
    return runs if connections is None else runs.filter(connection_id__in=list(connections))


def last_counting_run(*fields: str, connections: Iterable[int] | None = None) -> SyncRun | None:
    runs = counting_runs(connections)
    return (runs.only(*fields) if fields else runs).first()


def last_successful_run(*fields: str, connections: Iterable[int] | None = None) -> SyncRun | None:
    runs = counting_runs(connections).filter(status=SyncRun.Status.SUCCESS)
    return (runs.only(*fields) if fields else runs).first()


def last_runs(
    *fields: str, connections: Iterable[int] | None = None
) -> tuple[SyncRun | None, SyncRun | None]:
    """(the last sync that counts, the last successful one), of every sync or of those of
    `connections` (ids): one query when the last one succeeded, two otherwise."""
    if connections is not None:
        connections = list(connections)
    last = last_counting_run(*fields, connections=connections)
    if last is not None and last.status == SyncRun.Status.SUCCESS:
        return last, last
    return last, last_successful_run(*fields, connections=connections)


def last_runs_or_connections(
    *fields: str, user: Any = None
) -> tuple[SyncRun | None, SyncRun | None, list[ConnectionState] | None]:
    """For a page that shows today's single line without connections and a line per
    connection with them, in as many queries as `last_runs` takes without connections
    (one when the last sync succeeded, two otherwise): (the last sync that counts, the
    last successful one, None) when no connection exists; (the last sync that counts,
    None, every connection's state) when some do (`connection_states`: two more
    queries). With `user`, only the runs and connections that user may see
    (`visibility`); whether there are connections is the installation's, not theirs."""
    runs = counting_runs() if user is None else visibility.visible_runs(counting_runs(), user)
    last = (
        (runs.only(*fields) if fields else runs)
        .annotate(connections_exist=Exists(Connection.objects.all()))
        .first()
    )
    if last is None:
        # No sync counts yet: the second query asks for the connections instead of the
        # last success (there is none).
        states = connection_states(*fields, user=user)
        if (
            not states
            and user is not None
            and not visibility.sees_all(user)
            and Connection.objects.exists()
        ):
            return None, None, []  # connections, none of them the user's
        return None, None, states or None
    if last.connections_exist:
        return last, None, connection_states(*fields, user=user)
    if last.status == SyncRun.Status.SUCCESS:
        return last, last, None
    success = runs.filter(status=SyncRun.Status.SUCCESS)
    return last, (success.only(*fields) if fields else success).first(), None


def running_run(key: str = DEFAULT_LOCK_KEY) -> SyncRun | None:
    """The sync holding lock `key` (a connection's, or the settings' gateway's), if any (at
    most one row per key is running), with the database's now read in the same query
    (`database_now`): the lock's ages are measured on the database's clock, never on a
    host's."""
    return running_runs().filter(lock_key=key).first()


def running_runs() -> QuerySet[SyncRun]:
    """Every sync holding a lock, each with the database's now (`database_now`)."""
    return (
        SyncRun.objects.filter(status=SyncRun.Status.RUNNING)
        .annotate(database_now=Now())
        .order_by("lock_key")
    )


@dataclass(frozen=True)
class ConnectionState:
    """One connection's sync history in brief."""

    connection: Connection
    last: SyncRun | None  # the last sync that counts
    last_success: SyncRun | None
    # The sync holding its lock, with the database's now (`database_now`), if any.
    running: SyncRun | None

    @property
    def failed(self) -> bool:
        return self.last is not None and self.last.status == SyncRun.Status.FAILED


# What a connection's state needs of its runs, whatever else a page asks for.
_STATE_FIELDS = (
    "pk", "status", "error_code", "error_message", "started_at", "finished_at", "heartbeat_at",
    "owner",
)  # fmt: skip


def connection_states(*fields: str, user: Any = None) -> list[ConnectionState]:
    """Every connection (with `user`, every one that user may see: `visibility`), in name
    order, with its last sync that counts, its last successful sync and the sync holding
    its lock: two queries (the connections with their runs' ids; those runs, with the
    database's now), however many connections and runs there are. `fields`: the runs'
    fields to load (all when none are given)."""
    counting = counting_runs().filter(connection_id=OuterRef("pk")).values("pk")
    running = SyncRun.objects.filter(
        connection_id=OuterRef("pk"), status=SyncRun.Status.RUNNING
    ).values("pk")
    rows = Connection.objects.all() if user is None else visibility.visible_connections(user)
    connections = list(
        rows.annotate(
            last_run_id=Subquery(counting[:1]),
            last_success_id=Subquery(counting.filter(status=SyncRun.Status.SUCCESS)[:1]),
            running_run_id=Subquery(running[:1]),
        ).order_by("name")
    )
    ids = {
        pk
        for c in connections
        for pk in (c.last_run_id, c.last_success_id, c.running_run_id)
        if pk is not None
    }
    runs: dict[int, SyncRun] = {}
    if ids:
        query = SyncRun.objects.filter(pk__in=ids).annotate(database_now=Now())
        if fields:
            query = query.only(*{*fields, *_STATE_FIELDS})
        runs = {run.pk: run for run in query}
    return [
        ConnectionState(
            connection=c,
            last=runs.get(c.last_run_id),
            last_success=runs.get(c.last_success_id),
            running=runs.get(c.running_run_id),
        )
        for c in connections
    ]
