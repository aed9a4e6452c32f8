"""The risk context of one decision: the returns it reads are computed when read, as before."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models import OrderIntent
from risk_management import ReturnsView, RiskManager
from tests.test_risk_support import context, position, signal
from tests.test_risk_support import settings as risk_settings


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    window=st.integers(2, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_returns_view_equals_the_returns_computed_up_front(
    lengths: list[int], window: int, seed: int
) -> None:
    """For windows of random lengths, the view has exactly the pairs with at least two
    returns, each the last `window` close-to-close returns, and computes each pair once."""
    rng = np.random.default_rng(seed)
    closes = {f"P{i}": 100 + rng.random(n).cumsum() for i, n in enumerate(lengths)}
    calls: list[str] = []

    def one(pair: str) -> np.ndarray | None:
        calls.append(pair)
        close = closes[pair][-(window + 1) :]
        return np.diff(close) / close[:-1] if len(close) > 2 else None

    view = ReturnsView(one, list(closes))
    expected = {
        p: np.diff(c[-(window + 1) :]) / c[-(window + 1) : -1]
        for p, c in closes.items()
        if len(c) > 2
    }
    assert set(view) == set(expected)
    assert len(view) == len(expected)
    for pair, returns in expected.items():
        np.testing.assert_array_equal(view[pair], returns)
    assert "ZZZ" not in view
    assert sorted(calls) == sorted(closes)  # each pair computed once, however often read


def test_an_entry_with_nothing_held_reads_no_returns() -> None:
    """An entry with no position held is sized without any returns computed (the guard has
    nothing to compare); with a position held, both pairs' returns are read and compared."""
    calls: list[str] = []
    rng = np.random.default_rng(0)
    series = {p: rng.normal(0, 0.01, 30) for p in ("BTC/USDT", "ETH/USDT")}

    def one(pair: str) -> np.ndarray | None:
        calls.append(pair)
        return series[pair]

    manager = RiskManager(risk_settings())
    flat = context(returns=ReturnsView(one, ["BTC/USDT"]))
    assert isinstance(manager.evaluate(signal(), flat), OrderIntent)
    assert calls == []
    held = {"ETH/USDT": position()}
    view = ReturnsView(one, ["BTC/USDT", "ETH/USDT"])
    assert isinstance(
        manager.evaluate(signal(), context(returns=view, positions=held)), OrderIntent
    )
    assert sorted(calls) == ["BTC/USDT", "ETH/USDT"]
    assert manager.correlation.last_pairs == ("BTC/USDT", "ETH/USDT")
