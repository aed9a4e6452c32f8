"""The run of every trading mode: assemble, take up the saved state, run the tasks, shut down.

Part of `main` (it is only ever imported by `main.py`), kept apart so that `main.py --help`
imports nothing heavy. One builder per mode (`mode_builders`) returns the run's frozen
`assembly.Components`; the only differences between sim, backtest and live are the ones it
picks: the order gateway (matching engine or exchange), the feed (replay or exchange
stream) and the clock (replay or the exchange's). `Daemon` takes those components and owns
the run loop, task supervision and the ordered teardown; the objects it holds do the rest:
`daemon_live.ExchangeSession` the exchange-facing tasks, `daemon_learning.Learning` the
retraining, `daemon_operator.Operator` the operator surfaces, and the components'
`daemon_state.RunState` what the run keeps on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from rich.console import Console

from assembly import BuildContext, Closer, Components, ExchangeClock, LiveGateway, prime_anomalies
from burst import BurstDecider, paced_collections
from burst_rehearsal import KeepWarm
from config import Settings
from daemon_base import DaemonBase
from daemon_learning import Learning
from daemon_live import ExchangeSession
from daemon_operator import Operator, TelegramNotifier
from data_manager import index_ms
from data_manager import replay_frames as load_frames
from error_handler import (
    BotError,
    ConfigError,
    DataError,
    FatalError,
    run_fail_safe,
)
from mode_builders import build_backtest, build_live, build_paper, build_replay, build_sim
from models import BotState, Candle, ErrorRaised, Event, EventSink
from run_summary import RunSummary
from utils.supervision import Supervisor
from utils.utilities import (
    AuditTrail,
    atomic_write,
)


if TYPE_CHECKING:
    from dashboard import Dashboard
    from model_training import Retrainer
    from pipeline import Engine
    from top_pairs import PairListDiff


__all__ = [
    "BuildContext",
    "Components",
    "Daemon",
    "ExchangeClock",
    "TelegramNotifier",
    "build_backtest",
    "build_live",
    "build_sim",
    "load_frames",
]

log = structlog.get_logger(__name__)
QUEUE_SIZE = 1_000
SHUTDOWN_STEP_TIMEOUT = 1.5
_SETTLE_LOOKBACK_MS = 3_600_000  # how far back the stop looks for fills the stream missed


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM asks for a graceful stop; a second one forces exit."""

    def handle(signum: int) -> None:
        if stop.is_set():
            os.write(2, b"kestrel: second signal, forcing exit\n")
            os._exit(1)
        os.write(2, f"kestrel: {signal.Signals(signum).name} received, stopping\n".encode())
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)


class Gathered:
    """What the bursts on the exchange's feed have taken, kept across bursts (`_next_burst`).

    A burst waits only for the streamed pairs whose candle of its close (the first
    candle's open time) it has not taken yet, and not for the pairs that came late: a
    pair a burst waited for in vain is not waited for again until a candle of it comes
    within the window of its close (counted from that close's first candle), so a stream
    that is down or always late costs one window, not one every burst, and a late candle
    deciding on its own waits for nobody (its close's other pairs were taken already).
    """

    __slots__ = ("_close", "gathering", "late", "taken")

    def __init__(self) -> None:
        self.gathering = False  # a burst has its first candle and waits for the rest
        self.late: set[str] = set()
        self.taken: dict[str, int] = {}  # each pair's newest candle open time taken
        self._close: tuple[int, float] = (-1, 0.0)  # the newest close: (open time, first in)

    def take(self, candle: Candle, received: float, within_s: float) -> None:
        """Note a candle taken into a burst (handed over at `received`)."""
        ts, pair = candle.ts, candle.pair
        if ts > self._close[0]:
            self._close = (ts, received)
        if pair in self.late and ts == self._close[0] and received - self._close[1] <= within_s:
            self.late.discard(pair)  # on time again
            log.info("burst_pair_on_time", pair=pair)
        if ts > self.taken.get(pair, ts - 1):
            self.taken[pair] = ts

    def missing(self, expected: Collection[str], close: int) -> set[str]:
        """Return the expected pairs whose candle of `close` a burst should still wait for."""
        taken, late = self.taken, self.late
        return {p for p in expected if p not in late and taken.get(p, close - 1) < close}

    def came_late(self, pairs: set[str], within_s: float) -> None:
        """Note the pairs a burst waited for in vain (none late yet: the operator is told)."""
        if pairs:
            log.warning("burst_pairs_late", pairs=sorted(pairs), window_ms=round(within_s * 1e3, 3))
            self.late |= pairs

    def deadline(self, close: int, within_s: float) -> float:
        """Return when a burst of `close` stops waiting: `within_s` after its first candle."""
        ts, first = self._close
        return first + within_s if ts == close else 0.0


def _untracked(candle: Candle, received: float, within_s: float) -> None:
    """`Gathered.take` where no burst waits (a replay, no window): nothing to note."""


async def _next_burst(
    queue: asyncio.Queue[tuple[Candle, float] | None],
    *,
    gather: bool,
    expected: Collection[str] = (),
    within_s: float = 0.0,
    gathered: Gathered | None = None,
) -> tuple[list[tuple[Candle, float]], bool]:
    """Return the candles queued together (one burst) and whether the feed has ended.

    With `gather` (the exchange's feed), one turn of the event loop comes first: the
    candles of a read can still be on their way when the first of them wakes the
    pipeline, carried over by the feed task behind it, and they join the burst instead
    of waiting behind a burst of one. Never on a replay: its feed would move the replay
    clock past the candle in hand.

    `expected` (the pairs the feed streams) and `within_s`: the burst also waits, polling,
    for the candles of its close from the expected pairs, until `within_s` after the
    close's first candle was handed over (`Gathered`, kept by the caller across bursts,
    says which pairs are still to come). A minute's candles reach the daemon spread over
    the exchange's pushes and the socket's reads; decided on its first arrivals, a burst
    would let them take what the strongest signal among the rest should have (a position
    slot, exposure room) and hold the rest behind their decisions (and, on a host it
    shares, the exchange's sending behind them too: in the latency benchmark a burst of
    one, decided at a minute's first frame, held back the emulator's other 99 pushes by
    ~0.75 ms).
    """
    item = await queue.get()
    if item is None:
        return [], True
    seen = Gathered() if gathered is None else gathered
    seen.gathering = True
    try:
        if gather:
            await asyncio.sleep(0)
        return await _gather(queue, [item], seen, gather and within_s > 0, expected, within_s)
    finally:
        seen.gathering = False


async def _gather(
    queue: asyncio.Queue[tuple[Candle, float] | None],
    burst: list[tuple[Candle, float]],
    seen: Gathered,
    waits: bool,
    expected: Collection[str],
    within_s: float,
) -> tuple[list[tuple[Candle, float]], bool]:
    # `_next_burst` from its first candle: the rest of the burst and whether the feed ended.
    first = burst[0]
    take = seen.take if waits else _untracked  # a replay's candles: nothing to keep
    take(first[0], first[1], within_s)
    close = first[0].ts
    missing = seen.missing(expected, close) if waits else set()
    deadline = seen.deadline(close, within_s)
    while True:
        while not queue.empty():
            item = queue.get_nowait()
            if item is None:
                return burst, True
            burst.append(item)
            take(item[0], item[1], within_s)
            missing.discard(item[0].pair)
        if not missing or time.perf_counter() >= deadline:
            seen.came_late(missing, within_s)  # waited for in vain: not again until on time
            return burst, False
        # Polled, one turn of the loop at a time, not slept: the rest of a close comes
        # within a millisecond or so, and a core that sleeps between its reads wakes slower
        # and colder (burst_rehearsal). At most `within_s` a close; a late pair once.
        while queue.empty() and time.perf_counter() < deadline:  # noqa: ASYNC110 (polled)
            await asyncio.sleep(0)


async def _decide_bursts(
    queue: asyncio.Queue[tuple[Candle, float] | None],
    decider: BurstDecider,
    gathered: Gathered,
    warm: KeepWarm,
    *,
    expected: Collection[str],
    within_s: float,
) -> None:
    """Decide what the feed queues, burst by burst, until it ends (the pipeline loop).

    A paced decider's bursts come from the wire: they gather (`_next_burst`), and their
    passes are rehearsed before each close while nothing is queued, gathered or decided.
    """
    paced, done = decider.paced, False
    rehearsing = paced and warm.lead_s > 0
    quiet = lambda: not (decider.deciding or gathered.gathering) and queue.empty()  # noqa: E731
    async with warm.running(quiet) if rehearsing else contextlib.nullcontext():
        with paced_collections(paced):
            while not done:
                burst, done = await _next_burst(
                    queue, gather=paced, expected=expected, within_s=within_s, gathered=gathered
                )
                if burst:
                    await decider.on_burst(burst)
                    if rehearsing:
                        warm.noted(burst[0][0].ts, burst[0][1], decider.last_order)


class Daemon(DaemonBase):
    """One trading run: the engine plus the tasks around it, in one TaskGroup."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.stop = asyncio.Event()
        # (candle, perf_counter() at receipt): the receipt time measures decision latency.
        self.queue: asyncio.Queue[tuple[Candle, float] | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        # Backtests replay history: no audit trail (it records live decisions), and only
        # warnings on the console unless --log-level asks for more.
        backtest = args.mode == "backtest"
        self.audit = AuditTrail(None if backtest else settings.storage.log_dir)
        if backtest and not args.log_level:
            logging.getLogger().setLevel(logging.WARNING)
        self.parts: Components | None = None
        self.feed: AsyncIterator[Candle] | None = None
        self.progress: Callable[[int, int], None] | None = None
        self.restart_as: str | None = None
        self.dropped = 0
        self._closers: list[Closer] = []
        self.notifiers: list[EventSink] = []
        self.supervisor = Supervisor(self.stop, self.alert)
        self.session: ExchangeSession | None = None  # on the exchange feed
        self.learning: Learning | None = None
        self.operator: Operator | None = None
        self.gathered = Gathered()  # the pipeline loop's (`_next_burst`), shown in status
        self.keep_warm: KeepWarm | None = None  # the pipeline loop's (burst_rehearsal)

    def context(self) -> BuildContext:
        """Return what a builder needs of this run: arguments, audit, alert bus, stop."""
        return BuildContext(
            args=self.args,
            settings=self.settings,
            audit=self.audit,
            alert=self.alert,
            stop=self.stop,
            progress=self.progress,
        )

    def use(self, parts: Components) -> None:
        """Run on `parts`: its feed's candles are read once, its closers run at the end."""
        self.parts = parts
        self.feed = aiter(parts.feed)
        _show_late(parts.engine, lambda: self.gathered)
        self._closers.extend(parts.closers)
        if self.exchange is not None:
            live = isinstance(parts.gateway, LiveGateway)
            self.session = ExchangeSession(self.settings, parts.engine, self.exchange, live=live)
        self.learning = Learning(
            self.settings,
            parts.engine,
            alert=self.alert,
            frames=parts.frames,
            add_closer=lambda closer: self._closers.append(closer),
        )
        self.operator = Operator(
            self.settings,
            parts.engine,
            stop=self.stop,
            alert=self.alert,
            switch_mode=self.switch_mode,
            add_notifier=self.notifiers.append,
            add_closer=lambda closer: self._closers.append(closer),
            forced_params=parts.forced_params,
        )

    @property
    def dashboard(self) -> Dashboard | None:
        """The terminal dashboard while it is shown."""
        return self.operator.dashboard if self.operator is not None else None

    @property
    def retrainer(self) -> Retrainer | None:
        """The model retrainer, once learning has run its first step."""
        return self.learning.retrainer if self.learning is not None else None

    def build_replay(self) -> None:
        """Assemble a replay run (sim --feed replay, backtest)."""
        self.use(build_replay(self.context()))

    async def build_exchange(self, *, paper: bool, probe: bool = False) -> None:
        """Assemble a run on the live exchange feed: paper fills (sim) or real orders (live).

        With `probe` (feed auto) an unreachable exchange fails fast instead of retrying.
        """
        if paper:
            self.use(await build_paper(self.context(), probe=probe))
        else:
            self.use(await build_live(self.context()))
        await self.start_up()

    async def assemble(self) -> None:
        """Assemble the run with its mode's builder, then take up the saved state."""
        if self.args.mode == "backtest":
            self.use(build_backtest(self.context()))
        elif self.args.mode == "sim":
            self.use(await build_sim(self.context()))
        else:
            self.use(await build_live(self.context()))
        await self.start_up()

    async def start_up(self) -> None:
        """Take up the saved state before trading resumes (on the exchange feed only).

        Paper: the risk state from its file. Live: the risk state from the journal, then
        the reconciliation of the journal with the exchange (the private streams and the
        stops follow in the run, before the first decision).
        """
        assert self.parts is not None
        if self.exchange is None:
            return  # a replay starts from the archive's start, with fresh state
        if self.store is None:
            await self.parts.state.restore_risk_state()
            return
        await self.parts.state.restore_risk_state(self.store)
        assert self.session is not None
        await self.session.reconcile(self.store)

    async def close_exchange(self) -> None:
        """Close an exchange opened by a failed start (the risk state or the reconciliation)."""
        if self.exchange is not None:
            await self.exchange.close()
            self._closers = [c for c in self._closers if c[0] != "exchange"]

    def alert(self, event: Event) -> None:
        """Route an event from any component to the notifiers (Telegram when enabled)."""
        for notifier in self.notifiers:
            try:
                notifier(event)
            except Exception:
                log.exception("notifier_failed", kind=type(event).__name__)

    async def _feed_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="feed")  # this task's context only
        assert self.feed is not None
        try:
            async for candle in self.feed:
                await self.queue.put((candle, time.perf_counter()))
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    def _candle_step(self) -> Callable[..., Awaitable[None]]:
        # Where a candle goes: through the simulated exchange's driver when orders fill on
        # paper, else straight into the engine (live: fills come by the private stream).
        assert self.engine is not None
        return self.driver.on_candle if self.driver is not None else self.engine.on_candle

    async def _direct_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="pipeline")  # this task's context only
        # Backtests have no I/O edge to buffer: the replay drives the engine directly.
        assert self.engine is not None
        assert self.feed is not None
        on_candle = self._candle_step()
        schedule, engine, step = self.pair_schedule, self.engine, self.engine.step
        driver = self.driver
        if (
            schedule is None
            and driver is not None
            and self.replay is not None
            and await driver.run(self.replay, self.stop)
        ):
            log.info("feed_exhausted", candles=self.engine.candles)
            self.stop.set()
            return
        async for candle in self.feed:
            if self.stop.is_set():
                break
            if schedule is not None:
                schedule.apply(engine, candle, step)
            await on_candle(candle)
        log.info("feed_exhausted", candles=self.engine.candles)
        self.stop.set()

    async def _pipeline_loop(self) -> None:
        structlog.contextvars.bind_contextvars(component="pipeline")  # this task's context only
        assert self.engine is not None
        # Candles that closed together are decided together: what is already queued when
        # the loop comes round is one burst (see burst.py).
        paced = self.replay is None  # bursts from the wire pace the collector (burst.py)
        exchange, feed, driver = self.settings.exchange, self.exchange_feed, self.driver
        in_flight = exchange.burst_orders_in_flight if driver is None else 1  # live: together
        match = driver.match if driver is not None else None
        decider = BurstDecider(self.engine, match, paced=paced, in_flight=in_flight)
        self.gathered = Gathered()  # what the bursts took; the late pairs
        # Bursts from the wire: their passes rehearsed just before each close (burst_rehearsal).
        self.keep_warm = KeepWarm(self.engine, lead_s=exchange.burst_rehearse_ms / 1000)
        await _decide_bursts(
            self.queue,
            decider,
            self.gathered,
            self.keep_warm,
            expected=feed.feed_pairs if feed is not None else (),
            within_s=exchange.burst_gather_ms / 1000,
        )
        await decider.saved()  # the last burst's risk state is on disk
        log.info("feed_exhausted", candles=self.engine.candles)
        if self.dashboard is not None and self.replay is not None and not self.stop.is_set():
            # A replay watched on the dashboard stays on screen, final state and all, until
            # the operator quits (q stops the run as usual; the summary follows).
            self.dashboard.say("replay finished: the final state stays on screen, q quits")
            return
        self.stop.set()

    async def run(self) -> RunSummary:
        """Run until the feed ends, the duration passes or a signal arrives."""
        assert self.engine is not None
        install_signal_handlers(asyncio.get_running_loop(), self.stop)
        # The start-up reconciliation report reaches Telegram before trading resumes.
        assert self.operator is not None
        await self.operator.start_telegram()
        try:
            await self._run_tasks()
        except BaseExceptionGroup as group:
            # A task failed (a FatalError such as rejected keys, or a bug): the TaskGroup
            # cancelled the others. Stop trading safely: cancel entry orders, persist,
            # notify, close sessions (each step isolated), then exit non-zero.
            error = _first_error(group)
            await run_fail_safe(
                error,
                [
                    ("cancel_entry_orders", self._cancel_entry_orders),
                    ("persist_state", self._persist),
                    ("notify", self._notify_fatal(error)),
                    *self._closers,
                ],
                step_timeout=SHUTDOWN_STEP_TIMEOUT,
            )
            self.audit.close()
            raise error from group
        await self.teardown()
        return dataclasses.replace(self.summary(), restart_as=self.restart_as)

    async def on_pairs_changed(self, diff: PairListDiff) -> None:
        """Add new pairs (warm-up first) and drain removed ones, keeping open positions."""
        assert self.engine is not None
        feed = self.exchange_feed
        assert feed is not None
        await feed.warm_up(list(diff.added), self.engine.strategy)
        prime_anomalies(self.engine, list(diff.added))
        keep = list(self.top_pairs.pairs) if self.top_pairs is not None else self.engine.pairs
        self.engine.set_pairs(keep)
        # Removed pairs that still hold a position stay on the feed until it is closed.
        draining = diff.draining(self.engine.portfolio.positions())
        feed.follow([*keep, *[p for p in draining if p not in keep]])
        log.info(
            "pairs_changed",
            added=list(diff.added),
            removed=list(diff.removed),
            draining=list(draining),
        )

    async def switch_mode(self, target: str) -> None:
        """Switch between paper and live: shut down in order, then restart in `target`.

        The restart goes through the same start-up (and reconciliation) as any start, so
        nothing is carried over half-built. main re-executes the process after teardown.
        """
        if target == self.args.mode or target not in ("sim", "live"):
            return
        if target == "live" and not self.settings.exchange.has_keys:
            raise ConfigError("live trading needs KESTREL_EXCHANGE__API_KEY/API_SECRET")
        log.warning("mode_switch_requested", to=target, **{"from": self.args.mode})
        self.restart_as = target
        self.stop.set()

    async def _settle_fills(self) -> None:
        if self.session is not None:
            await self.session.settle_fills()

    async def _persist(self) -> None:
        await self.state.persist()

    def _notify_fatal(self, error: BaseException) -> Callable[[], Awaitable[object]]:
        async def notify() -> None:
            message = error.message if isinstance(error, BotError) else repr(error)
            self.alert(ErrorRaised(f"trading stopped: {message}"))
            await asyncio.sleep(0.5)  # give the Telegram queue a moment before it closes

        return notify

    def _background(self, tg: asyncio.TaskGroup, *, direct: bool) -> list[asyncio.Task[Any]]:
        """Start the supervised background work of this run; return its tasks.

        Background work may fail; trading goes on (the supervisor tells the operator).
        """
        assert self.engine is not None
        supervise = self.supervisor.loop
        tasks: list[asyncio.Task[Any]] = []
        snapshot = self.state.snapshot_once
        tasks.append(tg.create_task(supervise("snapshots", snapshot), name="snapshots"))
        if self.engine.anomaly_watch is not None and not direct:
            tasks.append(
                tg.create_task(supervise("feed-watch", self._watch_feed), name="feed-watch")
            )
        if self.settings.learning.enabled and self.args.mode != "backtest":
            assert self.learning is not None
            self.learning.enable()
            retrain = self.learning.retrain_once
            tasks.append(tg.create_task(supervise("retrain", retrain), name="retrain"))
        if self.top_pairs is not None:
            top_pairs = self.top_pairs
            refresh = functools.partial(top_pairs.run, self.stop, on_change=self.on_pairs_changed)
            tasks.append(tg.create_task(supervise("top-pairs", refresh), name="top-pairs"))
        assert self.operator is not None
        tasks += self.operator.ui_tasks(tg)
        if self.args.duration is not None:
            tasks.append(tg.create_task(_timer(self.args.duration, self.stop), name="duration"))
        return tasks

    async def _run_tasks(self) -> None:
        assert self.engine is not None
        direct = self.args.mode == "backtest"
        async with asyncio.TaskGroup() as tg:
            background: list[asyncio.Task[Any]] = []
            session = self.session
            if session is not None and session.live:
                # Live: the private streams come first, then the fills since the last
                # record, then the protection of every position; only then a decision.
                background.append(tg.create_task(session.private_fills(), name="private-fills"))
                background.append(tg.create_task(session.private_orders(), name="private-orders"))
                await session.ready_to_trade()
            funding = session.funding_task() if session is not None else None
            if funding is not None:
                background.append(tg.create_task(funding, name="funding"))
            self._started()
            if direct:
                feed = tg.create_task(asyncio.sleep(0), name="feed")
                pipeline = tg.create_task(self._direct_loop(), name="pipeline")
            else:
                feed = tg.create_task(self._feed_loop(), name="feed")
                pipeline = tg.create_task(self._pipeline_loop(), name="pipeline")
            background += self._background(tg, direct=direct)
            await self.stop.wait()
            self.engine.set_state(BotState.STOPPING)
            # 1. Stop intake; drop (and count) what was queued but not processed.
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
            while not self.queue.empty():
                if self.queue.get_nowait() is not None:
                    self.dropped += 1
            self.queue.put_nowait(None)
            # 2. Let the pipeline finish the candle in hand (never cut an order in half).
            await pipeline
            for task in background:
                task.cancel()

    async def _watch_feed(self) -> None:
        # The stale-feed rule needs a timer: a silent feed brings no candle to check.
        assert self.engine is not None
        await asyncio.sleep(min(60.0, self.engine.step / 1000))
        self.engine.check_feed()

    def _started(self) -> None:
        assert self.engine is not None
        self.engine.set_state(BotState.RUNNING)
        # Everything built so far lives for the whole run: keep it out of the cyclic GC's
        # generations so full collections stay short (they stalled the loop ~100 ms).
        gc.freeze()
        log.info(
            "daemon_started",
            mode=self.args.mode,
            pairs=self.engine.pairs,
            timeframe=self.engine.timeframe,
            strategy=self.engine.strategy.describe(),
        )

    async def teardown(self) -> None:
        """Shut down in order, each step isolated: orders, state, notifications, sessions."""
        assert self.engine is not None
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("cancel_entry_orders", self._cancel_entry_orders),
            ("settle_fills", self._settle_fills),
            ("persist_state", self._persist),
            *self._closers,
        ]
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), timeout=SHUTDOWN_STEP_TIMEOUT)
            except Exception:
                log.exception("shutdown_step_failed", step=name)
        self.engine.set_state(BotState.STOPPED)
        log.info("daemon_stopped", candles=self.engine.candles, dropped=self.dropped)
        self.audit.close()

    async def _cancel_entry_orders(self) -> None:
        # Entry orders are cancelled; protective stops stay on the exchange so a stopped bot
        # still has its stops. What an order is for is the journal's record, not the wire.
        assert self.engine is not None
        cancelled = await self.engine.executor.cancel_entries()
        if cancelled:
            log.info("entry_orders_cancelled", orders=cancelled)

    def summary(self) -> RunSummary:
        """Return the engine's summary plus run bookkeeping."""
        assert self.engine is not None
        return dataclasses.replace(self.engine.summary(), dropped_candles=self.dropped)


def _show_late(engine: Engine, gathered: Callable[[], Gathered]) -> None:
    """Name the pipeline loop's late streams in the engine's status (`Snapshot.late_streams`)."""
    status = engine.extra_status
    engine.extra_status = lambda: {**status(), "late_streams": tuple(sorted(gathered().late))}


async def _timer(seconds: float, stop: asyncio.Event) -> None:
    await asyncio.sleep(seconds)
    log.info("duration_elapsed", seconds=seconds)
    stop.set()


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """Return the error that ended the run: a FatalError first, else the first one."""
    fatal = group.subgroup(FatalError)
    source: BaseException = fatal if fatal is not None else group
    while isinstance(source, BaseExceptionGroup):
        source = source.exceptions[0]
    return source


async def run_backtest(args: argparse.Namespace, settings: Settings) -> RunSummary:
    """Run a backtest on the replay path (or the fast path) with a progress bar and report."""
    import analytics
    from backtest_fast import fast_backtest_run, fast_engine_blockers
    from trade_simulator import result_from_summary

    s = settings
    timings: dict[str, float] = {}
    started = time.perf_counter()
    engine = getattr(args, "engine", "replay")
    result = None
    if engine in ("fast", "auto"):
        blockers = fast_engine_blockers(s, args)
        if blockers and engine == "fast":
            raise ConfigError("--engine fast cannot run this backtest: " + "; ".join(blockers))
        if not blockers:
            result = fast_backtest_run(args, s, timings, started, forced=engine == "fast")
        log.info("backtest_engine", engine="fast" if result is not None else "replay",
                 blockers=blockers or None)  # fmt: skip
        if result is None:
            timings.clear()
            started = time.perf_counter()
    if result is not None:
        summary = dataclasses.replace(result.summary(), dropped_candles=0)
        timings["run_s"] = time.perf_counter() - started - timings["load_s"]
    else:
        daemon = Daemon(args, settings)
        with analytics.progress_bar("backtest") as progress:
            daemon.progress = progress
            await daemon.assemble()
            ran = time.perf_counter()
            summary = await daemon.run()
            timings.update(daemon.timings, run_s=time.perf_counter() - ran)
        assert daemon.engine is not None
        # The closes are drawn only by the HTML report (buy-and-hold, price charts): a
        # console-only run does not hold their close times (8 bytes a candle) to the end.
        prices = {
            pair: (index_ms(frame) + daemon.engine.step, frame["close"].to_numpy())
            for pair, frame in daemon.frames.items()
            if args.report_html is not None
        }
        result = result_from_summary(summary, daemon.engine.portfolio.equity_curve, prices=prices)
    phase = time.perf_counter()
    mc = analytics.monte_carlo(analytics.trade_returns(result)) if summary.n_trades > 1 else None
    timings["monte_carlo_s"] = time.perf_counter() - phase
    phase = time.perf_counter()
    Console(file=sys.stdout, width=120).print(analytics.render_rich(result, monte_carlo_result=mc))
    if args.report_html is not None:
        path = analytics.write_html_report(result, args.report_html, monte_carlo_result=mc)
        log.warning("report_written", path=str(path))
    timings["report_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - started
    # Where a backtest's seconds went (start-up imports excluded: they precede this call).
    rounded = {k: round(v, 4) for k, v in timings.items()}
    log.info("backtest_timings", **rounded)
    return dataclasses.replace(summary, timings=rounded)


async def run_trading(args: argparse.Namespace, settings: Settings) -> RunSummary:
    """Run sim, backtest or live trading and return the summary."""
    if args.mode == "backtest":
        return await run_backtest(args, settings)
    daemon = Daemon(args, settings)
    try:
        await daemon.assemble()
    except BaseException:
        await daemon.close_exchange()
        raise
    return await daemon.run()


async def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    """Run a batch mode (optimize, backfill, train, models, pairs, parity, anomalies, patterns).

    Returns its exit status.
    """
    if args.mode == "backfill":
        from data_manager import run_backfill_cli

        return await run_backfill_cli(args, settings)
    if args.mode == "pairs":
        from top_pairs import run_pairs_cli

        return await run_pairs_cli(args, settings)
    if args.mode == "optimize":
        from parameter_optimization import run_optimize_cli

        return await run_optimize_cli(args, settings)
    if args.mode == "train":
        from model_training import run_train_cli

        summary = await run_train_cli(
            load_frames(args, settings),
            settings.learning,
            kind=args.strategy or settings.learning.kind,
            timeframe=settings.strategy.timeframe,
            data_dir=settings.storage.data_dir,
            reward=settings.reward,
            summary_json=args.summary_json,
        )
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return 0
    if args.mode == "models":
        from model_training import model_dirs, run_models_cli

        models_dir, _ = model_dirs(settings.learning, settings.storage.data_dir)
        return run_models_cli(
            models_dir,
            promote=args.promote,
            rollback=args.rollback,
            summary_json=args.summary_json,
        )
    if args.mode == "parity":
        return await run_parity(args, settings)
    if args.mode == "patterns":
        return await run_patterns(args, settings)
    if args.mode == "anomalies":
        from anomaly_detection import run_anomalies_cli

        frames = load_frames(args, settings)
        return await asyncio.to_thread(run_anomalies_cli, frames, settings.anomaly, args)
    raise ConfigError(f"unknown batch mode {args.mode}")


async def run_patterns(args: argparse.Namespace, settings: Settings) -> int:
    """Backtest the strategy, then learn which pattern clusters preceded its wins and losses.

    Writes each pair's model to `data/models/patterns/<BASE-QUOTE>-<timeframe>.json` (the
    file `KESTREL_STRATEGY__PATTERN_MODEL` names for the entry filter) and, with
    `--summary-json`, every cluster's record.
    """
    from dataclasses import asdict

    from pattern_recognition import fit_patterns
    from utils.utilities import atomic_write

    backtest = argparse.Namespace(**{**vars(args), "mode": "backtest", "summary_json": None})
    summary = await run_backtest(backtest, settings)
    timeframe = settings.strategy.timeframe
    models: dict[str, Any] = {}
    for pair, frame in load_frames(args, settings).items():
        trades = [t for t in summary.trades if t.pair == pair]
        try:
            model = await asyncio.to_thread(
                fit_patterns, frame, trades, min_trades=settings.strategy.pattern_min_trades
            )
        except ValueError as e:
            raise DataError(f"{pair}: {e}", pair=pair) from e
        name = f"{pair.split(':')[0].replace('/', '-')}-{timeframe}.json"
        path = model.save(settings.storage.data_dir / "models" / "patterns" / name)
        models[pair] = {
            "path": str(path),
            "trades": len(trades),
            # Trades decided before the feature window was complete have no cluster.
            "clustered": sum(s.trades for s in model.stats),
            "base_win_rate": model.base_win_rate,
            "clusters": [asdict(s) for s in model.stats],
        }
        for stats in model.stats:
            print(f"{pair} {stats.summary()}")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        out = {"mode": "patterns", "n_trades": summary.n_trades, "models": models}
        atomic_write(args.summary_json, json.dumps(out, indent=2, sort_keys=True))
    return 0


async def run_parity(args: argparse.Namespace, settings: Settings) -> int:
    """Replay the recorded live candles through the backtester and report every difference.

    Exit status 0 when every decision matched, 1 when something differed.
    """
    from rich.console import Console

    from parity import DECISION_KINDS, compare, read_audit, render
    from utils.utilities import parse_date_ms

    since = parse_date_ms(args.since) if args.since else None
    live = read_audit(settings.storage.log_dir, since)
    pairs = sorted({e["pair"] for e in live if e.get("kind") in DECISION_KINDS})
    if not pairs:
        raise DataError(
            f"no recorded live decisions in {settings.storage.log_dir}/audit.jsonl"
            + (f" since {args.since}" if args.since else "")
        )
    data = settings.model_dump()
    data["strategy"]["pairs"] = pairs
    replay_settings = Settings.model_validate(data)
    replay_args = argparse.Namespace(**{**vars(args), "mode": "backtest", "timerange": None})
    daemon = Daemon(replay_args, replay_settings)
    daemon.audit = AuditTrail(None, keep=True)
    daemon.build_replay()
    await daemon.run()
    assert daemon.audit.events is not None
    replayed = [
        e for e in daemon.audit.events if since is None or e.get("candle_ts", e["ts"]) >= since
    ]
    report = compare(live, replayed)
    Console(file=sys.stdout, width=140).print(render(report))
    out = args.summary_json or settings.storage.data_dir / "parity" / "report.json"
    atomic_write(Path(out), json.dumps(report.to_json(), indent=2, default=str))
    return 0 if report.ok else 1
