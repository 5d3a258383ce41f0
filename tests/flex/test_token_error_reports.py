"""A Flex token typed into the admin's connection form is in no report of a request that
failed (DEBUG off, as in production): not in the error report Django mails to ADMINS
(the request's POST data; with the HTML version, each frame's local variables), whatever
failed: the database while the connection was saved, or the encryption while the form was
checked."""

from __future__ import annotations

import sys

import pytest
from django.core.signals import got_request_exception
from django.db import OperationalError
from django.test import Client
from django.views.debug import ExceptionReporter

from ibkr_sync import crypto
from ibkr_sync.models import Connection

pytestmark = pytest.mark.django_db

TOKEN = "771122334455667788990011aaSECRETTOKEN"


def _form(**fields) -> dict:
    return {
        "name": "myflex", "kind": "flex", "enabled": "on", "host": "127.0.0.1",
        "port": "7497", "client_id": "1", "flex_query_id": "445566",
        "new_flex_token": TOKEN, "note": "", "schedule": "", "schedule_every": "",
        "schedule_period": "minutes", "schedule_crontab": "",
        "schedule_timezone": "America/New_York", **fields,
    }  # fmt: skip


@pytest.fixture
def failures():
    """Each failed request and its exception, as Django's error reporting gets them."""
    seen: list = []

    def record(sender, request=None, **kwargs) -> None:
        seen.append((request, sys.exc_info()))

    got_request_exception.connect(record, dispatch_uid="test-token-error-reports")
    yield seen
    got_request_exception.disconnect(dispatch_uid="test-token-error-reports")


def _reports(failures) -> list[str]:
    """What Django mails to ADMINS for each failure: the text, and the HTML version."""
    texts = []
    for request, (kind, error, tb) in failures:
        texts.append(
            ExceptionReporter(request, kind, error, tb, is_email=True).get_traceback_text()
        )
        texts.append(
            ExceptionReporter(request, kind, error, tb, is_email=True).get_traceback_html()
        )
    return texts


def _broken_save(*args, **kwargs):
    raise OperationalError("server closed the connection unexpectedly")


def _broken_derivation(*args, **kwargs):
    raise RuntimeError("the key derivation failed")


@pytest.mark.parametrize("page", ["add", "change"])
def test_a_save_that_fails_reports_no_token(admin_user, failures, monkeypatch, settings, page):
    settings.DEBUG = False
    url = "/admin/ibkr_sync/connection/add/"
    if page == "change":
        row = Connection(name="myflex", kind="flex", flex_query_id="445566")
        row.set_flex_token("000111222333444555666777")
        row.save()
        url = f"/admin/ibkr_sync/connection/{row.pk}/change/"
    monkeypatch.setattr(Connection, "save", _broken_save)
    client = Client(raise_request_exception=False)
    client.force_login(admin_user)

    answer = client.post(url, _form())

    assert answer.status_code == 500 and failures
    for text in _reports(failures):
        assert "new_flex_token" in text and "myflex" in text  # the POST data, the token hidden
        assert TOKEN not in text


def test_an_encryption_that_fails_reports_no_token_nor_key(
    admin_user, failures, monkeypatch, settings
):
    settings.DEBUG = False
    settings.IBKR_SYNC_SECRET_KEY = "the-current-key-of-the-connections-secrets"
    crypto._fernet.cache_clear()
    monkeypatch.setattr(crypto, "HKDF", _broken_derivation)
    client = Client(raise_request_exception=False)
    client.force_login(admin_user)

    answer = client.post("/admin/ibkr_sync/connection/add/", _form())

    assert answer.status_code == 500 and failures
    assert not Connection.objects.exists()
    for text in _reports(failures):
        assert "the key derivation failed" in text
        assert TOKEN not in text
        assert settings.IBKR_SYNC_SECRET_KEY not in text
