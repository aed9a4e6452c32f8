"""Risk: turn a Signal into a sized OrderIntent with a stop, or a Veto with a reason.

Sizing (`RiskSettings.sizing`) works in `Decimal` on the context it is given:

* ``fixed_fractional``: lose `risk_per_trade` of equity, fees included, if the stop at
  `stop_atr_multiple` x ATR is hit.
* ``volatility_target``: hold the notional whose volatility is `target_volatility` of equity,
  per UTC day when the manager knows the timeframe, per bar otherwise. Volatility is the
  standard deviation of the pair's recent returns (`RiskContext.returns`), or ATR / price, a
  conservative proxy, without them.
* ``kelly``: risk the Kelly fraction W - (1 - W) / R of equity to the stop, W and R being the
  win rate and payoff (mean win / mean loss, as returns on notional) of the last
  `kelly_window` closed trades, capped at `kelly_cap`. Below `kelly_min_trades` trades it
  falls back to fixed fractional; a fraction <= 0 (no edge) refuses the entry.

Guards may then scale the size down (correlation with what is held) and the `reduced` rung
halves it (`reduced_size_factor`). Caps clip the result: `max_position_fraction` of equity
per pair, `max_total_exposure` of equity in total, leverage (`max_leverage` capped by the
market's, on linear markets; 1 on spot) and the cash or margin free. The intent's reason
names the constraint that bound.

Circuit breakers (`circuit_breakers.py`, re-exported here) watch equity *including
unrealised PnL* (the pipeline calls `update` on every candle) and form a ladder of trading
states; the most severe active one wins::

    normal -> reduced (smaller size) -> reducing (exits only) -> halted -> flatten

=================  ==========  =========================================================
rule               rung        resumes
=================  ==========  =========================================================
reduce_size        reduced     by itself, when the drawdown is back under the threshold
loss_streak        reducing    at the end of the cooldown (auto_resume), else manually
daily_loss         halted      at the next UTC day (auto_resume), else manually
peak_to_trough     flatten     only manually: ``set_manual(None)`` or ``reset()``
manual             any         ``set_manual(None)`` or ``reset()``
=================  ==========  =========================================================

A manual resume (`reset`, the operator's /resetrisk) clears every latched breaker and
re-bases the peak and the day's starting equity on the current equity, so the limits count
again from there; `clear_manual` (/resume after /stopbuy) lifts only the manual rung.

The rungs from `reducing` up block entries; exits and protective stops keep working in
every rung, and `flatten` asks the pipeline to close every position. `dump_state` and
`restore_state` carry the breakers (and the Kelly history) across a restart; `state_key`
tells the caller cheaply when there is something new to persist.

Stops: an entry's stop is `stop_atr_multiple` x ATR from the price. `manage_stop`, called
per open position on each closed candle, trails it behind the best price since entry and
moves it to break-even after fees once the trade is `break_even_at_r` x its initial risk in
profit; a stop only ever tightens.

Correlation: returns of the candidate and of held pairs over `correlation_window` bars; a
candidate too correlated, direction considered, with a held position is cut down above
`max_correlation` and refused above the hard limit (`CorrelationGuard`).

Pair pauses (`PairPauses`, the first guard): a market-data anomaly refuses entries on its
pair until the pause expires (`pause_pair`); exits and stops on that pair go on.

Exits are always allowed: a veto never traps a position.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, Final, cast

import numpy as np
import structlog

from circuit_breakers import DAY_MS as DAY_MS
from circuit_breakers import ZERO as ZERO
from circuit_breakers import BreakerRule as BreakerRule
from circuit_breakers import CircuitBreakers as CircuitBreakers
from circuit_breakers import DailyLossLimit as DailyLossLimit
from circuit_breakers import EquityBook as EquityBook
from circuit_breakers import LossStreak as LossStreak
from circuit_breakers import MaxDrawdown as MaxDrawdown
from circuit_breakers import PairPause as PairPause
from circuit_breakers import PairPauses as PairPauses
from circuit_breakers import ReduceOnDrawdown as ReduceOnDrawdown
from circuit_breakers import Trip as Trip
from circuit_breakers import breaker_report as breaker_report
from circuit_breakers import default_rules as default_rules
from config import RiskSettings
from models import (
    EventSink,
    Market,
    MarketType,
    OrderIntent,
    OrderType,
    Position,
    PositionSide,
    Side,
    Signal,
    TradingState,
    Veto,
    decision_key,
    fast_init,
    with_attempt,
)
from perpetuals import (
    cross_margin,
    isolated_margin,
    liquidation_price,
    liquidation_veto,
    unit_cost,
)
from risk_guards import CorrelationGuard as CorrelationGuard
from risk_guards import Guard as Guard
from risk_guards import KellyEstimate as KellyEstimate
from risk_guards import MaxOpenPositions as MaxOpenPositions
from risk_guards import Resize as Resize
from risk_guards import ReturnsView as ReturnsView
from risk_guards import RiskContext as RiskContext
from risk_guards import as_decimal as _dec
from risk_guards import correlation_matrix as correlation_matrix
from risk_guards import kelly_estimate as kelly_estimate
from risk_state import RiskState
from utils.utilities import logs_at, timeframe_to_ms


log = structlog.get_logger(__name__)

_ENTRY_STATES: Final = frozenset({TradingState.NORMAL, TradingState.REDUCED})


def loss_per_unit(price: Decimal, distance: Decimal, fee: Decimal, side: Side) -> Decimal:
    """Return what one unit loses if stopped out: the distance plus entry and exit fees."""
    exit_price = price - distance if side is Side.BUY else price + distance
    return distance + fee * (price + exit_price)


@fast_init
@dataclass(frozen=True, slots=True)
class _Size:
    qty: Decimal
    method: str  # short name, reported as the binding constraint when no cap binds
    detail: str


# -- Stops -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _StopTrack:
    ts_opened: int
    initial_risk: Decimal | None
    best: Decimal
    armed: bool = False


def break_even_price(position: Position, taker_fee: Decimal) -> Decimal:
    """Return the exit price at which `position` closes flat after entry and exit fees.

    Uses the entry fees the position paid, or a taker fee on entry when it reports none.
    """
    qty, entry = position.qty, position.entry_price
    paid = position.fees_paid if position.fees_paid > 0 else entry * qty * taker_fee
    if position.side is PositionSide.LONG:
        return (entry * qty + paid) / (qty * (1 - taker_fee))
    return (entry * qty - paid) / (qty * (1 + taker_fee))


# -- The manager -----------------------------------------------------------------------------


class RiskManager(RiskState):
    """Size positions, set and move stops, apply the guards and circuit breakers.

    The trading state, per-pair pauses, Kelly history and their persistence come from
    `risk_state.RiskState`.

    Args:
        settings: the risk group of the settings.
        long_only: refuse short entries.
        alert: the alert bus; each change of rung goes out as a `TradingStateChanged`.
        timeframe: the candle timeframe; lets volatility targeting work per UTC day.
        hard_correlation: the correlation above which an entry is refused outright.
        kelly_min_trades: closed trades needed before Kelly sizing replaces fixed fractional.
        kelly_window: how many recent closed trades the Kelly statistics use.
        volatility_min_sample: returns needed to measure volatility (ATR / price below).
        taker_fee: the fee `manage_stop` assumes for break-even unless told otherwise.
        strategy_tag: names the strategy (and its parameters) in client order ids.
    """

    def __init__(
        self,
        settings: RiskSettings,
        *,
        long_only: bool = True,
        alert: EventSink | None = None,
        timeframe: str | None = None,
        hard_correlation: float = 0.95,
        kelly_min_trades: int = 20,
        kelly_window: int = 100,
        volatility_min_sample: int = 20,
        taker_fee: Decimal = Decimal("0.001"),
        strategy_tag: str = "0",
        margin_mode: str = "isolated",
    ) -> None:
        self.settings = settings
        self.margin_mode = margin_mode
        self.strategy_tag = strategy_tag
        self.long_only = long_only
        self.all_in = settings.profile == "all_in"
        self.breakers = CircuitBreakers(settings, alert=alert)
        self.bar_ms = timeframe_to_ms(timeframe) if timeframe else None
        self.kelly_min_trades = kelly_min_trades
        self.volatility_min_sample = volatility_min_sample
        self.taker_fee = taker_fee
        self.trade_returns: deque[float] = deque(maxlen=kelly_window)
        self.correlation = CorrelationGuard(
            settings.max_correlation,
            max(hard_correlation, settings.max_correlation),
            settings.correlation_window,
        )
        # Per-pair pauses (anomalies) come first: the cheapest refusal, and the one to show.
        self.pair_pauses = PairPauses()
        self.guards: list[Guard] = [
            self.pair_pauses,
            MaxOpenPositions(settings.max_open_positions),
        ]
        if not self.all_in:
            self.guards.append(self.correlation)
        self.stops = StopManager(settings)
        self._closed_trades = 0  # moves `state_key` even when the Kelly window is full

    def describe(self) -> dict[str, Any]:
        """Return the risk state for the UI and Telegram (JSON-able)."""
        info = self.breakers.describe()
        info["state"] = str(self.trading_state)
        info["profile"] = self.settings.profile
        info["sizing"] = self.settings.sizing
        info["max_exposure"] = self.settings.max_total_exposure
        estimate = self.kelly()
        if estimate is not None:
            info["kelly"] = {
                "trades": estimate.trades,
                "win_rate": estimate.win_rate,
                "payoff": estimate.payoff if math.isfinite(estimate.payoff) else None,
                "fraction": estimate.fraction,
            }
        matrix = self.correlation.last_matrix
        if matrix is not None:
            info["correlation"] = {
                "pairs": list(self.correlation.last_pairs),
                "matrix": [
                    [None if math.isnan(v) else round(float(v), 4) for v in row] for row in matrix
                ],
            }
        return info

    @property
    def sizes_on_returns(self) -> bool:
        """Return True when an entry's size reads its pair's recent returns (`ctx.returns`)."""
        return self.settings.sizing == "volatility_target"

    def client_order_id(self, pair: str, candle_ts: int, kind: str, tag: str | None = None) -> str:
        """Return the client order id of the decision `kind` on `pair`'s candle `candle_ts`.

        Derived, not counted: the same decision taken again after a restart gets the same
        id, so the exchange refuses it and reconciliation adopts the first (attempt 0; the
        executor moves to the next attempt only when the journal shows the first was never
        sent). `tag` names the deciding strategy when several trade (default: this
        manager's `strategy_tag`).
        """
        return with_attempt(decision_key(tag or self.strategy_tag, pair, candle_ts, kind), 0)

    # -- Decisions ---------------------------------------------------------------------------

    def evaluate(self, signal: Signal, ctx: RiskContext) -> OrderIntent | Veto:
        """Return the order to send for `signal`, or why not."""
        position = ctx.positions.get(signal.pair)
        if position is not None and _closes(signal.side, position):
            return self._exit(signal, position, ctx)
        refused = refused_entry(signal, ctx, position, long_only=self.long_only)
        if refused is not None:
            return refused
        state = self.trading_state
        if state not in _ENTRY_STATES:
            cause = self.breakers.cause
            return Veto(
                f"trading state {state}: entries blocked"
                f" ({cause.reason if cause is not None else ''})",
                self.breakers.resume_at,
                "circuit_breaker",
            )
        resizes: list[Resize] = []
        for guard in self.guards:
            verdict = guard.check(signal, ctx)
            if isinstance(verdict, Veto):
                return verdict
            if verdict is not None:
                resizes.append(verdict)
        if self.all_in:
            return self._all_in_entry(signal, ctx)
        return self._entry(signal, ctx, state, resizes)

    def _exit(self, signal: Signal, position: Position, ctx: RiskContext) -> OrderIntent:
        return OrderIntent(
            pair=signal.pair,
            side=signal.side,
            qty=position.qty,
            type=OrderType.MARKET,
            client_order_id=self.client_order_id(signal.pair, _candle(ctx), "x", ctx.strategy_tag),
            reason=signal.reason,
            reduce_only=True,
            ts=ctx.now,
        )

    def _all_in_entry(self, signal: Signal, ctx: RiskContext) -> OrderIntent | Veto:
        # Reference profile: the whole cash in one market buy sized in quote currency.
        price = ctx.price
        if price <= 0:
            return Veto("no valid price", None, "price")
        cash = ctx.cash if ctx.sleeve_free is None else min(ctx.cash, ctx.sleeve_free)
        leverage = _leverage(self.settings, ctx.market)
        per_unit = price * (1 + ctx.taker_fee)
        if leverage != 1:
            side = PositionSide.LONG if signal.side is Side.BUY else PositionSide.SHORT
            per_unit = unit_cost(price, leverage, ctx.taker_fee, side)
        qty = _floor(cash / per_unit, ctx.market.lot_size)
        if qty <= 0:
            return Veto("no cash", None, "cash")
        return OrderIntent(
            pair=signal.pair,
            side=signal.side,
            qty=qty,
            type=OrderType.MARKET,
            client_order_id=self.client_order_id(signal.pair, _candle(ctx), "e", ctx.strategy_tag),
            reason=signal.reason,
            ts=ctx.now,
            quote_amount=cash,
            leverage=leverage if leverage != 1 else None,
        )

    def _entry(
        self, signal: Signal, ctx: RiskContext, state: TradingState, resizes: list[Resize]
    ) -> OrderIntent | Veto:
        s, price, market = self.settings, ctx.price, ctx.market
        if price <= 0:
            return Veto("no valid price", None, "price")
        if ctx.equity <= 0:
            return Veto(f"equity {ctx.equity} <= 0", None, "equity")
        if ctx.sleeve_equity is not None and ctx.sleeve_equity <= 0:
            return Veto(f"strategy sleeve equity {ctx.sleeve_equity} <= 0", None, "sleeve")
        atr, atr_note = self._atr(ctx)
        distance = atr * _setting(s.stop_atr_multiple)
        if signal.side is Side.BUY and distance >= price:
            return Veto(
                f"stop distance {distance:.6g} ({s.stop_atr_multiple} x {atr_note}) >= price"
                f" {price}: no stop possible",
                None,
                "stop",
            )
        sized = self._size(signal, ctx, distance, atr_note)
        if isinstance(sized, Veto):
            return sized
        qty, binding, notes = self._scale(sized, state, resizes)
        leverage = _leverage(self.settings, market)
        for name, cap in exposure_caps(s, signal, ctx, leverage).items():
            if cap < qty:
                qty, binding = cap, name
        qty = _floor(max(qty, ZERO), market.lot_size)
        if qty <= 0 or qty < market.min_qty or qty * price < market.min_notional:
            return Veto(
                f"size {qty} below market minimum (min qty {market.min_qty}, min notional"
                f" {market.min_notional}; bound by {binding}; {'; '.join(notes)})",
                None,
                "min_size",
            )
        sign = 1 if signal.side is Side.BUY else -1
        unsafe = liquidation_check(
            signal, ctx, qty, price - sign * distance, leverage, self.margin_mode, s
        )
        if unsafe is not None:
            return unsafe
        take_profit = (
            price + sign * atr * _setting(s.take_profit_atr_multiple)
            if s.take_profit_atr_multiple
            else None
        )
        return OrderIntent(
            pair=signal.pair,
            side=signal.side,
            qty=qty,
            type=OrderType.MARKET,
            client_order_id=self.client_order_id(signal.pair, _candle(ctx), "e", ctx.strategy_tag),
            reason=f"{signal.reason}; qty {qty} bound by {binding}; {'; '.join(notes)}",
            stop_loss=price - sign * distance,
            take_profit=take_profit,
            leverage=leverage if market.type is MarketType.LINEAR else None,
            ts=ctx.now,
        )

    def _scale(
        self, sized: _Size, state: TradingState, resizes: list[Resize]
    ) -> tuple[Decimal, str, list[str]]:
        # The guards' cuts, then the `reduced` rung's: the size, what bound it, and why.
        s = self.settings
        qty, binding = sized.qty, sized.method
        notes = [f"{sized.method}: {sized.detail}"]
        for resize in resizes:
            qty *= _dec(resize.factor)
            binding = resize.guard
            notes.append(f"{resize.guard} {resize.reason}")
        if state is TradingState.REDUCED:
            qty *= _setting(s.reduced_size_factor)
            binding = "reduced"
            cause = self.breakers.cause
            notes.append(
                f"reduced x{s.reduced_size_factor}: {cause.reason if cause is not None else ''}"
            )
        return qty, binding, notes

    # -- Sizing ------------------------------------------------------------------------------

    def _atr(self, ctx: RiskContext) -> tuple[Decimal, str]:
        if ctx.atr is not None and ctx.atr > 0 and math.isfinite(ctx.atr):
            return _dec(ctx.atr), f"ATR {ctx.atr:.6g}"
        return ctx.price * Decimal("0.01"), "ATR unavailable, 1% of price"

    def _size(
        self, signal: Signal, ctx: RiskContext, distance: Decimal, atr_note: str
    ) -> _Size | Veto:
        s = self.settings
        per_unit = loss_per_unit(ctx.price, distance, ctx.taker_fee, signal.side)
        stop = f"stop {distance:.6g} ({s.stop_atr_multiple} x {atr_note}) + fees"
        if s.sizing == "volatility_target":
            measured = self.volatility(signal.pair, ctx)
            sized = _volatility_size(measured, s.target_volatility, ctx)
            if sized is not None:
                return sized
            fraction, method = _setting(s.risk_per_trade), "fixed_fractional"
            stop += "; volatility unknown, fixed fractional"
        elif s.sizing == "kelly":
            estimate = self.kelly()
            if estimate is None:
                fraction, method = _setting(s.risk_per_trade), "fixed_fractional"
                stop += (
                    f"; kelly needs {self.kelly_min_trades} closed trades,"
                    f" has {len(self.trade_returns)}"
                )
            elif estimate.fraction <= 0:
                return Veto(
                    f"kelly fraction {estimate.fraction:.3f} <= 0 over {estimate.trades}"
                    f" trades (win rate {estimate.win_rate:.2%}, payoff {estimate.payoff:.2f}):"
                    " no edge",
                    None,
                    "kelly",
                )
            else:
                fraction, method = _dec(round(min(estimate.fraction, s.kelly_cap), 12)), "kelly"
                stop += (
                    f"; kelly {estimate.fraction:.3f} capped at {s.kelly_cap} (win rate"
                    f" {estimate.win_rate:.2%}, payoff {estimate.payoff:.2f},"
                    f" {estimate.trades} trades)"
                )
        else:
            fraction, method = _setting(s.risk_per_trade), "fixed_fractional"
        base, of = _sizing_equity(ctx)
        qty = base * fraction / per_unit
        return _Size(qty, method, f"risk {fraction:.2%} of {of} {base:.2f} over {stop}")

    def volatility(self, pair: str, ctx: RiskContext) -> tuple[float, str] | None:
        """Return the pair's volatility per sizing period (day, or bar) and its source."""
        window = self.settings.correlation_window
        return measure_volatility(pair, ctx, window, self.volatility_min_sample, self.bar_ms)

    # -- Stops -------------------------------------------------------------------------------

    def manage_stop(
        self,
        position: Position,
        high: float | Decimal,
        low: float | Decimal,
        close: float | Decimal,
        atr: float | None,
        now: int,
        *,
        taker_fee: Decimal | None = None,
        tick_size: Decimal | None = None,
    ) -> Decimal | None:
        """Return the stop `position` should now have, or None to leave it.

        Call once per closed candle per open position. The stop only ever tightens: it
        trails `stop_atr_multiple` x ATR behind the best price since entry (when
        `trailing_stop`), moves to break-even after fees once the best price is
        `break_even_at_r` x the initial risk in profit, and is set at k x ATR from entry
        when the position has none. A stop that would sit beyond the candle's close (so it
        would trigger at once) is not proposed.
        """
        if self.all_in:
            return None
        fee = self.taker_fee if taker_fee is None else taker_fee
        return self.stops.manage_stop(
            position, high, low, close, atr, now, taker_fee=fee, tick_size=tick_size
        )


class StopManager:
    """Move each open position's stop: trail it, then lock in break-even; it only tightens.

    Keeps per pair the best price since entry, the initial risk and whether break-even is
    armed, from the position's opening on (`RiskManager.manage_stop` describes the rules).

    Args:
        settings: the risk group (`stop_atr_multiple`, `trailing_stop`, `break_even_at_r`).
    """

    def __init__(self, settings: RiskSettings) -> None:
        self.settings = settings
        self._stops: dict[str, _StopTrack] = {}

    def manage_stop(
        self,
        position: Position,
        high: float | Decimal,
        low: float | Decimal,
        close: float | Decimal,
        atr: float | None,
        now: int,
        *,
        taker_fee: Decimal,
        tick_size: Decimal | None = None,
    ) -> Decimal | None:
        """Return the stop `position` should now have, or None to leave it (see `RiskManager`)."""
        if position.qty <= 0:
            return None
        long = position.side is PositionSide.LONG
        sign = 1 if long else -1
        current = position.stop_price
        multiple = _setting(self.settings.stop_atr_multiple)
        distance = _dec(atr) * multiple if atr and atr > 0 else None
        track = self._track(position, distance)
        track.best = max(track.best, _dec(high)) if long else min(track.best, _dec(low))
        candidates = self._stop_candidates(position, track, distance, taker_fee)
        best_rule, best_stop = _tightest(candidates, _dec(close), long, tick_size)
        if best_stop is None or (current is not None and (best_stop - current) * sign <= 0):
            return None
        if logs_at(logging.INFO):  # its fields cost more than the rule (a move per candle)
            log.info(
                "stop_moved",
                pair=position.pair,
                rule=best_rule,
                old=str(current) if current is not None else None,
                new=str(best_stop),
                best=str(track.best),
                ts=now,
            )
        return best_stop

    def note_best(self, position: Position | None, high: float, low: float) -> None:
        """Take a candle's best price into the position's track without moving its stop."""
        track = self._stops.get(position.pair) if position is not None else None
        if position is not None and track is not None and track.ts_opened == position.ts_opened:
            long = position.side is PositionSide.LONG
            track.best = max(track.best, _dec(high)) if long else min(track.best, _dec(low))

    def _stop_candidates(
        self,
        position: Position,
        track: _StopTrack,
        distance: Decimal | None,
        taker_fee: Decimal,
    ) -> dict[str, Decimal]:
        # Each rule's proposed stop (trailing or initial, break-even once armed), unrounded.
        sign = 1 if position.side is PositionSide.LONG else -1
        entry, current = position.entry_price, position.stop_price
        candidates: dict[str, Decimal] = {}
        if distance is not None:
            if self.settings.trailing_stop:
                candidates["trailing"] = track.best - sign * distance
            elif current is None:
                candidates["initial"] = entry - sign * distance
        be_r = self.settings.break_even_at_r
        if be_r is not None and track.initial_risk is not None and track.initial_risk > 0:
            if (track.best - entry) * sign >= _setting(be_r) * track.initial_risk:
                track.armed = True
            if track.armed:
                candidates["break_even"] = break_even_price(position, taker_fee)
        return candidates

    def _track(self, position: Position, distance: Decimal | None) -> _StopTrack:
        track = self._stops.get(position.pair)
        if track is None or track.ts_opened != position.ts_opened:
            stop = position.stop_price
            if (
                stop is not None
                and (position.entry_price - stop)
                * (1 if position.side is PositionSide.LONG else -1)
                > 0
            ):
                risk: Decimal | None = abs(position.entry_price - stop)
            else:
                risk = distance
            track = _StopTrack(position.ts_opened, risk, position.entry_price)
            self._stops[position.pair] = track
        return track


def refused_entry(
    signal: Signal, ctx: RiskContext, position: Position | None, *, long_only: bool
) -> Veto | None:
    """Return what refuses an entry before sizing: no position to exit, the side, pyramiding."""
    if signal.exit_only:
        return Veto("exit signal without a position", None, "no_position")
    if long_only and signal.side is Side.SELL:
        return Veto("long-only: short entries disabled", None, "long_only")
    if ctx.market.type is MarketType.SPOT and signal.side is Side.SELL:
        return Veto("spot market: cannot open a short", None, "spot_short")
    if position is not None:
        return Veto("already in a position on this pair", None, "pyramiding")
    return None


def liquidation_check(
    signal: Signal,
    ctx: RiskContext,
    qty: Decimal,
    stop: Decimal,
    leverage: Decimal,
    margin_mode: str,
    settings: RiskSettings,
) -> Veto | None:
    """Refuse a perpetual entry whose stop lies beyond its liquidation price or its buffer.

    The liquidation price is `perpetuals`' for the entry at `ctx.price`: isolated margin
    `qty x price / leverage`, or under cross margin the account equity net of the fee to
    close; the stop must trigger `settings.liquidation_buffer` of the way inside it.
    """
    if ctx.market.type is not MarketType.LINEAR:
        return None
    side = PositionSide.LONG if signal.side is Side.BUY else PositionSide.SHORT
    price = ctx.price
    margin = (
        cross_margin(ctx.equity, side, price, qty, ctx.taker_fee)
        if margin_mode == "cross"
        else isolated_margin(price, qty, leverage)
    )
    liq = liquidation_price(side, price, qty, margin, signal.pair)
    reason = liquidation_veto(side, price, stop, liq, _setting(settings.liquidation_buffer))
    if reason is None:
        return None
    return Veto(f"{reason} ({margin_mode} margin, {leverage}x)", None, "liquidation")


def exposure_caps(
    settings: RiskSettings, signal: Signal, ctx: RiskContext, lev: Decimal
) -> dict[str, Decimal]:
    """Return the largest quantity each exposure limit allows at leverage `lev`, by name."""
    s, price = settings, ctx.price
    equity = ctx.equity
    exposure = _exposure(ctx)
    held = ctx.positions.get(signal.pair)
    on_pair = held.notional if held is not None else ZERO
    out = {
        "max_position_fraction": (
            max(equity * _setting(s.max_position_fraction) - on_pair, ZERO) / price
        ),
        "max_total_exposure": max(equity * _setting(s.max_total_exposure) - exposure, ZERO) / price,
        "max_leverage": max(equity * lev - exposure, ZERO) / price,
    }
    # Buying needs the notional (spot) or its margin (linear) plus the fee, from cash.
    funding = "cash" if ctx.market.type is MarketType.SPOT else "margin"
    out[funding] = max(ctx.cash, ZERO) / (price * (1 / lev + ctx.taker_fee))
    if ctx.market.max_qty is not None:
        out["market_max_qty"] = ctx.market.max_qty
    if ctx.sleeve_free is not None:  # a strategy holds no more than its sleeve (x leverage)
        out["sleeve"] = max(ctx.sleeve_free, ZERO) * lev / price
    return out


def _sizing_equity(ctx: RiskContext) -> tuple[Decimal, str]:
    # What an entry is sized on: the strategy's sleeve when several trade, else the account.
    if ctx.sleeve_equity is not None:
        return ctx.sleeve_equity, "sleeve equity"
    return ctx.equity, "equity"


def _leverage(settings: RiskSettings, market: Market) -> Decimal:
    if market.type is MarketType.SPOT:
        return Decimal(1)
    lev = _setting(settings.max_leverage)
    if market.max_leverage > 0:
        lev = min(lev, market.max_leverage)
    return max(lev, Decimal(1))


def measure_volatility(
    pair: str, ctx: RiskContext, window: int, min_sample: int, bar_ms: int | None
) -> tuple[float, str] | None:
    """Return the pair's volatility per sizing period (day, or bar) and its source.

    The standard deviation of its last `window` returns (at least `min_sample` of them),
    else ATR / price; per UTC day when the bar length `bar_ms` is known, else per bar.
    """
    sigma, source = None, ""
    series = ctx.returns.get(pair) if ctx.returns else None
    if series is not None:
        tail = np.asarray(series, dtype=float)[-window:]
        tail = tail[np.isfinite(tail)]
        if len(tail) >= max(min_sample, 2):
            sigma, source = float(np.std(tail, ddof=1)), f"stdev of {len(tail)} returns"
    if sigma is None and ctx.atr is not None and ctx.atr > 0 and ctx.price > 0:
        sigma, source = ctx.atr / float(ctx.price), "ATR / price"
    if sigma is None or not sigma > 0 or not math.isfinite(sigma):
        return None
    if bar_ms is not None:
        return sigma * math.sqrt(DAY_MS / bar_ms), f"daily, {source}"
    return sigma, f"per bar, {source}"


def _volatility_size(
    measured: tuple[float, str] | None, target: float, ctx: RiskContext
) -> _Size | None:
    if measured is None:
        return None
    sigma, source = measured
    base, of = _sizing_equity(ctx)
    notional = base * _dec(target) / _dec(sigma)
    return _Size(
        notional / ctx.price,
        "volatility_target",
        f"target {target:.2%} of {of} {base:.2f} / volatility {sigma:.4%} ({source})",
    )


def _tightest(
    candidates: Mapping[str, Decimal], close: Decimal, long: bool, tick_size: Decimal | None
) -> tuple[str, Decimal | None]:
    # The tightest candidate on the right side of the close, rounded away from it to a tick.
    sign = 1 if long else -1
    best_rule, best_stop = "", None
    for rule, price in candidates.items():
        if tick_size is not None and tick_size > 0:
            rounding = ROUND_CEILING if long else ROUND_FLOOR
            price = (price / tick_size).to_integral_value(rounding=rounding) * tick_size
        if price <= 0 or (price - close) * sign >= 0:
            continue  # on the wrong side of the close: it would fill at once
        if best_stop is None or (price - best_stop) * sign > 0:
            best_rule, best_stop = rule, price
    return best_rule, best_stop


@functools.lru_cache(maxsize=256)
def _setting_decimal(value: float) -> Decimal:
    return _dec(value)


def _setting(value: float) -> Decimal:
    # A setting as a Decimal, converted once per value (settings are a handful of floats;
    # a decision converts several). Zeros keep their sign: -0.0 == 0.0 shares a cache key.
    return _setting_decimal(value) if value else _dec(value)


def _candle(ctx: RiskContext) -> int:
    return ctx.now if ctx.candle_ts is None else ctx.candle_ts


def _closes(side: Side, position: Position) -> bool:
    return (position.side is PositionSide.LONG) == (side is Side.SELL)


def _exposure(ctx: RiskContext) -> Decimal:
    gross = getattr(ctx.positions, "gross_notional", None)  # a PositionsView: off the books
    if gross is not None:
        return cast(Decimal, gross())
    return sum((p.notional for p in ctx.positions.values()), ZERO)


def _floor(qty: Decimal, lot: Decimal) -> Decimal:
    if lot <= 0:
        return qty
    return (qty / lot).to_integral_value(rounding=ROUND_FLOOR) * lot
