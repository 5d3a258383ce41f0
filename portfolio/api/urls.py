from django.urls import path

from .views import AccountHistoryView, AccountListView, CashBalanceListView, PositionListView

app_name = "portfolio"

urlpatterns = [
    path("accounts", AccountListView.as_view(), name="accounts"),
    path(
        "accounts/<str:external_id>/history", AccountHistoryView.as_view(), name="account-history"
    ),
    path("positions", PositionListView.as_view(), name="positions"),
    path("cash", CashBalanceListView.as_view(), name="cash"),
]
