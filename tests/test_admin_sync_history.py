"""The SyncRun history in the admin: status badges in the list, and on a run's page what
that run changed in each position (created, updated, re-opened, closed), paginated."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ibkr_sync.admin.sync_runs import CHANGES_PER_PAGE
from ibkr_sync.exceptions import GatewayTimeout
from ibkr_sync.models import SyncRun
from ibkr_sync.services import sync_positions
from portfolio.models import Position
from tests.conftest import FakeGateway, position
from tests.test_admin import change, changelist

pytestmark = pytest.mark.django_db

# Session, user, the run, the changes counted by kind, the paginator's count, one page of
# changes with positions, accounts and instruments joined in.
SYNC_RUN_PAGE_MAX_QUERIES = 6


def run_sync(gateway: FakeGateway) -> SyncRun:
    result = sync_positions(trigger=SyncRun.Trigger.COMMAND, gateway=gateway)
    return SyncRun.objects.get(pk=result.sync_run_id)


@pytest.fixture
def history():
    """Four runs: AAPL and TSLA created; AAPL bought, TSLA sold out; TSLA back; a failure."""
    gateway = FakeGateway(
        positions=[
            position(),
            position(con_id=76792991, symbol="TSLA", quantity="0.5", average_cost="242.1"),
        ]
    )
    first = run_sync(gateway)
    gateway.positions[0] = position(quantity="15", average_cost="160.5")
    del gateway.positions[1]
    second = run_sync(gateway)
    gateway.positions.append(position(con_id=76792991, symbol="TSLA", quantity="2"))
    third = run_sync(gateway)
    gateway.error = GatewayTimeout("No complete answer from the IB gateway within 3 s.")
    with pytest.raises(GatewayTimeout):
        run_sync(gateway)
    failed = SyncRun.objects.get(status="failed")
    return {"first": first, "second": second, "third": third, "failed": failed}


def change_rows(html: str) -> list[tuple[str, ...]]:
    """The rows of a run's change table as tuples of cell texts."""
    table = re.search(r'<div class="module ibkr-changes".*?</div>', html, re.S).group()
    rows = re.findall(r"<tr class=\"change-\w+\">(.*?)</tr>", table, re.S)
    return [
        tuple(
            re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td.*?</td>", row, re.S)
        )
        for row in rows
    ]


def test_the_list_shows_status_badges_trigger_user_duration_and_counts(
    admin_client, admin_user, history
):
    history["second"].user = admin_user
    history["second"].trigger = SyncRun.Trigger.ADMIN
    history["second"].save()

    response = admin_client.get(changelist(SyncRun))

    html = response.text
    assert html.count('class="ibkr-badge ibkr-badge-success"') == 3
    assert (
        '<span class="ibkr-badge ibkr-badge-failed" '
        'title="No complete answer from the IB gateway within 3 s.">Failed</span>'
    ) in html
    row = re.search(
        rf"<tr>.*?/ibkr_sync/syncrun/{history['second'].pk}/change/.*?</tr>", html, re.S
    )
    cells = {
        name: re.sub(r"<[^>]+>", "", text).strip()
        for name, text in re.findall(
            r'<t[dh] class="field-(\w+)[^"]*">(.*?)</t[dh]>', row.group(), re.S
        )
    }
    assert cells["status_badge"] == "Success"
    assert cells["triggered_by"] == "Admin (admin)"
    # The counts in one column, those that are not zero.
    assert cells["counts"] == "1 position: 1 updated, 1 closed"
    assert cells["error"] == "-"
    assert re.fullmatch(r"\d+\.\d\d s", cells["duration"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cells["started"])
    # A failed run's error code and message in the list.
    assert "<code>gateway_timeout</code> No complete answer from the IB gateway" in html


def test_a_runs_page_lists_what_it_changed(admin_client, history):
    first = admin_client.get(change(history["first"])).text
    assert sorted(change_rows(first)) == [
        ("Created", "U1111111", "AAPL", "STK", "USD", "-", "10", "-", "150.25"),
        ("Created", "U1111111", "TSLA", "STK", "USD", "-", "0.5", "-", "242.1"),
    ]
    second = admin_client.get(change(history["second"])).text
    assert change_rows(second) == [
        ("Updated", "U1111111", "AAPL", "STK", "USD", "10", "15", "150.25", "160.5"),
        ("Closed", "U1111111", "TSLA", "STK", "USD", "0.5", "-", "242.1", "-"),
    ]
    third = admin_client.get(change(history["third"])).text
    assert change_rows(third) == [
        ("Re-opened", "U1111111", "TSLA", "STK", "USD", "-", "2", "-", "150.25"),
    ]
    tsla = Position.objects.get(instrument__symbol="TSLA")
    assert f'href="{change(tsla)}">TSLA</a>' in third, "each change links to its position"


def test_a_failed_run_changed_nothing_and_says_why(admin_client, history):
    page = admin_client.get(change(history["failed"])).text

    assert "No position changed." in page
    assert "No complete answer from the IB gateway within 3 s." in page


def test_changes_can_be_narrowed_to_one_kind(admin_client, history):
    url = change(history["second"])

    page = admin_client.get(url + "?kind=closed").text

    assert [row[0] for row in change_rows(page)] == ["Closed"]
    assert re.search(r'<a href="\?kind=closed" class="selected">Closed \(1\)</a>', page)
    assert '<a href="?kind=updated">Updated (1)</a>' in page
    assert '<a href="?kind=created">Created (0)</a>' in page
    assert "No position changed this way." in admin_client.get(url + "?kind=created").text


def test_a_large_run_is_paginated_with_a_bounded_number_of_queries(
    admin_client, django_assert_max_num_queries
):
    total = CHANGES_PER_PAGE * 2 + 7
    run = run_sync(
        FakeGateway(positions=[position(con_id=1000 + i, symbol=f"S{i:04}") for i in range(total)])
    )
    admin_client.get(change(run))  # warm the session and content-type caches

    with django_assert_max_num_queries(SYNC_RUN_PAGE_MAX_QUERIES):
        first = admin_client.get(change(run)).text
    assert len(change_rows(first)) == CHANGES_PER_PAGE
    assert f"Page 1 of 3 ({total} changes)" in first
    assert '<a href="?page=2">next &rsaquo;</a>' in first

    with CaptureQueriesContext(connection) as last_page:
        last = admin_client.get(change(run) + "?page=3").text
    assert len(last_page.captured_queries) <= SYNC_RUN_PAGE_MAX_QUERIES
    assert [row[2] for row in change_rows(last)] == [
        f"S{i:04}" for i in range(CHANGES_PER_PAGE * 2, total)
    ]
    assert "next &rsaquo;" not in last


def test_an_unknown_run_is_the_admins_usual_not_found(admin_client):
    response = admin_client.get("/admin/ibkr_sync/syncrun/nope/change/", follow=True)

    assert response.status_code == 200
    assert "doesn\u2019t exist" in response.text
