"""The indicator registry: TA-Lib's functions, Kestrel's own and custom ones, by name.

`compute`, `lookback`, `available` and `memory_of` read it; `indicator` and `unregister`
change it. How far back a TA-Lib value depends is probed from its behaviour here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib
from talib import abstract, stream

from error_handler import InvariantError
from indicator_base import IndicatorError, IndicatorInfo, Memory, Output, ParamValue, _col, _Spec
from kestrel_indicators import _OWN
from utils.utilities import datetime_to_ms, parse_date_ms


# -- TA-Lib ----------------------------------------------------------------------------------


def _talib_spec(func_name: str) -> _Spec:
    fn = abstract.Function(func_name)  # type: ignore[attr-defined]
    info = fn.info
    slots: list[tuple[str, tuple[str, ...]]] = []
    for slot, cols in info["input_names"].items():
        slots.append((slot, (cols,) if isinstance(cols, str) else tuple(cols)))
    params = dict(info["parameters"])
    name = func_name.lower()
    outputs = tuple(info["output_names"])
    if len(outputs) == 1:
        outputs = (name,)
    is_pattern = info["group"] == "Pattern Recognition"
    meta = IndicatorInfo(
        name=name,
        group=info["group"],
        source="talib",
        inputs=tuple(slots),
        params=MappingProxyType(params),
        outputs=outputs,
        warmup=int(fn.lookback),
        memory=Memory.FINITE if is_pattern else None,
        description=info["display_name"],
    )
    return _Spec(
        info=meta,
        func=getattr(talib, func_name),
        warmup_fn=functools.partial(_talib_lookback, func_name),
        slot_names=frozenset(s for s, _ in slots),
        param_names=frozenset(params),
        is_pattern=is_pattern,
        talib_name=func_name,
        stream=getattr(stream, func_name),
    )


@functools.lru_cache(maxsize=4096)
def _talib_lookback_cached(func_name: str, items: tuple[tuple[str, Any], ...]) -> int:
    fn = abstract.Function(func_name)  # type: ignore[attr-defined]
    if items:
        fn.set_parameters(dict(items))
    return int(fn.lookback)


def _talib_lookback(func_name: str, params: Mapping[str, Any]) -> int:
    return _talib_lookback_cached(func_name, tuple(sorted(params.items())))


# -- Registry --------------------------------------------------------------------------------


def _build_registry() -> dict[str, _Spec]:
    specs = {spec.info.name: spec for spec in map(_talib_spec, talib.get_functions())}  # type: ignore[no-untyped-call]
    for spec in _OWN:
        if spec.info.name in specs:  # TA-Lib serves what it has; never shadow it
            raise InvariantError(f"{spec.info.name} is a TA-Lib function")
        specs[spec.info.name] = spec
    return specs


# The indicator catalogue, like talib's own function table: definitions, not runtime state.
# Custom indicators and formulas are added by `indicator`/`register_formula`.
_REGISTRY: Final[dict[str, _Spec]] = _build_registry()
PATTERN_NAMES: Final = tuple(sorted(n for n, s in _REGISTRY.items() if s.is_pattern))


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IndicatorError(
            f"unknown indicator {name!r}", component="technical_indicators"
        ) from None


def _coerce(spec: _Spec, params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = params.keys() - spec.param_names
    if unknown:
        raise IndicatorError(
            f"{spec.info.name} has no parameter {sorted(unknown)}; it takes "
            f"{sorted(spec.param_names)}",
            component="technical_indicators",
        )
    out: dict[str, Any] = {}
    for key, value in params.items():
        default = spec.info.params[key]
        if isinstance(value, str | datetime):  # a time parameter such as an anchor
            value = parse_date_ms(value) if isinstance(value, str) else datetime_to_ms(value)
        out[key] = (
            int(value) if isinstance(default, int) and not isinstance(default, bool) else value
        )
    return out


def _inputs(
    df: pd.DataFrame, spec: _Spec, params: dict[str, Any]
) -> tuple[list[npt.NDArray[Any]], dict[str, Any]]:
    overrides: dict[str, Any] = {}
    if params:
        overrides = {k: params.pop(k) for k in spec.slot_names & params.keys()}
        params = _coerce(spec, params)
    arrays: list[npt.NDArray[Any]] = []
    for slot, cols in spec.info.inputs:
        if slot not in overrides:
            arrays.extend(_col(df, c) for c in cols)
            continue
        value = overrides[slot]
        items = [value] if isinstance(value, str) or np.ndim(value) == 1 else list(value)
        if len(items) != len(cols):
            raise IndicatorError(
                f"{spec.info.name}: input {slot!r} takes {len(cols)} series",
                component="technical_indicators",
            )
        for item in items:
            if isinstance(item, str):
                arrays.append(_col(df, item))
            else:
                arrays.append(np.asarray(item, dtype=np.float64))
    return arrays, params


def _wrap(spec: _Spec, out: Output, index: pd.Index) -> pd.Series | pd.DataFrame:
    if isinstance(out, np.ndarray):
        return pd.Series(out, index=index, name=spec.info.name, copy=False)
    return pd.DataFrame(dict(zip(spec.info.outputs, out, strict=True)), index=index, copy=False)


def compute(df: pd.DataFrame, name: str, **params: Any) -> pd.Series | pd.DataFrame:
    """Compute one registered indicator on a candle frame.

    Args:
        df: Candles with float64 columns open high low close volume and a UTC
            DatetimeIndex (bar open times).
        name: Registry name, e.g. "rsi", "macd", "cdlengulfing", "ichimoku".
        **params: The indicator's parameters (TA-Lib names and defaults); an input slot
            name (`price`, `prices`, `periods`...) overrides the input with a column name or
            an array, as in TA-Lib's abstract API.

    Returns:
        A Series named `name` for one output, else a DataFrame of the output names; both
        aligned with `df.index`. Warm-up rows are NaN; patterns are -100, 0 or 100.

    Raises:
        IndicatorError: for an unknown name, parameter or input column.
    """
    spec = _spec(name)
    arrays, params = _inputs(df, spec, params)
    with np.errstate(all="ignore"):  # NaN in warm-up or on flat data is a value, not an error
        out = spec.call(arrays, params)
    return _wrap(spec, out, df.index)


def lookback(name: str, **params: Any) -> int:
    """Return how many leading rows of `name` are NaN (warm-up) for these parameters."""
    spec = _spec(name)
    return spec.warmup_fn({**spec.info.params, **_coerce(spec, params)})


def available() -> dict[str, IndicatorInfo]:
    """Return every registered indicator, TA-Lib's, Kestrel's and custom, by name."""
    return {name: _with_memory(_REGISTRY[name]) for name in sorted(_REGISTRY)}


def _with_memory(spec: _Spec) -> IndicatorInfo:
    if spec.info.memory is not None:
        return spec.info
    try:
        memory = memory_of(spec.info.name)
    except IndicatorError:  # a formula whose indicator was unregistered since
        return spec.info
    return IndicatorInfo(**{**_fields(spec.info), "memory": memory})


def _fields(info: IndicatorInfo) -> dict[str, Any]:
    return {k: getattr(info, k) for k in IndicatorInfo.__slots__}


# -- Memory probe ----------------------------------------------------------------------------
# How far back a TA-Lib function's value depends is read from its behaviour, not hand-listed:
# on a seeded random walk, compare the full computation with recomputations on short tails.

_PROBE_BARS: Final = 3000
CONVERGE_BARS: Final = 1000  # tail that reproduces converging indicators to ~1e-9


@functools.lru_cache(maxsize=1)
def _probe_data() -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(20240101)
    n = _PROBE_BARS
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n)))
    open_ = np.concatenate(([close[0]], close[:-1]))
    spread = close * rng.uniform(0.0005, 0.004, n)
    data = {
        "open": open_,
        "high": np.maximum(open_, close) + spread * rng.random(n),
        "low": np.minimum(open_, close) - spread * rng.random(n),
        "close": close,
        "volume": rng.lognormal(3.0, 1.0, n),
        "ts": 1_704_067_200_000 + 60_000 * np.arange(n, dtype=np.int64),
        "periods": np.full(n, 10.0),
    }
    for values in data.values():
        values.flags.writeable = False  # shared by every probe: no indicator may alter it
    return data


def _outputs(out: Output) -> tuple[npt.NDArray[Any], ...]:
    return (out,) if isinstance(out, np.ndarray) else tuple(out)


def _same(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return bool(np.allclose(a, b, rtol=1e-8, atol=1e-8, equal_nan=True))


def _tail_rows(
    spec: _Spec, arrays: Sequence[npt.NDArray[Any]], params: Mapping[str, Any], end: int, size: int
) -> tuple[npt.NDArray[Any], ...]:
    start = max(0, end - size)
    return _outputs(spec.call([a[start:end] for a in arrays], params))


_PROBE_ENDS: Final = (_PROBE_BARS, _PROBE_BARS - 137, _PROBE_BARS - 611, _PROBE_BARS - 1009, 1500)


def _tails_match(
    spec: _Spec,
    arrays: Sequence[npt.NDArray[Any]],
    params: Mapping[str, Any],
    full: tuple[npt.NDArray[Any], ...],
    size: int,
    step: Callable[[npt.NDArray[Any], int], Any],
) -> bool:
    """Return True if `step` of a `size`-bar tail equals `step` of the full run at every end."""
    for end in _PROBE_ENDS:
        tail = _tail_rows(spec, arrays, params, end, size)
        for t, f in zip(tail, full, strict=True):
            if not _same(np.asarray(step(t, len(t))), np.asarray(step(f, end))):
                return False
    return True


def _probe(spec: _Spec, params: Mapping[str, Any]) -> Memory:
    data = _probe_data()
    try:
        arrays = [data[c] for c in spec.info.columns]
    except KeyError:
        return Memory.PATH
    try:
        with np.errstate(all="ignore"):
            full = _outputs(spec.call(arrays, params))
    except Exception:  # a user function that fails on the probe: assume the longest memory
        return Memory.PATH
    warm = spec.warmup_fn({**spec.info.params, **params})

    def matches(size: int, step: Callable[[npt.NDArray[Any], int], Any]) -> bool:
        return _tails_match(spec, arrays, params, full, size, step)

    with np.errstate(all="ignore"):
        if matches(warm + 1, lambda x, n: x[n - 1]):
            return Memory.FINITE
        # converging first: a decaying sum such as PLUS_DM has bar-to-bar ratios that match
        # by accident whenever the new term is zero
        if warm < CONVERGE_BARS and matches(CONVERGE_BARS, lambda x, n: x[n - 1]):
            return Memory.CONVERGING
        if matches(warm + 2, lambda x, n: x[n - 1] - x[n - 2]):
            return Memory.ADDITIVE
        if matches(warm + 2, lambda x, n: x[n - 1] / x[n - 2]):
            return Memory.MULTIPLICATIVE
    return Memory.PATH


def _converge_tail(spec: _Spec, params: Mapping[str, Any], limit: int) -> int:
    # 1.5x the shortest tail that reproduces the full computation on the probe data
    # (to 1e-8), capped at `limit`
    data = _probe_data()
    arrays = [data[c] for c in spec.info.columns]
    size = max(32, spec.warmup_fn({**spec.info.params, **params}) + 1)
    with np.errstate(all="ignore"):
        full = _outputs(spec.call(arrays, params))
        while size < limit:
            if all(
                _same(t[-1], f[end - 1])
                for end in (_PROBE_BARS, _PROBE_BARS - 137, _PROBE_BARS - 611, 1500)
                for t, f in zip(_tail_rows(spec, arrays, params, end, size), full, strict=True)
            ):
                return min(limit, size * 3 // 2)
            size = size * 3 // 2
    return limit


@functools.lru_cache(maxsize=4096)
def _converge_cached(name: str, items: tuple[tuple[str, Any], ...], limit: int) -> int:
    return _converge_tail(_spec(name), dict(items), limit)


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=4096)
def _memory_cached(name: str, items: tuple[tuple[str, Any], ...]) -> Memory:
    spec = _spec(name)
    if spec.info.memory is not None:
        return spec.info.memory
    return _probe(spec, dict(items))


def memory_of(name: str, **params: Any) -> Memory:
    """Return how far back `name`'s values depend (probed once for TA-Lib functions)."""
    spec = _spec(name)
    return _memory_cached(name, _key(_coerce(spec, params)))


# -- Custom indicators and formulas ----------------------------------------------------------


def _register(spec: _Spec, replace: bool) -> None:
    name = spec.info.name
    current = _REGISTRY.get(name)
    if current is not None and (current.info.source in ("talib", "kestrel") or not replace):
        raise IndicatorError(f"indicator {name!r} already exists", component="technical_indicators")
    if not name.isidentifier() or name != name.lower():
        raise IndicatorError(f"bad indicator name {name!r}", component="technical_indicators")
    _REGISTRY[name] = spec
    _memory_cached.cache_clear()
    _converge_cached.cache_clear()


def unregister(name: str) -> None:
    """Remove a custom indicator or formula (built-ins cannot be removed)."""
    spec = _spec(name)
    if spec.info.source in ("talib", "kestrel"):
        raise IndicatorError(f"{name!r} is built in", component="technical_indicators")
    del _REGISTRY[name]
    _memory_cached.cache_clear()
    _converge_cached.cache_clear()


def _slots(columns: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (("price", tuple(columns)),) if len(columns) == 1 else (("prices", tuple(columns)),)


def _warmup_fn(
    warmup: int | Callable[[Mapping[str, Any]], int],
) -> Callable[[Mapping[str, Any]], int]:
    if callable(warmup):
        return warmup
    return lambda _params: int(warmup)


def indicator(
    name: str,
    *,
    outputs: Sequence[str] | None = None,
    params: Mapping[str, ParamValue] | None = None,
    warmup: int | Callable[[Mapping[str, Any]], int] = 0,
    inputs: Sequence[str] = ("close",),
    memory: Memory | None = None,
    description: str = "",
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a user function as an indicator usable by compute(), features and formulas.

    The function receives the `inputs` columns as float64 arrays (read-only views of the
    frame: do not write into them), positionally, and the parameters as keywords; it
    returns one array (or Series) per output, as a tuple when there are several. Example::

        @indicator("range_pct", params={"timeperiod": 14}, inputs=("high", "low", "close"),
                   warmup=lambda p: p["timeperiod"] - 1)
        def range_pct(high, low, close, timeperiod=14):
            return talib.SMA((high - low) / close, timeperiod)

    Args:
        name: Lower-case identifier, unique in the registry.
        outputs: Output names (default: the indicator's name, one output).
        params: Parameter defaults.
        warmup: Leading NaN rows, or a function of the parameters returning it.
        inputs: Input column names ("open", "high", "low", "close", "volume", "ts").
        memory: How far back values depend; probed from the function when None.
        description: One line for the UI.
        replace: Allow replacing an earlier custom indicator of that name.
    """
    outs = tuple(outputs or (name,))
    defaults = dict(params or {})

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        def call(*arrays: npt.NDArray[Any], **kwargs: Any) -> Output:
            result = func(*arrays, **kwargs)
            parts = (result,) if len(outs) == 1 else tuple(result)
            converted = tuple(np.asarray(part, dtype=np.float64) for part in parts)
            if len(converted) != len(outs) or any(p.shape != arrays[0].shape for p in converted):
                raise IndicatorError(
                    f"{name} must return {len(outs)} array(s) of the input's length",
                    component="technical_indicators",
                )
            return converted[0] if len(outs) == 1 else converted

        fn = _warmup_fn(warmup)
        info = IndicatorInfo(
            name=name,
            group="Custom",
            source="custom",
            inputs=_slots(inputs),
            params=MappingProxyType(defaults),
            outputs=outs,
            warmup=fn(defaults),
            memory=memory,
            description=description or (func.__doc__ or name).strip().splitlines()[0],
        )
        _register(
            _Spec(info, call, fn, frozenset(s for s, _ in info.inputs), frozenset(defaults)),
            replace,
        )
        return func

    return decorate
