"""The live executor's journal writes (fsync'd commits) never run on the event loop thread."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from exchange import Exchange
from models import OrderIntent, OrderType, Side, with_attempt
from portfolio import Portfolio
from tests.bybit_emulator import BybitEmulator, exchange_settings
from trade_executor import TradeExecutor
from trade_store import TradeStore
from utils.utilities import AuditTrail, WallClock


PAIR = "BTC/USDT"
WRITES = (
    "journal",
    "mark_sent",
    "acknowledge",
    "update_order",
    "mark_never_sent",
    "adopt_order",
    "record_fill",
)


class ThreadRecordingStore(TradeStore):
    """A real SQLite trade store that notes which thread ran each write."""

    calls: list[tuple[str, int]]

    def _note(self, name: str) -> None:
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append((name, threading.get_ident()))

    def journal(self, *args: Any, **kwargs: Any) -> None:
        self._note("journal")
        super().journal(*args, **kwargs)

    def mark_sent(self, *args: Any, **kwargs: Any) -> None:
        self._note("mark_sent")
        super().mark_sent(*args, **kwargs)

    def acknowledge(self, *args: Any, **kwargs: Any) -> bool:
        self._note("acknowledge")
        return super().acknowledge(*args, **kwargs)

    def update_order(self, *args: Any, **kwargs: Any) -> bool:
        self._note("update_order")
        return super().update_order(*args, **kwargs)

    def record_fill(self, *args: Any, **kwargs: Any) -> bool:
        self._note("record_fill")
        return super().record_fill(*args, **kwargs)


@pytest.fixture
async def ex() -> AsyncIterator[tuple[BybitEmulator, Exchange]]:
    """Return a running emulator and an open Exchange on it."""
    async with (
        BybitEmulator(balances={"USDT": "100000"}) as emu,
        Exchange(exchange_settings(emu), retry_attempts=2) as exchange,
    ):
        yield emu, exchange


async def test_journal_writes_run_off_the_event_loop(
    ex: tuple[BybitEmulator, Exchange], tmp_path: Path
) -> None:
    """Entry, fill, protective stop and its move: every write on the journal's own thread."""
    emu, exchange = ex
    store = ThreadRecordingStore.open(f"sqlite:///{tmp_path / 'journal.sqlite'}", bot_id="t")
    assert isinstance(store, ThreadRecordingStore)
    executor = TradeExecutor(
        exchange,
        Portfolio(Decimal("100000"), quote="USDT"),
        market_for=exchange.market,
        clock=WallClock(),
        audit=AuditTrail(None),
        store=store,
    )
    price = emu.last_price("BTCUSDT")
    entry = OrderIntent(
        PAIR,
        Side.BUY,
        Decimal("0.01"),
        OrderType.MARKET,
        with_attempt("thread", 0),
        "test",
        stop_loss=(price * Decimal("0.95")).quantize(Decimal("0.01")),
    )
    order = await executor.submit(entry)
    fill = (await exchange.fetch_my_trades(PAIR))[0]
    await executor.on_fill(executor.orders[order.client_order_id], fill)
    await executor.amend_stop(PAIR, (price * Decimal("0.96")).quantize(Decimal("0.01")))
    await executor.on_order(executor.orders[order.client_order_id])
    await executor.close()
    store.close()

    loop_thread = threading.get_ident()
    written = {name for name, _ in store.calls}
    assert {"journal", "mark_sent", "acknowledge", "update_order", "record_fill"} <= written
    assert written <= set(WRITES)
    assert [name for name, thread in store.calls if thread == loop_thread] == []
