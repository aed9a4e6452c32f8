"""A burst's candles judged together: the same anomalies, scores and state as one by one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_detection import AnomalyMonitor
from config import AnomalySettings
from models import Anomaly, AnomalyKind, Candle


MINUTE = 60_000
SETTINGS = AnomalySettings(window=20)


def _walks(seed: int, pairs: int, bars: int, faults: float) -> list[list[Candle]]:
    """Random walks per pair with injected spikes, spike-and-reverts, flat stretches, zero and
    burst volumes; bursts of every pair's candle at one time (some pairs start late)."""
    rng = np.random.default_rng(seed)
    out: list[list[Candle]] = [[] for _ in range(bars)]
    for p in range(pairs):
        start = int(rng.integers(0, bars // 3))
        close = 100.0 * (1 + p)
        flat = 0
        for t in range(start, bars):
            ret = rng.normal(0, 0.002)
            roll = rng.random()
            if roll < faults:
                ret *= 12  # a spike
            elif roll < 2 * faults:
                flat = int(rng.integers(2, 8))  # a frozen stretch
            volume = float(rng.lognormal(3, 0.4))
            if rng.random() < faults:
                volume = 0.0 if rng.random() < 0.5 else volume * 40
            if flat:
                flat -= 1
                o = h = lo = c = close
            else:
                o, c = close, close * float(np.exp(ret))
                h = max(o, c) * (1 + abs(float(rng.normal(0, 0.0005))))
                lo = min(o, c) * (1 - abs(float(rng.normal(0, 0.0005))))
                close = c
            out[t].append(Candle(f"P{p}/USDT", "1m", t * MINUTE, o, h, lo, c, volume))
    return out


def _assert_same_windows(alone: AnomalyMonitor, other: AnomalyMonitor) -> None:
    for pair, window in alone._windows.items():
        mine = other._windows[pair]
        assert (mine.flat_run, mine.zero_run, mine.last_ts) == (
            window.flat_run,
            window.zero_run,
            window.last_ts,
        )
        assert mine.sigma == window.sigma or (np.isnan(mine.sigma) and np.isnan(window.sigma))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    pairs=st.integers(1, 6),
    faults=st.sampled_from([0.0, 0.02, 0.1]),
    ahead=st.lists(st.integers(0, 7), min_size=90, max_size=90),
)
def test_a_burst_judged_together_finds_what_one_by_one_finds(
    seed: int, pairs: int, faults: float, ahead: list[int]
) -> None:
    """Each burst through `on_candles` gives every candle the anomalies (kinds, scores to the
    last bit, details) and leaves every pair's state as `on_candle` one at a time does; a
    repeated candle in a later burst is not judged again. So do bursts whose scales were
    computed ahead (`prepare_next`) for all, some or none of their pairs (`ahead`: 0 none,
    1 some, otherwise all), or for a pair whose window took a bar alone since."""
    bursts = _walks(seed, pairs, 90, faults)
    together, alone = AnomalyMonitor(SETTINGS, "1m"), AnomalyMonitor(SETTINGS, "1m")
    early = AnomalyMonitor(SETTINGS, "1m")
    kinds: set[AnomalyKind] = set()
    names = [f"P{p}/USDT" for p in range(pairs)]
    for i, burst in enumerate(bursts):
        if i % 7 == 3 and i > 0:
            burst = burst + bursts[i - 1][:1]  # a stale repeat mixed in
        found = together.on_candles(burst)
        early_found: dict[tuple[str, int], list[Anomaly]] = {}
        first = i % 5 == 4 and bool(burst)  # one candle judged alone first: its scales stale
        if first:
            early_found[burst[0].pair, burst[0].ts] = early.on_candle(burst[0])
        early_found.update(early.on_candles(burst[1:] if first else burst))
        for candle in burst:
            expected = alone.on_candle(candle)
            for got in (found, early_found):
                assert got[candle.pair, candle.ts] == expected or (
                    candle.ts < i * MINUTE and got[candle.pair, candle.ts] == []
                )
            kinds.update(a.kind for a in expected)
        if ahead[i]:
            early.prepare_next(names if ahead[i] > 1 else [*names[::2], "NONE/USDT"])
        _assert_same_windows(alone, together)
        _assert_same_windows(alone, early)
    if faults >= 0.1 and pairs >= 3:
        assert kinds  # the faults were found (the comparison is not between empty lists)


def test_scales_computed_ahead_spare_the_next_burst_its_sorts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After `prepare_next` the next burst's pass computes no robust scale (no sort); a burst
    whose pairs were not prepared still computes them."""
    import anomaly_detection

    calls: list[int] = []
    scale_rows = anomaly_detection._scale_rows

    def counting(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(x))
        return scale_rows(x)

    monkeypatch.setattr(anomaly_detection, "_scale_rows", counting)
    bursts = _walks(5, 4, 60, 0.0)
    monitor = AnomalyMonitor(SETTINGS, "1m")
    pairs = [f"P{p}/USDT" for p in range(4)]
    for burst in bursts[:-2]:
        monitor.on_candles(burst)
    monitor.prepare_next(pairs)
    calls.clear()
    monitor.on_candles(bursts[-2])
    assert len(bursts[-2]) == 4
    assert calls == []
    monitor.on_candles(bursts[-1])
    assert calls  # not prepared: computed in the pass
