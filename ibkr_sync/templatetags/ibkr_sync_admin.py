"""The admin's "Sync now" control, for any admin page that wants it (sync runs, positions,
accounts). It renders nothing for users without `ibkr_sync.run_sync`."""

from decimal import Decimal

from django import template
from django.db.models import BooleanField, ExpressionWrapper

from .. import conf, visibility
from ..decimals import plain as plain_decimal
from ..mapping import BROKER
from ..models import Connection

register = template.Library()


@register.inclusion_tag("admin/ibkr_sync/sync_now_form.html", takes_context=True)
def sync_now_form(context) -> dict:
    request = context["request"]
    if not request.user.has_perm("ibkr_sync.run_sync"):
        return {"can_run_sync": False}
    # The accounts and connections the user may see, and so sync (`visibility`).
    accounts = list(
        visibility.visible(conf.account_model().objects.filter(broker=BROKER), request.user, "")
        .order_by("external_id")
        .values_list("pk", "external_id")
    )
    # On a changelist filtered to one account (its own filter, or a link from the
    # account's page), offer to sync that account.
    chosen = request.GET.get("account__id__exact", "")
    # With several connections a sync names one: offered are the enabled ones the user
    # may sync. With one, or none (the settings' gateway), there is nothing to choose.
    names = list(
        Connection.objects.order_by("name")
        .annotate(mine=ExpressionWrapper(visibility.connections_seen(request.user), BooleanField()))
        .values_list("name", "enabled", "mine")
    )
    several = len(names) > 1
    offered = [name for name, enabled, mine in names if enabled and mine] if several else []
    return {
        "can_run_sync": True,
        "accounts": [(external_id, str(pk) == chosen) for pk, external_id in accounts],
        "connections": offered,
        "several_connections": several,
        "next": request.get_full_path(),
    }


@register.filter
def plain(value: Decimal | None) -> str:
    """A Decimal as the admin shows it: 0.5, not 0.5000000000; "-" for none."""
    return "-" if value is None else plain_decimal(value)
