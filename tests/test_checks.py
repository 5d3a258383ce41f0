"""The app's settings: read from the host's settings, else the environment, else the
default; and checked at start-up by system checks that name the variable."""

from __future__ import annotations

import uuid

import pytest
from django.core.checks import run_checks
from django.db import models
from django.test.utils import isolate_apps

from ibkr_sync import conf
from ibkr_sync.checks import check_model, check_models, check_settings
from ibkr_sync.models import (
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractInstrument,
    AbstractPosition,
)


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
    assert "django-ibkr-sync[ib-async]" in warning.hint


def test_a_changed_model_setting_is_looked_up_anew():
    from django.test import override_settings

    from portfolio.models import Position

    assert conf.position_model() is Position
    with override_settings(IBKR_SYNC_POSITION_MODEL="portfolio.Account"):
        assert conf.position_model()._meta.label == "portfolio.Account"
    assert conf.position_model() is Position


def host_model(base, **fields):
    """A host's model on `base` with `fields` of its own, in an app registry of its own."""
    with isolate_apps("tests"):
        meta = type("Meta", (), {"app_label": "tests"})
        return type("HostModel", (base,), {"__module__": __name__, "Meta": meta, **fields})


def token() -> str:
    return "t"


# Everything Django's bulk_create fills, and so the sync (tests/host_app syncs into them).
HONOURED = {
    "an auto-incremented key": {"id": models.BigAutoField(primary_key=True)},
    "a UUID key with a default": {"id": models.UUIDField(primary_key=True, default=uuid.uuid4)},
    "a text key with a callable default": {
        "id": models.CharField(primary_key=True, max_length=20, default=token)
    },
    "a key the database generates": {"id": models.IntegerField(primary_key=True, db_default=1)},
    "auto_now_add": {"seen": models.DateTimeField(auto_now_add=True)},
    "auto_now": {"touched": models.DateTimeField(auto_now=True)},
    "a date's auto_now": {"day": models.DateField(auto_now=True)},
    "a default": {"source": models.CharField(max_length=8, default="ibkr")},
    "a callable default": {"ref": models.UUIDField(default=uuid.uuid4)},
    "a database default": {"priority": models.IntegerField(db_default=7)},
    "null": {"note": models.TextField(null=True)},
    "a blank text": {"label": models.CharField(max_length=8, blank=True)},
    "a generated field": {
        "doubled": models.GeneratedField(
            expression=models.F("quantity") * 2,
            output_field=models.DecimalField(max_digits=31, decimal_places=10),
            db_persist=True,
        )
    },
    "a nullable foreign key": {
        "owner": models.ForeignKey("auth.User", null=True, on_delete=models.CASCADE)
    },
}


@pytest.mark.parametrize("fields", HONOURED.values(), ids=HONOURED)
@pytest.mark.parametrize("base", [AbstractPosition, AbstractInstrument, AbstractCashBalance])
def test_a_field_the_sync_fills_as_django_would_passes(base, fields):
    assert check_model(host_model(base, **fields), base, setting="IBKR_SYNC_X_MODEL") == []


REFUSED = {
    "a UUID key without a default": (
        {"id": models.UUIDField(primary_key=True)},
        "id is a required primary key",
    ),
    "a text key without a default": (
        {"id": models.CharField(primary_key=True, max_length=20, blank=True)},
        "id is a required primary key",
    ),
    "a required number": ({"rank": models.IntegerField()}, "rank is a required field"),
    "a required text": ({"code": models.CharField(max_length=8)}, "code is a required field"),
    "a required date": ({"day": models.DateField()}, "day is a required field"),
    "a required foreign key": (
        {"owner": models.ForeignKey("auth.User", on_delete=models.CASCADE)},
        "owner is a required field",
    ),
    "a base field made NOT NULL": (
        {"exchange_rate": models.DecimalField(max_digits=30, decimal_places=10)},
        "exchange_rate is NOT NULL, but the sync stores nothing (NULL) in it",
    ),
    "a composite key": (
        {"pk": models.CompositePrimaryKey("account", "currency")},
        "has a composite primary key",
    ),
}


@pytest.mark.parametrize(("fields", "message"), REFUSED.values(), ids=REFUSED)
def test_what_the_sync_cannot_honour_is_refused_with_its_own_id(fields, message):
    model = host_model(AbstractCashBalance, **fields)
    errors = check_model(model, AbstractCashBalance, setting="IBKR_SYNC_CASH_BALANCE_MODEL")
    assert [e.id for e in errors] == ["ibkr_sync.E007"], [e.msg for e in errors]
    (error,) = errors
    assert message in error.msg
    assert error.obj is model
    assert error.hint


def test_every_abstract_base_field_the_sync_may_leave_empty_must_stay_nullable():
    # Whatever a host overrides: each nullable field of a base, made NOT NULL, is refused.
    for base in (AbstractAccount, AbstractInstrument, AbstractPosition, AbstractCashBalance,
                 AbstractAccountSnapshot):  # fmt: skip
        for field in base._meta.concrete_fields:
            if not field.null:
                continue
            name, _path, args, kwargs = field.deconstruct()
            strict = type(field)(*args, **{**kwargs, "null": False})
            errors = check_model(host_model(base, **{name: strict}), base, setting="X")
            assert [e.id for e in errors] == ["ibkr_sync.E007"], (base, name)


# --- the task queue (IBKR_SYNC_TASK_QUEUE) ----------------------------------------------


def test_a_task_queue_the_app_does_not_know_is_an_error_naming_the_choices(settings):
    settings.IBKR_SYNC_TASK_QUEUE = "rq"

    (error,) = check_settings()
    assert error.id == "ibkr_sync.E008"
    assert "IBKR_SYNC_TASK_QUEUE must be one of , celery; got 'rq'" in error.msg


def test_the_celery_queue_with_celery_and_a_broker_passes(settings):
    settings.IBKR_SYNC_TASK_QUEUE = "celery"
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/5"

    assert check_settings() == []


def test_the_celery_queue_without_celery_installed_is_an_error_saying_what_to_install(
    settings, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "celery" else real(name)
    )
    settings.IBKR_SYNC_TASK_QUEUE = "celery"

    (error,) = check_settings()
    assert error.id == "ibkr_sync.E008"
    assert "Celery is not installed" in error.msg
    assert "pip install 'django-ibkr-sync[celery]'" in error.hint


@pytest.mark.parametrize("broker", [None, "", "  "])
def test_the_celery_queue_without_a_broker_is_an_error_naming_the_setting(
    settings, monkeypatch, broker
):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    settings.IBKR_SYNC_TASK_QUEUE = "celery"
    if broker is None:
        del settings.CELERY_BROKER_URL
    else:
        settings.CELERY_BROKER_URL = broker

    (error,) = check_settings()
    assert error.id == "ibkr_sync.E008"
    assert "no broker is configured" in error.msg
    assert "Set CELERY_BROKER_URL" in error.hint

    # The environment names one: enough (Celery reads it there too).
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/5")
    assert check_settings() == []
