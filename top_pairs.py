"""Dynamic pair list: rank the exchange's pairs by liquidity, filter, cache, and diff.

A chain of one generator then filters, each a small class behind a Protocol (freqtrade's
`PairListManager`)::

    VolumeRanking -> [MarketTypeFilter] -> QuoteFilter -> LeveragedTokenFilter
        -> StablecoinFilter -> MinVolumeFilter -> SpreadFilter -> TopFilter(2n)
        -> DepthFilter -> TopFilter(n)

The generator turns active markets and 24h tickers into `PairStats` (quote volume, spread
in bps) sorted by quote volume; `DepthFilter` adds the order-book depth within +-1% of mid
for the few pairs still in the running. `TopPairs` caches the result with a TTL in
`<data_dir>/state/pairs.json`, so a restart does not hammer the API, refreshes it in a
background task, and falls back to `PairsSettings.fallback` (with a warning) when the
exchange cannot answer. `PairListDiff` tells the engine which pairs to add and which to
drain (open positions are kept until closed).

`PointInTimeRanking` rebuilds the same ranking from candle archives as it was at any past
moment, using only candles closed by then and only pairs listed by then, so a backtest can
trade a dynamic pair list without survivorship or look-ahead bias.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import numpy as np
import structlog

from error_handler import BotError
from models import Market, MarketType, OrderBook, Ticker
from utils.utilities import Clock, WallClock, atomic_write, run_periodic, timeframe_to_ms


if TYPE_CHECKING:
    import argparse

    import pandas as pd

    from config import PairsSettings, Settings
    from data_manager import CandleStore

log = structlog.get_logger(__name__)

DEPTH_BAND: Final = 0.01  # depth is counted within +-1% of mid
BOOK_LIMIT: Final = 200  # Bybit spot's deepest REST book; enough levels to span 1% on majors

STABLECOINS: Final = frozenset(
    {
        "USDT", "USDC", "DAI", "FDUSD", "TUSD", "BUSD", "USDP", "PYUSD", "USDD", "USDE",
        "FRAX", "GUSD", "LUSD", "SUSD", "USD1", "RLUSD", "USDQ", "USDJ", "USTC", "UST",
        "EURC", "EURT", "EURS", "AEUR", "USDS", "CUSD", "USDB", "USDX",
    }
)  # fmt: skip
# A leveraged token is an underlying plus a suffix: BTC3L, ETH3S, BTCUP, ADABULL, XRPBEAR.
_LEVERAGED: Final = re.compile(r"^(?P<under>[A-Z0-9]+?)(?P<suffix>\d+[LS]|UP|DOWN|BULL|BEAR)$")
Source = Literal["exchange", "cache", "stale", "fallback"]


# -- Contracts -------------------------------------------------------------------------------


class MarketSource(Protocol):
    """What the ranking needs from an exchange (`exchange.Exchange` provides it)."""

    async def load_markets(self) -> dict[str, Market]:
        """Return the exchange's markets by pair."""
        ...

    async def fetch_tickers(self, pairs: list[str] | None = None) -> dict[str, Ticker]:
        """Return 24h tickers by pair (all pairs when None)."""
        ...

    async def fetch_order_book(self, pair: str, limit: int) -> OrderBook:
        """Return an order book snapshot."""
        ...


@dataclass(frozen=True, slots=True)
class PairStats:
    """Liquidity figures of one pair; `depth_quote` is set once `DepthFilter` ran."""

    pair: str
    base: str
    quote: str
    quote_volume_24h: float
    spread_bps: float | None = None
    depth_quote: float | None = None
    last: float | None = None


@dataclass(frozen=True, slots=True)
class RankContext:
    """What the chain's steps may consult: the exchange, its markets and tickers."""

    source: MarketSource
    markets: Mapping[str, Market]
    tickers: Mapping[str, Ticker]


class PairGenerator(Protocol):
    """The first step of the chain: produce the candidate pairs, best first."""

    @property
    def name(self) -> str:
        """Return the step's name, for logs and the cache key."""
        ...

    async def generate(self, ctx: RankContext) -> list[PairStats]:
        """Return candidates with their liquidity figures."""
        ...


class PairFilter(Protocol):
    """A later step of the chain: drop (or annotate) candidates, keeping their order."""

    @property
    def name(self) -> str:
        """Return the step's name, for logs and the cache key."""
        ...

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the candidates that pass."""
        ...


# -- Chain steps -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeRanking:
    """Generate every active market with a ticker, ranked by 24h quote volume."""

    name: str = "volume"

    async def generate(self, ctx: RankContext) -> list[PairStats]:
        """Return active markets' stats, highest quote volume first."""
        out = []
        for pair, market in ctx.markets.items():
            ticker = ctx.tickers.get(pair)
            if not market.active or ticker is None:
                continue
            out.append(
                PairStats(
                    pair,
                    market.base,
                    market.quote,
                    quote_volume(ticker),
                    ticker.spread_bps,
                    last=ticker.last,
                )
            )
        out.sort(key=lambda s: (-s.quote_volume_24h, s.pair))
        return out


def quote_volume(ticker: Ticker) -> float:
    """Return a ticker's 24h quote volume (base volume x last when not given)."""
    if ticker.quote_volume_24h is not None:
        return float(ticker.quote_volume_24h)
    if ticker.base_volume_24h is not None and ticker.last is not None:
        return float(ticker.base_volume_24h) * float(ticker.last)
    return 0.0


@dataclass(frozen=True, slots=True)
class QuoteFilter:
    """Keep pairs quoted in one currency (USDT)."""

    quote: str
    name: str = "quote"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return pairs whose quote currency matches."""
        return [p for p in pairs if p.quote.upper() == self.quote.upper()]


@dataclass(frozen=True, slots=True)
class MarketTypeFilter:
    """Keep one kind of market (spot, or linear perpetuals) when the exchange lists both."""

    market_type: MarketType
    name: str = "market_type"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the pairs whose market is of the wanted type."""
        return [p for p in pairs if ctx.markets[p.pair].type is self.market_type]


def is_leveraged_token(base: str, known_bases: Iterable[str] = ()) -> bool:
    """Return True for a leveraged token's base (BTC3L, ETH5S, BTCUP, ADABULL...).

    An UP/DOWN/BULL/BEAR suffix counts only when the rest is itself a listed coin, so
    JUP or SYRUP are not mistaken for one; a digit+L/S suffix always counts.
    """
    match = _LEVERAGED.match(base.upper())
    if match is None:
        return False
    if match.group("suffix")[0].isdigit():
        return True
    return match.group("under") in {b.upper() for b in known_bases}


@dataclass(frozen=True, slots=True)
class LeveragedTokenFilter:
    """Drop leveraged tokens: they decay and their volume is not the coin's."""

    name: str = "leveraged"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the pairs that are not leveraged tokens."""
        bases = {m.base.upper() for m in ctx.markets.values()}
        return [p for p in pairs if not is_leveraged_token(p.base, bases)]


@dataclass(frozen=True, slots=True)
class StablecoinFilter:
    """Drop pairs whose base is a stablecoin (USDC/USDT, DAI/USDT, FDUSD/USDT...)."""

    stablecoins: frozenset[str] = STABLECOINS
    name: str = "stablecoin"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the pairs whose base is not a stablecoin."""
        return [p for p in pairs if p.base.upper() not in self.stablecoins]


@dataclass(frozen=True, slots=True)
class MinVolumeFilter:
    """Drop pairs below a 24h quote volume."""

    min_quote_volume: float
    name: str = "min_volume"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return pairs with enough quote volume."""
        return [p for p in pairs if p.quote_volume_24h >= self.min_quote_volume]


@dataclass(frozen=True, slots=True)
class SpreadFilter:
    """Drop pairs whose bid-ask spread is wider than `max_spread_bps` (or unknown)."""

    max_spread_bps: float
    name: str = "spread"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return pairs with a known spread within the limit."""
        return [
            p for p in pairs if p.spread_bps is not None and p.spread_bps <= self.max_spread_bps
        ]


@dataclass(frozen=True, slots=True)
class TopFilter:
    """Keep the first `count` pairs."""

    count: int
    name: str = "top"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the first `count` pairs."""
        return pairs[: self.count]


def book_depth(book: OrderBook, band: float = DEPTH_BAND) -> float | None:
    """Return the quote notional resting within +-`band` of mid on both sides."""
    if book.best_bid is None or book.best_ask is None:
        return None
    mid = (book.best_bid + book.best_ask) / 2
    low, high = mid * (1 - band), mid * (1 + band)
    bids = sum(price * qty for price, qty in book.bids if price >= low)
    asks = sum(price * qty for price, qty in book.asks if price <= high)
    return float(bids + asks)


@dataclass(frozen=True, slots=True)
class DepthFilter:
    """Fetch each candidate's order book, record its depth, drop the too-thin ones."""

    min_depth_quote: float = 0.0
    band: float = DEPTH_BAND
    limit: int = BOOK_LIMIT
    concurrency: int = 4
    name: str = "depth"

    async def apply(self, pairs: list[PairStats], ctx: RankContext) -> list[PairStats]:
        """Return the candidates with `depth_quote` set, without those below the minimum."""
        limiter = asyncio.Semaphore(self.concurrency)

        async def measure(stats: PairStats) -> PairStats:
            async with limiter:
                book = await ctx.source.fetch_order_book(stats.pair, self.limit)
            return replace(stats, depth_quote=book_depth(book, self.band))

        measured = await asyncio.gather(*(measure(p) for p in pairs))
        return [
            p
            for p in measured
            if p.depth_quote is not None and p.depth_quote >= self.min_depth_quote
        ]


def default_chain(
    settings: PairsSettings,
    *,
    market_type: MarketType | str | None = None,
    min_depth_quote: float = 0.0,
) -> tuple[PairGenerator, list[PairFilter]]:
    """Return the generator and filters the settings ask for."""
    filters: list[PairFilter] = [QuoteFilter(settings.quote)]
    if market_type is not None:
        filters.insert(0, MarketTypeFilter(MarketType(market_type)))
    if settings.exclude_leveraged:
        filters.append(LeveragedTokenFilter())
    if settings.exclude_stablecoins:
        filters.append(StablecoinFilter())
    filters += [
        MinVolumeFilter(settings.min_quote_volume),
        SpreadFilter(settings.max_spread_bps),
        # Order books cost one call each: measure only twice as many as will be kept.
        TopFilter(settings.count * 2),
        DepthFilter(min_depth_quote),
        TopFilter(settings.count),
    ]
    return VolumeRanking(), filters


async def rank_pairs(
    source: MarketSource, generator: PairGenerator, filters: Sequence[PairFilter]
) -> list[PairStats]:
    """Run the chain once against the exchange and return the ranked pairs."""
    markets = await source.load_markets()
    tickers = await source.fetch_tickers(None)
    ctx = RankContext(source, markets, tickers)
    pairs = await generator.generate(ctx)
    for step in filters:
        before = len(pairs)
        pairs = await step.apply(pairs, ctx)
        log.debug("pairlist_step", step=step.name, before=before, after=len(pairs))
    return pairs


# -- The cached list -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairListDiff:
    """Pairs entering and leaving the list between two refreshes."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: Sequence[str], new: Sequence[str]) -> PairListDiff:
        """Return what changed from `old` to `new` (in the new list's order for additions)."""
        before, after = set(old), set(new)
        return cls(
            tuple(p for p in new if p not in before), tuple(p for p in old if p not in after)
        )

    @property
    def changed(self) -> bool:
        """Return True when a pair entered or left."""
        return bool(self.added or self.removed)

    def draining(self, open_pairs: Iterable[str]) -> tuple[str, ...]:
        """Return removed pairs that still hold a position: keep their data until closed."""
        holding = set(open_pairs)
        return tuple(p for p in self.removed if p in holding)


@dataclass(frozen=True, slots=True)
class PairListResult:
    """One ranking: the pairs to trade, their figures, when and where it came from."""

    ts: int
    pairs: tuple[str, ...]
    stats: tuple[PairStats, ...] = ()
    source: Source = "exchange"

    def as_json(self, key: str) -> str:
        """Return the cache file's content."""
        body = {
            "ts": self.ts,
            "key": key,
            "pairs": list(self.pairs),
            "stats": [asdict(s) for s in self.stats],
        }
        return json.dumps(body, indent=1)


class TopPairs:
    """The dynamic pair list: ranked by the chain, cached with a TTL, persisted to disk.

    `current()` answers from the cache while it is fresh (also across restarts, from
    `state_path`), else refreshes. When the exchange cannot answer, the last ranking is
    kept (source "stale") or, with none, the configured fallback list (source "fallback"),
    with a warning either way; neither is written to disk.
    """

    def __init__(
        self,
        source: MarketSource,
        settings: PairsSettings,
        *,
        state_path: Path,
        clock: Clock | None = None,
        generator: PairGenerator | None = None,
        filters: Sequence[PairFilter] | None = None,
        market_type: MarketType | str | None = None,
        min_depth_quote: float = 0.0,
    ) -> None:
        self.source = source
        self.settings = settings
        self.state_path = state_path
        self.clock = clock or WallClock()
        default_gen, default_filters = default_chain(
            settings, market_type=market_type, min_depth_quote=min_depth_quote
        )
        self.generator = generator or default_gen
        self.filters = list(filters) if filters is not None else default_filters
        self._key = self._cache_key()
        self._result: PairListResult | None = None
        self._lock = asyncio.Lock()

    def _cache_key(self) -> str:
        # A cache written under other settings or another chain must not be reused.
        s = self.settings
        steps = ",".join(
            [self.generator.name, *(f"{f.name}:{_step_args(f)}" for f in self.filters)]
        )
        return (
            f"{s.quote}|{s.count}|{s.min_quote_volume}|{s.max_spread_bps}|"
            f"{s.exclude_leveraged}|{s.exclude_stablecoins}|{steps}"
        )

    @property
    def pairs(self) -> tuple[str, ...]:
        """Return the pairs of the latest ranking (empty before the first)."""
        return self._result.pairs if self._result else ()

    @property
    def result(self) -> PairListResult | None:
        """Return the latest ranking, if any."""
        return self._result

    def _fresh(self, result: PairListResult | None) -> bool:
        if result is None or result.source not in ("exchange", "cache"):
            return False
        return self.clock.now_ms() - result.ts < self.settings.ttl_s * 1000

    def load_cache(self) -> PairListResult | None:
        """Return the ranking persisted on disk, if readable and made by the same chain."""
        try:
            body = json.loads(self.state_path.read_text("utf-8"))
            if body.get("key") != self._key:
                return None
            stats = tuple(PairStats(**item) for item in body["stats"])
            return PairListResult(int(body["ts"]), tuple(body["pairs"]), stats, "cache")
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:
            log.warning("pairs_cache_unreadable", path=str(self.state_path), error=str(e))
            return None

    async def current(self) -> PairListResult:
        """Return the cached ranking while fresh, else a new one."""
        if self._result is None:
            self._result = self.load_cache()
        if self._fresh(self._result):
            assert self._result is not None
            return self._result
        return await self.refresh()

    async def refresh(self) -> PairListResult:
        """Rank the pairs now, persist the result, and return it (or a fallback)."""
        async with self._lock:
            now = self.clock.now_ms()
            try:
                stats = await rank_pairs(self.source, self.generator, self.filters)
            except BotError as e:
                return self._fall_back(now, "exchange_error", e.describe())
            if not stats:
                return self._fall_back(now, "no_pair_passed_the_filters", {})
            result = PairListResult(now, tuple(s.pair for s in stats), tuple(stats), "exchange")
            atomic_write(self.state_path, result.as_json(self._key))
            self._log_change(result)
            self._result = result
            return result

    def _fall_back(self, now: int, reason: str, context: dict[str, Any]) -> PairListResult:
        # A stale dynamic list beats the hard-coded one: it is what positions were opened
        # on, and it was right a TTL ago.
        previous = self._result or self.load_cache()
        if previous is not None and previous.pairs and previous.source != "fallback":
            result = PairListResult(previous.ts, previous.pairs, previous.stats, "stale")
        else:
            result = PairListResult(now, tuple(self.settings.fallback), (), "fallback")
        log.warning(
            "pairs_fallback",
            reason=reason,
            source=result.source,
            pairs=list(result.pairs),
            **context,
        )
        self._result = result
        return result

    def _log_change(self, result: PairListResult) -> None:
        diff = PairListDiff.between(self.pairs, result.pairs)
        if diff.changed:
            log.info(
                "pairs_changed",
                added=list(diff.added),
                removed=list(diff.removed),
                count=len(result.pairs),
            )

    async def run(
        self,
        stop: asyncio.Event,
        *,
        on_change: Callable[[PairListDiff], Awaitable[None]] | None = None,
    ) -> None:
        """Refresh every TTL until `stop` is set, reporting each change to `on_change`.

        Meant as a named task in main's TaskGroup. The first ranking comes from
        `current()`, so a fresh cache on disk saves the start-up calls.
        """
        await self.current()

        async def tick() -> None:
            old = self.pairs
            new = await self.refresh()
            diff = PairListDiff.between(old, new.pairs)
            if diff.changed and on_change is not None:
                await on_change(diff)

        await run_periodic(tick, float(self.settings.ttl_s), stop, clock=self.clock)


def _step_args(step: object) -> str:
    fields = getattr(step, "__dataclass_fields__", {})
    return ";".join(f"{k}={getattr(step, k)}" for k in fields if k != "name")


# -- Point in time ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Series:
    close_ts: np.ndarray  # candle close times, ascending
    cum_quote: np.ndarray  # cumulative close*volume, one longer than close_ts


@dataclass(slots=True)
class PointInTimeRanking:
    """The pair ranking as it stood at any past moment, rebuilt from candle archives.

    At each refresh time r (multiples of `refresh_every`), a pair's score is its quote
    volume (close x volume) over the candles that closed in (r - lookback, r]; a pair
    enters only once its first candle has closed by r (it was listed), and only pairs with
    at least `min_quote_volume` are ranked. Nothing after r is ever read: no look-ahead,
    and pairs that later vanish are ranked while they traded (no survivorship bias).
    """

    archives: Mapping[str, pd.DataFrame]
    timeframe: str
    refresh_every: str | int
    top_n: int
    lookback: str | int
    min_quote_volume: float = 0.0
    _series: dict[str, _Series] = field(init=False, repr=False)
    _every: int = field(init=False, repr=False)
    _lookback: int = field(init=False, repr=False)
    _cache: dict[int, tuple[tuple[str, float], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from data_manager import index_ms

        step = timeframe_to_ms(self.timeframe)
        self._every = _as_ms(self.refresh_every)
        self._lookback = _as_ms(self.lookback)
        if self.top_n < 1:
            raise ValueError("top_n must be >= 1")
        self._series = {}
        for pair, frame in self.archives.items():
            ts = index_ms(frame)
            if len(ts) and (np.diff(ts) <= 0).any():
                raise ValueError(f"{pair}: archive must be sorted and unique")
            quote = frame["close"].to_numpy(dtype=np.float64) * frame["volume"].to_numpy(
                dtype=np.float64
            )
            self._series[pair] = _Series(ts + step, np.concatenate(([0.0], np.cumsum(quote))))
        self._cache = {}

    @classmethod
    def from_store(
        cls, store: CandleStore, pairs: Sequence[str], timeframe: str, **options: Any
    ) -> PointInTimeRanking:
        """Return a ranking over the archives of `pairs` in a `CandleStore`."""
        archives = {pair: store.load(pair, timeframe) for pair in pairs}
        return cls(archives, timeframe, **options)

    def refresh_ts(self, ts_ms: int) -> int:
        """Return the time of the last refresh at or before `ts_ms`."""
        return ts_ms - ts_ms % self._every

    def ranking_at(self, ts_ms: int) -> tuple[tuple[str, float], ...]:
        """Return (pair, quote volume) of the ranking in force at `ts_ms`, best first."""
        refresh = self.refresh_ts(ts_ms)
        cached = self._cache.get(refresh)
        if cached is not None:
            return cached
        scores = []
        for pair, series in self._series.items():
            # Candles whose close time is <= refresh had closed by then; later ones are the
            # future and are never read.
            end = int(np.searchsorted(series.close_ts, refresh, side="right"))
            if end == 0:
                continue  # not listed yet: no candle had closed
            start = int(np.searchsorted(series.close_ts, refresh - self._lookback, side="right"))
            volume = float(series.cum_quote[end] - series.cum_quote[start])
            if volume > 0 and volume >= self.min_quote_volume:
                scores.append((pair, volume))
        scores.sort(key=lambda item: (-item[1], item[0]))
        ranking = tuple(scores[: self.top_n])
        self._cache[refresh] = ranking
        return ranking

    def pairs_at(self, ts_ms: int) -> list[str]:
        """Return the pairs a bot would have traded at `ts_ms`."""
        return [pair for pair, _ in self.ranking_at(ts_ms)]

    def schedule(
        self, start_ms: int, end_ms: int
    ) -> list[tuple[int, tuple[str, ...], PairListDiff]]:
        """Return (refresh time, pairs, change from the previous) for every refresh in range."""
        out: list[tuple[int, tuple[str, ...], PairListDiff]] = []
        previous: tuple[str, ...] = ()
        for refresh in range(self.refresh_ts(start_ms), end_ms, self._every):
            pairs = tuple(self.pairs_at(refresh))
            out.append((refresh, pairs, PairListDiff.between(previous, pairs)))
            previous = pairs
        return out


def _as_ms(value: str | int) -> int:
    ms = timeframe_to_ms(value) if isinstance(value, str) else int(value)
    if ms <= 0:
        raise ValueError("durations must be positive")
    return ms


# -- Command line ----------------------------------------------------------------------------


async def run_pairs_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run `--mode pairs`: rank the exchange's pairs now and print the table.

    Returns 0 for a live ranking, 1 when the exchange could not answer and a fallback
    list was printed instead.
    """
    from exchange import Exchange

    state = settings.storage.data_dir / "state" / "pairs.json"
    async with Exchange(settings.exchange) as exchange:
        top = TopPairs(
            exchange, settings.pairs, state_path=state, market_type=settings.exchange.market_type
        )
        result = await top.refresh()
    print_ranking(result)
    return 0 if result.source == "exchange" else 1


def print_ranking(result: PairListResult, console: Any = None) -> None:
    """Print a ranking as a rich table."""
    from rich.console import Console
    from rich.table import Table

    title = f"Top pairs ({result.source})"
    table = Table(title=title)
    for column in ("#", "pair", "24h quote volume", "spread bps", "depth +-1%", "last"):
        table.add_column(column, justify="left" if column == "pair" else "right")
    stats = {s.pair: s for s in result.stats}
    for rank, pair in enumerate(result.pairs, 1):
        s = stats.get(pair)
        table.add_row(
            str(rank),
            pair,
            _num(s.quote_volume_24h if s else None),
            _num(s.spread_bps if s else None, 2),
            _num(s.depth_quote if s else None),
            _num(s.last if s else None, 6),
        )
    (console or Console()).print(table)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}" if digits == 0 else f"{value:.{digits}f}"
