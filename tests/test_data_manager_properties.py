"""Property tests: normalisation invariants and resampling agreement on arbitrary candles."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_manager import (
    CandleAggregator,
    frame_to_candles,
    index_ms,
    normalise_frame,
    resample,
)


STEP = 60_000
price = st.one_of(
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf")]),
)
volume = st.one_of(
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.sampled_from([-1.0, float("nan"), float("inf")]),
)
row = st.tuples(
    # Mostly on the grid, sometimes off it, with collisions so duplicates happen.
    st.one_of(st.integers(0, 40).map(lambda k: k * STEP), st.integers(0, 40 * STEP)),
    price,
    price,
    price,
    price,
    volume,
)


def _frame(rows: list[tuple[int, float, float, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["timestamp", "open", "high", "low", "close", "volume"])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row, max_size=60), st.booleans(), st.integers(0, 45 * STEP))
def test_normalised_output_is_always_clean(rows, with_grid, now) -> None:
    """Output is sorted, unique, float64, finite, OHLC-consistent, and every drop is counted."""
    frame, report = normalise_frame(
        _frame(rows), timeframe="1m" if with_grid else None, now_ms=now if with_grid else None
    )
    ts = index_ms(frame)
    assert report.rows_in == len(rows)
    assert report.rows_in == report.rows_out + report.dropped
    assert report.rows_out == len(frame)
    assert (np.diff(ts) > 0).all()
    assert (frame.dtypes == np.float64).all()
    values = frame.to_numpy()
    assert np.isfinite(values).all()
    o, h, lo, c, v = values.T
    assert (lo > 0).all()
    assert (v >= 0).all()
    assert (lo <= np.minimum(o, c)).all()
    assert (h >= np.maximum(o, c)).all()
    if with_grid:
        assert (ts % STEP == 0).all()
        assert (ts + STEP <= now).all()
    # Idempotent: a clean frame passes through unchanged.
    again, second = normalise_frame(frame, timeframe="1m" if with_grid else None)
    assert not second.changed
    assert again.equals(frame)


@settings(deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=120, unique=True),
    st.sampled_from(["5m", "15m", "1h"]),
    st.randoms(use_true_random=False),
)
def test_incremental_and_batch_resampling_agree(minutes, target, rnd) -> None:
    """For any gappy 1m series, CandleAggregator and resample produce the same bars."""
    minutes = sorted(minutes)
    closes = [100 + rnd.uniform(-5, 5) for _ in minutes]
    rows = [
        (m * STEP, c, c + rnd.uniform(0, 2), c - rnd.uniform(0, 2), c, rnd.uniform(0, 10))
        for m, c in zip(minutes, closes, strict=True)
    ]
    frame, _ = normalise_frame(_frame(rows), timeframe="1m")
    aggregator = CandleAggregator("X/Y", "1m", target)
    bars = [
        b for candle in frame_to_candles(frame, "X/Y", "1m") for b in aggregator.on_candle(candle)
    ]
    want = resample(frame, target, source_timeframe="1m")
    assert [b.ts for b in bars] == index_ms(want).tolist()
    got = np.array([[b.open, b.high, b.low, b.close, b.volume] for b in bars]).reshape(-1, 5)
    np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-12)
    # Every 1m candle lands in exactly one bar, and bars never mix hours they do not cover.
    step = pd.Timedelta(target.replace("m", "min")).value // 1_000_000
    complete = index_ms(frame)[index_ms(frame) < (index_ms(want)[-1] + step if len(want) else 0)]
    assert np.isclose(want["volume"].sum(), frame.loc[ms_mask(frame, complete), "volume"].sum())


def ms_mask(frame: pd.DataFrame, ts: np.ndarray) -> np.ndarray:
    return np.isin(index_ms(frame), ts)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.tuples(st.booleans(), st.integers(1, 90)), min_size=1, max_size=12),
)
def test_rolling_window_equals_the_tail_of_everything_applied(window, steps) -> None:
    """Any mix of seeds and single candles leaves exactly the last `window` candles applied."""
    from data_manager import DataManager

    data = DataManager(window=window)
    applied: list[int] = []
    minute = 0
    for is_seed, count in steps:
        minutes = list(range(minute, minute + count))
        minute += count
        rows = [(m * STEP, 10.0 + m, 11.0 + m, 9.0 + m, 10.5 + m, float(m)) for m in minutes]
        frame, _ = normalise_frame(_frame(rows), timeframe="1m")
        if is_seed:
            data.seed("X/Y", "1m", frame)
        else:
            for candle in frame_to_candles(frame, "X/Y", "1m"):
                assert data.on_candle(candle)
        applied += minutes
    arrays = data.arrays("X/Y", "1m")
    expected = np.array(applied[-window:], dtype=np.int64) * STEP
    np.testing.assert_array_equal(arrays.ts, expected)
    np.testing.assert_array_equal(arrays.close, 10.5 + expected / STEP)
    np.testing.assert_array_equal(arrays.volume, expected / STEP)
    assert data.frame("X/Y", "1m").equals(
        _frame_from(expected, arrays.open, arrays.high, arrays.low, arrays.close, arrays.volume)
    )


def _frame_from(ts, *columns) -> pd.DataFrame:
    from data_manager import CandleArrays, arrays_to_frame

    return arrays_to_frame(CandleArrays(ts, *(np.asarray(c, dtype=np.float64) for c in columns)))
