"""Perpetual funding in the backtest loop: the fast path and the replay path, funding on
against the same run without it (the cost of funding in the loop).

Data: bench_backtest's seeded random walk of one-minute candles (KESTREL_BENCH_SIZE), traded
as the perpetual BTC/USDT:USDT, with a seeded funding rate at every 8-hour funding time
(00:00, 08:00, 16:00 UTC; rates ~ N(1e-4, 2e-4), Bybit's typical size). The strategy is
bench_backtest's sma_cross 10/30, all in, 1 bp fees. Times are the best of several runs
(the replay's on and off runs interleaved, timed in process CPU time: on a shared machine
wall time mostly measures the neighbours).
The note says whether the fast path and the replay settled the same funding.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.bench_backtest import FAST, FEE, SLOW, START, _row, _write_parquet, candles
from benchmarks.common import bench_size, best_of
from run_summary import RunSummary


PAIR = "BTC/USDT:USDT"
EIGHT_HOURS = 8 * 3_600_000


def funding_rows(df: pd.DataFrame, seed: int = 11) -> list[tuple[int, float]]:
    """Return a funding time every 8 h across the frame, with seeded rates."""
    ts = df.index.as_unit("ms").asi8
    first = -(-int(ts[0]) // EIGHT_HOURS) * EIGHT_HOURS
    times = np.arange(first, int(ts[-1]) + 60_000, EIGHT_HOURS)
    rates = np.random.default_rng(seed).normal(1e-4, 2e-4, len(times))
    return [(int(t), float(r)) for t, r in zip(times, rates, strict=True)]


def fast(df: pd.DataFrame, schedule: Any, *, exact: bool = False) -> Any:
    """The fast path on the frame, with funding (`schedule`) or without (None)."""
    from strategy import load_strategy
    from trade_simulator import run_fast

    return run_fast(
        load_strategy("sma_cross", {"fast": FAST, "slow": SLOW}),
        df,
        pair=PAIR,
        starting_balance=START,
        taker_fee=FEE,
        exact=exact,
        funding=schedule,
    )


def replay(path: Path, funding: Path, folder: Path, *, on: bool) -> tuple[float, RunSummary]:
    """Run `--mode backtest` in-process as runner wires it; return (seconds, summary)."""
    import main
    from config import load_settings
    from runner import Daemon
    from utils.utilities import setup_logging

    os.environ.update(
        {
            "KESTREL_RISK__PROFILE": "all_in",
            "KESTREL_SIMULATION__TAKER_FEE": str(FEE),
            "KESTREL_SIMULATION__MAKER_FEE": str(FEE),
            "KESTREL_SIMULATION__SLIPPAGE_BPS": "0",
            "KESTREL_SIMULATION__STARTING_BALANCE": str(START),
            "KESTREL_SIMULATION__FUNDING": "true" if on else "false",
            "KESTREL_STORAGE__DATA_DIR": str(folder / "data"),
            "KESTREL_STORAGE__LOG_DIR": str(folder / "logs"),
        }
    )
    args = main.build_parser().parse_args(
        ["--mode", "backtest", "--strategy", "sma_cross", "--param", f"fast={FAST}",
         "--param", f"slow={SLOW}", "--pairs", PAIR, "--timeframe", "1m",
         "--data", str(path), "--funding", str(funding), "--no-ui"]
    )  # fmt: skip
    settings = main._apply_cli(load_settings(env_file=None), args)
    setup_logging(settings.storage.log_dir, level="WARNING", cache_loggers=True)

    async def go() -> tuple[float, RunSummary]:
        daemon = Daemon(args, settings)
        daemon.build_replay()
        start = time.process_time()
        summary = await daemon.run()
        return time.process_time() - start, summary

    return asyncio.run(go())


def run() -> list[dict[str, Any]]:
    """Run every measurement; return the rows for benchmarks/RESULTS.md."""
    from perpetuals import FundingSchedule, write_funding

    n = bench_size(200_000, small=100_000)
    df = candles(n)
    rows_in = funding_rows(df)
    schedule = FundingSchedule.of(rows_in)
    label = f"{n:,} 1m candles, {len(rows_in)} funding times"
    fast(df.iloc[:2_000], schedule)  # compile
    fast(df.iloc[:2_000], None)
    on = fast(df, schedule)
    t_off = best_of(lambda: fast(df, None), repeat=9)
    t_on = best_of(lambda: fast(df, schedule), repeat=9)
    out: list[dict[str, Any]] = [
        _row(
            f"fast path (numba), {label}",
            t_on * 1e3,
            "the same run without funding",
            t_off * 1e3,
            "ms",
            f"ratio = without / with funding (1: free); {on.funding_settlements} settlements,"
            f" funding {on.funding:,.2f}",
        )
    ]
    t_exact_off = best_of(lambda: fast(df, None, exact=True), repeat=3)
    t_exact_on = best_of(lambda: fast(df, schedule, exact=True), repeat=3)
    exact = fast(df, schedule, exact=True)
    out.append(
        _row(
            f"fast path, exact Decimal accounting, {label}",
            t_exact_on * 1e3,
            "the same run without funding",
            t_exact_off * 1e3,
            "ms",
            "ratio = without / with funding",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write_parquet(df, folder)
        funding = write_funding(folder / "funding.csv", rows_in)
        replay(path, funding, folder, on=True)  # warm caches
        runs_on, runs_off = [], []
        for _ in range(5):  # interleaved: a busy machine slows both alike
            runs_on.append(replay(path, funding, folder, on=True))
            runs_off.append(replay(path, funding, folder, on=False))
    r_on, summary = min(runs_on, key=lambda r: r[0])
    r_off = min(r[0] for r in runs_off)
    same = (
        summary.funding == exact.funding
        and summary.final_equity == exact.final_equity
        and summary.funding_settlements == exact.funding_settlements
    )
    out.append(
        _row(
            f"replay path (--mode backtest), CPU time, {label}",
            r_on * 1e3,
            "the same run without funding",
            r_off * 1e3,
            "ms",
            f"ratio = without / with funding; {n / r_on:,.0f} candles/s with funding; same"
            f" funding and final equity as the exact fast path: {'yes' if same else 'NO'}",
        )
    )
    return out
