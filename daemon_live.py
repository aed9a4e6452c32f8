"""The exchange side of a run: reconciliation, private streams, fills, funding.

Part of `runner` (which re-exports it). `ExchangeSession` holds what a run on the exchange
feed does besides reading candles (those come from `market_feed.ExchangeFeed`): live, the
start-up reconciliation, the private fill and order streams, the REST sweeps that back
them up, the start-up order before the first decision and the last sweep at stop; live
and paper, the funding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from config import Settings
from models import MarketType
from perpetuals import FundingSchedule


if TYPE_CHECKING:
    from exchange import Exchange
    from pipeline import Engine
    from trade_store import TradeStore

log = structlog.get_logger(__name__)
PRIVATE_READY_TIMEOUT_S = 10.0  # the private streams' subscription, before trading starts
_SETTLE_LOOKBACK_MS = 3_600_000  # how far back the stop looks for fills the stream missed


async def apply_exchange_funding(
    exchange: Any, portfolio: Any, pairs: list[str], since: int | None
) -> tuple[int, int | None]:
    """Apply the funding the exchange booked on `pairs` (perpetuals) since `since`.

    Each settlement is applied once (the portfolio dedupes by the exchange's id). Returns
    how many were new and the newest settlement time seen (the next call's `since`).
    """
    applied, newest = 0, since
    for pair in pairs:
        for payment in await exchange.fetch_funding_payments(pair, since):
            applied += portfolio.apply_funding_payment(payment)
            newest = payment.ts if newest is None else max(newest, payment.ts)
    if applied:
        log.info("funding_applied", settlements=applied)
    return applied, newest


async def refresh_paper_funding(
    exchange: Any, funding: dict[str, FundingSchedule], pairs: list[str]
) -> int:
    """Add each perpetual's next funding time and current rate to `funding` (paper mode).

    The engine settles it at the candle that holds the funding time, as the exchange
    would; a later refresh before that time updates the rate. Returns the pairs updated.
    """
    updated = 0
    for pair in pairs:
        upcoming = await exchange.fetch_next_funding(pair)
        if upcoming is None:
            continue
        known = funding.get(pair) or FundingSchedule.of([])
        funding[pair] = known.with_rows([upcoming])
        updated += 1
    return updated


class ExchangeSession:
    """The exchange-facing tasks of a run on the exchange feed (see the module docstring).

    Attributes:
        live: real orders (the exchange is the order gateway), else paper fills.
        fills_since: live, where the run's fills begin (set by `reconcile`).
    """

    def __init__(self, settings: Settings, engine: Engine, exchange: Exchange, *, live: bool):
        self.settings = settings
        self.engine = engine
        self.exchange = exchange
        self.live = live
        self.fills_since: int | None = None

    async def reconcile(self, store: TradeStore) -> None:
        """Reconcile the journal with the exchange at start (live), before any decision."""
        engine, exchange = self.engine, self.exchange
        # Fills from here on reach the journal by the private stream, its REST sweeps, and
        # a last sweep at stop; the minute back covers clock skew.
        self.fills_since = exchange.server_now_ms() - 60_000
        quote = self.settings.simulation.quote_currency
        report = await engine.executor.reconcile(exchange, store, quote=quote)
        engine.reconcile_report = report
        log.info("reconciled", report=report)

    def funding_task(self) -> Coroutine[Any, Any, None] | None:
        """Return the funding task: Bybit's booked funding live, its rates on paper."""
        if self.live:
            linear = self.settings.exchange.market_type == "linear"
            return self._exchange_funding() if linear else None
        return self._paper_funding() if self.settings.simulation.funding else None

    async def _paper_funding(self) -> None:
        # Paper trading on the live feed: funding from the exchange's published rates,
        # refreshed until each funding time passes, settled by the engine's candles.
        structlog.contextvars.bind_contextvars(component="funding")
        exchange, engine = self.exchange, self.engine
        while True:
            pairs = [p for p in engine.pairs if exchange.market(p).type is MarketType.LINEAR]
            try:
                await refresh_paper_funding(exchange, engine.funding, pairs)
            except Exception:
                log.exception("funding_refresh_failed")
            await asyncio.sleep(self.settings.exchange.funding_poll_interval_s)

    async def _exchange_funding(self) -> None:
        # Live perpetuals: the funding Bybit books on our positions reaches the portfolio
        # (cash, the open trade's funding); polled, as funding comes every few hours.
        structlog.contextvars.bind_contextvars(component="funding")
        exchange, engine = self.exchange, self.engine
        since: int | None = exchange.server_now_ms()
        while True:
            await asyncio.sleep(self.settings.exchange.funding_poll_interval_s)
            pairs = [p for p in engine.pairs if exchange.market(p).type is MarketType.LINEAR]
            try:
                _, since = await apply_exchange_funding(exchange, engine.portfolio, pairs, since)
            except Exception:
                log.exception("funding_poll_failed")

    async def private_fills(self) -> None:
        """Deliver the private stream's fills to the engine (live)."""
        structlog.contextvars.bind_contextvars(
            component="private-fills"
        )  # this task's context only
        fills = self.exchange.watch_fills(
            since=self.fills_since, poll_s=self.settings.exchange.fill_poll_interval_s
        )
        async for fill in fills:
            await self.engine.on_stream_fill(fill)

    async def settle_fills(self) -> None:
        """Fetch the fills the stopped private stream missed (live)."""
        # Executions that landed after the pipeline's last order (the private stream is
        # already stopped) are fetched once over REST, so a stopped bot's journal agrees
        # with the exchange; the store ignores fills it already has.
        if not self.live:
            return
        # Late fills are seconds old; Bybit answers a start time with the 7 days after it,
        # so a long run's start would miss them: look back an hour at most.
        since = self.exchange.server_now_ms() - _SETTLE_LOOKBACK_MS
        if self.fills_since is not None:
            since = max(since, self.fills_since)
        settled = 0
        for fill in await self.exchange.fetch_my_trades(since=since):
            if not await self.engine.executor.has_fill(fill.fill_id):
                await self.engine.on_stream_fill(fill)
                settled += 1
        if settled:
            log.info("fills_settled", fills=settled)

    async def private_orders(self) -> None:
        """Deliver the private stream's order updates to the executor (live)."""
        structlog.contextvars.bind_contextvars(
            component="private-orders"
        )  # this task's context only
        async for order in self.exchange.watch_orders():
            await self.engine.executor.on_order(order)

    async def ready_to_trade(self) -> None:
        """Finish reconciling before the first decision (live only).

        The private streams are subscribed first; the fills made since the journal's last
        record (those the reconciliation's fetch could not see yet, and closes the exchange
        made of a held position, e.g. a liquidation while the bot was down) are then
        fetched once over REST, so none falls between the fetch and the subscription; last, every
        position gets back the stop it should have (one crossed already is closed).
        """
        engine, exchange = self.engine, self.exchange
        await exchange.wait_private_streams(timeout=PRIVATE_READY_TIMEOUT_S)
        since = engine.executor.catch_up_since(self.fills_since)
        settled = 0
        for fill in await exchange.fetch_my_trades(since=since):
            if not await engine.executor.has_fill(fill.fill_id):
                await engine.on_stream_fill(fill)
                settled += 1
        crossed = await engine.executor.restore_protection(engine.price)
        for pair in crossed:
            await engine.close_position(pair, "stop level crossed while the bot was down")
        log.info("ready_to_trade", fills_since_reconcile=settled, closed_past_stop=crossed)
