"""The Flex source: a Flex connection's statement as the sync's neutral `Snapshot`.

`FlexSource(config).fetch_positions()` asks the Flex Web Service (our `FlexClient`) for
the latest statement of the connection's Activity Flex Query and hands on, per account:

- its open positions (`OpenPositions`) as `PositionRecord`s;
- its values as `AccountValues` as of the statement's period end: the cash per currency
  (`CashReport`'s ending cash; the `BASE_SUMMARY` row says the cash was reported), the
  net asset value and the cash in the base currency of the period's last day
  (`EquitySummaryInBase`), the exchange rates to the base currency of the last day that
  has them (`ConversionRates`), and each position's mark price, value and unrealized
  P&L.

Which statement. IBKR updates a statement's data once a day, after the day closes; a
statement ending today is incomplete until then. So the latest statement is the period
that ends *yesterday* (in US Eastern time, the statement's zone) and begins
`PERIOD_DAYS - 1` days earlier: a window of a week always holds a business day, so the
last net asset value and rates are in it whatever day the sync runs. Every request names
its period (`fd`, `td`), never the query's saved one. The snapshot's `as_of` is the end
of the period's last day; the writer refuses it, for an account, when a newer snapshot
of the account was applied already (a gateway's read of today).

What a sync cannot trust is refused whole, and nothing is written: a statement without
the `OpenPositions` section (a sync would close every position), a position without its
conId or quantity, Open Positions of lots only (none of them a position), a position,
cash or net asset value row naming an account other than its statement's (it would be
taken for that account's whole state), a contract with two summary rows in OpenPositions
(neither is the position's quantity), a statement ending after the period asked for (not
the statement asked for: its state would be "newer" than any gateway's read until that
day). A value that cannot be read is an error entry of its account.

`handshake()` (Test connection) asks for a one-day statement (yesterday) and says what
the query holds: its accounts and sections, and what it lacks for the sync's models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import IO, Any, Final

from ...conf import FlexConfig
from ...exceptions import InvalidPeriod, UnknownAccount
from ...snapshot import (
    INCOME_KINDS,
    TAX_KIND,
    AccountValues,
    CashTransaction,
    ConnectionCheck,
    CorporateAction,
    LedgerBatch,
    LedgerStream,
    PositionRecord,
    PositionValue,
    Repeat,
    Snapshot,
    Trade,
    ValueProblem,
    action_key,
)
from . import SOURCE
from .client import MAX_DAYS, FlexClient, RetryPolicy, windows
from .errors import FlexFormatError, FlexQueryError
from .parser import END_OF_DAY, iter_records, parse_flex
from .records import FlexResponse, LedgerEntry, Statement, StatementHeader
from .values import EASTERN

#: The days of the period a sync asks for, ending yesterday, when the connection has
#: applied no statement yet.
PERIOD_DAYS: Final = 7
#: The days a sync asks for again before the end of the last statement applied (a late
#: correction of those days is read, and a day missed by a clock's edge is not lost).
OVERLAP_DAYS: Final = 3
#: No statement is older than this: a back-fill from before it is a typing error.
EARLIEST: Final = dt.date(1990, 1, 1)

#: The sections the sync reads for its models, and what is lost without each.
SECTIONS: Final = {
    "OpenPositions": "Open Positions: positions cannot be synced",
    "CashReport": "Cash Report: cash balances are not synced",
    "EquitySummaryInBase": "Net Asset Value (NAV) in Base: no net liquidation value",
    "ConversionRates": "Conversion Rates: no exchange rates (cash is not converted)",
}
#: Sections of the history: the ledger (trades, cash transactions, corporate actions).
HISTORY_SECTIONS: Final = ("Trades", "CashTransactions", "CorporateActions", "OptionEAE")


def yesterday(zone: dt.tzinfo = EASTERN) -> dt.date:
    """The last day IBKR has closed, in the statement's zone."""
    return dt.datetime.now(zone).date() - dt.timedelta(days=1)


class FlexSource:
    """Reads a Flex connection's latest statement (see the module's docstring)."""

    #: How the client waits (a subclass may wait less: tests against a fake service).
    policy: RetryPolicy = RetryPolicy()
    #: `fetch_positions` takes `applied` (a statement applied already is not read again).
    tells_repeats: Final = True

    def __init__(
        self,
        config: FlexConfig,
        *,
        progress: Callable[[str, int], None] | None = None,
        today: Callable[[], dt.date] | None = None,
        gate: Callable[..., Callable[[str], Any]] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self._yesterday = today or yesterday
        # Builds the client's gate for the other processes sharing the token, called as
        # `gate(spacing=seconds, wait=seconds)` (the sync passes the database's:
        # `connections.Target.source`); None: only this process's turn per token.
        self.gate = gate

    def __repr__(self) -> str:
        return f"FlexSource(query {self.config.query_id}, {self.config.base_url})"

    @property
    def address(self) -> str:
        return f"Flex query {self.config.query_id}"

    def client(self, wait: float | None = None) -> FlexClient:
        """The token's client: one exchange at a time per token in this process, and
        behind the gate it was given (`gate`: across processes, IBKR's 1018 back-off
        shared), waited for at most `wait` seconds (default: another process's whole
        exchange)."""
        policy = dataclasses.replace(self.policy, poll_budget=self.config.poll_budget)
        if wait is None:
            wait = policy.poll_budget + 300
        return FlexClient(
            self.config.token,
            base_url=self.config.base_url,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            policy=policy,
            gate=None if self.gate is None else self.gate(spacing=policy.min_interval, wait=wait),
        )

    def period(self, after: dt.date | None = None) -> tuple[dt.date, dt.date]:
        """The period a plain sync asks for, ending yesterday: from `after` (the end of
        the last statement the connection applied) less OVERLAP_DAYS; with none,
        PERIOD_DAYS days. `InvalidPeriod` when that is more than MAX_DAYS days (a gap
        a back-fill must read: never skipped silently)."""
        to_date = self._yesterday()
        if after is None:
            return to_date - dt.timedelta(days=PERIOD_DAYS - 1), to_date
        from_date = min(after, to_date) - dt.timedelta(days=OVERLAP_DAYS - 1)
        if from_date < to_date - dt.timedelta(days=MAX_DAYS - 1):
            # One request reads a year at most: the days between would never be read.
            raise InvalidPeriod(
                f"The last statement this connection applied ended on {after}, more than "
                f"{MAX_DAYS} days before yesterday ({to_date}): one statement cannot cover "
                "the days since, and a plain sync would miss them. Back-fill them first "
                f"(manage.py sync_ibkr --connection NAME --from {from_date}); nothing was "
                "written."
            )
        return from_date, to_date

    def windows(
        self, from_date: dt.date, to_date: dt.date | None = None
    ) -> list[tuple[dt.date, dt.date]]:
        """A back-fill's windows: `from_date`..`to_date` (default: yesterday, the last day
        IBKR has closed) as consecutive periods of at most MAX_DAYS days, oldest first.
        `InvalidPeriod` for a period that ends before it begins, or a day IBKR has not
        closed yet (today, or later)."""
        last = self._yesterday()
        to_date = last if to_date is None else to_date
        for name, day in (("--from", from_date), ("--to", to_date)):
            if day > last:
                raise InvalidPeriod(
                    f"{name} {day} is a day IBKR has not closed yet: the latest statement "
                    f"day is yesterday, {last} (US Eastern); nothing was written."
                )
        if from_date < EARLIEST:
            raise InvalidPeriod(
                f"--from {from_date} is before {EARLIEST}: IBKR keeps no statement that old; "
                "nothing was written."
            )
        if to_date < from_date:
            raise InvalidPeriod(
                f"--to {to_date} is before --from {from_date}; nothing was written."
            )
        return windows(from_date, to_date)

    def fetch(
        self, from_date: dt.date, to_date: dt.date, *, wait: float | None = None
    ) -> FlexResponse:
        """The statement(s) of a period, parsed."""
        return self.client(wait).fetch(self.config.query_id, from_date, to_date)

    # --- a sync ---

    def fetch_positions(
        self,
        account_id: str | None = None,
        *,
        period: tuple[dt.date, dt.date] | None = None,
        after: dt.date | None = None,
        applied: Callable[[tuple[dt.date, dt.date], str], Repeat | None] | None = None,
    ) -> Snapshot:
        """The statement of `period` (a back-fill's window), else of `self.period(after)`,
        as a snapshot whose `period` says which and whose `statement_digest` is the
        statement's (`statement_digest`).

        `applied(period, digest)`, when given, says whether that very statement was
        applied already and nothing of what it wrote has changed since (the sync's
        service asks its database): then the statement is not parsed again, and the
        snapshot only repeats what was applied (`Snapshot.repeats`)."""
        period = period or self.period(after)
        download = self.client().download(self.config.query_id, *period)
        try:
            digest = statement_digest(download.body)
            repeat = applied(period, digest) if applied is not None else None
            if repeat is not None:
                download.close()
                return Snapshot(
                    accounts=repeat.accounts,
                    positions=(),
                    managed_accounts=repeat.accounts,
                    values_read=True,  # as the statement's were (the run says how)
                    source=SOURCE,
                    as_of=repeat.as_of,
                    period=period,
                    statement_digest=digest,
                    repeats=repeat.run,
                )
            # The first pass: everything but the ledger, whose rows are only indexed
            # (`LedgerIndex`); the ledger is read again from the download, batch by
            # batch, when the sync writes it (`LedgerIndex.stream`).
            download.body.seek(0)
            index = LedgerIndex(account_id)
            response = parse_flex(download.body, period=period, ledger=index.add)
            snapshot = snapshot_of(response, account_id, progress=self.progress, period=period)
        except BaseException:
            download.close()
            raise
        if not index.rows:
            download.close()
            return dataclasses.replace(snapshot, statement_digest=digest)
        stream = index.stream(download.body, period=period, close=download.close)
        return dataclasses.replace(snapshot, statement_digest=digest, ledger=stream)

    # --- Test connection ---

    def handshake(self) -> ConnectionCheck:
        # Asked for by a person waiting (the admin's Test connection): if another
        # process's exchange holds the token, say so soon rather than wait it out.
        day = self._yesterday()
        response = self.fetch(day, day, wait=HANDSHAKE_WAIT)
        return check_of(response, self.address)


#: The longest a connection's test waits for the token's gate (seconds).
HANDSHAKE_WAIT = 10.0

#: What a download holds that differs from one download of a statement to the next:
#: the moment IBKR generated it (`FlexStatement whenGenerated`), nothing of its data.
_GENERATED: Final = re.compile(rb"\swhenGenerated=(?:\"[^\"]{0,64}\"|'[^']{0,64}')")
#: Bytes a chunk's end keeps for the next (more than the longest `_GENERATED`).
_CARRY: Final = 128
_CHUNK: Final = 1 << 20


def statement_digest(body: IO[bytes]) -> str:
    """A digest of a downloaded statement that is the same for every download of the
    same data (`whenGenerated` left out), salted with this reader's own code (a reader
    that reads differently reads every statement again). Read in chunks from the body's
    start: bounded memory whatever its size."""
    digest = hashlib.sha256(_READER_SALT)
    body.seek(0)
    carry = b""
    while True:
        chunk = body.read(_CHUNK)
        data = carry + chunk
        if not chunk:
            digest.update(_GENERATED.sub(b"", data))
            return digest.hexdigest()
        cut = max(0, len(data) - _CARRY)
        for match in _GENERATED.finditer(data, max(0, cut - _CARRY), len(data)):
            if match.start() < cut < match.end():
                cut = match.end()
        digest.update(_GENERATED.sub(b"", data[:cut]))
        carry = data[cut:]


def _reader_salt() -> bytes:
    salt = hashlib.sha256(b"flex-statement/1")
    for module in ("parser.py", "records.py", "values.py", "source.py"):
        path = os.path.join(os.path.dirname(__file__), module)
        try:
            with open(path, "rb") as code:
                salt.update(code.read())
        except OSError:  # no source to read (a frozen install): its name still counts
            salt.update(module.encode())
    return salt.digest()


_READER_SALT: Final = _reader_salt()


def latest_statements(response: FlexResponse) -> dict[str, Statement]:
    """Each account's latest statement in a response (several may come: accounts,
    periods), in account order."""
    latest: dict[str, Statement] = {}
    for statement in response.statements:
        account = statement.account
        kept = latest.get(account)
        if kept is None or _period_end(statement) >= _period_end(kept):
            latest[account] = statement
    return dict(sorted(latest.items()))


def _period_end(statement: Statement) -> tuple:
    return (statement.header.to_date or dt.date.min, statement.header.index)


def snapshot_of(
    response: FlexResponse,
    account_id: str | None = None,
    *,
    progress: Callable[[str, int], None] | None = None,
    period: tuple[dt.date, dt.date] | None = None,
) -> Snapshot:
    """A response's latest statement per account as the sync's snapshot (the statement's
    period end its `as_of`); `account_id` keeps that account only. Every statement's
    ledger and daily values of the accounts kept come along; `period` is what was asked
    for."""
    statements = latest_statements(response)
    if not statements:
        raise FlexQueryError(
            "the Flex statement holds no account: check that the query selects the "
            "account(s) and is an Activity Flex Query; nothing was written"
        )
    managed = tuple(statements)
    if account_id is not None:
        if account_id not in statements:
            raise UnknownAccount(
                f"Account {account_id} is not in the Flex query's statement (it holds "
                f"{', '.join(managed)}); nothing was written."
            )
        statements = {account_id: statements[account_id]}
    positions: list[PositionRecord] = []
    values: dict[str, AccountValues] = {}
    moments = []
    for account, statement in statements.items():
        if statement.as_of is None:
            raise FlexFormatError(
                f"the statement of {account} has no readable period end (toDate): "
                "nothing was written"
            )
        if period is not None and statement.header.to_date > period[1]:  # type: ignore[operator]
            raise FlexFormatError(
                f"the statement of {account} ends on {statement.header.to_date}, after the "
                f"period asked for ({period[0]} to {period[1]}): it is not the statement "
                "asked for (a day IBKR has not closed, or the query's own period); "
                "nothing was written"
            )
        if "OpenPositions" not in statement.end.sections:
            raise FlexQueryError(
                "the Flex query has no Open Positions section: a sync would take every "
                "position for closed. Add the section to the query in Client Portal; "
                "nothing was written"
            )
        _whole_state(statement)
        records = [_position(held) for held in statement.positions]
        positions += records
        values[account] = account_values(statement)
        moments.append(statement.as_of)
    if progress is not None:
        progress("read", len(positions))
    # The ledger: every statement's transactions of the accounts synced (a response may
    # hold several periods of one account; the writer keys each row on IBKR's id).
    ledger = [keyed(s) for s in response.statements if s.account in statements]
    return Snapshot(
        accounts=tuple(statements),
        positions=tuple(positions),
        managed_accounts=managed,
        values_read=True,
        account_values=values,
        source=SOURCE,
        as_of=max(moments),
        ledger_read=True,
        trades=tuple(trade for s in ledger for trade in s.trades),
        cash_transactions=tuple(tx for s in ledger for tx in s.cash_transactions),
        corporate_actions=tuple(action for s in ledger for action in s.corporate_actions),
        daily_values=daily_values([s for s in response.statements if s.account in statements]),
        period=period,
    )


def daily_values(statements: list[Statement]) -> dict[str, tuple[AccountValues, ...]]:
    """Each account's value of every day its statements hold (EquitySummaryInBase: the
    net asset value and cash in base; ConversionRates: that day's rates to the base),
    as of the end of that day in the statement's zone, oldest first. A day two
    statements hold is taken from the later one."""
    days: dict[str, dict[dt.date, AccountValues]] = {}
    for statement in sorted(statements, key=_period_end):
        base = statement.base_currency
        zone = statement.as_of.tzinfo if statement.as_of is not None else EASTERN
        first, last = statement.header.from_date, statement.header.to_date
        # Each day's rates, by the currency they convert to (the base: the account's, or
        # where the statement names none, the one its net asset value is in). A day's
        # rate that does not convert (IBKR's -1: no rate that day) is left out, not an
        # error a day (the period end's whole snapshot reports its own).
        rates: dict[tuple[dt.date, str], dict[str, Decimal | None]] = {}
        for rate in statement.exchange_rates:
            if (
                rate.date is not None
                and rate.from_currency
                and rate.to_currency
                and rate.rate is not None
                and rate.rate.is_finite()
                and rate.rate > 0
            ):
                rates.setdefault((rate.date, rate.to_currency), {})[rate.from_currency] = rate.rate
        for nav in statement.net_asset_values:
            if nav.date is None or (first and nav.date < first) or (last and nav.date > last):
                continue
            currency = base or nav.currency
            problems = [ValueProblem(f"EquitySummaryInBase {nav.date}", p) for p in nav.problems]
            totals: dict[str, Decimal | None] = {}
            if nav.currency and currency and nav.currency != currency:
                problems.append(
                    ValueProblem(
                        f"EquitySummaryInBase {nav.date}",
                        f"the net asset value is in {nav.currency}, the account's base "
                        f"currency is {currency}",
                    )
                )
            else:
                totals = {"net_liquidation": nav.total, "total_cash_value": nav.cash}
            day_rates = dict(rates.get((nav.date, currency), {}))
            if day_rates and currency:
                day_rates.setdefault(currency, Decimal(1))
            days.setdefault(statement.account, {})[nav.date] = AccountValues(
                account=statement.account,
                as_of=dt.datetime.combine(nav.date, END_OF_DAY, zone),
                base_currency=currency,
                totals=totals,
                exchange_rates=day_rates,
                problems=tuple(problems),
                names={
                    "net_liquidation": f"EquitySummaryInBase total of {nav.date}",
                    "total_cash_value": f"EquitySummaryInBase cash of {nav.date}",
                    "exchange_rate": f"ConversionRate of {nav.date}",
                },
            )
    return {
        account: tuple(by_day[day] for day in sorted(by_day))
        for account, by_day in sorted(days.items())
    }


#: What begins a key the source derived for a row IBKR gave no transactionID (never one
#: of IBKR's ids, which are digits).
DERIVED_KEY: Final = "~"


def keyed(statement: Statement) -> Statement:
    """The statement with a key for each ledger row: IBKR's transactionID, or, for a row
    without one (a query that left the column out), one derived from the row's own
    attributes: `~` and a digest of the account, the section and every attribute, then
    `.2`, `.3` ... for the second, third identical row of the statement (two identical
    fills). So is a row whose id other, different rows of the section carry too (ids
    redacted to one word). The same statement, or an overlapping one, gives each row the
    same key again, so importing it again writes nothing; but without IBKR's id a
    corrected row is a new row, not an update: the README asks for the Transaction ID
    column."""
    sections = (
        ("Trade", statement.trades),
        ("CashTransaction", statement.cash_transactions),
        ("CorporateAction", statement.corporate_actions),
    )
    shared = _shared_ids((section, record) for section, records in sections for record in records)
    seen: dict[str, int] = {}
    return dataclasses.replace(
        statement,
        trades=tuple(_keyed("Trade", t, shared, seen) for t in statement.trades),
        cash_transactions=tuple(
            _keyed("CashTransaction", t, shared, seen) for t in statement.cash_transactions
        ),
        corporate_actions=tuple(
            _keyed("CorporateAction", a, shared, seen) for a in statement.corporate_actions
        ),
    )


def _shared_ids(records: Iterable[tuple[str, Any]]) -> set[tuple[str, str]]:
    """The (section, id) that several different rows of one statement's section carry
    (a statement whose ids were redacted to one word): each such row is keyed on its
    attributes."""
    shared: set[tuple[str, str]] = set()
    first: dict[tuple[str, str], Any] = {}
    for section, record in records:
        if record.transaction_id:
            key = (section, record.transaction_id)
            if first.setdefault(key, record.raw) != record.raw:
                shared.add(key)
    return shared


def _keyed(section: str, record: Any, shared: set[tuple[str, str]], seen: dict[str, int]) -> Any:
    """A ledger record with its key (`keyed`); `seen` counts the statement's derived
    keys so far."""
    if record.transaction_id and (section, record.transaction_id) not in shared:
        return record
    text = "\x1f".join(
        [section, record.account, *(f"{k}={v}" for k, v in sorted(record.raw.items()))]
    )
    digest = DERIVED_KEY + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]
    seen[digest] = n = seen.get(digest, 0) + 1
    return dataclasses.replace(record, transaction_id=digest if n == 1 else f"{digest}.{n}")


#: The ledger records a stream's batch holds at most (besides the rows held to its
#: end: see `LedgerIndex`).
LEDGER_BATCH: Final = 5000
_SECTIONS: Final = {
    Trade: "Trade",
    CashTransaction: "CashTransaction",
    CorporateAction: "CorporateAction",
}


class LedgerIndex:
    """What a first pass over a statement learns of its ledger (`parse_flex(ledger=...)`),
    so that a second pass can hand the ledger on in batches (`stream`) with exactly the
    keys and links the whole ledger in memory gets (`keyed`, `link_withholding`), in
    bounded memory: per row, only its id.

    - The ids that more than one row of a section carries (a row sent twice, by two
      overlapping statements; ids redacted to one word): every row of such an id is held
      to the stream's last batch, where they are keyed together as `keyed` keys them, so
      that all rows of one key are in one batch (mapping keeps the last).
    - Rows without an id are keyed on their attributes as they come; if more than one
      statement has such rows (their keys could meet), they are held to the last batch too.
    - Each withholding tax's dividend (`link_withholding`: the one income of its
      account, action id and contract), by the rows' places; a tax whose dividend's key is
      not known when the tax comes is held to the last batch.
    """

    def __init__(self, account_id: str | None) -> None:
        self.account_id = account_id
        self.rows = 0
        self._keep = False
        self._statement = -1
        self._ids: dict[str, int] = {}
        self._without_id: set[int] = set()
        self._odd_ids = False  # an id that looks like a derived key
        self._income: dict[tuple, list[int]] = {}
        self._taxes: list[tuple[int, tuple]] = []
        self._id_of: dict[int, str | None] = {}

    def add(self, record: Any) -> None:
        if isinstance(record, StatementHeader):
            self._keep = self.account_id is None or record.account == self.account_id
            self._statement = record.index
            return
        if not isinstance(record, LedgerEntry) or not self._keep:
            return
        place = self.rows
        self.rows += 1
        ident = record.transaction_id
        if ident:
            key = record.section[:3] + ident
            self._ids[key] = self._ids.get(key, 0) + 1
            if ident.startswith(DERIVED_KEY):
                self._odd_ids = True
        else:
            self._without_id.add(self._statement)
        if record.action_id:
            if record.kind in INCOME_KINDS:
                link = action_key(record.account, record.action_id, record.con_id)
                self._income.setdefault(link, []).append(place)
                self._id_of[place] = ident
            elif record.kind == TAX_KIND:
                link = action_key(record.account, record.action_id, record.con_id)
                self._taxes.append((place, link))
                self._id_of[place] = ident

    def stream(
        self,
        body: IO[bytes],
        *,
        period: tuple[dt.date, dt.date] | None,
        close: Callable[[], None],
        size: int | None = None,
    ) -> LedgerStream:
        """The ledger of the statement `body` (read again from its start at each call of
        `batches()`) in batches of `size` records (default `LEDGER_BATCH`)."""
        size = size or LEDGER_BATCH
        repeated = {key for key, n in self._ids.items() if n > 1}
        self._ids = {}
        derived_held = len(self._without_id) > 1 or self._odd_ids
        links: dict[int, int] = {}
        for place, link in self._taxes:
            candidates = self._income.get(link, [])
            if len(candidates) == 1:
                links[place] = candidates[0]
        # The incomes' keys known already: their own ids, when no other row has them.
        known: dict[int, str] = {}
        for income in set(links.values()):
            ident = self._id_of[income]
            if ident and "Cas" + ident not in repeated:
                known[income] = ident
        incomes = frozenset(links.values())
        account_id = self.account_id

        def batches() -> Iterator[LedgerBatch]:
            body.seek(0)
            key_of = dict(known)
            held: list[tuple[int, int, str, Any, bool]] = []
            parts: dict[str, list[Any]] = {name: [] for name in _SECTIONS.values()}
            dividend_of: dict[str, str] = {}
            keep, statement, seen, place, count = False, -1, {}, -1, 0
            for record in iter_records(body, period=period):
                section = _SECTIONS.get(type(record))
                if section is None:
                    if isinstance(record, StatementHeader):
                        keep = account_id is None or record.account == account_id
                        statement, seen = record.index, {}
                    continue
                if not keep:
                    continue
                place += 1
                ident = record.transaction_id
                if (ident and section[:3] + ident in repeated) or (not ident and derived_held):
                    held.append((place, statement, section, record, False))
                    continue
                record = _keyed(section, record, set(), seen)
                if place in incomes:
                    key_of[place] = record.transaction_id
                if place in links:
                    income_key = key_of.get(links[place])
                    if income_key is None:  # its dividend comes later, or at the end
                        held.append((place, statement, section, record, True))
                        continue
                    dividend_of[record.transaction_id] = income_key
                parts[section].append(record)
                count += 1
                if count >= size:
                    yield _batch(parts, dividend_of)
                    parts = {name: [] for name in _SECTIONS.values()}
                    dividend_of, count = {}, 0
            if count:
                yield _batch(parts, dividend_of)
            if held:
                yield _held_batch(held, links, key_of)

        return LedgerStream(batches=batches, close=close)


def _batch(parts: dict[str, list[Any]], dividend_of: dict[str, str]) -> LedgerBatch:
    return LedgerBatch(
        trades=tuple(parts["Trade"]),
        cash_transactions=tuple(parts["CashTransaction"]),
        corporate_actions=tuple(parts["CorporateAction"]),
        dividend_of=dividend_of,
    )


def _held_batch(
    held: list[tuple[int, int, str, Any, bool]], links: dict[int, int], key_of: dict[int, str]
) -> LedgerBatch:
    """The rows held to a stream's end, keyed per statement as `keyed` keys them (every
    row of their ids is among them), in the document's order, with their taxes' links."""
    by_statement: dict[int, list[tuple[int, str, Any, bool]]] = {}
    for place, statement, section, record, done in held:
        by_statement.setdefault(statement, []).append((place, section, record, done))
    rows: list[tuple[int, str, Any]] = []
    for members in by_statement.values():
        shared = _shared_ids((section, record) for _, section, record, done in members if not done)
        seen: dict[str, int] = {}
        for place, section, record, done in members:
            if not done:
                record = _keyed(section, record, shared, seen)
            key_of[place] = record.transaction_id
            rows.append((place, section, record))
    rows.sort(key=lambda row: row[0])
    parts: dict[str, list[Any]] = {name: [] for name in _SECTIONS.values()}
    dividend_of: dict[str, str] = {}
    for place, section, record in rows:
        if place in links:
            dividend_of[record.transaction_id] = key_of[links[place]]
        parts[section].append(record)
    return _batch(parts, dividend_of)


def _whole_state(statement: Statement) -> None:
    """Refuses a statement whose positions, cash and net asset values are not one
    account's state: Open Positions with lots and no summary (a query set to Lot only:
    read as no position, every position would be closed), a row naming another account
    (a statement is its account's, `FlexStatement accountId`: taken as another
    account's, such a row would close every other position of that account and write one
    account's cash and value as another's), or a contract with two summary rows in
    OpenPositions (one row is one position: of two, as an advisor's models split a
    holding or a row sent twice, neither is the account's quantity)."""
    account = statement.account
    row = "OpenPositions/OpenPosition"
    if statement.end.rows_skipped.get(row) and not statement.end.rows_read.get(row):
        raise FlexQueryError(
            f"the statement of {account} has the lots of its open positions and no "
            "position itself: the query's Open Positions is set to Lot only. Check "
            "Summary in its options in Client Portal; nothing was written"
        )
    seen: set[int] = set()
    for held in statement.positions:
        con_id = held.contract.con_id
        if con_id is not None and con_id in seen:
            raise FlexFormatError(
                f"the statement of {account} lists conId {con_id} "
                f"({held.contract.symbol or 'a contract'}) twice in OpenPositions: one "
                "position has one summary row (a query of an advisor's models splits "
                "them); nothing was written"
            )
        seen.add(con_id)
    sections = (
        ("OpenPositions", statement.positions),
        ("CashReport", (*statement.cash, *filter(None, [statement.cash_total]))),
        ("EquitySummaryInBase", statement.net_asset_values),
    )
    for section, rows in sections:
        others = sorted({row.account for row in rows} - {account})
        if others:
            raise FlexFormatError(
                f"the statement of {account} holds {section} rows of "
                f"{', '.join(map(repr, others[:5]))}: a Flex statement's rows are its own "
                "account's (each account has its own statement); nothing was written"
            )


def _position(held: Any) -> PositionRecord:
    try:
        return held.as_position_record()
    except ValueError as error:
        raise FlexFormatError(
            f"a position of the Flex statement cannot be read ({error}"
            + (f"; {'; '.join(held.problems)}" if held.problems else "")
            + "): nothing was written"
        ) from None


def account_values(statement: Statement) -> AccountValues:
    """One statement's values of its account, as of its period end."""
    account = statement.account
    problems: list[ValueProblem] = []
    navs = sorted(
        (nav for nav in statement.net_asset_values if nav.date is not None),
        key=lambda nav: nav.date,
    )
    last_nav = navs[-1] if navs else None
    base = statement.base_currency or (last_nav.currency if last_nav else "")
    totals: dict[str, Decimal | None] = {}
    if last_nav is not None:
        if base and last_nav.currency and last_nav.currency != base:
            problems.append(
                ValueProblem(
                    "EquitySummaryInBase",
                    f"the net asset value is in {last_nav.currency}, the account's base "
                    f"currency is {base}",
                )
            )
        else:
            totals["net_liquidation"] = last_nav.total
            totals["total_cash_value"] = last_nav.cash
    if "total_cash_value" not in totals and statement.cash_total is not None:
        totals["total_cash_value"] = statement.cash_total.ending_cash
    for nav in navs[-1:]:
        problems += [ValueProblem("EquitySummaryInBase", p) for p in nav.problems]

    cash: dict[str, Decimal | None] = {}
    cash_problems: list[str] = []
    for balance in statement.cash:
        if not balance.currency:
            cash_problems.append(
                f"a cash balance without a currency: {'; '.join(balance.problems)}"
            )
            continue
        if balance.currency in cash and cash[balance.currency] != balance.ending_cash:
            cash_problems.append(f"{balance.currency}: two different ending cash balances")
        cash[balance.currency] = balance.ending_cash
        cash_problems += [f"{balance.currency}: {p}" for p in balance.problems]

    rates: dict[str, Decimal | None] = {}
    if base:
        dated = [
            r
            for r in statement.exchange_rates
            if r.to_currency == base
            and r.from_currency
            and r.date is not None
            and (statement.header.to_date is None or r.date <= statement.header.to_date)
        ]
        if dated:
            last_day = max(r.date for r in dated)
            for rate in dated:
                if rate.date == last_day:
                    rates[rate.from_currency] = rate.rate
            rates.setdefault(base, Decimal(1))

    held: dict[int, PositionValue] = {}
    for position in statement.positions:
        con_id = position.contract.con_id
        if con_id is None or position.quantity is None:
            continue
        held[con_id] = PositionValue(
            con_id=con_id,
            quantity=position.quantity,
            market_price=position.mark_price,
            market_value=position.market_value,
            unrealized_pnl=position.unrealized_pnl,
            realized_pnl=None,
        )
        label = position.contract.symbol or str(con_id)
        problems += [ValueProblem(label, p) for p in position.problems]
    return AccountValues(
        account=account,
        as_of=statement.as_of,
        base_currency=base,
        totals=totals,
        cash=cash,
        cash_total_reported=statement.cash_total is not None,
        cash_problems=tuple(cash_problems),
        exchange_rates=rates,
        positions=held,
        problems=tuple(problems),
        names={
            "net_liquidation": "EquitySummaryInBase total",
            "total_cash_value": "EquitySummaryInBase cash",
            "cash": "CashReport endingCash",
            "exchange_rate": "ConversionRate",
        },
    )


#: A section whose rows are all summaries of the ones read (its level of detail set to
#: them only): the section, its row read, and what a test says of it.
_SUMMARIES_ONLY: Final = (
    (
        "OpenPositions",
        "OpenPosition",
        "Open Positions has lots only (Lot): check Summary, or positions cannot be synced",
    ),
    (
        "Trades",
        "Trade",
        "Trades has orders or summaries only: check Execution, or no trade is stored",
    ),
    (
        "CashTransactions",
        "CashTransaction",
        "Cash Transactions has summaries only: check Detail, or no cash transaction is stored",
    ),
    (
        "CorporateActions",
        "CorporateAction",
        "Corporate Actions has summaries only: check Detail, or no corporate action is stored",
    ),
)


def check_of(response: FlexResponse, address: str) -> ConnectionCheck:
    """What a test's statement says of the query: accounts, sections, what is lacking."""
    statements = latest_statements(response)
    sections: list[str] = []
    for statement in response.statements:
        sections += [s for s in statement.end.sections if s not in sections]
    lacking = [f"no {what}" for name, what in SECTIONS.items() if name not in sections]
    for section, row, what in _SUMMARIES_ONLY:
        if any(
            not s.end.rows_read.get(f"{section}/{row}")
            and any(path.startswith(f"{section}/") for path in s.end.rows_skipped)
            for s in statements.values()
        ):
            lacking.append(what)
    if statements and not all(s.base_currency for s in statements.values()):
        lacking.append(
            "no base currency (Account Information with its Currency): values are read "
            "only where the net asset value names it"
        )
    history = [name for name in HISTORY_SECTIONS if name in sections]
    summary = (
        f"Flex query {response.query_name or '(unnamed)'}: accounts "
        f"{', '.join(statements) or 'none'}; sections {', '.join(sections) or 'none'}"
    )
    if history:
        summary += f" (history: {', '.join(history)})"
    return ConnectionCheck(
        source=SOURCE,
        address=address,
        accounts=tuple(statements),
        summary=summary,
        lacking=tuple(lacking),
        sections=tuple(sections),
    )
