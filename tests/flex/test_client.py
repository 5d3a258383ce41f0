"""The Flex client through real HTTP against the fake Flex Web Service on loopback.

Only time is fake (an injected clock whose sleep advances it), so back-off is asserted
exactly and runs instantly; every request is a real GET the service records.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import socket
import threading

import pytest

from ibkr_sync.exceptions import IbkrSyncError
from ibkr_sync.sources.flex import (
    FlexAuthError,
    FlexError,
    FlexFormatError,
    FlexQueryError,
    FlexThrottled,
    FlexTimeout,
    FlexUnavailable,
)
from ibkr_sync.sources.flex.client import FlexClient, RetryPolicy, token_key, windows
from ibkr_sync.testing.flex_service import (
    GET_STATEMENT,
    SEND_REQUEST,
    Answer,
    FakeFlexService,
    generate_statement,
)

TOKEN = "123456789012345678901234"
QUERY = "987654"
JAN_1, JAN_31 = dt.date(2025, 1, 1), dt.date(2025, 1, 31)


class Clock:
    """A monotonic clock that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def by_period(from_date, to_date):
    return generate_statement(positions=3, trades=5, from_date=from_date, to_date=to_date)


@pytest.fixture
def service():
    with FakeFlexService(tokens=(TOKEN,), expired_tokens=("expired-token-000",)) as fake:
        fake.add_statement(QUERY, by_period)
        yield fake


@pytest.fixture
def clock():
    return Clock()


def client_for(service, clock, token=TOKEN, **kwargs) -> FlexClient:
    kwargs.setdefault("read_timeout", 5.0)
    return FlexClient(token, base_url=service.base_url, sleep=clock.sleep, clock=clock, **kwargs)


def test_a_statement_in_two_real_requests(service, clock):
    response = client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    [statement] = response.statements
    assert (statement.header.from_date, statement.header.to_date) == (JAN_1, JAN_31)
    assert len(statement.trades) == 5 and len(statement.positions) == 3
    send, get = service.requests
    assert send.endpoint == SEND_REQUEST and get.endpoint == GET_STATEMENT
    assert send.params == {"t": TOKEN, "q": QUERY, "v": "3", "fd": "20250101", "td": "20250131"}
    assert get.params["v"] == "3" and get.params["t"] == TOKEN
    assert get.params["q"].isdigit() and get.params["q"] != QUERY
    for request in (send, get):
        agent = request.headers["User-Agent"]
        assert agent.startswith("django-ibkr-sync/") and " Python/3." in agent
    assert clock.sleeps[0] == 2.0  # IBKR needs a moment before the first GetStatement


def test_1019_is_polled_with_back_off(service, clock):
    service.script(GET_STATEMENT, *[Answer.in_progress()] * 3)
    client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert len(service.requests_to(GET_STATEMENT)) == 4
    assert clock.sleeps == [2.0, 2.0, 3.0, 4.5]


def test_1019_for_too_long_gives_up_with_a_timeout(service, clock):
    service.script(GET_STATEMENT, *[Answer.in_progress()] * 50)
    policy = RetryPolicy(poll_budget=60.0)
    with pytest.raises(FlexTimeout, match="still generating the statement after 60 s") as raised:
        client_for(service, clock, policy=policy).fetch(QUERY, JAN_1, JAN_31)
    assert raised.value.flex_code == 1019
    assert sum(clock.sleeps[1:]) <= 60.0
    assert 3 < len(service.requests_to(GET_STATEMENT)) < 15


def test_1018_waits_at_least_10_s_and_slows_down(service, clock):
    service.script(SEND_REQUEST, Answer.error(1018))
    service.script(GET_STATEMENT, Answer.error(1018))
    client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert [s for s in clock.sleeps if s >= 10] == [10.0, 10.0]
    send = service.requests_to(SEND_REQUEST)
    assert len(send) == 2 and len(service.requests_to(GET_STATEMENT)) == 2
    # After a 1018 every request of the client is spaced further apart (2 s, then 4 s).
    gaps = [s for s in clock.sleeps if s < 10]
    assert gaps and max(gaps) >= 2.0


def test_1018_that_never_ends_is_said(service, clock):
    service.script(SEND_REQUEST, *[Answer.error(1018)] * 10)
    with pytest.raises(FlexThrottled, match="sync less often") as raised:
        client_for(service, clock, policy=RetryPolicy(throttles=3)).fetch(QUERY, JAN_1, JAN_31)
    assert raised.value.flex_code == 1018
    assert [s for s in clock.sleeps if s >= 10] == [10.0, 20.0, 40.0]


@pytest.mark.parametrize("code", [1001, 1004, 1009, 1021])
def test_retryable_codes_are_retried_with_back_off(service, clock, code):
    service.script(GET_STATEMENT, Answer.error(code), Answer.error(code))
    client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert clock.sleeps == [2.0, 5.0, 10.0]


def test_retryable_codes_up_to_a_cap(service, clock):
    service.script(SEND_REQUEST, *[Answer.error(1009)] * 10)
    with pytest.raises(FlexUnavailable, match="1009") as raised:
        client_for(service, clock, policy=RetryPolicy(retries=2)).fetch(QUERY, JAN_1, JAN_31)
    assert raised.value.flex_code == 1009
    assert len(service.requests_to(SEND_REQUEST)) == 3


@pytest.mark.parametrize(
    ("code", "error", "advice"),
    [
        (1003, FlexQueryError, "statement is not available"),
        (1012, FlexAuthError, "generate a new one in Client Portal"),
        (1013, FlexAuthError, "restricted to another IP address"),
        (1014, FlexQueryError, "query id is invalid"),
        (1015, FlexAuthError, "token is invalid"),
        (1017, FlexError, "sync again"),
        (1020, FlexError, "check the token and the query id"),
        (1099, FlexError, "does not know"),
    ],
)
def test_fatal_codes_fail_at_once_saying_what_to_do(service, clock, code, error, advice):
    service.script(SEND_REQUEST, Answer.error(code))
    with pytest.raises(error, match=advice) as raised:
        client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert raised.value.flex_code == code
    assert str(code) in str(raised.value)
    assert isinstance(raised.value, IbkrSyncError)
    assert len(service.requests) == 1


def test_an_expired_token_and_an_unknown_query_from_the_service_itself(service, clock):
    with pytest.raises(FlexAuthError, match="expired") as raised:
        client_for(service, clock, token="expired-token-000").fetch(QUERY, JAN_1, JAN_31)
    assert raised.value.flex_code == 1012
    with pytest.raises(FlexQueryError) as raised:
        client_for(service, clock).fetch("111", JAN_1, JAN_31)
    assert raised.value.flex_code == 1014


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_statement_url_first_then_the_base_urls_host(service, clock, caplog):
    dead = f"http://127.0.0.1:{free_port()}/AccountManagement/FlexWebService/GetStatement"
    service.statement_url = dead
    caplog.set_level(logging.INFO, "ibkr_sync.flex")
    response = client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert len(response.statements) == 1
    assert "could not be reached" in caplog.text and "fetching from" in caplog.text
    assert len(service.requests_to(GET_STATEMENT)) == 1  # the fallback, on the base's host


def test_a_statement_url_elsewhere_is_not_followed_with_the_token(service, clock, caplog):
    service.statement_url = "http://collector.example/steal/GetStatement"
    caplog.set_level(logging.WARNING, "ibkr_sync.flex")
    client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert "not following the statement Url to collector.example" in caplog.text
    assert len(service.requests_to(GET_STATEMENT)) == 1


def test_a_read_timeout_is_retried_then_said(service, clock):
    service.script(SEND_REQUEST, Answer.slow(1.0))
    client_for(service, clock, read_timeout=0.3).fetch(QUERY, JAN_1, JAN_31)
    assert 5.0 in clock.sleeps
    service.script(SEND_REQUEST, Answer.slow(1.0), Answer.slow(1.0))
    with pytest.raises(FlexUnavailable, match=r"timed out.*read timeout 0.3 s"):
        client_for(service, clock, read_timeout=0.3, policy=RetryPolicy(retries=1)).fetch(
            QUERY, JAN_1, JAN_31
        )


def test_a_refused_connection_is_unavailable(clock):
    client = FlexClient(
        TOKEN,
        base_url=f"http://127.0.0.1:{free_port()}/AccountManagement/FlexWebService",
        sleep=clock.sleep,
        clock=clock,
        policy=RetryPolicy(retries=2),
    )
    with pytest.raises(FlexUnavailable, match="refused"):
        client.fetch(QUERY, JAN_1, JAN_31)
    assert clock.sleeps == [5.0, 10.0]


def test_an_unreachable_service_is_named_with_what_to_check(clock):
    base_url = f"http://127.0.0.1:{free_port()}/AccountManagement/FlexWebService"
    client = FlexClient(
        TOKEN, base_url=base_url, sleep=clock.sleep, clock=clock, policy=RetryPolicy(retries=1)
    )
    with pytest.raises(FlexUnavailable) as raised:
        client.fetch(QUERY, JAN_1, JAN_31)
    assert str(raised.value) == (
        f"the Flex Web Service at {base_url} could not be reached: the connection was "
        "refused; check IBKR_FLEX_BASE_URL, and that this machine reaches it (network, "
        "firewall, proxy)"
    )


@pytest.fixture
def unresolvable(monkeypatch):
    """Host names ending in `.invalid`, and those added to the set it gives, do not exist
    (the resolver says so: EAI_NONAME)."""
    resolve = socket.getaddrinfo
    names: set[str] = set()

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".invalid") or host in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


def test_a_host_name_that_does_not_exist_is_said_at_once_not_retried(clock, unresolvable):
    """A misspelt IBKR_FLEX_BASE_URL, or no DNS: the same answer a minute later, so no
    back-off (which made `ibkr_connection test` wait over a minute to say it)."""
    base_url = "https://flex.example.invalid/AccountManagement/FlexWebService"
    client = FlexClient(TOKEN, base_url=base_url, sleep=clock.sleep, clock=clock)
    with pytest.raises(FlexUnavailable) as raised:
        client.fetch(QUERY, JAN_1, JAN_31)
    assert clock.sleeps == []
    assert str(raised.value) == (
        f"the Flex Web Service at {base_url} could not be reached: flex.example.invalid is "
        "not a host name this machine can resolve (Name or service not known); check "
        "IBKR_FLEX_BASE_URL, and that this machine reaches it (network, firewall, proxy)"
    )


def test_a_statement_url_on_a_host_that_does_not_exist_falls_back_to_the_base(
    service, clock, unresolvable, caplog
):
    unresolvable.add("gdcdyn.interactivebrokers.com")
    service.statement_url = "https://gdcdyn.interactivebrokers.com/x/GetStatement"
    caplog.set_level(logging.WARNING, "ibkr_sync.flex")
    response = client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert len(response.statements) == 1
    assert "not a host name this machine can resolve" in caplog.text
    assert "fetching from" in caplog.text


def test_a_truncated_statement_is_fetched_again(service, clock):
    service.script(GET_STATEMENT, Answer.truncated())
    response = client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert len(response.statements[0].trades) == 5
    assert len(service.requests_to(GET_STATEMENT)) == 2


def test_content_that_is_no_statement(service, clock):
    service.script(GET_STATEMENT, Answer.content(b"<html><body>Maintenance</body></html>"))
    with pytest.raises(FlexFormatError, match="not the Flex Web Service's XML"):
        client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    service.script(GET_STATEMENT, Answer.http(503))
    client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)  # a 5xx is retried


@pytest.mark.parametrize(
    "body",
    [
        # A query set to CSV (IBKR quotes every field), with and without a BOM.
        b'"ClientAccountID","CurrencyPrimary","Symbol","Quantity"\r\n"U1234567","USD","AAPL","10"\r\n',
        b'\xef\xbb\xbf"ClientAccountID","Symbol"\n"U1234567","AAPL"\n',
        b"ClientAccountID,Symbol\nU1234567,AAPL\n",
        # Set to text: fields separated by a pipe, or by tabs.
        b"ClientAccountID|Symbol|Quantity\nU1234567|AAPL|10\n",
        b"ClientAccountID\tSymbol\nU1234567\tAAPL\n",
    ],
)
def test_a_statement_in_csv_or_text_names_the_query_format(service, clock, body):
    service.script(GET_STATEMENT, Answer.content(body, content_type="text/plain"))
    with pytest.raises(FlexFormatError, match="CSV or text, not XML") as raised:
        client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert "Format: XML" in str(raised.value)
    assert "base URL" not in str(raised.value)
    assert len(service.requests_to(GET_STATEMENT)) == 1  # not fetched again


def test_a_page_that_is_no_statement_still_points_at_the_address(service, clock):
    # Not delimited fields: a plain-text error page of a proxy, an empty 200.
    for body in (b"Service Unavailable", b"", b"  \n"):
        service.script(GET_STATEMENT, Answer.content(body, content_type="text/plain"))
        with pytest.raises(FlexFormatError, match="check the Flex base URL"):
            client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)


def test_a_range_longer_than_365_days_is_split_oldest_first(service, clock):
    start = dt.date(2024, 1, 1)
    end = start + dt.timedelta(days=399)
    assert windows(start, end) == [
        (start, dt.date(2024, 12, 30)),
        (dt.date(2024, 12, 31), end),
    ]
    client = client_for(service, clock)
    periods = []
    for download in client.downloads(QUERY, start, end):
        with download:
            periods.append((download.from_date, download.to_date))
    assert [(r.params["fd"], r.params["td"]) for r in service.requests_to(SEND_REQUEST)] == [
        ("20240101", "20241230"),
        ("20241231", "20250203"),
    ]
    assert periods == windows(start, end)
    with pytest.raises(ValueError, match="longer than 365 days"):
        client.download(QUERY, start, end)


def test_the_token_is_never_in_a_log_an_error_or_a_repr(service, clock, caplog):
    caplog.set_level(logging.DEBUG)
    client = client_for(service, clock, policy=RetryPolicy(retries=1))
    texts = [repr(client)]
    service.script(SEND_REQUEST, Answer.error(1018), Answer.error(1001))
    service.script(GET_STATEMENT, Answer.in_progress(), Answer.truncated())
    client.fetch(QUERY, JAN_1, JAN_31)
    for code in (1012, 1015, 1099):
        service.script(SEND_REQUEST, Answer.error(code, f"Token {TOKEN} is wrong"))
        with pytest.raises(FlexError) as raised:
            client.fetch(QUERY, JAN_1, JAN_31)
        texts += [str(raised.value), repr(raised.value)]
    dead = FlexClient(TOKEN, base_url=f"http://127.0.0.1:{free_port()}/x", sleep=clock.sleep,
                      clock=clock, policy=RetryPolicy(retries=0))  # fmt: skip
    with pytest.raises(FlexUnavailable) as raised:
        dead.fetch(QUERY, JAN_1, JAN_31)
    texts.append(str(raised.value))
    assert "[token]" in " ".join(texts)  # IBKR's own text, scrubbed
    assert caplog.records
    for text in [*texts, caplog.text, *(str(r.args) for r in caplog.records)]:
        assert TOKEN not in text
    assert "/AccountManagement/FlexWebService/SendRequest" in caplog.text


def test_one_exchange_in_flight_per_token_and_a_gate_across_processes(service, clock):
    service.script(GET_STATEMENT, Answer.slow(0.3), Answer.slow(0.3))
    entered: list[str] = []

    class Gate:
        def __init__(self, key: str) -> None:
            self.key = key

        def __enter__(self) -> None:
            entered.append(self.key)

        def __exit__(self, *exc: object) -> None:
            pass

    results, errors = [], []

    def fetch() -> None:
        try:
            client = FlexClient(TOKEN, base_url=service.base_url, gate=Gate, sleep=lambda s: None)
            results.append(client.fetch(QUERY, JAN_1, JAN_31))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(results) == 3
    assert service.max_in_flight == {token_key(TOKEN)[:16]: 1}
    assert entered == [token_key(TOKEN)] * 3 and TOKEN not in entered[0]
    spans = sorted((r.started, r.ended) for r in service.requests)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:notaport/AccountManagement/FlexWebService/GetStatement",
        "http://127.0.0.1:99999/AccountManagement/FlexWebService/GetStatement",
        "http://[::1/AccountManagement/FlexWebService/GetStatement",
    ],
)
def test_a_statement_url_that_is_no_url_is_not_followed(service, clock, caplog, url):
    # Not an error of the server's own: the statement is fetched from the base URL.
    service.statement_url = url
    caplog.set_level(logging.WARNING, "ibkr_sync.flex")
    response = client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    assert len(response.statements) == 1
    assert "not following the statement Url" in caplog.text
    assert len(service.requests_to(GET_STATEMENT)) == 1
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("step", ["_read", "_pace"])
def test_an_unexpected_failure_reports_no_token(service, clock, monkeypatch, settings, step):
    # What Django's error report (the HTML mail to ADMINS, with each frame's variables)
    # shows of a failure inside an exchange: not the token.
    from django.views.debug import ExceptionReporter

    def broken(*args, **kwargs):
        raise RuntimeError("unexpected")

    settings.DEBUG = False
    monkeypatch.setattr(FlexClient, step, broken)
    with pytest.raises(RuntimeError) as raised:
        client_for(service, clock).fetch(QUERY, JAN_1, JAN_31)
    error = raised.value
    report = ExceptionReporter(None, type(error), error, error.__traceback__).get_traceback_html()
    assert "_send_request" in report and "RuntimeError" in report
    assert TOKEN not in report
