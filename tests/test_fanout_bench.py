"""bench/fanout_bench.py still runs: a tiny fan-out (three connections, two workers) on a
real Redis (database 6) with real worker processes, as a subprocess; its figures are
checked for what they say happened, never for how fast it was.

Skipped without Redis, except with REQUIRE_REDIS=1 (as in CI), where it fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 6

pytestmark = [pytest.mark.integration, pytest.mark.processes]


@pytest.fixture
def redis_db():
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2)
        client.ping()
    except Exception as exc:  # not installed, or not answering
        reason = f"Redis does not answer at 127.0.0.1:6379 ({exc})"
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}; REQUIRE_REDIS=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    yield client
    client.close()


def fanout(*args: str, database_url: str | None = None) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL"}
    }
    command = [sys.executable, "bench/fanout_bench.py", "--redis-db", str(REDIS_DB), *args]
    if database_url:
        command += ["--database-url", database_url]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_fan_out_syncs_every_connection_and_a_hanging_gateway_fails_alone(redis_db):
    url = os.environ.get("DATABASE_URL", "")
    done = fanout(
        "--connections", "3", "--positions", "30", "--workers", "2", "--hang-timeout", "1",
        "--overhead-samples", "2", "--json",
        database_url=url if url.startswith(("postgres://", "postgresql://")) else None,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert (figures["connections"], figures["workers"], figures["overhead_samples"]) == (3, 2, 2)
    assert figures["sum_of_singles"] > 0 and figures["fan_out_wall"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["fan_out_wall"] / (figures["sum_of_singles"] / 2)
    )
    hang = figures["hang"]
    assert (hang["status"], hang["error_code"]) == ("failed", "gateway_timeout")
    assert hang["duration"] >= 1, "it failed on its own timeout"
    assert hang["others_failed"] == 0
    assert "| fan-out / (sum / 2) |" in done.stdout
    assert redis_db.dbsize() == 0, "the benchmark empties its Redis database"


def test_a_redis_database_in_use_is_refused_and_left_as_it_was(redis_db):
    redis_db.set("someone-elses", "value")
    try:
        done = fanout("--connections", "1", "--positions", "1", "--workers", "1")

        assert done.returncode != 0
        assert f"Redis database {REDIS_DB}" in done.stderr and "--redis-db" in done.stderr
        assert redis_db.get("someone-elses") == b"value"
    finally:
        redis_db.delete("someone-elses")
