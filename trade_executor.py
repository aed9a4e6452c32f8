"""Order execution, the same in every mode: validate, journal, send, track, account.

`TradeExecutor.submit(intent)` rounds and checks the intent against the market's rules and
the balance, journals it under its client order id *before* sending (when a store is
attached), and sends it through an `OrderGateway` — the live `exchange.Exchange` or the
`trade_simulator.SimulatedExchange`; the executor cannot tell which. Order updates and
fills arrive from REST answers and private streams in any order; the state machine in
`models.ORDER_TRANSITIONS` and fill ids make them idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from decimal import Decimal
from typing import Any, Protocol

import structlog

from error_handler import BotError, InvariantError, OrderRejected
from models import (
    ClosedTrade,
    Fill,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    is_legal_transition,
)
from portfolio import Portfolio
from utils.precision import validate_intent
from utils.utilities import AuditTrail, Clock


log = structlog.get_logger(__name__)
ZERO = Decimal(0)


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

    def acknowledge(self, order: Order) -> None:
        """Record the exchange's acknowledgement."""
        ...

    def mark_never_sent(self, client_order_id: str, reason: str) -> None:
        """Record that the order never reached the exchange."""
        ...

    def update_order(self, order: Order) -> None:
        """Persist an order update."""
        ...

    def record_fill(self, fill: Fill) -> bool:
        """Persist a fill; return False if it was already recorded."""
        ...

    def has_fill(self, fill_id: str) -> bool:
        """Return True if the execution is recorded."""
        ...


Notifier = Callable[[str, dict[str, Any]], None]


class TradeExecutor:
    """Validate, journal and send orders; apply fills to the portfolio."""

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
    ) -> None:
        self._gateway = gateway
        self.portfolio = portfolio
        self._market_for = market_for
        self._clock = clock
        self._audit = audit
        self._store = store
        self._notify = notify or (lambda kind, data: None)
        self.taker_fee = taker_fee
        self.protective_orders = protective_orders
        self.orders: dict[str, Order] = {}
        self._intents: dict[str, OrderIntent] = {}
        self._protective: dict[str, list[str]] = {}
        self._protective_base: dict[str, str] = {}
        self._amendments = 0
        self.rejections = 0
        self.latencies_ms: list[float] = []

    # -- Submit ------------------------------------------------------------------------------

    async def submit(self, intent: OrderIntent, *, last_price: Decimal | None = None) -> Order:
        """Validate and send one order; a refusal comes back as a REJECTED order with why."""
        now = self._clock.now_ms()
        # The executor places stop-loss and take-profit as separate reduce-only orders once
        # the entry fills (the same on spot, where Bybit refuses them attached to market
        # orders, and on linear), so they are not sent attached to the entry.
        protection = (intent.stop_loss, intent.take_profit)
        if protection != (None, None):
            intent = replace(intent, stop_loss=None, take_profit=None)
        try:
            market = self._market_for(intent.pair)
            checked = validate_intent(intent, market, last_price=last_price)
            self._check_balance(checked, last_price)
        except OrderRejected as e:
            return self._reject_locally(intent, e.message, now)
        self._intents[checked.client_order_id] = (
            checked
            if protection == (None, None)
            else replace(checked, stop_loss=protection[0], take_profit=protection[1])
        )
        exiting = checked.reduce_only and not _is_protective(checked.client_order_id)
        if exiting and self._protective.get(checked.pair):
            # Take the resting stop off before a market exit: on spot it holds the coins
            # the exit must sell (Bybit refuses the exit), and on any market an exit plus a
            # stop firing at once could close twice. Re-placed if the exit is refused.
            await self._cancel_protection(checked.pair)
            return await self._send_exit(checked, now)
        return await self._send(checked, now)

    async def _send(self, checked: OrderIntent, now: int) -> Order:
        """Journal, send and track a validated order."""
        if self._store is not None:
            self._store.journal(checked, now)
        self._audit.record("order_submitted", now, intent=_intent_fields(checked))
        try:
            if self._store is not None:
                self._store.mark_sent(checked.client_order_id)
            order = await self._gateway.create_order(checked)
        except OrderRejected as e:
            if self._store is not None:
                self._store.mark_never_sent(checked.client_order_id, e.message)
            return self._reject_locally(checked, e.message, now)
        except BotError as e:
            log.error(
                "order_send_failed", **{**e.describe(), "client_order_id": checked.client_order_id}
            )
            self._notify("error", {"pair": checked.pair, "message": f"order failed: {e.message}"})
            raise
        if self._store is not None:
            self._store.acknowledge(order)
        self._track(order)
        if order.status is OrderStatus.REJECTED:
            self.rejections += 1
            self._notify("rejected", {"pair": order.pair, "reason": order.reason})
        log.info(
            "order_sent",
            pair=order.pair,
            side=str(order.side),
            qty=str(order.qty),
            client_order_id=order.client_order_id,
            status=str(order.status),
        )
        return order

    async def _send_exit(self, intent: OrderIntent, now: int) -> Order:
        order = await self._send(intent, now)
        if order.status is OrderStatus.REJECTED:
            position = self.portfolio.position(intent.pair)
            if position is not None and position.stop_price is not None:
                log.warning("exit_refused_restoring_stop", pair=intent.pair, reason=order.reason)
                await self.amend_stop(intent.pair, position.stop_price)
        return order

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
        order = Order(
            client_order_id=intent.client_order_id,
            pair=intent.pair,
            side=intent.side,
            type=intent.type,
            qty=intent.qty,
            status=OrderStatus.REJECTED,
            ts_created=now,
            ts_updated=now,
            price=intent.price,
            reason=reason,
        )
        self._audit.record("order_rejected", now, intent=_intent_fields(intent), reason=reason)
        log.warning("order_rejected", pair=intent.pair, reason=reason)
        self._notify("rejected", {"pair": intent.pair, "reason": reason})
        return order

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
        if known.status != order.status:
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
            self._store.update_order(self.orders[order.client_order_id])

    def has_fill(self, fill_id: str) -> bool:
        """Return True if the journal already holds this execution (False without one)."""
        return self._store is not None and self._store.has_fill(fill_id)

    async def on_fill(self, order: Order, fill: Fill) -> ClosedTrade | None:
        """Apply a fill (once, whichever source reports it first) and manage protection."""
        if self._store is not None and not self._store.record_fill(fill):
            return None
        self._track(order)
        if self._store is not None:
            self._store.update_order(self.orders.get(order.client_order_id, order))
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
            await self._cancel_protection(pair)
            if intent is not None and intent.type is OrderType.STOP_MARKET:
                self._notify("stop_hit", {"pair": pair, "price": str(fill.price)})
            return
        if (
            not self.protective_orders
            or intent is None
            or intent.reduce_only
            or order.status is not OrderStatus.FILLED
            or (intent.stop_loss is None and intent.take_profit is None)
        ):
            return
        position = self.portfolio.position(pair)
        if position is None:
            return
        await self._cancel_protection(pair)
        self._protective_base[pair] = intent.client_order_id
        exit_side = intent.side.opposite
        self.portfolio.set_protection(pair, stop=intent.stop_loss, take_profit=intent.take_profit)
        now = self._clock.now_ms()
        ids = []
        for kind, kwargs in (
            ("sl", {"type": OrderType.STOP_MARKET, "stop_price": intent.stop_loss}),
            ("tp", {"type": OrderType.LIMIT, "price": intent.take_profit}),
        ):
            level = kwargs.get("stop_price") or kwargs.get("price")
            if level is None:
                continue
            if kind == "tp" and self._market_for(pair).type is MarketType.SPOT:
                # Spot has no reduce-only: a resting take-profit sell would lock the same
                # coins as the stop, and Bybit refuses the second order. The stop stays on
                # the exchange (it protects a crashed bot); the take-profit is managed by
                # the engine (`managed_take_profit`) and exits at market when reached.
                continue
            protective = OrderIntent(
                pair=pair,
                side=exit_side,
                qty=position.qty,
                client_order_id=protective_id(intent.client_order_id, kind, 0),
                reason=f"{_KIND_NAMES[kind]} for {intent.client_order_id}",
                reduce_only=True,
                ts=now,
                **kwargs,  # type: ignore[arg-type]
            )
            placed = await self.submit(protective, last_price=fill.price)
            if placed.status is not OrderStatus.REJECTED:
                ids.append(placed.client_order_id)
        self._protective[pair] = ids

    async def _cancel_protection(self, pair: str) -> None:
        for cid in self._protective.pop(pair, []):
            order = self.orders.get(cid)
            if order is None or order.status.is_terminal:
                continue
            try:
                cancelled = await self._gateway.cancel_order(pair, client_order_id=cid)
                self._track(cancelled)
            except BotError as e:
                log.warning(
                    "protective_cancel_failed",
                    **{**e.describe(), "pair": pair, "client_order_id": cid},
                )

    async def amend_stop(self, pair: str, stop: Decimal) -> Order | None:
        """Move the pair's protective stop: cancel the working one, place the new level.

        Cancel first, then place: for a moment there is no stop, never two (two stops could
        both fill and flip the position).
        """
        position = self.portfolio.position(pair)
        if position is None:
            return None
        ids = self._protective.get(pair, [])
        old_id = next(
            (
                cid
                for cid in ids
                if self.orders.get(cid) and self.orders[cid].type is OrderType.STOP_MARKET
            ),
            None,
        )
        if old_id is not None:
            old = self.orders[old_id]
            if not old.status.is_terminal:
                try:
                    self._track(await self._gateway.cancel_order(pair, client_order_id=old_id))
                except BotError as e:
                    log.warning("stop_amend_cancel_failed", **{**e.describe(), "pair": pair})
                    return None
            ids = [cid for cid in ids if cid != old_id]
        now = self._clock.now_ms()
        intent = OrderIntent(
            pair=pair,
            side=Side.SELL if self.portfolio.signed_qty(pair) > 0 else Side.BUY,
            qty=position.qty,
            type=OrderType.STOP_MARKET,
            client_order_id=protective_id(
                self._protective_base.get(pair, f"k{now:x}"), "sl", self._next_amendment(now)
            ),
            reason=f"stop moved to {stop}",
            stop_price=stop,
            reduce_only=True,
            ts=now,
        )
        placed = await self.submit(intent, last_price=position.mark_price)
        if placed.status is not OrderStatus.REJECTED:
            ids.append(placed.client_order_id)
            self.portfolio.set_protection(pair, stop=stop)
        self._protective[pair] = ids
        return placed

    def _next_amendment(self, now: int) -> int:
        # Clock-based, so a restarted bot never reuses an amended stop's client id (the
        # journal refuses a duplicate id, rightly: it could be an order sent twice).
        self._amendments = max(self._amendments + 1, now)
        return self._amendments

    def managed_take_profit(self, pair: str) -> Decimal | None:
        """Return the take-profit the engine must watch itself (none on the exchange)."""
        position = self.portfolio.position(pair)
        if position is None or position.take_profit is None:
            return None
        for cid in self._protective.get(pair, []):
            order = self.orders.get(cid)
            if order is not None and order.type is OrderType.LIMIT and not order.status.is_terminal:
                return None  # a real take-profit order is working
        return position.take_profit

    async def cancel_all(self, pair: str | None = None) -> int:
        """Cancel every working order (optionally of one pair); return how many."""
        count = 0
        for order in await self._gateway.fetch_open_orders(pair):
            try:
                cancelled = await self._gateway.cancel_order(
                    order.pair, client_order_id=order.client_order_id
                )
                self._track(replace(cancelled))
                count += 1
            except BotError as e:
                log.warning("cancel_failed", client_order_id=order.client_order_id, **e.describe())
        return count

    # -- Start-up and crash recovery ---------------------------------------------------------

    async def reconcile(self, account: Any, store: Any, *, quote: str) -> str:
        """Merge the store's journal with the exchange's truth; return a report.

        The same path serves a clean start and a restart after a crash (STYLE rule 13):

        1. Orders journaled but never acknowledged are looked up by client order id and
           adopted when the exchange has them, else marked never-sent (so they are not
           resent, and not counted).
        2. Orders the store believes open are refreshed from the exchange.
        3. Our fills that happened while the bot was down are fetched and recorded (the
           store ignores ones it already has).
        4. Positions are rebuilt by replaying every recorded fill; cash is the exchange's
           balance of the quote currency. Protective orders still working are re-tracked.
        """
        adopted = never_sent = refreshed = 0
        for order in store.unacknowledged():
            found = await account.fetch_order(order.pair, client_order_id=order.client_order_id)
            if found is not None:
                store.adopt_order(found)
                self.orders[found.client_order_id] = found
                adopted += 1
            else:
                store.mark_never_sent(order.client_order_id, "not on the exchange at start-up")
                never_sent += 1
        for order in store.open_orders():
            fresh = await account.fetch_order(order.pair, client_order_id=order.client_order_id)
            if fresh is not None:
                store.update_order(fresh)
                self.orders[fresh.client_order_id] = fresh
                refreshed += 1
        known = {o.client_order_id: o for o in store.all_orders()}
        recorded = store.fills()
        since = _fills_since(known.values(), recorded)
        new_fills = 0
        for pair in sorted({o.pair for o in known.values()}):
            for fill in await account.fetch_my_trades(pair, since=since):
                if fill.client_order_id in known and store.record_fill(fill):
                    new_fills += 1
        rebuilt = Portfolio(self.portfolio.cash, quote=quote)
        for fill in sorted(store.fills(), key=lambda f: (f.ts, f.fill_id)):
            intent = store.get_intent(fill.client_order_id)
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
        for order in known.values():
            current = self.orders.get(order.client_order_id, order)
            # Recognised by our id scheme too: Bybit spot reports no reduce-only flag, and
            # a stop left untracked would fire after the bot's own exit (a double sell).
            protective = current.reduce_only or _is_protective(current.client_order_id)
            if protective and not current.status.is_terminal:
                self._protective.setdefault(current.pair, []).append(current.client_order_id)
                self.orders[current.client_order_id] = current
                if current.type is OrderType.STOP_MARKET and current.stop_price is not None:
                    # The working stop is the position's stop: trailing continues from it.
                    self.portfolio.set_protection(current.pair, stop=current.stop_price)
        for intent_order in known.values():
            cid = intent_order.client_order_id
            entry = not intent_order.reduce_only and not _is_protective(cid)
            if entry and self.portfolio.has_position(intent_order.pair):
                self._protective_base[intent_order.pair] = cid
        positions = self.portfolio.positions()
        lines = [
            f"orders adopted {adopted}, never sent {never_sent}, refreshed {refreshed}",
            f"fills recorded while down {new_fills}; {len(store.fills())} fills in the journal",
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

    def open_orders(self) -> list[Order]:
        """Return orders not yet in a terminal state."""
        return [o for o in self.orders.values() if not o.status.is_terminal]


_KIND_NAMES = {"sl": "stop-loss", "tp": "take-profit"}
_SKEW_MARGIN_MS = 60_000


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
    """Return the client id of a protective order: `<entry id>-<sl|tp><seq>`, <= 36 chars.

    The entry's id stays a prefix, so fills of stops and take-profits (and of every
    amended stop) trace back to the decision that opened the position.
    """
    suffix = f"-{kind}{seq:x}"
    return entry_id[: 36 - len(suffix)] + suffix


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
