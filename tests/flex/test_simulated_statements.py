"""The statements the fake Flex Web Service makes of the simulator's portfolio add up:
read by our parser, every position is the sum of its trades, every currency's cash the
sum of its deposits, trades, dividends, taxes, interest and fees, every day's net asset
value its cash and positions at the statement's rates; and the positions are the
gateway simulator's (the same sample portfolio)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import Decimal

import pytest

from ibkr_sync.sources.flex.parser import parse_flex
from ibkr_sync.testing import load_sample_portfolio
from ibkr_sync.testing.flex_portfolio import NO_EQUITY, RATES_TO_USD, FlexHistory

END = dt.date(2026, 3, 13)
CENT = Decimal("0.01")


@pytest.fixture(scope="module")
def history():
    return FlexHistory(end=END, days=7)


@pytest.fixture(scope="module")
def response(history):
    return parse_flex(history.statement().encode(), period=(history.start, history.end))


def by_account(response):
    return {s.account: s for s in response.statements}


def test_every_account_of_the_sample_portfolio_has_its_statement(response):
    statements = by_account(response)
    assert list(statements) == ["DU1234567", "DU7654321", "DU5555555"]
    for statement in statements.values():
        assert statement.base_currency == "USD"
        assert (statement.header.from_date, statement.header.to_date) == (
            dt.date(2026, 3, 7),
            END,
        )
        assert not statement.end.rows_ignored, statement.end.rows_ignored
        assert statement.end.problems == 0
    currencies = {b.currency for s in statements.values() for b in s.cash}
    assert currencies == {"USD", "EUR", "CHF", "GBP"}


def test_positions_are_the_sum_of_the_trades_and_the_gateways_quantities(response):
    summed: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    for statement in response.statements:
        for trade in statement.trades:
            if trade.contract.sec_type != "CASH":
                summed[trade.account, trade.contract.con_id] += trade.quantity
    held = {
        (p.account, p.contract.con_id): p.quantity for s in response.statements for p in s.positions
    }
    assert held == {key: quantity for key, quantity in summed.items() if quantity}
    # The gateway simulator's portfolio, but for its forex positions (cash in a statement).
    gateway = {
        (p.account, p.con_id): p.quantity
        for p in load_sample_portfolio().positions
        if p.sec_type != "CASH"
    }
    assert held == gateway
    # At each account's own price, as the gateway simulator reports it.
    prices = {
        (p.account, p.contract.con_id): p.mark_price
        for s in response.statements
        for p in s.positions
    }
    assert prices == {
        (p.account, p.con_id): p.price
        for p in load_sample_portfolio().positions
        if p.sec_type != "CASH"
    }


def test_cash_is_deposits_trades_dividends_taxes_interest_and_fees(response):
    for statement in response.statements:
        summed: dict[str, Decimal] = defaultdict(Decimal)
        for trade in statement.trades:
            summed[trade.currency] += trade.proceeds
            summed[trade.commission_currency] += trade.commission
            if trade.contract.sec_type == "CASH":  # EUR.USD: the euros bought or sold
                summed[trade.contract.symbol.split(".")[0]] += trade.quantity
        for transaction in statement.cash_transactions:
            summed[transaction.currency] += transaction.amount
        ending = {b.currency: b.ending_cash for b in statement.cash}
        assert ending == dict(summed), statement.account
        kinds = {t.kind for t in statement.cash_transactions}
        assert {"deposit", "interest"} <= kinds
        in_base = sum((amount * RATES_TO_USD[c] for c, amount in ending.items()), Decimal(0))
        assert statement.cash_total.ending_cash == in_base.quantize(CENT)


def test_each_days_net_asset_value_is_its_cash_and_positions_at_the_statements_rates(
    history, response
):
    for statement in response.statements:
        navs = {nav.date: nav for nav in statement.net_asset_values}
        assert sorted(navs) == [history.start + dt.timedelta(days=n) for n in range(7)]
        last = navs[END]
        rates = {r.from_currency: r.rate for r in statement.exchange_rates if r.date == END}
        rates["USD"] = Decimal(1)
        cash = sum((b.ending_cash * rates[b.currency] for b in statement.cash), Decimal(0))
        values = sum(
            (
                p.quantity
                * p.mark_price
                * p.contract.multiplier
                / (100 if p.contract.sec_type == "BOND" else 1)
                * rates[p.contract.currency]
                for p in statement.positions
                if p.contract.sec_type not in NO_EQUITY
            ),
            Decimal(0),
        )
        assert last.cash == cash.quantize(CENT)
        assert last.total == last.cash + last.stock + last.options
        # Three parts, each rounded to the cent: at most 1.5 cents from the exact sum.
        assert abs(last.total - (cash + values)) <= Decimal("0.015")


def test_an_expiry_an_assignment_and_a_dividend_with_its_tax_reversed(response):
    statement = by_account(response)["DU1234567"]
    events = {e.kind: e for e in statement.option_events}
    assert set(events) == {"assignment", "expiration"}
    assigned, expired = events["assignment"], events["expiration"]
    book = [t for t in statement.trades if t.transaction_type == "BookTrade"]
    assert {t.codes for t in book} == {("A",), ("Ep",)}
    stock = next(
        t
        for t in book
        if t.codes == ("A",) and t.contract.con_id == assigned.contract.underlying_con_id
    )
    assert stock.quantity == 100 and stock.price == assigned.contract.strike
    assert (
        sum(t.quantity for t in statement.trades if t.contract.con_id == expired.contract.con_id)
        == 0
    )
    assert {t.contract.sec_type for t in statement.trades if t.contract.sec_type == "CASH"} == {
        "CASH"
    }, "an FX conversion"

    dividends = [t for t in statement.cash_transactions if t.kind == "dividend"]
    assert len(dividends) == 2 and {d.currency for d in dividends} == {"USD", "EUR"}
    taxes = {
        d.transaction_id: [
            t.amount
            for t in statement.cash_transactions
            if t.kind == "withholding_tax" and t.action_id == d.action_id
        ]
        for d in dividends
    }
    reversed_, charged = sorted(dividends, key=lambda d: -len(taxes[d.transaction_id]))
    amount = reversed_.amount
    assert taxes[reversed_.transaction_id] == [
        -(amount * Decimal("0.30")).quantize(CENT),
        (amount * Decimal("0.30")).quantize(CENT),
        -(amount * Decimal("0.15")).quantize(CENT),
    ]
    assert taxes[charged.transaction_id] == [-(charged.amount * Decimal("0.30")).quantize(CENT)]
    ids = [t.transaction_id for s in response.statements for t in (*s.trades, *s.cash_transactions)]
    assert len(ids) == len(set(ids)) and all(ids), "every row has an id of its own"


def test_a_period_holds_its_rows_and_the_positions_and_cash_at_its_end(history):
    middle = history.start + dt.timedelta(days=3)
    early = parse_flex(history.statement(history.start, middle).encode())
    late = parse_flex(history.statement(middle + dt.timedelta(days=1), END).encode())
    for account in ("DU1234567", "DU7654321"):
        first, second = by_account(early)[account], by_account(late)[account]
        assert {t.date for t in first.cash_transactions} <= {
            history.start + dt.timedelta(days=n) for n in range(4)
        }
        held = {p.contract.con_id: p.quantity for p in first.positions}
        assert held == {
            con_id: q for (a, con_id), q in history.positions(middle).items() if a == account
        }
        # The rows of both periods are the rows of the whole history, each once.
        whole = by_account(parse_flex(history.statement().encode()))[account]
        assert sorted(t.transaction_id for t in (*first.trades, *second.trades)) == sorted(
            t.transaction_id for t in whole.trades
        )


def test_the_same_history_is_the_same_statement_again():
    assert FlexHistory(end=END).statement() == FlexHistory(end=END).statement()


def test_a_generated_portfolio_adds_up_too():
    from ibkr_sync.testing import generate_portfolio

    portfolio = generate_portfolio(300, accounts=3, seed=5)
    response = parse_flex(FlexHistory(portfolio, end=END).statement().encode())
    summed: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    for statement in response.statements:
        assert statement.end.problems == 0
        for trade in statement.trades:
            if trade.contract.sec_type != "CASH":
                summed[trade.account, trade.contract.con_id] += trade.quantity
    held = {
        (p.account, p.contract.con_id): p.quantity for s in response.statements for p in s.positions
    }
    assert held == {key: q for key, q in summed.items() if q}
    assert held == {
        (p.account, p.con_id): p.quantity for p in portfolio.positions if p.sec_type != "CASH"
    }
