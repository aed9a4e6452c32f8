"""Assembly of a run, per mode: replay (sim and backtest), paper on the live feed, live.

Part of `runner` (which re-exports it): `DaemonBuild` builds the feed, the order gateway
(the matching engine or the live `Exchange`), the engine with every collaborator passed
through its constructor, and, live, the journal and the start-up reconciliation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import structlog

from anomaly_detection import AnomalyMonitor, AnomalyWatch
from capital_allocation import Allocator, Sleeve
from config import SleeveSettings
from daemon_base import DaemonBase
from data_manager import CandleStore, DataManager, replay_funding
from data_manager import replay_frames as load_frames
from error_handler import (
    ConfigError,
)
from models import Candle, Event, Market, strategy_tag
from pattern_recognition import PatternFilter
from pipeline import Engine, PrecomputedSignals, RollingSignals, SignalSource, StrategyRouter
from portfolio import Portfolio
from reward_system import RewardSystem
from risk_management import RiskManager
from strategy import Strategy, load_strategy
from trade_executor import TradeExecutor
from trade_simulator import ReplayFeed, SimDriver, SimulatedExchange
from utils.utilities import (
    ReplayClock,
    parse_timerange,
    timeframe_to_ms,
)


log = structlog.get_logger(__name__)
QUEUE_SIZE = 1_000
SHUTDOWN_STEP_TIMEOUT = 1.5
PRIVATE_READY_TIMEOUT_S = 10.0  # the private streams' subscription, before trading starts
_SETTLE_LOOKBACK_MS = 3_600_000  # how far back the stop looks for fills the stream missed


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


class DaemonBuild(DaemonBase):
    """Build the components of one run (see the module docstring)."""

    def _strategy_name(self) -> str:
        """Return the strategy to load: `rl` alone becomes the registry's RL champion.

        The registry keeps one RL model per pair and timeframe (`rl-<BASE-QUOTE>-<tf>`);
        `--strategy rl` trades the champion of the first traded pair's model, as
        `rl:<its version directory>`. With no champion yet the name points at an empty
        place, which the policy strategy answers with no signal and an alert.
        """
        s = self.settings
        if s.strategy.name != "rl":
            return s.strategy.name
        from model_registry import Registry
        from model_training import model_dirs, model_name

        models, _ = model_dirs(s.learning, s.storage.data_dir)
        name = model_name("rl", s.traded_pairs()[0], s.strategy.timeframe)
        registry = Registry(models)
        version = registry.alias(name, "champion")
        if version is None:
            log.warning("rl_champion_missing", model=name, registry=str(models))
            return f"rl:{models / name / 'champion'}"
        log.info("rl_champion_loaded", model=name, version=version)
        return f"rl:{registry.path(name, version)}"

    def _strategy_params(self) -> dict[str, float]:
        """Return the strategy parameters of this run: the approved ones in sim and live.

        A backtest runs what it is told (research). Sim and live take the parameters of
        `<data_dir>/approved/<strategy>.json`, written only when the optimiser's choice
        passed the out-of-sample gate (or was forced); with no file they keep the
        configured parameters (the strategy's defaults unless set).
        """
        from approved_params import load_approved

        s = self.settings
        configured = dict(s.strategy.params)
        if self.args.mode == "backtest":
            return configured
        approved = load_approved(s.storage.data_dir, s.strategy.name)
        if approved is None:
            return configured
        if configured and configured != approved.params:
            log.warning(
                "configured_params_ignored",
                configured=configured,
                approved=approved.params,
                path=str(approved.path),
            )
        log.info(
            "approved_params_loaded",
            params=approved.params,
            path=str(approved.path),
            forced=approved.forced,
            approved_at=approved.approved_at,
        )
        if approved.forced:
            # Trading on parameters that failed the gate: logged now, and alerted to the
            # operator once the notifiers are up (daemon_operator).
            self.forced_params = approved
            log.warning("forced_params_in_use", params=approved.params, path=str(approved.path))
        return approved.params

    def build_replay(self) -> None:
        """Build the replay feed, matching engine and engine (sim --feed replay, backtest)."""
        s = self.settings
        started = time.perf_counter()
        frames = load_frames(self.args, s)
        self.timings["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        start_ms = end_ms = None
        if self.args.timerange:
            try:
                start_ms, end_ms = parse_timerange(self.args.timerange)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        first = min(int(f.index[:1].as_unit("ms").asi8[0]) for f in frames.values())
        clock = ReplayClock(start_ms if start_ms is not None else first)
        backtest = self.args.mode == "backtest"
        speed = 0.0 if backtest else s.simulation.replay_speed
        strategy = load_strategy(self._strategy_name(), self._strategy_params())
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
            # A paced replay starts trading at once: the warm-up is not worth watching.
            unpaced=strategy.warmup * len(frames),
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
        sleeves, strategy, _ = self._strategies()
        signals = self._precomputed(strategy, sleeves, frames) if backtest else None
        self.engine = self._engine(
            sleeves=sleeves,
            clock=clock,
            strategy=strategy,
            gateway=sim,
            market_for=lambda pair: sim.markets[pair],
            cash=Decimal(str(s.simulation.starting_balance)),
            # Backtests read the strategy's columns computed once over the archive; sim
            # runs it on the rolling window at each candle, exactly as live trading does.
            signals=signals,
        )
        self._watch_liquidations(sim, self.engine.portfolio)
        if s.simulation.funding:
            self.engine.funding = replay_funding(self.args, s)
        self.driver = self._drive(sim, self.engine)
        if (
            isinstance(signals, PrecomputedSignals)
            and self.engine.quiet_exact
            and not s.learning.enabled
        ):
            self.driver.enable_quiet_path(signals)
        # The strategy's columns over the whole archive, numba compilation (or its cache
        # load) included.
        self.timings["prepare_s"] = time.perf_counter() - started

    @staticmethod
    def _precomputed(
        strategy: Strategy, sleeves: list[tuple[SleeveSettings, Strategy]], frames: dict[str, Any]
    ) -> SignalSource:
        # A backtest's signals, computed once over the archives: per sleeve on its pairs.
        if not sleeves:
            return PrecomputedSignals(strategy, frames)
        return StrategyRouter(
            {
                pair: source
                for sleeve, each in sleeves
                for source in [PrecomputedSignals(each, {p: frames[p] for p in sleeve.pairs})]
                for pair in sleeve.pairs
            }
        )

    @staticmethod
    def _watch_liquidations(sim: SimulatedExchange, portfolio: Portfolio) -> None:
        # Perpetuals: cross margin reads the account's wallet balance, and positions show
        # the liquidation price the simulated exchange watches.
        sim.set_cross_balance(portfolio.wallet_balance)

        def liquidation_price(pair: str) -> Decimal | None:
            liq = sim.liquidation(pair)
            return liq.price if liq is not None else None

        portfolio.liquidation_source = liquidation_price

    @staticmethod
    def _drive(sim: SimulatedExchange, engine: Engine) -> SimDriver:
        # The simulated exchange's fills reach the engine where the private stream's
        # fills reach it; its driver matches each candle before the engine processes it.
        sim.deliver_to(engine.on_fill)
        sim.deliver_orders_to(engine.executor.on_order)
        return SimDriver(engine, sim)

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
            margin_mode=sim.margin_mode,
        )

    def _engine(
        self,
        *,
        clock: Any,
        strategy: Strategy,
        gateway: Any,
        market_for: Callable[[str], Market],
        cash: Decimal,
        signals: Any = None,
        store: Any = None,
        data: DataManager | None = None,
        max_lag_ms: int | None = None,
        sleeves: list[tuple[SleeveSettings, Strategy]] | None = None,
    ) -> Engine:
        s = self.settings
        sleeves = sleeves or []
        window = max([strategy.warmup, *(each.warmup for _, each in sleeves)]) * 2
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
        reward = RewardSystem(s.reward)

        def risk_alert(event: Event) -> None:
            # The reward system hears of each breaker trip (revenge-trading penalty).
            reward.on_event(event)
            self.alert(event)

        engine = Engine(
            mode=self.args.mode,
            timeframe=s.strategy.timeframe,
            pairs=s.traded_pairs(),
            clock=clock,
            data=data or DataManager(window=max(window, s.strategy.warmup_candles)),
            strategy=strategy,
            risk=RiskManager(
                s.risk,
                long_only=s.strategy.long_only,
                alert=risk_alert,
                timeframe=s.strategy.timeframe,
                taker_fee=Decimal(str(s.simulation.taker_fee)),
                strategy_tag=strategy_tag(strategy.describe()),
                margin_mode=s.simulation.margin_mode,
            ),
            executor=executor,
            reward=reward,
            portfolio=portfolio,
            market_for=market_for,
            audit=self.audit,
            alert=self.alert,
            stop_event=self.stop,
            signals=signals,
            max_lag_ms=max_lag_ms,
        )
        # Anomalies pause entries on a live feed; replays (backtest and sim alike, so the
        # two stay equal) only when asked to.
        if s.anomaly.enabled and (s.anomaly.in_replay or max_lag_ms is not None):
            monitor = AnomalyMonitor(s.anomaly, s.strategy.timeframe)
            pauses = engine.risk.pair_pauses
            engine.anomaly_watch = AnomalyWatch(monitor, pauses, audit=self.audit, alert=self.alert)
            if data is not None:  # a live start: the warm-up history sets the scale
                prime_anomalies(engine, [p for p, tf in data.pairs() if tf == engine.timeframe])
        if s.strategy.pattern_filter:
            engine.pattern_filter = self._pattern_filter()
        if sleeves:
            self._install_sleeves(engine, sleeves, rolling=signals is None)
        return engine

    def _strategies(self) -> tuple[list[tuple[SleeveSettings, Strategy]], Strategy, int]:
        # The sleeves (none: one strategy trades), the strategy the engine is named by,
        # and the candle window the slowest of them needs.
        s = self.settings
        sleeves = self._load_sleeves()
        strategy = (
            sleeves[0][1]
            if sleeves
            else load_strategy(self._strategy_name(), self._strategy_params())
        )
        warmup = max([strategy.warmup, *(each.warmup for _, each in sleeves)])
        return sleeves, strategy, max(warmup * 2, s.strategy.warmup_candles)

    def _load_sleeves(self) -> list[tuple[SleeveSettings, Strategy]]:
        # Each configured strategy sleeve with its strategy; none: one strategy trades.
        out = []
        for i, sleeve in enumerate(self.settings.allocation.strategies):
            try:
                out.append((sleeve, load_strategy(sleeve.name, sleeve.params)))
            except ConfigError as e:
                raise ConfigError(
                    f"KESTREL_ALLOCATION__STRATEGIES[{i}] ({sleeve.key}): {e.message}",
                    component="config",
                ) from e
        return out

    def _install_sleeves(
        self, engine: Engine, sleeves: list[tuple[SleeveSettings, Strategy]], *, rolling: bool
    ) -> None:
        # Several strategies: each decides on its own pairs (the rolling window in sim and
        # live) and trades a sleeve of the account that the skill ranking re-cuts.
        allocation = self.settings.allocation
        if rolling:
            engine.signals_source = StrategyRouter(
                {
                    pair: RollingSignals(each, engine.data, engine.timeframe)
                    for sleeve, each in sleeves
                    for pair in sleeve.pairs
                }
            )
        engine.sleeves = Allocator(
            [
                Sleeve(
                    sleeve.key,
                    tuple(sleeve.pairs),
                    strategy_tag({**each.describe(), "sleeve": sleeve.key}),
                    *allocation.bounds(sleeve),
                    initial=sleeve.initial,
                )
                for sleeve, each in sleeves
            ],
            allocation,
            equity=engine.portfolio.equity(),
            now_ms=engine.clock.now_ms(),
        )
        engine.portfolio.owners = {
            pair: sleeve.key for sleeve, _ in sleeves for pair in sleeve.pairs
        }
        log.info(
            "strategies_loaded",
            sleeves={sleeve.key: list(sleeve.pairs) for sleeve, _ in sleeves},
            weights=engine.sleeves.weights,
        )

    def _pattern_filter(self) -> PatternFilter | None:
        # The pattern model the strategy settings name; without one, no filter (and a
        # warning), never a failed start: the filter only ever refuses entries.
        from pattern_recognition import PatternModel

        path = self.settings.strategy.pattern_model
        if path is None:
            log.warning("pattern_filter_without_model")
            return None
        try:
            return PatternFilter(PatternModel.load(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("pattern_model_unreadable", path=str(path), error=repr(e))
            return None

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
        sleeves, strategy, window = self._strategies()
        # Candles from the exchange are archived (flushed with each state snapshot), so
        # backtests and the parity audit can replay exactly what the bot saw.
        data = DataManager(window=window, store=CandleStore(s.storage.data_dir))
        timeframe = s.strategy.timeframe
        pairs = s.traded_pairs()
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
        await self._warm_up(pairs, strategy, sleeves)
        # Every closed candle from here on, exactly once, gaps refilled from REST.
        self.feed = self._exchange_candles(pairs)
        step = timeframe_to_ms(timeframe)
        self._exchange_status = lambda: {"rate_limit_budget": exchange.rate_limit_budget()}
        if paper:
            sim = self._simulated_exchange(clock, markets=dict(exchange.markets))
            self.sim = sim
            self.engine = self._engine(
                sleeves=sleeves,
                clock=clock,
                strategy=strategy,
                gateway=sim,
                market_for=exchange.market,
                cash=Decimal(str(s.simulation.starting_balance)),
                data=data,
                max_lag_ms=step,
            )
            self._watch_liquidations(sim, self.engine.portfolio)
            self.driver = self._drive(sim, self.engine)
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
            sleeves=sleeves,
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

    async def _warm_up(
        self,
        pairs: list[str],
        strategy: Strategy | None = None,
        sleeves: list[tuple[SleeveSettings, Strategy]] | None = None,
    ) -> None:
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
            # The pair's own strategy (its sleeve's when several trade).
            deciding = next((each for sl, each in sleeves or [] if pair in sl.pairs), strategy)
            if deciding is not None and len(bars.ts) >= deciding.warmup:
                # Run the strategy over the history now: its kernel is compiled and its
                # per-pair state primed before the first live candle, not during it.
                deciding.last_row_arrays(pair, bars)
            log.info("warmup_loaded", pair=pair, candles=len(history))


def prime_anomalies(engine: Engine, pairs: list[str]) -> None:
    """Feed the pairs' warm-up candles to the anomaly monitor (a no-op without one)."""
    if engine.anomaly_watch is None:
        return
    monitor = engine.anomaly_watch.monitor
    keep = monitor.settings.window + 3
    for pair in pairs:
        bars = engine.data.arrays(pair, engine.timeframe)
        rows = zip(*(column[-keep:].tolist() for column in bars), strict=True)
        monitor.prime(Candle(pair, engine.timeframe, *row) for row in rows)
