"""Exchange REST: markets, market data, account, clock and budgets against the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import ExchangeSettings
from error_handler import ExchangeUnavailableError, InvariantError, OrderRejected
from exchange import ClientState, Exchange, bybit_client_class
from models import MarketType, OrderIntent, OrderType, PositionSide, Side
from tests.bybit_emulator import MINUTE_MS, BybitEmulator, exchange_settings
from utils.utilities import redact


def _client_state(exchange: Exchange) -> ClientState:
    """The client's lifecycle state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return exchange.state


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator."""
    async with BybitEmulator() as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator with fast retries."""
    async with Exchange(
        exchange_settings(emu), retry_attempts=3, retry_base_s=0.01, retry_cap_s=0.05
    ) as exchange:
        yield exchange


PAIRS = pytest.mark.parametrize(
    ("pair", "category", "symbol"),
    [("BTC/USDT", "spot", "BTCUSDT"), ("BTC/USDT:USDT", "linear", "BTCUSDT")],
)


async def test_open_loads_spot_and_linear_rules_without_private_calls(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Opening loads both categories with Bybit's filters and makes no private request."""
    spot, perp = ex.market("BTC/USDT"), ex.market("BTC/USDT:USDT")
    assert (spot.type, spot.tick_size, spot.lot_size) == (
        MarketType.SPOT,
        Decimal("0.01"),
        Decimal("0.000001"),
    )
    assert (spot.min_qty, spot.min_notional, spot.max_leverage) == (
        Decimal("0.000048"),
        Decimal("1"),
        Decimal(1),
    )
    assert (perp.type, perp.tick_size, perp.lot_size) == (
        MarketType.LINEAR,
        Decimal("0.10"),
        Decimal("0.001"),
    )
    assert (perp.min_notional, perp.max_leverage, perp.max_qty) == (
        Decimal("5"),
        Decimal(100),
        Decimal("1190"),
    )
    assert set(ex.markets) >= {"ETH/USDT", "SOL/USDT:USDT", "XRP/USDT"}
    paths = [r.path for r in emu.requests]
    assert paths.count("/v5/market/instruments-info") == 3
    assert all(p.startswith("/v5/market/") for p in paths)
    assert ex.state is ClientState.OPENED


async def test_client_state_guard(emu: BybitEmulator) -> None:
    """Methods refuse before open and after close; an exchange opens only once."""
    exchange = Exchange(exchange_settings(emu))
    with pytest.raises(InvariantError, match="unopened"):
        await exchange.fetch_ticker("BTC/USDT")
    async with exchange:
        assert exchange.state is ClientState.OPENED
    assert _client_state(exchange) is ClientState.CLOSED
    with pytest.raises(InvariantError, match="closed"):
        await exchange.fetch_balance()
    with pytest.raises(InvariantError, match="cannot open"):
        await exchange.open()


def _recording_client(urls: list[str]) -> type:
    import ccxt

    class Recording(bybit_client_class()):  # type: ignore[misc]
        async def fetch(
            self, url: str, method: str = "GET", headers: Any = None, body: Any = None
        ) -> Any:
            urls.append(url)
            raise ccxt.ExchangeNotAvailable(f"offline test: {url}")

    return Recording


@pytest.mark.parametrize(
    ("settings", "host"),
    [
        ({}, "https://api-testnet.bybit.com/"),
        ({"testnet": False, "allow_mainnet": True}, "https://api.bybit.com/"),
    ],
)
async def test_testnet_by_default_mainnet_only_on_opt_in(
    settings: dict[str, Any], host: str
) -> None:
    """Without a base URL the first request goes to Bybit testnet, or mainnet when opted in."""
    urls: list[str] = []
    exchange = Exchange(
        ExchangeSettings(**settings), retry_attempts=1, client_class=_recording_client(urls)
    )
    with pytest.raises(ExchangeUnavailableError):
        await exchange.open()
    assert urls == [f"{host}v5/market/time"]
    assert exchange.state is ClientState.CLOSED


def test_mainnet_without_opt_in_is_refused() -> None:
    """Settings refuse mainnet unless explicitly allowed."""
    with pytest.raises(ValueError, match="opt-in"):
        ExchangeSettings(testnet=False)


@PAIRS
async def test_fetch_ticker_matches_the_exchange(
    emu: BybitEmulator, ex: Exchange, pair: str, category: str, symbol: str
) -> None:
    """A ticker carries last, bid and ask as the exchange quotes them."""
    ticker = await ex.fetch_ticker(pair)
    last = emu.last_price(symbol, category)
    tick = ex.market(pair).tick_size
    assert ticker.pair == pair
    assert ticker.last == float(last)
    assert ticker.bid == float(last - tick)
    assert ticker.ask == float(last + tick)
    assert ticker.quote_volume_24h is not None
    assert ticker.quote_volume_24h > 0
    assert emu.requests[-1].query == {"symbol": symbol, "category": category}


async def test_fetch_tickers_filters_and_covers_both_categories(ex: Exchange) -> None:
    """fetch_tickers returns exactly the asked pairs, or every listed pair."""
    some = await ex.fetch_tickers(["ETH/USDT", "SOL/USDT:USDT"])
    assert set(some) == {"ETH/USDT", "SOL/USDT:USDT"}
    every = await ex.fetch_tickers()
    assert set(every) == set(ex.markets)


@PAIRS
async def test_fetch_order_book_sorted_best_first(
    ex: Exchange, pair: str, category: str, symbol: str
) -> None:
    """Bids fall, asks rise, the spread is positive and the depth is what was asked."""
    book = await ex.fetch_order_book(pair, limit=5)
    assert len(book.bids) == len(book.asks) == 5
    assert [p for p, _ in book.bids] == sorted((p for p, _ in book.bids), reverse=True)
    assert [p for p, _ in book.asks] == sorted(p for p, _ in book.asks)
    assert book.best_bid is not None
    assert book.best_ask is not None
    assert book.best_bid < book.best_ask


@PAIRS
async def test_fetch_ohlcv_returns_closed_candles_equal_to_the_exchange(
    emu: BybitEmulator, ex: Exchange, pair: str, category: str, symbol: str
) -> None:
    """The latest candles are closed (the forming one is left out) and match the served bars."""
    before = emu.clock.now_ms()
    candles = await ex.fetch_ohlcv(pair, "1m", limit=5)
    assert len(candles) == 5
    newest_closed = before - before % MINUTE_MS - MINUTE_MS
    assert candles[-1].ts >= newest_closed
    assert candles[-1].ts + MINUTE_MS <= emu.clock.now_ms()
    assert [c.ts for c in candles] == list(range(candles[0].ts, candles[-1].ts + 1, MINUTE_MS))
    for candle in candles:
        bar = emu.candle(symbol, category, "1", candle.ts)
        assert (candle.open, candle.high, candle.low, candle.close, candle.volume) == (
            float(bar.open),
            float(bar.high),
            float(bar.low),
            float(bar.close),
            float(bar.volume),
        )
        assert candle.closed


async def test_fetch_ohlcv_paginates_since_until_in_bounded_pages(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """2,500 minutes come in 1,000-candle pages, contiguous, without duplicates, up to until."""
    now = emu.clock.now_ms()
    since = now - now % MINUTE_MS - 2600 * MINUTE_MS + 1  # rounds up to the next minute
    until = since - 1 + 2500 * MINUTE_MS
    before = len(emu.requests_to("/v5/market/kline"))
    candles = await ex.fetch_ohlcv("BTC/USDT:USDT", "1m", since=since, until=until)
    assert len(candles) == 2500
    assert candles[0].ts == since - 1 + MINUTE_MS
    assert candles[-1].ts == until - until % MINUTE_MS
    assert len({c.ts for c in candles}) == 2500
    pages = emu.requests_to("/v5/market/kline")[before:]
    assert len(pages) == 3
    for page in pages:
        span = int(page.query["end"]) - int(page.query["start"])
        assert span < 1000 * MINUTE_MS
        assert page.query["limit"] == "1000"


@pytest.mark.parametrize(("timeframe", "interval", "minutes"), [("5m", "5", 5), ("1h", "60", 60)])
async def test_fetch_ohlcv_higher_timeframes(
    emu: BybitEmulator, ex: Exchange, timeframe: str, interval: str, minutes: int
) -> None:
    """Aggregated timeframes come back closed and equal to the exchange's bars."""
    candles = await ex.fetch_ohlcv("BTC/USDT", timeframe, limit=3)
    step = minutes * MINUTE_MS
    assert [c.ts % step for c in candles] == [0, 0, 0]
    assert candles[-1].ts + step <= emu.clock.now_ms()
    bar = emu.candle("BTCUSDT", "spot", interval, candles[0].ts)
    assert candles[0].close == float(bar.close)
    assert emu.requests[-1].query["interval"] == interval


@PAIRS
async def test_fetch_trades(ex: Exchange, pair: str, category: str, symbol: str) -> None:
    """Public trades come back oldest first with positive price and size."""
    trades = await ex.fetch_trades(pair, limit=5)
    assert len(trades) == 5
    assert [t.ts for t in trades] == sorted(t.ts for t in trades)
    assert all(t.pair == pair and t.price > 0 and t.qty > 0 for t in trades)


async def test_fetch_balance_unified_account(emu: BybitEmulator, ex: Exchange) -> None:
    """The unified wallet comes back as Decimal balances per coin."""
    balances = await ex.fetch_balance()
    assert balances["USDT"].total == Decimal("10000")
    assert balances["USDT"].free == Decimal("10000")
    assert emu.requests[-1].query == {"accountType": "UNIFIED"}


async def test_fetch_positions_after_a_linear_fill(emu: BybitEmulator, ex: Exchange) -> None:
    """A filled linear buy shows up as a long position; spot pairs have none."""
    assert await ex.fetch_positions() == []
    await ex.create_order(
        OrderIntent("BTC/USDT:USDT", Side.BUY, Decimal("0.02"), OrderType.MARKET, "pos-1", "t")
    )
    positions = await ex.fetch_positions()
    assert len(positions) == 1
    position = positions[0]
    assert (position.pair, position.side, position.qty) == (
        "BTC/USDT:USDT",
        PositionSide.LONG,
        Decimal("0.02"),
    )
    assert position.entry_price == emu.last_price("BTCUSDT", "linear") + Decimal("0.1")
    assert await ex.fetch_positions(["BTC/USDT:USDT"]) == positions
    assert await ex.fetch_positions(["BTC/USDT"]) == []


async def test_set_leverage_once_and_unchanged_is_fine(emu: BybitEmulator, ex: Exchange) -> None:
    """Setting the same leverage twice succeeds (110043 is no error); spot is refused locally."""
    await ex.set_leverage("BTC/USDT:USDT", 5)
    await ex.set_leverage("BTC/USDT:USDT", 5)
    sent = emu.requests_to("/v5/position/set-leverage")
    assert [r.ret_code for r in sent] == [0, 110043]
    assert sent[0].body == {
        "symbol": "BTCUSDT",
        "buyLeverage": "5",
        "sellLeverage": "5",
        "category": "linear",
    }
    with pytest.raises(OrderRejected):
        await ex.set_leverage("BTC/USDT", 2)
    with pytest.raises(OrderRejected):
        await ex.set_leverage("BTC/USDT:USDT", 101)
    assert len(emu.requests_to("/v5/position/set-leverage")) == 2


async def test_clock_offset_is_measured_and_fixes_signing(emu: BybitEmulator, ex: Exchange) -> None:
    """A server clock 20 s ahead is measured; private calls are re-signed and succeed."""
    await emu.advance(20_000)
    balances = await ex.fetch_balance()  # first attempt: 10002, resync, retry
    assert balances["USDT"].total == Decimal("10000")
    codes = [(r.path, r.ret_code) for r in emu.requests[-3:]]
    assert codes == [
        ("/v5/account/wallet-balance", 10002),
        ("/v5/market/time", 0),
        ("/v5/account/wallet-balance", 0),
    ]
    offset = await ex.check_clock_offset()
    assert 19_000 <= offset <= 21_000
    assert abs(ex.server_now_ms() - emu.clock.now_ms()) < 1_000


async def test_server_time(emu: BybitEmulator, ex: Exchange) -> None:
    """fetch_server_time returns the exchange's clock."""
    before = emu.clock.now_ms()
    server = await ex.fetch_server_time()
    assert before <= server <= emu.clock.now_ms()


async def test_rate_limit_budget_reports_spent_share(ex: Exchange) -> None:
    """Each endpoint class reports the free share of its window, shrinking as calls are made."""
    first = ex.rate_limit_budget()
    assert set(first) == {
        "ip",
        "order_linear",
        "order_spot",
        "amend_spot",
        "query",
        "position",
        "account",
    }
    for _ in range(4):
        await ex.fetch_balance()
    second = ex.rate_limit_budget()
    assert second["query"] < 1.0
    assert second["ip"] < first["ip"]
    assert all(0.0 <= v <= 1.0 for v in second.values())


async def test_api_secrets_are_registered_for_redaction(emu: BybitEmulator, ex: Exchange) -> None:
    """The key and secret never reach a log line: the redaction processor masks them."""
    line = redact(f"signing with {emu.api_key} and {emu.api_secret}")
    assert emu.api_key not in line
    assert emu.api_secret not in line


def test_importing_exchange_stays_light() -> None:
    """`import exchange` pulls in neither tensorflow nor (until first use) anything heavy."""
    import subprocess
    import sys

    code = "import sys, exchange; print('tensorflow' in sys.modules, 'ccxt' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.split() == ["False", "False"]
