"""A trained reinforcement-learning policy as a strategy: observations, numpy inference, files.

The agent (`rl_agent`) trains in TensorFlow; trading never does. A policy is exported as
plain arrays (`policy.npz` plus `policy.json`) and decided by a numpy forward pass, a few
microseconds per decision, with no TensorFlow import (Keras' `model.predict` costs ~70 ms
a call). Part of `strategy`, which resolves `--strategy rl:<dir>` (and `rl`, the
registry's champion) to `RLStrategy` here.

Observations are the indicator library's features of the candle frame (`feature_frame`),
scale-free (returns, band positions, Williams %R, relative volatility), standardised with
the training data's mean and deviation saved in the policy, clipped to +-5, plus the
position held (0 flat, 1 long). Every feature reads a finite window (at most 50 rows), so
a rolling window and the whole archive give the same observation.

Actions: 0 flat, 1 long (spot). The strategy's `enter_long` at a row is "the policy, when
flat, wants to be long"; `exit_long` is "the policy, when long, wants to be flat". The
pipeline picks the one that matches what is really held, so live, replay and the backtest
fast path all take the policy's decision for the real position.

A missing, unreadable or failing policy never crashes trading: the strategy gives no signal
(neutral), logs `rl_policy_failed` and sends an `ErrorRaised` alert.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import pandas as pd
import structlog

from error_handler import ConfigError, DataError
from models import ErrorRaised, EventSink
from strategy import Strategy
from technical_indicators import feature_frame


log = structlog.get_logger(__name__)

FLAT: Final = 0
LONG: Final = 1
ACTOR_OUTPUTS: Final = 4  # flat/long logits when flat, then when long
# The feature spec: returns over 1, 3, 12 and 48 bars, the close's place in 20- and 50-bar
# Bollinger bands, Williams %R over 14 bars and the 20-bar deviation relative to price.
FEATURE_SPEC: Final = (
    ("roc", {"timeperiod": 1}),
    ("roc", {"timeperiod": 3}),
    ("roc", {"timeperiod": 12}),
    ("roc", {"timeperiod": 48}),
    ("bbands", {"timeperiod": 20}),
    ("bbands", {"timeperiod": 50}),
    ("willr", {"timeperiod": 14}),
    ("stddev", {"timeperiod": 20}),
)
FEATURES: Final = (
    "ret_1",
    "ret_3",
    "ret_12",
    "ret_48",
    "bb_pos_20",
    "bb_pos_50",
    "willr_14",
    "dev_20",
)
# Rows a feature needs (the 50-bar bands read 50 rows; ROC 48 reads 49).
FEATURE_WINDOW: Final = 50
CLIP: Final = 5.0
DEFAULT_CHAMPION: Final = Path("data") / "models" / "rl" / "champion"


def raw_features(df: pd.DataFrame) -> np.ndarray:
    """Return the unscaled observation features of each row, `(rows, len(FEATURES))`.

    Rows before `FEATURE_WINDOW - 1` are NaN (warm-up).
    """
    frame = feature_frame(df, FEATURE_SPEC)
    close = df["close"].to_numpy(dtype=np.float64)
    out = np.empty((len(df), len(FEATURES)), dtype=np.float64)
    with np.errstate(all="ignore"):
        for k, period in enumerate((1, 3, 12, 48)):
            out[:, k] = np.log1p(frame[f"roc_{period}"].to_numpy() / 100.0)
        for k, period in ((4, 20), (5, 50)):
            upper = frame[f"bbands_{period}_upperband"].to_numpy()
            lower = frame[f"bbands_{period}_lowerband"].to_numpy()
            middle = frame[f"bbands_{period}_middleband"].to_numpy()
            width = upper - lower
            out[:, k] = np.where(width > 0, (close - middle) / width, 0.0)
        out[:, 6] = frame["willr_14"].to_numpy() / 100.0 + 0.5
        out[:, 7] = frame["stddev_20"].to_numpy() / close
    out[: FEATURE_WINDOW - 1] = np.nan
    return out


def standardise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Return features scaled by the training statistics and clipped to +-`CLIP`."""
    with np.errstate(invalid="ignore"):
        scaled: np.ndarray = np.clip((raw - mean) / std, -CLIP, CLIP)
    return scaled


def position_logits(out: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Return the flat/long logits of the head for each row's position (`out`: 4 columns).

    The actor has one pair of logits per position held: what to do when flat, what to do
    when long. Staying put is then a bias of each head, learned from every sample rather
    than from the few where the position input tips a shared layer.
    """
    rows = np.arange(len(out))
    held = (obs[:, -1] > 0.5).astype(np.intp)
    return np.stack((out[rows, 2 * held], out[rows, 2 * held + 1]), axis=1)


def observation(features: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Return observations: standardised features with the position (0 or 1) appended."""
    out = np.empty((features.shape[0], features.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = features
    out[:, -1] = position
    return out


# -- The exported policy ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NumpyPolicy:
    """A trained actor as arrays: `tanh` hidden layers, then flat/long logits per position.

    `layers` are `(weights, bias)` pairs, float32; `mean`/`std` scale the raw features.
    """

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    mean: np.ndarray
    std: np.ndarray
    meta: Mapping[str, Any]

    @property
    def warmup(self) -> int:
        """Return the rows the features need before a decision (the strategy's warm-up)."""
        return FEATURE_WINDOW

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Return the action logits for a batch of observations `(batch, features + 1)`."""
        x = np.asarray(obs, dtype=np.float32)
        h = x
        last = len(self.layers) - 1
        for k, (weights, bias) in enumerate(self.layers):
            h = h @ weights + bias
            if k < last:
                h = np.tanh(h)
        return position_logits(h, x)

    def act(self, features: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Return the greedy action (0 flat, 1 long) per row of standardised features."""
        logits = self.logits(observation(features, position))
        return (logits[:, LONG] > logits[:, FLAT]).astype(np.int8)

    def decide(self, raw: np.ndarray, holding: bool) -> int:
        """Return the greedy action for one row of raw features and the position held."""
        feats = standardise(raw.reshape(1, -1), self.mean, self.std)
        return int(self.act(feats, np.array([1.0 if holding else 0.0]))[0])

    def save(self, directory: Path) -> None:
        """Write `policy.npz` (the arrays) and `policy.json` (what it is) under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"mean": self.mean, "std": self.std}
        for k, (weights, bias) in enumerate(self.layers):
            arrays[f"w{k}"] = weights
            arrays[f"b{k}"] = bias
        np.savez(directory / "policy.npz", **arrays)  # type: ignore[arg-type]
        meta = {**self.meta, "features": list(FEATURES), "layers": len(self.layers)}
        (directory / "policy.json").write_text(json.dumps(meta, indent=2, default=float))


def load_policy(directory: Path) -> NumpyPolicy:
    """Return the policy saved under `directory`.

    Raises:
        DataError: missing, unreadable or inconsistent files.
    """
    try:
        meta = json.loads((directory / "policy.json").read_text())
        with np.load(directory / "policy.npz") as data:
            layers = tuple(
                (data[f"w{k}"].astype(np.float32), data[f"b{k}"].astype(np.float32))
                for k in range(int(meta["layers"]))
            )
            mean, std = data["mean"].astype(np.float64), data["std"].astype(np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot load policy {directory}: {e!r}") from e
    if tuple(meta.get("features", ())) != FEATURES:
        raise DataError(f"policy {directory} was trained on other features")
    width = len(FEATURES) + 1
    for weights, bias in layers:
        if weights.ndim != 2 or weights.shape[0] != width or bias.shape != weights.shape[1:]:
            raise DataError(f"policy {directory}: layer shapes do not chain")
        width = weights.shape[1]
    if (
        width != ACTOR_OUTPUTS
        or mean.shape != (len(FEATURES),)
        or std.shape != mean.shape
        or (std <= 0).any()
    ):
        raise DataError(f"policy {directory}: bad output or scaling arrays")
    return NumpyPolicy(layers, mean, std, meta)


# -- The strategy ----------------------------------------------------------------------------


class RLStrategy(Strategy):
    """A trained policy traded like any strategy; neutral (no signal) when it cannot decide.

    Args:
        directory: the policy's directory (`policy.npz`, `policy.json`).
        alert: where failures are reported (the daemon's alert bus); logs only by default.
    """

    name: ClassVar[str] = "rl"

    def __init__(self, directory: Path, *, alert: EventSink | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.alert: EventSink = alert or (lambda event: None)
        self.policy: NumpyPolicy | None = None
        self.failures = 0
        try:
            self.policy = load_policy(directory)
        except DataError as e:
            self._fail(e)

    @property
    def warmup(self) -> int:
        """Return the feature window: no decision before it is full."""
        return FEATURE_WINDOW

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return `enter_long` (flat wants long) and `exit_long` (long wants flat) per row."""
        enter, exit_ = self._flags(df)
        return pd.DataFrame({"enter_long": enter, "exit_long": exit_}, index=df.index)

    def _flags(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        enter = np.zeros(len(df), dtype=np.bool_)
        exit_ = np.zeros(len(df), dtype=np.bool_)
        policy = self.policy
        if policy is not None and len(df) >= FEATURE_WINDOW:
            try:
                feats = standardise(raw_features(df), policy.mean, policy.std)
                valid = np.isfinite(feats).all(axis=1)
                rows = feats[valid]
                enter[valid] = policy.act(rows, np.zeros(len(rows))) == LONG
                exit_[valid] = policy.act(rows, np.ones(len(rows))) == FLAT
            except Exception as e:  # a fenced model: any failure is a neutral signal
                self._fail(e)
                enter[:] = exit_[:] = False
        return enter, exit_

    def entries_exits(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Return `enter_long` and `exit_long` over the whole frame (the fast path's input)."""
        return self._flags(df)

    def last_row(self, pair: str, df: pd.DataFrame) -> dict[str, Any]:
        """Return the signal columns of the last row, from the feature window's tail only."""
        enter, exit_ = self._flags(df.tail(FEATURE_WINDOW))
        return {"enter_long": bool(enter[-1]), "exit_long": bool(exit_[-1])}

    def last_row_arrays(self, pair: str, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
        """Return the last row's signal columns from the arrays' feature window only."""
        return super().last_row_arrays(pair, tuple(a[-FEATURE_WINDOW:] for a in arrays))

    def describe(self) -> dict[str, Any]:
        """Return the name, the policy's directory and whether it loaded."""
        return {
            "name": self.name,
            "params": {},
            "policy": str(self.directory),
            "loaded": self.policy is not None,
        }

    def _fail(self, error: BaseException) -> None:
        # Logged every time; alerted on the first failure only (not once per candle).
        self.failures += 1
        log.error("rl_policy_failed", policy=str(self.directory), error=repr(error))
        if self.failures == 1:
            message = f"RL policy {self.directory} failed, trading neutral: {error!r}"
            self.alert(ErrorRaised(message))


def policy_strategy(name: str, params: Mapping[str, float] | None = None) -> RLStrategy:
    """Return the strategy for `rl:<directory>`, or `rl` (the registry's champion).

    Raises:
        ConfigError: parameters were given (a policy has none to set).
    """
    if params:
        raise ConfigError(f"strategy {name!r} takes no parameters", component="strategy")
    _, _, path = name.partition(":")
    return RLStrategy(Path(path) if path else DEFAULT_CHAMPION)
