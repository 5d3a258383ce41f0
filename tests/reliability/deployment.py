"""A small real deployment for the process-level fault tests and `bench/faults.py`.

A throw-away database (a SQLite file, or `<name>_faults` on the PostgreSQL server of
DATABASE_URL), migrated by `manage.py migrate`; the site served by a threaded WSGI
server in its own process; `manage.py sync_ibkr` in processes of their own. Everything
talks over loopback to the gateway simulator run by the caller. The database is read
back with the plain driver, independently of the processes under test.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import environ

ROOT = Path(__file__).resolve().parents[2]
WSGI_SERVER = Path(__file__).with_name("wsgi_server.py")
URL = "/portfolio/sync/ibkr"

# A `manage.py sync_ibkr` process that loads Django, says "ready", and runs the command
# when it reads a line: processes started ahead of time can then all start together.
WARM_COMMAND = (
    "import sys; sys.argv = ['manage.py', 'sync_ibkr'] + sys.argv[1:]; "
    "import manage, django; from django.conf import settings; "
    "import os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'portfolio_site.settings'); "
    "django.setup(); import ibkr_sync.management.commands.sync_ibkr, ibkr_sync.gateway; "
    "import importlib; importlib.import_module(settings.IBKR_CLIENT_LIBRARY); "
    "print('ready', flush=True); sys.stdin.readline(); manage.main()"
)


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float


class Deployment:
    def __init__(self, workdir: Path, *, gateway_port: int, database_url: str | None = None):
        self.workdir = workdir
        self.token = secrets.token_hex(20)
        base = database_url or os.environ.get("DATABASE_URL", "")
        if base.startswith(("postgres://", "postgresql://")):
            config = environ.Env.db_url_config(base)
            self.pg = {
                "host": config.get("HOST") or "127.0.0.1",
                "port": int(config.get("PORT") or 5432),
                "user": config.get("USER") or "postgres",
                "password": config.get("PASSWORD") or None,
            }
            self.db_name = f"{config['NAME']}_faults"
            auth = self.pg["user"] + (f":{self.pg['password']}" if self.pg["password"] else "")
            self.database_url = (
                f"postgres://{auth}@{self.pg['host']}:{self.pg['port']}/{self.db_name}"
            )
        else:
            self.pg = None
            self.db_path = workdir / "deployment.sqlite3"
            self.database_url = f"sqlite:///{self.db_path}"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("IBKR_", "DJANGO_")) and k not in {"DATABASE_URL", "DEBUG"}
        }
        self.env.update(
            DATABASE_URL=self.database_url,
            # Production-like: DEBUG off, so error pages and settings are the real ones.
            DEBUG="false",
            SECRET_KEY=secrets.token_urlsafe(50),
            ALLOWED_HOSTS="127.0.0.1",
            # Plain HTTP on loopback, as behind the TLS-terminating reverse proxy.
            SECURE_SSL_REDIRECT="false",
            IBKR_HOST="127.0.0.1",
            IBKR_PORT=str(gateway_port),
            IBKR_CLIENT_ID="31",
            IBKR_CONNECT_TIMEOUT="2",
            IBKR_REQUEST_TIMEOUT="60",  # a test may hold a sync mid-read
            # The concurrency tests send 20 syncs at once with one token: no rate limit.
            IBKR_SYNC_THROTTLE_RATE="none",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.server: subprocess.Popen | None = None
        self.base_url = ""

    # --- database -------------------------------------------------------------------------

    def create(self) -> Deployment:
        if self.pg is not None:
            import psycopg

            with psycopg.connect(dbname="postgres", autocommit=True, **self.pg) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
                admin.execute(f'CREATE DATABASE "{self.db_name}"')
        self.manage("migrate", "--noinput", "-v", "0", check=True)
        self.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import Permission, User; "
            "from rest_framework.authtoken.models import Token; "
            "u = User.objects.create_user('syncer', password=None); "
            "u.user_permissions.add(Permission.objects.get(codename='run_sync')); "
            f"Token.objects.create(user=u, key='{self.token}')",
            check=True,
        )
        return self

    def destroy(self) -> None:
        self.stop_server()
        if self.pg is not None:
            import psycopg

            with psycopg.connect(dbname="postgres", autocommit=True, **self.pg) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def query(self, sql: str, params: tuple = ()) -> list[tuple[Any, ...]]:
        if self.pg is not None:
            import psycopg

            with psycopg.connect(dbname=self.db_name, **self.pg) as conn:
                cursor = conn.execute(sql.replace("?", "%s"), params)
                return list(cursor.fetchall()) if cursor.description else []
        with sqlite3.connect(self.db_path, timeout=20) as conn:
            return list(conn.execute(sql, params).fetchall())

    def positions(self) -> list[tuple]:
        """Every stored position, with its identity and state (a failed run changes none)."""
        return self.query(
            "SELECT a.external_id, i.external_id, p.quantity, p.average_cost, p.opened_at, "
            "p.last_synced_at, p.closed_at FROM portfolio_position p "
            "JOIN portfolio_account a ON a.id = p.account_id "
            "JOIN portfolio_instrument i ON i.id = p.instrument_id ORDER BY 1, 2"
        )

    def runs(self) -> list[tuple]:
        return self.query(
            "SELECT id, status, error_code, trigger FROM ibkr_sync_syncrun ORDER BY id"
        )

    # --- processes ------------------------------------------------------------------------

    def manage(
        self, *args: str, check: bool = False, timeout: float = 120, env: dict | None = None
    ):
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result

    def start_sync(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "manage.py", "sync_ibkr", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def warm_sync(self) -> subprocess.Popen:
        """A `sync_ibkr` process, loaded and waiting for `go(process)`."""
        process = subprocess.Popen(
            [sys.executable, "-c", WARM_COMMAND],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            raise RuntimeError(f"sync_ibkr did not start: {line}{process.stderr.read()}")
        return process

    @staticmethod
    def go(process: subprocess.Popen) -> None:
        process.stdin.write("go\n")
        process.stdin.flush()

    def start_server(self) -> str:
        self.server = subprocess.Popen(
            [sys.executable, str(WSGI_SERVER)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.server.stdout.readline()
        if not line.strip().isdigit():
            self.server.kill()
            raise RuntimeError(f"WSGI server did not start: {line}{self.server.stderr.read()}")
        self.base_url = f"http://127.0.0.1:{int(line)}"
        return self.base_url

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if server is not None:
            server.stdout.close()
            server.stderr.close()

    def post(self, path: str = URL, *, timeout: float = 30) -> Reply:
        request = urllib.request.Request(
            self.base_url + path, method="POST", headers={"Authorization": f"Token {self.token}"}
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, response.read(), time.monotonic() - started)
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read(), time.monotonic() - started)
