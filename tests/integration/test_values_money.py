"""No amount is stored, shown or converted under a label that is not true: the real IB
client over TCP against the simulator, on the real database, read back through the
API, the command, the admin and the overview.

The rules: a currency is a code in one form (`usd` is USD; anything else an errors
entry, never a row or a base currency); only a positive rate converts (any other is no
rate, an errors entry naming it, and the overview says why); every rate IBKR reports is
kept, with or without cash in its currency, and converts the positions' values; the
stored cash is replaced only by a whole, readable set of balances, else kept exactly
and the outcome says why; a rate is used only for a total in the currency it converts
to, as IBKR reported it.
"""

import html as entities
import json
import re
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse

from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, AccountSnapshot, CashBalance, Instrument, Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

OVERVIEW = reverse("admin:portfolio_overview")
TIMES = "\N{MULTIPLICATION SIGN}"


@pytest.fixture
def values(ibkr, settings):
    """ACCOUNT (base USD) with cash in USD, EUR and JPY."""
    settings.IBKR_VALUES_TIMEOUT = 1
    ibkr.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25", "JPY": "1000000"})
    return ibkr


def sync(**kwargs):
    return sync_positions(trigger="command", **kwargs)


def stored_cash(account=ACCOUNT):
    """Every column of the account's cash rows, as stored."""
    return sorted(
        CashBalance.objects.filter(account__external_id=account).values_list(
            "pk", "currency", "amount", "exchange_rate", "rate_currency", "synced_at"
        )
    )


def leave_out(sim, monkeypatch, keep):
    """Make the simulator send only the account values `keep(account, tag, currency)`
    accepts (as a TWS that sends fewer rows would)."""
    real = sim._account_values
    monkeypatch.setattr(
        sim,
        "_account_values",
        lambda account: [row for row in real(account) if keep(account, row[0], row[2])],
    )


def account_section(html, account):
    pk = Account.objects.get(external_id=account).pk
    start = html.index(f'id="account-{pk}"')
    return html[start : html.index('<div class="module', start + 1)]


def cells(html, attributes):
    found = re.search(rf"<tr {attributes}>.*?</tr>", html, re.S).group()
    return [
        " ".join(entities.unescape(re.sub(r"<[^>]+>", " ", cell)).split())
        for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", found, re.S)
    ]


def table(html, css_class):
    return re.search(rf'<table class="{css_class}">.*?</table>', html, re.S).group()


# --- exchange rates: only a positive, finite rate converts --------------------------------


@pytest.mark.parametrize(
    ("sent", "stored", "why"),
    [
        ("0", Decimal(0), "IBKR's EUR rate 0 is not a positive rate"),
        ("-1.0825", Decimal("-1.0825"), "IBKR's EUR rate -1.0825 is not a positive rate"),
        ("", None, "IBKR reported no EUR-USD rate"),
    ],
)
def test_a_rate_that_does_not_convert_is_no_rate_anywhere(values, admin_client, sent, stored, why):
    values.set_faults(value_edits={ACCOUNT: {"ExchangeRate:EUR": sent}})

    result = sync()

    # An errors entry naming the currency and the rate.
    [error] = [e for e in result.errors if e["reason"].startswith("ExchangeRate (EUR)")]
    assert error["account"] == ACCOUNT
    assert (f"{sent} is not a positive rate" if sent else "IBKR sent no value") in error["reason"]
    # The balance is stored, its rate converts nothing; the snapshot keeps the others.
    eur = CashBalance.objects.get(account__external_id=ACCOUNT, currency="EUR")
    assert (eur.amount, eur.exchange_rate, eur.base_amount) == (Decimal("5000.25"), stored, None)
    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    assert snapshot.exchange_rates == {"JPY": "0.0067245", "USD": "1"}

    body = admin_client.get("/portfolio/cash?currency=EUR").json()["results"]
    assert [(r["account"], r["base_amount"]) for r in body] == [(ACCOUNT, None)]

    html = account_section(admin_client.get(OVERVIEW).text, ACCOUNT)
    cash = table(html, "cash")
    assert cells(cash, 'data-currency="EUR"')[-1] == f"5,000.25 EUR: not added ({why})"
    # The total: USD as it is, JPY at IBKR's rate; never EUR x 0 (or x a negative rate).
    total = Decimal("-1200.50") + Decimal("1000000.00") * Decimal("0.0067245")
    assert cells(cash, 'class="total"')[-1] == f"{total:,.2f} USD"
    assert "Not in the total: EUR" in cash


# --- every rate is kept, with or without cash ------------------------------------------------


def test_a_rate_without_cash_in_its_currency_is_kept_and_converts_the_positions(
    values, monkeypatch, admin_client
):
    values.set_cash(ACCOUNT, {"USD": "1000"})
    values.upsert_position(
        sim_position(con_id=6223250, symbol="7203", currency="JPY", quantity="100",
                     average_cost=Decimal("2500"), market_price=Decimal("2870"))
    )  # fmt: skip
    # IBKR sends the JPY rate, and no JPY cash balance at all.
    leave_out(
        values, monkeypatch, lambda a, tag, c: not (tag.endswith("CashBalance") and c == "JPY")
    )

    result = sync()

    assert result.errors == []
    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    assert snapshot.currency == "USD"
    assert snapshot.exchange_rates["JPY"] == "0.0067245"
    assert not CashBalance.objects.filter(currency="JPY").exists()
    toyota = Position.objects.get(instrument__symbol="7203")
    assert toyota.market_value == Decimal("287000.00")

    html = account_section(admin_client.get(OVERVIEW).text, ACCOUNT)
    in_base = table(html, "in-base")
    assert cells(in_base, 'data-currency="JPY"')[1] == (
        f"287,000.00 JPY {TIMES} 0.0067245 = 1,929.93 USD"
    )
    assert "not added" not in in_base
    usd_value = sum(
        Position.objects.filter(account__external_id=ACCOUNT, instrument__currency="USD")
        .values_list("market_value", flat=True)
    )  # fmt: skip
    total = usd_value + Decimal("287000.00") * Decimal("0.0067245")
    assert cells(in_base, 'class="total"')[1] == f"{total:,.2f} USD"


# --- cash: replaced only by a whole, readable set --------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("base only", "IBKR sent only the BASE total of the cash"),
        ("unset", "IBKR sent no value for the EUR balance"),
        ("unstorable", "the EUR balance cannot be stored"),
        ("not a code", "a balance's currency 'US$' is not a code"),
    ],
)
def test_cash_that_cannot_be_trusted_whole_keeps_every_stored_row(
    values, monkeypatch, admin_client, api_client, syncer, fault, reason
):
    sync()
    kept = stored_cash()
    assert [row[1] for row in kept] == ["EUR", "JPY", "USD"]
    values.set_cash(ACCOUNT, {"USD": "50081.25", "EUR": "7"})  # what would replace them
    if fault == "base only":
        leave_out(values, monkeypatch, lambda a, tag, c: tag != "CashBalance" or c == "BASE")
    elif fault == "unset":
        values.set_faults(value_edits={ACCOUNT: {"CashBalance:EUR": "1.7976931348623157E308"}})
    elif fault == "unstorable":
        values.set_faults(value_edits={ACCOUNT: {"CashBalance:EUR": "1E+40"}})
    else:
        values.set_faults(value_frames={ACCOUNT: [["6", "2", "CashBalance", "5", "US$", ACCOUNT]]})

    result = sync()

    # None deleted, none updated: every column of every row as it was.
    assert stored_cash() == kept
    outcome = result.account_values[ACCOUNT]
    assert outcome["status"] == "read" and reason in outcome["cash_kept_reason"]
    assert outcome["cash_currencies"] == []
    assert SyncRun.objects.get(pk=result.sync_run_id).account_values[ACCOUNT] == outcome
    if fault in ("unstorable", "not a code"):
        assert any(e["account"] == ACCOUNT and "CashBalance" in e["reason"] for e in result.errors)
    # The rest of the values are renewed.
    assert AccountSnapshot.objects.filter(account__external_id=ACCOUNT).count() == 2

    # Said wherever the outcome is shown: the POST answer, --json, -v 2, the admin.
    api_client.force_authenticate(syncer)
    answer = api_client.post(f"/portfolio/sync/ibkr?ibkr_account_id={ACCOUNT}").json()
    assert reason in answer["account_values"][ACCOUNT]["cash_kept_reason"]
    out = StringIO()
    call_command("sync_ibkr", "--json", stdout=out)
    assert reason in json.loads(out.getvalue())["account_values"][ACCOUNT]["cash_kept_reason"]
    out = StringIO()
    call_command("sync_ibkr", verbosity=2, stdout=out)
    assert f", stored cash kept ({reason}" in out.getvalue()
    page = admin_client.get(reverse("admin:ibkr_sync_syncrun_change", args=[result.sync_run_id]))
    assert f"stored cash kept ({reason}" in page.text.replace("&#x27;", "'")
    # And the kept cash is what the API and the overview still show.
    assert stored_cash() == kept
    listed = admin_client.get(f"/portfolio/cash?account={ACCOUNT}").json()["results"]
    assert sorted(r["currency"] for r in listed) == ["EUR", "JPY", "USD"]
    assert "-1,200.50" in account_section(admin_client.get(OVERVIEW).text, ACCOUNT)


def test_a_whole_set_replaces_the_stored_one(values):
    sync()
    values.set_cash(ACCOUNT, {"USD": "10", "CHF": "20"})

    result = sync()

    assert "cash_kept_reason" not in result.account_values[ACCOUNT]
    assert {row[1]: row[2:4] for row in stored_cash()} == {
        "CHF": (Decimal("20"), Decimal("1.1312")), "USD": (Decimal("10"), Decimal(1)),
    }  # fmt: skip
    assert {row[4] for row in stored_cash()} == {"USD"}


# --- one form for a currency code --------------------------------------------------------------


def test_a_currency_in_another_case_is_its_code_everywhere(values):
    values.set_cash(EMPTY, {"USD": "1"})
    sync()
    usd = CashBalance.objects.get(account__external_id=EMPTY, currency="USD")
    values.set_cash(EMPTY, {"usd": "10"})
    values.set_cash(ACCOUNT, {"USD": "1", "Eur": "20"})
    values.set_exchange_rate("Eur", "1.0845")  # as the simulator spells it, it sends it
    values.upsert_position(sim_position(con_id=14094, symbol="SAP", currency="Eur"))

    result = sync()

    assert result.errors == []
    assert "cash_kept_reason" not in result.account_values[EMPTY]
    assert "cash_kept_reason" not in result.account_values[ACCOUNT]
    # The same row, renewed: not an error, not a row of its own, not deleted.
    [row] = CashBalance.objects.filter(account__external_id=EMPTY)
    assert (row.pk, row.currency, row.amount) == (usd.pk, "USD", Decimal("10"))
    eur = CashBalance.objects.get(account__external_id=ACCOUNT, currency="EUR")
    assert (eur.amount, eur.exchange_rate, eur.rate_currency) == (20, Decimal("1.0845"), "USD")
    assert Instrument.objects.get(symbol="SAP").currency == "EUR"
    snapshot = AccountSnapshot.objects.filter(account__external_id=ACCOUNT).latest()
    assert "EUR" in snapshot.exchange_rates and "Eur" not in snapshot.exchange_rates


def test_an_instrument_whose_currency_is_not_a_code_is_that_records_error(values):
    sync()
    values.upsert_position(sim_position(con_id=265598, quantity="11", currency="US$"))

    result = sync()

    # The position's record (and the cash of a currency that is not a code: kept).
    [error] = [e for e in result.errors if e["con_id"] is not None]
    assert error["con_id"] == 265598
    assert error["reason"] == "'US$' is not a currency code (three letters, e.g. USD)"
    aapl = Position.objects.get(instrument__symbol="AAPL")
    assert aapl.quantity == Decimal(10) and aapl.closed_at is None  # left as it was
    assert Instrument.objects.get(symbol="AAPL").currency == "USD"


def test_a_base_currency_that_is_not_a_code_is_never_the_accounts(values):
    sync()
    values.base_currency = "US$"

    result = sync()

    assert Account.objects.get(external_id=ACCOUNT).base_currency == "USD"
    assert result.account_values[ACCOUNT]["base_currency"] == ""
    assert any(e["reason"].startswith("NetLiquidation: 'US$' is not a currency code")
               for e in result.errors)  # fmt: skip
    latest = AccountSnapshot.objects.filter(account__external_id=ACCOUNT).latest()
    assert (latest.currency, latest.exchange_rates) == ("", {})


# --- every rate carries the currency it converts to ---------------------------------------------


def test_ibkr_switching_the_base_currency_while_cash_is_kept(values, monkeypatch, admin_client):
    sync()  # in USD: EUR at 1.0845 to USD, USD at 1
    values.base_currency = "EUR"
    values.set_exchange_rate("USD", "0.9221")
    values.set_exchange_rate("JPY", "0.0062")
    # The cash cannot be trusted whole this time: the rows read in USD are kept.
    leave_out(values, monkeypatch, lambda a, tag, c: tag != "CashBalance" or c == "BASE")

    result = sync()

    assert result.account_values[ACCOUNT]["base_currency"] == "EUR"
    assert Account.objects.get(external_id=ACCOUNT).base_currency == "EUR"
    latest = AccountSnapshot.objects.filter(account__external_id=ACCOUNT).latest()
    assert latest.currency == "EUR" and latest.exchange_rates["USD"] == "0.9221"
    kept = {c.currency: c for c in CashBalance.objects.filter(account__external_id=ACCOUNT)}
    assert {c.rate_currency for c in kept.values()} == {"USD"}

    # The API labels each kept amount with the currency its rate converts to.
    body = admin_client.get(f"/portfolio/cash?account={ACCOUNT}").json()["results"]
    by_currency = {r["currency"]: (r["base_amount"], r["base_currency"]) for r in body}
    assert by_currency["EUR"] == ("5422.771125", "USD")  # 5000.25 x 1.0845, in USD
    # The overview's total is in EUR: EUR as it is; the USD-rated rows are not added.
    html = account_section(admin_client.get(OVERVIEW).text, ACCOUNT)
    cash = table(html, "cash")
    assert cells(cash, 'data-currency="EUR"')[-1] == "5,000.25 EUR"
    assert cells(cash, 'data-currency="JPY"')[-1] == (
        "1,000,000.00 JPY: not added (IBKR's JPY rate converts to USD, not EUR)"
    )
    assert cells(cash, 'data-currency="USD"')[-1] == (
        "-1,200.50 USD: not added (IBKR's USD rate converts to USD, not EUR)"
    )
    assert cells(cash, 'class="total"')[-1] == "5,000.25 EUR"
    assert "1,082.50 EUR" not in html and "5,422.77 EUR" not in html
    # The positions' values at the new rates, into EUR.
    in_base = table(html, "in-base")
    assert f"{TIMES} 0.9221 = " in cells(in_base, 'data-currency="USD"')[1]
    assert cells(in_base, 'class="total"')[1].endswith(" EUR")


def test_other_accounts_cash_is_untouched_by_one_accounts_kept_cash(values, monkeypatch):
    values.set_cash(OTHER, {"CHF": "5"})
    sync()
    values.set_cash(OTHER, {"GBP": "6"})
    leave_out(values, monkeypatch, lambda a, tag, c: a != ACCOUNT or tag != "CashBalance")
    kept = stored_cash()

    sync()

    assert stored_cash() == kept
    # OTHER's whole set replaced its own (USD: its option's currency, no cash).
    assert {row[1]: row[2] for row in stored_cash(OTHER)} == {"GBP": 6, "USD": 0}
