"""`portfolio` is the broker-agnostic domain: it imports nothing from `ibkr_sync`, and its
templates name none of its URLs. IBKR's parts of the admin (the "Sync now" control, the
sync status on the overview) come from `ibkr_sync`."""

import ast
from pathlib import Path

import portfolio

PORTFOLIO = Path(portfolio.__file__).parent


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module or "")
    return modules


def test_portfolio_imports_nothing_from_ibkr_sync():
    sources = sorted(PORTFOLIO.rglob("*.py"))
    assert len(sources) > 3
    for path in sources:
        for module in imported_modules(path.read_text()):
            assert module.split(".")[0] != "ibkr_sync", f"{path.name} imports {module}"


def test_portfolio_templates_do_not_use_ibkr_sync():
    templates = sorted((PORTFOLIO / "templates").rglob("*.html"))
    assert templates
    for path in templates:
        assert "ibkr_sync" not in path.read_text(), path.name
