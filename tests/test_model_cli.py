"""The supervised kind under the registry: the dataset cache and the train/models commands."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from config import LearningSettings
from data_manager import load_candles
from model_registry import FeatureCache, Lineage, Registry
from model_training import run_models_cli, run_train_cli
from self_learning import (
    FEATURE_SET,
    ModelRegistry,
    SafePredictor,
    SupervisedKind,
    build_features,
)
from tests.conftest import ROOT


PAIR = "BTC/USDT"


@pytest.fixture
def candles(sample_dir: Path) -> pd.DataFrame:
    return load_candles(sample_dir / "bybit_BTC-USDT_1m.csv.gz")


def test_training_datasets_are_cached_as_parquet_and_reused(
    tmp_path: Path, candles: pd.DataFrame
) -> None:
    """The second training on the same candles reads the Parquet dataset the first wrote."""
    settings = LearningSettings(min_samples=200)
    first_kind = SupervisedKind(settings, features_dir=tmp_path / "features")
    first = first_kind.train({PAIR: candles}, seed=7, time_budget_s=120)
    files = sorted((tmp_path / "features" / FEATURE_SET).glob("*.parquet"))
    assert len(files) == 1
    assert first_kind.cache is not None
    assert (first_kind.cache.misses, first_kind.cache.hits) == (1, 0)
    stored = pd.read_parquet(files[0])
    expected = build_features(candles).dropna()
    pd.testing.assert_frame_equal(
        stored.drop(columns="label"), expected.loc[stored.index], check_freq=False
    )
    again_kind = SupervisedKind(settings, features_dir=tmp_path / "features")
    again = again_kind.train({PAIR: candles}, seed=7, time_budget_s=120)
    assert again_kind.cache is not None
    assert (again_kind.cache.misses, again_kind.cache.hits) == (0, 1)
    np.testing.assert_array_equal(first.validation_returns(), again.validation_returns())
    assert first.metrics["auc"] == again.metrics["auc"]
    # Registered under the registry's own version, the champion is loaded once, not per call.
    registry = Registry(tmp_path / "models")
    lineage = Lineage(0, 1, (PAIR,), "1m", FEATURE_SET, seed=7)
    version = registry.register("direction-BTC-USDT-1m", "supervised", again, lineage).version
    registry.promote("direction-BTC-USDT-1m", version)
    predictor = SafePredictor(ModelRegistry(tmp_path / "models", "direction-BTC-USDT-1m"))
    assert 0.0 <= predictor.probability_up(candles) <= 1.0
    loaded = predictor.model
    assert 0.0 <= predictor.probability_up(candles) <= 1.0
    assert predictor.model is loaded
    assert predictor.describe()["version"] == version


def test_the_cache_key_follows_the_data_range_and_the_candles(candles: pd.DataFrame) -> None:
    """A longer range, a corrected candle or other parameters make another dataset."""
    cache = FeatureCache(Path("unused"))
    params = {"horizon": 5}
    base = cache.key(FEATURE_SET, params, PAIR, candles)
    assert base == cache.key(FEATURE_SET, params, PAIR, candles.copy())
    corrected = candles.copy()
    corrected.iloc[-1, corrected.columns.get_loc("close")] *= 1.001
    others = {
        cache.key(FEATURE_SET, params, PAIR, candles.iloc[:-1]),
        cache.key(FEATURE_SET, params, PAIR, corrected),
        cache.key(FEATURE_SET, {"horizon": 6}, PAIR, candles),
        cache.key(FEATURE_SET, params, "ETH/USDT", candles),
    }
    assert base not in others
    assert len(others) == 4


def _kestrel(*args: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "KESTREL_LEARNING__MIN_SAMPLES": "200",
        "KESTREL_LEARNING__TIME_BUDGET": "120",
        # A day of real minutes has no edge to find: the first model is made champion on
        # purpose (opt-in), since by default one that loses to staying flat is not used.
        "KESTREL_LEARNING__BOOTSTRAP_CHAMPION": "true",
    }
    out = Path.cwd() / f"summary-{len(list(Path.cwd().glob('summary-*')))}.json"
    subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args, "--no-ui", "--summary-json", str(out)],
        env=env,
        check=True,
        capture_output=True,
    )
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


async def test_train_and_models_commands(
    tmp_path: Path, sample_dir: Path, candles: pd.DataFrame
) -> None:
    """--mode train writes model/version/promoted/validation, reproducibly; models moves aliases."""
    data = str(sample_dir / "bybit_BTC-USDT_1m.csv.gz")
    train = ("--mode", "train", "--strategy", "supervised", "--pairs", PAIR, "--timeframe", "1m")
    first = _kestrel(*train, "--data", data)
    name = "direction-BTC-USDT-1m"
    assert (first["model"], first["promoted"], first["decision"]) == (name, True, "promoted")
    assert first["validation"]["champion"] is None
    assert np.isfinite(first["validation"]["challenger"])
    # Walk-forward: three anchored folds, each out of sample after the one before it.
    folds = first["validation"]["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3]
    assert all(a["end_ms"] <= b["start_ms"] for a, b in itertools.pairwise(folds))
    assert sum(f["bars"] for f in folds) == first["validation"]["bars"]
    assert first["validation"]["baseline"] == "flat"
    # The same command's function again, in this process (a second interpreter costs seconds).
    second = await run_train_cli(
        {PAIR: candles},
        LearningSettings(min_samples=200),
        kind="supervised",
        timeframe="1m",
        data_dir=tmp_path / "data",
    )
    assert second["promoted"] is False
    assert second["validation"]["champion_version"] == first["version"]
    # The same candles and seed give the same model: both score the same on the same bars.
    assert second["validation"]["challenger"] == second["validation"]["champion"]
    registry = Registry(tmp_path / "data" / "models")
    assert registry.aliases(name).champion == first["version"]
    one, two = (registry.manifest(name, s["version"]) for s in (first, second))
    assert one.metrics["auc"] == two.metrics["auc"]
    assert two.lineage.parent == first["version"]
    assert (two.lineage.pairs, two.lineage.timeframe, two.lineage.seed) == ((PAIR,), "1m", 7)
    assert run_models_cli(tmp_path / "data" / "models", promote=f"{name}@{second['version']}") == 0
    assert registry.aliases(name).champion == second["version"]
    rolled = _kestrel("--mode", "models", "--rollback", name)
    assert (rolled["champion"], rolled["replaced"]) == (first["version"], second["version"])
    (row,) = rolled["models"]
    assert (row["champion"], row["versions"], row["previous"]) == (first["version"], 2, [])
