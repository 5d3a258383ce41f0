"""The project's Celery app: `celery -A portfolio_site worker` runs the queued syncs
(IBKR_SYNC_TASK_QUEUE=celery) and consumes every queue the app's tasks go to.

Configured from the Django settings named CELERY_* (`CELERY_BROKER_URL`, read from the
environment in settings.py). Loaded with the project (`portfolio_site/__init__.py`) when
Celery is installed, so the web process sends tasks through this app.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portfolio_site.settings")

app = Celery("portfolio_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["ibkr_sync"])


@app.on_after_configure.connect
def _declare_queues(sender: Celery, **kwargs) -> None:
    """The default queue and the sync's queues (by connection kind), each with a routing
    key of its own: a worker started with no option consumes them all."""
    from ibkr_sync.tasks import QUEUES

    names = dict.fromkeys((sender.conf.task_default_queue, *QUEUES))
    sender.conf.task_queues = [Queue(name, routing_key=name) for name in names]
