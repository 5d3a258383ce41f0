"""The task queue's broker in tests: the Redis database of CELERY_BROKER_URL (database 5
unless the environment says otherwise), read back with the plain client: which tasks
were sent to which queue, with which arguments.

A test that needs it skips without Redis, except with REQUIRE_REDIS=1 (as in CI), where
it fails.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from django.conf import settings


def broker_client():
    """A client of the broker's Redis database, emptied; or a skip (a failure with
    REQUIRE_REDIS=1)."""
    try:
        import redis
    except ImportError:
        reason = "the redis client is not installed (pip install 'celery[redis]')"
    else:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            reason = f"Redis does not answer at {settings.CELERY_BROKER_URL} ({exc})"
        else:
            client.flushdb()  # this suite's broker database only
            return client
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason}; REQUIRE_REDIS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def sent(client, queue: str) -> list[tuple[str, list]]:
    """The tasks waiting in `queue`, oldest first: (task name, positional arguments)."""
    found = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSHed: the newest first
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        found.append((message["headers"]["task"], args))
    return found
