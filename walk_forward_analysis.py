"""Walk-forward analysis: rolling or anchored train/test windows and their report.

`walk_forward_windows` cuts the time axis into windows; `WalkForwardReport` compares
in-sample against out-of-sample objective and measures how much the chosen parameters
move between windows. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from error_handler import ConfigError
from optimization_scoring import Evaluation, Segment, Status
from search_space import SearchSpace


@dataclass(frozen=True, slots=True)
class Window:
    """One walk-forward split as row positions [start, end) on the time axis."""

    index: int
    train_start: int
    train_end: int
    test_start: int
    test_end: int


def walk_forward_windows(
    n_rows: int,
    *,
    windows: int | None = 4,
    train_ratio: float = 3.0,
    anchored: bool = False,
    gap: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> list[Window]:
    """Return walk-forward windows: each test window follows its train window.

    Without sizes, `windows` consecutive test windows end at the last row and each train
    window is `train_ratio` times as long (the first absorbs the remainder). With
    `test_size` (and `train_size`, default `train_ratio` x `test_size`) as many windows
    as fit start at row 0, at most `windows`. Rolling train windows slide by one test
    window; anchored ones all start at row 0. `gap` rows between a train window and its
    test window are left out of both (an embargo against leakage through overlapping
    labels or indicator state).

    Raises:
        ConfigError: when the rows cannot hold one window.
    """
    if gap < 0 or train_ratio <= 0:
        raise ConfigError("walk-forward: gap >= 0 and train_ratio > 0", component="optimize")
    if test_size is None and train_size is None:
        count = windows or 4
        test = int((n_rows - gap) // (count + train_ratio))
        train = n_rows - gap - count * test
    else:
        test = test_size or max(1, round((train_size or 0) / train_ratio))
        train = train_size or max(1, round(test * train_ratio))
        count = max(0, (n_rows - train - gap) // test) if test > 0 else 0
        count = min(count, windows) if windows else count
    if test < 1 or train < 1 or count < 1:
        raise ConfigError(
            f"walk-forward: {n_rows} candles cannot hold {windows or 1} window(s) "
            f"(train {train}, test {test}, gap {gap})",
            component="optimize",
        )
    out: list[Window] = []
    for k in range(count):
        test_start = train + gap + k * test
        train_end = test_start - gap
        out.append(
            Window(
                k, 0 if anchored else train_end - train, train_end, test_start, test_start + test
            )
        )
    return out


def time_axis(frames: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """Return the sorted union of the frames' open times (ms), the axis windows index."""
    parts = [f.index.as_unit("ms").asi8 for f in frames.values()]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def window_segments(axis: np.ndarray, window: Window) -> tuple[Segment, Segment]:
    """Return the train and test segments (ms bounds) of a window on `axis`."""

    def bound(row: int) -> int | None:
        return int(axis[row]) if row < len(axis) else None

    return (
        Segment(int(axis[window.train_start]), bound(window.train_end)),
        Segment(int(axis[window.test_start]), bound(window.test_end)),
    )


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One window's winner in sample and its score out of sample."""

    window: Window
    train: Segment
    test: Segment
    in_sample: Evaluation | None
    out_of_sample: Evaluation | None
    evaluated: int
    generations_run: int

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        w = self.window
        return {
            "index": w.index,
            "rows": {
                "train": [w.train_start, w.train_end],
                "test": [w.test_start, w.test_end],
            },
            "train_ms": [self.train.start_ms, self.train.end_ms],
            "test_ms": [self.test.start_ms, self.test.end_ms],
            "params": dict(self.in_sample.params) if self.in_sample else None,
            "in_sample": self.in_sample.as_dict() if self.in_sample else None,
            "out_of_sample": self.out_of_sample.as_dict() if self.out_of_sample else None,
            "evaluated": self.evaluated,
            "generations_run": self.generations_run,
        }


@dataclass(frozen=True, slots=True)
class ParamStability:
    """How one parameter's chosen value moves across windows."""

    mean: float
    std: float
    low: float
    high: float
    range_std: float


@dataclass(frozen=True, slots=True)
class WalkForwardReport:
    """In-sample against out-of-sample objective over the windows, and parameter stability.

    `efficiency` is the mean out-of-sample over the mean in-sample objective (Pardo's
    walk-forward efficiency; None unless the in-sample mean is positive): near 1 the
    choice generalises, near 0 or below it was fitted to noise. `range_std` of a parameter
    is the standard deviation of its chosen values over its searched range: large values
    mean each window picked something else.
    """

    windows: tuple[WindowResult, ...]
    stability: dict[str, ParamStability]
    in_sample_mean: float | None
    out_of_sample_mean: float | None
    efficiency: float | None
    out_of_sample_positive: float
    anchored: bool = False
    gap: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "anchored": self.anchored,
            "gap": self.gap,
            "in_sample_mean": self.in_sample_mean,
            "out_of_sample_mean": self.out_of_sample_mean,
            "efficiency": self.efficiency,
            "out_of_sample_positive": self.out_of_sample_positive,
            "stability": {k: dataclasses.asdict(v) for k, v in self.stability.items()},
            "windows": [w.as_dict() for w in self.windows],
        }


def parameter_stability(
    chosen: Sequence[Mapping[str, float]], space: SearchSpace
) -> dict[str, ParamStability]:
    """Return the spread of each searched parameter over the chosen sets."""
    out: dict[str, ParamStability] = {}
    if not chosen:
        return out
    for d in space.dimensions:
        values = np.array([float(p[d.name]) for p in chosen], dtype=np.float64)
        std = float(np.std(values))
        span = d.high - d.low
        out[d.name] = ParamStability(
            float(np.mean(values)),
            std,
            float(np.min(values)),
            float(np.max(values)),
            std / span if span > 0 else 0.0,
        )
    return out


def _walk_forward_report(results: Sequence[WindowResult], space: SearchSpace) -> WalkForwardReport:
    pairs = [
        (r.in_sample.objective, r.out_of_sample.objective)
        for r in results
        if r.in_sample is not None
        and r.out_of_sample is not None
        and r.out_of_sample.status in (Status.OK, Status.FEW_TRADES)
    ]
    is_mean = float(np.mean([a for a, _ in pairs])) if pairs else None
    oos_mean = float(np.mean([b for _, b in pairs])) if pairs else None
    efficiency = (
        oos_mean / is_mean if is_mean is not None and oos_mean is not None and is_mean > 0 else None
    )
    chosen = [r.in_sample.params for r in results if r.in_sample is not None]
    return WalkForwardReport(
        windows=tuple(results),
        stability=parameter_stability(chosen, space),
        in_sample_mean=is_mean,
        out_of_sample_mean=oos_mean,
        efficiency=efficiency,
        out_of_sample_positive=sum(b > 0 for _, b in pairs) / len(pairs) if pairs else 0.0,
        anchored=len(results) > 1 and all(r.window.train_start == 0 for r in results),
        gap=results[0].window.test_start - results[0].window.train_end if results else 0,
    )
