"""A paper entry's stop waits for the end of its fill's candle; an exit on that candle sends none.

Real parts: the simulated venue (fills at the next candle's open) behind the seam of
`test_stop_amend`, which can also refuse an order after it was asked. The fills of a
candle's match are delivered with `defer_stops` set, as the venue's driver delivers them
before the engine processes the candle. The verdict is read from the venue's own orders.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from error_handler import OrderRejected
from executor_core import protective_id
from matching_engine import SimulatedExchange
from models import Candle, Order, OrderIntent, OrderStatus, OrderType, Side, with_attempt
from tests.test_stop_amend import LossyVenue, sim_entered
from trade_executor import StopState, TradeExecutor


D = Decimal
PAIR = "BTC/USDT"
START = 1_700_000_040_000
MINUTE_MS = 60_000


class RefusingVenue(LossyVenue):
    """The seam, which refuses the next exit it is asked for when told."""

    refuse_exit = False

    async def create_order(self, intent: OrderIntent) -> Order:
        """Refuse a reduce-only market order once when told; otherwise place it."""
        if self.refuse_exit and intent.reduce_only and intent.type is OrderType.MARKET:
            self.refuse_exit = False
            raise OrderRejected("insufficient balance", pair=intent.pair)
        return await super().create_order(intent)


def _candle(ts: int, low: float = 99.0) -> Candle:
    return Candle(PAIR, "1m", ts, 100.0, 101.0, low, 100.0, 10.0)


async def _filled_on_a_candle() -> tuple[TradeExecutor, SimulatedExchange, RefusingVenue]:
    """Return an executor whose long (stop 95) filled in a candle's match, stop deferred."""
    executor, sim, venue, clock = await sim_entered(RefusingVenue, fill_at="next_open")
    assert isinstance(venue, RefusingVenue)
    clock.set(START + MINUTE_MS)
    executor.defer_stops = True  # as `SimDriver` delivers a candle's fills
    try:
        await sim.match(_candle(START))
    finally:
        executor.defer_stops = False
    assert executor.portfolio.position(PAIR) is not None
    return executor, sim, venue


def _stops(sim: SimulatedExchange) -> list[Order]:
    return [o for o in sim.orders() if o.type is OrderType.STOP_MARKET]


def _working(sim: SimulatedExchange) -> list[Decimal | None]:
    return [o.stop_price for o in _stops(sim) if not o.status.is_terminal]


def _exit() -> OrderIntent:
    return OrderIntent(
        PAIR, Side.SELL, D(1), OrderType.MARKET, with_attempt("x", 0), "exit", reduce_only=True
    )


async def test_the_stop_is_placed_once_at_the_candle_end() -> None:
    """Until the flush the position has its level and no order; after it, one stop works."""
    executor, sim, _ = await _filled_on_a_candle()
    position = executor.portfolio.position(PAIR)
    assert position is not None
    assert position.stop_price == D(95)
    assert _stops(sim) == []
    assert executor.protective_stop(PAIR)[0] is StopState.NONE

    await executor.flush_stops()
    await executor.flush_stops()  # nothing left: no second stop

    assert _working(sim) == [D(95)]
    assert len(_stops(sim)) == 1
    assert executor.protective_stop(PAIR)[0] is StopState.WORKING
    assert not executor.pending_stops


async def test_an_exit_on_the_fill_candle_sends_no_stop() -> None:
    """Placed and taken off at the same instant, the stop is not sent at all: the venue
    sees the entry and the exit only, and the flush after the exit places nothing."""
    executor, sim, _ = await _filled_on_a_candle()

    order = await executor.submit(_exit(), last_price=D(100))
    await executor.flush_stops()

    assert order.status is not OrderStatus.REJECTED
    assert _stops(sim) == []
    assert [o.client_order_id for o in sim.orders()] == [
        with_attempt("e", 0),
        with_attempt("x", 0),
    ]
    await sim.match(_candle(START + MINUTE_MS))
    assert executor.portfolio.position(PAIR) is None
    assert _stops(sim) == []


async def test_an_exit_the_venue_refuses_leaves_the_position_its_stop() -> None:
    """The exit took the unplaced stop off; refused, it puts one stop back at the level."""
    executor, sim, venue = await _filled_on_a_candle()
    venue.refuse_exit = True

    order = await executor.submit(_exit(), last_price=D(100))
    await executor.flush_stops()

    assert order.status is OrderStatus.REJECTED
    assert executor.portfolio.position(PAIR) is not None
    assert _working(sim) == [D(95)]
    assert len(_stops(sim)) == 1


async def test_an_exit_refused_before_it_is_sent_leaves_the_stop_to_the_flush() -> None:
    """An exit refused by the executor's own checks takes nothing off: the flush places it."""
    executor, sim, _ = await _filled_on_a_candle()
    too_small = replace(_exit(), qty=D("0.0000001"))

    order = await executor.submit(too_small, last_price=D(100))
    assert order.status is OrderStatus.REJECTED
    assert _stops(sim) == []
    await executor.flush_stops()

    assert _working(sim) == [D(95)]
    assert len(_stops(sim)) == 1


async def test_a_stop_move_places_the_pending_stop_first_then_moves_it() -> None:
    """A trailing move on the fill candle finds no order: the stop is placed, then amended
    in place (one order, at the new level), as it would be had it been placed at the fill."""
    executor, sim, _ = await _filled_on_a_candle()

    moved = await executor.amend_stop(PAIR, D("97.5"), candle_ts=START)
    await executor.flush_stops()

    assert moved is not None
    assert _working(sim) == [D("97.5")]
    assert len(_stops(sim)) == 1
    # The entry's own stop (placed at its level, then amended), not one named by the move.
    entry_stop = with_attempt(protective_id(with_attempt("e", 0), "sl", 0), 0)
    assert [o.client_order_id for o in _stops(sim)] == [entry_stop]
