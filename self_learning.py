"""Self-learning: models that predict whether price rises enough to pay the fees.

Train them, version them on disk, swap them in atomically, and use them without ever
letting one crash trading.

Honest about time:

* Features at row *t* use candles up to and including *t* only (causal TA-Lib indicators
  and past returns).
* The label at *t* is whether the return from close *t* to close *t + horizon* exceeds
  `min_edge_bps`; the last `horizon` rows have no label and are dropped.
* The train/test split is chronological with a purge gap of `horizon` rows between them,
  so no test label's window overlaps a training label's.

Models: `gbm` (scikit-learn's HistGradientBoostingClassifier, the default: fast, robust,
no scaling needed) or `mlp` (a small Keras network; TensorFlow is imported only here, only
when that model is trained or loaded). Training runs in a process pool, off the loop.

On disk the filter is one model kind (`SupervisedKind`, name `supervised`) of the versioned
registry (`model_registry`): `<data_dir>/models/<name>/<version>/` holds the model,
`meta.json` and the registry's manifest; the `champion` alias names the live version and
is replaced atomically, so a reader sees the old model or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import structlog

from config import LearningSettings
from error_handler import DataError, StrategyError
from model_registry import CHAMPION, FeatureCache, Lineage, Registry, new_version
from models import ErrorRaised, EventSink


log = structlog.get_logger(__name__)

FEATURES: Final = (
    "ret_1",
    "ret_3",
    "ret_12",
    "ret_48",
    "rsi_14",
    "atr_pct_14",
    "ema_gap_12_26",
    "bb_pos_20",
    "adx_14",
    "vol_z_48",
    "range_pct",
    "close_pos",
)
NEUTRAL: Final = 0.5


# -- Features and labels ---------------------------------------------------------------------


def build_features(df: pd.DataFrame) -> pd.DataFrame:
    """Return causal features for each row of a candle frame (NaN during warm-up)."""
    import talib

    o, h, lo, c, v = (
        df[k].to_numpy(dtype=np.float64) for k in ("open", "high", "low", "close", "volume")
    )
    close = pd.Series(c, index=df.index)
    upper, middle, lower = talib.BBANDS(c, timeperiod=20)
    width = upper - lower
    volume = pd.Series(v, index=df.index)
    vol_mean = volume.rolling(48).mean()
    vol_std = volume.rolling(48).std()
    span = h - lo
    out = pd.DataFrame(
        {
            "ret_1": close.pct_change(1),
            "ret_3": close.pct_change(3),
            "ret_12": close.pct_change(12),
            "ret_48": close.pct_change(48),
            "rsi_14": talib.RSI(c, timeperiod=14) / 100.0,
            "atr_pct_14": talib.ATR(h, lo, c, timeperiod=14) / c,
            "ema_gap_12_26": talib.EMA(c, timeperiod=12) / talib.EMA(c, timeperiod=26) - 1,
            "bb_pos_20": np.divide(c - middle, width, out=np.full_like(c, np.nan), where=width > 0),
            "adx_14": talib.ADX(h, lo, c, timeperiod=14) / 100.0,
            "vol_z_48": (volume - vol_mean) / vol_std.replace(0.0, np.nan),
            "range_pct": span / c,
            "close_pos": np.divide(c - lo, span, out=np.full_like(c, 0.5), where=span > 0),
        },
        index=df.index,
    )
    del o
    return out.replace([np.inf, -np.inf], np.nan)


def build_labels(df: pd.DataFrame, horizon: int, min_edge_bps: float) -> pd.Series:
    """Return 1.0 where close rises more than `min_edge_bps` within `horizon` rows, else 0.0.

    The last `horizon` rows are NaN: their future is unknown.
    """
    close = df["close"]
    forward = close.shift(-horizon) / close - 1
    label = (forward > min_edge_bps / 1e4).astype("float64")
    label[forward.isna()] = np.nan
    return label


def dataset(
    df: pd.DataFrame, horizon: int, min_edge_bps: float
) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
    """Return (X, y, index) with warm-up and unlabeled rows removed."""
    features = build_features(df)
    labels = build_labels(df, horizon, min_edge_bps)
    mask = features.notna().all(axis=1) & labels.notna()
    return (
        features[mask].to_numpy(dtype=np.float64),
        labels[mask].to_numpy(dtype=np.float64),
        pd.DatetimeIndex(features.index[mask]),
    )


def chronological_split(n: int, test_fraction: float, gap: int) -> tuple[slice, slice]:
    """Return train and test slices: oldest rows train, newest test, `gap` rows purged."""
    n_test = max(1, int(n * test_fraction))
    train_end = n - n_test - gap
    if train_end < 10:
        raise DataError(f"not enough rows to train: {n} (need more than {n_test + gap + 10})")
    return slice(0, train_end), slice(n - n_test, n)


# -- Models ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """What a saved model is, what it was trained on, and how well it did out of sample."""

    name: str
    version: str
    kind: str
    features: tuple[str, ...]
    horizon: int
    min_edge_bps: float
    trained_at_ms: int
    train_rows: int
    test_rows: int
    data_start_ms: int
    data_end_ms: int
    metrics: dict[str, float]
    train_end_ms: int = 0  # the last row it fitted on: later rows are out of sample for it


def _fit_gbm(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        early_stopping=True,
        validation_fraction=0.15,
        random_state=seed,
    )
    model.fit(x, y.astype(int))
    return model


def _fit_mlp(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-12
    inputs = keras.Input(shape=(x.shape[1],))
    norm = keras.layers.Normalization(mean=mean, variance=std**2)(inputs)
    hidden = keras.layers.Dense(32, activation="relu")(norm)
    hidden = keras.layers.Dropout(0.1)(hidden)
    hidden = keras.layers.Dense(16, activation="relu")(hidden)
    output = keras.layers.Dense(1, activation="sigmoid")(hidden)
    model = keras.Model(inputs, output)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=5, batch_size=256, verbose=0, shuffle=False)
    return model


def _predict(kind: str, model: Any, x: np.ndarray) -> np.ndarray:
    if kind == "mlp":
        return np.asarray(model(x.astype(np.float32), training=False)).reshape(-1)
    return np.asarray(model.predict_proba(x)[:, 1])


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score

    pred = (p >= NEUTRAL).astype(int)
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "base_rate": float(y.mean()),
        "brier": float(brier_score_loss(y, p)),
        "precision_up": float(((pred == 1) & (y == 1)).sum() / max((pred == 1).sum(), 1)),
    }
    out["auc"] = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return out


def train(
    df: pd.DataFrame, settings: LearningSettings, *, name: str = "direction"
) -> tuple[Any, ModelMeta]:
    """Fit a model on a candle frame; return it with its out-of-sample metrics.

    CPU-bound and picklable: run it through `utils.utilities.run_cpu`.
    """
    x, y, index = dataset(df, settings.horizon_candles, settings.min_edge_bps)
    model, meta, _ = _fit(x, y, index, settings, name=name, seed=settings.seed)
    return model, meta


def _fit(
    x: np.ndarray,
    y: np.ndarray,
    index: pd.DatetimeIndex,
    settings: LearningSettings,
    *,
    name: str,
    seed: int,
) -> tuple[Any, ModelMeta, slice]:
    # Fit on the oldest rows, score on the newest (purged); return the test slice too.
    if len(x) < settings.min_samples:
        raise DataError(f"{len(x)} labelled rows, need at least {settings.min_samples}")
    train_part, test_part = chronological_split(
        len(x), settings.test_fraction, settings.horizon_candles
    )
    fit = _fit_mlp if settings.model == "mlp" else _fit_gbm
    model = fit(x[train_part], y[train_part], seed)
    probabilities = _predict(settings.model, model, x[test_part])
    meta = ModelMeta(
        name=name,
        version=new_version(),
        kind=settings.model,
        features=FEATURES,
        horizon=settings.horizon_candles,
        min_edge_bps=settings.min_edge_bps,
        trained_at_ms=time.time_ns() // 1_000_000,
        train_rows=train_part.stop - train_part.start,
        test_rows=test_part.stop - test_part.start,
        data_start_ms=int(index[0].value // 1_000_000),
        data_end_ms=int(index[-1].value // 1_000_000),
        metrics=_metrics(y[test_part], probabilities),
        train_end_ms=int(index[train_part.stop - 1].value // 1_000_000),
    )
    return model, meta, test_part


# -- Versioned storage -----------------------------------------------------------------------


def save_model(model: Any, meta: ModelMeta, directory: Path) -> None:
    """Write a supervised model and its `meta.json` into `directory`."""
    if meta.kind == "mlp":
        model.save(directory / "model.keras")
    else:
        with (directory / "model.pkl").open("wb") as handle:
            pickle.dump(model, handle, protocol=pickle.HIGHEST_PROTOCOL)
    (directory / "meta.json").write_text(json.dumps(asdict(meta), indent=2))


def load_model(directory: Path) -> tuple[Any, ModelMeta]:
    """Read back what `save_model` wrote.

    Raises:
        DataError: an unreadable model.
    """
    try:
        raw = json.loads((directory / "meta.json").read_text())
        raw["features"] = tuple(raw["features"])
        meta = ModelMeta(**raw)
        if meta.kind == "mlp":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import keras

            model = keras.saving.load_model(directory / "model.keras")
        else:
            with (directory / "model.pkl").open("rb") as handle:
                model = pickle.load(handle)  # noqa: S301 - our own file, written by save_model
    except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot load model {directory}: {e}") from e
    return model, meta


class ModelRegistry:
    """One supervised model name in the versioned registry (`model_registry.Registry`).

    The live model is the `champion` alias; `save` registers a version and makes it champion
    (the operator's explicit `--mode train`); the daemon's retraining goes through the
    challenger, shadow and promotion rules of `model_training` instead.
    """

    def __init__(self, root: Path, name: str = "direction") -> None:
        self.registry = Registry(root)
        self.root = root / name
        self.name = name
        self._view: tuple[int, dict[str, Any]] | None = None  # (directory mtime, describe)

    def save(self, model: Any, meta: ModelMeta, *, seed: int = 0) -> Path:
        """Write a new version and make it the champion; return its directory."""
        trained = SupervisedTrained(model, meta, np.zeros(0), dict(meta.metrics))
        lineage = _lineage(meta, seed)
        self.registry.register(self.name, KIND, trained, lineage, version=meta.version)
        self.registry.promote(self.name, meta.version)
        log.info("model_saved", name=self.name, version=meta.version, **meta.metrics)
        return self.root / meta.version

    def current_version(self) -> str | None:
        """Return the champion's version, if any."""
        try:
            return self.registry.alias(self.name, CHAMPION)
        except DataError:
            return None

    def versions(self) -> list[str]:
        """Return saved versions, oldest first."""
        return self.registry.versions(self.name)

    def load(self, version: str | None = None) -> tuple[Any, ModelMeta]:
        """Load a version (the champion by default).

        Raises:
            DataError: no model, or an unreadable one.
        """
        version = version or self.current_version()
        if version is None:
            raise DataError(f"no trained model under {self.root}")
        return load_model(self.root / version)

    def describe(self) -> dict[str, Any]:
        """Return the registry's aliases for this name (for /model and every snapshot).

        Cached until the name's directory changes: a version appearing and an alias file
        being replaced both touch it, so a snapshot costs one `stat`, not a directory walk.
        """
        try:
            stamp = self.root.stat().st_mtime_ns
        except OSError:
            stamp = None
        if self._view is not None and stamp is not None and self._view[0] == stamp:
            return self._view[1]
        try:
            view = self.registry.describe(self.name)
        except DataError as e:
            return {"name": self.name, "error": e.message}
        if stamp is not None:
            self._view = (stamp, view)
        return view


def _lineage(meta: ModelMeta, seed: int) -> Lineage:
    return Lineage(
        data_start_ms=meta.data_start_ms,
        data_end_ms=meta.train_end_ms or meta.data_end_ms,
        pairs=(),
        timeframe="",
        feature_set=FEATURE_SET,
        seed=seed,
        created_ms=meta.trained_at_ms,
    )


# -- The supervised model kind ---------------------------------------------------------------

KIND: Final = "supervised"
FEATURE_SET: Final = "direction-v1"
TAKER_FEE_BPS: Final = 5.5  # Bybit's spot/perp taker fee: what a filter's switch costs


def filter_returns(
    frame: pd.DataFrame, index: pd.DatetimeIndex, probabilities: np.ndarray, threshold: float
) -> pd.Series:
    """Return per-bar returns of "long while P(up) >= threshold", net of a taker fee per switch.

    The position decided at the close of bar *t* earns the return from close *t* to close
    *t + 1*; each change of position pays `TAKER_FEE_BPS`.
    """
    forward = (frame["close"].shift(-1) / frame["close"] - 1.0).reindex(index).fillna(0.0)
    position = (np.asarray(probabilities) >= threshold).astype(np.float64)
    switches = np.abs(np.diff(position, prepend=0.0))
    returns = position * forward.to_numpy(dtype=np.float64) - switches * TAKER_FEE_BPS / 1e4
    return pd.Series(returns, index=index, name="return")


@dataclass(frozen=True, slots=True)
class SupervisedTrained:
    """A trained entry filter with its out-of-sample returns (a `model_registry.Trained`)."""

    model: Any
    meta: ModelMeta
    returns: np.ndarray
    metrics: dict[str, float]

    def save(self, directory: Path) -> None:
        """Write the model and its meta into `directory`."""
        save_model(self.model, self.meta, directory)

    def validation_returns(self) -> np.ndarray:
        """Return the filter's per-bar returns on the held-out rows."""
        return self.returns


class SupervisedKind:
    """The supervised entry filter as a registry model kind.

    Args:
        settings: the learning settings (model, horizon, edge, split, threshold).
        features_dir: where training datasets are cached as Parquet (None: no cache).
    """

    name = KIND

    def __init__(self, settings: LearningSettings, *, features_dir: Path | None = None) -> None:
        self.settings = settings
        self.cache = FeatureCache(features_dir) if features_dir is not None else None

    def _dataset(self, pair: str, frame: pd.DataFrame) -> pd.DataFrame:
        s = self.settings
        params = {"features": list(FEATURES), "horizon": s.horizon_candles, "edge": s.min_edge_bps}

        def build(candles: pd.DataFrame) -> pd.DataFrame:
            out = build_features(candles)
            out["label"] = build_labels(candles, s.horizon_candles, s.min_edge_bps)
            return out[out.notna().all(axis=1)]

        if self.cache is None:
            return build(frame)
        return self.cache.dataset(FEATURE_SET, params, pair, frame, build)

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> SupervisedTrained:
        """Train one filter on the first pair's candles; validate on its held-out tail.

        Raises:
            DataError: too little data.
        """
        if not frames:
            raise DataError("no candles to train on")
        pair, frame = next(iter(frames.items()))
        started = time.monotonic()
        data = self._dataset(pair, frame)
        x = data[list(FEATURES)].to_numpy(dtype=np.float64)
        y = data["label"].to_numpy(dtype=np.float64)
        index = pd.DatetimeIndex(data.index)
        model, meta, test = _fit(x, y, index, self.settings, name=pair, seed=seed)
        probabilities = _predict(meta.kind, model, x[test])
        returns = filter_returns(frame, index[test], probabilities, self.settings.entry_threshold)
        metrics = {
            **meta.metrics,
            "train_s": time.monotonic() - started,
            "seed": float(seed),
            "train_end_ms": float(meta.train_end_ms),
        }
        if time.monotonic() - started > time_budget_s:
            raise DataError(f"training took longer than its {time_budget_s:.0f} s budget")
        return SupervisedTrained(model, meta, returns.to_numpy(), metrics)

    def replay(self, directory: Path, frame: pd.DataFrame) -> pd.Series:
        """Return a saved filter's per-bar returns on `frame` (for validation and shadowing)."""
        model, meta = load_model(directory)
        features = build_features(frame)
        rows = features.notna().all(axis=1)
        index = pd.DatetimeIndex(features.index[rows])
        if not len(index):
            return pd.Series(dtype=np.float64)
        probabilities = _predict(meta.kind, model, features[rows].to_numpy(dtype=np.float64))
        return filter_returns(frame, index, probabilities, self.settings.entry_threshold)


# -- Inference, fenced -----------------------------------------------------------------------


class SafePredictor:
    """Model inference that never raises: any failure gives the neutral 0.5 and an alert.

    The model is reloaded when the champion alias moves, so a promotion or a rollback made
    elsewhere (the retrainer, `--mode models`) is picked up.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        alert: EventSink | None = None,
    ) -> None:
        self.registry = registry
        self.alert: EventSink = alert or (lambda event: None)
        self.model: Any = None
        self.meta: ModelMeta | None = None
        self.version: str | None = None  # the registry version loaded (the meta may differ)
        self.failures = 0

    def refresh(self) -> bool:
        """Load the current version if it changed; return True when a model is ready."""
        version = self.registry.current_version()
        if version is None:
            return False
        if self.meta is not None and self.version == version:
            return True
        try:
            self.model, self.meta = self.registry.load(version)
            self.version = version
        except DataError as e:
            self._fail(e)
            return False
        log.info("model_loaded", version=version)
        return True

    def probability_up(self, df: pd.DataFrame) -> float:
        """Return P(up) for the last row of `df`, or 0.5 when there is no usable answer."""
        try:
            if not self.refresh() or self.meta is None:
                return NEUTRAL
            row = build_features(df.tail(200)).iloc[[-1]]
            if row.isna().any(axis=None):
                return NEUTRAL
            value = float(_predict(self.meta.kind, self.model, row.to_numpy(dtype=np.float64))[0])
            if not np.isfinite(value) or not 0 <= value <= 1:
                raise StrategyError(f"model returned {value}")
            return value
        except Exception as e:
            self._fail(e)
            return NEUTRAL

    def _fail(self, error: BaseException) -> None:
        self.failures += 1
        log.warning("model_failed", error=repr(error), failures=self.failures)
        self.alert(ErrorRaised(f"model inference failed: {error!r}"))

    def describe(self) -> dict[str, Any]:
        """Return the live model's identity and metrics for /model and the UI."""
        registry = self.registry.describe()
        if self.meta is None:
            return {"loaded": False, "failures": self.failures, "registry": registry}
        return {
            "loaded": True,
            "failures": self.failures,
            **asdict(self.meta),
            "version": self.version,
            "registry": registry,
        }


# -- CLI -------------------------------------------------------------------------------------


def train_and_save(
    df: pd.DataFrame, settings: LearningSettings, models_dir: Path, name: str = "direction"
) -> ModelMeta:
    """Train and save in one call, so a worker process never ships a model object back."""
    model, meta = train(df, settings, name=name)
    ModelRegistry(models_dir, name).save(model, meta, seed=settings.seed)
    return meta


async def run_train_cli(
    frame: pd.DataFrame, settings: LearningSettings, models_dir: Path, *, name: str = "direction"
) -> int:
    """Train on `frame` in a worker process, save the version, print its metrics."""
    from utils.utilities import run_cpu

    meta = await run_cpu(train_and_save, frame, settings, models_dir, name)
    folder = ModelRegistry(models_dir, meta.name).root / meta.version
    print(json.dumps({"saved": str(folder), **asdict(meta)}, indent=2, default=str))
    return 0
