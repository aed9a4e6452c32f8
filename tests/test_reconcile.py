"""Fills the bot never saw reach the journal: at start-up, whatever their age, and at stop.

Real parts throughout: ccxt against the loopback Bybit emulator, the journal on a SQLite
file, the executor that a live daemon runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from config import load_settings
from exchange import Exchange
from models import OrderIntent, OrderStatus, OrderType, Side
from runner import Daemon
from tests.bybit_emulator import BybitEmulator, daemon_env, exchange_settings
from tests.test_live_support import live_executor
from trade_executor import TradeExecutor
from trade_store import TradeStore


PAIR = "BTC/USDT"


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded spot wallet."""
    async with BybitEmulator(balances={"USDT": "100000"}) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator."""
    exchange = Exchange(exchange_settings(emu), retry_attempts=2, retry_base_s=0.01)
    async with exchange:
        yield exchange


def _executor(ex: Exchange, store: TradeStore) -> TradeExecutor:
    # The executor's own wait for a lost answer (10 s); no protective stops.
    return live_executor(ex, store, unknown_after_ms=10_000, protective_orders=False)


def _buy(cid: str) -> OrderIntent:
    return OrderIntent(PAIR, Side.BUY, Decimal("0.001"), OrderType.MARKET, cid, "test")


async def test_a_fill_older_than_the_newest_recorded_one_is_recovered(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """A crash lost the first order's fill but the second's was recorded; restart heals it."""
    store = TradeStore.open(f"sqlite:///{tmp_path / 'journal.sqlite'}", bot_id="t")
    # Two runs' worth of orders (an executor refuses a second buy while the first one's
    # fill is not applied, so each comes from its own).
    await _executor(ex, store).submit(_buy("lost-fill"))
    await emu.advance(minutes=5)  # the second fill is clearly newer
    await _executor(ex, store).submit(_buy("kept-fill"))
    executions = await ex.fetch_my_trades(PAIR)
    by_order = {f.client_order_id: f for f in executions}
    assert by_order["lost-fill"].ts < by_order["kept-fill"].ts
    # What the crashed run left: both orders known filled (the order stream said so), but
    # only the second execution recorded before the kill.
    for cid in ("lost-fill", "kept-fill"):
        order = await ex.fetch_order(PAIR, client_order_id=cid)
        assert order is not None
        assert order.status is OrderStatus.FILLED
        store.update_order(order)
    assert store.record_fill(by_order["kept-fill"])

    restarted = _executor(ex, store)
    report = await restarted.reconcile(ex, store, quote="USDT")

    assert {f.fill_id for f in store.fills()} == {f.fill_id for f in executions}
    assert "fills recorded while down 1" in report
    # Both buys are in the position (net of the fee Bybit spot takes in the coin bought).
    held = sum((f.qty - (f.fee if f.fee_currency == "BTC" else 0) for f in executions), Decimal(0))
    position = restarted.portfolio.position(PAIR)
    assert position is not None
    assert position.qty == held
    assert held > Decimal("0.0019")
    store.close()


async def test_reconcile_twice_records_each_fill_once(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """Reconciling again (another restart) adds nothing and rebuilds the same position."""
    store = TradeStore.open(f"sqlite:///{tmp_path / 'journal.sqlite'}", bot_id="t")
    await _executor(ex, store).submit(_buy("only"))
    first = _executor(ex, store)
    assert "fills recorded while down 1" in await first.reconcile(ex, store, quote="USDT")
    second = _executor(ex, store)
    assert "fills recorded while down 0" in await second.reconcile(ex, store, quote="USDT")
    assert len(store.fills()) == 1
    assert first.portfolio.position(PAIR) == second.portfolio.position(PAIR)
    store.close()


async def test_a_fill_after_the_private_stream_stopped_is_settled_at_stop(
    emu: BybitEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An order filled while no stream listens is fetched by the stop's settle step."""
    for name, value in {
        **daemon_env(emu),
        "KESTREL_STRATEGY__PAIRS": f'["{PAIR}"]',
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(env_file=None)
    args = argparse.Namespace(mode="live", no_ui=True, duration=None, summary_json=None)
    daemon = Daemon(args, settings)
    await daemon.build_exchange(paper=False)
    assert daemon.engine is not None
    order = await daemon.engine.executor.submit(_buy("after-stream"))
    assert order.status is not OrderStatus.REJECTED
    assert not daemon.engine.portfolio.has_position(PAIR)  # no stream: the fill is unseen

    await daemon.teardown()

    store = TradeStore.open(settings.storage.effective_database_url, bot_id="bybit-live")
    try:
        assert [f.client_order_id for f in store.fills()] == ["after-stream"]
    finally:
        store.close()
    state = json.loads((settings.storage.data_dir / "state" / "live.json").read_text())
    assert [p["pair"] for p in state["positions"]] == [PAIR]


async def test_fills_older_than_bybits_seven_day_window_are_fetched_week_by_week(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """A restart after ten days down still records the fill made just before the outage."""
    store = TradeStore.open(f"sqlite:///{tmp_path / 'journal.sqlite'}", bot_id="t")
    await _executor(ex, store).submit(_buy("before-outage"))
    since = ex.server_now_ms() - 60_000
    await emu.advance(minutes=10 * 24 * 60)
    await _executor(ex, store).submit(_buy("after-outage"))
    # Bybit answers a start time with the seven days after it: one query misses the newest.
    client = ex._ensure_open()
    one_query = await client.fetch_my_trades("BTC/USDT", since)
    assert [t["info"]["orderLinkId"] for t in one_query] == ["before-outage"]
    fills = await ex.fetch_my_trades(PAIR, since=since)
    assert [f.client_order_id for f in fills] == ["before-outage", "after-outage"]
    restarted = _executor(ex, store)
    assert "fills recorded while down 2" in await restarted.reconcile(ex, store, quote="USDT")
    store.close()
