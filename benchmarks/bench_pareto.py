"""The Pareto optimiser: throughput, overhead over bare pymoo, memory, and Optuna on ZDT1.

* NSGA-II evaluations per second, sma_cross on a seeded random walk of 100,000 one-minute
  candles (each evaluation a fast-path backtest with 64 per-period returns and the one
  score, as `--mode optimize` runs it; also in process without the score), population
  32 x 4 generations, best of 3: in process (1 worker), on a Dask `LocalCluster` of 2
  worker processes, and through a `tcp://` scheduler address (a separate 2-worker cluster,
  as a remote one is used). Start-up and a warm-up generation (imports, numba caches) are
  excluded. On a shared two-core machine two workers get no more CPU than one process.
* Overhead per evaluation against bare pymoo: ZDT1 (30 variables, a vectorised numpy
  evaluation that costs almost nothing) for 100 x 100 generations, through our
  `ParetoSearch` + in-process backend (grid snapping, constraints, trials, reservoir,
  per-candidate job dispatch) against pymoo's own ask/tell loop with the same algorithm.
* Peak traced memory (tracemalloc) of a search over 5,000 evaluations against one over
  1,000 evaluations, each trial with 64 per-period returns: flat means a ratio near 1.
* NSGA-II on ZDT1 against Optuna's `NSGAIISampler` at equal evaluations (50 x 60 = 3,000):
  inverted generational distance to pymoo's reference front (lower is better) and time.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

# The seeded one-minute random walk every backtest benchmark uses.
from benchmarks.bench_backtest import candles as _walk


PAIR = "BTC/USDT"
CANDLES = 100_000
REPEATS = 3
N_VAR = 30


def zdt1(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Return ZDT1's objectives as metrics (30 variables)."""
    x = np.fromiter(params.values(), dtype=np.float64, count=N_VAR)
    g = 1 + 9 * float(x[1:].sum()) / (N_VAR - 1)
    return {"f1": float(x[0]), "f2": g * (1 - np.sqrt(x[0] / g)), "sharpe": 0.0, "n_trades": 1.0}


def zdt1_returns(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Return ZDT1's objectives plus 64 per-period returns, as a backtest reports them."""
    from optimization_scoring import with_periods

    x = np.fromiter(params.values(), dtype=np.float64, count=N_VAR)
    returns = np.resize(x - 0.5, 64) / 100
    return with_periods(zdt1(params, frame, pair=pair, start_ms=start_ms), returns)


def _zdt_space() -> Any:
    from search_space import Dimension, SearchSpace

    return SearchSpace(tuple(Dimension(f"x{i:02d}", 0.0, 1.0, integer=False) for i in range(N_VAR)))


def _options(population: int, generations: int, **extra: Any) -> Any:
    from pareto_search import ParetoOptions

    return ParetoOptions(
        population=population,
        generations=generations,
        objectives=(("f1", "min"), ("f2", "min")),
        min_trades=0,
        **extra,
    )


def _drive(search: Any, backend: Any, generations: int | None = None) -> None:
    from optimization_scoring import Segment
    from pareto_search import drive_pareto
    from utils.utilities import WallClock

    drive_pareto(
        [(search, Segment())],
        backend,
        time_budget_s=1e9,
        clock=WallClock(),
        max_generations=generations,
    )


# -- Throughput on 100k candles --------------------------------------------------------------


def _throughput(
    kind: str, frame: pd.DataFrame, *, one_score: bool = True
) -> tuple[float, int, str]:
    from config import RewardSettings
    from optimization_backends import BacktestEvaluator, DaskBackend, InProcessBackend
    from pareto_search import ParetoOptions, ParetoSearch
    from search_space import strategy_feasibility, strategy_space

    evaluator = BacktestEvaluator(
        "sma_cross",
        "1m",
        slippage_bps=2.0,
        periods=64,
        reward=RewardSettings() if one_score else None,
    )
    frames = {PAIR: frame}
    cluster = None
    note = ""
    if kind == "in-process":
        backend: Any = InProcessBackend(evaluator, frames)
    elif kind == "local":
        backend = DaskBackend(evaluator, frames, workers=2)
    else:
        import dask
        import dask.distributed

        dist: Any = dask.distributed  # untyped
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = dist.LocalCluster(
                n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
            )
        backend = DaskBackend(evaluator, frames, scheduler=cluster.scheduler_address)
        note = cluster.scheduler_address
    try:
        options = ParetoOptions(
            population=32, generations=4, seed=3, scalar="score" if one_score else "sharpe"
        )
        space = strategy_space("sma_cross")
        feasible = strategy_feasibility("sma_cross")
        _drive(ParetoSearch(space, options, feasible=feasible), backend, 1)  # warm-up
        best = 0.0
        count = 0
        for _ in range(REPEATS):
            search = ParetoSearch(space, options, feasible=feasible)
            started = time.perf_counter()
            _drive(search, backend)
            elapsed = time.perf_counter() - started
            count = search.evaluated
            best = max(best, count / elapsed)
    finally:
        backend.close()
        if cluster is not None:
            cluster.close()
    return best, count, note


# -- Overhead over bare pymoo ----------------------------------------------------------------


def _bare_pymoo(population: int, generations: int) -> float:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.problems import get_problem
    from pymoo.problems.static import StaticProblem

    problem = get_problem("zdt1", n_var=N_VAR)
    algorithm = NSGA2(pop_size=population, eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=1, verbose=False)
    started = time.perf_counter()
    evaluations = 0
    while algorithm.has_next():
        pop = algorithm.ask()
        F = problem.evaluate(pop.get("X"), return_values_of=["F"])
        Evaluator().eval(StaticProblem(problem, F=F), pop)
        algorithm.tell(infills=pop)
        evaluations += len(pop)
    return (time.perf_counter() - started) / evaluations


def _ours_zdt(population: int, generations: int) -> tuple[float, Any]:
    from optimization_backends import InProcessBackend
    from pareto_search import ParetoSearch

    frame = _walk(4)
    search = ParetoSearch(_zdt_space(), _options(population, generations, seed=1))
    backend = InProcessBackend(zdt1, {PAIR: frame})
    started = time.perf_counter()
    _drive(search, backend)
    return (time.perf_counter() - started) / search.evaluated, search


def _igd(front: np.ndarray) -> float:
    from pymoo.indicators.igd import IGD
    from pymoo.problems import get_problem

    return float(IGD(get_problem("zdt1", n_var=N_VAR).pareto_front())(front))


# -- Memory ----------------------------------------------------------------------------------


def _peak_memory(evaluations: int) -> tuple[float, int]:
    from optimization_backends import InProcessBackend
    from pareto_search import ParetoSearch

    population = 50
    search = ParetoSearch(
        _zdt_space(), _options(population, evaluations // population, seed=2, reservoir=48)
    )
    backend = InProcessBackend(zdt1_returns, {PAIR: _walk(4)})
    tracemalloc.start()
    try:
        _drive(search, backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1e6, search.evaluated


# -- Optuna ----------------------------------------------------------------------------------


def _optuna(population: int, trials: int) -> tuple[float, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=1)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)

    def objective(trial: Any) -> tuple[float, float]:
        x = np.array([trial.suggest_float(f"x{i:02d}", 0.0, 1.0) for i in range(N_VAR)])
        g = 1 + 9 * float(x[1:].sum()) / (N_VAR - 1)
        return float(x[0]), g * (1 - np.sqrt(x[0] / g))

    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    elapsed = time.perf_counter() - started
    front = np.array([t.values for t in study.best_trials])
    return _igd(front), elapsed


def run() -> list[dict[str, Any]]:
    """Measure and return the benchmark rows."""
    frame = _walk(CANDLES)
    local_rate, _, _ = _throughput("in-process", frame)
    bare_rate, n_bare, _ = _throughput("in-process", frame, one_score=False)
    load = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    rows: list[dict[str, Any]] = [
        {
            "name": f"NSGA-II evaluations/s, sma_cross, {CANDLES:,} 1m candles, in process",
            "ours": local_rate,
            "peer": "same search ranked by Sharpe (no one score computed)",
            "peer_value": bare_rate,
            "unit": "evaluations/s",
            "ratio": local_rate / bare_rate,
            "note": f"ratio = with / without the one score (reward_system.score_backtest per "
            f"evaluation, as --mode optimize runs); best of {REPEATS} searches of {n_bare} "
            f"evaluations (32 x 4) after a warm-up generation; {load}",
        }
    ]
    for kind, label in (("local", "Dask LocalCluster 2 workers"), ("tcp", "tcp:// scheduler")):
        rate, n, address = _throughput(kind, frame)
        rows.append(
            {
                "name": f"NSGA-II evaluations/s, sma_cross, {CANDLES:,} 1m candles, {label}",
                "ours": rate,
                "peer": "same search in process (1 worker)",
                "peer_value": local_rate,
                "unit": "evaluations/s",
                "ratio": rate / local_rate,
                "note": f"ratio = fan-out / in-process (above 1: it pays); best of {REPEATS} "
                f"searches of {n} evaluations (32 x 4) after a warm-up generation; {load}"
                + (f"; scheduler {address}" if address else ""),
            }
        )
    population, generations = 100, 100
    bare = _bare_pymoo(population, generations)
    ours, search = _ours_zdt(population, generations)
    front = np.array([[t.objectives["f1"], t.objectives["f2"]] for t in search.result().front])
    rows.append(
        {
            "name": f"optimiser cost per evaluation, NSGA-II {population} x {generations} on ZDT1",
            "ours": ours * 1e6,
            "peer": "bare pymoo ask/tell loop, same algorithm, vectorised evaluation",
            "peer_value": bare * 1e6,
            "unit": "us/evaluation",
            "ratio": bare / ours,
            "note": f"overhead {max(0.0, ours - bare) * 1e6:.0f} us per evaluation: grid "
            "snapping, constraint column, trials, reservoir, one backend job per candidate "
            f"(no vectorised evaluation, as a backtest is per candidate); {search.evaluated} "
            f"evaluations; IGD {_igd(front):.4f}",
        }
    )
    small, n_small = _peak_memory(1_000)
    big, n_big = _peak_memory(5_000)
    rows.append(
        {
            "name": "peak traced memory of a search, 5,000 evaluations (64 returns each)",
            "ours": big,
            "peer": "same search, 1,000 evaluations",
            "peer_value": small,
            "unit": "MB",
            "ratio": small / big,
            "note": f"ratio near 1 = flat in the number of evaluations ({n_big} vs {n_small}); "
            "kept: population, LRU cache of 512 trials, reservoir of 48, running Sharpe "
            "variance; no equity curve",
        }
    )
    pop, gens = 50, 60
    ours_started = time.perf_counter()
    _, zdt_search = _ours_zdt(pop, gens)
    ours_time = time.perf_counter() - ours_started
    ours_igd = _igd(
        np.array([[t.objectives["f1"], t.objectives["f2"]] for t in zdt_search.result().front])
    )
    peer_igd, peer_time = _optuna(pop, pop * gens)
    rows.append(
        {
            "name": f"ZDT1 IGD at {pop * gens:,} evaluations (NSGA-II {pop} x {gens})",
            "ours": ours_igd,
            "peer": "Optuna 5.1 NSGAIISampler, same population and trials",
            "peer_value": peer_igd,
            "unit": "IGD",
            "ratio": peer_igd / ours_igd,
            "note": f"ratio = peer / ours (above 1: our front is closer); time ours "
            f"{ours_time:.2f} s, Optuna {peer_time:.1f} s ({peer_time / ours_time:.0f}x)",
        }
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
