"""Orders that fill in pieces: each execution applied once, the stop following the pieces.

Part of `trade_executor` (which re-exports it). An execution from the private stream or a
REST sweep is applied once, in whatever order the pieces and the order's reports arrive
(`ExecutorCore.order_after_fill` derives the order's state); an entry's first piece
places the position's stop and later pieces resize it, cancel first and then place, so
at most one stop works or may work, sized to what is actually held.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

import structlog

from error_handler import BotError
from executor_core import StopState, _Protection, protective_id
from models import ClosedTrade, Fill, OrderIntent, OrderStatus, OrderType
from order_protection import ProtectingExecutor


log = structlog.get_logger("trade_executor")


class PieceExecutor(ProtectingExecutor):
    """Apply executions once in any order; keep the stop sized to what the pieces hold."""

    async def on_stream_fill(self, fill: Fill) -> ClosedTrade | None:
        """Apply an execution from the private stream or a REST sweep, once, in any order.

        The order's state is derived from what is known of it (`order_after_fill`); an
        execution of an order that is not ours is ignored.
        """
        order = self.order_after_fill(fill)
        if order is None:
            if not await self.has_fill(fill.fill_id):
                log.warning(
                    "fill_for_unknown_order", client_order_id=fill.client_order_id, pair=fill.pair
                )
            return None
        return await self.on_fill(order, fill)

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


def _through(signed_qty: Decimal, price: Decimal, level: Decimal) -> bool:
    """Return True when `price` is already past a stop at `level` for this position."""
    return price <= level if signed_qty > 0 else price >= level
