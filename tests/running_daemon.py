"""A real replay daemon running in the test's event loop, for the operator-surface tests.

`start_daemon` builds `runner.Daemon` from `main.py`'s own argument parser (sim mode,
`--feed replay`, `sma_cross` 2/5, the `standard` risk profile so positions carry stops,
no UI), runs it as a task at a modest replay speed, and returns once it has traded. The
engine it yields is the real `models.Control` that Telegram, the dashboard and the web view
drive. `stop_daemon` stops it in order (the stop event, then the task) and checks it ended
cleanly.

The candles are the bundled sample's first price, reshaped into a sawtooth (long steady
rises, short sharp falls): every rise opens a position that stays open for about a second
and a half at the test speed, every fall closes it. So a test that waits for a position
has time to act on it, whatever the machine's load, and a paused engine meets a fresh
entry signal within a cycle.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from config import load_settings
from models import BotState, TradingState
from pipeline import Engine
from run_summary import RunSummary
from runner import Daemon
from tests.conftest import eventually
from tests.test_backtest_support import SAMPLE_FILE, cli_args


PAIR = "BTC/USDT"
SPEED = 100.0  # candles per second
RISE, FALL = 150, 10  # candles per sawtooth cycle
CYCLES = 20  # 3,200 candles: half a minute at SPEED, far longer than any test


def write_sawtooth(path: Path) -> Path:
    """Write the sawtooth candle file (the sample's header and first price) to `path`."""
    from data_manager import load_candles

    sample = load_candles(SAMPLE_FILE, timeframe="1m")
    price = float(sample["open"].iloc[0])
    ts = int(sample.index[0].value // 1_000_000)  # the sample's first candle, ms UTC
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "open", "high", "low", "close", "volume"])
        for _ in range(CYCLES):
            for step in [1.0005] * RISE + [0.996] * FALL:
                close = round(price * step, 2)
                high, low = max(price, close), min(price, close)
                out.writerow([ts, price, round(high * 1.0001, 2), round(low * 0.9999, 2), close, 5])
                price, ts = close, ts + 60_000
    return path


@dataclass
class RunningDaemon:
    """A started replay daemon and the task running it."""

    daemon: Daemon
    task: asyncio.Task[RunSummary]

    @property
    def engine(self) -> Engine:
        """Return the daemon's engine: the real operator `Control`."""
        assert self.daemon.engine is not None
        return self.daemon.engine

    def has_traded(self) -> bool:
        """Return True once a position is open or a trade has closed."""
        portfolio = self.engine.portfolio
        return bool(portfolio.positions()) or bool(portfolio.closed)

    async def position_opened(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait for a fresh position: flat first, then one open on PAIR (a rise has begun)."""
        await eventually(lambda: self.engine.portfolio.position(PAIR) is None, timeout=timeout)
        await eventually(
            lambda: self.engine.portfolio.position(PAIR) is not None,
            timeout=timeout,
            interval=0.005,
        )


async def start_daemon(tmp_path: Path, *, speed: float = SPEED) -> RunningDaemon:
    """Start the replay daemon as a task and return once it has traded."""
    data = write_sawtooth(tmp_path / "sawtooth_BTC-USDT_1m.csv")
    args = cli_args(
        "--mode", "sim", "--feed", "replay", "--data", str(data), "--pairs", PAIR,
        "--strategy", "sma_cross", "--param", "fast=2", "--param", "slow=5",
        "--speed", str(speed),
    )  # fmt: skip
    import main

    settings = main._apply_cli(load_settings(env_file=None), args)
    assert settings.risk.profile == "standard"
    assert not settings.ui.enabled
    assert not settings.telegram.enabled
    daemon = Daemon(args, settings)
    daemon.build_replay()
    running = RunningDaemon(daemon, asyncio.create_task(daemon.run(), name="daemon"))
    try:
        await eventually(lambda: running.engine.state is BotState.RUNNING)
        await eventually(running.has_traded, timeout=10)
    except BaseException:
        await stop_daemon(running)
        raise
    return running


async def stop_daemon(running: RunningDaemon) -> dict[str, Any]:
    """Stop the daemon in order and check it ended cleanly; return its summary."""
    running.daemon.stop.set()
    summary: dict[str, Any] = (await asyncio.wait_for(running.task, 10)).to_dict()
    assert running.engine.state is BotState.STOPPED
    assert summary["candles"] > 0
    return summary


def latch_drawdown_breaker(engine: Engine) -> None:
    """Trip the real peak-to-trough breaker: feed the risk manager a halved equity.

    This is the observation the engine makes on every candle; the breaker latches
    (`flatten`, manual reset required) and stays latched on the next, real, candles.
    """
    equity = engine.portfolio.equity()
    engine.risk.update(engine.clock.now_ms(), equity / Decimal(2))
    assert engine.risk.trading_state is TradingState.FLATTEN
    assert "peak_to_trough" in engine.risk.describe()["latched"]
