"""The project around the apps. Its Celery app (`celery.py`) is loaded with it when Celery
is installed, so syncs queued by the web process (IBKR_SYNC_TASK_QUEUE=celery) are sent
through it; without Celery everything runs in-process, as it does by default."""

from importlib.util import find_spec

if find_spec("celery") is not None:
    from .celery import app as celery_app

    __all__ = ["celery_app"]
