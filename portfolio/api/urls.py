from django.urls import path

from .views import AccountListView, CashBalanceListView, PositionListView

app_name = "portfolio"

urlpatterns = [
    path("accounts", AccountListView.as_view(), name="accounts"),
    path("positions", PositionListView.as_view(), name="positions"),
    path("cash", CashBalanceListView.as_view(), name="cash"),
]
