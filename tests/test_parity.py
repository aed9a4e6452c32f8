"""Parity with backtesting.py 0.6.6: sma_cross 10/30 on the sample, same trades and growth.

Conventions shared by both runs: long only, market orders filled at the next bar's open
(`trade_on_close=False`), the whole account in each position, 0.1% commission on both
sides, no spread or slippage, no stops, one position at a time, a cross needing the
previous bar on the other side or equal (`fast[-2] <= slow[-2]`), the open trade (if any)
closed at the last close (`finalize_trades=True`).

backtesting.py trades whole units and sizes a relative order as
`int(cash x size // (price x (1 + commission)))`. Running it with plain `Backtest` on an
account of `10,000 / lot` (1e12 for BTC's 1e-8 lot) makes one of its units one of our lots,
so both engines floor to the same grid: quantities agree exactly and cash agrees to float
rounding (`FractionalBacktest` would rescale prices instead and can flip near-ties).
Its commission is charged on entry and exit notional, as ours; its cash excludes the
position's cost, so we compare equity growth (final / initial) and per-trade returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import talib
from backtesting import Backtest
from backtesting import Strategy as BtStrategy

from tests.test_backtest_support import PARITY_ENV, run_cli, sample_frame
from trade_simulator import sim_market


STARTING_BALANCE = 10_000.0
FEE = 0.001
# The largest float below 1: backtesting.py takes sizes in (0, 1) as a fraction of equity.
ALL_IN = float(np.nextafter(1.0, 0.0))


class SmaCrossBt(BtStrategy):  # type: ignore[misc]
    """The reference: the same crossing rule as strategy.SmaCross on TA-Lib's SMA."""

    fast = 10
    slow = 30

    def init(self) -> None:
        close = np.asarray(self.data.Close, dtype=np.float64)
        self.sma_fast = self.I(talib.SMA, close, self.fast)
        self.sma_slow = self.I(talib.SMA, close, self.slow)

    def next(self) -> None:
        f, s = self.sma_fast, self.sma_slow
        if not self.position and f[-1] > s[-1] and f[-2] <= s[-2]:
            self.buy(size=ALL_IN)
        elif self.position and f[-1] < s[-1] and f[-2] >= s[-2]:
            self.position.close()


def _ms(value: Any) -> int:
    return int(pd.Timestamp(value).value // 1_000_000)


@pytest.fixture(scope="module")
def reference() -> tuple[pd.DataFrame, float, float]:
    """Run backtesting.py once; return its trades, initial cash and final equity."""
    df = sample_frame()
    lot = float(sim_market("BTC/USDT", float(df["close"].iloc[0])).lot_size)
    cash = STARTING_BALANCE / lot
    data = df.rename(columns=str.capitalize)
    bt = Backtest(
        data,
        SmaCrossBt,
        cash=cash,
        commission=FEE,
        spread=0.0,
        margin=1.0,
        trade_on_close=False,
        hedging=False,
        exclusive_orders=False,
        finalize_trades=True,
    )
    stats = bt.run()
    return stats._trades, cash, float(stats["Equity Final [$]"])


@pytest.fixture
def ours(tmp_path: Path) -> dict[str, Any]:
    """Run our CLI backtest with the parity settings; return its summary JSON."""
    return run_cli(
        tmp_path,
        "--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=10",
        "--param", "slow=30", "--pairs", "BTC/USDT", "--timeframe", "1m",
        env=PARITY_ENV,
    )  # fmt: skip


def _liquidation_equity(summary: dict[str, Any]) -> float:
    # backtesting.py's finalize_trades sells what is still open at the last bar's open (its
    # closing order is a market order filled on a re-run of the last bar), paying the fee.
    last_open = float(sample_frame()["open"].iloc[-1])
    equity = float(summary["final_equity"])
    for position in summary["open_positions"]:
        equity += position["qty"] * (last_open * (1 - FEE) - position["mark_price"])
    return equity


def test_same_trades_as_backtesting_py(
    ours: dict[str, Any], reference: tuple[pd.DataFrame, float, float]
) -> None:
    """Entry and exit times and prices are identical, trade for trade; sizes on the same grid."""
    trades, _, _ = reference
    mine = ours["trades"] + [
        {
            "entry_ts": p["entry_ts"],
            "entry_price": p["entry_price"],
            "qty": p["qty"],
            "exit_ts": ours["last_ts"],
            "exit_price": float(sample_frame()["open"].iloc[-1]),
        }
        for p in ours["open_positions"]
    ]
    assert len(mine) == len(trades) == 32
    assert [t["entry_ts"] for t in mine] == [_ms(v) for v in trades["EntryTime"]]
    assert [t["exit_ts"] for t in mine] == [_ms(v) for v in trades["ExitTime"]]
    assert [t["entry_price"] for t in mine] == trades["EntryPrice"].tolist()
    assert [t["exit_price"] for t in mine] == trades["ExitPrice"].tolist()
    lot = float(sim_market("BTC/USDT", 17_000.0).lot_size)
    assert [round(t["qty"] / lot) for t in mine] == trades["Size"].tolist()


def test_same_equity_growth_as_backtesting_py(
    ours: dict[str, Any], reference: tuple[pd.DataFrame, float, float]
) -> None:
    """Final equity / initial equity agrees to 1e-9 relative, and so does every trade's return."""
    trades, cash, final = reference
    growth = _liquidation_equity(ours) / ours["starting_balance"]
    assert growth == pytest.approx(final / cash, rel=1e-9)
    # Per-trade account returns, compounded: pnl over the equity before the trade.
    pnl_ours = np.array([t["pnl"] for t in ours["trades"]])
    pnl_ref = trades["PnL"].to_numpy()[: len(pnl_ours)]
    before_ours = ours["starting_balance"] + np.concatenate([[0.0], np.cumsum(pnl_ours)[:-1]])
    before_ref = cash + np.concatenate([[0.0], np.cumsum(pnl_ref)[:-1]])
    returns_ours = pnl_ours / before_ours
    returns_ref = pnl_ref / before_ref
    np.testing.assert_allclose(returns_ours, returns_ref, rtol=1e-9, atol=1e-15)
    assert np.prod(1 + returns_ours) == pytest.approx(np.prod(1 + returns_ref), rel=1e-9)
    fees_ref = trades["Commission"].to_numpy()[: len(pnl_ours)] / cash
    fees_ours = np.array([t["fee"] for t in ours["trades"]]) / ours["starting_balance"]
    np.testing.assert_allclose(fees_ours, fees_ref, rtol=1e-9)
