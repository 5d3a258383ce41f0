"""SyncRun history, and the admin's "Sync now" control (a thin edge over the service)."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count
from django.http import HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe

from .. import conf, throttle
from ..exceptions import IbkrSyncError, InvalidAccountId, SyncAlreadyRunning
from ..models import PositionChange, SyncRun
from ..permissions import Kind, may_view
from ..services import describe_values, sync_positions


def _admin_url_name(model, view: str) -> str | None:
    """The admin's URL name for `model`'s `view` page, or None if it has no admin."""
    name = f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}"
    try:
        reverse(name, args=[0]) if view == "change" else reverse(name)
    except NoReverseMatch:
        return None
    return name


class SyncNowMixin:
    """Mix into a ModelAdmin to show the "Sync now" control on its changelist (only to
    users with `ibkr_sync.run_sync`); on a list filtered to one account, it offers that
    account. For the portfolio app's lists, or a host's own:

        class PositionAdmin(SyncNowMixin, admin.ModelAdmin): ...
    """

    change_list_template = "admin/ibkr_sync/change_list_with_sync_now.html"


# Rows of a run's change list per page: a first sync of a large portfolio records one
# change per position, tens of thousands of them.
CHANGES_PER_PAGE = 100


@admin.register(SyncRun)
class SyncRunAdmin(admin.ModelAdmin):
    list_display = (
        "id", "started_at", "status_badge", "trigger", "user", "account_filter", "processed",
        "created", "updated", "unchanged", "reopened", "closed", "errors", "duration",
    )  # fmt: skip
    list_display_links = ("id", "started_at")
    list_filter = ("status", "trigger")
    list_select_related = ("user",)
    search_fields = ("=id", "account_filter", "error_message")
    readonly_fields = [f.name for f in SyncRun._meta.fields if f.name != "account_values"]
    readonly_fields += ["values_outcome", "duration"]
    date_hierarchy = "started_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # The audit trail, and a running row is the sync lock: not deletable by hand.
        return False

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: SyncRun) -> str:
        # A failed run says why on hover; its change page shows the whole message.
        return format_html(
            '<span class="ibkr-badge ibkr-badge-{}" title="{}">{}</span>',
            obj.status, obj.error_message, obj.get_status_display(),
        )  # fmt: skip

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), **self._changes_context(request, object_id)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _changes_context(self, request: HttpRequest, object_id) -> dict:
        """One page of what the run changed, optionally of one kind: three queries (counts
        by kind, the count for the paginator, and the page with positions, accounts and
        instruments joined in) at any size. Position changes are positions' data: for a
        user who may not view positions, nothing (the section is left out, not queried)."""
        if not may_view(request.user, Kind.POSITION_CHANGES):
            return {}
        try:
            run_id = int(object_id)
        except ValueError:
            return {}  # the admin answers for an unknown object
        kinds = dict(PositionChange.Kind.choices)
        kind = request.GET.get("kind", "")
        changes = PositionChange.objects.filter(sync_run_id=run_id)
        by_kind = dict(
            changes.order_by().values_list("kind").annotate(n=Count("id")).values_list("kind", "n")
        )
        if kind in kinds:
            changes = changes.filter(kind=kind)
        else:
            kind = ""
        changes = changes.select_related("position__account", "position__instrument").order_by("id")
        page = Paginator(changes, CHANGES_PER_PAGE).get_page(request.GET.get("page"))
        return {
            "changes": page,
            "change_kind": kind,
            "change_kinds": [
                (value, label, by_kind.get(value, 0)) for value, label in kinds.items()
            ],
            "changes_total": sum(by_kind.values()),
            # The configured position model's admin page, if the host registered one (and
            # the user may open it).
            "position_url_name": (
                _admin_url_name(conf.position_model(), "change")
                if may_view(request.user, Kind.POSITIONS)
                else None
            ),
        }

    @admin.display(description="account values")
    def values_outcome(self, obj: SyncRun) -> str:
        """Per account: its values read, or missing and why (its stored ones were kept)."""
        if not obj.account_values:
            return "-"
        return format_html_join(
            mark_safe("<br>"),
            "{}: {}",
            ((account, describe_values(v)) for account, v in obj.account_values.items()),
        )

    @admin.display(description="duration", ordering="finished_at")
    def duration(self, obj: SyncRun) -> str:
        if obj.duration is None:
            return "-"
        return f"{obj.duration.total_seconds():.2f} s"

    def get_urls(self):
        # Never inside a request-wide transaction (ATOMIC_REQUESTS), as for the API's view:
        # the lock row must be committed for other processes to see it, and a failed
        # sync's record must survive.
        sync_now = transaction.non_atomic_requests(self.admin_site.admin_view(self.sync_now_view))
        return [path("sync-now/", sync_now, name="ibkr_sync_syncrun_sync_now"), *super().get_urls()]

    def sync_now_view(self, request: HttpRequest):
        """Run a sync for the admin's "Sync now" form (on sync runs, positions, accounts)
        and go back to the page it was on, with the outcome as a message.

        The sync comes out of the user's one sync budget (`throttle`, shared with the API):
        over it, nothing starts. The message tells of the run only what the user may view
        (`_outcome_message`): the gateway's error, for one, is sync run data."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm("ibkr_sync.run_sync"):
            raise PermissionDenied
        wait = throttle.take(request.user)
        if wait is not None:
            self.message_user(request, throttle.refusal(wait), messages.ERROR)
            return HttpResponseRedirect(self._back_to(request))
        account = request.POST.get("ibkr_account_id", "").strip() or None
        try:
            result = sync_positions(account, trigger=SyncRun.Trigger.ADMIN, user=request.user)
        except IbkrSyncError as exc:
            # The error names the gateway's address (and the accounts it manages): sync
            # run data. What the user typed wrong, or a sync running, reveals nothing.
            shown = isinstance(exc, (InvalidAccountId, SyncAlreadyRunning))
            if shown or may_view(request.user, Kind.SYNC_RUNS):
                text = f"Sync failed: {exc}"
            else:
                text = f"Sync failed ({exc.code}); nothing was changed."
            self.message_user(request, text, messages.ERROR)
        else:
            self.message_user(request, *self._outcome_message(request, result))
        return HttpResponseRedirect(self._back_to(request))

    @staticmethod
    def _outcome_message(request: HttpRequest, result) -> tuple[str, int]:
        """A finished sync's message and level. The outcome (finished, with warnings) and
        the run's number for anyone who ran it; the counts to a user who may view sync
        runs (they are the run's record) or position changes (they are their sum); the
        link to the run, and why accounts' values were not read, to sync run viewers."""
        runs = may_view(request.user, Kind.SYNC_RUNS)
        counts = runs or may_view(request.user, Kind.POSITION_CHANGES)
        missing = {
            account: outcome["reason"]
            for account, outcome in (result.account_values or {}).items()
            if outcome["status"] == "missing"
        }
        level = messages.WARNING if result.errors or missing else messages.SUCCESS
        if runs:
            run_url = reverse("admin:ibkr_sync_syncrun_change", args=[result.sync_run_id])
            run = format_html('<a href="{}">Sync #{}</a>', run_url, result.sync_run_id)
        else:
            run = f"Sync #{result.sync_run_id}"
        if not counts:
            warnings = " with warnings" if level == messages.WARNING else ""
            return format_html("{} finished{}.", run, warnings), level
        message = format_html("{} finished: {}; {}.", run, result.scope, result.outcome)
        if missing and runs:
            message = format_html(
                "{} Values not read for {} (their stored values were kept): {}",
                message,
                ", ".join(missing),
                "; ".join(f"{account}: {reason}" for account, reason in missing.items()),
            )
        elif missing:
            message = format_html("{} Some accounts' values were not read.", message)
        return message, level

    def _back_to(self, request: HttpRequest) -> str:
        """The page the form was posted from, if it is one of ours; else the run history."""
        target = request.POST.get("next", "")
        if target and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return target
        return reverse("admin:ibkr_sync_syncrun_changelist")
