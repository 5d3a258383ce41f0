"""The reuse boundary: `ibkr_sync` writes into whichever models the settings name and
needs nothing of `portfolio`; `portfolio` (the default domain app) is built on what
`ibkr_sync` offers every host (the abstract model bases, the admin classes) and nothing
else: models and a line of admin registration each, as a host's own app."""

import ast
from pathlib import Path

import ibkr_sync
import portfolio

PORTFOLIO = Path(portfolio.__file__).parent
IBKR_SYNC = Path(ibkr_sync.__file__).parent

# What a host's own portfolio app may use of ibkr_sync, as `portfolio` does.
OFFERED_TO_HOSTS = {
    "ibkr_sync.admin",  # the admin classes of the five models, SyncNowMixin
    "ibkr_sync.api.base",
    "ibkr_sync.api.errors",
    "ibkr_sync.api.fields",
    "ibkr_sync.database",
    "ibkr_sync.decimals",
    "ibkr_sync.models",
    "ibkr_sync.permissions",  # which view permission covers which kind of data
}
# The sync's core: the one-way flow gateway -> mapping -> services, and what they use.
CORE = (
    "conf", "database", "decimals", "exceptions", "gateway", "health", "lock", "mapping",
    "models", "overview", "protocol", "selectors", "services", "signals", "writer",
)  # fmt: skip


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module or "")
    return modules


def test_portfolio_uses_only_what_ibkr_sync_offers_every_host():
    sources = sorted(PORTFOLIO.rglob("*.py"))
    assert len(sources) > 3
    for path in sources:
        for module in imported_modules(path.read_text()):
            if module.split(".")[0] == "ibkr_sync":
                assert module in OFFERED_TO_HOSTS, f"{path.name} imports {module}"


def test_ibkr_sync_needs_nothing_of_portfolio():
    sources = sorted(IBKR_SYNC.rglob("*.py"))
    assert {f"{name}.py" for name in CORE} <= {path.name for path in sources}
    for path in sources:
        for module in imported_modules(path.read_text()):
            assert module.split(".")[0] != "portfolio", f"{path} imports {module}"


def test_ibkr_sync_overrides_no_other_apps_templates():
    templates = sorted((IBKR_SYNC / "templates").rglob("*.html"))
    assert templates
    for path in templates:
        parts = path.relative_to(IBKR_SYNC / "templates").parts
        assert parts[:2] == ("admin", "ibkr_sync") or parts[0] == "ibkr_sync", path


def test_ibkr_sync_migrations_reach_the_models_through_the_settings():
    for path in sorted((IBKR_SYNC / "migrations").glob("0*.py")):
        text = path.read_text()
        assert "'portfolio." not in text and '"portfolio.' not in text, path.name


def test_portfolio_is_only_models_and_their_registration():
    """Everything a host with its own models gets (read API, admin classes, overview,
    templates, static files) lives in ibkr_sync: our portfolio app has nothing more."""
    files = {
        path.relative_to(PORTFOLIO).as_posix()
        for path in PORTFOLIO.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {f for f in files if not f.startswith("migrations/")} == {
        "__init__.py", "admin.py", "apps.py", "models.py"
    }  # fmt: skip


def test_the_abstract_bases_relate_only_to_the_configured_models():
    """A host's app may hold all its models in its first migration: a relation from a base
    to the sync app's own models (SyncRun) would make that migration depend on the sync
    app's, which depend on the host's positions: a circular dependency."""
    from ibkr_sync import conf, models

    bases = [getattr(models, name) for name in dir(models) if name.startswith("Abstract")]
    assert len(bases) == 5
    configured = {conf.model_setting(name) for name in conf.MODEL_SETTINGS}
    for base in bases:
        for field in base._meta.get_fields():
            if field.is_relation:
                target = field.remote_field.model
                label = target if isinstance(target, str) else target._meta.label
                assert label in configured, f"{base.__name__}.{field.name} -> {label}"
