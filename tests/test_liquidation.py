"""Leverage, liquidation and shorts on perpetuals: backtests that cross the liquidation price."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import main
from config import RiskSettings, load_settings
from models import Market, MarketType, OrderIntent, Side, Signal, Veto
from risk_management import RiskContext, RiskManager
from runner import Daemon
from tests.test_backtest_support import cli_args
from trade_simulator import sim_market


PERP = "BTC/USDT:USDT"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
FEE = Decimal("0.00055")
SCRIPTED = '''
from typing import ClassVar, Mapping
import pandas as pd
from strategy import Param, Strategy


class Scripted(Strategy):
    """Enter on bar `at` (a short when `short` is 1), exit on bar `out`."""

    name = "scripted"
    can_short = True
    parameters: ClassVar[Mapping[str, Param]] = {
        "at": Param(2, 0, 100), "out": Param(30, 0, 100), "short": Param(0, 0, 1)
    }

    @property
    def warmup(self) -> int:
        return 1

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        i = pd.Series(range(len(df)), index=df.index)
        short = bool(self.params["short"])
        enter, out = i == int(self.params["at"]), i == int(self.params["out"])
        return pd.DataFrame(
            {
                "enter_long": enter & (not short),
                "exit_long": out & (not short),
                "enter_short": enter & short,
                "exit_short": out & short,
            },
            index=df.index,
        )
'''


def _candles(path: Path, extreme: float, *, at: int = 10) -> Path:
    """Flat at 20,000; bar `at` wicks to `extreme`; then 20,000 again (40 one-minute bars)."""
    lines = ["timestamp,open,high,low,close,volume"]
    for i in range(40):
        low = min(extreme, 20_000.0) if i == at else 20_000.0
        high = max(extreme, 20_000.0) if i == at else 20_000.0
        lines.append(f"{T0 + i * 60_000},20000.0,{high!r},{low!r},20000.0,5.0")
    path.write_text("\n".join(lines) + "\n")
    return path


async def _backtest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extreme: float, *, short: bool = False,
    quiet: bool = True, margin_mode: str = "isolated", out: int = 30,
) -> tuple[dict[str, Any], Daemon]:  # fmt: skip
    for key, value in {
        "KESTREL_SIMULATION__MARGIN_MODE": margin_mode,
        "KESTREL_RISK__PROFILE": "all_in",
        "KESTREL_RISK__MAX_LEVERAGE": "10",
        "KESTREL_SIMULATION__TAKER_FEE": str(FEE),
        "KESTREL_SIMULATION__SLIPPAGE_BPS": "0",
        "KESTREL_STRATEGY__LONG_ONLY": "false" if short else "true",
    }.items():
        monkeypatch.setenv(key, value)
    strategy = tmp_path / "scripted.py"
    strategy.write_text(SCRIPTED)
    data = _candles(tmp_path / "candles.csv", extreme)
    args = cli_args(
        "--mode", "backtest", "--strategy", str(strategy), "--pairs", PERP, "--data", str(data),
        "--param", f"short={int(short)}", "--param", f"out={out}", "--log-level", "WARNING",
    )  # fmt: skip
    daemon = Daemon(args, main._apply_cli(load_settings(env_file=None), args))
    daemon.build_replay()
    assert daemon.driver is not None
    if not quiet:
        daemon.driver._quiet = None
    return (await daemon.run()).to_dict(), daemon


async def test_a_long_at_10x_is_liquidated_at_its_liquidation_price_with_the_fee(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All-in long at 20,000 with 10x; a wick to 17,000 crosses the liquidation price
    20,000 x (1 - 1/10 + 0.5 %) = 18,100: closed there, charged the margin left above the
    bankruptcy price 18,000 plus the fee to close; the whole balance is lost, no more."""
    summary, daemon = await _backtest(tmp_path, monkeypatch, 17_000.0)
    assert summary["liquidations"] == 1
    [trade] = summary["trades"]
    assert trade["reason"].startswith("liquidation: mark reached 18100")
    assert (trade["entry_price"], trade["exit_price"]) == (20_000.0, 18_100.0)
    qty = Decimal(repr(trade["qty"]))
    # The order cost per unit: margin 2,000 + fee to open 11 + fee to close 18,000 x FEE.
    assert qty == (Decimal(10_000) / (2_000 + 20_000 * FEE + 18_000 * FEE)).quantize(
        Decimal("1e-8"), rounding="ROUND_FLOOR"
    )
    open_fee, close_fee = qty * 20_000 * FEE, qty * 18_000 * FEE
    assert trade["fee"] == pytest.approx(float(open_fee + qty * 100 + close_fee), rel=1e-12)
    assert trade["pnl"] == pytest.approx(float(-(qty * 1_900) - open_fee - qty * 100 - close_fee))
    assert 0 <= summary["final_equity"] < 0.01  # the margin is gone, the balance never negative
    assert summary["open_positions"] == []
    engine = daemon.engine
    assert engine is not None
    assert engine.portfolio.position(PERP) is None
    # The exit signal later finds no position: no order goes out for it.
    assert not [o for o in engine.executor.orders.values() if o.client_order_id.startswith("kx")]


async def test_under_cross_margin_the_wallet_balance_backs_the_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cross: the whole wallet W (10,000 less the fee to open) backs the long; net of the
    fee to close, the margin is m = (W - fee x value) / (1 - fee), liquidated at
    20,000 - (m - MM) / qty, below the isolated 18,100; the loss is the wallet, no more."""
    summary, _ = await _backtest(tmp_path, monkeypatch, 17_000.0, margin_mode="cross")
    [trade] = summary["trades"]
    qty = Decimal(repr(trade["qty"]))
    value = qty * 20_000
    wallet = Decimal(10_000) - value * FEE
    margin = (wallet - FEE * value) / (1 - FEE)
    expected = 20_000 - (margin - value * Decimal("0.005")) / qty
    assert trade["exit_price"] == pytest.approx(float(expected), rel=1e-12)
    assert trade["exit_price"] < 18_100
    assert trade["reason"].startswith("liquidation")
    assert abs(summary["final_equity"]) < 1e-9  # exactly the wallet, to Decimal rounding


async def test_an_open_leveraged_position_shows_its_liquidation_price(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portfolio's position carries the price the simulated exchange would liquidate
    it at; a position restored from the exchange keeps the one Bybit reported."""
    from models import Position, PositionSide
    from portfolio import Portfolio

    summary, daemon = await _backtest(tmp_path, monkeypatch, 20_000.0, out=99)
    assert summary["open_positions"]
    assert daemon.engine is not None
    position = daemon.engine.portfolio.position(PERP)
    assert position is not None
    assert position.liquidation_price == Decimal(18_100)
    restored = Portfolio(Decimal(0))
    reported = Position(PERP, PositionSide.LONG, Decimal(1), Decimal(20_000), 0,
                        liquidation_price=Decimal("18_123.5"))  # fmt: skip
    restored.restore(cash=Decimal(0), positions=[reported])
    assert restored.position(PERP) == reported


async def test_a_wick_that_stays_inside_the_liquidation_price_liquidates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wick to 18,150 (above 18,100) leaves the position open until its exit signal."""
    summary, _ = await _backtest(tmp_path, monkeypatch, 18_150.0)
    assert summary["liquidations"] == 0
    [trade] = summary["trades"]
    assert trade["exit_price"] == 20_000.0
    assert trade["reason"] == "scripted: exit long"


async def test_a_short_on_a_perpetual_is_liquidated_above_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shorts go through the same strategy, risk and executor path: a 10x short at 20,000
    is liquidated when a wick reaches 20,000 x (1 + 1/10 - 0.5 %) = 21,900."""
    summary, _ = await _backtest(tmp_path, monkeypatch, 23_000.0, short=True)
    assert summary["liquidations"] == 1
    [trade] = summary["trades"]
    assert trade["side"] == "short"
    assert trade["exit_price"] == 21_900.0
    assert 0 <= summary["final_equity"] < 0.01


async def test_a_short_without_liquidation_exits_on_its_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flat market: the 10x short exits on its signal at its entry price, paying the two
    fees only."""
    summary, _ = await _backtest(tmp_path, monkeypatch, 20_000.0, short=True)
    assert summary["liquidations"] == 0
    [trade] = summary["trades"]
    assert (trade["side"], trade["exit_price"]) == ("short", 20_000.0)
    assert trade["pnl"] == pytest.approx(-trade["fee"])


async def test_liquidation_is_the_same_with_and_without_the_quiet_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watched position takes every bar through the matching engine: same summary."""
    quiet, _ = await _backtest(tmp_path, monkeypatch, 17_000.0)
    full, _ = await _backtest(tmp_path, monkeypatch, 17_000.0, quiet=False)
    assert quiet == full


def _linear() -> Market:
    return sim_market(PERP, 20_000.0, MarketType.LINEAR)


def _ctx(market: Market, atr: float) -> RiskContext:
    return RiskContext(
        now=T0, equity=Decimal(10_000), cash=Decimal(10_000), positions={}, market=market,
        price=Decimal(20_000), atr=atr, taker_fee=FEE,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("stop_atr", "refused"),
    [(2.5, "beyond the liquidation price"), (1.6, "margin buffer"), (1.0, None)],
)
def test_risk_refuses_a_stop_beyond_liquidation_or_inside_the_buffer(
    stop_atr: float, refused: str | None
) -> None:
    """At 10x the liquidation price is 18,100 and the 25 % buffer leaves 1,425 of room:
    a stop at 17,500 (beyond it) and one at 18,400 (in the buffer) are refused, 19,000 not."""
    settings = RiskSettings(
        max_leverage=10, stop_atr_multiple=stop_atr, max_position_fraction=10,
        max_total_exposure=10, risk_per_trade=0.2,
    )  # fmt: skip
    risk = RiskManager(settings, taker_fee=FEE)
    signal = Signal(PERP, Side.BUY, 1.0, "test", T0, 20_000.0)
    verdict = risk.evaluate(signal, _ctx(_linear(), 1_000.0))
    if refused is None:
        assert isinstance(verdict, OrderIntent)
        assert verdict.leverage == Decimal(10)
        assert verdict.stop_loss == Decimal(19_000)
    else:
        assert isinstance(verdict, Veto)
        assert verdict.guard == "liquidation"
        assert refused in verdict.reason


def test_risk_refuses_shorts_on_spot_even_all_in() -> None:
    """With shorts enabled, a spot market still cannot open one."""
    risk = RiskManager(RiskSettings(profile="all_in"), long_only=False)
    spot = sim_market("BTC/USDT", 20_000.0)
    verdict = risk.evaluate(Signal("BTC/USDT", Side.SELL, 1.0, "t", T0, 20_000.0), _ctx(spot, 1.0))
    assert isinstance(verdict, Veto)
    assert verdict.guard == "spot_short"


def test_the_fast_path_refuses_shorts_and_cross_margin() -> None:
    """Shorts and cross margin are the replay's: the fast path says why it cannot run them;
    isolated leverage it runs."""
    from trade_simulator import fast_path_blockers

    common: dict[str, Any] = {
        "risk_profile": "all_in", "pairs": [PERP], "timeframe": "1m",
        "slippage_model": "fixed", "latency_ms": 0,
    }  # fmt: skip
    assert fast_path_blockers(**common) == []
    assert fast_path_blockers(**common, leverage=10) == []
    assert "margins isolated" in " ".join(
        fast_path_blockers(**common, leverage=10, margin_mode="cross")
    )
    assert "long only" in " ".join(fast_path_blockers(**common, shorts=True))


def _wicks(path: Path, n: int = 1_500, seed: int = 3) -> Path:
    """A random walk around 20,000 whose bars in the second half now and then wick 6-14 %
    down."""
    rng = np.random.default_rng(seed)
    close = np.round(20_000 * np.exp(np.cumsum(rng.normal(0, 2e-3, n))), 1)
    open_ = np.concatenate(([close[0]], close[:-1]))
    low = np.minimum(open_, close) * (
        1
        - np.where((rng.random(n) < 0.03) & (np.arange(n) > n // 2), rng.uniform(0.06, 0.14, n), 0)
    )
    high = np.maximum(open_, close)
    lines = ["timestamp,open,high,low,close,volume"]
    for i in range(n):
        row = (float(open_[i]), float(high[i]), round(float(low[i]), 1), float(close[i]))
        lines.append(f"{T0 + i * 60_000}," + ",".join(repr(x) for x in row) + ",5.0")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fill_at", ["next_open", "close"])
def test_leveraged_backtests_liquidate_the_same_on_the_fast_path_and_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill_at: str
) -> None:
    """sma_cross all in at 10x on a perpetual with wicks: the replay and `--engine fast`
    trade and liquidate the same, at the same prices; the whole summary agrees."""
    from tests.test_backtest_support import run_cli

    data = _wicks(tmp_path / "wicks.csv")
    env = {
        "KESTREL_RISK__PROFILE": "all_in", "KESTREL_RISK__MAX_LEVERAGE": "10",
        "KESTREL_SIMULATION__TAKER_FEE": str(FEE), "KESTREL_SIMULATION__SLIPPAGE_BPS": "1",
        "KESTREL_SIMULATION__FILL_AT": fill_at,
    }  # fmt: skip
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=5",
           "--param", "slow=20", "--pairs", PERP, "--data", str(data)]  # fmt: skip
    (tmp_path / "r").mkdir()
    (tmp_path / "f").mkdir()
    replay = run_cli(tmp_path / "r", *cli, env=env)
    fast = run_cli(tmp_path / "f", *cli, "--engine", "fast", env=env)
    # All in at 10x, a liquidation takes the whole balance: later entries find no cash.
    assert replay["liquidations"] == 1
    assert replay["n_trades"] > 1
    assert replay["trades"][-1]["reason"].startswith("liquidation")
    assert replay["vetoes"] > 0
    for key in ("max_drawdown", "timings"):  # a float of the curve; wall-clock seconds
        replay.pop(key, None)
        fast.pop(key, None)
    assert fast == replay
