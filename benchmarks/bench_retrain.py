"""How long a model retraining holds the event loop: spawned worker against a thread.

The same retraining (`model_training.train_and_validate`: the supervised filter trained on
its walk-forward folds, registered and validated on one pair's candles) runs while a probe task
sleeping 2 ms records how late it wakes; the longest lateness is the loop's longest stall.
Ours: the retrainer's spawned process pool (`model_training.Retrainer`). Peer: the same
call in a thread (`asyncio.to_thread`, what a daemon without a process pool does), which
shares the GIL with the loop. Best (lowest) of three runs each; the first spawn of the
worker is outside the measurement, as in a daemon that has retrained once.

KESTREL_BENCH_SIZE: candles (default 20,000 one-minute candles), or "small" for 5,000.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import bench_size
from config import LearningSettings


def _candles(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(11)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    index = pd.date_range("2024-01-01", periods=n, freq="1min", tz="UTC")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) * 1.0005,
            "low": np.minimum(open_, close) * 0.9995,
            "close": close,
            "volume": rng.uniform(1, 10, n),
        },
        index=index,
    )


async def _stall(run: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Return (longest probe lateness in ms, seconds the run took)."""
    late: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.002)
            late.append((time.perf_counter() - start - 0.002) * 1e3)

    task = asyncio.create_task(probe())
    started = time.perf_counter()
    await run()
    took = time.perf_counter() - started
    done.set()
    await task
    return max(late), took


async def _measure(n: int) -> tuple[list[float], list[float], float]:
    from model_training import Retrainer, RetrainPlan, Scoring, TrainRequest, train_and_validate

    frame = _candles(n)
    learning = LearningSettings(min_samples=200, time_budget=600)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        async def nothing() -> None:
            return None

        plan = RetrainPlan(
            learning=learning,
            kind="supervised",
            timeframe="1m",
            scoring=Scoring(60_000),
            models_dir=root / "models",
            features_dir=None,  # no cache: every run builds its dataset
            data_dir=root,
            exchange="bybit",
            pairs=lambda: ["BTC/USDT"],
            candles=lambda: 0,
            flush=nothing,
            alert=lambda event: None,
        )
        retrainer = Retrainer(plan)
        request: TrainRequest = retrainer.request("BTC/USDT")
        try:
            await retrainer.retrain("BTC/USDT", frame)  # start the worker once
            ours, took = [], 0.0
            for _ in range(3):
                stall, took = await _stall(lambda: retrainer.retrain("BTC/USDT", frame))
                ours.append(stall)
        finally:
            retrainer.close()
        peer = []
        for _ in range(3):
            stall, _ = await _stall(lambda: asyncio.to_thread(train_and_validate, request, frame))
            peer.append(stall)
    return ours, peer, took


def run() -> list[dict[str, Any]]:
    """Return the benchmark rows."""
    n = bench_size(default=20_000, small=5_000, floor=2_000)
    load = os.getloadavg()[0]  # a stall in wall time includes other processes' turns
    ours, peer, took = asyncio.run(_measure(n))
    folds = LearningSettings().validation_folds
    return [
        {
            "name": f"longest loop stall during a retrain, {n:,} candles",
            "ours": min(ours),
            "peer": "same training in a thread",
            "peer_value": min(peer),
            "unit": "ms",
            "ratio": min(peer) / max(min(ours), 1e-3),
            "note": (
                f"best of 3; one retrain ({folds} walk-forward folds) takes {took:.1f} s;"
                f" host load average {load:.1f} on {os.cpu_count()} cores;"
                " ours (spawned worker) runs: "
                + ", ".join(f"{v:.1f}" for v in ours)
                + "; thread runs: "
                + ", ".join(f"{v:.1f}" for v in peer)
            ),
        }
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
