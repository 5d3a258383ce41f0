"""The app's settings with their defaults, read when used (so `override_settings` works).

The project's settings module parses and validates the environment; this module is what
the app itself reads, so `ibkr_sync` also works in a project that sets plain values.
"""

from dataclasses import dataclass

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models

DEFAULTS = {
    "IBKR_HOST": "127.0.0.1",
    "IBKR_PORT": 7497,
    "IBKR_CLIENT_ID": 1,
    "IBKR_CONNECT_TIMEOUT": 10.0,
    "IBKR_REQUEST_TIMEOUT": 60.0,
    "IBKR_CLIENT_LIBRARY": "ib_insync",
    # The gateway adapter the sync reads from: a class taking (progress=...) and offering
    # fetch_positions(account_id) -> GatewaySnapshot (a host's fake, another transport).
    "IBKR_SYNC_GATEWAY_CLASS": "ibkr_sync.gateway.IbkrGateway",
    # A running sync renews its lock every third of this; silent this long, it is released.
    "IBKR_SYNC_LOCK_TIMEOUT": 30.0,
    # The longest a sync may hold the lock: after this its heartbeat stops.
    "IBKR_SYNC_STALE_AFTER": 900.0,
    # /healthz reports the data stale this long after the last successful sync; 0: never.
    "IBKR_SYNC_MAX_AGE": 86400,
    # POST /portfolio/sync/ibkr per user, as DRF writes rates; None (or "none"): no limit.
    "IBKR_SYNC_THROTTLE_RATE": "6/minute",
}


def get(name: str):
    return getattr(settings, name, DEFAULTS[name])


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    client_id: int
    connect_timeout: float
    request_timeout: float
    library: str

    @classmethod
    def from_settings(cls) -> "GatewayConfig":
        return cls(
            host=get("IBKR_HOST"),
            port=int(get("IBKR_PORT")),
            client_id=int(get("IBKR_CLIENT_ID")),
            connect_timeout=float(get("IBKR_CONNECT_TIMEOUT")),
            request_timeout=float(get("IBKR_REQUEST_TIMEOUT")),
            library=get("IBKR_CLIENT_LIBRARY"),
        )


#: The settings naming the models the sync writes, and their defaults.
MODEL_SETTINGS = {
    "IBKR_SYNC_ACCOUNT_MODEL": "portfolio.Account",
    "IBKR_SYNC_INSTRUMENT_MODEL": "portfolio.Instrument",
    "IBKR_SYNC_POSITION_MODEL": "portfolio.Position",
}


def model_setting(name: str) -> str:
    """The "app_label.ModelName" a model setting names."""
    return getattr(settings, name, MODEL_SETTINGS[name])


_models: dict[str, type[models.Model]] = {}


def _model(name: str) -> type[models.Model]:
    # Looked up once per setting (the mapping asks for every record); `reload` forgets.
    model = _models.get(name)
    if model is None:
        model = _models[name] = _lookup_model(name)
    return model


def _lookup_model(name: str) -> type[models.Model]:
    value = model_setting(name)
    try:
        return apps.get_model(value, require_ready=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be of the form 'app_label.ModelName', got {value!r}."
        ) from None
    except LookupError:
        raise ImproperlyConfigured(
            f"{name} refers to model {value!r}, which is not installed: add its app to "
            "INSTALLED_APPS, or leave the setting out to use the portfolio app's model."
        ) from None


def account_model() -> type[models.Model]:
    """The account model the sync writes (IBKR_SYNC_ACCOUNT_MODEL)."""
    return _model("IBKR_SYNC_ACCOUNT_MODEL")


def instrument_model() -> type[models.Model]:
    """The instrument model the sync writes (IBKR_SYNC_INSTRUMENT_MODEL)."""
    return _model("IBKR_SYNC_INSTRUMENT_MODEL")


def position_model() -> type[models.Model]:
    """The position model the sync writes (IBKR_SYNC_POSITION_MODEL)."""
    return _model("IBKR_SYNC_POSITION_MODEL")


def reload(*, setting: str, **kwargs) -> None:
    """Forget what was read of a setting that changed (`override_settings`, tests)."""
    if setting in MODEL_SETTINGS:
        _models.pop(setting, None)


setting_changed.connect(reload)
