"""`--mode optimize` by default: Pareto search, walk-forward gate, reports, approval.

`run_pareto_cli` runs `pareto_run.run_pareto` with a progress bar and a checkpoint,
evaluates the out-of-sample gate, writes the approved-parameters file when it passes (or
with `--force`, logged as a warning), and writes the JSON document, the HTML report and
`--summary-json`. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import argparse
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
import structlog

from approved_params import GateResult, approved_path, evaluate_gate, write_approved
from error_handler import ConfigError
from optimization_backends import BacktestEvaluator
from optimization_cli import (
    cost_profile,
    data_range,
    initial_point,
    search_in_thread,
    write_documents,
)
from optimization_report import render_html
from optimization_scoring import PERIODS
from pareto_run import ParetoReport, recent_out_of_sample, run_pareto
from pareto_search import ParetoOptions
from search_space import SearchSpace
from walk_forward_analysis import Window, time_axis, walk_forward_windows


if TYPE_CHECKING:
    from config import OptimizationSettings, Settings


log = structlog.get_logger(__name__)

TRAIN_RATIO: Final = 3.0
MIN_TEST_ROWS: Final = 100


def cli_windows(n_rows: int, count: int, *, anchored: bool) -> list[Window]:
    """Return `count` walk-forward windows of at least MIN_TEST_ROWS test rows (or none)."""
    if count <= 0:
        return []
    try:
        windows = walk_forward_windows(
            n_rows, windows=count, train_ratio=TRAIN_RATIO, anchored=anchored
        )
    except ConfigError:
        return []
    return windows if windows[0].test_end - windows[0].test_start >= MIN_TEST_ROWS else []


def _stamp(directory: Path, stem: str, now: datetime) -> Path:
    base = directory / f"{stem}-{now:%Y%m%dT%H%M%SZ}"
    path, counter = base.with_suffix(".json"), 2
    while path.exists():
        path = directory / f"{base.name}-{counter}.json"
        counter += 1
    return path


async def run_pareto_cli(
    args: argparse.Namespace,
    settings: Settings,
    *,
    strategy: str,
    pairs: list[str],
    timeframe: str,
    space: SearchSpace,
    loaded: dict[str, tuple[pd.DataFrame, str]],
) -> int:
    """Run the default `--mode optimize` on loaded candles; return 0 when a point was chosen.

    Raises:
        ConfigError: bad settings or scheduler address.
    """
    opt = settings.optimization
    frames = {pair: frame for pair, (frame, _) in loaded.items()}
    options = ParetoOptions.from_settings(opt)
    evaluator = BacktestEvaluator.from_settings(
        settings, strategy, timeframe, periods=PERIODS, one_score=True
    )
    windows = cli_windows(len(time_axis(frames)), opt.windows, anchored=opt.anchored)
    stem = Path(strategy).stem if strategy.endswith(".py") else strategy
    out_dir = settings.storage.data_dir / "optimize"
    checkpoint = out_dir / f"{stem}-{timeframe}.checkpoint"
    started = datetime.now(UTC)
    report = await search_in_thread(
        run_pareto,
        strategy,
        evaluator,
        frames,
        space,
        options,
        metric=options.scalar,
        windows=windows,
        initial=[initial_point(settings, strategy, space)],
        checkpoint=checkpoint,
        sensitivity=opt.sensitivity,
    )
    if report.stopped == "completed":
        checkpoint.unlink(missing_ok=True)  # finished: the next run starts afresh
    loaded_range = data_range(loaded)
    gate = _gate(report, opt)
    document = {
        "kind": "kestrel.optimize",
        "version": 2,
        "method": "nsga2",
        "created": started.isoformat(),
        "strategy": strategy,
        "pairs": pairs,
        "timeframe": timeframe,
        "timerange": getattr(args, "timerange", None),
        "data": loaded_range,
        "options": {
            **_options_dict(options, report),
            "windows": len(windows),
            "anchored": opt.anchored,
        },
        "costs": cost_profile(evaluator),
        **report.as_dict(),
        "gate": gate.as_dict(),
        "approved": None,
    }
    path = _stamp(out_dir, stem, started)
    document["approved"] = _approve(
        settings,
        report,
        gate,
        strategy=strategy,
        timeframe=timeframe,
        pairs=pairs,
        data_range=loaded_range,
        force=bool(getattr(args, "force", False)),
        source=path,
    )
    await write_documents(path, document, getattr(args, "summary_json", None), html=render_html)
    print_pareto_report(report, document, path=path)
    log.info("optimization_written", path=str(path))
    return 0 if report.best is not None else 1


def _gate(report: ParetoReport, settings: OptimizationSettings) -> GateResult:
    wf, of = report.walk_forward, report.overfitting
    return evaluate_gate(
        out_of_sample=wf.out_of_sample_mean if wf else None,
        recent_out_of_sample=recent_out_of_sample(wf.folds) if wf else None,
        efficiency=wf.efficiency if wf else None,
        dsr=of.dsr if of else None,
        pbo=of.pbo if of else None,
        settings=settings,
    )


def _options_dict(options: ParetoOptions, report: ParetoReport) -> dict[str, Any]:
    return {
        "population": options.population,
        "generations": options.generations,
        "seed": options.seed,
        "objectives": [list(o) for o in options.objectives],
        "scalar": options.scalar,
        "min_trades": options.min_trades,
        "time_budget_s": options.time_budget_s,
        "workers": report.workers,
        "scheduler": options.scheduler,
    }


def _approve(
    settings: Settings,
    report: ParetoReport,
    gate: GateResult,
    *,
    strategy: str,
    timeframe: str,
    pairs: list[str],
    data_range: dict[str, Any],
    force: bool,
    source: Path,
) -> dict[str, Any] | None:
    """Write the approved-parameters file for a finished search's choice that passed the gate.

    `force` approves it past a failed gate. Returns what the report records under
    `approved` (None: nothing approved, with a warning when a point was chosen).
    """
    if report.best is not None and (gate.passed or force) and report.stopped == "completed":
        target = approved_path(settings.storage.data_dir, strategy)
        write_approved(
            target,
            strategy=strategy,
            timeframe=timeframe,
            pairs=pairs,
            params=report.best.params,
            gate=gate,
            data_range=data_range,
            forced=force,
            source=str(source),
        )
        _log_approval(strategy, target, gate)
        return {"path": str(target), "forced": not gate.passed}
    if report.best is not None:
        log.warning("parameters_not_approved", strategy=strategy, failures=gate.failures)
    return None


def _log_approval(strategy: str, target: Path, gate: GateResult) -> None:
    if gate.passed:
        log.info("parameters_approved", strategy=strategy, path=str(target))
        return
    # No event bus runs in a batch job: this warning is the alert. The file says `forced`,
    # and a daemon that loads it warns again and alerts the operator (daemon_operator).
    log.warning("approval_forced", strategy=strategy, path=str(target), failures=gate.failures)


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def print_pareto_report(report: ParetoReport, document: dict[str, Any], *, path: Path) -> None:
    """Print the front, the folds, the verdicts and where the reports went."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    search = report.search
    if report.best is None:
        console.print("[red]no feasible candidate[/]")
    if search is not None and search.front:
        table = Table(title=f"Pareto front ({len(search.front)} points)")
        names = list(search.front[0].objectives)
        for column in ("params", *names, "score", "trades"):
            table.add_column(column, justify="right")
        for t in search.front[:15]:
            mark = "* " if report.best is not None and t.params == report.best.params else ""
            table.add_row(
                mark + " ".join(f"{k}={v:g}" for k, v in t.params.items()),
                *(_fmt(t.objectives[n]) for n in names),
                _fmt(t.score),
                str(t.n_trades),
            )
        console.print(table)
        console.print(f"{search.evaluated} backtests; * chosen (best neighbourhood score)")
    wf = report.walk_forward
    if wf is not None:
        colour = "green" if wf.verdict == "robust" else "red"
        console.print(f"[{colour}]walk-forward {wf.verdict}[/]: {wf.message}", markup=True)
    of = report.overfitting
    if of is not None:
        console.print(
            f"deflated Sharpe {_fmt(of.dsr)} over {of.n_trials} trials; PBO {_fmt(of.pbo)}"
        )
    sens = report.sensitivity
    if sens is not None and sens.knife_edge:
        console.print(
            f"[red]knife-edge optimum[/]: neighbours keep {_fmt(sens.retained)} of its score"
        )
    gate = document["gate"]
    approved = document.get("approved")
    if approved:
        note = " [red](FORCED past a failed gate)[/]" if approved["forced"] else ""
        console.print(f"[green]approved[/] -> {approved['path']}{note}")
    else:
        console.print(
            "[yellow]not approved[/]: " + ("; ".join(gate["failures"]) or "nothing chosen")
        )
    console.print(f"written to {path} and {path.with_suffix('.html').name}")
