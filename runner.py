"""Wiring for each mode: build the components, inject collaborators, run the tasks, shut down.

Part of `main` (it is only ever imported by `main.py`), kept apart so that `main.py --help`
imports nothing heavy. The trading modes share one path: the only differences between
sim, backtest and live are the feed (replay or exchange stream), the order gateway
(matching engine or exchange) and the clock (replay or wall).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console

from config import Settings
from data_manager import CandleStore, DataManager, arrays_to_frame
from data_manager import replay_frames as load_frames
from error_handler import (
    AuthenticationError,
    BotError,
    ConfigError,
    DataError,
    FatalError,
    RecoverableError,
    run_fail_safe,
)
from models import BotState, Candle, Market, strategy_tag
from pipeline import Engine, PrecomputedSignals
from portfolio import Portfolio
from reward_system import RewardSystem
from risk_management import RiskManager
from strategy import Strategy, load_strategy
from trade_executor import TradeExecutor
from trade_simulator import ReplayFeed, SimulatedExchange
from utils.supervision import Supervisor
from utils.utilities import (
    AuditTrail,
    ReplayClock,
    atomic_write,
    parse_timerange,
    setup_logging,
    timeframe_to_ms,
)


log = structlog.get_logger(__name__)
QUEUE_SIZE = 1_000
SHUTDOWN_STEP_TIMEOUT = 1.5
PRIVATE_READY_TIMEOUT_S = 10.0  # the private streams' subscription, before trading starts
_SETTLE_LOOKBACK_MS = 3_600_000  # how far back the stop looks for fills the stream missed


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM asks for a graceful stop; a second one forces exit."""

    def handle(signum: int) -> None:
        if stop.is_set():
            os.write(2, b"kestrel: second signal, forcing exit\n")
            os._exit(1)
        os.write(2, f"kestrel: {signal.Signals(signum).name} received, stopping\n".encode())
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)


class Daemon:
    """One trading run: the engine plus the tasks around it, in one TaskGroup."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.stop = asyncio.Event()
        # (candle, perf_counter() at receipt): the receipt time measures decision latency.
        self.queue: asyncio.Queue[tuple[Candle, float] | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        # Backtests replay history: no audit trail (it records live decisions), and only
        # warnings on the console unless --log-level asks for more.
        backtest = args.mode == "backtest"
        self.audit = AuditTrail(None if backtest else settings.storage.log_dir)
        if backtest and not args.log_level:
            logging.getLogger().setLevel(logging.WARNING)
        self.engine: Engine | None = None
        self.sim: SimulatedExchange | None = None
        self.exchange: Any = None
        self.replay: ReplayFeed | None = None
        self.frames: dict[str, Any] = {}
        self.pair_schedule: Any = None
        self.progress: Callable[[int, int], None] | None = None
        self.top_pairs: Any = None
        self.data: DataManager | None = None
        self.window = 0
        self.feed_pairs: list[str] = []
        self._resubscribe = asyncio.Event()
        self._resume_from: int | None = None
        self.restart_as: str | None = None
        self._exchange_status: Callable[[], dict[str, Any]] = dict
        self.feed: AsyncIterator[Candle] | None = None
        self.dropped = 0
        self._closers: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self._fills_since: int | None = None  # live: where the run's fills begin
        self.notifiers: list[Callable[[str, dict[str, Any]], None]] = []
        self.supervisor = Supervisor(self.stop, self.alert)
        # Risk state persistence (live and paper on the exchange feed; replays have none).
        self._risk_store: Any = None
        self._risk_key: tuple[Any, ...] | None = None
        self._risk_lock = asyncio.Lock()

    # -- Build -------------------------------------------------------------------------------

    def build_replay(self) -> None:
        """Build the replay feed, matching engine and engine (sim --feed replay, backtest)."""
        s = self.settings
        frames = load_frames(self.args, s)
        start_ms = end_ms = None
        if self.args.timerange:
            try:
                start_ms, end_ms = parse_timerange(self.args.timerange)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        first = min(int(f.index[0].value // 1_000_000) for f in frames.values())
        clock = ReplayClock(start_ms if start_ms is not None else first)
        backtest = self.args.mode == "backtest"
        speed = 0.0 if backtest else s.simulation.replay_speed
        self.replay = ReplayFeed(
            frames,
            s.strategy.timeframe,
            clock,
            speed=speed,
            start_ms=start_ms,
            end_ms=end_ms,
            # A backtest's direct loop yields to the event loop every 1,024 candles, not
            # every candle (signals still get through; ~1.3x faster).
            yield_every=1024 if backtest else 1,
            progress=self.progress,
        )
        self.feed = aiter(self.replay)
        self.frames = frames
        if backtest and s.pairs.dynamic:
            # Trade the pair list as it stood at each refresh, rebuilt from the archives
            # (no survivorship, no look-ahead); --pairs names the universe to rank.
            from top_pairs import PointInTimeRanking
            from trade_simulator import PairSchedule

            refresh_ms = s.pairs.ttl_s * 1000
            ranking = PointInTimeRanking(
                frames,
                s.strategy.timeframe,
                refresh_every=refresh_ms,
                top_n=s.pairs.count,
                lookback=86_400_000,
                min_quote_volume=s.pairs.min_quote_volume,
            )
            self.pair_schedule = PairSchedule(ranking.pairs_at, refresh_ms=refresh_ms)
        self.sim = self._simulated_exchange(clock)
        for pair, frame in frames.items():
            self.sim.ensure_market(pair, float(frame["close"].iloc[0]))
        sim = self.sim
        strategy = load_strategy(s.strategy.name, s.strategy.params)
        signals = PrecomputedSignals(strategy, frames) if backtest else None
        self.engine = self._engine(
            clock=clock,
            strategy=strategy,
            gateway=sim,
            market_for=lambda pair: sim.markets[pair],
            matcher=sim.on_candle,
            fill_now=sim.fill_now if s.simulation.fill_at == "close" else None,
            cash=Decimal(str(s.simulation.starting_balance)),
            # Backtests read the strategy's columns computed once over the archive; sim
            # runs it on the rolling window at each candle, exactly as live trading does.
            signals=signals,
        )
        if signals is not None and self.engine.risk.all_in and not s.learning.enabled:
            self.engine.enable_quiet_path(signals, sim.has_working)

    def _simulated_exchange(
        self, clock: Any, markets: dict[str, Market] | None = None
    ) -> SimulatedExchange:
        sim = self.settings.simulation
        return SimulatedExchange(
            clock=clock,
            maker_fee=sim.maker_fee,
            taker_fee=sim.taker_fee,
            slippage_bps=sim.slippage_bps,
            slippage_model=sim.slippage_model,
            fill_at=sim.fill_at,
            latency_ms=sim.latency_ms,
            markets=markets,
        )

    def _engine(
        self,
        *,
        clock: Any,
        strategy: Strategy,
        gateway: Any,
        market_for: Callable[[str], Market],
        cash: Decimal,
        matcher: Any = None,
        fill_now: Any = None,
        signals: Any = None,
        store: Any = None,
        data: DataManager | None = None,
        max_lag_ms: int | None = None,
    ) -> Engine:
        s = self.settings
        portfolio = Portfolio(cash, quote=s.simulation.quote_currency)
        executor = TradeExecutor(
            gateway,
            portfolio,
            market_for=market_for,
            clock=clock,
            audit=self.audit,
            notify=self.alert,
            store=store,
            taker_fee=Decimal(str(s.simulation.taker_fee)),
            protective_orders=s.risk.profile != "all_in",
            # Bybit refuses a request older than its recv_window: an order not there by
            # then (plus a margin for clock skew) was never placed.
            unknown_after_ms=s.exchange.recv_window_ms + 5_000,
        )
        return Engine(
            mode=self.args.mode,
            timeframe=s.strategy.timeframe,
            pairs=list(s.strategy.pairs),
            clock=clock,
            data=data or DataManager(window=max(strategy.warmup * 2, s.strategy.warmup_candles)),
            strategy=strategy,
            risk=RiskManager(
                s.risk,
                long_only=s.strategy.long_only,
                alert=self.alert,
                timeframe=s.strategy.timeframe,
                taker_fee=Decimal(str(s.simulation.taker_fee)),
                strategy_tag=strategy_tag(strategy.describe()),
            ),
            executor=executor,
            reward=RewardSystem(s.reward),
            portfolio=portfolio,
            market_for=market_for,
            audit=self.audit,
            matcher=matcher,
            fill_now=fill_now,
            alert=self.alert,
            stop_event=self.stop,
            signals=signals,
            max_lag_ms=max_lag_ms,
        )

    async def build_exchange(self, *, paper: bool, probe: bool = False) -> None:
        """Build on the live exchange feed: paper fills (sim --feed live) or real orders.

        With `probe` (feed auto) an unreachable exchange fails fast instead of retrying.
        """
        from exchange import Exchange

        s = self.settings
        exchange = Exchange(s.exchange, retry_attempts=2 if probe else 5)
        await exchange.open()
        self.exchange = exchange
        self._closers.append(("exchange", exchange.close))
        clock = ExchangeClock(exchange)
        strategy = load_strategy(s.strategy.name, s.strategy.params)
        window = max(strategy.warmup * 2, s.strategy.warmup_candles)
        # Candles from the exchange are archived (flushed with each state snapshot), so
        # backtests and the parity audit can replay exactly what the bot saw.
        data = DataManager(window=window, store=CandleStore(s.storage.data_dir))
        timeframe = s.strategy.timeframe
        pairs = list(s.strategy.pairs)
        if s.pairs.dynamic:
            from top_pairs import TopPairs

            self.top_pairs = TopPairs(
                exchange,
                s.pairs,
                state_path=s.storage.data_dir / "state" / "pairs.json",
                clock=clock,
                market_type=s.exchange.market_type,
            )
            pairs = list((await self.top_pairs.current()).pairs)
        self.window = window
        self.data = data
        await self._warm_up(pairs, strategy)
        # Every closed candle from here on, exactly once, gaps refilled from REST.
        self.feed = self._exchange_candles(pairs)
        step = timeframe_to_ms(timeframe)
        self._exchange_status = lambda: {"rate_limit_budget": exchange.rate_limit_budget()}
        if paper:
            sim = self._simulated_exchange(clock, markets=dict(exchange.markets))
            self.sim = sim
            self.engine = self._engine(
                clock=clock,
                strategy=strategy,
                gateway=sim,
                market_for=exchange.market,
                matcher=sim.on_candle,
                fill_now=sim.fill_now if s.simulation.fill_at == "close" else None,
                cash=Decimal(str(s.simulation.starting_balance)),
                data=data,
                max_lag_ms=step,
            )
            self.engine.set_pairs(pairs)
            self.engine.extra_status = self._exchange_status
            await self._restore_risk_state()
            return
        from trade_store import TradeStore

        store = TradeStore.open(s.storage.effective_database_url, bot_id=f"{s.exchange.name}-live")
        closing: list[Any] = []  # the executor's journal thread, then the store

        async def close_store() -> None:
            for executor in closing:
                await executor.close()
            await asyncio.to_thread(store.close)

        self._closers.append(("store", close_store))
        balances = await exchange.fetch_balance()
        quote = s.simulation.quote_currency
        cash = balances[quote].total if quote in balances else Decimal(0)
        self.engine = self._engine(
            clock=clock,
            strategy=strategy,
            gateway=exchange,
            market_for=exchange.market,
            cash=cash,
            store=store,
            data=data,
            max_lag_ms=step,
        )
        closing.append(self.engine.executor)
        self.engine.set_pairs(pairs)
        self.engine.extra_status = self._exchange_status
        await self._restore_risk_state(store)
        # Fills from here on reach the journal by the private stream, its REST sweeps, and
        # a last sweep at stop; the minute back covers clock skew.
        self._fills_since = exchange.server_now_ms() - 60_000
        report = await self.engine.executor.reconcile(exchange, store, quote=quote)
        self.engine.reconcile_report = report
        log.info("reconciled", report=report)

    async def close_exchange(self) -> None:
        """Close an exchange opened by a failed build (feed auto falling back)."""
        if self.exchange is not None:
            await self.exchange.close()
            self.exchange = None
            self._closers = [c for c in self._closers if c[0] != "exchange"]

    # -- Risk state -------------------------------------------------------------------------

    def _risk_state_path(self) -> Path:
        return self.settings.storage.data_dir / "state" / f"{self.args.mode}-risk.json"

    async def _restore_risk_state(self, store: Any = None) -> None:
        """Load the saved risk state before trading resumes; persist it on every change.

        Live keeps it in the trade store (`risk`), paper trading on the exchange feed in
        `data/state/<mode>-risk.json`; a paper account starts afresh, so its peak and day
        start are scaled to it. Replays (sim on archives, backtests) neither load nor save:
        each replays history from its start.

        Raises:
            DataError: the saved state cannot be read (trading must not start without it).
        """
        assert self.engine is not None
        risk = self.engine.risk
        self._risk_store = store
        where = "trade_store" if store is not None else str(self._risk_state_path())
        try:
            saved = await asyncio.to_thread(self._read_risk_state)
            if saved is not None:
                fresh = self.engine.portfolio.equity() if store is None else None
                risk.restore_state(saved, equity=fresh)
        except (ValueError, KeyError, TypeError, ArithmeticError) as e:
            raise DataError(
                f"the saved risk state ({where}) is unreadable: {e!r}; check it, then remove"
                " it to start with fresh breakers",
                component="risk",
            ) from e
        self._risk_key = risk.state_key()
        self.engine.risk_saver = self._persist_risk_state
        if saved is not None:
            breakers = risk.breakers
            self.audit.record(
                "risk_state_restored",
                self.engine.clock.now_ms(),
                source=where,
                state=str(risk.trading_state),
                latched=sorted(breakers.latched),
                manual=str(breakers.manual) if breakers.manual is not None else None,
                peak_equity=str(breakers.peak_equity),
                day_start_equity=str(breakers.day_start_equity),
                consecutive_losses=breakers.consecutive_losses,
            )

    def _read_risk_state(self) -> Any:
        if self._risk_store is not None:
            return self._risk_store.get_state("risk")
        path = self._risk_state_path()
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    async def _persist_risk_state(self) -> None:
        """Store the risk state if it changed since it was last stored (a cheap no-op if not).

        A failed write is logged and retried at the next change check; trading goes on
        with the state in memory.
        """
        engine = self.engine
        if engine is None or self._risk_key is None or engine.risk.state_key() == self._risk_key:
            return
        async with self._risk_lock:  # one write at a time: the last one stored is the newest
            key = engine.risk.state_key()
            if key == self._risk_key:
                return
            data = engine.risk.dump_state()
            try:
                await asyncio.to_thread(self._write_risk_state, data)
            except Exception:
                log.exception("risk_state_persist_failed")
                return
            self._risk_key = key

    def _write_risk_state(self, data: dict[str, Any]) -> None:
        if self._risk_store is not None:
            self._risk_store.set_state("risk", data)
        else:
            atomic_write(self._risk_state_path(), json.dumps(data, indent=2))

    def alert(self, kind: str, data: dict[str, Any]) -> None:
        """Route an event from any component to the notifiers (Telegram when enabled)."""
        for notifier in self.notifiers:
            try:
                notifier(kind, data)
            except Exception:
                log.exception("notifier_failed", kind=kind)

    # -- Tasks -------------------------------------------------------------------------------

    async def _feed_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="feed")  # this task's context only
        assert self.feed is not None
        try:
            async for candle in self.feed:
                await self.queue.put((candle, time.perf_counter()))
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def _direct_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="pipeline")  # this task's context only
        # Backtests have no I/O edge to buffer: the replay drives the engine directly.
        assert self.engine is not None
        assert self.feed is not None
        on_candle = self.engine.on_candle
        schedule, engine, step = self.pair_schedule, self.engine, self.engine.step
        if schedule is None and await engine.replay_in_runs(self.replay, self.stop):
            log.info("feed_exhausted", candles=self.engine.candles)
            self.stop.set()
            return
        async for candle in self.feed:
            if self.stop.is_set():
                break
            if schedule is not None:
                schedule.apply(engine, candle, step)
            await on_candle(candle)
        log.info("feed_exhausted", candles=self.engine.candles)
        self.stop.set()

    async def _pipeline_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="pipeline")  # this task's context only
        assert self.engine is not None
        while True:
            item = await self.queue.get()
            if item is None:
                break
            await self.engine.on_candle(*item)
        log.info("feed_exhausted", candles=self.engine.candles)
        self.stop.set()

    async def _timer(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.info("duration_elapsed", seconds=seconds)
        self.stop.set()

    async def _snapshot_once(self) -> None:
        await asyncio.sleep(self.settings.storage.snapshot_interval_s)
        await self._persist_async()
        self.record_performance()

    def record_performance(self) -> None:
        """Write the periodic performance snapshot to the audit trail (JSON lines, rotated)."""
        assert self.engine is not None
        engine = self.engine
        latencies = sorted(engine.decision_latency_ms)

        def pct(q: float) -> float | None:
            return round(latencies[int(q * (len(latencies) - 1))], 3) if latencies else None

        self.audit.record(
            "performance",
            engine.clock.now_ms(),
            equity=float(engine.portfolio.equity()),
            cash=float(engine.portfolio.cash),
            exposure=float(engine.portfolio.exposure()),
            positions=len(engine.portfolio.positions()),
            open_orders=len(engine.executor.open_orders()),
            max_drawdown=engine.portfolio.max_drawdown,
            trading_state=str(engine.risk.trading_state),
            candles=engine.candles,
            decision_latency_ms_p50=pct(0.5),
            decision_latency_ms_p99=pct(0.99),
            rate_limit_budget=self.exchange.rate_limit_budget() if self.exchange else {},
        )

    # -- Operator surfaces -------------------------------------------------------------------

    async def start_telegram(self) -> None:
        """Start the Telegram bot in this loop when a token is configured."""
        if not self.settings.telegram.enabled:
            return
        assert self.engine is not None
        from telegram_bot import TelegramBot

        async def telegram_switch(target: str) -> str:
            # /mode, after the operator confirmed: the same orderly restart as the dashboard.
            await self.switch_mode(target)
            return f"stopping in order; restarting in {target} mode"

        bot = TelegramBot(
            self.settings.telegram,
            self.engine,
            mode_switch=telegram_switch,
            # Alerts Telegram could not take before a stop are sent after the next start.
            spool=self.settings.storage.data_dir / "state" / "telegram_outbox.json",
        )
        await bot.start()
        self.notifiers.append(TelegramNotifier(bot))
        self._closers.append(("telegram", bot.stop))
        report = await self.engine.reconcile()
        await bot.post_startup_report(report, timeout_s=10.0)

    def ui_tasks(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        """Start the dashboard (interactive terminals only) and the web view if enabled."""
        assert self.engine is not None
        tasks: list[asyncio.Task[Any]] = []
        ui = self.settings.ui
        if ui.web_enabled:
            tasks.append(tg.create_task(self._web(), name="web"))
        if ui.enabled and sys.stdout.isatty() and sys.stdin.isatty():
            # Textual owns the terminal: logs go to the file only, or they would tear it.
            setup_logging(
                self.settings.storage.log_dir,
                level=self.settings.logging.level,
                console=False,
                cache_loggers=True,
            )
            tasks.append(tg.create_task(self._dashboard(), name="dashboard"))
        return tasks

    async def _dashboard(self) -> None:
        from ui import Dashboard

        assert self.engine is not None
        app = Dashboard(
            self.engine,
            self.settings.ui,
            can_switch_live=self.settings.exchange.has_keys,
            switch_mode=self.switch_mode,
            live_blocked_reason="set KESTREL_EXCHANGE__API_KEY and KESTREL_EXCHANGE__API_SECRET "
            "to trade live",
        )

        async def close_when_stopped() -> None:
            await self.stop.wait()
            app.exit()

        closer = asyncio.create_task(close_when_stopped())
        try:
            await app.run_async()
        finally:
            closer.cancel()
        self.stop.set()

    async def switch_mode(self, target: str) -> None:
        """Switch between paper and live: shut down in order, then restart in `target`.

        The restart goes through the same start-up (and reconciliation) as any start, so
        nothing is carried over half-built. main re-executes the process after teardown.
        """
        if target == self.args.mode or target not in ("sim", "live"):
            return
        if target == "live" and not self.settings.exchange.has_keys:
            raise ConfigError("live trading needs KESTREL_EXCHANGE__API_KEY/API_SECRET")
        log.warning("mode_switch_requested", to=target, **{"from": self.args.mode})
        self.restart_as = target
        self.stop.set()

    async def _web(self) -> None:
        from ui import WebView

        assert self.engine is not None
        web = WebView(self.engine, self.settings.ui)
        await web.start()
        log.info("web_view_started", url=f"http://127.0.0.1:{web.port}/")
        try:
            await asyncio.Event().wait()
        finally:
            await web.stop()

    async def _warm_up(self, pairs: list[str], strategy: Strategy | None = None) -> None:
        assert self.exchange is not None
        assert self.data is not None
        timeframe = self.settings.strategy.timeframe
        strategy = strategy or (self.engine.strategy if self.engine is not None else None)
        for pair in pairs:
            history = await self.exchange.fetch_ohlcv(pair, timeframe, limit=self.window)
            for candle in history:
                self.data.on_candle(candle)
            if history:
                last = history[-1].ts
                self._resume_from = (
                    last if self._resume_from is None else min(self._resume_from, last)
                )
            bars = self.data.arrays(pair, timeframe)
            if strategy is not None and len(bars.ts) >= strategy.warmup:
                # Run the strategy over the history now: its kernel is compiled and its
                # per-pair state primed before the first live candle, not during it.
                strategy.last_row_arrays(pair, bars)
            log.info("warmup_loaded", pair=pair, candles=len(history))

    async def _exchange_candles(self, pairs: list[str]) -> AsyncIterator[Candle]:
        """Stream closed candles; resubscribe when the pair list changes."""
        assert self.exchange is not None
        timeframe = self.settings.strategy.timeframe
        self.feed_pairs = list(pairs)
        while True:
            self._resubscribe.clear()
            # Start right after the warm-up: a candle closing between the warm-up fetch and
            # the first frame is fetched over REST instead of being lost. The data manager
            # drops the ones a pair already has.
            since = None
            if self._resume_from is not None:
                since = self._resume_from + timeframe_to_ms(timeframe)
                self._resume_from = None
            stream = self.exchange.watch_candles(self.feed_pairs, timeframe, since=since)
            try:
                async for candle in stream:
                    yield candle
                    if self._resubscribe.is_set():
                        break
            finally:
                await stream.aclose()

    async def on_pairs_changed(self, diff: Any) -> None:
        """Add new pairs (warm-up first) and drain removed ones, keeping open positions."""
        assert self.engine is not None
        await self._warm_up(list(diff.added))
        keep = list(self.top_pairs.pairs) if self.top_pairs is not None else self.engine.pairs
        self.engine.set_pairs(keep)
        # Removed pairs that still hold a position stay on the feed until it is closed.
        draining = diff.draining(self.engine.portfolio.positions())
        self.feed_pairs = [*keep, *[p for p in draining if p not in keep]]
        self._resubscribe.set()
        log.info(
            "pairs_changed",
            added=list(diff.added),
            removed=list(diff.removed),
            draining=list(draining),
        )

    def model_name(self, pair: str) -> str:
        """Return the model registry name used for a pair (same as `--mode train`)."""
        base = pair.split(":")[0].replace("/", "-")
        return f"direction-{base}-{self.settings.strategy.timeframe}"

    def enable_learning(self) -> None:
        """Filter entries through each pair's current model (when learning is enabled)."""
        from self_learning import ModelRegistry, SafePredictor

        assert self.engine is not None
        models = self.settings.storage.data_dir / "models"
        self.engine.model_threshold = self.settings.learning.entry_threshold
        for pair in self.engine.pairs:
            registry = ModelRegistry(models, self.model_name(pair))
            self.engine.predictors[pair] = SafePredictor(registry, alert=self.alert)

    async def _retrain_once(self) -> None:
        """Retrain every pair's model off the loop, after the interval; swap in atomically."""
        from self_learning import train_and_save
        from utils.utilities import run_cpu

        assert self.engine is not None
        learning = self.settings.learning
        models = self.settings.storage.data_dir / "models"
        await asyncio.sleep(learning.retrain_interval_s)
        await self.engine.data.flush()
        archive = CandleStore(self.settings.storage.data_dir)
        for pair in self.engine.pairs:
            timeframe = self.settings.strategy.timeframe
            if not archive.has(pair, timeframe):
                continue
            frame = arrays_to_frame(archive.load_arrays(pair, timeframe))
            try:
                meta = await run_cpu(train_and_save, frame, learning, models, self.model_name(pair))
            except DataError as e:
                log.warning("retrain_skipped", pair=pair, reason=e.message)
                continue
            log.info("model_retrained", pair=pair, version=meta.version, **meta.metrics)

    async def _private_fills(self) -> None:
        structlog.contextvars.bind_contextvars(
            component="private-fills"
        )  # this task's context only
        assert self.engine is not None
        assert self.exchange is not None
        fills = self.exchange.watch_fills(
            since=self._fills_since, poll_s=self.settings.exchange.fill_poll_interval_s
        )
        async for fill in fills:
            await self.engine.on_stream_fill(fill)

    async def _settle_fills(self) -> None:
        # Executions that landed after the pipeline's last order (the private stream is
        # already stopped) are fetched once over REST, so a stopped bot's journal agrees
        # with the exchange; the store ignores fills it already has.
        if self.exchange is None or self.sim is not None or self.engine is None:
            return
        # Late fills are seconds old; Bybit answers a start time with the 7 days after it,
        # so a long run's start would miss them: look back an hour at most.
        since = self.exchange.server_now_ms() - _SETTLE_LOOKBACK_MS
        if self._fills_since is not None:
            since = max(since, self._fills_since)
        settled = 0
        for fill in await self.exchange.fetch_my_trades(since=since):
            if not await self.engine.executor.has_fill(fill.fill_id):
                await self.engine.on_stream_fill(fill)
                settled += 1
        if settled:
            log.info("fills_settled", fills=settled)

    async def _private_orders(self) -> None:
        structlog.contextvars.bind_contextvars(
            component="private-orders"
        )  # this task's context only
        assert self.engine is not None
        assert self.exchange is not None
        async for order in self.exchange.watch_orders():
            await self.engine.executor.on_order(order)

    # -- Run ---------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run until the feed ends, the duration passes or a signal arrives."""
        assert self.engine is not None
        install_signal_handlers(asyncio.get_running_loop(), self.stop)
        # The start-up reconciliation report reaches Telegram before trading resumes.
        await self.start_telegram()
        try:
            await self._run_tasks()
        except BaseExceptionGroup as group:
            # A task failed (a FatalError such as rejected keys, or a bug): the TaskGroup
            # cancelled the others. Stop trading safely: cancel entry orders, persist,
            # notify, close sessions (each step isolated), then exit non-zero.
            error = _first_error(group)
            await run_fail_safe(
                error,
                [
                    ("cancel_entry_orders", self._cancel_entry_orders),
                    ("persist_state", self._persist_async),
                    ("notify", self._notify_fatal(error)),
                    *self._closers,
                ],
                step_timeout=SHUTDOWN_STEP_TIMEOUT,
            )
            self.audit.close()
            raise error from group
        await self.teardown()
        summary = self.summary()
        if self.restart_as is not None:
            summary["restart_as"] = self.restart_as
        return summary

    def _notify_fatal(self, error: BaseException) -> Callable[[], Awaitable[object]]:
        async def notify() -> None:
            message = error.message if isinstance(error, BotError) else repr(error)
            self.alert("error", {"message": f"trading stopped: {message}"})
            await asyncio.sleep(0.5)  # give the Telegram queue a moment before it closes

        return notify

    async def _run_tasks(self) -> None:
        assert self.engine is not None
        direct = self.args.mode == "backtest"
        async with asyncio.TaskGroup() as tg:
            background: list[asyncio.Task[Any]] = []
            if self.exchange is not None and self.sim is None:
                # Live: the private streams come first, then the fills since the last
                # record, then the protection of every position; only then a decision.
                background.append(tg.create_task(self._private_fills(), name="private-fills"))
                background.append(tg.create_task(self._private_orders(), name="private-orders"))
                await self._ready_to_trade()
            self._started()
            if direct:
                feed = tg.create_task(asyncio.sleep(0), name="feed")
                pipeline = tg.create_task(self._direct_loop(), name="pipeline")
            else:
                feed = tg.create_task(self._feed_loop(), name="feed")
                pipeline = tg.create_task(self._pipeline_loop(), name="pipeline")
            # Background work may fail; trading goes on (the supervisor tells the operator).
            supervise = self.supervisor.loop
            background.append(
                tg.create_task(supervise("snapshots", self._snapshot_once), name="snapshots")
            )
            if self.settings.learning.enabled and self.args.mode != "backtest":
                self.enable_learning()
                background.append(
                    tg.create_task(supervise("retrain", self._retrain_once), name="retrain")
                )
            if self.top_pairs is not None:
                top_pairs = self.top_pairs
                refresh = functools.partial(
                    top_pairs.run, self.stop, on_change=self.on_pairs_changed
                )
                background.append(tg.create_task(supervise("top-pairs", refresh), name="top-pairs"))
            background += self.ui_tasks(tg)
            if self.args.duration is not None:
                background.append(tg.create_task(self._timer(self.args.duration), name="duration"))
            await self.stop.wait()
            self.engine.set_state(BotState.STOPPING)
            # 1. Stop intake; drop (and count) what was queued but not processed.
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
            while not self.queue.empty():
                if self.queue.get_nowait() is not None:
                    self.dropped += 1
            self.queue.put_nowait(None)
            # 2. Let the pipeline finish the candle in hand (never cut an order in half).
            await pipeline
            for task in background:
                task.cancel()

    def _started(self) -> None:
        assert self.engine is not None
        self.engine.set_state(BotState.RUNNING)
        # Everything built so far lives for the whole run: keep it out of the cyclic GC's
        # generations so full collections stay short (they stalled the loop ~100 ms).
        gc.freeze()
        log.info(
            "daemon_started",
            mode=self.args.mode,
            pairs=self.engine.pairs,
            timeframe=self.engine.timeframe,
            strategy=self.engine.strategy.describe(),
        )

    async def _ready_to_trade(self) -> None:
        """Finish reconciling before the first decision (live only).

        The private streams are subscribed first; the fills made since the journal's last
        record (those the reconciliation's fetch could not see yet) are then fetched once
        over REST, so none falls between the fetch and the subscription; last, every
        position gets back the stop it should have (one crossed already is closed).
        """
        assert self.engine is not None
        assert self.exchange is not None
        engine, exchange = self.engine, self.exchange
        await exchange.wait_private_streams(timeout=PRIVATE_READY_TIMEOUT_S)
        since = self._fills_since
        settled = 0
        for fill in await exchange.fetch_my_trades(since=since):
            if not await engine.executor.has_fill(fill.fill_id):
                await engine.on_stream_fill(fill)
                settled += 1
        crossed = await engine.executor.restore_protection(engine.price)
        for pair in crossed:
            await engine.close_position(pair, "stop level crossed while the bot was down")
        log.info("ready_to_trade", fills_since_reconcile=settled, closed_past_stop=crossed)

    async def teardown(self) -> None:
        """Shut down in order, each step isolated: orders, state, notifications, sessions."""
        assert self.engine is not None
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("cancel_entry_orders", self._cancel_entry_orders),
            ("settle_fills", self._settle_fills),
            ("persist_state", self._persist_async),
            *self._closers,
        ]
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), timeout=SHUTDOWN_STEP_TIMEOUT)
            except Exception:
                log.exception("shutdown_step_failed", step=name)
        self.engine.set_state(BotState.STOPPED)
        log.info("daemon_stopped", candles=self.engine.candles, dropped=self.dropped)
        self.audit.close()

    async def _cancel_entry_orders(self) -> None:
        # Entry orders are cancelled; protective stops stay on the exchange so a stopped bot
        # still has its stops. What an order is for is the journal's record, not the wire.
        assert self.engine is not None
        cancelled = await self.engine.executor.cancel_entries()
        if cancelled:
            log.info("entry_orders_cancelled", orders=cancelled)

    async def _persist_async(self) -> None:
        await asyncio.to_thread(self.persist_state)
        await self._persist_risk_state()
        if self.engine is not None:
            stored = await self.engine.data.flush()
            if stored:
                log.info("candles_archived", candles=stored)

    def persist_state(self) -> Path:
        """Write the portfolio, open orders and risk state atomically; return the path."""
        assert self.engine is not None
        engine = self.engine
        path = self.settings.storage.data_dir / "state" / f"{self.args.mode}.json"
        state = {
            "ts": engine.clock.now_ms(),
            "mode": engine.mode,
            "candles": engine.candles,
            "cash": str(engine.portfolio.cash),
            "equity": str(engine.portfolio.equity()),
            "positions": [
                {
                    "pair": p.pair,
                    "side": str(p.side),
                    "qty": str(p.qty),
                    "entry_price": str(p.entry_price),
                    "ts_opened": p.ts_opened,
                }
                for p in engine.portfolio.positions().values()
            ],
            "open_orders": [
                {"client_order_id": o.client_order_id, "pair": o.pair, "status": str(o.status)}
                for o in engine.executor.open_orders()
            ],
            "trading_state": str(engine.risk.trading_state),
            "n_trades": len(engine.portfolio.closed),
        }
        atomic_write(path, json.dumps(state, indent=2))
        log.info("state_flushed", path=str(path), candles=engine.candles)
        return path

    def summary(self) -> dict[str, Any]:
        """Return the engine's summary plus run bookkeeping."""
        assert self.engine is not None
        summary = self.engine.summary()
        summary["dropped_candles"] = self.dropped
        return summary


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """Return the error that ended the run: a FatalError first, else the first one."""
    fatal = group.subgroup(FatalError)
    source: BaseException = fatal if fatal is not None else group
    while isinstance(source, BaseExceptionGroup):
        source = source.exceptions[0]
    return source


class ExchangeClock:
    """Wall time as the exchange sees it (our clock plus the measured offset)."""

    def __init__(self, exchange: Any) -> None:
        self._exchange = exchange

    def now_ms(self) -> int:
        """Return the exchange's current time in ms."""
        return int(self._exchange.server_now_ms())

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(seconds)


class TelegramNotifier:
    """Turn component events into Telegram alerts (templates in telegram_templates)."""

    def __init__(self, bot: Any) -> None:
        self.bot = bot

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        """Queue the alert for `kind`; unknown kinds go out as plain text."""
        import telegram_templates as t

        alert: Any
        if kind == "trade_closed":
            alert = t.trade_closed(data["trade"])
        elif kind == "trade_opened":
            alert = t.order_filled(data["fill"])
        elif kind == "trading_state":
            alert = t.circuit_breaker(
                str(data.get("trigger") or data.get("reason") or "risk"),
                value=float(data.get("drawdown") or data.get("day_loss") or 0.0),
                limit=float(data.get("limit") or 0.0),
                state=str(data.get("to", "")),
                until_ts=data.get("resume_at"),
                detail=str(data.get("reason", "")),
            )
        elif kind == "risk_reset":
            before = data.get("before") or {}
            latched = ", ".join(before.get("latched") or {}) or "none"
            alert = t.text_alert(
                f"risk reset by {data.get('by')}: {before.get('state')} -> {data.get('after')}"
                f" (latched before: {latched})",
                category="risk",
            )
        elif kind == "error":
            alert = t.error_alert(
                str(data.get("message", "")), component=str(data.get("pair") or "")
            )
        elif kind == "rejected":
            alert = t.text_alert(
                f"order rejected on {data.get('pair')}: {data.get('reason')}", category="rejected"
            )
        elif kind == "stop_hit":
            alert = t.text_alert(
                f"stop hit on {data.get('pair')} at {data.get('price')}", category="stop"
            )
        else:
            alert = t.text_alert(f"{kind}: {data}")
        self.bot.notify(alert)


async def run_backtest(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Run a backtest on the replay path (or the fast path) with a progress bar and report."""
    import analytics
    from trade_simulator import fast_backtest, fast_path_blockers, result_from_summary

    s = settings
    if getattr(args, "engine", "replay") == "fast":
        blockers = fast_path_blockers(
            risk_profile=s.risk.profile,
            pairs=s.strategy.pairs,
            timeframe=s.strategy.timeframe,
            slippage_model=s.simulation.slippage_model,
            latency_ms=s.simulation.latency_ms,
            dynamic_pairs=s.pairs.dynamic,
        )
        if blockers:
            raise ConfigError("--engine fast cannot run this backtest: " + "; ".join(blockers))
        start_ms, end_ms = parse_timerange(args.timerange) if args.timerange else (None, None)
        ((pair, frame),) = load_frames(args, s).items()
        result = fast_backtest(
            load_strategy(s.strategy.name, s.strategy.params),
            frame,
            pair=pair,
            timeframe=s.strategy.timeframe,
            starting_balance=s.simulation.starting_balance,
            taker_fee=s.simulation.taker_fee,
            slippage_bps=s.simulation.slippage_bps,
            fill_at=s.simulation.fill_at,
            start_ms=start_ms,
            end_ms=end_ms,
        )
        summary = result.summary()
        summary["dropped_candles"] = 0
    else:
        daemon = Daemon(args, settings)
        with analytics.progress_bar("backtest") as progress:
            daemon.progress = progress
            daemon.build_replay()
            summary = await daemon.run()
        assert daemon.engine is not None
        prices = {
            pair: (frame.index.as_unit("ms").asi8 + daemon.engine.step, frame["close"].to_numpy())
            for pair, frame in daemon.frames.items()
        }
        result = result_from_summary(summary, daemon.engine.portfolio.equity_curve, prices=prices)
    mc = analytics.monte_carlo(analytics.trade_returns(result)) if summary["n_trades"] > 1 else None
    Console(file=sys.stdout, width=120).print(analytics.render_rich(result, monte_carlo_result=mc))
    if args.report_html is not None:
        path = analytics.write_html_report(result, args.report_html, monte_carlo_result=mc)
        log.warning("report_written", path=str(path))
    return summary


async def run_trading(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Run sim, backtest or live trading and return the summary."""
    if args.mode == "backtest":
        return await run_backtest(args, settings)
    daemon = Daemon(args, settings)
    feed = settings.simulation.feed
    if args.mode == "sim" and feed == "replay":
        daemon.build_replay()
    elif args.mode == "sim" and feed == "auto":
        try:
            await daemon.build_exchange(paper=True, probe=True)
        except (RecoverableError, AuthenticationError) as e:
            log.warning(
                "feed_auto_fallback",
                detail="Bybit is unreachable; replaying the bundled sample instead",
                error=e.message,
            )
            print(
                f"kestrel: Bybit unreachable ({e.message}); using the offline replay",
                file=sys.stderr,
            )
            await daemon.close_exchange()
            daemon.build_replay()
    else:
        try:
            await daemon.build_exchange(paper=args.mode == "sim")
        except BaseException:
            await daemon.close_exchange()
            raise
    return await daemon.run()


async def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    """Run a batch mode (optimize, backfill, train, pairs, parity); return the exit status."""
    if args.mode == "backfill":
        from data_manager import run_backfill_cli

        return await run_backfill_cli(args, settings)
    if args.mode == "pairs":
        from top_pairs import run_pairs_cli

        return await run_pairs_cli(args, settings)
    if args.mode == "optimize":
        from parameter_optimization import run_optimize_cli

        return await run_optimize_cli(args, settings)
    if args.mode == "train":
        from self_learning import run_train_cli

        frames = load_frames(args, settings)
        models_dir = settings.storage.data_dir / "models"
        for pair, frame in frames.items():
            name = f"direction-{pair.split(':')[0].replace('/', '-')}-{settings.strategy.timeframe}"
            code = await run_train_cli(frame, settings.learning, models_dir, name=name)
            if code:
                return code
        return 0
    if args.mode == "parity":
        return await run_parity(args, settings)
    raise ConfigError(f"unknown batch mode {args.mode}")


async def run_parity(args: argparse.Namespace, settings: Settings) -> int:
    """Replay the recorded live candles through the backtester and report every difference.

    Exit status 0 when every decision matched, 1 when something differed.
    """
    from rich.console import Console

    from parity import DECISION_KINDS, compare, read_audit, render
    from utils.utilities import parse_date_ms

    since = parse_date_ms(args.since) if args.since else None
    live = read_audit(settings.storage.log_dir, since)
    pairs = sorted({e["pair"] for e in live if e.get("kind") in DECISION_KINDS})
    if not pairs:
        raise DataError(
            f"no recorded live decisions in {settings.storage.log_dir}/audit.jsonl"
            + (f" since {args.since}" if args.since else "")
        )
    data = settings.model_dump()
    data["strategy"]["pairs"] = pairs
    replay_settings = Settings.model_validate(data)
    replay_args = argparse.Namespace(**{**vars(args), "mode": "backtest", "timerange": None})
    daemon = Daemon(replay_args, replay_settings)
    daemon.audit = AuditTrail(None, keep=True)
    daemon.build_replay()
    await daemon.run()
    assert daemon.audit.events is not None
    replayed = [
        e for e in daemon.audit.events if since is None or e.get("candle_ts", e["ts"]) >= since
    ]
    report = compare(live, replayed)
    Console(file=sys.stdout, width=140).print(render(report))
    out = args.summary_json or settings.storage.data_dir / "parity" / "report.json"
    atomic_write(Path(out), json.dumps(report.to_json(), indent=2, default=str))
    return 0 if report.ok else 1
