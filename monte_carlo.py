"""Monte Carlo of a backtest's trade returns: resampled paths, their spread, the risk of ruin.

`monte_carlo` reshuffles (or block-bootstraps) the trade returns into many equity paths with a
numba kernel and a splitmix64 generator and reports the percentiles of final equity and max
drawdown and the probability of ruin with its confidence interval. Part of `analytics`,
which re-exports it.

The paths are shared between numba's threads (one per core by default). Each path draws
from a generator stream of its own, started from the seed and the path's number, so the
paths are the same on every run and machine, whatever the number of threads. A backtest's
Monte Carlo grows with its trades (10,000 paths of every trade): ten pairs trading
throughout on 1.2M candles each spent 2.5 s of an 18 s run in it on one thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numba import get_num_threads, njit, prange


PERCENTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True, slots=True)
class MonteCarloResult:
    """Distributions from resampled paths (equity relative to `start`)."""

    method: str
    n_paths: int
    n_steps: int
    start: float
    ruin_level: float
    final_equity: np.ndarray
    max_drawdown: np.ndarray
    ruined: np.ndarray
    checkpoints: np.ndarray
    bands: dict[int, np.ndarray]

    @property
    def probability_of_ruin(self) -> float:
        """Return the share of paths whose equity touched the ruin level."""
        return float(self.ruined.mean()) if self.n_paths else 0.0

    def ruin_interval(self, z: float = 1.959964) -> tuple[float, float]:
        """Return the Wilson score interval of the probability of ruin (95% by default)."""
        n = self.n_paths
        if n == 0:
            return 0.0, 1.0
        p = self.probability_of_ruin
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def summary(self) -> dict[str, Any]:
        """Return percentiles of final equity and max drawdown and the ruin probability."""
        low, high = self.ruin_interval()
        return {
            "method": self.method,
            "paths": self.n_paths,
            "steps": self.n_steps,
            "start": self.start,
            "ruin_level": self.ruin_level,
            "final_equity": {
                f"p{q}": float(np.percentile(self.final_equity, q)) for q in PERCENTILES
            },
            "max_drawdown": {
                f"p{q}": float(np.percentile(self.max_drawdown, q)) for q in PERCENTILES
            },
            "probability_of_ruin": self.probability_of_ruin,
            "probability_of_ruin_95ci": [low, high],
            "probability_of_loss": float((self.final_equity < self.start).mean()),
        }


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, inline="always")
def _mix(z):  # type: ignore[no-untyped-def]
    # SplitMix64's output function.
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _splitmix(state):  # type: ignore[no-untyped-def]
    # SplitMix64: a tiny, fast, well-mixed generator; returns (next state, 53-bit uniform).
    state = state + _GOLDEN
    return state, float(_mix(state) >> np.uint64(11)) * _TO_UNIT


@njit(cache=True, inline="always")
def _shuffle(order, state):  # type: ignore[no-untyped-def]
    # Fisher-Yates: permute `order` in place; returns the generator's next state.
    for i in range(order.shape[0] - 1, 0, -1):
        state, u = _splitmix(state)
        j = int(u * (i + 1))
        order[i], order[j] = order[j], order[i]
    return state


@njit(cache=True, inline="always")
def _next_in_block(state, index, left, starts, block):  # type: ignore[no-untyped-def]
    # The next return's index in a (block) bootstrap: the next one of the current block,
    # or, with none left, the first of a block drawn at random. Returns (state, index,
    # left); a block of 1 is the plain bootstrap.
    if left == 0:
        state, u = _splitmix(state)
        return state, int(u * starts), block - 1
    return state, index + 1, left - 1


@njit(cache=True, inline="always")
def _path_state(seed, path):  # type: ignore[no-untyped-def]
    # The generator's start for path `path`: SplitMix64's output at position `path` of the
    # stream seeded with `seed`. Each path draws from its own stream, so a path is the same
    # whichever thread runs it and however many there are.
    return _mix(np.uint64(seed) + np.uint64(path + 1) * _GOLDEN)


@njit(cache=True, inline="always")
def _path(returns, n_steps, block, starts, order, shuffle, state, start, every, marks):  # type: ignore[no-untyped-def]
    # One path: draw (blocks of) returns, compound, track peak, drawdown and the lowest
    # equity; `marks` is the path's row of checkpoints. Returns (final, worst, lowest).
    equity = start
    peak = start
    worst = 0.0
    floor = start  # equity below this is a new worst drawdown: peak x (1 - worst)
    lowest = start
    countdown = every
    index = 0
    left = 0
    for s in range(n_steps):
        if shuffle:
            index = order[s]
        else:
            state, index, left = _next_in_block(state, index, left, starts, block)
        equity *= 1.0 + returns[index]
        if equity < 0.0:
            equity = 0.0
        if equity > peak:
            peak = equity
            floor = peak * (1.0 - worst)
        elif equity < floor:
            worst = (peak - equity) / peak
            floor = equity
        if equity < lowest:
            lowest = equity
        countdown -= 1
        if countdown == 0:  # a checkpoint for the percentile bands
            marks[(s + 1) // every - 1] = equity
            countdown = every
    return equity, worst, lowest


@njit(cache=True, parallel=True)
def _mc_kernel(  # type: ignore[no-untyped-def]
    returns, n_paths, n_steps, block, shuffle, seed, start, ruin, every,
    finals, mdds, ruined, marks, lanes,
):  # fmt: skip
    # The paths split between `lanes` threads (numba's, one per core by default), each
    # path on its own generator stream and writing only its own cells.
    n = returns.shape[0]
    starts = n - block + 1
    for lane in prange(lanes):
        order = np.arange(n)  # a shuffle's permutation, one per lane
        for p in range(lane, n_paths, lanes):
            state = _path_state(seed, p)
            if shuffle:
                for i in range(n):  # from the identity: the path is its stream's alone
                    order[i] = i
                state = _shuffle(order, state)
            finals[p], mdds[p], lowest = _path(
                returns, n_steps, block, starts, order, shuffle, state, start, every, marks[p]
            )
            ruined[p] = lowest <= ruin


def monte_carlo(
    returns: Sequence[float] | np.ndarray,
    *,
    n_paths: int = 10_000,
    n_steps: int | None = None,
    method: Literal["bootstrap", "shuffle", "block"] = "bootstrap",
    block: int = 20,
    start: float = 1.0,
    ruin: float = 0.5,
    seed: int = 0,
    checkpoints: int = 100,
    threads: int | None = None,
) -> MonteCarloResult:
    """Resample a sequence of returns into `n_paths` equity paths.

    Feed it per-trade returns (`trade_returns(result)`) to bootstrap trade sequences, or
    bar returns of the equity curve to bootstrap returns. `bootstrap` draws returns with
    replacement; `block` draws contiguous blocks of `block` returns (keeps
    autocorrelation, for bar returns); `shuffle` permutes the given sequence (same final
    equity, different paths: the drawdown distribution of the order of trades).

    Args:
        returns: the fractional returns to resample.
        n_paths: number of paths.
        n_steps: returns per path (default: as many as given; `shuffle` uses exactly those).
        method: `bootstrap`, `block` or `shuffle`.
        block: block length for `block`.
        start: starting equity of each path.
        ruin: a path is ruined when its equity touches `ruin x start` (0.5 = lost half).
        seed: random seed (the same seed gives the same paths).
        checkpoints: how many points of each path the percentile bands keep.
        threads: how many threads share the paths (default: numba's, one per core); the
            paths do not depend on it.
    """
    values = np.ascontiguousarray(np.asarray(returns, dtype=np.float64))
    n = len(values)
    if n == 0:
        raise ValueError("monte_carlo needs at least one return")
    steps = n if (n_steps is None or method == "shuffle") else int(n_steps)
    size = min(block, n) if method == "block" else 1
    every = max(1, steps // max(1, checkpoints))
    marks = np.full((n_paths, steps // every), np.nan)
    finals = np.empty(n_paths)
    mdds = np.empty(n_paths)
    ruined = np.zeros(n_paths, dtype=np.bool_)
    _mc_kernel(
        values, n_paths, steps, size, method == "shuffle", seed, start, ruin * start,
        every, finals, mdds, ruined, marks, max(1, min(n_paths, threads or get_num_threads())),
    )  # fmt: skip
    bands: dict[int, np.ndarray] = {}
    if marks.size:
        levels = np.percentile(marks, PERCENTILES, axis=0)
        bands = {q: levels[k] for k, q in enumerate(PERCENTILES)}
    return MonteCarloResult(
        method=method,
        n_paths=n_paths,
        n_steps=steps,
        start=start,
        ruin_level=ruin,
        final_equity=finals,
        max_drawdown=mdds,
        ruined=ruined,
        checkpoints=np.arange(1, marks.shape[1] + 1) * every,
        bands=bands,
    )
