"""A loopback Bybit V5 server, REST and WebSocket, that ccxt 4.5.90 talks to unmodified.

It speaks the request and response shapes of `shared/WIRE.md` on one aiohttp app bound
to 127.0.0.1 on a free port: REST under `/v5/...`, public streams at
`/v5/public/{spot,linear}` and private streams at `/v5/private`. It checks HMAC
signatures and Bybit's timestamp window, keeps order, balance and position state for a
unified trading account, serves klines from the real sample candles in `data/sample/`
mapped onto its own clock, enforces Bybit's published rate limits, records every
request, and injects faults on demand.

Usage::

    async with BybitEmulator() as emu:
        settings = ExchangeSettings(base_url=emu.base_url, api_key=..., api_secret=...)
        emu.fail_next("5xx", times=2, path="/v5/market/tickers")
        await emu.advance(minutes=3)        # three 1m candles close and are pushed
        emu.requests                         # what was sent, when
        emu.set_depth("BTCUSDT", ["0.002", "0.003"])  # takers fill in pieces, level by level
        await emu.fill_resting("link-id", "0.001")     # one maker piece of a resting limit

Time: the emulator's clock is the wall clock plus whatever `advance` added (and runs
`speed` times faster when asked). Server time, candle boundaries and the signature
window all follow it, so a client that fast-forwards the market must resynchronise its
clock offset like it would against a real exchange whose clock differs from ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import gzip
import hashlib
import hmac
import itertools
import json
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web


SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
MINUTE_MS = 60_000
INTERVAL_MINUTES: dict[str, int] = {
    "1": 1,
    "3": 3,
    "5": 5,
    "15": 15,
    "30": 30,
    "60": 60,
    "120": 120,
    "240": 240,
    "360": 360,
    "720": 720,
    "D": 1440,
    "W": 10080,
}
_WEEK_OFFSET_MS = 4 * 86_400_000  # Bybit weeks open on Monday; the epoch was a Thursday
FAULT_KINDS = (
    "429",  # HTTP 429, plain text, with X-Bapi-Limit-Reset-Timestamp
    "403",  # HTTP 403 "access too frequent" (IP limit)
    "10006",  # HTTP 200 retCode 10006 "Too many visits!"
    "5xx",  # HTTP 503 HTML page
    "timeout",  # hang before processing (nothing happens server-side)
    "timeout_after",  # process, then hang (the client cannot know it worked)
    "malformed",  # process, then answer HTTP 200 with truncated JSON
    "10002",  # timestamp outside recv_window
    "10016",  # internal server error
    "auth",  # retCode 10003 API key is invalid
    "insufficient",  # order create refused for balance (110007 linear / 170131 spot)
)

# Per-UID limits Bybit publishes for UTA 2.0 (requests per rolling second), by path.
UID_LIMITS: dict[str, dict[str, int]] = {
    "/v5/order/create": {"linear": 10, "spot": 20},
    "/v5/order/cancel": {"linear": 10, "spot": 20},
    "/v5/order/amend": {"linear": 10, "spot": 10},
    "/v5/order/cancel-all": {"linear": 10, "spot": 20},
    "/v5/order/realtime": {"*": 50},
    "/v5/order/history": {"*": 50},
    "/v5/execution/list": {"*": 50},
    "/v5/position/list": {"*": 50},
    "/v5/position/set-leverage": {"*": 10},
    "/v5/account/wallet-balance": {"*": 50},
    "/v5/user/query-api": {"*": 10},
    "/v5/asset/coin/query-info": {"*": 5},
}
IP_LIMIT, IP_WINDOW_S = 600, 5.0


# -- Instruments and sample candles ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instrument:
    """One emulated instrument: Bybit's trading rules and where its candles come from."""

    symbol: str
    base: str
    quote: str
    category: str
    tick: Decimal
    lot: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal
    max_leverage: Decimal = Decimal(1)
    sample: str = "bybit_BTC-USDT_1m.csv.gz"
    scale: Decimal = Decimal(1)
    status: str = "Trading"

    def info(self) -> dict[str, Any]:
        """Return the instruments-info list item ccxt parses."""
        if self.category == "spot":
            return {
                "symbol": self.symbol,
                "baseCoin": self.base,
                "quoteCoin": self.quote,
                "innovation": "0",
                "status": self.status,
                "marginTrading": "utaOnly",
                "lotSizeFilter": {
                    "basePrecision": str(self.lot),
                    "quotePrecision": "0.00000001",
                    "minOrderQty": str(self.min_qty),
                    "maxOrderQty": str(self.max_qty),
                    "minOrderAmt": str(self.min_notional),
                    "maxOrderAmt": "2000000",
                },
                "priceFilter": {"tickSize": str(self.tick)},
            }
        return {
            "symbol": self.symbol,
            "contractType": "LinearPerpetual",
            "status": self.status,
            "baseCoin": self.base,
            "quoteCoin": self.quote,
            "settleCoin": self.quote,
            "launchTime": "1585526400000",
            "deliveryTime": "0",
            "priceScale": str(max(0, -self.tick.normalize().as_tuple().exponent)),  # type: ignore[operator]
            "leverageFilter": {
                "minLeverage": "1",
                "maxLeverage": f"{self.max_leverage}.00",
                "leverageStep": "0.01",
            },
            "priceFilter": {
                "minPrice": str(self.tick),
                "maxPrice": "1999999.80",
                "tickSize": str(self.tick),
            },
            "lotSizeFilter": {
                "minOrderQty": str(self.min_qty),
                "maxOrderQty": str(self.max_qty),
                "qtyStep": str(self.lot),
                "postOnlyMaxOrderQty": str(self.max_qty),
                "minNotionalValue": str(self.min_notional),
            },
            "fundingInterval": 480,
        }


def _d(text: str) -> Decimal:
    return Decimal(text)


def default_instruments(extra_bases: Iterable[str] = ()) -> list[Instrument]:
    """Return BTC, ETH, SOL and XRP against USDT, spot and linear, plus `extra_bases`.

    BTC uses the Bybit sample files as they are; the others reuse real BTC minute series
    scaled to that coin's price level in December 2022 (ETH from the Binance file, SOL
    from the Bybit perp file, XRP from the Bybit spot file). Extra bases (benchmarks
    need many pairs) get the Bybit spot series and BTC's rules.
    """
    spot_btc, perp_btc, binance = (
        "bybit_BTC-USDT_1m.csv.gz",
        "bybitlinear_BTC-USDT_1m.csv.gz",
        "binance_BTC-BUSD_1m.csv.gz",
    )
    # base, category, tick, lot, min qty, max qty, min notional, max leverage, sample, scale
    table = [
        ("BTC", "spot", "0.01", "0.000001", "0.000048", "71.73", "1", "1", spot_btc, "1"),
        ("ETH", "spot", "0.01", "0.00001", "0.00062", "1229.2336343", "1", "1", binance, "0.0735"),
        ("SOL", "spot", "0.01", "0.001", "0.011", "21186.8", "1", "1", perp_btc, "0.00081"),
        ("XRP", "spot", "0.0001", "0.01", "0.83", "2346221.1", "1", "1", spot_btc, "0.0000226"),
        ("BTC", "linear", "0.10", "0.001", "0.001", "1190.000", "5", "100", perp_btc, "1"),
        ("ETH", "linear", "0.01", "0.01", "0.01", "7240.00", "5", "100", binance, "0.0735"),
        ("SOL", "linear", "0.010", "0.1", "0.1", "79770.0", "5", "75", perp_btc, "0.00081"),
        ("XRP", "linear", "0.0001", "1", "1", "1990000", "5", "75", spot_btc, "0.0000226"),
    ]
    for base in extra_bases:
        table.append(
            (base, "spot", "0.01", "0.000001", "0.000048", "71.73", "1", "1", spot_btc, "1")
        )
        table.append((base, "linear", "0.10", "0.001", "0.001", "1190", "5", "100", spot_btc, "1"))
    out = []
    for base, cat, tick, lot, min_qty, max_qty, min_notional, lev, sample, scale in table:
        out.append(
            Instrument(
                f"{base}USDT",
                base,
                "USDT",
                cat,
                _d(tick),
                _d(lot),
                _d(min_qty),
                _d(max_qty),
                _d(min_notional),
                _d(lev),
                sample=sample,
                scale=_d(scale),
            )
        )
    return out


@functools.cache
def _load_sample(name: str) -> tuple[tuple[Decimal, Decimal, Decimal, Decimal, Decimal], ...]:
    with gzip.open(SAMPLE_DIR / name, "rt", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return tuple(
            (_d(r["open"]), _d(r["high"]), _d(r["low"]), _d(r["close"]), _d(r["volume"]))
            for r in reader
        )


@dataclass(frozen=True, slots=True)
class Bar:
    """One candle as the emulator serves it."""

    start: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal

    def row(self) -> list[str]:
        """Return the REST kline row `[start, o, h, l, c, volume, turnover]`."""
        turnover = (self.volume * self.close).quantize(Decimal("0.0001"))
        return [str(self.start), *(str(x) for x in self.ohlc), str(self.volume), str(turnover)]

    @property
    def ohlc(self) -> tuple[Decimal, Decimal, Decimal, Decimal]:
        """Return open, high, low, close."""
        return (self.open, self.high, self.low, self.close)


class Series:
    """Minute candles of one instrument: sample row `i` is the minute `anchor + i`.

    The sample repeats past both ends, so there is history as far back as asked.
    """

    def __init__(self, instrument: Instrument, anchor_ms: int) -> None:
        rows = _load_sample(instrument.sample)
        tick = instrument.tick

        def scaled(x: Decimal) -> Decimal:
            return (x * instrument.scale).quantize(tick, rounding=ROUND_DOWN).max(tick)

        self.rows = [(scaled(o), scaled(h), scaled(lo), scaled(c), v) for o, h, lo, c, v in rows]
        self.anchor_ms = anchor_ms

    def minute(self, ts: int) -> Bar:
        """Return the 1m candle opening at `ts`."""
        o, h, lo, c, v = self.rows[((ts - self.anchor_ms) // MINUTE_MS) % len(self.rows)]
        return Bar(ts, o, h, lo, c, v)

    def bar(self, start: int, minutes: int, now_ms: int) -> Bar:
        """Return the candle of `minutes` opening at `start`, built from minutes <= now."""
        last = min(start + (minutes - 1) * MINUTE_MS, now_ms - now_ms % MINUTE_MS)
        parts = [self.minute(t) for t in range(start, last + 1, MINUTE_MS)] or [self.minute(start)]
        return Bar(
            start,
            parts[0].open,
            max(p.high for p in parts),
            min(p.low for p in parts),
            parts[-1].close,
            sum((p.volume for p in parts), Decimal(0)),
        )


def bucket_start(ts: int, minutes: int) -> int:
    """Return the open time of the `minutes`-long candle containing `ts` (Bybit alignment)."""
    step = minutes * MINUTE_MS
    offset = _WEEK_OFFSET_MS if minutes == INTERVAL_MINUTES["W"] else 0
    return (ts - offset) // step * step + offset


# -- Clock, faults and the request log ------------------------------------------------------


class EmulatorClock:
    """The server's clock: wall time, `speed` times as fast, plus what `advance` added."""

    def __init__(self, speed: float = 1.0) -> None:
        self._t0 = time.time() * 1000
        self.speed = speed
        self.offset_ms = 0

    def now_ms(self) -> int:
        """Return the server time in epoch ms."""
        wall = time.time() * 1000
        return int(self._t0 + (wall - self._t0) * self.speed) + self.offset_ms


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request as the emulator received it."""

    t: float  # time.monotonic() at arrival
    ts_ms: int  # emulator clock at arrival
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    body: dict[str, Any] | None
    fault: str | None = None
    status: int = 200
    ret_code: int | None = None
    sent: float = 0.0  # time.monotonic() when the client's request left (`rest_delay_s`)
    answered: float = 0.0  # time.monotonic() when its answer reached the client

    @property
    def params(self) -> dict[str, Any]:
        """Return the query (GET) or body (POST) parameters."""
        return dict(self.body) if self.body is not None else dict(self.query)

    @property
    def category(self) -> str | None:
        """Return the Bybit category the request named, if any."""
        value = self.params.get("category")
        return str(value) if value is not None else None

    @property
    def order_kind(self) -> str:
        """Return what an order create is: a "stop" (it has a trigger), else (long-only
        spot, as the bots here trade it) an "entry" (a buy) or an "exit" (a sell)."""
        params = self.params
        if "triggerPrice" in params:
            return "stop"
        return "entry" if params.get("side") == "Buy" else "exit"


@dataclass(slots=True)
class _FaultRule:
    kind: str
    remaining: int
    path: str | None
    method: str | None


def max_in_window(times: Iterable[float], window_s: float) -> int:
    """Return the most events that fall in any window of `window_s` seconds."""
    ordered = sorted(times)
    best, left = 0, 0
    for right, t in enumerate(ordered):
        while t - ordered[left] >= window_s:
            left += 1
        best = max(best, right - left + 1)
    return best


class _BybitReply(Exception):
    # Raised inside a handler to answer with a Bybit retCode.
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- Account state --------------------------------------------------------------------------


@dataclass(slots=True)
class _Order:
    order_id: str
    link_id: str
    category: str
    symbol: str
    side: str  # Buy | Sell
    order_type: str  # Market | Limit
    qty: Decimal
    price: Decimal
    tif: str
    status: str
    created: int
    updated: int
    trigger_price: Decimal = Decimal(0)
    trigger_direction: int = 0
    reduce_only: bool = False
    take_profit: Decimal = Decimal(0)
    stop_loss: Decimal = Decimal(0)
    conditional: bool = False
    filled: Decimal = Decimal(0)
    filled_value: Decimal = Decimal(0)
    fee: Decimal = Decimal(0)
    fee_coin: str = ""
    locked_coin: str = ""
    locked: Decimal = Decimal(0)
    reject_reason: str = "EC_NoError"
    # Who created it: CreateByUser, or the exchange (CreateByTakeOver_PassThrough: the
    # liquidation engine's takeover at the bankruptcy price; CreateByAdl_PassThrough).
    create_type: str = "CreateByUser"

    @property
    def is_open(self) -> bool:
        return self.status in ("New", "PartiallyFilled", "Untriggered", "Triggered")

    def item(self) -> dict[str, Any]:
        avg = (self.filled_value / self.filled).normalize() if self.filled else ""
        out: dict[str, Any] = {
            "orderId": self.order_id,
            "orderLinkId": self.link_id,
            "symbol": self.symbol,
            "side": self.side,
            "orderType": self.order_type,
            "price": str(self.price) if self.order_type == "Limit" else "0",
            "qty": str(self.qty),
            "cumExecQty": str(self.filled),
            "cumExecValue": str(self.filled_value),
            "cumExecFee": str(self.fee),
            "leavesQty": str(self.qty - self.filled if self.is_open else Decimal(0)),
            "leavesValue": "0",
            "avgPrice": str(avg),
            "orderStatus": self.status,
            "timeInForce": self.tif,
            "triggerPrice": str(self.trigger_price) if self.trigger_price else "",
            "triggerDirection": self.trigger_direction,
            "stopOrderType": "Stop" if self.conditional else "",
            "reduceOnly": self.reduce_only,
            "takeProfit": str(self.take_profit) if self.take_profit else "",
            "stopLoss": str(self.stop_loss) if self.stop_loss else "",
            "positionIdx": 0,
            "rejectReason": self.reject_reason,
            "createdTime": str(self.created),
            "updatedTime": str(self.updated),
            "cumFeeDetail": {self.fee_coin: str(self.fee)} if self.fee_coin else {},
        }
        # Key presence tells ccxt the market type when it has no symbol (WIRE.md pitfall).
        if self.category == "spot":
            out["marketUnit"] = "baseCoin" if self.order_type == "Market" else ""
        else:
            out["tpslMode"] = ""
            out["createType"] = self.create_type
        return out


@dataclass(slots=True)
class _Execution:
    exec_id: str
    order: _Order
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_rate: Decimal
    fee_coin: str
    is_maker: bool
    ts: int
    closed_size: Decimal = Decimal(0)

    def item(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "execId": self.exec_id,
            "orderId": self.order.order_id,
            "orderLinkId": self.order.link_id,
            "symbol": self.order.symbol,
            "side": self.order.side,
            "orderType": self.order.order_type,
            "orderPrice": str(self.order.price),
            "orderQty": str(self.order.qty),
            "execPrice": str(self.price),
            "execQty": str(self.qty),
            "execValue": str(self.price * self.qty),
            "execFee": str(self.fee),
            "feeRate": str(self.fee_rate),
            "execTime": str(self.ts),
            "isMaker": self.is_maker,
            "execType": _EXEC_TYPES.get(self.order.create_type, "Trade"),
            "leavesQty": str(self.order.qty - self.order.filled),
        }
        if self.order.category == "spot":
            out["feeCurrency"] = self.fee_coin
        else:
            out["createType"] = self.order.create_type
            out["closedSize"] = str(self.closed_size)
        return out


# Executions of the orders the exchange itself creates (Bybit's `execType` enum).
# Bybit's enum: CreateByLiq is a laddered (partial) liquidation, CreateByTakeOver_PassThrough
# the liquidation engine taking the whole position over at its bankruptcy price.
_EXEC_TYPES = {
    "CreateByLiq": "BustTrade",
    "CreateByTakeOver_PassThrough": "BustTrade",
    "CreateByAdl_PassThrough": "AdlTrade",
}


@dataclass(slots=True)
class _Position:
    symbol: str
    size: Decimal = Decimal(0)  # signed: + long, - short
    avg: Decimal = Decimal(0)
    leverage: Decimal = Decimal(10)
    realised: Decimal = Decimal(0)
    take_profit: Decimal = Decimal(0)
    stop_loss: Decimal = Decimal(0)
    created: int = 0
    updated: int = 0


_FEES = {("spot", False): Decimal("0.001"), ("spot", True): Decimal("0.001")}
_FEES |= {("linear", False): Decimal("0.00055"), ("linear", True): Decimal("0.0002")}


@dataclass(slots=True, eq=False)
class _WsConn:
    ws: web.WebSocketResponse
    kind: str  # spot | linear | private
    conn_id: str
    topics: set[str] = field(default_factory=set)
    authed: bool = False


# -- The server -----------------------------------------------------------------------------


class BybitEmulator:
    """A Bybit V5 REST + WebSocket server on 127.0.0.1; see the module docstring.

    Args:
        api_key: the key signed requests must carry.
        api_secret: the HMAC secret.
        balances: starting unified-account wallet, coin -> amount.
        extra_bases: more base coins to list (as `<BASE>USDT` spot and linear).
        speed: how many times faster than the wall clock the server's clock runs.
        history_minutes: how many sample minutes lie before "now" at start.
        strict_order_filter: when True, order queries and spot cancels without
            `orderFilter=StopOrder` do not see conditional orders (the classic-account
            behaviour behind Freqtrade's "stop not found" failures).
        enforce_limits: answer 10006 / 403 when Bybit's published limits are exceeded.
        hang_s: how long a "timeout" fault holds the request.
        seed: seed of the random fault schedule.
    """

    def __init__(
        self,
        *,
        api_key: str = "testkey",
        api_secret: str = "testsecret",
        balances: dict[str, str] | None = None,
        extra_bases: Iterable[str] = (),
        speed: float = 1.0,
        history_minutes: int = 1000,
        strict_order_filter: bool = True,
        enforce_limits: bool = True,
        hang_s: float = 3.0,
        seed: int = 7,
        tick_s: float = 0.05,
        lenient_clock: bool = False,
        rest_delay_s: float = 0.0,
        subscribe_delay_s: float = 0.0,
        closed_first: bool = False,
    ) -> None:
        self.api_key = api_key
        self.lenient_clock = lenient_clock
        self.api_secret = api_secret
        self.clock = EmulatorClock(speed)
        self.strict_order_filter = strict_order_filter
        self.enforce_limits = enforce_limits
        self.hang_s = hang_s
        self.tick_s = tick_s
        # A network between the client and the exchange: each REST request takes half of
        # this to arrive and its answer the other half to come back.
        self.rest_delay_s = rest_delay_s
        # A slow exchange (or a far one): a subscribe request takes effect, and is
        # acknowledged, this long after it arrives.
        self.subscribe_delay_s = subscribe_delay_s
        # A minute's kline frames: each symbol's closed candle then its new one, symbol by
        # symbol (the default), or every closed candle before the first new one.
        self.closed_first = closed_first
        self.rate_limit_reset_ms = 200
        self.instruments = {(i.category, i.symbol): i for i in default_instruments(extra_bases)}
        now = self.clock.now_ms()
        anchor = now - now % MINUTE_MS - history_minutes * MINUTE_MS
        self.series = {key: Series(inst, anchor) for key, inst in self.instruments.items()}
        self.wallet: dict[str, Decimal] = {
            coin: Decimal(v) for coin, v in (balances or {"USDT": "10000"}).items()
        }
        self.orders: dict[str, _Order] = {}
        self.executions: list[_Execution] = []
        self.positions: dict[str, _Position] = {}
        # Liquidity a test sets per (category, symbol): the sizes of the levels a taker
        # walks from the best price (one execution per level), and how much of a resting
        # limit order one minute's bar fills. None: unlimited (the whole rest at once).
        self.depth: dict[tuple[str, str], tuple[Decimal, ...]] = {}
        self.maker_per_bar: dict[tuple[str, str], Decimal] = {}
        # Funding: settlements (execution list, execType Funding) and the rate history.
        self.fundings: list[dict[str, Any]] = []
        self.funding_history: dict[str, list[tuple[int, Decimal]]] = {}
        self.predicted_funding: dict[str, Decimal] = {}  # the ticker's fundingRate
        # Mark (and last) prices a test sets per linear symbol (`set_mark`); a position the
        # mark crosses its liquidation price on is liquidated (execType BustTrade).
        self.marks: dict[str, Decimal] = {}
        self.private_pushed: list[tuple[str, list[dict[str, Any]]]] = []  # (topic, data)
        self.requests: list[RecordedRequest] = []
        self.fault_rates: dict[str, float] = {}
        self.fault_paths: tuple[str, ...] | None = None
        self.ws_blocked = False
        self.ws_messages_in: list[dict[str, Any]] = []
        # (method, path) -> a recorded Bybit body served verbatim instead of the emulation.
        self.canned: dict[tuple[str, str], dict[str, Any]] = {}
        self._rules: list[_FaultRule] = []
        self._rng = random.Random(seed)
        self._ids = itertools.count(1609920528435648000)
        self._uid_hits: dict[tuple[str, str], deque[float]] = {}
        self._ip_hits: deque[float] = deque()
        self._conns: set[_WsConn] = set()
        self._kline_state: dict[tuple[str, str, str], int] = {}  # (kind, interval, sym) -> last
        # Test control: symbol -> seconds its kline pushes lag behind a minute's close (a
        # stream that comes late); the held-back pushes run as tasks.
        self.kline_lag_s: dict[str, float] = {}
        self._late_pushes: set[asyncio.Task[None]] = set()
        self._processed_ms = now
        self._closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    # -- Lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Return `http://127.0.0.1:PORT`, the one URL REST and streams hang off."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """Return `ws://127.0.0.1:PORT`."""
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> BybitEmulator:
        """Bind to a free port on 127.0.0.1 and start serving."""
        app = web.Application()
        app.router.add_route("*", "/v5/public/{kind}", self._ws_handler)
        app.router.add_route("*", "/v5/private", self._ws_handler)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="emu-tick")
        return self

    async def close(self) -> None:
        """Release hanging requests, close every socket and stop the server."""
        self._closing.set()
        for task in list(self._late_pushes):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> BybitEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- Test controls --------------------------------------------------------------------------

    def fail_next(
        self, kind: str, times: int = 1, *, path: str | None = None, method: str | None = None
    ) -> None:
        """Inject fault `kind` (see FAULT_KINDS) into the next `times` matching requests."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; pick one of {FAULT_KINDS}")
        self._rules.append(_FaultRule(kind, times, path, method))

    def clear_faults(self) -> None:
        """Drop scripted and random faults."""
        self._rules.clear()
        self.fault_rates = {}

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        """Return the recorded requests to `path` (and `method`)."""
        return [
            r for r in self.requests if r.path == path and (method is None or r.method == method)
        ]

    def most_in_flight(
        self, path: str, where: Callable[[RecordedRequest], bool] = lambda r: True
    ) -> int:
        """Return the most answered requests to `path` (`where`) on their way at once."""
        edges = sorted(
            edge
            for r in self.requests_to(path)
            if r.answered and where(r)
            for edge in ((r.sent, 1), (r.answered, -1))
        )
        most = now = 0
        for _, step in edges:  # an answer at the instant another leaves counts first
            now += step
            most = max(most, now)
        return most

    def orders_by_link_id(self) -> dict[str, list[dict[str, Any]]]:
        """Return every order the emulator holds, grouped by orderLinkId."""
        out: dict[str, list[dict[str, Any]]] = {}
        for order in self.orders.values():
            out.setdefault(order.link_id, []).append(order.item())
        return out

    def set_depth(
        self, symbol: str, sizes: Iterable[str | Decimal] | None, category: str = "spot"
    ) -> None:
        """Give takers on `symbol` only these level sizes from the best price (None: unlimited).

        A market or marketable limit order walks the levels, one tick apart, and gets one
        execution per level it takes from; a market or IOC order cancels what the levels
        cannot fill (`PartiallyFilledCanceled` on spot, `Cancelled` on linear), a GTC limit
        rests with the rest (`PartiallyFilled`). The order book shows the same sizes.
        """
        key = (category, symbol)
        if sizes is None:
            self.depth.pop(key, None)
        else:
            self.depth[key] = tuple(Decimal(str(s)) for s in sizes)

    def set_maker_fill(
        self, symbol: str, qty: str | Decimal | None, category: str = "spot"
    ) -> None:
        """Fill at most `qty` of each resting limit order on `symbol` per minute bar (None: all)."""
        key = (category, symbol)
        if qty is None:
            self.maker_per_bar.pop(key, None)
        else:
            self.maker_per_bar[key] = Decimal(str(qty))

    async def fill_resting(
        self, link_id: str, qty: str | Decimal, price: Decimal | None = None
    ) -> None:
        """Fill `qty` of the resting limit order `link_id` now, as maker (one execution)."""
        async with self._lock:
            order = next(o for o in self.orders.values() if o.link_id == link_id)
            if not order.is_open or order.conditional:
                raise ValueError(f"order {link_id} is not a resting limit order")
            piece = min(Decimal(str(qty)), order.qty - order.filled)
            await self._fill(order, price or order.price, maker=True, qty=piece)

    def last_price(self, symbol: str, category: str = "spot") -> Decimal:
        """Return the current close of `symbol` (a linear mark set by `set_mark` first)."""
        if category == "linear" and symbol in self.marks:
            return self.marks[symbol]
        now = self.clock.now_ms()
        return self.series[(category, symbol)].minute(now - now % MINUTE_MS).close

    def candle(self, symbol: str, category: str, interval: str, start: int) -> Bar:
        """Return the candle the emulator serves for that bucket."""
        return self.series[(category, symbol)].bar(
            start, INTERVAL_MINUTES[interval], self.clock.now_ms()
        )

    async def advance(self, ms: int = 0, *, minutes: int = 0) -> None:
        """Move the server clock forward, closing candles, matching orders, pushing klines."""
        self.clock.offset_ms += ms + minutes * MINUTE_MS
        await self._process_time()

    async def drop_sockets(
        self, kind: str | None = None, code: int = 1001, *, abort: bool = False
    ) -> int:
        """Close every WebSocket (or those of `kind`: spot, linear, private); return how many.

        `abort`: cut the connection without a closing frame (a reset, a dead route).
        """
        victims = [c for c in self._conns if kind is None or c.kind == kind]
        for conn in victims:
            self._conns.discard(conn)
            with contextlib.suppress(Exception):
                if abort:
                    transport = conn.ws._req.transport if conn.ws._req is not None else None
                    if transport is not None:
                        transport.abort()
                else:
                    await conn.ws.close(code=code, message=b"going away")
        return len(victims)

    def deflated_sockets(self) -> tuple[int, int]:
        """Return how many open sockets carry permessage-deflate frames, of how many."""
        return sum(1 for c in self._conns if c.ws.compress), len(self._conns)

    def subscribers(self, topic: str, kind: str | None = None) -> int:
        """Return how many open sockets subscribe to `topic`."""
        return sum(1 for c in self._conns if topic in c.topics and (kind is None or c.kind == kind))

    # -- WebSocket pushes ----------------------------------------------------------------------

    async def push_kline(
        self,
        symbol: str,
        category: str = "spot",
        interval: str = "1",
        *,
        start: int | None = None,
        confirm: bool = True,
    ) -> int:
        """Push one kline frame (the served candle for `start`, default the current one)."""
        minutes = INTERVAL_MINUTES[interval]
        now = self.clock.now_ms()
        start = bucket_start(now, minutes) if start is None else start
        bar = self.series[(category, symbol)].bar(start, minutes, max(now, start))
        return await self._publish(
            category,
            f"kline.{interval}.{symbol}",
            self._kline_frame(bar, interval, symbol, confirm),
        )

    def _kline_frame(self, bar: Bar, interval: str, symbol: str, confirm: bool) -> dict[str, Any]:
        step = INTERVAL_MINUTES[interval] * MINUTE_MS
        now = self.clock.now_ms()
        return {
            "topic": f"kline.{interval}.{symbol}",
            "type": "snapshot",
            "ts": now,
            "data": [
                {
                    "start": bar.start,
                    "end": bar.start + step - 1,
                    "interval": interval,
                    "open": str(bar.open),
                    "close": str(bar.close),
                    "high": str(bar.high),
                    "low": str(bar.low),
                    "volume": str(bar.volume),
                    "turnover": str((bar.volume * bar.close).quantize(Decimal("0.0001"))),
                    "confirm": confirm,
                    "timestamp": now,
                }
            ],
        }

    async def push_ticker(
        self, symbol: str, category: str = "spot", *, ts: int | None = None, **fields: str
    ) -> int:
        """Push a tickers snapshot (current values, `fields` override them)."""
        data = self._ticker_item(category, symbol) | fields
        topic = f"tickers.{symbol}"
        frame = {
            "topic": topic,
            "type": "snapshot",
            "ts": ts or self.clock.now_ms(),
            "cs": 1,
            "data": data,
        }
        return await self._publish(category, topic, frame)

    async def push_orderbook(
        self,
        symbol: str,
        category: str = "spot",
        *,
        depth: int = 50,
        ts: int | None = None,
        bids: list[list[str]] | None = None,
        asks: list[list[str]] | None = None,
        snapshot: bool = True,
    ) -> int:
        """Push an order-book frame (a fresh snapshot unless `bids`/`asks` make a delta)."""
        book = self._book(category, symbol, depth)
        topic = f"orderbook.{depth}.{symbol}"
        frame = {
            "topic": topic,
            "type": "snapshot" if snapshot else "delta",
            "ts": ts or self.clock.now_ms(),
            "cts": self.clock.now_ms(),
            "data": {
                "s": symbol,
                "b": bids if bids is not None else book["b"],
                "a": asks if asks is not None else book["a"],
                "u": next(self._ids),
                "seq": next(self._ids),
            },
        }
        return await self._publish(category, topic, frame)

    async def push_trade(
        self, symbol: str, category: str = "spot", *, price: str, qty: str, side: str = "Buy"
    ) -> int:
        """Push one public trade."""
        now = self.clock.now_ms()
        topic = f"publicTrade.{symbol}"
        frame = {
            "topic": topic,
            "type": "snapshot",
            "ts": now,
            "data": [
                {"T": now, "s": symbol, "S": side, "v": qty, "p": price, "L": "PlusTick"}
                | {"i": str(uuid.uuid4()), "BT": False}
            ],
        }
        return await self._publish(category, topic, frame)

    async def _send(self, conn: _WsConn, text: str) -> bool:
        # A client that died (a killed daemon) leaves a closing socket: a push to it is
        # dropped with the socket, as the exchange's server does, never raised into the
        # matching or the clock that made the push (nothing would move any more).
        try:
            await conn.ws.send_str(text)
        except ConnectionError:
            self._conns.discard(conn)
            return False
        return True

    async def push_raw(self, kind: str, topic: str, text: str) -> int:
        """Send a pre-encoded frame to every `kind` socket subscribed to `topic`."""
        sent = 0
        for conn in list(self._conns):
            if conn.kind == kind and topic in conn.topics and not conn.ws.closed:
                sent += await self._send(conn, text)
        return sent

    async def push_burst(self, kind: str, topic: str, frames: list[dict[str, Any]]) -> int:
        """Send `frames` back to back, so they reach the client in one read."""
        texts = [json.dumps(f, separators=(",", ":")) for f in frames]
        conns = [c for c in self._conns if c.kind == kind and topic in c.topics and not c.ws.closed]
        sent = 0
        for conn in conns:
            delivered = await asyncio.gather(*(self._send(conn, t) for t in texts))
            sent += all(delivered)
        return sent

    async def push_position(self, symbol: str) -> int:
        """Push the position of linear `symbol` on the private stream."""
        return await self._private(
            "position",
            [
                self._position_item(symbol)
                | {"category": "linear", "entryPrice": self._position_item(symbol)["avgPrice"]}
            ],
        )

    async def push_wallet(self) -> int:
        """Push the unified wallet on the private stream."""
        return await self._private("wallet", self._wallet_list())

    async def _publish(self, category: str, topic: str, frame: dict[str, Any]) -> int:
        return await self.push_raw(category, topic, json.dumps(frame, separators=(",", ":")))

    async def _private(self, topic: str, data: list[dict[str, Any]]) -> int:
        self.private_pushed.append((topic, data))
        frame = {
            "id": str(uuid.uuid4()),
            "topic": topic,
            "creationTime": self.clock.now_ms(),
            "data": data,
        }
        text = json.dumps(frame, separators=(",", ":"))
        sent = 0
        for conn in list(self._conns):
            if (
                conn.kind == "private"
                and conn.authed
                and topic in conn.topics
                and not conn.ws.closed
            ):
                sent += await self._send(conn, text)
        return sent

    # -- Time and matching ---------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self._process_time()

    async def _process_time(self) -> None:
        async with self._lock:
            now = self.clock.now_ms()
            if now // MINUTE_MS != self._processed_ms // MINUTE_MS:
                await self._match_minutes(self._processed_ms, now)
                await self._push_klines(now)
            self._processed_ms = max(self._processed_ms, now)
            await self._liquidate_crossed()

    async def _match_minutes(self, since_ms: int, now_ms: int) -> None:
        # Each minute that closed may trigger stops and fill resting limit orders.
        first = since_ms - since_ms % MINUTE_MS
        last_closed = now_ms - now_ms % MINUTE_MS - MINUTE_MS
        for minute in range(first, last_closed + 1, MINUTE_MS):
            for order in [o for o in self.orders.values() if o.is_open]:
                bar = self.series[(order.category, order.symbol)].minute(minute)
                await self._match_order(order, bar)

    async def _match_order(self, order: _Order, bar: Bar) -> None:
        if order.status == "Untriggered":
            hit = (
                bar.high >= order.trigger_price
                if order.trigger_direction == 1
                else bar.low <= order.trigger_price
            )
            if not hit:
                return
            order.status = "Triggered"
            order.updated = self.clock.now_ms()
            if order.order_type == "Market":
                await self._fill(order, order.trigger_price, maker=False)
                return
        if order.order_type == "Limit" and order.is_open:
            crosses = bar.low <= order.price if order.side == "Buy" else bar.high >= order.price
            if crosses:
                cap = self.maker_per_bar.get((order.category, order.symbol))
                rest = order.qty - order.filled
                await self._fill(
                    order, order.price, maker=True, qty=rest if cap is None else min(cap, rest)
                )

    async def _push_klines(self, now: int) -> None:
        topics = {
            (c.kind, t)
            for c in self._conns
            if c.kind != "private"
            for t in c.topics
            if t.startswith("kline.")
        }
        # Every candle closes first, then the frames go out back to back: an exchange's
        # engine closes the minute on all symbols and its gateway pushes the results, it
        # does not build the next symbol's bar between two pushes (here that took ~10 us
        # a frame of Decimal work, up to 1 ms more for a minute's first pushes to wait).
        frames: list[tuple[str, str, str]] = []
        forming: list[tuple[str, str, str]] = []  # the new candles' (`closed_first`)
        for kind, topic in sorted(topics):
            _, interval, symbol = topic.split(".")
            minutes = INTERVAL_MINUTES[interval]
            step = minutes * MINUTE_MS
            current = bucket_start(now, minutes)
            key = (kind, interval, symbol)
            last = self._kline_state.get(key, current - step)
            series = self.series[(kind, symbol)]
            bars = [(series.bar(s, minutes, now), True) for s in range(last + step, current, step)]
            if last + step <= current:
                bars.append((series.bar(current, minutes, now), False))
            for bar, confirm in bars:
                frame = self._kline_frame(bar, interval, symbol, confirm)
                held = forming if self.closed_first and not confirm else frames
                held.append((kind, topic, json.dumps(frame, separators=(",", ":"))))
            self._kline_state[key] = current - step
        frames += forming
        late: dict[float, list[tuple[str, str, str]]] = {}
        for kind, topic, text in frames:
            lag = self.kline_lag_s.get(topic.rsplit(".", 1)[1], 0.0)
            if lag > 0:
                late.setdefault(lag, []).append((kind, topic, text))
            else:
                await self.push_raw(kind, topic, text)
        for lag, held in late.items():
            task = asyncio.get_running_loop().create_task(self._push_late(lag, held))
            self._late_pushes.add(task)
            task.add_done_callback(self._late_pushes.discard)

    async def _push_late(self, lag: float, frames: list[tuple[str, str, str]]) -> None:
        await asyncio.sleep(lag)
        for kind, topic, text in frames:
            await self.push_raw(kind, topic, text)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        sent = time.monotonic()
        if self.rest_delay_s > 0:
            await asyncio.sleep(self.rest_delay_s / 2)
        raw = await request.read()
        body: dict[str, Any] | None = None
        if request.method == "POST":
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
        rec = RecordedRequest(
            t=time.monotonic(),
            ts_ms=self.clock.now_ms(),
            method=request.method,
            path=request.path,
            query=dict(request.rel_url.query),
            raw_query=request.rel_url.raw_query_string,
            body=body,
            sent=sent,
        )
        self.requests.append(rec)
        response = await self._answer(request, rec, raw)
        rec.status = response.status
        if self.rest_delay_s > 0:
            await asyncio.sleep(self.rest_delay_s / 2)
        rec.answered = time.monotonic()
        return response

    async def _fault_reply(self, rec: RecordedRequest, fault: str | None) -> web.Response | None:
        # The reply a fault injected before any handling gives (HTTP errors, a hang, a
        # Bybit error envelope); None when the request goes on to be handled.
        if fault in ("429", "403"):
            return web.Response(
                status=int(fault),
                text="access too frequent" if fault == "403" else "Too Many Requests",
                headers=self._limit_headers(0, 10),
            )
        if fault == "5xx":
            return web.Response(
                status=503,
                text="<html><body>503 Service Temporarily Unavailable</body></html>",
                content_type="text/html",
            )
        if fault == "timeout":
            await self._hang()
            return web.Response(status=504, text="gateway timeout")
        if fault in ("10006", "10002", "10016", "auth"):
            code, msg = {
                "10006": (10006, "Too many visits!"),
                "10002": (
                    10002,
                    "invalid request, please check your server timestamp or recv_window param",
                ),
                "10016": (10016, "Internal System Error."),
                "auth": (10003, "API key is invalid."),
            }[fault]
            return self._envelope(
                rec, code, msg, {}, headers=self._limit_headers(0, 10) if code == 10006 else None
            )
        return None

    async def _answer(
        self, request: web.Request, rec: RecordedRequest, raw: bytes
    ) -> web.StreamResponse:
        limited = self._check_limits(rec)
        if limited is not None:
            return limited
        fault = self._pick_fault(rec)
        rec.fault = fault
        faulted = await self._fault_reply(rec, fault)
        if faulted is not None:
            return faulted
        try:
            if not rec.path.startswith("/v5/market/"):
                self._check_auth(request, rec, raw)
            if fault == "insufficient" and rec.path == "/v5/order/create":
                linear = rec.category == "linear"
                raise _BybitReply(
                    110007 if linear else 170131,
                    "ab not enough for new order" if linear else "Insufficient balance.",
                )
            canned = self.canned.get((rec.method, rec.path))
            if canned is not None:
                rec.ret_code = int(canned.get("retCode", 0))
                return web.json_response(canned)
            handler = self._routes().get((rec.method, rec.path))
            if handler is None:
                return web.Response(status=404, text="404 page not found")
            result = await handler(rec.params)
            response = self._envelope(rec, 0, "OK", result)
        except _BybitReply as e:
            response = self._envelope(rec, e.code, e.message, {})
        if fault == "timeout_after":
            await self._hang()
        if fault == "malformed":
            text = response.text or ""
            return web.Response(
                status=200, text=text[: max(1, len(text) // 2)], content_type="application/json"
            )
        return response

    def _envelope(
        self,
        rec: RecordedRequest,
        code: int,
        msg: str,
        result: Any,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        rec.ret_code = code
        payload = {
            "retCode": code,
            "retMsg": msg,
            "result": result,
            "retExtInfo": {},
            "time": self.clock.now_ms(),
        }
        return web.Response(
            text=json.dumps(payload, separators=(",", ":")),
            content_type="application/json",
            headers=headers,
        )

    def _limit_headers(self, remaining: int, limit: int) -> dict[str, str]:
        return {
            "X-Bapi-Limit": str(limit),
            "X-Bapi-Limit-Status": str(remaining),
            "X-Bapi-Limit-Reset-Timestamp": str(self.clock.now_ms() + self.rate_limit_reset_ms),
        }

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=self.hang_s)

    def _pick_fault(self, rec: RecordedRequest) -> str | None:
        for rule in self._rules:
            if (rule.path is None or rec.path.startswith(rule.path)) and (
                rule.method is None or rule.method == rec.method
            ):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rules.remove(rule)
                return rule.kind
        if self.fault_rates and (self.fault_paths is None or rec.path.startswith(self.fault_paths)):
            roll = self._rng.random()
            for kind, rate in self.fault_rates.items():
                if roll < rate:
                    return kind
                roll -= rate
        return None

    def _check_limits(self, rec: RecordedRequest) -> web.Response | None:
        if not self.enforce_limits:
            return None
        now = rec.t
        while self._ip_hits and now - self._ip_hits[0] >= IP_WINDOW_S:
            self._ip_hits.popleft()
        self._ip_hits.append(now)
        if len(self._ip_hits) > IP_LIMIT:
            rec.fault = "ip_limit"
            return web.Response(status=403, text="access too frequent")
        limits = UID_LIMITS.get(rec.path)
        if limits is None:
            return None
        category = rec.category or "*"
        limit = limits.get(category, limits.get("*", limits.get("linear", 10)))
        hits = self._uid_hits.setdefault((rec.path, category), deque())
        while hits and now - hits[0] >= 1.0:
            hits.popleft()
        hits.append(now)
        if len(hits) > limit:
            rec.fault = "uid_limit"
            return self._envelope(
                rec, 10006, "Too many visits!", {}, headers=self._limit_headers(0, limit)
            )
        return None

    def _in_window(self, ts: int, server: int, window: int) -> bool:
        # With `lenient_clock`, a timestamp in the window of the unadvanced wall clock is
        # accepted too: tests that fast-forward the market with `advance()` would otherwise
        # break every signature whose clock offset was measured before the last jump.
        if server - window <= ts < server + 1000:
            return True
        if not self.lenient_clock:
            return False
        # Anything between the wall clock and the (fast-forwarded) market clock: a client
        # whose offset was measured a few jumps ago is still on time.
        wall = int(time.time() * 1000)
        return min(wall, server) - window <= ts < max(wall, server) + 1000

    def _check_auth(self, request: web.Request, rec: RecordedRequest, raw: bytes) -> None:
        headers = request.headers
        key = headers.get("X-BAPI-API-KEY", "")
        ts = headers.get("X-BAPI-TIMESTAMP", "")
        window = headers.get("X-BAPI-RECV-WINDOW", "5000")
        sign = headers.get("X-BAPI-SIGN", "")
        if key != self.api_key:
            raise _BybitReply(10003, "API key is invalid.")
        payload = ts + key + window + (raw.decode() if rec.method == "POST" else rec.raw_query)
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sign):
            raise _BybitReply(10004, f"error sign! origin_string[{payload}]")
        server = self.clock.now_ms()
        if not ts.isdigit() or not self._in_window(int(ts), server, int(window)):
            raise _BybitReply(
                10002,
                "invalid request, please check your server timestamp or recv_window param. "
                f"req_timestamp[{ts}],server_timestamp[{server}],recv_window[{window}]",
            )

    def _routes(self) -> dict[tuple[str, str], Callable[[dict[str, Any]], Any]]:
        return {
            ("GET", "/v5/market/time"): self._time,
            ("GET", "/v5/market/instruments-info"): self._instruments,
            ("GET", "/v5/market/tickers"): self._tickers,
            ("GET", "/v5/market/orderbook"): self._orderbook,
            ("GET", "/v5/market/kline"): self._kline,
            ("GET", "/v5/market/recent-trade"): self._recent_trades,
            ("GET", "/v5/market/funding/history"): self._funding_rate_history,
            ("GET", "/v5/account/wallet-balance"): self._wallet_balance,
            ("GET", "/v5/account/info"): self._account_info,
            ("GET", "/v5/user/query-api"): self._query_api,
            ("GET", "/v5/asset/coin/query-info"): self._coin_info,
            ("GET", "/v5/position/list"): self._position_list,
            ("POST", "/v5/position/set-leverage"): self._set_leverage,
            ("POST", "/v5/order/create"): self._order_create,
            ("POST", "/v5/order/amend"): self._order_amend,
            ("POST", "/v5/order/cancel"): self._order_cancel,
            ("POST", "/v5/order/cancel-all"): self._order_cancel_all,
            ("GET", "/v5/order/realtime"): self._order_realtime,
            ("GET", "/v5/order/history"): self._order_history,
            ("GET", "/v5/execution/list"): self._execution_list,
        }

    # -- Market endpoints ----------------------------------------------------------------------

    def _instrument(self, params: dict[str, Any]) -> Instrument:
        category = str(params.get("category", ""))
        symbol = str(params.get("symbol", ""))
        if category not in ("spot", "linear"):
            raise _BybitReply(10001, f"params error: category {category!r} not supported")
        inst = self.instruments.get((category, symbol))
        if inst is None:
            raise _BybitReply(10001, "params error: Not supported symbols")
        return inst

    async def _time(self, params: dict[str, Any]) -> dict[str, Any]:
        now = self.clock.now_ms()
        return {"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)}

    async def _instruments(self, params: dict[str, Any]) -> dict[str, Any]:
        category = params.get("category", "")
        if params.get("status") == "PreLaunch" or category not in ("spot", "linear"):
            return {"category": category, "list": [], "nextPageCursor": ""}
        items = [
            i.info()
            for (cat, sym), i in self.instruments.items()
            if cat == category and params.get("symbol", sym) == sym
        ]
        return {"category": category, "list": items, "nextPageCursor": ""}

    def _ticker_item(self, category: str, symbol: str) -> dict[str, Any]:
        inst = self.instruments[(category, symbol)]
        series = self.series[(category, symbol)]
        now = self.clock.now_ms()
        minute = now - now % MINUTE_MS
        day = series.bar(minute - 1439 * MINUTE_MS, 1440, now)
        last = series.minute(minute).close
        prev = series.minute(minute - 1440 * MINUTE_MS).open
        item = {
            "symbol": symbol,
            "lastPrice": str(last),
            "bid1Price": str(last - inst.tick),
            "bid1Size": "1.5",
            "ask1Price": str(last + inst.tick),
            "ask1Size": "2.0",
            "prevPrice24h": str(prev),
            "price24hPcnt": str(((last - prev) / prev).quantize(Decimal("0.0001"))),
            "highPrice24h": str(day.high),
            "lowPrice24h": str(day.low),
            "volume24h": str(day.volume),
            "turnover24h": str((day.volume * last).quantize(Decimal("0.0001"))),
        }
        if category == "spot":
            item["usdIndexPrice"] = str(last)
        else:
            item |= {
                "markPrice": str(last),
                "indexPrice": str(last),
                "openInterest": "50000.1",
                "openInterestValue": str((Decimal("50000.1") * last).quantize(Decimal("0.01"))),
                "fundingRate": str(self.predicted_funding.get(symbol, Decimal("0.0001"))),
                "nextFundingTime": str(now - now % 28_800_000 + 28_800_000),
            }
        return item

    async def _tickers(self, params: dict[str, Any]) -> dict[str, Any]:
        category = str(params.get("category", ""))
        if "symbol" in params:
            inst = self._instrument(params)
            items = [self._ticker_item(category, inst.symbol)]
        else:
            items = [
                self._ticker_item(cat, sym) for cat, sym in self.instruments if cat == category
            ]
        return {"category": category, "list": items}

    def _book(self, category: str, symbol: str, depth: int) -> dict[str, list[list[str]]]:
        inst = self.instruments[(category, symbol)]
        last = self.last_price(symbol, category)
        lot = inst.min_qty
        sizes = self.depth.get((category, symbol))
        if sizes is not None:
            shown = [str(s) for s in sizes[:depth]]
            return {
                "b": [[str(last - inst.tick * (k + 1)), s] for k, s in enumerate(shown)],
                "a": [[str(last + inst.tick * (k + 1)), s] for k, s in enumerate(shown)],
            }
        bids = [
            [str(last - inst.tick * (k + 1)), str(lot * (3 + (k * 7) % 11))] for k in range(depth)
        ]
        asks = [
            [str(last + inst.tick * (k + 1)), str(lot * (2 + (k * 5) % 13))] for k in range(depth)
        ]
        return {"b": bids, "a": asks}

    async def _orderbook(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        depth = min(int(params.get("limit", 25)), 200)
        book = self._book(inst.category, inst.symbol, depth)
        return {
            "s": inst.symbol,
            **book,
            "ts": self.clock.now_ms(),
            "u": next(self._ids),
            "seq": next(self._ids),
        }

    async def _kline(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        interval = str(params.get("interval", ""))
        if interval not in INTERVAL_MINUTES:
            raise _BybitReply(10001, "params error: Invalid period!")
        minutes = INTERVAL_MINUTES[interval]
        step = minutes * MINUTE_MS
        limit = max(1, min(int(params.get("limit", 200)), 1000))
        now = self.clock.now_ms()
        newest = bucket_start(min(int(params.get("end", now)), now), minutes)
        if "start" in params and "end" not in params:
            first = bucket_start(int(params["start"]) + step - 1, minutes)
            starts = list(range(first, min(first + limit * step, newest + step), step))
        else:
            oldest = newest - (limit - 1) * step
            if "start" in params:
                oldest = max(oldest, bucket_start(int(params["start"]) + step - 1, minutes))
            starts = list(range(oldest, newest + 1, step))
        series = self.series[(inst.category, inst.symbol)]
        rows = [series.bar(s, minutes, now).row() for s in reversed(starts)]
        return {"category": inst.category, "symbol": inst.symbol, "list": rows}

    async def _recent_trades(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        limit = int(params.get("limit", 60 if inst.category == "spot" else 500))
        now = self.clock.now_ms()
        series = self.series[(inst.category, inst.symbol)]
        items = []
        for k in range(min(limit, 60)):
            minute = now - now % MINUTE_MS - k * MINUTE_MS
            bar = series.minute(minute)
            items.append({
                "execId": f"{inst.symbol}-{minute}",
                "symbol": inst.symbol,
                "price": str(bar.close),
                "size": str(inst.min_qty * 3),
                "side": "Buy" if bar.close >= bar.open else "Sell",
                "time": str(minute + MINUTE_MS - 1 if k else now),
                "isBlockTrade": False,
            })  # fmt: skip
        return {"category": inst.category, "list": items}

    # -- Account endpoints ---------------------------------------------------------------------

    async def _account_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"unifiedMarginStatus": 6, "marginMode": "REGULAR_MARGIN", "isMasterTrader": False}

    async def _query_api(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "1",
            "apiKey": self.api_key,
            "readOnly": 0,
            "unified": 0,
            "uta": 1,
            "permissions": {},
        }

    async def _coin_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "rows": [
                {"coin": c, "name": c, "remainAmount": "0", "chains": []}
                for c in sorted(self.wallet)
            ]
        }

    def _locked(self, coin: str) -> Decimal:
        return sum(
            (o.locked for o in self.orders.values() if o.is_open and o.locked_coin == coin),
            Decimal(0),
        )

    def _order_im(self) -> Decimal:
        total = Decimal(0)
        for o in self.orders.values():
            if o.is_open and o.category == "linear" and not o.reduce_only and not o.conditional:
                lev = self.positions.get(o.symbol, _Position(o.symbol)).leverage
                total += (o.qty - o.filled) * o.price / lev
        return total

    def _position_im(self) -> tuple[Decimal, Decimal]:
        im, upl = Decimal(0), Decimal(0)
        for pos in self.positions.values():
            if pos.size:
                mark = self.last_price(pos.symbol, "linear")
                im += abs(pos.size) * pos.avg / pos.leverage
                upl += (mark - pos.avg) * pos.size
        return im, upl

    def available(self, coin: str) -> Decimal:
        """Return what a new order may use of `coin` (wallet - locked - margin)."""
        free = self.wallet.get(coin, Decimal(0)) - self._locked(coin)
        if coin == "USDT":
            im, upl = self._position_im()
            free -= im + self._order_im() - min(upl, Decimal(0))
        return free

    def _wallet_list(self) -> list[dict[str, Any]]:
        im, upl = self._position_im()
        coins = []
        for coin, amount in sorted(self.wallet.items()):
            usdt = coin == "USDT"
            coins.append({
                "coin": coin,
                "walletBalance": str(amount),
                "equity": str(amount + (upl if usdt else 0)),
                "availableToWithdraw": "",
                "locked": str(self._locked(coin)),
                "totalPositionIM": str(im if usdt else 0),
                "totalOrderIM": str(self._order_im() if usdt else 0),
                "borrowAmount": "0",
                "accruedInterest": "0",
                "unrealisedPnl": str(upl if usdt else 0),
                "usdValue": str(amount if usdt else amount * self._usd_price(coin)),
            })  # fmt: skip
        return [
            {
                "accountType": "UNIFIED",
                "totalEquity": str(self.wallet.get("USDT", 0)),
                "coin": coins,
            }
        ]

    def _usd_price(self, coin: str) -> Decimal:
        key = ("spot", f"{coin}USDT")
        return self.last_price(key[1]) if key in self.series else Decimal(0)

    async def _wallet_balance(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("accountType") != "UNIFIED":
            raise _BybitReply(10001, "accountType only support UNIFIED")
        return {"list": self._wallet_list()}

    def _margin_prices(self, pos: _Position) -> tuple[Decimal, Decimal, Decimal]:
        # Bybit's isolated-margin formulas on the first risk-limit tier (MMR 0.5 % for BTC
        # and ETH, 1 % else): maintenance margin, liquidation and bankruptcy prices.
        qty = abs(pos.size)
        value = qty * pos.avg
        im = value / pos.leverage
        mm = value * (Decimal("0.005") if pos.symbol[:3] in ("BTC", "ETH") else Decimal("0.01"))
        sign = 1 if pos.size > 0 else -1
        liq = max(pos.avg - sign * (im - mm) / qty, Decimal(0))
        bust = max(pos.avg - sign * im / qty, Decimal(0))
        return mm, liq, bust

    def _position_item(self, symbol: str) -> dict[str, Any]:
        pos = self.positions.get(symbol, _Position(symbol))
        mark = self.last_price(symbol, "linear")
        flat = pos.size == 0
        mm, liq, bust = (Decimal(0), Decimal(0), Decimal(0)) if flat else self._margin_prices(pos)
        return {
            "symbol": symbol,
            "positionIdx": 0,
            "side": "" if flat else ("Buy" if pos.size > 0 else "Sell"),
            "size": str(abs(pos.size)),
            "avgPrice": "0" if flat else str(pos.avg),
            "leverage": str(pos.leverage),
            "markPrice": str(mark),
            "positionValue": "" if flat else str(abs(pos.size) * pos.avg),
            "unrealisedPnl": "" if flat else str((mark - pos.avg) * pos.size),
            "curRealisedPnl": str(pos.realised),
            "cumRealisedPnl": str(pos.realised),
            "positionIM": str(abs(pos.size) * pos.avg / pos.leverage),
            "positionMM": str(mm),
            "positionBalance": str(abs(pos.size) * pos.avg / pos.leverage),
            "liqPrice": "" if flat else str(liq),
            "bustPrice": "" if flat else str(bust),
            "takeProfit": str(pos.take_profit) if pos.take_profit else "",
            "stopLoss": str(pos.stop_loss) if pos.stop_loss else "",
            "tpslMode": "Full",
            "tradeMode": 0,
            "positionStatus": "Normal",
            "isReduceOnly": False,
            "createdTime": str(pos.created or self.clock.now_ms()),
            "updatedTime": str(pos.updated or self.clock.now_ms()),
        }

    async def _position_list(self, params: dict[str, Any]) -> dict[str, Any]:
        category = params.get("category")
        if category != "linear":
            return {"category": category, "list": [], "nextPageCursor": ""}
        if "symbol" in params:
            symbols = [self._instrument(params).symbol]
        elif params.get("settleCoin") or params.get("baseCoin"):
            symbols = [s for s, p in sorted(self.positions.items()) if p.size]
        else:
            raise _BybitReply(10001, "params error: symbol or settleCoin is required")
        return {
            "category": "linear",
            "list": [self._position_item(s) for s in symbols],
            "nextPageCursor": "",
        }

    async def _set_leverage(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        if inst.category != "linear":
            raise _BybitReply(10001, "params error: category only support linear or inverse")
        buy, sell = (
            Decimal(str(params.get("buyLeverage"))),
            Decimal(str(params.get("sellLeverage"))),
        )
        if buy != sell:
            raise _BybitReply(
                10001, "params error: buy leverage must equal sell leverage in one-way mode"
            )
        if not Decimal(1) <= buy <= inst.max_leverage:
            raise _BybitReply(
                10001, f"params error: leverage {buy} out of range [1, {inst.max_leverage}]"
            )
        pos = self.positions.setdefault(inst.symbol, _Position(inst.symbol))
        if pos.leverage == buy:
            raise _BybitReply(110043, "Set leverage not modified")
        pos.leverage = buy
        return {}

    # -- Orders --------------------------------------------------------------------------------

    def _new_order_id(self, category: str) -> str:
        return str(next(self._ids)) if category == "spot" else str(uuid.uuid4())

    async def _order_create(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        cat, spot = inst.category, inst.category == "spot"
        link = str(params.get("orderLinkId") or "")
        self._check_link(link, cat)
        side, order_type = str(params.get("side")), str(params.get("orderType"))
        if side not in ("Buy", "Sell") or order_type not in ("Market", "Limit"):
            raise _BybitReply(10001, "params error: side or orderType invalid")
        qty = Decimal(str(params.get("qty", "0")))
        if (
            spot
            and order_type == "Market"
            and params.get("marketUnit", "quoteCoin" if side == "Buy" else "baseCoin")
            == "quoteCoin"
        ):
            qty = (qty / self._quote_side(inst, side)).quantize(inst.lot, rounding=ROUND_DOWN)
        self._check_qty(inst, qty)
        price = Decimal(str(params.get("price") or 0))
        if order_type == "Limit" and (price <= 0 or price % inst.tick):
            raise _BybitReply(
                170134 if spot else 10001,
                "Order price has too many decimals." if spot else "params error: price invalid",
            )
        trigger = Decimal(str(params.get("triggerPrice") or 0))
        conditional = trigger > 0
        if conditional and spot and params.get("orderFilter") != "StopOrder":
            raise _BybitReply(170003, "An unknown parameter was sent.")
        direction = int(params.get("triggerDirection") or 0)
        last = self.last_price(inst.symbol, cat)
        if conditional:
            direction = _trigger_direction(spot, direction, trigger, last)
        ref = price if order_type == "Limit" else (trigger if conditional else last)
        if qty * ref < inst.min_notional:
            raise _BybitReply(
                170140 if spot else 110094,
                "Order value exceeded lower limit."
                if spot
                else "Order does not meet minimum order value 5USDT",
            )
        reduce_only = bool(params.get("reduceOnly")) and not spot
        if reduce_only:
            pos = self.positions.get(inst.symbol, _Position(inst.symbol))
            if pos.size == 0 or (pos.size > 0) == (side == "Buy"):
                raise _BybitReply(110017, "Reduce-only rule not satisfied")
            qty = min(qty, abs(pos.size))
        tif = str(params.get("timeInForce") or ("IOC" if order_type == "Market" else "GTC"))
        now = self.clock.now_ms()
        order = _Order(
            order_id=self._new_order_id(cat),
            link_id=link or (str(next(self._ids)) if spot else ""),
            category=cat,
            symbol=inst.symbol,
            side=side,
            order_type=order_type,
            qty=qty,
            price=price,
            tif=tif,
            status="Untriggered" if conditional else "New",
            created=now,
            updated=now,
            trigger_price=trigger,
            trigger_direction=direction,
            reduce_only=reduce_only,
            take_profit=Decimal(str(params.get("takeProfit") or 0)),
            stop_loss=Decimal(str(params.get("stopLoss") or 0)),
            conditional=conditional,
        )
        if not conditional:
            self._reserve(inst, order, last)
        self.orders[order.order_id] = order
        await self._after_create(inst, order)
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def _check_link(self, link: str, cat: str) -> None:
        # An orderLinkId is at most 36 characters and unique within its category.
        spot = cat == "spot"
        if len(link) > 36:
            raise _BybitReply(10001, "params error: orderLinkId too long")
        if link and any(o.link_id == link and o.category == cat for o in self.orders.values()):
            raise _BybitReply(
                170141 if spot else 110072,
                "Duplicate clientOrderId" if spot else "OrderLinkedID is duplicate",
            )

    def _quote_side(self, inst: Instrument, side: str) -> Decimal:
        last = self.last_price(inst.symbol, inst.category)
        return last + inst.tick if side == "Buy" else last - inst.tick

    def _check_qty(self, inst: Instrument, qty: Decimal) -> None:
        spot = inst.category == "spot"
        if qty <= 0 or qty % inst.lot:
            raise _BybitReply(
                170137 if spot else 10001,
                "Order quantity has too many decimals." if spot else "params error: Qty invalid",
            )
        if qty < inst.min_qty:
            raise _BybitReply(
                170136 if spot else 10001,
                "Order quantity exceeded lower limit."
                if spot
                else "params error: The number of contracts below min limit allowed",
            )
        if qty > inst.max_qty:
            raise _BybitReply(
                170135 if spot else 10001,
                "Order quantity exceeded upper limit."
                if spot
                else "params error: The number of contracts exceeds maximum limit allowed",
            )

    def _reserve(self, inst: Instrument, order: _Order, last: Decimal) -> None:
        # Check and lock what the order needs; Bybit refuses the order when it cannot.
        price = order.price if order.order_type == "Limit" else self._quote_side(inst, order.side)
        if inst.category == "spot":
            coin, need = (
                (inst.quote, order.qty * price * Decimal("1.001"))
                if order.side == "Buy"
                else (inst.base, order.qty)
            )
            if self.available(coin) < need:
                raise _BybitReply(170131, "Insufficient balance.")
            if order.order_type == "Limit":
                order.locked_coin, order.locked = coin, need
        elif not order.reduce_only:
            lev = self.positions.get(inst.symbol, _Position(inst.symbol)).leverage
            if (
                self.available("USDT")
                < order.qty * price / lev + order.qty * price * _FEES[("linear", False)]
            ):
                raise _BybitReply(110007, "ab not enough for new order")

    async def _after_create(self, inst: Instrument, order: _Order) -> None:
        if order.conditional:
            await self._emit_order(order)
            return
        bid, ask = self._quote_side(inst, "Sell"), self._quote_side(inst, "Buy")
        if order.order_type == "Market":
            await self._take(inst, order, ask if order.side == "Buy" else bid)
            return
        marketable = order.price >= ask if order.side == "Buy" else order.price <= bid
        if marketable and order.tif == "PostOnly":
            order.status, order.reject_reason = "Cancelled", "EC_PostOnlyWillTakeLiquidity"
            order.locked = Decimal(0)
            await self._emit_order(order)
        elif marketable:
            await self._take(inst, order, ask if order.side == "Buy" else bid)
        elif order.tif in ("IOC", "FOK"):
            order.status, order.locked = "Cancelled", Decimal(0)
            await self._emit_order(order)
        else:
            await self._emit_order(order)

    async def _take(self, inst: Instrument, order: _Order, best: Decimal) -> None:
        """Fill a taker level by level (`set_depth`); cancel or rest what is left."""
        sizes = self.depth.get((inst.category, inst.symbol))
        if sizes is None:
            await self._fill(order, best, maker=False)
            return
        step = inst.tick if order.side == "Buy" else -inst.tick
        limited = order.order_type == "Limit"
        for k, size in enumerate(sizes):
            price = best + step * k
            rest = order.qty - order.filled
            beyond = limited and (
                price > order.price if order.side == "Buy" else price < order.price
            )
            if rest <= 0 or beyond:
                break
            await self._fill(order, price, maker=False, qty=min(size, rest))
        if order.filled >= order.qty:
            return
        if order.order_type == "Market" or order.tif in ("IOC", "FOK"):
            await self._cancel(order)  # Bybit's market orders are IOC
        elif order.filled == 0:
            await self._emit_order(order)  # it rests, untouched

    def _relock(self, order: _Order) -> None:
        # A resting spot limit keeps locked what its unfilled rest needs.
        if not order.locked or not order.is_open:
            order.locked = Decimal(0)
            return
        rest = order.qty - order.filled
        order.locked = rest * order.price * Decimal("1.001") if order.side == "Buy" else rest

    async def _fill(
        self, order: _Order, price: Decimal, *, maker: bool, qty: Decimal | None = None
    ) -> None:
        inst = self.instruments[(order.category, order.symbol)]
        qty = order.qty - order.filled if qty is None else qty
        rate = _FEES[(order.category, maker)]
        closed = Decimal(0)
        now = self.clock.now_ms()
        if order.category == "spot":
            if order.side == "Buy":
                fee, fee_coin = qty * rate, inst.base
                self._credit(inst.quote, -qty * price)
                self._credit(inst.base, qty - fee)
            else:
                fee, fee_coin = qty * price * rate, inst.quote
                self._credit(inst.base, -qty)
                self._credit(inst.quote, qty * price - fee)
        else:
            fee, fee_coin = qty * price * rate, "USDT"
            held = self.positions.get(order.symbol, _Position(order.symbol)).size
            if held and (held > 0) != (order.side == "Buy"):
                closed = min(qty, abs(held))
            self._credit("USDT", -fee + self._apply_position(order, qty, price, now))
        order.filled += qty
        order.filled_value += qty * price
        order.fee += fee
        order.fee_coin = fee_coin
        order.status = "Filled" if order.filled >= order.qty else "PartiallyFilled"
        order.updated = now
        self._relock(order)
        execution = _Execution(
            str(uuid.uuid4()), order, price, qty, fee, rate, fee_coin, maker, now, closed
        )
        self.executions.append(execution)
        await self._emit_order(order)
        await self._private("execution", [execution.item() | {"category": order.category}])
        if order.category == "linear":
            await self.push_position(order.symbol)
        await self.push_wallet()

    def _credit(self, coin: str, amount: Decimal) -> None:
        self.wallet[coin] = self.wallet.get(coin, Decimal(0)) + amount

    def _apply_position(self, order: _Order, qty: Decimal, price: Decimal, now: int) -> Decimal:
        # One-way mode netting; returns the realised PnL.
        pos = self.positions.setdefault(order.symbol, _Position(order.symbol, created=now))
        signed = qty if order.side == "Buy" else -qty
        realised = Decimal(0)
        if pos.size == 0 or (pos.size > 0) == (signed > 0):
            pos.avg = (pos.avg * abs(pos.size) + price * qty) / (abs(pos.size) + qty)
            pos.size += signed
        else:
            closing = min(qty, abs(pos.size))
            realised = (price - pos.avg) * closing * (1 if pos.size > 0 else -1)
            pos.size += signed
            if pos.size and (pos.size > 0) == (signed > 0):
                pos.avg = price  # flipped through zero
            elif pos.size == 0:
                pos.avg = Decimal(0)
        pos.realised += realised
        pos.updated = now
        if order.take_profit:
            pos.take_profit = order.take_profit
        if order.stop_loss:
            pos.stop_loss = order.stop_loss
        return realised

    async def _emit_order(self, order: _Order) -> None:
        await self._private("order", [order.item() | {"category": order.category}])

    def _find(self, params: dict[str, Any], *, require_open: bool) -> _Order | None:
        inst = self._instrument(params)
        oid, link = params.get("orderId"), params.get("orderLinkId")
        for order in self.orders.values():
            same = order.category == inst.category and order.symbol == inst.symbol
            if same and ((oid and order.order_id == oid) or (link and order.link_id == link)):
                return order if order.is_open or not require_open else None
        return None

    async def _order_amend(self, params: dict[str, Any]) -> dict[str, Any]:
        order = self._find(params, require_open=True)
        if order is None:
            if self._instrument(params).category == "spot":
                raise _BybitReply(170213, "Order does not exist.")
            raise _BybitReply(110001, "order not exists or too late to amend")
        inst = self.instruments[(order.category, order.symbol)]
        changes = {
            "qty": order.qty,
            "price": order.price,
            "triggerPrice": order.trigger_price,
        }
        if all(Decimal(str(params[k])) == v for k, v in changes.items() if k in params):
            # Bybit refuses an amend that changes nothing (a request parameter error).
            raise _BybitReply(
                10001,
                "The order remains unchanged as the parameters entered match the existing ones.",
            )
        if "qty" in params:
            qty = Decimal(str(params["qty"]))
            self._check_qty(inst, qty)
            order.qty = qty
        if "price" in params:
            order.price = Decimal(str(params["price"]))
        if "triggerPrice" in params:
            order.trigger_price = Decimal(str(params["triggerPrice"]))
        order.updated = self.clock.now_ms()
        await self._emit_order(order)
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def _not_found(self, category: str) -> _BybitReply:
        if category == "spot":
            return _BybitReply(170213, "Order does not exist.")
        return _BybitReply(110001, "order not exists or too late to cancel")

    def _filter_sees(self, order: _Order, params: dict[str, Any]) -> bool:
        wanted = params.get("orderFilter")
        if wanted == "StopOrder":
            return order.conditional
        if wanted == "Order" or self.strict_order_filter:
            return not order.conditional
        return True

    async def _order_cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        order = self._find(params, require_open=True)
        spot_filter_hides = (
            order is not None and inst.category == "spot" and not self._filter_sees(order, params)
        )
        if order is None or spot_filter_hides:
            raise self._not_found(inst.category)
        await self._cancel(order)
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    async def _cancel(self, order: _Order) -> None:
        if order.status == "Untriggered":
            order.status = "Deactivated"
        elif order.filled and order.category == "spot":
            order.status = "PartiallyFilledCanceled"  # spot only; linear says Cancelled
        else:
            order.status = "Cancelled"
        order.locked = Decimal(0)
        order.updated = self.clock.now_ms()
        await self._emit_order(order)

    async def _order_cancel_all(self, params: dict[str, Any]) -> dict[str, Any]:
        category = params.get("category")
        done = []
        for order in list(self.orders.values()):
            if (
                order.is_open
                and order.category == category
                and params.get("symbol", order.symbol) == order.symbol
                and self._filter_sees(order, params)
            ):
                await self._cancel(order)
                done.append({"orderId": order.order_id, "orderLinkId": order.link_id})
        return {"list": done, "success": "1"}

    def _page(
        self, items: list[dict[str, Any]], params: dict[str, Any], default: int, cap: int
    ) -> dict[str, Any]:
        limit = max(1, min(int(params.get("limit", default)), cap))
        offset = int(params.get("cursor") or 0)
        chunk = items[offset : offset + limit]
        cursor = str(offset + limit) if offset + limit < len(items) else ""
        return {"category": params.get("category"), "list": chunk, "nextPageCursor": cursor}

    def _order_matches(self, order: _Order, params: dict[str, Any]) -> bool:
        if order.category != params.get("category"):
            return False
        checks = (
            ("symbol", order.symbol),
            ("orderId", order.order_id),
            ("orderLinkId", order.link_id),
        )
        if any(key in params and params[key] != value for key, value in checks):
            return False
        return self._filter_sees(order, params)

    async def _order_realtime(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("category") not in ("spot", "linear"):
            raise _BybitReply(10001, "params error: category invalid")
        by_id = "orderId" in params or "orderLinkId" in params
        recent = self.clock.now_ms() - 600_000
        items = [
            o.item() | {"category": o.category}
            for o in sorted(self.orders.values(), key=lambda o: o.created, reverse=True)
            if self._order_matches(o, params) and (o.is_open or (by_id and o.updated >= recent))
        ]
        return self._page(items, params, 20, 50)

    async def _order_history(self, params: dict[str, Any]) -> dict[str, Any]:
        start = int(params.get("startTime", self.clock.now_ms() - 7 * 86_400_000))
        end = int(params.get("endTime", self.clock.now_ms() + 1))
        status = params.get("orderStatus")
        items = [
            o.item()
            for o in sorted(self.orders.values(), key=lambda o: o.created, reverse=True)
            if self._order_matches(o, params)
            and not o.is_open
            and start <= o.created <= end
            and (status is None or o.status == status)
        ]
        return self._page(items, params, 20, 50)

    async def _execution_list(self, params: dict[str, Any]) -> dict[str, Any]:
        # Bybit's rules: no times -> the last 7 days; only startTime -> the 7 days after it;
        # only endTime -> the 7 days before it; both -> at most 7 days apart.
        week = 7 * 86_400_000
        if "startTime" in params and "endTime" in params:
            start, end = int(params["startTime"]), int(params["endTime"])
            if end - start > week:
                raise _BybitReply(10001, "params error: endTime - startTime must be <= 7 days")
        elif "startTime" in params:
            start = int(params["startTime"])
            end = start + week
        elif "endTime" in params:
            end = int(params["endTime"])
            start = end - week
        else:
            end = self.clock.now_ms() + 1
            start = end - week
        if params.get("execType") == "Funding":
            fundings = [
                f
                for f in reversed(self.fundings)
                if params.get("symbol", f["symbol"]) == f["symbol"]
                and start <= int(f["execTime"]) <= end
            ]
            return self._page(fundings, params, 50, 100)
        items = [
            e.item()
            for e in reversed(self.executions)
            if e.order.category == params.get("category")
            and params.get("symbol", e.order.symbol) == e.order.symbol
            and params.get("orderId", e.order.order_id) == e.order.order_id
            and params.get("orderLinkId", e.order.link_id) == e.order.link_id
            and start <= e.ts <= end
        ]
        return self._page(items, params, 50, 100)

    # -- Liquidation and ADL -------------------------------------------------------------------

    async def set_mark(self, symbol: str, price: Decimal | str | None) -> None:
        """Set the mark (and last) price of linear `symbol` (None: the series' again).

        A position whose liquidation price the mark reaches is liquidated at once, as
        Bybit's liquidation engine does (see `_liquidate`).
        """
        async with self._lock:
            if price is None:
                self.marks.pop(symbol, None)
            else:
                self.marks[symbol] = Decimal(str(price))
            await self._liquidate_crossed()

    async def auto_deleverage(
        self, symbol: str, qty: Decimal | str | None = None, price: Decimal | str | None = None
    ) -> None:
        """Auto-deleverage `qty` (default all) of the position on `symbol` at `price` (mark).

        Bybit closes a profitable position against a bankrupt one (execType AdlTrade,
        createType CreateByAdl_PassThrough) and cancels the symbol's active orders.
        """
        async with self._lock:
            pos = self.positions[symbol]
            size = abs(pos.size) if qty is None else Decimal(str(qty))
            at = self.last_price(symbol, "linear") if price is None else Decimal(str(price))
            await self._force_close(pos, size, at, "CreateByAdl_PassThrough")

    async def _liquidate_crossed(self) -> None:
        for pos in list(self.positions.values()):
            if not pos.size:
                continue
            mark = self.last_price(pos.symbol, "linear")
            _, liq, bust = self._margin_prices(pos)
            if (mark <= liq) if pos.size > 0 else (mark >= liq):
                await self._liquidate(pos, bust)

    async def _liquidate(self, pos: _Position, bust: Decimal) -> None:
        # Bybit on the lowest risk-limit tier: cancel the symbol's active orders (stops
        # included), then the liquidation engine takes the whole position over at its
        # bankruptcy price, charging the taker fee on that value; what margin is left
        # goes to the insurance fund, so the wallet loses the position's margin plus fee.
        await self._force_close(pos, abs(pos.size), bust, "CreateByTakeOver_PassThrough")

    async def _force_close(self, pos: _Position, qty: Decimal, price: Decimal, how: str) -> None:
        for order in list(self.orders.values()):
            if order.is_open and order.category == "linear" and order.symbol == pos.symbol:
                await self._cancel(order)
        now = self.clock.now_ms()
        order = _Order(
            order_id=str(uuid.uuid4()),
            link_id="",
            category="linear",
            symbol=pos.symbol,
            side="Sell" if pos.size > 0 else "Buy",
            order_type="Market",
            qty=qty,
            price=price,
            tif="IOC",
            status="New",
            created=now,
            updated=now,
            reduce_only=True,
            create_type=how,
        )
        self.orders[order.order_id] = order
        await self._fill(order, price, maker=False)

    # -- Funding -------------------------------------------------------------------------------

    def settle_funding(self, symbol: str, rate: Decimal | str, ts: int | None = None) -> Decimal:
        """Settle a funding time on `symbol` (linear); return what the position paid.

        Bybit's rule: position value at the mark x rate, longs pay a positive rate. The
        wallet pays it, the position's realised PnL carries it, and the execution list
        answers it with execType Funding (execFee = execValue x rate, as in the recorded
        body ccxt's parser documents).
        The rate joins the funding history (`/v5/market/funding/history`) either way.
        """
        rate = Decimal(str(rate))
        ts = self.clock.now_ms() if ts is None else ts
        self.funding_history.setdefault(symbol, []).append((ts, rate))
        pos = self.positions.get(symbol)
        if pos is None or pos.size == 0:
            return Decimal(0)
        mark = self.last_price(symbol, "linear")
        paid = pos.size * mark * rate
        self.wallet["USDT"] = self.wallet.get("USDT", Decimal(0)) - paid
        pos.realised -= paid
        self.fundings.append({
            "symbol": symbol, "orderType": "UNKNOWN", "orderLinkId": "",
            "orderId": str(uuid.uuid4()), "stopOrderType": "UNKNOWN", "execTime": str(ts),
            "feeCurrency": "", "createType": "", "feeRate": str(rate), "markPrice": str(mark),
            "execPrice": str(mark), "orderQty": "0", "orderPrice": "0",
            "execValue": str(abs(pos.size) * mark), "closedSize": "0", "execType": "Funding",
            "seq": str(next(self._ids)), "side": "Buy" if pos.size > 0 else "Sell",
            "leavesQty": "0", "isMaker": False, "execFee": str(abs(pos.size) * mark * rate),
            "execId": str(uuid.uuid4()), "execQty": str(abs(pos.size)),
        })  # fmt: skip
        return paid

    async def _funding_rate_history(self, params: dict[str, Any]) -> dict[str, Any]:
        inst = self._instrument(params)
        if inst.category != "linear":
            raise _BybitReply(10001, "params error: category only support linear or inverse")
        start = int(params.get("startTime", 0))
        end = int(params.get("endTime", self.clock.now_ms()))
        rows = [(t, r) for t, r in self.funding_history.get(inst.symbol, []) if start <= t <= end]
        limit = int(params.get("limit", 200))
        items = [
            {"symbol": inst.symbol, "fundingRate": str(r), "fundingRateTimestamp": str(t)}
            for t, r in sorted(rows, reverse=True)[:limit]
        ]
        return {"category": "linear", "list": items}

    # -- WebSocket -----------------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info.get("kind", "private")
        if kind not in ("spot", "linear", "private") or self.ws_blocked:
            return web.Response(status=503, text="stream unavailable")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = _WsConn(ws, kind, str(uuid.uuid4()))
        self._conns.add(conn)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_ws_text(conn, msg.data)
        finally:
            self._conns.discard(conn)
        return ws

    async def _on_ws_text(self, conn: _WsConn, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            await conn.ws.send_json(
                {"success": False, "ret_msg": "error:invalid json", "conn_id": conn.conn_id}
            )
            return
        self.ws_messages_in.append(message | {"_kind": conn.kind})
        op, req_id = message.get("op"), str(message.get("req_id", ""))
        if op == "ping":
            reply: dict[str, object]
            if conn.kind == "private":
                reply = {
                    "req_id": req_id,
                    "op": "pong",
                    "args": [str(self.clock.now_ms())],
                    "conn_id": conn.conn_id,
                }
            else:
                reply = {
                    "success": True,
                    "ret_msg": "pong",
                    "conn_id": conn.conn_id,
                    "req_id": req_id,
                    "op": "ping",
                }
            await conn.ws.send_json(reply)
        elif op == "auth":
            await self._ws_auth(conn, message)
        elif op in ("subscribe", "unsubscribe"):
            await self._ws_subscribe(conn, op, req_id, [str(a) for a in message.get("args", [])])

    async def _ws_auth(self, conn: _WsConn, message: dict[str, Any]) -> None:
        args = [str(a) for a in message.get("args", [])]
        ok = False
        if len(args) == 3 and args[0] == self.api_key and args[1].isdigit():
            expected = hmac.new(
                self.api_secret.encode(), f"GET/realtime{args[1]}".encode(), hashlib.sha256
            ).hexdigest()
            expires = int(args[1])
            ok = hmac.compare_digest(expected, args[2]) and (
                expires > self.clock.now_ms()
                or (self.lenient_clock and expires > time.time() * 1000)
            )
        conn.authed = ok
        reply: dict[str, Any] = {
            "success": ok,
            "ret_msg": "" if ok else "error:invalid signature",
            "op": "auth",
            "conn_id": conn.conn_id,
        }
        if not ok:
            reply["request"] = {"op": "auth", "args": args}
        await conn.ws.send_json(reply)

    def _topic_ok(self, conn: _WsConn, topic: str) -> bool:
        if conn.kind == "private":
            return conn.authed and topic in ("order", "execution", "position", "wallet")
        parts = topic.split(".")
        symbol = parts[-1]
        if (conn.kind, symbol) not in self.instruments:
            return False
        if parts[0] == "kline":
            return len(parts) == 3 and parts[1] in INTERVAL_MINUTES
        if parts[0] == "orderbook":
            return len(parts) == 3 and parts[1] in ("1", "50", "200", "500", "1000")
        return parts[0] in ("tickers", "publicTrade") and len(parts) == 2

    async def _ws_subscribe(self, conn: _WsConn, op: str, req_id: str, topics: list[str]) -> None:
        bad = [t for t in topics if not self._topic_ok(conn, t)]
        if bad and op == "subscribe":
            await conn.ws.send_json(
                {
                    "success": False,
                    "ret_msg": f"error:handler not found,topic:{bad[0]}",
                    "conn_id": conn.conn_id,
                    "req_id": req_id,
                    "op": op,
                }
            )
            return
        if op == "unsubscribe":
            conn.topics.difference_update(topics)
        else:
            if self.subscribe_delay_s > 0:
                await asyncio.sleep(self.subscribe_delay_s)
            conn.topics.update(topics)
        ack_msg = "" if conn.kind == "private" or op == "unsubscribe" else "subscribe"
        await conn.ws.send_json(
            {
                "success": True,
                "ret_msg": ack_msg,
                "conn_id": conn.conn_id,
                "req_id": req_id,
                "op": op,
            }
        )
        if op == "subscribe":
            await self._initial_snapshots(conn, topics)

    async def _initial_snapshots(self, conn: _WsConn, topics: list[str]) -> None:
        # Bybit sends tickers and orderbook snapshots right after subscribing.
        now = self.clock.now_ms()
        for topic in topics:
            parts = topic.split(".")
            if parts[0] == "tickers":
                frame = {
                    "topic": topic,
                    "type": "snapshot",
                    "ts": now,
                    "cs": 1,
                    "data": self._ticker_item(conn.kind, parts[1]),
                }
            elif parts[0] == "orderbook":
                book = self._book(conn.kind, parts[2], int(parts[1]))
                frame = {
                    "topic": topic,
                    "type": "snapshot",
                    "ts": now,
                    "cts": now,
                    "data": {"s": parts[2], **book, "u": next(self._ids), "seq": next(self._ids)},
                }
            else:
                if parts[0] == "kline":
                    minutes = INTERVAL_MINUTES[parts[1]]
                    self._kline_state[(conn.kind, parts[1], parts[2])] = (
                        bucket_start(now, minutes) - minutes * MINUTE_MS
                    )
                continue
            await conn.ws.send_str(json.dumps(frame, separators=(",", ":")))


def iter_frames(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON frames of a gzipped JSON-lines WebSocket capture."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def daemon_env(emu: BybitEmulator) -> dict[str, str]:
    """Return the environment that points a daemon (`config`) at `emu`, with its keys."""
    return {
        "KESTREL_EXCHANGE__BASE_URL": emu.base_url,
        "KESTREL_EXCHANGE__API_KEY": emu.api_key,
        "KESTREL_EXCHANGE__API_SECRET": emu.api_secret,
    }


def exchange_settings(emu: BybitEmulator, **overrides: Any) -> Any:
    """Return `ExchangeSettings` pointing at `emu` with its keys and short timeouts."""
    from config import ExchangeSettings  # keep the emulator importable alone

    values: dict[str, Any] = {
        "base_url": emu.base_url,
        "api_key": emu.api_key,
        "api_secret": emu.api_secret,
        "timeout_s": 2.0,
    }
    return ExchangeSettings(**(values | overrides))


def _trigger_direction(spot: bool, direction: int, trigger: Decimal, last: Decimal) -> int:
    # A conditional order's trigger direction (1: rises to, 2: falls to): spot works it
    # out from the last price; derivatives must send 1 or 2.
    if spot:
        return 1 if trigger > last else 2
    if direction not in (1, 2):
        raise _BybitReply(10001, "params error: triggerDirection invalid")
    return direction
