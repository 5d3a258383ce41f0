"""One record that cannot be stored never stops the sync, nor any page.

Every column the sync writes is probed at its own limits, read off the model fields (so a
column changed tomorrow is probed at its new limits): the largest value it holds, the
smallest it does not, lengths at and past `max_length`. Whatever the value, the sync
succeeds; the record is stored exactly as it fits, or it is an `errors` entry and its
stored row stays as it was; and everything stored can be read back, by the ORM, the API,
the admin and /healthz, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from django.db import models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibkr_sync.gateway import GatewayPosition
from ibkr_sync.mapping import MappingError, map_position
from ibkr_sync.models import PositionChange, SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Account, Instrument, Position
from tests.conftest import FakeGateway, synced_rows_deleted_afterwards
from tests.reliability.conftest import database_state

pytestmark = pytest.mark.django_db

ACCOUNT = "U1111111"
HELD = GatewayPosition(
    account=ACCOUNT, con_id=42, symbol="HELD", sec_type="FUT", quantity=Decimal("3"),
    average_cost=Decimal("1250.5"), currency="USD", exchange="CME", multiplier="50",
    last_trade_date="20261218", local_symbol="HLDZ6",
)  # fmt: skip
OTHER = replace(HELD, con_id=43, symbol="OTHER", local_symbol="OTHZ6")


def _field(model: type[models.Model], name: str) -> models.Field:
    return model._meta.get_field(name)


def decimal_limits(field: models.DecimalField) -> list[Decimal]:
    """Values at and around the column's bounds: largest held, smallest not, finer."""
    whole = field.max_digits - field.decimal_places
    quantum = Decimal(1).scaleb(-field.decimal_places)
    top = Decimal(10) ** whole
    return [
        top - quantum,
        top - Decimal(1),
        top,
        top + quantum,
        -(top - quantum),
        -top,
        top * 10,
        Decimal("1e25"),
        Decimal("1e300"),
        quantum / 10,
        quantum * Decimal("0.5"),
        Decimal(10) ** (whole - 1) + quantum,
    ]


def text_limits(field: models.CharField) -> list[str]:
    return ["x" * field.max_length, "x" * (field.max_length + 1), "y" * (field.max_length * 4)]


def wire_text(value: Decimal) -> str:
    return format(value, "f") if abs(value.adjusted()) < 60 else str(value)


# Each probe: the record as the gateway reports it with one value at a column's limit.
PROBES: list[tuple[str, GatewayPosition]] = []
for value in decimal_limits(_field(Position, "quantity")):
    PROBES.append((f"quantity={value}", replace(HELD, quantity=value)))
for value in decimal_limits(_field(Position, "average_cost")):
    PROBES.append((f"average_cost={value}", replace(HELD, average_cost=value)))
# cost_basis = quantity x average cost: each fits, the product may not.
_whole = _field(Position, "cost_basis").max_digits - _field(Position, "cost_basis").decimal_places
for exponent in (_whole // 2 - 1, _whole // 2, _whole // 2 + 1):
    big = Decimal(10) ** exponent
    PROBES.append((f"cost_basis=1e{2 * exponent}", replace(HELD, quantity=big, average_cost=big)))
for value in decimal_limits(_field(Instrument, "multiplier")):
    PROBES.append((f"multiplier={value}", replace(HELD, multiplier=wire_text(value))))
for value in decimal_limits(_field(Instrument, "strike")):
    PROBES.append((f"strike={value}", replace(HELD, sec_type="OPT", right="C", strike=value)))
_id_length = _field(Instrument, "external_id").max_length
for digits in (_id_length, _id_length + 1, 5000):
    PROBES.append((f"con_id of {digits} digits", replace(HELD, con_id=10**digits - 1)))
for name in ("symbol", "currency", "exchange", "local_symbol", "trading_class"):
    for text in text_limits(_field(Instrument, name)):
        PROBES.append((f"{name} of {len(text)}", replace(HELD, **{name: text})))
for text in text_limits(_field(Account, "external_id")):
    PROBES.append((f"account of {len(text)}", replace(HELD, account=text)))


def sync(*positions: GatewayPosition):
    accounts = sorted({p.account for p in positions} | {ACCOUNT})
    gateway = FakeGateway(list(positions), accounts=accounts)
    return sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)


def read_back_everything() -> None:
    """Every stored row through the ORM, as every page and the next sync read them."""
    list(Position.objects.select_related("account", "instrument"))
    list(Instrument.objects.all())
    list(Account.objects.all())
    list(PositionChange.objects.all())
    list(SyncRun.objects.all())


def held_row() -> tuple:
    return Position.objects.filter(instrument__external_id="42").values_list(
        "quantity", "average_cost", "cost_basis", "closed_at", "instrument__multiplier"
    )[0]


@pytest.mark.parametrize("probe", [p for _, p in PROBES], ids=[name for name, _ in PROBES])
def test_a_value_at_any_column_limit_never_stops_the_sync(probe):
    sync(HELD, OTHER)
    before = held_row()

    result = sync(probe, OTHER)  # never raises

    read_back_everything()
    try:
        mapped = map_position(probe)
    except MappingError as exc:
        reason = str(exc)
        assert [e["reason"] for e in result.errors] == [reason]
        if probe.account == ACCOUNT and probe.con_id == HELD.con_id:
            assert held_row() == before, "a record that does not fit leaves its row as it was"
    else:
        assert result.errors == []
        stored = Position.objects.get(
            account__external_id=mapped.account_id,
            instrument__external_id=mapped.instrument_id,
        )
        assert stored.closed_at is None
        for name, value in mapped.position.items():
            got = getattr(stored, name)
            assert got == value or (got is not None and _within_sqlite_precision(got, value))
    assert sync(probe, OTHER).errors == result.errors, "and every later sync proceeds"


def _within_sqlite_precision(stored: Decimal, expected: Decimal) -> bool:
    from django.db import connection

    return connection.vendor == "sqlite" and abs(stored - expected) <= abs(expected).scaleb(-14)


def test_the_reviews_cases_leave_every_page_working(admin_client, django_user_model):
    """SQLite stored a 1e15 multiplier it could not read back (every page and sync failed
    from then on); PostgreSQL refused it, and a 65-character conId, with a DataError."""
    sync(HELD, OTHER)
    result = sync(
        replace(HELD, multiplier="1e15"),
        replace(OTHER, con_id=7 * (10**65 - 1) // 9),  # 65 sevens
        replace(OTHER, con_id=44, multiplier="1e25"),
    )
    reasons = sorted(e["reason"] for e in result.errors)
    assert len(reasons) == 3
    assert any("multiplier" in r and "too large" in r for r in reasons)
    assert any("65 characters" in r for r in reasons)
    assert Position.objects.get(instrument__external_id="42").closed_at is None
    for url in (
        "/portfolio/positions",
        "/portfolio/accounts",
        "/portfolio/sync/runs",
        "/admin/portfolio/position/",
        "/admin/portfolio/instrument/",
        "/admin/ibkr_sync/syncrun/",
        f"/admin/ibkr_sync/syncrun/{result.sync_run_id}/change/",
    ):
        assert admin_client.get(url).status_code == 200, url
    assert admin_client.get("/healthz").status_code == 200


column_values = st.one_of(
    st.sampled_from([p for _, p in PROBES]),
    st.builds(
        replace,
        st.just(HELD),
        quantity=st.decimals(min_value=-(10**22), max_value=10**22, places=12),
        average_cost=st.one_of(st.none(), st.decimals(min_value=-(10**22), max_value=10**22)),
        multiplier=st.decimals(min_value=0, max_value=10**17, places=8).map(wire_text),
        strike=st.one_of(st.none(), st.decimals(min_value=0, max_value=10**22, places=12)),
        con_id=st.one_of(st.just(42), st.integers(1, 10**70)),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(column_values, min_size=1, max_size=6))
def test_any_mix_of_values_at_the_limits_syncs_and_reads_back(batch):
    with synced_rows_deleted_afterwards():
        sync(HELD, OTHER)
        result = sync(*batch, OTHER)
        read_back_everything()
        unmappable = []
        for record in batch:
            try:
                map_position(record)
            except MappingError:
                unmappable.append(record)
        assert len(result.errors) == len(unmappable)
        state = database_state()
        assert sync(*batch, OTHER).errors == result.errors
        assert database_state() == state
