from django.apps import AppConfig


class HostAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "tests.host_app"
    label = "host_app"
