"""Decimals as people read them: 0.5, not 0.5000000000 (the column's scale); and products
with every digit."""

from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, Inexact


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


def product(a: Decimal, b: Decimal) -> Decimal:
    """`a` x `b` with every digit of the result.

    `a * b` rounds to the default context's 28 significant digits, and two columns of 30
    digits multiply to up to 60: the context here holds them all (and says so if not).
    """
    digits = len(a.as_tuple().digits) + len(b.as_tuple().digits)
    exact = Context(prec=digits, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact])
    return exact.multiply(a, b)
