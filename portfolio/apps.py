from django.apps import AppConfig


class PortfolioConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "portfolio"
    verbose_name = "Portfolio"

    def ready(self) -> None:
        # The overview shows when the portfolio was last synced, by the sync app's panel.
        from ibkr_sync.overview import sync_status_panel

        from .overview import register_status_panel

        register_status_panel(sync_status_panel)
