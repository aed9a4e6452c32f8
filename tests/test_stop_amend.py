"""A trailing stop is moved in place: one amend, the same order, never two stops nor none.

Real parts: the simulated venue (with a seam that loses answers after the venue acted),
and ccxt against the loopback Bybit emulator with the journal on a SQLite file. The
verdict is read from the venue's own orders: how many stops work, and at what trigger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from error_handler import NetworkError, OrderNotFoundError
from exchange import Exchange
from matching_engine import SimulatedExchange, sim_market
from models import Candle, Fill, Order, OrderIntent, OrderStatus, OrderType, Side, with_attempt
from portfolio import Portfolio
from tests.bybit_emulator import MINUTE_MS, BybitEmulator, exchange_settings
from tests.conftest import eventually
from tests.test_live_support import live_executor
from tests.test_live_support import store as store  # the journal fixture
from trade_executor import StopState, TradeExecutor
from trade_store import TradeStore
from utils.utilities import AuditTrail, ReplayClock


D = Decimal
PAIR = "BTC/USDT"
SYMBOL = "BTCUSDT"
AMEND = "/v5/order/amend"
CANCEL = "/v5/order/cancel"
START = 1_700_000_040_000


# -- The simulated venue -----------------------------------------------------------------------


class LossyVenue:
    """The simulated venue behind a seam that loses answers: amends after the venue acted,
    lookups before it answered (the failures a network gives)."""

    def __init__(self, sim: SimulatedExchange) -> None:
        self.sim = sim
        self.lose_amend = False
        self.lose_lookup = False

    async def create_order(self, intent: OrderIntent) -> Order:
        """Place through the venue."""
        return await self.sim.create_order(intent)

    async def amend_order(self, pair: str, *, client_order_id: str, trigger_price: D) -> Order:
        """Amend on the venue; lose the answer when told."""
        order = await self.sim.amend_order(
            pair, client_order_id=client_order_id, trigger_price=trigger_price
        )
        if self.lose_amend:
            raise NetworkError("answer lost", pair=pair, order_id=client_order_id)
        return order

    async def cancel_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order:
        """Cancel on the venue."""
        return await self.sim.cancel_order(
            pair, client_order_id=client_order_id, exchange_order_id=exchange_order_id
        )

    async def fetch_order(
        self, pair: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> Order | None:
        """Look up on the venue; fail when told."""
        if self.lose_lookup:
            raise NetworkError("lookup lost", pair=pair, order_id=client_order_id)
        return await self.sim.fetch_order(
            pair, client_order_id=client_order_id, exchange_order_id=exchange_order_id
        )

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """List the venue's working orders."""
        return await self.sim.fetch_open_orders(pair)

    async def deliver_fills(self, pair: str) -> None:
        """Hand the venue's fills over."""
        await self.sim.deliver_fills(pair)


def _candle(ts: int, low: float = 99.0, high: float = 101.0) -> Candle:
    return Candle(PAIR, "1m", ts, 100.0, high, low, 100.0, 10.0)


async def sim_entered(
    venue_type: type[LossyVenue] = LossyVenue, fill_at: Literal["next_open", "close"] = "close"
) -> tuple[TradeExecutor, SimulatedExchange, LossyVenue, ReplayClock]:
    """Return an executor on the simulated venue (behind the seam) that sent a long, stop 95.

    Filled at once with `fill_at="close"`; with "next_open", at the next candle's match.
    """
    clock = ReplayClock(START)
    sim = SimulatedExchange(clock=clock, fill_at=fill_at, maker_fee=0, taker_fee=0)
    sim.markets[PAIR] = replace(sim_market(PAIR, 100.0), tick_size=D("0.01"))
    venue = venue_type(sim)
    executor = TradeExecutor(
        venue,
        Portfolio(D(10_000), quote="USDT"),
        market_for=lambda pair: sim.markets[pair],
        clock=clock,
        audit=AuditTrail(None),
    )

    async def on_fill(order: Order, fill: Fill) -> None:
        await executor.on_fill(order, fill)

    sim.deliver_to(on_fill)
    sim.deliver_orders_to(executor.on_order)
    await sim.match(_candle(START - MINUTE_MS))
    entry = OrderIntent(
        PAIR, Side.BUY, D(1), OrderType.MARKET, with_attempt("e", 0), "entry", stop_loss=D(95)
    )
    await executor.submit(entry, last_price=D(100))
    return executor, sim, venue, clock


async def _sim_long() -> tuple[TradeExecutor, SimulatedExchange, LossyVenue]:
    """Return an executor holding a long on the simulated venue (behind the seam), stop 95."""
    executor, sim, venue, _ = await sim_entered()
    await executor.deliver_fills(PAIR)
    return executor, sim, venue


async def _sim_stops(sim: SimulatedExchange) -> list[Order]:
    return [o for o in await sim.fetch_open_orders(PAIR) if o.type is OrderType.STOP_MARKET]


async def test_a_trailing_move_amends_the_simulated_stop_and_the_next_bar_uses_it() -> None:
    """One order moved in place; a bar between the old and new triggers fills it at the new."""
    executor, sim, _ = await _sim_long()
    (stop,) = await _sim_stops(sim)

    moved = await executor.amend_stop(PAIR, D("97.5"), candle_ts=START)

    assert moved is not None
    assert moved.client_order_id == stop.client_order_id
    assert [(o.client_order_id, o.stop_price) for o in await _sim_stops(sim)] == [
        (stop.client_order_id, D("97.5"))
    ]
    assert len(sim.orders()) == 2  # the entry and the one stop: no order per move
    assert executor.protective_stop(PAIR) == (StopState.WORKING, stop.client_order_id)
    assert _recorded_stop(executor) == D("97.5")
    # Moving to the same level again sends nothing (a replayed candle).
    assert await executor.amend_stop(PAIR, D("97.5"), candle_ts=START) == moved

    await sim.match(_candle(START + MINUTE_MS, low=96.0))

    assert executor.portfolio.position(PAIR) is None
    closed = executor.portfolio.closed[-1]
    assert closed.exit_price == D("97.5")
    assert await _sim_stops(sim) == []


async def test_a_deferred_move_is_made_before_the_pairs_next_order_and_never_after_it() -> None:
    """A burst defers its stop moves: the pair's exit makes the move first (then takes the
    stop off), so no stop is left or placed behind the exit; a flush makes the others."""
    executor, sim, _ = await _sim_long()
    (stop,) = await _sim_stops(sim)

    executor.defer_stop_move(PAIR, D("97.5"), candle_ts=START)
    assert [o.stop_price for o in await _sim_stops(sim)] == [D(95)]  # not made yet

    exit_ = OrderIntent(
        PAIR, Side.SELL, D(1), OrderType.MARKET, with_attempt("x", 0), "exit", reduce_only=True
    )
    await executor.submit(exit_, last_price=D(100))
    await executor.deliver_fills(PAIR)

    # The move was made (the stop order carries the new level), then the exit took it off.
    cancelled = sim.orders()[[o.client_order_id for o in sim.orders()].index(stop.client_order_id)]
    assert (cancelled.stop_price, cancelled.status) == (D("97.5"), OrderStatus.CANCELLED)
    assert await _sim_stops(sim) == []
    assert executor.portfolio.position(PAIR) is None
    await executor.flush_stop_moves()  # nothing left to make: no stop placed after the exit
    assert await _sim_stops(sim) == []
    assert len(sim.orders()) == 3  # entry, its one stop, the exit


async def test_deferred_moves_wait_for_the_flush() -> None:
    """A deferred move is made by the flush, once; a dropped one is not made at all."""
    executor, sim, _ = await _sim_long()
    (stop,) = await _sim_stops(sim)
    executor.defer_stop_move(PAIR, D(96), candle_ts=START)
    executor.defer_stop_move(PAIR, D("96.5"), candle_ts=START)  # the later move replaces it
    assert [o.stop_price for o in await _sim_stops(sim)] == [D(95)]
    await executor.flush_stop_moves()
    assert [(o.client_order_id, o.stop_price) for o in await _sim_stops(sim)] == [
        (stop.client_order_id, D("96.5"))
    ]
    assert _recorded_stop(executor) == D("96.5")
    executor.defer_stop_move(PAIR, D(97), candle_ts=START + MINUTE_MS)
    assert executor.drop_stop_moves() == 1
    await executor.flush_stop_moves()
    assert [o.stop_price for o in await _sim_stops(sim)] == [D("96.5")]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.integers(9_500, 9_900), st.booleans(), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
async def test_any_moves_and_lost_answers_leave_one_stop_at_the_recorded_level(
    steps: list[tuple[int, bool, bool]],
) -> None:
    """Whatever amends and lookups lose, one stop works; once settled, at the recorded level."""
    executor, sim, venue = await _sim_long()
    (first,) = await _sim_stops(sim)
    seen = {D(95)}
    for n, (cents, lose_amend, lose_lookup) in enumerate(steps):
        level = D(cents) / 100
        venue.lose_amend, venue.lose_lookup = lose_amend, lose_lookup
        await executor.amend_stop(PAIR, level, candle_ts=START + n * MINUTE_MS)
        (stop,) = await _sim_stops(sim)  # exactly one, and always the same order
        assert stop.client_order_id == first.client_order_id
        assert executor.protective_stop(PAIR) == (StopState.WORKING, first.client_order_id)
        seen.add(level)
        position = executor.portfolio.position(PAIR)
        assert position is not None
        assert position.stop_price in seen  # a level the venue has had
        if not (lose_amend and lose_lookup):
            assert stop.stop_price == level == position.stop_price
    venue.lose_amend = venue.lose_lookup = False
    await executor.amend_stop(PAIR, D("98.5"), candle_ts=START + len(steps) * MINUTE_MS)
    (stop,) = await _sim_stops(sim)
    position = executor.portfolio.position(PAIR)
    assert position is not None
    assert stop.stop_price == position.stop_price == D("98.5")


# -- The Bybit emulator ------------------------------------------------------------------------


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded spot wallet; held answers last 1 s."""
    async with BybitEmulator(balances={"USDT": "100000"}, hang_s=1.0) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange that gives up on an answer after 0.5 s, with fast retries."""
    exchange = Exchange(exchange_settings(emu, timeout_s=0.5), retry_attempts=2, retry_base_s=0.01)
    async with exchange:
        yield exchange


async def _enter(emu: BybitEmulator, ex: Exchange, executor: TradeExecutor, cid: str) -> D:
    """Buy with a stop 5% under the market, handing the fill over as the stream would."""
    price = emu.last_price(SYMBOL)
    intent = OrderIntent(
        PAIR,
        Side.BUY,
        D("0.01"),
        OrderType.MARKET,
        with_attempt(cid, 0),
        "test",
        stop_loss=(price * D("0.95")).quantize(D("0.01")),
    )
    order = await executor.submit(intent)
    assert order.status is OrderStatus.FILLED
    fills = [
        f for f in await ex.fetch_my_trades(PAIR) if f.client_order_id == order.client_order_id
    ]
    await executor.on_fill(executor.orders[order.client_order_id], fills[0])
    return price


def _working(emu: BybitEmulator) -> list[tuple[str, D]]:
    return [
        (o.link_id, o.trigger_price) for o in emu.orders.values() if o.conditional and o.is_open
    ]


def _recorded_stop(executor: TradeExecutor) -> Decimal | None:
    """Return the stop level the portfolio records for the open position."""
    position = executor.portfolio.position(PAIR)
    assert position is not None
    return position.stop_price


def _conditional(emu: BybitEmulator) -> list[str]:
    return [o.link_id for o in emu.orders.values() if o.conditional]


async def test_a_trailing_move_amends_the_stop_on_bybit(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """One amend request moves the trigger of the same order: no cancel, no new order."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "trail")
    ((cid, _),) = _working(emu)
    level = (price * D("0.97")).quantize(D("0.01"))

    moved = await executor.amend_stop(PAIR, level + D("0.004"))  # rounded up to the tick

    assert moved is not None
    assert moved.client_order_id == cid
    assert _working(emu) == [(cid, level + D("0.01"))]
    assert _conditional(emu) == [cid]
    assert emu.requests_to(CANCEL) == []
    (request,) = emu.requests_to(AMEND)
    assert request.body is not None
    assert request.body["orderLinkId"] == cid
    assert D(request.body["triggerPrice"]) == level + D("0.01")
    assert executor.protective_stop(PAIR) == (StopState.WORKING, cid)
    assert _recorded_stop(executor) == level + D("0.01")
    journaled = store.get_intent(cid)
    assert journaled is not None
    assert journaled.stop_price == level + D("0.01")


async def test_an_amend_whose_answer_is_lost_after_it_worked_leaves_one_stop_at_a_known_level(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The retry is refused as "unchanged": read back, that is the move done; one stop."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "lostamend")
    ((cid, _),) = _working(emu)
    level = (price * D("0.97")).quantize(D("0.01"))
    emu.fail_next("timeout_after", path=AMEND)

    moved = await executor.amend_stop(PAIR, level)

    assert _working(emu) == [(cid, level)]
    assert [r.fault for r in emu.requests_to(AMEND)] == ["timeout_after", None]
    assert emu.requests_to(AMEND)[-1].ret_code == 10001  # Bybit: nothing to change
    assert moved is not None
    assert moved.stop_price == level
    assert _recorded_stop(executor) == level


async def test_an_amend_and_its_lookups_all_lost_still_leave_one_stop_then_settle(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """Nothing is answered: one stop stays, the old level is kept; the next move settles it."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "dark")
    ((cid, old),) = _working(emu)
    level = (price * D("0.97")).quantize(D("0.01"))
    emu.fault_paths = (AMEND, "/v5/order/realtime", "/v5/order/history")
    emu.fault_rates = {"timeout_after": 1.0}

    await executor.amend_stop(PAIR, level)

    assert _working(emu) == [(cid, level)]  # the exchange applied it
    assert _recorded_stop(executor) == old  # the level the exchange last confirmed
    assert executor.protective_stop(PAIR) == (StopState.WORKING, cid)
    emu.clear_faults()

    await executor.amend_stop(PAIR, level)  # the same move, on the next candle

    assert _working(emu) == [(cid, level)]
    assert _conditional(emu) == [cid]
    assert _recorded_stop(executor) == level


async def test_an_amend_racing_a_stop_that_fired_places_no_second_stop(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """The stop fills on the exchange as the move is sent: refused, settled, nothing placed."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "fired")
    ((cid, _),) = _working(emu)
    # The market falls through the stop within this minute (the bar's high is surely hit).
    now = emu.clock.now_ms()
    bar = emu.series[("spot", SYMBOL)].minute(now - now % MINUTE_MS)
    raw = next(o for o in emu.orders.values() if o.link_id == cid)
    raw.trigger_price = bar.high
    await emu.advance(minutes=1)
    await eventually(lambda: not raw.is_open)

    move = asyncio.create_task(executor.amend_stop(PAIR, (price * D("0.97")).quantize(D("0.01"))))
    await eventually(lambda: any(r.ret_code == 170213 for r in emu.requests_to(AMEND)))
    # The private stream brings the stop's fill while the move waits for it.
    fills = [f for f in await ex.fetch_my_trades(PAIR) if f.client_order_id == cid]
    stop_order = await ex.fetch_order(PAIR, client_order_id=cid)
    assert stop_order is not None
    await _deliver(executor, stop_order, fills)
    moved = await move

    assert moved is None
    assert emu.requests_to(AMEND)[-1].ret_code == 170213  # spot: order does not exist
    assert _conditional(emu) == [cid]  # no second stop
    assert _working(emu) == []
    assert executor.portfolio.position(PAIR) is None
    assert executor.protective_stop(PAIR) == (StopState.NONE, None)


async def _deliver(executor: TradeExecutor, order: Order, fills: list[Fill]) -> None:
    for fill in fills:
        await executor.on_fill(order, fill)


async def test_a_restart_takes_the_stop_level_from_the_exchange_trigger(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """After moves in place, reconciliation adopts the same order at its amended trigger."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "restart")
    ((cid, _),) = _working(emu)
    level = (price * D("0.97")).quantize(D("0.01"))
    await executor.amend_stop(PAIR, level)

    restarted = live_executor(ex, store)
    await restarted.reconcile(ex, store, quote="USDT")

    assert restarted.protective_stop(PAIR) == (StopState.WORKING, cid)
    position = restarted.portfolio.position(PAIR)
    assert position is not None
    assert position.stop_price == level
    assert await restarted.restore_protection(lambda pair: price) == []
    await restarted.amend_stop(PAIR, level)  # the same candle's move, decided again
    assert len(emu.requests_to(AMEND)) == 1
    assert _working(emu) == [(cid, level)]


async def test_the_exchange_refuses_to_amend_an_order_that_is_gone(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A cancelled stop cannot be amended: OrderNotFoundError, and nothing is placed."""
    price = emu.last_price(SYMBOL)
    stop = OrderIntent(
        PAIR,
        Side.BUY,
        D("0.01"),
        OrderType.STOP_MARKET,
        "gone-sl0_0",
        "test",
        stop_price=(price * D("1.1")).quantize(D("0.01")),
    )
    await ex.create_order(stop)
    await ex.cancel_order(PAIR, client_order_id="gone-sl0_0")

    with pytest.raises(OrderNotFoundError):
        await ex.amend_order(PAIR, client_order_id="gone-sl0_0", trigger_price=price * D("1.05"))

    assert emu.requests_to(AMEND)[-1].ret_code == 170213
    assert len(emu.orders_by_link_id()["gone-sl0_0"]) == 1


async def test_amends_sent_together_keep_within_the_spot_amend_limit(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Bybit takes 10 spot amends a second (20 creates): 24 amends under way at once wait
    for the amend budget (8 a second with the safety margin) and none is refused 10006."""
    price = emu.last_price(SYMBOL)
    for i in range(24):
        stop = OrderIntent(
            PAIR,
            Side.BUY,
            D("0.01"),
            OrderType.STOP_MARKET,
            f"many{i}-sl0_0",
            "test",
            stop_price=(price * D("1.1")).quantize(D("0.01")),
        )
        await ex.create_order(stop)
    level = (price * D("1.05")).quantize(D("0.01"))
    await asyncio.gather(
        *(
            ex.amend_order(PAIR, client_order_id=f"many{i}-sl0_0", trigger_price=level)
            for i in range(24)
        )
    )
    amends = emu.requests_to(AMEND)
    assert len(amends) == 24  # each once: none refused, none resent
    assert [r.ret_code for r in amends] == [0] * 24
    assert {o.trigger_price for o in emu.orders.values() if o.conditional} == {level}


async def test_a_refused_amend_keeps_the_working_stop_at_its_level(
    emu: BybitEmulator, ex: Exchange, store: TradeStore
) -> None:
    """A trigger Bybit refuses (through the market) leaves the stop as it was: never none."""
    executor = live_executor(ex, store)
    price = await _enter(emu, ex, executor, "refused")
    ((cid, old),) = _working(emu)
    emu.canned[("POST", AMEND)] = {
        "retCode": 110093,
        "retMsg": "expect Falling, but trigger_price[1] >= current[0]",
        "result": {},
        "retExtInfo": {},
        "time": emu.clock.now_ms(),
    }

    kept = await executor.amend_stop(PAIR, (price * D("1.01")).quantize(D("0.01")))

    assert kept is not None
    assert kept.client_order_id == cid
    assert _working(emu) == [(cid, old)]
    assert _conditional(emu) == [cid]
    assert emu.requests_to(CANCEL) == []
    assert _recorded_stop(executor) == old
    assert executor.protective_stop(PAIR) == (StopState.WORKING, cid)


async def test_a_linear_stop_is_amended_in_place_and_an_unchanged_amend_is_success(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Linear: the trigger moves on the same order; amending it to where it is, is no error."""
    pair = "BTC/USDT:USDT"
    price = emu.last_price(SYMBOL, "linear")
    stop = OrderIntent(
        pair,
        Side.BUY,
        D("0.01"),
        OrderType.STOP_MARKET,
        "lin-sl0_0",
        "test",
        stop_price=(price * D("1.1")).quantize(D("0.1")),
    )
    placed = await ex.create_order(stop)
    level = (price * D("1.05")).quantize(D("0.1"))

    moved = await ex.amend_order(pair, client_order_id="lin-sl0_0", trigger_price=level)
    again = await ex.amend_order(pair, client_order_id="lin-sl0_0", trigger_price=level)

    assert (moved.exchange_order_id, moved.stop_price) == (placed.exchange_order_id, level)
    assert again.stop_price == level
    first, second = emu.requests_to(AMEND)
    assert first.body is not None
    assert (first.body["category"], first.ret_code, second.ret_code) == ("linear", 0, 10001)
    (raw,) = emu.orders_by_link_id()["lin-sl0_0"]
    assert D(raw["triggerPrice"]) == level
    await ex.cancel_order(pair, client_order_id="lin-sl0_0")
    with pytest.raises(OrderNotFoundError):
        await ex.amend_order(pair, client_order_id="lin-sl0_0", trigger_price=price)
    assert emu.requests_to(AMEND)[-1].ret_code == 110001
