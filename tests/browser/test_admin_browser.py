"""The admin in a real browser: log in, "Sync now" through the real IB client against the
simulator, then browse the synced positions (filter, search), and a failed sync."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from ibkr_sync.models import SyncRun
from tests.integration.conftest import ACCOUNT

pytestmark = [pytest.mark.browser, pytest.mark.integration]

PASSWORD = "pw-root-browser-123"
WAIT = 15  # seconds; a sync against the simulator takes well under one
ES_CON_ID = 495512551


@pytest.fixture
def superuser(transactional_db, django_user_model, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


def load_after(browser: WebDriver, action: Callable[[], object]) -> None:
    """Do something that loads a new page, and wait until the new page is there.

    The old page is tagged first; the new one has no tag. While the page changes,
    chromedriver may answer with transient errors (a stale or detached node): the wait
    retries those until the timeout.
    """
    browser.execute_script("window.leftByTest = true")
    action()
    WebDriverWait(
        browser, WAIT, poll_frequency=0.05, ignored_exceptions=(WebDriverException,)
    ).until(
        lambda b: b.execute_script(
            "return window.leftByTest === undefined && document.readyState === 'complete'"
        ),
        "the next page did not load",
    )


def click_and_load(browser: WebDriver, element: WebElement) -> None:
    load_after(browser, element.click)


def log_in(browser: WebDriver, live_server, username: str) -> None:
    """Through the admin login form, as a person would."""
    browser.get(f"{live_server.url}/admin/")
    assert "/admin/login/" in browser.current_url
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]"))
    assert (
        browser.find_element(By.ID, "user-tools")
        .text.upper()
        .startswith(f"WELCOME, {username.upper()}")
    )


def open_admin_page(browser: WebDriver, section: str, link: str) -> None:
    """Follow a model link in a section of the admin's app list (index page or sidebar)."""
    anchor = browser.find_element(
        By.XPATH,
        f"//div[contains(@class, 'module')][.//caption//a[normalize-space()='{section}']]"
        f"//th//a[normalize-space()='{link}']",
    )
    click_and_load(browser, anchor)
    heading = browser.find_element(By.CSS_SELECTOR, "#content h1").text
    assert heading.startswith(f"Select {link[:-1].lower()} to "), heading


def sync_now(browser: WebDriver) -> WebElement:
    """Press "Sync now from IBKR" for all accounts; return the message it leaves."""
    box = browser.find_element(By.CSS_SELECTOR, "#ibkr-sync-now input[name=ibkr_account_id]")
    box.clear()
    assert box.get_attribute("value") == ""
    button = browser.find_element(
        By.XPATH, "//form[@id='ibkr-sync-now']//button[normalize-space()='Sync now from IBKR']"
    )
    click_and_load(browser, button)
    assert browser.current_url.endswith("/admin/ibkr_sync/syncrun/")
    messages = browser.find_elements(By.CSS_SELECTOR, "ul.messagelist > li")
    assert len(messages) == 1, [m.text for m in messages]
    return messages[0]


def rows(browser: WebDriver) -> list[dict[str, str]]:
    """The changelist's rows as {column: displayed text}, columns named by list_display."""
    table = []
    for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr"):
        cells = row.find_elements(By.CSS_SELECTOR, "td[class^='field-'], th[class^='field-']")
        table.append(
            {
                cell.get_attribute("class").split()[0].removeprefix("field-"): cell.text
                for cell in cells
            }
        )
    return table


def is_open_icons(browser: WebDriver) -> dict[str, str]:
    """symbol -> the alt text of the boolean "open" icon ("True" / "False")."""
    icons = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr"):
        symbol = row.find_element(By.CSS_SELECTOR, ".field-symbol").text
        icons[symbol] = row.find_element(By.CSS_SELECTOR, ".field-is_open img").get_attribute("alt")
    return icons


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sync_now_then_browse_positions(fresh_browser, live_server, superuser, ibkr, tmp_path):
    browser = fresh_browser
    log_in(browser, live_server, "root")
    open_admin_page(browser, "IBKR sync", "Sync runs")
    assert rows(browser) == []

    message = sync_now(browser)

    run = SyncRun.objects.get()
    assert "success" in message.get_attribute("class")
    assert message.text == (
        f"Sync #{run.pk} finished: 4 positions in 3 account(s); 4 created, 0 updated, "
        "0 unchanged, 0 reopened, 0 closed, 0 errors."
    )
    (listed,) = rows(browser)
    assert (listed["id"], listed["status"], listed["trigger"], listed["user"]) == (
        str(run.pk), "Success", "Admin", "root"
    )  # fmt: skip
    assert (listed["processed"], listed["created"], listed["closed"]) == ("4", "4", "0")

    # The ES future is closed at IBKR: a second sync closes it, and it stays listed.
    ibkr.remove_position(ACCOUNT, ES_CON_ID)
    message = sync_now(browser)
    assert "success" in message.get_attribute("class")
    assert re.fullmatch(
        r"Sync #\d+ finished: 3 positions in 3 account\(s\); 0 created, 0 updated, "
        r"3 unchanged, 0 reopened, 1 closed, 0 errors\.",
        message.text,
    ), message.text
    assert [r["status"] for r in rows(browser)] == ["Success", "Success"]

    open_admin_page(browser, "Portfolio", "Positions")
    by_symbol = {r["symbol"]: r for r in rows(browser)}
    # The option's OCC local symbol has padding spaces that HTML collapses on screen.
    assert sorted(by_symbol) == ["AAPL", "ESZ6", "SPY 261218C00600000", "TSLA"]
    tsla = by_symbol["TSLA"]
    assert (tsla["account"], tsla["sec_type"], tsla["currency"]) == (
        f"{ACCOUNT} (Interactive Brokers)", "STK", "USD"
    )  # fmt: skip
    assert (
        tsla["quantity_display"], tsla["average_cost_display"], tsla["cost_basis_display"]
    ) == ("0.12345678", "242.123456", "29.8917822402")  # fmt: skip
    assert by_symbol["AAPL"]["quantity_display"] == "10"
    assert by_symbol["AAPL"]["cost_basis_display"] == "1502.5"
    assert by_symbol["ESZ6"]["quantity_display"] == "-2"
    assert by_symbol["SPY 261218C00600000"]["sec_type"] == "OPT"
    assert "0000" not in " ".join(r["quantity_display"] for r in by_symbol.values())
    assert is_open_icons(browser) == {
        "AAPL": "True", "ESZ6": "False", "SPY 261218C00600000": "True", "TSLA": "True"
    }  # fmt: skip

    # The page really rendered, styled by the admin's CSS (served by the live server).
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")
    screenshot = tmp_path / "positions.png"
    assert browser.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    assert png_size(data) == tuple(browser.execute_script(
        "return [window.innerWidth * devicePixelRatio, window.innerHeight * devicePixelRatio]"
    ))  # fmt: skip
    assert len(data) > 20_000, "a blank page would compress to a few kilobytes"

    status_filter = browser.find_element(
        By.XPATH, "//details[@data-filter-title='status']//a[normalize-space()='Open']"
    )
    click_and_load(browser, status_filter)
    assert "status=open" in browser.current_url
    assert sorted(r["symbol"] for r in rows(browser)) == [
        "AAPL", "SPY 261218C00600000", "TSLA"
    ]  # fmt: skip

    search = browser.find_element(By.ID, "searchbar")
    search.send_keys("TSLA")
    load_after(browser, lambda: search.send_keys(Keys.ENTER))
    assert "q=TSLA" in browser.current_url and "status=open" in browser.current_url
    assert [(r["symbol"], r["quantity_display"]) for r in rows(browser)] == [("TSLA", "0.12345678")]
    assert browser.find_element(By.CSS_SELECTOR, "#changelist-search .quiet").text == (
        "1 result (4 total)"
    )


def test_sync_now_with_the_gateway_down(fresh_browser, live_server, superuser, ibkr, settings):
    browser = fresh_browser
    ibkr.stop_thread()
    log_in(browser, live_server, "root")
    open_admin_page(browser, "IBKR sync", "Sync runs")

    message = sync_now(browser)

    assert "error" in message.get_attribute("class")
    assert message.text.startswith("Sync failed: ")
    assert f"127.0.0.1:{settings.IBKR_PORT}" in message.text
    (listed,) = rows(browser)
    assert (listed["status"], listed["trigger"], listed["processed"]) == ("Failed", "Admin", "0")
    assert SyncRun.objects.get().error_code == "gateway_unavailable"
