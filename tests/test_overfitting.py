"""The deflated Sharpe ratio and the probability of backtest overfitting on known cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import overfitting


def test_probabilistic_sharpe_matches_the_closed_form_for_normal_returns() -> None:
    """PSR of a per-period Sharpe of 0.1 over 101 normal returns is Phi(1 / sqrt(1.005))."""
    expected = 0.5 * (1 + math.erf(0.1 * 10 / math.sqrt(1 + 0.5 * 0.01) / math.sqrt(2)))
    assert overfitting.probabilistic_sharpe(0.1, 101) == pytest.approx(expected, abs=1e-12)


def test_expected_max_sharpe_agrees_with_simulated_maxima() -> None:
    """The closed-form expected best of 100 no-edge Sharpe ratios is within 3% of simulation."""
    rng = np.random.default_rng(7)
    draws = rng.normal(0.0, 0.2, size=(20_000, 100)).max(axis=1).mean()
    assert overfitting.expected_max_sharpe(100, 0.04) == pytest.approx(draws, rel=0.03)
    assert overfitting.expected_max_sharpe(1, 0.04) == 0.0


def test_deflated_sharpe_rejects_the_best_of_a_hundred_no_edge_strategies() -> None:
    """The best of 100 pure-noise strategies looks good alone but fails once deflated."""
    rng = np.random.default_rng(11)
    family = rng.normal(0.0, 0.01, size=(500, 100))
    sharpes = np.array([overfitting.sharpe_per_period(family[:, i]) for i in range(100)])
    best = family[:, int(sharpes.argmax())]
    assert overfitting.probabilistic_sharpe(sharpes.max(), 500) > 0.95
    assert overfitting.deflated_sharpe(best, 100, float(sharpes.var(ddof=1))) < 0.95


def test_deflated_sharpe_keeps_a_real_edge() -> None:
    """A strategy with a per-period Sharpe of 0.3 survives deflation over 100 trials."""
    rng = np.random.default_rng(3)
    edge = rng.normal(0.003, 0.01, size=500)
    assert overfitting.deflated_sharpe(edge, 100, 0.002) > 0.95


def test_pbo_of_a_pure_noise_family_is_at_least_a_half() -> None:
    """With no edge anywhere, the in-sample winner loses out of sample at least half the time.

    One noise data set gives a PBO anywhere between 0.1 and 0.9 (its splits share the same
    returns), so the figure is pooled over 30 independent families.
    """
    results = [
        overfitting.pbo(np.random.default_rng(seed).normal(0.0, 0.01, size=(1_000, 41)), blocks=10)
        for seed in range(30)
    ]
    assert all(r.splits == math.comb(10, 5) for r in results)
    assert float(np.mean([r.pbo for r in results])) >= 0.5
    assert float(np.mean([r.degradation for r in results])) < 0


def test_pbo_is_small_when_one_member_has_a_real_edge() -> None:
    """A family where one member has a real edge is not overfit: PBO at most 0.05."""
    rng = np.random.default_rng(5)
    family = rng.normal(0.0, 0.01, size=(2_000, 40))
    family[:, 17] += 0.002
    assert overfitting.pbo(family, blocks=10).pbo <= 0.05


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.sampled_from([2, 4, 6, 8]))
def test_pbo_is_a_probability_and_agrees_with_a_direct_recount(
    seed: int, configs: int, blocks: int
) -> None:
    """PBO lies in [0, 1] and equals a split-by-split recount from the raw returns."""
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, 1.0, size=(blocks * 5, configs))
    result = overfitting.pbo(matrix, blocks=blocks)
    assert 0.0 <= result.pbo <= 1.0
    parts = np.array_split(np.arange(blocks * 5), blocks)
    losses = 0
    for chosen in itertools.combinations(range(blocks), blocks // 2):
        inside = np.concatenate([parts[i] for i in chosen])
        outside = np.concatenate([parts[i] for i in range(blocks) if i not in chosen])
        in_s = [overfitting.sharpe_per_period(matrix[inside, c]) for c in range(configs)]
        out_s = np.array(
            [overfitting.sharpe_per_period(matrix[outside, c]) for c in range(configs)]
        )
        w = out_s[int(np.argmax(in_s))]
        omega = ((out_s < w).sum() + ((out_s == w).sum() + 1) / 2) / (configs + 1)
        losses += omega <= 0.5
    assert result.pbo == pytest.approx(losses / math.comb(blocks, blocks // 2), abs=1e-9)


def test_pbo_refuses_a_malformed_matrix() -> None:
    """One configuration, an odd block count or too few periods is a clear error."""
    with pytest.raises(ValueError, match="at least 2 columns"):
        overfitting.pbo(np.zeros((100, 1)))
    with pytest.raises(ValueError, match="even"):
        overfitting.pbo(np.zeros((100, 3)), blocks=5)
    with pytest.raises(ValueError, match="cannot be cut"):
        overfitting.pbo(np.zeros((4, 3)), blocks=8)
