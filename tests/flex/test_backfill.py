"""A Flex connection's back-fill (`sync_ibkr --from`) and each day's net asset value:
the real client over real HTTP against the fake Flex Web Service, the source, mapping,
the writer and the service, into the database (SQLite, or PostgreSQL with
DATABASE_URL)."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError

from ibkr_sync import conf
from ibkr_sync.exceptions import InvalidPeriod
from ibkr_sync.models import AccountReport, Connection, PositionChange, SyncRun
from ibkr_sync.services import sync_period, sync_positions
from ibkr_sync.sources.flex.source import yesterday
from ibkr_sync.testing.flex_service import SEND_REQUEST, Answer

from .statements import _row, statement_with_values
from .test_flex_connection import QUERY, flex_connection, period_end, service  # noqa: F401

pytestmark = pytest.mark.django_db

ACCOUNT = "U7654321"
DATA = Path(__file__).parent.parent / "data" / "flex"


def Trade():
    return conf.ledger_model("IBKR_SYNC_TRADE_MODEL")


def quantity_of(to_date: dt.date) -> str:
    """The Apple position a window's statement holds: a different one for each end."""
    return str(to_date.toordinal() % 997 + 1)


def window_statement(from_date: dt.date, to_date: dt.date) -> str:
    """The statement of a period: the positions as of its end, each day's net asset value,
    and one trade on its first day (IBKR's id: the day)."""
    text = statement_with_values(from_date, to_date, quantity=quantity_of(to_date))
    trade = _row(
        "Trade",
        accountId=ACCOUNT,
        transactionID=f"8{from_date:%Y%m%d}",
        tradeID=f"7{from_date:%Y%m%d}",
        tradeDate=f"{from_date:%Y%m%d}",
        dateTime=f"{from_date:%Y%m%d};101500",
        settleDateTarget=f"{from_date:%Y%m%d}",
        buySell="BUY",
        quantity="1",
        tradePrice="100",
        proceeds="-100",
        ibCommission="-1",
        ibCommissionCurrency="USD",
        fifoPnlRealized="0",
        fxRateToBase="1",
        notes="O",
        levelOfDetail="EXECUTION",
        assetCategory="STK",
        symbol="AAPL",
        conid="265598",
        currency="USD",
        multiplier="1",
        listingExchange="NASDAQ",
    )
    return text.replace("</FlexStatement>", f"<Trades>{trade}</Trades>\n</FlexStatement>")


def three_windows() -> list[tuple[dt.date, dt.date]]:
    end = yesterday()
    start = end - dt.timedelta(days=365 * 2 + 9)
    return [
        (start, start + dt.timedelta(days=364)),
        (start + dt.timedelta(days=365), start + dt.timedelta(days=729)),
        (start + dt.timedelta(days=730), end),
    ]


def requested(service) -> list[tuple[str, str]]:  # noqa: F811
    return [(r.params["fd"], r.params["td"]) for r in service.requests_to(SEND_REQUEST)]


def as_params(windows) -> list[tuple[str, str]]:
    return [(f"{a:%Y%m%d}", f"{b:%Y%m%d}") for a, b in windows]


def days(windows) -> int:
    return sum((b - a).days + 1 for a, b in windows)


# --- the back-fill ------------------------------------------------------------------------


def test_a_back_fill_reads_every_window_oldest_first_and_the_newest_state_wins(service):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    windows = three_windows()
    out = io.StringIO()

    call_command("sync_ibkr", "--connection", "myflex", "--from", f"{windows[0][0]}", stdout=out)

    assert requested(service) == as_params(windows)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{a} to {b}" for a, b in windows]
    assert "history only" in lines[0] and "history only" in lines[1]
    assert "history only" not in lines[2] and "2 positions in 1 account(s)" in lines[2]
    runs = list(SyncRun.objects.order_by("pk"))
    assert [(r.period_from, r.period_to, r.history_only, r.status) for r in runs] == [
        (a, b, index < 2, "success") for index, (a, b) in enumerate(windows)
    ]
    # The ledger of every window; the state of the newest only.
    assert sorted(Trade().objects.values_list("external_id", flat=True)) == [
        f"8{a:%Y%m%d}" for a, _ in windows
    ]
    [aapl] = conf.position_model().objects.filter(instrument__symbol="AAPL")
    assert aapl.quantity == Decimal(quantity_of(windows[-1][1]))
    assert PositionChange.objects.filter(kind="created").count() == 2  # once, not per window
    assert AccountReport.objects.get(external_id=ACCOUNT).as_of == period_end(windows[-1][1])
    # A snapshot per day: the net liquidation history.
    snapshots = conf.account_snapshot_model().objects.filter(account__external_id=ACCOUNT)
    assert snapshots.count() == days(windows)
    first = snapshots.get(taken_at=period_end(windows[0][0]))
    assert first.net_liquidation == Decimal("35800.445") and first.currency == "USD"
    last = snapshots.latest()
    assert last.taken_at == period_end(windows[-1][1])
    assert last.exchange_rates["EUR"] == "1.0871"  # the whole snapshot of the period end


def test_a_back_fill_again_writes_nothing(service):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    windows = three_windows()
    sync_period(windows[0][0], trigger="command", connection="myflex")
    snapshots = conf.account_snapshot_model().objects.count()

    again = sync_period(windows[0][0], trigger="command", connection="myflex")

    assert again.error is None and len(again.windows) == 3
    for outcome in again.windows:
        result = outcome.result
        assert result.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 1}
        assert result.snapshots["created"] == result.snapshots["updated"] == 0
        assert result.created == result.updated == result.closed == 0
    assert again.windows[-1].result.unchanged == 2
    assert conf.account_snapshot_model().objects.count() == snapshots == days(windows)
    assert Trade().objects.count() == 3


def test_an_older_window_writes_its_history_under_a_newer_state(service):  # noqa: F811
    """A back-fill that ends before the state stored (a plain sync ran first): even its
    newest window is refused for the account's positions and cash, its ledger and days
    are written all the same, and the newer state stands."""
    service.add_statement(QUERY, window_statement)
    flex_connection()
    sync_positions(trigger="command", connection="myflex")  # the seven days to yesterday
    end = yesterday() - dt.timedelta(days=40)

    backfill = sync_period(end - dt.timedelta(days=9), end, trigger="command", connection="myflex")

    [outcome] = backfill.windows
    assert ACCOUNT in outcome.result.accounts_refused
    assert outcome.result.ledger["trades"]["created"] == 1
    assert outcome.result.snapshots["created"] == 10
    [aapl] = conf.position_model().objects.filter(instrument__symbol="AAPL")
    assert aapl.quantity == Decimal(quantity_of(yesterday()))
    assert AccountReport.objects.get(external_id=ACCOUNT).as_of == period_end(yesterday())
    # The next plain sync reads from the end of the last one applied, not the back-fill's.
    sync_positions(trigger="command", connection="myflex")
    fd, td = requested(service)[-1]
    assert (fd, td) == (f"{yesterday() - dt.timedelta(days=2):%Y%m%d}", f"{yesterday():%Y%m%d}")


def test_a_window_failing_midway_says_what_was_applied_and_loses_nothing(service):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    windows = three_windows()
    service.script(SEND_REQUEST, Answer(), Answer.error(1012))  # the second: token expired
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError) as raised:
        call_command(
            "sync_ibkr", "--connection", "myflex", "--from", f"{windows[0][0]}",
            stdout=out, stderr=err,
        )  # fmt: skip

    assert raised.value.returncode == 10  # the token refused
    message = str(raised.value)
    assert f"stopped at {windows[1][0]} to {windows[1][1]}" in message
    assert f"applied: {windows[0][0]} to {windows[0][1]};" in message
    assert f"not tried: {windows[2][0]} to {windows[2][1]}" in message
    assert out.getvalue().startswith(f"{windows[0][0]} to {windows[0][1]}: sync #")
    assert "failed (flex_auth" in err.getvalue() or "failed (" in err.getvalue()
    first, second = SyncRun.objects.order_by("pk")
    assert (first.status, first.period_to) == ("success", windows[0][1])
    assert (second.status, second.period_from, second.period_to) == (
        "failed",
        windows[1][0],
        windows[1][1],
    )
    assert requested(service) == as_params(windows[:2])
    # The first window's history stays; no state was written (its window was not newest).
    assert list(Trade().objects.values_list("external_id", flat=True)) == [
        f"8{windows[0][0]:%Y%m%d}"
    ]
    assert conf.account_snapshot_model().objects.count() == days(windows[:1])
    assert not conf.position_model().objects.exists()

    # Again from the window that failed: the rest is written.
    again = sync_period(windows[1][0], trigger="command", connection="myflex")
    assert again.error is None and len(again.windows) == 2
    assert Trade().objects.count() == 3
    assert conf.account_snapshot_model().objects.count() == days(windows)


def test_the_json_output_has_every_window(service):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    end = yesterday()
    out = io.StringIO()

    call_command(
        "sync_ibkr", "--connection", "myflex", "--from", f"{end - dt.timedelta(days=400)}",
        "--json", stdout=out,
    )  # fmt: skip

    body = json.loads(out.getvalue())
    assert body["status"] == "success" and body["connection"] == "myflex"
    assert [(w["from"], w["to"], w["history_only"]) for w in body["windows"]] == [
        (f"{end - dt.timedelta(days=400)}", f"{end - dt.timedelta(days=36)}", True),
        (f"{end - dt.timedelta(days=35)}", f"{end}", False),
    ]
    assert body["windows"][1]["result"]["created"] == 2
    assert body["not_tried"] == []


def test_quiet_prints_nothing(service):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    out = io.StringIO()

    call_command(
        "sync_ibkr", "--connection", "myflex", "--from", f"{yesterday()}", "--quiet", stdout=out
    )

    assert out.getvalue() == "" and SyncRun.objects.get().status == "success"


# --- what a back-fill refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--from", "2021-02-30"], "is not a day as YYYY-MM-DD"),
        (["--from", "yesterday"], "is not a day as YYYY-MM-DD"),
        (["--from", "2022-01-01", "--to", "2021-12-31"], "is before --from"),
        (["--from", "2099-01-01"], "has not closed yet"),
        (["--from", "2021-01-01", "--to", "2099-01-01"], "has not closed yet"),
        (["--from", "0001-01-01"], "IBKR keeps no statement that old"),
        (["--to", "2021-01-01"], "--to goes with --from"),
        (["--all", "--from", "2021-01-01"], "--from back-fills one Flex connection"),
    ],
)
@pytest.mark.django_db(transaction=True)  # the command line closes the connections
def test_a_bad_period_is_exit_2_and_asks_nothing(service, capsys, arguments, message):  # noqa: F811
    flex_connection()

    which = [] if "--all" in arguments else ["--connection", "myflex"]
    with pytest.raises(SystemExit) as raised:
        execute_from_command_line(["manage.py", "sync_ibkr", *which, *arguments])

    assert raised.value.code == 2
    assert message in capsys.readouterr().err
    assert not service.requests and not SyncRun.objects.exists()


def test_a_tws_connection_is_no_back_fill(service):  # noqa: F811
    Connection.objects.create(name="gateway", host="127.0.0.1", port=4002, client_id=3)

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "gateway", "--from", "2021-01-01")

    assert raised.value.returncode == 2
    assert "only a Flex connection reads a period" in str(raised.value)
    with pytest.raises(InvalidPeriod):
        sync_period(dt.date(2021, 1, 1), trigger="command", connection="gateway")
    assert not SyncRun.objects.exists()


# --- each day's net asset value ----------------------------------------------------------


def with_net_asset_values(text: str, values: dict[str, str], currency: str) -> str:
    """A published statement whose query left out Net Asset Value (NAV) in Base, with the
    section for some of its days (the rest is the statement as published)."""
    rows = "".join(
        _row(
            "EquitySummaryByReportDateInBase",
            accountId="U1234567",
            currency=currency,
            reportDate=day,
            cash="100",
            total=total,
        )
        for day, total in values.items()
    )
    return text.replace(
        "<ConversionRates>",
        f"<OpenPositions /><EquitySummaryInBase>{rows}</EquitySummaryInBase><ConversionRates>",
        1,
    )


def test_each_day_s_snapshot_carries_that_day_s_real_rates(service):  # noqa: F811
    """A real statement's year of ConversionRates: each day's snapshot holds that day's
    rates to the base, as the statement has them (read here independently)."""
    path = DATA / "portfolio-performance" / "testIBFlexStatementFile18.xml"
    navs = {"20211220": "20100", "20211221": "20093.5", "20221219": "21877.25"}
    service.add_statement(QUERY, with_net_asset_values(path.read_text(), navs, "EUR"))
    flex_connection()

    result = sync_positions(trigger="command", connection="myflex")

    assert result.snapshots == {"created": 3, "updated": 0, "unchanged": 0}
    stored = {
        s.taken_at: s
        for s in conf.account_snapshot_model().objects.filter(account__external_id="U1234567")
    }
    root = ET.parse(path).getroot()
    for day, total in navs.items():
        date = dt.datetime.strptime(day, "%Y%m%d").date()
        snapshot = stored[period_end(date)]
        assert snapshot.net_liquidation == Decimal(total) and snapshot.currency == "EUR"
        expected = {
            row.get("fromCurrency"): row.get("rate")
            for row in root.iter("ConversionRate")
            if row.get("reportDate") == day
            and row.get("toCurrency") == "EUR"
            and Decimal(row.get("rate")) > 0  # IBKR's -1: no rate that day
        }
        assert len(expected) > 10
        rates = {c: Decimal(r) for c, r in snapshot.exchange_rates.items()}
        assert rates == {"EUR": Decimal(1), **{c: Decimal(r) for c, r in expected.items()}}
    assert stored[period_end(dt.date(2021, 12, 21))].exchange_rates["CHF"] == "0.95947"
    assert not [e for e in result.errors if "ConversionRate" in e["reason"]]

    # The statement again: no day stored twice.
    again = sync_positions(trigger="command", connection="myflex")
    assert again.snapshots == {"created": 0, "updated": 0, "unchanged": 3}
    assert conf.account_snapshot_model().objects.count() == 3


def nav_of(day: dt.date) -> str:
    """A day's net asset value, the same in every statement that holds the day."""
    return f"{35000 + day.toordinal() % 1000}.445"


def statement_of_days(corrected: dict[dt.date, str] | None = None):
    """Statements whose days have one value each whatever the period asked for (IBKR's
    as published), except the days `corrected` (IBKR corrected them since)."""
    corrected = corrected or {}

    def statement(from_date: dt.date, to_date: dt.date) -> str:
        text = statement_with_values(from_date, to_date)

        def nav(match: re.Match) -> str:
            day = dt.datetime.strptime(match["day"], "%Y%m%d").date()
            cash = f"{13000 + day.toordinal() % 1000}.345"
            total = corrected.get(day, nav_of(day))
            return f'reportDate="{match["day"]}" cash="{cash}" stock="1" total="{total}"'

        return re.sub(r'reportDate="(?P<day>\d{8})" cash="[^"]*" stock="[^"]*" '
                      r'total="[^"]*"', nav, text)  # fmt: skip

    return statement


def stored_days() -> dict[dt.datetime, tuple]:
    return {
        row[0]: row[1:]
        for row in conf.account_snapshot_model()
        .objects.filter(account__external_id=ACCOUNT)
        .values_list(
            "taken_at",
            "sync_run_id",
            "currency",
            "net_liquidation",
            "total_cash_value",
            "gross_position_value",
            "unrealized_pnl",
            "exchange_rates",
        )
    }


def test_a_day_ibkr_corrected_is_updated_by_an_overlapping_statement(service):  # noqa: F811
    end = yesterday() - dt.timedelta(days=20)
    first = (end - dt.timedelta(days=7), end - dt.timedelta(days=3))  # A: days 1-5
    second = (end - dt.timedelta(days=5), end)  # B: days 3-8
    fixed = end - dt.timedelta(days=4)  # day 4, in both: IBKR corrected its value
    service.add_statement(QUERY, statement_of_days())
    flex_connection()
    a = sync_period(*first, trigger="command", connection="myflex").windows[0].result
    assert a.snapshots == {"created": 5, "updated": 0, "unchanged": 0}
    before = stored_days()
    assert before[period_end(fixed)][2] == Decimal(nav_of(fixed))

    service.add_statement(QUERY, statement_of_days({fixed: "36123.5"}))
    b = sync_period(*second, trigger="command", connection="myflex").windows[0].result

    # Days 6-8 new (8: the period end's whole snapshot), day 4 corrected, 3 and 5 as stored.
    assert b.snapshots == {"created": 3, "updated": 1, "unchanged": 2}
    after = stored_days()
    assert len(after) == 8
    day4 = after[period_end(fixed)]
    assert day4[2] == Decimal("36123.5")
    assert day4[0] == b.sync_run_id, "the row names the run that corrected it"
    # Only the net asset value changed: its cash and that day's rates (A's) are kept.
    assert day4[1:2] + day4[3:] == before[period_end(fixed)][1:2] + before[period_end(fixed)][3:]
    # Nothing else touched: A's other days (its period end's whole snapshot too).
    for moment, row in before.items():
        if moment != period_end(fixed):
            assert after[moment] == row, moment
    whole = after[period_end(first[1])]
    assert whole[0] == a.sync_run_id and whole[6]["EUR"] == "1.0871"

    # B again: nothing to write.
    again = sync_period(*second, trigger="command", connection="myflex").windows[0].result
    assert again.snapshots == {"created": 0, "updated": 0, "unchanged": 6}
    assert stored_days() == after


def test_the_run_page_shows_the_period_read(service, admin_client):  # noqa: F811
    service.add_statement(QUERY, window_statement)
    flex_connection()
    end = yesterday()
    backfill = sync_period(end - dt.timedelta(days=400), trigger="command", connection="myflex")
    older, newer = (w.result.sync_run_id for w in backfill.windows)

    page = admin_client.get(f"/admin/ibkr_sync/syncrun/{older}/change/").content.decode()
    assert f"{end - dt.timedelta(days=400)} to {end - dt.timedelta(days=36)}" in page
    assert "history only" in page
    page = admin_client.get(f"/admin/ibkr_sync/syncrun/{newer}/change/").content.decode()
    assert f"{end - dt.timedelta(days=35)} to {end}" in page and "history only" not in page


def test_a_plain_sync_after_more_than_a_year_asks_for_a_back_fill_and_skips_nothing(service):  # noqa: F811
    """A plain sync reads from the last statement applied: a gap longer than one statement
    can cover is never read over silently; the sync says which back-fill reads it."""
    service.add_statement(QUERY, window_statement)
    connection = flex_connection()
    last = yesterday() - dt.timedelta(days=500)
    sync_period(last - dt.timedelta(days=6), last, trigger="command", connection="myflex")
    asked = len(requested(service))

    with pytest.raises(InvalidPeriod) as refused:
        sync_positions(trigger="command", connection=connection.name)

    assert f"ended on {last}" in str(refused.value)
    assert f"--from {last - dt.timedelta(days=2)}" in str(refused.value)
    assert len(requested(service)) == asked  # nothing asked of IBKR
    failed = SyncRun.objects.latest("pk")
    assert (failed.status, failed.error_code) == ("failed", "invalid_period")


def test_a_back_fill_that_stops_midway_leaves_its_history_its_owners_alone(
    service,  # noqa: F811
    django_user_model,
):
    """The older windows write history only (no positions): the accounts it names are
    still this connection's (a report of it), so its owner's history is not everyone's
    while the back-fill runs, nor after it stopped."""
    from ibkr_sync import visibility

    service.add_statement(QUERY, window_statement)
    alice = django_user_model.objects.create_user("alice", password="pw-alice-1")
    bob = django_user_model.objects.create_user("bob", password="pw-bob-1")
    connection = flex_connection()
    Connection.objects.filter(pk=connection.pk).update(owner=alice)
    windows = three_windows()
    service.script(SEND_REQUEST, Answer(), Answer.error(1012))  # the second window fails

    outcome = sync_period(windows[0][0], trigger="command", connection="myflex")

    assert outcome.error is not None and len(outcome.applied) == 1
    assert Trade().objects.count() == 1
    report = AccountReport.objects.get()
    assert (report.connection_id, report.positions_digest) == (connection.pk, "")
    snapshots = conf.account_snapshot_model().objects.all()
    for user, seen in ((alice, 1), (bob, 0)):
        assert visibility.visible(Trade().objects.all(), user).count() == seen
        assert visibility.visible(conf.account_model().objects.all(), user, "").count() == seen
        assert visibility.visible(snapshots, user).exists() == bool(seen)

    # The rest, then a newer state: the report moves on as any sync's would.
    again = sync_period(windows[1][0], trigger="command", connection="myflex")
    assert again.error is None
    assert AccountReport.objects.get().as_of > report.as_of
