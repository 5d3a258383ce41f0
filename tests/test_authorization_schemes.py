"""Credentials in another scheme than `Token` (a Bearer token, HTTP Basic, a JWT): a 401
that says which scheme the API takes, on every endpoint family, instead of "credentials
were not provided"; and nothing else changes (a lower-case `token`, which DRF takes, and
a browser session behind a proxy's Basic login still get through)."""

import base64

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions

pytestmark = pytest.mark.django_db

ENDPOINTS = {
    "sync": ("post", "/portfolio/sync/ibkr"),
    "sync runs": ("get", "/portfolio/sync/runs"),
    "sync run": ("get", "/portfolio/sync/runs/{run}"),
    "accounts": ("get", "/portfolio/accounts"),
    "account history": ("get", "/portfolio/accounts/U1111111/history"),
    "positions": ("get", "/portfolio/positions"),
    "cash": ("get", "/portfolio/cash"),
}

TAKES = "This API takes `Authorization: Token <key>`"


@pytest.fixture
def superuser_key(django_user_model, use_gateway) -> tuple[str, int]:
    """A superuser's token key (permitted everywhere) and a sync run to read."""
    user = django_user_model.objects.create_superuser("admin", password="pw-admin-123")
    run = sync_positions(trigger=SyncRun.Trigger.COMMAND)
    return Token.objects.create(user=user).key, run.sync_run_id


def call(client: APIClient, endpoint: str, run: int):
    method, url = ENDPOINTS[endpoint]
    return getattr(client, method)(url.format(run=run))


def schemes(key: str) -> dict[str, str]:
    return {
        "Bearer": f"Bearer {key}",
        "Basic": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode(),
        "JWT": "JWT eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl",
        "bearer": f"bearer {key}",
    }


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("scheme", ["Bearer", "Basic", "JWT", "bearer"])
def test_another_scheme_is_401_naming_the_one_the_api_takes(
    endpoint, scheme, superuser_key, use_gateway
):
    key, run = superuser_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=schemes(key)[scheme])
    runs, calls = SyncRun.objects.count(), len(use_gateway.calls)

    response = call(client, endpoint, run)

    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == "Token"
    body = response.json()
    assert body["code"] == "authentication_failed"
    assert body["detail"].startswith(f"{TAKES}, not the '{scheme}' scheme; nothing was done.")
    assert key not in body["detail"]
    assert (SyncRun.objects.count(), len(use_gateway.calls)) == (runs, calls)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_a_bare_key_without_a_scheme_is_401_and_not_echoed(endpoint, superuser_key):
    key, run = superuser_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=key)

    response = call(client, endpoint, run)

    assert response.status_code == 401
    assert response.json()["detail"].startswith(f"{TAKES}, not this header, which names no")
    assert key not in response.content.decode()


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("keyword", ["Token", "token", "TOKEN"])
def test_the_token_scheme_is_taken_in_any_case(endpoint, keyword, superuser_key):
    key, run = superuser_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {key}")

    assert call(client, endpoint, run).status_code == 200


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_a_session_behind_a_proxys_basic_login_still_gets_through(endpoint, superuser_key):
    _, run = superuser_key
    client = APIClient()
    client.login(username="admin", password="pw-admin-123")
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"proxy:pw").decode())

    assert call(client, endpoint, run).status_code == 200


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_no_header_is_still_credentials_not_provided(endpoint, superuser_key):
    _, run = superuser_key

    response = call(APIClient(), endpoint, run)

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
