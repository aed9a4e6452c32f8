"""A burst's candles judged together: the same anomalies, scores and state as one by one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_detection import AnomalyMonitor
from config import AnomalySettings
from models import AnomalyKind, Candle


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


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    pairs=st.integers(1, 6),
    faults=st.sampled_from([0.0, 0.02, 0.1]),
)
def test_a_burst_judged_together_finds_what_one_by_one_finds(
    seed: int, pairs: int, faults: float
) -> None:
    """Each burst through `on_candles` gives every candle the anomalies (kinds, scores to the
    last bit, details) and leaves every pair's state as `on_candle` one at a time does; a
    repeated candle in a later burst is not judged again."""
    bursts = _walks(seed, pairs, 90, faults)
    together, alone = AnomalyMonitor(SETTINGS, "1m"), AnomalyMonitor(SETTINGS, "1m")
    kinds: set[AnomalyKind] = set()
    for i, burst in enumerate(bursts):
        if i % 7 == 3 and i > 0:
            burst = burst + bursts[i - 1][:1]  # a stale repeat mixed in
        found = together.on_candles(burst)
        for candle in burst:
            expected = alone.on_candle(candle)
            assert found[candle.pair, candle.ts] == expected or (
                candle.ts < i * MINUTE and found[candle.pair, candle.ts] == []
            )
            kinds.update(a.kind for a in expected)
        for pair, window in alone._windows.items():
            mine = together._windows[pair]
            assert (mine.flat_run, mine.zero_run, mine.last_ts) == (
                window.flat_run,
                window.zero_run,
                window.last_ts,
            )
            assert mine.sigma == window.sigma or (np.isnan(mine.sigma) and np.isnan(window.sigma))
    if faults >= 0.1 and pairs >= 3:
        assert kinds  # the faults were found (the comparison is not between empty lists)
