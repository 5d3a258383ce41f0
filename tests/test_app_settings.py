"""`conf.app_settings`: the app's settings as typed attributes, the host's settings over the
environment over the default, parsed by `environment`'s parsers, and read anew when a
setting or the environment changes."""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from ibkr_sync import conf, environment
from ibkr_sync.conf import AppSettings, GatewayConfig, app_settings

TYPED = {
    "IBKR_HOST": ("gw.example", "gw.example"),
    "IBKR_PORT": ("4002", 4002),
    "IBKR_CLIENT_ID": (" 17 ", 17),
    "IBKR_CONNECT_TIMEOUT": ("2.5", 2.5),
    "IBKR_REQUEST_TIMEOUT": (30, 30.0),
    "IBKR_READ_VALUES": ("off", False),
    "IBKR_VALUES_TIMEOUT": ("5", 5.0),
    "IBKR_CLIENT_LIBRARY": ("ib_async", "ib_async"),
    "IBKR_SYNC_LOCK_TIMEOUT": ("12", 12.0),
    "IBKR_SYNC_STALE_AFTER": (600, 600.0),
    "IBKR_SYNC_END_FROZEN_HOLDERS": ("No", False),
    "IBKR_SYNC_MAX_AGE": ("3600", 3600),
    "IBKR_SYNC_THROTTLE_RATE": ("10/Hour", "10/hour"),
    "IBKR_SYNC_GATEWAY_CLASS": (" tests.conftest.FakeGateway ", "tests.conftest.FakeGateway"),
    "IBKR_SYNC_FLEX_SOURCE_CLASS": (" my.FlexSource ", "my.FlexSource"),
    "IBKR_FLEX_BASE_URL": ("http://127.0.0.1:8080/flex/", "http://127.0.0.1:8080/flex"),
    "IBKR_FLEX_CONNECT_TIMEOUT": ("3", 3.0),
    "IBKR_FLEX_READ_TIMEOUT": (120, 120.0),
    "IBKR_FLEX_POLL_BUDGET": ("300", 300.0),
    "IBKR_SYNC_SECRET_KEY": (" " + "k" * 40 + " ", "k" * 40),
    "IBKR_SYNC_SECRET_KEY_FALLBACKS": ("a" * 32 + ", " + "b" * 32, ("a" * 32, "b" * 32)),
    "IBKR_SYNC_TASK_QUEUE": (" celery ", "celery"),
}


@pytest.fixture
def bare(settings, monkeypatch):
    """Neither the settings nor the environment set any of the app's settings, as in a host
    project that leaves them all out."""
    for name in environment.SETTINGS:
        if hasattr(settings, name):
            delattr(settings, name)
        monkeypatch.delenv(name, raising=False)
    return settings


def test_every_setting_has_a_declared_type_and_no_declaration_is_left_over():
    declared = typing.get_type_hints(AppSettings)
    assert set(declared) == set(environment.SETTINGS) | set(conf.MODEL_SETTINGS)


@pytest.mark.parametrize("name", sorted(environment.SETTINGS))
def test_with_nothing_set_each_setting_is_its_default_of_its_declared_type(bare, name):
    value = getattr(app_settings, name)

    assert value == environment.SETTINGS[name].default
    declared = typing.get_type_hints(AppSettings)[name]
    assert isinstance(value, declared), (name, declared, value)


@pytest.mark.parametrize(("name", "raw", "typed"), [(n, *v) for n, v in TYPED.items()])
def test_a_settings_value_is_typed(settings, name, raw, typed):
    setattr(settings, name, raw)

    value = getattr(app_settings, name)

    assert value == typed
    assert type(value) is type(typed)
    assert conf.get(name) == typed, "conf.get is the same value"


@pytest.mark.parametrize(("name", "raw", "typed"), [(n, *v) for n, v in TYPED.items()])
def test_an_environment_value_is_typed_the_same(bare, monkeypatch, name, raw, typed):
    monkeypatch.setenv(name, str(raw))

    value = getattr(app_settings, name)

    assert (value, type(value)) == (typed, type(typed))


def test_the_settings_win_over_the_environment_which_wins_over_the_default(bare, monkeypatch):
    assert app_settings.IBKR_PORT == 7497
    assert app_settings.raw("IBKR_PORT") == ("default", None)

    monkeypatch.setenv("IBKR_PORT", "4002")
    assert app_settings.IBKR_PORT == 4002
    assert app_settings.raw("IBKR_PORT") == ("environment", "4002")

    bare.IBKR_PORT = 4001
    assert app_settings.IBKR_PORT == 4001
    assert app_settings.raw("IBKR_PORT") == ("settings", 4001)

    del bare.IBKR_PORT
    assert app_settings.IBKR_PORT == 4002


def test_a_changed_environment_is_read_at_the_next_use(bare, monkeypatch):
    monkeypatch.setenv("IBKR_HOST", "gw-one")
    assert GatewayConfig.from_settings().host == "gw-one"

    monkeypatch.setenv("IBKR_HOST", "gw-two")
    assert app_settings.IBKR_HOST == "gw-two"
    assert GatewayConfig.from_settings().host == "gw-two"

    monkeypatch.delenv("IBKR_HOST")
    assert app_settings.IBKR_HOST == "127.0.0.1"


def test_override_settings_takes_effect_and_is_undone():
    before = app_settings.IBKR_CONNECT_TIMEOUT

    with override_settings(IBKR_CONNECT_TIMEOUT="1.5", IBKR_SYNC_THROTTLE_RATE="none"):
        assert app_settings.IBKR_CONNECT_TIMEOUT == 1.5
        assert app_settings.IBKR_SYNC_THROTTLE_RATE is None

    after = app_settings.IBKR_CONNECT_TIMEOUT
    assert after == before
    assert app_settings.IBKR_SYNC_THROTTLE_RATE == "6/minute"


def test_a_value_is_parsed_once_while_it_stays_the_same(bare, monkeypatch):
    calls = []
    real = environment.SETTINGS["IBKR_CLIENT_ID"]

    def counted(name, raw):
        calls.append(raw)
        return real.parse(name, raw)

    monkeypatch.setitem(
        environment.SETTINGS, "IBKR_CLIENT_ID", dataclasses.replace(real, parse=counted)
    )
    app_settings.reload()
    monkeypatch.setenv("IBKR_CLIENT_ID", "7")

    assert [app_settings.IBKR_CLIENT_ID for _ in range(3)] == [7, 7, 7]
    assert calls == ["7"]

    monkeypatch.setenv("IBKR_CLIENT_ID", "8")  # no signal: the new text is seen
    assert [app_settings.IBKR_CLIENT_ID for _ in range(2)] == [8, 8]
    bare.IBKR_CLIENT_ID = 8.0  # equal to 8, but of another type: parsed, and refused
    with pytest.raises(ImproperlyConfigured, match="IBKR_CLIENT_ID must be an integer"):
        app_settings.IBKR_CLIENT_ID  # noqa: B018
    assert calls == ["7", "8", 8.0]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IBKR_PORT", "abc", "IBKR_PORT must be an integer, got 'abc'."),
        ("IBKR_PORT", 70000, "IBKR_PORT must be between 1 and 65535, got 70000."),
        ("IBKR_CONNECT_TIMEOUT", 0, "IBKR_CONNECT_TIMEOUT must be more than 0 and at most"),
        ("IBKR_READ_VALUES", "maybe", "IBKR_READ_VALUES must be true or false, got 'maybe'."),
        ("IBKR_CLIENT_LIBRARY", "ibapi", "IBKR_CLIENT_LIBRARY must be one of ib_insync"),
        ("IBKR_SYNC_THROTTLE_RATE", "lots", "IBKR_SYNC_THROTTLE_RATE must be a rate"),
    ],
)
def test_a_malformed_value_raises_naming_the_setting(bare, monkeypatch, name, value, message):
    setattr(bare, name, value)
    with pytest.raises(ImproperlyConfigured) as in_settings:
        getattr(app_settings, name)
    with pytest.raises(ImproperlyConfigured) as through_get:
        conf.get(name)

    delattr(bare, name)
    monkeypatch.setenv(name, str(value))
    with pytest.raises(ImproperlyConfigured) as in_environment:
        getattr(app_settings, name)

    assert message in str(in_settings.value)
    assert str(through_get.value) == str(in_settings.value)
    assert message in str(in_environment.value)


def test_none_in_the_settings_is_the_default_but_for_the_throttle_rate_no_limit(settings):
    settings.IBKR_PORT = None
    settings.IBKR_SYNC_THROTTLE_RATE = None

    assert app_settings.IBKR_PORT == 7497
    assert app_settings.IBKR_SYNC_THROTTLE_RATE is None


def test_an_unknown_name_is_no_setting():
    with pytest.raises(AttributeError, match=r"^'IBKR_PROT' is not a setting of ibkr_sync\.$"):
        app_settings.IBKR_PROT  # noqa: B018
    assert "IBKR_PORT" in dir(app_settings)


@pytest.mark.parametrize("name", sorted(environment.SETTINGS))
def test_a_parsed_value_parses_to_itself(name):
    """Callers that still wrap a value in float() or parse it again get the same value."""
    for raw in (environment.SETTINGS[name].default, *TYPED[name][:1]):
        value = environment.parse_setting(name, raw)
        assert environment.parse_setting(name, value) == value


def test_the_model_settings_come_from_the_settings_only(settings, monkeypatch):
    monkeypatch.setenv("IBKR_SYNC_POSITION_MODEL", "elsewhere.Position")
    assert app_settings.IBKR_SYNC_POSITION_MODEL == "portfolio.Position"

    settings.IBKR_SYNC_POSITION_MODEL = "portfolio.Account"
    assert app_settings.IBKR_SYNC_POSITION_MODEL == "portfolio.Account"
    assert conf.model_setting("IBKR_SYNC_POSITION_MODEL") == "portfolio.Account"


def test_gateway_config_is_typed_and_a_connection_overrides_its_fields(settings):
    settings.IBKR_HOST = "gw.example"
    settings.IBKR_PORT = "4002"
    settings.IBKR_CONNECT_TIMEOUT = "2.5"
    settings.IBKR_REQUEST_TIMEOUT = 45
    settings.IBKR_VALUES_TIMEOUT = "9"
    settings.IBKR_READ_VALUES = "no"
    settings.IBKR_CLIENT_LIBRARY = "ib_async"
    connection = SimpleNamespace(
        name="paper",
        host="paper.example",
        port=4004,
        client_id=23,
        connect_timeout=None,
        request_timeout=5,
        values_timeout=None,
    )

    from_settings = GatewayConfig.from_settings()
    for_connection = GatewayConfig.from_settings(connection)

    assert from_settings == GatewayConfig(
        host="gw.example",
        port=4002,
        client_id=settings.IBKR_CLIENT_ID,
        connect_timeout=2.5,
        request_timeout=45.0,
        library="ib_async",
        read_values=False,
        values_timeout=9.0,
    )
    assert for_connection == dataclasses.replace(
        from_settings,
        name="paper",
        host="paper.example",
        port=4004,
        client_id=23,
        request_timeout=5.0,
        own_timeouts=(("request_timeout", "request timeout"),),
    )
    assert type(for_connection.request_timeout) is float
    # What set each timeout, for the messages that say how long was waited.
    assert from_settings.timeout_said("request_timeout") == "45 s, IBKR_REQUEST_TIMEOUT"
    assert for_connection.timeout_origin("connect_timeout") == "IBKR_CONNECT_TIMEOUT"
    assert for_connection.timeout_origin("request_timeout") == "connection paper's request timeout"


def test_a_misspelt_model_setting_says_to_correct_it_or_leave_it_out(settings):
    settings.IBKR_SYNC_CASH_BALANCE_MODEL = "portfolio.CashBalanse"

    with pytest.raises(ImproperlyConfigured) as caught:
        conf.lookup_model("IBKR_SYNC_CASH_BALANCE_MODEL")

    assert str(caught.value) == (
        "IBKR_SYNC_CASH_BALANCE_MODEL refers to model 'portfolio.CashBalanse', which is not "
        "installed: correct the name, or add its app to INSTALLED_APPS, or leave the setting "
        "out to use the portfolio app's model."
    )


def test_without_our_portfolio_app_a_model_setting_left_out_is_named_as_missing(
    settings, monkeypatch
):
    """A host with models of its own, without `portfolio`: a setting it left out names
    our model, which is not there. The message says to set it, not to leave it out."""
    monkeypatch.setitem(conf.MODEL_SETTINGS, "IBKR_SYNC_CASH_BALANCE_MODEL", "portfolio.Gone")
    del settings.IBKR_SYNC_CASH_BALANCE_MODEL
    # A setting left out reads as its default: here the missing model above.
    monkeypatch.setattr(
        conf, "model_setting", lambda name: getattr(settings, name, conf.MODEL_SETTINGS[name])
    )

    with pytest.raises(ImproperlyConfigured) as caught:
        conf.lookup_model("IBKR_SYNC_CASH_BALANCE_MODEL")
    assert str(caught.value) == (
        "IBKR_SYNC_CASH_BALANCE_MODEL is not set, and its default, 'portfolio.Gone', is not "
        "installed: set it to your own model ('app_label.ModelName', with the other "
        "IBKR_SYNC_*_MODEL settings), or add 'portfolio' to INSTALLED_APPS to use ours."
    )

    # Set, and misspelt: leaving it out would not help either.
    settings.IBKR_SYNC_CASH_BALANCE_MODEL = "holdings.Cahs"
    with pytest.raises(ImproperlyConfigured) as caught:
        conf.lookup_model("IBKR_SYNC_CASH_BALANCE_MODEL")
    assert str(caught.value) == (
        "IBKR_SYNC_CASH_BALANCE_MODEL refers to model 'holdings.Cahs', which is not "
        "installed: correct the name, or add its app to INSTALLED_APPS."
    )
