"""Every page of the admin, measured as Chromium lays it out at 1400 x 900 and 1280 x 800
(the admin's sidebar open, as it is at first): nothing cut off or overlapping, every money
figure with its currency, and times that tell rows apart.

- Every table's right edge within its scrolling box and the window, that box not
  scrolling, and the page not wider than the window.
- No element whose text is clipped (its content wider than its box, where overflow hides
  it or an ellipsis cuts it), and no table cell narrower than its content.
- Every filter's choices visible; only a list of more than 15 may scroll.
- A table's header cells side by side, none over the next.
- Money: on a list, a currency column or the code beside each amount; on an object's
  page, the code beside each amount; on the overview, each amount in a row of one
  currency, or with its code.
- Times: a list's moments are shown with their date and time to the minute, so rows
  minutes apart read differently.

At a phone's width (390 x 844), no page is wider than the window: a wide table or chart
scrolls sideways in a box of its own.

The README's pictures of the admin come from here: DOCS_SCREENSHOTS=1 writes them to
docs/images/ (at 1400 x 900; otherwise they go to the test's temporary directory,
checked all the same).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from django.urls import reverse
from playwright.sync_api import Page, expect

from ibkr_sync.models import Connection, SyncRun
from portfolio.models import Account, AccountSnapshot, CashBalance, Instrument, Position
from tests.browser.sample_values import (
    LONG_FAILURE,
    MINUTES_APART,
    TIMEOUT_FAILURE,
    TRUST,
    create_admin_sample,
)
from tests.browser.test_admin_browser import log_in, superuser  # noqa: F401
from tests.browser.test_overview_browser import check_png

pytestmark = pytest.mark.browser

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
SIZES = {"1400x900": (1400, 900), "1280x800": (1280, 800)}

#: Page -> (how to find its URL from the sample, the picture of it in the docs).
MODELS = {
    "account": Account,
    "instrument": Instrument,
    "position": Position,
    "cashbalance": CashBalance,
    "accountsnapshot": AccountSnapshot,
}


def _object(model, sample):
    """The object a page shows: one with the most to show (a closed position, a warrant
    with a strike, the trust's cash and snapshots)."""
    trust = sample[TRUST]
    if model is Account:
        return trust
    if model is Instrument:
        return Instrument.objects.get(sec_type="WAR")
    if model is Position:
        return Position.objects.get(account=trust, instrument__sec_type="FUT")
    return model.objects.filter(account=trust).order_by("pk").last()


def url_of(name: str, sample) -> str:
    runs = sample["runs"]
    if name == "index":
        return reverse("admin:index")
    if name == "overview":
        return reverse("admin:portfolio_overview")
    if name == "sync run list":
        return reverse("admin:ibkr_sync_syncrun_changelist")
    if name == "connection list":
        # A row, so that the list shows its actions (a test of the connections).
        Connection.objects.get_or_create(name="paper", defaults={"port": 4002, "client_id": 7})
        return reverse("admin:ibkr_sync_connection_changelist")
    if name == "failed sync run":
        return reverse("admin:ibkr_sync_syncrun_change", args=[runs[1].pk])
    if name == "sync run":
        return reverse("admin:ibkr_sync_syncrun_change", args=[runs[2].pk])
    model_name, kind = name.split(" ")
    model = MODELS[model_name]
    if kind == "list":
        url = reverse(f"admin:portfolio_{model_name}_changelist")
        return url + ("?status=all" if model is Position else "")
    return reverse(f"admin:portfolio_{model_name}_change", args=[_object(model, sample).pk])


PAGES = [
    "index",
    "overview",
    *(f"{name} {kind}" for name in MODELS for kind in ("list", "page")),
    "sync run list",
    "failed sync run",
    "sync run",
    "connection list",
]
#: The docs' pictures, taken at 1400 x 900.
DOCS = {
    "index": "admin-index.png",
    "sync run list": "sync-runs.png",
    "failed sync run": "sync-run.png",
    "position list": "positions.png",
}

#: A filter with up to this many choices shows them all, unscrolled.
FULLY_SHOWN = 15

LAYOUT = """FULLY_SHOWN => {
    const win = window.innerWidth, problems = [];
    const problem = (...what) => problems.push(what);
    const name = e => e.id ? '#' + e.id : [e.tagName.toLowerCase(), ...e.classList].join('.');
    const text = e => (e.innerText || '').trim().slice(0, 40);
    const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
    const shown = e => e.offsetParent && !e.closest('.visually-hidden, svg');
    const page = document.documentElement.scrollWidth;
    if (page > win) problem('page wider than the window', page);
    for (const table of document.querySelectorAll('#content table')) {
        if (!shown(table)) continue;  // folded away (a closed <details>)
        let box = table.parentElement;
        while (box !== document.body && !scrolls(box)) box = box.parentElement;
        const boxed = box !== document.body;
        const right = table.getBoundingClientRect().right;
        const limit = boxed ? Math.min(box.getBoundingClientRect().right, win) : win;
        if (right > limit + 1) problem('table past its box', name(table), right, limit);
        if (boxed && box.scrollWidth > box.clientWidth + 1) problem('table scrolls', name(table));
        const heads = [...table.querySelectorAll('thead th')].map(
            th => th.getBoundingClientRect());
        for (let i = 1; i < heads.length; i++) {
            if (heads[i - 1].right > heads[i].left + 1) problem('headers overlap', name(table), i);
        }
        for (const cell of table.querySelectorAll('th, td')) {
            if (shown(cell) && cell.scrollWidth > cell.clientWidth + 1) {
                problem('cell clipped', name(cell), text(cell));
            }
        }
    }
    for (const e of document.querySelectorAll('body *')) {
        if (!shown(e)) continue;
        const style = getComputedStyle(e);
        const hides = ['hidden', 'clip'].includes(style.overflowX)
            || style.textOverflow === 'ellipsis';
        if (hides && e.scrollWidth > e.clientWidth + 1 && text(e)) {
            problem('text clipped', name(e), text(e));
        }
        const r = e.getBoundingClientRect();
        if (r.width && r.right > win + 1) problem('past the window', name(e), text(e), r.right);
    }
    for (const list of document.querySelectorAll('#changelist-filter ul')) {
        const scrollable = ['auto', 'scroll'].includes(getComputedStyle(list).overflowY);
        if (list.scrollHeight > list.clientHeight + 1 && !scrollable) {
            problem('filter cut', text(list));
        }
        // A short list shows every choice (a scroll bar may not show until scrolled:
        // overlay scroll bars); only a long one may scroll.
        const box = list.getBoundingClientRect(), choices = list.querySelectorAll('li');
        const mayScroll = scrollable && choices.length > FULLY_SHOWN;
        for (const li of choices) {
            const r = li.getBoundingClientRect();
            const inside = r.top >= box.top - 1 && r.bottom <= box.bottom + 1
                && r.right <= box.right + 1;
            if (!inside && !mayScroll) problem('filter choice hidden', text(li));
        }
    }
    for (const label of document.querySelectorAll('#content label, #content .readonly')) {
        const r = label.getBoundingClientRect();
        if (r.width && r.right > win + 1) problem('label past the window', text(label));
    }
    return problems;
}"""

CODE = re.compile(r"\b[A-Z]{3}\b")
#: Figures on an object's page that are not money: a quantity, a multiplier, a rate.
NOT_MONEY = ("quantity_display", "multiplier_display", "exchange_rate_display")


def money_without_currency(page: Page, name: str) -> list[str]:
    """The amounts the page shows without their currency."""
    if name == "overview":
        # Each amount (exact on hover) in a row of one currency, or naming its currency.
        cells = page.locator("#content td.num[title]").evaluate_all(
            """cells => cells.filter(c => c.offsetParent).map(c => [
                !!c.closest('tr[data-currency]'), c.innerText.trim()])"""
        )
        return [text for in_row, text in cells if not in_row and not CODE.search(text)]
    missing = []
    if name.endswith(" list"):
        for row in page.locator("#result_list tbody tr").all():
            cells = row.locator("td:has(span.num[title])").evaluate_all(
                "cells => cells.map(c => [c.className, c.innerText.trim()])"
            )
            has_column = row.locator("td.field-currency").count() == 1
            currency = row.locator("td.field-currency").inner_text() if has_column else ""
            for cls, text in cells:
                if any(f"field-{field}" in cls for field in NOT_MONEY):
                    continue
                if not CODE.fullmatch(currency.strip()) and not CODE.search(text):
                    missing.append(f"{cls}: {text}")
    else:
        rows = page.locator("#content .form-row:has(.readonly span.num[title])").evaluate_all(
            """rows => rows.map(r => [r.className, r.querySelector('.readonly').innerText.trim(),
                                      !!r.querySelector('.readonly .currency')])"""
        )
        for cls, text, has_code in rows:
            if any(f"field-{field}" in cls for field in NOT_MONEY):
                continue
            if not has_code and not CODE.search(text):
                missing.append(f"{cls}: {text}")
    # A table of changes: a currency column for the average costs.
    for table in page.locator(".ibkr-changes table").all():
        heads = table.locator("thead th").all_inner_texts()
        if not any(h.strip().lower() == "currency" for h in heads):
            missing.append("changes table without a currency column")
    return missing


@pytest.fixture
def sample(superuser):  # noqa: F811
    return create_admin_sample()


@pytest.mark.parametrize("size", SIZES, ids=SIZES)
@pytest.mark.parametrize("name", PAGES)
def test_every_admin_page_fits_and_says_its_currencies(page, sample, name, size, tmp_path):
    width, height = SIZES[size]
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, "root")

    response = page.goto(url_of(name, sample))

    assert response.status == 200
    problems = page.evaluate(LAYOUT, FULLY_SHOWN)
    assert problems == [], f"{name}: {problems}"
    assert money_without_currency(page, name) == []
    # Times in a list to the minute, with their date: never the admin's "9:48 p.m.".
    if name.endswith(" list"):
        assert not re.search(r"\d:\d\d [ap]\.m\.", page.locator("#result_list").inner_text())
        whens = page.locator("#result_list time.when").evaluate_all(
            "ts => ts.map(t => [t.getAttribute('datetime').slice(0, 16), t.innerText])"
        )
        assert len({text for _, text in whens}) == len({moment for moment, _ in whens}), whens
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", text) for _, text in whens)

    if size == "1400x900" and name in DOCS:
        if os.environ.get("DOCS_SCREENSHOTS") == "1":
            target = DOCS_IMAGES / DOCS[name]
        else:
            target = tmp_path / DOCS[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        check_png(page.screenshot(path=str(target)))


@pytest.mark.parametrize("size", SIZES, ids=SIZES)
def test_the_indexs_overview_link_is_a_readable_block_at_the_top(page, superuser, size):  # noqa: F811
    width, height = SIZES[size]
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, "root")

    block = page.locator("#portfolio-overview-link")
    link = block.get_by_role("link", name="Portfolio overview")
    expect(link).to_be_visible()
    box, first_app = link.bounding_box(), page.locator("#content-main .module").first
    # One line, as wide as its words, above the apps.
    assert box["width"] > 100 and box["height"] < 50, box
    assert block.bounding_box()["y"] < first_app.bounding_box()["y"]
    assert block.bounding_box()["y"] + block.bounding_box()["height"] < height


@pytest.mark.parametrize("size", SIZES, ids=SIZES)
def test_the_sync_run_list_shows_a_failures_reason_and_every_count(page, sample, size):
    width, height = SIZES[size]
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, "root")
    page.goto(reverse("admin:ibkr_sync_syncrun_changelist"))

    failed = page.locator("#result_list tbody tr", has_text="gateway_unavailable")
    error = failed.locator("td.field-error")
    expect(error).to_be_in_viewport()
    text = error.inner_text()
    assert text.startswith("gateway_unavailable Cannot connect to the IB gateway at")
    assert 60 <= len(text) < len(LONG_FAILURE), "cut to a readable length"
    expect(error.locator("span")).to_have_attribute("title", LONG_FAILURE)
    changed = page.locator("#result_list tbody tr", has_text="re-opened")
    counts = changed.locator("td.field-counts")
    expect(counts).to_have_text("15 positions: 2 updated, 1 re-opened, 1 closed, 11 unchanged")
    for cell in ("counts", "duration", "error"):
        expect(changed.locator(f"td.field-{cell}")).to_be_in_viewport(ratio=1)
    # Runs minutes apart read differently.
    started = page.locator("#result_list td.field-started").all_inner_texts()
    assert len(set(started)) == len(started) == SyncRun.objects.count()
    assert MINUTES_APART >= 1


@pytest.mark.parametrize("size", SIZES, ids=SIZES)
def test_a_sync_runs_page_reads_outcome_accounts_changes_then_diagnostics(page, sample, size):
    width, height = SIZES[size]
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, "root")
    failed, changed = sample["runs"][3], sample["runs"][2]

    page.goto(reverse("admin:ibkr_sync_syncrun_change", args=[failed.pk]))
    # The outcome first: the status, then the error, whole and in the first screen.
    rows = page.locator("#content fieldset").first.locator(".form-row")
    expect(rows.first).to_have_class(re.compile(r"\bfield-status_badge\b"))
    expect(rows.nth(1).locator(".ibkr-error code")).to_have_text("gateway_timeout")
    expect(rows.nth(1).locator(".ibkr-error p")).to_have_text(TIMEOUT_FAILURE)
    expect(rows.nth(1).locator(".ibkr-error")).to_be_in_viewport(ratio=1)
    # No JSON, no lock internals among what a person reads: they are folded away.
    diagnostics = page.locator("fieldset:has(h2:text('Diagnostics')) details")
    expect(diagnostics).not_to_have_attribute("open", "")
    for internal in ("owner", "pid", "heartbeat_at", "database_session", "raw_record"):
        expect(page.locator(f".form-row.field-{internal}")).not_to_be_visible()
    diagnostics.locator("summary").click()
    expect(page.locator(".form-row.field-owner")).to_be_visible()
    expect(page.locator(".field-raw_record pre")).to_contain_text('"account_values"')

    page.goto(reverse("admin:ibkr_sync_syncrun_change", args=[changed.pk]))
    expect(page.locator(".form-row.field-error_box")).to_have_count(0)
    order = page.locator(
        "#content fieldset h2, #content fieldset .form-row, #sync-run-changes"
    ).evaluate_all(
        "es => es.map(e => e.tagName === 'H2' ? e.textContent.trim() : e.id "
        "|| [...e.classList].find(c => c.startsWith('field-')))"
    )
    assert order.index("field-status_badge") < order.index("field-accounts_display")
    assert order.index("field-values_outcome") < order.index("field-counts")
    assert order.index("field-counts") < order.index("sync-run-changes")
    assert order.index("sync-run-changes") < order.index("Diagnostics")
    values = page.locator(".field-values_outcome li")
    expect(values).to_have_count(3)
    expect(values.nth(1)).to_contain_text("DU7654321 values missing no account values")
    expect(page.locator(".field-accounts_display .readonly")).to_have_text(
        "U1234567, DU7654321, U7777777"
    )
    expect(page.locator(".field-counts .readonly")).to_have_text(
        "15 positions: 2 updated, 1 re-opened, 1 closed, 11 unchanged"
    )
    expect(page.locator("#sync-run-changes tbody tr")).to_have_count(4)


#: A phone held upright: the admin's own lists scroll sideways inside their box there.
PHONE = (390, 844)

WIDER_THAN_THE_WINDOW = """() => {
    const win = window.innerWidth, wide = [];
    const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
    for (const e of document.querySelectorAll('#content *')) {
        const r = e.getBoundingClientRect();
        if (!r.width || r.right <= win + 1) continue;
        let box = e.parentElement;
        while (box && box !== document.body && !scrolls(box)) box = box.parentElement;
        if (box === document.body || !box) {
            wide.push([e.tagName.toLowerCase(), ...e.classList].join('.'));
        }
    }
    return [document.documentElement.scrollWidth, [...new Set(wide)].slice(0, 5)];
}"""


@pytest.mark.parametrize("name", PAGES)
def test_every_admin_page_fits_a_phone_held_upright(page, sample, name):
    """At a phone's width nothing makes the page wider than the window: a wide table
    scrolls sideways in a box of its own (as the admin's lists do), the page does not."""
    width, height = PHONE
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, "root")

    response = page.goto(url_of(name, sample))

    assert response.status == 200
    page_width, wide = page.evaluate(WIDER_THAN_THE_WINDOW)
    assert (page_width, wide) == (width, []), name
