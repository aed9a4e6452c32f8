"""`models.evolve`: the order path's copy-with-changes gives exactly `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from circuit_breakers import EquityBook
from models import (
    Fill,
    FillKind,
    Liquidity,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    evolve,
)


ORDER_A = Order(
    "k-1_0", "BTC/USDT", Side.BUY, OrderType.LIMIT, Decimal("0.5"), OrderStatus.OPEN, 1, 2,
    "x-1", Decimal("100.5"), None, Decimal("0.1"), Decimal("100.4"), Decimal("0.01"), False,
    TimeInForce.GTC, "entry",
)  # fmt: skip
ORDER_B = Order(
    "k-2_1", "ETH/USDT:USDT", Side.SELL, OrderType.STOP_MARKET, Decimal("3"),
    OrderStatus.PARTIALLY_FILLED, 5, 9, None, None, Decimal("1900.25"), Decimal("1"), None,
    Decimal("0.2"), True, TimeInForce.IOC, "stop-loss",
)  # fmt: skip
INTENT_A = OrderIntent(
    "BTC/USDT", Side.BUY, Decimal("0.5"), OrderType.MARKET, "k-1_0", "entry",
    None, None, Decimal("95"), Decimal("110"), False, TimeInForce.GTC, Decimal("2"), 7, None,
)  # fmt: skip
INTENT_B = OrderIntent(
    "ETH/USDT", Side.SELL, Decimal("1.25"), OrderType.STOP_MARKET, "k-sl0_0", "stop",
    Decimal("1"), Decimal("1800.5"), None, None, True, TimeInForce.IOC, None, 9,
    Decimal("100"),
)  # fmt: skip
FILL_A = Fill(
    "k-1_0", "BTC/USDT", Side.BUY, Decimal("100"), Decimal("0.5"), Decimal("0.05"), "USDT",
    Liquidity.TAKER, 3, "f-1",
)  # fmt: skip
FILL_B = Fill(
    "k-2_0", "ETH/USDT", Side.SELL, Decimal("2000"), Decimal("1"), Decimal("0.001"), "ETH",
    Liquidity.MAKER, 4, "f-2", "x-9", FillKind.LIQUIDATION,
)  # fmt: skip
PAIRS: list[tuple[Any, Any]] = [(ORDER_A, ORDER_B), (INTENT_A, INTENT_B), (FILL_A, FILL_B)]


@given(which=st.integers(0, len(PAIRS) - 1), mask=st.integers(0, 2**17 - 1))
def test_evolve_equals_replace_for_any_set_of_changed_fields(which: int, mask: int) -> None:
    """Any subset of fields taken from another instance gives replace's result, field by field."""
    base, other = PAIRS[which]
    names = [f.name for f in dataclasses.fields(base)]
    changes = {n: getattr(other, n) for i, n in enumerate(names) if mask >> i & 1}
    got, want = evolve(base, **changes), dataclasses.replace(base, **changes)
    assert type(got) is type(want)
    assert got == want
    for name in names:  # the same objects, so even a Decimal's exponent is kept
        assert getattr(got, name) is getattr(want, name)


def test_evolve_refuses_an_unknown_field_as_replace_does() -> None:
    """A name that is no field is a TypeError, and the original is left alone."""
    with pytest.raises(TypeError):
        evolve(ORDER_A, bogus=1)
    with pytest.raises(TypeError):
        dataclasses.replace(ORDER_A, bogus=1)  # type: ignore[call-arg]


def test_evolve_recomputes_derived_fields_through_replace() -> None:
    """A class with fields outside its constructor (derived ones) is copied by replace."""
    book = EquityBook(
        now=1, equity=Decimal(90), peak_equity=Decimal(100), day_start_equity=Decimal(95)
    )
    moved = evolve(book, equity=Decimal(80))
    assert moved == dataclasses.replace(book, equity=Decimal(80))
    assert moved.drawdown == pytest.approx(0.2)


@dataclasses.dataclass(frozen=True, init=False)
class _Scaled:
    """A dataclass with a constructor of its own (its arguments are not its fields)."""

    low: int
    high: int

    def __init__(self, high: int, low: int) -> None:
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)


def test_evolve_leaves_a_hand_written_constructor_to_replace() -> None:
    """A class whose constructor is its own gets exactly what replace gives it."""
    scaled = _Scaled(high=5, low=1)
    assert evolve(scaled, low=2) == dataclasses.replace(scaled, low=2)
    assert evolve(scaled, low=2).high == 5
