"""Pattern recognition: which market states precede a strategy's winning and losing trades.

Each bar is described by a window of scale-free features (volatility-scaled log returns,
oscillators from the indicator library, candlestick pattern counts, the market regime);
scikit-learn's MiniBatchKMeans groups the bars into clusters. Each trade of a backtest is
placed in the cluster of the bar its entry was decided on, and every cluster gets its
record: trades, wins, the win rate's Wilson interval (95%, scipy) and the mean return.

`PatternModel` is plain numpy and JSON once fitted (the scaler and the centres), so the
live path never imports scikit-learn. As an entry filter (`StrategySettings.pattern_filter`,
off by default) it refuses an entry in a cluster that has lost: at least `min_trades`
trades, a negative mean return and a win rate whose Wilson upper bound is below the win
rate of all the trades it was fitted on. Verdicts:

==========  ==================================================================
verdict     when
==========  ==================================================================
unknown     fewer than `min_trades` trades in the cluster
losing      mean return < 0 and the win rate's upper bound < the overall win rate
winning     mean return > 0 and the win rate's lower bound > the overall win rate
neutral     otherwise
==========  ==================================================================

The bounds of a verdict hold at 95% for all the clusters together (Wilson at 1 - 0.05/k,
Bonferroni); the interval each cluster reports is its own 95% one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from models import ClosedTrade
from technical_indicators import Regime, detect_patterns, detect_regime, feature_frame


log = structlog.get_logger(__name__)

FloatArray = npt.NDArray[np.float64]

# Oscillators on a fixed 0..100 (or similar) scale: comparable across pairs and epochs.
OSCILLATORS: Final = ("rsi", "adx", "cci", "willr", "bop", "mfi", "natr")
SCALE_WINDOW: Final = 100  # bars in the volatility that scales returns and volume
# The longest warm-up among the features (the regime's volatility baseline is the longest).
WARMUP_BARS: Final = 600


def wilson_interval(wins: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the Wilson score interval of a win rate (0, 1 with no trades; scipy's)."""
    if n <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(wins, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def pattern_features(frame: pd.DataFrame, window: int = 5) -> pd.DataFrame:
    """Return the feature window of every bar (NaN rows in the warm-up).

    Columns: `ret_0..ret_{window-1}` (log returns of the last bars over their rolling
    standard deviation), the oscillators, `volume_z`, `bullish`/`bearish` (candlestick
    patterns on the bar) and one column per regime (1 for the bar's regime).
    """
    close = frame["close"].to_numpy(dtype=np.float64)
    r = pd.Series(np.r_[np.nan, np.diff(np.log(close))], index=frame.index)
    scale = r.rolling(SCALE_WINDOW).std().shift(1)
    columns: dict[str, Any] = {f"ret_{k}": (r.shift(k) / scale).to_numpy() for k in range(window)}
    oscillators = feature_frame(frame, OSCILLATORS)
    for name in OSCILLATORS:
        columns[name] = oscillators[name].to_numpy(dtype=np.float64)
    log_volume = pd.Series(np.log(np.maximum(frame["volume"].to_numpy(np.float64), 1e-12)))
    mean = log_volume.rolling(SCALE_WINDOW).mean().shift(1)
    std = log_volume.rolling(SCALE_WINDOW).std().shift(1)
    columns["volume_z"] = ((log_volume - mean) / std.replace(0.0, np.nan)).to_numpy()
    patterns = detect_patterns(frame).to_numpy()
    columns["bullish"] = (patterns > 0).sum(axis=1).astype(np.float64)
    columns["bearish"] = (patterns < 0).sum(axis=1).astype(np.float64)
    regime = detect_regime(frame).astype(object).to_numpy()
    for label in Regime:
        columns[f"regime_{label.value}"] = (regime == label.value).astype(np.float64)
    out = pd.DataFrame(columns, index=frame.index)
    return out.replace([np.inf, -np.inf], np.nan)


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """One cluster's trade record."""

    cluster: int
    bars: int
    trades: int
    wins: int
    win_rate: float
    wilson_low: float
    wilson_high: float
    mean_return: float
    verdict: str

    def summary(self) -> str:
        """Return the record in one line (/why, the dashboard)."""
        if not self.trades:
            return f"cluster {self.cluster}: no trades ({self.verdict})"
        return (
            f"cluster {self.cluster}: {self.wins}/{self.trades} won"
            f" ({self.win_rate:.0%}, 95% {self.wilson_low:.0%}-{self.wilson_high:.0%}),"
            f" mean {self.mean_return:+.2%} ({self.verdict})"
        )


def _verdict(wins: int, n: int, mean: float, base: float, min_trades: int, clusters: int) -> str:
    # Judged at 95% for all the clusters together (Bonferroni): with eight clusters, one
    # looks "significant" at 95% on a market without any edge about a third of the time.
    if n < min_trades:
        return "unknown"
    low, high = wilson_interval(wins, n, 1 - 0.05 / clusters)
    if mean < 0 and high < base:
        return "losing"
    if mean > 0 and low > base:
        return "winning"
    return "neutral"


@dataclass(frozen=True)
class PatternModel:
    """Fitted clusters (numpy, JSON) and each one's trade record."""

    columns: tuple[str, ...]
    window: int
    mean: FloatArray
    scale: FloatArray
    centres: FloatArray
    stats: tuple[ClusterStats, ...]
    base_win_rate: float
    min_trades: int

    def assign(self, features: pd.DataFrame) -> npt.NDArray[np.int64]:
        """Return each row's nearest cluster (-1 for a row with missing features)."""
        x = features[list(self.columns)].to_numpy(dtype=np.float64)
        valid = np.isfinite(x).all(axis=1)
        out = np.full(len(x), -1, dtype=np.int64)
        if valid.any():
            z = (x[valid] - self.mean) / self.scale
            distance = ((z[:, None, :] - self.centres[None, :, :]) ** 2).sum(axis=2)
            out[valid] = distance.argmin(axis=1)
        return out

    def latest(self, frame: pd.DataFrame) -> ClusterStats | None:
        """Return the record of the cluster the frame's last bar belongs to (None: warm-up)."""
        if len(frame) < 2:
            return None
        tail = frame.iloc[-WARMUP_BARS:]
        cluster = int(self.assign(pattern_features(tail, self.window).iloc[-1:])[0])
        return self.stats[cluster] if cluster >= 0 else None

    def to_json(self) -> dict[str, Any]:
        """Return the model as JSON-able data."""
        return {
            "columns": list(self.columns),
            "window": self.window,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "centres": self.centres.tolist(),
            "stats": [asdict(s) for s in self.stats],
            "base_win_rate": self.base_win_rate,
            "min_trades": self.min_trades,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatternModel:
        """Return the model `to_json` wrote."""
        return cls(
            columns=tuple(data["columns"]),
            window=int(data["window"]),
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            centres=np.asarray(data["centres"], dtype=np.float64),
            stats=tuple(ClusterStats(**s) for s in data["stats"]),
            base_win_rate=float(data["base_win_rate"]),
            min_trades=int(data["min_trades"]),
        )

    def save(self, path: Path) -> Path:
        """Write the model as JSON (atomically) and return the path."""
        from utils.utilities import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> PatternModel:
        """Read a model `save` wrote."""
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def decision_bars(index: pd.DatetimeIndex, entry_ts: Iterable[int]) -> npt.NDArray[np.int64]:
    """Return the bar each entry was decided on: the last bar closed by the entry's time."""
    ts = np.asarray(index.as_unit("ms").asi8, dtype=np.int64)
    step = int(np.median(np.diff(ts))) if len(ts) > 1 else 0
    closes = ts + step
    return np.searchsorted(closes, np.fromiter(entry_ts, dtype=np.int64), side="right") - 1


def fit_patterns(
    frame: pd.DataFrame,
    trades: Sequence[ClosedTrade],
    *,
    clusters: int = 8,
    window: int = 5,
    min_trades: int = 20,
    seed: int = 0,
) -> PatternModel:
    """Cluster the frame's bars and score each cluster by the trades entered in it.

    The clusters are fitted on every bar with complete features (the market's states, not
    just the trades'); a trade counts in the cluster of its decision bar and wins when its
    PnL, fees included, is positive.
    """
    from sklearn.cluster import MiniBatchKMeans

    features = pattern_features(frame, window)
    x = features.to_numpy(dtype=np.float64)
    valid = np.isfinite(x).all(axis=1)
    if valid.sum() < clusters:
        raise ValueError(f"{valid.sum()} bars with complete features: fewer than {clusters}")
    mean = x[valid].mean(axis=0)
    scale = x[valid].std(axis=0)
    scale[scale == 0] = 1.0
    kmeans = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=2048)
    kmeans.fit((x[valid] - mean) / scale)
    model = PatternModel(
        tuple(features.columns), window, mean, scale, kmeans.cluster_centers_, (), 0.0, min_trades
    )
    labels = model.assign(features)
    return _with_stats(model, labels, trades, frame.index)


def _with_stats(
    model: PatternModel,
    labels: npt.NDArray[np.int64],
    trades: Sequence[ClosedTrade],
    index: pd.DatetimeIndex,
) -> PatternModel:
    k = len(model.centres)
    bars = decision_bars(index, (t.entry_ts for t in trades))
    cluster = np.where(bars >= 0, labels[np.clip(bars, 0, None)], -1)
    notional = np.array([t.entry_price * t.qty for t in trades], dtype=np.float64)
    returns = np.array([t.pnl for t in trades], dtype=np.float64) / np.where(
        notional > 0, notional, np.nan
    )
    keep = (cluster >= 0) & np.isfinite(returns)
    cluster, returns = cluster[keep], returns[keep]
    n = np.bincount(cluster, minlength=k)
    wins = np.bincount(cluster, weights=(returns > 0).astype(np.float64), minlength=k)
    total = np.bincount(cluster, weights=returns, minlength=k)
    base = float((returns > 0).mean()) if len(returns) else 0.0
    counts = np.bincount(labels[labels >= 0], minlength=k)
    stats = []
    for c in range(k):
        trades_c, wins_c = int(n[c]), int(wins[c])
        mean_c = float(total[c] / trades_c) if trades_c else 0.0
        low, high = wilson_interval(wins_c, trades_c)
        stats.append(
            ClusterStats(
                cluster=c,
                bars=int(counts[c]),
                trades=trades_c,
                wins=wins_c,
                win_rate=wins_c / trades_c if trades_c else 0.0,
                wilson_low=low,
                wilson_high=high,
                mean_return=mean_c,
                verdict=_verdict(wins_c, trades_c, mean_c, base, model.min_trades, k),
            )
        )
    log.info("patterns_fitted", clusters=k, trades=int(keep.sum()), base_win_rate=base)
    return PatternModel(
        model.columns,
        model.window,
        model.mean,
        model.scale,
        model.centres,
        tuple(stats),
        base,
        model.min_trades,
    )


class PatternFilter:
    """The optional entry filter: refuse entries in clusters that lost (see the module doc).

    Reads the pair's rolling candle window at each entry signal and caches the latest
    cluster per pair and candle for the status snapshot.
    """

    def __init__(self, model: PatternModel) -> None:
        self.model = model
        self._latest: dict[str, tuple[int, ClusterStats | None]] = {}

    def latest(self, pair: str, frame: pd.DataFrame) -> ClusterStats | None:
        """Return the record of the cluster of the pair's last bar (cached per bar)."""
        if frame.empty:
            return None
        last_ts = int(frame.index[-1].value)
        cached = self._latest.get(pair)
        if cached is not None and cached[0] == last_ts:
            return cached[1]
        stats = self.model.latest(frame)
        self._latest[pair] = (last_ts, stats)
        return stats

    def veto_reason(self, pair: str, frame: pd.DataFrame) -> str | None:
        """Return why an entry on the pair's last bar is refused, None to let it through."""
        stats = self.latest(pair, frame)
        if stats is None or stats.verdict != "losing":
            return None
        return f"pattern {stats.summary()}"

    def status(self) -> dict[str, dict[str, Any]]:
        """Return each pair's latest cluster record (the snapshot's `patterns`)."""
        return {
            pair: {**asdict(stats), "summary": stats.summary()}
            for pair, (_, stats) in self._latest.items()
            if stats is not None
        }
