from django.urls import path

from .views import IbkrSyncView, SyncRunDetailView, SyncRunListView

app_name = "ibkr_sync"

urlpatterns = [
    path("sync/ibkr", IbkrSyncView.as_view(), name="sync"),
    path("sync/runs", SyncRunListView.as_view(), name="sync-runs"),
    path("sync/runs/<int:pk>", SyncRunDetailView.as_view(), name="sync-run"),
]
