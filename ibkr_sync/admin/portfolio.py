"""The admin of the mirrored portfolio, for whichever models the IBKR_SYNC_*_MODEL settings
name: a host registers each class on its own model in a line (our `portfolio` app does the
same). Synced fields are read-only: the next sync would overwrite an edit, and what IBKR
reports labels IBKR's figures, so the admin does not pretend an edit is possible. The
position model's admin also serves the portfolio overview (`overview/`)."""

from decimal import Decimal

from django.contrib import admin
from django.contrib.admin.utils import get_fields_from_path
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from .. import conf, decimals, visibility
from ..overview import ledger_income, portfolio_overview, status_panels
from ..permissions import COVERED_BY, Kind, may_view, visible_kinds
from .columns import when_column
from .sync_runs import SyncNowMixin


def number(
    value: Decimal | None, places: int | None = None, min_places: int = 0, currency: str = ""
) -> str:
    """A number as the admin shows it: right-aligned in its column, thousands separated,
    with at least `min_places` decimals; rounded half-even to `places` decimals when
    given, else exact. The exact value is always its title: no digit is out of reach.
    An amount on an object's page has its currency's code after it (`currency`)."""
    if value is None:
        shown = mark_safe('<span class="num">-</span>')
    else:
        if places is None:
            text = decimals.grouped(value, min_places)
        else:
            text = decimals.rounded(value, places, min_places)
        shown = format_html('<span class="num" title="{}">{}</span>', decimals.plain(value), text)
    if value is None or not currency:
        return shown
    return format_html('{} <span class="currency">{}</span>', shown, currency)


def _attribute(obj, path: str):
    """`obj`'s attribute at a dotted `path` ("instrument.currency"), or "" on the way."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return ""
    return obj


def number_column(
    field: str,
    description: str,
    places: int | None = None,
    min_places: int = 0,
    currency: str | None = None,
):
    """A ModelAdmin column (or read-only field) showing `field` by `number`, sorted by
    the field. Name it `<something>_display`: the admin's stylesheet right-aligns the
    headers of those columns. `currency`: the dotted path of the amount's currency code
    on the object, shown after the amount (on object pages; a list has its own currency
    column)."""

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        code = _attribute(obj, currency) if currency else ""
        return number(getattr(obj, field), places, min_places, code)

    return column


# How numbers read in lists: amounts of money in cents, prices to at most 4 decimals (at
# least 2), rates with at least 4, quantities exactly; every one exact on hover. On an
# object's page, every amount and price exactly (EXACT, with at least 2 decimals).
MONEY = {"places": 2, "min_places": 2}
PRICE = {"places": 4, "min_places": 2}
RATE = {"min_places": 4}
EXACT = {"min_places": 2}
# ... with the currency's code after it: an amount in the object's own currency, or in
# its instrument's.
EXACT_AMOUNT = {**EXACT, "currency": "currency"}
EXACT_HELD = {**EXACT, "currency": "instrument.currency"}


@admin.display(description="account", ordering="account__external_id")
def account_column(self, obj) -> str:
    """The account by its id (narrow); its name and broker on hover."""
    account = obj.account
    return format_html('<span title="{}">{}</span>', str(account), account.external_id)


def related_text(field: str):
    """A read-only field showing the object `field` refers to as text, without the link to
    its admin page: for users who may not view that kind of data (`SyncedModelAdmin`)."""

    @admin.display(description=field)
    def text(self, obj) -> str:
        related = getattr(obj, field)
        return "-" if related is None else str(related)

    return text


#: The fields of the synced models that are the user's own, not IBKR's: the only ones the
#: admin edits. Every other field is IBKR's, as the last sync read it.
USER_FIELDS = frozenset({"name"})


class VisibleAccountFilter(admin.RelatedFieldListFilter):
    """The account filter of a list, offering only the accounts the user may see
    (`ibkr_sync.visibility`): another owner's account ids are not listed."""

    def field_choices(self, field, request: HttpRequest, model_admin):
        accounts = visibility.visible(field.related_model._default_manager.all(), request.user, "")
        ordering = self.field_admin_ordering(field, request, model_admin)
        if ordering:
            accounts = accounts.order_by(*ordering)
        return [(account.pk, str(account)) for account in accounts]


class VisibleValuesFilter(admin.AllValuesFieldListFilter):
    """A filter on every value a field holds, offering only the values of the rows the
    user may see. Django's takes a related model's field (`instrument__currency`) from
    every row of that model: a contract only another owner's account holds would be
    offered (that someone holds a yen future is theirs to know)."""

    def __init__(self, field, request, params, model, model_admin, field_path):
        super().__init__(field, request, params, model, model_admin, field_path)
        self.lookup_choices = (
            model_admin.get_queryset(request)
            .distinct()
            .order_by(field_path)
            .values_list(field_path, flat=True)
        )


def _takes_every_value(model, name: str) -> bool:
    """Whether Django's filter for the list_filter entry `name` would list every value
    of a related model's field (a plain field, not one with choices, a flag or a key)."""
    if "__" not in name:
        return False
    field = get_fields_from_path(model, name)[-1]
    return not (field.is_relation or field.choices or isinstance(field, models.BooleanField))


class SyncedModelAdmin(admin.ModelAdmin):
    """Rows that only a sync creates and deletes.

    A column or field that shows another kind of data than the model's own (`shows`), and
    a link to a related object's page (`links`), appear only to users who may view that
    kind (`ibkr_sync.permissions`, as the read API decides); to others the column is left
    out and the related object is named without a link.

    Only the rows the user may see are listed and opened (`ibkr_sync.visibility`: those
    of the accounts of their own connections, of connections without an owner and of
    none; all with `view_all_connections`): `account_path` leads from a row to its account
    (empty for the account model itself; None for rows of no account, the instruments).
    Another owner's row's page answers as a row that does not exist.
    """

    account_path: str | None = "account"

    #: Column or field name -> the kind of data it shows.
    shows: dict[str, Kind] = {}
    #: A foreign key shown as a link to its admin page -> (the field naming it without a
    #: link, the kind of data that page shows).
    links: dict[str, tuple[str, Kind]] = {
        "account": ("account_text", Kind.ACCOUNTS),
        "instrument": ("instrument_text", Kind.INSTRUMENTS),
    }

    account_text = related_text("account")
    instrument_text = related_text("instrument")

    class Media:
        # Right-aligned numbers; the wide lists fitting a 1400 px window.
        css = {"all": ("ibkr_sync/admin.css",)}

    def _visible(self, request: HttpRequest, names) -> list:
        """`names` without those the user may not view, and unlinked where they may not
        follow the link."""
        visible = []
        for name in names:
            if name in self.shows and not may_view(request.user, self.shows[name]):
                continue
            if name in self.links and not may_view(request.user, self.links[name][1]):
                name = self.links[name][0]
            visible.append(name)
        return visible

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request)
        if self.account_path is None:
            return queryset
        return visibility.visible(queryset, request.user, self.account_path)

    def get_list_filter(self, request: HttpRequest):
        # The account filter lists only the accounts the user may see, and a filter on
        # the values of a field only those of the rows they may see.
        filters = []
        for name in super().get_list_filter(request):
            if name == "account":
                name = ("account", VisibleAccountFilter)
            elif isinstance(name, str) and _takes_every_value(self.model, name):
                name = (name, VisibleValuesFilter)
            elif isinstance(name, tuple) and name[1] is admin.AllValuesFieldListFilter:
                name = (name[0], VisibleValuesFilter)
            filters.append(name)
        return filters

    def get_list_display(self, request: HttpRequest):
        return self._visible(request, super().get_list_display(request))

    def get_fields(self, request: HttpRequest, obj=None):
        return self._visible(request, super().get_fields(request, obj))

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        unlinked = [text for text, _ in self.links.values()]
        return [*super().get_readonly_fields(request, obj), *unlinked]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class MirroredModelAdmin(SyncedModelAdmin):
    """Rows with nothing a person may edit: shown "to view", without Save buttons."""

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


#: What the portfolio overview shows, by section: each account's details, net liquidation
#: and its history, cash, and open positions. Who may view none of them may not open it.
OVERVIEW_KINDS = (Kind.ACCOUNTS, Kind.ACCOUNT_SNAPSHOTS, Kind.CASH_BALANCES, Kind.POSITIONS)


def may_open_overview(user) -> bool:
    """Whether `user` may open the overview (and see links to it): any of its sections."""
    return user.is_active and user.is_staff and any(may_view(user, k) for k in OVERVIEW_KINDS)


def positions_link(lookup: str, pk: int) -> str:
    """A link to the positions changelist filtered on one account or instrument."""
    meta = conf.position_model()._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
    return format_html('<a href="{}?{}={}">Positions</a>', url, lookup, pk)


class AccountAdmin(SyncNowMixin, SyncedModelAdmin):
    account_path = ""
    list_display = (
        "external_id", "broker", "name", "base_currency", "is_paper", "last_synced",
        "positions",
    )  # fmt: skip
    list_filter = ("broker", "is_paper")
    search_fields = ("external_id", "name")
    shows = {"positions": Kind.POSITIONS}
    fields = (
        "broker", "external_id", "name", "base_currency", "is_paper", "last_synced_at",
        "positions",
    )  # fmt: skip
    # What IBKR reports is not editable (the base currency labels IBKR's totals): only
    # what is the user's own, the name, is.
    readonly_fields = tuple(name for name in fields if name not in USER_FIELDS)

    last_synced = when_column("last_synced_at", "last synced at")

    @admin.display(description="positions")
    def positions(self, obj) -> str:
        return positions_link("account__id__exact", obj.pk)


class InstrumentAdmin(MirroredModelAdmin):
    # A contract is no account's: the instruments listed are those a position or a
    # ledger row the user may see names (`visibility.visible_instruments`).
    account_path = None
    list_display = (
        "symbol", "local_symbol", "sec_type", "currency", "exchange", "expiry", "strike_display",
        "right", "multiplier_display", "external_id", "positions",
    )  # fmt: skip
    list_filter = (("sec_type", admin.AllValuesFieldListFilter), "currency", "broker")
    search_fields = ("symbol", "local_symbol", "=external_id", "description")
    fields = (
        "broker", "external_id", "symbol", "sec_type", "description", "currency", "exchange",
        "local_symbol", "trading_class", "multiplier_display", "expiry", "contract_month",
        "strike_exact", "right", "created_at", "updated_at", "positions",
    )  # fmt: skip
    readonly_fields = fields
    shows = {"positions": Kind.POSITIONS}

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return visibility.visible_instruments(super().get_queryset(request), request.user)

    @admin.display(description="positions")
    def positions(self, obj) -> str:
        return positions_link("instrument__id__exact", obj.pk)

    strike_display = number_column("strike", "strike", **PRICE)
    strike_exact = number_column("strike", "strike", **EXACT_AMOUNT)
    multiplier_display = number_column("multiplier", "multiplier")


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


class PositionAdmin(SyncNowMixin, MirroredModelAdmin):
    # What fits a 1400 px wide window, every column visible (the stylesheet puts the
    # filters above the list below 1700 px): amounts in cents and prices to 4 decimals
    # (exact on hover and on the position's page), the account by its id. When a sync
    # last wrote or valued the position is on its page; the overview says when the last
    # sync ran.
    list_display = (
        "account_label", "symbol", "sec_type", "currency", "quantity_display",
        "average_cost_display", "market_price_display", "cost_basis_display",
        "market_value_display", "unrealized_pnl_display", "is_open",
    )  # fmt: skip
    list_select_related = ("account", "instrument")
    list_filter = (
        OpenClosedFilter, "account", ("instrument__sec_type", admin.AllValuesFieldListFilter),
        "instrument__currency",
    )  # fmt: skip
    search_fields = ("instrument__symbol", "instrument__local_symbol", "=instrument__external_id")
    # Every figure exactly, as IBKR reported it.
    fields = (
        "account", "instrument", "quantity_display", "average_cost_exact",
        "cost_basis_exact", "market_price_exact", "market_value_exact",
        "unrealized_pnl_exact", "realized_pnl_exact", "valued_at", "opened_at",
        "last_synced_at", "closed_at",
    )  # fmt: skip
    readonly_fields = fields
    list_per_page = 100
    # Grouped by account (its key, so the (account, closed_at) index gives the order and
    # a page deep in 100,000 rows sorts only the accounts before it), then by symbol.
    # (account, instrument) is unique, so no extra tie-breaker is needed.
    ordering = ("account_id", "instrument__symbol", "instrument_id")
    # One COUNT per page, of the filtered rows only.
    show_full_result_count = False

    account_label = account_column
    quantity_display = number_column("quantity", "quantity")
    average_cost_display = number_column("average_cost", "average cost", **PRICE)
    market_price_display = number_column("market_price", "market price", **PRICE)
    cost_basis_display = number_column("cost_basis", "cost basis", **MONEY)
    market_value_display = number_column("market_value", "market value", **MONEY)
    unrealized_pnl_display = number_column("unrealized_pnl", "unrealized P&L", **MONEY)
    average_cost_exact = number_column("average_cost", "average cost", **EXACT_HELD)
    market_price_exact = number_column("market_price", "market price", **EXACT_HELD)
    cost_basis_exact = number_column("cost_basis", "cost basis", **EXACT_HELD)
    market_value_exact = number_column("market_value", "market value", **EXACT_HELD)
    unrealized_pnl_exact = number_column("unrealized_pnl", "unrealized P&L", **EXACT_HELD)
    realized_pnl_exact = number_column("realized_pnl", "realized P&L", **EXACT_HELD)

    def get_urls(self):
        overview = self.admin_site.admin_view(self.overview_view)
        return [path("overview/", overview, name="portfolio_overview"), *super().get_urls()]

    def overview_view(self, request: HttpRequest) -> TemplateResponse:
        """Each account's values and history, and the open positions by currency and sec
        type (`ibkr_sync.overview`); ?range= picks the history's range (1m, 3m, 1y, all),
        ?from= and ?to= the days of the income (to those who may view cash transactions).
        Each section only for users who may view its kind of data (`may`); the page for
        those who may view any of them."""
        if not may_open_overview(request.user):
            raise PermissionDenied
        overview = portfolio_overview(request.GET.get("range"), user=request.user)
        income = None
        if may_view(request.user, Kind.CASH_TRANSACTIONS):
            bases = {account.pk: account.base_currency for account in overview.accounts}
            income = ledger_income(request.GET, bases, timezone.localdate())
            for account in overview.accounts if income else ():
                account.income = income.accounts.get(account.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": "Portfolio overview",
            "opts": self.opts,
            "overview": overview,
            "income": income,
            "status_panels": status_panels(request),
            "may": visible_kinds(request.user),
        }
        return TemplateResponse(request, "admin/ibkr_sync/overview.html", context)

    @admin.display(description="symbol", ordering="instrument__symbol")
    def symbol(self, obj) -> str:
        return obj.instrument.local_symbol or obj.instrument.symbol

    @admin.display(description="sec type", ordering="instrument__sec_type")
    def sec_type(self, obj) -> str:
        return obj.instrument.sec_type

    @admin.display(description="currency", ordering="instrument__currency")
    def currency(self, obj) -> str:
        return obj.instrument.currency

    @admin.display(description="open", boolean=True, ordering="closed_at")
    def is_open(self, obj) -> bool:
        return obj.closed_at is None


class CashBalanceAdmin(MirroredModelAdmin):
    list_display = (
        "account_label", "currency", "amount_display", "exchange_rate_display",
        "base_amount_display", "synced",
    )  # fmt: skip
    list_select_related = ("account",)
    list_filter = ("account", "currency")
    search_fields = ("=currency", "account__external_id")
    fields = (
        "account", "currency", "amount_exact", "exchange_rate_display", "rate_currency",
        "base_amount_display", "synced_at",
    )  # fmt: skip
    readonly_fields = fields
    ordering = ("account_id", "currency")  # unique together: a stable order

    account_label = account_column
    amount_display = number_column("amount", "amount", **MONEY)
    amount_exact = number_column("amount", "amount", **EXACT_AMOUNT)
    exchange_rate_display = number_column("exchange_rate", "IBKR exchange rate", **RATE)
    synced = when_column("synced_at", "synced at")

    @admin.display(description="in the base currency")
    def base_amount_display(self, obj) -> str:
        """amount x IBKR's rate, in cents (exact on hover), with the code of the currency
        the rate converts to, as IBKR reported it with the rate (never the account's
        present one); "-" without a rate that converts: never the amount as it is."""
        exact = obj.base_amount
        if exact is None:
            return number(None)
        return format_html(
            '<span class="num" title="{}">{} {}</span>',
            decimals.plain(exact), decimals.money(exact), obj.rate_currency,
        )  # fmt: skip


class AccountSnapshotAdmin(MirroredModelAdmin):
    list_display = (
        "account_label", "taken", "currency", "net_liquidation_display",
        "total_cash_value_display", "gross_position_value_display", "unrealized_pnl_display",
        "realized_pnl_display", "available_funds_display", "buying_power_display",
    )  # fmt: skip
    list_select_related = ("account",)
    list_filter = ("account", "currency")
    date_hierarchy = "taken_at"
    fields = (
        "account", "taken_at", "currency", "net_liquidation_exact", "total_cash_value_exact",
        "gross_position_value_exact", "unrealized_pnl_exact", "realized_pnl_exact",
        "available_funds_exact", "buying_power_exact", "exchange_rates_display", "sync_run_id",
    )  # fmt: skip
    readonly_fields = fields
    # Each account's history, the newest first (the (account, taken_at) index's order).
    ordering = ("account_id", "-taken_at", "-id")
    show_full_result_count = False

    account_label = account_column
    taken = when_column("taken_at", "taken at")
    net_liquidation_display = number_column("net_liquidation", "net liquidation", **MONEY)
    total_cash_value_display = number_column("total_cash_value", "total cash value", **MONEY)
    gross_position_value_display = number_column(
        "gross_position_value", "gross position value", **MONEY
    )
    unrealized_pnl_display = number_column("unrealized_pnl", "unrealized P&L", **MONEY)
    realized_pnl_display = number_column("realized_pnl", "realized P&L", **MONEY)
    available_funds_display = number_column("available_funds", "available funds", **MONEY)
    buying_power_display = number_column("buying_power", "buying power", **MONEY)
    # On a snapshot's page, every value exactly.
    net_liquidation_exact = number_column("net_liquidation", "net liquidation", **EXACT_AMOUNT)
    total_cash_value_exact = number_column("total_cash_value", "total cash value", **EXACT_AMOUNT)
    gross_position_value_exact = number_column(
        "gross_position_value", "gross position value", **EXACT_AMOUNT
    )
    unrealized_pnl_exact = number_column("unrealized_pnl", "unrealized P&L", **EXACT_AMOUNT)
    realized_pnl_exact = number_column("realized_pnl", "realized P&L", **EXACT_AMOUNT)
    available_funds_exact = number_column("available_funds", "available funds", **EXACT_AMOUNT)
    buying_power_exact = number_column("buying_power", "buying power", **EXACT_AMOUNT)

    @admin.display(description="IBKR exchange rates")
    def exchange_rates_display(self, obj) -> str:
        """Each rate IBKR reported, to the snapshot's currency, exactly: `EUR-USD 1.0825`."""
        if not obj.exchange_rates:
            return "-"
        return format_html_join(
            mark_safe("<br>"),
            "{}-{} {}",
            ((c, obj.currency, r) for c, r in sorted(obj.exchange_rates.items())),
        )


# --- the ledger ------------------------------------------------------------------------------


class LedgerModelAdmin(MirroredModelAdmin):
    """A kind of the ledger's rows (`kind`): shown only while the project keeps it, on the
    model the setting names (IBKR_SYNC_TRADE_MODEL ...). With the setting None the model
    is neither on the index nor open to anyone, and nothing else changes."""

    kind: Kind
    list_select_related = ("account", "instrument")
    list_per_page = 100
    show_full_result_count = False

    account_label = account_column

    def kept(self) -> bool:
        model = COVERED_BY[self.kind]()
        return model is not None and model._meta.concrete_model is self.model._meta.concrete_model

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.kept() and super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return self.kept() and super().has_view_permission(request, obj)

    @admin.display(description="symbol", ordering="instrument__symbol")
    def symbol(self, obj) -> str:
        instrument = obj.instrument
        return "-" if instrument is None else instrument.local_symbol or instrument.symbol

    @admin.display(description="sec type", ordering="instrument__sec_type")
    def sec_type(self, obj) -> str:
        return "-" if obj.instrument is None else obj.instrument.sec_type

    @admin.display(description="IBKR's attributes")
    def raw_display(self, obj) -> str:
        """Every attribute IBKR sent for the row, as it sent it: a name a line, sorted."""
        if not obj.raw:
            return "-"
        return format_html(
            '<table class="ibkr-attributes"><tbody>{}</tbody></table>',
            format_html_join(
                "",
                '<tr><th scope="row">{}</th><td>{}</td></tr>',
                sorted((str(k), str(v)) for k, v in obj.raw.items()),
            ),
        )


class TradeAdmin(LedgerModelAdmin):
    kind = Kind.TRADES
    list_display = (
        "account_label", "trade_date", "symbol", "sec_type", "buy_sell", "quantity_display",
        "price_display", "proceeds_display", "commission_display", "currency",
        "realized_pnl_display", "cancelled", "external_id",
    )  # fmt: skip
    list_filter = ("account", "currency", "cancelled", "buy_sell")
    search_fields = (
        "instrument__symbol", "instrument__local_symbol", "instrument__description",
        "=external_id",
    )  # fmt: skip
    date_hierarchy = "trade_date"
    fields = (
        "account", "instrument", "external_id", "trade_date", "traded_at", "settle_date",
        "buy_sell", "quantity_display", "price_exact", "proceeds_exact", "commission_exact",
        "commission_currency", "currency", "realized_pnl_exact", "fx_rate_to_base_display",
        "cancelled", "raw_display", "created_at", "updated_at",
    )  # fmt: skip
    readonly_fields = fields
    # The newest first, ties the last stored first: the (trade_date, id) index's order.
    ordering = ("-trade_date", "-id")

    quantity_display = number_column("quantity", "quantity")
    price_display = number_column("price", "price", **PRICE)
    proceeds_display = number_column("proceeds", "proceeds", **MONEY)
    commission_display = number_column("commission", "commission", **MONEY)
    realized_pnl_display = number_column("realized_pnl", "realized P&L", **MONEY)
    price_exact = number_column("price", "price", **EXACT_AMOUNT)
    proceeds_exact = number_column("proceeds", "proceeds", **EXACT_AMOUNT)
    commission_exact = number_column(
        "commission", "commission", **EXACT, currency="commission_currency"
    )
    realized_pnl_exact = number_column("realized_pnl", "realized P&L", **EXACT_AMOUNT)
    fx_rate_to_base_display = number_column("fx_rate_to_base", "IBKR rate to base", **RATE)


class CashTransactionAdmin(LedgerModelAdmin):
    kind = Kind.CASH_TRANSACTIONS
    list_display = (
        "account_label", "date", "kind", "symbol", "amount_display", "currency",
        "fx_rate_to_base_display", "description", "external_id",
    )  # fmt: skip
    list_filter = ("account", "kind", "currency")
    search_fields = (
        "instrument__symbol", "instrument__local_symbol", "description", "=external_id",
    )  # fmt: skip
    date_hierarchy = "date"
    fields = (
        "account", "instrument", "external_id", "kind", "type", "date", "amount_exact",
        "currency", "fx_rate_to_base_display", "description", "dividend_external_id",
        "raw_display", "created_at", "updated_at",
    )  # fmt: skip
    readonly_fields = fields
    ordering = ("-date", "-id")

    amount_display = number_column("amount", "amount", **MONEY)
    amount_exact = number_column("amount", "amount", **EXACT_AMOUNT)
    fx_rate_to_base_display = number_column("fx_rate_to_base", "IBKR rate to base", **RATE)


class CorporateActionAdmin(LedgerModelAdmin):
    kind = Kind.CORPORATE_ACTIONS
    list_display = (
        "account_label", "date", "type", "symbol", "quantity_display", "amount_display",
        "currency", "description", "external_id",
    )  # fmt: skip
    list_filter = ("account", "type", "currency")
    search_fields = (
        "instrument__symbol", "instrument__local_symbol", "description", "=external_id",
        "=action_id",
    )  # fmt: skip
    date_hierarchy = "date"
    fields = (
        "account", "instrument", "external_id", "action_id", "type", "date",
        "quantity_display", "amount_exact", "currency", "description", "raw_display",
        "created_at", "updated_at",
    )  # fmt: skip
    readonly_fields = fields
    ordering = ("-date", "-id")

    quantity_display = number_column("quantity", "quantity")
    amount_display = number_column("amount", "amount", **MONEY)
    amount_exact = number_column("amount", "amount", **EXACT_AMOUNT)
