"""Each account's values, read in the same session after the positions; and what the
account value tags mean, turned into the source-neutral `AccountValues`.

The read (`ValuesRead._read_values`): one account-updates subscription at a time
(`reqAccountUpdates`, which TWS serves for one account at a time), read up to its
download-end marker, then cancelled. It is the one request that gives both the account's
values (cash and exchange rate per currency, net liquidation, P&L) and every position's
market value, for any number of accounts and for linked and advisor accounts alike
(`reqAccountSummary` has no position values and refuses group "All" to an advisor with
more than 50 sub-accounts; `reqPnLSingle` would be one subscription per position). An
account whose values time out, are refused (2100, 2101), are not ready or come in a
frame that cannot be read is reported missing with the reason: it never fails the
positions, which were complete before the first value was asked for.

The interpretation (`account_values`): TWS sends each value as (tag, value, currency).
The totals are in the base currency: the currency IBKR gives NetLiquidation in (or
TotalCashValue). Per-currency tags (P&L) carry their total in the base currency under
the currency "BASE"; the base currency's own row is the P&L of the positions in that
currency only, so it is the account's only when the account has no other currency.
CashBalance and ExchangeRate come per currency, the cash's total in the base currency
under "BASE". Every currency is read as a code (`usd` is USD); what cannot be read so is
a problem of the account, never a currency of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Final

from ...conf import GatewayConfig
from ...snapshot import (
    CASH,
    EXCHANGE_RATE,
    AccountValues,
    CurrencyError,
    PositionValue,
    ValueProblem,
    currency_code,
    shown,
)
from .errors import logger
from .state import _AccountRead, _ReadState

#: The currency IBKR gives a per-currency value's total in the account's base currency.
BASE_CURRENCY: Final = "BASE"
#: The AccountSnapshot totals, by the account value tag TWS sends each in.
TOTAL_TAGS: Final = {
    "net_liquidation": "NetLiquidation",
    "total_cash_value": "TotalCashValue",
    "gross_position_value": "GrossPositionValue",
    "unrealized_pnl": "UnrealizedPnL",
    "realized_pnl": "RealizedPnL",
    "available_funds": "AvailableFunds",
    "buying_power": "BuyingPower",
}
_CASH_TAG: Final = "CashBalance"
_RATE_TAG: Final = "ExchangeRate"
#: The account values a sync reads (every other tag is passed over unread): the account's
#: totals in its base currency, and per currency its cash and IBKR's exchange rate.
READ_TAGS: Final = frozenset({*TOTAL_TAGS.values(), _CASH_TAG, _RATE_TAG})
#: How an error names each figure: by its tag, as TWS shows it.
_NAMES: Final = {**TOTAL_TAGS, CASH: _CASH_TAG, EXCHANGE_RATE: _RATE_TAG}
#: Tags IBKR gives per currency, with their total in the base currency as currency BASE.
_PER_CURRENCY_TOTALS = frozenset({"UnrealizedPnL", "RealizedPnL"})
#: The tags whose currency is checked: a value under a currency that is not a code is a
#: problem of the account (other tags are not read).
_CHECKED_TAGS = READ_TAGS
_PER_CURRENCY_TAGS = frozenset({_CASH_TAG, _RATE_TAG})
#: The totals IBKR gives in the account's base currency only: the currency they name is it.
_BASE_TAGS = ("NetLiquidation", "TotalCashValue")


def account_values(
    account: str,
    values: dict[tuple[str, str], Decimal | None],
    positions: dict[int, PositionValue],
    *,
    as_of: dt.datetime | None = None,
) -> AccountValues:
    """One account's download, its values by (tag, currency) as TWS sent them, in
    neutral terms: the base currency, the totals in it, the cash and rates per currency
    code, and what could not be interpreted.

    A total is taken in the base currency, else from the BASE row; a per-currency total
    (P&L) from the BASE row only, or the base currency's own row when the account has no
    other currency. Totals in two currencies name no base currency (a problem): which one
    the rates convert to cannot be told, so no rate is kept and no total is taken. A cash
    balance under a currency that is not a code, or sent twice (`usd` and `USD`) with
    different values, means the cash cannot be trusted whole (`cash_problems`).
    """
    problems: list[ValueProblem] = []

    def refuse(label: str, reason: object) -> None:
        problems.append(ValueProblem(label, str(reason)))

    reported, untrusted = _canonical_values(values, refuse)
    base = _base_currency(reported, refuse)
    others = {c for _, c in reported if c and c not in (BASE_CURRENCY, base)}
    totals: dict[str, Decimal | None] = {}
    for name, tag in TOTAL_TAGS.items():
        if tag in _PER_CURRENCY_TOTALS:
            sources = (BASE_CURRENCY,) if others or not base else (BASE_CURRENCY, base)
        else:
            sources = (base, BASE_CURRENCY) if base else (BASE_CURRENCY,)
        for currency in sources:
            if (tag, currency) in reported:
                totals[name] = reported[tag, currency]
                break
    rates, cash = {}, {}
    for (tag, currency), value in reported.items():
        if tag == _RATE_TAG and currency not in ("", BASE_CURRENCY):
            rates[currency] = value
        elif tag == _CASH_TAG and currency != BASE_CURRENCY:
            cash[currency] = value
    return AccountValues(
        account,
        as_of=as_of,
        base_currency=base,
        totals=totals,
        cash=cash,
        cash_total_reported=(_CASH_TAG, BASE_CURRENCY) in reported,
        cash_problems=tuple(untrusted),
        exchange_rates=rates,
        positions=positions,
        problems=tuple(problems),
        names=_NAMES,
    )


def _canonical_values(
    raw: dict[tuple[str, str], Decimal | None], refuse: Callable[[str, object], None]
) -> tuple[dict[tuple[str, str], Decimal | None], list[str]]:
    """The values by (tag, currency code), and why the cash cannot be trusted whole, if
    so. A currency that is not a code is refused (a problem, for the tags read); a tag
    sent twice under one code (`usd` and `USD`) with different values is neither."""
    reported: dict[tuple[str, str], Decimal | None] = {}
    untrusted: list[str] = []
    conflicts: set[tuple[str, str]] = set()
    for (tag, currency), value in raw.items():
        # A value that is not money has no currency: only cash and rates must name one.
        if currency != BASE_CURRENCY and (currency or tag in _PER_CURRENCY_TAGS):
            try:
                currency = currency_code(currency)
            except CurrencyError as exc:
                if tag in _CHECKED_TAGS:
                    refuse(tag, exc)
                    if tag == _CASH_TAG:
                        untrusted.append(f"a balance's currency {shown(currency)!r} is not a code")
                continue
        key = (tag, currency)
        if key in reported and reported[key] != value:
            conflicts.add(key)
        reported[key] = value
    for tag, currency in sorted(conflicts):
        del reported[tag, currency]
        if tag in _CHECKED_TAGS:
            refuse(tag, f"{currency} was sent twice (in different cases) with different values")
            if tag == _CASH_TAG:
                untrusted.append(f"the {currency} balance was sent twice with different values")
    return reported, untrusted


def _base_currency(
    reported: dict[tuple[str, str], Decimal | None], refuse: Callable[[str, object], None]
) -> str:
    """The one currency IBKR gives the account's totals in, or "" if none. Totals in two
    currencies name none (a problem): which one the rates convert to cannot be told, so
    no rate is kept under either and no total is taken in either."""
    named = sorted({c for t, c in reported if t in _BASE_TAGS and c and c != BASE_CURRENCY})
    if len(named) > 1:
        refuse(
            "base currency",
            f"IBKR gave the account's totals ({', '.join(_BASE_TAGS)}) in "
            f"{' and '.join(named)}: no base currency, so no rate is kept and no total "
            "is taken from this download",
        )
        return ""
    return named[0] if named else ""


class ValuesRead:
    """How the source reads each account's values after the positions (mixed into it)."""

    config: GatewayConfig

    async def _read_values(
        self, ib: Any, state: _ReadState
    ) -> tuple[dict[str, AccountValues], dict[str, str]]:
        """Each account's values in turn; an account that cannot be read is missing, with
        the reason, and the others are read all the same. Once the session itself has
        failed (the connection lost, the gateway's link to IBKR lost), every account whose
        download had not ended before it on the wire is missing too.

        What decides an account's outcome is the order of the messages on the wire, never
        how they were cut into TCP segments: each account's read is opened where the
        previous one ended (`_ReadState.open_next_values_read`), and ended by its download
        end or its first problem as the message is read (`_AccountRead.spoil`). This
        coroutine only asks for the values, waits, and tells a timeout.

        All accounts together get at most the request timeout, so that a sync holds the
        lock for a bounded time however many accounts time out; each waits at most its
        share of what is left, so that accounts that never answer (some TWS versions send
        no download end for some accounts of a multi-account login) cannot starve the
        ones after them. Those that timed out are asked once more with what is left.
        """
        values: dict[str, AccountValues] = {}
        missing: dict[str, str] = {}
        with contextlib.suppress(ConnectionError):
            ib.client.cancelPositions()  # the positions are read: no updates of them now
        held = Counter(p.account for p in state.positions.values() if p.quantity != 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout
        while state.values_opened:
            read = state.values_opened.popleft()
            account = read.account
            left = deadline - loop.time()
            if read.done.done():
                pass  # ended on the wire before it was asked for (spoiled, say)
            elif left <= 0:
                read.spoil(
                    "not read: the values of the accounts before it took the request "
                    f"timeout ({self.config.timeout_said('request_timeout')}) in all"
                )
                missing.setdefault(account, read.problem or "")
                continue
            else:
                share = min(self.config.values_timeout, left / state.reads_left(read.attempt))
                await self._read_account_values(ib, state, read, share)
            outcome = self._account_outcome(state, read, held)
            if isinstance(outcome, AccountValues):
                values[account] = outcome
                missing.pop(account, None)
            else:
                missing[account] = outcome
        failure = state.failure.result() if state.failure.done() else None
        for account, _ in state.values_plan:
            missing[account] = (
                "not read: the session with the IB gateway ended before its values were "
                f"asked for ({failure})"
            )
        state.values_plan.clear()
        for account, reason in missing.items():
            logger.warning("The values of account %s were not read: %s", account, reason)
        return values, missing

    async def _read_account_values(
        self, ib: Any, state: _ReadState, read: _AccountRead, timeout: float
    ) -> None:
        """Ask for an account's values and wait for its read to end, at most `timeout`."""
        state.values_requested = True
        try:
            ib.client.reqAccountUpdates(True, read.account)
            await asyncio.wait({read.done}, timeout=timeout)
        except ConnectionError as exc:
            read.spoil(f"not read: the connection to the IB gateway was lost ({exc})")
        finally:
            if not read.done.done():
                if read.attempt == 1:  # asked once more with what is left, after the others
                    state.values_plan.append((read.account, 2))
                cfg = self.config
                read.spoil(
                    f"IBKR did not send the account's values within {timeout:.2g} s "
                    f"({cfg.timeout_origin('values_timeout')}, or its share of "
                    f"{cfg.timeout_origin('request_timeout')}); its stored values were kept"
                )
            # TWS serves one account's updates at a time: let go before the next one
            # (after a refusal too: a cancel ends only this client's subscription, if any).
            with contextlib.suppress(ConnectionError):
                ib.client.reqAccountUpdates(False, read.account)

    @staticmethod
    def _account_outcome(
        state: _ReadState, read: _AccountRead, held: Counter
    ) -> AccountValues | str:
        """An ended read: the account's values, or the reason they are missing."""
        if read.problem is not None:
            return read.problem
        if read.unreadable_at_end > read.unreadable_at_start:
            return (
                "a message that could not be read arrived with the account's values "
                f"({state.unreadable_examples[-1]}); its stored values were kept"
            )
        if held[read.account] and not read.positions:
            return (
                f"IBKR sent no portfolio row for any of the account's {held[read.account]} "
                "positions (as for some linked accounts), so their market values are "
                "unknown; its stored values were kept"
            )
        return account_values(read.account, read.values, read.positions, as_of=read.as_of)
