"""The standard-profile fast path over several spot pairs sharing one account.

Part of `trade_simulator`. The replay takes every pair's candles one at a time in (open
time, pair name) order; each is matched (its pair's orders only), then processed (mark,
stop, take-profit, the account's equity, the breakers, its pair's decision). This run does
the same over the candle arrays: each pair's stop rule is its `fast_standard.StandardRun`
book's, the account (cash, the exact value of the open positions, the breakers, the
curve) is shared, and an entry is decided by the replay's own `RiskManager.evaluate` on
the context the engine builds (`Engine._risk_context`: the positions at their marks, the
aligned returns of the held pairs and the candidate). With `fill_at="close"` a market
order fills as soon as it is sent, at its pair's last close (a flatten's exits on other
pairs included), so the candles after it in the same close see the account it left.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from circuit_breakers import CircuitBreakers, breaker_report
from config import RiskSettings
from fast_path import BacktestResult
from fast_standard import (
    ZERO,
    StandardRun,
    _dec,
    _Pending,
    _table,
    book_of,
    closed_trade,
    entry_fill,
    exit_fill,
)
from models import Position, PositionSide, Side, TradingState
from risk_guards import ReturnsView
from risk_management import RiskContext, RiskManager
from run_summary import BreakerTrip, OpenPosition, TradingSpan
from strategy import Strategy


# The portfolio's context for the sum of its positions' values: exact (`Portfolio.equity`).
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
_ENTRY_STATES = frozenset({TradingState.NORMAL, TradingState.REDUCED})
# Candles turned into Python ints at a time: the merged order's lists stay small.
_CHUNK = 1 << 16


class PortfolioRun:
    """Several pairs' standard-profile run on one account (see the module docstring).

    `books`: each pair's `StandardRun` over its own rows (its arrays, market, ATR and stop
    rule), in any order; `returns_window`: the correlation window.
    """

    def __init__(
        self,
        books: Sequence[StandardRun],
        *,
        risk: RiskSettings,
        timeframe: str,
        starting_balance: float,
        returns_window: int,
    ) -> None:
        self.books = {book.pair: book for book in sorted(books, key=lambda b: b.pair)}
        first = next(iter(self.books.values()))
        self.step = first.step
        self.name = first.name
        self.fee = first.fee
        self.bps = first.bps
        self.window = first.window
        self.returns_window = returns_window
        self.cash = Decimal(str(starting_balance))
        self.fees = ZERO
        self.realised = ZERO
        self.peak = self.cash
        self.max_dd = 0.0
        self.breakers = CircuitBreakers(risk)
        self.manager = RiskManager(
            risk, long_only=True, taker_fee=self.fee, strategy_tag=first.tag, timeframe=timeframe
        )
        self.manager.breakers = self.breakers
        # The open positions in fill order: [qty, entry price, opened, mark, qty x mark],
        # marked at their pair's last close.
        self.held: dict[str, list[Any]] = {}
        self.value = ZERO  # the exact sum of the held positions' values
        self.signals = 0
        self.vetoes = 0
        self.trades: list[tuple[object, ...]] = []
        self.curve_ts: list[int] = []
        self.curve: list[float] = []
        self.candles = 0
        # The last candle's equity (exact, float), and the time it was last fed to the
        # breakers unchanged (None: something may have changed since).
        self._last: tuple[Decimal, float] | None = None
        self._fed: int | None = None
        # The close time each pair's working market order was sent at: it cannot fill on a
        # candle of that same close time (`_match_bar`: ts_created + latency >= bar close);
        # a flatten sends exits on another pair's candle.
        self._sent: dict[str, int] = {}
        self._now = 0

    # -- the run ----------------------------------------------------------------------------

    def run(self, starts: Mapping[str, int] | None = None) -> PortfolioRun:
        """Take every pair's candles in (open time, pair) order; return self.

        `starts`: each pair's first row to take (`fast_segments`: a segment's new rows;
        a pair left out has none); None: every row.
        """
        books = list(self.books.values())  # by pair name: the replay's order at one time
        first = [0 if starts is None else starts.get(b.pair, len(b.ts)) for b in books]
        ts = np.concatenate([book.ts[k:] for book, k in zip(books, first, strict=True)])
        which = np.concatenate(
            [
                np.full(len(b.ts) - k, i, dtype=np.int64)
                for i, (b, k) in enumerate(zip(books, first, strict=True))
            ]
        )
        at = np.concatenate(
            [np.arange(k, len(b.ts), dtype=np.int64) for b, k in zip(books, first, strict=True)]
        )
        order = np.lexsort((which, ts))
        self.candles += len(order)
        entries = [book.enter.tolist() for book in books]
        for lo in range(0, len(order), _CHUNK):  # Python ints a chunk at a time
            part = order[lo : lo + _CHUNK]
            nows, ks, rows = (
                (ts[part] + self.step).tolist(),
                which[part].tolist(),
                at[part].tolist(),
            )
            self._take(books, entries, nows, ks, rows)
        return self

    def _take(
        self,
        books: list[StandardRun],
        entries: list[list[bool]],
        nows: list[int],
        ks: list[int],
        rows: list[int],
    ) -> None:
        # Candles in the replay's order: their close times, books and rows.
        curve_ts, curve, breakers = self.curve_ts, self.curve, self.breakers
        flatten = TradingState.FLATTEN
        for now, k, t in zip(nows, ks, rows, strict=True):
            book = books[k]
            last = self._last
            if (
                book.held is None
                and book.pending is None
                and not entries[k][t]
                and last is not None
                and (breakers.state is not flatten or not self.held)
            ):
                # A flat pair's candle without an order or a signal: nothing is matched,
                # marked or decided; the account's last equity is recorded (the curve keeps
                # one point a close time) and fed again (the same time and equity again
                # change no verdict). A latched flatten with positions open retries their
                # refused exits on every candle: those take the whole path.
                if curve_ts[-1] != now:
                    curve_ts.append(now)
                    curve.append(last[1])
                if self._fed != now:
                    breakers.update(now, last[0])
                    self._fed = now
            else:
                self._row(book, t, now)

    def _row(self, book: StandardRun, t: int, now: int) -> None:
        self._now = now
        self._fed = None
        book.at = t
        self._match(book, t, now)
        held = book.held
        exited = False
        closing = held is not None and bool(book.exit[t])
        if held is not None:
            self._mark(book, t)
            exited = book.manage(held, t, closing)
            if exited:
                self._fill_close(book, now)  # the take-profit's exit, before the equity
        equity = self._record(now)
        if self.breakers.update(now, equity) is TradingState.FLATTEN:
            for other in [self.books[p] for p in self.held]:
                if other.pending is None:
                    self._exit(other, "circuit breaker: flatten")
                    self._fill_close(other, now)  # at its own last close
            book._flush_stop()
            return
        if not exited:
            self._decide(book, t, closing, now, equity)
            self._fill_close(book, now)
        book._flush_stop()

    # -- the account ------------------------------------------------------------------------

    def _mark(self, book: StandardRun, t: int) -> None:
        # `Portfolio.mark`: the position's value moves exactly.
        position = self.held[book.pair]
        price = _dec(float(book.c[t]))
        part = position[0] * price
        self.value = _EXACT.add(_EXACT.subtract(self.value, position[4]), part)
        position[3], position[4] = price, part

    def _record(self, now: int) -> Decimal:
        equity = self.cash + self.value if self.held else self.cash
        value = float(equity)
        self._last = (equity, value)
        if self.curve_ts and self.curve_ts[-1] == now:
            self.curve[-1] = value
        else:
            self.curve_ts.append(now)
            self.curve.append(value)
        if equity > self.peak:
            self.peak = equity
        elif self.peak > 0 and equity < self.peak:
            self.max_dd = max(self.max_dd, float((self.peak - equity) / self.peak))
        return equity

    # -- the venue --------------------------------------------------------------------------

    def _match(self, book: StandardRun, t: int, now: int) -> None:
        pending, held = book.pending, book.held
        if pending is None and (held is None or held.venue is None):
            return
        if pending is None:
            assert held is not None
            assert held.venue is not None
            # A stop on the tick grid (7 digits at most): Decimal(repr(x)) <= level exactly
            # when x <= float(level).
            level = float(held.venue)
            if float(book.o[t]) > level and float(book.l[t]) > level:
                return
        if pending is not None and self._sent.get(book.pair) == now:
            return  # sent on an earlier pair's candle of this close time: not live yet
        fill = book.matched(t)
        if fill is not None:
            self._book(book, *fill, int(book.ts[t]), now)

    def _fill_close(self, book: StandardRun, now: int) -> None:
        # `fill_at="close"`: the market order just sent on `book` fills at once at its
        # pair's last close (`SimulatedExchange.fill_now`), at the clock's time. The
        # account changed after this candle's equity was taken: the next candle of this
        # close time takes the whole path (`run`).
        fill = book.filled_at_close(book.at)
        if fill is not None:
            self._book(book, *fill, now, now)
            self._last = None

    def _book(
        self,
        book: StandardRun,
        order: _Pending | None,
        price: Decimal,
        reason: str,
        ts: int,
        now: int,
    ) -> None:
        # A fill on `book`'s pair at `ts`, on the account (`StandardRun._book`'s).
        if order is not None and order.side is Side.BUY:
            book.held, cost = entry_fill(order, price, self.fee, ts)
            self.cash = self.cash - cost
            self.fees += book.held.fee
            part = order.qty * price
            self.held[book.pair] = [order.qty, price, ts, price, part]
            self.value = _EXACT.add(self.value, part)
            return
        held = book.held
        assert held is not None
        change, fee, row = exit_fill(held, price, self.fee, ts, reason)
        self.cash = self.cash - change
        self.fees += fee
        self.realised += row[6]  # type: ignore[operator]
        book.held = None
        self.value = _EXACT.subtract(self.value, self.held.pop(book.pair)[4])
        self.trades.append((book.pair, *row))
        self.manager.on_trade_closed(closed_trade(book.pair, row), now)

    # -- decisions --------------------------------------------------------------------------

    def _exit(self, book: StandardRun, reason: str) -> None:
        # The pair's exit (`StandardRun._exit`, at its last close), sent at this close time.
        if book.pending is None:
            book._exit(reason, book.at)
            if book.pending is not None:
                self._sent[book.pair] = self._now

    def _decide(self, book: StandardRun, t: int, closing: bool, now: int, equity: Decimal) -> None:
        if book.held is not None:
            if closing:
                self.signals += 1
                self._exit(book, f"{self.name}: exit long")
            return
        if not book.enter[t]:
            return
        self.signals += 1
        if self.breakers.state not in _ENTRY_STATES:  # `evaluate`'s first refusal
            self.vetoes += 1
            return
        order = book.order_for(self.manager, t, self._context(book, t, now, equity))
        if order is None:
            self.vetoes += 1
            return
        book.pending = order

    def _context(self, book: StandardRun, t: int, now: int, equity: Decimal) -> RiskContext:
        # `Engine._risk_context` for an entry on `book`'s candle `t`.
        ts = int(book.ts[t])
        aligned = None
        if self.held:
            # Each pair's series depends on the decision's candle time alone (the bars opened
            # before it): the token lets the guard keep the held pairs' work for the next
            # entry on the same time, as the engine's does within a burst.
            books = self.books
            aligned = ReturnsView(
                lambda p: self._returns(books[p], ts), [book.pair, *self.held], token=("at", ts)
            )
        return RiskContext(
            now=now,
            equity=equity,
            cash=self.cash,
            positions={
                p: Position(p, PositionSide.LONG, q, entry, opened, mark_price=mark)
                for p, (q, entry, opened, mark, _) in self.held.items()
            },
            market=book.market,
            price=_dec(float(book.c[t])),
            atr=book.atrs.at(t),
            taker_fee=self.fee,
            returns=book.returns.own(self.manager, t),
            aligned_returns=aligned,
            candle_ts=ts,
        )

    def _returns(self, book: StandardRun, before: int) -> np.ndarray | None:
        # The pair's last `returns_window` returns of the bars opened before `before`.
        # The pair's window ends with its last candle taken (this close's, or the last one's
        # when its candle of this close comes later in the replay's order).
        end = int(book.ts.searchsorted(before))
        return book.returns.to(end, self.returns_window, last=max(book.at, end - 1))


def run_portfolio(
    strategy: Strategy,
    frames: dict[str, pd.DataFrame],
    *,
    timeframe: str,
    risk: RiskSettings,
    window: int,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    returns_window: int,
    signals: dict[str, tuple[np.ndarray, np.ndarray]],
    start_ms: int | None = None,
    end_ms: int | None = None,
    fill_at: str = "next_open",
) -> BacktestResult:
    """Run `--mode backtest` under the standard profile over several spot pairs.

    `frames`: each pair's whole archive (its market comes from its first close); `signals`
    its entry and exit flags over the whole archive (`signal_sources.replay_flags`);
    `start_ms`/`end_ms` the `--timerange`; `fill_at` the simulation's. Raises what
    `fast_standard.unsupported` recognises on a path only the replay models.
    """
    books = [
        book_of(
            strategy,
            frame,
            pair,
            signals[pair],
            timeframe=timeframe,
            risk=risk,
            window=window,
            starting_balance=starting_balance,
            taker_fee=taker_fee,
            slippage_bps=slippage_bps,
            timerange=(start_ms, end_ms),
            fill_at=fill_at,
            accelerate=False,
        )[0]
        for pair, frame in frames.items()
    ]
    run = PortfolioRun(
        books,
        risk=risk,
        timeframe=timeframe,
        starting_balance=starting_balance,
        returns_window=returns_window,
    ).run()
    return _result(run, strategy, timeframe, starting_balance, tuple(frames))


def _result(
    run: PortfolioRun,
    strategy: Strategy,
    timeframe: str,
    starting_balance: float,
    pairs: tuple[str, ...],
) -> BacktestResult:
    rows = run.trades
    table = _table([r[1:] for r in rows], "")
    table["pair"] = np.array([str(r[0]) for r in rows], dtype=np.str_)
    last = max((int(b.ts[-1]) for b in run.books.values() if len(b.ts)), default=None)
    report = breaker_report(run.breakers.history, last)
    opened = sorted(
        (book.held.opened, pair, book) for pair, book in run.books.items() if book.held is not None
    )
    equity = run.cash + run.value if run.held else run.cash
    return BacktestResult(
        strategy=strategy.describe(),
        pairs=pairs,  # the settings' order (`Engine.pairs`), not the books' name order
        timeframe=timeframe,
        starting_balance=float(starting_balance),
        ts=np.array(run.curve_ts, dtype=np.int64),
        equity=np.array(run.curve, dtype=np.float64),
        table=table,
        final_equity=float(equity),
        fees=float(run.fees),
        candles=run.candles,
        open_positions=tuple(
            OpenPosition(
                pair=pair,
                side="long",
                qty=float(book.held.qty),
                entry_price=float(book.held.entry),
                entry_ts=book.held.opened,
                mark_price=float(run.held[pair][3]),  # its entry price until a close marks it
            )
            for _, pair, book in opened
            if book.held is not None
        ),
        prices={pair: (b.ts + b.step, b.c) for pair, b in run.books.items()},
        signals=run.signals,
        vetoes=run.vetoes,
        rejections=sum(book.rejections for book in run.books.values()),  # refused exits
        realised_pnl=float(run.realised),
        breaker_trips=tuple(BreakerTrip.from_dict(x) for x in report["trips"]),
        trading_spans=tuple(TradingSpan.from_dict(x) for x in report["spans"]),
        max_drawdown_exact=run.max_dd,
    )


__all__ = ["PortfolioRun", "run_portfolio"]
