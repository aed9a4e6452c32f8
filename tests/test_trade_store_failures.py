"""A damaged journal or a full disk: a fatal error naming the file, nothing overwritten or sent.

Real parts throughout: SQLite files in tmp_path, SQLite's own page limit standing in for a
full disk (it fails writes with SQLITE_FULL, "database or disk is full", exactly as a full
disk does), ccxt against the loopback Bybit emulator, and the daemon as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from error_handler import FatalError
from exchange import Exchange
from models import OrderIntent, OrderType, Side
from tests.bybit_emulator import BybitEmulator, daemon_env, exchange_settings
from tests.conftest import ROOT
from tests.test_live_support import live_executor
from tests.test_trade_store_support import intent
from trade_store import JournalState, StoreCorruptError, StoreDiskError, TradeStore


PAIR = "BTC/USDT"
# Longer than a 4 KiB page: journaling it needs new (overflow) pages, which a database at
# its page limit cannot have, wherever the row would land.
LONG_REASON = "entry " * 1_000


def _real_store(path: Path) -> None:
    with TradeStore.open(f"sqlite:///{path}") as store:
        for n in range(200):
            store.journal(intent(f"cid-{n}"), ts=n)
    # Closing the last connection checkpoints the WAL into the file and removes it.
    assert not path.with_name(path.name + "-wal").exists()


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(16_384))


def _truncated(path: Path) -> None:
    _real_store(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _page_overwritten(path: Path) -> None:
    # The header and schema are intact; one b-tree page in the middle is garbage, so the
    # file opens and only a read of that page would notice.
    _real_store(path)
    pages = path.stat().st_size // 4096
    with path.open("r+b") as f:
        f.seek((pages // 2) * 4096)
        f.write(random.Random(11).randbytes(4096))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "random bytes": _random_bytes,
    "truncated": _truncated,
    "page overwritten": _page_overwritten,
}


@pytest.mark.parametrize("damage", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_file_is_a_fatal_error_naming_it_and_is_left_untouched(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """Opening a damaged journal raises StoreCorruptError with the path; no byte changes."""
    path = tmp_path / "kestrel.sqlite"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(StoreCorruptError) as caught:
        TradeStore.open(f"sqlite:///{path}")
    assert isinstance(caught.value, FatalError)
    assert str(path) in caught.value.message
    assert caught.value.context["path"] == str(path)
    assert path.read_bytes() == before
    with pytest.raises(StoreCorruptError):  # a second start does not "repair" it either
        TradeStore.open(f"sqlite:///{path}")
    assert path.read_bytes() == before


@pytest.fixture
def page_limit() -> Iterator[Callable[[int], None]]:
    """Cap every new SQLite connection's database at a page count (a full disk)."""
    listeners: list[Callable[[Any, Any], None]] = []

    def cap(pages: int) -> None:
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            # SQLite never lowers the cap below the file's current size.
            dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

        sa.event.listen(sa.pool.Pool, "connect", on_connect)
        listeners.append(on_connect)

    yield cap
    for listener in listeners:
        sa.event.remove(sa.pool.Pool, "connect", listener)


def test_a_full_disk_fails_the_journal_fatally_and_keeps_earlier_orders(
    tmp_path: Path, page_limit: Callable[[int], None]
) -> None:
    """journal() on a full disk raises StoreDiskError naming the file; nothing half-written."""
    path = tmp_path / "kestrel.sqlite"
    with TradeStore.open(f"sqlite:///{path}") as store:
        store.journal(intent("kept"), ts=1)
    page_limit(1)
    with TradeStore.open(f"sqlite:///{path}") as store:
        with pytest.raises(StoreDiskError) as caught:
            store.journal(intent("lost", reason=LONG_REASON), ts=2)
        assert isinstance(caught.value, FatalError)
        assert str(path) in caught.value.message
        assert "full" in caught.value.message
        assert [o.client_order_id for o in store.all_orders()] == ["kept"]
        assert store.journal_state("lost") is None
        assert store.journal_state("kept") is JournalState.JOURNALED


def test_a_full_disk_at_start_is_a_fatal_error(
    tmp_path: Path, page_limit: Callable[[int], None]
) -> None:
    """A new store that cannot create its tables raises StoreDiskError, not a retry."""
    page_limit(1)
    path = tmp_path / "kestrel.sqlite"
    with pytest.raises(StoreDiskError, match=str(path)):
        TradeStore.open(f"sqlite:///{path}")


def test_a_locked_database_is_still_recoverable(tmp_path: Path) -> None:
    """Only damage and disk failures are fatal: a held write lock stays a retryable error."""
    from trade_store import StoreUnavailableError

    path = tmp_path / "kestrel.sqlite"
    with TradeStore.open(f"sqlite:///{path}", busy_timeout_s=0.05) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailableError) as caught:
            store.journal(intent("cid-1"), ts=1)
        other.execute("ROLLBACK")
        other.close()
    assert not isinstance(caught.value, FatalError)


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded spot wallet."""
    async with BybitEmulator(balances={"USDT": "100000"}) as server:
        yield server


async def test_an_order_whose_journal_write_fails_is_never_sent(
    emu: BybitEmulator, tmp_path: Path, page_limit: Callable[[int], None]
) -> None:
    """The executor journals before sending: a full disk stops the order before the exchange."""
    path = tmp_path / "journal.sqlite"
    TradeStore.open(f"sqlite:///{path}", bot_id="t").close()
    page_limit(1)
    store = TradeStore.open(f"sqlite:///{path}", bot_id="t")
    async with Exchange(exchange_settings(emu), retry_attempts=2, retry_base_s=0.01) as ex:
        executor = live_executor(ex, store, unknown_after_ms=10_000, protective_orders=False)
        buy = OrderIntent(PAIR, Side.BUY, Decimal("0.001"), OrderType.MARKET, "full", LONG_REASON)
        with pytest.raises(StoreDiskError, match=str(path)):
            await executor.submit(buy)
        assert await ex.fetch_order(PAIR, client_order_id="full") is None
    store.close()
    assert not [r for r in emu.requests if r.path.startswith("/v5/order/create")]
    assert emu.orders_by_link_id() == {}


async def test_the_live_daemon_refuses_to_start_on_a_corrupt_journal(tmp_path: Path) -> None:
    """--mode live on a damaged journal exits non-zero naming the file, which stays as it was."""
    journal = tmp_path / "data" / "kestrel.sqlite"
    journal.parent.mkdir(parents=True)
    _random_bytes(journal)
    before = journal.read_bytes()
    async with BybitEmulator(balances={"USDT": "10000"}) as emu:
        env = {
            **daemon_env(emu),
            "KESTREL_STRATEGY__PAIRS": f'["{PAIR}"]',
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "main.py"),
            "--mode",
            "live",
            "--no-ui",
            "--duration",
            "30",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 90)
        assert not [r for r in emu.requests if r.path.startswith("/v5/order/")]
    assert proc.returncode == 2  # a corrupt data file, like DataError
    errors = [line for line in stderr.decode().splitlines() if line.startswith("kestrel: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"kestrel: error: trade store {journal} is corrupt")
    assert journal.read_bytes() == before
