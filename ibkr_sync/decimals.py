"""Decimals as people read them: 0.5, not 0.5000000000 (the column's scale), and the
grouped forms the admin shows, 1,234,567.89; and sums and products with every digit.

Every form here is computed in a context wide enough for any column (30 digits): nothing
is rounded unless the function says it rounds.
"""

from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal, Inexact, localcontext

# Wider than any product of two 30-digit columns: no operation here rounds by accident.
_PRECISION = 80


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


_EXACT = Context(prec=_PRECISION)


def running_sum(total: Decimal, value: Decimal) -> Decimal:
    """`total` + `value` as `exact_sum` adds them (a sum kept as values stream by, one at
    a time: `exact_sum` of all of them, without holding them)."""
    return _EXACT.add(total, value)
