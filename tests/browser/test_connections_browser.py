"""Connections in a real browser: an administrator adds a connection to a running gateway
(the simulator, through the real IB client), tests it, adds one to a closed port and sees
its error, then syncs the one chosen in Sync now."""

from __future__ import annotations

import re
import socket

import pytest
from playwright.sync_api import Page, expect

from ibkr_sync.models import Connection, SyncRun
from ibkr_sync.testing import GatewaySimulator, Portfolio
from portfolio.models import Position
from tests.integration.conftest import negotiated_version, sim_position

from .test_admin_browser import log_in, open_admin_page, rows, superuser  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.integration]


@pytest.fixture
def gateway(settings):
    settings.IBKR_CONNECT_TIMEOUT = 3
    settings.IBKR_REQUEST_TIMEOUT = 10
    settings.IBKR_VALUES_TIMEOUT = 3
    settings.IBKR_SYNC_GATEWAY_CLASS = "ibkr_sync.gateway.IbkrGateway"
    settings.IBKR_PORT = 1  # the settings' gateway is nowhere
    portfolio = Portfolio(
        accounts=["DU1111111", "DU2222222"],
        positions=[sim_position(account="DU1111111"), sim_position(account="DU2222222")],
    )
    with GatewaySimulator(portfolio) as simulator:
        yield simulator


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_connection(page: Page, name: str, port: int, client_id: int) -> None:
    page.get_by_role("link", name="Add connection").click()
    page.fill("#id_name", name)
    page.fill("#id_host", "127.0.0.1")
    page.fill("#id_port", str(port))
    page.fill("#id_client_id", str(client_id))
    with page.expect_navigation():
        page.get_by_role("button", name="Save and continue editing").click()
    expect(page.locator("ul.messagelist > li").first).to_contain_text("was added successfully")


def press_test_connection(page: Page) -> str:
    with page.expect_navigation():
        page.get_by_role("button", name="Test connection").click()
    message = page.locator("ul.messagelist > li")
    expect(message).to_have_count(1)
    return message.first.inner_text()


def test_add_test_and_sync_connections_in_the_admin(page, superuser, gateway):  # noqa: F811
    log_in(page, "root")
    open_admin_page(page, "IBKR sync", "Connections")

    # A form the model refuses says what is wrong, and keeps what was typed.
    page.get_by_role("link", name="Add connection").click()
    page.fill("#id_name", "paper login")
    page.fill("#id_port", "70000")
    with page.expect_navigation():
        page.get_by_role("button", name="Save and continue editing").click()
    expect(page.locator(".errornote")).to_be_visible()
    expect(page.locator(".field-name .errorlist")).to_contain_text("slug")
    expect(page.locator(".field-port .errorlist")).to_contain_text("65535")
    assert not Connection.objects.exists()
    page.go_back()
    page.go_back()

    # A connection to the running gateway: its test names the server version and accounts.
    open_admin_page(page, "IBKR sync", "Connections")
    add_connection(page, "paper", gateway.port, 61)
    assert press_test_connection(page) == (
        f"Connection paper (127.0.0.1:{gateway.port}): ok: server version "
        f"{negotiated_version()}, accounts DU1111111, DU2222222"
    )
    assert not SyncRun.objects.exists()

    # One to a closed port: its test says why, in the sync's words.
    open_admin_page(page, "IBKR sync", "Connections")
    port = closed_port()
    add_connection(page, "down", port, 62)
    said = press_test_connection(page)
    assert said.startswith(f"Connection down: Cannot connect to the IB gateway at 127.0.0.1:{port}")
    expect(page.locator("ul.messagelist > li.error")).to_have_count(1)

    # The list shows both.
    open_admin_page(page, "IBKR sync", "Connections")
    listed = {row["name"]: row for row in rows(page)}
    assert set(listed) == {"down", "paper"}
    assert listed["paper"]["address"] == f"127.0.0.1:{gateway.port}"
    assert listed["down"]["last_sync"] == "never"

    # Sync now offers both; the one chosen is synced.
    open_admin_page(page, "IBKR sync", "Sync runs")
    form = page.locator("form.ibkr-sync-now")
    choices = form.locator("select[name=connection] option").all_inner_texts()
    assert choices == ["down", "paper"]
    form.locator("select[name=connection]").select_option("paper")
    with page.expect_navigation():
        form.get_by_role("button", name="Sync now from IBKR").click()
    message = page.locator("ul.messagelist > li")
    expect(message).to_have_count(1)
    expect(message.first).to_have_text(
        re.compile(r"^Sync #\d+ of connection paper finished: 2 positions in 2 account\(s\)")
    )
    run = SyncRun.objects.get()
    assert (run.connection_name, run.trigger, run.status) == ("paper", "admin", "success")
    assert Position.objects.open().count() == 2

    # Its last sync is on the connections' list, linked to the run.
    open_admin_page(page, "IBKR sync", "Connections")
    paper = page.locator("#result_list tr", has_text="paper")
    expect(paper.locator("td.field-last_sync")).to_contain_text("Success")
    with page.expect_navigation():
        paper.locator("td.field-last_sync a").click()
    expect(page).to_have_url(re.compile(rf"/admin/ibkr_sync/syncrun/{run.pk}/change/"))
