"""The app's settings as it reads them, when used (so `override_settings` works): the
host's settings, else the environment, else the default (`environment.SETTINGS`, the one
place defaults are written); `checks.py` validates them at start-up. Also the models the
sync writes (IBKR_SYNC_*_MODEL), looked up once and forgotten when a setting changes.
"""

import dataclasses
from dataclasses import dataclass

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models

from . import environment

#: The defaults, written once in `environment.SETTINGS`.
DEFAULTS = {name: setting.default for name, setting in environment.SETTINGS.items()}


def get(name: str):
    """A setting of the app: the host's settings win; what they leave out is read from the
    environment (IBKR_PORT=4002 manage.py sync_ibkr), else its default. Read when used,
    so `override_settings` and a changed environment take effect."""
    if hasattr(settings, name):
        return getattr(settings, name)
    return environment.from_environment(name)


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    client_id: int
    connect_timeout: float
    request_timeout: float
    library: str
    read_values: bool = True
    values_timeout: float = 30.0

    @classmethod
    def from_settings(cls, connection=None) -> "GatewayConfig":
        """The settings' gateway; with a `Connection`, its address, client id and the
        timeouts it sets, the settings' for the rest."""
        config = cls(
            host=get("IBKR_HOST"),
            port=int(get("IBKR_PORT")),
            client_id=int(get("IBKR_CLIENT_ID")),
            connect_timeout=float(get("IBKR_CONNECT_TIMEOUT")),
            request_timeout=float(get("IBKR_REQUEST_TIMEOUT")),
            library=get("IBKR_CLIENT_LIBRARY"),
            read_values=environment.parse("IBKR_READ_VALUES", get("IBKR_READ_VALUES")),
            values_timeout=float(get("IBKR_VALUES_TIMEOUT")),
        )
        if connection is None:
            return config
        overrides = {
            "host": connection.host,
            "port": connection.port,
            "client_id": connection.client_id,
        }
        for name in ("connect_timeout", "request_timeout", "values_timeout"):
            if getattr(connection, name) is not None:
                overrides[name] = float(getattr(connection, name))
        return dataclasses.replace(config, **overrides)


#: The settings naming the models the sync writes, and their defaults.
MODEL_SETTINGS = {
    "IBKR_SYNC_ACCOUNT_MODEL": "portfolio.Account",
    "IBKR_SYNC_INSTRUMENT_MODEL": "portfolio.Instrument",
    "IBKR_SYNC_POSITION_MODEL": "portfolio.Position",
    "IBKR_SYNC_CASH_BALANCE_MODEL": "portfolio.CashBalance",
    "IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL": "portfolio.AccountSnapshot",
}


def model_setting(name: str) -> str:
    """The "app_label.ModelName" a model setting names."""
    return getattr(settings, name, MODEL_SETTINGS[name])


_models: dict[str, type[models.Model]] = {}


def _model(name: str) -> type[models.Model]:
    # Looked up once per setting (the mapping asks for every record); `reload` forgets.
    model = _models.get(name)
    if model is None:
        model = _models[name] = lookup_model(name)
    return model


def lookup_model(name: str) -> type[models.Model]:
    """The model setting `name` names now (not cached: what the system checks examine)."""
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


def cash_balance_model() -> type[models.Model]:
    """The cash balance model the sync writes (IBKR_SYNC_CASH_BALANCE_MODEL)."""
    return _model("IBKR_SYNC_CASH_BALANCE_MODEL")


def account_snapshot_model() -> type[models.Model]:
    """The account snapshot model the sync writes (IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL)."""
    return _model("IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL")


def reload(*, setting: str, **kwargs) -> None:
    """Forget what was read of a setting that changed (`override_settings`, tests)."""
    if setting in MODEL_SETTINGS:
        _models.pop(setting, None)


setting_changed.connect(reload)
