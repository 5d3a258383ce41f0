"""`POST /portfolio/sync/ibkr` through DRF's test client, against a real database."""

import datetime as dt
import io
import json
import socket
from decimal import Decimal
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.urls import resolve
from django.utils.dateparse import parse_datetime
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from ibkr_sync.exceptions import (
    ClientIdInUse,
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    IncompleteSnapshot,
)
from ibkr_sync.models import SyncRun
from portfolio.models import Position
from tests.conftest import position

pytestmark = pytest.mark.django_db

URL = "/portfolio/sync/ibkr"
COUNTS = ("processed", "created", "updated", "unchanged", "reopened", "closed", "errors")


def assert_error(response, http_status: int, code: str) -> dict:
    """Every failure has one shape: {"status": "error", "code": ..., "detail": ...}."""
    assert response.status_code == http_status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "code", "detail"}
    assert body["status"] == "error"
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"].strip()
    return body


@pytest.fixture
def client(api_client, syncer) -> APIClient:
    api_client.force_authenticate(syncer)
    return api_client


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- success -------------------------------------------------------------------------------


def test_sync_returns_the_full_result_and_writes_the_positions(client, syncer, use_gateway):
    use_gateway.positions.append(position(con_id=5, symbol="ODD", sec_type="NOPE"))
    syncer.user_permissions.add(Permission.objects.get(codename="view_position"))

    response = client.post(URL)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "status", "sync_run_id", "dry_run", "connection", "accounts", "processed", "created",
        "updated", "unchanged", "reopened", "closed", "errors", "by_account", "account_values",
        "accounts_refused", "ledger", "started_at", "finished_at",
    }  # fmt: skip
    assert (body["status"], body["dry_run"], body["accounts_refused"]) == ("success", False, {})
    assert body["ledger"] == {}  # a TWS read has no ledger
    assert body["accounts"] == ["U1111111"]
    assert {k: body[k] for k in COUNTS if k != "errors"} == {
        "processed": 3, "created": 2, "updated": 0, "unchanged": 0, "reopened": 0, "closed": 0,
    }  # fmt: skip
    assert body["errors"] == [
        {
            "account": "U1111111",
            "con_id": 5,
            "symbol": "ODD",
            "sec_type": "NOPE",
            "reason": body["errors"][0]["reason"],
        }
    ]
    assert "unsupported security type" in body["errors"][0]["reason"]
    assert body["by_account"] == {
        "U1111111": {
            "processed": 3, "created": 2, "updated": 0, "unchanged": 0, "reopened": 0,
            "closed": 0, "errors": 1,
        }
    }  # fmt: skip
    started, finished = parse_datetime(body["started_at"]), parse_datetime(body["finished_at"])
    assert started.tzinfo is not None
    assert dt.timedelta(0) <= finished - started < dt.timedelta(minutes=1)

    run = SyncRun.objects.get(pk=body["sync_run_id"])
    assert (run.status, run.trigger, run.user, run.account_filter) == (
        "success",
        "api",
        syncer,
        "",
    )
    assert (run.created, run.errors) == (2, 1)
    assert dict(
        Position.objects.values_list("instrument__symbol", "quantity").order_by("quantity")
    ) == {"TSLA": Decimal("0.5"), "AAPL": Decimal("10")}


def test_a_second_identical_sync_reports_everything_unchanged(client, use_gateway):
    client.post(URL)

    body = client.post(URL).json()

    assert (body["created"], body["updated"], body["unchanged"]) == (0, 0, 2)


def test_account_filter_is_normalised_and_passed_to_the_gateway(client, use_gateway):
    use_gateway.accounts = ("U1111111", "U2222222")
    use_gateway.positions.append(position(account="U2222222", con_id=8314, symbol="IBM"))

    response = client.post(f"{URL}?ibkr_account_id=u1111111")

    assert response.status_code == 200
    assert use_gateway.calls == ["U1111111"]
    body = response.json()
    assert body["accounts"] == ["U1111111"]
    assert body["processed"] == 2
    assert not Position.objects.filter(account__external_id="U2222222").exists()
    assert SyncRun.objects.get(pk=body["sync_run_id"]).account_filter == "U1111111"


# --- input errors --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bogus!", "", "U12 34", "1234567", "U" * 40])
def test_malformed_account_id_is_400_and_starts_nothing(client, use_gateway, value):
    response = client.post(f"{URL}?{urlencode({'ibkr_account_id': value})}")

    assert_error(response, 400, "invalid_account_id")
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_malformed_account_id_detail_explains_the_expected_form(client, use_gateway):
    body = assert_error(client.post(f"{URL}?ibkr_account_id=bogus!"), 400, "invalid_account_id")
    assert "bogus!" in body["detail"]
    assert "U1234567" in body["detail"]


def test_account_the_gateway_does_not_manage_is_404(client, use_gateway):
    body = assert_error(client.post(f"{URL}?ibkr_account_id=U9999999"), 404, "unknown_account")

    assert "U9999999" in body["detail"]
    assert SyncRun.objects.get().error_code == "unknown_account"


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("ibkr_acount_id=U1111111", "ibkr_acount_id"),  # misspelt
        ("ibkr_account_id[]=U1111111", "'ibkr_account_id[]'"),
        ("IBKR_ACCOUNT_ID=U1111111", "IBKR_ACCOUNT_ID"),
        ("account=U1111111", "account"),
        ("dry_run=1", "dry_run"),
        ("ibkr_account_id=U1111111&force=1", "force"),
        ("=U1111111", "''"),
        ("ibkr_account_id%20=U1111111", "'ibkr_account_id '"),
    ],
)
def test_an_unknown_query_parameter_is_400_naming_it_and_syncs_nothing(
    client, use_gateway, query, named
):
    body = assert_error(client.post(f"{URL}?{query}"), 400, "invalid_query")

    assert f"Unknown query parameter(s): {named}." in body["detail"]
    assert "Known: connection, ibkr_account_id." in body["detail"]
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


@pytest.mark.parametrize(
    ("body", "content_type", "named"),
    [
        ({"ibkr_account_id": "U1111111"}, None, "ibkr_account_id"),  # multipart form
        ({"upload": io.BytesIO(b"U1111111")}, None, "upload"),  # a file only
        ("ibkr_account_id=U1111111", "application/x-www-form-urlencoded", "ibkr_account_id"),
        ('{"ibkr_account_id": "U1111111"}', "application/json", "ibkr_account_id"),
        ('{"account": "U1", "dry_run": true}', "application/json", "account, dry_run"),
        ("{}", "application/json", None),
        ("[1, 2]", "application/json", None),
        ("not json", "application/json", None),
        ("U1111111", "text/plain", None),
        (b"\x00\xff", "application/octet-stream", None),
    ],
)
def test_a_request_body_is_400_naming_its_fields_and_syncs_nothing(
    client, use_gateway, body, content_type, named
):
    kwargs = {"content_type": content_type} if content_type else {}

    for url in (URL, f"{URL}?ibkr_account_id=U1111111"):
        response = client.post(url, body, **kwargs)

        detail = assert_error(response, 400, "invalid_query")["detail"]
        assert "takes no request body" in detail
        assert "query string" in detail
        if named:
            assert f"a request body with {named}:" in detail
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_an_empty_body_or_an_empty_form_is_no_body(client, use_gateway):
    assert client.post(URL, "", content_type="application/json").status_code == 200
    assert client.post(URL, {}, format="multipart").status_code == 200
    assert client.post(URL, {}).status_code == 200  # a closing multipart boundary only


def test_a_repeated_account_id_is_400_and_starts_nothing(client, use_gateway):
    response = client.post(f"{URL}?ibkr_account_id=U1111111&ibkr_account_id=U1111111")

    body = assert_error(response, 400, "invalid_account_id")
    assert body["detail"] == (
        "ibkr_account_id was given more than once; give one account id, or none to sync "
        "every account."
    )
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


# --- gateway failures ----------------------------------------------------------------------


def test_gateway_unavailable_is_503_naming_host_and_port(client, settings, closed_port):
    """The real gateway adapter, pointed at a port nobody listens on."""
    settings.IBKR_HOST = "127.0.0.1"
    settings.IBKR_PORT = closed_port
    settings.IBKR_CONNECT_TIMEOUT = 5

    body = assert_error(client.post(URL), 503, "gateway_unavailable")

    assert f"127.0.0.1:{closed_port}" in body["detail"]
    run = SyncRun.objects.get()
    assert (run.status, run.error_code) == ("failed", "gateway_unavailable")


@pytest.mark.parametrize(
    ("error", "http_status", "code"),
    [
        (GatewayUnavailable("Cannot connect to the IB gateway at gw:4002"), 503,
         "gateway_unavailable"),
        (GatewayTimeout("The IB gateway at gw:4002 did not connect within 10 s"), 504,
         "gateway_timeout"),
        (ClientIdInUse("Client id 1 is already in use at gw:4002", ib_code=326), 502,
         "client_id_in_use"),
        (IncompleteSnapshot("The IB gateway sent 1 unreadable message"), 502,
         "incomplete_snapshot"),
        (GatewayError("Something odd from the gateway"), 502, "gateway_error"),
    ],
)  # fmt: skip
def test_gateway_errors_map_to_one_status_each_and_change_nothing(
    client, use_gateway, error, http_status, code
):
    client.post(URL)
    use_gateway.positions = []  # would close both positions, if the sync got that far
    use_gateway.error = error

    body = assert_error(client.post(URL), http_status, code)

    assert body["detail"] == str(error)
    assert Position.objects.open().count() == 2
    failed = SyncRun.objects.latest("id")
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", code, str(error))


def test_sync_already_running_is_409(client, use_gateway):
    SyncRun.objects.create(trigger="command", status="running", pid=None)

    body = assert_error(client.post(URL), 409, "sync_already_running")

    assert "running" in body["detail"]
    assert use_gateway.calls == []
    assert not Position.objects.exists()


def test_unexpected_error_is_a_500_and_recorded_as_internal_error(client, use_gateway):
    use_gateway.error = RuntimeError("boom")
    client.raise_request_exception = False

    response = client.post(URL)

    assert response.status_code == 500
    failed = SyncRun.objects.get()
    assert (failed.status, failed.error_code) == ("failed", "internal_error")
    assert failed.error_message == "RuntimeError: boom"
    assert failed.finished_at is not None


def test_unexpected_error_is_a_json_500_logged_with_its_traceback(client, use_gateway, caplog):
    use_gateway.error = KeyError("surprise")

    response = client.post(URL)

    assert_error(response, 500, "internal_error")
    assert "surprise" not in response.content.decode(), "no internals in the answer"
    (record,) = [r for r in caplog.records if r.name == "django.request"]
    assert record.exc_info[0] is KeyError
    run = SyncRun.objects.get()
    assert (run.status, run.error_code) == ("failed", "internal_error")


def test_database_that_does_not_answer_is_503(client, use_gateway, monkeypatch):
    from django.db import OperationalError

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr("ibkr_sync.services.apply_snapshot", down)

    response = client.post(URL)

    assert_error(response, 503, "database_unavailable")
    assert "DATABASE_URL" in response.json()["detail"]
    run = SyncRun.objects.get()
    assert (run.status, run.error_code) == ("failed", "database_unavailable")


# --- throttling ----------------------------------------------------------------------------


def test_syncs_beyond_the_rate_are_429_with_retry_after(client, use_gateway, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "2/minute"
    assert [client.post(URL).status_code for _ in range(2)] == [200, 200]

    response = client.post(URL)

    body = assert_error(response, 429, "throttled")
    assert body["detail"].startswith(
        "Too many syncs: at most 2/minute per user (IBKR_SYNC_THROTTLE_RATE), through the "
        "API and the admin together. Expected available in "
    )
    assert 1 <= int(response["Retry-After"]) <= 60
    assert len(use_gateway.calls) == 2, "the refused one never reached the gateway"
    assert SyncRun.objects.count() == 2


def test_the_default_is_six_syncs_a_minute(client, use_gateway, settings):
    del settings.IBKR_SYNC_THROTTLE_RATE  # the app's own default applies

    statuses = [client.post(URL).status_code for _ in range(7)]

    assert statuses == [200] * 6 + [429]


def test_the_limit_is_per_user(api_client, syncer, admin_user, use_gateway, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "1/minute"
    api_client.force_authenticate(syncer)
    assert [api_client.post(URL).status_code for _ in range(2)] == [200, 429]

    api_client.force_authenticate(admin_user)

    assert api_client.post(URL).status_code == 200


def test_refused_callers_are_answered_for_what_they_are_and_not_counted(
    api_client, syncer, viewer, use_gateway, settings
):
    settings.IBKR_SYNC_THROTTLE_RATE = "1/minute"
    assert {api_client.post(URL).status_code for _ in range(3)} == {401}
    api_client.force_authenticate(viewer)
    assert {api_client.post(URL).status_code for _ in range(3)} == {403}

    api_client.force_authenticate(syncer)

    assert api_client.post(URL).status_code == 200


@pytest.mark.parametrize("rate", [None, "none", "", "off"])
def test_no_limit_when_the_rate_is_none(client, use_gateway, settings, rate):
    settings.IBKR_SYNC_THROTTLE_RATE = rate

    assert {client.post(URL).status_code for _ in range(10)} == {200}


def test_reading_is_not_throttled(client, settings):
    settings.IBKR_SYNC_THROTTLE_RATE = "1/minute"
    client.handler._force_user.user_permissions.add(
        *Permission.objects.filter(codename="view_syncrun")
    )

    assert {client.get("/portfolio/sync/runs").status_code for _ in range(5)} == {200}


# --- authentication and permissions --------------------------------------------------------


def test_anonymous_is_401_with_a_token_challenge(api_client, use_gateway):
    response = api_client.post(URL)

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Token"
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_user_without_the_permission_is_403(api_client, viewer, use_gateway):
    api_client.force_authenticate(viewer)

    body = assert_error(api_client.post(URL), 403, "permission_denied")

    assert "ibkr_sync.run_sync" in body["detail"]
    assert use_gateway.calls == []
    assert not SyncRun.objects.exists()


def test_superuser_may_sync(api_client, admin_user, use_gateway):
    api_client.force_authenticate(admin_user)

    response = api_client.post(URL)

    assert response.status_code == 200
    assert SyncRun.objects.get().user == admin_user


def test_token_authentication(api_client, syncer, use_gateway):
    token = Token.objects.create(user=syncer)
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    response = api_client.post(URL)

    assert response.status_code == 200
    assert SyncRun.objects.get().user == syncer


def test_wrong_token_is_401(api_client, syncer, use_gateway):
    Token.objects.create(user=syncer)
    api_client.credentials(HTTP_AUTHORIZATION="Token not-the-key")

    assert_error(api_client.post(URL), 401, "authentication_failed")
    assert use_gateway.calls == []


def test_session_authentication_enforces_csrf(syncer, use_gateway):
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="syncer", password="pw-syncer-123")

    body = assert_error(client.post(URL), 403, "permission_denied")
    assert "CSRF" in body["detail"]
    assert use_gateway.calls == []

    # A browser gets the token from a page Django renders (here the admin login form).
    assert client.get("/admin/login/").status_code == 200
    csrf_token = client.cookies["csrftoken"].value
    response = client.post(URL, HTTP_X_CSRFTOKEN=csrf_token)

    assert response.status_code == 200, response.content
    assert SyncRun.objects.get().user == syncer


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_only_post_is_allowed(client, use_gateway, method):
    response = getattr(client, method)(URL)

    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response["Allow"]
    assert use_gateway.calls == []


def test_endpoint_opts_out_of_atomic_requests():
    """With ATOMIC_REQUESTS on, a request-wide transaction would hide the SyncRun lock
    from other processes and roll back the record of a failed sync."""
    assert "default" in resolve("/portfolio/sync/ibkr").func._non_atomic_requests


def test_the_records_not_stored_are_position_data_in_the_answer(client, use_gateway):
    """A user who may sync but not view positions (a cron token, say) hears how many
    records were not stored, not which: each names an account's record, as on the run's
    own page."""
    use_gateway.positions.append(position(con_id=5, symbol="ODD", sec_type="NOPE"))

    body = client.post(URL).json()

    assert body["errors"] is None
    assert body["by_account"]["U1111111"]["errors"] == 1
    assert "ODD" not in json.dumps(body)
    assert SyncRun.objects.get(pk=body["sync_run_id"]).errors == 1
