"""The OpenAPI schema: generated from the code, valid OpenAPI 3, covering every endpoint."""

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.plumbing import _load_enum_name_overrides
from drf_spectacular.settings import patched_settings
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from ibkr_sync.api.read_views import NotFoundView
from ibkr_sync.api.schema import ENUM_NAME_OVERRIDES

SYNC_STATUSES = {
    "200", "202", "400", "401", "403", "404", "405", "409", "429", "500", "502", "503", "504",
}  # fmt: skip


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict:
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content
    return response.json()


def api_routes() -> set[str]:
    """Every DRF endpoint the URLconf routes to, as OpenAPI paths (`{id}` for `<int:pk>`,
    `{external_id}` for `<str:external_id>`)."""
    found = set()

    def walk(patterns, prefix):
        for entry in patterns:
            route = prefix + str(entry.pattern)
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, route)
            elif isinstance(entry, URLPattern) and hasattr(entry.callback, "cls"):
                if route.startswith("api/") or entry.callback.cls is NotFoundView:
                    continue  # the schema, its documentation pages, the JSON 404
                route = re.sub(r"<(?:\w+:)?pk>", "{id}", route)
                found.add("/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route))

    walk(get_resolver().url_patterns, "")
    return found


def test_schema_is_valid_openapi_3(schema):
    assert schema["openapi"].startswith("3.")
    validate_schema(schema)  # raises on any violation of the OpenAPI 3 JSON schema


def test_schema_documents_every_api_endpoint(schema):
    routes = api_routes()

    assert {
        "/portfolio/accounts",
        "/portfolio/accounts/{external_id}/history",
        "/portfolio/positions",
        "/portfolio/cash",
        "/portfolio/sync/ibkr",
        "/portfolio/sync/runs",
        "/portfolio/sync/runs/{id}",
        "/healthz",
    } <= routes
    assert routes <= set(schema["paths"])


def test_the_sync_endpoint_documents_every_answer_in_the_error_shape(schema):
    responses = schema["paths"]["/portfolio/sync/ibkr"]["post"]["responses"]

    assert set(responses) == SYNC_STATUSES
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SyncResult"
    }
    assert responses["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SyncQueued"
    }
    assert "Location" in responses["202"]["headers"]
    for status in SYNC_STATUSES - {"200", "202"}:
        body = responses[status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/Error"}, status
        assert responses[status]["description"], status
    for code in ("invalid_account_id", "unknown_account", "sync_already_running",
                 "client_id_in_use", "incomplete_snapshot", "gateway_error",
                 "gateway_unavailable", "gateway_timeout", "database_unavailable",
                 "internal_error", "invalid_query", "throttled"):  # fmt: skip
        assert any(code in r["description"] for r in responses.values()), code
    assert "Retry-After" in responses["429"]["headers"]
    error = schema["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"status", "code", "detail"}


def test_decimals_are_documented_as_strings(schema):
    position = schema["components"]["schemas"]["Position"]["properties"]

    for name in (
        "quantity", "average_cost", "cost_basis", "market_price", "market_value",
        "unrealized_pnl", "realized_pnl",
    ):  # fmt: skip
        assert (position[name]["type"], position[name]["format"]) == ("string", "decimal")
    assert position["market_value"]["nullable"] is True
    assert position["valued_at"]["format"] == "date-time"


def test_position_filters_and_pagination_are_documented(schema):
    operation = schema["paths"]["/portfolio/positions"]["get"]
    params = {p["name"] for p in operation["parameters"]}

    assert {
        "account", "sec_type", "currency", "status", "symbol", "as_of", "cursor", "page_size",
    } <= params  # fmt: skip
    assert {"200", "400", "401", "403"} <= set(operation["responses"])


def test_positions_as_of_are_documented_as_their_own_page(schema):
    """One path, two answers: the positions now, or those held at as_of, rebuilt."""
    operation = schema["paths"]["/portfolio/positions"]["get"]
    components = schema["components"]["schemas"]
    as_of = next(p for p in operation["parameters"] if p["name"] == "as_of")
    body = operation["responses"]["200"]["content"]["application/json"]["schema"]
    pages = components[body["$ref"].rsplit("/", 1)[1]]["oneOf"]

    assert as_of["schema"]["format"] == "date-time"
    assert "change log" in as_of["description"]
    assert pages == [
        {"$ref": "#/components/schemas/PaginatedPositionList"},
        {"$ref": "#/components/schemas/PaginatedPositionAsOfList"},
    ]
    now = components["PaginatedPositionList"]["properties"]
    then = components["PaginatedPositionAsOfList"]["properties"]
    assert now["results"]["items"] == {"$ref": "#/components/schemas/Position"}
    assert then["results"]["items"] == {"$ref": "#/components/schemas/PositionAsOf"}
    assert (then["as_of"]["format"], then["complete"]["type"]) == ("date-time", "boolean")
    rebuilt = components["PositionAsOf"]["properties"]
    assert {"quantity", "average_cost", "cost_basis", "since"} <= set(rebuilt)
    assert not {"market_value", "market_price", "unrealized_pnl", "is_open"} & set(rebuilt)
    assert rebuilt["cost_basis"]["format"] == "decimal"


def test_operations_name_their_authentication(schema):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                continue
            schemes = {name for entry in operation["security"] for name in entry}
            assert {"tokenAuth", "cookieAuth"} <= schemes, (method, path)
            assert "401" in operation["responses"], (method, path)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "assets"),
    [
        ("/api/docs/", ["swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-dist/swagger-ui.css"]),
        ("/api/redoc/", ["redoc/bundles/redoc.standalone.js"]),
    ],
)
def test_documentation_pages_use_local_assets_only(client, url, assets):
    response = client.get(url)

    assert response.status_code == 200
    page = response.content.decode()
    for asset in assets:
        assert f"/static/drf_spectacular_sidecar/{asset}" in page
    external = re.findall(r"""(?:src|href)=["'](https?:)?//""", page)
    assert external == [], "the documentation page loads something from another site"


def test_a_sync_result_says_success_as_a_documented_enum(schema):
    result = schema["components"]["schemas"]["SyncResult"]
    status = result["properties"]["status"]
    ref = status["allOf"][0]["$ref"] if "allOf" in status else status["$ref"]

    assert schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["enum"] == ["success"]
    assert "status" in result["required"]


def test_every_choice_field_of_the_api_is_an_enum_in_the_schema(schema):
    """No hand-written `status` / `kind` method field: each is an enum of its values."""
    for name, component in schema["components"]["schemas"].items():
        for field, spec in component.get("properties", {}).items():
            if field in {"status", "kind", "trigger"}:
                assert "allOf" in spec or "$ref" in spec or "enum" in spec, (name, field)


def test_the_dry_run_change_kinds_are_the_models():
    from ibkr_sync.api.serializers import PositionChangeSerializer
    from ibkr_sync.models import PositionChange

    kind = PositionChangeSerializer().fields["kind"]

    assert list(kind.choices) == list(PositionChange.Kind.values)


def test_cash_balances_are_documented_with_their_filters_and_exact_decimals(schema):
    operation = schema["paths"]["/portfolio/cash"]["get"]
    cash = schema["components"]["schemas"]["CashBalance"]["properties"]

    assert {"account", "currency", "cursor", "page_size"} <= {
        p["name"] for p in operation["parameters"]
    }
    assert {"200", "400", "401", "403", "405"} <= set(operation["responses"])
    for name in ("amount", "exchange_rate", "base_amount"):
        assert (cash[name]["type"], cash[name]["format"]) == ("string", "decimal"), name
    assert cash["base_amount"]["nullable"] is True
    assert "null" in cash["base_amount"]["description"]


def test_the_account_history_is_documented_with_its_bounds_and_404(schema):
    operation = schema["paths"]["/portfolio/accounts/{external_id}/history"]["get"]
    params = {(p["in"], p["name"]): p for p in operation["parameters"]}
    snapshot = schema["components"]["schemas"]["AccountSnapshot"]["properties"]

    assert {("path", "external_id"), ("query", "from"), ("query", "to")} <= set(params)
    assert {("query", "cursor"), ("query", "page_size")} <= set(params)
    assert "whole day" in params[("query", "to")]["description"]
    assert {"200", "400", "401", "403", "404", "405"} <= set(operation["responses"])
    body = operation["responses"]["200"]["content"]["application/json"]["schema"]
    page = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert page["properties"]["results"]["items"] == {
        "$ref": "#/components/schemas/AccountSnapshot"
    }
    for name in ("net_liquidation", "total_cash_value", "buying_power", "unrealized_pnl"):
        assert (snapshot[name]["type"], snapshot[name]["format"]) == ("string", "decimal")


def test_the_sync_endpoint_documents_the_connection_and_its_errors(schema):
    operation = schema["paths"]["/portfolio/sync/ibkr"]["post"]
    connection = next(p for p in operation["parameters"] if p["name"] == "connection")
    responses = operation["responses"]
    result = schema["components"]["schemas"]["SyncResult"]["properties"]["connection"]

    assert (connection["in"], connection["schema"]["type"]) == ("query", "string")
    assert "ibkr_connection list" in connection["description"]
    assert "connection_required" in responses["400"]["description"]
    assert "unknown_connection" in responses["404"]["description"]
    assert "connection_disabled" in responses["409"]["description"]
    assert (result["type"], result["nullable"]) == ("string", True)
    assert "null for the settings' gateway" in result["description"]


def test_healthz_documents_the_task_queues_check(schema):
    components = schema["components"]["schemas"]
    queue = components["HealthChecks"]["properties"]["queue"]
    assert queue["allOf"] == [{"$ref": "#/components/schemas/QueueCheck"}]
    assert "queue" not in components["HealthChecks"]["required"]
    check = components["QueueCheck"]["properties"]
    assert set(check) == {
        "status", "broker", "workers", "worker_seen_seconds", "oldest_queued_seconds",
        "max_queued_seconds",
    }  # fmt: skip
    assert components["QueueCheckStatusEnum"]["enum"] == [
        "ok", "broker_unreachable", "no_worker", "backlog",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "component", "params"),
    [
        ("/portfolio/trades", "Trade", {"account", "from", "to", "currency", "symbol"}),
        (
            "/portfolio/cash-transactions",
            "CashTransaction",
            {"account", "from", "to", "currency", "symbol", "kind"},
        ),
    ],
)
def test_the_ledger_is_documented_with_its_filters_and_exact_decimals(
    schema, path, component, params
):
    operation = schema["paths"][path]["get"]
    documented = {p["name"]: p for p in operation["parameters"]}
    body = operation["responses"]["200"]["content"]["application/json"]["schema"]
    page = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    row = schema["components"]["schemas"][component]["properties"]

    assert params | {"cursor", "page_size"} <= set(documented)
    assert documented["from"]["schema"]["format"] == "date"
    assert "included" in documented["to"]["description"]
    assert {"200", "400", "401", "403", "404", "405"} <= set(operation["responses"])
    assert "404" in operation["description"] and "= None" in operation["description"]
    assert page["properties"]["results"]["items"] == {"$ref": f"#/components/schemas/{component}"}
    assert row["instrument"]["allOf"] == [{"$ref": "#/components/schemas/Instrument"}]
    assert row["instrument"]["nullable"] is True
    decimals = (
        ("quantity", "price", "proceeds", "commission", "realized_pnl", "fx_rate_to_base")
        if component == "Trade"
        else ("amount", "fx_rate_to_base")
    )
    for name in decimals:
        assert (row[name]["type"], row[name]["format"]) == ("string", "decimal"), name


def test_the_cash_transaction_kinds_are_an_enum_of_the_models(schema):
    from ibkr_sync.models import CashKind

    operation = schema["paths"]["/portfolio/cash-transactions"]["get"]
    kind = next(p for p in operation["parameters"] if p["name"] == "kind")

    assert kind["schema"]["enum"] == CashKind.values
    assert schema["components"]["schemas"]["CashKindEnum"]["enum"] == CashKind.values


@pytest.mark.django_db
def test_the_schema_is_served_without_a_ledger(settings):
    settings.IBKR_SYNC_TRADE_MODEL = None
    settings.IBKR_SYNC_CASH_TRANSACTION_MODEL = None
    settings.IBKR_SYNC_CORPORATE_ACTION_MODEL = None

    response = APIClient().get("/api/schema/", {"format": "json"})

    assert response.status_code == 200, response.content
    validate_schema(response.json())


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [({}, True), (ENUM_NAME_OVERRIDES, False)],
    ids=["none", "the_apps"],
)
def test_a_host_names_the_enums_with_the_apps_overrides_alone(overrides, warned):
    """A host's schema gets stable enum names, without drf-spectacular's collision
    warnings, from `ibkr_sync.api.schema.ENUM_NAME_OVERRIDES` and nothing else (without
    them, the `status` and `kind` fields collide)."""
    GENERATOR_STATS.reset()
    _load_enum_name_overrides.cache_clear()  # read once per language, and kept
    try:
        with patched_settings({"ENUM_NAME_OVERRIDES": overrides}), GENERATOR_STATS.silence():
            schema = SchemaGenerator().get_schema(request=None, public=True)
        collisions = [w for w in GENERATOR_STATS._warn_cache if "enum naming" in w]
    finally:
        GENERATOR_STATS.reset()
        _load_enum_name_overrides.cache_clear()

    assert bool(collisions) is warned, collisions
    assert not GENERATOR_STATS._error_cache
    if not warned:
        names = set(schema["components"]["schemas"])
        assert {"SyncRunStatusEnum", "ErrorStatusEnum", "CashKindEnum"} <= names
