"""What every mode's builder shares: the frozen set of components and the engine's assembly.

Part of `runner` (which re-exports it). A run is `Components`: the engine (strategy, risk,
executor, portfolio, reward, candle window: the same classes in every mode) and the three
things a mode chooses, the order gateway, the market feed and the clock. The builders
(`mode_builders`) pick those three; everything else is assembled here, once, with every
collaborator passed through a constructor.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from anomaly_detection import AnomalyMonitor, AnomalyWatch
from capital_allocation import Allocator, Sleeve
from config import Settings, SleeveSettings
from data_manager import DataManager
from error_handler import ConfigError
from models import Candle, Event, EventSink, Market, strategy_tag
from pattern_recognition import PatternFilter
from perpetuals import FundingSchedule
from pipeline import Engine, PrecomputedSignals, RollingSignals, SignalSource, StrategyRouter
from portfolio import Portfolio
from reward_system import RewardSystem
from risk_management import RiskManager
from strategy import Strategy, load_strategy
from trade_executor import TradeExecutor
from trade_simulator import SimDriver, SimulatedExchange
from utils.utilities import AuditTrail, Clock, ReplayClock


if TYPE_CHECKING:
    import pandas as pd

    from approved_params import ApprovedParams
    from daemon_state import RunState
    from exchange import Exchange
    from executor_core import OrderGateway
    from market_feed import ExchangeFeed
    from trade_simulator import PairSchedule, ReplayFeed
    from trade_store import TradeStore


__all__ = [
    "BuildContext",
    "Closer",
    "Components",
    "ExchangeClock",
    "LiveGateway",
    "SimGateway",
    "prime_anomalies",
]

log = structlog.get_logger(__name__)

Closer = tuple[str, Callable[[], Awaitable[object]]]


class ExchangeClock:
    """Wall time as the exchange sees it (our clock plus the measured offset)."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def now_ms(self) -> int:
        """Return the exchange's current time in ms."""
        return int(self._exchange.server_now_ms())

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class SimGateway:
    """Orders fill on the simulated exchange; its driver matches each candle first.

    Attributes:
        exchange: the matching engine the executor sends orders to.
        driver: hands each candle to the engine with the simulated exchange in front.
    """

    exchange: SimulatedExchange
    driver: SimDriver


@dataclass(frozen=True, slots=True)
class LiveGateway:
    """Orders go to the exchange, journaled first in the trade store.

    Attributes:
        exchange: the live `Exchange` the executor sends orders to.
        store: the journal (orders before they are sent, fills, risk state, trades).
    """

    exchange: Exchange
    store: TradeStore


@dataclass(frozen=True, slots=True)
class Components:
    """One run, assembled: only the gateway, the feed and the clock differ between modes.

    Attributes:
        mode: `sim`, `live` or `backtest`.
        engine: the pipeline (strategy, risk, executor, portfolio, reward, candle window).
        gateway: where orders go: the simulated exchange or the live one.
        feed: where candles come from: the archive replay or the exchange stream.
        clock: replay time or the exchange's wall time.
        state: what the run keeps on disk (snapshot, risk state, sleeves, performance).
        closers: what to close at the end of the run, in order (exchange, journal).
        frames: the replayed archive per pair (empty on the exchange feed).
        pair_schedule: a dynamic-pairs backtest's point-in-time pair list, else None.
        forced_params: approved parameters forced past a failed gate (alerted at start).
        timings: seconds per assembly phase (load, prepare) of a replay.
    """

    mode: str
    engine: Engine
    gateway: SimGateway | LiveGateway
    feed: ReplayFeed | ExchangeFeed
    clock: ReplayClock | ExchangeClock
    state: RunState
    closers: tuple[Closer, ...] = ()
    frames: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    pair_schedule: PairSchedule | None = None
    forced_params: ApprovedParams | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a builder is given: the run's arguments and the run's shared services.

    Attributes:
        args: the parsed command line.
        settings: the validated settings.
        audit: the decision audit trail.
        alert: the alert bus (the run routes it to the notifiers).
        stop: the run's stop event (the engine's fail-safe sets it).
        progress: a replay's progress callback (the backtest's bar), or None.
    """

    args: argparse.Namespace
    settings: Settings
    audit: AuditTrail
    alert: EventSink
    stop: asyncio.Event
    progress: Callable[[int, int], None] | None = None


def strategy_name(ctx: BuildContext) -> str:
    """Return the strategy to load: `rl` alone becomes the registry's RL champion.

    The registry keeps one RL model per pair and timeframe (`rl-<BASE-QUOTE>-<tf>`);
    `--strategy rl` trades the champion of the first traded pair's model, as
    `rl:<its version directory>`. With no champion yet the name points at an empty
    place, which the policy strategy answers with no signal and an alert.
    """
    s = ctx.settings
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


def strategy_params(ctx: BuildContext) -> tuple[dict[str, float], ApprovedParams | None]:
    """Return the strategy parameters of this run (the approved ones in sim and live).

    A backtest runs what it is told (research). Sim and live take the parameters of
    `<data_dir>/approved/<strategy>.json`, written only when the optimiser's choice
    passed the out-of-sample gate (or was forced); with no file they keep the
    configured parameters (the strategy's defaults unless set). The second value is the
    approval when it was forced past a failed gate (alerted to the operator once the
    notifiers are up), else None.
    """
    from approved_params import load_approved

    s = ctx.settings
    configured = dict(s.strategy.params)
    if ctx.args.mode == "backtest":
        return configured, None
    approved = load_approved(s.storage.data_dir, s.strategy.name)
    if approved is None:
        return configured, None
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
        log.warning("forced_params_in_use", params=approved.params, path=str(approved.path))
        return approved.params, approved
    return approved.params, None


Sleeves = list[tuple[SleeveSettings, Strategy]]


def strategies(ctx: BuildContext) -> tuple[Sleeves, Strategy, int, ApprovedParams | None]:
    """Return the sleeves, the engine's strategy, the candle window and a forced approval.

    The sleeves are empty when one strategy trades; the strategy the engine is named by is
    the first sleeve's then; the window is what the slowest of them needs.
    """
    s = ctx.settings
    sleeves = load_sleeves(ctx.settings)
    forced = None
    if sleeves:
        strategy = sleeves[0][1]
    else:
        params, forced = strategy_params(ctx)
        strategy = load_strategy(strategy_name(ctx), params)
    warmup = max([strategy.warmup, *(each.warmup for _, each in sleeves)])
    return sleeves, strategy, max(warmup * 2, s.strategy.warmup_candles), forced


def load_sleeves(settings: Settings) -> Sleeves:
    """Return each configured strategy sleeve with its strategy; none: one strategy trades."""
    out = []
    for i, sleeve in enumerate(settings.allocation.strategies):
        try:
            out.append((sleeve, load_strategy(sleeve.name, sleeve.params)))
        except ConfigError as e:
            raise ConfigError(
                f"KESTREL_ALLOCATION__STRATEGIES[{i}] ({sleeve.key}): {e.message}",
                component="config",
            ) from e
    return out


def precomputed(strategy: Strategy, sleeves: Sleeves, frames: dict[str, Any]) -> SignalSource:
    """Return a backtest's signals, computed once over the archives: per sleeve on its pairs."""
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


def simulated_exchange(
    settings: Settings, clock: Clock, markets: dict[str, Market] | None = None
) -> SimulatedExchange:
    """Return the matching engine with the simulation settings' fees, slippage and latency."""
    sim = settings.simulation
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


def sim_gateway(sim: SimulatedExchange, engine: Engine) -> SimGateway:
    """Put the simulated exchange in front of the engine; return it with its driver.

    Perpetuals: cross margin reads the account's wallet balance, and positions show the
    liquidation price the simulated exchange watches.
    """
    portfolio = engine.portfolio
    sim.set_cross_balance(portfolio.wallet_balance)

    def liquidation_price(pair: str) -> Decimal | None:
        liq = sim.liquidation(pair)
        return liq.price if liq is not None else None

    portfolio.liquidation_source = liquidation_price
    # The simulated exchange's fills reach the engine where the private stream's fills
    # reach it; its driver matches each candle before the engine processes it.
    sim.deliver_to(engine.on_fill)
    sim.deliver_orders_to(engine.executor.on_order)
    return SimGateway(sim, SimDriver(engine, sim))


def build_engine(
    ctx: BuildContext,
    *,
    clock: Clock,
    strategy: Strategy,
    gateway: OrderGateway,
    market_for: Callable[[str], Market],
    cash: Decimal,
    signals: SignalSource | None = None,
    store: TradeStore | None = None,
    data: DataManager | None = None,
    max_lag_ms: int | None = None,
    sleeves: Sleeves | None = None,
    funding: dict[str, FundingSchedule] | None = None,
    extra_status: Callable[[], dict[str, Any]] | None = None,
) -> Engine:
    """Return the engine of a run: the same classes in every mode, the gateway given."""
    s = ctx.settings
    sleeves = sleeves or []
    window = max([strategy.warmup, *(each.warmup for _, each in sleeves)]) * 2
    portfolio = Portfolio(cash, quote=s.simulation.quote_currency)
    executor = build_executor(ctx, gateway, portfolio, market_for, clock, store)
    reward = RewardSystem(s.reward)

    def risk_alert(event: Event) -> None:
        # The reward system hears of each breaker trip (revenge-trading penalty).
        reward.on_event(event)
        ctx.alert(event)

    warmed = data is not None  # a start on the exchange feed: the warm-up is in `data`
    data = data or DataManager(window=max(window, s.strategy.warmup_candles))
    risk = RiskManager(
        s.risk,
        long_only=s.strategy.long_only,
        alert=risk_alert,
        timeframe=s.strategy.timeframe,
        taker_fee=Decimal(str(s.simulation.taker_fee)),
        strategy_tag=strategy_tag(strategy.describe()),
        margin_mode=s.simulation.margin_mode,
    )
    allocator = None
    if sleeves:
        if signals is None:  # sim and live: each strategy on the rolling window
            signals = sleeve_signals(sleeves, data, s.strategy.timeframe)
        allocator = sleeve_allocator(s, sleeves, portfolio, clock)
    engine = Engine(
        mode=ctx.args.mode,
        timeframe=s.strategy.timeframe,
        pairs=s.traded_pairs(),
        clock=clock,
        data=data,
        strategy=strategy,
        risk=risk,
        executor=executor,
        reward=reward,
        portfolio=portfolio,
        market_for=market_for,
        audit=ctx.audit,
        alert=ctx.alert,
        stop_event=ctx.stop,
        signals=signals,
        max_lag_ms=max_lag_ms,
        anomaly_watch=anomaly_watch(ctx, risk, live=max_lag_ms is not None),
        pattern_filter=pattern_filter(s) if s.strategy.pattern_filter else None,
        sleeves=allocator,
        funding=funding,
        extra_status=extra_status,
    )
    if engine.anomaly_watch is not None and warmed:
        # A live start: the warm-up history sets the scale.
        prime_anomalies(engine, [p for p, tf in data.pairs() if tf == engine.timeframe])
    return engine


def build_executor(
    ctx: BuildContext,
    gateway: OrderGateway,
    portfolio: Portfolio,
    market_for: Callable[[str], Market],
    clock: Clock,
    store: TradeStore | None,
) -> TradeExecutor:
    """Return the executor that sends to `gateway` (journaled in `store` when live)."""
    s = ctx.settings
    return TradeExecutor(
        gateway,
        portfolio,
        market_for=market_for,
        clock=clock,
        audit=ctx.audit,
        notify=ctx.alert,
        store=store,
        taker_fee=Decimal(str(s.simulation.taker_fee)),
        protective_orders=s.risk.profile != "all_in",
        # Bybit refuses a request older than its recv_window: an order not there by
        # then (plus a margin for clock skew) was never placed.
        unknown_after_ms=s.exchange.recv_window_ms + 5_000,
    )


def anomaly_watch(ctx: BuildContext, risk: RiskManager, *, live: bool) -> AnomalyWatch | None:
    """Return the anomaly watch that pauses entries through risk, or None.

    Anomalies pause entries on a live feed; replays (backtest and sim alike, so the two
    stay equal) only when asked to.
    """
    s = ctx.settings
    if not (s.anomaly.enabled and (s.anomaly.in_replay or live)):
        return None
    monitor = AnomalyMonitor(s.anomaly, s.strategy.timeframe)
    return AnomalyWatch(monitor, risk.pair_pauses, audit=ctx.audit, alert=ctx.alert)


def sleeve_signals(sleeves: Sleeves, data: DataManager, timeframe: str) -> SignalSource:
    """Return the signals of several strategies, each on its own pairs' rolling window."""
    return StrategyRouter(
        {
            pair: RollingSignals(each, data, timeframe)
            for sleeve, each in sleeves
            for pair in sleeve.pairs
        }
    )


def sleeve_allocator(
    settings: Settings, sleeves: Sleeves, portfolio: Portfolio, clock: Clock
) -> Allocator:
    """Return the capital sleeves: each strategy's share of the account, re-cut by skill.

    The portfolio learns which sleeve owns each pair.
    """
    allocation = settings.allocation
    allocator = Allocator(
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
        equity=portfolio.equity(),
        now_ms=clock.now_ms(),
    )
    portfolio.owners = {pair: sleeve.key for sleeve, _ in sleeves for pair in sleeve.pairs}
    log.info(
        "strategies_loaded",
        sleeves={sleeve.key: list(sleeve.pairs) for sleeve, _ in sleeves},
        weights=allocator.weights,
    )
    return allocator


def pattern_filter(settings: Settings) -> PatternFilter | None:
    """Return the pattern filter the strategy settings name, or None.

    Without a model (or with an unreadable one) there is no filter and a warning, never a
    failed start: the filter only ever refuses entries.
    """
    from pattern_recognition import PatternModel

    path = settings.strategy.pattern_model
    if path is None:
        log.warning("pattern_filter_without_model")
        return None
    try:
        return PatternFilter(PatternModel.load(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("pattern_model_unreadable", path=str(path), error=repr(e))
        return None


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
