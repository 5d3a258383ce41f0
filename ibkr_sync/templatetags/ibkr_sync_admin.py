"""The admin's "Sync now" control, for any admin page that wants it (sync runs, positions,
accounts). It renders nothing for users without `ibkr_sync.run_sync`."""

from decimal import Decimal

from django import template

from .. import conf
from ..decimals import plain as plain_decimal
from ..mapping import BROKER
from ..models import Connection

register = template.Library()


@register.inclusion_tag("admin/ibkr_sync/sync_now_form.html", takes_context=True)
def sync_now_form(context) -> dict:
    request = context["request"]
    if not request.user.has_perm("ibkr_sync.run_sync"):
        return {"can_run_sync": False}
    accounts = list(
        conf.account_model()
        .objects.filter(broker=BROKER)
        .order_by("external_id")
        .values_list("pk", "external_id")
    )
    # On a changelist filtered to one account (its own filter, or a link from the
    # account's page), offer to sync that account.
    chosen = request.GET.get("account__id__exact", "")
    # With several connections a sync names one: offered are the enabled ones. With one,
    # or none (the settings' gateway), there is nothing to choose.
    names = list(Connection.objects.order_by("name").values_list("name", "enabled"))
    offered = [name for name, enabled in names if enabled] if len(names) > 1 else []
    return {
        "can_run_sync": True,
        "accounts": [(external_id, str(pk) == chosen) for pk, external_id in accounts],
        "connections": offered,
        "several_connections": len(names) > 1,
        "next": request.get_full_path(),
    }


@register.filter
def plain(value: Decimal | None) -> str:
    """A Decimal as the admin shows it: 0.5, not 0.5000000000; "-" for none."""
    return "-" if value is None else plain_decimal(value)
