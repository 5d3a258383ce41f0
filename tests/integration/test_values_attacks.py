"""Attacks on the values read: wire input that a real or hostile TWS can send.

Each test states what the rules promise; a failing test is a defect.
"""

import time
from decimal import Decimal

import pytest

from ibkr_sync.services import sync_positions
from ibkr_sync.testing.simulator import _text_frame
from portfolio.models import AccountSnapshot, CashBalance, Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def values(ibkr, settings):
    settings.IBKR_VALUES_TIMEOUT = 1
    ibkr.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25", "JPY": "1000000"})
    return ibkr


def sync(**kwargs):
    return sync_positions(trigger="command", **kwargs)


def cash_of(account):
    return dict(
        CashBalance.objects.filter(account__external_id=account).values_list("currency", "amount")
    )


def _send_after_end(sim, account, extra_fields):
    """Make the simulator write `extra_fields` frames right after `account`'s download end,
    in the same batch (as TWS does when an update follows the first download at once)."""
    original = sim._send
    end = b"54\x001\x00" + account.encode() + b"\x00"

    async def send(conn, frames, delay=None):
        out = []
        for frame in frames:
            out.append(frame)
            if frame[4:] == end:
                out += [_text_frame(list(f)) for f in extra_fields]
        await original(conn, out, delay)

    sim._send = send


# 1. One slow account starves the ones after it, at every sync -------------------------


def test_accounts_that_hang_do_not_starve_the_healthy_ones_at_every_sync(values, settings):
    # Two accounts whose downloads never end (ib_insync #303: TWS 980.4l+ stopped sending
    # accountDownloadEnd for some accounts of a multi-account login). With the defaults
    # (30 s each, 60 s in all) the same happens with two such accounts first in the list.
    settings.IBKR_REQUEST_TIMEOUT = 2
    values.set_faults(values_hang={ACCOUNT, OTHER})

    outcomes = [sync().account_values[EMPTY] for _ in range(2)]

    # EMPTY itself is healthy; the managed-accounts order is fixed, so it is never read.
    assert any(o["status"] == "read" for o in outcomes), outcomes


# 2. A download without any cash balance wipes the stored cash --------------------------


def test_a_download_that_carries_no_cash_balance_keeps_the_stored_cash(values):
    sync()
    assert set(cash_of(ACCOUNT)) == {"EUR", "JPY", "USD"}
    real = values._account_values
    # Everything but the CashBalance rows: not a complete download of the account's values.
    values._account_values = lambda account: [
        row for row in real(account) if not (account == ACCOUNT and row[0] == "CashBalance")
    ]

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read"
    # Nothing said the cash is gone: no CashBalance at all is "unknown", not "no cash".
    assert set(cash_of(ACCOUNT)) == {"EUR", "JPY", "USD"}


# 3. A cash balance the columns cannot hold is silently dropped or stored as garbage -----


def test_a_cash_balance_with_no_currency_is_not_stored(values):
    values.set_faults(value_frames={ACCOUNT: [["6", "2", "CashBalance", "999", "", ACCOUNT]]})

    sync()

    assert "" not in cash_of(ACCOUNT)


def test_a_cash_balance_whose_currency_cannot_be_stored_is_an_error_entry(values):
    values.set_faults(
        value_frames={ACCOUNT: [["6", "2", "CashBalance", "999", "TOOLONGCCY", ACCOUNT]]}
    )

    result = sync()

    assert any("TOOLONGCCY"[:8] in e["reason"] or "currency" in e["reason"].lower()
               for e in result.errors), result.errors  # fmt: skip


# 4. A position with no portfolio row is reported "read" and keeps a stale value --------


def test_a_position_left_without_a_portfolio_row_is_reported(values):
    sync()
    values.move_prices("2")
    # The first portfolio row of ACCOUNT arrives for another account name (as for linked
    # accounts, ib_async #72), so one of ACCOUNT's positions gets no row in its download.
    values.set_faults(portfolio_edits={ACCOUNT: {"account": "DU9999999"}})

    result = sync()

    outcome = result.account_values[ACCOUNT]
    held = Position.objects.filter(account__external_id=ACCOUNT, closed_at__isnull=True).count()
    assert outcome["status"] == "read"
    # 3 held, 2 valued, 0 stale: the third is unaccounted for, with last sync's price.
    assert (
        outcome["positions_valued"] + outcome["positions_stale"] + outcome["positions_unvalued"]
        == held
    ), outcome
    assert outcome["positions_unvalued"] == 1


# 5. Frames after the download end still change (or spoil) the finished read ------------


def test_an_update_after_the_download_end_does_not_spoil_a_complete_read(values):
    _send_after_end(values, ACCOUNT, [["6", "2", "AccountReady", "false", "", ACCOUNT]])

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read", result.account_values[ACCOUNT]


def test_a_value_after_the_download_end_is_not_taken_into_the_first_download(values):
    _send_after_end(values, ACCOUNT, [["6", "2", "NetLiquidation", "", "USD", ACCOUNT]])

    sync()

    # The download said a number; a later "no value" update blanked the snapshot.
    assert AccountSnapshot.objects.get(account__external_id=ACCOUNT).net_liquidation is not None


# 6. A request error on one account's values is taken for the end of the session -------


def test_a_request_error_on_one_accounts_values_leaves_the_others_read(values):
    values.set_faults(values_error={ACCOUNT: (321, "Error validating request.-'bB' : cause - x")})
    started = time.monotonic()

    result = sync()

    assert time.monotonic() - started < 10
    assert result.account_values[ACCOUNT]["status"] == "missing"
    # The session is alive and well: OTHER and EMPTY could be read.
    assert result.account_values[OTHER]["status"] == "read", result.account_values[OTHER]


# 7. Safe cases (expected to pass) -----------------------------------------------------


def test_a_value_row_with_an_empty_account_is_never_attributed(values):
    values.set_faults(value_frames={ACCOUNT: [["6", "2", "CashBalance", "777", "CHF", ""]]})

    result = sync()

    assert result.account_values[ACCOUNT]["status"] == "read"
    assert "CHF" not in cash_of(ACCOUNT) and "CHF" not in cash_of(OTHER)


def test_another_accounts_value_row_is_never_attributed(values):
    values.set_faults(value_frames={ACCOUNT: [["6", "2", "CashBalance", "777", "CHF", OTHER]]})

    sync()

    assert "CHF" not in cash_of(ACCOUNT) and "CHF" not in cash_of(OTHER)


def test_a_zero_quantity_portfolio_row_values_nothing(values):
    values.set_faults(portfolio_edits={ACCOUNT: {"quantity": "0", "market_value": "0"}})

    result = sync()

    assert result.account_values[ACCOUNT]["positions_stale"] == 1
    assert Position.objects.filter(market_value=Decimal(0)).count() == 0


# 8. The gateway's error text goes into every account's stored reason, unbounded -------


def test_a_huge_error_text_is_not_stored_whole_in_the_run(values):
    from ibkr_sync.models import SyncRun

    values.set_faults(values_error={ACCOUNT: (2101, "x" * 1_000_000)})

    result = sync()

    stored = SyncRun.objects.get(pk=result.sync_run_id).account_values
    assert len(stored[ACCOUNT]["reason"]) < 10_000, len(stored[ACCOUNT]["reason"])


# 9. Without IBKR's BASE total, one currency's P&L is stored as the account's -----------


def test_without_the_base_total_the_accounts_pnl_is_unknown_not_one_currencys(values):
    from tests.integration.conftest import sim_position

    values.upsert_position(
        sim_position(con_id=14094, symbol="SAP", currency="EUR", quantity="100",
                     average_cost=Decimal("100"), market_price=Decimal("150"))
    )  # fmt: skip
    real = values._account_values
    values._account_values = lambda account: [
        row for row in real(account) if row[0] != "UnrealizedPnL" or row[2] != "BASE"
    ]

    sync()

    snapshot = AccountSnapshot.objects.get(account__external_id=ACCOUNT)
    usd_only = Decimal(dict(((t, c), v) for t, v, c in real(ACCOUNT))["UnrealizedPnL", "USD"])
    # The USD row is the P&L of the USD positions only; the EUR position's +5000 is left out.
    assert snapshot.unrealized_pnl != usd_only, snapshot.unrealized_pnl
