"""The run's view of its components: which gateway, feed and clock it was given.

`runner.Daemon` (the run loop, task supervision and the ordered teardown) takes the frozen
`assembly.Components` one of the `mode_builders` returned; `DaemonBase` reads them for it
and for the objects it holds (`daemon_live.ExchangeSession`, `daemon_learning.Learning`,
`daemon_operator.Operator`, the components' `daemon_state.RunState`): the engine, the
simulated or live exchange, the replay or the exchange feed, the journal, the archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from assembly import Components, LiveGateway, SimGateway
from market_feed import ExchangeFeed
from trade_simulator import ReplayFeed


if TYPE_CHECKING:
    import pandas as pd

    from daemon_state import RunState
    from exchange import Exchange
    from pipeline import Engine
    from top_pairs import TopPairs
    from trade_simulator import PairSchedule, SimDriver, SimulatedExchange
    from trade_store import TradeStore


__all__ = ["DaemonBase"]


class DaemonBase:
    """Read the run's components (see the module docstring); `Daemon.use` sets them."""

    parts: Components | None  # the run's components, once a builder has assembled them

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
