"""The project's settings as a host with the models of `tests.host_app` has them: our
`portfolio` app left out, the sync writing into the host's models (named before the
first migrate, as AUTH_USER_MODEL is)."""

from portfolio_site.settings import *  # noqa: F403
from portfolio_site.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "portfolio"] + ["tests.host_app"]
IBKR_SYNC_ACCOUNT_MODEL = "host_app.Account"
IBKR_SYNC_INSTRUMENT_MODEL = "host_app.Instrument"
IBKR_SYNC_POSITION_MODEL = "host_app.Position"
IBKR_SYNC_CASH_BALANCE_MODEL = "host_app.CashBalance"
IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL = "host_app.AccountSnapshot"
ROOT_URLCONF = "tests.host_app.urls"

if DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
    # A test database of its own: the project's test database may be in use meanwhile.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_host_app"}
