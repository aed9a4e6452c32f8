"""Trailing moves: a working stop's trigger moved in place, one request, the same order.

Part of `trade_executor` (which re-exports it). A settled working stop is moved with one
amend (Bybit `POST /v5/order/amend`, the simulator's `amend_order`): the order keeps its
client id and place, so there is never a moment with no stop and never a second one.
Whatever happens to the amend's answer, the one stop works at the old or the new level:
a lost answer is resolved by looking the order up and reading its trigger, and the
position records the level the exchange showed (the next move amends again otherwise,
which is harmless). A stop that is gone when it is amended (it fired, or was cancelled)
settles the slot; a position still open then gets a new stop, as does one whose stop is
not known to work (its answer lost, or none): settled first, then placed anew.
"""

from __future__ import annotations

import logging
from decimal import Decimal

import structlog

from error_handler import BotError
from executor_core import StopState, _Protection
from models import Order, OrderStatus, decision_key, with_attempt
from order_protection import ProtectingExecutor
from utils.precision import round_price
from utils.utilities import logs_at, run_together


log = structlog.get_logger("trade_executor")


class AmendingExecutor(ProtectingExecutor):
    """Move each position's protective stop, in place while it works (module docstring)."""

    async def amend_stop(
        self, pair: str, stop: Decimal, *, candle_ts: int | None = None
    ) -> Order | None:
        """Move the pair's protective stop to `stop`; return the stop after the move.

        A settled working stop has its trigger amended in place. Moving it to the level it
        already has sends nothing, so a restarted bot re-deciding a candle does not move
        it twice. Otherwise (no stop known to work, or the amended one gone) the stop is
        settled and, while the position is open, placed anew, named after the candle
        that moved it; if the old stop cannot be settled yet, the move waits for a later
        candle (None).
        """
        async with self._holding(pair) as slot:
            if not self.portfolio.has_position(pair):
                return None
            mark = self.portfolio.mark_of(pair)
            now = self._clock.now_ms()
            if slot.base is None:  # a position with no recorded entry: name it by now
                slot.base = with_attempt(decision_key("0", pair, now, "s"), 0)
            self._settle(pair, slot)
            working = self.orders.get(slot.stop) if slot.stop is not None else None
            if slot.state is StopState.WORKING and working is not None:
                moved = await self._move_in_place(pair, slot, working, stop)
                if moved is not None:
                    return moved
            if not await self._clear_stop(pair, slot):
                log.warning("stop_amend_deferred", pair=pair, client_order_id=slot.stop)
                return None
            if not await self._fills_applied(pair) or not self.portfolio.has_position(pair):
                return None  # the old stop fired (its fill may still be on its way)
            seq = (candle_ts if candle_ts is not None else now) // 60_000
            placed = await self._place_stop(pair, slot, stop, seq=seq, price=mark)
            if placed is not None and placed.status is not OrderStatus.REJECTED:
                log.info(
                    "stop_moved", pair=pair, stop=str(stop), client_order_id=placed.client_order_id
                )
            return placed

    def trails_in_place(self, pair: str) -> bool:
        """Return True when the pair's stop works, settled, at a level known for sure.

        Such a stop is moved by one amend of its trigger (`amend_stop`), to the level
        `trigger_for` gives.
        """
        return self._working_stop(pair) is not None

    def trigger_for(self, pair: str, stop: Decimal) -> Decimal | None:
        """Return the trigger `amend_stop(pair, stop)` would give the pair's working stop.

        On the tick grid, rounded as the amend rounds it; None unless `trails_in_place`.
        A replay that applies several candles before it amends reads each move's level here
        (`SimDriver`'s held stretches).
        """
        working = self._working_stop(pair)
        return None if working is None else round_price(self._market_for(pair), stop, working.side)

    def _working_stop(self, pair: str) -> Order | None:
        slot = self._protection.get(pair)
        if slot is None or slot.state is not StopState.WORKING or slot.level_unsure:
            return None
        return self.orders.get(slot.stop) if slot.stop is not None else None

    def defer_stop_move(self, pair: str, stop: Decimal, *, candle_ts: int | None = None) -> None:
        """Ask for `amend_stop(pair, stop)` to be made later, by `flush_stop_moves`.

        A burst of candles sends its exits and entries first and moves the held pairs'
        stops after them (each move is a request; the stop in place protects meanwhile).
        An order for the pair submitted before then makes the move first, so each pair's
        own requests keep the order that candles taken one at a time give them.
        """
        self._deferred_moves[pair] = (stop, candle_ts)

    async def flush_stop_moves(self, pair: str | None = None, *, in_flight: int = 1) -> None:
        """Make the deferred stop moves of `pair` (None: of every pair, in deferral order).

        `in_flight`: how many moves (each its own pair's, under its lock) may be on their
        way at once (the live exchange's bursts: `exchange.burst_orders_in_flight`).
        """
        if pair is None:
            moves, self._deferred_moves = self._deferred_moves, {}
        else:
            move = self._deferred_moves.pop(pair, None)
            moves = {} if move is None else {pair: move}
        if in_flight > 1 and len(moves) > 1:

            async def make(item: tuple[str, tuple[Decimal, int | None]]) -> None:
                moved, (stop, candle_ts) = item
                await self.amend_stop(moved, stop, candle_ts=candle_ts)

            await run_together(moves.items(), make, limit=in_flight)
            return
        for moved, (stop, candle_ts) in moves.items():
            await self.amend_stop(moved, stop, candle_ts=candle_ts)

    def drop_stop_moves(self) -> int:
        """Forget the deferred stop moves (a burst that failed); return how many."""
        dropped = len(self._deferred_moves)
        self._deferred_moves = {}
        return dropped

    async def _move_in_place(
        self, pair: str, slot: _Protection, working: Order, stop: Decimal
    ) -> Order | None:
        """Amend the working stop's trigger; None when it must be placed anew instead."""
        level = round_price(self._market_for(pair), stop, working.side)
        cid = working.client_order_id
        if working.stop_price == level and not slot.level_unsure:
            self.portfolio.set_protection(pair, stop=level)
            return working  # this candle's move is already made
        try:
            amended = await self._gateway.amend_order(
                pair, client_order_id=cid, trigger_price=level
            )
        except BotError as e:
            log.warning(
                "stop_amend_failed", **{**e.describe(), "pair": pair, "client_order_id": cid}
            )
            return await self._after_failed_amend(pair, slot, working, level)
        return await self._adopt_stop(pair, slot, amended, level)

    async def _after_failed_amend(
        self, pair: str, slot: _Protection, working: Order, level: Decimal
    ) -> Order | None:
        """Read the stop's trigger back by client id after an amend failed or went unanswered."""
        cid = working.client_order_id
        try:
            found = await self._gateway.fetch_order(pair, client_order_id=cid)
        except BotError as e:
            log.warning("order_lookup_failed", **{**e.describe(), "client_order_id": cid})
            # One stop works at the old or the new level; the position keeps the one the
            # exchange last showed, and the next move amends again (harmless either way).
            slot.level_unsure = True
            return working
        if found is None:
            self._move(pair, slot, "done")  # the exchange has no such order any more
            return None
        # Still working: at the new level (the refusal was "unchanged", or the lost amend
        # took), or at the old one, which it keeps (a refused trigger, one through the
        # market, would be refused to a new stop too: never trade the stop for none).
        return await self._adopt_stop(pair, slot, found, level)

    async def _adopt_stop(
        self, pair: str, slot: _Protection, order: Order, wanted: Decimal
    ) -> Order | None:
        """Record the stop as the exchange reports it; None when it no longer works."""
        slot.level_unsure = False
        self._track(order)
        if self._store is not None:
            await self._off(self._store.adopt_order, order)  # the journal keeps the level
        if self.orders[order.client_order_id].status.is_terminal:
            self._move(pair, slot, "done")  # it fired (or was cancelled) before the amend
            return None
        level = order.stop_price
        if level is None:
            return order
        self.portfolio.set_protection(pair, stop=level)
        if level == wanted:
            if logs_at(logging.INFO):  # a trailing stop moves on most candles
                log.info(
                    "stop_moved", pair=pair, stop=str(level), client_order_id=order.client_order_id
                )
        else:  # the amend did not take (refused, or lost): the next move tries again
            log.warning(
                "stop_not_moved", pair=pair, stop=str(level), client_order_id=order.client_order_id
            )
        return order
