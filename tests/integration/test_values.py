"""Cash, account values and market values, read in the same connection as the positions:
the real IB client over TCP against the simulator, on the real database.

The rules: values are read per account completely or not at all; an account whose values
time out, are refused (2100, 2101), are not ready or arrive in a frame that cannot be read
keeps its stored values, is marked missing with the reason, and never fails the positions;
"no value" is never stored as zero; a value that cannot be stored is an error entry; price
changes are not position changes.
"""

import json
import time
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command

from ibkr_sync.models import PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.testing import WireClient
from portfolio.models import Account, AccountSnapshot, CashBalance, Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

UNSET_DOUBLE = "1.7976931348623157E308"


@pytest.fixture
def values(ibkr, settings):
    """The simulator with cash in three currencies in ACCOUNT, and known prices."""
    settings.IBKR_VALUES_TIMEOUT = 1
    ibkr.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25", "JPY": "1000000"})
    ibkr.set_market_price(ACCOUNT, 265598, "170.01")
    ibkr.set_market_price(ACCOUNT, 76792991, "250.5")
    return ibkr


def sync(**kwargs):
    return sync_positions(trigger="command", **kwargs)


def position(symbol):
    return Position.objects.get(instrument__symbol=symbol)


def stored_values():
    """Everything the values of a sync write, to compare before and after."""
    return (
        sorted(
            CashBalance.objects.values_list(
                "account__external_id", "currency", "amount", "exchange_rate", "synced_at"
            )
        ),
        sorted(
            Position.objects.values_list(
                "account__external_id",
                "instrument__external_id",
                "market_price",
                "market_value",
                "unrealized_pnl",
                "realized_pnl",
                "valued_at",
            )
        ),
        AccountSnapshot.objects.count(),
    )


def test_a_sync_stores_cash_account_values_and_market_values_exactly(values):
    result = sync()

    assert result.account_values[ACCOUNT] == {
        "status": "read",
        "base_currency": "USD",
        "positions_valued": 3,
        "positions_stale": 0,
        "positions_unvalued": 0,
        "cash_currencies": ["EUR", "JPY", "USD"],
        "cash_reported": True,
    }
    assert {a: v["status"] for a, v in result.account_values.items()} == {
        ACCOUNT: "read", OTHER: "read", EMPTY: "read"
    }  # fmt: skip
    assert SyncRun.objects.get().account_values == result.account_values

    cash = {
        c.currency: (c.amount, c.exchange_rate)
        for c in CashBalance.objects.filter(account__external_id=ACCOUNT)
    }
    assert cash == {
        "USD": (Decimal("-1200.50"), Decimal(1)),
        "EUR": (Decimal("5000.25"), Decimal("1.0845")),
        "JPY": (Decimal("1000000.00"), Decimal("0.0067245")),
    }
    # The totals, in the base currency, exactly as sent.
    sent = {
        tag: Decimal(v)
        for (tag, ccy), v in _sent(values, ACCOUNT).items()
        if ccy == "USD" and tag not in ("Currency",)
    }
    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    assert snapshot.currency == "USD"
    assert snapshot.net_liquidation == sent["NetLiquidation"]
    assert snapshot.total_cash_value == sent["TotalCashValue"]
    assert snapshot.gross_position_value == sent["GrossPositionValue"]
    assert snapshot.available_funds == sent["AvailableFunds"]
    assert snapshot.buying_power == sent["BuyingPower"]
    # P&L is the BASE row (all currencies), not the USD row (USD positions only).
    base = _sent(values, ACCOUNT)
    assert snapshot.unrealized_pnl == Decimal(base["UnrealizedPnL", "BASE"])
    assert snapshot.realized_pnl == Decimal(base["RealizedPnL", "BASE"])
    # Cash in the base currency is IBKR's own conversion: sum of amount x rate.
    assert snapshot.total_cash_value == (
        Decimal("-1200.50") + Decimal("5000.25") * Decimal("1.0845")
        + Decimal("1000000.00") * Decimal("0.0067245")
    ).quantize(Decimal("0.01"))  # fmt: skip
    assert Account.objects.get(external_id=ACCOUNT).base_currency == "USD"

    aapl = position("AAPL")
    assert aapl.market_price == Decimal("170.01")
    assert aapl.market_value == Decimal("1700.10")  # 10 x 170.01
    assert aapl.unrealized_pnl == Decimal("197.60")  # 1700.10 - 10 x 150.25
    assert aapl.realized_pnl == Decimal(0)
    assert aapl.valued_at == result.finished_at or aapl.valued_at <= result.finished_at
    tsla = position("TSLA")  # a fractional share, exactly
    assert tsla.market_value == Decimal("30.93")  # 0.12345678 x 250.5 = 30.925923...
    es = position("ES")  # a short future: negative value, multiplier included
    assert es.market_value < 0


def _sent(sim, account):
    return {(tag, ccy): value for tag, value, ccy in sim._account_values(account)}


def test_price_changes_are_values_not_position_changes(values):
    sync()
    before = position("AAPL")
    values.move_prices("1.1")

    result = sync()

    assert (result.created, result.updated, result.unchanged, result.closed) == (0, 0, 4, 0)
    assert PositionChange.objects.filter(sync_run_id=result.sync_run_id).count() == 0
    after = position("AAPL")
    assert after.market_price == Decimal("187.01100000")
    assert after.market_value == Decimal("1870.11")
    assert (after.quantity, after.average_cost) == (before.quantity, before.average_cost)
    assert after.valued_at > before.valued_at
    # The history: one snapshot per account per sync that read its values.
    assert AccountSnapshot.objects.filter(account__external_id=ACCOUNT).count() == 2
    first, second = AccountSnapshot.objects.filter(account__external_id=ACCOUNT).order_by(
        "taken_at"
    )
    assert second.net_liquidation != first.net_liquidation  # ES is short: it went down
    assert second.sync_run_id == result.sync_run_id


def test_values_that_time_out_for_one_account_keep_its_stored_values(values):
    sync()
    kept = stored_values()
    values.move_prices("2")
    values.upsert_position(sim_position(account=ACCOUNT, con_id=265598, quantity="11"))
    values.set_faults(values_hang={ACCOUNT})
    started = time.monotonic()

    result = sync()

    assert time.monotonic() - started < 10
    outcome = result.account_values
    assert outcome[ACCOUNT]["status"] == "missing"
    assert "did not send the account's values within 1 s" in outcome[ACCOUNT]["reason"]
    assert outcome[OTHER]["status"] == "read"
    # The positions are synced all the same: the quantity change is applied.
    assert result.updated == 1
    assert position("AAPL").quantity == Decimal(11)
    # ACCOUNT's values are exactly as they were; OTHER's were renewed.
    cash, positions, _ = stored_values()
    assert [c for c in cash if c[0] == ACCOUNT] == [c for c in kept[0] if c[0] == ACCOUNT]
    assert [p[2:] for p in positions if p[0] == ACCOUNT] == [
        p[2:] for p in kept[1] if p[0] == ACCOUNT
    ]
    assert AccountSnapshot.objects.filter(account__external_id=ACCOUNT).count() == 1
    assert AccountSnapshot.objects.filter(account__external_id=OTHER).count() == 2
    run = SyncRun.objects.get(pk=result.sync_run_id)
    assert run.status == SyncRun.Status.SUCCESS
    assert run.account_values[ACCOUNT]["status"] == "missing"


def test_a_subscription_another_client_holds_is_2101_and_keeps_the_values(values):
    sync()
    kept = stored_values()
    # Another API client holds the one account-updates subscription, for another account.
    with WireClient("127.0.0.1", values.port) as other:
        other.connect_api(client_id=99)
        other.send(6, 2, 1, OTHER)
        other.recv_until(54, timeout=5)

        result = sync(account_id=ACCOUNT)

    reason = result.account_values[ACCOUNT]["reason"]
    assert result.account_values[ACCOUNT]["status"] == "missing"
    assert "2101" in reason and "another client holds it" in reason
    assert stored_values()[0] == kept[0]
    assert result.processed == 3  # the positions were read and reconciled


def test_a_subscription_taken_over_midway_is_2100_and_keeps_the_values(values):
    values.set_faults(values_taken_over={OTHER})

    result = sync()

    assert result.account_values[OTHER]["status"] == "missing"
    assert "ended the subscription" in result.account_values[OTHER]["reason"]
    assert "2100" in result.account_values[OTHER]["reason"]
    assert result.account_values[ACCOUNT]["status"] == "read"
    assert result.account_values[EMPTY]["status"] == "read"


def test_a_2100_confirming_the_previous_cancel_spoils_nothing(values):
    # Some TWS versions answer a cancelled subscription with 2100: it arrives before any
    # of the next account's values, and is about the subscription just cancelled.
    values.confirm_unsubscribe = True

    result = sync()

    assert {a: v["status"] for a, v in result.account_values.items()} == {
        ACCOUNT: "read", OTHER: "read", EMPTY: "read"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (2101, "refused the subscription to the account's values (error 2101"),
        # A 2100 instead of any value: taken for the end of the previous subscription, so
        # the account's values are awaited, and missing when they do not come.
        (2100, "did not send the account's values within 1 s"),
    ],
)
def test_a_subscription_refused_marks_the_values_missing(values, code, words):
    values.set_faults(values_error={OTHER: (code, "")})

    result = sync()

    assert result.account_values[OTHER]["status"] == "missing"
    assert words in result.account_values[OTHER]["reason"]
    assert result.account_values[ACCOUNT]["status"] == "read"
    assert not CashBalance.objects.filter(account__external_id=OTHER).exists()
    assert result.created == 4


def test_no_value_is_stored_as_nothing_never_as_zero(values):
    values.set_faults(
        value_edits={ACCOUNT: {"NetLiquidation": UNSET_DOUBLE, "BuyingPower": ""}},
        portfolio_edits={ACCOUNT: {"market_price": UNSET_DOUBLE, "unrealized_pnl": "NaN"}},
    )

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read"
    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    assert snapshot.net_liquidation is None and snapshot.buying_power is None
    assert snapshot.total_cash_value is not None
    first = Position.objects.filter(account__external_id=ACCOUNT).order_by("pk")
    unset = [p for p in first if p.market_price is None]
    assert len(unset) == 1
    assert unset[0].unrealized_pnl is None and unset[0].market_value is not None


def test_an_unset_cash_balance_keeps_every_stored_cash_row(values):
    sync()
    kept = stored_values()[0]
    values.set_cash(ACCOUNT, {"USD": "10", "EUR": "20"})
    values.set_faults(value_edits={ACCOUNT: {"CashBalance:EUR": UNSET_DOUBLE}})

    result = sync()

    # EUR unknown now: the cash cannot be trusted whole, so none of it is renewed (USD)
    # or removed (JPY, no longer reported): every row exactly as it was.
    assert [c for c in stored_values()[0] if c[0] == ACCOUNT] == [
        c for c in kept if c[0] == ACCOUNT
    ]
    reason = result.account_values[ACCOUNT]["cash_kept_reason"]
    assert reason == "IBKR sent no value for the EUR balance"


@pytest.mark.parametrize(
    "fault",
    [
        {"value_edits": {ACCOUNT: {"NetLiquidation": "12,5"}}},
        {"value_edits": {ACCOUNT: {"ExchangeRate:EUR": "+1.08"}}},
        {"portfolio_edits": {ACCOUNT: {"market_value": "0x10"}}},
        {"portfolio_edits": {ACCOUNT: {"version": "7"}}},
        {"portfolio_edits": {ACCOUNT: {"con_id": "abc"}}},
        {"value_frames": {ACCOUNT: [["6", "2", "NetLiquidation", "1"]]}},
        {"value_frames": {ACCOUNT: [["7", "8", "265598"]]}},
        {"value_frames": {ACCOUNT: [["54"]]}},
        {"value_frames": {ACCOUNT: [["8", "1"]]}},
        {"values_not_ready": {ACCOUNT}},
    ],
    ids=[
        "comma", "plus-sign", "hex", "portfolio-version", "con-id", "short-value",
        "short-portfolio", "short-end", "short-time", "not-ready",
    ],
)  # fmt: skip
def test_values_that_cannot_be_read_keep_the_accounts_values_not_its_positions(values, fault):
    sync()
    kept = stored_values()
    values.move_prices("3")
    values.set_faults(**fault)

    result = sync()

    outcome = result.account_values
    assert outcome[ACCOUNT]["status"] == "missing", outcome
    assert "stored values were kept" in outcome[ACCOUNT]["reason"]
    assert outcome[OTHER]["status"] == "read"
    assert result.unchanged == 4 and result.errors == []
    cash, positions, snapshots = stored_values()
    assert [c for c in cash if c[0] == ACCOUNT] == [c for c in kept[0] if c[0] == ACCOUNT]
    assert [p for p in positions if p[0] == ACCOUNT] == [p for p in kept[1] if p[0] == ACCOUNT]
    assert snapshots == kept[2] + 2  # OTHER and EMPTY


def test_a_value_that_cannot_be_stored_is_an_error_entry(values):
    values.set_faults(
        value_edits={ACCOUNT: {"NetLiquidation": "1E+25", "ExchangeRate:JPY": "1E-12"}},
        portfolio_edits={ACCOUNT: {"market_value": "-9E+40"}},
    )

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read"
    reasons = [e["reason"] for e in result.errors]
    assert any(r.startswith("NetLiquidation (USD): ") and "too large" in r for r in reasons)
    assert any("market value" in r and "too large" in r for r in reasons), reasons
    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    assert snapshot.net_liquidation is None and snapshot.total_cash_value is not None
    # A rate of 1E-12 would round to 0 at ten places: not a rate of 0, so not stored; the
    # balance is, without a rate (shown, never converted).
    assert any(r.startswith("ExchangeRate (JPY): ") and "rounds to 0" in r for r in reasons)
    cash = CashBalance.objects.filter(account__external_id=ACCOUNT)
    assert sorted(cash.values_list("currency", flat=True)) == ["EUR", "JPY", "USD"]
    jpy = cash.get(currency="JPY")
    assert (jpy.exchange_rate, jpy.rate_currency, jpy.base_amount) == (None, "", None)
    held = Position.objects.filter(account__external_id=ACCOUNT)
    assert held.filter(market_value__isnull=True).count() == 1
    assert SyncRun.objects.get().errors == len(result.errors)


def test_values_of_a_position_traded_between_the_reads_are_kept(values):
    values.set_faults(portfolio_edits={ACCOUNT: {"quantity": "11"}})

    result = sync()

    assert result.account_values[ACCOUNT]["positions_stale"] == 1
    assert result.account_values[ACCOUNT]["positions_valued"] == 2
    held = Position.objects.filter(account__external_id=ACCOUNT)
    assert held.filter(valued_at__isnull=True).count() == 1


def test_an_account_filter_reads_only_that_accounts_values(values):
    result = sync(account_id=OTHER)

    assert list(result.account_values) == [OTHER]
    assert set(AccountSnapshot.objects.values_list("account__external_id", flat=True)) == {OTHER}
    assert values.request_counts[6] == 2  # subscribe and unsubscribe, once


def test_values_are_not_read_when_turned_off(values, settings):
    settings.IBKR_READ_VALUES = False

    result = sync()

    assert result.account_values is None
    assert SyncRun.objects.get().account_values == {}
    assert not CashBalance.objects.exists() and not AccountSnapshot.objects.exists()
    assert values.request_counts[6] == 0


def test_a_dry_run_writes_no_values(values):
    result = sync(dry_run=True)

    assert result.account_values[ACCOUNT]["status"] == "read"
    assert not CashBalance.objects.exists() and not AccountSnapshot.objects.exists()


def test_the_api_and_the_command_report_the_values(values, api_client, syncer):
    values.set_faults(values_hang={OTHER})
    api_client.force_authenticate(syncer)

    body = api_client.post("/portfolio/sync/ibkr").json()

    assert body["status"] == "success"
    assert body["account_values"][ACCOUNT]["status"] == "read"
    assert body["account_values"][OTHER]["status"] == "missing"
    syncer.user_permissions.add(Permission.objects.get(codename="view_syncrun"))
    api_client.force_authenticate(User.objects.get(pk=syncer.pk))  # permissions afresh
    detail = api_client.get(f"/portfolio/sync/runs/{body['sync_run_id']}").json()
    assert detail["account_values"] == body["account_values"]

    out = StringIO()
    call_command("sync_ibkr", "--json", stdout=out)
    assert json.loads(out.getvalue())["account_values"][OTHER]["status"] == "missing"

    out = StringIO()
    call_command("sync_ibkr", stdout=out)
    assert f"Values not read for 1 account(s), their stored values kept: {OTHER}" in (
        out.getvalue()
    )
    out = StringIO()
    call_command("sync_ibkr", verbosity=2, stdout=out)
    text = out.getvalue()
    assert f"  {ACCOUNT}: 3 positions:" in text
    assert "    values: read (base USD): 3 positions valued, cash in EUR, JPY, USD" in text
    assert "    values: missing: IBKR did not send the account's values within 1 s" in text


def test_a_download_with_no_values_keeps_the_stored_ones(values):
    sync()
    kept = stored_values()
    values.set_faults(values_empty={ACCOUNT})

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "missing"
    assert "without sending any" in result.account_values[ACCOUNT]["reason"]
    assert [c for c in stored_values()[0] if c[0] == ACCOUNT] == [
        c for c in kept[0] if c[0] == ACCOUNT
    ]


def test_a_connection_lost_while_values_arrive_keeps_the_positions(values):
    values.set_faults(drop_during_values={OTHER})

    result = sync()

    assert result.created == 4  # the positions were complete before any value was asked for
    outcome = result.account_values
    assert outcome[ACCOUNT]["status"] == "read"
    assert outcome[OTHER]["status"] == outcome[EMPTY]["status"] == "missing"
    assert "not read" in outcome[EMPTY]["reason"], outcome
    assert SyncRun.objects.get().status == SyncRun.Status.SUCCESS


def test_a_flood_of_values_is_refused_not_kept(values):
    flood = [["6", "2", "CashBalance", "1", f"C{i:06d}", ACCOUNT] for i in range(3000)]
    flood += [["7", "8", str(10_000_000 + i), "X", "STK", "", "0", "", "", "", "USD", "", "",
               "1", "1", "1", "1", "0", "0", OTHER] for i in range(3000)]  # fmt: skip
    values.set_faults(value_frames={ACCOUNT: flood[:3000], OTHER: flood[3000:]})

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "missing"
    assert "more than 2000 distinct values" in result.account_values[ACCOUNT]["reason"]
    # Rows of positions that were not read are passed over: OTHER values its one position.
    assert result.account_values[OTHER]["positions_valued"] == 1


def test_a_tws_reads_moments_are_what_its_values_are_stored_as_of(values):
    """The TWS source dates its snapshot when the end of positions is read, and each
    account's values when their download end is: those moments are stored, not the
    write's."""
    from ibkr_sync.sources.tws import TwsSource

    class Recording(TwsSource):
        def fetch_positions(self, account_id=None):
            self.snapshot = super().fetch_positions(account_id)
            return self.snapshot

    source = Recording()
    result = sync(gateway=source)

    snapshot = source.snapshot
    read = snapshot.account_values[ACCOUNT]
    assert snapshot.source == "tws" and snapshot.as_of.utcoffset() is not None
    assert result.started_at <= snapshot.as_of <= read.as_of <= result.finished_at
    assert position("AAPL").valued_at == read.as_of
    assert AccountSnapshot.objects.get(account__external_id=ACCOUNT).taken_at == read.as_of
    assert position("AAPL").last_synced_at > read.as_of  # the write's own time
