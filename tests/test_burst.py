"""Candles that close together, decided together: the same orders as one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import main
from burst import (
    YOUNG_BETWEEN_BURSTS,
    BurstDecider,
    paced_collections,
    split_runs,
)
from config import load_settings
from models import Candle, OrderType
from pipeline import Engine
from runner import Daemon, Gathered, _next_burst
from tests.test_backtest_support import cli_args
from trade_executor import StopState


PAIRS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT"]
BURSTS = 120  # hourly candles per pair fed in each example


@pytest.fixture
def sim_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Paper trading on the bundled hourly samples of four pairs; a fast-trading strategy."""
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("KESTREL_STRATEGY__NAME", "sma_cross")
    monkeypatch.setenv("KESTREL_STRATEGY__PARAMS", '{"fast": 2, "slow": 3}')
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", ",".join(PAIRS))
    monkeypatch.setenv("KESTREL_STRATEGY__TIMEFRAME", "1h")
    monkeypatch.setenv("KESTREL_RISK__MAX_OPEN_POSITIONS", "3")
    # The anomaly watch too (a live feed's): a burst judges its candles in one pass. A short
    # scale and a low volume threshold make it pause some entries within these candles.
    monkeypatch.setenv("KESTREL_ANOMALY__IN_REPLAY", "true")
    monkeypatch.setenv("KESTREL_ANOMALY__WINDOW", "20")
    monkeypatch.setenv("KESTREL_ANOMALY__VOLUME_BURST_Z", "3")


def _daemon() -> Daemon:
    parsed = cli_args("--mode", "sim", "--feed", "replay", "--log-level", "WARNING")
    daemon = Daemon(parsed, main._apply_cli(load_settings(env_file=None), parsed))
    daemon.build_replay()
    assert daemon.engine is not None
    daemon.engine.set_state(daemon.engine.state.RUNNING)
    return daemon


def _bursts(daemon: Daemon) -> list[list[Candle]]:
    """Return the first `BURSTS` candle times, each with every pair's candle (pair order)."""
    assert daemon.engine is not None
    times = sorted(set.intersection(*(set(f.index[:BURSTS]) for f in daemon.frames.values())))
    out = []
    for ts in times:
        burst = []
        for pair in PAIRS:
            row = daemon.frames[pair].loc[ts]
            ms = int(ts.timestamp() * 1000)
            o, h, lo, c, v = (float(row[k]) for k in ("open", "high", "low", "close", "volume"))
            burst.append(Candle(pair, "1h", ms, o, h, lo, c, v))
        out.append(burst)
    return out


def _admitted(count: int) -> tuple[Engine, list[list[Candle]]]:
    """Return a daemon's engine with the first `count` bursts admitted, and every burst."""
    daemon = _daemon()
    engine = daemon.engine
    assert engine is not None
    bursts = _bursts(daemon)
    for burst in bursts[:count]:
        for candle in burst:
            assert engine.admit(candle)
    return engine, bursts


def _record(daemon: Daemon) -> dict[str, Any]:
    """Return what the run decided: each pair's orders, the positions, trades and curve."""
    engine = daemon.engine
    assert engine is not None
    orders: dict[str, list[Any]] = {}
    for cid, o in engine.executor.orders.items():
        # Each pair's orders in the order they were sent (pairs send concurrently).
        levels = (o.price, o.stop_price, o.ts_updated)  # a stop's, moved or not
        orders.setdefault(o.pair, []).append(
            (cid, str(o.side), o.qty, *levels, str(o.status), o.reduce_only)
        )
    return {
        "orders": orders,
        "positions": {
            p: (str(pos.side), pos.qty, pos.entry_price, pos.stop_price)
            for p, pos in engine.portfolio.positions().items()
        },
        "trades": [t.as_dict() for t in engine.portfolio.closed],
        "equity": list(engine.portfolio.equity_curve),
        "cash": engine.portfolio.cash,
        # Each pair's latest anomaly (judged in one pass per burst, or one at a time).
        "anomalies": {
            p: (a.ts, str(a.kind), a.score)
            for p, a in (engine.anomaly_watch.latest if engine.anomaly_watch else {}).items()
        },
    }


def _assert_protected(daemon: Daemon) -> None:
    """Each position with a stop level has one working stop on the venue; none is pending."""
    engine = daemon.engine
    assert engine is not None
    executor = engine.executor
    assert not executor.pending_stops
    for pair, position in engine.portfolio.positions().items():
        orders = [o for o in executor.open_orders() if o.pair == pair]
        working = [o for o in orders if o.type is OrderType.STOP_MARKET]
        exiting = any(o.type is OrderType.MARKET for o in orders)  # took the stop off
        if position.stop_price is not None and not exiting:
            assert len(working) == 1, pair  # at the level rounded to the tick
            assert executor.protective_stop(pair)[0] is StopState.WORKING


def _exits_without_stop(record: dict[str, Any]) -> int:
    """Count the entries whose next order is their exit: decided on the fill's candle."""
    count = 0
    for orders in record["orders"].values():
        for entry, after in itertools.pairwise(orders):
            count += not entry[-1] and after[-1] and after[4] is None  # no stop level
    return count


def _close(daemon: Daemon, burst: list[Candle]) -> None:
    # The replay clock stands at the burst's close, as the feed would set it.
    assert daemon.replay is not None
    daemon.replay.clock.set(burst[0].ts + 3_600_000)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1), cut_every=st.integers(2, 5))
def test_a_burst_decided_together_equals_candles_one_at_a_time(
    sim_env: None, seed: int, cut_every: int
) -> None:
    """Random arrival orders, drained in random pieces: each piece decided together gives the
    same orders, positions, trades and equity curve as its candles fed one at a time (through
    the simulated exchange's driver, awaiting each answer) in the piece's decision order."""
    rng = np.random.default_rng(seed)
    moves: list[str] = []  # stop moves made in the bursts (after their orders were sent)

    async def run() -> tuple[dict[str, Any], dict[str, Any], int]:
        together, alone = _daemon(), _daemon()
        assert together.engine is not None
        assert together.driver is not None
        assert alone.driver is not None
        decider = BurstDecider(together.engine, together.driver.match)
        executor, amend = together.engine.executor, together.engine.executor.amend_stop

        async def counted(pair: str, stop: Any, **kwargs: Any) -> Any:
            moved = await amend(pair, stop, **kwargs)
            if moved is not None and moved.stop_price == stop:
                moves.append(pair)  # a stop that took the new level
            return moved

        executor.amend_stop = counted  # type: ignore[method-assign]
        for burst in _bursts(together):
            arrived = [burst[i] for i in rng.permutation(len(burst))]
            cut = int(rng.integers(1, cut_every)) if rng.random() < 0.5 else len(arrived)
            for piece in (arrived[:cut], arrived[cut:]):
                if not piece:
                    continue
                _close(together, burst)
                _close(alone, burst)
                await decider.on_burst([(c, None) for c in piece])
                _assert_protected(together)
                by_pair = {c.pair: c for c in piece}
                assert sorted(decider.last_order) == sorted(by_pair)
                for pair in decider.last_order:
                    await alone.driver.on_candle(by_pair[pair])
                    _assert_protected(alone)
        return _record(together), _record(alone), decider.bursts

    together, alone, bursts = asyncio.run(run())
    assert bursts >= BURSTS
    assert len(together["anomalies"]) >= 3  # pauses were taken on the way
    assert sum(map(len, together["orders"].values())) > 10  # entries, stops, exits
    assert moves  # trailing stops moved: their levels are compared too
    assert _exits_without_stop(together) > 0  # the stops these never sent agree too
    assert together == alone


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_burst_does_not_depend_on_the_order_its_candles_arrive_in(
    sim_env: None, seed: int
) -> None:
    """Two runs of the same bursts, each burst's candles arriving in a different random order,
    decide the same orders in the same order, with the same positions and curve."""
    rng = np.random.default_rng(seed)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        first, second = _daemon(), _daemon()
        deciders = []
        for daemon in (first, second):
            assert daemon.engine is not None
            assert daemon.driver is not None
            deciders.append(BurstDecider(daemon.engine, daemon.driver.match))
        for burst in _bursts(first):
            for daemon, decider in zip((first, second), deciders, strict=True):
                _close(daemon, burst)
                arrived = [burst[i] for i in rng.permutation(len(burst))]
                await decider.on_burst([(c, None) for c in arrived])
        return _record(first), _record(second)

    first, second = asyncio.run(run())
    assert sum(map(len, first["orders"].values())) > 10
    assert first == second


def test_a_pair_twice_in_one_drain_is_decided_in_two_runs() -> None:
    """A refilled gap brings a pair's two candles in one drain: the second waits for the first."""
    a1, b1, a2, c1 = (Candle(p, "1m", ts, 1, 1, 1, 1, 1) for p, ts in (
        ("A", 0), ("B", 0), ("A", 60_000), ("C", 0)))  # fmt: skip
    runs = [
        [c.pair for c, _ in run]
        for run in split_runs([(a1, None), (b1, None), (a2, None), (c1, None)])
    ]
    assert runs == [["A", "B"], ["A", "C"]]


def test_a_burst_does_not_wait_for_its_risk_state_save(sim_env: None) -> None:
    """The risk state's save after a burst runs behind it: the next burst is decided while
    a slow save is still writing, saves asked for meanwhile collapse into one more, and
    `saved` returns once the last one is done. The garbage collector is back on after."""

    async def run() -> tuple[int, int, int, bool]:
        daemon = _daemon()
        assert daemon.engine is not None
        assert daemon.driver is not None
        release, calls = asyncio.Event(), [0]

        async def slow_save() -> None:
            calls[0] += 1
            await release.wait()

        daemon.engine.risk_saver = slow_save
        decider = BurstDecider(daemon.engine, daemon.driver.match)
        bursts = _bursts(daemon)[:4]
        for burst in bursts:
            _close(daemon, burst)
            await decider.on_burst([(c, None) for c in burst])
            await asyncio.sleep(0)  # the save task starts and blocks on `release`
        during = calls[0]
        release.set()
        await decider.saved()
        return during, calls[0], daemon.engine.candles, gc.isenabled()

    during, after, candles, collecting = asyncio.run(run())
    assert candles == 4 * len(PAIRS)  # every burst decided while the first save hung
    assert during == 1
    assert after == 2  # three bursts asked while it ran: one more save, the newest state
    assert collecting


def test_a_paced_burst_collects_the_young_generation_once_its_decisions_are_out(
    sim_env: None,
) -> None:
    """Bursts from the wire pace the collector: while they run, the young generation's
    automatic threshold is raised, so what the time between two bursts leaves does not set
    off a collection while the next one gathers; each burst collects it once it has decided
    (every candle processed), never during its decisions. The threshold in place before is
    back after, even when the loop raised. An unpaced decider (a replay's) leaves the
    collector to its thresholds."""
    young: list[tuple[int, int, int]] = []  # each: candles decided, burst, young count

    async def run(paced: bool) -> tuple[list[int], list[int]]:
        daemon = _daemon()
        engine = daemon.engine
        assert engine is not None
        assert daemon.driver is not None
        decider = BurstDecider(engine, daemon.driver.match, paced=paced)
        at = [0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start" and info["generation"] == 0:
                young.append((engine.candles, at[0], gc.get_count()[0]))

        before: list[int] = []
        after: list[int] = []
        kept: list[list[list[int]]] = []
        gc.collect()
        gc.callbacks.append(on_gc)
        try:
            with paced_collections(paced):
                for at[0], burst in enumerate(_bursts(daemon)[:30]):
                    _close(daemon, burst)
                    # What the time since the last burst left: more than CPython's own
                    # threshold (700), under the paced one.
                    kept.append([[] for _ in range(1_000 if paced else 100)])
                    before.append(gc.get_count()[0])
                    await decider.on_burst([(c, None) for c in burst])
                    after.append(gc.get_count()[0])
        finally:
            gc.callbacks.remove(on_gc)
        return before, after

    threshold = gc.get_threshold()
    before, after = asyncio.run(run(paced=True))
    assert gc.get_threshold() == threshold
    assert all(count > 900 for count in before)  # nothing collected between bursts
    assert all(count < 50 for count in after)  # each burst collected
    assert {index for _, index, _ in young} == set(range(30))
    # Each after the burst's last candle was decided (4 candles a burst).
    assert all(candles == 4 * (index + 1) for candles, index, _ in young)
    young.clear()
    asyncio.run(run(paced=False))
    assert gc.get_threshold() == threshold
    # Unpaced: only the collector's own, at its threshold.
    assert all(count >= threshold[0] for _, _, count in young)
    inside: list[int] = []

    def raising() -> None:
        with paced_collections():
            inside.append(gc.get_threshold()[0])
            raise RuntimeError

    with pytest.raises(RuntimeError):
        raising()
    assert inside == [YOUNG_BETWEEN_BURSTS]
    assert gc.get_threshold() == threshold
    # Two paced loops in one process, the first ending first: the collector is paced
    # until the last ends, then back to what it was.
    first, second = paced_collections(), paced_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == YOUNG_BETWEEN_BURSTS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == threshold


def test_a_held_pair_that_exits_on_its_candle_does_not_move_its_stop_first(sim_env: None) -> None:
    """A held pair whose candle's signal closes the position sends its exit without first
    amending the stop the exit takes off (a request, and on a live venue a round trip in
    front of the exit); on the other held candles the stop still trails. Counted on the
    venue's amends and the decided exits, candle by candle."""

    async def run() -> tuple[set[tuple[str, int]], set[tuple[str, int]], int]:
        daemon = _daemon()
        engine, driver = daemon.engine, daemon.driver
        assert engine is not None
        assert driver is not None
        amended: set[tuple[str, int]] = set()
        exits: set[tuple[str, int]] = set()
        amend, send = engine.executor.amend_stop, engine.send_decided

        async def counting_amend(pair: str, stop: Any, **kw: Any) -> Any:
            amended.add((pair, engine.last_candle_ts[pair]))
            return await amend(pair, stop, **kw)

        async def counting_send(order: Any) -> bool:
            if order.intent.reduce_only:
                exits.add((order.intent.pair, engine.last_candle_ts[order.intent.pair]))
            return await send(order)

        engine.executor.amend_stop = counting_amend  # type: ignore[method-assign]
        engine.send_decided = counting_send  # type: ignore[method-assign,assignment]
        for burst in _bursts(daemon):
            _close(daemon, burst)
            for candle in burst:
                await driver.on_candle(candle)
        return amended, exits, len(engine.portfolio.closed)

    amended, exits, trades = asyncio.run(run())
    assert trades > 5
    assert len(exits) > 5  # strategy exits decided on held candles
    assert len(amended) > 5  # stops trailed on the held candles that did not exit
    assert not amended & exits


def test_the_returns_correlation_reads_end_on_the_same_bar_whichever_candle_came_first(
    sim_env: None,
) -> None:
    """The returns a decision correlates over end on the bar before its candle for every pair:
    a pair whose candle of the burst was taken in already, and one whose candle is still on
    its way, give the same series (a burst split across two drains decides the same)."""
    engine, bursts = _admitted(40)
    last = {c.pair: engine._pair_returns(c.pair) for c in bursts[39]}
    now = bursts[40]
    ts = now[0].ts
    assert engine.admit(now[0])  # BTC's candle in, the others' not yet
    early = {c.pair: engine._pair_returns(c.pair, before=ts) for c in now}
    for candle in now[1:]:
        assert engine.admit(candle)
    late = {c.pair: engine._pair_returns(c.pair, before=ts) for c in now}
    for pair, series in late.items():
        before, previous = early[pair], last[pair]
        assert series is not None
        assert before is not None
        assert previous is not None
        assert np.array_equal(series, before)
        assert np.array_equal(series, previous)  # the bars up to the one before
    fresh, aligned = engine._pair_returns("BTC/USDT"), late["BTC/USDT"]
    assert fresh is not None
    assert aligned is not None
    assert not np.array_equal(fresh, aligned)  # sizing still reads the newest bar


@pytest.mark.parametrize("sizing", ["fixed_fractional", "volatility_target"])
def test_an_entry_with_nothing_held_gets_the_returns_only_where_its_sizing_reads_them(
    sim_env: None, monkeypatch: pytest.MonkeyPatch, sizing: str
) -> None:
    """With no position open the correlation guard compares with nothing, so an entry's
    risk context carries no returns views, except the pair's own for volatility targeting,
    which then sizes on their standard deviation (not the ATR fallback)."""
    monkeypatch.setenv("KESTREL_RISK__SIZING", sizing)
    engine, bursts = _admitted(40)
    candle = bursts[39][0]
    assert not engine.portfolio.has_positions()
    ctx = engine._risk_context(candle.pair, candle.ts + 3_600_000, candle.ts)
    assert ctx.aligned_returns is None
    if sizing == "fixed_fractional":
        assert ctx.returns is None
        return
    assert ctx.returns is not None
    assert candle.pair in ctx.returns
    measured = engine.risk.volatility(candle.pair, ctx)
    assert measured is not None
    assert "stdev of" in measured[1]


def test_bursts_from_the_wire_judge_their_next_candles_on_scales_computed_ahead(
    sim_env: None,
) -> None:
    """A paced decider (bursts from the wire) computes, once a burst's orders are out, the
    anomaly scales its pairs' next candles are judged against; its run decides and judges
    exactly as an unpaced one's (a replay's), which computes nothing ahead."""

    async def run(paced: bool) -> tuple[dict[str, Any], int, int]:
        daemon = _daemon()
        engine = daemon.engine
        assert engine is not None
        assert daemon.driver is not None
        assert engine.anomaly_watch is not None
        windows = engine.anomaly_watch.monitor._windows
        decider = BurstDecider(engine, daemon.driver.match, paced=paced)
        ready = 0
        with paced_collections(paced):
            for burst in _bursts(daemon)[:80]:
                _close(daemon, burst)
                await decider.on_burst([(c, None) for c in burst])
                ready += sum(
                    1
                    for c in burst
                    if (kept := windows[c.pair].ahead) and kept[0] == windows[c.pair].appended
                )
        await decider.saved()
        return _record(daemon), ready, len(engine.anomaly_watch.latest)

    paced, ready, judged = asyncio.run(run(paced=True))
    unpaced, none, _ = asyncio.run(run(paced=False))
    assert paced == unpaced
    assert ready >= 4 * 55  # every pair's, from the bar its window is long enough
    assert none == 0
    assert judged  # anomalies were found, on scales computed ahead too
    assert sum(len(orders) for orders in paced["orders"].values()) > 10


def test_a_burst_holds_its_log_records_and_audit_events_until_its_orders_are_out(
    sim_env: None,
) -> None:
    """While a burst decides and sends, the log listener and the audit writer are not woken
    (their records are held); after it, nothing is held."""
    from utils import utilities

    daemon = _daemon()
    engine = daemon.engine
    assert engine is not None
    assert daemon.driver is not None
    decider = BurstDecider(engine, daemon.driver.match)
    seen: list[tuple[bool, bool]] = []
    send = engine.send_decided

    async def sending(order: Any) -> bool:
        seen.append((utilities._HELD.records is not None, engine.audit._held is not None))
        return await send(order)

    engine.send_decided = sending  # type: ignore[method-assign,assignment]

    async def run() -> None:
        for burst in _bursts(daemon)[:60]:
            _close(daemon, burst)
            await decider.on_burst([(c, None) for c in burst])
            assert utilities._HELD.records is None
            assert engine.audit._held is None

    asyncio.run(run())
    assert len(seen) > 5
    assert all(logs and audit for logs, audit in seen)


def test_a_pairs_price_and_atr_read_twice_a_candle_follow_every_candle(sim_env: None) -> None:
    """What a burst's decisions ask for twice (the price for the context and the send, the
    ATR for the stop and the context) is kept per candle: each read equals the candle's own
    (the close's Decimal, TA-Lib's ATR over the window), for every pair, candle after candle,
    also when a later candle repeats an earlier close."""
    from decimal import Decimal

    from engine_quiet import last_atr

    daemon = _daemon()
    engine = daemon.engine
    assert engine is not None
    period = engine.risk.settings.atr_period
    engine.data.window = period * 3  # full after 42 candles: its length then stays the same
    bursts = _bursts(daemon)[:60]
    repeat = bursts[-1][0]
    c = repeat.close
    bursts.append([Candle(repeat.pair, "1h", repeat.ts + 3_600_000, c, c, c, c, 1.0)])
    for burst in bursts:
        for candle in burst:
            assert engine.admit(candle)
        for candle in burst:
            bars = engine.data.arrays(candle.pair, "1h")
            tail = slice(-period * 10, None)
            atr = (
                last_atr(bars.high[tail], bars.low[tail], bars.close[tail], period)
                if len(bars.ts) > period
                else None
            )
            for _ in range(2):
                assert engine.price(candle.pair) == Decimal(repr(candle.close))
                assert engine._atr(candle.pair) == atr
    assert engine.price("NOPE/USDT") is None
    assert engine._atr("NOPE/USDT") is None


def test_a_burst_whose_sends_fail_still_places_its_new_positions_stops(sim_env: None) -> None:
    """Entries filled in a burst's matches leave their stops to the end of its sends; when a
    send raises, the burst still places every one of them (counted on the venue's working
    stops) before the error goes on."""

    async def run() -> int:
        daemon = _daemon()
        engine = daemon.engine
        assert engine is not None
        assert daemon.driver is not None
        decider = BurstDecider(engine, daemon.driver.match)
        send, failed = engine.send_decided, 0

        async def failing_send(order: Any) -> bool:
            nonlocal failed
            if engine.executor.pending_stops:  # new positions wait for their stops
                failed += 1
                raise RuntimeError("the send failed")
            return await send(order)

        engine.send_decided = failing_send  # type: ignore[method-assign,assignment]
        for burst in _bursts(daemon):
            _close(daemon, burst)
            with contextlib.suppress(RuntimeError):
                await decider.on_burst([(c, None) for c in burst])
            _assert_protected(daemon)
        return failed

    assert asyncio.run(run()) > 0


@contextlib.contextmanager
def _selects() -> Iterator[list[float | None]]:
    """Record how long each of the running loop's selects could block (None: no limit)."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    select = selector.select
    slept: list[float | None] = []

    def recorded(timeout: float | None = None) -> Any:
        slept.append(timeout)
        return select(timeout)

    selector.select = recorded
    try:
        yield slept
    finally:
        selector.select = select


def test_a_burst_waits_polling_for_the_other_streamed_pairs_of_its_close() -> None:
    """The first candle of a close waits for the other streamed pairs' candles and the burst
    holds them all, decided together; a pair that never delivers is waited for until the
    window ends, no longer, and its late candle starts the next burst; the replay's feed
    (no gather) and a window of 0 take only what is queued; the feed's end ends the wait.
    While it waits, the loop polls its sockets and never sleeps in them (burst_rehearsal)."""

    def candle(pair: str) -> Candle:
        return Candle(pair, "1m", 0, 1, 1, 1, 1, 1)

    async def feed(queue: asyncio.Queue[Any], pairs: list[str | None], gap_s: float) -> None:
        for pair in pairs:
            await asyncio.sleep(gap_s)
            await queue.put(None if pair is None else (candle(pair), time.perf_counter()))

    async def burst(
        pairs: list[str | None], gap_s: float, queued: tuple[str, ...] = (), **kwargs: Any
    ) -> tuple[list[str], bool, float, list[str]]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for pair in ("A", *queued):
            await queue.put((candle(pair), time.perf_counter()))
        producer = asyncio.ensure_future(feed(queue, pairs, gap_s))
        started = time.perf_counter()
        with _selects() as slept:
            got, done = await _next_burst(queue, **kwargs)
        waited = time.perf_counter() - started
        if kwargs.get("gather") and kwargs.get("within_s"):
            assert slept
            assert set(slept) == {0}  # polled, never asleep in the selector
        await producer
        later = []  # what the next burst starts with
        while not queue.empty():
            item = queue.get_nowait()
            later += [] if item is None else [item[0].pair]
        return [c.pair for c, _ in got], done, waited, later

    def run(pairs: list[str | None], gap_s: float, **kwargs: Any) -> Any:
        return asyncio.run(burst(pairs, gap_s, **kwargs))

    streamed = ["A", "B", "C"]
    # All three already queued (one read's): taken at once, nothing waited for.
    got, done, waited, _ = run([], 0, gather=True, expected=streamed, within_s=5, queued=("B", "C"))
    assert (got, done) == (["A", "B", "C"], False)
    assert waited < 2.5
    # Every streamed pair delivers, 2 ms apart: one burst of all three, long before 5 s.
    got, done, waited, _ = run(["B", "C"], 0.002, gather=True, expected=streamed, within_s=5)
    assert (got, done) == (["A", "B", "C"], False)
    assert waited < 2.5
    # D never delivers: the burst waits the window out (from A's hand-over), then goes.
    got, done, waited, _ = run(
        ["B", "C"], 0.002, gather=True, expected=[*streamed, "D"], within_s=0.05
    )
    assert (got, done) == (["A", "B", "C"], False)
    assert waited >= 0.045
    # Past the window: the late candle is the next burst's.
    got, _, _, later = run(["B"], 0.08, gather=True, expected=streamed, within_s=0.03)
    assert (got, later) == (["A"], ["B"])
    # A replay's feed, or no window: only what is queued.
    for kwargs in ({"gather": False, "within_s": 5.0}, {"gather": True, "within_s": 0.0}):
        got, done, _, later = run(["B", "C"], 0.002, expected=streamed, **kwargs)
        assert (got, done, later) == (["A"], False, ["B", "C"])
    # The feed ends while the burst waits: what arrived, and the end.
    got, done, _, _ = run(["B", None], 0.002, gather=True, expected=streamed, within_s=5)
    assert (got, done) == (["A", "B"], True)


# A close as the feed hands it over: the pairs queued at once, then (pair, seconds later).
_Close = tuple[list[str], list[tuple[str, float]]]


def _gather(closes: list[_Close], within_s: float) -> list[tuple[list[str], float, set[str]]]:
    # Each close's candles through `_next_burst` (streamed: A, B, C), one `Gathered` across
    # them all: every burst's pairs, how long it took, and the late pairs after it.

    async def run() -> list[tuple[list[str], float, set[str]]]:
        gathered = Gathered()
        out = []
        for k, (now, later) in enumerate(closes):
            queue: asyncio.Queue[Any] = asyncio.Queue()

            def put(pair: str, ts: int = k * 60_000, q: asyncio.Queue[Any] = queue) -> None:
                q.put_nowait((Candle(pair, "1m", ts, 1, 1, 1, 1, 1), time.perf_counter()))

            for pair in now:
                put(pair)
            loop = asyncio.get_running_loop()
            for pair, delay in later:
                loop.call_later(delay, put, pair)
            taken = 0
            while taken < len(now) + len(later):
                got, _ = await _next_burst(
                    queue, gather=True, expected=["A", "B", "C"], within_s=within_s,
                    gathered=gathered,
                )  # fmt: skip
                waited = time.perf_counter() - got[0][1]  # from its first candle's hand-over
                out.append(([c.pair for c, _ in got], waited, set(gathered.late)))
                taken += len(got)
        return out

    return asyncio.run(run())


def test_a_pair_waited_for_in_vain_is_not_waited_for_again_until_it_delivers() -> None:
    """A stream that is down costs one window, not one every burst: the burst after one
    that waited for C in vain does not wait for it, and once C delivers (the first of its
    close: on time) it is waited for again."""
    (first, w1, late1), (second, w2, late2), (back, _, late3), (again, w4, late4) = _gather(
        [(["A", "B"], []), (["A", "B"], []), (["C", "A", "B"], []), (["A", "B"], [])], 0.3
    )
    assert (first, late1) == (["A", "B"], {"C"})
    assert w1 >= 0.29  # waited the window out for C
    assert (second, late2) == (["A", "B"], {"C"})
    assert w2 < 0.25  # not again: C is late
    assert (back, late3) == (["C", "A", "B"], set())  # C's stream is back
    assert (again, late4) == (["A", "B"], {"C"})
    assert w4 >= 0.29  # C waited for once more


def test_a_late_candle_decides_at_once_and_a_pair_late_every_close_is_not_waited_for() -> None:
    """A candle later than its close's window is decided on its own, waiting for none of
    the pairs its close already delivered (nor marking them late); a pair late at every
    close is not waited for again (no burst waits for it in vain twice), and a candle of
    it within its close's window makes it waited for again. The operator is told once when
    C comes late and once when it is on time again."""
    with capture_logs() as logs:
        bursts = _gather(
            [
                (["A", "B"], [("C", 0.6)]),  # C later than the window
                (["A", "B"], [("C", 0.6)]),  # and again
                (["A", "B"], [("C", 0.1)]),  # within the window (not waited for: late)
                (["A", "B"], [("C", 0.1)]),  # waited for again, and here in time
            ],
            0.3,
        )
    pairs = [b[0] for b in bursts]
    assert pairs == [["A", "B"], ["C"], ["A", "B"], ["C"], ["A", "B"], ["C"], ["A", "B", "C"]]
    waited = [round(b[1], 1) for b in bursts]
    assert bursts[0][1] >= 0.29  # the window, for C
    assert all(w < 0.25 for w in (bursts[1][1], bursts[2][1], bursts[3][1], bursts[4][1]))
    assert bursts[6][1] < 0.25, waited  # C came within the window: the burst ended then
    assert [b[2] for b in bursts] == [{"C"}, {"C"}, {"C"}, {"C"}, {"C"}, set(), set()]
    told = [(e["event"], e.get("pairs", e.get("pair"))) for e in logs if "burst_pair" in e["event"]]
    assert told == [("burst_pairs_late", ["C"]), ("burst_pair_on_time", "C")]
