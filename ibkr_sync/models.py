"""What the sync writes: the abstract bases of the portfolio models, and the sync's own
audit trail (SyncRun, which doubles as the cross-process sync lock, and PositionChange).

The sync writes into whichever concrete models the settings name, as Django's auth does
with AUTH_USER_MODEL: IBKR_SYNC_ACCOUNT_MODEL, IBKR_SYNC_INSTRUMENT_MODEL,
IBKR_SYNC_POSITION_MODEL, IBKR_SYNC_CASH_BALANCE_MODEL and
IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL ("app_label.ModelName"; defaults: the `portfolio` app's),
and, for the ledger (optional), IBKR_SYNC_TRADE_MODEL, IBKR_SYNC_CASH_TRANSACTION_MODEL and
IBKR_SYNC_CORPORATE_ACTION_MODEL. A host
project subclasses the abstract bases below in an app of its own, may add fields of its
own (nullable or with a default: the sync never sets them), and names its models in the
settings; `portfolio` is built the same way. Every field and constraint the sync reads
or writes is here, so a subclass cannot miss one.
"""

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.views.decorators.debug import sensitive_variables

from .conf import model_setting
from .decimals import plain, product

# Wide enough for fractional shares and crypto (10 places) and for large notional values.
QUANTITY_DIGITS = {"max_digits": 30, "decimal_places": 10}
MONEY_DIGITS = {"max_digits": 30, "decimal_places": 10}
DECIMAL_PLACES = 10
DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_PLACES)


def is_rate(value: Decimal | None) -> bool:
    """Whether `value` converts an amount: a positive, finite number. A rate of 0 or a
    negative one (or none) is no rate: an amount in its currency is shown, not added."""
    return isinstance(value, Decimal) and value.is_finite() and value > 0


class Broker(models.TextChoices):
    IBKR = "ibkr", "Interactive Brokers"


class SecType(models.TextChoices):
    STOCK = "STK", "Stock"
    OPTION = "OPT", "Option"
    FUTURE_OPTION = "FOP", "Futures option"
    FUTURE = "FUT", "Future"
    FOREX = "CASH", "Forex"
    BOND = "BOND", "Bond"
    CFD = "CFD", "CFD"
    WARRANT = "WAR", "Warrant"
    FUND = "FUND", "Mutual fund"
    CRYPTO = "CRYPTO", "Crypto"
    INDEX = "IND", "Index"
    COMBO = "BAG", "Combo"
    COMMODITY = "CMDTY", "Commodity"
    STRUCTURED = "IOPT", "Structured product"
    CONTINUOUS_FUTURE = "CONTFUT", "Continuous future"
    BILL = "BILL", "Bill"
    NEWS = "NEWS", "News"


class OptionRight(models.TextChoices):
    CALL = "C", "Call"
    PUT = "P", "Put"


def unique_external_id() -> models.UniqueConstraint:
    """One row per broker id: an account, a contract, a trade, a cash transaction, a
    corporate action (IBKR's own ids, so that a re-import finds what it wrote)."""
    return models.UniqueConstraint(
        fields=["broker", "external_id"], name="%(app_label)s_%(class)s_unique_external_id"
    )


class AbstractAccount(models.Model):
    """A broker account (IBKR: U1234567, DU... for paper trading)."""

    broker = models.CharField(max_length=16, choices=Broker.choices)
    external_id = models.CharField(
        max_length=32, help_text="The broker's account id, e.g. U1234567 (IBKR)."
    )
    name = models.CharField(max_length=200, blank=True)
    base_currency = models.CharField(max_length=8, blank=True)
    is_paper = models.BooleanField(default=False, help_text="A paper-trading (simulated) account.")
    last_synced_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True
        ordering = ["broker", "external_id"]
        constraints = [unique_external_id()]

    def __str__(self) -> str:
        return f"{self.external_id} ({self.get_broker_display()})"


class AbstractInstrument(models.Model):
    """One row per broker contract (IBKR: per conId)."""

    broker = models.CharField(max_length=16, choices=Broker.choices)
    external_id = models.CharField(
        max_length=64, help_text="The broker's contract id (IBKR conId, as text)."
    )
    symbol = models.CharField(max_length=64)
    sec_type = models.CharField(max_length=16, choices=SecType.choices)
    currency = models.CharField(max_length=8, blank=True)
    exchange = models.CharField(max_length=32, blank=True)
    local_symbol = models.CharField(max_length=64, blank=True)
    trading_class = models.CharField(max_length=64, blank=True)
    multiplier = models.DecimalField(
        null=True,
        blank=True,
        max_digits=20,
        decimal_places=6,
        help_text="Contract multiplier (e.g. 100 for US equity options); empty if none.",
    )
    expiry = models.DateField(
        null=True, blank=True, help_text="Last trading day, when the broker gives a full date."
    )
    contract_month = models.CharField(
        max_length=6, blank=True, help_text="YYYYMM of a derivative's expiry or contract month."
    )
    strike = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    right = models.CharField(max_length=1, blank=True, choices=OptionRight.choices)
    description = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True
        ordering = ["symbol", "sec_type", "external_id"]
        constraints = [unique_external_id()]

    def __str__(self) -> str:
        label = self.local_symbol or self.symbol
        return f"{label} ({self.sec_type})"


class PositionQuerySet(models.QuerySet):
    def open(self) -> "PositionQuerySet":
        return self.filter(closed_at__isnull=True)

    def closed(self) -> "PositionQuerySet":
        return self.filter(closed_at__isnull=False)


class AbstractPosition(models.Model):
    """What one account holds of one instrument; closed, never deleted, when it goes."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"), on_delete=models.PROTECT, related_name="positions"
    )
    instrument = models.ForeignKey(
        model_setting("IBKR_SYNC_INSTRUMENT_MODEL"),
        on_delete=models.PROTECT,
        related_name="positions",
    )
    quantity = models.DecimalField(
        help_text="Signed; negative is short. Kept as last seen when the position closes.",
        **QUANTITY_DIGITS,
    )
    average_cost = models.DecimalField(
        null=True,
        blank=True,
        help_text="As the broker reports it: per share for stocks, per contract "
        "(multiplier included) for derivatives.",
        **MONEY_DIGITS,
    )
    cost_basis = models.DecimalField(
        null=True, blank=True, help_text="quantity x average cost.", **MONEY_DIGITS
    )
    opened_at = models.DateTimeField(help_text="When a sync first saw this position open.")
    last_synced_at = models.DateTimeField(help_text="When a sync last wrote this row.")
    closed_at = models.DateTimeField(
        null=True, blank=True, help_text="Set when the broker stopped reporting it; empty if open."
    )
    # As IBKR reports them (its portfolio values): empty where it reported no value, never
    # zero for "unknown". A host taking prices from elsewhere keeps them in fields of its own.
    market_price = models.DecimalField(
        null=True, blank=True, help_text="Per unit, as IBKR reports it.", **MONEY_DIGITS
    )
    market_value = models.DecimalField(
        null=True,
        blank=True,
        help_text="In the instrument's currency, as IBKR reports it.",
        **MONEY_DIGITS,
    )
    unrealized_pnl = models.DecimalField(
        "unrealized P&L", null=True, blank=True, help_text="As IBKR reports it.", **MONEY_DIGITS
    )
    realized_pnl = models.DecimalField(
        "realized P&L", null=True, blank=True, help_text="As IBKR reports it.", **MONEY_DIGITS
    )
    valued_at = models.DateTimeField(
        null=True, blank=True, help_text="When a sync last read IBKR's values of this position."
    )

    objects = PositionQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["account", "instrument"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "instrument"], name="%(app_label)s_%(class)s_unique_instrument"
            )
        ]
        indexes = [
            models.Index(fields=["account", "closed_at"], name="%(app_label)s_%(class)s_open")
        ]

    def __str__(self) -> str:
        return f"{self.account.external_id}: {plain(self.quantity)} {self.instrument}"

    @property
    def is_open(self) -> bool:
        return self.closed_at is None


class AbstractCashBalance(models.Model):
    """The cash an account holds in one currency, as IBKR last reported it (kept current:
    a currency IBKR no longer reports for an account whose values were read goes)."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"),
        on_delete=models.CASCADE,
        related_name="cash_balances",
    )
    currency = models.CharField(max_length=8)
    amount = models.DecimalField(help_text="Signed; negative is a debit (a loan).", **MONEY_DIGITS)
    exchange_rate = models.DecimalField(
        null=True,
        blank=True,
        help_text="As IBKR reports it, to rate_currency; empty if none. Only a positive "
        "rate converts.",
        **MONEY_DIGITS,
    )
    # The rate's own currency, read with it: the account's base currency may change later
    # (IBKR's, or a kept row's from before), and a rate is used only for a total in it.
    rate_currency = models.CharField(
        max_length=8,
        blank=True,
        help_text="The currency exchange_rate converts to (the base currency IBKR reported "
        "with the rate); empty if none.",
    )
    synced_at = models.DateTimeField(help_text="When a sync last read it.")

    class Meta:
        abstract = True
        ordering = ["account", "currency"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "currency"], name="%(app_label)s_%(class)s_unique_currency"
            )
        ]

    def __str__(self) -> str:
        return f"{self.account.external_id}: {plain(self.amount)} {self.currency}"

    @property
    def base_amount(self) -> Decimal | None:
        """The amount in `rate_currency`, at IBKR's own exchange rate, with every digit of
        the product; None without a rate that converts (none, zero, negative) or without
        the currency it converts to: never a guess, never a product labelled wrongly."""
        if not (is_rate(self.exchange_rate) and self.rate_currency):
            return None
        return product(self.amount, self.exchange_rate)


class AbstractAccountSnapshot(models.Model):
    """An account's values in its base currency, as IBKR reported them at one sync: one
    row per account per sync that read its values completely. The history."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"),
        on_delete=models.CASCADE,
        related_name="snapshots",
    )
    # The id, not a foreign key: a host's app that has this model in its first migration
    # must not depend on the sync app's migrations, which depend on the host's positions.
    sync_run_id = models.PositiveBigIntegerField(
        "sync run", null=True, blank=True, help_text="The id of the SyncRun that read these values."
    )
    taken_at = models.DateTimeField()
    currency = models.CharField(
        max_length=8, blank=True, help_text="The account's base currency, as IBKR reports it."
    )
    net_liquidation = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    total_cash_value = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    gross_position_value = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    unrealized_pnl = models.DecimalField("unrealized P&L", null=True, blank=True, **MONEY_DIGITS)
    realized_pnl = models.DecimalField("realized P&L", null=True, blank=True, **MONEY_DIGITS)
    available_funds = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    buying_power = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    exchange_rates = models.JSONField(
        default=dict,
        blank=True,
        help_text="Every exchange rate IBKR reported with these values, to `currency`, by "
        "currency (exact decimal text), whether or not the account holds cash in it; "
        "rates that do not convert (zero, negative, none) are left out.",
    )

    class Meta:
        abstract = True
        ordering = ["account", "-taken_at"]
        get_latest_by = "taken_at"
        indexes = [
            models.Index(fields=["account", "taken_at"], name="%(app_label)s_%(class)s_hist")
        ]

    def __str__(self) -> str:
        return f"{self.account.external_id} at {self.taken_at:%Y-%m-%d %H:%M}"


# --- the ledger: what happened in an account, from a source that reads history (Flex) ---
#
# Each row is keyed on the broker's own id (IBKR's transactionID): a statement imported
# again writes nothing, a row the broker corrected is updated, none is ever deleted (a
# cancelled trade is marked). Optional for a host: IBKR_SYNC_TRADE_MODEL,
# IBKR_SYNC_CASH_TRANSACTION_MODEL and IBKR_SYNC_CORPORATE_ACTION_MODEL name them; a
# setting of None (or left out where the portfolio app is not installed) keeps no ledger.


class CashKind(models.TextChoices):
    DIVIDEND = "dividend", "Dividend"
    WITHHOLDING_TAX = "withholding_tax", "Withholding tax"
    PAYMENT_IN_LIEU = "payment_in_lieu", "Payment in lieu"
    INTEREST = "interest", "Interest"
    FEE = "fee", "Fee"
    DEPOSIT = "deposit", "Deposit"
    WITHDRAWAL = "withdrawal", "Withdrawal"
    OTHER = "other", "Other"


class AbstractLedgerRow(models.Model):
    """What every ledger row has: the account, the broker's key of the row, its raw
    attributes (as text, exactly as the broker sent them: a field can be derived later
    without downloading the history again) and when a sync created and last changed it."""

    broker = models.CharField(max_length=16, choices=Broker.choices)
    external_id = models.CharField(
        max_length=64, help_text="The broker's id of the row (IBKR: transactionID)."
    )
    raw = models.JSONField(
        default=dict, blank=True, help_text="The broker's attributes of the row, as text."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(
        auto_now=True, help_text="When a sync last changed it (a correction by the broker)."
    )

    class Meta:
        abstract = True


class AbstractTrade(AbstractLedgerRow):
    """One execution: a stock, option, future, bond, or an FX conversion (a trade between
    two cash currencies). Signed as the broker signs it: a sale's quantity is negative, a
    purchase's proceeds and a commission paid too."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"), on_delete=models.PROTECT, related_name="trades"
    )
    instrument = models.ForeignKey(
        model_setting("IBKR_SYNC_INSTRUMENT_MODEL"),
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="trades",
        help_text="Empty only when the broker named no contract id.",
    )
    trade_date = models.DateField(null=True, blank=True)
    traded_at = models.DateTimeField(null=True, blank=True)
    settle_date = models.DateField(null=True, blank=True)
    buy_sell = models.CharField("buy/sell", max_length=16, blank=True, help_text="BUY or SELL.")
    quantity = models.DecimalField(
        null=True, blank=True, help_text="Signed: negative for a sale.", **QUANTITY_DIGITS
    )
    price = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    proceeds = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    commission = models.DecimalField(
        null=True, blank=True, help_text="Signed: a commission paid is negative.", **MONEY_DIGITS
    )
    commission_currency = models.CharField(max_length=8, blank=True)
    currency = models.CharField(max_length=8, blank=True)
    realized_pnl = models.DecimalField("realized P&L", null=True, blank=True, **MONEY_DIGITS)
    fx_rate_to_base = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    cancelled = models.BooleanField(
        default=False, help_text="The broker cancelled it: marked, never deleted."
    )

    class Meta:
        abstract = True
        ordering = ["account", "-trade_date", "external_id"]
        constraints = [unique_external_id()]
        indexes = [
            models.Index(fields=["account", "trade_date"], name="%(app_label)s_%(class)s_date"),
            # The read API's order (oldest first, ties by id): a page is one index range.
            models.Index(fields=["trade_date", "id"], name="%(app_label)s_%(class)s_list"),
        ]

    def __str__(self) -> str:
        quantity = "" if self.quantity is None else plain(self.quantity)
        return f"{self.buy_sell} {quantity} #{self.external_id}".strip()


class AbstractCashTransaction(AbstractLedgerRow):
    """One cash transaction: a dividend, a tax withheld (or its refund), a payment in
    lieu, interest, a fee, a deposit or withdrawal. `amount` is signed as the broker
    signs it: a reversal keeps its sign."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"),
        on_delete=models.PROTECT,
        related_name="cash_transactions",
    )
    kind = models.CharField(max_length=16, choices=CashKind.choices)
    type = models.CharField(max_length=64, blank=True, help_text="The broker's own type.")
    date = models.DateField(null=True, blank=True)
    amount = models.DecimalField(null=True, blank=True, help_text="Signed.", **MONEY_DIGITS)
    currency = models.CharField(max_length=8, blank=True)
    instrument = models.ForeignKey(
        model_setting("IBKR_SYNC_INSTRUMENT_MODEL"),
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="cash_transactions",
    )
    description = models.TextField(blank=True)
    fx_rate_to_base = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    # The id, not a foreign key: a tax and its dividend may come in different statements,
    # in either order.
    dividend_external_id = models.CharField(
        max_length=64,
        blank=True,
        help_text="A withholding tax: the external id of the dividend (or payment in lieu) "
        "it was withheld from, where the broker's ids tie them.",
    )

    class Meta:
        abstract = True
        ordering = ["account", "-date", "external_id"]
        constraints = [unique_external_id()]
        indexes = [
            models.Index(fields=["account", "date"], name="%(app_label)s_%(class)s_date"),
            # The read API's order (oldest first, ties by id): a page is one index range.
            models.Index(fields=["date", "id"], name="%(app_label)s_%(class)s_list"),
        ]

    def __str__(self) -> str:
        amount = "" if self.amount is None else plain(self.amount)
        return f"{self.get_kind_display()} {amount} {self.currency} #{self.external_id}"


class AbstractCorporateAction(AbstractLedgerRow):
    """One corporate action on a holding (a split, spin-off, merger, ...), as the broker
    reports it; `type` is the broker's code (IBKR: FS, RS, SO, TC, ...)."""

    account = models.ForeignKey(
        model_setting("IBKR_SYNC_ACCOUNT_MODEL"),
        on_delete=models.PROTECT,
        related_name="corporate_actions",
    )
    action_id = models.CharField(max_length=64, blank=True, help_text="IBKR's actionID.")
    date = models.DateField(null=True, blank=True)
    type = models.CharField(max_length=16, blank=True)
    instrument = models.ForeignKey(
        model_setting("IBKR_SYNC_INSTRUMENT_MODEL"),
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="corporate_actions",
    )
    quantity = models.DecimalField(null=True, blank=True, **QUANTITY_DIGITS)
    amount = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    currency = models.CharField(max_length=8, blank=True)
    description = models.TextField(blank=True)

    class Meta:
        abstract = True
        ordering = ["account", "-date", "external_id"]
        constraints = [unique_external_id()]

    def __str__(self) -> str:
        return f"{self.type} {self.date} #{self.external_id}"


#: The AccountSnapshot fields a sync fills with the account's totals (in its base
#: currency), each with the name IBKR's account window gives the figure: labels for
#: people (the read API's help texts). Which value of a report fills a field is the
#: source's business (`ibkr_sync.sources`), never read from here.
SNAPSHOT_TOTALS = {
    "net_liquidation": "NetLiquidation",
    "total_cash_value": "TotalCashValue",
    "gross_position_value": "GrossPositionValue",
    "unrealized_pnl": "UnrealizedPnL",
    "realized_pnl": "RealizedPnL",
    "available_funds": "AvailableFunds",
    "buying_power": "BuyingPower",
}
#: Its former name, for host code that imported it.
SNAPSHOT_TAGS = SNAPSHOT_TOTALS


def _validate_host(value: str) -> None:
    if not value.strip() or any(c.isspace() or c in "/@" for c in value.strip()):
        raise ValidationError("A host name or IP address, such as 127.0.0.1 or ib-gateway.")


def _validate_query_id(value: str) -> None:
    if not value.strip().isdigit():
        raise ValidationError("The Flex Query's id: the number Client Portal shows beside it.")


class Connection(models.Model):
    """One IBKR login the installation syncs: a TWS / IB Gateway at an address (kind
    `tws`), or IBKR's Flex Web Service with a saved Activity Flex Query and a token (kind
    `flex`: no gateway).

    The Flex token is stored encrypted (`ibkr_sync.crypto`: a key derived from
    IBKR_SYNC_SECRET_KEY, else SECRET_KEY): `flex_token` holds the ciphertext only; set it
    with `set_flex_token()`, read it with `reveal_flex_token()` (the Flex source does,
    right before its requests). It is in no repr, form, message or answer.

    With no rows, a sync reads the gateway the settings (or the environment:
    IBKR_HOST, IBKR_PORT, IBKR_CLIENT_ID) name, as it always has. A connection's own
    fields override those settings for its syncs; a timeout left empty is the setting's.
    Each connection has a lock of its own: two connections sync at the same time.
    """

    class Kind(models.TextChoices):
        TWS = "tws", "TWS / IB Gateway"
        FLEX = "flex", "Flex Web Service"

    class Schedule(models.TextChoices):
        NONE = "", "None: synced when asked"
        INTERVAL = "interval", "Every N minutes, hours or days"
        CRONTAB = "crontab", "Crontab"

    class SchedulePeriod(models.TextChoices):
        # django-celery-beat's IntervalSchedule periods.
        DAYS = "days", "days"
        HOURS = "hours", "hours"
        MINUTES = "minutes", "minutes"
        SECONDS = "seconds", "seconds"

    name = models.SlugField(
        max_length=64,
        unique=True,
        help_text="How commands, the API and the admin name it: letters, digits, - and _.",
    )
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.TWS)
    enabled = models.BooleanField(
        default=True, help_text="A disabled connection is left out of sync_ibkr --all."
    )
    host = models.CharField(
        max_length=255,
        default="127.0.0.1",
        validators=[_validate_host],
        help_text="Host of its TWS / IB Gateway.",
    )
    port = models.PositiveIntegerField(
        default=7497,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
        help_text="The gateway's API port (TWS paper 7497, live 7496; IB Gateway paper "
        "4002, live 4001).",
    )
    client_id = models.PositiveIntegerField(
        default=1,
        validators=[MaxValueValidator(2**31 - 1)],
        help_text="A client id no other tool uses on this gateway.",
    )
    connect_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Seconds to wait for the handshake; empty: IBKR_CONNECT_TIMEOUT.",
    )
    request_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Seconds to wait for the positions; empty: IBKR_REQUEST_TIMEOUT.",
    )
    values_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Seconds to wait for one account's values; empty: IBKR_VALUES_TIMEOUT.",
    )
    flex_query_id = models.CharField(
        "Flex query id",
        max_length=32,
        blank=True,
        validators=[_validate_query_id],
        help_text="Flex only: the Activity Flex Query's id (Client Portal, Performance & "
        "Reports > Flex Queries).",
    )
    flex_token = models.TextField(
        "Flex token (encrypted)",
        blank=True,
        editable=False,
        help_text="Flex only: the Flex Web Service token, encrypted; never shown.",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        # Not SET_NULL: a connection without an owner is everyone's, so deleting a user
        # would hand their data to everyone. Give the connection to someone else, or
        # remove it, first.
        on_delete=models.PROTECT,
        related_name="ibkr_connections",
        help_text="The user it belongs to, if any: its data (the accounts it last reported, "
        "and what is under them; its syncs) is then theirs alone, and that of users who may "
        "see every connection's. Without an owner, everyone's. A user who owns a connection "
        "cannot be deleted until it is given to someone else or removed.",
    )
    note = models.TextField(blank=True)
    # When the task queue syncs it unasked (`schedules.py`: django-celery-beat's
    # PeriodicTask follows these fields).
    schedule = models.CharField(
        max_length=16,
        choices=Schedule.choices,
        default=Schedule.NONE,
        blank=True,
        help_text="When the task queue syncs it unasked (IBKR_SYNC_TASK_QUEUE and a beat "
        "process): none, every N minutes (or hours, days), or a crontab.",
    )
    schedule_every = models.PositiveIntegerField(
        "every",
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(100_000)],
        help_text="Interval only: every how many periods; empty: the kind's default (a "
        "gateway every 15 minutes, Flex every day).",
    )
    schedule_period = models.CharField(
        "period",
        max_length=16,
        choices=SchedulePeriod.choices,
        default=SchedulePeriod.MINUTES,
        blank=True,
    )
    schedule_crontab = models.CharField(
        "crontab",
        max_length=200,
        blank=True,
        help_text="Crontab only: minute hour day-of-month month day-of-week; empty: the "
        "kind's default (a gateway `*/15 * * * mon-fri`, Flex `30 5 * * tue-sat`: each "
        "morning after a trading day, once IBKR has closed its statement).",
    )
    schedule_timezone = models.CharField(
        "time zone",
        max_length=64,
        default="America/New_York",
        blank=True,
        help_text="The crontab's time zone (IBKR's statements are in US Eastern); empty: "
        "America/New_York.",
    )
    schedule_enabled = models.BooleanField(
        "schedule enabled",
        default=True,
        help_text="Untick to pause the schedule and keep it (a disabled connection's "
        "schedule is paused too).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        # Users own their connections (`owner`): a connection's data (its accounts and
        # what is under them, its sync runs) is its owner's, unowned ones everyone's, and
        # every one's to a user with this permission (`ibkr_sync.visibility`).
        permissions = [("view_all_connections", "Can see every connection's data")]
        constraints = [
            models.CheckConstraint(
                condition=Q(port__gte=1, port__lte=65535), name="ibkr_sync_connection_port"
            ),
            # A TWS connection has no Flex fields; a Flex one has both.
            models.CheckConstraint(
                condition=(Q(kind="tws", flex_query_id="", flex_token=""))
                | (Q(kind="flex") & ~Q(flex_query_id="") & ~Q(flex_token="")),
                name="ibkr_sync_connection_fields_of_its_kind",
            ),
            # `Home` beside `home` would be two connections a person takes for one.
            models.UniqueConstraint(
                Lower("name"),
                name="ibkr_sync_connection_unique_name_any_case",
                violation_error_message="A connection with this name (in any case) exists.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_flex(self) -> bool:
        return self.kind == self.Kind.FLEX

    @property
    def address(self) -> str:
        """Where it reads: the gateway's host:port, or the Flex query."""
        if self.is_flex:
            return f"Flex query {self.flex_query_id}"
        return f"{self.host}:{self.port}"

    # --- the Flex token, encrypted at rest ---

    @property
    def has_flex_token(self) -> bool:
        return bool(self.flex_token)

    @sensitive_variables("token")
    def set_flex_token(self, token: str) -> None:
        """Store `token` encrypted with the current key (saved with the row)."""
        from .crypto import encrypt

        token = (token or "").strip()
        if not token:
            raise ValidationError({"flex_token": "The Flex token is empty."})
        if any(c.isspace() for c in token) or len(token) > 200:
            raise ValidationError(
                {"flex_token": "A Flex token is one word (Client Portal shows it once)."}
            )
        self.flex_token = encrypt(token)

    def reveal_flex_token(self) -> str:
        """The token, decrypted (`SecretUnreadable` when no configured key opens it)."""
        from .crypto import decrypt

        return decrypt(self.flex_token, what=f"The Flex token of connection {self.name}")

    def clean(self) -> None:
        from . import schedules

        super().clean()
        if self.is_flex:
            problems = {}
            if not self.flex_query_id.strip():
                problems["flex_query_id"] = "A Flex connection needs its Flex query id."
            if not self.flex_token:
                problems["__all__"] = "A Flex connection needs its Flex token."
            if problems:
                raise ValidationError(problems)
            self.flex_query_id = self.flex_query_id.strip()
        elif self.flex_query_id or self.flex_token:
            raise ValidationError(
                "A TWS / IB Gateway connection has no Flex query id and no Flex token: "
                "choose the kind Flex Web Service, or leave them empty."
            )
        schedules.clean(self)  # its kind's defaults, once the kind is right

    @property
    def lock_key(self) -> str:
        """The key of its lock (the id: a rename while it syncs changes nothing)."""
        return f"connection:{self.pk}"


#: The lock key of syncs of the settings' (environment's) gateway, with no connection.
DEFAULT_LOCK_KEY = ""


class AccountReport(models.Model):
    """The newest snapshot applied to one account: which connection reported it, and the
    moment the snapshot describes. An older snapshot of the account, from any connection,
    is refused for it (two logins may report one account: an adviser's and its own).

    And whose the account is (`owner`, `owned`): while its connection exists, that
    connection's owner, whom `owner` follows (each report applied, each save of the
    connection); once the connection is removed, the one recorded here, so that an owned
    account keeps its owner and no other user's connection can take it, with its history,
    by reporting its id (`writer._claim_accounts`, `visibility`).

    Kept by the sync app itself, keyed by the account's id, so that a host's own account
    model needs no fields for it."""

    broker = models.CharField(max_length=16, choices=Broker.choices)
    external_id = models.CharField(max_length=32, help_text="The broker's account id.")
    connection = models.ForeignKey(
        Connection, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    connection_name = models.CharField(
        max_length=64,
        blank=True,
        help_text="The connection that last reported it; empty: the settings' gateway.",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        # Not PROTECT: a user whose connections are all removed may still be deleted. The
        # account does not become everyone's then: `owned` stays set, and an account owned
        # by a user no longer known is written by no sync and seen only by users who see
        # every connection.
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Whose the account is: its connection's owner (kept when the connection "
        "is removed); empty when it has none, or when that user was deleted (`owned`).",
    )
    owned = models.BooleanField(
        default=False,
        help_text="Whether the account has an owner: set with `owner`, and kept when that "
        "user is deleted or was not known (a connection removed before owners were "
        "recorded here), so that it never becomes everyone's. Only a connection of that "
        "owner writes an owned account.",
    )
    source = models.CharField(max_length=16, help_text="What read it (tws).")
    as_of = models.DateTimeField(help_text="The moment the applied snapshot describes.")
    sync_run = models.ForeignKey(
        "SyncRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    applied_at = models.DateTimeField(help_text="When it was applied.")
    positions_digest = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text=(
            "A digest of the positions written for it, as the source reported them; empty "
            "when none could be taken. A sync that reads the same digest again leaves its "
            "stored positions as they are without comparing them row by row."
        ),
    )

    class Meta:
        ordering = ["broker", "external_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["broker", "external_id"], name="ibkr_sync_accountreport_unique_account"
            )
        ]

    def __str__(self) -> str:
        by = self.connection_name or "the settings' gateway"
        return f"{self.external_id}: by {by}, as of {self.as_of:%Y-%m-%d %H:%M:%S}"


class SyncRun(models.Model):
    """One row per sync attempt, written before the sync starts and kept when it fails.

    At most one row per connection (`lock_key`) is `running` at a time, enforced by a
    partial unique constraint: that is the lock that keeps two syncs of one connection
    (in any process or app server sharing the database) from interleaving, and it works
    the same on PostgreSQL and SQLite. Syncs of different connections run side by side.
    """

    class Trigger(models.TextChoices):
        API = "api", "API"
        COMMAND = "command", "Management command"
        ADMIN = "admin", "Admin"
        SCHEDULE = "schedule", "Schedule"

    class Status(models.TextChoices):
        # Waiting for a worker (IBKR_SYNC_TASK_QUEUE): not the lock; the worker turns it
        # into `running` by taking the lock, or fails it.
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCESS = "success", "Success"
        FAILED = "failed", "Failed"

    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="ibkr_sync_runs",
    )
    connection = models.ForeignKey(
        Connection,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="sync_runs",
        help_text="The connection synced; empty: the settings' gateway.",
    )
    connection_name = models.CharField(
        max_length=64,
        blank=True,
        help_text="The connection's name when it ran (kept if the connection is removed).",
    )
    lock_key = models.CharField(
        max_length=80,
        blank=True,
        editable=False,
        help_text="Whose lock a running sync holds: its connection's, or the settings' "
        "gateway's (empty).",
    )
    account_filter = models.CharField(
        max_length=32, blank=True, help_text="The ibkr_account_id asked for; empty for all."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    accounts = models.JSONField(default=list, blank=True, help_text="Accounts reconciled.")
    processed = models.PositiveIntegerField(default=0)
    created = models.PositiveIntegerField(default=0)
    updated = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    reopened = models.PositiveIntegerField(default=0)
    closed = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    error_details = models.JSONField(
        default=list, blank=True, help_text="Records that could not be mapped, with reasons."
    )
    account_values = models.JSONField(
        default=dict,
        blank=True,
        help_text="Per account: whether its values (cash, net liquidation, P&L, market "
        "values) were read ('read') or not ('missing', with the reason).",
    )
    accounts_refused = models.JSONField(
        default=dict,
        blank=True,
        help_text="Accounts reported but not written, with the reason: a newer snapshot of "
        "them (from another connection) was applied already, or this connection may not "
        "write them (another owner's connection holds them).",
    )
    ledger = models.JSONField(
        default=dict,
        blank=True,
        help_text="The ledger rows written, by kind (trades, cash_transactions, "
        "corporate_actions): how many created, updated (corrected by the broker) and "
        "unchanged. Empty when the source read no ledger (TWS) or none is kept.",
    )
    period_from = models.DateField(
        null=True,
        blank=True,
        help_text="The first day of the period read (a Flex statement's); empty for a "
        "gateway's read of one moment.",
    )
    period_to = models.DateField(
        null=True, blank=True, help_text="The last day of the period read (both included)."
    )
    history_only = models.BooleanField(
        default=False,
        help_text="Only the history was written (the ledger, each day's values): an older "
        "window of a back-fill, whose positions and cash are older than the newest window's.",
    )
    statement = models.JSONField(
        default=dict,
        blank=True,
        editable=False,
        help_text="The statement applied (Flex): its digest, the accounts and moments it "
        "applied, and what its write left. A download of the same statement, with nothing "
        "of it changed since, is recorded as unchanged without being read again "
        "('repeats': the run that applied it).",
    )
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    host = models.CharField(
        max_length=255, blank=True, editable=False, help_text="Machine that ran the sync."
    )
    pid = models.PositiveIntegerField(
        null=True, blank=True, editable=False, help_text="Process id that ran the sync."
    )
    owner = models.CharField(
        max_length=255,
        blank=True,
        editable=False,
        help_text="The process holding the lock (machine, pid, start time): tells a live "
        "holder from a pid reused or shared across containers.",
    )
    heartbeat_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Renewed while the sync runs (the database's clock); a running sync "
        "silent for longer than IBKR_SYNC_LOCK_TIMEOUT holds the lock no more.",
    )
    database_session = models.CharField(
        max_length=64,
        blank=True,
        editable=False,
        help_text="PostgreSQL: the session that writes (pid@backend start), ended by the "
        "next sync should this one be abandoned in the middle of its write.",
    )
    queued_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When it was queued for a worker (IBKR_SYNC_TASK_QUEUE); empty: it ran "
        "where it was started.",
    )
    started_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        get_latest_by = "started_at"
        permissions = [("run_sync", "Can run an IBKR portfolio sync")]
        constraints = [
            models.UniqueConstraint(
                fields=["lock_key"],
                condition=Q(status="running"),
                name="ibkr_sync_one_running_sync_per_lock",
            )
        ]

    def __str__(self) -> str:
        return f"Sync #{self.pk} ({self.get_status_display()}, {self.started_at:%Y-%m-%d %H:%M})"

    @property
    def duration(self):
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class PositionChange(models.Model):
    """What one sync changed in one position, written in the sync's own transaction.

    Rows with nothing changed are not recorded: the audit trail of an hourly sync of an
    unchanged portfolio is empty.
    """

    class Kind(models.TextChoices):
        CREATED = "created", "Created"
        UPDATED = "updated", "Updated"
        REOPENED = "reopened", "Re-opened"
        CLOSED = "closed", "Closed"

    sync_run = models.ForeignKey(SyncRun, on_delete=models.CASCADE, related_name="changes")
    position = models.ForeignKey(
        model_setting("IBKR_SYNC_POSITION_MODEL"), on_delete=models.CASCADE, related_name="+"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The digits of the position's own columns: whatever a position holds, its change does.
    quantity_before = models.DecimalField(
        null=True, blank=True, help_text="Empty when created.", **QUANTITY_DIGITS
    )
    quantity_after = models.DecimalField(
        null=True, blank=True, help_text="Empty when closed.", **QUANTITY_DIGITS
    )
    average_cost_before = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)
    average_cost_after = models.DecimalField(null=True, blank=True, **MONEY_DIGITS)

    class Meta:
        ordering = ["sync_run", "id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} position #{self.position_id} in sync #{self.sync_run_id}"


#: How often a task queue worker says it is alive (`tasks.py`), and after how long without
#: a word /healthz counts it gone (seconds).
WORKER_HEARTBEAT = 10.0
WORKER_SILENT_AFTER = 35.0


class QueueWorker(models.Model):
    """A task queue worker (IBKR_SYNC_TASK_QUEUE) as it last said it was alive: written by
    the worker every WORKER_HEARTBEAT seconds (`tasks.py`, on the database's clock) and
    deleted when it stops; read by /healthz ("a worker seen recently"), which so asks the
    database, never the workers."""

    hostname = models.CharField(max_length=255, unique=True)
    queues = models.CharField(
        max_length=1000, blank=True, help_text="The queues it consumes, comma-separated."
    )
    started_at = models.DateTimeField()
    seen_at = models.DateTimeField()

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @classmethod
    def alive(cls, hostname: str, queues: str = "") -> None:
        """Worker `hostname` is alive now (the database's now)."""
        from django.db import IntegrityError
        from django.db.models.functions import Now

        if cls.objects.filter(hostname=hostname).update(seen_at=Now(), queues=queues):
            return
        try:
            cls.objects.create(hostname=hostname, queues=queues, started_at=Now(), seen_at=Now())
        except IntegrityError:  # written meanwhile (a restart's overlap): alive all the same
            cls.objects.filter(hostname=hostname).update(seen_at=Now(), queues=queues)

    @classmethod
    def gone(cls, hostname: str) -> None:
        cls.objects.filter(hostname=hostname).delete()


class FlexTokenGate(models.Model):
    """One Flex token's gate across processes (`token_gate.py`): who holds it, until when
    (a lease on the database's clock, so a holder that died frees it), and the moment
    before which no request may go on the token (IBKR's 1018 back-off, and the spacing
    between two processes' requests). Keyed on a digest of the token, never the token."""

    key = models.CharField(max_length=64, unique=True, help_text="A digest of the token.")
    holder = models.CharField(max_length=255, blank=True)
    leased_until = models.DateTimeField(null=True, blank=True)
    not_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "Flex token gate"

    def __str__(self) -> str:
        return f"Flex token {self.key[:8]}..."
