"""The app's settings: read from the host's settings, else the environment, else the
default; and checked at start-up by system checks that name the variable."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks

from ibkr_sync import conf
from ibkr_sync.checks import check_models, check_settings


def ids(errors) -> list[str]:
    return sorted(e.id for e in errors)


def test_the_defaults_pass_every_check():
    assert check_settings() == []
    assert check_models() == []
    assert [e for e in run_checks() if e.id.startswith("ibkr_sync")] == []


def test_a_value_in_the_settings_wins_over_the_environment(settings, monkeypatch):
    monkeypatch.setenv("IBKR_PORT", "4002")
    settings.IBKR_PORT = 4001
    assert conf.get("IBKR_PORT") == 4001


def test_what_the_settings_leave_out_is_read_from_the_environment(settings, monkeypatch):
    del settings.IBKR_PORT, settings.IBKR_CLIENT_ID
    monkeypatch.setenv("IBKR_PORT", "4002")
    monkeypatch.delenv("IBKR_CLIENT_ID", raising=False)
    assert conf.get("IBKR_PORT") == 4002
    assert conf.get("IBKR_CLIENT_ID") == 1, "the default: 1"
    assert conf.GatewayConfig.from_settings().port == 4002


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("IBKR_PORT", 0, "ibkr_sync.E001"),
        ("IBKR_PORT", "abc", "ibkr_sync.E001"),
        ("IBKR_PORT", 70000, "ibkr_sync.E001"),
        ("IBKR_CONNECT_TIMEOUT", 0, "ibkr_sync.E002"),
        ("IBKR_REQUEST_TIMEOUT", -5, "ibkr_sync.E002"),
        ("IBKR_SYNC_LOCK_TIMEOUT", "soon", "ibkr_sync.E002"),
        ("IBKR_CLIENT_LIBRARY", "ibapi", "ibkr_sync.E003"),
        ("IBKR_HOST", " ", "ibkr_sync.E005"),
        ("IBKR_CLIENT_ID", -1, "ibkr_sync.E005"),
        ("IBKR_SYNC_THROTTLE_RATE", "lots", "ibkr_sync.E005"),
        ("IBKR_SYNC_GATEWAY_CLASS", "nowhere.Gateway", "ibkr_sync.E006"),
    ],
)
def test_a_malformed_setting_is_an_error_naming_it(settings, name, value, error):
    setattr(settings, name, value)
    errors = check_settings()
    assert ids(errors) == [error]
    assert name in errors[0].msg


def test_a_malformed_environment_value_is_an_error_too(settings, monkeypatch):
    del settings.IBKR_PORT
    monkeypatch.setenv("IBKR_PORT", "four thousand")
    (error,) = check_settings()
    assert error.id == "ibkr_sync.E001"
    assert error.msg == "IBKR_PORT must be an integer, got 'four thousand'."


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("auth.User", "lacks the field 'quantity'"),
        ("portfolio.Nope", "not installed"),
        ("no-dot", "must be of the form 'app_label.ModelName'"),
    ],
)
def test_a_model_setting_must_name_a_model_built_on_the_abstract_base(settings, value, message):
    settings.IBKR_SYNC_POSITION_MODEL = value
    errors = check_models()
    # auth.User also has required fields of its own (E007); the missing ones are E004.
    assert {e.id for e in errors} - {"ibkr_sync.E007"} == {"ibkr_sync.E004"}
    assert any(message in e.msg and e.id == "ibkr_sync.E004" for e in errors), [
        e.msg for e in errors
    ]


def test_a_required_field_of_the_hosts_own_is_an_error(settings):
    # auth.Permission has required fields the sync cannot fill (and lacks every one of
    # the account's): both are named.
    settings.IBKR_SYNC_ACCOUNT_MODEL = "auth.Permission"
    errors = {e.msg: e.id for e in check_models()}
    required = [m for m, i in errors.items() if "is a required field" in m]
    assert sorted(required) == [
        "auth.Permission.codename is a required field (not null, no default), so the sync "
        "cannot create rows of the model.",
        "auth.Permission.content_type is a required field (not null, no default), so the "
        "sync cannot create rows of the model.",
    ]
    assert {errors[m] for m in required} == {"ibkr_sync.E007"}
    assert any("lacks the field 'external_id'" in m for m in errors)


def test_the_client_library_must_be_installed(settings, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ib_async" else real(name)
    )
    settings.IBKR_CLIENT_LIBRARY = "ib_async"
    (warning,) = check_settings()
    assert warning.id == "ibkr_sync.W001"
    assert "django-ibkr-sync[ib_async]" in warning.hint


def test_a_changed_model_setting_is_looked_up_anew():
    from django.test import override_settings

    from portfolio.models import Position

    assert conf.position_model() is Position
    with override_settings(IBKR_SYNC_POSITION_MODEL="portfolio.Account"):
        assert conf.position_model()._meta.label == "portfolio.Account"
    assert conf.position_model() is Position
