from rest_framework import serializers

from ..exceptions import InvalidAccountId
from ..mapping import normalize_account_id


class SyncRequestSerializer(serializers.Serializer):
    ibkr_account_id = serializers.CharField(required=False, allow_blank=False, max_length=32)

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


class SyncResultSerializer(serializers.Serializer):
    status = serializers.SerializerMethodField()
    sync_run_id = serializers.IntegerField()
    accounts = serializers.ListField(child=serializers.CharField())
    processed = serializers.IntegerField()
    created = serializers.IntegerField()
    updated = serializers.IntegerField()
    unchanged = serializers.IntegerField()
    reopened = serializers.IntegerField()
    closed = serializers.IntegerField()
    errors = SyncErrorSerializer(many=True)
    by_account = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField())
    )
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField()

    def get_status(self, _result) -> str:
        return "success"
