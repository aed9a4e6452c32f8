"""Position sizing: each method against hand-computed quantities, and every cap binding."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from models import MarketType, OrderIntent, PositionSide, Side, TradingState, Veto
from risk_management import RiskManager, kelly_estimate, loss_per_unit
from tests.test_risk_support import T0, context, market, position, settings, signal, trade


def _intent(verdict: OrderIntent | Veto) -> OrderIntent:
    assert isinstance(verdict, OrderIntent), verdict
    return verdict


def _veto(verdict: OrderIntent | Veto) -> Veto:
    assert isinstance(verdict, Veto), verdict
    return verdict


# -- Fixed fractional ------------------------------------------------------------------------


def test_fixed_fractional_risks_the_fraction_over_the_atr_stop_with_fees() -> None:
    """1% of 10,000 over a 2 x ATR(2) stop at 100 with 0.1% fees: 100 / 4.196 units."""
    risk = RiskManager(settings())
    intent = _intent(risk.evaluate(signal(), context(fee="0.001")))
    # per unit: 4 of stop distance + 0.001 x (100 entry + 96 exit) of fees = 4.196
    assert intent.qty == Decimal("23.832")
    assert intent.stop_loss == Decimal("96")
    assert intent.take_profit == Decimal("108")
    assert intent.leverage is None
    assert "bound by fixed_fractional" in intent.reason
    assert intent.reason.startswith("test entry")


def test_fixed_fractional_short_stop_sits_above_entry() -> None:
    """A short on a linear market risks 0.5% over a stop 4 above the price, fees free."""
    risk = RiskManager(settings(risk_per_trade=0.005), long_only=False)
    linear = market("BTC/USDT:USDT", type=MarketType.LINEAR)
    intent = _intent(risk.evaluate(signal("BTC/USDT:USDT", Side.SELL), context(mkt=linear)))
    assert intent.qty == Decimal("12.5")  # 50 / 4
    assert intent.stop_loss == Decimal("104")
    assert intent.take_profit == Decimal("92")
    assert intent.leverage == Decimal("1")


def test_loss_per_unit_counts_both_fees_at_their_prices() -> None:
    """Stopped out, a long loses the distance plus the fee on entry and on the lower exit."""
    assert loss_per_unit(Decimal(100), Decimal(4), Decimal("0.001"), Side.BUY) == Decimal("4.196")
    assert loss_per_unit(Decimal(100), Decimal(4), Decimal("0.001"), Side.SELL) == Decimal("4.204")


def test_missing_atr_falls_back_to_one_percent_of_price_and_says_so() -> None:
    """Without an ATR the stop distance is 2 x 1% of price and the reason names the proxy."""
    intent = _intent(RiskManager(settings()).evaluate(signal(), context(atr=None)))
    assert intent.stop_loss == Decimal("98.00")
    assert intent.qty == Decimal("25")  # 100 / 2 would be 50; max_position_fraction caps it
    assert "ATR unavailable" in intent.reason


# -- Volatility targeting --------------------------------------------------------------------


def _alternating(n: int = 20, step: float = 0.01) -> np.ndarray:
    return np.array([step if i % 2 == 0 else -step for i in range(n)])


def test_volatility_target_per_bar_uses_the_sample_stdev_of_returns() -> None:
    """Returns of +-1% have a sample stdev 0.01 x sqrt(20/19); 0.2% target -> 19.493 units."""
    risk = RiskManager(settings(sizing="volatility_target", target_volatility=0.002))
    ctx = context(returns={"BTC/USDT": _alternating()})
    intent = _intent(risk.evaluate(signal(), ctx))
    # 10,000 x 0.002 / 0.0102598 = 1949.36 notional at 100
    assert intent.qty == Decimal("19.493")
    assert "bound by volatility_target" in intent.reason
    assert intent.stop_loss == Decimal("96")


def test_volatility_target_scales_bar_volatility_to_a_day_with_the_timeframe() -> None:
    """On 1h bars the daily stdev is sqrt(24) x the bar's: 2% of 10,000 / 5.026% -> 39.791."""
    risk = RiskManager(
        settings(sizing="volatility_target", target_volatility=0.02, max_position_fraction=1.0),
        timeframe="1h",
    )
    intent = _intent(risk.evaluate(signal(), context(returns={"BTC/USDT": _alternating()})))
    assert intent.qty == Decimal("39.791")
    assert "daily" in intent.reason


def test_volatility_target_falls_back_to_atr_over_price() -> None:
    """With too few returns, ATR / price (2 / 100) is the volatility: 20 / 0.02 = 1000."""
    risk = RiskManager(settings(sizing="volatility_target", target_volatility=0.002))
    ctx = context(returns={"BTC/USDT": _alternating(8)})
    intent = _intent(risk.evaluate(signal(), ctx))
    assert intent.qty == Decimal("10")
    assert "ATR / price" in intent.reason


def test_volatility_target_without_any_volatility_uses_fixed_fractional() -> None:
    """No returns and no ATR: fixed fractional at 1% of price as the stop proxy."""
    risk = RiskManager(
        settings(sizing="volatility_target", risk_per_trade=0.002), volatility_min_sample=5
    )
    intent = _intent(risk.evaluate(signal(), context(atr=None)))
    assert intent.qty == Decimal("10")  # 20 / 2
    assert "bound by fixed_fractional" in intent.reason
    assert "volatility unknown" in intent.reason


# -- Kelly -----------------------------------------------------------------------------------


def _kelly_manager(
    wins: int, win: float, losses: int, loss: float, **changes: object
) -> RiskManager:
    risk = RiskManager(
        settings(sizing="kelly", max_position_fraction=1.0, max_consecutive_losses=100, **changes),
        kelly_min_trades=20,
    )
    # Interleave so no losing streak trips a breaker on the way.
    for i in range(max(wins, losses)):
        if i < wins:
            risk.on_trade_closed(trade(win), T0)
        if i < losses:
            risk.on_trade_closed(trade(-loss), T0)
    return risk


def test_kelly_estimate_matches_the_formula() -> None:
    """W = 0.6, R = 2 gives f = 0.6 - 0.4 / 2 = 0.4."""
    estimate = kelly_estimate([0.02] * 6 + [-0.01] * 4)
    assert estimate.win_rate == pytest.approx(0.6)
    assert estimate.payoff == pytest.approx(2.0)
    assert estimate.fraction == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("returns", "fraction"),
    [([0.01, 0.02], 1.0), ([-0.01, -0.03], -1.0), ([0.01, 0.0], 0.5)],
    ids=["no-loss", "no-win", "flat-trade-counts-as-loss"],
)
def test_kelly_estimate_edge_cases(returns: list[float], fraction: float) -> None:
    """All wins bet the win rate, no wins means no edge, a flat trade is not a win."""
    assert kelly_estimate(returns).fraction == pytest.approx(fraction)


def test_kelly_sizes_with_the_raw_fraction_below_the_cap() -> None:
    """W = 0.5, R = 1.25: f = 0.1 of 10,000 over a 40 stop (ATR 20) -> 25 units."""
    risk = _kelly_manager(10, 2.5, 10, 2.0)
    intent = _intent(risk.evaluate(signal(), context(atr=20.0)))
    assert intent.qty == Decimal("25")
    assert "bound by kelly" in intent.reason


def test_kelly_fraction_is_capped() -> None:
    """W = 0.6, R = 2: f = 0.4, capped at 0.25 -> 2,500 over a 40 stop = 62.5 units."""
    risk = _kelly_manager(12, 2.0, 8, 1.0)
    intent = _intent(risk.evaluate(signal(), context(atr=20.0)))
    assert intent.qty == Decimal("62.5")
    assert "capped at 0.25" in intent.reason


def test_kelly_below_the_minimum_sample_falls_back_to_fixed_fractional() -> None:
    """19 closed trades are not enough: 1% over a 40 stop -> 2.5 units."""
    risk = _kelly_manager(10, 2.0, 9, 1.0)
    intent = _intent(risk.evaluate(signal(), context(atr=20.0)))
    assert intent.qty == Decimal("2.5")
    assert "kelly needs 20 closed trades, has 19" in intent.reason


def test_kelly_without_edge_refuses_the_entry() -> None:
    """W = 0.3, R = 1: f = -0.4, so no position, with the statistics in the reason."""
    risk = _kelly_manager(6, 1.0, 14, 1.0)
    veto = _veto(risk.evaluate(signal(), context(atr=20.0)))
    assert veto.guard == "kelly"
    assert "no edge" in veto.reason
    risk.reset(history=True)
    assert isinstance(risk.evaluate(signal(), context(atr=20.0)), OrderIntent)


# -- Caps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "ctx_kwargs", "qty", "binding"),
    [
        # 20% of 10,000 over a 4 stop wants 500; 25% of equity at 100 is 25 units.
        ({}, {}, "25", "max_position_fraction"),
        # 9,000 already held against a 95% total: 500 of room = 5 units.
        (
            {"max_total_exposure": 0.95, "max_position_fraction": 1.0},
            {"positions": {"ETH/USDT": position(qty="90")}, "cash": "1000"},
            "5",
            "max_total_exposure",
        ),
        # Linear, 2x (market caps the 3x setting), 15,000 held: 5,000 of room = 50 units.
        (
            {"max_leverage": 3.0, "max_total_exposure": 10, "max_position_fraction": 10},
            {
                "positions": {"ETH/USDT:USDT": position("ETH/USDT:USDT", qty="150")},
                "mkt": market("BTC/USDT:USDT", type=MarketType.LINEAR, max_leverage="2"),
            },
            "50",
            "max_leverage",
        ),
        # Spot with 1,000 free: 1,000 / (100 x 1.001) = 9.99.
        ({}, {"cash": "1000", "fee": "0.001"}, "9.99", "cash"),
        # Linear 5x with 100 of margin: 100 / (100 x (1/5 + 0.001)) = 4.975.
        (
            {"max_leverage": 5.0, "max_total_exposure": 10, "max_position_fraction": 10},
            {
                "cash": "100",
                "fee": "0.001",
                "mkt": market("BTC/USDT:USDT", type=MarketType.LINEAR, max_leverage="100"),
            },
            "4.975",
            "margin",
        ),
        ({}, {"mkt": market(max_qty="3")}, "3", "market_max_qty"),
    ],
    ids=["per-pair", "total", "leverage", "cash", "margin", "market-max-qty"],
)
def test_each_cap_binds_and_is_named(
    changes: dict[str, object], ctx_kwargs: dict[str, object], qty: str, binding: str
) -> None:
    """A 20% risk budget wants 500 units; the tightest cap wins and is named in the reason."""
    risk = RiskManager(settings(risk_per_trade=0.2, **changes))
    pair = ctx_kwargs["mkt"].pair if "mkt" in ctx_kwargs else "BTC/USDT"  # type: ignore[attr-defined]
    intent = _intent(risk.evaluate(signal(pair), context(**ctx_kwargs)))  # type: ignore[arg-type]
    assert intent.qty == Decimal(qty)
    assert f"bound by {binding}" in intent.reason


def test_reduced_state_halves_the_size_and_says_why() -> None:
    """In the reduced rung (8% drawdown) the 23.832-unit entry becomes 11.916."""
    risk = RiskManager(settings(max_daily_loss=0.5))
    risk.update(T0, Decimal(10_000))
    assert risk.update(T0 + 60_000, Decimal(9_200)) is TradingState.REDUCED
    intent = _intent(risk.evaluate(signal(), context(equity="10000", fee="0.001")))
    assert intent.qty == Decimal("11.916")
    assert "bound by reduced" in intent.reason
    assert "drawdown 8.00%" in intent.reason


def test_too_small_a_size_is_refused_with_the_binding_constraint() -> None:
    """Ten units of equity cannot buy the 5 USDT minimum notional."""
    veto = _veto(RiskManager(settings()).evaluate(signal(), context(equity="10", fee="0.001")))
    assert veto.guard == "min_size"
    assert "bound by fixed_fractional" in veto.reason


@pytest.mark.parametrize(
    ("long_only", "mkt", "guard"),
    [(True, market(), "long_only"), (False, market(), "spot_short")],
)
def test_short_entries_refused_when_long_only_or_on_spot(
    long_only: bool, mkt: object, guard: str
) -> None:
    """Long-only refuses shorts; spot cannot be shorted even when shorts are allowed."""
    risk = RiskManager(settings(), long_only=long_only)
    veto = _veto(risk.evaluate(signal(side=Side.SELL), context(mkt=mkt)))  # type: ignore[arg-type]
    assert veto.guard == guard


def test_open_position_limit_and_pyramiding_refused() -> None:
    """A sixth position and a second entry on a held pair are refused with reasons."""
    risk = RiskManager(settings(max_open_positions=1))
    held = {"ETH/USDT": position()}
    assert _veto(risk.evaluate(signal(), context(positions=held))).guard == "max_open_positions"
    own = {"BTC/USDT": position("BTC/USDT")}
    assert _veto(risk.evaluate(signal(), context(positions=own))).guard == "pyramiding"


def test_exit_signal_closes_the_whole_position_reduce_only() -> None:
    """A sell against a held long is a reduce-only market exit of its full quantity."""
    risk = RiskManager(settings())
    held = {"BTC/USDT": position("BTC/USDT", qty="1.5")}
    intent = _intent(risk.evaluate(signal(side=Side.SELL), context(positions=held)))
    assert intent.reduce_only
    assert intent.qty == Decimal("1.5")


# -- The all_in reference profile ------------------------------------------------------------


def test_all_in_buys_with_the_whole_cash_without_stops() -> None:
    """all_in spends all cash in a quote-sized market buy, with no stop and no take-profit."""
    risk = RiskManager(settings(profile="all_in"))
    intent = _intent(risk.evaluate(signal(), context(cash="10000", fee="0.001")))
    assert intent.quote_amount == Decimal("10000")
    assert intent.qty == Decimal("99.9")  # 10,000 / 100.1 floored to the lot
    assert intent.stop_loss is None
    assert intent.take_profit is None
    assert intent.reason == "test entry"


def test_all_in_ignores_breakers_and_correlation() -> None:
    """all_in stays normal through a 50% drawdown and sizes past a perfect correlation."""
    risk = RiskManager(settings(profile="all_in"))
    risk.update(T0, Decimal(10_000))
    assert risk.update(T0 + 1, Decimal(5_000)) is TradingState.NORMAL
    series = np.linspace(-0.01, 0.01, 50)
    ctx = context(
        positions={"ETH/USDT": position()},
        returns={"BTC/USDT": series, "ETH/USDT": series},
    )
    assert isinstance(risk.evaluate(signal(), ctx), OrderIntent)
    assert risk.manage_stop(position(), 110, 100, 105, 2.0, T0) is None


# -- Properties ------------------------------------------------------------------------------


@hyp_settings(deadline=None)
@given(
    equity=st.decimals(min_value=10, max_value=1_000_000, places=2),
    cash_share=st.decimals(min_value=0, max_value=1, places=3),
    held=st.decimals(min_value=0, max_value=2, places=3),
    price=st.decimals(min_value=Decimal("0.01"), max_value=100_000, places=2),
    atr_share=st.floats(min_value=0.0001, max_value=0.5),
    sizing=st.sampled_from(["fixed_fractional", "volatility_target", "kelly"]),
    risk_per_trade=st.floats(min_value=0.001, max_value=0.2),
    mpf=st.floats(min_value=0.01, max_value=3),
    mte=st.floats(min_value=0.01, max_value=5),
    lev=st.floats(min_value=1, max_value=20),
    linear=st.booleans(),
    fee=st.sampled_from(["0", "0.0006", "0.001"]),
)
def test_size_never_exceeds_any_cap_and_is_never_negative(
    equity: Decimal,
    cash_share: Decimal,
    held: Decimal,
    price: Decimal,
    atr_share: float,
    sizing: str,
    risk_per_trade: float,
    mpf: float,
    mte: float,
    lev: float,
    linear: bool,
    fee: str,
) -> None:
    """Whatever the inputs, qty >= 0 and within the per-pair, total, leverage and cash caps."""
    risk = RiskManager(
        settings(
            sizing=sizing,
            risk_per_trade=risk_per_trade,
            max_position_fraction=mpf,
            max_total_exposure=mte,
            max_leverage=lev,
        )
    )
    kind = MarketType.LINEAR if linear else MarketType.SPOT
    mkt = market(
        "BTC/USDT",
        type=kind,
        lot="0.000001",
        min_qty="0.000001",
        min_notional="0",
        max_leverage="50",
    )
    other = position("ETH/USDT", qty=str(held), entry=str(equity))
    cash = equity * cash_share
    ctx = context(
        equity=str(equity),
        cash=str(cash),
        price=str(price),
        atr=float(price) * atr_share,
        fee=fee,
        positions={"ETH/USDT": other} if held > 0 else {},
        mkt=mkt,
    )
    verdict = risk.evaluate(signal(), ctx)
    if isinstance(verdict, Veto):
        assert verdict.reason
        return
    notional = verdict.qty * price
    exposure = held * equity
    leverage = min(Decimal(str(lev)), Decimal(50)) if linear else Decimal(1)
    tolerance = Decimal("1e-9") * equity
    assert verdict.qty > 0
    assert notional <= equity * Decimal(str(mpf)) + tolerance
    assert notional + exposure <= equity * Decimal(str(mte)) + tolerance
    assert notional + exposure <= equity * leverage + tolerance
    assert notional / leverage + notional * Decimal(fee) <= cash + tolerance
    assert verdict.stop_loss is not None
    assert 0 < verdict.stop_loss < price
    assert "bound by" in verdict.reason


def test_position_side_is_respected_in_exposure() -> None:
    """A held short counts in gross exposure just like a long."""
    risk = RiskManager(settings(risk_per_trade=0.2, max_position_fraction=1.0))
    held = {"ETH/USDT": position(side=PositionSide.SHORT, qty="80")}
    intent = _intent(risk.evaluate(signal(), context(positions=held, cash="2000")))
    assert intent.qty == Decimal("20")  # 10,000 - 8,000 of gross exposure left
    assert "bound by max_total_exposure" in intent.reason
