"""The indicator registry: TA-Lib served as TA-Lib, patterns, custom indicators, formulas."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import talib
from talib import abstract

import technical_indicators as ti
from error_handler import ConfigError
from tests.test_indicators_support import assert_close, frame, load_sample


TALIB_INDICATORS = sorted(f for f in talib.get_functions() if not f.startswith("CDL"))
TALIB_PATTERNS = sorted(f for f in talib.get_functions() if f.startswith("CDL"))


def _abstract_function(name: str) -> Any:
    """TA-Lib's abstract-API function `name`."""
    return abstract.Function(name)  # type: ignore[attr-defined]  # TA-Lib's stubs omit Function


# Their values depend on where the data starts or on the data itself, not on a fixed warm-up.
DATA_DEPENDENT_WARMUP = {"zigzag", "anchored_vwap", "session_vwap", "pivot_points"}


@pytest.fixture(scope="module")
def btc() -> pd.DataFrame:
    """Return the 1,440 Bybit BTC/USDT 1m candles of the sample."""
    return load_sample()


@pytest.fixture
def scratch_names() -> Iterator[list[str]]:
    """Collect names registered by a test and unregister them afterwards."""
    names: list[str] = []
    yield names
    for name in reversed(names):  # formulas first: they may call the ones before them
        if name in ti.available():
            ti.unregister(name)


def _talib_inputs(df: pd.DataFrame) -> dict[str, np.ndarray]:
    inputs = {c: df[c].to_numpy() for c in ("open", "high", "low", "close", "volume")}
    inputs["periods"] = np.full(len(df), 14.0)
    return inputs


def test_registry_serves_every_talib_function_plus_our_own() -> None:
    """All 201 TA-Lib functions are listed in lower case; 50+ indicators and 61 patterns."""
    names = ti.available()
    assert {f.lower() for f in talib.get_functions()} <= names.keys()
    assert all(names[f.lower()].source == "talib" for f in talib.get_functions())
    patterns = [n for n, info in names.items() if info.group == "Pattern Recognition"]
    assert len(patterns) == 61
    assert len(names) - len(patterns) >= 50


@pytest.mark.parametrize("func_name", TALIB_INDICATORS)
def test_talib_backed_outputs_equal_talibs_own(btc: pd.DataFrame, func_name: str) -> None:
    """compute() returns exactly what TA-Lib's abstract API computes, output names included."""
    expected = _abstract_function(func_name)(_talib_inputs(btc))
    extra = {"periods": np.full(len(btc), 14.0)} if func_name == "MAVP" else {}
    got = ti.compute(btc, func_name.lower(), **extra)
    if isinstance(expected, list):
        assert list(got.columns) == _abstract_function(func_name).output_names
        for column, values in zip(got.columns, expected, strict=True):
            np.testing.assert_array_equal(got[column].to_numpy(), values)
    else:
        assert got.name == func_name.lower()
        np.testing.assert_array_equal(got.to_numpy(), expected)
    assert got.index.equals(btc.index)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("bbands", {"timeperiod": 10, "nbdevup": 1.5, "nbdevdn": 2.5, "matype": 1}),
        ("macd", {"fastperiod": 5, "slowperiod": 13, "signalperiod": 4}),
        ("stoch", {"fastk_period": 9, "slowk_period": 2}),
        ("rsi", {"timeperiod": 7}),
        ("cci", {"timeperiod": 20}),
    ],
)
def test_talib_parameters_pass_through(
    btc: pd.DataFrame, name: str, params: dict[str, float]
) -> None:
    """TA-Lib's own parameter names and values reach TA-Lib unchanged."""
    expected = _abstract_function(name.upper())(_talib_inputs(btc), **params)
    got = ti.compute(btc, name, **params)
    values = [got[c].to_numpy() for c in got.columns] if isinstance(got, pd.DataFrame) else [got]
    for mine, theirs in zip(
        values, expected if isinstance(expected, list) else [expected], strict=True
    ):
        np.testing.assert_array_equal(np.asarray(mine), theirs)


def test_talib_names_defaults_and_outputs_are_talibs() -> None:
    """Parameter names, defaults and output names follow TA-Lib."""
    info = ti.available()
    assert dict(info["macd"].params) == {"fastperiod": 12, "slowperiod": 26, "signalperiod": 9}
    assert info["macd"].outputs == ("macd", "macdsignal", "macdhist")
    assert info["bbands"].outputs == ("upperband", "middleband", "lowerband")
    assert dict(info["bbands"].params)["nbdevup"] == 2.0
    assert info["stoch"].outputs == ("slowk", "slowd")
    assert info["rsi"].outputs == ("rsi",)
    assert info["macd"].warmup == 33 == ti.lookback("macd")
    assert ti.lookback("rsi", timeperiod=7) == 7


def test_patterns_equal_talib_signed_to_100(btc: pd.DataFrame) -> None:
    """detect_patterns has one int column per TA-Lib pattern: TA-Lib's sign times 100."""
    patterns = ti.detect_patterns(btc)
    assert list(patterns.columns) == [p.lower() for p in TALIB_PATTERNS]
    assert (patterns.dtypes == np.int32).all()
    rescaled = set()
    for func_name in TALIB_PATTERNS:
        raw = getattr(talib, func_name)(
            *(btc[c].to_numpy() for c in ("open", "high", "low", "close"))
        )
        if np.any((raw != 0) & (np.abs(raw) != 100)):
            rescaled.add(func_name)
        np.testing.assert_array_equal(patterns[func_name.lower()].to_numpy(), np.sign(raw) * 100)
    # the sample has confirmed Hikkakes (+-200 in TA-Lib) and weak Engulfings/Haramis (+-80)
    assert {"CDLHIKKAKE", "CDLENGULFING", "CDLHARAMI"} <= rescaled
    assert set(np.unique(patterns.to_numpy())) <= {-100, 0, 100}
    single = ti.compute(btc, "cdlhikkake")
    np.testing.assert_array_equal(single.to_numpy(), patterns["cdlhikkake"].to_numpy())


def test_pattern_summary_reads_the_latest_candles(btc: pd.DataFrame) -> None:
    """The summary lists exactly the non-zero pattern cells of the last candles, newest first."""
    full = ti.detect_patterns(btc).iloc[-5:]
    summary = ti.pattern_summary(btc, lookback=5)
    expected = {
        (name, 4 - row) for row in range(5) for name in full.columns if full.iloc[row][name] != 0
    }
    assert {(item["name"], item["bars_ago"]) for item in summary} == expected
    assert [item["bars_ago"] for item in summary] == sorted(item["bars_ago"] for item in summary)
    for item in summary:
        value = full.iloc[4 - item["bars_ago"]][item["name"]]
        if item["name"] not in ti.NEUTRAL_PATTERNS:
            assert item["direction"] == ("bullish" if value > 0 else "bearish")
        assert item["ts"] == int(full.index[4 - item["bars_ago"]].timestamp() * 1000)


def test_pattern_summary_finds_a_bullish_engulfing() -> None:
    """A big green candle engulfing a red one after a fall is reported as bullish, 0 bars ago."""
    rows: list[tuple[float, ...]] = [(110 - i, 111 - i, 108 - i, 109 - i, 1) for i in range(12)]
    rows += [(99.5, 99.8, 98.8, 99.0, 1), (98.8, 101.5, 98.6, 101.2, 1)]
    summary = ti.pattern_summary(frame(rows), lookback=1)
    engulfing = [s for s in summary if s["name"] == "cdlengulfing"]
    assert engulfing == [
        {
            "name": "cdlengulfing",
            "label": "Engulfing Pattern",
            "direction": "bullish",
            "bars_ago": 0,
            "ts": int(pd.Timestamp("2024-01-01 00:13", tz="UTC").timestamp() * 1000),
        }
    ]


def test_doji_family_is_neutral() -> None:
    """A doji is reported as neutral, not bullish, although TA-Lib marks it +100."""
    rows = [(100 + i, 101 + i, 99 + i, 100.5 + i, 1) for i in range(12)] + [(112, 113, 111, 112, 1)]
    summary = ti.pattern_summary(frame(rows), lookback=1)
    doji = [s for s in summary if s["name"] == "cdldoji"]
    assert doji
    assert doji[0]["direction"] == "neutral"


@pytest.mark.parametrize(
    "spec",
    # Patterns have no warm-up; data-dependent warm-ups have their own tests below.
    [
        f
        for f in ti.default_spec()
        if not f.name.startswith("cdl") and f.name not in DATA_DEPENDENT_WARMUP
    ],
    ids=lambda f: f.name,
)
def test_lookback_is_the_warm_up(btc: pd.DataFrame, spec: ti.Feature) -> None:
    """lookback(name) rows are NaN in some output, and the next row is complete."""
    out = ti.compute(btc, spec.name)
    values = out.to_numpy(dtype=float).reshape(len(btc), -1)
    if (
        (out.dtypes if isinstance(out, pd.DataFrame) else pd.Series([out.dtype]))
        .map(lambda d: d.kind == "i")
        .all()
    ):
        # Integer outputs (fractal, ht_trendmode...) fill the warm-up with 0, never NaN.
        assert not np.isnan(values).any()
        return
    warm = ti.lookback(spec.name)
    assert not np.isnan(values[warm]).any()
    if warm:
        assert np.isnan(values[warm - 1]).any()


@pytest.mark.parametrize("spec", ti.default_spec(), ids=lambda f: f.name)
def test_no_indicator_reads_the_future(btc: pd.DataFrame, spec: ti.Feature) -> None:
    """Every default feature computed on a prefix equals the full series over that prefix."""
    whole = ti.compute(btc, spec.name)
    for cut in (250, 1000):
        part = ti.compute(btc.iloc[:cut], spec.name)
        np.testing.assert_allclose(
            part.to_numpy(dtype=float), whole.iloc[:cut].to_numpy(dtype=float), rtol=1e-9, atol=1e-9
        )


def test_input_slots_can_be_overridden(btc: pd.DataFrame) -> None:
    """As in TA-Lib's abstract API, price='open' or an array replaces the default input."""
    assert_close(
        ti.compute(btc, "sma", price="open", timeperiod=5), talib.SMA(btc["open"].to_numpy(), 5)
    )
    periods = np.full(len(btc), 7.0)
    assert_close(
        ti.compute(btc, "mavp", periods=periods),
        # TA-Lib's stub types MAVP's periods as a float; it takes an array of periods.
        talib.MAVP(btc["close"].to_numpy(), periods),  # type: ignore[arg-type]
    )
    assert_close(
        ti.compute(btc, "zscore", price=btc["volume"]),
        ti.compute(btc.assign(close=btc["volume"]), "zscore"),
    )


def test_float_parameters_are_accepted_for_integer_ones(btc: pd.DataFrame) -> None:
    """An optimiser's 14.0 works where TA-Lib wants the integer 14."""
    assert_close(ti.compute(btc, "rsi", timeperiod=14.0), ti.compute(btc, "rsi", timeperiod=14))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("no_such_indicator", {}, "unknown indicator"),
        ("rsi", {"period": 14}, "no parameter"),
        ("sma", {"price": "vwap"}, "missing"),
    ],
)
def test_bad_requests_raise_indicator_error(
    btc: pd.DataFrame, name: str, params: dict[str, object], message: str
) -> None:
    """Unknown names, parameters and columns raise IndicatorError, a ConfigError."""
    with pytest.raises(ti.IndicatorError, match=message) as caught:
        ti.compute(btc, name, **params)
    assert isinstance(caught.value, ConfigError)


def test_memory_is_probed_from_behaviour() -> None:
    """SMA is finite, RSI converging, OBV additive, NVI multiplicative, TA-Lib's VWAP path."""
    info = ti.available()
    assert info["sma"].memory is ti.Memory.FINITE
    assert info["rsi"].memory is ti.Memory.CONVERGING
    assert info["obv"].memory is ti.Memory.ADDITIVE
    assert info["nvi"].memory is ti.Memory.MULTIPLICATIVE
    assert info["vwap"].memory is ti.Memory.PATH
    assert all(info[p.lower()].memory is ti.Memory.FINITE for p in TALIB_PATTERNS)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n, i in ti.available().items()
        if i.source == "kestrel" and i.memory in ("finite", "converging")
    ],
)
def test_declared_memory_of_own_indicators_matches_the_probe(name: str) -> None:
    """What Kestrel declares for its own indicators is what the behaviour probe finds.

    A converging indicator whose smoothing dies out within its warm-up (Connors RSI's RSI(3))
    may probe as finite; declaring it converging is the cautious side.
    """
    spec = ti._REGISTRY[name]
    probed = ti._probe(spec, {})
    declared = spec.info.memory
    assert probed is declared or (declared is ti.Memory.CONVERGING and probed is ti.Memory.FINITE)


# -- Custom indicators and formulas ----------------------------------------------------------


def test_decorated_indicator_works_like_a_builtin(
    btc: pd.DataFrame, scratch_names: list[str]
) -> None:
    """A registered function is listed, computed, used in formulas and feature frames."""
    scratch_names.extend(["range_pct", "range_twice"])

    @ti.indicator(
        "range_pct",
        params={"timeperiod": 5},
        inputs=("high", "low", "close"),
        warmup=lambda p: p["timeperiod"] - 1,
    )
    def range_pct(
        high: np.ndarray, low: np.ndarray, close: np.ndarray, timeperiod: int = 5
    ) -> np.ndarray:
        """Average high-low range in % of close."""
        return talib.SMA((high - low) / close * 100, timeperiod)

    info = ti.available()["range_pct"]
    assert (info.source, info.warmup, dict(info.params)) == ("custom", 4, {"timeperiod": 5})
    assert info.description == "Average high-low range in % of close."
    h, low, c = (btc[k].to_numpy() for k in ("high", "low", "close"))
    expected = talib.SMA((h - low) / c * 100, 9)
    assert_close(ti.compute(btc, "range_pct", timeperiod=9), expected)
    ti.register_formula("range_twice", "range_pct(timeperiod=9) * 2")
    assert_close(ti.compute(btc, "range_twice"), expected * 2)
    frame_ = ti.feature_frame(btc, [("range_pct", {"timeperiod": 9}), "range_twice"])
    assert_close(frame_["range_pct_9"], expected)
    assert ti.memory_of("range_pct") is ti.Memory.FINITE


def test_multi_output_custom_indicator(btc: pd.DataFrame, scratch_names: list[str]) -> None:
    """A custom indicator may return several outputs, named as declared."""
    scratch_names.append("band")

    @ti.indicator("band", outputs=("up", "down"), params={"k": 1.0}, inputs=("close",))
    def band(close: np.ndarray, k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        return close + k, close - k

    out = ti.compute(btc, "band", k=2.0)
    assert list(out.columns) == ["up", "down"]
    assert_close(out["up"] - out["down"], np.full(len(btc), 4.0))


def test_custom_indicator_returning_the_wrong_shape_is_refused(
    btc: pd.DataFrame, scratch_names: list[str]
) -> None:
    """A function returning a short array raises IndicatorError instead of misaligning."""
    scratch_names.append("short")

    @ti.indicator("short")
    def short(close: np.ndarray) -> np.ndarray:
        return close[1:]

    with pytest.raises(ti.IndicatorError, match="length"):
        ti.compute(btc, "short")


def test_builtins_cannot_be_replaced_or_removed(scratch_names: list[str]) -> None:
    """TA-Lib and Kestrel names are reserved; custom ones need replace=True to change."""
    with pytest.raises(ti.IndicatorError, match="already exists"):
        ti.register_formula("rsi", "close")
    with pytest.raises(ti.IndicatorError, match="built in"):
        ti.unregister("ichimoku")
    scratch_names.append("twice")
    ti.register_formula("twice", "close * 2")
    with pytest.raises(ti.IndicatorError, match="already exists"):
        ti.register_formula("twice", "close * 3")
    ti.register_formula("twice", "close * 3", replace=True)
    assert ti.available()["twice"].description == "close * 3"


def test_formula_with_parameters(btc: pd.DataFrame, scratch_names: list[str]) -> None:
    """ema(close, fast) - ema(close, slow) equals TA-Lib; params default, override and warm up."""
    scratch_names.append("ema_gap")
    info = ti.register_formula(
        "ema_gap",
        "ema(close, timeperiod=fast) - ema(close, timeperiod=slow)",
        params={"fast": 10, "slow": 30},
    )
    close = btc["close"].to_numpy()
    assert_close(ti.compute(btc, "ema_gap"), talib.EMA(close, 10) - talib.EMA(close, 30))
    assert_close(ti.compute(btc, "ema_gap", slow=50), talib.EMA(close, 10) - talib.EMA(close, 50))
    assert info.warmup == 29
    assert ti.lookback("ema_gap", slow=50) == 49
    assert info.columns == ("close",)


def test_formula_language(btc: pd.DataFrame, scratch_names: list[str]) -> None:
    """Outputs by attribute, nested calls, helpers, shift and NaN-aware comparisons."""
    scratch_names.extend(["mix", "signal_", "nested"])
    close, open_ = btc["close"].to_numpy(), btc["open"].to_numpy()
    ti.register_formula("mix", "macd(close).macdhist * 2 + shift(rsi(), 1) - abs(close - open)")
    macd = talib.MACD(close)[2]
    rsi_shift = np.concatenate(([np.nan], talib.RSI(close)[:-1]))
    assert_close(ti.compute(btc, "mix"), macd * 2 + rsi_shift - np.abs(close - open_))
    assert ti.lookback("mix") == 33
    ti.register_formula("signal_", "rsi(close, timeperiod=14) < 30")
    sig = ti.compute(btc, "signal_").to_numpy()
    assert np.isnan(sig[:14]).all()
    assert set(np.unique(sig[14:])) <= {0.0, 1.0}
    assert_close(sig[14:], (talib.RSI(close)[14:] < 30).astype(float))
    ti.register_formula("nested", "sma(rsi(close, timeperiod=7), timeperiod=3)")
    assert_close(ti.compute(btc, "nested"), talib.SMA(talib.RSI(close, 7), 3))
    assert ti.lookback("nested") == 9


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "close.__class__",
        "(lambda: 1)()",
        "close[0]",
        "[close]",
        "shift(close, -1)",
        "shift(close, n)",
        "unknown_thing + 1",
        "macd(close)",
        "macd(close).nope",
        "rsi(close, timeperiod=close)",
        "rsi(close, close)",
        "rsi(close, bogus=3)",
        "abs(close, open)",
        "close if close > 1 else open",
        "'text'",
        "close ==",
    ],
)
def test_formulas_outside_the_whitelist_are_refused(expression: str) -> None:
    """Anything but numbers, columns, operators and registered calls is rejected, never run."""
    with pytest.raises(ti.IndicatorError):
        ti.register_formula("refused", expression)
    assert "refused" not in ti.available()


def test_inputs_are_read_only_and_other_dtypes_convert(
    btc: pd.DataFrame, scratch_names: list[str]
) -> None:
    """Indicators cannot write into the caller's frame; int columns are read as floats."""
    scratch_names.append("vandal")

    @ti.indicator("vandal")
    def vandal(close: np.ndarray) -> np.ndarray:
        close[:] = 0.0
        return close

    frame_ = btc.iloc[:50].copy()
    with pytest.raises(ValueError, match="read-only"):
        ti.compute(frame_, "vandal")
    assert (frame_["close"] > 0).all()
    ints = frame_.assign(volume=(frame_["volume"] * 1000).astype("int64"))
    expected = talib.OBV(ints["close"].to_numpy(), ints["volume"].to_numpy(dtype=float))
    assert_close(ti.compute(ints, "obv"), expected)
    twice = pd.concat([frame_, frame_[["close"]]], axis=1)
    with pytest.raises(ti.IndicatorError, match="twice"):
        ti.compute(twice, "sma")
