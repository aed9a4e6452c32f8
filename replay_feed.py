"""The replay feed, the simulated exchange's driver and point-in-time pair schedules.

`ReplayFeed` yields archived candles of many pairs in time order and moves a
`ReplayClock` to each candle's close; `SimDriver` hands each candle to the engine with
the simulated exchange matching it first (and holds the backtest's quiet-stretch short
path); `PairSchedule` gives the pairs to trade as known at each refresh boundary
(dynamic pairs). Part of `trade_simulator`, which re-exports them.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import structlog

from error_handler import ConfigError
from matching_engine import SimulatedExchange
from models import Candle
from utils.utilities import ReplayClock, timeframe_to_ms


log = structlog.get_logger(__name__)
_CHUNK = 8_192  # candles turned into Python numbers at a time


# -- Replay feed -----------------------------------------------------------------------------

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ReplayRows:
    """A replay's candles as arrays, in the order the feed emits them.

    `names` are the pairs (sorted); `pair_of[k]` indexes `names` for candle `k`, `ts` is
    its open time (ms) and `ohlcv[k]` its open, high, low, close and volume.
    """

    names: list[str]
    pair_of: np.ndarray
    ts: np.ndarray
    ohlcv: np.ndarray


class ReplayFeed:
    """Yield archived candles of many pairs in time order, driving a replay clock.

    Each candle is emitted at its close time (`ts + timeframe`), so the clock never runs
    ahead of what a live bot could have known. `speed` is candles per second (0 = as fast as
    possible). Between candles it yields to the event loop, every candle by default (a
    consumer behind a queue needs that to keep up, so the clock never runs ahead of the
    candle being processed) or every `yield_every` candles when the consumer processes
    each candle inline (a backtest's direct loop), which is much faster. `progress(done,
    total)` is called every `progress_every` candles and at the end (a progress bar).
    A paced replay emits its first `unpaced` candles at full speed: the strategy's warm-up,
    which a live bot loads from history before it starts.
    """

    def __init__(
        self,
        frames: dict[str, pd.DataFrame],
        timeframe: str,
        clock: ReplayClock,
        *,
        speed: float = 0.0,
        start_ms: int | None = None,
        end_ms: int | None = None,
        progress: Progress | None = None,
        progress_every: int = 5_000,
        yield_every: int = 1,
        unpaced: int = 0,
    ) -> None:
        self.frames = frames
        self.timeframe = timeframe
        self.step = timeframe_to_ms(timeframe)
        self.clock = clock
        self.speed = speed
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.progress = progress
        self.progress_every = max(1, progress_every)
        self.yield_every = max(1, yield_every)
        self.unpaced = unpaced
        self.emitted = 0

    def __len__(self) -> int:
        return sum(len(self._slice(f)) for f in self.frames.values())

    def _slice(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.start_ms is None and self.end_ms is None:
            return frame
        ts = frame.index.as_unit("ms").asi8
        mask = np.ones(len(ts), dtype=bool)
        if self.start_ms is not None:
            mask &= ts >= self.start_ms
        if self.end_ms is not None:
            mask &= ts < self.end_ms
        return frame[mask]

    def _streams(self) -> list[Iterable[Candle]]:
        return [self._stream(pair, self._slice(frame)) for pair, frame in self.frames.items()]

    def _stream(self, pair: str, frame: pd.DataFrame) -> Iterable[Candle]:
        # A function per pair, so each generator binds its own pair (a generator expression
        # in a loop would read the loop variable late and label every candle with the last).
        # Converted to Python numbers a chunk at a time: the whole archive as lists would
        # cost ~200 bytes a candle for the length of the run.
        ts_all = frame.index.as_unit("ms").asi8
        columns = [frame[name].to_numpy() for name in ("open", "high", "low", "close", "volume")]
        timeframe = self.timeframe
        for start in range(0, len(ts_all), _CHUNK):
            ts = ts_all[start : start + _CHUNK].tolist()
            values = np.column_stack([c[start : start + _CHUNK] for c in columns]).tolist()
            for t, (o, h, lo, c, v) in zip(ts, values, strict=True):
                yield Candle(pair, timeframe, t, o, h, lo, c, v)

    def single_pair(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """Return (pair, open times, OHLCV rows) when the replay has exactly one pair.

        For a consumer that walks the arrays itself (`SimDriver.run`); it reports
        its position with `advance_to`. None with several pairs, or when paced (`speed`).
        """
        if len(self.frames) != 1 or self.speed > 0:
            return None
        ((pair, frame),) = self.frames.items()
        frame = self._slice(frame)
        ts = frame.index.as_unit("ms").asi8
        ohlcv = frame[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        return pair, ts, ohlcv

    def rows(self) -> ReplayRows | None:
        """Return every candle of the replay as arrays in its (ts, pair) order.

        For a consumer that walks the arrays itself (`SimDriver.run`); it reports its
        position with `advance_to`. None when paced (`speed`) or when a frame is not in
        time order (the merge would then differ).
        """
        if self.speed > 0:
            return None
        names = sorted(self.frames)
        frames = [self._slice(self.frames[pair]) for pair in names]
        if not all(f.index.is_monotonic_increasing for f in frames):
            return None
        columns = ["open", "high", "low", "close", "volume"]
        ts = np.concatenate([f.index.as_unit("ms").asi8 for f in frames]).astype(np.int64)
        ohlcv = np.concatenate([f[columns].to_numpy(dtype=np.float64) for f in frames])
        pair_of = np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in frames])
        if len(names) > 1:  # the merge's order: by open time, then by pair name
            order = np.lexsort((pair_of, ts))
            ts, ohlcv, pair_of = ts[order], ohlcv[order], pair_of[order]
        return ReplayRows(names, pair_of, ts, ohlcv.reshape(-1, 5))

    def advance_to(self, emitted: int, *, done: bool = False) -> None:
        """Record how many candles an array consumer has processed; report progress."""
        before, self.emitted = self.emitted, emitted
        every = self.progress_every
        if self.progress is not None and (done or emitted // every > before // every):
            self.progress(emitted, len(self))

    async def __aiter__(self) -> AsyncIterator[Candle]:
        """Yield candles in (ts, pair) order."""
        streams = self._streams()
        merged = (
            streams[0] if len(streams) == 1 else heapq.merge(*streams, key=lambda c: (c.ts, c.pair))
        )
        delay = 1.0 / self.speed if self.speed > 0 else 0.0
        # Yielding to the loop every candle costs more than the rest of the feed; a consumer
        # that processes each candle before asking for the next (a backtest) can yield less.
        every = 1 if delay > 0 else self.yield_every
        progress = self.progress
        total = len(self) if progress is not None else 0
        clock = self.clock
        step = self.step
        now = clock.now_ms()
        emitted = self.emitted
        unpaced = self.unpaced
        for candle in merged:
            close_ts = candle.ts + step
            if close_ts > now:
                clock.set(close_ts)
                now = close_ts
            emitted += 1
            self.emitted = emitted
            yield candle
            if progress is not None and emitted % self.progress_every == 0:
                progress(emitted, total)
            if emitted % every == 0:
                await asyncio.sleep(delay if emitted > unpaced else 0.0)
        if progress is not None:
            progress(emitted, total)


# -- The simulated exchange's driver ---------------------------------------------------------


class CandleSteps(Protocol):
    """What the driver drives: the engine's candle entry points (`pipeline.Engine`)."""

    @property
    def quiet_exact(self) -> bool:
        """Return True when a candle with no signal and no working order changes nothing else."""
        ...

    def quiet_pair(self, pair: str) -> bool:
        """Return True when a candle of `pair` without a signal can take the short path."""
        ...

    def admit(self, candle: Candle, received: float | None = None) -> bool:
        """Take a candle into the data and the counters; False if refused."""
        ...

    async def process(self, candle: Candle) -> None:
        """Run an admitted candle through the rest of the pipeline."""
        ...

    def on_quiet_candle(self, candle: Candle) -> bool:
        """Apply an admitted quiet candle; True when the breakers ask to flatten."""
        ...

    def on_quiet_rows(
        self,
        names: list[str],
        pair_of: np.ndarray,
        ts: np.ndarray,
        ohlcv: np.ndarray,
        now: list[int],
    ) -> int:
        """Apply quiet candles in replay order; return how many (fewer: flatten now)."""
        ...

    async def trip_flatten(self) -> None:
        """Act on the circuit breaker's flatten."""
        ...


class QuietSignals(Protocol):
    """Which candles carry a signal (`pipeline.PrecomputedSignals`)."""

    def has_flags(self, candle: Candle) -> bool:
        """Return True if any signal column is set on this candle."""
        ...

    def flag_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which candles have a signal set."""
        ...


_SHORT = 8  # quiet stretches shorter than this go candle by candle (cheaper than arrays)


class SimDriver:
    """Hand each closed candle to the engine with the simulated exchange in front of it.

    The engine admits the candle, the simulated exchange matches its working orders
    against it and delivers the fills through its sink (the engine's fill entry point,
    as the private stream delivers the live exchange's), then the engine processes the
    candle: the venue has filled what it would have by the time the candle closed. Used
    by replays and backtests, and by paper trading on the live feed.

    Backtests can take a short path (`enable_quiet_path`): a candle with no signal, no
    working order on its pair and (stops managed) no position there changes only the data
    window, the marks, the equity curve and the breakers, and an unpaced replay applies
    such candles a stretch at a time, across all its pairs (`run`).
    """

    def __init__(self, engine: CandleSteps, sim: SimulatedExchange) -> None:
        self.engine = engine
        self.sim = sim
        # Bound once: they run on every candle.
        self._admit, self._process, self._match = engine.admit, engine.process, sim.on_candle
        self._quiet: QuietSignals | None = None
        self.quiet_runs = False
        self.stretches = 0  # quiet stretches applied in one call (`run`)

    def enable_quiet_path(self, signals: QuietSignals) -> None:
        """Let a backtest skip the full pipeline on candles where nothing can happen.

        Only when the engine says such a candle changes nothing but the data, marks,
        curve and breakers (precomputed signals, no model, no anomaly watch, no sleeves).
        The same trades, orders and curve come out (tests compare both).
        """
        if not self.engine.quiet_exact:
            raise ValueError("the quiet path is not exact with this engine's set-up")
        self._quiet = signals
        self.quiet_runs = True  # an unpaced replay may apply quiet stretches in one call

    def _is_quiet(self, candle: Candle) -> bool:
        quiet = self._quiet
        return (
            quiet is not None
            and not quiet.has_flags(candle)
            and not self.sim.has_working(candle.pair)
            and self.engine.quiet_pair(candle.pair)
        )

    async def on_candle(self, candle: Candle, received: float | None = None) -> None:
        """Match `candle` on the simulated exchange and run it through the engine."""
        if self._is_quiet(candle):
            if self._admit(candle, received):
                self._match(candle)  # nothing works on this pair: it only remembers the bar
                if self.engine.on_quiet_candle(candle):
                    await self.engine.trip_flatten()
            return
        if self._admit(candle, received):
            fills = self._match(candle)  # `sim.match`, without a coroutine when none fill
            if fills or self.sim.has_updates:
                await self.sim.deliver(fills)
            await self._process(candle)

    async def run(self, feed: ReplayFeed, stop: asyncio.Event) -> bool:
        """Drive an unpaced backtest replay, quiet stretches at a time; False if not possible.

        A candle with a signal, or of a pair with a working order (or, stops managed, a
        position), takes the whole pipeline. The candles up to the next such candle of any
        pair, in the replay's time order, are quiet: they are applied in one call
        (`on_quiet_rows`). A working stop or take-profit makes its pair's every candle go
        through the pipeline (the stop may trail), while the other pairs' quiet candles
        between them still go a stretch at a time. The trades, orders and equity curve are
        those of the per-candle path (tests compare them).
        """
        quiet = self._quiet
        ready = quiet is not None and self.quiet_runs and self.engine.quiet_exact
        rows = feed.rows() if ready else None
        if quiet is None or rows is None:
            return False
        plan = _StretchPlan(rows, quiet, feed.step)
        clock, i, n, next_yield = feed.clock, 0, len(rows.ts), feed.yield_every
        forced, pair_of, timeframe = plan.is_forced, plan.pair_list, feed.timeframe
        on_candle, candle = self.on_candle, plan.candle
        while i < n and not stop.is_set():
            hot = self._hot_pairs(rows.names)
            end = i if forced[i] or pair_of[i] in hot else plan.quiet_until(i, hot)
            if end - i < _SHORT:
                for k in range(i, max(end, i + 1)):
                    await on_candle(candle(k, timeframe, clock))
                i = max(end, i + 1)
            else:
                i = await self._stretch(plan, i, end, clock, timeframe)
            if i >= next_yield:
                feed.advance_to(i)
                next_yield = i + feed.yield_every
                await asyncio.sleep(0)
        feed.advance_to(i, done=True)
        return True

    def _hot_pairs(self, names: list[str]) -> list[int]:
        # The pairs whose candles need the pipeline now: an order works, or a managed stop.
        has_working, quiet_pair = self.sim.has_working, self.engine.quiet_pair
        return [k for k, pair in enumerate(names) if has_working(pair) or not quiet_pair(pair)]

    async def _stretch(
        self, plan: _StretchPlan, start: int, end: int, clock: ReplayClock, timeframe: str
    ) -> int:
        # Apply quiet candles [start, end) in one call; return where the replay goes on.
        rows, span = plan.rows, slice(start, end)
        now, at = plan.close_list[start:end], clock.now_ms()
        if now[0] < at:  # the clock never goes back (a start time after the first close)
            now = [max(t, at) for t in now]
        count = self.engine.on_quiet_rows(
            rows.names, rows.pair_of[span], rows.ts[span], rows.ohlcv[span], now
        )
        self.stretches += 1
        done = start + count
        for k in plan.last_of_each_pair(start, done):
            self.sim.on_candle(plan.candle(k, timeframe))  # each pair's last bar, no order
        if now[count - 1] > clock.now_ms():
            clock.set(now[count - 1])
        if done < end:
            await self.engine.trip_flatten()  # the breakers tripped on the last one applied
        return done


class _StretchPlan:
    """Where a replay's quiet stretches end: the candles that must take the pipeline."""

    def __init__(self, rows: ReplayRows, quiet: QuietSignals, step: int) -> None:
        self.rows = rows
        self.step = step
        self.close_ts = rows.ts + step
        forced = np.zeros(len(rows.ts), dtype=bool)
        self.of_pair: list[np.ndarray] = []
        for k, pair in enumerate(rows.names):
            at = np.flatnonzero(rows.pair_of == k)
            self.of_pair.append(at)
            forced[at] = quiet.flag_mask(pair, rows.ts[at])
            if len(at):
                forced[at[0]] = True  # a pair's first candle opens its data window
        o, h, lo, c, v = rows.ohlcv.T
        # What the data window refuses (`DataManager.on_candle`) goes candle by candle.
        valid = (lo > 0) & (lo <= o) & (o <= h) & (h < np.inf) & (lo <= c) & (c <= h)
        forced |= ~(valid & (v >= 0) & (v < np.inf))
        self.forced = np.flatnonzero(forced)
        # Python lists once: the driver reads them candle by candle.
        self.is_forced: list[bool] = forced.tolist()
        self.pair_list: list[int] = rows.pair_of.tolist()
        self.close_list: list[int] = self.close_ts.tolist()

    def quiet_until(self, start: int, hot: list[int]) -> int:
        """Return the first candle from `start` on that must take the pipeline (or the end)."""
        at = int(np.searchsorted(self.forced, start))
        end = int(self.forced[at]) if at < len(self.forced) else len(self.rows.ts)
        for k in hot:
            rows = self.of_pair[k]
            at = int(np.searchsorted(rows, start))
            if at < len(rows) and rows[at] < end:
                end = int(rows[at])
        return end

    def last_of_each_pair(self, start: int, end: int) -> list[int]:
        """Return, for each pair with a candle in [start, end), the index of its last one."""
        pair_of = self.rows.pair_of[start:end]
        if len(self.rows.names) == 1:
            return [end - 1] if end > start else []
        backwards = pair_of[::-1]
        present, first = np.unique(backwards, return_index=True)
        return [end - 1 - int(f) for f in first[: len(present)]]

    def candle(self, k: int, timeframe: str, clock: ReplayClock | None = None) -> Candle:
        """Return candle `k` (moving `clock` to its close when given, as the feed does)."""
        rows = self.rows
        close_ts = self.close_list[k]
        if clock is not None and close_ts > clock.now_ms():
            clock.set(close_ts)
        o, h, lo, c, v = rows.ohlcv[k].tolist()
        return Candle(
            rows.names[self.pair_list[k]], timeframe, close_ts - self.step, o, h, lo, c, v
        )


# -- Dynamic pairs ---------------------------------------------------------------------------


class PairTarget(Protocol):
    """What a pair schedule updates: the engine's traded pairs."""

    def set_pairs(self, pairs: list[str]) -> None:
        """Replace the traded pairs; dropped ones are drained (exits only)."""
        ...


class PairSchedule:
    """A point-in-time pair list for backtests, refreshed on a candle-aligned interval.

    `pairs_at(ts)` is any callable returning the pairs to trade as known at `ts` (e.g. the
    top-pairs ranking computed only from data before `ts`). It is asked at each refresh
    boundary (`ts - ts % refresh_ms`), never for a later time than the candle being
    processed, and its answers are remembered, so a replay asks at most once per boundary.
    """

    def __init__(self, pairs_at: Callable[[int], Sequence[str]], *, refresh_ms: int) -> None:
        if refresh_ms <= 0:
            raise ConfigError("pair refresh interval must be positive", component="simulator")
        self.pairs_at = pairs_at
        self.refresh_ms = refresh_ms
        self._cache: dict[int, list[str]] = {}
        self._current: list[str] | None = None
        self.history: list[tuple[int, list[str]]] = []

    def pairs(self, now_ms: int) -> list[str]:
        """Return the pair list in force at `now_ms` (a candle's close time)."""
        boundary = now_ms - now_ms % self.refresh_ms
        pairs = self._cache.get(boundary)
        if pairs is None:
            pairs = self._cache[boundary] = list(dict.fromkeys(self.pairs_at(boundary)))
        if pairs != self._current:
            previous = set(self._current or ())
            log.info(
                "pairs_refreshed",
                ts=boundary,
                added=sorted(set(pairs) - previous),
                removed=sorted(previous - set(pairs)),
            )
            self._current = pairs
            self.history.append((boundary, pairs))
        return pairs

    def apply(self, target: PairTarget, candle: Candle, step: int) -> None:
        """Update `target`'s pairs for `candle` (call before the engine processes it)."""
        before = self._current
        pairs = self.pairs(candle.ts + step)
        if self._current is not before:
            target.set_pairs(list(pairs))

    def universe(self, start_ms: int, end_ms: int) -> list[str]:
        """Return every pair listed at any boundary in [start_ms, end_ms): the data to load."""
        seen: dict[str, None] = {}
        boundary = start_ms - start_ms % self.refresh_ms
        while boundary < end_ms:
            pairs = self._cache.get(boundary)
            if pairs is None:
                pairs = self._cache[boundary] = list(dict.fromkeys(self.pairs_at(boundary)))
            seen.update(dict.fromkeys(pairs))
            boundary += self.refresh_ms
        return list(seen)
