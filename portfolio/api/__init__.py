"""The read API over the broker-agnostic portfolio models, and the API's shared conventions.

Every error any endpoint returns has one shape, `{"status": "error", "code", "detail"}`
(`errors.py`); lists are cursor-paginated (`pagination.py`); reading a model needs the
model's Django `view` permission (`permissions.py`). Broker apps build their own
endpoints on these, so one client handles every answer the same way.
"""
