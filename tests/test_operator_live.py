"""Operator actions on a running replay daemon: Telegram, the web view and the dashboard.

Each surface drives the daemon's real engine (`pipeline.Engine`, the `models.Control` the
daemon hands them), and the tests look at the engine's own state: its lifecycle state,
its risk ladder, its portfolio and the decisions it took on the candles that followed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from models import BotState, TradingState
from pipeline import Engine
from telegram_bot import TelegramBot
from telegram_templates import fmt_price
from tests.conftest import eventually
from tests.fake_telegram import FakeTelegram
from tests.running_daemon import FALL, PAIR, RISE, RunningDaemon, latch_drawdown_breaker
from tests.test_telegram_bot import USER, _settings, ask, press


def _entry_vetoed(engine: Engine, guard: str) -> bool:
    # The engine's latest decision on PAIR is an entry signal refused by `guard`.
    decision = engine.decisions.get(PAIR)
    return (
        decision is not None
        and decision.veto is not None
        and decision.veto.guard == guard
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
    assert engine.state is BotState.RUNNING
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
    assert engine.risk.trading_state is TradingState.NORMAL
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
    assert engine.risk.trading_state is TradingState.NORMAL
    assert engine.risk.describe()["latched"] == {}
    await replay_daemon.position_opened()
