"""Positions the exchange closes: liquidation and ADL against the emulator, in live mode.

Real parts throughout: ccxt against the loopback Bybit emulator with the private streams
running as a live daemon runs them, the journal on a SQLite file and the executor. The
emulator liquidates a position when a test moves the mark past its liquidation price (and
auto-deleverages one on request), in Bybit's wire format; the tests count what is real:
closed trades, positions, and the stops still working on the exchange.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from config import TelegramSettings, load_settings
from daemon_operator import TelegramNotifier
from exchange import Exchange
from models import (
    Event,
    FillKind,
    OrderIntent,
    OrderType,
    PositionLiquidated,
    Side,
    TradeClosed,
    with_attempt,
)
from runner import Daemon
from telegram_bot import TelegramBot
from telegram_templates import render_event
from tests.bybit_emulator import BybitEmulator, daemon_env, exchange_settings
from tests.conftest import eventually
from tests.fake_telegram import TOKEN, FakeControl, FakeTelegram
from tests.test_live_support import live_executor
from tests.test_live_support import private_streams as _streams
from tests.test_live_support import store as store  # the journal fixture
from trade_executor import StopState, TradeExecutor
from trade_store import TradeStore


LINEAR = "BTC/USDT:USDT"
SYMBOL = "BTCUSDT"
D = Decimal
START = D("100000")
TAKER = D("0.00055")
CHAT = 424242


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded unified wallet."""
    async with BybitEmulator(balances={"USDT": str(START)}) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator, the position at 20x."""
    exchange = Exchange(exchange_settings(emu), retry_attempts=2, retry_base_s=0.01)
    async with exchange:
        await exchange.set_leverage(LINEAR, 20)
        yield exchange


def _executor(ex: Exchange, store: TradeStore, events: list[Event]) -> TradeExecutor:
    return live_executor(ex, store, cash=START, notify=events.append)


async def _catch_up(ex: Exchange, executor: TradeExecutor, since: int | None = None) -> int:
    """Book the executions the REST catch-up finds, as the daemon does before trading."""
    booked = 0
    for fill in await ex.fetch_my_trades(LINEAR, since=since):
        if not await executor.has_fill(fill.fill_id):
            await executor.on_stream_fill(fill)
            booked += 1
    return booked


async def _open_long(
    emu: BybitEmulator,
    executor: TradeExecutor,
    qty: str,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> Decimal:
    """Buy `qty` at market with a stop 3 % under (inside the liquidation price)."""
    last = emu.last_price(SYMBOL, "linear")
    intent = OrderIntent(
        LINEAR,
        Side.BUY,
        D(qty),
        OrderType.MARKET,
        with_attempt("lev", 0),
        "test entry",
        stop_loss=(last * D("0.97")).quantize(D("0.1")),
    )
    await executor.submit(intent, last_price=last)
    if settle is not None:  # no stream running: the daemon's REST sweep brings the fill
        await settle()
    await eventually(
        lambda: (
            _working_stops(emu) == [D(qty)]
            and executor.protective_stop(LINEAR)[0] is StopState.WORKING
        )
    )
    return last


def _working_stops(emu: BybitEmulator) -> list[Decimal]:
    return [o.qty for o in emu.orders.values() if o.conditional and o.is_open]


def _forced(emu: BybitEmulator, create_type: str) -> list[tuple[Decimal, Decimal, Decimal]]:
    """Return (qty, price, fee) of the executions the exchange made itself."""
    return [(e.qty, e.price, e.fee) for e in emu.executions if e.order.create_type == create_type]


def _held(executor: TradeExecutor) -> Decimal:
    position = executor.portfolio.position(LINEAR)
    return D(0) if position is None else position.qty


async def _liquidate(emu: BybitEmulator) -> tuple[Decimal, Decimal]:
    """Move the mark past the position's liquidation price; return (liqPrice, bustPrice)."""
    item = emu._position_item(SYMBOL)
    liq, bust = D(item["liqPrice"]), D(item["bustPrice"])
    await emu.set_mark(SYMBOL, liq - D("0.1"))
    return liq, bust


# -- The emulator on the wire ----------------------------------------------------------------


async def test_the_emulator_liquidates_at_bankruptcy_with_bybits_wire_rows(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Mark past liqPrice: stops cancelled, one BustTrade at bankruptcy, the wallet loses margin."""
    executor = _executor(ex, store, [])
    async with _streams(ex, executor):
        await _open_long(emu, executor, "0.100")
    entry = emu.positions[SYMBOL].avg
    entry_fee = next(e.fee for e in emu.executions if e.order.link_id == "lev_0")
    await emu.set_mark(SYMBOL, emu._position_item(SYMBOL)["liqPrice"])  # at it: liquidated
    assert emu.positions[SYMBOL].size == 0
    assert _working_stops(emu) == []
    [(qty, price, fee)] = _forced(emu, "CreateByTakeOver_PassThrough")
    assert (qty, price) == (D("0.100"), entry * (1 - D(1) / 20))
    assert fee == qty * price * TAKER
    # Isolated margin at 20x: the wallet loses the margin and both fees, no more.
    assert emu.wallet["USDT"] == START - entry_fee - qty * entry / 20 - fee
    rows = (await ex._ccxt.private_get_v5_execution_list({"category": "linear"}))["result"]
    bust = next(r for r in rows["list"] if r["execType"] == "BustTrade")
    assert (bust["orderLinkId"], bust["createType"], bust["orderType"]) == (
        "",
        "CreateByTakeOver_PassThrough",
        "Market",
    )
    assert D(bust["closedSize"]) == qty
    history = await ex._ccxt.private_get_v5_order_history({"category": "linear"})
    by_type = {o["createType"]: o for o in history["result"]["list"]}
    liq_order = by_type["CreateByTakeOver_PassThrough"]
    assert (liq_order["orderType"], liq_order["orderStatus"]) == ("Market", "Filled")
    stops = await ex._ccxt.private_get_v5_order_history(
        {"category": "linear", "orderFilter": "StopOrder"}
    )
    assert [o["orderStatus"] for o in stops["result"]["list"]] == ["Deactivated"]
    # The private streams carry the same: the order, the BustTrade, the flat position.
    forced = {
        (topic, item.get("execType") or item["orderStatus"])
        for topic, data in emu.private_pushed
        for item in data
        if item.get("createType") == "CreateByTakeOver_PassThrough"
    }
    assert forced == {("order", "Filled"), ("execution", "BustTrade")}
    last_position = [data for topic, data in emu.private_pushed if topic == "position"][-1]
    assert [(D(p["size"]), p["side"]) for p in last_position] == [(D(0), "")]
    [fill] = [f for f in await ex.fetch_my_trades(LINEAR) if f.kind is FillKind.LIQUIDATION]
    assert (fill.qty, fill.price, fill.fee, fill.side) == (qty, price, fee, Side.SELL)
    await executor.close()


# -- Live: the executor books what the exchange did -----------------------------------------


async def test_a_liquidation_is_booked_once_the_stop_goes_and_a_restart_agrees(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """One trade at bankruptcy with the fee, flat, no stop, alerted; a restart books nothing."""
    events: list[Event] = []
    executor = _executor(ex, store, events)
    async with _streams(ex, executor):
        await _open_long(emu, executor, "0.100")
        _, bust = await _liquidate(emu)
        await eventually(lambda: executor.portfolio.position(LINEAR) is None)
        await eventually(lambda: executor.protective_stop(LINEAR)[0] is StopState.NONE)
        # The REST catch-up brings the same execution: booked once all the same.
        assert await _catch_up(ex, executor) == 0
    [(qty, price, fee)] = _forced(emu, "CreateByTakeOver_PassThrough")
    assert price == bust
    [trade] = executor.portfolio.closed
    assert trade.reason.startswith("liquidation")
    assert (D(str(trade.exit_price)), D(str(trade.qty))) == (bust, qty)
    entry_fee = next(e.fee for e in emu.executions if e.order.link_id == "lev_0")
    assert trade.fee == pytest.approx(float(entry_fee + fee))
    assert executor.portfolio.fees == entry_fee + fee
    assert _working_stops(emu) == []
    assert emu.positions[SYMBOL].size == 0
    [alert] = [e for e in events if isinstance(e, PositionLiquidated)]
    assert (alert.kind, alert.remaining, alert.fill.price) == (FillKind.LIQUIDATION, D(0), bust)
    assert render_event(alert).category == "liquidation"
    # The one event for the round trip: it carries the trade, no TradeClosed besides it.
    assert alert.trade == trade
    assert sum(isinstance(e, TradeClosed) for e in events) == 0
    await executor.close()

    restarted = _executor(ex, store, [])
    await restarted.reconcile(ex, store, quote="USDT")
    assert await _catch_up(ex, restarted) == 0
    assert await restarted.restore_protection(lambda pair: emu.last_price(SYMBOL, "linear")) == []
    assert restarted.portfolio.positions() == {}
    assert [t.reason[:11] for t in restarted.portfolio.closed] == ["liquidation"]
    assert restarted.portfolio.cash == emu.wallet["USDT"]
    assert _working_stops(emu) == []
    assert len(store.fills()) == 2
    await restarted.close()


async def test_the_operator_gets_one_telegram_message_for_a_liquidation(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The fake Bot API receives one message for the liquidation, with the trade's figures."""
    async with FakeTelegram() as api:
        settings = TelegramSettings(
            token=SecretStr(TOKEN),
            chat_ids=[CHAT],
            base_url=api.base_url,
            max_messages_per_second=50.0,
        )
        # Unbatched: every alert is its own Telegram message, so the count is the alerts'.
        bot = TelegramBot(settings, FakeControl(), poll_timeout=1.0, batch_alerts=False)
        await bot.start()
        notifier = TelegramNotifier(bot)
        executor = live_executor(ex, store, cash=START, notify=notifier, unknown_after_ms=10_000)
        async with _streams(ex, executor):
            await _open_long(emu, executor, "0.100")
            await eventually(lambda: len(api.messages_to(CHAT)) == 1)  # the entry's fill
            _, bust = await _liquidate(emu)
            await eventually(lambda: executor.portfolio.position(LINEAR) is None)
            assert await _catch_up(ex, executor) == 0  # the REST sweep: nothing more to tell
        await executor.close()
        await bot.stop(flush_timeout=5.0)  # everything queued goes out before it stops
        [trade] = executor.portfolio.closed
        entry, told = api.messages_to(CHAT)[0], api.messages_to(CHAT)[1:]
    assert entry.visible.startswith("✅ Filled buy")
    [message] = told
    text = message.visible
    assert text.startswith(f"🚨 {LINEAR} liquidated by the exchange")
    assert "Closed long" not in text
    [(_, _, fee)] = _forced(emu, "CreateByTakeOver_PassThrough")
    assert f"sell 0.1 @ {bust.normalize():f} · fee {float(fee):,.4f} USDT" in text
    assert f"P&L {trade.pnl:+,.2f} (" in text
    assert "position closed" in text
    assert f"long 0.1: {D(str(trade.entry_price)).normalize():f} → {bust.normalize():f}" in text
    assert f"fees {trade.fee:,.4f}" in text


async def test_a_liquidation_while_the_bot_was_down_is_booked_at_start(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Start-up books the liquidation it missed: flat, one trade, and no stop placed again."""
    first = _executor(ex, store, [])
    async with _streams(ex, first):
        await _open_long(emu, first, "0.050")
    await first.close()
    await _liquidate(emu)  # nobody is watching
    await emu.advance(minutes=5)  # the bot comes back five minutes later

    settings = exchange_settings(emu)
    async with Exchange(settings, retry_attempts=2, retry_base_s=0.01) as later:
        restarted = _executor(later, store, [])
        await restarted.reconcile(later, store, quote="USDT")
        # The daemon's catch-up window (its run's last minute) alone would miss it.
        recent = later.server_now_ms() - 60_000
        assert await later.fetch_my_trades(LINEAR, since=recent) == []
        assert await _catch_up(later, restarted, restarted.catch_up_since(recent)) == 1
        price = emu.last_price(SYMBOL, "linear")
        assert await restarted.restore_protection(lambda pair: price) == []
        assert restarted.portfolio.positions() == {}
        [trade] = restarted.portfolio.closed
        assert trade.reason.startswith("liquidation")
        assert _working_stops(emu) == []
        await restarted.close()
        again = _executor(later, store, [])
        await again.reconcile(later, store, quote="USDT")
        assert again.catch_up_since(recent) == recent  # nothing held: the usual window
        assert await _catch_up(later, again) == 0
        assert (again.portfolio.positions(), len(again.portfolio.closed)) == ({}, 1)
        await again.close()


async def test_adl_in_two_steps_resizes_the_stop_then_takes_it_off(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """A partial ADL leaves one stop sized to the rest; the second leaves flat and no stop."""
    events: list[Event] = []
    executor = _executor(ex, store, events)
    async with _streams(ex, executor):
        last = await _open_long(emu, executor, "0.100")
        await emu.auto_deleverage(SYMBOL, "0.040", last + 100)
        await eventually(lambda: _held(executor) == D("0.060"))
        await eventually(
            lambda: (
                _working_stops(emu) == [D("0.060")]
                and executor.protective_stop(LINEAR)[0] is StopState.WORKING
            )
        )
        await emu.auto_deleverage(SYMBOL, price=last + 200)
        await eventually(lambda: executor.portfolio.position(LINEAR) is None)
        await eventually(lambda: executor.protective_stop(LINEAR)[0] is StopState.NONE)
    assert _working_stops(emu) == []
    assert [t.reason[:3] for t in executor.portfolio.closed] == ["adl", "adl"]
    assert [D(str(t.qty)) for t in executor.portfolio.closed] == [D("0.040"), D("0.060")]
    assert [e.kind for e in events if isinstance(e, PositionLiquidated)] == [FillKind.ADL] * 2
    await executor.close()


# -- The live daemon: routing, the summary, a restart ---------------------------------------


async def _live_daemon(emu: BybitEmulator, events: list[Event]) -> Daemon:
    """Build the live daemon on the emulator (the journal and exchange, not its tasks)."""
    args = argparse.Namespace(mode="live", no_ui=True, duration=None, summary_json=None)
    daemon = Daemon(args, load_settings(env_file=None))
    daemon.notifiers.append(events.append)
    await daemon.build_exchange(paper=False)
    return daemon


async def test_the_live_daemon_books_alerts_and_counts_a_liquidation_once_across_a_restart(
    emu: BybitEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine path: one liquidated trade in the summary, one alert; a restart holds nothing."""
    for name, value in {
        **daemon_env(emu),
        "KESTREL_STRATEGY__PAIRS": f'["{LINEAR}"]',
        "KESTREL_STORAGE__DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    events: list[Event] = []
    daemon = await _live_daemon(emu, events)
    assert daemon.engine is not None
    await _open_long(emu, daemon.engine.executor, "0.050", settle=daemon._settle_fills)
    await _liquidate(emu)
    await daemon._settle_fills()  # the stream's REST sweep brings it
    await daemon._settle_fills()  # and again: booked once
    summary = daemon.engine.summary().to_dict()
    assert (summary["n_trades"], summary["liquidations"]) == (1, 1)
    assert summary["open_positions"] == []
    assert [type(e) for e in events].count(PositionLiquidated) == 1
    assert _working_stops(emu) == []
    await daemon.teardown()

    again = await _live_daemon(emu, [])
    assert again.engine is not None
    await again._settle_fills()
    assert again.engine.portfolio.positions() == {}
    restarted = again.engine.summary().to_dict()
    assert (restarted["open_positions"], restarted["liquidations"]) == ([], 1)
    assert await again.engine.executor.restore_protection(again.engine.price) == []
    assert _working_stops(emu) == []
    assert emu.positions[SYMBOL].size == 0
    await again.teardown()


async def test_a_sell_placed_by_hand_is_booked_once_and_the_stop_follows_the_rest(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """An order without our client id that sells part of the position: booked, stop resized."""
    events: list[Event] = []
    executor = _executor(ex, store, events)
    async with _streams(ex, executor):
        await _open_long(emu, executor, "0.100")
        # Placed outside the bot (Bybit's app, another script): no orderLinkId.
        await ex._ccxt.create_order(LINEAR, "market", "sell", 0.03, None, {"reduceOnly": True})
        await eventually(lambda: _held(executor) == D("0.070"))
        await eventually(
            lambda: (
                _working_stops(emu) == [D("0.070")]
                and executor.protective_stop(LINEAR)[0] is StopState.WORKING
            )
        )
        assert await _catch_up(ex, executor) == 0
    [trade] = executor.portfolio.closed
    assert trade.reason.startswith("closed on the exchange")
    assert D(str(trade.qty)) == D("0.03")
    [alert] = [e for e in events if isinstance(e, PositionLiquidated)]
    assert (alert.kind, alert.remaining) == (FillKind.TRADE, D("0.070"))
    await executor.close()
    restarted = _executor(ex, store, [])
    await restarted.reconcile(ex, store, quote="USDT")
    assert _held(restarted) == D("0.070")
    assert len(restarted.portfolio.closed) == 1
    await restarted.restore_protection(lambda pair: emu.last_price(SYMBOL, "linear"))
    assert _working_stops(emu) == [D("0.070")]
    await restarted.close()
