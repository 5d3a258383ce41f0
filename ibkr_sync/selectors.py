"""Read-side questions about the sync history, answered once for every page that asks.

`/healthz`, the admin overview and the API all need "the last sync that counts": a
finished sync, success or failure, but not an attempt refused because another sync was
running (that says nothing about the data) and not one still running.
"""

from __future__ import annotations

from django.db.models import QuerySet
from django.db.models.functions import Now

from .models import DEFAULT_LOCK_KEY, SyncRun

# A sync refused because another one was running says nothing about the data's age.
NOT_A_FAILURE = ("sync_already_running",)


def counting_runs() -> QuerySet[SyncRun]:
    """Finished syncs that tell how the data stands, newest first."""
    return (
        SyncRun.objects.exclude(status=SyncRun.Status.RUNNING)
        .exclude(error_code__in=NOT_A_FAILURE)
        .order_by("-started_at", "-id")
    )


def last_counting_run(*fields: str) -> SyncRun | None:
    runs = counting_runs()
    return (runs.only(*fields) if fields else runs).first()


def last_successful_run(*fields: str) -> SyncRun | None:
    runs = counting_runs().filter(status=SyncRun.Status.SUCCESS)
    return (runs.only(*fields) if fields else runs).first()


def last_runs(*fields: str) -> tuple[SyncRun | None, SyncRun | None]:
    """(the last sync that counts, the last successful one): one query when the last one
    succeeded, two otherwise."""
    last = last_counting_run(*fields)
    if last is not None and last.status == SyncRun.Status.SUCCESS:
        return last, last
    return last, last_successful_run(*fields)


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
