"""Capital sleeves of a multi-strategy bot, allocated by measured skill.

Each strategy trades its own pairs with a sleeve of the account: a share of the equity on
which its entries are sized (risk limits stay account-wide). `target_weights` turns the
skill ranking (`reward_system.rank`: the lower confidence bound of each strategy's shrunk
Sharpe) into shares, a pure function:

* a strategy on probation (fewer than `probation_trades` trades, younger than
  `probation_days`, or not ranked yet) holds `probation_share` (at most its cap);
* the rest of the account goes to the ranked strategies in proportion to
  ``max(lcb, 0) + epsilon x rank term`` (`skill_weights`), each share clamped to its
  [floor, cap] and the others renormalised (one scale factor found by bisection, so a
  better-ranked strategy never holds less than a worse one with the same bounds);
* when the floors cannot all hold they are scaled down to fit; when the caps cannot hold
  the whole account (one ranked strategy with a cap below the rest, say), each ranked
  strategy holds its cap and the remainder stays an unallocated reserve that no strategy
  sizes on. Either way the result says the bounds were infeasible.

`Allocator` keeps the sleeves between reallocations: each sleeve's capital moves with its
own closed trades, its equity adds its positions' unrealised PnL, and every `interval_s`
`rebalance` re-cuts the account by the ranking and returns a `models.AllocationChanged`.
Each sleeve also keeps a time-weighted value (`nav`: its trades' returns on the sleeve,
chained), the curve its skill is scored on, so a reallocation is never mistaken for a
profit or a loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from config import AllocationSettings
from models import AllocationChanged, ClosedTrade, Position, Ranked, SleeveShare
from run_summary import AllocationPoint, StrategySection


log = structlog.get_logger(__name__)

DAY_MS = 86_400_000
_TOL = 1e-9
_MAX_LCB = 1_000.0


@dataclass(frozen=True, slots=True)
class Sleeve:
    """One strategy's place in the account: its pairs, order tag and share bounds."""

    name: str
    pairs: tuple[str, ...]
    tag: str
    floor: float
    cap: float
    initial: float | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the allocator knows of a strategy: its skill bound, record and bounds."""

    name: str
    lcb: float | None
    trades: int
    age_days: float
    floor: float
    cap: float


@dataclass(frozen=True, slots=True)
class Allocation:
    """Target shares by strategy, who is on probation, and whether the bounds all held.

    The shares sum to 1 less `reserve`, the part the caps leave unallocated (0 when
    feasible).
    """

    weights: dict[str, float]
    probation: tuple[str, ...]
    feasible: bool
    reserve: float = 0.0


def on_probation(candidate: Candidate, settings: AllocationSettings) -> bool:
    """Return True when the strategy's record is too short to be allocated by skill."""
    return (
        candidate.lcb is None
        or candidate.trades < settings.probation_trades
        or candidate.age_days < settings.probation_days
    )


def target_weights(
    candidates: Sequence[Candidate], settings: AllocationSettings
) -> Allocation | None:
    """Return the shares the ranking earns, or None while no strategy is off probation.

    With every strategy on probation nothing has been measured yet: the caller keeps the
    sleeves it has (the configured initial ones).
    """
    probation = [c for c in candidates if on_probation(c, settings)]
    ranked = [c for c in candidates if not on_probation(c, settings)]
    if not ranked:
        return None
    weights = {c.name: min(settings.probation_share, c.cap) for c in probation}
    rest = 1.0 - sum(weights.values())
    raw = skill_weights([_bounded(c.lcb) for c in ranked], settings.epsilon)
    shares, feasible = fill(raw, [c.floor for c in ranked], [c.cap for c in ranked], rest)
    weights.update({c.name: w for c, w in zip(ranked, shares, strict=True)})
    reserve = max(1.0 - sum(weights.values()), 0.0)
    return Allocation(weights, tuple(c.name for c in probation), feasible, reserve)


def _bounded(lcb: float | None) -> float:
    # An undefined bound ranks last; an absurd one cannot swamp the others' arithmetic.
    if lcb is None or math.isnan(lcb):
        return -math.inf
    return min(lcb, _MAX_LCB)


def skill_weights(lcbs: Sequence[float], epsilon: float) -> list[float]:
    """Return each strategy's raw claim: max(lcb, 0) plus `epsilon` scaled by its rank.

    The rank term (1 for the best, 1/m for the worst of m; tied bounds share a rank) keeps
    the ranking's order when every bound is at or below zero, and never lets a lower bound
    claim more than a higher one.
    """
    m = len(lcbs)
    return [max(lcb, 0.0) + epsilon * (m - sum(other > lcb for other in lcbs)) / m for lcb in lcbs]


def fill(
    raw: Sequence[float], floors: Sequence[float], caps: Sequence[float], total: float
) -> tuple[list[float], bool]:
    """Split `total` in proportion to `raw` (positive claims), each part in [floor, cap].

    Finds the one scale `k` with sum(clip(k * raw, floor, cap)) == total by bisection
    (the sum grows with `k`). Returns the parts and whether the bounds could hold; when
    not, the floors are scaled down to meet `total`, or each part is its cap (summing to
    less than `total`: a cap is never exceeded).
    """
    if not raw:
        return [], total <= _TOL
    low, high = sum(floors), sum(caps)
    if low > total + _TOL:
        return [f * total / low for f in floors], False
    if high < total - _TOL:
        return list(caps), False

    def parts(k: float) -> list[float]:
        return [min(max(k * r, f), c) for r, f, c in zip(raw, floors, caps, strict=True)]

    lo, hi = 0.0, max((c / r for r, c in zip(raw, caps, strict=True) if r > 0), default=0.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(parts(mid)) < total:
            lo = mid
        else:
            hi = mid
    out = parts(hi)
    scale = total / sum(out) if sum(out) > 0 else 0.0
    return [w * scale for w in out], True


def initial_weights(sleeves: Sequence[Sleeve]) -> dict[str, float]:
    """Return the shares before any ranking: as configured, the rest split evenly."""
    given = {s.name: s.initial for s in sleeves if s.initial is not None}
    rest = [s.name for s in sleeves if s.initial is None]
    left = max(1.0 - sum(given.values()), 0.0)
    return {**given, **{name: left / len(rest) for name in rest}}


class Allocator:
    """The sleeves of one account, reallocated by the skill ranking (module docstring)."""

    def __init__(
        self,
        sleeves: Sequence[Sleeve],
        settings: AllocationSettings,
        *,
        equity: Decimal,
        now_ms: int,
    ) -> None:
        self.settings = settings
        self.sleeves = {s.name: s for s in sleeves}
        self._owner = {pair: s for s in sleeves for pair in s.pairs}
        self.weights = initial_weights(sleeves)
        self.capital = {name: equity * Decimal(repr(w)) for name, w in self.weights.items()}
        self.nav = {name: float(c) for name, c in self.capital.items()}
        self.started_ms = now_ms
        self.interval_ms = settings.interval_s * 1000
        self.next_ms = now_ms + self.interval_ms
        self.probation: tuple[str, ...] = tuple(s.name for s in sleeves)
        self.feasible = True
        self.history: list[AllocationChanged] = []

    # -- Lookups -----------------------------------------------------------------------------

    def owner(self, pair: str) -> Sleeve | None:
        """Return the sleeve trading `pair`, None when no strategy owns it."""
        return self._owner.get(pair)

    def _held(self, name: str, positions: Mapping[str, Position]) -> list[Position]:
        pairs = self.sleeves[name].pairs
        return [positions[p] for p in pairs if p in positions]

    def sleeve_equity(self, name: str, positions: Mapping[str, Position]) -> Decimal:
        """Return the sleeve's capital plus its open positions' unrealised PnL."""
        return self.capital[name] + sum(
            (p.unrealised_pnl for p in self._held(name, positions)), Decimal(0)
        )

    def sizing(
        self, pair: str, positions: Mapping[str, Position]
    ) -> tuple[Decimal, Decimal, str] | None:
        """Return (sleeve equity, its part not in positions, order tag) for `pair`'s owner."""
        sleeve = self._owner.get(pair)
        if sleeve is None:
            return None
        equity = self.sleeve_equity(sleeve.name, positions)
        held = sum((p.notional for p in self._held(sleeve.name, positions)), Decimal(0))
        return equity, equity - held, sleeve.tag

    # -- Events ------------------------------------------------------------------------------

    def on_trade_closed(self, name: str, pnl: float) -> float:
        """Book a closed trade's PnL on its sleeve; return the sleeve's time-weighted value."""
        before = self.capital[name]
        if before > 0:
            self.nav[name] *= 1 + pnl / float(before)
        self.capital[name] = before + Decimal(repr(pnl))
        return self.nav[name]

    def due(self, now_ms: int) -> bool:
        """Return True when a reallocation is due."""
        return now_ms >= self.next_ms

    def rebalance(
        self,
        now_ms: int,
        equity: Decimal,
        positions: Mapping[str, Position],
        ranked: Sequence[Ranked],
    ) -> AllocationChanged | None:
        """Re-cut the account by the ranking; return the change (None if none is earned)."""
        self.next_ms = now_ms + self.interval_ms
        by_name = {r.name: r for r in ranked}
        age = (now_ms - self.started_ms) / DAY_MS
        candidates = []
        for name, sleeve in self.sleeves.items():
            r = by_name.get(name)
            candidates.append(
                Candidate(
                    name,
                    None if r is None else r.lcb,
                    0 if r is None else r.trades,
                    age,
                    sleeve.floor,
                    sleeve.cap,
                )
            )
        target = target_weights(candidates, self.settings)
        if target is None:
            log.info("allocation_kept", reason="every strategy on probation")
            return None
        before = dict(self.weights)
        self.weights, self.probation, self.feasible = (
            target.weights,
            target.probation,
            target.feasible,
        )
        shares = []
        for c in candidates:
            unrealised = self.sleeve_equity(c.name, positions) - self.capital[c.name]
            sleeve_equity = equity * Decimal(repr(self.weights[c.name]))
            self.capital[c.name] = sleeve_equity - unrealised
            shares.append(
                SleeveShare(
                    c.name,
                    before[c.name],
                    self.weights[c.name],
                    float(sleeve_equity),
                    c.lcb,
                    c.name in target.probation,
                )
            )
        event = AllocationChanged(now_ms, tuple(shares), target.feasible, target.reserve)
        self.history.append(event)
        log.info(
            "allocation_changed",
            weights={s.name: round(s.after, 6) for s in shares},
            probation=list(target.probation),
            feasible=target.feasible,
            reserve=round(target.reserve, 6),
        )
        return event

    # -- Persistence -------------------------------------------------------------------------

    def state_key(self) -> tuple[Any, ...]:
        """Return a cheap fingerprint of what `dump_state` stores (changed: store it)."""
        return (self.next_ms, tuple(self.weights.values()), tuple(self.nav.values()))

    def dump_state(self) -> dict[str, Any]:
        """Return the shares, each sleeve's time-weighted value and the schedule, as JSON."""
        return {
            "weights": dict(self.weights),
            "nav": dict(self.nav),
            "started_ms": self.started_ms,
            "next_ms": self.next_ms,
            "probation": list(self.probation),
        }

    def restore_state(
        self, data: Mapping[str, Any], *, equity: Decimal, positions: Mapping[str, Position]
    ) -> bool:
        """Take back saved shares after a restart; False (nothing changed) if the sleeves differ.

        The capital is re-cut from today's `equity` by the saved shares, so a sleeve's
        equity is its share of the account as it stands; the probation clock and the next
        reallocation keep their saved times.
        """
        weights = {str(k): float(v) for k, v in data["weights"].items()}
        if set(weights) != set(self.sleeves):
            log.warning("allocation_not_restored", saved=sorted(weights), now=sorted(self.sleeves))
            return False
        nav = {name: float(data["nav"][name]) for name in self.sleeves}
        self.weights, self.nav = weights, nav
        self.started_ms, self.next_ms = int(data["started_ms"]), int(data["next_ms"])
        self.probation = tuple(str(p) for p in data["probation"])
        for name in self.sleeves:
            unrealised = self.sleeve_equity(name, positions) - self.capital[name]
            self.capital[name] = equity * Decimal(repr(weights[name])) - unrealised
        return True

    # -- Views -------------------------------------------------------------------------------

    def describe(self, positions: Mapping[str, Position]) -> dict[str, dict[str, float]]:
        """Return per strategy its weight, sleeve equity and probation flag (the snapshot's)."""
        return {
            name: {
                "weight": self.weights[name],
                "sleeve_equity": float(self.sleeve_equity(name, positions)),
                "probation": float(name in self.probation),
            }
            for name in self.sleeves
        }


def strategy_sections(
    allocator: Allocator,
    trades: Sequence[ClosedTrade],
    positions: Mapping[str, Position],
    ranked: Sequence[Ranked],
) -> list[StrategySection]:
    """Return the run summary's per-strategy sections, in the ranking's order."""
    order = {r.name: i for i, r in enumerate(ranked)}
    by_name = {r.name: r for r in ranked}
    sections = []
    for name, sleeve in allocator.sleeves.items():
        own = [t for t in trades if t.strategy == name]
        r = by_name.get(name)
        sections.append(
            StrategySection(
                name=name,
                pairs=tuple(sleeve.pairs),
                tag=sleeve.tag,
                weight=allocator.weights[name],
                sleeve_equity=float(allocator.sleeve_equity(name, positions)),
                nav=allocator.nav[name],
                probation=name in allocator.probation,
                n_trades=len(own),
                realised_pnl=sum(t.pnl for t in own),
                fees=sum(t.fee for t in own),
                win_rate=sum(t.pnl > 0 for t in own) / len(own) if own else 0.0,
                open_positions=tuple(p for p in sleeve.pairs if p in positions),
                score=None if r is None else r.total,
                lcb=None if r is None else r.lcb,
                allocations=tuple(
                    AllocationPoint(e.ts, s.after)
                    for e in allocator.history
                    for s in e.sleeves
                    if s.name == name
                ),
            )
        )
    sections.sort(key=lambda section: order.get(section.name, len(order)))
    return sections
