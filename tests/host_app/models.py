"""A host's portfolio models, built on the abstract bases, with fields of their own of
every kind Django's bulk_create fills: the sync must fill them the same way."""

import secrets
import uuid

from django.db import models
from django.db.models.functions import Now

from ibkr_sync.models import (
    QUANTITY_DIGITS,
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractInstrument,
    AbstractPosition,
)


def account_key() -> str:
    """A text primary key, anew for every account."""
    return f"acct-{secrets.token_hex(8)}"


def snapshot_key() -> str:
    return f"snap-{secrets.token_hex(12)}"


def token() -> str:
    """A callable default: each row must get its own."""
    return secrets.token_hex(6)


class Account(AbstractAccount):
    id = models.CharField(primary_key=True, max_length=40, default=account_key, editable=False)
    touched_at = models.DateTimeField(auto_now=True)


class Instrument(AbstractInstrument):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    checked_on = models.DateField(auto_now=True)
    source = models.CharField(max_length=20, default="ibkr")


class Position(AbstractPosition):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    first_seen_at = models.DateTimeField(auto_now_add=True)
    touched_at = models.DateTimeField(auto_now=True)
    token = models.CharField(max_length=12, default=token)
    ref = models.UUIDField(default=uuid.uuid4)
    source = models.CharField(max_length=20, default="ibkr")
    priority = models.IntegerField(db_default=7)
    rank = models.IntegerField(null=True)
    doubled = models.GeneratedField(
        expression=models.F("quantity") * 2,
        output_field=models.DecimalField(**QUANTITY_DIGITS),
        db_persist=True,
    )


class CashBalance(AbstractCashBalance):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    first_seen_at = models.DateTimeField(auto_now_add=True)
    touched_at = models.DateTimeField(auto_now=True)
    stored_at = models.DateTimeField(db_default=Now())
    token = models.CharField(max_length=12, default=token)


class AccountSnapshot(AbstractAccountSnapshot):
    id = models.CharField(primary_key=True, max_length=40, default=snapshot_key, editable=False)
    recorded_at = models.DateTimeField(auto_now_add=True)
    kind = models.CharField(max_length=10, default="daily")
    sequence = models.IntegerField(db_default=1)
    rank = models.IntegerField(null=True)
