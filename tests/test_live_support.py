"""Shared helpers for the live executor tests on the emulator: the executor, its streams.

No tests live here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from exchange import Exchange
from models import EventSink
from portfolio import Portfolio
from trade_executor import TradeExecutor
from trade_store import TradeStore
from utils.utilities import AuditTrail, WallClock


@contextlib.asynccontextmanager
async def private_streams(ex: Exchange, executor: TradeExecutor) -> AsyncIterator[None]:
    """Run the private order and execution streams into `executor`, as the daemon does."""

    async def fills() -> None:
        async for fill in ex.watch_fills():
            await executor.on_stream_fill(fill)

    async def orders() -> None:
        async for order in ex.watch_orders():
            await executor.on_order(order)

    tasks = [asyncio.create_task(fills()), asyncio.create_task(orders())]
    assert await ex.wait_private_streams(timeout=5.0)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(outcome, asyncio.CancelledError):
                raise AssertionError(f"a private stream consumer failed: {outcome!r}")


def live_executor(
    ex: Exchange,
    store: TradeStore,
    *,
    cash: Decimal = Decimal("100000"),
    notify: EventSink | None = None,
    unknown_after_ms: int = 1_000,
    protective_orders: bool = True,
) -> TradeExecutor:
    """Return an executor on `ex` journaling to `store`, with `cash` USDT and its alerts.

    An unanswered order counts as unknown after `unknown_after_ms` (1 s: tests wait less).
    """
    return TradeExecutor(
        ex,
        Portfolio(cash, quote="USDT"),
        market_for=ex.market,
        clock=WallClock(),
        audit=AuditTrail(None),
        store=store,
        notify=notify,
        unknown_after_ms=unknown_after_ms,
        protective_orders=protective_orders,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TradeStore]:
    """Return a journal on a SQLite file (a fixture: import it into the test module)."""
    with TradeStore.open(f"sqlite:///{tmp_path / 'journal.sqlite'}", bot_id="t") as journal:
        yield journal
