"""The market feed of a run on the exchange: warm-up, closed candles, resubscription.

Part of `runner` (which re-exports it). `ExchangeFeed` is the exchange-stream counterpart
of the archive replay (`trade_simulator.ReplayFeed`): iterate it for every closed candle
from the end of the warm-up on, exactly once, gaps refilled from REST; `follow` changes the
pairs it streams (the stream is resubscribed after the next candle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, cast

import structlog

from config import SleeveSettings
from data_manager import DataManager
from models import Candle
from strategy import Strategy
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    from exchange import Exchange
    from top_pairs import TopPairs


__all__ = ["ExchangeFeed"]

log = structlog.get_logger(__name__)


class ExchangeFeed:
    """Closed candles from the exchange for a changing list of pairs.

    Attributes:
        exchange: the exchange the candles come from.
        data: the candle window the warm-up history goes into (the engine's).
        top_pairs: the dynamic pair list, when pairs are ranked; else None.
        start_pairs: the pairs warmed up and streamed first.
        feed_pairs: the pairs streamed now (traded ones plus those still draining).
    """

    def __init__(
        self,
        exchange: Exchange,
        data: DataManager,
        *,
        timeframe: str,
        window: int,
        pairs: list[str],
        top_pairs: TopPairs | None = None,
    ) -> None:
        self.exchange = exchange
        self.data = data
        self.top_pairs = top_pairs
        self.timeframe = timeframe
        self.window = window
        self.feed_pairs: list[str] = []
        self.start_pairs = list(pairs)
        self._resubscribe = asyncio.Event()
        self._resume_from: int | None = None

    def __aiter__(self) -> AsyncIterator[Candle]:
        """Stream closed candles of the start pairs; resubscribe when `follow` changes them."""
        return self._candles(self.start_pairs)

    def follow(self, pairs: list[str]) -> None:
        """Stream `pairs` from the next candle on."""
        self.feed_pairs = pairs
        self._resubscribe.set()

    async def warm_up(
        self,
        pairs: list[str],
        strategy: Strategy | None = None,
        sleeves: list[tuple[SleeveSettings, Strategy]] | None = None,
    ) -> None:
        """Load each pair's recent history into the window and prime its strategy on it."""
        timeframe = self.timeframe
        for pair in pairs:
            history = await self.exchange.fetch_ohlcv(pair, timeframe, limit=self.window)
            for candle in history:
                self.data.on_candle(candle)
            if history:
                last = history[-1].ts
                self._resume_from = (
                    last if self._resume_from is None else min(self._resume_from, last)
                )
            bars = self.data.arrays(pair, timeframe)
            # The pair's own strategy (its sleeve's when several trade).
            deciding = next((each for sl, each in sleeves or [] if pair in sl.pairs), strategy)
            if deciding is not None and len(bars.ts) >= deciding.warmup:
                # Run the strategy over the history now: its kernel is compiled and its
                # per-pair state primed before the first live candle, not during it.
                deciding.last_row_arrays(pair, bars)
            log.info("warmup_loaded", pair=pair, candles=len(history))

    async def _candles(self, pairs: list[str]) -> AsyncIterator[Candle]:
        """Stream closed candles; resubscribe when the pair list changes."""
        timeframe = self.timeframe
        self.feed_pairs = list(pairs)
        while True:
            self._resubscribe.clear()
            # Start right after the warm-up: a candle closing between the warm-up fetch and
            # the first frame is fetched over REST instead of being lost. The data manager
            # drops the ones a pair already has.
            since = None
            if self._resume_from is not None:
                since = self._resume_from + timeframe_to_ms(timeframe)
                self._resume_from = None
            stream = cast(
                AsyncGenerator[Candle, None],
                self.exchange.watch_candles(self.feed_pairs, timeframe, since=since),
            )
            try:
                async for candle in stream:
                    yield candle
                    if self._resubscribe.is_set():
                        break
            finally:
                await stream.aclose()
