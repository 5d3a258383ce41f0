"""The names of the API's enums in an OpenAPI schema made by drf-spectacular.

drf-spectacular names an enum after its field. The API has several fields called `status`
and `kind` with different choices (a sync run's status, a position's, an error's; a cash
balance's kind, a cash transaction's), which it would name by a hash of their choices,
warning about each collision. A project that serves the schema names them as ours does:

    from ibkr_sync.api.schema import ENUM_NAME_OVERRIDES

    SPECTACULAR_SETTINGS = {"ENUM_NAME_OVERRIDES": ENUM_NAME_OVERRIDES}

(merged with overrides of its own, if it has any). Importable from the settings: it
imports nothing of Django's.
"""

ENUM_NAME_OVERRIDES = {
    "SyncRunStatusEnum": "ibkr_sync.models.SyncRun.Status",
    "PositionStatusEnum": ["open", "closed"],
    "ErrorStatusEnum": ["error"],
    "CashKindEnum": "ibkr_sync.models.CashKind",
}
