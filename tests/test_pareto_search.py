"""NSGA-II and the GA special case: known answers, determinism, checkpoints, flat memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from error_handler import ConfigError
from optimization_backends import InProcessBackend
from optimization_scoring import Segment, period_returns, stability, with_periods
from pareto_search import (
    ParetoOptions,
    ParetoResult,
    ParetoSearch,
    drive_pareto,
    load_checkpoint,
    snap_columns,
)
from search_space import Dimension, SearchSpace
from tests.test_optimization_support import PAIR, flat_frame
from utils.utilities import ReplayClock


RASTRIGIN = SearchSpace(tuple(Dimension(f"x{i}", -5.12, 5.12, integer=False) for i in range(5)))
ZDT1 = SearchSpace(tuple(Dimension(f"x{i:02d}", 0.0, 1.0, integer=False) for i in range(30)))


def rastrigin(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Return the 5-D Rastrigin function (minimum 0 at the origin) as a metric."""
    x = np.array([params[f"x{i}"] for i in range(5)])
    f = float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))
    return {"f": f, "sharpe": -f, "n_trades": 100.0}


def zdt1(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Return ZDT1's two objectives (30 variables) as metrics."""
    x = np.array([params[f"x{i:02d}"] for i in range(30)])
    g = 1 + 9 * float(np.sum(x[1:])) / 29
    f1 = float(x[0])
    return {"f1": f1, "f2": g * (1 - np.sqrt(f1 / g)), "sharpe": -f1, "n_trades": 100.0}


def zdt1_with_returns(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Return ZDT1's objectives plus 16 per-period returns (as a backtest reports them)."""
    x = np.array([params[f"x{i:02d}"] for i in range(30)])
    return with_periods(zdt1(params, frame, pair=pair, start_ms=start_ms), (x[:16] - 0.5) / 100)


def _run(
    space: SearchSpace,
    evaluate: object,
    options: ParetoOptions,
    *,
    checkpoint: Path | None = None,
    max_generations: int | None = None,
    search: ParetoSearch | None = None,
) -> ParetoSearch:
    search = search or ParetoSearch(space, options)
    backend = InProcessBackend(evaluate, {PAIR: flat_frame(4)})  # type: ignore[arg-type]
    drive_pareto(
        [(search, Segment())],
        backend,
        time_budget_s=1e9,
        clock=ReplayClock(0),
        checkpoint=checkpoint,
        tag="t",
        max_generations=max_generations,
    )
    return search


GA = ParetoOptions(population=100, generations=200, objectives=(("f", "min"),), min_trades=0)
NSGA = ParetoOptions(
    population=100, generations=200, objectives=(("f1", "min"), ("f2", "min")), min_trades=0
)


@pytest.mark.parametrize("seed", [1])
def test_ga_reaches_the_rastrigin_minimum_in_five_dimensions(seed: int) -> None:
    """The single-objective special case finds f <= 1e-3 on 5-D Rastrigin."""
    result = _run(RASTRIGIN, rastrigin, dataclasses.replace(GA, seed=seed)).result()
    assert result.best is not None
    assert result.best.objectives["f"] <= 1e-3


def test_nsga2_front_on_zdt1_is_within_igd_0_01() -> None:
    """NSGA-II's front on ZDT1 has an inverted generational distance below 0.01."""
    from pymoo.indicators.igd import IGD
    from pymoo.problems import get_problem

    result = _run(ZDT1, zdt1, NSGA).result()
    front = np.array([[t.objectives["f1"], t.objectives["f2"]] for t in result.front])
    assert len(front) >= 50
    assert IGD(get_problem("zdt1").pareto_front())(front) < 0.01


def _front(result: ParetoResult) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    return [(tuple(t.params.values()), tuple(t.objectives.values())) for t in result.front]


def test_same_seed_same_front_other_seed_other_front() -> None:
    """Both searches are deterministic per seed, and the seed matters."""
    small = ParetoOptions(population=20, generations=15, objectives=NSGA.objectives, min_trades=0)
    a = _run(ZDT1, zdt1, small).result()
    b = _run(ZDT1, zdt1, small).result()
    c = _run(ZDT1, zdt1, dataclasses.replace(small, seed=7)).result()
    assert _front(a) == _front(b)
    assert _front(a) != _front(c)
    ga = ParetoOptions(population=20, generations=10, objectives=GA.objectives, min_trades=0)
    assert _front(_run(RASTRIGIN, rastrigin, ga).result()) == _front(
        _run(RASTRIGIN, rastrigin, ga).result()
    )


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """A run stopped after 4 generations and resumed from its checkpoint ends identically."""
    small = ParetoOptions(population=20, generations=10, objectives=NSGA.objectives, min_trades=0)
    whole = _run(ZDT1, zdt1, small).result()
    path = tmp_path / "ckpt.pkl"
    first = _run(ZDT1, zdt1, small, checkpoint=path, max_generations=4)
    assert first.generation == 4
    del first
    loaded = load_checkpoint(path, "t")
    assert loaded is not None
    assert load_checkpoint(path, "another job") is None
    (resumed,) = loaded
    assert resumed.generation == 4
    resumed = _run(ZDT1, zdt1, small, search=resumed, checkpoint=path)
    assert resumed.generation == 10
    again = resumed.result()
    assert _front(again) == _front(whole)
    assert again.evaluated == whole.evaluated


def test_memory_stays_bounded_over_thousands_of_evaluations() -> None:
    """Kept trials stay bounded by population, cache and reservoir, whatever the budget."""
    options = ParetoOptions(
        population=20, generations=120, objectives=NSGA.objectives, min_trades=0, reservoir=16
    )
    search = _run(ZDT1, zdt1_with_returns, options)
    assert search.evaluated >= 2_000
    result = search.result()
    assert len(result.sample) == 16
    assert len(result.population) <= 20
    assert len(search._cache) <= 512


def test_bad_options_are_a_config_error() -> None:
    """Too small a population or no objective is refused."""
    with pytest.raises(ConfigError):
        ParetoOptions(population=2)
    with pytest.raises(ConfigError):
        ParetoOptions(objectives=())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20),
    st.sampled_from(
        [
            Dimension("i", 2, 100),
            Dimension("s", 0.5, 4.0, integer=False, step=0.25),
            Dimension("c", -5.12, 5.12, integer=False),
            Dimension("k", 5, 50, choices=(5.0, 8.0, 13.0, 21.0, 34.0, 50.0)),
        ]
    ),
)
def test_vectorised_snapping_equals_the_dimension_snap(values: list[float], dim: Dimension) -> None:
    """The repair's column snap puts every value on the grid point Dimension.snap picks."""
    space = SearchSpace((dim,))
    snapped = snap_columns(space, np.array(values)[:, None])[:, 0]
    assert snapped.tolist() == [dim.snap(v) for v in values]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.5, 2.0), min_size=1, max_size=300),
    st.integers(1, 80),
)
def test_period_returns_chain_to_the_total_return(growth: list[float], periods: int) -> None:
    """Per-period returns compound to the curve's total return; stability is within [-1, 1]."""
    equity = 100.0 * np.cumprod(growth)
    returns = period_returns(equity, 100.0, periods)
    assert len(returns) == periods
    assert float(np.prod(1 + returns)) == pytest.approx(equity[-1] / 100.0, rel=1e-9)
    assert -1.0 <= stability(returns) <= 1.0


def test_stability_is_signed_by_the_trend() -> None:
    """A steady climb scores near 1, a steady decline near -1, a flat curve 0."""
    assert stability(np.full(32, 0.01)) == pytest.approx(1.0)
    assert stability(np.full(32, -0.01)) == pytest.approx(-1.0)
    assert stability(np.zeros(32)) == 0.0


MIXED = SearchSpace(
    (
        Dimension("fast", 2, 50),
        Dimension("width", 0.5, 4.0, integer=False, step=0.25),
        Dimension("gain", 0.0, 1.0, integer=False),
        Dimension("lookback", 5, 55, choices=(5.0, 8.0, 13.0, 21.0, 34.0, 55.0)),
    )
)


def mixed(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Score a mixed parameter set: best at fast=20, width=1.75, gain=0.3, lookback=21."""
    f1 = (params["fast"] - 20) ** 2 / 100 + (params["width"] - 1.75) ** 2
    f2 = (params["gain"] - 0.3) ** 2 + abs(params["lookback"] - 21) / 50
    return {"f1": f1, "f2": f2, "sharpe": -f1 - f2, "n_trades": 10.0}


def test_mixed_integer_stepped_continuous_and_choice_variables_stay_on_their_grids() -> None:
    """Every candidate is on its grid, `fast < lookback` refusals are never evaluated."""
    seen: list[dict[str, float]] = []

    def refuse(params: Mapping[str, float]) -> str | None:
        seen.append(dict(params))
        return "fast must be below lookback" if params["fast"] >= params["lookback"] else None

    options = ParetoOptions(population=16, generations=8, objectives=NSGA.objectives, min_trades=0)
    search = ParetoSearch(MIXED, options, feasible=refuse)
    result = _run(MIXED, mixed, options, search=search).result()
    assert result.infeasible > 0
    assert result.front
    for p in [*seen, *(t.params for t in result.front)]:
        assert p["fast"] == round(p["fast"])
        assert (p["width"] - 0.5) / 0.25 == round((p["width"] - 0.5) / 0.25)
        assert 0.0 <= p["gain"] <= 1.0
        assert p["lookback"] in MIXED.dimensions[3].choices
    assert all(t.params["fast"] < t.params["lookback"] for t in result.front)
