"""The admin in a real browser: log in, browse positions, "Sync now" through the real IB
client against the simulator, see what the sync changed, and a failed sync."""

from __future__ import annotations

import re
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from ibkr_sync.models import SyncRun
from tests.integration.conftest import ACCOUNT, OTHER, sim_position

pytestmark = [pytest.mark.browser, pytest.mark.integration]

PASSWORD = "pw-root-browser-123"
ES_CON_ID = 495512551


@pytest.fixture
def superuser(transactional_db, django_user_model, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


def log_in(page: Page, username: str) -> None:
    """Through the admin login form, as a person would."""
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/"))
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("#login-form [type=submit]")
    expect(page.locator("#user-tools")).to_contain_text(f"Welcome, {username}", ignore_case=True)


def open_admin_page(page: Page, section: str, link: str) -> None:
    """Follow a model link in a section of the admin index's app list."""
    module = page.locator("div.module").filter(has=page.locator("caption", has_text=section))
    module.get_by_role("link", name=link, exact=True).first.click()
    expect(page.locator("#content h1")).to_have_text(re.compile(f"^Select {link[:-1].lower()} to"))


def sync_now(page: Page, account: str = "") -> Locator:
    """Press "Sync now from IBKR" (for all accounts, or one); return the message it leaves."""
    form = page.locator("form.ibkr-sync-now")
    form.locator("select[name=ibkr_account_id]").select_option(account)
    with page.expect_navigation():
        form.get_by_role("button", name="Sync now from IBKR").click()
    messages = page.locator("ul.messagelist > li")
    expect(messages).to_have_count(1)
    return messages.first


def rows(page: Page) -> list[dict[str, str]]:
    """The changelist's rows as {column: displayed text}, columns named by list_display."""
    return page.locator("#result_list tbody tr").evaluate_all(
        """rows => rows.map(row => Object.fromEntries(
            [...row.querySelectorAll("td[class^='field-'], th[class^='field-']")].map(
                cell => [cell.className.split(' ')[0].replace('field-', ''), cell.innerText.trim()]
            )))"""
    )


def symbols(page: Page) -> list[str]:
    return sorted(row["symbol"] for row in rows(page))


def choose_filter(page: Page, title: str, choice: str) -> None:
    with page.expect_navigation():
        page.locator(f"details[data-filter-title='{title}']").get_by_role(
            "link", name=choice, exact=True
        ).click()


def screenshot(page: Page, path: Path) -> bytes:
    data = page.screenshot(path=str(path), full_page=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1400 and height >= 600, (width, height)
    assert len(data) > 20_000, "a blank page would compress to a few kilobytes"
    return data


def test_sync_now_from_positions_then_filter_and_see_what_changed(page, superuser, ibkr, tmp_path):
    log_in(page, "root")
    open_admin_page(page, "Portfolio", "Positions")
    assert rows(page) == []

    message = sync_now(page)

    run = SyncRun.objects.get()
    expect(message).to_have_class(re.compile(r"\bsuccess\b"))
    expect(message).to_have_text(
        f"Sync #{run.pk} finished: 4 positions in 3 account(s); 4 created, 0 updated, "
        "0 unchanged, 0 reopened, 0 closed, 0 errors."
    )
    expect(page).to_have_url(re.compile(r"/admin/portfolio/position/$"))
    # The option's OCC local symbol has padding spaces that HTML collapses on screen.
    assert symbols(page) == ["AAPL", "ESZ6", "SPY 261218C00600000", "TSLA"]
    tsla = next(row for row in rows(page) if row["symbol"] == "TSLA")
    assert (tsla["account_label"], tsla["sec_type"], tsla["currency"]) == (
        ACCOUNT, "STK", "USD"
    )  # fmt: skip
    # Quantities exactly, prices to 4 decimals, amounts in cents: exact on hover.
    assert (
        tsla["quantity_display"], tsla["average_cost_display"], tsla["cost_basis_display"]
    ) == ("0.12345678", "242.1235", "29.89")  # fmt: skip
    cost_basis = page.locator("#result_list tr", has_text="TSLA").locator(
        "td.field-cost_basis_display .num"
    )
    expect(cost_basis).to_have_attribute("title", "29.8917822402")

    # At IBKR: the ES future is closed, 5 more AAPL are bought, and some BMW in euros.
    ibkr.remove_position(ACCOUNT, ES_CON_ID)
    ibkr.upsert_position(sim_position(quantity="15", average_cost=Decimal("160.5")))
    ibkr.upsert_position(
        sim_position(account=OTHER, con_id=14, symbol="BMW", currency="EUR", exchange="IBIS",
                     quantity="40", average_cost=Decimal("98.76"))
    )  # fmt: skip
    message = sync_now(page)
    expect(message).to_have_text(
        re.compile(
            r"Sync #\d+ finished: 4 positions in 3 account\(s\); 1 created, 1 updated, "
            r"2 unchanged, 0 reopened, 1 closed, 0 errors\."
        )
    )
    # Closed positions are hidden by default, one click away.
    assert symbols(page) == ["AAPL", "BMW", "SPY 261218C00600000", "TSLA"]
    expect(page.locator("details[data-filter-title='status'] li.selected")).to_have_text("Open")
    choose_filter(page, "status", "Closed")
    assert symbols(page) == ["ESZ6"]
    choose_filter(page, "status", "All")
    assert symbols(page) == ["AAPL", "BMW", "ESZ6", "SPY 261218C00600000", "TSLA"]

    # The page really rendered, styled by the admin's CSS (served by the live server).
    header_color = page.locator("#header").evaluate("e => getComputedStyle(e).backgroundColor")
    assert header_color not in ("", "rgba(0, 0, 0, 0)")
    screenshot(page, tmp_path / "positions.png")

    # The history: both runs, with their badges; the second one's page lists its changes.
    open_admin_page(page, "IBKR sync", "Sync runs")
    badges = page.locator("#result_list td.field-status_badge .ibkr-badge")
    expect(badges).to_have_text(["Success", "Success"])
    assert badges.first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    second = SyncRun.objects.latest()
    with page.expect_navigation():
        page.get_by_role("link", name=str(second.pk), exact=True).click()
    expect(page.locator("#content h1")).to_have_text("View sync run")
    changes = page.locator("#sync-run-changes tbody tr")
    expect(changes).to_have_count(3)
    assert [row.locator("td").all_inner_texts() for row in changes.all()] == [
        ["Updated", ACCOUNT, "AAPL", "STK", "USD", "10", "15", "150.25", "160.5"],
        ["Closed", ACCOUNT, "ESZ6", "FUT", "USD", "-2", "-", "251234.5", "-"],
        ["Created", OTHER, "BMW", "STK", "EUR", "-", "40", "-", "98.76"],
    ]
    screenshot(page, tmp_path / "sync-run.png")

    # The overview, from the admin index: one total per currency, never added together.
    page.goto("/admin/")
    screenshot(page, tmp_path / "index.png")
    with page.expect_navigation():
        page.get_by_role("link", name="Portfolio overview").click()
    expect(page.locator("#content h1")).to_have_text("Portfolio overview")
    totals = page.locator("#by-currency tbody tr")
    # Currency, open positions, net cost basis, without a cost basis (then IBKR's values).
    assert [row.locator("th, td").all_inner_texts()[:4] for row in totals.all()] == [
        ["EUR", "1", "3,950.40", "0"],
        ["USD", "3", "3,974.41", "0"],  # 2407.5 + 29.8917822402 + 1537.02
    ]
    expect(page.locator("#by-currency svg[role=img]")).to_have_count(2)
    expect(page.locator("#ibkr-sync-status")).to_contain_text(
        f"Last successful IBKR sync: #{second.pk}"
    )
    expect(page.locator("#ibkr-sync-status .warning")).to_have_count(0)
    screenshot(page, tmp_path / "overview.png")


def test_sync_now_with_the_gateway_down(page, superuser, ibkr, settings):
    ibkr.stop_thread()
    log_in(page, "root")
    open_admin_page(page, "Portfolio", "Accounts")

    message = sync_now(page)

    expect(message).to_have_class(re.compile(r"\berror\b"))
    expect(message).to_contain_text(re.compile(r"^Sync failed: "))
    expect(message).to_contain_text(f"127.0.0.1:{settings.IBKR_PORT}")
    expect(page).to_have_url(re.compile(r"/admin/portfolio/account/$"))
    run = SyncRun.objects.get()
    assert (run.status, run.trigger, run.error_code) == ("failed", "admin", "gateway_unavailable")

    page.goto("/admin/portfolio/position/overview/")
    warning = page.locator("#ibkr-sync-status .warning")
    expect(warning).to_contain_text(f"The latest IBKR sync, #{run.pk}")
    expect(warning).to_contain_text(f"failed: {run.error_message}")
    expect(page.locator("#ibkr-sync-status")).to_contain_text("No successful IBKR sync yet.")
