"""The distribution as it would be published: `python -m build` makes an sdist and a wheel
that `twine check --strict` passes, with the metadata an index shows (the README as the
long description, the licence, classifiers); and `pip wheel . --no-deps`, the README's
way to build it before it is published, builds our wheel alone."""

from __future__ import annotations

import email
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.packaging.test_host_projects import ROOT, run

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(
        os.environ.get("IBKR_PACKAGING_TESTS") != "1",
        reason="builds the distribution: IBKR_PACKAGING_TESTS=1 to run",
    ),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout: building leaves build/ and *.egg-info beside the sources."""
    copy = tmp_path_factory.mktemp("source") / "django-ibkr-sync"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.sqlite3*", "build", "dist", "*.egg-info",
        ".hypothesis", ".pytest_cache", ".ruff_cache", ".env",
    ))  # fmt: skip
    return copy


def test_the_built_distribution_passes_twine_check_strict(source, tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=tmp_path)
    (sdist,) = dist.glob("django_ibkr_sync-*.tar.gz")
    (wheel,) = dist.glob("django_ibkr_sync-*-py3-none-any.whl")

    checked = run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], cwd=tmp_path)

    assert checked.stdout.count("PASSED") == 2, checked.stdout
    with zipfile.ZipFile(wheel) as files:
        info = wheel.name.split("-py3")[0] + ".dist-info"
        metadata = email.message_from_string(files.read(f"{info}/METADATA").decode())
        licence = files.read(f"{info}/licenses/LICENSE").decode()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert metadata.get_payload().strip() == readme.strip(), "the README is the description"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata["License-Expression"] == "MIT"
    assert licence == (ROOT / "LICENSE").read_text() and "the django-ibkr-sync authors" in licence
    classifiers = metadata.get_all("Classifier")
    assert {"Framework :: Django", "Framework :: Django :: 5.2"} <= set(classifiers)
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], "the expression says it"
    assert metadata["Requires-Python"] == ">=3.11"
    assert "django" in metadata["Keywords"]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= names


def test_pip_wheel_no_deps_builds_our_wheel_alone(source, tmp_path):
    dist = tmp_path / "dist"

    run([sys.executable, "-m", "pip", "wheel", ".", "-w", dist, "--no-deps", "-q"], cwd=source)

    assert [path.name for path in dist.iterdir()] == [
        next(dist.glob("django_ibkr_sync-*-py3-none-any.whl")).name
    ]
