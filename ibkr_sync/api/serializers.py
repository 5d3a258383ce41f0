from django.core.validators import ProhibitNullCharactersValidator
from rest_framework import serializers

from ..exceptions import InvalidAccountId
from ..mapping import normalize_account_id


class SyncRequestSerializer(serializers.Serializer):
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
