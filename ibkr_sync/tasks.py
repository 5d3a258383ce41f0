"""The sync as a Celery task (IBKR_SYNC_TASK_QUEUE=celery): the only module of the app that
imports Celery, and only when a sync is queued or a worker loads the tasks, so the app
works without Celery installed.

`sync_connection(sync_run_id)` runs one queued `SyncRun` (`services.queue_sync` records it
and sends this task once its transaction commits), thin over `services.run_queued`:

- Idempotent. Running it claims the `queued` row once, in one conditional UPDATE that
  turns it into the connection's lock (`running`); a second delivery of the same task
  (a redelivery after a lost worker, a duplicate) finds it no longer queued and does
  nothing. The lock in the database, not the queue, keeps two syncs of one connection
  apart: a task that finds another sync holding the lock fails its run as
  `sync_already_running`.
- `acks_late`: the message is acknowledged when the sync has ended, so a worker that
  dies before taking the row leaves the task to another; one that dies mid-sync leaves
  a `running` row whose heartbeat stops, released by the next sync after
  IBKR_SYNC_LOCK_TIMEOUT (at once on the same machine, where its process is seen gone),
  and its redelivered task runs nothing (it ends that row as `abandoned`, the next sync's
  part, rather than leave it `running` until then). The broker's visibility timeout (Redis:
  `CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]`) must be longer than the
  longest sync (IBKR_SYNC_STALE_AFTER); otherwise a running sync's task is delivered to
  another worker meanwhile (which then does nothing).
- `sync_scheduled(connection_id)`: a connection's schedule came due (django-celery-beat,
  `schedules.py`); it queues that connection's sync as above, unless one is queued or
  running already (a lock whose holder died is released; a run queued so long that its
  task may be lost has it sent again: `services.queue_scheduled`).
- A worker says it is alive (`models.QueueWorker`, every `WORKER_HEARTBEAT` seconds, from
  its start to its stop): /healthz reads that row, never asks the workers.
- Routed by the connection's kind: TWS / IB Gateway syncs to `GATEWAY_QUEUE`, Flex
  downloads to `FLEX_QUEUE`. A worker consumes both unless told otherwise (the project's
  Celery app declares them); a task taken from the other kind's queue (the connection's
  kind changed while it waited) is sent on to its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import current_app, shared_task
from celery.signals import worker_ready, worker_shutdown

logger = logging.getLogger(__name__)

# Nothing of Django's models at import: the project's Celery app reads QUEUES while it is
# configured, before Django is set up.
#: The queues the sync's tasks go to, by the connection's kind.
GATEWAY_QUEUE = "ibkr_sync.gateway"
FLEX_QUEUE = "ibkr_sync.flex"
QUEUES = (GATEWAY_QUEUE, FLEX_QUEUE)


def queue_for(kind: str) -> str:
    """The queue a sync of a connection of `kind` goes to."""
    return FLEX_QUEUE if kind == "flex" else GATEWAY_QUEUE


#: A task that met the database away is sent again this many times at most, after
#: RETRY_FIRST seconds, then twice as long each time up to RETRY_MOST (about 25 minutes):
#: each pause well below the broker's visibility timeout, past which Redis would hand a
#: task held for later to another worker too.
RETRIES = 10
RETRY_FIRST = 5
RETRY_MOST = 300


@shared_task(name="ibkr_sync.sync_connection", acks_late=True, ignore_result=True, bind=True)
def sync_connection(self, sync_run_id: int, attempt: int = 0) -> dict[str, Any] | None:
    """Run queued sync `sync_run_id`; its outcome is in its `SyncRun` row (the API's
    `GET /portfolio/sync/runs/<id>`). Returns the run's status, or None when it was not
    queued (any more): nothing was run.

    The database away (`DatabaseUnavailable`) is the one failure the run may not record:
    met before the run was read, the run is still `queued`, and this task's message is
    acknowledged all the same when it returns (acks_late acknowledges a failure too), so
    nothing would ever run it. The task is sent again instead, after a pause that grows
    (`RETRIES`, `RETRY_FIRST`, `RETRY_MOST`); the next delivery runs the run, ends it if
    it was left `running` (`services.run_queued`), or finds it ended and does nothing.

    Taken from the other kind's queue (its connection's kind changed while it waited),
    it is sent to its kind's queue and not run here: gateway and Flex workers may be
    apart (`-Q`), each where its kind of sync can run."""
    from . import services
    from .exceptions import DatabaseUnavailable, IbkrSyncError

    try:
        arrived = (getattr(self.request, "delivery_info", None) or {}).get("routing_key")
        if arrived in QUEUES:
            kind = services.queued_kind(sync_run_id)
            if kind is not None and queue_for(kind) != arrived:
                logger.info(
                    "IBKR sync #%s taken from %s: its connection is now of kind %s, sent to %s",
                    sync_run_id,
                    arrived,
                    kind,
                    queue_for(kind),
                )
                enqueue(sync_run_id, kind)
                return {"sync_run_id": sync_run_id, "status": "requeued", "queue": queue_for(kind)}
        result = services.run_queued(sync_run_id)
    except DatabaseUnavailable as exc:
        return _again(self, sync_run_id, attempt, exc)
    except IbkrSyncError as exc:
        # Recorded in the run (its code and message): an outcome, not the task's error.
        return {"sync_run_id": sync_run_id, "status": "failed", "code": exc.code}
    if result is None:
        return None
    return {"sync_run_id": sync_run_id, "status": "success"}


def _again(task, sync_run_id: int, attempt: int, error: Exception) -> dict[str, Any]:
    """Send `sync_connection(sync_run_id)` again, to the queue it came from, after a pause;
    after RETRIES, give up (the run stays as the database last had it, and is logged)."""
    if attempt >= RETRIES:
        logger.error(
            "IBKR sync #%s not run: the database did not answer in %s tries (%s)",
            sync_run_id,
            attempt + 1,
            error,
        )
        return {"sync_run_id": sync_run_id, "status": "failed", "code": error.code}
    delay = min(RETRY_FIRST * 2**attempt, RETRY_MOST)
    delivery = getattr(task.request, "delivery_info", None) or {}
    queue = delivery.get("routing_key") or GATEWAY_QUEUE
    logger.warning(
        "IBKR sync #%s: the database did not answer (%s); its task is sent again in %s s",
        sync_run_id,
        error,
        delay,
    )
    sync_connection.apply_async(
        args=[sync_run_id], kwargs={"attempt": attempt + 1}, queue=queue, countdown=delay
    )
    return {"sync_run_id": sync_run_id, "status": "retrying", "code": error.code}


@shared_task(name="ibkr_sync.sync_scheduled", ignore_result=True)
def sync_scheduled(connection_id: int) -> dict[str, Any] | None:
    """A connection's schedule came due (django-celery-beat's `PeriodicTask`, kept in
    step by `schedules.py`): queue its sync (`services.queue_scheduled`: a queued
    `SyncRun`, trigger `schedule`, run by `sync_connection` like any other), unless one is
    queued or running already. Returns the run queued (or whose task was sent again), or
    None."""
    from . import services
    from .exceptions import IbkrSyncError

    try:
        run = services.queue_scheduled(connection_id)
    except IbkrSyncError as exc:
        logger.warning(
            "Scheduled sync of connection #%s not queued (%s): %s", connection_id, exc.code, exc
        )
        return {"connection_id": connection_id, "status": "not_queued", "code": exc.code}
    if run is None:
        return None
    return {"connection_id": connection_id, "status": "queued", "sync_run_id": run.pk}


def enqueue(sync_run_id: int, kind: str) -> None:
    """Send `sync_connection(sync_run_id)` to its kind's queue."""
    sync_connection.apply_async(args=[sync_run_id], queue=queue_for(kind))


def broker_reachable(timeout: float) -> bool:
    """Whether the broker accepts a connection within `timeout` seconds (one try, no
    retry): /healthz's question, answered in bounded time."""
    try:
        with current_app.connection_for_write(connect_timeout=timeout) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
            return True
    except Exception as exc:  # any failure to connect is the answer
        logger.info("The task queue's broker did not answer: %s: %s", type(exc).__name__, exc)
        return False


# --- the worker's heartbeat ------------------------------------------------------------------


class _Heartbeat:
    """The worker's word that it is alive: `QueueWorker.alive()` at once, then every
    WORKER_HEARTBEAT seconds, from a thread of the worker's main process; its row deleted
    when the worker stops (one killed stops writing, and ages out)."""

    def __init__(self, hostname: str, queues: str) -> None:
        self.hostname = hostname
        self.queues = queues
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ibkr-sync-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from django.db import connection

        from .models import WORKER_HEARTBEAT, QueueWorker

        while True:
            try:
                QueueWorker.alive(self.hostname, self.queues)
            except Exception:
                logger.exception("The worker's heartbeat could not be written")
            finally:
                connection.close()  # this thread's own, never left open between beats
            if self.stopped.wait(WORKER_HEARTBEAT):
                return

    def stop(self) -> None:
        from django.db import connection

        from .models import QueueWorker

        self.stopped.set()
        self.thread.join(5)
        try:
            QueueWorker.gone(self.hostname)
        except Exception:
            logger.exception("The worker's heartbeat row could not be deleted")
        finally:
            connection.close()


_heartbeats: dict[str, _Heartbeat] = {}


@worker_ready.connect
def _worker_ready(sender=None, **kwargs) -> None:
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    try:
        queues = ",".join(sorted(sender.app.amqp.queues.consume_from))
    except Exception:
        queues = ""
    heartbeat = _heartbeats[hostname] = _Heartbeat(hostname, queues)
    heartbeat.start()


@worker_shutdown.connect
def _worker_shutdown(sender=None, **kwargs) -> None:
    for hostname in list(_heartbeats):
        _heartbeats.pop(hostname).stop()
