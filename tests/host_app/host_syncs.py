"""Syncs into a host's own models (tests.host_app.models), through the real IB client over
TCP against the simulator: every field of the host's is filled as Django's bulk_create
would fill it, and stamped as `Model.save()` would stamp it on every UPDATE.

Runs only in a project with the host's models (`--ds tests.host_app.settings`): the
models a sync writes, and the position model PositionChange points at, are fixed when
the project starts. `tests/test_host_models.py` runs it so, on the database of the run.
"""

import datetime as dt
import time
import uuid
from decimal import Decimal

import pytest
from django.utils import timezone

from ibkr_sync import bulk, conf
from ibkr_sync.checks import check_models
from ibkr_sync.models import PositionChange
from ibkr_sync.services import sync_positions
from ibkr_sync.testing import Portfolio
from tests.host_app.models import Account, AccountSnapshot, CashBalance, Instrument, Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def ibkr_portfolio():
    return Portfolio(
        accounts=[ACCOUNT, OTHER, EMPTY],
        positions=[
            sim_position(),
            sim_position(con_id=76792991, symbol="TSLA", quantity="0.5",
                         average_cost=Decimal("242.125")),
            sim_position(con_id=495512551, symbol="ES", sec_type="FUT", quantity="-2",
                         average_cost=Decimal("251234.5"), multiplier="50",
                         last_trade_date="20261218", local_symbol="ESZ6", exchange="CME"),
            sim_position(con_id=272093, symbol="MSFT", quantity="7"),
            sim_position(con_id=756733, symbol="SPY", quantity="3"),
            sim_position(account=OTHER, con_id=320227571, symbol="QQQ", quantity="4"),
        ],
    )  # fmt: skip


@pytest.fixture
def ibkr(ibkr_simulator, settings, monkeypatch):
    """The simulator, with cash in two currencies; batches of 4 rows, so that the six
    positions of a first sync are inserted in two statements."""
    settings.IBKR_VALUES_TIMEOUT = 2
    ibkr_simulator.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25"})
    ibkr_simulator.set_cash(OTHER, {"USD": "10"})
    monkeypatch.setattr(bulk, "BATCH_SIZE", 4)
    return ibkr_simulator


def sync():
    result = sync_positions(trigger="command")
    assert result.errors == []
    return result


def position(symbol, account=ACCOUNT):
    return Position.objects.get(instrument__symbol=symbol, account__external_id=account)


class Window:
    """The time around a step: Django's own stamps (timezone.now() in pre_save) fall in it."""

    def __enter__(self):
        time.sleep(0.002)  # stamps of an earlier step are strictly earlier
        self.start = timezone.now()
        return self

    def __exit__(self, *exc):
        self.end = timezone.now()

    def __contains__(self, stamp):
        return self.start <= stamp <= self.end

    def __repr__(self):
        return f"Window({self.start.isoformat()} .. {self.end.isoformat()})"


def test_the_host_models_pass_the_checks():
    assert conf.position_model() is Position
    assert check_models() == []
    # PositionChange points at the host's position, by its UUID key.
    assert PositionChange._meta.get_field("position").related_model is Position


def test_a_first_sync_fills_every_field_as_django_would(ibkr):
    with Window() as step:
        result = sync()

    assert result.created == 6
    today = dt.date.today()

    accounts = list(Account.objects.all())
    assert sorted(a.external_id for a in accounts) == sorted([ACCOUNT, OTHER, EMPTY])
    assert len({a.pk for a in accounts}) == 3
    assert all(a.pk.startswith("acct-") for a in accounts), "the callable default, per row"
    assert all(a.touched_at in step and a.created_at in step for a in accounts)

    instruments = list(Instrument.objects.all())
    assert len(instruments) == 6
    assert all(isinstance(i.pk, uuid.UUID) for i in instruments)
    assert len({i.pk for i in instruments}) == 6, "uuid4 called for each row"
    for instrument in instruments:
        assert instrument.created_at in step and instrument.updated_at in step
        assert instrument.checked_on == today  # DateField(auto_now=True)
        assert instrument.source == "ibkr"

    positions = list(Position.objects.select_related("instrument", "account"))
    assert len(positions) == 6
    assert len({p.pk for p in positions}) == 6
    assert len({p.ref for p in positions}) == 6
    assert len({p.token for p in positions}) == 6
    for p in positions:
        assert isinstance(p.pk, uuid.UUID) and isinstance(p.ref, uuid.UUID)
        assert len(p.token) == 12 and int(p.token, 16) >= 0
        assert p.first_seen_at in step and p.touched_at in step
        assert p.source == "ibkr", "a non-callable default"
        assert p.priority == 7, "the database's default"
        assert p.rank is None, "null, no default"
        assert p.doubled == p.quantity * 2, "a generated field, computed by the database"
        assert p.opened_at == p.last_synced_at
        assert p.market_price is not None and p.valued_at is not None
    # The foreign keys hold the keys of the rows inserted with them (UUIDs, texts).
    gateway = {(p.account, str(p.con_id)): p.quantity for p in ibkr.positions()}
    assert {(p.account.external_id, p.instrument.external_id): p.quantity for p in positions} == (
        gateway
    )

    changes = PositionChange.objects.filter(sync_run_id=result.sync_run_id)
    assert sorted(changes.values_list("kind", flat=True)) == ["created"] * 6
    assert {(c.position_id, c.quantity_after) for c in changes} == {
        (p.pk, p.quantity) for p in positions
    }

    cash = list(CashBalance.objects.select_related("account"))
    assert sorted((c.account.external_id, c.currency) for c in cash) == [
        (ACCOUNT, "EUR"), (ACCOUNT, "USD"), (OTHER, "USD"), (EMPTY, "USD")
    ]  # fmt: skip
    assert len({c.pk for c in cash}) == 4 and len({c.token for c in cash}) == 4
    for c in cash:
        assert isinstance(c.pk, uuid.UUID)
        assert c.first_seen_at in step and c.touched_at in step
        assert abs(c.stored_at - step.start) < dt.timedelta(seconds=5), "db_default Now()"

    snapshots = list(AccountSnapshot.objects.select_related("account"))
    assert sorted(s.account.external_id for s in snapshots) == sorted([ACCOUNT, OTHER, EMPTY])
    assert len({s.pk for s in snapshots}) == 3
    for s in snapshots:
        assert s.pk.startswith("snap-")
        assert s.recorded_at in step
        assert (s.kind, s.sequence, s.rank) == ("daily", 1, None)
        assert s.sync_run_id == result.sync_run_id


def _state(model):
    return {row.pk: row for row in model.objects.all()}


def test_a_resync_keeps_what_insert_set_and_stamps_every_update(ibkr):
    with Window() as first:
        sync()
    positions, cash = _state(Position), _state(CashBalance)
    instruments = _state(Instrument)
    aapl, tsla, es, msft = (position(s) for s in ("AAPL", "TSLA", "ES", "MSFT"))

    ibkr.upsert_position(sim_position(quantity="11"))  # AAPL: updated
    ibkr.remove_position(ACCOUNT, 76792991)  # TSLA: closed
    ibkr.upsert_position(  # ES: its instrument changes (a new local symbol), not its position
        sim_position(con_id=495512551, symbol="ES", sec_type="FUT", quantity="-2",
                     average_cost=Decimal("251234.5"), multiplier="50",
                     last_trade_date="20261218", local_symbol="ESZ6X", exchange="CME")
    )  # fmt: skip
    ibkr.upsert_position(sim_position(con_id=4391, symbol="AMD", quantity="9"))  # created
    ibkr.move_prices("1.1")  # every held position's values change
    ibkr.set_cash(ACCOUNT, {"USD": "-100", "GBP": "75"})  # EUR goes, GBP comes, USD changes

    with Window() as second:
        result = sync()

    assert (result.created, result.updated, result.closed) == (1, 1, 1)
    assert result.unchanged == 4  # ES, MSFT, SPY and OTHER's QQQ
    # What the insert set stays; auto_now is set again by every UPDATE of the row.
    for before in (aapl, tsla, es, msft):
        after = Position.objects.get(pk=before.pk)
        assert (after.first_seen_at, after.token, after.ref) == (
            before.first_seen_at, before.token, before.ref
        )  # fmt: skip
        assert after.first_seen_at in first
        assert after.touched_at in second, "the upsert, the close and the values UPDATE"
        assert (after.source, after.priority, after.rank) == ("ibkr", 7, None)
    assert position("AAPL").quantity == 11 and position("AAPL").doubled == 22
    assert position("TSLA").closed_at in second
    assert position("MSFT").market_price != positions[msft.pk].market_price
    assert position("MSFT").valued_at in second

    amd = position("AMD")
    assert amd.pk not in positions and isinstance(amd.pk, uuid.UUID)
    assert amd.first_seen_at in second and amd.touched_at in second
    assert amd.ref not in {p.ref for p in positions.values()}
    assert isinstance(amd.instrument_id, uuid.UUID) and amd.instrument_id not in instruments
    changes = dict(
        PositionChange.objects.filter(sync_run_id=result.sync_run_id).values_list(
            "position_id", "kind"
        )
    )
    assert changes == {aapl.pk: "updated", tsla.pk: "closed", amd.pk: "created"}

    # The changed instrument: updated in its row, auto_now stamped; the others untouched.
    for pk, before in instruments.items():
        after = Instrument.objects.get(pk=pk)
        assert after.created_at == before.created_at
        if after.symbol == "ES":
            assert after.local_symbol == "ESZ6X"
            assert after.updated_at in second
        else:
            assert after.updated_at == before.updated_at, "no UPDATE, no stamp"

    # Cash: USD updated in its row (auto_now_add kept, auto_now stamped), GBP inserted.
    rows = {c.currency: c for c in CashBalance.objects.filter(account__external_id=ACCOUNT)}
    assert sorted(rows) == ["GBP", "USD"]
    usd = rows["USD"]
    assert usd.pk in cash and usd.amount == Decimal(-100)
    assert (usd.first_seen_at, usd.token, usd.stored_at) == (
        cash[usd.pk].first_seen_at, cash[usd.pk].token, cash[usd.pk].stored_at
    )  # fmt: skip
    assert usd.touched_at in second
    gbp = rows["GBP"]
    assert gbp.pk not in cash and gbp.first_seen_at in second and gbp.touched_at in second
    assert gbp.token not in {c.token for c in cash.values()}

    # Accounts are stamped by the sync's UPDATE; snapshots are new rows with new keys.
    assert all(a.touched_at in second for a in Account.objects.all())
    assert AccountSnapshot.objects.count() == 6
    assert AccountSnapshot.objects.filter(recorded_at__gte=second.start).count() == 3


def test_a_closed_position_reopens_in_its_own_row(ibkr):
    sync()
    aapl = position("AAPL")
    ibkr.remove_position(ACCOUNT, 265598)
    with Window() as closing:
        sync()
    assert position("AAPL").closed_at in closing
    ibkr.upsert_position(sim_position(quantity="12"))

    with Window() as reopening:
        result = sync()

    assert result.reopened == 1
    again = position("AAPL")
    assert again.pk == aapl.pk and again.closed_at is None
    assert (again.first_seen_at, again.token, again.ref) == (
        aapl.first_seen_at, aapl.token, aapl.ref
    )  # fmt: skip
    assert again.opened_at in reopening and again.touched_at in reopening
    assert again.quantity == 12 and again.doubled == 24
    (change,) = PositionChange.objects.filter(sync_run_id=result.sync_run_id)
    assert (change.position_id, change.kind) == (aapl.pk, "reopened")


def test_the_fast_insert_stores_what_bulk_create_stores_in_every_host_model():
    """Row for row, insert_rows and Django's bulk_create store the same, but for the values
    Django itself makes anew for every row (keys, callable defaults, stamps)."""
    account = Account.objects.create(broker="ibkr", external_id="U1")
    first, second = (
        Instrument.objects.create(broker="ibkr", external_id=str(n), symbol=f"S{n}", sec_type="STK")
        for n in (1, 2)
    )
    now = timezone.now()
    fresh = {"id", "token", "ref", "first_seen_at", "touched_at", "recorded_at", "stored_at"}
    cases = [
        (Position, {"account_id": account.pk, "quantity": Decimal("1.5"), "average_cost": None,
                    "cost_basis": None, "opened_at": now, "last_synced_at": now},
         ("instrument_id", first.pk, second.pk)),
        (CashBalance, {"account_id": account.pk, "amount": Decimal(3), "synced_at": now},
         ("currency", "USD", "EUR")),
        (AccountSnapshot, {"account_id": account.pk, "sync_run_id": 1, "taken_at": now,
                           "net_liquidation": Decimal("10.5")},
         ("currency", "USD", "EUR")),
    ]  # fmt: skip
    for model, row, (varied, mine, django) in cases:
        with Window() as step:
            (fast,) = bulk.insert_rows(model, [{**row, varied: mine}])
            orm = model.objects.bulk_create([model(**row, **{varied: django})])[0].pk
        stored = model.objects.in_bulk([fast, orm])
        assert set(stored) == {fast, orm}, "the key returned is the row's, as the ORM reads it"
        a, b = (model.objects.filter(pk=pk).values().get() for pk in (fast, orm))
        assert a.pop(varied) == mine and b.pop(varied) == django
        differing = {name for name in a if a[name] != b[name]}
        assert differing <= fresh, (model, {n: (a[n], b[n]) for n in differing - fresh})
        for name in differing:
            if name.endswith("_at") and name != "stored_at":
                assert a[name] in step and b[name] in step
