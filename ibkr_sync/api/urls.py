from django.urls import path, re_path

from .read_views import (
    AccountHistoryView,
    AccountListView,
    CashBalanceListView,
    CashTransactionListView,
    NotFoundView,
    PositionListView,
    TradeListView,
)
from .views import IbkrSyncView, SyncRunDetailView, SyncRunListView

app_name = "ibkr_sync"

urlpatterns = [
    path("sync/ibkr", IbkrSyncView.as_view(), name="sync"),
    path("sync/runs", SyncRunListView.as_view(), name="sync-runs"),
    path("sync/runs/<int:pk>", SyncRunDetailView.as_view(), name="sync-run"),
    path("accounts", AccountListView.as_view(), name="accounts"),
    path(
        "accounts/<str:external_id>/history", AccountHistoryView.as_view(), name="account-history"
    ),
    path("positions", PositionListView.as_view(), name="positions"),
    path("cash", CashBalanceListView.as_view(), name="cash"),
    path("trades", TradeListView.as_view(), name="trades"),
    path("cash-transactions", CashTransactionListView.as_view(), name="cash-transactions"),
    # Anything else under the include (a trailing slash, a typo): a JSON 404 naming the
    # path meant, not Django's HTML page (and no APPEND_SLASH redirect). Last, so that it
    # shadows none of the above; mount the include under a prefix of its own.
    re_path(r"^.*$", NotFoundView.as_view(), name="not-found"),
]
