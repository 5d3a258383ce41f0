import re

from rest_framework import serializers

from ibkr_sync.api.fields import ExactDecimalField, ExactDecimalModelSerializer

from ..models import Account, CashBalance, Instrument, Position, SecType


class AccountSerializer(serializers.ModelSerializer):
    open_positions = serializers.IntegerField(read_only=True, help_text="Positions now open.")

    class Meta:
        model = Account
        fields = [
            "id",
            "broker",
            "external_id",
            "name",
            "base_currency",
            "is_paper",
            "last_synced_at",
            "open_positions",
        ]
        read_only_fields = fields


class InstrumentSerializer(ExactDecimalModelSerializer):
    class Meta:
        model = Instrument
        fields = [
            "id",
            "broker",
            "external_id",
            "symbol",
            "sec_type",
            "currency",
            "exchange",
            "local_symbol",
            "trading_class",
            "multiplier",
            "expiry",
            "contract_month",
            "strike",
            "right",
            "description",
        ]
        read_only_fields = fields


class PositionSerializer(ExactDecimalModelSerializer):
    account = serializers.CharField(
        source="account.external_id", read_only=True, help_text="The broker's account id."
    )
    broker = serializers.CharField(source="account.broker", read_only=True)
    instrument = InstrumentSerializer(read_only=True)
    is_open = serializers.BooleanField(read_only=True)

    class Meta:
        model = Position
        fields = [
            "id",
            "broker",
            "account",
            "instrument",
            "quantity",
            "average_cost",
            "cost_basis",
            "is_open",
            "opened_at",
            "last_synced_at",
            "closed_at",
            "market_price",
            "market_value",
            "unrealized_pnl",
            "realized_pnl",
            "valued_at",
        ]
        read_only_fields = fields


class CashBalanceSerializer(ExactDecimalModelSerializer):
    account = serializers.CharField(
        source="account.external_id", read_only=True, help_text="The broker's account id."
    )
    broker = serializers.CharField(source="account.broker", read_only=True)
    base_amount = ExactDecimalField(
        read_only=True,
        allow_null=True,
        max_digits=None,
        decimal_places=None,
        help_text="amount x exchange_rate, every digit of the product: the amount in the "
        "account's base currency at IBKR's own rate; null when IBKR reported no rate.",
    )
    base_currency = serializers.CharField(
        source="account.base_currency",
        read_only=True,
        help_text="The account's base currency, which exchange_rate converts to; empty if "
        "not known yet.",
    )

    class Meta:
        model = CashBalance
        fields = [
            "id",
            "broker",
            "account",
            "currency",
            "amount",
            "exchange_rate",
            "base_amount",
            "base_currency",
            "synced_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "exchange_rate": {
                "help_text": "To the account's base currency, as IBKR reports it; null if "
                "IBKR reported none."
            },
            "synced_at": {"help_text": "When a sync last read this balance."},
        }


_CURRENCY = re.compile(r"^[A-Z]{3}$")


def _currency(value: str) -> str:
    value = value.strip().upper()
    if not _CURRENCY.match(value):
        raise serializers.ValidationError(
            f"{value!r} is not a currency code; use three letters, e.g. USD."
        )
    return value


class PositionFilterSerializer(serializers.Serializer):
    """The filters of `GET /portfolio/positions`; all optional, combined with AND."""

    account = serializers.CharField(
        required=False, max_length=32, help_text="The broker's account id, e.g. U1234567."
    )
    sec_type = serializers.CharField(
        required=False,
        max_length=16,
        help_text=f"Security type, one of {', '.join(SecType.values)} (any case).",
    )
    currency = serializers.CharField(
        required=False, max_length=8, help_text="ISO currency code, e.g. USD (any case)."
    )
    status = serializers.ChoiceField(
        required=False,
        choices=["open", "closed"],
        help_text="open: still held; closed: no longer reported. Omitted: both.",
    )
    symbol = serializers.CharField(
        required=False,
        max_length=64,
        help_text="Case-insensitive part of the symbol or local symbol, e.g. aap.",
    )

    def validate_account(self, value: str) -> str:
        return value.strip()

    def validate_sec_type(self, value: str) -> str:
        value = value.strip().upper()
        if value not in SecType.values:
            raise serializers.ValidationError(
                f"{value!r} is not a security type; use one of {', '.join(SecType.values)}."
            )
        return value

    def validate_currency(self, value: str) -> str:
        return _currency(value)

    def validate_symbol(self, value: str) -> str:
        return value.strip()


class CashFilterSerializer(serializers.Serializer):
    """The filters of `GET /portfolio/cash`; all optional, combined with AND."""

    account = serializers.CharField(
        required=False, max_length=32, help_text="The broker's account id, e.g. U1234567."
    )
    currency = serializers.CharField(
        required=False, max_length=8, help_text="ISO currency code, e.g. EUR (any case)."
    )

    def validate_account(self, value: str) -> str:
        return value.strip()

    def validate_currency(self, value: str) -> str:
        return _currency(value)
