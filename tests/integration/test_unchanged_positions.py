"""An account whose positions did not change is recognised from the wire text, not mapped
and compared row by row again: real IB client over TCP, the simulator, a real database.

The rule under test: each account's report keeps a digest of the position messages last
written for it (under the mapping's signature); a sync that reads the same digest leaves
that account's stored positions as they are. Anything else (a change, another sync's
write since, an account with a record that could not be stored, a source that gives no
fingerprints) takes the full comparison, and the result is the same either way.
"""

from decimal import Decimal

import pytest

from ibkr_sync import conf, mapping, services, writer
from ibkr_sync.models import AccountReport, PositionChange
from ibkr_sync.snapshot import PositionRecord, Snapshot
from portfolio.models import Position
from tests.integration.conftest import ACCOUNT, EMPTY, OTHER, sim_position

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def sync(**options):
    return services.sync_positions(trigger="command", **options)


@pytest.fixture
def mapped(monkeypatch):
    """The accounts whose records `map_position` maps, in order (a spy: it maps them)."""
    seen = []
    real = mapping.map_position

    def spy(record):
        seen.append(record.account)
        return real(record)

    monkeypatch.setattr(mapping, "map_position", spy)
    return seen


def digests():
    return dict(AccountReport.objects.values_list("external_id", "positions_digest"))


def stored():
    return sorted(
        Position.objects.values_list(
            "account__external_id", "instrument__external_id", "quantity", "closed_at"
        )
    )


def test_an_unchanged_resync_maps_nothing_and_writes_no_position(ibkr, mapped):
    first = sync()
    assert first.created == 4 and len(mapped) == 4
    kept = digests()
    assert set(kept) == {ACCOUNT, OTHER, EMPTY}
    # A digest of the account's messages, and how many records it holds.
    assert [d.split(":")[1] for d in (kept[ACCOUNT], kept[OTHER], kept[EMPTY])] == ["3", "1", "0"]
    assert all(len(d.split(":")[0]) == 40 for d in kept.values())
    before = stored()
    mapped.clear()

    second = sync()

    assert mapped == []  # no record mapped again
    assert (second.processed, second.unchanged, second.created, second.updated) == (4, 4, 0, 0)
    assert second.by_account[ACCOUNT]["unchanged"] == 3
    assert second.by_account[OTHER]["unchanged"] == 1
    assert stored() == before
    assert not PositionChange.objects.filter(sync_run_id=second.sync_run_id).exists()
    assert digests() == kept


def test_a_change_in_one_account_maps_that_account_only(ibkr, mapped):
    sync()
    mapped.clear()
    ibkr.upsert_position(sim_position(quantity="12.5"))  # AAPL in ACCOUNT

    result = sync()

    assert set(mapped) == {ACCOUNT}
    assert (result.updated, result.unchanged) == (1, 3)
    assert Position.objects.get(instrument__symbol="AAPL").quantity == Decimal("12.5")
    mapped.clear()
    assert sync().unchanged == 4 and mapped == []


def test_a_closed_and_a_reopened_position_are_found_as_before(ibkr):
    sync()
    ibkr.remove_position(ACCOUNT, 76792991)
    assert sync().closed == 1
    assert sync().unchanged == 3  # the closed one stays closed, nothing reported of it
    ibkr.upsert_position(sim_position(con_id=76792991, symbol="TSLA", quantity="2"))
    assert sync().reopened == 1
    assert Position.objects.get(instrument__symbol="TSLA").closed_at is None


def test_unchanged_positions_still_get_their_new_market_values(ibkr, mapped):
    sync()
    aapl = Position.objects.get(instrument__symbol="AAPL")
    mapped.clear()
    ibkr.set_market_price(ACCOUNT, 265598, "199.5")

    result = sync()

    assert mapped == [] and result.unchanged == 4
    aapl.refresh_from_db()
    assert aapl.market_price == Decimal("199.5")
    assert aapl.market_value == Decimal("1995")


def test_another_sync_writing_the_account_meanwhile_makes_this_one_compare_again(
    ibkr, mapped, monkeypatch
):
    """The digests are read before the write transaction; another sync may write one of
    those accounts before it begins. Inside, the stored digest no longer matches: the
    snapshot is mapped whole and written again, with the same outcome."""
    sync()
    mapped.clear()
    read = writer.stored_digests

    def read_then_another_sync_writes(accounts, reported=None):
        known = read(accounts, reported)
        AccountReport.objects.filter(external_id=OTHER).update(positions_digest="f" * 40)
        return known

    monkeypatch.setattr(services, "stored_digests", read_then_another_sync_writes)

    result = sync()

    assert sorted(set(mapped)) == [ACCOUNT, OTHER]  # the second attempt mapped all
    assert (result.unchanged, result.created, result.updated) == (4, 0, 0)
    assert digests()[OTHER] != "f" * 40  # this sync's digest is in place again


def test_a_digest_cleared_or_changed_means_the_next_sync_compares_again(ibkr, mapped):
    sync()
    AccountReport.objects.filter(external_id=ACCOUNT).update(positions_digest="")
    # A position deleted behind the sync's back is found by the full comparison.
    Position.objects.filter(instrument__symbol="AAPL").delete()
    mapped.clear()

    result = sync()

    assert set(mapped) == {ACCOUNT}
    assert result.created == 1
    assert Position.objects.filter(instrument__symbol="AAPL", closed_at=None).exists()


def test_an_account_with_a_record_that_cannot_be_stored_reports_it_at_every_sync(ibkr, mapped):
    ibkr.upsert_position(sim_position(con_id=999001, symbol="WHAT", sec_type="NOPE"))
    first = sync()
    assert len(first.errors) == 1 and first.errors[0]["account"] == ACCOUNT
    assert digests()[ACCOUNT] == ""  # never taken as unchanged
    mapped.clear()

    second = sync()

    assert len(second.errors) == 1
    assert set(mapped) == {ACCOUNT}  # OTHER unchanged, ACCOUNT compared again


def test_a_source_without_fingerprints_is_always_compared(ibkr, mapped):
    record = PositionRecord(
        account=ACCOUNT,
        con_id=265598,
        symbol="AAPL",
        sec_type="STK",
        quantity=Decimal(10),
        average_cost=Decimal("150.25"),
        currency="USD",
    )

    class Fake:
        def fetch_positions(self, account_id=None):
            return Snapshot(accounts=(ACCOUNT,), positions=(record,), source="fake")

    sync(gateway=Fake())
    assert digests()[ACCOUNT] == ""
    mapped.clear()
    assert sync(gateway=Fake()).unchanged == 1
    assert mapped == [ACCOUNT]


def test_a_dry_run_takes_the_same_path_and_writes_nothing(ibkr, mapped):
    sync()
    kept = digests()
    ibkr.upsert_position(sim_position(account=OTHER, con_id=8314, symbol="IBM", quantity="1"))
    mapped.clear()

    preview = sync(dry_run=True)

    assert set(mapped) == {OTHER}
    assert preview.created == 1 and preview.unchanged == 4
    assert digests() == kept


def test_an_account_deleted_behind_the_syncs_back_is_written_again_whole(ibkr, mapped):
    """A host deletes an account's positions, then the account; its report, kept by the
    sync app, still holds the digest: the open rows are counted, found missing, and the
    account is compared (and written) whole."""
    from portfolio.models import Account

    sync()
    Position.objects.filter(account__external_id=OTHER).delete()
    Account.objects.filter(external_id=OTHER).delete()
    mapped.clear()

    result = sync()

    assert set(mapped) == {ACCOUNT, OTHER}  # the second attempt maps all
    assert result.created == 1 and result.unchanged == 3
    assert Position.objects.filter(account__external_id=OTHER, closed_at=None).count() == 1


def test_an_instrument_another_source_changed_is_written_back_by_the_unchanged_resync(ibkr, mapped):
    """Instruments are shared: another connection (or a Flex import) that reports one of
    this account's contracts otherwise writes its own view of the row. The gateway's
    digest is the same at its next sync, but the instrument changed after the account's
    report was applied: the account is compared again, and the gateway's view of the
    instrument written back."""
    sync()
    Instrument = conf.instrument_model()
    fields = ("symbol", "exchange", "local_symbol", "trading_class")
    gateway_view = Instrument.objects.filter(external_id="265598").values_list(*fields).get()
    mapped.clear()
    other = Snapshot(
        accounts=("U9999999",),
        positions=(
            PositionRecord(
                account="U9999999",
                con_id=265598,
                symbol="AAPL",
                sec_type="STK",
                quantity=Decimal("1"),
                average_cost=Decimal("100"),
                currency="USD",
                exchange="SMART",
                local_symbol="AAPL.OTHER",
            ),
        ),
        source="flex",
    )
    sync(gateway=SnapshotSource(other))
    changed = Instrument.objects.filter(external_id="265598").values_list(*fields).get()
    assert changed != gateway_view
    untouched = Instrument.objects.get(external_id="76792991").updated_at
    kept = digests()
    mapped.clear()

    result = sync()

    assert Instrument.objects.filter(external_id="265598").values_list(*fields).get() == (
        gateway_view
    )
    assert set(mapped) == {ACCOUNT}, "only the account holding it is compared again"
    assert (result.created, result.updated, result.closed, result.unchanged) == (0, 0, 0, 4)
    assert digests()[ACCOUNT] == kept[ACCOUNT]
    assert Instrument.objects.get(external_id="76792991").updated_at == untouched
    assert not PositionChange.objects.filter(sync_run_id=result.sync_run_id).exists()


class SnapshotSource:
    """Another source at the service's boundary: one snapshot."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def fetch_positions(self, account_id=None):
        return self.snapshot


# --- the TWS source leaves the messages of an unchanged account undecoded ----------------


@pytest.fixture
def decoded(monkeypatch, settings):
    """The accounts of the position messages the TWS source decodes, in order (a spy: it
    decodes them). Positions only: a read of values decodes every position, which the
    values are read against."""
    from ibkr_sync.sources.tws import positions

    settings.IBKR_READ_VALUES = False
    seen = []
    real = positions._position_from_wire

    def spy(fields):
        seen.append(fields[2] if len(fields) > 2 else None)
        return real(fields)

    monkeypatch.setattr(positions, "_position_from_wire", spy)
    return seen


def general_path(monkeypatch):
    """Every message decoded on arrival, every account compared row by row: the path
    that takes nothing for unchanged."""
    from ibkr_sync.sources.tws.session import TwsSource

    monkeypatch.setattr(TwsSource, "defers_positions", False)
    monkeypatch.setattr(services, "stored_digests", lambda accounts, reported=None: {})


def test_the_messages_of_an_unchanged_account_are_not_even_decoded(ibkr, decoded):
    sync()
    assert set(decoded) == {ACCOUNT, OTHER}  # a first sync: every message, on arrival
    decoded.clear()

    assert sync().unchanged == 4
    assert decoded == []

    ibkr.upsert_position(sim_position(quantity="12.5"))  # AAPL in ACCOUNT
    result = sync()

    assert decoded == [ACCOUNT] * 3  # its messages only, OTHER's not
    assert (result.updated, result.unchanged) == (1, 3)
    assert Position.objects.get(instrument__symbol="AAPL").quantity == Decimal("12.5")


def outcome(result):
    counts = ("processed", "created", "updated", "unchanged", "reopened", "closed", "errors")
    return [getattr(result, name) for name in counts], result.by_account


def history():
    return sorted(
        PositionChange.objects.values_list(
            "position__account__external_id",
            "position__instrument__external_id",
            "kind",
            "quantity_before",
            "quantity_after",
        )
    )


def test_undecoded_accounts_give_exactly_the_outcome_of_the_full_comparison(
    ibkr, decoded, monkeypatch
):
    """The same syncs twice from an empty database: once as they run (messages of
    unchanged accounts left undecoded), once decoding and comparing everything. A
    change, a close (a zero row), a new position in an account that held none and an
    unchanged account: the same results, rows and change records."""
    from ibkr_sync.models import SyncRun
    from portfolio.models import Account, Instrument

    start = ibkr.positions()

    def run():
        PositionChange.objects.all().delete()
        Position.objects.all().delete()
        Instrument.objects.all().delete()
        AccountReport.objects.all().delete()
        SyncRun.objects.all().delete()
        Account.objects.all().delete()
        ibkr.set_positions(start)
        results = [sync()]
        ibkr.upsert_position(sim_position(quantity="12.5"))  # AAPL in ACCOUNT: changed
        ibkr.remove_position(ACCOUNT, 76792991)  # TSLA: a zero row, closed
        ibkr.upsert_position(sim_position(account=EMPTY, con_id=8314, symbol="IBM", quantity="2"))
        decoded.clear()
        results.append(sync())
        changed_decoded = set(decoded)
        decoded.clear()
        results.append(sync())  # nothing changed since
        rows = [(*row[:3], row[3] is not None) for row in stored()]  # closed, not when
        return [outcome(r) for r in results], rows, history(), changed_decoded, set(decoded)

    fast = run()
    with monkeypatch.context() as patched:
        general_path(patched)
        general = run()

    assert fast[:3] == general[:3]
    assert fast[3] == {ACCOUNT, EMPTY} and fast[4] == set()  # OTHER never decoded again
    assert general[3] == general[4] == {ACCOUNT, OTHER, EMPTY}


def test_a_malformed_message_among_unchanged_ones_fails_the_read_as_before(
    ibkr, decoded, monkeypatch
):
    """An account whose messages are those written, but one: that one cannot be read.
    The read fails exactly as when every message is decoded, and nothing is written."""
    from ibkr_sync.exceptions import IncompleteSnapshot

    sync()
    before = stored()
    ibkr.set_faults(position_edits={"quantity": ""})  # the first row: AAPL of ACCOUNT
    decoded.clear()

    with pytest.raises(IncompleteSnapshot) as fast:
        sync()
    assert set(decoded) == {ACCOUNT}  # OTHER's messages, as written, were left
    with monkeypatch.context() as patched:
        general_path(patched)
        with pytest.raises(IncompleteSnapshot) as general:
            sync()

    assert str(fast.value) == str(general.value)
    assert "could not be read" in str(fast.value)
    assert stored() == before


def test_an_account_with_a_contract_twice_is_compared_at_every_sync(ibkr, decoded):
    """Two messages of one contract: which one counts depends on their order on the wire
    (the last), not on the set of messages, so the account gets no digest."""
    from ibkr_sync.testing.simulator import _position_fields

    again = _position_fields(sim_position(quantity="7"))  # AAPL of ACCOUNT, once more
    ibkr.set_faults(extra_frames=[again])
    sync()
    assert digests()[ACCOUNT] == "" and digests()[OTHER] != ""
    assert Position.objects.get(instrument__symbol="AAPL").quantity == Decimal("7")
    decoded.clear()

    result = sync()

    assert set(decoded) == {ACCOUNT}
    assert result.unchanged == 4 and digests()[ACCOUNT] == ""


def test_accounts_another_connection_wrote_last_are_recognised_all_the_same(ibkr, decoded, mapped):
    """The source is told the digests of the accounts its own connection reported last
    (a hint); the digests of the others are read after the read, as before: they are
    not decoded on the way in, and not mapped."""
    from ibkr_sync.models import Connection

    sync()  # the settings' gateway
    Connection.objects.create(name="same-login", port=ibkr.port, client_id=31)
    decoded.clear()
    mapped.clear()

    result = services.sync_positions(trigger="command", connection="same-login")

    assert set(decoded) == {ACCOUNT, OTHER}  # no hint: decoded on arrival
    assert mapped == [] and result.unchanged == 4
    decoded.clear()
    again = services.sync_positions(trigger="command", connection="same-login")
    assert decoded == [] and again.unchanged == 4  # its own now: left undecoded


def test_a_hosts_source_with_the_older_signature_is_read_as_before(ibkr, decoded):
    """A host's subclass of the TWS source that overrides `fetch_positions(account_id)`
    is not told the digests (it would not take them): every message decoded, the
    unchanged accounts still not mapped."""
    from ibkr_sync.sources.tws.session import TwsSource

    class Older(TwsSource):
        def fetch_positions(self, account_id=None):
            return super().fetch_positions(account_id)

    sync(gateway=Older())
    decoded.clear()
    result = sync(gateway=Older())
    assert set(decoded) == {ACCOUNT, OTHER} and result.unchanged == 4


@pytest.mark.parametrize("when", ["first sync", "re-sync"])
def test_a_peer_sending_more_positions_than_any_login_holds_fails_the_read(ibkr, monkeypatch, when):
    """More position messages before their end than `MAX_POSITION_MESSAGES` (here made
    3; the simulator's portfolio holds 4) fail the read there, whether its messages are
    decoded as they come (a first sync) or kept undecoded (a re-sync of the accounts as
    written): nothing is written, and the process keeps no more of them."""
    from ibkr_sync.exceptions import IncompleteSnapshot
    from ibkr_sync.sources.tws import positions

    if when == "re-sync":
        assert sync().created == 4
    before = stored()
    monkeypatch.setattr(positions, "MAX_POSITION_MESSAGES", 3)

    with pytest.raises(IncompleteSnapshot, match="sent more than 3 positions before their end"):
        sync()

    assert stored() == before
