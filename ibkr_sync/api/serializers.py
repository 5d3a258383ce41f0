from typing import Any

from django.core.validators import ProhibitNullCharactersValidator
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from ..exceptions import InvalidAccountId
from ..mapping import normalize_account_id
from ..models import WORKER_SILENT_AFTER, PositionChange, SyncRun
from ..permissions import Kind, may_view
from .fields import ExactDecimalField


class SyncRequestSerializer(serializers.Serializer):
    """The sync endpoint's query: at most one `ibkr_account_id`, never blank."""

    REPEATED = (
        "ibkr_account_id was given more than once; give one account id, or none to sync "
        "every account."
    )

    ibkr_account_id = serializers.CharField(
        required=False,
        allow_blank=False,
        max_length=32,
        error_messages={
            "blank": "ibkr_account_id is empty: give an IBKR account id such as U1234567, "
            "or leave the parameter out to sync every account.",
            "max_length": "ibkr_account_id is longer than {max_length} characters: it is not "
            "an IBKR account id (e.g. U1234567).",
        },
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A NUL character is refused below like any other malformed id, with the message
        # that says what an account id looks like.
        field = self.fields["ibkr_account_id"]
        field.validators = [
            v for v in field.validators if not isinstance(v, ProhibitNullCharactersValidator)
        ]

    def to_internal_value(self, data):
        if hasattr(data, "getlist"):  # a QueryDict: the query string as it came
            if len(data.getlist("ibkr_account_id")) > 1:
                raise serializers.ValidationError({"ibkr_account_id": [self.REPEATED]})
            # A plain dict: DRF treats a blank form/query value of an optional field as
            # omitted, which would turn `?ibkr_account_id=` into "sync every account".
            data = data.dict()
        return super().to_internal_value(data)

    def validate_ibkr_account_id(self, value: str) -> str:
        try:
            return normalize_account_id(value)
        except InvalidAccountId as exc:
            raise serializers.ValidationError(str(exc)) from None


class SyncErrorSerializer(serializers.Serializer):
    account = serializers.CharField()
    con_id = serializers.IntegerField(allow_null=True)
    symbol = serializers.CharField(allow_blank=True)
    sec_type = serializers.CharField(allow_blank=True)
    reason = serializers.CharField()


class PositionChangeSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=PositionChange.Kind.choices)
    account = serializers.CharField()
    con_id = serializers.IntegerField()
    symbol = serializers.CharField()
    quantity_before = ExactDecimalField(max_digits=30, decimal_places=10, allow_null=True)
    quantity_after = ExactDecimalField(max_digits=30, decimal_places=10, allow_null=True)
    average_cost_before = ExactDecimalField(max_digits=30, decimal_places=10, allow_null=True)
    average_cost_after = ExactDecimalField(max_digits=30, decimal_places=10, allow_null=True)


class AccountValuesSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["read", "missing"])
    reason = serializers.CharField(required=False, help_text="Missing: why.")
    base_currency = serializers.CharField(required=False, allow_blank=True)
    positions_valued = serializers.IntegerField(
        required=False, help_text="Positions whose market value and P&L were stored."
    )
    positions_stale = serializers.IntegerField(
        required=False,
        help_text="Positions traded between the two reads: their values were kept.",
    )
    positions_unvalued = serializers.IntegerField(
        required=False,
        help_text="Positions IBKR sent no portfolio row for: their values were kept.",
    )
    cash_currencies = serializers.ListField(child=serializers.CharField(), required=False)
    cash_reported = serializers.BooleanField(
        required=False,
        help_text="False: the values carried no cash balance, so the stored cash was kept.",
    )
    cash_kept_reason = serializers.CharField(
        required=False,
        help_text="Present when this download's cash could not be trusted whole (no "
        "balance per currency, or one unset, unstorable or under a non-code): why. The "
        "stored cash was kept exactly as it was.",
    )


class ConstantField(serializers.ChoiceField):
    """A read-only field that always says `value`: documented as a one-value enum."""

    def __init__(self, value: str, **kwargs) -> None:
        self.value = value
        super().__init__(choices=[value], read_only=True, **kwargs)

    def get_attribute(self, instance) -> str:
        return self.value


class SyncQueuedSerializer(serializers.Serializer):
    """A sync handed to the task queue (IBKR_SYNC_TASK_QUEUE): the API's 202 answer."""

    status = ConstantField(
        "queued",
        help_text="Queued for a worker: its run (`url`, also the Location header) goes "
        "queued, running, then success or failed.",
    )
    sync_run_id = serializers.IntegerField(help_text="The run: GET /portfolio/sync/runs/<id>.")
    connection = serializers.CharField(
        allow_null=True, help_text="The connection to sync; null for the settings' gateway."
    )
    url = serializers.URLField(help_text="The run's URL, where its outcome will be.")


class SyncResultSerializer(serializers.Serializer):
    """A sync's result: the API's answer and `sync_ibkr --json`'s output, one shape."""

    status = ConstantField(
        "success", help_text="Always success: a failure answers the error shape instead."
    )
    sync_run_id = serializers.IntegerField(
        allow_null=True, help_text="The SyncRun recording it; null for a dry run."
    )
    dry_run = serializers.BooleanField(
        help_text="True: nothing was written; the counts say what a sync would change."
    )
    connection = serializers.SerializerMethodField(
        help_text="The connection synced (its name); null for the settings' gateway "
        "(IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID), synced when no connection is configured."
    )
    accounts = serializers.ListField(child=serializers.CharField())
    processed = serializers.IntegerField()
    created = serializers.IntegerField()
    updated = serializers.IntegerField()
    unchanged = serializers.IntegerField()
    reopened = serializers.IntegerField()
    closed = serializers.IntegerField()
    errors = SyncErrorSerializer(
        many=True,
        allow_null=True,
        help_text="The records that could not be stored, each with its reason: position "
        "data, so null in the API's answer to a user who may not view positions (the "
        "counts still say how many).",
    )
    by_account = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField())
    )
    account_values = serializers.DictField(
        child=AccountValuesSerializer(),
        allow_null=True,
        help_text="Per account: whether its values (cash, net liquidation, P&L, market "
        "values) were read, or why not (its stored values were kept); null when the sync "
        "does not read values (IBKR_READ_VALUES=false).",
    )
    accounts_refused = serializers.DictField(
        child=serializers.CharField(),
        help_text="Accounts the connection reported but this sync did not write, with the "
        "reason: a newer snapshot of them (from another connection) was applied already, "
        "or this connection may not write them (the answer does not say whose they are). "
        "Empty when none.",
    )
    ledger = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField()),
        help_text="The ledger rows of the statement, by kind (trades, cash_transactions, "
        "corporate_actions): how many were created, updated (IBKR corrected them) and "
        "unchanged. Empty when the source reads no ledger (TWS) or none is kept.",
    )
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField()

    def get_connection(self, result) -> str | None:
        return result.connection or None

    def to_representation(self, result) -> dict[str, Any]:
        data = super().to_representation(result)
        if result.changes is not None:  # a dry run: what a sync would change
            data["changes"] = PositionChangeSerializer(result.changes, many=True).data
        request = self.context.get("request")
        if request is not None and not may_view(request.user, Kind.POSITIONS):
            # Each names an account's record: position data, as on the run's own page.
            data["errors"] = None
            if "changes" in data:
                data["changes"] = None
        return data


def render_json(data: Any) -> str:
    """JSON text exactly as the API renders it, for output outside a request."""
    return JSONRenderer().render(data).decode()


class SyncRunSerializer(serializers.ModelSerializer):
    user = serializers.SerializerMethodField(help_text="Who started it; null for the command.")
    connection = serializers.SerializerMethodField(
        help_text="The connection synced (its name when it ran); null for the settings' gateway."
    )
    duration_seconds = serializers.SerializerMethodField()

    class Meta:
        model = SyncRun
        fields = [
            "id",
            "status",
            "trigger",
            "user",
            "connection",
            "account_filter",
            "accounts",
            "accounts_refused",
            "ledger",
            "processed",
            "created",
            "updated",
            "unchanged",
            "reopened",
            "closed",
            "errors",
            "error_code",
            "error_message",
            "started_at",
            "finished_at",
            "duration_seconds",
        ]
        read_only_fields = fields

    def get_connection(self, run: SyncRun) -> str | None:
        return run.connection_name or None

    def get_user(self, run: SyncRun) -> str | None:
        return None if run.user is None else run.user.get_username()

    def get_duration_seconds(self, run: SyncRun) -> float | None:
        duration = run.duration
        return None if duration is None else round(duration.total_seconds(), 3)


class SyncRunDetailSerializer(SyncRunSerializer):
    error_details = SyncErrorSerializer(
        many=True,
        read_only=True,
        allow_null=True,
        help_text="The records that could not be stored, each with its reason. Each names "
        "an account's record (a symbol, a contract id, a value), so it is position data: "
        "null for a user who may not view positions (`errors` still counts them).",
    )
    account_values = serializers.DictField(child=AccountValuesSerializer(), read_only=True)

    class Meta(SyncRunSerializer.Meta):
        fields = [*SyncRunSerializer.Meta.fields, "error_details", "account_values", "host"]
        read_only_fields = fields

    def to_representation(self, run: SyncRun) -> dict:
        data = super().to_representation(run)
        request = self.context.get("request")
        if request is None or not may_view(request.user, Kind.POSITIONS):
            data["error_details"] = None
        return data


class SyncRunFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(required=False, choices=SyncRun.Status.values)
    trigger = serializers.ChoiceField(required=False, choices=SyncRun.Trigger.values)


class HealthCheckSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "error", "unknown", "unreachable"])


class LastSyncCheckSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "stale", "failed", "never", "unknown"],
        help_text="failed: the latest sync failed; stale: the last success is older than "
        "max_age_seconds; never: no successful sync yet.",
    )
    last_success_at = serializers.DateTimeField(required=False)
    age_seconds = serializers.IntegerField(required=False)
    max_age_seconds = serializers.IntegerField(required=False)
    error_code = serializers.CharField(required=False, help_text="Why the latest sync failed.")


class SyncLockCheckSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "stuck", "abandoned", "unknown"],
        help_text="ok: free, or held by a sync for no longer than a sync can take. stuck: "
        "held longer, by a sync that still renews it. abandoned: held longer, renewed no "
        "more (the next sync releases it).",
    )
    held_seconds = serializers.IntegerField(required=False)
    limit_seconds = serializers.IntegerField(
        required=False,
        help_text="The longest a healthy sync holds the lock: a gateway's connect "
        "timeout + its request timeout (twice when values are read) + "
        "IBKR_SYNC_LOCK_TIMEOUT, each timeout the connection's own where it sets one, else "
        "the setting's (IBKR_CONNECT_TIMEOUT, IBKR_REQUEST_TIMEOUT); a Flex connection's: "
        "IBKR_FLEX_CONNECT_TIMEOUT + IBKR_FLEX_POLL_BUDGET + twice IBKR_FLEX_READ_TIMEOUT "
        "+ IBKR_SYNC_LOCK_TIMEOUT.",
    )


class ConnectionLastSyncSerializer(LastSyncCheckSerializer):
    status = serializers.ChoiceField(
        choices=["ok", "stale", "failed", "unreachable", "logged_out", "never"],
        help_text="As `checks.last_sync`, and a latest sync that failed because the "
        "gateway could not be reached (refused, no answer, not a gateway, no answer in "
        "time) is `unreachable`; because it is not logged in to IBKR (it manages no "
        "account) or lost its link to IBKR's servers, `logged_out`. `last_success_at` "
        "and `age_seconds`: when it was last fine.",
    )


class ConnectionHealthSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="The connection's id.")
    name = serializers.CharField(
        required=False,
        help_text="Only to a staff user, logged in to the admin, who may view sync runs.",
    )
    enabled = serializers.BooleanField()
    status = serializers.ChoiceField(
        choices=["ok", "unhealthy", "disabled"],
        help_text="ok when each of its checks is; a disabled connection counts for nothing.",
    )
    last_sync = ConnectionLastSyncSerializer()
    sync_lock = SyncLockCheckSerializer(help_text="Its own lock, with its own timeouts.")
    gateway = HealthCheckSerializer(
        required=False, help_text="Only with ?gateway=1, for an enabled connection."
    )


class QueueCheckSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "broker_unreachable", "no_worker", "backlog"],
        help_text="broker_unreachable: the broker did not accept a connection; no_worker: "
        f"no worker said it was alive in the last {int(WORKER_SILENT_AFTER)} seconds; "
        "backlog: a sync has been queued longer than max_queued_seconds.",
    )
    # Text, not a choice: an enum named after a field called `broker` would collide with
    # the models' broker in a host's schema (drf-spectacular names enums by field name).
    broker = serializers.CharField(help_text="ok, or unreachable.")
    workers = serializers.IntegerField(
        required=False,
        help_text=f"Workers seen alive in the last {int(WORKER_SILENT_AFTER)} seconds.",
    )
    worker_seen_seconds = serializers.IntegerField(
        required=False, help_text="Since a worker last said it was alive; absent: never."
    )
    oldest_queued_seconds = serializers.IntegerField(
        required=False, help_text="The oldest queued sync's wait; absent: none is queued."
    )
    max_queued_seconds = serializers.IntegerField(help_text="IBKR_SYNC_STALE_AFTER.")


class HealthChecksSerializer(serializers.Serializer):
    database = HealthCheckSerializer()
    last_sync = LastSyncCheckSerializer()
    sync_lock = SyncLockCheckSerializer()
    gateway = HealthCheckSerializer(required=False, help_text="Only with ?gateway=1.")
    queue = QueueCheckSerializer(
        required=False, help_text="Only with a task queue (IBKR_SYNC_TASK_QUEUE)."
    )


class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unhealthy"])
    checks = HealthChecksSerializer()
    connections = ConnectionHealthSerializer(
        many=True,
        required=False,
        help_text="Each connection, in name order; left out when there is none (the "
        "settings' gateway is the one checked).",
    )
