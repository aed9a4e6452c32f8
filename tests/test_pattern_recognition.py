"""Pattern clusters learn which market states precede winning and losing trades.

The market is constructed: a random walk in which a wide bullish bar on heavy volume is
truly followed by a rise over the next five bars, and a wide bearish one by a fall. A
long-only strategy enters after both signatures and at random bars; each trade is held five
bars and pays fees, as a backtest's trades would.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from models import ClosedTrade, PositionSide
from pattern_recognition import (
    SCALE_WINDOW,
    PatternFilter,
    PatternModel,
    decision_bars,
    fit_patterns,
    pattern_features,
    wilson_interval,
)


HOUR = 3_600_000
HOLD = 5
FEE = 0.001
SIGNATURES = 80


def market(seed: int = 3, n: int = 4_000) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Return the candles and the bull and bear signature bars."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 0.01, n)
    slots = rng.choice(np.arange(700 // 12 + 1, (n - 20) // 12), 2 * SIGNATURES, replace=False)
    bull, bear = np.sort(slots[:SIGNATURES]) * 12, np.sort(slots[SIGNATURES:]) * 12
    r[bull], r[bear] = 0.045, -0.045
    for k in range(1, HOLD + 1):
        r[bull + k] = 0.006 + rng.normal(0, 0.003, len(bull))
        r[bear + k] = -0.006 + rng.normal(0, 0.003, len(bear))
    close = 100 * np.exp(np.cumsum(r))
    open_ = np.r_[100.0, close[:-1]]
    wick = np.abs(rng.normal(0, 0.003, (2, n)))
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])
    high[bull], low[bull] = close[bull], open_[bull]  # a marubozu: no wicks
    high[bear], low[bear] = open_[bear], close[bear]
    volume = rng.lognormal(3.0, 0.3, n)
    volume[np.r_[bull, bear]] *= 8
    index = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC")
    frame = pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index
    )
    return frame, bull, bear


def trades_after(frame: pd.DataFrame, bars: np.ndarray) -> list[ClosedTrade]:
    """Return long trades decided on each bar: in at the next open, out five closes later."""
    ts = frame.index.as_unit("ms").asi8
    out = []
    for bar in bars:
        entry = float(frame["open"].iloc[bar + 1])
        exit_ = float(frame["close"].iloc[bar + HOLD])
        fee = FEE * (entry + exit_)
        out.append(
            ClosedTrade(
                "X/USDT",
                PositionSide.LONG,
                int(ts[bar + 1]),
                int(ts[bar + HOLD] + HOUR),
                entry,
                exit_,
                1.0,
                fee,
                exit_ - entry - fee,
            )
        )
    return out


class Fitted(NamedTuple):
    """The constructed market, its signature bars, the trades and the model fitted on them."""

    frame: pd.DataFrame
    bull: np.ndarray
    bear: np.ndarray
    trades: list[ClosedTrade]
    model: PatternModel


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    """Return the market, its signatures and a model fitted on all the trades."""
    frame, bull, bear = market()
    rng = np.random.default_rng(11)
    signatures = set(np.r_[bull, bear].tolist())
    candidates = rng.choice(np.arange(700, len(frame) - 10), 600, replace=False)
    noise = np.array([b for b in candidates if not signatures & set(range(b - HOLD, b + HOLD + 1))])
    trades = trades_after(frame, np.r_[bull, bear, noise])
    model = fit_patterns(frame, trades, clusters=8, min_trades=15, seed=0)
    return Fitted(frame, bull, bear, trades, model)


def test_the_cluster_after_the_bullish_signature_wins_and_the_bearish_one_loses(
    fitted: Fitted,
) -> None:
    """Signature bars fall in clusters judged winning (bull) and losing (bear)."""
    frame, bull, bear, _, model = fitted
    labels = model.assign(pattern_features(frame, model.window))
    bull_verdicts = [model.stats[labels[b]].verdict for b in bull]
    bear_verdicts = [model.stats[labels[b]].verdict for b in bear]
    assert bull_verdicts.count("winning") >= 0.9 * len(bull)
    assert bear_verdicts.count("losing") >= 0.9 * len(bear)
    winning = [s for s in model.stats if s.verdict == "winning"]
    assert all(s.wilson_low > model.base_win_rate and s.mean_return > 0 for s in winning)
    losing = [s for s in model.stats if s.verdict == "losing"]
    assert all(s.wilson_high < model.base_win_rate and s.mean_return < 0 for s in losing)
    assert len(winning) == len(losing) == 1  # the noise trades make no verdict either way


def test_counts_and_intervals_are_consistent(
    fitted: Fitted,
) -> None:
    """Every trade is counted once; wins, win rate and Wilson interval agree; bars add up."""
    frame, _, _, trades, model = fitted
    assert sum(s.trades for s in model.stats) == len(trades)
    assert sum(s.wins for s in model.stats) == sum(t.pnl > 0 for t in trades)
    for s in model.stats:
        assert 0 <= s.wins <= s.trades
        if s.trades:
            assert s.win_rate == pytest.approx(s.wins / s.trades)
            assert s.wilson_low <= s.win_rate <= s.wilson_high
    valid = pattern_features(frame, model.window).notna().all(axis=1).sum()
    assert sum(s.bars for s in model.stats) == valid


def test_the_filter_refuses_entries_in_the_losing_cluster_only(
    fitted: Fitted, tmp_path: Path
) -> None:
    """Read back from JSON, the filter vetoes after a bearish signature, not after a bullish."""
    frame, bull, bear, _, model = fitted
    loaded = PatternModel.load(model.save(tmp_path / "patterns.json"))
    gate = PatternFilter(loaded)
    refused = [gate.veto_reason("X/USDT", frame.iloc[: b + 1]) for b in bear[:10]]
    allowed = [gate.veto_reason("X/USDT", frame.iloc[: b + 1]) for b in bull[:10]]
    assert sum(r is not None for r in refused) >= 9
    assert all("losing" in r for r in refused if r is not None)
    assert sum(a is None for a in allowed) >= 9
    assert gate.status()["X/USDT"]["verdict"] == "winning"


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_market_without_an_edge_judges_no_cluster_winning_or_losing(seed: int) -> None:
    """Random entries on a random walk: no cluster is judged better or worse than the rest."""
    frame, _, _ = market(seed=seed)
    frame = frame.assign(
        close=100 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.01, len(frame))))
    )
    frame = frame.assign(
        open=np.r_[100.0, frame["close"].to_numpy()[:-1]],
        high=lambda f: np.maximum(f["open"], f["close"]) * 1.002,
        low=lambda f: np.minimum(f["open"], f["close"]) * 0.998,
    )
    bars = np.random.default_rng(seed).choice(np.arange(700, len(frame) - 10), 600, replace=False)
    model = fit_patterns(frame, trades_after(frame, bars), clusters=6, min_trades=15, seed=0)
    assert {s.verdict for s in model.stats} <= {"neutral", "unknown"}


@pytest.mark.parametrize(
    ("wins", "n", "low", "high"),
    [(0, 0, 0.0, 1.0), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_matches_published_values(
    wins: int, n: int, low: float, high: float
) -> None:
    """The Wilson 95% interval agrees with worked textbook values."""
    assert wilson_interval(wins, n) == pytest.approx((low, high), abs=1e-4)


def test_a_trade_belongs_to_the_bar_closed_before_its_entry() -> None:
    """An entry at a bar's open was decided on the bar before it."""
    index = pd.date_range("2024-01-01", periods=5, freq="1h", tz="UTC")
    start = int(index[0].value // 1_000_000)
    entries = [start + HOUR, start + HOUR + 1, start + 4 * HOUR, start]
    assert decision_bars(index, entries).tolist() == [0, 0, 3, -1]


async def test_a_backtest_with_the_filter_refuses_entries_in_losing_clusters(
    fitted: Fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filter on with a model whose every cluster lost: no entry once the features are warm."""
    from tests.test_backtest_support import replay_in_process

    model = fitted.model
    doomed = PatternModel(
        model.columns,
        model.window,
        model.mean,
        model.scale,
        model.centres,
        tuple(replace(s, verdict="losing") for s in model.stats),
        model.base_win_rate,
        model.min_trades,
    )
    path = doomed.save(tmp_path / "doomed.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(tmp_path / "logs"))
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=5"]
    cli += ["--param", "slow=20", "--pairs", "BTC/USDT", "--timeframe", "1m"]
    free, _ = await replay_in_process(*cli)
    monkeypatch.setenv("KESTREL_STRATEGY__PATTERN_FILTER", "true")
    monkeypatch.setenv("KESTREL_STRATEGY__PATTERN_MODEL", str(path))
    filtered, _ = await replay_in_process(*cli)
    # The first bars have no complete feature window (no cluster, no verdict): entries
    # decided there pass; every later one is refused.
    warm = filtered["first_ts"] + (SCALE_WINDOW + model.window + 1) * 60_000
    late_free = [t for t in free["trades"] if t["entry_ts"] > warm]
    assert len(late_free) >= 10
    assert all(t["entry_ts"] <= warm for t in filtered["trades"])
    assert filtered["vetoes"] > free["vetoes"] + len(late_free) // 2


async def test_patterns_mode_backtests_fits_and_writes_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mode patterns` backtests, writes a loadable model and every cluster's record."""
    import main
    from config import load_settings
    from runner import run_patterns
    from tests.test_backtest_support import cli_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "out.json"
    args = cli_args(
        "--mode", "patterns", "--strategy", "sma_cross", "--param", "fast=5", "--param",
        "slow=20", "--pairs", "BTC/USDT", "--timeframe", "1m", "--summary-json", str(out),
    )  # fmt: skip
    assert await run_patterns(args, main._apply_cli(load_settings(env_file=None), args)) == 0
    summary = json.loads(out.read_text())
    entry = summary["models"]["BTC/USDT"]
    assert entry["trades"] == summary["n_trades"] > 0
    assert sum(c["trades"] for c in entry["clusters"]) == entry["clustered"]
    assert entry["trades"] - 5 <= entry["clustered"] <= entry["trades"]  # warm-up entries
    model = PatternModel.load(Path(entry["path"]))
    assert [s.trades for s in model.stats] == [c["trades"] for c in entry["clusters"]]


def test_why_shows_the_pattern_cluster_of_the_pair() -> None:
    """/why adds the pair's latest cluster record from the snapshot."""
    from decimal import Decimal

    from models import BotState, Decision, PortfolioSnapshot, Snapshot, TradingState
    from telegram_templates import render_why

    stats = {"summary": "cluster 3: 2/20 won (10%, 95% 3%-30%), mean -1.00% (losing)"}
    snap = Snapshot(
        ts=0,
        mode="sim",
        state=BotState.RUNNING,
        trading_state=TradingState.NORMAL,
        portfolio=PortfolioSnapshot(0, Decimal(1), Decimal(1)),
        last_decisions={"BTC/USDT": Decision("BTC/USDT", 0, None, "veto")},
        patterns={"BTC/USDT": stats},
    )
    assert "pattern cluster: cluster 3: 2/20 won" in render_why(snap, "BTC/USDT")
