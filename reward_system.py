"""One score of a trade record: the optimiser's objective, the learner's shaping, the ranking.

`score(trades, equity_ts, equity, settings)` is a pure function returning a `Score` with
every factor exposed. It is the one definition: `/score` in Telegram, the status snapshot
(the dashboard and the web view), the optimiser (`score_backtest`) and `RewardSystem`
all show `Score.total` of the same record, bit for bit.

Factors, from the equity curve resampled to UTC days (the last value of each day, days
without a point carried flat, the first day measured from the curve's first value):

* `sharpe`, `sortino`: `analytics.weighted_sharpe` / `weighted_sortino` of the daily
  returns, annualised over 365 days, each day weighted 2^(-age / half_life_days) by its
  age at `now_ms`. A ratio that does not exist counts +-10 by the sign of the mean (0 for
  a flat record); each is capped at +-10.
* `max_drawdown`: `analytics.max_drawdown` over the last `drawdown_window_days`, from the
  equity just before the window.
* `profit_factor`, `win_rate`: `analytics.profit_factor` / `win_rate` of the trades, each
  weighted by the age of its exit.
* `consistency`: the weighted share of positive days among the days the equity moved.

    total = sharpe_weight x sharpe + sortino_weight x sortino
          - drawdown_weight x max_drawdown
          + profit_factor_weight x ln(profit factor)        (clipped to +-ln 10)
          + win_rate_weight x (win rate - 0.5) x 2
          + consistency_weight x (consistency - 0.5) x 2
          - sum of the behavioural penalties' weight x value   (score_penalties)

A factor with no data (no trade, one day) contributes 0; `Score.contributions` lists each
term, and `total` is their sum in that order.

Skill with uncertainty (`Skill`, `rank`): the daily Sharpe s (per day, weighted as above)
is shrunk toward 0 by a normal prior worth `prior_strength_days` k days of evidence,
s x n / (n + k), where n is Kish's effective sample size of the day weights,
(sum w)^2 / sum w^2; its posterior standard deviation is sqrt((1 + s^2 / 2) / (n + k))
(Lo's variance of an estimated Sharpe). Records rank by the lower bound, shrunk Sharpe -
`confidence_z` x sd, annualised: a short lucky streak stays uncertain and ranks below a
long steady record.

`RewardSystem` keeps a running book per strategy (the daemon feeds it each closed trade)
and scores it with the same function. Its curve compounds each trade's return on its
notional from a start of 1, unless the caller passes the account or sleeve equity after
the trade, and its per-trade reward for the learner is the trade's return minus the
increase in drawdown it caused.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import structlog

import analytics
from config import RewardSettings
from models import ClosedTrade, Event, TradingState, TradingStateChanged
from models import Ranked as Ranked
from score_penalties import PENALTIES as PENALTIES
from score_penalties import BreakerTrip as BreakerTrip
from score_penalties import Offence as Offence
from score_penalties import Penalty as Penalty
from score_penalties import RuleBreach as RuleBreach
from score_penalties import ScoreContext as ScoreContext
from score_penalties import decay, penalties, trade_weights
from utils.utilities import logs_at


if TYPE_CHECKING:
    from trade_simulator import BacktestResult


log = structlog.get_logger(__name__)
DAY_MS: Final = analytics.DAY_MS
DAYS_PER_YEAR: Final = 365.0
RATIO_CAP: Final = 10.0
PROFIT_FACTOR_CAP: Final = 10.0
_EMPTY: Final = ScoreContext()
_SEVERITY: Final = {state: rank for rank, state in enumerate(TradingState)}  # the ladder's order


# -- The score -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Skill:
    """The skill estimate behind the ranking (annualised Sharpe units).

    Attributes:
        sharpe: The time-weighted Sharpe of daily returns, unshrunk (0 where none).
        shrunk_sharpe: The posterior mean after shrinkage toward 0.
        sd: The posterior standard deviation.
        lcb: The lower confidence bound, shrunk_sharpe - z x sd: the ranking key.
        effective_n: Kish's effective number of days.
        days: The calendar days in the record.
    """

    sharpe: float
    shrunk_sharpe: float
    sd: float
    lcb: float
    effective_n: float
    days: int


@dataclass(frozen=True, slots=True)
class Score:
    """A record's score, every factor exposed; `total` is the number shown everywhere."""

    total: float
    sharpe: float | None
    sortino: float | None
    max_drawdown: float
    profit_factor: float | None
    win_rate: float | None
    consistency: float | None
    penalties: tuple[Penalty, ...]
    contributions: tuple[tuple[str, float], ...]
    skill: Skill
    trades: int
    effective_trades: float
    now_ms: int

    def penalty(self, name: str) -> Penalty:
        """Return the penalty called `name` (one of `PENALTIES`)."""
        for item in self.penalties:
            if item.name == name:
                return item
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON form: factors, contributions, skill and penalties with evidence."""
        return {
            "total": self.total,
            "sharpe": self.sharpe,
            "sortino": self.sortino,
            "max_drawdown": self.max_drawdown,
            "profit_factor": self.profit_factor,
            "win_rate": self.win_rate,
            "consistency": self.consistency,
            "trades": self.trades,
            "effective_trades": self.effective_trades,
            "contributions": dict(self.contributions),
            "skill": {
                "sharpe": self.skill.sharpe,
                "shrunk_sharpe": self.skill.shrunk_sharpe,
                "sd": self.skill.sd,
                "lcb": self.skill.lcb,
                "effective_n": self.skill.effective_n,
                "days": self.skill.days,
            },
            "penalties": {
                p.name: {
                    "value": p.value,
                    "cost": p.cost,
                    "evidence": [
                        {
                            "trade": o.trade,
                            "ts": o.ts,
                            "pair": o.pair,
                            "amount": o.amount,
                            "note": o.note,
                        }
                        for o in p.evidence
                    ],
                }
                for p in self.penalties
            },
            "now_ms": self.now_ms,
        }


def daily_returns(
    equity_ts: np.ndarray, equity: np.ndarray, now_ms: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (UTC day numbers, daily simple returns) of an equity curve.

    Each day closes at its last point; days without a point (and days up to `now_ms`)
    carry the close flat; the first day's return runs from the curve's first value.
    """
    ts = np.asarray(equity_ts, dtype=np.int64)
    values = np.asarray(equity, dtype=np.float64)
    if ts.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if np.any(np.diff(ts) < 0):  # points out of order: sort them (ties keep their order)
        order = np.argsort(ts, kind="stable")
        ts, values = ts[order], values[order]
    day = ts // DAY_MS
    ends = np.append(np.flatnonzero(np.diff(day) != 0), day.size - 1)
    first = int(day[0])
    last = max(int(day[-1]), first if now_ms is None else int(now_ms) // DAY_MS)
    # Forward-fill the closes over every calendar day from the first to the last.
    slot = np.full(last - first + 1, -1, dtype=np.int64)
    slot[day[ends] - first] = ends
    slot = np.maximum.accumulate(slot)
    closes = values[slot]
    previous = np.concatenate(([values[0]], closes[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        returns = np.where(previous > 0, closes / previous - 1.0, 0.0)
    return np.arange(first, last + 1, dtype=np.int64), returns


def skill(returns: np.ndarray, weights: np.ndarray, settings: RewardSettings) -> Skill:
    """Return the shrunk Sharpe of daily `returns` under `weights` and its lower bound."""
    n = analytics.effective_sample_size(weights)
    raw = analytics.weighted_sharpe(returns, weights) or 0.0  # per day
    k = settings.prior_strength_days
    shrunk = raw * n / (n + k)
    sd = math.sqrt((1.0 + raw * raw / 2.0) / (n + k))
    year = math.sqrt(DAYS_PER_YEAR)
    return Skill(
        sharpe=raw * year,
        shrunk_sharpe=shrunk * year,
        sd=sd * year,
        lcb=(shrunk - settings.confidence_z * sd) * year,
        effective_n=n,
        days=int(returns.size),
    )


def _capped_ratio(value: float | None, mean: float) -> float:
    if value is None:
        return 0.0 if mean == 0 else math.copysign(RATIO_CAP, mean)
    return max(-RATIO_CAP, min(RATIO_CAP, value))


def _window_drawdown(ts: np.ndarray, equity: np.ndarray, now_ms: int, days: float) -> float:
    start = now_ms - days * DAY_MS
    inside = int(np.searchsorted(ts, start, side="left"))
    if inside >= ts.size:
        return 0.0
    before = float(equity[inside - 1]) if inside > 0 else None
    return analytics.max_drawdown(equity[inside:], start=before)


def _log_profit_factor(value: float | None, gross_win: float) -> float:
    bound = math.log(PROFIT_FACTOR_CAP)
    if value is None:  # no losing trade: capped when there were wins, nothing otherwise
        return bound if gross_win > 0 else 0.0
    if value <= 0:
        return -bound
    return max(-bound, min(bound, math.log(value)))


def score(
    trades: Sequence[ClosedTrade],
    equity_ts: np.ndarray,
    equity: np.ndarray,
    settings: RewardSettings,
    *,
    context: ScoreContext | None = None,
    now_ms: int | None = None,
) -> Score:
    """Return the score of a trade record and its equity curve (see the module docstring).

    Args:
        trades: The closed trades, in exit order.
        equity_ts: The curve's timestamps (ms UTC, ascending), its starting point first.
        equity: The equity at each timestamp.
        settings: Weights, half-life, windows and the ranking's prior.
        context: Breaker trips and rule breaches for the behavioural penalties.
        now_ms: The time the weights decay to; default the last point of the record.
            Later than the curve, the days in between count as flat.
    """
    ts = np.asarray(equity_ts, dtype=np.int64)
    values = np.asarray(equity, dtype=np.float64)
    if now_ms is None:
        last_exit = max((t.exit_ts for t in trades), default=0)
        now_ms = max(int(ts[-1]) if ts.size else 0, last_exit)
    days, returns = daily_returns(ts, values, now_ms)
    day_weights = decay((now_ms // DAY_MS - days) * DAY_MS, settings.half_life_days)
    mean = float(np.dot(day_weights, returns) / day_weights.sum()) if days.size else 0.0
    sharpe = analytics.weighted_sharpe(returns, day_weights, DAYS_PER_YEAR)
    sortino = analytics.weighted_sortino(returns, day_weights, DAYS_PER_YEAR)
    drawdown = _window_drawdown(ts, values, now_ms, settings.drawdown_window_days)
    weights = trade_weights(trades, now_ms, settings.half_life_days)
    pnl = np.fromiter((t.pnl for t in trades), dtype=np.float64, count=len(trades))
    profit_factor = analytics.profit_factor(pnl, weights)
    win_rate = analytics.win_rate(pnl, weights)
    moved = returns != 0
    consistency = (
        float(day_weights[moved & (returns > 0)].sum() / day_weights[moved].sum())
        if moved.any()
        else None
    )
    found = penalties(trades, weights, settings, context or _EMPTY, now_ms)
    s = settings
    terms = [
        ("sharpe", s.sharpe_weight * _capped_ratio(sharpe, mean)),
        ("sortino", s.sortino_weight * _capped_ratio(sortino, mean)),
        ("max_drawdown", -s.drawdown_weight * drawdown),
        (
            "profit_factor",
            s.profit_factor_weight
            * _log_profit_factor(profit_factor, float(np.dot(weights, np.maximum(pnl, 0.0)))),
        ),
        ("win_rate", 0.0 if win_rate is None else s.win_rate_weight * (win_rate - 0.5) * 2),
        (
            "consistency",
            0.0 if consistency is None else s.consistency_weight * (consistency - 0.5) * 2,
        ),
        *((p.name, -p.cost) for p in found),
    ]
    total = 0.0
    for _, term in terms:
        total += term
    return Score(
        total=total,
        sharpe=sharpe,
        sortino=sortino,
        max_drawdown=drawdown,
        profit_factor=profit_factor,
        win_rate=win_rate,
        consistency=consistency,
        penalties=found,
        contributions=tuple(terms),
        skill=skill(returns, day_weights, settings),
        trades=len(trades),
        effective_trades=analytics.effective_sample_size(weights),
        now_ms=int(now_ms),
    )


def score_backtest(result: BacktestResult, settings: RewardSettings) -> Score:
    """Return the score of a backtest: its closed trades and its candle-by-candle curve."""
    ts, equity = analytics.curve(result)
    return score(result.trades, ts, equity, settings)


# -- Ranking ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StrategyRecord:
    """One strategy's record: its closed trades, its equity curve and its context."""

    trades: tuple[ClosedTrade, ...]
    equity_ts: np.ndarray
    equity: np.ndarray
    context: ScoreContext = field(default_factory=ScoreContext)


def rank(
    records: Mapping[str, StrategyRecord],
    settings: RewardSettings | None = None,
    *,
    now_ms: int | None = None,
) -> list[Ranked]:
    """Return the strategies best first by the lower bound of their shrunk daily Sharpe.

    Ties go to the higher total, then the name. `now_ms` (default: each record's own last
    point) is the time the weights decay to; pass one shared time to rank records that
    end at different times on the same clock.
    """
    settings = settings or RewardSettings()
    cards = {
        name: score(r.trades, r.equity_ts, r.equity, settings, context=r.context, now_ms=now_ms)
        for name, r in records.items()
    }
    return ranked_cards(cards)


def ranked_cards(cards: Mapping[str, Score]) -> list[Ranked]:
    """Return the ranking of already computed scores (best first)."""
    out = [
        Ranked(name, c.skill.lcb, c.skill.shrunk_sharpe, c.skill.effective_n, c.total, c.trades)
        for name, c in cards.items()
    ]
    out.sort(key=lambda r: (-r.lcb, -r.total, r.name))
    return out


# -- The running book ------------------------------------------------------------------------


@dataclass(slots=True)
class _Book:
    # The retained trades with the curve value before and after each (aligned deques).
    trades: deque[ClosedTrade]
    before: deque[tuple[int, float]]
    after: deque[float]
    breaches: list[RuleBreach] = field(default_factory=list)
    equity: float = 1.0
    peak: float = 1.0
    drawdown: float = 0.0
    total_pnl: float = 0.0
    total_funding: float = 0.0
    count: int = 0
    rewards: deque[float] = field(default_factory=lambda: deque(maxlen=1_000))
    card: Score | None = None  # the cached score, dropped on every change


class RewardSystem:
    """Keep each strategy's record, score it with `score`, rank them, reward each trade.

    The daemon calls `on_trade_closed` for each round trip and `on_breaker_trip` /
    `on_rule_breach` when risk reports one; every view (`score`, `card`, `ranking`,
    `ranked`) is `score` of the same retained record, so it equals what the pure function
    gives on it. The weights decay to the book's last event, so the same record always
    scores the same, whenever it is asked.
    """

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self._books: dict[str, _Book] = {}
        self._trips: deque[BreakerTrip] = deque(maxlen=1_000)

    def _book(self, strategy: str) -> _Book:
        book = self._books.get(strategy)
        if book is None:
            n = self.settings.window_trades
            book = self._books[strategy] = _Book(deque(maxlen=n), deque(maxlen=n), deque(maxlen=n))
        return book

    # -- Events ------------------------------------------------------------------------------

    def on_trade_closed(
        self, strategy: str, trade: ClosedTrade, *, equity: float | None = None
    ) -> float:
        """Account one round trip; return its reward for the learner.

        Args:
            strategy: The strategy the trade belongs to.
            trade: The closed round trip.
            equity: The strategy's account or sleeve equity after the trade; without it
                the book compounds the trade's return on its notional from a start of 1.
        """
        book = self._book(strategy)
        notional = trade.entry_price * trade.qty
        ret = trade.pnl / notional if notional > 0 else 0.0
        start = book.after[-1] if book.after else None
        if equity is not None:
            before, after = equity - trade.pnl, float(equity)
        else:
            before = book.equity
            after = before * (1 + ret)
        first_ts = min(trade.entry_ts, trade.exit_ts)
        book.before.append((first_ts, before if start is None else start))
        book.trades.append(trade)
        book.after.append(after)
        book.count += 1
        book.total_pnl += trade.pnl
        book.total_funding += trade.funding  # perpetuals: inside `pnl` already
        previous = book.drawdown
        # analytics.max_drawdown of the trade-by-trade equity, kept as a running figure.
        book.equity = after
        book.peak = max(book.peak if start is not None else before, after)
        if book.peak > 0:
            book.drawdown = max(book.drawdown, 1 - after / book.peak)
        reward = ret - (book.drawdown - previous)
        book.rewards.append(reward)
        book.card = None
        if logs_at(logging.INFO):  # a backtest closes thousands: the fields cost otherwise
            log.info(
                "reward",
                strategy=strategy,
                pair=trade.pair,
                ret=round(ret, 6),
                reward=round(reward, 6),
            )
        return reward

    def on_breaker_trip(self, ts: int, breaker: str) -> None:
        """Record a circuit-breaker trip (risk is global: it counts for every strategy)."""
        self._trips.append(BreakerTrip(ts, breaker))
        for book in self._books.values():
            book.card = None

    def on_event(self, event: Event) -> None:
        """Take the risk alerts: a move down the trading-state ladder is a breaker trip."""
        if isinstance(event, TradingStateChanged) and _SEVERITY.get(
            event.to_state, 0
        ) > _SEVERITY.get(event.from_state, 0):
            self.on_breaker_trip(event.ts, event.trigger)

    def on_rule_breach(self, strategy: str, ts: int, rule: str, detail: str = "") -> None:
        """Record a rule breach risk reported against `strategy`."""
        book = self._book(strategy)
        book.breaches.append(RuleBreach(ts, rule, detail))
        book.card = None

    # -- Views -------------------------------------------------------------------------------

    def record(self, strategy: str) -> StrategyRecord:
        """Return the retained record of `strategy`: trades, curve and context."""
        book = self._books.get(strategy)
        if book is None or not book.trades:
            context = ScoreContext(tuple(self._trips), tuple(book.breaches) if book else ())
            return StrategyRecord((), np.zeros(0, dtype=np.int64), np.zeros(0), context)
        trades = tuple(book.trades)
        ts = np.array([book.before[0][0], *(t.exit_ts for t in trades)], dtype=np.int64)
        equity = np.array([book.before[0][1], *book.after], dtype=np.float64)
        context = ScoreContext(tuple(self._trips), tuple(book.breaches))
        return StrategyRecord(trades, ts, equity, context)

    def card(self, strategy: str) -> Score:
        """Return the strategy's `Score` (of an empty record when it has no trade)."""
        book = self._books.get(strategy)
        if book is not None and book.card is not None:
            return book.card
        r = self.record(strategy)
        card = score(r.trades, r.equity_ts, r.equity, self.settings, context=r.context)
        if book is not None:
            book.card = card
        return card

    def score(self, strategy: str) -> float:
        """Return the strategy's `Score.total` (0 with no trades)."""
        return self.card(strategy).total

    def scores(self) -> dict[str, float]:
        """Return every strategy's `Score.total`."""
        return {name: self.score(name) for name in self._books}

    def ranked(self) -> list[Ranked]:
        """Return the strategies best first by the lower bound of their skill."""
        return ranked_cards({name: self.card(name) for name in self._books})

    def ranking(self) -> list[tuple[str, float]]:
        """Return (strategy, lower confidence bound) best first."""
        return [(r.name, r.lcb) for r in self.ranked()]

    def stats(self, strategy: str) -> dict[str, float]:
        """Return the raw statistics behind a score."""
        book = self._books.get(strategy)
        if book is None:
            return {"trades": 0}
        return {
            "trades": book.count,
            "total_pnl": book.total_pnl,
            "total_funding": book.total_funding,
            "drawdown": book.drawdown,
            "last_reward": book.rewards[-1] if book.rewards else 0.0,
            "score": self.score(strategy),
        }
