"""The engine's quiet steps: candles on which only marks, equity and breakers can move.

Part of `pipeline` (`Engine` inherits it). The backtest replay's driver
(`replay_feed.SimDriver`) applies such candles without the strategy, risk and executor
steps, one by one or a stretch at a time; what they change is exactly what
`Engine.process` would (tests compare the runs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, cast

import numpy as np

from anomaly_detection import AnomalyWatch
from capital_allocation import Allocator
from data_manager import DataManager
from models import Candle, Market, TradingState
from pattern_recognition import PatternFilter
from perpetuals import FundingSchedule
from portfolio import Portfolio
from risk_management import RiskManager
from trade_executor import TradeExecutor
from utils.utilities import AuditTrail, Clock


class QuietSteps:
    """The backtest replay's short path: candles on which only marks and equity can move.

    A candle with no signal, no working order on its pair and (when stops are managed) no
    position on its pair goes through no strategy, risk or executor step: it is taken into
    the data window and the counters, marks the positions it prices, and records the equity
    the breakers are fed with, exactly as `Engine.process` would (a test compares the runs).
    """

    # The engine's state it works on (`pipeline.EngineState` sets them).
    predictors: dict[str, Any]
    anomaly_watch: AnomalyWatch | None
    pattern_filter: PatternFilter | None
    sleeves: Allocator | None
    risk_saver: Callable[[], Awaitable[None]] | None
    max_lag_ms: int | None
    data: DataManager
    manage_stops: bool
    portfolio: Portfolio
    risk: RiskManager
    clock: Clock
    timeframe: str
    step: int
    funding: dict[str, FundingSchedule]
    funding_settlements: int
    candles: int
    first_ts: int | None
    last_ts: int | None
    last_close: dict[str, float]
    last_candle_ts: dict[str, int]
    executor: TradeExecutor
    audit: AuditTrail
    market_for: Callable[[str], Market]
    # The engine's steps it runs (`pipeline.Engine` defines them).
    _manage_stop: Callable[[Candle, int], Awaitable[None]]
    _atr: Callable[[str], float | None]
    _take_profit_reached: Callable[[Candle], Awaitable[bool]]

    @property
    def quiet_exact(self) -> bool:
        """Return True when a candle with no signal and no working order changes nothing else.

        Without a model, pattern filter, anomaly watch, capital sleeves or a persisted risk
        state, such a candle moves only the data window, the marks, the equity curve and the
        breakers (fed that equity), which `on_quiet_candle` and `on_quiet_rows` apply. Under
        the standard profile a pair holding a position is never quiet (`quiet_pair`): its
        stop is managed on every candle.
        """
        return (
            not self.predictors
            and self.anomaly_watch is None
            and self.pattern_filter is None
            and self.sleeves is None
            and self.risk_saver is None
            and self.max_lag_ms is None
            and self.data.can_extend_run
        )

    def quiet_pair(self, pair: str) -> bool:
        """Return True when a candle of `pair` without a signal can take the short path."""
        return not self.manage_stops or not self.portfolio.has_position(pair)

    @property
    def decisions_void(self) -> bool:
        """Return True while no candle reaches a decision (a flatten holds).

        Only an operator lifts such a flatten, so `process` returns after the breakers
        (flattening what is open) on every candle until then.
        """
        return self.risk.flatten_holds

    def is_holding(self, pair: str) -> bool:
        """Return True when a position is open on `pair` (its exits are signals too)."""
        return self.portfolio.has_position(pair)

    def defer_stops(self, on: bool) -> None:
        """Let the fills delivered with a candle's match leave their stops to its end.

        Set by the simulated venue's driver around the fills of the candle the engine
        processes next (`executor.flush_stops`, made at the end of `process`): an exit that
        candle decides then sends no stop that it would take off at once.
        """
        self.executor.defer_stops = on

    def on_quiet_candle(self, candle: Candle) -> bool:
        """Apply an admitted candle on which nothing but marks, equity and breakers can move.

        Returns True when the breakers ask to flatten open positions: the caller then
        awaits `trip_flatten`, as `process` does.
        """
        portfolio = self.portfolio
        if portfolio.has_position(candle.pair):
            portfolio.mark(candle.pair, Decimal(repr(candle.close)))
            if self.funding:
                self._settle_funding(candle.pair, candle.ts + self.step, candle.close)
        equity = portfolio.record_equity(candle.ts + self.step)
        return self._must_flatten(self.clock.now_ms(), equity)

    async def on_unsignalled(self, candle: Candle) -> bool:
        """Apply an admitted, matched candle without a signal on which nothing filled.

        What `process` does for it: marks, the stop and the take-profit (stops managed),
        funding, equity and breakers; the strategy has nothing to decide. Returns True
        when the breakers ask to flatten open positions (the caller awaits
        `trip_flatten`, as `process` does).
        """
        pair, portfolio = candle.pair, self.portfolio
        now = self.clock.now_ms()
        if portfolio.has_position(pair):
            portfolio.mark(pair, Decimal(repr(candle.close)))
            if self.manage_stops:
                await self._manage_stop(candle, now)
                await self._take_profit_reached(candle)
        if self.funding:
            self._settle_funding(pair, candle.ts + self.step, candle.close)
        return self._must_flatten(now, portfolio.record_equity(candle.ts + self.step))

    def trails_quietly(self, pair: str) -> bool:
        """Return True when `pair`'s candles may only move its stop, marks and equity.

        Stops managed, a position held, its protective stop working and settled at a level
        known for sure, and no funding to settle: a candle without a signal that neither
        triggers the stop nor reaches the take-profit (`take_profit_hit`) then goes through
        `on_trailing_bar`.
        """
        return (
            self.manage_stops
            and not self.funding
            and not self.decisions_void
            and self.portfolio.has_position(pair)
            and self.executor.trails_in_place(pair)
        )

    def take_profit_hit(self, pair: str, high: float, low: float) -> bool:
        """Return True when a bar reaches the take-profit set on `pair`'s position."""
        portfolio = self.portfolio
        level = portfolio.take_profit_of(pair)
        if level is None:
            return False
        return high >= level if portfolio.signed_qty(pair) > 0 else low <= level

    def stop_atr_span(self) -> tuple[int, int] | None:
        """Return the ATR period of the stops and the bars it is read over, if all in a window.

        The stop's ATR is TA-Lib's over the last ten periods of its pair's window
        (`Engine._atr`); None when the window holds fewer bars than that.
        """
        period = self.risk.settings.atr_period
        return (period, period * 10) if period * 10 <= self.data.window else None

    def on_trailing_bar(
        self,
        pair: str,
        bar: tuple[int, float, float, float],
        atr: float | None,
        now: int,
        working: Decimal,
    ) -> tuple[Decimal | None, bool]:
        """Apply a held pair's bar on which its stop cannot trigger and nothing fills.

        What `process` does for it (the counters, the mark, the stop's move, the equity and
        the breakers) but the amend that sends the move, which the caller makes once for
        several bars (`SimDriver`). `bar` is the open time, high, low and close; the clock is
        at its close, `now`; `atr` is the ATR of the pair's window up to it (`window_atr`
        once the window has taken it, or the same bars read from the archive); `working`
        is the trigger the pair's stop has, moves not sent yet included. The position
        records the new level at once, as the amend's answer would (the next bar's rule
        reads it). Returns the trigger to amend the stop to (None: no amend is due) and
        whether the breakers ask to flatten (the caller amends, then awaits `trip_flatten`).
        The caller has checked that the bar neither triggers the stop nor reaches the
        take-profit and carries no signal, and that the pair `trails_quietly`.
        """
        ts, high, low, close = bar
        self.candles += 1
        if self.first_ts is None:
            self.first_ts = ts
        self.last_ts = ts
        self.last_close[pair] = close
        self.last_candle_ts[pair] = ts
        portfolio = self.portfolio
        portfolio.mark(pair, Decimal(repr(close)))
        moved = None
        stop = self._stop_move(pair, high, low, close, atr, now)
        if stop is not None:
            level = self.executor.trigger_for(pair, stop)
            if level is None:
                raise RuntimeError(f"{pair}: a stop that does not trail in place was trailed")
            if level == working:  # the amend would send nothing (`amend_stop`)
                portfolio.set_protection(pair, stop=stop)
            else:
                portfolio.set_protection(pair, stop=level)  # as the amend's answer sets it
                moved = level
        return moved, self._must_flatten(now, portfolio.record_equity(ts + self.step))

    def _stop_move(
        self, pair: str, high: float, low: float, close: float, atr: float | None, now: int
    ) -> Decimal | None:
        # Where a held pair's bar moves its stop (None: it stays), the move recorded in the
        # audit trail; the caller sends it.
        position = self.portfolio.position(pair)
        if position is None:
            return None
        new_stop = self.risk.manage_stop(
            position,
            high,
            low,
            close,
            atr,
            now,
            taker_fee=self.executor.taker_fee,
            tick_size=self.market_for(pair).tick_size,
        )
        if new_stop is None or new_stop == position.stop_price:
            return None
        # Each move is an exchange request (an amend): skip moves smaller than a tenth
        # of an ATR, which cost rate-limit budget and protect almost nothing.
        old = position.stop_price
        if old is not None and atr and abs(new_stop - old) < Decimal(repr(atr)) / 10:
            return None
        if self.audit.wanted():
            self.audit.record("stop_moved", now, pair=pair, old=str(old), new=str(new_stop))
        return new_stop

    async def send_stop_move(self, pair: str, level: Decimal, candle_ts: int) -> None:
        """Amend the pair's working stop to `level`, the move of its bar opened at `candle_ts`.

        The move `on_trailing_bar` gave and left to its caller, sent as `process` sends it.
        """
        await self.executor.amend_stop(pair, level, candle_ts=candle_ts)

    def window_atr(self, pair: str) -> float | None:
        """Return the stops' ATR over `pair`'s data window as it stands."""
        return self._atr(pair)

    def bars_atr(self, high: np.ndarray, low: np.ndarray, close: np.ndarray) -> float | None:
        """Return the stops' ATR over these bars (the span `stop_atr_span` names)."""
        return last_atr(high, low, close, self.risk.settings.atr_period)

    def _must_flatten(self, now: int, equity: Decimal) -> bool:
        # The breakers' verdict as `process` acts on it: flatten only what is open.
        return (
            self.risk.update(now, equity) is TradingState.FLATTEN and self.portfolio.has_positions()
        )

    def on_quiet_rows(
        self,
        names: list[str],
        held: list[int],
        pair_of: list[int] | None,
        close_ts: list[int],
        closes: Callable[[], list[float]],
        now: list[int],
    ) -> int:
        """Apply quiet candles' marks, equity, breakers and counts in replay order.

        `held` indexes `names` for the pairs holding a position that have a candle here,
        `pair_of` per candle (None: one pair); `close_ts` and `now` give each candle's
        close time and the replay clock, and `closes()` their close prices (asked for only
        when a position is marked). Returns how many were applied:
        fewer than given when the breakers ask to flatten (the last one applied tripped
        them; the caller awaits `trip_flatten`). The data windows take the candles
        through `take_quiet`, at the latest before the pipeline reads them.
        """
        if not close_ts:
            return 0
        if not held:
            count = self._quiet_flat(close_ts, now, distinct=len(names) == 1)
        elif len(names) == 1 and self.risk.all_in:
            self._quiet_run(names[0], close_ts, closes())
            count = len(close_ts)
        else:
            pairs = pair_of if pair_of is not None else [0] * len(close_ts)
            count = self._quiet_each(names, pairs, close_ts, closes(), now)
        self.candles += count
        if self.first_ts is None:
            self.first_ts = close_ts[0] - self.step
        self.last_ts = close_ts[count - 1] - self.step
        return count

    @property
    def reads_windows(self) -> bool:
        """Return True when the pipeline reads the data windows (ATR stops, correlation).

        Under `all_in` it never does: quiet candles may then skip the windows, as they
        always have on that profile (only the views show the windows).
        """
        return not self.risk.all_in

    def take_quiet(
        self, runs: list[tuple[str, np.ndarray, Sequence[np.ndarray]]], *, windows: bool = True
    ) -> None:
        """Take quiet candles into the data windows and the last prices, as `admit` does.

        `runs` holds, per pair, its consecutive candles' open times and OHLCV columns (the
        counts were taken by `on_quiet_rows`); without `windows`, only the last prices.
        """
        for pair, ts, columns in runs:
            if len(ts):
                if windows:
                    self.data.extend_run(pair, self.timeframe, ts, columns)
                self.last_close[pair] = float(columns[3][-1])
                self.last_candle_ts[pair] = int(ts[-1])

    def _quiet_flat(self, close_ts: list[int], now: list[int], *, distinct: bool) -> int:
        # No candle prices a position: the equity is the same at every close, so the curve
        # takes it at each new time in one step and the breakers see it candle by candle.
        portfolio = self.portfolio
        equity = portfolio.record_equity(close_ts[0])
        # Only open positions make a flatten verdict act (`process`, `_flatten`).
        stop_on = TradingState.FLATTEN if portfolio.has_positions() else None
        count = self.risk.update_flat(now, equity, stop_on)
        curve = portfolio.equity_curve
        later = close_ts[1:count]
        if not distinct:  # several pairs close at the same time: one point per time
            last = curve.last_ts
            later = [t for t in dict.fromkeys(later) if t != last]
        curve.extend_flat(later, curve.last_value)
        return count

    def _quiet_each(
        self,
        names: list[str],
        pair_of: list[int],
        close_ts: list[int],
        closes: list[float],
        now: list[int],
    ) -> int:
        # Positions are marked: candle by candle, as `process` does.
        portfolio, funding = self.portfolio, self.funding
        for k, (index, t, close) in enumerate(zip(pair_of, close_ts, closes, strict=True)):
            pair = names[index]
            if portfolio.has_position(pair):
                portfolio.mark(pair, Decimal(repr(close)))
                if funding:
                    self._settle_funding(pair, t, close)
            if self._must_flatten(now[k], portfolio.record_equity(t)):
                return k + 1
        return len(close_ts)

    def _quiet_run(self, pair: str, close_ts: list[int], closes: list[float]) -> None:
        # One pair holding the one position, no breakers: marks and curve a stretch at a time.
        portfolio = self.portfolio
        schedule = self.funding.get(pair)
        if schedule is None:
            portfolio.record_equity_run(pair, close_ts, closes)
            return
        start = 0  # split the stretch at the candles that settle funding
        for k, _ in schedule.bars(close_ts, self.step):
            portfolio.record_equity_run(pair, close_ts[start:k], closes[start:k])
            portfolio.mark(pair, Decimal(repr(closes[k])))
            self._settle_funding(pair, close_ts[k], closes[k])
            portfolio.record_equity(close_ts[k])
            start = k + 1
        portfolio.record_equity_run(pair, close_ts[start:], closes[start:])

    def _settle_funding(self, pair: str, close_ts: int, close: float) -> None:
        # The funding times inside the candle closing at `close_ts`, settled at its close
        # on the position held then (before any fill at that close; see `perpetuals`).
        schedule = self.funding.get(pair)
        if schedule is None or not self.portfolio.has_position(pair):
            return
        due = schedule.due(close_ts - self.step, close_ts)
        if not due:
            return
        rate = 0.0
        for _, r in due:
            rate += r
        self.portfolio.apply_funding(pair, Decimal(repr(close)), Decimal(repr(rate)))
        self.funding_settlements += len(due)


def last_atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> float | None:
    """Return the ATR at the last of these bars (TA-Lib's), or None where it is not finite.

    A stop reads it over the last ten periods of its pair's window (`Engine._atr`); the
    replay's held pairs over the same bars of the archive (`SimDriver`).
    """
    last = float(_atr_function()(high, low, close, period)[-1])
    return last if math.isfinite(last) else None


@functools.cache
def _atr_function() -> Callable[..., np.ndarray]:
    # TA-Lib's ATR itself: `talib.ATR` wraps it in an adapter for pandas and polars series
    # (numpy arrays pass through unchanged), which costs as much as the ATR of 140 bars.
    import talib  # imported on first use: `main.py --help` does not pay for it

    atr = talib.ATR
    return cast(Callable[..., np.ndarray], getattr(atr, "__wrapped__", atr))
