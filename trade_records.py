"""Fills, closed trades, equity and key/value state of the trade store.

Part of `trade_store`: `TradeRecords` is mixed into `trade_store.TradeStore`. Fills are
recorded once each against their journaled order; the rest are plain per-bot tables.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from error_handler import (
    InvariantError,
)
from models import (
    ClosedTrade,
    Fill,
)
from trade_schema import (
    EquityPoint,
    FillTotals,
    StoreBase,
    closed_trade_from_row,
    closed_trades,
    equity_snapshots,
    fill_from_row,
    fills,
    is_positive,
    json_dumps,
    state,
)


__all__ = ["TradeRecords"]

log = structlog.get_logger("trade_store")
_COMPONENT: Final = "trade_store"


class TradeRecords(StoreBase):
    """The fills, closed trades, equity curve and key/value state of `TradeStore`."""

    # -- Fills -------------------------------------------------------------------------------

    def record_fill(self, fill: Fill) -> bool:
        """Record one execution exactly once, whichever source reports it first.

        Returns:
            True if new, False if this fill id was already recorded.

        Raises:
            InvariantError: for a fill of an unknown order, one whose pair or side differs
                from the order's, a non-positive price or quantity, or fills adding up to
                more than the order's quantity (double counting under different ids).
        """
        if not (is_positive(fill.qty) and is_positive(fill.price)):
            raise InvariantError(
                f"fill needs positive price and qty, got {fill.price} x {fill.qty}",
                component=_COMPONENT,
                pair=fill.pair,
                order_id=fill.client_order_id,
            )
        with self._write() as conn:
            order = self._locked_order(conn, fill.client_order_id)
            if (order.pair, order.side) != (fill.pair, str(fill.side)):
                raise InvariantError(
                    "fill does not match its order's pair and side",
                    component=_COMPONENT,
                    pair=fill.pair,
                    order_id=fill.client_order_id,
                    fill_id=fill.fill_id,
                )
            is_new = self._insert_ignore(
                conn, fills, self._fill_values(fill), ("bot_id", "fill_id")
            )
            if is_new:
                total = self._fill_totals(conn, fill.client_order_id).qty
                if total > order.qty:
                    raise InvariantError(
                        f"fills add up to {total}, more than the order's {order.qty}",
                        component=_COMPONENT,
                        pair=fill.pair,
                        order_id=fill.client_order_id,
                        fill_id=fill.fill_id,
                    )
        if not is_new:
            log.debug("fill_duplicate", fill_id=fill.fill_id, client_order_id=fill.client_order_id)
        return is_new

    def _fill_values(self, fill: Fill) -> dict[str, Any]:
        return {
            "bot_id": self._bot_id,
            "fill_id": fill.fill_id,
            "client_order_id": fill.client_order_id,
            "exchange_order_id": fill.exchange_order_id,
            "pair": fill.pair,
            "side": str(fill.side),
            "price": fill.price,
            "qty": fill.qty,
            "fee": fill.fee,
            "fee_currency": fill.fee_currency,
            "liquidity": str(fill.liquidity),
            "ts": fill.ts,
        }

    def has_fill(self, fill_id: str) -> bool:
        """Return True if the execution `fill_id` is recorded."""
        query = sa.select(fills.c.fill_id).where(self._mine(fills), fills.c.fill_id == fill_id)
        with self._read() as conn:
            return conn.execute(query).first() is not None

    def fills(self, client_order_id: str | None = None, since: int | None = None) -> list[Fill]:
        """Return recorded fills, oldest first, optionally of one order or from `since` on."""
        query = sa.select(fills).where(self._mine(fills))
        if client_order_id is not None:
            query = query.where(fills.c.client_order_id == client_order_id)
        if since is not None:
            query = query.where(fills.c.ts >= since)
        with self._read() as conn:
            rows = conn.execute(query.order_by(fills.c.ts, fills.c.fill_id))
            return [fill_from_row(row) for row in rows]

    def fill_totals(self, client_order_id: str) -> FillTotals:
        """Return the summed quantity, notional and fees of an order's recorded fills."""
        with self._read() as conn:
            return self._fill_totals(conn, client_order_id)

    def _fill_totals(self, conn: Connection, client_order_id: str) -> FillTotals:
        # Summed in Python: SQLite keeps these as text, and SQL SUM would go through floats.
        rows = conn.execute(
            sa.select(fills.c.qty, fills.c.price, fills.c.fee).where(
                self._mine(fills), fills.c.client_order_id == client_order_id
            )
        ).all()
        return FillTotals(
            qty=sum((r.qty for r in rows), Decimal(0)),
            notional=sum((r.qty * r.price for r in rows), Decimal(0)),
            fee=sum((r.fee for r in rows), Decimal(0)),
            count=len(rows),
        )

    # -- Closed trades and equity ------------------------------------------------------------

    def add_closed_trade(self, trade: ClosedTrade, *, equity_after: float | None = None) -> None:
        """Append a finished round trip (and the account or sleeve equity right after it)."""
        with self._write() as conn:
            conn.execute(
                closed_trades.insert().values(
                    bot_id=self._bot_id,
                    pair=trade.pair,
                    side=str(trade.side),
                    entry_ts=trade.entry_ts,
                    exit_ts=trade.exit_ts,
                    entry_price=trade.entry_price,
                    exit_price=trade.exit_price,
                    qty=trade.qty,
                    fee=trade.fee,
                    pnl=trade.pnl,
                    reason=trade.reason,
                    strategy=trade.strategy,
                    funding=trade.funding,
                    stop_price=trade.stop_price,
                    adds_at_loss=trade.adds_at_loss,
                    equity_after=equity_after,
                )
            )

    def closed_trades(self, since: int | None = None) -> list[ClosedTrade]:
        """Return round trips by exit time, optionally those exiting from `since` on."""
        return [trade for trade, _ in self.trade_history(since)]

    def trade_history(self, since: int | None = None) -> list[tuple[ClosedTrade, float | None]]:
        """Return round trips by exit time with the equity recorded after each (or None)."""
        query = sa.select(closed_trades).where(self._mine(closed_trades))
        if since is not None:
            query = query.where(closed_trades.c.exit_ts >= since)
        query = query.order_by(closed_trades.c.exit_ts, closed_trades.c.id)
        with self._read() as conn:
            return [(closed_trade_from_row(row), row.equity_after) for row in conn.execute(query)]

    def add_equity(self, ts: int, cash: Decimal, equity: Decimal) -> None:
        """Record an equity snapshot; a second one at the same `ts` replaces the first."""
        values = {"bot_id": self._bot_id, "ts": ts, "cash": cash, "equity": equity}
        with self._write() as conn:
            self._upsert(conn, equity_snapshots, values, ("bot_id", "ts"))

    def equity_curve(
        self, since: int | None = None, *, last: int | None = None
    ) -> list[EquityPoint]:
        """Return equity snapshots in time order, optionally from `since` on.

        Args:
            since: The earliest time (ms UTC) to return; None: from the first snapshot.
            last: Return only the newest `last` snapshots (still oldest first).
        """
        table = equity_snapshots
        query = sa.select(table).where(self._mine(table))
        if since is not None:
            query = query.where(table.c.ts >= since)
        if last is not None:
            query = query.order_by(table.c.ts.desc()).limit(last)
        else:
            query = query.order_by(table.c.ts)
        with self._read() as conn:
            points = [
                EquityPoint(ts=r.ts, cash=r.cash, equity=r.equity) for r in conn.execute(query)
            ]
        return points[::-1] if last is not None else points

    # -- Key/value state ---------------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON-able value (bot state, risk state, pair-list cache) under `key`.

        Raises:
            TypeError: for a value JSON cannot encode.
            ValueError: for NaN or infinite floats.
        """
        json_dumps(value)  # fail before touching the database
        with self._write() as conn:
            self._upsert(
                conn, state, {"bot_id": self._bot_id, "key": key, "value": value}, ("bot_id", "key")
            )

    def get_state(self, key: str, default: Any = None) -> Any:
        """Return the value stored under `key`, or `default`."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(state.c.value).where(self._mine(state), state.c.key == key)
            ).first()
        return default if row is None else row.value

    def delete_state(self, key: str) -> bool:
        """Remove `key`; return False if it was not set."""
        with self._write() as conn:
            result = conn.execute(state.delete().where(self._mine(state), state.c.key == key))
        return bool(result.rowcount)
