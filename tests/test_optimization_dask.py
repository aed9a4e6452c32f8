"""The Dask distributed fan-out gives the in-process result (LocalCluster and tcp:// paths)."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from config import Settings
from error_handler import ConfigError
from parameter_optimization import (
    BacktestEvaluator,
    DaskBackend,
    OptimizationReport,
    SearchOptions,
    Segment,
    open_backend,
    run_optimization,
    strategy_feasibility,
    strategy_space,
    walk_forward_windows,
)
from tests.test_optimization_support import PAIR, broken_for_large_x, flat_frame, sample_frame


def _run(options: SearchOptions) -> OptimizationReport:
    df = sample_frame()
    return run_optimization(
        BacktestEvaluator.from_settings(Settings(), "sma_cross", "1m"),
        {PAIR: df},
        strategy_space("sma_cross"),
        options,
        windows=walk_forward_windows(len(df), windows=2, train_ratio=2.0),
        feasible=strategy_feasibility("sma_cross"),
    )


def _comparable(report: OptimizationReport) -> dict[str, Any]:
    data = report.as_dict(top=1000)
    data.pop("elapsed_s")
    data.pop("workers")
    data["search"].pop("elapsed_s")
    return data


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Start a two-process Dask cluster on loopback (the 'remote' cluster of a tcp:// test)."""
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as local:
        yield local


@pytest.fixture
def dashboard_port_taken() -> Iterator[None]:
    """Hold 127.0.0.1:8787 (Dask's default HTTP port), as another cluster on the host would."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # already held by someone else: same situation
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("dashboard_port_taken")
def test_local_cluster_with_two_workers_matches_in_process() -> None:
    """Search and walk-forward on a 2-worker LocalCluster equal the in-process run."""
    options = SearchOptions(population=6, generations=2, seed=11, min_trades=1)
    in_process = _run(options)
    on_dask = _run(SearchOptions(population=6, generations=2, seed=11, min_trades=1, workers=2))
    assert (in_process.workers, on_dask.workers) == (1, 2)
    assert in_process.search is not None
    assert in_process.search.evaluated > 6
    assert _comparable(on_dask) == _comparable(in_process)


@pytest.mark.slow
def test_scheduler_address_uses_that_cluster(cluster: Any) -> None:
    """A tcp:// scheduler address sends the jobs there; failures come back as outcomes."""
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    backend = open_backend(broken_for_large_x, {PAIR: flat_frame(20)}, scheduler=address)
    try:
        assert isinstance(backend, DaskBackend)
        assert backend.workers == 2
        jobs = [({"x": float(x), "y": 210.0, "z": 2.75}, Segment()) for x in (10, 37, 90, 99)]
        outcomes = backend.evaluate(jobs)
    finally:
        backend.close()
    assert [status for status, _, _ in outcomes] == ["ok", "ok", "failed", "failed"]
    assert outcomes[1][1]["sharpe"] == 0.0
    assert "ZeroDivisionError" in outcomes[2][2]
    assert len(cluster.scheduler_info["workers"]) == 2  # a remote cluster is left running


def test_unreachable_scheduler_is_a_config_error() -> None:
    """A scheduler that does not answer fails fast with the address in the message."""
    with pytest.raises(ConfigError, match=re.escape("tcp://127.0.0.1:9")):
        DaskBackend(
            broken_for_large_x,
            {PAIR: flat_frame(5)},
            scheduler="tcp://127.0.0.1:9",
            connect_timeout_s=0.5,
        )


@pytest.mark.slow
def test_pareto_walk_forward_on_a_local_cluster_matches_in_process() -> None:
    """The Pareto search, its folds and its choice on 2 Dask workers equal the in-process run."""
    from pareto_run import run_pareto
    from pareto_search import ParetoOptions

    df = sample_frame()

    def run(workers: int) -> dict[str, Any]:
        report = run_pareto(
            BacktestEvaluator.from_settings(
                Settings(), "sma_cross", "1m", periods=32, one_score=True
            ),
            {PAIR: df},
            strategy_space("sma_cross"),
            ParetoOptions(population=8, generations=2, seed=5, min_trades=1, workers=workers,
                          scalar="score"),
            windows=walk_forward_windows(len(df), windows=2, train_ratio=2.0),
            feasible=strategy_feasibility("sma_cross"),
        )  # fmt: skip
        assert report.workers == workers
        data = report.as_dict()
        data.pop("elapsed_s")
        data.pop("workers")
        return data

    in_process = run(1)
    assert in_process["pareto"]
    assert run(2) == in_process
