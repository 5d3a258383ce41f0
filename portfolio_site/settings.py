"""Settings for the portfolio site, read from the environment (and `.env` if present).

Every value has a safe local default so `manage.py` works on a fresh clone; production
sets `SECRET_KEY`, `DEBUG=False`, `ALLOWED_HOSTS` and `DATABASE_URL`. A malformed value
stops start-up with an error that names the variable, rather than surfacing later as a
confusing connection failure.
"""

import os
from importlib.util import find_spec
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from ibkr_sync import environment
from ibkr_sync.api.schema import ENUM_NAME_OVERRIDES

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

# The dotenv file: `.env` in the project, or the file ENV_FILE names; ENV_FILE set but
# empty reads none (the test suite runs so, and so does every process it starts, whatever
# a developer's `.env` holds). Values in the real environment win over the file's.
_env_file = os.environ.get("ENV_FILE")
if _env_file is None:
    environ.Env.read_env(BASE_DIR / ".env")  # if there is one
elif _env_file.strip():
    if not Path(_env_file).is_file():
        raise ImproperlyConfigured(f"ENV_FILE names no file: {_env_file!r}.")
    environ.Env.read_env(_env_file)


# The project's own settings are parsed by the app's parsers (ibkr_sync/environment.py),
# so they take the same words and fail with the same messages as the IBKR_* ones.
def _env_int(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    return environment.integer(name, env.str(name, default=str(default)), minimum, maximum)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    return environment.choice(name, env.str(name, default=default), choices)


def _env_bool(name: str, default: bool) -> bool:
    """true/yes/on/1 or false/no/off/0; unset or empty: `default`."""
    raw = env.str(name, default="")
    return environment.boolean(name, raw) if raw.strip() else default


# Off unless asked for: a server started without configuration is a production server.
# Local development and the demo set DEBUG=true (`make demo` does; see .env.example).
DEBUG = _env_bool("DEBUG", False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (a long random string). For local "
            "development set DEBUG=true instead, e.g. `cp .env.example .env`."
        )
    SECRET_KEY = "django-insecure-local-development-key-do-not-use-in-production"
if DEBUG:
    ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
else:
    ALLOWED_HOSTS = [host for host in env.list("ALLOWED_HOSTS", default=[]) if host]
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured(
            "ALLOWED_HOSTS must be set when DEBUG is off: the host names this site answers "
            "to, comma-separated (e.g. portfolio.example.com)."
        )
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS: on whenever DEBUG is off; each can be turned off on its own ----------------
SECURE_SSL_REDIRECT = _env_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Health probes from the machine itself or a load balancer may use plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SESSION_COOKIE_SECURE = _env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = _env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = _env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _env_bool("SECURE_HSTS_PRELOAD", False)
# Behind a reverse proxy that terminates TLS: trust its X-Forwarded-Proto header.
if _env_bool("SECURE_PROXY_SSL", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "portfolio",
    "ibkr_sync",
    "portfolio_site.demo",  # manage.py ibkr_demo: this project's, not the apps'
]
# Connections' schedules (django-celery-beat's PeriodicTask, kept in step with each
# connection's schedule): installed with the task queue's requirements (celery extra),
# so its tables exist (`migrate`) before the queue is turned on, and nothing of it needs
# a broker until a beat process runs. Without the package, schedules are kept and do
# nothing; everything else works as before.
if find_spec("django_celery_beat") is not None:
    INSTALLED_APPS.append("django_celery_beat")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the collected static files (admin, API docs) from the app server itself.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portfolio_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The site's own admin index (a link to the portfolio overview).
        "DIRS": [BASE_DIR / "portfolio_site" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "portfolio_site.wsgi.application"
ASGI_APPLICATION = "portfolio_site.asgi.application"


def _database_url(name: str, default: str) -> dict:
    """The database the URL in `name` names (unset or empty: `default`). One whose scheme
    names no database stops start-up naming the variable, never its value (it holds the
    password): without this, no scheme at all failed as a KeyError, an unknown one as a
    missing module."""
    raw = env.str(name, default="").strip() or default
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in environ.Env.DB_SCHEMES:
        raise ImproperlyConfigured(
            f"{name} must be a database URL such as postgres://USER:PASSWORD@HOST:5432/NAME "
            "or sqlite:///PATH; "
            + (f"its scheme {scheme!r} names no database." if scheme else "it has no scheme.")
        )
    return environ.Env.db_url_config(raw)


DATABASES = {"default": _database_url("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the admin read while a sync writes; the busy timeout makes a second
    # writer wait for the lock instead of failing at once with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(BASE_DIR / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Compressed, not hashed: pages render whether or not `collectstatic` has run, so the
    # demo, the tests and a fresh deploy never fail on a missing manifest entry.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first, so an anonymous caller gets 401 with a WWW-Authenticate header.
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI schema at /api/schema/, Swagger UI at /api/docs/ and Redoc at /api/redoc/, with
# their JavaScript and CSS served from this site (drf-spectacular-sidecar), not a CDN.
SPECTACULAR_SETTINGS = {
    "TITLE": "IBKR portfolio sync API",
    "DESCRIPTION": "Read the portfolio (accounts, positions), sync it from Interactive "
    "Brokers, and read the sync history. Token (`Authorization: Token ...`) or session "
    "authentication. Every error is `{status: error, code, detail}`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": ENUM_NAME_OVERRIDES,
}

# --- Interactive Brokers (TWS / IB Gateway) ---------------------------------------------
# Ports: TWS live 7496, TWS paper 7497, IB Gateway live 4001, IB Gateway paper 4002.
# Every IBKR_* setting of the sync app (host, port, client id, timeouts, lock, health,
# throttle), read from the environment with the app's own defaults and rules
# (ibkr_sync/environment.py): a malformed value stops start-up, naming the variable.
globals().update(environment.read_environment())

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL = _env_choice("LOG_LEVEL", "WARNING", _LEVELS)
IBKR_LIBRARY_LOG_LEVEL = _env_choice("IBKR_LIBRARY_LOG_LEVEL", "", ("", *_LEVELS))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "null": {"class": "logging.NullHandler"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own records (a failed request is one line of django.request) reach the
        # console once, through the root handler: without this, Django's default console
        # handler prints each of them a second time when DEBUG is on.
        "django": {
            "handlers": [],
            "level": LOG_LEVEL if LOG_LEVEL in ("WARNING", "ERROR", "CRITICAL") else "INFO",
            "propagate": True,
        },
        # The IB client libraries log their own tracebacks for conditions we translate
        # into one clear error; keep them out of the console unless asked for
        # (`sync_ibkr -v 2`, or IBKR_LIBRARY_LOG_LEVEL).
        **{
            name: {
                "handlers": ["console"] if IBKR_LIBRARY_LOG_LEVEL else ["null"],
                "level": IBKR_LIBRARY_LOG_LEVEL or "INFO",
                "propagate": False,
            }
            for name in ("ib_insync", "ib_async", "eventkit")
        },
    },
}

# --- The task queue (IBKR_SYNC_TASK_QUEUE=celery) ------------------------------------------
# Celery reads its settings from here (the CELERY_ namespace, portfolio_site/celery.py).
# Unused unless IBKR_SYNC_TASK_QUEUE=celery: by default every sync runs in-process.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
# Error reports hide settings by their names only: the password inside a URL (the broker's,
# a cache's) would go out whole in the report mailed to ADMINS and on DEBUG's error page.
DEFAULT_EXCEPTION_REPORTER_FILTER = "ibkr_sync.reporting.ReporterFilter"
# A queued sync's message is acknowledged when the sync has ended (acks_late): the broker
# hands it to another worker if it is not acknowledged within the visibility timeout, so
# the timeout must be longer than the longest sync (IBKR_SYNC_STALE_AFTER). A redelivered
# task whose sync was taken already does nothing.
CELERY_VISIBILITY_TIMEOUT = _env_int(
    "CELERY_VISIBILITY_TIMEOUT",
    max(3600, 2 * int(IBKR_SYNC_STALE_AFTER)),  # noqa: F821 (read_environment)
    minimum=int(IBKR_SYNC_STALE_AFTER) + 1,  # noqa: F821
)
# Every wait on the broker bounded (Redis: kombu waits forever by default): a broker that
# accepts connections and never answers (frozen, or gone behind a firewall that keeps the
# connection open) would hold the request that queues a sync, and leave its run queued
# for good when the request is killed. Bounded, the publish fails: the run is failed as
# queue_unavailable and the caller told so.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
}
# A sync takes seconds to minutes: a worker takes one task at a time from the broker.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = True
# Outcomes are in the SyncRun rows (GET /portfolio/sync/runs/<id>): no result backend.
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# `celery -A portfolio_site beat` reads the connections' schedules from the database.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
