"""The app's settings: their defaults, written once, and how each is read from text.

A host project may set any of them in its settings module; the app reads what the
settings do not set from the environment (`IBKR_HOST=... manage.py sync_ibkr`, as the
user's documentation promises), and falls back to the default (`conf.app_settings`). A
malformed value is an error that names the variable, wherever it is read: when a project
reads the environment into its settings at start-up (`read_environment`, as this
project's settings do), in the app's system checks (`ibkr_sync.checks`) and when the app
reads a setting. The parsers (`integer`, `seconds`, `boolean`, `choice`, `host`, `rate`)
serve a project's own settings too, with the same messages.

Standard library and Django's exception only: a settings module can import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

CLIENT_LIBRARIES = ("ib_insync", "ib_async")
#: IBKR_SYNC_TASK_QUEUE: "" runs every sync in-process; "celery" queues them.
TASK_QUEUES = ("", "celery")


def integer(name: str, raw: Any, minimum: int, maximum: int | None = None) -> int:
    """`raw` as a whole number within the bounds, or ImproperlyConfigured naming `name`
    (also for the project's own settings that are not the app's)."""
    text = str(raw).strip()
    try:
        value = int(text)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {text!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ImproperlyConfigured(f"{name} must be {bounds}, got {value}.")
    return value


def choice(name: str, raw: Any, choices: tuple[str, ...]) -> str:
    """`raw` as one of `choices`, or ImproperlyConfigured naming `name`."""
    value = str(raw).strip()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    return lambda name, raw: integer(name, raw, minimum, maximum)


def seconds(name: str, raw: Any) -> float:
    """`raw` as a number of seconds, more than 0 and at most an hour, or
    ImproperlyConfigured naming `name`."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number of seconds, got {raw!r}.") from None
    if not 0 < value <= 3600:
        raise ImproperlyConfigured(f"{name} must be more than 0 and at most 3600 seconds.")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    return lambda name, raw: choice(name, raw, choices)


def host(name: str, raw: Any) -> str:
    """`raw` as a host name or address (not empty), or ImproperlyConfigured naming `name`."""
    value = str(raw).strip()
    if not value:
        raise ImproperlyConfigured(f"{name} must not be empty.")
    return value


_RATE = re.compile(r"(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)", re.IGNORECASE)
_NO_LIMIT = ("", "none", "off")


def rate(name: str, raw: Any) -> str | None:
    """A request rate such as `6/minute` (per second, minute, hour or day), or None for no
    limit (empty, `none` or `off`)."""
    if raw is None:
        return None
    value = str(raw).strip()
    if value.lower() in _NO_LIMIT:
        return None
    match = _RATE.fullmatch(value)
    if not match or int(match[1]) < 1:
        raise ImproperlyConfigured(
            f"{name} must be a rate such as 6/minute (a number of requests per second, "
            f"minute, hour or day), or none for no limit; got {value!r}."
        )
    return f"{int(match[1])}/{match[2].lower()}"


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(name: str, raw: Any) -> bool:
    """`raw` as true (1, true, yes, on) or false (0, false, no, off), in any case, or
    ImproperlyConfigured naming `name`."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}.")


def text(name: str, raw: Any) -> str:
    """`raw` as text, without surrounding blanks."""
    return str(raw).strip()


def url(name: str, raw: Any) -> str:
    """`raw` as an http(s) URL with a host (a trailing slash dropped), or
    ImproperlyConfigured naming `name`."""
    from urllib.parse import urlsplit

    value = str(raw).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImproperlyConfigured(
            f"{name} must be an http(s) URL such as https://host/path, got {value[:80]!r}."
        )
    return value


def secret(name: str, raw: Any) -> str:
    """`raw` as a secret (never quoted back): empty, or at least 32 characters."""
    value = str(raw).strip()
    if value and len(value) < 32:
        raise ImproperlyConfigured(
            f"{name} must be at least 32 characters long (a long random string), or empty."
        )
    return value


def secrets(name: str, raw: Any) -> tuple[str, ...]:
    """`raw` as a list of secrets: a list or tuple in the settings, or text separated by
    commas in the environment; each as `secret` takes it (never quoted back)."""
    items = raw.split(",") if isinstance(raw, str) else list(raw or ())
    values = tuple(secret(name, item) for item in items)
    return tuple(value for value in values if value)


@dataclass(frozen=True)
class Setting:
    default: Any
    #: The setting's value from text or a settings value, or ImproperlyConfigured naming
    #: it; what it returns, it also accepts (each parser is idempotent).
    parse: Callable[[str, Any], Any]
    doc: str
    #: None set in a host's settings is a value of its own (the throttle rate's "no
    #: limit", as `read_environment` stores `none`), not "unset: the default".
    nullable: bool = False


#: Every setting of the app, with its default: the one place they are written.
SETTINGS: dict[str, Setting] = {
    "IBKR_HOST": Setting("127.0.0.1", host, "Host of TWS / IB Gateway."),
    "IBKR_PORT": Setting(7497, _integer(1, 65535), "Its API port (TWS paper: 7497)."),
    "IBKR_CLIENT_ID": Setting(1, _integer(0, 2**31 - 1), "A client id no other tool uses."),
    "IBKR_CONNECT_TIMEOUT": Setting(10.0, seconds, "Seconds to wait for the handshake."),
    "IBKR_REQUEST_TIMEOUT": Setting(60.0, seconds, "Seconds to wait for the positions."),
    "IBKR_READ_VALUES": Setting(
        True, boolean, "Also read cash, account values and market values (true/false)."
    ),
    "IBKR_VALUES_TIMEOUT": Setting(30.0, seconds, "Seconds to wait for one account's values."),
    "IBKR_CLIENT_LIBRARY": Setting("ib_insync", _choice(*CLIENT_LIBRARIES), "The IB client."),
    "IBKR_SYNC_LOCK_TIMEOUT": Setting(
        30.0, seconds, "A lock not renewed for this long is released by the next sync."
    ),
    "IBKR_SYNC_STALE_AFTER": Setting(900.0, seconds, "The longest one sync holds the lock."),
    "IBKR_SYNC_END_FROZEN_HOLDERS": Setting(
        True,
        boolean,
        "The next sync ends an abandoned sync's hold on the database: its PostgreSQL session, "
        "its stopped process on this machine (SQLite) (true/false).",
    ),
    "IBKR_SYNC_MAX_AGE": Setting(
        86400, _integer(0), "/healthz: the last success may be this old (0: no limit)."
    ),
    "IBKR_SYNC_THROTTLE_RATE": Setting(
        "6/minute",
        rate,
        "Syncs per user, API and admin together (none: no limit).",
        nullable=True,
    ),
    "IBKR_SYNC_GATEWAY_CLASS": Setting(
        "ibkr_sync.gateway.IbkrGateway", text, "The gateway adapter the sync reads from."
    ),
    "IBKR_SYNC_FLEX_SOURCE_CLASS": Setting(
        "ibkr_sync.sources.flex.source.FlexSource",
        text,
        "The source a Flex connection's sync reads from.",
    ),
    "IBKR_FLEX_BASE_URL": Setting(
        "https://ndcdyn.interactivebrokers.com/AccountManagement/FlexWebService",
        url,
        "IBKR's Flex Web Service (requests go to {base}/SendRequest, {base}/GetStatement).",
    ),
    "IBKR_FLEX_CONNECT_TIMEOUT": Setting(
        10.0, seconds, "Seconds to wait for a connection to the Flex Web Service."
    ),
    "IBKR_FLEX_READ_TIMEOUT": Setting(
        60.0, seconds, "Seconds to wait for each read of a Flex Web Service answer."
    ),
    "IBKR_FLEX_POLL_BUDGET": Setting(
        600.0, seconds, "The most time spent waiting while IBKR generates a statement (1019)."
    ),
    "IBKR_SYNC_SECRET_KEY": Setting(
        "",
        secret,
        "The key Flex tokens are encrypted with (empty: Django's SECRET_KEY).",
    ),
    "IBKR_SYNC_SECRET_KEY_FALLBACKS": Setting(
        (),
        secrets,
        "Former keys, still read (comma-separated); `ibkr_connection rotate-keys` re-encrypts.",
    ),
    "IBKR_SYNC_TASK_QUEUE": Setting(
        "",
        _choice(*TASK_QUEUES),
        "Where the API's and the admin's syncs run: empty, in the request (synchronously); "
        "celery, on a Celery worker (the API answers 202 with the queued run).",
    ),
}


def parse(name: str, raw: Any) -> Any:
    """`raw` (environment text, or a settings value) as setting `name` holds it, or
    ImproperlyConfigured naming the variable; None is unset: the default."""
    setting = SETTINGS[name]
    if raw is None:
        raw = setting.default
    return setting.parse(name, raw)


def parse_setting(name: str, value: Any) -> Any:
    """`value`, set in a host's settings, as setting `name` holds it: as `parse`, except
    that None is a value of its own where the setting says so (`Setting.nullable`)."""
    if value is None and SETTINGS[name].nullable:
        return SETTINGS[name].parse(name, None)
    return parse(name, value)


def from_environment(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """Setting `name` as the environment gives it (its default when unset)."""
    return parse(name, (os.environ if environ is None else environ).get(name))


def read_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every setting from the environment, for a project's settings module to take in
    (`globals().update(read_environment())`): it stops start-up on a malformed value."""
    return {name: from_environment(name, environ) for name in SETTINGS}
