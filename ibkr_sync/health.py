"""What `GET /healthz` checks: the database, the age of the last sync, the gateway's port.

Answers are coarse on purpose (the endpoint needs no login): a status per check, ages
and the error code of a failed sync, never a host name, an account id or an error text.
"""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError, connection
from django.utils import timezone

from . import conf
from .gateway import IbkrGateway
from .models import SyncRun

# A sync refused because another one was running says nothing about the data's age.
_NOT_A_FAILURE = ("sync_already_running",)


def check_health(*, gateway: bool = False) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) for monitoring; with `gateway`, also try the gateway's port."""
    checks: dict[str, Any] = {"database": _database()}
    checks["last_sync"] = {"status": "unknown"}
    if checks["database"]["status"] == "ok":
        try:
            checks["last_sync"] = _last_sync()
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
    finished = SyncRun.objects.exclude(status=SyncRun.Status.RUNNING).exclude(
        error_code__in=_NOT_A_FAILURE
    )
    last = finished.order_by("-started_at", "-id").first()
    success = finished.filter(status=SyncRun.Status.SUCCESS).order_by("-started_at", "-id").first()
    if success is not None:
        age = (timezone.now() - success.finished_at).total_seconds()
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


def _gateway() -> dict[str, Any]:
    return {"status": "ok" if IbkrGateway().port_is_open() else "unreachable"}
