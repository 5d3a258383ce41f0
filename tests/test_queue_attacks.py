"""The task queue attacked where it meets the lock and the schedules: a worker that died,
a task the broker lost, a task delivered again after its worker died. Each must end with
no connection's syncs stopped for good and no run left `queued` or `running` forever.

A real broker (Redis, `task_queue`); the workers' part is called as a worker calls it.
"""

import datetime as dt

import pytest
from django.db.models.functions import Now

from ibkr_sync import connections, services, tasks
from ibkr_sync.models import Connection, SyncRun
from tests.queue_broker import sent

pytestmark = pytest.mark.django_db(transaction=True)

LOCK_TIMEOUT = 3
# A worker of another machine, so that only its heartbeat's age tells it is gone.
ELSEWHERE = "elsewhere;boot;ns|4242|99|n"


def _aged(row: SyncRun, **seconds_ago: float) -> SyncRun:
    """`row` with its times set `seconds_ago` on the database's clock."""
    SyncRun.objects.filter(pk=row.pk).update(
        **{field: Now() - dt.timedelta(seconds=ago) for field, ago in seconds_ago.items()}
    )
    row.refresh_from_db()
    return row


def _held_by_a_dead_worker(row: Connection) -> SyncRun:
    """The running row a worker killed mid-sync leaves: its heartbeat silent for longer
    than the lock's timeout."""
    run = SyncRun.objects.create(
        trigger="schedule",
        status="running",
        connection=row,
        connection_name=row.name,
        lock_key=row.lock_key,
        owner=ELSEWHERE,
    )
    return _aged(run, started_at=LOCK_TIMEOUT + 5, heartbeat_at=LOCK_TIMEOUT + 5)


def test_a_schedule_is_not_stopped_for_good_by_a_sync_whose_worker_died(task_queue, settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")
    dead = _held_by_a_dead_worker(row)

    outcome = tasks.sync_scheduled(row.pk)

    assert outcome is not None and outcome["status"] == "queued", outcome
    dead.refresh_from_db()
    assert (dead.status, dead.error_code) == ("failed", "abandoned")
    queued = SyncRun.objects.get(status="queued")
    assert queued.pk == outcome["sync_run_id"] and queued.trigger == "schedule"
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [queued.pk])]


def test_a_schedule_respects_a_sync_whose_worker_still_renews_its_lock(task_queue, settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")
    alive = _aged(_held_by_a_dead_worker(row), heartbeat_at=0)

    assert tasks.sync_scheduled(row.pk) is None
    alive.refresh_from_db()
    assert alive.status == "running"
    assert SyncRun.objects.count() == 1 and task_queue.dbsize() == 0


def test_a_schedule_is_not_stopped_for_good_by_a_queued_sync_whose_task_was_lost(
    task_queue, settings, use_gateway
):
    settings.IBKR_SYNC_STALE_AFTER = 60
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")
    lost = services.queue_sync(trigger="schedule", connection=row)
    task_queue.flushdb()  # the broker lost it (restarted without persistence, flushed)

    # Queued a little while ago: it may still be waiting for a worker; nothing more.
    _aged(lost, queued_at=30, started_at=30)
    assert tasks.sync_scheduled(row.pk) is None
    assert task_queue.dbsize() == 0
    # Waiting longer than a sync may take (IBKR_SYNC_STALE_AFTER): the broker may have
    # lost it. Its task is sent again; no new run.
    _aged(lost, queued_at=61, started_at=61)
    outcome = tasks.sync_scheduled(row.pk)

    assert outcome == {"connection_id": row.pk, "status": "queued", "sync_run_id": lost.pk}
    assert list(SyncRun.objects.values_list("pk", "status")) == [(lost.pk, "queued")]
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [lost.pk])]
    # The task sent again runs it; the first one, should the broker have it after all,
    # runs nothing.
    assert tasks.sync_connection(lost.pk) == {"sync_run_id": lost.pk, "status": "success"}
    assert tasks.sync_connection(lost.pk) is None
    lost.refresh_from_db()
    assert lost.status == "success"
    assert SyncRun.objects.count() == 1


def test_a_queued_sync_waiting_behind_a_long_queue_keeps_its_place(task_queue, settings):
    """A backlog longer than the schedule's interval: the connection's queued run keeps its
    first message (its place in the queue); a firing only adds one that runs nothing once
    the run was taken."""
    settings.IBKR_SYNC_STALE_AFTER = 60
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")
    waiting = _aged(services.queue_sync(trigger="schedule", connection=row), queued_at=61)

    for _ in range(3):
        assert tasks.sync_scheduled(row.pk)["sync_run_id"] == waiting.pk

    assert SyncRun.objects.count() == 1
    assert (
        sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [waiting.pk])] * 4
    )


def test_a_task_delivered_again_after_its_worker_died_ends_its_run(task_queue, settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    row = Connection.objects.create(name="home", port=4001, client_id=7)
    run = services.queue_sync(trigger="api", connection=row)
    # A worker took it, and was killed mid-sync: the row is `running`, its heartbeat silent.
    SyncRun.objects.filter(pk=run.pk).update(status="running", owner=ELSEWHERE)
    _aged(run, started_at=LOCK_TIMEOUT + 5, heartbeat_at=LOCK_TIMEOUT + 5)

    # acks_late: the broker hands its message to another worker.
    assert tasks.sync_connection(run.pk) is None

    run.refresh_from_db()
    assert (run.status, run.error_code) == ("failed", "abandoned")
    assert run.finished_at is not None


def test_a_task_delivered_again_while_its_sync_runs_leaves_it_alone(task_queue, settings):
    settings.IBKR_SYNC_LOCK_TIMEOUT = LOCK_TIMEOUT
    row = Connection.objects.create(name="home", port=4001, client_id=7)
    run = services.queue_sync(trigger="api", connection=row)
    SyncRun.objects.filter(pk=run.pk).update(status="running", owner=ELSEWHERE)
    _aged(run, started_at=1, heartbeat_at=0)

    assert tasks.sync_connection(run.pk) is None

    run.refresh_from_db()
    assert run.status == "running"


def test_a_queued_sync_of_a_connection_removed_is_failed_with_the_removal(task_queue, settings):
    """Nothing can run it any more; left `queued`, a run whose task the broker lost (or
    that waits behind a long queue) would count as a backlog in /healthz for good."""
    settings.IBKR_SYNC_STALE_AFTER = 60
    row = Connection.objects.create(name="home", port=4001, client_id=7)
    other = Connection.objects.create(name="work", port=4002, client_id=8)
    queued = services.queue_sync(trigger="api", connection=row)
    elsewhere = services.queue_sync(trigger="api", connection=other)
    task_queue.flushdb()  # lost

    connections.remove(row)

    queued.refresh_from_db()
    assert (queued.status, queued.error_code) == ("failed", "unknown_connection")
    assert "home was removed" in queued.error_message
    assert queued.finished_at is not None
    elsewhere.refresh_from_db()
    assert elsewhere.status == "queued", "another connection's queued sync is left alone"
    # Its task, should it come after all, runs nothing.
    assert tasks.sync_connection(queued.pk) is None
    _aged(elsewhere, queued_at=61)
    assert SyncRun.objects.filter(status="queued").count() == 1


# --- a queued run, read by whoever may not see it -----------------------------------------


@pytest.fixture
def owners(django_user_model):
    from django.contrib.auth.models import Permission
    from django.core.cache import cache

    cache.clear()  # the sync budgets
    made = {}
    for name in ("alice", "bob"):
        user = django_user_model.objects.create_user(name, password=f"pw-{name}-123")
        user.user_permissions.add(
            *Permission.objects.filter(codename__in=["run_sync", "view_syncrun"])
        )
        made[name] = user
    return made


def test_a_queued_run_is_read_by_those_who_see_its_connection_only(task_queue, owners):
    from rest_framework.test import APIClient

    def as_user(user):
        client = APIClient()
        if user is not None:
            client.force_authenticate(user)
        return client

    Connection.objects.create(name="alices", owner=owners["alice"], client_id=11)
    Connection.objects.create(name="shared", client_id=13)
    alice, bob, anonymous = as_user(owners["alice"]), as_user(owners["bob"]), as_user(None)

    queued = alice.post("/portfolio/sync/ibkr?connection=alices")
    assert queued.status_code == 202, queued.json()
    location = queued["Location"]
    own = SyncRun.objects.get(pk=queued.json()["sync_run_id"])
    assert own.status == "queued" and location.endswith(f"/portfolio/sync/runs/{own.pk}")
    # Bob cannot queue a sync of it, nor read its queued run: 404, as a run that does not
    # exist (its id tells nothing), in the list neither.
    assert bob.post("/portfolio/sync/ibkr?connection=alices").status_code == 404
    missing = bob.get(f"/portfolio/sync/runs/{own.pk + 1000}")
    foreign = bob.get(location)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["code"] == missing.json()["code"]
    assert own.pk not in [row["id"] for row in bob.get("/portfolio/sync/runs").json()["results"]]
    assert anonymous.get(location).status_code == 401
    assert alice.get(location).json()["status"] == "queued"
    # An unowned connection's queued run is everyone's, as its other runs.
    shared = bob.post("/portfolio/sync/ibkr?connection=shared")
    assert shared.status_code == 202
    assert alice.get(shared["Location"]).json()["status"] == "queued"
    assert SyncRun.objects.filter(status="queued").count() == 2


# --- the database away when a worker takes a task ------------------------------------------


def _database_down_once(monkeypatch):
    """The worker's first read of its run fails as a database that does not answer."""
    from django.db import OperationalError
    from django.db.models import QuerySet

    first = QuerySet.first
    calls = {"failed": 0}

    def first_fails_once(self):
        if self.model is SyncRun and not calls["failed"]:
            calls["failed"] += 1
            raise OperationalError("could not connect to server: Connection refused")
        return first(self)

    monkeypatch.setattr(QuerySet, "first", first_fails_once)
    return calls


def test_a_task_taken_while_the_database_is_away_is_sent_again_not_lost(
    task_queue, monkeypatch, use_gateway
):
    """The task's message is acknowledged when the task returns (acks_late acknowledges a
    failure too): a run the worker could not even read stays `queued`, and no message is
    left to run it."""
    row = Connection.objects.create(name="home", port=4001, client_id=7)
    run = services.queue_sync(trigger="api", connection=row)
    task_queue.flushdb()  # the worker took the message
    calls = _database_down_once(monkeypatch)

    outcome = tasks.sync_connection(run.pk)

    assert calls["failed"] == 1
    assert outcome["status"] == "retrying", outcome
    run.refresh_from_db()
    assert run.status == "queued"
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]
    # The database back, the task sent again runs it.
    assert tasks.sync_connection(run.pk)["status"] == "success"


# --- a connection whose kind changed while its sync waited ----------------------------------


def test_a_sync_queued_before_its_connection_became_flex_goes_to_the_flex_queue(task_queue):
    """Gateway workers and Flex workers may be apart (`-Q`): a Flex download taken from the
    gateway queue would run where Flex downloads are not meant to (and the other way
    round). The task goes where the connection's kind says now, and runs there."""
    row = Connection.objects.create(name="home", port=4001, client_id=7)
    run = services.queue_sync(trigger="api", connection=row)
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]
    task_queue.flushdb()  # a gateway worker took it ...
    row.kind, row.flex_query_id = "flex", "123456"  # ... after the connection became Flex
    row.set_flex_token("1" * 24)
    row.save()

    outcome = tasks.sync_connection.apply(args=[run.pk], routing_key="ibkr_sync.gateway").get()

    assert outcome == {"sync_run_id": run.pk, "status": "requeued", "queue": "ibkr_sync.flex"}
    run.refresh_from_db()
    assert run.status == "queued", "not run on the gateway queue"
    assert sent(task_queue, "ibkr_sync.flex") == [("ibkr_sync.sync_connection", [run.pk])]
    assert task_queue.llen("ibkr_sync.gateway") == 0
