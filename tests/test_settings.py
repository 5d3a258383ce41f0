"""The settings module read from the environment (and `.env`), in fresh interpreters.

Settings are evaluated once per process, so each case starts Python in a subprocess with
exactly the environment it is about.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

from ibkr_sync.conf import GatewayConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent
SETTINGS_FILE = PROJECT_DIR / "portfolio_site" / "settings.py"
SETTINGS_VARS = (
    "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "DATABASE_URL", "TIME_ZONE",
    "STATIC_ROOT", "LOG_LEVEL",
)  # fmt: skip
PRINT_IBKR_SETTINGS = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({n: getattr(s, n) for n in dir(s) if n.startswith('IBKR_')}))"
)


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any setting the settings module reads."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("IBKR_") and k not in SETTINGS_VARS
    }
    env.update(DJANGO_SETTINGS_MODULE="portfolio_site.settings", PYTHONDONTWRITEBYTECODE="1")
    env.update(values)
    return env


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
    return tmp_path


def copy_env(copy: Path, **values: str) -> dict[str, str]:
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
        ("IBKR_CLIENT_LIBRARY", "foo", "IBKR_CLIENT_LIBRARY must be one of ib_insync, ib_async"),
        ("IBKR_HOST", "  ", "IBKR_HOST must not be empty."),
        ("IBKR_SYNC_MAX_AGE", "-1", "IBKR_SYNC_MAX_AGE must be >= 0, got -1."),
        ("IBKR_SYNC_MAX_AGE", "a day", "IBKR_SYNC_MAX_AGE must be an integer, got 'a day'."),
    ],
)
def test_malformed_value_stops_start_up_naming_the_variable(name, value, message):
    result = run_python("import django; django.setup()", clean_env(**{name: value}))

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: "), result.stderr
    assert message in last_line


def test_production_without_secret_key_stops_start_up():
    result = run_python("import django; django.setup()", clean_env(DEBUG="False"))

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: SECRET_KEY must be set when DEBUG is off."
    )


def test_production_with_a_secret_key_starts():
    code = "import django; django.setup(); from django.conf import settings as s; print(s.DEBUG)"
    result = run_python(code, clean_env(DEBUG="False", SECRET_KEY="x" * 50))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_defaults_when_nothing_is_set(project_copy):
    values = ibkr_settings(copy_env(project_copy), project_copy)

    assert values == {
        "IBKR_HOST": "127.0.0.1",
        "IBKR_PORT": 7497,
        "IBKR_CLIENT_ID": 1,
        "IBKR_CONNECT_TIMEOUT": 10.0,
        "IBKR_REQUEST_TIMEOUT": 60.0,
        "IBKR_CLIENT_LIBRARY": "ib_insync",
        "IBKR_SYNC_STALE_AFTER": 900.0,
        "IBKR_SYNC_MAX_AGE": 86400,
        "IBKR_LIBRARY_LOG_LEVEL": "",
    }


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
