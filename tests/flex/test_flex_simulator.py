"""The Flex Web Service simulator: each scripted error sequence answered as IBKR answers
it, and our client (real HTTP on loopback, only its clock fake) doing with it what it
promises; `manage.py ibkr_flex_simulator` serving the sample portfolio's statements."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ibkr_sync.sources.flex import FlexAuthError, FlexFormatError
from ibkr_sync.sources.flex.client import FlexClient
from ibkr_sync.sources.flex.parser import iter_records, parse_flex
from ibkr_sync.sources.flex.records import StatementEnd
from ibkr_sync.testing.flex_portfolio import FlexHistory
from ibkr_sync.testing.flex_service import (
    GET_STATEMENT,
    SCENARIOS,
    SEND_REQUEST,
    FakeFlexService,
    scenario_answers,
)

from .test_client import Clock

TOKEN = "sim-token-1234567890"
QUERY = "1234567"
END = dt.date(2026, 3, 13)
START = END - dt.timedelta(days=6)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def service():
    with FakeFlexService(tokens=(TOKEN,)) as fake:
        fake.add_statement(QUERY, FlexHistory(end=END))
        yield fake


def fetch(service, clock):
    client = FlexClient(
        TOKEN, base_url=service.base_url, sleep=clock.sleep, clock=clock, read_timeout=30
    )
    return client.fetch(QUERY, START, END)


def statements_of(response):
    return [s.account for s in response.statements]


def test_no_scenario_the_statement_at_once(service):
    clock = Clock()
    response = fetch(service, clock)
    assert statements_of(response) == ["DU1234567", "DU7654321", "DU5555555"]
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST, GET_STATEMENT]


def test_in_progress_three_times_is_polled_with_back_off(service):
    service.play("in-progress")
    clock = Clock()
    response = fetch(service, clock)

    assert statements_of(response) == ["DU1234567", "DU7654321", "DU5555555"]
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST] + [GET_STATEMENT] * 4
    # The first look after 2 s, then 2, 3, 4.5 s apart (IBKR: "try again shortly").
    assert [s for s in clock.sleeps if s >= 1.5] == [2.0, 2.0, 3.0, 4.5]


def test_too_many_requests_is_waited_out_and_the_client_slows_down(service):
    service.play("throttled")
    clock = Clock()
    response = fetch(service, clock)

    assert statements_of(response)
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST] * 2 + [GET_STATEMENT]
    assert 10.0 in clock.sleeps, "1018 waits at least 10 s"


def test_could_not_be_generated_is_tried_again(service):
    service.play("unavailable")
    clock = Clock()
    response = fetch(service, clock)

    assert statements_of(response)
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST] + [GET_STATEMENT] * 2
    assert 5.0 in clock.sleeps, "the first retry after 5 s"


def test_an_expired_token_fails_at_once_saying_what_to_do(service):
    service.play("expired-token")
    with pytest.raises(FlexAuthError) as raised:
        fetch(service, Clock())

    assert raised.value.flex_code == 1012
    assert "generate a new one" in str(raised.value) and TOKEN not in str(raised.value)
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST], "never retried"


def test_a_truncated_statement_is_fetched_again_whole(service):
    service.play("truncated")
    response = fetch(service, Clock())

    assert statements_of(response) == ["DU1234567", "DU7654321", "DU5555555"]
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST] + [GET_STATEMENT] * 2


def test_a_page_that_is_no_xml_is_refused_whole(service):
    service.play("not-xml")
    with pytest.raises(FlexFormatError) as raised:
        fetch(service, Clock())

    assert "not the Flex Web Service's XML" in str(raised.value)
    assert "text/html" in str(raised.value)
    assert [r.endpoint for r in service.requests] == [SEND_REQUEST, GET_STATEMENT]


def test_a_huge_statement_is_downloaded_to_disk_and_read_row_by_row(service):
    rows = 12_000
    service.play("huge", huge_rows=rows)
    client = FlexClient(TOKEN, base_url=service.base_url, sleep=Clock().sleep, read_timeout=60)
    with client.download(QUERY, START, END) as download:
        size = download.size
        # Spooled: past its first 8 MB the statement is in a temporary file, not in memory.
        on_disk = download.body._rolled
        ends = [r for r in iter_records(download.body) if isinstance(r, StatementEnd)]

    assert size > 10_000_000 and on_disk
    assert [end.rows_read["Trades/Trade"] for end in ends] == [rows]


def test_every_scenario_is_scripted_and_an_unknown_one_refused():
    for name in SCENARIOS:
        assert scenario_answers(name)
    with pytest.raises(KeyError, match="no scenario 'bogus'"):
        scenario_answers("bogus")


@pytest.mark.processes
def test_the_command_serves_the_sample_portfolio_and_plays_a_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(DEBUG="true", PYTHONUNBUFFERED="1", ENV_FILE="")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "ibkr_flex_simulator", "--port", "0", "--token", TOKEN,
         "--end-date", END.isoformat(), "--script", "in-progress", "--script", "truncated"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("Flex Web Service simulator listening on http://127.0.0.1:"), (
            line + process.stderr.read()
        )
        # What a Flex connection needs to reach it: the query id and the token it accepts.
        assert f"(query {QUERY}, token {TOKEN}, accounts: DU1234567, DU7654321, DU5555555" in line
        assert "history 2026-03-07 to 2026-03-13; scripted: in-progress, truncated" in line
        base_url = line.rsplit("IBKR_FLEX_BASE_URL=", 1)[1].strip()
        clock = Clock()
        client = FlexClient(TOKEN, base_url=base_url, sleep=clock.sleep, clock=clock)
        response = client.fetch(QUERY, START, END)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)

    assert process.returncode == 0, err
    assert "Flex Web Service simulator stopped" in out
    assert statements_of(response) == ["DU1234567", "DU7654321", "DU5555555"]
    assert response == parse_flex(
        FlexHistory(end=END).statement(START, END).encode(), period=(START, END)
    )
    # 1019 three times, then a truncated answer fetched again.
    assert [s for s in clock.sleeps if s >= 1.5] == [2.0, 2.0, 3.0, 4.5, 5.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--days", "2"], "--days must be between 3 and 365"),
        (["--token", " "], "--token and --query-id must not be empty"),
    ],
)
def test_the_command_refuses_bad_options(args, message):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match=message):
        call_command("ibkr_flex_simulator", *args)
