"""`GET /healthz` with connections: each connection's last success and lock, by id (named
only to a staff user who may view sync runs); unhealthy when any enabled one is. The
runs are made as the sync records them (SyncRun rows); the gateways' ports are real
sockets. The real syncs that fail so are in tests/integration/test_health_connections.py.
"""

import datetime as dt
import logging

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from ibkr_sync import health
from ibkr_sync.models import Connection, SyncRun
from tests.test_health import closed_port, get, listening_port, run  # noqa: F401

pytestmark = pytest.mark.django_db

SECRETS = ("gw-home.example", "gw-office.example", "U1234567", "Cannot connect", "4001")


@pytest.fixture
def home():
    return Connection.objects.create(name="home", host="gw-home.example", port=4001)


@pytest.fixture
def office():
    return Connection.objects.create(name="office", host="gw-office.example", port=4002)


def of(connection, status="success", **fields) -> SyncRun:
    """A run of `connection`, recorded as the sync records one."""
    return run(
        status,
        connection=connection,
        connection_name=connection.name,
        lock_key=connection.lock_key,
        **fields,
    )


def entries(body) -> dict[int, dict]:
    return {entry["id"]: entry for entry in body["connections"]}


def test_without_connections_the_answer_has_no_connections(client):
    run()

    status, body = get(client)

    assert status == 200
    assert set(body) == {"status", "checks"}


def test_each_connection_reports_its_last_success_and_lock(client, home, office):
    of(home, ago=dt.timedelta(minutes=10))
    of(office, ago=dt.timedelta(minutes=3))

    status, body = get(client)

    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "last_sync", "sync_lock"}
    assert [entry["id"] for entry in body["connections"]] == [home.pk, office.pk]
    first, second = body["connections"]
    assert first["status"] == second["status"] == "ok"
    assert first["enabled"] is True
    assert 599 <= first["last_sync"]["age_seconds"] <= 610
    assert 179 <= second["last_sync"]["age_seconds"] <= 190
    assert first["last_sync"]["status"] == "ok"
    assert first["sync_lock"] == {"status": "ok"}
    # The installation's last sync: the newest of them.
    assert 179 <= body["checks"]["last_sync"]["age_seconds"] <= 190


def test_a_connection_never_synced_makes_the_installation_unhealthy(client, home, office):
    of(home)

    status, body = get(client)

    assert status == 503
    assert entries(body)[home.pk]["status"] == "ok"
    assert entries(body)[office.pk]["status"] == "unhealthy"
    assert entries(body)[office.pk]["last_sync"]["status"] == "never"


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        ("gateway_unavailable", "Cannot connect to the IB gateway at gw-office.example:4001: "
         "connection refused.", "unreachable"),
        ("not_a_gateway", "Cannot connect to the IB gateway at gw-office.example:4001.",
         "unreachable"),
        ("gateway_timeout", "Cannot connect to the IB gateway at gw-office.example:4001: no "
         "answer in 5 s.", "unreachable"),
        ("no_managed_accounts", "The IB gateway at gw-office.example:4001 manages no account: "
         "is it logged in?", "logged_out"),
        # The messages of errors.py for an IB error: the link to IBKR's servers lost, and a
        # gateway refusing (502).
        ("gateway_unavailable", "The IB gateway at gw-office.example:4001 lost its connection "
         "to IBKR's servers during the read (error 1100: Connectivity between IB and Trader "
         "Workstation has been lost.); nothing was changed.", "logged_out"),
        ("gateway_unavailable", "The IB gateway at gw-office.example:4001 reported error 502: "
         "Couldn't connect to TWS.", "unreachable"),
        ("client_id_in_use", "The IB gateway at gw-office.example:4001 refused client id 7",
         "failed"),
        ("incomplete_snapshot", "The read of U1234567 was incomplete", "failed"),
    ],
)  # fmt: skip
def test_a_failed_connection_says_why_and_when_it_was_last_fine(
    client, home, office, code, message, status
):
    of(home, ago=dt.timedelta(minutes=1))
    fine = of(office, ago=dt.timedelta(hours=2))
    of(office, "failed", ago=dt.timedelta(minutes=2), error_code=code, error_message=message)

    answer, body = get(client)

    assert answer == 503
    assert body["status"] == "unhealthy"
    entry = entries(body)[office.pk]
    assert entry["status"] == "unhealthy"
    assert entry["last_sync"]["status"] == status
    assert entry["last_sync"]["error_code"] == code
    assert entry["last_sync"]["last_success_at"] == fine.finished_at.isoformat().replace(
        "+00:00", "Z"
    )
    assert 7199 <= entry["last_sync"]["age_seconds"] <= 7210
    assert entries(body)[home.pk]["status"] == "ok"
    # The installation's check keeps today's words.
    assert body["checks"]["last_sync"]["status"] == "ok"  # home synced last
    text = str(body)
    for secret in SECRETS:
        assert secret not in text
    assert "name" not in entry


def test_a_disabled_connection_is_listed_and_counts_for_nothing(client, home, office):
    of(home)
    office.enabled = False
    office.save()
    of(office, "failed", ago=dt.timedelta(minutes=1), error_code="gateway_unavailable")

    status, body = get(client)

    assert status == 200, body
    assert entries(body)[office.pk]["status"] == "disabled"
    assert entries(body)[office.pk]["enabled"] is False
    assert entries(body)[office.pk]["last_sync"]["status"] == "unreachable"
    # Its failure, the newest run, is not the installation's last sync.
    assert body["checks"]["last_sync"]["status"] == "ok"


def test_a_connections_lock_is_measured_with_its_own_timeouts(client, settings, home, office):
    settings.IBKR_CONNECT_TIMEOUT, settings.IBKR_REQUEST_TIMEOUT = 10, 60
    settings.IBKR_SYNC_LOCK_TIMEOUT = 30
    settings.IBKR_READ_VALUES = False  # the settings' limit: 100 s
    office.connect_timeout, office.request_timeout = 2, 8  # its own: 40 s
    office.save()
    of(home)
    of(office, ago=dt.timedelta(minutes=2))
    held = of(office, "running", ago=dt.timedelta(seconds=50))
    SyncRun.objects.filter(pk=held.pk).update(heartbeat_at=timezone.now())

    status, body = get(client)

    assert status == 503
    lock = entries(body)[office.pk]["sync_lock"]
    assert lock["status"] == "stuck"
    assert lock["limit_seconds"] == 40
    assert 49 <= lock["held_seconds"] <= 55
    assert entries(body)[home.pk]["sync_lock"] == {"status": "ok"}
    # The installation's lock check: the worst lock, whichever connection holds it.
    assert body["checks"]["sync_lock"] == lock
    assert health.lock_hold_limit(office) == 40
    assert health.lock_hold_limit() == 100

    # Silent for longer than IBKR_SYNC_LOCK_TIMEOUT: abandoned.
    SyncRun.objects.filter(pk=held.pk).update(
        heartbeat_at=timezone.now() - dt.timedelta(seconds=45)
    )
    assert entries(get(client)[1])[office.pk]["sync_lock"]["status"] == "abandoned"


def test_the_installations_lock_check_sees_every_connections_lock(home):
    """Not only the settings' gateway's lock: a connection's lock held too long is seen."""
    of(home, ago=dt.timedelta(minutes=1))
    held = of(home, "running", ago=dt.timedelta(hours=1))
    SyncRun.objects.filter(pk=held.pk).update(heartbeat_at=timezone.now())

    healthy, report = health.check_health()

    assert not healthy
    assert report["checks"]["sync_lock"]["status"] == "stuck"
    assert report["connections"][0]["sync_lock"]["status"] == "stuck"


def test_a_lock_held_briefly_is_ok_for_the_connection_and_the_installation(client, home):
    of(home, ago=dt.timedelta(minutes=1))
    of(home, "running", ago=dt.timedelta(seconds=5))

    status, body = get(client)

    assert status == 200, body
    lock = body["connections"][0]["sync_lock"]
    assert lock["status"] == "ok"
    assert 4 <= lock["held_seconds"] <= 10
    assert body["checks"]["sync_lock"] == lock


def test_the_gateway_probe_tries_each_enabled_connections_port(
    client,
    home,
    office,
    listening_port,  # noqa: F811
    closed_port,  # noqa: F811
):
    home.host, home.port = "127.0.0.1", listening_port
    home.save()
    office.host, office.port = "127.0.0.1", closed_port
    office.save()
    spare = Connection.objects.create(name="spare", port=closed_port, enabled=False)
    for connection in (home, office, spare):
        of(connection)

    status, body = get(client, "?gateway=1")

    assert status == 503
    assert entries(body)[home.pk]["gateway"] == {"status": "ok"}
    assert entries(body)[office.pk]["gateway"] == {"status": "unreachable"}
    assert entries(body)[office.pk]["status"] == "unhealthy"
    assert "gateway" not in entries(body)[spare.pk]  # disabled: not tried
    assert body["checks"]["gateway"] == {"status": "unreachable"}
    assert str(closed_port) not in str(body)
    assert "gateway" not in entries(get(client)[1])[home.pk]  # only when asked

    office.enabled = False
    office.save()
    status, body = get(client, "?gateway=1")
    assert status == 200, body
    assert body["checks"]["gateway"] == {"status": "ok"}


# --- names: only to staff who may view sync runs --------------------------------------------


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)


def test_names_are_shown_only_to_staff_who_may_view_sync_runs(
    client, django_user_model, staff, home, office
):
    of(home)
    of(office)

    assert all("name" not in entry for entry in get(client)[1]["connections"])

    # A token (even a valid-looking one) is no login here: still only ids.
    response = client.get("/healthz", HTTP_AUTHORIZATION="Token not-a-token")
    assert all("name" not in entry for entry in response.json()["connections"])

    client.force_login(staff)  # staff, without the sync runs' view permission
    assert all("name" not in entry for entry in get(client)[1]["connections"])

    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123")
    viewer.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    client.force_login(viewer)  # may view sync runs, but no staff
    assert all("name" not in entry for entry in get(client)[1]["connections"])

    staff.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    client.force_login(staff)
    status, body = get(client)
    assert status == 200
    assert [entry["name"] for entry in body["connections"]] == ["home", "office"]
    for secret in ("gw-home.example", "gw-office.example", "4001"):
        assert secret not in str(body)


def test_an_unhealthy_connection_is_logged_by_its_id(client, home, office, caplog, monkeypatch):
    monkeypatch.setattr("ibkr_sync.api.views._last_health", {})
    caplog.set_level(logging.INFO)
    of(home)
    of(office, "failed", ago=dt.timedelta(minutes=1), error_code="no_managed_accounts")

    assert get(client)[0] == 503

    messages = [r.getMessage() for r in caplog.records if r.name == "ibkr_sync.health"]
    assert messages == [
        f"Health check unhealthy: last_sync=failed; connection {office.pk}: last_sync=logged_out"
    ]


def test_the_state_of_every_connection_takes_the_same_queries_however_many(
    django_assert_max_num_queries,
):
    """The database's answer, the connections with their runs' ids, those runs, the
    installation's last runs (two: the last failed) and the database's now for their age,
    the locks held."""
    for index in range(12):
        connection = Connection.objects.create(name=f"c{index}", port=4000 + index)
        of(connection, ago=dt.timedelta(minutes=2))
        of(connection, "failed", ago=dt.timedelta(minutes=1), error_code="gateway_timeout")
        of(connection, "running", ago=dt.timedelta(seconds=3))

    with django_assert_max_num_queries(7):
        healthy, report = health.check_health()

    assert not healthy
    assert len(report["connections"]) == 12
    assert {e["last_sync"]["status"] for e in report["connections"]} == {"unreachable"}
