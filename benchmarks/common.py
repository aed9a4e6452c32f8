"""Helpers every benchmark shares: the input size, best-of-n timing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


DEFAULT_CANDLES = 1_051_200  # two years of one-minute candles

# The daemon of the burst benchmarks: a fast sma_cross that trades on most closes, small
# risk per trade, and every pair kept trading for the whole run (breakers would halt it).
TRADING_ENV: dict[str, str] = {
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_RISK__RISK_PER_TRADE": "0.001",
    "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
    "KESTREL_RISK__MAX_DRAWDOWN": "0.95",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.9",
    "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "100000",
}


def bench_size(default: int = DEFAULT_CANDLES, small: int = 100_000, floor: int = 10_000) -> int:
    """Return the input size: KESTREL_BENCH_SIZE as a number, "small", or the default."""
    raw = os.environ.get("KESTREL_BENCH_SIZE", "")
    if raw.isdigit():
        return max(floor, int(raw))
    return small if raw == "small" else default


def best_of(func: Callable[[], Any], repeat: int = 5) -> float:
    """Return the fastest of `repeat` runs of `func`, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best
