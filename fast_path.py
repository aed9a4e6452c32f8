"""The backtest fast path: one strategy on one pair in one numba pass, and its result type.

`run_fast` takes the replay's decisions under the `all_in` risk profile (single-strategy
sweeps, the optimiser); `fast_backtest` runs `--mode backtest` through it with the
replay's exact accounting; `BacktestResult` holds a backtest's trades and equity curve,
from the fast path or a replay. Part of `trade_simulator`, which re-exports it. The numba
loop itself is in `fast_kernels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from numba import njit

import analytics
from error_handler import ConfigError
from fast_kernels import all_in_loop, fill_curve
from matching_engine import ZERO, quote_qty, sim_market, slipped_price
from models import ClosedTrade, Market, MarketType, PositionSide, Side
from perpetuals import FundingSchedule, isolated_margin, liquidation, liquidation_reason, risk_tiers
from run_summary import (
    BreakerTrip,
    OpenPosition,
    RunSummary,
    StrategyRef,
    StrategySection,
    TradingSpan,
)
from strategy import Strategy
from utils.equity_curve import EquityCurve
from utils.utilities import timeframe_to_ms


TRADE_COLUMNS = ("entry_ts", "exit_ts", "entry_price", "exit_price", "qty", "fee", "pnl")
_TIMEFRAMES = {
    timeframe_to_ms(tf): tf
    for tf in ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "12h", "1d", "1w")
}


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """A backtest's trades and equity curve, from the fast path or a replay.

    `ts` are the times each equity point was recorded (candle close times, ms UTC), as the
    replay's portfolio records them. `table` holds the closed trades column-wise
    (`TRADE_COLUMNS`, plus string columns `pair`, `side` and `reason`); `trades` builds
    `ClosedTrade`s from it.
    """

    strategy: dict[str, Any]
    pairs: tuple[str, ...]
    timeframe: str
    starting_balance: float
    ts: np.ndarray
    equity: np.ndarray
    table: dict[str, np.ndarray]
    final_equity: float
    fees: float
    candles: int
    open_positions: tuple[OpenPosition, ...] = ()
    # Close prices by pair, as (close time ms, close) for the report's trade-marker charts.
    prices: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    signals: int = 0
    vetoes: int = 0
    rejections: int = 0
    mode: str = "backtest"
    # The sum of closed-trade PnL as the accounting kept it (None: sum the table).
    realised_pnl: float | None = None
    # Circuit-breaker trips and the spans off the normal rung (`breaker_report`'s lists).
    breaker_trips: tuple[BreakerTrip, ...] = ()
    trading_spans: tuple[TradingSpan, ...] = ()
    # Several strategies: the summary's per-strategy sections (empty: one strategy traded).
    strategies: tuple[StrategySection, ...] = ()
    # Net funding received (negative: paid), the open position's included, and how many
    # funding times were settled on a position.
    funding: float = 0.0
    funding_settlements: int = 0
    # The drawdown as the replay's portfolio keeps it, from the exact equity (None: from
    # the float curve).
    max_drawdown_exact: float | None = None

    @property
    def liquidations(self) -> int:
        """Return how many trades ended in a liquidation."""
        reasons = self.table.get("reason")
        if reasons is None:
            return 0
        return int(sum(1 for r in reasons if str(r).startswith("liquidation")))

    @property
    def n_trades(self) -> int:
        """Return the number of closed trades."""
        return len(self.table["pnl"])

    @property
    def trades(self) -> list[ClosedTrade]:
        """Return the closed trades as `ClosedTrade`s (built on each call)."""
        t = self.table
        return [
            ClosedTrade(
                pair=str(t["pair"][i]),
                side=PositionSide(str(t["side"][i])),
                entry_ts=int(t["entry_ts"][i]),
                exit_ts=int(t["exit_ts"][i]),
                entry_price=float(t["entry_price"][i]),
                exit_price=float(t["exit_price"][i]),
                qty=float(t["qty"][i]),
                fee=float(t["fee"][i]),
                pnl=float(t["pnl"][i]),
                reason=str(t["reason"][i]) if "reason" in t else "",
                funding=float(t["funding"][i]) if "funding" in t else 0.0,
            )
            for i in range(self.n_trades)
        ]

    @property
    def max_drawdown(self) -> float:
        """Return the deepest fall of the equity curve from its running peak (a fraction).

        `analytics.max_drawdown`, the starting balance the first peak (or the exact one
        the run kept).
        """
        if self.max_drawdown_exact is not None:
            return self.max_drawdown_exact
        return analytics.max_drawdown(self.equity, start=self.starting_balance)

    def summary(self) -> RunSummary:
        """Return the run summary, the replay's `--summary-json` document as a typed value."""
        step = timeframe_to_ms(self.timeframe)
        return RunSummary(
            mode=self.mode,
            strategy=StrategyRef.from_dict(self.strategy),
            pairs=self.pairs,
            timeframe=self.timeframe,
            candles=self.candles,
            first_ts=int(self.ts[0]) - step if len(self.ts) else None,
            last_ts=int(self.ts[-1]) - step if len(self.ts) else None,
            signals=self.signals,
            vetoes=self.vetoes,
            rejections=self.rejections,
            starting_balance=self.starting_balance,
            final_equity=self.final_equity,
            max_drawdown=self.max_drawdown,
            fees=self.fees,
            funding=self.funding,
            funding_settlements=self.funding_settlements,
            realised_pnl=(
                self.realised_pnl
                if self.realised_pnl is not None
                else float(np.sum(self.table["pnl"]))
            ),
            open_positions=self.open_positions,
            trades=tuple(self.trades),
            breaker_trips=self.breaker_trips,
            trading_spans=self.trading_spans,
        )


def result_from_summary(
    summary: RunSummary,
    equity_curve: EquityCurve | Sequence[tuple[int, float]],
    *,
    prices: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> BacktestResult:
    """Return a `BacktestResult` for a replay run (its summary plus the portfolio's curve)."""
    trades = summary.trades
    table: dict[str, np.ndarray] = {
        "pair": np.array([t.pair for t in trades], dtype=np.str_),
        "side": np.array([str(t.side) for t in trades], dtype=np.str_),
        "reason": np.array([t.reason for t in trades], dtype=np.str_),
    }
    for name in TRADE_COLUMNS:
        dtype = np.int64 if name.endswith("_ts") else np.float64
        table[name] = np.array([getattr(t, name) for t in trades], dtype=dtype)
    table["funding"] = np.array([t.funding for t in trades], dtype=np.float64)
    if isinstance(equity_curve, EquityCurve):
        # The run is over: the report reads the packed curve in place (16 bytes a candle
        # not copied again).
        curve_ts, curve_values = equity_curve.views()
    else:
        curve = np.array(equity_curve, dtype=np.float64).reshape(-1, 2)
        curve_ts, curve_values = curve[:, 0].astype(np.int64), curve[:, 1].copy()
    return BacktestResult(
        strategy=summary.strategy.to_dict(),
        pairs=summary.pairs,
        timeframe=summary.timeframe,
        starting_balance=float(summary.starting_balance),
        ts=curve_ts,
        equity=curve_values,
        table=table,
        final_equity=float(summary.final_equity),
        fees=float(summary.fees),
        candles=summary.candles,
        open_positions=summary.open_positions,
        prices=dict(prices or {}),
        signals=summary.signals,
        vetoes=summary.vetoes,
        rejections=summary.rejections,
        mode=summary.mode,
        breaker_trips=summary.breaker_trips,
        trading_spans=summary.trading_spans,
        strategies=summary.strategies or (),
        funding=float(summary.funding),
        funding_settlements=summary.funding_settlements,
    )


_UNITS = {"s": (1_000, 1), "ms": (1, 1), "us": (1, 1_000), "ns": (1, 1_000_000)}


@njit(cache=True)
def _close_times(raw, mul, div, step):  # type: ignore[no-untyped-def]
    # Candle open times in the index's unit -> close times in ms, in one pass; the literal
    # divisors let the compiler turn each division into a multiply and shift.
    out = np.empty(raw.shape[0], dtype=np.int64)
    if div == 1_000_000:
        for i in range(raw.shape[0]):
            out[i] = raw[i] // 1_000_000 + step
    elif div == 1_000:
        for i in range(raw.shape[0]):
            out[i] = raw[i] // 1_000 + step
    else:
        for i in range(raw.shape[0]):
            out[i] = raw[i] * mul + step
    return out


def infer_timeframe(index: pd.DatetimeIndex) -> str:
    """Return the timeframe of a candle index from its most common spacing."""
    ts = index.as_unit("ms").asi8
    if len(ts) < 2:
        raise ConfigError("cannot infer a timeframe from fewer than two candles")
    diffs = np.diff(ts[: min(len(ts), 10_000)])
    values, counts = np.unique(diffs[diffs > 0], return_counts=True)
    step = int(values[np.argmax(counts)])
    if step not in _TIMEFRAMES:
        raise ConfigError(f"candle spacing {step} ms is not a known timeframe; pass timeframe=")
    return _TIMEFRAMES[step]


@dataclass(frozen=True, slots=True)
class _Costs:
    """Fill costs and market rules of a fast-path run (private)."""

    fee: Decimal
    slippage_bps: Decimal
    lot: Decimal
    min_notional: Decimal
    fill_close: bool
    stake: Decimal | None
    leverage: Decimal = Decimal(1)
    pair: str = "BTC/USDT"

    @classmethod
    def of(
        cls,
        market: Market,
        pair: str,
        taker_fee: float,
        slippage_bps: float,
        fill_at: str,
        stake: float | None,
        leverage: Decimal | None,
    ) -> _Costs:
        """Return a run's costs: taker fee, slippage, the market's lot and minimum notional.

        `stake` None spends the whole cash on each entry (`all_in`); `leverage` None is 1.
        """
        return cls(
            fee=Decimal(str(taker_fee)),
            slippage_bps=Decimal(str(slippage_bps)),
            lot=market.lot_size,
            min_notional=market.min_notional,
            fill_close=fill_at == "close",
            stake=None if stake is None else Decimal(str(stake)),
            leverage=leverage if leverage is not None else Decimal(1),
            pair=pair,
        )

    @property
    def tiers(self) -> np.ndarray:
        # The pair's risk-limit tiers as rows of (limit, MMR, deduction) for the loop.
        rows = [(float(t.limit), float(t.mmr), float(t.deduction)) for t in risk_tiers(self.pair)]
        return np.array(rows, dtype=np.float64).reshape(-1, 3)

    @property
    def inv_lot(self) -> float:
        # Multiplying by an exact integer 1/lot rounds once; dividing by 1e-8 rounds twice.
        inv = 1 / self.lot
        return float(inv) if inv == inv.to_integral_value() else 0.0


def run_fast(
    strategy: Strategy,
    df: pd.DataFrame,
    *,
    pair: str = "BTC/USDT",
    timeframe: str | None = None,
    starting_balance: float = 10_000.0,
    taker_fee: float = 0.001,
    maker_fee: float = 0.001,
    slippage_bps: float = 0.0,
    fill_at: Literal["next_open", "close"] = "next_open",
    all_in: bool = True,
    stake: float | None = None,
    market: Market | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    exact: bool = False,
    signals: tuple[np.ndarray, np.ndarray] | None = None,
    funding: FundingSchedule | None = None,
    leverage: Decimal | None = None,
) -> BacktestResult:
    """Backtest one strategy on one pair with market orders, long only, in one numba pass.

    Takes the same decisions as the replay (`--mode backtest`) under the `all_in` risk
    profile: signals from `populate` over the whole frame (none before `warmup`), an entry
    on a flat bar buys with the whole cash (`qty = floor_lot(cash / (price x (1 + fee)))`
    at the fill price), an exit sells the position; both fill at the next bar's open
    (`fill_at="next_open"`) or at once at the close (`"close"`), `slippage_bps` against the
    taker, taker fee on both sides (every fill is a market order, so `maker_fee` does not
    apply; it is accepted for a uniform call). Orders the replay's rules would refuse (below
    one lot or the market's minimum notional) are skipped the same way.

    Args:
        strategy: the strategy (its `entries_exits` gives the signals).
        df: the candle frame (UTC DatetimeIndex; open/high/low/close/volume).
        pair: the pair traded, for the market rules and the trade list.
        timeframe: the candle timeframe; inferred from the index when None.
        starting_balance: cash in quote currency at the start.
        taker_fee: fee rate of market orders.
        maker_fee: accepted for symmetry with the matching engine; unused here.
        slippage_bps: fixed slippage against the taker, in basis points.
        fill_at: `next_open` (default) or `close`.
        all_in: spend the whole cash on each entry (the replay's `all_in` profile);
            with False, spend `stake` (capped by cash).
        stake: quote spent per entry when `all_in` is False.
        market: the pair's rules; by default `sim_market(pair, first close)` as the replay.
        start_ms: simulate candles from this open time (signals still use earlier rows).
        end_ms: simulate candles before this open time.
        exact: do the accounting in `Decimal` exactly as the replay's exchange and
            portfolio do (trades and final equity equal to the last bit); otherwise in
            float64 inside the numba loop (quantities equal except when a quantity lies
            within ~1e-12 of a lot boundary; PnL equal to ~1e-12 relative).
        signals: precomputed `(enter_long, exit_long)` arrays (sweeps), else computed.
        funding: the pair's recorded funding (a perpetual): the position pays or receives
            it at the candles that hold a funding time, at their close, as the replay
            settles it (`perpetuals`); None: no funding.
        leverage: a perpetual's leverage (the replay's: the setting capped by the market):
            entries spend Bybit's order cost, and the isolated position is liquidated when
            a bar's low reaches its liquidation price, as the simulated exchange does.

    Raises:
        ConfigError: a bad combination of arguments.
    """
    if not all_in and (stake is None or stake <= 0):
        raise ConfigError("run_fast: all_in=False needs a positive stake", component="simulator")
    if fill_at not in ("next_open", "close"):
        raise ConfigError(f"run_fast: unknown fill_at {fill_at!r}", component="simulator")
    del maker_fee
    bars = _Bars.of(df, timeframe or infer_timeframe(df.index), start_ms, end_ms)
    enter, exit_ = signals if signals is not None else strategy.entries_exits(df)
    market = market or sim_market(pair, float(df["close"].to_numpy(dtype=np.float64)[0]))
    spent = None if all_in else stake
    costs = _Costs.of(market, pair, taker_fee, slippage_bps, fill_at, spent, leverage)
    warm = max(strategy.warmup - 1, 0)
    loop = _all_in_pass(bars, (enter, exit_), warm, costs, starting_balance, funding)
    return _result(strategy, bars, costs, loop, starting_balance, funding, exact=exact)


@dataclass(frozen=True, slots=True)
class _Bars:
    """The candles a fast-path run simulates: rows [first, last) of the frame (private)."""

    timeframe: str
    step: int
    first: int
    last: int
    n: int
    ts: np.ndarray  # close times, ms
    opens: np.ndarray
    closes: np.ndarray
    lows: np.ndarray

    @classmethod
    def of(
        cls, df: pd.DataFrame, timeframe: str, start_ms: int | None, end_ms: int | None
    ) -> _Bars:
        """Return the rows of `df` whose open time is in [start_ms, end_ms) (open ends: all)."""
        step = timeframe_to_ms(timeframe)
        raw = np.asarray(df.index.asi8, dtype=np.int64)  # open times in the index's unit
        mul, div = _UNITS[df.index.unit]
        # Bounds in the index's unit, rounded up: a candle is in when its open time >= start.
        first = 0 if start_ms is None else int(np.searchsorted(raw, -(-start_ms * div // mul)))
        last = len(raw) if end_ms is None else int(np.searchsorted(raw, -(-end_ms * div // mul)))

        def column(name: str) -> np.ndarray:
            return np.ascontiguousarray(df[name].to_numpy(dtype=np.float64))[first:last]

        ts = _close_times(raw[first:last], mul, div, step)
        n = max(last - first, 0)
        opens, closes, lows = column("open"), column("close"), column("low")
        return cls(timeframe, step, first, last, n, ts, opens, closes, lows)


class _Pass(NamedTuple):
    """What the numba loop leaves: the curve, the trades' bars and numbers, the totals."""

    equity: np.ndarray
    entries: np.ndarray
    exits: np.ndarray
    numbers: np.ndarray  # per trade: entry, exit, qty, fee, PnL, funding, liquidated
    # final, fees, open qty, open bar, open price, signals, vetoes, refusals, funding
    out: np.ndarray
    rates: np.ndarray  # the funding rate settled at each candle


def _all_in_pass(
    bars: _Bars,
    signals: tuple[np.ndarray, np.ndarray],
    warm: int,
    costs: _Costs,
    starting_balance: float,
    funding: FundingSchedule | None,
) -> _Pass:
    """Run the numba loop over `bars` (float64 accounting) and trim its trade buffers."""
    enter, exit_ = signals
    first, last, n = bars.first, bars.last, bars.n
    equity = np.empty(n, dtype=np.float64)
    cap = n // 2 + 1
    entries = np.empty(cap, dtype=np.int64)
    exits = np.empty(cap, dtype=np.int64)
    numbers = np.empty((cap, 7), dtype=np.float64)
    out = np.zeros(9, dtype=np.float64)
    no_funding = np.zeros(n, dtype=np.float64)
    rates = funding.per_bar(bars.ts, bars.step) if funding is not None else no_funding
    count = all_in_loop(
        bars.opens,
        bars.closes,
        enter[first:last],
        exit_[first:last],
        max(warm - first, 0),
        costs.fill_close,
        float(starting_balance),
        float(costs.stake) if costs.stake is not None else -1.0,
        float(costs.fee),
        float(costs.slippage_bps) / 1e4,
        float(costs.lot),
        costs.inv_lot,
        float(costs.min_notional),
        rates,
        funding is not None,
        bars.lows,
        float(1 / costs.leverage) if costs.leverage != 1 else 1.0,
        costs.tiers,
        equity,
        entries,
        exits,
        numbers,
        out,
    )
    return _Pass(equity, entries[:count], exits[:count], numbers[:count], out, rates)


def _result(
    strategy: Strategy,
    bars: _Bars,
    costs: _Costs,
    loop: _Pass,
    starting_balance: float,
    funding: FundingSchedule | None,
    *,
    exact: bool,
) -> BacktestResult:
    """Return the run's result from the loop's output, redone in Decimal when `exact`."""
    pair, ts, step, out = costs.pair, bars.ts, bars.step, loop.out
    opened = (step if costs.fill_close else 0) - step  # a fill's time: open or close of its bar
    table = _float_table(loop.numbers)
    liquidated = loop.numbers[:, 6] > 0
    # The liquidated trades' reasons (the exact accounting gives the replay's own).
    liquidations = [f"liquidation: mark reached {p:.10g}" for p in table["exit_price"][liquidated]]
    final, fees, open_qty = float(out[0]), float(out[1]), float(out[2])
    funding_total = float(out[8])
    open_at = int(out[3]) if open_qty > 0 else -1
    open_price = float(out[4])
    realised: float | None = None
    if exact:
        exact_result = _exact_accounting(
            (loop.entries, loop.exits, open_at),
            bars.opens,
            bars.closes,
            costs,
            starting_balance,
            loop.equity,
            loop.rates,
            liquidated,
        )
        table, final, fees = exact_result.table, exact_result.final, exact_result.fees
        liquidations = exact_result.reasons
        funding_total = exact_result.funding
        open_qty, open_price = exact_result.open_qty, exact_result.open_price
        realised = exact_result.realised
    table["entry_ts"] = ts[loop.entries] + opened
    # A liquidation happens inside its bar: it shows at the bar's close.
    exit_shift = np.where(liquidated, 0, opened) if liquidations else opened
    table["exit_ts"] = ts[loop.exits] + exit_shift
    table["pair"] = np.full(len(loop.entries), pair)
    table["side"] = np.full(len(loop.entries), "long")
    table["reason"] = _reasons(len(loop.entries), strategy.name, liquidated, liquidations)
    open_positions: tuple[OpenPosition, ...] = ()
    if open_at >= 0:
        open_positions = (
            OpenPosition(
                pair=pair,
                side="long",
                qty=open_qty,
                entry_price=open_price,
                entry_ts=int(ts[open_at] + opened),
                mark_price=float(bars.closes[-1]),
            ),
        )
    return BacktestResult(
        strategy=strategy.describe(),
        pairs=(pair,),
        timeframe=bars.timeframe,
        starting_balance=float(starting_balance),
        ts=ts,
        equity=loop.equity,
        table=table,
        final_equity=final,
        fees=fees,
        candles=bars.n,
        open_positions=open_positions,
        prices={pair: (ts, bars.closes)},
        signals=int(out[5]),
        vetoes=int(out[6]),
        rejections=int(out[7]),
        realised_pnl=realised,
        funding=funding_total,
        funding_settlements=_settlements(funding, ts, step, table, open_at, opened),
    )


def _float_table(numbers: np.ndarray) -> dict[str, np.ndarray]:
    """Return the trade table's number columns from the loop's float64 accounting."""
    columns = ("entry_price", "exit_price", "qty", "fee", "pnl", "funding")
    return {name: numbers[:, k].copy() for k, name in enumerate(columns)}


def _reasons(count: int, name: str, liquidated: np.ndarray, liquidations: list[str]) -> np.ndarray:
    """Return the trades' exit reasons: the strategy's exit, or a liquidation's own."""
    # Fixed-width string columns: filling them is a memset, object arrays are 20x slower.
    reasons = np.full(count, f"{name}: exit long")
    if liquidations:
        labelled = reasons.astype(object)
        labelled[liquidated] = liquidations
        reasons = labelled.astype(np.str_)
    return reasons


def _settlements(
    funding: FundingSchedule | None,
    ts: np.ndarray,
    step: int,
    table: dict[str, np.ndarray],
    open_at: int,
    opened: int,
) -> int:
    # Funding times settled on a position: each settles at the close C of the candle that
    # holds it, on a trade with entry < C <= exit (the replay's order, see `perpetuals`).
    if funding is None or not len(ts):
        return 0
    times = funding.times[(funding.times > ts[0] - step) & (funding.times <= ts[-1])]
    closes_at = ts[np.searchsorted(ts, times)]
    closes_at = closes_at[times > closes_at - step]  # none settles in a gap between candles
    entries = np.asarray(table["entry_ts"], dtype=np.int64)
    exits = np.asarray(table["exit_ts"], dtype=np.int64)
    if open_at >= 0:  # the open position, held to the end
        entries = np.append(entries, ts[open_at] + opened)
        exits = np.append(exits, ts[-1])
    # Trades do not overlap and come in time order: the one entered last before C holds it.
    k = np.searchsorted(entries, closes_at, side="left") - 1
    held = (k >= 0) & (closes_at <= exits[np.maximum(k, 0)])
    return int(np.count_nonzero(held))


def fast_path_blockers(
    *,
    risk_profile: str,
    pairs: Sequence[str],
    timeframe: str,
    slippage_model: str,
    latency_ms: int,
    dynamic_pairs: bool = False,
    leverage: float = 1.0,
    shorts: bool = False,
    margin_mode: str = "isolated",
) -> list[str]:
    """Return why the fast path cannot stand in for the replay of a run (empty: it can).

    The fast path takes the replay's decisions under the `all_in` risk profile (and the
    standard one, with `fast_standard.standard_blockers` too), on one pair (several under
    the standard profile: `fast_portfolio`) with a fixed list, with fixed-bps slippage, and
    with a latency shorter than a candle (a longer one delays fills in the replay).
    """
    reasons = []
    if len(pairs) != 1 and risk_profile != "standard":
        reasons.append(f"{len(pairs)} pairs share one portfolio: the all_in fast path runs one")
    if dynamic_pairs:
        reasons.append("a dynamic pair list needs the replay")
    if slippage_model != "fixed":
        reasons.append(f"slippage model {slippage_model!r}: the fast path models fixed bps")
    if latency_ms >= timeframe_to_ms(timeframe):
        reasons.append(f"latency {latency_ms} ms is a candle or more: fills move a bar later")
    if leverage > 1 and margin_mode != "isolated":
        reasons.append(f"{margin_mode} margin at {leverage:g}x: the fast path margins isolated")
    if shorts:
        reasons.append("shorts enabled: the fast path trades long only")
    return reasons


def fast_backtest(
    strategy: Strategy,
    frame: pd.DataFrame,
    *,
    pair: str,
    timeframe: str,
    starting_balance: float,
    taker_fee: float,
    slippage_bps: float,
    fill_at: Literal["next_open", "close"] = "next_open",
    start_ms: int | None = None,
    end_ms: int | None = None,
    funding: FundingSchedule | None = None,
    max_leverage: float = 1.0,
    signals: tuple[np.ndarray, np.ndarray] | None = None,
) -> BacktestResult:
    """Run `--mode backtest` through the fast path, exactly as the replay would account it.

    `frame` is the pair's whole archive (signals use it all, as the replay's precomputed
    signals do); `start_ms`/`end_ms` are the `--timerange`. The market rules come from the
    archive's first close, as the replay builds them (a perpetual, `BASE/QUOTE:SETTLE`, is
    a linear market, traded at `max_leverage` capped by the market's, as risk caps it).
    Check `fast_path_blockers` first.
    """
    kind = MarketType.LINEAR if ":" in pair else MarketType.SPOT
    market = sim_market(pair, float(frame["close"].iloc[0]), kind)
    leverage = None
    if kind is MarketType.LINEAR:
        leverage = max(min(Decimal(str(max_leverage)), market.max_leverage), Decimal(1))
    return run_fast(
        strategy,
        frame,
        pair=pair,
        timeframe=timeframe,
        starting_balance=starting_balance,
        taker_fee=taker_fee,
        slippage_bps=slippage_bps,
        fill_at=fill_at,
        market=market,
        start_ms=start_ms,
        end_ms=end_ms,
        exact=True,
        signals=signals,
        funding=funding,
        leverage=leverage if leverage != 1 else None,
    )


class _Exact(NamedTuple):
    table: dict[str, np.ndarray]
    final: float
    fees: float
    open_qty: float
    open_price: float
    realised: float
    funding: float
    reasons: list[str]


def _exact_accounting(
    fills: tuple[np.ndarray, np.ndarray, int],
    opens: np.ndarray,
    closes: np.ndarray,
    costs: _Costs,
    starting_balance: float,
    equity: np.ndarray,
    rates: np.ndarray,
    liquidated: np.ndarray,
) -> _Exact:
    """Redo the accounting in Decimal, operation for operation as exchange and portfolio.

    Returns the trade table, final equity, fees, open quantity, open entry price, realised
    PnL, funding and the liquidated trades' reasons, and rewrites `equity` from the exact
    cash and quantity after each fill and funding settlement (`rates`: the funding rate
    settled at each candle; `liquidated`: which trades the exchange liquidated).
    """
    entries, exits, open_at = fills
    cash = Decimal(str(starting_balance))
    fees = ZERO
    realised = ZERO
    rows: list[tuple[float, ...]] = []
    changes: list[tuple[int, float, float]] = []
    after = 1 if costs.fill_close else 0  # a fill at the close shows from the next bar
    qty = ZERO
    entry = ZERO
    bars = [(int(i), int(j)) for i, j in zip(entries, exits, strict=True)]
    if open_at >= 0:
        bars.append((open_at, -1))
    gone = [bool(x) for x in liquidated] + [False] * (len(bars) - len(liquidated))
    due = _funding_due(bars, gone, after, len(closes), rates)
    reasons: list[str] = []
    funding_total = ZERO
    for n, (i, j) in enumerate(bars):
        entry, qty, entry_fee = _exact_entry(_raw(opens, closes, i, costs), cash, costs)
        cash -= qty * entry + entry_fee
        fees += entry_fee
        changes.append((i + after, float(cash), float(qty)))
        received = ZERO
        for k in due[n]:
            payment = qty * Decimal(repr(float(closes[k]))) * Decimal(repr(float(rates[k])))
            cash, received = cash - payment, received - payment
            changes.append((k, float(cash), float(qty)))
        funding_total += received
        if j < 0:
            break
        if gone[n]:
            exit_price, exit_fee, reason = _liquidation_exit(entry, qty, costs)
            reasons.append(reason)
        else:
            exit_price = slipped_price(Side.SELL, _raw(opens, closes, j, costs), costs.slippage_bps)
            exit_fee = exit_price * qty * costs.fee
        cash -= -qty * exit_price + exit_fee
        fees += exit_fee
        pnl, row = _exact_close((entry, entry_fee), (exit_price, exit_fee), qty, received)
        realised += pnl
        rows.append(row)
        # A liquidation shows from its own bar; a fill at the close from the next.
        changes.append((j if gone[n] else j + after, float(cash), 0.0))
        qty = ZERO
    numbers = np.array(rows, dtype=np.float64).reshape(-1, 6)
    table = {name: numbers[:, k].copy() for k, name in enumerate((*TRADE_COLUMNS[2:], "funding"))}
    final = cash + qty * Decimal(repr(float(closes[-1]))) if len(closes) else cash
    index = np.array([c[0] for c in changes], dtype=np.int64)
    values = np.array([c[1:] for c in changes], dtype=np.float64).reshape(-1, 2)
    fill_curve(closes, index, values, float(starting_balance), equity)
    return _Exact(
        table,
        float(final),
        float(fees),
        float(qty),
        float(entry) if open_at >= 0 else 0.0,
        float(realised),
        float(funding_total),
        reasons,
    )


def _exact_entry(raw: Decimal, cash: Decimal, costs: _Costs) -> tuple[Decimal, Decimal, Decimal]:
    """Return an entry's fill price, quantity and fee in Decimal, as the exchange fills it."""
    entry = slipped_price(Side.BUY, raw, costs.slippage_bps)
    quote = cash if costs.stake is None else min(costs.stake, cash)
    qty = quote_qty(quote, entry, costs.fee, costs.lot, costs.leverage)
    return entry, qty, entry * qty * costs.fee


def _exact_close(
    entry: tuple[Decimal, Decimal], exit_: tuple[Decimal, Decimal], qty: Decimal, received: Decimal
) -> tuple[Decimal, tuple[float, ...]]:
    """Return a closed trade's realised PnL and its table row, as the portfolio books them.

    `entry` and `exit_` are (price, fee); `received` is the funding the position received
    (negative when it paid). The row is (entry price, exit price, qty, fees, PnL, funding).
    """
    (entry_price, entry_fee), (exit_price, exit_fee) = entry, exit_
    # The portfolio's split of fees by the closed fraction (here the whole position).
    entry_part = entry_fee * (qty / qty)
    exit_part = exit_fee * (qty / qty)
    pnl = (exit_price - entry_price) * qty * 1 - entry_part - exit_part
    funding_part = ZERO
    if received:
        funding_part = received * (qty / qty)
        pnl += funding_part
    row = (entry_price, exit_price, qty, entry_part + exit_part, pnl, funding_part)
    return pnl, tuple(float(x) for x in row)


def _funding_due(
    bars: list[tuple[int, int]], gone: list[bool], after: int, n: int, rates: np.ndarray
) -> list[list[int]]:
    # Per trade (entry bar i, exit bar j, -1 while open), the candles whose funding it
    # pays: those it is held at the close, [i + after, j + after) ([.., j) when liquidated
    # inside bar j), located for every trade at once.
    funding_bars = np.flatnonzero(rates)
    starts = np.array([i + after for i, _ in bars], dtype=np.int64)
    ends = np.array(
        [n if j < 0 else j if gone[k] else j + after for k, (_, j) in enumerate(bars)],
        dtype=np.int64,
    )
    first, last = np.searchsorted(funding_bars, starts), np.searchsorted(funding_bars, ends)
    return [funding_bars[a:b].tolist() for a, b in zip(first, last, strict=True)]


def _liquidation_exit(entry: Decimal, qty: Decimal, costs: _Costs) -> tuple[Decimal, Decimal, str]:
    # The simulated exchange's liquidation of an isolated long, in Decimal, as it does it.
    margin = isolated_margin(entry, qty, costs.leverage)
    liq = liquidation(PositionSide.LONG, entry, qty, margin, costs.fee, costs.pair)
    return liq.price, liq.fee, liquidation_reason(liq)


def _raw(opens: np.ndarray, closes: np.ndarray, index: int, costs: _Costs) -> Decimal:
    # The exchange prices a candle value as Decimal(str(float)); repr is the same string.
    return Decimal(repr(float(closes[index] if costs.fill_close else opens[index])))
