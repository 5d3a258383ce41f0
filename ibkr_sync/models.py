"""The audit trail of syncs, which doubles as the cross-process sync lock."""

from django.conf import settings
from django.db import models
from django.db.models import Q


class SyncRun(models.Model):
    """One row per sync attempt, written before the sync starts and kept when it fails.

    At most one row is `running` at a time, enforced by a partial unique constraint: that
    is the lock that keeps two syncs (in any process or app server sharing the database)
    from interleaving, and it works the same on PostgreSQL and SQLite.
    """

    class Trigger(models.TextChoices):
        API = "api", "API"
        COMMAND = "command", "Management command"
        ADMIN = "admin", "Admin"

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCESS = "success", "Success"
        FAILED = "failed", "Failed"

    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="ibkr_sync_runs",
    )
    account_filter = models.CharField(
        max_length=32, blank=True, help_text="The ibkr_account_id asked for; empty for all."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    accounts = models.JSONField(default=list, blank=True, help_text="Accounts reconciled.")
    processed = models.PositiveIntegerField(default=0)
    created = models.PositiveIntegerField(default=0)
    updated = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    reopened = models.PositiveIntegerField(default=0)
    closed = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    error_details = models.JSONField(
        default=list, blank=True, help_text="Records that could not be mapped, with reasons."
    )
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    host = models.CharField(
        max_length=255, blank=True, editable=False, help_text="Machine that ran the sync."
    )
    pid = models.PositiveIntegerField(
        null=True, blank=True, editable=False, help_text="Process id that ran the sync."
    )
    owner = models.CharField(
        max_length=255,
        blank=True,
        editable=False,
        help_text="The process holding the lock (machine, pid, start time): tells a live "
        "holder from a pid reused or shared across containers.",
    )
    heartbeat_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Renewed while the sync runs; a running sync silent for longer than "
        "IBKR_SYNC_LOCK_TIMEOUT holds the lock no more.",
    )
    started_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        get_latest_by = "started_at"
        permissions = [("run_sync", "Can run an IBKR portfolio sync")]
        constraints = [
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status="running"),
                name="ibkr_sync_one_running_sync",
            )
        ]

    def __str__(self) -> str:
        return f"Sync #{self.pk} ({self.get_status_display()}, {self.started_at:%Y-%m-%d %H:%M})"

    @property
    def duration(self):
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class PositionChange(models.Model):
    """What one sync changed in one position, written in the sync's own transaction.

    Rows with nothing changed are not recorded: the audit trail of an hourly sync of an
    unchanged portfolio is empty.
    """

    class Kind(models.TextChoices):
        CREATED = "created", "Created"
        UPDATED = "updated", "Updated"
        REOPENED = "reopened", "Re-opened"
        CLOSED = "closed", "Closed"

    sync_run = models.ForeignKey(SyncRun, on_delete=models.CASCADE, related_name="changes")
    position = models.ForeignKey("portfolio.Position", on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    quantity_before = models.DecimalField(
        max_digits=30, decimal_places=10, null=True, blank=True, help_text="Empty when created."
    )
    quantity_after = models.DecimalField(
        max_digits=30, decimal_places=10, null=True, blank=True, help_text="Empty when closed."
    )
    average_cost_before = models.DecimalField(
        max_digits=30, decimal_places=10, null=True, blank=True
    )
    average_cost_after = models.DecimalField(
        max_digits=30, decimal_places=10, null=True, blank=True
    )

    class Meta:
        ordering = ["sync_run", "id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} position #{self.position_id} in sync #{self.sync_run_id}"
