"""The live side of a run: candles from the exchange, private streams, fills, retraining.

Part of `runner` (which re-exports it): the candle stream with resubscription when the
pair list changes, the private fill and order streams, the REST sweeps that back them up,
the start-up order before the first decision, and the model retraining step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import structlog

from daemon_base import DaemonBase
from daemon_build import prime_anomalies
from models import Candle, MarketType
from perpetuals import FundingSchedule
from utils.utilities import (
    timeframe_to_ms,
)


log = structlog.get_logger(__name__)
QUEUE_SIZE = 1_000
SHUTDOWN_STEP_TIMEOUT = 1.5
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


class DaemonLive(DaemonBase):
    """The exchange-facing tasks of a run (see the module docstring)."""

    def _funding_task(self) -> Coroutine[Any, Any, None] | None:
        # Live perpetuals: Bybit's booked funding; paper on the live feed: its rates.
        if self.exchange is None:
            return None
        if self.sim is None:
            linear = self.settings.exchange.market_type == "linear"
            return self._exchange_funding() if linear else None
        return self._paper_funding() if self.settings.simulation.funding else None

    async def _paper_funding(self) -> None:
        # Paper trading on the live feed: funding from the exchange's published rates,
        # refreshed until each funding time passes, settled by the engine's candles.
        structlog.contextvars.bind_contextvars(component="funding")
        assert self.engine is not None
        assert self.exchange is not None
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
        assert self.engine is not None
        assert self.exchange is not None
        exchange, engine = self.exchange, self.engine
        since: int | None = exchange.server_now_ms()
        while True:
            await asyncio.sleep(self.settings.exchange.funding_poll_interval_s)
            pairs = [p for p in engine.pairs if exchange.market(p).type is MarketType.LINEAR]
            try:
                _, since = await apply_exchange_funding(exchange, engine.portfolio, pairs, since)
            except Exception:
                log.exception("funding_poll_failed")

    async def _exchange_candles(self, pairs: list[str]) -> AsyncIterator[Candle]:
        """Stream closed candles; resubscribe when the pair list changes."""
        assert self.exchange is not None
        timeframe = self.settings.strategy.timeframe
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
            stream = self.exchange.watch_candles(self.feed_pairs, timeframe, since=since)
            try:
                async for candle in stream:
                    yield candle
                    if self._resubscribe.is_set():
                        break
            finally:
                await stream.aclose()

    async def on_pairs_changed(self, diff: Any) -> None:
        """Add new pairs (warm-up first) and drain removed ones, keeping open positions."""
        assert self.engine is not None
        await self._warm_up(list(diff.added))
        prime_anomalies(self.engine, list(diff.added))
        keep = list(self.top_pairs.pairs) if self.top_pairs is not None else self.engine.pairs
        self.engine.set_pairs(keep)
        # Removed pairs that still hold a position stay on the feed until it is closed.
        draining = diff.draining(self.engine.portfolio.positions())
        self.feed_pairs = [*keep, *[p for p in draining if p not in keep]]
        self._resubscribe.set()
        log.info(
            "pairs_changed",
            added=list(diff.added),
            removed=list(diff.removed),
            draining=list(draining),
        )

    async def _private_fills(self) -> None:
        structlog.contextvars.bind_contextvars(
            component="private-fills"
        )  # this task's context only
        assert self.engine is not None
        assert self.exchange is not None
        fills = self.exchange.watch_fills(
            since=self._fills_since, poll_s=self.settings.exchange.fill_poll_interval_s
        )
        async for fill in fills:
            await self.engine.on_stream_fill(fill)

    async def _settle_fills(self) -> None:
        # Executions that landed after the pipeline's last order (the private stream is
        # already stopped) are fetched once over REST, so a stopped bot's journal agrees
        # with the exchange; the store ignores fills it already has.
        if self.exchange is None or self.sim is not None or self.engine is None:
            return
        # Late fills are seconds old; Bybit answers a start time with the 7 days after it,
        # so a long run's start would miss them: look back an hour at most.
        since = self.exchange.server_now_ms() - _SETTLE_LOOKBACK_MS
        if self._fills_since is not None:
            since = max(since, self._fills_since)
        settled = 0
        for fill in await self.exchange.fetch_my_trades(since=since):
            if not await self.engine.executor.has_fill(fill.fill_id):
                await self.engine.on_stream_fill(fill)
                settled += 1
        if settled:
            log.info("fills_settled", fills=settled)

    async def _private_orders(self) -> None:
        structlog.contextvars.bind_contextvars(
            component="private-orders"
        )  # this task's context only
        assert self.engine is not None
        assert self.exchange is not None
        async for order in self.exchange.watch_orders():
            await self.engine.executor.on_order(order)

    async def _ready_to_trade(self) -> None:
        """Finish reconciling before the first decision (live only).

        The private streams are subscribed first; the fills made since the journal's last
        record (those the reconciliation's fetch could not see yet, and closes the exchange
        made of a held position, e.g. a liquidation while the bot was down) are then
        fetched once over REST, so none falls between the fetch and the subscription; last, every
        position gets back the stop it should have (one crossed already is closed).
        """
        assert self.engine is not None
        assert self.exchange is not None
        engine, exchange = self.engine, self.exchange
        await exchange.wait_private_streams(timeout=PRIVATE_READY_TIMEOUT_S)
        since = engine.executor.catch_up_since(self._fills_since)
        settled = 0
        for fill in await exchange.fetch_my_trades(since=since):
            if not await engine.executor.has_fill(fill.fill_id):
                await engine.on_stream_fill(fill)
                settled += 1
        crossed = await engine.executor.restore_protection(engine.price)
        for pair in crossed:
            await engine.close_position(pair, "stop level crossed while the bot was down")
        log.info("ready_to_trade", fills_since_reconcile=settled, closed_past_stop=crossed)

    def model_name(self, pair: str) -> str:
        """Return the model registry name used for a pair (same as `--mode train`)."""
        from model_training import model_name

        return model_name("supervised", pair, self.settings.strategy.timeframe)

    def enable_learning(self) -> None:
        """Filter entries through each pair's champion model (when learning is enabled)."""
        from model_training import model_dirs
        from self_learning import ModelRegistry, SafePredictor

        assert self.engine is not None
        models, _ = model_dirs(self.settings.learning, self.settings.storage.data_dir)
        self.engine.model_threshold = self.settings.learning.entry_threshold
        for pair in self.engine.pairs:
            registry = ModelRegistry(models, self.model_name(pair))
            self.engine.predictors[pair] = SafePredictor(registry, alert=self.alert)

    def build_retrainer(self) -> Any:
        """Return the model retrainer of this run (`model_training.Retrainer`)."""
        from model_training import Retrainer, RetrainPlan, Scoring, model_dirs
        from utils.utilities import timeframe_to_ms

        assert self.engine is not None
        engine = self.engine
        settings = self.settings
        models, features = model_dirs(settings.learning, settings.storage.data_dir)
        timeframe = settings.strategy.timeframe
        plan = RetrainPlan(
            learning=settings.learning,
            kind=settings.learning.kind,
            timeframe=timeframe,
            scoring=Scoring(timeframe_to_ms(timeframe), settings.reward),
            models_dir=models,
            features_dir=features,
            data_dir=settings.storage.data_dir,
            exchange=settings.exchange.name,
            pairs=lambda: list(engine.pairs),
            frame=self._seen_candles,
            candles=lambda: engine.candles,
            flush=engine.data.flush,
            alert=self.alert,
            poll_s=settings.learning.retrain_check_s,
        )
        self._closers.append(("retrainer", self._close_retrainer))
        return Retrainer(plan)

    def _seen_candles(self, pair: str) -> Any:
        # A replay has no archive: train on the replayed candles up to the last one the
        # engine processed (never a candle it has not seen). None: the worker reads the
        # pair's archive itself.
        assert self.engine is not None
        if self.engine.data.store is not None or pair not in self.frames:
            return None
        seen = self.engine.data.arrays(pair, self.settings.strategy.timeframe).ts
        if not len(seen):
            return None
        frame = self.frames[pair]
        return frame[frame.index.as_unit("ms").asi8 <= int(seen[-1])]

    async def _close_retrainer(self) -> None:
        if self.retrainer is not None:
            self.retrainer.close()

    async def _retrain_once(self) -> None:
        """One step of the retrainer: shadow what is running, retrain what is due."""
        if self.retrainer is None:
            self.retrainer = self.build_retrainer()
        try:
            await self.retrainer.step()
        except asyncio.CancelledError:
            self.retrainer.close()  # the run ends: stop the worker with it
            raise
