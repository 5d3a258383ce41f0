"""The overview's account values: IBKR's latest net liquidation, the cash and the open
positions' market value and unrealized P&L per currency and sec type, converted to the
account's base currency at IBKR's own rates (never added unconverted), and the history
of the net liquidation, charted over 1M, 3M, 1Y or all, in a fixed number of queries."""

import datetime as dt
import itertools
import re
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from ibkr_sync import history
from ibkr_sync.overview import TIMES, Conversion, Total, portfolio_overview
from portfolio.models import AccountSnapshot
from tests.test_admin_overview import OVERVIEW_MAX_QUERIES, module
from tests.values import account, cash, held, snapshot

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:portfolio_overview")
DAY = dt.timedelta(days=1)


@pytest.fixture
def now() -> dt.datetime:
    return timezone.now()


@pytest.fixture
def values(now):
    """Main (USD): USD, EUR and JPY positions, cash with IBKR's EUR rate and none for JPY,
    a history. Euro (EUR): no cash rows, so no rate for its USD position. Bare: no base
    currency known, no snapshot."""
    main = account("U1111111", name="Main")
    held(main, "AAPL", quantity="10", cost_basis="1502.5", market_value="1894.321",
         unrealized_pnl="391.821")  # fmt: skip
    held(main, "MSFT", quantity="3", cost_basis="1230.3", market_value="1247.61",
         unrealized_pnl="17.31")  # fmt: skip
    held(main, "ES", "FUT", quantity="-1", cost_basis="-251234.5", market_value="-252000",
         unrealized_pnl="-765.5")  # fmt: skip
    held(main, "ODD", quantity="7")  # IBKR reported no values: counted apart
    held(main, "NVDA", quantity="100", cost_basis="12000", market_value="13000",
         unrealized_pnl="1000", closed=True)  # fmt: skip
    held(main, "SAP", currency="EUR", quantity="50", cost_basis="6015", market_value="9056",
         unrealized_pnl="3041")  # fmt: skip
    held(main, "SAP", "OPT", "EUR", quantity="-2", cost_basis="-620", market_value="-410.5",
         unrealized_pnl="209.5")  # fmt: skip
    held(main, "7203", currency="JPY", quantity="100", cost_basis="250000",
         market_value="287000", unrealized_pnl="37000")  # fmt: skip
    cash(main, "USD", "12345.67", "1")
    cash(main, "EUR", "1000", "1.085")
    cash(main, "JPY", "-150000")  # IBKR reported no rate
    for days, value in ((400, "100000"), (200, "150000"), (80, "200000"), (20, "250000.5"),
                        (1, "300000.25")):  # fmt: skip
        snapshot(main, now - days * DAY, value)
    # The latest snapshot, without a net liquidation: the headline keeps the one before;
    # its rates (IBKR's latest, to its currency) convert the positions' values.
    snapshot(main, now - dt.timedelta(hours=1), None, total_cash_value="1",
             exchange_rates={"EUR": "1.085", "USD": "1"})  # fmt: skip

    euro = account("U2222222", base_currency="EUR", name="Euro")
    held(euro, "BMW", currency="EUR", quantity="40", cost_basis="3950.4", market_value="4052",
         unrealized_pnl="101.6")  # fmt: skip
    held(euro, "AAPL", quantity="1", cost_basis="150.25", market_value="189.4321",
         unrealized_pnl="39.1821")  # fmt: skip
    snapshot(euro, now - dt.timedelta(hours=2), "51234.5")

    bare = account("U3333333", base_currency="")
    held(bare, "AAPL", quantity="2", cost_basis="300.5", market_value="378.8642",
         unrealized_pnl="78.3642")  # fmt: skip
    return {"main": main, "euro": euro, "bare": bare}


def page(client, query: str = "") -> tuple[str, object]:
    response = client.get(f"{OVERVIEW}{query}")
    assert response.status_code == 200
    return response.text, response.context["overview"]


def summary(data, external_id: str):
    return next(a for a in data.accounts if a.external_id == external_id)


def row(html: str, attributes: str) -> str:
    return re.search(rf"<tr {attributes}>.*?</tr>", html, re.S).group()


def texts(html: str) -> list[str]:
    """The text of each cell of a row, tags stripped, whitespace collapsed."""
    return [
        " ".join(re.sub(r"<[^>]+>", " ", cell).split())
        for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", html, re.S)
    ]


# --- net liquidation -----------------------------------------------------------------------


def test_the_latest_net_liquidation_with_its_currency_and_time(admin_client, values, now):
    html, data = page(admin_client)

    main = summary(data, "U1111111")
    assert (main.snapshot.net_liquidation, main.snapshot.currency) == (
        Decimal("300000.25"), "USD"
    )  # fmt: skip
    assert main.snapshot.taken_at == now - DAY
    section = module(html, f"account-{values['main'].pk}")
    headline = re.search(r'<p class="net-liquidation">(.*?)</p>', section, re.S).group(1)
    assert '<strong title="300000.25">300,000.25 USD</strong>' in headline
    assert f'<time datetime="{timezone.localtime(now - DAY).isoformat()}">' in headline
    assert summary(data, "U3333333").snapshot is None
    bare = module(html, f"account-{values['bare'].pk}")
    assert "No net liquidation read from IBKR yet." in bare
    assert "base currency unknown" in bare


def test_accounts_in_order_real_ones_before_paper_ones(admin_client, values):
    account("DU0000001", is_paper=True)

    _, data = page(admin_client)

    assert [a.external_id for a in data.accounts] == [
        "U1111111", "U2222222", "U3333333", "DU0000001"
    ]  # fmt: skip


# --- cash ----------------------------------------------------------------------------------


def test_cash_by_currency_converted_at_ibkrs_rates(admin_client, values):
    html, data = page(admin_client)

    main = summary(data, "U1111111")
    assert [(c.currency, c.amount, c.converted) for c in main.cash] == [
        ("EUR", Decimal("1000"), Decimal("1085")),
        ("JPY", Decimal("-150000"), None),  # shown, not added
        ("USD", Decimal("12345.67"), Decimal("12345.67")),
    ]
    assert main.cash_total.amount == Decimal("13430.67")
    table = re.search(r'<table class="cash">.*?</table>', module(html, f"account-{main.pk}"),
                      re.S).group()  # fmt: skip
    assert texts(row(table, 'data-currency="EUR"')) == [
        "EUR", "1,000.00", f"1,000.00 EUR {TIMES} 1.0850 = 1,085.00 USD"
    ]  # fmt: skip
    assert texts(row(table, 'data-currency="JPY"')) == [
        "JPY", "-150,000.00",
        "-150,000.00 JPY: not added (IBKR reported no JPY-USD rate)",
    ]  # fmt: skip
    assert texts(row(table, 'data-currency="USD"')) == ["USD", "12,345.67", "12,345.67 USD"]
    assert texts(row(table, 'class="total"')) == ["Total cash", "", "13,430.67 USD"]
    assert "Not in the total: JPY (no conversion, above)." in table
    # Never the amounts as they are: 12,345.67 + 1,000 - 150,000, or without the yen.
    for unconverted in ("-136,654.33", "13,345.67"):
        assert unconverted not in html


def test_an_account_without_cash_rows_says_so(admin_client, values):
    html, _ = page(admin_client)

    assert "No cash balances read from IBKR yet." in module(html, f"account-{values['euro'].pk}")


# --- open positions ------------------------------------------------------------------------


def values_of(subtotal) -> tuple:
    return (
        subtotal.currency, subtotal.positions, subtotal.cost_basis, subtotal.market_value,
        subtotal.without_market_value, subtotal.unrealized_pnl, subtotal.without_unrealized_pnl,
    )  # fmt: skip


def test_market_value_and_pnl_by_currency_and_sec_type(admin_client, values):
    html, data = page(admin_client)

    main = summary(data, "U1111111")
    D = Decimal
    assert [values_of(c.total) for c in main.currencies] == [
        ("EUR", 2, D("5395"), D("8645.5"), 0, D("3250.5"), 0),
        ("JPY", 1, D("250000"), D("287000"), 0, D("37000"), 0),
        # 1894.321 + 1247.61 - 252000, and ODD counted apart; the closed NVDA not at all.
        ("USD", 4, D("-248501.7"), D("-248858.069"), 1, D("-356.369"), 1),
    ]
    by_sec_type = {
        c.total.currency: [(t, s.market_value, s.unrealized_pnl) for t, s in c.by_sec_type]
        for c in main.currencies
    }
    assert by_sec_type == {
        "EUR": [("STK", D("9056"), D("3041")), ("OPT", D("-410.5"), D("209.5"))],
        "JPY": [("STK", D("287000"), D("37000"))],
        "USD": [("FUT", D("-252000"), D("-765.5")), ("STK", D("3141.931"), D("409.131"))],
    }
    table = re.search(r'<table class="positions">.*?</table>', html, re.S).group()
    assert texts(row(table, 'class="total" data-account="U1111111" data-currency="USD"')) == [
        "", "All USD", "4", "-248,501.70", "-248,858.07 (1 without)", "-356.37 (1 without)"
    ]  # fmt: skip
    assert texts(row(table, 'data-account="U1111111" data-currency="EUR" data-sec-type="OPT"')) == [
        "", "OPT", "1", "-620.00", "-410.50", "209.50"
    ]  # fmt: skip


def test_totals_across_currencies_only_converted_at_the_accounts_own_rates(admin_client, values):
    html, data = page(admin_client)

    main = summary(data, "U1111111")
    market_value, pnl = main.market_value, main.unrealized_pnl
    assert [(c.currency, c.converted) for c in market_value.conversions] == [
        ("EUR", Decimal("9380.3675")),  # 8645.5 x 1.085
        ("JPY", None),  # no JPY rate: not added
        ("USD", Decimal("-248858.069")),  # the base currency
    ]
    assert market_value.amount == Decimal("-239477.7015")
    assert pnl.amount == Decimal("3170.4235")  # 3250.5 x 1.085 - 356.369
    assert [c.currency for c in market_value.not_added] == ["JPY"]
    section = module(html, f"account-{main.pk}")
    table = re.search(r'<table class="in-base">.*?</table>', section, re.S).group()
    assert texts(row(table, 'data-currency="EUR"')) == [
        "EUR",
        f"8,645.50 EUR {TIMES} 1.0850 = 9,380.37 USD",
        f"3,250.50 EUR {TIMES} 1.0850 = 3,526.79 USD",
    ]
    assert texts(row(table, 'data-currency="JPY"')) == [
        "JPY",
        "287,000.00 JPY: not added (IBKR reported no JPY-USD rate)",
        "37,000.00 JPY: not added (IBKR reported no JPY-USD rate)",
    ]
    assert texts(row(table, 'class="total"')) == ["Total", "-239,477.70 USD", "3,170.42 USD"]
    assert 'title="-239477.7015"' in table, "the exact total on hover"
    assert "Not in the total: JPY (no conversion, above)." in table
    # Never added unconverted: USD + EUR + JPY, or USD + EUR, as they are.
    for unconverted in ("46,787.43", "-240,212.57", "39,894.13", "2,894.13"):
        assert unconverted not in html

    # Euro's own rates (none: it has no cash rows), not Main's EUR-USD rate.
    euro = summary(data, "U2222222")
    assert euro.market_value.amount == Decimal("4052")
    assert [c.currency for c in euro.market_value.not_added] == ["USD"]
    assert "189.43 USD: not added (IBKR reported no USD-EUR rate)" in module(
        html, f"account-{euro.pk}"
    )
    # No base currency known: nothing is converted, nothing added.
    bare = summary(data, "U3333333")
    assert bare.market_value.amount is None
    assert "378.86 USD: not added (the account&#x27;s base currency is unknown)" in module(
        html, f"account-{bare.pk}"
    )


def test_one_currency_in_the_base_currency_needs_no_conversion_table(admin_client):
    solo = account("U4444444")
    snapshot(solo, timezone.now(), "1000")
    held(solo, "AAPL", quantity="1", cost_basis="150", market_value="190", unrealized_pnl="40")

    html, data = page(admin_client)

    assert summary(data, "U4444444").market_value.amount == Decimal("190")
    assert '<table class="in-base">' not in module(html, f"account-{solo.pk}")


def test_all_accounts_by_currency_are_per_currency(admin_client, values):
    html, data = page(admin_client)

    totals = {c.total.currency: values_of(c.total) for c in data.currencies}
    D = Decimal
    assert totals["USD"] == (
        # Main's 4, Euro's and Bare's AAPL: same currency, added across accounts.
        "USD", 6, D("-248050.95"), D("-248289.7727"), 1, D("-238.8227"), 1,
    )  # fmt: skip
    assert totals["EUR"] == ("EUR", 3, D("9345.4"), D("12697.5"), 0, D("3352.1"), 0)
    usd = row(module(html, "by-currency"), 'data-currency="USD"')
    assert texts(usd)[-2:] == ["-248,289.77 (1 without)", "-238.82 (1 without)"]


@pytest.mark.parametrize(
    ("conversion", "text", "converted"),
    [
        (Conversion("EUR", Decimal("1000"), Decimal("1.085"), "USD"),
         f"1,000.00 EUR {TIMES} 1.0850 = 1,085.00 USD", Decimal("1085")),
        (Conversion("USD", Decimal("-2500"), Decimal("0.9216"), "EUR"),
         f"-2,500.00 USD {TIMES} 0.9216 = -2,304.00 EUR", Decimal("-2304")),
        (Conversion("USD", Decimal("5"), None, "USD"), "5.00 USD", Decimal("5")),
        (Conversion("USD", Decimal("5"), Decimal("1"), "USD"), "5.00 USD", Decimal("5")),
        (Conversion("CHF", Decimal("5"), None, "USD"),
         "5.00 CHF: not added (IBKR reported no CHF-USD rate)", None),
        (Conversion("USD", None, Decimal("1"), "USD"), "-", None),
        # Exactly, beyond the default context's 28 digits.
        (Conversion("JPY", Decimal("12345678901234567890.1234567891"), Decimal("0.0068935"),
                    "USD"),
         f"12,345,678,901,234,567,890.12 JPY {TIMES} 0.0068935 = 85,104,937,505,660,493.75 USD",
         Decimal("85104937505660493.75056604937566085")),
        # Only a positive rate converts, and only to the currency it converts to.
        (Conversion("EUR", Decimal("1000"), Decimal("0"), "USD"),
         "1,000.00 EUR: not added (IBKR's EUR rate 0 is not a positive rate)", None),
        (Conversion("EUR", Decimal("1000"), Decimal("-1.0825"), "USD"),
         "1,000.00 EUR: not added (IBKR's EUR rate -1.0825 is not a positive rate)", None),
        (Conversion("EUR", Decimal("1000"), Decimal("1.0825"), "EUR", "USD"),
         "1,000.00 EUR", Decimal("1000")),  # already in the total's currency
        (Conversion("USD", Decimal("1000"), Decimal("1"), "EUR", "USD"),
         "1,000.00 USD: not added (IBKR's USD rate converts to USD, not EUR)", None),
        (Conversion("USD", Decimal("1000"), Decimal("0.92"), "EUR", ""),
         "1,000.00 USD: not added (IBKR's USD rate was read without the currency it "
         "converts to)", None),
        (Conversion("USD", Decimal("1000"), Decimal("0.92"), "EUR", "EUR"),
         f"1,000.00 USD {TIMES} 0.9200 = 920.00 EUR", Decimal("920")),
    ],
)  # fmt: skip
def test_conversion(conversion, text, converted):
    assert (conversion.text, conversion.converted) == (text, converted)


def test_a_total_adds_only_what_it_converted():
    total = Total(
        "USD",
        [
            Conversion("EUR", Decimal("1000"), Decimal("1.085"), "USD"),
            Conversion("JPY", Decimal("150000"), None, "USD"),
            Conversion("USD", Decimal("0.005"), None, "USD"),
        ],
    )

    assert total.amount == Decimal("1085.005")
    assert (total.display, total.exact) == ("1,085.00", "1085.005")
    assert [c.currency for c in total.not_added] == ["JPY"]
    assert Total("USD", [Conversion("JPY", Decimal(1), None, "USD")]).display == "-"


# --- history --------------------------------------------------------------------------------


def chart_of(html: str, pk: int) -> str | None:
    found = re.search(r'<figure class="history".*?</figure>', module(html, f"account-{pk}"), re.S)
    return found and found.group()


@pytest.mark.parametrize(
    ("query", "key", "points"),
    [
        ("", "3m", 3),  # the default: 80, 20 and 1 day(s) ago
        ("?range=1m", "1m", 2),
        ("?range=3m", "3m", 3),
        ("?range=1y", "1y", 4),
        ("?range=all", "all", 5),
        ("?range=ALL", "all", 5),
        ("?range=5y", "3m", 3),  # anything else: the default
    ],
)
def test_range_filters_the_history(admin_client, values, query, key, points):
    html, data = page(admin_client, query)

    assert data.history_range.key == key
    main = summary(data, "U1111111")
    assert len(main.history.points) == points
    assert [p.value for p in main.history.points][-2:] == [
        Decimal("250000.5"), Decimal("300000.25")
    ]  # fmt: skip
    chart = chart_of(html, main.pk)
    assert f'data-points="{points}"' in chart
    nav = re.search(r'<nav class="history-ranges".*?</nav>', html, re.S).group()
    assert re.findall(r'<a href="\?range=(\w+)"', nav) == ["1m", "3m", "1y", "all"]
    assert re.findall(r'<a href="\?range=(\w+)" class="selected" aria-current="page"', nav) == [key]


def test_a_range_starts_the_same_day_so_many_calendar_months_before(now):
    main = account("U1111111")
    start = history.months_before(now, 1)
    snapshot(main, start, "1")  # on the boundary: in
    snapshot(main, start - dt.timedelta(seconds=1), "2")  # just before: out

    data = portfolio_overview("1m", now=now)

    assert [p.value for p in summary(data, "U1111111").history.points] == [Decimal("1")]


@pytest.mark.parametrize(
    ("moment", "months", "expected"),
    [
        ("2026-03-31 14:30", 1, "2026-02-28 14:30"),
        ("2028-03-31 14:30", 1, "2028-02-29 14:30"),
        ("2026-01-15 00:00", 3, "2025-10-15 00:00"),
        ("2026-12-02 06:00", 12, "2025-12-02 06:00"),
    ],
)
def test_months_before(moment, months, expected):
    aware = timezone.make_aware(dt.datetime.fromisoformat(moment))
    assert history.months_before(aware, months) == timezone.make_aware(
        dt.datetime.fromisoformat(expected)
    )


def test_the_chart_is_accessible_inline_svg(admin_client, values):
    html, _ = page(admin_client, "?range=all")

    chart = chart_of(html, values["main"].pk)
    svg = re.search(r"<svg [^>]*>", chart).group()
    pk = values["main"].pk
    assert 'role="img"' in svg
    assert f'aria-labelledby="history-title-{pk} history-desc-{pk}"' in svg
    # The title says the span drawn (from the first snapshot to the last), not the range.
    title = re.search(rf'<title id="history-title-{pk}">(.*?)</title>', chart).group(1)
    assert re.fullmatch(
        r"Net liquidation of U1111111 in USD, \d+ \w{3} \d{4} to \d+ \w{3} \d{4}", title
    )
    description = re.search(rf'<desc id="history-desc-{pk}">(.*?)</desc>', chart).group(1)
    assert description.startswith("5 values (every value) from ")
    assert "(100,000.00 USD) to " in description
    assert "(300,000.25 USD); lowest 100,000.00 at " in description
    assert "highest 300,000.25 at " in description
    # Value axis in round steps, a date under each time tick, a marker per point.
    assert re.findall(r'<text class="y-label"[^>]*>([^<]*)</text>', chart) == [
        "100,000", "150,000", "200,000", "250,000", "300,000", "350,000"
    ]  # fmt: skip
    assert 2 <= len(re.findall(r'<text class="x-label"', chart)) <= 10
    assert len(re.findall(r'<circle class="point"', chart)) == 5
    assert '<path class="line" d="M' in chart
    assert "<script" not in html.split('id="content-main"')[1]
    assert "http" not in chart.replace("http://www.w3.org/2000/svg", "")


def test_one_snapshot_is_one_labelled_point(admin_client, values):
    html, _ = page(admin_client)

    chart = chart_of(html, values["euro"].pk)
    assert 'data-points="1"' in chart
    assert len(re.findall(r'<circle class="point"', chart)) == 1
    assert '<path class="line"' not in chart
    assert ">51,234.50 EUR</text>" in chart
    assert "One value: 51,234.50 EUR at " in chart


def test_no_snapshot_in_the_range_or_none_at_all(admin_client, now):
    old = account("U5555555")
    snapshot(old, now - 40 * DAY, "1000")
    never = account("U6666666")

    html, _ = page(admin_client, "?range=1m")

    section = module(html, f"account-{old.pk}")
    assert chart_of(html, old.pk) is None
    assert "No net liquidation in the last month: the latest is from " in section
    assert '<a href="?range=all">All history</a>' in section
    assert "1,000.00 USD" in section, "the latest value, still"
    assert "No net liquidation read from IBKR yet." in module(html, f"account-{never.pk}")
    assert chart_of(html, never.pk) is None


def test_a_changed_base_currency_is_not_drawn_on_the_same_axis(now):
    main = account("U1111111", base_currency="EUR")
    snapshot(main, now - 3 * DAY, "1000", currency="USD")
    snapshot(main, now - 2 * DAY, "900", currency="EUR")
    snapshot(main, now - DAY, "950", currency="EUR")

    data = portfolio_overview("all", now=now)

    account_history = data.accounts[0].history
    assert [(p.value, p.currency) for p in account_history.points] == [
        (Decimal("900"), "EUR"), (Decimal("950"), "EUR")
    ]  # fmt: skip
    assert account_history.other_currency == 1
    assert (
        "1 earlier values in another currency are not shown."
        in (data.accounts[0].chart["description"])
    )


def test_a_long_history_is_thinned_in_the_database_to_the_last_value_of_each_hour():
    main = account("U1111111")
    start = timezone.make_aware(dt.datetime(2026, 11, 1))
    # 400 snapshots, every half hour: more than MAX_POINTS, so one per hour (the :30 one).
    for i in range(400):
        snapshot(main, start + dt.timedelta(minutes=30 * i), i)

    [account_history] = history.histories(None).values()

    assert account_history.period == "hour"
    assert len(account_history.points) == 200
    assert all(p.taken_at.minute == 30 for p in account_history.points)
    assert [p.value for p in account_history.points][:3] == [1, 3, 5]
    assert account_history.points[-1].value == 399


def test_a_longer_history_keeps_the_last_value_of_each_day():
    main = account("U1111111")
    other = account("U2222222")
    start = timezone.make_aware(dt.datetime(2026, 1, 1))
    # 1,000 snapshots every 2 hours (83 days): too many hours, so one per day. The other
    # account's few snapshots are all kept, in the same query.
    for i in range(1000):
        snapshot(main, start + dt.timedelta(hours=2 * i), i)
    for i in range(3):
        snapshot(other, start + dt.timedelta(minutes=i), 10_000 + i)

    histories = history.histories(None)

    daily = histories[main.pk]
    assert daily.period == "day"
    assert len(daily.points) == 84
    assert all(p.taken_at.hour == 22 for p in daily.points[:-1])
    assert [p.value for p in daily.points][:2] == [11, 23]
    assert daily.points[-1].value == 999
    assert histories[other.pk].period is None
    assert [p.value for p in histories[other.pk].points] == [10_000, 10_001, 10_002]


@pytest.mark.parametrize(
    ("low", "high", "ticks"),
    [
        ("100000", "300000.25", ["100000", "150000", "200000", "250000", "300000", "350000"]),
        ("0.5", "2", ["0.5", "1.0", "1.5", "2.0"]),
        ("-1200", "800", ["-1500", "-1000", "-500", "0", "500", "1000"]),
        # One value (or a flat line): a little room around it.
        ("51234.5", "51234.5", ["50000", "50500", "51000", "51500", "52000", "52500"]),
        ("269000", "292000", ["260000", "270000", "280000", "290000", "300000"]),
        ("0", "0", ["-1.0", "-0.5", "0.0", "0.5", "1.0"]),
    ],
)
def test_value_axis_ticks_are_round_and_cover_the_values(low, high, ticks):
    result = history.value_axis(Decimal(low), Decimal(high))

    assert result == [Decimal(t) for t in ticks]
    assert result[0] <= Decimal(low) and result[-1] >= Decimal(high)


def test_line_chart_geometry_stays_in_the_plot():
    start = timezone.make_aware(dt.datetime(2026, 1, 1))
    points = [
        history.Point(start + i * DAY, Decimal(v), "USD") for i, v in enumerate([5, 10, 7, 12])
    ]

    chart = history.line_chart("U1", history.History(points, None), history.chosen_range("1m"))

    xs = [float(x) for x in re.findall(r"[ML]([\d.]+),", chart["line"])]
    ys = [float(y) for y in re.findall(r",([\d.]+)", chart["line"])]
    assert xs[0] == history.LEFT and xs[-1] == history.WIDTH - history.RIGHT
    assert xs == sorted(xs)
    assert all(history.TOP <= y <= chart["bottom"] for y in ys)
    assert ys[3] < ys[1] < ys[2] < ys[0], "higher values higher up"
    # A tick at each midnight (dated) and noon, as many as fit side by side.
    labels = ["1 Jan", "12:00", "2 Jan", "12:00", "3 Jan", "12:00", "4 Jan"]
    assert [t["label"] for t in chart["x_ticks"]] == labels
    assert [t["x"] for t in chart["x_ticks"]][::2] == [xs[0], 298.7, 497.3, xs[-1]]
    assert chart["span"] == "1 Jan to 4 Jan 2026 (all there is of the last month)"
    assert chart["title"] == "Net liquidation of U1 in USD, 1 Jan to 4 Jan 2026"
    assert history.line_chart("U1", history.History([], None), history.chosen_range(None)) is None


SPANS = {
    "seconds": dt.timedelta(seconds=40),
    "minutes": dt.timedelta(minutes=8),
    "an hour": dt.timedelta(hours=1, minutes=3),
    "a day": dt.timedelta(hours=26),
    "three days": dt.timedelta(days=3),
    "a month": dt.timedelta(days=31),
    "three months": dt.timedelta(days=92),
    "a year": dt.timedelta(days=366),
    "seven years": dt.timedelta(days=7 * 365),
    "a century": dt.timedelta(days=36500),
}


@pytest.mark.parametrize("span", SPANS.values(), ids=SPANS.keys())
@pytest.mark.parametrize(
    "start", ["2026-12-05T21:48:17", "2025-12-31T23:59:59", "2026-03-29T01:30"]
)
def test_time_axis_labels_never_collide_whatever_the_span(span, start):
    first = timezone.make_aware(dt.datetime.fromisoformat(start))
    left, right = history.LEFT, history.WIDTH - history.RIGHT

    ticks = history.time_axis(first, first + span, left, right)

    assert 2 <= len(ticks) <= 10, [t["label"] for t in ticks]
    extents = [history.label_extent(t) for t in ticks]
    assert all(b[0] - a[1] >= history.LABEL_GAP for a, b in itertools.pairwise(extents))
    assert extents[0][0] >= 8 and extents[-1][1] <= history.WIDTH, "inside the picture"
    labels = [t["label"] for t in ticks]
    assert all(a != b for a, b in itertools.pairwise(labels)), "neighbours tell themselves apart"
    assert [t["x"] for t in ticks] == sorted(t["x"] for t in ticks)
    assert all(left <= t["x"] <= right for t in ticks)


def test_time_axis_ticks_fall_on_round_moments():
    first = timezone.make_aware(dt.datetime(2026, 12, 5, 21, 41, 7))

    minutes = history.time_axis(first, first + dt.timedelta(minutes=8), 100, 696)
    months = history.time_axis(first, first + dt.timedelta(days=92), 100, 696)
    years = history.time_axis(first, first + dt.timedelta(days=7 * 365), 100, 696)

    assert [t["label"] for t in minutes] == ["21:42", "21:43", "21:44", "21:45", "21:46",
                                             "21:47", "21:48", "21:49"]  # fmt: skip
    assert [t["label"] for t in months] == ["Jan 2027", "Feb 2027", "Mar 2027"]
    assert [t["label"] for t in years] == ["2027", "2028", "2029", "2030", "2031", "2032",
                                           "2033"]  # fmt: skip
    one = history.time_axis(first, first, 100, 696)
    assert [(t["label"], t["anchor"]) for t in one] == [("2026-12-05 21:41", "middle")]


@pytest.mark.parametrize(
    ("first", "last", "words"),
    [
        ("2026-12-05T21:40", "2026-12-05T21:48", "5 Dec 2026, 21:40 to 21:48"),
        ("2026-12-04T21:40", "2026-12-05T21:48", "4 Dec 2026 21:40 to 5 Dec 2026 21:48"),
        ("2026-09-07T10:00", "2026-12-05T21:48", "7 Sep to 5 Dec 2026"),
        ("2025-09-07T10:00", "2026-12-05T21:48", "7 Sep 2025 to 5 Dec 2026"),
        ("2026-12-05T21:48", "2026-12-05T21:48", "one value, 5 Dec 2026 21:48"),
    ],
)
def test_the_chart_title_says_the_span_it_shows(first, last, words):
    a, b = (timezone.make_aware(dt.datetime.fromisoformat(m)) for m in (first, last))
    assert history.span_words(a, b) == words


def test_a_range_longer_than_the_history_says_so():
    start = timezone.now() - dt.timedelta(minutes=8)
    points = [
        history.Point(start + i * dt.timedelta(minutes=4), Decimal(1), "USD") for i in range(3)
    ]

    chart = history.line_chart("U1", history.History(points, None), history.chosen_range("3m"))

    assert chart["span"].endswith("(all there is of the last 3 months)")
    assert "the last 3 months" not in chart["title"]


def test_an_account_a_sync_adds_while_the_page_is_read_is_left_for_the_next_one(
    admin_client, values, now, monkeypatch
):
    from ibkr_sync import overview

    read = overview._latest_snapshots

    def and_meanwhile(accounts):
        newcomer = account("U7777777")
        cash(newcomer, "USD", "5", "1")
        held(newcomer, "AAPL", quantity="1", cost_basis="1", market_value="2", unrealized_pnl="1")
        snapshot(newcomer, now, "7")
        return read(accounts)

    monkeypatch.setattr(overview, "_latest_snapshots", and_meanwhile)

    html, data = page(admin_client)

    assert "U7777777" not in [a.external_id for a in data.accounts]
    assert "U1111111" in html


# --- queries --------------------------------------------------------------------------------


def portfolio_of(size: int, now: dt.datetime) -> None:
    """`size` accounts in two base currencies, each with 10 x `size` positions in three
    currencies, cash in each, and 100 x size² snapshots, 3 hours apart (thinned to one a
    day in the longer ranges)."""
    for a in range(size):
        owner = account(f"U{a:07}", base_currency=("USD", "EUR")[a % 2])
        for i in range(10 * size):
            held(owner, f"S{i:03}", ("STK", "OPT")[i % 2], ("USD", "EUR", "JPY")[i % 3],
                 quantity="1", cost_basis=i, market_value=i + 1, unrealized_pnl=1)  # fmt: skip
        for currency, rate in (("USD", "1"), ("EUR", "1.085"), ("JPY", None)):
            cash(owner, currency, 100, rate)
        AccountSnapshot.objects.bulk_create(
            AccountSnapshot(account=owner, taken_at=now - dt.timedelta(hours=3 * d),
                            currency=owner.base_currency, net_liquidation=1000 + d)
            for d in range(100 * size * size)
        )  # fmt: skip


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("query", ["?range=1m", "?range=3m", "?range=1y", "?range=all"])
def test_queries_do_not_grow_with_accounts_positions_or_history(
    admin_client, django_assert_num_queries, now, size, query
):
    portfolio_of(size, now)
    page(admin_client, query)  # warm the session and content-type caches

    # The same number for 1 account with 10 positions and 100 snapshots as for 3 with 30
    # positions and 900 snapshots each (thinned to a day's last but in the last month):
    # no query per row.
    with django_assert_num_queries(OVERVIEW_MAX_QUERIES):
        _, data = page(admin_client, query)

    assert len(data.accounts) == size
    assert all(a.chart is not None for a in data.accounts)
    assert sum(c.total.positions for c in data.currencies) == 10 * size * size
    assert all(len(a.history.points) <= history.MAX_POINTS for a in data.accounts)


# --- the labels are IBKR's -------------------------------------------------------------------


def test_totals_are_in_ibkrs_base_currency_never_the_accounts_field(admin_client, now):
    """The account's field says EUR (edited before it became read-only); IBKR's latest
    values are in USD: the totals are in USD, converted at the rates read in USD."""
    main = account("U1111111", base_currency="EUR")
    snapshot(main, now, "5000", currency="USD", exchange_rates={"EUR": "1.0825", "USD": "1"})
    cash(main, "EUR", "1000", "1.0825", rate_currency="USD")
    cash(main, "USD", "500", "1", rate_currency="USD")
    held(main, "SAP", currency="EUR", quantity="1", cost_basis="90", market_value="100",
         unrealized_pnl="10")  # fmt: skip

    html, data = page(admin_client)

    summary_ = summary(data, "U1111111")
    assert summary_.base_currency == "USD"
    assert summary_.cash_total.amount == Decimal("1582.5")
    section = module(html, f"account-{main.pk}")
    assert "base currency USD" in section
    assert f"1,000.00 EUR {TIMES} 1.0825 = 1,082.50 USD" in section
    assert "1,082.50 EUR" not in section
    assert summary_.market_value.amount == Decimal("108.25")


def test_a_rate_that_does_not_convert_is_shown_with_why_and_not_added(admin_client, now):
    main = account("U1111111")
    snapshot(main, now, "5000", exchange_rates={"USD": "1"})  # no EUR rate that converts
    cash(main, "EUR", "1000", "0", rate_currency="USD")
    cash(main, "USD", "500", "1")
    held(main, "SAP", currency="EUR", quantity="1", cost_basis="90", market_value="100",
         unrealized_pnl="10")  # fmt: skip

    html, data = page(admin_client)

    main_ = summary(data, "U1111111")
    assert main_.cash_total.amount == Decimal("500")
    assert main_.market_value.amount is None
    section = module(html, f"account-{main.pk}").replace("&#x27;", "'")
    assert "1,000.00 EUR: not added (IBKR's EUR rate 0 is not a positive rate)" in section
    assert "100.00 EUR: not added (IBKR's EUR rate 0 is not a positive rate)" in section
    cash_table = re.search(r'<table class="cash">.*?</table>', section, re.S).group()
    assert texts(row(cash_table, 'class="total"')) == ["Total cash", "", "500.00 USD"]


def test_rates_of_the_latest_values_convert_positions_without_cash(admin_client, now):
    main = account("U1111111")
    snapshot(main, now - DAY, "1", exchange_rates={"JPY": "0.0070"})
    snapshot(main, now, "2", exchange_rates={"JPY": "0.0067"})  # the latest: its rates
    held(main, "7203", currency="JPY", quantity="100", cost_basis="250000",
         market_value="287000", unrealized_pnl="37000")  # fmt: skip

    _, data = page(admin_client)

    main_ = summary(data, "U1111111")
    assert main_.cash == []
    assert main_.market_value.amount == Decimal("1922.9")  # 287000 x 0.0067
    assert main_.unrealized_pnl.amount == Decimal("247.9")
