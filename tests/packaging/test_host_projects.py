"""The distribution in someone else's project, set up as README section 9 says, word for
word: its snippets are taken from the README (not restated here), into projects made
with `django-admin startproject`, with the wheel built from this repository installed in
a fresh virtualenv:

- own: an app `holdings` made with `startapp`, whose five models are built on the
  abstract bases (section 9's `holdings/models.py`, `holdings/admin.py`, `settings.py`,
  `urls.py`), then section 9's commands (`makemigrations`, `migrate`, `sync_ibkr` with the
  gateway's address from the environment);
- shadow: the same, in an app called `portfolio` (which shadows ours), with a
  `positions_changed` receiver;
- plain: our `portfolio` app (section 9's settings for it).

In each: `check`, `sync_ibkr` against the simulator, the POST, every read endpoint with
data (as_of too), a JSON 404, the admin's lists read-only, the overview with values, the
sync history, the host's receiver after commit; then the host's own pytest suite with
the plugin's `ibkr_simulator` fixture. And section 9's commands that try a Flex connection on
the bundled fake Flex Web Service, as written (the token and query id they use
are those the service prints). On the database DATABASE_URL names (SQLite otherwise).

Slow (it installs the wheel's dependencies): runs when IBKR_PACKAGING_TESTS=1, as CI
does.
"""

from __future__ import annotations

import json
import os
import re
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


README = ROOT / "README.md"


def section_9() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split("\n## 9. ", 1)[1].split("\n## ", 1)[0]


def snippets() -> dict[str, str]:
    """Section 9's Python snippets by the file their first line names (`# urls.py`)."""
    found = {}
    for block in re.findall(r"```python\n(.*?)```", section_9(), flags=re.S):
        first, _, code = block.partition("\n")
        if first.startswith("# "):
            found[first[2:].strip()] = code
    return found


def commands() -> list[str]:
    """Section 9's shell commands that set up a host with its own models."""
    block = section_9().split("Then create the tables and sync", 1)[1]
    return [
        line.strip()
        for line in block.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_section_9_has_every_snippet_a_host_needs():
    assert set(snippets()) >= {
        "holdings/models.py", "holdings/admin.py", "settings.py", "urls.py",
        "settings.py (with our portfolio app)",
    }  # fmt: skip
    assert commands()[:2] == [
        "python manage.py makemigrations holdings",
        "python manage.py migrate",
    ]
    assert "manage.py sync_ibkr" in commands()[2]


# A receiver of the host's own (the shadow host): what it heard, after commit.
HEARD_MODEL = """

class HeardChange(models.Model):
    sync_run_id = models.IntegerField()
    kind = models.CharField(max_length=16)
    symbol = models.CharField(max_length=64)
    positions_stored = models.IntegerField()
"""
HEARD_APPS = """
from django.apps import AppConfig


class PortfolioConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "portfolio"

    def ready(self):
        from ibkr_sync import conf
        from ibkr_sync.signals import positions_changed

        def heard(sender, sync_run, changes, **kwargs):
            from .models import HeardChange

            for change in changes:
                HeardChange.objects.create(
                    sync_run_id=sync_run.pk, kind=change["kind"], symbol=change["symbol"],
                    positions_stored=conf.position_model().objects.count(),
                )

        positions_changed.connect(heard, weak=False)
"""

# Run inside the host, with its settings: the POST, the read API, the admin, what was stored.
CHECK_SCRIPT = """
import json, re
import django
django.setup()
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment
from django.utils import timezone

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
account = conf.account_model().objects.order_by("external_id").first()
# Every read endpoint, with data.
reads = {
    "accounts": "/portfolio/accounts",
    "positions": "/portfolio/positions",
    "as_of": "/portfolio/positions?as_of=" + timezone.now().isoformat().replace("+", "%2B"),
    "cash": "/portfolio/cash",
    "history": f"/portfolio/accounts/{account.external_id}/history",
    "runs": "/portfolio/sync/runs",
}
out["reads"] = {}
for name, url in reads.items():
    answer = client.get(url)
    out["reads"][name] = [answer.status_code, len(answer.json().get("results", []))]
run_id = client.get("/portfolio/sync/runs").json()["results"][0]["id"]
out["reads"]["run"] = [client.get(f"/portfolio/sync/runs/{run_id}").status_code, 1]
schema = client.get("/portfolio/nothing-here")
slash = client.post("/portfolio/sync/ibkr/", HTTP_AUTHORIZATION=f"Token {token}")
out["not_found"] = [
    [schema.status_code, schema.headers["Content-Type"], schema.json()["code"]],
    [slash.status_code, slash.json()["code"], "/portfolio/sync/ibkr?" in slash.json()["detail"]],
]
# The admin: every model's list, read-only; the overview with IBKR's values.
out["admin"] = {}
for model in (conf.account_model(), conf.instrument_model(), position_model,
              conf.cash_balance_model(), conf.account_snapshot_model()):
    meta = model._meta
    listed = client.get(f"/admin/{meta.app_label}/{meta.model_name}/")
    html = listed.content.decode()
    row = model.objects.order_by("pk").first()
    page = client.get(f"/admin/{meta.app_label}/{meta.model_name}/{row.pk}/change/")
    fields = r'<(?:input|select|textarea)[^>]*name="([a-z_]+)"'
    inputs = set(re.findall(fields, page.content.decode()))
    out["admin"][meta.model_name] = {
        "list": listed.status_code, "sync_now": "Sync now" in html,
        "add": f"/admin/{meta.app_label}/{meta.model_name}/add/" in html,
        "page": page.status_code, "inputs": sorted(inputs - {"csrfmiddlewaretoken"}),
    }
# The admin's index names each model as its plural reads.
index = client.get("/admin/").content.decode()
out["index"] = sorted(
    re.search(rf'<a href="/admin/{m._meta.app_label}/{m._meta.model_name}/"[^>]*>([^<]+)</a>',
              index).group(1)
    for m in (conf.account_model(), conf.instrument_model(), position_model,
              conf.cash_balance_model(), conf.account_snapshot_model())
)
meta = position_model._meta
overview = client.get(f"/admin/{meta.app_label}/{meta.model_name}/overview/")
text = overview.content.decode()
out["overview"] = [overview.status_code, account.external_id in text, "Net liquidation" in text,
                   "<h3>Cash</h3>" in text, "Open positions" in text]
health = Client().get("/healthz")
out["health"] = [health.status_code, health.json()["checks"]["last_sync"]["status"]]
history = client.get("/admin/ibkr_sync/syncrun/")
out["history"] = [history.status_code, history.content.decode().count("ibkr-badge-success")]
from django.apps import apps
try:
    HeardChange = apps.get_model("portfolio", "HeardChange")
    out["heard"] = sorted(HeardChange.objects.values_list("kind", "symbol", "positions_stored"))
except LookupError:
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
    """A `startproject` host set up with section 9's snippets for `kind`."""
    python = venv / "bin" / "python"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "DJANGO_", "DATABASE_URL", "ENV_FILE", "DEBUG"))
    }  # fmt: skip
    where.mkdir()
    run([venv / "bin" / "django-admin", "startproject", "hostsite", where], cwd=where, env=env)
    env["DJANGO_SETTINGS_MODULE"] = "hostsite.settings"
    env["PYTHONPATH"] = str(where)
    given = snippets()
    settings_py = where / "hostsite" / "settings.py"
    if kind == "plain":
        settings = given["settings.py (with our portfolio app)"]
    else:
        settings = given["settings.py"]
        if kind == "own":
            run([python, "manage.py", "startapp", "holdings"], cwd=where, env=env)
            app = where / "holdings"
            files = {
                "models.py": given["holdings/models.py"],
                "admin.py": given["holdings/admin.py"],
            }
        else:
            # The same snippets in an app called `portfolio`, made by hand: startapp refuses
            # a name an installed module has (the wheel's own `portfolio`, which the host's
            # app, first on the path, shadows).
            app = where / "portfolio"
            (app / "migrations").mkdir(parents=True)
            (app / "migrations" / "__init__.py").write_text("")
            (app / "__init__.py").write_text("")
            settings = settings.replace("holdings", "portfolio")
            files = {
                "models.py": given["holdings/models.py"] + HEARD_MODEL,
                "admin.py": given["holdings/admin.py"],
                "apps.py": HEARD_APPS,
            }
        for name, code in files.items():
            (app / name).write_text(code)
    settings_py.write_text(settings_py.read_text() + "\n" + settings + database)
    urls = where / "hostsite" / "urls.py"
    urls.write_text(urls.read_text() + "\n" + given["urls.py"])
    (where / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = hostsite.settings\n")
    (where / "tests").mkdir()
    (where / "tests" / "test_sync.py").write_text(HOST_TEST)
    return python, env


def readme_command(line: str, python: Path, app: str, port: int) -> tuple[list[str], dict]:
    """One of section 9's shell lines as a list of arguments (the host's python, its own
    app's name) and the environment assignments before it (the gateway's port: the
    simulator's)."""
    words = line.replace("holdings", app).split()
    assignments = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        assignments[name] = str(port) if name == "IBKR_PORT" else value
    assert words[0] == "python", line
    return [str(python), *words[1:]], assignments


@pytest.mark.parametrize("kind", ["own", "shadow", "plain"])
def test_section_9_as_written_in_a_freshly_generated_project(
    venv, tmp_path, kind, database_settings
):
    where = tmp_path / f"host_{kind}"
    python, env = make_host(venv, where, kind, database_settings)
    port = free_port()
    app = {"own": "holdings", "shadow": "portfolio"}.get(kind)
    setup = commands() if app else ["python manage.py migrate"]
    if not app:
        setup.append(commands()[-1])  # the sync line, as for any host

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
        outputs = []
        for line in setup:
            args, assignments = readme_command(line, python, app or "", port)
            outputs.append(run(args, cwd=where, env={**env, **assignments}).stdout)
        check = run([python, "manage.py", "check"], cwd=where, env=env)
        assert "no issues" in check.stdout
        # A malformed setting: one line, exit 78, as in our project (not a check report).
        bad = run([python, "manage.py", "sync_ibkr"], cwd=where, check=False,
                  env={**env, "IBKR_PORT": "abc"})  # fmt: skip
        assert (bad.returncode, bad.stdout) == (78, ""), bad.stderr
        assert bad.stderr.splitlines() == [
            "Configuration error: IBKR_PORT must be an integer, got 'abc'."
        ]
        # The README's sync line: one summary line, positions created.
        summary = outputs[-1].strip().splitlines()[0]
        created = int(re.search(r": (\d+) created", summary).group(1))
        assert summary.startswith("IBKR sync #1: ") and created > 0, outputs[-1]

        # Nothing about IBKR in the host's settings: the address comes from the environment.
        gateway = {**env, "IBKR_HOST": "127.0.0.1", "IBKR_PORT": str(port)}
        (where / "check_host.py").write_text(CHECK_SCRIPT)
        out = json.loads(run([python, "check_host.py"], cwd=where, env=gateway).stdout)
    finally:
        simulator.terminate()
        simulator.wait(10)

    assert out["anonymous"] == [401, "not_authenticated", "Token"]
    status, body = out["post"]
    assert status == 200 and body["status"] == "success", body
    assert body["unchanged"] == created, "the second sync changed nothing"
    assert out["positions"] == created
    expected_model = {"own": "holdings.Holding", "shadow": "portfolio.Holding"}
    assert out["position_model"] == expected_model.get(kind, "portfolio.Position")
    # The one include serves the read API over the host's models, every endpoint with data.
    reads = out["reads"]
    assert reads["positions"] == [200, created] and reads["as_of"] == [200, created]
    assert reads["accounts"][0] == 200 and reads["accounts"][1] >= 1
    assert reads["cash"][0] == 200 and reads["cash"][1] >= 1
    assert reads["history"] == [200, 2], "a snapshot per sync"
    assert reads["runs"] == [200, 2] and reads["run"] == [200, 1]
    assert out["not_found"] == [[404, "application/json", "not_found"], [404, "not_found", True]]
    # The admin: read-only lists (no Add, nothing to edit but an account's name), Sync now.
    admin = out["admin"]
    assert all(page["list"] == 200 and page["page"] == 200 for page in admin.values()), admin
    assert not any(page["add"] for page in admin.values()), admin
    accounts = {"brokeraccount", "account"}
    for name, page in admin.items():
        editable = ["_continue", "_save", "name"] if name in accounts else []
        assert page["inputs"] == editable, (name, page)
    syncing = {name for name, page in admin.items() if page["sync_now"]}
    assert syncing == {name for name in admin if name in accounts | {"holding", "position"}}
    assert out["overview"] == [200, True, True, True, True]
    assert out["index"] == (
        ["Account snapshots", "Accounts", "Cash balances", "Instruments", "Positions"]
        if kind == "plain"
        else ["Broker accounts", "Cash", "Holdings", "Securities", "Value history"]
    )
    assert out["health"] == [200, "ok"], "section 9's /healthz: the last sync succeeded"
    assert out["history"][0] == 200 and out["history"][1] >= 2
    if kind == "shadow":
        heard = out["heard"]
        assert len(heard) == created
        assert {kind for kind, _, _ in heard} == {"created"}
        # After commit: the receiver saw every position stored.
        assert {stored for _, _, stored in heard} == {created}

    # The host's own suite, with the plugin registered by the distribution.
    suite = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                cwd=where, env=env, check=False)  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    assert "1 passed" in suite.stdout
    shutil.rmtree(where, ignore_errors=True)


def flex_lines() -> list[str]:
    """Section 9's lines that try a Flex connection against the bundled fake service."""
    block = section_9().split("To try it without an IBKR account", 1)[1]
    return [
        line.strip()
        for line in block.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_section_9_tries_a_flex_connection_on_the_bundled_service(
    venv, tmp_path, database_settings
):
    where = tmp_path / "host_flex"
    python, env = make_host(venv, where, "own", database_settings)
    for line in commands()[:2]:  # makemigrations, migrate
        args, assignments = readme_command(line, python, "holdings", 0)
        run(args, cwd=where, env={**env, **assignments})
    start, *lines = flex_lines()
    assert start.split("#")[0].split() == ["python", "manage.py", "ibkr_flex_simulator"]
    port = free_port()
    service = subprocess.Popen(
        [python, "manage.py", "ibkr_flex_simulator", "--port", str(port)],
        cwd=where, env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        printed = service.stdout.readline()
        assert "listening on" in printed, printed + service.stderr.read()
        flex_env = dict(env)
        synced = None
        for line in lines:
            if line.startswith("export "):
                name, value = line.removeprefix("export ").split("=", 1)
                value = value.replace(":8760/", f":{port}/")
                flex_env[name] = value
                # What the README exports is what the service says of itself.
                if name == "IBKR_FLEX_BASE_URL":
                    assert printed.rstrip().endswith(f"Set IBKR_FLEX_BASE_URL={value}"), printed
                else:
                    assert f"token {value}," in printed, printed
                continue
            args, assignments = readme_command(line, python, "holdings", port)
            assert (
                "--query-id" not in args
                or f"(query {args[args.index('--query-id') + 1]}, " in printed
            )
            synced = run(args, cwd=where, env={**flex_env, **assignments}).stdout
    finally:
        service.terminate()
        service.wait(10)

    summary = synced.strip().splitlines()[0]
    assert summary.startswith("IBKR sync #1 of connection sim-flex: "), synced
    assert int(re.search(r": (\d+) created", summary).group(1)) > 0, synced
