"""Walk-forward, overfitting and sensitivity around the Pareto search's choice."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from optimization_backends import BacktestEvaluator
from pareto_run import run_pareto
from pareto_search import ParetoOptions
from search_space import Dimension, SearchSpace, strategy_feasibility, strategy_space
from sensitivity import analyse, neighbours, plateau_choice
from walk_forward_analysis import walk_forward_windows


def vanishing_edge_market(n: int = 2_400, period: int = 96, seed: int = 3) -> pd.DataFrame:
    """Return hourly candles that cycle regularly for the first half, then random-walk."""
    rng = np.random.default_rng(seed)
    half = n // 2
    cycle = 0.06 * np.sin(2 * np.pi * np.arange(n) / period)
    cycle[half:] = cycle[half - 1]  # the cycle, and the edge a moving-average cross had, stop
    wiggle = np.empty(n)
    wiggle[:half] = rng.normal(0, 0.002, half)
    walk = np.cumsum(rng.normal(0, 0.004, n - half))
    wiggle[half:] = wiggle[half - 1] + walk - walk[0]
    close = 100 * np.exp(cycle + wiggle)
    open_ = np.concatenate(([close[0]], close[:-1]))
    index = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC", name="ts")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) * 1.001,
            "low": np.minimum(open_, close) * 0.999,
            "close": close,
            "volume": np.ones(n),
        },
        index=index,
    )


def test_walk_forward_reports_an_edge_that_vanishes_halfway() -> None:
    """In sample stays high on every fold, the folds after the break collapse, and it says so."""
    frame = vanishing_edge_market()
    windows = walk_forward_windows(
        len(frame), windows=4, train_size=600, test_size=300, anchored=True
    )
    report = run_pareto(
        BacktestEvaluator("sma_cross", "1h", taker_fee=0.0005, periods=64),
        frame,
        strategy_space("sma_cross"),
        ParetoOptions(population=16, generations=6, min_trades=3),
        windows=windows,
        pair="ETH/USDT",
        feasible=strategy_feasibility("sma_cross"),
        sensitivity=False,
    )
    wf = report.walk_forward
    assert wf is not None
    folds = wf.folds
    assert all(f.in_sample is not None and f.in_sample.score > 10 for f in folds)
    before, after = folds[:2], folds[2:]  # tests before / after row 1,200
    assert all(not f.degraded for f in before)
    assert all(f.degraded for f in after)
    for f in after:
        assert f.out_of_sample is not None
        assert f.in_sample is not None
        assert f.out_of_sample.score < 0.5 * f.in_sample.score
    assert wf.verdict == "collapsed"
    assert "vanished" in wf.message
    assert "degraded folds: 2, 3" in wf.message
    # The stitched curve chains exactly the folds' out-of-sample returns.
    growth = math.prod(
        1 + f.out_of_sample.metrics["total_return"] for f in folds if f.out_of_sample
    )
    times = [ts for ts, _ in wf.stitched]
    assert times == sorted(times)
    assert len(wf.stitched) == 4 * 64 + 1
    assert wf.stitched[-1][1] / wf.stitched[0][1] == pytest.approx(growth, rel=1e-9)
    assert wf.as_dict()["recent_out_of_sample_mean"] is not None


GRID = SearchSpace((Dimension("x", 0, 100), Dimension("y", 0, 100)))
SPIKE = (80.0, 80.0)
HILL = (30.0, 30.0)


def landscape(x: float, y: float) -> float:
    """Return a broad hill of height 8 at HILL plus a one-point spike of 10 at SPIKE."""
    if (x, y) == SPIKE:
        return 10.0
    return 8.0 * math.exp(-((x - HILL[0]) ** 2 + (y - HILL[1]) ** 2) / (2 * 20.0**2))


def score_batch(points: Sequence[Mapping[str, float]]) -> list[float]:
    """Score points on the landscape."""
    return [landscape(p["x"], p["y"]) for p in points]


def test_plateau_is_preferred_over_a_higher_knife_edge() -> None:
    """Among front candidates, the broad hill wins over the higher one-point spike."""
    candidates = [
        ({"x": SPIKE[0], "y": SPIKE[1]}, 10.0),
        ({"x": HILL[0], "y": HILL[1]}, 8.0),
    ]
    index, results = plateau_choice(GRID, candidates, score_batch)
    assert index == 1
    assert results[1].neighbourhood is not None
    assert results[0].neighbourhood is not None
    assert results[1].neighbourhood > results[0].neighbourhood


def test_knife_edge_is_flagged_and_a_plateau_is_not() -> None:
    """Sensitivity flags the spike as a knife edge, the hill as a plateau, with full views."""
    spike = analyse(GRID, {"x": SPIKE[0], "y": SPIKE[1]}, 10.0, score_batch, seed=1)
    hill = analyse(GRID, {"x": HILL[0], "y": HILL[1]}, 8.0, score_batch, seed=1)
    assert spike.knife_edge
    assert not hill.knife_edge
    assert hill.retained is not None
    assert hill.retained > 0.9
    assert set(hill.morris) == {"x", "y"}
    assert all(v["mu_star"] >= 0 for v in hill.morris.values())
    curve = hill.curves["x"]
    assert [x for x, _ in curve] == sorted(x for x, _ in curve)
    peak = max(curve, key=lambda p: p[1] or -1)
    assert peak[0] == HILL[0]
    (heat,) = hill.heatmaps
    assert len(heat["scores"]) == len(heat["y_values"])
    assert all(len(row) == len(heat["x_values"]) for row in heat["scores"])
    assert len(neighbours(GRID, HILL)) == 4


def test_overfitting_estimates_cover_the_search_trials() -> None:
    """DSR and PBO are probabilities computed over the full search's trials."""
    frame = vanishing_edge_market(seed=5)
    report = run_pareto(
        BacktestEvaluator("sma_cross", "1h", periods=64),
        frame,
        strategy_space("sma_cross"),
        ParetoOptions(population=12, generations=3, min_trades=3, reservoir=16),
        feasible=strategy_feasibility("sma_cross"),
    )
    assert report.search is not None
    assert report.overfitting is not None
    of = report.overfitting
    assert of.n_trials == report.search.evaluated
    assert of.dsr is not None
    assert 0 <= of.dsr <= 1
    assert of.pbo is not None
    assert 0 <= of.pbo <= 1
    assert 2 <= of.pbo_configurations <= 12 + 16 + len(report.search.front)
    assert report.sensitivity is not None
    assert report.best is not None
    assert report.best.params in [t.params for t in report.search.front]


def test_an_interrupted_walk_forward_run_resumes_to_the_same_report(tmp_path: Path) -> None:
    """Stopped after 2 generations and run again, the job resumes and ends as an unbroken run."""
    frame = vanishing_edge_market(n=1_200, seed=8)
    windows = walk_forward_windows(len(frame), windows=2, train_size=600, test_size=300)

    def run(**extra: Any) -> Any:
        return run_pareto(
            BacktestEvaluator("sma_cross", "1h", periods=32),
            frame,
            strategy_space("sma_cross"),
            ParetoOptions(population=8, generations=4, min_trades=2),
            windows=windows,
            feasible=strategy_feasibility("sma_cross"),
            sensitivity=False,
            **extra,
        )

    whole = run()
    path = tmp_path / "job.checkpoint"
    first = run(checkpoint=path, max_generations=2)
    assert first.stopped == "cancelled"
    assert path.exists()
    resumed = run(checkpoint=path)
    assert resumed.stopped == "completed"
    assert resumed.as_dict()["pareto"] == whole.as_dict()["pareto"]
    assert resumed.as_dict()["walk_forward"] == whole.as_dict()["walk_forward"]
    assert resumed.search is not None
    assert whole.search is not None
    assert resumed.search.evaluated == whole.search.evaluated


def _hourly(close: np.ndarray) -> pd.DataFrame:
    open_ = np.concatenate(([close[0]], close[:-1]))
    index = pd.date_range("2024-01-01", periods=len(close), freq="1h", tz="UTC", name="ts")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) * 1.001,
            "low": np.minimum(open_, close) * 0.999,
            "close": close,
            "volume": np.ones(len(close)),
        },
        index=index,
    )


@pytest.mark.parametrize("seed", [1, 3])
def test_overfitting_estimates_tell_a_real_edge_from_noise(seed: int) -> None:
    """On a random walk the chosen point fails DSR and PBO; on a steady cycle it passes both."""
    rng = np.random.default_rng(seed)
    n = 2_400
    noise = _hourly(100 * np.exp(np.cumsum(rng.normal(0, 0.01, n))))
    t = np.arange(n)
    cycle = _hourly(100 * np.exp(0.06 * np.sin(2 * np.pi * t / 96) + rng.normal(0, 0.004, n)))

    def estimates(frame: pd.DataFrame) -> Any:
        report = run_pareto(
            BacktestEvaluator("sma_cross", "1h", periods=64),
            frame,
            strategy_space("sma_cross"),
            ParetoOptions(population=16, generations=5, min_trades=3),
            feasible=strategy_feasibility("sma_cross"),
            sensitivity=False,
        )
        assert report.overfitting is not None
        return report.overfitting

    luck, edge = estimates(noise), estimates(cycle)
    assert luck.dsr < 0.95
    assert luck.pbo > 0.4
    assert edge.dsr > 0.99
    assert edge.pbo < 0.05
