"""Orders that fill in pieces: each execution applied once, the stop following the pieces.

Part of `trade_executor` (which re-exports it). An execution from the private stream or a
REST sweep is applied once, in whatever order the pieces and the order's reports arrive
(`ExecutorCore.order_after_fill` derives the order's state); an entry's first piece
places the position's stop and later pieces resize it, cancel first and then place, so
at most one stop works or may work, sized to what is actually held.

An execution of an order the bot did not place that reduces a position (Bybit's
liquidation engine, auto-deleveraging, a trade by hand) is booked once under an order
adopted into the journal for it, so a restart replays it and never re-books or resurrects
the position; the position's stop goes (or is resized to what is left).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from decimal import ROUND_DOWN, Decimal

import structlog

from error_handler import BotError
from executor_core import StopState, _Protection, protective_id
from models import (
    ClosedTrade,
    Event,
    EventSink,
    Fill,
    FillKind,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    PositionLiquidated,
    Side,
    TradeClosed,
)
from order_amend import AmendingExecutor


log = structlog.get_logger("trade_executor")


class PieceExecutor(AmendingExecutor):
    """Apply executions once in any order; keep the stop sized to what the pieces hold."""

    async def on_stream_fill(self, fill: Fill) -> ClosedTrade | None:
        """Apply an execution from the private stream or a REST sweep, once, in any order.

        The order's state is derived from what is known of it (`order_after_fill`). An
        execution the exchange made (liquidation, ADL) or of an order placed outside the
        bot (no client id) is booked when it reduces a position (`_on_outside_fill`);
        funding and settlement rows move no position and are left to their own path.
        """
        if fill.kind is FillKind.OTHER:
            return None
        if fill.kind is not FillKind.TRADE or not fill.client_order_id:
            return await self._on_outside_fill(fill)
        order = self.order_after_fill(fill)
        if order is None:
            if not await self.has_fill(fill.fill_id):
                log.warning(
                    "fill_for_unknown_order", client_order_id=fill.client_order_id, pair=fill.pair
                )
            return None
        return await self.on_fill(order, fill)

    # -- Closes the exchange made ------------------------------------------------------------

    async def _on_outside_fill(self, fill: Fill) -> ClosedTrade | None:
        """Book an execution of an order we did not place that reduces a position, once.

        It is journaled under an adopted order named after the execution (`outside_id`),
        whose reason says how the position was closed, so a restart replays it; the
        position's stop is taken off when flat (the exchange cancels it too) or resized
        to what is left.
        """
        held = self.portfolio.signed_qty(fill.pair)
        reduces = held != 0 and (held > 0) == (fill.side is Side.SELL)
        if not reduces or fill.fill_id in self._fill_ids or await self.has_fill(fill.fill_id):
            if not reduces and not await self.has_fill(fill.fill_id):
                log.warning(
                    "fill_for_unknown_order",
                    client_order_id=fill.client_order_id,
                    pair=fill.pair,
                    kind=str(fill.kind),
                )
            return None
        if fill.qty > abs(held):
            # More than we hold (a flip by hand): only our part is ours to book.
            log.error("outside_fill_exceeds_position", pair=fill.pair, qty=str(fill.qty))
            fill = replace(fill, qty=abs(held), fee=fill.fee * abs(held) / fill.qty)
        booked, order = _adopted(fill, self._market_for(fill.pair).quote)
        if self._store is not None:
            await self._off(self._store.adopt_order, order)
        # The round trip is told once, by PositionLiquidated below, not also as TradeClosed.
        sink = self._notify
        if not isinstance(sink, _OutsideCloses):
            sink = self._notify = _OutsideCloses(sink)
        key = (booked.pair, booked.ts, order.reason)
        sink.held[key] += 1
        try:
            trade = await self.on_fill(order, booked)
        finally:
            sink.release(key)
        if trade is None:
            return None  # booked meanwhile by the other source (stream or REST sweep)
        remaining = abs(self.portfolio.signed_qty(fill.pair))
        log.warning(
            "position_closed_by_exchange",
            pair=fill.pair,
            kind=str(fill.kind),
            qty=str(fill.qty),
            price=str(fill.price),
            fee=str(fill.fee),
            remaining=str(remaining),
            fill_id=fill.fill_id,
        )
        self._notify(PositionLiquidated(booked, fill.kind, trade.pnl, remaining, trade))
        if remaining:
            await self._protect_rest(fill.pair, fill.price)
        return trade

    async def _protect_rest(self, pair: str, price: Decimal) -> None:
        """Give what an outside close left the one stop it should have, sized to it."""
        slot = self._slot(pair)
        if slot.lock.locked():
            # Never block the fill stream; start-up restores a stop a position lacks.
            log.warning("stop_follow_deferred", pair=pair)
            return
        async with self._holding(pair):
            self._settle(pair, slot)
            if slot.state is StopState.WORKING:
                await self._resize_stop(pair, slot, price)
                return
            position = self.portfolio.position(pair)
            level = None if position is None else position.stop_price
            if slot.state is not StopState.NONE or slot.base is None or level is None:
                return
            if _through(self.portfolio.signed_qty(pair), price, level):
                return
            # The exchange cancelled the stop with the close (Bybit cancels active orders).
            await self._place_stop(pair, slot, level, seq=self._clock.now_ms(), price=price)

    async def _follow_entry(self, entry: OrderIntent, price: Decimal | None) -> None:
        """Protect what an entry's pieces hold so far.

        The first piece places the stop; later ones resize it once the applied fills have
        caught up with the exchange's report of the order (a burst is one resize).
        """
        slot = self._slot(entry.pair)
        if slot.base != entry.client_order_id:
            await self._protect(entry, price)
        elif entry.client_order_id not in self._unapplied.get(entry.pair, ()):
            await self._resize_stop(entry.pair, slot, price)
            await self._resize_take_profits(entry.pair, slot, price)

    async def _resize_take_profits(
        self, pair: str, slot: _Protection, price: Decimal | None
    ) -> None:
        """Size the resting take-profits (linear) to what is held: cancel, then place anew."""
        position = self.portfolio.position(pair)
        if position is None or slot.base is None or not slot.others:
            return
        lot = self._market_for(pair).lot_size or Decimal(1)
        qty = (position.qty / lot).to_integral_value(ROUND_DOWN) * lot
        for cid in list(slot.others):
            order = self.orders.get(cid)
            if (
                order is None
                or order.status.is_terminal
                or order.filled_qty > 0  # already taking profit: left as it is
                or order.qty == qty
                or order.price is None
            ):
                continue
            try:
                self._track(await self._gateway.cancel_order(pair, client_order_id=cid))
            except BotError as e:
                log.warning("take_profit_resize_failed", **{**e.describe(), "client_order_id": cid})
                continue
            if not self._is_done(cid):
                continue  # the cancel is not confirmed: keep it, never two
            slot.others.remove(cid)
            key = protective_id(slot.base, "tpq", int(qty / lot))
            intent = self._protective_intent(pair, OrderType.LIMIT, order.price, key)
            placed = await self._send_protective(intent, price)
            if placed is None or placed.status is not OrderStatus.REJECTED:
                slot.others.append(
                    intent.client_order_id if placed is None else placed.client_order_id
                )

    async def _resize_stop(self, pair: str, slot: _Protection, price: Decimal | None) -> None:
        """Size the stop to what the position holds now: cancel it, then place anew.

        Cancel first, then place (as for a trailing move): never two stops. A stop whose
        answer was lost is looked up by id first (the resize waits while that cannot be
        told), and one found never placed is placed now. The new stop is named after its
        size in lots, so a restarted bot cannot place it twice.
        """
        wanted = await self._resize_target(pair, slot)
        if wanted is None:
            return
        level, qty = wanted
        if slot.state is StopState.WORKING:
            stop = self.orders.get(slot.stop) if slot.stop is not None else None
            if stop is not None and stop.qty == qty:
                return
            if not await self._clear_stop(pair, slot):
                log.warning("stop_resize_deferred", pair=pair, client_order_id=slot.stop)
                return
        elif price is not None and _through(self.portfolio.signed_qty(pair), price, level):
            return  # never a stop through the market: the engine closes such a position
        if self.portfolio.position(pair) is None or slot.state is not StopState.NONE:
            return  # the stop fired while it was being cancelled
        lots = int(qty / (self._market_for(pair).lot_size or Decimal(1)))
        placed = await self._place_stop(pair, slot, level, seq=lots, price=price, kind="slq")
        log.info(
            "stop_resized",
            pair=pair,
            qty=str(qty),
            client_order_id=None if placed is None else placed.client_order_id,
        )

    async def _resize_target(self, pair: str, slot: _Protection) -> tuple[Decimal, Decimal] | None:
        """Return (level, qty on the lot grid) the pair's stop should have; None: leave it."""
        position = self.portfolio.position(pair)
        if position is None or slot.base is None:
            return None
        self._settle(pair, slot)
        if slot.state is StopState.NONE:
            # Taken off on purpose (an exit under way, a refused placement): not placed
            # again from here; start-up restores a stop a position lacks.
            return None
        unanswered = slot.state in (StopState.UNKNOWN, StopState.PLACING)
        if unanswered and await self._resolve_stop(pair, slot) is False:
            log.warning("stop_resize_deferred", pair=pair, client_order_id=slot.stop)
            return None
        stop = self.orders.get(slot.stop) if slot.stop is not None else None
        level = position.stop_price or (stop.stop_price if stop is not None else None)
        market = self._market_for(pair)
        lot = market.lot_size if market.lot_size > 0 else Decimal(1)
        qty = (position.qty / lot).to_integral_value(ROUND_DOWN) * lot
        if level is None or qty < market.min_qty or qty <= 0:
            return None
        return level, qty


class _OutsideCloses:
    """The executor's event sink, less the TradeClosed of a round trip an outside fill ends.

    `held` counts, per (pair, exit time, reason) of an outside close being booked, the
    bookings under way (the stream and a REST sweep may both try one execution); its
    TradeClosed is dropped, as the PositionLiquidated sent after it carries the trade.
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.held: Counter[tuple[str, int, str]] = Counter()

    def __call__(self, event: Event) -> None:
        if isinstance(event, TradeClosed):
            trade = event.trade
            if self.held[(trade.pair, trade.exit_ts, trade.reason)] > 0:
                return
        self.sink(event)

    def release(self, key: tuple[str, int, str]) -> None:
        """End one booking of `key`."""
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]


_OUTSIDE_PREFIX = {
    FillKind.LIQUIDATION: "liq",
    FillKind.ADL: "adl",
    FillKind.TRADE: "ext",
    FillKind.OTHER: "ext",
}
_OUTSIDE_REASON = {
    FillKind.LIQUIDATION: "liquidation: the exchange took the position over at {price}",
    FillKind.ADL: "adl: auto-deleveraged by the exchange at {price}",
    FillKind.TRADE: "closed on the exchange by an order the bot did not place at {price}",
    FillKind.OTHER: "closed on the exchange at {price}",
}


def outside_id(fill: Fill) -> str:
    """Return the client id an outside execution is journaled under (one per execution).

    Derived from the execution id, so the REST catch-up, the stream and a restart all name
    it the same way (`liq-`, `adl-` or `ext-` and a digest, within Bybit's 36 characters).
    """
    digest = hashlib.sha256(fill.fill_id.encode()).hexdigest()[:24]
    return f"{_OUTSIDE_PREFIX[fill.kind]}-{digest}"


def _adopted(fill: Fill, quote: str) -> tuple[Fill, Order]:
    """Return the outside execution renamed to its adopted order, and that order."""
    cid = outside_id(fill)
    booked = replace(fill, client_order_id=cid, fee_currency=fill.fee_currency or quote)
    order = Order(
        client_order_id=cid,
        pair=fill.pair,
        side=fill.side,
        type=OrderType.MARKET,
        qty=fill.qty,
        status=OrderStatus.FILLED,
        ts_created=fill.ts,
        ts_updated=fill.ts,
        exchange_order_id=fill.exchange_order_id,
        filled_qty=fill.qty,
        avg_fill_price=fill.price,
        fee=fill.fee,
        reduce_only=True,
        reason=_OUTSIDE_REASON[fill.kind].format(price=fill.price),
    )
    return booked, order


def _through(signed_qty: Decimal, price: Decimal, level: Decimal) -> bool:
    """Return True when `price` is already past a stop at `level` for this position."""
    return price <= level if signed_qty > 0 else price >= level
