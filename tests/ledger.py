"""A ledger loaded the way a user's is: Flex statements synced through the whole pipeline
(the real client over real HTTP against the fake Flex Web Service, the source, mapping
and the writer), for the tests of what reads it (the read API, the admin, the overview).

Two accounts: U0000000 from a real statement another project published (2025: stocks,
options, futures, dividends in USD with their taxes, fees in CHF), and U7654321 from a
statement of our own (2026-03-13: a purchase of SAP in EUR, its dividend and tax, a
split)."""

from __future__ import annotations

from ibkr_sync.services import sync_positions
from tests.flex.test_flex_connection import QUERY, flex_connection
from tests.flex.test_ledger import REAL, ledger_statement

REAL_ACCOUNT = "U0000000"
OUR_ACCOUNT = "U7654321"
OUR_QUERY = "445567"


def load_ledger(service, **statement) -> None:
    """Sync both statements, each through a Flex connection of its own."""
    service.add_statement(QUERY, REAL["opensteuerauszug"])
    service.add_statement(OUR_QUERY, lambda fd, td: ledger_statement(**statement))
    flex_connection("real")
    flex_connection("ours", query=OUR_QUERY)
    for name in ("real", "ours"):
        result = sync_positions(trigger="command", connection=name)
        assert not [e for e in result.errors if "not stored" in e["reason"]], result.errors
