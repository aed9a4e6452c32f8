"""Rounding to tick/lot and order validation against market rules (utils/precision.py)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from error_handler import OrderRejected
from models import Market, MarketType, OrderIntent, OrderType, Side, TimeInForce
from utils.precision import round_price, round_qty, validate_intent


SPOT = Market(
    pair="BTC/USDT",
    symbol_id="BTCUSDT",
    base="BTC",
    quote="USDT",
    type=MarketType.SPOT,
    tick_size=Decimal("0.01"),
    lot_size=Decimal("0.000001"),
    min_qty=Decimal("0.000048"),
    min_notional=Decimal("1"),
    max_qty=Decimal("71.73"),
)
LINEAR = Market(
    pair="BTC/USDT:USDT",
    symbol_id="BTCUSDT",
    base="BTC",
    quote="USDT",
    type=MarketType.LINEAR,
    tick_size=Decimal("0.10"),
    lot_size=Decimal("0.001"),
    min_qty=Decimal("0.001"),
    min_notional=Decimal("5"),
    max_qty=Decimal("1190"),
    max_leverage=Decimal("100"),
)
TICKS = st.sampled_from(
    [Decimal("0.01"), Decimal("0.10"), Decimal("0.5"), Decimal("0.0001"), Decimal("5")]
)
LOTS = st.sampled_from(
    [Decimal("0.000001"), Decimal("0.001"), Decimal("0.1"), Decimal("1"), Decimal("10")]
)
PRICES = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("1000000"), places=6)
QTYS = st.decimals(min_value=Decimal("0"), max_value=Decimal("100000"), places=8)


def _market(tick: Decimal, lot: Decimal) -> Market:
    return dataclasses.replace(LINEAR, tick_size=tick, lot_size=lot, min_qty=lot)


def _intent(**kw: object) -> OrderIntent:
    base: dict[str, object] = {
        "pair": "BTC/USDT:USDT",
        "side": Side.BUY,
        "qty": Decimal("0.0123"),
        "type": OrderType.LIMIT,
        "client_order_id": "cid-1",
        "reason": "test",
        "price": Decimal("60000.07"),
    }
    base.update(kw)
    return OrderIntent(**base)  # type: ignore[arg-type]


@given(tick=TICKS, price=PRICES, side=st.sampled_from([None, Side.BUY, Side.SELL]))
@settings(deadline=None)
def test_round_price_lands_on_the_tick_grid_within_one_tick(
    tick: Decimal, price: Decimal, side: Side | None
) -> None:
    """A rounded price is a whole number of ticks, less than one tick away, and idempotent."""
    market = _market(tick, Decimal("0.001"))
    rounded = round_price(market, price, side)
    assert rounded % tick == 0
    assert abs(rounded - price) < tick
    assert round_price(market, rounded, side) == rounded
    if side is Side.BUY:
        assert rounded <= price
    elif side is Side.SELL:
        assert rounded >= price
    else:
        assert abs(rounded - price) <= tick / 2


@given(lot=LOTS, qty=QTYS)
@settings(deadline=None)
def test_round_qty_floors_to_the_lot_and_never_increases(lot: Decimal, qty: Decimal) -> None:
    """A rounded quantity is a multiple of the lot, never above the input, and idempotent."""
    market = _market(Decimal("0.1"), lot)
    rounded = round_qty(market, qty)
    assert rounded % lot == 0
    assert rounded <= qty
    assert qty - rounded < lot
    assert round_qty(market, rounded) == rounded


@given(
    qty=st.decimals(min_value=Decimal("0.001"), max_value=Decimal("1000"), places=6),
    price=st.decimals(min_value=Decimal("10"), max_value=Decimal("100000"), places=4),
    side=st.sampled_from([Side.BUY, Side.SELL]),
)
@settings(deadline=None)
def test_validate_intent_is_idempotent_and_on_grid(
    qty: Decimal, price: Decimal, side: Side
) -> None:
    """A validated intent validates to itself and carries on-grid qty and price."""
    intent = _intent(qty=qty, price=price, side=side)
    try:
        once = validate_intent(intent, LINEAR)
    except OrderRejected:
        return
    assert validate_intent(once, LINEAR) is once  # on the grid: itself, not a copy
    assert once.qty % LINEAR.lot_size == 0
    assert once.qty <= qty
    assert once.price is not None
    assert once.price % LINEAR.tick_size == 0


def test_validate_intent_rounds_like_bybit_wire_example() -> None:
    """0.0123 @ 60000.07 buy post-only on linear becomes 0.012 @ 60000.0 (WIRE.md example)."""
    out = validate_intent(_intent(time_in_force=TimeInForce.POST_ONLY), LINEAR)
    assert out.qty == Decimal("0.012")
    assert out.price == Decimal("60000.0")


def test_validate_intent_rounds_attached_exits_toward_the_safe_side() -> None:
    """Stop-loss and take-profit of a long round up (the exit is a sell)."""
    out = validate_intent(
        _intent(stop_loss=Decimal("58000.01"), take_profit=Decimal("65000.01")), LINEAR
    )
    assert out.stop_loss == Decimal("58000.1")
    assert out.take_profit == Decimal("65000.1")


@pytest.mark.parametrize(
    ("change", "market", "last_price", "reason"),
    [
        ({"qty": Decimal("0.0004")}, LINEAR, None, "below the minimum 0.001"),
        ({"qty": Decimal("0")}, LINEAR, None, "must be positive"),
        ({"qty": Decimal("-1")}, LINEAR, None, "must be positive"),
        ({"qty": Decimal("2000")}, LINEAR, None, "above the maximum"),
        ({"qty": Decimal("0.002"), "price": Decimal("1000")}, LINEAR, None, "notional"),
        (
            {"type": OrderType.MARKET, "price": None, "qty": Decimal("0.002")},
            LINEAR,
            Decimal("1000"),
            "notional",
        ),
        ({"price": None}, LINEAR, None, "needs a price"),
        ({"type": OrderType.STOP_MARKET}, LINEAR, None, "needs a stop price"),
        ({"price": Decimal("-5")}, LINEAR, None, "must be positive"),
        ({"leverage": Decimal("101")}, LINEAR, None, "leverage"),
        (
            {"type": OrderType.MARKET, "time_in_force": TimeInForce.POST_ONLY},
            LINEAR,
            None,
            "post-only",
        ),
        ({"pair": "BTC/USDT", "leverage": Decimal("2")}, SPOT, None, "leverage"),
        ({"pair": "BTC/USDT", "qty": Decimal("0.00001")}, SPOT, None, "below the minimum"),
        (
            {"pair": "BTC/USDT", "qty": Decimal("0.00005"), "price": Decimal("100")},
            SPOT,
            None,
            "notional",
        ),
        (
            {"pair": "BTC/USDT", "type": OrderType.MARKET, "stop_loss": Decimal("1")},
            SPOT,
            None,
            "attached",
        ),
        ({"pair": "ETH/USDT:USDT"}, LINEAR, None, "market rules are for"),
    ],
)
def test_validate_intent_rejects_with_a_clear_reason(
    change: dict[str, object], market: Market, last_price: Decimal | None, reason: str
) -> None:
    """Each broken rule raises OrderRejected naming the rule."""
    with pytest.raises(OrderRejected, match=reason):
        validate_intent(_intent(**change), market, last_price=last_price)


def test_validate_intent_refuses_an_inactive_market() -> None:
    """A market that is not trading refuses every order."""
    closed = dataclasses.replace(LINEAR, active=False)
    with pytest.raises(OrderRejected, match="not trading"):
        validate_intent(_intent(), closed)


def test_validate_intent_accepts_market_order_without_reference_price() -> None:
    """A market order with no reference price is rounded but skips the notional rule."""
    out = validate_intent(_intent(type=OrderType.MARKET, price=None, qty=Decimal("0.0019")), LINEAR)
    assert out.qty == Decimal("0.001")
    assert out.price is None


def test_validation_copies_an_intent_only_when_rounding_rewrites_a_number() -> None:
    """An intent whose numbers rounding writes differently (2.50000 becomes 2.500 on a 0.001
    lot) comes back as a copy carrying the rounded text, as before; one that rounding leaves
    written the same comes back as itself (no copy on the order path)."""
    loose = _intent(qty=Decimal("2.50000"), price=Decimal("100.1"))
    out = validate_intent(loose, LINEAR)
    assert out is not loose
    assert str(out.qty) == str(round_qty(LINEAR, Decimal("2.50000"))) == "2.500"
    exact = _intent(qty=Decimal("2.5"), price=Decimal("100.10"))  # 0.10 tick: 100.10
    assert validate_intent(exact, LINEAR) is exact
