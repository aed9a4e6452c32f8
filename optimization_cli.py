"""The `--mode optimize` command line: load candles, run the job, write and print the report.

Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pandas as pd
import structlog

from data_manager import load_frames
from error_handler import ConfigError
from genetic_search import SearchOptions, SearchResult
from optimization_backends import BacktestEvaluator
from optimization_run import OptimizationReport, run_optimization
from optimization_scoring import OBJECTIVE_METRIC, Evaluation, Segment, Status
from search_space import SearchSpace, _strategy_class, strategy_feasibility, strategy_space
from utils.progress import progress_bar
from utils.utilities import atomic_write, ms_to_datetime
from walk_forward_analysis import WalkForwardReport, Window, time_axis, walk_forward_windows


if TYPE_CHECKING:
    from config import Settings


log = structlog.get_logger(__name__)

WF_WINDOWS: Final = 4
WF_TRAIN_RATIO: Final = 3.0
MIN_TEST_ROWS: Final = 100
TOP_ROWS: Final = 10


def _cli_windows(n_rows: int) -> list[Window]:
    try:
        windows = walk_forward_windows(n_rows, windows=WF_WINDOWS, train_ratio=WF_TRAIN_RATIO)
    except ConfigError:
        return []
    return windows if windows[0].test_end - windows[0].test_start >= MIN_TEST_ROWS else []


R = TypeVar("R")


def initial_point(settings: Settings, strategy: str, space: SearchSpace) -> dict[str, Any]:
    """Return the search's first candidate: the strategy's defaults, then the configured."""
    configured = {k: v for k, v in settings.strategy.params.items() if k in space.names}
    defaults = {k: float(p.default) for k, p in _strategy_class(strategy).parameters.items()}
    return {**defaults, **configured}


def generation_reporter(
    progress: Any, task: Any, loop: asyncio.AbstractEventLoop, strategy: str, metric: str
) -> Callable[[int, int, float | None], None]:
    """Return the search's per-generation callback that moves the progress bar.

    The search runs in a worker thread; the bar is updated on the event loop's thread.
    """

    def on_generation(done: int, planned: int, best: float | None) -> None:
        text = f"optimising {strategy}" + (
            f"  best {metric} {best:.4g}" if best is not None else ""
        )
        loop.call_soon_threadsafe(
            functools.partial(
                progress.update, task, completed=done, total=planned, description=text
            )
        )

    return on_generation


def _output_path(directory: Path, stem: str, now: datetime) -> Path:
    base = f"{stem}-{now:%Y%m%dT%H%M%SZ}"
    path = directory / f"{base}.json"
    counter = 2
    while path.exists():
        path = directory / f"{base}-{counter}.json"
        counter += 1
    return path


async def run_optimize_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run `--mode optimize`: search, walk forward, print a ranked table, write JSON.

    With `optimization.method` "nsga2" (the default) the Pareto search, walk-forward gate
    and approval run instead (`pareto_cli.run_pareto_cli`); "genetic" is the one-score
    search described here.

    Reads `args.strategy`, `args.pairs` (comma-separated), `args.timeframe`, `args.data`,
    `args.timerange` and `args.summary_json`, each defaulting to `settings.strategy`.
    The search runs in a worker thread (its Dask client calls block), so the loop keeps
    drawing the progress bar; a cancelled run stops before the next generation. The
    result goes atomically to `<data_dir>/optimize/<strategy>-<UTC time>.json` and to
    `--summary-json` when given. Returns 0 when a feasible candidate was found, else 1.

    Raises:
        ConfigError: bad strategy, pairs, timerange or scheduler address.
        DataError: no candles to optimise on.
    """
    strategy = getattr(args, "strategy", None) or settings.strategy.name
    pairs = _requested_pairs(args, settings)
    timeframe = getattr(args, "timeframe", None) or settings.strategy.timeframe
    space = strategy_space(strategy)
    loaded = await asyncio.to_thread(
        load_frames,
        settings,
        pairs,
        timeframe,
        data=getattr(args, "data", None),
        timerange=getattr(args, "timerange", None),
    )
    if settings.optimization.method == "nsga2":
        from pareto_cli import run_pareto_cli

        return await run_pareto_cli(
            args,
            settings,
            strategy=strategy,
            pairs=pairs,
            timeframe=timeframe,
            space=space,
            loaded=loaded,
        )
    frames = {pair: frame for pair, (frame, _) in loaded.items()}
    options = SearchOptions.from_settings(settings.optimization)
    evaluator = BacktestEvaluator.from_settings(
        settings, strategy, timeframe, one_score=options.objective == "score"
    )
    windows = _cli_windows(len(time_axis(frames)))
    started = datetime.now(UTC)
    report = await search_in_thread(
        run_optimization,
        strategy,
        evaluator,
        frames,
        space,
        options,
        metric=options.objective,
        windows=windows,
        initial=[initial_point(settings, strategy, space)],
    )
    document = _document(
        report,
        options,
        evaluator,
        loaded,
        created=started,
        strategy=strategy,
        pairs=pairs,
        timeframe=timeframe,
        timerange=getattr(args, "timerange", None),
    )
    stem = Path(strategy).stem if strategy.endswith(".py") else strategy
    path = _output_path(settings.storage.data_dir / "optimize", stem, started)
    await write_documents(path, document, getattr(args, "summary_json", None))
    print_report(report, space, strategy=strategy, path=path)
    log.info("optimization_written", path=str(path))
    return 0 if report.search is not None and report.search.best is not None else 1


def _requested_pairs(args: argparse.Namespace, settings: Settings) -> list[str]:
    # `--pairs` (comma-separated), else the strategy's configured pairs.
    pairs_text = getattr(args, "pairs", None)
    return (
        [p.strip() for p in pairs_text.split(",") if p.strip()]
        if pairs_text
        else list(settings.strategy.pairs)
    )


async def search_in_thread(
    run: Callable[..., R],
    strategy: str,
    evaluator: BacktestEvaluator,
    frames: dict[str, pd.DataFrame],
    space: SearchSpace,
    options: SearchOptions | Any,
    *,
    metric: str,
    **kwargs: Any,
) -> R:
    """Run a search (`run_optimization` or `run_pareto`) in a worker thread, with a bar.

    The search's Dask client calls block, so it runs in a thread while the loop draws the
    progress bar (one step per generation, `metric` the figure shown); a cancelled run
    stops before the next generation.
    """
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    with progress_bar(elapsed=True) as progress:
        task = progress.add_task(f"optimising {strategy}", total=options.generations)
        on_generation = generation_reporter(progress, task, loop, strategy, metric)
        try:
            return await asyncio.to_thread(
                run,
                evaluator,
                frames,
                space,
                options,
                feasible=strategy_feasibility(strategy),
                stop=stop,
                on_generation=on_generation,
                **kwargs,
            )
        except asyncio.CancelledError:
            stop.set()
            raise


def _document(
    report: OptimizationReport,
    options: SearchOptions,
    evaluator: BacktestEvaluator,
    loaded: Mapping[str, tuple[pd.DataFrame, str]],
    *,
    created: datetime,
    strategy: str,
    pairs: list[str],
    timeframe: str,
    timerange: str | None,
) -> dict[str, Any]:
    # The JSON report: the job, its candles, options and costs, then the results.
    return {
        "kind": "kestrel.optimize",
        "version": 1,
        "created": created.isoformat(),
        "strategy": strategy,
        "pairs": pairs,
        "timeframe": timeframe,
        "timerange": timerange,
        "data": data_range(loaded),
        "options": {
            "population": options.population,
            "generations": options.generations,
            "seed": options.seed,
            "objective": options.objective,
            "min_trades": options.min_trades,
            "time_budget_s": options.time_budget_s,
            "workers": report.workers,
            "scheduler": options.scheduler,
        },
        "costs": cost_profile(evaluator),
        "best": report.search.best.as_dict() if report.search and report.search.best else None,
        **report.as_dict(),
    }


async def write_documents(
    path: Path,
    document: dict[str, Any],
    summary_json: str | None,
    *,
    html: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Write the JSON report to `path`, then its HTML beside it, then `--summary-json`.

    Each write is atomic and runs off the event loop.
    """
    text = json.dumps(document, indent=2, default=str)
    await asyncio.to_thread(atomic_write, path, text)
    if html is not None:
        await asyncio.to_thread(atomic_write, path.with_suffix(".html"), html(document))
    if summary_json is not None:
        await asyncio.to_thread(atomic_write, Path(summary_json), text)


def data_range(loaded: Mapping[str, tuple[pd.DataFrame, str]]) -> dict[str, Any]:
    """Return each pair's candles as the report records them: source, count, first, last."""
    return {
        pair: {
            "source": source,
            "candles": len(frame),
            "first_ts": int(frame.index[0].value // 1_000_000),
            "last_ts": int(frame.index[-1].value // 1_000_000),
        }
        for pair, (frame, source) in loaded.items()
    }


def cost_profile(evaluator: BacktestEvaluator) -> dict[str, Any]:
    """Return the costs every backtest of the job paid, as the report records them."""
    return {
        "starting_balance": evaluator.starting_balance,
        "taker_fee": evaluator.taker_fee,
        "slippage_bps": evaluator.slippage_bps,
        "fill_at": evaluator.fill_at,
        "profile": "all_in",
    }


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2%}" if percent else f"{value:.4g}"


def _scored(e: Evaluation | None) -> str:
    # A dagger marks a score made on fewer trades than the minimum.
    if e is None or e.status not in (Status.OK, Status.FEW_TRADES):
        return "-" if e is None else str(e.status)
    return _fmt(e.objective) + ("\u2020" if e.status is Status.FEW_TRADES else "")


def _span(segment: Segment, fmt: str) -> str:
    start = "start" if segment.start_ms is None else f"{ms_to_datetime(segment.start_ms):{fmt}}"
    end = "end" if segment.end_ms is None else f"{ms_to_datetime(segment.end_ms):{fmt}}"
    return f"{start} \u2192 {end}"


def print_report(
    report: OptimizationReport, space: SearchSpace, *, strategy: str, path: Path | None = None
) -> None:
    """Print the ranked candidates, the walk-forward windows and the stop reason."""
    from rich.console import Console

    console = Console()
    search = report.search
    if search is not None:
        if search.best is None:
            console.print(f"[red]no feasible candidate for {strategy}[/]")
        if search.best is None or search.failed:
            for error in search.errors:
                console.print(f"candidates refused or failed: {error}", markup=False)
        console.print(_ranking_table(search, space, strategy))
        console.print(
            f"{search.evaluated} backtests, {search.infeasible} infeasible, "
            f"{search.failed} failed; {search.generations_run}/{search.generations_planned} "
            f"generations on {report.workers} worker(s) in {report.elapsed_s:.1f} s"
        )
    wf = report.walk_forward
    if wf is not None:
        console.print(_walk_forward_table(wf))
        spread = ", ".join(f"{k} {v.range_std:.0%}" for k, v in wf.stability.items())
        console.print(
            f"walk-forward efficiency {_fmt(wf.efficiency)} (out-of-sample mean "
            f"{_fmt(wf.out_of_sample_mean)} / in-sample mean {_fmt(wf.in_sample_mean)}); "
            f"out of sample positive in {wf.out_of_sample_positive:.0%} of windows; "
            f"chosen parameters' spread (std / range): {spread or '-'}; "
            "\u2020 fewer trades than the minimum"
        )
    if report.stopped == "time_budget":
        console.print("[yellow]time budget spent: stopped early, showing the best found so far[/]")
    elif report.stopped == "cancelled":
        console.print("[yellow]cancelled: showing the best found so far[/]")
    if path is not None:
        console.print(f"written to {path}")


def _ranking_table(search: SearchResult, space: SearchSpace, strategy: str) -> Any:
    from rich.table import Table

    rows = search.leaderboard[:TOP_ROWS]
    table = Table(title=f"{strategy}: best {len(rows)} by {search.objective}")
    extra = [m for m in ("sharpe", "total_return") if m != OBJECTIVE_METRIC[search.objective]]
    names = {"total_return": "return"}
    for column in ("#", *space.names, search.objective, *(names.get(m, m) for m in extra)):
        table.add_column(column, justify="right")
    for column in ("max dd", "trades", "status"):
        table.add_column(column, justify="right")
    for rank, e in enumerate(rows, 1):
        m = e.metrics
        table.add_row(
            str(rank),
            *(f"{e.params[n]:g}" for n in space.names),
            _fmt(e.objective, percent=search.objective == "return"),
            *(_fmt(m.get(k), percent=k == "total_return") for k in extra),
            _fmt(m.get("max_drawdown"), percent=True),
            str(e.n_trades),
            str(e.status),
        )
    return table


def _walk_forward_table(wf: WalkForwardReport) -> Any:
    from rich.table import Table

    first = wf.windows[0].train.start_ms or 0
    last = wf.windows[-1].test.start_ms or 0
    fmt = "%Y-%m-%d" if last - first > 2 * 86_400_000 else "%m-%d %H:%M"
    table = Table(title="walk-forward: in sample vs out of sample")
    for column in ("window", "train", "test", "params", "in sample", "out of sample", "oos trades"):
        # Parameter lists wrap rather than lose their values to an ellipsis.
        table.add_column(
            column, justify="right", overflow="fold" if column == "params" else "ellipsis"
        )
    for r in wf.windows:
        table.add_row(
            str(r.window.index),
            _span(r.train, fmt),
            _span(r.test, fmt),
            " ".join(f"{k}={v:g}" for k, v in r.in_sample.params.items()) if r.in_sample else "-",
            _scored(r.in_sample),
            _scored(r.out_of_sample),
            str(r.out_of_sample.n_trades) if r.out_of_sample else "-",
        )
    return table
