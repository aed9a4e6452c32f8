"""The typed alert bus: each event reaches the notifiers and becomes the operator's message."""

from __future__ import annotations

from decimal import Decimal
from typing import get_args

import pytest

from config import load_settings
from daemon_operator import TelegramNotifier
from models import (
    AllocationChanged,
    Anomaly,
    AnomalyDetected,
    AnomalyKind,
    ClosedTrade,
    ErrorRaised,
    Event,
    Fill,
    FillKind,
    Liquidity,
    ModelPromoted,
    ModelRejected,
    OrderRefused,
    PositionLiquidated,
    PositionSide,
    RiskReset,
    Side,
    SleeveShare,
    StopHit,
    TradeClosed,
    TradeOpened,
    TradingState,
    TradingStateChanged,
)
from runner import Daemon
from telegram_templates import Alert, circuit_breaker, order_filled, render_event, trade_closed
from tests.test_backtest_support import cli_args


TS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
DAY = 86_400_000
FILL = Fill(
    "o1", "c1", Side.BUY, Decimal("0.5"), Decimal("65000.5"), Decimal("0.01"), "USDT",
    Liquidity.TAKER, TS, "BTC/USDT",
)  # fmt: skip
TRADE = ClosedTrade(
    "ETH/USDT", PositionSide.LONG, TS, TS + 3_900_000, 2000.0, 2100.0, 1.0, 0.5, 99.5, "tp"
)
HALTED = TradingStateChanged(
    ts=TS,
    from_state=TradingState.NORMAL,
    to_state=TradingState.HALTED,
    trigger="daily_loss",
    reason="daily loss 4.00% >= 3.00% (day start 10000.00, equity 9600.00)",
    resume_at=TS + DAY,
    equity=9_600.0,
    peak_equity=10_000.0,
    drawdown=0.0,
    day_start_equity=10_000.0,
    day_loss=0.04,
    consecutive_losses=0,
    limit=0.03,
)
RECOVERED = TradingStateChanged(
    ts=TS + DAY,
    from_state=TradingState.HALTED,
    to_state=TradingState.NORMAL,
    trigger="recovered",
    reason="every breaker closed",
    resume_at=None,
    equity=9_700.0,
    peak_equity=10_000.0,
    drawdown=0.03,
    day_start_equity=9_700.0,
    day_loss=0.0,
    consecutive_losses=0,
)

# Each event with the alert the operator got for it before the events were typed.
EXPECTED: list[tuple[Event, Alert]] = [
    (TradeOpened(FILL), order_filled(FILL)),
    (TradeClosed(TRADE), trade_closed(TRADE)),
    (
        HALTED,
        circuit_breaker(
            "daily_loss",
            value=0.04,
            limit=0.03,
            state="halted",
            until_ts=TS + DAY,
            detail=HALTED.reason,
        ),
    ),
    (
        RECOVERED,
        circuit_breaker(
            "recovered", value=0.03, limit=0.0, state="normal", detail="every breaker closed"
        ),
    ),
    (
        StopHit("BTC/USDT", Decimal("63650.50")),
        Alert("stop hit on BTC/USDT at 63650.50", "stop"),
    ),
    (
        PositionLiquidated(
            Fill(
                "liq-1",
                "BTC/USDT:USDT",
                Side.SELL,
                Decimal("61750.0"),
                Decimal("0.100"),
                Decimal("3.396250"),
                "USDT",
                Liquidity.TAKER,
                TS,
                "e-9",
            ),
            FillKind.LIQUIDATION,
            -330.1,
            Decimal(0),
        ),
        Alert(
            "🚨 <b>BTC/USDT:USDT liquidated</b> by the exchange\n"
            "sell 0.1 @ 61750 · fee 3.3963 USDT\nP&amp;L <b>-330.10</b> · position closed",
            "liquidation",
            "liquidation-e-9",
        ),
    ),
    (
        PositionLiquidated(
            Fill(
                "adl-1",
                "BTC/USDT:USDT",
                Side.SELL,
                Decimal("66100"),
                Decimal("0.04"),
                Decimal("1.4542"),
                "USDT",
                Liquidity.TAKER,
                TS,
                "e-10",
            ),
            FillKind.ADL,
            42.5,
            Decimal("0.06"),
        ),
        Alert(
            "🚨 <b>BTC/USDT:USDT auto-deleveraged</b> by the exchange\n"
            "sell 0.04 @ 66100 · fee 1.4542 USDT\nP&amp;L <b>+42.50</b> · 0.06 still held",
            "liquidation",
            "liquidation-e-10",
        ),
    ),
    (
        OrderRefused("ETH/USDT", "qty 0.001 < min 0.01"),
        Alert("order rejected on ETH/USDT: qty 0.001 &lt; min 0.01", "rejected"),
    ),
    (
        RiskReset("telegram user 1", TradingState.FLATTEN, TradingState.NORMAL, ("a", "b")),
        Alert("risk reset by telegram user 1: flatten -&gt; normal (latched before: a, b)", "risk"),
    ),
    (
        RiskReset("web", TradingState.REDUCING, TradingState.NORMAL),
        Alert("risk reset by web: reducing -&gt; normal (latched before: none)", "risk"),
    ),
    (
        ErrorRaised("order failed: timed out", pair="BTC/USDT"),
        Alert(
            "⚠️ <b>error</b> in BTC/USDT\norder failed: timed out", "error", "error:BTC/USDT:error"
        ),
    ),
    (
        ErrorRaised("snapshots failed (disk full)", component="snapshots", breaker="open"),
        Alert("⚠️ <b>error</b>\nsnapshots failed (disk full)", "error", "error::error"),
    ),
    (
        AnomalyDetected(
            Anomaly(TS, "BTC/USDT", AnomalyKind.FROZEN_FEED, 3.0, "3 flat bars in a row"),
            TS + 3 * 3_600_000,
        ),
        Alert(
            "⚠️ <b>Anomaly on BTC/USDT</b>: frozen_feed (score 3.0)\n3 flat bars in a row\n"
            "entries paused until 2023-11-15 01:13 UTC; exits and stops keep working",
            "anomaly",
        ),
    ),
    (
        ModelPromoted("direction-BTC-USDT-1h", "v2", "v1", 1.8, 0.9, "beat the champion"),
        Alert(
            "🧠 <b>Model promoted</b> direction-BTC-USDT-1h\nchampion v2 (was v1)\n"
            "score 1.80 vs 0.90 · beat the champion",
            "model",
        ),
    ),
    (
        ModelRejected("direction-BTC-USDT-1h", "v3", None, -0.5, None, "deflated Sharpe 0.10"),
        Alert(
            "🧠 <b>Challenger rejected</b> direction-BTC-USDT-1h\nv3 stays out; champion none\n"
            "score -0.50 vs n/a · deflated Sharpe 0.10",
            "model",
        ),
    ),
    (
        AllocationChanged(
            TS,
            (
                SleeveShare("trend", 0.5, 0.6, 6000.0, 1.2),
                SleeveShare("revert", 0.45, 0.35, 3500.0, -0.4),
                SleeveShare("new", 0.05, 0.05, 500.0, None, probation=True),
            ),
        ),
        Alert(
            "⚖️ <b>Capital reallocated</b> (by skill ranking)\n"
            "trend: 50.0% → <b>60.0%</b> · sleeve 6,000.00 · lcb +1.20\n"
            "revert: 45.0% → <b>35.0%</b> · sleeve 3,500.00 · lcb -0.40\n"
            "new: 5.0% → <b>5.0%</b> · sleeve 500.00 · probation",
            "allocation",
            f"allocation-{TS}",
        ),
    ),
    (
        AllocationChanged(TS, (SleeveShare("trend", 0.5, 0.6, 6000.0, 1.2),), False, 0.4),
        Alert(
            "⚖️ <b>Capital reallocated</b> (by skill ranking)\n"
            "trend: 50.0% → <b>60.0%</b> · sleeve 6,000.00 · lcb +1.20\n"
            "40.0% unallocated: the caps hold less than the account",
            "allocation",
            f"allocation-{TS}",
        ),
    ),
]


@pytest.mark.parametrize(("event", "alert"), EXPECTED)
def test_each_event_renders_the_operators_message(event: Event, alert: Alert) -> None:
    """render_event gives each event the text, category and coalescing key it always had."""
    assert render_event(event) == alert


def test_every_event_type_has_a_rendering_case() -> None:
    """The table above covers every member of the Event union."""
    assert {type(event) for event, _ in EXPECTED} == set(get_args(Event))


def test_a_liquidation_with_its_round_trip_is_one_message_with_the_trades_figures() -> None:
    """With the trade it ended, the liquidation alert also shows P&L %, prices, fees, hold."""
    fill = Fill(
        "liq-1", "BTC/USDT:USDT", Side.SELL, Decimal("61750.0"), Decimal("0.100"),
        Decimal("3.396250"), "USDT", Liquidity.TAKER, TS + 7_500_000, "e-9",
    )  # fmt: skip
    trade = ClosedTrade(
        "BTC/USDT:USDT", PositionSide.LONG, TS, TS + 7_500_000, 65000.0, 61750.0, 0.1, 6.97,
        -331.97, "liquidation: the exchange took the position over at 61750.0",
    )  # fmt: skip
    alert = render_event(PositionLiquidated(fill, FillKind.LIQUIDATION, -331.97, Decimal(0), trade))
    assert alert == Alert(
        "🚨 <b>BTC/USDT:USDT liquidated</b> by the exchange\n"
        "sell 0.1 @ 61750 · fee 3.3963 USDT\n"
        "P&amp;L <b>-331.97</b> (-5.11%) · position closed\n"
        "long 0.1: 65000 → 61750 · fees 6.9700 · held 2h 05m",
        "liquidation",
        "liquidation-e-9",
    )


def test_the_halted_alert_shows_the_numbers_and_the_resume_time() -> None:
    """The breaker alert carries the trigger, value, limit, rung and when trading resumes."""
    assert render_event(HALTED).text.splitlines()[:3] == [
        "⛔ <b>Circuit breaker: daily_loss</b>",
        "value 4.00% ≥ limit 3.00%",
        "trading → <b>halted</b> until 2023-11-15 22:13 UTC",
    ]


class _Bot:
    """Record what the notifier hands the Telegram bot."""

    def __init__(self) -> None:
        self.sent: list[Alert] = []

    def notify(self, alert: Alert) -> None:
        self.sent.append(alert)


def test_daemon_routes_events_to_every_notifier_past_a_failing_one() -> None:
    """Daemon.alert hands each event to all notifiers; one that raises does not stop the rest."""
    daemon = Daemon(cli_args("--mode", "sim", "--feed", "replay"), load_settings(env_file=None))
    daemon.audit.close()
    bot = _Bot()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise ConnectionError("telegram down")

    daemon.notifiers.extend([broken, TelegramNotifier(bot), seen.append])
    event = StopHit("BTC/USDT", Decimal("63650.5"))
    daemon.alert(event)
    assert seen == [event]
    assert bot.sent == [Alert("stop hit on BTC/USDT at 63650.5", "stop")]
