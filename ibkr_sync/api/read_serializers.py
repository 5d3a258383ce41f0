"""The read API's serializers: what each endpoint answers, and the query parameters it
takes (checked: a bad value is a 400 naming the parameter)."""

import datetime as dt
import re
from dataclasses import dataclass

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers
from rest_framework.fields import empty

from .. import conf
from ..models import (
    MONEY_DIGITS,
    QUANTITY_DIGITS,
    SNAPSHOT_TOTALS,
    CashKind,
    PositionChange,
    SecType,
)
from .explanations import TRADES_PER_CHANGE, ChangeStory
from .fields import ExactDecimalField, ExactDecimalModelSerializer
from .holdings import holding

# The models the sync writes, whichever the IBKR_SYNC_*_MODEL settings name (ours from the
# portfolio app, or a host's own): the serializers are bound to them when the URLs load.
Account = conf.account_model()
Instrument = conf.instrument_model()
Position = conf.position_model()
CashBalance = conf.cash_balance_model()
AccountSnapshot = conf.account_snapshot_model()


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


_WHEN = (
    "A trade counts at its execution's moment (traded_at), or without one at the end of "
    "its trade_date (23:59:59 US Eastern, the zone of IBKR's statements)."
)


class ChangeTradeSerializer(serializers.Serializer):
    """A trade of the ledger, as part of a position's change."""

    external_id = serializers.CharField(read_only=True, help_text="IBKR's transactionID.")
    trade_date = serializers.DateField(read_only=True, allow_null=True)
    traded_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="The execution's moment, if IBKR gave it."
    )
    buy_sell = serializers.CharField(read_only=True, help_text="BUY or SELL, as IBKR says.")
    quantity = ExactDecimalField(
        read_only=True,
        allow_null=True,
        help_text="Signed: negative for a sale.",
        **QUANTITY_DIGITS,
    )
    price = ExactDecimalField(
        read_only=True, allow_null=True, help_text="Per unit, in currency.", **MONEY_DIGITS
    )
    currency = serializers.CharField(read_only=True, help_text="The trade's currency.")


class HoldingChangeSerializer(serializers.Serializer):
    """The change-log entry that set a position's state at as_of, and the ledger's trades
    that explain it."""

    kind = serializers.ChoiceField(
        source="change.kind",
        choices=PositionChange.Kind.choices,
        read_only=True,
        help_text="What the sync did to the position.",
    )
    quantity_before = ExactDecimalField(
        source="change.quantity_before",
        read_only=True,
        allow_null=True,
        help_text="Null when it was not held before (created, reopened).",
        **QUANTITY_DIGITS,
    )
    quantity_after = ExactDecimalField(
        source="change.quantity_after",
        read_only=True,
        allow_null=True,
        help_text="Null when it was not held after (closed).",
        **QUANTITY_DIGITS,
    )
    at = serializers.DateTimeField(
        source="change.at",
        read_only=True,
        help_text="When it took effect (the finish of its sync): the position's since.",
    )
    trades = ChangeTradeSerializer(
        many=True,
        read_only=True,
        allow_null=True,
        help_text="The ledger's trades of the position's account and instrument, not "
        "cancelled (IBKR's own cancellation rows, the quantity reversed, are listed: an "
        "execution and its cancellation add up to nothing), after the position's previous "
        "recorded change (ever before, for its first) and at or before this one, each "
        "taken when its sync read the positions (a Flex sync: at its statement's end, "
        "23:59:59 US Eastern of its last day); oldest "
        f"first, at most {TRADES_PER_CHANGE}. "
        + _WHEN
        + " Null when the user may not view trades, or the project keeps no ledger of "
        "trades.",
    )
    trades_truncated = serializers.BooleanField(
        read_only=True,
        help_text=f"More than {TRADES_PER_CHANGE} trades: only the first are listed "
        "(explained counts them all).",
    )
    explained = serializers.BooleanField(
        read_only=True,
        allow_null=True,
        help_text="True when those trades' quantities add up exactly to quantity_after "
        "- quantity_before (null counting as zero); false when they do not (the ledger "
        "lacks trades, or a corporate action changed the quantity). Null with trades.",
    )


class PositionAsOfSerializer(ExactDecimalModelSerializer):
    """A position as it was held at a past moment: rebuilt from the change log, so only
    what the log records (no market values, which it does not)."""

    account = serializers.CharField(
        source="account.external_id", read_only=True, help_text="The broker's account id."
    )
    broker = serializers.CharField(source="account.broker", read_only=True)
    instrument = InstrumentSerializer(read_only=True)
    quantity = ExactDecimalField(
        source="holding.quantity",
        read_only=True,
        help_text="Signed; negative is short. As held at as_of.",
        **QUANTITY_DIGITS,
    )
    average_cost = ExactDecimalField(
        source="holding.average_cost",
        read_only=True,
        allow_null=True,
        help_text="As the broker reported it then; null if it reported none.",
        **MONEY_DIGITS,
    )
    cost_basis = ExactDecimalField(
        source="holding.cost_basis",
        read_only=True,
        allow_null=True,
        help_text="quantity x average cost, to 10 decimal places as a sync stores it.",
        **MONEY_DIGITS,
    )
    since = serializers.DateTimeField(
        source="holding.since",
        read_only=True,
        allow_null=True,
        help_text="When this quantity and cost took effect: the finish of the sync that "
        "recorded them. Null for a position older than the change log that had not "
        "changed by as_of.",
    )
    change = HoldingChangeSerializer(
        source="change_story",
        read_only=True,
        allow_null=True,
        help_text="The recorded change that set this state (at = since), with the trades "
        "that explain it; null when since is null.",
    )

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
            "since",
            "change",
        ]
        read_only_fields = fields

    def to_representation(self, position: Position) -> dict:
        # The view sets both for a whole page (`explanations.explain_changes`: one query
        # for its trades); one position on its own tells its change without them.
        if not hasattr(position, "holding"):
            position.holding = holding(position)
        if not hasattr(position, "change_story"):
            change = position.holding.change
            position.change_story = None if change is None else ChangeStory(change)
        return super().to_representation(position)


class _Page(serializers.Serializer):
    next = serializers.URLField(
        allow_null=True, help_text="The next page; null on the last. Follow it as it is."
    )
    previous = serializers.URLField(allow_null=True, help_text="The previous page, if any.")


@extend_schema_serializer(component_name="PaginatedPositionList")
class PositionPageSerializer(_Page):
    """The positions as they are now (documents `GET /portfolio/positions`)."""

    results = PositionSerializer(many=True)


@extend_schema_serializer(component_name="PaginatedPositionAsOfList")
class PositionAsOfPageSerializer(_Page):
    """The positions held at `as_of` (documents `GET /portfolio/positions?as_of=`)."""

    as_of = serializers.DateTimeField(help_text="The moment answered, as read.")
    complete = serializers.BooleanField(
        help_text="False when as_of is before the change log begins and some positions "
        "(of those the filters select) are older than the log: what they held then "
        "cannot be told, and they are not listed. True otherwise."
    )
    results = PositionAsOfSerializer(many=True)


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
        help_text="amount x exchange_rate, every digit of the product: the amount in "
        "base_currency at IBKR's own rate; null without a rate that converts (none, zero "
        "or negative) or without the currency it converts to.",
    )
    # The rate's own currency, read with it: never the account's, which may have changed
    # since (IBKR switched the base currency while this row was kept).
    base_currency = serializers.CharField(
        source="rate_currency",
        read_only=True,
        help_text="The currency exchange_rate converts to and base_amount is in, as IBKR "
        "reported it with the rate (the base currency of that read); empty if none.",
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
                "help_text": "To base_currency, as IBKR reports it; null if IBKR reported "
                "none. Only a positive rate converts."
            },
            "synced_at": {"help_text": "When a sync last read this balance."},
        }


# --- points in time in the query string ---------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """A point in time as the caller wrote it: `start`, aware; for a plain date, the whole
    day, up to `end` (the next day's start, excluded; None past 9999-12-31)."""

    start: dt.datetime
    end: dt.datetime | None
    is_date: bool


_ISO_EXAMPLES = "e.g. 2026-11-20T09:30:00Z, 2026-11-20T10:30:00+01:00"


class MomentField(serializers.CharField):
    """An ISO 8601 date-time in the query string; with `dates`, a plain date too.

    A date-time with an offset (`Z`, `+01:00`) is that instant. One without an offset, and
    a plain date, are read in the server's time zone (the TIME_ZONE setting), as Django
    reads naive times: a date is that whole day there, from its midnight to the next.
    The value is a `Moment`, in UTC.
    """

    def __init__(self, *, dates: bool, **kwargs) -> None:
        kwargs.setdefault("max_length", 64)
        super().__init__(**kwargs)
        self.dates = dates

    def run_validation(self, data=empty) -> Moment:
        text = super().run_validation(data)  # a string: length, NUL characters
        try:
            return self.parse(text)
        except OverflowError:
            raise serializers.ValidationError(
                f"{text!r} is out of range: in UTC it is before year 1 or after year 9999."
            ) from None

    def parse(self, text: str) -> Moment:
        zone = timezone.get_current_timezone()
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            day = None
        if day is not None:
            if not self.dates:
                raise serializers.ValidationError(
                    f"{text!r} is a date; give a date-time, {_ISO_EXAMPLES}."
                )
            start = dt.datetime.combine(day, dt.time.min, tzinfo=zone)
            try:
                end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time.min, tzinfo=zone)
            except OverflowError:  # 9999-12-31: to the end of time
                end = None
            return Moment(start.astimezone(dt.UTC), end and end.astimezone(dt.UTC), True)
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            hint = (
                " A + in a query string means a space: write the offset's + as %2B."
                if " " in text
                else ""
            )
            kinds = "a date or date-time" if self.dates else "a date-time"
            raise serializers.ValidationError(
                f"{text!r} is not {kinds} in ISO 8601, "
                f"{'e.g. 2026-11-20, ' if self.dates else ''}{_ISO_EXAMPLES}.{hint}"
            ) from None
        if timezone.is_naive(moment):
            moment = moment.replace(tzinfo=zone)
        moment = moment.astimezone(dt.UTC)
        return Moment(moment, moment, False)


@extend_schema_field(
    {
        "type": "string",
        "example": "2026-11-20",
        "description": "ISO 8601 date or date-time.",
    }
)
class DateOrDateTimeField(MomentField):
    def __init__(self, **kwargs) -> None:
        super().__init__(dates=True, **kwargs)


@extend_schema_field({"type": "string", "format": "date-time"})
class DateTimeQueryField(MomentField):
    def __init__(self, **kwargs) -> None:
        super().__init__(dates=False, **kwargs)


# --- filters ------------------------------------------------------------------------------


_CURRENCY = re.compile(r"^[A-Z]{3}$")


def _currency(value: str) -> str:
    """A code in the one form the sync stores (`mapping.currency_code`): three ASCII
    letters, in any case. Checked before upper-casing: a dotless i or a sharp s is no
    letter of a code, though its upper case is."""
    value = value.strip()
    value = value.upper() if value.isascii() else value
    if not _CURRENCY.fullmatch(value):
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
    as_of = DateTimeQueryField(
        required=False,
        help_text="A past moment (ISO 8601 date-time; without an offset, in the server's "
        "time zone): the positions held then, rebuilt from the sync's change log, with "
        "the quantity and average cost they had. Not with status.",
    )

    def validate_account(self, value: str) -> str:
        return value.strip()

    def validate_as_of(self, value: Moment) -> Moment:
        now = timezone.now()
        if value.start > now:
            raise serializers.ValidationError(
                f"{self.initial_data['as_of']!r} is in the future (it is now "
                f"{now:%Y-%m-%dT%H:%M:%SZ}): the change log tells only the past."
            )
        return value

    def validate(self, attrs: dict) -> dict:
        if "as_of" in attrs and "status" in attrs:
            raise serializers.ValidationError(
                "status cannot be combined with as_of: as_of lists what was held then."
            )
        return attrs

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


# --- an account's history -----------------------------------------------------------------


class CashFlowSerializer(serializers.Serializer):
    """The cash transactions of one kind and currency between two points of a history."""

    kind = serializers.ChoiceField(choices=CashKind.choices, read_only=True)
    currency = serializers.CharField(read_only=True)
    amount = ExactDecimalField(
        read_only=True,
        help_text="Their amounts' exact sum, signed as IBKR signs them. In currency.",
        **MONEY_DIGITS,
    )
    count = serializers.IntegerField(read_only=True, help_text="How many transactions.")


class AccountSnapshotSerializer(ExactDecimalModelSerializer):
    account = serializers.CharField(
        source="account.external_id", read_only=True, help_text="The broker's account id."
    )
    broker = serializers.CharField(source="account.broker", read_only=True)
    sync_run = serializers.IntegerField(
        source="sync_run_id",
        read_only=True,
        allow_null=True,
        help_text="The id of the sync run that read these values.",
    )
    cash_flows = CashFlowSerializer(
        many=True,
        read_only=True,
        allow_null=True,
        help_text="The account's cash transactions (deposits, dividends, taxes, interest, "
        "fees ...) after its previous snapshot (whatever the page or the bounds) and at "
        "or before taken_at, summed per kind and currency, ordered by kind then currency. "
        "A transaction has a date only: it counts at the end of that day, 23:59:59 US "
        "Eastern (the zone of IBKR's statements, and the moment of a Flex day's value). "
        "Null for the account's first snapshot, and when the user may not view cash "
        "transactions or the project keeps no ledger of them.",
    )

    class Meta:
        model = AccountSnapshot
        fields = [
            "id",
            "broker",
            "account",
            "taken_at",
            "currency",
            "net_liquidation",
            "total_cash_value",
            "gross_position_value",
            "unrealized_pnl",
            "realized_pnl",
            "available_funds",
            "buying_power",
            "sync_run",
            "cash_flows",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "taken_at": {"help_text": "When the sync read these values."},
            **{
                name: {"help_text": f"IBKR's {tag}, in the base currency; null if none."}
                for name, tag in SNAPSHOT_TOTALS.items()
            },
        }


class HistoryFilterSerializer(serializers.Serializer):
    """The query of `GET /portfolio/accounts/<external_id>/history`: `from` and `to`,
    both optional, both included. A date-time without an offset, and a date, are read
    in the server's time zone; a date `from` starts at that day's midnight, a date `to`
    includes that whole day."""

    def get_fields(self) -> dict[str, serializers.Field]:
        # `from` is a Python keyword: the fields are named here, not as attributes.
        return {
            "from": DateOrDateTimeField(
                required=False,
                help_text="The first time included (ISO 8601 date or date-time); "
                "omitted: from the first snapshot.",
            ),
            "to": DateOrDateTimeField(
                required=False,
                help_text="The last time included (ISO 8601 date or date-time; a date "
                "includes that whole day); omitted: up to the last snapshot.",
            ),
        }

    def validate(self, attrs: dict) -> dict:
        start, end = attrs.get("from"), attrs.get("to")
        if start is not None and end is not None:
            after = (
                end.end is not None and start.start >= end.end
                if end.is_date
                else start.start > end.start
            )
            if after:
                raise serializers.ValidationError(
                    f"from ({self.initial_data['from']}) is after to "
                    f"({self.initial_data['to']}): nothing can be between them."
                )
        return attrs


# --- the ledger ---------------------------------------------------------------------------
#
# The ledger's models are optional (IBKR_SYNC_TRADE_MODEL ... None keeps none), so these
# serializers name their fields themselves rather than binding to a model that may not
# exist; they read any model built on the abstract bases.


def _exact(help_text: str, digits: dict = MONEY_DIGITS) -> ExactDecimalField:
    return ExactDecimalField(read_only=True, allow_null=True, help_text=help_text, **digits)


class _LedgerRowSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    broker = serializers.CharField(read_only=True)
    account = serializers.CharField(
        source="account.external_id", read_only=True, help_text="The broker's account id."
    )
    external_id = serializers.CharField(
        read_only=True,
        help_text="IBKR's transactionID of the row (or, where the Flex query has no "
        "Transaction ID column, `~` and a digest of the row's attributes).",
    )
    instrument = InstrumentSerializer(
        read_only=True,
        allow_null=True,
        help_text="The contract, as in a position; null when IBKR named none.",
    )


class TradeSerializer(_LedgerRowSerializer):
    """One execution, signed as IBKR signs it."""

    trade_date = serializers.DateField(read_only=True, allow_null=True)
    traded_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="The execution's moment, if IBKR gave it."
    )
    settle_date = serializers.DateField(read_only=True, allow_null=True)
    buy_sell = serializers.CharField(read_only=True, help_text="BUY or SELL, as IBKR says.")
    quantity = _exact("Signed: negative for a sale.", QUANTITY_DIGITS)
    price = _exact("Per unit, in currency.")
    proceeds = _exact("Signed: a purchase's are negative. In currency.")
    commission = _exact("Signed: a commission paid is negative. In commission_currency.")
    commission_currency = serializers.CharField(read_only=True)
    currency = serializers.CharField(read_only=True, help_text="The trade's currency.")
    realized_pnl = _exact("As IBKR reports it (FIFO), in currency.")
    fx_rate_to_base = _exact("IBKR's rate from currency to the account's base currency.")
    cancelled = serializers.BooleanField(
        read_only=True, help_text="IBKR cancelled it: marked, never deleted."
    )


class CashTransactionSerializer(_LedgerRowSerializer):
    """One cash transaction (a dividend, a tax withheld, interest, a fee, a deposit ...)."""

    kind = serializers.ChoiceField(choices=CashKind.choices, read_only=True)
    type = serializers.CharField(read_only=True, help_text="IBKR's own type, as it wrote it.")
    date = serializers.DateField(read_only=True, allow_null=True)
    amount = _exact("Signed as IBKR signs it (a reversal keeps its sign). In currency.")
    currency = serializers.CharField(read_only=True)
    description = serializers.CharField(read_only=True)
    fx_rate_to_base = _exact("IBKR's rate from currency to the account's base currency.")
    dividend_external_id = serializers.CharField(
        read_only=True,
        help_text="A withholding tax: the external_id of the dividend (or payment in lieu) "
        "it was withheld from, where IBKR's ids tie them; empty otherwise.",
    )


@extend_schema_field({"type": "string", "format": "date", "example": "2026-03-13"})
class QueryDateField(serializers.CharField):
    """A calendar date in the query string, YYYY-MM-DD; anything else is named in a 400."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("max_length", 32)
        super().__init__(**kwargs)

    def run_validation(self, data=empty) -> dt.date:
        text = super().run_validation(data)
        try:
            return dt.date.fromisoformat(text) if len(text) == 10 else _not_a_date(text)
        except ValueError:
            return _not_a_date(text)


def _not_a_date(text: str):
    raise serializers.ValidationError(f"{text!r} is not a date; use YYYY-MM-DD, e.g. 2026-03-13.")


class LedgerFilterSerializer(serializers.Serializer):
    """The filters of the ledger's lists; all optional, combined with AND."""

    account = serializers.CharField(
        required=False, max_length=32, help_text="The broker's account id, e.g. U1234567."
    )
    currency = serializers.CharField(
        required=False, max_length=8, help_text="ISO currency code of the row, e.g. EUR."
    )
    symbol = serializers.CharField(
        required=False,
        max_length=64,
        help_text="Case-insensitive part of the instrument's symbol or local symbol.",
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        # `from` is a Python keyword: the bounds are named here, not as attributes.
        return {
            **super().get_fields(),
            "from": QueryDateField(
                required=False, help_text="The first day included (YYYY-MM-DD)."
            ),
            "to": QueryDateField(required=False, help_text="The last day included (YYYY-MM-DD)."),
        }

    def validate_account(self, value: str) -> str:
        return value.strip()

    def validate_currency(self, value: str) -> str:
        return _currency(value)

    def validate_symbol(self, value: str) -> str:
        return value.strip()

    def validate(self, attrs: dict) -> dict:
        start, end = attrs.get("from"), attrs.get("to")
        if start is not None and end is not None and start > end:
            raise serializers.ValidationError(
                f"from ({start}) is after to ({end}): no day is between them."
            )
        return attrs


class CashTransactionFilterSerializer(LedgerFilterSerializer):
    """The filters of `GET /portfolio/cash-transactions`; all optional, combined with AND."""

    kind = serializers.ChoiceField(
        required=False,
        choices=CashKind.values,
        help_text="The kind of transaction.",
        error_messages={
            "invalid_choice": "{input!r} is not a kind of cash transaction; use one of "
            + ", ".join(CashKind.values)
            + "."
        },
    )
