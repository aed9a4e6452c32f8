"""The backtest's fast engine: when it may stand in for the replay, and its run.

Part of `runner` (`run_backtest` asks `fast_engine_blockers` first: `--engine auto`, the
default, takes the fast path where nothing blocks it, `--engine fast` insists on it).
The fast path (`trade_simulator`: `fast_backtest` under the `all_in` profile, `run_standard`
under the standard one) takes the replay's decisions on the replay's own signal flags
(`signal_sources.replay_flags`) and gives the same summary; what it does not model is
named here, and the replay runs those.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import structlog

from config import Settings
from data_manager import (
    ArchiveSegments,
    archive_rows,
    archive_segments,
    index_ms,
    own_archives,
    replay_funding,
)
from data_manager import replay_frames as load_frames
from error_handler import ConfigError
from strategy import KernelStrategy, load_strategy
from utils.utilities import parse_timerange, timeframe_to_ms


if TYPE_CHECKING:
    import pandas as pd

    from fast_path import BacktestResult
    from fast_segments import SegmentRules
    from strategy import Strategy


log = structlog.get_logger(__name__)


def fast_engine_blockers(s: Settings, args: argparse.Namespace | None = None) -> list[str]:
    """Return why the fast path cannot stand in for this backtest's replay (empty: it can).

    The fast path takes the replay's decisions for one pair under the `all_in` profile
    (`fast_path_blockers`) or, on a spot pair, the standard one (`standard_blockers`);
    what else the replay's engine does to decisions (anomaly pauses, the pattern filter,
    a `--duration`, the model registry's policy) is named here. Neither writes what only
    a running daemon writes: its state file, Telegram alerts, the dashboard.
    """
    from trade_simulator import fast_path_blockers, standard_blockers

    reasons = _engine_blockers(s) + (_run_blockers(s, args) if args is not None else [])
    if reasons and s.strategy.name == "rl":
        return reasons
    strategy = load_strategy(s.strategy.name, s.strategy.params)
    linear = s.exchange.market_type == "linear" or any(":" in p for p in s.strategy.pairs)
    reasons += fast_path_blockers(
        risk_profile=s.risk.profile,
        pairs=s.strategy.pairs,
        timeframe=s.strategy.timeframe,
        slippage_model=s.simulation.slippage_model,
        latency_ms=s.simulation.latency_ms,
        dynamic_pairs=s.pairs.dynamic,
        leverage=s.risk.max_leverage if linear else 1.0,
        shorts=not s.strategy.long_only and strategy.can_short,
        margin_mode=s.simulation.margin_mode,
    )
    if s.risk.profile == "standard":
        reasons += standard_blockers(linear=linear, can_short=strategy.can_short)
    return reasons


def _engine_blockers(s: Settings) -> list[str]:
    # What the replay's engine does to decisions besides the strategy and risk.
    reasons = []
    if s.allocation.strategies:
        reasons.append("several strategies share the account (allocation.strategies)")
    if s.anomaly.enabled and s.anomaly.in_replay:
        reasons.append("the anomaly watch pauses entries in replays (anomaly.in_replay)")
    if s.strategy.pattern_filter:
        reasons.append("the pattern filter vetoes entries (strategy.pattern_filter)")
    if s.strategy.name == "rl":
        reasons.append("--strategy rl trades the model registry's champion")
    return reasons


def _run_blockers(s: Settings, args: argparse.Namespace) -> list[str]:
    # What of the command line only the replay takes.
    reasons = []
    if getattr(args, "duration", None) is not None:
        reasons.append("--duration stops the replay early")
    if getattr(args, "funding", None) is not None and s.risk.profile != "all_in":
        reasons.append("--funding FILE is read by the replay")
    if getattr(args, "engine", "auto") != "fast" and not _segmentable(s) and _streamed(s, args):
        reasons.append(
            "an archive longer than storage.replay_segment_rows: the replay streams it a"
            " segment at a time in flat memory, the fast path would hold it whole (it reads"
            " archives a segment at a time only under the standard profile)"
        )
    return reasons


def _streamed(s: Settings, args: argparse.Namespace) -> bool:
    # Whether the replay would read the archives a segment at a time (`mode_builders`):
    # not a strategy whose rows a kernel cannot carry from segment to segment.
    from signal_sources import PrecomputedSignals

    rows = s.storage.replay_segment_rows
    if rows <= 0 or getattr(args, "report_html", None):
        return False
    if not PrecomputedSignals.segmentable(load_strategy(s.strategy.name, s.strategy.params)):
        return False
    paths = own_archives(s, s.traded_pairs(), s.strategy.timeframe, getattr(args, "data", None))
    return paths is not None and any(archive_rows(p, None, None)[0] > rows for p in paths.values())


def _segmentable(s: Settings) -> bool:
    # Whether the fast path reads long archives a segment at a time (`fast_segments`): the
    # standard profile, its strategy's kernel carried from segment to segment.
    from signal_sources import PrecomputedSignals

    return s.risk.profile == "standard" and PrecomputedSignals.segmentable(
        load_strategy(s.strategy.name, s.strategy.params)
    )


def _segments(
    s: Settings, args: argparse.Namespace, timerange: tuple[int | None, int | None]
) -> ArchiveSegments | None:
    # How the fast path reads the archive a segment at a time; None: whole.
    rows = s.storage.replay_segment_rows
    if rows <= 0 or getattr(args, "report_html", None) or not _segmentable(s):
        return None
    paths = own_archives(s, s.traded_pairs(), s.strategy.timeframe, getattr(args, "data", None))
    if paths is None:
        return None
    # A segment holds every pair's candles of its time span: a quarter of one pair's
    # replay segment in all (the rows a segment's copies hold), but at least 65,536 rows
    # a pair (each read of an archive costs ~10 ms whatever its length). Ten pairs of
    # 1.2M candles: 480 MiB peak and 2.9 s reading at this length, 443 MiB and 12.5 s at
    # an eighth, 539 MiB and 2.2 s at a whole replay segment.
    span = max(rows // (4 * len(paths)), min(rows, 65_536))
    timeframe, chunk = s.strategy.timeframe, s.storage.read_chunk_rows
    return archive_segments(paths, rows, timeframe, *timerange, chunk, span_rows=span)


def backtest_window(s: Settings) -> int:
    """Return the data window a backtest's engine keeps per pair (`assembly`)."""
    warmup = load_strategy(s.strategy.name, s.strategy.params).warmup
    return max(2 * warmup, s.strategy.warmup_candles)


def fast_backtest_run(
    args: argparse.Namespace,
    s: Settings,
    timings: dict[str, float],
    started: float,
    *,
    forced: bool,
) -> BacktestResult | None:
    """Run the backtest on the fast path; None when the replay must run it instead.

    None: the archive or the run met what only the replay models (a refused candle, a
    protective stop under the minimum notional), or the fast path failed; with `forced`
    (`--engine fast`) those raise instead.
    """
    start_ms, end_ms = None, None
    if args.timerange:
        try:
            start_ms, end_ms = parse_timerange(args.timerange)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    plan = _segments(s, args, (start_ms, end_ms))
    if plan is not None:
        return _segmented_run(plan, s, (start_ms, end_ms), timings, started, forced=forced)
    frames = load_frames(args, s)
    timings["load_s"] = time.perf_counter() - started
    defect = next((d for f in frames.values() if (d := archive_defect(f)) is not None), None)
    if defect is not None:
        if forced:
            raise ConfigError(f"--engine fast cannot run this backtest: {defect}")
        log.info("backtest_fast_path_left", reason=defect)
        return None
    strategy = load_strategy(s.strategy.name, s.strategy.params)
    # What is built so far (imports, settings, the archive) lives for the run: out of the
    # cyclic collector's generations, as the daemon keeps its start-up heap (`Daemon`), so
    # neither the run's collections nor the interpreter's exit walk it (0.4 s at exit).
    gc.freeze()
    result = _guarded(
        lambda: _fast_run(strategy, frames, s, args, (start_ms, end_ms)), forced=forced
    )
    if result is None:
        return None
    # The report draws the whole archives' closes, as the replay's does.
    step = timeframe_to_ms(s.strategy.timeframe)
    prices = {p: (index_ms(f) + step, f["close"].to_numpy()) for p, f in frames.items()}
    return dataclasses.replace(result, prices=prices)


def _segmented_run(
    plan: ArchiveSegments,
    s: Settings,
    timerange: tuple[int | None, int | None],
    timings: dict[str, float],
    started: float,
    *,
    forced: bool,
) -> BacktestResult | None:
    # Long archives a time segment at a time (`fast_segments`); None: the replay runs.
    from signal_sources import replay_flags
    from trade_simulator import run_segments

    read = [time.perf_counter() - started]  # the seconds spent reading the archives

    def load(window: tuple[int, int]) -> dict[str, pd.DataFrame]:
        begun = time.perf_counter()
        frames = plan.load(*window)
        read[0] += time.perf_counter() - begun
        return frames

    strategy = load_strategy(s.strategy.name, s.strategy.params)
    assert isinstance(strategy, KernelStrategy)  # `_segmentable`
    carries = {pair: strategy.carry() for pair in plan.first_closes}
    rules = segment_rules(s, strategy, timerange)
    gc.freeze()  # as `fast_backtest_run`
    try:
        return _guarded(
            lambda: run_segments(
                rules,
                map(load, plan.windows),  # keeps no segment once handed over
                lambda pair, frame: replay_flags(strategy, frame, carries[pair]),
                first_closes=plan.first_closes,
                total=plan.total,
                defect=archive_defect,
            ),
            forced=forced,
        )
    finally:
        timings["load_s"] = read[0]


def segment_rules(
    s: Settings, strategy: Strategy, timerange: tuple[int | None, int | None] = (None, None)
) -> SegmentRules:
    """Return what a segmented fast-path run's books are built with, from the settings."""
    from trade_simulator import SegmentRules

    return SegmentRules(
        strategy,
        s.strategy.timeframe,
        s.risk,
        backtest_window(s),
        s.simulation.starting_balance,
        s.simulation.taker_fee,
        s.simulation.slippage_bps,
        returns_window=s.risk.correlation_window,
        start_ms=timerange[0],
        end_ms=timerange[1],
        fill_at=s.simulation.fill_at,
    )


def _guarded(run: Callable[[], BacktestResult], *, forced: bool) -> BacktestResult | None:
    # `run`'s result; None where it met what only the replay models, or failed (logged).
    # Insisted on (`--engine fast`), those raise: the first as a ConfigError saying what.
    from trade_simulator import unsupported

    try:
        return run()
    except Exception as e:
        if forced and unsupported(e):
            raise ConfigError(f"--engine fast cannot run this backtest: {e}") from e
        if forced:
            raise
        if unsupported(e):
            log.info("backtest_fast_path_left", reason=str(e))
        else:  # a fault of the fast path: the replay still gives the run its answer
            log.exception("backtest_fast_path_failed")
        return None


def _fast_run(
    strategy: Strategy,
    frames: dict[str, pd.DataFrame],
    s: Settings,
    args: argparse.Namespace,
    timerange: tuple[int | None, int | None],
) -> BacktestResult:
    from signal_sources import replay_flags
    from trade_simulator import fast_backtest, run_portfolio, run_standard

    start_ms, end_ms = timerange
    if len(frames) > 1:
        return run_portfolio(
            strategy,
            frames,
            timeframe=s.strategy.timeframe,
            risk=s.risk,
            window=backtest_window(s),
            starting_balance=s.simulation.starting_balance,
            taker_fee=s.simulation.taker_fee,
            slippage_bps=s.simulation.slippage_bps,
            returns_window=s.risk.correlation_window,
            signals={pair: replay_flags(strategy, frame) for pair, frame in frames.items()},
            start_ms=start_ms,
            end_ms=end_ms,
            fill_at=s.simulation.fill_at,
        )
    ((pair, frame),) = frames.items()
    signals = replay_flags(strategy, frame)
    if s.risk.profile == "all_in":
        return fast_backtest(
            strategy,
            frame,
            pair=pair,
            timeframe=s.strategy.timeframe,
            starting_balance=s.simulation.starting_balance,
            taker_fee=s.simulation.taker_fee,
            slippage_bps=s.simulation.slippage_bps,
            fill_at=s.simulation.fill_at,
            start_ms=start_ms,
            end_ms=end_ms,
            funding=replay_funding(args, s).get(pair) if s.simulation.funding else None,
            max_leverage=s.risk.max_leverage,
            signals=signals,
        )
    return run_standard(
        strategy,
        frame,
        pair=pair,
        timeframe=s.strategy.timeframe,
        risk=s.risk,
        window=backtest_window(s),
        starting_balance=s.simulation.starting_balance,
        taker_fee=s.simulation.taker_fee,
        slippage_bps=s.simulation.slippage_bps,
        start_ms=start_ms,
        end_ms=end_ms,
        signals=signals,
        fill_at=s.simulation.fill_at,
    )


def archive_defect(frame: pd.DataFrame) -> str | None:
    """Return what in `frame` the replay's data window would refuse (None: nothing).

    A row outside `0 < low <= open, close <= high < inf` or a volume outside `[0, inf)`,
    and an open time not after the last: the replay refuses such a candle (it gets no
    match, no equity point, no decision); the fast paths simulate every row.
    """
    o, h, lo, c, v = (
        frame[k].to_numpy(np.float64) for k in ("open", "high", "low", "close", "volume")
    )
    with np.errstate(invalid="ignore"):
        valid = (lo > 0) & (lo <= o) & (o <= h) & (h < np.inf) & (lo <= c) & (c <= h)
        valid &= (v >= 0) & (v < np.inf)
    if not valid.all():
        return f"{int((~valid).sum())} candles the replay refuses (prices or volume out of range)"
    ts = frame.index.asi8
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        return "open times not strictly increasing"
    return None
