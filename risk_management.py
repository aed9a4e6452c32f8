"""Risk: turn a Signal into a sized OrderIntent with a stop, or a Veto with a reason.

Guards are small classes that look at the context they are given (equity including
unrealised PnL, positions, the clock's `now`) and return `Veto | None`; they never query a
store. The circuit breakers form a ladder of trading states::

    normal -> reduced (smaller size) -> reducing (exits only) -> halted -> flatten

Exits are always allowed: a veto never traps a position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Protocol

import structlog

from config import RiskSettings
from models import (
    ClosedTrade,
    Market,
    OrderIntent,
    OrderType,
    Position,
    PositionSide,
    Side,
    Signal,
    TradingState,
    Veto,
)


log = structlog.get_logger(__name__)
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class RiskContext:
    """Everything a risk decision may look at, passed in (never fetched)."""

    now: int
    equity: Decimal
    cash: Decimal
    positions: dict[str, Position]
    market: Market
    price: Decimal
    atr: float | None = None
    taker_fee: Decimal = Decimal("0.001")


class Guard(Protocol):
    """A rule that may refuse a new position."""

    name: str

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | None:
        """Return a Veto to refuse, None to allow."""
        ...


@dataclass(slots=True)
class MaxOpenPositions:
    """Refuse a new position when `limit` are already open."""

    limit: int
    name: str = "max_open_positions"

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | None:
        """Return a veto at the limit."""
        if signal.pair not in ctx.positions and len(ctx.positions) >= self.limit:
            return Veto(
                f"{len(ctx.positions)} positions open (limit {self.limit})", None, self.name
            )
        return None


@dataclass(slots=True)
class CircuitBreakers:
    """Drawdown and loss-streak breakers on equity including unrealised PnL.

    Call `update(now, equity)` on every candle and `on_trade_closed` after each round trip;
    `state` is the resulting rung of the ladder.
    """

    settings: RiskSettings
    state: TradingState = TradingState.NORMAL
    peak_equity: Decimal = Decimal(0)
    day_start_equity: Decimal = Decimal(0)
    day: int = -1
    consecutive_losses: int = 0
    cooldown_until: int | None = None
    manual: TradingState | None = None
    last_trigger: dict[str, object] = field(default_factory=dict)

    def update(self, now: int, equity: Decimal) -> TradingState:
        """Recompute the trading state from equity; log and return it."""
        day = now // DAY_MS
        if day != self.day:
            self.day = day
            self.day_start_equity = equity
        self.peak_equity = max(self.peak_equity, equity)
        new, why = self._evaluate(now, equity)
        if new is not self.state:
            log.warning(
                "state_changed",
                machine="trading_state",
                **{"from": str(self.state), "to": str(new)},
                reason=why,
                equity=str(equity),
                peak=str(self.peak_equity),
                day_start=str(self.day_start_equity),
            )
            self.last_trigger = {"ts": now, "from": str(self.state), "to": str(new), "reason": why}
            self.state = new
        return self.state

    def _evaluate(self, now: int, equity: Decimal) -> tuple[TradingState, str]:
        s = self.settings
        if self.manual is not None:
            return self.manual, "manual"
        if self.peak_equity > 0:
            drawdown = float((self.peak_equity - equity) / self.peak_equity)
            if drawdown >= s.max_drawdown:
                if not s.auto_resume or self.state in (TradingState.HALTED, TradingState.FLATTEN):
                    return TradingState.FLATTEN, f"drawdown {drawdown:.2%} >= {s.max_drawdown:.2%}"
                return TradingState.FLATTEN, f"drawdown {drawdown:.2%} >= {s.max_drawdown:.2%}"
        if self.day_start_equity > 0:
            day_loss = float((self.day_start_equity - equity) / self.day_start_equity)
            if day_loss >= s.max_daily_loss:
                return TradingState.HALTED, f"daily loss {day_loss:.2%} >= {s.max_daily_loss:.2%}"
        if self.cooldown_until is not None and now < self.cooldown_until:
            return TradingState.REDUCING, f"{self.consecutive_losses} consecutive losses"
        if self.peak_equity > 0:
            drawdown = float((self.peak_equity - equity) / self.peak_equity)
            if drawdown >= s.reduce_size_drawdown:
                return TradingState.REDUCED, f"drawdown {drawdown:.2%}"
        return TradingState.NORMAL, "within limits"

    def on_trade_closed(self, trade: ClosedTrade, now: int) -> None:
        """Count losing streaks; start a cooldown at the limit."""
        if trade.pnl < 0:
            self.consecutive_losses += 1
            if self.consecutive_losses >= self.settings.max_consecutive_losses:
                self.cooldown_until = now + self.settings.cooldown_minutes * 60_000
                self.consecutive_losses = 0
        else:
            self.consecutive_losses = 0


class RiskManager:
    """Size positions, set stops and apply the guards and circuit breakers."""

    def __init__(self, settings: RiskSettings, *, long_only: bool = True) -> None:
        self.settings = settings
        self.long_only = long_only
        self.breakers = CircuitBreakers(settings)
        self.guards: list[Guard] = [MaxOpenPositions(settings.max_open_positions)]
        self._ids = itertools.count(1)
        self.all_in = settings.profile == "all_in"

    @property
    def trading_state(self) -> TradingState:
        """Return the current rung of the ladder (always normal under `all_in`)."""
        return TradingState.NORMAL if self.all_in else self.breakers.state

    def update(self, now: int, equity: Decimal) -> TradingState:
        """Feed the breakers with the latest equity (including unrealised PnL)."""
        if self.all_in:
            return TradingState.NORMAL
        return self.breakers.update(now, equity)

    def on_trade_closed(self, trade: ClosedTrade, now: int) -> None:
        """Account a closed round trip in the loss-streak guard."""
        if not self.all_in:
            self.breakers.on_trade_closed(trade, now)

    def set_manual(self, state: TradingState | None) -> None:
        """Force a state (kill switch, /stopbuy, /pause) or clear it with None."""
        self.breakers.manual = state

    def client_order_id(self, now: int, pair: str) -> str:
        """Return a unique, sortable client order id (Bybit allows 36 characters)."""
        base = pair.split("/")[0].split(":")[0][:6]
        return f"k{now:x}{base}{next(self._ids):04x}"[:36]

    def evaluate(self, signal: Signal, ctx: RiskContext) -> OrderIntent | Veto:
        """Return the order to send for `signal`, or why not."""
        position = ctx.positions.get(signal.pair)
        if position is not None and _closes(signal.side, position):
            return self._exit(signal, position, ctx)
        if signal.exit_only:
            return Veto("exit signal without a position", None, "no_position")
        if self.long_only and signal.side is Side.SELL:
            return Veto("long-only: short entries disabled", None, "long_only")
        if position is not None:
            return Veto("already in a position on this pair", None, "pyramiding")
        state = self.trading_state
        if state not in (TradingState.NORMAL, TradingState.REDUCED):
            return Veto(
                f"trading state {state}: entries blocked ({self.breakers.last_trigger.get('reason', '')})",
                self.breakers.cooldown_until,
                "circuit_breaker",
            )
        for guard in self.guards:
            veto = guard.check(signal, ctx)
            if veto is not None:
                return veto
        return self._entry(signal, ctx, state)

    def _exit(self, signal: Signal, position: Position, ctx: RiskContext) -> OrderIntent:
        return OrderIntent(
            pair=signal.pair,
            side=signal.side,
            qty=position.qty,
            type=OrderType.MARKET,
            client_order_id=self.client_order_id(ctx.now, signal.pair),
            reason=signal.reason,
            reduce_only=True,
            ts=ctx.now,
        )

    def _entry(self, signal: Signal, ctx: RiskContext, state: TradingState) -> OrderIntent | Veto:
        s = self.settings
        price = ctx.price
        if price <= 0:
            return Veto("no valid price", None, "price")
        if self.all_in:
            # Reference profile: the whole cash in one market buy sized in quote currency.
            qty = _floor(ctx.cash / (price * (1 + ctx.taker_fee)), ctx.market.lot_size)
            if qty <= 0:
                return Veto("no cash", None, "cash")
            return OrderIntent(
                pair=signal.pair,
                side=signal.side,
                qty=qty,
                type=OrderType.MARKET,
                client_order_id=self.client_order_id(ctx.now, signal.pair),
                reason=signal.reason,
                ts=ctx.now,
                quote_amount=ctx.cash,
            )
        atr = Decimal(str(ctx.atr)) if ctx.atr and ctx.atr > 0 else price * Decimal("0.01")
        stop_distance = atr * Decimal(str(s.stop_atr_multiple))
        risk_budget = ctx.equity * Decimal(str(s.risk_per_trade))
        qty = risk_budget / stop_distance
        caps = {
            "max_position_fraction": ctx.equity * Decimal(str(s.max_position_fraction)) / price,
            "max_total_exposure": max(
                ctx.equity * Decimal(str(s.max_total_exposure)) - _exposure(ctx), Decimal(0)
            )
            / price,
            "cash": ctx.cash / (price * (1 + ctx.taker_fee)),
        }
        binding = "risk_per_trade"
        for name, cap in caps.items():
            if cap < qty:
                qty, binding = cap, name
        if state is TradingState.REDUCED:
            qty *= Decimal(str(s.reduced_size_factor))
            binding += "+reduced"
        qty = _floor(qty, ctx.market.lot_size)
        if qty <= 0 or qty * price < ctx.market.min_notional:
            return Veto(f"size {qty} below market minimum (binding: {binding})", None, "min_size")
        sign = 1 if signal.side is Side.BUY else -1
        stop = price - sign * stop_distance
        take_profit = (
            price + sign * atr * Decimal(str(s.take_profit_atr_multiple))
            if s.take_profit_atr_multiple
            else None
        )
        return OrderIntent(
            pair=signal.pair,
            side=signal.side,
            qty=qty,
            type=OrderType.MARKET,
            client_order_id=self.client_order_id(ctx.now, signal.pair),
            reason=f"{signal.reason}; size by {binding}",
            stop_loss=stop,
            take_profit=take_profit,
            ts=ctx.now,
        )


def _closes(side: Side, position: Position) -> bool:
    return (position.side is PositionSide.LONG) == (side is Side.SELL)


def _exposure(ctx: RiskContext) -> Decimal:
    return sum((p.notional for p in ctx.positions.values()), Decimal(0))


def _floor(qty: Decimal, lot: Decimal) -> Decimal:
    if lot <= 0:
        return qty
    return (qty / lot).to_integral_value(rounding=ROUND_FLOOR) * lot
