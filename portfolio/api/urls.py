from django.urls import path

from .views import AccountListView, PositionListView

app_name = "portfolio"

urlpatterns = [
    path("accounts", AccountListView.as_view(), name="accounts"),
    path("positions", PositionListView.as_view(), name="positions"),
]
