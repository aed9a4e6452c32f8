"""Bursts: the candles that close together are decided together, in one pass.

Part of `runner` (its pipeline loop drains the feed's queue into bursts: on the exchange's
feed, a burst's first candle also waits, polling, up to `exchange.burst_gather_ms` for the
other streamed pairs' candles of its close, and the passes below are rehearsed just before
each close, so that they meet warm CPU caches: `burst_rehearsal`). When 50 pairs close a
candle at the same instant, taking them one at a time makes the last pair wait for every
decision and every order acknowledgement before it. `BurstDecider` instead:

1. admits every candle of the burst (data windows, counters), in arrival order;
2. computes the signals of all pairs ahead: the strategy's indicators of every pair in
   one pass where the strategy allows (`Engine.prepare_signals`: the built-in kernel
   strategies advance all pairs' states by their new row in one call,
   `batch_signals.advance_many`), then each pair's signal from its row
   (`Engine.early_signal`; kept for step 3); judges every candle for anomalies in one
   pass too (`AnomalyWatch.prepare`: row-wise medians over the burst's windows; each
   verdict is acted on at its candle's turn), and computes the ATR of each candle that
   can decide in one loop;
3. decides in priority order: pairs holding a position or a working order first (fills,
   stop moves, take-profits and exits), by pair name; then the entry candidates, strongest
   signal first (ties by pair name); then candles with no signal. With a simulated
   exchange in front, each candle is matched just before it is processed, as
   `SimDriver.on_candle` does. Managed take-profits go to the executor as the
   position's candle is processed (ahead of every entry). A stop move is decided then
   and made once the orders are out (step 4): each is a request (a REST round trip on
   the exchange) that the exits and entries need not wait behind, and the stop in place
   protects meanwhile. An order for the same pair (a take-profit's or a flatten's exit)
   makes the move first, so each pair's own requests keep the order candles taken one at
   a time give them. The stop of a position whose candle's signal closes it is not
   moved (its exit takes the stop off);
4. sends the approved orders once every candle that can decide has decided, in decision
   order (exits first, then the strongest entries), each through the executor and its
   fills delivered as one at a time would; then the held pairs' stop moves (moves left
   by a burst that raised are dropped: the stops in place stay, and the next candles
   move them); then the quiet candles (no position, working
   order or signal: marks and equity) are processed, and the risk state is saved once,
   off the decisions' path (`saved` waits for it). No decision waits for another order's
   answer, nor for a write to disk, nor for the cyclic garbage collector (held off while
   a burst is decided: reference counting frees what the burst drops; cycles wait), nor
   for the threads that write the audit trail and the log (their records are held until
   the burst ends, so neither wakes to take the interpreter from it).
   With a simulated exchange in front the sends are not concurrent tasks: a task starts
   only after the loop's other ready work, and a replay's feed would move the replay clock
   past the candle the orders were decided on. On the live exchange, where each entry is
   a REST round trip for the order, one for its look-up and two for its stop's, up to
   `exchange.burst_orders_in_flight` orders are on their way at once, started in decision
   order (the rate budgets let the entries through in the order they ask, and a filled
   entry's stop ahead of the entries still waiting), each through the same executor
   path, and so are the held pairs' stop moves after them (each under its pair's lock);
   a buy's balance check counts the buys still on their way (`ExecutorCore.committed`).
   Over a 100 ms link, a 50-entry burst against the emulator had its last entry answered
   after 31.3 s one at a time, 6.1 s ten at a time (and its last stop 31.6 and 6.9 s;
   `bench_live_burst`): Bybit's order budget (16 a second of the 20 on spot, with our
   safety margin) paces it then.

Where bursts come from the exchange's sockets (`paced`), the young generation is collected
after each burst, once its decisions are out, and its automatic threshold is raised while
the bursts run (`paced_collections`): a close's frames, read while its burst gathers, no
longer pay for a collection of whatever the time since the last burst left (one in three
minutes did in the latency benchmark, 0.1-0.37 ms each, on the CPU still cold from the
wait). The frames themselves leave few objects (~50 net at 50 pairs); the time between
bursts (timers, other streams) leaves the rest. Paced bursts also compute, once their
orders are out, the robust scales their pairs' next candles are judged against for
anomalies (`AnomalyWatch.prepare_next`: the medians of the bars before the next one, known
now), so the next burst's anomaly pass sorts nothing: 0.16 -> 0.08 ms for 50 pairs, run
alone. A replay's bursts follow one another with no wait between them, where it would
only move the work, and do not.

Every order still goes through `TradeExecutor.submit` (journal before send, the pair's
lock, one protective stop per position), and every stop move through
`TradeExecutor.amend_stop`. Because every position's candle is processed before any
entry is decided, entries do not change what the next entry is checked against until
they fill (the next candle, or with `fill_at="close"` once the burst's decisions are
taken), and a stop's level is read only by its own pair's stop rule, a burst's decisions
do not depend on the order its candles arrived in, and equal those of the same candles
fed one at a time in the burst's decision order, orders and stop levels included
(tests/test_burst.py checks both).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog

from models import Candle
from pipeline import DeferredOrder, Engine
from utils.utilities import held_logs, run_together


log = structlog.get_logger(__name__)

Item = tuple[Candle, float | None]  # a candle and when the feed handed it over

# The young generation's automatic threshold while paced bursts run (module docstring):
# CPython's 700 three times over, so what the time between two bursts leaves is collected
# after the next one rather than while it gathers; a collection there stays short (a UI in
# the same loop allocates between bursts too).
YOUNG_BETWEEN_BURSTS = 2_000


@dataclass(slots=True)
class _Pacing:
    # The process's collector is one for every loop in it: how many paced loops run, and
    # the threshold in place before the first.
    loops: int = 0
    before: tuple[int, int, int] = (700, 10, 10)


_PACING = _Pacing()


@contextlib.contextmanager
def paced_collections(paced: bool = True) -> Iterator[None]:
    """Raise the young generation's automatic threshold while bursts are decided.

    A paced `BurstDecider` collects the young generation after each burst; the threshold
    in place before the first paced loop is restored when the last one ends, in whatever
    order they end. `paced` False: nothing changes (a replay's bursts follow one another
    with no wait for the wire between them).
    """
    if not paced:
        yield
        return
    if _PACING.loops == 0:
        _PACING.before = gc.get_threshold()
        gc.set_threshold(YOUNG_BETWEEN_BURSTS, *_PACING.before[1:])
    _PACING.loops += 1
    try:
        yield
    finally:
        _PACING.loops -= 1
        if _PACING.loops == 0:
            gc.set_threshold(*_PACING.before)


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
        paced: bursts from the wire: collect the young generation after each burst
            (within `paced_collections`) and compute the next burst's anomaly scales
            ahead; otherwise the collector runs at its thresholds and nothing is ahead.
        in_flight: how many of a burst's orders may be on their way at once (the live
            exchange: `exchange.burst_orders_in_flight`); 1 sends them one at a time.
    """

    def __init__(
        self,
        engine: Engine,
        match: Callable[[Candle], Awaitable[None]] | None = None,
        *,
        paced: bool = False,
        in_flight: int = 1,
    ) -> None:
        self.engine = engine
        self.match = match
        self.paced = paced
        self.in_flight = max(1, in_flight)
        self.bursts = 0
        self.deciding = False  # within `on_burst` (a rehearsal waits: burst_rehearsal)
        # The pairs of the last run, in the order they were decided (for tests and logs).
        self.last_order: list[str] = []
        # The risk state's save after a burst runs as a task: the write (a thread) must
        # not hold up the next burst, which is often already queued behind it.
        self._saving: asyncio.Task[None] | None = None
        self._save_again = False

    async def on_burst(self, items: Sequence[Item]) -> None:
        """Decide the candles in `items` (arrival order) together."""
        collecting = gc.isenabled()
        self.deciding = True
        try:
            for run in split_runs(items):
                if collecting:
                    gc.disable()  # a collection mid-burst would delay every decision after it
                try:
                    await self._decide_run(run)
                finally:
                    if collecting:
                        gc.enable()  # a long drain (a refilled gap) collects between its runs
        finally:
            self.deciding = False
        if collecting and self.paced:
            gc.collect(0)  # the burst's debt, paid with its decisions out (`paced_collections`)

    async def saved(self) -> None:
        """Wait until the risk state of the last burst decided has been saved."""
        while self._saving is not None:
            saving = self._saving
            await saving
            if self._saving is saving:
                self._saving = None

    def _save_soon(self) -> None:
        # Coalesced: a burst decided while a save runs asks for one more save after it,
        # which stores the newest state.
        if self.engine.risk_saver is None:
            return
        if self._saving is not None and not self._saving.done():
            self._save_again = True
            return
        self._saving = asyncio.ensure_future(self._save())

    async def _save(self) -> None:
        while True:
            self._save_again = False
            saver = self.engine.risk_saver
            if saver is None:
                return
            try:
                await saver()
            except Exception:  # the saver logs its own write failures; this is a bug
                log.exception("burst_risk_save_failed")
            if not self._save_again:
                return

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
        # The audit trail's writer thread and the log listener wait for the end of the burst
        # (`AuditTrail.held`, `held_logs`).
        with engine.audit.held(), held_logs():
            try:
                for at, (candle, received, started) in enumerate(ordered):
                    if at == deciding:
                        # Every candle that can decide has: send, place the new positions'
                        # stops and move the held pairs', then the quiet candles.
                        await self._send(decided)
                        await engine.executor.flush_stops()
                        await engine.executor.flush_stop_moves(in_flight=self.in_flight)
                    engine.timing(received, started)
                    if self.match is not None:
                        await self.match(candle)
                    await engine.process(candle)
            except BaseException:
                engine.sender = None
                dropped = engine.executor.drop_stop_moves()
                if dropped:  # the stops in place stay; the next candles move them
                    log.warning("burst_stop_moves_dropped", moves=dropped)
                await engine.executor.flush_stops()  # new positions' stops: never dropped
                raise
            engine.sender = None
            try:
                await self._send(decided)
            finally:
                await engine.executor.flush_stops()  # whatever the sends met
            await engine.executor.flush_stop_moves(in_flight=self.in_flight)
        if self.paced and engine.anomaly_watch is not None:
            # The next burst's anomaly scales, in the wait for it (module docstring).
            engine.anomaly_watch.prepare_next(c.pair for c, _, _ in admitted)
        self._save_soon()  # once per burst, after every decision is out

    def _decision_order(
        self, admitted: list[tuple[Candle, float | None, float]]
    ) -> tuple[list[tuple[Candle, float | None, float]], int]:
        # The candles in decision order, and how many come before the first that cannot
        # decide (no position, no working order, no signal).
        engine = self.engine
        portfolio = engine.portfolio
        working = {o.pair for o in engine.executor.open_orders()}
        candles = [item[0] for item in admitted]
        engine.prepare_signals(candles)  # one pass over the burst
        if engine.anomaly_watch is not None:
            engine.anomaly_watch.prepare(candles)  # likewise; acted on candle by candle
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
        if engine.manage_stops:
            for key, item in keyed[:deciding]:
                # Stops and entries read it: one pass, warm. A held pair whose signal closes
                # it reads none (its exit takes the stop off; a stop filled in its match
                # leaves an entry to compute it then).
                if key[0] != 0 or not engine.closing_now(item[0]):
                    engine.warm_atr(item[0].pair)
        return [item for _, item in keyed], deciding

    async def _send(self, decided: list[DeferredOrder]) -> None:
        # In decision order, each through the executor's own path (its checks, the pair's
        # lock, journal before send) and its fills delivered as one at a time would. Not
        # started as concurrent tasks: a replay's feed would run first and move the replay
        # clock past the candle the orders were decided on (the parity audit catches it).
        engine = self.engine
        if self.in_flight > 1 and len(decided) > 1:
            await self._send_together(decided)
            return
        while decided:
            order = decided.pop(0)
            if await engine.send_decided(order):
                await engine.executor.deliver_fills(order.intent.pair)

    async def _send_together(self, decided: list[DeferredOrder]) -> None:
        # The live exchange: up to `in_flight` orders on their way at once, each through
        # the executor's own path (the pair's lock, journal before send, its answer or its
        # loss resolved by client id, an entry's stop placed on its fill), started in
        # decision order; the rate budgets let the entries through in the order they ask,
        # a filled entry's stop (or an exit) ahead of the entries still waiting.
        # One at a time, each waited for its request, its look-up and its stop's before the
        # next went. After an error that stops trading (a FatalError, a bug) no further
        # order starts, and it is raised once the orders under way are answered.
        engine = self.engine

        async def send(order: DeferredOrder) -> None:
            if await engine.send_decided(order):
                await engine.executor.deliver_fills(order.intent.pair)

        orders = decided[:]
        decided.clear()
        await run_together(orders, send, limit=self.in_flight)
