"""The backtest replay's stretches: where quiet stretches end, and how held pairs trail.

Part of `trade_simulator` (re-exported through `replay_feed`). `StretchPlan` marks, over a
replay's candles of all pairs in time order, the candles that need the pipeline (entries,
each pair's first and refused candles) and how far each pair's data window has caught up;
`HeldStretches` is `SimDriver`'s part that applies quiet candles a stretch at a time
(`_stretch`) and a held pair's candles that only trail its stop (`_held_stretch`), as
the per-candle pipeline would (tests compare the runs).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

import numpy as np

from matching_engine import SimulatedExchange, trigger_reached
from models import Candle, Order, Side
from utils.utilities import ReplayClock


if TYPE_CHECKING:
    from replay_feed import ReplayRows


SHORT_STRETCH = 2  # quiet stretches shorter than this go candle by candle (cheaper than arrays)


class CandleSteps(Protocol):
    """What the driver drives: the engine's candle entry points (`pipeline.Engine`)."""

    @property
    def quiet_exact(self) -> bool:
        """Return True when a candle with no signal and no working order changes nothing else."""
        ...

    def quiet_pair(self, pair: str) -> bool:
        """Return True when a candle of `pair` without a signal can take the short path."""
        ...

    @property
    def decisions_void(self) -> bool:
        """Return True while no candle reaches a decision (a flatten holds)."""
        ...

    def is_holding(self, pair: str) -> bool:
        """Return True when a position is open on `pair`."""
        ...

    def admit(self, candle: Candle, received: float | None = None) -> bool:
        """Take a candle into the data and the counters; False if refused."""
        ...

    async def process(self, candle: Candle) -> None:
        """Run an admitted candle through the rest of the pipeline."""
        ...

    def defer_stops(self, on: bool) -> None:
        """While on, a delivered fill's stop waits for the end of the candle's processing."""
        ...

    def on_quiet_candle(self, candle: Candle) -> bool:
        """Apply an admitted quiet candle; True when the breakers ask to flatten."""
        ...

    async def on_unsignalled(self, candle: Candle) -> bool:
        """Apply a matched candle without a signal or a fill; True to flatten."""
        ...

    def trails_quietly(self, pair: str) -> bool:
        """Return True when a held pair's quiet candles may only move its stop."""
        ...

    def take_profit_hit(self, pair: str, high: float, low: float) -> bool:
        """Return True when a bar reaches the take-profit of `pair`'s position."""
        ...

    def on_trailing_bar(
        self,
        pair: str,
        bar: tuple[int, float, float, float],
        atr: float | None,
        now: int,
        working: Decimal,
    ) -> tuple[Decimal | None, bool]:
        """Apply a held pair's bar that can only move its stop.

        Returns the trigger to amend the stop to (None: no amend due) and whether to flatten.
        """
        ...

    async def send_stop_move(self, pair: str, level: Decimal, candle_ts: int) -> None:
        """Amend the pair's working stop to `level`, the move of its bar opened at `candle_ts`."""
        ...

    def stop_atr_span(self) -> tuple[int, int] | None:
        """Return the stops' ATR period and the bars it reads, when a window holds them."""
        ...

    def window_atr(self, pair: str) -> float | None:
        """Return the stops' ATR over `pair`'s data window as it stands."""
        ...

    def bars_atr(self, high: np.ndarray, low: np.ndarray, close: np.ndarray) -> float | None:
        """Return the stops' ATR over these bars."""
        ...

    def on_quiet_rows(
        self,
        names: list[str],
        held: list[int],
        pair_of: list[int] | None,
        close_ts: list[int],
        closes: Callable[[], list[float]],
        now: list[int],
    ) -> int:
        """Apply quiet candles' marks, equity, breakers and counts; return how many."""
        ...

    @property
    def reads_windows(self) -> bool:
        """Return True when the pipeline reads the data windows."""
        ...

    def take_quiet(
        self, runs: list[tuple[str, np.ndarray, Sequence[np.ndarray]]], *, windows: bool = True
    ) -> None:
        """Take quiet candles into the data windows (`windows`) and the last prices."""
        ...

    async def trip_flatten(self) -> None:
        """Act on the circuit breaker's flatten."""
        ...


class QuietSignals(Protocol):
    """Which candles carry a signal (`pipeline.PrecomputedSignals`)."""

    def has_flags(self, candle: Candle) -> bool:
        """Return True if any signal column is set on this candle."""
        ...

    def has_entry(self, candle: Candle) -> bool:
        """Return True if this candle's flags give a flat position a signal."""
        ...

    def flag_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which candles have a signal set."""
        ...

    def entry_mask(self, pair: str, ts: np.ndarray) -> np.ndarray:
        """Return, for candle open times `ts` of `pair`, which give a flat position a signal."""
        ...


class HeldStretches:
    """`SimDriver`'s stretches: quiet candles in one call, held pairs' trailing candles.

    The driver's state it works on (`SimDriver` sets it) and its steps it runs.
    """

    engine: CandleSteps
    sim: SimulatedExchange
    stretches: int
    trailed: int
    _unsignalled: Callable[[Candle], Awaitable[bool]]
    _quiet_one: Callable[[Candle], bool]

    async def _held_stretch(
        self,
        plan: StretchPlan,
        start: int,
        end: int,
        clock: ReplayClock,
        holding: list[int],
        trailing: set[int],
    ) -> tuple[int, bool]:
        # Quiet candles [start, end) while held pairs' stops trail: the other pairs'
        # candles go as in `_stretch`, a held pair's one by one through `on_trailing_bar`
        # (its window first when the archive cannot give the stop's ATR), up to a candle
        # that may trigger its stop or reach its take-profit, which takes the pipeline.
        # A stop's moves go out as one amend, its last (`_send_trails`), before anything
        # reads the venue's stop or the clock passes that move's time: the venue ends with
        # the orders, triggers and times that an amend on every candle gives it. Returns
        # where the replay goes on and whether the breakers asked to flatten.
        pair_of, local, rows = plan.pair_list, plan.local_list, plan.rows
        names, engine, step = rows.names, self.engine, plan.step
        span = engine.stop_atr_span()
        trails: dict[int, _Trail] = {}
        j = start
        while j < end:
            k = pair_of[j]
            if k not in trailing:  # another pair's: up to the next held pair's
                upto = j + 1
                while upto < end and pair_of[upto] not in trailing:
                    upto += 1
                # Its candles move the clock up to their closes: the moves made before go first.
                await self._send_trails(plan, trails, clock, before=int(rows.ts[upto - 1]) + step)
                j, must_flatten = self._quiet_span(plan, j, upto, clock, holding)
                if must_flatten or j < upto:
                    await self._send_trails(plan, trails, clock)
                    return j, must_flatten
                continue
            at, pair = local[j], names[k]
            trail = self._trail(trails, k, pair)
            level = trail.level if trail is not None else None
            opens, highs, lows, closes, _ = rows.pair_columns[k]
            high, low = highs.item(at), lows.item(at)
            if (
                trail is None
                or level is None
                or self._may_exit(trail, level, pair, (opens.item(at), high, low))
            ):
                await self._send_trails(plan, trails, clock)
                self._catch_up(plan, k, at, venue=False)
                self._catch_up_to(plan, [h for h in holding if h != k], j)
                must_flatten = await self._unsignalled(plan.candle(j, clock))
                plan.taken[k] = at + 1
                return j + 1, must_flatten
            atr = self._stop_atr(plan, k, at, span)
            ts = rows.pair_ts[k].item(at)
            now = max(clock.now_ms(), ts + step)  # the clock at its close, as the feed sets it
            self.trailed += 1
            moved, must_flatten = engine.on_trailing_bar(
                pair, (ts, high, low, closes.item(at)), atr, now, level
            )
            trail.at, trail.now = at, now
            if moved is not None:
                trail.level, trail.move = moved, (now, ts)
            j += 1
            if must_flatten:
                await self._send_trails(plan, trails, clock)
                return j, True
        await self._send_trails(plan, trails, clock)
        return j, False

    def _trail(self, trails: dict[int, _Trail], k: int, pair: str) -> _Trail | None:
        # Pair `k`'s trail in this stretch, from its lone working stop on its first bar here
        # (nothing else moves it meanwhile); None when its stop cannot trail the short way.
        trail = trails.get(k)
        if trail is None:
            stop = self._trailing_stop(pair)
            if stop is not None and stop.stop_price is not None:
                trail = trails[k] = _Trail(stop.side, stop.stop_price)
        return trail

    def _trailing_stop(self, pair: str) -> Order | None:
        # The pair's lone working stop at the venue, when it may trail the short way.
        return self.sim.lone_stop(pair) if self.engine.trails_quietly(pair) else None

    def _may_exit(
        self, trail: _Trail, level: Decimal, pair: str, bar: tuple[float, float, float]
    ) -> bool:
        # Whether the bar (open, high, low) triggers the trailed stop (at `level`) or reaches
        # the pair's take-profit.
        open_, high, low = bar
        if trigger_reached(trail.side, level, open_, high, low) is not None:
            return True
        return self.engine.take_profit_hit(pair, high, low)

    def _stop_atr(
        self, plan: StretchPlan, k: int, at: int, span: tuple[int, int] | None
    ) -> float | None:
        # The stop's ATR at pair `k`'s bar `at`: from the archive, else its window's own bars.
        known, atr = self._archive_atr(plan, k, at, span)
        if known:
            return atr
        self._catch_up(plan, k, at + 1, venue=False)
        return self.engine.window_atr(plan.rows.names[k])

    async def _send_trails(
        self,
        plan: StretchPlan,
        trails: dict[int, _Trail],
        clock: ReplayClock,
        *,
        before: int | None = None,
    ) -> None:
        # Amend each trailed stop to its last move, in the order of those moves, the clock at
        # each move's time (as when every bar amends); `before`: only the moves made before
        # that time, the others wait. Without `before` the stretch is done: the clock and
        # the venue's last bars are then left where the trailed bars leave them.
        if before is not None and not any(trail.move is not None for trail in trails.values()):
            return  # the usual case between a held pair's bars: nothing to send yet
        moves = sorted(
            (trail.move, k)
            for k, trail in trails.items()
            if trail.move is not None and (before is None or trail.move[0] < before)
        )
        engine = self.engine
        for (moved_at, candle_ts), k in moves:
            if moved_at > clock.now_ms():
                clock.set(moved_at)
            trail, pair = trails[k], plan.rows.names[k]
            assert trail.level is not None
            await engine.send_stop_move(pair, trail.level, candle_ts)
            trail.move = None
            # The venue's answer decides what follows: a stop that no longer trails in place
            # (the amend refused, its answer lost) sends the pair's next bar to the pipeline.
            stop = self._trailing_stop(pair)
            trail.level = stop.stop_price if stop is not None else None
        if before is not None:
            return
        for k, trail in trails.items():
            if trail.at >= 0:
                self.sim.remember(plan.pair_candle(k, trail.at))
                if trail.now > clock.now_ms():
                    clock.set(trail.now)
        trails.clear()

    def _archive_atr(
        self, plan: StretchPlan, k: int, at: int, span: tuple[int, int] | None
    ) -> tuple[bool, float | None]:
        # The stop's ATR at pair `k`'s bar `at`, read from the archive: the bars its data
        # window ends with once it takes that bar, when none of them was refused (so the
        # window need not take each bar first). (False, None): read the window instead.
        if span is None or at + 1 < span[1]:
            return False, None
        first = at + 1 - span[1]
        refused = plan.refused_of_pair[k]
        last = bisect.bisect_right(refused, at)  # refused bars up to `at`
        if last and refused[last - 1] >= first:
            return False, None
        _, high, low, close, _ = plan.rows.pair_columns[k]
        bars = slice(first, at + 1)
        return True, self.engine.bars_atr(high[bars], low[bars], close[bars])

    def _quiet_span(
        self, plan: StretchPlan, start: int, end: int, clock: ReplayClock, holding: list[int]
    ) -> tuple[int, bool]:
        # Quiet candles of pairs without a trailing stop: one by one when few, else a stretch.
        if end - start >= SHORT_STRETCH:
            return self._stretch(plan, start, end, clock, holding)
        pair_of, local = plan.pair_list, plan.local_list
        for j in range(start, end):
            k = pair_of[j]
            self._catch_up(plan, k, local[j], venue=False)
            must_flatten = self._quiet_one(plan.candle(j, clock))
            plan.taken[k] = local[j] + 1
            if must_flatten:
                return j + 1, True
        return end, False

    def _catch_up(self, plan: StretchPlan, k: int, upto: int, *, venue: bool = True) -> None:
        # Hand pair `k`'s quiet candles below its own index `upto` to its data window and
        # (`venue`) the venue, which keeps only the last bar of a pair without orders.
        # Right before a candle of the pair itself the venue's bar is not needed: that
        # candle replaces it before anything reads it.
        start = plan.taken[k]
        if upto <= start or not (venue or plan.windows):
            return
        if not plan.windows:  # the views' last prices only (`reads_windows`)
            start = upto - 1
        ts = plan.rows.pair_ts[k][start:upto]
        columns = tuple(c[start:upto] for c in plan.rows.pair_columns[k])
        self.engine.take_quiet([(plan.rows.names[k], ts, columns)], windows=plan.windows)
        if venue:  # nothing of the pair's works that its bars could trade
            self.sim.remember(plan.pair_candle(k, upto - 1))
        plan.taken[k] = upto

    def _catch_up_to(self, plan: StretchPlan, pairs: Iterable[int], upto: int) -> None:
        # As `_catch_up`, up to the replay's candle `upto` (each pair's own index found).
        for k in pairs:
            self._catch_up(plan, k, plan.before(k, upto))

    def _stretch(
        self, plan: StretchPlan, start: int, end: int, clock: ReplayClock, holding: list[int]
    ) -> tuple[int, bool]:
        # Apply quiet candles [start, end) in one call; return where the replay goes on
        # and whether the breakers asked to flatten on the last one applied.
        rows = plan.rows
        close_ts = plan.close_times(start, end)
        now, at = close_ts, clock.now_ms()
        if now[0] < at:  # the clock never goes back (a start time after the first close)
            now = [max(t, at) for t in now]
        pairs = plan.pair_list[start:end].tolist() if len(rows.names) > 1 else None
        # The held pairs with a candle here (the one pair's are all its candles).
        if pairs is None or not holding:
            held = holding
        else:
            present = set(pairs)
            held = [k for k in holding if k in present]
        count = self.engine.on_quiet_rows(
            rows.names,
            held,
            pairs,
            close_ts,
            lambda: plan.closes(start, end),
            now,
        )
        self.stretches += 1
        if now[count - 1] > clock.now_ms():
            clock.set(now[count - 1])
        return start + count, start + count < end


def _indexed(values: np.ndarray, dtype: type[np.generic]) -> memoryview:
    """Return `values` for reads item by item from Python: a memoryview, not a copy.

    An item costs what an `array`'s or a list's does (a Python bool or int made on the
    read), and nothing is held per candle beyond the array's own bytes.
    """
    return np.ascontiguousarray(values, dtype=dtype).data


class _Trail:
    """A held pair's stop as a held stretch trails it, its amend held back (`_held_stretch`)."""

    __slots__ = ("at", "level", "move", "now", "side")

    def __init__(self, side: Side, level: Decimal) -> None:
        self.side = side
        # The trigger it has, the move not sent yet included (None: it no longer trails
        # the short way, after an amend that did not take).
        self.level: Decimal | None = level
        self.at = -1  # the pair's last bar applied (the venue's last bar when done)
        self.now = 0  # the clock at that bar's close
        # The clock at the close and the open time of the bar whose move is not sent yet.
        self.move: tuple[int, int] | None = None


class StretchPlan:
    """Where a replay's quiet stretches end, and how far each pair's window has caught up."""

    def __init__(self, rows: ReplayRows, quiet: QuietSignals, step: int, timeframe: str) -> None:
        self.rows = rows
        self.step = step
        self.timeframe = timeframe
        n, several = len(rows.ts), len(rows.names) > 1
        entry = np.zeros(n, dtype=bool)
        first = np.zeros(n, dtype=bool)
        flagged = np.zeros(n, dtype=bool)
        # Per pair: its candles' indices in the replay, its flagged candles, and how many
        # of its candles its data window has taken (`taken`).
        self.of_pair: list[np.ndarray | None] = []  # None: the replay's one pair
        self.flagged_of_pair: list[np.ndarray] = []
        self.taken: list[int] = [0] * len(rows.names)
        self.refused_of_pair: list[list[int]] = []
        self.windows = True  # quiet candles go into the data windows (`reads_windows`)
        for k, pair in enumerate(rows.names):
            # One pair: its candles are the replay's, with no index array (8 bytes a candle).
            at: np.ndarray | slice = np.flatnonzero(rows.pair_of == k) if several else slice(None)
            ts = rows.pair_ts[k]
            entry[at] = quiet.entry_mask(pair, ts)  # a flat pair's signals: entries
            flagged[at] = quiet.flag_mask(pair, ts)  # a held pair's: any flag
            own = np.flatnonzero(flagged[at])  # the pair's own indices of its flagged candles
            self.of_pair.append(at if isinstance(at, np.ndarray) else None)
            self.flagged_of_pair.append(at[own] if isinstance(at, np.ndarray) else own)
            o, h, lo, c, v = rows.pair_columns[k]
            # What the data window refuses (`DataManager.on_candle`) goes candle by candle.
            valid = (lo > 0) & (lo <= o) & (o <= h) & (h < np.inf) & (lo <= c) & (c <= h)
            refused = np.flatnonzero(~(valid & (v >= 0) & (v < np.inf)))
            self.refused_of_pair.append(refused.tolist())  # own indices, usually none
            if isinstance(at, np.ndarray):
                first[at[refused]] = True
                if len(at):
                    first[at[0]] = True  # a pair's first candle opens its data window
            elif n:
                first[refused] = True
                first[0] = True
        self.forced = np.flatnonzero(first | entry)  # entries, first and refused candles
        self.first = np.flatnonzero(first)  # first and refused candles only
        # The driver reads these candle by candle: memoryviews of the arrays themselves
        # (1-4 bytes a candle, no second copy), where Python lists would hold a pointer
        # and often an int object per candle (~110 bytes).
        self.is_first = _indexed(first, np.bool_)
        self.is_entry = _indexed(entry, np.bool_)
        self.is_flagged = _indexed(flagged, np.bool_)
        self.pair_list: memoryview = (
            _indexed(rows.pair_of, np.int16) if several else rows.pair_of.data  # zero-stride
        )
        self.local_list: memoryview | range = (
            rows.local if isinstance(rows.local, range) else _indexed(rows.local, np.int32)
        )

    def quiet_until(
        self, start: int, hot: list[int], holding: list[int], *, void: bool = False
    ) -> int:
        """Return the first candle from `start` on that must take the pipeline (or the end).

        With `void` (decisions are void: a held flatten), entry flags end nothing.
        """
        forced = self.first if void else self.forced
        at = int(np.searchsorted(forced, start))
        end = int(forced[at]) if at < len(forced) else len(self.rows.ts)
        if any(self.of_pair[k] is None for k in hot):
            return min(start, end)  # the one pair's every candle takes the pipeline
        for rows in [self.of_pair[k] for k in hot] + [self.flagged_of_pair[k] for k in holding]:
            assert rows is not None
            at = int(np.searchsorted(rows, start))
            if at < len(rows) and rows[at] < end:
                end = int(rows[at])
        return end

    def before(self, k: int, upto: int) -> int:
        """Return how many of pair `k`'s candles come before the replay's candle `upto`."""
        rows = self.of_pair[k]
        return upto if rows is None else int(np.searchsorted(rows, upto))

    def close_times(self, start: int, end: int) -> list[int]:
        """Return the close times (ms) of the replay's candles [start, end)."""
        result: list[int] = (self.rows.ts[start:end] + self.step).tolist()
        return result

    def closes(self, start: int, end: int) -> list[float]:
        """Return the close prices of the replay's candles [start, end)."""
        columns = self.rows.pair_columns
        if len(columns) == 1:
            result: list[float] = columns[0][3][start:end].tolist()
            return result
        return [
            float(columns[k][3][j])
            for k, j in zip(self.pair_list[start:end], self.local_list[start:end], strict=True)
        ]

    def candle(self, k: int, clock: ReplayClock | None = None) -> Candle:
        """Return candle `k` (moving `clock` to its close when given, as the feed does)."""
        close_ts = int(self.rows.ts[k]) + self.step
        if clock is not None and close_ts > clock.now_ms():
            clock.set(close_ts)
        return self.pair_candle(self.pair_list[k], self.local_list[k])

    def pair_candle(self, k: int, j: int) -> Candle:
        """Return the `j`-th candle of pair `k`."""
        o, h, lo, c, v = self.rows.pair_columns[k]  # `item`: a Python float, no numpy scalar
        ts = self.rows.pair_ts[k].item(j)
        return Candle(
            self.rows.names[k],
            self.timeframe,
            ts,
            o.item(j),
            h.item(j),
            lo.item(j),
            c.item(j),
            v.item(j),
        )
