"""The one score: its factors, time weighting, behavioural penalties and the skill ranking."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import analytics
from config import RewardSettings, load_settings
from models import ClosedTrade, PositionSide, TradingState, TradingStateChanged
from reward_system import (
    PENALTIES,
    BreakerTrip,
    RewardSystem,
    RuleBreach,
    Score,
    ScoreContext,
    StrategyRecord,
    daily_returns,
    rank,
    score,
    score_backtest,
)


DAY = 86_400_000
HOUR = 3_600_000
T0 = 1_700_000_000_000 // DAY * DAY  # a UTC midnight
FLAT = RewardSettings(half_life_days=1e9)  # weights all but equal


def trade(day: int, ret: float, **changes: object) -> ClosedTrade:
    """Return a closed long of notional 1,000 whose PnL is `ret` of it, exiting on `day` noon."""
    base = ClosedTrade(
        pair="BTC/USDT",
        side=PositionSide.LONG,
        entry_ts=T0 + day * DAY + HOUR,
        exit_ts=T0 + day * DAY + 12 * HOUR,
        entry_price=100.0,
        exit_price=100.0 * (1 + ret),
        qty=10.0,
        fee=0.0,
        pnl=1_000.0 * ret,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def curve_of(trades: list[ClosedTrade], start: float = 10_000.0) -> tuple[np.ndarray, np.ndarray]:
    """Return the account curve of `trades`: the start an hour before, then each exit."""
    ts = [trades[0].entry_ts - HOUR] + [t.exit_ts for t in trades]
    equity = start + np.concatenate(([0.0], np.cumsum([t.pnl for t in trades])))
    return np.array(ts, dtype=np.int64), equity


def record(rets: list[float], **changes: object) -> StrategyRecord:
    """Return a record of one trade a day with these returns (trade fields changed as given)."""
    trades = [trade(i, r, **changes) for i, r in enumerate(rets)]
    return StrategyRecord(tuple(trades), *curve_of(trades))


def card(r: StrategyRecord, s: RewardSettings = FLAT) -> Score:
    """Return the score of a record."""
    return score(r.trades, r.equity_ts, r.equity, s, context=r.context)


# -- Factors ---------------------------------------------------------------------------------


def test_daily_returns_take_each_days_last_point_and_carry_empty_days() -> None:
    """Two points on day 0, none on day 1, one on day 2: closes 110, 110, 99."""
    ts = np.array([T0, T0 + HOUR, T0 + 5 * HOUR, T0 + 2 * DAY + HOUR])
    days, rets = daily_returns(ts, np.array([100.0, 120.0, 110.0, 99.0]))
    assert days.tolist() == [T0 // DAY, T0 // DAY + 1, T0 // DAY + 2]
    assert rets == pytest.approx([0.1, 0.0, -0.1])
    _, extended = daily_returns(ts, np.array([100.0, 120.0, 110.0, 99.0]), T0 + 4 * DAY)
    assert extended == pytest.approx([0.1, 0.0, -0.1, 0.0, 0.0])


def test_factors_equal_analytics_definitions_on_daily_returns() -> None:
    """With equal weights, Sharpe/Sortino are analytics' of the daily returns x sqrt(365)."""
    rets = [0.02, -0.01, 0.015, -0.03, 0.01, 0.02, -0.005]
    r = record(rets)
    got = card(r)
    daily = np.diff(r.equity) / r.equity[:-1]  # one exit a day, the start on day 0
    daily = np.concatenate(([daily[0]], daily[1:]))
    assert got.sharpe == pytest.approx(analytics.sharpe(daily, 365), rel=1e-6)
    downside = math.sqrt(np.mean(np.minimum(daily, 0) ** 2))
    assert got.sortino == pytest.approx(daily.mean() / downside * math.sqrt(365), rel=1e-6)
    assert got.max_drawdown == pytest.approx(analytics.max_drawdown(r.equity))
    pnl = np.array([t.pnl for t in r.trades])
    assert got.profit_factor == pytest.approx(pnl[pnl > 0].sum() / -pnl[pnl < 0].sum())
    assert got.win_rate == pytest.approx(4 / 7)
    assert got.consistency == pytest.approx(4 / 7)
    assert got.trades == 7
    assert got.effective_trades == pytest.approx(7)


def test_total_is_the_sum_of_its_weighted_contributions() -> None:
    """Each contribution is its weight times its factor; the total is their sum."""
    s = RewardSettings(half_life_days=1e9, sharpe_weight=2.0, win_rate_weight=3.0)
    got = card(record([0.02, -0.01, 0.015, -0.03, 0.01]), s)
    parts = dict(got.contributions)
    assert got.sharpe is not None
    assert got.win_rate is not None
    assert got.profit_factor is not None
    assert parts["sharpe"] == pytest.approx(2.0 * got.sharpe)
    assert parts["win_rate"] == pytest.approx(3.0 * (got.win_rate - 0.5) * 2)
    assert parts["max_drawdown"] == pytest.approx(-2.0 * got.max_drawdown)
    assert parts["profit_factor"] == pytest.approx(0.5 * math.log(got.profit_factor))
    assert set(parts) >= set(PENALTIES)
    summed = 0.0
    for value in parts.values():
        summed += value
    assert got.total == summed


def test_empty_record_scores_zero() -> None:
    """No trades, one flat point: every factor is missing and the total is 0."""
    got = score([], np.array([T0]), np.array([1_000.0]), RewardSettings())
    assert got.total == 0.0
    assert got.trades == 0
    assert all(p.value == 0 for p in got.penalties)


def test_weights_are_env_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    """KESTREL_REWARD__* sets the weights and the half-life."""
    monkeypatch.setenv("KESTREL_REWARD__SHARPE_WEIGHT", "3.5")
    monkeypatch.setenv("KESTREL_REWARD__HALF_LIFE_DAYS", "14")
    loaded = load_settings(env_file=None).reward
    assert (loaded.sharpe_weight, loaded.half_life_days) == (3.5, 14.0)


def test_recent_results_weigh_more_than_old_ones() -> None:
    """The same returns score higher when the gains are recent and the losses old."""
    losses_then_gains = [-0.02] * 20 + [0.02] * 20
    s = RewardSettings(half_life_days=10)
    recent_gains = card(record(losses_then_gains), s)
    recent_losses = card(record(losses_then_gains[::-1]), s)
    assert recent_gains.win_rate is not None
    assert recent_losses.win_rate is not None
    assert recent_gains.win_rate > 0.5 > recent_losses.win_rate
    assert recent_gains.total > recent_losses.total
    # Equal weights cannot tell the two orders apart by win rate.
    assert card(record(losses_then_gains)).win_rate == pytest.approx(0.5)


def test_effective_sample_size_is_kish() -> None:
    """Equal weights give n; a half-life h gives (1 + a) / (1 - a) for a long record."""
    assert analytics.effective_sample_size(np.ones(40)) == pytest.approx(40)
    a = 2 ** (-1 / 30)
    weights = a ** np.arange(5_000)
    assert analytics.effective_sample_size(weights) == pytest.approx((1 + a) / (1 - a))


def test_drawdown_is_windowed() -> None:
    """A 30% fall 200 days ago is outside a 90-day window; a recent one is inside."""
    rets = [-0.3 / 1.0] + [0.001] * 199 + [0.0]
    old = card(record(rets), RewardSettings(drawdown_window_days=90))
    assert old.max_drawdown < 0.01
    whole = card(record(rets), RewardSettings(drawdown_window_days=1_000))
    assert whole.max_drawdown == pytest.approx(0.03, rel=0.01)  # 300 of a 10,000 start


@given(
    st.lists(st.floats(min_value=-0.1, max_value=0.1), min_size=2, max_size=40),
    st.floats(min_value=0.1, max_value=10.0),
)
@settings(deadline=None, max_examples=60)
def test_weighted_sharpe_with_equal_weights_is_sharpe(rets: list[float], weight: float) -> None:
    """analytics.weighted_sharpe with equal weights equals analytics.sharpe."""
    plain = analytics.sharpe(rets, 365)
    weighted = analytics.weighted_sharpe(rets, np.full(len(rets), weight), 365)
    if plain is None or weighted is None or np.std(rets) < 1e-9:
        return
    assert weighted == pytest.approx(plain, rel=1e-6)


# -- Penalties -------------------------------------------------------------------------------

STOP = {"stop_price": 95.0}
TRIP = ScoreContext(breaker_trips=(BreakerTrip(T0 + 3 * DAY + HOUR // 2, "daily_loss"),))


def _entered_after_trip(hours: int) -> StrategyRecord:
    """Return five daily trades, the fourth entered `hours` after midnight (the trip: 00:30)."""
    rets = [0.02, -0.03, 0.01, 0.01, 0.02]
    trades = [trade(i, r) for i, r in enumerate(rets)]
    trades[3] = dataclasses.replace(trades[3], entry_ts=T0 + 3 * DAY + hours * HOUR)
    return StrategyRecord(tuple(trades), *curve_of(trades), context=TRIP)


BREACH = ScoreContext(rule_breaches=(RuleBreach(T0 + DAY, "max_exposure", "120%"),))
CASES = {
    # name: (the clean twin, the record that commits it)
    "overtrading": (
        record([0.02, -0.01, 0.02, 0.01], fee=1.0),
        record([0.02, -0.01, 0.02, 0.01], fee=15.0),  # same net PnL, fees took 60% of gross
    ),
    "stop_overrun": (
        record([0.02, -0.05, 0.01, -0.05], **STOP),  # the losers exit at the stop
        record([0.02, -0.12, 0.01, -0.05], **STOP),  # one fell 7% past it
    ),
    "averaging_down": (
        record([0.02, -0.03, 0.01, 0.01]),
        record([0.02, -0.03, 0.01, 0.01], adds_at_loss=1),
    ),
    "revenge": (_entered_after_trip(3), _entered_after_trip(1)),
    "rule_breach": (
        record([0.02, -0.03, 0.01]),
        dataclasses.replace(record([0.02, -0.03, 0.01]), context=BREACH),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_penalty_is_zero_on_the_clean_twin_and_positive_on_the_offender(name: str) -> None:
    """Only the record that commits the behaviour pays for it, and the evidence says where."""
    clean, offender = CASES[name]
    clean_card, offender_card = card(clean), card(offender)
    assert all(p.value == 0 for p in clean_card.penalties), clean_card.penalties
    penalty = offender_card.penalty(name)
    assert penalty.value > 0
    assert penalty.evidence
    others = [p for p in offender_card.penalties if p.name != name]
    assert all(p.value == 0 for p in others)
    assert dict(offender_card.contributions)[name] == -penalty.cost < 0
    assert offender_card.total < clean_card.total or name == "overtrading"


def test_penalty_evidence_names_the_offending_trades() -> None:
    """The overrun names trade 1 and its excess; revenge names the entry after the trip."""
    _, offender = CASES["stop_overrun"]
    overrun = card(offender).penalty("stop_overrun")
    assert [o.trade for o in overrun.evidence] == [1]
    assert overrun.evidence[0].amount == pytest.approx((95 - 88) / 95 - 0.002)
    revenge = card(CASES["revenge"][1]).penalty("revenge")
    assert [o.trade for o in revenge.evidence] == [3]
    assert revenge.evidence[0].amount == pytest.approx(30)  # minutes after the trip


def test_overtrading_counts_fees_paid_for_no_edge() -> None:
    """Churning with no gross edge pays the full share: value 1 - tolerance."""
    churn = record([0.0, 0.0, 0.0], fee=2.0, pnl=-2.0)
    assert card(churn).penalty("overtrading").value == pytest.approx(0.5)


# -- Ranking ---------------------------------------------------------------------------------


def _from_daily(rets: np.ndarray) -> StrategyRecord:
    """Return a record whose equity moves by `rets`, one point each day."""
    ts = T0 + np.arange(rets.size + 1, dtype=np.int64) * DAY
    equity = 10_000.0 * np.concatenate(([1.0], np.cumprod(1 + rets)))
    return StrategyRecord((), ts, equity)


def test_a_long_steady_record_outranks_a_lucky_streak() -> None:
    """365 days at a daily Sharpe of 0.1 beat a 10-day streak at 0.5 in >= 85% of 200 draws.

    The raw (unshrunk) Sharpe, by contrast, puts the streak first most of the time.
    """
    rng = np.random.default_rng(11)
    sigma = 0.01
    wins = raw_wins = 0
    for _ in range(200):
        steady = _from_daily(rng.normal(0.1 * sigma, sigma, 365))
        lucky = _from_daily(rng.normal(0.5 * sigma, sigma, 10))
        end = int(steady.equity_ts[-1])
        lucky = StrategyRecord((), lucky.equity_ts + (end - int(lucky.equity_ts[-1])), lucky.equity)
        ranked = rank({"steady": steady, "lucky": lucky})
        wins += ranked[0].name == "steady"
        by_name = {r.name: r for r in ranked}
        raw = {
            n: card(rec, RewardSettings()).skill.sharpe for n, rec in [("s", steady), ("l", lucky)]
        }
        raw_wins += raw["s"] > raw["l"]
        assert by_name["steady"].effective_n > 5 * by_name["lucky"].effective_n
    assert wins >= 170
    assert raw_wins < 100


def test_rank_orders_by_the_lower_bound() -> None:
    """The ranking is sorted by lcb, each entry carrying its score's total and trades."""
    records = {"a": record([0.01] * 5 + [-0.01]), "b": record([0.02, -0.03] * 3)}
    ranked = rank(records, FLAT)
    assert [r.lcb for r in ranked] == sorted((r.lcb for r in ranked), reverse=True)
    for r in ranked:
        assert r.total == card(records[r.name]).total
        assert r.trades == 6


# -- The running book ------------------------------------------------------------------------


def test_reward_system_scores_its_book_with_the_pure_function() -> None:
    """RewardSystem's score, card and ranking equal score() on the documented curve, exactly."""
    rets = [0.01, -0.02, 0.015, 0.005, -0.01]
    system = RewardSystem(FLAT)
    trades = [trade(i, r) for i, r in enumerate(rets)]
    for t in trades:
        system.on_trade_closed("s", t)
    # The documented curve: a start of 1 at the first entry, compounding each notional return.
    ts = np.array([trades[0].entry_ts] + [t.exit_ts for t in trades])
    equity = np.concatenate(([1.0], np.cumprod([1 + r for r in rets])))
    expected = score(trades, ts, equity, FLAT)
    assert system.score("s") == expected.total
    assert system.card("s") == expected
    assert system.ranking() == [("s", expected.skill.lcb)]


def test_reward_system_uses_the_equity_it_is_given() -> None:
    """Passing the account equity after each trade scores that curve instead."""
    trades = [trade(i, r) for i, r in enumerate([0.01, -0.02, 0.03])]
    _, equity = curve_of(trades)
    system = RewardSystem(FLAT)
    for t, e in zip(trades, equity[1:], strict=True):
        system.on_trade_closed("s", t, equity=float(e))
    got = system.record("s")
    assert got.equity.tolist() == equity.tolist()
    assert system.card("s") == score(trades, got.equity_ts, equity, FLAT)


def test_breaker_trips_and_breaches_reach_the_penalties() -> None:
    """A trip before an entry and a reported breach show up in the book's score."""
    system = RewardSystem(RewardSettings())
    system.on_trade_closed("s", trade(0, 0.01))
    system.on_breaker_trip(T0 + DAY + HOUR // 2, "daily_loss")
    system.on_trade_closed("s", trade(1, 0.01))
    system.on_rule_breach("s", T0 + DAY, "max_exposure", "120%")
    got = system.card("s")
    assert got.penalty("revenge").value > 0
    assert got.penalty("rule_breach").value > 0
    book = system.record("s")
    unpenalised = score(book.trades, book.equity_ts, book.equity, RewardSettings())
    assert system.score("s") < unpenalised.total


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


def test_a_backtest_scores_its_trades_and_curve() -> None:
    """score_backtest and the optimiser's score_result are score() of the run's trades and curve."""
    from optimization_scoring import score_result
    from strategy import load_strategy
    from tests.test_optimization_support import sample_frame
    from trade_simulator import run_fast

    result = run_fast(
        load_strategy("sma_cross", {"fast": 5.0, "slow": 20.0}),
        sample_frame(),
        pair="BTC/USDT",
        timeframe="1m",
    )
    assert result.n_trades >= 3
    ts, equity = analytics.curve(result)
    expected = score(result.trades, ts, equity, RewardSettings())
    assert score_backtest(result, RewardSettings()) == expected
    assert score_result(result) == expected.total
    assert expected.trades == result.n_trades
    assert expected.max_drawdown == pytest.approx(
        analytics.max_drawdown(result.equity, start=result.starting_balance)
    )  # the sample spans less than the 90-day window


def test_a_move_down_the_risk_ladder_is_a_breaker_trip() -> None:
    """on_event records a trip on a move to a worse rung, not on recovery."""
    system = RewardSystem(RewardSettings())
    system.on_trade_closed("s", trade(0, 0.01))

    def changed(ts: int, old: TradingState, new: TradingState) -> TradingStateChanged:
        """Return a ladder move at `ts`."""
        return TradingStateChanged(
            ts, old, new, "daily_loss", "limit", None, 1.0, 1.0, 0.0, 1.0, 0.03, 0
        )

    system.on_event(changed(T0 + DAY + 2 * HOUR, TradingState.HALTED, TradingState.NORMAL))
    system.on_trade_closed("s", trade(1, 0.01, entry_ts=T0 + DAY + 3 * HOUR))
    assert system.card("s").penalty("revenge").value == 0
    system.on_event(changed(T0 + 2 * DAY, TradingState.NORMAL, TradingState.HALTED))
    system.on_trade_closed("s", trade(2, 0.01))
    assert system.record("s").context.breaker_trips == (BreakerTrip(T0 + 2 * DAY, "daily_loss"),)
    assert [o.trade for o in system.card("s").penalty("revenge").evidence] == [2]


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=-0.2, max_value=0.2),  # return on notional
            st.floats(min_value=0.0, max_value=5.0),  # fee
            st.sampled_from([None, 90.0, 97.0]),  # entry stop
            st.integers(min_value=0, max_value=2),  # adds at a loss
        ),
        min_size=1,
        max_size=25,
    ),
    st.integers(min_value=-400, max_value=400),
)
@settings(deadline=None, max_examples=60)
def test_penalties_are_non_negative_and_the_score_is_shift_invariant(
    rows: list[tuple[float, float, float | None, int]], shift_days: int
) -> None:
    """Any record: finite total, penalties >= 0, and moving it in time changes nothing."""
    trades = [
        trade(i, r, fee=fee, pnl=1_000.0 * r - fee, stop_price=stop, adds_at_loss=adds)
        for i, (r, fee, stop, adds) in enumerate(rows)
    ]
    context = ScoreContext((BreakerTrip(T0 + 2 * DAY + HOUR // 2, "x"),))
    got = score(trades, *curve_of(trades), RewardSettings(), context=context)
    assert math.isfinite(got.total)
    assert all(p.value >= 0 for p in got.penalties)
    moved = [
        dataclasses.replace(
            t, entry_ts=t.entry_ts + shift_days * DAY, exit_ts=t.exit_ts + shift_days * DAY
        )
        for t in trades
    ]
    moved_context = ScoreContext((BreakerTrip(T0 + (2 + shift_days) * DAY + HOUR // 2, "x"),))
    again = score(moved, *curve_of(moved), RewardSettings(), context=moved_context)
    assert again.total == got.total
