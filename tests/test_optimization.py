"""Genetic and random search, scores, walk-forward windows and the time budget (in process)."""

from __future__ import annotations

import itertools
import math
import statistics
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import Settings
from error_handler import ConfigError, InvariantError
from parameter_optimization import (
    BacktestEvaluator,
    Dimension,
    SearchOptions,
    SearchSpace,
    Segment,
    Status,
    equity_metrics,
    evaluate_job,
    make_search,
    optimize,
    run_optimization,
    score,
    strategy_feasibility,
    strategy_space,
    time_axis,
    walk_forward,
    walk_forward_windows,
    window_segments,
)
from strategy import load_strategy
from tests.test_optimization_support import (
    BOWL_SPACE,
    PAIR,
    PEAK,
    Recorder,
    bowl,
    bowl_distance,
    broken_for_large_x,
    flat_frame,
    ordered_bowl,
    sample_frame,
)
from trade_simulator import run_fast
from utils.utilities import ReplayClock


TINY = SearchOptions(population=6, generations=2, seed=7, min_trades=1)


def _evaluator() -> BacktestEvaluator:
    return BacktestEvaluator.from_settings(Settings(), "sma_cross", "1m")


def _comparable(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = result.as_dict(top=1000)
    data.pop("elapsed_s")
    return data


# -- Search space ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dimension", "raw", "snapped"),
    [
        (Dimension("n", 2, 100), 37.4, 37.0),
        (Dimension("n", 2, 100), -5, 2.0),
        (Dimension("n", 2, 100), 1e9, 100.0),
        (Dimension("k", 0.5, 4.0, integer=False, step=0.25), 2.63, 2.75),
        (Dimension("k", 0.5, 4.0, integer=False, step=0.25), 3.99, 4.0),
        (Dimension("p", 10, 95, step=5), 13, 15.0),
        (Dimension("p", 10, 97, step=5), 97, 95.0),
        (Dimension("r", 0.0, 1.0, integer=False), 0.123456789, 0.123456789),
    ],
)
def test_dimension_snaps_into_range_on_its_grid(
    dimension: Dimension, raw: float, snapped: float
) -> None:
    """Values are clipped to the range and rounded to the step (integers to whole numbers)."""
    assert dimension.snap(raw) == snapped


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_sampled_and_mutated_values_stay_on_the_grid(seed: int) -> None:
    """Samples, mutations and crossovers are grid points within range; mutation always moves."""
    rng = np.random.default_rng(seed)
    for dim in BOWL_SPACE.dimensions:
        a, b = dim.sample(rng), dim.sample(rng)
        for value in (a, dim.mutate(a, rng, 0.15), dim.blend(a, b, rng)):
            assert dim.low <= value <= dim.high
            assert dim.snap(value) == value
        assert dim.mutate(a, rng, 0.01) != a


def test_strategy_space_reads_the_declared_params() -> None:
    """A strategy's Param ranges become the dimensions; fixed params leave the search."""
    space = strategy_space("rsi_bb", fixed={"rsi_period": 14})
    assert space.names == ("bb_period", "bb_std", "rsi_low", "rsi_high")
    bb_std = space.dimensions[1]
    assert (bb_std.low, bb_std.high, bb_std.integer, bb_std.step) == (0.5, 4.0, False, 0.25)
    assert space.params(space.key({"bb_std": 2.1}))["rsi_period"] == 14


# -- Scores and metrics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (("ok", {"sharpe": 1.5, "n_trades": 10}, ""), Status.OK),
        (("ok", {"sharpe": 9.0, "n_trades": 2}, ""), Status.FEW_TRADES),
        (("ok", {"sharpe": math.nan, "n_trades": 10}, ""), Status.FAILED),
        (("infeasible", {}, "fast must be below slow"), Status.INFEASIBLE),
        (("failed", {}, "ZeroDivisionError"), Status.FAILED),
    ],
)
def test_score_sets_the_status(outcome: Any, status: Status) -> None:
    """The status says whether a candidate is usable, short of trades, infeasible or broken."""
    assert score({"x": 1}, outcome, "sharpe", min_trades=5).status is status


def test_too_few_trades_rank_below_every_candidate_with_enough() -> None:
    """A brilliant score on two trades ranks under a poor one on enough trades."""
    lucky = score({"x": 1}, ("ok", {"sharpe": 50.0, "n_trades": 2}, ""), "sharpe", 5)
    steady = score({"x": 2}, ("ok", {"sharpe": -0.5, "n_trades": 6}, ""), "sharpe", 5)
    fewer = score({"x": 3}, ("ok", {"sharpe": 50.0, "n_trades": 1}, ""), "sharpe", 5)
    broken = score({"x": 4}, ("infeasible", {}, "no"), "sharpe", 5)
    ranked = sorted([broken, fewer, lucky, steady], key=lambda e: e.rank_key, reverse=True)
    assert [e.params["x"] for e in ranked] == [2, 1, 3, 4]


@pytest.mark.parametrize(
    ("objective", "metric"),
    [
        ("sharpe", "sharpe"),
        ("sortino", "sortino"),
        ("calmar", "calmar"),
        ("return", "total_return"),
    ],
)
def test_objective_reads_its_metric(objective: Any, metric: str) -> None:
    """Each configured objective scores by its own metric."""
    metrics = {"sharpe": 1.0, "sortino": 2.0, "calmar": 3.0, "total_return": 4.0, "n_trades": 9}
    assert score({}, ("ok", metrics, ""), objective, 1).objective == metrics[metric]


def test_equity_metrics_match_the_textbook_formulas() -> None:
    """Sharpe, Sortino, drawdown, return and Calmar of a small daily curve, by hand."""
    curve = [110.0, 99.0, 108.9, 112.0]
    returns = [0.1, -0.1, 0.1, 112.0 / 108.9 - 1]
    m = equity_metrics(np.array(curve), 100.0, "1d")
    mean = statistics.fmean(returns)
    assert m["sharpe"] == pytest.approx(mean / statistics.stdev(returns) * math.sqrt(365))
    downside = math.sqrt(sum(min(r, 0) ** 2 for r in returns) / len(returns))
    assert m["sortino"] == pytest.approx(mean / downside * math.sqrt(365))
    assert m["max_drawdown"] == pytest.approx(0.1)
    assert m["total_return"] == pytest.approx(0.12)
    assert m["cagr"] == pytest.approx(1.12 ** (365 / 4) - 1)
    assert m["calmar"] == pytest.approx(m["cagr"] / 0.1)


def test_flat_equity_scores_zero() -> None:
    """No trades: every ratio is zero, not NaN or infinite."""
    m = equity_metrics(np.full(50, 100.0), 100.0, "1m")
    assert m == dict.fromkeys(m, 0.0)


def test_backtest_metrics_agree_with_the_fast_path() -> None:
    """Trades, return and drawdown are the fast path's own numbers."""
    df = sample_frame()
    params = {"fast": 5.0, "slow": 20.0}
    evaluator = _evaluator()
    metrics = evaluator(params, df, pair=PAIR, start_ms=None)
    result = run_fast(
        load_strategy("sma_cross", params),
        df,
        pair=PAIR,
        timeframe="1m",
        taker_fee=evaluator.taker_fee,
        slippage_bps=evaluator.slippage_bps,
    )
    summary = result.summary().to_dict()
    assert metrics["n_trades"] == summary["n_trades"] > 0
    assert metrics["total_return"] == pytest.approx(summary["total_return"])
    assert metrics["max_drawdown"] == pytest.approx(summary["max_drawdown"])


@pytest.mark.parametrize(
    ("strategy", "params", "start_row"),
    [
        ("sma_cross", {"fast": 5.0, "slow": 20.0}, None),
        ("sma_cross", {"fast": 12.0, "slow": 90.0}, 700),
        ("rsi_bb", {"rsi_period": 10.0, "bb_period": 30.0, "bb_std": 1.5}, None),
        ("breakout", {"period": 15.0, "exit_period": 8.0, "volume_factor": 0.0}, 900),
    ],
)
def test_scores_agree_with_the_backtest_report(
    strategy: str, params: dict[str, float], start_row: int | None
) -> None:
    """The optimiser's Sharpe, Sortino, Calmar... are the numbers analytics.metrics reports."""
    import analytics

    df = sample_frame()
    start_ms = None if start_row is None else int(df.index.as_unit("ms").asi8[start_row])
    evaluator = BacktestEvaluator(strategy, "1m", slippage_bps=2.0)
    ours = evaluator(params, df, pair=PAIR, start_ms=start_ms)
    result = run_fast(
        load_strategy(strategy, params),
        df,
        pair=PAIR,
        timeframe="1m",
        slippage_bps=2.0,
        start_ms=start_ms,
    )
    report = analytics.metrics(result)
    assert report["n_trades"] >= 3
    for key in (
        "sharpe",
        "sortino",
        "calmar",
        "cagr",
        "total_return",
        "max_drawdown",
        "n_trades",
        "win_rate",
        "profit_factor",
    ):
        assert ours[key] == pytest.approx(report[key], rel=1e-9), key


def test_one_parameter_set_is_scored_across_pairs() -> None:
    """With two pairs, trades add up and ratios average."""
    df = sample_frame()
    params = {"fast": 5.0, "slow": 20.0}
    one = evaluate_job(_evaluator(), {PAIR: df}, params, Segment())
    two = evaluate_job(_evaluator(), {PAIR: df, "ETH/USDT": df}, params, Segment())
    assert two[0] == "ok"
    assert two[1]["n_trades"] == 2 * one[1]["n_trades"]
    assert two[1]["sharpe"] == pytest.approx(one[1]["sharpe"])


# -- Searches --------------------------------------------------------------------------------


def test_same_seed_same_result_on_the_sample() -> None:
    """Two runs with one seed agree candidate for candidate; another seed explores elsewhere."""
    df = sample_frame()
    kwargs: dict[str, Any] = {"feasible": strategy_feasibility("sma_cross")}
    first = optimize(_evaluator(), df, strategy_space("sma_cross"), TINY, **kwargs)
    again = optimize(_evaluator(), df, strategy_space("sma_cross"), TINY, **kwargs)
    other = optimize(
        _evaluator(),
        df,
        strategy_space("sma_cross"),
        SearchOptions(population=6, generations=2, seed=8, min_trades=1),
        **kwargs,
    )
    assert first.best is not None
    assert first.evaluated > 6
    assert _comparable(first) == _comparable(again)
    assert {tuple(e.params.items()) for e in first.leaderboard} != {
        tuple(e.params.items()) for e in other.leaderboard
    }


@pytest.mark.parametrize("seed", range(5))
def test_genetic_search_finds_the_known_maximum_better_than_random(seed: int) -> None:
    """On a bowl with a known peak, GA lands next to it and beats random search's budget."""
    ga = optimize(
        bowl,
        flat_frame(10),
        BOWL_SPACE,
        SearchOptions(population=20, generations=15, seed=seed, min_trades=1),
    )
    rnd = optimize(
        bowl,
        flat_frame(10),
        BOWL_SPACE,
        SearchOptions(population=20, generations=15, seed=seed, min_trades=1, method="random"),
    )
    assert ga.best is not None
    assert rnd.best is not None
    assert rnd.evaluated >= ga.evaluated  # random search had at least the same budget
    assert ga.best.objective >= rnd.best.objective
    assert abs(ga.best.params["x"] - PEAK["x"]) <= 2
    assert abs(ga.best.params["y"] - PEAK["y"]) <= 6
    assert ga.best.params["z"] == PEAK["z"]
    assert ga.history[-1].best_objective == ga.best.objective
    assert ga.history[0].best_objective is not None
    assert ga.history[0].best_objective <= ga.best.objective


def test_configured_parameters_are_in_the_first_generation() -> None:
    """The initial candidates (the configured parameters) are scored in generation 0."""
    result = optimize(bowl, flat_frame(10), BOWL_SPACE, TINY, initial=[PEAK])
    assert result.best is not None
    assert result.best.params == PEAK


def test_each_grid_point_is_backtested_once() -> None:
    """Repeated candidates come from the cache: every call has new parameters."""
    recorder = Recorder()
    small = SearchSpace((Dimension("x", 30, 45), Dimension("y", 200, 215), Dimension("z", 2, 3)))
    result = optimize(
        recorder,
        flat_frame(10),
        small,
        SearchOptions(population=10, generations=8, seed=1, min_trades=1),
    )
    params = [call[0] for call in recorder.calls]
    assert len(params) == len(set(params)) == result.evaluated
    assert sum(g.reused for g in result.history) > 0  # elites were not backtested again


def test_infeasible_strategy_parameters_are_never_backtested_or_chosen() -> None:
    """sma_cross with fast >= slow is recorded as infeasible, not scored, never best."""
    space = SearchSpace((Dimension("fast", 2, 100), Dimension("slow", 5, 60)))
    result = optimize(
        _evaluator(),
        sample_frame(),
        space,
        TINY,
        feasible=strategy_feasibility("sma_cross"),
    )
    assert result.infeasible > 0
    assert result.best is not None
    assert all(e.params["fast"] < e.params["slow"] for e in result.leaderboard)


def test_configerror_from_the_evaluator_marks_the_candidate_infeasible() -> None:
    """Without a pre-check, the evaluator's ConfigError is an infeasible candidate."""
    result = optimize(
        ordered_bowl,
        flat_frame(10),
        BOWL_SPACE,
        SearchOptions(population=10, generations=3, seed=2, min_trades=1),
    )
    assert result.infeasible > 0
    assert result.best is not None
    assert all(e.params["x"] < e.params["y"] / 4 for e in result.leaderboard)


def test_a_crashing_candidate_fails_alone() -> None:
    """An exception in one candidate marks it failed; the search goes on."""
    result = optimize(
        broken_for_large_x,
        flat_frame(10),
        BOWL_SPACE,
        SearchOptions(population=12, generations=3, seed=3, min_trades=1),
        initial=[{"x": 90, "y": 100, "z": 1}],
    )
    assert result.failed >= 1
    assert result.generations_run == 3
    assert result.best is not None
    assert result.best.params["x"] <= 80


def test_ask_tell_by_hand() -> None:
    """A search can be driven by hand: ask, evaluate anywhere, tell in order."""
    search = make_search(BOWL_SPACE, SearchOptions(population=5, generations=3, seed=9))
    while not search.done:
        asked = search.ask()
        assert len({tuple(p.items()) for p in asked}) == len(asked) <= 5
        search.tell([("ok", {"sharpe": -bowl_distance(p), "n_trades": 9.0}, "") for p in asked])
    result = search.result()
    assert result.generations_run == 3
    assert result.best is not None
    assert result.best.objective == max(e.objective for e in result.leaderboard)
    search.ask()
    with pytest.raises(InvariantError):
        search.tell([])


def test_bad_options_are_a_config_error() -> None:
    """A population of one or no generations is refused."""
    with pytest.raises(ConfigError):
        SearchOptions(population=1)
    with pytest.raises(ConfigError):
        SearchOptions(generations=0)


# -- Time budget and cancellation ------------------------------------------------------------


def test_time_budget_stops_launching_generations() -> None:
    """With each backtest taking 1 s of clock, a 10 s budget ends after the second generation."""
    clock = ReplayClock(0)
    recorder = Recorder(clock=clock, seconds_per_call=1.0)
    options = SearchOptions(population=6, generations=5, seed=4, min_trades=1, time_budget_s=10)
    result = optimize(recorder, flat_frame(10), BOWL_SPACE, options, clock=clock)
    assert result.stopped == "time_budget"
    assert result.generations_run == 2
    assert result.best is not None
    assert result.best == max(result.leaderboard, key=lambda e: e.rank_key)
    assert len(recorder.calls) == result.evaluated


def test_unspent_budget_runs_every_generation() -> None:
    """A budget that is never reached lets the search complete."""
    clock = ReplayClock(0)
    recorder = Recorder(clock=clock, seconds_per_call=0.001)
    options = SearchOptions(population=6, generations=5, seed=4, min_trades=1, time_budget_s=10)
    result = optimize(recorder, flat_frame(10), BOWL_SPACE, options, clock=clock)
    assert (result.stopped, result.generations_run) == ("completed", 5)


def test_stop_event_cancels_before_the_next_generation() -> None:
    """Setting the stop event ends the run after the generation in flight."""
    stop = threading.Event()
    seen: list[int] = []

    def on_generation(done: int, planned: int, best: float | None) -> None:
        seen.append(done)
        stop.set()

    result = optimize(
        bowl,
        flat_frame(10),
        BOWL_SPACE,
        SearchOptions(population=6, generations=5, seed=1, min_trades=1),
        stop=stop,
        on_generation=on_generation,
    )
    assert (result.stopped, result.generations_run, seen) == ("cancelled", 1, [1])


# -- Walk-forward ----------------------------------------------------------------------------


@given(
    n_rows=st.integers(10, 5_000),
    windows=st.integers(1, 8),
    ratio=st.floats(0.5, 6.0),
    anchored=st.booleans(),
    gap=st.integers(0, 20),
)
@settings(deadline=None)
def test_walk_forward_windows_keep_test_after_train(
    n_rows: int, windows: int, ratio: float, anchored: bool, gap: int
) -> None:
    """Every test window starts after its train window ends (plus the gap) and they tile."""
    try:
        result = walk_forward_windows(
            n_rows, windows=windows, train_ratio=ratio, anchored=anchored, gap=gap
        )
    except ConfigError:
        assert n_rows - gap < windows + ratio
        return
    assert len(result) == windows
    assert result[-1].test_end == n_rows
    train_sizes = {w.train_end - w.train_start for w in result}
    for w, following in itertools.pairwise(result):
        assert following.test_start == w.test_end  # consecutive, never overlapping
    for w in result:
        assert 0 <= w.train_start < w.train_end
        assert w.train_end + gap == w.test_start < w.test_end <= n_rows
        assert w.train_start == 0 if anchored else len(train_sizes) == 1
        assert w.test_end - w.test_start == result[0].test_end - result[0].test_start


def test_explicit_window_sizes_fit_as_many_as_possible() -> None:
    """Given train and test sizes, windows start at row 0 and stop before running out."""
    result = walk_forward_windows(1000, windows=None, train_size=300, test_size=100, gap=10)
    assert [(w.train_start, w.train_end, w.test_start, w.test_end) for w in result] == [
        (0, 300, 310, 410),
        (100, 400, 410, 510),
        (200, 500, 510, 610),
        (300, 600, 610, 710),
        (400, 700, 710, 810),
        (500, 800, 810, 910),
    ]


def test_too_few_rows_for_a_window_is_a_config_error() -> None:
    """Asking for windows the data cannot hold is refused."""
    with pytest.raises(ConfigError):
        walk_forward_windows(5, windows=4, train_ratio=3)


@pytest.mark.parametrize("anchored", [False, True])
def test_walk_forward_trains_and_tests_only_on_their_own_rows(anchored: bool) -> None:
    """Train backtests see candles up to the train end; the winner is scored on the test rows."""
    frame = flat_frame(600)
    axis = time_axis({PAIR: frame})
    windows = walk_forward_windows(len(frame), windows=3, train_ratio=2.0, gap=5, anchored=anchored)
    recorder = Recorder()
    report = walk_forward(recorder, frame, BOWL_SPACE, windows, TINY)
    bounds: dict[tuple[int | None, int], str] = {}
    for w in windows:
        bounds[(int(axis[w.train_start]), int(axis[w.train_end - 1]))] = f"train{w.index}"
        bounds[(int(axis[w.test_start]), int(axis[w.test_end - 1]))] = f"test{w.index}"
    kinds = [bounds[(start, last)] for _, start, _, last in recorder.calls]
    for w, result in zip(windows, report.windows, strict=True):
        test_calls = [
            c for c, kind in zip(recorder.calls, kinds, strict=True) if kind == f"test{w.index}"
        ]
        assert result.in_sample is not None
        assert result.out_of_sample is not None
        assert [dict(c[0]) for c in test_calls] == [result.in_sample.params]
        assert result.train == window_segments(axis, w)[0]
        assert result.test.start_ms is not None
        assert result.train.end_ms is not None
        assert result.test.start_ms > result.train.end_ms
    assert kinds.count("train0") == report.windows[0].evaluated
    assert (report.anchored, report.gap) == (anchored, 5)


def test_walk_forward_reports_out_of_sample_decay_and_stability() -> None:
    """In-sample vs out-of-sample means, efficiency and the parameter spread are reported."""
    df = sample_frame()
    windows = walk_forward_windows(len(df), windows=3, train_ratio=2.0)
    report = run_optimization(
        _evaluator(),
        df,
        strategy_space("sma_cross"),
        TINY,
        windows=windows,
        feasible=strategy_feasibility("sma_cross"),
    )
    wf = report.walk_forward
    assert report.search is not None
    assert wf is not None
    assert len(wf.windows) == 3
    ins = [r.in_sample for r in wf.windows if r.in_sample is not None]
    outs = [r.out_of_sample for r in wf.windows if r.out_of_sample is not None]
    assert len(ins) == len(outs) == 3
    assert wf.in_sample_mean == pytest.approx(statistics.fmean(e.objective for e in ins))
    assert wf.out_of_sample_mean == pytest.approx(statistics.fmean(e.objective for e in outs))
    assert set(wf.stability) == {"fast", "slow"}
    chosen = [e.params["slow"] for e in ins]
    assert wf.stability["slow"].std == pytest.approx(float(np.std(chosen)))
    assert wf.stability["slow"].range_std == pytest.approx(float(np.std(chosen)) / 395)
    data = report.as_dict()
    assert data["walk_forward"]["windows"][1]["rows"]["test"] == [
        windows[1].test_start,
        windows[1].test_end,
    ]
