"""The set-based sync at scale: queries bounded by batches, not rows; exact bulk writes.

Not timed: speed is measured by `bench/sync_bench.py`. These tests pin down what makes
it fast, so a change that reintroduces per-row queries fails here.
"""

import dataclasses
import datetime as dt
import math
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ibkr_sync import bulk
from ibkr_sync.bulk import BATCH_SIZE
from ibkr_sync.models import PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from ibkr_sync.testing import generate_portfolio
from portfolio.models import Instrument, Position
from tests.conftest import FakeGateway

pytestmark = pytest.mark.django_db


def generated_gateway(n: int, accounts: int = 3) -> FakeGateway:
    portfolio = generate_portfolio(n, accounts=accounts, seed=7)
    return FakeGateway(
        accounts=portfolio.accounts,
        positions=[p.as_gateway_position() for p in portfolio.positions],
    )  # fmt: skip


def sync(gateway):
    return sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


def mutate(gateway: FakeGateway) -> tuple[int, int]:
    """Change 10% of quantities, drop 5% of positions, as the benchmark does."""
    rows = gateway.positions
    changed = set(range(0, len(rows), 10))
    closed = set(range(5, len(rows), 20))
    gateway.positions = [
        dataclasses.replace(row, quantity=row.quantity + Decimal("0.5")) if i in changed else row
        for i, row in enumerate(rows)
        if i not in closed
    ]
    return len(changed), len(closed)


def queries_of(step) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        step()
    writes = [
        q["sql"]
        for q in captured
        if q["sql"].lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE")
        and q["sql"].split(" WHERE")[0].split(" SET")[0].split(" (")[0].split('"')[1]
        in ("portfolio_position", "portfolio_instrument")
    ]
    return len(captured), writes


def query_bound(n: int) -> int:
    """A constant (the lock's and the run's statements; the accounts' reports: an insert,
    a lock, an update, and once it wrote instruments another, stamping them after those;
    on PostgreSQL also the bounds put on every wait: SET LOCAL lock and statement
    timeouts), plus per batch of BATCH_SIZE rows at most an instrument read, an
    instrument insert, a position insert and a change insert (first sync). On
    PostgreSQL an insert of more rows than a batch is COPYed into a scratch table and
    inserted from it: three statements more (the table made, dropped before and after),
    for each of the three inserts, whatever the rows."""
    scratch = 3 * 3 if connection.vendor == "postgresql" else 0
    return 28 + scratch + 4 * math.ceil(n / BATCH_SIZE)


@pytest.mark.parametrize("step", ["first", "unchanged", "changed"])
def test_queries_grow_with_batches_not_with_rows(step, django_assert_max_num_queries):
    counts = {}
    for n in (1000, 5000):
        PositionChange.objects.all().delete()
        Position.objects.all().delete()
        Instrument.objects.all().delete()
        gateway = generated_gateway(n)
        if step != "first":
            sync(gateway)
        if step == "changed":
            mutate(gateway)
        with django_assert_max_num_queries(query_bound(n)) as captured:
            sync(gateway)
        counts[n] = len(captured)

    assert counts[5000] - counts[1000] <= query_bound(5000) - query_bound(1000), counts


def test_unchanged_resync_writes_no_position_or_instrument_row():
    gateway = generated_gateway(2000)
    sync(gateway)

    _, writes = queries_of(lambda: sync(gateway))

    assert writes == []


def test_changed_resync_writes_only_the_changed_rows():
    gateway = generated_gateway(2000)
    sync(gateway)
    changed, closed = mutate(gateway)

    result = sync(gateway)

    assert (result.updated, result.closed, result.unchanged) == (
        changed,
        closed,
        2000 - changed - closed,
    )
    run = SyncRun.objects.get(pk=result.sync_run_id)
    assert run.changes.filter(kind="updated").count() == changed
    assert run.changes.filter(kind="closed").count() == closed
    assert Position.objects.open().count() == 2000 - closed
    # Every changed position holds the new quantity, exactly.
    for row in gateway.positions[:50]:
        stored = Position.objects.get(
            instrument__external_id=str(row.con_id), account__external_id=row.account
        )
        assert stored.quantity == row.quantity
        assert stored.closed_at is None


def test_fast_insert_stores_exactly_what_bulk_create_stores():
    now = timezone.now()
    fields = {
        "broker": "ibkr", "symbol": "ES", "sec_type": "FOP", "currency": "USD",
        "exchange": "CME", "local_symbol": "ESZ6 C5000", "trading_class": "ES",
        "multiplier": Decimal("50"), "expiry": dt.date(2026, 12, 18),
        "contract_month": "202612", "strike": Decimal("5000.25"), "right": "C",
        "created_at": now, "updated_at": now,
    }  # fmt: skip
    (fast_pk,) = bulk.insert_rows(Instrument, [{"external_id": "1", **fields}])
    orm = Instrument.objects.bulk_create([Instrument(external_id="2", **fields)])[0]

    def stored(pk):
        row = Instrument.objects.filter(pk=pk).values().get()
        del row["id"], row["external_id"]
        # auto_now_add / auto_now: stamped at the insert, whatever the row gave, by both.
        stamps = row.pop("created_at"), row.pop("updated_at")
        assert all(now <= stamp <= timezone.now() for stamp in stamps), stamps
        return row

    assert stored(fast_pk) == stored(orm.pk)
    assert stored(fast_pk)["description"] == "", "left-out fields get the model default"

    quantity = Decimal("-1234567.1234567891")
    rows = [
        {"account_id": a, "instrument_id": fast_pk, "quantity": quantity, "average_cost": None,
         "cost_basis": None, "opened_at": now, "last_synced_at": now}
        for a in _accounts(2)
    ]  # fmt: skip
    fast = bulk.insert_rows(Position, rows[:1])[0]
    orm = Position.objects.bulk_create([Position(**rows[1])])[0].pk
    a, b = (Position.objects.filter(pk=pk).values().get() for pk in (fast, orm))
    for row in (a, b):
        del row["id"], row["account_id"]
    assert a == b
    expected = quantity if connection.vendor != "sqlite" else Decimal("-1234567.12345679")
    assert a["quantity"] == expected


def test_fast_insert_returns_keys_in_row_order_across_batches():
    now = timezone.now()
    rows = [
        {"broker": "ibkr", "external_id": str(i), "symbol": f"S{i}", "sec_type": "STK",
         "created_at": now, "updated_at": now}
        for i in range(BATCH_SIZE * 2 + 7)
    ]  # fmt: skip
    pks = bulk.insert_rows(Instrument, rows)

    assert dict(Instrument.objects.values_list("pk", "external_id")) == {
        pk: row["external_id"] for pk, row in zip(pks, rows, strict=True)
    }
    assert bulk.insert_rows(Instrument, []) == []


def _accounts(n):
    from portfolio.models import Account

    return [
        Account.objects.create(broker="ibkr", external_id=f"U{9000000 + i}").pk for i in range(n)
    ]


def test_change_rows_of_a_first_sync_point_at_the_created_positions():
    result = sync(generated_gateway(1200))

    changes = PositionChange.objects.filter(sync_run_id=result.sync_run_id)
    assert changes.count() == 1200
    pairs = set(changes.values_list("position_id", "quantity_after"))
    assert pairs == set(Position.objects.values_list("pk", "quantity"))


class ValuedGateway(FakeGateway):
    """Reports every account's values too: cash, net liquidation, a portfolio row per
    position (the wire's part is the integration tests'; here only the writes count)."""

    def fetch_positions(self, account_id=None):
        from ibkr_sync.snapshot import AccountValues, PositionValue

        snapshot = super().fetch_positions(account_id)
        values = {
            account: AccountValues(
                account,
                base_currency="USD",
                totals={"net_liquidation": Decimal("1000.5")},
                cash={"USD": Decimal(7)},
                positions={
                    p.con_id: PositionValue(
                        p.con_id, p.quantity, Decimal("1.5"), Decimal(3), Decimal(1), None
                    )
                    for p in snapshot.positions
                    if p.account == account
                },
            )
            for account in snapshot.accounts
        }
        return dataclasses.replace(snapshot, values_read=True, account_values=values)


def test_storing_values_costs_queries_by_batches_not_rows():
    counts = {}
    for n in (1_000, 3_000):
        Position.objects.all().delete()
        gateway = ValuedGateway(generated_gateway(n).positions, accounts=("U1", "U2", "U3"))
        gateway.positions = [dataclasses.replace(p, account=f"U{1 + i % 3}")
                             for i, p in enumerate(gateway.positions)]  # fmt: skip
        sync(gateway)
        counts[n], _ = queries_of(lambda gateway=gateway: sync(gateway))
        assert Position.objects.filter(market_price=Decimal("1.5")).count() == n
    extra_batches = math.ceil(3_000 / BATCH_SIZE) - math.ceil(1_000 / BATCH_SIZE)
    # SQLite: one UPDATE ... FROM per batch; PostgreSQL: one, whatever the number.
    assert counts[3_000] - counts[1_000] <= 3 * extra_batches, counts
