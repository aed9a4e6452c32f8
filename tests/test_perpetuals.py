"""Perpetuals: funding and margin formulas on known answers, funding in replays and backtests."""

from __future__ import annotations

import argparse
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import main
from config import load_settings
from error_handler import DataError
from models import Fill, Liquidity, PositionSide, Side
from perpetuals import (
    FundingSchedule,
    funding_beside,
    funding_payment,
    isolated_margin,
    liquidation,
    liquidation_price,
    load_funding,
    maintenance_margin,
    write_funding,
)
from portfolio import Portfolio
from runner import Daemon
from strategy import load_strategy
from tests.test_backtest_support import cli_args, replay_in_process
from trade_simulator import BacktestResult, run_fast


PERP = "BTC/USDT:USDT"
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
CANDLES = SAMPLE / "bybitlinear_BTC-USDT_1m.csv.gz"
FUNDING = SAMPLE / "bybitlinear_BTC-USDT_funding.csv.gz"
D = Decimal


# -- Formulas on known answers -----------------------------------------------------------------


def test_liquidation_price_matches_bybits_worked_examples() -> None:
    """Bybit's examples: 1 BTC at 20,000 with 50x, MMR 0.5 %: long 19,700, short 20,300."""
    margin = isolated_margin(D(20_000), D(1), D(50))
    assert margin == D(400)
    assert maintenance_margin(PERP, D(20_000)) == D(100)
    assert liquidation_price(PositionSide.LONG, D(20_000), D(1), margin, PERP) == D(19_700)
    assert liquidation_price(PositionSide.SHORT, D(20_000), D(1), margin, PERP) == D(20_300)


def test_liquidation_fee_is_the_margin_left_plus_the_fee_to_close() -> None:
    """Long 0.5 BTC at 20,000, 10x: margin 1,000, MM 50, liquidated at 20,000 - 950 / 0.5 =
    18,100, bankrupt at 18,000; fee 0.5 x 100 + 0.5 x 18,000 x 0.055 % = 54.95; the loss is
    then the margin plus the fee to close (hand-computed)."""
    qty, entry, fee_rate = D("0.5"), D(20_000), D("0.00055")
    margin = isolated_margin(entry, qty, D(10))  # 1,000
    liq = liquidation(PositionSide.LONG, entry, qty, margin, fee_rate, PERP)
    assert liq.bankruptcy == D(18_000)
    assert liq.price == D(18_100)
    assert liq.fee == D("54.95")
    loss = (entry - liq.price) * qty + liq.fee
    assert loss == margin + qty * liq.bankruptcy * fee_rate
    short = liquidation(PositionSide.SHORT, entry, qty, margin, fee_rate, PERP)
    assert (short.price, short.bankruptcy) == (D(21_900), D(22_000))


def test_cross_margin_uses_the_balance_behind_the_position() -> None:
    """Cross: 2,000 USDT behind 1 BTC at 20,000 moves the long's liquidation to 18,100."""
    assert liquidation_price(PositionSide.LONG, D(20_000), D(1), D(2_000), PERP) == D(18_100)


@given(st.integers(min_value=1, max_value=5_000_000))
def test_maintenance_margin_is_continuous_and_grows_across_tiers(value: int) -> None:
    """The tier deductions make maintenance margin continuous and non-decreasing in value."""
    here = maintenance_margin(PERP, D(value))
    assert maintenance_margin(PERP, D(value + 1)) >= here
    assert maintenance_margin(PERP, D(value + 1)) - here <= D("0.015") + D("1e-12")


def test_funding_payment_longs_pay_a_positive_rate_and_shorts_receive_it() -> None:
    """0.5 BTC marked at 17,000, rate 0.01 %: the long pays 0.85, the short receives it."""
    assert funding_payment(D("0.5"), D(17_000), D("0.0001")) == D("0.85")
    assert funding_payment(D("-0.5"), D(17_000), D("0.0001")) == D("-0.85")
    assert funding_payment(D("0.5"), D(17_000), D("-0.0001")) == D("-0.85")


def _fill(side: Side, qty: str, price: str, n: int, ts: int) -> Fill:
    return Fill(f"c{n}", PERP, side, D(price), D(qty), D(0), "USDT", Liquidity.TAKER, ts, f"f{n}")


def test_portfolio_funding_enters_cash_the_trade_and_its_pnl() -> None:
    """Long 2 @ 100, funding at mark 110 rate 0.1 % (pays 0.22) and at 105 rate -0.2 %
    (receives 0.42), sold at 120: funding +0.20, PnL 40.20, cash and equity agree."""
    p = Portfolio(D(1_000))
    p.apply_fill(_fill(Side.BUY, "2", "100", 1, 1))
    assert p.apply_funding(PERP, D(110), D("0.001")) == D("0.22")
    assert p.apply_funding(PERP, D(105), D("-0.002")) == D("-0.42")
    assert p.funding == D("0.20")
    trade = p.apply_fill(_fill(Side.SELL, "2", "120", 2, 2))
    assert trade is not None
    assert trade.funding == pytest.approx(0.20)
    assert trade.pnl == pytest.approx(40.20)
    assert p.cash == D("1040.20")
    assert p.apply_funding(PERP, D(120), D("0.001")) == 0  # flat: nothing to settle


def test_a_short_receives_a_positive_rate() -> None:
    """Short 1 @ 100, funding at 100 rate 0.05 %: the short receives 0.05."""
    p = Portfolio(D(1_000))
    p.apply_fill(_fill(Side.SELL, "1", "100", 1, 1))
    assert p.apply_funding(PERP, D(100), D("0.0005")) == D("-0.05")
    trade = p.apply_fill(_fill(Side.BUY, "1", "100", 2, 2))
    assert trade is not None
    assert trade.funding == pytest.approx(0.05)
    assert trade.side is PositionSide.SHORT


# -- Schedules and files -----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=30, unique=True),
    st.sampled_from([60_000, 300_000, 3_600_000]),
    st.integers(min_value=0, max_value=50),
)
def test_per_bar_and_bars_place_funding_in_the_same_candles(
    minutes: list[int], step: int, gap: int
) -> None:
    """Both ways of placing funding in candles agree, gaps between candles included."""
    close_ts = np.arange(1, 200, dtype=np.int64) * step
    close_ts = np.delete(close_ts, slice(gap, gap + 5))  # a gap: its funding settles nowhere
    schedule = FundingSchedule.of([(m * 60_000 * 7, 1e-4 * (m % 5 - 2)) for m in minutes])
    per_bar = schedule.per_bar(close_ts, step)
    sparse = dict(schedule.bars(close_ts.tolist(), step))
    assert {k: v for k, v in enumerate(per_bar.tolist()) if v != 0} == {
        k: v for k, v in sparse.items() if v != 0
    }


def test_the_bundled_funding_file_is_found_beside_the_sample_and_read() -> None:
    """The perpetual sample's funding: three 8-hourly rates on 2022-12-13."""
    assert funding_beside(CANDLES) == FUNDING
    schedule = load_funding(FUNDING)
    assert schedule.times.tolist() == [1670889600000, 1670918400000, 1670947200000]
    assert schedule.rates.tolist() == [-0.0002016, -0.00022398, -0.00038555]


def test_funding_files_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    """write_funding merges rows; a wrong header or a missing file is a DataError."""
    path = write_funding(tmp_path / "funding.csv", [(2, 0.5), (1, -0.25)])
    write_funding(path, [(3, 0.125)])
    schedule = load_funding(path)
    assert schedule.times.tolist() == [1, 2, 3]
    assert schedule.rates.tolist() == [-0.25, 0.5, 0.125]
    assert funding_beside(tmp_path / "1m.parquet") == path
    (tmp_path / "bad.csv").write_text("ts,rate\n1,0.1\n")
    with pytest.raises(DataError):
        load_funding(tmp_path / "bad.csv")
    with pytest.raises(DataError):
        load_funding(tmp_path / "missing.csv")


# -- Funding in backtests ----------------------------------------------------------------------


def _expected_funding(trades: list[dict[str, Any]], open_positions: list[dict[str, Any]]) -> float:
    """Sum over funding times T a position was open (entry < T <= exit): -qty x mark x rate,
    the mark being the close of the 1m candle that closes at T (computed here from the files)."""
    from data_manager import load_candles

    frame = load_candles(CANDLES)
    close_at = dict(
        zip(
            (frame.index.as_unit("ms").asi8 + 60_000).tolist(), frame["close"].tolist(), strict=True
        )
    )
    schedule = load_funding(FUNDING)
    spans = [(t["entry_ts"], t["exit_ts"], t["qty"], t["side"]) for t in trades]
    spans += [(p["entry_ts"], max(close_at), p["qty"], p["side"]) for p in open_positions]
    total = 0.0
    for time, rate in zip(schedule.times.tolist(), schedule.rates.tolist(), strict=True):
        for entry, exit_, qty, side in spans:
            if entry < time <= exit_ and time in close_at:
                sign = 1 if side == "long" else -1
                total -= sign * qty * close_at[time] * rate
    return total


async def test_perpetual_sample_backtest_settles_its_recorded_funding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Bybit linear sample with its recorded funding: the funding total equals the sum
    over the funding times the position was open; the fast path agrees exactly."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    cli = ["--mode", "backtest", "--strategy", "ema_cross", "--pairs", PERP]
    cli += ["--param", "fast=5", "--param", "slow=20"]
    summary, _ = await replay_in_process(*cli)
    assert summary["candles"] == 721  # the perpetual's own candles
    assert summary["funding_settlements"] == 1  # 08:00 (00:00 is the first candle's open)
    expected = _expected_funding(summary["trades"], summary["open_positions"])
    assert expected > 0  # rates were negative: the long received
    assert summary["funding"] == pytest.approx(expected, rel=1e-12)
    assert sum(t["funding"] for t in summary["trades"]) == pytest.approx(expected, rel=1e-12)
    fast = _fast("ema_cross", FUNDING, "next_open").summary().to_dict()
    for key in ("funding", "funding_settlements", "final_equity", "realised_pnl", "trades"):
        assert fast[key] == summary[key], key


def _fast(name: str, funding: Path, fill_at: Any, *, exact: bool = True) -> BacktestResult:
    # The fast path with the settings the replay runs under.
    from data_manager import load_candles

    sim = load_settings(env_file=None).simulation
    return run_fast(
        load_strategy(name, {"fast": 5, "slow": 20}),
        load_candles(CANDLES),
        pair=PERP,
        exact=exact,
        fill_at=fill_at,
        taker_fee=sim.taker_fee,
        slippage_bps=sim.slippage_bps,
        funding=load_funding(funding),
    )


def _dense_funding(tmp_path: Path) -> Path:
    # A funding time every 37 minutes, rates of both signs: many settlements, in quiet
    # stretches and on signal candles alike.
    rows = [(1670889600000 + k * 37 * 60_000, 1e-4 * ((k * 7) % 11 - 5)) for k in range(20)]
    return write_funding(tmp_path / "dense.csv", rows)


def _args(funding: Path) -> argparse.Namespace:
    return cli_args(  # type: ignore[no-any-return]
        "--mode", "backtest", "--strategy", "sma_cross", "--pairs", PERP,
        "--param", "fast=5", "--param", "slow=20", "--funding", str(funding),
        "--log-level", "WARNING",
    )  # fmt: skip


@pytest.mark.parametrize("fill_at", ["next_open", "close"])
async def test_funding_is_the_same_on_every_replay_path_and_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fill_at: str
) -> None:
    """Dense funding: quiet stretches, quiet candles, the full pipeline and the fast path
    settle the same funding; trades and the equity curve agree point for point."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    monkeypatch.setenv("KESTREL_SIMULATION__FILL_AT", fill_at)
    funding = _dense_funding(tmp_path)
    results = []
    for variant in ("runs", "per_candle", "full"):
        args = _args(funding)
        daemon = Daemon(args, main._apply_cli(load_settings(env_file=None), args))
        daemon.build_replay()
        assert daemon.engine is not None
        assert daemon.driver is not None
        if variant != "runs":
            daemon.driver.quiet_runs = False
        if variant == "full":
            daemon.driver._quiet = None
        summary = (await daemon.run()).to_dict()
        results.append((summary, list(daemon.engine.portfolio.equity_curve)))
    runs, per_candle, full = results
    assert full[0]["funding_settlements"] > 3
    assert any(t["funding"] > 0 for t in full[0]["trades"])
    assert any(t["funding"] < 0 for t in full[0]["trades"])
    assert runs == full
    assert per_candle == full
    fast = _fast("sma_cross", funding, fill_at)
    summary = fast.summary().to_dict()
    for key in ("funding", "funding_settlements", "final_equity", "realised_pnl", "trades"):
        assert summary[key] == full[0][key], key
    # The curve to float rounding, as the fast path's curve in the other parity tests.
    np.testing.assert_allclose(fast.equity, [v for _, v in full[1]], rtol=1e-13)
    floats = _fast("sma_cross", funding, fill_at, exact=False)
    assert floats.funding == pytest.approx(fast.funding, rel=1e-9)
    assert floats.table["funding"] == pytest.approx(fast.table["funding"], rel=1e-9)


def test_funding_paid_lowers_the_score_through_the_trade_pnl() -> None:
    """The score reads a trade's PnL, funding included: the same trades paying funding
    score lower; the book's statistics show the funding."""
    from config import RewardSettings
    from models import ClosedTrade
    from reward_system import RewardSystem

    day = 86_400_000

    def trade(k: int, funding: float) -> ClosedTrade:
        gross = 2.0 if k % 3 else -1.0
        return ClosedTrade(PERP, PositionSide.LONG, k * day, k * day + 3_600_000, 100.0,
                           100.0 + gross, 1.0, 0.1, gross - 0.1 + funding, "t",
                           funding=funding)  # fmt: skip

    plain, paying = RewardSystem(RewardSettings()), RewardSystem(RewardSettings())
    for k in range(12):
        plain.on_trade_closed("s", trade(k, 0.0))
        paying.on_trade_closed("s", trade(k, -0.6))
    assert paying.score("s") < plain.score("s")
    assert paying.stats("s")["total_funding"] == pytest.approx(-7.2)
    assert paying.stats("s")["total_pnl"] == pytest.approx(plain.stats("s")["total_pnl"] - 7.2)
