"""The project's settings as a host with its own portfolio models has them: our
`portfolio` app left out, the sync writing into `bench.swapped_host`'s models."""

from portfolio_site.settings import *  # noqa: F403
from portfolio_site.settings import INSTALLED_APPS

INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "portfolio"] + ["bench.swapped_host"]
IBKR_SYNC_ACCOUNT_MODEL = "swapped_host.HostAccount"
IBKR_SYNC_INSTRUMENT_MODEL = "swapped_host.HostInstrument"
IBKR_SYNC_POSITION_MODEL = "swapped_host.HostPosition"
IBKR_SYNC_CASH_BALANCE_MODEL = "swapped_host.HostCash"
IBKR_SYNC_ACCOUNT_SNAPSHOT_MODEL = "swapped_host.HostSnapshot"
ROOT_URLCONF = "bench.swapped_urls"
