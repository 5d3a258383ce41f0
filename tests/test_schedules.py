"""Connections' schedules: edited on the connection's admin page, checked as Celery reads
a crontab, kept in step with django-celery-beat's PeriodicTask (created, changed,
paused, deleted with the connection), and the scheduled task queueing a sync through the
service (a real broker: Redis)."""

import json
import threading
import time
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab
from django.core.exceptions import ValidationError
from django.db import connection as db_connection
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from ibkr_sync import schedules, services, tasks
from ibkr_sync.models import Connection, SyncRun
from tests.queue_broker import sent

ADD = "/admin/ibkr_sync/connection/add/"


def change_url(row: Connection) -> str:
    return f"/admin/ibkr_sync/connection/{row.pk}/change/"


def form(**fields) -> dict:
    """The connection form as the admin posts it (a gateway, no schedule)."""
    return {
        "name": "home", "kind": "tws", "enabled": "on", "host": "127.0.0.1",
        "port": "4001", "client_id": "7", "flex_query_id": "", "new_flex_token": "",
        "note": "", "schedule": "", "schedule_every": "", "schedule_period": "minutes",
        "schedule_crontab": "", "schedule_timezone": "America/New_York",
        "schedule_enabled": "on", **fields,
    }  # fmt: skip


def periodic(row: Connection) -> PeriodicTask | None:
    return PeriodicTask.objects.filter(name=schedules.periodic_task_name(row.pk)).first()


def expression(task: PeriodicTask) -> str:
    c = task.crontab
    return f"{c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week}"


# --- the crontab, as Celery reads it ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["*/15 * * * mon-fri", "30 5 * * tue-sat", "0 9-17/2 1,15 jan-jun 1-5", "59 23 31 12 sat",
     "0 0 * * fri-mon", "*/5 */3 */7 */2 */2"],
)  # fmt: skip
def test_a_crontab_we_take_celery_takes_too(text):
    assert schedules.validate_crontab(text.upper().replace(" ", "  ")) == text
    minute, hour, day_of_month, month, day_of_week = text.split()
    crontab(minute, hour, day_of_week, day_of_month, month)  # raises on what it refuses


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("* * * *", "five fields"),
        ("* * * * * *", "five fields"),
        ("60 * * * *", "minute field's '60' is not 0-59"),
        ("* 24 * * *", "hour field's '24'"),
        ("* * 0 * *", "day of month field's '0' is not 1-31"),
        ("* * * 13 *", "month field's '13'"),
        ("* * * * 7", "day of week field's '7' is not 0-6"),
        ("* * * * funday", "day of week field's 'funday'"),
        ("*/0 * * * *", "step in '*/0'"),
        ("1;2 * * * *", "is not a value, range or step"),
        ("* * * * mon-", "is not a value, range or step"),
    ],
)
def test_a_crontab_celery_would_refuse_is_refused_naming_the_field(text, words):
    with pytest.raises(ValidationError) as raised:
        schedules.validate_crontab(text)
    assert words in " ".join(raised.value.messages)


# --- kept in step with the beat -----------------------------------------------------------


@pytest.mark.django_db
def test_a_gateway_with_a_crontab_left_empty_gets_every_15_minutes_on_weekdays(admin_client):
    response = admin_client.post(ADD, form(schedule="crontab"))
    assert response.status_code == 302, response.content

    row = Connection.objects.get()
    assert (row.schedule_crontab, row.schedule_timezone) == (
        "*/15 * * * mon-fri",
        "America/New_York",
    )
    task = periodic(row)
    assert task.task == "ibkr_sync.sync_scheduled" and json.loads(task.args) == [row.pk]
    assert task.enabled and task.interval is None
    assert expression(task) == "*/15 * * * mon-fri"
    assert task.crontab.timezone == ZoneInfo("America/New_York")
    page = admin_client.get(change_url(row)).text
    assert f"{task.name}: enabled; not fired yet" in page
    listed = admin_client.get("/admin/ibkr_sync/connection/").text
    assert "crontab */15 * * * mon-fri (America/New_York)" in listed


@pytest.mark.django_db
def test_flex_defaults_to_each_morning_after_a_trading_day(settings):
    settings.IBKR_SYNC_SECRET_KEY = "k" * 50
    row = Connection(name="statements", kind="flex", flex_query_id="123456", schedule="crontab")
    row.set_flex_token("1" * 24)
    row.full_clean()
    row.save()

    assert expression(periodic(row)) == "30 5 * * tue-sat"
    interval = Connection(name="daily", kind="flex", flex_query_id="1", schedule="interval")
    interval.set_flex_token("1" * 24)
    interval.full_clean()
    assert (interval.schedule_every, interval.schedule_period) == (1, "days")


@pytest.mark.django_db
def test_changing_pausing_and_removing_the_schedule_changes_the_periodic_task(admin_client):
    admin_client.post(ADD, form(schedule="crontab", schedule_crontab="0 9 * * mon"))
    row = Connection.objects.get()
    first = periodic(row).pk

    admin_client.post(change_url(row), form(schedule="interval", schedule_every="5"))
    task = periodic(row)
    assert task.pk == first, "one periodic task per connection, changed in place"
    assert task.crontab is None
    assert (task.interval.every, task.interval.period) == (5, IntervalSchedule.MINUTES)

    admin_client.post(
        change_url(row), form(schedule="interval", schedule_every="5", schedule_enabled="")
    )
    assert periodic(row).enabled is False, "paused"
    admin_client.post(change_url(row), form(schedule="interval", schedule_every="5", enabled=""))
    assert periodic(row).enabled is False, "a disabled connection's schedule does not fire"
    admin_client.post(change_url(row), form(schedule="interval", schedule_every="5"))
    assert periodic(row).enabled is True

    admin_client.post(change_url(row), form(schedule=""))
    assert periodic(row) is None
    assert PeriodicTask.objects.filter(task="ibkr_sync.sync_scheduled").count() == 0


@pytest.mark.django_db
def test_deleting_the_connection_deletes_its_periodic_task(admin_client):
    admin_client.post(ADD, form(schedule="interval", schedule_every="2", schedule_period="hours"))
    admin_client.post(ADD, form(name="work", client_id="8", schedule="crontab"))
    home, work = Connection.objects.order_by("name")
    assert periodic(home) and periodic(work)

    response = admin_client.post(f"/admin/ibkr_sync/connection/{home.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert list(PeriodicTask.objects.values_list("name", flat=True)) == [
        schedules.periodic_task_name(work.pk)
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"schedule": "crontab", "schedule_crontab": "61 * * * *"}, "schedule_crontab", "0-59"),
        ({"schedule": "crontab", "schedule_timezone": "Mars/Olympus"}, "schedule_timezone",
         "not a time zone"),
        ({"schedule": "interval", "schedule_every": "0"}, "schedule_every", "greater than"),
        ({"schedule": "hourly"}, "schedule", "not one of the available choices"),
    ],
)  # fmt: skip
def test_a_bad_schedule_is_refused_on_its_field_and_nothing_is_saved(
    admin_client, fields, field, words
):
    response = admin_client.post(ADD, form(**fields))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert words in " ".join(errors[field]), errors
    assert not Connection.objects.exists() and not PeriodicTask.objects.exists()
    assert not CrontabSchedule.objects.filter(minute="61").exists()


# --- the scheduled task ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_task_queues_a_sync_of_its_connection_once(task_queue):
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")

    # What the beat sends, run as a worker runs it.
    outcome = tasks.sync_scheduled(row.pk)

    run = SyncRun.objects.get()
    assert outcome == {"connection_id": row.pk, "status": "queued", "sync_run_id": run.pk}
    assert (run.status, run.trigger, run.connection) == ("queued", "schedule", row)
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]
    # Due again while that one waits for a worker: nothing more is queued.
    assert tasks.sync_scheduled(row.pk) is None
    assert SyncRun.objects.count() == 1
    # Once it has run, the next one is queued.
    SyncRun.objects.filter(pk=run.pk).update(status="success")
    assert tasks.sync_scheduled(row.pk)["status"] == "queued"
    assert SyncRun.objects.filter(status="queued").count() == 1


# Threads of one test process share Django's in-memory SQLite test database, whose table
# locks fail a second writer at once (a deployment's SQLite file makes it wait).
@pytest.mark.django_db(transaction=True)
def test_two_beats_firing_at_the_same_moment_queue_one_sync(task_queue, monkeypatch):
    if db_connection.vendor == "sqlite":
        pytest.skip("threads on the in-memory SQLite test database")
    row = Connection.objects.create(name="home", port=4001, client_id=7, schedule="interval")
    queue_sync = services.queue_sync

    def slow_queue_sync(*args, **kwargs):
        # Between the check and the queued row: long enough for the other beat to check.
        time.sleep(0.3)
        return queue_sync(*args, **kwargs)

    monkeypatch.setattr(services, "queue_sync", slow_queue_sync)
    start = threading.Barrier(2)
    outcomes, errors = [], []

    def beat():
        try:
            start.wait(5)
            outcomes.append(tasks.sync_scheduled(row.pk))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            db_connection.close()

    threads = [threading.Thread(target=beat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert not errors
    run = SyncRun.objects.get()
    assert (run.status, run.trigger, run.connection) == ("queued", "schedule", row)
    queued = [outcome for outcome in outcomes if outcome is not None]
    assert queued == [{"connection_id": row.pk, "status": "queued", "sync_run_id": run.pk}]
    assert outcomes.count(None) == 1
    # The task was sent once, after the queued row was committed.
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]


@pytest.mark.django_db(transaction=True)
def test_a_scheduled_sync_of_a_disabled_or_removed_connection_is_not_queued(task_queue):
    row = Connection.objects.create(name="home", port=4001, client_id=7, enabled=False)

    assert tasks.sync_scheduled(row.pk) == {
        "connection_id": row.pk,
        "status": "not_queued",
        "code": "connection_disabled",
    }
    assert tasks.sync_scheduled(row.pk + 1000)["code"] == "unknown_connection"
    assert not SyncRun.objects.exists() and task_queue.dbsize() == 0


@pytest.mark.django_db
def test_whatever_saves_a_connection_cannot_store_a_bad_schedule():
    row = Connection(name="home", schedule="crontab", schedule_crontab="every monday")

    with pytest.raises(ValidationError):
        row.save()
    assert not Connection.objects.exists() and not PeriodicTask.objects.exists()
