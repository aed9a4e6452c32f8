"""The replay path under the standard risk profile, one pair and ten, against backtesting.py.

What a user runs is `python main.py --mode backtest`, the standard risk profile (stops that
trail, take-profits, breakers) by default: on one spot pair its default engine is the fast
path (bench_scale measures it), elsewhere the replay path, measured here (`--engine replay`).
Its bars per second are the candles over the run phase of the CLI's own summary
(`timings.run_s`), best of three whole processes; backtesting.py's are its `Backtest.run`
on the same seeded one-minute random walk (`bench_backtest.candles`), best of three, in its
own process. Ten pairs are compared
with backtesting.py on one pair of the same number of bars (it has no multi-pair runs).

The same replays are also run in-process with every candle through the whole pipeline
(the quiet stretches off), to show what the stretches save and that they change nothing:
the summaries (trades, equity, fees, breaker trips, ...) must be equal.

Rows: one pair at the bench fee (1 bp, where trades and working stops are frequent) and at
the CLI's default fee (10 bp, where the drawdown breaker flattens early and holds), and ten
pairs at the default fee. Each note says how much of the span a breaker held the account
flat: those candles are quiet and cheap. A replay that trades throughout (no breaker
halts) is in bench_scale, where it runs below backtesting.py's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_backtest import candles
from benchmarks.bench_scale import PAIRS10, ROOT, _halted_share, _ours, _peer_run
from benchmarks.common import bench_size


REPEAT = 3
LOW_FEE = {"KESTREL_SIMULATION__TAKER_FEE": "0.0001", "KESTREL_SIMULATION__MAKER_FEE": "0.0001"}

# One in-process replay, as runner wires it or with every candle through the pipeline.
_IN_PROCESS = """
import asyncio, json, sys, time
sys.path.insert(0, {root!r})
import main
from config import load_settings
from runner import Daemon
from utils.utilities import setup_logging
args = main.build_parser().parse_args({argv!r})
settings = main._apply_cli(load_settings(env_file=None), args)
setup_logging(settings.storage.log_dir, level="ERROR", cache_loggers=True)
async def go():
    daemon = Daemon(args, settings)
    daemon.build_replay()
    if {full!r}:
        daemon.driver._quiet = None
    started = time.perf_counter()
    summary = (await daemon.run()).to_dict()
    return time.perf_counter() - started, summary
seconds, summary = asyncio.run(go())
summary.pop("timings", None)
print("RESULT " + json.dumps({{"run_s": seconds, "summary": summary}}, default=str))
"""


def _argv(data: Path | None) -> list[str]:
    pairs = ["--data", str(data), "--pairs", "BTC/USDT"] if data is not None else []
    return [
        "--mode", "backtest", *pairs, "--timeframe", "1m", "--strategy", "sma_cross",
        "--param", "fast=10", "--param", "slow=30", "--no-ui",
    ]  # fmt: skip


def _in_process(data: Path | None, env: dict[str, str], *, full: bool) -> dict[str, Any]:
    script = _IN_PROCESS.format(root=str(ROOT), argv=_argv(data), full=full)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def _cli_run_s(data: Path | None, tmp: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    # Best of REPEAT whole CLI processes: the summary's own run phase.
    best, summary = float("inf"), {}
    for _ in range(REPEAT):
        measured = _ours(data if data is not None else tmp / "none", tmp, env=env, engine="replay")
        run_s = float(measured["summary"]["timings"]["run_s"])
        if run_s < best:
            best, summary = run_s, measured["summary"]
    return best, summary


def _rows(
    label: str, bars: int, data: Path | None, peer_data: Path, tmp: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    ours_s, summary = _cli_run_s(data, tmp, env)
    peer_s = min(_peer_run(peer_data)[0] for _ in range(REPEAT))
    wired = _in_process(data, env, full=False)
    full = _in_process(data, env, full=True)
    same = wired["summary"] == full["summary"]
    ours, peer = bars / ours_s, bars / peer_s
    return [
        {
            "name": f"replay path, standard profile, {label}: bars per second",
            "ours": ours,
            "unit": "bars/s",
            "peer": "backtesting.py per-bar loop"
            + (f" (1 pair, {bars:,} bars)" if data is None else ""),
            "peer_value": peer,
            "ratio": peer / ours,
            "note": f"ours / peer = {ours / peer:.2f} (target >= 2); best of {REPEAT} CLI "
            f"runs (summary run phase) and {REPEAT} peer runs; {summary['n_trades']} trades, "
            f"{len(summary.get('breaker_trips', []))} breaker trips, halted by a breaker "
            f"{_halted_share(summary):.0%} of the span (a halted span is quiet: no decisions)",
        },
        {
            "name": f"replay path, standard profile, {label}: every candle through the pipeline",
            "ours": bars / full["run_s"],
            "unit": "bars/s",
            "peer": "as wired (quiet stretches), in-process",
            "peer_value": bars / wired["run_s"],
            "ratio": full["run_s"] / wired["run_s"],
            "note": f"ratio = stretches' speed-up; same summary (trades, equity, fees, "
            f"breakers): {'yes' if same else 'NO'}",
        },
    ]


def run() -> list[dict[str, Any]]:
    """Measure the standard-profile replay path's bars per second against backtesting.py."""
    one = bench_size(default=1_000_000, small=300_000)
    per_pair = one // 10
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = tmp / "one.parquet"
        candles(one).to_parquet(data)
        rows = _rows(f"1 pair, {one:,} candles, fee 1 bp", one, data, data, tmp, LOW_FEE)
        rows += _rows(f"1 pair, {one:,} candles, default fee", one, data, data, tmp, {})
        from candle_store import CandleStore

        store = CandleStore(tmp / "data", "bybit")
        for i, pair in enumerate(PAIRS10):
            store.append(pair, "1m", candles(per_pair, seed=100 + i))
        env = {
            "KESTREL_STORAGE__DATA_DIR": str(tmp / "data"),
            "KESTREL_STRATEGY__PAIRS": ",".join(PAIRS10),
        }
        label = f"10 pairs x {per_pair:,} candles, default fee"
        rows += _rows(label, 10 * per_pair, None, data, tmp, env)
    return rows
