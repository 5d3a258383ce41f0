"""A Flex connection synced through the whole pipeline: the real client over real HTTP
against the fake Flex Web Service, the source, mapping, the writer and the service, into
the database (SQLite, or PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import datetime as dt
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction

from ibkr_sync import conf
from ibkr_sync.models import AccountReport, Connection, SyncRun
from ibkr_sync.services import check_connection, sync_positions
from ibkr_sync.sources.flex.client import RetryPolicy
from ibkr_sync.sources.flex.source import FlexSource, yesterday
from ibkr_sync.testing.flex_service import (
    SEND_REQUEST,
    FakeFlexService,
    generate_statement,
)
from tests.conftest import FakeGateway, position

from .statements import statement_with_values

TOKEN = "771122334455667788990011aaTOKEN"
EXPIRED = "990088776655443322110099zzEXPIRED"
QUERY = "445566"
KEY = "first-ibkr-sync-secret-key-0123456789-abcdef"
REAL = (
    Path(__file__).parent.parent / "data" / "flex" / "opensteuerauszug" / "options_future_2025.xml"
)

pytestmark = pytest.mark.django_db


class FastFlexSource(FlexSource):
    """The Flex source, waiting as little as the fake service needs (it answers at once)."""

    policy = RetryPolicy(
        first_poll=0.01, poll_interval=0.01, min_interval=0.01, retry_delay=0.01, retries=1
    )


@pytest.fixture
def service(settings):
    with FakeFlexService(tokens=(TOKEN,), expired_tokens=(EXPIRED,)) as fake:
        fake.add_statement(QUERY, statement_with_values)
        settings.IBKR_FLEX_BASE_URL = fake.base_url
        settings.IBKR_SYNC_FLEX_SOURCE_CLASS = f"{__name__}.FastFlexSource"
        settings.IBKR_SYNC_SECRET_KEY = KEY
        yield fake


def flex_connection(name: str = "myflex", token: str = TOKEN, query: str = QUERY) -> Connection:
    row = Connection(name=name, kind=Connection.Kind.FLEX, flex_query_id=query)
    row.set_flex_token(token)
    row.full_clean()
    row.save()
    return row


def period_end(day: dt.date) -> dt.datetime:
    from ibkr_sync.sources.flex.values import EASTERN

    return dt.datetime.combine(day, dt.time(23, 59, 59), EASTERN)


# --- the sync ---------------------------------------------------------------------------


def test_a_flex_sync_stores_positions_cash_and_the_account_snapshot(service):
    flex_connection()
    out = io.StringIO()

    call_command("sync_ibkr", "--connection", "myflex", stdout=out)

    assert "IBKR sync #" in out.getvalue() and "2 positions in 1 account(s)" in out.getvalue()
    [request] = service.requests_to(SEND_REQUEST)
    end = yesterday()
    assert request.params["td"] == f"{end:%Y%m%d}"
    assert request.params["fd"] == f"{end - dt.timedelta(days=6):%Y%m%d}"
    account = conf.account_model().objects.get(external_id="U7654321")
    positions = {
        p.instrument.symbol: p for p in conf.position_model().objects.filter(account=account)
    }
    assert positions["AAPL"].quantity == Decimal("120")
    assert positions["AAPL"].average_cost == Decimal("150.123456")
    assert positions["AAPL"].market_price == Decimal("213.49")
    assert positions["AAPL"].market_value == Decimal("25618.8")
    assert positions["SAP"].quantity == Decimal("-15")
    assert positions["AAPL"].valued_at == period_end(end)
    cash = {c.currency: c for c in conf.cash_balance_model().objects.filter(account=account)}
    assert {k: c.amount for k, c in cash.items()} == {
        "USD": Decimal("12000.5"),
        "EUR": Decimal("1758.75"),
    }
    assert cash["EUR"].exchange_rate == Decimal("1.0871") and cash["EUR"].rate_currency == "USD"
    # One snapshot per day of the period (its net asset value); the period end's whole.
    snapshots = list(conf.account_snapshot_model().objects.filter(account=account))
    assert sorted(s.taken_at for s in snapshots) == [
        period_end(end - dt.timedelta(days=n)) for n in range(6, -1, -1)
    ]
    snapshot = max(snapshots, key=lambda s: s.taken_at)
    assert snapshot.taken_at == period_end(end)
    assert snapshot.currency == "USD"
    assert snapshot.net_liquidation == Decimal("35806.445")  # the last day's
    assert snapshot.total_cash_value == Decimal("13906.345")
    assert snapshot.exchange_rates["EUR"] == "1.0871"
    assert snapshot.exchange_rates["CHF"] == "1.1345"
    report = AccountReport.objects.get(external_id="U7654321")
    assert (report.source, report.connection_name, report.as_of) == (
        "flex",
        "myflex",
        period_end(end),
    )
    run = SyncRun.objects.get()
    assert (run.status, run.connection_name, run.created) == ("success", "myflex", 2)
    assert run.account_values["U7654321"]["status"] == "read"


def test_the_same_statement_again_changes_nothing(service):
    flex_connection()
    sync_positions(trigger="command", connection="myflex")

    again = sync_positions(trigger="command", connection="myflex")

    assert (again.created, again.updated, again.unchanged, again.closed) == (0, 0, 2, 0)
    # The second sync reads from the first one's end, three days back: days stored once.
    _, second = service.requests_to(SEND_REQUEST)
    end = yesterday()
    assert (second.params["fd"], second.params["td"]) == (
        f"{end - dt.timedelta(days=2):%Y%m%d}",
        f"{end:%Y%m%d}",
    )
    # Three days again, none stored twice. This fixture numbers its values from the
    # period's first day, so each day read again differs from what the first statement
    # said of it: taken as IBKR's correction, each day's row updated (the period end's
    # whole snapshot too). `test_backfill` has days whose values do not move.
    assert again.snapshots == {"created": 0, "updated": 3, "unchanged": 0}
    assert conf.account_snapshot_model().objects.count() == 7  # one per day
    newest = conf.account_snapshot_model().objects.order_by("taken_at")
    assert newest.last().net_liquidation == Decimal("35802.445")  # the newer read's


def test_a_real_statement_with_open_positions(service):
    service.add_statement(QUERY, REAL)
    flex_connection()

    result = sync_positions(trigger="command", connection="myflex")

    assert result.accounts == ["U0000000"] and result.created == 11 and not result.errors
    held = conf.position_model().objects.filter(account__external_id="U0000000")
    assert held.count() == 11
    fhzn = held.get(instrument__symbol="FHZN")
    assert (fhzn.quantity, fhzn.market_price) == (Decimal("10"), Decimal("251.8"))
    assert fhzn.valued_at == period_end(dt.date(2025, 12, 31))
    # An empty CashReport is no cash report: nothing stored, nothing made up.
    assert not conf.cash_balance_model().objects.exists()


def test_a_generated_statement(service):
    service.add_statement(
        QUERY,
        lambda fd, td: generate_statement(
            account="U2222222", positions=25, trades=40, from_date=fd, to_date=td
        ),
    )
    flex_connection()

    result = sync_positions(trigger="command", connection="myflex")

    assert result.accounts == ["U2222222"] and result.created == 25
    assert conf.position_model().objects.open().count() == 25


def test_a_position_gone_from_the_next_statement_is_closed(service):
    flex_connection()
    sync_positions(trigger="command", connection="myflex")
    service.add_statement(QUERY, lambda fd, td: _without_sap(statement_with_values(fd, td)))

    result = sync_positions(trigger="command", connection="myflex")

    assert (result.closed, result.unchanged) == (1, 1)


def _without_sap(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(line for line in lines if 'symbol="SAP"' not in line)


# --- what the sync cannot trust -----------------------------------------------------------


def test_a_query_without_open_positions_is_refused_and_nothing_is_written(service):
    flex_connection()
    sync_positions(trigger="command", connection="myflex")
    service.add_statement(
        QUERY, lambda fd, td: statement_with_values(fd, td, sections=("CashReport",))
    )

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    assert raised.value.returncode == 10
    assert "no Open Positions section" in str(raised.value)
    assert conf.position_model().objects.open().count() == 2
    assert SyncRun.objects.order_by("-pk").first().error_code == "flex_query_rejected"


@pytest.mark.parametrize(
    ("row", "named"),
    [
        ('<OpenPosition accountId="U7654321" currency="EUR"', "OpenPositions"),
        ('<CashReportCurrency accountId="U7654321" currency="EUR"', "CashReport"),
        ('<EquitySummaryByReportDateInBase accountId="U7654321"', "EquitySummaryInBase"),
    ],
)
def test_a_row_of_another_account_in_a_statement_is_refused_and_nothing_is_written(
    service, row, named
):
    # A statement is its account's (FlexStatement accountId): a row naming another
    # account is no part of it. Taken as that account's whole report, it would close
    # every other position of that account, and write one account's cash as another's.
    flex_connection()
    sync_positions(trigger="command", connection="myflex")
    service.add_statement(
        QUERY,
        lambda fd, td: statement_with_values(fd, td, quantity="99").replace(
            row, row.replace("U7654321", "U1111111")
        ),
    )

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    message = str(raised.value)
    assert "U1111111" in message and named in message and "nothing was written" in message
    assert not conf.account_model().objects.filter(external_id="U1111111").exists()
    assert not AccountReport.objects.filter(external_id="U1111111").exists()
    assert sorted(conf.position_model().objects.open().values_list("quantity", flat=True)) == [
        Decimal("-15"),
        Decimal("120"),
    ]
    assert SyncRun.objects.order_by("-pk").first().error_code == "flex_format_error"


def test_a_contract_listed_twice_in_open_positions_is_refused_and_nothing_is_written(service):
    # OpenPositions holds one summary row per position. Two of one contract (as split by
    # an advisor's models, or sent twice) are no single quantity: taking either one
    # stores a wrong position, so neither is taken.
    flex_connection()
    sync_positions(trigger="command", connection="myflex")

    def twice(fd, td):
        xml = statement_with_values(fd, td, quantity="99")
        start = xml.index('<OpenPosition accountId="U7654321" currency="USD"')
        end = xml.index("/>", start) + 2
        return xml[:end] + xml[start:end].replace('position="99"', 'position="21"') + xml[end:]

    service.add_statement(QUERY, twice)

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    message = str(raised.value)
    assert "265598" in message and "twice" in message and "nothing was written" in message
    assert sorted(conf.position_model().objects.open().values_list("quantity", flat=True)) == [
        Decimal("-15"),
        Decimal("120"),
    ]
    assert SyncRun.objects.order_by("-pk").first().error_code == "flex_format_error"


def test_an_expired_token_says_what_to_do_with_its_own_exit_code(service, api_client, syncer):
    flex_connection(token=EXPIRED)

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    assert raised.value.returncode == 10
    message = str(raised.value)
    assert "1012" in message and "generate a new one" in message
    run = SyncRun.objects.get()
    assert (run.status, run.error_code) == ("failed", "flex_token_rejected")
    api_client.force_authenticate(syncer)
    answer = api_client.post("/portfolio/sync/ibkr?connection=myflex")
    assert answer.status_code == 502
    assert answer.json()["code"] == "flex_token_rejected"


def test_an_unknown_account_is_refused(service):
    flex_connection()

    with pytest.raises(CommandError) as raised:
        call_command(
            "sync_ibkr", "--connection", "myflex", "--account", "U9999999", stdout=io.StringIO()
        )

    assert raised.value.returncode == 6
    assert "U7654321" in str(raised.value)


# --- an older statement never overwrites a newer read --------------------------------------


def test_an_older_statement_is_refused_for_an_account_a_gateway_read_since(service):
    Connection.objects.create(name="gateway", host="127.0.0.1", port=4002, client_id=3)
    flex_connection()
    gateway = FakeGateway(
        positions=[position(account="U7654321", con_id=265598, quantity="130")],
        accounts=("U7654321",),
    )
    sync_positions(trigger="command", connection="gateway", gateway=gateway)
    out = io.StringIO()

    call_command("sync_ibkr", "--connection", "myflex", stdout=out)

    assert "Not written: U7654321" in out.getvalue()
    run = SyncRun.objects.filter(connection_name="myflex").get()
    assert "U7654321" in run.accounts_refused and run.accounts == []
    [held] = conf.position_model().objects.filter(account__external_id="U7654321")
    assert held.quantity == Decimal("130")  # the gateway's, newer
    assert not conf.cash_balance_model().objects.exists()
    assert AccountReport.objects.get(external_id="U7654321").connection_name == "gateway"


def test_a_query_with_the_lots_of_open_positions_only_is_refused_and_closes_nothing(service):
    # Open Positions may be set to Lot rows only (no Summary): each position is then its
    # lots, none of them the position. Read as "no summary, so no position", every
    # position would be closed.
    flex_connection()
    sync_positions(trigger="command", connection="myflex")
    service.add_statement(
        QUERY,
        lambda fd, td: statement_with_values(fd, td).replace(
            'levelOfDetail="SUMMARY"', 'levelOfDetail="LOT"'
        ),
    )

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    message = str(raised.value)
    assert "Lot" in message and "Summary" in message and "nothing was written" in message
    assert conf.position_model().objects.open().count() == 2
    out = io.StringIO()
    call_command("ibkr_connection", "test", "myflex", stdout=out)
    assert "lots only" in out.getvalue()


def test_a_statement_that_ends_after_the_period_asked_for_is_refused(service):
    # Every request names its period, ending yesterday (the last day IBKR has closed). A
    # statement ending later is not the one asked for (a query's own period, a day not
    # closed yet): taken as the account's state as of its end, it would be "newer" than
    # every gateway read until that day, and a gateway's sync refused meanwhile.
    flex_connection()
    service.add_statement(
        QUERY, lambda fd, td: statement_with_values(fd, td + dt.timedelta(days=30))
    )

    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "myflex", stdout=io.StringIO())

    message = str(raised.value)
    end = yesterday()
    assert f"{end + dt.timedelta(days=30)}" in message and f"{end}" in message
    assert "nothing was written" in message
    assert not conf.position_model().objects.exists()
    assert not AccountReport.objects.exists()
    assert SyncRun.objects.get().error_code == "flex_format_error"


# --- Test connection ------------------------------------------------------------------------


def test_test_connection_asks_for_one_day_and_says_what_the_query_holds(service):
    flex_connection()
    out = io.StringIO()

    call_command("ibkr_connection", "test", "myflex", stdout=out)

    [request] = service.requests_to(SEND_REQUEST)
    assert request.params["fd"] == request.params["td"] == f"{yesterday():%Y%m%d}"
    text = out.getvalue()
    assert text.startswith("ok: Flex query Portfolio: accounts U7654321; sections ")
    assert "OpenPositions" in text and "ConversionRates" in text and "lacking" not in text
    assert not conf.position_model().objects.exists()


def test_test_connection_says_what_a_query_lacks(service):
    service.add_statement(QUERY, lambda fd, td: statement_with_values(fd, td, sections=()))
    flex_connection()

    check = check_connection("myflex")

    assert check.accounts == ("U7654321",)
    assert any("Open Positions: positions cannot be synced" in line for line in check.lacking)
    assert any("Cash Report" in line for line in check.lacking)


def test_test_connection_says_a_ledger_section_has_only_summaries(service):
    # Trades set to Orders (or symbol summaries) and Cash Transactions to Summary: their
    # rows are totals of transactions, never stored; the sync would store none.
    def summaries(fd, td):
        ledger = (
            '<Trades><Order accountId="U7654321" currency="USD" assetCategory="STK" '
            'symbol="AAPL" conid="265598" quantity="10" levelOfDetail="ORDER" /></Trades>'
            '<CashTransactions><CashTransaction accountId="U7654321" currency="USD" '
            'type="Dividends" amount="12" levelOfDetail="SUMMARY" /></CashTransactions>'
        )
        return statement_with_values(fd, td).replace(
            "</FlexStatement>", ledger + "</FlexStatement>"
        )

    service.add_statement(QUERY, summaries)
    flex_connection()

    check = check_connection("myflex")

    assert any("Trades" in line and "Execution" in line for line in check.lacking)
    assert any("Cash Transactions" in line and "Detail" in line for line in check.lacking)
    assert not any("Corporate Actions" in line for line in check.lacking)


def test_test_connection_with_an_expired_token(service):
    flex_connection(token=EXPIRED)

    with pytest.raises(CommandError) as raised:
        call_command("ibkr_connection", "test", "myflex", stdout=io.StringIO())

    assert raised.value.returncode == 10 and "expired" in str(raised.value)


# --- the connection's fields --------------------------------------------------------------


def test_each_kind_needs_its_own_fields():
    with pytest.raises(ValidationError, match="Flex token"):
        Connection(name="f", kind="flex", flex_query_id="12").full_clean()
    with pytest.raises(ValidationError, match="query id"):
        Connection(name="f", kind="flex", flex_token="x").full_clean()
    with pytest.raises(ValidationError, match="no Flex query id"):
        Connection(name="t", kind="tws", flex_query_id="12").full_clean()
    with pytest.raises(ValidationError, match="number"):
        Connection(name="f", kind="flex", flex_query_id="abc", flex_token="x").full_clean()


def test_the_database_refuses_a_flex_connection_without_its_token():
    with pytest.raises(IntegrityError), transaction.atomic():
        Connection.objects.create(name="f", kind="flex", flex_query_id="12")
    with pytest.raises(IntegrityError), transaction.atomic():
        Connection.objects.create(name="t", kind="tws", flex_query_id="12")


# --- the token at rest ----------------------------------------------------------------------


def stored_column(name: str = "myflex") -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT flex_token FROM ibkr_sync_connection WHERE name = %s", [name])
        return cursor.fetchone()[0]


def test_the_token_is_encrypted_at_rest(settings):
    settings.IBKR_SYNC_SECRET_KEY = KEY
    flex_connection()

    stored = stored_column()

    assert TOKEN not in stored and stored.startswith("gAAAAA")
    assert Connection.objects.get().reveal_flex_token() == TOKEN
    settings.IBKR_SYNC_SECRET_KEY = "another-key-entirely-0123456789-abcdefgh"
    from ibkr_sync.exceptions import SecretUnreadable

    with pytest.raises(SecretUnreadable, match="IBKR_SYNC_SECRET_KEY_FALLBACKS") as raised:
        Connection.objects.get().reveal_flex_token()
    assert TOKEN not in str(raised.value) and stored not in str(raised.value)


def test_rotating_the_key_re_encrypts_every_token(settings):
    settings.IBKR_SYNC_SECRET_KEY = KEY
    flex_connection()
    flex_connection("second", token=EXPIRED)
    before = stored_column()
    new = "second-ibkr-sync-secret-key-9876543210-zyxwv"
    settings.IBKR_SYNC_SECRET_KEY = new
    settings.IBKR_SYNC_SECRET_KEY_FALLBACKS = [KEY]
    assert Connection.objects.get(name="myflex").reveal_flex_token() == TOKEN  # a fallback
    out = io.StringIO()

    call_command("ibkr_connection", "rotate-keys", stdout=out)

    assert "2 Flex token(s) re-encrypted" in out.getvalue()
    assert stored_column() != before
    settings.IBKR_SYNC_SECRET_KEY_FALLBACKS = []
    assert Connection.objects.get(name="myflex").reveal_flex_token() == TOKEN
    assert Connection.objects.get(name="second").reveal_flex_token() == EXPIRED
    call_command("ibkr_connection", "rotate-keys", stdout=(again := io.StringIO()))
    assert "0 Flex token(s) re-encrypted, 2 current already" in again.getvalue()


def test_without_its_own_key_the_token_is_encrypted_with_django_s(settings):
    settings.IBKR_SYNC_SECRET_KEY = ""
    settings.SECRET_KEY = "django-secret-key-one-0123456789-abcdefghij"
    flex_connection()
    settings.SECRET_KEY = "django-secret-key-two-0123456789-abcdefghij"
    settings.SECRET_KEY_FALLBACKS = ["django-secret-key-one-0123456789-abcdefghij"]

    assert Connection.objects.get().reveal_flex_token() == TOKEN
    call_command("ibkr_connection", "rotate-keys", stdout=io.StringIO())
    settings.SECRET_KEY_FALLBACKS = []
    assert Connection.objects.get().reveal_flex_token() == TOKEN


# --- the token is never shown ---------------------------------------------------------------


def test_the_token_is_in_no_log_run_error_answer_or_page(
    service, caplog, api_client, admin_client, syncer, admin_user
):
    import logging

    caplog.set_level(logging.DEBUG)
    good = flex_connection()
    flex_connection("expired", token=EXPIRED)
    seen = []
    out, err = io.StringIO(), io.StringIO()
    call_command("sync_ibkr", "--connection", "myflex", "-v", "3", stdout=out, stderr=err)
    with pytest.raises(CommandError) as raised:
        call_command("sync_ibkr", "--connection", "expired", "-v", "3", stdout=out, stderr=err)
    seen += [str(raised.value), out.getvalue(), err.getvalue()]
    call_command("ibkr_connection", "test", "myflex", stdout=out)
    call_command("ibkr_connection", "list", stdout=out)
    seen.append(out.getvalue())
    api_client.force_authenticate(admin_user)
    for name in ("myflex", "expired"):
        seen.append(api_client.post(f"/portfolio/sync/ibkr?connection={name}").content)
    seen.append(api_client.get("/portfolio/sync/runs").content)
    for run in SyncRun.objects.all():
        seen.append(api_client.get(f"/portfolio/sync/runs/{run.pk}").content)
        seen.append(admin_client.get(f"/admin/ibkr_sync/syncrun/{run.pk}/change/").content)
        seen.append(json.dumps(list(SyncRun.objects.filter(pk=run.pk).values()), default=str))
    seen.append(admin_client.get("/admin/ibkr_sync/connection/").content)
    page = admin_client.get(f"/admin/ibkr_sync/connection/{good.pk}/change/")
    assert page.status_code == 200
    seen.append(page.content)
    seen.append(
        admin_client.post(f"/admin/ibkr_sync/connection/{good.pk}/test/", follow=True).content
    )
    seen.append(admin_client.get("/healthz").content)
    seen += [repr(good), str(good), repr(conf.FlexConfig.from_settings(good))]
    seen.append(caplog.text)
    seen.append(json.dumps([r.getMessage() for r in caplog.records]))

    text = "\n".join(s.decode() if isinstance(s, bytes) else s for s in seen)
    assert "U7654321" in text  # what was captured is the real output
    assert TOKEN not in text and EXPIRED not in text
    assert stored_column() not in text  # nor its ciphertext


# --- ibkr_connection add / set-token ------------------------------------------------------


def test_add_a_flex_connection_with_the_token_from_the_environment(service, monkeypatch):
    monkeypatch.setenv("MY_FLEX_TOKEN", TOKEN)
    out = io.StringIO()

    call_command(
        "ibkr_connection", "add", "myflex", "--kind", "flex", "--query-id", QUERY,
        "--token-from-env", "MY_FLEX_TOKEN", stdout=out,
    )  # fmt: skip

    assert "Added connection myflex: Flex query 445566, token saved encrypted" in out.getvalue()
    assert TOKEN not in out.getvalue()
    row = Connection.objects.get()
    assert (row.kind, row.flex_query_id, row.reveal_flex_token()) == ("flex", QUERY, TOKEN)
    call_command("ibkr_connection", "list", stdout=out)
    assert "myflex  flex  enabled  Flex query 445566  token set" in out.getvalue()
    assert sync_positions(trigger="command", connection="myflex").created == 2


def test_add_a_flex_connection_with_the_token_from_stdin(service):
    call_command(
        "ibkr_connection", "add", "myflex", "--kind", "flex", "--query-id", QUERY,
        "--token-stdin", stdin=io.StringIO(f"{TOKEN}\n"), stdout=io.StringIO(),
    )  # fmt: skip

    assert Connection.objects.get().reveal_flex_token() == TOKEN


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--kind", "flex", "--query-id", QUERY), "needs its token: --token-from-env"),
        (("--kind", "flex", "--query-id", QUERY, "--token-from-env", "UNSET_VAR_X"), "UNSET_VAR_X"),
        (("--kind", "flex", "--token-from-env", "MY_FLEX_TOKEN"), "query id"),
        (("--kind", "flex", "--query-id", "Q1", "--token-from-env", "MY_FLEX_TOKEN"), "number"),
        (("--kind", "flex", "--query-id", QUERY, "--port", "4002"), "no gateway"),
        (("--port", "4002"), "needs --client-id"),
        (("--port", "4002", "--client-id", "1", "--query-id", QUERY), "for a Flex connection"),
    ],
)
def test_add_refuses_what_its_kind_does_not_take(monkeypatch, arguments, message):
    monkeypatch.setenv("MY_FLEX_TOKEN", TOKEN)

    with pytest.raises(CommandError, match=message) as raised:
        call_command("ibkr_connection", "add", "c", *arguments, stdout=io.StringIO())

    assert raised.value.returncode == 2
    assert not Connection.objects.exists()


def test_set_token_replaces_an_expired_token(service, monkeypatch):
    flex_connection(token=EXPIRED)
    monkeypatch.setenv("NEW_FLEX_TOKEN", TOKEN)

    call_command(
        "ibkr_connection", "set-token", "myflex", "--token-from-env", "NEW_FLEX_TOKEN",
        stdout=io.StringIO(),
    )  # fmt: skip

    assert sync_positions(trigger="command", connection="myflex").created == 2


# --- the admin's form -----------------------------------------------------------------------


def _form(**fields) -> dict:
    return {
        "name": "myflex", "kind": "flex", "enabled": "on", "host": "127.0.0.1",
        "port": "7497", "client_id": "1", "flex_query_id": QUERY, "new_flex_token": "",
        "note": "", **fields,
    }  # fmt: skip


def test_the_admin_takes_a_token_and_never_shows_it_again(service, admin_client):
    added = admin_client.post(
        "/admin/ibkr_sync/connection/add/", _form(new_flex_token=TOKEN), follow=True
    )
    assert added.status_code == 200 and TOKEN not in added.content.decode()
    row = Connection.objects.get()
    assert row.reveal_flex_token() == TOKEN
    stored = row.flex_token

    page = admin_client.get(f"/admin/ibkr_sync/connection/{row.pk}/change/").content.decode()

    assert TOKEN not in page and stored not in page
    assert 'type="password"' in page and "Stored Flex token" in page
    assert '<div class="readonly">set</div>' in page
    assert 'name="port"' not in page  # a Flex connection's page: no gateway fields
    # Saved with the token left empty: the stored one is kept.
    admin_client.post(f"/admin/ibkr_sync/connection/{row.pk}/change/", _form(note="kept"))
    row.refresh_from_db()
    assert (row.note, row.flex_token) == ("kept", stored)
    # A new one replaces it.
    admin_client.post(
        f"/admin/ibkr_sync/connection/{row.pk}/change/", _form(new_flex_token=EXPIRED)
    )
    row.refresh_from_db()
    assert row.reveal_flex_token() == EXPIRED


def test_the_admin_refuses_a_flex_connection_without_a_token(admin_client):
    page = admin_client.post("/admin/ibkr_sync/connection/add/", _form())

    assert page.status_code == 200
    assert "A Flex connection needs its Flex token." in page.content.decode()
    assert not Connection.objects.exists()


def test_the_admin_s_test_connection_for_flex(service, admin_client):
    row = flex_connection()
    service.add_statement(
        QUERY, lambda fd, td: statement_with_values(fd, td, sections=("OpenPositions",))
    )

    page = admin_client.post(f"/admin/ibkr_sync/connection/{row.pk}/test/", follow=True)

    text = page.content.decode()
    assert (
        "Connection myflex (Flex query 445566): ok: Flex query Portfolio: accounts U7654321" in text
    )
    assert "lacking: no Cash Report" in text
