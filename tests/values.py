"""Rows with IBKR's values (market values, P&L, cash, account snapshots), written straight
into the portfolio models for the admin's tests."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.utils import timezone

from portfolio.models import Account, AccountSnapshot, CashBalance, Instrument, Position


def D(value) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def account(external_id: str, base_currency: str = "USD", **fields) -> Account:
    return Account.objects.create(
        broker="ibkr", external_id=external_id, base_currency=base_currency, **fields
    )


def instrument(symbol: str, sec_type: str = "STK", currency: str = "USD", **fields) -> Instrument:
    fields.setdefault("external_id", f"{symbol}-{sec_type}-{currency}")
    return Instrument.objects.get_or_create(
        broker="ibkr", symbol=symbol, sec_type=sec_type, currency=currency, defaults=fields
    )[0]


def held(
    owner: Account,
    symbol: str,
    sec_type: str = "STK",
    currency: str = "USD",
    quantity="1",
    cost_basis=None,
    market_value=None,
    unrealized_pnl=None,
    closed: bool = False,
    **fields,
) -> Position:
    """A position with IBKR's values as given (None: not reported)."""
    now = timezone.now()
    quantity = D(quantity)
    fields.setdefault("average_cost", None if cost_basis is None else D(cost_basis) / quantity)
    return Position.objects.create(
        account=owner,
        instrument=instrument(symbol, sec_type, currency),
        quantity=quantity,
        cost_basis=D(cost_basis),
        market_value=D(market_value),
        unrealized_pnl=D(unrealized_pnl),
        opened_at=now,
        last_synced_at=now,
        closed_at=now if closed else None,
        valued_at=None if market_value is None else now,
        **fields,
    )


def cash(owner: Account, currency: str, amount, rate=None, rate_currency=None) -> CashBalance:
    """A cash row as a sync writes it: a rate converts to the base currency of its read
    (the account's, unless `rate_currency` says otherwise)."""
    if rate_currency is None:
        rate_currency = "" if rate is None else owner.base_currency
    return CashBalance.objects.create(
        account=owner,
        currency=currency,
        amount=D(amount),
        exchange_rate=D(rate),
        rate_currency=rate_currency,
        synced_at=timezone.now(),
    )


def snapshot(
    owner: Account,
    taken_at: dt.datetime,
    net_liquidation,
    currency=None,
    exchange_rates=None,
    **fields,
):
    """An account's values as a sync writes them; `exchange_rates` by currency, to its
    currency (the account's base currency unless given)."""
    return AccountSnapshot.objects.create(
        account=owner,
        taken_at=taken_at,
        currency=owner.base_currency if currency is None else currency,
        net_liquidation=D(net_liquidation),
        exchange_rates={c: str(r) for c, r in (exchange_rates or {}).items()},
        **{name: D(value) for name, value in fields.items()},
    )
