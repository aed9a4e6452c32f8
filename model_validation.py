"""Walk-forward validation of a challenger: anchored folds, each scored out of sample.

A model kind trains on the candles it is given and holds out their newest part itself
(`Trained.validation_returns`, after `metrics["train_end_ms"]`). Walk-forward calls it on
nested, anchored prefixes of the candles so that every fold's held-out segment lies before
the next fold's and none overlaps another:

    fold 3 (newest): trains on candles[: N],      scores its tail  (t2, N]
    fold 2:          trains on candles[: t2],     scores its tail  (t1, t2]
    fold 1 (oldest): trains on candles[: t1],     scores its tail  (t0, t1]

where `t_k` is the last candle fold `k + 1` trained on. The newest fold is the model that
is registered; the older ones exist only to be scored. Each fold's out-of-sample returns
get the one score (`promotion_score`, `reward_system.score`) and the deflated Sharpe ratio
(`overfitting.deflated_sharpe`) over the number of trials; the verdict uses the folds'
mean score and the deflated Sharpe of all their out-of-sample returns together.

Folds are trained newest first and share the training time budget (each gets what is left
divided by the folds still to train), so the whole walk-forward stays within it; an older
fold that has too few candles or no time left is skipped, and the figures say how many ran.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from config import RewardSettings
from error_handler import DataError
from model_registry import ModelKind, Trained


log = structlog.get_logger(__name__)

_MIN_FOLD_S = 1.0  # an older fold is not started with less time than this left
_MIN_COMPARED_BARS = 2  # a fold's head-to-head needs this many bars unseen by both models


@dataclass(frozen=True, slots=True)
class Scoring:
    """How per-bar returns become the promotion test's score: bar length and score weights."""

    bar_ms: int
    reward: RewardSettings = field(default_factory=RewardSettings)


def promotion_score(returns: np.ndarray, scoring: Scoring) -> float:
    """Return the score the promotion tests compare: `reward_system.score(...).total`.

    The one place the comparison is defined. Per-bar returns carry no trade record, so the
    score sees their equity curve only (its Sharpe, Sortino, drawdown and consistency).
    """
    from reward_system import score

    values = np.asarray(returns, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return 0.0
    ts = np.arange(values.size + 1, dtype=np.int64) * scoring.bar_ms
    equity = np.concatenate([[1.0], np.cumprod(1.0 + values)])
    total = score([], ts, equity, scoring.reward).total
    return float(total) if math.isfinite(total) else 0.0


# -- Training the folds ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoldRun:
    """One trained fold: the model, the candles it was given and where its test starts."""

    trained: Trained
    frame: pd.DataFrame
    train_end_ms: int  # the last candle it trained on: later ones are out of sample for it

    @property
    def end_ms(self) -> int:
        """Return the newest candle of the fold."""
        return _ms(self.frame.index[-1])

    def returns(self) -> np.ndarray:
        """Return the fold's out-of-sample per-bar returns, as the kind reports them."""
        return np.asarray(self.trained.validation_returns(), dtype=np.float64)


def train_folds(
    kind: ModelKind,
    pair: str,
    frame: pd.DataFrame,
    *,
    folds: int,
    seed: int,
    time_budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[FoldRun]:
    """Train up to `folds` anchored walk-forward folds; return them oldest first.

    The newest fold (the last element) is trained on all of `frame` and is always there;
    older folds stop at the first one with too few candles or too little time.

    Raises:
        DataError: the newest fold cannot be trained (too few candles, over its budget).
    """
    deadline = clock() + time_budget_s
    runs: list[FoldRun] = []
    candles = frame
    for done in range(folds):
        left = deadline - clock()
        if done and left < _MIN_FOLD_S:
            log.warning("fold_skipped", pair=pair, fold=folds - done, reason="time budget spent")
            break
        try:
            trained = kind.train({pair: candles}, seed=seed, time_budget_s=left / (folds - done))
        except DataError as e:
            if not done:
                raise
            log.warning("fold_skipped", pair=pair, fold=folds - done, reason=e.message)
            break
        run = FoldRun(trained, candles, _train_end_ms(trained, candles))
        runs.append(run)
        candles = candles[_index_ms(candles) <= run.train_end_ms]
    return runs[::-1]


def _train_end_ms(trained: Trained, frame: pd.DataFrame) -> int:
    # The kind says where its training stopped; without that, its held-out returns are
    # taken to be the newest bars of the frame.
    end = trained.metrics.get("train_end_ms")
    if end is not None and math.isfinite(end):
        return int(end)
    held_out = len(trained.validation_returns())
    position = len(frame) - held_out - 1
    return _ms(frame.index[max(position, 0)])


# -- Scoring the folds -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fold:
    """One fold's out-of-sample figures, beside the champion's on the bars both never saw."""

    index: int  # 1 is the oldest fold
    start_ms: int  # out of sample after this candle (the last one the fold trained on)
    end_ms: int
    bars: int
    score: float
    deflated_sharpe: float
    flat: float  # staying flat on the same bars (the first model's baseline)
    compared_bars: int = 0
    challenger: float | None = None  # on the compared bars (replayed, as the champion)
    champion: float | None = None

    def figures(self) -> dict[str, float]:
        """Return the fold's numbers for the version's manifest (`fold<k>_...`)."""
        prefix = f"fold{self.index}_"
        out = {
            "start_ms": float(self.start_ms),
            "end_ms": float(self.end_ms),
            "bars": float(self.bars),
            "score": self.score,
            "deflated_sharpe": self.deflated_sharpe,
            "compared_bars": float(self.compared_bars),
        }
        if self.challenger is not None and self.champion is not None:
            out |= {"head_to_head": self.challenger, "champion_score": self.champion}
        return {prefix + key: value for key, value in out.items()}

    def to_json(self) -> dict[str, float | int | None]:
        """Return the fold for the `--mode train` summary."""
        return {
            "fold": self.index,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "bars": self.bars,
            "score": self.score,
            "deflated_sharpe": self.deflated_sharpe,
            "flat": self.flat,
            "compared_bars": self.compared_bars,
            "challenger": self.challenger,
            "champion": self.champion,
        }


@dataclass(frozen=True, slots=True)
class Champion:
    """The champion's per-bar returns replayed on the candles, and its training's end."""

    returns: pd.Series
    train_end_ms: int


Replay = Callable[[Path, pd.DataFrame], pd.Series]


def score_folds(
    runs: Sequence[FoldRun],
    scoring: Scoring,
    *,
    trials: int,
    trial_variance: float,
    champion: Champion | None = None,
    replay: Replay | None = None,
    saved: Path | None = None,
) -> list[Fold]:
    """Score each fold out of sample; beside the champion where `replay` can run both.

    Args:
        runs: the folds, oldest first (`train_folds`).
        scoring: the score's bar length and weights.
        trials: versions ever trained for the name (the deflated Sharpe's trial count).
        trial_variance: the variance of those trials' per-period Sharpe ratios.
        champion: the champion's replay on the candles (None: no head-to-head).
        replay: the kind's `replay(directory, frame)` (None: the kind cannot replay).
        saved: where the newest fold is saved already (older folds go to a scratch folder).
    """
    from overfitting import deflated_sharpe

    out = []
    for i, run in enumerate(runs, start=1):
        returns = run.returns()
        fold = Fold(
            index=i,
            start_ms=run.train_end_ms,
            end_ms=run.end_ms,
            bars=int(returns.size),
            score=promotion_score(returns, scoring),
            deflated_sharpe=deflated_sharpe(returns, trials, trial_variance),
            flat=promotion_score(np.zeros(returns.size), scoring),
        )
        if champion is not None and replay is not None:
            directory = saved if i == len(runs) else None
            fold = _head_to_head(fold, run, scoring, champion, replay, directory)
        out.append(fold)
    return out


def _head_to_head(
    fold: Fold,
    run: FoldRun,
    scoring: Scoring,
    champion: Champion,
    replay: Replay,
    directory: Path | None,
) -> Fold:
    # Both models on the fold's bars that neither trained on, with the same accounting.
    after = max(run.train_end_ms, champion.train_end_ms)
    theirs = _between(champion.returns, after, run.end_ms)
    if theirs.size < _MIN_COMPARED_BARS:
        return fold
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="fold-") as scratch:
            run.trained.save(Path(scratch))
            mine = replay(Path(scratch), run.frame)
    else:
        mine = replay(directory, run.frame)
    joined = pd.concat({"mine": mine, "theirs": champion.returns}, axis=1).dropna()
    ts = _index_ms(joined)
    joined = joined[(ts > after) & (ts <= run.end_ms)]
    if len(joined) < _MIN_COMPARED_BARS:
        return fold
    return Fold(
        index=fold.index,
        start_ms=fold.start_ms,
        end_ms=fold.end_ms,
        bars=fold.bars,
        score=fold.score,
        deflated_sharpe=fold.deflated_sharpe,
        flat=fold.flat,
        compared_bars=len(joined),
        challenger=promotion_score(joined["mine"].to_numpy(), scoring),
        champion=promotion_score(joined["theirs"].to_numpy(), scoring),
    )


def _between(series: pd.Series, after_ms: int, until_ms: int) -> np.ndarray:
    ts = _index_ms(series)
    return np.asarray(series.to_numpy(dtype=np.float64)[(ts > after_ms) & (ts <= until_ms)])


# -- The aggregate ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The folds taken together: what the verdict compares."""

    score: float  # the mean of the folds' out-of-sample scores
    flat: float  # the mean of staying flat on the same bars
    challenger: float | None  # the mean head-to-head score over the compared folds
    champion: float | None  # the champion's mean there
    compared: int  # folds with a head-to-head


def aggregate(folds: Sequence[Fold]) -> Aggregate:
    """Return the folds' means: own score, flat, and head-to-head where it ran."""
    compared = [f for f in folds if f.challenger is not None and f.champion is not None]
    return Aggregate(
        score=float(np.mean([f.score for f in folds])),
        flat=float(np.mean([f.flat for f in folds])),
        challenger=float(np.mean([f.challenger for f in compared])) if compared else None,
        champion=float(np.mean([f.champion for f in compared])) if compared else None,
        compared=len(compared),
    )


def _index_ms(data: pd.Series | pd.DataFrame) -> np.ndarray:
    return np.asarray(pd.DatetimeIndex(data.index).as_unit("ms").asi8)


def _ms(stamp: pd.Timestamp) -> int:
    return int(pd.Timestamp(stamp).value // 1_000_000)
