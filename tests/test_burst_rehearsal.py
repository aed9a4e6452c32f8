"""A burst's passes rehearsed before each close (burst_rehearsal): they change nothing a burst
decides, they run the passes' own code, and they run only just before an expected close,
never while a candle is queued or a burst gathers or decides."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anomaly_detection
import batch_signals
import burst_rehearsal
from burst import BurstDecider, paced_collections
from burst_rehearsal import GAP_S, MAX_SLACK_S, TAIL_S, Cadence, KeepWarm
from models import Candle
from pipeline import Engine
from runner import Gathered, _decide_bursts
from tests.test_burst import _bursts, _close, _daemon, _record, sim_env  # noqa: F401


@settings(max_examples=200, deadline=None)
@given(
    start=st.floats(0, 1e6),
    interval=st.floats(0.05, 120),
    noise=st.lists(st.floats(-0.02, 0.02), min_size=4, max_size=12),
)
def test_steady_closes_predict_the_next_within_their_jitter(
    start: float, interval: float, noise: list[float]
) -> None:
    """Closes a steady interval apart (each first candle off by up to 2% of it) predict the
    next one within four times that, from the third close on, and the error kept is how far
    off the last predictions were."""
    cadence = Cadence()
    firsts = [start + (i + e) * interval for i, e in enumerate(noise)]
    errors = []
    for close, first in enumerate(firsts):
        predicted = cadence.next()
        if close < 3:
            assert predicted is None
        else:
            assert predicted is not None
            assert abs(predicted - first) <= 0.08 * interval + 1e-6
            errors.append(abs(predicted - first))
        cadence.note(close, first)
    assert cadence.error == max(errors[-4:])


def test_a_missed_close_or_a_late_pair_does_not_make_a_prediction() -> None:
    """A close that never came (twice the interval) stops the predictions until two intervals
    agree again; a late pair's burst of a close already noted changes nothing."""
    cadence = Cadence()
    for close, first in enumerate((10.0, 11.0, 12.0)):
        cadence.note(close, first)
    assert cadence.next() == 13.0
    cadence.note(2, 12.4)  # a late pair of close 2
    assert cadence.next() == 13.0
    cadence.note(4, 14.0)  # close 3 missed
    assert cadence.next() is None
    cadence.note(5, 15.0)
    assert cadence.next() is None  # intervals 2 and 1
    cadence.note(6, 16.0)
    assert cadence.next() == 17.0
    assert Cadence().error == 0.0


def _kept(engine: Engine) -> dict[str, Any]:
    # Everything a burst's passes read and keep: the strategy's states and rows, the anomaly
    # windows, the ATRs and the rows prepared ahead.
    strategy = engine.signals_source.strategy  # type: ignore[attr-defined]
    assert engine.anomaly_watch is not None
    windows = engine.anomaly_watch.monitor._windows
    return {
        "streams": {
            p: (s.last_ts, s.state.tobytes(), repr(s.row)) for p, s in strategy._streams.items()
        },
        "windows": {
            p: repr((w.buf.tobytes(), w.n, w.appended, w.last_ts, w.flat_run, w.zero_run))
            + repr((w.sigma, w.ahead))
            for p, w in windows.items()
        },
        "atr": dict(engine._atr_cache),
        "ready": repr(engine.signals_source._ready),  # type: ignore[attr-defined]
    }


@pytest.mark.usefixtures("sim_env")
def test_rehearsals_between_bursts_change_nothing_a_burst_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rehearsing every pass twice between paced bursts leaves what the passes read and keep
    as it was, and the run decides, orders and judges exactly as one without rehearsals; the
    rehearsals ran the kernel over every pair and the anomaly pass and the ATRs."""
    ran: dict[str, int] = {"kernel pairs": 0, "anomaly pairs": 0, "atr pairs": 0}

    def counted(name: str, function: Callable[..., Any], count: Callable[..., int]) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            ran[name] += count(*args, **kwargs)
            return function(*args, **kwargs)

        return call

    async def run(rehearse: bool) -> dict[str, Any]:
        daemon = _daemon()
        engine = daemon.engine
        assert engine is not None
        assert daemon.driver is not None
        decider = BurstDecider(engine, daemon.driver.match, paced=True)
        warm = KeepWarm(engine, lead_s=0.003)
        with paced_collections(True):
            for k, burst in enumerate(_bursts(daemon)[:80]):
                _close(daemon, burst)
                await decider.on_burst([(c, None) for c in burst])
                warm.noted(burst[0].ts, float(k), decider.last_order)
                if rehearse:
                    before = _kept(engine)
                    passes = warm.passes()
                    assert len(passes) == 3
                    for rehearsal in passes * 2:
                        rehearsal()
                    assert _kept(engine) == before
        await decider.saved()
        return _record(daemon)

    strategy_kernel = batch_signals._BATCHED
    for kernel, driver in list(strategy_kernel.items()):
        monkeypatch.setitem(
            strategy_kernel, kernel, counted("kernel pairs", driver, lambda *a: a[0].shape[0])
        )
    monitor = anomaly_detection.AnomalyMonitor
    monkeypatch.setattr(
        monitor,
        "_scores",
        counted(
            "anomaly pairs", monitor._scores, lambda self, windows, lag=1: len(windows) * (1 - lag)
        ),
    )
    monkeypatch.setattr(
        Engine,
        "rehearse_atr",
        counted("atr pairs", Engine.rehearse_atr, lambda self, pairs: len(pairs)),
    )
    rehearsed = asyncio.run(run(rehearse=True))
    burst_kernel_pairs = ran["kernel pairs"]
    plain = asyncio.run(run(rehearse=False))
    assert rehearsed == plain
    assert sum(len(orders) for orders in plain["orders"].values()) > 10
    # Each rehearsal's kernel call took every pair (four) from the first bursts on, twice a
    # burst, besides the bursts' own passes (counted in both runs).
    rehearsal_kernel_pairs = burst_kernel_pairs - (ran["kernel pairs"] - burst_kernel_pairs)
    assert rehearsal_kernel_pairs >= 2 * 4 * 70
    assert ran["anomaly pairs"] == 2 * 4 * 80
    assert ran["atr pairs"] == 2 * 4 * 80


class _Recorded(KeepWarm):
    """KeepWarm whose passes note when they ran (the scheduling under test, not the passes)."""

    def __init__(self, lead_s: float, fail: bool = False) -> None:
        super().__init__(None, lead_s=lead_s)  # type: ignore[arg-type]
        self.at: list[tuple[float, float]] = []  # when, and the slack the window had then
        self.fail = fail

    def passes(self) -> list[Callable[[], None]]:
        def rehearsal() -> None:
            self.at.append((time.perf_counter(), min(self.cadence.error, MAX_SLACK_S)))
            if self.fail:
                raise RuntimeError("boom")

        return [rehearsal, rehearsal]


async def _closes(
    warm: KeepWarm, interval_s: float, count: int, busy: list[bool], *, steady: bool = True
) -> list[tuple[float, float]]:
    # `count` closes `interval_s` apart (unless `steady`: intervals alternately half as long
    # again): each one's burst keeps the loop busy for 2 ms, then is noted. Returns each
    # close's (busy from, busy until).
    spans = []
    due = time.perf_counter()
    for close in range(count):
        due += 0 if close == 0 else interval_s * (1 if steady else 1 + 0.5 * (close % 2))
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        first = time.perf_counter()
        busy[0] = True
        while time.perf_counter() < first + 0.002:  # noqa: ASYNC110 (a burst: gathers, decides)
            await asyncio.sleep(0)
        busy[0] = False
        spans.append((first, time.perf_counter()))
        warm.noted(close, first, ["A"])
    return spans


def test_rehearsals_run_just_before_each_expected_close_and_never_during_a_burst() -> None:
    """From the third close on, the rehearsals start `lead` before the next close is expected
    and go on until its burst: none earlier, none while a burst is under way, none after
    the window; a wobbling cadence gets none at all."""
    interval, lead = 0.06, 0.01

    async def run(steady: bool) -> tuple[_Recorded, list[tuple[float, float]]]:
        warm, busy = _Recorded(lead), [False]
        async with warm.running(lambda: not busy[0]):
            spans = await _closes(warm, interval, 12, busy, steady=steady)
        return warm, spans

    def rehearsed(warm: _Recorded, spans: list[tuple[float, float]]) -> set[int]:
        # Whatever the host's load: never mid-burst, never outside the window. Returns the
        # closes rehearsed for.
        firsts = [first for first, _ in spans]
        closes: set[int] = set()
        for at, slack in warm.at:
            assert not any(first <= at <= until for first, until in spans)  # never mid-burst
            # Ahead of the close it rehearses for, within its window: from `lead` and the
            # slack (the last predictions' error) before the expected moment (the host's
            # timer: 2 ms).
            close = next(k for k, first in enumerate(firsts) if first > at)
            assert close >= 3
            expected = firsts[close - 1] + (firsts[close - 1] - firsts[close - 2])
            assert expected - lead - slack - 0.002 <= at <= expected + TAIL_S + slack + GAP_S
            closes.add(close)
        return closes

    # That they run at all depends on the host keeping the cadence: a loaded one (CI beside
    # two busy processes on two cores) judged it wobbling in about one run of ten, and a
    # wobbling cadence rightly gets none. Up to three runs for the count, each checked.
    counts = []
    for _ in range(3):
        counts.append(len(rehearsed(*asyncio.run(run(steady=True)))))
        if counts[-1] >= 4:
            break
    assert counts[-1] >= 4, counts  # at least four of closes 3-11
    wobbling, _ = asyncio.run(run(steady=False))
    assert wobbling.at == []


@pytest.mark.parametrize("polled", [True, False])
def test_between_rehearsals_the_loop_is_polled_not_slept(
    polled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the window the selector is asked with a zero timeout only (the core stays
    running for the close's first frame) until the next rehearsal is due, or the burst
    comes; `POLLED` off, or in the window's margins, it sleeps the gap in the selector."""
    monkeypatch.setattr(burst_rehearsal, "POLLED", polled)

    async def pause(
        gap: float, burst_after: float | None, *, inside: bool = True
    ) -> tuple[list[float | None], float]:
        loop = asyncio.get_running_loop()
        selector = loop._selector  # type: ignore[attr-defined]
        select, asked = selector.select, list[float | None]()

        def spy(timeout: float | None = None) -> Any:
            asked.append(timeout)
            return select(timeout)

        warm = KeepWarm(cast(Engine, object()), lead_s=0.01)  # pausing reads no engine
        if burst_after is not None:
            loop.call_later(burst_after, warm.noted, 1, time.perf_counter(), ["BTC/USDT"])
        monkeypatch.setattr(selector, "select", spy)
        started = time.perf_counter()
        await warm._pause(gap, polled=inside)
        return asked, time.perf_counter() - started

    asked, took = asyncio.run(pause(0.02, None))
    assert took >= 0.02
    if polled:
        assert len(asked) > 20
        assert set(asked) == {0}
    else:
        assert any(t is not None and t > 0.01 for t in asked)
    # Outside the window's core (the margins a wobbling cadence adds), it sleeps either way.
    asked, took = asyncio.run(pause(0.02, None, inside=False))
    assert any(t is not None and t > 0.01 for t in asked)
    if polled:  # the burst noted ends the polling at once
        asked, took = asyncio.run(pause(1.0, 0.01))
        assert took < 0.5
        assert set(asked) == {0}


def test_a_rehearsal_that_raises_stops_the_rehearsals_and_the_bursts_go_on() -> None:
    """A pass that raises is logged and no pass runs again; the closes go on."""

    async def run() -> tuple[_Recorded, list[tuple[float, float]]]:
        warm, busy = _Recorded(0.01, fail=True), [False]
        async with warm.running(lambda: not busy[0]):
            spans = await _closes(warm, 0.04, 7, busy)
        return warm, spans

    warm, spans = asyncio.run(run())
    assert len(warm.at) == 1
    assert len(spans) == 7


@pytest.mark.usefixtures("sim_env")
def test_the_pipeline_loop_rehearses_between_paced_bursts_and_decides_as_without() -> None:
    """The daemon's burst loop (`_decide_bursts`) fed closes from the wire at a steady pace
    rehearses before the closes it can predict, and decides exactly as with rehearsals off;
    a replay's loop (unpaced) rehearses nothing."""

    async def run(lead_s: float, paced: bool = True) -> tuple[dict[str, Any], int]:
        daemon = _daemon()
        engine = daemon.engine
        assert engine is not None
        assert daemon.driver is not None
        decider = BurstDecider(engine, daemon.driver.match, paced=paced)
        warm = KeepWarm(engine, lead_s=lead_s)
        queue: asyncio.Queue[tuple[Candle, float] | None] = asyncio.Queue()

        async def feed() -> None:
            started = time.perf_counter()
            for k, burst in enumerate(_bursts(daemon)[:30]):
                await asyncio.sleep(max(0.0, started + k * 0.03 - time.perf_counter()))
                while decider.deciding or not queue.empty():  # noqa: ASYNC110 (the last one decided)
                    await asyncio.sleep(0.001)
                _close(daemon, burst)
                for candle in burst:
                    queue.put_nowait((candle, time.perf_counter()))
            await queue.put(None)

        feeding = asyncio.ensure_future(feed())
        await _decide_bursts(
            queue,
            decider,
            Gathered(),
            warm,
            expected=[c.pair for c in _bursts(daemon)[0]],
            within_s=0.005,
        )
        await feeding
        await decider.saved()
        assert decider.bursts == 30
        return _record(daemon), warm.rehearsals

    rehearsed, rehearsals = asyncio.run(run(0.005))
    plain, none = asyncio.run(run(0.0))
    unpaced, not_paced = asyncio.run(run(0.005, paced=False))
    assert rehearsed == plain == unpaced
    assert rehearsals >= 3 * 10  # three passes a round, before most of the 27 predictable closes
    assert none == 0
    assert not_paced == 0
