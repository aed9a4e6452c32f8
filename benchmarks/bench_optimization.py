"""Parameter optimisation: backtests per second in process and on Dask, and a full GA run.

* Candidates per second: the same sma_cross candidates (random feasible grid points) go
  through the in-process backend and through a Dask `LocalCluster` of 2 worker processes,
  in batches of 32 (one generation). The peer of the Dask figure is our in-process path;
  the ratio is Dask / in-process throughput (above 1: the fan-out pays). Measured on the
  bundled sample (1,440 one-minute candles: a backtest takes a fraction of a millisecond,
  so the task round trip dominates) and on a seeded random walk of KESTREL_BENCH_SIZE
  one-minute candles (default 1,051,200 = two years; "small" = 20,000), where each
  backtest takes long enough for two processes to win on two idle cores. Worker start-up
  and the first batch (imports, numba cache loads) are excluded and reported in the note,
  with the machine's load average: on a shared two-core machine two workers get no more
  CPU than one process, and the figure shows the overhead alone.
* A full genetic search at the settings' defaults (population 32 x 10 generations) on the
  sample with the fast path, in process, against backtesting.py's `Backtest.optimize`
  (randomised grid, the same 320 tries, its own process pool over every core) running the
  same strategy on the same candles. Ratio = peer time / our time (above 1: we are faster).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import backtesting.backtesting
import numpy as np
import pandas as pd
from backtesting import Backtest, Strategy
from backtesting.lib import crossover

# The seeded one-minute random walk every backtest benchmark uses.
from benchmarks.bench_backtest import candles as _walk


BATCH = 32
SAMPLE_CANDIDATES = 320
DEFAULT = 1_051_200
PAIR = "BTC/USDT"


def _size() -> int:
    raw = os.environ.get("KESTREL_BENCH_SIZE", "")
    if raw.isdigit():
        return max(10_000, int(raw))
    return 20_000 if raw == "small" else DEFAULT


def _sample() -> pd.DataFrame:
    from config import Settings
    from data_manager import load_candles, sample_file

    path = sample_file(Settings().storage.sample_dir, PAIR, "1m")
    return load_candles(path, timeframe="1m")


def _candidates(count: int, seed: int = 1) -> list[dict[str, float]]:
    from parameter_optimization import strategy_feasibility, strategy_space

    space = strategy_space("sma_cross")
    feasible = strategy_feasibility("sma_cross")
    rng = np.random.default_rng(seed)
    out: list[dict[str, float]] = []
    while len(out) < count:
        params = space.params(space.sample(rng))
        if feasible(params) is None:
            out.append(params)
    return out


def _rate(backend: Any, candidates: list[dict[str, float]]) -> float:
    from parameter_optimization import Segment

    jobs = [(p, Segment()) for p in candidates]
    started = time.perf_counter()
    for at in range(0, len(jobs), BATCH):
        outcomes = backend.evaluate(jobs[at : at + BATCH])
        assert all(status == "ok" for status, _, _ in outcomes), outcomes[:3]
    return len(jobs) / (time.perf_counter() - started)


def _throughput(label: str, df: pd.DataFrame, count: int) -> dict[str, Any]:
    from parameter_optimization import BacktestEvaluator, DaskBackend, InProcessBackend, Segment

    evaluator = BacktestEvaluator("sma_cross", "1m", slippage_bps=2.0)
    frames = {PAIR: df}
    candidates = _candidates(count)
    warm = _candidates(BATCH, seed=2)
    local = InProcessBackend(evaluator, frames)
    local.evaluate([(p, Segment()) for p in warm[:2]])
    in_process = _rate(local, candidates)
    started = time.perf_counter()
    dask = DaskBackend(evaluator, frames, workers=2)
    try:
        ready = time.perf_counter() - started
        started = time.perf_counter()
        dask.evaluate([(p, Segment()) for p in warm])
        first = time.perf_counter() - started
        on_dask = _rate(dask, candidates)
    finally:
        dask.close()
    return {
        "name": f"sma_cross backtests/s, {label}, Dask LocalCluster 2 workers",
        "ours": on_dask,
        "peer": "our in-process path (1 worker, same candidates)",
        "peer_value": in_process,
        "unit": "candidates/s",
        "ratio": on_dask / in_process,
        "note": f"ratio = Dask / in-process throughput (above 1: fan-out pays); {count} "
        f"candidates in batches of {BATCH}; cluster start {ready:.1f} s and first batch "
        f"{first:.1f} s (worker imports, numba cache loads) excluded; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
    }


def _genetic_run(df: pd.DataFrame) -> float:
    from parameter_optimization import (
        BacktestEvaluator,
        SearchOptions,
        optimize,
        strategy_feasibility,
        strategy_space,
    )

    options = SearchOptions(population=32, generations=10, seed=42, workers=1)
    evaluator = BacktestEvaluator("sma_cross", "1m", slippage_bps=2.0)
    optimize(evaluator, df, strategy_space("sma_cross"), options)  # warm numba caches
    started = time.perf_counter()
    result = optimize(
        evaluator,
        df,
        strategy_space("sma_cross"),
        options,
        feasible=strategy_feasibility("sma_cross"),
    )
    elapsed = time.perf_counter() - started
    assert result.best is not None
    assert result.generations_run == 10
    return elapsed


def _sma(values: Any, n: int) -> Any:
    return pd.Series(values).rolling(n).mean()


class BtSmaCross(Strategy):  # type: ignore[misc]
    """sma_cross for backtesting.py: buy on the cross up, close on the cross down."""

    fast = 10
    slow = 30

    def init(self) -> None:
        self.sma_fast = self.I(_sma, self.data.Close, self.fast)
        self.sma_slow = self.I(_sma, self.data.Close, self.slow)

    def next(self) -> None:
        if crossover(self.sma_fast, self.sma_slow):
            self.buy()
        elif crossover(self.sma_slow, self.sma_fast) and self.position:
            self.position.close()


def _no_progress(seq: Any, **_: Any) -> Any:
    return seq


def _backtesting_py(df: pd.DataFrame, tries: int) -> float:
    data = df.rename(columns=str.capitalize).tz_localize(None)
    # Cash for whole coins (backtesting.py cannot buy fractions); no progress bars.
    bt = Backtest(data, BtSmaCross, cash=10_000_000, commission=0.001, finalize_trades=True)
    backtesting.backtesting._tqdm = _no_progress  # its bars flood the benchmark log
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt.optimize(
            fast=range(2, 101),
            slow=range(5, 401),
            constraint=lambda p: p.fast < p.slow,
            maximize="Sharpe Ratio",
            method="grid",
            max_tries=tries,
            random_state=42,
        )
    elapsed = time.perf_counter() - started
    return elapsed


def run() -> list[dict[str, Any]]:
    """Measure and return the benchmark rows."""
    sample = _sample()
    size = _size()
    rows = [
        _throughput("sample 1,440 1m candles", sample, SAMPLE_CANDIDATES),
        _throughput(f"random walk {size:,} 1m candles", _walk(size), 2 * BATCH),
    ]
    ours = _genetic_run(sample)
    peer = _backtesting_py(sample, 320)
    rows.append(
        {
            "name": "GA 32 x 10 generations (defaults), sma_cross on the sample, fast path",
            "ours": ours,
            "peer": f"backtesting.py Backtest.optimize, 320 random grid tries, "
            f"process pool of {os.cpu_count()} cores",
            "peer_value": peer,
            "unit": "s",
            "ratio": peer / ours,
            "note": "ratio = peer / ours (above 1: we are faster); ours in one process, "
            "dedup'd (elites are not re-run), infeasible fast >= slow never backtested",
        }
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
