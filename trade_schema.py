"""The trade store's types and schema (part of `trade_store`, which re-exports them).

The journal states, the store's errors and result types, the tables (with `ExactDecimal`,
which keeps Decimals exact on every backend), and the conversions from rows to `models`
types. `StoreBase` declares, for the type checker only, what the store's parts
(`trade_journal`, `trade_records`) use and `trade_store.TradeStore` provides.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Row
from sqlalchemy.types import TypeDecorator, TypeEngine

from error_handler import (
    DataError,
    FatalError,
    InvariantError,
    RecoverableError,
)
from models import (
    ClosedTrade,
    Fill,
    Liquidity,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    PositionSide,
    Side,
    TimeInForce,
)


__all__ = [
    "DEFAULT_BOT_ID",
    "SCHEMA_VERSION",
    "DuplicateOrderError",
    "EquityPoint",
    "ExactDecimal",
    "FillTotals",
    "JournalState",
    "StoreBase",
    "StoreCorruptError",
    "StoreDiskError",
    "StoreUnavailableError",
    "metadata",
    "schema_version",
]

SCHEMA_VERSION: Final = 3
DEFAULT_BOT_ID: Final = "default"
_COMPONENT: Final = "trade_store"


class JournalState(StrEnum):
    """Where an order stands between our journal and the exchange."""

    JOURNALED = "journaled"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    NEVER_SENT = "never_sent"


class DuplicateOrderError(InvariantError):
    """A client order id was journaled twice: the second order must never be sent."""


class StoreUnavailableError(RecoverableError):
    """The database is unreachable or locked: nothing was written; retry later.

    A failed `journal()` means the order must not be sent yet. On PostgreSQL a connection
    lost during COMMIT leaves the outcome unknown: a retried journal may then raise
    `DuplicateOrderError`, and `journal_state()` tells whether the first attempt landed.
    """


class StoreCorruptError(DataError):
    """The database file is damaged or is not a database: stop, never overwrite it.

    The message names the file; it is left exactly as found, for the operator to restore
    from a backup or move aside.
    """


class StoreDiskError(FatalError):
    """The disk under the store is full or failing: the write did not happen.

    An order whose journal write fails this way is never sent; trading stops through the
    fail-safe, since every later write would fail the same way.
    """


@dataclass(frozen=True, slots=True)
class FillTotals:
    """The sum of an order's recorded fills."""

    qty: Decimal
    notional: Decimal
    fee: Decimal
    count: int

    @property
    def avg_price(self) -> Decimal | None:
        """Return the volume-weighted fill price, or None without fills."""
        return self.notional / self.qty if self.qty else None


@dataclass(frozen=True, slots=True)
class EquityPoint:
    """One equity snapshot."""

    ts: int
    cash: Decimal
    equity: Decimal


# -- Schema ----------------------------------------------------------------------------------


class ExactDecimal(TypeDecorator[Decimal]):
    """A Decimal column that round-trips exactly: NUMERIC on PostgreSQL, text elsewhere."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Pick NUMERIC (no precision limit) on PostgreSQL and TEXT elsewhere."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.Numeric(asdecimal=True))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        """Refuse anything but a finite Decimal; stringify it unless the column is NUMERIC."""
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise InvariantError(f"expected a finite Decimal, got {value!r}", component=_COMPONENT)
        return value if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        """Return the stored value as a Decimal."""
        if value is None or isinstance(value, Decimal):
            return value
        return Decimal(str(value))


metadata = sa.MetaData()


def _bot_id_column() -> sa.Column[str]:
    return sa.Column("bot_id", sa.String(64), nullable=False, default=DEFAULT_BOT_ID)


schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("ts_applied", sa.BigInteger, nullable=False),
)

orders = sa.Table(
    "orders",
    metadata,
    _bot_id_column(),
    sa.Column("client_order_id", sa.String(64), nullable=False),
    sa.Column("exchange_order_id", sa.String(128)),
    sa.Column("pair", sa.String(64), nullable=False),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("time_in_force", sa.String(16), nullable=False),
    sa.Column("qty", ExactDecimal, nullable=False),
    sa.Column("price", ExactDecimal),
    sa.Column("stop_price", ExactDecimal),
    # The intent's protective levels and leverage, so recovery can rebuild the intent.
    sa.Column("stop_loss", ExactDecimal),
    sa.Column("take_profit", ExactDecimal),
    sa.Column("leverage", ExactDecimal),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("filled_qty", ExactDecimal, nullable=False),
    sa.Column("avg_fill_price", ExactDecimal),
    sa.Column("fee", ExactDecimal, nullable=False),
    sa.Column("reduce_only", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("journal_state", sa.String(16), nullable=False),
    sa.Column("journal_note", sa.Text, nullable=False, default=""),
    sa.Column("ts_created", sa.BigInteger, nullable=False),
    sa.Column("ts_updated", sa.BigInteger, nullable=False),
    # ts_updated of the last applied exchange report: staleness is judged against the
    # exchange's own clock only, never against our journal time (clocks are skewed).
    sa.Column("ts_exchange", sa.BigInteger),
    sa.PrimaryKeyConstraint("bot_id", "client_order_id"),
    sa.Index("ix_orders_journal_state", "bot_id", "journal_state"),
    sa.Index("ix_orders_status", "bot_id", "status"),
)

fills = sa.Table(
    "fills",
    metadata,
    _bot_id_column(),
    sa.Column("fill_id", sa.String(128), nullable=False),
    sa.Column("client_order_id", sa.String(64), nullable=False),
    sa.Column("exchange_order_id", sa.String(128)),
    sa.Column("pair", sa.String(64), nullable=False),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("price", ExactDecimal, nullable=False),
    sa.Column("qty", ExactDecimal, nullable=False),
    sa.Column("fee", ExactDecimal, nullable=False),
    sa.Column("fee_currency", sa.String(32), nullable=False),
    sa.Column("liquidity", sa.String(8), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("bot_id", "fill_id"),
    sa.ForeignKeyConstraint(
        ["bot_id", "client_order_id"], ["orders.bot_id", "orders.client_order_id"]
    ),
    sa.Index("ix_fills_order", "bot_id", "client_order_id"),
    sa.Index("ix_fills_ts", "bot_id", "ts"),
)

closed_trades = sa.Table(
    "closed_trades",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _bot_id_column(),
    sa.Column("pair", sa.String(64), nullable=False),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("entry_ts", sa.BigInteger, nullable=False),
    sa.Column("exit_ts", sa.BigInteger, nullable=False),
    sa.Column("entry_price", sa.Double, nullable=False),
    sa.Column("exit_price", sa.Double, nullable=False),
    sa.Column("qty", sa.Double, nullable=False),
    sa.Column("fee", sa.Double, nullable=False),
    sa.Column("pnl", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    # v2: what the score and the multi-strategy books need to be rebuilt after a restart.
    sa.Column("strategy", sa.String(64), nullable=False, server_default=""),
    sa.Column("funding", sa.Double, nullable=False, server_default="0"),
    sa.Column("stop_price", sa.Double, nullable=True),
    sa.Column("adds_at_loss", sa.Integer, nullable=False, server_default="0"),
    # The account (or sleeve) equity right after the trade, as the score's book saw it.
    sa.Column("equity_after", sa.Double, nullable=True),
    sa.Index("ix_closed_trades_exit", "bot_id", "exit_ts"),
)

equity_snapshots = sa.Table(
    "equity_snapshots",
    metadata,
    _bot_id_column(),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("cash", ExactDecimal, nullable=False),
    sa.Column("equity", ExactDecimal, nullable=False),
    sa.PrimaryKeyConstraint("bot_id", "ts"),
)

state = sa.Table(
    "state",
    metadata,
    _bot_id_column(),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("value", sa.JSON(none_as_null=False), nullable=False),
    sa.PrimaryKeyConstraint("bot_id", "key"),
)


def _table_name(conn: Connection, name: str) -> str:
    # The quoted table name for raw DDL, in the store's PostgreSQL schema when it has one.
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    table = conn.dialect.identifier_preparer.quote(name)
    if schema:
        table = f"{conn.dialect.identifier_preparer.quote_schema(schema)}.{table}"
    return table


def _v1_to_v2(conn: Connection) -> None:
    # Closed trades keep their strategy, funding, entry stop, adds at a loss and the equity
    # after them.
    table = _table_name(conn, closed_trades.name)
    for column in (
        "strategy VARCHAR(64) NOT NULL DEFAULT ''",
        "funding DOUBLE PRECISION NOT NULL DEFAULT 0",
        "stop_price DOUBLE PRECISION",
        "adds_at_loss INTEGER NOT NULL DEFAULT 0",
        "equity_after DOUBLE PRECISION",
    ):
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column}"))


def _v2_to_v3(conn: Connection) -> None:
    # The positions table goes: live positions are the exchange's, reconciled from it and
    # the journaled fills at every start, and nothing ever read the stored copy back.
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {_table_name(conn, 'positions')}"))


# Schema migrations: MIGRATIONS[v] moves a store from version v to v + 1.
MIGRATIONS: Final[dict[int, Callable[[Connection], None]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def json_dumps(value: Any) -> str:
    # NaN/Infinity are not JSON; PostgreSQL's json type would refuse them anyway.
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


# -- Row conversion --------------------------------------------------------------------------


def order_from_row(row: Row[Any]) -> Order:
    return Order(
        client_order_id=row.client_order_id,
        pair=row.pair,
        side=Side(row.side),
        type=OrderType(row.type),
        qty=row.qty,
        status=OrderStatus(row.status),
        ts_created=row.ts_created,
        ts_updated=row.ts_updated,
        exchange_order_id=row.exchange_order_id,
        price=row.price,
        stop_price=row.stop_price,
        filled_qty=row.filled_qty,
        avg_fill_price=row.avg_fill_price,
        fee=row.fee,
        reduce_only=bool(row.reduce_only),
        time_in_force=TimeInForce(row.time_in_force),
        reason=row.reason,
    )


def intent_from_row(row: Row[Any]) -> OrderIntent:
    return OrderIntent(
        pair=row.pair,
        side=Side(row.side),
        qty=row.qty,
        type=OrderType(row.type),
        client_order_id=row.client_order_id,
        reason=row.reason,
        price=row.price,
        stop_price=row.stop_price,
        stop_loss=row.stop_loss,
        take_profit=row.take_profit,
        reduce_only=bool(row.reduce_only),
        time_in_force=TimeInForce(row.time_in_force),
        leverage=row.leverage,
        ts=row.ts_created,
    )


def fill_from_row(row: Row[Any]) -> Fill:
    return Fill(
        client_order_id=row.client_order_id,
        pair=row.pair,
        side=Side(row.side),
        price=row.price,
        qty=row.qty,
        fee=row.fee,
        fee_currency=row.fee_currency,
        liquidity=Liquidity(row.liquidity),
        ts=row.ts,
        fill_id=row.fill_id,
        exchange_order_id=row.exchange_order_id,
    )


def closed_trade_from_row(row: Row[Any]) -> ClosedTrade:
    return ClosedTrade(
        pair=row.pair,
        side=PositionSide(row.side),
        entry_ts=row.entry_ts,
        exit_ts=row.exit_ts,
        entry_price=row.entry_price,
        exit_price=row.exit_price,
        qty=row.qty,
        fee=row.fee,
        pnl=row.pnl,
        reason=row.reason,
        stop_price=row.stop_price,
        adds_at_loss=row.adds_at_loss,
        strategy=row.strategy,
        funding=row.funding,
    )


def is_positive(value: Decimal) -> bool:
    # Ordering a NaN Decimal raises InvalidOperation, hence the finiteness check first.
    return value.is_finite() and value > 0


class StoreBase:
    """The host side of `TradeStore`'s parts: declared here, implemented by `TradeStore`."""

    _bot_id: str
    _journal_stmt: Any

    if TYPE_CHECKING:

        def _write(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _read(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _mine(self, table: sa.Table) -> sa.ColumnElement[bool]: ...

        def _order_key(self, client_order_id: str) -> sa.ColumnElement[bool]: ...

        def _locked_order(self, conn: Connection, client_order_id: str) -> Row[Any]: ...

        def _fill_totals(self, conn: Connection, client_order_id: str) -> FillTotals: ...

        def _upsert(
            self,
            conn: Connection,
            table: sa.Table,
            values: Mapping[str, Any],
            keys: tuple[str, ...],
        ) -> None: ...

        def _insert_ignore(
            self,
            conn: Connection,
            table: sa.Table,
            values: Mapping[str, Any],
            keys: tuple[str, ...],
        ) -> bool: ...
