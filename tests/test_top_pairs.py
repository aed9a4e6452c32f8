"""top_pairs: the ranking chain, filters, TTL cache on disk, fallback, diffs, point in time."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from config import PairsSettings
from data_manager import CandleStore, index_ms, load_candles
from error_handler import BotError, ExchangeUnavailableError, NetworkError
from models import Market, MarketType, OrderBook, Ticker
from top_pairs import (
    DepthFilter,
    PairListDiff,
    PointInTimeRanking,
    TopPairs,
    book_depth,
    is_leveraged_token,
    print_ranking,
    rank_pairs,
)
from utils.utilities import ReplayClock


ALTS = ("ADA", "DASH", "ETC", "ETH", "LTC", "NXT", "TRX", "XLM", "XMR", "ZEC")
XRP_BOOK = "orderbook/bybit_orderbook500_XRPUSDT_2024-12-01_first50msgs.jsonl.gz"


def market(pair: str, *, active: bool = True) -> Market:
    base, quote = pair.split("/")
    return Market(
        pair, pair.replace("/", ""), base, quote, MarketType.SPOT,
        Decimal("0.01"), Decimal("0.0001"), Decimal("0.0001"), Decimal(1), active=active,
    )  # fmt: skip


def xrp_snapshot(sample_dir: Path) -> OrderBook:
    """Return the real Bybit XRPUSDT ob500 snapshot from the sample."""
    with gzip.open(sample_dir / XRP_BOOK, "rt") as handle:
        message = json.loads(handle.readline())
    data = message["data"]
    bids = tuple((float(p), float(q)) for p, q in data["b"])
    asks = tuple((float(p), float(q)) for p, q in data["a"])
    return OrderBook("XRP/USDT", int(message["ts"]), bids, asks)


def btc_ticker(sample_dir: Path) -> Ticker:
    """Return a BTC/USDT ticker from the real sample: last quote bar, the day's quote volume."""
    quotes = pd.read_csv(sample_dir / "quotes" / "bybit_BTC-USDT_1m_quotebars.csv.gz")
    day = load_candles(sample_dir / "bybit_BTC-USDT_1m.csv.gz")
    last = quotes.iloc[-1]
    volume = float((day["close"] * day["volume"]).sum())
    return Ticker(
        "BTC/USDT", int(last["timestamp"]), float(last["bid_close"]), float(last["ask_close"]),
        float(day["close"].iloc[-1]), float(day["volume"].sum()), volume,
    )  # fmt: skip


def book_around(pair: str, mid: float, notional_per_side: float) -> OrderBook:
    """Return a ten-level book whose levels within 1% hold `notional_per_side` per side."""
    qty = notional_per_side / 10 / mid
    bids = tuple((mid * (1 - 0.0005 * (k + 1)), qty) for k in range(10))
    asks = tuple((mid * (1 + 0.0005 * (k + 1)), qty) for k in range(10))
    # Outside the 1% band: never counted.
    return OrderBook(pair, 0, (*bids, (mid * 0.9, 1e9)), (*asks, (mid * 1.1, 1e9)))


@dataclass
class FakeMarkets:
    """An in-memory exchange for the ranking: markets, tickers, books; can be made to fail."""

    markets: dict[str, Market]
    tickers: dict[str, Ticker]
    books: dict[str, OrderBook]
    error: BotError | None = None
    calls: list[str] = field(default_factory=list)

    async def load_markets(self) -> dict[str, Market]:
        self.calls.append("load_markets")
        if self.error is not None:
            raise self.error
        return dict(self.markets)

    async def fetch_tickers(self, pairs: list[str] | None = None) -> dict[str, Ticker]:
        self.calls.append("fetch_tickers")
        if self.error is not None:
            raise self.error
        return dict(self.tickers)

    async def fetch_order_book(self, pair: str, limit: int) -> OrderBook:
        self.calls.append(f"fetch_order_book:{pair}")
        if self.error is not None:
            raise self.error
        return self.books[pair]


def ticker(pair: str, last: float, quote_volume: float | None, spread_bps: float = 2.0) -> Ticker:
    half = last * spread_bps / 2e4
    base_volume = None if quote_volume is None else quote_volume / last
    return Ticker(pair, 0, last - half, last + half, last, base_volume, quote_volume)


@pytest.fixture
def universe(sample_dir: Path) -> FakeMarkets:
    """Return a Bybit-like spot universe with every kind of pair the filters must handle."""
    btc = btc_ticker(sample_dir)
    rows = {
        # pair: (last, 24h quote volume, spread bps)
        "ETH/USDT": (1300.0, 9e7, 1.0),  # BTC did 1.23e8 that day
        "SOL/USDT": (14.0, 3e7, 3.0),
        "JUP/USDT": (0.9, 1e7, 5.0),  # ends in UP but is a coin of its own
        "DOGE/USDT": (0.09, 8e6, 60.0),  # too wide a spread
        "PEPE/USDT": (1e-5, 5e5, 10.0),  # too little volume
        "BTC3L/USDT": (0.01, 8e8, 4.0),
        "BTCUP/USDT": (5.0, 7e8, 4.0),
        "ETHBEAR/USDT": (0.3, 6e8, 4.0),
        "USDC/USDT": (1.0, 9e9, 0.1),
        "DAI/USDT": (1.0, 2e8, 0.5),
        "FDUSD/USDT": (1.0, 3e8, 0.3),
        "ETH/BTC": (0.07, 9e9, 1.0),  # other quote
        "OLD/USDT": (1.0, 9e9, 1.0),  # delisted: inactive market
    }
    markets = {p: market(p, active=p != "OLD/USDT") for p in [*rows, "BTC/USDT", "NEW/USDT"]}
    tickers = {p: ticker(p, last, qv, spread) for p, (last, qv, spread) in rows.items()}
    tickers["BTC/USDT"] = btc
    books = {p: book_around(p, t.last or 1.0, 2e6) for p, t in tickers.items()}
    books["BTC/USDT"] = book_around("BTC/USDT", btc.mid or 0.0, 5e6)
    return FakeMarkets(markets, tickers, books)


def settings(**overrides: object) -> PairsSettings:
    base = {"count": 10, "min_quote_volume": 1e6, "max_spread_bps": 20.0, "ttl_s": 600}
    return PairsSettings.model_validate({**base, **overrides})


def make_top(
    source: FakeMarkets, tmp_path: Path, clock: ReplayClock, **overrides: object
) -> TopPairs:
    return TopPairs(
        source, settings(**overrides), state_path=tmp_path / "state" / "pairs.json", clock=clock
    )


# -- The chain -------------------------------------------------------------------------------


async def test_chain_ranks_by_quote_volume_and_filters(
    universe: FakeMarkets, tmp_path: Path
) -> None:
    """Only liquid, tight, USDT, non-leveraged, non-stable, active pairs remain, by volume."""
    top = make_top(universe, tmp_path, ReplayClock(1_000))
    result = await top.refresh()
    assert result.source == "exchange"
    assert result.pairs == ("BTC/USDT", "ETH/USDT", "SOL/USDT", "JUP/USDT")
    stats = {s.pair: s for s in result.stats}
    btc = universe.tickers["BTC/USDT"]
    assert stats["BTC/USDT"].spread_bps == pytest.approx(btc.spread_bps)
    assert stats["BTC/USDT"].quote_volume_24h == btc.quote_volume_24h
    assert stats["BTC/USDT"].depth_quote == pytest.approx(1e7)
    assert stats["ETH/USDT"].depth_quote == pytest.approx(4e6)


async def test_switches_turn_filters_off(universe: FakeMarkets, tmp_path: Path) -> None:
    """With the leveraged and stablecoin switches off, those pairs are ranked too."""
    top = make_top(
        universe, tmp_path, ReplayClock(0), exclude_leveraged=False, exclude_stablecoins=False
    )
    pairs = (await top.refresh()).pairs
    assert pairs[:3] == ("USDC/USDT", "BTC3L/USDT", "BTCUP/USDT")
    assert {"DAI/USDT", "FDUSD/USDT", "ETHBEAR/USDT"} <= set(pairs)


async def test_count_limits_and_depth_is_fetched_for_few(
    universe: FakeMarkets, tmp_path: Path
) -> None:
    """With count=2, only the 4 best candidates' order books are fetched and 2 kept."""
    top = make_top(universe, tmp_path, ReplayClock(0), count=2)
    assert (await top.refresh()).pairs == ("BTC/USDT", "ETH/USDT")
    books = [c for c in universe.calls if c.startswith("fetch_order_book")]
    assert len(books) == 4


async def test_depth_filter_drops_thin_books(universe: FakeMarkets) -> None:
    """A minimum depth drops pairs with less quote resting within 1% of mid."""
    from top_pairs import VolumeRanking

    pairs = await rank_pairs(universe, VolumeRanking(), [DepthFilter(min_depth_quote=5e6)])
    assert [p.pair for p in pairs] == ["BTC/USDT"]


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("BTC3L", True), ("ETH3S", True), ("SOL5L", True), ("BTCUP", True), ("BTCDOWN", True),
        ("ETHBULL", True), ("ETHBEAR", True), ("JUP", False), ("SYRUP", False), ("BTC", False),
        ("SUPER", False), ("UP", False),
    ],
)  # fmt: skip
def test_leveraged_token_detection(base: str, expected: bool) -> None:
    """Leveraged tokens are recognised without catching coins like JUP or SYRUP."""
    assert is_leveraged_token(base, {"BTC", "ETH", "SOL", "JUP"}) is expected


def test_book_depth_on_a_real_bybit_snapshot(sample_dir: Path) -> None:
    """Depth within 1% of mid on the real XRPUSDT book equals a direct sum over its levels."""
    book = xrp_snapshot(sample_dir)
    levels = pd.DataFrame(
        [(p, q, "b") for p, q in book.bids] + [(p, q, "a") for p, q in book.asks],
        columns=["price", "qty", "side"],
    )
    mid = (levels[levels.side == "b"].price.max() + levels[levels.side == "a"].price.min()) / 2
    near = ((levels.side == "b") & (levels.price >= mid * 0.99)) | (
        (levels.side == "a") & (levels.price <= mid * 1.01)
    )
    expected = float((levels.price * levels.qty)[near].sum())
    assert book_depth(book) == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < float((levels.price * levels.qty).sum())
    assert book_depth(OrderBook("X/Y", 0, (), ())) is None


# -- Cache, fallback, diffs ------------------------------------------------------------------


async def test_cache_is_used_until_the_ttl_passes(universe: FakeMarkets, tmp_path: Path) -> None:
    """Within the TTL no call is made; after it the list is ranked again."""
    clock = ReplayClock(1_000_000)
    top = make_top(universe, tmp_path, clock)
    first = await top.current()
    calls = len(universe.calls)
    clock.advance(599)
    assert await top.current() is first
    assert len(universe.calls) == calls
    clock.advance(1)
    again = await top.current()
    assert again.ts == clock.now_ms()
    assert len(universe.calls) > calls


async def test_cache_survives_a_restart(universe: FakeMarkets, tmp_path: Path) -> None:
    """A new instance reads the persisted list and makes no call while it is fresh."""
    clock = ReplayClock(1_000_000)
    first = await make_top(universe, tmp_path, clock).current()
    assert (tmp_path / "state" / "pairs.json").is_file()
    restarted = FakeMarkets(universe.markets, universe.tickers, universe.books)
    clock.advance(300)
    cached = await make_top(restarted, tmp_path, clock).current()
    assert cached.source == "cache"
    assert cached.pairs == first.pairs
    assert cached.stats == first.stats
    assert restarted.calls == []
    other = await make_top(restarted, tmp_path, clock, count=2).current()
    assert other.source == "exchange"
    assert other.pairs == first.pairs[:2]


async def test_unreadable_cache_is_ignored(universe: FakeMarkets, tmp_path: Path) -> None:
    """A corrupt cache file is ignored and replaced by a fresh ranking."""
    path = tmp_path / "state" / "pairs.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    result = await make_top(universe, tmp_path, ReplayClock(0)).current()
    assert result.source == "exchange"
    assert json.loads(path.read_text())["pairs"] == list(result.pairs)


@pytest.mark.parametrize("error", [NetworkError("reset"), ExchangeUnavailableError("503")])
async def test_falls_back_with_a_warning_when_the_exchange_fails(
    universe: FakeMarkets, tmp_path: Path, error: BotError
) -> None:
    """With no earlier ranking, a failing exchange yields the configured fallback list."""
    universe.error = error
    top = make_top(universe, tmp_path, ReplayClock(0), fallback="BTC/USDT,ETH/USDT")
    with capture_logs() as logs:
        result = await top.current()
    assert result.source == "fallback"
    assert result.pairs == ("BTC/USDT", "ETH/USDT")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["pairs_fallback"]
    assert not (tmp_path / "state" / "pairs.json").exists()


async def test_keeps_the_last_ranking_when_the_exchange_fails(
    universe: FakeMarkets, tmp_path: Path
) -> None:
    """After a good ranking, a failed refresh keeps it (stale) rather than the fallback."""
    clock = ReplayClock(0)
    top = make_top(universe, tmp_path, clock)
    good = await top.refresh()
    universe.error = NetworkError("reset")
    clock.advance(700)
    stale = await top.current()
    assert stale.source == "stale"
    assert stale.pairs == good.pairs
    universe.error = None
    assert (await top.current()).source == "exchange"


async def test_nothing_passing_the_filters_falls_back(
    universe: FakeMarkets, tmp_path: Path
) -> None:
    """When no pair passes, the fallback list is used instead of trading nothing."""
    top = make_top(universe, tmp_path, ReplayClock(0), min_quote_volume=1e12)
    assert (await top.refresh()).source == "fallback"


def test_pair_list_diff() -> None:
    """Entering and leaving pairs are reported; removed pairs with positions drain."""
    diff = PairListDiff.between(["BTC/USDT", "ETH/USDT", "SOL/USDT"], ["ETH/USDT", "XRP/USDT"])
    assert diff.added == ("XRP/USDT",)
    assert diff.removed == ("BTC/USDT", "SOL/USDT")
    assert diff.changed
    assert diff.draining(["SOL/USDT", "ETH/USDT"]) == ("SOL/USDT",)
    assert not PairListDiff.between(["A/B"], ["A/B"]).changed


async def test_background_refresh_reports_changes(universe: FakeMarkets, tmp_path: Path) -> None:
    """The refresh task re-ranks every TTL and hands each change to the engine's callback."""
    clock = ReplayClock(0)
    top = make_top(universe, tmp_path, clock, count=2)
    stop = asyncio.Event()
    seen: list[tuple[int, PairListDiff]] = []

    async def on_change(diff: PairListDiff) -> None:
        seen.append((clock.now_ms(), diff))
        stop.set()

    async def sol_takes_off() -> None:
        await asyncio.sleep(0)
        sol = universe.tickers["SOL/USDT"]
        universe.tickers["SOL/USDT"] = replace(sol, quote_volume_24h=9e9)

    await asyncio.gather(top.run(stop, on_change=on_change), sol_takes_off())
    assert seen == [(600_000, PairListDiff(added=("SOL/USDT",), removed=("ETH/USDT",)))]
    assert top.pairs == ("SOL/USDT", "BTC/USDT")


def test_print_ranking_shows_every_pair(universe: FakeMarkets, tmp_path: Path) -> None:
    """The table lists each pair with its volume, spread and depth."""
    from rich.console import Console

    result = asyncio.run(make_top(universe, tmp_path, ReplayClock(0)).refresh())
    buffer = io.StringIO()
    print_ranking(result, Console(file=buffer, width=120))
    text = buffer.getvalue()
    for pair in result.pairs:
        assert pair in text
    assert "90,000,000" in text


# -- Point in time ---------------------------------------------------------------------------


@pytest.fixture
def bittrex(sample_dir: Path) -> dict[str, pd.DataFrame]:
    """Return the ten Bittrex */BTC 5m samples (one shared time range)."""
    return {
        f"{alt}/BTC": load_candles(sample_dir / f"bittrex_{alt}-BTC_5m.csv.gz", timeframe="5m")
        for alt in ALTS
    }


def brute_force(archives: dict[str, pd.DataFrame], at: int, lookback: int, top_n: int) -> list[str]:
    """Rank by quote volume of candles closed in (at - lookback, at], by plain pandas."""
    scores = {}
    for pair, frame in archives.items():
        close = index_ms(frame) + 300_000
        if not (close <= at).any():
            continue
        window = (close <= at) & (close > at - lookback)
        volume = float((frame["close"] * frame["volume"])[window].sum())
        if volume > 0:
            scores[pair] = volume
    return sorted(scores, key=lambda p: (-scores[p], p))[:top_n]


def test_point_in_time_matches_a_direct_computation(bittrex: dict[str, pd.DataFrame]) -> None:
    """At every daily refresh the ranking equals a direct pandas computation."""
    ranking = PointInTimeRanking(bittrex, "5m", refresh_every="1d", top_n=4, lookback="1d")
    start = min(int(index_ms(f)[0]) for f in bittrex.values())
    end = max(int(index_ms(f)[-1]) for f in bittrex.values())
    schedule = ranking.schedule(start, end)
    assert len(schedule) >= 20
    for refresh, pairs, _ in schedule:
        assert list(pairs) == brute_force(bittrex, refresh, 86_400_000, 4)
    assert {p for _, pairs, _ in schedule for p in pairs} > set(schedule[-1][1])
    mid = schedule[10][0] + 3_600_000
    assert ranking.pairs_at(mid) == list(schedule[10][1])


def test_point_in_time_has_no_look_ahead(bittrex: dict[str, pd.DataFrame]) -> None:
    """Changing candles after a refresh never changes that refresh's ranking."""
    ranking = PointInTimeRanking(bittrex, "5m", refresh_every="6h", top_n=3, lookback="1d")
    start = int(index_ms(bittrex["ETH/BTC"])[0])
    at = ranking.refresh_ts(start + 10 * 86_400_000)
    before = ranking.pairs_at(at)
    loser = before[-1]
    rigged = dict(bittrex)
    boosted = bittrex["ZEC/BTC"].copy()
    future = index_ms(boosted) + 300_000 > at
    boosted.loc[future, "volume"] *= 1e6  # a huge boom, but only after `at`
    rigged["ZEC/BTC"] = boosted
    again = PointInTimeRanking(rigged, "5m", refresh_every="6h", top_n=3, lookback="1d")
    assert again.pairs_at(at) == before
    assert loser in before
    assert again.pairs_at(at + 21_600_000) != ranking.pairs_at(at + 21_600_000)


def test_point_in_time_only_ranks_listed_pairs(bittrex: dict[str, pd.DataFrame]) -> None:
    """A pair listed later appears only once its first candle has closed, and that is all."""
    late = dict(bittrex)
    eth = bittrex["ETH/BTC"]
    listing = int(index_ms(eth)[2000])
    late["NEW/BTC"] = eth.iloc[2000:].assign(volume=eth["volume"].iloc[2000:] * 1000)
    ranking = PointInTimeRanking(late, "5m", refresh_every="1h", top_n=3, lookback="1d")
    before = ranking.refresh_ts(listing)
    assert "NEW/BTC" not in ranking.pairs_at(before)
    assert "NEW/BTC" not in ranking.pairs_at(listing + 299_999)
    assert ranking.pairs_at(ranking.refresh_ts(listing) + 3_600_000)[0] == "NEW/BTC"
    for refresh, pairs, diff in ranking.schedule(before - 86_400_000, listing + 86_400_000):
        assert ("NEW/BTC" in pairs) == (refresh >= listing + 300_000)
        if "NEW/BTC" in diff.added:
            assert refresh == ranking.refresh_ts(listing) + 3_600_000


def test_point_in_time_drops_pairs_that_stop_trading(bittrex: dict[str, pd.DataFrame]) -> None:
    """A pair whose archive ends leaves the ranking once its lookback holds no candle."""
    delisted = dict(bittrex)
    eth = bittrex["ETH/BTC"]
    delisted["ETH/BTC"] = eth.iloc[:3000]
    last_close = int(index_ms(eth)[2999]) + 300_000
    ranking = PointInTimeRanking(
        delisted, "5m", refresh_every="1h", top_n=10, lookback="1d", min_quote_volume=0.0
    )
    assert "ETH/BTC" in ranking.pairs_at(last_close)
    assert "ETH/BTC" not in ranking.pairs_at(last_close + 86_400_000 + 3_600_000)


def test_point_in_time_from_store(tmp_path: Path, bittrex: dict[str, pd.DataFrame]) -> None:
    """A ranking built from Parquet archives equals one built from the frames."""
    store = CandleStore(tmp_path, "bittrex")
    for pair, frame in bittrex.items():
        store.append(pair, "5m", frame)
    stored = PointInTimeRanking.from_store(
        store, store.pairs("5m"), "5m", refresh_every="1d", top_n=5, lookback="3d"
    )
    direct = PointInTimeRanking(bittrex, "5m", refresh_every="1d", top_n=5, lookback="3d")
    start = int(index_ms(bittrex["ADA/BTC"])[0])
    for day in range(1, 20):
        at = start + day * 86_400_000
        got, want = stored.ranking_at(at), direct.ranking_at(at)
        assert [p for p, _ in got] == [p for p, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12)


def test_point_in_time_rejects_bad_input(bittrex: dict[str, pd.DataFrame]) -> None:
    """Unsorted archives and non-positive sizes are refused."""
    with pytest.raises(ValueError, match="sorted"):
        PointInTimeRanking({"ADA/BTC": bittrex["ADA/BTC"].iloc[::-1]}, "5m", "1h", 3, "1d")
    with pytest.raises(ValueError, match="top_n"):
        PointInTimeRanking(bittrex, "5m", "1h", 0, "1d")
    assert np.isfinite(
        [v for _, v in PointInTimeRanking(bittrex, "5m", "1h", 3, "1d").ranking_at(2**41)]
    ).all()
