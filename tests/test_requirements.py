"""The ib_async requirements are the main ones with ib_async in place of ib_insync: a
dependency added to one and not the other fails the ib_async run at import."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(name: str) -> set[str]:
    lines = (ROOT / name).read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_the_ib_async_requirements_pin_everything_else_the_same():
    main = pins("requirements.txt") - {
        p for p in pins("requirements.txt") if p.startswith("ib_insync")
    }
    ib_async = pins("requirements-ib_async.txt")
    assert {p for p in ib_async if p.startswith("ib_async==")}, "ib_async is pinned"
    assert ib_async - {p for p in ib_async if p.startswith("ib_async==")} == main


def test_the_extras_are_named_as_the_wheel_publishes_them():
    """The wheel's metadata names an extra normalized (`ib_async` -> `ib-async`), and a pip
    older than PEP 685 (23.2, the one `python3.11 -m venv` brings) finds `[ib_async]` in
    no extra: it warns, and installs the distribution without it. The README and the
    checks' hints say each extra as it is published."""
    import re
    import tomllib

    from ibkr_sync import checks

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    published = {re.sub(r"[-_.]+", "-", name).lower() for name in extras}
    texts = {
        "README.md": (ROOT / "README.md").read_text(),
        "checks.py": Path(checks.__file__).read_text(),
    }
    for where, text in texts.items():
        named = set(re.findall(r"django-ibkr-sync\[([^\]]+)\]", text))
        assert named, where
        assert named <= published, (where, named - published)
