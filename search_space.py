"""The optimiser's search space: a strategy's `Param` ranges as grid dimensions.

A `Dimension` samples, mutates, blends and snaps values on its grid; a `SearchSpace` maps
parameter sets to grid keys; `strategy_space` and `strategy_feasibility` read them from a
strategy. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from error_handler import ConfigError
from optimization_scoring import Key


if TYPE_CHECKING:
    from strategy import Param, Strategy


@dataclass(frozen=True, slots=True)
class Dimension:
    """One tunable parameter on its grid."""

    name: str
    low: float
    high: float
    integer: bool = True
    step: float | None = None
    choices: tuple[float, ...] = ()  # sorted; when set, the only values (a choice variable)

    @property
    def grid_step(self) -> float | None:
        """Return the grid spacing (`step`, 1 for integers, None when continuous or a choice)."""
        if self.choices:
            return None
        if self.step:
            return float(self.step)
        return 1.0 if self.integer else None

    def snap(self, value: float) -> float:
        """Return the grid point (or choice) nearest to `value`, within range."""
        if self.choices:
            return float(min(self.choices, key=lambda c: (abs(c - float(value)), c)))
        value = min(max(float(value), self.low), self.high)
        step = self.grid_step
        if step is not None:
            value = self.low + round((value - self.low) / step) * step
            if value > self.high + 1e-12:
                value -= step
        if self.integer:
            value = float(round(value))
        return round(value, 10)  # decimal noise would split one grid point into two keys

    def adjacent(self, value: float, direction: int) -> float:
        """Return the choice next to `value` in `direction` (+1 or -1), or `value` at an end."""
        at = self.choices.index(self.snap(value)) + direction
        return self.choices[at] if 0 <= at < len(self.choices) else self.snap(value)

    def sample(self, rng: np.random.Generator) -> float:
        """Return a uniformly drawn grid point (a uniform value when continuous)."""
        if self.choices:
            return float(self.choices[int(rng.integers(0, len(self.choices)))])
        step = self.grid_step
        if step is None:
            return self.snap(rng.uniform(self.low, self.high))
        points = math.floor((self.high - self.low) / step + 1e-9)
        return self.snap(self.low + int(rng.integers(0, points + 1)) * step)

    def mutate(self, value: float, rng: np.random.Generator, scale: float) -> float:
        """Return `value` moved by a Gaussian step of `scale` x range, at least one grid step."""
        span = self.high - self.low
        if span <= 0:
            return value
        if self.choices:
            return self.adjacent(value, 1 if rng.random() < 0.5 else -1)
        moved = self.snap(value + rng.normal(0.0, scale * span))
        if moved != value:
            return moved
        step = self.grid_step or scale * span
        direction = 1.0 if rng.random() < 0.5 else -1.0
        moved = self.snap(value + direction * step)
        return moved if moved != value else self.snap(value - direction * step)

    def blend(self, a: float, b: float, rng: np.random.Generator, alpha: float = 0.5) -> float:
        """Return a BLX-alpha child of two values (uniform on the widened interval)."""
        lo, hi = min(a, b), max(a, b)
        spread = hi - lo
        if spread == 0:
            return a
        return self.snap(rng.uniform(lo - alpha * spread, hi + alpha * spread))


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """The dimensions searched, plus parameters held fixed."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_params(
        cls, parameters: Mapping[str, Param], *, fixed: Mapping[str, float] | None = None
    ) -> SearchSpace:
        """Return the space of a strategy's `parameters`, leaving out the `fixed` ones."""
        fixed = dict(fixed or {})
        dims = tuple(
            Dimension(
                name,
                float(min(p.choices)) if p.choices else float(p.low),
                float(max(p.choices)) if p.choices else float(p.high),
                bool(p.integer),
                p.step,
                tuple(sorted(float(c) for c in p.choices)),
            )
            for name, p in parameters.items()
            if name not in fixed
        )
        if not dims:
            raise ConfigError("nothing to optimise: every parameter is fixed", component="optimize")
        return cls(dims, tuple(sorted((k, float(v)) for k, v in fixed.items())))

    @property
    def names(self) -> tuple[str, ...]:
        """Return the searched parameter names in order."""
        return tuple(d.name for d in self.dimensions)

    def key(self, params: Mapping[str, float]) -> Key:
        """Return the grid key of a parameter set (missing names take the low end)."""
        return tuple(d.snap(params.get(d.name, d.low)) for d in self.dimensions)

    def params(self, key: Key) -> dict[str, float]:
        """Return the full parameter set of a key (fixed parameters included)."""
        return {**dict(self.fixed), **dict(zip(self.names, key, strict=True))}

    def sample(self, rng: np.random.Generator) -> Key:
        """Return a random grid point."""
        return tuple(d.sample(rng) for d in self.dimensions)


@functools.cache
def _strategy_class(name_or_path: str) -> type[Strategy]:
    # One import of a user strategy file per process, not one per candidate.
    from strategy import BUILTIN, load_strategy

    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    return type(load_strategy(name_or_path))


def strategy_space(name_or_path: str, *, fixed: Mapping[str, float] | None = None) -> SearchSpace:
    """Return the search space of a built-in strategy or a strategy file."""
    return SearchSpace.from_params(_strategy_class(name_or_path).parameters, fixed=fixed)


def strategy_feasibility(name_or_path: str) -> Callable[[Mapping[str, float]], str | None]:
    """Return a check that builds the strategy and returns its ConfigError text, or None."""
    cls = _strategy_class(name_or_path)

    def check(params: Mapping[str, float]) -> str | None:
        try:
            cls(**params)
        except ConfigError as e:
            return e.message
        return None

    return check
