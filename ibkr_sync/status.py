"""The sync's status panel, on the portfolio overview and the sync history: when the
portfolio was last synced from IBKR, how long ago, and a warning when the latest sync
failed; with connections, a line per connection (its last success, its latest sync if
that failed, and whether a sync holds its lock), of the connections the user may see
(`visibility`). Sync run data, shown only to users who
may view sync runs (`permissions`); to others the panel is left out."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone

from . import health, permissions, selectors
from .models import SyncRun

# What the panel reads of a run.
FIELDS = ("pk", "status", "error_code", "started_at", "finished_at", "error_message")


@dataclass(frozen=True)
class ConnectionLine:
    """What the panel says of one connection."""

    state: selectors.ConnectionState
    # The latest sync's failure in brief (`unreachable`, `logged_out`, `failed`), if it failed.
    failure: str
    # Its lock: `ok` (free, or held briefly), `stuck` or `abandoned` (`health.lock_state`).
    lock: dict
    just_now: bool

    @property
    def connection(self):
        return self.state.connection

    @property
    def failed(self) -> bool:
        """Its latest sync failed, and it is enabled (a disabled one warns of nothing)."""
        return bool(self.failure) and self.connection.enabled

    @property
    def warns(self) -> bool:
        return self.failed or self.lock["status"] != "ok"

    @property
    def failure_label(self) -> str:
        return self.failure.replace("_", " ")


def sync_status_panel(request: HttpRequest) -> str:
    """Without connections, two small queries on an indexed column, whatever the length of
    the history (one when the latest sync succeeded); with them, two more, however many
    connections there are. A sync refused because another was running is not "the latest
    sync" (as for /healthz). Nothing (no query, no heading) for a user without the sync
    runs' view permission: a failed run's message names the gateway's host and port."""
    if not permissions.may_view(request.user, permissions.Kind.SYNC_RUNS):
        return ""
    # Only the syncs and connections the user may see (`visibility`).
    latest, last_success, states = selectors.last_runs_or_connections(*FIELDS, user=request.user)
    if states is not None:
        lines = [_line(state) for state in states]
        return render_to_string(
            "admin/ibkr_sync/overview_status_connections.html",
            {"connections": lines, "warnings": any(line.warns for line in lines)},
            request=request,
        )
    return render_to_string(
        "admin/ibkr_sync/overview_status.html",
        {"latest": latest, "last_success": last_success, "just_now": _just_now(last_success)},
        request=request,
    )


def _just_now(success: SyncRun | None) -> bool:
    return success is not None and (timezone.now() - success.finished_at).total_seconds() < 60


def _line(state: selectors.ConnectionState) -> ConnectionLine:
    return ConnectionLine(
        state=state,
        failure=health.failure_status(state.last) if state.failed else "",
        lock=health.lock_state(state.running, state.connection),
        just_now=_just_now(state.last_success),
    )
