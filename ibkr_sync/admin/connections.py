"""The connections a sync reads, in the admin: their list, their form, and "Test
connection" (the handshake only: the server version and the accounts the gateway manages,
or the error a sync would fail with, in its words), on a connection's page and as an
action on the list. A thin edge over `services.check_connection`, as `manage.py
ibkr_connection test` is.

Seeing them needs `ibkr_sync.view_connection`, editing `change_connection`; a test also
needs `ibkr_sync.run_sync`: it connects to the gateway with the connection's client id,
as a sync does. A user sees (and edits, and tests) only the connections they may see
(`visibility`: their own, those without an owner; all with
`ibkr_sync.view_all_connections`), and only such a user assigns owners. An unowned
connection, whose data is everyone's, is changed and removed only by such a user too:
others see its page read-only (`has_change_permission`).
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import OuterRef, Subquery
from django.http import HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables

from .. import connections, schedules, selectors, visibility
from ..exceptions import IbkrSyncError, SyncAlreadyRunning
from ..health import failure_status
from ..models import Connection, SyncRun
from ..permissions import Kind, may_view
from ..services import check_connection
from .columns import when

RUN_SYNC = "ibkr_sync.run_sync"


def tested(connection: Connection) -> tuple[str, int]:
    """A connection's test, as the admin says it: its message and level."""
    try:
        check = check_connection(connection)
    except IbkrSyncError as exc:
        return f"Connection {connection.name}: {exc}", messages.ERROR
    message = f"Connection {connection.name} ({check.address}): ok: {check.summary}"
    if check.lacking:
        return f"{message}; lacking: {'; '.join(check.lacking)}", messages.WARNING
    return message, messages.SUCCESS


class ConnectionForm(forms.ModelForm):
    """A connection's form: a Flex token is entered in a password field, never shown
    again (nor rendered back), and kept as stored when the field is left empty."""

    new_flex_token = forms.CharField(
        label="Flex token",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="Flex only: the token of Client Portal's Flex Web Service page. Stored "
        "encrypted and never shown; leave empty to keep the stored one.",
    )

    class Meta:
        model = Connection
        fields = (
            "name", "kind", "enabled", "owner", "note", "host", "port", "client_id",
            "flex_query_id", "connect_timeout", "request_timeout", "values_timeout",
            "schedule", "schedule_every", "schedule_period", "schedule_crontab",
            "schedule_timezone", "schedule_enabled",
        )  # fmt: skip

    # The token typed, and the cleaned data that holds it: hidden from the error reports
    # Django mails (the frames' variables), should anything below fail.
    @sensitive_variables("cleaned", "token")
    def clean(self):
        cleaned = super().clean()
        token = cleaned.get("new_flex_token")
        if token:
            if cleaned.get("kind") != Connection.Kind.FLEX:
                self.add_error("new_flex_token", "A token is for a Flex Web Service connection.")
            else:
                try:
                    self.instance.set_flex_token(token)
                except ValidationError as exc:
                    self.add_error("new_flex_token", " ".join(exc.messages))
        elif cleaned.get("kind") == Connection.Kind.TWS and self.instance.flex_token:
            # Changed to a gateway: its Flex query and token go.
            self.instance.flex_token = ""
            if "flex_query_id" not in self.fields:
                self.instance.flex_query_id = ""
        return cleaned


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    form = ConnectionForm
    list_display = (
        "name", "kind", "enabled", "address", "client_id", "owner", "schedule_display",
        "last_sync",
    )  # fmt: skip
    list_display_links = ("name",)
    list_filter = ("enabled", "kind")
    list_select_related = ("owner",)
    search_fields = ("name", "host", "note")
    actions = ("test_connections",)
    autocomplete_fields = ()
    raw_id_fields = ("owner",)
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled", "owner", "note")}),
        ("Gateway", {
            "description": "TWS / IB Gateway only: the gateway this connection reads: its "
                           "host, its API port, and a client id no other tool uses on it.",
            "fields": ("host", "port", "client_id"),
        }),
        ("Flex Web Service", {
            "description": "Flex Web Service only: the Activity Flex Query's id and the "
                           "token (Client Portal: Performance & Reports > Flex Queries).",
            "fields": ("flex_query_id", "new_flex_token", "flex_token_state"),
        }),
        ("Schedule", {
            "description": "When the task queue syncs it unasked (IBKR_SYNC_TASK_QUEUE=celery "
                           "and a beat process). Fields left empty take the kind's default: "
                           "a gateway every 15 minutes on weekdays, Flex each morning after "
                           "a trading day (05:30 US Eastern).",
            "fields": ("schedule", ("schedule_every", "schedule_period"), "schedule_crontab",
                       "schedule_timezone", "schedule_enabled", "schedule_state"),
        }),
        ("Timeouts", {
            "classes": ("collapse",),
            "description": "Seconds; empty: the settings' (IBKR_CONNECT_TIMEOUT, "
                           "IBKR_REQUEST_TIMEOUT, IBKR_VALUES_TIMEOUT).",
            "fields": ("connect_timeout", "request_timeout", "values_timeout"),
        }),
    )  # fmt: skip
    change_form_template = "admin/ibkr_sync/connection/change_form.html"
    readonly_fields = ("flex_token_state", "schedule_state")

    @admin.display(description="schedule")
    def schedule_display(self, obj: Connection) -> str:
        return schedules.describe(obj)

    @admin.display(description="on the beat")
    def schedule_state(self, obj: Connection | None) -> str:
        """What the beat holds for it: its periodic task, enabled or not, when it last
        fired and how often."""
        if obj is None or obj.pk is None or not obj.schedule:
            return "-"
        if not schedules.beat_installed():
            return "django-celery-beat is not installed: the schedule is kept, not run."
        task = schedules.periodic_task(obj.pk)
        if task is None:
            return "not on the beat (save the connection again)"
        state = "enabled" if task.enabled else "paused"
        if task.last_run_at is None:
            return format_html("{}: {}; not fired yet", task.name, state)
        return format_html(
            "{}: {}; last fired {}, {} time(s)",
            task.name, state, when(task.last_run_at), task.total_run_count,
        )  # fmt: skip

    def has_change_permission(self, request: HttpRequest, obj: Connection | None = None) -> bool:
        # An unowned connection's data is everyone's: a user who could change where it
        # reads (its gateway's host and port, its Flex query and token) could point it at
        # a server of their own, which reports whatever positions and account ids it
        # likes, and write them into accounts everyone sees (or take unowned accounts).
        # Only a user who sees every connection changes one; others see it read-only.
        return super().has_change_permission(request, obj) and self._may_edit(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Connection | None = None) -> bool:
        # Removing an unowned connection takes its data out of everyone's sight: the same
        # rule as changing it.
        return super().has_delete_permission(request, obj) and self._may_edit(request, obj)

    @staticmethod
    def _may_edit(request: HttpRequest, obj: Connection | None) -> bool:
        """Whether the user may change or remove `obj` (None: the list, or a connection not
        named): their own, any with `view_all_connections`, an unowned one only then."""
        if obj is None or visibility.sees_all(request.user):
            return True
        return obj.owner_id is not None and obj.owner_id == request.user.pk

    def get_readonly_fields(self, request: HttpRequest, obj: Connection | None = None):
        # Who owns a connection decides who sees its data: only a user who sees every
        # connection's assigns owners (another could take an unowned connection's data,
        # or hand theirs on). A connection added by anyone else is theirs (`save_model`).
        fields = super().get_readonly_fields(request, obj)
        if not visibility.sees_all(request.user):
            fields = (*fields, "owner")
        return fields

    # The add and change pages: a request that fails (the database, the encryption) is
    # reported (Django's mail to ADMINS) without the token typed in it.
    @method_decorator(sensitive_post_parameters("new_flex_token"))
    def changeform_view(
        self, request: HttpRequest, object_id=None, form_url="", extra_context=None
    ):
        return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: Connection, form, change: bool) -> None:
        # A connection a user adds is theirs, unless they assign owners: unowned, its data
        # would be everyone's.
        if not change and not visibility.sees_all(request.user):
            obj.owner = request.user
        super().save_model(request, obj, form, change)

    @admin.display(description="stored Flex token")
    def flex_token_state(self, obj: Connection | None) -> str:
        return "set" if obj is not None and obj.has_flex_token else "not set"

    def get_fieldsets(self, request: HttpRequest, obj: Connection | None = None):
        # A connection's page shows its kind's fields; the add page both.
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.pk is None:
            return fieldsets
        hidden = "Gateway" if obj.is_flex else "Flex Web Service"
        return tuple(f for f in fieldsets if f[0] != hidden)

    class Media:
        css = {"all": ("ibkr_sync/admin.css",)}

    def get_queryset(self, request: HttpRequest):
        # Each connection's latest sync (a sync refused because another one was running
        # says nothing of the connection, as for /healthz), in the list's one query.
        latest = (
            SyncRun.objects.filter(connection=OuterRef("pk"))
            .exclude(error_code__in=selectors.NOT_A_FAILURE)
            .order_by("-pk")
        )
        # Only the connections the user may see (`visibility`): their own, unowned ones; all
        # with `view_all_connections`. Another owner's page answers as a removed one's.
        return visibility.visible_connections(request.user, super().get_queryset(request)).annotate(
            last_run_id=Subquery(latest.values("pk")[:1]),
            last_run_status=Subquery(latest.values("status")[:1]),
            last_run_error=Subquery(latest.values("error_code")[:1]),
            last_run_at=Subquery(latest.values("started_at")[:1]),
        )

    def get_list_display(self, request: HttpRequest):
        # A sync's outcome is sync run data.
        shown = super().get_list_display(request)
        if not may_view(request.user, Kind.SYNC_RUNS):
            shown = tuple(column for column in shown if column != "last_sync")
        return shown

    @admin.display(description="address", ordering="host")
    def address(self, obj: Connection) -> str:
        return obj.address

    @admin.display(description="last sync", ordering="last_run_at")
    def last_sync(self, obj: Connection) -> str:
        if getattr(obj, "last_run_id", None) is None:
            return "never"
        status = obj.last_run_status
        label = dict(SyncRun.Status.choices).get(status, status)
        if obj.last_run_error:
            label = f"{label} ({obj.last_run_error})"
        return format_html(
            '<a href="{}"><span class="ibkr-badge ibkr-badge-{}">{}</span></a> {}',
            reverse("admin:ibkr_sync_syncrun_change", args=[obj.last_run_id]),
            status,
            label,
            when(obj.last_run_at),
        )

    # --- Test connection ------------------------------------------------------------------

    def may_test(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request) and request.user.has_perm(RUN_SYNC)

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        # Removed one at a time, on its page (`delete_model`): each removal may be refused.
        actions.pop("delete_selected", None)
        if not self.may_test(request):
            actions.pop("test_connections", None)
        return actions

    def delete_model(self, request: HttpRequest, obj: Connection) -> None:
        """Removed as `manage.py ibkr_connection remove` removes it (`connections.remove`):
        never while a sync of it runs; its sync runs kept, with its name."""
        connections.remove(obj)

    def delete_view(self, request: HttpRequest, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except SyncAlreadyRunning as exc:  # nothing was removed (its transaction rolled back)
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(
                reverse("admin:ibkr_sync_connection_change", args=[object_id])
            )

    @admin.action(description="Test the selected connections (the handshake only)")
    def test_connections(self, request: HttpRequest, queryset) -> None:
        if not self.may_test(request):
            raise PermissionDenied
        for connection in queryset.order_by("name"):
            self.message_user(request, *tested(connection))

    def get_urls(self):
        # No request-wide transaction (ATOMIC_REQUESTS) around a wait on the gateway.
        test = transaction.non_atomic_requests(self.admin_site.admin_view(self.test_view))
        return [
            path("<path:object_id>/test/", test, name="ibkr_sync_connection_test"),
            *super().get_urls(),
        ]

    def test_view(self, request: HttpRequest, object_id: str):
        """The change page's "Test connection" button: the handshake, then back to the
        page with what the gateway said (or the error) as a message."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.may_test(request):
            raise PermissionDenied
        connection = get_object_or_404(self.get_queryset(request), pk=object_id)
        self.message_user(request, *tested(connection))
        return HttpResponseRedirect(
            reverse("admin:ibkr_sync_connection_change", args=[connection.pk])
        )

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "can_test": self.may_test(request)}
        if request.method == "GET":
            self._say_who_needs_a_login(request, self.get_queryset(request).filter(pk=object_id))
        return super().change_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request: HttpRequest, extra_context=None):
        if request.method == "GET":
            self._say_who_needs_a_login(request, self.get_queryset(request))
        return super().changelist_view(request, extra_context)

    def _say_who_needs_a_login(self, request: HttpRequest, queryset) -> None:
        """A warning for each connection the user sees (their own, to an owner) whose
        latest sync found its gateway logged out of IBKR: IB Gateway and TWS ask for a
        login (with two-factor) once a week, and no sync reads anything until then."""
        if not may_view(request.user, Kind.SYNC_RUNS):
            return
        failed = [
            row.last_run_id
            for row in queryset
            if row.last_run_id is not None and row.last_run_status == SyncRun.Status.FAILED
        ]
        for run in SyncRun.objects.filter(pk__in=failed).order_by("connection_name"):
            if failure_status(run) == "logged_out":
                self.message_user(
                    request,
                    f"Connection {run.connection_name}: its IB gateway is not logged in to "
                    f"IBKR (sync #{run.pk} failed so). Log in to TWS / IB Gateway again: "
                    "IBKR asks for a login once a week, and no sync reads anything until then.",
                    messages.WARNING,
                )
