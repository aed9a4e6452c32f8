"""Risk's inputs, verdicts and guards: the context of a decision, resizes, and the guards.

`RiskContext` is everything a risk decision may look at (passed in, never fetched);
`Resize` is a guard's "smaller, not no"; the guards (`MaxOpenPositions`,
`CorrelationGuard`) and the Kelly estimate read only the context. Part of
`risk_management`, which re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import numpy as np

from models import Market, Position, PositionSide, Side, Signal, Veto, fast_init


def as_decimal(value: float | Decimal) -> Decimal:
    """Return `value` as a Decimal (a float through its shortest repr)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


# -- Inputs and verdicts ---------------------------------------------------------------------


@fast_init
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
    # The same over the bars opened before `candle_ts` only: every pair's series ends on
    # the same bar however a burst's candles arrived (what the correlation guard reads).
    aligned_returns: Mapping[str, np.ndarray] | None = None
    # The candle the decision is taken on (names the order, see models.decision_key).
    candle_ts: int | None = None
    # Multi-strategy: the deciding strategy's sleeve of `equity` (its entries are sized on
    # it; None: the whole account), the part of it not yet in its positions (caps an
    # entry), and the strategy's tag in client order ids (None: this manager's).
    sleeve_equity: Decimal | None = None
    sleeve_free: Decimal | None = None
    strategy_tag: str | None = None


class ReturnsView(Mapping[str, np.ndarray]):
    """The recent returns of a decision's pairs, each computed when first read.

    `RiskContext.returns` (or `aligned_returns`) for one decision: an entry with no
    position held reads none (the correlation guard has nothing to compare), so none is
    computed. A pair whose
    window has fewer than two returns is not in it.
    """

    __slots__ = ("_done", "_one", "_pairs", "token")

    def __init__(
        self,
        one: Callable[[str], np.ndarray | None],
        pairs: list[str],
        token: Hashable | None = None,
    ) -> None:
        self._one = one
        self._pairs = dict.fromkeys(pairs)
        self._done: dict[str, np.ndarray | None] = {}
        # Equal for two views only while `one` gives each pair the same returns (the
        # engine's: its windows' version and the alignment bar). A guard may keep what it
        # computed from one view's series for the next: a burst's entries share the held
        # pairs'. None: nothing is kept.
        self.token = token

    def _get(self, pair: object) -> np.ndarray | None:
        if not isinstance(pair, str) or pair not in self._pairs:
            return None
        if pair not in self._done:
            self._done[pair] = self._one(pair)
        return self._done[pair]

    def __getitem__(self, pair: str) -> np.ndarray:
        """Return the pair's returns (KeyError when it has none)."""
        returns = self._get(pair)
        if returns is None:
            raise KeyError(pair)
        return returns

    def __contains__(self, pair: object) -> bool:
        """Return True when the pair has returns."""
        return self._get(pair) is not None

    def __iter__(self) -> Iterator[str]:
        """Iterate over the pairs that have returns."""
        return iter([p for p in self._pairs if self._get(p) is not None])

    def __len__(self) -> int:
        """Return how many pairs have returns."""
        return sum(1 for p in self._pairs if self._get(p) is not None)


@fast_init
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
class _CentredRows:
    """Held pairs' returns over the last `length` bars, each less its mean, with its norm.

    Kept by the guard across checks: a series (an array that is not rewritten) is centred
    once, so a burst's entries, or a candle's, share the work. None: not all finite.
    """

    length: int
    rows: dict[int, tuple[np.ndarray, np.ndarray | None, float]]

    def row(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
        hit = self.rows.get(id(series))
        if hit is not None and hit[0] is series:
            return hit
        tail = np.asarray(series, dtype=float)[-self.length :]
        if not np.isfinite(tail).all():
            return series, None, math.nan
        centred = tail - tail.mean()
        return series, centred, math.sqrt(float((centred**2).sum()))


def _pearson_rows(rows: np.ndarray, norms: np.ndarray, mine: np.ndarray) -> np.ndarray:
    # Each row's correlation with `mine` (rows centred and stacked), NaN for a flat series.
    # Row by row (a multiply and a sum per row), so a row's value does not depend on the
    # others.
    # (np.mean's and np.clip's arithmetic without their Python wrappers: the same values.)
    x = mine - float(np.add.reduce(mine)) / len(mine)
    norm = math.sqrt(float((x**2).sum()))
    if norm == 0:
        return np.full(len(rows), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (rows * x).sum(axis=1) / (norms * norm)
    rho[norms == 0] = np.nan
    out: np.ndarray = np.minimum(np.maximum(rho, -1.0), 1.0)
    return out


def correlations_with(
    candidate: np.ndarray,
    held: list[np.ndarray],
    window: int,
    *,
    min_overlap: int = 10,
    cache: _CentredRows | None = None,
) -> tuple[np.ndarray, _CentredRows | None]:
    """Return the candidate's Pearson correlation with each held series, and the row cache.

    `correlation_matrix`'s rule for the candidate's row (the last `window` bars; bars where
    any series is not finite dropped; NaN below `min_overlap` bars or for a flat series),
    against the held pairs only. `cache` (the one returned last) keeps the held rows.
    """
    length = min(window, len(candidate), *(len(s) for s in held)) if held else 0
    if length < min_overlap:
        return np.full(len(held), np.nan), cache
    if cache is None or cache.length != length:
        cache = _CentredRows(length, {})
    entries = [cache.row(s) for s in held]
    cache.rows = {id(e[0]): e for e in entries}  # only the current held series
    mine = np.asarray(candidate, dtype=float)[-length:]
    rows = [e[1] for e in entries if e[1] is not None]
    if len(rows) == len(entries) and np.isfinite(mine).all():
        return _pearson_rows(np.vstack(rows), np.array([e[2] for e in entries]), mine), cache
    # Gaps: every series loses the bars where any of them is not finite.
    data = np.vstack([mine, *(np.asarray(s, dtype=float)[-length:] for s in held)])
    data = data[:, np.isfinite(data).all(axis=0)]
    if data.shape[1] < min_overlap:
        return np.full(len(held), np.nan), cache
    centred = data[1:] - data[1:].mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    return _pearson_rows(centred, norms, data[0]), cache


@dataclass(frozen=True, slots=True)
class _HeldBlock:
    """The held pairs' part of a correlation check, kept while their returns are the same.

    `key`: the returns' token and the held pairs (and their sides) it was computed for.
    `held` and `series`: the held pairs with returns and those returns; `longs`: +1 for a
    long, -1 for a short, per held pair; `rows` and `norms`: their last `length` bars
    centred and stacked, with their norms, as `correlations_with` computes them (None when
    one is not finite over them: each check then takes the general way).
    """

    key: tuple[Hashable, tuple[str, ...], tuple[bool, ...]]
    held: list[str]
    series: list[np.ndarray]
    longs: np.ndarray
    length: int
    rows: np.ndarray | None
    norms: np.ndarray


@dataclass(slots=True)
class CorrelationGuard:
    """Shrink or refuse a position too correlated with the positions already held.

    Correlations are signed by direction: a long correlated with a held long (or a short
    with a held short) concentrates risk, a long against a held short hedges it. Above
    `max_correlation` the size is scaled by 1 - excess, the excess being measured from
    `max_correlation` (0) to `hard_limit` (1); above `hard_limit` the entry is refused.
    Pairs without enough returns are not judged. Each check correlates the candidate with
    the held pairs only (each held pair's returns are centred once while unchanged, so a
    burst's entries share them); `last_matrix`, for the operator, is computed when asked.
    """

    max_correlation: float
    hard_limit: float
    window: int
    min_overlap: int = 10
    name: str = "correlation"
    _last: dict[str, np.ndarray] | None = None
    _shown: tuple[tuple[str, ...], np.ndarray] | None = None
    _rows: _CentredRows | None = None
    _block: _HeldBlock | None = None

    @property
    def last_pairs(self) -> tuple[str, ...]:
        """Return the pairs of the last check (the candidate first)."""
        return tuple(self._last or ())

    @property
    def last_matrix(self) -> np.ndarray | None:
        """Return the correlation matrix of the last check's pairs (None before any)."""
        if self._last is None:
            return None
        if self._shown is None:
            self._shown = correlation_matrix(self._last, self.window, min_overlap=self.min_overlap)
        return self._shown[1]

    def check(self, signal: Signal, ctx: RiskContext) -> Veto | Resize | None:
        """Return a veto above the hard limit, a resize above the soft one, else None."""
        if not any(p != signal.pair for p in ctx.positions):
            return None  # nothing held to compare with: no returns read
        returns = ctx.aligned_returns if ctx.aligned_returns is not None else ctx.returns
        if returns is None or signal.pair not in returns:
            return None
        block = self._held(signal.pair, ctx.positions, returns)
        held, series, mine = block.held, block.series, returns[signal.pair]
        if not held:
            return None
        length = min(block.length, len(mine))
        if (
            length == block.length >= self.min_overlap
            and block.rows is not None
            and np.isfinite(mine[-length:]).all()
        ):
            # The held rows as `correlations_with` centres them, stacked once for a burst.
            row = _pearson_rows(block.rows, block.norms, np.asarray(mine, dtype=float)[-length:])
        else:
            row, self._rows = correlations_with(
                mine, series, self.window, min_overlap=self.min_overlap, cache=self._rows
            )
        self._last = {signal.pair: mine, **dict(zip(held, series, strict=True))}
        self._shown = None
        # Signed by direction: + where the entry adds to a held bet, - where it hedges one.
        adjusted = row * (block.longs if signal.side is Side.BUY else -block.longs)
        nan = np.isnan(adjusted)
        if nan.all():
            return None
        # The first of the largest, NaN skipped (np.nanargmax's rule, without its wrapper).
        at = int(np.where(nan, -np.inf, adjusted).argmax())
        worst, against, raw = float(adjusted[at]), held[at], float(row[at])
        if worst <= self.max_correlation:
            return None
        side = "long" if block.longs[at] > 0 else "short"  # PositionSide's, no Position built
        what = f"correlation {raw:+.2f} with held {side} {against} (direction-adjusted {worst:.2f})"
        if worst > self.hard_limit or self.hard_limit <= self.max_correlation:
            return Veto(f"{what} > hard limit {self.hard_limit:.2f}", None, self.name)
        excess = (worst - self.max_correlation) / (self.hard_limit - self.max_correlation)
        factor = 1.0 - excess
        if factor <= 0:
            return Veto(f"{what} at hard limit {self.hard_limit:.2f}", None, self.name)
        return Resize(factor, f"x{factor:.2f}: {what} > {self.max_correlation:.2f}", self.name)

    def _held(
        self, pair: str, positions: Mapping[str, Position], returns: Mapping[str, np.ndarray]
    ) -> _HeldBlock:
        # The held pairs other than `pair` with their returns, kept while the returns'
        # token and the held pairs are the same (a burst's entries: O(1) numpy calls each
        # instead of several per held pair).
        others = tuple(p for p in positions if p != pair)
        longs_of = getattr(positions, "longs", None)  # a PositionsView: no Position built
        longs = (
            longs_of(others)
            if longs_of is not None
            else tuple(positions[p].side is PositionSide.LONG for p in others)
        )
        token = getattr(returns, "token", None)
        key, block = (token, others, longs), self._block
        if token is not None and block is not None and block.key == key:
            return block
        present = [(p, long) for p, long in zip(others, longs, strict=True) if p in returns]
        held = [p for p, _ in present]
        series = [returns[p] for p in held]
        length = min(self.window, *(len(s) for s in series)) if series else 0
        rows, norms = None, np.empty(0)
        if token is not None and held and length >= self.min_overlap:  # else the general way
            tails = np.vstack([np.asarray(s, dtype=float)[-length:] for s in series])
            if np.isfinite(tails).all():
                # Row by row as `_CentredRows.row` (each row's own mean and sum).
                rows = tails - (np.add.reduce(tails, axis=1) / length)[:, None]
                norms = np.sqrt(np.add.reduce(rows**2, axis=1))
        directions = np.array([1.0 if long else -1.0 for _, long in present])
        block = _HeldBlock(key, held, series, directions, length, rows, norms)
        if token is not None:
            self._block = block
        return block


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
