"""The benchmarks still run: a tiny version of each, as a subprocess (not timed)."""

import json
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
    assert steps == {("wire read", "read"), ("raw read", "read"), ("product", "with values")} | {
        (impl, step) for impl in ("product", "naive") for step in ("first", "unchanged", "changed")
    }
    wire = next(row for row in rows if row[3] == "wire read")
    raw = next(row for row in rows if row[3] == "raw read")
    assert float(wire[5]) > 0 and wire[7] == "1.00" and raw[6] == "1.00"
    unchanged = next(row for row in rows if row[3:5] == ["product", "unchanged"])
    assert float(unchanged[6]) > 0 and float(unchanged[7]) > 0
    assert unchanged[10] == "0", "an unchanged re-sync writes no position or instrument"


def test_floor_writes_the_rows_of_the_first_sync_again_and_states_the_bound():
    out = run(
        "bench/sync_bench.py", "--positions", "300", "--accounts", "2", "--databases", "sqlite",
        "--naive-max", "0", "--repeat", "2", "--floor",
    )  # fmt: skip

    rows = {
        (row[3], row[4]): row
        for row in (line.split(" | ") for line in out.splitlines() if line.startswith("| 300 "))
    }
    first, floor = rows["product", "first"], rows["database floor", "first"]
    assert float(floor[5]) > 0 and float(floor[7]) > 0
    assert floor[10] == first[10] == "600", "the positions and instruments the first sync wrote"
    assert int(floor[9]) >= 900, "every row it created: positions, instruments, changes, ..."
    assert "sqlite, N=300 K=2: the first sync cannot take less than the wire read" in out
    assert "changed 0 rows it did not create" in out


def test_wire_read_reads_every_position_without_a_client_library():
    out = run(
        "bench/sync_bench.py", "--worker", "wire", "--positions", "250", "--accounts", "3",
        "--repeat", "2",
    )  # fmt: skip

    measured = json.loads(out.strip().splitlines()[-1])  # the worker checked 250 and 3
    assert len(measured["times"]) == 2 and measured["seconds"] > 0


def test_connections_bench_syncs_singly_all_and_two_at_once():
    out = run(
        "bench/sync_bench.py", "--connections", "3", "--positions", "40", "--accounts", "2",
        "--databases", "sqlite", "--repeat", "1",
    )  # fmt: skip

    rows = {
        row[1]: row
        for row in (line.split(" | ") for line in out.splitlines())
        if row[0] == "| sqlite"
    }
    assert set(rows) == {
        "3 single first syncs, summed",
        "3 single syncs, summed",
        "sync_all",
        "gw00 alone, in a process of its own",
        "gw01 alone, in a process of its own",
        "gw00 and gw01 at the same moment, two processes",
    }
    assert all(float(row[2]) > 0 for row in rows.values())
    singles, everything = float(rows["3 single syncs, summed"][2]), float(rows["sync_all"][2])
    assert float(rows["sync_all"][3]) == pytest.approx(everything / singles, abs=0.1)


def test_connections_floor_counts_the_cpu_of_every_process_a_sync_involves():
    out = run(
        "bench/sync_bench.py", "--connections", "2", "--positions", "40", "--accounts", "2",
        "--databases", "sqlite", "--repeat", "1", "--floor",
    )  # fmt: skip

    rows = {
        row[1]: row
        for row in (line.split(" | ") for line in out.splitlines())
        if row[0] == "| sqlite"
    }
    for name in ("gw00", "gw01"):
        cpu = rows[f"{name} alone: CPU of every process it involves"]
        assert float(cpu[2]) > 0 and "sync " in cpu[4] and "simulator " in cpu[4]
    least = next(row for step, row in rows.items() if step.startswith("two at once, least on"))
    assert float(least[2]) > 0 and least[4].startswith("<= 1.3 x the slower alone")
    assert "sqlite: two syncs at once need the CPU of both" in out


def test_profile_names_the_sync_functions():
    out = run(
        "bench/sync_bench.py", "--profile", "15", "--positions", "200", "--accounts", "2",
        "--databases", "sqlite",
    )  # fmt: skip

    assert "## sqlite, first sync of 200 positions" in out
    assert "## sqlite, unchanged sync of 200 positions" in out
    assert out.count("apply_snapshot") >= 2  # in both profiles


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
