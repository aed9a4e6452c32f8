"""Streams as async iterators that survive dropped sockets: a part of `Exchange`.

`ExchangeStreams` is mixed into `exchange.Exchange`, which supplies the calling and REST
methods (declared on `exchange_base.ExchangeBase`). A dropped socket backs off with
jitter, resubscribes and resynchronises from REST; `watch_candles` yields every closed
candle once and in order per pair, filling gaps from `fetch_ohlcv`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Generic, TypeVar

import structlog

from bybit_converters import (
    balances_from_ccxt,
    candle_from_row,
    fill_from_ccxt,
    order_from_ccxt,
    position_from_ccxt,
    trade_from_ccxt,
)
from bybit_orders import SWEEP_OVERLAP_MS
from error_handler import RecoverableError
from exchange_base import ClientState, ExchangeBase
from models import Balance, Candle, Fill, Order, OrderBook, Position, Ticker, Trade
from utils.utilities import timeframe_to_ms


__all__ = ["ExchangeStreams"]

T = TypeVar("T")
log = structlog.get_logger("exchange")

# The first fill sweep runs this soon after start-up (see bybit_orders.SWEEP_OVERLAP_MS).
_FIRST_POLL_S: Final = 2.0
_MERGED: Final = 1000  # items a merged stream holds for its consumer


class ExchangeStreams(ExchangeBase):
    """The streams of `Exchange`: `watch_*` iterators and the machinery behind them."""

    async def _pump(
        self,
        op: str,
        watch: Callable[[], Awaitable[Any]],
        pair: str | None,
        queue: asyncio.Queue[tuple[str, Any]],
    ) -> None:
        # Await ccxt's watch in a tight loop and queue each result at once: ccxt resolves a
        # future only if one is pending, so a frame arriving while the consumer is busy
        # (e.g. filling a gap over REST) would otherwise wait for the next frame.
        failures = 0
        while True:
            try:
                raw = await self._once(op, watch, pair)
            except RecoverableError as e:
                failures += 1
                delay = self._backoff(failures, e)
                fields = {"pair": pair} | e.describe()
                log.warning("stream_reconnecting", stream=op, delay=round(delay, 3), **fields)
                queue.put_nowait(("lost", e))
                await self._clock.sleep(delay)
                continue
            except asyncio.CancelledError:
                # ccxt cancels pending watches when the exchange closes: end the stream.
                current = asyncio.current_task()
                if self.state is ClientState.CLOSED and not (current and current.cancelling()):
                    queue.put_nowait(("closed", None))
                    return
                raise
            except BaseException as e:
                queue.put_nowait(("error", e))
                return
            if failures:
                log.info("stream_resumed", stream=op, pair=pair, after_failures=failures)
                queue.put_nowait(("resumed", None))
                failures = 0
            queue.put_nowait(("data", raw))

    async def _stream(
        self,
        op: str,
        watch: Callable[[], Awaitable[Any]],
        convert: Callable[[Any], Awaitable[list[T]]],
        *,
        pair: str | None = None,
        resync: Callable[[], Awaitable[list[T]]] | None = None,
        poll: Callable[[], Awaitable[list[T]]] | None = None,
        poll_s: float | None = None,
    ) -> AsyncIterator[T]:
        # Watch forever. A dropped socket backs off with jitter and resubscribes (ccxt does
        # that on the next watch). What the outage hid is fetched over REST twice: as soon
        # as the loss is seen, and once the new subscription delivers, so nothing between
        # the first resync and the resubscription slips through; `convert`/`resync`
        # de-duplicate.
        # With `poll`, a REST sweep also runs every `poll_s` (the first one soon after the
        # start): a safety net for what no socket reported, such as what happened between
        # start-up and the subscription.
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        pump = asyncio.ensure_future(self._pump(op, watch, pair, queue))
        poller = (
            asyncio.ensure_future(self._poll_timer(queue, poll_s))
            if poll is not None and poll_s is not None
            else None
        )
        sources = _StreamSources(op, pair, convert, resync, poll)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "error":
                    raise payload
                if kind == "closed":
                    return
                for item in await sources.items(kind, payload):
                    yield item
        finally:
            for task in (pump, poller):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _poll_timer(self, queue: asyncio.Queue[tuple[str, Any]], every_s: float) -> None:
        await self._clock.sleep(min(every_s, _FIRST_POLL_S))
        while True:
            queue.put_nowait(("poll", None))
            await self._clock.sleep(every_s)

    def _merge(
        self,
        streams: list[AsyncIterator[T]],
        queue: asyncio.Queue[tuple[bool | None, Any]] | None = None,
    ) -> AsyncIterator[T]:
        # Interleave several streams; the first failure ends them all. `queue`: the one to
        # merge through, when the caller's taps put items into it too.
        if len(streams) == 1 and queue is None:
            return streams[0]
        return self._merged(streams, queue if queue is not None else asyncio.Queue(_MERGED))

    async def _merged(
        self, streams: list[AsyncIterator[T]], queue: asyncio.Queue[tuple[bool | None, Any]]
    ) -> AsyncIterator[T]:
        # Ends when every stream has ended (None: one did).
        async def pump(stream: AsyncIterator[T]) -> None:
            try:
                async for item in stream:
                    await queue.put((True, item))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer
                await queue.put((False, e))
                return
            await queue.put((None, None))

        tasks = [asyncio.ensure_future(pump(s)) for s in streams]
        running = len(tasks)
        try:
            while running:
                ok, value = await queue.get()
                if ok is None:
                    running -= 1
                elif not ok:
                    raise value
                else:
                    yield value
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def watch_candles(
        self, pairs: Sequence[str], timeframe: str, *, since: int | None = None
    ) -> AsyncIterator[Candle]:
        """Yield each CLOSED candle of `pairs` exactly once, in order per pair.

        Args:
            pairs: markets to watch (spot and linear may be mixed).
            timeframe: "1m", "5m", "1h", ...
            since: open time of the first candle wanted; older closed candles are
                fetched from REST first. None starts with the next candle to close.

        Gaps (a dropped socket, a missed frame) are filled from `fetch_ohlcv` before the
        newer candle is yielded.

        A frame that carries the next candle in order is taken in the read that brought it
        (the client's kline tap, `bybit_client.KestrelBybit.handle_ohlcv`), straight into
        the merged stream, and ccxt does not handle it (nor a frame of the next candle
        still forming): the watch's task does not wake. A frame that needs REST first (a
        gap), the first frame, and the frames after a lost socket until the watch has
        delivered again go the watch's way, as every frame does on a client without taps.
        """
        step = timeframe_to_ms(timeframe)
        merged: asyncio.Queue[tuple[bool | None, Any]] = asyncio.Queue(maxsize=_MERGED)
        return self._merge(
            [self._candles(p, timeframe, step, since, merged) for p in pairs], merged
        )

    async def _candles(
        self,
        pair: str,
        timeframe: str,
        step: int,
        since: int | None,
        merged: asyncio.Queue[tuple[bool | None, Any]] | None = None,
    ) -> AsyncIterator[Candle]:
        client = self._ensure_open()
        symbol = self.market(pair).pair
        cursor = _CandleCursor(self, pair, timeframe, step, since)
        if since is not None:
            for candle in await cursor.catch_up(self.server_now_ms()):
                yield candle
        stream = self._stream(
            "watch_candles",
            lambda: client.watch_ohlcv(symbol, timeframe),
            cursor.convert,
            pair=pair,
            resync=cursor.resync,
        )
        # The client's kline taps (none on a client without them): the last stream to
        # watch a market gets its frames there; each takes only its own tap away.
        taps = getattr(client, "kestrel_kline_taps", None)
        key, tap = (symbol, timeframe), None
        if merged is not None and isinstance(taps, dict):
            tap = taps[key] = cursor.tap(merged)
        try:
            async for candle in stream:
                yield candle
        finally:
            if tap is not None and taps is not None and taps.get(key) is tap:
                del taps[key]

    def watch_tickers(self, pairs: Sequence[str]) -> AsyncIterator[Ticker]:
        """Yield ticker updates of `pairs` as they arrive (the latest state per update)."""
        client = self._ensure_open()

        # One watch per pair: ccxt's multi-symbol watch_tickers returns only the ticker
        # whose frame settled the race, and drops the others' updates of that moment.
        def stream(pair: str) -> AsyncIterator[Ticker]:
            async def convert(raw: dict[str, Any]) -> list[Ticker]:
                # ccxt resolves with the ticker of the frame that settled the future; frames
                # parsed before we resumed replaced it in `client.tickers`: take the latest.
                return [self._ticker(client.tickers.get(pair) or raw, pair)]

            return self._stream(
                "watch_tickers", functools.partial(client.watch_ticker, pair), convert, pair=pair
            )

        return self._merge([stream(self.market(p).pair) for p in pairs])

    def watch_order_book(self, pair: str, limit: int = 50) -> AsyncIterator[OrderBook]:
        """Yield the book of `pair` (top `limit` levels) after each update."""
        client = self._ensure_open()
        depth = 50 if limit <= 50 else 200

        async def convert(raw: dict[str, Any]) -> list[OrderBook]:
            return [self._book(raw, pair, limit)]

        return self._stream(
            "watch_order_book", lambda: client.watch_order_book(pair, depth), convert, pair=pair
        )

    def watch_trades(self, pairs: Sequence[str]) -> AsyncIterator[Trade]:
        """Yield public trades of `pairs` as they print."""
        client = self._ensure_open()

        def stream(pair: str) -> AsyncIterator[Trade]:  # one watch per pair, as for tickers
            async def convert(raw: list[dict[str, Any]]) -> list[Trade]:
                return [trade_from_ccxt(t, pair) for t in raw]

            return self._stream(
                "watch_trades", functools.partial(client.watch_trades, pair), convert, pair=pair
            )

        return self._merge([stream(self.market(p).pair) for p in pairs])

    async def wait_private_streams(self, *, timeout: float, streams: int = 2) -> bool:  # noqa: ASYNC109 - a deadline for polling ccxt's own state
        """Wait until the exchange has acknowledged `streams` private subscriptions.

        From then on an order's or a fill's event reaches the socket: what the caller
        fetches over REST afterwards leaves nothing between the two. ccxt resolves nothing
        on an acknowledgement, so the client counts them (`KestrelBybit`) and this reads
        the count. Return False (and log) when `timeout` runs out; the caller's REST sweep
        and the periodic sweeps still cover what the socket misses.
        """
        client = self._ensure_open()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for url, ws in dict(getattr(client, "clients", {})).items():
                connected = getattr(ws, "connected", None)
                ready = (
                    "/private" in url
                    and connected is not None
                    and connected.done()
                    and not connected.cancelled()
                    and connected.exception() is None
                    and getattr(ws, "kestrel_acknowledged", 0) >= streams
                )
                if ready:
                    log.info("private_streams_ready", subscriptions=ws.kestrel_acknowledged)
                    return True
            await asyncio.sleep(0.01)
        log.warning("private_streams_not_ready", timeout_s=timeout)
        return False

    def watch_orders(self) -> AsyncIterator[Order]:
        """Yield order updates (all pairs); after a reconnect, the open orders again."""
        client = self._ensure_open()

        async def convert(raw: list[dict[str, Any]]) -> list[Order]:
            return [order_from_ccxt(o) for o in raw]

        return self._stream(
            "watch_orders", lambda: client.watch_orders(), convert, resync=self.fetch_open_orders
        )

    def watch_fills(
        self, *, since: int | None = None, poll_s: float | None = None
    ) -> AsyncIterator[Fill]:
        """Yield our executions once each; after a reconnect, the ones missed meanwhile.

        With `poll_s`, executions are also fetched over REST every `poll_s` seconds, each
        sweep from where the previous one started (the first from `since`, default now),
        so a fill the socket never delivered still arrives, late but once.
        """
        client = self._ensure_open()
        seen: set[str] = set()
        newest = [self.server_now_ms()]
        swept = [newest[0] if since is None else since]

        def fresh(fills: Iterable[Fill]) -> list[Fill]:
            out = []
            for fill in fills:
                if fill.fill_id not in seen:
                    seen.add(fill.fill_id)
                    newest[0] = max(newest[0], fill.ts)
                    out.append(fill)
            return out

        async def convert(raw: list[dict[str, Any]]) -> list[Fill]:
            return fresh(fill_from_ccxt(t) for t in raw)

        async def resync() -> list[Fill]:
            return fresh(await self.fetch_my_trades(since=newest[0] - 60_000))

        async def sweep() -> list[Fill]:
            start = self.server_now_ms()
            found = fresh(await self.fetch_my_trades(since=swept[0] - SWEEP_OVERLAP_MS))
            swept[0] = start
            return found

        return self._stream(
            "watch_fills",
            lambda: client.watch_my_trades(),
            convert,
            resync=resync,
            poll=sweep,
            poll_s=poll_s,
        )

    def watch_positions(self) -> AsyncIterator[Position]:
        """Yield linear position updates; after a reconnect, the open positions again."""
        client = self._ensure_open()

        async def convert(raw: list[dict[str, Any]]) -> list[Position]:
            return [p for p in (position_from_ccxt(r) for r in raw) if p is not None]

        return self._stream(
            "watch_positions",
            lambda: client.watch_positions(),
            convert,
            resync=self.fetch_positions,
        )

    def watch_balance(self) -> AsyncIterator[dict[str, Balance]]:
        """Yield the wallet after each change; after a reconnect, a fresh snapshot."""
        client = self._ensure_open()

        async def convert(raw: dict[str, Any]) -> list[dict[str, Balance]]:
            # As for tickers: the unified wallet parsed last, not the one that woke us.
            latest = client.balance.get("unified") if isinstance(client.balance, dict) else None
            return [balances_from_ccxt(latest or raw)]

        async def resync() -> list[dict[str, Balance]]:
            return [await self.fetch_balance()]

        return self._stream("watch_balance", lambda: client.watch_balance(), convert, resync=resync)


class _StreamSources(Generic[T]):
    # Where a stream's items come from, per queued event: the socket's payload, a REST
    # poll, or a REST resync after a loss and after the resume (one per outage).
    def __init__(
        self,
        op: str,
        pair: str | None,
        convert: Callable[[Any], Awaitable[list[T]]],
        resync: Callable[[], Awaitable[list[T]]] | None,
        poll: Callable[[], Awaitable[list[T]]] | None,
    ) -> None:
        self.op = op
        self.pair = pair
        self.convert = convert
        self.resync = resync
        self.poll = poll
        self.outage = False

    async def items(self, kind: str, payload: Any) -> list[T]:
        # Nothing for events this stream has no source for.
        op, pair = self.op, self.pair
        if kind == "data":
            return await self.convert(payload)
        if kind == "poll" and self.poll is not None:
            try:
                return await self.poll()
            except RecoverableError as e:
                log.warning("stream_poll_failed", stream=op, **({"pair": pair} | e.describe()))
                return []
        if kind in ("lost", "resumed") and self.resync is not None:
            if kind == "lost" and self.outage:
                return []  # one resync per outage, not per failed reconnect
            self.outage = kind == "lost"
            try:
                return await self.resync()
            except RecoverableError as e:
                log.warning("stream_resync_failed", stream=op, **({"pair": pair} | e.describe()))
                self.outage = False  # try again on the next loss or resume
                return []
        return []


class _CandleCursor:
    # The newest candle yielded for one pair: frames at or before it are dropped, and a
    # jump past the next one is filled from REST first.
    def __init__(
        self, exchange: ExchangeBase, pair: str, timeframe: str, step: int, since: int | None
    ) -> None:
        self.exchange = exchange
        self.pair = pair
        self.timeframe = timeframe
        self.step = step
        self.last: int | None = None if since is None else -(-since // step) * step - step
        self.fetching = 0  # REST catch-ups in flight: the tap leaves frames to them
        # Whether the watch has delivered since the stream started or last lost its socket:
        # until it has, every frame also goes the watch's way (its return after a loss is
        # what logs the resumption and resynchronises once more).
        self.watched = False

    def tap(
        self, merged: asyncio.Queue[tuple[bool | None, Any]]
    ) -> Callable[[list[list[Any]]], bool]:
        """Return the kline tap that puts the frames' next candles into `merged` at once.

        The tap returns True when the frame needs nothing from the watch: every candle it
        carries is yielded, taken now, or the next one still forming. ccxt then does not
        handle the frame at all (`KestrelBybit.handle_ohlcv`), so the watch's task does not
        wake for it. False: the frame goes the watch's way, which finds taken what was.
        """

        def take(rows: list[list[Any]]) -> bool:
            # Never while a REST catch-up runs (it yields what it fetched first), nor into a
            # queue without room (the watch's way waits for room), nor before the watch's way
            # has seen a frame (it may hold an earlier one); a gap is left to it too.
            if (
                self.fetching
                or self.last is None
                or merged.qsize() + len(rows) > merged.maxsize > 0
            ):
                return False
            taken = self.convert_now(rows)
            if taken is None:
                return False
            for candle in taken:
                merged.put_nowait((True, candle))
            return self.watched

        return take

    def convert_now(self, rows: list[list[Any]]) -> list[Candle] | None:
        # `convert` without REST: the frames' closed candles that come next in order, or
        # None (nothing taken) when one lies past a gap, which `convert` fills first.
        step, last = self.step, self.last
        out: list[Candle] = []
        for row in rows if len(rows) < 2 else sorted(rows, key=lambda r: r[0]):
            ts, confirmed = int(row[0]), bool(row[6]) if len(row) > 6 else False
            if last is None:  # first frame: this candle is the next one to yield
                last = ts - step
            if ts <= last:
                continue  # already yielded
            if ts > last + step:
                return None
            if confirmed:
                out.append(candle_from_row(self.pair, self.timeframe, row))
                last = ts
        self.last = last
        return out

    async def catch_up(self, now_ms: int) -> list[Candle]:
        # Closed candles after the last one yielded, up to (excluding) now's candle.
        pair, timeframe, step = self.pair, self.timeframe, self.step
        previous = self.last
        if previous is None:
            return []
        self.fetching += 1
        try:
            got = await self.exchange._fetch_closed(
                pair, timeframe, previous + step, None, None, now_ms=now_ms
            )
        finally:
            self.fetching -= 1
        fresh = [c for c in got if c.ts > previous]
        if fresh:
            self.last = fresh[-1].ts
            log.info(
                "stream_gap_filled",
                pair=pair,
                timeframe=timeframe,
                candles=len(fresh),
                first=fresh[0].ts,
            )
        return fresh

    async def resync(self) -> list[Candle]:
        self.watched = False  # a loss, or the resumption: the watch must deliver first
        return await self.catch_up(await self.exchange.fetch_server_time())

    async def convert(self, rows: list[list[Any]]) -> list[Candle]:
        self.watched = True
        taken = self.convert_now(rows)
        if taken is not None:
            return taken
        step = self.step
        out: list[Candle] = []
        for row in sorted(rows, key=lambda r: r[0]):
            ts, confirmed = int(row[0]), bool(row[6]) if len(row) > 6 else False
            previous = self.last
            if previous is None:  # first frame: this candle is the next one to yield
                self.last = previous = ts - step
            if ts <= previous:
                continue  # already yielded
            if ts > previous + step:
                out.extend(await self.catch_up(ts))  # everything before `ts` has closed
            if confirmed and ts > (self.last or 0):
                out.append(candle_from_row(self.pair, self.timeframe, row))
                self.last = ts
        return out
