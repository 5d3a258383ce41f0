from django.apps import AppConfig


class IbkrSyncConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "ibkr_sync"
    verbose_name = "IBKR sync"

    def ready(self) -> None:
        # The portfolio overview shows when the portfolio was last synced from IBKR.
        from portfolio.overview import register_status_panel

        from .overview import sync_status_panel

        register_status_panel(sync_status_panel)
