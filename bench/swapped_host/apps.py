from django.apps import AppConfig


class SwappedHostConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "bench.swapped_host"
    label = "swapped_host"
