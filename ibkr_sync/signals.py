"""What a host hears about syncs. Both signals are sent after the sync's transaction has
committed (never for a dry run or a failed sync), with `sender` the SyncRun class.

- `sync_finished(sender, sync_run, result)`: every successful sync; `result` is the
  `services.SyncResult` the API and the command render.
- `positions_changed(sender, sync_run, changes)`: a successful sync that changed
  something; `changes` is a list of dicts, one per position created, updated,
  re-opened or closed: `kind`, `account`, `con_id`, `symbol`, `quantity_before`,
  `quantity_after`, `average_cost_before`, `average_cost_after` (None where there is
  no value: before a position was created, after it closed).

A receiver that raises is logged with its traceback and changes nothing: the sync has
already committed and its result stands. Receivers run in the process that synced, so
keep them short (hand long work, such as fetching prices, to a task queue).
"""

from django.dispatch import Signal

sync_finished = Signal()
positions_changed = Signal()
