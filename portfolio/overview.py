"""The portfolio overview: net cost basis of open positions by account, currency and sec
type, aggregated in the database, with a small bar chart drawn on the server.

Amounts in different currencies are never added together: every total is per currency.
Other apps add their own status (e.g. when the broker was last synced) through
`register_status_panel`, so this domain module needs to know none of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from django.db.models import Count, Q, Sum
from django.http import HttpRequest

from .decimals import plain
from .models import Position

StatusPanel = Callable[[HttpRequest], str]
_status_panels: list[StatusPanel] = []


def register_status_panel(panel: StatusPanel) -> StatusPanel:
    """Show `panel(request)` (safe HTML; empty for nothing) at the top of the overview."""
    if panel not in _status_panels:
        _status_panels.append(panel)
    return panel


def status_panels(request: HttpRequest) -> list[str]:
    return [html for panel in _status_panels if (html := panel(request))]


@dataclass
class Subtotal:
    """Open positions of one group, in one currency."""

    currency: str
    positions: int = 0
    cost_basis: Decimal = Decimal(0)
    # Positions whose average cost the broker did not report: not in `cost_basis`.
    without_cost_basis: int = 0

    @property
    def display(self) -> str:
        return money(self.cost_basis)

    @property
    def exact(self) -> str:
        return plain(self.cost_basis)

    def add(self, positions: int, cost_basis: Decimal | None, without: int) -> None:
        self.positions += positions
        self.cost_basis += cost_basis or 0
        self.without_cost_basis += without


@dataclass
class AccountSummary:
    pk: int
    external_id: str
    name: str
    by_currency: list[Subtotal] = field(default_factory=list)


@dataclass
class CurrencySummary:
    total: Subtotal
    by_sec_type: list[tuple[str, Subtotal]] = field(default_factory=list)
    chart: dict | None = None


@dataclass
class Overview:
    accounts: list[AccountSummary]
    currencies: list[CurrencySummary]

    @property
    def positions(self) -> int:
        return sum(c.total.positions for c in self.currencies)


def cost_basis_overview() -> Overview:
    """One grouped query over the open positions, however many there are."""
    groups = (
        Position.objects.filter(closed_at__isnull=True)
        .values(
            "account_id",
            "account__external_id",
            "account__name",
            "instrument__currency",
            "instrument__sec_type",
        )
        .annotate(
            n=Count("id"),
            total=Sum("cost_basis"),
            without=Count("id", filter=Q(cost_basis__isnull=True)),
        )
        .order_by()
    )
    accounts: dict[int, AccountSummary] = {}
    by_account: dict[tuple[int, str], Subtotal] = {}
    by_currency: dict[str, Subtotal] = {}
    by_sec_type: dict[str, dict[str, Subtotal]] = defaultdict(dict)
    for row in groups:
        currency, sec_type = row["instrument__currency"], row["instrument__sec_type"]
        account = accounts.setdefault(
            row["account_id"],
            AccountSummary(row["account_id"], row["account__external_id"], row["account__name"]),
        )
        targets = (
            by_account.setdefault((account.pk, currency), Subtotal(currency)),
            by_currency.setdefault(currency, Subtotal(currency)),
            by_sec_type[currency].setdefault(sec_type, Subtotal(currency)),
        )
        for subtotal in targets:
            subtotal.add(row["n"], row["total"], row["without"])

    for (pk, _currency), subtotal in sorted(by_account.items()):
        accounts[pk].by_currency.append(subtotal)
    currencies = []
    for currency in sorted(by_currency):
        sec_types = sorted(
            by_sec_type[currency].items(), key=lambda item: (-abs(item[1].cost_basis), item[0])
        )
        currencies.append(
            CurrencySummary(
                total=by_currency[currency],
                by_sec_type=sec_types,
                chart=bar_chart([(label, s.cost_basis) for label, s in sec_types]),
            )
        )
    return Overview(
        accounts=sorted(accounts.values(), key=lambda a: a.external_id), currencies=currencies
    )


def money(value: Decimal) -> str:
    """Two decimals with thousands separators: 1,234,567.89 (the exact value is kept for
    a tooltip)."""
    return f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,}"


# Chart geometry, in SVG user units.
CHART_WIDTH = 560
LABEL_WIDTH = 70
VALUE_WIDTH = 130
BAR_HEIGHT = 18
BAR_GAP = 8


def bar_chart(items: list[tuple[str, Decimal]]) -> dict | None:
    """Horizontal bars, one per label, around a zero line (shorts are negative), scaled
    to the largest amount. Plain numbers for an inline SVG: no script, nothing fetched."""
    if not items:
        return None
    plot = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    most = max(max((v for _, v in items), default=0), 0)
    least = min(min((v for _, v in items), default=0), 0)
    span = (most - least) or Decimal(1)
    zero = LABEL_WIDTH + float((-least) / span) * plot
    bars = []
    for index, (label, value) in enumerate(items):
        length = float(abs(value) / span) * plot
        y = BAR_GAP + index * (BAR_HEIGHT + BAR_GAP)
        bars.append(
            {
                "label": label,
                "value": money(value),
                "x": round(zero - length if value < 0 else zero, 1),
                "width": round(max(length, 1.0), 1),
                "y": y,
                "text_y": y + BAR_HEIGHT * 0.72,
                "negative": value < 0,
            }
        )
    return {
        "width": CHART_WIDTH,
        "height": BAR_GAP + len(items) * (BAR_HEIGHT + BAR_GAP),
        "zero": round(zero, 1),
        "value_x": CHART_WIDTH - VALUE_WIDTH + 6,
        "bars": bars,
    }
