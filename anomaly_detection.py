"""Market-data anomalies: plain rules first, an isolation forest beside them.

Each rule reads only the candles up to the bar it judges, so `scan` (vectorised over a
whole candle frame: the CLI, backtests, research) and `AnomalyMonitor.on_candle`
(incremental, one closed candle at a time: sim and live) find the same anomalies with the
same scores; a test holds them equal on real candles. Returns are log returns; their scale
is robust: the median and the MAD (x 1.4826, a normal sigma) of the `window` returns
*before* the bar, so one bad print neither hides itself nor the next one.

=================  ========================================================================
kind               fires when
=================  ========================================================================
spike              the bar's return is `spike_z` robust sigmas from the median (at once)
spike_revert       the previous close sat `revert_z` sigmas away from the close before it
                   and from the open after it, on the same side: a one-bar print that the
                   next bar did not open from
frozen_feed        `frozen_bars` bars in a row that are flat at an unchanged price or
                   repeat the previous bar's OHLCV exactly
zero_volume        `zero_volume_bars` bars in a row without volume
volume_burst       log volume `volume_burst_z` robust sigmas above its median
stale_feed         (live) the last closed candle is `stale_bars` bars older than the clock
spread_blowout     (live) the book's spread is above `spread_max_bps`, or `spread_ratio`
                   times its running average
=================  ========================================================================

`isolation_scores` adds scikit-learn's IsolationForest over the same robust features as an
auxiliary score (higher = stranger); it never pauses anything by itself. `AnomalyWatch`,
the engine's hook, turns every anomaly into a per-pair pause of entries in risk
(`risk_management.PairPauses`), an audit record, an `AnomalyDetected` event (once per pause)
and a line in the status snapshot.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog
from numpy.lib.stride_tricks import sliding_window_view

from config import AnomalySettings
from models import Anomaly, AnomalyDetected, AnomalyKind, Candle, EventSink, OrderBook
from utils.utilities import AuditTrail, timeframe_to_ms


log = structlog.get_logger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

MAD_TO_SIGMA: Final = 1.4826  # MAD x this = sigma for normal data
SIGMA_FLOOR: Final = 1e-6  # log units: a market that never moves has no finite z-score
VOLUME_FLOOR: Final = 1e-12
SPREAD_WARMUP: Final = 20  # books before the running spread average is trusted
SPREAD_ALPHA: Final = 0.05
_COLUMNS: Final = ("open", "high", "low", "close", "volume")
# The order anomalies of one bar are reported in (the CLI, the tests, the alerts).
BAR_KINDS: Final = (
    AnomalyKind.SPIKE,
    AnomalyKind.SPIKE_REVERT,
    AnomalyKind.FROZEN_FEED,
    AnomalyKind.ZERO_VOLUME,
    AnomalyKind.VOLUME_BURST,
)


# -- The rules, vectorised -------------------------------------------------------------------


def robust_scale(x: FloatArray, window: int) -> tuple[FloatArray, FloatArray]:
    """Return the median and robust sigma of the `window` values before each position.

    Position i is scaled by x[i - window : i]; the first `window` positions (and any
    window holding a NaN) get NaN.
    """
    n = len(x)
    med = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    if n > window:
        windows = sliding_window_view(x[:-1], window)
        m = np.median(windows, axis=1)
        mad = np.median(np.abs(windows - m[:, None]), axis=1)
        med[window:] = m
        sigma[window:] = np.maximum(MAD_TO_SIGMA * mad, SIGMA_FLOOR)
    return med, sigma


@dataclass(frozen=True, slots=True)
class BarScores:
    """Per-bar rule scores over a run of candles (0 where a rule did not fire)."""

    spike: FloatArray
    spike_revert: FloatArray
    flat: BoolArray
    no_volume: BoolArray
    volume_burst: FloatArray
    z: FloatArray = field(repr=False)
    volume_z: FloatArray = field(repr=False)
    range_z: FloatArray = field(repr=False)


def _fired(score: FloatArray, threshold: float) -> FloatArray:
    with np.errstate(invalid="ignore"):
        return np.where(score >= threshold, score, 0.0)


def bar_scores(
    ohlcv: Mapping[str, FloatArray] | pd.DataFrame, settings: AnomalySettings
) -> BarScores:
    """Return every candle rule's score per bar of `ohlcv` (columns open..volume)."""
    o, h, lo, c, v = (np.asarray(ohlcv[k], dtype=np.float64) for k in _COLUMNS)
    w = settings.window
    log_close = np.log(c)
    r = np.empty_like(log_close)
    r[:1] = np.nan
    r[1:] = np.diff(log_close)
    med, sigma = robust_scale(r, w)
    z = (r - med) / sigma
    # Spike-and-revert, judged one bar late: the previous close against the close before
    # it and the open after it, in the previous bar's sigma. On a continuous market the
    # next bar opens where the last one closed; a close that jumped and a next open that
    # jumped back by as much is a print the market never traded through.
    out = np.full_like(r, np.nan)
    back = np.full_like(r, np.nan)
    if len(c) > 2:
        out[2:] = (log_close[1:-1] - log_close[:-2]) / sigma[1:-1]
        back[2:] = (log_close[1:-1] - np.log(o[2:])) / sigma[1:-1]
    with np.errstate(invalid="ignore"):
        same_side = np.sign(out) == np.sign(back)
        revert = np.where(same_side, np.minimum(np.abs(out), np.abs(back)), 0.0)
    log_volume = np.log(np.maximum(v, VOLUME_FLOOR))
    v_med, v_sigma = robust_scale(log_volume, w)
    volume_z = (log_volume - v_med) / v_sigma
    log_range = np.log(np.maximum(h / lo, 1.0) + 1e-9)
    rng_med, rng_sigma = robust_scale(log_range, w)
    flat = np.zeros(len(c), dtype=bool)
    if len(c) > 1:
        unchanged = (h[1:] == lo[1:]) & (c[1:] == c[:-1])
        repeated = (
            (o[1:] == o[:-1])
            & (h[1:] == h[:-1])
            & (lo[1:] == lo[:-1])
            & (c[1:] == c[:-1])
            & (v[1:] == v[:-1])
        )
        flat[1:] = unchanged | repeated
    return BarScores(
        spike=_fired(np.abs(z), settings.spike_z),
        spike_revert=_fired(revert, settings.revert_z),
        flat=flat,
        no_volume=v <= 0,
        volume_burst=_fired(volume_z, settings.volume_burst_z),
        z=z,
        volume_z=volume_z,
        range_z=(log_range - rng_med) / rng_sigma,
    )


def run_lengths(flags: BoolArray) -> npt.NDArray[np.int64]:
    """Return, per position, how many flags in a row end there (0 where the flag is off)."""
    n = len(flags)
    idx = np.arange(1, n + 1)
    last_off = np.maximum.accumulate(np.where(flags, 0, idx))
    return np.where(flags, idx - last_off, 0).astype(np.int64)


class _Bar(NamedTuple):
    # One bar's rule results: scores are 0 where a rule did not fire.
    z: float
    spike: float
    spike_revert: float
    flat_run: int
    zero_run: int
    volume_burst: float


def _bar_anomalies(pair: str, ts: int, bar: _Bar, s: AnomalySettings) -> list[Anomaly]:
    # The anomalies of one bar, in BAR_KINDS order.
    found: list[Anomaly] = []
    if bar.spike > 0:
        detail = f"return {bar.z:+.1f} robust sigmas from the median"
        found.append(Anomaly(ts, pair, AnomalyKind.SPIKE, bar.spike, detail))
    if bar.spike_revert > 0:
        detail = f"previous close {bar.spike_revert:.1f} sigmas off, and the next open came back"
        found.append(Anomaly(ts, pair, AnomalyKind.SPIKE_REVERT, bar.spike_revert, detail))
    if bar.flat_run >= s.frozen_bars:
        detail = f"{bar.flat_run} flat bars in a row"
        found.append(Anomaly(ts, pair, AnomalyKind.FROZEN_FEED, float(bar.flat_run), detail))
    if bar.zero_run >= s.zero_volume_bars:
        detail = f"{bar.zero_run} bars without volume"
        found.append(Anomaly(ts, pair, AnomalyKind.ZERO_VOLUME, float(bar.zero_run), detail))
    if bar.volume_burst > 0:
        detail = f"log volume {bar.volume_burst:.1f} robust sigmas above the median"
        found.append(Anomaly(ts, pair, AnomalyKind.VOLUME_BURST, bar.volume_burst, detail))
    return found


def scan(frame: pd.DataFrame, pair: str, settings: AnomalySettings) -> list[Anomaly]:
    """Return every candle anomaly in `frame` (indexed by UTC time), oldest first."""
    if frame.empty:
        return []
    ts = _index_ms(frame)
    scores = bar_scores(frame, settings)
    flat_runs = run_lengths(scores.flat)
    zero_runs = run_lengths(scores.no_volume)
    hit = (
        (scores.spike > 0)
        | (scores.spike_revert > 0)
        | (flat_runs >= settings.frozen_bars)
        | (zero_runs >= settings.zero_volume_bars)
        | (scores.volume_burst > 0)
    )
    found: list[Anomaly] = []
    for i in np.flatnonzero(hit):
        bar = _Bar(
            float(scores.z[i]),
            float(scores.spike[i]),
            float(scores.spike_revert[i]),
            int(flat_runs[i]),
            int(zero_runs[i]),
            float(scores.volume_burst[i]),
        )
        found += _bar_anomalies(pair, int(ts[i]), bar, settings)
    return found


def _index_ms(frame: pd.DataFrame) -> npt.NDArray[np.int64]:
    index = pd.DatetimeIndex(frame.index)
    return np.asarray(index.as_unit("ms").asi8, dtype=np.int64)


def isolation_scores(frame: pd.DataFrame, settings: AnomalySettings, seed: int = 0) -> FloatArray:
    """Return IsolationForest's anomaly score per bar (higher = stranger; NaN in warm-up).

    Fitted on the frame's own robust features (return z, log-volume z, log-range z): an
    auxiliary ranking beside the rules, never a pause by itself.
    """
    from sklearn.ensemble import IsolationForest

    scores = bar_scores(frame, settings)
    features = np.column_stack([scores.z, scores.volume_z, scores.range_z])
    valid = np.isfinite(features).all(axis=1)
    out = np.full(len(frame), np.nan)
    if valid.sum() < 10:
        return out
    forest = IsolationForest(n_estimators=100, random_state=seed)
    forest.fit(features[valid])
    out[valid] = -forest.score_samples(features[valid])
    return out


# -- Incremental, per closed candle ----------------------------------------------------------


class _PairWindow:
    """The last bars of one pair in contiguous arrays (amortised O(1) append)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.buf = np.empty((2 * keep, 5))
        self.n = 0
        self.last_ts: int | None = None
        self.flat_run = 0
        self.zero_run = 0
        self.sigma = math.nan  # the return scale of the last bar (spike-and-revert's)
        self.appended = 0  # bars taken in, ever
        # The next bar's scales, computed ahead (`AnomalyMonitor.prepare_next`): the bars
        # taken in when computed, then the returns' and the log volumes' median and sigma
        # (NaN where the window was too short for them).
        self.ahead: tuple[int, float, float, float, float] | None = None

    def append(self, candle: Candle) -> None:
        if self.n == len(self.buf):
            self.buf[: self.keep - 1] = self.buf[self.n - self.keep + 1 : self.n]
            self.n = self.keep - 1
        self.buf[self.n] = (candle.open, candle.high, candle.low, candle.close, candle.volume)
        self.n += 1
        self.appended += 1
        self.last_ts = candle.ts

    def rows(self) -> FloatArray:
        return self.buf[max(0, self.n - self.keep) : self.n]

    def tail(self, k: int) -> FloatArray:
        # The last `k` of `rows()` (k at most their number).
        return self.buf[self.n - k : self.n]


def _median(x: FloatArray) -> float:
    # np.median's result (the middle value, or the mean of the middle two) without its
    # per-call overhead, which is most of the cost of a 100-value median.
    n = len(x)
    half = n // 2
    if n % 2:
        return float(np.partition(x, half)[half])
    part = np.partition(x, (half - 1, half))
    return float((part[half - 1] + part[half]) / 2)


def _scale_last(x: FloatArray) -> tuple[float, float]:
    # `robust_scale` for one position: the median and robust sigma of `x` (NaN-free).
    if np.isnan(x).any():
        return math.nan, math.nan
    med = _median(x)
    sigma = max(MAD_TO_SIGMA * _median(np.abs(x - med)), SIGMA_FLOOR)
    return med, sigma


def _median_rows(x: FloatArray) -> FloatArray:
    # `_median` of each row: the same order statistics (a row sort is the cheapest way to
    # them for a block) and the same mean of the middle two.
    half = x.shape[1] // 2
    ranked = np.sort(x, axis=1)
    if x.shape[1] % 2:
        return ranked[:, half]
    out: FloatArray = (ranked[:, half - 1] + ranked[:, half]) / 2
    return out


def _scale_rows(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    # `_scale_last` of each row: its median and robust sigma (NaN for a row with a NaN).
    med = _median_rows(x)
    sigma = np.maximum(MAD_TO_SIGMA * _median_rows(np.abs(x - med[:, None])), SIGMA_FLOOR)
    gaps = np.isnan(x).any(axis=1)
    med[gaps] = np.nan
    sigma[gaps] = np.nan
    return med, sigma


def _scales_before(block: FloatArray, w: int) -> tuple[FloatArray, ...]:
    # What each row's next bar is judged against, from the bars before it (`block`: pairs,
    # bars, 5; at least `w` bars): the median and robust sigma of the last `w` returns
    # (NaN with fewer than `w` + 1 bars) and of the last `w` log volumes. One sort for both.
    count = len(block)
    log_volume = np.log(np.maximum(block[:, -w:, 4], VOLUME_FLOOR))
    if block.shape[1] < w + 1:
        nan = np.full(count, np.nan)
        return (nan, nan, *_scale_rows(log_volume))
    r = np.diff(np.log(block[:, -(w + 1) :, 3]), axis=1)
    med, sigma = _scale_rows(np.concatenate((r, log_volume)))
    return med[:count], sigma[:count], med[count:], sigma[count:]


def _ahead(windows: list[_PairWindow], lag: int = 1) -> tuple[FloatArray, ...] | None:
    # The scales `prepare_next` computed for each window's newest bar, as columns (returns'
    # median and sigma, log volumes' median and sigma); None unless every window has them.
    # `lag` 0: those computed for the bar still to come (a rehearsal's).
    kept = []
    for window in windows:
        ahead = window.ahead
        if ahead is None or ahead[0] != window.appended - lag:
            return None
        kept.append(ahead)
    columns = np.array(kept).T
    return columns[1], columns[2], columns[3], columns[4]


class AnomalyMonitor:
    """Watch closed candles, books and the feed's age, pair by pair (the live path).

    `on_candle` finds what `scan` finds on the same candles from the last `window + 3`
    bars: four numpy medians of `window` values per candle, whatever the history.
    """

    def __init__(self, settings: AnomalySettings, timeframe: str) -> None:
        self.settings = settings
        self.step = timeframe_to_ms(timeframe)
        self._windows: dict[str, _PairWindow] = {}
        self._spread_avg: dict[str, float] = {}
        self._books: dict[str, int] = {}
        self._stale: set[str] = set()
        self._blown: dict[str, int] = {}

    @property
    def pause_ms(self) -> int:
        """Return how long an anomaly pauses entries on its pair."""
        return self.settings.pause_bars * self.step

    def on_candle(self, candle: Candle) -> list[Anomaly]:
        """Return the anomalies a closed candle shows (an old or repeated candle: none)."""
        window = self._take(candle)
        bar = self._last_bar(window) if window is not None else None
        if bar is None:
            return []
        return _bar_anomalies(candle.pair, candle.ts, bar, self.settings)

    def on_candles(self, candles: Iterable[Candle]) -> dict[tuple[str, int], list[Anomaly]]:
        """`on_candle` for candles of different pairs (a burst's), by (pair, open time).

        The pairs whose windows hold as many bars are scored together: each score is
        computed as `on_candle` computes it (the same selections, logs and arithmetic).
        """
        found: dict[tuple[str, int], list[Anomaly]] = {}
        by_length: dict[int, list[tuple[Candle, _PairWindow]]] = {}
        for candle in candles:
            window = self._take(candle)
            if window is None:
                found[candle.pair, candle.ts] = []
            else:
                by_length.setdefault(min(window.n, window.keep), []).append((candle, window))
        for group in by_length.values():
            bars = self._last_bars([w for _, w in group])
            for (candle, _), bar in zip(group, bars, strict=True):
                found[candle.pair, candle.ts] = self._found(candle, bar)
        return found

    def prepare_next(self, pairs: Iterable[str]) -> None:
        """Compute ahead the scales the pairs' next closed candles are judged against.

        A bar's returns and volume are scored against the median and robust sigma of the
        `window` bars before it, which are known once the bar before it is in: computed
        here (between bursts, once a burst's orders are out), `on_candles` finds them and
        sorts nothing while a burst waits. The same values as computed then (the same
        logs and order statistics of the same rows); a window that took another bar since
        is judged as before.
        """
        w = self.settings.window
        by_length: dict[int, list[_PairWindow]] = {}
        for pair in pairs:
            window = self._windows.get(pair)
            if window is not None and min(window.n, window.keep) >= w:
                by_length.setdefault(min(window.n, window.keep), []).append(window)
        for m, windows in by_length.items():
            block = np.concatenate([window.rows() for window in windows])
            scales = _scales_before(block.reshape(len(windows), m, 5), w)
            rows = zip(*(column.tolist() for column in scales), strict=True)
            for window, (r_med, r_sigma, v_med, v_sigma) in zip(windows, rows, strict=True):
                window.ahead = (window.appended, r_med, r_sigma, v_med, v_sigma)

    def _found(self, candle: Candle, bar: _Bar | None) -> list[Anomaly]:
        return [] if bar is None else _bar_anomalies(candle.pair, candle.ts, bar, self.settings)

    def _take(self, candle: Candle) -> _PairWindow | None:
        # Append a closed candle to its pair's window; None for an old or repeated one.
        window = self._windows.get(candle.pair)
        if window is None:
            window = self._windows[candle.pair] = _PairWindow(self.settings.window + 3)
        if window.last_ts is not None and candle.ts <= window.last_ts:
            return None
        window.append(candle)
        self._stale.discard(candle.pair)
        return window

    def _runs(self, window: _PairWindow, rows: FloatArray) -> None:
        # The flat and zero-volume run lengths ending at the newest bar.
        last = rows[-1]
        if len(rows) > 1:
            prev = rows[-2]
            unchanged = last[1] == last[2] and last[3] == prev[3]
            window.flat_run = window.flat_run + 1 if unchanged or bool((last == prev).all()) else 0
        window.zero_run = window.zero_run + 1 if last[4] <= 0 else 0

    def rehearse(self, pairs: Iterable[str]) -> None:
        """Run a burst's scoring over the pairs' windows as they stand, changing nothing.

        Between bursts, just before the next close (`burst_rehearsal`): the pass then finds
        its code and the windows' rows in the CPU's caches, which an idle wait empties.
        """
        by_length: dict[int, list[_PairWindow]] = {}
        for pair in pairs:
            window = self._windows.get(pair)
            if window is not None and window.n:
                by_length.setdefault(min(window.n, window.keep), []).append(window)
        for windows in by_length.values():
            self._scores(windows, lag=0)

    def _last_bars(self, windows: list[_PairWindow]) -> list[_Bar | None]:
        # `_last_bar` for windows holding as many bars, their rows as one block.
        s = self.settings
        last, (z, spike, revert, burst, sigma, flat) = self._scores(windows)
        bars: list[_Bar | None] = []
        rows = zip(
            z.tolist(), spike.tolist(), revert.tolist(), burst.tolist(), sigma.tolist(),
            flat, (last[:, 4] <= 0).tolist(), strict=True,
        )  # fmt: skip
        for window, (zi, si, ri, bi, new_sigma, unchanged, silent) in zip(
            windows, rows, strict=True
        ):
            if window.n > 1:
                window.flat_run = window.flat_run + 1 if unchanged else 0
            window.zero_run = window.zero_run + 1 if silent else 0
            window.sigma = new_sigma
            if (
                si or ri or bi
                or window.flat_run >= s.frozen_bars
                or window.zero_run >= s.zero_volume_bars
            ):  # fmt: skip
                bars.append(_Bar(zi, si, ri, window.flat_run, window.zero_run, bi))
            else:
                bars.append(None)  # no rule fired: no bar built
        return bars

    def _scores(
        self, windows: list[_PairWindow], lag: int = 1
    ) -> tuple[
        FloatArray, tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, list[bool]]
    ]:
        # The newest bars and their scores (z, spike, revert, volume burst, the new sigma,
        # unchanged): windows holding as many bars, their rows as one block; reads only.
        s, w = self.settings, self.settings.window
        count, m = len(windows), min(windows[0].n, windows[0].keep)
        # The scales computed ahead (`prepare_next`): then only the last three bars are read.
        ahead = _ahead(windows, lag) if m >= w + 1 else None
        k = m if ahead is None else min(m, 3)
        # (pairs, bars, 5): one copy of the rows (np.stack costs twice as much)
        block = np.concatenate([window.tail(k) for window in windows]).reshape(count, k, 5)
        if ahead is None and m >= w + 1:
            ahead = _scales_before(block[:, :-1], w)  # as `prepare_next` would have
        last = block[:, -1]
        flat = [False] * count
        if m > 1:
            prev = block[:, -2]
            same = (last[:, 1] == last[:, 2]) & (last[:, 3] == prev[:, 3]) | (last == prev).all(1)
            flat = same.tolist()
        z = spike = revert = burst = np.zeros(count)
        sigma = np.full(count, np.nan)
        if m >= 3:
            before = np.array([window.sigma for window in windows])
            log_close = np.log(block[:, -3:, 3])  # the newest three closes
            if m >= w + 2:
                assert ahead is not None
                med, sigma = ahead[0], ahead[1]
                z = (log_close[:, -1] - log_close[:, -2] - med) / sigma
                spike = np.where(np.abs(z) >= s.spike_z, np.abs(z), 0.0)
            out = (log_close[:, -2] - log_close[:, -3]) / before
            back = (log_close[:, -2] - np.log(block[:, -1, 0])) / before
            both = np.minimum(np.abs(out), np.abs(back))
            revert = np.where((np.sign(out) == np.sign(back)) & (both >= s.revert_z), both, 0.0)
        if ahead is not None:  # the window holds `window` + 1 bars or more
            log_volume = np.log(np.maximum(block[:, -1, 4], VOLUME_FLOOR))
            volume_z = (log_volume - ahead[2]) / ahead[3]
            burst = np.where(volume_z >= s.volume_burst_z, volume_z, 0.0)
        return last, (z, spike, revert, burst, sigma, flat)

    def _last_bar(self, window: _PairWindow) -> _Bar | None:
        # `bar_scores` for the newest bar only; None when no rule fired.
        s, w = self.settings, self.settings.window
        rows = window.rows()
        m = len(rows)
        self._runs(window, rows)
        z = spike = revert = burst = 0.0
        sigma_before, window.sigma = window.sigma, math.nan
        if m >= 3:
            log_close = np.log(rows[-(w + 2) :, 3])
            if m >= w + 2:
                r = np.diff(log_close)
                med, window.sigma = _scale_last(r[-w - 1 : -1])
                z = (float(r[-1]) - med) / window.sigma
                spike = abs(z) if abs(z) >= s.spike_z else 0.0
            out = (log_close[-2] - log_close[-3]) / sigma_before
            back = (log_close[-2] - float(np.log(rows[-1:, 0])[0])) / sigma_before
            both = min(abs(out), abs(back))
            if np.sign(out) == np.sign(back) and both >= s.revert_z:
                revert = float(both)
        if m >= w + 1:
            log_volume = np.log(np.maximum(rows[-(w + 1) :, 4], VOLUME_FLOOR))
            v_med, v_sigma = _scale_last(log_volume[:-1])
            volume_z = (float(log_volume[-1]) - v_med) / v_sigma
            burst = volume_z if volume_z >= s.volume_burst_z else 0.0
        bar = _Bar(z, spike, revert, window.flat_run, window.zero_run, burst)
        fired = spike or revert or burst
        if fired or bar.flat_run >= s.frozen_bars or bar.zero_run >= s.zero_volume_bars:
            return bar
        return None

    def prime(self, candles: Iterable[Candle]) -> None:
        """Learn the scale from history (a live start's warm-up); what it shows is not news."""
        for candle in candles:
            self.on_candle(candle)

    def on_book(self, book: OrderBook) -> Anomaly | None:
        """Return a spread blow-out on this book, if it shows one."""
        bid, ask = book.best_bid, book.best_ask
        if bid is None or ask is None or bid <= 0 or ask < bid:
            return None
        spread = (ask - bid) / ((ask + bid) / 2) * 1e4
        seen = self._books.get(book.pair, 0)
        avg = self._spread_avg.get(book.pair, spread)
        s = self.settings
        relative = seen >= SPREAD_WARMUP and spread >= s.spread_ratio * max(avg, 0.1)
        if spread >= s.spread_max_bps or relative:
            # A blown-out book does not move the average it is judged against; a lasting
            # blow-out is reported again every half pause, which keeps its pair paused.
            last = self._blown.get(book.pair)
            if last is not None and book.ts - last < self.pause_ms // 2:
                return None
            self._blown[book.pair] = book.ts
            return Anomaly(
                book.ts,
                book.pair,
                AnomalyKind.SPREAD_BLOWOUT,
                spread,
                f"spread {spread:.1f} bps (running average {avg:.1f})",
            )
        self._books[book.pair] = seen + 1
        self._spread_avg[book.pair] = avg + SPREAD_ALPHA * (spread - avg)
        return None

    def check_stale(self, now: int) -> list[Anomaly]:
        """Return a stale-feed anomaly per pair whose last candle is too old (once per gap)."""
        found = []
        limit = self.settings.stale_bars * self.step
        for pair, window in self._windows.items():
            if window.last_ts is None or pair in self._stale:
                continue
            age = now - (window.last_ts + self.step)
            if age > limit:
                self._stale.add(pair)
                bars = age / self.step
                found.append(
                    Anomaly(
                        now,
                        pair,
                        AnomalyKind.STALE_FEED,
                        bars,
                        f"no closed candle for {bars:.1f} bars",
                    )
                )
        return found


# -- CLI: --mode anomalies ---------------------------------------------------------------


def scan_summary(
    frames: Mapping[str, pd.DataFrame], settings: AnomalySettings, *, isolation: bool = True
) -> dict[str, Any]:
    """Return the `--mode anomalies` summary: each anomaly, bars scanned, the rate per bar.

    `rate` is the share of bars with at least one anomaly. With `isolation`, each anomaly
    also carries the isolation forest's score of its bar, and `isolation_top` lists the
    bars the forest finds strangest.
    """
    anomalies: list[dict[str, Any]] = []
    top: list[dict[str, Any]] = []
    bars = flagged = 0
    counts: dict[str, int] = {}
    for pair, frame in frames.items():
        found = scan(frame, pair, settings)
        bars += len(frame)
        flagged += len({a.ts for a in found})
        ts = _index_ms(frame)
        forest = isolation_scores(frame, settings) if isolation and len(frame) else None
        where = {int(t): k for k, t in enumerate(ts)}
        for a in found:
            item: dict[str, Any] = {
                "ts": a.ts,
                "pair": a.pair,
                "kind": str(a.kind),
                "score": round(a.score, 3),
                "detail": a.detail,
            }
            if forest is not None and math.isfinite(forest[where[a.ts]]):
                item["isolation"] = round(float(forest[where[a.ts]]), 4)
            anomalies.append(item)
            counts[str(a.kind)] = counts.get(str(a.kind), 0) + 1
        if forest is not None:
            order = np.argsort(np.nan_to_num(forest, nan=-np.inf))[::-1][:10]
            top += [
                {"ts": int(ts[k]), "pair": pair, "isolation": round(float(forest[k]), 4)}
                for k in order
                if math.isfinite(forest[k])
            ]
    return {
        "mode": "anomalies",
        "anomalies": anomalies,
        "bars": bars,
        "rate": flagged / bars if bars else 0.0,
        "by_kind": counts,
        "isolation_top": sorted(top, key=lambda t: -t["isolation"])[:10],
    }


def run_anomalies_cli(
    frames: Mapping[str, pd.DataFrame], settings: AnomalySettings, args: argparse.Namespace
) -> int:
    """Scan the candle frames, print a short table and write `--summary-json`; return 0."""
    from rich.console import Console
    from rich.table import Table

    summary = scan_summary(frames, settings)
    path: Path | None = args.summary_json
    if path is not None:
        from utils.utilities import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(summary, indent=2, sort_keys=True))
    table = Table(title="Kestrel anomalies", show_header=True)
    table.add_column("kind")
    table.add_column("count", justify="right")
    for kind, count in sorted(summary["by_kind"].items()):
        table.add_row(kind, str(count))
    table.add_row("bars", str(summary["bars"]))
    table.add_row("rate", f"{summary['rate']:.4%}")
    Console(width=100).print(table)
    log.info("anomalies_scanned", bars=summary["bars"], found=len(summary["anomalies"]))
    return 0


# -- The engine's hook -----------------------------------------------------------------------


class _Pause(Protocol):
    @property
    def until(self) -> int | None: ...


class PauseBook(Protocol):
    """Where entry pauses are kept (`risk_management.PairPauses`)."""

    def pause(self, pair: str, reason: str, *, now: int, until: int | None) -> bool:
        """Pause entries on `pair`; return True when it was not paused already."""
        ...

    def active(self, pair: str, now: int) -> _Pause | None:
        """Return the pause in force on `pair` at `now`, if any."""
        ...


class AnomalyWatch:
    """Turn what the monitor finds into entry pauses, audit records and alerts.

    Each anomaly pauses entries on its pair for `pause_bars` bars (a second one extends the
    pause), is written to the audit trail and logged; the operator hears of a pause once,
    when it starts (an `AnomalyDetected` event), not of every bar of a frozen feed.
    """

    def __init__(
        self, monitor: AnomalyMonitor, pauses: PauseBook, *, audit: AuditTrail, alert: EventSink
    ) -> None:
        self.monitor = monitor
        self.pauses = pauses
        self.audit = audit
        self.alert = alert
        self.latest: dict[str, Anomaly] = {}
        self._judged: dict[tuple[str, int], list[Anomaly]] = {}

    def prepare(self, candles: Iterable[Candle]) -> None:
        """Judge a burst's candles in one pass (`AnomalyMonitor.on_candles`).

        What each shows is acted on at its own `on_candle`, in the order the burst decides.
        """
        self._judged = self.monitor.on_candles(candles)

    def prepare_next(self, pairs: Iterable[str]) -> None:
        """Compute ahead what the pairs' next candles are judged against.

        A burst's pairs, once its orders are out (`AnomalyMonitor.prepare_next`).
        """
        try:
            self.monitor.prepare_next(pairs)
        except Exception:  # their next candles are then judged as if it had not run
            log.exception("anomaly_prepare_failed")

    def rehearse(self, pairs: Iterable[str]) -> None:
        """Rehearse a burst's pass over the pairs, changing nothing (`AnomalyMonitor.rehearse`).

        What it raises stops the rehearsals (`burst_rehearsal.KeepWarm`), as any pass's does.
        """
        self.monitor.rehearse(pairs)

    def on_candle(self, candle: Candle, now: int) -> None:
        """Judge a closed candle (or take the verdict `prepare` reached on it)."""
        judged = self._judged.pop((candle.pair, candle.ts), None) if self._judged else None
        found = self.monitor.on_candle(candle) if judged is None else judged
        if found:
            self._apply(found, now)

    def on_book(self, book: OrderBook, now: int) -> None:
        """Judge a book's spread."""
        blowout = self.monitor.on_book(book)
        if blowout is not None:
            self._apply([blowout], now)

    def check_feed(self, now: int) -> None:
        """Judge the feed's age (a timer calls this: a silent feed brings no candle)."""
        self._apply(self.monitor.check_stale(now), now)

    def status(self, now: int) -> dict[str, dict[str, Any]]:
        """Return each pair's latest anomaly and whether it still pauses entries there."""
        out: dict[str, dict[str, Any]] = {}
        for pair, anomaly in self.latest.items():
            pause = self.pauses.active(pair, now)
            out[pair] = {
                "ts": anomaly.ts,
                "kind": str(anomaly.kind),
                "score": round(anomaly.score, 3),
                "detail": anomaly.detail,
                "paused": pause is not None,
                "paused_until": pause.until if pause is not None else None,
            }
        return out

    def _apply(self, found: list[Anomaly], now: int) -> None:
        until = now + self.monitor.pause_ms
        for anomaly in found:
            reason = f"{anomaly.kind}: {anomaly.detail}"
            is_new = self.pauses.pause(anomaly.pair, reason, now=now, until=until)
            self.latest[anomaly.pair] = anomaly
            self.audit.record(
                "anomaly",
                now,
                pair=anomaly.pair,
                candle_ts=anomaly.ts,
                anomaly=str(anomaly.kind),
                score=anomaly.score,
                detail=anomaly.detail,
                paused_until=until,
            )
            log.warning("anomaly_detected", pair=anomaly.pair, anomaly=str(anomaly.kind))
            if is_new:
                self.alert(AnomalyDetected(anomaly, until))
