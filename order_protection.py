"""Protection: at most one stop per position that works or may work, whatever the answers.

Part of `trade_executor` (which re-exports it). Every protective order of a pair is placed,
moved and taken off under that pair's lock, through the stop state machine of
`executor_core.StopState`: the stop is the position's stop before its request leaves, a
trailing move waits for an unanswered placement, a lost answer is resolved by client id
before anything else is sent, and a clean stop cancels entries only. The stop is sized
to what is held: placed at an entry's first piece, resized (cancel, then place) as more
pieces land; a trailing move amends it in place (`order_amend`). A fill never waits for
its pair's lock: when the pair is held, its holder does the protection the fill asked for
before letting go.
"""

from __future__ import annotations

import contextlib
import logging
from decimal import Decimal

import structlog

from error_handler import (
    BotError,
    BusinessError,
    InvariantError,
    OrderNotFoundError,
    OrderRejected,
    RecoverableError,
)
from executor_core import (
    _STOP_TRANSITIONS,
    ExecutorCore,
    StopState,
    _Protection,
    protective_id,
)
from models import (
    ClosedTrade,
    Fill,
    MarketType,
    Order,
    OrderIntent,
    OrderPurpose,
    OrderStatus,
    OrderType,
    Side,
    StopHit,
    TradeClosed,
    TradeOpened,
    purpose_of,
    with_attempt,
)
from utils.precision import validate_intent
from utils.utilities import logs_at


log = structlog.get_logger("trade_executor")


class _Hold:
    """A pair held (`ProtectingExecutor._holding`): its lock, then the protection due.

    Entering takes the pair's lock and gives its slot; leaving does, still holding it,
    the protection fills asked for meanwhile, then lets go, whatever the block raised.
    A plain class: the order path enters one per fill and per stop move.
    """

    __slots__ = ("_executor", "_pair", "_slot", "keep_pending")

    def __init__(
        self, executor: ProtectingExecutor, pair: str, slot: _Protection, keep_pending: bool
    ) -> None:
        self._executor = executor
        self._pair = pair
        self._slot = slot
        self.keep_pending = keep_pending

    async def __aenter__(self) -> _Protection:
        slot = self._slot
        await slot.lock.acquire()
        if slot.pending is not None and not self.keep_pending:
            try:  # whatever holds the pair sees the stop placed
                await self._executor._place_pending(self._pair, slot)
            except BaseException:
                slot.lock.release()
                raise
        return slot

    async def __aexit__(self, *exc_info: object) -> None:
        slot = self._slot
        try:
            if slot.due is not None or slot.clear_due:
                await self._executor._after_hold(self._pair, slot)
        finally:
            slot.lock.release()


class ProtectingExecutor(ExecutorCore):
    """Apply fills and keep each position's protective orders (see the module docstring)."""

    async def on_fill(self, order: Order, fill: Fill) -> ClosedTrade | None:
        """Apply a fill (once, whichever source reports it first) and manage protection."""
        if self._store is not None:
            if not await self._off(self._store.record_fill, fill):
                return None
        elif fill.fill_id in self._fill_ids:
            return None
        else:
            self._fill_ids.add(fill.fill_id)
        self._track(order)
        if self._store is not None:
            await self._off(self._store.update_order, self.orders.get(order.client_order_id, order))
        intent = self._intents.get(fill.client_order_id)
        reason = intent.reason if intent else order.reason
        trade = self.portfolio.apply_fill(fill, reason=reason)
        self._note_applied(fill)
        market = self._market_for(fill.pair)
        if self.orders.get(order.client_order_id, order).status.is_terminal:
            # Not between two pieces of one order: a first piece below the minimum is the
            # start of a position, and a piece of an exit leaves a rest that still sells.
            self.portfolio.drop_dust(fill.pair, max(market.min_qty, market.lot_size))
        if self._audit.wanted():
            self._audit.record(
                "fill",
                fill.ts,
                pair=fill.pair,
                side=str(fill.side),
                price=str(fill.price),
                qty=str(fill.qty),
                fee=str(fill.fee),
                client_order_id=fill.client_order_id,
                liquidity=str(fill.liquidity),
            )
        if trade is not None:
            self._notify(TradeClosed(trade))
        elif intent is not None and not intent.reduce_only:
            self._notify(TradeOpened(fill))
        await self._manage_protection(order, fill, intent)
        return trade

    async def _manage_protection(
        self, order: Order, fill: Fill, intent: OrderIntent | None
    ) -> None:
        pair = fill.pair
        if self.portfolio.signed_qty(pair) == 0:
            slot = self._protection.get(pair)
            if slot is not None and (slot.base is not None or slot.stop is not None or slot.others):
                if slot.lock.locked():
                    slot.clear_due = True
                else:
                    async with self._holding(pair):
                        await self._clear_if_flat(pair, slot)
            if intent is not None and intent.type is OrderType.STOP_MARKET:
                self._notify(StopHit(pair, fill.price))
            return
        if intent is None or purpose_of(intent) is not OrderPurpose.ENTRY:
            return
        slot = self._slot(pair)
        if slot.lock.locked():
            # The holder may be an order waiting for this order's later pieces, which this
            # stream brings: never block it; the holder protects before letting go.
            slot.due = (intent, fill.price)
            return
        async with self._holding(pair):
            await self._follow_entry(intent, fill.price)

    def _holding(self, pair: str, *, keep_pending: bool = False) -> _Hold:
        """Hold `pair` (its lock); before letting go, do the protection fills asked for.

        Entering places the pair's pending stop first, unless `keep_pending` (an order's
        submit: an exit takes it off unplaced, `_clear_protection`).
        """
        return _Hold(self, pair, self._slot(pair), keep_pending)

    async def flush_stops(self) -> None:
        """Place the entry stops deferred by `defer_stops`, in the order their fills came.

        While `defer_stops` is set (a paper venue delivering a candle's fills, which the
        candle's decision follows at once), an entry's fill sets its position's stop level
        but leaves the order to this call, made when the candle (or a burst's orders) is
        done. An exit decided on the same candle takes the position's protection off before
        it is sent: the stop it would place and cancel at the same instant is never sent.
        Anything else that holds the pair (a stop move, a later piece, a reconciliation)
        places it first. The position is protected from the candle's end either way.
        """
        while self.pending_stops:
            pair = next(iter(self.pending_stops))
            async with self._holding(pair):  # entering places it
                pass
            self.pending_stops.pop(pair, None)

    async def _place_pending(self, pair: str, slot: _Protection) -> None:
        # Under the pair's lock: place the stop its entry's fill left pending.
        assert slot.pending is not None
        level, price = slot.pending
        self._forget_pending(pair, slot)
        held = self.portfolio.has_position(pair)
        if held and slot.state is StopState.NONE and slot.base is not None:
            await self._place_stop(pair, slot, level, seq=0, price=price)

    def _forget_pending(self, pair: str, slot: _Protection) -> None:
        slot.pending = None
        self.pending_stops.pop(pair, None)

    async def _after_hold(self, pair: str, slot: _Protection) -> None:
        """Do the protection fills asked for while `pair` was held (still holding it)."""
        while slot.due is not None or slot.clear_due:
            due, slot.due = slot.due, None
            clear, slot.clear_due = slot.clear_due, False
            try:
                if clear:
                    await self._clear_if_flat(pair, slot)
                if due is not None:
                    await self._follow_entry(*due)
            except BotError as e:
                log.error("protection_after_hold_failed", **{**e.describe(), "pair": pair})

    async def _clear_if_flat(self, pair: str, slot: _Protection) -> None:
        if self.portfolio.signed_qty(pair) == 0:
            await self._clear_protection(pair, slot)
            slot.base = None

    async def _follow_entry(self, entry: OrderIntent, price: Decimal | None) -> None:
        """Protect the position `entry` opened (`PieceExecutor` follows later pieces too)."""
        if self._slot(entry.pair).base != entry.client_order_id:
            await self._protect(entry, price)

    # -- Protection (always under the pair's lock) -------------------------------------------

    def _move(self, pair: str, slot: _Protection, event: str) -> None:
        new = _STOP_TRANSITIONS.get((slot.state, event))
        if new is None:
            raise InvariantError(
                f"illegal stop transition {slot.state} on {event}",
                component="executor",
                pair=pair,
                order_id=slot.stop,
            )
        if new is not slot.state and logs_at(logging.INFO):
            log.info(
                "state_changed",
                machine="protection",
                pair=pair,
                client_order_id=slot.stop,
                **{"from": str(slot.state), "to": str(new)},
            )
        slot.state = new
        if new is StopState.NONE:
            slot.stop, slot.level_unsure = None, False

    def _settle(self, pair: str, slot: _Protection) -> None:
        # An update seen on the stream (a fill, a cancel) may have ended the stop already.
        order = self.orders.get(slot.stop) if slot.stop is not None else None
        if order is not None and order.status.is_terminal and slot.state is not StopState.NONE:
            self._move(pair, slot, "done")

    async def _protect(self, entry: OrderIntent, price: Decimal | None) -> None:
        """Place the stop (and, on linear, the take-profit) of the position `entry` opened."""
        pair = entry.pair
        slot = self._slot(pair)
        if (
            not self.protective_orders
            or not self.portfolio.has_position(pair)
            or slot.base == entry.client_order_id
            or (entry.stop_loss is None and entry.take_profit is None)
        ):
            return
        if not await self._clear_protection(pair, slot):
            log.error("protection_blocked", pair=pair, client_order_id=slot.stop)
            return
        slot.base = entry.client_order_id
        self.portfolio.set_protection(pair, stop=entry.stop_loss, take_profit=entry.take_profit)
        take_profit_order = (
            entry.take_profit is not None and self._market_for(pair).type is not MarketType.SPOT
        )
        if entry.stop_loss is not None:
            if self.defer_stops and not take_profit_order:
                slot.pending = (entry.stop_loss, price)  # placed by `flush_stops`
                self.pending_stops[pair] = None
                return
            await self._place_stop(pair, slot, entry.stop_loss, seq=0, price=price)
        if take_profit_order:
            assert entry.take_profit is not None
            # Spot has no reduce-only: a resting take-profit sell would lock the same coins
            # as the stop, and Bybit refuses the second order. There the take-profit is
            # managed by the engine (`managed_take_profit`) and exits at market.
            intent = self._protective_intent(
                pair,
                OrderType.LIMIT,
                entry.take_profit,
                protective_id(entry.client_order_id, "tp", 0),
            )
            placed = await self._send_protective(intent, price)
            if placed is None or placed.status is not OrderStatus.REJECTED:
                # Tracked even when its answer was lost: it is cancelled by id with the stop.
                slot.others.append(
                    intent.client_order_id if placed is None else placed.client_order_id
                )

    def _protective_intent(
        self, pair: str, kind: OrderType, level: Decimal, key: str
    ) -> OrderIntent:
        held = self.portfolio.signed_qty(pair)
        assert self.portfolio.has_position(pair)
        long = held > 0
        now = self._clock.now_ms()
        stop = kind is OrderType.STOP_MARKET
        return OrderIntent(
            pair=pair,
            side=Side.SELL if long else Side.BUY,
            qty=abs(held),
            type=kind,
            client_order_id=with_attempt(key, 0),
            reason=f"{'stop-loss' if stop else 'take-profit'} for {self._slot(pair).base}",
            stop_price=level if stop else None,
            price=None if stop else level,
            reduce_only=True,
            ts=now,
        )

    async def _send_protective(self, intent: OrderIntent, price: Decimal | None) -> Order | None:
        """Send a stop or take-profit; None when its answer was lost."""
        now = self._clock.now_ms()
        try:
            checked = validate_intent(intent, self._market_for(intent.pair), last_price=price)
        except OrderRejected as e:
            return self._reject_locally(intent, e.message, now)
        attempt = await self._next_attempt(checked)
        if isinstance(attempt, Order):
            return attempt
        self._intents[attempt.client_order_id] = attempt
        try:
            return await self._send(attempt, now)
        except RecoverableError:
            return None

    async def _place_stop(
        self,
        pair: str,
        slot: _Protection,
        level: Decimal,
        *,
        seq: int,
        price: Decimal | None,
        kind: str = "sl",
    ) -> Order | None:
        assert slot.base is not None
        assert slot.state is StopState.NONE
        if slot.pending is not None:
            self._forget_pending(pair, slot)  # this stop is the position's one
        intent = self._protective_intent(
            pair, OrderType.STOP_MARKET, level, protective_id(slot.base, kind, seq)
        )
        # Recorded as the position's stop before the request leaves: whatever happens to
        # the answer, nothing else is placed until this one is settled.
        slot.stop, slot.since_ms = intent.client_order_id, self._clock.now_ms()
        slot.placing = True
        self._move(pair, slot, "place")
        placed = await self._send_protective(intent, price)
        if placed is None:
            cid = slot.stop
            self._move(pair, slot, "lost")
            log.warning("stop_outcome_unknown", pair=pair, client_order_id=cid)
            return None
        if placed.client_order_id != slot.stop:
            slot.stop = placed.client_order_id  # a later attempt, or one placed before
        if placed.status is OrderStatus.REJECTED or placed.status.is_terminal:
            self._move(pair, slot, "refused" if placed.status is OrderStatus.REJECTED else "done")
            return placed
        self._move(pair, slot, "placed")
        self.portfolio.set_protection(pair, stop=level)
        return placed

    async def _clear_protection(self, pair: str, slot: _Protection) -> bool:
        """Take every protective order of `pair` off; False if a stop may still be working."""
        if slot.pending is not None:
            self._forget_pending(pair, slot)  # never placed: nothing to take off
        for cid in slot.others:
            order = self.orders.get(cid)
            if order is not None and not order.status.is_terminal:
                with contextlib.suppress(BotError):
                    self._track(await self._gateway.cancel_order(pair, client_order_id=cid))
        slot.others = [c for c in slot.others if not self._is_done(c)]
        return await self._clear_stop(pair, slot)

    def _is_done(self, cid: str) -> bool:
        order = self.orders.get(cid)
        return order is None or order.status.is_terminal

    async def _clear_stop(self, pair: str, slot: _Protection, tries: int = 3) -> bool:
        """Leave `pair` with no stop that works or may work; False if that cannot be known."""
        self._settle(pair, slot)
        if tries <= 0:
            return False
        if slot.state in (StopState.UNKNOWN, StopState.PLACING):
            settled = await self._resolve_stop(pair, slot)
            if settled is not None:
                return settled
        if slot.state is StopState.WORKING:
            return await self._cancel_stop(pair, slot, tries)
        return slot.state is StopState.NONE

    async def _resolve_stop(self, pair: str, slot: _Protection) -> bool | None:
        """Look an unanswered stop up by id: True gone, False unknown, None: it works."""
        assert slot.stop is not None
        found = await self._look_up(pair, slot.stop, slot.since_ms, placement=slot.placing)
        if found is None:
            self._move(pair, slot, "lost")
            return False
        placing = slot.state is StopState.PLACING
        if found is False or (isinstance(found, Order) and found.status.is_terminal):
            if placing:
                self._move(pair, slot, "lost")
            self._move(pair, slot, "done")
            return True
        self._move(pair, slot, "placed" if placing else "found")
        return None

    async def _cancel_stop(self, pair: str, slot: _Protection, tries: int) -> bool:
        """Cancel the working stop; settle by id when the cancel's answer is unclear."""
        assert slot.stop is not None
        cid = slot.stop
        self._move(pair, slot, "cancel")
        slot.since_ms, slot.placing = self._clock.now_ms(), False
        try:
            self._track(await self._gateway.cancel_order(pair, client_order_id=cid))
        except OrderNotFoundError:
            pass  # gone already: filled or cancelled, which the lookup below tells
        except BotError as e:
            log.warning(
                "stop_cancel_failed", **{**e.describe(), "pair": pair, "client_order_id": cid}
            )
            self._move(pair, slot, "lost")
            if isinstance(e, BusinessError) or self._is_done(cid):
                # Refused, or the order stream has told us it is gone meanwhile.
                return await self._clear_stop(pair, slot, tries - 1)
            return False
        if not self._is_done(cid):
            self._move(pair, slot, "lost")
            return await self._clear_stop(pair, slot, tries - 1)
        self._move(pair, slot, "done")
        return True

    async def _restore_stop(self, pair: str, why: str | None) -> None:
        position = self.portfolio.position(pair)
        slot = self._slot(pair)
        if position is None or position.stop_price is None or slot.base is None:
            return
        log.warning("exit_refused_restoring_stop", pair=pair, reason=why)
        if await self._clear_stop(pair, slot):
            await self._place_stop(
                pair, slot, position.stop_price, seq=self._clock.now_ms(), price=position.mark_price
            )

    def protective_stop(self, pair: str) -> tuple[StopState, str | None]:
        """Return the state and client id of `pair`'s protective stop."""
        slot = self._protection.get(pair)
        return (StopState.NONE, None) if slot is None else (slot.state, slot.stop)

    def managed_take_profit(self, pair: str) -> Decimal | None:
        """Return the take-profit the engine must watch itself (none on the exchange)."""
        position = self.portfolio.position(pair)
        if position is None or position.take_profit is None:
            return None
        slot = self._protection.get(pair)
        if slot is not None and any(not self._is_done(cid) for cid in slot.others):
            return None  # a real take-profit order is working
        return position.take_profit

    async def cancel_entries(self) -> int:
        """Cancel every working entry order; protection stays (a stopped bot keeps its stops).

        Entries are told apart by the journal's record of each order, never by the
        exchange's reduce-only flag, which Bybit spot does not report.
        """
        count = 0
        for order in await self._gateway.fetch_open_orders():
            if await self.purpose(order.client_order_id) is not OrderPurpose.ENTRY:
                continue
            async with self._holding(order.pair):
                try:
                    cancelled = await self._gateway.cancel_order(
                        order.pair, client_order_id=order.client_order_id
                    )
                except BotError as e:
                    log.warning(
                        "cancel_failed", client_order_id=order.client_order_id, **e.describe()
                    )
                    continue
                self._track(cancelled)
                count += 1
        return count
