"""What `GET /healthz` checks: the database, the age of the last sync, the sync lock, and
(when asked) the gateway's port.

Answers are coarse on purpose (the endpoint needs no login): a status per check, ages
and the error code of a failed sync, never a host name, an account id or an error text.
"""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError, connection

from . import conf, selectors
from .lock import abandoned_reason, database_now
from .models import SyncRun
from .sources.tws import IbkrGateway


def check_health(*, gateway: bool = False) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) for monitoring; with `gateway`, also try the gateway's port."""
    checks: dict[str, Any] = {"database": _database()}
    checks["last_sync"] = {"status": "unknown"}
    checks["sync_lock"] = {"status": "unknown"}
    if checks["database"]["status"] == "ok":
        try:
            checks["last_sync"] = _last_sync()
            checks["sync_lock"] = _sync_lock()
        except DatabaseError:  # e.g. tables not migrated yet
            checks["database"] = {"status": "error"}
    if gateway:
        checks["gateway"] = _gateway()
    healthy = all(check["status"] == "ok" for check in checks.values())
    return healthy, {"status": "ok" if healthy else "unhealthy", "checks": checks}


def _database() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        return {"status": "error"}
    return {"status": "ok"}


def _last_sync() -> dict[str, Any]:
    max_age = float(conf.get("IBKR_SYNC_MAX_AGE"))
    report: dict[str, Any] = {"max_age_seconds": int(max_age)}
    last, success = selectors.last_runs("status", "error_code", "started_at", "finished_at")
    if success is not None:
        # The database's clock, on which runs record their times, not this host's.
        age = (database_now() - success.finished_at).total_seconds()
        report.update(last_success_at=success.finished_at, age_seconds=int(age))
    if last is not None and last.status == SyncRun.Status.FAILED:
        report.update(status="failed", error_code=last.error_code)
    elif success is None:
        report.update(status="never")
    elif max_age and report["age_seconds"] > max_age:
        report.update(status="stale")
    else:
        report.update(status="ok")
    return report


def lock_hold_limit() -> float:
    """The longest a healthy sync holds the lock: it connects, reads the positions (and the
    values, which are given at most IBKR_REQUEST_TIMEOUT in all), and writes."""
    gateway = conf.GatewayConfig.from_settings()
    reads = 2 if gateway.read_values else 1
    return (
        gateway.connect_timeout
        + reads * gateway.request_timeout
        + float(conf.get("IBKR_SYNC_LOCK_TIMEOUT"))
    )


def _sync_lock() -> dict[str, Any]:
    """Free, or held briefly, is "ok". Held for longer than a sync can take (connect, read and
    write timeouts): "stuck" while its holder still renews it, "abandoned" once it stopped
    (the next sync releases it). Either way syncs are not happening, which a monitor must
    hear about."""
    running = selectors.running_run()
    if running is None:
        return {"status": "ok"}
    now = running.database_now  # the database's clock, as the lock's times
    held = (now - running.started_at).total_seconds()
    report: dict[str, Any] = {"held_seconds": int(held), "limit_seconds": int(lock_hold_limit())}
    if held <= lock_hold_limit():
        return {"status": "ok", **report}
    return {"status": "abandoned" if abandoned_reason(running, now) else "stuck", **report}


def _gateway() -> dict[str, Any]:
    return {"status": "ok" if IbkrGateway().port_is_open() else "unreachable"}
