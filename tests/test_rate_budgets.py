"""Rate budgets: requests sent together never reach Bybit more than its limit a window.

Bybit counts a request when it arrives: after it left, before its answer came back. A
budget that counted requests when they left let a live burst's amends, sent ten at a
time and delayed unevenly on their way, arrive 11 to a second and be refused 10006.
"""

from __future__ import annotations

import asyncio
import heapq
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rate_budgets import RateBudget, RateBudgets


class _Time:
    """A clock that sleeps instantly and, meanwhile, delivers the answers due."""

    def __init__(self) -> None:
        self.now = 0.0
        self.answers: list[tuple[float, int, RateBudget, list[float]]] = []

    async def sleep(self, seconds: float) -> None:
        # Time moves on, if only by the least step: a budget that waits until a slot
        # expires computes the wait by subtraction, which a float can round to nothing.
        until = max(self.now + max(seconds, 0.0), math.nextafter(self.now, math.inf))
        while self.answers and self.answers[0][0] <= until:
            at, _, budget, slot = heapq.heappop(self.answers)
            self.now = max(self.now, at)
            budget.done(slot)
        self.now = until


def test_a_request_holds_its_slot_until_a_window_after_its_answer() -> None:
    """Two slots a second: both answered 0.3 s after they left, the third leaves at 1.3 s."""
    clock = _Time()
    budget = RateBudget("amend_spot", 2, 1.0, now=lambda: clock.now, sleep=clock.sleep)

    async def go() -> None:
        first, second = await budget.acquire(), await budget.acquire()
        clock.now = 0.3
        budget.done(first)
        budget.done(second)
        clock.now = 1.0
        await budget.acquire()

    asyncio.run(go())
    assert clock.now == pytest.approx(1.3)


@given(
    limit=st.integers(1, 6),
    trips=st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 1.0)), min_size=1, max_size=40),
)
def test_requests_in_flight_never_arrive_more_than_the_limit_to_a_window(
    limit: int, trips: list[tuple[float, float]]
) -> None:
    """Each request leaves when its budget lets it, takes `rtt` to be answered and arrives
    at `where` x `rtt` on the way: any window holds at most `limit` arrivals."""
    clock = _Time()
    budget = RateBudget("order", limit, 1.0, now=lambda: clock.now, sleep=clock.sleep)
    arrivals: list[float] = []

    async def go() -> None:
        for n, (rtt, where) in enumerate(trips):
            slot = await budget.acquire()
            left = clock.now
            arrivals.append(left + where * rtt)
            heapq.heappush(clock.answers, (left + rtt, n, budget, slot))

    asyncio.run(go())
    arrivals.sort()
    for i, at in enumerate(arrivals):
        window = [a for a in arrivals[: i + 1] if at - a < 1.0]
        assert len(window) <= limit


def test_spot_amends_and_creates_spend_their_own_budgets() -> None:
    """Bybit: spot creates 20 a second, spot amends 10, linear orders 10 (shared here)."""
    budgets = RateBudgets(1.0, 600.0)

    async def go() -> list[str]:
        names = []
        for path, category in (
            ("v5/order/create", "spot"),
            ("v5/order/amend", "spot"),
            ("v5/order/amend", "linear"),
            ("v5/order/realtime", "spot"),
        ):
            slots = await budgets.acquire(path, {"category": category})
            names.append(",".join(b.name for b, _ in slots))
            budgets.done(slots)
        return names

    assert asyncio.run(go()) == [
        "order_spot,ip",
        "amend_spot,ip",
        "order_linear,ip",
        "query,ip",
    ]
    assert budgets.by_class["amend_spot"].limit == 10


class _YieldingTime(_Time):
    """`_Time` whose sleep lets the other tasks run: they ask while a request waits."""

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        await asyncio.sleep(0)


@given(
    limit=st.integers(1, 4),
    asks=st.lists(st.tuples(st.booleans(), st.floats(0.0, 0.5)), min_size=1, max_size=30),
)
def test_urgent_requests_take_the_next_slot_ahead_of_the_others_waiting(
    limit: int, asks: list[tuple[bool, float]]
) -> None:
    """Requests ask together, each kind in its order; the first `limit` go at once and the
    next waits for a slot with its turn taken: after it, every urgent one, then the rest,
    each kind in its order. No window ever holds more than `limit` arrivals."""
    clock = _YieldingTime()
    budget = RateBudget("order_spot", limit, 1.0, now=lambda: clock.now, sleep=clock.sleep)
    served: list[int] = []
    arrivals: list[float] = []

    async def one(n: int, urgent: bool, rtt: float) -> None:
        slot = await budget.acquire(urgent=urgent)
        served.append(n)
        arrivals.append(clock.now + rtt / 2)
        heapq.heappush(clock.answers, (clock.now + rtt, n, budget, slot))

    async def go() -> None:
        await asyncio.gather(*(one(n, urgent, rtt) for n, (urgent, rtt) in enumerate(asks)))

    asyncio.run(go())
    first = list(range(min(len(asks), limit + 1)))
    rest = range(len(first), len(asks))
    assert served == first + [n for n in rest if asks[n][0]] + [n for n in rest if not asks[n][0]]
    arrivals.sort()
    for i, at in enumerate(arrivals):
        assert len([a for a in arrivals[: i + 1] if at - a < 1.0]) <= limit


def test_on_the_order_budgets_everything_but_a_new_entry_is_urgent() -> None:
    """Stops, their moves and cancels, exits and take-profits go before new entries."""
    budgets = RateBudgets(1.0, 600.0)
    asked: list[bool] = []

    class Spied(RateBudget):
        async def acquire(self, *, urgent: bool = False) -> list[float]:
            asked.append(urgent)
            return await super().acquire(urgent=urgent)

    for name in ("order_spot", "order_linear"):
        budget = budgets.by_class[name]
        budgets.by_class[name] = Spied(name, budget.limit, budget.window_s)
    requests = [
        ("v5/order/create", {"category": "spot", "side": "Buy", "orderType": "Market"}),
        ("v5/order/create", {"category": "spot", "side": "Sell", "triggerPrice": "90"}),
        ("v5/order/create", {"category": "spot", "side": "Sell", "orderType": "Market"}),
        ("v5/order/cancel", {"category": "spot", "orderLinkId": "x"}),
        ("v5/order/create", {"category": "linear", "side": "Sell", "orderType": "Market"}),
        ("v5/order/create", {"category": "linear", "side": "Buy", "reduceOnly": True}),
        ("v5/order/amend", {"category": "linear", "triggerPrice": "95"}),
    ]

    async def go() -> None:
        for path, params in requests:
            budgets.done(await budgets.acquire(path, params))

    asyncio.run(go())
    # A spot market sell and a linear reduce-only buy close; a linear sell opens a short.
    assert asked == [False, True, True, True, False, True, True]


def test_a_request_cancelled_while_it_waits_keeps_no_one_else_waiting() -> None:
    """Cancelled in the queue, or just as its turn came: the others still get their slots."""
    clock = _YieldingTime()
    budget = RateBudget("order_spot", 1, 1.0, now=lambda: clock.now, sleep=clock.sleep)
    served: list[str] = []
    tasks: dict[str, asyncio.Task[None]] = {}

    async def one(name: str, urgent: bool = False) -> None:
        budget.done(await budget.acquire(urgent=urgent))
        served.append(name)
        if name == "b":
            tasks["d"].cancel()  # its turn was just handed over: it must pass it on

    async def go() -> None:
        for name, urgent in (("a", False), ("b", False), ("c", False), ("d", True)):
            tasks[name] = asyncio.create_task(one(name, urgent))
        await asyncio.sleep(0)  # a served, b waits for the slot, c and d queued
        tasks["c"].cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await one("e")

    asyncio.run(go())
    assert served == ["a", "b", "e"]
