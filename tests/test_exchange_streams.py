"""Exchange streams: closed candles once and in order through drops and gaps; live feeds."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import structlog
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from error_handler import AuthenticationError
from exchange import Exchange
from models import Candle, OrderIntent, OrderType, PositionSide, Side
from tests.bybit_emulator import MINUTE_MS, BybitEmulator, bucket_start, exchange_settings
from tests.conftest import eventually


T = TypeVar("T")


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator whose clock has just passed a minute.

    Its clock runs with the wall clock: a minute turning during a test would close one more
    candle than the test's own `advance` calls (a test counts the candles that come).
    """
    async with BybitEmulator(balances={"USDT": "100000", "BTC": "1"}) as server:
        await server.advance(MINUTE_MS - server.clock.now_ms() % MINUTE_MS + 500)
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange with fast retries and reconnects."""
    exchange = Exchange(
        exchange_settings(emu, timeout_s=1.0), retry_attempts=4, retry_base_s=0.01, retry_cap_s=0.05
    )
    async with exchange:
        yield exchange


class Collector:
    """Drain an async iterator into a list in the background."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self._task = asyncio.ensure_future(self._run(stream))

    async def _run(self, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                self.items.append(item)
        except Exception as e:  # surfaced by the test
            self.error = e

    @property
    def done(self) -> bool:
        return self._task.done()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait_for(self, count: int, within: float = 5.0) -> list[Any]:
        await eventually(lambda: len(self.items) >= count or self.error is not None, timeout=within)
        if self.error is not None:
            raise self.error
        return self.items


async def _subscribed(
    emu: BybitEmulator, topic: str, count: int = 1, kind: str | None = None
) -> None:
    await eventually(lambda: emu.subscribers(topic, kind) >= count)


def _expected(
    emu: BybitEmulator, symbol: str, category: str, starts: list[int]
) -> list[tuple[int, float]]:
    return [(s, float(emu.candle(symbol, category, "1", s).close)) for s in starts]


async def test_watch_candles_yields_each_closed_candle_in_order(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Spot and linear candles arrive once each, in order, equal to the exchange's bars."""
    start = bucket_start(emu.clock.now_ms(), 1)
    feed = Collector(ex.watch_candles(["BTC/USDT", "BTC/USDT:USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT", 2)
    await emu.advance(minutes=3)
    items: list[Candle] = await feed.wait_for(6)
    await feed.stop()
    starts = [start + k * MINUTE_MS for k in range(3)]
    for pair, symbol, category in (
        ("BTC/USDT", "BTCUSDT", "spot"),
        ("BTC/USDT:USDT", "BTCUSDT", "linear"),
    ):
        got = [(c.ts, c.close) for c in items if c.pair == pair]
        assert got == _expected(emu, symbol, category, starts)
    assert all(c.closed and c.timeframe == "1m" for c in items)


@pytest.mark.parametrize("abort", [False, True], ids=["closed", "cut"])
async def test_socket_drop_mid_stream_is_resubscribed_and_gap_filled(
    emu: BybitEmulator, ex: Exchange, abort: bool
) -> None:
    """A drop, silent minutes, a reconnect: the consumer sees an unbroken, duplicate-free run.

    The socket is closed by the exchange, or cut without a closing frame (`abort`).
    """
    start = bucket_start(emu.clock.now_ms(), 1)
    feed = Collector(ex.watch_candles(["BTC/USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    await emu.advance(minutes=2)
    await feed.wait_for(2)
    emu.ws_blocked = True  # the reconnect fails until the socket comes back
    assert await emu.drop_sockets(abort=abort) == 1
    kline_calls = len(emu.requests_to("/v5/market/kline"))
    await emu.advance(minutes=4)  # four candles close while we are away
    await asyncio.sleep(0.1)
    emu.ws_blocked = False
    await _subscribed(emu, "kline.1.BTCUSDT")
    await emu.advance(minutes=1)
    items = await feed.wait_for(7)
    await asyncio.sleep(0.1)  # nothing more may come
    await feed.stop()
    starts = [c.ts for c in feed.items]
    assert starts == [start + k * MINUTE_MS for k in range(7)]
    assert [(c.ts, c.close) for c in items] == _expected(emu, "BTCUSDT", "spot", starts)
    subscribes = [
        m
        for m in emu.ws_messages_in
        if m.get("op") == "subscribe" and "kline.1.BTCUSDT" in m.get("args", [])
    ]
    assert len(subscribes) == 2
    assert len(emu.requests_to("/v5/market/kline")) > kline_calls  # the gap came from REST


async def test_missed_frame_is_filled_from_rest_and_repeats_are_dropped(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A skipped candle is fetched before the newer one; a repeated frame is not yielded twice."""
    now = emu.clock.now_ms()
    base = bucket_start(now, 1) - 10 * MINUTE_MS
    feed = Collector(ex.watch_candles(["ETH/USDT:USDT"], "1m"))
    await _subscribed(emu, "kline.1.ETHUSDT")
    await emu.push_kline("ETHUSDT", "linear", start=base)
    await feed.wait_for(1)
    await emu.push_kline("ETHUSDT", "linear", start=base)  # repeat
    await emu.push_kline("ETHUSDT", "linear", start=base + 3 * MINUTE_MS)  # two missed
    await feed.wait_for(4)
    await asyncio.sleep(0.05)
    await feed.stop()
    assert [c.ts for c in feed.items] == [base + k * MINUTE_MS for k in range(4)]


async def test_watch_candles_since_backfills_then_goes_live(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """With `since`, older closed candles come from REST first, then the live ones follow."""
    now = emu.clock.now_ms()
    since = bucket_start(now, 1) - 5 * MINUTE_MS
    feed = Collector(ex.watch_candles(["BTC/USDT"], "1m", since=since))
    await feed.wait_for(5)
    await _subscribed(emu, "kline.1.BTCUSDT")
    await emu.advance(minutes=2)
    await feed.wait_for(7)
    await feed.stop()
    assert [c.ts for c in feed.items] == [since + k * MINUTE_MS for k in range(7)]


async def test_watch_tickers_spot_and_linear(emu: BybitEmulator, ex: Exchange) -> None:
    """Snapshots on subscribe, then pushed updates, for both categories."""
    feed = Collector(ex.watch_tickers(["BTC/USDT", "ETH/USDT:USDT"]))
    first = await feed.wait_for(2)
    assert {t.pair for t in first} == {"BTC/USDT", "ETH/USDT:USDT"}
    await emu.push_ticker(
        "ETHUSDT", "linear", lastPrice="1234.5", bid1Price="1234.4", ask1Price="1234.6"
    )
    items = await feed.wait_for(3)
    await feed.stop()
    last = items[-1]
    assert (last.pair, last.last, last.bid, last.ask) == ("ETH/USDT:USDT", 1234.5, 1234.4, 1234.6)


async def test_a_burst_of_tickers_ends_on_the_latest_state(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """After each burst of frames, the last ticker seen is the last one sent, not a stale one."""
    feed = Collector(ex.watch_tickers(["XRP/USDT"]))
    await feed.wait_for(1)
    price = 0
    for size in range(2, 10):  # some burst ends while the consumer is between two awaits
        frames = []
        for _ in range(size):
            price += 1
            data = {"symbol": "XRPUSDT", "lastPrice": f"0.{price:04d}", "usdIndexPrice": "0.5"}
            frames.append(
                {"topic": "tickers.XRPUSDT", "type": "snapshot", "ts": price, "data": data}
            )
        await emu.push_burst("spot", "tickers.XRPUSDT", frames)

        def caught_up(p: int = price) -> bool:
            return bool(feed.items[-1].last == p / 10_000)

        await eventually(caught_up, timeout=2.0)
    await feed.stop()


async def test_watch_order_book_snapshot_then_delta(emu: BybitEmulator, ex: Exchange) -> None:
    """The book is the snapshot, then the snapshot with the delta applied."""
    feed = Collector(ex.watch_order_book("BTC/USDT:USDT", limit=5))
    first = (await feed.wait_for(1))[0]
    best_bid = first.bids[0][0]
    await emu.push_orderbook(
        "BTCUSDT", "linear", snapshot=False, bids=[[str(best_bid), "0"]], asks=[["1.0", "0"]]
    )
    items = await feed.wait_for(2)
    await feed.stop()
    assert len(first.bids) == 5
    assert items[1].bids[0][0] < best_bid  # the best bid was deleted by the delta
    assert items[1].asks == first.asks


async def test_watch_trades(emu: BybitEmulator, ex: Exchange) -> None:
    """Public trades pushed on the socket arrive as Trades."""
    feed = Collector(ex.watch_trades(["SOL/USDT"]))
    await _subscribed(emu, "publicTrade.SOLUSDT")
    await emu.push_trade("SOLUSDT", "spot", price="14.01", qty="3.5", side="Sell")
    trade = (await feed.wait_for(1))[0]
    await feed.stop()
    assert (trade.pair, trade.price, trade.qty, trade.side) == ("SOL/USDT", 14.01, 3.5, Side.SELL)


async def _private_feeds(emu: BybitEmulator, ex: Exchange) -> dict[str, Collector]:
    feeds = {
        "orders": Collector(ex.watch_orders()),
        "fills": Collector(ex.watch_fills()),
        "positions": Collector(ex.watch_positions()),
        "balance": Collector(ex.watch_balance()),
    }
    for topic in ("order", "execution", "position", "wallet"):
        await _subscribed(emu, topic, kind="private")
    return feeds


async def test_private_streams_follow_an_order(emu: BybitEmulator, ex: Exchange) -> None:
    """A filled linear order shows up on the order, fill, position and wallet streams."""
    feeds = await _private_feeds(emu, ex)
    intent = OrderIntent("BTC/USDT:USDT", Side.BUY, Decimal("0.01"), OrderType.MARKET, "ws-1", "t")
    order = await ex.create_order(intent)
    orders = await feeds["orders"].wait_for(1)
    fills = await feeds["fills"].wait_for(1)
    positions = await feeds["positions"].wait_for(1)
    balances = await feeds["balance"].wait_for(1)
    for feed in feeds.values():
        await feed.stop()
    assert (orders[-1].client_order_id, orders[-1].status) == ("ws-1", order.status)
    assert (fills[0].client_order_id, fills[0].qty, fills[0].pair) == (
        "ws-1",
        Decimal("0.01"),
        "BTC/USDT:USDT",
    )
    assert (positions[-1].pair, positions[-1].side, positions[-1].qty) == (
        "BTC/USDT:USDT",
        PositionSide.LONG,
        Decimal("0.01"),
    )
    assert balances[-1]["USDT"].total < Decimal("100000")
    auth = [m for m in emu.ws_messages_in if m.get("op") == "auth"]
    assert len(auth) == 1  # one private socket, authenticated once


async def test_fills_missed_during_a_drop_arrive_once_after_reconnect(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Executions that happen while the private socket is down are fetched from REST, once."""
    feeds = {"fills": Collector(ex.watch_fills())}
    await _subscribed(emu, "execution", kind="private")
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.MARKET, "f-1", "t")
    )
    await feeds["fills"].wait_for(1)
    emu.ws_blocked = True
    await emu.drop_sockets("private")
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.SELL, Decimal("0.001"), OrderType.MARKET, "f-2", "t")
    )
    emu.ws_blocked = False
    await _subscribed(emu, "execution", kind="private")
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.MARKET, "f-3", "t")
    )
    items = await feeds["fills"].wait_for(3)
    await asyncio.sleep(0.1)
    await feeds["fills"].stop()
    assert [f.client_order_id for f in items] == ["f-1", "f-2", "f-3"]


async def test_fill_before_the_subscription_arrives_once_by_the_rest_sweep(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A fill no socket delivered (it landed before the subscription) comes from a sweep."""
    since = ex.server_now_ms() - 1000
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.MARKET, "early-1", "t")
    )
    feeds = {"fills": Collector(ex.watch_fills(since=since, poll_s=0.2))}
    await _subscribed(emu, "execution", kind="private")
    items = await feeds["fills"].wait_for(1)
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.SELL, Decimal("0.001"), OrderType.MARKET, "late-2", "t")
    )
    await feeds["fills"].wait_for(2)
    await asyncio.sleep(0.6)  # several more sweeps: each fill still arrives once
    await feeds["fills"].stop()
    assert [f.client_order_id for f in items] == ["early-1", "late-2"]


async def test_private_streams_are_ready_once_the_exchange_acknowledged_them(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A slow exchange: ready means subscribed there, so the next fill comes on the socket."""
    emu.subscribe_delay_s = 0.8  # each subscribe takes effect (and is acknowledged) late
    feeds = {"orders": Collector(ex.watch_orders()), "fills": Collector(ex.watch_fills())}
    assert await ex.wait_private_streams(timeout=5.0)
    subscribed = (emu.subscribers("order", "private"), emu.subscribers("execution", "private"))
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.MARKET, "ready-1", "t")
    )
    fills = await feeds["fills"].wait_for(1)  # no REST sweep: only the socket delivers
    for feed in feeds.values():
        await feed.stop()
    assert subscribed == (1, 1)
    assert [f.client_order_id for f in fills] == ["ready-1"]


async def test_private_streams_never_acknowledged_are_not_ready(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Subscribe requests sent but not acknowledged within the timeout: not ready, logged."""
    emu.subscribe_delay_s = 2.0
    feeds = [Collector(ex.watch_orders()), Collector(ex.watch_fills())]
    await eventually(lambda: len(_private_subscribes(emu)) >= 2)  # both requests are out
    with structlog.testing.capture_logs() as logs:
        ready = await ex.wait_private_streams(timeout=0.3)
    for feed in feeds:
        await feed.stop()
    assert not ready
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "private_streams_not_ready"
    ]


def _private_subscribes(emu: BybitEmulator) -> list[dict[str, Any]]:
    return [m for m in emu.ws_messages_in if m.get("op") == "subscribe" and m["_kind"] == "private"]


async def test_without_polling_a_fill_before_the_subscription_is_not_reported(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """The control: the socket alone never reports the early fill (what the sweep is for)."""
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.MARKET, "early-1", "t")
    )
    feeds = {"fills": Collector(ex.watch_fills())}
    await _subscribed(emu, "execution", kind="private")
    await ex.create_order(
        OrderIntent("BTC/USDT", Side.SELL, Decimal("0.001"), OrderType.MARKET, "late-2", "t")
    )
    items = await feeds["fills"].wait_for(1)
    await asyncio.sleep(0.3)
    await feeds["fills"].stop()
    assert [f.client_order_id for f in items] == ["late-2"]


async def test_streams_end_quietly_when_the_exchange_closes(emu: BybitEmulator) -> None:
    """Closing the exchange ends a pending stream instead of leaking a CancelledError."""
    exchange = Exchange(exchange_settings(emu), retry_attempts=2, retry_base_s=0.01)
    await exchange.open()
    feed = Collector(exchange.watch_candles(["BTC/USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    await exchange.close()
    await eventually(lambda: feed.done)
    assert feed.error is None
    assert feed.items == []


async def _first(stream: AsyncIterator[T], predicate: Callable[[T], bool]) -> T:
    async for item in stream:
        if predicate(item):
            return item
    raise AssertionError("stream ended")


async def test_linear_ticker_deltas_merge(emu: BybitEmulator, ex: Exchange) -> None:
    """A linear tickers delta updates only the fields it carries."""
    stream = ex.watch_tickers(["BTC/USDT:USDT"])
    first = await anext(stream)
    topic = "tickers.BTCUSDT"
    await emu.push_raw(
        "linear",
        topic,
        '{"topic":"tickers.BTCUSDT","type":"delta","ts":1,"data":{"symbol":"BTCUSDT","bid1Price":"1.5"}}',
    )
    merged = await _first(stream, lambda t: t.bid == 1.5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert merged.last == first.last
    assert merged.ask == first.ask


async def test_private_stream_with_a_wrong_secret_fails_fatally(emu: BybitEmulator) -> None:
    """A refused WebSocket login surfaces as AuthenticationError, not endless reconnects."""
    settings = exchange_settings(emu, api_secret="not-the-secret")
    async with Exchange(settings, retry_attempts=2, retry_base_s=0.01) as exchange:
        with pytest.raises(AuthenticationError):
            await anext(exchange.watch_balance())
    auth = [m for m in emu.ws_messages_in if m.get("op") == "auth"]
    assert len(auth) == 1


async def _two_pairs_converted_by(
    convert: Callable[..., Any], emu: BybitEmulator, ex: Exchange, mp: pytest.MonkeyPatch
) -> tuple[int, Collector]:
    # A spot and a linear pair's candle stream, subscribed, its watch results converted by
    # `convert` (which wraps the cursor's own); the first candle's open time and the feed.
    import bybit_streams

    mp.setattr(bybit_streams._CandleCursor, "convert", convert)
    start = bucket_start(emu.clock.now_ms(), 1)
    feed = Collector(ex.watch_candles(["BTC/USDT", "ETH/USDT:USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    await _subscribed(emu, "kline.1.ETHUSDT")
    return start, feed


async def test_a_closed_kline_is_taken_in_the_read_that_brought_it(
    emu: BybitEmulator, ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's kline tap yields a frame's next candle; the watch's way only finds it taken.

    Here the watch's own conversion is held back once it has taken each pair's first
    candle: the later closed candles still come, once and in order, through the tap, and
    the tap is gone once the stream ends.
    """
    import bybit_streams

    held = asyncio.Event()
    original = bybit_streams._CandleCursor.convert

    async def stalled(self: Any, rows: list[list[Any]]) -> list[Candle]:
        if self.last is not None:  # after the pair's first frame: held until let go
            await held.wait()
        return await original(self, rows)

    start, feed = await _two_pairs_converted_by(stalled, emu, ex, monkeypatch)
    client = ex._ensure_open()
    assert set(client.kestrel_kline_taps) == {("BTC/USDT", "1m"), ("ETH/USDT:USDT", "1m")}
    await emu.advance(minutes=1)
    await feed.wait_for(2)  # the watch's way: each pair's first frame
    await emu.advance(minutes=3)
    items = await feed.wait_for(8)  # the tap's: the watch's way is held
    held.set()  # the watch's results now convert: all of them were taken already
    await emu.advance(minutes=1)
    await feed.wait_for(10)
    await asyncio.sleep(0.1)
    await feed.stop()
    by_pair = {
        pair: [c.ts for c in items if c.pair == pair] for pair in ("BTC/USDT", "ETH/USDT:USDT")
    }
    assert by_pair == {pair: [start + k * MINUTE_MS for k in range(5)] for pair in by_pair}
    assert client.kestrel_kline_taps == {}


async def test_the_sockets_carry_frames_uncompressed(emu: BybitEmulator, ex: Exchange) -> None:
    """The client offers no permessage-deflate, so no frame is inflated in our loop (the
    emulator's server, like aiohttp's, accepts the offer when ccxt makes it)."""
    feed = Collector(ex.watch_candles(["BTC/USDT", "BTC/USDT:USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT", 2)
    await feed.stop()
    assert emu.deflated_sockets() == (0, 2)


async def test_frames_the_tap_settles_never_wake_the_watch(
    emu: BybitEmulator, ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the watch has delivered a pair's first frame, the tap settles the frames that
    follow in order (closing and forming): ccxt does not handle them, so the watch returns
    nothing more, and every candle still comes once, in order.

    After a lost socket the frames go the watch's way again until it has delivered: the
    stream logs its resumption and resynchronises, and the tap settles again after that.
    """
    import bybit_streams

    returns: list[str] = []  # one per watch result the stream converts
    original = bybit_streams._CandleCursor.convert

    async def counted(self: Any, rows: list[list[Any]]) -> list[Candle]:
        returns.append(self.pair)
        return await original(self, rows)

    start, feed = await _two_pairs_converted_by(counted, emu, ex, monkeypatch)
    await emu.advance(minutes=1)
    await feed.wait_for(2)
    first = len(returns)
    assert sorted(set(returns)) == ["BTC/USDT", "ETH/USDT:USDT"]
    await emu.advance(minutes=4)
    await feed.wait_for(10)
    await asyncio.sleep(0.1)
    assert len(returns) == first  # eight closing frames and their forming ones: none
    with structlog.testing.capture_logs() as logs:
        assert await emu.drop_sockets() >= 1
        await _subscribed(emu, "kline.1.BTCUSDT")
        await _subscribed(emu, "kline.1.ETHUSDT")
        await emu.advance(minutes=1)
        await feed.wait_for(12)
        await eventually(lambda: sum(e["event"] == "stream_resumed" for e in logs) == 2)
    again = len(returns)
    assert again > first  # the watch delivered after the loss
    await emu.advance(minutes=2)
    await feed.wait_for(16)
    await asyncio.sleep(0.1)
    await feed.stop()
    assert len(returns) == again  # and the tap settles again
    by_pair = {p: [c.ts for c in feed.items if c.pair == p] for p in ("BTC/USDT", "ETH/USDT:USDT")}
    assert by_pair == {p: [start + k * MINUTE_MS for k in range(8)] for p in by_pair}


class _History:
    """A REST history for the candle cursor: every closed candle, at its own close price.

    `now` is the server's clock; `during`, when set, runs while a fetch is in flight (a
    frame read meanwhile).
    """

    now = 0
    during: Callable[[], None] | None = None

    async def fetch_server_time(self) -> int:
        return self.now

    async def _fetch_closed(
        self,
        pair: str,
        timeframe: str,
        since: int | None,
        limit: int | None,
        until: int | None,
        *,
        now_ms: int,
    ) -> list[Candle]:
        await asyncio.sleep(0)  # a real fetch suspends: the taps run meanwhile
        if self.during is not None:
            self.during()
        step = MINUTE_MS
        first = since if since is not None else 0
        return [
            Candle(pair, timeframe, ts, 1.0, 1.0, 1.0, float(ts // step), 1.0)
            for ts in range(first, now_ms - now_ms % step, step)
        ]


# A frame: how many candles it moves on from the last frame (0: the same candle again, 2
# or more: a gap), whether it is the candle's closing frame, whether the tap sees it, and
# whether the watch returns it only with the next frame (ccxt returns what is new since the
# last call: a busy consumer gets several). A reconnect instead resynchronises over REST,
# after the watch has returned what it held.
_FRAMES = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 3), st.booleans(), st.booleans(), st.booleans()),
        st.just("reconnect"),
    ),
    min_size=1,
    max_size=40,
)


class _TappedCursor:
    """A candle cursor fed as the stream feeds it: its tap as frames are read, its watch."""

    def __init__(
        self, frames: list[tuple[int, bool, bool, bool] | str], rows: list[list[Any] | None]
    ) -> None:
        from bybit_streams import _CandleCursor

        self.frames, self.rows = frames, rows
        self.history = _History()
        self.cursor = _CandleCursor(self.history, "BTC/USDT", "1m", MINUTE_MS, None)  # type: ignore[arg-type]
        self.merged: asyncio.Queue[tuple[bool | None, Any]] = asyncio.Queue(maxsize=1000)
        self.tap = self.cursor.tap(self.merged)
        self.out: list[int] = []
        self.read: set[int] = set()  # frames the tap has seen
        self.settled: set[int] = set()  # frames it settled: ccxt never handles them

    def drain(self) -> None:
        while not self.merged.empty():
            self.out.append(self.merged.get_nowait()[1].ts)

    def read_by_tap(self, k: int) -> None:
        self.read.add(k)
        row = self.rows[k]
        assert row is not None
        if self.tap([row]):
            self.settled.add(k)
        self.drain()

    def tapped(self, k: int) -> bool:
        frame = self.frames[k] if k < len(self.frames) else None
        return isinstance(frame, tuple) and frame[2] and k not in self.read

    async def run(self, with_tap: bool) -> list[int]:
        history, cursor, rows = self.history, self.cursor, self.rows
        waiting: list[list[Any]] = []  # frames the watch returns with the next one
        for k, row in enumerate(rows):
            if row is not None:
                history.now = max(history.now, row[0])  # the frame's candle is current
                if with_tap and self.tapped(k):
                    self.read_by_tap(k)
                if k not in self.settled:  # the watch returns what ccxt handled
                    waiting.append(row)
            # The next frame arrives while this one's REST fetch, if any, is in flight.
            after = with_tap and self.tapped(k + 1)
            history.during = functools.partial(self.read_by_tap, k + 1) if after else None
            frame = self.frames[k]
            if waiting and (not (isinstance(frame, tuple) and frame[3]) or k + 1 == len(rows)):
                self.out.extend(c.ts for c in await cursor.convert(waiting))
                waiting = []
            if row is None:  # a reconnect: what closed meanwhile comes over REST
                history.now += MINUTE_MS
                self.out.extend(c.ts for c in await cursor.resync())
            self.drain()
        return self.out


@given(frames=_FRAMES)
@settings(max_examples=200, deadline=None)
def test_the_tap_and_the_watch_yield_what_the_watch_alone_yields(
    frames: list[tuple[int, bool, bool, bool] | str],
) -> None:
    """Frames taken by the tap as they are read, then by the watch (or by the watch alone,
    when it asks), give each closed candle once, in order, as the watch's way alone does.
    A frame the tap settles never reaches the watch (ccxt does not handle it).

    A frame read while a REST fetch is in flight (a gap's, a reconnect's) is tapped then.
    Either way the candles run on without a hole, and every closing frame's candle is in.
    """
    ts = 100 * MINUTE_MS
    rows: list[list[Any] | None] = []  # each frame's row, None for a reconnect
    for frame in frames:
        if isinstance(frame, tuple):
            ts += frame[0] * MINUTE_MS
            rows.append([ts, 1.0, 1.0, 1.0, float(ts // MINUTE_MS), 1.0, frame[1]])
        else:
            rows.append(None)
    alone = asyncio.run(_TappedCursor(frames, rows).run(with_tap=False))
    together = asyncio.run(_TappedCursor(frames, rows).run(with_tap=True))
    assert together == alone
    if together:
        first = together[0]
        assert together == list(range(first, first + MINUTE_MS * len(together), MINUTE_MS))
    closing = {row[0] for row in rows if row is not None and row[6]}
    assert closing <= set(together)


async def test_a_stream_that_ends_leaves_a_later_streams_tap_in_place(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Two streams of one market: the later one's tap stays when the earlier one ends."""
    first = Collector(ex.watch_candles(["BTC/USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    client = ex._ensure_open()
    await eventually(lambda: ("BTC/USDT", "1m") in client.kestrel_kline_taps)
    earlier = client.kestrel_kline_taps[("BTC/USDT", "1m")]
    second = Collector(ex.watch_candles(["BTC/USDT"], "1m"))
    await eventually(lambda: client.kestrel_kline_taps.get(("BTC/USDT", "1m")) is not earlier)
    later = client.kestrel_kline_taps[("BTC/USDT", "1m")]
    await first.stop()
    assert client.kestrel_kline_taps == {("BTC/USDT", "1m"): later}
    await second.stop()
    assert client.kestrel_kline_taps == {}


async def test_a_failing_kline_tap_is_dropped_and_the_watch_delivers(
    emu: BybitEmulator, ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap that raises never reaches ccxt's reading of the socket: it is dropped, the
    candles come the watch's way, once and in order, and the socket stays up."""
    import bybit_streams

    calls: list[int] = []

    def broken(self: Any, merged: Any) -> Callable[[list[list[Any]]], bool]:
        def take(rows: list[list[Any]]) -> bool:
            calls.append(len(rows))
            raise RuntimeError("a bug in the tap")

        return take

    monkeypatch.setattr(bybit_streams._CandleCursor, "tap", broken)
    start = bucket_start(emu.clock.now_ms(), 1)
    feed = Collector(ex.watch_candles(["BTC/USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    client = ex._ensure_open()
    await emu.advance(minutes=3)
    await feed.wait_for(3)
    await asyncio.sleep(0.1)
    await feed.stop()
    assert calls == [1]  # tried once, then dropped
    assert client.kestrel_kline_taps == {}
    assert [c.ts for c in feed.items] == [start + k * MINUTE_MS for k in range(3)]
    subscribes = [m for m in emu.ws_messages_in if m.get("op") == "subscribe"]
    assert len(subscribes) == 1  # no reconnect


async def test_a_frame_that_fails_to_be_handled_is_logged_and_the_socket_read_on(
    emu: BybitEmulator, ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame whose handling raises (a bug in a handler) is logged and dropped, and the
    socket's next frames are still read: the candles keep coming, once and in order (the
    dropped frame's candle from REST), on the same socket. ccxt's own loop stopped reading
    the socket at such a frame, until its keepalive gave up on it."""
    import bybit_client

    original = bybit_client.KestrelBybit.handle_ohlcv
    closed_frames: list[int] = []

    def flaky(self: Any, client: Any, message: Any) -> None:
        if any(item.get("confirm") is True for item in message.get("data", [])):
            closed_frames.append(1)
            if len(closed_frames) == 2:
                raise RuntimeError("a bug in a handler")
        original(self, client, message)

    monkeypatch.setattr(bybit_client.KestrelBybit, "handle_ohlcv", flaky)
    start = bucket_start(emu.clock.now_ms(), 1)
    feed = Collector(ex.watch_candles(["BTC/USDT"], "1m"))
    await _subscribed(emu, "kline.1.BTCUSDT")
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            await emu.advance(minutes=1)
            await asyncio.sleep(0.05)
        await feed.wait_for(4)
    await asyncio.sleep(0.1)
    await feed.stop()
    assert len(closed_frames) >= 4  # the frames after the failed one were read
    assert [e["event"] for e in logs].count("ws_frame_failed") == 1
    assert [c.ts for c in feed.items] == [start + k * MINUTE_MS for k in range(4)]
    subscribes = [m for m in emu.ws_messages_in if m.get("op") == "subscribe"]
    assert len(subscribes) == 1  # the same socket throughout
