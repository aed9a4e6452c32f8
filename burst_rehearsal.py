"""Keep a burst's passes warm: rehearse them just before the next close is expected.

Part of `runner` (its pipeline loop runs `KeepWarm` beside the bursts on the exchange's
feed). Between two closes the daemon waits, idle: a minute live, 0.35 s in the latency
benchmark. An idle core's caches go cold within 10-30 ms: on this host a 50-pair numpy
pass takes ~37 us right after the same pass, ~50 us after 3 ms idle and ~240 us after
30 ms or more. A burst's passes over all its pairs (every pair's indicators in one kernel
call, the anomaly pass, the ATRs) run once a close, so each met its code and its pairs'
rows cold: in the latency benchmark the indicators' pass took 0.35 ms and the anomaly
pass 0.29, three times what they take warm.

`KeepWarm` learns when the next close's first candle will be handed over from the last
closes' (`Cadence`: the interval between two closes' first candles, trusted once the last
two intervals agree within a tenth). From `lead_s` before that moment, widened by the
last predictions' error, until the burst begins (at most `TAIL_S` plus that error after
it), it rehearses the passes over the last burst's pairs, every `GAP_S` until `MARGIN_S`
and that error before the expected moment and every `SPARSE_S` after: the same code on
the pairs' windows as they stand, the kernel on copies of their states, keeping nothing
(`SignalSource.rehearse`, `AnomalyWatch.rehearse`, `EngineState.rehearse_atr`). One pass
over `CHUNK` pairs runs per turn of the event loop, and none once a candle is queued or a
burst is under way, so a rehearsal delays the first frame of a close by one such pass at
most (~0.05 ms). A rehearsal that raises stops the rehearsals (logged); the bursts go on
as before.

Between two rehearsals the event loop is polled, a turn at a time, not slept (`POLLED`),
as a burst gathering its close polls it (`runner._gather`): the close's first frame then
finds the core running instead of waking it, and on a shared host (a virtual machine
among others) a wake-up is what varies most. The core is busy only from `lead_s` before
the expected moment to `TAIL_S` after it, ~13 ms a close (a minute apart live); the
margins a wobbling cadence adds to the window are slept. In the latency benchmark's
daemon, six 40-minute runs each way, alternating on a quiet host: the end-to-end p50
lower in all six (mean 5.31 -> 4.64 ms); the p99, set by a run's slowest burst, within
the host's noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import structlog

from pipeline import Engine


log = structlog.get_logger(__name__)

TAIL_S = 0.010  # how long after the expected moment the rehearsals go on, besides the error
GAP_S = 0.0005  # between rehearsals until MARGIN_S before the expected moment
MARGIN_S = 0.0005
SPARSE_S = 0.002  # between rehearsals after: the caches stay mostly warm over ~2 ms idle
MAX_SLACK_S = 0.25  # the most the last predictions' error widens the window by, each side
# Between rehearsals the loop is polled, not slept (`KeepWarm._pause`): a core left idle
# is woken by the close's first frame, and on a shared host that wake-up is slow.
POLLED = True
CHUNK = 10  # pairs a rehearsal takes at once (`KeepWarm.passes`)


class Cadence:
    """When the next close's first candle is expected, from the last closes' first candles."""

    __slots__ = ("_close", "_errors", "_firsts")

    def __init__(self) -> None:
        self._close = -1  # the newest close noted (its candles' open time)
        self._firsts: deque[float] = deque(maxlen=3)  # its first candles' hand-overs
        self._errors: deque[float] = deque(maxlen=4)  # how far off the last predictions were

    def note(self, close: int, first: float) -> None:
        """Note a burst of `close` whose first candle was handed over at `first`.

        A burst of a close noted already (a late pair's candle) is not a new close.
        """
        if close <= self._close:
            return
        predicted = self.next()
        if predicted is not None:
            self._errors.append(abs(first - predicted))
        self._close = close
        self._firsts.append(first)

    def next(self) -> float | None:
        """Return when the next close's first candle is expected (perf_counter), or None.

        None until the last two intervals agree within a tenth: a missed close, a late
        start or a feed restarting makes them differ.
        """
        if len(self._firsts) < 3:
            return None
        first, second, third = self._firsts
        before, last = second - first, third - second
        if last <= 0 or abs(before - last) > 0.1 * last:
            return None
        return third + last

    @property
    def error(self) -> float:
        """Return the largest error of the last predictions (seconds; 0 before any)."""
        return max(self._errors, default=0.0)


class KeepWarm:
    """Rehearse a burst's passes just before each expected close (module docstring).

    Args:
        engine: the engine whose passes are rehearsed.
        lead_s: how long before the expected moment the rehearsals start.
    """

    def __init__(self, engine: Engine, *, lead_s: float) -> None:
        self.engine = engine
        self.lead_s = lead_s
        self.cadence = Cadence()
        self.pairs: list[str] = []  # the last burst's
        self.rehearsals = 0  # passes run (for tests and the benchmark)
        self._noted = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self, quiet: Callable[[], bool]) -> AsyncIterator[None]:
        """Rehearse (`run`) while the block runs."""
        task = asyncio.ensure_future(self.run(quiet))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # ended, not left pending

    def noted(self, close: int, first: float, pairs: Sequence[str]) -> None:
        """Note a burst decided: its close, its first candle's hand-over and its pairs."""
        self.cadence.note(close, first)
        self.pairs = list(pairs)
        self._noted.set()

    def passes(self) -> list[Callable[[], None]]:
        """Return the rehearsals of a burst's passes over the last burst's pairs.

        `CHUNK` pairs at a time: a close's first frame that comes during one waits for it
        to end, and one of 50 pairs takes 0.2-0.3 ms cold.
        """
        engine, out = self.engine, list[Callable[[], None]]()
        for at in range(0, len(self.pairs), CHUNK):
            pairs = self.pairs[at : at + CHUNK]
            out.append(functools.partial(engine.signals_source.rehearse, pairs))
            if engine.anomaly_watch is not None:
                out.append(functools.partial(engine.anomaly_watch.rehearse, pairs))
            if engine.manage_stops:
                out.append(functools.partial(engine.rehearse_atr, pairs))
        return out

    async def run(self, quiet: Callable[[], bool]) -> None:
        """Rehearse ahead of each expected close while `quiet()`, until cancelled.

        `quiet`: no candle is queued and no burst gathers or decides.
        """
        while True:
            self._noted.clear()
            predicted = self.cadence.next()
            if predicted is None or not self.pairs:
                await self._noted.wait()
                continue
            slack = min(self.cadence.error, MAX_SLACK_S)
            start, end = predicted - self.lead_s - slack, predicted + TAIL_S + slack
            wait = start - time.perf_counter()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._noted.wait()
                if self._noted.is_set():
                    continue  # the burst came first
            while not self._noted.is_set() and time.perf_counter() < end:
                if not await self._rehearse(quiet):
                    return
                # Close together until just before the expected moment, then sparse: the
                # close's first frames, read in several turns of the loop, meet few passes.
                now = time.perf_counter()
                near = now < predicted - MARGIN_S - slack
                # Polled from `lead_s` before the expected moment to `TAIL_S` after it; slept
                # in the margins the last predictions' error adds (up to MAX_SLACK_S a side).
                polled = predicted - self.lead_s <= now <= predicted + TAIL_S
                await self._pause(GAP_S if near else SPARSE_S, polled=polled)
            await self._noted.wait()  # this close's burst, then the next prediction

    async def _pause(self, seconds: float, *, polled: bool = True) -> None:
        # Until the next rehearsal: the loop polled, one turn at a time, not slept (unless
        # `POLLED` is off), so that the core is running when the close's first frame comes.
        if not (POLLED and polled):
            await asyncio.sleep(seconds)
            return
        until = time.perf_counter() + seconds
        await asyncio.sleep(0)
        while time.perf_counter() < until and not self._noted.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0)

    async def _rehearse(self, quiet: Callable[[], bool]) -> bool:
        # One round of the passes, one per turn of the loop; False if one raised.
        for rehearse in self.passes():
            if not quiet() or self._noted.is_set():
                return True
            try:
                rehearse()
            except Exception:  # it only warms the caches: the bursts go on as before
                log.exception("burst_rehearsal_failed")
                return False
            self.rehearsals += 1
            await asyncio.sleep(0)
        return True
