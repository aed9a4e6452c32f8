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

On disk: `<data_dir>/models/<name>/<version>/` holds the model and `meta.json`; the file
`<data_dir>/models/<name>/CURRENT` names the live version and is replaced atomically, so a
reader sees the old model or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import structlog

from config import LearningSettings
from error_handler import DataError, StrategyError
from models import ErrorRaised, EventSink
from utils.utilities import atomic_write


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
    if len(x) < settings.min_samples:
        raise DataError(f"{len(x)} labelled rows, need at least {settings.min_samples}")
    train_part, test_part = chronological_split(
        len(x), settings.test_fraction, settings.horizon_candles
    )
    fit = _fit_mlp if settings.model == "mlp" else _fit_gbm
    model = fit(x[train_part], y[train_part], settings.seed)
    probabilities = _predict(settings.model, model, x[test_part])
    meta = ModelMeta(
        name=name,
        version=_new_version(),
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
    )
    return model, meta


def _new_version() -> str:
    # Sortable by time, unique even for two trainings in the same millisecond.
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9))
    return f"{stamp}.{now // 1_000_000 % 1000:03d}-{uuid.uuid4().hex[:6]}"


# -- Versioned storage -----------------------------------------------------------------------


class ModelRegistry:
    """Versioned model directories with an atomically swapped CURRENT pointer."""

    def __init__(self, root: Path, name: str = "direction") -> None:
        self.root = root / name
        self.name = name

    def save(self, model: Any, meta: ModelMeta) -> Path:
        """Write a new version and make it current; return its directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            if meta.kind == "mlp":
                model.save(staging / "model.keras")
            else:
                with (staging / "model.pkl").open("wb") as handle:
                    pickle.dump(model, handle, protocol=pickle.HIGHEST_PROTOCOL)
            (staging / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
            final = self.root / meta.version
            os.replace(staging, final)  # a directory appears whole or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write(self.root / "CURRENT", meta.version)
        log.info("model_saved", name=self.name, version=meta.version, **meta.metrics)
        return final

    def current_version(self) -> str | None:
        """Return the live version's name, if any."""
        pointer = self.root / "CURRENT"
        return pointer.read_text().strip() if pointer.is_file() else None

    def versions(self) -> list[str]:
        """Return saved versions, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def load(self, version: str | None = None) -> tuple[Any, ModelMeta]:
        """Load a version (the current one by default).

        Raises:
            DataError: no model, or an unreadable one.
        """
        version = version or self.current_version()
        if version is None:
            raise DataError(f"no trained model under {self.root}")
        folder = self.root / version
        try:
            raw = json.loads((folder / "meta.json").read_text())
            raw["features"] = tuple(raw["features"])
            meta = ModelMeta(**raw)
            if meta.kind == "mlp":
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                import keras

                model = keras.saving.load_model(folder / "model.keras")
            else:
                with (folder / "model.pkl").open("rb") as handle:
                    model = pickle.load(handle)  # noqa: S301 - our own file, written by save()
        except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot load model {folder}: {e}") from e
        return model, meta


# -- Inference, fenced -----------------------------------------------------------------------


class SafePredictor:
    """Model inference that never raises: any failure gives the neutral 0.5 and an alert.

    The model is reloaded when CURRENT changes, so a retrain elsewhere is picked up.
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
        self.failures = 0

    def refresh(self) -> bool:
        """Load the current version if it changed; return True when a model is ready."""
        version = self.registry.current_version()
        if version is None:
            return False
        if self.meta is not None and self.meta.version == version:
            return True
        try:
            self.model, self.meta = self.registry.load(version)
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
        if self.meta is None:
            return {"loaded": False, "failures": self.failures}
        return {"loaded": True, "failures": self.failures, **asdict(self.meta)}


# -- CLI -------------------------------------------------------------------------------------


def train_and_save(
    df: pd.DataFrame, settings: LearningSettings, models_dir: Path, name: str = "direction"
) -> ModelMeta:
    """Train and save in one call, so a worker process never ships a model object back."""
    model, meta = train(df, settings, name=name)
    ModelRegistry(models_dir, name).save(model, meta)
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
