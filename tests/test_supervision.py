"""Background work may fail; trading goes on and the operator is told."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from error_handler import BreakerState, DataError
from models import ErrorRaised, Event
from tests.conftest import eventually
from tests.running_daemon import start_daemon, stop_daemon
from utils.supervision import Supervisor


async def test_a_background_task_failing_every_time_opens_its_breaker_and_alerts_once() -> None:
    """A step that always raises (even a FatalError) is contained, alerted, then paused."""
    stop = asyncio.Event()
    alerts: list[Event] = []
    supervisor = Supervisor(stop, alerts.append, threshold=3, base=0.001, cap=0.002)
    calls = 0
    healthy = asyncio.Event()

    async def retrain() -> None:
        nonlocal calls
        calls += 1
        raise DataError("model file is corrupt")

    async def snapshot() -> None:
        healthy.set()
        await asyncio.sleep(0.001)

    tasks = [
        asyncio.create_task(supervisor.loop("retrain", retrain)),
        asyncio.create_task(supervisor.loop("snapshots", snapshot)),
    ]
    await eventually(lambda: supervisor.breakers["retrain"].state is BreakerState.OPEN)
    await asyncio.sleep(0.05)  # open: the step is not called again during the rest
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)

    assert calls == 3
    assert healthy.is_set()
    assert supervisor.breakers["snapshots"].state is BreakerState.CLOSED
    # The first failure and the breaker opening are news; the retry in between is not.
    messages = [data.message for data in alerts if isinstance(data, ErrorRaised)]
    assert len(messages) == 2
    assert "retrying, trading goes on" in messages[0]
    assert "failed 3 times in a row" in messages[1]
    assert all(isinstance(data, ErrorRaised) and data.component == "retrain" for data in alerts)


async def test_snapshots_failing_in_sim_do_not_stop_trading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state snapshot can never be written; the replay trades on, alerted, breaker open."""
    monkeypatch.setenv("KESTREL_STORAGE__SNAPSHOT_INTERVAL_S", "1")
    # data/state is a file: every snapshot's atomic write fails (NotADirectoryError).
    state = tmp_path / "data" / "state"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("not a directory")
    running = await start_daemon(tmp_path)
    daemon = running.daemon
    alerts: list[ErrorRaised] = []
    daemon.notifiers.append(
        lambda data: alerts.append(data) if isinstance(data, ErrorRaised) else None
    )
    daemon.supervisor.breakers["snapshots"].reset_after = 60.0
    trades_before = len(running.engine.portfolio.closed)

    await eventually(
        lambda: daemon.supervisor.breakers["snapshots"].state is BreakerState.OPEN, timeout=30
    )
    candles = running.engine.candles
    await eventually(lambda: len(running.engine.portfolio.closed) > trades_before, timeout=10)
    await eventually(lambda: running.engine.candles > candles + 100, timeout=10)
    summary = await stop_daemon(running)

    assert [a.component for a in alerts][-1] == "snapshots"
    assert "trading goes on" in alerts[-1].message
    assert summary["n_trades"] > 0
