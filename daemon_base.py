"""What the parts of `runner.Daemon` share: the run's state, declared once.

`Daemon` is one class built from parts: its own run loop, task supervision and teardown
(runner.py), the assembly per mode (`daemon_build.DaemonBuild`), the exchange-facing tasks
(`daemon_live.DaemonLive`), persistence (`daemon_state.DaemonState`) and the operator
surfaces (`daemon_operator.DaemonOperator`). `DaemonBase` declares, for the type checker,
the state and the methods those parts use of each other; at run time it holds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from config import Settings
    from data_manager import DataManager
    from models import Candle, Event, EventSink
    from pipeline import Engine
    from strategy import Strategy
    from trade_simulator import ReplayFeed, SimDriver, SimulatedExchange
    from utils.supervision import Supervisor
    from utils.utilities import AuditTrail


__all__ = ["DaemonBase"]


class DaemonBase:
    """The host side of `Daemon`'s parts: declared here, set up by `Daemon.__init__`."""

    args: argparse.Namespace
    settings: Settings
    stop: asyncio.Event
    queue: asyncio.Queue[tuple[Candle, float] | None]
    audit: AuditTrail
    engine: Engine | None
    sim: SimulatedExchange | None
    driver: SimDriver | None
    exchange: Any
    replay: ReplayFeed | None
    frames: dict[str, Any]
    pair_schedule: Any
    progress: Callable[[int, int], None] | None
    timings: dict[str, float]
    top_pairs: Any
    data: DataManager | None
    window: int
    feed_pairs: list[str]
    _resubscribe: asyncio.Event
    _resume_from: int | None
    restart_as: str | None
    _exchange_status: Callable[[], dict[str, Any]]
    feed: AsyncIterator[Candle] | None
    dropped: int
    _closers: list[tuple[str, Callable[[], Awaitable[object]]]]
    _fills_since: int | None
    notifiers: list[EventSink]
    supervisor: Supervisor
    _risk_store: Any
    _risk_key: tuple[Any, ...] | None
    _risk_lock: asyncio.Lock

    if TYPE_CHECKING:

        def alert(self, event: Event) -> None:
            """Route an event to the notifiers."""

        async def _restore_risk_state(self, store: Any = None) -> None: ...

        async def _persist_risk_state(self) -> None: ...

        async def _warm_up(self, pairs: list[str], strategy: Strategy | None = None) -> None: ...

        def _exchange_candles(self, pairs: list[str]) -> AsyncIterator[Candle]: ...

        async def _persist_async(self) -> None: ...
