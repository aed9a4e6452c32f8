"""Feature frames, live incremental features, multi-timeframe merges and market regimes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import talib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import technical_indicators as ti
from error_handler import InvariantError
from models import Candle
from tests.test_indicators_support import assert_close, frame, load_sample


@pytest.fixture(scope="module")
def btc() -> pd.DataFrame:
    """Return the 1,440 Bybit BTC/USDT 1m candles of the sample."""
    return load_sample()


@pytest.fixture(scope="module")
def eth() -> pd.DataFrame:
    """Return 20 days of Bittrex ETH/BTC 5m candles (5,760 rows, several UTC sessions)."""
    return load_sample("bittrex_ETH-BTC_5m.csv.gz")


@pytest.fixture
def scratch_names() -> Iterator[list[str]]:
    """Collect names registered by a test and unregister them afterwards."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        if name in ti.available():
            ti.unregister(name)


def _candles(df: pd.DataFrame, start: int, pair: str = "ETH/BTC") -> list[Candle]:
    ts = df.index.as_unit("ms").asi8
    rows = df[["open", "high", "low", "close", "volume"]].to_numpy()
    candles = []
    for i in range(start, len(df)):
        open_, high, low, close, volume = map(float, rows[i])
        candles.append(Candle(pair, "5m", int(ts[i]), open_, high, low, close, volume))
    return candles


def _assert_rows_match(
    got: dict[str, float], expected: pd.Series, scale: dict[str, float], exact: set[str]
) -> None:
    for column, value in got.items():
        want = float(expected[column])
        if column in exact:
            assert value == want or (np.isnan(value) and np.isnan(want)), column
        else:
            assert np.isclose(value, want, rtol=1e-8, atol=1e-8 * scale[column], equal_nan=True), (
                column
            )


# -- Feature frames --------------------------------------------------------------------------


def test_default_feature_frame_has_every_indicator_and_pattern(btc: pd.DataFrame) -> None:
    """The default frame holds each default feature's outputs, patterns as int32."""
    features = ti.feature_frame(btc)
    spec = ti.default_spec()
    assert list(features.columns) == [c for f in spec for c in f.columns]
    assert features.index.equals(btc.index)
    assert {f"cdl{p[3:].lower()}" for p in talib.get_functions() if p.startswith("CDL")} <= set(
        features
    )
    assert (features[list(ti.PATTERN_NAMES)].dtypes == np.int32).all()
    assert {"macd_macdhist", "bbands_upperband", "ichimoku_senkou_b", "rsi", "zscore"} <= set(
        features
    )
    assert "acos" not in features  # arithmetic groups are not features
    assert_close(features["macd_macdsignal"], ti.compute(btc, "macd")["macdsignal"])
    assert_close(features["session_vwap"], ti.compute(btc, "session_vwap"))


def test_feature_spec_with_params_aliases_and_patterns(btc: pd.DataFrame) -> None:
    """Params suffix the key, an alias replaces it, and "patterns" adds all 61."""
    features = ti.feature_frame(
        btc,
        [
            ("rsi", {"timeperiod": 7}),
            ti.Feature("bbands", {"timeperiod": 10}, alias="bb"),
            "patterns",
        ],
    )
    assert list(features.columns[:4]) == ["rsi_7", "bb_upperband", "bb_middleband", "bb_lowerband"]
    assert len(features.columns) == 4 + 61
    assert_close(features["rsi_7"], talib.RSI(btc["close"].to_numpy(), 7))


def test_duplicate_feature_columns_are_refused(btc: pd.DataFrame) -> None:
    """Two features writing the same column raise instead of overwriting silently."""
    with pytest.raises(ti.IndicatorError, match="twice"):
        ti.feature_frame(btc, ["rsi", ("sma", {"timeperiod": 5}), ti.Feature("ema", alias="rsi")])


# -- Live incremental features ---------------------------------------------------------------


def test_engine_equals_full_recomputation_from_a_bounded_window(eth: pd.DataFrame) -> None:
    """Each closed candle's feature row equals the full-history frame's row.

    TA-Lib features run on talib.stream handles and are bit-identical; Kestrel's own are
    recomputed on bounded tails and agree to 1e-8 of the column's scale.
    """
    full = ti.feature_frame(eth)
    seed = 5000
    engine = ti.FeatureEngine()
    first = engine.seed(eth.iloc[:seed])
    assert engine.window < seed  # bounded: the ring does not hold the history
    values = full.iloc[seed:].to_numpy(dtype=float)
    scale = dict(zip(full.columns, np.nanmax(np.abs(values), axis=0), strict=True))
    exact = {
        c for f in ti.default_spec() if f.name.upper() in talib.get_functions() for c in f.columns
    }
    _assert_rows_match(first, full.iloc[seed - 1], scale, exact)
    for offset, candle in enumerate(_candles(eth, seed)):
        row = engine.update(candle)
        assert list(row) == list(full.columns)
        _assert_rows_match(row, full.iloc[seed + offset], scale, exact)
    assert engine.latest == row


def test_engine_opens_talib_handles_once_history_suffices(btc: pd.DataFrame) -> None:
    """Seeded with 5 candles, TA-Lib features read NaN, then match the full frame."""
    spec = ["sma", "macd", "rsi", "obv", "sar", "cdlengulfing", "bbands", "zscore", "ichimoku"]
    full = ti.feature_frame(btc.iloc[:300], spec)
    engine = ti.FeatureEngine(spec)
    engine.seed(btc.iloc[:5])
    scale = {c: float(np.nanmax(np.abs(full[c].to_numpy(dtype=float)))) for c in full}
    for offset, candle in enumerate(_candles(btc.iloc[:300], 5, pair="BTC/USDT")):
        _assert_rows_match(engine.update(candle), full.iloc[5 + offset], scale, exact=set())


def test_stateful_kestrel_indicators_stream_exactly_with_a_tiny_window(eth: pd.DataFrame) -> None:
    """Session VWAP, pivots, ZigZag and anchored VWAP carry their state: a 5-candle window."""
    anchor = int(eth.index[1000].timestamp() * 1000)
    spec: list[str | tuple[str, dict[str, float]]] = [
        "session_vwap",
        "pivot_points",
        ("zigzag", {"deviation": 1.0}),
        ("anchored_vwap", {"anchor": anchor}),
    ]
    full = ti.feature_frame(eth.iloc[:3000], spec)
    engine = ti.FeatureEngine(spec, window=5)
    engine.seed(eth.iloc[:2000])
    for offset, candle in enumerate(_candles(eth.iloc[:3000], 2000)):
        row = engine.update(candle)
        expected = full.iloc[2000 + offset]
        for column, value in row.items():
            assert value == pytest.approx(float(expected[column]), rel=1e-12, nan_ok=True), column
    assert full["zigzag_1_age"].iloc[2000:].max() > 5  # pivots older than the window


def test_engine_chains_running_totals_of_custom_indicators(
    btc: pd.DataFrame, scratch_names: list[str]
) -> None:
    """A custom running total (probed additive) stays exact with a window far shorter."""
    scratch_names.extend(["cum_volume", "growth"])

    @ti.indicator("cum_volume", inputs=("volume",))
    def cum_volume(volume: np.ndarray) -> np.ndarray:
        return np.cumsum(volume)

    @ti.indicator("growth", inputs=("close",), warmup=1)
    def growth(close: np.ndarray) -> np.ndarray:
        out = np.full(len(close), np.nan)
        out[1:] = np.cumprod(close[1:] / close[:-1])
        return out

    assert ti.memory_of("cum_volume") is ti.Memory.ADDITIVE
    assert ti.memory_of("growth") is ti.Memory.MULTIPLICATIVE
    engine = ti.FeatureEngine(["cum_volume", "growth"], window=10)
    engine.seed(btc.iloc[:400])
    for candle in _candles(btc, 400, pair="BTC/USDT")[:200]:
        row = engine.update(candle)
    assert row["cum_volume"] == pytest.approx(btc["volume"].iloc[:600].sum(), rel=1e-12)
    assert row["growth"] == pytest.approx(btc["close"].iloc[599] / btc["close"].iloc[0], rel=1e-12)


def test_engine_rejects_open_stale_and_broken_candles(btc: pd.DataFrame) -> None:
    """Only closed, newer, finite candles are taken; state is untouched otherwise."""
    engine = ti.FeatureEngine(["rsi", "zscore"])
    with pytest.raises(ti.IndicatorError, match="seed"):
        engine.update(_candles(btc, 0)[0])
    engine.seed(btc.iloc[:100])
    good = _candles(btc, 100, pair="BTC/USDT")[0]
    before = engine.latest
    for bad in (
        Candle("BTC/USDT", "1m", good.ts, 1, 2, 0.5, 1.5, 3, closed=False),
        Candle("BTC/USDT", "1m", good.ts - 60_000, 1, 2, 0.5, 1.5, 3),
        Candle("BTC/USDT", "1m", good.ts, 1, float("nan"), 0.5, 1.5, 3),
    ):
        with pytest.raises(InvariantError):
            engine.update(bad)
    assert engine.latest == before
    assert engine.update(good) != before


# -- Multi-timeframe -------------------------------------------------------------------------


def test_hour_candle_reaches_minutes_only_after_it_closes() -> None:
    """The 10:00 hour (closed 11:00) first appears on the 10:59 minute row, which closes 11:00."""
    minutes = frame([(1, 1, 1, 1, 1)] * 180, start="2024-01-01 09:00")
    hours = pd.DataFrame(
        {"x": [9.0, 10.0, 11.0]},
        index=pd.date_range("2024-01-01 09:00", periods=3, freq="1h", tz="UTC"),
    )
    merged = ti.merge_higher_timeframe(minutes, hours, "1h")
    at = merged["x_1h"]
    assert np.isnan(at["2024-01-01 09:58"])
    assert at["2024-01-01 09:59"] == 9.0
    assert at["2024-01-01 10:58"] == 9.0
    assert at["2024-01-01 10:59"] == 10.0
    assert at["2024-01-01 11:58"] == 10.0
    assert at["2024-01-01 11:59"] == 11.0
    assert list(merged.columns) == ["open", "high", "low", "close", "volume", "x_1h"]


def test_merge_picks_columns_and_suffix(btc: pd.DataFrame) -> None:
    """Only the named columns are merged, with the given suffix; the timeframe can be named."""
    hourly = btc.resample("1h").agg({"open": "first", "high": "max", "low": "min", "close": "last"})
    hourly["rsi"] = ti.compute(hourly, "rsi", timeperiod=3)
    merged = ti.merge_higher_timeframe(
        btc, hourly, "1h", columns=["rsi"], suffix="_h", low_timeframe="1m"
    )
    assert list(merged.columns)[-1] == "rsi_h"
    assert merged["rsi_h"].iloc[-1] == hourly["rsi"].iloc[-1]  # the 23:59 row closes the day
    assert merged["rsi_h"].iloc[-2] == hourly["rsi"].iloc[-2]


def test_merge_refuses_unsorted_frames(btc: pd.DataFrame) -> None:
    """A frame out of order cannot be merged safely."""
    with pytest.raises(ti.IndicatorError, match="sorted"):
        ti.merge_higher_timeframe(btc.iloc[::-1], btc, "1h")


def _resample(low: pd.DataFrame, rule: str) -> pd.DataFrame:
    high = low.resample(rule, label="left", closed="left").agg(
        {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
    )
    high["sma"] = ti.compute(high, "sma", timeperiod=3)
    return high


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    cut=st.integers(1, 239),
    rule=st.sampled_from(["5min", "15min", "1h"]),
)
def test_merge_never_leaks_future_candles(seed: int, cut: int, rule: str) -> None:
    """Rewriting every minute from `cut` on never changes a merged value before `cut`."""
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 1, 240))
    low = frame([(c, c + 1, c - 1, c, 1) for c in close], start="2024-01-01 00:00")
    changed = low.copy()
    changed.iloc[cut:] = changed.iloc[cut:] * rng.uniform(0.5, 1.5, size=(240 - cut, 1))
    timeframe = {"5min": "5m", "15min": "15m", "1h": "1h"}[rule]
    before = ti.merge_higher_timeframe(low, _resample(low, rule), timeframe)
    after = ti.merge_higher_timeframe(changed, _resample(changed, rule), timeframe)
    merged = [c for c in before.columns if c.endswith(f"_{timeframe}")]
    pd.testing.assert_frame_equal(before[merged].iloc[:cut], after[merged].iloc[:cut])
    assert before[f"close_{timeframe}"].notna().any()


# -- Market regime ---------------------------------------------------------------------------


def _series(returns: np.ndarray, spread: np.ndarray) -> pd.DataFrame:
    close = 100 * np.exp(np.cumsum(returns))
    open_ = np.concatenate(([close[0]], close[:-1]))
    rows = zip(
        open_,
        np.maximum(open_, close) * (1 + spread),
        np.minimum(open_, close) * (1 - spread),
        close,
        np.ones(len(close)),
        strict=True,
    )
    return frame(list(rows))


def _share(labels: pd.Series, regime: ti.Regime) -> float:
    return float((labels == regime.value).mean())


@pytest.mark.parametrize(
    ("drift", "regime"), [(0.002, ti.Regime.TRENDING_UP), (-0.002, ti.Regime.TRENDING_DOWN)]
)
def test_regime_of_a_steady_trend(drift: float, regime: ti.Regime) -> None:
    """A steady drift with small noise is labelled trending in its direction."""
    rng = np.random.default_rng(1)
    df = _series(drift + rng.normal(0, 0.0005, 1500), np.full(1500, 0.0005))
    labels = ti.detect_regime(df)
    assert labels.iloc[:27].isna().all()  # ADX warm-up
    assert _share(labels.iloc[600:], regime) > 0.95


def test_regime_of_a_choppy_market() -> None:
    """Mean-reverting noise with steady volatility is ranging, never high volatility."""
    rng = np.random.default_rng(2)
    level = np.zeros(1500)
    for i in range(1, 1500):
        level[i] = 0.3 * level[i - 1] + rng.normal(0, 0.001)
    df = _series(np.diff(level, prepend=0.0), np.full(1500, 0.0005))
    labels = ti.detect_regime(df)
    assert _share(labels.iloc[600:], ti.Regime.RANGING) > 0.85
    assert _share(labels, ti.Regime.HIGH_VOLATILITY) == 0.0


def test_regime_flags_a_volatility_burst() -> None:
    """When ranges and moves turn five times larger, the burst is high volatility."""
    rng = np.random.default_rng(3)
    scale = np.where(np.arange(1500) >= 1400, 5.0, 1.0)
    df = _series(rng.normal(0, 0.001, 1500) * scale, 0.0005 * scale)
    labels = ti.detect_regime(df)
    assert _share(labels.iloc[1410:], ti.Regime.HIGH_VOLATILITY) > 0.9
    assert _share(labels.iloc[600:1400], ti.Regime.HIGH_VOLATILITY) < 0.02


def test_regime_on_real_candles_is_causal(btc: pd.DataFrame) -> None:
    """Labels on a prefix equal the labels of the whole day (no look-ahead)."""
    whole = ti.detect_regime(btc)
    assert whole.iloc[100:].notna().all()
    pd.testing.assert_series_equal(ti.detect_regime(btc.iloc[:900]), whole.iloc[:900])
