"""The simulated exchange: a matching engine behind the live exchange's order interface.

`SimulatedExchange` takes orders like `exchange.Exchange` and fills them from closed
candles (and order books); `sim_market` gives Bybit-like rules for a pair when no
exchange is reachable. Part of `trade_simulator`, which re-exports it.

Fill conventions (documented, conservative, the same in sim and backtest):

* A market order placed on candle *t*'s close fills at candle *t+1*'s open, plus slippage
  against the taker (`fill_at="next_open"`, the default; `"close"` fills at once at the
  last close). With `slippage_model="book"` and a book known for the pair, it walks the
  book instead, taking at most the depth shown; the rest waits for the next bar.
* Slippage models: `fixed` (`slippage_bps` against the taker), `volatility` (half the
  previous bar's high-low range in bps, at least the fixed bps), `book` (depth walk).
* A resting limit order fills when price trades *through* it: a buy when the low is below
  the limit (at the limit; at the open if the bar gaps below it), as maker.
* A stop triggers when the bar touches it: a sell stop when the low <= stop, filling at the
  stop, or at the open when the bar gaps through (worse), as taker with slippage. A
  stop-limit that triggers becomes a resting limit from the next bar. A stop's trigger moved
  in place (`amend_order`, a trailing move) applies from the next bar.
* Within one bar, stops are processed before take-profits: when a bar touches both, the
  stop is assumed first. Intrabar data (`set_intrabar`, e.g. 1m candles inside a 1h bar)
  resolves that order instead: the sub-bars are matched one after another.
* Reduce-only orders never increase a position; when the position they protect is closed,
  the pair's remaining reduce-only orders are cancelled (Bybit's position TP/SL behaviour).
* Post-only limits that would cross the last price are rejected, never filled as taker.
* Optional participation cap: at most `max_participation` x the (sub-)bar's volume fills
  per (sub-)bar; the rest stays open (partially filled).
* IOC and FOK limits take part in the first (sub-)bar they are live for only: an IOC fills
  what that bar gives and its rest is cancelled (the order's last fill carries the
  cancelled state, Bybit's `PartiallyFilledCanceled`); a FOK fills whole or not at all.
  One that fills nothing is cancelled and reported to the order sink (`deliver_orders_to`),
  where the live private order stream's updates go.
* Perpetuals: a position opened with leverage (or any short) on a linear market is
  watched for liquidation (`perpetuals`, isolated margin `qty x entry / leverage`, or
  the wallet balance read through `set_cross_balance` under cross margin): when a bar's low
  (long) or high (short) reaches the liquidation price, the position is closed there
  by an exchange-side order, charged the liquidation fee (the margin left above
  bankruptcy plus the taker fee to close), after the bar's orders are matched (a stop
  inside the liquidation price triggers first).
* Latency: an order takes part in a (sub-)bar only if it was live (`ts_created +
  latency_ms`) before that bar closed; one live during a bar fills at its open (an
  approximation that intrabar data makes finer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import pandas as pd
import structlog

from error_handler import OrderNotFoundError, OrderRejected
from models import (
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
    PositionSide,
    Side,
    TimeInForce,
    evolve,
    order_from_intent,
)
from perpetuals import Liquidation, unit_cost
from sim_perpetuals import PerpetualWatch
from utils.utilities import ReplayClock, timeframe_to_ms


log = structlog.get_logger(__name__)
ZERO = Decimal(0)
ONE = Decimal(1)
# Where fills go: the engine's fill entry point, the one the live private stream's fills
# reach too (`pipeline.Engine.on_fill`).
FillSink = Callable[[Order, Fill], Awaitable[None]]
# Where order changes without a fill go (`TradeExecutor.on_order`, as for the order stream).
OrderSink = Callable[[Order], Awaitable[None]]
_BPS = Decimal(10_000)
_ONE_BAR = frozenset({TimeInForce.IOC, TimeInForce.FOK})
# The order a bar's working orders are matched in (`_match_bar`); limits last.
_PRIORITY: Final = {OrderType.MARKET: 0, OrderType.STOP_MARKET: 1, OrderType.STOP_LIMIT: 1}
_STABLE_QUOTES = frozenset({"USDT", "USDC", "USD", "BUSD", "EUR", "DAI"})


def sim_market(
    pair: str, reference_price: float, market_type: MarketType = MarketType.SPOT
) -> Market:
    """Return Bybit-like trading rules for a pair, scaled to its price level.

    Used when no exchange is reachable (replays): tick about 1e-5 of the price, lot about
    1e-5 of a unit of quote value, min notional 5 in dollar-like quotes (Bybit's spot
    minimum), else a small amount of the quote.
    """
    base, _, rest = pair.partition("/")
    quote = rest.split(":")[0] or "USDT"
    magnitude = math.floor(math.log10(reference_price)) if reference_price > 0 else 0
    tick = Decimal(1).scaleb(magnitude - 5)
    lot = Decimal(1).scaleb(min(0, -magnitude - 4)) if magnitude >= 0 else Decimal(1)
    min_notional = Decimal(5) if quote in _STABLE_QUOTES else Decimal("0.0001")
    return Market(
        pair=pair,
        symbol_id=f"{base}{quote}",
        base=base,
        quote=quote,
        type=market_type,
        tick_size=tick,
        lot_size=lot,
        min_qty=lot,
        min_notional=min_notional,
        max_qty=None,
        max_leverage=Decimal(10) if market_type is MarketType.LINEAR else Decimal(1),
    )


def slipped_price(side: Side, price: Decimal, bps: Decimal) -> Decimal:
    """Return `price` moved `bps` basis points against a taker on `side`."""
    if bps == 0:
        return price
    factor = bps / _BPS
    return price * (1 + factor) if side is Side.BUY else price * (1 - factor)


def quote_qty(
    quote: Decimal,
    price: Decimal,
    fee: Decimal,
    lot: Decimal | None,
    leverage: Decimal = ONE,
    side: Side = Side.BUY,
) -> Decimal:
    """Return the base quantity `quote` buys at `price` after the taker fee, floored to lot.

    With `leverage` (a perpetual), `quote` pays Bybit's order cost: margin plus the fees
    to open and to close (`perpetuals.unit_cost`).
    """
    if leverage == ONE:
        qty = quote / (price * (1 + fee))
    else:
        position = PositionSide.LONG if side is Side.BUY else PositionSide.SHORT
        qty = quote / unit_cost(price, leverage, fee, position)
    if lot is not None and lot > 0:
        qty = (qty / lot).to_integral_value(rounding=ROUND_FLOOR) * lot
    return qty


@dataclass(slots=True)
class _Intrabar:
    """Finer candles of one pair used to resolve the order of events inside a bar."""

    ts: np.ndarray
    values: np.ndarray
    timeframe: str
    step: int

    def bars(self, candle: Candle, step: int) -> Iterable[tuple[Candle, int]]:
        """Return the finer (bar, step) pairs inside `candle`, or `candle` itself if none."""
        if self.step >= step:
            return ((candle, step),)
        lo = int(np.searchsorted(self.ts, candle.ts, side="left"))
        hi = int(np.searchsorted(self.ts, candle.ts + step, side="left"))
        if hi <= lo:
            return ((candle, step),)
        return (
            (
                Candle(candle.pair, self.timeframe, int(self.ts[i]), *_ohlcv(self.values[i])),
                self.step,
            )
            for i in range(lo, hi)
        )


class _Bars:
    """The bars a candle is matched as: its finer candles when given, else itself."""

    def __init__(self) -> None:
        self._fine: dict[str, _Intrabar] = {}
        self._steps: dict[str, int] = {}

    def set_fine(self, pair: str, frame: pd.DataFrame, timeframe: str) -> None:
        """Resolve the pair's bars with finer candles (e.g. 1m inside 1h) from now on."""
        ts = frame.index.as_unit("ms").asi8.astype(np.int64)
        values = frame[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        self._fine[pair] = _Intrabar(ts, values, timeframe, timeframe_to_ms(timeframe))

    def has_fine(self, pair: str) -> bool:
        """Return True when `pair`'s bars are resolved with finer candles."""
        return pair in self._fine

    def of(self, candle: Candle) -> Iterable[tuple[Candle, int]]:
        """Return the (bar, step) pairs `candle` is matched as, in time order."""
        step = self._step(candle.timeframe)
        fine = self._fine.get(candle.pair)
        return ((candle, step),) if fine is None else fine.bars(candle, step)

    def _step(self, timeframe: str) -> int:
        step = self._steps.get(timeframe)
        if step is None:
            step = self._steps[timeframe] = timeframe_to_ms(timeframe)
        return step


class _BookDepth:
    """The latest book per pair, less what market orders have taken from it since."""

    def __init__(self) -> None:
        self.books: dict[str, OrderBook] = {}
        self._taken: dict[str, dict[tuple[Side, float], Decimal]] = {}

    def show(self, book: OrderBook) -> None:
        """Take a new book for its pair: its depth is whole again."""
        self.books[book.pair] = book
        self._taken[book.pair] = {}

    def levels(self, book: OrderBook, side: Side) -> list[tuple[Decimal, Decimal]]:
        """Return the book side a taker on `side` hits, less what earlier fills took."""
        taken = self._taken.setdefault(book.pair, {})
        out = []
        for price, size in book.asks if side is Side.BUY else book.bids:
            left = Decimal(str(size)) - taken.get((side, price), ZERO)
            if left > 0:
                out.append((Decimal(str(price)), left))
        return out

    def take(self, pair: str, side: Side, qty: Decimal) -> Decimal:
        """Consume `qty` from `pair`'s book for a taker on `side`; return the average price."""
        book = self.books[pair]
        taken = self._taken.setdefault(book.pair, {})
        remaining = qty
        cost = ZERO
        for price, size in book.asks if side is Side.BUY else book.bids:
            key = (side, price)
            left = Decimal(str(size)) - taken.get(key, ZERO)
            if left <= 0:
                continue
            take = min(remaining, left)
            taken[key] = taken.get(key, ZERO) + take
            cost += take * Decimal(str(price))
            remaining -= take
            if remaining <= 0:
                break
        return cost / qty


class _Delivery:
    """Where the simulated venue's fills and fill-less order changes go (its streams)."""

    def __init__(self) -> None:
        self._sink: FillSink | None = None
        self._order_sink: OrderSink | None = None
        self._updates: list[Order] = []  # order changes without a fill, not yet delivered

    def deliver_to(self, sink: FillSink) -> None:
        """Send every fill from now on to `sink` (the engine's fill entry point)."""
        self._sink = sink

    def deliver_orders_to(self, sink: OrderSink) -> None:
        """Send order changes that come without a fill (an IOC that filled nothing) to `sink`."""
        self._order_sink = sink

    @property
    def has_updates(self) -> bool:
        """Return True when order changes wait for `deliver`."""
        return bool(self._updates)

    async def deliver(self, fills: list[tuple[Order, Fill]]) -> None:
        """Hand `fills` (from `on_candle`) to the sink, in order, then the order changes."""
        sink = self._sink
        if fills and sink is None:
            raise RuntimeError("the simulated exchange has fills but no sink to deliver them")
        for order, fill in fills:
            await sink(order, fill)  # type: ignore[misc]
        updates, self._updates = self._updates, []
        if self._order_sink is not None:
            for order in updates:
                await self._order_sink(order)


class _ReplayShortcuts:
    """What a backtest replay's short path asks of the venue (`replay_feed.SimDriver`)."""

    markets: dict[str, Market]
    _open: dict[str, list[str]]
    _orders: dict[str, Order]
    _bars: _Bars
    _last: dict[str, Candle]

    if TYPE_CHECKING:  # the venue's own (`SimulatedExchange`, `PerpetualWatch`)

        def ensure_market(self, pair: str, price: float) -> Market: ...

        def liquidation(self, pair: str) -> Liquidation | None: ...

    def remember(self, candle: Candle) -> None:
        """Take `candle` as the pair's last bar without matching anything against it.

        For a replay that has checked nothing could trade in it (`lone_stop`,
        `stop_reached`): what `on_candle` would then leave behind.
        """
        if candle.pair not in self.markets:
            self.ensure_market(candle.pair, candle.close)
        self._last[candle.pair] = candle

    def lone_stop(self, pair: str) -> Order | None:
        """Return the pair's only working order if it is a stop-market order, else None.

        None as well when a candle could do more than trigger it: finer bars resolve the
        pair's candles, or its position is watched for liquidation.
        """
        working = self._open.get(pair)
        if not working or len(working) != 1 or self._bars.has_fine(pair):
            return None
        order = self._orders[working[0]]
        if order.type is not OrderType.STOP_MARKET or order.status.is_terminal:
            return None
        return None if self.liquidation(pair) is not None else order


class _OrderBook:
    """The venue's orders by client id and its working ones by pair: lookups and listings."""

    _orders: dict[str, Order]
    _open: dict[str, list[str]]

    async def fetch_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order | None:
        """Return an order by client or exchange id, or None."""
        order = self._find(client_order_id, exchange_order_id)
        return order if order is not None and order.pair == pair else None

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """Return orders still working."""
        pairs = [pair] if pair else list(self._open)
        return [self._orders[cid] for p in pairs for cid in self._open.get(p, [])]

    def _find(self, client_order_id: str | None, exchange_order_id: str | None) -> Order | None:
        if client_order_id is not None:
            return self._orders.get(client_order_id)
        for order in self._orders.values():
            if order.exchange_order_id == exchange_order_id:
                return order
        return None

    def orders(self) -> list[Order]:
        """Return every order the engine has seen (for tests and reports)."""
        return list(self._orders.values())


class SimulatedExchange(_Delivery, _OrderBook, PerpetualWatch, _ReplayShortcuts):
    """Paper matching engine with the live exchange's order methods.

    `create_order`, `cancel_order`, `amend_order`, `fetch_order`, `fetch_open_orders` and
    `deliver_fills` behave like `exchange.Exchange`'s (the executor's `OrderGateway`). Fills
    are produced when a closed candle is matched (`on_candle`, which the replay driver calls
    before the engine processes the candle) and delivered to the fill sink (`deliver_to`;
    `match` does both), as the private stream delivers the live exchange's.
    """

    def __init__(
        self,
        *,
        clock: ReplayClock | object,
        maker_fee: float = 0.001,
        taker_fee: float = 0.001,
        slippage_bps: float = 0.0,
        slippage_model: Literal["fixed", "volatility", "book"] = "fixed",
        fill_at: Literal["next_open", "close"] = "next_open",
        max_participation: float | None = None,
        latency_ms: int = 0,
        markets: dict[str, Market] | None = None,
        margin_mode: Literal["isolated", "cross"] = "isolated",
    ) -> None:
        self._clock = clock
        self.maker_fee = Decimal(str(maker_fee))
        self.taker_fee = Decimal(str(taker_fee))
        self.slippage_bps = Decimal(str(slippage_bps))
        self.slippage_model = slippage_model
        self.fill_at = fill_at
        self.max_participation = max_participation
        self.latency_ms = latency_ms
        self.markets: dict[str, Market] = dict(markets or {})
        self._orders: dict[str, Order] = {}
        self._open: dict[str, list[str]] = {}
        self._positions: dict[str, Decimal] = {}
        self._last: dict[str, Candle] = {}
        self._depth = _BookDepth()
        self._quote_amounts: dict[str, Decimal] = {}
        self._triggered: set[str] = set()
        self._bars = _Bars()
        self._fill_ids = itertools.count(1)
        self._order_ids = itertools.count(1)
        _Delivery.__init__(self)
        self._init_perpetuals(margin_mode)

    def _now(self) -> int:
        return int(self._clock.now_ms())  # type: ignore[union-attr]

    # -- Order interface (same names as exchange.Exchange) -----------------------------------

    async def load_markets(self) -> dict[str, Market]:
        """Return the markets known so far (built from replayed prices)."""
        return dict(self.markets)

    def ensure_market(self, pair: str, price: float) -> Market:
        """Return the pair's market, creating sim rules from `price` the first time."""
        market = self.markets.get(pair)
        if market is None:
            kind = MarketType.LINEAR if ":" in pair else MarketType.SPOT
            market = self.markets[pair] = sim_market(pair, price, kind)
        return market

    async def create_order(self, intent: OrderIntent) -> Order:
        """Accept an order; it fills on later candles (`fill_at="close"`: at `deliver_fills`)."""
        if intent.client_order_id in self._orders:
            raise OrderRejected(
                "duplicate client order id", pair=intent.pair, order_id=intent.client_order_id
            )
        now = self._now()
        last = self._last.get(intent.pair)
        order = order_from_intent(
            intent, OrderStatus.OPEN, now, exchange_order_id=f"sim-{next(self._order_ids)}"
        )
        if (
            intent.time_in_force is TimeInForce.POST_ONLY
            and intent.type is OrderType.LIMIT
            and last is not None
            and intent.price is not None
            and _crosses(intent.side, intent.price, Decimal(str(last.close)))
        ):
            order = replace(order, status=OrderStatus.REJECTED, reason="post-only would cross")
            self._orders[order.client_order_id] = order
            return order
        self._note_leverage(intent)
        if intent.quote_amount is not None:
            self._quote_amounts[order.client_order_id] = intent.quote_amount
        self._orders[order.client_order_id] = order
        self._open.setdefault(intent.pair, []).append(order.client_order_id)
        return order

    async def cancel_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order:
        """Cancel an open order."""
        order = self._find(client_order_id, exchange_order_id)
        if order is None or order.pair != pair:
            raise OrderNotFoundError("no such order", pair=pair, order_id=client_order_id)
        if order.status.is_terminal:
            return order
        return self._finish(order, OrderStatus.CANCELLED)

    async def amend_order(
        self, pair: str, *, client_order_id: str, trigger_price: Decimal
    ) -> Order:
        """Move a working stop's trigger in place (Bybit's order/amend): the same order.

        The pair's next (sub-)bar is matched against the new trigger. Amending to the
        trigger the order already has changes nothing (the order is returned as it is).

        Raises:
            OrderNotFoundError: no such order is working (filled, cancelled, never placed).
            OrderRejected: the order is no stop, or a stop-limit already triggered.
        """
        order = self._orders.get(client_order_id)
        if order is None or order.pair != pair or order.status.is_terminal:
            raise OrderNotFoundError(
                "order not exists or too late to amend", pair=pair, order_id=client_order_id
            )
        if order.stop_price is None or client_order_id in self._triggered:
            raise OrderRejected(
                "only an untriggered stop's trigger can be amended",
                pair=pair,
                order_id=client_order_id,
            )
        if order.stop_price == trigger_price:
            return order
        amended = evolve(order, stop_price=trigger_price, ts_updated=self._now())
        self._orders[client_order_id] = amended
        return amended

    async def deliver_fills(self, pair: str) -> None:
        """With `fill_at="close"`, fill the pair's working market orders now and deliver them."""
        if self.fill_at == "close":
            fills = self.fill_now(pair)
            if fills:
                await self.deliver(fills)

    def has_working(self, pair: str) -> bool:
        """Return True if an order on `pair` works or its position is watched (liquidation)."""
        return bool(self._open.get(pair)) or self.liquidation(pair) is not None

    # -- Market data in ----------------------------------------------------------------------

    def on_order_book(self, book: OrderBook) -> None:
        """Remember the pair's latest book; market orders walk it when present."""
        self._depth.show(book)

    def set_intrabar(self, pair: str, frame: pd.DataFrame, timeframe: str) -> None:
        """Resolve the pair's bars with finer candles (e.g. 1m inside 1h) from now on."""
        self._bars.set_fine(pair, frame, timeframe)

    async def match(self, candle: Candle) -> None:
        """Match the pair's working orders against a closed candle; deliver the fills."""
        fills = self.on_candle(candle)
        if fills or self._updates:
            await self.deliver(fills)

    def on_candle(self, candle: Candle) -> list[tuple[Order, Fill]]:
        """Match the pair's working orders against a closed candle; return the fills."""
        pair = candle.pair
        if pair not in self.markets:
            self.ensure_market(pair, candle.close)
        results: list[tuple[Order, Fill]] = []
        if self._open.get(pair):
            for bar, bar_step in self._bars.of(candle):
                self._match_bar(bar, bar_step, results)
        self._watch_bar(candle, results)
        self._last[pair] = candle
        return results

    def _match_bar(self, bar: Candle, step: int, results: list[tuple[Order, Fill]]) -> None:
        working = list(self._open.get(bar.pair, []))
        # Market orders execute at the open, then stops, then limits (stop before TP).
        working.sort(key=lambda cid: _PRIORITY.get(self._orders[cid].type, 2))
        budget = (
            Decimal(str(bar.volume * self.max_participation))
            if self.max_participation is not None
            else None
        )
        for cid in working:
            order = self._orders[cid]
            # Skip orders not live before this bar closed (latency); market orders that are
            # live during the bar are filled at its open (an approximation, documented).
            if order.status.is_terminal or order.ts_created + self.latency_ms >= bar.ts + step:
                continue
            if order.reduce_only and self._reducible(order) <= 0:
                self._finish(order, OrderStatus.CANCELLED)
                continue
            done = self._match_one(order, bar, budget)
            if done is not None:
                results.append(done)
                if budget is not None:
                    budget -= done[1].qty

    def _match_one(
        self, order: Order, bar: Candle, budget: Decimal | None
    ) -> tuple[Order, Fill] | None:
        """Return the fill `order` gets in `bar` (with the order after it), if any."""
        matched = self._match(order, bar)
        once = order.type is OrderType.LIMIT and order.time_in_force in _ONE_BAR
        if matched is None:
            if once:
                self._updates.append(self._finish(order, OrderStatus.CANCELLED))
            return None
        price, liquidity, levels = matched
        qty, complete = self._fill_qty(order, price, budget, levels)
        if once and (qty <= 0 or (order.time_in_force is TimeInForce.FOK and not complete)):
            self._updates.append(self._finish(order, OrderStatus.CANCELLED))
            return None
        if qty <= 0:
            return None
        if levels is not None:
            price = self._depth.take(order.pair, order.side, qty)
        filled, fill = self._fill(order, price, qty, liquidity, bar.ts, complete=complete)
        if once and not filled.status.is_terminal:
            filled = self._finish(filled, OrderStatus.CANCELLED)  # the rest of an IOC
        return filled, fill

    def _reducible(self, order: Order) -> Decimal:
        position = self._positions.get(order.pair, ZERO)
        return max(-position if order.side is Side.BUY else position, ZERO)

    def fill_now(self, pair: str) -> list[tuple[Order, Fill]]:
        """Fill working market orders at the last close (the `fill_at="close"` convention)."""
        last = self._last.get(pair)
        if last is None:
            return []
        out = []
        for cid in list(self._open.get(pair, [])):
            order = self._orders[cid]
            if order.type is OrderType.MARKET and not order.status.is_terminal:
                price = self._slipped(order.side, Decimal(str(last.close)), pair)
                qty, complete = self._fill_qty(order, price, None, None)
                if qty > 0:
                    out.append(
                        self._fill(
                            order, price, qty, Liquidity.TAKER, self._now(), complete=complete
                        )
                    )
        return out

    # -- Matching ----------------------------------------------------------------------------

    def _match(
        self, order: Order, c: Candle
    ) -> tuple[Decimal, Liquidity, list[tuple[Decimal, Decimal]] | None] | None:
        """Return (price, liquidity, book levels to walk or None) if `order` trades in `c`."""
        if order.type is OrderType.MARKET:
            book = self._depth.books.get(order.pair)
            if book is not None and self.slippage_model == "book":
                levels = self._depth.levels(book, order.side)
                if not levels:
                    return None  # the shown depth is used up: wait for the next book
                return levels[0][0], Liquidity.TAKER, levels
            price = self._slipped(order.side, Decimal(str(c.open)), order.pair)
            return price, Liquidity.TAKER, None
        if order.type is OrderType.STOP_LIMIT and order.client_order_id in self._triggered:
            return _match_limit(order, c)
        if order.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT):
            stop_price = _stop_touched(order, c)
            if stop_price is None:
                return None
            if order.type is OrderType.STOP_LIMIT:
                # Triggered: it rests as a limit from the next bar (the path after the
                # trigger inside this bar is unknown, so no same-bar fill is assumed).
                self._triggered.add(order.client_order_id)
                return None
            return self._slipped(order.side, stop_price, order.pair), Liquidity.TAKER, None
        return _match_limit(order, c)

    def _slipped(self, side: Side, price: Decimal, pair: str) -> Decimal:
        bps = self.slippage_bps
        if self.slippage_model == "volatility":
            # Scale with the last closed bar's range (the previous bar while matching a new
            # one): half the range in bps, at least the fixed bps.
            last = self._last.get(pair)
            span = (last.high - last.low) / last.close if last is not None and last.close else 0.0
            bps = max(bps, Decimal(str(span * 1e4 / 2)))
        return slipped_price(side, price, bps)

    # -- Quantities and fills ----------------------------------------------------------------

    def _fill_qty(
        self,
        order: Order,
        price: Decimal,
        budget: Decimal | None,
        levels: list[tuple[Decimal, Decimal]] | None,
    ) -> tuple[Decimal, bool]:
        """Return (qty to fill now, whether that completes the order)."""
        qty = order.remaining_qty
        market = self.markets.get(order.pair)
        lot = market.lot_size if market is not None and market.lot_size > 0 else None
        quote_amount = self._quote_amounts.get(order.client_order_id)
        if quote_amount is not None:
            qty = (
                quote_qty(quote_amount, price, self.taker_fee, lot, *self._sizing(order))
                if levels is None
                else _floor(_quote_walk(levels, quote_amount, self.taker_fee), lot)
            )
        if order.reduce_only:
            qty = min(qty, self._reducible(order))
        wanted = qty
        if budget is not None:
            qty = min(qty, max(budget, ZERO))
        if levels is not None:
            depth = sum((size for _, size in levels), ZERO)
            if qty > depth:
                qty = _floor(depth, lot)
        return qty, qty >= wanted

    def _fill(
        self,
        order: Order,
        price: Decimal,
        qty: Decimal,
        liquidity: Liquidity,
        ts: int,
        *,
        complete: bool = True,
    ) -> tuple[Order, Fill]:
        rate = self.maker_fee if liquidity is Liquidity.MAKER else self.taker_fee
        fee = price * qty * rate
        market = self.markets.get(order.pair)
        fill = Fill(
            client_order_id=order.client_order_id,
            pair=order.pair,
            side=order.side,
            price=price,
            qty=qty,
            fee=fee,
            fee_currency=market.quote if market else "USDT",
            liquidity=liquidity,
            ts=ts,
            fill_id=f"simfill-{next(self._fill_ids)}",
            exchange_order_id=order.exchange_order_id,
        )
        filled = order.filled_qty + qty
        avg = (
            ((order.avg_fill_price or ZERO) * order.filled_qty + price * qty) / filled
            if filled
            else price
        )
        total_qty = order.qty
        quote_amount = self._quote_amounts.pop(order.client_order_id, None)
        if quote_amount is not None:
            # A quote-sized order is done when its budget is spent; a capped fill keeps the
            # rest of the budget working (its qty is then the estimate at this price).
            left = quote_amount - (qty * price + fee)
            rest = ZERO
            if not complete and left > 0:
                self._quote_amounts[order.client_order_id] = left
                rest = quote_qty(left, price, self.taker_fee, market.lot_size if market else None)
            total_qty = filled + rest
        status = OrderStatus.FILLED if filled >= total_qty else OrderStatus.PARTIALLY_FILLED
        updated = evolve(
            order,
            qty=total_qty,
            filled_qty=filled,
            avg_fill_price=avg,
            fee=order.fee + fee,
            status=status,
            ts_updated=ts,
        )
        self._orders[order.client_order_id] = updated
        signed = qty if order.side is Side.BUY else -qty
        self._track_entry(order.pair, signed, price)  # before the position moves
        position = self._positions.get(order.pair, ZERO) + signed
        self._positions[order.pair] = position
        if status is OrderStatus.FILLED:
            self._quote_amounts.pop(order.client_order_id, None)
            self._triggered.discard(order.client_order_id)
            self._drop_open(updated)
        if position == 0:
            self._cancel_reduce_only(order.pair)
        return updated, fill

    def _cancel_reduce_only(self, pair: str) -> None:
        for cid in list(self._open.get(pair, [])):
            order = self._orders[cid]
            if order.reduce_only and not order.status.is_terminal:
                self._finish(order, OrderStatus.CANCELLED)

    def _finish(self, order: Order, status: OrderStatus) -> Order:
        updated = evolve(order, status=status, ts_updated=self._now())
        self._orders[order.client_order_id] = updated
        self._quote_amounts.pop(order.client_order_id, None)
        self._triggered.discard(order.client_order_id)
        self._drop_open(updated)
        return updated

    def _drop_open(self, order: Order) -> None:
        ids = self._open.get(order.pair, [])
        if order.client_order_id in ids:
            ids.remove(order.client_order_id)


def _stop_touched(order: Order, c: Candle) -> Decimal | None:
    return stop_reached(order, c.open, c.high, c.low)


def stop_reached(order: Order, open_: float, high: float, low: float) -> Decimal | None:
    """Return the price a stop order triggers at in a bar (its open when gapped), or None."""
    stop = order.stop_price
    if stop is None:
        return None
    return trigger_reached(order.side, stop, open_, high, low)


def trigger_reached(
    side: Side, stop: Decimal, open_: float, high: float, low: float
) -> Decimal | None:
    """Return the price a stop of `side` at `stop` triggers at in a bar (`stop_reached`)."""
    o = Decimal(str(open_))
    if side is Side.SELL:
        if o <= stop:
            return o
        return stop if Decimal(str(low)) <= stop else None
    if o >= stop:
        return o
    return stop if Decimal(str(high)) >= stop else None


def _match_limit(order: Order, c: Candle) -> tuple[Decimal, Liquidity, None] | None:
    limit = order.price
    if limit is None:
        return None
    o = Decimal(str(c.open))
    if order.side is Side.BUY:
        if o < limit:
            return o, Liquidity.MAKER, None
        if Decimal(str(c.low)) < limit:
            return limit, Liquidity.MAKER, None
    else:
        if o > limit:
            return o, Liquidity.MAKER, None
        if Decimal(str(c.high)) > limit:
            return limit, Liquidity.MAKER, None
    return None


def _ohlcv(row: np.ndarray) -> tuple[float, float, float, float, float]:
    return float(row[0]), float(row[1]), float(row[2]), float(row[3]), float(row[4])


def _crosses(side: Side, price: Decimal, last: Decimal) -> bool:
    return price >= last if side is Side.BUY else price <= last


def _floor(qty: Decimal, lot: Decimal | None) -> Decimal:
    if lot is None:
        return qty
    return (qty / lot).to_integral_value(rounding=ROUND_FLOOR) * lot


def _quote_walk(levels: Sequence[tuple[Decimal, Decimal]], quote: Decimal, fee: Decimal) -> Decimal:
    """Return the base quantity `quote` buys walking `levels`, fees included."""
    qty = ZERO
    left = quote
    for price, size in levels:
        unit = price * (1 + fee)
        take = min(size, left / unit)
        qty += take
        left -= take * unit
        if left <= 0:
            break
    return qty
