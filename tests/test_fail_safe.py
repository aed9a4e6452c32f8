"""A fatal error in the running daemon: trading stops safely, state is kept, exit non-zero."""

from __future__ import annotations

import argparse
import json

import pytest

from config import load_settings
from error_handler import AuthenticationError
from models import ErrorRaised, Event, Order, OrderIntent
from runner import Daemon
from tests.test_backtest_support import cli_args


def _args() -> argparse.Namespace:
    return cli_args("--mode", "sim", "--feed", "replay")  # type: ignore[no-any-return]


async def test_fatal_error_runs_the_fail_safe_and_propagates() -> None:
    """Keys rejected mid-run: the error escapes, after state is persisted and sessions closed."""
    daemon = Daemon(_args(), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.sim is not None
    closed: list[str] = []

    async def close_session() -> None:
        closed.append("session")

    daemon._closers.append(("session", close_session))
    alerts: list[Event] = []
    daemon.notifiers.append(alerts.append)

    async def rejected(intent: OrderIntent) -> Order:
        raise AuthenticationError("API key is invalid", component="exchange")

    daemon.sim.create_order = rejected  # type: ignore[method-assign]
    with pytest.raises(AuthenticationError, match="API key is invalid"):
        await daemon.run()
    state = json.loads((daemon.settings.storage.data_dir / "state" / "sim.json").read_text())
    assert state["candles"] > 0
    assert closed == ["session"]
    assert any(
        isinstance(data, ErrorRaised) and "trading stopped" in data.message for data in alerts
    )
