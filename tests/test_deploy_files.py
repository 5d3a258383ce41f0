"""The deployment files as written: the systemd units of the worker and beat beside the
web app's, and deploy/compose.yaml (its services, their commands, and every variable it
or its env file uses being one the project reads and documents). The worker's unit is
also run for real, stop included (tests/reliability/test_worker_unit.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from ibkr_sync import environment
from ibkr_sync.models import Connection

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LONGEST_SYNC = environment.SETTINGS["IBKR_SYNC_STALE_AFTER"].default
APP_SERVICES = ("migrate", "web", "worker", "beat")
CELERY_UNITS = ("celery-worker.service", "celery-beat.service")


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit's sections, each key with its values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, (key, values)
    return values[0]


# --- systemd ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CELERY_UNITS)
def test_the_celery_units_run_as_the_web_app_does(name):
    web, celery = unit("portfolio.service")["Service"], unit(name)["Service"]

    for key in ("User", "Group", "WorkingDirectory", "NoNewPrivileges", "PrivateTmp",
                "ProtectSystem", "ProtectHome", "Restart", "RestartSec"):  # fmt: skip
        assert one(celery, key) == one(web, key), key
    # The settings file settings.py reads, optional as it is for the web app.
    assert one(celery, "EnvironmentFile") == "-" + one(web, "WorkingDirectory") + "/.env"
    command = shlex.split(one(celery, "ExecStart"))
    assert command[:3] == ["/srv/portfolio/.venv/bin/celery", "-A", "portfolio_site"]
    assert one(celery, "Type") == "simple", "celery stays in the foreground"
    assert unit(name)["Install"]["WantedBy"] == ["multi-user.target"]
    after = one(unit(name)["Unit"], "After").split()
    assert {"postgresql.service", "redis-server.service"} <= set(after)


def test_the_worker_stops_warm_and_is_given_longer_than_the_longest_sync():
    service = unit("celery-worker.service")["Service"]
    command = shlex.split(one(service, "ExecStart"))

    assert command[3] == "worker" and "-Q" not in command, "every queue"
    # SIGTERM to the main process only: Celery's warm shutdown, its running syncs end.
    assert (one(service, "KillSignal"), one(service, "KillMode")) == ("SIGTERM", "mixed")
    assert int(one(service, "TimeoutStopSec")) > LONGEST_SYNC
    # systemd turns %% into %: Celery gets its own %h (the host name), not systemd's home.
    assert "--hostname" in command and command[command.index("--hostname") + 1].endswith("@%%h")


def test_beat_reads_its_schedules_from_the_database():
    command = shlex.split(one(unit("celery-beat.service")["Service"], "ExecStart"))

    assert command[3] == "beat"
    scheduler = command[command.index("--scheduler") + 1]
    assert scheduler == "django_celery_beat.schedulers:DatabaseScheduler"


@pytest.mark.processes
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not here")
@pytest.mark.parametrize(
    "name", [*CELERY_UNITS, "portfolio.service", "sync-ibkr.service", "sync-ibkr.timer"]
)
def test_systemd_reads_every_line_of_the_unit(name, tmp_path):
    """systemd-analyze verify, with the paths of this machine's project and virtualenv and
    its user: an unknown key or a value systemd cannot parse is a warning naming the file."""

    def here(path: Path) -> str:
        text = path.read_text().replace(
            "/srv/portfolio/.venv/bin", str(Path(sys.executable).parent)
        )
        text = text.replace("/srv/portfolio", str(ROOT))
        return re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.M)

    (tmp_path / name).write_text(here(DEPLOY / name))
    if name.endswith(".timer"):
        (tmp_path / "sync-ibkr.service").write_text(here(DEPLOY / "sync-ibkr.service"))

    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip

    problems = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
    assert done.returncode == 0 and not problems, done.stderr


# --- compose ------------------------------------------------------------------------------

COMPOSE_TEXT = (DEPLOY / "compose.yaml").read_text()
GATEWAYS_MARKER = "# --- IB Gateway, one service per IBKR login"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_TEXT)


def gateway_services() -> dict:
    """The commented-out IB Gateway services, as they are once uncommented."""
    block = COMPOSE_TEXT.split(GATEWAYS_MARKER, 1)[1].split("\nvolumes:", 1)[0]
    block = block[block.index("\n  # ib-gateway-") :]  # after the explanation
    yaml_lines = [line.replace("#", " ", 1) for line in block.splitlines() if line.strip()]
    return yaml.safe_load("\n".join(yaml_lines))


def test_compose_runs_the_web_app_the_worker_beat_redis_and_postgres(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", *APP_SERVICES[1:]}
    web_unit = shlex.split(one(unit("portfolio.service")["Service"], "ExecStart"))

    assert services["web"]["command"] == ["gunicorn", *web_unit[1:]]
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "portfolio_site", "worker"]
    assert services["beat"]["command"] == [
        "celery", "-A", "portfolio_site", "beat", "--loglevel", "INFO",
        "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
    ]  # fmt: skip
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY.parent / service["build"]["dockerfile"]).is_file()
        assert service["env_file"] == [{"path": ".env", "required": True}]
        assert service["environment"]["IBKR_SYNC_TASK_QUEUE"] == "celery"
        assert service["environment"]["CELERY_BROKER_URL"] == "redis://redis:6379/0"
        assert "@postgres:5432/" in service["environment"]["DATABASE_URL"]
    for name in APP_SERVICES[1:]:
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
        }
        assert services[name]["restart"] == "unless-stopped"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"


def test_compose_checks_health_keeps_data_and_publishes_only_the_site(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "healthcheck" not in services["beat"], "documented: beat has none"
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    assert set(compose["volumes"]) == {"postgres-data", "redis-data"}
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"web": ["127.0.0.1:8000:8000"]}
    # The worker's running syncs end before Docker kills it (its warm shutdown).
    worker = services["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert int(worker["stop_grace_period"].removesuffix("s")) > LONGEST_SYNC


def test_the_commented_gateways_are_valid_services_restarting_at_different_times():
    gateways = gateway_services()

    assert set(gateways) == {"ib-gateway-home", "ib-gateway-paper"}
    times = [g["environment"]["AUTO_RESTART_TIME"] for g in gateways.values()]
    assert len(set(times)) == len(times), "staggered daily restarts"
    for gateway in gateways.values():
        env = gateway["environment"]
        assert gateway["image"].startswith("ghcr.io/gnzsnz/ib-gateway:")
        assert env["READ_ONLY_API"] == "yes", "this app only reads"
        assert "ports" not in gateway, "the gateway's API is private to the containers"
        port = {"live": "4003", "paper": "4004"}[env["TRADING_MODE"]]
        assert f"/dev/tcp/127.0.0.1/{port}" in gateway["healthcheck"]["test"][1]


@pytest.mark.django_db
def test_the_connection_line_in_compose_adds_a_connection_to_its_gateway():
    line = next(line for line in COMPOSE_TEXT.splitlines() if "ibkr_connection add" in line)
    args = shlex.split(line.lstrip("# "))[2:]  # after `python manage.py`

    call_command(*args, stdout=StringIO())

    row = Connection.objects.get()
    assert row.host in gateway_services()
    assert (row.kind, row.port) == ("tws", 4003)  # the live relay of ib-gateway-home


def _interpolated(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


def _example_variables() -> set[str]:
    text = (DEPLOY / "env.example").read_text()
    return set(re.findall(r"^(?:# )?([A-Z_][A-Z0-9_]*)=", text, flags=re.M))


def _read_by_the_project() -> set[str]:
    """The variables the settings module and the gunicorn config read."""
    sources = (ROOT / "portfolio_site" / "settings.py").read_text()
    sources += (DEPLOY / "gunicorn.conf.py").read_text()
    return set(environment.SETTINGS) | set(re.findall(r"[\"']([A-Z_][A-Z0-9_]{2,})[\"']", sources))


def test_every_variable_compose_uses_is_in_the_env_file_and_read_by_the_project(compose):
    example = _example_variables()
    interpolated = _interpolated(COMPOSE_TEXT)
    assert "POSTGRES_PASSWORD" in interpolated
    assert interpolated <= example, interpolated - example

    # What compose sets for the app and what the env file holds: settings of the project
    # (a misspelt name would be ignored in silence), or compose's own (its ${...}).
    app_variables = set(compose["services"]["web"]["environment"]) | example
    unknown = app_variables - _read_by_the_project() - interpolated
    assert not unknown, unknown
    readme = (ROOT / "README.md").read_text()
    production = readme.split("## 6. Running it in production", 1)[1].split("\n## 7.", 1)[0]
    for name in app_variables - interpolated:
        assert name in production or name in (DEPLOY / "env.example").read_text(), name


@pytest.mark.processes
def test_the_visibility_timeout_outlasts_the_longest_sync_whatever_the_setting():
    """The project's Celery app hands the broker a visibility timeout longer than the
    longest sync, following IBKR_SYNC_STALE_AFTER; a shorter one is refused at start."""
    code = (
        "import json, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
        "'portfolio_site.settings'); import django; django.setup(); "
        "from django.conf import settings; from portfolio_site.celery import app; "
        "print(json.dumps([app.conf.broker_transport_options['visibility_timeout'], "
        "settings.IBKR_SYNC_STALE_AFTER]))"
    )

    def read(**values: str) -> subprocess.CompletedProcess:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("IBKR_", "CELERY_", "DJANGO_"))
        }
        env.update(DEBUG="true", ENV_FILE="", **values)
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    for values in ({}, {"IBKR_SYNC_STALE_AFTER": "3000"}, {"CELERY_VISIBILITY_TIMEOUT": "1000"}):
        done = read(**values)
        assert done.returncode == 0, done.stderr
        timeout, longest = json.loads(done.stdout)
        assert timeout > longest, values
    assert json.loads(read().stdout)[0] == 3600
    assert json.loads(read(IBKR_SYNC_STALE_AFTER="3000").stdout)[0] == 6000

    refused = read(CELERY_VISIBILITY_TIMEOUT="900")  # not longer than 900 s
    assert refused.returncode != 0
    assert "CELERY_VISIBILITY_TIMEOUT" in refused.stderr


@pytest.mark.processes
def test_check_deploy_passes_with_the_containers_settings(compose):
    """deploy/env.example (its blanks filled) with what compose sets for the app."""
    text = (DEPLOY / "env.example").read_text()
    values = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, flags=re.M))
    values.update(SECRET_KEY="kT3" + "x9Zq-" * 12, POSTGRES_PASSWORD="secret")
    values.update(compose["services"]["web"]["environment"])
    values["DATABASE_URL"] = "sqlite:///unused.sqlite3"  # `check` does not connect
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IBKR_", "CELERY_"))}
    env.update(ENV_FILE="", **values)
    env.pop("DEBUG", None)

    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    warnings = set(re.findall(r"\((\w+\.[EW]\d+)\)", done.stderr))
    assert warnings <= {"security.W005", "security.W021"}, done.stderr
