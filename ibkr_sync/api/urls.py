from django.urls import path

from .views import IbkrSyncView

app_name = "ibkr_sync"

urlpatterns = [
    path("sync/ibkr", IbkrSyncView.as_view(), name="sync"),
]
