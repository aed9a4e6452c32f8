"""Correlation: the rolling matrix, and new positions cut down or refused next to held ones."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import MarketType, OrderIntent, PositionSide, Side, Veto
from portfolio import Portfolio, _Open
from risk_guards import CorrelationGuard, Resize, ReturnsView, correlations_with
from risk_management import RiskManager, correlation_matrix
from tests.test_risk_support import context, correlated, market, position, signal
from tests.test_risk_support import settings as risk_settings


BASE_QTY = Decimal("25")  # 1% of 10,000 over a 4 stop, no fees: what an uncorrelated entry gets


def _manager() -> RiskManager:
    return RiskManager(
        risk_settings(max_correlation=0.8, correlation_window=100, max_position_fraction=1.0),
        hard_correlation=0.95,
        long_only=False,
    )


def _evaluate(
    rho: float, *, side: Side = Side.BUY, held_side: PositionSide = PositionSide.LONG
) -> OrderIntent | Veto:
    held, candidate = correlated(rho)
    ctx = context(
        positions={"ETH/USDT": position("ETH/USDT", held_side, qty="1")},
        returns={"BTC/USDT": candidate, "ETH/USDT": held},
        mkt=market(type=MarketType.LINEAR),  # linear, so shorts are possible
    )
    return _manager().evaluate(signal(side=side), ctx)


def test_correlation_matrix_of_constructed_series() -> None:
    """x, 0.5-correlated y and -x give 1 on the diagonal, 0.5 and -1 off it."""
    x, y = correlated(0.5)
    pairs, matrix = correlation_matrix({"A": x, "B": y, "C": -x}, window=200)
    assert pairs == ("A", "B", "C")
    assert np.diag(matrix) == pytest.approx([1.0, 1.0, 1.0])
    assert matrix[0, 1] == pytest.approx(0.5)
    assert matrix[0, 2] == pytest.approx(-1.0)
    assert matrix[1, 2] == pytest.approx(-0.5)


def test_correlation_matrix_uses_the_last_window_bars_only() -> None:
    """Old bars outside the window do not count: a series that later tracks x reads as 1."""
    x, _ = correlated(0.0, n=60)
    y = np.concatenate([-x[:30], x[30:]])
    _, whole = correlation_matrix({"x": x, "y": y}, window=60)
    _, recent = correlation_matrix({"x": x, "y": y}, window=30)
    assert whole[0, 1] < 0.9
    assert recent[0, 1] == pytest.approx(1.0)


def test_correlation_matrix_is_nan_without_enough_data_or_movement() -> None:
    """Too few bars, or a flat series, give NaN instead of a made-up number."""
    x, _ = correlated(0.0, n=50)
    _, short = correlation_matrix({"x": x[:5], "y": x[:5]}, window=100)
    assert np.isnan(short).all()
    _, flat = correlation_matrix({"x": x, "y": np.zeros(50)}, window=100)
    assert np.isnan(flat[0, 1])
    assert flat[0, 0] == pytest.approx(1.0)


def test_uncorrelated_entry_keeps_its_full_size() -> None:
    """At correlation 0.3 with the held long the size is untouched."""
    intent = _evaluate(0.3)
    assert isinstance(intent, OrderIntent)
    assert intent.qty == BASE_QTY


def test_correlated_entry_is_cut_down_by_the_excess() -> None:
    """At 0.875 (halfway from 0.8 to the 0.95 hard limit) the size is halved."""
    intent = _evaluate(0.875)
    assert isinstance(intent, OrderIntent)
    assert float(intent.qty) == pytest.approx(12.5, abs=0.001)
    assert "bound by correlation" in intent.reason
    assert "ETH/USDT" in intent.reason


def test_entry_above_the_hard_limit_is_refused() -> None:
    """At 0.97 the entry is refused, naming the held pair and the correlation."""
    veto = _evaluate(0.97)
    assert isinstance(veto, Veto)
    assert veto.guard == "correlation"
    assert "+0.97" in veto.reason
    assert "ETH/USDT" in veto.reason


def test_anti_correlated_entry_in_the_same_direction_is_a_hedge() -> None:
    """A long that moves against a held long (-0.9) is not concentration: full size."""
    intent = _evaluate(-0.9)
    assert isinstance(intent, OrderIntent)
    assert intent.qty == BASE_QTY


def test_short_against_an_anti_correlated_long_is_the_same_bet() -> None:
    """A short on a pair at -0.9 to a held long doubles the bet: cut to 1/3."""
    intent = _evaluate(-0.9, side=Side.SELL)
    assert isinstance(intent, OrderIntent)
    assert float(intent.qty) == pytest.approx(25 / 3, abs=0.001)


def test_no_returns_means_no_correlation_judgement() -> None:
    """Without returns for the candidate the guard stays out of the decision."""
    risk = _manager()
    ctx = context(positions={"ETH/USDT": position()}, returns=None)
    intent = risk.evaluate(signal(), ctx)
    assert isinstance(intent, OrderIntent)
    assert intent.qty == BASE_QTY


def test_describe_exposes_the_last_matrix() -> None:
    """The last computed matrix is part of the UI description."""
    risk = _manager()
    held, candidate = correlated(0.5)
    ctx = context(
        positions={"ETH/USDT": position()}, returns={"BTC/USDT": candidate, "ETH/USDT": held}
    )
    risk.evaluate(signal(), ctx)
    info = risk.describe()["correlation"]
    assert info["pairs"] == ["BTC/USDT", "ETH/USDT"]
    assert info["matrix"][0][1] == pytest.approx(0.5)


_series = st.lists(
    st.floats(-0.05, 0.05, allow_nan=False) | st.just(float("nan")), min_size=0, max_size=40
).map(np.array)


@settings(max_examples=150, deadline=None)
@given(candidate=_series, held=st.lists(_series, min_size=1, max_size=6), window=st.integers(5, 50))
def test_the_guard_row_is_the_matrix_row_and_does_not_depend_on_what_was_cached(
    candidate: np.ndarray, held: list[np.ndarray], window: int
) -> None:
    """The candidate's correlations with the held pairs equal its row of the full matrix (gaps
    dropped, NaN where too short or flat), and the same check after others (the held rows
    kept, some held pairs gone) gives the same numbers to the last bit."""
    pairs = {"C": candidate, **{f"H{i}": s for i, s in enumerate(held)}}
    _, matrix = correlation_matrix(pairs, window, min_overlap=5)
    fresh, cache = correlations_with(candidate, held, window, min_overlap=5)
    np.testing.assert_allclose(fresh, matrix[0, 1:], rtol=1e-9, atol=1e-12)
    assert np.array_equal(np.isnan(fresh), np.isnan(matrix[0, 1:]))
    # The cache from a check with part of the held pairs, then again with all of them.
    _, cache = correlations_with(held[0], held[1:] or held, window, min_overlap=5, cache=cache)
    again, _ = correlations_with(candidate, held, window, min_overlap=5, cache=cache)
    assert np.array_equal(again, fresh, equal_nan=True)


def test_a_burst_of_candidates_against_many_held_pairs_reads_no_position_for_the_sides() -> None:
    """Sides come from the portfolio's view without building 40 positions per candidate; the
    verdict names the most correlated held pair."""
    rng = np.random.default_rng(5)
    base = rng.normal(0, 0.01, 120)
    portfolio = Portfolio(Decimal(100_000))
    returns: dict[str, np.ndarray] = {}
    for i in range(40):
        pair = f"P{i:02d}/USDT"
        portfolio._open[pair] = _Open(Decimal(1), Decimal(10), 0, Decimal(0))
        returns[pair] = base + rng.normal(0, 0.001 if i == 0 else 0.05, 120)
    returns["BTC/USDT"] = base + rng.normal(0, 0.001, 120)
    view = portfolio.positions_view()
    ctx = replace(context(returns=returns), positions=view)
    manager = RiskManager(
        risk_settings(max_correlation=0.8, correlation_window=100, max_open_positions=100),
        hard_correlation=0.95,
    )
    verdict = manager.evaluate(signal(), ctx)
    assert isinstance(verdict, Veto)
    assert "P00/USDT" in verdict.reason
    assert not view._built.keys() - {"P00/USDT"}  # only the one named was built


def _held_portfolio(sides: list[bool]) -> Portfolio:
    # Held pairs H0, H1, ... long (True) or short (False).
    portfolio = Portfolio(Decimal(100_000))
    for i, long in enumerate(sides):
        qty = Decimal(1) if long else Decimal(-1)
        portfolio._open[f"H{i}/USDT"] = _Open(qty, Decimal(10), 0, Decimal(0))
    return portfolio


def _checks(
    guard: CorrelationGuard,
    portfolio: Portfolio,
    series: dict[str, np.ndarray],
    candidates: list[tuple[str, Side]],
    token: str | None,
) -> list[Veto | Resize | None]:
    # Each candidate checked on a context of its own, as the engine builds them; `token`
    # None: plain returns, nothing kept between the checks.
    verdicts = []
    for pair, side in candidates:
        pairs = [pair, *portfolio._open]
        returns = ReturnsView(series.get, pairs, token) if token else {p: series[p] for p in pairs}
        ctx = replace(context(returns=returns), positions=portfolio.positions_view())
        verdicts.append(guard.check(signal(pair=pair, side=side), ctx))
    return verdicts


def _guard(window: int, soft: float = 1e-9, hard: float = 1.0) -> CorrelationGuard:
    # By default any positive correlation resizes, by a factor that carries its every bit.
    return CorrelationGuard(soft, hard, window, min_overlap=5)


_BASE = np.random.default_rng(0).normal(0, 0.01, 60)


def _window(seed: int, n: int, weight: float) -> np.ndarray:
    # A complete window: the shared base's last `n` returns mixed with noise of its own.
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    return np.asarray(weight * _BASE[-n:] + (1 - weight) * noise)


# Mostly complete series correlated to any degree (gaps are the exception, as live).
_windows = st.one_of(
    *[st.builds(_window, st.integers(0, 2**32 - 1), st.integers(8, 60), st.floats(0, 1))] * 4,
    _series,
)


@settings(max_examples=150, deadline=None)
@given(
    held=st.lists(st.tuples(_windows, st.booleans()), min_size=1, max_size=6),
    candidates=st.lists(st.tuples(_windows, st.booleans()), min_size=1, max_size=5),
    window=st.integers(5, 50),
)
def test_a_bursts_checks_share_the_held_pairs_work_and_give_fresh_checks_verdicts(
    held: list[tuple[np.ndarray, bool]], candidates: list[tuple[np.ndarray, bool]], window: int
) -> None:
    """Checks whose returns carry one token (a burst's entries) compute the held pairs' part
    once and give, to the last bit, the verdicts of checks that keep nothing (gaps, short and
    flat series, longs and shorts on both sides included)."""
    portfolio = _held_portfolio([long for _, long in held])
    series = {f"H{i}/USDT": s for i, (s, _) in enumerate(held)}
    series |= {f"C{j}/USDT": s for j, (s, _) in enumerate(candidates)}
    wanted = [
        (f"C{j}/USDT", Side.BUY if buy else Side.SELL) for j, (_, buy) in enumerate(candidates)
    ]
    fresh = [_checks(_guard(window), portfolio, series, [c], None)[0] for c in wanted]
    guard = _guard(window)
    kept = _checks(guard, portfolio, series, wanted[:1], "burst")
    block = guard._block
    kept += _checks(guard, portfolio, series, wanted[1:], "burst")
    assert kept == fresh
    assert guard._block is block  # the held pairs' part was computed once


def test_the_held_pairs_work_is_not_kept_past_a_new_token_or_a_side_that_changed() -> None:
    """A new token (new candles) or a held position on the other side (same pairs) is a new
    computation: the verdict follows the side held now."""
    held, candidate = correlated(0.85)
    series = {"H0/USDT": held, "C0/USDT": candidate}
    guard, buy = _guard(100, 0.2, 0.9), [("C0/USDT", Side.BUY)]
    portfolio = _held_portfolio([True])
    (cut,) = _checks(guard, portfolio, series, buy, "t1")
    assert isinstance(cut, Resize)  # a long next to a correlated long: cut down
    first = guard._block
    _checks(guard, portfolio, series, buy, "t2")
    assert guard._block is not first
    second = guard._block
    portfolio._open["H0/USDT"] = _Open(Decimal(-1), Decimal(10), 0, Decimal(0))
    assert _checks(guard, portfolio, series, buy, "t2") == [None]  # now a hedge
    assert guard._block is not second
