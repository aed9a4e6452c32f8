"""Shared helpers for the optimisation tests: synthetic objectives, recorders, the sample."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pandas as pd

from error_handler import ConfigError
from parameter_optimization import Dimension, SearchSpace
from tests.conftest import SAMPLE
from utils.utilities import ReplayClock


PAIR = "BTC/USDT"
MINUTE = 60_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
# The bowl's known maximum (0.0) and the space it lives in.
PEAK = {"x": 37.0, "y": 210.0, "z": 2.75}
BOWL_SPACE = SearchSpace(
    (
        Dimension("x", 2, 100),
        Dimension("y", 5, 400),
        Dimension("z", 0.5, 4.0, integer=False, step=0.25),
    )
)


@cache
def _sample() -> pd.DataFrame:
    from data_manager import load_candles

    return load_candles(SAMPLE / "bybit_BTC-USDT_1m.csv.gz", timeframe="1m")


def sample_frame() -> pd.DataFrame:
    """Return the bundled 1,440-candle Bybit BTC/USDT 1m sample (a copy)."""
    return _sample().copy()


def flat_frame(n: int, *, start_ms: int = T0) -> pd.DataFrame:
    """Return `n` one-minute candles at price 1 (for evaluators that ignore prices)."""
    index = pd.DatetimeIndex(
        pd.to_datetime(start_ms + MINUTE * np.arange(n), unit="ms", utc=True), name="ts"
    )
    ones = np.ones(n)
    return pd.DataFrame(
        {"open": ones, "high": ones, "low": ones, "close": ones, "volume": ones}, index=index
    )


def bowl_distance(params: Mapping[str, float]) -> float:
    """Return the scaled squared distance from PEAK (0 at the peak)."""
    return (
        ((params["x"] - PEAK["x"]) / 98) ** 2
        + ((params["y"] - PEAK["y"]) / 395) ** 2
        + ((params["z"] - PEAK["z"]) / 3.5) ** 2
    )


def bowl(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Score a parameter set by minus its distance from PEAK, with plenty of trades."""
    return {"sharpe": -bowl_distance(params), "n_trades": 100.0}


def ordered_bowl(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Score like `bowl`, but refuse x >= y/4 as a strategy refuses fast >= slow."""
    if params["x"] >= params["y"] / 4:
        raise ConfigError("x must be below y/4")
    return bowl(params, frame, pair=pair, start_ms=start_ms)


@dataclass
class Recorder:
    """Record every call: parameters, scored start and the last candle seen."""

    calls: list[tuple[tuple[tuple[str, float], ...], int | None, int, int]] = field(
        default_factory=list
    )
    clock: ReplayClock | None = None
    seconds_per_call: float = 0.0
    trades: float = 100.0

    def __call__(
        self,
        params: Mapping[str, float],
        frame: pd.DataFrame,
        *,
        pair: str,
        start_ms: int | None,
    ) -> dict[str, float]:
        """Record the call, advance the clock, and score like `bowl`."""
        ts = frame.index.as_unit("ms").asi8
        self.calls.append((tuple(sorted(params.items())), start_ms, int(ts[0]), int(ts[-1])))
        if self.clock is not None:
            self.clock.advance(self.seconds_per_call)
        return {"sharpe": -bowl_distance(params), "n_trades": self.trades}


def broken_for_large_x(
    params: Mapping[str, float], frame: pd.DataFrame, *, pair: str, start_ms: int | None
) -> dict[str, float]:
    """Score like `bowl`, but crash (a strategy bug) for x above 80."""
    if params["x"] > 80:
        raise ZeroDivisionError("strategy bug")
    return bowl(params, frame, pair=pair, start_ms=start_ms)
