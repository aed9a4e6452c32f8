"""The order journal of the trade store (part of `trade_store`).

`OrderJournal` is mixed into `trade_store.TradeStore`: it records an order before it is
sent, follows it through sent and acknowledged (or never sent), applies exchange reports
(never a stale one), and answers queries about orders and their attempts.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from error_handler import (
    InvariantError,
)
from models import (
    Order,
    OrderIntent,
    OrderStatus,
    is_legal_transition,
)
from trade_schema import (
    DuplicateOrderError,
    JournalState,
    StoreBase,
    intent_from_row,
    is_positive,
    order_from_row,
    orders,
)


__all__ = ["OrderJournal"]

log = structlog.get_logger("trade_store")
_COMPONENT: Final = "trade_store"
_PENDING: Final = (JournalState.JOURNALED.value, JournalState.SENT.value)
_LIVE_STATUSES: Final = tuple(s.value for s in OrderStatus if not s.is_terminal)
# How far along an order is; used to spot a stale report carrying the same timestamp.
_RANK: Final[dict[OrderStatus, int]] = {
    OrderStatus.NEW: 0,
    OrderStatus.OPEN: 1,
    OrderStatus.PARTIALLY_FILLED: 2,
    OrderStatus.FILLED: 3,
    OrderStatus.CANCELLED: 3,
    OrderStatus.REJECTED: 3,
    OrderStatus.EXPIRED: 3,
}


def _is_stale(row: Row[Any], order: Order) -> bool:
    # REST answers and stream events arrive in any order: keep whichever saw more.
    if order.filled_qty < row.filled_qty:
        return True
    if row.ts_exchange is None:
        return False
    if order.ts_updated != row.ts_exchange:
        return bool(order.ts_updated < row.ts_exchange)
    return _RANK[order.status] < _RANK[OrderStatus(row.status)]


def _check_report(row: Row[Any], order: Order) -> None:
    if (order.pair, str(order.side)) != (row.pair, row.side):
        raise InvariantError(
            "exchange report does not match the journaled order",
            component=_COMPONENT,
            pair=order.pair,
            order_id=order.client_order_id,
            journaled_pair=row.pair,
            journaled_side=row.side,
        )
    if not (is_positive(order.qty) and order.filled_qty.is_finite()) or not (
        Decimal(0) <= order.filled_qty <= order.qty
    ):
        raise InvariantError(
            f"filled qty {order.filled_qty} outside [0, {order.qty}]",
            component=_COMPONENT,
            pair=order.pair,
            order_id=order.client_order_id,
        )


def _report_values(row: Row[Any], order: Order) -> dict[str, Any]:
    return {
        "status": str(order.status),
        "qty": order.qty,
        "price": order.price if order.price is not None else row.price,
        "stop_price": order.stop_price if order.stop_price is not None else row.stop_price,
        "filled_qty": order.filled_qty,
        "avg_fill_price": (
            order.avg_fill_price if order.avg_fill_price is not None else row.avg_fill_price
        ),
        "fee": order.fee,
        "ts_updated": order.ts_updated,
        "ts_exchange": order.ts_updated,
    }


class OrderJournal(StoreBase):
    """The order journal and order queries of `TradeStore`."""

    def journal(self, intent: OrderIntent, ts: int) -> None:
        """Record an order under its client order id BEFORE it is sent.

        Raises:
            DuplicateOrderError: when the client order id is already journaled; the order
                must not be sent.
            InvariantError: for a non-positive quantity.
        """
        if not is_positive(intent.qty):
            raise InvariantError(
                f"order qty must be positive, got {intent.qty}",
                component=_COMPONENT,
                pair=intent.pair,
                order_id=intent.client_order_id,
            )
        params = {
            "bot_id": self._bot_id,
            "client_order_id": intent.client_order_id,
            "exchange_order_id": None,
            "pair": intent.pair,
            "side": str(intent.side),
            "type": str(intent.type),
            "time_in_force": str(intent.time_in_force),
            "qty": intent.qty,
            "price": intent.price,
            "stop_price": intent.stop_price,
            "stop_loss": intent.stop_loss,
            "take_profit": intent.take_profit,
            "leverage": intent.leverage,
            "status": OrderStatus.NEW.value,
            "filled_qty": Decimal(0),
            "avg_fill_price": None,
            "fee": Decimal(0),
            "reduce_only": intent.reduce_only,
            "reason": intent.reason,
            "journal_state": JournalState.JOURNALED.value,
            "journal_note": "",
            "ts_created": ts,
            "ts_updated": ts,
            "ts_exchange": None,
        }
        try:
            with self._write() as conn:
                conn.execute(self._journal_stmt, params)
        except IntegrityError as e:
            raise DuplicateOrderError(
                "client order id already journaled; refusing to send it twice",
                component=_COMPONENT,
                pair=intent.pair,
                order_id=intent.client_order_id,
            ) from e
        log.debug("order_journaled", client_order_id=intent.client_order_id, pair=intent.pair)

    def mark_sent(self, client_order_id: str) -> None:
        """Record that the create request is leaving; a no-op once acknowledged.

        Raises:
            InvariantError: for an unknown order or one marked never-sent.
        """
        with self._write() as conn:
            row = self._locked_order(conn, client_order_id)
            current = JournalState(row.journal_state)
            if current is JournalState.NEVER_SENT:
                raise InvariantError(
                    "sending an order already marked never-sent",
                    component=_COMPONENT,
                    order_id=client_order_id,
                )
            if current is JournalState.JOURNALED:
                conn.execute(
                    orders.update()
                    .where(self._order_key(client_order_id))
                    .values(journal_state=JournalState.SENT.value)
                )

    def acknowledge(self, order: Order) -> bool:
        """Record the exchange's answer to the create request (or its recovery lookup).

        Sets the exchange order id and applies the reported status like `update_order`.

        Returns:
            False when the report was older than what the store already holds.

        Raises:
            InvariantError: for an unknown or never-sent order or an illegal transition.
        """
        return self._apply_report(order, op="acknowledge")

    def update_order(self, order: Order) -> bool:
        """Apply an exchange report (REST answer or stream event) to a journaled order.

        Reports may arrive in any order: one with an older `ts_updated` than the last
        applied report, a lower filled quantity, or the same timestamp but an earlier
        status is stale and ignored. A repeated terminal status refreshes the figures.
        Any report also acknowledges the order: the exchange evidently has it.

        Returns:
            True if applied, False if ignored as stale.

        Raises:
            InvariantError: for an unknown or never-sent order, a report that does not match
                the journaled pair and side, a filled quantity outside [0, qty], or a
                transition `models.is_legal_transition` forbids.
        """
        return self._apply_report(order, op="update")

    def _apply_report(self, order: Order, *, op: str) -> bool:
        with self._write() as conn:
            row = self._locked_order(conn, order.client_order_id)
            if row.journal_state == JournalState.NEVER_SENT.value:
                raise InvariantError(
                    "the exchange reports an order marked never-sent",
                    component=_COMPONENT,
                    pair=order.pair,
                    order_id=order.client_order_id,
                    op=op,
                )
            _check_report(row, order)
            old = OrderStatus(row.status)
            stale = _is_stale(row, order)
            if not stale and order.status != old and not is_legal_transition(old, order.status):
                raise InvariantError(
                    f"illegal order transition {old} -> {order.status}",
                    component=_COMPONENT,
                    pair=order.pair,
                    order_id=order.client_order_id,
                )
            values: dict[str, Any] = {
                "journal_state": JournalState.ACKNOWLEDGED.value,
                "exchange_order_id": order.exchange_order_id or row.exchange_order_id,
            }
            if not stale:
                values.update(_report_values(row, order))
            conn.execute(
                orders.update().where(self._order_key(order.client_order_id)).values(values)
            )
        if stale:
            log.debug("order_report_stale", client_order_id=order.client_order_id, op=op)
        elif order.status != old:
            log.info(
                "order_state_changed",
                client_order_id=order.client_order_id,
                pair=order.pair,
                **{"from": str(old), "to": str(order.status)},
            )
        return not stale

    def mark_never_sent(self, client_order_id: str, reason: str) -> None:
        """Close a journaled order the exchange never received (status becomes rejected).

        Raises:
            InvariantError: for an unknown order or one the exchange acknowledged.
        """
        with self._write() as conn:
            row = self._locked_order(conn, client_order_id)
            current = JournalState(row.journal_state)
            if current is JournalState.NEVER_SENT:
                return
            if current is JournalState.ACKNOWLEDGED:
                raise InvariantError(
                    "cannot mark an acknowledged order never-sent",
                    component=_COMPONENT,
                    order_id=client_order_id,
                )
            conn.execute(
                orders.update()
                .where(self._order_key(client_order_id))
                .values(
                    journal_state=JournalState.NEVER_SENT.value,
                    journal_note=reason,
                    status=OrderStatus.REJECTED.value,
                )
            )
        log.info("order_never_sent", client_order_id=client_order_id, reason=reason)

    def adopt_order(self, order: Order) -> bool:
        """Store an order found on the exchange that this store never journaled.

        Returns:
            True if inserted; False if it was already known (the report is then applied as
            by `update_order`).
        """
        with self._write() as conn:
            known = conn.execute(
                sa.select(orders.c.client_order_id).where(self._order_key(order.client_order_id))
            ).first()
            if known is None:
                conn.execute(orders.insert().values(self._adopted_values(order)))
                log.info("order_adopted", client_order_id=order.client_order_id, pair=order.pair)
                return True
        self.update_order(order)
        return False

    def _adopted_values(self, order: Order) -> dict[str, Any]:
        return {
            "bot_id": self._bot_id,
            "client_order_id": order.client_order_id,
            "exchange_order_id": order.exchange_order_id,
            "pair": order.pair,
            "side": str(order.side),
            "type": str(order.type),
            "time_in_force": str(order.time_in_force),
            "qty": order.qty,
            "price": order.price,
            "stop_price": order.stop_price,
            "status": str(order.status),
            "filled_qty": order.filled_qty,
            "avg_fill_price": order.avg_fill_price,
            "fee": order.fee,
            "reduce_only": order.reduce_only,
            "reason": order.reason,
            "journal_state": JournalState.ACKNOWLEDGED.value,
            "journal_note": "adopted",
            "ts_created": order.ts_created,
            "ts_updated": order.ts_updated,
            "ts_exchange": order.ts_updated,
        }

    def _locked_order(self, conn: Connection, client_order_id: str) -> Row[Any]:
        # FOR UPDATE on PostgreSQL; SQLite already holds the write lock (BEGIN IMMEDIATE).
        row = conn.execute(
            sa.select(orders).where(self._order_key(client_order_id)).with_for_update()
        ).first()
        if row is None:
            raise InvariantError(
                "order not in the journal", component=_COMPONENT, order_id=client_order_id
            )
        return row

    # -- Order queries -----------------------------------------------------------------------

    def get_order(self, client_order_id: str) -> Order | None:
        """Return the stored order, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(orders).where(self._order_key(client_order_id))).first()
        return None if row is None else order_from_row(row)

    def get_intent(self, client_order_id: str) -> OrderIntent | None:
        """Return the intent an order was journaled from (for recovery), or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(orders).where(self._order_key(client_order_id))).first()
        return None if row is None else intent_from_row(row)

    def journal_state(self, client_order_id: str) -> JournalState | None:
        """Return where an order stands in the journal protocol, or None if unknown."""
        with self._read() as conn:
            value = conn.execute(
                sa.select(orders.c.journal_state).where(self._order_key(client_order_id))
            ).scalar()
        return None if value is None else JournalState(value)

    def open_orders(self) -> list[Order]:
        """Return orders that may still rest or fill (new, open, partially filled)."""
        return self._orders(orders.c.status.in_(_LIVE_STATUSES))

    def unacknowledged(self) -> list[Order]:
        """Return orders journaled or sent but never acknowledged: recover them on start."""
        return self._orders(orders.c.journal_state.in_(_PENDING))

    def all_orders(self) -> list[Order]:
        """Return every order of this bot, oldest first."""
        return self._orders(sa.true())

    def attempts(self, key: str) -> list[tuple[Order, bool]]:
        """Return each journaled attempt `<key>_<n>` of one decision, oldest first.

        Each comes with True when it provably never reached the exchange (never-sent):
        the executor sends a next attempt only when every earlier one is such.
        """
        condition = orders.c.client_order_id.startswith(f"{key}_", autoescape=True)
        query = (
            sa.select(orders)
            .where(self._mine(orders), condition)
            .order_by(orders.c.ts_created, orders.c.client_order_id)
        )
        with self._read() as conn:
            rows = list(conn.execute(query))
        # The prefix also matches longer keys (a stop's id starts with its entry's id).
        return [
            (order_from_row(row), row.journal_state == JournalState.NEVER_SENT.value)
            for row in rows
            if row.client_order_id.rpartition("_")[0] == key
        ]

    def _orders(self, condition: sa.ColumnElement[bool]) -> list[Order]:
        query = (
            sa.select(orders)
            .where(self._mine(orders), condition)
            .order_by(orders.c.ts_created, orders.c.client_order_id)
        )
        with self._read() as conn:
            return [order_from_row(row) for row in conn.execute(query)]
