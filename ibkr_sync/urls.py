"""The app's URLs, for a project's urls.py: `path("portfolio/", include("ibkr_sync.urls"))`
gives the whole API under that prefix, over whichever models the IBKR_SYNC_*_MODEL
settings name: `POST sync/ibkr`, the sync history (`sync/runs`), the read endpoints
(`accounts`, `accounts/<external_id>/history`, `positions`, `cash`) and a JSON 404 for
any other path under the prefix. `/healthz` is `ibkr_sync.api.views.HealthView`, mounted
where a project wants it."""

from .api.urls import app_name, urlpatterns

__all__ = ["app_name", "urlpatterns"]
