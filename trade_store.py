"""The durable trade store: the order journal, fills, positions, trades, equity and state.

Any SQLAlchemy URL works: SQLite by default (`sqlite:///data/kestrel.sqlite`), PostgreSQL
(`postgresql+psycopg://...`) when several bots share one store. Every row carries a
`bot_id`, so bots sharing a database never see each other's orders, fills, positions,
trades, equity or state.

The journal protocol that makes "nothing lost, nothing sent twice" hold across crashes::

    journal(intent, ts)        journal_state=journaled  status=new   (BEFORE the request)
    mark_sent(cid)             journal_state=sent                    (request is leaving)
    acknowledge(order)         journal_state=acknowledged            (the exchange knows it)
    mark_never_sent(cid, why)  journal_state=never_sent  status=rejected  (recovery: unknown
                                                                         to the exchange)

On start, `unacknowledged()` lists the orders journaled or sent but never acknowledged; the
executor looks each up by client order id and either `acknowledge`s (adopts) it or
`mark_never_sent`s it. Any exchange report (`update_order`) also acknowledges the order,
since the private stream often answers before the REST call returns.

Durability: SQLite runs in WAL mode with `synchronous=FULL` by default. A committed row is
in the WAL file as soon as `journal()` returns, so it survives SIGKILL even with NORMAL;
FULL also fsyncs the WAL on every commit, so the journal survives power loss and kernel
panics too (an order we sent but "forgot" would be sent twice). It costs one fsync per
write, about 0.3 ms on an SSD. Pass `synchronous="NORMAL"` for throwaway stores (backtests).
Foreign keys are on; writers use `BEGIN IMMEDIATE` so two processes sharing one SQLite file
queue on the write lock (with a busy timeout) instead of failing mid-transaction.

Decimals are stored exactly: as unconstrained NUMERIC on PostgreSQL, as text on SQLite
(whose NUMERIC affinity would turn them into binary floats).

Threading and async: `TradeStore` is synchronous and thread-safe (one lock serialises its
operations inside a process; the database serialises processes). `AsyncTradeStore` wraps
it for the event loop: each call runs on one dedicated worker thread, in submission order,
with the caller's context variables, so the loop never blocks on disk or network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Final, Literal, ParamSpec, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Dialect, Engine, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeDecorator, TypeEngine

from error_handler import (
    BotError,
    ConfigError,
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
    Position,
    PositionSide,
    Side,
    TimeInForce,
    is_legal_transition,
)


if TYPE_CHECKING:
    from config import StorageSettings

P = ParamSpec("P")
T = TypeVar("T")
log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
DEFAULT_BOT_ID: Final = "default"
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
_SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
# Key of the PostgreSQL advisory lock that serialises schema creation between bots.
_PG_SCHEMA_LOCK: Final = 0x4B455354  # "KEST"
_COMPONENT: Final = "trade_store"


class JournalState(StrEnum):
    """Where an order stands between our journal and the exchange."""

    JOURNALED = "journaled"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    NEVER_SENT = "never_sent"


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

positions = sa.Table(
    "positions",
    metadata,
    _bot_id_column(),
    sa.Column("pair", sa.String(64), nullable=False),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("qty", ExactDecimal, nullable=False),
    sa.Column("entry_price", ExactDecimal, nullable=False),
    sa.Column("stop_price", ExactDecimal),
    sa.Column("take_profit", ExactDecimal),
    sa.Column("ts_opened", sa.BigInteger, nullable=False),
    sa.Column("fees_paid", ExactDecimal, nullable=False),
    sa.PrimaryKeyConstraint("bot_id", "pair"),
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

# Schema migrations: _MIGRATIONS[v] moves a store from version v to v + 1.
_MIGRATIONS: Final[dict[int, Callable[[Connection], None]]] = {}


def _json_dumps(value: Any) -> str:
    # NaN/Infinity are not JSON; PostgreSQL's json type would refuse them anyway.
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


# -- Row conversion --------------------------------------------------------------------------


def _order_from_row(row: Row[Any]) -> Order:
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


def _intent_from_row(row: Row[Any]) -> OrderIntent:
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


def _fill_from_row(row: Row[Any]) -> Fill:
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


def _position_from_row(row: Row[Any]) -> Position:
    return Position(
        pair=row.pair,
        side=PositionSide(row.side),
        qty=row.qty,
        entry_price=row.entry_price,
        ts_opened=row.ts_opened,
        stop_price=row.stop_price,
        take_profit=row.take_profit,
        fees_paid=row.fees_paid,
    )


def _closed_trade_from_row(row: Row[Any]) -> ClosedTrade:
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
    )


def _is_positive(value: Decimal) -> bool:
    # Ordering a NaN Decimal raises InvalidOperation, hence the finiteness check first.
    return value.is_finite() and value > 0


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
    if not (_is_positive(order.qty) and order.filled_qty.is_finite()) or not (
        Decimal(0) <= order.filled_qty <= order.qty
    ):
        raise InvariantError(
            f"filled qty {order.filled_qty} outside [0, {order.qty}]",
            component=_COMPONENT,
            pair=order.pair,
            order_id=order.client_order_id,
        )


# -- The store -------------------------------------------------------------------------------


class TradeStore:
    """The durable store of one bot's orders, fills, positions, trades, equity and state.

    Open it with `TradeStore.open(url)` (or `from_settings`); close it with `close()` or use
    it as a context manager. Every method is synchronous and thread-safe; use
    `AsyncTradeStore` from the event loop.
    """

    def __init__(self, engine: Engine, *, bot_id: str = DEFAULT_BOT_ID) -> None:
        if not bot_id or len(bot_id) > 64:
            raise ConfigError("bot_id must be 1 to 64 characters", component=_COMPONENT)
        self._engine = engine
        self._writer = engine.execution_options(kestrel_write=True)
        self._bot_id = bot_id
        # Named in every fatal store error, so the operator knows which file to look at.
        self._location = _location(engine.url)
        self._lock = threading.RLock()
        self._closed = False
        dialect = engine.dialect.name
        self._insert_module: Any = {"sqlite": sqlite_dialect, "postgresql": pg_dialect}.get(dialect)
        self._journal_stmt = orders.insert()

    # -- Lifecycle ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str,
        *,
        bot_id: str = DEFAULT_BOT_ID,
        schema: str | None = None,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 10.0,
        echo: bool = False,
    ) -> TradeStore:
        """Open (and create or migrate) the store at a SQLAlchemy URL.

        Args:
            url: Any SQLAlchemy URL; a SQLite file's directory is created if missing.
            bot_id: Namespace of this bot's rows when several bots share one database.
            schema: PostgreSQL schema to keep the tables in (created if missing).
            synchronous: SQLite `PRAGMA synchronous`; FULL survives power loss.
            busy_timeout_s: How long a SQLite writer waits for another process's lock.
            echo: Log every SQL statement (debugging).

        Raises:
            ConfigError: for a bad URL, a schema on SQLite or a bad `synchronous`.
            DataError: when the store was written by a newer, incompatible Kestrel.
            StoreCorruptError: when the file is damaged or not a database; it is left
                untouched (never recreated).
            StoreDiskError: when the disk is full or failing.
        """
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as e:
            raise ConfigError(f"invalid database URL: {e}", component=_COMPONENT) from e
        is_sqlite = parsed.get_backend_name() == "sqlite"
        if is_sqlite and schema is not None:
            raise ConfigError("schema is only supported on PostgreSQL", component=_COMPONENT)
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"bad synchronous {synchronous!r}", component=_COMPONENT)
        options: dict[str, Any] = {
            "echo": echo,
            "json_serializer": _json_dumps,
            "json_deserializer": json.loads,
        }
        if is_sqlite:
            _make_sqlite_dir(parsed.database)
            if parsed.database in (None, "", ":memory:"):
                # One shared connection, or each thread would see its own empty database.
                options["poolclass"] = sa.pool.StaticPool
                options["connect_args"] = {"check_same_thread": False}
        else:
            options["pool_pre_ping"] = True  # survive a database restart under a daemon
        engine = sa.create_engine(parsed, **options)
        if is_sqlite:
            _configure_sqlite(engine, synchronous, busy_timeout_s)
        if schema is not None:
            engine = engine.execution_options(schema_translate_map={None: schema})
        store = cls(engine, bot_id=bot_id)
        try:
            if is_sqlite and parsed.database not in (None, "", ":memory:"):
                store._check_integrity()
            store._setup_schema(schema)
        except BaseException:
            engine.dispose()
            raise
        log.info(
            "trade_store_opened",
            backend=engine.dialect.name,
            bot_id=bot_id,
            schema=schema,
            synchronous=synchronous if is_sqlite else None,
        )
        return store

    @classmethod
    def from_settings(cls, storage: StorageSettings, *, bot_id: str = DEFAULT_BOT_ID) -> TradeStore:
        """Open the store named by the storage settings (SQLite under data_dir by default)."""
        return cls.open(storage.effective_database_url, bot_id=bot_id)

    @property
    def bot_id(self) -> str:
        """Return the namespace of this store's rows."""
        return self._bot_id

    @property
    def backend(self) -> str:
        """Return the dialect name: 'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    def describe(self) -> dict[str, Any]:
        """Return the store's settings for start-up logs and health checks.

        On SQLite this reads the live connection's pragmas (journal mode, synchronous level,
        foreign keys), which are per connection and so cannot be read from the file.
        """
        out: dict[str, Any] = {"backend": self.backend, "bot_id": self._bot_id}
        with self._read() as conn:
            out["schema_version"] = conn.execute(
                sa.select(sa.func.max(schema_version.c.version))
            ).scalar()
            if self.backend == "sqlite":
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout"):
                    out[pragma] = conn.exec_driver_sql(f"PRAGMA {pragma}").scalar()
                out["synchronous"] = _SYNCHRONOUS_NAMES.get(out["synchronous"], out["synchronous"])
        return out

    def close(self) -> None:
        """Close every pooled connection; further calls raise."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.dispose()

    def __enter__(self) -> TradeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_integrity(self) -> None:
        # A damaged page deep in the file would otherwise surface only when an order touches
        # it, mid-trading. quick_check reads every page once: about 0.1 s per 100 MB.
        with self._read() as conn:
            problems = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreCorruptError(
                f"trade store {self._location} is corrupt ({'; '.join(problems)}); it was left "
                "untouched: restore it from a backup or move it aside",
                component=_COMPONENT,
                path=self._location,
            )

    def _setup_schema(self, schema: str | None) -> None:
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                # Bots starting together must not race on CREATE TABLE.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
                if schema is not None:
                    conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            metadata.create_all(conn)
            current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            if current is None:
                conn.execute(
                    schema_version.insert().values(version=SCHEMA_VERSION, ts_applied=_now_ms())
                )
                return
            if current > SCHEMA_VERSION:
                raise DataError(
                    f"trade store schema v{current} is newer than this Kestrel (v{SCHEMA_VERSION})",
                    component=_COMPONENT,
                )
            for version in range(current, SCHEMA_VERSION):
                migrate = _MIGRATIONS.get(version)
                if migrate is None:
                    raise DataError(f"no migration from schema v{version}", component=_COMPONENT)
                migrate(conn)
                conn.execute(
                    schema_version.insert().values(version=version + 1, ts_applied=_now_ms())
                )
                log.info("trade_store_migrated", to_version=version + 1)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._lock, _map_store_errors(self._location):
            self._check_open()
            with self._writer.begin() as conn:
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, _map_store_errors(self._location):
            self._check_open()
            with self._engine.connect() as conn:
                yield conn

    def _check_open(self) -> None:
        if self._closed:
            raise InvariantError("trade store is closed", component=_COMPONENT)

    def _mine(self, table: sa.Table) -> sa.ColumnElement[bool]:
        return table.c.bot_id == self._bot_id

    def _order_key(self, client_order_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(self._mine(orders), orders.c.client_order_id == client_order_id)

    # -- Order journal -----------------------------------------------------------------------

    def journal(self, intent: OrderIntent, ts: int) -> None:
        """Record an order under its client order id BEFORE it is sent.

        Raises:
            DuplicateOrderError: when the client order id is already journaled; the order
                must not be sent.
            InvariantError: for a non-positive quantity.
        """
        if not _is_positive(intent.qty):
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
        return None if row is None else _order_from_row(row)

    def get_intent(self, client_order_id: str) -> OrderIntent | None:
        """Return the intent an order was journaled from (for recovery), or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(orders).where(self._order_key(client_order_id))).first()
        return None if row is None else _intent_from_row(row)

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
            (_order_from_row(row), row.journal_state == JournalState.NEVER_SENT.value)
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
            return [_order_from_row(row) for row in conn.execute(query)]

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
        if not (_is_positive(fill.qty) and _is_positive(fill.price)):
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
            return [_fill_from_row(row) for row in rows]

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

    # -- Positions ---------------------------------------------------------------------------

    def upsert_position(self, position: Position) -> None:
        """Insert or replace the position on its pair (the mark price is not stored)."""
        values = {
            "bot_id": self._bot_id,
            "pair": position.pair,
            "side": str(position.side),
            "qty": position.qty,
            "entry_price": position.entry_price,
            "stop_price": position.stop_price,
            "take_profit": position.take_profit,
            "ts_opened": position.ts_opened,
            "fees_paid": position.fees_paid,
        }
        with self._write() as conn:
            self._upsert(conn, positions, values, ("bot_id", "pair"))

    def delete_position(self, pair: str) -> bool:
        """Remove the position on `pair`; return False if there was none."""
        with self._write() as conn:
            result = conn.execute(
                positions.delete().where(self._mine(positions), positions.c.pair == pair)
            )
        return bool(result.rowcount)

    def get_position(self, pair: str) -> Position | None:
        """Return the position on `pair`, or None."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(positions).where(self._mine(positions), positions.c.pair == pair)
            ).first()
        return None if row is None else _position_from_row(row)

    def positions(self) -> list[Position]:
        """Return the open positions, by pair."""
        query = sa.select(positions).where(self._mine(positions)).order_by(positions.c.pair)
        with self._read() as conn:
            return [_position_from_row(row) for row in conn.execute(query)]

    # -- Closed trades and equity ------------------------------------------------------------

    def add_closed_trade(self, trade: ClosedTrade) -> None:
        """Append a finished round trip."""
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
                )
            )

    def closed_trades(self, since: int | None = None) -> list[ClosedTrade]:
        """Return round trips by exit time, optionally those exiting from `since` on."""
        query = sa.select(closed_trades).where(self._mine(closed_trades))
        if since is not None:
            query = query.where(closed_trades.c.exit_ts >= since)
        query = query.order_by(closed_trades.c.exit_ts, closed_trades.c.id)
        with self._read() as conn:
            return [_closed_trade_from_row(row) for row in conn.execute(query)]

    def add_equity(self, ts: int, cash: Decimal, equity: Decimal) -> None:
        """Record an equity snapshot; a second one at the same `ts` replaces the first."""
        values = {"bot_id": self._bot_id, "ts": ts, "cash": cash, "equity": equity}
        with self._write() as conn:
            self._upsert(conn, equity_snapshots, values, ("bot_id", "ts"))

    def equity_curve(self, since: int | None = None) -> list[EquityPoint]:
        """Return equity snapshots in time order, optionally from `since` on."""
        table = equity_snapshots
        query = sa.select(table).where(self._mine(table))
        if since is not None:
            query = query.where(table.c.ts >= since)
        with self._read() as conn:
            rows = conn.execute(query.order_by(table.c.ts))
            return [EquityPoint(ts=r.ts, cash=r.cash, equity=r.equity) for r in rows]

    # -- Key/value state ---------------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON-able value (bot state, risk state, pair-list cache) under `key`.

        Raises:
            TypeError: for a value JSON cannot encode.
            ValueError: for NaN or infinite floats.
        """
        _json_dumps(value)  # fail before touching the database
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

    # -- Dialect helpers ---------------------------------------------------------------------

    def _upsert(
        self, conn: Connection, table: sa.Table, values: Mapping[str, Any], keys: tuple[str, ...]
    ) -> None:
        if self._insert_module is not None:
            stmt = self._insert_module.insert(table).values(**values)
            updates = {k: v for k, v in values.items() if k not in keys}
            conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))
            return
        match = sa.and_(*(table.c[k] == values[k] for k in keys))
        if not conn.execute(table.update().where(match).values(**values)).rowcount:
            conn.execute(table.insert().values(**values))

    def _insert_ignore(
        self, conn: Connection, table: sa.Table, values: Mapping[str, Any], keys: tuple[str, ...]
    ) -> bool:
        if self._insert_module is not None:
            # RETURNING, not rowcount: psycopg reports -1 for INSERT ... ON CONFLICT here.
            stmt = (
                self._insert_module.insert(table)
                .values(**values)
                .on_conflict_do_nothing(index_elements=list(keys))
                .returning(table.c[keys[-1]])
            )
            return conn.execute(stmt).first() is not None
        try:
            with conn.begin_nested():
                conn.execute(table.insert().values(**values))
        except IntegrityError:
            return False
        return True


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


# SQLite primary result codes (extended codes carry them in the low byte) and PostgreSQL
# SQLSTATEs that no retry can fix: https://sqlite.org/rescode.html,
# https://www.postgresql.org/docs/current/errcodes-appendix.html
_SQLITE_CORRUPT: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_SQLITE_DISK: Final = frozenset({10, 13})  # SQLITE_IOERR, SQLITE_FULL
_PG_CORRUPT: Final = frozenset({"XX001", "XX002"})  # data_corrupted, index_corrupted
_PG_DISK: Final = frozenset({"53100", "58030"})  # disk_full, io_error


def _location(url: sa.URL) -> str:
    # The file for SQLite, the URL without its password for a server.
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return str(Path(str(url.database)).expanduser().absolute())
    return url.render_as_string(hide_password=True)


def _fatal_store_error(location: str, e: sa.exc.DBAPIError) -> FatalError | None:
    code = getattr(e.orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    sqlstate = getattr(e.orig, "sqlstate", None)
    if primary in _SQLITE_CORRUPT or sqlstate in _PG_CORRUPT:
        return StoreCorruptError(
            f"trade store {location} is corrupt ({e.orig}); it was left untouched: restore it "
            "from a backup or move it aside",
            component=_COMPONENT,
            path=location,
        )
    if primary in _SQLITE_DISK or sqlstate in _PG_DISK:
        return StoreDiskError(
            f"trade store {location} cannot be written ({e.orig}): free disk space or check "
            "the disk, then restart",
            component=_COMPONENT,
            path=location,
        )
    return None


@contextlib.contextmanager
def _map_store_errors(location: str) -> Iterator[None]:
    # The one place database errors enter our tree. A damaged file or a full or failing disk
    # is fatal (a retry cannot fix it; trading must stop); a lost connection or a lock held
    # past the busy timeout is transient; whatever else the driver raises stays as it is.
    try:
        yield
    except sa.exc.DBAPIError as e:
        fatal = _fatal_store_error(location, e)
        if fatal is not None:
            raise fatal from e
        if isinstance(e, sa.exc.OperationalError | sa.exc.InterfaceError):
            raise StoreUnavailableError(
                f"trade store unavailable: {e.orig}", component=_COMPONENT
            ) from e
        raise
    except sa.exc.StatementError as e:
        # SQLAlchemy wraps what a bind processor raises (ExactDecimal's InvariantError).
        if isinstance(e.orig, BotError):
            raise e.orig from e
        raise


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _make_sqlite_dir(database: str | None) -> None:
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    # Switching a fresh file to WAL needs an exclusive lock and SQLite does not run the busy
    # handler for it: a second process opening the file at that moment gets "locked" at once.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _configure_sqlite(engine: Engine, synchronous: Synchronous, busy_timeout_s: float) -> None:
    # Take transaction control from the sqlite3 driver (SQLAlchemy's documented recipe) so
    # writers can say BEGIN IMMEDIATE and reads get a real snapshot.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        _enable_wal(cursor, busy_timeout_s)
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        is_write = conn.get_execution_options().get("kestrel_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if is_write else "BEGIN")


# -- Async façade ----------------------------------------------------------------------------


def _offload(
    method: Callable[Concatenate[TradeStore, P], T],
) -> Callable[Concatenate[AsyncTradeStore, P], Coroutine[Any, Any, T]]:
    async def run(self: AsyncTradeStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(method, self.sync, *args, **kwargs)

    # Not functools.wraps: mypy then loses the signature; name and docstring suffice.
    run.__name__ = method.__name__
    run.__qualname__ = f"AsyncTradeStore.{method.__name__}"
    run.__doc__ = method.__doc__
    return run


class AsyncTradeStore:
    """Run a `TradeStore` off the event loop, one call at a time, in submission order.

    A single worker thread keeps journal writes in the order they were awaited and copies
    the caller's context variables (structlog's bound context) into each call.
    """

    def __init__(self, store: TradeStore) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trade-store")

    @classmethod
    async def open(cls, url: str, **options: Any) -> AsyncTradeStore:
        """Open a `TradeStore` (see `TradeStore.open`) without blocking the loop."""
        store = await asyncio.to_thread(functools.partial(TradeStore.open, url, **options))
        return cls(store)

    @property
    def sync(self) -> TradeStore:
        """Return the wrapped synchronous store (for threads and shutdown paths)."""
        return self._store

    async def _call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        call = functools.partial(context.run, func, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the store and stop the worker thread."""
        await self._call(self._store.close)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncTradeStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Each method below runs its TradeStore namesake on the worker thread; same arguments,
    # same result, same docstring.
    journal = _offload(TradeStore.journal)
    mark_sent = _offload(TradeStore.mark_sent)
    acknowledge = _offload(TradeStore.acknowledge)
    update_order = _offload(TradeStore.update_order)
    mark_never_sent = _offload(TradeStore.mark_never_sent)
    adopt_order = _offload(TradeStore.adopt_order)
    get_order = _offload(TradeStore.get_order)
    get_intent = _offload(TradeStore.get_intent)
    journal_state = _offload(TradeStore.journal_state)
    open_orders = _offload(TradeStore.open_orders)
    unacknowledged = _offload(TradeStore.unacknowledged)
    all_orders = _offload(TradeStore.all_orders)
    record_fill = _offload(TradeStore.record_fill)
    has_fill = _offload(TradeStore.has_fill)
    fills = _offload(TradeStore.fills)
    fill_totals = _offload(TradeStore.fill_totals)
    upsert_position = _offload(TradeStore.upsert_position)
    delete_position = _offload(TradeStore.delete_position)
    get_position = _offload(TradeStore.get_position)
    positions = _offload(TradeStore.positions)
    add_closed_trade = _offload(TradeStore.add_closed_trade)
    closed_trades = _offload(TradeStore.closed_trades)
    add_equity = _offload(TradeStore.add_equity)
    equity_curve = _offload(TradeStore.equity_curve)
    set_state = _offload(TradeStore.set_state)
    get_state = _offload(TradeStore.get_state)
    delete_state = _offload(TradeStore.delete_state)
    describe = _offload(TradeStore.describe)
