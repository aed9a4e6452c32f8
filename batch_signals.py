"""A burst's indicators in one pass: every pair's new row through the strategy's kernel at once.

Part of `pipeline` (its signal sources call it). When the candles of many pairs close
together (`burst.BurstDecider`), each built-in kernel strategy would otherwise be run pair
by pair: a kernel call, its arguments and its output arrays per pair. `advance_many`
gathers the last `lookback` + 1 rows of every pair whose state is exactly one row behind
(the common case: one candle per pair per burst) into one (5, pairs, rows) block, advances
all their states with one call of the kernel's batched driver and records each pair's
last row, so that the per-pair read (`KernelStrategy.last_row_arrays`) finds it done.

A pair the batch cannot take (a fresh or restarted state, a gap, a short window) and a
strategy without a batched driver (a user kernel, a `populate` strategy) are left to the
per-pair path, which gives the same rows. The rows are bit-for-bit those of the per-pair
path: the same kernel runs the same float operations on the same values, reading only the
`lookback` rows before the new one, as its contract says (tests/test_batch_signals.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numba import njit

from data_manager import DataManager
from strategy import (
    KernelStrategy,
    Strategy,
    _breakout_kernel,
    _ema_adx_kernel,
    _rsi_bb_kernel,
    _sma_cross_kernel,
)


# The batched drivers: one per built-in kernel, each a loop over the block's pairs (a
# kernel passed as an argument could not be cached on disk, and would compile at start-up).


@njit(cache=True)
def _sma_cross_many(o, h, lo, c, v, start, states, params, enter, exit_, feats):  # type: ignore[no-untyped-def]
    for p in range(c.shape[0]):
        _sma_cross_kernel(
            o[p], h[p], lo[p], c[p], v[p], start, states[p], params, enter[p], exit_[p], feats[p]
        )


@njit(cache=True)
def _ema_adx_many(o, h, lo, c, v, start, states, params, enter, exit_, feats):  # type: ignore[no-untyped-def]
    for p in range(c.shape[0]):
        _ema_adx_kernel(
            o[p], h[p], lo[p], c[p], v[p], start, states[p], params, enter[p], exit_[p], feats[p]
        )


@njit(cache=True)
def _rsi_bb_many(o, h, lo, c, v, start, states, params, enter, exit_, feats):  # type: ignore[no-untyped-def]
    for p in range(c.shape[0]):
        _rsi_bb_kernel(
            o[p], h[p], lo[p], c[p], v[p], start, states[p], params, enter[p], exit_[p], feats[p]
        )


@njit(cache=True)
def _breakout_many(o, h, lo, c, v, start, states, params, enter, exit_, feats):  # type: ignore[no-untyped-def]
    for p in range(c.shape[0]):
        _breakout_kernel(
            o[p], h[p], lo[p], c[p], v[p], start, states[p], params, enter[p], exit_[p], feats[p]
        )


_BATCHED: dict[Any, Callable[..., None]] = {
    _sma_cross_kernel: _sma_cross_many,
    _ema_adx_kernel: _ema_adx_many,
    _rsi_bb_kernel: _rsi_bb_many,
    _breakout_kernel: _breakout_many,
}


def batched_driver(strategy: Strategy) -> Callable[..., None] | None:
    """Return the batched driver of the strategy's kernel, or None if it has none."""
    if not isinstance(strategy, KernelStrategy):
        return None
    return _BATCHED.get(type(strategy).kernel)


def warm(strategy: Strategy) -> None:
    """Load (or compile) the strategy's batched driver now, not in the first burst."""
    driver = batched_driver(strategy)
    if driver is None:
        return
    assert isinstance(strategy, KernelStrategy)
    block = np.ones((5, 1, 2))
    states = np.zeros((1, strategy.state_size))
    flags = np.zeros((1, 2), dtype=np.bool_)
    feats = np.full((1, 2, max(len(strategy.features), 1)), np.nan)
    params = np.array([strategy.params[k] for k in strategy.parameters], dtype=np.float64)
    driver(*block, 0, states, params, flags, flags.copy(), feats)


def rehearse_many(
    strategy: Strategy, data: DataManager, timeframe: str, pairs: Iterable[str]
) -> None:
    """Run `advance_many`'s pass over the pairs' windows as they stand, keeping nothing.

    Between bursts, just before the next close (`burst_rehearsal`): the kernel advances
    copies of the pairs' states by their newest row again, and the result is dropped, so
    the burst's own pass finds its code and the windows' rows in the CPU's caches.
    """
    driver = batched_driver(strategy)
    if driver is None:
        return
    assert isinstance(strategy, KernelStrategy)
    rows = max(strategy.lookback + 1, 2)
    states: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    for pair in pairs:
        ts, block = data.tail(pair, timeframe, rows)
        state = strategy.next_row_state(pair, ts, behind=0)
        if state is not None:
            states.append(state)
            blocks.append(block)
    if len(states) < 2:
        return
    # The states advanced are a copy: the pairs' own stay as they are; the rows are dropped.
    feats = _run_driver(strategy, driver, rows, blocks, states)[3]
    feats[:, -1, : len(strategy.features)].tolist()


def _run_driver(
    strategy: KernelStrategy,
    driver: Callable[..., None],
    rows: int,
    blocks: list[np.ndarray],
    states: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # The pairs' last `rows` rows through the batched driver in one call: the states it
    # advanced (one array, a copy of `states`), and each row's entry and exit flags and
    # features.
    count = len(blocks)
    # (5, pairs, rows), each pair's rows contiguous; concatenate + reshape is np.stack's
    # result at a third of its cost.
    values = np.concatenate(blocks, axis=1).reshape(5, count, rows)
    advanced = np.concatenate(states).reshape(count, -1)
    enter = np.zeros((count, rows), dtype=np.bool_)
    exit_ = np.zeros((count, rows), dtype=np.bool_)
    feats = np.full((count, rows, max(len(strategy.features), 1)), np.nan)
    params = np.array([strategy.params[k] for k in strategy.parameters], dtype=np.float64)
    o, h, lo, c, v = values
    driver(o, h, lo, c, v, rows - 1, advanced, params, enter, exit_, feats)
    return advanced, enter, exit_, feats


def advance_many(
    strategy: Strategy, data: DataManager, timeframe: str, pairs: Iterable[str]
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Advance the pairs one row behind by their new row in one pass.

    Each such pair's last row is recorded in the strategy (`KernelStrategy.set_row`),
    where `last_row_arrays` reads it, and returned: pair -> (the row's open time, the
    row). Pairs not returned are left untouched.
    """
    driver = batched_driver(strategy)
    if driver is None:
        return {}
    assert isinstance(strategy, KernelStrategy)
    rows = max(strategy.lookback + 1, 2)
    taken: list[tuple[str, int, np.ndarray]] = []
    blocks: list[np.ndarray] = []
    for pair in pairs:
        ts, block = data.tail(pair, timeframe, rows)
        state = strategy.next_row_state(pair, ts)
        if state is not None:
            taken.append((pair, int(ts[-1]), state))
            blocks.append(block)
    if len(taken) < 2:
        return {}  # one pair: its own path costs the same
    names = strategy.features
    states, enter, exit_, feats = _run_driver(
        strategy, driver, rows, blocks, [state for _, _, state in taken]
    )
    last_feats = feats[:, -1, : len(names)].tolist()
    flags = zip(enter[:, -1].tolist(), exit_[:, -1].tolist(), last_feats, strict=True)
    done: dict[str, tuple[int, dict[str, Any]]] = {}
    for at, ((pair, last, state), (entering, exiting, values_)) in enumerate(
        zip(taken, flags, strict=True)
    ):
        state[:] = states[at]
        row: dict[str, Any] = {"enter_long": entering, "exit_long": exiting}
        row.update(zip(names, values_, strict=True))
        strategy.set_row(pair, last, row)
        done[pair] = (last, row)
    return done
