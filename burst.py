"""Bursts: the candles that close together are decided together, in one pass.

Part of `runner` (its pipeline loop drains the feed's queue into bursts). When 50 pairs
close a candle at the same instant, taking them one at a time makes the last pair wait
for every decision and every order acknowledgement before it. `BurstDecider` instead:

1. admits every candle of the burst (data windows, counters), in arrival order;
2. computes the signals of all pairs ahead (`Engine.early_signal`; kept for step 3);
3. decides in priority order: pairs holding a position or a working order first (fills,
   stop moves, take-profits and exits), by pair name; then the entry candidates, strongest
   signal first (ties by pair name); then candles with no signal. With a simulated
   exchange in front, each candle is matched just before it is processed, as
   `SimDriver.on_candle` does. Stop moves and managed take-profits go to the executor
   as the position's candle is processed (ahead of every entry);
4. sends the approved orders once every candle that can decide has decided, in decision
   order (exits first, then the strongest entries), each through the executor and its
   fills delivered as one at a time would; then the quiet candles (no position, working
   order or signal: marks and equity) are processed, and the risk state is saved once.
   No decision waits for another order's answer. The sends are not concurrent tasks: a
   task starts only after the loop's other ready work, and a replay's feed would move the
   replay clock past the candle the orders were decided on.

The executor is unchanged: every order still goes through `TradeExecutor.submit`
(journal before send, the pair's lock, one protective stop per position). Because every
position's candle is processed before any entry is decided, and entries do not change
what the next entry is checked against until they fill (the next candle, or with
`fill_at="close"` once the burst's decisions are taken), a burst's decisions do not
depend on the order its candles arrived in, and equal those of the same candles fed one
at a time in the burst's decision order (tests/test_burst.py checks both).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import structlog

from models import Candle
from pipeline import DeferredOrder, Engine


log = structlog.get_logger(__name__)

Item = tuple[Candle, float | None]  # a candle and when the feed handed it over


def split_runs(items: Sequence[Item]) -> Iterator[list[Item]]:
    """Yield the items in consecutive runs holding each pair at most once.

    A pair's second candle in one drain (a gap refilled after a dropped socket) must see
    the first one decided: it starts the next run.
    """
    run: list[Item] = []
    seen: set[str] = set()
    for item in items:
        pair = item[0].pair
        if pair in seen:
            yield run
            run, seen = [], set()
        run.append(item)
        seen.add(pair)
    if run:
        yield run


class BurstDecider:
    """Decide a burst of closed candles in one pass (see the module docstring).

    Args:
        engine: the engine that decides.
        match: with a simulated exchange in front, what matches an admitted candle and
            delivers its fills (`SimDriver.match`); None on the live exchange.
    """

    def __init__(
        self, engine: Engine, match: Callable[[Candle], Awaitable[None]] | None = None
    ) -> None:
        self.engine = engine
        self.match = match
        self.bursts = 0
        # The pairs of the last run, in the order they were decided (for tests and logs).
        self.last_order: list[str] = []

    async def on_burst(self, items: Sequence[Item]) -> None:
        """Decide the candles in `items` (arrival order) together."""
        for run in split_runs(items):
            await self._decide_run(run)

    async def _decide_run(self, run: list[Item]) -> None:
        engine = self.engine
        admitted: list[tuple[Candle, float | None, float]] = []
        for candle, received in run:
            started = time.perf_counter()
            if engine.admit(candle, received):
                admitted.append((candle, received, started))
        if not admitted:
            return
        ordered, deciding = self._decision_order(admitted)
        self.last_order = [c.pair for c, _, _ in ordered]
        self.bursts += 1
        decided: list[DeferredOrder] = []
        engine.sender = decided.append
        # The audit trail's writer thread waits for the end of the burst (see `held`).
        with engine.audit.held():
            try:
                for at, (candle, received, started) in enumerate(ordered):
                    if at == deciding:
                        # Every candle that can decide has: send, then the quiet candles.
                        await self._send(decided)
                    engine.timing(received, started)
                    if self.match is not None:
                        await self.match(candle)
                    await engine.process(candle)
            finally:
                engine.sender = None
            await self._send(decided)
        if engine.risk_saver is not None:
            await engine.risk_saver()  # once per burst, after every decision is out

    def _decision_order(
        self, admitted: list[tuple[Candle, float | None, float]]
    ) -> tuple[list[tuple[Candle, float | None, float]], int]:
        # The candles in decision order, and how many come before the first that cannot
        # decide (no position, no working order, no signal).
        engine = self.engine
        portfolio = engine.portfolio
        working = {o.pair for o in engine.executor.open_orders()}
        keyed: list[tuple[tuple[int, float, str], tuple[Candle, float | None, float]]] = []
        for item in admitted:
            pair = item[0].pair
            if pair in working or portfolio.has_position(pair):
                # Fills, stops, take-profits and exits: before any entry is decided.
                keyed.append(((0, 0.0, pair), item))
                continue
            signal = engine.early_signal(item[0])
            if signal is None:
                keyed.append(((2, 0.0, pair), item))
            else:
                keyed.append(((1, -signal.strength, pair), item))
        keyed.sort(key=lambda k: k[0])
        deciding = sum(1 for key, _ in keyed if key[0] < 2)
        return [item for _, item in keyed], deciding

    async def _send(self, decided: list[DeferredOrder]) -> None:
        # In decision order, each through the executor's own path (its checks, the pair's
        # lock, journal before send) and its fills delivered as one at a time would. Not
        # started as concurrent tasks: a replay's feed would run first and move the replay
        # clock past the candle the orders were decided on (the parity audit catches it).
        engine = self.engine
        while decided:
            order = decided.pop(0)
            if await engine.send_decided(order):
                await engine.executor.deliver_fills(order.intent.pair)
