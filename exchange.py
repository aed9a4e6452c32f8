"""Bybit V5 (unified trading account, spot and USDT perpetuals) through ccxt async + ccxt.pro.

`Exchange` is the one door to the exchange: every method returns `models` types and raises
our error tree (`error_handler.map_ccxt_errors`); ccxt dicts never leave this module and
its parts (rate_budgets, bybit_client, bybit_converters, bybit_orders, bybit_streams).

What it adds on top of ccxt:

- **Rate budgets** mirroring Bybit's published limits (600 requests / 5 s per IP; order
  create/cancel 10/s linear and 20/s spot; queries 50/s), scaled by
  `settings.rate_limit_safety`. They are sliding windows, not token buckets: Bybit counts
  requests in rolling windows, and a bucket's burst can exceed the window count. ccxt's
  own leaky bucket is off; every REST call, including those ccxt makes on its own
  (market paging, UTA probes), passes through `fetch2` and waits for its budgets.
  403/429/retCode 10006 pause the budget that was hit for Bybit's
  `X-Bapi-Limit-Reset-Timestamp` delay when present.
- **Retries** with capped, jittered backoff (`utils.utilities.retry_async`) for
  idempotent calls; a clock-skew refusal (10002) resynchronises ccxt's `timeDifference`
  before the retry. `create_order` is never blindly resent: after an ambiguous failure
  it asks for the client order id first, and the id is reused on a resend so Bybit
  refuses a duplicate (110072/170141), which is answered by looking the order up.
- **Conditional orders** are looked up and cancelled as such (`orderFilter=StopOrder`),
  then in history, so a stop is never reported "not found" and placed twice.
- **Streams** as async iterators that survive dropped sockets: jittered reconnect,
  resubscribe, resynchronise from REST. `watch_candles` yields every closed candle once
  and in order per pair, filling gaps from `fetch_ohlcv`.

Connection: testnet by default; mainnet only when the settings allow it. A `base_url`
(`http://127.0.0.1:PORT`) points REST at `<base>/v5/...` and streams at
`ws://host:port/v5/public/{spot,linear}` and `/v5/private` (see WIRE.md section 1).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from bybit_converters import (
    balances_from_ccxt,
    book_from_ccxt,
    candle_from_row,
    market_from_ccxt,
    position_from_ccxt,
    ticker_from_ccxt,
    trade_from_ccxt,
)
from bybit_funding import ExchangeFunding
from bybit_orders import ExchangeOrders
from bybit_streams import ExchangeStreams
from error_handler import (
    BadResponseError,
    ClockSkewError,
    ConfigError,
    ExchangeRejectedError,
    InvariantError,
    OrderRejected,
    RecoverableError,
    map_ccxt_errors,
)
from exchange_base import ClientState
from models import (
    Balance,
    Candle,
    Market,
    MarketType,
    OrderBook,
    Position,
    Ticker,
    Trade,
)
from rate_budgets import RateBudget, RateBudgets
from utils.utilities import (
    Clock,
    WallClock,
    backoff_delay,
    register_secret,
    retry_async,
    timeframe_to_ms,
)


if TYPE_CHECKING:
    from config import ExchangeSettings


__all__ = ["ClientState", "Exchange", "RateBudget", "bybit_client_class"]

T = TypeVar("T")
log = structlog.get_logger(__name__)

_OHLCV_PAGE: Final = 1000  # Bybit's kline maximum per request
_LEVERAGE_UNCHANGED: Final = "110043"


# -- The ccxt client -------------------------------------------------------------------------


def bybit_client_class() -> type:
    """Return the ccxt.pro Bybit class with Kestrel's hooks (built on first use).

    The hooks: `fetch2` spends the rate budgets, `handle_errors` attaches Bybit's reset
    delay to rate-limit errors and refuses non-JSON 200 bodies (ccxt would return
    garbage, WIRE.md section 3), and `parse_ws_ohlcv` keeps Bybit's `confirm` flag.
    Signing, requests and parsing stay ccxt's own.
    """
    from bybit_client import KestrelBybit  # imports ccxt (~0.3 s); main imports us lazily

    return KestrelBybit


def _ccxt_config(s: ExchangeSettings) -> dict[str, Any]:
    # The ccxt constructor config; registers the keys for log redaction.
    from bybit_client import loopback_urls  # with ccxt, which the client needs anyway

    config: dict[str, Any] = {
        "enableRateLimit": False,  # our budgets replace ccxt's leaky bucket
        "timeout": int(s.timeout_s * 1000),
        "has": {"fetchCurrencies": False},
        "options": {
            "fetchMarkets": {"types": ["spot", "linear"]},
            "enableUnifiedAccount": True,
            "enableUnifiedMargin": False,
            "recvWindow": s.recv_window_ms,
            "defaultType": "spot" if s.market_type == "spot" else "swap",
            "fetchOrder": {"acknowledged": True},
            "watchPositions": {"fetchPositionsSnapshot": False},
            # No permessage-deflate offer: ccxt offers it by default, and where a server
            # accepts, every frame is inflated in our loop (a kline frame is ~350 bytes).
            "ws": {"compress": 0},
        },
    }
    if s.has_keys:
        assert s.api_key is not None
        assert s.api_secret is not None
        key, secret = s.api_key.get_secret_value(), s.api_secret.get_secret_value()
        register_secret(key)
        register_secret(secret)
        config |= {"apiKey": key, "secret": secret}
    if s.base_url is not None:
        # Override `test` and `demotrading` too: set_sandbox_mode copies `test` over `api`.
        urls = loopback_urls(s.base_url)
        config["urls"] = {k: copy.deepcopy(urls) for k in ("api", "test", "demotrading")}
        if s.base_url.startswith("http://"):
            config["timeout_on_exit"] = 0  # the 250 ms wait is for TLS shutdown only
    return config


# -- The exchange ----------------------------------------------------------------------------


class Exchange(ExchangeOrders, ExchangeStreams, ExchangeFunding):
    """Bybit V5 for Kestrel: REST, streams, rate budgets, retries; models in, models out.

    Use as an async context manager; it opens once (loads markets, checks the clock) and
    closes once::

        async with Exchange(settings.exchange) as ex:
            candles = await ex.fetch_ohlcv("BTC/USDT", "1m", limit=300)
            async for candle in ex.watch_candles(["BTC/USDT"], "1m", since=...):
                ...

    Args:
        settings: the `exchange` settings group.
        clock: time source for "is this candle closed" (wall clock by default).
        retry_attempts: attempts for idempotent calls (and resends of `create_order`).
        retry_base_s: first backoff step; doubles per attempt, full jitter.
        retry_cap_s: longest backoff.
        ip_ban_pause_s: how long to stop all requests after an HTTP 403 IP ban.
        rng: randomness for jitter (seed it in tests).
        client_class: the ccxt.pro class to build (tests pass a subclass that fakes the
            transport); default `bybit_client_class()`.
    """

    def __init__(
        self,
        settings: ExchangeSettings,
        *,
        clock: Clock | None = None,
        retry_attempts: int = 5,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 30.0,
        ip_ban_pause_s: float = 600.0,
        rng: random.Random | None = None,
        client_class: type | None = None,
    ) -> None:
        if not settings.testnet and not settings.allow_mainnet and settings.base_url is None:
            raise ConfigError(
                "mainnet needs KESTREL_EXCHANGE__ALLOW_MAINNET=true", component="exchange"
            )
        self.settings = settings
        self.state = ClientState.UNOPENED
        self._clock: Clock = clock or WallClock()
        self._attempts = retry_attempts
        self._base = retry_base_s
        self._cap = retry_cap_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._budgets = RateBudgets(settings.rate_limit_safety, ip_ban_pause_s)
        self._client_class = client_class
        self._ccxt: Any = None
        self._markets: dict[str, Market] = {}
        self._offset_ms = 0
        self._last_price: dict[str, Decimal] = {}
        self._conditional: dict[str, bool] = {}  # client or exchange id -> is a stop order
        self._leverage: dict[str, Decimal] = {}

    # -- Lifecycle -----------------------------------------------------------------------------

    def _build_client(self) -> Any:
        config = _ccxt_config(self.settings)
        client = (self._client_class or bybit_client_class())(config)
        client.kestrel_budgets = self._budgets
        if self.settings.testnet:
            client.set_sandbox_mode(True)
        return client

    async def open(self) -> Exchange:
        """Build the ccxt client, load the markets and check the clock offset."""
        if self.state is not ClientState.UNOPENED:
            raise InvariantError(f"cannot open an exchange in state {self.state.name.lower()}")
        self._ccxt = self._build_client()
        self.state = ClientState.OPENED
        try:
            await self.check_clock_offset()
            await self.load_markets()
        except BaseException:
            await self.close()
            raise
        log.info(
            "exchange_opened",
            testnet=self.settings.testnet,
            base_url=self.settings.base_url,
            markets=len(self._markets),
            clock_offset_ms=self._offset_ms,
        )
        return self

    async def close(self) -> None:
        """Close sockets and the HTTP session; idempotent."""
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        if self._ccxt is not None:
            with contextlib.suppress(Exception):
                await self._ccxt.close()
        log.info("exchange_closed")

    async def __aenter__(self) -> Exchange:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_open(self) -> Any:
        if self.state is not ClientState.OPENED:
            hint = "use `async with Exchange(...)`" if self.state is ClientState.UNOPENED else ""
            raise InvariantError(f"exchange is {self.state.name.lower()} {hint}".strip())
        return self._ccxt

    # -- Calling ccxt --------------------------------------------------------------------------

    async def _once(self, op: str, call: Callable[[], Awaitable[T]], pair: str | None) -> T:
        # One attempt with errors mapped; a clock-skew refusal resynchronises first.
        self._ensure_open()
        try:
            with map_ccxt_errors(component="exchange", pair=pair, op=op):
                return await call()
        except ClockSkewError:
            with contextlib.suppress(RecoverableError):
                await self._sync_clock(force=True)
            raise

    async def _call(self, op: str, call: Callable[[], Awaitable[T]], pair: str | None = None) -> T:
        # An idempotent call: retried on RecoverableError with jittered backoff.
        return await retry_async(
            lambda: self._once(op, call, pair),
            attempts=self._attempts,
            base=self._base,
            cap=self._cap,
            sleep=self._clock.sleep,
            rng=self._rng,
        )

    def _backoff(self, attempt: int, error: RecoverableError) -> float:
        return backoff_delay(
            attempt, base=self._base, cap=self._cap, rng=self._rng, retry_after=error.retry_after
        )

    # -- Markets and time ----------------------------------------------------------------------

    async def load_markets(self) -> dict[str, Market]:
        """Load (or reload) spot and linear markets and return them by pair."""
        client = self._ensure_open()
        raw = await self._call("load_markets", lambda: client.load_markets(reload=True))
        markets = {}
        for item in raw.values():
            market = market_from_ccxt(item)
            if market is not None:
                markets[market.pair] = market
        self._markets = markets
        return dict(markets)

    @property
    def markets(self) -> dict[str, Market]:
        """Return the loaded markets by pair."""
        return dict(self._markets)

    def market(self, pair: str) -> Market:
        """Return the rules of `pair` ("BTC/USDT" spot, "BTC/USDT:USDT" linear).

        Raises:
            OrderRejected: the pair is not listed.
        """
        market = self._markets.get(pair)
        if market is None:
            raise OrderRejected(f"unknown pair {pair!r}", component="exchange", pair=pair)
        return market

    async def fetch_server_time(self) -> int:
        """Return Bybit's server time in epoch ms."""
        client = self._ensure_open()
        value = await self._call("fetch_server_time", lambda: client.fetch_time())
        if not isinstance(value, int | float) or value <= 0:
            raise BadResponseError("server time missing from response", component="exchange")
        return int(value)

    async def check_clock_offset(self) -> int:
        """Measure server minus local time (ms); past the allowed skew, fix ccxt's signing."""
        return await self._sync_clock(force=False)

    async def _sync_clock(self, *, force: bool) -> int:
        client = self._ensure_open()
        local0, ccxt0 = self._clock.now_ms(), client.milliseconds()
        server = await self.fetch_server_time()
        local1, ccxt1 = self._clock.now_ms(), client.milliseconds()
        self._offset_ms = server - (local0 + local1) // 2
        ccxt_offset = server - (ccxt0 + ccxt1) // 2
        if force or abs(ccxt_offset) > self.settings.max_clock_skew_ms:
            # ccxt signs with milliseconds() - timeDifference.
            client.options["timeDifference"] = -ccxt_offset
            log.warning("clock_offset_adjusted", offset_ms=ccxt_offset)
        return self._offset_ms

    def server_now_ms(self) -> int:
        """Return the estimated server time (local clock + the last measured offset)."""
        return self._clock.now_ms() + self._offset_ms

    def rate_limit_budget(self) -> dict[str, float]:
        """Return the free share of each rate budget (1.0 = idle, 0.0 = exhausted)."""
        return {name: b.remaining_fraction() for name, b in self._budgets.by_class.items()}

    # -- Market data ---------------------------------------------------------------------------

    def _ticker(self, raw: dict[str, Any], pair: str | None = None) -> Ticker:
        pair = pair or str(raw.get("symbol"))
        last = raw.get("last")
        if last is not None:
            self._last_price[pair] = Decimal(str(last))
        return ticker_from_ccxt(raw, pair, self.server_now_ms())

    async def fetch_ticker(self, pair: str) -> Ticker:
        """Return the ticker of `pair`."""
        client = self._ensure_open()
        symbol = self.market(pair).pair
        raw = await self._call("fetch_ticker", lambda: client.fetch_ticker(symbol), pair)
        return self._ticker(raw, pair)

    async def fetch_tickers(self, pairs: Sequence[str] | None = None) -> dict[str, Ticker]:
        """Return tickers by pair (all markets of both categories when `pairs` is None)."""
        client = self._ensure_open()
        out: dict[str, Ticker] = {}
        for kind, group in self._group(pairs).items():
            params = (
                {"type": "spot"}
                if kind is MarketType.SPOT
                else {"type": "swap", "subType": "linear"}
            )
            wanted = list(group) if pairs is not None else None
            raw = await self._call(
                "fetch_tickers", functools.partial(client.fetch_tickers, wanted, params)
            )
            for symbol, item in raw.items():
                if symbol in self._markets and (wanted is None or symbol in wanted):
                    out[symbol] = self._ticker(item, symbol)
        return out

    def _group(self, pairs: Sequence[str] | None) -> dict[MarketType, list[str]]:
        groups: dict[MarketType, list[str]] = {}
        if pairs is None:
            return {MarketType.SPOT: [], MarketType.LINEAR: []}
        for pair in pairs:
            groups.setdefault(self.market(pair).type, []).append(pair)
        return groups

    async def fetch_order_book(self, pair: str, limit: int = 50) -> OrderBook:
        """Return the top `limit` levels of the book."""
        client = self._ensure_open()
        raw = await self._call(
            "fetch_order_book", lambda: client.fetch_order_book(pair, limit), pair
        )
        return self._book(raw, pair, limit)

    def _book(self, raw: dict[str, Any], pair: str, depth: int) -> OrderBook:
        return book_from_ccxt(raw, pair, depth, self.server_now_ms())

    async def fetch_trades(
        self, pair: str, since: int | None = None, limit: int | None = None
    ) -> list[Trade]:
        """Return recent public trades, oldest first."""
        client = self._ensure_open()
        raw = await self._call(
            "fetch_trades", lambda: client.fetch_trades(pair, since, limit), pair
        )
        return [trade_from_ccxt(t, pair) for t in raw]

    async def fetch_ohlcv(
        self,
        pair: str,
        timeframe: str,
        since: int | None = None,
        limit: int | None = None,
        until: int | None = None,
    ) -> list[Candle]:
        """Return CLOSED candles, oldest first, paginating as needed.

        Args:
            pair: the market.
            timeframe: "1m", "5m", "1h", ...
            since: open time of the first candle wanted (rounded up to the timeframe);
                None means "the latest `limit` closed candles" (limit defaults to 200).
            limit: most candles to return (None with `since`: everything up to now).
            until: open time of the last candle wanted (inclusive).

        The still-forming candle is never returned: a candle is closed when its end is
        not after the server time (local clock + measured offset).
        """
        self._ensure_open()
        return await self._fetch_closed(
            pair, timeframe, since, limit, until, now_ms=self.server_now_ms()
        )

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
        client = self._ensure_open()
        step = timeframe_to_ms(timeframe)
        last = now_ms - now_ms % step - step  # newest closed candle
        if until is not None:
            last = min(last, until - until % step)
        if since is None:
            first = last - ((limit or 200) - 1) * step
        else:
            first = -(-since // step) * step
            if limit is not None:
                last = min(last, first + (limit - 1) * step)
        candles: dict[int, Candle] = {}
        cursor = first
        while cursor <= last:
            end = min(last, cursor + (_OHLCV_PAGE - 1) * step)
            rows = await self._call(
                "fetch_ohlcv",
                functools.partial(
                    client.fetch_ohlcv, pair, timeframe, cursor, _OHLCV_PAGE, {"until": end}
                ),
                pair,
            )
            for row in rows:
                ts = int(row[0])
                if cursor <= ts <= end and ts + step <= now_ms:
                    candles[ts] = candle_from_row(pair, timeframe, row)
            cursor = end + step
        return [candles[ts] for ts in sorted(candles)]

    # -- Account -------------------------------------------------------------------------------

    async def fetch_balance(self) -> dict[str, Balance]:
        """Return the unified account's balances by currency."""
        client = self._ensure_open()
        raw = await self._call("fetch_balance", lambda: client.fetch_balance())
        return balances_from_ccxt(raw)

    async def fetch_positions(self, pairs: Sequence[str] | None = None) -> list[Position]:
        """Return the open (non-flat) linear positions, optionally only of `pairs`."""
        client = self._ensure_open()
        linear = [p for p in pairs or () if self.market(p).type is MarketType.LINEAR]
        if pairs is not None and not linear:
            return []
        symbols = linear if len(linear) == 1 else None  # ccxt refuses several symbols
        raw = await self._call(
            "fetch_positions",
            lambda: client.fetch_positions(symbols, {"type": "swap", "subType": "linear"}),
        )
        positions = [p for p in (position_from_ccxt(r) for r in raw) if p is not None]
        return [p for p in positions if pairs is None or p.pair in linear]

    async def set_leverage(self, pair: str, leverage: Decimal | int | float) -> None:
        """Set the leverage of a linear market (both sides; one-way mode).

        Raises:
            OrderRejected: spot markets have no leverage, or above the market's maximum.
        """
        client = self._ensure_open()
        market = self.market(pair)
        value = Decimal(str(leverage))
        if market.type is not MarketType.LINEAR or not 1 <= value <= market.max_leverage:
            raise OrderRejected(
                f"leverage {value} not allowed on {pair} (max {market.max_leverage})",
                component="exchange",
                pair=pair,
            )
        try:
            await self._call("set_leverage", lambda: client.set_leverage(float(value), pair), pair)
        except ExchangeRejectedError as e:
            if _LEVERAGE_UNCHANGED not in str(e.__cause__):
                raise
        self._leverage[pair] = value

    # -- Orders --------------------------------------------------------------------------------
