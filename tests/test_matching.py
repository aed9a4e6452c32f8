"""Matching engine: fills on constructed candles and books whose right answers are known."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from error_handler import OrderNotFoundError
from models import (
    Candle,
    Fill,
    Liquidity,
    Market,
    MarketType,
    Order,
    OrderBook,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    order_from_intent,
)
from tests.test_backtest_support import MINUTE, T0, frame
from trade_simulator import SimulatedExchange, quote_qty, sim_market, slipped_price
from utils.utilities import ReplayClock


PAIR = "BTC/USDT"
D = Decimal
HOUR = 60 * MINUTE


def market(lot: str = "0.001") -> Market:
    """Return simple rules: tick 0.01, the given lot, min notional 5."""
    return Market(
        pair=PAIR,
        symbol_id="BTCUSDT",
        base="BTC",
        quote="USDT",
        type=MarketType.SPOT,
        tick_size=D("0.01"),
        lot_size=D(lot),
        min_qty=D(lot),
        min_notional=D(5),
    )


def make_sim(**kwargs: object) -> tuple[SimulatedExchange, ReplayClock]:
    clock = ReplayClock(T0)
    options: dict[str, object] = {"taker_fee": 0.001, "maker_fee": 0.0002, "slippage_bps": 0.0}
    options.update(kwargs)
    sim = SimulatedExchange(clock=clock, markets={PAIR: market()}, **options)  # type: ignore[arg-type]
    return sim, clock


def bar(
    ts: int, o: float, h: float, lo: float, c: float, v: float = 100.0, tf: str = "1m"
) -> Candle:
    return Candle(PAIR, tf, ts, o, h, lo, c, v)


_ids = iter(range(1, 1_000_000))


def intent(side: Side, qty: str, kind: OrderType = OrderType.MARKET, **kw: object) -> OrderIntent:
    return OrderIntent(
        pair=PAIR,
        side=side,
        qty=D(qty),
        type=kind,
        client_order_id=f"t{next(_ids)}",
        reason="test",
        **kw,  # type: ignore[arg-type]
    )


async def long_position(sim: SimulatedExchange, clock: ReplayClock, qty: str = "1") -> None:
    """Open a long of `qty` at 100 on the bar at T0."""
    await sim.create_order(intent(Side.BUY, qty))
    fills = sim.on_candle(bar(T0, 100, 100, 100, 100))
    assert len(fills) == 1
    clock.set(T0 + MINUTE)


async def test_an_accepted_order_is_its_intent_open_with_the_sim_id() -> None:
    """The engine's order copies the intent (time in force, reason too), open and unfilled."""
    sim, clock = make_sim()
    wanted = intent(Side.BUY, "2", OrderType.LIMIT, price=D("99.5"), time_in_force=TimeInForce.IOC)
    order = await sim.create_order(wanted)
    assert order.exchange_order_id is not None
    assert order.exchange_order_id.startswith("sim-")
    assert order == order_from_intent(
        wanted, OrderStatus.OPEN, clock.now_ms(), exchange_order_id=order.exchange_order_id
    )
    assert (order.time_in_force, order.reason, order.price) == (
        TimeInForce.IOC,
        "test",
        D("99.5"),
    )
    assert (order.filled_qty, order.ts_updated) == (D(0), clock.now_ms())
    assert order_from_intent(wanted, OrderStatus.NEW, clock.now_ms()).ts_updated == 0


async def test_market_order_fills_at_the_next_open_with_fixed_slippage() -> None:
    """A buy placed at the close fills at the next open plus 10 bps, taker fee on the notional."""
    sim, _ = make_sim(slippage_bps=10)
    order = await sim.create_order(intent(Side.BUY, "2"))
    ((filled, fill),) = sim.on_candle(bar(T0, 100, 105, 95, 101))
    assert fill.price == D("100") * (1 + D(10) / D(10_000)) == D("100.1")
    assert fill.qty == D(2)
    assert fill.fee == D("100.1") * 2 * D("0.001")
    assert fill.liquidity is Liquidity.TAKER
    assert fill.ts == T0
    assert filled.status is OrderStatus.FILLED
    assert filled.client_order_id == order.client_order_id
    assert await sim.fetch_open_orders() == []


async def test_quote_sized_buy_spends_the_quote_after_fees_floored_to_the_lot() -> None:
    """A 1,000 USDT buy at 99.5 gets floor(1000 / (99.5 x 1.001), 0.001) = 10.040 BTC."""
    sim, _ = make_sim()
    await sim.create_order(intent(Side.BUY, "10", quote_amount=D(1000)))
    ((order, fill),) = sim.on_candle(bar(T0, 99.5, 100, 99, 99.8))
    assert fill.qty == D("10.040") == quote_qty(D(1000), D("99.5"), D("0.001"), D("0.001"))
    assert fill.qty * fill.price + fill.fee <= D(1000)
    assert order.status is OrderStatus.FILLED
    assert order.qty == fill.qty


async def test_fill_now_fills_at_the_last_close() -> None:
    """With fill_at=close the market order fills at once at the last close, at the clock's time."""
    sim, clock = make_sim(fill_at="close", slippage_bps=5)
    sim.on_candle(bar(T0, 100, 101, 99, 100.5))
    clock.set(T0 + MINUTE)
    await sim.create_order(intent(Side.SELL, "1"))
    ((_, fill),) = sim.fill_now(PAIR)
    assert fill.price == slipped_price(Side.SELL, D("100.5"), D(5))
    assert fill.ts == T0 + MINUTE


async def test_fills_reach_the_sink_as_the_matching_returns_them() -> None:
    """match() hands each fill, with the order's new state, to the sink; fill_at=close
    fills reach it from deliver_fills, the next-open convention's only on the next bar."""
    delivered: list[tuple[Order, Fill]] = []

    async def sink(order: Order, fill: Fill) -> None:
        delivered.append((order, fill))

    sim, clock = make_sim()
    sim.deliver_to(sink)
    sim.on_candle(bar(T0, 100, 101, 99, 100.5))
    await sim.create_order(intent(Side.BUY, "1"))
    await sim.deliver_fills(PAIR)
    assert delivered == []  # next_open: nothing fills before the next bar
    await sim.match(bar(T0 + MINUTE, 102, 103, 101, 102.5))
    ((order, fill),) = delivered
    assert fill.price == D(102)
    assert order.status is OrderStatus.FILLED
    assert order == sim.orders()[0]

    delivered.clear()
    at_close, clock = make_sim(fill_at="close")
    at_close.deliver_to(sink)
    await at_close.match(bar(T0, 100, 101, 99, 100.5))
    clock.set(T0 + MINUTE)
    await at_close.create_order(intent(Side.SELL, "1"))
    await at_close.deliver_fills(PAIR)
    ((order, fill),) = delivered
    assert (fill.price, fill.ts, order.status) == (D("100.5"), T0 + MINUTE, OrderStatus.FILLED)


async def test_fills_without_a_sink_are_refused_not_dropped() -> None:
    """A simulated exchange with no fill sink raises rather than losing a fill."""
    sim, _ = make_sim()
    await sim.match(bar(T0, 100, 101, 99, 100.5))  # nothing works: no fill, no sink needed
    await sim.create_order(intent(Side.BUY, "1"))
    with pytest.raises(RuntimeError, match="no sink"):
        await sim.match(bar(T0 + MINUTE, 102, 103, 101, 102.5))


@pytest.mark.parametrize(
    ("candle", "price"),
    [
        ((100, 101, 94, 96), D(95)),  # the low touches the stop: filled at the stop
        ((93, 94, 90, 92), D(93)),  # gap below the stop: filled at the (worse) open
    ],
)
async def test_sell_stop_fills_at_the_stop_or_the_gapped_open(
    candle: tuple[float, float, float, float], price: Decimal
) -> None:
    """A sell stop at 95 triggers on a touch; a gap through it fills at the open."""
    sim, clock = make_sim()
    await long_position(sim, clock)
    await sim.create_order(
        intent(Side.SELL, "1", OrderType.STOP_MARKET, stop_price=D(95), reduce_only=True)
    )
    ((_, fill),) = sim.on_candle(bar(T0 + MINUTE, *candle))
    assert fill.price == price
    assert fill.liquidity is Liquidity.TAKER


async def test_buy_stop_triggers_on_the_high() -> None:
    """A buy stop at 105 does nothing below it and fills at 105 when the high reaches it."""
    sim, _ = make_sim()
    await sim.create_order(intent(Side.BUY, "1", OrderType.STOP_MARKET, stop_price=D(105)))
    assert sim.on_candle(bar(T0, 100, 104.99, 99, 104)) == []
    ((_, fill),) = sim.on_candle(bar(T0 + MINUTE, 104, 106, 103, 105.5))
    assert fill.price == D(105)


@pytest.mark.parametrize(
    ("candle", "expected"),
    [
        ((101, 102, 100.0, 101), None),  # touching the limit is not trading through it
        ((101, 102, 99.5, 101), D(100)),  # traded through: filled at the limit
        ((99, 100, 98, 99.5), D(99)),  # opened below the limit: filled at the open
    ],
)
async def test_limit_buy_fills_only_when_traded_through(
    candle: tuple[float, float, float, float], expected: Decimal | None
) -> None:
    """A buy limit at 100 fills as maker at the limit or better, never on a touch."""
    sim, _ = make_sim()
    await sim.create_order(intent(Side.BUY, "1", OrderType.LIMIT, price=D(100)))
    fills = sim.on_candle(bar(T0, *candle))
    if expected is None:
        assert fills == []
        return
    ((_, fill),) = fills
    assert fill.price == expected
    assert fill.liquidity is Liquidity.MAKER
    assert fill.fee == expected * D("0.0002")


async def test_stop_is_assumed_first_when_a_bar_touches_stop_and_take_profit() -> None:
    """Long at 100, stop 95, take-profit 105, one bar from 94 to 106: the stop fills."""
    sim, clock = make_sim()
    await long_position(sim, clock)
    await sim.create_order(intent(Side.SELL, "1", OrderType.LIMIT, price=D(105), reduce_only=True))
    stop = await sim.create_order(
        intent(Side.SELL, "1", OrderType.STOP_MARKET, stop_price=D(95), reduce_only=True)
    )
    fills = sim.on_candle(bar(T0 + MINUTE, 100, 106, 94, 100))
    assert [(o.client_order_id, f.price) for o, f in fills] == [(stop.client_order_id, D(95))]
    assert await sim.fetch_open_orders(PAIR) == []  # the take-profit was cancelled


@pytest.mark.parametrize(("tp_first", "expected"), [(True, D(105)), (False, D(95))])
async def test_intrabar_candles_resolve_which_of_stop_and_take_profit_came_first(
    tp_first: bool, expected: Decimal
) -> None:
    """One 1h bar touches both; the 1m candles inside it decide which filled."""
    sim, clock = make_sim()
    await long_position(sim, clock)
    clock.set(T0 + HOUR)
    up = [100, 102, 104, 106, 103, 100]
    down = [100, 98, 96, 94, 97, 100]
    closes = (up + down) if tp_first else (down + up)
    fine = frame(closes, start_ms=T0 + HOUR)
    sim.set_intrabar(PAIR, fine, "1m")
    await sim.create_order(intent(Side.SELL, "1", OrderType.LIMIT, price=D(105), reduce_only=True))
    await sim.create_order(
        intent(Side.SELL, "1", OrderType.STOP_MARKET, stop_price=D(95), reduce_only=True)
    )
    fills = sim.on_candle(bar(T0 + HOUR, 100, 106, 94, 100, tf="1h"))
    assert [f.price for _, f in fills] == [expected]


async def test_participation_cap_spreads_a_market_order_over_bars() -> None:
    """At most 10% of each bar's volume fills: 5 BTC over bars of 20 BTC takes 3 bars."""
    sim, _ = make_sim(max_participation=0.1)
    await sim.create_order(intent(Side.BUY, "5"))
    qty = []
    statuses = []
    for k in range(4):
        for order, fill in sim.on_candle(bar(T0 + k * MINUTE, 100, 100, 100, 100, v=20)):
            qty.append(fill.qty)
            statuses.append(order.status)
    assert qty == [D(2), D(2), D(1)]
    assert statuses == [
        OrderStatus.PARTIALLY_FILLED,
        OrderStatus.PARTIALLY_FILLED,
        OrderStatus.FILLED,
    ]


async def test_capped_quote_order_keeps_its_remaining_budget() -> None:
    """A capped 1,000 USDT buy continues on later bars and never spends more than 1,000."""
    sim, _ = make_sim(max_participation=0.5)
    await sim.create_order(intent(Side.BUY, "1", quote_amount=D(1000)))
    spent = D(0)
    done = False
    for k in range(10):
        for order, fill in sim.on_candle(bar(T0 + k * MINUTE, 100, 100, 100, 100, v=6)):
            spent += fill.qty * fill.price + fill.fee
            assert fill.qty <= D(3)
            done = order.status is OrderStatus.FILLED
    assert done
    assert spent <= D(1000)
    assert D(1000) - spent < D("0.1") * (1 + D("0.001"))  # less than one lot's cost left


async def test_book_walk_averages_levels_and_waits_for_more_depth() -> None:
    """A 10 BTC buy against 7 BTC of asks fills 7 at their VWAP, the rest from the next book."""
    sim, _ = make_sim(slippage_model="book")
    sim.on_order_book(
        OrderBook(PAIR, T0, bids=((99.0, 5.0),), asks=((100.0, 1.0), (101.0, 1.0), (102.0, 5.0)))
    )
    await sim.create_order(intent(Side.BUY, "10"))
    ((order, fill),) = sim.on_candle(bar(T0, 100, 100, 100, 100))
    assert fill.qty == D(7)
    assert fill.price == (D(100) + D(101) + 5 * D(102)) / 7
    assert order.status is OrderStatus.PARTIALLY_FILLED
    assert sim.on_candle(bar(T0 + MINUTE, 100, 100, 100, 100)) == []  # depth used up
    sim.on_order_book(OrderBook(PAIR, T0 + MINUTE, bids=(), asks=((103.0, 10.0),)))
    ((order, fill),) = sim.on_candle(bar(T0 + 2 * MINUTE, 100, 100, 100, 100))
    assert fill.qty == D(3)
    assert fill.price == D(103)
    assert order.status is OrderStatus.FILLED


async def test_book_walk_with_a_quote_budget_stays_within_it() -> None:
    """A 500 USDT buy walking 100 then 110 gets 1 BTC + floor((500-100.1)/110.11, 0.001)."""
    sim, _ = make_sim(slippage_model="book")
    sim.on_order_book(OrderBook(PAIR, T0, bids=(), asks=((100.0, 1.0), (110.0, 100.0))))
    await sim.create_order(intent(Side.BUY, "4", quote_amount=D(500)))
    ((_, fill),) = sim.on_candle(bar(T0, 100, 100, 100, 100))
    second = ((D(500) - D("100.1")) / D("110.11")).quantize(D("0.001"), rounding="ROUND_FLOOR")
    assert fill.qty == 1 + second
    assert fill.qty * fill.price + fill.fee <= D(500)


async def test_volatility_slippage_scales_with_the_previous_range() -> None:
    """After a bar with a 2% range, a buy pays half of it (100 bps) over the open."""
    sim, _ = make_sim(slippage_model="volatility", slippage_bps=1)
    sim.on_candle(bar(T0, 100, 101, 99, 100))
    await sim.create_order(intent(Side.BUY, "1"))
    ((_, fill),) = sim.on_candle(bar(T0 + MINUTE, 200, 200, 200, 200))
    assert fill.price == D(200) * (1 + D(str(0.02 * 1e4 / 2)) / D(10_000))


async def test_latency_delays_an_order_past_bars_that_close_before_it_is_live() -> None:
    """With 90 s latency, an order sent at T0 misses the T0 bar and fills at the next open."""
    sim, _ = make_sim(latency_ms=90_000)
    await sim.create_order(intent(Side.BUY, "1"))
    assert sim.on_candle(bar(T0, 100, 100, 100, 100)) == []
    ((_, fill),) = sim.on_candle(bar(T0 + MINUTE, 101, 101, 101, 101))
    assert fill.price == D(101)


async def test_stop_limit_rests_as_a_limit_after_it_triggers() -> None:
    """A sell stop-limit (stop 95, limit 94) triggers on bar 1 and fills on bar 2 above 94."""
    sim, clock = make_sim()
    await long_position(sim, clock)
    await sim.create_order(
        intent(
            Side.SELL, "1", OrderType.STOP_LIMIT, stop_price=D(95), price=D(94), reduce_only=True
        )
    )
    assert sim.on_candle(bar(T0 + MINUTE, 96, 96, 93, 93.5)) == []
    ((_, fill),) = sim.on_candle(bar(T0 + 2 * MINUTE, 93.5, 95, 93, 94.5))
    assert fill.price == D(94)
    assert fill.liquidity is Liquidity.MAKER


async def test_post_only_that_would_cross_is_rejected() -> None:
    """A post-only buy at or above the last close is rejected, never filled as taker."""
    sim, _ = make_sim()
    sim.on_candle(bar(T0, 100, 100, 100, 100))
    order = await sim.create_order(
        intent(Side.BUY, "1", OrderType.LIMIT, price=D(100), time_in_force=TimeInForce.POST_ONLY)
    )
    assert order.status is OrderStatus.REJECTED


async def test_reduce_only_without_a_position_is_cancelled_not_filled() -> None:
    """A reduce-only sell with nothing held never opens a short."""
    sim, _ = make_sim()
    order = await sim.create_order(intent(Side.SELL, "1", reduce_only=True))
    assert sim.on_candle(bar(T0, 100, 100, 100, 100)) == []
    fetched = await sim.fetch_order(PAIR, client_order_id=order.client_order_id)
    assert fetched is not None
    assert fetched.status is OrderStatus.CANCELLED


async def test_cancel_and_fetch_follow_the_exchange_interface() -> None:
    """cancel_order cancels a working order; unknown ids raise OrderNotFoundError."""
    sim, _ = make_sim()
    order = await sim.create_order(intent(Side.BUY, "1", OrderType.LIMIT, price=D(50)))
    by_exchange_id = await sim.fetch_order(PAIR, exchange_order_id=order.exchange_order_id)
    assert by_exchange_id == order
    cancelled = await sim.cancel_order(PAIR, client_order_id=order.client_order_id)
    assert cancelled.status is OrderStatus.CANCELLED
    assert await sim.fetch_open_orders(PAIR) == []
    with pytest.raises(OrderNotFoundError):
        await sim.cancel_order(PAIR, client_order_id="nope")


def test_sim_market_scales_lot_and_tick_with_the_price() -> None:
    """BTC near 17,000 gets tick 0.1 and lot 1e-8; a 0.5 price gets lot 1."""
    btc = sim_market("BTC/USDT", 17_000.0)
    assert btc.tick_size == D("0.1")
    assert btc.lot_size == D("1e-8")
    assert btc.min_notional == D(5)
    assert sim_market("XRP/USDT", 0.5).lot_size == D(1)


# -- Property: fills never exceed the order or the liquidity ---------------------------------

order_specs = st.lists(
    st.tuples(
        st.sampled_from([OrderType.MARKET, OrderType.LIMIT, OrderType.STOP_MARKET]),
        st.sampled_from([Side.BUY, Side.SELL]),
        st.decimals(min_value=D("0.001"), max_value=D(50), places=3),
        st.booleans(),  # reduce-only
        st.booleans(),  # sized in quote
    ),
    min_size=1,
    max_size=6,
)
bars = st.lists(
    st.tuples(
        st.floats(90, 110),
        st.floats(0, 5),
        st.floats(0, 5),
        st.floats(0, 1),
        st.floats(0, 40),
    ),
    min_size=1,
    max_size=6,
)
books = st.lists(
    st.tuples(st.floats(90, 110), st.floats(0.001, 10)),
    min_size=0,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=order_specs,
    candles=bars,
    asks=books,
    bids=books,
    cap=st.one_of(st.none(), st.floats(0.01, 1)),
    model=st.sampled_from(["fixed", "book"]),
)
async def test_fills_never_exceed_order_quantity_or_available_liquidity(
    specs: list[tuple[OrderType, Side, Decimal, bool, bool]],
    candles: list[tuple[float, float, float, float, float]],
    asks: list[tuple[float, float]],
    bids: list[tuple[float, float]],
    cap: float | None,
    model: str,
) -> None:
    """Per order, per bar (participation cap) and per book, filled <= what was available."""
    sim, clock = make_sim(max_participation=cap, slippage_model=model)
    book = OrderBook(
        PAIR,
        T0,
        bids=tuple(sorted(((round(p, 2), s) for p, s in bids), reverse=True)),
        asks=tuple(sorted((round(p, 2), s) for p, s in asks)),
    )
    sim.on_order_book(book)
    orders: dict[str, tuple[OrderIntent, Decimal | None]] = {}
    for kind, side, qty, reduce_only, in_quote in specs:
        quote = qty * 100 if in_quote and kind is OrderType.MARKET and side is Side.BUY else None
        extra: dict[str, object] = {"reduce_only": reduce_only, "quote_amount": quote}
        if kind is OrderType.LIMIT:
            extra["price"] = D(100)
        if kind is OrderType.STOP_MARKET:
            extra["stop_price"] = D(99) if side is Side.SELL else D(101)
        spec = intent(side, str(qty), kind, **extra)
        await sim.create_order(spec)
        orders[spec.client_order_id] = (spec, quote)
    filled: dict[str, Decimal] = {}
    spent: dict[str, Decimal] = {}
    taken = {Side.BUY: D(0), Side.SELL: D(0)}
    position = D(0)
    for k, (o, up, down, frac, volume) in enumerate(candles):
        high, low = o + up, o - down
        close = low + (high - low) * frac
        results: list[tuple[Order, Fill]] = sim.on_candle(
            bar(T0 + k * MINUTE, o, high, low, close, v=volume)
        )
        per_bar = sum((f.qty for _, f in results), D(0))
        if cap is not None:
            assert per_bar <= D(str(volume * cap))
        for order, fill in results:
            spec, quote = orders[order.client_order_id]
            filled[spec.client_order_id] = filled.get(spec.client_order_id, D(0)) + fill.qty
            spent[spec.client_order_id] = spent.get(spec.client_order_id, D(0)) + (
                fill.qty * fill.price + fill.fee
            )
            before = position
            position += fill.qty if fill.side is Side.BUY else -fill.qty
            if spec.reduce_only:
                assert abs(position) <= abs(before)
                assert position * before >= 0  # never flips through zero
            if order.type is OrderType.MARKET and model == "book":
                taken[fill.side] += fill.qty
            if quote is not None:
                assert spent[spec.client_order_id] <= quote
            else:
                assert filled[spec.client_order_id] <= spec.qty
            assert order.filled_qty == filled[spec.client_order_id]
        clock.set(T0 + (k + 1) * MINUTE)
    event(f"orders filled: {len(filled)}")
    assert taken[Side.BUY] <= sum((D(str(s)) for _, s in book.asks), D(0))
    assert taken[Side.SELL] <= sum((D(str(s)) for _, s in book.bids), D(0))
