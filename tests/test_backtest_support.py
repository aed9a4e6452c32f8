"""Shared helpers for the strategy, backtest, matching, parity and analytics tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tests.conftest import ROOT, SAMPLE


SAMPLE_FILE = SAMPLE / "bybit_BTC-USDT_1m.csv.gz"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000  # an hour boundary, ms UTC
MINUTE = 60_000
PARITY_ENV = {
    "KESTREL_RISK__PROFILE": "all_in",
    "KESTREL_SIMULATION__TAKER_FEE": "0.001",
    "KESTREL_SIMULATION__MAKER_FEE": "0.001",
    "KESTREL_SIMULATION__SLIPPAGE_BPS": "0",
    "KESTREL_SIMULATION__STARTING_BALANCE": "10000",
}


@cache
def _sample() -> pd.DataFrame:
    from data_manager import load_candles

    return load_candles(SAMPLE_FILE, timeframe="1m")


def sample_frame() -> pd.DataFrame:
    """Return the bundled 1,440-candle Bybit BTC/USDT 1m sample (a copy)."""
    return _sample().copy()


def frame(
    closes: npt.ArrayLike,
    *,
    opens: npt.ArrayLike | None = None,
    highs: npt.ArrayLike | None = None,
    lows: npt.ArrayLike | None = None,
    volumes: npt.ArrayLike | None = None,
    start_ms: int = T0,
    step_ms: int = MINUTE,
) -> pd.DataFrame:
    """Return a candle frame from closes (open = previous close, high/low = the extremes)."""
    close = np.asarray(closes, dtype=np.float64)
    open_ = (
        np.asarray(opens, dtype=np.float64)
        if opens is not None
        else np.concatenate([close[:1], close[:-1]])
    )
    high = np.asarray(highs, dtype=np.float64) if highs is not None else np.maximum(open_, close)
    low = np.asarray(lows, dtype=np.float64) if lows is not None else np.minimum(open_, close)
    volume = (
        np.asarray(volumes, dtype=np.float64) if volumes is not None else np.full(len(close), 10.0)
    )
    index = pd.DatetimeIndex(
        pd.to_datetime(start_ms + step_ms * np.arange(len(close)), unit="ms", utc=True),
        name="ts",
    )
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume},
        index=index,
    )


def random_walk(n: int, *, seed: int = 1, start: float = 100.0, tick: float = 0.01) -> pd.DataFrame:
    """Return a seeded random-walk candle frame on a tick grid, with real bars (not flat)."""
    rng = np.random.default_rng(seed)
    close = np.round(start * np.exp(np.cumsum(rng.normal(0, 0.002, n))) / tick) * tick
    open_ = np.concatenate([[start], close[:-1]])
    spread = np.abs(rng.normal(0, 0.001, n)) * close
    high = np.round((np.maximum(open_, close) + spread) / tick) * tick
    low = np.round((np.minimum(open_, close) - spread) / tick) * tick
    volume = np.round(rng.lognormal(2, 0.5, n), 4)
    return frame(close, opens=open_, highs=high, lows=low, volumes=volume)


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `main.py` (by absolute path) with `args` in `tmp_path`; return the summary JSON."""
    out = tmp_path / "out.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")}
    full_env = {**clean, **(env or {})}
    full_env["KESTREL_STORAGE__DATA_DIR"] = str(tmp_path / "data")
    full_env["KESTREL_STORAGE__LOG_DIR"] = str(tmp_path / "logs")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args, "--no-ui", "--summary-json", str(out)],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def cli_args(*args: str) -> Any:
    """Return parsed `main.py` arguments."""
    import main

    return main.build_parser().parse_args([*args, "--no-ui"])


async def replay_in_process(*args: str) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """Run a replay in-process through runner's Daemon; return its summary and equity curve.

    The environment (KESTREL_* variables set by the test) configures it, as on the CLI.
    """
    import main
    from config import load_settings
    from runner import Daemon

    parsed = cli_args(*args)
    settings = main._apply_cli(load_settings(env_file=None), parsed)
    daemon = Daemon(parsed, settings)
    daemon.build_replay()
    summary = (await daemon.run()).to_dict()
    assert daemon.engine is not None
    return summary, list(daemon.engine.portfolio.equity_curve)


def minute_walk(n: int, seed: int, sigma: float = 0.01, wick: float = 0.003) -> pd.DataFrame:
    """Return `n` one-minute candles of a seeded random walk (prices rounded to cents)."""
    rng = np.random.default_rng(seed)
    close = np.round(100 * np.exp(np.cumsum(rng.normal(0, sigma, n))), 2)
    open_ = np.concatenate(([close[0]], close[:-1]))
    high = np.round(np.maximum(open_, close) * (1 + rng.random(n) * wick), 2)
    low = np.round(np.minimum(open_, close) * (1 - rng.random(n) * wick), 2)
    volume = np.round(rng.gamma(2.0, 3.0, n), 4)
    index = pd.date_range("2024-01-01", periods=n, freq="1min", tz="UTC", name="ts")
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume},
        index=index.as_unit("ms"),
    )
