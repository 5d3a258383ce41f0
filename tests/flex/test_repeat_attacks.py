"""The same Flex statement downloaded again, attacked: sequences of syncs in which the
repeat (`Snapshot.repeats`) must not be taken, because reading the statement whole would
write something, or report something other than the repeat. The real client over real
HTTP against the fake Flex Web Service, the service and the writer, into the database
(SQLite, or PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from ibkr_sync import conf
from ibkr_sync.models import SyncRun

from .test_backfill import ACCOUNT, Trade
from .test_flex_connection import QUERY, flex_connection, period_end, service  # noqa: F401
from .test_repeat import END, START, regenerated, sync

pytestmark = pytest.mark.django_db


def repeated(result) -> bool:
    return "repeats" in SyncRun.objects.get(pk=result.sync_run_id).statement


def test_cash_deleted_since_is_written_again(service):  # noqa: F811
    """The cash balances a statement wrote are part of what it left: a balance deleted
    since is written again by a full read, so the statement is not a repeat."""
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    cash = conf.cash_balance_model().objects.filter(account__external_id=ACCOUNT)
    assert set(cash.values_list("currency", flat=True)) == {"USD", "EUR"}
    cash.filter(currency="EUR").delete()

    again = sync()

    assert not repeated(again)
    assert set(cash.values_list("currency", flat=True)) == {"USD", "EUR"}
    assert cash.get(currency="EUR").amount == Decimal("1758.75")


def _edit_trade(day: dt.date) -> None:
    Trade().objects.update(price=Decimal("99"))


def _replace_trade(day: dt.date) -> None:
    # The statement's trade gone, another of the same account and day in its place (as
    # many rows as the statement left).
    Trade().objects.update(external_id="entered-by-hand")


def _edit_period_end(day: dt.date) -> None:
    snapshots = conf.account_snapshot_model().objects
    snapshots.filter(taken_at=period_end(day)).update(net_liquidation=Decimal("1"))


def _edit_cash(day: dt.date) -> None:
    conf.cash_balance_model().objects.filter(currency="EUR").update(amount=Decimal("1"))


def _restored(day: dt.date) -> bool:
    trades = Trade().objects.filter(external_id=f"8{START:%Y%m%d}", price=Decimal("100"))
    snapshot = conf.account_snapshot_model().objects.get(taken_at=period_end(day))
    cash = conf.cash_balance_model().objects.get(currency="EUR")
    return (
        trades.count() == 1
        and snapshot.net_liquidation == Decimal("35809.445")
        and cash.amount == Decimal("1758.75")
    )


@pytest.mark.xfail(
    strict=True,
    reason=(
        "a repeat is decided on how many rows the statement left in its ranges, not on "
        "their content: a row edited, or deleted and replaced by another, since is not "
        "seen, while a full read writes it again"
    ),
)
@pytest.mark.parametrize(
    "edit",
    [_edit_trade, _replace_trade, _edit_period_end, _edit_cash],
    ids=["trade-edited", "trade-replaced", "period-end-snapshot-edited", "cash-edited"],
)
def test_a_row_edited_since_is_written_again(service, edit):  # noqa: F811
    service.add_statement(QUERY, regenerated)
    flex_connection()
    sync()
    assert _restored(END)
    edit(END)

    again = sync()

    assert not repeated(again)
    assert _restored(END)
