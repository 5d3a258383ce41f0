"""The TWS source: a running TWS / IB Gateway, read over its socket API.

The only package that imports the IB client library (`ib_insync` or `ib_async`), and the
only one that knows TWS's messages and account value tags. Split by concern:

- `session.py`: one read in a private event loop: connect and handshake, the race of
  every request against the session's failures, disconnect, the library's loggers.
- `decoding.py`: frames off the wire into records (positions, portfolio rows, account
  values), and the guard every frame goes through.
- `values.py`: each account's values read after the positions, and what the account
  value tags mean, in the neutral `AccountValues`.
- `errors.py`: IB error codes, what each means for a read, our exceptions for them.
- `state.py`: what a read has seen so far, as the messages are read.
"""

from ...conf import GatewayConfig
from .errors import LOGGER_NAME
from .session import LIBRARY_RECORD, SOURCE, Handshake, TwsSource
from .values import account_values

#: The name host settings and code know the source by.
IbkrGateway = TwsSource

__all__ = [
    "LIBRARY_RECORD",
    "LOGGER_NAME",
    "SOURCE",
    "GatewayConfig",
    "Handshake",
    "IbkrGateway",
    "TwsSource",
    "account_values",
]
