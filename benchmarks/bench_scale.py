"""Backtests at scale: peak memory and start-to-summary time of the CLI, against backtesting.py.

What a user runs is `python main.py --mode backtest` (the standard risk profile by default),
so that is what is measured: a whole process per run, from start to summary, its peak
resident set read from the kernel (`ru_maxrss` of the child), on the seeded one-minute random
walk of `bench_backtest` with sma_cross 10/30. Its default engine (`--engine auto`) takes the
fast path where it stands in for the replay (spot pairs under the standard profile, long
archives a segment at a time as the replay reads them: the same summary,
tests/test_fast_standard.py and tests/test_fast_segments.py), else the replay
(the live code path); the replay's own figures are measured with `--engine replay` beside
it. backtesting.py runs the same strategy in its own fresh process, at the sizes it can handle.

Rows:
* one pair at 100k, 1M and 10M candles (KESTREL_BENCH_SIZE=small: 100k and 300k;
  KESTREL_BENCH_SCALE_SIZES=100000,1000000 names them): wall time,
  peak RSS, and the RSS growth per candle between the smallest and largest size (target
  under 100 bytes a candle), with the summary's own timings (where the seconds went);
* ten pairs of 100k candles each through the archive path (1M candles in all), the default
  engine (the fast path over several pairs) and the replay, against backtesting.py's loop
  on one pair of as many bars;
* ten pairs of 1.2M candles each, archives longer than `storage.replay_segment_rows`
  (not at KESTREL_BENCH_SIZE=small): the default engine against `--engine replay`, both
  reading them a time segment at a time, start to summary and peak RSS, the summaries
  compared;
* bars per second of the run (the signals included) against backtesting.py's per-bar loop
  on the same candles (target at least 2x), the default engine's and the replay's.
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


ROOT = Path(__file__).resolve().parent.parent
PAIRS10 = [f"C{i}/USDT" for i in range(10)]

# Runs a command and prints the child's peak RSS (KiB) and wall seconds as JSON.
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "wall": wall, "rss_kib": rss, "err": done.stderr[-800:]}))
"""

_PEER = """
import sys, time
import pandas as pd
sys.path.insert(0, {root!r})
from benchmarks.bench_backtest import backtesting_py
df = pd.read_parquet({path!r})
started = time.perf_counter()
stats = backtesting_py(df, trailing={trailing!r})
print("RUN", time.perf_counter() - started, int(stats["# Trades"]))
"""


def _measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd} failed: {result['err']}")
    return result


def _ours(
    data: Path, tmp: Path, *, env: dict[str, str] | None = None, engine: str = "auto"
) -> dict[str, Any]:
    summary = tmp / "summary.json"
    args = ["--data", str(data), "--pairs", "BTC/USDT"] if data.is_file() else []
    args += ["--engine", engine]
    measured = _measure(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--mode",
            "backtest",
            *args,
            "--timeframe",
            "1m",
            "--strategy",
            "sma_cross",
            "--param",
            "fast=10",
            "--param",
            "slow=30",
            "--no-ui",
            "--log-level",
            "ERROR",
            "--summary-json",
            str(summary),
        ],
        env,
    )
    measured["summary"] = json.loads(summary.read_text())
    return measured


def _peer(data: Path) -> dict[str, Any]:
    script = _PEER.format(root=str(ROOT), path=str(data), trailing=None)
    return _measure([sys.executable, "-c", script])


def _stop_rule() -> tuple[int, float]:
    # The standard risk profile's stop: its ATR period and multiple (the settings' defaults).
    from config import RiskSettings

    fields = RiskSettings.model_fields
    return fields["atr_period"].default, fields["stop_atr_multiple"].default


def _peer_run(data: Path, *, trailing: bool = False) -> tuple[float, int]:
    # backtesting.py's run phase (seconds) and its trades; `trailing`: with an ATR stop
    # trailing on every bar as the standard profile's does (`backtesting_py`'s `trailing`).
    rule = _stop_rule() if trailing else None
    out = subprocess.run(
        [sys.executable, "-c", _PEER.format(root=str(ROOT), path=str(data), trailing=rule)],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RUN"))
    return float(line.split()[1]), int(line.split()[2])


def _sizes() -> list[int]:
    # KESTREL_BENCH_SCALE_SIZES=100000,1000000 picks the one-pair sizes (smallest and
    # largest give the growth per candle); otherwise KESTREL_BENCH_SIZE decides.
    chosen = os.environ.get("KESTREL_BENCH_SCALE_SIZES", "")
    if chosen:
        return sorted(int(x) for x in chosen.split(","))
    raw = os.environ.get("KESTREL_BENCH_SIZE", "")
    if raw == "small" or raw.isdigit():
        return [100_000, 300_000]
    return [100_000, 1_000_000, 10_000_000]


def _row(
    name: str, ours: float, unit: str, peer: str, peer_value: float | None, note: str
) -> dict[str, Any]:
    ratio = peer_value / ours if peer_value and ours else None
    return {
        "name": name,
        "ours": ours,
        "unit": unit,
        "peer": peer,
        "peer_value": peer_value,
        "ratio": ratio,
        "note": note,
    }


TRADING_THROUGHOUT = {
    "KESTREL_RISK__MAX_DRAWDOWN": "0.99",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.98",
    "KESTREL_SIMULATION__TAKER_FEE": "0.0001",
    "KESTREL_SIMULATION__MAKER_FEE": "0.0001",
}


def _halted_share(summary: dict[str, Any]) -> float:
    # The share of the span the account spent flattened by a breaker (no decisions).
    spans = summary.get("trading_spans") or []
    halted = sum(s["duration_ms"] for s in spans if s["state"] == "flatten")
    first, last = summary.get("first_ts"), summary.get("last_ts")
    return halted / (last - first) if first is not None and last and last > first else 0.0


def _engine(summary: dict[str, Any]) -> str:
    # Which engine ran: the replay's own phase (its signals, `prepare_s`) names it.
    return "replay" if "prepare_s" in summary["timings"] else "fast path"


def _bars_row(label: str, n: int, summary: dict[str, Any], peer_bps: float) -> dict[str, Any]:
    t = summary["timings"]
    engine = _engine(summary)
    return _row(
        f"{'replay path' if engine == 'replay' else 'CLI default engine'}, 1 pair, {label}:"
        " bars per second",
        n / (t["run_s"] + t.get("prepare_s", 0.0)),
        "bars/s",
        "backtesting.py per-bar loop",
        peer_bps,
        f"standard profile (ATR stops trailing while a position is held); ran on the {engine};"
        f" {summary['n_trades']:,} trades; halted by a breaker {_halted_share(summary):.0%} of"
        " the span; ours = candles / (signals + run); ratio < 1 means we are faster; target 2x",
    )


def _one_pair_rows(tmp: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rss: dict[int, float] = {}
    from candle_store import CandleStore

    for n in _sizes():
        data = tmp / f"rw_{n}.parquet"
        frame = candles(n)
        frame.to_parquet(data)  # backtesting.py's
        # Ours reads the same candles from an archive of ours (what `--mode backfill`
        # writes), which a long run replays a segment at a time (storage.replay_segment_rows).
        store = CandleStore(tmp / f"store_{n}", "bybit")
        store.append("BTC/USDT", "1m", frame)
        del frame
        ours = _ours(store.path("BTC/USDT", "1m"), tmp)
        # backtesting.py keeps per-bar Python objects: past a few million bars it takes
        # longer than the whole benchmark; it is run where it finishes.
        peer = _peer(data) if n <= 1_000_000 else None
        rss[n] = ours["rss_kib"] * 1024
        t = ours["summary"]["timings"]
        # Where the seconds go: start-up (interpreter, imports, settings) is the wall time
        # the summary's own timings do not cover.
        phases = ", ".join(
            [f"start-up {ours['wall'] - t['total_s']:.2f}"]
            + [f"{k.removesuffix('_s')} {v:.2f}" for k, v in t.items() if k != "total_s"]
        )
        rows.append(
            _row(
                f"CLI backtest, 1 pair, {n:,} candles: start to summary",
                ours["wall"],
                "s",
                "backtesting.py (same process measure)" if peer else "-",
                peer["wall"] if peer else None,
                f"standard risk profile, ran on the {_engine(ours['summary'])}; in-run seconds:"
                f" {phases}",
            )
        )
        rows.append(
            _row(
                f"CLI backtest, 1 pair, {n:,} candles: peak RSS",
                ours["rss_kib"] / 1024,
                "MiB",
                "backtesting.py" if peer else "-",
                peer["rss_kib"] / 1024 if peer else None,
                "whole process, imports included",
            )
        )
        if n <= 1_000_000:
            peer_run, _ = _peer_run(data)
            rows.append(_bars_row(f"{n:,} candles", n, ours["summary"], n / peer_run))
            if n == max(x for x in _sizes() if x <= 1_000_000):
                # The same candles with the account trading to the end: at the default fee
                # the 15% drawdown breaker halts it early (manual resume), and a halted
                # account's candles are nearly free.
                label = f"{n:,} candles, trading throughout (1 bp fee, drawdown limit 99%)"
                trailing_run, trailing_trades = _peer_run(data, trailing=True)
                for engine in ("auto", "replay"):
                    trading = _ours(data, tmp, env=TRADING_THROUGHOUT, engine=engine)
                    rows.append(_bars_row(label, n, trading["summary"], n / peer_run))
                    # The same job on both sides: backtesting.py's peer above never moves
                    # a stop; this one trails an ATR stop on every bar, as ours does.
                    row = _bars_row(label, n, trading["summary"], n / trailing_run)
                    row["name"] = row["name"].replace(
                        "bars per second", "bars per second, against a trailing stop"
                    )
                    row["peer"] = (
                        "backtesting.py per-bar loop, ATR stop trailing (TrailingStrategy)"
                    )
                    period, multiple = _stop_rule()
                    row["note"] += (
                        f"; the peer's stop trails ATR({period}) x {multiple:g} behind each"
                        f" close (backtesting.lib.TrailingStrategy): {trailing_trades:,} trades"
                    )
                    rows.append(row)
    small, large = min(rss), max(rss)
    growth = (rss[large] - rss[small]) / (large - small)
    rows.append(
        _row(
            f"RSS growth per candle, {small:,} -> {large:,}",
            growth,
            "bytes/candle",
            "-",
            None,
            "target < 100; a run longer than storage.replay_segment_rows (1,048,576 candles)"
            " holds one segment of its archive at a time: what grows is the equity curve",
        )
    )
    return rows


def _ten_archives(data: Path, n: int) -> dict[str, str]:
    # Ten archives of ours of `n` one-minute candles in `data`; the settings that trade them.
    from candle_store import CandleStore

    store = CandleStore(data, "bybit")
    for i, pair in enumerate(PAIRS10):
        store.append(pair, "1m", candles(n, seed=100 + i))
    return {"KESTREL_STORAGE__DATA_DIR": str(data), "KESTREL_STRATEGY__PAIRS": ",".join(PAIRS10)}


def _ten_pair_rows(tmp: Path) -> list[dict[str, Any]]:

    n = 100_000 if not os.environ.get("KESTREL_BENCH_SIZE") else 30_000
    env = _ten_archives(tmp / "data", n)
    # backtesting.py has no multi-pair runs: its per-bar loop on one pair of as many bars.
    peer_data = tmp / f"rw_{10 * n}.parquet"
    if not peer_data.exists():
        candles(10 * n).to_parquet(peer_data)
    peer_run, _ = _peer_run(peer_data)
    rows = []
    runs: list[tuple[str, dict[str, str], str]] = [
        ("", {}, "auto"),
        (", trading throughout", TRADING_THROUGHOUT, "auto"),
        (", trading throughout", TRADING_THROUGHOUT, "replay"),
    ]
    for label, extra, engine in runs:
        ours = _ours(tmp / "none", tmp, env=env | extra, engine=engine)
        summary = ours["summary"]
        t = summary["timings"]
        rate = 10 * n / (t["run_s"] + t.get("prepare_s", 0.0))
        rows.append(
            _row(
                f"CLI backtest, 10 pairs x {n:,} candles{label}, --engine {engine}:"
                " candles per second",
                rate,
                "bars/s",
                "backtesting.py per-bar loop, one pair of as many bars",
                10 * n / peer_run,
                f"ran on the {_engine(summary)}; start to summary {ours['wall']:.2f} s; peak RSS"
                f" {ours['rss_kib'] / 1024:.0f} MiB; {summary['n_trades']:,} trades; halted by a"
                f" breaker {_halted_share(summary):.0%} of the span; ours = candles / (signals +"
                " run); ratio < 1 means we are faster; target 2x",
            )
        )
    return rows


def _long_ten_pair_rows(tmp: Path) -> list[dict[str, Any]]:
    # Ten archives longer than storage.replay_segment_rows, trading throughout: both
    # engines read them a time segment at a time; their summaries must be the same.

    n = 1_200_000
    env = _ten_archives(tmp / "long", n) | TRADING_THROUGHOUT
    auto = _ours(tmp / "none", tmp, env=env, engine="auto")
    replay = _ours(tmp / "none", tmp, env=env, engine="replay")
    ours, theirs = dict(auto["summary"]), dict(replay["summary"])
    timings = ours.pop("timings"), theirs.pop("timings")
    same = "the same summary" if ours == theirs else "SUMMARIES DIFFER"
    note = (
        f"trading throughout (1 bp fee, drawdown limit 99%); ran on the {_engine(auto['summary'])}"
        f" against the {_engine(replay['summary'])}, each a segment at a time; {same}"
        f" ({ours['n_trades']:,} trades); in-run seconds, ours: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in timings[0].items())
    )
    label = f"CLI backtest, 10 pairs x {n:,} candles (archives past storage.replay_segment_rows)"
    replay_rss = replay["rss_kib"] / 1024
    return [
        _row(
            f"{label}: start to summary", auto["wall"], "s", "--engine replay", replay["wall"], note
        ),
        _row(
            f"{label}: peak RSS",
            auto["rss_kib"] / 1024,
            "MiB",
            "--engine replay",
            replay_rss,
            "whole process, imports included; ratio > 1: we hold less",
        ),
    ]


def run() -> list[dict[str, Any]]:
    """Measure the CLI backtest at scale against backtesting.py."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = _one_pair_rows(tmp) + _ten_pair_rows(tmp)
        if not os.environ.get("KESTREL_BENCH_SIZE"):
            rows += _long_ten_pair_rows(tmp)
        return rows
