"""Who may see which kind of data: the one table the read API and the admin both decide by.

Each kind of data the app reads or shows is covered by the Django `view` permission of the
model that holds it, as the read API asks for it: positions need the position model's
(`/portfolio/positions`), cash balances the cash balance model's (`/portfolio/cash`), an
account's history the snapshot model's (`/portfolio/accounts/<id>/history`), sync runs
`ibkr_sync.view_syncrun` (`/portfolio/sync/runs`), the connections a sync reads (a
gateway's address and client id) `ibkr_sync.view_connection`, the ledger's trades, cash
transactions and corporate actions their models' (`/portfolio/trades`,
`/portfolio/cash-transactions`). The ledger is optional: while a host keeps no ledger of
a kind (its IBKR_SYNC_*_MODEL is None) nobody may view that kind, and no model is it. A
position change is a position's past (the read API shows it as the positions held at a
past moment), so it needs the position permission, not the sync run's. The models are
swappable (IBKR_SYNC_*_MODEL), so the codenames come from the configured models, never a
hard-coded `portfolio.`.

An account's external id and broker go with every kind (each endpoint names the account
of its rows); the account's own fields (its name, whether it is a paper account) are
account data.

Plain Django, no DRF: the admin imports it without the API's side effects.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from django.contrib.auth import get_permission_codename
from django.db import models

from . import conf


class Kind(enum.Enum):
    """A kind of data a page, panel, message, link or endpoint shows."""

    ACCOUNTS = "accounts"
    INSTRUMENTS = "instruments"
    POSITIONS = "positions"
    CASH_BALANCES = "cash_balances"
    ACCOUNT_SNAPSHOTS = "account_snapshots"
    SYNC_RUNS = "sync_runs"
    POSITION_CHANGES = "position_changes"
    CONNECTIONS = "connections"
    TRADES = "trades"
    CASH_TRANSACTIONS = "cash_transactions"
    CORPORATE_ACTIONS = "corporate_actions"


def _sync_run_model() -> type[models.Model]:
    from .models import SyncRun

    return SyncRun


def _connection_model() -> type[models.Model]:
    from .models import Connection

    return Connection


def _position_change_model() -> type[models.Model]:
    from .models import PositionChange

    return PositionChange


#: The model whose `view` permission covers each kind (looked up when asked, so a changed
#: IBKR_SYNC_*_MODEL setting takes effect); None for a ledger kind the host does not keep.
COVERED_BY: dict[Kind, Callable[[], type[models.Model] | None]] = {
    Kind.ACCOUNTS: conf.account_model,
    Kind.INSTRUMENTS: conf.instrument_model,
    Kind.POSITIONS: conf.position_model,
    Kind.CASH_BALANCES: conf.cash_balance_model,
    Kind.ACCOUNT_SNAPSHOTS: conf.account_snapshot_model,
    Kind.SYNC_RUNS: _sync_run_model,
    Kind.POSITION_CHANGES: conf.position_model,
    Kind.CONNECTIONS: _connection_model,
    Kind.TRADES: conf.trade_model,
    Kind.CASH_TRANSACTIONS: conf.cash_transaction_model,
    Kind.CORPORATE_ACTIONS: conf.corporate_action_model,
}

#: The kind of the rows each model holds, where it is not the model the kind names
#: (a PositionChange row is a position change).
_HELD_IN: dict[Kind, Callable[[], type[models.Model] | None]] = {
    **COVERED_BY,
    Kind.POSITION_CHANGES: _position_change_model,
}


def view_permission(model: type[models.Model]) -> str:
    """`app_label.view_modelname` of `model`, as `User.has_perm` takes it."""
    opts = model._meta
    return f"{opts.app_label}.{get_permission_codename('view', opts)}"


def permission(kind: Kind) -> str | None:
    """The permission that lets a user see `kind`; None for a ledger kind the host keeps
    no ledger of (nobody sees it)."""
    model = COVERED_BY[kind]()
    return None if model is None else view_permission(model)


def kind_of(model: type[models.Model]) -> Kind | None:
    """The kind of data `model`'s rows are, or None for a model this table does not know
    (a host's own, covered by its own `view` permission)."""
    concrete = model._meta.concrete_model
    for kind, held_in in _HELD_IN.items():
        held = held_in()
        if held is not None and held._meta.concrete_model is concrete:
            return kind
    return None


def permission_for_rows(model: type[models.Model]) -> str:
    """The permission needed to read `model`'s rows: its kind's, else its own `view`."""
    kind = kind_of(model)
    return view_permission(model) if kind is None else permission(kind)


def may_view(user, kind: Kind) -> bool:
    """Whether `user` may see data of `kind` (anywhere: the API, any admin page); never a
    ledger kind the host does not keep."""
    perm = permission(kind)
    return perm is not None and user.has_perm(perm)


def visible_kinds(user) -> dict[str, bool]:
    """For templates: {"positions": True, "cash_balances": False, ...}."""
    return {kind.value: may_view(user, kind) for kind in Kind}
