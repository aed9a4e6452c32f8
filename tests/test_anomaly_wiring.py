"""An anomaly pauses entries on its pair through risk; exits, the snapshot and alerts follow."""

from __future__ import annotations

from decimal import Decimal

from config import load_settings
from models import (
    AnomalyDetected,
    AnomalyKind,
    Candle,
    Decision,
    Event,
    PositionSide,
    Side,
    Signal,
)
from models import OrderIntent as Intent
from models import Veto as VetoResult
from risk_management import RiskManager
from runner import Daemon
from telegram_templates import render_event
from tests.test_backtest_support import cli_args
from tests.test_risk_support import HOUR, T0, context, position, settings, signal
from utils.utilities import AuditTrail


def test_a_paused_pair_refuses_entries_until_the_pause_expires() -> None:
    """An entry on a paused pair is vetoed with the reason and expiry; other pairs trade."""
    risk = RiskManager(settings())
    assert risk.pause_pair("BTC/USDT", "frozen_feed: 3 flat bars", now=T0, until=T0 + HOUR)
    refused = risk.evaluate(signal("BTC/USDT"), context(now=T0 + 1))
    assert isinstance(refused, VetoResult)
    assert refused.guard == "pair_pause"
    assert refused.until == T0 + HOUR
    assert "frozen_feed" in refused.reason
    assert isinstance(risk.evaluate(signal("ETH/USDT"), context(now=T0 + 1)), Intent)
    assert isinstance(risk.evaluate(signal("BTC/USDT"), context(now=T0 + HOUR)), Intent)


def test_a_paused_pair_still_exits_its_position() -> None:
    """The pause blocks the entry, never the exit of an open position on the same pair."""
    risk = RiskManager(settings())
    risk.pause_pair("BTC/USDT", "spike", now=T0, until=T0 + HOUR)
    held = {"BTC/USDT": position("BTC/USDT", PositionSide.LONG, qty="2")}
    exit_signal = signal("BTC/USDT", Side.SELL, exit_only=True)
    verdict = risk.evaluate(exit_signal, context(now=T0 + 1, positions=held))
    assert isinstance(verdict, Intent)
    assert verdict.reduce_only
    assert verdict.qty == Decimal(2)


def test_pausing_again_extends_and_reports_not_new() -> None:
    """A second anomaly on a paused pair extends the pause and is not a new pause."""
    risk = RiskManager(settings())
    assert risk.pause_pair("A/B", "one", now=T0, until=T0 + HOUR)
    assert not risk.pause_pair("A/B", "two", now=T0 + 10, until=T0 + 2 * HOUR)
    pause = risk.pair_pauses.active("A/B", T0 + HOUR)
    assert pause is not None
    assert (pause.reason, pause.until) == ("two", T0 + 2 * HOUR)
    assert risk.resume_pair("A/B")
    assert risk.pair_pauses.active("A/B", T0 + HOUR) is None


def _daemon(in_replay: bool) -> Daemon:
    env = load_settings(env_file=None, anomaly={"in_replay": in_replay})
    daemon = Daemon(cli_args("--mode", "sim", "--feed", "replay"), env)
    daemon.audit.close()
    daemon.audit = AuditTrail(None, keep=True)
    daemon.build_replay()
    return daemon


def test_replays_watch_anomalies_only_when_asked() -> None:
    """Backtests and sim replays stay equal: neither watches unless `in_replay` is set."""
    assert _daemon(False).engine.anomaly_watch is None  # type: ignore[union-attr]
    assert _daemon(True).engine.anomaly_watch is not None  # type: ignore[union-attr]


async def test_a_frozen_feed_pauses_the_pair_alerts_once_and_shows_in_the_snapshot() -> None:
    """Frozen candles pause entries on the pair; one alert, an audit record, a snapshot entry."""
    daemon = _daemon(True)
    engine = daemon.engine
    assert engine is not None
    alerts: list[Event] = []
    daemon.notifiers.append(alerts.append)
    pair = engine.pairs[0]
    start = engine.clock.now_ms()
    for k in range(6):
        price = 100.0 if k >= 2 else 100.0 + k
        bar = Candle(pair, engine.timeframe, start + k * engine.step, price, price, price, price, 1)
        await engine.on_candle(bar)
    found = [e for e in alerts if isinstance(e, AnomalyDetected)]
    assert [e.anomaly.kind for e in found] == [AnomalyKind.FROZEN_FEED]
    snap = engine.snapshot()
    assert snap.anomalies[pair]["kind"] == "frozen_feed"
    assert snap.anomalies[pair]["paused"] is True
    assert engine.risk.pair_pauses.active(pair, engine.clock.now_ms()) is not None
    assert daemon.audit.events is not None
    assert any(e["kind"] == "anomaly" for e in daemon.audit.events)
    alert = render_event(found[0])
    assert "frozen_feed" in alert.text
    assert "entries paused" in alert.text
    entry = Signal(pair, Side.BUY, 1.0, "test", engine.clock.now_ms(), price=100.0)
    verdict = engine.risk.evaluate(entry, context(now=engine.clock.now_ms()))
    assert isinstance(verdict, VetoResult)
    assert verdict.guard == "pair_pause"


async def test_why_and_the_dashboard_name_the_pause() -> None:
    """/why names the pair's anomaly and the risk panel shows the pause."""
    from rich.console import Console

    from status_view import section_risk
    from telegram_templates import render_why

    daemon = _daemon(True)
    engine = daemon.engine
    assert engine is not None
    pair = engine.pairs[0]
    start = engine.clock.now_ms()
    for k in range(4):
        bar = Candle(pair, engine.timeframe, start + k * engine.step, 1.0, 1.0, 1.0, 1.0, 0.0)
        await engine.on_candle(bar)
    snap = engine.snapshot()
    engine.decisions[pair] = Decision(pair, snap.ts, None, "none")
    why = render_why(engine.snapshot(), pair)
    assert "anomaly: zero_volume" in why
    assert "entries paused" in why
    console = Console(width=120, record=True)
    console.print(section_risk(snap))
    assert f"anomaly {pair}" in console.export_text()


async def test_a_blown_out_book_and_a_silent_feed_pause_the_pair() -> None:
    """The live-only rules reach risk too: a 150 bps spread, then no candle for four bars."""
    from models import OrderBook

    daemon = _daemon(True)
    engine = daemon.engine
    assert engine is not None
    alerts: list[Event] = []
    daemon.notifiers.append(alerts.append)
    pair = engine.pairs[0]
    start = engine.clock.now_ms()
    await engine.on_candle(Candle(pair, engine.timeframe, start, 100, 101, 99, 100, 5))
    now = engine.clock.now_ms()
    await engine.on_order_book(OrderBook(pair, now, ((100.0, 1.0),), ((101.5, 1.0),)))
    assert engine.risk.pair_pauses.active(pair, now) is not None
    engine.risk.resume_pair(pair)
    clock = engine.clock
    assert hasattr(clock, "advance")
    clock.advance(5 * engine.step / 1000)
    engine.check_feed()
    kinds = [e.anomaly.kind for e in alerts if isinstance(e, AnomalyDetected)]
    assert kinds == [AnomalyKind.SPREAD_BLOWOUT, AnomalyKind.STALE_FEED]
    assert engine.snapshot().anomalies[pair]["kind"] == "stale_feed"
    assert engine.risk.pair_pauses.active(pair, engine.clock.now_ms()) is not None
