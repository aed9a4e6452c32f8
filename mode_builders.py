"""One builder per mode: each returns the run's frozen `assembly.Components`.

Part of `runner` (which re-exports it). The builders differ only in what DESIGN.md says
differs between modes:

| builder | order gateway | market feed | clock |
|---|---|---|---|
| `build_backtest` | simulated exchange | archive replay, unpaced | replay |
| `build_sim` | simulated exchange | archive replay or exchange stream | replay or exchange |
| `build_live` | live `Exchange`, journaled | exchange stream | exchange |

Everything else (strategy, risk, executor, portfolio, reward) comes from
`assembly.build_engine`, the same in every mode. Start-up steps that need the run's own
state (the saved risk state, the reconciliation) follow in `runner.Daemon`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from assembly import (
    BuildContext,
    Closer,
    Components,
    ExchangeClock,
    LiveGateway,
    SimGateway,
    Sleeves,
    build_engine,
    precomputed,
    sim_gateway,
    simulated_exchange,
    strategies,
    strategy_name,
    strategy_params,
)
from daemon_state import RunState
from data_manager import (
    CandleStore,
    DataManager,
    archive_segments,
    own_archives,
    replay_funding,
)
from data_manager import replay_frames as load_frames
from error_handler import AuthenticationError, ConfigError, RecoverableError
from market_feed import ExchangeFeed
from pipeline import PrecomputedSignals
from strategy import Strategy, load_strategy
from trade_simulator import PairSchedule, ReplayFeed, SegmentedReplayFeed
from utils.utilities import ReplayClock, parse_timerange, timeframe_to_ms


if TYPE_CHECKING:
    import pandas as pd

    from approved_params import ApprovedParams
    from exchange import Exchange
    from executor_core import OrderGateway
    from pipeline import Engine
    from trade_store import TradeStore


__all__ = ["build_backtest", "build_live", "build_paper", "build_replay", "build_sim"]

log = structlog.get_logger(__name__)


def build_backtest(ctx: BuildContext) -> Components:
    """Assemble a backtest: the archive replayed unpaced into the simulated exchange."""
    return build_replay(ctx)


async def build_sim(ctx: BuildContext) -> Components:
    """Assemble paper trading: the simulated exchange on the replay or the live feed.

    `--feed replay` replays the archive; `live` trades on paper on Bybit's public feed;
    `auto` tries the exchange and falls back to the replay when it is unreachable.
    """
    feed = ctx.settings.simulation.feed
    if feed == "replay":
        return build_replay(ctx)
    if feed == "auto":
        try:
            return await build_paper(ctx, probe=True)
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
            return build_replay(ctx)
    return await build_paper(ctx)


def _timerange(ctx: BuildContext) -> tuple[int | None, int | None]:
    """Return `--timerange` as (start_ms, end_ms), either end open; a bad range is a ConfigError."""
    if not ctx.args.timerange:
        return None, None
    try:
        return parse_timerange(ctx.args.timerange)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _point_in_time_pairs(ctx: BuildContext, frames: dict[str, pd.DataFrame]) -> PairSchedule:
    """Return the dynamic backtest's pair schedule: the top pairs as ranked at each refresh.

    The list is rebuilt from the archives (no survivorship, no look-ahead); `--pairs`
    names the universe to rank.
    """
    from top_pairs import PointInTimeRanking

    s = ctx.settings
    refresh_ms = s.pairs.ttl_s * 1000
    ranking = PointInTimeRanking(
        frames,
        s.strategy.timeframe,
        refresh_every=refresh_ms,
        top_n=s.pairs.count,
        lookback=86_400_000,
        min_quote_volume=s.pairs.min_quote_volume,
    )
    return PairSchedule(ranking.pairs_at, refresh_ms=refresh_ms)


def build_replay(ctx: BuildContext) -> Components:
    """Assemble a replay (sim --feed replay, backtest): archive feed, replay clock, matching.

    A backtest over archives of ours longer than `storage.replay_segment_rows` candles
    replays them a time segment at a time (`_segments`): the same trades and curve, with
    one segment's candles in memory instead of the whole span.
    """
    s = ctx.settings
    timings: dict[str, float] = {}
    started = time.perf_counter()
    start_ms, end_ms = _timerange(ctx)
    backtest = ctx.args.mode == "backtest"
    plan = _segments(ctx, start_ms, end_ms) if backtest else None
    whole = load_frames(ctx.args, s) if plan is None else {}
    first = (
        plan.first
        if plan is not None
        else min(int(f.index[:1].as_unit("ms").asi8[0]) for f in whole.values())
    )
    clock = ReplayClock(start_ms if start_ms is not None else first)
    params, forced = strategy_params(ctx)
    strategy = load_strategy(strategy_name(ctx), params)
    replay = (
        _whole_feed(ctx, whole, clock, start_ms, end_ms, strategy.warmup)
        if plan is None
        else plan.feed(s.strategy.timeframe, clock, start_ms, ctx.progress)
    )
    frames = replay.frames  # a segmented run's first segment
    timings["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    pair_schedule = _point_in_time_pairs(ctx, frames) if backtest and s.pairs.dynamic else None
    sim = simulated_exchange(s, clock)
    # Each pair's market from its archive's first candle (a segmented run's need not hold it).
    for pair, close in (plan.first_closes if plan is not None else _first_closes(frames)).items():
        sim.ensure_market(pair, close)
    sleeves, strategy, _, _ = strategies(ctx)
    signals = (
        PrecomputedSignals(strategy, frames, segmented=True)
        if plan is not None
        else precomputed(strategy, sleeves, frames)
        if backtest
        else None
    )
    if isinstance(replay, SegmentedReplayFeed) and isinstance(signals, PrecomputedSignals):
        replay.on_segment = signals.advance  # each segment's rows before any candle reads them
    engine = build_engine(
        ctx,
        sleeves=sleeves,
        clock=clock,
        strategy=strategy,
        gateway=sim,
        market_for=lambda pair: sim.markets[pair],
        cash=Decimal(str(s.simulation.starting_balance)),
        # Backtests read the strategy's columns computed once over the archive; sim
        # runs it on the rolling window at each candle, exactly as live trading does.
        signals=signals,
        # Recorded funding per perpetual, settled at the candles holding it.
        funding=replay_funding(ctx.args, s) if s.simulation.funding else None,
    )
    gateway = sim_gateway(sim, engine)
    if isinstance(signals, PrecomputedSignals) and engine.quiet_exact and not s.learning.enabled:
        gateway.driver.enable_quiet_path(signals)
    # The strategy's columns over the whole archive, numba compilation (or its cache
    # load) included.
    timings["prepare_s"] = time.perf_counter() - started
    return Components(
        mode=ctx.args.mode,
        engine=engine,
        gateway=gateway,
        feed=replay,
        clock=clock,
        state=RunState(s, engine, ctx.audit),
        frames=frames if plan is None else {},  # a segment is not the archive
        pair_schedule=pair_schedule,
        forced_params=forced,
        timings=timings,
    )


def _whole_feed(
    ctx: BuildContext,
    frames: dict[str, pd.DataFrame],
    clock: ReplayClock,
    start_ms: int | None,
    end_ms: int | None,
    warmup: int,
) -> ReplayFeed:
    backtest = ctx.args.mode == "backtest"
    return ReplayFeed(
        frames,
        ctx.settings.strategy.timeframe,
        clock,
        speed=0.0 if backtest else ctx.settings.simulation.replay_speed,
        start_ms=start_ms,
        end_ms=end_ms,
        # A backtest's direct loop yields to the event loop every 1,024 candles, not
        # every candle (signals still get through; ~1.3x faster).
        yield_every=1024 if backtest else 1,
        progress=ctx.progress,
        # A paced replay starts trading at once: the warm-up is not worth watching.
        unpaced=warmup * len(frames),
    )


def _first_closes(frames: dict[str, pd.DataFrame]) -> dict[str, float]:
    return {pair: float(frame["close"].iloc[0]) for pair, frame in frames.items()}


class _SegmentPlan(NamedTuple):
    windows: list[tuple[int, int]]
    load: Callable[[int, int], dict[str, pd.DataFrame]]
    total: int  # candles in all segments
    first: int  # the first candle's open time
    first_closes: dict[str, float]  # each archive's first close (its market's rules)

    def feed(
        self,
        timeframe: str,
        clock: ReplayClock,
        start_ms: int | None,
        progress: Callable[[int, int], None] | None,
    ) -> SegmentedReplayFeed:
        # Unpaced, yielding to the loop every 1,024 candles (as a whole backtest's feed).
        return SegmentedReplayFeed(
            self.windows, self.load, self.total, timeframe, clock, start_ms=start_ms,
            progress=progress, yield_every=1024,
        )  # fmt: skip


def _segments(ctx: BuildContext, start_ms: int | None, end_ms: int | None) -> _SegmentPlan | None:
    """Return how a backtest replays its archives a segment at a time; None: whole.

    Only what a segment at a time replays exactly as the whole archive: archives of ours
    (read a time range at a time), one strategy whose rows a kernel computes with its state
    carried from segment to segment, and nothing reading the whole archive (a dynamic pair
    list, learning, an HTML report's price charts). Segments are `replay_segment_rows`
    candles of the timeframe long; worth it only when an archive holds more than one.
    """
    s, args = ctx.settings, ctx.args
    rows, timeframe = s.storage.replay_segment_rows, s.strategy.timeframe
    if rows <= 0 or s.pairs.dynamic or s.learning.enabled or getattr(args, "report_html", None):
        return None
    sleeves, strategy, _, _ = strategies(ctx)
    if sleeves or not PrecomputedSignals.segmentable(strategy):
        return None
    paths = own_archives(s, s.traded_pairs(), timeframe, args.data)
    if paths is None:
        return None
    plan = archive_segments(paths, rows, timeframe, start_ms, end_ms, s.storage.read_chunk_rows)
    return None if plan is None else _SegmentPlan(*plan)


async def build_paper(ctx: BuildContext, *, probe: bool = False) -> Components:
    """Assemble paper trading on the live feed: the exchange's candles, simulated fills.

    With `probe` (feed auto) an unreachable exchange fails fast instead of retrying.
    """
    s = ctx.settings
    exchange, closers = await _open_exchange(ctx, probe=probe)
    try:
        clock, feed, sleeves, strategy, forced = await _exchange_feed(ctx, exchange)
        sim = simulated_exchange(s, clock, markets=dict(exchange.markets))
        cash = Decimal(str(s.simulation.starting_balance))
        engine = _feed_engine(ctx, exchange, feed, clock, sleeves, strategy, sim, cash)
        gateway = sim_gateway(sim, engine)
        engine.set_pairs(feed.start_pairs)
    except BaseException:
        await exchange.close()
        raise
    return _feed_components(ctx, exchange, engine, gateway, feed, clock, closers, forced)


async def build_live(ctx: BuildContext) -> Components:
    """Assemble live trading: real orders to the exchange, journaled first; its feed and clock.

    The start-up reconciliation against the journal follows in `runner.Daemon`, once the
    run's saved risk state is back.
    """
    from trade_store import TradeStore

    s = ctx.settings
    exchange, closers = await _open_exchange(ctx, probe=False)
    try:
        clock, feed, sleeves, strategy, forced = await _exchange_feed(ctx, exchange)
        store = TradeStore.open(s.storage.effective_database_url, bot_id=f"{s.exchange.name}-live")
        closing: list[Any] = []  # the executor's journal thread, then the store

        async def close_store() -> None:
            for executor in closing:
                await executor.close()
            await asyncio.to_thread(store.close)

        closers.append(("store", close_store))
        balances = await exchange.fetch_balance()
        quote = s.simulation.quote_currency
        cash = balances[quote].total if quote in balances else Decimal(0)
        engine = _feed_engine(
            ctx, exchange, feed, clock, sleeves, strategy, exchange, cash, store=store
        )
        closing.append(engine.executor)
        engine.set_pairs(feed.start_pairs)
    except BaseException:
        await exchange.close()
        raise
    gateway = LiveGateway(exchange, store)
    return _feed_components(ctx, exchange, engine, gateway, feed, clock, closers, forced)


def _feed_engine(
    ctx: BuildContext,
    exchange: Exchange,
    feed: ExchangeFeed,
    clock: ExchangeClock,
    sleeves: Sleeves,
    strategy: Strategy,
    gateway: OrderGateway,
    cash: Decimal,
    *,
    store: TradeStore | None = None,
) -> Engine:
    # The engine of a run on the exchange's feed (paper or live): only the gateway, the
    # cash and the journal differ.
    return build_engine(
        ctx,
        sleeves=sleeves,
        clock=clock,
        strategy=strategy,
        gateway=gateway,
        market_for=exchange.market,
        cash=cash,
        store=store,
        data=feed.data,
        max_lag_ms=timeframe_to_ms(ctx.settings.strategy.timeframe),
        extra_status=lambda: {"rate_limit_budget": exchange.rate_limit_budget()},
    )


def _feed_components(
    ctx: BuildContext,
    exchange: Exchange,
    engine: Engine,
    gateway: SimGateway | LiveGateway,
    feed: ExchangeFeed,
    clock: ExchangeClock,
    closers: list[Closer],
    forced: ApprovedParams | None,
) -> Components:
    # The components of a run on the exchange's feed (paper or live).
    state = RunState(ctx.settings, engine, ctx.audit, rate_limit_budget=exchange.rate_limit_budget)
    return Components(
        mode=ctx.args.mode,
        engine=engine,
        gateway=gateway,
        feed=feed,
        clock=clock,
        state=state,
        closers=tuple(closers),
        forced_params=forced,
    )


async def _open_exchange(ctx: BuildContext, *, probe: bool) -> tuple[Exchange, list[Closer]]:
    # The exchange session, with its closer first in the run's closers.
    from exchange import Exchange

    exchange = Exchange(ctx.settings.exchange, retry_attempts=2 if probe else 5)
    await exchange.open()
    return exchange, [("exchange", exchange.close)]


async def _exchange_feed(
    ctx: BuildContext, exchange: Exchange
) -> tuple[ExchangeClock, ExchangeFeed, Sleeves, Strategy, ApprovedParams | None]:
    # The exchange's clock and candle feed, warmed up on the pairs to trade (the ranked
    # ones when pairs are dynamic), with the strategies that will decide on them.
    s = ctx.settings
    clock = ExchangeClock(exchange)
    sleeves, strategy, window, forced = strategies(ctx)
    # Candles from the exchange are archived (flushed with each state snapshot), so
    # backtests and the parity audit can replay exactly what the bot saw.
    data = DataManager(window=window, store=CandleStore(s.storage.data_dir))
    pairs = s.traded_pairs()
    top_pairs = None
    if s.pairs.dynamic:
        from top_pairs import TopPairs

        top_pairs = TopPairs(
            exchange,
            s.pairs,
            state_path=s.storage.data_dir / "state" / "pairs.json",
            clock=clock,
            market_type=s.exchange.market_type,
        )
        pairs = list((await top_pairs.current()).pairs)
    feed = ExchangeFeed(
        exchange,
        data,
        timeframe=s.strategy.timeframe,
        window=window,
        pairs=pairs,
        top_pairs=top_pairs,
    )
    await feed.warm_up(pairs, strategy, sleeves)
    # Every closed candle from here on, exactly once, gaps refilled from REST.
    return clock, feed, sleeves, strategy, forced
