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
from models import Candle, Fill, Order
from replay_stretches import SHORT_STRETCH, CandleSteps, HeldStretches, QuietSignals, StretchPlan
from utils.utilities import ReplayClock, timeframe_to_ms


log = structlog.get_logger(__name__)
_CHUNK = 8_192  # candles turned into Python numbers at a time


# -- Replay feed -----------------------------------------------------------------------------

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ReplayRows:
    """A replay's candles in the order the feed emits them, and each pair's own arrays.

    `names` are the pairs (sorted); candle `k` of the replay is candle `local[k]` of pair
    `pair_of[k]` and opens at `ts[k]` (ms). Per pair, `pair_ts` are its open times and
    `pair_columns` its open, high, low, close and volume, read from its frame without a
    copy where the frame allows. With one pair nothing is held per candle for the
    indices: `pair_of` is a zero-stride view of 0 and `local` the range of the candles.
    """

    names: list[str]
    pair_of: np.ndarray
    local: np.ndarray | range
    ts: np.ndarray
    pair_ts: list[np.ndarray]
    pair_columns: list[tuple[np.ndarray, ...]]


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
        """Return every candle of the replay as arrays, in its (ts, pair) order.

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
        pair_ts = [_open_ms(f) for f in frames]
        pair_columns = [
            tuple(
                f[c].to_numpy(dtype=np.float64) for c in ("open", "high", "low", "close", "volume")
            )
            for f in frames
        ]
        local: np.ndarray | range
        if len(names) == 1:
            n = len(pair_ts[0])
            pair_of, local, ts = np.broadcast_to(np.int16(0), (n,)), range(n), pair_ts[0]
        else:
            sizes = [len(t) for t in pair_ts]
            pair_of = np.repeat(np.arange(len(names), dtype=np.int16), sizes)
            local = np.concatenate([np.arange(size, dtype=np.int32) for size in sizes])
            ts = np.concatenate(pair_ts)
            # The merge's order: by open time, then by pair name (a stable sort keeps the
            # pairs' sorted order among equal times).
            order = np.argsort(ts, kind="stable")
            ts, pair_of, local = ts[order], pair_of[order], local[order]
        return ReplayRows(names, pair_of, local, ts, pair_ts, pair_columns)

    def advance_to(self, emitted: int, *, done: bool = False) -> None:
        """Record how many candles an array consumer has processed; report progress."""
        before, self.emitted = self.emitted, emitted
        every = self.progress_every
        if self.progress is not None and (done or emitted // every > before // every):
            self.progress(emitted, len(self))

    def next_segment(self) -> bool:
        """Move to the archive's next segment (`SegmentedReplayFeed`); False: none is left."""
        return False

    def __aiter__(self) -> AsyncIterator[Candle]:
        """Yield candles in (ts, pair) order."""
        return self.part_candles()

    async def part_candles(self) -> AsyncIterator[Candle]:
        """Yield the candles of the frames held now, in (ts, pair) order.

        All of a replay's; a segmented replay's segment held (`SegmentedReplayFeed`).
        """
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


class SegmentedReplayFeed(ReplayFeed):
    """A backtest's archive replayed a time segment at a time: memory flat in the span.

    `windows` are consecutive [start, end) open-time ranges from the archive's start and
    `load(start, end)` returns the candles of every pair with some in that range (pairs
    with none left out); candles before `start_ms` are not replayed, but their segments
    still go to `on_segment`, as a whole archive's rows all go to its signals. The feed
    holds one segment's frames at a time (`frames`); `next_segment` loads the next one and
    hands it to `on_segment` (the precomputed signals go on from the last segment) before
    anything reads it.
    `total` is the candles of all segments (progress). A consumer walking arrays
    (`SimDriver.run`) takes each segment's `rows`; iterating the feed yields every segment's
    candles in turn. Candles, order and clock are those of the whole archive replayed at
    once: the segments are cut on time, so no candle of a pair lands before an earlier one.
    """

    def __init__(
        self,
        windows: Sequence[tuple[int, int]],
        load: Callable[[int, int], dict[str, pd.DataFrame]],
        total: int,
        timeframe: str,
        clock: ReplayClock,
        *,
        start_ms: int | None = None,
        progress: Progress | None = None,
        yield_every: int = 1,
    ) -> None:
        self._windows = list(windows)
        self._load = load
        self._total = total
        self._next = 0
        self._offset = 0  # candles of the segments before the one held
        self.taken = 0  # segments loaded so far
        self.on_segment: Callable[[dict[str, pd.DataFrame]], None] | None = None
        super().__init__(
            {}, timeframe, clock, start_ms=start_ms, progress=progress, yield_every=yield_every
        )
        self.frames = self._take() or {}

    def _take(self) -> dict[str, pd.DataFrame] | None:
        # The next window's frames, skipping windows without candles; None past the last.
        while self._next < len(self._windows):
            start, end = self._windows[self._next]
            self._next += 1
            frames = self._load(start, end)
            if frames:
                self.taken += 1
                return frames
        return None

    def __len__(self) -> int:
        return self._total

    def next_segment(self) -> bool:
        """Load the next segment in place of the one held; False when none is left."""
        held = sum(len(self._slice(frame)) for frame in self.frames.values())
        self.frames = {}  # the last segment's candles go before the next one's come
        frames = self._take()
        if frames is None:
            return False
        self._offset += held
        self.frames = frames
        if self.on_segment is not None:
            self.on_segment(frames)
        return True

    def advance_to(self, emitted: int, *, done: bool = False) -> None:
        """Record how far into the segment held an array consumer is (progress overall)."""
        super().advance_to(self._offset + emitted, done=done)

    async def __aiter__(self) -> AsyncIterator[Candle]:
        """Yield every segment's candles in (ts, pair) order, a segment at a time."""
        while True:
            async for candle in self.part_candles():
                yield candle
            if not self.next_segment():
                return


# -- The simulated exchange's driver ---------------------------------------------------------


# The longest stretch applied in one call: its close times and prices become Python lists
# (about 70 bytes a candle), so a halted account's quiet years go a slice at a time.
_LONGEST = 1 << 16


class SimDriver(HeldStretches):
    """Hand each closed candle to the engine with the simulated exchange in front of it.

    The engine admits the candle, the simulated exchange matches its working orders
    against it and delivers the fills through its sink (the engine's fill entry point,
    as the private stream delivers the live exchange's), then the engine processes the
    candle: the venue has filled what it would have by the time the candle closed. Used
    by replays and backtests, and by paper trading on the live feed.

    Backtests can take a short path (`enable_quiet_path`): a candle that gives no signal
    (no entry flag on a flat pair, no flag on a held one), with no working order on its
    pair and (stops managed) no position there, changes only the data window, the marks,
    the equity curve and the breakers, and an unpaced replay applies such candles a
    stretch at a time, across all its pairs (`run`).
    """

    def __init__(self, engine: CandleSteps, sim: SimulatedExchange) -> None:
        self.engine = engine
        self.sim = sim
        # Bound once: they run on every candle.
        self._admit, self._process, self._match = engine.admit, engine.process, sim.on_candle
        self._quiet: QuietSignals | None = None
        self.quiet_runs = False
        self.stretches = 0  # quiet stretches applied in one call (`run`)
        self.trailed = 0  # held pairs' candles that only moved the stop (`_held_stretch`)

    async def _deliver(self, fills: list[tuple[Order, Fill]]) -> None:
        # A candle's fills, which its processing follows at once: their stops are placed
        # at the candle's end, and not at all if the candle exits (`Engine.defer_stops`).
        defer = self.engine.defer_stops
        defer(True)
        try:
            await self.sim.deliver(fills)
        finally:
            defer(False)

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
        quiet, engine, pair = self._quiet, self.engine, candle.pair
        if quiet is None or self.sim.has_working(pair) or not engine.quiet_pair(pair):
            return False
        if not engine.quiet_exact:
            return False  # a watch or a saver wired after the path was enabled reads it
        if engine.decisions_void:
            return True  # `process` stops at the breakers: no flag leads anywhere
        # A flat pair's exit flags give no signal (`decide_signal`): only entries count.
        return not (quiet.has_flags(candle) if engine.is_holding(pair) else quiet.has_entry(candle))

    async def on_candle(self, candle: Candle, received: float | None = None) -> None:
        """Match `candle` on the simulated exchange and run it through the engine."""
        if self._is_quiet(candle):
            if self._quiet_one(candle, received):
                await self.engine.trip_flatten()
            return
        await self._full(candle, received)

    async def _full(self, candle: Candle, received: float | None = None) -> None:
        # The whole pipeline: admit, match (fills delivered), process.
        if self._admit(candle, received):
            fills = self._match(candle)  # `sim.match`, without a coroutine when none fill
            if fills or self.sim.has_updates:
                await self._deliver(fills)
            await self._process(candle)

    async def _unsignalled(self, candle: Candle) -> bool:
        # A candle without a signal on a pair with a working order or (stops managed) a
        # position: when nothing fills, only its marks, stop, take-profit, equity and
        # breakers can move (`on_unsignalled`); otherwise the whole pipeline. True when
        # the breakers ask to flatten.
        if not self._admit(candle, None):
            return False
        fills = self._match(candle)
        if fills or self.sim.has_updates:
            await self._deliver(fills)
            await self._process(candle)
            return False
        return await self.engine.on_unsignalled(candle)

    def _quiet_one(self, candle: Candle, received: float | None = None) -> bool:
        # A quiet candle on its own; True when the breakers ask to flatten on it.
        if self._admit(candle, received):
            self._match(candle)  # nothing works on this pair: it only remembers the bar
            return self.engine.on_quiet_candle(candle)
        return False

    async def match(self, candle: Candle) -> None:
        """Match an admitted candle on the simulated exchange and deliver its fills.

        What `on_candle` does between the engine's `admit` and `process`, for a caller
        that admits and processes itself (a burst decided together).
        """
        fills = self._match(candle)
        if fills or self.sim.has_updates:
            await self._deliver(fills)

    async def run(self, feed: ReplayFeed, stop: asyncio.Event) -> bool:
        """Drive an unpaced backtest replay, quiet stretches at a time; False if not possible.

        A segmented archive (`SegmentedReplayFeed`) is driven a segment at a time, each
        pair's window and last bar caught up at the end of each; a segment the arrays cannot
        take goes candle by candle (`on_candle`).
        """
        if not await self._run_part(feed, stop):
            return False
        while not stop.is_set() and feed.next_segment():
            if not await self._run_part(feed, stop):
                async for candle in feed.part_candles():
                    if stop.is_set():
                        break
                    await self.on_candle(candle)
        return True

    async def _run_part(self, feed: ReplayFeed, stop: asyncio.Event) -> bool:
        """Drive the frames the feed holds (see `run`); False if the arrays cannot.

        A candle that may give a signal, or of a pair with a working order (or, stops
        managed, a position), takes the whole pipeline. The candles up to the next such
        candle of any pair, in the replay's time order, are quiet: their marks, equity and
        breakers are applied in one call (`on_quiet_rows`), and each pair's data window
        and last bar catch up before anything reads them (before a candle of that pair,
        a pipeline pass that may read it, a flatten, or a yield to the loop). A working
        stop or take-profit makes its pair's every candle go through the pipeline (the
        stop may trail), while the other pairs' quiet candles between them still go a
        stretch at a time. The trades, orders and equity curve are those of the
        per-candle path (tests compare them).
        """
        quiet = self._quiet
        ready = quiet is not None and self.quiet_runs and self.engine.quiet_exact
        rows = feed.rows() if ready else None
        if quiet is None or rows is None:
            return False
        plan = StretchPlan(rows, quiet, feed.step, feed.timeframe)
        plan.windows = self.engine.reads_windows
        clock, i, n, next_yield = feed.clock, 0, len(rows.ts), feed.yield_every
        candle, every = plan.candle, range(len(rows.names))
        first, entry, flagged, pair_of, local = (
            plan.is_first,
            plan.is_entry,
            plan.is_flagged,
            plan.pair_list,
            plan.local_list,
        )
        hot, holding, trailing, void = self._pair_states(rows.names)
        while i < n and not stop.is_set():
            k = pair_of[i]
            must_flatten = False
            signal = not void and (entry[i] or (flagged[i] and k in holding))
            if first[i] or k in hot or signal:
                # The pipeline reads this pair's window and the held pairs' (correlation).
                self._catch_up(plan, k, local[i], venue=False)
                self._catch_up_to(plan, [h for h in holding if h != k], i)
                if first[i] or signal or void:
                    # A pair's first candle may be quiet; the others here are not.
                    step = self.on_candle if first[i] and not (signal or k in hot) else self._full
                    await step(candle(i, clock))
                else:  # a working order or a held position, and no signal
                    must_flatten = await self._unsignalled(candle(i, clock))
                plan.taken[k] = local[i] + 1
                hot, holding, trailing, void = self._pair_states(rows.names)  # fills, orders, exits
                i += 1
            else:
                end = plan.quiet_until(i, hot, [] if void else holding, void=void)
                if trailing:  # held stops may trail (tens of us a candle: yield on time)
                    end = min(end, max(next_yield, i + 1))
                    i, must_flatten = await self._held_stretch(
                        plan, i, end, clock, holding, set(trailing)
                    )
                    hot, holding, trailing, void = self._pair_states(rows.names)
                elif end - i < SHORT_STRETCH:
                    while i < end and not must_flatten:
                        k = pair_of[i]
                        self._catch_up(plan, k, local[i], venue=False)
                        must_flatten = self._quiet_one(candle(i, clock))
                        plan.taken[k] = local[i] + 1
                        i += 1
                else:
                    end = min(end, i + _LONGEST)
                    i, must_flatten = self._stretch(plan, i, end, clock, holding)
            if must_flatten:
                self._catch_up_to(plan, every, i)  # the exits read the held pairs' bars
                await self.engine.trip_flatten()
                hot, holding, trailing, void = self._pair_states(rows.names)
            if i >= next_yield:
                self._catch_up_to(plan, every, i)  # what the views read between yields
                feed.advance_to(i)
                next_yield = i + feed.yield_every
                await asyncio.sleep(0)
                # An operator's command may have changed them.
                hot, holding, trailing, void = self._pair_states(rows.names)
        self._catch_up_to(plan, every, i)
        feed.advance_to(i, done=True)
        return True

    def _pair_states(self, names: list[str]) -> tuple[list[int], list[int], list[int], bool]:
        # The pairs whose every candle needs the pipeline now (an order works, or a
        # managed stop that cannot go the short way), the pairs holding a position (any
        # flag is a signal there), the held pairs whose stop alone works and may trail on
        # quiet candles (`_held_stretch`), and whether decisions are void (a held
        # flatten: no flag leads anywhere).
        # One look at each pair, after every pipeline candle: a flat pair (most of them)
        # is hot only while an order works on it.
        engine, sim = self.engine, self.sim
        hot: list[int] = []
        holding: list[int] = []
        trailing: list[int] = []
        for k, pair in enumerate(names):
            if not engine.is_holding(pair):
                if sim.has_working(pair):
                    hot.append(k)
                continue
            holding.append(k)
            if engine.trails_quietly(pair) and sim.lone_stop(pair) is not None:
                trailing.append(k)
            elif sim.has_working(pair) or not engine.quiet_pair(pair):
                hot.append(k)
        return hot, holding, trailing, engine.decisions_void


def _open_ms(frame: pd.DataFrame) -> np.ndarray:
    """Return a frame's open times as int64 epoch ms (its own values when already in ms)."""
    index = frame.index
    assert isinstance(index, pd.DatetimeIndex)
    ms = index if index.unit == "ms" else index.as_unit("ms")
    return np.asarray(ms.asi8, dtype=np.int64)


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
