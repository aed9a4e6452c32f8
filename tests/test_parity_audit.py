"""`--mode parity`: recorded decisions and fills against a backtest of the same candles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from parity import compare
from tests.conftest import ROOT


def _main(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
        check=False,
    )


def test_sim_then_parity_matches_and_a_tampered_log_does_not(tmp_path: Path) -> None:
    """A sim run's audit replays to identical decisions; a missing decision is reported."""
    env = {"KESTREL_STRATEGY__NAME": "sma_cross"}
    assert _main("--mode", "sim", "--feed", "replay", "--no-ui", env=env).returncode == 0
    report_path = tmp_path / "parity.json"
    result = _main("--mode", "parity", "--no-ui", "--summary-json", str(report_path), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    assert summary["ok"] is True
    assert (
        summary["decisions_live"]
        == summary["decisions_backtest"]
        == summary["decisions_matched"]
        > 0
    )
    assert summary["fills_matched"] > 0
    assert abs(summary["slippage_bps_mean"]) < 1e-6

    audit = tmp_path / "logs" / "audit.jsonl"
    lines = audit.read_text().splitlines()
    approved = [i for i, line in enumerate(lines) if '"kind":"risk_approved"' in line]
    dropped = json.loads(lines[approved[1]])
    del lines[approved[1]]
    audit.write_text("\n".join(lines) + "\n")
    result = _main("--mode", "parity", "--no-ui", "--summary-json", str(report_path), env=env)
    assert result.returncode == 1
    diffs = json.loads(report_path.read_text())["decision_diffs"]
    assert [(d["pair"], d["candle_ts"], d["live"]) for d in diffs] == [
        (dropped["pair"], dropped["candle_ts"], None)
    ]


def test_slippage_and_latency_are_attributed() -> None:
    """A live buy filled 10 bps worse and 250 ms later shows +10 bps and 250 ms."""
    decision = {
        "kind": "risk_approved",
        "pair": "X/USDT",
        "candle_ts": 0,
        "side": "buy",
        "client_order_id": "c1",
        "ts": 60_000,
    }
    live = [
        decision,
        {
            "kind": "fill",
            "client_order_id": "c1",
            "pair": "X/USDT",
            "side": "buy",
            "price": "100.1",
            "qty": "1",
            "ts": 60_250,
        },
    ]
    backtest = [
        decision,
        {
            "kind": "fill",
            "client_order_id": "c1",
            "pair": "X/USDT",
            "side": "buy",
            "price": "100",
            "qty": "1",
            "ts": 60_000,
        },
    ]
    report = compare(live, backtest)
    assert report.ok
    (fill,) = report.fill_diffs
    assert round(fill.slippage_bps, 6) == 10.0
    assert fill.live_latency_ms == 250
    assert fill.backtest_latency_ms == 0
