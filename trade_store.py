"""The durable trade store: the order journal, fills, closed trades, equity and state.

Any SQLAlchemy URL works: SQLite by default (`sqlite:///data/kestrel.sqlite`), PostgreSQL
(`postgresql+psycopg://...`) when several bots share one store. Every row carries a
`bot_id`, so bots sharing a database never see each other's orders, fills, trades,
equity or state. Positions are not stored: they are the exchange's, reconciled from it and
the journaled fills at every start. The equity history is: the live snapshot task records
the account's equity at a fixed interval, and the views show it again after a restart.

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
operations inside a process; the database serialises processes). The live executor calls
it from one dedicated journal thread (`utils.SerialWorker`), in submission order, so the
event loop never blocks on disk or network I/O.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from error_handler import BotError, ConfigError, DataError, FatalError, InvariantError
from trade_journal import OrderJournal
from trade_records import TradeRecords
from trade_schema import (
    DEFAULT_BOT_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    DuplicateOrderError,
    EquityPoint,
    ExactDecimal,
    FillTotals,
    JournalState,
    StoreCorruptError,
    StoreDiskError,
    StoreUnavailableError,
    json_dumps,
    metadata,
    orders,
    schema_version,
)


if TYPE_CHECKING:
    from config import StorageSettings

__all__ = [
    "DEFAULT_BOT_ID",
    "SCHEMA_VERSION",
    "DuplicateOrderError",
    "EquityPoint",
    "ExactDecimal",
    "FillTotals",
    "JournalState",
    "StoreCorruptError",
    "StoreDiskError",
    "StoreUnavailableError",
    "Synchronous",
    "TradeStore",
    "metadata",
    "schema_version",
]

P = ParamSpec("P")
T = TypeVar("T")
log = structlog.get_logger(__name__)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
_SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
# Key of the PostgreSQL advisory lock that serialises schema creation between bots.
_PG_SCHEMA_LOCK: Final = 0x4B455354  # "KEST"
_COMPONENT: Final = "trade_store"


# -- The store -------------------------------------------------------------------------------


class TradeStore(OrderJournal, TradeRecords):
    """The durable store of one bot's orders, fills, closed trades, equity and state.

    Open it with `TradeStore.open(url)` (or `from_settings`); close it with `close()` or use
    it as a context manager. Every method is synchronous and thread-safe; from the event
    loop, call it through a worker thread (`utils.SerialWorker`).
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
            "json_serializer": json_dumps,
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
                migrate = MIGRATIONS.get(version)
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
