"""Anomaly rules on real candles with injected faults; the live path equals the scan.

The candles are real Binance 1h series from `../shared/data`. Faults are injected at seeded
random bars: a one-bar spike of exactly 6 sigma (the robust sigma of the 100 returns before
it, the detector's own scale, so not the larger standard deviation) on the close, a frozen
feed (the last candle repeated, or a flat price without volume, for five bars) and a
ten-fold volume burst.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomaly_detection import AnomalyMonitor, robust_scale, run_lengths, scan, scan_summary
from config import AnomalySettings
from models import AnomalyKind, Candle, OrderBook
from tests.conftest import ROOT


DATA = ROOT.parent / "shared" / "data"
HOUR = 3_600_000
SETTINGS = AnomalySettings()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")


def real(name: str, rows: int | None = None) -> pd.DataFrame:
    """Return a real 1h candle file as a UTC-indexed frame."""
    df = pd.read_csv(DATA / f"binance_{name}_1h.csv.gz", nrows=rows)
    df.index = pd.to_datetime(df.pop("timestamp"), unit="ms", utc=True)
    return df


def ms(frame: pd.DataFrame) -> np.ndarray:
    """Return the frame's open times in ms."""
    return np.asarray(frame.index.as_unit("ms").asi8)


def spread_out(n: int, count: int, seed: int, gap: int = 8) -> np.ndarray:
    """Return `count` seeded bar positions after the warm-up, at least `gap` apart."""
    rng = np.random.default_rng(seed)
    slots = rng.choice(np.arange(SETTINGS.window + 5, n - gap) // gap, count, replace=False)
    return np.sort(slots) * gap


def inject_spikes(frame: pd.DataFrame, at: np.ndarray, sigmas: float, seed: int) -> pd.DataFrame:
    """Move each chosen close by `sigmas` robust sigmas, up or down; the next bar is untouched."""
    out = frame.copy()
    close, high, low = (out[k].to_numpy(copy=True) for k in ("close", "high", "low"))
    r = np.r_[np.nan, np.diff(np.log(close))]
    _, sigma = robust_scale(r, SETTINGS.window)
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], len(at))
    close[at] *= np.exp(sign * sigmas * sigma[at])
    high[at] = np.maximum(high[at], close[at])
    low[at] = np.minimum(low[at], close[at])
    out["close"], out["high"], out["low"] = close, high, low
    return out


def inject_frozen(frame: pd.DataFrame, at: np.ndarray, bars: int = 5) -> pd.DataFrame:
    """Freeze the feed for `bars` bars at each position: half repeat the last candle, half flat."""
    out = frame.copy()
    cols = ["open", "high", "low", "close", "volume"]
    values = out[cols].to_numpy(copy=True)
    for k, start in enumerate(at):
        last = values[start - 1].copy()
        frozen = last if k % 2 == 0 else np.array([last[3]] * 4 + [0.0])
        values[start : start + bars] = frozen
    out[cols] = values
    return out


@pytest.mark.parametrize("name", ["BTC-USDT", "ETH-USDT", "XRP-USDT", "SOL-USDT", "DOGE-USDT"])
def test_clean_real_candles_raise_at_most_one_alarm_per_thousand_bars(name: str) -> None:
    """On untouched real 1h candles, fewer than 1 bar in 1,000 is flagged."""
    frame = real(name)
    flagged = {a.ts for a in scan(frame, "X/USDT", SETTINGS)}
    assert len(frame) > 20_000
    assert len(flagged) / len(frame) <= 1 / 1000


@pytest.mark.parametrize(("name", "seed"), [("BTC-USDT", 1), ("XRP-USDT", 2), ("DOT-USDT", 3)])
def test_six_sigma_single_bar_spikes_are_caught(name: str, seed: int) -> None:
    """At least 90% of injected 6-sigma one-bar spikes are flagged on the bar or the next one.

    Bars away from the injections count as clean: at most 1 alarm per 1,000 of them.
    """
    frame = real(name)
    at = spread_out(len(frame), 300, seed)
    dirty = inject_spikes(frame, at, 6.0, seed)
    ts = ms(dirty)
    found = scan(dirty, "X/USDT", SETTINGS)
    hit = {a.ts for a in found if a.kind in (AnomalyKind.SPIKE, AnomalyKind.SPIKE_REVERT)}
    recall = np.mean([ts[i] in hit or ts[i + 1] in hit for i in at])
    near = {int(ts[i + d]) for i in at for d in (0, 1)}
    false = {a.ts for a in found} - near
    print(f"{name}: spike recall {recall:.3f}, false alarms {len(false)} in {len(ts)} bars")
    assert recall >= 0.9
    assert len(false) / (len(ts) - len(near)) <= 1 / 1000


@pytest.mark.parametrize(("name", "seed"), [("BTC-USDT", 4), ("ETH-USDT", 5)])
def test_every_frozen_feed_is_caught_within_its_stretch(name: str, seed: int) -> None:
    """Every injected five-bar freeze raises frozen_feed before it ends (recall 1.0)."""
    frame = real(name)
    at = spread_out(len(frame), 200, seed, gap=12)
    dirty = inject_frozen(frame, at)
    ts = ms(dirty)
    frozen = {a.ts for a in scan(dirty, "X/USDT", SETTINGS) if a.kind is AnomalyKind.FROZEN_FEED}
    caught = [any(int(ts[i + d]) in frozen for d in range(5)) for i in at]
    assert all(caught)


def test_volume_burst_recall_is_reported() -> None:
    """Ten-fold volume bursts: the recall is printed whatever it is; clean volume stays quiet."""
    frame = real("BTC-USDT")
    at = spread_out(len(frame), 300, 6)
    dirty = frame.copy()
    volume = dirty["volume"].to_numpy(copy=True)
    volume[at] *= 10
    dirty["volume"] = volume
    ts = ms(dirty)
    bursts = {a.ts for a in scan(dirty, "X/USDT", SETTINGS) if a.kind is AnomalyKind.VOLUME_BURST}
    recall = np.mean([int(ts[i]) in bursts for i in at])
    clean = {a.ts for a in scan(frame, "X/USDT", SETTINGS) if a.kind is AnomalyKind.VOLUME_BURST}
    print(f"volume burst x10 recall {recall:.3f} (clean bursts {len(clean)} in {len(ts)} bars)")
    assert 0.0 <= recall <= 1.0
    assert len(clean) / len(ts) <= 1 / 1000


def candles(frame: pd.DataFrame, pair: str) -> list[Candle]:
    """Return the frame as closed candles."""
    ts = ms(frame)
    rows = frame[["open", "high", "low", "close", "volume"]].to_numpy().tolist()
    return [
        Candle(pair, "1h", int(t), float(o), float(h), float(lo), float(c), float(v))
        for t, (o, h, lo, c, v) in zip(ts, rows, strict=True)
    ]


def test_incremental_monitor_finds_exactly_what_the_scan_finds() -> None:
    """Candle by candle, the live monitor reports the scan's anomalies, kinds and scores."""
    frame = real("XRP-USDT", rows=2_500)
    dirty = inject_frozen(inject_spikes(frame, spread_out(2_500, 25, 7), 8.0, 7), np.array([1_601]))
    volume = dirty["volume"].to_numpy(copy=True)
    volume[[900, 1_900]] *= 40
    volume[2_200] = 0.0
    dirty["volume"] = volume
    expected = scan(dirty, "XRP/USDT", SETTINGS)
    monitor = AnomalyMonitor(SETTINGS, "1h")
    live = [a for c in candles(dirty, "XRP/USDT") for a in monitor.on_candle(c)]
    assert {a.kind for a in expected} >= {
        AnomalyKind.SPIKE_REVERT,
        AnomalyKind.FROZEN_FEED,
        AnomalyKind.ZERO_VOLUME,
        AnomalyKind.VOLUME_BURST,
    }
    assert [(a.ts, a.kind) for a in live] == [(a.ts, a.kind) for a in expected]
    np.testing.assert_allclose([a.score for a in live], [a.score for a in expected], rtol=1e-12)


def test_monitor_ignores_a_repeated_or_older_candle() -> None:
    """A candle at or before the last one seen is not judged twice."""
    monitor = AnomalyMonitor(SETTINGS, "1h")
    first = Candle("A/B", "1h", HOUR, 1.0, 1.0, 1.0, 1.0, 0.0)
    assert [a.kind for a in monitor.on_candle(first)] == [AnomalyKind.ZERO_VOLUME]
    assert monitor.on_candle(first) == []


@given(st.lists(st.booleans(), max_size=60))
def test_run_lengths_count_consecutive_flags(flags: list[bool]) -> None:
    """run_lengths equals a plain running count that resets on every False."""
    count, expected = 0, []
    for flag in flags:
        count = count + 1 if flag else 0
        expected.append(count)
    assert run_lengths(np.array(flags, dtype=bool)).tolist() == expected


def book(pair: str, ts: int, bid: float, ask: float) -> OrderBook:
    """Return a one-level book."""
    return OrderBook(pair, ts, ((bid, 1.0),), ((ask, 1.0),))


def test_spread_blowout_against_the_running_average_and_the_cap() -> None:
    """A spread ten times its running average, or over the cap, is a blow-out; normal is not."""
    monitor = AnomalyMonitor(SETTINGS, "1m")
    for k in range(30):
        assert monitor.on_book(book("A/B", k, 100.0, 100.02)) is None  # 2 bps
    wide = monitor.on_book(book("A/B", 31, 100.0, 100.3))  # 30 bps = 15x the average
    assert wide is not None
    assert wide.kind is AnomalyKind.SPREAD_BLOWOUT
    assert wide.score == pytest.approx(29.955, rel=1e-3)
    fresh = AnomalyMonitor(SETTINGS, "1m")
    assert fresh.on_book(book("C/D", 1, 100.0, 100.5)) is None  # 50 bps, no history yet
    capped = fresh.on_book(book("C/D", 2, 100.0, 101.5))  # 149 bps > 100 bps cap
    assert capped is not None
    assert capped.kind is AnomalyKind.SPREAD_BLOWOUT


def test_stale_feed_is_reported_once_per_silence() -> None:
    """A pair whose last candle is over three bars old is stale once, until a candle comes."""
    monitor = AnomalyMonitor(SETTINGS, "1h")
    monitor.on_candle(Candle("A/B", "1h", 0, 1.0, 1.1, 0.9, 1.0, 5.0))
    assert monitor.check_stale(4 * HOUR) == []  # closed at 1h: three bars old, not over
    stale = monitor.check_stale(4 * HOUR + 1)
    assert [(a.pair, a.kind) for a in stale] == [("A/B", AnomalyKind.STALE_FEED)]
    assert monitor.check_stale(6 * HOUR) == []
    monitor.on_candle(Candle("A/B", "1h", 6 * HOUR, 1.0, 1.1, 0.9, 1.0, 5.0))
    assert monitor.check_stale(11 * HOUR) != []


def test_summary_counts_bars_and_rate() -> None:
    """The summary's rate is flagged bars over bars, and each item names ts, pair, kind, score."""
    frame = inject_frozen(real("BTC-USDT", rows=600), np.array([300]))
    summary = scan_summary({"BTC/USDT": frame}, SETTINGS)
    flagged = {a["ts"] for a in summary["anomalies"]}
    assert summary["bars"] == 600
    assert summary["rate"] == pytest.approx(len(flagged) / 600)
    assert all({"ts", "pair", "kind", "score"} <= set(a) for a in summary["anomalies"])
    assert "frozen_feed" in {a["kind"] for a in summary["anomalies"]}


def test_cli_scans_a_candle_file_and_writes_the_summary(tmp_path: Path) -> None:
    """`--mode anomalies` reads a .csv.gz, finds the injected freeze and writes the JSON."""
    frame = inject_frozen(real("ETH-USDT", rows=800), np.array([500]))
    path = tmp_path / "eth.csv.gz"
    with gzip.open(path, "wt") as f:
        frame.assign(timestamp=ms(frame)).to_csv(
            f, index=False, columns=["timestamp", "open", "high", "low", "close", "volume"]
        )
    out = tmp_path / "out.json"
    args = ["--mode", "anomalies", "--data", str(path), "--pairs", "ETH/USDT", "--timeframe", "1h"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args, "--summary-json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "KESTREL_STORAGE__DATA_DIR": str(tmp_path / "data")},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["bars"] == 800
    frozen = [a for a in summary["anomalies"] if a["kind"] == "frozen_feed"]
    assert frozen
    assert frozen[0]["pair"] == "ETH/USDT"
    assert frozen[0]["ts"] == int(ms(frame)[502])
    assert 0 < summary["rate"] < 0.05


def test_a_primed_monitor_judges_the_first_live_candle_like_the_scan() -> None:
    """Primed with the warm-up history, the first live candle gets the scan's verdict."""
    frame = inject_spikes(real("BTC-USDT", rows=400), np.array([398]), 8.0, 1)
    history = candles(frame, "BTC/USDT")
    monitor = AnomalyMonitor(SETTINGS, "1h")
    monitor.prime(history[-(SETTINGS.window + 3) : -2])
    live = [a for c in history[-2:] for a in monitor.on_candle(c)]
    expected = [a for a in scan(frame, "BTC/USDT", SETTINGS) if a.ts >= history[-2].ts]
    assert [(a.ts, a.kind) for a in live] == [(a.ts, a.kind) for a in expected]
    assert any(a.kind is AnomalyKind.SPIKE_REVERT for a in live)


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=120)
)
def test_the_live_median_is_numpys_median(values: list[float]) -> None:
    """The monitor's cheap median returns exactly np.median's value."""
    from anomaly_detection import _median

    x = np.array(values)
    assert _median(x) == float(np.median(x))
