"""The app's URLs, for a project's urls.py: `path("portfolio/", include("ibkr_sync.urls"))`
gives `POST /portfolio/sync/ibkr` and the sync history (`/portfolio/sync/runs`).
`/healthz` is `ibkr_sync.api.views.HealthView`, mounted where a project wants it."""

from .api.urls import app_name, urlpatterns

__all__ = ["app_name", "urlpatterns"]
