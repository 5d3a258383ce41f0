"""The admin's "Sync now" with a task queue (IBKR_SYNC_TASK_QUEUE=celery, a real broker):
the sync is queued, not run in the request, and the message links to the run's page in
the sync history, where its outcome will be. Without a queue it runs as before."""

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import constants as message_levels
from django.urls import reverse

from ibkr_sync.models import Connection, SyncRun
from portfolio.models import Position
from tests.queue_broker import sent
from tests.test_admin import change, changelist, client_for, messages_of
from tests.test_admin_sync_now import SYNC_NOW, staff

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def syncing_staff(django_user_model):
    return staff(django_user_model, "syncer", "view_position", "view_account", "run_sync")


def test_sync_now_queues_the_sync_and_links_to_its_run(syncing_staff, task_queue, use_gateway):
    syncing_staff.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    back = changelist(Position)

    response = client_for(syncing_staff).post(
        SYNC_NOW, {"next": back, "ibkr_account_id": "U1111111"}, follow=True
    )

    assert response.redirect_chain == [(back, 302)]
    run = SyncRun.objects.get()
    assert (run.status, run.trigger, run.user) == ("queued", "admin", syncing_staff)
    assert run.account_filter == "U1111111"
    assert use_gateway.calls == [], "nothing is read in the request"
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]
    [(level, text)] = messages_of(response)
    assert level == message_levels.INFO
    assert text == (
        f'<a href="{change(run)}">Sync #{run.pk}</a> queued: a worker runs it; its page in '
        "the sync history shows its outcome."
    )
    assert f'<a href="{change(run)}">Sync #{run.pk}</a> queued' in response.text

    page = client_for(syncing_staff).get(change(run))
    assert page.status_code == 200
    assert "Queued" in page.text


def test_a_user_who_may_not_view_runs_is_told_the_number_without_a_link(syncing_staff, task_queue):
    home = Connection.objects.create(name="home", port=4001, client_id=1)
    Connection.objects.create(name="work", port=4002, client_id=2)

    response = client_for(syncing_staff).post(
        SYNC_NOW, {"connection": "home", "next": changelist(Position)}, follow=True
    )

    run = SyncRun.objects.get()
    assert run.connection == home and run.status == "queued"
    [(level, text)] = messages_of(response)
    assert level == message_levels.INFO
    assert text == f"Sync #{run.pk} of connection home queued: a worker runs it."
    assert reverse("admin:ibkr_sync_syncrun_change", args=[run.pk]) not in response.text


def test_what_cannot_be_synced_is_refused_before_anything_is_queued(syncing_staff, task_queue):
    Connection.objects.create(name="home", port=4001, client_id=1)
    Connection.objects.create(name="work", port=4002, client_id=2, enabled=False)

    for data, words in (
        ({"connection": "work"}, "disabled"),
        ({"connection": "nope"}, "nope"),
        ({"connection": "home", "ibkr_account_id": "bad!"}, "not queued"),
    ):
        data["next"] = changelist(Position)
        response = client_for(syncing_staff).post(SYNC_NOW, data, follow=True)
        [(level, text)] = messages_of(response)
        assert level == message_levels.ERROR and words in text, text
    assert not SyncRun.objects.exists()
    assert task_queue.dbsize() == 0


def test_without_a_queue_sync_now_runs_in_the_request(syncing_staff, settings, use_gateway):
    settings.IBKR_SYNC_TASK_QUEUE = ""

    response = client_for(syncing_staff).post(SYNC_NOW, {"next": changelist(Position)}, follow=True)

    run = SyncRun.objects.get()
    assert (run.status, run.queued_at) == ("success", None)
    [(level, text)] = messages_of(response)
    assert level == message_levels.SUCCESS and f"Sync #{run.pk} finished" in text
