"""What `GET /healthz` checks: the database, the age of the last sync, the sync locks, and
(when asked) the gateway's port; with connections, each connection's too.

Answers are coarse on purpose (the endpoint needs no login): a status per check, ages
and the error code of a failed sync, never a host name, an account id or an error text.
A connection is named by its id; its name (which may tell who uses the installation)
only when the caller asks for it (`names`: the view, for a staff user who may view sync
runs, and only the connections that user may see: `visibility`).

With no connection, the answer is the settings' gateway's, as it always was. With
connections, `checks` keeps its keys (`last_sync`: the last sync of any enabled
connection; `sync_lock`: the worst of every lock; `gateway`: every enabled connection's
port) and `connections` lists each connection's own: its last success, its lock, its
port. The installation is healthy when every enabled connection is.

With a task queue (IBKR_SYNC_TASK_QUEUE), `checks.queue`: the broker accepts a
connection (tried with a short timeout, the answer kept BROKER_CHECK_CACHE seconds per
process, so probes never wait on it twice in a row), a worker was seen recently (its
heartbeat row, `models.QueueWorker`: one query, no call to the workers), and the oldest
queued sync is not older than IBKR_SYNC_STALE_AFTER (workers keep up).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from django.db import DatabaseError, connection
from django.db.models import Max, Min

from . import conf, selectors
from .lock import abandoned_reason, database_now
from .models import WORKER_SILENT_AFTER, Connection, QueueWorker, SyncRun
from .sources.tws import IbkrGateway
from .sources.tws.errors import _SERVER_LINK_DOWN_CODES

# The error codes of a sync that could not reach its gateway (refused, no answer, not a
# gateway, no answer in time) ...
UNREACHABLE_CODES = frozenset(
    {"gateway_unavailable", "not_a_gateway", "gateway_timeout", "flex_unavailable", "flex_timeout"}
)
# ... and of one that reached it while it was not logged in to IBKR (it manages no
# account), or had lost its link to IBKR's servers (the IB error 1100, 1101 or 2110, which
# the run's message quotes).
LOGGED_OUT_CODES = frozenset({"no_managed_accounts"})
_IB_ERROR = re.compile(r"\berror (\d{3,5})\b")

# The worst first: the one `checks.sync_lock` reports when several locks are held.
_LOCK_ORDER = ("abandoned", "stuck", "ok")


def check_health(
    *, gateway: bool = False, names: bool | AbstractSet[int] = False
) -> tuple[bool, dict[str, Any]]:
    """(healthy, report) for monitoring; with `gateway`, also try the gateway's port (each
    enabled connection's); with `names` True, name each connection (else only its id),
    or (a set of ids) those connections only."""
    checks: dict[str, Any] = {"database": _database()}
    checks["last_sync"] = {"status": "unknown"}
    checks["sync_lock"] = {"status": "unknown"}
    states: list[selectors.ConnectionState] | None = None
    if checks["database"]["status"] == "ok":
        try:
            states = selectors.connection_states()
            enabled = (
                None if not states else [s.connection.pk for s in states if s.connection.enabled]
            )
            checks["last_sync"] = _last_sync(*selectors.last_runs(connections=enabled))
            checks["sync_lock"] = _sync_lock(selectors.running_runs().select_related("connection"))
        except DatabaseError:  # e.g. tables not migrated yet
            checks["database"] = {"status": "error"}
            states = None
    report: dict[str, Any] = {"checks": checks}
    if states:
        # A Flex connection has no gateway port to try.
        gateways = [
            s.connection
            for s in states
            if s.connection.enabled and s.connection.kind == Connection.Kind.TWS
        ]
        ports = _ports(gateways) if gateway else {}
        report["connections"] = [
            _connection(state, ports.get(state.connection.pk), names) for state in states
        ]
    if gateway:
        checks["gateway"] = _gateways(report.get("connections"))
    if conf.get("IBKR_SYNC_TASK_QUEUE"):
        checks["queue"] = _queue(database=checks["database"]["status"] == "ok")
    healthy = all(check["status"] == "ok" for check in checks.values()) and all(
        entry["status"] in ("ok", "disabled") for entry in report.get("connections", ())
    )
    return healthy, {"status": "ok" if healthy else "unhealthy", **report}


def _database() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        return {"status": "error"}
    return {"status": "ok"}


def _last_sync(
    last: SyncRun | None, success: SyncRun | None, *, now=None, detailed: bool = False
) -> dict[str, Any]:
    """The last sync's check. `detailed` (a connection's): a failure that tells the gateway
    cannot be reached, or is not logged in, says so (`unreachable`, `logged_out`) rather
    than `failed`."""
    max_age = float(conf.get("IBKR_SYNC_MAX_AGE"))
    report: dict[str, Any] = {"max_age_seconds": int(max_age)}
    if success is not None:
        # The database's clock, on which runs record their times, not this host's.
        age = ((now or database_now()) - success.finished_at).total_seconds()
        report.update(last_success_at=success.finished_at, age_seconds=int(age))
    if last is not None and last.status == SyncRun.Status.FAILED:
        report.update(status=failure_status(last) if detailed else "failed")
        report.update(error_code=last.error_code)
    elif success is None:
        report.update(status="never")
    elif max_age and report["age_seconds"] > max_age:
        report.update(status="stale")
    else:
        report.update(status="ok")
    return report


def failure_status(run: SyncRun) -> str:
    """What a failed sync tells of its gateway: `unreachable`, `logged_out`, or (any other
    failure) `failed`."""
    found = _IB_ERROR.search(run.error_message or "")
    if run.error_code in LOGGED_OUT_CODES or (
        run.error_code == "gateway_unavailable"
        and found
        and int(found.group(1)) in _SERVER_LINK_DOWN_CODES
    ):
        return "logged_out"
    if run.error_code in UNREACHABLE_CODES:
        return "unreachable"
    return "failed"


def lock_hold_limit(connection_row: Connection | None = None) -> float:
    """The longest a healthy sync holds the lock (of `connection_row`, with its own
    timeouts; None: the settings' gateway's): it connects, reads the positions (and the
    values, which are given at most IBKR_REQUEST_TIMEOUT in all), and writes. A Flex
    connection: it connects, waits while IBKR generates the statement, reads it twice
    at most (the request and the statement), and writes."""
    if connection_row is not None and connection_row.kind == Connection.Kind.FLEX:
        return (
            float(conf.get("IBKR_FLEX_CONNECT_TIMEOUT"))
            + float(conf.get("IBKR_FLEX_POLL_BUDGET"))
            + 2 * float(conf.get("IBKR_FLEX_READ_TIMEOUT"))
            + float(conf.get("IBKR_SYNC_LOCK_TIMEOUT"))
        )
    gateway = conf.GatewayConfig.from_settings(connection_row)
    reads = 2 if gateway.read_values else 1
    return (
        gateway.connect_timeout
        + reads * gateway.request_timeout
        + float(conf.get("IBKR_SYNC_LOCK_TIMEOUT"))
    )


def lock_state(running: SyncRun | None, connection_row: Connection | None) -> dict[str, Any]:
    """Free, or held briefly, is "ok". Held for longer than a sync can take (connect, read and
    write timeouts): "stuck" while its holder still renews it, "abandoned" once it stopped
    (the next sync releases it). Either way syncs are not happening, which a monitor must
    hear about."""
    if running is None:
        return {"status": "ok"}
    now = running.database_now  # the database's clock, as the lock's times
    held = (now - running.started_at).total_seconds()
    limit = lock_hold_limit(connection_row)
    report: dict[str, Any] = {"held_seconds": int(held), "limit_seconds": int(limit)}
    if held <= limit:
        return {"status": "ok", **report}
    return {"status": "abandoned" if abandoned_reason(running, now) else "stuck", **report}


def _sync_lock(running: Iterable[SyncRun]) -> dict[str, Any]:
    """Every lock held (the settings' gateway's, each connection's): the worst of them, and
    of equals the one held longest."""
    worst: dict[str, Any] = {"status": "ok"}
    for run in running:
        check = lock_state(run, run.connection)
        rank = (_LOCK_ORDER.index(check["status"]), -check["held_seconds"])
        if "held_seconds" not in worst or rank < (
            _LOCK_ORDER.index(worst["status"]),
            -worst["held_seconds"],
        ):
            worst = check
    return worst


def _connection(
    state: selectors.ConnectionState, port: dict[str, Any] | None, names: bool | AbstractSet[int]
) -> dict[str, Any]:
    """One connection's report: its last sync (with when it was last fine), its lock and,
    when checked, its port. A disabled one is listed, and counts for nothing."""
    row = state.connection
    entry: dict[str, Any] = {"id": row.pk}
    if names is True or (names and row.pk in names):
        entry["name"] = row.name
    entry["enabled"] = row.enabled
    now = next(
        (run.database_now for run in (state.last, state.last_success, state.running) if run),
        None,
    )
    checks = {
        "last_sync": _last_sync(state.last, state.last_success, now=now, detailed=True),
        "sync_lock": lock_state(state.running, row),
    }
    if port is not None:
        checks["gateway"] = port
    if not row.enabled:
        status = "disabled"
    else:
        status = "ok" if all(c["status"] == "ok" for c in checks.values()) else "unhealthy"
    return {**entry, "status": status, **checks}


def _gateways(connections: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The settings' gateway's port; with connections, every enabled one's."""
    if connections is None:
        return _port(conf.GatewayConfig.from_settings())
    ports = [entry["gateway"]["status"] for entry in connections if "gateway" in entry]
    return {"status": "ok" if all(s == "ok" for s in ports) else "unreachable"}


def _ports(rows: list[Connection]) -> dict[int, dict[str, Any]]:
    """Each connection's port, tried side by side (each try waits up to 2 s)."""
    if not rows:
        return {}
    configs = [conf.GatewayConfig.from_settings(row) for row in rows]
    with ThreadPoolExecutor(max_workers=min(len(rows), 16)) as pool:
        checks = list(pool.map(_port, configs))
    return {row.pk: check for row, check in zip(rows, checks, strict=True)}


def _port(config: conf.GatewayConfig) -> dict[str, Any]:
    return {"status": "ok" if IbkrGateway(config).port_is_open() else "unreachable"}


# --- the task queue ------------------------------------------------------------------------

#: The broker's answer is tried at most this often per process (seconds) ...
BROKER_CHECK_CACHE = 5.0
#: ... and waited for at most this long.
BROKER_TIMEOUT = 1.0
_broker: dict[str, Any] = {"at": None, "reachable": None}
_broker_lock = threading.Lock()


def _broker_reachable() -> bool:
    """Whether the broker accepts a connection: tried in a thread of its own, waited for
    BROKER_TIMEOUT (a little more for the thread), and kept BROKER_CHECK_CACHE seconds."""
    with _broker_lock:
        now = time.monotonic()
        if _broker["at"] is not None and now - _broker["at"] < BROKER_CHECK_CACHE:
            return _broker["reachable"]
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            from . import tasks

            future = pool.submit(tasks.broker_reachable, BROKER_TIMEOUT)
            reachable = future.result(timeout=BROKER_TIMEOUT + 0.5)
        except FutureTimeout:
            reachable = False
        except ImportError:  # Celery is not installed (system check E008 says so)
            reachable = False
        finally:
            pool.shutdown(wait=False)  # a try that hangs ends on its own timeout
        _broker.update(at=time.monotonic(), reachable=reachable)
        return reachable


def forget_broker_check() -> None:
    """The next check tries the broker again (tests; a changed broker setting)."""
    with _broker_lock:
        _broker.update(at=None, reachable=None)


def _queue(*, database: bool) -> dict[str, Any]:
    """The task queue's check: `broker` (ok / unreachable), the workers seen within
    WORKER_SILENT_AFTER seconds and when the last one was, the oldest queued sync's age;
    status `ok`, else the first of `broker_unreachable`, `no_worker`, `backlog`."""
    report: dict[str, Any] = {
        "broker": "ok" if _broker_reachable() else "unreachable",
        "max_queued_seconds": int(float(conf.get("IBKR_SYNC_STALE_AFTER"))),
    }
    if database:
        try:
            now = database_now()
            seen = QueueWorker.objects.aggregate(last=Max("seen_at"))["last"]
            report["workers"] = QueueWorker.objects.filter(
                seen_at__gte=now - dt.timedelta(seconds=WORKER_SILENT_AFTER)
            ).count()
            if seen is not None:
                report["worker_seen_seconds"] = max(0, int((now - seen).total_seconds()))
            oldest = SyncRun.objects.filter(status=SyncRun.Status.QUEUED).aggregate(
                oldest=Min("queued_at")
            )["oldest"]
            if oldest is not None:
                report["oldest_queued_seconds"] = max(0, int((now - oldest).total_seconds()))
        except DatabaseError:
            pass  # the database's own check says so
    if report["broker"] != "ok":
        status = "broker_unreachable"
    elif not report.get("workers"):
        status = "no_worker"
    elif report.get("oldest_queued_seconds", 0) > report["max_queued_seconds"]:
        status = "backlog"
    else:
        status = "ok"
    return {"status": status, **report}
