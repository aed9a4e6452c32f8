"""Order execution, the same in every mode: validate, journal, send, track, account.

`TradeExecutor.submit(intent)` rounds and checks the intent against the market's rules and
the balance, journals it under its client order id *before* sending (when a store is
attached), and sends it through an `OrderGateway` — the live `exchange.Exchange` or the
`trade_simulator.SimulatedExchange`; the executor cannot tell which. Order updates and
fills arrive from REST answers and private streams in any order; the state machine in
`models.ORDER_TRANSITIONS` and fill ids make them idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any, Final, Protocol, TypeVar

import structlog

from error_handler import (
    BotError,
    BusinessError,
    InvariantError,
    OrderNotFoundError,
    OrderRejected,
    RecoverableError,
)
from models import (
    ATTEMPT_SEPARATOR,
    CLIENT_ID_MAX,
    ClosedTrade,
    Fill,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderPurpose,
    OrderStatus,
    OrderType,
    PositionSide,
    Side,
    decision_key,
    is_legal_transition,
    purpose_of,
    split_attempt,
    with_attempt,
)
from portfolio import Portfolio
from utils.precision import validate_intent
from utils.utilities import AuditTrail, Clock, SerialWorker


log = structlog.get_logger(__name__)
ZERO = Decimal(0)
T = TypeVar("T")


class OrderGateway(Protocol):
    """Where orders go: the live exchange or the simulated one."""

    async def create_order(self, intent: OrderIntent) -> Order:
        """Send an order and return the exchange's view of it."""
        ...

    async def cancel_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order:
        """Cancel an order."""
        ...

    async def fetch_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order | None:
        """Look an order up."""
        ...

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """Return working orders."""
        ...


class OrderJournal(Protocol):
    """The durable trade store, as the executor uses it."""

    def journal(self, intent: OrderIntent, ts: int) -> None:
        """Persist an order before it is sent."""
        ...

    def mark_sent(self, client_order_id: str) -> None:
        """Record that the send was attempted."""
        ...

    def acknowledge(self, order: Order) -> bool:
        """Record the exchange's acknowledgement; return False for a stale report."""
        ...

    def mark_never_sent(self, client_order_id: str, reason: str) -> None:
        """Record that the order never reached the exchange."""
        ...

    def update_order(self, order: Order) -> bool:
        """Persist an order update; return False for a stale report."""
        ...

    def record_fill(self, fill: Fill) -> bool:
        """Persist a fill; return False if it was already recorded."""
        ...

    def has_fill(self, fill_id: str) -> bool:
        """Return True if the execution is recorded."""
        ...

    def attempts(self, key: str) -> list[tuple[Order, bool]]:
        """Return every journaled attempt of decision `key`, each with "never sent"."""
        ...

    def adopt_order(self, order: Order) -> bool:
        """Record an order found on the exchange by its client id."""
        ...

    def get_intent(self, client_order_id: str) -> OrderIntent | None:
        """Return the intent journaled under `client_order_id`."""
        ...


Notifier = Callable[[str, dict[str, Any]], None]


class StopState(StrEnum):
    """Where a position's protective stop stands between us and the exchange."""

    NONE = "none"  # no stop works, nor can one
    PLACING = "placing"  # the create request left; no answer yet
    WORKING = "working"  # the exchange holds it
    CANCELLING = "cancelling"  # the cancel request left; no answer yet
    UNKNOWN = "unknown"  # an answer was lost: resolved by client id before anything else


# (state, event) -> state. Any other move is a bug (InvariantError), as for orders.
_STOP_TRANSITIONS: Final[dict[tuple[StopState, str], StopState]] = {
    (StopState.NONE, "place"): StopState.PLACING,
    (StopState.PLACING, "placed"): StopState.WORKING,
    (StopState.PLACING, "refused"): StopState.NONE,
    (StopState.PLACING, "lost"): StopState.UNKNOWN,
    (StopState.PLACING, "done"): StopState.NONE,
    (StopState.WORKING, "cancel"): StopState.CANCELLING,
    (StopState.WORKING, "done"): StopState.NONE,
    (StopState.CANCELLING, "done"): StopState.NONE,
    (StopState.CANCELLING, "lost"): StopState.UNKNOWN,
    (StopState.UNKNOWN, "found"): StopState.WORKING,
    (StopState.UNKNOWN, "done"): StopState.NONE,
    (StopState.UNKNOWN, "lost"): StopState.UNKNOWN,
}


@dataclass(slots=True)
class _Protection:
    """One position's protective orders: at most one stop that works or may work."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    base: str | None = None  # the entry the protection belongs to (ids trace back to it)
    stop: str | None = None  # the stop that works or may work (its client id)
    state: StopState = StopState.NONE
    since_ms: int = 0  # when the unanswered request left
    placing: bool = False  # that request was a placement (else a cancel)
    others: list[str] = field(default_factory=list)  # take-profit orders (linear)


class TradeExecutor:
    """Validate, journal and send orders; apply fills to the portfolio.

    Every order of a pair is sent under that pair's lock, so a trailing stop, an exit, the
    protection placed after an entry fills and an operator's exit never interleave: a
    position has at most one protective stop that works or may work (`StopState`), and an
    order whose answer was lost is resolved by its client id before the pair sends again.
    """

    def __init__(
        self,
        gateway: OrderGateway,
        portfolio: Portfolio,
        *,
        market_for: Callable[[str], Market],
        clock: Clock,
        audit: AuditTrail,
        store: OrderJournal | None = None,
        notify: Notifier | None = None,
        taker_fee: Decimal = Decimal("0.001"),
        protective_orders: bool = True,
        unknown_after_ms: int = 10_000,
    ) -> None:
        self._gateway = gateway
        self.portfolio = portfolio
        self._market_for = market_for
        self._clock = clock
        self._audit = audit
        self._store = store
        # Journal I/O (fsync'd commits) runs on its own thread, in order, never on the loop.
        self._io = SerialWorker("journal") if store is not None else None
        self._notify = notify or (lambda kind, data: None)
        self.taker_fee = taker_fee
        self.protective_orders = protective_orders
        # An order not on the exchange this long after its request left never will be:
        # Bybit refuses a request older than its recv_window (plus the clock skew margin).
        self.unknown_after_ms = unknown_after_ms
        self.orders: dict[str, Order] = {}
        self._intents: dict[str, OrderIntent] = {}
        self._protection: dict[str, _Protection] = {}
        # pair -> (client id, sent at) of an entry or exit whose answer was lost.
        self._unresolved: dict[str, tuple[str, int]] = {}
        self.rejections = 0
        self.latencies_ms: list[float] = []

    def _slot(self, pair: str) -> _Protection:
        slot = self._protection.get(pair)
        if slot is None:
            slot = self._protection[pair] = _Protection()
        return slot

    # -- Submit ------------------------------------------------------------------------------

    async def submit(self, intent: OrderIntent, *, last_price: Decimal | None = None) -> Order:
        """Validate and send one order; a refusal comes back as a REJECTED order with why."""
        async with self._slot(intent.pair).lock:
            return await self._submit(intent, last_price)

    async def _submit(self, intent: OrderIntent, last_price: Decimal | None) -> Order:
        now = self._clock.now_ms()
        # The executor places stop-loss and take-profit as separate reduce-only orders once
        # the entry fills (the same on spot, where Bybit refuses them attached to market
        # orders, and on linear), so they are not sent attached to the entry.
        protection = (intent.stop_loss, intent.take_profit)
        if protection != (None, None):
            intent = replace(intent, stop_loss=None, take_profit=None)
        if not await self._resolve_unknown(intent.pair):
            return self._reject_locally(intent, "an earlier order's outcome is still unknown", now)
        try:
            market = self._market_for(intent.pair)
            checked = validate_intent(intent, market, last_price=last_price)
            self._check_balance(checked, last_price)
        except OrderRejected as e:
            return self._reject_locally(intent, e.message, now)
        attempt = await self._next_attempt(checked)
        if isinstance(attempt, Order):
            return attempt  # this decision was sent before: never twice
        checked = attempt
        self._intents[checked.client_order_id] = (
            checked
            if protection == (None, None)
            else replace(checked, stop_loss=protection[0], take_profit=protection[1])
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
        order = await self._send(checked, now)
        if purpose_of(checked) is OrderPurpose.ENTRY and order.status is OrderStatus.FILLED:
            # The answer can come after the fill from the stream: protect from here too
            # (whichever comes first; the slot tells the other that it is done).
            await self._protect(self._intents[checked.client_order_id], order.avg_fill_price)
        return order

    async def _off(self, func: Callable[..., T], /, *args: Any) -> T:
        """Run a journal call off the event loop (inline without a journal thread)."""
        if self._io is None:
            return func(*args)
        return await self._io.call(func, *args)

    async def close(self) -> None:
        """Stop the journal thread once its queued writes are done."""
        if self._io is not None:
            await asyncio.to_thread(self._io.close)

    async def _next_attempt(self, intent: OrderIntent) -> OrderIntent | Order:
        """Return the intent under its next attempt's id, or the order already sent for it.

        The journal holds every attempt of a decision under `<key>_<attempt>`. For an entry
        or exit, an attempt that may have reached the exchange ends the decision (a
        restarted bot re-deciding it adopts that order). For a stop or take-profit, only
        one that may still work does: a cancelled stop of the same name may be replaced.
        """
        parsed = split_attempt(intent.client_order_id)
        if self._store is None or parsed is None:
            return intent
        key, _ = parsed
        attempts = await self._off(self._store.attempts, key)
        protective = purpose_of(intent) in (OrderPurpose.STOP, OrderPurpose.TAKE_PROFIT)
        for order, never_sent in attempts:
            if never_sent or (protective and order.status.is_terminal):
                continue
            log.warning(
                "decision_already_sent", pair=intent.pair, client_order_id=order.client_order_id
            )
            self.orders.setdefault(order.client_order_id, order)
            return self.orders[order.client_order_id]
        if not attempts:
            return intent
        return replace(intent, client_order_id=with_attempt(key, len(attempts)))

    async def _send(self, checked: OrderIntent, now: int) -> Order:
        """Journal, send and track a validated order (under the pair's lock)."""
        cid = checked.client_order_id
        if checked.reduce_only:
            checked = await self._within_holdings(checked)
            if checked.qty <= 0:
                return self._reject_locally(checked, "nothing held on the exchange to sell", now)
        if self._store is not None:
            # The journal keeps the levels the entry's protection is placed at (sent apart).
            record = self._intents.get(cid)
            levels = (None, None) if record is None else (record.stop_loss, record.take_profit)
            journaled = replace(checked, stop_loss=levels[0], take_profit=levels[1])
            await self._off(self._store.journal, journaled, now)
        self._audit.record("order_submitted", now, intent=_intent_fields(checked))
        # Known before the answer: a fill on the stream can beat the REST reply.
        self.orders[cid] = order_from_intent(checked, OrderStatus.NEW, now)
        try:
            if self._store is not None:
                await self._off(self._store.mark_sent, cid)
            order = await self._gateway.create_order(checked)
        except OrderRejected as e:
            if self._store is not None:
                await self._off(self._store.mark_never_sent, cid, e.message)
            return self._reject_locally(checked, e.message, now)
        except BotError as e:
            log.error("order_send_failed", **{**e.describe(), "client_order_id": cid})
            self._notify("error", {"pair": checked.pair, "message": f"order failed: {e.message}"})
            if isinstance(e, RecoverableError) and not _is_protective(cid):
                self._unresolved[checked.pair] = (cid, now)
            raise
        if self._store is not None:
            await self._off(self._store.acknowledge, order)
        self._track(order)
        if order.status is OrderStatus.REJECTED:
            self.rejections += 1
            self._notify("rejected", {"pair": order.pair, "reason": order.reason})
        log.info(
            "order_sent",
            pair=order.pair,
            side=str(order.side),
            qty=str(order.qty),
            client_order_id=cid,
            status=str(order.status),
        )
        return self.orders.get(cid, order)

    async def _within_holdings(self, intent: OrderIntent) -> OrderIntent:
        """Cap an exit or stop at what the account holds: reduce-only in effect on spot too.

        Bybit spot has no reduce-only flag, so a sell of more than the coins held would
        open a short (or fail when it fires). The exchange's own balance is the limit.
        """
        held = abs(self.portfolio.signed_qty(intent.pair))
        market = self._market_for(intent.pair)
        fetch_balance = getattr(self._gateway, "fetch_balance", None)
        if market.type is MarketType.SPOT and fetch_balance is not None:
            balances = await fetch_balance()
            coin = balances.get(market.base)
            held = min(held, coin.total if coin is not None else ZERO)
        qty = min(intent.qty, held)
        if market.lot_size > 0:
            qty = (qty / market.lot_size).to_integral_value(ROUND_DOWN) * market.lot_size
        if qty < market.min_qty:
            qty = ZERO
        return intent if qty == intent.qty else replace(intent, qty=qty)

    def _check_balance(self, intent: OrderIntent, last_price: Decimal | None) -> None:
        held = self.portfolio.signed_qty(intent.pair)
        if intent.reduce_only:
            reducible = held if intent.side is Side.SELL else -held
            if reducible <= 0:
                raise OrderRejected("reduce-only order but no position to reduce", pair=intent.pair)
            return
        if intent.quote_amount is not None:
            if intent.quote_amount > self.portfolio.cash:
                raise OrderRejected(
                    f"insufficient balance: need {intent.quote_amount}, have {self.portfolio.cash}",
                    pair=intent.pair,
                )
            return
        price = intent.price or last_price
        if intent.side is Side.BUY and price is not None:
            cost = intent.qty * price * (1 + self.taker_fee)
            if cost > self.portfolio.cash:
                raise OrderRejected(
                    f"insufficient balance: need {cost:.8f}, have {self.portfolio.cash:.8f}",
                    pair=intent.pair,
                )

    def _reject_locally(self, intent: OrderIntent, reason: str, now: int) -> Order:
        self.rejections += 1
        order = replace(order_from_intent(intent, OrderStatus.REJECTED, now), reason=reason)
        known = self.orders.get(intent.client_order_id)
        if known is not None and not known.status.is_terminal:
            self.orders[intent.client_order_id] = order
        self._audit.record("order_rejected", now, intent=_intent_fields(intent), reason=reason)
        log.warning("order_rejected", pair=intent.pair, reason=reason)
        self._notify("rejected", {"pair": intent.pair, "reason": reason})
        return order

    async def _resolve_unknown(self, pair: str) -> bool:
        """Settle an entry or exit whose answer was lost; False while it may still appear."""
        pending = self._unresolved.get(pair)
        if pending is None:
            return True
        cid, since = pending
        outcome = await self._look_up(pair, cid, since)
        if outcome is None:
            return False
        del self._unresolved[pair]
        return True

    async def _look_up(
        self, pair: str, cid: str, since: int, *, placement: bool = True
    ) -> Order | bool | None:
        """Ask the exchange for `cid`: its order, False when it is not there, None: unknown.

        Not found is final only once the request is older than `unknown_after_ms`; until
        then the lookup is repeated (the exchange may still be processing the request).
        After a lost placement that means it was never placed (the journal says so).
        """
        while True:
            try:
                found = await self._gateway.fetch_order(pair, client_order_id=cid)
            except BotError as e:
                log.warning("order_lookup_failed", **{**e.describe(), "client_order_id": cid})
                found = None
                if self._clock.now_ms() - since > 3 * self.unknown_after_ms:
                    return None
            else:
                if found is not None:
                    if self._store is not None:
                        await self._off(self._store.adopt_order, found)
                    self._track(found)
                    log.info(
                        "order_outcome_resolved", client_order_id=cid, status=str(found.status)
                    )
                    return found
                if self._clock.now_ms() - since > self.unknown_after_ms:
                    if self._store is not None and placement:
                        await self._off(
                            self._store.mark_never_sent,
                            cid,
                            "not on the exchange after its answer was lost",
                        )
                    known = self.orders.get(cid)
                    if known is not None and not known.status.is_terminal:
                        self.orders[cid] = replace(known, status=OrderStatus.REJECTED)
                    log.info("order_outcome_resolved", client_order_id=cid, status="never_sent")
                    return False
            await self._clock.sleep(_LOOKUP_PAUSE_S)

    # -- Updates -----------------------------------------------------------------------------

    def _track(self, order: Order) -> None:
        known = self.orders.get(order.client_order_id)
        if known is None:
            self.orders[order.client_order_id] = order
            return
        if order.filled_qty < known.filled_qty or order.ts_updated < known.ts_updated:
            return  # stale: a later update already arrived from the other source
        if order.status == known.status:
            # The same state reported twice (REST answer and private stream): keep the
            # richer report, no transition.
            self.orders[order.client_order_id] = order
            return
        if not is_legal_transition(known.status, order.status):
            raise InvariantError(
                f"illegal order transition {known.status} -> {order.status}",
                component="executor",
                pair=order.pair,
                order_id=order.client_order_id,
            )
        log.info(
            "state_changed",
            machine="order",
            client_order_id=order.client_order_id,
            **{"from": str(known.status), "to": str(order.status)},
        )
        self.orders[order.client_order_id] = order

    async def on_order(self, order: Order) -> None:
        """Apply an order update from a REST answer or the private stream."""
        self._track(order)
        if self._store is not None:
            await self._off(self._store.update_order, self.orders[order.client_order_id])

    async def has_fill(self, fill_id: str) -> bool:
        """Return True if the journal already holds this execution (False without one)."""
        return self._store is not None and await self._off(self._store.has_fill, fill_id)

    async def on_fill(self, order: Order, fill: Fill) -> ClosedTrade | None:
        """Apply a fill (once, whichever source reports it first) and manage protection."""
        if self._store is not None and not await self._off(self._store.record_fill, fill):
            return None
        self._track(order)
        if self._store is not None:
            await self._off(self._store.update_order, self.orders.get(order.client_order_id, order))
        intent = self._intents.get(fill.client_order_id)
        reason = intent.reason if intent else order.reason
        trade = self.portfolio.apply_fill(fill, reason=reason)
        market = self._market_for(fill.pair)
        self.portfolio.drop_dust(fill.pair, max(market.min_qty, market.lot_size))
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
            self._notify("trade_closed", {"trade": trade})
        elif intent is not None and not intent.reduce_only:
            self._notify("trade_opened", {"fill": fill})
        await self._manage_protection(order, fill, intent)
        return trade

    async def _manage_protection(
        self, order: Order, fill: Fill, intent: OrderIntent | None
    ) -> None:
        pair = fill.pair
        if self.portfolio.signed_qty(pair) == 0:
            if pair in self._protection:
                slot = self._slot(pair)
                async with slot.lock:
                    if self.portfolio.signed_qty(pair) == 0:
                        await self._clear_protection(pair, slot)
                        slot.base = None
            if intent is not None and intent.type is OrderType.STOP_MARKET:
                self._notify("stop_hit", {"pair": pair, "price": str(fill.price)})
            return
        if (
            intent is None
            or purpose_of(intent) is not OrderPurpose.ENTRY
            or self.orders.get(order.client_order_id, order).status is not OrderStatus.FILLED
        ):
            return
        async with self._slot(pair).lock:
            await self._protect(intent, fill.price)

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
        if new is not slot.state:
            log.info(
                "state_changed",
                machine="protection",
                pair=pair,
                client_order_id=slot.stop,
                **{"from": str(slot.state), "to": str(new)},
            )
        slot.state = new
        if new is StopState.NONE:
            slot.stop = None

    def _settle(self, pair: str, slot: _Protection) -> None:
        # An update seen on the stream (a fill, a cancel) may have ended the stop already.
        order = self.orders.get(slot.stop) if slot.stop is not None else None
        if order is not None and order.status.is_terminal and slot.state is not StopState.NONE:
            self._move(pair, slot, "done")

    async def _protect(self, entry: OrderIntent, price: Decimal | None) -> None:
        """Place the stop (and, on linear, the take-profit) of the position `entry` opened."""
        pair = entry.pair
        slot = self._slot(pair)
        position = self.portfolio.position(pair)
        if (
            not self.protective_orders
            or position is None
            or slot.base == entry.client_order_id
            or (entry.stop_loss is None and entry.take_profit is None)
        ):
            return
        if not await self._clear_protection(pair, slot):
            log.error("protection_blocked", pair=pair, client_order_id=slot.stop)
            return
        slot.base = entry.client_order_id
        self.portfolio.set_protection(pair, stop=entry.stop_loss, take_profit=entry.take_profit)
        if entry.stop_loss is not None:
            await self._place_stop(pair, slot, entry.stop_loss, seq=0, price=price)
        if entry.take_profit is not None and self._market_for(pair).type is not MarketType.SPOT:
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
        position = self.portfolio.position(pair)
        assert position is not None
        long = self.portfolio.signed_qty(pair) > 0
        now = self._clock.now_ms()
        stop = kind is OrderType.STOP_MARKET
        return OrderIntent(
            pair=pair,
            side=Side.SELL if long else Side.BUY,
            qty=position.qty,
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
        self, pair: str, slot: _Protection, level: Decimal, *, seq: int, price: Decimal | None
    ) -> Order | None:
        assert slot.base is not None
        assert slot.state is StopState.NONE
        intent = self._protective_intent(
            pair, OrderType.STOP_MARKET, level, protective_id(slot.base, "sl", seq)
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
        if slot.state is StopState.UNKNOWN or slot.state is StopState.PLACING:
            assert slot.stop is not None
            found = await self._look_up(pair, slot.stop, slot.since_ms, placement=slot.placing)
            if found is None:
                self._move(pair, slot, "lost")
                return False
            if found is False or (isinstance(found, Order) and found.status.is_terminal):
                if slot.state is StopState.PLACING:
                    self._move(pair, slot, "lost")
                self._move(pair, slot, "done")
                return True
            if slot.state is StopState.PLACING:
                self._move(pair, slot, "placed")
            else:
                self._move(pair, slot, "found")
        if slot.state is StopState.WORKING:
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
                if isinstance(e, BusinessError):
                    return await self._clear_stop(pair, slot, tries - 1)
                return False
            if not self._is_done(cid):
                self._move(pair, slot, "lost")
                return await self._clear_stop(pair, slot, tries - 1)
            self._move(pair, slot, "done")
        return slot.state is StopState.NONE

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

    async def amend_stop(
        self, pair: str, stop: Decimal, *, candle_ts: int | None = None
    ) -> Order | None:
        """Move the pair's protective stop: cancel the working one, place the new level.

        Cancel first, then place: for a moment there is no stop, never two (two stops could
        both fill and flip the position). A stop whose answer was lost is settled first; if
        that cannot be done yet, the move waits for a later candle. The new stop is named
        after the candle that moved it, so a restarted bot cannot place it twice.
        """
        slot = self._slot(pair)
        async with slot.lock:
            position = self.portfolio.position(pair)
            if position is None:
                return None
            now = self._clock.now_ms()
            if slot.base is None:  # a position with no recorded entry: name it by now
                slot.base = with_attempt(decision_key("0", pair, now, "s"), 0)
            seq = (candle_ts if candle_ts is not None else now) // 60_000
            self._settle(pair, slot)
            if slot.state is StopState.WORKING and slot.stop is not None:
                same = split_attempt(slot.stop)
                if same is not None and same[0] == protective_id(slot.base, "sl", seq):
                    return self.orders.get(slot.stop)  # this candle's move is already made
            if not await self._clear_stop(pair, slot):
                log.warning("stop_amend_deferred", pair=pair, client_order_id=slot.stop)
                return None
            if self.portfolio.position(pair) is None:
                return None  # the old stop fired while it was being cancelled
            placed = await self._place_stop(pair, slot, stop, seq=seq, price=position.mark_price)
            if placed is not None and placed.status is not OrderStatus.REJECTED:
                log.info(
                    "stop_moved", pair=pair, stop=str(stop), client_order_id=placed.client_order_id
                )
            return placed

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

    async def purpose(self, client_order_id: str) -> OrderPurpose | None:
        """Return what an order is for by our own record of it (None: not one of ours)."""
        intent = self._intents.get(client_order_id)
        if intent is None and self._store is not None:
            intent = await self._off(self._store.get_intent, client_order_id)
        return None if intent is None else purpose_of(intent)

    async def cancel_entries(self) -> int:
        """Cancel every working entry order; protection stays (a stopped bot keeps its stops).

        Entries are told apart by the journal's record of each order, never by the
        exchange's reduce-only flag, which Bybit spot does not report.
        """
        count = 0
        for order in await self._gateway.fetch_open_orders():
            if await self.purpose(order.client_order_id) is not OrderPurpose.ENTRY:
                continue
            async with self._slot(order.pair).lock:
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

    # -- Start-up and crash recovery ---------------------------------------------------------

    async def reconcile(self, account: Any, store: Any, *, quote: str) -> str:
        """Merge the store's journal with the exchange's truth; return a report.

        The same path serves a clean start and a restart after a crash (STYLE rule 13):

        1. Orders journaled but never acknowledged are looked up by client order id and
           adopted when the exchange has them, else marked never-sent (so they are not
           resent, and not counted) once their request is too old to be processed.
        2. Orders the store believes open are refreshed from the exchange.
        3. Our fills that happened while the bot was down are fetched and recorded (the
           store ignores ones it already has).
        4. Positions are rebuilt by replaying every recorded fill; cash is the exchange's
           balance of the quote currency.
        5. Each position's protection is re-adopted: the newest working stop (by the
           journal's record of what each order is for) is the position's stop; any other
           working stop is cancelled, so at most one remains.
        """
        adopted = never_sent = refreshed = 0
        for order in await self._off(store.unacknowledged):
            found = await self._look_up(order.pair, order.client_order_id, order.ts_created)
            if isinstance(found, Order):
                adopted += 1
            elif found is False:
                never_sent += 1
            else:  # the exchange cannot tell yet: nothing more is sent on the pair until then
                self._unresolved[order.pair] = (order.client_order_id, order.ts_created)
        for order in await self._off(store.open_orders):
            fresh = await account.fetch_order(order.pair, client_order_id=order.client_order_id)
            if fresh is not None:
                await self._off(store.update_order, fresh)
                self.orders[fresh.client_order_id] = fresh
                refreshed += 1
        known = {o.client_order_id: o for o in await self._off(store.all_orders)}
        recorded = await self._off(store.fills)
        since = _fills_since(known.values(), recorded)
        new_fills = 0
        for pair in sorted({o.pair for o in known.values()}):
            for fill in await account.fetch_my_trades(pair, since=since):
                if fill.client_order_id in known and await self._off(store.record_fill, fill):
                    new_fills += 1
        rebuilt = Portfolio(self.portfolio.cash, quote=quote)
        intents = {cid: await self._off(store.get_intent, cid) for cid in known}
        journal_fills = await self._off(store.fills)
        for fill in sorted(journal_fills, key=lambda f: (f.ts, f.fill_id)):
            intent = intents.get(fill.client_order_id)
            rebuilt.apply_fill(fill, reason=intent.reason if intent else "")
        balances = await account.fetch_balance()
        cash = balances[quote].total if quote in balances else self.portfolio.cash
        self.portfolio.restore(
            cash=cash,
            positions=list(rebuilt.positions().values()),
            fees=rebuilt.fees,
            realised_pnl=rebuilt.realised_pnl,
        )
        self.portfolio.closed.extend(rebuilt.closed)
        for pair in list(self.portfolio.positions()):
            market = self._market_for(pair)
            self.portfolio.drop_dust(pair, max(market.min_qty, market.lot_size))
        await self._adopt_protection(known, intents)
        positions = self.portfolio.positions()
        lines = [
            f"orders adopted {adopted}, never sent {never_sent}, refreshed {refreshed}",
            f"fills recorded while down {new_fills}; {len(journal_fills)} fills in the journal",
            f"cash {cash} {quote}; {len(positions)} position(s)",
        ]
        lines += [f"  {p.pair} {p.side} {p.qty} @ {p.entry_price}" for p in positions.values()]
        self._audit.record(
            "reconciled",
            self._clock.now_ms(),
            adopted=adopted,
            never_sent=never_sent,
            refreshed=refreshed,
            new_fills=new_fills,
        )
        return "\n".join(lines)

    async def _adopt_protection(
        self, known: dict[str, Order], intents: dict[str, OrderIntent | None]
    ) -> None:
        working: dict[str, list[Order]] = {}
        for cid, order in known.items():
            intent = intents.get(cid)
            if intent is None:
                continue
            self._intents.setdefault(cid, intent)
            current = self.orders.get(cid, order)
            self.orders.setdefault(cid, current)
            kind = purpose_of(intent)
            if kind is OrderPurpose.ENTRY and self.portfolio.has_position(order.pair):
                # The newest entry of a held position is the one its protection belongs to.
                slot = self._slot(order.pair)
                base = known.get(slot.base) if slot.base else None
                if base is None or order.ts_created >= base.ts_created:
                    slot.base = cid
            if current.status.is_terminal:
                continue
            if kind is OrderPurpose.STOP:
                working.setdefault(order.pair, []).append(current)
            elif kind is OrderPurpose.TAKE_PROFIT:
                self._slot(order.pair).others.append(cid)
        for pair, stops in working.items():
            stops.sort(key=lambda o: (o.ts_created, o.client_order_id))
            slot = self._slot(pair)
            keep = stops[-1] if self.portfolio.has_position(pair) else None
            for stop in stops:
                if stop is keep:
                    continue
                # A second stop, or one left on a flat account: it could only sell twice.
                slot.stop, slot.state = stop.client_order_id, StopState.WORKING
                if not await self._clear_stop(pair, slot):
                    log.error(
                        "extra_stop_not_cancelled", pair=pair, client_order_id=stop.client_order_id
                    )
            if keep is not None:
                slot.stop, slot.state = keep.client_order_id, StopState.WORKING
                if keep.stop_price is not None:
                    # The working stop is the position's stop: trailing continues from it.
                    self.portfolio.set_protection(pair, stop=keep.stop_price)
                log.info("stop_adopted", pair=pair, client_order_id=keep.client_order_id)

    async def restore_protection(self, price_for: Callable[[str], Decimal | None]) -> list[str]:
        """Give every position that lacks one its stop again; return pairs past their stop.

        A bot killed between an entry's fill and its stop's placement (or whose stop was
        lost) starts with an unprotected position: the stop goes back at its last level
        (the newest journaled stop, else the entry's). A position whose price is already
        through that level is returned for the engine to close at market instead.
        """
        crossed: list[str] = []
        if not self.protective_orders:
            return crossed
        for pair, position in self.portfolio.positions().items():
            slot = self._slot(pair)
            async with slot.lock:
                self._settle(pair, slot)
                if slot.state is not StopState.NONE or slot.base is None:
                    continue
                level = position.stop_price or self._last_stop_level(pair, slot.base)
                if level is None:
                    continue
                price = price_for(pair)
                long = position.side is PositionSide.LONG
                if price is not None and (price <= level if long else price >= level):
                    crossed.append(pair)
                    continue
                self.portfolio.set_protection(pair, stop=level)
                await self._place_stop(pair, slot, level, seq=self._clock.now_ms(), price=price)
                log.warning("stop_restored", pair=pair, level=str(level), state=str(slot.state))
        return crossed

    def _last_stop_level(self, pair: str, base: str) -> Decimal | None:
        levels = [
            (intent.ts, intent.stop_price)
            for cid, intent in self._intents.items()
            if intent.pair == pair
            and cid.startswith(base.rpartition(ATTEMPT_SEPARATOR)[0] or base)
            and purpose_of(intent) is OrderPurpose.STOP
            and intent.stop_price is not None
        ]
        if levels:
            return max(levels, key=lambda t: t[0])[1]
        entry = self._intents.get(base)
        return entry.stop_loss if entry is not None else None

    def open_orders(self) -> list[Order]:
        """Return orders not yet in a terminal state."""
        return [o for o in self.orders.values() if not o.status.is_terminal]


_SKEW_MARGIN_MS = 60_000
_LOOKUP_PAUSE_S = 0.5


def _fills_since(orders: Iterable[Order], recorded: Iterable[Fill]) -> int | None:
    """Return where to start fetching our executions so that no missing fill is skipped.

    The newest recorded fill is not enough: a fill lost to a crash (or one that landed
    before the private stream subscribed) can be older than fills recorded after it. Any
    order whose filled quantity exceeds its recorded fills has one missing, so the fetch
    starts at the earliest such order's creation (less a minute for clock skew). None
    (Bybit's last seven days) only when nothing is recorded and nothing is missing.
    """
    recorded = list(recorded)
    totals: dict[str, Decimal] = {}
    for fill in recorded:
        totals[fill.client_order_id] = totals.get(fill.client_order_id, Decimal(0)) + fill.qty
    gaps = [
        o.ts_created - _SKEW_MARGIN_MS
        for o in orders
        if o.filled_qty > totals.get(o.client_order_id, Decimal(0))
    ]
    newest = [max(f.ts for f in recorded)] if recorded else []
    return min([*newest, *gaps], default=None)


def _is_protective(client_order_id: str) -> bool:
    return client_order_id.rpartition("-")[2][:2] in ("sl", "tp")


def protective_id(entry_id: str, kind: str, seq: int) -> str:
    """Return the id stem of a protective order: `<entry id>-<sl|tp><seq>`.

    The entry's id stays a prefix, so fills of stops and take-profits (and of every
    amended stop) trace back to the decision that opened the position; `seq` is 0 for the
    first stop and the candle (in minutes) for a trailing move. Room is left for the
    attempt suffix (`models.with_attempt`) within Bybit's 36 characters.
    """
    suffix = f"-{kind}{seq:x}"
    return entry_id[: CLIENT_ID_MAX - 3 - len(suffix)] + suffix


def order_from_intent(intent: OrderIntent, status: OrderStatus, now: int) -> Order:
    """Return the order an intent becomes before the exchange has said anything of it.

    Its `ts_updated` is 0, so any report from the exchange (on its own clock) is newer.
    """
    return Order(
        client_order_id=intent.client_order_id,
        pair=intent.pair,
        side=intent.side,
        type=intent.type,
        qty=intent.qty,
        status=status,
        ts_created=now,
        ts_updated=0 if status is OrderStatus.NEW else now,
        price=intent.price,
        stop_price=intent.stop_price,
        reduce_only=intent.reduce_only,
    )


def _intent_fields(intent: OrderIntent) -> dict[str, str | None]:
    return {
        "pair": intent.pair,
        "side": str(intent.side),
        "type": str(intent.type),
        "qty": str(intent.qty),
        "price": None if intent.price is None else str(intent.price),
        "stop_price": None if intent.stop_price is None else str(intent.stop_price),
        "stop_loss": None if intent.stop_loss is None else str(intent.stop_loss),
        "take_profit": None if intent.take_profit is None else str(intent.take_profit),
        "reduce_only": str(intent.reduce_only),
        "client_order_id": intent.client_order_id,
        "reason": intent.reason,
        "quote_amount": None if intent.quote_amount is None else str(intent.quote_amount),
    }
