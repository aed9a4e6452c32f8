"""A burst's indicators in one pass: every pair's row equals the one computed pair by pair."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_signals import advance_many, batched_driver
from data_manager import DataManager
from models import Candle
from strategy import BUILTIN, KernelStrategy, Strategy


# Small periods, so a short run warms up and signals often.
PARAMS: dict[str, dict[str, float]] = {
    "sma_cross": {"fast": 2, "slow": 5},
    "ema_cross": {"fast": 3, "slow": 7, "adx_period": 5, "adx_min": 10},
    "rsi_bb": {"rsi_period": 4, "bb_period": 6, "rsi_low": 40, "rsi_high": 60},
    "breakout": {"period": 5, "exit_period": 3, "volume_factor": 1.0},
}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # Rows are equal bit for bit (NaN features equal NaN).
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(PARAMS)),
    seed=st.integers(0, 2**32 - 1),
    pairs=st.integers(2, 6),
    tick=st.sampled_from([0.1, 0.01, 1.0]),
)
def test_one_pass_over_a_burst_gives_every_pair_its_own_row(
    name: str, seed: int, pairs: int, tick: float
) -> None:
    """Random walks on a coarse tick (exact ties happen) for several pairs, some pairs
    skipping a candle or getting two before a burst: the rows after the one-pass advance
    equal, bit for bit, those of a second strategy advanced pair by pair, every burst."""
    rng = np.random.default_rng(seed)
    batch, alone = (BUILTIN[name](**PARAMS[name]) for _ in range(2))
    assert isinstance(batch, KernelStrategy)
    names = [f"P{i}/USDT" for i in range(pairs)]
    data = DataManager(window=40)
    price = dict.fromkeys(names, 100.0)
    taken = 0
    for step in range(80):
        due = [p for p in names if rng.random() > 0.1]  # some pairs skip this burst
        for pair in due:
            for extra in range(1 + int(rng.random() < 0.05)):  # now and then two candles
                ts = (2 * step + extra) * 60_000
                close = round(max(price[pair] + tick * int(rng.integers(-3, 4)), tick), 6)
                high = round(max(close, price[pair]) + tick * int(rng.integers(0, 2)), 6)
                low = round(min(close, price[pair]) - tick * int(rng.integers(0, 2)), 6)
                volume = float(rng.integers(1, 5))
                data.on_candle(Candle(pair, "1m", ts, price[pair], high, low, close, volume))
                price[pair] = close
        taken += len(advance_many(batch, data, "1m", due))
        for pair in due:
            bars = data.arrays(pair, "1m")
            assert _same(batch.last_row_arrays(pair, bars), alone.last_row_arrays(pair, bars))
    assert taken > 40 * pairs  # most pairs, most bursts, went through the one pass


def test_every_built_in_kernel_has_a_batched_driver() -> None:
    """The four shipped strategies all take the one pass; a populate strategy does not."""

    class Plain(Strategy):
        name = "plain"

        def populate(self, df: Any) -> Any:
            return df

    assert all(batched_driver(BUILTIN[n](**PARAMS[n])) is not None for n in PARAMS)
    assert batched_driver(Plain()) is None
    assert advance_many(Plain(), DataManager(), "1m", ["A/USDT", "B/USDT"]) == {}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), window=st.integers(6, 30))
def test_signals_read_from_the_pass_equal_those_computed_pair_by_pair(
    seed: int, window: int
) -> None:
    """A signal source that read its rows from the burst's pass (`prepare`) gives every
    candle the signal a source without the pass gives, from the first candles (windows
    shorter than the warm-up: no signal) to windows that have wrapped their buffer; and
    the window's size it checks the warm-up with is the window's length."""
    from signal_sources import RollingSignals

    rng = np.random.default_rng(seed)
    names = [f"P{i}/USDT" for i in range(4)]
    datas = [DataManager(window=window) for _ in range(2)]
    strategies = [BUILTIN["sma_cross"](fast=2, slow=4) for _ in range(2)]
    batched, alone = (RollingSignals(s, d, "1m") for s, d in zip(strategies, datas, strict=True))
    price = dict.fromkeys(names, 100.0)
    compared = decided = from_pass = 0
    for step in range(3 * window):
        candles = []
        for pair in names:
            close = round(max(price[pair] * (1 + rng.normal(0, 0.01)), 0.01), 2)
            high, low = max(close, price[pair]) + 0.01, min(close, price[pair]) - 0.01
            candles.append(Candle(pair, "1m", step * 60_000, price[pair], high, low, close, 1.0))
            price[pair] = close
        for data in datas:
            for candle in candles:
                assert data.on_candle(candle)
        batched.prepare(names)
        from_pass += len(batched._ready)
        for candle in candles:
            holding = Decimal(int(rng.integers(-1, 2)))
            got, want = batched.signal(candle, holding), alone.signal(candle, holding)
            assert got == want
            compared += 1
            decided += got is not None
            assert datas[0].size(candle.pair, "1m") == len(datas[0].arrays(candle.pair, "1m").ts)
    assert compared == 3 * window * len(names)
    assert decided > 0
    assert from_pass >= (3 * window - 8) * len(names)  # all but the first steps: from the pass
