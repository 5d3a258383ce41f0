"""Decimals as people read them: 0.5, not 0.5000000000 (the column's scale)."""

from decimal import Decimal


def plain(value: Decimal) -> str:
    """`value` without trailing zeros, in plain notation, exactly.

    `Decimal.normalize()` would round to the context's 28 significant digits, and the
    columns hold up to 30: the zeros are stripped from the digits instead.
    """
    if value == 0:
        return "0"
    sign, digits, exponent = value.as_tuple()
    while exponent < 0 and digits and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return f"{Decimal((sign, digits, exponent)):f}"
