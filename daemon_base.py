"""What the parts of `runner.Daemon` share: the run's frozen components and its own state.

`Daemon` is the run loop, task supervision and teardown (runner.py) around the frozen
`assembly.Components` one of the `mode_builders` returned, plus the operator surfaces
(`daemon_operator.DaemonOperator`); persistence (`daemon_state.RunState`), the exchange
side (`daemon_live.ExchangeSession`) and learning (`daemon_learning.Learning`) are objects
it holds. `DaemonBase` declares, for the type
checker, the state the run itself changes and the methods those parts use of each other,
and reads the components (the engine, the gateway, the feed) for them.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

from assembly import Closer, Components, LiveGateway, SimGateway
from market_feed import ExchangeFeed
from trade_simulator import ReplayFeed


if TYPE_CHECKING:
    import pandas as pd

    from config import Settings
    from daemon_state import RunState
    from dashboard import Dashboard
    from exchange import Exchange
    from models import Candle, Event, EventSink
    from pipeline import Engine
    from top_pairs import TopPairs
    from trade_simulator import PairSchedule, SimDriver, SimulatedExchange
    from trade_store import TradeStore
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
    parts: Components | None  # the run's components, once a builder has assembled them
    feed: AsyncIterator[Candle] | None  # the feed's candles, iterated once
    progress: Callable[[int, int], None] | None
    restart_as: str | None
    dashboard: Dashboard | None  # the terminal dashboard while it is shown
    dropped: int
    _closers: list[Closer]
    notifiers: list[EventSink]
    supervisor: Supervisor

    @property
    def engine(self) -> Engine | None:
        """The engine, once assembled."""
        return self.parts.engine if self.parts is not None else None

    @property
    def state(self) -> RunState:
        """What the run keeps on disk (assembled: a run without components has none)."""
        assert self.parts is not None
        return self.parts.state

    @property
    def sim(self) -> SimulatedExchange | None:
        """The simulated exchange when orders fill on paper, else None."""
        gateway = self.parts.gateway if self.parts is not None else None
        return gateway.exchange if isinstance(gateway, SimGateway) else None

    @property
    def driver(self) -> SimDriver | None:
        """The simulated exchange's driver in front of the engine, else None."""
        gateway = self.parts.gateway if self.parts is not None else None
        return gateway.driver if isinstance(gateway, SimGateway) else None

    @property
    def store(self) -> TradeStore | None:
        """The live journal, else None."""
        gateway = self.parts.gateway if self.parts is not None else None
        return gateway.store if isinstance(gateway, LiveGateway) else None

    @property
    def exchange(self) -> Exchange | None:
        """The live exchange (the feed's source, and live the gateway too), else None."""
        feed = self.parts.feed if self.parts is not None else None
        return feed.exchange if isinstance(feed, ExchangeFeed) else None

    @property
    def exchange_feed(self) -> ExchangeFeed | None:
        """The exchange's candle feed, else None."""
        feed = self.parts.feed if self.parts is not None else None
        return feed if isinstance(feed, ExchangeFeed) else None

    @property
    def replay(self) -> ReplayFeed | None:
        """The archive replay, else None."""
        feed = self.parts.feed if self.parts is not None else None
        return feed if isinstance(feed, ReplayFeed) else None

    @property
    def top_pairs(self) -> TopPairs | None:
        """The dynamic pair list on the exchange feed, else None."""
        feed = self.exchange_feed
        return feed.top_pairs if feed is not None else None

    @property
    def frames(self) -> Mapping[str, pd.DataFrame]:
        """The replayed archive per pair (empty on the exchange feed)."""
        return self.parts.frames if self.parts is not None else {}

    @property
    def pair_schedule(self) -> PairSchedule | None:
        """A dynamic-pairs backtest's pair schedule, else None."""
        return self.parts.pair_schedule if self.parts is not None else None

    @property
    def timings(self) -> Mapping[str, float]:
        """Seconds per assembly phase of a replay (load, prepare)."""
        return self.parts.timings if self.parts is not None else {}

    if TYPE_CHECKING:

        def alert(self, event: Event) -> None:
            """Route an event to the notifiers."""
