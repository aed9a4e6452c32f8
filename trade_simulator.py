"""The simulated exchange: a matching engine behind the same order interface as the live one,
and the replay feed that drives it from archived candles.

Fill conventions (documented, conservative, the same in sim and backtest):

* A market order placed on candle *t*'s close fills at candle *t+1*'s open, plus slippage
  against the taker (`fill_at="next_open"`, the default; `"close"` fills at once at the
  last close). With an order book known for the pair, it walks the book instead.
* A resting limit order fills when price trades *through* it: a buy when the low is below
  the limit (at the limit; at the open if the bar gaps below it), as maker.
* A stop triggers when the bar touches it: a sell stop when the low <= stop, filling at the
  stop, or at the open when the bar gaps through (worse), as taker with slippage.
* Within one bar, stops are processed before take-profits: when a bar touches both, the
  stop is assumed first.
* Reduce-only orders never increase a position; when the position they protect is closed,
  the pair's remaining reduce-only orders are cancelled (Bybit's position TP/SL behaviour).
* Post-only limits that would cross the last price are rejected, never filled as taker.
* Optional participation cap: at most `max_participation` x the bar's volume fills per
  bar; the rest stays open (partially filled).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from decimal import Decimal
from typing import Literal

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
    Side,
    TimeInForce,
)
from utils.utilities import ReplayClock, timeframe_to_ms


log = structlog.get_logger(__name__)
ZERO = Decimal(0)
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
        self._quote_amounts: dict[str, Decimal] = {}
        self._fill_ids = itertools.count(1)
        self._order_ids = itertools.count(1)
        self._ranges: dict[str, float] = {}

    def _now(self) -> int:
        return int(self._clock.now_ms())  # type: ignore[attr-defined]

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

    def on_candle(self, candle: Candle) -> list[tuple[Order, Fill]]:
        """Match the pair's working orders against a closed candle; return the fills."""
        pair = candle.pair
        if pair not in self.markets:
            self.ensure_market(pair, candle.close)
        if not self._open.get(pair):
            # Nothing working on this pair: just remember the bar (the common case).
            self._ranges[pair] = (candle.high - candle.low) / candle.close
            self._last[pair] = candle
            return []
        results: list[tuple[Order, Fill]] = []
        working = list(self._open[pair])
        step = _step_ms(candle.timeframe)
        # Market orders execute at the open, then stops, then limits (stop before TP).
        priority = {OrderType.MARKET: 0, OrderType.STOP_MARKET: 1, OrderType.STOP_LIMIT: 1}
        working.sort(key=lambda cid: priority.get(self._orders[cid].type, 2))
        budget = (
            Decimal(str(candle.volume * self.max_participation))
            if self.max_participation is not None
            else None
        )
        for cid in working:
            order = self._orders[cid]
            # Skip orders not live before this bar closed (latency); market orders that are
            # live during the bar are filled at its open (an approximation, documented).
            if order.status.is_terminal or order.ts_created + self.latency_ms >= candle.ts + step:
                continue
            price, liquidity = self._match_price(order, candle)
            if price is None:
                continue
            qty = self._fill_qty(order, price, budget)
            if qty <= 0:
                if order.reduce_only:
                    self._finish(order, OrderStatus.CANCELLED)
                continue
            if budget is not None:
                budget -= qty
            results.append(self._fill(order, price, qty, liquidity, candle.ts))
        self._ranges[candle.pair] = (candle.high - candle.low) / candle.close if candle.close else 0
        self._last[candle.pair] = candle
        return results

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
                qty = self._fill_qty(order, price, None)
                if qty > 0:
                    out.append(self._fill(order, price, qty, Liquidity.TAKER, self._now()))
        return out

    # -- Matching ----------------------------------------------------------------------------

    def _match_price(self, order: Order, c: Candle) -> tuple[Decimal | None, Liquidity]:
        o, h, lo = Decimal(str(c.open)), Decimal(str(c.high)), Decimal(str(c.low))
        if order.type is OrderType.MARKET:
            book = self._books.get(order.pair)
            if book is not None and self.slippage_model == "book":
                return _walk_book(book, order.side, order.remaining_qty) or o, Liquidity.TAKER
            return self._slipped(order.side, o, order.pair), Liquidity.TAKER
        if order.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT):
            stop = order.stop_price
            if stop is None:
                return None, Liquidity.TAKER
            if order.side is Side.SELL:
                if o <= stop:
                    return self._slipped(Side.SELL, o, order.pair), Liquidity.TAKER
                if lo <= stop:
                    return self._slipped(Side.SELL, stop, order.pair), Liquidity.TAKER
            else:
                if o >= stop:
                    return self._slipped(Side.BUY, o, order.pair), Liquidity.TAKER
                if h >= stop:
                    return self._slipped(Side.BUY, stop, order.pair), Liquidity.TAKER
            return None, Liquidity.TAKER
        limit = order.price
        if limit is None:
            return None, Liquidity.MAKER
        if order.side is Side.BUY:
            if o < limit:
                return o, Liquidity.MAKER
            if lo < limit:
                return limit, Liquidity.MAKER
        else:
            if o > limit:
                return o, Liquidity.MAKER
            if h > limit:
                return limit, Liquidity.MAKER
        return None, Liquidity.MAKER

    def _slipped(self, side: Side, price: Decimal, pair: str) -> Decimal:
        bps = self.slippage_bps
        if self.slippage_model == "volatility":
            # Scale with the previous bar's range: half the range in bps, at least the fixed.
            bps = max(bps, Decimal(str(self._ranges.get(pair, 0.0) * 1e4 / 2)))
        if bps == 0:
            return price
        factor = bps / Decimal(10_000)
        return price * (1 + factor) if side is Side.BUY else price * (1 - factor)

    def _fill_qty(self, order: Order, price: Decimal, budget: Decimal | None) -> Decimal:
        qty = order.remaining_qty
        quote_amount = self._quote_amounts.get(order.client_order_id)
        if quote_amount is not None and order.filled_qty == 0:
            fee = self.taker_fee
            qty = quote_amount / (price * (1 + fee))
            market = self.markets.get(order.pair)
            if market is not None and market.lot_size > 0:
                qty = (qty / market.lot_size).to_integral_value(rounding="ROUND_FLOOR") * (
                    market.lot_size
                )
        if order.reduce_only:
            position = self._positions.get(order.pair, ZERO)
            reducible = -position if order.side is Side.BUY else position
            qty = min(qty, max(reducible, ZERO))
        if budget is not None:
            qty = min(qty, max(budget, ZERO))
        return qty

    def _fill(
        self, order: Order, price: Decimal, qty: Decimal, liquidity: Liquidity, ts: int
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
        quote_amount = self._quote_amounts.pop(order.client_order_id, None)
        total_qty = filled if quote_amount is not None else order.qty
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
        self._drop_open(updated)
        return updated

    def _drop_open(self, order: Order) -> None:
        ids = self._open.get(order.pair, [])
        if order.client_order_id in ids:
            ids.remove(order.client_order_id)

    def orders(self) -> list[Order]:
        """Return every order the engine has seen (for tests and reports)."""
        return list(self._orders.values())


@functools.cache
def _step_ms(timeframe: str) -> int:
    return timeframe_to_ms(timeframe)


def _crosses(side: Side, price: Decimal, last: Decimal) -> bool:
    return price >= last if side is Side.BUY else price <= last


def _walk_book(book: OrderBook, side: Side, qty: Decimal) -> Decimal | None:
    """Return the average price of taking `qty` from the book, or None if it is too thin."""
    levels = book.asks if side is Side.BUY else book.bids
    remaining = qty
    cost = ZERO
    for price, size in levels:
        take = min(remaining, Decimal(str(size)))
        cost += take * Decimal(str(price))
        remaining -= take
        if remaining <= 0:
            return cost / qty
    return None


# -- Replay feed -----------------------------------------------------------------------------


class ReplayFeed:
    """Yield archived candles of many pairs in time order, driving a replay clock.

    Each candle is emitted at its close time (`ts + timeframe`), so the clock never runs
    ahead of what a live bot could have known. `speed` is candles per second (0 = as fast as
    possible, yielding to the event loop between candles).
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
    ) -> None:
        self.frames = frames
        self.timeframe = timeframe
        self.step = timeframe_to_ms(timeframe)
        self.clock = clock
        self.speed = speed
        self.start_ms = start_ms
        self.end_ms = end_ms
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

    def _streams(self) -> Iterable[Iterable[Candle]]:
        for pair, frame in self.frames.items():
            sliced = self._slice(frame)
            ts = sliced.index.as_unit("ms").asi8
            values = sliced[["open", "high", "low", "close", "volume"]].to_numpy()
            yield (
                Candle(
                    pair, self.timeframe, int(t), float(o), float(h), float(lo), float(c), float(v)
                )
                for t, (o, h, lo, c, v) in zip(ts, values, strict=True)
            )

    async def __aiter__(self) -> AsyncIterator[Candle]:
        """Yield candles in (ts, pair) order."""
        merged = heapq.merge(*self._streams(), key=lambda c: (c.ts, c.pair))
        delay = 1.0 / self.speed if self.speed > 0 else 0.0
        for candle in merged:
            close_ts = candle.ts + self.step
            if close_ts > self.clock.now_ms():
                self.clock.set(close_ts)
            self.emitted += 1
            yield candle
            if delay:
                await asyncio.sleep(delay)
            elif self.emitted % 256 == 0:
                await asyncio.sleep(0)  # let signals and other tasks run
