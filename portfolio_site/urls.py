from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from ibkr_sync.api.read_views import NotFoundView
from ibkr_sync.api.views import HealthView

from .views import home

urlpatterns = [
    # Also where the admin's "View site" link (its `site_url`, "/") leads.
    path("", home, name="home"),
    path("admin/", admin.site.urls),
    # The whole API (sync, history, read endpoints, and a JSON 404 for any other path
    # under it), as a host project mounts it.
    path("portfolio/", include("ibkr_sync.urls")),
    # /portfolio without the slash, and /healthz/: the same JSON 404 (no APPEND_SLASH
    # redirect).
    re_path(r"^(?:portfolio|healthz/.*)$", NotFoundView.as_view(), name="api-not-found"),
    path("healthz", HealthView.as_view(), name="healthz"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path(
        "api/redoc/",
        # The stock template loads web fonts from a CDN; this one loads nothing remote.
        SpectacularRedocView.as_view(url_name="schema", template_name="api/redoc.html"),
        name="redoc",
    ),
]
