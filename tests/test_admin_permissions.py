"""The admin shows each kind of data only to users holding its view permission, exactly as
the read API decides (`ibkr_sync.permissions`): every admin page x every view permission
(and none, and a few combinations), asserting what is on the page and what is not. The
fixture's values are distinctive, so their absence means something."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from ibkr_sync import permissions
from ibkr_sync.exceptions import GatewayUnavailable
from ibkr_sync.models import Connection, SyncRun
from ibkr_sync.permissions import Kind
from ibkr_sync.services import sync_positions
from portfolio.models import (
    Account,
    AccountSnapshot,
    CashBalance,
    CashTransaction,
    CorporateAction,
    Instrument,
    Position,
    Trade,
)
from tests.conftest import FakeGateway, position
from tests.integration.conftest import OTHER
from tests.values import cash, snapshot

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:portfolio_overview")
HOST_PORT = "10.9.8.7:4999"

#: What only a user who may view each kind of data may find anywhere in the admin.
MARKERS = {
    Kind.POSITIONS: ("2468.135", "246.8135"),  # a cost basis; an average cost
    Kind.POSITION_CHANGES: ("246.8135",),  # the average cost after, in a run's changes
    Kind.CASH_BALANCES: ("987654.32", "987,654.32"),
    Kind.ACCOUNT_SNAPSHOTS: ("1234567.89", "1,234,567.89"),  # a net liquidation
    Kind.ACCOUNTS: ("Zanzibar Trust",),  # an account's name
    Kind.INSTRUMENTS: ("Quux Widget Holdings",),  # an instrument's description
    Kind.SYNC_RUNS: (HOST_PORT,),  # a failed run's message
    Kind.CONNECTIONS: ("marigold-gw.lan",),  # a connection's host
    Kind.TRADES: ("31415.9265",),  # a trade's price
    Kind.CASH_TRANSACTIONS: ("Quokka Dividend",),  # a cash transaction's description
    Kind.CORPORATE_ACTIONS: ("Wombat Split",),  # a corporate action's description
}

#: Each registered model's pages show its own kind.
MODELS = {
    Account: Kind.ACCOUNTS,
    Instrument: Kind.INSTRUMENTS,
    Position: Kind.POSITIONS,
    CashBalance: Kind.CASH_BALANCES,
    AccountSnapshot: Kind.ACCOUNT_SNAPSHOTS,
    SyncRun: Kind.SYNC_RUNS,
    Connection: Kind.CONNECTIONS,
    Trade: Kind.TRADES,
    CashTransaction: Kind.CASH_TRANSACTIONS,
    CorporateAction: Kind.CORPORATE_ACTIONS,
}

VIEW_PERMISSIONS = {
    "view_account": Kind.ACCOUNTS,
    "view_instrument": Kind.INSTRUMENTS,
    "view_position": Kind.POSITIONS,
    "view_cashbalance": Kind.CASH_BALANCES,
    "view_accountsnapshot": Kind.ACCOUNT_SNAPSHOTS,
    "view_syncrun": Kind.SYNC_RUNS,
    "view_connection": Kind.CONNECTIONS,
    "view_trade": Kind.TRADES,
    "view_cashtransaction": Kind.CASH_TRANSACTIONS,
    "view_corporateaction": Kind.CORPORATE_ACTIONS,
}

#: Every single view permission, none, and combinations that meet on one page.
GRANTS = [
    (),
    *((codename,) for codename in VIEW_PERMISSIONS),
    ("view_syncrun", "view_position"),
    ("view_position", "view_cashbalance"),
    ("view_position", "view_accountsnapshot"),
    ("view_accountsnapshot", "view_syncrun"),
    ("view_connection", "view_syncrun"),
    tuple(VIEW_PERMISSIONS),
]


def grant_id(grant: tuple[str, ...]) -> str:
    return "+".join(grant) or "none"


@pytest.fixture
def data():
    """One account with a name, an instrument with a description, an AAPL position (its
    cost basis and average cost), EUR cash, a net liquidation, a successful sync that
    created the positions and a later failed one naming the gateway's host and port."""
    gateway = FakeGateway(
        positions=[
            position(quantity="10", average_cost="246.8135"),
            position(con_id=555, symbol="SAP", currency="EUR", quantity="3", average_cost="9"),
        ]
    )
    Connection.objects.create(name="marigold", host="marigold-gw.lan", port=4002, client_id=8)
    success = sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    account = Account.objects.get()
    Account.objects.filter(pk=account.pk).update(name="Zanzibar Trust", base_currency="USD")
    Instrument.objects.filter(symbol="AAPL").update(description="Quux Widget Holdings")
    cash(account, "EUR", "987654.32", "1.085")
    snapshot(
        account, timezone.now() - dt.timedelta(days=1), "1234567.89",
        exchange_rates={"USD": "1", "EUR": "1.085"},
    )  # fmt: skip
    aapl = Instrument.objects.get(symbol="AAPL")
    Trade.objects.create(
        broker="ibkr", external_id="T1", account=account, instrument=aapl,
        buy_sell="BUY", quantity=1, price="31415.9265", currency="USD",
    )  # fmt: skip
    CashTransaction.objects.create(
        broker="ibkr", external_id="C1", account=account, instrument=aapl, kind="dividend",
        amount="1", currency="USD", description="Quokka Dividend",
    )  # fmt: skip
    CorporateAction.objects.create(
        broker="ibkr", external_id="A1", account=account, instrument=aapl, type="FS",
        description="Wombat Split",
    )  # fmt: skip
    gateway.error = GatewayUnavailable(f"Cannot connect to the IB gateway at {HOST_PORT}.")
    with pytest.raises(GatewayUnavailable):
        sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    return {
        "success": SyncRun.objects.get(pk=success.sync_run_id),
        "failed": SyncRun.objects.get(status="failed"),
    }


def staff_with(django_user_model, grant: tuple[str, ...]) -> Client:
    user = django_user_model.objects.create_user("staff", password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=grant))
    client = Client()
    client.force_login(user)
    return client


def admin_prefix(model) -> str:
    return f"/admin/{model._meta.app_label}/{model._meta.model_name}/"


def pages(data) -> dict[str, tuple[str, Kind | None]]:
    """Every admin page: its URL and the kind it needs (None: any staff)."""
    found = {"index": (reverse("admin:index"), None), "overview": (OVERVIEW, None)}
    for model, kind in MODELS.items():
        name = f"{model._meta.app_label}_{model._meta.model_name}"
        found[f"{name} list"] = (reverse(f"admin:{name}_changelist"), kind)
        obj = data["failed"] if model is SyncRun else model.objects.order_by("pk").first()
        found[f"{name} page"] = (reverse(f"admin:{name}_change", args=[obj.pk]), kind)
    found["successful run's page"] = (
        reverse("admin:ibkr_sync_syncrun_change", args=[data["success"].pk]),
        Kind.SYNC_RUNS,
    )
    return found


def present(html: str, kind: Kind) -> bool:
    return any(marker in html for marker in MARKERS[kind])


def links_to(html: str, model) -> list[str]:
    """The page's links to `model`'s admin pages (the overview, which lives under the
    position admin's URLs, is not one)."""
    return [
        href
        for href in re.findall(r'(?:href|action)="([^"]*)"', html)
        if href.startswith(admin_prefix(model)) and not href.startswith(OVERVIEW)
    ]


@pytest.mark.parametrize("grant", GRANTS, ids=grant_id)
def test_every_page_shows_each_kind_only_to_users_who_may_view_it(django_user_model, data, grant):
    client = staff_with(django_user_model, grant)
    may = {kind: False for kind in Kind}
    for codename in grant:
        may[VIEW_PERMISSIONS[codename]] = True
    may[Kind.POSITION_CHANGES] = may[Kind.POSITIONS]
    # The table agrees with what was granted.
    user = django_user_model.objects.get(username="staff")
    assert {k: permissions.may_view(user, k) for k in Kind} == may
    overview_kinds = (Kind.ACCOUNTS, Kind.ACCOUNT_SNAPSHOTS, Kind.CASH_BALANCES, Kind.POSITIONS)

    for page, (url, needs) in pages(data).items():
        response = client.get(url)
        if page == "overview":
            allowed = any(may[k] for k in overview_kinds)
        else:
            allowed = needs is None or may[needs]
        assert response.status_code == (200 if allowed else 403), (page, response.status_code)
        if not allowed:
            continue
        html = response.text
        for kind in Kind:
            if not may[kind]:
                assert not present(html, kind), f"{page} shows {kind.value} to {grant}"
        for model, kind in MODELS.items():
            if not may[kind]:
                assert links_to(html, model) == [], f"{page} links to {kind.value}"
        # What the page is for is there.
        if needs is not None and page not in ("successful run's page", "portfolio_instrument list"):
            assert present(html, needs), (page, needs)  # (an instrument's list: no description)
        if page == "successful run's page":
            assert present(html, Kind.POSITION_CHANGES) == may[Kind.POSITIONS]
            assert ("What this sync changed" in html) == may[Kind.POSITIONS]
        if page == "overview":
            for kind in (*overview_kinds, Kind.SYNC_RUNS):
                assert present(html, kind) == may[kind], (kind, grant)
            assert ("last successful ibkr sync" in html.lower()) == may[Kind.SYNC_RUNS]
        if page == "index":
            assert (f'href="{OVERVIEW}"' in html) == any(may[k] for k in overview_kinds)


#: The grants that open the overview (the matrix above: the others are refused).
OVERVIEW_GRANTS = [
    grant
    for grant in GRANTS
    if {"view_account", "view_position", "view_cashbalance", "view_accountsnapshot"} & set(grant)
]


@pytest.mark.parametrize("grant", OVERVIEW_GRANTS, ids=grant_id)
def test_the_overview_leaves_out_what_the_user_may_not_see(django_user_model, data, grant):
    """No heading, placeholder or link of a section the user may not see."""
    html = staff_with(django_user_model, grant).get(OVERVIEW).text

    sections = {
        "view_cashbalance": ("<h3>Cash</h3>", "No cash balances"),
        "view_accountsnapshot": ("Net liquidation", 'class="history-ranges"'),
        "view_position": ("<h3>Open positions</h3>", 'id="by-currency"', 'id="by-sec-type"'),
        "view_syncrun": ('id="ibkr-sync-status"', "Sync history"),
    }
    for codename, texts in sections.items():
        for text in texts:
            if codename == "view_cashbalance" and text == "No cash balances":
                assert text not in html  # the account has cash: never the placeholder
                continue
            assert (text in html) == (codename in grant), (text, grant)
    # The positions' amounts in the base currency are converted at the rates IBKR sent with
    # the latest values: the account snapshot's.
    shown = "view_position" in grant and "view_accountsnapshot" in grant
    assert ('class="in-base"' in html) == shown, grant


@pytest.mark.parametrize(("codename", "endpoint"), [
    ("view_account", "/portfolio/accounts"),
    ("view_position", "/portfolio/positions"),
    ("view_cashbalance", "/portfolio/cash"),
    ("view_accountsnapshot", "/portfolio/accounts/U1111111/history"),
    ("view_syncrun", "/portfolio/sync/runs"),
    ("view_trade", "/portfolio/trades"),
    ("view_cashtransaction", "/portfolio/cash-transactions"),
])  # fmt: skip
@pytest.mark.parametrize("grant", GRANTS, ids=grant_id)
def test_the_read_api_and_the_admin_decide_alike(django_user_model, data, grant, codename,
                                                  endpoint):  # fmt: skip
    client = staff_with(django_user_model, grant)
    kind = VIEW_PERMISSIONS[codename]
    user = django_user_model.objects.get(username="staff")

    api = client.get(endpoint).status_code
    admin = client.get(reverse("admin:index")).text

    assert api == (200 if codename in grant else 403)
    assert permissions.may_view(user, kind) == (api == 200)
    listed = next(m for m, k in MODELS.items() if k is kind)
    assert (f'href="{admin_prefix(listed)}"' in admin) == (api == 200)


def test_every_registered_model_is_one_kind_of_data():
    """A model in the admin that the table did not know would be shown by its own
    permission only, whatever it reveals: every one of the app's is in the table."""
    from django.contrib import admin

    for model in admin.site._registry:
        if model._meta.app_label in ("portfolio", "ibkr_sync"):
            assert permissions.kind_of(model) is not None, model


def test_the_permissions_come_from_the_configured_models(settings):
    assert permissions.permission(Kind.POSITIONS) == "portfolio.view_position"
    assert permissions.permission(Kind.POSITION_CHANGES) == "portfolio.view_position"
    assert permissions.permission(Kind.SYNC_RUNS) == "ibkr_sync.view_syncrun"

    # A host's own models (here: any installed model of another app).
    settings.IBKR_SYNC_POSITION_MODEL = "auth.Group"
    settings.IBKR_SYNC_CASH_BALANCE_MODEL = "auth.User"

    assert permissions.permission(Kind.POSITIONS) == "auth.view_group"
    assert permissions.permission(Kind.POSITION_CHANGES) == "auth.view_group"
    assert permissions.permission(Kind.CASH_BALANCES) == "auth.view_user"
    from django.contrib.auth.models import Group

    assert permissions.kind_of(Group) is Kind.POSITIONS


def test_without_a_ledger_nobody_may_view_it_and_no_model_is_it(settings, admin_user):
    settings.IBKR_SYNC_TRADE_MODEL = None
    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None
    settings.IBKR_SYNC_CORPORATE_ACTION_MODEL = None

    for kind in (Kind.TRADES, Kind.CASH_TRANSACTIONS, Kind.CORPORATE_ACTIONS):
        assert permissions.permission(kind) is None
        assert permissions.may_view(admin_user, kind) is False  # not even a superuser
    assert permissions.kind_of(Trade) is None
    assert permissions.permission_for_rows(Trade) == "portfolio.view_trade"
    assert permissions.visible_kinds(admin_user)["positions"] is True
    assert permissions.visible_kinds(admin_user)["trades"] is False


# --- Sync now's messages ---------------------------------------------------------------------

SYNC_NOW = reverse("admin:ibkr_sync_syncrun_sync_now")


def sync_now(django_user_model, grant) -> str:
    """Sync now by a staff user who may sync and holds `grant`, through the real client
    against the simulator; the message, back on the admin index (every staff user may
    open it)."""
    client = staff_with(django_user_model, (*grant, "run_sync"))
    response = client.post(SYNC_NOW, {"next": reverse("admin:index")}, follow=True)
    assert response.status_code == 200
    [message] = list(response.context["messages"])
    return message.message


@pytest.mark.parametrize("grant", GRANTS, ids=grant_id)
def test_a_failed_sync_now_names_the_gateway_only_to_sync_run_viewers(
    django_user_model, ibkr, grant
):
    ibkr.set_faults(refuse_connections=True)

    text = sync_now(django_user_model, grant)

    run = SyncRun.objects.get()
    assert run.status == "failed"
    address = f"127.0.0.1:{ibkr.port}"
    assert address in run.error_message
    if "view_syncrun" in grant:
        assert text == f"Sync failed: {run.error_message}"
    else:
        assert text == "Sync failed (gateway_unavailable); nothing was changed."
        assert address not in text


@pytest.mark.parametrize("grant", GRANTS, ids=grant_id)
def test_a_finished_sync_now_tells_each_user_what_they_may_view(django_user_model, ibkr, grant):
    ibkr.set_faults(values_error={OTHER: (2101, "Max number of accounts exceeded")})

    text = sync_now(django_user_model, grant)

    run = SyncRun.objects.get()
    assert run.status == "success"
    runs, positions = "view_syncrun" in grant, "view_position" in grant
    link = f'href="{reverse("admin:ibkr_sync_syncrun_change", args=[run.pk])}"'
    assert (link in text) == runs
    assert f"Sync #{run.pk}" in text
    counts = f"{run.created} created"
    assert (counts in text) == (runs or positions), "the counts: the run's, or its changes'"
    assert (OTHER in text) == runs, "which accounts' values were missing, and why"
    assert ("2101" in text) == runs
    if not (runs or positions):
        assert text == f"Sync #{run.pk} finished with warnings."
    for kind in (Kind.POSITIONS, Kind.CASH_BALANCES, Kind.ACCOUNTS):
        assert not present(text, kind)


@pytest.mark.parametrize(
    "grant", [("view_syncrun",), ("view_syncrun", "view_position")], ids=grant_id
)
def test_a_runs_records_not_stored_are_position_data_on_its_page(django_user_model, grant):
    run = SyncRun.objects.create(
        trigger="command", status="success", processed=2, errors=1, finished_at=timezone.now(),
        error_details=[{"account": "U1111111", "con_id": 5, "symbol": "ODDSYMBOL",
                        "sec_type": "NOPE", "reason": "unsupported security type 'NOPE'"}],
    )  # fmt: skip

    html = (
        staff_with(django_user_model, grant)
        .get(reverse("admin:ibkr_sync_syncrun_change", args=[run.pk]))
        .text
    )

    shown = "view_position" in grant
    assert ("ODDSYMBOL" in html) == shown
    assert ("records not stored" in html.lower()) == shown
    assert "2 positions: 1 not stored" in html, "the count is sync run data"
