"""Admin for the mirrored portfolio. Synced fields are read-only: the next sync would
overwrite an edit, so the admin does not pretend one is possible."""

from decimal import Decimal

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from ibkr_sync.admin import SyncNowMixin

from . import decimals
from .models import Account, Instrument, Position
from .overview import cost_basis_overview, status_panels


def plain(value: Decimal | None) -> str:
    """A Decimal without the column's trailing zeros: 0.5, not 0.5000000000."""
    return "-" if value is None else decimals.plain(value)


class SyncedModelAdmin(admin.ModelAdmin):
    """Rows that only a sync creates and deletes."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class MirroredModelAdmin(SyncedModelAdmin):
    """Rows with nothing a person may edit: shown "to view", without Save buttons."""

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def positions_link(lookup: str, pk: int) -> str:
    """A link to the positions changelist filtered on one account or instrument."""
    url = reverse("admin:portfolio_position_changelist")
    return format_html('<a href="{}?{}={}">Positions</a>', url, lookup, pk)


@admin.register(Account)
class AccountAdmin(SyncNowMixin, SyncedModelAdmin):
    list_display = (
        "external_id", "broker", "name", "base_currency", "is_paper", "last_synced_at",
        "positions",
    )  # fmt: skip
    list_filter = ("broker", "is_paper")
    search_fields = ("external_id", "name")
    readonly_fields = (
        "broker", "external_id", "is_paper", "last_synced_at", "created_at", "positions",
    )  # fmt: skip
    fields = (
        "broker", "external_id", "name", "base_currency", "is_paper", "last_synced_at",
        "positions",
    )  # fmt: skip

    @admin.display(description="positions")
    def positions(self, obj: Account) -> str:
        return positions_link("account__id__exact", obj.pk)


@admin.register(Instrument)
class InstrumentAdmin(MirroredModelAdmin):
    list_display = (
        "symbol", "local_symbol", "sec_type", "currency", "exchange", "expiry", "strike_display",
        "right", "multiplier_display", "external_id", "positions",
    )  # fmt: skip
    list_filter = (("sec_type", admin.AllValuesFieldListFilter), "currency", "broker")
    search_fields = ("symbol", "local_symbol", "=external_id", "description")
    fields = (
        "broker", "external_id", "symbol", "sec_type", "description", "currency", "exchange",
        "local_symbol", "trading_class", "multiplier_display", "expiry", "contract_month",
        "strike_display", "right", "created_at", "updated_at", "positions",
    )  # fmt: skip
    readonly_fields = fields

    @admin.display(description="positions")
    def positions(self, obj: Instrument) -> str:
        return positions_link("instrument__id__exact", obj.pk)

    @admin.display(description="strike", ordering="strike")
    def strike_display(self, obj: Instrument) -> str:
        return plain(obj.strike)

    @admin.display(description="multiplier", ordering="multiplier")
    def multiplier_display(self, obj: Instrument) -> str:
        return plain(obj.multiplier)


class OpenClosedFilter(admin.SimpleListFilter):
    """Open positions unless asked otherwise: closed ones are history, one click away."""

    title = "status"
    parameter_name = "status"
    default = "open"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("closed", "Closed"), ("all", "All")]

    def value(self) -> str:
        value = super().value()
        return value if value in ("open", "closed", "all") else self.default

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "open":
            return queryset.filter(closed_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(closed_at__isnull=False)
        return queryset

    def choices(self, changelist):
        # Django's own "All" entry means "no parameter", which is "open" here: our
        # lookups list all three, each with an explicit value.
        facets = self.get_facet_queryset(changelist) if changelist.add_facets else None
        for index, (lookup, title) in enumerate(self.lookup_choices):
            if facets is not None:
                title = f"{title} ({facets.get(f'{index}__c', '-')})"
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }


@admin.register(Position)
class PositionAdmin(SyncNowMixin, MirroredModelAdmin):
    list_display = (
        "account", "symbol", "sec_type", "quantity_display", "average_cost_display",
        "cost_basis_display", "currency", "is_open", "last_synced_at",
    )  # fmt: skip
    list_select_related = ("account", "instrument")
    list_filter = (
        OpenClosedFilter, "account", ("instrument__sec_type", admin.AllValuesFieldListFilter),
        "instrument__currency",
    )  # fmt: skip
    search_fields = ("instrument__symbol", "instrument__local_symbol", "=instrument__external_id")
    fields = (
        "account", "instrument", "quantity_display", "average_cost_display",
        "cost_basis_display", "opened_at", "last_synced_at", "closed_at",
    )  # fmt: skip
    readonly_fields = fields
    list_per_page = 100
    # Grouped by account (its key, so the (account, closed_at) index gives the order and
    # a page deep in 100,000 rows sorts only the accounts before it), then by symbol.
    # (account, instrument) is unique, so no extra tie-breaker is needed.
    ordering = ("account_id", "instrument__symbol", "instrument_id")
    # One COUNT per page, of the filtered rows only.
    show_full_result_count = False

    def get_urls(self):
        overview = self.admin_site.admin_view(self.overview_view)
        return [path("overview/", overview, name="portfolio_overview"), *super().get_urls()]

    def overview_view(self, request: HttpRequest) -> TemplateResponse:
        """Net cost basis by account, currency and sec type (`portfolio.overview`)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Portfolio overview",
            "opts": self.opts,
            "overview": cost_basis_overview(),
            "status_panels": status_panels(request),
        }
        return TemplateResponse(request, "admin/portfolio/overview.html", context)

    @admin.display(description="symbol", ordering="instrument__symbol")
    def symbol(self, obj: Position) -> str:
        return obj.instrument.local_symbol or obj.instrument.symbol

    @admin.display(description="sec type", ordering="instrument__sec_type")
    def sec_type(self, obj: Position) -> str:
        return obj.instrument.sec_type

    @admin.display(description="currency", ordering="instrument__currency")
    def currency(self, obj: Position) -> str:
        return obj.instrument.currency

    @admin.display(description="quantity", ordering="quantity")
    def quantity_display(self, obj: Position) -> str:
        return plain(obj.quantity)

    @admin.display(description="average cost", ordering="average_cost")
    def average_cost_display(self, obj: Position) -> str:
        return plain(obj.average_cost)

    @admin.display(description="cost basis", ordering="cost_basis")
    def cost_basis_display(self, obj: Position) -> str:
        return plain(obj.cost_basis)

    @admin.display(description="open", boolean=True, ordering="closed_at")
    def is_open(self, obj: Position) -> bool:
        return obj.closed_at is None
