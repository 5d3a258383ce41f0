"""A host's own portfolio models, as a project with its own app would write them: built
on the abstract bases, with other names and fields of their own. The benchmark syncs into
them to show that swapped models cost what the default ones do."""

from django.db import models

from ibkr_sync.models import (
    AbstractAccount,
    AbstractAccountSnapshot,
    AbstractCashBalance,
    AbstractInstrument,
    AbstractPosition,
)


class HostAccount(AbstractAccount):
    nickname = models.CharField(max_length=50, blank=True, default="")


class HostInstrument(AbstractInstrument):
    price_source = models.CharField(max_length=20, default="elsewhere")


class HostPosition(AbstractPosition):
    notes = models.TextField(blank=True, default="")


class HostCash(AbstractCashBalance):
    pass


class HostSnapshot(AbstractAccountSnapshot):
    pass
