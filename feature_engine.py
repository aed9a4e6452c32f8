"""Feature frames and the live feature engine: many indicators at once, batch or O(1) per bar.

`feature_frame` computes a spec over a candle frame; `FeatureEngine` keeps one pair's
features current candle by candle from a bounded tail window.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib

from candle_patterns import _pattern_value
from error_handler import InvariantError
from indicator_base import _COLUMN_ORDER, DAY_MS, IndicatorError, Memory, ParamValue, _col, _Spec
from indicator_registry import (
    _REGISTRY,
    CONVERGE_BARS,
    PATTERN_NAMES,
    _coerce,
    _converge_cached,
    _key,
    _outputs,
    _spec,
    memory_of,
)
from models import Candle


# Groups of TA-Lib functions that are arithmetic, not indicators: kept out of the default
# feature spec (they stay available by name).
NON_FEATURE_GROUPS: Final = frozenset({"Math Operators", "Math Transform"})


# -- Feature frames --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Feature:
    """One indicator with parameters in a feature spec; `key` prefixes its columns.

    Columns are `key` for a single output and `key_<output>` for several (`macd_macdhist`).
    The key is the alias, else the name, suffixed with the parameter values when any are
    given (`rsi_7`).
    """

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    alias: str | None = None

    @property
    def key(self) -> str:
        """Return the column prefix."""
        if self.alias:
            return self.alias
        if not self.params:
            return self.name
        values = (str(v) if isinstance(v, int) else f"{v:g}" for v in self.params.values())
        return "_".join([self.name, *values])

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the output column names."""
        outputs = _spec(self.name).info.outputs
        if len(outputs) == 1:
            return (self.key,)
        return tuple(f"{self.key}_{out}" for out in outputs)


FeatureSpec: TypeAlias = Iterable["str | Feature | tuple[str, Mapping[str, ParamValue]]"]


def default_spec() -> tuple[Feature, ...]:
    """Return every registered indicator at its defaults, plus the 61 patterns.

    Left out: TA-Lib's arithmetic groups (Math Operators/Transform), indicators needing an
    input that is not a candle column (`mavp`'s periods) and `anchored_vwap`, which needs an
    anchor chosen by the strategy.
    """
    usable = set(_COLUMN_ORDER)
    names = [
        name
        for name, spec in sorted(_REGISTRY.items())
        if spec.info.group not in NON_FEATURE_GROUPS
        and set(spec.info.columns) <= usable
        and name != "anchored_vwap"
    ]
    return tuple(Feature(name) for name in names)


def _features(spec: FeatureSpec | None) -> list[Feature]:
    items: list[Feature] = []
    for item in default_spec() if spec is None else spec:
        if isinstance(item, Feature):
            items.append(item)
        elif item == "patterns":
            items.extend(Feature(name) for name in PATTERN_NAMES)
        elif isinstance(item, str):
            items.append(Feature(item))
        else:
            name, params = item
            items.append(Feature(name, dict(params)))
    seen: set[str] = set()
    for feature in items:
        _coerce(_spec(feature.name), feature.params)
        clash = seen.intersection(feature.columns)
        if clash:
            raise IndicatorError(
                f"feature columns {sorted(clash)} appear twice", component="technical_indicators"
            )
        seen.update(feature.columns)
    return items


def feature_frame(df: pd.DataFrame, spec: FeatureSpec | None = None) -> pd.DataFrame:
    """Compute many indicators and patterns at once, one column per output.

    Args:
        df: Candle frame (open high low close volume, UTC DatetimeIndex).
        spec: Names, (name, params) pairs, `Feature`s, or "patterns" for all 61; None for
            `default_spec()`.

    Returns:
        A frame aligned with `df.index`; floats, patterns as int32.
    """
    features = _features(spec)
    cache: dict[str, npt.NDArray[Any]] = {}
    data: dict[str, npt.NDArray[Any]] = {}
    for feature in features:
        entry = _spec(feature.name)
        arrays = [
            cache[c] if c in cache else cache.setdefault(c, _col(df, c)) for c in entry.info.columns
        ]
        with np.errstate(all="ignore"):
            outs = _outputs(entry.call(arrays, _coerce(entry, feature.params)))
        data.update(zip(feature.columns, outs, strict=True))
    return pd.DataFrame(data, index=df.index, copy=False)


# -- Live incremental features ---------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    spec: _Spec
    params: dict[str, Any]
    columns: tuple[str, ...]
    memory: Memory
    tail: int  # bars recomputed per candle; 0 = the whole window
    inputs: tuple[str, ...] = ()
    level: list[float] | None = None  # chained values of additive/multiplicative outputs
    handle: Any = None  # a talib.stream handle, once open
    streams: bool = False
    single: bool = True
    pick: Callable[[Mapping[str, float]], tuple[float, ...]] = lambda bar: ()

    def __post_init__(self) -> None:
        self.inputs = self.spec.info.columns
        self.streams = self.spec.stream is not None
        self.single = len(self.columns) == 1
        getter = operator.itemgetter(*self.inputs)
        self.pick = (lambda bar: (getter(bar),)) if len(self.inputs) == 1 else getter
        if self.memory in (Memory.ADDITIVE, Memory.MULTIPLICATIVE):
            self.level = []


class FeatureEngine:
    """Keep one pair's features current, candle by candle, from a bounded tail window.

    Stateful features run on live handles, opened once on the seed history and then advanced
    O(1) per closed candle: TA-Lib's own streaming API (`talib.stream`, bit-identical to the
    Function API over the whole history, running totals such as OBV and path-dependent ones
    such as SAR included) and Kestrel's resumable kernels (session VWAP, anchored VWAP,
    ZigZag, daily pivots), which carry their state the same way.

    Every other feature (Kestrel's windowed ones, custom indicators, formulas) is recomputed
    per closed candle from a ring of the last `window` candles, on only the tail its memory
    needs (see `Memory`):

    - finite (z-score, Ichimoku, ALMA...): the last warm-up + 1 bars; exact.
    - converging (Fisher, Schaff, WaveTrend... anything with an EMA or Wilder average
      inside): a tail found by probing (1.5x the shortest that reproduces the full result
      to 1e-8 on a random walk), at most `converge_bars`. Old bars fade out geometrically,
      so the value matches a full recomputation to ~1e-8 of its scale; `converge_bars`
      (1000) is many times the longest default lookback (a custom indicator with a longer
      memory needs a larger one).
    - additive / multiplicative (a custom running total): the last step is chained onto the
      level computed over the whole seed history; exact.
    - session / path without a resumable kernel (custom): the whole window; exact while the
      window reaches back past the session start or anchor they depend on.

    Args:
        spec: Feature spec as for `feature_frame` (None: `default_spec()`).
        window: Candles kept; default: the largest tail any feature needs.
        converge_bars: Longest tail for converging features.
    """

    def __init__(
        self,
        spec: FeatureSpec | None = None,
        *,
        window: int | None = None,
        converge_bars: int = CONVERGE_BARS,
    ) -> None:
        self._plans: list[_Plan] = []
        for feature in _features(spec):
            entry = _spec(feature.name)
            params = _coerce(entry, feature.params)
            warm = entry.warmup_fn({**entry.info.params, **params})
            if entry.stream is not None:
                self._plans.append(_Plan(entry, params, feature.columns, Memory.PATH, warm + 1))
                continue
            memory = memory_of(feature.name, **params)
            tail = 0  # session / path: the whole window
            if memory is Memory.FINITE:
                tail = warm + 1
            elif memory is Memory.CONVERGING:
                tail = max(warm + 1, _converge_cached(feature.name, _key(params), converge_bars))
            elif memory in (Memory.ADDITIVE, Memory.MULTIPLICATIVE):
                tail = warm + 2
            self._plans.append(_Plan(entry, params, feature.columns, memory, tail))
        self._streams = [plan for plan in self._plans if plan.streams]
        self._template: dict[str, float] = dict.fromkeys(
            (col for plan in self._plans for col in plan.columns), math.nan
        )
        self._requested_window = window
        self._window = 0
        self._count = 0  # candles seen since seed
        self._end = 0
        self._buffers: dict[str, npt.NDArray[Any]] = {}
        self._latest: dict[str, float] = {}

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the feature names, in spec order."""
        return tuple(self._template)

    @property
    def window(self) -> int:
        """Return the number of candles kept (known after `seed`)."""
        return self._window

    @property
    def latest(self) -> dict[str, float]:
        """Return the latest feature row."""
        return dict(self._latest)

    def seed(self, history: pd.DataFrame) -> dict[str, float]:
        """Load closed candles (oldest first) and return the features of the last one.

        TA-Lib handles and running totals are computed once over the whole history;
        afterwards only the window is kept.

        Raises:
            IndicatorError: for an empty history or one missing a column.
        """
        if history.empty:
            raise IndicatorError("seed needs at least one candle", component="technical_indicators")
        arrays = {c: _col(history, c) for c in _COLUMN_ORDER}
        self._window = self._requested_window or self._default_window(arrays["ts"])
        keep = min(len(history), self._window)
        self._buffers = {
            c: np.empty(2 * self._window, dtype=np.int64 if c == "ts" else np.float64)
            for c in _COLUMN_ORDER
        }
        for c, values in arrays.items():
            self._buffers[c][:keep] = values[-keep:]
        self._end = keep
        self._count = len(history)
        row = self._template.copy()
        for plan in self._plans:
            plan.handle = None
            if plan.streams:
                row.update(self._open(plan, [arrays[c] for c in plan.inputs]))
            elif plan.level is not None:
                with np.errstate(all="ignore"):
                    outs = _outputs(plan.spec.call([arrays[c] for c in plan.inputs], plan.params))
                plan.level = [float(out[-1]) for out in outs]
        self._recompute(row, step=False)
        self._latest = row
        return dict(row)

    def update(self, candle: Candle) -> dict[str, float]:
        """Append one closed candle and return the features as of its close.

        Raises:
            InvariantError: if the candle is still open, not newer than the last one, or
                has a non-finite price or volume.
            IndicatorError: if `seed` was not called first.
        """
        if not self._buffers:
            raise IndicatorError("call seed() before update()", component="technical_indicators")
        bar = {
            "ts": candle.ts,
            "open": candle.open,
            "high": candle.high,
            "low": candle.low,
            "close": candle.close,
            "volume": candle.volume,
        }
        self._check(candle, bar)
        if self._end == 2 * self._window:  # compact: keep the newest window, contiguous
            for buffer in self._buffers.values():
                buffer[: self._window] = buffer[self._window :]
            self._end = self._window
        for c, value in bar.items():
            self._buffers[c][self._end] = value
        self._end += 1
        self._count += 1
        row = self._template.copy()
        for plan in self._streams:
            if plan.handle is None:
                row.update(self._reopen(plan))
                continue
            value = plan.handle.update(*plan.pick(bar))
            if not plan.single:
                row.update(zip(plan.columns, value, strict=True))
            elif plan.spec.is_pattern:
                row[plan.columns[0]] = _pattern_value(value)
            else:
                row[plan.columns[0]] = value
        self._recompute(row, step=True)
        self._latest = row
        return dict(row)

    def _check(self, candle: Candle, bar: Mapping[str, float]) -> None:
        if not candle.closed:
            raise InvariantError("features only take closed candles", pair=candle.pair)
        if candle.ts <= int(self._buffers["ts"][self._end - 1]):
            raise InvariantError(
                "candle is not newer than the last one", pair=candle.pair, ts=candle.ts
            )
        if not all(math.isfinite(v) for v in bar.values()):
            raise InvariantError("candle has a non-finite value", pair=candle.pair, ts=candle.ts)

    def _open(self, plan: _Plan, arrays: list[npt.NDArray[Any]]) -> dict[str, float]:
        assert plan.spec.stream is not None
        try:
            plan.handle = plan.spec.stream(*arrays, **plan.params)
        except talib.InsufficientHistory:  # type: ignore[attr-defined]
            return dict.fromkeys(plan.columns, math.nan)
        value = plan.handle.value
        values = value if isinstance(value, tuple) else (value,)
        if plan.spec.is_pattern:
            values = tuple(_pattern_value(v) for v in values)
        return dict(zip(plan.columns, map(float, values), strict=True))

    def _reopen(self, plan: _Plan) -> dict[str, float]:
        # Too little history at seed: open on the window, which still holds every candle
        # unless the window is shorter than the function's warm-up.
        begin = max(0, self._end - self._window)
        return self._open(plan, [self._buffers[c][begin : self._end] for c in plan.inputs])

    def _default_window(self, ts: npt.NDArray[np.int64]) -> int:
        plans = [plan for plan in self._plans if not plan.streams]
        needed = max((plan.tail for plan in plans), default=1)
        sessions = max((plan.spec.sessions for plan in plans), default=0)
        if sessions:
            bar_ms = int(np.median(np.diff(ts))) if len(ts) > 1 else 60_000
            needed = max(needed, sessions * DAY_MS // max(bar_ms, 1) + 1)
        if any(plan.memory is Memory.PATH for plan in plans):
            needed = max(needed, CONVERGE_BARS)
        return needed

    @staticmethod
    def _session_tail(ts: npt.NDArray[np.int64], sessions: int) -> int:
        # walk back over UTC days that have candles, as the kernels do across data gaps
        start = int(np.searchsorted(ts, int(ts[-1]) // DAY_MS * DAY_MS))
        for _ in range(sessions - 1):
            if start == 0:
                break
            start = int(np.searchsorted(ts, int(ts[start - 1]) // DAY_MS * DAY_MS))
        return len(ts) - start

    def _recompute(self, row: dict[str, float], *, step: bool) -> None:
        begin = max(0, self._end - self._window)
        views = {c: buffer[begin : self._end] for c, buffer in self._buffers.items()}
        for view in views.values():
            view.flags.writeable = False  # custom code must not alter the window
        complete = self._count <= self._window  # the window still holds every candle
        with np.errstate(all="ignore"):
            for plan in self._plans:
                if plan.streams:
                    continue
                tail = plan.tail
                if plan.memory is Memory.SESSION:
                    tail = self._session_tail(views["ts"], plan.spec.sessions)
                elif complete and plan.level is not None:
                    tail = 0
                arrays = [views[c][-tail:] if tail else views[c] for c in plan.inputs]
                outs = _outputs(plan.spec.call(arrays, plan.params))
                values = [float(out[-1]) for out in outs]
                if plan.level is not None:
                    values = self._chain(plan, outs, values, exact=complete, step=step)
                row.update(zip(plan.columns, values, strict=True))

    @staticmethod
    def _chain(
        plan: _Plan,
        outs: tuple[npt.NDArray[Any], ...],
        values: list[float],
        *,
        exact: bool,
        step: bool,
    ) -> list[float]:
        level = plan.level or values
        if exact:  # computed over every candle seen: nothing to chain
            level = values
        elif step and plan.memory is Memory.ADDITIVE:
            level = [lv + float(o[-1] - o[-2]) for lv, o in zip(level, outs, strict=True)]
        elif step:
            level = [lv * float(o[-1] / o[-2]) for lv, o in zip(level, outs, strict=True)]
        plan.level = level
        return list(level)
