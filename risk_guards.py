"""Risk's inputs, verdicts and guards: the context of a decision, resizes, and the guards.

`RiskContext` is everything a risk decision may look at (passed in, never fetched);
`Resize` is a guard's "smaller, not no"; the guards (`MaxOpenPositions`,
`CorrelationGuard`) and the Kelly estimate read only the context. Part of
`risk_management`, which re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import numpy as np

from models import Market, Position, PositionSide, Side, Signal, Veto


def as_decimal(value: float | Decimal) -> Decimal:
    """Return `value` as a Decimal (a float through its shortest repr)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


# -- Inputs and verdicts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RiskContext:
    """Everything a risk decision may look at, passed in (never fetched).

    `cash` is the free balance on spot and the free margin on linear markets. `returns`
    holds each pair's recent per-bar close-to-close returns (oldest first, the latest bar
    last); it feeds the correlation guard and volatility targeting and may be omitted.
    """

    now: int
    equity: Decimal
    cash: Decimal
    positions: Mapping[str, Position]
    market: Market
    price: Decimal
    atr: float | None = None
    taker_fee: Decimal = Decimal("0.001")
    returns: Mapping[str, np.ndarray] | None = None
    # The candle the decision is taken on (names the order, see models.decision_key).
    candle_ts: int | None = None
    # Multi-strategy: the deciding strategy's sleeve of `equity` (its entries are sized on
    # it; None: the whole account), the part of it not yet in its positions (caps an
    # entry), and the strategy's tag in client order ids (None: this manager's).
    sleeve_equity: Decimal | None = None
    sleeve_free: Decimal | None = None
    strategy_tag: str | None = None


@dataclass(frozen=True, slots=True)
class Resize:
    """A guard's decision to scale a new position down by `factor` (0 < factor <= 1)."""

    factor: float
    reason: str
    guard: str = ""


class Guard(Protocol):
    """A rule that may refuse or shrink a new position."""

    @property
    def name(self) -> str:
        """Return the guard's name, reported with its verdicts."""
        ...

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | Resize | None:
        """Return a Veto to refuse, a Resize to shrink, None to allow."""
        ...


# -- Entry guards ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaxOpenPositions:
    """Refuse a new position when `limit` are already open."""

    limit: int
    name: str = "max_open_positions"

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | None:
        """Return a veto at the limit."""
        if signal.pair not in ctx.positions and len(ctx.positions) >= self.limit:
            return Veto(
                f"{len(ctx.positions)} positions open (limit {self.limit})", None, self.name
            )
        return None


def correlation_matrix(
    returns: Mapping[str, np.ndarray], window: int, *, min_overlap: int = 10
) -> tuple[tuple[str, ...], np.ndarray]:
    """Return the pairs and their Pearson correlation matrix over the last `window` bars.

    Series are aligned on their last bar (the caller passes series ending on the same
    candle). Bars where any series is not finite are dropped. A cell is NaN when fewer than
    `min_overlap` bars remain or a series does not move.
    """
    pairs = tuple(returns)
    n = len(pairs)
    matrix = np.full((n, n), np.nan)
    if n == 0:
        return pairs, matrix
    length = min(window, *(len(np.asarray(returns[p])) for p in pairs))
    if length < min_overlap:
        return pairs, matrix
    data = np.vstack([np.asarray(returns[p], dtype=float)[-length:] for p in pairs])
    data = data[:, np.isfinite(data).all(axis=0)]
    if data.shape[1] < min_overlap:
        return pairs, matrix
    centred = data - data.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    moving = norms > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    matrix[~moving, :] = np.nan
    matrix[:, ~moving] = np.nan
    return pairs, np.clip(matrix, -1.0, 1.0)


@dataclass(slots=True)
class CorrelationGuard:
    """Shrink or refuse a position too correlated with the positions already held.

    Correlations are signed by direction: a long correlated with a held long (or a short
    with a held short) concentrates risk, a long against a held short hedges it. Above
    `max_correlation` the size is scaled by 1 - excess, the excess being measured from
    `max_correlation` (0) to `hard_limit` (1); above `hard_limit` the entry is refused.
    Pairs without enough returns are not judged.
    """

    max_correlation: float
    hard_limit: float
    window: int
    min_overlap: int = 10
    name: str = "correlation"
    last_pairs: tuple[str, ...] = ()
    last_matrix: np.ndarray | None = None

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | Resize | None:
        """Return a veto above the hard limit, a resize above the soft one, else None."""
        if not any(p != signal.pair for p in ctx.positions):
            return None  # nothing held to compare with: no returns read
        if not ctx.returns or signal.pair not in ctx.returns:
            return None
        held = [p for p in ctx.positions if p != signal.pair and p in ctx.returns]
        if not held:
            return None
        series = {p: ctx.returns[p] for p in (signal.pair, *held)}
        pairs, matrix = correlation_matrix(series, self.window, min_overlap=self.min_overlap)
        self.last_pairs, self.last_matrix = pairs, matrix
        sign = 1.0 if signal.side is Side.BUY else -1.0
        worst, against, raw = -math.inf, "", 0.0
        for i, pair in enumerate(pairs[1:], start=1):
            rho = float(matrix[0, i])
            if math.isnan(rho):
                continue
            held_sign = 1.0 if ctx.positions[pair].side is PositionSide.LONG else -1.0
            if rho * sign * held_sign > worst:
                worst, against, raw = rho * sign * held_sign, pair, rho
        if worst <= self.max_correlation:
            return None
        what = (
            f"correlation {raw:+.2f} with held {ctx.positions[against].side} {against}"
            f" (direction-adjusted {worst:.2f})"
        )
        if worst > self.hard_limit or self.hard_limit <= self.max_correlation:
            return Veto(f"{what} > hard limit {self.hard_limit:.2f}", None, self.name)
        excess = (worst - self.max_correlation) / (self.hard_limit - self.max_correlation)
        factor = 1.0 - excess
        if factor <= 0:
            return Veto(f"{what} at hard limit {self.hard_limit:.2f}", None, self.name)
        return Resize(factor, f"x{factor:.2f}: {what} > {self.max_correlation:.2f}", self.name)


# -- Sizing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KellyEstimate:
    """Kelly statistics of a window of closed trades (returns on notional)."""

    trades: int
    win_rate: float
    payoff: float
    fraction: float


def kelly_estimate(returns: Sequence[float]) -> KellyEstimate:
    """Return W, R = mean win / mean loss and the Kelly fraction W - (1 - W) / R.

    A trade with a return <= 0 counts as a loss. With no loss the fraction is W (payoff
    infinite); with no win it is -1 (no edge).

    Raises:
        ValueError: for an empty sequence.
    """
    if not returns:
        raise ValueError("kelly_estimate needs at least one trade")
    wins = [r for r in returns if r > 0]
    losses = [-r for r in returns if r <= 0]
    win_rate = len(wins) / len(returns)
    mean_loss = sum(losses) / len(losses) if losses else 0.0
    if mean_loss <= 0:
        return KellyEstimate(len(returns), win_rate, math.inf, win_rate)
    if not wins:
        return KellyEstimate(len(returns), 0.0, 0.0, -1.0)
    payoff = (sum(wins) / len(wins)) / mean_loss
    return KellyEstimate(len(returns), win_rate, payoff, win_rate - (1 - win_rate) / payoff)
