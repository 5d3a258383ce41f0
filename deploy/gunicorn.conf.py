"""gunicorn settings for the portfolio site: `gunicorn -c deploy/gunicorn.conf.py`.

Every value can be overridden from the environment (GUNICORN_BIND, GUNICORN_WORKERS,
GUNICORN_THREADS, GUNICORN_TIMEOUT, GUNICORN_LOG_LEVEL, FORWARDED_ALLOW_IPS); the
Django settings come from the environment or `.env` as usual.
"""

import multiprocessing
import os
from pathlib import Path

# The project directory, so the service can start gunicorn from anywhere.
chdir = str(Path(__file__).resolve().parent.parent)
wsgi_app = "portfolio_site.wsgi:application"

# Behind a reverse proxy (nginx, Caddy) on the same machine: listen on loopback only.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", min(4, multiprocessing.cpu_count() * 2 + 1)))
# Threads keep a worker answering reads and /healthz while one of its threads waits for
# the gateway during a POST /portfolio/sync/ibkr.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# A sync answers once the gateway has sent every position and every account's values:
# allow for IBKR_CONNECT_TIMEOUT + 2 x IBKR_REQUEST_TIMEOUT (10 + 60 + 60 s by default) and
# the database writes.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "180"))
graceful_timeout = 30
keepalive = 5

# Logs on stdout/stderr: systemd's journal keeps them (`journalctl -u portfolio`).
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Trust X-Forwarded-* only from the local reverse proxy.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
