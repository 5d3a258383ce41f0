"""SyncRun history, and the admin's "Sync now" control (a thin edge over the service).

A run's page reads as a story: its outcome first (status, when, how long, who or what
started it, and for a failure its error, prominently), then the accounts and what was read
of each account's values, then what changed (the counts, then the changes list), and last,
folded away, the diagnostics (the lock's internals, the raw JSON)."""

import json

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count
from django.http import HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import Truncator

from .. import conf, connections, throttle, visibility
from ..exceptions import (
    ConnectionDisabled,
    ConnectionRequired,
    IbkrSyncError,
    InvalidAccountId,
    SyncAlreadyRunning,
    UnknownConnection,
)
from ..models import Connection, PositionChange, SyncRun
from ..permissions import Kind, may_view
from ..services import describe_values, queue_sync, queues, sync_positions
from ..status import sync_status_panel
from .columns import when_column


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

# A failed run's message in the list, cut to what a cell reads in three lines or so (the
# whole message on hover and on the run's page).
ERROR_IN_LIST_CHARS = 90

# The counts a run records, in the words its list and page say them.
COUNTS = (
    ("created", "created"),
    ("updated", "updated"),
    ("reopened", "re-opened"),
    ("closed", "closed"),
    ("unchanged", "unchanged"),
    ("errors", "not stored"),
)


def changes_text(run: SyncRun) -> str:
    """`15 positions: 2 updated, 1 closed, 12 unchanged`: the counts that are not zero."""
    if run.status == SyncRun.Status.RUNNING:
        return "running"
    counts = [f"{getattr(run, field)} {label}" for field, label in COUNTS if getattr(run, field)]
    positions = f"{run.processed} position{'' if run.processed == 1 else 's'}"
    if not run.processed and not counts:
        return "none read" if run.status == SyncRun.Status.FAILED else "0 positions"
    return f"{positions}: {', '.join(counts)}" if counts else positions


def _any_connection() -> bool:
    """Whether a connection exists, or a run of one (since removed) is on record."""
    return Connection.objects.exists() or SyncRun.objects.exclude(connection_name="").exists()


class VisibleConnectionFilter(admin.RelatedFieldListFilter):
    """The connection filter of the sync history, offering only the connections the user
    may see (`visibility`): another owner's connection's name is not listed."""

    def field_choices(self, field, request: HttpRequest, model_admin):
        rows = visibility.visible_connections(request.user).order_by("name")
        return list(rows.values_list("pk", "name"))


@admin.register(SyncRun)
class SyncRunAdmin(admin.ModelAdmin):
    # What fits a 1280 px wide window beside the admin's sidebar (the filters go above
    # the list below 1700 px): the counts in one column, a failed run's error in another.
    list_display = (
        "id", "started", "status_badge", "connection_display", "triggered_by", "scope",
        "counts", "error", "duration",
    )  # fmt: skip
    list_display_links = ("id", "started")
    # The connection filter lists the connections (and "-" for the settings' gateway or a
    # removed connection); shown only once there is a connection.
    list_filter = ("status", "trigger", ("connection", VisibleConnectionFilter))
    list_select_related = ("user",)
    search_fields = ("=id", "connection_name", "account_filter", "error_message")
    date_hierarchy = "started_at"
    fieldsets = (
        (None, {"fields": (
            "status_badge", "error_box", "started_at", "finished_at", "duration",
            "connection_display", "triggered_by", "scope", "period_display",
        )}),
        ("Accounts", {"fields": ("accounts_display", "accounts_refused_display",
                                 "values_outcome")}),
        ("What changed", {"fields": ("counts", "error_details_display")}),
        ("Diagnostics", {
            "classes": ("collapse",),
            "description": "The sync lock's holder, as the run recorded it, and the run's "
                           "raw record.",
            "fields": (
                "owner", "host", "pid", "heartbeat_at", "database_session", "raw_record",
            ),
        }),
    )  # fmt: skip
    readonly_fields = (
        "status_badge", "error_box", "started_at", "finished_at", "duration",
        "connection_display", "triggered_by", "scope", "period_display", "accounts_display",
        "accounts_refused_display", "values_outcome", "counts",
        "error_details_display", "owner", "host", "pid", "heartbeat_at", "database_session",
        "raw_record",
    )  # fmt: skip

    class Media:
        css = {"all": ("ibkr_sync/admin.css",)}

    started = when_column("started_at", "started at")

    def get_queryset(self, request: HttpRequest):
        # The settings' gateway's runs and those of the connections the user may see
        # (`visibility`); another owner's run's page answers as a run that does not exist.
        return visibility.visible_runs(super().get_queryset(request), request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # The audit trail, and a running row is the sync lock: not deletable by hand.
        return False

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: SyncRun) -> str:
        # A failed run's message is also on hover; the error column shows it.
        return format_html(
            '<span class="ibkr-badge ibkr-badge-{}" title="{}">{}</span>',
            obj.status, obj.error_message, obj.get_status_display(),
        )  # fmt: skip

    @admin.display(description="connection", ordering="connection_name")
    def connection_display(self, obj: SyncRun) -> str:
        """The connection's name when it ran (kept if it was removed or renamed since);
        `-` for the settings' gateway (no connection)."""
        return obj.connection_name or "-"

    @admin.display(description="accounts refused")
    def accounts_refused_display(self, obj: SyncRun) -> str:
        """Accounts the connection reported but the sync did not write, and why (a newer
        snapshot of them, from another connection, was applied already)."""
        refused = obj.accounts_refused or {}
        if not refused:
            return "None"
        items = format_html_join(
            "",
            "<li><strong>{}</strong>: {}</li>",
            ((account, self._refusal_words(refused[account])) for account in sorted(refused)),
        )
        return format_html('<ul class="ibkr-details">{}</ul>', items)

    @staticmethod
    def _refusal_words(reason) -> str:
        if isinstance(reason, dict):
            return reason.get("reason") or ", ".join(f"{k}: {v}" for k, v in reason.items())
        return str(reason)

    @admin.display(description="triggered by", ordering="trigger")
    def triggered_by(self, obj: SyncRun) -> str:
        """`Admin (root)`, `API (svc)`, `Management command`."""
        if obj.user_id is None:
            return obj.get_trigger_display()
        return f"{obj.get_trigger_display()} ({obj.user})"

    @admin.display(description="accounts asked for", ordering="account_filter")
    def scope(self, obj: SyncRun) -> str:
        return obj.account_filter or "All"

    @admin.display(description="period read")
    def period_display(self, obj: SyncRun) -> str:
        """The days a Flex statement covered (both included), and whether this run wrote
        its history only (an older window of a back-fill)."""
        if obj.period_from is None or obj.period_to is None:
            return "-"
        text = f"{obj.period_from:%Y-%m-%d} to {obj.period_to:%Y-%m-%d}"
        if obj.history_only:
            text += (
                " (history only: an older window of a back-fill; positions and cash not written)"
            )
        repeats = (obj.statement or {}).get("repeats")
        if repeats:
            text += (
                f"; the same statement that run #{repeats} applied, nothing of it changed "
                "since: not read again, nothing written"
            )
        return text

    @admin.display(description="error", ordering="error_code")
    def error(self, obj: SyncRun) -> str:
        """A failed run's error code and message, the message cut to a readable length
        (whole on hover, and on the run's page: `error_box`)."""
        if not obj.error_code and not obj.error_message:
            return "-"
        return format_html(
            '<span class="ibkr-error-cell" title="{}"><code>{}</code> {}</span>',
            obj.error_message, obj.error_code or "error",
            Truncator(obj.error_message).chars(ERROR_IN_LIST_CHARS),
        )  # fmt: skip

    @admin.display(description="error")
    def error_box(self, obj: SyncRun) -> str:
        """On a failed run's page, right under its status: the code and the whole message."""
        return format_html(
            '<div class="ibkr-error" role="alert"><code>{}</code><p>{}</p></div>',
            obj.error_code or "error", obj.error_message,
        )  # fmt: skip

    @admin.display(description="changes")
    def counts(self, obj: SyncRun) -> str:
        return changes_text(obj)

    @admin.display(description="accounts reconciled")
    def accounts_display(self, obj: SyncRun) -> str:
        return ", ".join(str(a) for a in obj.accounts or ()) or "None"

    @admin.display(description="records not stored")
    def error_details_display(self, obj: SyncRun) -> str:
        """Each record the sync could not store, and why: `U1234567 XYZ (STK): reason`."""
        if not obj.error_details:
            return "None"
        items = format_html_join(
            "",
            "<li>{}: {}</li>",
            (
                (self._record_label(detail), detail.get("reason", ""))
                if isinstance(detail, dict)
                else ("?", detail)
                for detail in obj.error_details
            ),
        )
        return format_html('<ul class="ibkr-details">{}</ul>', items)

    @staticmethod
    def _record_label(detail: dict) -> str:
        sec_type = f" ({detail['sec_type']})" if detail.get("sec_type") else ""
        return f"{detail.get('account', '')} {detail.get('symbol', '')}{sec_type}".strip()

    @admin.display(description="raw record (JSON)")
    def raw_record(self, obj: SyncRun) -> str:
        # The records not stored are above, for those who may view positions.
        record = {"accounts": obj.accounts, "account_values": obj.account_values}
        return format_html(
            '<pre class="ibkr-raw">{}</pre>', json.dumps(record, indent=2, sort_keys=True)
        )

    def changelist_view(self, request: HttpRequest, extra_context=None):
        # Above the history: the sync's status (a line per connection, when there are
        # connections), to those who may view sync runs, as on the overview.
        extra_context = {**(extra_context or {}), "status_panel": sync_status_panel(request)}
        return super().changelist_view(request, extra_context)

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), **self._changes_context(request, object_id)}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_list_display(self, request: HttpRequest):
        # Without connections (none now, none ever synced) the list is as it was before
        # connections: no column of dashes taking the width the error needs.
        if not _any_connection():
            return tuple(f for f in self.list_display if f != "connection_display")
        return self.list_display

    def get_fieldsets(self, request: HttpRequest, obj=None):
        # A failure's error whole, under its status (`error_box`); a run without one has
        # no error row.
        # The records not stored name positions (a symbol, a contract id, a value): position
        # data, shown only to those who may view positions, as the API's error_details.
        fieldsets = super().get_fieldsets(request, obj)
        hidden = set()
        if obj is not None and not (obj.error_code or obj.error_message):
            hidden.add("error_box")
        if obj is not None and not obj.connection_name:
            hidden.add("connection_display")  # the settings' gateway: as before connections
        if obj is not None and not obj.accounts_refused:
            hidden.add("accounts_refused_display")
        if obj is not None and obj.period_to is None:
            hidden.add("period_display")  # a gateway's read of one moment
        if not may_view(request.user, Kind.POSITIONS):
            hidden.add("error_details_display")
        return tuple(
            (name, {**options, "fields": tuple(f for f in options["fields"] if f not in hidden)})
            for name, options in fieldsets
        )

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
        # Of a run the user may see, the changes of positions they may see (an account
        # reported by another owner's connection since).
        changes = visibility.visible_runs(
            PositionChange.objects.filter(sync_run_id=run_id), request.user, "sync_run"
        )
        changes = visibility.visible(changes, request.user, "position__account")
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
            return "Not read"
        # In the order the sync read the accounts (PostgreSQL's jsonb keeps no key order).
        values = obj.account_values
        order = [a for a in obj.accounts or () if a in values]
        order += sorted(a for a in values if a not in order)
        rows = format_html_join(
            "",
            '<li><strong>{}</strong> <span class="ibkr-badge ibkr-badge-values-{}">{}</span> {}'
            "</li>",
            ((account, *self._values_words(values[account])) for account in order),
        )
        return format_html('<ul class="ibkr-values">{}</ul>', rows)

    @staticmethod
    def _values_words(outcome) -> tuple[str, str, str]:
        """(status, its label, the rest of `describe_values`'s words)."""
        if not isinstance(outcome, dict):
            return ("missing", "?", str(outcome))
        status = "missing" if outcome.get("status") == "missing" else "read"
        text = describe_values(outcome)
        rest = text.split(":", 1)[1].strip() if ":" in text else text
        if status == "read" and text.startswith("read (base "):
            # `read (base USD): 41 positions valued, ...` -> `base USD: 41 positions ...`
            base, _, details = text[len("read (") :].partition("): ")
            rest = f"{base}; {details}"
        return (status, "values read" if status == "read" else "values missing", rest)

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
        and go back to the page it was on, with the outcome as a message; with a task
        queue (IBKR_SYNC_TASK_QUEUE), queue it and say where its outcome will be.

        The sync comes out of the user's one sync budget (`throttle`, shared with the API):
        over it, nothing starts. The message tells of the run only what the user may view
        (`_outcome_message`): the gateway's error, for one, is sync run data."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm("ibkr_sync.run_sync"):
            raise PermissionDenied
        try:
            # The connection chosen (with several), before the budget is taken: a choice
            # that cannot be synced starts nothing.
            # Only a connection the user may sync (`visibility`): another owner's answers
            # as a name no connection has.
            target = connections.resolve(
                request.POST.get("connection", "").strip() or None, user=request.user
            )
        except IbkrSyncError as exc:
            self.message_user(request, f"Sync not started: {exc}", messages.ERROR)
            return HttpResponseRedirect(self._back_to(request))
        wait = throttle.take(request.user)
        if wait is not None:
            self.message_user(request, throttle.refusal(wait), messages.ERROR)
            return HttpResponseRedirect(self._back_to(request))
        account = request.POST.get("ibkr_account_id", "").strip() or None
        if queues():
            self._queue(request, account, target)
            return HttpResponseRedirect(self._back_to(request))
        try:
            result = sync_positions(
                account,
                trigger=SyncRun.Trigger.ADMIN,
                user=request.user,
                connection=target.connection,
            )
        except IbkrSyncError as exc:
            self._refused(request, exc)
        else:
            self.message_user(request, *self._outcome_message(request, result))
        return HttpResponseRedirect(self._back_to(request))

    def _queue(self, request: HttpRequest, account: str | None, target) -> None:
        """With a task queue (IBKR_SYNC_TASK_QUEUE): the sync handed to a worker, and a
        message saying so, with the link to the run's page in the sync history (where its
        outcome will be) for a user who may view sync runs. A refusal is said as a
        synchronous sync's error is."""
        try:
            run = queue_sync(
                account,
                trigger=SyncRun.Trigger.ADMIN,
                user=request.user,
                connection=target.connection,
            )
        except IbkrSyncError as exc:
            self._refused(request, exc, "Sync not queued")
            return
        of = f" of connection {target.name}" if target.connection is not None else ""
        if may_view(request.user, Kind.SYNC_RUNS):
            run_url = reverse("admin:ibkr_sync_syncrun_change", args=[run.pk])
            message = format_html(
                '<a href="{}">Sync #{}</a>{} queued: a worker runs it; its page in the sync '
                "history shows its outcome.",
                run_url,
                run.pk,
                of,
            )
        else:
            message = f"Sync #{run.pk}{of} queued: a worker runs it."
        self.message_user(request, message, messages.INFO)

    def _refused(self, request: HttpRequest, exc: IbkrSyncError, what: str = "Sync failed") -> None:
        """A sync that failed (or was not queued), as the admin says it: the error names
        the gateway's address (and the accounts it manages): sync run data. What the user
        typed wrong, or a sync running, reveals nothing."""
        shown = isinstance(
            exc,
            (
                InvalidAccountId,
                SyncAlreadyRunning,
                UnknownConnection,
                ConnectionRequired,
                ConnectionDisabled,
            ),
        )
        if shown or may_view(request.user, Kind.SYNC_RUNS):
            text = f"{what}: {exc}"
        else:
            text = f"{what} ({exc.code}); nothing was changed."
        self.message_user(request, text, messages.ERROR)

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
        refused = result.accounts_refused or {}
        level = messages.WARNING if result.errors or missing or refused else messages.SUCCESS
        if runs:
            run_url = reverse("admin:ibkr_sync_syncrun_change", args=[result.sync_run_id])
            run = format_html('<a href="{}">Sync #{}</a>', run_url, result.sync_run_id)
        else:
            run = f"Sync #{result.sync_run_id}"
        if not counts:
            warnings = " with warnings" if level == messages.WARNING else ""
            of = f" of connection {result.connection}" if result.connection else ""
            return format_html("{}{} finished{}.", run, of, warnings), level
        of = f" of connection {result.connection}" if result.connection else ""
        message = format_html("{}{} finished: {}; {}.", run, of, result.scope, result.outcome)
        if missing and runs:
            message = format_html(
                "{} Values not read for {} (their stored values were kept): {}",
                message,
                ", ".join(missing),
                "; ".join(f"{account}: {reason}" for account, reason in missing.items()),
            )
        elif missing:
            message = format_html("{} Some accounts' values were not read.", message)
        # Said as `sync_ibkr` says it: an account the source reported and the sync did not
        # write (a newer report of it stands); else "0 positions in 0 account(s)" misleads.
        # Each reason is a sentence naming its account.
        if refused and runs:
            message = format_html("{} {}", message, " ".join(refused.values()))
        elif refused:
            message = format_html("{} Some accounts were not written.", message)
        return message, level

    def _back_to(self, request: HttpRequest) -> str:
        """The page the form was posted from, if it is one of ours; else the run history."""
        target = request.POST.get("next", "")
        if target and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return target
        return reverse("admin:ibkr_sync_syncrun_changelist")
