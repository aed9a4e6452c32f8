"""Orders that fill in pieces: on the wire, in the books, through a restart, in sim and live.

Real parts throughout: ccxt against the loopback Bybit emulator with the private streams
running as a live daemon runs them, the journal on a SQLite file, the executor and the
matching engine. The emulator is told how much liquidity there is, so a test chooses the
pieces an order fills in.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange import Exchange
from matching_engine import SimulatedExchange, sim_market
from models import (
    Candle,
    Fill,
    Liquidity,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    with_attempt,
)
from portfolio import Portfolio
from tests.bybit_emulator import BybitEmulator, exchange_settings
from tests.conftest import eventually
from tests.test_live_support import live_executor
from tests.test_live_support import private_streams as _streams
from tests.test_live_support import store as store  # the journal fixture
from trade_executor import StopState, TradeExecutor
from trade_store import TradeStore
from utils.utilities import AuditTrail, ReplayClock


LINEAR = "BTC/USDT:USDT"
SPOT = "BTC/USDT"
SYMBOL = "BTCUSDT"
D = Decimal


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded unified wallet."""
    async with BybitEmulator(balances={"USDT": "100000"}) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator."""
    exchange = Exchange(exchange_settings(emu), retry_attempts=2, retry_base_s=0.01)
    async with exchange:
        yield exchange


def _resting_buy(
    emu: BybitEmulator, cid: str, qty: str, *, take_profit: bool = False
) -> OrderIntent:
    last = emu.last_price(SYMBOL, "linear")
    return OrderIntent(
        LINEAR,
        Side.BUY,
        D(qty),
        OrderType.LIMIT,
        with_attempt(cid, 0),
        "test entry",
        price=last - D(50),
        stop_loss=(last * D("0.9")).quantize(D("0.1")),
        take_profit=(last * D("1.1")).quantize(D("0.1")) if take_profit else None,
    )


def _take_profits(emu: BybitEmulator) -> list[Decimal]:
    return [
        o.qty
        for o in emu.orders.values()
        if o.is_open and o.reduce_only and not o.conditional and o.order_type == "Limit"
    ]


def _working_stops(emu: BybitEmulator) -> list[Decimal]:
    return [o.qty for o in emu.orders.values() if o.conditional and o.is_open]


def _executions(emu: BybitEmulator, link_id: str) -> list[tuple[Decimal, Decimal, Decimal]]:
    return [(e.qty, e.price, e.fee) for e in emu.executions if e.order.link_id == link_id]


def _protected(emu: BybitEmulator, executor: TradeExecutor, qty: str | None = None) -> bool:
    """Return True when one stop works, the executor's, for `qty` (default: what is held)."""
    state, cid = executor.protective_stop(LINEAR)
    working = [(o.link_id, o.qty) for o in emu.orders.values() if o.conditional and o.is_open]
    wanted = D(qty) if qty is not None else _held(executor)
    return state is StopState.WORKING and working == [(cid, wanted)]


def _holds(executor: TradeExecutor, qty: Decimal) -> bool:
    return _held(executor) == qty


def _held(executor: TradeExecutor, pair: str = LINEAR) -> Decimal:
    position = executor.portfolio.position(pair)
    return D(0) if position is None else position.qty


# -- The emulator on the wire ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "category", "tif", "raw_status", "status"),
    [
        (SPOT, "spot", None, "PartiallyFilledCanceled", OrderStatus.CANCELLED),
        (LINEAR, "linear", TimeInForce.IOC, "Cancelled", OrderStatus.CANCELLED),
        (LINEAR, "linear", TimeInForce.GTC, "PartiallyFilled", OrderStatus.PARTIALLY_FILLED),
    ],
)
async def test_a_taker_walks_the_depth_and_its_rest_is_cancelled_or_rests(
    emu: BybitEmulator,
    ex: Exchange,
    pair: str,
    category: str,
    tif: TimeInForce | None,
    raw_status: str,
    status: OrderStatus,
) -> None:
    """One execution per level; market and IOC cancel the rest, a GTC limit rests with it."""
    emu.set_depth(SYMBOL, ["0.002", "0.003", "0.001"], category)
    last = emu.last_price(SYMBOL, category)
    tick = emu.instruments[(category, SYMBOL)].tick
    intent = OrderIntent(pair, Side.BUY, D("0.01"), OrderType.MARKET, "walk_0", "test")
    if tif is not None:  # a limit that reaches the second level only
        intent = OrderIntent(
            pair, Side.BUY, D("0.01"), OrderType.LIMIT, "walk_0", "t", price=last + 2 * tick
        )
        intent = replace(intent, time_in_force=tif)
    await ex.create_order(intent)
    order = await ex.fetch_order(pair, client_order_id="walk_0")
    raw = next(o for o in emu.orders.values() if o.link_id == "walk_0")

    pieces = _executions(emu, "walk_0")
    expected = [(D("0.002"), last + tick), (D("0.003"), last + 2 * tick)]
    if tif is None:
        expected.append((D("0.001"), last + 3 * tick))
    assert [(q, p) for q, p, _ in pieces] == expected
    assert raw.status == raw_status
    assert order is not None
    assert order.status is status
    filled = sum((q for q, _ in expected), D(0))
    assert order.filled_qty == filled
    assert order.avg_fill_price == sum((q * p for q, p in expected), D(0)) / filled
    assert order.fee == sum((f for _, _, f in pieces), D(0))
    rest = D("0.01") - filled if status is OrderStatus.PARTIALLY_FILLED else D(0)
    assert raw.item()["leavesQty"] == str(rest)


# -- Live: the books follow the pieces -------------------------------------------------------


async def test_the_position_fees_and_one_stop_follow_each_piece(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Each piece adds to the position and fees exactly; the stop and take-profit follow."""
    executor = live_executor(ex, store)
    intent = _resting_buy(emu, "pieces", "0.010", take_profit=True)
    async with _streams(ex, executor):
        order = await executor.submit(intent)
        assert order.status is OrderStatus.OPEN
        for piece in ("0.003", "0.001", "0.004", "0.002"):
            target = _held(executor) + D(piece)
            await emu.fill_resting(intent.client_order_id, piece)
            await eventually(functools.partial(_holds, executor, target))
            await eventually(lambda: _protected(emu, executor))
            await eventually(lambda: _take_profits(emu) == [_held(executor)])
            pieces = _executions(emu, intent.client_order_id)
            assert executor.portfolio.fees == sum((f for _, _, f in pieces), D(0))
            assert executor.portfolio.cash == D("100000") - sum(
                (q * p + f for q, p, f in pieces), D(0)
            )
        await eventually(
            lambda: executor.orders[intent.client_order_id].status is OrderStatus.FILLED
        )
    position = executor.portfolio.position(LINEAR)
    assert position is not None
    assert position.qty == D("0.010")
    assert position.entry_price == intent.price
    assert executor.protective_stop(LINEAR)[0] is StopState.WORKING
    assert [f.qty for f in store.fills()] == [D("0.003"), D("0.001"), D("0.004"), D("0.002")]


async def test_an_exit_on_a_partly_filled_entry_cancels_its_rest_first(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The exit closes what the pieces bought, and the rest of the entry can buy no more."""
    executor = live_executor(ex, store)
    intent = _resting_buy(emu, "halfway", "0.010")
    async with _streams(ex, executor):
        await executor.submit(intent)
        await emu.fill_resting(intent.client_order_id, "0.004")
        await eventually(lambda: _protected(emu, executor, "0.004"))
        exit_order = await executor.submit(
            OrderIntent(
                LINEAR,
                Side.SELL,
                D("0.004"),
                OrderType.MARKET,
                "out_0",
                "exit",
                reduce_only=True,
            )
        )
        assert exit_order.status is not OrderStatus.REJECTED
        await eventually(lambda: executor.portfolio.position(LINEAR) is None)
    raw = next(o for o in emu.orders.values() if o.link_id == intent.client_order_id)
    assert (raw.status, raw.filled) == ("Cancelled", D("0.004"))
    assert executor.orders[intent.client_order_id].status is OrderStatus.CANCELLED
    assert emu.positions[SYMBOL].size == 0
    assert _working_stops(emu) == []


async def test_a_restart_mid_fill_reconciles_from_the_exchanges_executions(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Pieces filled while the bot was down are in the rebuilt position and its one stop."""
    first = live_executor(ex, store)
    intent = _resting_buy(emu, "restart", "0.010")
    async with _streams(ex, first):
        await first.submit(intent)
        await emu.fill_resting(intent.client_order_id, "0.002")
        await eventually(lambda: _protected(emu, first, "0.002"))
    await first.close()
    # Down: two more pieces land, seen by nobody.
    await emu.fill_resting(intent.client_order_id, "0.003")
    await emu.fill_resting(intent.client_order_id, "0.001")

    restarted = live_executor(ex, store)
    report = await restarted.reconcile(ex, store, quote="USDT")
    assert "fills recorded while down 2" in report
    assert _held(restarted) == D("0.006")
    assert await restarted.restore_protection(lambda pair: emu.last_price(SYMBOL, "linear")) == []
    assert _working_stops(emu) == [D("0.006")]
    # The entry is still working: its last piece reaches the restarted bot.
    async with _streams(ex, restarted):
        await emu.fill_resting(intent.client_order_id, "0.004")
        await eventually(lambda: _protected(emu, restarted, "0.010"))
    assert _held(restarted) == D("0.010")
    assert restarted.orders[intent.client_order_id].status is OrderStatus.FILLED
    assert sum((f.qty for f in store.fills()), D(0)) == D("0.010")
    # Again: a second restart finds the same books and the same single stop.
    again = live_executor(ex, store)
    await again.reconcile(ex, store, quote="USDT")
    await again.restore_protection(lambda pair: emu.last_price(SYMBOL, "linear"))
    assert _held(again) == D("0.010")
    assert _working_stops(emu) == [D("0.010")]
    await restarted.close()
    await again.close()


async def test_a_lost_answer_to_an_order_filled_in_pieces_is_settled_once(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The create's answer is lost; its pieces are applied once, and the exit closes them."""
    emu.set_depth(SYMBOL, ["0.002", "0.002", "0.001"], "linear")
    emu.hang_s = 1.0  # the answer comes after the client gave up (0.5 s)
    quick = Exchange(exchange_settings(emu, timeout_s=0.5), retry_attempts=1, retry_base_s=0.01)
    await quick.__aenter__()
    ex = quick
    executor = live_executor(ex, store)
    entry = OrderIntent(LINEAR, Side.BUY, D("0.008"), OrderType.MARKET, "lost_0", "entry")
    async with _streams(ex, executor):
        emu.fail_next("timeout_after", path="/v5/order/create")
        with contextlib.suppress(Exception):
            await executor.submit(entry)
        exit_intent = OrderIntent(
            LINEAR, Side.SELL, D("0.005"), OrderType.MARKET, "lostx_0", "exit", reduce_only=True
        )
        emu.set_depth(SYMBOL, None, "linear")
        await executor.submit(exit_intent)  # settles the lost answer by its client id first
        await eventually(lambda: executor.portfolio.position(LINEAR) is None)
    assert executor.orders["lost_0"].status is OrderStatus.CANCELLED
    assert executor.orders["lost_0"].filled_qty == D("0.005")
    fees = sum((e.fee for e in emu.executions), D(0))
    assert executor.portfolio.fees == fees
    assert len(store.fills()) == 4  # three pieces in, one out, each once
    assert emu.positions[SYMBOL].size == 0
    await executor.close()
    await quick.__aexit__(None, None, None)


# -- Any order, any source: applied once -----------------------------------------------------


@st.composite
def _pieces(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """Return piece sizes (lots), prices (ticks above 100) and a delivery order with repeats."""
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    prices = draw(st.lists(st.integers(0, 500), min_size=len(sizes), max_size=len(sizes)))
    order = draw(st.permutations(list(range(len(sizes)))))
    repeats = draw(st.lists(st.integers(0, len(sizes) - 1), max_size=4))
    return sizes, prices, [*order, *repeats]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_pieces(), journal=st.booleans(), reports=st.integers(0, 2**16))
async def test_pieces_in_any_order_and_repeated_sum_exactly(
    case: tuple[list[int], list[int], list[int]], journal: bool, reports: int
) -> None:
    """Whatever the order, repeats and order reports between them: the sums are exact."""
    sizes, prices, delivery = case
    lot, tick = D("0.001"), D("0.01")
    pieces = [
        Fill(
            client_order_id="prop_0",
            pair=LINEAR,
            side=Side.BUY,
            price=D(100) + p * tick,
            qty=s * lot,
            fee=(D(100) + p * tick) * s * lot * D("0.0002"),
            fee_currency="USDT",
            liquidity=Liquidity.MAKER,
            ts=1_000 + i,
            fill_id=f"exec-{i}",
        )
        for i, (s, p) in enumerate(zip(sizes, prices, strict=True))
    ]
    total = sum((f.qty for f in pieces), D(0))
    with tempfile.TemporaryDirectory() as tmp:
        journal_store = (
            TradeStore.open(f"sqlite:///{tmp}/j.sqlite", bot_id="p", synchronous="OFF")
            if journal
            else None
        )
        executor, sim = _sim_executor(journal_store)
        entry = OrderIntent(
            LINEAR,
            Side.BUY,
            total,
            OrderType.LIMIT,
            "prop_0",
            "entry",
            price=D(90),
            stop_loss=D(80),
        )
        await executor.submit(entry, last_price=D(100))
        rng = random.Random(reports)
        cumulative = list(itertools.accumulate(f.qty for f in pieces))
        for index in delivery:
            if rng.random() < 0.5:  # the order stream (or a REST answer) runs ahead
                ahead = cumulative[min(len(pieces) - 1, rng.randrange(len(pieces)))]
                known = executor.orders["prop_0"]
                filled = max(ahead, known.filled_qty)
                status = OrderStatus.FILLED if filled == total else OrderStatus.PARTIALLY_FILLED
                await executor.on_order(
                    replace(known, filled_qty=filled, status=status, ts_updated=1_000 + index)
                )
            await executor.on_stream_fill(pieces[index])
        await executor.close()
        if journal_store is not None:
            journal_store.close()
    position = executor.portfolio.position(LINEAR)
    assert position is not None
    assert position.qty == total
    assert executor.portfolio.fees == sum((f.fee for f in pieces), D(0))
    assert executor.portfolio.cash == D(10_000) - sum(
        (f.qty * f.price + f.fee for f in pieces), D(0)
    )
    vwap = sum((f.qty * f.price for f in pieces), D(0)) / total
    assert abs(position.entry_price - vwap) < D("1e-20")
    assert executor.orders["prop_0"].status is OrderStatus.FILLED
    # One stop, for what is held.
    stops = [o for o in await sim.fetch_open_orders(LINEAR) if o.type is OrderType.STOP_MARKET]
    assert [o.qty for o in stops] == [total]


def _sim_executor(store: TradeStore | None) -> tuple[TradeExecutor, SimulatedExchange]:
    clock = ReplayClock()
    sim = SimulatedExchange(clock=clock, maker_fee=0.0002, taker_fee=0.00055)
    sim.markets[LINEAR] = _on_grid(sim_market(LINEAR, 100.0, MarketType.LINEAR), D("0.01"))
    executor = TradeExecutor(
        sim,
        Portfolio(D(10_000), quote="USDT"),
        market_for=lambda pair: sim.markets[pair],
        clock=clock,
        audit=AuditTrail(None),
        store=store,
    )

    async def on_fill(order: Order, fill: Fill) -> None:
        await executor.on_fill(order, fill)

    sim.deliver_to(on_fill)
    sim.deliver_orders_to(executor.on_order)
    return executor, sim


def _on_grid(market: Market, tick: Decimal) -> Market:
    """Return `market` on the emulator's linear BTC lot (0.001), the given tick, no minimum."""
    return replace(
        market, lot_size=D("0.001"), min_qty=D("0.001"), tick_size=tick, min_notional=D(0)
    )


# -- Sim: the matching engine reports the same states ----------------------------------------


def _bar(ts: int, low: float, volume: float) -> Candle:
    return Candle(LINEAR, "1m", ts, 100.0, 100.5, low, 100.0, volume)


async def test_the_matching_engine_cancels_the_rest_of_an_ioc_and_reports_it() -> None:
    """A partly filled IOC arrives cancelled with its fill; one that fills nothing, too."""
    executor, sim = _sim_executor(None)
    sim.max_participation = 1.0
    ioc = OrderIntent(
        LINEAR,
        Side.BUY,
        D("0.010"),
        OrderType.LIMIT,
        "ioc_0",
        "entry",
        price=D("99.50"),
        time_in_force=TimeInForce.IOC,
    )
    await executor.submit(ioc, last_price=D(100))
    await sim.match(_bar(60_000, 99.0, 0.004))
    order = executor.orders["ioc_0"]
    assert (order.status, order.filled_qty) == (OrderStatus.CANCELLED, D("0.004"))
    assert _held(executor) == D("0.004")
    assert not sim.has_working(LINEAR)

    executor.portfolio.restore(cash=D(10_000), positions=[])  # a new entry may go
    await executor.submit(replace(ioc, client_order_id="ioc2_0"), last_price=D(100))
    await sim.match(_bar(120_000, 99.8, 1.0))  # never trades through 99.50
    assert executor.orders["ioc2_0"].status is OrderStatus.CANCELLED
    assert executor.orders["ioc2_0"].filled_qty == 0


async def test_sim_and_live_keep_the_same_books_for_the_same_pieces(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The same pieces at the same prices leave the same position, fees, cash and stop."""
    sizes = [D("0.003"), D("0.002"), D("0.004")]
    live = live_executor(ex, store)
    intent = _resting_buy(emu, "twin", "0.009")
    async with _streams(ex, live):
        await live.submit(intent)
        for size in sizes:
            await emu.fill_resting(intent.client_order_id, size)
        await eventually(lambda: _protected(emu, live, "0.009"))
    assert intent.price is not None
    limit = intent.price
    sim_executor, sim = _sim_executor(None)
    sim.markets[LINEAR] = _on_grid(sim.markets[LINEAR], D("0.1"))
    sim.max_participation = 1.0
    sim_executor.portfolio.restore(cash=D("100000"), positions=[])
    sim_executor.portfolio.starting_cash = D("100000")
    await sim_executor.submit(intent, last_price=limit + 50)
    for k, size in enumerate(sizes):
        await sim.match(
            Candle(
                LINEAR,
                "1m",
                60_000 * (k + 1),
                float(limit + 10),
                float(limit + 20),
                float(limit - 10),
                float(limit),
                float(size),
            )
        )
    live_position, sim_position = (
        live.portfolio.position(LINEAR),
        sim_executor.portfolio.position(LINEAR),
    )
    assert live_position is not None
    assert sim_position is not None
    assert (live_position.qty, live_position.entry_price) == (
        sim_position.qty,
        sim_position.entry_price,
    )
    assert live.portfolio.fees == sim_executor.portfolio.fees
    assert live.portfolio.cash == sim_executor.portfolio.cash
    sim_stops = [o.qty for o in await sim.fetch_open_orders(LINEAR) if o.stop_price is not None]
    assert sim_stops == _working_stops(emu) == [D("0.009")]
    await live.close()


# -- Lost answers and kills in the middle of a resize ----------------------------------------


def _never_two_stops(emu: BybitEmulator) -> bool:
    """Return True when no two conditional orders were ever working at once."""
    intervals = sorted(
        (o.created, float("inf") if o.is_open else float(o.updated))
        for o in emu.orders.values()
        if o.conditional
    )
    return all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(intervals))


async def test_a_resize_whose_answer_is_lost_is_settled_by_id_before_the_next(
    emu: BybitEmulator, store: TradeStore
) -> None:
    """The resized stop's answer is lost; the next piece finds it by id: still one stop."""
    emu.hang_s = 1.0
    async with Exchange(
        exchange_settings(emu, timeout_s=0.5), retry_attempts=1, retry_base_s=0.01
    ) as quick:
        executor = live_executor(quick, store)
        intent = _resting_buy(emu, "lostresize", "0.009")
        async with _streams(quick, executor):
            await executor.submit(intent)
            await emu.fill_resting(intent.client_order_id, "0.002")
            await eventually(lambda: _protected(emu, executor, "0.002"))
            # The resized stop's answer is lost and every lookup of it times out.
            emu.fault_paths = ("/v5/order/realtime", "/v5/order/history")
            emu.fault_rates = {"timeout": 1.0}
            emu.fail_next("timeout_after", path="/v5/order/create")
            await emu.fill_resting(intent.client_order_id, "0.003")
            await eventually(
                lambda: executor.protective_stop(LINEAR)[0] is StopState.UNKNOWN, timeout=10.0
            )
            assert _working_stops(emu) == [D("0.005")]
            emu.clear_faults()
            await emu.fill_resting(intent.client_order_id, "0.004")
            await eventually(lambda: _protected(emu, executor, "0.009"), timeout=10.0)
        await executor.close()
    assert _never_two_stops(emu)
    assert _held(executor) == D("0.009")


async def test_a_restart_between_a_resizes_cancel_and_its_placement_protects_again(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Killed after the old stop's cancel: start-up places the stop, sized to what is held."""
    first = live_executor(ex, store)
    intent = _resting_buy(emu, "halfresize", "0.009")
    async with _streams(ex, first):
        await first.submit(intent)
        await emu.fill_resting(intent.client_order_id, "0.002")
        await eventually(lambda: _protected(emu, first, "0.002"))
    await first.close()
    _, old_stop = first.protective_stop(LINEAR)
    assert old_stop is not None
    level = next(o.trigger_price for o in emu.orders.values() if o.link_id == old_stop)
    await emu.fill_resting(intent.client_order_id, "0.003")
    await ex.cancel_order(LINEAR, client_order_id=old_stop)  # the cancel went, then the kill

    restarted = live_executor(ex, store)
    await restarted.reconcile(ex, store, quote="USDT")
    assert await restarted.restore_protection(lambda pair: emu.last_price(SYMBOL, "linear")) == []

    assert _protected(emu, restarted, "0.005")
    assert [o.trigger_price for o in emu.orders.values() if o.conditional and o.is_open] == [level]
    assert _never_two_stops(emu)
    await restarted.close()


async def test_a_first_piece_below_the_minimum_starts_the_position_and_is_no_dust() -> None:
    """A piece smaller than the market's minimum, with more to come, stays in the books."""
    executor, sim = _sim_executor(None)
    sim.markets[LINEAR] = replace(sim.markets[LINEAR], min_qty=D("0.005"))
    sim.max_participation = 1.0
    entry = OrderIntent(
        LINEAR, Side.BUY, D("0.010"), OrderType.LIMIT, "small_0", "entry", price=D("99.50")
    )
    await executor.submit(entry, last_price=D(100))
    await sim.match(_bar(60_000, 99.0, 0.002))
    assert _held(executor) == D("0.002")
    assert executor.orders["small_0"].status is OrderStatus.PARTIALLY_FILLED
    await sim.match(_bar(120_000, 99.0, 1.0))
    assert _held(executor) == D("0.010")
    assert executor.portfolio.cash == D(10_000) - D("0.010") * D("99.50") * D("1.0002")
