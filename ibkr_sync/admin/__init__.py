"""The app's admin, for any project's admin site.

Registered here: the sync history (`SyncRun`, with each run's changes) and the
connections a sync reads (`Connection`, with "Test connection"). Offered to
register on the models the sync writes, a line each (`portfolio/admin.py` does it for our
portfolio app; a host does the same for its own models):

    from django.contrib import admin
    from ibkr_sync.admin import AccountAdmin, PositionAdmin, ...

    admin.site.register(Holding, PositionAdmin)

`AccountAdmin`, `InstrumentAdmin`, `PositionAdmin` (with the portfolio overview at
`overview/`), `CashBalanceAdmin` and `AccountSnapshotAdmin`: read-only lists with the
number formatting, filters and search, and Sync now on accounts and positions.
`TradeAdmin`, `CashTransactionAdmin` and `CorporateActionAdmin`: the ledger's read-only
lists (shown only while the project keeps that kind of ledger).
`SyncNowMixin` adds Sync now to any other `ModelAdmin`.
"""

from .connections import ConnectionAdmin
from .portfolio import (
    AccountAdmin,
    AccountSnapshotAdmin,
    CashBalanceAdmin,
    CashTransactionAdmin,
    CorporateActionAdmin,
    InstrumentAdmin,
    LedgerModelAdmin,
    MirroredModelAdmin,
    PositionAdmin,
    SyncedModelAdmin,
    TradeAdmin,
)
from .sync_runs import SyncNowMixin, SyncRunAdmin

__all__ = [
    "AccountAdmin",
    "AccountSnapshotAdmin",
    "CashBalanceAdmin",
    "CashTransactionAdmin",
    "ConnectionAdmin",
    "CorporateActionAdmin",
    "InstrumentAdmin",
    "LedgerModelAdmin",
    "MirroredModelAdmin",
    "PositionAdmin",
    "SyncNowMixin",
    "SyncRunAdmin",
    "SyncedModelAdmin",
    "TradeAdmin",
]
