"""Approved strategy parameters: the out-of-sample gate, the file it writes, the reader.

Parameters reach `--mode sim` and `--mode live` only through
`<data_dir>/approved/<strategy>.json`, which the optimiser writes when its choice passes
the out-of-sample gate (`evaluate_gate`): a positive mean out-of-sample score over all
folds and over the latest half of them (an edge that vanished recently fails), a
walk-forward efficiency, a deflated Sharpe ratio and a probability of backtest
overfitting within their thresholds (`OptimizationSettings.gate_*`). `--force` writes
the file anyway, marked `forced`, with a warning logged (and alerted where a bus is
reachable). The daemon reads the file with `load_approved`; with no file it keeps its
configured parameters.

This module imports nothing heavy: the daemon reads it at start. Part of
`parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from error_handler import ConfigError
from utils.utilities import atomic_write


if TYPE_CHECKING:
    from config import OptimizationSettings


log = structlog.get_logger(__name__)

KIND: Final = "kestrel.approved_params"
VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class GateCheck:
    """One gate criterion: its value, threshold and verdict."""

    name: str
    value: float | None
    threshold: float
    rule: str
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "value": self.value,
            "threshold": self.threshold,
            "rule": self.rule,
            "passed": self.passed,
        }


@dataclass(frozen=True, slots=True)
class GateResult:
    """The out-of-sample gate's verdict and each criterion."""

    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        """Return True when every criterion passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        """Return one line per failed criterion."""
        return [
            f"{c.name} {'missing' if c.value is None else f'{c.value:.4g}'} (needs {c.rule})"
            for c in self.checks
            if not c.passed
        ]

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "passed": self.passed,
            "checks": {c.name: c.as_dict() for c in self.checks},
            "failures": self.failures,
        }


def _check(name: str, value: float | None, threshold: float, rule: str) -> GateCheck:
    known = value is not None and math.isfinite(value)
    ok = False
    if known and value is not None:
        ok = {
            ">": value > threshold,
            ">=": value >= threshold,
            "<=": value <= threshold,
        }[rule]
    return GateCheck(name, value if known else None, threshold, f"{rule} {threshold:g}", ok)


def evaluate_gate(
    *,
    out_of_sample: float | None,
    recent_out_of_sample: float | None,
    efficiency: float | None,
    dsr: float | None,
    pbo: float | None,
    settings: OptimizationSettings,
) -> GateResult:
    """Return the gate's verdict; a figure that could not be measured fails its criterion."""
    return GateResult(
        (
            _check("out_of_sample_score", out_of_sample, settings.gate_min_oos, ">"),
            _check("recent_out_of_sample_score", recent_out_of_sample, settings.gate_min_oos, ">"),
            _check("walk_forward_efficiency", efficiency, settings.gate_min_efficiency, ">="),
            _check("deflated_sharpe", dsr, settings.gate_min_dsr, ">="),
            _check("pbo", pbo, settings.gate_max_pbo, "<="),
        )
    )


def approved_path(data_dir: Path, strategy: str) -> Path:
    """Return where the approved parameters of `strategy` (a name or a .py path) live."""
    stem = Path(strategy).stem if strategy.endswith(".py") else strategy
    return data_dir / "approved" / f"{stem}.json"


def write_approved(
    path: Path,
    *,
    strategy: str,
    timeframe: str,
    pairs: list[str],
    params: Mapping[str, float],
    gate: GateResult,
    data_range: Mapping[str, Any],
    forced: bool,
    source: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write the approved-parameters file atomically and return its content.

    Raises:
        ConfigError: when the gate failed and `forced` is not set.
    """
    if not gate.passed and not forced:
        raise ConfigError(
            "optimize: the out-of-sample gate failed: " + "; ".join(gate.failures),
            component="optimize",
        )
    document = {
        "kind": KIND,
        "version": VERSION,
        "strategy": strategy,
        "timeframe": timeframe,
        "pairs": list(pairs),
        "params": {k: float(v) for k, v in params.items()},
        "gate": gate.as_dict(),
        "forced": bool(forced and not gate.passed),
        "data": dict(data_range),
        "source": source,
        "approved_at": (now or datetime.now(UTC)).isoformat(),
    }
    atomic_write(path, json.dumps(document, indent=2, default=str))
    return document


@dataclass(frozen=True, slots=True)
class ApprovedParams:
    """Parameters read from an approved-parameters file."""

    path: Path
    strategy: str
    params: dict[str, float]
    forced: bool
    approved_at: str


def load_approved(data_dir: Path, strategy: str) -> ApprovedParams | None:
    """Return the approved parameters of `strategy`, or None when there is no file.

    Raises:
        ConfigError: when the file exists but is unreadable or for another strategy: a
            trading run must not silently fall back to parameters nobody approved.
    """
    path = approved_path(data_dir, strategy)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"approved parameters {path} unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ConfigError(f"{path} is not an approved-parameters file")
    if doc.get("strategy") != strategy:
        raise ConfigError(f"{path} approves {doc.get('strategy')!r}, not {strategy!r}")
    gate = doc.get("gate") or {}
    forced = bool(doc.get("forced"))
    if not gate.get("passed") and not forced:
        raise ConfigError(f"{path}: the gate did not pass and the file is not forced")
    params = doc.get("params")
    if not isinstance(params, dict) or not all(isinstance(v, int | float) for v in params.values()):
        raise ConfigError(f"{path}: params must map names to numbers")
    return ApprovedParams(
        path,
        strategy,
        {str(k): float(v) for k, v in params.items()},
        forced,
        str(doc.get("approved_at", "")),
    )
