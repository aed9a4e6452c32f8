"""USDT perpetuals: funding, margin and liquidation under Bybit's published rules.

Pure functions and small frozen types, shared by the simulated exchange, the replay, the
fast path and risk, so that each computes the same numbers.

Funding (Bybit "Funding Fee Calculation"): at each funding time (every 8 h, 00:00, 08:00
and 16:00 UTC for BTCUSDT) a position pays `position value x funding rate`, value at the
mark price; longs pay shorts when the rate is positive, shorts pay longs when negative.
In candle replays the mark at a funding time is the close of the candle that closes at
(or contains) it, and a position pays when it is held at that candle's close, before any
fill placed at that close: a position opened at time E and closed at X pays for the
funding times T with E < T <= X.

Margin (Bybit "Liquidation Price (USDT Contract)", "Margin Parameters"):

* position value `PV = qty x entry`; initial margin `IM = PV / leverage` (isolated);
* maintenance margin `MM = PV x MMR - deduction`, MMR and deduction from the risk-limit
  tier the position value falls in (BTCUSDT's first tier: up to 2,000,000 USDT, MMR
  0.5 %, deduction 0, up to 100x);
* liquidation price, long: `entry - (margin - MM) / qty`; short: `entry + (margin - MM) / qty`,
  where margin is the isolated position margin (IM plus margin added), or under cross
  margin the wallet balance less the fee to close (`cross_margin`; Bybit's cross formula
  for one position in the account);
* bankruptcy price (0 % margin left): long `entry - margin / qty`, short `entry + margin / qty`.

Liquidation: when the mark reaches the liquidation price the position is closed, and the
trader loses the whole position margin: Bybit settles it at the bankruptcy price and the
margin left between the two prices goes to the insurance fund. We record the exit at the
liquidation price and charge that remainder, `qty x |liquidation - bankruptcy|`, plus
Bybit's fee to close (the taker fee on the value at the bankruptcy price) as the
liquidation fee; the loss is then the margin plus the taker fee to close, as on Bybit.
Assumption: the insurance-fund remainder is charged in full (Bybit keeps it whenever the
liquidation engine closes at or better than bankruptcy, the normal case). Bybit's unified
account adds the estimated fee to close to both the initial and the maintenance margin of
an isolated position, which leaves the liquidation price unchanged; entries reserve it
through the order cost (`unit_cost`).

Candle replays have no mark price: the mark is the candle's price, so a long is
liquidated when a candle's low reaches its liquidation price (a short: the high).
Bybit's mark (an index-based fair price) wicks less than the last trade, so a backtest
liquidates a little more readily than the exchange would: the conservative side.
"""

from __future__ import annotations

import bisect
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from error_handler import DataError
from models import PositionSide


ZERO = Decimal(0)
FUNDING_INTERVAL_MS = 8 * 3_600_000
FUNDING_FILE_NAMES = ("funding.csv", "funding.csv.gz")


@dataclass(frozen=True, slots=True)
class RiskTier:
    """One risk-limit tier: positions valued up to `limit` use these margin rates."""

    limit: Decimal
    mmr: Decimal
    max_leverage: Decimal
    deduction: Decimal = ZERO


# BTCUSDT's first tier is Bybit's published one (up to 2,000,000 USDT of value, MMR 0.5 %,
# 100x). The further tiers are an assumption in the shape Bybit publishes (MMR steps of
# 0.5 %; the limits here are illustrative, Bybit changes them): their deductions follow
# "Margin Parameters" (the previous limit x the MMR step + the previous deduction), which
# keeps the maintenance margin continuous. ETHUSDT shares the table (first tier 0.5 % too).
BTCUSDT_TIERS = (
    RiskTier(Decimal(2_000_000), Decimal("0.005"), Decimal(100)),
    RiskTier(Decimal(2_600_000), Decimal("0.01"), Decimal(50), Decimal(10_000)),
    RiskTier(Decimal(3_200_000), Decimal("0.015"), Decimal("33.33"), Decimal(23_000)),
)
# Other pairs without a table: one tier at 1 % MMR (Bybit's usual first tier for altcoins).
DEFAULT_TIERS = (RiskTier(Decimal(1_000_000), Decimal("0.01"), Decimal(50)),)
_TIERS = {"BTC": BTCUSDT_TIERS, "ETH": BTCUSDT_TIERS}


def risk_tiers(pair: str) -> tuple[RiskTier, ...]:
    """Return the risk-limit tiers of a USDT perpetual (`BTC/USDT:USDT`)."""
    return _TIERS.get(pair.split("/")[0], DEFAULT_TIERS)


def tier_for(pair: str, value: Decimal) -> RiskTier:
    """Return the tier a position of `value` (quote) falls in; the last beyond the table."""
    tiers = risk_tiers(pair)
    for tier in tiers:
        if value <= tier.limit:
            return tier
    return tiers[-1]


def maintenance_margin(pair: str, value: Decimal) -> Decimal:
    """Return the maintenance margin of a position of `value`: `value x MMR - deduction`."""
    tier = tier_for(pair, value)
    return max(value * tier.mmr - tier.deduction, ZERO)


def isolated_margin(entry: Decimal, qty: Decimal, leverage: Decimal) -> Decimal:
    """Return the initial margin of an isolated position: `qty x entry / leverage`."""
    return qty * entry / leverage


def cross_margin(
    balance: Decimal, side: PositionSide, entry: Decimal, qty: Decimal, taker_fee: Decimal
) -> Decimal:
    """Return the margin a cross-margin balance puts behind one position (fee to close out).

    Bybit reserves the fee to close (at the bankruptcy price) out of the margin, so the
    margin `m` that can be lost solves `m + fee x qty x (entry -+ m/qty) = balance`:
    `(balance - fee x value) / (1 -+ fee)` (long/short). Liquidated, the position then
    costs exactly the balance.
    """
    value = qty * entry
    if side is PositionSide.LONG:
        return (balance - taker_fee * value) / (1 - taker_fee)
    return (balance - taker_fee * value) / (1 + taker_fee)


def liquidation_price(
    side: PositionSide, entry: Decimal, qty: Decimal, margin: Decimal, pair: str = "BTC/USDT:USDT"
) -> Decimal:
    """Return the liquidation price of a position backed by `margin` (floored at 0).

    Long: `entry - (margin - MM) / qty`; short: `entry + (margin - MM) / qty`.
    """
    mm = maintenance_margin(pair, qty * entry)
    room = (margin - mm) / qty
    price = entry - room if side is PositionSide.LONG else entry + room
    return max(price, ZERO)


def bankruptcy_price(side: PositionSide, entry: Decimal, qty: Decimal, margin: Decimal) -> Decimal:
    """Return the price at which `margin` is lost entirely (floored at 0)."""
    room = margin / qty
    return max(entry - room if side is PositionSide.LONG else entry + room, ZERO)


@dataclass(frozen=True, slots=True)
class Liquidation:
    """Where a position is liquidated and what the liquidation charges."""

    price: Decimal
    bankruptcy: Decimal
    fee: Decimal


def liquidation(
    side: PositionSide,
    entry: Decimal,
    qty: Decimal,
    margin: Decimal,
    taker_fee: Decimal,
    pair: str = "BTC/USDT:USDT",
) -> Liquidation:
    """Return the liquidation price, bankruptcy price and fee (see the module docstring)."""
    price = liquidation_price(side, entry, qty, margin, pair)
    bust = bankruptcy_price(side, entry, qty, margin)
    fee = qty * abs(price - bust) + qty * bust * taker_fee
    return Liquidation(price, bust, fee)


def unit_cost(price: Decimal, leverage: Decimal, fee: Decimal, side: PositionSide) -> Decimal:
    """Return the order cost of one unit: initial margin, fee to open and fee to close.

    Bybit's order cost: `price / leverage + price x fee + bankruptcy price x fee`, the
    bankruptcy price `price x (1 -+ 1/leverage)` (long/short). A balance spent this way
    loses exactly itself at liquidation. At 1x long: `price x (1 + fee)`, as on spot.
    """
    inverse = 1 / leverage
    bust = price * (1 - inverse) if side is PositionSide.LONG else price * (1 + inverse)
    return price * inverse + price * fee + bust * fee


def liquidation_veto(
    side: PositionSide, entry: Decimal, stop: Decimal, liquidation_at: Decimal, buffer: Decimal
) -> str | None:
    """Return why a stop is unsafe against the liquidation price, or None when it is safe.

    Unsafe: the stop lies at or beyond the liquidation price (the exchange would liquidate
    before it triggers), or outside the buffer: farther from the entry than `(1 - buffer)`
    of the entry-to-liquidation distance (a gap or slippage would liquidate instead).
    """
    long = side is PositionSide.LONG
    if (long and stop <= liquidation_at) or (not long and stop >= liquidation_at):
        return f"stop {stop} lies beyond the liquidation price {liquidation_at:.8g}"
    room = abs(entry - liquidation_at) * (1 - buffer)
    if abs(entry - stop) > room:
        return (
            f"stop {stop} leaves less than the {buffer:.0%} margin buffer before the"
            f" liquidation price {liquidation_at:.8g}"
        )
    return None


def liquidation_reason(liq: Liquidation) -> str:
    """Return the reason a liquidation's closing order and trade carry."""
    return f"liquidation: mark reached {liq.price} (bankruptcy {liq.bankruptcy}, fee {liq.fee:.8f})"


def funding_payment(signed_qty: Decimal, mark: Decimal, rate: Decimal) -> Decimal:
    """Return what a position pays at a funding time (negative: it receives).

    `signed_qty x mark x rate`: a long pays a positive rate, a short receives it.
    """
    return signed_qty * mark * rate


@dataclass(frozen=True, slots=True)
class FundingSchedule:
    """Recorded funding of one pair: funding times (ms UTC, increasing) and their rates."""

    times: np.ndarray
    rates: np.ndarray

    def __post_init__(self) -> None:
        if len(self.times) != len(self.rates):
            raise DataError("funding times and rates differ in length")
        if len(self.times) > 1 and not bool(np.all(np.diff(self.times) > 0)):
            raise DataError("funding times must be strictly increasing")

    @classmethod
    def of(cls, rows: Sequence[tuple[int, float]]) -> FundingSchedule:
        """Return the schedule of `(time ms, rate)` rows (sorted here)."""
        ordered = sorted(rows)
        return cls(
            np.array([int(t) for t, _ in ordered], dtype=np.int64),
            np.array([float(r) for _, r in ordered], dtype=np.float64),
        )

    def with_rows(self, rows: Sequence[tuple[int, float]]) -> FundingSchedule:
        """Return the schedule with `rows` added (a rate for a known time replaces it)."""
        merged = dict(zip(self.times.tolist(), self.rates.tolist(), strict=True))
        merged.update((int(t), float(r)) for t, r in rows)
        return FundingSchedule.of(list(merged.items()))

    def due(self, after: int, until: int) -> list[tuple[int, float]]:
        """Return the funding times in `(after, until]` with their rates."""
        lo = int(np.searchsorted(self.times, after, side="right"))
        hi = int(np.searchsorted(self.times, until, side="right"))
        return [(int(self.times[k]), float(self.rates[k])) for k in range(lo, hi)]

    def bars(self, close_ts: Sequence[int], step: int) -> list[tuple[int, float]]:
        """Return `(candle index, summed rate)` for the candles of `close_ts` with funding.

        The same candles and sums as `per_bar` (rates added in time order), for a stretch
        of consecutive candle close times.
        """
        if not len(close_ts):
            return []
        out: dict[int, float] = {}
        for t, rate in self.due(int(close_ts[0]) - step, int(close_ts[-1])):
            k = bisect.bisect_left(close_ts, t)
            if close_ts[k] - step < t:
                out[k] = out.get(k, 0.0) + rate
        return sorted(out.items())

    def per_bar(self, close_ts: np.ndarray, step: int) -> np.ndarray:
        """Return, per candle closing at `close_ts`, the funding rate settled in it (else 0).

        A candle `(close - step, close]` carries the funding times inside it; two in one
        candle (bars longer than 8 h) add their rates, settled at that candle's close.
        """
        out = np.zeros(len(close_ts), dtype=np.float64)
        if not len(close_ts) or not len(self.times):
            return out
        bar = np.searchsorted(close_ts, self.times, side="left")
        last = len(close_ts) - 1
        inside = (bar <= last) & (self.times > close_ts[np.minimum(bar, last)] - step)
        np.add.at(out, bar[inside], self.rates[inside])
        return out


def load_funding(path: Path | str) -> FundingSchedule:
    """Read a funding file: CSV (optionally gzipped) with the header `timestamp,funding_rate`.

    Timestamps in ms UTC (Bybit's `fundingRateTimestamp`); rates as fractions.

    Raises:
        DataError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"funding file not found: {path}", path=str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[tuple[int, float]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            header = handle.readline().strip().split(",")
            if header[:2] != ["timestamp", "funding_rate"]:
                raise DataError(
                    f"{path}: expected the header timestamp,funding_rate, got {header}",
                    path=str(path),
                )
            for line in handle:
                if line.strip():
                    ts, rate = line.strip().split(",")[:2]
                    rows.append((int(float(ts)), float(rate)))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read funding file {path}: {e}", path=str(path)) from e
    return FundingSchedule.of(rows)


def write_funding(path: Path, rows: Sequence[tuple[int, float]]) -> Path:
    """Write `(time ms, rate)` rows as a funding file (merged with what is there)."""
    known: dict[int, float] = {}
    if path.is_file():
        old = load_funding(path)
        known = dict(zip(old.times.tolist(), old.rates.tolist(), strict=True))
    known.update({int(t): float(r) for t, r in rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,funding_rate"] + [f"{t},{known[t]!r}" for t in sorted(known)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def funding_beside(candle_file: Path | str) -> Path | None:
    """Return the funding file kept beside a candle archive, if there is one.

    `<dir>/funding.csv[.gz]` in the archive's folder (the layout backfill writes), or for a
    sample named `<exchange>_<BASE-QUOTE>_<tf>.csv.gz` the file
    `<exchange>_<BASE-QUOTE>_funding.csv.gz` beside it or in its `bybit_wire/` folder.
    """
    path = Path(candle_file)
    for name in FUNDING_FILE_NAMES:
        if (path.parent / name).is_file():
            return path.parent / name
    stem = path.name.split(".")[0]
    prefix = stem.rsplit("_", 1)[0] if "_" in stem else stem
    for folder in (path.parent, path.parent / "bybit_wire"):
        candidate = folder / f"{prefix}_funding.csv.gz"
        if candidate.is_file():
            return candidate
    return None
