"""What a sync reports of its records and values: typed, built in one place each.

A `RecordError` is a record (a position, or a figure of an account's values) that could
not be stored, with the reason; a `ValuesOutcome` says whether an account's values were
read and what became of them, or why they were not. Mapping builds them; the writer
and the service pass them on; `as_dict()` is the one form stored in a `SyncRun` (its
`error_details`, `account_values`) and shown by the API, the command and the admin.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

READ: Final = "read"
MISSING: Final = "missing"


def storable(text: str, limit: int | None = None) -> str:
    """Text as any JSON column takes it (PostgreSQL's jsonb refuses a NUL character,
    which a hostile record may carry), cut to `limit` characters if given."""
    text = text.replace("\x00", "\ufffd")
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True, slots=True)
class RecordError:
    """A record that could not be stored, and why. `con_id` is None where the record has
    none, or one too long for any integer column (its reason says so)."""

    account: str
    con_id: int | None
    symbol: str
    sec_type: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            name: storable(value) if isinstance(value, str) else value
            for name, value in (
                ("account", self.account),
                ("con_id", self.con_id),
                ("symbol", self.symbol),
                ("sec_type", self.sec_type),
                ("reason", self.reason),
            )
        }


@dataclass(frozen=True, slots=True)
class ValuesOutcome:
    """One account's values: read (`READ`: what was stored of them) or not (`MISSING`,
    with the reason; its stored values were kept).

    Read: `positions_valued` positions got their values, `positions_stale` were traded
    between the two reads and `positions_unvalued` had no value from the broker (both
    kept as they were); `cash_currencies` are the balances stored, unless
    `cash_reported` is False (no cash came) or `cash_kept_reason` says why the cash
    could not be trusted whole (the stored cash was kept)."""

    status: str
    reason: str = ""
    base_currency: str = ""
    positions_valued: int = 0
    positions_stale: int = 0
    positions_unvalued: int = 0
    cash_currencies: tuple[str, ...] = ()
    cash_reported: bool = True
    cash_kept_reason: str = ""

    @classmethod
    def missing(cls, reason: str) -> ValuesOutcome:
        return cls(status=MISSING, reason=storable(reason, 500))

    @classmethod
    def read(
        cls,
        *,
        base_currency: str,
        positions_valued: int,
        positions_stale: int,
        positions_unvalued: int,
        cash_currencies: tuple[str, ...],
        cash_reported: bool,
        cash_kept_reason: str = "",
    ) -> ValuesOutcome:
        return cls(
            status=READ,
            base_currency=base_currency,
            positions_valued=positions_valued,
            positions_stale=positions_stale,
            positions_unvalued=positions_unvalued,
            cash_currencies=tuple(sorted(cash_currencies)),
            cash_reported=cash_reported,
            cash_kept_reason=storable(cash_kept_reason, 500) if cash_kept_reason else "",
        )

    def as_dict(self) -> dict[str, Any]:
        if self.status == MISSING:
            return {"status": MISSING, "reason": self.reason}
        data: dict[str, Any] = {
            "status": READ,
            "base_currency": self.base_currency,
            "positions_valued": self.positions_valued,
            "positions_stale": self.positions_stale,
            "positions_unvalued": self.positions_unvalued,
            "cash_currencies": list(self.cash_currencies),
            "cash_reported": self.cash_reported,
        }
        if self.cash_kept_reason:
            data["cash_kept_reason"] = self.cash_kept_reason
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValuesOutcome:
        """An outcome as a SyncRun stored it (of any version: what is absent is taken as
        nothing to say)."""
        if data.get("status") == MISSING:
            return cls(status=MISSING, reason=str(data.get("reason", "")))
        return cls(
            status=str(data.get("status", READ)),
            base_currency=data.get("base_currency") or "",
            positions_valued=data.get("positions_valued", 0),
            positions_stale=data.get("positions_stale", 0),
            positions_unvalued=data.get("positions_unvalued", 0),
            cash_currencies=tuple(data.get("cash_currencies", ())),
            cash_reported=data.get("cash_reported", True),
            cash_kept_reason=data.get("cash_kept_reason") or "",
        )

    def describe(self) -> str:
        """In words, for the command and the admin: `read (base USD): 41 positions
        valued, cash in EUR, USD` or `missing: <reason>`."""
        if self.status == MISSING:
            return f"missing: {self.reason}"
        text = f"read (base {self.base_currency or 'unknown'}): "
        text += f"{self.positions_valued} positions valued"
        if self.positions_stale:
            text += f", {self.positions_stale} kept (traded while read)"
        if self.positions_unvalued:
            text += f", {self.positions_unvalued} kept (no value from IBKR)"
        if not self.cash_reported:
            return text + ", no cash reported (stored cash kept)"
        if self.cash_kept_reason:
            return text + f", stored cash kept ({self.cash_kept_reason})"
        currencies = ", ".join(self.cash_currencies)
        return text + (f", cash in {currencies}" if currencies else ", no cash")
