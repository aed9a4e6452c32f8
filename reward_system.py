"""Score strategies from their closed trades; the same number ranks them and rewards the learner.

For each strategy the score over its last `window_trades` round trips is

    score = pnl_weight x mean return per trade (in %)
          + sharpe_weight x per-trade Sharpe (`analytics.sharpe`, not annualised)
          - drawdown_weight x max drawdown of the trade-by-trade equity (in %, as
            `analytics.max_drawdown` defines it, from a start of 1)
          - turnover_weight x trades per day

(a trade's return is its PnL, fees and perpetual funding included, over its entry
notional), and the per-trade reward handed to the learning loop is the trade's return minus the
increase in drawdown it caused, so a win that follows a deep loss is worth less than one
made from a new high.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import structlog

import analytics
from config import RewardSettings
from models import ClosedTrade


log = structlog.get_logger(__name__)
DAY_MS = 86_400_000


@dataclass(slots=True)
class _Book:
    returns: deque[float]
    exits: deque[int]
    equity: float = 1.0
    peak: float = 1.0
    drawdown: float = 0.0
    total_pnl: float = 0.0
    total_funding: float = 0.0
    trades: int = 0
    rewards: list[float] = field(default_factory=list)


class RewardSystem:
    """Keep per-strategy trade statistics, a score for ranking and a reward per trade."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self._books: dict[str, _Book] = {}

    def _book(self, strategy: str) -> _Book:
        book = self._books.get(strategy)
        if book is None:
            n = self.settings.window_trades
            book = self._books[strategy] = _Book(deque(maxlen=n), deque(maxlen=n))
        return book

    def on_trade_closed(self, strategy: str, trade: ClosedTrade) -> float:
        """Account one round trip; return its reward."""
        book = self._book(strategy)
        notional = trade.entry_price * trade.qty
        ret = trade.pnl / notional if notional > 0 else 0.0
        book.returns.append(ret)
        book.exits.append(trade.exit_ts)
        book.trades += 1
        book.total_pnl += trade.pnl
        book.total_funding += trade.funding
        before = book.drawdown
        # analytics.max_drawdown of the trade-by-trade equity, kept as a running figure.
        book.equity *= 1 + ret
        book.peak = max(book.peak, book.equity)
        book.drawdown = max(book.drawdown, 1 - book.equity / book.peak)
        reward = ret - (book.drawdown - before)
        book.rewards.append(reward)
        log.info(
            "reward", strategy=strategy, pair=trade.pair, ret=round(ret, 6), reward=round(reward, 6)
        )
        return reward

    def score(self, strategy: str) -> float:
        """Return the strategy's current score (0 with no trades)."""
        book = self._books.get(strategy)
        if book is None or not book.returns:
            return 0.0
        s = self.settings
        rets = list(book.returns)
        mean = sum(rets) / len(rets)
        sharpe = analytics.sharpe(rets) or 0.0
        days = max((book.exits[-1] - book.exits[0]) / DAY_MS, 1.0)
        per_day = len(rets) / days
        return (
            s.pnl_weight * mean * 100
            + s.sharpe_weight * sharpe
            - s.drawdown_weight * book.drawdown * 100
            - s.turnover_weight * per_day
        )

    def scores(self) -> dict[str, float]:
        """Return every strategy's score."""
        return {name: self.score(name) for name in self._books}

    def ranking(self) -> list[tuple[str, float]]:
        """Return strategies best first."""
        return sorted(self.scores().items(), key=lambda kv: kv[1], reverse=True)

    def stats(self, strategy: str) -> dict[str, float]:
        """Return the raw statistics behind a score."""
        book = self._books.get(strategy)
        if book is None:
            return {"trades": 0}
        return {
            "trades": book.trades,
            "total_pnl": book.total_pnl,
            "total_funding": book.total_funding,
            "drawdown": book.drawdown,
            "last_reward": book.rewards[-1] if book.rewards else 0.0,
            "score": self.score(strategy),
        }
