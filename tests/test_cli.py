"""The command line as a user runs it: real subprocesses of main.py."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SAMPLE


MAIN = str(ROOT / "main.py")


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run main.py with args in the test's cwd (tmp_path)."""
    return subprocess.run(
        [sys.executable, MAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_help_lists_modes() -> None:
    """--help exits 0 and names every mode."""
    result = run("--help")
    assert result.returncode == 0
    for mode in ("sim", "live", "backtest", "optimize", "backfill", "train", "pairs"):
        assert mode in result.stdout


def test_help_does_not_import_heavy_libraries() -> None:
    """--help imports neither TensorFlow, pandas, ccxt nor TA-Lib (start-up stays fast)."""
    code = (
        "import sys, runpy; sys.argv=['main.py','--help']\n"
        f"try:\n    runpy.run_path({MAIN!r}, run_name='__main__')\n"
        "except SystemExit: pass\n"
        "heavy = ('tensorflow', 'pandas', 'ccxt', 'talib', 'numba')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_mode_exits_2() -> None:
    """An unknown mode is a usage error."""
    result = run("--mode", "moon")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KESTREL_RISK__MAX_DAILY_LOSS": "lots"}, "KESTREL_RISK__MAX_DAILY_LOSS"),
        ({"KESTREL_SIMULATION__STARTING_BALANCE": "-5"}, "KESTREL_SIMULATION__STARTING_BALANCE"),
        ({"KESTREL_TELEGRAM__CHAT_IDS": "[1,"}, "KESTREL_TELEGRAM__CHAT_IDS"),
    ],
)
def test_malformed_env_exits_2_naming_the_variable(env: dict[str, str], named: str) -> None:
    """Invalid settings exit 2 with a message naming each bad variable."""
    result = run("--mode", "sim", "--feed", "replay", "--no-ui", env=env)
    assert result.returncode == 2
    assert named in result.stderr


def test_missing_data_file_exits_2(tmp_path: Path) -> None:
    """--data pointing nowhere is a clear error, exit 2."""
    result = run(
        "--mode", "sim", "--feed", "replay", "--no-ui", "--data", str(tmp_path / "nope.csv")
    )
    assert result.returncode == 2
    assert "not found" in result.stderr


@pytest.mark.parametrize(
    "content",
    [
        b"\x1f\x8b\x08garbage-not-gzip",
        b"hello,world\n1,2\n",
        b"timestamp,open,high,low,close,volume\n",
    ],
    ids=["corrupt-gzip", "wrong-header", "no-rows"],
)
def test_corrupt_data_file_exits_2(tmp_path: Path, content: bytes) -> None:
    """A corrupt, foreign or empty data file is a clear error, exit 2."""
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(content if content.startswith(b"\x1f\x8b") else gzip.compress(content))
    result = run("--mode", "sim", "--feed", "replay", "--no-ui", "--data", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr


def test_live_without_keys_exits_2_naming_env_vars() -> None:
    """--mode live needs keys and says which variables to set."""
    result = run("--mode", "live", "--no-ui")
    assert result.returncode == 2
    assert "KESTREL_EXCHANGE__API_KEY" in result.stderr
    assert "KESTREL_EXCHANGE__API_SECRET" in result.stderr


def test_print_config_masks_secrets() -> None:
    """--print-config shows settings with secrets replaced by ***."""
    result = run(
        "--print-config",
        env={
            "KESTREL_EXCHANGE__API_KEY": "live-key-123",
            "KESTREL_EXCHANGE__API_SECRET": "zzz-secret-999",
        },
    )
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["exchange"]["api_secret"] == "***"
    assert "zzz-secret-999" not in result.stdout + result.stderr
    assert "live-key-123" not in result.stdout + result.stderr


def _summary(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / name
    result = run(
        "--mode",
        "sim",
        "--feed",
        "replay",
        "--no-ui",
        "--duration",
        "60",
        "--summary-json",
        str(out),
        *extra,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def test_sim_replay_trades_and_writes_summary(tmp_path: Path) -> None:
    """The walking skeleton trades the bundled sample and reports every trade."""
    summary = _summary(tmp_path, "one.json")
    assert summary["mode"] == "sim"
    assert summary["candles"] == 1440
    assert summary["n_trades"] >= 1
    for key in ("final_equity", "total_return", "max_drawdown", "fees", "trades"):
        assert key in summary
    trade = summary["trades"][0]
    assert set(trade) >= {
        "pair",
        "side",
        "entry_ts",
        "exit_ts",
        "entry_price",
        "exit_price",
        "qty",
        "fee",
        "pnl",
    }
    assert trade["entry_ts"] < trade["exit_ts"]
    assert 1_670_889_600_000 <= trade["entry_ts"] < 1_670_976_000_000  # 2022-12-13, ms UTC
    total_pnl = sum(t["pnl"] for t in summary["trades"])
    open_value = sum(
        p["qty"] * (p["mark_price"] - p["entry_price"]) for p in summary["open_positions"]
    )
    assert summary["final_equity"] == pytest.approx(
        10_000 + total_pnl + open_value, rel=1e-6, abs=1e-3
    )


def test_replays_are_deterministic(tmp_path: Path) -> None:
    """Two replays of the sample give byte-identical summaries."""
    first = _summary(tmp_path, "a.json")
    second = _summary(tmp_path, "b.json")
    assert first == second
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_data_flag_replays_a_given_file(tmp_path: Path) -> None:
    """--data replays another CSV in the same format."""
    summary = _summary(
        tmp_path,
        "d.json",
        "--data",
        str(SAMPLE / "binance_BTC-BUSD_1m.csv.gz"),
        "--pairs",
        "BTC/BUSD",
    )
    assert summary["candles"] == 1440
    assert summary["pairs"] == ["BTC/BUSD"]


def test_sigterm_stops_gracefully_within_5s(tmp_path: Path) -> None:
    """SIGTERM to a running daemon exits 0 within 5 s, with state flushed to disk."""
    proc = subprocess.Popen(
        [
            sys.executable,
            MAIN,
            "--mode",
            "sim",
            "--feed",
            "replay",
            "--no-ui",
            "--speed",
            "40",
            "--summary-json",
            str(tmp_path / "s.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            if "daemon_started" in line or time.monotonic() > deadline:
                break
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reap it and close both pipes
    assert proc.returncode == 0
    assert elapsed < 5.0
    state = json.loads((tmp_path / "data" / "state" / "sim.json").read_text())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0 < state["candles"] < 1440  # stopped mid-replay
    assert state["candles"] == summary["candles"]


def test_backtest_fast_engine_equals_replay_and_writes_a_report(tmp_path: Path) -> None:
    """--engine fast gives the replay's trades; --report-html writes a self-contained page."""
    env = {"KESTREL_RISK__PROFILE": "all_in"}
    common = [
        "--mode",
        "backtest",
        "--strategy",
        "sma_cross",
        "--param",
        "fast=10",
        "--param",
        "slow=30",
        "--no-ui",
    ]
    replay = run(
        *common,
        "--engine",
        "replay",
        "--summary-json",
        str(tmp_path / "r.json"),
        "--report-html",
        str(tmp_path / "r.html"),
        env=env,
    )
    fast = run(*common, "--engine", "fast", "--summary-json", str(tmp_path / "f.json"), env=env)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert fast.returncode == 0, fast.stderr[-2000:]
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("r.json", "f.json"))
    assert a["n_trades"] == b["n_trades"] > 0
    assert a["trades"] == b["trades"]
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html
    assert "Monte Carlo" in html
    assert "<script src" not in html  # self-contained: no external resources
    assert "Sharpe" in replay.stdout
    # Where the seconds went: every phase measured, none longer than the whole.
    phases = {"load_s", "prepare_s", "run_s", "monte_carlo_s", "report_s"}
    assert set(a["timings"]) == phases | {"total_s"}
    assert all(0 <= a["timings"][p] <= a["timings"]["total_s"] for p in phases)
    assert sum(a["timings"][p] for p in phases) <= a["timings"]["total_s"] + 1e-3
    assert {"load_s", "run_s", "total_s"} <= set(b["timings"])


def test_fast_engine_refuses_what_it_cannot_model(tmp_path: Path) -> None:
    """--engine fast with a latency of a candle exits 2, says why and writes no summary."""
    out = tmp_path / "out.json"
    result = run(
        "--mode", "backtest", "--engine", "fast", "--no-ui", "--summary-json", str(out),
        env={"KESTREL_SIMULATION__LATENCY_MS": "3600000"},  # the sample's 1h candles
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        "--engine fast cannot run this backtest: latency 3600000 ms is a candle or more"
        in result.stderr
    )
    assert not out.exists()


def test_backtest_trades_the_point_in_time_pair_list(tmp_path: Path) -> None:
    """With dynamic pairs, every entry is on a pair that was in the top list at that time."""
    from data_manager import load_candles
    from top_pairs import PointInTimeRanking

    alts = ["ADA", "DASH", "ETC", "ETH", "LTC", "NXT", "TRX", "XLM", "XMR", "ZEC"]
    pairs = [f"{a}/BTC" for a in alts]
    env = {
        "KESTREL_PAIRS__DYNAMIC": "true",
        "KESTREL_PAIRS__COUNT": "3",
        "KESTREL_PAIRS__MIN_QUOTE_VOLUME": "0",
        "KESTREL_PAIRS__TTL_S": "14400",
    }
    out = tmp_path / "dyn.json"
    result = run(
        "--mode",
        "backtest",
        "--timeframe",
        "5m",
        "--pairs",
        ",".join(pairs),
        "--strategy",
        "sma_cross",
        "--no-ui",
        "--summary-json",
        str(out),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    frames = {p: load_candles(SAMPLE / f"bittrex_{p.split('/')[0]}-BTC_5m.csv.gz") for p in pairs}
    ranking = PointInTimeRanking(
        frames, "5m", refresh_every=14_400_000, top_n=3, lookback=86_400_000
    )
    traded = {t["pair"] for t in summary["trades"]}
    assert summary["n_trades"] > 0
    assert 0 < len(traded) < len(pairs)  # the list moved, and some pairs never made it
    for trade in summary["trades"]:
        # The entry fills at the open after the signal candle closed, i.e. at entry_ts.
        assert trade["pair"] in ranking.pairs_at(trade["entry_ts"]), trade
