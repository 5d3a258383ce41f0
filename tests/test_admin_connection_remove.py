"""Removing a connection in the admin is `manage.py ibkr_connection remove`
(`connections.remove`): never while a sync of it runs; its sync runs kept, with its name;
no bulk delete (each removal may be refused on its own)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from ibkr_sync import lock
from ibkr_sync.models import Connection, SyncRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", password="pw-root-1"))
    return client


@pytest.fixture
def home() -> Connection:
    return Connection.objects.create(name="home", port=4001, client_id=7)


def delete_url(connection: Connection) -> str:
    return reverse("admin:ibkr_sync_connection_delete", args=[connection.pk])


def test_a_connection_is_removed_with_its_runs_kept(admin_client_, home):
    run = lock.acquire(
        trigger="api", user=None, account_id=None, dry_run=False, connection_row=home
    )
    run.status = SyncRun.Status.SUCCESS
    lock.finish_holding(run)
    lock.forget(run.pk)

    response = admin_client_.post(delete_url(home), {"post": "yes"})

    assert response.status_code == 302
    assert not Connection.objects.filter(name="home").exists()
    kept = SyncRun.objects.get(pk=run.pk)
    assert (kept.connection_id, kept.connection_name) == (None, "home")


def test_a_connection_is_not_removed_while_a_sync_of_it_runs(admin_client_, home):
    run = lock.acquire(
        trigger="api", user=None, account_id=None, dry_run=False, connection_row=home
    )
    try:
        response = admin_client_.post(delete_url(home), {"post": "yes"}, follow=True)
    finally:
        lock.forget(run.pk)

    assert Connection.objects.filter(name="home").exists()
    assert SyncRun.objects.get(pk=run.pk).status == "running"
    said = [str(m) for m in response.context["messages"]]
    assert said == [f"Connection home is syncing (sync #{run.pk}): it was not removed. "
                    "Remove it once the sync has finished."]  # fmt: skip
    assert response.redirect_chain[-1][0] == reverse(
        "admin:ibkr_sync_connection_change", args=[home.pk]
    )


def test_there_is_no_bulk_delete_of_connections(admin_client_, home):
    page = admin_client_.get(reverse("admin:ibkr_sync_connection_changelist"))
    actions = [name for name, _ in page.context["action_form"].fields["action"].choices]
    assert "delete_selected" not in actions
    response = admin_client_.post(
        reverse("admin:ibkr_sync_connection_changelist"),
        {"action": "delete_selected", "_selected_action": [home.pk], "post": "yes"},
    )
    assert response.status_code in (200, 302)
    assert Connection.objects.filter(name="home").exists()
