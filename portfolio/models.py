"""Broker-agnostic portfolio domain: accounts, instruments and the positions linking them.

Rows mirror what a broker reports; they are written by a broker app's sync service
(e.g. `ibkr_sync.services`), never edited by hand, and never deleted when a position
goes away: a closed position keeps its last quantity and gets `closed_at`.
"""

from decimal import Decimal

from django.db import models

from .decimals import plain

# Wide enough for fractional shares and crypto (10 places) and for large notional values.
QUANTITY_DIGITS = {"max_digits": 30, "decimal_places": 10}
MONEY_DIGITS = {"max_digits": 30, "decimal_places": 10}
DECIMAL_PLACES = 10
DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_PLACES)


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


class Account(models.Model):
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
        ordering = ["broker", "external_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["broker", "external_id"], name="portfolio_account_unique_external_id"
            )
        ]

    def __str__(self) -> str:
        return f"{self.external_id} ({self.get_broker_display()})"


class Instrument(models.Model):
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
        ordering = ["symbol", "sec_type", "external_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["broker", "external_id"], name="portfolio_instrument_unique_external_id"
            )
        ]

    def __str__(self) -> str:
        label = self.local_symbol or self.symbol
        return f"{label} ({self.sec_type})"


class PositionQuerySet(models.QuerySet):
    def open(self) -> "PositionQuerySet":
        return self.filter(closed_at__isnull=True)

    def closed(self) -> "PositionQuerySet":
        return self.filter(closed_at__isnull=False)


class Position(models.Model):
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="positions")
    instrument = models.ForeignKey(Instrument, on_delete=models.PROTECT, related_name="positions")
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

    objects = PositionQuerySet.as_manager()

    class Meta:
        ordering = ["account", "instrument"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "instrument"], name="portfolio_position_unique_instrument"
            )
        ]
        indexes = [models.Index(fields=["account", "closed_at"], name="portfolio_position_open")]

    def __str__(self) -> str:
        return f"{self.account.external_id}: {plain(self.quantity)} {self.instrument}"

    @property
    def is_open(self) -> bool:
        return self.closed_at is None
