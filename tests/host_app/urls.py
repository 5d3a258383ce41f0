"""A host's URLs: the admin and the sync app's, without our portfolio app's read API."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("portfolio/", include("ibkr_sync.urls")),
]
