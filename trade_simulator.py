"""The simulated exchange, the replay feed, pair schedules and the backtest fast path.

A matching engine behind the same order interface as the live exchange; the replay feed
that drives it from archived candles; point-in-time pair schedules for dynamic pairs; and
the numba fast path for single-strategy sweeps, which takes the replay's decisions.

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
  stop-limit that triggers becomes a resting limit from the next bar.
* Within one bar, stops are processed before take-profits: when a bar touches both, the
  stop is assumed first. Intrabar data (`set_intrabar`, e.g. 1m candles inside a 1h bar)
  resolves that order instead: the sub-bars are matched one after another.
* Reduce-only orders never increase a position; when the position they protect is closed,
  the pair's remaining reduce-only orders are cancelled (Bybit's position TP/SL behaviour).
* Post-only limits that would cross the last price are rejected, never filled as taker.
* Optional participation cap: at most `max_participation` x the (sub-)bar's volume fills
  per (sub-)bar; the rest stays open (partially filled).
* Latency: an order takes part in a (sub-)bar only if it was live (`ts_created +
  latency_ms`) before that bar closed; one live during a bar fills at its open (an
  approximation that intrabar data makes finer).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import pandas as pd
import structlog
from numba import njit

from error_handler import ConfigError, OrderNotFoundError, OrderRejected
from models import (
    Candle,
    ClosedTrade,
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
)
from strategy import Strategy
from utils.utilities import ReplayClock, timeframe_to_ms


log = structlog.get_logger(__name__)
ZERO = Decimal(0)
_BPS = Decimal(10_000)
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


def quote_qty(quote: Decimal, price: Decimal, fee: Decimal, lot: Decimal | None) -> Decimal:
    """Return the base quantity `quote` buys at `price` after the taker fee, floored to lot."""
    qty = quote / (price * (1 + fee))
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


class SimulatedExchange:
    """Paper matching engine with the live exchange's order methods.

    `create_order`, `cancel_order`, `fetch_order`, `fetch_open_orders` behave like
    `exchange.Exchange`'s; fills are produced by `on_candle` (and `on_order_book`), which the
    pipeline calls for every closed candle, and handed to the executor like stream fills.
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
        self._books: dict[str, OrderBook] = {}
        self._book_taken: dict[str, dict[tuple[Side, float], Decimal]] = {}
        self._quote_amounts: dict[str, Decimal] = {}
        self._triggered: set[str] = set()
        self._intrabar: dict[str, _Intrabar] = {}
        self._steps: dict[str, int] = {}
        self._fill_ids = itertools.count(1)
        self._order_ids = itertools.count(1)

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
            market = self.markets[pair] = sim_market(pair, price)
        return market

    async def create_order(self, intent: OrderIntent) -> Order:
        """Accept an order; it fills on later candles (or now, with `fill_at="close"`)."""
        if intent.client_order_id in self._orders:
            raise OrderRejected(
                "duplicate client order id", pair=intent.pair, order_id=intent.client_order_id
            )
        now = self._now()
        last = self._last.get(intent.pair)
        order = Order(
            client_order_id=intent.client_order_id,
            pair=intent.pair,
            side=intent.side,
            type=intent.type,
            qty=intent.qty,
            status=OrderStatus.OPEN,
            ts_created=now,
            ts_updated=now,
            exchange_order_id=f"sim-{next(self._order_ids)}",
            price=intent.price,
            stop_price=intent.stop_price,
            reduce_only=intent.reduce_only,
            time_in_force=intent.time_in_force,
            reason=intent.reason,
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

    async def fetch_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order | None:
        """Return an order by client or exchange id, or None."""
        order = self._find(client_order_id, exchange_order_id)
        return order if order is not None and order.pair == pair else None

    def has_working(self, pair: str) -> bool:
        """Return True if any order on `pair` is still working."""
        return bool(self._open.get(pair))

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

    # -- Market data in ----------------------------------------------------------------------

    def on_order_book(self, book: OrderBook) -> None:
        """Remember the pair's latest book; market orders walk it when present."""
        self._books[book.pair] = book
        self._book_taken[book.pair] = {}

    def set_intrabar(self, pair: str, frame: pd.DataFrame, timeframe: str) -> None:
        """Resolve the pair's bars with finer candles (e.g. 1m inside 1h) from now on."""
        ts = frame.index.as_unit("ms").asi8.astype(np.int64)
        values = frame[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        self._intrabar[pair] = _Intrabar(ts, values, timeframe, timeframe_to_ms(timeframe))

    def _step(self, timeframe: str) -> int:
        step = self._steps.get(timeframe)
        if step is None:
            step = self._steps[timeframe] = timeframe_to_ms(timeframe)
        return step

    def on_candle(self, candle: Candle) -> list[tuple[Order, Fill]]:
        """Match the pair's working orders against a closed candle; return the fills."""
        pair = candle.pair
        if pair not in self.markets:
            self.ensure_market(pair, candle.close)
        results: list[tuple[Order, Fill]] = []
        if self._open.get(pair):
            step = self._step(candle.timeframe)
            for bar, bar_step in self._bars(candle, step):
                self._match_bar(bar, bar_step, results)
        self._last[pair] = candle
        return results

    def _bars(self, candle: Candle, step: int) -> Iterable[tuple[Candle, int]]:
        fine = self._intrabar.get(candle.pair)
        if fine is None or fine.step >= step:
            return ((candle, step),)
        lo = int(np.searchsorted(fine.ts, candle.ts, side="left"))
        hi = int(np.searchsorted(fine.ts, candle.ts + step, side="left"))
        if hi <= lo:
            return ((candle, step),)
        return (
            (
                Candle(candle.pair, fine.timeframe, int(fine.ts[i]), *_ohlcv(fine.values[i])),
                fine.step,
            )
            for i in range(lo, hi)
        )

    def _match_bar(self, bar: Candle, step: int, results: list[tuple[Order, Fill]]) -> None:
        working = list(self._open.get(bar.pair, []))
        # Market orders execute at the open, then stops, then limits (stop before TP).
        priority = {OrderType.MARKET: 0, OrderType.STOP_MARKET: 1, OrderType.STOP_LIMIT: 1}
        working.sort(key=lambda cid: priority.get(self._orders[cid].type, 2))
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
            matched = self._match(order, bar)
            if matched is None:
                continue
            price, liquidity, levels = matched
            qty, complete = self._fill_qty(order, price, budget, levels)
            if qty <= 0:
                continue
            if levels is not None:
                price = self._take_book(order, qty)
            if budget is not None:
                budget -= qty
            results.append(self._fill(order, price, qty, liquidity, bar.ts, complete=complete))

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
            book = self._books.get(order.pair)
            if book is not None and self.slippage_model == "book":
                levels = self._levels(book, order.side)
                if not levels:
                    return None  # the shown depth is used up: wait for the next book
                return levels[0][0], Liquidity.TAKER, levels
            price = self._slipped(order.side, Decimal(str(c.open)), order.pair)
            return price, Liquidity.TAKER, None
        if order.type is OrderType.STOP_LIMIT and order.client_order_id in self._triggered:
            return self._match_limit(order, c)
        if order.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT):
            stop_price = self._stop_touched(order, c)
            if stop_price is None:
                return None
            if order.type is OrderType.STOP_LIMIT:
                # Triggered: it rests as a limit from the next bar (the path after the
                # trigger inside this bar is unknown, so no same-bar fill is assumed).
                self._triggered.add(order.client_order_id)
                return None
            return self._slipped(order.side, stop_price, order.pair), Liquidity.TAKER, None
        return self._match_limit(order, c)

    @staticmethod
    def _stop_touched(order: Order, c: Candle) -> Decimal | None:
        stop = order.stop_price
        if stop is None:
            return None
        o = Decimal(str(c.open))
        if order.side is Side.SELL:
            if o <= stop:
                return o
            return stop if Decimal(str(c.low)) <= stop else None
        if o >= stop:
            return o
        return stop if Decimal(str(c.high)) >= stop else None

    @staticmethod
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

    def _slipped(self, side: Side, price: Decimal, pair: str) -> Decimal:
        bps = self.slippage_bps
        if self.slippage_model == "volatility":
            # Scale with the last closed bar's range (the previous bar while matching a new
            # one): half the range in bps, at least the fixed bps.
            last = self._last.get(pair)
            span = (last.high - last.low) / last.close if last is not None and last.close else 0.0
            bps = max(bps, Decimal(str(span * 1e4 / 2)))
        return slipped_price(side, price, bps)

    # -- Order book --------------------------------------------------------------------------

    def _levels(self, book: OrderBook, side: Side) -> list[tuple[Decimal, Decimal]]:
        """Return the book side a taker on `side` hits, less what earlier fills took."""
        taken = self._book_taken.setdefault(book.pair, {})
        out = []
        for price, size in book.asks if side is Side.BUY else book.bids:
            left = Decimal(str(size)) - taken.get((side, price), ZERO)
            if left > 0:
                out.append((Decimal(str(price)), left))
        return out

    def _take_book(self, order: Order, qty: Decimal) -> Decimal:
        """Consume `qty` from the book for `order`; return the average price paid."""
        book = self._books[order.pair]
        taken = self._book_taken.setdefault(book.pair, {})
        remaining = qty
        cost = ZERO
        for price, size in book.asks if order.side is Side.BUY else book.bids:
            key = (order.side, price)
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
                quote_qty(quote_amount, price, self.taker_fee, lot)
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
        updated = replace(
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
        updated = replace(order, status=status, ts_updated=self._now())
        self._orders[order.client_order_id] = updated
        self._quote_amounts.pop(order.client_order_id, None)
        self._triggered.discard(order.client_order_id)
        self._drop_open(updated)
        return updated

    def _drop_open(self, order: Order) -> None:
        ids = self._open.get(order.pair, [])
        if order.client_order_id in ids:
            ids.remove(order.client_order_id)

    def orders(self) -> list[Order]:
        """Return every order the engine has seen (for tests and reports)."""
        return list(self._orders.values())


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


# -- Replay feed -----------------------------------------------------------------------------

Progress = Callable[[int, int], None]


class ReplayFeed:
    """Yield archived candles of many pairs in time order, driving a replay clock.

    Each candle is emitted at its close time (`ts + timeframe`), so the clock never runs
    ahead of what a live bot could have known. `speed` is candles per second (0 = as fast as
    possible). Between candles it yields to the event loop, every candle by default (a
    consumer behind a queue needs that to keep up, so the clock never runs ahead of the
    candle being processed) or every `yield_every` candles when the consumer processes
    each candle inline (a backtest's direct loop), which is much faster. `progress(done,
    total)` is called every `progress_every` candles and at the end (a progress bar).
    """

    def __init__(
        self,
        frames: dict[str, pd.DataFrame],
        timeframe: str,
        clock: ReplayClock,
        *,
        speed: float = 0.0,
        start_ms: int | None = None,
        end_ms: int | None = None,
        progress: Progress | None = None,
        progress_every: int = 5_000,
        yield_every: int = 1,
    ) -> None:
        self.frames = frames
        self.timeframe = timeframe
        self.step = timeframe_to_ms(timeframe)
        self.clock = clock
        self.speed = speed
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.progress = progress
        self.progress_every = max(1, progress_every)
        self.yield_every = max(1, yield_every)
        self.emitted = 0

    def __len__(self) -> int:
        return sum(len(self._slice(f)) for f in self.frames.values())

    def _slice(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.start_ms is None and self.end_ms is None:
            return frame
        ts = frame.index.as_unit("ms").asi8
        mask = np.ones(len(ts), dtype=bool)
        if self.start_ms is not None:
            mask &= ts >= self.start_ms
        if self.end_ms is not None:
            mask &= ts < self.end_ms
        return frame[mask]

    def _streams(self) -> list[Iterable[Candle]]:
        return [self._stream(pair, self._slice(frame)) for pair, frame in self.frames.items()]

    def _stream(self, pair: str, frame: pd.DataFrame) -> Iterable[Candle]:
        # A function per pair, so each generator binds its own pair (a generator expression
        # in a loop would read the loop variable late and label every candle with the last).
        ts = frame.index.as_unit("ms").asi8.tolist()
        values = frame[["open", "high", "low", "close", "volume"]].to_numpy().tolist()
        timeframe = self.timeframe
        for t, (o, h, lo, c, v) in zip(ts, values, strict=True):
            yield Candle(pair, timeframe, t, o, h, lo, c, v)

    def single_pair(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """Return (pair, open times, OHLCV rows) when the replay has exactly one pair.

        For a consumer that walks the arrays itself (`Engine.replay_in_runs`); it reports
        its position with `advance_to`. None with several pairs, or when paced (`speed`).
        """
        if len(self.frames) != 1 or self.speed > 0:
            return None
        ((pair, frame),) = self.frames.items()
        frame = self._slice(frame)
        ts = frame.index.as_unit("ms").asi8
        ohlcv = frame[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
        return pair, ts, ohlcv

    def advance_to(self, emitted: int, *, done: bool = False) -> None:
        """Record how many candles an array consumer has processed; report progress."""
        before, self.emitted = self.emitted, emitted
        every = self.progress_every
        if self.progress is not None and (done or emitted // every > before // every):
            self.progress(emitted, len(self))

    async def __aiter__(self) -> AsyncIterator[Candle]:
        """Yield candles in (ts, pair) order."""
        streams = self._streams()
        merged = (
            streams[0] if len(streams) == 1 else heapq.merge(*streams, key=lambda c: (c.ts, c.pair))
        )
        delay = 1.0 / self.speed if self.speed > 0 else 0.0
        # Yielding to the loop every candle costs more than the rest of the feed; a consumer
        # that processes each candle before asking for the next (a backtest) can yield less.
        every = 1 if delay > 0 else self.yield_every
        progress = self.progress
        total = len(self) if progress is not None else 0
        clock = self.clock
        step = self.step
        now = clock.now_ms()
        emitted = self.emitted
        for candle in merged:
            close_ts = candle.ts + step
            if close_ts > now:
                clock.set(close_ts)
                now = close_ts
            emitted += 1
            self.emitted = emitted
            yield candle
            if progress is not None and emitted % self.progress_every == 0:
                progress(emitted, total)
            if emitted % every == 0:
                await asyncio.sleep(delay)
        if progress is not None:
            progress(emitted, total)


# -- Dynamic pairs ---------------------------------------------------------------------------


class PairTarget(Protocol):
    """What a pair schedule updates: the engine's traded pairs."""

    def set_pairs(self, pairs: list[str]) -> None:
        """Replace the traded pairs; dropped ones are drained (exits only)."""
        ...


class PairSchedule:
    """A point-in-time pair list for backtests, refreshed on a candle-aligned interval.

    `pairs_at(ts)` is any callable returning the pairs to trade as known at `ts` (e.g. the
    top-pairs ranking computed only from data before `ts`). It is asked at each refresh
    boundary (`ts - ts % refresh_ms`), never for a later time than the candle being
    processed, and its answers are remembered, so a replay asks at most once per boundary.
    """

    def __init__(self, pairs_at: Callable[[int], Sequence[str]], *, refresh_ms: int) -> None:
        if refresh_ms <= 0:
            raise ConfigError("pair refresh interval must be positive", component="simulator")
        self.pairs_at = pairs_at
        self.refresh_ms = refresh_ms
        self._cache: dict[int, list[str]] = {}
        self._current: list[str] | None = None
        self.history: list[tuple[int, list[str]]] = []

    def pairs(self, now_ms: int) -> list[str]:
        """Return the pair list in force at `now_ms` (a candle's close time)."""
        boundary = now_ms - now_ms % self.refresh_ms
        pairs = self._cache.get(boundary)
        if pairs is None:
            pairs = self._cache[boundary] = list(dict.fromkeys(self.pairs_at(boundary)))
        if pairs != self._current:
            previous = set(self._current or ())
            log.info(
                "pairs_refreshed",
                ts=boundary,
                added=sorted(set(pairs) - previous),
                removed=sorted(previous - set(pairs)),
            )
            self._current = pairs
            self.history.append((boundary, pairs))
        return pairs

    def apply(self, target: PairTarget, candle: Candle, step: int) -> None:
        """Update `target`'s pairs for `candle` (call before the engine processes it)."""
        before = self._current
        pairs = self.pairs(candle.ts + step)
        if self._current is not before:
            target.set_pairs(list(pairs))

    def universe(self, start_ms: int, end_ms: int) -> list[str]:
        """Return every pair listed at any boundary in [start_ms, end_ms): the data to load."""
        seen: dict[str, None] = {}
        boundary = start_ms - start_ms % self.refresh_ms
        while boundary < end_ms:
            pairs = self._cache.get(boundary)
            if pairs is None:
                pairs = self._cache[boundary] = list(dict.fromkeys(self.pairs_at(boundary)))
            seen.update(dict.fromkeys(pairs))
            boundary += self.refresh_ms
        return list(seen)


# -- Fast path -------------------------------------------------------------------------------

TRADE_COLUMNS = ("entry_ts", "exit_ts", "entry_price", "exit_price", "qty", "fee", "pnl")
_TIMEFRAMES = {
    timeframe_to_ms(tf): tf
    for tf in ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "12h", "1d", "1w")
}


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """A backtest's trades and equity curve, from the fast path or a replay.

    `ts` are the times each equity point was recorded (candle close times, ms UTC), as the
    replay's portfolio records them. `table` holds the closed trades column-wise
    (`TRADE_COLUMNS`, plus string columns `pair`, `side` and `reason`); `trades` builds
    `ClosedTrade`s from it.
    """

    strategy: dict[str, Any]
    pairs: tuple[str, ...]
    timeframe: str
    starting_balance: float
    ts: np.ndarray
    equity: np.ndarray
    table: dict[str, np.ndarray]
    final_equity: float
    fees: float
    candles: int
    open_positions: tuple[dict[str, Any], ...] = ()
    # Close prices by pair, as (close time ms, close) for the report's trade-marker charts.
    prices: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    signals: int = 0
    vetoes: int = 0
    rejections: int = 0
    mode: str = "backtest"
    # The sum of closed-trade PnL as the accounting kept it (None: sum the table).
    realised_pnl: float | None = None

    @property
    def n_trades(self) -> int:
        """Return the number of closed trades."""
        return len(self.table["pnl"])

    @property
    def trades(self) -> list[ClosedTrade]:
        """Return the closed trades as `ClosedTrade`s (built on each call)."""
        t = self.table
        return [
            ClosedTrade(
                pair=str(t["pair"][i]),
                side=PositionSide(str(t["side"][i])),
                entry_ts=int(t["entry_ts"][i]),
                exit_ts=int(t["exit_ts"][i]),
                entry_price=float(t["entry_price"][i]),
                exit_price=float(t["exit_price"][i]),
                qty=float(t["qty"][i]),
                fee=float(t["fee"][i]),
                pnl=float(t["pnl"][i]),
                reason=str(t["reason"][i]) if "reason" in t else "",
            )
            for i in range(self.n_trades)
        ]

    @property
    def max_drawdown(self) -> float:
        """Return the deepest fall of the equity curve from its running peak (a fraction)."""
        if len(self.equity) == 0:
            return 0.0
        peak = np.maximum.accumulate(np.maximum(self.equity, self.starting_balance))
        return float(np.max((peak - self.equity) / peak))

    def summary(self) -> dict[str, Any]:
        """Return the run summary in the shape of the replay's `--summary-json` document."""
        start = self.starting_balance
        final = self.final_equity
        step = timeframe_to_ms(self.timeframe)
        return {
            "mode": self.mode,
            "strategy": self.strategy,
            "pairs": list(self.pairs),
            "timeframe": self.timeframe,
            "candles": self.candles,
            "first_ts": int(self.ts[0]) - step if len(self.ts) else None,
            "last_ts": int(self.ts[-1]) - step if len(self.ts) else None,
            "signals": self.signals,
            "vetoes": self.vetoes,
            "rejections": self.rejections,
            "n_trades": self.n_trades,
            "starting_balance": start,
            "final_equity": final,
            "total_return": final / start - 1 if start else 0.0,
            "max_drawdown": self.max_drawdown,
            "fees": self.fees,
            "realised_pnl": (
                self.realised_pnl
                if self.realised_pnl is not None
                else float(np.sum(self.table["pnl"]))
            ),
            "open_positions": [dict(p) for p in self.open_positions],
            "trades": [t.as_dict() for t in self.trades],
        }


def result_from_summary(
    summary: Mapping[str, Any],
    equity_curve: Sequence[tuple[int, float]],
    *,
    prices: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> BacktestResult:
    """Return a `BacktestResult` for a replay run (its summary plus the portfolio's curve)."""
    trades = list(summary.get("trades", ()))
    table: dict[str, np.ndarray] = {
        "pair": np.array([t["pair"] for t in trades], dtype=np.str_),
        "side": np.array([t.get("side", "long") for t in trades], dtype=np.str_),
        "reason": np.array([t.get("reason", "") for t in trades], dtype=np.str_),
    }
    for name in TRADE_COLUMNS:
        dtype = np.int64 if name.endswith("_ts") else np.float64
        table[name] = np.array([t[name] for t in trades], dtype=dtype)
    curve = np.array(equity_curve, dtype=np.float64).reshape(-1, 2)
    return BacktestResult(
        strategy=dict(summary.get("strategy", {})),
        pairs=tuple(summary.get("pairs", ())),
        timeframe=str(summary.get("timeframe", "1m")),
        starting_balance=float(summary["starting_balance"]),
        ts=curve[:, 0].astype(np.int64),
        equity=curve[:, 1].copy(),
        table=table,
        final_equity=float(summary["final_equity"]),
        fees=float(summary.get("fees", 0.0)),
        candles=int(summary.get("candles", len(curve))),
        open_positions=tuple(summary.get("open_positions", ())),
        prices=dict(prices or {}),
        signals=int(summary.get("signals", 0)),
        vetoes=int(summary.get("vetoes", 0)),
        rejections=int(summary.get("rejections", 0)),
        mode=str(summary.get("mode", "backtest")),
    )


_UNITS = {"s": (1_000, 1), "ms": (1, 1), "us": (1, 1_000), "ns": (1, 1_000_000)}


@njit(cache=True)
def _close_times(raw, mul, div, step):  # type: ignore[no-untyped-def]
    # Candle open times in the index's unit -> close times in ms, in one pass; the literal
    # divisors let the compiler turn each division into a multiply and shift.
    out = np.empty(raw.shape[0], dtype=np.int64)
    if div == 1_000_000:
        for i in range(raw.shape[0]):
            out[i] = raw[i] // 1_000_000 + step
    elif div == 1_000:
        for i in range(raw.shape[0]):
            out[i] = raw[i] // 1_000 + step
    else:
        for i in range(raw.shape[0]):
            out[i] = raw[i] * mul + step
    return out


def infer_timeframe(index: pd.DatetimeIndex) -> str:
    """Return the timeframe of a candle index from its most common spacing."""
    ts = index.as_unit("ms").asi8
    if len(ts) < 2:
        raise ConfigError("cannot infer a timeframe from fewer than two candles")
    diffs = np.diff(ts[: min(len(ts), 10_000)])
    values, counts = np.unique(diffs[diffs > 0], return_counts=True)
    step = int(values[np.argmax(counts)])
    if step not in _TIMEFRAMES:
        raise ConfigError(f"candle spacing {step} ms is not a known timeframe; pass timeframe=")
    return _TIMEFRAMES[step]


@dataclass(frozen=True, slots=True)
class _Costs:
    """Fill costs and market rules of a fast-path run (private)."""

    fee: Decimal
    slippage_bps: Decimal
    lot: Decimal
    min_notional: Decimal
    fill_close: bool
    stake: Decimal | None

    @property
    def inv_lot(self) -> float:
        # Multiplying by an exact integer 1/lot rounds once; dividing by 1e-8 rounds twice.
        inv = 1 / self.lot
        return float(inv) if inv == inv.to_integral_value() else 0.0


def run_fast(
    strategy: Strategy,
    df: pd.DataFrame,
    *,
    pair: str = "BTC/USDT",
    timeframe: str | None = None,
    starting_balance: float = 10_000.0,
    taker_fee: float = 0.001,
    maker_fee: float = 0.001,
    slippage_bps: float = 0.0,
    fill_at: Literal["next_open", "close"] = "next_open",
    all_in: bool = True,
    stake: float | None = None,
    market: Market | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    exact: bool = False,
    signals: tuple[np.ndarray, np.ndarray] | None = None,
) -> BacktestResult:
    """Backtest one strategy on one pair with market orders, long only, in one numba pass.

    Takes the same decisions as the replay (`--mode backtest`) under the `all_in` risk
    profile: signals from `populate` over the whole frame (none before `warmup`), an entry
    on a flat bar buys with the whole cash (`qty = floor_lot(cash / (price x (1 + fee)))`
    at the fill price), an exit sells the position; both fill at the next bar's open
    (`fill_at="next_open"`) or at once at the close (`"close"`), `slippage_bps` against the
    taker, taker fee on both sides (every fill is a market order, so `maker_fee` does not
    apply; it is accepted for a uniform call). Orders the replay's rules would refuse (below
    one lot or the market's minimum notional) are skipped the same way.

    Args:
        strategy: the strategy (its `entries_exits` gives the signals).
        df: the candle frame (UTC DatetimeIndex; open/high/low/close/volume).
        pair: the pair traded, for the market rules and the trade list.
        timeframe: the candle timeframe; inferred from the index when None.
        starting_balance: cash in quote currency at the start.
        taker_fee: fee rate of market orders.
        maker_fee: accepted for symmetry with the matching engine; unused here.
        slippage_bps: fixed slippage against the taker, in basis points.
        fill_at: `next_open` (default) or `close`.
        all_in: spend the whole cash on each entry (the replay's `all_in` profile);
            with False, spend `stake` (capped by cash).
        stake: quote spent per entry when `all_in` is False.
        market: the pair's rules; by default `sim_market(pair, first close)` as the replay.
        start_ms: simulate candles from this open time (signals still use earlier rows).
        end_ms: simulate candles before this open time.
        exact: do the accounting in `Decimal` exactly as the replay's exchange and
            portfolio do (trades and final equity equal to the last bit); otherwise in
            float64 inside the numba loop (quantities equal except when a quantity lies
            within ~1e-12 of a lot boundary; PnL equal to ~1e-12 relative).
        signals: precomputed `(enter_long, exit_long)` arrays (sweeps), else computed.

    Raises:
        ConfigError: a bad combination of arguments.
    """
    if not all_in and (stake is None or stake <= 0):
        raise ConfigError("run_fast: all_in=False needs a positive stake", component="simulator")
    if fill_at not in ("next_open", "close"):
        raise ConfigError(f"run_fast: unknown fill_at {fill_at!r}", component="simulator")
    del maker_fee
    timeframe = timeframe or infer_timeframe(df.index)
    step = timeframe_to_ms(timeframe)
    raw = np.asarray(df.index.asi8, dtype=np.int64)  # open times in the index's unit
    mul, div = _UNITS[df.index.unit]
    opens = np.ascontiguousarray(df["open"].to_numpy(dtype=np.float64))
    closes = np.ascontiguousarray(df["close"].to_numpy(dtype=np.float64))
    enter, exit_ = signals if signals is not None else strategy.entries_exits(df)
    market = market or sim_market(pair, float(closes[0]))
    # Bounds in the index's unit, rounded up: a candle is in when its open time >= start.
    first = 0 if start_ms is None else int(np.searchsorted(raw, -(-start_ms * div // mul)))
    last = len(raw) if end_ms is None else int(np.searchsorted(raw, -(-end_ms * div // mul)))
    costs = _Costs(
        fee=Decimal(str(taker_fee)),
        slippage_bps=Decimal(str(slippage_bps)),
        lot=market.lot_size,
        min_notional=market.min_notional,
        fill_close=fill_at == "close",
        stake=None if all_in else Decimal(str(stake)),
    )
    warm = max(strategy.warmup - 1, 0)
    n = max(last - first, 0)
    equity = np.empty(n, dtype=np.float64)
    cap = n // 2 + 1
    entries = np.empty(cap, dtype=np.int64)
    exits = np.empty(cap, dtype=np.int64)
    numbers = np.empty((cap, 5), dtype=np.float64)
    out = np.zeros(8, dtype=np.float64)
    count = _all_in_loop(
        opens[first:last],
        closes[first:last],
        enter[first:last],
        exit_[first:last],
        max(warm - first, 0),
        costs.fill_close,
        float(starting_balance),
        float(costs.stake) if costs.stake is not None else -1.0,
        float(costs.fee),
        float(costs.slippage_bps) / 1e4,
        float(costs.lot),
        costs.inv_lot,
        float(costs.min_notional),
        equity,
        entries,
        exits,
        numbers,
        out,
    )
    entries, exits, numbers = entries[:count], exits[:count], numbers[:count]
    shift = step if costs.fill_close else 0
    ts = _close_times(raw[first:last], mul, div, step)
    opened = shift - step  # a fill's time: the bar's open (next_open) or its close
    table: dict[str, np.ndarray] = {
        "entry_price": numbers[:, 0].copy(),
        "exit_price": numbers[:, 1].copy(),
        "qty": numbers[:, 2].copy(),
        "fee": numbers[:, 3].copy(),
        "pnl": numbers[:, 4].copy(),
    }
    final, fees, open_qty = float(out[0]), float(out[1]), float(out[2])
    open_at = int(out[3]) if open_qty > 0 else -1
    open_price = float(out[4])
    realised: float | None = None
    if exact:
        exact_result = _exact_accounting(
            (entries, exits, open_at),
            opens[first:last],
            closes[first:last],
            costs,
            starting_balance,
            equity,
        )
        table, final, fees = exact_result.table, exact_result.final, exact_result.fees
        open_qty, open_price = exact_result.open_qty, exact_result.open_price
        realised = exact_result.realised
    table["entry_ts"] = ts[entries] + opened
    table["exit_ts"] = ts[exits] + opened
    # Fixed-width string columns: filling them is a memset, object arrays are 20x slower.
    table["pair"] = np.full(count, pair)
    table["side"] = np.full(count, "long")
    table["reason"] = np.full(count, f"{strategy.name}: exit long")
    open_positions: tuple[dict[str, Any], ...] = ()
    if open_at >= 0:
        open_positions = (
            {
                "pair": pair,
                "side": "long",
                "qty": open_qty,
                "entry_price": open_price,
                "entry_ts": int(ts[open_at] + opened),
                "mark_price": float(closes[last - 1]),
            },
        )
    return BacktestResult(
        strategy=strategy.describe(),
        pairs=(pair,),
        timeframe=timeframe,
        starting_balance=float(starting_balance),
        ts=ts,
        equity=equity,
        table=table,
        final_equity=final,
        fees=fees,
        candles=n,
        open_positions=open_positions,
        prices={pair: (ts, closes[first:last])},
        signals=int(out[5]),
        vetoes=int(out[6]),
        rejections=int(out[7]),
        realised_pnl=realised,
    )


def fast_path_blockers(
    *,
    risk_profile: str,
    pairs: Sequence[str],
    timeframe: str,
    slippage_model: str,
    latency_ms: int,
    dynamic_pairs: bool = False,
) -> list[str]:
    """Return why the fast path cannot stand in for the replay of a run (empty: it can).

    The fast path takes the replay's decisions only under the `all_in` risk profile, on
    one pair with a fixed list, with fixed-bps slippage, and with a latency shorter than a
    candle (a longer one delays fills in the replay).
    """
    reasons = []
    if risk_profile != "all_in":
        reasons.append(f"risk profile {risk_profile!r}: the fast path sizes only all_in")
    if len(pairs) != 1:
        reasons.append(f"{len(pairs)} pairs share one portfolio: the fast path runs one")
    if dynamic_pairs:
        reasons.append("a dynamic pair list needs the replay")
    if slippage_model != "fixed":
        reasons.append(f"slippage model {slippage_model!r}: the fast path models fixed bps")
    if latency_ms >= timeframe_to_ms(timeframe):
        reasons.append(f"latency {latency_ms} ms is a candle or more: fills move a bar later")
    return reasons


def fast_backtest(
    strategy: Strategy,
    frame: pd.DataFrame,
    *,
    pair: str,
    timeframe: str,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    fill_at: Literal["next_open", "close"] = "next_open",
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> BacktestResult:
    """Run `--mode backtest` through the fast path, exactly as the replay would account it.

    `frame` is the pair's whole archive (signals use it all, as the replay's precomputed
    signals do); `start_ms`/`end_ms` are the `--timerange`. The market rules come from the
    archive's first close, as the replay builds them. Check `fast_path_blockers` first.
    """
    return run_fast(
        strategy,
        frame,
        pair=pair,
        timeframe=timeframe,
        starting_balance=starting_balance,
        taker_fee=taker_fee,
        slippage_bps=slippage_bps,
        fill_at=fill_at,
        market=sim_market(pair, float(frame["close"].iloc[0])),
        start_ms=start_ms,
        end_ms=end_ms,
        exact=True,
    )


class _Exact(NamedTuple):
    table: dict[str, np.ndarray]
    final: float
    fees: float
    open_qty: float
    open_price: float
    realised: float


def _exact_accounting(
    fills: tuple[np.ndarray, np.ndarray, int],
    opens: np.ndarray,
    closes: np.ndarray,
    costs: _Costs,
    starting_balance: float,
    equity: np.ndarray,
) -> _Exact:
    """Redo the accounting in Decimal, operation for operation as exchange and portfolio.

    Returns the trade table, final equity, fees, open quantity, open entry price and
    realised PnL, and rewrites `equity` from the exact cash and quantity after each fill.
    """
    entries, exits, open_at = fills
    cash = Decimal(str(starting_balance))
    fees = ZERO
    realised = ZERO
    rows: list[tuple[float, ...]] = []
    changes: list[tuple[int, float, float]] = []
    after = 1 if costs.fill_close else 0  # a fill at the close shows from the next bar
    qty = ZERO
    entry = ZERO
    bars = [(int(i), int(j)) for i, j in zip(entries, exits, strict=True)]
    if open_at >= 0:
        bars.append((open_at, -1))
    for i, j in bars:
        entry = slipped_price(Side.BUY, _raw(opens, closes, i, costs), costs.slippage_bps)
        quote = cash if costs.stake is None else min(costs.stake, cash)
        qty = quote_qty(quote, entry, costs.fee, costs.lot)
        entry_fee = entry * qty * costs.fee
        cash -= qty * entry + entry_fee
        fees += entry_fee
        changes.append((i + after, float(cash), float(qty)))
        if j < 0:
            break
        exit_price = slipped_price(Side.SELL, _raw(opens, closes, j, costs), costs.slippage_bps)
        exit_fee = exit_price * qty * costs.fee
        cash -= -qty * exit_price + exit_fee
        fees += exit_fee
        # The portfolio's split of fees by the closed fraction (here the whole position).
        entry_part = entry_fee * (qty / qty)
        exit_part = exit_fee * (qty / qty)
        pnl = (exit_price - entry) * qty * 1 - entry_part - exit_part
        realised += pnl
        rows.append(
            (float(entry), float(exit_price), float(qty), float(entry_part + exit_part), float(pnl))
        )
        changes.append((j + after, float(cash), 0.0))
        qty = ZERO
    numbers = np.array(rows, dtype=np.float64).reshape(-1, 5)
    table = {name: numbers[:, k].copy() for k, name in enumerate(TRADE_COLUMNS[2:])}
    final = cash + qty * Decimal(repr(float(closes[-1]))) if len(closes) else cash
    index = np.array([c[0] for c in changes], dtype=np.int64)
    values = np.array([c[1:] for c in changes], dtype=np.float64).reshape(-1, 2)
    _curve(closes, index, values, float(starting_balance), equity)
    return _Exact(
        table,
        float(final),
        float(fees),
        float(qty),
        float(entry) if open_at >= 0 else 0.0,
        float(realised),
    )


def _raw(opens: np.ndarray, closes: np.ndarray, index: int, costs: _Costs) -> Decimal:
    # The exchange prices a candle value as Decimal(str(float)); repr is the same string.
    return Decimal(repr(float(closes[index] if costs.fill_close else opens[index])))


@njit(cache=True)
def _curve(closes, index, values, cash0, equity):  # type: ignore[no-untyped-def]
    # Equity per bar from (bar, cash after, qty after) changes, in bar order.
    cash = cash0
    qty = 0.0
    k = 0
    for i in range(closes.shape[0]):
        while k < index.shape[0] and index[k] <= i:
            cash = values[k, 0]
            qty = values[k, 1]
            k += 1
        equity[i] = cash + qty * closes[i]


@njit(cache=True)
def _lot_qty(quote, price, fee, lot, inv_lot):  # type: ignore[no-untyped-def]
    # floor_to_lot(quote / (price x (1 + fee))), as the exchange sizes a quote order.
    x = quote / (price * (1.0 + fee))
    if inv_lot > 0.0:
        return math.floor(x * inv_lot) / inv_lot
    return math.floor(x / lot) * lot


@njit(cache=True, inline="always")
def _record_trade(  # type: ignore[no-untyped-def]
    entries, exits, numbers, k, open_at, i, entry_price, price, qty, entry_fee, exit_fee
):
    # One closed round trip into the trade table (row k): bars, prices, qty, fees, PnL.
    entries[k] = open_at
    exits[k] = i
    numbers[k, 0] = entry_price
    numbers[k, 1] = price
    numbers[k, 2] = qty
    numbers[k, 3] = entry_fee + exit_fee
    numbers[k, 4] = (price - entry_price) * qty - entry_fee - exit_fee


@njit(cache=True)
def _all_in_loop(  # type: ignore[no-untyped-def]
    opens,
    closes,
    enter,
    exit_,
    warm,
    fill_close,
    cash0,
    stake,
    fee,
    slip,
    lot,
    inv_lot,
    min_notional,
    equity,
    entries,
    exits,
    numbers,
    out,
):
    # One bar at a time, in the replay's order: fills at the open, mark and record equity,
    # then the signal (which fills at once at the close with fill_close).
    n = closes.shape[0]
    cash = cash0
    qty = 0.0
    entry_price = 0.0
    entry_fee = 0.0
    fees = 0.0
    pending = 0
    k = 0
    open_at = -1
    signals = 0
    vetoes = 0
    rejections = 0
    for i in range(n):
        if pending == 1:
            price = opens[i] * (1.0 + slip)
            quote = cash if stake < 0.0 else min(stake, cash)
            q = _lot_qty(quote, price, fee, lot, inv_lot)
            if q > 0.0:
                entry_fee = price * q * fee
                cash -= q * price + entry_fee
                fees += entry_fee
                qty = q
                entry_price = price
                open_at = i
                pending = 0
        elif pending == -1:
            price = opens[i] * (1.0 - slip)
            exit_fee = price * qty * fee
            cash -= -qty * price + exit_fee
            fees += exit_fee
            _record_trade(entries, exits, numbers, k, open_at, i, entry_price, price, qty,
                          entry_fee, exit_fee)  # fmt: skip
            k += 1
            qty = 0.0
            open_at = -1
            pending = 0
        c = closes[i]
        equity[i] = cash + qty * c
        if i < warm:
            continue
        if qty > 0.0:
            if exit_[i]:
                signals += 1
            if exit_[i] and qty * c < min_notional:
                rejections += 1  # the exchange refuses an exit below its minimum notional
            elif exit_[i]:
                if not fill_close:
                    pending = -1
                    continue
                price = c * (1.0 - slip)
                exit_fee = price * qty * fee
                cash -= -qty * price + exit_fee
                fees += exit_fee
                _record_trade(entries, exits, numbers, k, open_at, i, entry_price, price, qty,
                              entry_fee, exit_fee)  # fmt: skip
                k += 1
                qty = 0.0
                open_at = -1
        elif pending == 0 and enter[i]:
            signals += 1
            quote = cash if stake < 0.0 else min(stake, cash)
            estimate = _lot_qty(quote, c, fee, lot, inv_lot)
            if estimate <= 0.0:
                vetoes += 1  # risk: no cash for one lot
                continue
            if estimate * c < min_notional:
                rejections += 1  # the exchange's minimum notional
                continue
            if not fill_close:
                pending = 1
                continue
            price = c * (1.0 + slip)
            q = _lot_qty(quote, price, fee, lot, inv_lot)
            if q > 0.0:
                entry_fee = price * q * fee
                cash -= q * price + entry_fee
                fees += entry_fee
                qty = q
                entry_price = price
                open_at = i
    out[0] = cash + qty * closes[n - 1] if n > 0 else cash
    out[1] = fees
    out[2] = qty
    out[3] = open_at
    out[4] = entry_price if qty > 0.0 else 0.0
    out[5] = signals
    out[6] = vetoes
    out[7] = rejections
    return k
