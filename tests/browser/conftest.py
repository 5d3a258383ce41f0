"""A real headless Chromium, driven by Playwright, against pytest-django's live_server.

Playwright is the Python package only: no browser download. It launches Debian's
Chromium (`apt-get install chromium`). Without it the browser tests skip, unless
REQUIRE_BROWSER=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections
from playwright.sync_api import Page, sync_playwright

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
NOT_INSTALLED = "Chromium not installed: apt-get install chromium"
WAIT_MS = 15_000  # a sync against the simulator takes well under a second

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium phones home at start-up; only localhost is ever browsed.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is a browser test (`make test-fast` leaves them out):
    Chromium is a process of its own."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.processes)


@pytest.fixture
def page(live_server, monkeypatch) -> Iterator[Page]:
    """A fresh headless Chromium page, with its own profile, for one test.

    It depends on live_server so that the browser quits first: Chromium keeps idle
    keep-alive connections to the server, and the server threads serving them close the
    shared in-memory SQLite connection when they end, which must happen before the live
    server stops sharing it across threads.
    """
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{NOT_INSTALLED} (missing {CHROMIUM})"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
        pytest.skip(reason)

    # Playwright's synchronous API runs an asyncio loop in this thread, which Django takes
    # for an async context and refuses the ORM in: the test's own queries (arranging
    # data, checking the database) are plain synchronous code, so allow them while the
    # browser is open. The live server answers the browser in its own threads.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(
                viewport={"width": 1400, "height": 1000}, base_url=live_server.url
            )
            context.set_default_timeout(WAIT_MS)
            yield context.new_page()
            context.close()
        finally:
            browser.close()
            # Django keeps connections per context, and code run while Playwright's loop
            # runs gets its own: close them here, or they outlive the test database.
            connections.close_all()
