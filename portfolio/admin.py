"""The portfolio's models in the admin, with the sync app's admin classes (read-only,
Sync now, the overview on the positions' admin), as any host registers its own."""

from django.contrib import admin

from ibkr_sync.admin import (
    AccountAdmin,
    AccountSnapshotAdmin,
    CashBalanceAdmin,
    CashTransactionAdmin,
    CorporateActionAdmin,
    InstrumentAdmin,
    PositionAdmin,
    TradeAdmin,
)

from .models import (
    Account,
    AccountSnapshot,
    CashBalance,
    CashTransaction,
    CorporateAction,
    Instrument,
    Position,
    Trade,
)

admin.site.register(Account, AccountAdmin)
admin.site.register(Instrument, InstrumentAdmin)
admin.site.register(Position, PositionAdmin)
admin.site.register(CashBalance, CashBalanceAdmin)
admin.site.register(AccountSnapshot, AccountSnapshotAdmin)
admin.site.register(Trade, TradeAdmin)
admin.site.register(CashTransaction, CashTransactionAdmin)
admin.site.register(CorporateAction, CorporateActionAdmin)
