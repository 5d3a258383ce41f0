"""The settings module read from the environment (and `.env`), in fresh interpreters.

Settings are evaluated once per process, so each case starts Python in a subprocess with
exactly the environment it is about: no `.env` is read (ENV_FILE empty) unless a case
puts one in a scratch copy of the project.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

from ibkr_sync.conf import GatewayConfig

# Settings are read in a process of their own (two tests read them in this one).
pytestmark = pytest.mark.processes

PROJECT_DIR = Path(__file__).resolve().parent.parent
SETTINGS_FILE = PROJECT_DIR / "portfolio_site" / "settings.py"
SETTINGS_VARS = (
    "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "DATABASE_URL", "TIME_ZONE",
    "STATIC_ROOT", "LOG_LEVEL", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD", "SECURE_PROXY_SSL", "ENV_FILE",
)  # fmt: skip
PRINT_IBKR_SETTINGS = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({n: getattr(s, n) for n in dir(s) if n.startswith('IBKR_')}))"
)


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any setting the settings module reads, as on a
    developer's machine (DEBUG=true) but with no `.env`, unless `values` say otherwise
    (DEBUG=None: unset; ENV_FILE=None: the `.env` beside the settings)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("IBKR_") and k not in SETTINGS_VARS
    }
    env.update(
        DJANGO_SETTINGS_MODULE="portfolio_site.settings",
        PYTHONDONTWRITEBYTECODE="1",
        DEBUG="true",
        ENV_FILE="",
    )
    env.update(values)
    return {k: v for k, v in env.items() if v is not None}


def run_python(code: str, env: dict[str, str], cwd: Path = PROJECT_DIR):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def ibkr_settings(env: dict[str, str], cwd: Path = PROJECT_DIR) -> dict:
    result = run_python(PRINT_IBKR_SETTINGS, env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """The settings module in a scratch BASE_DIR, so a `.env` can sit beside it.

    Run Python there (`python -c` puts the working directory first on the path); the apps
    are still imported from the project (PYTHONPATH): only `portfolio_site`, the package
    that defines BASE_DIR, is the copy.
    """
    package = tmp_path / "portfolio_site"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(SETTINGS_FILE, package / "settings.py")
    # The project's own app (the demo command) comes along: it is inside the package.
    shutil.copytree(SETTINGS_FILE.parent / "demo", package / "demo",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return tmp_path


def copy_env(copy: Path, **values: str) -> dict[str, str]:
    """The environment for the copy, reading the `.env` beside its settings, if any."""
    values.setdefault("ENV_FILE", None)
    return clean_env(PYTHONPATH=os.pathsep.join([str(copy), str(PROJECT_DIR)]), **values)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IBKR_PORT", "abc", "IBKR_PORT must be an integer, got 'abc'."),
        ("IBKR_PORT", "0", "IBKR_PORT must be between 1 and 65535, got 0."),
        ("IBKR_PORT", "70000", "IBKR_PORT must be between 1 and 65535, got 70000."),
        ("IBKR_CLIENT_ID", "-1", "IBKR_CLIENT_ID must be between 0 and 2147483647, got -1."),
        ("IBKR_CLIENT_ID", "one", "IBKR_CLIENT_ID must be an integer, got 'one'."),
        ("IBKR_CONNECT_TIMEOUT", "0", "IBKR_CONNECT_TIMEOUT must be more than 0"),
        ("IBKR_REQUEST_TIMEOUT", "soon", "IBKR_REQUEST_TIMEOUT must be a number of seconds"),
        ("IBKR_VALUES_TIMEOUT", "0", "IBKR_VALUES_TIMEOUT must be more than 0"),
        ("IBKR_READ_VALUES", "maybe", "IBKR_READ_VALUES must be true or false"),
        ("IBKR_CLIENT_LIBRARY", "foo", "IBKR_CLIENT_LIBRARY must be one of ib_insync, ib_async"),
        ("IBKR_HOST", "  ", "IBKR_HOST must not be empty."),
        ("IBKR_SYNC_MAX_AGE", "-1", "IBKR_SYNC_MAX_AGE must be >= 0, got -1."),
        ("IBKR_SYNC_MAX_AGE", "a day", "IBKR_SYNC_MAX_AGE must be an integer, got 'a day'."),
        (
            "IBKR_SYNC_THROTTLE_RATE",
            "fast",
            "IBKR_SYNC_THROTTLE_RATE must be a rate such as "
            "6/minute (a number of requests per second, minute, hour or day), or none for no "
            "limit; got 'fast'.",
        ),
        ("IBKR_SYNC_THROTTLE_RATE", "0/minute", "IBKR_SYNC_THROTTLE_RATE must be a rate"),
        ("IBKR_SYNC_THROTTLE_RATE", "6/fortnight", "IBKR_SYNC_THROTTLE_RATE must be a rate"),
        ("IBKR_SYNC_THROTTLE_RATE", "6", "IBKR_SYNC_THROTTLE_RATE must be a rate"),
        ("DEBUG", "maybe", "DEBUG must be true or false, got 'maybe'."),
        ("SECURE_SSL_REDIRECT", "2", "SECURE_SSL_REDIRECT must be true or false, got '2'."),
        ("SECURE_HSTS_SECONDS", "1y", "SECURE_HSTS_SECONDS must be an integer, got '1y'."),
        ("SECURE_PROXY_SSL", "https", "SECURE_PROXY_SSL must be true or false, got 'https'."),
        ("DATABASE_URL", "db.sqlite3", "DATABASE_URL must be a database URL such as "),
        ("DATABASE_URL", "user:secret@db:5432/portfolio", "it has no scheme."),
        ("DATABASE_URL", "postgress://u:secret@db/x", "its scheme 'postgress' names no database."),
    ],
)
def test_malformed_value_stops_start_up_naming_the_variable(name, value, message):
    result = run_python("import django; django.setup()", clean_env(**{name: value}))

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: "), result.stderr
    assert message in last_line
    assert "secret" not in result.stderr  # a URL's password is never repeated


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_database_url_is_the_default_database(value):
    """As every other setting: set but empty is unset (a `.env` line `DATABASE_URL=`)."""
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME'])"
    )
    result = run_python(code, clean_env(DATABASE_URL=value))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", str(PROJECT_DIR / "db.sqlite3")]


PRINT_SECURITY = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({n: getattr(s, n, None) for n in ('DEBUG', 'ALLOWED_HOSTS', "
    "'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
    "'SECURE_HSTS_SECONDS', 'SECURE_PROXY_SSL_HEADER')}))"
)
PRODUCTION = {"DEBUG": None, "SECRET_KEY": "k" * 50, "ALLOWED_HOSTS": "portfolio.example.com"}


def test_debug_is_off_unless_asked_for_so_a_secret_key_is_required():
    result = run_python("import django; django.setup()", clean_env(DEBUG=None))

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SECRET_KEY must be set when DEBUG is off "
        "(a long random string). For local development set DEBUG=true instead, e.g. "
        "`cp .env.example .env`."
    )


def test_production_requires_allowed_hosts():
    result = run_python(
        "import django; django.setup()", clean_env(**{**PRODUCTION, "ALLOWED_HOSTS": ""})
    )

    assert result.returncode != 0
    assert "ALLOWED_HOSTS must be set when DEBUG is off" in result.stderr.strip().splitlines()[-1]


def test_production_turns_https_and_secure_cookies_on():
    result = run_python(PRINT_SECURITY, clean_env(**PRODUCTION))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "DEBUG": False,
        "ALLOWED_HOSTS": ["portfolio.example.com"],
        "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_PROXY_SSL_HEADER": None,
    }


def test_development_keeps_plain_http_and_local_hosts():
    result = run_python(PRINT_SECURITY, clean_env())

    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["DEBUG"] is True
    assert values["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert (values["SECURE_SSL_REDIRECT"], values["SESSION_COOKIE_SECURE"]) == (False, False)
    assert values["SECURE_HSTS_SECONDS"] == 0


def test_the_projects_switches_take_the_words_of_the_apps_and_empty_is_the_default():
    result = run_python(
        PRINT_SECURITY,
        clean_env(
            **PRODUCTION,
            SECURE_SSL_REDIRECT=" NO ",
            SESSION_COOKIE_SECURE="",
            CSRF_COOKIE_SECURE="Off",
            SECURE_PROXY_SSL="Yes",
        ),
    )

    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert (values["SECURE_SSL_REDIRECT"], values["CSRF_COOKIE_SECURE"]) == (False, False)
    assert values["SESSION_COOKIE_SECURE"] is True, "empty: the production default"
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def readme_production_env() -> dict[str, str]:
    """The `.env` the README's production section shows, with its placeholders filled."""
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    block = readme.split("and in `/srv/portfolio/.env`:", 1)[1].split("```sh", 1)[1]
    lines = block.split("```", 1)[0].strip().splitlines()
    values = dict(
        line.strip().split("=", 1) for line in lines if line.strip() and "=" in line
        and not line.strip().startswith("#")
    )  # fmt: skip
    assert "SECRET_KEY" in values and "ALLOWED_HOSTS" in values, values
    values["SECRET_KEY"] = "kT3" + "x9Zq-" * 12  # what `secrets.token_urlsafe(50)` gives
    values["DATABASE_URL"] = "sqlite:///unused.sqlite3"  # `check` does not connect
    return values


def test_check_deploy_passes_with_the_production_settings_of_the_readme():
    env = clean_env(DEBUG=None, **readme_production_env())
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    # Only the two opt-ins the README leaves to the operator may be mentioned: HSTS for
    # every subdomain, and the browsers' HSTS preload list.
    warnings = set(re.findall(r"\((\w+\.[EW]\d+)\)", result.stderr))
    assert warnings <= {"security.W005", "security.W021"}, result.stderr


def test_check_deploy_is_clean_with_the_hsts_opt_ins():
    env = clean_env(
        DEBUG=None,
        SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        SECURE_HSTS_PRELOAD="true",
        **readme_production_env(),
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr + result.stdout
    assert "System check identified no issues" in result.stdout


def test_defaults_when_nothing_is_set(project_copy):
    values = ibkr_settings(copy_env(project_copy), project_copy)

    assert values == {
        "IBKR_HOST": "127.0.0.1",
        "IBKR_PORT": 7497,
        "IBKR_CLIENT_ID": 1,
        "IBKR_CONNECT_TIMEOUT": 10.0,
        "IBKR_REQUEST_TIMEOUT": 60.0,
        "IBKR_READ_VALUES": True,
        "IBKR_VALUES_TIMEOUT": 30.0,
        "IBKR_CLIENT_LIBRARY": "ib_insync",
        "IBKR_SYNC_LOCK_TIMEOUT": 30.0,
        "IBKR_SYNC_STALE_AFTER": 900.0,
        "IBKR_SYNC_END_FROZEN_HOLDERS": True,
        "IBKR_SYNC_MAX_AGE": 86400,
        "IBKR_SYNC_THROTTLE_RATE": "6/minute",
        "IBKR_SYNC_GATEWAY_CLASS": "ibkr_sync.gateway.IbkrGateway",
        "IBKR_SYNC_FLEX_SOURCE_CLASS": "ibkr_sync.sources.flex.source.FlexSource",
        "IBKR_FLEX_BASE_URL": (
            "https://ndcdyn.interactivebrokers.com/AccountManagement/FlexWebService"
        ),
        "IBKR_FLEX_CONNECT_TIMEOUT": 10.0,
        "IBKR_FLEX_READ_TIMEOUT": 60.0,
        "IBKR_FLEX_POLL_BUDGET": 600.0,
        "IBKR_SYNC_SECRET_KEY": "",
        "IBKR_SYNC_SECRET_KEY_FALLBACKS": [],
        "IBKR_SYNC_TASK_QUEUE": "",
        "IBKR_LIBRARY_LOG_LEVEL": "",
    }


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("10/Hour", "10/hour"), (" 3 / s ", "3/s"), ("none", None), ("OFF", None), ("", None)],
)
def test_the_sync_throttle_rate_is_parsed_and_can_be_turned_off(value, parsed):
    values = ibkr_settings(clean_env(IBKR_SYNC_THROTTLE_RATE=value))

    assert values["IBKR_SYNC_THROTTLE_RATE"] == parsed


def test_environment_values_are_parsed():
    values = ibkr_settings(
        clean_env(
            IBKR_HOST=" gateway.internal ",
            IBKR_PORT="4002",
            IBKR_CLIENT_ID="0",
            IBKR_CONNECT_TIMEOUT="2.5",
            IBKR_CLIENT_LIBRARY="ib_async",
        )
    )

    assert values["IBKR_HOST"] == "gateway.internal"
    assert (values["IBKR_PORT"], values["IBKR_CLIENT_ID"]) == (4002, 0)
    assert values["IBKR_CONNECT_TIMEOUT"] == 2.5
    assert values["IBKR_CLIENT_LIBRARY"] == "ib_async"


def test_values_are_read_from_dotenv_and_the_real_environment_wins(project_copy):
    (project_copy / ".env").write_text(
        "IBKR_HOST=10.0.0.5\nIBKR_PORT=4001\nIBKR_CLIENT_ID=17\n", encoding="utf-8"
    )

    from_file = ibkr_settings(copy_env(project_copy), project_copy)
    overridden = ibkr_settings(copy_env(project_copy, IBKR_PORT="4002"), project_copy)

    assert (from_file["IBKR_HOST"], from_file["IBKR_PORT"], from_file["IBKR_CLIENT_ID"]) == (
        "10.0.0.5",
        4001,
        17,
    )
    assert (overridden["IBKR_HOST"], overridden["IBKR_PORT"]) == ("10.0.0.5", 4002)


def test_malformed_value_in_dotenv_is_reported_too(project_copy):
    (project_copy / ".env").write_text("IBKR_PORT=seven\n", encoding="utf-8")

    result = run_python("import django; django.setup()", copy_env(project_copy), project_copy)

    assert result.returncode != 0
    assert "IBKR_PORT must be an integer, got 'seven'." in result.stderr


def test_env_file_names_another_dotenv_or_none(project_copy, tmp_path_factory):
    (project_copy / ".env").write_text("IBKR_PORT=4001\n", encoding="utf-8")
    other = tmp_path_factory.mktemp("elsewhere") / "gateway.env"
    other.write_text("IBKR_PORT=4002\n", encoding="utf-8")

    beside = ibkr_settings(copy_env(project_copy), project_copy)
    named = ibkr_settings(copy_env(project_copy, ENV_FILE=str(other)), project_copy)
    none = ibkr_settings(copy_env(project_copy, ENV_FILE=""), project_copy)
    missing = run_python(
        "import django; django.setup()",
        copy_env(project_copy, ENV_FILE=str(other) + ".missing"),
        project_copy,
    )

    assert (beside["IBKR_PORT"], named["IBKR_PORT"], none["IBKR_PORT"]) == (4001, 4002, 7497)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1] == (
        f"django.core.exceptions.ImproperlyConfigured: ENV_FILE names no file: '{other}.missing'."
    )


def test_no_test_reads_a_dotenv_nor_does_any_process_it_starts(project_copy, settings):
    """A developer's `.env`, here a hostile one beside the settings, changes nothing for the
    test run: its environment says ENV_FILE is empty (pyproject.toml), and every process a
    test starts inherits that environment, as each helper here and in the other tests does."""
    (project_copy / ".env").write_text(
        "DEBUG=False\nIBKR_HOST=gateway.elsewhere\nIBKR_PORT=1\n"
        "DATABASE_URL=sqlite:////nonexistent/elsewhere.sqlite3\n",
        encoding="utf-8",
    )
    inherited = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(project_copy), str(PROJECT_DIR)]),
    }

    values = ibkr_settings(inherited, project_copy)

    assert os.environ["ENV_FILE"] == ""
    assert (values["IBKR_HOST"], values["IBKR_PORT"]) == (settings.IBKR_HOST, settings.IBKR_PORT)


def test_gateway_config_reads_settings_when_used():
    with override_settings(
        IBKR_HOST="gw.example",
        IBKR_PORT=4002,
        IBKR_CLIENT_ID=9,
        IBKR_CONNECT_TIMEOUT=3,
        IBKR_REQUEST_TIMEOUT=30,
        IBKR_CLIENT_LIBRARY="ib_async",
    ):
        config = GatewayConfig.from_settings()

    assert config == GatewayConfig(
        host="gw.example",
        port=4002,
        client_id=9,
        connect_timeout=3.0,
        request_timeout=30.0,
        library="ib_async",
    )
    assert GatewayConfig.from_settings().host != "gw.example", "override was undone"


def test_gateway_config_defaults_apply_when_a_setting_is_absent(settings):
    del settings.IBKR_CLIENT_ID
    del settings.IBKR_PORT

    config = GatewayConfig.from_settings()

    assert (config.client_id, config.port) == (1, 7497)


LOG_REQUESTS = (
    "import django; django.setup(); from django.test import Client; c = Client(); "
    "[c.get('/portfolio/positions') for _ in range(2)]; c.post('/portfolio/sync/ibkr/'); "
    "c.put('/portfolio/accounts'); [c.get('/healthz') for _ in range(3)]"
)


@pytest.mark.parametrize("debug", ["true", "false"])
def test_each_failed_request_is_one_line_on_the_console_and_health_is_no_error(tmp_path, debug):
    env = clean_env(
        DEBUG=debug,
        SECRET_KEY="k" * 50,
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}",  # not migrated: unhealthy
        STATIC_ROOT=str(tmp_path),
    )

    result = run_python(LOG_REQUESTS, env)

    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    messages = [line.split(" ", 2)[2] for line in lines]  # without the time stamp
    assert messages == [
        "WARNING django.request: Unauthorized: /portfolio/positions",
        "WARNING django.request: Unauthorized: /portfolio/positions",
        "WARNING django.request: Not Found: /portfolio/sync/ibkr/",
        "WARNING django.request: Unauthorized: /portfolio/accounts",
        "WARNING ibkr_sync.health: Health check unhealthy: "
        "database=error, last_sync=unknown, sync_lock=unknown",
    ], result.stderr
