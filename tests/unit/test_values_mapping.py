"""An account's values -> its snapshot, cash rows and position values: pure, no I/O."""

from decimal import Decimal

import pytest

from ibkr_sync.gateway import GatewayAccountValues, GatewayPositionValue
from ibkr_sync.mapping import map_account_values

D = Decimal


def values(reported, positions=()):
    return GatewayAccountValues("U1", dict(reported), {p.con_id: p for p in positions})


def priced(con_id, quantity="10", price="1.5", value="15", unrealized="5", realized=None):
    return GatewayPositionValue(
        con_id,
        D(quantity),
        D(price),
        D(value),
        D(unrealized),
        None if realized is None else D(realized),
    )


def test_the_base_currency_is_net_liquidations_and_pnl_is_the_base_total():
    mapped = map_account_values(
        values(
            {
                ("NetLiquidation", "EUR"): D("1000.5"),
                ("UnrealizedPnL", "EUR"): D("7"),  # EUR positions only
                ("UnrealizedPnL", "BASE"): D("12.25"),  # every currency, in EUR
                ("RealizedPnL", "EUR"): D("-3"),  # no BASE row: the base currency's
            }
        ),
        {},
    )

    assert mapped.base_currency == "EUR"
    assert mapped.snapshot["net_liquidation"] == D("1000.5")
    assert mapped.snapshot["unrealized_pnl"] == D("12.25")
    assert mapped.snapshot["realized_pnl"] == D(-3)
    # Tags IBKR did not send are unknown, never zero.
    assert mapped.snapshot["buying_power"] is None
    assert mapped.snapshot["total_cash_value"] is None


def test_cash_per_currency_with_its_rate_and_base_is_not_a_currency():
    mapped = map_account_values(
        values(
            {
                ("TotalCashValue", "USD"): D("10"),
                ("CashBalance", "USD"): D("-1200.50"),
                ("CashBalance", "JPY"): D("1000000"),
                ("ExchangeRate", "JPY"): D("0.0067245"),
                ("CashBalance", "CHF"): None,  # IBKR's "no value"
                ("CashBalance", "BASE"): D("5524"),
            }
        ),
        {},
    )

    assert mapped.base_currency == "USD"
    assert mapped.cash == {
        "USD": {"amount": D("-1200.50"), "exchange_rate": None},
        "JPY": {"amount": D("1000000"), "exchange_rate": D("0.0067245")},
    }
    assert mapped.kept_currencies == {"CHF"}
    assert mapped.errors == []


def test_position_values_only_for_the_quantity_synced():
    held = {1: (D(10), "AAPL", "STK", "1"), 2: (D("0.5"), "BTC", "CRYPTO", "2")}
    mapped = map_account_values(
        values(
            {("NetLiquidation", "USD"): D(1)},
            [priced(1, realized="0"), priced(2, quantity="0.6"), priced(3)],
        ),
        held,
    )

    # In the order of POSITION_VALUE_FIELDS: price, value, unrealized, realized.
    assert mapped.positions == {"1": (D("1.5"), D(15), D(5), D(0))}
    assert mapped.stale == 1  # BTC: the row was for another quantity; 3 is not synced


def test_values_that_do_not_fit_are_errors_not_zeros():
    held = {1: (D(10), "AAPL", "STK", "1")}
    mapped = map_account_values(
        values(
            {
                ("NetLiquidation", "USD"): D("1E+25"),
                ("TotalCashValue", "USD"): D("5"),
                ("CashBalance", "EUR"): D("1"),
                ("ExchangeRate", "EUR"): D("1E-11"),
            },
            [priced(1, value="-9E+40")],
        ),
        held,
    )

    assert mapped.snapshot["net_liquidation"] is None
    assert mapped.snapshot["total_cash_value"] == D(5)
    assert mapped.cash == {} and mapped.kept_currencies == {"EUR"}
    assert mapped.positions == {}
    reasons = sorted(error["reason"] for error in mapped.errors)
    assert reasons[0].startswith("ExchangeRate (EUR): 0.00000000001 rounds to 0")
    assert reasons[1].startswith("NetLiquidation (USD): ") and "too large" in reasons[1]
    assert reasons[2].startswith("market value: ") and "too large" in reasons[2]
    assert [e["symbol"] for e in mapped.errors if e["con_id"] == 1] == ["AAPL"]


@pytest.mark.django_db
@pytest.mark.parametrize("fallback", [False, True])
def test_update_rows_writes_exactly_the_rows_given(monkeypatch, fallback):
    """One UPDATE ... FROM (or bulk_update where the database has none; UNNEST batches on
    PostgreSQL without COPY)."""
    from django.db import connection
    from django.utils import timezone

    from ibkr_sync import writer
    from ibkr_sync.writer import update_rows
    from portfolio.models import Account, Instrument, Position

    if fallback and connection.vendor == "sqlite":
        monkeypatch.setattr(connection.Database, "sqlite_version_info", (3, 31, 1))
    elif fallback:
        monkeypatch.setattr(writer, "_can_copy", lambda cursor: False)
    now = timezone.now()
    account = Account.objects.create(broker="ibkr", external_id="U1")
    rows = [
        Position.objects.create(
            account=account,
            instrument=Instrument.objects.create(
                broker="ibkr", external_id=str(i), symbol=f"S{i}", sec_type="STK"
            ),
            quantity=1,
            opened_at=now,
            last_synced_at=now,
        )
        for i in range(3)
    ]
    fields = ("market_price", "market_value", "unrealized_pnl", "realized_pnl")
    update_rows(
        Position,
        fields,
        (
            (p.pk, D("1.25") * (i + 1), None, D("-0.0000000001"), D(0))
            for i, p in enumerate(rows[:2])
        ),
        valued_at=now,
    )
    stored = {p.pk: p for p in Position.objects.all()}
    assert [stored[p.pk].market_price for p in rows] == [D("1.25"), D("2.5"), None]
    assert stored[rows[0].pk].unrealized_pnl == D("-0.0000000001")
    assert stored[rows[1].pk].market_value is None and stored[rows[1].pk].valued_at == now
    assert stored[rows[2].pk].valued_at is None


def test_a_single_currency_accounts_own_pnl_row_is_its_total():
    one = map_account_values(
        values({("NetLiquidation", "USD"): D(1), ("UnrealizedPnL", "USD"): D("7.5")}), {}
    )
    several = map_account_values(
        values(
            {
                ("NetLiquidation", "USD"): D(1),
                ("UnrealizedPnL", "USD"): D("7.5"),
                ("CashBalance", "EUR"): D(3),
            }
        ),
        {},
    )

    assert one.snapshot["unrealized_pnl"] == D("7.5")
    assert several.snapshot["unrealized_pnl"] is None  # the USD positions' only: unknown


def test_no_cash_balance_at_all_says_nothing_about_the_cash():
    silent = map_account_values(values({("NetLiquidation", "USD"): D(1)}), {})
    base_only = map_account_values(
        values({("NetLiquidation", "USD"): D(1), ("CashBalance", "BASE"): D(0)}), {}
    )

    assert not silent.cash_reported and silent.cash == {}
    assert base_only.cash_reported and base_only.cash == {}  # reported: no cash in any


def test_a_cash_currency_that_is_not_a_code_is_an_error_and_keeps_nothing_new():
    mapped = map_account_values(
        values(
            {
                ("NetLiquidation", "USD"): D(1),
                ("CashBalance", ""): D(5),
                ("CashBalance", "usd1"): D(5),
                ("CashBalance", "CHF"): D(5),
            }
        ),
        {},
    )

    assert list(mapped.cash) == ["CHF"]
    assert sorted(e["reason"] for e in mapped.errors) == [
        "CashBalance: '' is not a currency code",
        "CashBalance: 'usd1' is not a currency code",
    ]


def test_a_base_currency_that_is_not_storable_is_unknown():
    mapped = map_account_values(values({("NetLiquidation", "USD-LONG-NAME"): D(1)}), {})

    assert mapped.base_currency == "" and mapped.snapshot["net_liquidation"] is None
