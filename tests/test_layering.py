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
# The sync's core: the one-way flow source -> snapshot -> mapping -> writer -> services,
# and what they use.
CORE = (
    "conf", "database", "decimals", "exceptions", "gateway", "health", "lock", "mapping",
    "models", "overview", "protocol", "selectors", "services", "signals", "snapshot",
    "writer",
)  # fmt: skip
# The IB client libraries (and the event library they ship): imported under the TWS
# source's package only.
CLIENT_LIBRARIES = {"ib_insync", "ib_async", "eventkit"}
TWS_SOURCE = IBKR_SYNC / "sources" / "tws"
# What reads a source's records, and must know no source: the configured source class
# is the one way to one (`IBKR_SYNC_GATEWAY_CLASS`).
SOURCE_NEUTRAL = ("snapshot", "mapping", "writer", "services", "connections")


def imported_modules(source: str, package: str = "") -> set[str]:
    """The modules `source` imports; relative imports resolved against `package` (the
    dotted package of the file) when given, else left out."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and package:
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1]
            if node.module:
                modules.add(".".join([*base, node.module]))
            else:
                modules.update(".".join([*base, alias.name]) for alias in node.names)
    return modules


def package_of(path: Path) -> str:
    return ".".join(("ibkr_sync", *path.relative_to(IBKR_SYNC).parent.parts))


def test_only_the_tws_source_imports_the_client_library():
    """`ib_insync` / `ib_async` (and `eventkit`) are imported under `sources/tws/` only,
    whether by an import statement or by name (`importlib.import_module`)."""
    importers = set()
    for path in sorted(IBKR_SYNC.rglob("*.py")):
        text = path.read_text()
        modules = imported_modules(text, package_of(path))
        by_name = "import_module(" in text
        if {m.split(".")[0] for m in modules} & CLIENT_LIBRARIES or by_name:
            importers.add(path)
    assert importers, "the TWS source imports the client library"
    for path in importers:
        assert TWS_SOURCE in path.parents, f"{path} imports the client library"


def test_the_source_neutral_modules_know_no_source():
    """snapshot, mapping, writer and services read records, not a source: nothing of
    `sources.tws` or `gateway`; the service reaches the source through the setting, by
    way of the connection it syncs."""
    for name in SOURCE_NEUTRAL:
        path = IBKR_SYNC / f"{name}.py"
        for module in imported_modules(path.read_text(), "ibkr_sync"):
            assert not module.startswith(("ibkr_sync.sources", "ibkr_sync.gateway")), (
                f"{name}.py imports {module}"
            )
            assert module.split(".")[0] not in CLIENT_LIBRARIES, f"{name}.py imports {module}"
    assert "IBKR_SYNC_GATEWAY_CLASS" in (IBKR_SYNC / "connections.py").read_text()


def test_the_sources_import_no_database_layer():
    """A source reads the broker and returns records: the database (the models, the Flex
    token's gate on them, the lock) is given to it by whoever builds it
    (`connections.Target.source`), never imported."""
    database = ("ibkr_sync.models", "ibkr_sync.token_gate", "ibkr_sync.lock", "django.db")
    for path in sorted((IBKR_SYNC / "sources").rglob("*.py")):
        for module in imported_modules(path.read_text(), package_of(path)):
            assert not module.startswith(database), f"{path.name} imports {module}"


def test_the_simulator_writes_by_the_protocol_not_the_source():
    """The simulator and its portfolio share the wire's rules (`protocol`) and the
    records (`snapshot`) with the source; it imports nothing of the source itself."""
    for path in sorted((IBKR_SYNC / "testing").glob("*.py")):
        for module in imported_modules(path.read_text(), package_of(path)):
            assert not module.startswith(("ibkr_sync.sources", "ibkr_sync.gateway")), (
                f"{path.name} imports {module}"
            )


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
    # The five of positions and values, the ledger's three and their common base.
    assert len(bases) == 9
    configured = {conf.model_setting(name) for name in conf.MODEL_SETTINGS}
    for base in bases:
        for field in base._meta.get_fields():
            if field.is_relation:
                target = field.remote_field.model
                label = target if isinstance(target, str) else target._meta.label
                assert label in configured, f"{base.__name__}.{field.name} -> {label}"


def test_only_the_task_module_imports_celery_and_only_schedules_the_beat():
    """The app works without Celery: `tasks.py` is the only module that imports it, and
    `schedules.py` the only one that imports django-celery-beat (which imports Celery:
    lazily, only when it is installed)."""
    importers: dict[str, set[str]] = {"celery": set(), "kombu": set(), "django_celery_beat": set()}
    for path in sorted(IBKR_SYNC.rglob("*.py")):
        for module in imported_modules(path.read_text(), package_of(path)):
            top = module.split(".")[0]
            if top in importers:
                importers[top].add(path.relative_to(IBKR_SYNC).as_posix())
    assert importers == {
        "celery": {"tasks.py"},
        "kombu": set(),
        "django_celery_beat": {"schedules.py"},
    }
