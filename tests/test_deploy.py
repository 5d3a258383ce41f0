"""The deployment kit: collectstatic with WhiteNoise, and the site under gunicorn with
deploy/gunicorn.conf.py, as the systemd unit runs it (DEBUG off, a real HTTP port)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Every test here starts manage.py or gunicorn.
pytestmark = pytest.mark.processes

PROJECT_DIR = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def production_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IBKR_", "DJANGO_", "GUNICORN_"))
        and k not in {"DATABASE_URL", "DEBUG", "STATIC_ROOT", "SECRET_KEY", "ALLOWED_HOSTS"}
    }
    env.update(
        DEBUG="False",
        SECRET_KEY="deploy-test-" + "k" * 50,
        ALLOWED_HOSTS="127.0.0.1",
        # Plain HTTP on loopback, as behind the TLS-terminating reverse proxy.
        SECURE_SSL_REDIRECT="false",
        STATIC_ROOT=str(tmp_path / "static"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(values)
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict[str, str]:
    """A migrated database and collected static files, as the service's ExecStartPre do."""
    env = production_env(tmp_path_factory.mktemp("deploy"))
    manage("migrate", "--noinput", "-v", "0", env=env)
    manage("collectstatic", "--noinput", "-v", "0", env=env)
    return env


def test_collectstatic_gathers_admin_and_local_api_docs_assets_compressed(deployed):
    static = Path(deployed["STATIC_ROOT"])

    for asset in (
        "admin/css/base.css",
        "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
        "drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js",
    ):
        assert (static / asset).is_file(), asset
        assert (static / f"{asset}.gz").is_file(), f"{asset} was not compressed"


class Gunicorn:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(GUNICORN), "-c", str(PROJECT_DIR / "deploy" / "gunicorn.conf.py")],
            cwd=cwd,  # the config's chdir makes the working directory irrelevant
            env={**env, "GUNICORN_BIND": f"127.0.0.1:{self.port}", "GUNICORN_WORKERS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited: {self.process.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("gunicorn did not start listening")

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        request.add_header("Accept-Encoding", "gzip")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(env: dict[str, str]) -> Gunicorn:
        servers.append(Gunicorn(env, cwd=tmp_path))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_gunicorn_serves_the_site_static_files_and_health(deployed, serve):
    site = serve(deployed)

    status, headers, body = site.get("/static/admin/css/base.css")
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"  # WhiteNoise's pre-compressed copy

    status, _, body = site.get("/api/docs/")
    assert status == 200
    assert b"/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in body
    assert (
        site.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")[0] == 200
    )

    status, _, body = site.get("/healthz")
    assert status == 503  # a fresh install has never synced
    assert json.loads(body)["checks"] == {
        "database": {"status": "ok"},
        "last_sync": {"status": "never", "max_age_seconds": 86400},
        "sync_lock": {"status": "ok"},
    }

    status, _, body = site.get("/portfolio/positions")
    assert status == 401
    assert json.loads(body)["code"] == "not_authenticated"


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_health_is_503_when_the_database_is_unreachable(tmp_path, serve, engine):
    if engine == "sqlite":
        url = "sqlite:////nonexistent-directory/db.sqlite3"
    else:
        url = f"postgres://postgres@127.0.0.1:{free_port()}/nonexistent"  # nobody listens
    site = serve(production_env(tmp_path, DATABASE_URL=url))

    status, _, body = site.get("/healthz")

    assert status == 503
    report = json.loads(body)
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"] == {"status": "error"}
    assert report["checks"]["last_sync"] == {"status": "unknown"}
    assert b"nonexistent" not in body
