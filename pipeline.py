"""The ordered core: for each closed candle, data -> strategy -> risk -> executor -> reward.

`Engine` runs that sequence for one candle at a time, awaited in order, so a replay, a
backtest and live trading take the same decisions on the same candles. It also implements
the operator façade (`models.Control`) that Telegram, the dashboard and the web view use.
`main.py` builds it with the collaborators of the chosen mode and owns the tasks around it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import numpy as np
import structlog

from data_manager import DataManager
from error_handler import BotError, StrategyError
from models import (
    BotState,
    Candle,
    ClosedTrade,
    Decision,
    Fill,
    Market,
    Order,
    OrderBook,
    OrderIntent,
    OrderStatus,
    OrderType,
    PositionSide,
    Side,
    Signal,
    Snapshot,
    TradingState,
    Veto,
)
from portfolio import Portfolio
from reward_system import RewardSystem
from risk_management import RiskContext, RiskManager
from strategy import Strategy
from trade_executor import TradeExecutor
from utils.utilities import AuditTrail, Clock, timeframe_to_ms


log = structlog.get_logger(__name__)

# Fills produced when a candle closes (the simulated exchange); live mode has none here,
# its fills arrive from the private stream and go straight to `Engine.on_fill`.
CandleMatcher = Callable[[Candle], list[tuple[Order, Fill]]]
Alert = Callable[[str, dict[str, Any]], None]


class Engine:
    """Run the per-candle pipeline and answer operator commands."""

    def __init__(
        self,
        *,
        mode: str,
        timeframe: str,
        pairs: list[str],
        clock: Clock,
        data: DataManager,
        strategy: Strategy,
        risk: RiskManager,
        executor: TradeExecutor,
        reward: RewardSystem,
        portfolio: Portfolio,
        market_for: Callable[[str], Market],
        audit: AuditTrail,
        matcher: CandleMatcher | None = None,
        fill_now: Callable[[str], list[tuple[Order, Fill]]] | None = None,
        alert: Alert | None = None,
        stop_event: asyncio.Event | None = None,
    ) -> None:
        self.mode = mode
        self.timeframe = timeframe
        self.step = timeframe_to_ms(timeframe)
        self.pairs = list(pairs)
        self.clock = clock
        self.data = data
        self.strategy = strategy
        self.risk = risk
        self.executor = executor
        self.reward = reward
        self.portfolio = portfolio
        self.market_for = market_for
        self.audit = audit
        self.matcher = matcher
        self.fill_now = fill_now
        self.alert = alert or (lambda kind, data: None)
        self.stop_event = stop_event or asyncio.Event()
        self.state = BotState.STARTING
        self.candles = 0
        self.signals = 0
        self.vetoes = 0
        self.decisions: dict[str, Decision] = {}
        self.errors: deque[str] = deque(maxlen=20)
        self.books: dict[str, OrderBook] = {}
        self.last_price: dict[str, Decimal] = {}
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.decision_latency_ms: deque[float] = deque(maxlen=10_000)
        self._flattening = False
        self.extra_status: Callable[[], dict[str, Any]] = dict

    # -- State machine -----------------------------------------------------------------------

    _TRANSITIONS: frozenset[tuple[BotState, BotState]] = frozenset(
        {
            (BotState.STARTING, BotState.RUNNING),
            (BotState.STARTING, BotState.STOPPING),
            (BotState.RUNNING, BotState.PAUSED),
            (BotState.PAUSED, BotState.RUNNING),
            (BotState.RUNNING, BotState.STOPPING),
            (BotState.PAUSED, BotState.STOPPING),
            (BotState.STOPPING, BotState.STOPPED),
        }
    )

    def set_state(self, new: BotState) -> None:
        """Move the bot's lifecycle state; illegal moves are ignored with a warning."""
        if new == self.state:
            return
        if (self.state, new) not in self._TRANSITIONS:
            log.warning("illegal_bot_transition", **{"from": str(self.state), "to": str(new)})
            return
        log.info("state_changed", machine="bot", **{"from": str(self.state), "to": str(new)})
        self.state = new

    # -- The pipeline ------------------------------------------------------------------------

    async def on_candle(self, candle: Candle) -> None:
        """Process one closed candle through the whole pipeline, in order."""
        if not self.data.on_candle(candle):
            return
        self.candles += 1
        if self.first_ts is None:
            self.first_ts = candle.ts
        self.last_ts = candle.ts
        price = Decimal(str(candle.close))
        self.last_price[candle.pair] = price
        if self.matcher is not None:
            for order, fill in self.matcher(candle):
                await self.on_fill(order, fill)
        self.portfolio.mark(candle.pair, price)
        now = self.clock.now_ms()
        equity = self.portfolio.record_equity(candle.ts + self.step)
        trading_state = self.risk.update(now, Decimal(str(equity)))
        if trading_state is TradingState.FLATTEN:
            await self._flatten("circuit breaker: flatten")
            return
        if candle.pair not in self.pairs and self.portfolio.position(candle.pair) is None:
            return  # drained pair: no new entries, and nothing left to manage
        signal = self._safe_signal(candle)
        if signal is not None:
            await self._decide(signal, candle, now)

    def _safe_signal(self, candle: Candle) -> Signal | None:
        frame = self.data.frame(candle.pair, candle.timeframe)
        holding = self.portfolio.position(candle.pair) is not None
        try:
            return self.strategy.signal(candle.pair, frame, holding=holding)
        except Exception as e:
            error = StrategyError(f"strategy failed: {e!r}", component="strategy", pair=candle.pair)
            log.exception("strategy_failed", pair=candle.pair)
            self.errors.append(error.message)
            self.alert("error", {"message": error.message})
            return None

    async def _decide(self, signal: Signal, candle: Candle, now: int) -> None:
        self.signals += 1
        self.audit.record(
            "signal",
            now,
            pair=signal.pair,
            side=str(signal.side),
            strength=signal.strength,
            reason=signal.reason,
            price=signal.price,
            features=signal.features,
        )
        entering = not signal.exit_only and self.portfolio.position(signal.pair) is None
        if entering and (self.state is BotState.PAUSED or signal.pair not in self.pairs):
            verdict: OrderIntent | Veto = Veto(
                "paused by operator" if self.state is BotState.PAUSED else "pair drained",
                None,
                "operator",
            )
        else:
            verdict = self.risk.evaluate(signal, self._risk_context(signal.pair, now))
        if isinstance(verdict, Veto):
            self.vetoes += 1
            self.audit.record(
                "veto", now, pair=signal.pair, reason=verdict.reason, guard=verdict.guard
            )
            self.decisions[signal.pair] = Decision(
                signal.pair, now, signal, "veto", veto=verdict, features=signal.features
            )
            return
        self.audit.record("risk_approved", now, pair=signal.pair, reason=verdict.reason)
        self.decisions[signal.pair] = Decision(
            signal.pair, now, signal, "order", intent=verdict, features=signal.features
        )
        order = await self.executor.submit(verdict, last_price=Decimal(str(candle.close)))
        if order.status is not OrderStatus.REJECTED and self.fill_now is not None:
            for filled, fill in self.fill_now(signal.pair):
                await self.on_fill(filled, fill)

    def _risk_context(self, pair: str, now: int) -> RiskContext:
        frame = self.data.frame(pair, self.timeframe)
        atr: float | None = None
        period = self.risk.settings.atr_period
        if len(frame) > period:
            import talib

            values = talib.ATR(
                frame["high"].to_numpy(), frame["low"].to_numpy(), frame["close"].to_numpy(), period
            )
            last = float(values[-1])
            atr = last if np.isfinite(last) else None
        return RiskContext(
            now=now,
            equity=self.portfolio.equity(),
            cash=self.portfolio.cash,
            positions=self.portfolio.positions(),
            market=self.market_for(pair),
            price=self.last_price.get(pair, Decimal(0)),
            atr=atr,
            taker_fee=self.executor.taker_fee,
        )

    async def on_fill(self, order: Order, fill: Fill) -> None:
        """Apply a fill from the matching engine or the private stream."""
        trade = await self.executor.on_fill(order, fill)
        if trade is not None:
            self._on_trade_closed(trade)

    def _on_trade_closed(self, trade: ClosedTrade) -> None:
        now = self.clock.now_ms()
        self.risk.on_trade_closed(trade, now)
        reward = self.reward.on_trade_closed(self.strategy.name, trade)
        self.audit.record("trade_closed", now, reward=reward, **trade.as_dict())
        log.info(
            "trade_closed",
            pair=trade.pair,
            entry_price=trade.entry_price,
            exit_price=trade.exit_price,
            qty=trade.qty,
            pnl=round(trade.pnl, 6),
        )

    async def on_order_book(self, book: OrderBook) -> None:
        """Keep the latest book per pair (depth chart, book-walk fills)."""
        self.books[book.pair] = book

    async def _flatten(self, reason: str) -> None:
        if self._flattening:
            return
        self._flattening = True
        try:
            for pair in list(self.portfolio.positions()):
                await self.close_position(pair, reason)
        finally:
            self._flattening = False

    async def close_position(self, pair: str, reason: str) -> Order | None:
        """Send a reduce-only market order closing the position on `pair`."""
        position = self.portfolio.position(pair)
        if position is None:
            return None
        if any(
            o.pair == pair and o.reduce_only and o.type is OrderType.MARKET
            for o in self.executor.open_orders()
        ):
            return None  # an exit is already working
        now = self.clock.now_ms()
        intent = OrderIntent(
            pair=pair,
            side=Side.SELL if position.side is PositionSide.LONG else Side.BUY,
            qty=position.qty,
            type=OrderType.MARKET,
            client_order_id=self.risk.client_order_id(now, pair),
            reason=reason,
            reduce_only=True,
            ts=now,
        )
        order = await self.executor.submit(intent, last_price=self.last_price.get(pair))
        if self.fill_now is not None:
            for filled, fill in self.fill_now(pair):
                await self.on_fill(filled, fill)
        return order

    # -- Operator façade (models.Control) ----------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Return the read-only state for the UI, the web view and Telegram."""
        now = self.clock.now_ms()
        return Snapshot(
            ts=now,
            mode=self.mode,
            state=self.state,
            trading_state=self.risk.trading_state,
            portfolio=self.portfolio.snapshot(now),
            pairs=tuple(self.pairs),
            recent_trades=tuple(self.portfolio.closed[-50:]),
            open_orders=tuple(self.executor.open_orders()),
            equity_curve=tuple(self.portfolio.equity_curve[-500:]),
            last_decisions=dict(self.decisions),
            order_books=dict(self.books),
            scores=self.reward.scores(),
            errors=tuple(self.errors),
            risk={
                "state": str(self.risk.trading_state),
                "exposure": float(self.portfolio.exposure()),
                "equity": float(self.portfolio.equity()),
                "peak_equity": float(self.risk.breakers.peak_equity),
                "max_drawdown": self.portfolio.max_drawdown,
                "consecutive_losses": self.risk.breakers.consecutive_losses,
                "last_trigger": dict(self.risk.breakers.last_trigger),
            },
            **self.extra_status(),
        )

    async def pause(self, reason: str) -> None:
        """Stop opening positions; exits, stops and take-profits keep working."""
        log.info("operator_pause", reason=reason)
        self.set_state(BotState.PAUSED)

    async def resume(self, reason: str) -> None:
        """Resume trading and clear a manual risk state."""
        log.info("operator_resume", reason=reason)
        self.risk.set_manual(None)
        self.set_state(BotState.RUNNING)

    async def stop_buy(self, reason: str) -> None:
        """Allow exits only."""
        log.info("operator_stop_buy", reason=reason)
        self.risk.set_manual(TradingState.REDUCING)

    async def force_exit(self, pair: str, reason: str) -> None:
        """Close a position at market."""
        await self.close_position(pair, f"force exit: {reason}")

    async def reconcile(self) -> str:
        """Return a short account of positions and working orders."""
        positions = self.portfolio.positions()
        lines = [f"{len(positions)} position(s), {len(self.executor.open_orders())} open order(s)"]
        lines += [f"{p.pair} {p.side} {p.qty} @ {p.entry_price}" for p in positions.values()]
        return "\n".join(lines)

    async def stop(self, reason: str) -> None:
        """Ask the daemon to shut down gracefully."""
        log.info("operator_stop", reason=reason)
        self.stop_event.set()

    # -- Results -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Return the run's summary (the `--summary-json` document)."""
        start = float(self.portfolio.starting_cash)
        final = float(self.portfolio.equity())
        return {
            "mode": self.mode,
            "strategy": self.strategy.describe(),
            "pairs": self.pairs,
            "timeframe": self.timeframe,
            "candles": self.candles,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "signals": self.signals,
            "vetoes": self.vetoes,
            "rejections": self.executor.rejections,
            "n_trades": len(self.portfolio.closed),
            "starting_balance": start,
            "final_equity": final,
            "total_return": final / start - 1 if start else 0.0,
            "max_drawdown": self.portfolio.max_drawdown,
            "fees": float(self.portfolio.fees),
            "realised_pnl": float(self.portfolio.realised_pnl),
            "open_positions": [
                {
                    "pair": p.pair,
                    "side": str(p.side),
                    "qty": float(p.qty),
                    "entry_price": float(p.entry_price),
                    "entry_ts": p.ts_opened,
                    "mark_price": float(p.mark_price) if p.mark_price is not None else None,
                }
                for p in self.portfolio.positions().values()
            ],
            "trades": [t.as_dict() for t in self.portfolio.closed],
        }


async def drain(
    queue: asyncio.Queue[Candle | None], handler: Callable[[Candle], Awaitable[None]]
) -> int:
    """Feed candles from `queue` to `handler` until the `None` sentinel; return the count."""
    count = 0
    while True:
        item = await queue.get()
        if item is None:
            return count
        try:
            await handler(item)
        except BotError:
            raise
        count += 1
