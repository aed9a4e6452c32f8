"""Small, real model kinds for the registry tests, and the markets they are tested on.

`Contrarian` (long after a down bar) and `Momentum` (long after an up bar) are complete
registry kinds: they save a rule file, report out-of-sample returns on the newest 30% of
the candles and replay a saved rule on any candles. On `mean_reverting` candles the first
earns and the second loses, so a test knows which is the better model without trusting
the code under test. Both share the registry name prefix `model_kinds`. `Broken` always
fails to train. The spawned training worker imports this module by path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


FEE = 5.5e-4
VALIDATION_FRACTION = 0.3


def mean_reverting(bars: int, seed: int, *, phi: float = -0.5, sigma: float = 0.01) -> pd.DataFrame:
    """Return hourly candles whose returns follow an AR(1) with coefficient `phi`."""
    rng = np.random.default_rng(seed)
    shocks = rng.normal(0.0, sigma, bars)
    returns = np.empty(bars)
    previous = 0.0
    for i, shock in enumerate(shocks):
        previous = phi * previous + shock
        returns[i] = previous
    close = 100.0 * np.exp(np.cumsum(returns))
    open_ = np.concatenate([[100.0], close[:-1]])
    index = pd.date_range("2024-01-01", periods=bars, freq="1h", tz="UTC")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) * 1.001,
            "low": np.minimum(open_, close) * 0.999,
            "close": close,
            "volume": np.full(bars, 10.0),
        },
        index=index,
    )


def rule_returns(frame: pd.DataFrame, direction: float) -> pd.Series:
    """Return per-bar returns of "long when direction x last return > 0", net of fees."""
    close = frame["close"]
    last = close.pct_change().fillna(0.0).to_numpy()
    forward = (close.shift(-1) / close - 1.0).fillna(0.0).to_numpy()
    position = (direction * last > 0).astype(np.float64)
    switches = np.abs(np.diff(position, prepend=0.0))
    return pd.Series(position * forward - switches * FEE, index=frame.index)


@dataclass(frozen=True)
class RuleModel:
    """A trained rule: its direction and its held-out returns."""

    direction: float
    returns: np.ndarray
    metrics: dict[str, float]

    def save(self, directory: Path) -> None:
        """Write the rule file."""
        (directory / "rule.json").write_text(json.dumps({"direction": self.direction}))

    def validation_returns(self) -> np.ndarray:
        """Return the rule's returns on the held-out candles."""
        return self.returns


class RuleKind:
    """A model kind whose "training" fixes a rule; validation is the newest 30%."""

    name = "rule"
    direction = 1.0

    def __init__(self, settings: Any = None, features_dir: Path | None = None) -> None:
        self.settings = settings
        self.features_dir = features_dir

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> RuleModel:
        """Return the rule with its out-of-sample returns."""
        frame = next(iter(frames.values()))
        cut = int(len(frame) * (1 - VALIDATION_FRACTION))
        returns = rule_returns(frame, self.direction).to_numpy()[cut:]
        train_end = int(frame.index[cut - 1].value // 1_000_000)
        return RuleModel(self.direction, returns, {"train_end_ms": float(train_end)})

    def replay(self, directory: Path, frame: pd.DataFrame) -> pd.Series:
        """Return a saved rule's per-bar returns on `frame`."""
        direction = json.loads((directory / "rule.json").read_text())["direction"]
        return rule_returns(frame, float(direction))


class Contrarian(RuleKind):
    """Long after a down bar: the better model on a mean-reverting market."""

    direction = -1.0


class Momentum(RuleKind):
    """Long after an up bar: the worse model on a mean-reverting market."""

    direction = 1.0


class Broken(RuleKind):
    """A kind whose training always fails."""

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> RuleModel:
        """Fail."""
        raise RuntimeError("training blew up")


class Opaque:
    """The contrarian rule without `replay`: it can be validated but never shadowed."""

    name = "opaque"

    def __init__(self, settings: Any = None, features_dir: Path | None = None) -> None:
        self.rule = Contrarian(settings, features_dir)

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> RuleModel:
        """Return the contrarian rule."""
        return self.rule.train(frames, seed=seed, time_budget_s=time_budget_s)
