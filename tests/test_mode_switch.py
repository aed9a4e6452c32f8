"""Switching between paper and live from the dashboard: an orderly stop, then a restart."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from config import load_settings
from error_handler import ConfigError
from main import restart_argv
from runner import Daemon
from tests.conftest import eventually
from tests.test_backtest_support import cli_args


def _args() -> argparse.Namespace:
    return cli_args("--mode", "sim", "--feed", "replay", "--speed", "5")  # type: ignore[no-any-return]


async def test_switch_to_live_stops_in_order_and_asks_for_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With keys, switch_mode('live') ends the run cleanly and names the next mode."""
    monkeypatch.setenv("KESTREL_EXCHANGE__API_KEY", "k" * 8)
    monkeypatch.setenv("KESTREL_EXCHANGE__API_SECRET", "s" * 8)
    monkeypatch.setenv("KESTREL_SIMULATION__REPLAY_SPEED", "100")  # 1,440 candles: ~15 s
    daemon = Daemon(_args(), load_settings(env_file=None))
    daemon.build_replay()
    run = asyncio.create_task(daemon.run())
    await eventually(lambda: daemon.engine is not None and daemon.engine.candles > 5)
    await daemon.switch_mode("live")
    summary = (await asyncio.wait_for(run, 10)).to_dict()
    assert summary["restart_as"] == "live"
    assert 0 < summary["candles"] < 1440  # it stopped mid-replay, not at the end
    assert (daemon.settings.storage.data_dir / "state" / "sim.json").is_file()


async def test_switch_to_live_without_keys_is_refused() -> None:
    """Without API keys the switch is refused and the run goes on."""
    daemon = Daemon(_args(), load_settings(env_file=None))
    daemon.build_replay()
    with pytest.raises(ConfigError, match="API_KEY"):
        await daemon.switch_mode("live")
    assert not daemon.stop.is_set()


@pytest.mark.parametrize(
    ("argv", "mode", "expected"),
    [
        (["main.py", "--mode", "sim", "--feed", "live"], "live", ["main.py", "--mode", "live"]),
        (["main.py", "--no-ui"], "live", ["main.py", "--no-ui", "--mode", "live"]),
        (["main.py", "--mode", "live"], "sim", ["main.py", "--mode", "sim"]),
    ],
)
def test_restart_command_line(argv: list[str], mode: str, expected: list[str]) -> None:
    """The restart keeps every other flag and drops a feed choice live mode implies."""
    assert restart_argv(argv, mode) == expected
