"""Bybit V5 (unified trading account, spot and USDT perpetuals) through ccxt async + ccxt.pro.

`Exchange` is the one door to the exchange: every method returns `models` types and raises
our error tree (`error_handler.map_ccxt_errors`); ccxt dicts never leave this module.

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

import asyncio
import contextlib
import copy
import dataclasses
import enum
import functools
import hashlib
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from error_handler import (
    BadResponseError,
    ClockSkewError,
    ConfigError,
    ExchangeRejectedError,
    InvariantError,
    NetworkError,
    OrderNotFoundError,
    OrderRejected,
    RateLimitError,
    RecoverableError,
    map_ccxt_errors,
)
from models import (
    Balance,
    Candle,
    Fill,
    Liquidity,
    Market,
    MarketType,
    Order,
    OrderBook,
    OrderIntent,
    OrderStatus,
    OrderType,
    Position,
    PositionSide,
    Side,
    Ticker,
    TimeInForce,
    Trade,
)
from utils.precision import validate_intent
from utils.utilities import Clock, WallClock, register_secret, retry_async, timeframe_to_ms


if TYPE_CHECKING:
    from config import ExchangeSettings


__all__ = ["ClientState", "Exchange", "RateBudget", "bybit_client_class"]

T = TypeVar("T")
log = structlog.get_logger(__name__)

_OHLCV_PAGE: Final = 1000  # Bybit's kline maximum per request
_ORDER_PAGE: Final = 50
_MAX_PAGES: Final = 10
# A fill REST sweep reaches this far before the previous sweep's start (clock skew, and
# executions Bybit indexes a moment late); the first sweep runs this soon after start-up.
_SWEEP_OVERLAP_MS: Final = 60_000
_FIRST_POLL_S: Final = 2.0
_SUBSCRIBE_GRACE_S: Final = 0.3  # for the queued subscribe frames to reach the exchange
# The longest range /v5/execution/list answers in one query (startTime to endTime).
_EXECUTION_WINDOW_MS: Final = 7 * 86_400_000
_LINK_ID_MAX: Final = 36  # Bybit's orderLinkId length limit

# Bybit orderStatus -> ours (WIRE.md: ccxt folds PartiallyFilledCanceled into "closed").
_STATUS: Final[dict[str, OrderStatus]] = {
    "Created": OrderStatus.NEW,
    "New": OrderStatus.OPEN,
    "Untriggered": OrderStatus.OPEN,
    "Triggered": OrderStatus.OPEN,
    "Active": OrderStatus.OPEN,
    "PartiallyFilled": OrderStatus.PARTIALLY_FILLED,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELLED,
    "PartiallyFilledCanceled": OrderStatus.CANCELLED,
    "Deactivated": OrderStatus.CANCELLED,
    "Rejected": OrderStatus.REJECTED,
}
_CCXT_STATUS: Final[dict[str, OrderStatus]] = {
    "open": OrderStatus.OPEN,
    "closed": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELLED,
    "rejected": OrderStatus.REJECTED,
    "expired": OrderStatus.EXPIRED,
}
_TIF: Final[dict[str, TimeInForce]] = {t.value.upper(): t for t in TimeInForce}
# retCodes that mean "an order with this orderLinkId already exists" (linear / spot).
_DUPLICATE_LINK_ID: Final = ("110072", "170141")
_LEVERAGE_UNCHANGED: Final = "110043"


class ClientState(enum.Enum):
    """Lifecycle of an `Exchange` (httpx's guard): it opens once and closes once."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


# -- Rate budgets ----------------------------------------------------------------------------


class RateBudget:
    """At most `limit` requests in any rolling window of `window_s` seconds.

    `acquire` waits (FIFO) until a slot is free; `pause` blocks the budget entirely, e.g.
    until the reset time Bybit announced after a 10006.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        window_s: float,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError(f"budget {name} needs a limit >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self.window_s = window_s
        self._now = now
        self._sleep = sleep
        self._hits: deque[float] = deque()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def _evict(self, now: float) -> None:
        while self._hits and now - self._hits[0] >= self.window_s:
            self._hits.popleft()

    async def acquire(self) -> None:
        """Wait for a free slot in the window and take it."""
        async with self._lock:
            while True:
                now = self._now()
                self._evict(now)
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                if len(self._hits) < self.limit:
                    self._hits.append(now)
                    return
                await self._sleep(self._hits[0] + self.window_s - now)

    def pause(self, seconds: float) -> None:
        """Let nothing through for `seconds` (extends, never shortens, a pause)."""
        self._paused_until = max(self._paused_until, self._now() + max(seconds, 0.0))

    def remaining_fraction(self) -> float:
        """Return the share of the window still free (0 while paused)."""
        now = self._now()
        if now < self._paused_until:
            return 0.0
        self._evict(now)
        return max(0.0, 1.0 - len(self._hits) / self.limit)


# Published Bybit limits: (requests, window seconds). Queries share one budget (each
# endpoint has its own 50/s at Bybit, so sharing is the conservative side).
_PUBLISHED: Final[dict[str, tuple[int, float]]] = {
    "ip": (600, 5.0),
    "order_linear": (10, 1.0),
    "order_spot": (20, 1.0),
    "query": (50, 1.0),
    "position": (10, 1.0),
    "account": (5, 1.0),
}
_ORDER_PATHS: Final = frozenset(
    {"v5/order/create", "v5/order/cancel", "v5/order/amend", "v5/order/cancel-all"}
)


def _budget_class(path: str, params: Any) -> str | None:
    # Which per-UID budget an endpoint spends; public market data spends only the IP one.
    if path.startswith("v5/market/"):
        return None
    if path in _ORDER_PATHS:
        category = params.get("category") if isinstance(params, dict) else None
        return "order_spot" if category == "spot" else "order_linear"
    if path in ("v5/position/set-leverage", "v5/position/trading-stop"):
        return "position"
    if path in ("v5/user/query-api", "v5/asset/coin/query-info", "v5/account/info"):
        return "account"
    return "query"


class _Budgets:
    # The budgets of one Exchange, keyed by class, and the policy when Bybit says "slow down".
    def __init__(self, safety: float, ip_ban_pause_s: float) -> None:
        self.ip_ban_pause_s = ip_ban_pause_s
        self.by_class = {
            name: RateBudget(name, max(1, math.floor(limit * safety)), window)
            for name, (limit, window) in _PUBLISHED.items()
        }

    async def acquire(self, path: str, params: Any) -> None:
        name = _budget_class(path, params)
        if name is not None:
            await self.by_class[name].acquire()
        await self.by_class["ip"].acquire()

    def penalise(self, path: str, params: Any, retry_after: float | None, status: int) -> None:
        if status == 403:  # IP ban: Bybit bans for >= 10 minutes; hammering extends it
            self.by_class["ip"].pause(retry_after or self.ip_ban_pause_s)
            return
        name = _budget_class(path, params) or "ip"
        self.by_class[name].pause(retry_after if retry_after is not None else 1.0)


# -- The ccxt client -------------------------------------------------------------------------

_client_class: type | None = None


def _reset_delay(headers: Any, server_now_ms: float) -> float | None:
    # Bybit's X-Bapi-Limit-Reset-Timestamp (ms) -> seconds to wait; ccxt never reads it.
    if not isinstance(headers, dict):
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    raw = lowered.get("x-bapi-limit-reset-timestamp")
    if raw is None:
        retry = lowered.get("retry-after")
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, float(retry)) if retry is not None else None
        return None
    try:
        return min(60.0, max(0.0, (int(raw) - server_now_ms) / 1000))
    except (TypeError, ValueError):
        return None


def bybit_client_class() -> type:
    """Return the ccxt.pro Bybit class with Kestrel's hooks (built on first use).

    The hooks: `fetch2` spends the rate budgets, `handle_errors` attaches Bybit's reset
    delay to rate-limit errors and refuses non-JSON 200 bodies (ccxt would return
    garbage, WIRE.md section 3), and `parse_ws_ohlcv` keeps Bybit's `confirm` flag.
    Signing, requests and parsing stay ccxt's own.
    """
    global _client_class  # one lazily built subclass per process
    if _client_class is not None:
        return _client_class
    import ccxt  # ~0.3 s to import; main imports us lazily
    import ccxt.pro

    class KestrelBybit(ccxt.pro.bybit):  # type: ignore[misc,name-defined]
        kestrel_budgets: _Budgets | None = None

        async def authenticate(self, url: str, params: Any = None) -> Any:
            # ccxt 4.5.90 signs the private WebSocket login with the local clock
            # (`milliseconds() + 10000`), ignoring the offset it measured for REST; with a
            # local clock 10 s behind Bybit's, every login fails. Sign with the corrected
            # clock, exactly as REST requests are.
            self.check_required_credentials()
            client = self.client(url)
            future = client.reusableFuture("authenticated")
            if self.safe_value(client.subscriptions, "authenticated") is None:
                offset = self.safe_integer(self.options, "timeDifference", 0) or 0
                expires = self.number_to_string(self.milliseconds() - offset + 10000)
                signature = self.hmac(
                    self.encode("GET/realtime" + expires),
                    self.encode(self.secret),
                    hashlib.sha256,
                    "hex",
                )
                message = self.extend(
                    {"op": "auth", "args": [self.apiKey, expires, signature]}, params or {}
                )
                self.watch(url, "authenticated", message, "authenticated")
            return await future

        async def fetch2(
            self,
            path: str,
            api: Any = ("public",),
            method: str = "GET",
            params: Any = None,
            config: Any = None,
        ) -> Any:
            params = {} if params is None else params
            budgets = self.kestrel_budgets
            if budgets is not None:
                await budgets.acquire(path, params)
            try:
                return await super().fetch2(path, api, method, params, config or {})
            except ccxt.RateLimitExceeded as e:
                if budgets is not None:
                    status = getattr(e, "http_status", 0)
                    budgets.penalise(path, params, getattr(e, "retry_after", None), status)
                raise

        def handle_errors(
            self,
            code: int,
            reason: str,
            url: str,
            method: str,
            headers: Any,
            body: str,
            response: Any,
            request_headers: Any,
            request_body: Any,
        ) -> Any:
            delay = _reset_delay(headers, self.nonce())
            try:
                super().handle_errors(
                    code,
                    reason,
                    url,
                    method,
                    headers,
                    body,
                    response,
                    request_headers,
                    request_body,
                )
            except ccxt.RateLimitExceeded as e:
                e.retry_after = delay  # read by error_handler when mapping
                e.http_status = code
                raise
            if response is None and code in (403, 429):
                error = ccxt.RateLimitExceeded(f"{self.id} {code} {str(body)[:120]}")
                error.retry_after = delay
                error.http_status = code
                raise error
            if response is None and 200 <= code < 300:
                raise ccxt.BadResponse(f"{self.id} non-JSON body for {method} {url}: {body[:80]!r}")
            return None

        def parse_ws_ohlcv(self, ohlcv: Any, market: Any = None) -> list[Any]:
            row: list[Any] = super().parse_ws_ohlcv(ohlcv, market)
            row.append(self.safe_bool(ohlcv, "confirm", False))
            return row

    _client_class = KestrelBybit
    return KestrelBybit


def _loopback_urls(base_url: str) -> dict[str, Any]:
    http = base_url.rstrip("/")
    ws = "ws" + http[len("http") :]
    return {
        "public": http,
        "private": http,
        "spot": http,
        "futures": http,
        "v2": http,
        "ws": {
            "public": {
                "spot": f"{ws}/v5/public/spot",
                "linear": f"{ws}/v5/public/linear",
                "inverse": f"{ws}/v5/public/inverse",
                "option": f"{ws}/v5/public/option",
            },
            "private": {
                "contract": f"{ws}/v5/private",
                "spot": {"unified": f"{ws}/v5/private", "nonUnified": f"{ws}/spot/private/v3"},
                "usdc": f"{ws}/trade/option/usdc/private/v1",
                "trade": f"{ws}/v5/trade",
            },
        },
    }


# -- Conversions -----------------------------------------------------------------------------


def _dec(value: Any) -> Decimal | None:
    # Exchange strings -> Decimal; "", None, "0" placeholders -> None.
    if value is None or value == "":
        return None
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        return None
    return out if out.is_finite() else None


def _dec0(value: Any) -> Decimal:
    return _dec(value) or Decimal(0)


def _nonzero(value: Any) -> Decimal | None:
    out = _dec(value)
    return out if out else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _market_from_ccxt(raw: dict[str, Any]) -> Market | None:
    if raw.get("spot"):
        kind = MarketType.SPOT
    elif raw.get("swap") and raw.get("linear"):
        kind = MarketType.LINEAR
    else:
        return None
    info = raw.get("info") or {}
    lot_filter = info.get("lotSizeFilter") or {}
    price_filter = info.get("priceFilter") or {}
    precision = raw.get("precision") or {}
    limits = raw.get("limits") or {}
    spot = kind is MarketType.SPOT
    tick = _dec(price_filter.get("tickSize")) or _dec(precision.get("price"))
    lot = _dec(lot_filter.get("basePrecision" if spot else "qtyStep")) or _dec(
        precision.get("amount")
    )
    min_notional = _dec(lot_filter.get("minOrderAmt" if spot else "minNotionalValue"))
    leverage = _dec((info.get("leverageFilter") or {}).get("maxLeverage")) if not spot else None
    if tick is None or lot is None:
        return None
    return Market(
        pair=raw["symbol"],
        symbol_id=raw["id"],
        base=raw["base"],
        quote=raw["quote"],
        type=kind,
        tick_size=tick,
        lot_size=lot,
        min_qty=_dec(lot_filter.get("minOrderQty"))
        or _dec((limits.get("amount") or {}).get("min"))
        or lot,
        min_notional=min_notional or _dec0((limits.get("cost") or {}).get("min")),
        max_qty=_dec(lot_filter.get("maxOrderQty")),
        max_leverage=leverage or Decimal(1),
        active=bool(raw.get("active", True)),
        contract_size=_dec(raw.get("contractSize")) or Decimal(1),
    )


def _order_type(info: dict[str, Any], raw: dict[str, Any]) -> OrderType:
    kind = str(info.get("orderType") or raw.get("type") or "").lower()
    stop = _nonzero(info.get("triggerPrice")) is not None
    if kind == "market":
        return OrderType.STOP_MARKET if stop else OrderType.MARKET
    return OrderType.STOP_LIMIT if stop else OrderType.LIMIT


def _order_status(info: dict[str, Any], raw: dict[str, Any], filled: Decimal) -> OrderStatus:
    status = _STATUS.get(str(info.get("orderStatus")))
    if status is None:
        status = _CCXT_STATUS.get(str(raw.get("status")), OrderStatus.NEW)
    if status is OrderStatus.OPEN and filled > 0:
        return OrderStatus.PARTIALLY_FILLED
    return status


def _order_from_ccxt(raw: dict[str, Any]) -> Order:
    info = raw.get("info") or {}
    filled = _dec(info.get("cumExecQty")) or _dec0(raw.get("filled"))
    qty = _dec(info.get("qty")) or _dec0(raw.get("amount"))
    if info.get("marketUnit") == "quoteCoin":  # spot market buy sized in quote: report base
        qty = filled
    fee = _dec(info.get("cumExecFee"))
    if fee is None:
        fee = _dec0((raw.get("fee") or {}).get("cost"))
    created = int(raw.get("timestamp") or info.get("createdTime") or 0)
    return Order(
        client_order_id=str(info.get("orderLinkId") or raw.get("clientOrderId") or ""),
        pair=str(raw.get("symbol")),
        side=Side(str(raw.get("side") or str(info.get("side", "buy")).lower())),
        type=_order_type(info, raw),
        qty=qty,
        status=_order_status(info, raw, filled),
        ts_created=created,
        ts_updated=int(raw.get("lastUpdateTimestamp") or info.get("updatedTime") or created),
        exchange_order_id=str(raw.get("id") or info.get("orderId") or "") or None,
        price=_nonzero(info.get("price")) if "price" in info else _nonzero(raw.get("price")),
        stop_price=_nonzero(info.get("triggerPrice")) or _nonzero(raw.get("triggerPrice")),
        filled_qty=filled,
        avg_fill_price=_nonzero(info.get("avgPrice")) or _nonzero(raw.get("average")),
        fee=fee,
        reduce_only=bool(raw.get("reduceOnly") or info.get("reduceOnly")),
        time_in_force=_TIF.get(str(info.get("timeInForce") or "GTC").upper(), TimeInForce.GTC),
    )


def _fill_from_ccxt(raw: dict[str, Any]) -> Fill:
    info = raw.get("info") or {}
    fee = raw.get("fee") or {}
    return Fill(
        client_order_id=str(info.get("orderLinkId") or ""),
        pair=str(raw.get("symbol")),
        side=Side(str(raw.get("side"))),
        price=_dec(info.get("execPrice")) or _dec0(raw.get("price")),
        qty=_dec(info.get("execQty")) or _dec0(raw.get("amount")),
        fee=_dec(info.get("execFee")) or _dec0(fee.get("cost")),
        fee_currency=str(fee.get("currency") or info.get("feeCurrency") or ""),
        liquidity=Liquidity.MAKER if raw.get("takerOrMaker") == "maker" else Liquidity.TAKER,
        ts=int(raw.get("timestamp") or 0),
        fill_id=str(raw.get("id") or info.get("execId")),
        exchange_order_id=str(raw.get("order") or info.get("orderId") or "") or None,
    )


def _position_from_ccxt(raw: dict[str, Any]) -> Position | None:
    info = raw.get("info") or {}
    contracts = _dec(raw.get("contracts")) or _dec(info.get("size"))
    side = raw.get("side")
    if not contracts or side not in ("long", "short"):
        return None
    size = _dec(raw.get("contractSize")) or Decimal(1)
    return Position(
        pair=str(raw.get("symbol")),
        side=PositionSide(side),
        qty=abs(contracts) * size,
        entry_price=_dec(info.get("avgPrice")) or _dec0(raw.get("entryPrice")),
        ts_opened=int(raw.get("timestamp") or info.get("createdTime") or 0),
        stop_price=_nonzero(info.get("stopLoss")),
        take_profit=_nonzero(info.get("takeProfit")),
        mark_price=_nonzero(info.get("markPrice")) or _nonzero(raw.get("markPrice")),
    )


def _balances_from_ccxt(raw: dict[str, Any]) -> dict[str, Balance]:
    totals = raw.get("total") or {}
    free, used = raw.get("free") or {}, raw.get("used") or {}
    out = {}
    for currency, total in totals.items():
        if total is None:
            continue
        out[currency] = Balance(
            currency=currency,
            free=_dec0(free.get(currency)),
            used=_dec0(used.get(currency)),
            total=_dec0(total),
        )
    return out


def _book_side(levels: Iterable[Sequence[Any]], depth: int) -> tuple[tuple[float, float], ...]:
    return tuple((float(p), float(q)) for p, q, *_ in list(levels)[:depth])


def _candle(pair: str, timeframe: str, row: Sequence[Any]) -> Candle:
    return Candle(
        pair=pair,
        timeframe=timeframe,
        ts=int(row[0]),
        open=float(row[1]),
        high=float(row[2]),
        low=float(row[3]),
        close=float(row[4]),
        volume=float(row[5] or 0),
    )


def _cursor_of(items: Iterable[dict[str, Any]]) -> str | None:
    # ccxt parks Bybit's nextPageCursor on one raw item (add_pagination_cursor_to_result).
    for item in items:
        cursor = (item.get("info") or {}).get("nextPageCursor")
        if cursor:
            return str(cursor)
    return None


# -- The exchange ----------------------------------------------------------------------------


class Exchange:
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
        self._budgets = _Budgets(settings.rate_limit_safety, ip_ban_pause_s)
        self._client_class = client_class
        self._ccxt: Any = None
        self._markets: dict[str, Market] = {}
        self._offset_ms = 0
        self._last_price: dict[str, Decimal] = {}
        self._conditional: dict[str, bool] = {}  # client or exchange id -> is a stop order
        self._leverage: dict[str, Decimal] = {}

    # -- Lifecycle -----------------------------------------------------------------------------

    def _build_client(self) -> Any:
        s = self.settings
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
            urls = _loopback_urls(s.base_url)
            config["urls"] = {k: copy.deepcopy(urls) for k in ("api", "test", "demotrading")}
            if s.base_url.startswith("http://"):
                config["timeout_on_exit"] = 0  # the 250 ms wait is for TLS shutdown only
        client = (self._client_class or bybit_client_class())(config)
        client.kestrel_budgets = self._budgets
        if s.testnet:
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
        if error.retry_after is not None:
            return error.retry_after
        return self._rng.uniform(0, min(self._cap, self._base * 2**attempt))

    # -- Markets and time ----------------------------------------------------------------------

    async def load_markets(self) -> dict[str, Market]:
        """Load (or reload) spot and linear markets and return them by pair."""
        client = self._ensure_open()
        raw = await self._call("load_markets", lambda: client.load_markets(reload=True))
        markets = {}
        for item in raw.values():
            market = _market_from_ccxt(item)
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
        return Ticker(
            pair=pair,
            ts=int(raw.get("timestamp") or self.server_now_ms()),
            bid=_float(raw.get("bid")),
            ask=_float(raw.get("ask")),
            last=_float(last),
            base_volume_24h=_float(raw.get("baseVolume")),
            quote_volume_24h=_float(raw.get("quoteVolume")),
        )

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
        return OrderBook(
            pair=pair,
            ts=int(raw.get("timestamp") or self.server_now_ms()),
            bids=_book_side(raw.get("bids") or (), depth),
            asks=_book_side(raw.get("asks") or (), depth),
        )

    async def fetch_trades(
        self, pair: str, since: int | None = None, limit: int | None = None
    ) -> list[Trade]:
        """Return recent public trades, oldest first."""
        client = self._ensure_open()
        raw = await self._call(
            "fetch_trades", lambda: client.fetch_trades(pair, since, limit), pair
        )
        return [self._trade(t, pair) for t in raw]

    @staticmethod
    def _trade(raw: dict[str, Any], pair: str) -> Trade:
        return Trade(
            pair=pair,
            ts=int(raw.get("timestamp") or 0),
            price=float(raw["price"]),
            qty=float(raw["amount"]),
            side=Side(str(raw.get("side") or "buy")),
            trade_id=str(raw.get("id") or ""),
        )

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
                    candles[ts] = _candle(pair, timeframe, row)
            cursor = end + step
        return [candles[ts] for ts in sorted(candles)]

    # -- Account -------------------------------------------------------------------------------

    async def fetch_balance(self) -> dict[str, Balance]:
        """Return the unified account's balances by currency."""
        client = self._ensure_open()
        raw = await self._call("fetch_balance", lambda: client.fetch_balance())
        return _balances_from_ccxt(raw)

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
        positions = [p for p in (_position_from_ccxt(r) for r in raw) if p is not None]
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

    async def create_order(self, intent: OrderIntent) -> Order:
        """Validate, round and place an order; return its state on the exchange.

        The intent is checked against the market first (precision, minimum quantity and
        notional...), so a refusal costs no request. `client_order_id` becomes Bybit's
        `orderLinkId`. After an ambiguous failure (timeout, network, 5xx, unreadable
        answer) the order is looked up by that id and resent only when Bybit has none.

        Raises:
            OrderRejected: broken market rule or exchange refusal (with the reason).
            InsufficientFundsError: not enough balance or margin.
            RecoverableError: still failing after the retries (the order may or may not
                exist; reconcile by client order id).
        """
        self._ensure_open()
        market = self.market(intent.pair)
        cid = intent.client_order_id
        if not cid or len(cid) > _LINK_ID_MAX:
            raise OrderRejected(
                f"client_order_id must be 1-{_LINK_ID_MAX} characters (Bybit orderLinkId)",
                component="exchange",
                pair=intent.pair,
                order_id=cid,
            )
        reference = None
        if intent.type is OrderType.MARKET and intent.price is None:
            reference = await self._reference_price(intent.pair)
        intent = validate_intent(intent, market, last_price=reference)
        linear = market.type is MarketType.LINEAR
        if (
            linear
            and intent.leverage is not None
            and self._leverage.get(intent.pair) != intent.leverage
        ):
            await self.set_leverage(intent.pair, intent.leverage)
        self._conditional[cid] = intent.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT)
        log.info("order_submitted", pair=intent.pair, client_order_id=cid, type=str(intent.type))
        order = await self._place(intent, self._order_args(intent, market))
        return dataclasses.replace(order, reason=intent.reason)

    async def _place(self, intent: OrderIntent, args: tuple[Any, ...]) -> Order:
        # Send, and after a failure decide between "it exists", "resend" and "give up".
        client = self._ensure_open()
        cid = intent.client_order_id
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await self._once(
                    "create_order", lambda: client.create_order(*args), intent.pair
                )
            except (RateLimitError, ClockSkewError) as e:
                # Refused before matching: resending is safe.
                if attempt >= self._attempts:
                    raise
                await self._clock.sleep(self._backoff(attempt, e))
                continue
            except (NetworkError, BadResponseError) as e:
                found = await self._lookup_after_failure(intent, e)
                if found is not None:
                    return found
                if attempt >= self._attempts:
                    raise
                await self._clock.sleep(self._backoff(attempt, e))
                log.warning("order_resent", pair=intent.pair, client_order_id=cid, attempt=attempt)
                continue
            except OrderRejected as e:
                if not any(code in str(e.__cause__) for code in _DUPLICATE_LINK_ID):
                    raise
                found = await self.fetch_order(intent.pair, client_order_id=cid)
                if found is None:
                    raise
                return found
            return await self._after_create(raw, intent)

    async def _lookup_after_failure(self, intent: OrderIntent, error: Exception) -> Order | None:
        log.warning(
            "order_outcome_unknown",
            pair=intent.pair,
            client_order_id=intent.client_order_id,
            error=type(error).__name__,
        )
        return await self.fetch_order(intent.pair, client_order_id=intent.client_order_id)

    async def _after_create(self, raw: dict[str, Any], intent: OrderIntent) -> Order:
        exchange_id = str(raw.get("id") or "") or None
        if exchange_id is not None:
            self._conditional[exchange_id] = self._conditional.get(intent.client_order_id, False)
        try:
            found = await self.fetch_order(
                intent.pair, client_order_id=intent.client_order_id, exchange_order_id=exchange_id
            )
        except RecoverableError:
            found = None  # accepted; its state will arrive by stream or the next lookup
        if found is not None:
            return found
        now = self.server_now_ms()
        return Order(
            client_order_id=intent.client_order_id,
            pair=intent.pair,
            side=intent.side,
            type=intent.type,
            qty=intent.qty,
            status=OrderStatus.OPEN,
            ts_created=now,
            ts_updated=now,
            exchange_order_id=exchange_id,
            price=intent.price,
            stop_price=intent.stop_price,
            reduce_only=intent.reduce_only,
            time_in_force=intent.time_in_force,
            reason=intent.reason,
        )

    async def _reference_price(self, pair: str) -> Decimal | None:
        price = self._last_price.get(pair)
        if price is None:
            ticker = await self.fetch_ticker(pair)
            price = self._last_price.get(pair) or (
                Decimal(str(ticker.last)) if ticker.last else None
            )
        return price

    @staticmethod
    def _order_args(intent: OrderIntent, market: Market) -> tuple[Any, ...]:
        # (symbol, type, side, amount, price, params) as ccxt's create_order takes them.
        params: dict[str, Any] = {"clientOrderId": intent.client_order_id}
        limit = intent.type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
        if intent.time_in_force is TimeInForce.POST_ONLY:
            params["postOnly"] = True
        elif limit:
            params["timeInForce"] = intent.time_in_force.value
        linear = market.type is MarketType.LINEAR
        if intent.reduce_only and linear:
            params["reduceOnly"] = True
        if intent.stop_price is not None:
            params["triggerPrice"] = float(intent.stop_price)
            if linear:  # a stop buys above and sells below the market
                params["triggerDirection"] = "above" if intent.side is Side.BUY else "below"
        if intent.stop_loss is not None:
            params["stopLoss"] = float(intent.stop_loss)
        if intent.take_profit is not None:
            params["takeProfit"] = float(intent.take_profit)
        price = float(intent.price) if limit and intent.price is not None else None
        kind = "limit" if limit else "market"
        return (market.pair, kind, intent.side.value, float(intent.qty), price, params)

    def _id_params(
        self, client_order_id: str | None, exchange_order_id: str | None
    ) -> dict[str, str]:
        if exchange_order_id:
            return {"orderId": exchange_order_id}
        if client_order_id:
            return {"orderLinkId": client_order_id}
        raise InvariantError("need a client_order_id or an exchange_order_id", component="exchange")

    async def fetch_order(
        self,
        pair: str,
        *,
        client_order_id: str | None = None,
        exchange_order_id: str | None = None,
    ) -> Order | None:
        """Return the order with that id, conditional or not, open or closed; None if none.

        Looks among open orders, then open conditional orders, then history (both kinds),
        because Bybit shows stop orders only when asked with `orderFilter=StopOrder`.
        """
        client = self._ensure_open()
        ids = self._id_params(client_order_id, exchange_order_id)
        stop_first = self._conditional.get(exchange_order_id or client_order_id or "", False)
        order = (False, True) if not stop_first else (True, False)
        for history in (False, True):
            for trigger in order:
                params = dict(ids) | ({"trigger": True} if trigger else {})
                method = (
                    client.fetch_canceled_and_closed_orders if history else client.fetch_open_orders
                )
                rows = await self._call(
                    "fetch_order", functools.partial(method, pair, None, None, params), pair
                )
                if rows:
                    return _order_from_ccxt(rows[0])
        return None

    async def cancel_order(
        self,
        pair: str,
        *,
        client_order_id: str | None = None,
        exchange_order_id: str | None = None,
    ) -> Order:
        """Cancel an order (a stop order as such) and return its resulting state.

        An order that is already filled or cancelled is returned as it is.

        Raises:
            OrderNotFoundError: the exchange has no order with that id.
        """
        client = self._ensure_open()
        ids = self._id_params(client_order_id, exchange_order_id)
        key = exchange_order_id or client_order_id or ""
        spot = self.market(pair).type is MarketType.SPOT
        tries = [self._conditional.get(key, False)]
        if spot:  # only spot needs orderFilter=StopOrder to reach a conditional order
            tries.append(not tries[0])
        accepted = False
        for trigger in tries:
            params = dict(ids) | ({"trigger": True} if trigger else {})
            try:
                await self._call(
                    "cancel_order",
                    functools.partial(client.cancel_order, ids.get("orderId"), pair, params),
                    pair,
                )
            except OrderNotFoundError:
                continue
            accepted = True
            log.info("order_cancel_sent", pair=pair, client_order_id=client_order_id)
            break
        found = await self.fetch_order(
            pair, client_order_id=client_order_id, exchange_order_id=exchange_order_id
        )
        if found is None:
            raise OrderNotFoundError(
                f"no order {key} on {pair}", component="exchange", pair=pair, order_id=key
            )
        if not accepted and not found.status.is_terminal:
            raise ExchangeRejectedError(
                f"cancel of open order {key} refused as not found",
                component="exchange",
                pair=pair,
                order_id=key,
            )
        return found

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """Return open orders, conditional ones included, oldest first."""
        rows = await self._orders("fetch_open_orders", pair, None)
        return sorted(rows, key=lambda o: o.ts_created)

    async def fetch_closed_orders(
        self, pair: str | None = None, since: int | None = None
    ) -> list[Order]:
        """Return finished orders (filled, cancelled, rejected), conditional ones included."""
        rows = await self._orders("fetch_canceled_and_closed_orders", pair, since)
        return sorted(rows, key=lambda o: o.ts_created)

    def _scopes(self, pair: str | None) -> list[tuple[str | None, dict[str, Any]]]:
        # (symbol, params) per category to ask; no pair means both categories.
        if pair is not None:
            self.market(pair)
            return [(pair, {})]
        return [
            (None, {"type": "spot"}),
            (None, {"type": "swap", "subType": "linear", "settleCoin": "USDT"}),
        ]

    async def _orders(self, method_name: str, pair: str | None, since: int | None) -> list[Order]:
        client = self._ensure_open()
        method = getattr(client, method_name)
        seen: dict[str, Order] = {}
        for symbol, scope in self._scopes(pair):
            for trigger in (False, True):
                params = dict(scope) | ({"trigger": True} if trigger else {})
                for raw in await self._paged(method, symbol, since, params, pair):
                    order = _order_from_ccxt(raw)
                    seen[order.exchange_order_id or order.client_order_id] = order
        return list(seen.values())

    async def _paged(
        self,
        method: Callable[..., Awaitable[list[dict[str, Any]]]],
        symbol: str | None,
        since: int | None,
        params: dict[str, Any],
        pair: str | None,
    ) -> list[dict[str, Any]]:
        # Follow Bybit's nextPageCursor (bounded).
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page_params = dict(params) | ({"cursor": cursor} if cursor else {})
            rows = await self._call(
                method.__name__,
                functools.partial(method, symbol, since, _ORDER_PAGE, page_params),
                pair,
            )
            out.extend(rows)
            cursor = _cursor_of(rows)
            if not cursor or len(rows) < _ORDER_PAGE:
                break
        return out

    async def fetch_my_trades(
        self, pair: str | None = None, since: int | None = None
    ) -> list[Fill]:
        """Return our executions (from `since`, else of the last seven days), oldest first.

        Bybit answers a start time with at most the seven days after it, so a `since` older
        than that is walked a week at a time up to now.
        """
        client = self._ensure_open()
        fills: dict[str, Fill] = {}
        for symbol, scope in self._scopes(pair):
            params = {k: v for k, v in scope.items() if k != "settleCoin"}
            for start, end in self._execution_windows(since):
                window = params | ({"endTime": end} if end is not None else {})
                fetch = client.fetch_my_trades
                for raw in await self._paged(fetch, symbol, start, window, pair):
                    fill = _fill_from_ccxt(raw)
                    fills[fill.fill_id] = fill
        return sorted(fills.values(), key=lambda f: (f.ts, f.fill_id))

    def _execution_windows(self, since: int | None) -> list[tuple[int | None, int | None]]:
        # (startTime, endTime) pairs covering `since` to now, none longer than Bybit's week.
        now = self.server_now_ms() + _SWEEP_OVERLAP_MS  # the server may run a little ahead
        if since is None or now - since <= _EXECUTION_WINDOW_MS:
            return [(since, None)]
        windows: list[tuple[int | None, int | None]] = []
        start = since
        while start <= now:
            end = min(start + _EXECUTION_WINDOW_MS - 1, now)
            windows.append((start, end))
            start = end + 1
        return windows

    # -- Streams -------------------------------------------------------------------------------

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
        outage = False
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "data":
                    items = await convert(payload)
                elif kind == "poll" and poll is not None:
                    try:
                        items = await poll()
                    except RecoverableError as e:
                        log.warning(
                            "stream_poll_failed", stream=op, **({"pair": pair} | e.describe())
                        )
                        continue
                elif kind in ("lost", "resumed") and resync is not None:
                    if kind == "lost" and outage:
                        continue  # one resync per outage, not per failed reconnect
                    outage = kind == "lost"
                    try:
                        items = await resync()
                    except RecoverableError as e:
                        log.warning(
                            "stream_resync_failed", stream=op, **({"pair": pair} | e.describe())
                        )
                        outage = False  # try again on the next loss or resume
                        continue
                elif kind == "error":
                    raise payload
                elif kind == "closed":
                    return
                else:
                    continue
                for item in items:
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

    async def _merge(self, streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
        # Interleave several streams; the first failure ends them all.
        if len(streams) == 1:
            async for item in streams[0]:
                yield item
            return
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=1000)

        async def pump(stream: AsyncIterator[T]) -> None:
            try:
                async for item in stream:
                    await queue.put((True, item))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer
                await queue.put((False, e))

        tasks = [asyncio.ensure_future(pump(s)) for s in streams]
        try:
            while True:
                ok, value = await queue.get()
                if not ok:
                    raise value
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
        """
        step = timeframe_to_ms(timeframe)
        return self._merge([self._candles(p, timeframe, step, since) for p in pairs])

    async def _candles(
        self, pair: str, timeframe: str, step: int, since: int | None
    ) -> AsyncIterator[Candle]:
        client = self._ensure_open()
        symbol = self.market(pair).pair
        last: list[int | None] = [None if since is None else -(-since // step) * step - step]

        async def catch_up(now_ms: int) -> list[Candle]:
            # Closed candles after the last one yielded, up to (excluding) now's candle.
            previous = last[0]
            if previous is None:
                return []
            got = await self._fetch_closed(
                pair, timeframe, previous + step, None, None, now_ms=now_ms
            )
            fresh = [c for c in got if c.ts > previous]
            if fresh:
                last[0] = fresh[-1].ts
                log.info(
                    "stream_gap_filled",
                    pair=pair,
                    timeframe=timeframe,
                    candles=len(fresh),
                    first=fresh[0].ts,
                )
            return fresh

        async def resync() -> list[Candle]:
            return await catch_up(await self.fetch_server_time())

        async def convert(rows: list[list[Any]]) -> list[Candle]:
            out: list[Candle] = []
            for row in sorted(rows, key=lambda r: r[0]):
                ts, confirmed = int(row[0]), bool(row[6]) if len(row) > 6 else False
                previous = last[0]
                if previous is None:  # first frame: this candle is the next one to yield
                    last[0] = previous = ts - step
                if ts <= previous:
                    continue  # already yielded
                if ts > previous + step:
                    out.extend(await catch_up(ts))  # everything before `ts` has closed
                if confirmed and ts > (last[0] or 0):
                    out.append(_candle(pair, timeframe, row))
                    last[0] = ts
            return out

        if since is not None:
            for candle in await catch_up(self.server_now_ms()):
                yield candle
        stream = self._stream(
            "watch_candles",
            lambda: client.watch_ohlcv(symbol, timeframe),
            convert,
            pair=pair,
            resync=resync,
        )
        async for candle in stream:
            yield candle

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
                return [self._trade(t, pair) for t in raw]

            return self._stream(
                "watch_trades", functools.partial(client.watch_trades, pair), convert, pair=pair
            )

        return self._merge([stream(self.market(p).pair) for p in pairs])

    async def wait_private_streams(self, *, timeout: float, streams: int = 2) -> bool:  # noqa: ASYNC109 - a deadline for polling ccxt's own state
        """Wait until the private socket is logged in and `streams` topics are subscribed.

        ccxt resolves nothing when Bybit acknowledges a subscription, so this reads its
        client state: the private connection open and the subscribe requests queued on it,
        plus a moment for them to leave. Return False (and log) when `timeout` runs out;
        the caller's REST sweep and the periodic sweeps still cover what the socket misses.
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
                    and len(getattr(ws, "subscriptions", {})) >= streams
                )
                if ready:
                    await asyncio.sleep(_SUBSCRIBE_GRACE_S)
                    log.info("private_streams_ready", subscriptions=len(ws.subscriptions))
                    return True
            await asyncio.sleep(0.02)
        log.warning("private_streams_not_ready", timeout_s=timeout)
        return False

    def watch_orders(self) -> AsyncIterator[Order]:
        """Yield order updates (all pairs); after a reconnect, the open orders again."""
        client = self._ensure_open()

        async def convert(raw: list[dict[str, Any]]) -> list[Order]:
            return [_order_from_ccxt(o) for o in raw]

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
            return fresh(_fill_from_ccxt(t) for t in raw)

        async def resync() -> list[Fill]:
            return fresh(await self.fetch_my_trades(since=newest[0] - 60_000))

        async def sweep() -> list[Fill]:
            start = self.server_now_ms()
            found = fresh(await self.fetch_my_trades(since=swept[0] - _SWEEP_OVERLAP_MS))
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
            return [p for p in (_position_from_ccxt(r) for r in raw) if p is not None]

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
            return [_balances_from_ccxt(latest or raw)]

        async def resync() -> list[dict[str, Balance]]:
            return [await self.fetch_balance()]

        return self._stream("watch_balance", lambda: client.watch_balance(), convert, resync=resync)
