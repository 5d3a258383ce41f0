"""The same Flex statement downloaded again while one of its accounts is refused (a newer
report of it stands: a gateway read it later the same day). Not read again while the
account would be refused again, its history as the statement left it: the repeat then
says the refusal in the words a full read would say it now, and the run, the API's
answer, the command's output and the database are as after a full read. Read whole as
soon as the account would be applied (its newer report gone, or now older) or its
history changed. The real client over real HTTP against the fake Flex Web Service, the
service and the writer, into the database (SQLite, or PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.models import Model

from ibkr_sync import conf
from ibkr_sync.models import AccountReport, Connection, PositionChange, SyncRun
from ibkr_sync.services import SyncResult, sync_positions

from .test_backfill import ACCOUNT, Trade
from .test_flex_connection import QUERY, flex_connection, period_end, service  # noqa: F401
from .test_repeat import END, figures, parsing_fails, sync
from .test_repeat_attacks import OTHER, repeated, two_accounts

pytestmark = pytest.mark.django_db

#: Columns that say when a sync wrote or confirmed a row, not what it holds: a full read
#: stamps them again, a repeat stamps the accounts synced.
STAMPS = {"last_synced_at", "synced_at", "applied_at", "sync_run_id"}


def written_models() -> list[type[Model]]:
    return [
        conf.account_model(),
        conf.instrument_model(),
        conf.position_model(),
        conf.cash_balance_model(),
        conf.account_snapshot_model(),
        *conf.ledger_models().values(),
        AccountReport,
        PositionChange,
    ]


def stored() -> dict[str, list[dict]]:
    """Every row the sync writes, table by table, in pk order."""
    return {
        model._meta.label: list(model._default_manager.order_by("pk").values())
        for model in written_models()
    }


def unstamped(tables: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """`tables` (`stored()`) without the columns of `STAMPS`."""
    return {
        label: [{k: v for k, v in row.items() if k not in STAMPS} for row in rows]
        for label, rows in tables.items()
    }


def a_gateway_read(account: str = ACCOUNT, *, hours: float = 1) -> Connection:
    """A gateway's report of `account` after the statement's period end: it stands."""
    gateway, _ = Connection.objects.get_or_create(
        name="gateway", defaults={"kind": "tws", "host": "127.0.0.1", "port": 4001}
    )
    AccountReport.objects.filter(external_id=account).update(
        connection=gateway,
        connection_name="gateway",
        as_of=period_end(END) + dt.timedelta(hours=hours),
    )
    return gateway


def refused_once(service) -> SyncResult:  # noqa: F811
    """A statement of two accounts applied, then ACCOUNT read later by a gateway, then
    the statement read whole again: ACCOUNT refused, OTHER applied. Its result."""
    service.add_statement(QUERY, two_accounts)
    flex_connection()
    sync()
    a_gateway_read()
    full = sync()
    assert list(full.accounts_refused) == [ACCOUNT] and full.accounts == [OTHER]
    assert not repeated(full)
    return full


def forget_the_statement() -> None:
    """The last run's record of its statement forgotten: the next sync reads it whole."""
    last = SyncRun.objects.filter(status="success").order_by("-finished_at", "-pk").first()
    SyncRun.objects.filter(pk=last.pk).update(statement={})


def test_a_statement_refused_for_an_account_is_not_read_again(service, monkeypatch):  # noqa: F811
    full = refused_once(service)
    before = stored()
    parsing_fails(monkeypatch)

    again = sync()

    assert repeated(again)
    assert figures(again) == figures(full)
    run = SyncRun.objects.get(pk=again.sync_run_id)
    assert run.accounts_refused == SyncRun.objects.get(pk=full.sync_run_id).accounts_refused
    assert run.statement["repeats"] == full.sync_run_id
    # Nothing written but the stamp of the account applied, synced now.
    after = stored()
    assert unstamped(after) == unstamped(before)
    label = conf.account_model()._meta.label
    assert {k: v for k, v in after.items() if k != label} == {
        k: v for k, v in before.items() if k != label
    }
    assert after[label] != before[label]
    # And a repeat of the repeat.
    third = sync()
    assert repeated(third) and figures(third) == figures(full)


def test_the_repeat_and_a_full_read_now_give_the_same_outcome_and_rows(
    service,  # noqa: F811
    monkeypatch,
):
    refused_once(service)
    parsing_fails(monkeypatch)
    again = sync()
    assert repeated(again)
    rows = unstamped(stored())
    monkeypatch.undo()
    forget_the_statement()

    full = sync()

    assert not repeated(full)
    assert figures(full) == figures(again)
    assert SyncRun.objects.get(pk=full.sync_run_id).accounts_refused == (
        SyncRun.objects.get(pk=again.sync_run_id).accounts_refused
    )
    assert unstamped(stored()) == rows


@pytest.mark.parametrize("change", ["later", "by this connection"])
def test_the_reason_is_the_one_a_full_read_gives_now(service, monkeypatch, change):  # noqa: F811
    """The newer report changed since, and still stands: the repeat says it as it is now
    (its moment, whose it is), word for word as a full read of the statement does."""
    refused_once(service)
    if change == "later":
        a_gateway_read(hours=5)
    else:
        AccountReport.objects.filter(external_id=ACCOUNT).update(
            connection=Connection.objects.get(name="myflex"), connection_name="myflex"
        )
    parsing_fails(monkeypatch)
    again = sync()
    assert repeated(again)
    monkeypatch.undo()
    forget_the_statement()

    full = sync()

    assert not repeated(full)
    assert again.accounts_refused == full.accounts_refused
    assert figures(again) == figures(full)
    if change == "by this connection":
        assert "this connection reported it" in again.accounts_refused[ACCOUNT]


def test_an_account_another_owner_holds_since_is_read_whole(service, monkeypatch):  # noqa: F811
    """The newer report's connection given to an owner since: a full read now writes
    nothing of the account, its history neither (`writer.apply_snapshot`), where the
    statement's write left its history written; so the statement is read whole, not
    repeated. Then the same statement again is the repeat, which says the refusal as the
    full read did, and whose it is neither."""
    refused_once(service)
    owner = get_user_model().objects.create_user("owner", password="pw-owner-123")
    Connection.objects.filter(name="gateway").update(owner=owner)
    history = {
        label: rows
        for label, rows in unstamped(stored()).items()
        if label.endswith(("Trade", "AccountSnapshot"))
    }

    full = sync()

    assert not repeated(full) and full.accounts == [OTHER]
    assert full.accounts_refused[ACCOUNT] == (
        f"{ACCOUNT} was not written: this connection may not write it."
    )
    assert full.ledger["trades"] == {"created": 0, "updated": 0, "unchanged": 0}
    assert {label: unstamped(stored())[label] for label in history} == history
    parsing_fails(monkeypatch)

    again = sync()

    assert repeated(again)
    assert figures(again) == figures(full)


def test_an_account_refused_no_more_is_read_and_applied(service):  # noqa: F811
    """Its newer report gone (the gateway's removed), or now older than the statement:
    a full read applies the account, so the statement is read whole."""
    refused_once(service)
    AccountReport.objects.filter(external_id=ACCOUNT).update(
        as_of=period_end(END) - dt.timedelta(hours=1)
    )

    older = sync()

    assert not repeated(older) and sorted(older.accounts) == sorted([ACCOUNT, OTHER])
    assert older.accounts_refused == {}
    a_gateway_read()
    assert sync().accounts_refused  # refused again: read whole (the report changed)
    AccountReport.objects.filter(external_id=ACCOUNT).delete()

    gone = sync()

    assert not repeated(gone) and sorted(gone.accounts) == sorted([ACCOUNT, OTHER])
    assert AccountReport.objects.get(external_id=ACCOUNT).sync_run_id == gone.sync_run_id


def test_the_history_of_a_refused_account_changed_since_is_written_again(service):  # noqa: F811
    """A refused account's ledger and days are written all the same: one deleted since
    is written again by a full read, so the statement is not a repeat."""
    refused_once(service)
    trades = Trade().objects.filter(account__external_id=ACCOUNT)
    assert trades.count() == 1
    trades.delete()

    again = sync()

    assert not repeated(again) and list(again.accounts_refused) == [ACCOUNT]
    assert again.ledger["trades"]["created"] == 1 and trades.count() == 1
    days = conf.account_snapshot_model().objects.filter(account__external_id=ACCOUNT)
    total = days.count()
    days.filter(taken_at=period_end(END - dt.timedelta(days=3))).delete()

    later = sync()

    assert not repeated(later) and later.snapshots["created"] == 1 and days.count() == total


# --- what the command and the API say ------------------------------------------------


def plain_refused(service) -> None:  # noqa: F811
    """As `refused_once`, by plain syncs (the period the source chooses): the last one
    read the statement of the period the next ones ask for."""
    service.add_statement(QUERY, two_accounts)
    flex_connection()
    sync_positions(trigger="command", connection="myflex")
    a_gateway_read()
    for _ in range(2):  # the second period (after the first's end), read whole
        result = sync_positions(trigger="command", connection="myflex")
    assert list(result.accounts_refused) == [ACCOUNT]


def last_repeated() -> bool:
    return "repeats" in SyncRun.objects.latest("pk").statement


def command(*args: str) -> str:
    out = io.StringIO()
    call_command("sync_ibkr", "--connection", "myflex", "-v", "2", *args, stdout=out)
    return out.getvalue()


def test_the_command_says_the_same_of_the_repeat_as_of_a_full_read(service, monkeypatch):  # noqa: F811
    plain_refused(service)
    parsing_fails(monkeypatch)
    said = command()
    told = json.loads(command("--json"))
    assert last_repeated()
    monkeypatch.undo()
    forget_the_statement()

    full_said = command()
    forget_the_statement()
    full_told = json.loads(command("--json"))

    assert not last_repeated()
    assert f"Not written: {ACCOUNT}: " in said
    assert re.sub(r"#\d+", "#", said) == re.sub(r"#\d+", "#", full_said)
    assert _without_runs(told) == _without_runs(full_told)


def _without_runs(answer):
    """A command's or the API's answer without what differs from run to run."""
    if isinstance(answer, dict):
        return {
            key: _without_runs(value)
            for key, value in answer.items()
            if key not in ("sync_run_id", "started_at", "finished_at", "url", "sync_run")
        }
    if isinstance(answer, list):
        return [_without_runs(value) for value in answer]
    return answer


def test_the_api_answers_the_same_of_the_repeat_as_of_a_full_read(
    service,  # noqa: F811
    monkeypatch,
    api_client,
    syncer,
):
    plain_refused(service)
    api_client.force_authenticate(syncer)
    parsing_fails(monkeypatch)
    repeat = api_client.post("/portfolio/sync/ibkr?connection=myflex")
    assert repeat.status_code == 200, repeat.content
    assert last_repeated()
    monkeypatch.undo()
    forget_the_statement()

    full = api_client.post("/portfolio/sync/ibkr?connection=myflex")

    assert full.status_code == 200, full.content
    assert not last_repeated()
    assert list(repeat.json()["accounts_refused"]) == [ACCOUNT]
    assert _without_runs(repeat.json()) == _without_runs(full.json())
