"""Attacks on the values rules with more cases of the same kinds: the real IB client over
TCP against the simulator, on the real database, read back through the API."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, AccountSnapshot, CashBalance
from tests.integration.conftest import ACCOUNT

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def values(ibkr, settings):
    """ACCOUNT (base USD) with cash in USD, EUR and JPY."""
    settings.IBKR_VALUES_TIMEOUT = 1
    ibkr.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25", "JPY": "1000000"})
    return ibkr


def sync():
    return sync_positions(trigger="command")


def client_with(django_user_model, *codenames):
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = APIClient()
    client.force_authenticate(user)
    return client


# --- what a sync run tells is no kind of data its readers may not view ----------------------


def test_a_cash_kept_reason_tells_no_cash_amount(values, monkeypatch, django_user_model):
    """A download with only IBKR's BASE total of the cash keeps the stored rows and says
    why; the reason is read by sync run viewers (the API's run, the admin's run page),
    who may not view cash: it names no amount."""
    real = values._account_values
    sent = {}

    def base_only(account):
        rows = [r for r in real(account) if r[0] != "CashBalance" or r[2] == "BASE"]
        if account == ACCOUNT:
            sent.update({(r[0], r[2]): r[1] for r in rows if r[0] == "CashBalance"})
        return rows

    monkeypatch.setattr(values, "_account_values", base_only)
    result = sync()

    total = sent["CashBalance", "BASE"]
    assert Decimal(total) != 0
    reason = result.account_values[ACCOUNT]["cash_kept_reason"]
    assert "only the BASE total" in reason
    run = client_with(django_user_model, "view_syncrun").get(
        f"/portfolio/sync/runs/{result.sync_run_id}"
    )
    assert run.status_code == 200
    text = run.content.decode()
    assert "only the BASE total" in text
    for shown in {total, str(Decimal(total).normalize()), f"{Decimal(total):,}"}:
        assert shown not in text
    assert total not in str(SyncRun.objects.get(pk=result.sync_run_id).account_values)


# --- one base currency, or none -------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        ["6", "2", "NetLiquidation", "90", "EUR", ACCOUNT],
        ["6", "2", "TotalCashValue", "90", "eur", ACCOUNT],
    ],
    ids=["net liquidation in two", "total cash in another"],
)
def test_totals_in_two_currencies_name_no_base_currency(values, frame):
    """IBKR gives the account's totals in its base currency. A download that gives them in
    two cannot say which the rates convert to: no base currency, no rate kept under one
    (an errors entry says why), the account's base currency as it was."""
    sync()
    assert Account.objects.get(external_id=ACCOUNT).base_currency == "USD"
    values.set_faults(value_frames={ACCOUNT: [frame]})

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read"
    assert result.account_values[ACCOUNT]["base_currency"] == ""
    assert any(
        e["account"] == ACCOUNT and "EUR" in e["reason"] and "USD" in e["reason"]
        for e in result.errors
    )
    latest = AccountSnapshot.objects.filter(account__external_id=ACCOUNT).latest("taken_at")
    assert latest.currency == "" and latest.exchange_rates == {}
    assert latest.net_liquidation is None and latest.total_cash_value is None
    assert Account.objects.get(external_id=ACCOUNT).base_currency == "USD"
    # No cash row converts to a currency the download did not establish.
    for row in CashBalance.objects.filter(account__external_id=ACCOUNT):
        assert row.rate_currency in ("", "USD") and (row.rate_currency or row.base_amount is None)
    assert not CashBalance.objects.filter(
        account__external_id=ACCOUNT, synced_at=latest.taken_at, rate_currency="USD"
    ).exists()
