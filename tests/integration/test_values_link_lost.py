"""The values read against a gateway that loses its link to IBKR, at every point of the
download and however the bytes are cut into TCP segments: the real IB client over TCP
against the simulator, on the real database.

The rules: a notice that the session or its link to IBKR is lost (1100, 2110, 1101, 504,
1300, ...) spoils every account whose download has not ended before it on the wire: they
are missing with the reason, their stored values kept; an account whose download ended
before it stays read. What a sync decides follows the order of the messages on the wire,
never how they were split into segments or how long apart they came: every case is run
at every segmentation and must come out the same.
"""

from __future__ import annotations

import pytest

from ibkr_sync.services import sync_positions
from portfolio.models import AccountSnapshot, CashBalance, Position
from tests.integration.conftest import (
    ACCOUNT,
    EMPTY,
    OTHER,
    SEGMENTATIONS,
    scripted,
    segmented,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

ORDER = (ACCOUNT, OTHER, EMPTY)  # the managed accounts, in the order their values are read

#: Where the notice goes: (the account whose download carries it, index in its frames).
AFTER_END = 10**6
PLACES = {
    "before the first value": (OTHER, 0),
    "among the values": (OTHER, 10),
    "just before the download end": (OTHER, -1),
    "right after the download end": (ACCOUNT, AFTER_END),
    "in the first account's download": (ACCOUNT, 5),
    "in the last account's download": (EMPTY, 3),
}


@pytest.fixture
def values(ibkr, settings):
    # Generous: the slowest segmentations take a second or two to send an account.
    settings.IBKR_VALUES_TIMEOUT = 10
    settings.IBKR_REQUEST_TIMEOUT = 20
    ibkr.set_cash(ACCOUNT, {"USD": "-1200.50", "EUR": "5000.25", "JPY": "1000000"})
    return ibkr


def sync():
    return sync_positions(trigger="command")


def stored_values_of(account):
    return (
        sorted(
            CashBalance.objects.filter(account__external_id=account).values_list(
                "currency", "amount", "exchange_rate", "synced_at"
            )
        ),
        sorted(
            Position.objects.filter(account__external_id=account).values_list(
                "instrument__external_id", "market_price", "market_value", "valued_at"
            )
        ),
        AccountSnapshot.objects.filter(account__external_id=account).count(),
    )


def notice(code, segmentation, account):
    """The notice, then a value sent after it (which must never be taken)."""
    return scripted(segmentation, [code, ["6", "2", "NetLiquidation", "1", "USD", account]])


def expected_outcome(account, index):
    """Read: the accounts whose download ended before the notice on the wire."""
    at = ORDER.index(account)
    ended = at + 1 if index == AFTER_END else at
    return {a: ("read" if i < ended else "missing") for i, a in enumerate(ORDER)}


def outcome_of(result):
    return {a: v["status"] for a, v in result.account_values.items()}


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
@pytest.mark.parametrize(("account", "index"), PLACES.values(), ids=PLACES)
def test_a_lost_link_spoils_every_download_not_ended_before_it_on_the_wire(
    values, account, index, segmentation
):
    sync()
    kept = {a: stored_values_of(a) for a in ORDER}
    values.move_prices("2")
    values.set_faults(
        **segmented(
            segmentation,
            value_inserts={account: [(index, notice(1100, segmentation, account))]},
        )
    )

    result = sync()

    expected = expected_outcome(account, index)
    assert outcome_of(result) == expected
    assert result.unchanged == 4 and result.errors == []  # the positions, all the same
    for name, status in expected.items():
        if status == "missing":
            assert "1100" in result.account_values[name]["reason"], result.account_values
            assert stored_values_of(name) == kept[name]
        else:
            assert stored_values_of(name) != kept[name]
    assert not AccountSnapshot.objects.filter(net_liquidation=1).exists()


@pytest.mark.parametrize(
    "segmentation",
    [SEGMENTATIONS["one write"], SEGMENTATIONS["one byte at a time"]],
    ids=["one write", "one byte at a time"],
)
@pytest.mark.parametrize("code", [1100, 2110, 1101, 504, 1300])
def test_every_notice_of_a_lost_link_or_session_spoils_the_download_it_falls_in(
    values, code, segmentation
):
    values.set_faults(
        **segmented(segmentation, value_inserts={OTHER: [(4, notice(code, segmentation, OTHER))]})
    )

    result = sync()

    assert outcome_of(result) == {ACCOUNT: "read", OTHER: "missing", EMPTY: "missing"}
    assert str(code) in result.account_values[OTHER]["reason"]
    assert str(code) in result.account_values[EMPTY]["reason"]
    assert not CashBalance.objects.filter(account__external_id=OTHER).exists()
    assert result.created == 4


@pytest.mark.parametrize("restored", [1101, 1102])
@pytest.mark.parametrize(
    "segmentation",
    [SEGMENTATIONS["one write"], SEGMENTATIONS["one byte at a time"]],
    ids=["one write", "one byte at a time"],
)
def test_connectivity_restored_after_a_lost_link_spoils_nothing_back(
    values, restored, segmentation
):
    # The link comes back within the same download, and the download goes on to its end.
    values.set_faults(**segmented(segmentation, value_inserts={ACCOUNT: [(3, [1100, restored])]}))

    result = sync()

    assert outcome_of(result) == {ACCOUNT: "missing", OTHER: "missing", EMPTY: "missing"}
    assert all("1100" in v["reason"] for v in result.account_values.values())
    assert not AccountSnapshot.objects.exists()
    assert result.created == 4


@pytest.mark.parametrize(
    "segmentation",
    [SEGMENTATIONS["one write"], SEGMENTATIONS["one byte at a time"]],
    ids=["one write", "one byte at a time"],
)
@pytest.mark.parametrize("code", [2104, 2106, 2158, 2103, 2105, 2157, 2107, 2108, 2119, 1102])
def test_informational_notices_in_a_download_are_harmless(values, code, segmentation):
    values.set_faults(
        **segmented(
            segmentation,
            value_inserts={a: [(0, [code]), (6, [code]), (-1, [code])] for a in ORDER},
        )
    )

    result = sync()

    assert outcome_of(result) == dict.fromkeys(ORDER, "read")


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
@pytest.mark.parametrize(
    ("item", "words"),
    [
        (["6l", "2"], "could not be read"),  # a frame the client cannot decode
        (["6", "3", "NetLiquidation", "1", "USD", OTHER], "layout"),
        (2101, "2101"),
        (321, "321"),
    ],
    ids=["undecodable", "value-layout", "2101", "321"],
)
def test_what_arrives_between_two_downloads_counts_for_the_next_one(
    values, item, words, segmentation
):
    """After ACCOUNT's download end and before OTHER's first value: whether OTHER had been
    asked for by then depends on how fast the bytes came, so it cannot decide anything;
    on the wire it is part of what came before OTHER's values, so it is OTHER's."""
    items = scripted(segmentation, [item])
    values.set_faults(**segmented(segmentation, value_inserts={ACCOUNT: [(AFTER_END, items)]}))

    result = sync()

    assert outcome_of(result) == {ACCOUNT: "read", OTHER: "missing", EMPTY: "read"}
    assert words in result.account_values[OTHER]["reason"]


@pytest.mark.parametrize("segmentation", SEGMENTATIONS.values(), ids=SEGMENTATIONS)
def test_an_update_after_a_download_end_is_never_taken_into_it(values, segmentation):
    late = [
        ["6", "2", "NetLiquidation", "1", "USD", ACCOUNT],
        ["6", "2", "AccountReady", "false", "", ACCOUNT],
    ]
    items = scripted(segmentation, late)
    values.set_faults(**segmented(segmentation, value_inserts={ACCOUNT: [(AFTER_END, items)]}))

    result = sync()

    assert outcome_of(result) == dict.fromkeys(ORDER, "read")
    assert AccountSnapshot.objects.get(account__external_id=ACCOUNT).net_liquidation != 1
