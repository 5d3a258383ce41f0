"""Keep an Interactive Brokers portfolio in sync with a Django database."""

import logging

# The app's log is its host's to show. Without a handler anywhere (Django's default
# logging has none for it), Python would print its warnings on stderr itself, its "last
# resort", beside the one line `sync_ibkr` promises.
logging.getLogger(__name__).addHandler(logging.NullHandler())
