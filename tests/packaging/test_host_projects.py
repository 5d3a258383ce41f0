"""The distribution in someone else's project: the wheel built from this repository,
installed into a fresh virtualenv, in two projects made with `django-admin startproject`:

- plain: the apps as the README's "Add to an existing project" says, with our
  `portfolio` app;
- own: a host whose own app is called `portfolio`, with models of its own names built on
  the abstract bases plus fields of its own, named in IBKR_SYNC_*_MODEL, and a
  `positions_changed` receiver; our `portfolio` app is not installed.

In each: `migrate`, `check`, `sync_ibkr` against the simulator (its address from the
environment only, as the user's documentation promises), the POST, the admin's lists
and sync history, and the host's receiver after commit; then the host's own pytest
suite with the plugin's `ibkr_simulator` fixture. On the database DATABASE_URL names
(SQLite otherwise).

Slow (it installs the wheel's dependencies): runs when IBKR_PACKAGING_TESTS=1, as CI
does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(
        os.environ.get("IBKR_PACKAGING_TESTS") != "1",
        reason="builds and installs the wheel: IBKR_PACKAGING_TESTS=1 to run",
    ),
]


def run(args, *, cwd, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel and its declared dependencies (pinned as the
    project pins them), plus what a host's test suite and PostgreSQL need."""
    work = tmp_path_factory.mktemp("dist")
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources.
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.sqlite3*", "build", "dist", "*.egg-info",
        ".hypothesis", ".pytest_cache", ".ruff_cache", ".env",
    ))  # fmt: skip
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-w", work / "dist", "-q"],
        cwd=work)  # fmt: skip
    (wheel,) = (work / "dist").glob("django_ibkr_sync-*.whl")
    env_dir = work / "venv"
    run([sys.executable, "-m", "venv", env_dir], cwd=work)
    python = env_dir / "bin" / "python"
    # The project's pins as constraints (which take no extras: psycopg[binary] -> both).
    constraints = work / "constraints.txt"
    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "[" in line:
            name, rest = line.split("[", 1)
            extra, version = rest.split("]", 1)
            pins += [f"{name}{version}", f"{name}-{extra}{version}"]
        elif line:
            pins.append(line)
    constraints.write_text("\n".join(pins) + "\n")
    run([python, "-m", "pip", "install", "-q", "-c", constraints, wheel,
         "psycopg[binary]", "pytest", "pytest-django"], cwd=work)  # fmt: skip
    # The two apps with their templates and migrations, nothing of the project around them.
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "ibkr_sync", "portfolio", wheel.name.split("-py3")[0] + ".dist-info"
    }  # fmt: skip
    assert "ibkr_sync/templates/admin/ibkr_sync/sync_now_form.html" in names
    assert "ibkr_sync/migrations/0003_sync_lock_heartbeat.py" in names
    assert "portfolio/migrations/0001_initial.py" in names
    return env_dir


@pytest.fixture
def database_settings() -> str:
    """SQLite as startproject makes it, or a PostgreSQL database of the test's own (when
    DATABASE_URL names a server), dropped afterwards."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        yield ""
        return
    import psycopg

    name = f"host_{uuid.uuid4().hex[:8]}"
    base, _, _ = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield textwrap.dedent(f"""
        import environ
        DATABASES = {{"default": environ.Env.db_url_config("{base}/{name}")}}
    """)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"DROP DATABASE IF EXISTS test_{name} WITH (FORCE)")


APPS = """
INSTALLED_APPS += ["rest_framework", "rest_framework.authtoken", {apps}]
"""
URLS = """
from django.urls import include
urlpatterns += [path("portfolio/", include("ibkr_sync.urls"))]
"""

OWN_MODELS = '''
from django.db import models

from ibkr_sync.models import (
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractInstrument,
    AbstractPosition,
)


class BrokerAccount(AbstractAccount):
    nickname = models.CharField(max_length=50, blank=True, default="")


class Security(AbstractInstrument):
    price_source = models.CharField(max_length=20, default="polygon")


class Holding(AbstractPosition):
    notes = models.TextField(null=True, blank=True)


class Cash(AbstractCashBalance):
    pass


class ValueHistory(AbstractAccountSnapshot):
    pass


class HeardChange(models.Model):
    """What the host's receiver heard (after commit)."""

    sync_run_id = models.IntegerField()
    kind = models.CharField(max_length=16)
    symbol = models.CharField(max_length=64)
    positions_stored = models.IntegerField()
'''
OWN_APPS = """
from django.apps import AppConfig


class PortfolioConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "portfolio"

    def ready(self):
        from ibkr_sync.signals import positions_changed

        def heard(sender, sync_run, changes, **kwargs):
            from .models import HeardChange, Holding

            for change in changes:
                HeardChange.objects.create(
                    sync_run_id=sync_run.pk, kind=change["kind"], symbol=change["symbol"],
                    positions_stored=Holding.objects.count(),
                )

        positions_changed.connect(heard, weak=False)
"""
OWN_ADMIN = """
from django.contrib import admin

from ibkr_sync.admin import SyncNowMixin

from .models import BrokerAccount, Holding, Security


@admin.register(Holding)
class HoldingAdmin(SyncNowMixin, admin.ModelAdmin):
    list_display = ("account", "instrument", "quantity", "notes")


admin.site.register(BrokerAccount)
admin.site.register(Security)
"""
OWN_SETTINGS = """
IBKR_SYNC_ACCOUNT_MODEL = "portfolio.BrokerAccount"
IBKR_SYNC_INSTRUMENT_MODEL = "portfolio.Security"
IBKR_SYNC_POSITION_MODEL = "portfolio.Holding"
IBKR_SYNC_CASH_BALANCE_MODEL = "portfolio.Cash"
IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL = "portfolio.ValueHistory"
"""

# Run inside the host, with its settings: the POST, the admin pages, what was stored.
CHECK_SCRIPT = """
import json, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment

setup_test_environment()  # the test client's host name is allowed
from ibkr_sync import conf

admin = get_user_model().objects.create_superuser("host-admin", password="pw-host-admin-1")
client = Client()
client.force_login(admin)
out = {}
# The app's API policy holds without anything in the host's REST_FRAMEWORK setting.
from rest_framework.authtoken.models import Token
anonymous = Client().post("/portfolio/sync/ibkr")
out["anonymous"] = [anonymous.status_code, anonymous.json()["code"],
                    anonymous.headers.get("WWW-Authenticate")]
token = Token.objects.create(user=admin).key
response = Client().post("/portfolio/sync/ibkr", HTTP_AUTHORIZATION=f"Token {token}")
out["post"] = [response.status_code, response.json()]
position_model = conf.position_model()
out["position_model"] = position_model._meta.label
out["positions"] = position_model.objects.count()
label = position_model._meta
changelist = client.get(f"/admin/{label.app_label}/{label.model_name}/")
out["changelist"] = [changelist.status_code, "Sync now" in changelist.content.decode()]
history = client.get("/admin/ibkr_sync/syncrun/")
out["history"] = [history.status_code, history.content.decode().count("ibkr-badge-success")]
run = client.get("/portfolio/sync/runs")
out["runs_api"] = [run.status_code, len(run.json()["results"])]
read = client.get("/portfolio/positions")
out["positions_api"] = [read.status_code, len(read.json().get("results", []))]
try:
    from portfolio.models import HeardChange
    out["heard"] = sorted(HeardChange.objects.values_list("kind", "symbol", "positions_stored"))
except ImportError:
    out["heard"] = None
print(json.dumps(out))
"""

HOST_TEST = """
import pytest
from ibkr_sync import conf
from ibkr_sync.services import sync_positions

pytestmark = pytest.mark.django_db


def test_my_project_syncs_from_the_plugins_simulator(ibkr_simulator, ibkr_portfolio):
    result = sync_positions(trigger="command")
    assert result.created == len(ibkr_portfolio.positions)
    assert conf.position_model().objects.count() == result.created
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_host(venv: Path, where: Path, kind: str, database: str) -> tuple[Path, dict]:
    python = venv / "bin" / "python"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "DJANGO_", "DATABASE_URL", "ENV_FILE", "DEBUG"))
    }  # fmt: skip
    where.mkdir()
    run([venv / "bin" / "django-admin", "startproject", "hostsite", where], cwd=where, env=env)
    settings_py = where / "hostsite" / "settings.py"
    if kind == "plain":
        apps = '"portfolio", "ibkr_sync"'
    else:
        # By hand: startapp refuses a name an installed module has (the wheel's own
        # `portfolio`, which the host's app, first on the path, shadows).
        app = where / "portfolio"
        (app / "migrations").mkdir(parents=True)
        for empty in (app / "__init__.py", app / "migrations" / "__init__.py"):
            empty.write_text("")
        (where / "portfolio" / "models.py").write_text(OWN_MODELS)
        (where / "portfolio" / "apps.py").write_text(OWN_APPS)
        (where / "portfolio" / "admin.py").write_text(OWN_ADMIN)
        apps = '"portfolio", "ibkr_sync"'
    settings_py.write_text(
        settings_py.read_text()
        + APPS.format(apps=apps)
        + (OWN_SETTINGS if kind == "own" else "")
        + database
    )
    urls = where / "hostsite" / "urls.py"
    urls.write_text(urls.read_text() + URLS)
    (where / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = hostsite.settings\n")
    (where / "tests").mkdir()
    (where / "tests" / "test_sync.py").write_text(HOST_TEST)
    env["DJANGO_SETTINGS_MODULE"] = "hostsite.settings"
    env["PYTHONPATH"] = str(where)
    if kind == "own":
        run([python, "manage.py", "makemigrations", "portfolio"], cwd=where, env=env)
    return python, env


@pytest.mark.parametrize("kind", ["plain", "own"])
def test_the_wheel_works_in_a_freshly_generated_project(venv, tmp_path, kind, database_settings):
    where = tmp_path / f"host_{kind}"
    python, env = make_host(venv, where, kind, database_settings)

    run([python, "manage.py", "migrate", "-v", "0"], cwd=where, env=env)
    check = run([python, "manage.py", "check"], cwd=where, env=env)
    assert "no issues" in check.stdout

    port = free_port()
    simulator = subprocess.Popen(
        [python, "manage.py", "ibkr_simulator", "--port", str(port)],
        cwd=where, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the simulator did not start")
        # Nothing about IBKR in the host's settings: the address comes from the environment.
        gateway = {**env, "IBKR_HOST": "127.0.0.1", "IBKR_PORT": str(port),
                   "IBKR_CLIENT_ID": "31"}  # fmt: skip
        synced = run([python, "manage.py", "sync_ibkr", "--json"], cwd=where, env=gateway)
        first = json.loads(synced.stdout)
        assert first["status"] == "success" and first["created"] > 0, first

        (where / "check_host.py").write_text(CHECK_SCRIPT)
        out = json.loads(run([python, "check_host.py"], cwd=where, env=gateway).stdout)
    finally:
        simulator.terminate()
        simulator.wait(10)

    assert out["anonymous"] == [401, "not_authenticated", "Token"]
    status, body = out["post"]
    assert status == 200 and body["status"] == "success", body
    assert body["unchanged"] == first["created"], "the second sync changed nothing"
    assert out["positions"] == first["created"]
    assert out["changelist"] == [200, True], "the host's list has Sync now"
    assert out["history"][0] == 200 and out["history"][1] >= 2
    assert out["runs_api"] == [200, 2]
    if kind == "own":
        assert out["position_model"] == "portfolio.Holding"
        # The one include serves the read API over the host's own models.
        assert out["positions_api"] == [200, first["created"]]
        heard = out["heard"]
        assert len(heard) == first["created"]
        assert {kind for kind, _, _ in heard} == {"created"}
        # After commit: the receiver saw every position stored.
        assert {stored for _, _, stored in heard} == {first["created"]}
    else:
        assert out["position_model"] == "portfolio.Position"
        assert out["positions_api"] == [200, first["created"]]

    # The host's own suite, with the plugin registered by the distribution.
    suite = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                cwd=where, env=env, check=False)  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    assert "1 passed" in suite.stdout
    shutil.rmtree(where, ignore_errors=True)
