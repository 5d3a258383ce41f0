"""Exact decimal arithmetic: products keep every digit, whatever the default context."""

from decimal import Decimal

import pytest

from ibkr_sync.decimals import plain, product
from portfolio.models import CashBalance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("-1234.5678901234", "0.0067245", "-8.30185177713480330"),
        ("2", "0.5", "1.0"),
        ("0", "0.0067245", "0E-7"),
        ("-0.0000000001", "0.0000000001", "-1E-20"),
        # 30 digits by 30 digits: 60 digits, where `a * b` keeps 28.
        (
            "12345678901234567890.1234567891",
            "98765432109876543210.9876543211",
            "1219326311370217952261850327347340344423.48574912122374638001",
        ),
    ],
)
def test_product_keeps_every_digit(a, b, expected):
    result = product(Decimal(a), Decimal(b))

    assert result == Decimal(expected)
    assert str(result) == str(Decimal(expected))


def test_the_default_context_would_have_rounded():
    a, b = Decimal("98765432101.1234567891"), Decimal("0.0067245127")

    assert a * b != product(a, b)  # 29 digits: the default context keeps 28
    assert plain(product(a, b)) == "664149402.48499236944620417157"


def test_a_cash_balances_base_amount_is_the_exact_product():
    cash = CashBalance(
        currency="JPY",
        amount=Decimal("98765432101.1234567891"),
        exchange_rate=Decimal("0.0067245127"),
        rate_currency="USD",
    )

    assert str(cash.base_amount) == "664149402.48499236944620417157"
    assert CashBalance(currency="JPY", amount=Decimal("5"), exchange_rate=None).base_amount is None


@pytest.mark.parametrize(
    ("rate", "rate_currency"),
    [
        (None, "USD"),
        (Decimal(0), "USD"),
        (Decimal("-0"), "USD"),
        (Decimal("-1.0825"), "USD"),
        (Decimal("NaN"), "USD"),
        (Decimal("Infinity"), "USD"),
        (Decimal("1.0825"), ""),  # converts to a currency nobody knows
    ],
)
def test_only_a_positive_rate_to_a_known_currency_gives_a_base_amount(rate, rate_currency):
    cash = CashBalance(
        currency="EUR", amount=Decimal("1000"), exchange_rate=rate, rate_currency=rate_currency
    )

    assert cash.base_amount is None
