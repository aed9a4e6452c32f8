"""Where the engine gets a strategy's verdict on a closed candle: the signal sources.

`RollingSignals` (sim and live) evaluates the strategy on the pair's rolling window at each
closed candle; `PrecomputedSignals` (backtests) populates each pair's whole archive once and
reads one row per candle; `StrategyRouter` sends each pair to its own strategy's source when
several strategies trade. All of them turn the strategy's flags into a `Signal` through
`decide_signal`. Part of `pipeline`, which re-exports it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Final, Protocol

import numpy as np
import pandas as pd

from batch_signals import advance_many, rehearse_many, warm
from data_manager import DataManager
from models import Candle, Side, Signal
from strategy import KernelCarry, KernelStrategy, Strategy


class SignalSource(Protocol):
    """Where the engine gets the strategy's verdict on a closed candle."""

    def signal(self, candle: Candle, holding: Decimal) -> Signal | None:
        """Return the signal for `candle` given the signed position held, or None."""
        ...

    def prepare(self, pairs: Sequence[str]) -> None:
        """Compute ahead, in one pass where it can, what `signal` will read for `pairs`.

        Their candles have just been admitted together (a burst); `signal` gives the same
        answers with or without this call.
        """
        ...

    def rehearse(self, pairs: Sequence[str]) -> None:
        """Run `prepare`'s pass over the pairs as they stand, changing nothing.

        Between bursts, so that the next burst's pass finds its code and data in the
        CPU's caches (`burst_rehearsal`).
        """
        ...


def decide_signal(
    strategy: Strategy,
    pair: str,
    ts: int,
    price: float,
    flags: tuple[bool, bool, bool, bool],
    holding: Decimal,
    features: Callable[[], dict[str, float]],
) -> Signal | None:
    """Turn a row's (enter_long, exit_long, enter_short, exit_short) flags into a Signal.

    Exits take precedence over entries for the side held; a flat position may enter long,
    or short when the strategy can short.
    """
    enter_long, exit_long, enter_short, exit_short = flags
    name = strategy.name
    if holding > 0:
        if exit_long or enter_short:
            return Signal(
                pair,
                Side.SELL,
                1.0,
                f"{name}: exit long",
                ts,
                price,
                name,
                exit_only=True,
                features=features(),
            )
        return None
    if holding < 0:
        if exit_short or enter_long:
            return Signal(
                pair,
                Side.BUY,
                1.0,
                f"{name}: exit short",
                ts,
                price,
                name,
                exit_only=True,
                features=features(),
            )
        return None
    if enter_long:
        return Signal(
            pair, Side.BUY, 1.0, f"{name}: entry long", ts, price, name, features=features()
        )
    if enter_short and strategy.can_short:
        return Signal(
            pair, Side.SELL, 1.0, f"{name}: entry short", ts, price, name, features=features()
        )
    return None


# What a row's feature may be (a tuple: `int | float | ...` would build a union each time).
_NUMBERS: Final = (int, float, np.floating, np.integer)
# A row's flags as bits: enter_long 1, exit_long 2, enter_short 4, exit_short 8 (the
# order of `PrecomputedSignals._NAMES`), and each bit pattern as the tuple `_flags` gives.
_FLAG_TUPLES: Final = tuple((bool(b & 1), bool(b & 2), bool(b & 4), bool(b & 8)) for b in range(16))


def _lookup(known_and_set: tuple[np.ndarray, np.ndarray], ts: np.ndarray) -> np.ndarray:
    # The per-row booleans at open times `ts`; False where the archive has no such row.
    known, flagged = known_and_set
    if len(known) == 0:
        return np.zeros(len(ts), dtype=bool)
    if known is ts or (len(known) == len(ts) and np.array_equal(known, ts)):
        same: np.ndarray = flagged.view()  # the replay's own rows: no index arrays
        same.flags.writeable = False
        return same
    index = np.minimum(np.searchsorted(known, ts), len(known) - 1)
    mask: np.ndarray = (known[index] == ts) & flagged[index]
    return mask


def _flags(row: Any) -> tuple[bool, bool, bool, bool]:
    return (
        bool(row.get("enter_long", False)),
        bool(row.get("exit_long", False)),
        bool(row.get("enter_short", False)),
        bool(row.get("exit_short", False)),
    )


class RollingSignals:
    """Live/sim: evaluate the strategy on the pair's rolling window at each closed candle.

    Reads the data manager's array views (no DataFrame per candle); kernel strategies
    advance their indicator state by the new row only (`Strategy.last_row_arrays`).
    """

    def __init__(self, strategy: Strategy, data: DataManager, timeframe: str) -> None:
        self.strategy = strategy
        self.data = data
        self.timeframe = timeframe
        warm(strategy)  # the burst pass's driver is ready before the first burst
        # The rows the last burst's pass computed, by pair: (open time, row). The row is the
        # one `last_row_arrays` returns for that candle (the strategy recorded it), read
        # here without building the window's views.
        self._ready: dict[str, tuple[int, dict[str, Any]]] = {}

    def prepare(self, pairs: Sequence[str]) -> None:
        """Advance every pair's indicators by its new row in one kernel pass (`batch_signals`)."""
        self._ready = advance_many(self.strategy, self.data, self.timeframe, pairs)

    def rehearse(self, pairs: Sequence[str]) -> None:
        """Run the kernel pass on copies of the pairs' states (`batch_signals.rehearse_many`)."""
        rehearse_many(self.strategy, self.data, self.timeframe, pairs)

    def signal(self, candle: Candle, holding: Decimal) -> Signal | None:
        """Compute the window's last row and decide."""
        pair = candle.pair
        ready = self._ready.pop(pair, None) if self._ready else None
        if ready is not None and ready[0] == candle.ts:
            if self.data.size(pair, self.timeframe) < self.strategy.warmup:
                return None
            row = ready[1]
        else:
            bars = self.data.arrays(pair, self.timeframe)
            if len(bars.ts) < self.strategy.warmup:
                return None
            row = self.strategy.last_row_arrays(pair, bars)
        return decide_signal(
            self.strategy,
            candle.pair,
            candle.ts,
            candle.close,
            _flags(row),
            holding,
            lambda: _features(row),
        )


class StrategyRouter:
    """Several strategies at once: each pair's candles go to its own strategy's signals."""

    def __init__(self, by_pair: dict[str, SignalSource]) -> None:
        self.by_pair = by_pair

    def prepare(self, pairs: Sequence[str]) -> None:
        """Prepare each strategy's pairs together, one pass per strategy."""
        for source, owned in self._by_strategy(pairs):
            source.prepare(owned)

    def rehearse(self, pairs: Sequence[str]) -> None:
        """Rehearse each strategy's pairs together, as `prepare` groups them."""
        for source, owned in self._by_strategy(pairs):
            source.rehearse(owned)

    def _by_strategy(self, pairs: Sequence[str]) -> list[tuple[SignalSource, list[str]]]:
        # Each pair has its own source; those reading one strategy share its pass.
        by_source: dict[int, tuple[SignalSource, list[str]]] = {}
        for pair in pairs:
            source = self.by_pair.get(pair)
            if source is not None:
                key = id(source.strategy) if isinstance(source, RollingSignals) else id(source)
                by_source.setdefault(key, (source, []))[1].append(pair)
        return list(by_source.values())

    def signal(self, candle: Candle, holding: Decimal) -> Signal | None:
        """Ask the strategy that owns the candle's pair (None for a pair no one owns)."""
        source = self.by_pair.get(candle.pair)
        return None if source is None else source.signal(candle, holding)


class PrecomputedSignals:
    """Backtests: populate each pair's whole archive once, then read one row per candle.

    Equivalent to `RollingSignals` because `populate` is causal (a row depends only on
    earlier rows; a test checks it), and exact for indicators whose rolling window would
    otherwise truncate their history (EMA-type).
    """

    _NAMES = ("enter_long", "exit_long", "enter_short", "exit_short")

    def __init__(
        self, strategy: Strategy, frames: dict[str, Any], *, segmented: bool = False
    ) -> None:
        self.strategy = strategy
        # Per pair: the open times (a view of the frame's own, for O(1) reads from
        # Python), the row the last lookup found (candles arrive in order, so the next
        # one is usually next), each row's flags as bits (one byte a candle, see `_FLAG_TUPLES`)
        # and the rows with any flag set, whose features alone are kept. Nothing else is
        # held per candle, and no Python object per flagged row: a strategy whose flags
        # hold for long stretches (a state, not a crossing) costs 9 bytes a flagged row
        # besides its features.
        self._ts: dict[str, memoryview] = {}
        self._cursor: dict[str, int] = {}
        self._bits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._bits_of: dict[str, memoryview] = {}
        self._set_rows: dict[str, memoryview] = {}
        self._features: dict[str, tuple[list[str], np.ndarray]] = {}
        # `segmented`: the archive comes a time segment at a time (`advance`); each pair's
        # kernel goes on from where its last segment left it.
        if segmented and not self.segmentable(strategy):
            raise ValueError("a segmented archive needs a kernel strategy's own populate")
        self._carries: dict[str, KernelCarry] | None = {} if segmented else None
        self.advance(frames)

    @staticmethod
    def segmentable(strategy: Strategy) -> bool:
        """Return whether the strategy's rows can come a segment at a time (`advance`)."""
        return isinstance(strategy, KernelStrategy) and _plain_populate(strategy)

    def advance(self, frames: dict[str, Any]) -> None:
        """Take these frames' rows: the whole archive, or a segmented archive's next part.

        A segmented archive's pairs go on from their last segment (a pair without candles
        in this one keeps its place); each segment's rows replace the last one's, which
        no candle reads again. Rows equal one pass over the whole archive.
        """
        strategy = self.strategy
        if self._carries is not None:  # the last segment's pairs without candles in this one
            tables: tuple[dict[str, Any], ...] = (
                self._ts, self._cursor, self._bits, self._bits_of, self._set_rows, self._features
            )  # fmt: skip
            for gone in [pair for pair in self._ts if pair not in frames]:
                for table in tables:
                    table.pop(gone, None)
        for pair, frame in frames.items():
            index = frame.index
            ts = np.ascontiguousarray(
                (index if index.unit == "ms" else index.as_unit("ms")).asi8, dtype=np.int64
            )
            self._ts[pair] = ts.data  # a memoryview: int reads, no copy
            self._cursor[pair] = -1
            # A kernel strategy's own `populate` (not a subclass's) comes a chunk at a time.
            if isinstance(strategy, KernelStrategy) and _plain_populate(strategy):
                carries = self._carries
                carry = None if carries is None else carries.setdefault(pair, strategy.carry())
                bits, set_rows, names, values = _kernel_rows(strategy, frame, carry)
            else:
                bits, set_rows, names, values = _populated_rows(strategy, frame)
            self._bits[pair] = (ts, bits)
            self._bits_of[pair] = bits.data
            self._set_rows[pair] = set_rows.data
            self._features[pair] = (names, values)

    def _row(self, pair: str, ts: int) -> int | None:
        """Return the row of `pair`'s archive opening at `ts`, None if it has none."""
        known = self._ts.get(pair)
        if known is None:
            return None
        cursor = self._cursor[pair]
        if cursor >= 0 and known[cursor] == ts:
            return cursor
        index = cursor + 1
        if index >= len(known) or known[index] != ts:
            index = bisect.bisect_left(known, ts)
            if index >= len(known) or known[index] != ts:
                return None
        self._cursor[pair] = index
        return index

    def _entry_bits(self) -> int:
        # The flags that give a flat position a signal (`decide_signal`): an entry.
        return 0b0101 if self.strategy.can_short else 0b0001

    def has_flags(self, candle: Candle) -> bool:
        """Return True if any signal column is set on this candle."""
        index = self._row(candle.pair, candle.ts)
        return index is not None and self._bits_of[candle.pair][index] != 0

    def has_entry(self, candle: Candle) -> bool:
        """Return True if this candle's flags give a flat position a signal (an entry)."""
        index = self._row(candle.pair, candle.ts)
        return index is not None and self._bits_of[candle.pair][index] & self._entry_bits() != 0

    def flag_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which candles have a signal set."""
        known, bits = self._bits[pair]
        return _lookup((known, bits != 0), ts)

    def entry_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which give a flat position a signal."""
        known, bits = self._bits[pair]
        return _lookup((known, bits & np.uint8(self._entry_bits()) != 0), ts)

    def prepare(self, pairs: Sequence[str]) -> None:
        """Nothing to do: every row is computed already."""

    def rehearse(self, pairs: Sequence[str]) -> None:
        """Nothing to do: every row is computed already."""

    def signal(self, candle: Candle, holding: Decimal) -> Signal | None:
        """Read the precomputed row for this candle."""
        index = self._row(candle.pair, candle.ts)
        if index is None:
            return None
        bits = self._bits_of[candle.pair][index]
        if not bits:
            return None
        names, values = self._features[candle.pair]
        row = bisect.bisect_left(self._set_rows[candle.pair], index)
        return decide_signal(
            self.strategy,
            candle.pair,
            candle.ts,
            candle.close,
            _FLAG_TUPLES[bits],
            holding,
            lambda: {
                n: v for n, v in zip(names, values[row].tolist(), strict=True) if math.isfinite(v)
            },
        )


def _populated_rows(
    strategy: Strategy, frame: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Return a frame's flag bits, flagged rows, feature names and their features.

    From `populate`'s columns: the flags of every row as bits (see `_FLAG_TUPLES`), none before
    the warm-up (as in the live path), and the numeric features of the flagged rows.
    """
    cols = strategy.populate(frame)
    bits = np.zeros(len(frame), dtype=np.uint8)
    for j, name in enumerate(PrecomputedSignals._NAMES):
        if name in cols.columns:
            bits |= cols[name].to_numpy(dtype=bool).view(np.uint8) << np.uint8(j)
    bits[: max(strategy.warmup - 1, 0)] = 0
    set_rows = np.flatnonzero(bits)
    names = [
        str(c)
        for c in cols.columns
        if c not in PrecomputedSignals._NAMES and np.issubdtype(cols[c].dtype, np.number)
    ]
    values = (
        cols[names].iloc[set_rows].to_numpy(dtype=np.float64)
        if names
        else np.empty((len(set_rows), 0))
    )
    return bits, set_rows, names, values


def replay_flags(
    strategy: Strategy, frame: pd.DataFrame, carry: KernelCarry | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the rows a flat long enters on and those that close a held long (the replay's).

    The flags of `PrecomputedSignals` over the whole frame (none before the warm-up): an
    entry is `enter_long`; an exit `exit_long` or `enter_short` (`decide_signal`). The fast
    paths take their decisions on these. With `carry` (a segmentable strategy's), the frame
    goes on from the segments that carry took before, as a segmented replay's does.
    """
    if carry is not None:
        assert isinstance(strategy, KernelStrategy)
        bits = _kernel_rows(strategy, frame, carry)[0]
    elif (
        PrecomputedSignals.segmentable(strategy)
        and type(strategy).entries_exits is KernelStrategy.entries_exits
    ):
        enter, exit_ = strategy.entries_exits(frame)  # the kernel's own rows, features aside
        bits = enter.astype(np.uint8) | (exit_.astype(np.uint8) << np.uint8(1))
        bits[: max(strategy.warmup - 1, 0)] = 0
    else:
        bits = _populated_rows(strategy, frame)[0]
    return (bits & 1) != 0, (bits & 0b0110) != 0


def _plain_populate(strategy: KernelStrategy) -> bool:
    return type(strategy).populate is KernelStrategy.populate


def _kernel_rows(
    strategy: KernelStrategy, frame: pd.DataFrame, carry: KernelCarry | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """`_populated_rows` of a kernel strategy, its rows computed a chunk at a time.

    `populate_chunks` gives `populate`'s rows without its whole-frame columns: the peak
    of a long backtest's preparation does not grow with its features. With `carry`, the
    frame continues the pair's earlier frames (its warm-up counted from their first row).
    """
    bits = np.zeros(len(frame), dtype=np.uint8)
    names = list(strategy.features)
    rows: list[np.ndarray] = []
    values: list[np.ndarray] = []
    warm = max(strategy.warmup - 1, 0) - (carry.rows if carry is not None else 0)
    for first, enter, exit_, feats in strategy.populate_chunks(frame, carry=carry):
        chunk = bits[first : first + len(enter)]
        chunk |= enter.view(np.uint8) | (exit_.view(np.uint8) << np.uint8(1))
        if first < warm:
            chunk[: warm - first] = 0
        flagged = np.flatnonzero(chunk)
        rows.append(flagged + first)
        values.append(feats[flagged, : len(names)])
    set_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.intp)
    kept = np.concatenate(values) if values else np.empty((0, len(names)))
    return bits, set_rows, names, np.ascontiguousarray(kept, dtype=np.float64)


def _features(row: Any) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key in ("enter_long", "exit_long", "enter_short", "exit_short"):
            continue
        if isinstance(value, _NUMBERS) and math.isfinite(value):
            out[str(key)] = float(value)
    return out
