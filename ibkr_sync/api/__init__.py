"""The app's API: the sync endpoint, the sync history and the read endpoints over the
configured portfolio models, and the conventions every endpoint shares.

Every error any endpoint returns has one shape, `{"status": "error", "code", "detail"}`
(`errors.py`); lists are cursor-paginated (`pagination.py`); reading a model needs the
model's Django `view` permission (`permissions.py`). A host's own endpoints can be built
on the same pieces (`base.py`), so one client handles every answer the same way.
"""
