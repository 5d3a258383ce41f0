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
