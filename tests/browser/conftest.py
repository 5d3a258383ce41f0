"""A real headless Chromium driven by Selenium against pytest-django's live_server.

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`).
Without them the browser tests skip, unless REQUIRE_BROWSER=1 (as in CI), where they
fail instead. Selenium is given both paths, so Selenium Manager never downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

# The simulator and the settings pointing the app at it, shared with the integration tests.
from tests.integration.conftest import ibkr, simulator  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NOT_INSTALLED = "Chromium/chromedriver not installed: apt-get install chromium chromium-driver"

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium phones home at start-up; only localhost is ever browsed.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives a real headless Chromium against the live server"
    )


@pytest.fixture(scope="session")
def browser(live_server, tmp_path_factory: pytest.TempPathFactory):
    """One headless Chromium for the session, with a fresh profile.

    It depends on live_server so that it quits first: Chromium keeps idle keep-alive
    connections to the server, and the server threads serving them close the shared
    in-memory SQLite connection when they end, which must happen before the live
    server stops sharing it across threads.
    """
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        reason = f"{NOT_INSTALLED} (missing {', '.join(missing)})"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
        pytest.skip(reason)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def fresh_browser(browser):
    """The session's browser with no cookies left over from an earlier test."""
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    return browser
