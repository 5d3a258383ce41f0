"""Position records for the gateway simulator: JSON load/save and a fast generator.

Quantities, average costs and strikes are ``Decimal`` so that fractional values such as
``0.12345678`` or ``3.14159265`` reach the wire exactly as written. A float round-trip
would be invisible in most tests and then bite in production, where IB sends fractional
share quantities as text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

__all__ = [
    "SAMPLE_PORTFOLIO_PATH",
    "SEC_TYPES",
    "Portfolio",
    "PortfolioError",
    "SimPosition",
    "generate_portfolio",
    "load_portfolio",
    "load_sample_portfolio",
    "portfolio_from_dict",
    "save_portfolio",
]

#: The demo portfolio the management command serves by default.
SAMPLE_PORTFOLIO_PATH = Path(__file__).with_name("sample_portfolio.json")

#: Every security type the generator produces (and the sample portfolio contains).
SEC_TYPES = ("STK", "OPT", "FOP", "FUT", "CASH", "BOND", "CFD", "WAR", "FUND", "CRYPTO", "IND")

_DECIMAL_FIELDS = ("strike", "quantity", "average_cost", "market_price")


class PortfolioError(ValueError):
    """A portfolio file or record is unusable; the message says what and where."""


def _to_decimal(name: str, value: object) -> Decimal:
    """Convert to Decimal without passing through binary floating point when avoidable.

    Floats are accepted for convenience in hand-written tests and converted via ``repr``
    (the shortest text that round-trips), which is what the author typed.
    """
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, bool):
        raise PortfolioError(f"{name} must be a number, got {value!r}")
    elif isinstance(value, int | str):
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation:
            raise PortfolioError(f"{name} must be a number, got {value!r}") from None
    elif isinstance(value, float):
        result = Decimal(repr(value))
    else:
        raise PortfolioError(f"{name} must be a number, got {value!r}")
    if not result.is_finite():
        raise PortfolioError(f"{name} must be finite, got {value!r}")
    return result


@dataclass(frozen=True)
class SimPosition:
    """One position as the gateway reports it in a position message (61).

    Field names follow the message layout (account, contract fields, quantity, average
    cost). Frozen so the simulator can hand the same objects to several connections and
    threads without copying.

    ``market_price`` is optional and only used for reqAccountUpdates' portfolio rows; it
    defaults to the average cost per unit, i.e. a flat P&L. As IBKR states them, the
    average cost is the cost of one unit of ``quantity`` (a contract's, multiplier
    included) and a price is per unit of the multiplier; a bond's price is a percent of
    par and its quantity its face value, so that its average cost is its price / 100.
    """

    account: str
    con_id: int
    symbol: str
    sec_type: str = "STK"
    currency: str = "USD"
    exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    multiplier: str = ""
    last_trade_date: str = ""
    strike: Decimal = Decimal(0)
    right: str = ""
    quantity: Decimal = Decimal(0)
    average_cost: Decimal = Decimal(0)
    market_price: Decimal | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.account, str) or not self.account:
            raise PortfolioError(f"account must be a non-empty string, got {self.account!r}")
        if isinstance(self.con_id, bool) or not isinstance(self.con_id, int | str):
            raise PortfolioError(f"con_id must be an integer, got {self.con_id!r}")
        try:
            con_id = int(self.con_id)
        except ValueError:
            raise PortfolioError(f"con_id must be an integer, got {self.con_id!r}") from None
        if con_id <= 0:
            raise PortfolioError(f"con_id must be positive, got {con_id}")
        object.__setattr__(self, "con_id", con_id)
        if not isinstance(self.symbol, str) or not self.symbol:
            raise PortfolioError(f"symbol must be a non-empty string, got {self.symbol!r}")
        for name in ("sec_type", "currency", "exchange", "local_symbol", "trading_class", "right"):
            if not isinstance(getattr(self, name), str):
                raise PortfolioError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.multiplier, int) and not isinstance(self.multiplier, bool):
            object.__setattr__(self, "multiplier", str(self.multiplier))
        elif not isinstance(self.multiplier, str):
            raise PortfolioError(f"multiplier must be a string, got {self.multiplier!r}")
        if isinstance(self.last_trade_date, int) and not isinstance(self.last_trade_date, bool):
            object.__setattr__(self, "last_trade_date", str(self.last_trade_date))
        elif not isinstance(self.last_trade_date, str):
            raise PortfolioError(
                f"last_trade_date must be YYYYMMDD text, got {self.last_trade_date!r}"
            )
        if self.last_trade_date and not (
            self.last_trade_date.isdigit() and len(self.last_trade_date) in (6, 8)
        ):
            raise PortfolioError(
                f"last_trade_date must be YYYYMMDD or YYYYMM, got {self.last_trade_date!r}"
            )
        for name in _DECIMAL_FIELDS:
            value = getattr(self, name)
            if value is None and name == "market_price":
                continue
            object.__setattr__(self, name, _to_decimal(name, value))

    @property
    def key(self) -> tuple[str, int]:
        """Identity of a position: IB keys positions by account and contract id."""
        return (self.account, self.con_id)

    @property
    def multiplier_value(self) -> Decimal:
        """The numeric multiplier (1 when the contract has none, e.g. stocks)."""
        try:
            return Decimal(self.multiplier) if self.multiplier else Decimal(1)
        except InvalidOperation:
            return Decimal(1)

    @property
    def price(self) -> Decimal:
        """Market price per unit: ``market_price`` or average cost / multiplier (a bond's:
        average cost x 100, a percent of par)."""
        if self.market_price is not None:
            return self.market_price
        if self.sec_type == "BOND":
            return self.average_cost * 100
        return self.average_cost / self.multiplier_value

    def with_quantity(self, quantity: Decimal | int | str) -> SimPosition:
        """A copy with another quantity (e.g. 0 for a position closed during the session)."""
        return _replace(self, quantity=_to_decimal("quantity", quantity))

    def as_gateway_position(self) -> Any:
        """This position as a source hands it on (a `snapshot.PositionRecord`), for
        feeding the sync directly, without the wire, in tests and benchmarks."""
        from ..snapshot import PositionRecord

        fields = PositionRecord.__dataclass_fields__
        return PositionRecord(
            **{name: getattr(self, name) for name in fields if hasattr(self, name)}
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; decimals as strings so saving never loses digits."""
        data = asdict(self)
        for name in _DECIMAL_FIELDS:
            value = data[name]
            if value is None:
                del data[name]
            else:
                data[name] = format(value, "f")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimPosition:
        """Build from a dict (e.g. one JSON entry); unknown keys are an error, not ignored."""
        if not isinstance(data, Mapping):
            raise PortfolioError(f"a position must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PortfolioError(f"unknown position field(s): {', '.join(unknown)}")
        missing = [name for name in ("account", "con_id", "symbol") if name not in data]
        if missing:
            raise PortfolioError(f"missing position field(s): {', '.join(missing)}")
        return cls(**data)


def _replace(pos: SimPosition, **changes: Any) -> SimPosition:
    # dataclasses.replace re-runs validation; fine, positions are small.
    from dataclasses import replace

    return replace(pos, **changes)


@dataclass
class Portfolio:
    """Managed accounts plus positions; accounts may have no positions at all."""

    accounts: list[str] = field(default_factory=list)
    positions: list[SimPosition] = field(default_factory=list)

    def all_accounts(self) -> list[str]:
        """The listed accounts followed by any account that only appears in a position.

        Every account holding a position must be managed, otherwise the gateway would
        report positions for an account the client was never told about.
        """
        seen = dict.fromkeys(self.accounts)
        for pos in self.positions:
            seen.setdefault(pos.account)
        return list(seen)

    def validate(self) -> Portfolio:
        """Reject duplicate (account, con_id) pairs: IB reports one row per pair."""
        keys: set[tuple[str, int]] = set()
        for index, pos in enumerate(self.positions):
            if pos.key in keys:
                raise PortfolioError(
                    f"position #{index}: duplicate con_id {pos.con_id} in account {pos.account}"
                )
            keys.add(pos.key)
        for account in self.accounts:
            if not isinstance(account, str) or not account or "," in account:
                raise PortfolioError(f"invalid account id {account!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "accounts": self.all_accounts(),
            "positions": [pos.to_dict() for pos in self.positions],
        }

    def __len__(self) -> int:
        return len(self.positions)


def portfolio_from_dict(data: Any) -> Portfolio:
    """Build a validated Portfolio from parsed JSON, naming the offending entry on error."""
    if isinstance(data, list):
        data = {"positions": data}
    if not isinstance(data, Mapping):
        raise PortfolioError("the top level must be an object with 'accounts' and 'positions'")
    unknown = sorted(set(data) - {"accounts", "positions"})
    if unknown:
        raise PortfolioError(f"unknown top-level key(s): {', '.join(unknown)}")
    accounts = data.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
        raise PortfolioError("'accounts' must be a list of account id strings")
    raw_positions = data.get("positions", [])
    if not isinstance(raw_positions, list):
        raise PortfolioError("'positions' must be a list")
    positions = []
    for index, raw in enumerate(raw_positions):
        try:
            positions.append(SimPosition.from_dict(raw))
        except (PortfolioError, TypeError) as exc:
            raise PortfolioError(f"position #{index}: {exc}") from None
    return Portfolio(accounts=list(accounts), positions=positions).validate()


def load_portfolio(path: str | Path) -> Portfolio:
    """Load a portfolio JSON file (``{"accounts": [...], "positions": [...]}``).

    Numbers are parsed as Decimal, so ``"quantity": 0.12345678`` and
    ``"quantity": "0.12345678"`` are equally exact. Every failure is a PortfolioError
    whose message names the file and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PortfolioError(f"portfolio file not found: {path}") from None
    except OSError as exc:
        raise PortfolioError(f"cannot read portfolio file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PortfolioError(f"portfolio file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise PortfolioError(
            f"portfolio file {path} is not valid JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})"
        ) from None
    try:
        return portfolio_from_dict(data)
    except PortfolioError as exc:
        raise PortfolioError(f"invalid portfolio file {path}: {exc}") from None


def save_portfolio(portfolio: Portfolio, path: str | Path) -> None:
    """Write a portfolio as JSON that ``load_portfolio`` reads back identically."""
    text = json.dumps(portfolio.to_dict(), indent=2, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_sample_portfolio() -> Portfolio:
    """The bundled demo portfolio (two accounts with positions, one without)."""
    return load_portfolio(SAMPLE_PORTFOLIO_PATH)


# -- generator --------------------------------------------------------------------------

_US_STOCKS = (
    ("AAPL", "NASDAQ", "NMS", "189.25"),
    ("MSFT", "NASDAQ", "NMS", "402.10"),
    ("AMZN", "NASDAQ", "NMS", "178.35"),
    ("GOOGL", "NASDAQ", "NMS", "141.80"),
    ("NVDA", "NASDAQ", "NMS", "875.28"),
    ("JPM", "NYSE", "JPM", "196.62"),
    ("KO", "NYSE", "KO", "59.87"),
    ("XOM", "NYSE", "XOM", "104.11"),
    ("BRK B", "NYSE", "BRK B", "408.95"),
    ("SPY", "ARCA", "SPY", "512.84"),
    ("QQQ", "NASDAQ", "NMS", "438.27"),
    ("VTI", "ARCA", "VTI", "252.40"),
)
_EU_STOCKS = (
    ("SAP", "IBIS", "EUR", "SAP", "172.50"),
    ("SIE", "IBIS", "EUR", "SIE", "176.12"),
    ("ASML", "AEB", "EUR", "ASML", "885.40"),
    ("MC", "SBF", "EUR", "MC", "820.30"),
    ("NESN", "EBS", "CHF", "NESN", "95.42"),
    ("SHEL", "LSE", "GBP", "SHEL", "26.15"),
)
_OPTION_UNDERLYINGS = (("AAPL", "190"), ("SPY", "510"), ("MSFT", "400"), ("TSLA", "180"))
_FUTURES = (
    ("ES", "CME", "50", "5200.25"),
    ("NQ", "CME", "20", "18100.50"),
    ("CL", "NYMEX", "1000", "81.42"),
    ("GC", "COMEX", "100", "2180.60"),
    ("FGBL", "EUREX", "1000", "131.55"),
)
_FX = (("EUR", "USD", "1.08725"), ("GBP", "USD", "1.26610"), ("USD", "JPY", "151.342"))
_CRYPTO = (("BTC", "68250.75"), ("ETH", "3520.40"), ("LTC", "91.23"))
_INDEXES = (("SPX", "CBOE"), ("DAX", "EUREX"), ("VIX", "CBOE"))
_MONTHS = ("F", "G", "H", "J", "K", "M", "N", "Q", "U", "V", "X", "Z")


def _expiry(rng: random.Random) -> str:
    year = rng.choice((2025, 2026, 2027))
    month = rng.randint(1, 12)
    day = rng.choice((15, 16, 17, 18, 19, 20, 21))
    return f"{year}{month:02d}{day:02d}"


def _money(rng: random.Random, base: str, spread: float = 0.2, places: int = 4) -> Decimal:
    """A price near ``base``, computed in integers so the text stays short and exact."""
    scale = 10**places
    centre = int(Decimal(base) * scale)
    delta = int(centre * spread)
    return Decimal(rng.randint(max(1, centre - delta), centre + delta)) / scale


def _generate_one(rng: random.Random, sec_type: str, account: str, con_id: int) -> SimPosition:
    """One realistic position of the given type (field conventions as TWS reports them)."""
    sign = -1 if rng.random() < 0.15 else 1
    if sec_type == "STK":
        if rng.random() < 0.3:
            symbol, exchange, currency, trading_class, base = rng.choice(_EU_STOCKS)
        else:
            symbol, exchange, trading_class, base = rng.choice(_US_STOCKS)
            currency = "USD"
        kind = rng.random()
        if kind < 0.2:  # fractional shares, up to 8 decimals as IB allows
            quantity = Decimal(rng.randint(1, 10**9)) / 10**8
            sign = 1
        else:
            quantity = Decimal(rng.choice((1, 5, 10, 25, 50, 100, 200, 500, 1000)))
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="STK",
            currency=currency,
            exchange=exchange,
            local_symbol=symbol,
            trading_class=trading_class,
            quantity=sign * quantity,
            average_cost=_money(rng, base),
        )
    if sec_type == "OPT":
        symbol, strike_base = rng.choice(_OPTION_UNDERLYINGS)
        expiry = _expiry(rng)
        right = rng.choice("CP")
        strike = Decimal(int(strike_base) + 5 * rng.randint(-8, 8))
        local = f"{symbol:<6}{expiry[2:]}{right}{int(strike * 1000):08d}"
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="OPT",
            exchange="SMART" if rng.random() < 0.5 else "CBOE",
            local_symbol=local,
            trading_class=symbol,
            multiplier="100",
            last_trade_date=expiry,
            strike=strike,
            right=right,
            quantity=Decimal(sign * rng.randint(1, 20)),
            average_cost=_money(rng, "350", spread=0.9, places=2),
        )
    if sec_type in ("FUT", "FOP"):
        symbol, exchange, multiplier, base = rng.choice(_FUTURES)
        expiry = _expiry(rng)
        month_code = _MONTHS[int(expiry[4:6]) - 1]
        local = f"{symbol}{month_code}{expiry[3]}"
        price = _money(rng, base, spread=0.05, places=2)
        if sec_type == "FUT":
            return SimPosition(
                account=account,
                con_id=con_id,
                symbol=symbol,
                sec_type="FUT",
                currency="EUR" if exchange == "EUREX" else "USD",
                exchange=exchange,
                local_symbol=local,
                trading_class=symbol,
                multiplier=multiplier,
                last_trade_date=expiry,
                quantity=Decimal(sign * rng.randint(1, 5)),
                average_cost=price * Decimal(multiplier),
            )
        right = rng.choice("CP")
        strike = price.quantize(Decimal(1))
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="FOP",
            currency="EUR" if exchange == "EUREX" else "USD",
            exchange=exchange,
            local_symbol=f"{local} {right}{strike}",
            trading_class=f"{symbol}W" if symbol in ("ES", "NQ") else symbol,
            multiplier=multiplier,
            last_trade_date=expiry,
            strike=strike,
            right=right,
            quantity=Decimal(sign * rng.randint(1, 10)),
            average_cost=_money(rng, "2500", spread=0.9, places=2),
        )
    if sec_type == "CASH":
        base_ccy, quote_ccy, rate = rng.choice(_FX)
        pair = f"{base_ccy}.{quote_ccy}"
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=base_ccy,
            sec_type="CASH",
            currency=quote_ccy,
            exchange="IDEALPRO",
            local_symbol=pair,
            trading_class=pair,
            quantity=Decimal(sign * rng.randint(1, 500) * 1000),
            average_cost=_money(rng, rate, spread=0.03, places=5),
        )
    if sec_type == "BOND":
        coupon = rng.choice(("1 1/2", "2 1/4", "3 7/8", "4 1/8"))
        maturity = _expiry(rng)
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=f"US912828{rng.randint(10, 99)}{rng.choice('ABCDEFGH')}{rng.randint(10, 99)}",
            sec_type="BOND",
            exchange="SMART",
            local_symbol=f"T {coupon} {maturity[4:6]}/{maturity[6:]}/{maturity[2:4]}",
            trading_class="GOVT",
            quantity=Decimal(rng.randint(1, 50) * 1000),
            average_cost=_money(rng, "97.5", spread=0.05, places=4) / 100,  # per 1 of face
        )
    if sec_type == "CFD":
        symbol, exchange, currency, trading_class, base = rng.choice(_EU_STOCKS)
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="CFD",
            currency=currency,
            exchange="SMART",
            local_symbol=symbol,
            trading_class=trading_class,
            quantity=Decimal(sign * rng.randint(1, 300)),
            average_cost=_money(rng, base),
        )
    if sec_type == "WAR":
        symbol = rng.choice(("DAI", "BMW", "ALV", "BAS"))
        expiry = _expiry(rng)
        right = rng.choice("CP")
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="WAR",
            currency="EUR",
            exchange="FWB",
            local_symbol=f"DE000{rng.choice(('HV', 'SU', 'VU'))}{rng.randint(1000000, 9999999)}",
            trading_class=f"{symbol}W",
            multiplier=rng.choice(("0.1", "0.01", "1")),
            last_trade_date=expiry,
            strike=Decimal(rng.randint(40, 120)),
            right=right,
            quantity=Decimal(rng.randint(1, 50) * 100),
            average_cost=_money(rng, "0.85", spread=0.5, places=4),
        )
    if sec_type == "FUND":
        symbol = rng.choice(("VFIAX", "FXAIX", "SWPPX", "VTSAX"))
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="FUND",
            exchange="FUNDSERV",
            local_symbol=symbol,
            trading_class="FUND",
            quantity=Decimal(rng.randint(1, 10**7)) / 10**4,
            average_cost=_money(rng, "450", spread=0.2, places=4),
        )
    if sec_type == "CRYPTO":
        symbol, base = rng.choice(_CRYPTO)
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="CRYPTO",
            exchange="PAXOS",
            local_symbol=f"{symbol}.USD",
            trading_class=symbol,
            quantity=Decimal(rng.randint(1, 10**9)) / 10**8,
            average_cost=_money(rng, base, places=2),
        )
    if sec_type == "IND":
        # Index "positions" do not exist at IB; they appear here only as a decoding edge
        # case (ib_insync maps IND to its Index class) and always with a tiny quantity.
        symbol, exchange = rng.choice(_INDEXES)
        return SimPosition(
            account=account,
            con_id=con_id,
            symbol=symbol,
            sec_type="IND",
            currency="EUR" if exchange == "EUREX" else "USD",
            exchange=exchange,
            local_symbol=symbol,
            trading_class=symbol,
            quantity=Decimal(1),
            average_cost=Decimal(0),
        )
    raise PortfolioError(f"unsupported sec_type {sec_type!r}")


# STK dominates real portfolios; the others still appear in every generated set.
_WEIGHTS = {
    "STK": 50,
    "OPT": 18,
    "FUT": 5,
    "FOP": 5,
    "CASH": 4,
    "BOND": 4,
    "CFD": 4,
    "WAR": 3,
    "FUND": 3,
    "CRYPTO": 3,
    "IND": 1,
}


def generate_portfolio(
    n: int,
    accounts: int | Iterable[str] = 2,
    seed: int = 0,
    *,
    first_con_id: int = 100_000_000,
    empty_accounts: int = 0,
) -> Portfolio:
    """Generate ``n`` realistic positions spread over ``accounts`` accounts.

    Deterministic for a given ``seed`` (benchmarks compare like with like), fast enough
    for 50,000 positions, and every sec type in ``SEC_TYPES`` appears once ``n`` reaches
    ``len(SEC_TYPES)``. Con ids are unique across the whole portfolio (a random stride
    keeps them realistic-looking). ``accounts`` is a count (ids ``DU1000001``...) or an
    explicit list; ``empty_accounts`` adds managed accounts without positions.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if isinstance(accounts, int):
        if accounts < 1:
            raise ValueError("accounts must be >= 1")
        account_ids = [f"DU{1_000_001 + i:07d}" for i in range(accounts)]
    else:
        account_ids = list(accounts)
        if not account_ids:
            raise ValueError("accounts must not be empty")
    extra = [f"DU{9_000_001 + i:07d}" for i in range(empty_accounts)]
    rng = random.Random(seed)
    types = list(_WEIGHTS)
    weights = list(_WEIGHTS.values())
    sec_types = list(SEC_TYPES[: min(n, len(SEC_TYPES))])
    if n > len(sec_types):
        sec_types += rng.choices(types, weights=weights, k=n - len(sec_types))
    positions = []
    con_id = first_con_id
    for index, sec_type in enumerate(sec_types):
        con_id += rng.randint(1, 997)
        account = account_ids[index % len(account_ids)]
        positions.append(_generate_one(rng, sec_type, account, con_id))
    return Portfolio(accounts=account_ids + extra, positions=positions)
