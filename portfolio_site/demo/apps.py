from django.apps import AppConfig


class DemoConfig(AppConfig):
    """This project's own tooling: `manage.py ibkr_demo` (migrates, makes a demo login,
    serves the site), which a host project that installs the apps does not want."""

    name = "portfolio_site.demo"
    label = "portfolio_demo"
    verbose_name = "Demo"
