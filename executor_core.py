"""The executor's core: journal, send, track and resolve orders, one pair at a time.

Part of `trade_executor` (which re-exports it): the order gateway and journal protocols,
the per-pair protection slot with its stop state machine, and `ExecutorCore`, which
validates an intent, names its attempt, journals it off the event loop before sending,
tracks the exchange's answers and settles orders whose answers were lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any, Final, Protocol, TypeVar

import structlog

from audit_fields import intent_fields, submitted_fields
from error_handler import (
    BotError,
    InvariantError,
    OrderRejected,
    RecoverableError,
)
from models import (
    CLIENT_ID_MAX,
    Balance,
    ClosedTrade,
    ErrorRaised,
    EventSink,
    Fill,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderPurpose,
    OrderRefused,
    OrderStatus,
    Side,
    evolve,
    is_legal_transition,
    order_from_intent,
    purpose_of,
    split_attempt,
    with_attempt,
)
from portfolio import Portfolio
from utils.utilities import AuditTrail, Clock, SerialWorker, logs_at


log = structlog.get_logger("trade_executor")


class OrderIndex(dict[str, Order]):
    """Every order by client id, with the ones not yet terminal kept apart as well.

    A run's order history only grows, but the orders still working are few: `working`
    answers "what is open" without scanning the history (which made a long backtest
    quadratic in its number of orders), and `working_of` what is open on one pair without
    scanning the others (an exit asks it: with a stop working per position, a burst of
    exits was quadratic in the positions held).
    """

    def __init__(self) -> None:
        super().__init__()
        self.working: dict[str, Order] = {}
        self._by_pair: dict[str, dict[str, Order]] = {}

    def working_of(self, pair: str) -> Iterable[Order]:
        """Return `pair`'s orders not yet terminal."""
        orders = self._by_pair.get(pair)
        return orders.values() if orders else ()

    def __setitem__(self, key: str, order: Order) -> None:
        dict.__setitem__(self, key, order)
        if order.status.is_terminal:
            self._forget(key)
        else:
            self.working[key] = order
            by_pair = self._by_pair.get(order.pair)
            if by_pair is None:
                by_pair = self._by_pair[order.pair] = {}
            by_pair[key] = order

    def _forget(self, key: str) -> None:
        order = self.working.pop(key, None)
        if order is not None:
            by_pair = self._by_pair[order.pair]
            del by_pair[key]
            if not by_pair:
                del self._by_pair[order.pair]

    def setdefault(self, key: str, default: Order) -> Order:
        """Insert `default` under `key` unless it is there; return what is stored."""
        if key in self:
            return self[key]
        self[key] = default
        return default

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._forget(key)

    def pop(self, key: str, *default: Any) -> Any:
        """Remove `key` and return its order (or `default`)."""
        self._forget(key)
        return super().pop(key, *default)

    def clear(self) -> None:
        """Forget every order."""
        super().clear()
        self.working.clear()
        self._by_pair.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add orders from a mapping or pairs, indexing each."""
        for key, order in dict(*args, **kwargs).items():
            self[key] = order


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

    async def amend_order(
        self, pair: str, *, client_order_id: str, trigger_price: Decimal
    ) -> Order:
        """Move a working stop's trigger in place (same order, same client id).

        Raises `OrderNotFoundError` when the order no longer works (it fired, or was
        cancelled); a lost answer (`RecoverableError`) leaves it at either trigger.
        """
        ...

    async def fetch_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order | None:
        """Look an order up."""
        ...

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """Return working orders."""
        ...

    async def deliver_fills(self, pair: str) -> None:
        """Hand the fills the venue already has for `pair`'s orders to its fill sink.

        The live exchange has none to hand (its fills come by the private stream); the
        simulated one, filling market orders at the last close, delivers them here.
        """
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
        """Record the exchange's acknowledgement."""
        ...

    def mark_never_sent(self, client_order_id: str, reason: str) -> None:
        """Record that the order never reached the exchange."""
        ...

    def update_order(self, order: Order) -> bool:
        """Persist an order update."""
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

    def add_closed_trade(self, trade: ClosedTrade, *, equity_after: float | None = None) -> None:
        """Keep a finished round trip and the equity right after it."""
        ...

    def get_intent(self, client_order_id: str) -> OrderIntent | None:
        """Return the intent journaled under `client_order_id`."""
        ...


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
    # An amend of the working stop went unanswered and its trigger could not be read back:
    # the stop works at the old or the new level, so its known level is not trusted.
    level_unsure: bool = False
    others: list[str] = field(default_factory=list)  # take-profit orders (linear)
    # Protection a fill asked for while the pair was held: its holder sees to it before
    # letting go (the fill's stream never waits for the pair, so later pieces still land).
    due: tuple[OrderIntent, Decimal | None] | None = None
    clear_due: bool = False
    # (level, last price) of an entry's stop not placed yet: a paper fill delivered with its
    # candle's match (`ProtectingExecutor.defer_stops`); placed once anything holds the pair
    # or the candle is done, and never placed if an exit takes protection off first.
    pending: tuple[Decimal, Decimal | None] | None = None


class _OrderTracking:
    """The orders' states as the exchange reports them, and how much of each fill is applied.

    `ExecutorCore`'s bookkeeping of every answer (REST reply or private stream): a state
    change must be a legal transition, a stale report is ignored, and a pair whose
    reported fills run ahead of the portfolio holds its next order until they land. The
    attributes are `ExecutorCore`'s (set in its constructor).
    """

    orders: OrderIndex
    _applied: dict[str, Decimal]
    _unapplied: dict[str, set[str]]

    def _track(self, order: Order) -> None:
        self._track_status(order)
        self._refresh_unapplied(order.client_order_id)

    def _refresh_unapplied(self, cid: str) -> None:
        order = self.orders.get(cid)
        if order is None:
            return
        pending = self._unapplied.get(order.pair)
        if pending is None:
            pending = self._unapplied[order.pair] = set()
        if order.filled_qty > self._applied.get(cid, ZERO):
            pending.add(cid)
        else:
            pending.discard(cid)

    def _note_applied(self, fill: Fill) -> None:
        cid = fill.client_order_id
        self._applied[cid] = self._applied.get(cid, ZERO) + fill.qty
        self._refresh_unapplied(cid)

    async def _fills_applied(self, pair: str) -> bool:
        """Wait (briefly) until every reported fill of `pair` is in the portfolio."""
        deadline = time.monotonic() + _FILL_WAIT_S
        while self._unapplied.get(pair):
            if time.monotonic() > deadline:
                log.warning(
                    "fills_not_yet_applied", pair=pair, orders=sorted(self._unapplied[pair])
                )
                return False
            await asyncio.sleep(_FILL_POLL_S)
        return True

    def _track_status(self, order: Order) -> None:
        known = self.orders.get(order.client_order_id)
        if known is None:
            self.orders[order.client_order_id] = order
            return
        if (
            order.filled_qty < known.filled_qty
            or order.ts_updated < known.ts_updated
            or (known.status.is_terminal and not order.status.is_terminal)
        ):
            # Stale: a later update already arrived from the other source (a piece's
            # report can carry the same time as the cancel of the rest, which is final).
            return
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
        if logs_at(logging.INFO):
            log.info(
                "state_changed",
                machine="order",
                client_order_id=order.client_order_id,
                **{"from": str(known.status), "to": str(order.status)},
            )
        self.orders[order.client_order_id] = order

    def order_after_fill(self, fill: Fill) -> Order | None:
        """Return `fill`'s order with the fill counted in (None: no such order of ours).

        The order stream and REST answers report a piece before or after its execution
        arrives, so the filled quantity is the larger of the exchange's report and the
        applied executions plus this one; an order already finished (filled, or the rest
        cancelled) keeps its state.
        """
        known = self.orders.get(fill.client_order_id)
        if known is None:
            return None
        counted = self._applied.get(fill.client_order_id, ZERO) + fill.qty
        filled = min(max(known.filled_qty, counted), known.qty)
        status = known.status
        if not status.is_terminal:
            status = OrderStatus.FILLED if filled >= known.qty else OrderStatus.PARTIALLY_FILLED
        return evolve(
            known,
            filled_qty=filled,
            status=status,
            ts_updated=max(known.ts_updated, fill.ts),
            exchange_order_id=known.exchange_order_id or fill.exchange_order_id,
        )


class ExecutorCore(_OrderTracking):
    """Validate, name, journal, send and track orders; settle the ones whose answer was lost."""

    def __init__(
        self,
        gateway: OrderGateway,
        portfolio: Portfolio,
        *,
        market_for: Callable[[str], Market],
        clock: Clock,
        audit: AuditTrail,
        store: OrderJournal | None = None,
        notify: EventSink | None = None,
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
        # The live exchange reports balances (spot exits are capped by them); the simulator's
        # portfolio is the account itself.
        self._fetch_balance: Callable[[], Awaitable[dict[str, Balance]]] | None = getattr(
            gateway, "fetch_balance", None
        )
        # Journal I/O (fsync'd commits) runs on its own thread, in order, never on the loop.
        self._io = SerialWorker("journal") if store is not None else None
        self._notify: EventSink = notify or (lambda event: None)
        self.taker_fee = taker_fee
        self.protective_orders = protective_orders
        # An order not on the exchange this long after its request left never will be:
        # Bybit refuses a request older than its recv_window (plus the clock skew margin).
        self.unknown_after_ms = unknown_after_ms
        self.orders = OrderIndex()
        self._intents: dict[str, OrderIntent] = {}
        self._protection: dict[str, _Protection] = {}
        # pair -> (level, candle) of a stop move a burst makes after its orders are sent.
        self._deferred_moves: dict[str, tuple[Decimal, int | None]] = {}
        # The pairs whose entry stop waits to be placed (`_Protection.pending`), in order.
        self.pending_stops: dict[str, None] = {}
        self.defer_stops = False  # see `ProtectingExecutor.flush_stops`
        # pair -> (client id, sent at) of an entry or exit whose answer was lost.
        self._unresolved: dict[str, tuple[str, int]] = {}
        # Filled quantity applied to the portfolio per order, and per pair the orders whose
        # reported fills run ahead of it (a REST answer can say "filled" before the fill
        # itself reaches us): no new order of that pair is decided on a stale position.
        self._applied: dict[str, Decimal] = {}
        self._unapplied: dict[str, set[str]] = {}
        # Executions applied, by id, when no journal dedupes them (the simulator).
        self._fill_ids: set[str] = set()
        self.rejections = 0
        self.latencies_ms: list[float] = []
        # What each buy between its balance check and its answer will spend (`_submit`).
        self.committed: dict[object, Decimal] = {}

    def _slot(self, pair: str) -> _Protection:
        slot = self._protection.get(pair)
        if slot is None:
            slot = self._protection[pair] = _Protection()
        return slot

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
        if self._store is None:
            return intent
        parsed = split_attempt(intent.client_order_id)
        if parsed is None:
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

    def _audit_submitted(self, checked: OrderIntent, now: int) -> None:
        # Its fields built by the trail's writer, off the order path (a backtest's: never).
        self._audit.record_with("order_submitted", now, submitted_fields, checked)

    async def _send(self, checked: OrderIntent, now: int) -> Order:
        """Journal, send and track a validated order (under the pair's lock)."""
        cid = checked.client_order_id
        if checked.reduce_only:
            checked = await self._within_holdings(checked)
            if checked.qty <= 0:
                return self._reject_locally(checked, "nothing held on the exchange to sell", now)
        if self._store is not None:
            await self._journal(checked, now)
        self._audit_submitted(checked, now)
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
            self._notify(ErrorRaised(f"order failed: {e.message}", pair=checked.pair))
            if isinstance(e, RecoverableError) and not _is_protective(cid):
                self._unresolved[checked.pair] = (cid, now)
            raise
        if self._store is not None:
            await self._off(self._store.acknowledge, order)
        self._acknowledged(order)
        return self.orders.get(cid, order)

    async def _journal(self, checked: OrderIntent, now: int) -> None:
        if self._store is None:
            return
        # The journal keeps the levels the entry's protection is placed at (sent apart).
        record = self._intents.get(checked.client_order_id)
        levels = (None, None) if record is None else (record.stop_loss, record.take_profit)
        journaled = replace(checked, stop_loss=levels[0], take_profit=levels[1])
        await self._off(self._store.journal, journaled, now)
        # Known before the answer: a fill on the private stream can beat the REST reply
        # (and an answer can be lost). Without a journal (the simulator) neither occurs.
        self.orders[checked.client_order_id] = order_from_intent(checked, OrderStatus.NEW, now)

    def _acknowledged(self, order: Order) -> None:
        self._track(order)
        if order.status is OrderStatus.REJECTED:
            self.rejections += 1
            self._notify(OrderRefused(order.pair, order.reason))
        if logs_at(logging.INFO):
            log.info(
                "order_sent",
                pair=order.pair,
                side=str(order.side),
                qty=str(order.qty),
                client_order_id=order.client_order_id,
                status=str(order.status),
            )

    async def _within_holdings(self, intent: OrderIntent) -> OrderIntent:
        """Cap an exit or stop at what the account holds: reduce-only in effect on spot too.

        Bybit spot has no reduce-only flag, so a sell of more than the coins held would
        open a short (or fail when it fires). The exchange's own balance is the limit.
        """
        held = abs(self.portfolio.signed_qty(intent.pair))
        market = self._market_for(intent.pair)
        fetch_balance = self._fetch_balance
        if market.type is MarketType.SPOT and fetch_balance is not None:
            balances = await fetch_balance()
            coin = balances.get(market.base)
            held = min(held, coin.total if coin is not None else ZERO)
        if intent.qty <= held:
            return intent  # already on the lot grid and above the minimum (validated)
        qty = held
        if market.lot_size > 0:
            qty = (qty / market.lot_size).to_integral_value(ROUND_DOWN) * market.lot_size
        if qty < market.min_qty:
            qty = ZERO
        return intent if qty == intent.qty else replace(intent, qty=qty)

    def _check_balance(self, intent: OrderIntent, last_price: Decimal | None) -> Decimal | None:
        """Refuse an order the cash cannot pay for; return what a buy will spend (or None).

        The cash is what the portfolio holds less what the buys still on their way will
        spend (`committed`: a live burst sends its orders together).
        """
        held = self.portfolio.signed_qty(intent.pair)
        if intent.reduce_only:
            reducible = held if intent.side is Side.SELL else -held
            if reducible <= 0:
                raise OrderRejected("reduce-only order but no position to reduce", pair=intent.pair)
            return None
        cash = self.portfolio.cash
        if self.committed:
            cash -= sum(self.committed.values())
        if intent.quote_amount is not None:
            if intent.quote_amount > cash:
                raise OrderRejected(
                    f"insufficient balance: need {intent.quote_amount}, have {cash}"
                    + self._committed_note(),
                    pair=intent.pair,
                )
            return intent.quote_amount
        price = intent.price or last_price
        if intent.side is Side.BUY and price is not None:
            cost = intent.qty * price * (1 + self.taker_fee)
            if cost > cash:
                raise OrderRejected(
                    f"insufficient balance: need {cost:.8f}, have {cash:.8f}"
                    + self._committed_note(),
                    pair=intent.pair,
                )
            return cost
        return None

    def _committed_note(self) -> str:
        if not self.committed:
            return ""
        return f" after {sum(self.committed.values()):.8f} for {len(self.committed)} buys under way"

    def _reject_locally(self, intent: OrderIntent, reason: str, now: int) -> Order:
        self.rejections += 1
        order = replace(order_from_intent(intent, OrderStatus.REJECTED, now), reason=reason)
        known = self.orders.get(intent.client_order_id)
        if known is not None and not known.status.is_terminal:
            self.orders[intent.client_order_id] = order
        self._audit.record("order_rejected", now, intent=intent_fields(intent), reason=reason)
        log.warning("order_rejected", pair=intent.pair, reason=reason)
        self._notify(OrderRefused(intent.pair, reason))
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

    async def on_order(self, order: Order) -> None:
        """Apply an order update from a REST answer or the private stream.

        An order without a client id is not ours (the exchange's liquidation or ADL order,
        one placed by hand): its executions are booked by `on_stream_fill`.
        """
        if not order.client_order_id:
            return
        self._track(order)
        pair = order.pair
        if (
            self.orders[order.client_order_id].status.is_terminal
            and self.portfolio.has_position(pair)
            and not self.working_entries(pair)
        ):
            # An order whose last piece left less than the minimum behind (its fills
            # applied while it still worked) leaves dust: written off once it is done.
            market = self._market_for(pair)
            self.portfolio.drop_dust(pair, max(market.min_qty, market.lot_size))
        if self._store is not None:
            await self._off(self._store.update_order, self.orders[order.client_order_id])

    def working_entries(self, pair: str) -> list[Order]:
        """Return `pair`'s entry orders that may still fill (by our record of each)."""
        out = []
        for order in self.orders.working_of(pair):
            # Spot orders come back without a reduce-only flag: our record says what each is.
            intent = self._intents.get(order.client_order_id)
            if intent is not None:
                entry = purpose_of(intent) is OrderPurpose.ENTRY
            else:
                entry = not order.reduce_only and not _is_protective(order.client_order_id)
            if entry:
                out.append(order)
        return out

    async def record_trade(self, trade: ClosedTrade, equity_after: float | None) -> None:
        """Keep a closed round trip in the journal (live), written off the event loop.

        With the equity after it as the score's book saw it, so a restart rebuilds the
        book (`TradeStore.trade_history`). Nothing without a journal.
        """
        if self._store is not None:
            await self._off(
                functools.partial(self._store.add_closed_trade, equity_after=equity_after), trade
            )

    async def has_fill(self, fill_id: str) -> bool:
        """Return True if the journal already holds this execution (False without one)."""
        return self._store is not None and await self._off(self._store.has_fill, fill_id)

    async def purpose(self, client_order_id: str) -> OrderPurpose | None:
        """Return what an order is for by our own record of it (None: not one of ours)."""
        intent = self._intents.get(client_order_id)
        if intent is None and self._store is not None:
            intent = await self._off(self._store.get_intent, client_order_id)
        return None if intent is None else purpose_of(intent)

    def open_orders(self, pair: str | None = None) -> list[Order]:
        """Return orders not yet in a terminal state (of `pair` only, if given)."""
        return list(self.orders.working.values() if pair is None else self.orders.working_of(pair))


_LOOKUP_PAUSE_S = 0.5
_FILL_WAIT_S = 3.0  # how long an order waits for an earlier order's fill to be applied
_FILL_POLL_S = 0.005


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
