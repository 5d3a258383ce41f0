"""A host's own models with everything Django's bulk_create honours (a UUID or text
primary key with a default, auto_now / auto_now_add, defaults called per row, db_default,
a generated field): every sync fills and stamps them as Django would.

The syncs (tests/host_app/host_syncs.py) run in a project of the host's models of their
own, in a pytest of its own: the models a sync writes, and the position model that
PositionChange points at, are fixed when a project starts. On the database of this run
(DATABASE_URL), with a test database of its own.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_SYNCS = Path("tests/host_app/host_syncs.py")

pytestmark = [pytest.mark.integration, pytest.mark.processes]


def test_syncs_into_a_hosts_own_models_fill_every_field_as_django_would():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--ds", "tests.host_app.settings", str(HOST_SYNCS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    tests = re.findall(r"^def (test_\w+)", (ROOT / HOST_SYNCS).read_text(), re.MULTILINE)
    assert len(tests) >= 4
    assert re.search(rf"\b{len(tests)} passed\b", done.stdout), done.stdout[-2000:]
    assert not re.search(r"\b(failed|skipped|error)", done.stdout), done.stdout[-2000:]
