"""The Flex import benchmark still runs: a tiny statement, as a subprocess (not timed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.processes]


def test_flex_bench_prints_the_bare_pass_the_parse_the_import_and_the_re_import():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "bench/flex_bench.py", "--transactions", "2000", "--positions", "50",
         "--accounts", "2", "--databases", "sqlite"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    assert "Statement: 2,000 transactions, 50 positions, 2 accounts" in done.stdout
    rows = {
        (row[0].strip("| "), row[1]): row
        for row in (line.split(" | ") for line in done.stdout.splitlines())
        if len(row) == 7 and row[2] != "seconds" and row[2] != "---"
    }
    assert set(rows) == {
        ("-", "bare iterparse"),
        ("-", "parse"),
        ("sqlite", "import"),
        ("sqlite", "re-import"),
    }
    assert all(float(row[2]) > 0 for row in rows.values())
    assert rows["-", "bare iterparse"][5] == rows["-", "parse"][5] == "2000"
    assert rows["sqlite", "import"][5] == "2000 created"
    assert rows["sqlite", "re-import"][5] == "2000 unchanged, 0 written", (
        "a re-import writes nothing"
    )
    assert float(rows["sqlite", "import"][3]) > 1, "the import's ratio to the bare pass"
    assert rows["sqlite", "import"][4].startswith("<= 2 (")


def test_flex_bench_floor_writes_the_rows_of_the_import_again_and_states_the_bound():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "bench/flex_bench.py", "--transactions", "2000", "--positions", "50",
         "--accounts", "2", "--databases", "sqlite", "--floor"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    rows = {
        (row[0].strip("| "), row[1]): row
        for row in (line.split(" | ") for line in done.stdout.splitlines())
        if len(row) == 7 and row[2] != "seconds" and row[2] != "---"
    }
    kept = rows["-", "parse floor (bare + a tuple of texts per row)"]
    assert float(kept[2]) > 0 and kept[5] == "2000"
    floor = rows["sqlite", "database floor"]
    assert float(floor[2]) > 0 and float(floor[3]) > 0
    assert int(floor[5].split()[0]) >= 2000, "every row the import created, the ledger's too"
    assert "sqlite: the import cannot take less than the bare pass and the database floor" in (
        done.stdout
    )
