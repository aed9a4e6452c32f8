"""Self-learning: causal features, honest labels and splits, versioned models, fenced inference."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from config import LearningSettings
from data_manager import load_candles
from error_handler import DataError
from model_registry import Registry
from models import ErrorRaised, Event
from self_learning import (
    NEUTRAL,
    ModelRegistry,
    SafePredictor,
    build_features,
    build_labels,
    chronological_split,
    train,
    train_and_save,
)


@pytest.fixture
def candles(sample_dir: Path) -> pd.DataFrame:
    return load_candles(sample_dir / "bybit_BTC-USDT_1m.csv.gz")


def test_features_are_causal(candles: pd.DataFrame) -> None:
    """Changing future candles never changes a past feature row."""
    base = build_features(candles)
    altered = candles.copy()
    altered.iloc[1000:, :4] *= 1.37
    again = build_features(altered)
    pd.testing.assert_frame_equal(base.iloc[:1000], again.iloc[:1000])
    assert not base.iloc[1000:].equals(again.iloc[1000:])


def test_labels_look_exactly_horizon_ahead() -> None:
    """A label is 1 only when close rises above the edge within the horizon; the tail is NaN."""
    index = pd.date_range("2024-01-01", periods=6, freq="1min", tz="UTC")
    df = pd.DataFrame({"close": [100, 100, 100.2, 99, 101, 101]}, index=index)
    labels = build_labels(df, horizon=2, min_edge_bps=10)
    assert labels.iloc[:4].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert labels.iloc[4:].isna().all()


def test_split_is_chronological_with_a_purge_gap() -> None:
    """Train rows come first, then `gap` purged rows, then the test rows."""
    train_part, test_part = chronological_split(100, 0.2, gap=5)
    assert (train_part.start, train_part.stop) == (0, 75)
    assert (test_part.start, test_part.stop) == (80, 100)
    with pytest.raises(DataError):
        chronological_split(12, 0.5, gap=5)


def test_train_gbm_reports_out_of_sample_metrics(candles: pd.DataFrame) -> None:
    """A gradient-boosting model trains on the sample and is scored on later rows only."""
    settings = LearningSettings(min_samples=200, horizon_candles=5)
    _, meta = train(candles, settings)
    assert meta.kind == "gbm"
    assert meta.train_rows + meta.test_rows + settings.horizon_candles <= len(candles)
    assert 0.0 <= meta.metrics["accuracy"] <= 1.0
    assert 0.0 <= meta.metrics["brier"] <= 1.0
    assert meta.data_start_ms < meta.data_end_ms


def test_too_little_data_is_refused(candles: pd.DataFrame) -> None:
    """Training on fewer labelled rows than min_samples is a clear DataError."""
    with pytest.raises(DataError, match="labelled rows"):
        train(candles.head(120), LearningSettings(min_samples=500))


def test_registry_swaps_versions_atomically(tmp_path: Path, candles: pd.DataFrame) -> None:
    """Each save is a new directory; CURRENT names the latest; old versions stay loadable."""
    settings = LearningSettings(min_samples=200)
    registry = ModelRegistry(tmp_path / "models")
    first = train_and_save(candles, settings, tmp_path / "models")
    second = train_and_save(candles.iloc[100:], settings, tmp_path / "models")
    assert registry.current_version() == second.version
    assert registry.versions() == sorted([first.version, second.version])
    _, meta = registry.load(first.version)
    assert meta.version == first.version
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".staging")]


def test_predictor_is_neutral_without_a_model_and_on_corruption(
    tmp_path: Path, candles: pd.DataFrame
) -> None:
    """No model, or a corrupt one, gives 0.5 and an alert instead of an exception."""
    alerts: list[Event] = []
    registry = ModelRegistry(tmp_path / "models")
    predictor = SafePredictor(registry, alert=alerts.append)
    assert predictor.probability_up(candles) == NEUTRAL
    meta = train_and_save(candles, LearningSettings(min_samples=200), tmp_path / "models")
    p = predictor.probability_up(candles)
    assert 0.0 <= p <= 1.0
    assert predictor.describe()["version"] == meta.version
    (registry.root / meta.version / "model.pkl").write_bytes(b"not a pickle")
    predictor.meta = None  # force a reload of the now-corrupt version
    assert predictor.probability_up(candles) == NEUTRAL
    assert alerts
    assert isinstance(alerts[-1], ErrorRaised)


async def test_training_runs_off_the_event_loop(tmp_path: Path, candles: pd.DataFrame) -> None:
    """run_train_cli trains in a worker process while the loop keeps ticking."""
    from self_learning import run_train_cli

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    code = await run_train_cli(candles, LearningSettings(min_samples=200), tmp_path / "models")
    task.cancel()
    assert code == 0
    assert ticks > 3
    assert ModelRegistry(tmp_path / "models").current_version() is not None


@pytest.mark.slow
def test_tensorflow_mlp_trains_saves_and_loads(tmp_path: Path, candles: pd.DataFrame) -> None:
    """The Keras model trains (tiny), round-trips through disk and predicts probabilities."""
    settings = LearningSettings(min_samples=200, model="mlp")
    meta = train_and_save(candles, settings, tmp_path / "models")
    _model, loaded = ModelRegistry(tmp_path / "models").load()
    assert loaded.kind == "mlp"
    assert loaded.version == meta.version
    p = SafePredictor(ModelRegistry(tmp_path / "models")).probability_up(candles)
    assert 0.0 <= p <= 1.0
    assert np.isfinite(meta.metrics["brier"])


def test_trained_model_filters_sim_entries(tmp_path: Path) -> None:
    """--mode train then a sim with learning enabled: entries the model doubts are vetoed."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "KESTREL_LEARNING__MIN_SAMPLES": "200"}
    main = str(ROOT / "main.py")
    subprocess.run(
        [sys.executable, main, "--mode", "train", "--no-ui"],
        env=env,
        check=True,
        capture_output=True,
    )
    # A day of minutes has no edge, so the first model loses to staying flat and is kept as
    # the challenger; the operator promotes it on purpose (as `--mode models --promote`).
    registry = Registry(tmp_path / "data" / "models")
    name = "direction-BTC-USDT-1m"
    challenger = registry.aliases(name).challenger
    assert challenger is not None
    registry.promote(name, challenger)
    # The registry's champion alias replaced the CURRENT pointer file.
    assert ModelRegistry(tmp_path / "data" / "models", "direction-BTC-USDT-1m").current_version()
    env["KESTREL_LEARNING__ENABLED"] = "true"
    env["KESTREL_LEARNING__ENTRY_THRESHOLD"] = "0.99"  # nothing is that sure: every entry vetoed
    out = tmp_path / "s.json"
    subprocess.run(
        [
            sys.executable,
            main,
            "--mode",
            "sim",
            "--feed",
            "replay",
            "--no-ui",
            "--summary-json",
            str(out),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    summary = json.loads(out.read_text())
    events = [
        json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()
    ]
    model_vetoes = [e for e in events if e["kind"] == "veto" and e["guard"] == "model"]
    assert model_vetoes
    assert summary["n_trades"] == 0
    assert not summary["open_positions"]
    assert summary["vetoes"] == len(model_vetoes)
