"""A backtest's precomputed signals: every row's flags read back, and no object per row."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Mapping
from decimal import Decimal
from typing import ClassVar

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from models import Candle
from signal_sources import PrecomputedSignals, decide_signal
from strategy import Param, Strategy
from tests.test_backtest_support import minute_walk


NAMES = ("enter_long", "exit_long", "enter_short", "exit_short")


class Given(Strategy):
    """Hands back the flag and feature columns it was built with (a test's strategy)."""

    name = "given"
    parameters: ClassVar[Mapping[str, Param]] = {"warm": Param(1, 1, 10_000)}

    def __init__(self, columns: pd.DataFrame, *, short: bool, **params: float) -> None:
        super().__init__(**params)
        self.columns = columns
        self.can_short = short  # type: ignore[misc]

    @property
    def warmup(self) -> int:
        return int(self.params["warm"])

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        return self.columns.set_axis(df.index)


def _frame(n: int) -> pd.DataFrame:
    index = pd.date_range("2024-01-01", periods=n, freq="1min", tz="UTC", name="ts")
    close = 100.0 + np.arange(n, dtype=np.float64) % 7
    return pd.DataFrame(
        {"open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 1.0},
        index=index.as_unit("ms"),
    )


@settings(deadline=None, max_examples=60)
@given(
    rows=st.lists(
        st.tuples(
            st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
            st.one_of(st.just(float("nan")), st.floats(-1e6, 1e6)),
        ),
        min_size=1,
        max_size=40,
    ),
    short=st.booleans(),
    warm=st.integers(1, 12),
    holding=st.sampled_from([Decimal(0), Decimal("0.5"), Decimal("-2")]),
)
def test_each_rows_signal_is_decided_from_its_own_flags_and_features(
    rows: list[tuple[tuple[bool, bool, bool, bool], float]],
    short: bool,
    warm: int,
    holding: Decimal,
) -> None:
    """signal, has_flags, has_entry and the masks give what each row's own flags give
    (none before the warm-up), with the row's finite features."""
    n = len(rows)
    columns = pd.DataFrame({name: [r[0][j] for r in rows] for j, name in enumerate(NAMES)})
    columns["z"] = [r[1] for r in rows]
    columns["k"] = np.arange(n, dtype=np.float64)
    strategy = Given(columns, short=short, warm=warm)
    frame = _frame(n)
    signals = PrecomputedSignals(strategy, {"P/USDT": frame})
    ts = frame.index.asi8
    flagged, entering = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i, (flags, z) in enumerate(rows):
        live = flags if i >= warm - 1 else (False, False, False, False)
        flagged[i] = any(live)
        entering[i] = live[0] or (live[2] and short)
        candle = Candle("P/USDT", "1m", int(ts[i]), 1.0, 1.0, 1.0, float(frame.close.iat[i]), 1.0)
        features = {"k": float(i)} | ({"z": z} if np.isfinite(z) else {})
        expected = decide_signal(
            strategy, "P/USDT", candle.ts, candle.close, live, holding, features.copy
        )
        assert signals.signal(candle, holding) == expected
        assert signals.has_flags(candle) is bool(flagged[i])
        assert signals.has_entry(candle) is bool(entering[i])
    assert signals.flag_mask("P/USDT", ts).tolist() == flagged.tolist()
    assert signals.entry_mask("P/USDT", ts).tolist() == entering.tolist()
    # Open times of another series: rows the archive lacks are never flagged.
    shifted = ts + 30_000
    assert not signals.flag_mask("P/USDT", shifted).any()


def test_flags_held_on_every_row_keep_no_python_object_per_row() -> None:
    """A strategy whose entry flag holds for the whole archive (a state, not a crossing):
    what the signals keep grows by its one flag byte, one row number and the features of
    each row, not by Python objects (about 300 bytes a flagged row)."""
    n = 300_000
    columns = pd.DataFrame(
        {"enter_long": np.ones(n, dtype=bool), "exit_long": np.zeros(n, dtype=bool)}
    )
    columns["f"] = np.linspace(0.0, 1.0, n)
    strategy = Given(columns, short=False)
    frame = _frame(n)
    tracemalloc.start()
    try:
        signals = PrecomputedSignals(strategy, {"P/USDT": frame})
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_row = kept / n
    assert per_row < 1 + 8 + 8 + 8  # flag byte, row number, the feature, some slack
    candle = Candle("P/USDT", "1m", int(frame.index.asi8[-1]), 1, 1, 1, 1, 1)
    signal = signals.signal(candle, Decimal(0))
    assert signal is not None
    assert signal.features == {"f": 1.0}


def _walk(n: int, seed: int) -> pd.DataFrame:
    return minute_walk(n, seed)


_KERNELS = {
    "sma_cross": {"fast": 3, "slow": 8},
    "ema_cross": {},
    "rsi_bb": {},
    "breakout": {},
}


@settings(deadline=None, max_examples=40)
@given(
    name=st.sampled_from(sorted(_KERNELS)),
    n=st.integers(1, 400),
    rows=st.integers(1, 120),
    seed=st.integers(0, 2**16),
)
def test_a_kernel_strategys_rows_a_chunk_at_a_time_are_its_populated_rows(
    name: str, n: int, rows: int, seed: int
) -> None:
    """The kernel's state carried from chunk to chunk (with its lookback before each) gives
    `populate`'s flags and features row for row, and the backtest's signals built from the
    chunks hold what they would hold built from `populate`'s frame."""
    from signal_sources import _kernel_rows, _populated_rows
    from strategy import KernelStrategy, load_strategy

    strategy = load_strategy(name, _KERNELS[name])
    assert isinstance(strategy, KernelStrategy)
    frame = _walk(n, seed)
    full = strategy.populate(frame)
    chunks = list(strategy.populate_chunks(frame, rows))
    assert [first for first, *_ in chunks] == list(range(0, n, rows))
    enter = np.concatenate([c[1] for c in chunks])
    exit_ = np.concatenate([c[2] for c in chunks])
    assert enter.tolist() == full["enter_long"].tolist()
    assert exit_.tolist() == full["exit_long"].tolist()
    for j, feature in enumerate(strategy.features):
        got = np.concatenate([c[3][:, j] for c in chunks])
        np.testing.assert_array_equal(got, full[feature].to_numpy())
    bits, set_rows, names, values = _kernel_rows(strategy, frame)
    bits_, set_rows_, names_, values_ = _populated_rows(strategy, frame)
    assert bits.tolist() == bits_.tolist()
    assert set_rows.tolist() == set_rows_.tolist()
    assert names == names_
    np.testing.assert_array_equal(values, values_)


@settings(deadline=None, max_examples=40)
@given(
    name=st.sampled_from(sorted(_KERNELS)),
    n=st.integers(1, 400),
    cuts=st.lists(st.integers(1, 399), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_a_segmented_archives_signals_are_the_whole_archives(
    name: str, n: int, cuts: list[int], seed: int
) -> None:
    """Signals taken a segment at a time (`advance`, the kernel's state and lookback rows
    carried over, its warm-up counted from the archive's first row) read back every row's
    signal as signals built from the whole archive do."""
    from strategy import load_strategy

    strategy = load_strategy(name, _KERNELS[name])
    frame = _walk(n, seed)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    parts = [frame.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    whole = PrecomputedSignals(strategy, {"X/USDT": frame})
    segmented = PrecomputedSignals(strategy, {"X/USDT": parts[0]}, segmented=True)
    got, want = [], []
    for k, part in enumerate(parts):
        if k:
            segmented.advance({"X/USDT": part})
        for ts, row in zip(part.index.asi8.tolist(), part.itertuples(), strict=True):
            candle = Candle("X/USDT", "1m", ts, row.open, row.high, row.low, row.close, row.volume)
            for holding in (Decimal(0), Decimal(1)):
                got.append(segmented.signal(candle, holding))
                want.append(whole.signal(candle, holding))
    assert got == want
