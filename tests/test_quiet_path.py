"""The backtest's quiet-candle short path changes nothing: same trades, same equity curve."""

from __future__ import annotations

import argparse

import pytest

from config import load_settings
from runner import Daemon


def _args(strategy: str) -> argparse.Namespace:
    return argparse.Namespace(
        mode="backtest",
        feed=None,
        data=None,
        pairs=None,
        timeframe=None,
        strategy=strategy,
        param=[],
        timerange=None,
        since=None,
        duration=None,
        speed=None,
        no_ui=True,
        summary_json=None,
        print_config=False,
        log_level="WARNING",
        env_file=None,
        engine="replay",
        report_html=None,
    )


@pytest.mark.parametrize("strategy", ["sma_cross", "ema_cross", "rsi_bb", "breakout"])
async def test_quiet_path_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """With and without the short path, the backtest's trades and equity curve are equal."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    monkeypatch.setenv("KESTREL_STRATEGY__NAME", strategy)
    results = []
    for quiet in (True, False):
        daemon = Daemon(_args(strategy), load_settings(env_file=None))
        daemon.build_replay()
        assert daemon.engine is not None
        assert daemon.engine._quiet is not None  # wired for all_in backtests
        if not quiet:
            daemon.engine._quiet = None
        summary = await daemon.run()
        results.append((summary, list(daemon.engine.portfolio.equity_curve)))
    (quiet_summary, quiet_curve), (full_summary, full_curve) = results
    assert quiet_summary == full_summary
    assert quiet_curve == full_curve
    assert len(full_curve) == full_summary["candles"]


def test_quiet_path_is_refused_outside_all_in() -> None:
    """Under the standard risk profile (stops, breakers) the short path is not wired."""
    daemon = Daemon(_args("sma_cross"), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.engine is not None
    assert daemon.engine._quiet is None
