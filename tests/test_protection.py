"""One protective stop per position, whatever happens to the answers.

Real parts throughout: ccxt against the loopback Bybit emulator (spot, where orders carry
no reduce-only flag), the journal on a SQLite file, the executor a live daemon runs. The
verdict is read from the emulator's own order records: when each stop was working.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from exchange import Exchange
from models import OrderIntent, OrderStatus, OrderType, Side, with_attempt
from tests.bybit_emulator import BybitEmulator, exchange_settings
from tests.test_live_support import live_executor
from tests.test_live_support import store as store  # the journal fixture
from trade_executor import StopState, TradeExecutor
from trade_store import JournalState, TradeStore


PAIR = "BTC/USDT"
SYMBOL = "BTCUSDT"


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded spot wallet; held answers last 1.5 s."""
    async with BybitEmulator(balances={"USDT": "100000"}, hang_s=1.5) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator that gives up on an answer after 0.5 s."""
    exchange = Exchange(exchange_settings(emu, timeout_s=0.5), retry_attempts=2, retry_base_s=0.01)
    async with exchange:
        yield exchange


def _entry(cid: str, stop: Decimal) -> OrderIntent:
    return OrderIntent(
        PAIR,
        Side.BUY,
        Decimal("0.01"),
        OrderType.MARKET,
        with_attempt(cid, 0),
        "test",
        stop_loss=stop,
    )


async def _enter(ex: Exchange, executor: TradeExecutor, cid: str, stop: Decimal) -> None:
    """Buy, then hand the fill to the executor as the private stream would."""
    order = await executor.submit(_entry(cid, stop))
    assert order.status is OrderStatus.FILLED
    fills = [
        f for f in await ex.fetch_my_trades(PAIR) if f.client_order_id == order.client_order_id
    ]
    await executor.on_fill(executor.orders[order.client_order_id], fills[0])


def _stops(emu: BybitEmulator) -> list[tuple[int, float, str]]:
    return sorted(
        (o.created, float("inf") if o.is_open else float(o.updated), o.link_id)
        for o in emu.orders.values()
        if o.symbol == SYMBOL and o.conditional
    )


def _assert_never_two(emu: BybitEmulator) -> None:
    latest = (float("-inf"), "")
    for start, end, link_id in _stops(emu):
        assert start >= latest[0], f"stops {latest[1]} and {link_id} worked at once"
        latest = max(latest, (end, link_id))


def _working(emu: BybitEmulator) -> list[Decimal]:
    return [o.trigger_price for o in emu.orders.values() if o.conditional and o.is_open]


async def test_a_trailing_move_while_the_stop_is_unanswered_waits_for_it(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The stop's create answers late; a move meanwhile replaces it instead of adding one."""
    price = emu.last_price(SYMBOL)
    executor = live_executor(ex, store)
    emu.fail_next("timeout_after", path="/v5/order/create")  # the entry's answer is late
    order = await executor.submit(
        _entry("slow", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    )
    fills = await ex.fetch_my_trades(PAIR)
    # The stop's create is processed at once and answered only after the client gave up.
    emu.fail_next("timeout_after", path="/v5/order/create")
    protect = asyncio.create_task(
        executor.on_fill(executor.orders[order.client_order_id], fills[0])
    )
    await asyncio.sleep(0.1)
    assert len(_working(emu)) == 1  # the first stop already works on the exchange
    moved = await executor.amend_stop(PAIR, (price * Decimal("0.97")).quantize(Decimal("0.01")))
    await protect

    _assert_never_two(emu)
    assert _working(emu) == [(price * Decimal("0.97")).quantize(Decimal("0.01"))]
    assert moved is not None
    assert executor.protective_stop(PAIR) == (StopState.WORKING, moved.client_order_id)


async def test_a_stop_whose_answer_and_lookups_are_lost_is_resolved_before_the_next(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """With the stop's fate unknown, a move looks it up by id first: still one stop."""
    price = emu.last_price(SYMBOL)
    executor = live_executor(ex, store)
    order = await executor.submit(
        _entry("lost", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    )
    fills = await ex.fetch_my_trades(PAIR)
    # The stop's answer is lost and every lookup times out: the executor cannot know it.
    emu.fault_paths = ("/v5/order/realtime", "/v5/order/history")
    emu.fault_rates = {"timeout": 1.0}
    emu.fail_next("timeout_after", path="/v5/order/create")
    await executor.on_fill(executor.orders[order.client_order_id], fills[0])
    state, first = executor.protective_stop(PAIR)
    assert state is StopState.UNKNOWN
    assert len(_working(emu)) == 1
    emu.clear_faults()

    moved = await executor.amend_stop(PAIR, (price * Decimal("0.96")).quantize(Decimal("0.01")))

    _assert_never_two(emu)
    assert moved is not None
    assert moved.client_order_id != first
    assert _working(emu) == [(price * Decimal("0.96")).quantize(Decimal("0.01"))]
    assert store.journal_state(first or "") is JournalState.ACKNOWLEDGED


async def test_shutdown_cancels_entries_and_keeps_the_stop_on_spot(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Spot reports no reduce-only flag: the journal tells the stop from a resting entry."""
    price = emu.last_price(SYMBOL)
    executor = live_executor(ex, store)
    await _enter(ex, executor, "kept", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    # A resting entry on another pair (one on top of the held position would be refused).
    eth = emu.last_price("ETHUSDT")
    resting = OrderIntent(
        "ETH/USDT",
        Side.BUY,
        Decimal("0.1"),
        OrderType.LIMIT,
        with_attempt("resting", 0),
        "test",
        price=(eth * Decimal("0.8")).quantize(Decimal("0.01")),
    )
    assert (await executor.submit(resting)).status is OrderStatus.OPEN
    open_before = [o for o in emu.orders.values() if o.is_open]
    assert {o.conditional for o in open_before} == {True, False}
    assert all(not o.reduce_only for o in open_before)  # spot: no flag on the wire

    assert await executor.cancel_entries() == 1

    still_open = [o for o in emu.orders.values() if o.is_open]
    assert [o.conditional for o in still_open] == [True]


async def test_a_decision_taken_again_after_a_restart_is_not_sent_twice(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The restarted bot derives the same id; it adopts the first order and sends nothing."""
    intent = OrderIntent(
        PAIR, Side.BUY, Decimal("0.01"), OrderType.MARKET, with_attempt("again", 0), "test"
    )
    first = await live_executor(ex, store).submit(intent)
    again = await live_executor(ex, store).submit(intent)

    buys = [o for o in emu.orders.values() if o.side == "Buy"]
    assert len(buys) == 1
    assert again.client_order_id == first.client_order_id
    assert [o.client_order_id for o, _ in store.attempts("again")] == [first.client_order_id]


async def test_a_decision_never_sent_moves_to_its_next_attempt(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """An attempt the exchange refused before acting lets the same decision go once more."""
    intent = OrderIntent(
        PAIR, Side.BUY, Decimal("0.01"), OrderType.MARKET, with_attempt("retry", 0), "test"
    )
    emu.fail_next("insufficient", path="/v5/order/create")
    refused = await live_executor(ex, store).submit(intent)
    assert refused.status is OrderStatus.REJECTED
    sent = await live_executor(ex, store).submit(intent)

    assert sent.client_order_id == with_attempt("retry", 1)
    assert [o.link_id for o in emu.orders.values()] == [with_attempt("retry", 1)]


async def test_reconcile_keeps_the_newest_of_two_working_stops(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """A journal left with two working stops (an old bot's race) starts with one."""
    price = emu.last_price(SYMBOL)
    executor = live_executor(ex, store)
    await _enter(ex, executor, "twice", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    extra = OrderIntent(
        PAIR,
        Side.SELL,
        Decimal("0.009"),
        OrderType.STOP_MARKET,
        with_attempt("twice_0-sl99", 0),
        "old race",
        stop_price=(price * Decimal("0.9")).quantize(Decimal("0.01")),
        reduce_only=True,
    )
    store.journal(extra, 1)
    store.acknowledge(await ex.create_order(extra))
    assert len(_working(emu)) == 2

    restarted = live_executor(ex, store)
    await restarted.reconcile(ex, store, quote="USDT")

    assert _working(emu) == [(price * Decimal("0.9")).quantize(Decimal("0.01"))]
    assert restarted.protective_stop(PAIR) == (StopState.WORKING, extra.client_order_id)


async def test_a_position_left_without_its_stop_gets_it_back_before_trading(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Killed between the entry's fill and its stop: start-up places the journaled stop."""
    price = emu.last_price(SYMBOL)
    level = (price * Decimal("0.95")).quantize(Decimal("0.01"))
    await live_executor(ex, store).submit(_entry("bare", level))  # no fill seen: no stop placed
    assert _working(emu) == []

    restarted = live_executor(ex, store)
    await restarted.reconcile(ex, store, quote="USDT")
    crossed = await restarted.restore_protection(lambda pair: price)

    assert crossed == []
    assert _working(emu) == [level]
    assert restarted.protective_stop(PAIR)[0] is StopState.WORKING
    # A second start finds it working and places nothing more.
    again = live_executor(ex, store)
    await again.reconcile(ex, store, quote="USDT")
    assert await again.restore_protection(lambda pair: price) == []
    assert _working(emu) == [level]


async def test_a_position_already_past_its_stop_is_handed_back_to_close(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """No stop is placed through the market: the engine is told to exit instead."""
    price = emu.last_price(SYMBOL)
    await live_executor(ex, store).submit(
        _entry("through", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    )
    restarted = live_executor(ex, store)
    await restarted.reconcile(ex, store, quote="USDT")

    crossed = await restarted.restore_protection(lambda pair: price * Decimal("0.9"))

    assert crossed == [PAIR]
    assert _working(emu) == []


async def test_an_exit_never_sells_more_than_the_exchange_holds(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Coins gone from the account (sold elsewhere) cap the exit: never past flat."""
    price = emu.last_price(SYMBOL)
    executor = live_executor(ex, store)
    await _enter(ex, executor, "capped", (price * Decimal("0.95")).quantize(Decimal("0.01")))
    held = emu.wallet["BTC"]
    emu.wallet["BTC"] = held / 2  # half of it left the account behind the bot's back
    exit_intent = OrderIntent(
        PAIR,
        Side.SELL,
        held,
        OrderType.MARKET,
        with_attempt("capped-x", 0),
        "exit",
        reduce_only=True,
    )

    order = await executor.submit(exit_intent)

    assert order.status is OrderStatus.FILLED
    assert order.qty <= held / 2
    assert emu.wallet["BTC"] >= 0
    assert _working(emu) == []  # the stop came off before the exit
