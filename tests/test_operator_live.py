"""Operator actions on a running replay daemon: Telegram, the web view and the dashboard.

Each surface drives the daemon's real engine (`pipeline.Engine`, the `models.Control` the
daemon hands them), and the tests look at the engine's own state: its lifecycle state,
its risk ladder, its portfolio and the decisions it took on the candles that followed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs
from textual.pilot import Pilot

from config import UISettings
from models import BotState, TradingState
from pipeline import Engine
from risk_management import RiskManager
from telegram_bot import TelegramBot
from telegram_templates import fmt_price
from tests.conftest import eventually
from tests.fake_telegram import FakeTelegram
from tests.running_daemon import CYCLES, FALL, PAIR, RISE, RunningDaemon, latch_drawdown_breaker
from tests.test_telegram_bot import USER, _settings, ask, press
from tests.test_ui_support import widget_text
from ui import ConfirmScreen, Dashboard, WebView


def _bot_state(engine: Engine) -> BotState:
    """The engine's state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return engine.state


def _trading_state(risk: RiskManager) -> TradingState:
    """The risk manager's trading state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return risk.trading_state


def _entry_vetoed(engine: Engine, guard: str) -> bool:
    # The engine's latest decision on PAIR is an entry signal refused by `guard`.
    decision = engine.decisions.get(PAIR)
    return (
        decision is not None
        and decision.veto is not None
        and decision.veto.guard == guard
        and decision.signal is not None
        and not decision.signal.exit_only
    )


async def _no_entry_for_a_cycle(engine: Engine) -> None:
    # A whole sawtooth cycle (one entry signal at least) passes with no position taken.
    end, trades = engine.candles + RISE + FALL, len(engine.portfolio.closed)
    while engine.candles < end:
        assert engine.portfolio.position(PAIR) is None
        assert engine.state is not BotState.STOPPED
        await asyncio.sleep(0.005)
    assert len(engine.portfolio.closed) == trades


# -- Telegram ----------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegram]:
    """Return a running fake Bot API."""
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def telegram(api: FakeTelegram, replay_daemon: RunningDaemon) -> AsyncIterator[TelegramBot]:
    """Return the real TelegramBot over the running daemon's engine, as the daemon builds it."""
    bot = TelegramBot(_settings(api), replay_daemon.engine, poll_timeout=1.0)
    await bot.start()
    yield bot
    await bot.stop(flush_timeout=1.0)


async def test_telegram_status_and_positions_show_the_engine_position(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """/status counts the engine's open position and /positions shows its size and stop."""
    await replay_daemon.position_opened()
    position = replay_daemon.engine.portfolio.position(PAIR)
    assert position is not None
    status = (await ask(api, "/status")).visible
    assert "sim · running" in status
    assert "positions 1" in status
    positions = (await ask(api, "/positions")).visible
    assert f"{PAIR} long {fmt_price(position.qty)} @ {fmt_price(position.entry_price)}" in positions
    assert position.stop_price is not None  # the standard profile's protective stop
    assert "stop " in positions


async def test_telegram_pause_vetoes_the_next_entry_and_resume_trades_again(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """After /pause the engine refuses the next entry signal; after /resume it enters again."""
    engine = replay_daemon.engine
    edit = await press(api, await ask(api, "/pause"), "Confirm")
    assert "Paused" in edit.visible
    assert engine.state is BotState.PAUSED
    paused_at = len(engine.portfolio.closed)
    await eventually(lambda: _entry_vetoed(engine, "operator"), timeout=5)
    assert engine.decisions[PAIR].veto.reason == "paused by operator"  # type: ignore[union-attr]
    assert engine.portfolio.position(PAIR) is None  # the signal came, no position was taken
    assert engine.state is BotState.PAUSED
    assert len(engine.portfolio.closed) >= paused_at  # exits went on while paused
    edit = await press(api, await ask(api, "/resume"), "Confirm")
    assert "Resumed" in edit.visible
    assert _bot_state(engine) is BotState.RUNNING
    await replay_daemon.position_opened()


async def test_telegram_stopbuy_allows_exits_only_until_resume(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """/stopbuy puts the risk ladder on manual `reducing`: entries refused, exits taken."""
    engine = replay_daemon.engine
    await replay_daemon.position_opened()
    edit = await press(api, await ask(api, "/stopbuy"), "Confirm")
    assert "Exits only" in edit.visible
    assert engine.risk.trading_state is TradingState.REDUCING
    assert engine.risk.breakers.manual is TradingState.REDUCING
    assert engine.state is BotState.RUNNING
    await eventually(lambda: engine.portfolio.position(PAIR) is None, timeout=5)  # the exit
    await eventually(lambda: _entry_vetoed(engine, "circuit_breaker"), timeout=5)
    assert engine.portfolio.position(PAIR) is None
    await press(api, await ask(api, "/resume"), "Confirm")
    assert _trading_state(engine.risk) is TradingState.NORMAL
    await replay_daemon.position_opened()


async def test_telegram_forceexit_closes_the_engine_position(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """/forceexit with Confirm sends a market exit; the fill closes the real position."""
    engine = replay_daemon.engine
    await replay_daemon.position_opened()
    prompt = await ask(api, "/forceexit btc-usdt")
    assert engine.portfolio.position(PAIR) is not None
    edit = await press(api, prompt, "Confirm")
    assert f"Exit sent for {PAIR}" in edit.visible
    await eventually(lambda: engine.portfolio.position(PAIR) is None, timeout=2)
    [trade] = [t for t in engine.portfolio.closed if t.reason.startswith("force exit")]
    assert trade.pair == PAIR
    assert trade.reason == f"force exit: telegram user {USER}"
    assert "Expired" in (await press(api, prompt, "Confirm")).visible  # one press acts once
    await replay_daemon.position_opened()  # trading goes on after the forced exit
    assert len([t for t in engine.portfolio.closed if t.reason.startswith("force exit")]) == 1


async def test_telegram_forceexit_without_a_position_is_answered(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """/forceexit on a flat pair says so; a position gone before Confirm sends nothing."""
    engine = replay_daemon.engine
    reply = await ask(api, "/forceexit ETH/USDT")
    assert "No open position on ETH/USDT" in reply.visible
    assert reply.reply_markup is None
    await replay_daemon.position_opened()
    prompt = await ask(api, f"/forceexit {PAIR}")
    await eventually(lambda: engine.portfolio.position(PAIR) is None, timeout=5)  # the strategy
    edit = await press(api, prompt, "Confirm")
    assert f"No open position on {PAIR}" in edit.visible
    assert "Failed" not in edit.visible
    assert not [t for t in engine.portfolio.closed if t.reason.startswith("force exit")]


async def test_telegram_resetrisk_lifts_a_latched_breaker_that_resume_keeps(
    api: FakeTelegram, telegram: TelegramBot, replay_daemon: RunningDaemon
) -> None:
    """A latched drawdown flatten survives /resume; /resetrisk with Confirm lifts it."""
    engine = replay_daemon.engine
    latch_drawdown_breaker(engine)
    await eventually(lambda: engine.portfolio.position(PAIR) is None, timeout=2)  # flattened
    await press(api, await ask(api, "/resume"), "Confirm")
    assert engine.risk.trading_state is TradingState.FLATTEN
    await _no_entry_for_a_cycle(engine)
    prompt = await ask(api, "/resetrisk")
    assert "peak_to_trough" in prompt.visible
    assert engine.risk.trading_state is TradingState.FLATTEN
    edit = await press(api, prompt, "Confirm")
    assert "Risk reset: trading normal" in edit.visible
    assert _trading_state(engine.risk) is TradingState.NORMAL
    assert engine.risk.describe()["latched"] == {}
    await replay_daemon.position_opened()


# -- Web view ----------------------------------------------------------------------------------

WEB_TOKEN = "web-token-3b9e1d"
AUTH = {"Authorization": f"Bearer {WEB_TOKEN}"}


@pytest.fixture
async def web(replay_daemon: RunningDaemon) -> AsyncIterator[str]:
    """Serve the running engine's web view on 127.0.0.1; return its base URL."""
    view = WebView(replay_daemon.engine, UISettings(web_port=0, web_token=SecretStr(WEB_TOKEN)))
    async with view:
        yield f"http://127.0.0.1:{view.port}"


async def _post(base: str, path: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.post(base + path, headers=AUTH) as response:
        assert response.status == 200
        return dict(await response.json())


async def _snapshot(base: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/api/snapshot", headers=AUTH) as response,
    ):
        assert response.status == 200
        return dict(await response.json())


async def test_web_snapshot_shows_the_engine_position(
    web: str, replay_daemon: RunningDaemon
) -> None:
    """GET /api/snapshot carries the running engine's state and its open position."""
    await replay_daemon.position_opened()
    position = replay_daemon.engine.portfolio.position(PAIR)
    assert position is not None
    snap = await _snapshot(web)
    assert snap["state"] == "running"
    [shown] = snap["portfolio"]["positions"]  # type: ignore[index]
    assert shown["pair"] == PAIR
    assert shown["qty"] == str(position.qty)
    assert shown["stop_price"] is not None


async def test_web_pause_vetoes_the_next_entry_and_resume_trades_again(
    web: str, replay_daemon: RunningDaemon
) -> None:
    """POST /api/pause pauses the engine (the next entry is refused); /api/resume resumes it."""
    engine = replay_daemon.engine
    with capture_logs() as logs:
        assert await _post(web, "/api/pause") == {"ok": True, "state": "paused"}
    assert engine.state is BotState.PAUSED
    assert [e["reason"] for e in logs if e["event"] == "operator_pause"] == ["web view"]
    await eventually(lambda: _entry_vetoed(engine, "operator"), timeout=5)
    assert engine.portfolio.position(PAIR) is None
    assert (await _snapshot(web))["state"] == "paused"
    assert await _post(web, "/api/resume") == {"ok": True, "state": "running"}
    assert _bot_state(engine) is BotState.RUNNING
    await replay_daemon.position_opened()
    assert (await _snapshot(web))["state"] == "running"


async def test_web_resetrisk_lifts_a_latched_breaker_that_resume_keeps(
    web: str, replay_daemon: RunningDaemon
) -> None:
    """POST /api/resume leaves a latched flatten; POST /api/resetrisk lifts it."""
    engine = replay_daemon.engine
    latch_drawdown_breaker(engine)
    await _post(web, "/api/resume")
    snap = await _snapshot(web)
    assert snap["trading_state"] == "flatten"
    assert "peak_to_trough" in snap["risk"]["latched"]  # type: ignore[index]
    body = await _post(web, "/api/resetrisk")
    assert body == {"ok": True, "state": "running", "trading_state": "normal"}
    assert engine.risk.trading_state is TradingState.NORMAL
    snap = await _snapshot(web)
    assert snap["risk"]["latched"] == {}  # type: ignore[index]
    await replay_daemon.position_opened()


# -- Dashboard ---------------------------------------------------------------------------------


@pytest.fixture
async def pilot(replay_daemon: RunningDaemon) -> AsyncIterator[Pilot[None]]:
    """Run the dashboard headless over the running engine, as the daemon builds it."""
    app = Dashboard(replay_daemon.engine, UISettings(refresh_hz=20), can_switch_live=False)
    async with app.run_test(size=(160, 50)) as pilot:
        yield pilot


def _message(pilot: Pilot[None]) -> str:
    return widget_text(pilot.app.query_one("#message"))


async def test_dashboard_p_pauses_and_resumes_the_engine(
    pilot: Pilot[None], replay_daemon: RunningDaemon
) -> None:
    """`p` pauses the running engine (its next entry is refused); `p` again resumes it."""
    engine = replay_daemon.engine
    with capture_logs() as logs:
        await pilot.press("p")
        await eventually(lambda: engine.state is BotState.PAUSED)
    assert [e["reason"] for e in logs if e["event"] == "operator_pause"] == ["dashboard"]
    await eventually(lambda: "paused" in widget_text(pilot.app.query_one("#status")))
    await eventually(lambda: _entry_vetoed(engine, "operator"), timeout=5)
    await pilot.press("p")
    await eventually(lambda: engine.state is BotState.RUNNING)
    await replay_daemon.position_opened()


@pytest.mark.parametrize(("answer", "lifted"), [("y", True), ("n", False)])
async def test_dashboard_r_resets_a_latched_breaker_only_on_yes(
    pilot: Pilot[None], replay_daemon: RunningDaemon, answer: str, lifted: bool
) -> None:
    """`r` names the latched breaker; yes lifts it on the engine, no leaves it latched."""
    engine = replay_daemon.engine
    latch_drawdown_breaker(engine)
    await pilot.pause(0.2)  # a refresh: the dashboard's snapshot now shows the latch
    await pilot.press("r")
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, ConfirmScreen)
    assert "peak_to_trough" in screen.question
    await pilot.press(answer)
    await pilot.pause()
    expected = TradingState.NORMAL if lifted else TradingState.FLATTEN
    await eventually(lambda: engine.risk.trading_state is expected)
    if lifted:
        await eventually(lambda: "risk reset" in _message(pilot))
        await replay_daemon.position_opened()
    else:
        assert "cancelled" in _message(pilot)
        assert "peak_to_trough" in engine.risk.describe()["latched"]


async def test_dashboard_q_stops_the_daemon_in_order(
    pilot: Pilot[None], replay_daemon: RunningDaemon
) -> None:
    """`q` asks the engine to stop: the daemon's run ends cleanly with its summary."""
    await pilot.press("q")
    summary = (await asyncio.wait_for(replay_daemon.task, 10)).to_dict()
    assert replay_daemon.engine.state is BotState.STOPPED
    assert 0 < summary["candles"] < RISE * CYCLES  # stopped mid-replay, not at the end
