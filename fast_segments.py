"""The standard-profile fast path over an archive too long to hold: a segment at a time.

Part of `trade_simulator` (through `backtest_fast`). A one-pair archive of ours longer than
`storage.replay_segment_rows` candles is read a time segment at a time, as the replay's
segmented run reads it (`mode_builders.archive_segments`):

* each segment's flags come from the strategy's kernel carried on from the last segment
  (the caller's: `signal_sources.replay_flags` with a carry), which gives one pass's rows;
* one `fast_standard.StandardRun` goes on over the segments. Of the last segment's rows it
  keeps only the data window, all its ATR and returns ever read: its state (cash, the
  position and stop, the working order, the breakers, the risk manager) simply carries on;
* the curve goes into arrays sized once for the whole span, 16 bytes a candle.

Nothing else grows with the span. The result is `run_standard`'s over the whole archive,
field for field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from fast_path import BacktestResult, _Bars
from fast_standard import (
    BarAtr,
    BarReturns,
    StandardRun,
    _final_equity,
    _open_position,
    _report,
    _table,
    _Unsupported,
)
from matching_engine import sim_market
from models import strategy_tag
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    import pandas as pd

    from config import RiskSettings
    from strategy import Strategy


Flags = tuple[np.ndarray, np.ndarray]


def run_standard_segments(
    strategy: Strategy,
    segments: Iterable[pd.DataFrame],
    flags_of: Callable[[pd.DataFrame], Flags],
    *,
    total: int,
    pair: str,
    timeframe: str,
    risk: RiskSettings,
    window: int,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    start_ms: int | None = None,
    end_ms: int | None = None,
    fill_at: str = "next_open",
    defect: Callable[[pd.DataFrame], str | None] | None = None,
) -> BacktestResult:
    """Run `run_standard` over a pair's archive given as consecutive time segments.

    `segments`: the archive's frames in time order, the first starting at its first
    candle (its market's rules come from that close), read one at a time; `flags_of`: a
    segment's entry and exit flags over its rows, going on from the segments before it
    (`signal_sources.replay_flags` with the strategy's carry); `total`: the
    candles in [start_ms, end_ms) over all of them (the curve's length). `defect` names
    what in a segment the replay would refuse: the run stops there and raises an error
    `unsupported` recognises, as for any path it does not model.
    """

    def first_run(columns: tuple[np.ndarray, ...], flags: Flags, close: float) -> StandardRun:
        # `book_of`'s run, its market from the archive's first close.
        return StandardRun(
            columns,  # type: ignore[arg-type]
            flags,
            risk=risk,
            market=sim_market(pair, close),
            pair=pair,
            step=timeframe_to_ms(timeframe),
            strategy_name=strategy.name,
            tag=strategy_tag(strategy.describe()),
            starting_balance=starting_balance,
            taker_fee=taker_fee,
            slippage_bps=slippage_bps,
            window=window,
            timeframe=timeframe,
            fill_close=fill_at == "close",
        )

    curve = _Curve(total)
    run: StandardRun | None = None
    first_close: float | None = None
    for frame in segments:
        if first_close is None:
            first_close = float(frame["close"].iloc[0])
        reason = defect(frame) if defect is not None else None
        if reason is not None:
            raise _Unsupported(reason)
        enter, exit_ = flags_of(frame)
        bars = _Bars.of(frame, timeframe, start_ms, end_ms)
        if bars.n == 0:
            continue
        rows = slice(bars.first, bars.last)
        columns = (
            bars.ts - bars.step,
            *(np.ascontiguousarray(frame[k].to_numpy(np.float64))[rows] for k in ("open", "high")),
            bars.lows,
            bars.closes,
        )
        flags = (enter[rows], exit_[rows])
        if run is None:
            run, start = first_run(columns, flags, first_close), 0
        else:
            start = go_on(run, columns, flags)
        run.run(start)
        curve.add(bars.ts, run.equity[start:])
    if run is None:
        raise _Unsupported("no candles in the time range")
    if curve.done != total:
        raise _Unsupported("the archive changed while it was read")
    return _result(run, strategy, curve, timeframe, starting_balance)


class _Curve:
    """The equity curve over the whole span, written a segment at a time."""

    def __init__(self, total: int) -> None:
        self.ts = np.empty(total, dtype=np.int64)
        self.equity = np.empty(total, dtype=np.float64)
        self.done = 0

    def add(self, ts: np.ndarray, equity: np.ndarray) -> None:
        """Append a segment's close times and equity."""
        done, n = self.done, len(ts)
        if done + n > len(self.ts):
            raise _Unsupported("the archive grew while it was read")
        self.ts[done : done + n] = ts
        self.equity[done : done + n] = equity
        self.done = done + n


def _result(
    run: StandardRun,
    strategy: Strategy,
    curve: _Curve,
    timeframe: str,
    starting_balance: float,
) -> BacktestResult:
    # `run_standard`'s result.
    trips, spans = _report(run)
    return BacktestResult(
        strategy=strategy.describe(),
        pairs=(run.pair,),
        timeframe=timeframe,
        starting_balance=float(starting_balance),
        ts=curve.ts,
        equity=curve.equity,
        table=_table(run.trades, run.pair),
        final_equity=float(_final_equity(run)),
        fees=float(run.fees),
        candles=curve.done,
        open_positions=_open_position(run),
        prices={},  # drawn by the HTML report only, which a segmented run does not write
        signals=run.signals,
        vetoes=run.vetoes,
        rejections=run.rejections,
        realised_pnl=float(run.realised),
        breaker_trips=trips,
        trading_spans=spans,
        max_drawdown_exact=run.max_dd,
    )


def go_on(run: StandardRun, columns: tuple[np.ndarray, ...], flags: Flags) -> int:
    """Give `run` the next segment's rows after the last one's data window; return the first.

    The run's ATR and returns read at most the data window's last `window` rows, so the
    rows before them are dropped (with their per-bar caches); the state goes on as is.
    """
    keep = min(run.window, len(run.ts))
    cut = len(run.ts) - keep
    old = (run.ts, run.o, run.h, run.l, run.c, run.enter, run.exit)
    joined = [np.concatenate((a[cut:], b)) for a, b in zip(old, (*columns, *flags), strict=True)]
    run.ts, run.o, run.h, run.l, run.c, run.enter, run.exit = joined
    run.equity = np.empty(len(run.ts), dtype=np.float64)
    run.atrs = BarAtr(run.h, run.l, run.c, run.risk.atr_period, run.window)
    run.returns = BarReturns(run.pair, run.c, run.window)
    return keep


__all__ = ["go_on", "run_standard_segments"]
