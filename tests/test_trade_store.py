"""The trade store on SQLite and PostgreSQL: journal, order transitions, fills, the rest."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from config import StorageSettings
from error_handler import DataError, InvariantError, RecoverableError
from models import (
    ORDER_TRANSITIONS,
    ClosedTrade,
    OrderStatus,
    PositionSide,
    Side,
)
from tests.test_trade_store_support import (
    BACKENDS,
    PAIR,
    Backend,
    fill,
    intent,
    make_backend,
    report,
)
from trade_schema import closed_trades
from trade_store import (
    SCHEMA_VERSION,
    DuplicateOrderError,
    JournalState,
    StoreUnavailableError,
    TradeStore,
    schema_version,
)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Yield an isolated store location on SQLite, then on PostgreSQL."""
    yield from make_backend(request.param, tmp_path)


@pytest.fixture
def store(backend: Backend) -> Iterator[TradeStore]:
    """Yield an open store on each backend, closed afterwards."""
    opened = backend.open()
    yield opened
    opened.close()


# -- Journal ---------------------------------------------------------------------------------


def test_journal_records_the_order_before_it_is_sent(store: TradeStore) -> None:
    """A journaled order is stored as new, pending recovery, with its intent intact."""
    wanted = intent("cid-1", stop_loss=Decimal(95), take_profit=Decimal(120), leverage=Decimal(3))
    store.journal(wanted, ts=1_000)
    order = store.get_order("cid-1")
    assert order is not None
    assert (order.status, order.qty, order.price, order.ts_created) == (
        OrderStatus.NEW,
        Decimal(10),
        Decimal(100),
        1_000,
    )
    assert order.exchange_order_id is None
    assert store.journal_state("cid-1") is JournalState.JOURNALED
    assert [o.client_order_id for o in store.unacknowledged()] == ["cid-1"]
    assert [o.client_order_id for o in store.open_orders()] == ["cid-1"]
    assert store.get_intent("cid-1") == dataclasses.replace(wanted, ts=1_000)


def test_journal_refuses_a_client_id_twice(store: TradeStore) -> None:
    """A second journal under the same client id raises and leaves the first untouched."""
    store.journal(intent("cid-1", qty="10"), ts=1)
    with pytest.raises(DuplicateOrderError) as caught:
        store.journal(intent("cid-1", qty="99"), ts=2)
    assert caught.value.order_id == "cid-1"
    assert [(o.qty, o.ts_created) for o in store.all_orders()] == [(Decimal(10), 1)]


@pytest.mark.parametrize("qty", ["0", "-1", "NaN"])
def test_journal_refuses_a_non_positive_quantity(store: TradeStore, qty: str) -> None:
    """An order without a positive quantity never reaches the journal."""
    with pytest.raises(InvariantError):
        store.journal(intent("cid-1", qty=qty), ts=1)
    assert store.all_orders() == []


@pytest.mark.parametrize("price", ["NaN", "Infinity", "-Infinity"])
def test_journal_refuses_non_finite_prices(store: TradeStore, price: str) -> None:
    """A NaN or infinite Decimal raises our InvariantError, not a driver error."""
    with pytest.raises(InvariantError):
        store.journal(intent("cid-1", price=price), ts=1)
    assert store.get_order("cid-1") is None


def test_journal_protocol_runs_journaled_sent_acknowledged(store: TradeStore) -> None:
    """mark_sent then acknowledge move the journal state and set the exchange id."""
    store.journal(intent("cid-1"), ts=1)
    store.mark_sent("cid-1")
    assert store.journal_state("cid-1") is JournalState.SENT
    assert [o.client_order_id for o in store.unacknowledged()] == ["cid-1"]
    assert store.acknowledge(report("cid-1", OrderStatus.OPEN, ts=5, exchange_order_id="ex-9"))
    order = store.get_order("cid-1")
    assert order is not None
    assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, "ex-9")
    assert store.journal_state("cid-1") is JournalState.ACKNOWLEDGED
    assert store.unacknowledged() == []
    store.mark_sent("cid-1")  # a late mark_sent never downgrades
    assert store.journal_state("cid-1") is JournalState.ACKNOWLEDGED


def test_a_stream_report_before_the_rest_answer_acknowledges(store: TradeStore) -> None:
    """The private stream may answer first: its report acknowledges the order too."""
    store.journal(intent("cid-1"), ts=1)
    store.mark_sent("cid-1")
    assert store.update_order(report("cid-1", OrderStatus.FILLED, ts=30, filled="10"))
    assert store.journal_state("cid-1") is JournalState.ACKNOWLEDGED
    # The REST answer to create_order arrives last and is older: id kept, status not.
    assert not store.acknowledge(report("cid-1", OrderStatus.OPEN, ts=10, exchange_order_id="e"))
    order = store.get_order("cid-1")
    assert order is not None
    assert (order.status, order.filled_qty) == (OrderStatus.FILLED, Decimal(10))


def test_mark_never_sent_closes_the_order_for_good(store: TradeStore) -> None:
    """A never-sent order is rejected, leaves recovery, and can never be sent or adopted."""
    store.journal(intent("cid-1"), ts=1)
    store.mark_never_sent("cid-1", "not found on the exchange at recovery")
    order = store.get_order("cid-1")
    assert order is not None
    assert order.status is OrderStatus.REJECTED
    assert store.journal_state("cid-1") is JournalState.NEVER_SENT
    assert store.unacknowledged() == []
    assert store.open_orders() == []
    store.mark_never_sent("cid-1", "again")  # idempotent
    with pytest.raises(InvariantError):
        store.mark_sent("cid-1")
    # Even a report agreeing with our status means the exchange has it after all: loud.
    with pytest.raises(InvariantError):
        store.acknowledge(report("cid-1", OrderStatus.REJECTED, ts=5))
    with pytest.raises(InvariantError):
        store.update_order(report("cid-1", OrderStatus.REJECTED, ts=5))
    assert store.journal_state("cid-1") is JournalState.NEVER_SENT


def test_mark_never_sent_refuses_an_acknowledged_order(store: TradeStore) -> None:
    """An order the exchange acknowledged cannot be declared never sent."""
    store.journal(intent("cid-1"), ts=1)
    store.acknowledge(report("cid-1", OrderStatus.OPEN, ts=5))
    with pytest.raises(InvariantError):
        store.mark_never_sent("cid-1", "oops")
    assert store.journal_state("cid-1") is JournalState.ACKNOWLEDGED


def test_operations_on_an_unknown_order_raise(store: TradeStore) -> None:
    """The store refuses reports and fills for orders it never journaled."""
    with pytest.raises(InvariantError):
        store.mark_sent("ghost")
    with pytest.raises(InvariantError):
        store.mark_never_sent("ghost", "x")
    with pytest.raises(InvariantError):
        store.update_order(report("ghost", OrderStatus.OPEN, ts=1))
    with pytest.raises(InvariantError):
        store.acknowledge(report("ghost", OrderStatus.OPEN, ts=1))
    with pytest.raises(InvariantError):
        store.record_fill(fill("ghost", "f-1"))
    assert store.get_order("ghost") is None
    assert store.journal_state("ghost") is None
    assert store.fills() == []


def test_adopt_order_stores_an_unjournaled_exchange_order(store: TradeStore) -> None:
    """Reconciliation can adopt an order found only on the exchange, once."""
    found = report("manual-1", OrderStatus.PARTIALLY_FILLED, ts=50, filled="4")
    assert store.adopt_order(found)
    assert store.get_order("manual-1") == found
    assert store.journal_state("manual-1") is JournalState.ACKNOWLEDGED
    later = report("manual-1", OrderStatus.FILLED, ts=60, filled="10")
    assert not store.adopt_order(later)
    assert store.get_order("manual-1") == later


# -- Order transitions -----------------------------------------------------------------------

_FILLED_AT = {
    OrderStatus.NEW: "0",
    OrderStatus.OPEN: "0",
    OrderStatus.PARTIALLY_FILLED: "4",
    OrderStatus.FILLED: "10",
    OrderStatus.CANCELLED: "0",
    OrderStatus.REJECTED: "0",
    OrderStatus.EXPIRED: "0",
}
_TARGET_FILLED = {**_FILLED_AT, OrderStatus.PARTIALLY_FILLED: "6"}


def test_every_legal_transition_applies_and_every_illegal_one_raises(store: TradeStore) -> None:
    """Each (from, to) pair of statuses is applied when the table allows it, else refused."""
    outcomes = {}
    for old in OrderStatus:
        for new in OrderStatus:
            cid = f"{old}-{new}"
            store.journal(intent(cid), ts=1)
            if old is not OrderStatus.NEW:
                store.update_order(report(cid, old, ts=10, filled=_FILLED_AT[old]))
            filled = max(Decimal(_FILLED_AT[old]), Decimal(_TARGET_FILLED[new]))
            try:
                applied = store.update_order(report(cid, new, ts=20, filled=str(filled)))
            except InvariantError:
                applied = None
            stored = store.get_order(cid)
            assert stored is not None
            outcomes[(old, new)] = (applied, stored.status)
    for (old, new), (applied, status) in outcomes.items():
        if (old, new) in ORDER_TRANSITIONS or old == new:
            # Same status again: more fills while live, or a terminal report refreshed.
            assert (applied, status) == (True, new), (old, new)
        else:
            assert (applied, status) == (None, old), (old, new)
    assert sum(applied is True for applied, _ in outcomes.values()) == len(
        ORDER_TRANSITIONS | {(s, s) for s in OrderStatus}
    )


def test_an_illegal_transition_leaves_the_order_unchanged(store: TradeStore) -> None:
    """Filled -> cancelled with a newer timestamp raises and changes nothing."""
    store.journal(intent("cid-1"), ts=1)
    store.update_order(report("cid-1", OrderStatus.FILLED, ts=10, filled="10"))
    before = store.get_order("cid-1")
    with pytest.raises(InvariantError) as caught:
        store.update_order(report("cid-1", OrderStatus.CANCELLED, ts=20, filled="10"))
    assert caught.value.order_id == "cid-1"
    assert store.get_order("cid-1") == before


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            (OrderStatus.PARTIALLY_FILLED, 20, "4"), (OrderStatus.OPEN, 10, "0"), id="older-ts"
        ),
        pytest.param(
            (OrderStatus.PARTIALLY_FILLED, 20, "4"),
            (OrderStatus.PARTIALLY_FILLED, 30, "2"),
            id="lower-filled",
        ),
        pytest.param(
            (OrderStatus.PARTIALLY_FILLED, 20, "4"),
            (OrderStatus.OPEN, 20, "4"),
            id="same-ts-earlier-status",
        ),
        pytest.param(
            (OrderStatus.FILLED, 30, "10"),
            (OrderStatus.PARTIALLY_FILLED, 20, "4"),
            id="partial-after-filled",
        ),
        pytest.param(
            (OrderStatus.CANCELLED, 30, "4"),
            (OrderStatus.PARTIALLY_FILLED, 20, "4"),
            id="partial-after-cancel",
        ),
    ],
)
def test_stale_reports_are_ignored(
    store: TradeStore, first: tuple[OrderStatus, int, str], second: tuple[OrderStatus, int, str]
) -> None:
    """A report older, less filled or less advanced than the stored one changes nothing."""
    store.journal(intent("cid-1"), ts=1)
    if first[0] is OrderStatus.CANCELLED:
        store.update_order(report("cid-1", OrderStatus.PARTIALLY_FILLED, ts=15, filled="4"))
    assert store.update_order(report("cid-1", first[0], ts=first[1], filled=first[2]))
    before = store.get_order("cid-1")
    assert not store.update_order(report("cid-1", second[0], ts=second[1], filled=second[2]))
    assert store.get_order("cid-1") == before


def test_exchange_time_behind_our_journal_time_is_not_stale(store: TradeStore) -> None:
    """The first report is applied even when the exchange clock is behind ours."""
    store.journal(intent("cid-1"), ts=10_000)
    assert store.update_order(report("cid-1", OrderStatus.OPEN, ts=9_990))
    order = store.get_order("cid-1")
    assert order is not None
    assert (order.status, order.ts_updated, order.ts_created) == (OrderStatus.OPEN, 9_990, 10_000)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"pair": "ETH/USDT"}, id="other-pair"),
        pytest.param({"side": Side.SELL}, id="other-side"),
        pytest.param({"filled": "11"}, id="overfilled"),
        pytest.param({"filled": "NaN"}, id="nan-filled"),
    ],
)
def test_a_report_contradicting_the_journal_raises(
    store: TradeStore, bad: dict[str, object]
) -> None:
    """A report for another pair or side, or filled beyond its quantity, is an invariant."""
    store.journal(intent("cid-1"), ts=1)
    with pytest.raises(InvariantError):
        store.update_order(report("cid-1", OrderStatus.PARTIALLY_FILLED, ts=5, **bad))  # type: ignore[arg-type]
    assert store.journal_state("cid-1") is JournalState.JOURNALED


# -- Fills -----------------------------------------------------------------------------------


def test_a_fill_seen_twice_is_counted_once(store: TradeStore) -> None:
    """REST and the private stream reporting one fill leave one row and one total."""
    store.journal(intent("cid-1"), ts=1)
    assert store.record_fill(fill("cid-1", "f-1", qty="3", price="100"))
    assert not store.record_fill(fill("cid-1", "f-1", qty="3", price="100"))
    assert store.record_fill(fill("cid-1", "f-2", qty="1", price="104", ts=2_000))
    totals = store.fill_totals("cid-1")
    assert (totals.qty, totals.notional, totals.fee, totals.count) == (
        Decimal(4),
        Decimal(404),
        Decimal("0.02"),
        2,
    )
    assert totals.avg_price == Decimal(101)
    assert [f.fill_id for f in store.fills("cid-1")] == ["f-1", "f-2"]
    assert [f.fill_id for f in store.fills(since=1_500)] == ["f-2"]


def test_fills_adding_up_beyond_the_order_raise(store: TradeStore) -> None:
    """The same execution under two ids would overfill the order: refused, not stored."""
    store.journal(intent("cid-1", qty="5"), ts=1)
    store.record_fill(fill("cid-1", "rest-1", qty="4"))
    with pytest.raises(InvariantError):
        store.record_fill(fill("cid-1", "stream-1", qty="4"))
    assert [f.fill_id for f in store.fills()] == ["rest-1"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"pair": "ETH/USDT"}, id="other-pair"),
        pytest.param({"side": Side.SELL}, id="other-side"),
        pytest.param({"qty": "0"}, id="zero-qty"),
        pytest.param({"price": "-1"}, id="negative-price"),
        pytest.param({"qty": "NaN"}, id="nan-qty"),
    ],
)
def test_a_fill_contradicting_its_order_raises(store: TradeStore, bad: dict[str, object]) -> None:
    """A fill for another pair or side, or without a positive price and qty, is refused."""
    store.journal(intent("cid-1"), ts=1)
    with pytest.raises(InvariantError):
        store.record_fill(fill("cid-1", "f-1", **bad))  # type: ignore[arg-type]
    assert store.fills() == []


# -- Trades, equity, state --------------------------------------------------------


def test_closed_trades_come_back_in_exit_order(store: TradeStore) -> None:
    """Round trips round-trip exactly and filter by exit time."""
    late = ClosedTrade(PAIR, PositionSide.LONG, 10, 40, 100.1, 110.7, 0.3, 0.05, 3.13, "tp")
    early = ClosedTrade("ETH/USDT", PositionSide.SHORT, 5, 20, 3_000.0, 2_950.5, 1.0, 0.9, 48.6)
    store.add_closed_trade(late)
    store.add_closed_trade(early)
    assert store.closed_trades() == [early, late]
    assert store.closed_trades(since=30) == [late]


def test_equity_curve_is_ordered_and_replaces_same_ts(store: TradeStore) -> None:
    """Snapshots come back by time; a second snapshot at one ts replaces the first."""
    store.add_equity(20, Decimal("900.5"), Decimal("1010.25"))
    store.add_equity(10, Decimal(1_000), Decimal(1_000))
    store.add_equity(20, Decimal("901"), Decimal("1011"))
    assert [(p.ts, p.cash, p.equity) for p in store.equity_curve()] == [
        (10, Decimal(1_000), Decimal(1_000)),
        (20, Decimal(901), Decimal(1_011)),
    ]
    assert [p.ts for p in store.equity_curve(since=15)] == [20]


def test_equity_curve_keeps_the_newest_points_oldest_first(store: TradeStore) -> None:
    """`last=n` returns the n newest snapshots, still in time order, and composes with since."""
    for ts in (30, 10, 50, 40, 20):
        store.add_equity(ts, Decimal(ts), Decimal(ts * 2))
    assert [p.ts for p in store.equity_curve(last=3)] == [30, 40, 50]
    assert [p.ts for p in store.equity_curve(since=35, last=5)] == [40, 50]
    assert [p.equity for p in store.equity_curve(last=1)] == [Decimal(100)]


def test_state_holds_json_values(store: TradeStore) -> None:
    """State keys store nested JSON, default when missing and can be replaced or deleted."""
    value = {"state": "paused", "pairs": ["BTC/USDT", "ETH/USDT"], "until": None, "x": 0.1}
    assert store.get_state("bot", default="none") == "none"
    store.set_state("bot", value)
    assert store.get_state("bot") == value
    store.set_state("bot", [1, 2])
    assert store.get_state("bot") == [1, 2]
    assert store.delete_state("bot")
    assert not store.delete_state("bot")
    assert store.get_state("bot") is None


@pytest.mark.parametrize("bad", [float("nan"), {"d": Decimal(1)}, object()])
def test_state_refuses_values_json_cannot_hold(store: TradeStore, bad: object) -> None:
    """NaN, Decimals and arbitrary objects are refused before anything is written."""
    with pytest.raises((TypeError, ValueError)):
        store.set_state("bad", bad)
    assert store.get_state("bad", default="missing") == "missing"


# -- Sharing, schema, lifecycle --------------------------------------------------------------


def test_bots_sharing_a_store_never_see_each_others_rows(backend: Backend) -> None:
    """Two bot ids may reuse client ids, fill ids, pairs and keys without colliding."""
    with backend.open(bot_id="alpha") as alpha, backend.open(bot_id="beta") as beta:
        for bot, qty in ((alpha, "1"), (beta, "2")):
            bot.journal(intent("cid-1", qty=qty), ts=1)
            assert bot.record_fill(fill("cid-1", "f-1", qty=qty))
            bot.add_equity(1, Decimal(qty), Decimal(qty))
            bot.add_closed_trade(
                ClosedTrade(PAIR, PositionSide.LONG, 1, 2, 1.0, 2.0, float(qty), 0.0, 1.0)
            )
            bot.set_state("risk", {"bot": bot.bot_id})
        beta.acknowledge(report("cid-1", OrderStatus.OPEN, ts=5, qty="2"))
        for bot, amount in ((alpha, Decimal(1)), (beta, Decimal(2))):
            assert [o.qty for o in bot.all_orders()] == [amount]
            assert [f.qty for f in bot.fills()] == [amount]
            assert bot.fill_totals("cid-1").qty == amount
            assert [p.cash for p in bot.equity_curve()] == [amount]
            assert [t.qty for t in bot.closed_trades()] == [float(amount)]
            assert bot.get_state("risk") == {"bot": bot.bot_id}
        assert [o.client_order_id for o in alpha.unacknowledged()] == ["cid-1"]
        assert beta.unacknowledged() == []


def test_bots_opening_and_writing_at_once_do_not_collide(backend: Backend) -> None:
    """Four bots create the schema and journal concurrently, each on its own connections."""
    barrier = threading.Barrier(4)

    def bot(name: str) -> list[str]:
        barrier.wait()
        with backend.open(bot_id=name) as opened:
            for i in range(25):
                opened.journal(intent(f"cid-{i}"), ts=i)
                opened.record_fill(fill(f"cid-{i}", f"f-{i}"))
            return [o.client_order_id for o in opened.all_orders()]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(bot, ["a", "b", "c", "d"]))
    assert results == [[f"cid-{i}" for i in range(25)]] * 4
    assert _schema_versions(backend) == [SCHEMA_VERSION]


def test_from_settings_opens_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    """Without a database URL the store is a SQLite file in the configured data dir."""
    storage = StorageSettings(data_dir=tmp_path / "bot-data")
    with TradeStore.from_settings(storage, bot_id="main") as opened:
        opened.set_state("k", 1)
        assert opened.describe()["backend"] == "sqlite"
    assert (tmp_path / "bot-data" / "kestrel.sqlite").is_file()


def test_reopening_keeps_the_data_and_the_schema_version(backend: Backend) -> None:
    """A second open finds the tables and the version it wrote and creates nothing new."""
    with backend.open() as first:
        first.journal(intent("cid-1"), ts=1)
    with backend.open() as second:
        assert [o.client_order_id for o in second.all_orders()] == ["cid-1"]
        versions = _schema_versions(backend)
    assert versions == [SCHEMA_VERSION]


def test_a_store_from_a_newer_kestrel_is_refused(backend: Backend) -> None:
    """A schema version above ours raises DataError instead of corrupting the store."""
    backend.open().close()
    engine = _raw_engine(backend)
    with engine.begin() as conn:
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION + 1, ts_applied=0))
    engine.dispose()
    with pytest.raises(DataError):
        backend.open()


def test_a_version_1_store_is_migrated_and_keeps_its_closed_trades(backend: Backend) -> None:
    """A v1 store gains the closed trades' strategy, funding, stop and adds; old rows read back."""
    backend.open().close()
    engine = _raw_engine(backend)
    table = closed_trades.name
    with engine.begin() as conn:  # back to v1: the table without its v2 columns
        for column in ("strategy", "funding", "stop_price", "adds_at_loss", "equity_after"):
            conn.execute(sa.text(f"ALTER TABLE {_qualified(backend, table)} DROP COLUMN {column}"))
        conn.execute(schema_version.delete())
        conn.execute(schema_version.insert().values(version=1, ts_applied=0))
        conn.execute(
            sa.text(
                f"INSERT INTO {_qualified(backend, table)} (bot_id, pair, side, entry_ts, exit_ts,"
                " entry_price, exit_price, qty, fee, pnl, reason) VALUES ('default', 'BTC/USDT',"
                " 'long', 1, 2, 100.0, 110.0, 1.0, 0.2, 9.8, 'signal')"
            )
        )
    engine.dispose()
    new = ClosedTrade(
        "ETH/USDT", PositionSide.LONG, 3, 4, 10.0, 9.0, 2.0, 0.1, -2.3, "stop",
        stop_price=9.1, adds_at_loss=1, strategy="trend", funding=-0.2,
    )  # fmt: skip
    with backend.open() as migrated:
        [old] = migrated.closed_trades()
        assert (old.pair, old.pnl, old.strategy, old.funding, old.stop_price) == (
            "BTC/USDT", 9.8, "", 0.0, None,
        )  # fmt: skip
        migrated.add_closed_trade(new, equity_after=9_990.0)
        assert migrated.closed_trades() == [old, new]
        assert migrated.trade_history() == [(old, None), (new, 9_990.0)]
    assert _schema_versions(backend) == [1, 2, SCHEMA_VERSION]


def test_a_version_2_store_drops_its_positions_and_keeps_everything_else(
    backend: Backend,
) -> None:
    """A v2 store loses the never-read positions table; orders, trades, equity, state stay."""
    with backend.open() as first:
        first.journal(intent("cid-1"), ts=1)
        first.add_closed_trade(
            ClosedTrade(PAIR, PositionSide.LONG, 1, 2, 1.0, 2.0, 1.0, 0.0, 1.0), equity_after=5.0
        )
        first.add_equity(3, Decimal("9.5"), Decimal("10.25"))
        first.set_state("risk", {"peak": "10"})
    engine = _raw_engine(backend)
    with engine.begin() as conn:  # back to v2: its positions table, with a row in it
        conn.execute(
            sa.text(
                f"CREATE TABLE {_qualified(backend, 'positions')} (bot_id VARCHAR(64) NOT NULL,"
                " pair VARCHAR(64) NOT NULL, side VARCHAR(8) NOT NULL, qty TEXT NOT NULL,"
                " entry_price TEXT NOT NULL, stop_price TEXT, take_profit TEXT,"
                " ts_opened BIGINT NOT NULL, fees_paid TEXT NOT NULL,"
                " PRIMARY KEY (bot_id, pair))"
            )
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {_qualified(backend, 'positions')} VALUES ('default', 'BTC/USDT',"
                " 'long', '1', '10', NULL, NULL, 1, '0')"
            )
        )
        conn.execute(schema_version.delete())
        conn.execute(schema_version.insert().values(version=2, ts_applied=0))
    engine.dispose()
    with backend.open() as migrated:
        assert [o.client_order_id for o in migrated.all_orders()] == ["cid-1"]
        assert [equity for _, equity in migrated.trade_history()] == [5.0]
        assert [(p.ts, p.cash, p.equity) for p in migrated.equity_curve()] == [
            (3, Decimal("9.5"), Decimal("10.25"))
        ]
        assert migrated.get_state("risk") == {"peak": "10"}
    assert _schema_versions(backend) == [2, SCHEMA_VERSION]
    engine = _raw_engine(backend)
    try:
        assert "positions" not in sa.inspect(engine).get_table_names(schema=backend.schema)
    finally:
        engine.dispose()


def _qualified(backend: Backend, table: str) -> str:
    return f'"{backend.schema}".{table}' if backend.schema else table


def _raw_engine(backend: Backend) -> sa.Engine:
    engine = sa.create_engine(backend.url)
    if backend.schema is not None:
        return engine.execution_options(schema_translate_map={None: backend.schema})
    return engine


def _schema_versions(backend: Backend) -> list[int]:
    engine = _raw_engine(backend)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(schema_version.c.version)).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_sqlite_connections_carry_the_durability_pragmas(tmp_path: Path, synchronous: str) -> None:
    """Each SQLite connection runs WAL, the chosen synchronous level and foreign keys."""
    url = f"sqlite:///{tmp_path / 'kestrel.sqlite'}"
    with TradeStore.open(url, synchronous=synchronous, busy_timeout_s=2.5) as opened:  # type: ignore[arg-type]
        assert opened.describe() == {
            "backend": "sqlite",
            "bot_id": "default",
            "schema_version": SCHEMA_VERSION,
            "journal_mode": "wal",
            "synchronous": synchronous,
            "foreign_keys": 1,
            "busy_timeout": 2_500,
        }


def test_a_locked_database_is_a_recoverable_error(tmp_path: Path) -> None:
    """A write lock held past the busy timeout raises StoreUnavailableError, then recovers."""
    path = tmp_path / "kestrel.sqlite"
    with TradeStore.open(f"sqlite:///{path}", busy_timeout_s=0.05) as opened:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailableError) as caught:
            opened.journal(intent("cid-1"), ts=1)
        assert isinstance(caught.value, RecoverableError)
        other.execute("ROLLBACK")
        other.close()
        assert opened.get_order("cid-1") is None
        opened.journal(intent("cid-1"), ts=1)
        assert opened.journal_state("cid-1") is JournalState.JOURNALED


def test_sqlite_store_runs_in_wal_mode(tmp_path: Path) -> None:
    """The SQLite file is in WAL mode and its directory is created on open."""
    path = tmp_path / "deep" / "dir" / "kestrel.sqlite"
    with TradeStore.open(f"sqlite:///{path}") as opened:
        opened.journal(intent("cid-1"), ts=1)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT client_order_id FROM orders").fetchall() == [("cid-1",)]
    raw.close()


def test_a_closed_store_refuses_work(store: TradeStore) -> None:
    """Using a store after close raises instead of silently reconnecting."""
    store.close()
    store.close()
    with pytest.raises(InvariantError):
        store.journal(intent("cid-1"), ts=1)
