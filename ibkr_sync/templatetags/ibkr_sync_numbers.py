"""Amounts in the portfolio's templates: `{{ value|money }}` shows 1,234.57 (cents, half
even; "-" for no value) and `{{ value|exact }}` the exact value, for a title beside it."""

from decimal import Decimal

from django import template

from .. import decimals

register = template.Library()


@register.filter
def money(value: Decimal | None) -> str:
    return "-" if value is None else decimals.money(value)


@register.filter
def exact(value: Decimal | None) -> str:
    return "" if value is None else decimals.plain(value)
