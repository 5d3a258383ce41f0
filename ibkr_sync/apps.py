from django.apps import AppConfig


class IbkrSyncConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "ibkr_sync"
    verbose_name = "IBKR sync"

    def ready(self) -> None:
        from . import (
            checks,  # noqa: F401  (registers the system checks)
            schedules,
            visibility,
        )

        schedules.connect_signals()
        visibility.connect_signals()
