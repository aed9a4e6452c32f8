"""The fast path under the standard risk profile: one spot pair, long only.

Part of `trade_simulator` (`fast_path.fast_backtest` hands a run here when its risk profile
is `standard`). The replay (`--mode backtest`) decides a standard-profile run candle by
candle through the engine, the executor, the protective stops and the simulated exchange;
this module takes the same decisions over the candle arrays directly, and books the same
money in `Decimal`, operation for operation:

* entries decided and sized by the replay's own `RiskManager.evaluate` (fixed fractional
  on the stop distance, Kelly on the closed trades' returns, or volatility targeting on
  the pair's recent returns; the reduced rung's factor, the exposure caps, the lot),
  filled at the next open with the slippage and the taker fee (with `fill_at="close"`,
  at once at the deciding bar's close), their stop (`2 x ATR` under the signal's close,
  on the tick grid upwards) working from the bar after the fill;
* the stop moved on each held bar as `StopManager` moves it (trailing behind the best
  price, break-even once armed at 1R, never beyond the close, a move under a tenth of the
  ATR skipped), triggered and filled as the simulated exchange triggers and fills it;
* the managed take-profit, the strategy's exits and the breakers' flatten, each a market
  exit at the next open (or the close);
* the circuit breakers themselves: the real `CircuitBreakers`, fed the exact equity of
  every candle and every closed trade in the replay's order (each closed trade through
  the risk manager's `on_trade_closed`, which keeps Kelly's returns too).

The ATR is TA-Lib's over the last ten periods of the window, recomputed on every bar as the
replay's `Engine._atr` does (`fast_kernels.stop_atr`, bit for bit). Held bars on which
nothing but the stop's trail, the marks and the equity can change are applied by a numba
pass (`fast_kernels.hold_scan`) in float64, each decision it takes on a threshold checked
with a margin; a bar it cannot decide for sure, and every fill, entry and change of rung,
is taken here in `Decimal`.

`standard_blockers` names what only the replay models (then the replay runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import numpy as np
import pandas as pd

from circuit_breakers import (
    CircuitBreakers,
    advance_quietly,
    breaker_report,
    floor_factors,
    quiet_band,
)
from config import RiskSettings
from fast_kernels import hold_scan, stop_atr
from fast_path import BacktestResult, _Bars
from matching_engine import sim_market, slipped_price
from models import (
    ClosedTrade,
    Market,
    OrderIntent,
    PositionSide,
    Side,
    Signal,
    TradingState,
    strategy_tag,
)
from risk_guards import ReturnsView
from risk_management import RiskContext, RiskManager
from run_summary import BreakerTrip, OpenPosition, TradingSpan
from strategy import Strategy


ZERO = Decimal(0)
_BPS = Decimal(10000)
_ENTRY_STATES = frozenset({TradingState.NORMAL, TradingState.REDUCED})


def tick_exponent(tick: Decimal) -> int:
    """Return e with tick == 10**e (the simulated markets' ticks are powers of ten)."""
    exponent = tick.normalize().as_tuple().exponent
    assert isinstance(exponent, int), tick
    assert tick == Decimal(1).scaleb(exponent), tick
    return exponent


def _dec(value: float) -> Decimal:
    # A candle value or a float setting as the replay reads it: its shortest repr.
    return Decimal(repr(value))


def _ceil_tick(price: Decimal, tick: Decimal) -> Decimal:
    return (price / tick).to_integral_value(ROUND_CEILING) * tick


@dataclass(slots=True)
class _Held:
    """The open position and its protection, as portfolio, executor and venue hold them."""

    qty: Decimal
    entry: Decimal
    fee: Decimal
    opened: int  # the fill bar's open time (ms)
    s0: Decimal  # the entry's stop, unrounded (the position's stop until the first move)
    tp: Decimal | None
    cid: str  # the entry's client order id (names its stop's fills)
    stop: Decimal  # the position's recorded stop
    venue: Decimal | None = None  # the working stop's trigger (None: pending or none)
    placed: bool = False  # the stop order exists at the venue
    best: Decimal | None = None  # the stop track (None until the first managed bar)
    risk: Decimal | None = None
    armed: bool = False
    be: Decimal | None = None  # the break-even price (constant for the position)


@dataclass(slots=True)
class _Pending:
    """A market order working at the venue: fills at the next bar's open."""

    side: Side
    qty: Decimal
    reason: str
    # An entry's protection: stop, take-profit, client id.
    s0: Decimal = ZERO
    tp: Decimal | None = None
    cid: str = ""


class BarAtr:
    """The stops' ATR at each bar of a pair's rows, each computed once when first read."""

    def __init__(
        self, high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int, window: int
    ) -> None:
        self.bars = (high, low, close)
        self.period = period
        self.window = window  # the data window's capacity
        self.tail = min(10 * period, window)  # the bars the ATR is taken over
        self._known: dict[int, float | None] = {}

    def at(self, t: int) -> float | None:
        """Return the ATR at bar `t` (`Engine._atr` on the window after bar t)."""
        known = self._known.get(t, 0.0)
        if known != 0.0:
            return known
        period = self.period
        length = min(t + 1, self.window)
        value: float | None = None
        if length > period:
            start = t + 1 - min(self.tail, length)
            x = float(stop_atr(*self.bars, start, t, period))
            value = x if math.isfinite(x) else None
        self._known[t] = value
        return value


class BarReturns:
    """A pair's bar-to-bar returns over its rows, as its data window gives them.

    `capacity`: the data window's (it holds the pair's last `capacity` bars).
    """

    def __init__(self, pair: str, close: np.ndarray, capacity: int) -> None:
        self.pair = pair
        self.close = close
        self.capacity = capacity
        self._all: np.ndarray | None = None  # over all the rows, computed when first read

    def to(self, end: int, window: int, last: int | None = None) -> np.ndarray | None:
        """Return the last `window` returns of the first `end` bars (None: under two bars).

        `Engine._returns_of` on the data window whose latest bar is `last` (default
        `end - 1`), cut at bar `end`: the same quotients, element by element, taken once
        over all the rows, none from a bar the window no longer holds.
        """
        latest = end - 1 if last is None else last
        first = max(end - window - 1, latest + 1 - self.capacity, 0)
        if end - first <= 2:
            return None
        returns = self._all
        if returns is None:
            c = self.close
            returns = self._all = (c[1:] - c[:-1]) / c[:-1]
            returns.flags.writeable = False  # views of it go to the risk manager
        return returns[first : end - 1]

    def own(self, manager: RiskManager, t: int) -> ReturnsView | None:
        """Return an entry context's `returns` on bar `t` (None: its sizing reads none).

        The engine's view holds the candidate and the held pairs; only the candidate's is
        read (volatility targeting), the correlation guard reading the aligned view.
        """
        if not manager.sizes_on_returns:
            return None
        window = manager.settings.correlation_window
        return ReturnsView(lambda _: self.to(t + 1, window), [self.pair])


class StandardRun:
    """One standard-profile run over a pair's candles (see the module docstring).

    Args:
        bars: open times (ms) and the open, high, low, close columns of the simulated rows.
        flags: enter and exit signal arrays over the same rows (warm-up rows cleared).
        risk: the risk settings.
        market: the pair's rules (`sim_market` from the archive's first close).
        strategy_name: names the strategy's exits (`"<name>: exit long"`).
        tag: the strategy's tag in client order ids (`models.strategy_tag`).
        starting_balance, taker_fee, slippage_bps: the simulation settings.
        window: the data window's capacity (`max(2 x warmup, warmup_candles)`).
        timeframe: the bars' timeframe (volatility targeting scales to a day with it).
        fill_close: market orders fill at once at the close they are decided on
            (`fill_at="close"`), not at the next open.
        accelerate: hand held bars to the numba pass (False: every bar in Decimal).
    """

    def __init__(
        self,
        bars: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        flags: tuple[np.ndarray, np.ndarray],
        *,
        risk: RiskSettings,
        market: Market,
        pair: str,
        step: int,
        strategy_name: str,
        tag: str,
        starting_balance: float,
        taker_fee: float,
        slippage_bps: float,
        window: int,
        timeframe: str | None = None,
        fill_close: bool = False,
        accelerate: bool = True,
    ) -> None:
        self.ts, self.o, self.h, self.l, self.c = bars
        self.enter, self.exit = flags
        self.risk = risk
        self.market = market
        self.pair = pair
        self.step = step
        self.name = strategy_name
        self.tag = tag
        self.fee = Decimal(str(taker_fee))
        self.bps = Decimal(str(slippage_bps))
        self.window = window
        self.accelerate = accelerate
        self.fill_close = fill_close
        self.tick = market.tick_size
        self.cash = Decimal(str(starting_balance))
        self.starting = self.cash
        self.fees = ZERO
        self.realised = ZERO
        self.peak = self.cash  # the portfolio's drawdown peak
        self.max_dd = 0.0
        self.held: _Held | None = None
        self.pending: _Pending | None = None
        self.breakers = CircuitBreakers(risk)
        # The replay's risk manager decides entries (on these breakers' rung).
        self.manager = RiskManager(
            risk, long_only=True, taker_fee=self.fee, strategy_tag=tag, timeframe=timeframe
        )
        self.manager.breakers = self.breakers
        self.signals = 0
        self.vetoes = 0
        self.rejections = 0
        self.trades: list[tuple[object, ...]] = []
        self.equity = np.empty(len(self.ts), dtype=np.float64)
        self.exact_bars = 0  # bars taken here in Decimal (the rest by the numba pass)
        self._multiple = _dec(risk.stop_atr_multiple)
        self.be_r = _dec(risk.break_even_at_r) if risk.break_even_at_r is not None else None
        self.atrs = BarAtr(self.h, self.l, self.c, risk.atr_period, window)
        self.returns = BarReturns(pair, self.c, window)  # what its entries' contexts read
        # The numba pass's rules (`hold_scan`).
        self.rules = (
            step,
            window,
            risk.atr_period,
            self.atrs.tail,
            -tick_exponent(self.tick),
            float(self._multiple),
            float(self.be_r) if self.be_r is not None else 0.0,
            risk.trailing_stop,
        )
        self.out = np.zeros(7, dtype=np.float64)
        self.scanned = 0  # held bars the numba pass applied
        self.flat_bars = 0  # flat bars without a signal, applied as one run each
        self.at = -1  # several pairs: the last bar taken (`fast_portfolio`)

    # -- the run ----------------------------------------------------------------------------

    def run(self, start: int = 0) -> StandardRun:
        """Take every bar from `start` on, in order; return self (read the results off it)."""
        n = len(self.ts)
        entries = np.flatnonzero(self.enter)
        t = start
        while t < n:
            if self.accelerate and self.pending is None:
                if self.held is None:
                    # Flat up to the next entry signal (a flatten latched: to the end, it
                    # holds for good): only the equity and the clock move.
                    at = int(np.searchsorted(entries, t))
                    end = int(entries[at]) if at < len(entries) else n
                    if self.breakers.state is TradingState.FLATTEN:
                        end = n
                    if end > t:
                        self._flat(t, end)
                        t = end
                        continue
                elif self.breakers.state is not TradingState.FLATTEN:  # else: each bar exits
                    t = _scan(self, t)
                    if t >= n:
                        break
            self._bar(t)
            t += 1
        return self

    def _flat(self, start: int, end: int) -> None:
        # Bars [start, end) flat with no order working and no signal: each records the
        # same equity and feeds it to the breakers (`update_flat`, as `update` on each).
        self._record(start)
        self.equity[start:end] = float(self.cash)
        times = (self.ts[start:end] + self.step).tolist()
        self.breakers.update_flat(times, self.cash)
        self.flat_bars += end - start

    def _bar(self, t: int) -> None:
        # One bar exactly as the replay takes it: the venue matches, then the engine
        # processes the candle (marks, stop, take-profit, equity, breakers, decision).
        self.exact_bars += 1
        now = int(self.ts[t]) + self.step
        self._match(t, now)
        held = self.held
        exited = False
        closing = held is not None and bool(self.exit[t])
        if held is not None:
            exited = self.manage(held, t, closing)
            if exited:
                self._fill_close(t, now)  # the take-profit's exit, before the equity
        equity = self._record(t)
        if self.breakers.update(now, equity) is TradingState.FLATTEN:
            if self.held is not None and self.pending is None:
                self._exit("circuit breaker: flatten", t)
                self._fill_close(t, now)
            self._flush_stop()
            return
        if not exited:
            self._decide(t, closing, now, equity)
            self._fill_close(t, now)
        self._flush_stop()

    def manage(self, held: _Held, t: int, closing: bool) -> bool:
        """Take the held pair's bar `t` after its match: the stop, then the take-profit.

        On a bar whose signal closes the position (`closing`) only the best price moves
        (its exit takes the stop off). Returns True when the take-profit was reached (an
        exit sent or refused: either way no decision on the bar).
        """
        high = float(self.h[t])
        if closing:
            if held.best is not None:
                held.best = max(held.best, _dec(high))
        else:
            self._move_stop(held, t)
        if held.tp is not None and high >= held.tp:
            self._exit(f"take-profit {held.tp} reached (managed)", t)
            return True
        return False

    def _record(self, t: int) -> Decimal:
        held = self.held
        equity = self.cash if held is None else self.cash + held.qty * _dec(float(self.c[t]))
        self.equity[t] = float(equity)
        if equity > self.peak:
            self.peak = equity
        elif self.peak > 0 and equity < self.peak:
            dd = float((self.peak - equity) / self.peak)
            if dd > self.max_dd:
                self.max_dd = dd
        return equity

    # -- the venue --------------------------------------------------------------------------

    def _match(self, t: int, now: int) -> None:
        fill = self.matched(t)
        if fill is not None:
            self._book(*fill, int(self.ts[t]), now)

    def _fill_close(self, t: int, now: int) -> None:
        # The order just sent, filled at once at the clock's time; its stop after the bar.
        fill = self.filled_at_close(t)
        if fill is not None:
            self._book(*fill, now, now)

    def filled_at_close(self, t: int) -> tuple[_Pending, Decimal, str] | None:
        """With `fill_at="close"`, fill the working market order at bar `t`'s close.

        `SimulatedExchange.fill_now`: returns the order, its price and reason, as `matched`
        does, and takes the order off; None when no order works or fills wait for an open.
        """
        order = self.pending
        if order is None or not self.fill_close:
            return None
        self.pending = None
        return order, slipped_price(order.side, _dec(float(self.c[t])), self.bps), order.reason

    def _book(self, order: _Pending | None, price: Decimal, reason: str, ts: int, now: int) -> None:
        # A fill at `ts`: the entry's position, or the exit's round trip (`order` None: the
        # stop's).
        if order is not None and order.side is Side.BUY:
            self.held, cost = entry_fill(order, price, self.fee, ts)
            self.cash = self.cash - cost
            self.fees += self.held.fee
            return
        held = self.held
        assert held is not None
        change, fee, row = exit_fill(held, price, self.fee, ts, reason)
        self.cash = self.cash - change
        self.fees += fee
        self.realised += row[6]  # type: ignore[operator]
        self.held = None
        self.trades.append(row)
        self.manager.on_trade_closed(closed_trade(self.pair, row), now)

    def matched(self, t: int) -> tuple[_Pending | None, Decimal, str] | None:
        """Match the pair's working orders against bar `t`, as the simulated exchange does.

        Returns the fill: the market order it filled (None: the stop), its price and an
        exit's reason; the order is taken off. None: nothing filled.
        """
        pending, held = self.pending, self.held
        opened = _dec(float(self.o[t]))
        if pending is not None:
            self.pending = None
            return pending, slipped_price(pending.side, opened, self.bps), pending.reason
        if held is None or held.venue is None:
            return None
        stop = held.venue
        if opened <= stop:
            trigger = opened
        elif _dec(float(self.l[t])) <= stop:
            trigger = stop
        else:
            return None
        return None, slipped_price(Side.SELL, trigger, self.bps), f"stop-loss for {held.cid}"

    # -- the stop ---------------------------------------------------------------------------

    def _move_stop(self, held: _Held, t: int) -> None:
        # `StopManager.manage_stop` then the engine's filter and the amend.
        atr = self.atrs.at(t)
        distance = _dec(atr) * self._multiple if atr is not None and atr > 0 else None
        if held.best is None:
            gap = held.entry - held.stop
            held.risk = gap if gap > 0 else distance
            held.best = held.entry
            held.armed = False
        held.best = max(held.best, _dec(float(self.h[t])))
        close = _dec(float(self.c[t]))
        best_stop: Decimal | None = None
        for raw in self._candidates(held, distance):
            p = _ceil_tick(raw, self.tick)
            if p <= 0 or p - close >= 0:
                continue
            if best_stop is None or p > best_stop:
                best_stop = p
        current = held.stop
        if best_stop is None or best_stop - current <= 0:
            return
        if atr and abs(best_stop - current) < Decimal(repr(atr)) / 10:
            return
        self._place_stop(held)
        held.stop = best_stop
        if held.venue is not None:
            held.venue = best_stop

    def _candidates(self, held: _Held, distance: Decimal | None) -> list[Decimal]:
        # Each rule's stop, unrounded: trailing behind the best price, break-even once armed.
        assert held.best is not None
        candidates = []
        if distance is not None and self.risk.trailing_stop:
            candidates.append(held.best - distance)
        if self.be_r is not None and held.risk is not None and held.risk > 0:
            if held.best - held.entry >= self.be_r * held.risk:
                held.armed = True
            if held.armed:
                candidates.append(self.break_even(held))
        return candidates

    def break_even(self, held: _Held) -> Decimal:
        """Return the position's break-even exit price after both fees (constant)."""
        if held.be is None:
            qty, entry = held.qty, held.entry
            paid = held.fee if held.fee > 0 else entry * qty * self.fee
            held.be = (entry * qty + paid) / (qty * (1 - self.fee))
        return held.be

    def _place_stop(self, held: _Held) -> None:
        # The entry's stop, pending since the fill, goes out at its level on the grid.
        if held.placed:
            return
        held.placed = True
        level = _ceil_tick(held.s0, self.tick)
        if held.qty * level < self.market.min_notional:
            raise _Unsupported("a protective stop below the minimum notional")
        held.venue = level

    def _flush_stop(self) -> None:
        held = self.held
        if held is not None and not held.placed and self.pending is None:
            self._place_stop(held)

    # -- decisions --------------------------------------------------------------------------

    def _exit(self, reason: str, t: int) -> None:
        # `Engine.close_position`: a reduce-only market exit of the whole position, its
        # stop taken off; nothing while an exit already works (several pairs: a flatten's,
        # sent on another pair's candle of this close). Every exit (take-profit, flatten,
        # signal) passes `validate_intent` at the bar's close first: under the minimum
        # notional it is refused locally (a rejection), and the position and its stop,
        # pending or working, stay.
        held = self.held
        assert held is not None
        if self.pending is not None:
            return
        if held.qty * _dec(float(self.c[t])) < self.market.min_notional:
            self.rejections += 1
            return
        held.venue = None
        held.placed = True  # a stop taken off is not placed again
        self.pending = _Pending(Side.SELL, held.qty, reason)

    def _decide(self, t: int, closing: bool, now: int, equity: Decimal) -> None:
        held = self.held
        if held is not None:
            if not closing:
                return
            self.signals += 1
            self._exit(f"{self.name}: exit long", t)
            return
        if not self.enter[t]:
            return
        self.signals += 1
        order = self._entry(t, now, equity)
        if order is None:
            self.vetoes += 1
            return
        self.pending = order

    def _entry(self, t: int, now: int, equity: Decimal) -> _Pending | None:
        # The replay's own `RiskManager.evaluate` for a flat pair's entry (None: vetoed):
        # nothing else held, so the context is the pair's alone.
        if self.breakers.state not in _ENTRY_STATES:  # its first refusal, the cheap way
            return None
        context = RiskContext(
            now=now,
            equity=equity,
            cash=self.cash,
            positions={},
            market=self.market,
            price=_dec(float(self.c[t])),
            atr=self.atrs.at(t),
            taker_fee=self.fee,
            returns=self.returns.own(self.manager, t),
            candle_ts=int(self.ts[t]),
        )
        return self.order_for(self.manager, t, context)

    def order_for(self, manager: RiskManager, t: int, context: RiskContext) -> _Pending | None:
        """Return the entry order `manager` approves on bar `t`'s signal (None: a veto).

        The executor's balance check, which the caps imply but for a rounding tie, is the
        replay's only other refusal: met, the run leaves the fast path.
        """
        signal = Signal(
            pair=self.pair,
            side=Side.BUY,
            strength=1.0,
            reason=f"{self.name}: entry long",
            ts=int(self.ts[t]),
            price=float(self.c[t]),
        )
        verdict = manager.evaluate(signal, context)
        if not isinstance(verdict, OrderIntent):
            return None
        if verdict.qty * context.price * (1 + self.fee) > context.cash:
            raise _Unsupported("an entry the executor's balance check refuses")
        assert verdict.stop_loss is not None
        return _Pending(
            Side.BUY, verdict.qty, "", verdict.stop_loss, verdict.take_profit,
            verdict.client_order_id,
        )  # fmt: skip

    def value(self, t: int) -> Decimal:
        """Return the exact equity at bar `t`'s close with the position held."""
        held = self.held
        assert held is not None
        return self.cash + held.qty * _dec(float(self.c[t]))


def _scan(run: StandardRun, t: int) -> int:
    """Hand `run`'s held bars from `t` on to `hold_scan`; return the first bar it left.

    The pass decides in float64; what it leaves behind is set here exactly: the stop's
    level (a tick index), its best price and arming, the equity peaks and the drawdown
    (each the exact equity of the bar the pass names), the breakers' last equity.
    """
    held, breakers = run.held, run.breakers
    assert held is not None
    band = quiet_band(breakers)
    if held.best is None or held.venue is None or band is None:
        return t
    low, high, expires, fast = band
    tick = run.tick
    be_k, risk = -1, -1.0
    if run.be_r is not None and held.risk is not None and held.risk > 0:
        be_k = int((run.break_even(held) / tick).to_integral_value(ROUND_CEILING))
        risk = float(held.risk)
    k_min = int((held.stop / tick).to_integral_value(ROUND_FLOOR)) + 1
    low_peak, low_day = floor_factors(breakers)
    out = run.out
    start = t
    t = hold_scan(
        (run.ts, run.o, run.h, run.l, run.c, run.exit),
        t,
        run.rules,
        (float(held.qty), float(run.cash), float(held.entry), risk, be_k, _above(held.tp)),
        (float(held.venue), float(held.stop), k_min, float(held.best), held.armed),
        (
            float(breakers.day),
            float(low) if low is not None else -math.inf,
            float(high) if high is not None else math.inf,
            float(expires) if expires is not None else -1.0,
            float(breakers.peak_equity),
            1.0 if fast else 0.0,
            float(low_peak),
            float(low_day),
            float(breakers.day_start_equity),
            float(run.peak),
            run.max_dd,
        ),
        run.equity,
        out,
    )
    if t > start:
        _settle(run, held, start, t, out)
    return t


def _settle(run: StandardRun, held: _Held, start: int, end: int, out: np.ndarray) -> None:
    # Bars [start, end) went through the numba pass: take its outcome exactly.
    run.scanned += end - start
    if out[0] > -math.inf:
        held.best = max(held.best or held.entry, _dec(float(out[0])))
    held.armed = bool(out[1])
    if out[2] >= 0:
        held.stop = held.venue = Decimal(int(out[2])) * run.tick
    peak_before = run.peak
    if out[3] >= 0:
        run.peak = run.value(int(out[3]))
    if out[4] >= 0:
        peak = run.value(int(out[5])) if out[5] >= 0 else peak_before
        dd = float((peak - run.value(int(out[4]))) / peak)
        run.max_dd = max(run.max_dd, dd)
    new_peak = run.value(int(out[6])) if out[6] >= 0 else None
    last = end - 1
    advance_quietly(run.breakers, int(run.ts[last]) + run.step, run.value(last), new_peak)


def book_of(
    strategy: Strategy,
    frame: pd.DataFrame,
    pair: str,
    signals: tuple[np.ndarray, np.ndarray] | None,
    *,
    timeframe: str,
    risk: RiskSettings,
    window: int,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    timerange: tuple[int | None, int | None] = (None, None),
    fill_at: str = "next_open",
    accelerate: bool = True,
) -> tuple[StandardRun, _Bars]:
    """Return a pair's run over the `timerange` rows of its archive `frame`, and the rows.

    Its market comes from the archive's first close and its flags (`signals`, else the
    strategy's own) from the whole archive, none before the warm-up, as in the replay.
    """
    bars = _Bars.of(frame, timeframe, *timerange)
    enter, exit_ = signals if signals is not None else strategy.entries_exits(frame)
    warm = max(strategy.warmup - 1, 0)
    enter = np.asarray(enter, dtype=bool).copy()
    exit_ = np.asarray(exit_, dtype=bool).copy()
    enter[:warm] = False
    exit_[:warm] = False
    market = sim_market(pair, float(frame["close"].to_numpy(dtype=np.float64)[0]))
    rows = slice(bars.first, bars.last)

    def column(name: str) -> np.ndarray:
        return np.ascontiguousarray(frame[name].to_numpy(dtype=np.float64))[rows]

    book = StandardRun(
        (bars.ts - bars.step, column("open"), column("high"), column("low"), column("close")),
        (enter[rows], exit_[rows]),
        risk=risk,
        market=market,
        pair=pair,
        step=bars.step,
        strategy_name=strategy.name,
        tag=strategy_tag(strategy.describe()),
        starting_balance=starting_balance,
        taker_fee=taker_fee,
        slippage_bps=slippage_bps,
        window=window,
        timeframe=timeframe,
        fill_close=fill_at == "close",
        accelerate=accelerate,
    )
    return book, bars


def _table(rows: list[tuple[object, ...]], pair: str) -> dict[str, np.ndarray]:
    """Return the closed trades column-wise (`BacktestResult.table`), floats of the Decimals."""
    table: dict[str, np.ndarray] = {
        "entry_ts": np.array([r[0] for r in rows], dtype=np.int64),
        "exit_ts": np.array([r[1] for r in rows], dtype=np.int64),
    }
    for k, name in enumerate(("entry_price", "exit_price", "qty", "fee", "pnl"), start=2):
        table[name] = np.array([float(r[k]) for r in rows], dtype=np.float64)  # type: ignore[arg-type]
    table["funding"] = np.zeros(len(rows), dtype=np.float64)
    table["pair"] = np.full(len(rows), pair)
    table["side"] = np.full(len(rows), "long")
    table["reason"] = np.array([str(r[7]) for r in rows], dtype=np.str_)
    return table


def _report(run: StandardRun) -> tuple[tuple[BreakerTrip, ...], tuple[TradingSpan, ...]]:
    """Return the breaker trips and the spans off the normal rung (as the replay's)."""
    last = int(run.ts[-1]) if len(run.ts) else None
    report = breaker_report(run.breakers.history, last)
    return (
        tuple(BreakerTrip.from_dict(x) for x in report["trips"]),
        tuple(TradingSpan.from_dict(x) for x in report["spans"]),
    )


def _open_position(run: StandardRun) -> tuple[OpenPosition, ...]:
    """Return the position open at the end, as the replay's summary lists it."""
    held = run.held
    if held is None:
        return ()
    return (
        OpenPosition(
            pair=run.pair,
            side="long",
            qty=float(held.qty),
            entry_price=float(held.entry),
            entry_ts=held.opened,
            mark_price=float(_last_mark(run, held)),
        ),
    )


def _last_mark(run: StandardRun, held: _Held) -> Decimal:
    # The position's mark at the end: the last close, or its entry price when it filled at
    # that close (`fill_at="close"`: after the bar's mark; the portfolio values an
    # unmarked position at its entry price). A fill at an open is no later than the last
    # bar's open time.
    if held.opened > int(run.ts[-1]):
        return held.entry
    return _dec(float(run.c[-1]))


def _final_equity(run: StandardRun) -> Decimal:
    """Return the equity at the end (the open position at its last mark)."""
    held = run.held
    if held is None or not len(run.c):
        return run.cash
    return run.cash + held.qty * _last_mark(run, held)


def entry_fill(order: _Pending, price: Decimal, rate: Decimal, ts: int) -> tuple[_Held, Decimal]:
    """Return the position an entry's fill at `price` opens and the cash it costs."""
    fee = price * order.qty * rate
    held = _Held(order.qty, price, fee, ts, order.s0, order.tp, order.cid, order.s0)
    return held, order.qty * price + fee


def exit_fill(
    held: _Held, price: Decimal, rate: Decimal, ts: int, reason: str
) -> tuple[Decimal, Decimal, tuple[object, ...]]:
    """Return an exit fill's cash change (subtracted), fee and closed-trade row.

    `Portfolio._reduce`'s arithmetic for the whole position: the row is (opened, closed,
    entry price, exit price, qty, fees, PnL, reason).
    """
    qty = held.qty
    fee = price * qty * rate
    entry_part = held.fee * (qty / qty)
    exit_part = fee * (qty / qty)
    pnl = (price - held.entry) * qty * 1 - entry_part - exit_part
    row = (held.opened, ts, held.entry, price, qty, entry_part + exit_part, pnl, reason)
    return -qty * price + fee, fee, row


def _above(level: Decimal | None) -> float:
    # The least float x with x >= level (a float high compared with a Decimal exactly).
    if level is None:
        return math.inf
    x = float(level)
    return math.nextafter(x, math.inf) if Decimal(x) < level else x


def closed_trade(pair: str, row: tuple[Any, ...]) -> ClosedTrade:
    """Return the round trip `row` (`exit_fill`'s) as the portfolio reports it to risk.

    Its numbers are floats of the exact ones, as `Portfolio._reduce` gives them: the
    breakers read the PnL, Kelly the PnL over the entry's notional.
    """
    opened, closed, entry, price, qty, fees, pnl, reason = row
    return ClosedTrade(
        pair=pair,
        side=PositionSide.LONG,
        entry_ts=opened,
        exit_ts=closed,
        entry_price=float(entry),
        exit_price=float(price),
        qty=float(qty),
        fee=float(fees),
        pnl=float(pnl),
        reason=reason,
    )


class _Unsupported(Exception):
    """A path the fast path does not model: the replay takes the run."""


def run_standard(
    strategy: Strategy,
    frame: pd.DataFrame,
    *,
    pair: str,
    timeframe: str,
    risk: RiskSettings,
    window: int,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    start_ms: int | None = None,
    end_ms: int | None = None,
    signals: tuple[np.ndarray, np.ndarray] | None = None,
    fill_at: str = "next_open",
    accelerate: bool = True,
) -> BacktestResult:
    """Run `--mode backtest` under the standard profile through the fast path.

    `frame` is the pair's whole archive (the signals read all of it, and the market's
    rules come from its first close, as in the replay); `start_ms`/`end_ms` the
    `--timerange`; `fill_at` the simulation's (`next_open` or `close`). Check
    `standard_blockers` first; a run that leaves what this path models raises an error
    `unsupported` recognises (the replay then takes it).
    """
    book, bars = book_of(
        strategy,
        frame,
        pair,
        signals,
        timeframe=timeframe,
        risk=risk,
        window=window,
        starting_balance=starting_balance,
        taker_fee=taker_fee,
        slippage_bps=slippage_bps,
        timerange=(start_ms, end_ms),
        fill_at=fill_at,
        accelerate=accelerate,
    )
    run = book.run()
    return run_result(
        run,
        strategy,
        timeframe,
        starting_balance,
        bars.ts,
        run.equity,
        {pair: (bars.ts, bars.closes)},
    )


def run_result(
    run: StandardRun,
    strategy: Strategy,
    timeframe: str,
    starting_balance: float,
    ts: np.ndarray,
    equity: np.ndarray,
    prices: dict[str, tuple[np.ndarray, np.ndarray]],
) -> BacktestResult:
    """Return a one-pair run's result: its curve (`ts`, `equity`) and the closes drawn."""
    trips, spans = _report(run)
    return BacktestResult(
        strategy=strategy.describe(),
        pairs=(run.pair,),
        timeframe=timeframe,
        starting_balance=float(starting_balance),
        ts=ts,
        equity=equity,
        table=_table(run.trades, run.pair),
        final_equity=float(_final_equity(run)),
        fees=float(run.fees),
        candles=len(ts),
        open_positions=_open_position(run),
        prices=prices,
        signals=run.signals,
        vetoes=run.vetoes,
        rejections=run.rejections,
        realised_pnl=float(run.realised),
        breaker_trips=trips,
        trading_spans=spans,
        max_drawdown_exact=run.max_dd,
    )


def standard_blockers(*, linear: bool, can_short: bool) -> list[str]:
    """Return why the standard-profile fast path cannot stand in for the replay (empty: it can).

    A latency shorter than a candle changes nothing here: an order sent at a close is live
    before the next candle closes, stops included (`fast_path_blockers` names a longer one).
    """
    reasons = []
    if linear:
        reasons.append("a perpetual: the standard fast path trades spot")
    if can_short:
        reasons.append("a strategy that can short: its short entries close longs in the replay")
    return reasons


def unsupported(error: BaseException) -> bool:
    """Return True when `error` says the run left what the fast path models."""
    return isinstance(error, _Unsupported)


__all__ = ["StandardRun", "run_standard", "standard_blockers", "unsupported"]
