"""Strategies: declared parameters, vectorised signal columns, and one Signal per closed candle.

A strategy computes boolean columns `enter_long`, `exit_long` (and, if it shorts,
`enter_short`, `exit_short`) over a candle frame using only causal indicators, so the
value at row *i* depends on rows <= *i* only. The same `populate` serves the backtest fast
path (whole archive at once), the replay and live paths (`signal` on the rolling window's
last row), and the optimiser (parameter ranges).
"""

from __future__ import annotations

import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from error_handler import ConfigError
from models import Side, Signal


@dataclass(frozen=True, slots=True)
class Param:
    """A tunable parameter with its optimisation range."""

    default: float
    low: float
    high: float
    integer: bool = True
    step: float | None = None

    def clip(self, value: float) -> float:
        """Return `value` within range, rounded for integer parameters."""
        value = min(max(value, self.low), self.high)
        return float(round(value)) if self.integer else float(value)


SIGNAL_COLUMNS = ("enter_long", "exit_long", "enter_short", "exit_short")


class Strategy(ABC):
    """Base class: subclasses declare `name`, `parameters` and implement `populate`."""

    name: ClassVar[str] = "base"
    parameters: ClassVar[Mapping[str, Param]] = {}
    can_short: ClassVar[bool] = False

    def __init__(self, **params: float) -> None:
        unknown = set(params) - set(self.parameters)
        if unknown:
            raise ConfigError(
                f"strategy {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.parameters)}",
                component="strategy",
            )
        self.params: dict[str, float] = {
            key: spec.clip(float(params.get(key, spec.default)))
            for key, spec in self.parameters.items()
        }
        self.validate()

    def validate(self) -> None:
        """Check cross-parameter rules; raise ConfigError when broken."""

    @property
    def warmup(self) -> int:
        """Return how many candles the indicators need before signals are valid."""
        return int(max(self.params.values(), default=1)) * 3 + 1

    @abstractmethod
    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return a frame aligned with `df` holding the signal columns (and features)."""

    def signal(self, pair: str, df: pd.DataFrame, *, holding: bool) -> Signal | None:
        """Return the signal for the last (closed) candle of `df`, or None."""
        if len(df) < self.warmup:
            return None
        cols = self.populate(df)
        row = cols.iloc[-1]
        ts = int(df.index[-1].value // 1_000_000)
        price = float(df["close"].iloc[-1])
        features = {
            k: float(v)
            for k, v in row.items()
            if k not in SIGNAL_COLUMNS and isinstance(v, int | float | np.floating)
        }
        if holding and bool(row.get("exit_long", False)):
            return Signal(
                pair,
                Side.SELL,
                1.0,
                f"{self.name}: exit",
                ts,
                price,
                self.name,
                exit_only=True,
                features=features,
            )
        if not holding and bool(row.get("enter_long", False)):
            return Signal(
                pair, Side.BUY, 1.0, f"{self.name}: entry", ts, price, self.name, features=features
            )
        return None

    def describe(self) -> dict[str, Any]:
        """Return name and parameters, for summaries."""
        return {"name": self.name, "params": dict(self.params)}


def _crossed_above(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    prev_a = np.roll(a, 1)
    prev_b = np.roll(b, 1)
    out = (a > b) & (prev_a <= prev_b)
    out[:1] = False
    return out & ~np.isnan(prev_a) & ~np.isnan(prev_b)


def _crossed_below(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _crossed_above(b, a)


class SmaCross(Strategy):
    """Long when the fast SMA crosses above the slow SMA; exit on the cross back down.

    The parity reference against backtesting.py and vectorbt.
    """

    name = "sma_cross"
    parameters: ClassVar[Mapping[str, Param]] = {
        "fast": Param(10, 2, 100),
        "slow": Param(30, 5, 400),
    }

    def validate(self) -> None:
        """Require fast < slow."""
        if self.params["fast"] >= self.params["slow"]:
            raise ConfigError("sma_cross: fast must be below slow", component="strategy")

    @property
    def warmup(self) -> int:
        """Return the slow period plus one (SMA is exact once the window is full)."""
        return int(self.params["slow"]) + 1

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return SMA crossings."""
        import talib

        close = df["close"].to_numpy(dtype=np.float64)
        fast = talib.SMA(close, timeperiod=int(self.params["fast"]))
        slow = talib.SMA(close, timeperiod=int(self.params["slow"]))
        return pd.DataFrame(
            {
                "enter_long": _crossed_above(fast, slow),
                "exit_long": _crossed_below(fast, slow),
                "sma_fast": fast,
                "sma_slow": slow,
            },
            index=df.index,
        )


class EmaCross(Strategy):
    """Long on a fast/slow EMA crossover when ADX confirms a trend; exit on the cross back.

    With `adx_min` = 0 the ADX filter is off.
    """

    name = "ema_cross"
    parameters: ClassVar[Mapping[str, Param]] = {
        "fast": Param(12, 2, 100),
        "slow": Param(26, 5, 400),
        "adx_period": Param(14, 5, 50),
        "adx_min": Param(20, 0, 50),
    }

    def validate(self) -> None:
        """Require fast < slow."""
        if self.params["fast"] >= self.params["slow"]:
            raise ConfigError("ema_cross: fast must be below slow", component="strategy")

    @property
    def warmup(self) -> int:
        """Return enough candles for the EMAs to converge (about 4x the slow period)."""
        return int(max(self.params["slow"], self.params["adx_period"] * 2)) * 4

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return EMA crossings filtered by ADX."""
        import talib

        close = df["close"].to_numpy(dtype=np.float64)
        fast = talib.EMA(close, timeperiod=int(self.params["fast"]))
        slow = talib.EMA(close, timeperiod=int(self.params["slow"]))
        adx = talib.ADX(
            df["high"].to_numpy(dtype=np.float64),
            df["low"].to_numpy(dtype=np.float64),
            close,
            timeperiod=int(self.params["adx_period"]),
        )
        trend_ok = np.nan_to_num(adx, nan=0.0) >= self.params["adx_min"]
        return pd.DataFrame(
            {
                "enter_long": _crossed_above(fast, slow) & trend_ok,
                "exit_long": _crossed_below(fast, slow),
                "ema_fast": fast,
                "ema_slow": slow,
                "adx": adx,
            },
            index=df.index,
        )


BUILTIN: dict[str, type[Strategy]] = {cls.name: cls for cls in (SmaCross, EmaCross)}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under its `name` (usable as a decorator)."""
    BUILTIN[cls.name] = cls
    return cls


def load_strategy(name_or_path: str, params: Mapping[str, float] | None = None) -> Strategy:
    """Return a strategy by built-in name, or from a `.py` file defining a Strategy subclass.

    Raises:
        ConfigError: unknown name, unreadable file, or bad parameters.
    """
    params = dict(params or {})
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path](**params)
    path = Path(name_or_path)
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(
            f"unknown strategy {name_or_path!r}; built-ins: {sorted(BUILTIN)} "
            "(or pass a path to a .py file)",
            component="strategy",
        )
    spec = importlib.util.spec_from_file_location(f"user_strategy_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load strategy file {path}", component="strategy")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"strategy file {path} failed to import: {e}") from e
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Strategy) and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ConfigError(f"{path} must define exactly one Strategy subclass, found {len(found)}")
    return found[0](**params)
