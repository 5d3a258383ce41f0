"""A broker's password (`CELERY_BROKER_URL=redis://:secret@host`) is in no error report:
Django's reports list the settings, and hide by a setting's name only (`PASSWORD`,
`SECRET`, `KEY`...): a URL-valued setting such as the broker's, a cache's LOCATION or a
result backend went out whole, in the report mailed to ADMINS and on DEBUG's error page."""

from __future__ import annotations

import sys

import pytest
from django.views.debug import ExceptionReporter, get_default_exception_reporter_filter

SECRET = "s3cretBrokerPassw0rd"


def _reports() -> list[str]:
    try:
        raise RuntimeError("something failed")
    except RuntimeError:
        kind, error, tb = sys.exc_info()
    reporter = ExceptionReporter(None, kind, error, tb, is_email=True)
    return [reporter.get_traceback_text(), reporter.get_traceback_html()]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CELERY_BROKER_URL", f"redis://:{SECRET}@redis.internal:6379/0"),
        ("CELERY_BROKER_URL", f"amqp://worker:{SECRET}@rabbit.internal:5672//"),
        ("CELERY_RESULT_BACKEND", f"rediss://default:{SECRET}@cache.internal/1"),
        (
            "CACHES",
            {"default": {"BACKEND": "x", "LOCATION": f"redis://user:{SECRET}@cache:6379/2"}},
        ),
    ],
)
def test_a_password_in_a_url_valued_setting_is_in_no_error_report(settings, name, value):
    setattr(settings, name, value)
    get_default_exception_reporter_filter.cache_clear()

    reports = _reports()

    for report in reports:
        assert SECRET not in report
    # The rest of the URL stays, to tell which broker it was.
    assert "6379" in reports[0] or "5672" in reports[0] or "cache.internal" in reports[0]


def test_a_url_without_a_password_is_reported_as_it_is(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    get_default_exception_reporter_filter.cache_clear()

    assert "redis://127.0.0.1:6379/0" in _reports()[0]


@pytest.mark.parametrize(
    "value",
    [
        # An "@" left unencoded in a password: the URL's parsers (kombu's, urllib's) take
        # the password up to the last "@" before the host, so the broker is reached.
        "redis://:Zq7pre@Zq7post@redis.internal:6379/0",
        "amqp://worker:Zq7pre@Zq7mid@Zq7post@rabbit.internal:5672//",
        "redis://:Zq7pre@Zq7post@redis.internal",
        "redis://:Zq7pre@Zq7post@redis.internal?ssl_cert_reqs=none",
        # And in the user name (an e-mail address as a broker's user): the password is
        # what follows its first ":".
        "amqp://svc@example.com:Zq7pre@Zq7post@rabbit.internal:5672//",
        "rediss://svc@example.com:Zq7pre@Zq7post@cache.internal:6380/0",
    ],
)
def test_a_password_holding_an_at_sign_is_hidden_whole(settings, value):
    from urllib.parse import urlsplit

    from ibkr_sync.reporting import hide_url_passwords

    password = urlsplit(value).password
    assert password is not None and "@" in password
    hidden = hide_url_passwords(value, "*")

    assert hidden == value.replace(f":{password}@", ":*@", 1)
    settings.CELERY_BROKER_URL = value
    get_default_exception_reporter_filter.cache_clear()
    for report in _reports():
        for piece in password.split("@"):  # no piece of it, the one after an "@" neither
            assert piece not in report


def test_urls_side_by_side_each_keep_their_host(settings):
    from ibkr_sync.reporting import hide_url_passwords

    text = "redis://:a@h1:6379;redis://:b@h2:6379/0 amqp://u:c@h3//"

    assert hide_url_passwords(text, "*") == (
        "redis://:*@h1:6379;redis://:*@h2:6379/0 amqp://u:*@h3//"
    )
