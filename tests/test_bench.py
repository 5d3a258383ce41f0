"""The benchmarks still run: a tiny version of each, as a subprocess (not timed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.matrix import GATEWAY_FAULTS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.processes]


def run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sync_bench_prints_the_table_for_product_and_baseline():
    out = run(
        "bench/sync_bench.py", "--positions", "300", "--accounts", "2", "--databases", "sqlite",
        "--naive-max", "300", "--repeat", "1",
    )  # fmt: skip

    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 300 ")]
    steps = {(row[3], row[4]) for row in rows}
    assert steps == {("raw read", "read"), ("product", "with values")} | {
        (impl, step) for impl in ("product", "naive") for step in ("first", "unchanged", "changed")
    }
    unchanged = next(row for row in rows if row[3:5] == ["product", "unchanged"])
    assert unchanged[9] == "0", "an unchanged re-sync writes no position or instrument"


def test_changelist_bench_reports_queries_per_view():
    out = run(
        "bench/sync_bench.py", "--changelist", "500", "--accounts", "2", "--databases", "sqlite",
        "--repeat", "1",
    )  # fmt: skip

    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| sqlite ")]
    assert len(rows) == 6
    assert all(int(row[3].rstrip(" |")) <= 10 for row in rows)


def test_fault_bench_handles_every_fault_cleanly():
    out = run("bench/faults.py", "--runs", "1", "--timeout", "0.5")

    assert "positions lost in total: 0" in out
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    faults = rows[1:]
    assert len(faults) == len(GATEWAY_FAULTS)
    assert all(row[3] == "1" and row[4] == "0" for row in faults), out
