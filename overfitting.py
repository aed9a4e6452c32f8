"""How much of a backtest's edge is selection luck: deflated Sharpe ratio and PBO.

Two estimates, both from Bailey and Lopez de Prado, used wherever a choice is made among many
tried configurations (the optimiser's chosen point, a challenger model's validation):

* `deflated_sharpe` (DSR): the probability that the true Sharpe ratio of the chosen
  configuration is above the best Sharpe ratio that `n_trials` configurations with no edge
  would show by chance ("The Deflated Sharpe Ratio", 2014). It corrects the probabilistic
  Sharpe ratio for the number of trials, for short samples and for non-normal returns.
* `pbo` (probability of backtest overfitting) by combinatorially symmetric
  cross-validation ("The Probability of Backtest Overfitting", 2016): split the common time
  axis into `blocks` pieces, take every half of them as in-sample, pick the in-sample best
  configuration and see where it ranks out of sample. PBO is the share of splits where the
  in-sample winner lands in the bottom half out of sample.

Sharpe ratios here are per period (not annualised): the statistics need the number of
observations they were measured on, not a year.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm


EULER_GAMMA = 0.5772156649015329


def sharpe_per_period(returns: np.ndarray) -> float:
    """Return mean / standard deviation (ddof 1) of `returns`; 0 where it does not exist."""
    values = np.asarray(returns, dtype=np.float64)
    if values.size < 2:
        return 0.0
    deviation = float(values.std(ddof=1))
    return float(values.mean()) / deviation if deviation > 0 else 0.0


def probabilistic_sharpe(
    sharpe: float, n_obs: int, benchmark: float = 0.0, skew: float = 0.0, kurtosis: float = 3.0
) -> float:
    """Return P(true Sharpe > `benchmark`) given an observed per-period `sharpe`.

    `kurtosis` is the plain (not excess) kurtosis of the returns: 3 for a normal law.
    """
    if n_obs < 2:
        return 0.0
    variance = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe * sharpe
    if variance <= 0:
        return 0.0
    return float(norm.cdf((sharpe - benchmark) * math.sqrt(n_obs - 1) / math.sqrt(variance)))


def expected_max_sharpe(n_trials: int, trial_variance: float) -> float:
    """Return the expected largest Sharpe ratio of `n_trials` no-edge configurations.

    `trial_variance` is the variance of the Sharpe ratios across the trials; with one trial
    there is no selection and the expectation is 0.
    """
    if n_trials <= 1 or trial_variance <= 0:
        return 0.0
    n = float(n_trials)
    return math.sqrt(trial_variance) * (
        (1 - EULER_GAMMA) * float(norm.ppf(1 - 1 / n))
        + EULER_GAMMA * float(norm.ppf(1 - 1 / (n * math.e)))
    )


def deflated_sharpe(returns: np.ndarray, n_trials: int, trial_variance: float) -> float:
    """Return the deflated Sharpe ratio of the chosen configuration's per-period `returns`.

    `n_trials` configurations were tried and their per-period Sharpe ratios had variance
    `trial_variance`. A value near 1 means the edge survives the selection; near 0, the best
    of that many no-edge trials would look as good.
    """
    values = np.asarray(returns, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = values.size
    if n < 3:
        return 0.0
    sharpe = sharpe_per_period(values)
    deviation = float(values.std())
    if deviation > 0:
        z = (values - values.mean()) / deviation
        skew = float((z**3).mean())
        kurtosis = float((z**4).mean())
    else:
        skew, kurtosis = 0.0, 3.0
    benchmark = expected_max_sharpe(n_trials, trial_variance)
    return probabilistic_sharpe(sharpe, n, benchmark, skew, kurtosis)


@dataclass(frozen=True, slots=True)
class PBOResult:
    """The outcome of combinatorially symmetric cross-validation.

    Attributes:
        pbo: the share of splits whose in-sample best ranks in the bottom half out of sample.
        logits: the logit of the winner's out-of-sample relative rank, one per split.
        splits: how many in-sample/out-of-sample splits were evaluated.
        degradation: the mean out-of-sample minus in-sample Sharpe of the in-sample winner.
    """

    pbo: float
    logits: np.ndarray
    splits: int
    degradation: float


def pbo(returns: np.ndarray, blocks: int = 16) -> PBOResult:
    """Return the probability of backtest overfitting of a family of configurations.

    Args:
        returns: a (periods x configurations) matrix of per-period returns on one time axis.
        blocks: the even number of contiguous blocks the periods are cut into; every choice
            of half of them is one in-sample set (C(16, 8) = 12,870 splits by default).

    Raises:
        ValueError: with fewer than two configurations, an odd `blocks`, or fewer periods
            than blocks.
    """
    matrix = np.asarray(returns, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise ValueError("pbo needs a (periods x configurations) matrix of at least 2 columns")
    if blocks < 2 or blocks % 2:
        raise ValueError(f"blocks must be even and at least 2, not {blocks}")
    periods, configs = matrix.shape
    if periods < blocks:
        raise ValueError(f"{periods} periods cannot be cut into {blocks} blocks")
    matrix = np.nan_to_num(matrix)
    edges = np.linspace(0, periods, blocks + 1).astype(np.int64)
    # Per block and configuration: count, sum and sum of squares, so each split's Sharpe
    # ratios come from adding blocks instead of re-reading the returns.
    count = np.diff(edges).astype(np.float64)
    sums = np.add.reduceat(matrix, edges[:-1], axis=0)
    squares = np.add.reduceat(matrix * matrix, edges[:-1], axis=0)
    chosen = np.array(list(itertools.combinations(range(blocks), blocks // 2)), dtype=np.int64)
    mask = np.zeros((len(chosen), blocks), dtype=np.float64)
    np.put_along_axis(mask, chosen, 1.0, axis=1)
    in_sharpe = _sharpe_of(mask, count, sums, squares)
    out_sharpe = _sharpe_of(1.0 - mask, count, sums, squares)
    rows = np.arange(len(chosen))
    best = in_sharpe.argmax(axis=1)
    winner_out = out_sharpe[rows, best]
    # Relative rank of the winner out of sample in (0, 1): 1 is best; ties share the middle.
    below = (out_sharpe < winner_out[:, None]).sum(axis=1)
    ties = (out_sharpe == winner_out[:, None]).sum(axis=1)
    omega = (below + (ties + 1) / 2.0) / (configs + 1)
    logits = np.log(omega / (1.0 - omega))
    return PBOResult(
        pbo=float((logits <= 0).mean()),
        logits=logits,
        splits=len(chosen),
        degradation=float((winner_out - in_sharpe[rows, best]).mean()),
    )


def _sharpe_of(
    mask: np.ndarray, count: np.ndarray, sums: np.ndarray, squares: np.ndarray
) -> np.ndarray:
    """Return the per-period Sharpe ratio of each configuration over each split's blocks."""
    n = mask @ count
    total = mask @ sums
    total_sq = mask @ squares
    mean = total / n[:, None]
    variance = (total_sq - n[:, None] * mean * mean) / np.maximum(n[:, None] - 1, 1)
    deviation = np.sqrt(np.maximum(variance, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(deviation > 0, mean / deviation, 0.0)
