"""Whose data a user sees: users own their connections.

A `Connection` may have an owner (a user). An account belongs to the connection that
last reported it (`AccountReport.connection`: one per account, the newest snapshot
applied), and everything under the account goes with it: its positions, cash balances,
snapshots (its history), position changes and ledger rows (trades, cash transactions,
corporate actions). A sync run belongs to the connection it synced.

Who sees a connection's data (each kind still needs its view permission,
`ibkr_sync.permissions`):

- its owner;
- a user with `ibkr_sync.view_all_connections` ("Can see every connection's data"; a
  superuser has it, as every permission);
- when it has no owner, everyone, as before connections had owners.

Data of no connection is everyone's, as it always was: an account no connection ever
reported (the settings' gateway reported it, or nothing yet) and the settings' gateway's
sync runs. Data of a connection since removed (its account's report and its runs keep
its name) is only for users who see every connection: a removal takes it out of sight,
its owner's included, and it must not become everyone's by a removal. Its accounts stay
their owner's all the same: each report records the owner of its connection
(`AccountReport.owner`, kept when the connection goes, `_keep_owner`), and only a
connection of that owner writes them again (`writer._claim_accounts`), which shows them
to that owner again. An account whose owner is not known (the user was deleted, or the
connection was removed before reports recorded owners: `AccountReport.owned` without
`owner`) is written by no sync and stays for users who see every connection only.

Why the account's current connection, not "any connection that ever reported it": an
account reported by two connections is recorded with the last one only (`AccountReport`
keeps no list), and the rule has to be one the database answers in the same query as the
rows: the account's one report, in a correlated NOT EXISTS. An account no owner has (no
report yet, an unowned connection's, the settings' gateway's) becomes the owner's whose
connection's snapshot of it is applied. An owned account never changes hands by a sync:
a gateway proves no login (any server that speaks its protocol, at the address a user
gives their connection, reports whatever account ids it likes), so the writer refuses a
snapshot of it from a connection of another owner, or of none (`writer._claim_accounts`),
also once its own connection is removed: nothing of it is written, its history (ledger
rows, each day's values) neither, also by a back-fill's history-only window
(`writer._claim_history`), as a Flex statement proves no login either; a user who sees
every connection moves it by giving the connection to another owner (its reports follow,
`_follow_owner`; while the connection exists, its owner decides in any case).

Syncing follows seeing: a user with `ibkr_sync.run_sync` may start syncs of the
connections they may see (their own, unowned ones; every one with
`view_all_connections`), never of another's (its name answers as a name no connection
has). A sync's answer shows what it read (accounts, counts, the gateway's errors), so
syncing a connection one may not see would show its data. The command (`sync_ibkr`) is
the operator's and syncs any connection.

Each filter here is a queryset filter: no query of its own (beyond the user's
permissions, read once per request by Django) and no check per row. (The receivers at
the end, `connect_signals`, keep the reports' recorded owner as their connection's.)
"""

from __future__ import annotations

from typing import Any

from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery

from . import conf
from .models import AccountReport, Connection, SyncRun

#: The permission that shows every connection's data (and with `run_sync`, syncs any).
VIEW_ALL = "ibkr_sync.view_all_connections"


def sees_all(user) -> bool:
    """Whether `user` sees every connection's data (superusers do)."""
    return bool(user.is_active and user.has_perm(VIEW_ALL))


def _prefix(path: str) -> str:
    return f"{path}__" if path else ""


def _owned_by_another(user, connection: str) -> Q:
    """Rows whose connection (at the path `connection`) is someone else's, or was removed
    (its name kept without the row)."""
    return _not_owned_by(user.pk, connection)


def _not_owned_by(owner: Any, connection: str) -> Q:
    """Rows whose connection (at the path `connection`) is of another owner than `owner`
    (a user's pk; None: of any owner), or was removed (its name kept without the row)."""
    at = _prefix(connection)
    another = Q(**{f"{at}connection__owner__isnull": False})
    if owner is not None:
        another &= ~Q(**{f"{at}connection__owner": owner})
    removed = Q(**{f"{at}connection__isnull": True}) & ~Q(**{f"{at}connection_name": ""})
    return another | removed


def visible(queryset: QuerySet, user, account: str = "account") -> QuerySet:
    """The rows of `queryset` that `user` may see, by the account each belongs to:
    `account` is the path from the rows to their account (`account` for a position, a
    cash balance, a snapshot or a ledger row; `position__account` for a position change;
    empty for the account model itself). Accounts no connection reported stay visible."""
    if sees_all(user):
        return queryset
    at = _prefix(account)
    foreign = AccountReport.objects.filter(
        _owned_by_another(user, ""),
        broker=OuterRef(f"{at}broker"),
        external_id=OuterRef(f"{at}external_id"),
    )
    return queryset.filter(~Exists(foreign))


def visible_instruments(queryset: QuerySet, user) -> QuerySet:
    """The instruments of `queryset` that `user` may see: those a position or a ledger row
    the user may see names (that someone holds or traded a contract is theirs to know).
    Everyone's with `view_all_connections`."""
    if sees_all(user):
        return queryset
    named = Exists(visible(conf.position_model().objects.filter(instrument=OuterRef("pk")), user))
    for model in conf.ledger_models().values():
        named |= Exists(visible(model.objects.filter(instrument=OuterRef("pk")), user))
    return queryset.filter(named)


def named_by_another_owner(instruments: QuerySet, owner: Any) -> QuerySet:
    """The instruments of `instruments` that a position or a ledger row names of an account
    a connection of another owner than `owner` (a user's pk; None: of any owner) reports,
    or a removed one reported: a sync of `owner`'s connection does not change them
    (`writer`), as it does not write those accounts."""
    foreign = AccountReport.objects.filter(
        _not_owned_by(owner, ""),
        broker=OuterRef("account__broker"),
        external_id=OuterRef("account__external_id"),
    )
    named = Exists(conf.position_model().objects.filter(Exists(foreign), instrument=OuterRef("pk")))
    for model in conf.ledger_models().values():
        named |= Exists(model.objects.filter(Exists(foreign), instrument=OuterRef("pk")))
    return instruments.filter(named)


def visible_runs(queryset: QuerySet[SyncRun], user, run: str = "") -> QuerySet:
    """The sync runs of `queryset` (or, with `run`, the rows whose run is at that path)
    that `user` may see: the settings' gateway's, and those of connections they may see."""
    if sees_all(user):
        return queryset
    at = _prefix(run)
    mine = Q(**{f"{at}connection__isnull": True, f"{at}connection_name": ""}) | Q(
        **{f"{at}connection__isnull": False, f"{at}connection__owner__isnull": True}
    )
    if user.pk is not None:
        mine |= Q(**{f"{at}connection__owner": user.pk})
    return queryset.filter(mine)


def connections_seen(user) -> Q:
    """The condition on `Connection` rows of those `user` may see (to filter by, or to
    annotate a list of every connection with)."""
    if sees_all(user):
        return Q(pk__isnull=False)
    mine = Q(owner__isnull=True)
    if user.pk is not None:
        mine |= Q(owner=user.pk)
    return mine


def visible_connections(user, queryset: QuerySet[Connection] | None = None) -> QuerySet:
    """The connections `user` may see, and (given `ibkr_sync.run_sync`) sync: their own,
    unowned ones; all with `view_all_connections`."""
    queryset = Connection.objects.all() if queryset is None else queryset
    return queryset if sees_all(user) else queryset.filter(connections_seen(user))


def _follow_owner(sender, instance: Connection, **kwargs) -> None:
    """A connection saved: its accounts' reports record its owner as it is now
    (`AccountReport.owner`), so that giving a connection to another owner moves its
    accounts. (While the connection exists its owner decides anyway, `writer._held_by`: a
    change saved by `update()` is followed as well.)"""
    if kwargs.get("raw"):  # loaddata: the reports are restored as they were dumped
        return
    owner = instance.owner_id
    AccountReport.objects.filter(connection_id=instance.pk).exclude(
        owner_id=owner, owned=owner is not None
    ).update(owner_id=owner, owned=owner is not None)


def _keep_owner(sender, instance: Connection, **kwargs) -> None:
    """A connection about to be removed: its accounts' reports record its owner as the
    database holds it now (a change of owner saved without `save()` included), which they
    keep once their connection is gone. An owned account stays its owner's: no other
    owner's connection takes it by reporting its id."""
    current = Connection.objects.filter(pk=instance.pk)
    AccountReport.objects.filter(connection_id=instance.pk).update(
        owner_id=Subquery(current.values("owner_id")[:1]),
        owned=Exists(current.filter(owner__isnull=False)),
    )


def connect_signals() -> None:
    """Accounts' reports follow their connection's owner (`apps.ready`)."""
    from django.db.models.signals import post_save, pre_delete

    post_save.connect(_follow_owner, sender=Connection, dispatch_uid="ibkr_sync.owner.saved")
    pre_delete.connect(_keep_owner, sender=Connection, dispatch_uid="ibkr_sync.owner.deleted")


def may_see_connection(user, connection: Connection | None) -> bool:
    """For one row already read (e.g. a sync's target): the same rule as
    `visible_connections`. None, the settings' gateway, is everyone's."""
    if connection is None or connection.owner_id is None or sees_all(user):
        return True
    return user.pk is not None and connection.owner_id == user.pk
