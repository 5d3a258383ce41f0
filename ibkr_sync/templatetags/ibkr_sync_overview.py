"""The admin index's link to the portfolio overview: only for users who may open it, and
naming only what they may see there (`ibkr_sync.admin.portfolio.OVERVIEW_KINDS`)."""

from django import template

from ..permissions import Kind, may_view

register = template.Library()

#: What the link says the overview holds, per kind of data, in the page's order.
CONTENTS = (
    (Kind.ACCOUNT_SNAPSHOTS, "net liquidation and its history"),
    (Kind.CASH_BALANCES, "cash"),
    (Kind.POSITIONS, "market value and P&L by account, currency and sec type"),
    (Kind.SYNC_RUNS, "the last sync"),
)


@register.inclusion_tag("admin/ibkr_sync/overview_link.html", takes_context=True)
def overview_link(context) -> dict:
    from ..admin.portfolio import may_open_overview

    user = context["request"].user
    if not may_open_overview(user):
        return {"shown": False}
    contents = "; ".join(text for kind, text in CONTENTS if may_view(user, kind))
    contents = contents or "the accounts"
    return {"shown": True, "contents": contents[0].upper() + contents[1:]}
