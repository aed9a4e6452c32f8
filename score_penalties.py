"""Behavioural penalties of the score: each a value plus the evidence behind it.

Part of `reward_system`, which re-exports these names. Every penalty is zero on a clean
record and grows with the offence; each is time-weighted by the same exponential weights
as the score's factors (`trade_weights`), so an old sin fades with the record's half-life.

* **overtrading**: fees eating the edge. The share of the gross edge (PnL before fees)
  that fees took, capped at 1 (all of it, or no edge to eat), above the tolerated share
  `fee_share_tolerance`.
* **stop_overrun**: holding a loser past its stop. For each trade with a stop in force at
  entry, how far the exit lies beyond the stop (as a fraction of the stop) past the
  slippage tolerance `stop_slippage`, averaged over all trades, in percent.
* **averaging_down**: adding to a losing position. Fills added at a price worse than the
  position's average entry, per trade.
* **revenge**: entering right after a circuit breaker tripped. The share of trades entered
  within `revenge_window_min` minutes after a trip.
* **rule_breach**: limits risk reports as breached; the time-weighted count of breaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from config import RewardSettings
from models import ClosedTrade, PositionSide


DAY_MS: Final = 86_400_000
MINUTE_MS: Final = 60_000
PENALTIES: Final = ("overtrading", "stop_overrun", "averaging_down", "revenge", "rule_breach")


@dataclass(frozen=True, slots=True)
class BreakerTrip:
    """A circuit breaker tripped at `ts` (ms UTC)."""

    ts: int
    breaker: str


@dataclass(frozen=True, slots=True)
class RuleBreach:
    """A risk rule reported as breached at `ts`, with what happened."""

    ts: int
    rule: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ScoreContext:
    """What the trade record alone does not show: breaker trips and rule breaches."""

    breaker_trips: tuple[BreakerTrip, ...] = ()
    rule_breaches: tuple[RuleBreach, ...] = ()


@dataclass(frozen=True, slots=True)
class Offence:
    """One piece of evidence: the trade (its index in the record) or event, and its figure.

    `trade` is None for an offence that is not a trade (a rule breach).
    """

    trade: int | None
    ts: int
    pair: str
    amount: float
    note: str


@dataclass(frozen=True, slots=True)
class Penalty:
    """A behavioural penalty: its value (>= 0), its weight, and the evidence.

    The score subtracts `weight x value`.
    """

    name: str
    value: float
    weight: float
    evidence: tuple[Offence, ...] = ()

    @property
    def cost(self) -> float:
        """Return what the penalty takes off the total (weight x value)."""
        return self.weight * self.value


def decay(age_ms: np.ndarray, half_life_days: float) -> np.ndarray:
    """Return the exponential time weights 2^(-age / half-life) of ages in ms (age >= 0)."""
    age = np.maximum(np.asarray(age_ms, dtype=np.float64), 0.0)
    return np.asarray(np.exp2(-age / (half_life_days * DAY_MS)), dtype=np.float64)


def trade_weights(trades: Sequence[ClosedTrade], now_ms: int, half_life_days: float) -> np.ndarray:
    """Return each trade's weight by the age of its exit at `now_ms`."""
    exits = np.fromiter((t.exit_ts for t in trades), dtype=np.float64, count=len(trades))
    return decay(now_ms - exits, half_life_days)


def penalties(
    trades: Sequence[ClosedTrade],
    weights: np.ndarray,
    settings: RewardSettings,
    context: ScoreContext,
    now_ms: int,
) -> tuple[Penalty, ...]:
    """Return every behavioural penalty of a record, in `PENALTIES` order."""
    return (
        overtrading(trades, weights, settings),
        stop_overrun(trades, weights, settings),
        averaging_down(trades, weights, settings),
        revenge(trades, weights, settings, context),
        rule_breach(context, settings, now_ms),
    )


def overtrading(
    trades: Sequence[ClosedTrade], weights: np.ndarray, settings: RewardSettings
) -> Penalty:
    """Return the share of the gross edge paid in fees above the tolerated share."""
    if not trades:
        return Penalty("overtrading", 0.0, settings.overtrading_weight)
    fees = np.fromiter((t.fee for t in trades), dtype=np.float64, count=len(trades))
    pnl = np.fromiter((t.pnl for t in trades), dtype=np.float64, count=len(trades))
    paid = float(np.dot(weights, fees))
    gross = float(np.dot(weights, pnl + fees))  # the edge before fees
    if paid <= 0:
        share = 0.0
    elif gross <= 0:
        share = 1.0  # fees paid for no edge at all: churn
    else:
        share = min(paid / gross, 1.0)
    value = max(share - settings.fee_share_tolerance, 0.0)
    evidence: tuple[Offence, ...] = ()
    if value > 0:
        # The costliest trades by fee, as the operator would look for them first.
        worst = [int(i) for i in np.argsort(-fees, kind="stable")[:5]]
        evidence = tuple(
            Offence(
                i,
                trades[i].exit_ts,
                trades[i].pair,
                float(fees[i]),
                f"fee {fees[i]:.4g} on a gross result of {pnl[i] + fees[i]:.4g}",
            )
            for i in worst
        )
        evidence = (Offence(None, trades[-1].exit_ts, "", share, "fees / gross edge"), *evidence)
    return Penalty("overtrading", value, settings.overtrading_weight, evidence)


def _beyond_stop(trade: ClosedTrade) -> float:
    # How far the exit lies past the stop, as a fraction of the stop (<= 0: at or inside).
    stop = trade.stop_price
    if stop is None or stop <= 0:
        return 0.0
    if trade.side is PositionSide.LONG:
        return (stop - trade.exit_price) / stop
    return (trade.exit_price - stop) / stop


def stop_overrun(
    trades: Sequence[ClosedTrade], weights: np.ndarray, settings: RewardSettings
) -> Penalty:
    """Return the weighted mean overrun past the entry stop (beyond slippage), in percent."""
    total = float(weights.sum())
    evidence: list[Offence] = []
    overrun = 0.0
    for i, trade in enumerate(trades):
        beyond = _beyond_stop(trade) - settings.stop_slippage
        if beyond > 0:
            overrun += float(weights[i]) * beyond
            note = f"exit {trade.exit_price:.6g} past the stop {trade.stop_price:.6g}"
            evidence.append(Offence(i, trade.exit_ts, trade.pair, beyond, note))
    value = 100.0 * overrun / total if total > 0 else 0.0
    return Penalty("stop_overrun", value, settings.stop_overrun_weight, tuple(evidence))


def averaging_down(
    trades: Sequence[ClosedTrade], weights: np.ndarray, settings: RewardSettings
) -> Penalty:
    """Return the weighted mean count of adds at a loss per trade."""
    total = float(weights.sum())
    adds = np.fromiter((t.adds_at_loss for t in trades), dtype=np.float64, count=len(trades))
    value = float(np.dot(weights, adds)) / total if total > 0 else 0.0
    evidence = tuple(
        Offence(i, trades[i].entry_ts, trades[i].pair, float(adds[i]), "added at a loss")
        for i in (int(k) for k in np.flatnonzero(adds > 0))
    )
    return Penalty("averaging_down", value, settings.averaging_down_weight, evidence)


def revenge(
    trades: Sequence[ClosedTrade],
    weights: np.ndarray,
    settings: RewardSettings,
    context: ScoreContext,
) -> Penalty:
    """Return the weighted share of trades entered soon after a circuit-breaker trip."""
    total = float(weights.sum())
    if not trades or not context.breaker_trips or total <= 0:
        return Penalty("revenge", 0.0, settings.revenge_weight)
    trips = sorted(context.breaker_trips, key=lambda t: t.ts)
    trip_ts = np.array([t.ts for t in trips], dtype=np.int64)
    entries = np.fromiter((t.entry_ts for t in trades), dtype=np.int64, count=len(trades))
    # The latest trip at or before each entry.
    last = np.searchsorted(trip_ts, entries, side="right") - 1
    window = settings.revenge_window_min * MINUTE_MS
    since = entries - trip_ts[np.maximum(last, 0)]
    hit = (last >= 0) & (since <= window)
    evidence = tuple(
        Offence(
            i,
            trades[i].entry_ts,
            trades[i].pair,
            float(since[i]) / MINUTE_MS,
            f"entered {since[i] / MINUTE_MS:.0f} min after {trips[last[i]].breaker} tripped",
        )
        for i in (int(k) for k in np.flatnonzero(hit))
    )
    value = float(weights[hit].sum()) / total
    return Penalty("revenge", value, settings.revenge_weight, evidence)


def rule_breach(context: ScoreContext, settings: RewardSettings, now_ms: int) -> Penalty:
    """Return the time-weighted count of the rule breaches risk reported."""
    if not context.rule_breaches:
        return Penalty("rule_breach", 0.0, settings.breach_weight)
    ts = np.array([b.ts for b in context.rule_breaches], dtype=np.float64)
    weights = decay(now_ms - ts, settings.half_life_days)
    evidence = tuple(
        Offence(None, b.ts, "", float(w), f"{b.rule}: {b.detail}" if b.detail else b.rule)
        for b, w in zip(context.rule_breaches, weights, strict=True)
    )
    return Penalty("rule_breach", float(weights.sum()), settings.breach_weight, evidence)
