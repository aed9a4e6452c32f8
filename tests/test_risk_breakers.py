"""Circuit breakers on constructed equity paths: each rung, its trigger, and how it resumes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from models import Event, OrderIntent, PositionSide, Side, TradingState, TradingStateChanged, Veto
from risk_management import CircuitBreakers, RiskManager, default_rules
from tests.test_risk_support import (
    DAY,
    HOUR,
    MINUTE,
    T0,
    context,
    position,
    settings,
    signal,
    trade,
)


class _Alerts:
    """Record what the manager would send to Telegram."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.sent.append(event)


def _run(risk: RiskManager, path: Sequence[tuple[int, float]]) -> list[TradingState]:
    return [risk.update(ts, Decimal(str(equity))) for ts, equity in path]


def test_unrealised_loss_alone_trips_the_daily_limit() -> None:
    """An open long marked down 3.1% halts trading though no trade has closed."""
    risk = RiskManager(settings())
    cash = Decimal(9_000)  # 9,000 cash + 1 BTC bought at 1,000 = 10,000 at the start
    states = []
    for i, mark in enumerate(["1000", "900", "800", "690"]):
        held = position("BTC/USDT", qty="1", entry="1000", mark=mark)
        states.append(risk.update(T0 + i * MINUTE, cash + held.entry_price + held.unrealised_pnl))
    assert states == [TradingState.NORMAL] * 3 + [TradingState.HALTED]
    assert risk.breakers.consecutive_losses == 0
    trigger = risk.breakers.last_trigger
    assert trigger["trigger"] == "daily_loss"
    assert trigger["day_loss"] == pytest.approx(0.031)
    assert trigger["equity"] == 9_690.0


def test_daily_limit_lifts_at_the_next_utc_day() -> None:
    """Halted for the rest of the day, then normal at the first candle of the next UTC day."""
    risk = RiskManager(settings())
    states = _run(
        risk,
        [(T0, 10_000), (T0 + HOUR, 9_650), (T0 + 5 * HOUR, 9_990), (T0 + DAY, 9_990)],
    )
    assert states == [
        TradingState.NORMAL,
        TradingState.HALTED,
        TradingState.HALTED,  # recovered intraday, still halted for the day
        TradingState.NORMAL,
    ]
    veto = RiskManager(settings())
    _run(veto, [(T0, 10_000), (T0 + HOUR, 9_650)])
    refused = veto.evaluate(signal(), context())
    assert isinstance(refused, Veto)
    assert refused.guard == "circuit_breaker"
    assert refused.until == T0 + DAY
    assert "daily loss 3.50%" in refused.reason


def test_daily_limit_without_auto_resume_needs_a_manual_resume() -> None:
    """With auto_resume off the next day stays halted until set_manual(None)."""
    risk = RiskManager(settings(auto_resume=False))
    states = _run(risk, [(T0, 10_000), (T0 + HOUR, 9_650), (T0 + DAY, 9_650)])
    assert states[-1] is TradingState.HALTED
    risk.set_manual(None)
    assert risk.trading_state is TradingState.NORMAL


def test_peak_to_trough_climbs_the_ladder_and_latches_flatten() -> None:
    """Days of sub-limit losses: reduced at 7% from the peak, flatten at 15%, held on recovery."""
    risk = RiskManager(settings())
    path = [
        (T0, 10_000),
        (T0 + DAY, 11_000),  # the peak
        (T0 + 2 * DAY, 10_700),
        (T0 + 3 * DAY, 10_400),
        (T0 + 4 * DAY, 10_100),  # 8.2% off the peak
        (T0 + 5 * DAY, 9_800),
        (T0 + 6 * DAY, 9_520),
        (T0 + 7 * DAY, 9_300),  # 15.45% off the peak
        (T0 + 8 * DAY, 11_500),  # recovered: still flatten until a person resumes
    ]
    states = _run(risk, path)
    assert (
        states
        == [TradingState.NORMAL] * 4 + [TradingState.REDUCED] * 3 + [TradingState.FLATTEN] * 2
    )
    assert risk.breakers.last_trigger["trigger"] == "peak_to_trough"
    assert risk.breakers.last_trigger["drawdown"] == pytest.approx(1 - 9_300 / 11_000)
    assert risk.breakers.resume_at is None
    risk.reset()
    assert risk.trading_state is TradingState.NORMAL
    assert risk.breakers.peak_equity == Decimal(11_500)
    # The peak is re-based: the same 15% must be lost again from here to trip it.
    assert risk.update(T0 + 9 * DAY, Decimal(10_000)) is TradingState.REDUCED


def test_reduced_rung_follows_the_drawdown_both_ways() -> None:
    """Reduced is not latched: it lifts when equity climbs back within 7% of the peak."""
    risk = RiskManager(settings(max_daily_loss=0.5))
    states = _run(risk, [(T0, 10_000), (T0 + 1, 9_250), (T0 + 2, 9_400)])
    assert states == [TradingState.NORMAL, TradingState.REDUCED, TradingState.NORMAL]
    assert risk.breakers.last_trigger["trigger"] == "recovered"


def test_loss_streak_blocks_entries_until_the_cooldown_ends() -> None:
    """Three losses in a row: exits only for 60 minutes, then normal with the count reset."""
    risk = RiskManager(settings())
    risk.update(T0, Decimal(10_000))
    for i in range(3):
        risk.on_trade_closed(trade(-1.0), T0 + i * MINUTE)
    assert risk.trading_state is TradingState.REDUCING
    assert risk.breakers.cooldown_until == T0 + 2 * MINUTE + HOUR
    refused = risk.evaluate(signal(), context())
    assert isinstance(refused, Veto)
    assert refused.until == T0 + 2 * MINUTE + HOUR
    assert "3 consecutive losses" in refused.reason
    # Exits still go through while entries are blocked.
    held = {"BTC/USDT": position("BTC/USDT")}
    assert isinstance(risk.evaluate(signal(side=Side.SELL), context(positions=held)), OrderIntent)
    assert risk.update(T0 + HOUR, Decimal(10_000)) is TradingState.REDUCING
    assert risk.update(T0 + 2 * MINUTE + HOUR, Decimal(10_000)) is TradingState.NORMAL
    assert risk.breakers.consecutive_losses == 0


def test_a_win_breaks_the_streak() -> None:
    """Loss, loss, win, loss, loss is no streak of three."""
    risk = RiskManager(settings())
    risk.update(T0, Decimal(10_000))
    for pnl in (-1.0, -1.0, 2.0, -1.0, -1.0):
        risk.on_trade_closed(trade(pnl), T0)
    assert risk.trading_state is TradingState.NORMAL
    assert risk.breakers.consecutive_losses == 2


def test_loss_streak_without_auto_resume_outlasts_the_cooldown() -> None:
    """With auto_resume off the streak holds exits-only past the cooldown, until reset."""
    risk = RiskManager(settings(auto_resume=False))
    risk.update(T0, Decimal(10_000))
    for _ in range(3):
        risk.on_trade_closed(trade(-1.0), T0)
    assert risk.update(T0 + 5 * HOUR, Decimal(10_000)) is TradingState.REDUCING
    risk.reset()
    assert risk.trading_state is TradingState.NORMAL


@pytest.mark.parametrize(
    "state", [TradingState.REDUCING, TradingState.HALTED, TradingState.FLATTEN]
)
def test_manual_kill_switch_sets_and_clears_the_rung(state: TradingState) -> None:
    """set_manual forces a rung at once; set_manual(None) resumes."""
    risk = RiskManager(settings())
    risk.update(T0, Decimal(10_000))
    risk.set_manual(state)
    assert risk.trading_state is state
    assert risk.breakers.last_trigger["trigger"] == "manual"
    assert risk.update(T0 + MINUTE, Decimal(10_100)) is state
    risk.set_manual(None)
    assert risk.trading_state is TradingState.NORMAL


def test_the_more_severe_rung_wins_over_a_manual_one() -> None:
    """A manual stop-buy does not hide a daily-loss halt."""
    risk = RiskManager(settings())
    _run(risk, [(T0, 10_000), (T0 + MINUTE, 9_600)])
    risk.set_manual(TradingState.REDUCING)
    assert risk.trading_state is TradingState.HALTED


def test_each_transition_is_logged_and_alerted_once_with_its_numbers() -> None:
    """A breaker tripped over many candles yields one state_changed event and one alert."""
    alerts = _Alerts()
    risk = RiskManager(settings(), alert=alerts)
    with capture_logs() as logs:
        _run(risk, [(T0, 10_000)] + [(T0 + i * MINUTE, 9_601 - i) for i in range(1, 6)])
    changes = [e for e in logs if e["event"] == "state_changed"]
    assert len(changes) == 1
    event = changes[0]
    assert event["machine"] == "trading_state"
    assert (event["from"], event["to"], event["trigger"]) == ("normal", "halted", "daily_loss")
    assert event["day_loss"] == pytest.approx(0.04)
    assert event["limit"] == 0.03
    assert event["day_start_equity"] == 10_000.0
    assert len(alerts.sent) == 1
    (data,) = alerts.sent
    assert isinstance(data, TradingStateChanged)
    assert data.to_state == "halted"
    assert data.equity == 9_600.0
    assert data.resume_at == T0 + DAY


def test_a_failing_alert_never_stops_risk_control() -> None:
    """An exception from the alert channel is logged and the rung still changes."""

    def broken(event: Event) -> None:
        raise ConnectionError("telegram down")

    risk = RiskManager(settings(), alert=broken)
    assert _run(risk, [(T0, 10_000), (T0 + 1, 9_000)])[-1] is TradingState.HALTED


def test_describe_reports_open_breakers_and_numbers() -> None:
    """describe() shows the rung, which breakers are open, the drawdown and the limits."""
    risk = RiskManager(settings())
    _run(risk, [(T0, 10_000), (T0 + MINUTE, 9_200)])
    info = risk.describe()
    assert info["state"] == "halted"
    assert info["circuit_breakers"] == {
        "reduce_size": "open",
        "loss_streak": "closed",
        "daily_loss": "open",
        "peak_to_trough": "closed",
    }
    assert info["drawdown"] == pytest.approx(0.08)
    assert info["latched"]["daily_loss"]["until"] == T0 + DAY
    assert info["limits"]["max_drawdown"] == 0.15
    assert info["last_trigger"]["to"] == "halted"


def test_exit_of_a_short_is_allowed_while_flattening() -> None:
    """In flatten, closing a held short is still approved."""
    risk = RiskManager(settings(), long_only=False)
    risk.update(T0, Decimal(10_000))
    risk.set_manual(TradingState.FLATTEN)
    held = {"BTC/USDT": position("BTC/USDT", PositionSide.SHORT, qty="2")}
    intent = risk.evaluate(signal(side=Side.BUY), context(positions=held))
    assert isinstance(intent, OrderIntent)
    assert intent.reduce_only
    assert intent.qty == Decimal(2)


@hyp_settings(deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=-0.04, max_value=0.04),
            st.integers(min_value=1, max_value=600),
            st.sampled_from([None, None, None, -1.0, 1.0]),
        ),
        min_size=1,
        max_size=80,
    ),
    auto_resume=st.booleans(),
)
def test_fast_path_decides_exactly_as_the_full_evaluation(
    steps: list[tuple[float, int, float | None]], auto_resume: bool
) -> None:
    """The per-candle shortcut yields the same rung and triggers as evaluating every rule."""
    config = settings(auto_resume=auto_resume)
    fast = CircuitBreakers(config)
    full = CircuitBreakers(config, rules=default_rules(config))
    equity, now = Decimal(10_000), T0
    for change, minutes, pnl in steps:
        equity = (equity * Decimal(str(1 + change))).quantize(Decimal("0.01"))
        now += minutes * MINUTE
        assert fast.update(now, equity) is full.update(now, equity)
        if pnl is not None:
            closed = trade(pnl)
            assert fast.on_trade_closed(closed, now) is full.on_trade_closed(closed, now)
        assert fast.last_trigger == full.last_trigger


def test_a_daily_halt_and_kelly_history_survive_a_restart() -> None:
    """dump_state -> JSON -> restore_state keeps the halt, its lift time and the trades."""
    before = RiskManager(settings())
    before.on_trade_closed(trade(2.0), T0)
    _run(before, [(T0, 10_000), (T0 + HOUR, 9_600)])
    saved = json.loads(json.dumps(before.dump_state()))
    after = RiskManager(settings())
    with capture_logs() as logs:
        assert after.restore_state(saved) is TradingState.HALTED
    assert not [e for e in logs if e["event"] == "state_changed"]
    assert list(after.trade_returns) == [0.02]
    refused = after.evaluate(signal(), context())
    assert isinstance(refused, Veto)
    assert refused.until == T0 + DAY
    assert after.update(T0 + 2 * HOUR, Decimal(9_990)) is TradingState.HALTED
    assert after.update(T0 + DAY, Decimal(9_990)) is TradingState.NORMAL


def test_a_manual_flatten_survives_a_restart() -> None:
    """A kill switch thrown before a restart is still thrown after it."""
    before = RiskManager(settings())
    before.update(T0, Decimal(10_000))
    before.set_manual(TradingState.FLATTEN)
    after = RiskManager(settings())
    assert after.restore_state(before.dump_state()) is TradingState.FLATTEN
    assert after.update(T0 + DAY, Decimal(10_500)) is TradingState.FLATTEN


def _cause(breakers: CircuitBreakers) -> tuple[str, TradingState, int | None] | None:
    cause = breakers.cause
    return None if cause is None else (cause.rule, cause.state, cause.until)


@hyp_settings(deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=-0.03, max_value=0.03),
            st.integers(min_value=1, max_value=900),
            st.lists(st.sampled_from([-1.0, 1.0]), max_size=4),
        ),
        min_size=1,
        max_size=60,
    ),
    auto_resume=st.booleans(),
)
def test_trade_closes_keep_the_cause_latches_and_lift_times_of_a_full_evaluation(
    steps: list[tuple[float, int, list[float]]], auto_resume: bool
) -> None:
    """After each closed trade the rung, its cause, the latches and the resume time match."""
    config = settings(auto_resume=auto_resume)
    fast = CircuitBreakers(config)
    full = CircuitBreakers(config, rules=default_rules(config))
    equity, now = Decimal(10_000), T0
    for change, minutes, pnls in steps:
        equity = (equity * Decimal(str(1 + change))).quantize(Decimal("0.01"))
        now += minutes * MINUTE
        fast.update(now, equity)
        full.update(now, equity)
        for pnl in pnls:
            closed = trade(pnl)
            assert fast.on_trade_closed(closed, now) is full.on_trade_closed(closed, now)
            assert _cause(fast) == _cause(full)
            assert fast.resume_at == full.resume_at
            assert {k: t.until for k, t in fast.latched.items()} == {
                k: t.until for k, t in full.latched.items()
            }
            assert fast.consecutive_losses == full.consecutive_losses
            assert fast.now == full.now
        assert fast.history == full.history
