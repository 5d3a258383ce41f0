"""System checks of the app's settings (`manage.py check`, and before every command).

Each setting is checked by reading it as the app will (`conf.app_settings`: the host's
settings, else the environment, else the default, parsed by `environment`'s parsers), so
a typo shows at start-up with the variable's name, not in the middle of the night as a
failed sync.

- ibkr_sync.E001: IBKR_PORT is not a port (1..65535).
- ibkr_sync.E002: a timeout (IBKR_CONNECT_TIMEOUT, IBKR_REQUEST_TIMEOUT,
  IBKR_VALUES_TIMEOUT, IBKR_SYNC_LOCK_TIMEOUT, IBKR_SYNC_STALE_AFTER) is not a positive
  number of seconds.
- ibkr_sync.E003: IBKR_CLIENT_LIBRARY names no known client library.
- ibkr_sync.E004: an IBKR_SYNC_*_MODEL setting names no installed model, or one that
  lacks a field the sync writes (build it on the matching abstract base). The ledger's
  (IBKR_SYNC_TRADE_MODEL, IBKR_SYNC_CASH_TRANSACTION_MODEL,
  IBKR_SYNC_CORPORATE_ACTION_MODEL) are optional: None, or left out with the portfolio
  app not installed, keeps no ledger of that kind.
- ibkr_sync.E005: another IBKR_* setting is malformed (host, client id, health age,
  throttle rate).
- ibkr_sync.E006: IBKR_SYNC_GATEWAY_CLASS cannot be imported.
- ibkr_sync.E007: a configured model has what the sync cannot honour when it creates or
  updates rows as Django's bulk_create would: a field of its own that is required (not
  null, no default, no db_default, no auto_now / auto_now_add; a text field counts as
  filled by '' only where it allows blank), a primary key with no default that the
  database does not generate, a field of the abstract base made NOT NULL where the sync
  stores nothing (NULL), or a composite primary key (the sync addresses rows by one key
  column).
- ibkr_sync.E008: IBKR_SYNC_TASK_QUEUE names no task queue the app knows, or is `celery`
  without Celery installed or without a broker to send the syncs to (CELERY_BROKER_URL,
  in the settings or the environment).
- ibkr_sync.W001: the configured client library is not installed.
"""

from __future__ import annotations

import importlib.util
import os

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.models import CompositePrimaryKey
from django.db.models.fields import AutoFieldMixin
from django.utils.module_loading import import_string

from . import conf, environment
from .conf import app_settings
from .models import (
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractCashTransaction,
    AbstractCorporateAction,
    AbstractInstrument,
    AbstractPosition,
    AbstractTrade,
)

_IDS = {
    "IBKR_PORT": "ibkr_sync.E001",
    "IBKR_CONNECT_TIMEOUT": "ibkr_sync.E002",
    "IBKR_REQUEST_TIMEOUT": "ibkr_sync.E002",
    "IBKR_VALUES_TIMEOUT": "ibkr_sync.E002",
    "IBKR_SYNC_LOCK_TIMEOUT": "ibkr_sync.E002",
    "IBKR_SYNC_STALE_AFTER": "ibkr_sync.E002",
    "IBKR_CLIENT_LIBRARY": "ibkr_sync.E003",
    "IBKR_SYNC_TASK_QUEUE": "ibkr_sync.E008",
}
_BASES = {
    "IBKR_SYNC_ACCOUNT_MODEL": AbstractAccount,
    "IBKR_SYNC_INSTRUMENT_MODEL": AbstractInstrument,
    "IBKR_SYNC_POSITION_MODEL": AbstractPosition,
    "IBKR_SYNC_CASH_BALANCE_MODEL": AbstractCashBalance,
    "IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL": AbstractAccountSnapshot,
}
#: The ledger's (optional: checked where the host keeps one).
_LEDGER_BASES = {
    "IBKR_SYNC_TRADE_MODEL": AbstractTrade,
    "IBKR_SYNC_CASH_TRANSACTION_MODEL": AbstractCashTransaction,
    "IBKR_SYNC_CORPORATE_ACTION_MODEL": AbstractCorporateAction,
}


@register()
def check_settings(app_configs=None, **kwargs) -> list:
    errors = []
    values = {}
    for name in environment.SETTINGS:
        try:
            values[name] = getattr(app_settings, name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), hint=_hint(name), id=_IDS.get(name, "ibkr_sync.E005")))
    if "IBKR_SYNC_GATEWAY_CLASS" in values:
        errors += _check_gateway_class(values["IBKR_SYNC_GATEWAY_CLASS"])
    if "IBKR_CLIENT_LIBRARY" in values:
        errors += _check_client_library(values["IBKR_CLIENT_LIBRARY"])
    if values.get("IBKR_SYNC_TASK_QUEUE"):
        errors += _check_task_queue(values["IBKR_SYNC_TASK_QUEUE"])
    return errors


def _hint(name: str) -> str:
    return f"Set {name} in the settings or the environment, or leave it out for the default."


def _check_gateway_class(path: str) -> list:
    try:
        import_string(path)
    except ImportError as exc:
        return [
            Error(
                f"IBKR_SYNC_GATEWAY_CLASS {path!r} cannot be imported ({exc}).",
                hint="Name a class by its import path, or leave the setting out.",
                id="ibkr_sync.E006",
            )
        ]
    return []


def _check_task_queue(queue: str) -> list:
    """IBKR_SYNC_TASK_QUEUE=celery: Celery installed, and a broker named (Celery's own
    default, a RabbitMQ on localhost, is not one anybody configured)."""
    errors = []
    if importlib.util.find_spec("celery") is None:
        errors.append(
            Error(
                f"IBKR_SYNC_TASK_QUEUE is {queue!r}, but Celery is not installed: no sync "
                "can be queued.",
                hint="pip install 'django-ibkr-sync[celery]' (Celery with Redis), or leave "
                "IBKR_SYNC_TASK_QUEUE empty to run every sync in the process that starts it.",
                id="ibkr_sync.E008",
            )
        )
    broker = str(getattr(settings, "CELERY_BROKER_URL", None) or "").strip()
    if not broker and not os.environ.get("CELERY_BROKER_URL", "").strip():
        errors.append(
            Error(
                f"IBKR_SYNC_TASK_QUEUE is {queue!r}, but no broker is configured: queued "
                "syncs would go nowhere.",
                hint="Set CELERY_BROKER_URL (e.g. redis://127.0.0.1:6379/0) in the settings "
                "or the environment, configure the project's Celery app from the settings "
                "(namespace CELERY), and run a worker: celery -A <project> worker.",
                id="ibkr_sync.E008",
            )
        )
    return errors


def _check_client_library(library: str) -> list:
    if importlib.util.find_spec(library) is None:
        return [
            Warning(
                f"IBKR_CLIENT_LIBRARY is {library!r}, which is not installed: syncs will fail.",
                hint=f"pip install {library.replace('_', '-')}"
                + (" (or django-ibkr-sync[ib-async])" if library == "ib_async" else ""),
                id="ibkr_sync.W001",
            )
        ]
    return []


@register()
def check_models(app_configs=None, **kwargs) -> list:
    """Each configured model exists, carries every field its abstract base has (E004), and
    has nothing the sync cannot honour when it writes rows (E007)."""
    errors = []
    for name, base in _BASES.items():
        try:
            model = conf.lookup_model(name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id="ibkr_sync.E004"))
            continue
        errors += check_model(model, base, setting=name)
    for name, base in _LEDGER_BASES.items():
        try:
            model = conf.lookup_ledger_model(name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id="ibkr_sync.E004"))
            continue
        if model is not None:
            errors += check_model(model, base, setting=name)
    return errors


def check_model(model: type[models.Model], base: type[models.Model], setting: str) -> list:
    """The errors of one model the sync writes (named by `setting`), built on `base`."""
    errors = _check_honourable(model, base)
    have = {f.name: f for f in model._meta.get_fields()}
    for field in base._meta.get_fields():
        mine = have.get(field.name)
        if mine is None or mine.get_internal_type() != field.get_internal_type():
            errors.append(
                Error(
                    f"{setting} names {model._meta.label}, which lacks the field "
                    f"{field.name!r} ({field.get_internal_type()}) that the sync writes.",
                    hint=f"Build {model.__name__} on ibkr_sync.models.{base.__name__}.",
                    obj=model,
                    id="ibkr_sync.E004",
                )
            )
    return errors


def _check_honourable(model: type[models.Model], base: type[models.Model]) -> list:
    """What the sync cannot honour in a model, as ibkr_sync.E007 errors.

    The sync fills every field of its base it must, and every other field as Django's
    bulk_create would (defaults, callable ones per row, auto_now / auto_now_add,
    db_default, generated fields left to the database). What that cannot fill is refused
    here, at start-up, rather than found by the first sync as a NOT NULL error."""
    errors = []
    label = model._meta.label
    pk = model._meta.pk
    if pk is None or isinstance(pk, CompositePrimaryKey):
        return [
            Error(
                f"{label} has a composite primary key; the sync addresses its rows by one "
                "key column.",
                hint="Give the model a single-column primary key (the default id, a UUID "
                "with a default, ...) and a unique constraint for the composite one.",
                obj=model,
                id="ibkr_sync.E007",
            )
        ]
    ours = {f.name: f for f in base._meta.get_fields()}
    for field in model._meta.concrete_fields:
        theirs = ours.get(field.name)
        if theirs is not None:
            if theirs.null and not field.null:
                errors.append(
                    Error(
                        f"{label}.{field.name} is NOT NULL, but the sync stores nothing "
                        "(NULL) in it when IBKR reports no value.",
                        hint=f"Keep null=True, as ibkr_sync.models.{base.__name__} has it.",
                        obj=model,
                        id="ibkr_sync.E007",
                    )
                )
            continue
        if not _fillable(field):
            what = "primary key" if field.primary_key else "field"
            errors.append(
                Error(
                    f"{label}.{field.name} is a required {what} (not null, no default), so "
                    "the sync cannot create rows of the model.",
                    hint="Give the field a default (a callable one, such as uuid.uuid4, is "
                    "called for each row), a db_default, or null=True.",
                    obj=model,
                    id="ibkr_sync.E007",
                )
            )
    return errors


def _fillable(field: models.Field) -> bool:
    """Whether a field of a host's own, which the sync never sets, gets a value anyway, as
    Django's bulk_create gives it one."""
    return (
        field.generated
        or isinstance(field, AutoFieldMixin)
        or field.null
        or field.has_default()
        or field.has_db_default()
        or getattr(field, "auto_now", False)
        or getattr(field, "auto_now_add", False)
        # Model() leaves '' in a text field, which is a value only where blank is allowed.
        or (field.empty_strings_allowed and field.blank and not field.primary_key)
    )
