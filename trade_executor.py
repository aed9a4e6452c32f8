"""Order execution, the same in every mode: validate, journal, send, track, account.

`TradeExecutor.submit(intent)` rounds and checks the intent against the market's rules and
the balance, journals it under its client order id *before* sending (when a store is
attached), and sends it through an `OrderGateway` — the live `exchange.Exchange` or the
`trade_simulator.SimulatedExchange`; the executor cannot tell which. Order updates and
fills arrive from REST answers and private streams in any order; the state machine in
`models.ORDER_TRANSITIONS` and fill ids make them idempotent.

Orders fill in pieces (`PartiallyFilled`, the rest perhaps cancelled): each execution is
applied once, whichever source brings it and in whatever order, and an order's filled
quantity is the larger of the exchange's report and the pieces applied. The first piece
of an entry places its stop and later pieces resize it (still one stop); an exit on an
entry that is still filling cancels the entry's rest first. A trailing move amends the
working stop's trigger in place (`order_amend`): the same order, one request.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from decimal import Decimal

import structlog

from error_handler import BotError, OrderNotFoundError, OrderRejected
from executor_core import (
    ExecutorCore,
    OrderGateway,
    OrderJournal,
    StopState,
    protective_id,
)
from models import (
    Order,
    OrderIntent,
    OrderPurpose,
    OrderStatus,
    evolve,
    order_from_intent,
    purpose_of,
)
from order_amend import AmendingExecutor
from order_pieces import PieceExecutor
from order_protection import ProtectingExecutor
from order_recovery import RecoveringExecutor
from utils.precision import validate_intent


log = structlog.get_logger("trade_executor")


__all__ = [
    "AmendingExecutor",
    "ExecutorCore",
    "OrderGateway",
    "OrderJournal",
    "PieceExecutor",
    "ProtectingExecutor",
    "RecoveringExecutor",
    "StopState",
    "TradeExecutor",
    "order_from_intent",
    "protective_id",
]


class TradeExecutor(RecoveringExecutor):
    """Validate, journal and send orders; apply fills to the portfolio.

    Every order of a pair is sent under that pair's lock, so a trailing stop, an exit, the
    protection placed after an entry fills and an operator's exit never interleave: a
    position has at most one protective stop that works or may work (`StopState`), and an
    order whose answer was lost is resolved by its client id before the pair sends again.
    """

    # -- Submit ------------------------------------------------------------------------------

    async def submit(self, intent: OrderIntent, *, last_price: Decimal | None = None) -> Order:
        """Validate and send one order; a refusal comes back as a REJECTED order with why."""
        if intent.pair in self._deferred_moves:  # the pair's stop moves first, as it asked
            await self.flush_stop_moves(intent.pair)
        # A stop pending on the pair stays so: an exit takes it off unplaced, and the end
        # of the candle places it otherwise (`flush_stops`).
        async with self._holding(intent.pair, keep_pending=True):
            return await self._submit(intent, last_price)

    async def deliver_fills(self, pair: str) -> None:
        """Let the gateway deliver the fills it already has for `pair` (after a submit)."""
        await self._gateway.deliver_fills(pair)

    async def _not_now(self, intent: OrderIntent) -> str | None:
        """Return why the pair cannot take this order now (None: it can)."""
        if not await self._resolve_unknown(intent.pair):
            return "an earlier order's outcome is still unknown"
        if not await self._fills_applied(intent.pair):
            return "an earlier order's fill is not applied yet"
        return self._entry_refusal(intent)

    def _entry_refusal(self, intent: OrderIntent) -> str | None:
        if purpose_of(intent) is OrderPurpose.ENTRY and self.portfolio.has_position(intent.pair):
            # Decided on a position that was flat a moment ago (its fill has just landed).
            return "a position is open on this pair"
        return None

    async def _submit(self, intent: OrderIntent, last_price: Decimal | None) -> Order:
        now = self._clock.now_ms()
        # The executor places stop-loss and take-profit as separate reduce-only orders once
        # the entry fills (the same on spot, where Bybit refuses them attached to market
        # orders, and on linear), so they are not sent attached to the entry.
        protection, protected = (intent.stop_loss, intent.take_profit), intent
        # `is None`, not `== (None, None)`: a Decimal compared with None asks the numbers
        # ABCs first (~0.2 us each, twice an order).
        unprotected = protection[0] is None and protection[1] is None
        if not unprotected:
            intent = evolve(intent, stop_loss=None, take_profit=None)
        # The common case (nothing pending on the pair) costs no await.
        pending = intent.pair in self._unresolved or bool(self._unapplied.get(intent.pair))
        refusal = await self._not_now(intent) if pending else self._entry_refusal(intent)
        if refusal is not None:
            return self._reject_locally(intent, refusal, now)
        if purpose_of(intent) is OrderPurpose.EXIT and self.working_entries(intent.pair):
            intent = await self._stop_filling(intent)
        try:
            market = self._market_for(intent.pair)
            checked = validate_intent(intent, market, last_price=last_price)
            cost = self._check_balance(checked, last_price)
        except OrderRejected as e:
            return self._reject_locally(intent, e.message, now)
        if cost is None:
            return await self._submit_checked(intent, checked, protected, now)
        # Spoken for until its answer: the buys sent beside it check against the rest.
        token = object()
        self.committed[token] = cost
        try:
            return await self._submit_checked(intent, checked, protected, now)
        finally:
            del self.committed[token]

    async def _submit_checked(
        self, intent: OrderIntent, checked: OrderIntent, protected: OrderIntent, now: int
    ) -> Order:
        # `intent` without its protection, `checked` as validated, `protected` as decided.
        protection = (protected.stop_loss, protected.take_profit)
        unprotected = protection[0] is None and protection[1] is None
        attempt = checked if self._store is None else await self._next_attempt(checked)
        if isinstance(attempt, Order):
            return attempt  # this decision was sent before: never twice
        checked = attempt
        self._intents[checked.client_order_id] = (
            checked
            if unprotected
            else protected  # nothing was rounded or renamed: the intent as decided
            if checked is intent
            else evolve(checked, stop_loss=protection[0], take_profit=protection[1])
        )
        if purpose_of(checked) is OrderPurpose.EXIT:
            # Take the resting stop off before a market exit: on spot it holds the coins
            # the exit must sell (Bybit refuses the exit), and on any market an exit plus a
            # stop firing at once could close twice. Re-placed if the exit is refused.
            slot = self._slot(checked.pair)
            if not await self._clear_protection(checked.pair, slot):
                return self._reject_locally(
                    checked, "the protective stop's state is unknown; exit deferred", now
                )
            order = await self._send(checked, now)
            if order.status is OrderStatus.REJECTED:
                await self._restore_stop(checked.pair, order.reason)
            return order
        return await self._send_opening(checked, now)

    async def _send_opening(self, checked: OrderIntent, now: int) -> Order:
        """Send an order that is not an exit; an entry's pieces get the stop they need."""
        entry = purpose_of(checked) is OrderPurpose.ENTRY
        order = await self._send(checked, now)
        if entry and order.filled_qty > 0:
            # The answer can come after the fill from the stream: protect from here too
            # (whichever comes first; the slot tells the other that it is done).
            await self._follow_entry(self._intents[checked.client_order_id], order.avg_fill_price)
        return order

    async def _stop_filling(self, intent: OrderIntent) -> OrderIntent:
        """Cancel the rest of the pair's entries before an exit; return the exit resized.

        A partly filled entry left working would buy again after the exit sold (a new
        position nobody decided). Pieces that fill before the cancel lands are applied
        first, and an exit sized to close the position grows to close them too.
        """
        pair = intent.pair
        held = abs(self.portfolio.signed_qty(pair))
        for entry in self.working_entries(pair):
            try:
                self._track(
                    await self._gateway.cancel_order(pair, client_order_id=entry.client_order_id)
                )
            except OrderNotFoundError:  # done already: learn how
                with contextlib.suppress(BotError):
                    found = await self._gateway.fetch_order(
                        pair, client_order_id=entry.client_order_id
                    )
                    if found is not None:
                        self._track(found)
            except BotError as e:
                # Closing what is held matters more than the rest: exit anyway.
                log.error("entry_cancel_failed", **{**e.describe(), "pair": pair})
                continue
            log.info("entry_rest_cancelled", pair=pair, client_order_id=entry.client_order_id)
        await self._fills_applied(pair)
        now_held = abs(self.portfolio.signed_qty(pair))
        if intent.qty >= held and now_held > held:
            return replace(intent, qty=now_held)
        return intent
