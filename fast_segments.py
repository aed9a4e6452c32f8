"""The standard-profile fast path over archives too long to hold: a time segment at a time.

Part of `trade_simulator` (through `backtest_fast`). Archives of ours longer than
`storage.replay_segment_rows` candles are read a time segment at a time, as the replay's
segmented run reads them (`candle_store.archive_segments`):

* each pair's flags come from the strategy's kernel carried on from its last segment (the
  caller's `flags_of`: `signal_sources.replay_flags` with the pair's carry), which gives
  one pass's rows;
* each pair's `fast_standard.StandardRun` book goes on over the segments (`go_on`): of the
  last segment's rows it keeps only the data window, all its ATR and returns ever read,
  and its state (the position and its stop, the working order) simply carries on;
* one pair runs alone (`StandardRun.run`), several share the account
  (`fast_portfolio.PortfolioRun`, whose cash, breakers and risk manager carry on too);
* the curve goes into arrays, 16 bytes a point; nothing else grows with the span.

The result is `run_standard`'s (one pair) or `run_portfolio`'s over the whole archives,
field for field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fast_path import BacktestResult, _Bars
from fast_portfolio import PortfolioRun
from fast_portfolio import _result as _portfolio_result
from fast_standard import BarAtr, BarReturns, StandardRun, _Unsupported, run_result
from matching_engine import sim_market
from models import strategy_tag
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    import pandas as pd

    from config import RiskSettings
    from strategy import Strategy


Flags = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentRules:
    """What a segmented run's books are built with (`run_standard`'s arguments)."""

    strategy: Strategy
    timeframe: str
    risk: RiskSettings
    window: int  # the data window's capacity
    starting_balance: float
    taker_fee: float
    slippage_bps: float
    returns_window: int = 0  # several pairs: the correlation window
    start_ms: int | None = None
    end_ms: int | None = None
    fill_at: str = "next_open"

    def book(self, pair: str, first_close: float, *, alone: bool) -> StandardRun:
        """Return `pair`'s book before its first row (its market from its first close)."""
        empty = np.empty(0, dtype=np.float64)
        never = np.zeros(0, dtype=np.bool_)
        return StandardRun(
            (np.empty(0, dtype=np.int64), empty, empty, empty, empty),
            (never, never),
            risk=self.risk,
            market=sim_market(pair, first_close),
            pair=pair,
            step=timeframe_to_ms(self.timeframe),
            strategy_name=self.strategy.name,
            tag=strategy_tag(self.strategy.describe()),
            starting_balance=self.starting_balance,
            taker_fee=self.taker_fee,
            slippage_bps=self.slippage_bps,
            window=self.window,
            timeframe=self.timeframe,
            fill_close=self.fill_at == "close",
            accelerate=alone,  # the numba pass holds one pair's account
        )


def run_segments(
    rules: SegmentRules,
    segments: Iterable[dict[str, pd.DataFrame]],
    flags_of: Callable[[str, pd.DataFrame], Flags],
    *,
    first_closes: Mapping[str, float],
    total: int,
    defect: Callable[[pd.DataFrame], str | None] | None = None,
) -> BacktestResult:
    """Run the standard-profile fast path over archives given as consecutive time segments.

    `segments`: each time segment's frames by pair, in time order (a pair without candles
    in one may be left out; each dict is emptied as its pairs are taken); `flags_of`: a
    pair's entry and exit flags over a segment's rows, going on from its segments before;
    `first_closes`: each pair's archive's first close (its market's rules), in the
    settings' order; `total`: the candles in the time range over all of them. `defect`
    names what in a segment the replay would refuse: the run stops there and raises an
    error `unsupported` recognises, as for any path it does not model.
    """
    alone = len(first_closes) == 1
    books = {p: rules.book(p, close, alone=alone) for p, close in first_closes.items()}
    account = None
    if not alone:
        account = PortfolioRun(
            list(books.values()),
            risk=rules.risk,
            timeframe=rules.timeframe,
            starting_balance=rules.starting_balance,
            returns_window=rules.returns_window,
        )
    curve = _Curve(total)
    for frames in segments:
        starts = {}
        while frames:  # each frame given up once its book holds a copy of its rows
            pair, frame = frames.popitem()
            reason = defect(frame) if defect is not None else None
            if reason is not None:
                raise _Unsupported(reason)
            start = _take(rules, books[pair], frame, flags_of(pair, frame))
            if start is not None:
                starts[pair] = start
            del frame
        if account is not None:
            account.run(starts)
            curve.add_portfolio(account)
        elif starts:
            ((pair, start),) = starts.items()
            book = books[pair].run(start)
            curve.add(book.ts[start:] + book.step, book.equity[start:])
    if account is not None:
        return _of_portfolio(account, rules, tuple(first_closes), curve)
    ((book,),) = (books.values(),)
    return _of_one(book, rules, curve)  # no candles in the range: `run_standard`'s empty run


def _take(rules: SegmentRules, book: StandardRun, frame: pd.DataFrame, flags: Flags) -> int | None:
    # The segment's rows in the time range onto `book`; the first new row (None: none).
    bars = _Bars.of(frame, rules.timeframe, rules.start_ms, rules.end_ms)
    if bars.n == 0:
        return None
    rows = slice(bars.first, bars.last)
    columns = (
        bars.ts - bars.step,
        *(np.ascontiguousarray(frame[k].to_numpy(np.float64))[rows] for k in ("open", "high")),
        bars.lows,
        bars.closes,
    )
    return go_on(book, columns, (flags[0][rows], flags[1][rows]))


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
    run.at = run.at - cut if run.at >= cut else -1  # the last row the account took
    return keep


class _Curve:
    """The equity curve over the whole span, taken a segment at a time.

    Its arrays are sized once for `capacity` points (every candle in the time range: one
    pair's curve has a point a candle, several pairs' one a close time) and filled in
    order; the pages past the last point are never touched, so never resident.
    """

    def __init__(self, capacity: int) -> None:
        self.ts = np.empty(capacity, dtype=np.int64)
        self.equity = np.empty(capacity, dtype=np.float64)
        self.done = 0

    def add(self, ts: Sequence[int] | np.ndarray, equity: Sequence[float] | np.ndarray) -> None:
        """Append points (close times and equity)."""
        done, n = self.done, len(ts)
        if done + n > len(self.ts):
            raise _Unsupported("more candles than the archives counted (changed while read?)")
        self.ts[done : done + n] = ts
        self.equity[done : done + n] = equity
        self.done = done + n

    def add_portfolio(self, account: PortfolioRun) -> None:
        """Take the account's points so far but its last (a later candle may update it)."""
        ts, values = account.curve_ts, account.curve
        if len(ts) > 1:
            self.add(ts[:-1], values[:-1])
            del ts[:-1], values[:-1]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the close times and equity taken."""
        return self.ts[: self.done], self.equity[: self.done]


def _of_one(book: StandardRun, rules: SegmentRules, curve: _Curve) -> BacktestResult:
    # `run_standard`'s result; the closes are drawn by the HTML report only, which a
    # segmented run does not write.
    ts, equity = curve.arrays()
    return run_result(book, rules.strategy, rules.timeframe, rules.starting_balance, ts, equity, {})


def _of_portfolio(
    account: PortfolioRun, rules: SegmentRules, pairs: tuple[str, ...], curve: _Curve
) -> BacktestResult:
    # `run_portfolio`'s result.
    curve.add(account.curve_ts, account.curve)
    account.curve_ts, account.curve = [], []
    ts, equity = curve.arrays()
    result = _portfolio_result(account, rules.strategy, rules.timeframe, rules.starting_balance,
                               pairs)  # fmt: skip
    return dataclasses.replace(result, ts=ts, equity=equity, prices={})


__all__ = ["SegmentRules", "go_on", "run_segments"]
