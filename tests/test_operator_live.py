"""Operator actions on a running replay daemon: Telegram, the web view and the dashboard."""

from __future__ import annotations

from tests.running_daemon import PAIR, RunningDaemon


async def test_the_replay_daemon_trades_and_stops_cleanly(replay_daemon: RunningDaemon) -> None:
    """The fixture's daemon is running, has traded and holds stops on its positions."""
    await replay_daemon.position_opened()
    position = replay_daemon.engine.portfolio.position(PAIR)
    assert position is not None
    assert position.stop_price is not None
