"""IBKR's values in a real browser: the overview's net liquidation history chart and its
ranges, the conversions, and the positions list fitting a 1400 px wide window, every
column visible and no cell clipped.

The overview's screenshot in the docs comes from here: DOCS_SCREENSHOTS=1 writes it to
docs/images/overview.png (otherwise it goes to the test's temporary directory, checked
all the same).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from ibkr_sync import history
from ibkr_sync.admin import PositionAdmin
from ibkr_sync.decimals import money
from ibkr_sync.overview import TIMES
from portfolio.models import Account, AccountSnapshot
from tests.browser.sample_values import (
    HISTORY_DAYS,
    MAIN,
    PAPER,
    create_sample_values,
    net_liquidation,
)
from tests.browser.test_admin_browser import log_in, rows, superuser  # noqa: F401
from tests.values import held

pytestmark = pytest.mark.browser

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "overview.png"
WINDOW = {"width": 1400, "height": 900}
OVERVIEW = "/admin/portfolio/position/overview/"

# Where the positions list stands in the window: the table's and its scrolling box's
# right edges, the page's width, and any cell whose content is wider than the cell.
LAYOUT = """() => {
    const table = document.querySelector('#result_list');
    const cells = [...table.querySelectorAll('th, td')];
    return {
        window: window.innerWidth,
        page: document.documentElement.scrollWidth,
        table: table.getBoundingClientRect().right,
        box: table.closest('.results').getBoundingClientRect().right,
        boxScrolls: table.closest('.results').scrollWidth > table.closest('.results').clientWidth,
        headers: [...table.querySelectorAll('thead th')].map(th => [
            th.className, th.getBoundingClientRect().left, th.getBoundingClientRect().right,
        ]),
        clipped: cells.filter(c => c.scrollWidth > c.clientWidth).map(c => c.className),
    };
}"""


@pytest.fixture
def valued(superuser):  # noqa: F811
    return create_sample_values()


def points(page: Page, account_pk: int) -> int:
    return int(page.locator(f"#account-{account_pk} figure.history").get_attribute("data-points"))


def expected_points(account_pk: int, key: str) -> int:
    """What the server draws for the range: every snapshot, or the last of each period."""
    since = history.range_start(history.chosen_range(key))
    return len(history.histories(since)[account_pk].points)


def drawn_span(account_pk: int, key: str) -> str:
    """What the chart of a range says it spans: its first point to its last."""
    drawn = history.histories(history.range_start(history.chosen_range(key)))[account_pk]
    return history.span_words(drawn.points[0].taken_at, drawn.points[-1].taken_at)


def check_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert struct.unpack(">II", data[16:24]) == (WINDOW["width"], WINDOW["height"])
    assert 40_000 < len(data) < 400_000, "a blank page would compress to a few kilobytes"


def test_overview_charts_the_net_liquidation_and_switches_ranges(page, valued, tmp_path):
    main, paper = valued[MAIN].pk, valued[PAPER].pk
    page.set_viewport_size(WINDOW)
    log_in(page, "root")
    page.goto(OVERVIEW)

    account = page.locator(f"#account-{main}")
    expect(account.locator(".net-liquidation strong")).to_have_text(
        f"{money(net_liquidation(HISTORY_DAYS - 1))} USD"
    )
    chart = account.locator("figure.history svg[role=img]")
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box["width"] >= 600 and box["height"] >= 200, box
    assert box["x"] + box["width"] <= WINDOW["width"]
    assert account.locator("path.line").evaluate("p => p.getTotalLength()") > 500
    # The default range is 3M: the last value of each day (more than MAX_POINTS would be
    # thinned; three months of daily snapshots are not).
    expect(page.locator(".history-ranges a.selected")).to_have_text("3M")
    assert 88 <= points(page, main) <= 93
    assert points(page, main) == expected_points(main, "3m")
    # The caption says the span drawn: three months back from today.
    expect(account.locator("figcaption")).to_have_text(
        re.compile(r"Net liquidation, USD, \d+ \w{3} (\d{4} )?to \d+ \w{3} \d{4}")
    )

    # Readable axes: 12 px labels, the dates side by side without overlapping, all inside.
    labels = account.locator("svg text.x-label")
    count = labels.count()
    assert 3 <= count <= 10
    boxes = [labels.nth(i).bounding_box() for i in range(count)]
    assert all(a["x"] + a["width"] <= b["x"] for a, b in itertools.pairwise(boxes))
    assert all(box["x"] <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"] for b in boxes)
    size = account.locator("svg text.y-label").first.evaluate("t => getComputedStyle(t).fontSize")
    assert float(size.removesuffix("px")) >= 12
    # The title and description a screen reader announces.
    assert chart.get_attribute("aria-labelledby") == f"history-title-{main} history-desc-{main}"
    expect(page.locator(f"#history-desc-{main}")).to_contain_text("values (every value) from")

    # One snapshot: one point with its value.
    other = page.locator(f"#account-{paper}")
    expect(other.locator("figure.history circle.point")).to_have_count(1)
    expect(other.locator("svg text.point-label")).to_have_text("51,234.50 EUR")

    # Cash and positions converted at IBKR's rates, the conversion shown; the yen not added.
    expect(account.locator("table.cash tr[data-currency=EUR] td.conversion")).to_have_text(
        f"1,000.00 EUR {TIMES} 1.0850 = 1,085.00 USD"
    )
    expect(account.locator("table.cash tr[data-currency=JPY] td.conversion")).to_contain_text(
        "not added"
    )
    expect(account.locator("table.in-base tr[data-currency=EUR] td").first).to_have_text(
        f"9,056.00 EUR {TIMES} 1.0850 = 9,825.76 USD"
    )

    # The picture for the docs: the top of the page, as a 1400 x 900 window shows it.
    target = DOCS_SCREENSHOT if os.environ.get("DOCS_SCREENSHOTS") == "1" else tmp_path / "o.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    check_png(page.screenshot(path=str(target)))

    for label, key in (("1M", "1m"), ("1Y", "1y"), ("All", "all"), ("3M", "3m")):
        caption = drawn_span(main, key)
        with page.expect_navigation():
            page.locator(".history-ranges").get_by_role("link", name=label, exact=True).click()
        assert page.url.endswith(f"?range={key}")
        expect(page.locator(".history-ranges a[aria-current=page]")).to_have_text(label)
        expect(account.locator("figcaption")).to_have_text(f"Net liquidation, USD, {caption}")
        expect(account.locator("figure.history svg")).to_be_visible()
        assert points(page, main) == expected_points(main, key), key
        if key == "1m":
            assert 28 <= points(page, main) <= 31
            expect(account.locator("circle.point")).to_have_count(points(page, main))
        elif key in ("1y", "all"):
            # Over 300 daily snapshots: the last of each week, thinned in the database.
            assert points(page, main) <= history.MAX_POINTS // 4
            expect(page.locator(f"#history-desc-{main}")).to_contain_text(
                "the last value of each week"
            )


def test_every_column_of_the_positions_list_fits_a_1400px_window(page, valued):
    # The largest figures a private portfolio shows, beside the sample's long decimals.
    held(valued[MAIN], "IEF", currency="USD", quantity="1000000", cost_basis="99999999.99",
         market_value="98765432.1", unrealized_pnl="-1234567.89", average_cost="99.99999999",
         market_price="98.7654321")  # fmt: skip
    page.set_viewport_size(WINDOW)
    log_in(page, "root")
    page.goto("/admin/portfolio/position/?status=all")
    expect(page.locator("#result_list tbody tr")).to_have_count(10)

    layout = page.evaluate(LAYOUT)

    assert layout["page"] <= layout["window"], "no horizontal scrolling of the page"
    assert layout["table"] <= layout["box"] <= layout["window"], layout
    assert not layout["boxScrolls"], "no column hidden behind the list's scroll bar"
    assert layout["clipped"] == [], "no cell clipped"
    assert len(layout["headers"]) == len(PositionAdmin.list_display)
    for name, left, right in layout["headers"]:
        assert 0 <= left < right <= layout["window"], name
    # Numbers right-aligned, grouped, rounded only on screen: the exact value on hover.
    ief = next(row for row in rows(page) if row["symbol"] == "IEF")
    assert (ief["market_value_display"], ief["unrealized_pnl_display"]) == (
        "98,765,432.10", "-1,234,567.89"
    )  # fmt: skip
    vti = page.locator("#result_list tr", has_text="VTI")
    price = vti.locator("td.field-market_price_display .num")
    expect(price).to_have_text("234.5679")
    expect(price).to_have_attribute("title", "234.5678901234")
    assert price.evaluate("e => getComputedStyle(e).textAlign") == "right"
    align = "e => getComputedStyle(e).textAlign"
    assert page.locator("#result_list th.column-market_value_display .text").evaluate(align) == (
        "right"
    )
    assert page.locator("#result_list th.column-account_label .text").evaluate(align) != "right"


AXIS_SPANS = {
    "minutes": dt.timedelta(minutes=8),
    "a day": dt.timedelta(hours=26),
    "three months": dt.timedelta(days=92),
    "seven years": dt.timedelta(days=7 * 365),
}


@pytest.mark.parametrize("span", AXIS_SPANS.values(), ids=AXIS_SPANS.keys())
def test_the_time_axis_labels_never_overlap_in_the_browser(page, superuser, span):  # noqa: F811
    """Measured as drawn: each date label's box, side by side and inside the picture,
    whether the history spans minutes or years."""
    now = timezone.now()
    owner = Account.objects.create(broker="ibkr", external_id="U5550001", base_currency="USD")
    AccountSnapshot.objects.bulk_create(
        AccountSnapshot(account=owner, taken_at=now - span * (1 - i / 40), currency="USD",
                        net_liquidation=Decimal(100_000 + 37 * i))
        for i in range(41)
    )  # fmt: skip
    page.set_viewport_size(WINDOW)
    log_in(page, "root")
    page.goto(OVERVIEW + "?range=all")

    chart = page.locator(f"#account-{owner.pk} figure.history svg")
    frame = chart.bounding_box()
    labels = chart.locator("text.x-label")
    boxes = [labels.nth(i).bounding_box() for i in range(labels.count())]
    assert len(boxes) >= 2
    assert all(a["x"] + a["width"] <= b["x"] for a, b in itertools.pairwise(boxes)), boxes
    assert all(
        frame["x"] <= b["x"] and b["x"] + b["width"] <= frame["x"] + frame["width"] for b in boxes
    )
    expect(page.locator(f"#account-{owner.pk} figcaption")).to_have_text(
        f"Net liquidation, USD, {history.span_words(now - span, now)}"
    )
