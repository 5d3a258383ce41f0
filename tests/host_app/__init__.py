"""A host's own portfolio models with everything of Django's that the sync must honour
when it writes rows (primary keys that are UUIDs or texts with defaults, auto_now and
auto_now_add stamps, defaults called per row, database defaults, a generated field), and
the settings of a project that syncs into them. `tests/test_host_models.py` runs the
syncs of `host_syncs.py` in such a project."""
