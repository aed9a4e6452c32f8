"""Parameter sensitivity around the chosen point: Morris screening, curves, heatmaps, plateaus.

An optimum that falls off a cliff one grid step away is fitted to noise; a broad plateau
is what survives live trading. This module asks that question of the optimiser's choice:

* **Morris screening** (SALib's elementary effects) over the whole search space ranks the
  parameters by influence: `mu_star` (mean absolute effect) and `sigma` (interaction or
  non-linearity). Points are snapped onto the grid before they are backtested; a refused
  or failed point scores the worst score seen, so a constraint shows up as an effect.
* **One-at-a-time curves**: the score along each parameter with the others held at the
  chosen point, across `radius` of the range on either side.
* **Pairwise heatmaps**: the score on a grid of two parameters around the chosen point.
* **Knife-edge flag**: the chosen point's immediate neighbours (one grid step or
  `NEIGHBOUR_SHARE` of the range, whichever is larger, along each axis) keep less than
  `KNIFE_EDGE` of its score on average.
* **Plateau choice** (`plateau_choice`): among the best few members of the Pareto front,
  the one whose neighbourhood (itself and its neighbours) scores best on average is
  chosen, not the one with the single highest score.

Every batch of points goes through the caller's `ScoreBatch` (the optimiser's backend), so
the analysis fans out like the search. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from optimization_scoring import Key
from search_space import SearchSpace


# Scores of parameter sets, in order: NaN where the point was refused or failed.
ScoreBatch = Callable[[Sequence[Mapping[str, float]]], list[float]]

KNIFE_EDGE: Final = 0.5
NEIGHBOUR_SHARE: Final = 0.05
PLATEAU_CANDIDATES: Final = 5


def neighbours(space: SearchSpace, key: Key, share: float = NEIGHBOUR_SHARE) -> list[Key]:
    """Return the grid points one step (at least `share` of the range) away along each axis."""
    out: list[Key] = []
    for i, d in enumerate(space.dimensions):
        step = max(d.grid_step or 0.0, share * (d.high - d.low))
        for direction in (-1, 1):
            moved = (
                d.adjacent(key[i], direction) if d.choices else d.snap(key[i] + direction * step)
            )
            if moved != key[i]:
                out.append((*key[:i], moved, *key[i + 1 :]))
    return list(dict.fromkeys(out))


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


@dataclass(frozen=True, slots=True)
class PlateauCandidate:
    """A front member and how its neighbourhood scores."""

    params: dict[str, float]
    score: float
    neighbourhood: float | None
    neighbours: int

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "params": dict(self.params),
            "score": self.score,
            "neighbourhood": self.neighbourhood,
            "neighbours": self.neighbours,
        }


def plateau_choice(
    space: SearchSpace,
    candidates: Sequence[tuple[Mapping[str, float], float]],
    score_batch: ScoreBatch,
    *,
    limit: int = PLATEAU_CANDIDATES,
) -> tuple[int, list[PlateauCandidate]]:
    """Return the index of the candidate with the best neighbourhood mean, and every result.

    `candidates` are (params, score) pairs, best score first; the first `limit` are
    compared by the mean score over themselves and their `neighbours` (a refused or
    failed neighbour counts as the worst score of the batch, so a cliff edge is penalised).
    """
    top = list(candidates[:limit])
    if not top:
        raise ValueError("plateau_choice needs at least one candidate")
    around = [neighbours(space, space.key(p)) for p, _ in top]
    points = list(dict.fromkeys(k for keys in around for k in keys))
    scores = dict(zip(points, score_batch([space.params(k) for k in points]), strict=True))
    finite = [v for v in scores.values() if math.isfinite(v)]
    worst = min(finite + [s for _, s in top]) if finite or top else 0.0
    results: list[PlateauCandidate] = []
    for (params, own), keys in zip(top, around, strict=True):
        values = [own] + [scores[k] if math.isfinite(scores[k]) else worst for k in keys]
        results.append(PlateauCandidate(dict(params), own, _mean(values), len(keys)))
    best = max(
        range(len(results)),
        key=lambda i: (results[i].neighbourhood or -math.inf, results[i].score, -i),
    )
    return best, results


@dataclass(frozen=True, slots=True)
class SensitivityReport:
    """Morris indices, curves, heatmaps and the knife-edge verdict around one point."""

    params: dict[str, float]
    score: float
    morris: dict[str, dict[str, float]]
    curves: dict[str, list[tuple[float, float | None]]]
    heatmaps: list[dict[str, Any]]
    neighbourhood: float | None
    retained: float | None
    knife_edge: bool
    evaluated: int
    plateau: list[PlateauCandidate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "params": dict(self.params),
            "score": self.score,
            "morris": self.morris,
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
            "heatmaps": self.heatmaps,
            "neighbourhood": self.neighbourhood,
            "retained": self.retained,
            "knife_edge": self.knife_edge,
            "evaluated": self.evaluated,
            "plateau_candidates": [c.as_dict() for c in self.plateau],
        }


def _axis(space: SearchSpace, index: int, centre: float, points: int, radius: float) -> list[float]:
    d = space.dimensions[index]
    span = d.high - d.low
    raw = np.linspace(centre - radius * span, centre + radius * span, points)
    return sorted({d.snap(v) for v in raw} | {centre})


def _morris_points(space: SearchSpace, trajectories: int, levels: int, seed: int) -> np.ndarray:
    from SALib.sample import morris as morris_sample

    problem = _problem(space)
    return np.asarray(
        morris_sample.sample(problem, trajectories, num_levels=levels, seed=seed),
        dtype=np.float64,
    )


def _problem(space: SearchSpace) -> dict[str, Any]:
    return {
        "num_vars": len(space.dimensions),
        "names": list(space.names),
        "bounds": [[d.low, d.high] for d in space.dimensions],
    }


def analyse(
    space: SearchSpace,
    params: Mapping[str, float],
    score: float,
    score_batch: ScoreBatch,
    *,
    seed: int = 42,
    trajectories: int = 8,
    levels: int = 4,
    curve_points: int = 9,
    heat_points: int = 7,
    radius: float = 0.2,
    max_pairs: int = 3,
) -> SensitivityReport:
    """Return the sensitivity of the score around `params` (see the module docstring).

    All points (Morris trajectories, curves, heatmaps, neighbours) go out as one batch.
    """
    centre = space.key(params)
    morris_x = _morris_points(space, trajectories, levels, seed)
    morris_keys = [space.key(dict(zip(space.names, row, strict=True))) for row in morris_x]
    axes = [_axis(space, i, centre[i], curve_points, radius) for i in range(len(centre))]
    curve_keys = [[(*centre[:i], v, *centre[i + 1 :]) for v in axis] for i, axis in enumerate(axes)]
    pairs = list(itertools.combinations(range(len(centre)), 2))[:max_pairs]
    heat_axes = {i: _axis(space, i, centre[i], heat_points, radius) for pair in pairs for i in pair}
    heat_keys: list[Key] = []
    for a, b in pairs:
        for va in heat_axes[a]:
            for vb in heat_axes[b]:
                key = list(centre)
                key[a], key[b] = va, vb
                heat_keys.append(tuple(key))
    near = neighbours(space, centre)
    wanted = list(
        dict.fromkeys([*morris_keys, *(k for ks in curve_keys for k in ks), *heat_keys, *near])
    )
    wanted = [k for k in wanted if k != centre]
    scores = dict(zip(wanted, score_batch([space.params(k) for k in wanted]), strict=True))
    scores[centre] = score

    def at(key: Key) -> float | None:
        value = scores[key]
        return value if math.isfinite(value) else None

    finite = [v for v in scores.values() if math.isfinite(v)]
    lost = min([*finite, 0.0])
    neighbourhood = _mean([scores[k] if math.isfinite(scores[k]) else lost for k in near])
    retained = neighbourhood / score if neighbourhood is not None and score > 0 else None
    return SensitivityReport(
        params=space.params(centre),
        score=score,
        morris=_morris_indices(space, morris_x, [scores[k] for k in morris_keys], levels),
        curves={
            d.name: [(k[i], at(k)) for k in keys]
            for i, (d, keys) in enumerate(zip(space.dimensions, curve_keys, strict=True))
        },
        heatmaps=[
            {
                "x": space.names[b],
                "y": space.names[a],
                "x_values": heat_axes[b],
                "y_values": heat_axes[a],
                "scores": [
                    [at(_with(centre, a, va, b, vb)) for vb in heat_axes[b]] for va in heat_axes[a]
                ],
            }
            for a, b in pairs
        ],
        neighbourhood=neighbourhood,
        retained=retained,
        # A losing or flat optimum has no edge to fall off; otherwise the neighbours must
        # keep KNIFE_EDGE of it (a neighbour that cannot be scored counts as lost).
        knife_edge=score > 0 and (retained is None or retained < KNIFE_EDGE),
        evaluated=len(wanted),
    )


def _with(key: Key, a: int, va: float, b: int, vb: float) -> Key:
    out = list(key)
    out[a], out[b] = va, vb
    return tuple(out)


def _morris_indices(
    space: SearchSpace, x: np.ndarray, y: Sequence[float], levels: int
) -> dict[str, dict[str, float]]:
    from SALib.analyze import morris as morris_analyze

    values = np.asarray(y, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {}
    values = np.where(np.isfinite(values), values, float(finite.min()))
    found = morris_analyze.analyze(_problem(space), x, values, num_levels=levels)
    return {
        name: {
            "mu": float(found["mu"][i]),
            "mu_star": float(found["mu_star"][i]),
            "sigma": float(np.nan_to_num(found["sigma"][i])),
        }
        for i, name in enumerate(space.names)
    }
