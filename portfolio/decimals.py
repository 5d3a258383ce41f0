"""Decimals as people read them: `plain` (the formatter the sync app offers every host) and
the grouped forms the admin shows, 1,234,567.89.

Every form here is computed in a context wide enough for any column (30 digits): nothing
is rounded unless the function says it rounds.
"""

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

from ibkr_sync.decimals import plain

__all__ = ["exact_product", "exact_sum", "grouped", "money", "plain", "rate", "rounded"]

# Wider than any product of two 30-digit columns: no operation here rounds by accident.
_PRECISION = 80


def grouped(value: Decimal, places: int = 0) -> str:
    """`value` exactly, with thousands separators and at least `places` decimals:
    grouped(Decimal("1234.5"), 2) == "1,234.50", grouped(Decimal("0.12345678")) ==
    "0.12345678". Never rounds: a digit the value has is a digit shown."""
    with localcontext(prec=_PRECISION):
        value = Decimal(plain(value))
        if value.as_tuple().exponent > -places:
            value = value.quantize(Decimal(1).scaleb(-places))
        return f"{value:,f}"


def rounded(value: Decimal, places: int, min_places: int = 0) -> str:
    """Rounded half-even to at most `places` decimals, with at least `min_places`, and
    thousands separators: rounded(Decimal("234.5678901234"), 4, 2) == "234.5679",
    rounded(Decimal("1250.5"), 4, 2) == "1,250.50". Show the exact value beside it."""
    with localcontext(prec=_PRECISION):
        return grouped(
            value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN),
            min(min_places, places),
        )


def money(value: Decimal, places: int = 2) -> str:
    """Rounded half-even to `places` decimals (cents), with thousands separators:
    1,234,567.89. Show the exact value (`plain`) beside it, e.g. in a tooltip."""
    with localcontext(prec=_PRECISION):
        return f"{value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN):,f}"


def rate(value: Decimal) -> str:
    """An exchange rate exactly, with at least four decimals: 1.0850, 0.0068935."""
    return grouped(value, 4)


def exact_product(amount: Decimal, factor: Decimal) -> Decimal:
    """amount x factor without rounding (the default context keeps 28 digits)."""
    with localcontext(prec=_PRECISION):
        return amount * factor


def exact_sum(values) -> Decimal:
    """The sum of `values` without rounding."""
    with localcontext(prec=_PRECISION):
        return sum(values, Decimal(0))
