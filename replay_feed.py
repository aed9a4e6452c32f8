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

    def admit(self, candle: Candle, received: float | None = None) -> bool:
        """Take a candle into the data and the counters; False if refused."""
        ...

    async def process(self, candle: Candle) -> None:
        """Run an admitted candle through the rest of the pipeline."""
        ...

    def on_quiet_candle(self, candle: Candle) -> None:
        """Apply a candle that can change only the marks and the equity curve."""
        ...

    def on_quiet_run(self, last: Candle, close_ts: list[int], closes: list[float]) -> None:
        """Apply consecutive quiet candles of one pair at once."""
        ...


class QuietSignals(Protocol):
    """Which candles carry a signal (`pipeline.PrecomputedSignals`)."""

    def has_flags(self, candle: Candle) -> bool:
        """Return True if any signal column is set on this candle."""
        ...

    def flag_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which candles have a signal set."""
        ...


class SimDriver:
    """Hand each closed candle to the engine with the simulated exchange in front of it.

    The engine admits the candle, the simulated exchange matches its working orders
    against it and delivers the fills through its sink (the engine's fill entry point,
    as the private stream delivers the live exchange's), then the engine processes the
    candle: the venue has filled what it would have by the time the candle closed. Used
    by replays and backtests, and by paper trading on the live feed.

    Backtests can take a short path (`enable_quiet_path`): a candle with no signal and no
    working order on its pair changes only the marks and the equity curve, and a one-pair
    replay applies such candles a stretch at a time (`run`).
    """

    def __init__(self, engine: CandleSteps, sim: SimulatedExchange) -> None:
        self.engine = engine
        self.sim = sim
        # Bound once: they run on every candle.
        self._admit, self._process, self._match = engine.admit, engine.process, sim.on_candle
        self._quiet: QuietSignals | None = None
        self.quiet_runs = False

    def enable_quiet_path(self, signals: QuietSignals) -> None:
        """Let a backtest skip the full pipeline on candles where nothing can happen.

        Only when the engine says such a candle changes nothing but the curve (the
        `all_in` profile with precomputed signals and no model). The same trades and
        curve come out (a test compares both).
        """
        if not self.engine.quiet_exact:
            raise ValueError("the quiet path is exact only under all_in without a model")
        self._quiet = signals
        self.quiet_runs = True  # a one-pair replay may apply quiet stretches in one call

    async def on_candle(self, candle: Candle, received: float | None = None) -> None:
        """Match `candle` on the simulated exchange and run it through the engine."""
        quiet = self._quiet
        if (
            quiet is not None
            and not quiet.has_flags(candle)
            and not self.sim.has_working(candle.pair)
        ):
            self._match(candle)  # nothing works on this pair: it only remembers the bar
            self.engine.on_quiet_candle(candle)
            return
        if self._admit(candle, received):
            fills = self._match(candle)  # `sim.match`, without a coroutine when none fill
            if fills or self.sim.has_updates:
                await self.sim.deliver(fills)
            await self._process(candle)

    async def match(self, candle: Candle) -> None:
        """Match an admitted candle on the simulated exchange and deliver its fills.

        What `on_candle` does between the engine's `admit` and `process`, for a caller
        that admits and processes itself (a burst decided together).
        """
        fills = self._match(candle)
        if fills or self.sim.has_updates:
            await self.sim.deliver(fills)

    def on_quiet_run(self, last: Candle, close_ts: list[int], closes: list[float]) -> None:
        """Apply consecutive quiet candles of one pair at once; `last` is the stretch's last."""
        self.sim.on_candle(last)  # nothing works on this pair: it only remembers the last bar
        self.engine.on_quiet_run(last, close_ts, closes)

    async def run(self, feed: ReplayFeed, stop: asyncio.Event) -> bool:
        """Drive a one-pair backtest replay, quiet stretches at a time; False if not possible.

        With the quiet path on, the candles between two that carry a signal change nothing
        but the equity curve and the marks while no order works, so they are applied in one
        call (`on_quiet_run`) instead of one pipeline pass each; a candle with a signal, or
        one arriving while an order works, takes the whole pipeline. The trades and the
        equity curve are those of the per-candle path (a test compares all three).
        """
        quiet = self._quiet
        single = feed.single_pair() if quiet is not None and self.quiet_runs else None
        if quiet is None or single is None:
            return False
        pair, ts, ohlcv = single
        clock, step, timeframe = feed.clock, feed.step, feed.timeframe
        flagged = np.flatnonzero(quiet.flag_mask(pair, ts))
        is_flagged = np.zeros(len(ts), dtype=bool)
        is_flagged[flagged] = True
        has_working, on_candle = self.sim.has_working, self.on_candle
        # Python lists once: slicing them per stretch is far cheaper than numpy -> list.
        close_ts, closes = (ts + step).tolist(), ohlcv[:, 3].tolist()
        n, i, next_yield = len(ts), 0, feed.yield_every
        while i < n and not stop.is_set():
            if is_flagged[i] or has_working(pair):
                if close_ts[i] > clock.now_ms():
                    clock.set(close_ts[i])
                o, h, lo, c, v = ohlcv[i].tolist()
                await on_candle(Candle(pair, timeframe, close_ts[i] - step, o, h, lo, c, v))
                i += 1
            else:
                at = int(np.searchsorted(flagged, i))
                end = int(flagged[at]) if at < len(flagged) else n
                if close_ts[end - 1] > clock.now_ms():
                    clock.set(close_ts[end - 1])
                o, h, lo, c, v = ohlcv[end - 1].tolist()
                last = Candle(pair, timeframe, close_ts[end - 1] - step, o, h, lo, c, v)
                self.on_quiet_run(last, close_ts[i:end], closes[i:end])
                i = end
            if i >= next_yield:
                feed.advance_to(i)
                next_yield = i + feed.yield_every
                await asyncio.sleep(0)
        feed.advance_to(i, done=True)
        return True


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
