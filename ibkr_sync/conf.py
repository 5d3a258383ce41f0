"""The app's settings with their defaults, read when used (so `override_settings` works).

The project's settings module parses and validates the environment; this module is what
the app itself reads, so `ibkr_sync` also works in a project that sets plain values.
"""

from dataclasses import dataclass

from django.conf import settings

DEFAULTS = {
    "IBKR_HOST": "127.0.0.1",
    "IBKR_PORT": 7497,
    "IBKR_CLIENT_ID": 1,
    "IBKR_CONNECT_TIMEOUT": 10.0,
    "IBKR_REQUEST_TIMEOUT": 60.0,
    "IBKR_CLIENT_LIBRARY": "ib_insync",
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
