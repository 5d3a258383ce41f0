"""Hostile requests and who may do what: every URL, every kind of caller, no secret leaks."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from ibkr_sync.exceptions import GatewayUnavailable
from ibkr_sync.models import SyncRun

pytestmark = pytest.mark.django_db

SYNC = "/portfolio/sync/ibkr"
SYNC_NOW = "/admin/ibkr_sync/syncrun/sync-now/"
ADMIN = "/admin/"
POSITIONS = "/admin/portfolio/position/"
PASSWORD = "pw-Secret-4711"


# --- odd ibkr_account_id values --------------------------------------------------------------

ODD_ACCOUNT_IDS = {
    "empty": "",
    "blank": "   ",
    "10 KB": "U" + "1" * 10_240,
    "sql": "U1234567' OR '1'='1",
    "sql comment": "U1234567;--",
    "shell": "$(touch /tmp/owned)",
    "backticks": "`id`",
    "pipe": "U1234567|cat /etc/passwd",
    "unicode letters": "Ü1234567",
    "unicode digits": "U\u0661\u0662\u0663\u0664\u0665\u0666\u0667",
    "bidi override": "\u202eU1234567",
    "nul": "U1234567\x00",
    "newline": "U1234567\nX",
    "path": "../../etc/passwd",
}


@pytest.mark.parametrize("value", list(ODD_ACCOUNT_IDS.values()), ids=list(ODD_ACCOUNT_IDS))
def test_odd_account_ids_are_400_with_a_clear_message(value, api_client, syncer, use_gateway):
    api_client.force_authenticate(syncer)
    response = api_client.post(f"{SYNC}?ibkr_account_id={quote(value)}")

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid_account_id"
    assert "account id" in body["detail"], body["detail"]
    assert use_gateway.calls == [], "nothing was started"
    assert not SyncRun.objects.exists()


def test_a_repeated_account_parameter_is_400(api_client, syncer, use_gateway):
    api_client.force_authenticate(syncer)
    response = api_client.post(f"{SYNC}?ibkr_account_id=U1111111&ibkr_account_id=U2222222")

    assert response.status_code == 400
    assert "more than once" in response.json()["detail"]
    assert use_gateway.calls == []


# --- authentication and permission matrix ----------------------------------------------------


def make_user(django_user_model, name, *, staff=False, superuser=False, active=True, perm=False):
    user = django_user_model.objects.create_user(
        name, password=PASSWORD, is_staff=staff or superuser, is_superuser=superuser,
        is_active=active,
    )  # fmt: skip
    if perm:
        user.user_permissions.add(Permission.objects.get(codename="run_sync"))
    return user


CALLERS = {
    # name: (user kwargs or None for anonymous, how it authenticates)
    "anonymous": (None, None),
    "no permission": ({}, "session"),
    "run_sync": ({"perm": True}, "session"),
    "run_sync by token": ({"perm": True}, "token"),
    "staff without permission": ({"staff": True}, "session"),
    "staff with permission": ({"staff": True, "perm": True}, "session"),
    "superuser": ({"superuser": True}, "session"),
    "inactive with permission": ({"perm": True, "staff": True, "active": False}, "session"),
    "inactive by token": ({"perm": True, "active": False}, "token"),
    "bad token": ({"perm": True}, "bad token"),
}

# Expected status per URL and caller. The sync API needs `ibkr_sync.run_sync`; the admin
# needs an active staff user (and the Sync now button the permission as well).
EXPECTED = {
    "anonymous": {SYNC: 401, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "no permission": {SYNC: 403, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "run_sync": {SYNC: 200, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "run_sync by token": {SYNC: 200, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "staff without permission": {SYNC: 403, SYNC_NOW: 403, ADMIN: 200, POSITIONS: 403},
    "staff with permission": {SYNC: 200, SYNC_NOW: "synced", ADMIN: 200, POSITIONS: 403},
    "superuser": {SYNC: 200, SYNC_NOW: "synced", ADMIN: 200, POSITIONS: 200},
    "inactive with permission": {SYNC: 401, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "inactive by token": {SYNC: 401, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
    "bad token": {SYNC: 401, SYNC_NOW: 302, ADMIN: 302, POSITIONS: 302},
}


def client_for(caller, django_user_model):
    spec, how = CALLERS[caller]
    client = APIClient()
    if spec is None:
        return client
    user = make_user(django_user_model, caller.replace(" ", "_"), **spec)
    if how == "session":
        client.force_login(user)  # as a login would: the session holds the user id
    elif how == "token":
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    else:
        Token.objects.create(user=user)
        client.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    return client


@pytest.mark.parametrize("caller", list(CALLERS))
def test_only_the_intended_callers_get_through(caller, django_user_model, use_gateway):
    client = client_for(caller, django_user_model)

    for url, expected in EXPECTED[caller].items():
        runs = SyncRun.objects.count()
        response = client.post(url) if url in (SYNC, SYNC_NOW) else client.get(url)
        if expected == "synced":  # the admin's button ran a sync and went back to the list
            assert response.status_code == 302, (url, response.status_code)
            assert SyncRun.objects.count() == runs + 1
            continue
        assert response.status_code == expected, (caller, url, response.status_code)
        if expected == 302:
            assert "/admin/login/" in response["Location"]
        if expected != 200:
            assert SyncRun.objects.count() == runs, f"{caller} started a sync via {url}"


def test_session_posts_without_a_csrf_token_are_refused(django_user_model, use_gateway):
    make_user(django_user_model, "admin", superuser=True)
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="admin", password=PASSWORD)

    assert browser.post(SYNC).status_code == 403
    assert browser.post(SYNC_NOW).status_code == 403
    assert not SyncRun.objects.exists()


# --- secrets stay out of logs, responses and sync records ------------------------------------


def test_no_secret_in_logs_responses_or_sync_runs(django_user_model, use_gateway, settings,
                                                  caplog, capsys):  # fmt: skip
    settings.SECRET_KEY = "the-secret-key-" + "k" * 40
    user = make_user(django_user_model, "alice", superuser=True)
    token = Token.objects.create(user=user).key
    caplog.set_level(logging.DEBUG)
    bodies = []

    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    bodies.append(by_token.post(SYNC).content)
    use_gateway.error = GatewayUnavailable("Cannot connect to the IB gateway at 127.0.0.1:1.")
    bodies.append(by_token.post(SYNC).content)
    bodies.append(APIClient().post(SYNC, HTTP_AUTHORIZATION=f"Token {token[:-1]}x").content)
    browser = Client()
    bodies.append(browser.post("/admin/login/", {"username": "alice", "password": "wrong"}).content)
    assert browser.login(username="alice", password=PASSWORD)
    session = browser.cookies["sessionid"].value
    bodies.append(browser.get("/admin/ibkr_sync/syncrun/").content)

    runs = " ".join(
        f"{r.error_code} {r.error_message} {r.error_details} {r.host}"
        for r in SyncRun.objects.all()
    )
    out, err = capsys.readouterr()
    haystack = "\n".join(
        [caplog.text, out, err, runs, *(b.decode(errors="replace") for b in bodies)]
    )
    assert SyncRun.objects.count() == 2
    for secret in (token, token[:-1] + "x", PASSWORD, settings.SECRET_KEY, session):
        assert secret not in haystack
