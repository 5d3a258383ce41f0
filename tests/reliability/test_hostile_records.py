"""Property-based: whatever records the gateway hands over, the sync stays sound.

Arbitrary unicode, empty and very long strings, NaN / infinity / IBKR's unset double,
zero, short and huge quantities, many decimals, duplicate account+conId entries, unknown
sec types and missing fields. The service never crashes, stores only exact decimals,
never closes a position because of a record it could not map, and the same input twice
leaves the same database.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ibkr_sync.gateway import GatewayPosition
from ibkr_sync.mapping import MappingError, map_position
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Position, SecType
from tests.conftest import FakeGateway, synced_rows_deleted_afterwards
from tests.reliability.conftest import database_state

pytestmark = pytest.mark.django_db

ACCOUNTS = ("U1111111", "DU2222222")
HELD_CON_IDS = (1, 2, 3, 4)  # positions already in the database before each example

UNSET_DOUBLE = Decimal("1.7976931348623157E308")
odd_text = st.one_of(
    st.text(max_size=20),
    st.text(min_size=60, max_size=400),
    st.sampled_from(["", " ", "AAPL", "ÄÖÜ", "株式", "💥", "a\x00b", "'; DROP TABLE x;--"]),
)
odd_decimal = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=-(10**25), max_value=10**25, places=14),
    st.sampled_from([Decimal(0), Decimal("-0"), UNSET_DOUBLE, -UNSET_DOUBLE, Decimal("1e-30")]),
    st.integers(min_value=-(10**30), max_value=10**30).map(Decimal),
)
records = st.builds(
    GatewayPosition,
    account=st.one_of(
        st.sampled_from(ACCOUNTS), st.sampled_from(["", "DU2222222 ", "U1\x002"]), odd_text
    ),
    con_id=st.one_of(st.sampled_from(HELD_CON_IDS), st.integers(-3, 10**15)),
    symbol=odd_text,
    sec_type=st.one_of(st.sampled_from(SecType.values), odd_text),
    quantity=odd_decimal,
    average_cost=st.one_of(st.none(), odd_decimal),
    currency=odd_text,
    exchange=odd_text,
    local_symbol=odd_text,
    trading_class=odd_text,
    multiplier=st.one_of(odd_text, st.sampled_from(["", "100", "0.01", "1e400", "nan"])),
    last_trade_date=st.one_of(odd_text, st.sampled_from(["20261218", "202612", "20261332"])),
    strike=st.one_of(st.none(), odd_decimal),
    right=st.one_of(odd_text, st.sampled_from(["C", "P", "PUT", "?", "0"])),
)


def held_positions() -> list[GatewayPosition]:
    return [
        GatewayPosition(account=account, con_id=con_id, symbol=f"H{con_id}", sec_type="STK",
                        quantity=Decimal(con_id), average_cost=Decimal("10.5"), currency="USD")
        for account in ACCOUNTS
        for con_id in HELD_CON_IDS
    ]  # fmt: skip


def sync(positions) -> object:
    return sync_positions(
        trigger=SyncRun.Trigger.COMMAND, gateway=FakeGateway(positions, accounts=ACCOUNTS)
    )


def mappable(record: GatewayPosition) -> bool:
    try:
        map_position(record)
    except MappingError:
        return False
    return True


def as_stored(stored: Decimal, expected: Decimal) -> bool:
    """Whether the database holds `expected`: digit for digit on PostgreSQL; on SQLite,
    whose decimal columns keep 15 significant digits (see the README), to that precision."""
    if connection.vendor != "sqlite":
        return stored == expected
    return abs(stored - expected) <= abs(expected).scaleb(-14)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(records, max_size=12))
# 16 significant digits: more than SQLite's decimal columns keep.
@example(
    batch=[
        GatewayPosition(
            account=ACCOUNTS[0], con_id=1, symbol="BIG", sec_type="STK",
            quantity=Decimal("1000000000000001"), average_cost=None,
        )
    ]
)  # fmt: skip
def test_any_records_sync_soundly_and_idempotently(batch):
    with synced_rows_deleted_afterwards():
        sync(held_positions())
        result = sync(batch)  # must not raise, whatever the records

        # Only exact decimals are stored: what mapping produced, digit for digit.
        expected = {}
        for record in batch:
            if mappable(record):
                item = map_position(record)
                expected[(item.account_id, item.instrument_id)] = item.position
        for row in Position.objects.values(
            "account__external_id", "instrument__external_id", "quantity", "average_cost",
            "cost_basis", "closed_at",
        ):  # fmt: skip
            for name in ("quantity", "average_cost", "cost_basis"):
                assert row[name] is None or isinstance(row[name], Decimal)
            key = (row["account__external_id"], row["instrument__external_id"])
            if key in expected and row["closed_at"] is None:
                assert as_stored(row["quantity"], expected[key]["quantity"])

        # A held position with any unmappable record for it is left open.
        unmappable = {(r.account, str(r.con_id)) for r in batch if not mappable(r)}
        reported = {(r.account, str(r.con_id)) for r in batch}
        for account in ACCOUNTS:
            for con_id in HELD_CON_IDS:
                key = (account, str(con_id))
                stored = Position.objects.get(
                    account__external_id=account, instrument__external_id=str(con_id)
                )
                if key in unmappable:
                    assert stored.closed_at is None, f"{key} closed over an unmappable record"
                elif key not in reported:
                    assert stored.closed_at is not None, f"{key} no longer held: closed"
        assert len(result.errors) == sum(1 for r in batch if not mappable(r))

        # The same input again: the same database, nothing written.
        state = database_state()
        again = sync(batch)
        assert database_state() == state
        assert (again.created, again.updated, again.reopened, again.closed) == (0, 0, 0, 0)
