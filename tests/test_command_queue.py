"""`manage.py sync_ibkr --queue`: the sync handed to the task queue (a real broker: Redis)
instead of run in the command; without --queue the command syncs itself, queue or no
queue."""

import json
import socket
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ibkr_sync.models import Connection, SyncRun
from portfolio.models import Position
from tests.queue_broker import sent
from tests.test_command import closed_port, command_env, manage  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def sync_ibkr(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("sync_ibkr", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_queue_records_a_queued_run_sends_its_task_and_syncs_nothing_here(task_queue, use_gateway):
    out, err = sync_ibkr("--queue")

    run = SyncRun.objects.get()
    assert out == f"IBKR sync #{run.pk} queued\n" and err == ""
    assert (run.status, run.trigger, run.owner) == ("queued", "command", "")
    assert run.queued_at is not None
    assert sent(task_queue, "ibkr_sync.gateway") == [("ibkr_sync.sync_connection", [run.pk])]
    assert use_gateway.calls == [] and not Position.objects.exists()


def test_queue_with_an_account_and_json_prints_the_queued_run(task_queue, use_gateway):
    out, _ = sync_ibkr("--queue", "--account", "u1111111", "--json")

    run = SyncRun.objects.get()
    assert json.loads(out) == {"status": "queued", "sync_run_id": run.pk, "connection": None}
    assert run.account_filter == "U1111111"


def test_queue_all_queues_one_run_per_enabled_connection_each_to_its_kinds_queue(task_queue):
    home = Connection.objects.create(name="home", port=4001, client_id=1)
    flex = Connection(name="statements", kind="flex", flex_query_id="123456")
    flex.set_flex_token("1" * 24)
    flex.save()
    Connection.objects.create(name="off", port=4002, client_id=2, enabled=False)

    out, err = sync_ibkr("--queue", "--all")

    runs = {run.connection_name: run for run in SyncRun.objects.all()}
    assert set(runs) == {"home", "statements"} and err == ""
    assert out.splitlines() == [
        f"IBKR sync #{runs['home'].pk} of connection home queued",
        f"IBKR sync #{runs['statements'].pk} of connection statements queued",
    ]
    assert runs["home"].connection == home and runs["statements"].connection == flex
    assert sent(task_queue, "ibkr_sync.gateway") == [
        ("ibkr_sync.sync_connection", [runs["home"].pk])
    ]
    assert sent(task_queue, "ibkr_sync.flex") == [
        ("ibkr_sync.sync_connection", [runs["statements"].pk])
    ]

    out, _ = sync_ibkr("--queue", "--all", "--json")
    assert [(e["status"], e["connection"]) for e in json.loads(out)] == [
        ("queued", "home"),
        ("queued", "statements"),
    ]


def test_queue_with_a_connection_queues_that_one(task_queue):
    Connection.objects.create(name="home", port=4001, client_id=1)
    Connection.objects.create(name="work", port=4002, client_id=2)

    out, _ = sync_ibkr("--queue", "--connection", "work")

    run = SyncRun.objects.get()
    assert run.connection_name == "work"
    assert out == f"IBKR sync #{run.pk} of connection work queued\n"


def test_without_a_queue_configured_queue_is_exit_2_and_nothing_is_recorded(settings, use_gateway):
    settings.IBKR_SYNC_TASK_QUEUE = ""

    with pytest.raises(CommandError) as raised:
        sync_ibkr("--queue")

    assert raised.value.returncode == 2
    assert "IBKR_SYNC_TASK_QUEUE=celery" in str(raised.value)
    assert not SyncRun.objects.exists() and use_gateway.calls == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--queue", "--dry-run"), "cannot be queued"),
        (("--queue", "--all", "--account", "U1111111"), "--account goes with one connection"),
        (("--queue", "--connection", " "), "--connection is empty"),
    ],
)
def test_options_that_cannot_be_queued_are_exit_2(task_queue, args, words):
    with pytest.raises(CommandError) as raised:
        sync_ibkr(*args)

    assert raised.value.returncode == 2 and words in str(raised.value)
    assert not SyncRun.objects.exists()
    assert task_queue.dbsize() == 0


def test_queue_refusals_are_the_synchronous_ones(task_queue):
    Connection.objects.create(name="home", port=4001, client_id=1)
    Connection.objects.create(name="work", port=4002, client_id=2)

    for args, code in ((("--connection", "nope"), 2), ((), 2), (("--account", "x"), 2)):
        with pytest.raises(CommandError) as raised:
            sync_ibkr("--queue", *args)
        assert raised.value.returncode == code, args
    assert not SyncRun.objects.exists()


@pytest.mark.processes
def test_a_broker_that_does_not_answer_fails_the_run_and_is_exit_11(
    command_env,  # noqa: F811
    closed_port,  # noqa: F811
):
    env = {
        **command_env,
        "IBKR_SYNC_TASK_QUEUE": "celery",
        # A port nothing listens on: the broker is down.
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{closed_port}/5",
    }
    result = manage("sync_ibkr", "--queue", env=env)

    assert result.returncode == 11, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CommandError: The task queue"), lines
    assert "Is its broker running?" in lines[0]
    runs = manage("shell", "-c", SHOW_RUNS, env=env, check=True).stdout.split()
    assert runs[-1:] == ["failed:queue_unavailable"]


SHOW_RUNS = (
    "from ibkr_sync.models import SyncRun; "
    "print(' '.join(f'{r.status}:{r.error_code}' for r in SyncRun.objects.order_by('pk')))"
)


def test_without_queue_the_command_syncs_here_even_with_the_queue_configured(
    task_queue, use_gateway
):
    out, _ = sync_ibkr()

    run = SyncRun.objects.get()
    assert out.startswith(f"IBKR sync #{run.pk}: 2 positions")
    assert (run.status, run.queued_at) == ("success", None)
    assert task_queue.dbsize() == 0


def connections_named(*names: str) -> list[Connection]:
    return [
        Connection.objects.create(name=name, port=4001 + i, client_id=1 + i)
        for i, name in enumerate(names)
    ]


def queued_by_queue_all(connection_names: list[str]) -> tuple[list, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from ibkr_sync import services

    with CaptureQueriesContext(connection) as queries:
        outcomes = services.queue_all(trigger=SyncRun.Trigger.COMMAND)
    assert [o.connection for o in outcomes] == connection_names
    return outcomes, len(queries)


def test_queue_all_records_every_run_together_in_queries_that_do_not_grow(task_queue):
    few = [f"few{i}" for i in range(3)]
    connections_named(*few)
    _, queries_for_three = queued_by_queue_all(few)

    Connection.objects.all().delete()
    SyncRun.objects.all().delete()
    task_queue.flushdb()
    many = [f"gw{i:02d}" for i in range(30)]
    connections_named(*many)
    outcomes, queries_for_thirty = queued_by_queue_all(many)

    assert queries_for_thirty == queries_for_three
    runs = SyncRun.objects.in_bulk([o.run.pk for o in outcomes])
    for outcome in outcomes:
        run = runs[outcome.run.pk]
        assert outcome.error is None and outcome.run.pk == run.pk
        assert (run.status, run.trigger, run.connection_name) == (
            "queued",
            "command",
            outcome.connection,
        )
        assert run.connection.name == outcome.connection
        assert run.lock_key == run.connection.lock_key and run.account_filter == ""
        assert run.queued_at is not None and run.queued_at == run.started_at
        assert outcome.run.queued_at == run.queued_at  # the database's time, read back
    assert sent(task_queue, "ibkr_sync.gateway") == [
        ("ibkr_sync.sync_connection", [o.run.pk]) for o in outcomes
    ]


def test_queue_all_with_a_connection_removed_meanwhile_queues_the_others_one_by_one(
    task_queue, monkeypatch
):
    from ibkr_sync import connections, services

    connections_named("alpha", "beta", "gamma")
    listed = connections.enabled_targets()  # read before beta is removed
    Connection.objects.filter(name="beta").delete()
    monkeypatch.setattr(connections, "enabled_targets", lambda: listed)

    outcomes = services.queue_all(trigger=SyncRun.Trigger.COMMAND)

    assert [(o.connection, o.error.code if o.error else None) for o in outcomes] == [
        ("alpha", None),
        ("beta", "unknown_connection"),
        ("gamma", None),
    ]
    runs = list(SyncRun.objects.order_by("pk").values_list("connection_name", "status"))
    assert runs == [("alpha", "queued"), ("gamma", "queued")]  # the bulk insert left nothing
    assert [args for _, args in sent(task_queue, "ibkr_sync.gateway")] == [
        [outcomes[0].run.pk],
        [outcomes[2].run.pk],
    ]


def test_queue_all_fails_alone_the_run_the_queue_refuses(task_queue, monkeypatch):
    from ibkr_sync import services, tasks

    connections_named("alpha", "beta", "gamma")
    send = tasks.enqueue

    def refuse_beta(sync_run_id: int, kind: str) -> None:
        if SyncRun.objects.get(pk=sync_run_id).connection_name == "beta":
            raise ConnectionRefusedError("the broker closed the connection")
        send(sync_run_id, kind)

    monkeypatch.setattr(tasks, "enqueue", refuse_beta)

    outcomes = services.queue_all(trigger=SyncRun.Trigger.COMMAND)

    assert [(o.connection, o.error.code if o.error else None) for o in outcomes] == [
        ("alpha", None),
        ("beta", "queue_unavailable"),
        ("gamma", None),
    ]
    statuses = dict(SyncRun.objects.values_list("connection_name", "status"))
    assert statuses == {"alpha": "queued", "beta": "failed", "gamma": "queued"}
    assert "Is its broker running?" in str(outcomes[1].error)
    assert len(sent(task_queue, "ibkr_sync.gateway")) == 2


@pytest.fixture
def silent_broker():
    """A port that accepts connections and never answers (a frozen Redis, a half-open
    path through a firewall): the kernel completes each handshake, nothing reads."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.processes
def test_a_broker_that_accepts_and_never_answers_fails_the_run_in_bounded_time(
    command_env,  # noqa: F811
    silent_broker,
):
    env = {
        **command_env,
        "IBKR_SYNC_TASK_QUEUE": "celery",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{silent_broker}/5",
    }
    started = time.monotonic()
    result = manage("sync_ibkr", "--queue", env=env)  # its own timeout: 60 s

    assert time.monotonic() - started < 40, "the publish waited on the silent broker"
    assert result.returncode == 11, result.stderr
    assert "Is its broker running?" in result.stderr
    runs = manage("shell", "-c", SHOW_RUNS, env=env, check=True).stdout.split()
    assert runs[-1:] == ["failed:queue_unavailable"], "no run left queued"
