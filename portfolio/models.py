"""Broker-agnostic portfolio domain: accounts, instruments and the positions linking them,
with each account's cash per currency and the history of its values, and the ledger
(trades, cash transactions, corporate actions) where a source reads it.

Rows mirror what a broker reports; they are written by a broker app's sync service
(e.g. `ibkr_sync.services`), never edited by hand, and never deleted when a position
goes away: a closed position keeps its last quantity and gets `closed_at`.

The models are the default concrete models of the sync app's abstract bases: a project
with portfolio models of its own builds them on the same bases and leaves this app out.
"""

from django.db import models

from ibkr_sync.models import (
    DECIMAL_PLACES,
    DECIMAL_QUANTUM,
    MONEY_DIGITS,
    QUANTITY_DIGITS,
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractCashTransaction,
    AbstractCorporateAction,
    AbstractInstrument,
    AbstractPosition,
    AbstractTrade,
    Broker,
    OptionRight,
    PositionQuerySet,
    SecType,
)

__all__ = [
    "DECIMAL_PLACES",
    "DECIMAL_QUANTUM",
    "MONEY_DIGITS",
    "QUANTITY_DIGITS",
    "Account",
    "AccountSnapshot",
    "Broker",
    "CashBalance",
    "CashTransaction",
    "CorporateAction",
    "Instrument",
    "OptionRight",
    "Position",
    "PositionQuerySet",
    "SecType",
    "Trade",
]


class Account(AbstractAccount):
    class Meta(AbstractAccount.Meta):
        pass


class Instrument(AbstractInstrument):
    class Meta(AbstractInstrument.Meta):
        # Every sync asks whether an instrument changed since its accounts were last
        # written (`ibkr_sync.writer.instruments_changed`); without this index, a scan of
        # the whole table. A host's own instrument model may want the same.
        indexes = [models.Index(fields=["updated_at"], name="portfolio_instrument_upd")]


class Position(AbstractPosition):
    class Meta(AbstractPosition.Meta):
        pass


class CashBalance(AbstractCashBalance):
    class Meta(AbstractCashBalance.Meta):
        pass


class AccountSnapshot(AbstractAccountSnapshot):
    class Meta(AbstractAccountSnapshot.Meta):
        pass


class Trade(AbstractTrade):
    class Meta(AbstractTrade.Meta):
        pass


class CashTransaction(AbstractCashTransaction):
    class Meta(AbstractCashTransaction.Meta):
        pass


class CorporateAction(AbstractCorporateAction):
    class Meta(AbstractCorporateAction.Meta):
        pass
