"""Gateways for the process tests that freeze their own process at a chosen point of a
real sync, as a stopped or suspended process freezes: SIGSTOP, every thread at once (its
heartbeat too), its database connection left as it was.

Named by IBKR_SYNC_GATEWAY_CLASS in the environment of a `manage.py sync_ibkr` process:
the real gateway reads the simulator over TCP, then the process stops itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from django.db import connection

from ibkr_sync.gateway import GatewaySnapshot, IbkrGateway


def _freeze() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)  # until SIGCONT


class FrozenAfterRead(IbkrGateway):
    """Stops once the read is over, before the sync claims its lock to write."""

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot:
        snapshot = super().fetch_positions(account_id)
        _freeze()
        return snapshot


class FrozenInWrite(IbkrGateway):
    """Stops inside the write transaction, just after its first write to the position
    table: it holds that transaction open (SQLite's write lock; PostgreSQL's row locks)."""

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot:
        snapshot = super().fetch_positions(account_id)
        frozen: list[bool] = []

        def after_first_position_write(execute, sql, params, many, context):
            result = execute(sql, params, many, context)
            writes = sql.lstrip().upper().startswith(("INSERT", "UPDATE"))
            if (
                not frozen
                and writes
                and connection.in_atomic_block
                and ('"portfolio_position"' in sql)
            ):
                frozen.append(True)
                _freeze()
            return result

        connection.execute_wrappers.append(after_first_position_write)  # the sync's thread
        return snapshot


class HungInWrite(IbkrGateway):
    """Hangs, running (not stopped), inside the write transaction just after its first
    write to the position table, until the file named by HUNG_UNTIL exists: a sync stuck
    in its write. It says so by creating that name with `.hung` added."""

    def fetch_positions(self, account_id: str | None = None) -> GatewaySnapshot:
        snapshot = super().fetch_positions(account_id)
        until = Path(os.environ["HUNG_UNTIL"])
        hung: list[bool] = []

        def after_first_position_write(execute, sql, params, many, context):
            result = execute(sql, params, many, context)
            if not hung and connection.in_atomic_block and '"portfolio_position"' in sql:
                hung.append(True)
                until.with_name(until.name + ".hung").touch()
                deadline = time.monotonic() + 120
                while not until.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            return result

        connection.execute_wrappers.append(after_first_position_write)  # the sync's thread
        return snapshot
