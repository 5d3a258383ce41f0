"""The Flex source: IBKR's Flex Web Service and the Activity Flex statements it sends.

No gateway: a token and a saved Flex Query over plain HTTPS. Split by concern:

- `client.py`: our client of the Flex Web Service (version 3): `SendRequest`, then
  `GetStatement` polled while IBKR generates the statement; explicit periods of at most
  365 days, back-off per error code, one request in flight per token.
- `parser.py`: a statement (XML, expat armed by `defusedxml`, read incrementally) into
  records.
- `values.py`: how a statement's values are read: numbers, "no value", dates, times.
- `records.py`: what a statement holds, as source-neutral records (positions, cash,
  net asset values, exchange rates, trades, cash transactions, corporate actions,
  option events), each with the broker's raw attributes.
- `errors.py`: the service's error codes, what each means, our exceptions for them.
"""

from .errors import (
    FlexAuthError,
    FlexError,
    FlexFormatError,
    FlexQueryError,
    FlexThrottled,
    FlexTimeout,
    FlexUnavailable,
)
from .parser import iter_records, parse_flex

#: What a Flex snapshot's `source` says.
SOURCE = "flex"

__all__ = [
    "SOURCE",
    "FlexAuthError",
    "FlexError",
    "FlexFormatError",
    "FlexQueryError",
    "FlexThrottled",
    "FlexTimeout",
    "FlexUnavailable",
    "iter_records",
    "parse_flex",
]
