"""The sync's part of the portfolio overview: when the portfolio was last synced from
IBKR, how long ago, and a warning when the latest sync failed: sync run data, shown only
to users who may view sync runs (`permissions`); to others the panel is left out."""

from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone

from . import permissions, selectors


def sync_status_panel(request: HttpRequest) -> str:
    """Two small queries on an indexed column, whatever the length of the history. A sync
    refused because another was running is not "the latest sync" (as for /healthz). Nothing
    (no query, no heading) for a user without the sync runs' view permission: a failed
    run's message names the gateway's host and port."""
    if not permissions.may_view(request.user, permissions.Kind.SYNC_RUNS):
        return ""
    fields = ("pk", "status", "started_at", "finished_at", "error_message")
    latest, last_success = selectors.last_runs(*fields)
    just_now = last_success is not None and (
        (timezone.now() - last_success.finished_at).total_seconds() < 60
    )
    return render_to_string(
        "admin/ibkr_sync/overview_status.html",
        {"latest": latest, "last_success": last_success, "just_now": just_now},
        request=request,
    )
