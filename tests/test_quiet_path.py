"""The backtest's quiet-candle short path changes nothing: same trades, same equity curve."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from config import load_settings
from runner import Daemon
from tests.test_backtest_support import cli_args


def _args(strategy: str) -> argparse.Namespace:
    return cli_args("--mode", "backtest", "--strategy", strategy, "--log-level", "WARNING")  # type: ignore[no-any-return]


@pytest.mark.parametrize("strategy", ["sma_cross", "ema_cross", "rsi_bb", "breakout"])
async def test_quiet_path_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Quiet stretches in one call, quiet candles one by one, or every candle through the
    whole pipeline: the backtest's trades and equity curve are equal."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    monkeypatch.setenv("KESTREL_STRATEGY__NAME", strategy)
    results = []
    for variant in ("runs", "per_candle", "full"):
        daemon = Daemon(_args(strategy), load_settings(env_file=None))
        daemon.build_replay()
        engine, driver = daemon.engine, daemon.driver
        assert engine is not None
        assert driver is not None
        assert driver._quiet is not None  # wired for all_in backtests
        assert driver.quiet_runs  # and one-pair replays take quiet stretches at once
        if variant != "runs":
            driver.quiet_runs = False
        if variant == "full":
            driver._quiet = None
        applied: list[int] = []

        def counted(
            last: Any,
            close_ts: list[int],
            closes: list[float],
            apply: Any = driver.on_quiet_run,
            applied: list[int] = applied,
        ) -> None:
            applied.append(len(close_ts))
            apply(last, close_ts, closes)

        driver.on_quiet_run = counted  # type: ignore[method-assign]
        summary = (await daemon.run()).to_dict()
        # Only the "runs" variant applies stretches, several candles at a time.
        assert (max(applied, default=0) > 1) is (variant == "runs")
        results.append((summary, list(engine.portfolio.equity_curve), engine.executor.orders))
    runs, per_candle, full = results
    assert runs[0]["n_trades"] > 0
    for result in (runs, per_candle):
        assert result[0] == full[0]  # summary: trades, equity, candles, ...
        assert result[1] == full[1]  # the equity curve, point for point
        assert list(result[2]) == list(full[2])  # the same orders, in the same order
    assert len(full[1]) == full[0]["candles"]


def test_quiet_path_is_refused_outside_all_in() -> None:
    """Under the standard risk profile (stops, breakers) the short path is not wired."""
    daemon = Daemon(_args("sma_cross"), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.driver is not None
    assert daemon.driver._quiet is None


@pytest.mark.parametrize("strategy", ["sma_cross", "rsi_bb"])
async def test_flag_mask_agrees_with_the_per_candle_lookup(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """flag_mask marks exactly the candles has_flags reports, unknown times as unflagged."""
    import numpy as np

    from models import Candle

    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    daemon = Daemon(_args(strategy), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.driver is not None
    assert daemon.replay is not None
    signals = daemon.driver._quiet
    assert signals is not None
    single = daemon.replay.single_pair()
    assert single is not None
    pair, ts, _ = single
    probe = np.concatenate([ts, ts[:5] + 1, [ts[-1] + 10**9]])  # plus times with no candle
    mask = signals.flag_mask(pair, probe)
    expected = [signals.has_flags(Candle(pair, "1m", int(t), 1, 1, 1, 1, 1)) for t in probe]
    assert mask.tolist() == expected
    assert 0 < mask.sum() < len(ts)


async def test_a_timerange_replay_in_runs_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stretches follow the --timerange slice: same candles, trades and curve."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    results = []
    for runs in (True, False):
        args = _args("sma_cross")
        daemon = Daemon(args, load_settings(env_file=None))
        daemon.build_replay()
        assert daemon.replay is not None
        single = daemon.replay.single_pair()
        assert single is not None
        ts = single[1]
        args.timerange = f"{int(ts[len(ts) // 4])}-{int(ts[3 * len(ts) // 4])}"  # epoch ms
        daemon = Daemon(args, load_settings(env_file=None))
        daemon.build_replay()
        assert daemon.engine is not None
        assert daemon.driver is not None
        daemon.driver.quiet_runs = runs
        summary = (await daemon.run()).to_dict()
        results.append((summary, list(daemon.engine.portfolio.equity_curve)))
    assert results[0] == results[1]
    assert results[0][0]["candles"] < len(ts) * 0.6
