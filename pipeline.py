"""The ordered core: for each closed candle, data -> strategy -> risk -> executor -> reward.

`Engine` runs that sequence for one candle at a time, awaited in order, so a replay, a
backtest and live trading take the same decisions on the same candles. It has no branch
for the simulated exchange: that sits in front of it (`trade_simulator.SimDriver`), and
its fills come in through `on_fill` as the live exchange's do. Its bases hold the state
(`EngineState`) and the operator façade (`EngineControl`, `models.Control`) that
Telegram, the dashboard and the web view use. `runner` builds it with the collaborators
of the chosen mode and owns the tasks around it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any

import numpy as np
import structlog

from anomaly_detection import AnomalyWatch
from audit_fields import approved_fields, signal_fields
from capital_allocation import Allocator, strategy_sections
from chart_data import CHART_LIMIT, chart_body
from data_manager import DataManager
from engine_quiet import QuietSteps, last_atr
from error_handler import BotError, BusinessError, RecoverableError, StrategyError
from models import (
    BotState,
    Candle,
    ClosedTrade,
    Decision,
    ErrorRaised,
    EventSink,
    Fill,
    Market,
    Order,
    OrderBook,
    OrderIntent,
    OrderStatus,
    OrderType,
    PositionSide,
    RiskReset,
    Side,
    Signal,
    Snapshot,
    TradingState,
    Veto,
    fast_init,
)
from pattern_recognition import PatternFilter
from perpetuals import FundingSchedule
from portfolio import Portfolio
from reward_system import RewardSystem
from risk_management import ReturnsView, RiskContext, RiskManager, breaker_report
from run_summary import BreakerTrip, OpenPosition, RunSummary, StrategyRef, TradingSpan
from signal_sources import (
    PrecomputedSignals as PrecomputedSignals,
)
from signal_sources import (
    RollingSignals as RollingSignals,
)
from signal_sources import (
    SignalSource as SignalSource,
)
from signal_sources import (
    StrategyRouter as StrategyRouter,
)
from signal_sources import (
    decide_signal as decide_signal,
)
from strategy import Strategy
from trade_executor import TradeExecutor
from utils.utilities import AuditTrail, Clock, timeframe_to_ms


log = structlog.get_logger(__name__)
# Equity points a snapshot carries for the views (the newest; the web view thins them).
CURVE_POINTS = 500


@fast_init
@dataclass(frozen=True, slots=True)
class DeferredOrder:
    """An order risk approved, with what its latency is measured from.

    `strength` is the signal's (a burst sends its entries strongest first); `received`
    and `started` are `time.perf_counter()` readings: the feed handed the candle over, the
    engine took it (None: not measured, e.g. replays).
    """

    intent: OrderIntent
    strength: float
    received: float | None
    started: float


class EngineState:
    """The engine's collaborators and run state, and what reads them.

    The base of `Engine`: the constructor, the bot's lifecycle machine, the traded pairs,
    prices and the risk context an order decision is checked against.
    """

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
        alert: EventSink | None = None,
        stop_event: asyncio.Event | None = None,
        signals: SignalSource | None = None,
        max_lag_ms: int | None = None,
        anomaly_watch: AnomalyWatch | None = None,
        pattern_filter: PatternFilter | None = None,
        sleeves: Allocator | None = None,
        funding: dict[str, FundingSchedule] | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.mode = mode
        self.timeframe = timeframe
        self.step = timeframe_to_ms(timeframe)
        self.pairs = list(pairs)
        self._active = set(pairs)
        self.clock = clock
        self.data = data
        self.strategy = strategy
        self.signals_source: SignalSource = signals or RollingSignals(strategy, data, timeframe)
        self.risk = risk
        self.executor = executor
        self.reward = reward
        self.portfolio = portfolio
        self.market_for = market_for
        self.audit = audit
        self.alert: EventSink = alert or (lambda event: None)
        self.stop_event = stop_event or asyncio.Event()
        self.state = BotState.STARTING
        self._init_run_record()
        self._flattening = False
        self.extra_status: Callable[[], dict[str, Any]] = extra_status or dict
        # Trailing / break-even stops need protective orders to move; `all_in` has none.
        self.manage_stops = not risk.all_in and executor.protective_orders
        # Live: a candle that arrives more than this late (a gap refilled after a dropped
        # socket) updates data and marks but takes no new decision. None: replay time.
        self.max_lag_ms = max_lag_ms
        self.stale_candles = 0
        self.reconcile_report = ""
        # Live: the account's equity before this run (the trade store's snapshots, oldest
        # first), shown ahead of this run's curve so the views keep it across restarts.
        self.equity_history: tuple[tuple[int, float], ...] = ()
        # Learned entry filter per pair (self_learning.SafePredictor), when enabled.
        self.predictors: dict[str, Any] = {}
        self.model_threshold = 0.5
        # Awaited after anything that may change the risk state (a candle, a closed trade,
        # an operator command) when the daemon persists it; None (backtests): no cost.
        self.risk_saver: Callable[[], Awaitable[None]] | None = None
        # While a burst is decided together (`burst.BurstDecider`): approved orders go to
        # its sender, which sends them once the burst's other decisions are taken (no
        # decision waits for another's answer), and the risk state is saved once at the
        # burst's end. None: each candle sends (awaiting the answer) and saves as it goes.
        self.sender: Callable[[DeferredOrder], None] | None = None
        self._init_caches()
        # Market-data anomalies pause entries on their pair (None: not watched).
        self.anomaly_watch = anomaly_watch
        # The optional pattern-cluster entry filter (StrategySettings.pattern_filter).
        self.pattern_filter = pattern_filter
        # Multi-strategy: the capital sleeves (None: one strategy trades the account).
        self.sleeves = sleeves
        # Recorded funding per perpetual pair (replays); settled at the candles holding it.
        self.funding: dict[str, FundingSchedule] = funding if funding is not None else {}
        self.funding_settlements = 0

    def _init_run_record(self) -> None:
        """Start the run's record: counters, the latest prices and books, and latencies."""
        self.candles = 0
        self.signals = 0
        self.vetoes = 0
        self.decisions: dict[str, Decision] = {}
        self.errors: deque[str] = deque(maxlen=20)
        self.books: dict[str, OrderBook] = {}
        self.last_close: dict[str, float] = {}
        self.last_candle_ts: dict[str, int] = {}
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.decision_latency_ms: deque[float] = deque(maxlen=100_000)
        self._received: float | None = None
        self._started = 0.0
        # Candle handed to the engine -> order accepted, without the wait in the queue.
        self.decision_service_ms: deque[float] = deque(maxlen=100_000)

    def _init_caches(self) -> None:
        """Start the per-pair caches of the order decision, empty."""
        # Per pair: the window (last ts, length, parameter) and its ATR / returns.
        self._atr_cache: dict[str, tuple[tuple[int, int, int], float | None]] = {}
        self._returns_cache: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
        self._aligned_cache: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
        self._aligned_kept: tuple[tuple[int, int], dict[str, np.ndarray | None]] = ((-1, 0), {})
        self._prices: dict[str, tuple[float, Decimal]] = {}  # per pair: its last close as both
        # Signals computed ahead for a burst: pair -> (candle ts, holding, signal).
        self._early: dict[str, tuple[int, Decimal, Signal | None]] = {}

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

    def price(self, pair: str) -> Decimal | None:
        """Return the last close of `pair` as a Decimal."""
        close = self.last_close.get(pair)
        if close is None:
            return None
        # Kept for the same close (the object itself): its context and its send ask again.
        kept = self._prices.get(pair)
        if kept is None or kept[0] is not close:
            kept = self._prices[pair] = (close, Decimal(repr(close)))
        return kept[1]

    def set_pairs(self, pairs: list[str]) -> None:
        """Replace the traded pairs; dropped ones are drained (exits only)."""
        self.pairs = list(pairs)
        self._active = set(pairs)

    def warm_atr(self, pair: str) -> None:
        """Compute the pair's ATR ahead (a burst's, in one loop while TA-Lib is warm)."""
        self._atr(pair)

    def rehearse_atr(self, pairs: Iterable[str]) -> None:
        """Compute the pairs' ATRs on their windows as they stand, keeping nothing."""
        period = self.risk.settings.atr_period
        for pair in pairs:  # a rehearsal between bursts (`burst_rehearsal`)
            end = self.data.window_end(pair, self.timeframe)
            if end is not None and end[1] > period:
                self._window_atr(pair, period)

    def _atr(self, pair: str) -> float | None:
        period = self.risk.settings.atr_period
        end = self.data.window_end(pair, self.timeframe)
        if end is None or end[1] <= period:
            return None
        # The same window gives the same ATR: a position's candle asks for its stop and
        # then for its risk context, and a burst's entries ask again (window end, period).
        key = (*end, period)
        cached = self._atr_cache.get(pair)
        if cached is not None and cached[0] == key:
            return cached[1]
        atr = self._window_atr(pair, period)
        self._atr_cache[pair] = (key, atr)
        return atr

    def _window_atr(self, pair: str, period: int) -> float | None:
        # Only the tail matters: Wilder's smoothing converges well within ten periods.
        tail = self.data.hlc_tail(pair, self.timeframe, period * 10)
        assert tail is not None  # the window is not empty (`window_end`)
        return last_atr(tail[2], tail[3], tail[4], period)

    def _pair_returns(self, pair: str, before: int | None = None) -> np.ndarray | None:
        # The pair's last `correlation_window` returns (None: fewer than two), computed once
        # per window: every entry reads every held pair's. `before`: of the bars opened
        # before it only (every pair's series then ends on the same bar, whichever of a
        # burst's candles were taken in first); kept while no window changes (a burst's).
        if before is None:
            return self._returns_of(pair, None)
        version, kept = self._aligned_kept
        if version != (self.data.version, before):
            kept = {}
            self._aligned_kept = ((self.data.version, before), kept)
        if pair not in kept:
            kept[pair] = self._returns_of(pair, before)
        return kept[pair]

    def _returns_of(self, pair: str, before: int | None) -> np.ndarray | None:
        window = self.risk.settings.correlation_window
        bars = self.data.arrays(pair, self.timeframe)
        end = len(bars.close)
        if end and before is not None and bars.ts[-1] >= before:
            end = int(np.searchsorted(bars.ts, before))
        if end == 0:
            return None
        key = (int(bars.ts[end - 1]), end, window)
        cache = self._returns_cache if before is None else self._aligned_cache
        cached = cache.get(pair)
        if cached is not None and cached[0] == key:
            return cached[1]
        close = bars.close[max(0, end - window - 1) : end]
        if len(close) <= 2:
            return None
        returns = (close[1:] - close[:-1]) / close[:-1]  # np.diff's, without its wrapper
        returns.flags.writeable = False  # shared between the contexts that read it
        cache[pair] = (key, returns)
        return returns

    def _risk_context(
        self,
        pair: str,
        now: int,
        candle_ts: int | None = None,
        *,
        closing: bool = False,
        equity: Decimal | None = None,
    ) -> RiskContext:
        # `closing`: the signal closes the held position, which risk sizes from the
        # position alone: no ATR or returns (those cost O(positions) per exit).
        # `equity`: the portfolio's, already computed for this candle (O(positions) each).
        positions = self.portfolio.positions_view()  # built as read: O(1) for an exit
        heavy = not self.risk.all_in and not closing
        sleeve = self.sleeves.sizing(pair, positions) if self.sleeves is not None else None
        returns = aligned = None
        # Nothing held: the correlation guard compares with nothing and reads no returns,
        # and only volatility targeting sizes on the pair's own (no views to build then).
        if heavy and (positions or self.risk.sizes_on_returns):
            # The same token, the same returns: a guard keeps its work (a burst's).
            token = (self.data, self.data.version, self.risk.settings.correlation_window)
            returns = ReturnsView(self._pair_returns, [pair, *positions], (*token, None))
            if candle_ts is not None and positions:
                before = partial(self._pair_returns, before=candle_ts)
                aligned = ReturnsView(before, [pair, *positions], (*token, candle_ts))
        return RiskContext(
            now=now,
            equity=self.portfolio.equity() if equity is None else equity,
            cash=self.portfolio.cash,
            positions=positions,
            market=self.market_for(pair),
            price=self.price(pair) or Decimal(0),
            atr=self._atr(pair) if heavy else None,
            taker_fee=self.executor.taker_fee,
            returns=returns,
            aligned_returns=aligned,
            candle_ts=candle_ts,
            sleeve_equity=sleeve[0] if sleeve else None,
            sleeve_free=sleeve[1] if sleeve else None,
            strategy_tag=sleeve[2] if sleeve else None,
        )

    def strategy_of(self, pair: str) -> tuple[str, str | None]:
        """Return the name and order tag of the strategy trading `pair`."""
        owner = self.sleeves.owner(pair) if self.sleeves is not None else None
        return (self.strategy.name, None) if owner is None else (owner.name, owner.tag)

    def _reallocate(self, now: int, equity: Decimal) -> None:
        # The skill ranking re-cuts the sleeves (every allocation.interval_s).
        assert self.sleeves is not None
        event = self.sleeves.rebalance(
            now, equity, self.portfolio.positions(), self.reward.ranked()
        )
        if event is not None:
            self.audit.record(
                "allocation_changed", now, weights={s.name: s.after for s in event.sleeves}
            )
            self.alert(event)


class EngineControl(EngineState):
    """The operator façade (`models.Control`), the engine's exits and the run's results."""

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
            equity_curve=self._equity_curve(),
            last_decisions=dict(self.decisions),
            order_books=dict(self.books),
            scores=self.reward.scores(),
            ranking=tuple(self.reward.ranked()),
            allocation=(
                {} if self.sleeves is None else self.sleeves.describe(self.portfolio.positions())
            ),
            errors=tuple(self.errors),
            model={pair: p.describe() for pair, p in self.predictors.items()},
            anomalies=self.anomaly_watch.status(now) if self.anomaly_watch is not None else {},
            patterns=self.pattern_filter.status() if self.pattern_filter is not None else {},
            markets=self._markets(),
            risk={
                **self.risk.describe(),
                # A fraction of equity, as the views read it (the gross notional over equity).
                "exposure": self._exposure_fraction(),
                "max_drawdown": self.portfolio.max_drawdown,
            },
            **self.extra_status(),
        )

    def check_feed(self) -> None:
        """Report pairs whose candles stopped coming (the stale-feed rule; live timer)."""
        if self.anomaly_watch is not None:
            self.anomaly_watch.check_feed(self.clock.now_ms())

    def patterns(self, pair: str, lookback: int = 3) -> list[dict[str, Any]]:
        """Return the candlestick patterns on `pair`'s last `lookback` candles, newest first.

        Computed on request (/why, the web view) from the rolling window: each item names
        the TA-Lib pattern, its direction and how many bars ago it formed.
        """
        from data_manager import latest_patterns

        frame = self.data.frame(pair, self.timeframe)
        return latest_patterns(frame, lookback=lookback) if len(frame) else []

    def _exposure_fraction(self) -> float:
        equity = self.portfolio.equity()
        return float(self.portfolio.exposure() / equity) if equity > 0 else 0.0

    def _equity_curve(self) -> tuple[tuple[int, float], ...]:
        # The last CURVE_POINTS points: this run's, after the stored history when it is short.
        curve = tuple(self.portfolio.equity_curve[-CURVE_POINTS:])
        room = CURVE_POINTS - len(curve)
        if room <= 0 or not self.equity_history:
            return curve
        start = curve[0][0] if curve else None
        earlier = [p for p in self.equity_history[-room:] if start is None or p[0] < start]
        return (*earlier, *curve)

    def _markets(self) -> dict[str, dict[str, float]]:
        # Last close and the change over a day (or the window held), from the rolling
        # window: one index per pair, no copy.
        day = max(1, 86_400_000 // self.step)
        out: dict[str, dict[str, float]] = {}
        for pair in self.pairs:
            close = self.data.arrays(pair, self.timeframe).close
            if len(close) == 0:
                continue
            last, first = float(close[-1]), float(close[-min(len(close), day + 1)])
            change = last / first - 1 if first > 0 else 0.0
            ts = self.last_candle_ts.get(pair, 0)
            out[pair] = {"last": last, "change": change, "ts": float(ts)}
        return out

    def chart(self, pair: str, limit: int = CHART_LIMIT) -> dict[str, Any]:
        """Return the price chart of `pair`: candles, the strategy's overlays, trade marks.

        Built on request (the web view) from the rolling window; see `chart_data`.
        """
        return chart_body(
            pair,
            self.timeframe,
            self.step,
            self.data.frame(pair, self.timeframe),
            populate=self.strategy.populate,
            trades=self.portfolio.closed[-200:],
            position=self.portfolio.positions().get(pair),
            limit=limit,
        )

    async def pause(self, reason: str) -> None:
        """Stop opening positions; exits, stops and take-profits keep working."""
        log.info("operator_pause", reason=reason)
        self.set_state(BotState.PAUSED)

    async def resume(self, reason: str) -> None:
        """Resume trading after /pause or /stopbuy.

        Only a manual risk state is cleared here; a latched breaker (peak-to-trough flatten,
        daily halt) stays until `reset_risk`, so a routine /resume cannot undo it.
        """
        log.info("operator_resume", reason=reason)
        self.risk.clear_manual()
        self.set_state(BotState.RUNNING)
        if self.risk_saver is not None:
            await self.risk_saver()

    async def reset_risk(self, reason: str) -> None:
        """Lift latched circuit breakers and the manual rung (an explicit operator decision).

        The peak and the day's start are re-based on the current equity. The reset is
        audited (`risk_reset`: who, and the state before and after), alerted and persisted.
        """
        now = self.clock.now_ms()
        breakers = self.risk.breakers
        before_state = self.risk.trading_state
        latched = tuple(breakers.latched)
        before = {
            "state": str(before_state),
            "latched": {name: t.reason for name, t in breakers.latched.items()},
            "manual": str(breakers.manual) if breakers.manual is not None else None,
            "peak_equity": str(breakers.peak_equity),
            "day_start_equity": str(breakers.day_start_equity),
            "consecutive_losses": breakers.consecutive_losses,
        }
        self.risk.reset()
        after_state = self.risk.trading_state
        after = str(after_state)
        log.warning("operator_reset_risk", by=reason, before=before["state"], after=after)
        self.audit.record("risk_reset", now, by=reason, before=before, after=after)
        if self.risk_saver is not None:
            await self.risk_saver()
        self.alert(RiskReset(reason, before_state, after_state, latched))

    async def stop_buy(self, reason: str) -> None:
        """Allow exits only."""
        log.info("operator_stop_buy", reason=reason)
        self.risk.set_manual(TradingState.REDUCING)
        if self.risk_saver is not None:
            await self.risk_saver()

    async def force_exit(self, pair: str, reason: str) -> None:
        """Close a position at market."""
        # An operator's exit is named by the moment it is asked for: one per request.
        await self.close_position(
            pair, f"force exit: {reason}", kind="f", candle_ts=self.clock.now_ms()
        )

    async def reconcile(self) -> str:
        """Return a short account of positions and working orders (and the start-up report)."""
        positions = self.portfolio.positions()
        lines = [f"{len(positions)} position(s), {len(self.executor.open_orders())} open order(s)"]
        lines += [f"{p.pair} {p.side} {p.qty} @ {p.entry_price}" for p in positions.values()]
        if self.reconcile_report:
            lines += ["", "start-up reconciliation:", self.reconcile_report]
        return "\n".join(lines)

    async def stop(self, reason: str) -> None:
        """Ask the daemon to shut down gracefully."""
        log.info("operator_stop", reason=reason)
        self.stop_event.set()

    # -- Exits -------------------------------------------------------------------------------------

    async def _flatten(self, reason: str) -> None:
        if self._flattening:
            return
        self._flattening = True
        try:
            for pair in list(self.portfolio.positions()):
                await self.close_position(pair, reason)
        finally:
            self._flattening = False

    async def close_position(
        self, pair: str, reason: str, *, kind: str = "c", candle_ts: int | None = None
    ) -> Order | None:
        """Send a reduce-only market order closing the position on `pair`.

        The order is named after the candle it is decided on (the pair's last candle;
        `kind` "c" for the engine's own exits), so a restarted bot re-deciding it cannot
        send it twice.
        """
        position = self.portfolio.position(pair)
        if position is None:
            return None
        if any(
            o.reduce_only and o.type is OrderType.MARKET for o in self.executor.open_orders(pair)
        ):
            return None  # an exit is already working
        now = self.clock.now_ms()
        if candle_ts is None:
            candle_ts = self.last_candle_ts.get(pair, now)
        intent = OrderIntent(
            pair=pair,
            side=Side.SELL if position.side is PositionSide.LONG else Side.BUY,
            qty=position.qty,
            type=OrderType.MARKET,
            client_order_id=self.risk.client_order_id(
                pair, candle_ts, kind, self.strategy_of(pair)[1]
            ),
            reason=reason,
            reduce_only=True,
            ts=now,
        )
        # An engine-initiated exit is a decision too (the parity audit matches on it).
        self.audit.record(
            "risk_approved",
            now,
            pair=pair,
            candle_ts=self.last_candle_ts.get(pair, now),
            side=str(intent.side),
            qty=str(intent.qty),
            client_order_id=intent.client_order_id,
            reason=reason,
        )
        order = await self.executor.submit(intent, last_price=self.price(pair))
        await self.executor.deliver_fills(pair)
        return order

    # -- Results -----------------------------------------------------------------------------

    def summary(self) -> RunSummary:
        """Return the run's summary (the `--summary-json` document as a typed value)."""
        sleeves = self.sleeves
        report = breaker_report(self.risk.breakers.history, self.last_ts)
        return RunSummary(
            strategies=(
                None
                if sleeves is None
                else tuple(
                    strategy_sections(
                        sleeves,
                        self.portfolio.closed,
                        self.portfolio.positions(),
                        self.reward.ranked(),
                    )
                )
            ),
            mode=self.mode,
            strategy=StrategyRef.from_dict(self.strategy.describe()),
            pairs=tuple(self.pairs),
            timeframe=self.timeframe,
            candles=self.candles,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
            signals=self.signals,
            vetoes=self.vetoes,
            rejections=self.executor.rejections,
            starting_balance=float(self.portfolio.starting_cash),
            final_equity=float(self.portfolio.equity()),
            max_drawdown=self.portfolio.max_drawdown,
            fees=float(self.portfolio.fees),
            funding=float(self.portfolio.funding),
            funding_settlements=self.funding_settlements,
            realised_pnl=float(self.portfolio.realised_pnl),
            open_positions=tuple(
                OpenPosition(
                    pair=p.pair,
                    side=str(p.side),
                    qty=float(p.qty),
                    entry_price=float(p.entry_price),
                    entry_ts=p.ts_opened,
                    mark_price=float(p.mark_price) if p.mark_price is not None else None,
                )
                for p in self.portfolio.positions().values()
            ),
            trades=tuple(self.portfolio.closed),
            # Every breaker trip and every stretch off the normal rung (halted, reduced...).
            breaker_trips=tuple(BreakerTrip.from_dict(t) for t in report["trips"]),
            trading_spans=tuple(TradingSpan.from_dict(s) for s in report["spans"]),
        )


class Engine(QuietSteps, EngineControl):
    """Run the per-candle pipeline and answer operator commands."""

    # -- The pipeline ------------------------------------------------------------------------

    async def on_candle(self, candle: Candle, received: float | None = None) -> None:
        """Process one closed candle through the whole pipeline, in order.

        `received` (a `time.perf_counter()` reading taken when the feed handed the candle
        over) lets the engine measure decision latency: candle in, order out. The same as
        `admit` then `process`; a simulated exchange's driver matches the candle between
        the two, as the venue would have by the time the candle closed.
        """
        if self.admit(candle, received):
            await self.process(candle)

    def admit(self, candle: Candle, received: float | None = None) -> bool:
        """Take a closed candle into the data window and the run's counters; False if refused."""
        if not self.data.on_candle(candle):
            return False
        self._received = received
        self._started = time.perf_counter()
        # The run's counters (as `EngineQuiet._take_rows` keeps them for quiet candles).
        self.candles += 1
        if self.first_ts is None:
            self.first_ts = candle.ts
        self.last_ts = candle.ts
        self.last_close[candle.pair] = candle.close
        self.last_candle_ts[candle.pair] = candle.ts
        return True

    async def process(self, candle: Candle) -> None:
        """Run an admitted candle through marks, stops, equity, risk and the decision."""
        try:
            await self._process(candle)
        finally:
            # The entry stops its match's fills left pending (a burst: after its orders).
            if self.executor.pending_stops and self.sender is None:
                await self.executor.flush_stops()

    async def _process(self, candle: Candle) -> None:
        pair = candle.pair
        portfolio = self.portfolio
        if portfolio.has_position(pair):
            portfolio.mark(pair, Decimal(repr(candle.close)))
        now = self.clock.now_ms()
        if self.anomaly_watch is not None:
            self.anomaly_watch.on_candle(candle, now)
        exited = False
        if self.manage_stops and portfolio.has_position(pair):
            if self.closing_now(candle):
                # Its exit takes the stop off: a move first would cost a request and delay
                # the exit (the best price seen is still kept for the stop's rules).
                self.risk.stops.note_best(portfolio.position(pair), candle.high, candle.low)
            else:
                await self._manage_stop(candle, now)
            exited = await self._take_profit_reached(candle)
        if self.funding:
            self._settle_funding(pair, candle.ts + self.step, candle.close)
        equity = portfolio.record_equity(candle.ts + self.step)
        if self.risk.update(now, equity) is TradingState.FLATTEN:
            await self.trip_flatten()
            return
        if self.sleeves is not None and self.sleeves.due(now):
            self._reallocate(now, equity)
        # Exiting now, or a drained pair: no new decision on this candle.
        if not exited and (pair in self._active or portfolio.has_position(pair)):
            await self._decide_if_fresh(candle, now, equity)
        if self.risk_saver is not None and self.sender is None:
            await self.risk_saver()  # after the decision: never on its latency

    async def trip_flatten(self) -> None:
        """Act on the circuit breaker's flatten: store the latch, then send the exits."""
        if self.risk_saver is not None:
            await self.risk_saver()
        await self._flatten("circuit breaker: flatten")

    async def _decide_if_fresh(self, candle: Candle, now: int, equity: Decimal) -> None:
        # A candle that arrived later than `max_lag_ms` after its close is counted and
        # skipped (deciding on it would trade on stale prices); otherwise ask the strategy.
        if self.max_lag_ms is not None and now - (candle.ts + self.step) > self.max_lag_ms:
            self.stale_candles += 1
            lag = now - candle.ts - self.step
            log.warning("candle_stale", pair=candle.pair, ts=candle.ts, lag_ms=lag)
            return
        signal = self._safe_signal(candle)
        if signal is not None:
            await self._decide(signal, candle, now, equity)

    def prepare_signals(self, candles: list[Candle]) -> None:
        """Compute the strategy's rows for admitted candles in one pass (a burst's)."""
        try:
            self.signals_source.prepare([c.pair for c in candles])
        except Exception:  # each pair's own signal then computes (and reports) it
            log.exception("strategy_prepare_failed", pairs=len(candles))

    def early_signal(self, candle: Candle) -> Signal | None:
        """Return the signal an admitted candle will be decided on, computed ahead.

        A burst orders its decisions by these (`burst.BurstDecider`). The signal is kept
        and used by `process` if the pair's holding is unchanged by then (the strategy's
        row depends only on the pair's own window); None for a candle that will not be
        decided (stale, or a drained pair without a position).
        """
        pair = candle.pair
        if pair not in self._active and not self.portfolio.has_position(pair):
            return None
        now = self.clock.now_ms()
        if self.max_lag_ms is not None and now - (candle.ts + self.step) > self.max_lag_ms:
            return None
        holding = self.portfolio.signed_qty(pair)
        signal = self._safe_signal(candle)
        self._early[pair] = (candle.ts, holding, signal)
        return signal

    def closing_now(self, candle: Candle) -> bool:
        """Return whether the held pair's signal on this candle closes its position.

        The signal is computed ahead and kept for the candle (`early_signal`).
        """
        signal = self.early_signal(candle)
        holding = self.portfolio.signed_qty(candle.pair)
        return signal is not None and holding != 0 and (signal.side is Side.SELL) is (holding > 0)

    def timing(self, received: float | None, started: float) -> None:
        """Measure the next decision from `received` (the feed's hand-over), `started`."""
        self._received, self._started = received, started

    def _safe_signal(self, candle: Candle) -> Signal | None:
        holding = self.portfolio.signed_qty(candle.pair)
        early = self._early.pop(candle.pair, None) if self._early else None
        if early is not None and early[0] == candle.ts and early[1] == holding:
            return early[2]
        try:
            return self.signals_source.signal(candle, holding)
        except Exception as e:
            error = StrategyError(f"strategy failed: {e!r}", component="strategy", pair=candle.pair)
            log.exception("strategy_failed", pair=candle.pair)
            self.errors.append(error.message)
            self.alert(ErrorRaised(error.message))
            return None

    async def _decide(self, signal: Signal, candle: Candle, now: int, equity: Decimal) -> None:
        # `equity`: the candle's recorded equity; nothing changes the portfolio between
        # its recording and the decision (sends wait for the verdict), so it is reused.
        self.signals += 1
        audit = self.audit  # its events' fields built by its writer, after a burst's sends
        audit.record_with("signal", now, signal_fields, signal)
        entering = not signal.exit_only and not self.portfolio.has_position(signal.pair)
        model_veto = self._model_veto(signal) if entering else None
        if entering and (self.state is BotState.PAUSED or signal.pair not in self._active):
            verdict: OrderIntent | Veto = Veto(
                "paused by operator" if self.state is BotState.PAUSED else "pair drained",
                None,
                "operator",
            )
        elif model_veto is not None:
            verdict = model_veto
        else:
            holding = self.portfolio.signed_qty(signal.pair)
            closing = holding != 0 and (signal.side is Side.SELL) is (holding > 0)
            context = self._risk_context(
                signal.pair, now, signal.ts, closing=closing, equity=equity
            )
            verdict = self.risk.evaluate(signal, context)
        if isinstance(verdict, Veto):
            self.vetoes += 1
            if audit.wanted():
                audit.record(
                    "veto",
                    now,
                    pair=signal.pair,
                    candle_ts=signal.ts,
                    reason=verdict.reason,
                    guard=verdict.guard,
                )
            self.decisions[signal.pair] = Decision(
                signal.pair, now, signal, "veto", veto=verdict, features=signal.features
            )
            return
        audit.record_with("risk_approved", now, approved_fields, signal, verdict)
        self.decisions[signal.pair] = Decision(
            signal.pair, now, signal, "order", intent=verdict, features=signal.features
        )
        order = DeferredOrder(verdict, signal.strength, self._received, self._started)
        if self.sender is not None:
            self.sender(order)  # a burst: sent once its other decisions are taken
            return
        if await self.send_decided(order):
            await self.executor.deliver_fills(signal.pair)

    async def send_decided(self, decided: DeferredOrder) -> bool:
        """Send an approved order through the executor; return True if it was accepted.

        A recoverable or business error is recorded and trading goes on (the journal has
        the order; the next reconciliation settles it); a FatalError propagates.
        """
        intent = decided.intent
        try:
            order = await self.executor.submit(intent, last_price=self.price(intent.pair))
        except (RecoverableError, BusinessError) as e:
            self.errors.append(f"{intent.pair}: {e.message}")
            log.error("order_failed", **{**e.describe(), "pair": intent.pair})
            return False
        if decided.received is not None:
            done = time.perf_counter()
            self.decision_latency_ms.append((done - decided.received) * 1000)
            self.decision_service_ms.append((done - decided.started) * 1000)
        return order.status is not OrderStatus.REJECTED

    def _model_veto(self, signal: Signal) -> Veto | None:
        """Refuse an entry the learned model or the pattern filter does not back."""
        if self.pattern_filter is not None:
            frame = self.data.frame(signal.pair, self.timeframe)
            reason = self.pattern_filter.veto_reason(signal.pair, frame)
            if reason is not None:
                return Veto(reason, None, "pattern")
        predictor = self.predictors.get(signal.pair)
        if predictor is None:
            return None
        p_up = predictor.probability_up(self.data.frame(signal.pair, self.timeframe))
        signal.features["model_p_up"] = p_up
        wanted = p_up if signal.side is Side.BUY else 1 - p_up
        if wanted < self.model_threshold:
            return Veto(
                f"model: P(move in our favour)={wanted:.2f} < {self.model_threshold}", None, "model"
            )
        return None

    async def _take_profit_reached(self, candle: Candle) -> bool:
        # Spot positions keep their take-profit here, not on the exchange: when the bar
        # reaches it, exit at market (next open in sim, as any market order).
        # The position's own take-profit first (no objects built): most candles miss it.
        pair = candle.pair
        if not self.take_profit_hit(pair, candle.high, candle.low):
            return False
        target = self.executor.managed_take_profit(pair)  # None: a real order works
        if target is None:
            return False
        await self.close_position(pair, f"take-profit {target} reached (managed)")
        return True

    async def _manage_stop(self, candle: Candle, now: int) -> None:
        await self._move_stop(candle, now, self._atr(candle.pair))

    async def _move_stop(self, candle: Candle, now: int, atr: float | None) -> None:
        # The stop's move on a held pair's candle, with the ATR of its window up to it.
        new_stop = self._stop_move(candle.pair, candle.high, candle.low, candle.close, atr, now)
        if new_stop is None:
            return
        if self.sender is not None:  # a burst: moved once its orders are sent
            self.executor.defer_stop_move(candle.pair, new_stop, candle_ts=candle.ts)
            return
        await self.executor.amend_stop(candle.pair, new_stop, candle_ts=candle.ts)

    async def on_fill(self, order: Order, fill: Fill) -> None:
        """Apply a fill from the matching engine or the private stream."""
        trade = await self.executor.on_fill(order, fill)
        if trade is not None:
            await self._keep_trade(trade, self._on_trade_closed(trade))
            if self.risk_saver is not None and self.sender is None:
                await self.risk_saver()  # a burst saves once, at its end

    async def _keep_trade(self, trade: ClosedTrade, equity_after: float) -> None:
        # The journal keeps the round trip (live); losing that record loses no money, so a
        # failure is logged and alerted, and trading goes on.
        try:
            await self.executor.record_trade(trade, equity_after)
        except BotError as e:
            log.exception("closed_trade_not_recorded", pair=trade.pair, error=e.message)
            self.alert(ErrorRaised(f"closed trade on {trade.pair} not recorded: {e.message}"))

    def _on_trade_closed(self, trade: ClosedTrade) -> float:
        """Account a closed round trip in risk, sleeves and the score; return the equity after.

        The equity is the account's (or, with several strategies, the sleeve's) as the
        score's book takes it.
        """
        now = self.clock.now_ms()
        self.risk.on_trade_closed(trade, now)
        if self.sleeves is not None and trade.strategy:
            # Each sleeve is scored on its own time-weighted value, not the account's.
            equity = self.sleeves.on_trade_closed(trade.strategy, trade.pnl)
        else:
            equity = float(self.portfolio.equity())
        reward = self.reward.on_trade_closed(
            trade.strategy or self.strategy.name, trade, equity=equity
        )
        if self.audit.wanted():
            self.audit.record("trade_closed", now, reward=reward, **trade.as_dict())
        log.info(
            "trade_closed",
            strategy=trade.strategy or self.strategy.name,
            pair=trade.pair,
            entry_price=trade.entry_price,
            exit_price=trade.exit_price,
            qty=trade.qty,
            pnl=round(trade.pnl, 6),
        )
        return equity

    async def on_stream_fill(self, fill: Fill) -> None:
        """Apply a fill from the private stream (the order's state derived from it)."""
        trade = await self.executor.on_stream_fill(fill)
        if trade is not None:
            await self._keep_trade(trade, self._on_trade_closed(trade))
            if self.risk_saver is not None and self.sender is None:
                await self.risk_saver()  # a burst saves once, at its end

    async def on_order_book(self, book: OrderBook) -> None:
        """Keep the latest book per pair (depth chart, book-walk fills); watch its spread."""
        self.books[book.pair] = book
        if self.anomaly_watch is not None:
            self.anomaly_watch.on_book(book, self.clock.now_ms())
