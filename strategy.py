"""Strategies: declared parameters, signal columns, and one Signal per closed candle.

A strategy computes boolean columns `enter_long`, `exit_long` (and, if it shorts,
`enter_short`, `exit_short`) over a candle frame using only causal indicators, so the
value at row *i* depends on rows <= *i* only. The same code serves the backtest fast path
(whole archive at once), the replay and live paths (`signal` on the rolling window's last
row), and the optimiser (parameter ranges).

Built-in strategies are `KernelStrategy` subclasses: their indicators are one numba
kernel that advances row by row from a small state vector. `populate` runs it over a
whole frame from a fresh state; `signal` runs it *incrementally*, feeding only the rows it
has not seen yet, so the replay computes bit-for-bit the values the fast path computes on
the full archive (no window-start effects in EMAs, Wilder averages or rolling sums) and
costs O(1) per candle. The kernels reproduce TA-Lib's recurrences (SMA, EMA, RSI, ADX), so
their values equal `talib`'s on the same data.

A user strategy is a `.py` file defining one `Strategy` subclass that implements
`populate`; its `signal` evaluates `populate` on the rolling window, which matches the fast
path exactly when its indicators depend on the last `warmup` rows only.
"""

from __future__ import annotations

import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from numba import njit

from error_handler import ConfigError
from models import Side, Signal
from strategy_exact import (
    INT_LIMIT as _INT_LIMIT,
)
from strategy_exact import (
    POW10 as _POW10,
)
from strategy_exact import (
    U as _U,
)
from strategy_exact import (
    decimals as _decimals,
)
from strategy_exact import (
    grid as _grid,
)
from strategy_exact import (
    ratio as _ratio,
)
from strategy_exact import (
    sign as _sign,
)
from strategy_exact import (
    tick_sum as _tick_sum,
)
from strategy_exact import (
    ticks as _ticks,
)


@dataclass(frozen=True, slots=True)
class Param:
    """A tunable parameter with its optimisation range.

    `choices`, when given, are the only values the parameter takes (e.g. a lookback among
    a few standard ones); the optimiser searches them as a choice variable.
    """

    default: float
    low: float
    high: float
    integer: bool = True
    step: float | None = None
    choices: tuple[float, ...] = ()

    def clip(self, value: float) -> float:
        """Return `value` within range, rounded for integer parameters (nearest choice)."""
        if self.choices:
            return float(min(self.choices, key=lambda c: (abs(c - value), c)))
        value = min(max(value, self.low), self.high)
        return float(round(value)) if self.integer else float(value)


SIGNAL_COLUMNS = ("enter_long", "exit_long", "enter_short", "exit_short")
OHLCV = ("open", "high", "low", "close", "volume")


class Strategy(ABC):
    """Base class: subclasses declare `name`, `parameters` and implement `populate`."""

    name: ClassVar[str] = "base"
    parameters: ClassVar[Mapping[str, Param]] = {}
    can_short: ClassVar[bool] = False

    def __init__(self, **params: float) -> None:
        unknown = set(params) - set(self.parameters)
        if unknown:
            raise ConfigError(
                f"strategy {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.parameters)}",
                component="strategy",
            )
        self.params: dict[str, float] = {
            key: spec.clip(float(params.get(key, spec.default)))
            for key, spec in self.parameters.items()
        }
        self.validate()

    def validate(self) -> None:  # noqa: B027 - an optional hook: most have no such rule
        """Check cross-parameter rules; raise ConfigError when broken."""

    @property
    def warmup(self) -> int:
        """Return how many candles the indicators need before signals are valid."""
        return int(max(self.params.values(), default=1)) * 3 + 1

    @abstractmethod
    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return a frame aligned with `df` holding the signal columns (and features)."""

    def entries_exits(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Return `enter_long` and `exit_long` over the whole frame as boolean arrays.

        The backtest fast path's input; rows before `warmup` are the caller's to ignore.
        """
        cols = self.populate(df)
        return _bool_column(cols, "enter_long"), _bool_column(cols, "exit_long")

    def last_row(self, pair: str, df: pd.DataFrame) -> dict[str, Any]:
        """Return the signal columns and features of the last row of `df`."""
        cols = self.populate(df)
        return {str(k): v for k, v in cols.iloc[-1].items()}

    def last_row_arrays(self, pair: str, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
        """Return the last row's columns from `(ts_ms, open, high, low, close, volume)`."""
        return self.last_row(pair, _frame(arrays))

    def signal(self, pair: str, df: pd.DataFrame, *, holding: bool) -> Signal | None:
        """Return the signal for the last (closed) candle of `df`, or None."""
        if len(df) < self.warmup:
            return None
        ts = int(df.index[-1].value // 1_000_000)
        return self._decide(pair, self.last_row(pair, df), ts, float(df["close"].iloc[-1]), holding)

    def signal_from_arrays(
        self, pair: str, arrays: Sequence[np.ndarray], *, holding: bool
    ) -> Signal | None:
        """Return the signal for the last candle of `(ts_ms, open, high, low, close, volume)`.

        The same decision as `signal`, without building a DataFrame per candle (the
        per-candle fast path for `DataManager.arrays`).
        """
        ts = arrays[0]
        if len(ts) < self.warmup:
            return None
        row = self.last_row_arrays(pair, arrays)
        return self._decide(pair, row, int(ts[-1]), float(arrays[4][-1]), holding)

    def _decide(
        self, pair: str, row: Mapping[str, Any], ts: int, price: float, holding: bool
    ) -> Signal | None:
        wants_exit = holding and bool(row.get("exit_long", False))
        wants_entry = not holding and bool(row.get("enter_long", False))
        if not (wants_exit or wants_entry):
            return None
        features = {
            k: float(v)
            for k, v in row.items()
            if k not in SIGNAL_COLUMNS and isinstance(v, int | float | np.floating)
        }
        if wants_exit:
            return Signal(
                pair,
                Side.SELL,
                1.0,
                f"{self.name}: exit",
                ts,
                price,
                self.name,
                exit_only=True,
                features=features,
            )
        return Signal(
            pair, Side.BUY, 1.0, f"{self.name}: entry", ts, price, self.name, features=features
        )

    def describe(self) -> dict[str, Any]:
        """Return name and parameters, for summaries."""
        return {"name": self.name, "params": dict(self.params)}


def _frame(arrays: Sequence[np.ndarray]) -> pd.DataFrame:
    index = pd.DatetimeIndex(
        np.asarray(arrays[0], dtype=np.int64).view("datetime64[ms]"), name="ts"
    ).tz_localize("UTC")
    return pd.DataFrame(dict(zip(OHLCV, arrays[1:6], strict=True)), index=index)


def _bool_column(cols: pd.DataFrame, name: str) -> np.ndarray:
    if name not in cols:
        return np.zeros(len(cols), dtype=np.bool_)
    values: np.ndarray = np.ascontiguousarray(cols[name].to_numpy(dtype=np.bool_, na_value=False))
    return values


# -- Kernel strategies -----------------------------------------------------------------------

# A kernel advances rows [start, n) of the OHLCV arrays from `state` (updated in place),
# writing enter/exit flags and, when `feats` has rows, the feature columns. It may read
# up to `lookback` rows before `start`; `state[0]` counts the rows consumed so far.
Kernel = Callable[..., None]


@dataclass(slots=True)
class _Stream:
    """Incremental indicator state of one pair (private)."""

    state: np.ndarray
    last_ts: int = -(2**62)
    row: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class KernelCarry:
    """What a kernel pass leaves for the next frame of the same pair (`populate_chunks`).

    `state`: the kernel's state after the last row (advanced in place); `context`: the last
    `lookback` rows (open, high, low, close, volume), which the next rows may read; `rows`:
    how many rows the passes took so far (the warm-up is counted from the first).
    """

    state: np.ndarray
    context: tuple[np.ndarray, ...] | None = None
    rows: int = 0


class KernelStrategy(Strategy):
    """A strategy whose indicators are a numba kernel run incrementally per pair."""

    features: ClassVar[tuple[str, ...]] = ()
    kernel: ClassVar[Kernel]
    state_size: ClassVar[int] = 8

    def __init__(self, **params: float) -> None:
        super().__init__(**params)
        self._streams: dict[str, _Stream] = {}
        self._param_array = np.array([self.params[k] for k in self.parameters], dtype=np.float64)

    @property
    def lookback(self) -> int:
        """Return how many rows before a new row the kernel reads (0 = pure recursion)."""
        return 0

    def _fresh_state(self) -> np.ndarray:
        return np.zeros(self.state_size, dtype=np.float64)

    def _run(
        self, arrays: tuple[np.ndarray, ...], start: int, state: np.ndarray, *, features: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(arrays[3])
        enter = np.zeros(n, dtype=np.bool_)
        exit_ = np.zeros(n, dtype=np.bool_)
        feats = np.full((n if features else 0, max(len(self.features), 1)), np.nan)
        type(self).kernel(*arrays, start, state, self._param_array, enter, exit_, feats)
        return enter, exit_, feats

    def entries_exits(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Return `enter_long` and `exit_long` over the whole frame (fresh state)."""
        enter, exit_, _ = self._run(_arrays(df), 0, self._fresh_state(), features=False)
        return enter, exit_

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return the signal columns and features over the whole frame (fresh state)."""
        enter, exit_, feats = self._run(_arrays(df), 0, self._fresh_state(), features=True)
        data: dict[str, np.ndarray] = {"enter_long": enter, "exit_long": exit_}
        for j, name in enumerate(self.features):
            data[name] = feats[:, j]
        return pd.DataFrame(data, index=df.index)

    def populate_chunks(
        self, df: pd.DataFrame, rows: int = 1 << 18, carry: KernelCarry | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield `populate`'s rows `rows` at a time: (first row, enter, exit, features).

        One pass of the kernel over the frame, its state carried from chunk to chunk and
        `lookback` rows of context before each, as the live path advances it: the rows
        are `populate`'s, and a long archive never holds its columns whole (a backtest of
        ten million candles would hold 18 bytes a candle per feature, then a frame of them).

        With `carry`, the frame continues the rows a previous call took (a backtest that
        replays its archive a segment at a time): the kernel goes on from the state and the
        last `lookback` rows that call left in `carry`, and leaves its own there. The rows
        are those of one pass over the frames joined.
        """
        arrays = _arrays(df)
        look = self.lookback
        state = self._fresh_state() if carry is None else carry.state
        offset = 0
        if carry is not None and carry.context is not None:
            offset = len(carry.context[0])
            arrays = tuple(np.concatenate(cols) for cols in zip(carry.context, arrays, strict=True))
        n = len(arrays[3])
        for first in range(offset, n, max(1, rows)):
            begin = max(0, first - look)
            part = tuple(a[begin : first + rows] for a in arrays)
            enter, exit_, feats = self._run(part, first - begin, state, features=True)
            skip = first - begin
            yield first - offset, enter[skip:], exit_[skip:], feats[skip:]
        if carry is not None:  # the state went on in place; the context: the last rows
            carry.context = tuple(a[max(0, n - look) :].copy() for a in arrays) if look else None
            carry.rows += n - offset

    def carry(self) -> KernelCarry:
        """Return a fresh carry for `populate_chunks` over consecutive frames of one pair."""
        return KernelCarry(self._fresh_state())

    def last_row(self, pair: str, df: pd.DataFrame) -> dict[str, Any]:
        """Return the last row's columns, consuming only the rows not seen before."""
        ts = df.index.as_unit("ms").asi8
        return self._advance(pair, ts, _arrays(df))

    def last_row_arrays(self, pair: str, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
        """Return the last row's columns, consuming only the rows not seen before."""
        stream = self._streams.get(pair)
        if stream is not None and stream.row and int(arrays[0][-1]) == stream.last_ts:
            return stream.row  # computed ahead (a burst's pass) or asked again
        cols = tuple(np.ascontiguousarray(a, dtype=np.float64) for a in arrays[1:6])
        return self._advance(pair, np.asarray(arrays[0], dtype=np.int64), cols)

    def next_row_state(self, pair: str, ts: np.ndarray, behind: int = 1) -> np.ndarray | None:
        """Return the pair's state if `ts` ends with exactly one row it has not consumed.

        `ts`: the window's last `lookback` + 1 open times (or more). None otherwise (then
        `last_row_arrays` advances it alone). See `batch_signals`: it advances the state
        in place, then calls `set_row`. `behind` 0: if it has consumed every row (a
        rehearsal runs the kernel on a copy of it, `batch_signals.rehearse_many`).
        """
        stream = self._streams.get(pair)
        if stream is None or not stream.row or len(ts) < max(self.lookback + 1, 2):
            return None
        last = int(ts[-1])
        return stream.state if int(ts[-1 - behind]) == stream.last_ts <= last - behind else None

    def set_row(self, pair: str, last_ts: int, row: dict[str, Any]) -> None:
        """Record `row` as the pair's last row at `last_ts` (its state advanced in place)."""
        stream = self._streams[pair]
        stream.last_ts, stream.row = last_ts, row

    def reset(self, pair: str | None = None) -> None:
        """Forget the incremental state of one pair (or all)."""
        if pair is None:
            self._streams.clear()
        else:
            self._streams.pop(pair, None)

    def _advance(self, pair: str, ts: np.ndarray, arrays: tuple[np.ndarray, ...]) -> dict[str, Any]:
        # The pair's state carries on from the previous call. When the window no longer
        # overlaps what was seen (a gap longer than the window) or time went backwards (a
        # new run), the state restarts from the window's first row, as a fresh bot would.
        stream = self._streams.get(pair)
        last = int(ts[-1])
        if stream is not None and last == stream.last_ts and stream.row:
            return stream.row
        start = 0
        if stream is not None:
            start = int(np.searchsorted(ts, stream.last_ts, side="right"))
            seen = int(stream.state[0])
            overlaps = start > 0 and ts[start - 1] == stream.last_ts
            if last < stream.last_ts or not overlaps or start < min(self.lookback, seen):
                stream = None
                start = 0
        if stream is None:
            stream = self._streams[pair] = _Stream(self._fresh_state())
        enter, exit_, feats = self._run(arrays, start, stream.state, features=True)
        row: dict[str, Any] = {"enter_long": bool(enter[-1]), "exit_long": bool(exit_[-1])}
        for j, name in enumerate(self.features):
            row[name] = float(feats[-1, j])
        stream.last_ts = last
        stream.row = row
        return row


def _arrays(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(df[c].to_numpy(dtype=np.float64)) for c in OHLCV)


# TA-Lib's TA_IS_ZERO tolerance, used by its RSI and ADX.
_ZERO_EPS = 1e-8

# RSI and ADX are ratios of Wilder-smoothed sums whose exact denominators grow every bar, so
# their thresholds are decided with a tie band instead: a value within `_INDEX_TIE` points
# of its threshold is a tie (neither below nor above it; "at least" holds).
# Why float error cannot cross the band: every change, directional move or true range that
# enters a smoothed sum is a difference of two decimal prices, off by at most u(2P + |it|)
# in float (P the largest price, u = 2^-53), i.e. by r = (2P/tick + 1)u relative, as a
# nonzero one is at least a tick; the smoothing only averages (it adds 3u per bar, at most
# 3nu relative once contracted), so each sum is off by at most r' = r + 3nu relative. RSI =
# 100 g / (g + l) is then off by at most 50 r' points, DX = 100 |p - m| / (p + m) of DI
# ratios by at most 400 r' and ADX, their average, likewise: below 1e-6 points for P/tick
# up to 1e7 (a 100000 price on a 0.01 tick) and n <= 400. So an exact tie always lands
# inside the band, and only an index within that error of the band's edge, far from any
# tie, could be decided otherwise than exactly. A band of 1e-5 points is far below what one
# tick moves either index.
_INDEX_TIE = 1e-5

# EMAs are ratios whose exact denominators, (n + 1)^t, grow every bar, so the EMA cross is
# decided with a relative tie band: |fast - slow| <= `_EMA_TIE` max(|fast|, |slow|) is a tie
# (neither above nor below). Why float error cannot cross the band: each EMA step
# prev + k (x - prev) rounds the decimal close, the subtraction, the product and the sum,
# at most 4u of the magnitudes involved (u = 2^-53), and the recursion contracts an error
# by 1 - k per bar, so an EMA is off by at most 4u/k = 2(n + 1)u times the largest recent
# price it averages (the SMA seed, n sums and a division, by less); with n <= 400 that is
# below 1e-13 relative for either EMA, 2e-13 for their difference, fifty times inside the
# band. So an exact tie (flat prices, or averages that meet exactly) always lands inside
# the band, and only a difference within that error of the band's edge, far from any tie,
# could be decided otherwise than exactly. 1e-11 of the price is far below any tick.
_EMA_TIE = 1e-11


@njit(cache=True)
def _sma_exact_side(c, i, nf, ns):  # type: ignore[no-untyped-def]
    # The sign of SMA(nf) - SMA(ns) at row i in the window's ticks, or NaN off any grid:
    # fast - slow = (ns * sum_fast - nf * sum_slow) / (nf * ns).
    d = _grid(c, i - ns + 1, i + 1, float(nf * ns))
    if d < 0:
        return np.nan
    return _sign(ns * _tick_sum(c, i - nf + 1, i + 1, d), nf * _tick_sum(c, i - ns + 1, i + 1, d))


@njit(cache=True)
def _sma_cross_kernel(  # type: ignore[no-untyped-def]
    o, h, lo, c, v, start, state, params, enter, exit_, feats
):
    # state: count, fast running total, slow running total, previous fast - slow (its sign
    # exact), and the sum of the slow totals (which bounds the rounding drift).
    # The running totals follow TA-Lib's SMA exactly (add, emit, subtract the trailing).
    nf = int(params[0])
    ns = int(params[1])
    count = int(state[0])
    tot_f = state[1]
    tot_s = state[2]
    prev = state[3]
    drift = state[4]
    drift_step = 8.0 * _U / nf
    want = feats.shape[0] > 0
    if count == 0:
        prev = np.nan
    for i in range(start, c.shape[0]):
        x = c[i]
        tot_f += x
        tot_s += x
        # Each add and subtract rounds by at most u times the total. For positive prices
        # the total after the subtract is below the one after the add and the fast total
        # below the slow one, so 4u times the sum of the slow totals bounds both drifts
        # (`drift` holds that bound over nf, doubled for safety).
        drift += tot_s * drift_step
        fast = np.nan
        if count >= nf - 1:
            fast = tot_f / nf
            tot_f -= c[i - nf + 1]
        slow = np.nan
        if count >= ns - 1:
            slow = tot_s / ns
            tot_s -= c[i - ns + 1]
        # The float difference decides unless it is within its error bound: the totals'
        # drift, plus 4u per side for the decimal-to-double rounding of the closes, the
        # divisions and the subtraction; near a tie |fast| + |slow| < 2|slow| + the bound, so
        # 16u|slow| (doubled) covers those. A near-tie is decided in exact ticks.
        diff = fast - slow
        if abs(diff) <= drift + 32.0 * _U * abs(slow):
            exact = _sma_exact_side(c, i, nf, ns)
            if not np.isnan(exact):
                diff = exact
        # NaN compares false, so no crossing is reported before both averages exist.
        enter[i] = diff > 0 and prev <= 0
        exit_[i] = diff < 0 and prev >= 0
        if want:
            feats[i, 0] = fast
            feats[i, 1] = slow
        prev = diff
        count += 1
    state[0] = count
    state[1] = tot_f
    state[2] = tot_s
    state[3] = prev
    state[4] = drift


class SmaCross(KernelStrategy):
    """Long when the fast SMA crosses above the slow SMA; exit on the cross back down.

    The parity reference against backtesting.py and vectorbt. A cross needs the previous
    bar at or on the other side (`fast[i-1] <= slow[i-1]` and `fast[i] > slow[i]`), with
    the averages compared as the decimal closes decide (an exact tie is equal, whatever
    the float sums say).
    """

    name = "sma_cross"
    parameters: ClassVar[Mapping[str, Param]] = {
        "fast": Param(10, 2, 100),
        "slow": Param(30, 5, 400),
    }
    features = ("sma_fast", "sma_slow")
    kernel = staticmethod(_sma_cross_kernel)
    state_size = 5

    def validate(self) -> None:
        """Require fast < slow."""
        if self.params["fast"] >= self.params["slow"]:
            raise ConfigError("sma_cross: fast must be below slow", component="strategy")

    @property
    def warmup(self) -> int:
        """Return the slow period plus one (SMA is exact once the window is full)."""
        return int(self.params["slow"]) + 1

    @property
    def lookback(self) -> int:
        """Return the slow period (the trailing value leaves the running sum)."""
        return int(self.params["slow"])


@njit(cache=True)
def _ema_step(x, count, n, acc, prev):  # type: ignore[no-untyped-def]
    # TA-Lib EMA: seeded with the SMA of the first n values, then prev + k (x - prev).
    if count < n:
        acc += x
        if count == n - 1:
            prev = acc / n
            return prev, acc, prev
        return np.nan, acc, prev
    prev = (x - prev) * (2.0 / (n + 1)) + prev
    return prev, acc, prev


@njit(cache=True)
def _ema_adx_kernel(  # type: ignore[no-untyped-def]
    o, h, lo, c, v, start, state, params, enter, exit_, feats
):
    # state: 0 count, 1-2 fast acc/prev, 3-4 slow acc/prev, 5-7 previous high/low/close,
    # 8 +DM, 9 -DM, 10 TR (Wilder sums), 11 sum of DX, 12 ADX, 13 previous side of the
    # EMAs (1 above, -1 below, 0 tied, NaN before both exist), 14 unused.
    nf = int(params[0])
    ns = int(params[1])
    n = int(params[2])
    adx_min = params[3] - _INDEX_TIE  # a tie is "at least"
    want = feats.shape[0] > 0
    count = int(state[0])
    if count == 0:
        state[13] = np.nan
    for i in range(start, c.shape[0]):
        fast, state[1], state[2] = _ema_step(c[i], count, nf, state[1], state[2])
        slow, state[3], state[4] = _ema_step(c[i], count, ns, state[3], state[4])
        adx = _adx_step(h[i], lo[i], c[i], count, n, state)
        trend_ok = (0.0 if np.isnan(adx) else adx) >= adx_min
        # EMAs within the tie band of each other are tied (see `_EMA_TIE`); NaN until both
        # exist, which compares false, so no crossing is reported before.
        diff = fast - slow
        band = _EMA_TIE * max(abs(fast), abs(slow))
        side = np.nan
        if diff == diff:
            side = 1.0 if diff > band else (-1.0 if diff < -band else 0.0)
        prev = state[13]
        enter[i] = (side > 0.0) & (prev <= 0.0) & trend_ok
        exit_[i] = (side < 0.0) & (prev >= 0.0)
        if want:
            feats[i, 0] = fast
            feats[i, 1] = slow
            feats[i, 2] = adx
        state[13] = side
        count += 1
        state[0] = count


@njit(cache=True)
def _dm_exact_gap(high, prev_high, low, prev_low, fallback):  # type: ignore[no-untyped-def]
    # The sign of (high - prev_high) - (prev_low - low) in ticks of the four prices' decimal
    # grid, or `fallback` off any grid.
    d = 0
    top = 0.0
    for x in (high, prev_high, low, prev_low):
        d = _decimals(x, d)
        if d < 0:
            return fallback
        top = max(top, abs(x))
    if top * _POW10[d] * 4.0 >= _INT_LIMIT:
        return fallback
    return _sign(_ticks(high, d) + _ticks(low, d), _ticks(prev_high, d) + _ticks(prev_low, d))


@njit(cache=True)
def _adx_step(high, low, close, count, n, state):  # type: ignore[no-untyped-def]  # noqa: C901
    # One function on purpose: split into helpers (inlined or not) the ema_cross kernel
    # measured twice as slow (200k bars: 4.8 ms -> 9.7 ms).
    # TA-Lib ADX: n-1 bars of plain sums, n bars of Wilder smoothing summing DX, then the
    # ADX recursion; the first value is at row 2n-1.
    if count == 0:
        state[5] = high
        state[6] = low
        state[7] = close
        return np.nan
    prev_high = state[5]
    prev_low = state[6]
    diff_p = high - prev_high
    diff_m = prev_low - low
    state[5] = high
    state[6] = low
    tr = high - low
    tr = max(tr, abs(high - state[7]))
    tr = max(tr, abs(low - state[7]))
    state[7] = close
    if count >= n:
        state[8] -= state[8] / n
        state[9] -= state[9] / n
    # Which move is larger is decided as the decimal prices decide it: an exact tie of the
    # two moves counts for neither (TA-Lib breaks it by the float differences' last bits).
    # The signs of the moves are exact already (a difference of doubles has the sign of
    # the decimals'); the float gap is off by at most 2u per price, 4u of them, doubled.
    gap = diff_p - diff_m
    if abs(gap) <= 8.0 * _U * (abs(high) + abs(prev_high) + abs(low) + abs(prev_low)):
        gap = _dm_exact_gap(high, prev_high, low, prev_low, gap)
    if diff_m > 0 and gap < 0:
        state[9] += diff_m
    elif diff_p > 0 and gap > 0:
        state[8] += diff_p
    if count < n:
        state[10] += tr
        return np.nan
    state[10] = state[10] - state[10] / n + tr
    dx = np.nan
    if not (-_ZERO_EPS < state[10] < _ZERO_EPS):
        minus_di = 100.0 * (state[9] / state[10])
        plus_di = 100.0 * (state[8] / state[10])
        total = minus_di + plus_di
        if not (-_ZERO_EPS < total < _ZERO_EPS):
            dx = 100.0 * (abs(minus_di - plus_di) / total)
    if count < 2 * n:
        if not np.isnan(dx):
            state[11] += dx
        if count == 2 * n - 1:
            state[12] = state[11] / n
            return state[12]
        return np.nan
    if not np.isnan(dx):
        state[12] = (state[12] * (n - 1) + dx) / n
    return state[12]


class EmaCross(KernelStrategy):
    """Long on a fast/slow EMA crossover when ADX confirms a trend; exit on the cross back.

    With `adx_min` = 0 the ADX filter is off. EMAs within `_EMA_TIE` (relative) of each
    other are tied, and an ADX within `_INDEX_TIE` points of `adx_min` meets it, so a tie
    the decimal prices make is never decided by float noise.
    """

    name = "ema_cross"
    parameters: ClassVar[Mapping[str, Param]] = {
        "fast": Param(12, 2, 100),
        "slow": Param(26, 5, 400),
        "adx_period": Param(14, 5, 50),
        "adx_min": Param(20, 0, 50),
    }
    features = ("ema_fast", "ema_slow", "adx")
    kernel = staticmethod(_ema_adx_kernel)
    state_size = 15

    def validate(self) -> None:
        """Require fast < slow."""
        if self.params["fast"] >= self.params["slow"]:
            raise ConfigError("ema_cross: fast must be below slow", component="strategy")

    @property
    def warmup(self) -> int:
        """Return enough candles for the EMAs to converge (about 4x the slow period)."""
        return int(max(self.params["slow"], self.params["adx_period"] * 2)) * 4


@njit(cache=True)
def _band_exact(c, i, n, k_num, k_den, above, below):  # type: ignore[no-untyped-def]
    # `_band_sides` in int64 ticks of the window's decimal grid; off any grid, or when
    # (den^2 + num^2) S^2 or num^2 n Q could leave int64, the float answers stand.
    d = _grid(c, i - n + 1, i + 1, 2.0)
    if d < 0 or k_den <= 0:
        return above, below
    tx = _ticks(c[i], d)
    s = np.int64(0)
    q = np.int64(0)
    top = np.int64(0)
    for j in range(i - n + 1, i + 1):
        dj = _ticks(c[j], d) - tx
        top = max(top, abs(dj))
        s += dj
        q += dj * dj
    scale = float(k_den) ** 2 + float(k_num) ** 2
    if scale * float(n) ** 2 * float(top) ** 2 >= _INT_LIMIT:
        return above, below
    return s < 0, s > 0 and (k_den * k_den + k_num * k_num) * s * s > k_num * k_num * n * q


@njit(cache=True, inline="always")
def _band_sides(c, i, n, kk, k_num, k_den, tol2, cg, s_f, q_f):  # type: ignore[no-untyped-def]
    # Whether x = c[i] is above the middle band and below the lower band of c[i-n+1 : i+1].
    # With d_j = c_j - x, S = sum d_j = n (mid - x) and Q = sum d_j^2, the population
    # variance is (nQ - S^2) / n^2, so
    #   x > mid    <=>  S < 0
    #   x < lower  <=>  S > 0 and G = (1 + k^2) S^2 - k^2 n Q > 0.
    # Float error: each d_j is off its decimal value by at most 2u(|c_j| + |x|) (the two
    # decimal-to-double roundings and the subtraction). With m = max|d_j| and
    # a = n (2|x| + m) >= sum(|c_j| + |x|): |S - S_f| <= (n + 1)u a, and
    # |Q - Q_f| <= 4u m a + (n + 1)u Q_f + 8n(ua)^2; doubled, with tol = 2(n + 2)u, those are
    # tol a and tol (2 m a + Q_f) + 16n(ua)^2. As |S_f| <= n m <= a and Q_f <= n m^2 <= a^2,
    # the first is at most tol a, the second at most 4 tol a^2, and G's error (from S's,
    # Q's, and 8u of its own terms for k^2's rounding and the products), doubled, at most
    # 2 tol (3 (1 + k^2) + 5 k^2 n) a^2 = cg a^2 (using u / tol <= 1/14). Finally
    # a^2 <= 2 n^2 (4 x^2 + m^2) and m^2 <= 1.001 Q_f. Bounds in squares need no root.
    # A sign within its bound is decided in int64 ticks (`_band_exact`).
    x = c[i]
    a2 = 2.0 * n * n * (4.0 * x * x + 1.001 * q_f)
    g_f = (1.0 + kk) * s_f * s_f - kk * n * q_f
    # Branch-free up to the (rare) near-tie: these signs flip at random bar to bar.
    above = s_f < 0.0
    below = (s_f > 0.0) & (g_f > 0.0)
    near_s = s_f * s_f <= tol2 * a2
    if near_s | ((s_f > 0.0) & (abs(g_f) <= cg * a2)):
        return _band_exact(c, i, n, k_num, k_den, above, below)
    return above, below


@njit(cache=True, inline="always")
def _rsi_step(x, count, n_rsi, state):  # type: ignore[no-untyped-def]
    # TA-Lib RSI: plain averages of the first n changes, then Wilder's smoothing. The
    # change is from the previous close (state 1) to `x`; state 2 and 3 are the average
    # gain and loss. Returns the RSI, NaN before the first n changes.
    change = x - state[1]
    if count > n_rsi:
        state[2] *= n_rsi - 1
        state[3] *= n_rsi - 1
    if change < 0:
        state[3] -= change
    else:
        state[2] += change
    if count < n_rsi:
        return np.nan
    state[2] /= n_rsi
    state[3] /= n_rsi
    total = state[2] + state[3]
    return 100.0 * (state[2] / total) if not (-_ZERO_EPS < total < _ZERO_EPS) else 0.0


@njit(cache=True)
def _rsi_bb_kernel(  # type: ignore[no-untyped-def]
    o, h, lo, c, v, start, state, params, enter, exit_, feats
):
    # state: 0 count, 1 previous close, 2 avg gain, 3 avg loss, 4 SMA running total.
    n_rsi = int(params[0])
    n_bb = int(params[1])
    k = params[2]
    rsi_low = params[3] - _INDEX_TIE  # a tie is not below ...
    rsi_high = params[4] + _INDEX_TIE  # ... nor above
    k_num, k_den = _ratio(k)
    kk = (k_num / k_den) ** 2 if k_den > 0 else k * k
    # Error bounds of the band decision (see `_band_sides`).
    tol = 2.0 * (n_bb + 2) * _U
    tol2 = tol * tol
    cg = 2.0 * tol * (3.0 * (1.0 + kk) + 5.0 * kk * n_bb)
    want = feats.shape[0] > 0
    count = int(state[0])
    for i in range(start, c.shape[0]):
        x = c[i]
        rsi = _rsi_step(x, count, n_rsi, state) if count > 0 else np.nan
        state[1] = x
        # Bollinger: TA-Lib-style SMA middle, population deviation over the same window
        # computed directly (two passes), so it does not drift over long runs.
        state[4] += x
        mid = np.nan
        upper = np.nan
        lower = np.nan
        if count >= n_bb - 1:
            mid = state[4] / n_bb
            state[4] -= c[i - n_bb + 1]
            # The decisions need only the sums of the deviations from the close; the band
            # values are features, computed when asked for (not on the backtest fast path).
            s_f = 0.0
            q_f = 0.0
            for j in range(i - n_bb + 1, i + 1):
                e = c[j] - x
                s_f += e
                q_f += e * e
            if want:
                acc = 0.0
                for j in range(i - n_bb + 1, i + 1):
                    d = c[j] - mid
                    acc += d * d
                dev = np.sqrt(acc / n_bb)
                upper = mid + k * dev
                lower = mid - k * dev
            above_mid, below_lower = _band_sides(c, i, n_bb, kk, k_num, k_den, tol2, cg, s_f, q_f)
        else:
            above_mid = below_lower = False
        enter[i] = below_lower & (rsi < rsi_low)
        exit_[i] = above_mid | (rsi > rsi_high)
        if want:
            feats[i, 0] = rsi
            feats[i, 1] = mid
            feats[i, 2] = upper
            feats[i, 3] = lower
        count += 1
    state[0] = count


class RsiBollinger(KernelStrategy):
    """Mean reversion: buy a close below the lower Bollinger band while RSI is oversold.

    Exit when the close is back above the middle band or RSI is overbought. The close is
    compared with the bands as the decimal closes decide (a close exactly on a band is not
    beyond it); an RSI within `_INDEX_TIE` points of its threshold is a tie (not beyond it).
    """

    name = "rsi_bb"
    parameters: ClassVar[Mapping[str, Param]] = {
        "rsi_period": Param(14, 2, 50),
        "bb_period": Param(20, 5, 200),
        "bb_std": Param(2.0, 0.5, 4.0, integer=False, step=0.25),
        "rsi_low": Param(30, 5, 50),
        "rsi_high": Param(70, 50, 95),
    }
    features = ("rsi", "bb_mid", "bb_upper", "bb_lower")
    kernel = staticmethod(_rsi_bb_kernel)
    state_size = 5

    def validate(self) -> None:
        """Require rsi_low < rsi_high."""
        if self.params["rsi_low"] >= self.params["rsi_high"]:
            raise ConfigError("rsi_bb: rsi_low must be below rsi_high", component="strategy")

    @property
    def warmup(self) -> int:
        """Return the longer of the band window and three RSI periods, plus one."""
        return int(max(self.params["bb_period"], self.params["rsi_period"] * 3)) + 1

    @property
    def lookback(self) -> int:
        """Return the band window (read directly for the deviation)."""
        return int(self.params["bb_period"])


@njit(cache=True)
def _volume_exact_ok(v, i, n, f_num, f_den, fallback):  # type: ignore[no-untyped-def]
    # v[i] >= (f_num / f_den) * mean(v[i-n:i]) in the window's ticks:
    # n * f_den * V_i >= f_num * sum V. Off any grid (or past int64) keeps the float answer.
    d = _grid(v, i - n, i + 1, float(n * max(f_num, f_den)))
    if d < 0:
        return fallback
    return n * f_den * _ticks(v[i], d) >= f_num * _tick_sum(v, i - n, i, d)


@njit(cache=True)
def _breakout_kernel(  # type: ignore[no-untyped-def]
    o, h, lo, c, v, start, state, params, enter, exit_, feats
):
    # Donchian channel of the *previous* bars (the current bar is what breaks out). The
    # channel tests compare prices themselves, so they are exact already (rounding a decimal
    # to its double keeps order and equality); the volume filter is decided exactly below.
    n = int(params[0])
    n_exit = int(params[1])
    vol_factor = params[2]
    f_num, f_den = _ratio(vol_factor)
    # Float error of v - factor * mean: the n-term sum, the division, the product and the
    # subtraction round by at most (n + 3)u of their magnitudes, plus u for each decimal
    # volume's double and for the factor's; (n + 5)u, doubled.
    tol = 2.0 * (n + 5) * _U
    want = feats.shape[0] > 0
    count = int(state[0])
    for i in range(start, c.shape[0]):
        upper = np.nan
        lower = np.nan
        vol_mean = np.nan
        if count >= n:
            upper = h[i - n]
            vol_sum = 0.0
            for j in range(i - n, i):
                upper = max(upper, h[j])
                vol_sum += v[j]
            vol_mean = vol_sum / n
        if count >= n_exit:
            lower = lo[i - n_exit]
            for j in range(i - n_exit, i):
                lower = min(lower, lo[j])
        volume_ok = vol_factor <= 0.0
        if not volume_ok and count >= n:
            need = vol_factor * vol_mean
            margin = v[i] - need
            volume_ok = margin >= 0.0
            if abs(margin) <= tol * (v[i] + need) and f_den > 0:
                volume_ok = _volume_exact_ok(v, i, n, f_num, f_den, volume_ok)
        enter[i] = c[i] > upper and volume_ok
        exit_[i] = c[i] < lower
        if want:
            feats[i, 0] = upper
            feats[i, 1] = lower
            feats[i, 2] = vol_mean
        count += 1
    state[0] = count


class Breakout(KernelStrategy):
    """Donchian breakout: buy a close above the highest high of the last `period` bars.

    The breakout bar's volume must be at least `volume_factor` times the average of those
    bars (0 turns the filter off). Exit on a close below the lowest low of the last
    `exit_period` bars.
    """

    name = "breakout"
    parameters: ClassVar[Mapping[str, Param]] = {
        "period": Param(20, 3, 400),
        "exit_period": Param(10, 2, 400),
        "volume_factor": Param(1.5, 0.0, 5.0, integer=False, step=0.25),
    }
    features = ("donchian_high", "donchian_low", "volume_mean")
    kernel = staticmethod(_breakout_kernel)
    state_size = 1

    @property
    def warmup(self) -> int:
        """Return the longer channel plus one."""
        return int(max(self.params["period"], self.params["exit_period"])) + 1

    @property
    def lookback(self) -> int:
        """Return the longer channel (read directly)."""
        return int(max(self.params["period"], self.params["exit_period"]))


BUILTIN: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (SmaCross, EmaCross, RsiBollinger, Breakout)
}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under its `name` (usable as a decorator)."""
    BUILTIN[cls.name] = cls
    return cls


def load_strategy(name_or_path: str, params: Mapping[str, float] | None = None) -> Strategy:
    """Return a strategy by built-in name, from a `.py` file, or a trained policy (`rl:<dir>`).

    `rl:<dir>` loads the policy exported under `dir`; `rl` alone is `data/models/rl/champion`
    here, and the daemon resolves it to the model registry's champion of the first traded
    pair before calling this. A missing policy gives a neutral strategy and an alert, not an
    error (`rl_policy`).

    Raises:
        ConfigError: unknown name, unreadable file, or bad parameters.
    """
    params = dict(params or {})
    if name_or_path == "rl" or name_or_path.startswith("rl:"):
        from rl_policy import policy_strategy  # a trained policy: numpy only, loaded lazily

        return policy_strategy(name_or_path, params)
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path](**params)
    path = Path(name_or_path)
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(
            f"unknown strategy {name_or_path!r}; built-ins: {sorted(BUILTIN)} "
            "(or pass a path to a .py file)",
            component="strategy",
        )
    spec = importlib.util.spec_from_file_location(f"user_strategy_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load strategy file {path}", component="strategy")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"strategy file {path} failed to import: {e}") from e
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Strategy)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
    if len(found) != 1:
        raise ConfigError(f"{path} must define exactly one Strategy subclass, found {len(found)}")
    return found[0](**params)
