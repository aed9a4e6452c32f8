"""The reward system's score uses analytics' Sharpe and max drawdown definitions."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import analytics
from config import RewardSettings
from models import ClosedTrade, PositionSide
from reward_system import RewardSystem


DAY = 86_400_000


def trade(i: int, ret: float) -> ClosedTrade:
    """Return a closed long of notional 1,000 whose PnL is `ret` of it, exiting on day `i`."""
    return ClosedTrade(
        pair="BTC/USDT",
        side=PositionSide.LONG,
        entry_ts=i * DAY,
        exit_ts=i * DAY + DAY // 2,
        entry_price=100.0,
        exit_price=100.0 * (1 + ret),
        qty=10.0,
        fee=0.0,
        pnl=1_000.0 * ret,
    )


def test_score_by_hand_on_three_trades() -> None:
    """+10%, -10%, +5% over three days: each weighted term equals its formula by hand."""
    rets = [0.1, -0.1, 0.05]
    system = RewardSystem(RewardSettings())
    for i, r in enumerate(rets):
        system.on_trade_closed("s", trade(i, r))
    mean = statistics.fmean(rets)
    sharpe = mean / statistics.stdev(rets)
    drawdown = 1 - 1.1 * 0.9 / 1.1  # the peak after the first trade, then a 10% loss
    per_day = 3 / 2.0  # exits span two days
    expected = 1.0 * mean * 100 + 0.5 * sharpe - 1.0 * drawdown * 100 - 0.1 * per_day
    assert system.score("s") == pytest.approx(expected)
    assert system.stats("s")["drawdown"] == pytest.approx(0.1)


@given(st.lists(st.floats(min_value=-0.5, max_value=0.5), min_size=1, max_size=30))
@settings(deadline=None)
def test_running_drawdown_is_analytics_max_drawdown(rets: list[float]) -> None:
    """The running drawdown equals analytics.max_drawdown of the compounded trade equity."""
    system = RewardSystem(RewardSettings(window_trades=100))
    for i, r in enumerate(rets):
        system.on_trade_closed("s", trade(i, r))
    equity = [math.prod(1 + r for r in rets[: k + 1]) for k in range(len(rets))]
    expected = analytics.max_drawdown(equity, start=1.0)
    assert system.stats("s")["drawdown"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
