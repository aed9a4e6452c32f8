"""Backtesting: the fast path against backtesting.py, vectorbt and a bare numba loop; the
replay path's throughput; Monte Carlo; peak memory of each.

Data: a seeded geometric random walk of one-minute candles (prices to the cent, like
exchange data), indexed by a UTC DatetimeIndex from 2022-01-01. KESTREL_BENCH_SIZE: a
number of candles (default 1,051,200 = two years), or "small" for 100,000.

Every engine runs the same backtest: sma_cross 10/30 with indicators computed inside the
timed call, long only, whole account in each position, market orders filled at the next
bar's open, 1 bp commission on both sides (at 10 bp, tens of thousands of all-in round trips
leave nothing to trade with, and backtesting.py cancels orders it can no longer size).
backtesting.py and the fast path are checked to make the same trades. Times are the best
of several runs (backtesting.py and vectorbt with a UTC index: one run, they take seconds).
Peak memory is the growth of the resident set while the engine runs (the peak, VmHWM, reset
just before the run), measured in a fresh process per engine with a fixed malloc mmap
threshold so that big arrays are not served from memory already resident (numba's own
allocations are included, which tracemalloc would miss).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

from benchmarks.common import bench_size, best_of
from run_summary import RunSummary


DEFAULT = 1_051_200
FEE = 0.0001
START = 10_000.0
FAST, SLOW = 10, 30


def _size() -> int:
    return bench_size(DEFAULT)


_best = best_of


def candles(n: int, seed: int = 7) -> pd.DataFrame:
    """Return n one-minute candles of a geometric random walk, UTC index."""
    rng = np.random.default_rng(seed)
    close = np.round(30_000 * np.exp(np.cumsum(rng.normal(0, 8e-4, n))), 2)
    open_ = np.concatenate(([close[0]], close[:-1]))
    wiggle = np.abs(rng.normal(0, 4e-4, (2, n))) * close
    high = np.round(np.maximum(open_, close) + wiggle[0], 2)
    low = np.round(np.minimum(open_, close) - wiggle[1], 2)
    volume = np.round(rng.gamma(2.0, 3.0, n), 6)
    index = pd.date_range("2022-01-01", periods=n, freq="1min", tz="UTC", name="ts")
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index
    )


# -- The engines -----------------------------------------------------------------------------


def ours(df: pd.DataFrame, *, exact: bool = False) -> Any:
    """Run our fast path (indicators included)."""
    from strategy import SmaCross
    from trade_simulator import run_fast

    return run_fast(
        SmaCross(fast=FAST, slow=SLOW),
        df,
        timeframe="1m",
        starting_balance=START,
        taker_fee=FEE,
        exact=exact,
    )


@njit(cache=True)
def _bare_loop(opens, closes, nf, ns, fee, cash):
    # The floor: rolling sums, crossings and an all-in position in one pass, no bookkeeping.
    tf = 0.0
    ts = 0.0
    pf = np.nan
    ps = np.nan
    qty = 0.0
    pending = 0
    trades = 0
    for i in range(closes.shape[0]):
        if pending == 1:
            price = opens[i]
            qty = cash / (price * (1.0 + fee))
            cash -= qty * price * (1.0 + fee)
            pending = 0
        elif pending == -1:
            cash += qty * opens[i] * (1.0 - fee)
            qty = 0.0
            pending = 0
            trades += 1
        x = closes[i]
        tf += x
        ts += x
        f = np.nan
        s = np.nan
        if i >= nf - 1:
            f = tf / nf
            tf -= closes[i - nf + 1]
        if i >= ns - 1:
            s = ts / ns
            ts -= closes[i - ns + 1]
        if qty > 0.0 and f < s and pf >= ps:
            pending = -1
        elif qty == 0.0 and f > s and pf <= ps:
            pending = 1
        pf = f
        ps = s
    return cash + qty * closes[-1], trades


def bare(df: pd.DataFrame) -> tuple[float, int]:
    """Run the bare numba loop."""
    opens = df["open"].to_numpy()
    closes = df["close"].to_numpy()
    return _bare_loop(opens, closes, FAST, SLOW, FEE, START)  # type: ignore[no-any-return]


def backtesting_py(df: pd.DataFrame, *, trailing: tuple[int, float] | None = None) -> Any:
    """Run backtesting.py 0.6.6 (plain Backtest; one unit = one 1e-8 BTC lot).

    `trailing` (ATR period, multiple): with an ATR stop trailing on every bar, its own
    `backtesting.lib.TrailingStrategy`: each bar moves every open trade's stop-loss to the
    multiple of the ATR behind the close when that is tighter (a stop order the broker
    checks each bar), what the standard risk profile's stop does (ATR(14) x 2 behind the
    best price since entry; break-even aside).
    """
    import talib
    from backtesting import Backtest, Strategy
    from backtesting.lib import TrailingStrategy

    base = Strategy if trailing is None else TrailingStrategy

    class SmaCrossBt(base):  # type: ignore[misc,valid-type]
        def init(self) -> None:
            super().init()
            if trailing is not None:
                self.set_atr_periods(trailing[0])
                self.set_trailing_sl(trailing[1])
            close = np.asarray(self.data.Close, dtype=np.float64)
            self.f = self.I(talib.SMA, close, FAST)
            self.s = self.I(talib.SMA, close, SLOW)

        def next(self) -> None:
            super().next()
            f, s = self.f, self.s
            if not self.position and f[-1] > s[-1] and f[-2] <= s[-2]:
                self.buy(size=float(np.nextafter(1.0, 0.0)))
            elif self.position and f[-1] < s[-1] and f[-2] >= s[-2]:
                self.position.close()

    data = df.rename(columns=str.capitalize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(data, SmaCrossBt, cash=START * 1e8, commission=FEE, finalize_trades=True)
        return bt.run()


def vectorbt(df: pd.DataFrame, *, utc: bool) -> float:
    """Run vectorbt: MA crossings, then Portfolio.from_signals filled at the next open."""
    import vectorbt as vbt

    close, open_ = df["close"], df["open"]
    if not utc:
        naive = df.index.tz_localize(None)
        close = pd.Series(close.to_numpy(), index=naive)
        open_ = pd.Series(open_.to_numpy(), index=naive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = vbt.MA.run(close, FAST)
        slow = vbt.MA.run(close, SLOW)
        entries = fast.ma_crossed_above(slow).shift(1, fill_value=False)
        exits = fast.ma_crossed_below(slow).shift(1, fill_value=False)
        pf = vbt.Portfolio.from_signals(
            close, entries, exits, price=open_, fees=FEE, init_cash=START, freq="1min"
        )
        return float(pf.final_value())


def monte_carlo_ours(returns: np.ndarray) -> Any:
    """Run our Monte Carlo: 10,000 bootstrapped paths of the trade returns."""
    from analytics import monte_carlo

    return monte_carlo(returns, n_paths=10_000, start=START, ruin=0.5, seed=1)


def monte_carlo_numpy(returns: np.ndarray, paths: int = 10_000, chunk: int = 250) -> np.ndarray:
    """The peer: a vectorised numpy bootstrap giving final equity and max drawdown."""
    rng = np.random.default_rng(1)
    n = len(returns)
    logs = np.log1p(returns)
    finals = np.empty(paths)
    worst = np.empty(paths)
    for lo in range(0, paths, chunk):
        draws = logs[rng.integers(0, n, (min(chunk, paths - lo), n))]
        equity = START * np.exp(np.cumsum(draws, axis=1))
        peak = np.maximum(np.maximum.accumulate(equity, axis=1), START)
        finals[lo : lo + len(draws)] = equity[:, -1]
        worst[lo : lo + len(draws)] = ((peak - equity) / peak).max(axis=1)
    return np.stack([finals, worst])


# -- The replay path -------------------------------------------------------------------------


def _write_parquet(df: pd.DataFrame, folder: Path) -> Path:
    path = folder / "candles.parquet"
    frame = df.copy()
    frame.insert(0, "timestamp", df.index.as_unit("ms").asi8)
    frame.reset_index(drop=True).to_parquet(path)
    return path


def replay(
    path: Path, folder: Path, *, full_pipeline: bool = False
) -> tuple[float, int, RunSummary]:
    """Run `--mode backtest` in-process as runner wires it; return (seconds, candles, summary).

    With `full_pipeline`, every candle takes the whole per-candle pipeline (the engine's
    quiet path for candles where nothing can happen, in the replay driver, is switched off).
    """
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
            "KESTREL_STORAGE__DATA_DIR": str(folder / "data"),
            "KESTREL_STORAGE__LOG_DIR": str(folder / "logs"),
        }
    )
    args = main.build_parser().parse_args(
        ["--mode", "backtest", "--strategy", "sma_cross", "--param", f"fast={FAST}",
         "--param", f"slow={SLOW}", "--pairs", "BTC/USDT", "--timeframe", "1m",
         "--data", str(path), "--no-ui"]
    )  # fmt: skip
    settings = main._apply_cli(load_settings(env_file=None), args)
    setup_logging(settings.storage.log_dir, level="WARNING", cache_loggers=True)  # as main

    async def go() -> tuple[float, int, RunSummary]:
        daemon = Daemon(args, settings)
        daemon.build_replay()
        if full_pipeline:
            assert daemon.driver is not None
            daemon.driver._quiet = None
        start = time.perf_counter()
        summary = await daemon.run()
        return time.perf_counter() - start, summary.candles, summary

    return asyncio.run(go())


def profile_replay(path: Path, folder: Path, top: int = 25) -> str:
    """Return cProfile's top functions (by own time) of a replay, for the report."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    replay(path, folder)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- Peak memory, one fresh process per engine -----------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _memory_warmup(kind: str, df: Any) -> Any:
    # Compile / load what the measured run needs, outside the measurement; return the trade
    # returns the Monte Carlo kinds resample (None for the others).
    returns = None
    if kind == "monte_carlo":
        from analytics import trade_returns

        returns = trade_returns(ours(df, exact=False))
        monte_carlo_ours(returns[:50])  # compile / load the kernel outside the measurement
    elif kind == "ours":
        ours(df.iloc[:1_000])
    elif kind.startswith("vectorbt"):
        vectorbt(df.iloc[:1_000], utc=kind.endswith("utc"))
    elif kind == "bare":
        bare(df.iloc[:1_000])
    if kind == "monte_carlo_numpy":
        from analytics import trade_returns

        returns = trade_returns(ours(df))
    return returns


def _memory_run(kind: str, df: Any, returns: Any) -> None:
    # The run whose resident-set growth is measured.
    if kind == "ours":
        ours(df)
    elif kind == "bare":
        bare(df)
    elif kind == "backtesting.py":
        backtesting_py(df)
    elif kind == "vectorbt_naive":
        vectorbt(df, utc=False)
    elif kind == "vectorbt_utc":
        vectorbt(df, utc=True)
    elif kind == "monte_carlo":
        monte_carlo_ours(returns)
    elif kind == "monte_carlo_numpy":
        monte_carlo_numpy(returns)


def _memory_child(kind: str, n: int, queue: Any) -> None:
    df = candles(n)
    returns = _memory_warmup(kind, df)
    _reset_peak()
    before = _status_kib("VmRSS")
    _memory_run(kind, df, returns)
    queue.put(max(_status_kib("VmHWM") - before, 0) / 1024)


def peak_memory_mib(kind: str, n: int) -> float | None:
    """Return the resident-set growth (MiB) of one engine's run, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_memory_child, args=(kind, n, queue))
    # A fixed mmap threshold: glibc otherwise raises it after big frees and serves later big
    # arrays from memory already resident, which would hide them from the peak.
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"})
    try:
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    process.join(timeout=600)
    if process.exitcode != 0:
        return None
    return float(queue.get(timeout=5))


# -- The benchmark ---------------------------------------------------------------------------


def _row(
    name: str,
    ours_value: float,
    peer: str,
    peer_value: float | None,
    unit: str,
    note: str,
    *,
    higher_is_better: bool = False,
) -> dict[str, Any]:
    ratio = None
    if peer_value is not None and ours_value:
        ratio = ours_value / peer_value if higher_is_better else peer_value / ours_value
    return {
        "name": name,
        "ours": ours_value,
        "peer": peer,
        "peer_value": peer_value,
        "unit": unit,
        "ratio": ratio,
        "note": note,
    }


def run() -> list[dict[str, Any]]:
    """Run every measurement; return the rows for benchmarks/RESULTS.md."""
    n = _size()
    df = candles(n)
    label = f"{n:,} 1m candles"
    rows: list[dict[str, Any]] = []

    # Warm up: load or compile the numba kernels of every engine on a small slice.
    ours(df.iloc[:2_000])
    ours(df.iloc[:2_000], exact=True)
    bare(df.iloc[:2_000])
    vectorbt(df.iloc[:2_000], utc=False)

    result = ours(df)
    t_ours = _best(lambda: ours(df), repeat=9)
    t_exact = _best(lambda: ours(df, exact=True), repeat=3)
    t_bare = _best(lambda: bare(df), repeat=9)

    start = time.perf_counter()
    stats = backtesting_py(df)
    t_bt = time.perf_counter() - start
    bt_trades = stats._trades
    bt_entries = pd.DatetimeIndex(bt_trades["EntryTime"]).as_unit("ms").asi8
    same = len(bt_trades) == result.n_trades + len(result.open_positions) and np.array_equal(
        bt_entries[: result.n_trades], result.table["entry_ts"]
    )
    # backtesting.py's finalize_trades sells what is still open at the last bar's open.
    last_open = float(df["open"].iloc[-1])
    liquidated = result.final_equity + sum(
        p["qty"] * (last_open * (1 - FEE) - p["mark_price"]) for p in result.open_positions
    )
    growth_gap = abs(liquidated / START / (float(stats["Equity Final [$]"]) / (START * 1e8)) - 1)
    rows.append(
        _row(
            f"sma_cross backtest, {label}, indicators included",
            t_ours * 1e3,
            "backtesting.py 0.6.6",
            t_bt * 1e3,
            "ms",
            f"ratio > 1: we are faster (target >= 100x). Same {result.n_trades:,} trades: "
            f"{'yes' if same else 'NO'}; equity growth differs by {growth_gap:.1e} relative",
        )
    )
    t_vbt_naive = _best(lambda: vectorbt(df, utc=False), repeat=3)
    start = time.perf_counter()
    vectorbt(df, utc=True)
    t_vbt_utc = time.perf_counter() - start
    rows.append(
        _row(
            f"sma_cross backtest, {label}, indicators included",
            t_ours * 1e3,
            "vectorbt 1.2.0 from_signals, naive index",
            t_vbt_naive * 1e3,
            "ms",
            "ratio > 1: we are faster (target > 1); next-open fills: shifted signals, price=open",
        )
    )
    rows.append(
        _row(
            f"sma_cross backtest, {label}, indicators included",
            t_ours * 1e3,
            "vectorbt 1.2.0 from_signals, UTC index",
            t_vbt_utc * 1e3,
            "ms",
            "ratio > 1: we are faster; the same call with the tz-aware index exchange data has",
        )
    )
    rows.append(
        _row(
            f"sma_cross backtest, {label}, indicators included",
            t_ours * 1e3,
            "bare numba loop (the floor)",
            t_bare * 1e3,
            "ms",
            "ratio = floor / ours: above 1/3 means within 3x of the floor (target); the floor "
            "keeps no trade list, equity curve or lot rounding",
        )
    )
    rows.append(
        _row(
            f"fast path with Decimal accounting (replay-exact), {label}",
            t_exact * 1e3,
            "fast path, float accounting",
            t_ours * 1e3,
            "ms",
            f"ratio < 1: the cost of bit-exact replay accounting ({result.n_trades:,} trades)",
        )
    )

    # Monte Carlo on the trade returns of this backtest.
    from analytics import trade_returns

    returns = trade_returns(result)
    monte_carlo_ours(returns[:50])
    t_mc = _best(lambda: monte_carlo_ours(returns), repeat=3)
    t_mc_np = _best(lambda: monte_carlo_numpy(returns), repeat=1)
    rows.append(
        _row(
            f"Monte Carlo, 10,000 bootstrapped paths x {len(returns):,} trades",
            t_mc * 1e3,
            "numpy vectorised bootstrap",
            t_mc_np * 1e3,
            "ms",
            "ratio > 1: we are faster; final equity, max drawdown, ruin, percentile bands",
        )
    )

    # The replay path: strategy, risk, executor, matching engine and portfolio per candle.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write_parquet(df, folder)
        # Best of three, as the other timings here: the shared 2-core host's speed varies.
        runs = [replay(path, folder) for _ in range(3)]
        seconds, count, summary = min(runs, key=lambda r: r[0])
        full = [replay(path, folder, full_pipeline=True) for _ in range(2)]
        seconds_full, _, summary_full = min(full, key=lambda r: r[0])
        agree = summary.trades == summary_full.trades and summary.n_trades == result.n_trades
        rows.append(
            _row(
                f"replay path (--mode backtest), 1 pair, {count:,} candles",
                count / seconds,
                "Jesse (published)",
                200_000.0,
                "candles/s",
                "ratio = ours / peer (above 1 is faster; target >= 1); strategy, risk, executor "
                "and matching in the loop, as runner wires it: a candle with a signal or a "
                "working order takes the whole pipeline, the quiet stretches between them "
                "(marks and equity only) are applied one stretch per call; "
                f"{summary.n_trades:,} trades{', equal to the fast path' if agree else ''}",
                higher_is_better=True,
            )
        )
        rows.append(
            _row(
                f"replay path, every candle through the full pipeline, {count:,} candles",
                count / seconds_full,
                "replay path as wired (quiet stretches in one call)",
                count / seconds,
                "candles/s",
                "ratio = full / as wired: the cost of running every candle through the "
                "whole pipeline (same trades and curve)",
                higher_is_better=True,
            )
        )

    # Peak memory, each engine in a fresh process.
    mem = {
        kind: peak_memory_mib(kind, n)
        for kind in (
            "ours",
            "bare",
            "backtesting.py",
            "vectorbt_naive",
            "vectorbt_utc",
            "monte_carlo",
            "monte_carlo_numpy",
        )
    }
    ours_mem = mem["ours"] or 0.0
    for kind, peer in (
        ("backtesting.py", "backtesting.py 0.6.6"),
        ("vectorbt_naive", "vectorbt, naive index"),
        ("vectorbt_utc", "vectorbt, UTC index"),
        ("bare", "bare numba loop"),
    ):
        rows.append(
            _row(
                f"peak memory, sma_cross backtest, {label}",
                ours_mem,
                peer,
                mem[kind],
                "MiB",
                "resident-set growth during the run; ratio > 1: we use less",
            )
        )
    rows.append(
        _row(
            "peak memory, Monte Carlo 10,000 paths",
            mem["monte_carlo"] or 0.0,
            "numpy vectorised bootstrap",
            mem["monte_carlo_numpy"],
            "MiB",
            "resident-set growth during the run; ratio > 1: we use less",
        )
    )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for row in run():
        print(row)
    if "--profile" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            print(profile_replay(_write_parquet(candles(min(_size(), 200_000)), folder), folder))
