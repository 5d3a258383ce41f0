"""The app's settings, in one object: `app_settings.IBKR_PORT` is the port as an int,
`app_settings.IBKR_CONNECT_TIMEOUT` seconds as a float, `app_settings.IBKR_READ_VALUES` a
bool (as DRF's `api_settings`). Each is read when used: the host's settings win (so
`override_settings` works), what they leave out is read from the environment, else the
default (`environment.SETTINGS`, the one place defaults are written), and parsed by
`environment`'s parsers; `checks.py` validates them at start-up through the same object.
Also the models the sync writes (IBKR_SYNC_*_MODEL; the ledger's optional), looked up
once and forgotten when a setting changes; and `GatewayConfig`, the settings' gateway,
which a `Connection`'s fields override per sync.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models

from . import environment

#: The defaults, written once in `environment.SETTINGS`.
DEFAULTS = {name: setting.default for name, setting in environment.SETTINGS.items()}

#: The settings naming the models the sync writes, and their defaults. Read from the
#: host's settings only (never the environment): they shape the migrations, as
#: AUTH_USER_MODEL does.
MODEL_SETTINGS = {
    "IBKR_SYNC_ACCOUNT_MODEL": "portfolio.Account",
    "IBKR_SYNC_INSTRUMENT_MODEL": "portfolio.Instrument",
    "IBKR_SYNC_POSITION_MODEL": "portfolio.Position",
    "IBKR_SYNC_CASH_BALANCE_MODEL": "portfolio.CashBalance",
    "IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL": "portfolio.AccountSnapshot",
    "IBKR_SYNC_TRADE_MODEL": "portfolio.Trade",
    "IBKR_SYNC_CASH_TRANSACTION_MODEL": "portfolio.CashTransaction",
    "IBKR_SYNC_CORPORATE_ACTION_MODEL": "portfolio.CorporateAction",
}
#: The ledger's model settings, by the kind of row each stores. Optional: None keeps no
#: ledger of that kind, and so does leaving one out where its default model is not
#: installed (a host with portfolio models of its own, from before the ledger).
LEDGER_SETTINGS = {
    "trades": "IBKR_SYNC_TRADE_MODEL",
    "cash_transactions": "IBKR_SYNC_CASH_TRANSACTION_MODEL",
    "corporate_actions": "IBKR_SYNC_CORPORATE_ACTION_MODEL",
}

_UNSET = object()


class AppSettings:
    """The app's settings as typed attributes.

    `app_settings.NAME` is setting NAME from the host's settings, else the environment
    (`IBKR_PORT=4002 manage.py sync_ibkr` in a project whose settings leave it out), else
    its default, parsed as `environment.SETTINGS[NAME]` says: a malformed value raises
    ImproperlyConfigured naming the setting. None set in the host's settings is the
    default (the throttle rate's None is "no limit"). The model settings are the host's
    "app_label.ModelName", else the portfolio app's.

    A value is parsed once: what was parsed is kept with the raw value it came from and
    where (settings, environment, default), and used while they are the same, so a changed
    environment, or a setting changed without `setting_changed`, is read anew;
    `setting_changed` (override_settings) forgets it as well.
    """

    IBKR_HOST: str
    IBKR_PORT: int
    IBKR_CLIENT_ID: int
    IBKR_CONNECT_TIMEOUT: float
    IBKR_REQUEST_TIMEOUT: float
    IBKR_READ_VALUES: bool
    IBKR_VALUES_TIMEOUT: float
    IBKR_CLIENT_LIBRARY: str
    IBKR_SYNC_LOCK_TIMEOUT: float
    IBKR_SYNC_STALE_AFTER: float
    IBKR_SYNC_END_FROZEN_HOLDERS: bool
    IBKR_SYNC_MAX_AGE: int
    IBKR_SYNC_THROTTLE_RATE: str | None
    IBKR_SYNC_GATEWAY_CLASS: str
    IBKR_SYNC_FLEX_SOURCE_CLASS: str
    IBKR_FLEX_BASE_URL: str
    IBKR_FLEX_CONNECT_TIMEOUT: float
    IBKR_FLEX_READ_TIMEOUT: float
    IBKR_FLEX_POLL_BUDGET: float
    IBKR_SYNC_SECRET_KEY: str
    IBKR_SYNC_SECRET_KEY_FALLBACKS: tuple
    IBKR_SYNC_TASK_QUEUE: str
    IBKR_SYNC_ACCOUNT_MODEL: str
    IBKR_SYNC_INSTRUMENT_MODEL: str
    IBKR_SYNC_POSITION_MODEL: str
    IBKR_SYNC_CASH_BALANCE_MODEL: str
    IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL: str
    IBKR_SYNC_TRADE_MODEL: str | None
    IBKR_SYNC_CASH_TRANSACTION_MODEL: str | None
    IBKR_SYNC_CORPORATE_ACTION_MODEL: str | None

    def __init__(self) -> None:
        # name -> (where, raw, parsed)
        self._parsed: dict[str, tuple[str, Any, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        if name in environment.SETTINGS:
            return self._read(name)
        if name in MODEL_SETTINGS:
            return getattr(settings, name, MODEL_SETTINGS[name])
        raise AttributeError(f"{name!r} is not a setting of ibkr_sync.")

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *environment.SETTINGS, *MODEL_SETTINGS})

    def raw(self, name: str) -> tuple[str, Any]:
        """Where setting `name` is taken from ("settings", "environment" or "default") and
        its value there, unparsed (None for the default)."""
        value = getattr(settings, name, _UNSET)
        if value is not _UNSET:
            return "settings", value
        text = os.environ.get(name)
        return ("default", None) if text is None else ("environment", text)

    def _read(self, name: str) -> Any:
        where, raw = self.raw(name)
        kept = self._parsed.get(name)
        if kept is not None and kept[0] == where and _same(kept[1], raw):
            return kept[2]
        if where == "settings":
            value = environment.parse_setting(name, raw)
        else:
            value = environment.parse(name, raw)
        self._parsed[name] = (where, raw, value)
        return value

    def reload(self, setting: str | None = None) -> None:
        """Forget what was parsed of `setting` (of every setting, with None)."""
        if setting is None:
            self._parsed.clear()
        else:
            self._parsed.pop(setting, None)


def _same(kept: Any, raw: Any) -> bool:
    # 1 == 1.0 == True, but "1.0" is no port: a value of another type is parsed anew.
    return kept is raw or (type(kept) is type(raw) and kept == raw)


#: The app's settings (`app_settings.IBKR_PORT`).
app_settings = AppSettings()


def get(name: str) -> Any:
    """Setting `name`, typed: `getattr(app_settings, name)`."""
    return getattr(app_settings, name)


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
    #: The connection's name, for messages ("" for the settings' gateway).
    name: str = ""
    #: The timeouts the connection sets itself, each with its field's label (the admin's):
    #: (("connect_timeout", "connect timeout"), ...); the others are the settings'.
    own_timeouts: tuple[tuple[str, str], ...] = ()

    def timeout_origin(self, timeout: str) -> str:
        """What set `timeout` ("connect_timeout", "request_timeout", "values_timeout"),
        for a message that says how long was waited: the connection's field ("connection
        home's connect timeout"), else the setting (IBKR_CONNECT_TIMEOUT)."""
        label = dict(self.own_timeouts).get(timeout)
        if label is not None:
            return f"connection {self.name}'s {label}"
        return "IBKR_" + timeout.upper()

    def timeout_said(self, timeout: str) -> str:
        """`timeout`'s seconds and what set them: "5 s, connection home's connect
        timeout"."""
        return f"{getattr(self, timeout):g} s, {self.timeout_origin(timeout)}"

    @classmethod
    def from_settings(cls, connection=None) -> "GatewayConfig":
        """The settings' gateway; with a `Connection`, its address, client id and the
        timeouts it sets, the settings' for the rest."""
        config = cls(
            host=app_settings.IBKR_HOST,
            port=app_settings.IBKR_PORT,
            client_id=app_settings.IBKR_CLIENT_ID,
            connect_timeout=app_settings.IBKR_CONNECT_TIMEOUT,
            request_timeout=app_settings.IBKR_REQUEST_TIMEOUT,
            library=app_settings.IBKR_CLIENT_LIBRARY,
            read_values=app_settings.IBKR_READ_VALUES,
            values_timeout=app_settings.IBKR_VALUES_TIMEOUT,
        )
        if connection is None:
            return config
        overrides = {
            "name": getattr(connection, "name", ""),
            "host": connection.host,
            "port": connection.port,
            "client_id": connection.client_id,
        }
        own = []
        for name in ("connect_timeout", "request_timeout", "values_timeout"):
            if getattr(connection, name) is not None:
                overrides[name] = float(getattr(connection, name))
                own.append((name, _label(connection, name)))
        return dataclasses.replace(config, **overrides, own_timeouts=tuple(own))


def _label(row: Any, name: str) -> str:
    """The label of a model row's field `name`, as the admin shows it."""
    try:
        return str(row._meta.get_field(name).verbose_name)
    except (AttributeError, FieldDoesNotExist):  # not a model's row (a host's stand-in)
        return name.replace("_", " ")


@dataclass(frozen=True)
class FlexConfig:
    """What a Flex connection's sync reads: the service's address, the query, the token
    (decrypted for the read; in no repr) and the timeouts, from the settings."""

    query_id: str
    token: str = dataclasses.field(repr=False)
    base_url: str = environment.SETTINGS["IBKR_FLEX_BASE_URL"].default
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    poll_budget: float = 600.0
    #: The connection's name, for messages ("" for none).
    name: str = ""

    @classmethod
    def from_settings(cls, connection) -> "FlexConfig":
        """A Flex `Connection`'s query and token over the settings' address and timeouts.
        Raises `SecretUnreadable` when no configured key decrypts the token."""
        return cls(
            query_id=connection.flex_query_id,
            token=connection.reveal_flex_token(),
            base_url=app_settings.IBKR_FLEX_BASE_URL,
            connect_timeout=app_settings.IBKR_FLEX_CONNECT_TIMEOUT,
            read_timeout=app_settings.IBKR_FLEX_READ_TIMEOUT,
            poll_budget=app_settings.IBKR_FLEX_POLL_BUDGET,
            name=connection.name,
        )


def model_setting(name: str) -> str:
    """The "app_label.ModelName" a model setting names."""
    return getattr(app_settings, name)


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
        pass
    if getattr(settings, name, _UNSET) is _UNSET:
        raise ImproperlyConfigured(
            f"{name} is not set, and its default, {value!r}, is not installed: set it to "
            "your own model ('app_label.ModelName', with the other IBKR_SYNC_*_MODEL "
            "settings), or add 'portfolio' to INSTALLED_APPS to use ours."
        )
    hint = "correct the name, or add its app to INSTALLED_APPS"
    try:
        apps.get_model(MODEL_SETTINGS[name], require_ready=False)
        hint += ", or leave the setting out to use the portfolio app's model"
    except LookupError:
        pass
    raise ImproperlyConfigured(f"{name} refers to model {value!r}, which is not installed: {hint}.")


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


def ledger_model(name: str) -> type[models.Model] | None:
    """The ledger model setting `name` names, or None when the host keeps no ledger of
    its kind: the setting is None, or left out while its default model (the portfolio
    app's) is not installed. A model named but not installed is ImproperlyConfigured."""
    if name in _models:
        return _models[name]
    model = lookup_ledger_model(name)
    _models[name] = model
    return model


def lookup_ledger_model(name: str) -> type[models.Model] | None:
    """`ledger_model`, not cached (what the system checks examine)."""
    value = getattr(settings, name, _UNSET)
    if value is None:
        return None
    if value is _UNSET:
        try:
            return apps.get_model(MODEL_SETTINGS[name], require_ready=False)
        except LookupError:
            return None
    return lookup_model(name)


def trade_model() -> type[models.Model] | None:
    """The trade model (IBKR_SYNC_TRADE_MODEL), or None: no ledger of trades."""
    return ledger_model("IBKR_SYNC_TRADE_MODEL")


def cash_transaction_model() -> type[models.Model] | None:
    """The cash transaction model (IBKR_SYNC_CASH_TRANSACTION_MODEL), or None."""
    return ledger_model("IBKR_SYNC_CASH_TRANSACTION_MODEL")


def corporate_action_model() -> type[models.Model] | None:
    """The corporate action model (IBKR_SYNC_CORPORATE_ACTION_MODEL), or None."""
    return ledger_model("IBKR_SYNC_CORPORATE_ACTION_MODEL")


def ledger_models() -> dict[str, type[models.Model]]:
    """The ledger's models the host keeps, by kind (`LEDGER_SETTINGS`'s keys)."""
    found = {kind: ledger_model(name) for kind, name in LEDGER_SETTINGS.items()}
    return {kind: model for kind, model in found.items() if model is not None}


def reload(*, setting: str, **kwargs) -> None:
    """Forget what was read of a setting that changed (`override_settings`, tests)."""
    app_settings.reload(setting)
    if setting in MODEL_SETTINGS:
        _models.pop(setting, None)


setting_changed.connect(reload)
