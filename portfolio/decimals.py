"""Decimals as people read them (the formatter the sync app offers every host)."""

from ibkr_sync.decimals import plain

__all__ = ["plain"]
