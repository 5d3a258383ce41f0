"""An account's values -> its snapshot, cash rows and position values: pure, no I/O."""

from decimal import Decimal

import pytest

from ibkr_sync.decimals import plain
from ibkr_sync.mapping import MappingError, currency_code, map_account_values
from ibkr_sync.snapshot import PositionRecord, PositionValue
from ibkr_sync.sources.tws import account_values

D = Decimal


def values(reported, positions=()):
    return account_values("U1", dict(reported), {p.con_id: p for p in positions})


def priced(con_id, quantity="10", price="1.5", value="15", unrealized="5", realized=None):
    return PositionValue(
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
                ("CashBalance", "BASE"): D("5524"),
            }
        ),
        {},
    )

    assert mapped.base_currency == "USD"
    assert mapped.cash == {
        "USD": {"amount": D("-1200.50"), "exchange_rate": None, "rate_currency": ""},
        "JPY": {"amount": D("1000000"), "exchange_rate": D("0.0067245"), "rate_currency": "USD"},
    }
    assert mapped.cash_kept_reason == ""
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
    # A rate that cannot be stored is no rate: the balance is stored, not converted.
    assert mapped.cash == {"EUR": {"amount": D(1), "exchange_rate": None, "rate_currency": ""}}
    assert mapped.snapshot["exchange_rates"] == {}
    assert mapped.positions == {}
    reasons = sorted(error.reason for error in mapped.errors)
    assert reasons[0].startswith("ExchangeRate (EUR): 0.00000000001 rounds to 0")
    assert reasons[1].startswith("NetLiquidation (USD): ") and "too large" in reasons[1]
    assert reasons[2].startswith("market value: ") and "too large" in reasons[2]
    assert [e.symbol for e in mapped.errors if e.con_id == 1] == ["AAPL"]


@pytest.mark.django_db
@pytest.mark.parametrize("fallback", [False, True])
def test_update_rows_writes_exactly_the_rows_given(monkeypatch, fallback):
    """One UPDATE ... FROM (or bulk_update where the database has none; UNNEST batches on
    PostgreSQL without COPY)."""
    from django.db import connection
    from django.utils import timezone

    from ibkr_sync import bulk
    from ibkr_sync.bulk import update_rows
    from portfolio.models import Account, Instrument, Position

    if fallback and connection.vendor == "sqlite":
        monkeypatch.setattr(connection.Database, "sqlite_version_info", (3, 31, 1))
    elif fallback:
        monkeypatch.setattr(bulk, "_can_copy", lambda cursor: False)
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

    assert not silent.cash_reported and silent.cash == {}
    assert silent.cash_kept_reason == "IBKR sent no cash balance"


def test_a_base_currency_that_is_not_a_code_is_unknown_and_an_error():
    mapped = map_account_values(values({("NetLiquidation", "USD-LONG-NAME"): D(1)}), {})

    assert mapped.base_currency == "" and mapped.snapshot["net_liquidation"] is None
    assert [e.reason for e in mapped.errors] == [
        "NetLiquidation: 'USD-LONG-NAME' is not a currency code (three letters, e.g. USD)"
    ]


# --- currency codes: one form everywhere ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"), [("USD", "USD"), ("usd", "USD"), ("Usd", "USD"), ("jPy", "JPY")]
)
def test_a_code_in_any_case_is_the_upper_case_code(text, code):
    assert currency_code(text) == code


NOT_CODES = [
    "", "US", "USDX", " USD", "USD ", "US1", "U$D", "ÜSD", "\uff35\uff33\uff24", "U\x00D",
    "BASE", None, 840,
]  # fmt: skip


@pytest.mark.parametrize("text", NOT_CODES)
def test_anything_else_is_not_a_currency_code(text):
    with pytest.raises(MappingError, match="is not a currency code"):
        currency_code(text)


BASE_USD = {("NetLiquidation", "USD"): D("100")}


@pytest.mark.parametrize("spelling", ["usd", "Usd", "uSD"])
def test_every_currency_of_the_values_is_read_as_its_code(spelling):
    mapped = map_account_values(
        values(
            {
                ("NetLiquidation", spelling): D("100"),
                ("CashBalance", spelling): D("10"),
                ("ExchangeRate", spelling): D("1"),
                ("CashBalance", "eur"): D("5"),
                ("ExchangeRate", "Eur"): D("1.08"),
            }
        ),
        {},
    )

    assert mapped.base_currency == mapped.snapshot["currency"] == "USD"
    assert mapped.snapshot["net_liquidation"] == D(100)
    assert set(mapped.cash) == {"USD", "EUR"}
    assert mapped.cash["EUR"]["rate_currency"] == "USD"
    assert mapped.snapshot["exchange_rates"] == {"EUR": "1.08", "USD": "1"}
    assert mapped.errors == [] and mapped.cash_kept_reason == ""


def test_a_currency_sent_twice_in_different_cases_with_different_amounts_is_neither():
    mapped = map_account_values(
        values({**BASE_USD, ("CashBalance", "USD"): D(10), ("CashBalance", "usd"): D(11)}), {}
    )

    assert mapped.cash == {}
    assert "USD balance was sent twice" in mapped.cash_kept_reason
    assert [e.reason for e in mapped.errors] == [
        "CashBalance: USD was sent twice (in different cases) with different values"
    ]


# --- exchange rates: only a positive, finite rate converts ----------------------------------


@pytest.mark.parametrize(
    ("rate", "stored_rate"),
    [
        (D(0), D(0)),
        (D("-1.0825"), D("-1.0825")),
        (D("-0"), D(0)),
        (None, None),  # IBKR's "no value"
        (D("1E-12"), None),  # rounds to 0 at the column's places: cannot be stored
        (D("1E+25"), None),  # past the column
    ],
)
def test_a_rate_that_does_not_convert_is_no_rate_and_an_error_naming_it(rate, stored_rate):
    mapped = map_account_values(
        values(
            {
                **BASE_USD,
                ("CashBalance", "EUR"): D("1000"),
                ("ExchangeRate", "EUR"): rate,
                ("CashBalance", "USD"): D("1"),
                ("ExchangeRate", "USD"): D("1"),
            }
        ),
        {},
    )

    # The balance is stored all the same; its rate converts nothing.
    assert mapped.cash["EUR"]["amount"] == D(1000)
    assert mapped.cash["EUR"]["exchange_rate"] == stored_rate
    assert mapped.snapshot["exchange_rates"] == {"USD": "1"}
    assert "EUR" not in mapped.exchange_rates
    [error] = mapped.errors
    assert error.reason.startswith("ExchangeRate (EUR): ")
    if stored_rate is not None:
        assert f": {plain(stored_rate)} is not a positive rate: EUR amounts" in error.reason
    assert mapped.cash_kept_reason == ""


def test_every_rate_is_kept_with_or_without_cash_in_its_currency():
    mapped = map_account_values(
        values(
            {
                **BASE_USD,
                ("CashBalance", "USD"): D("50"),
                ("ExchangeRate", "USD"): D("1.00"),
                # A JPY position, no JPY cash: the rate is kept all the same.
                ("ExchangeRate", "JPY"): D("0.0067"),
                ("ExchangeRate", "CHF"): D("1.1234567890123"),  # more places than a column
                ("ExchangeRate", "BASE"): D("1"),  # not a currency
            }
        ),
        {},
    )

    assert mapped.snapshot["exchange_rates"] == {
        "CHF": "1.123456789", "JPY": "0.0067", "USD": "1"
    }  # fmt: skip
    assert mapped.exchange_rates["JPY"] == D("0.0067")
    assert list(mapped.cash) == ["USD"] and mapped.cash["USD"]["rate_currency"] == "USD"


def test_rates_without_a_base_currency_convert_to_nothing_known():
    mapped = map_account_values(
        values({("CashBalance", "EUR"): D(5), ("ExchangeRate", "EUR"): D("1.08")}), {}
    )

    assert mapped.base_currency == "" and mapped.snapshot["exchange_rates"] == {}
    assert mapped.cash["EUR"] == {"amount": D(5), "exchange_rate": D("1.08"), "rate_currency": ""}


# --- cash: the stored set is replaced only by a whole, readable one -------------------------


@pytest.mark.parametrize(
    ("cash", "reason"),
    [
        ({("CashBalance", "BASE"): D("50081.25")},
         "IBKR sent only the BASE total of the cash, no balance per currency"),
        ({("CashBalance", "BASE"): None},
         "IBKR sent only the BASE total of the cash, no balance per currency"),
        ({}, "IBKR sent no cash balance"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", "EUR"): None},
         "IBKR sent no value for the EUR balance"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", "EUR"): D("1E+25")},
         "the EUR balance cannot be stored"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", "EUR"): D("1E-11")},
         "the EUR balance cannot be stored"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", "usd1"): D(5)},
         "a balance's currency 'usd1' is not a code"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", ""): D(5)},
         "a balance's currency '' is not a code"),
        ({("CashBalance", "USD"): D(1), ("CashBalance", "TOOLONGCCY"): D(5)},
         "a balance's currency 'TOOLONGCCY' is not a code"),
    ],
)  # fmt: skip
def test_cash_that_cannot_be_trusted_whole_replaces_nothing(cash, reason):
    mapped = map_account_values(values({**BASE_USD, **cash}), {})

    assert mapped.cash == {}
    assert mapped.cash_kept_reason == reason


@pytest.mark.parametrize("currency", ["", "usd1", "€", "US D"])
def test_a_cash_currency_that_is_not_a_code_is_an_error_entry(currency):
    mapped = map_account_values(
        values({**BASE_USD, ("CashBalance", currency): D(5), ("CashBalance", "CHF"): D(5)}), {}
    )

    assert mapped.cash == {}
    assert [e.reason for e in mapped.errors] == [
        f"CashBalance: {currency!r} is not a currency code (three letters, e.g. USD)"
    ]


def test_a_whole_set_replaces_with_each_rate_and_its_currency():
    mapped = map_account_values(
        values(
            {
                ("NetLiquidation", "EUR"): D("1"),
                ("CashBalance", "EUR"): D("0"),
                ("ExchangeRate", "EUR"): D("1"),
                ("CashBalance", "USD"): D("-5"),
                ("ExchangeRate", "USD"): D("0.9234"),
                ("CashBalance", "BASE"): D("-4.617"),
            }
        ),
        {},
    )

    assert mapped.cash_kept_reason == "" and mapped.cash_reported
    assert mapped.cash == {
        "EUR": {"amount": D(0), "exchange_rate": D(1), "rate_currency": "EUR"},
        "USD": {"amount": D(-5), "exchange_rate": D("0.9234"), "rate_currency": "EUR"},
    }


# --- an instrument's currency --------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("currency", "stored"), [("USD", "USD"), ("usd", "USD"), ("Eur", "EUR"), ("", "")]
)
def test_an_instruments_currency_is_its_code_or_none_sent(currency, stored):
    from ibkr_sync.mapping import map_position

    record = PositionRecord("U1", 1, "AAPL", "STK", D(1), D(1), currency=currency)

    assert map_position(record).instrument["currency"] == stored


@pytest.mark.django_db
@pytest.mark.parametrize("currency", ["US", "USDX", " USD", "U$D", "ÜSD", "x" * 9])
def test_an_instrument_whose_currency_is_not_a_code_is_the_records_error(currency):
    from ibkr_sync.mapping import map_position

    record = PositionRecord("U1", 1, "AAPL", "STK", D(1), D(1), currency=currency)

    with pytest.raises(MappingError, match="is not a currency code"):
        map_position(record)
