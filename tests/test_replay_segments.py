"""A long backtest replays its archive a time segment at a time: the whole archive's run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import main
from candle_store import CandleStore
from config import load_settings
from runner import Daemon
from tests.test_backtest_support import cli_args, minute_walk
from trade_simulator import SegmentedReplayFeed


PAIRS = ["C0/USDT", "C1/USDT", "C2/USDT"]
TRADING_THROUGHOUT = {  # the account trades to the end: stops trail all along
    "KESTREL_RISK__MAX_DRAWDOWN": "0.99",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.98",
    "KESTREL_SIMULATION__TAKER_FEE": "0.0001",
    "KESTREL_SIMULATION__MAKER_FEE": "0.0001",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Archives of ours for three pairs over 6,000 minutes: one starts late, one ends early,
    one misses 1,600 minutes in the middle (longer than some runs' segments)."""
    root = tmp_path_factory.mktemp("segments") / "data"
    store = CandleStore(root, "bybit")
    for i, pair in enumerate(PAIRS):
        frame = minute_walk(6_000, 7 + i, sigma=0.002, wick=0.002)
        if i == 0:
            frame = pd.concat([frame.iloc[:2_000], frame.iloc[3_600:]])
        store.append(pair, "1m", frame.iloc[1_500:] if i == 1 else frame.iloc[: 4_700 + i])
    return root


def _run(
    monkeypatch: pytest.MonkeyPatch, data: Path, rows: int, env: dict[str, str], *args: str
) -> tuple[dict[str, Any], list[tuple[int, float]], int | None]:
    # The run's summary (timings aside), its equity curve and the segments it loaded (None:
    # the archive was read whole).
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(data))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(data.parent / "logs"))
    monkeypatch.setenv("KESTREL_STORAGE__REPLAY_SEGMENT_ROWS", str(rows))
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", ",".join(PAIRS))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parsed = cli_args(
        "--mode", "backtest", "--timeframe", "1m", "--strategy", "sma_cross",
        "--param", "fast=10", "--param", "slow=30", "--log-level", "ERROR", *args,
    )  # fmt: skip
    daemon = Daemon(parsed, main._apply_cli(load_settings(env_file=None), parsed))
    daemon.build_replay()
    feed = daemon.replay
    summary = asyncio.run(daemon.run()).to_dict()
    summary.pop("timings", None)
    assert daemon.engine is not None
    taken = feed.taken if isinstance(feed, SegmentedReplayFeed) else None
    return summary, list(daemon.engine.portfolio.equity_curve), taken


@pytest.mark.parametrize(
    ("rows", "env", "timerange", "windows"),
    [
        (700, {}, None, 9),  # the standard profile: breakers halt and resume across segments
        (1_111, TRADING_THROUGHOUT, None, 6),
        # To the range's end (minute 4,320), from the archives' start: the segment before
        # the range goes to the signals only.
        (2_500, TRADING_THROUGHOUT, "20240102-20240104", 2),
        # An anomaly watch reads every candle: the segments go through the pipeline one
        # candle at a time (the feed's candles, segment after segment).
        (1_500, {"KESTREL_ANOMALY__IN_REPLAY": "true"}, None, 4),
    ],
)
def test_a_segmented_backtest_is_the_whole_archives_run(
    monkeypatch: pytest.MonkeyPatch,
    data: Path,
    rows: int,
    env: dict[str, str],
    timerange: str | None,
    windows: int,
) -> None:
    """Segments cut on time (pairs starting and ending inside them, positions and trailing
    stops held across their edges) give the trades, fees, breakers and equity curve of the
    whole archive replayed at once."""
    extra = ("--timerange", timerange) if timerange else ()
    whole, whole_curve, one = _run(monkeypatch, data, 0, env, *extra)
    parts, parts_curve, taken = _run(monkeypatch, data, rows, env, *extra)
    assert one is None
    assert taken == windows
    assert whole["n_trades"] > 20
    assert parts == whole
    assert parts_curve == whole_curve


def test_an_archive_within_one_segment_is_read_whole(
    monkeypatch: pytest.MonkeyPatch, data: Path
) -> None:
    """Nothing to cut: the run holds the whole archive (one read, no segments)."""
    summary, _, taken = _run(monkeypatch, data, 6_000, {})
    assert taken is None
    assert summary["n_trades"] > 0
