"""Walk-forward validation: anchored folds, the champion on the same bars, flat for a first."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from itertools import accumulate, pairwise
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import LearningSettings
from model_registry import Registry
from model_training import (
    TrainRequest,
    decide,
    fold_scores,
    load_shadow,
    model_name,
    run_train_cli,
    train_and_validate,
)
from model_validation import Scoring, train_folds
from models import Event, ModelPromoted, ModelRejected
from tests.model_kinds import Contrarian, RuleModel, mean_reverting


PAIR = "BTC/USDT"
SCORING = Scoring(3_600_000)
CONTRARIAN = "tests.model_kinds:Contrarian"
MOMENTUM = "tests.model_kinds:Momentum"
NAME = model_name(CONTRARIAN, PAIR, "1h")


def request(tmp_path: Path, kind: str, **learning: float | bool) -> TrainRequest:
    settings = LearningSettings.model_validate(
        {"promotion_margin": 0.5, "time_budget": 60.0, **learning}
    )
    return TrainRequest(
        kind=kind,
        name=NAME,
        pair=PAIR,
        timeframe="1h",
        learning=settings,
        models_dir=tmp_path,
        features_dir=None,
        scoring=SCORING,
    )


def _ignore(event: Event) -> None:
    return None


def test_folds_are_anchored_and_each_scores_only_candles_after_its_training() -> None:
    """Each fold trains on a prefix that ends where the next fold's test begins."""
    frame = mean_reverting(2000, seed=1)
    runs = train_folds(Contrarian(), PAIR, frame, folds=4, seed=0, time_budget_s=60)
    assert len(runs) == 4
    assert runs[-1].frame is frame  # the newest fold is the model that gets registered
    for older, newer in pairwise(runs):
        assert older.frame.index[0] == frame.index[0]  # anchored at the first candle
        assert older.end_ms == newer.train_end_ms  # trained on nothing the newer one tests
        assert older.train_end_ms < older.end_ms
    assert [len(r.returns()) for r in runs] == [
        len(r.frame) - int(len(r.frame) * 0.7) for r in runs
    ]


@settings(max_examples=25, deadline=None)
@given(bars=st.integers(200, 1500), folds=st.integers(1, 5))
def test_fold_test_segments_never_overlap_and_follow_their_training(bars: int, folds: int) -> None:
    """Whatever the size, every fold tests only candles after all it trained on, in order."""
    frame = mean_reverting(bars, seed=bars)
    runs = train_folds(Contrarian(), PAIR, frame, folds=folds, seed=0, time_budget_s=60)
    assert len(runs) == folds
    segments = [(r.train_end_ms, r.end_ms) for r in runs]
    assert all(start < end for start, end in segments)
    assert all(a[1] <= b[0] for a, b in pairwise(segments))  # disjoint, oldest first
    for run in runs:
        assert run.frame.index[-1] <= frame.index[-1]
        tested = int((run.frame.index > pd.Timestamp(run.train_end_ms, unit="ms", tz="UTC")).sum())
        assert len(run.returns()) == tested


class _Clocked(Contrarian):
    """The contrarian rule whose training takes `share` of the budget it is given."""

    def __init__(self, clock: list[float], share: float) -> None:
        super().__init__()
        self.clock, self.share, self.budgets = clock, share, list[float]()

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> RuleModel:
        """Train, spending `share` of the budget on the clock."""
        self.budgets.append(time_budget_s)
        self.clock[0] += self.share * time_budget_s
        return super().train(frames, seed=seed, time_budget_s=time_budget_s)


@pytest.mark.parametrize(("share", "trained"), [(0.5, 3), (1.0, 3), (3.5, 1)])
def test_the_folds_share_one_time_budget(share: float, trained: int) -> None:
    """The folds together never get more than the budget; older ones wait for time left."""
    now = [0.0]
    kind = _Clocked(now, share)
    frame = mean_reverting(1500, seed=2)
    runs = train_folds(kind, PAIR, frame, folds=3, seed=0, time_budget_s=30, clock=lambda: now[0])
    assert len(runs) == trained
    assert kind.budgets[0] == pytest.approx(10.0)  # a third of it for the newest fold
    spent = [0.0, *accumulate(b * share for b in kind.budgets)]
    for budget, before in zip(kind.budgets, spent, strict=False):
        assert budget <= 30 - before  # never more than what is left
    assert trained == 3 or spent[-1] > 30 - 1.0  # a fold is skipped only for want of time


@pytest.mark.parametrize(("seed", "folds"), [(3, 3), (4, 4), (5, 2)])
def test_a_worse_challenger_loses_on_every_fold_and_is_never_promoted(
    tmp_path: Path, seed: int, folds: int
) -> None:
    """Momentum against a contrarian champion loses on each fold it is compared on."""
    champion_request = request(tmp_path, CONTRARIAN, validation_folds=folds)
    champion = train_and_validate(champion_request, mean_reverting(900, seed=seed))
    registry = Registry(tmp_path)
    assert decide(registry, champion_request.learning, champion, _ignore) == "promoted"
    worse = train_and_validate(
        dataclasses.replace(champion_request, kind=MOMENTUM), mean_reverting(2400, seed=seed)
    )
    compared = [
        (f.challenger, f.champion)
        for f in worse.folds
        if f.challenger is not None and f.champion is not None
    ]
    assert len(worse.folds) == folds
    assert len(compared) == folds  # the champion trained on none of the folds' bars
    assert all(mine < theirs for mine, theirs in compared)
    assert not worse.passed
    out: list[Event] = []
    assert decide(registry, champion_request.learning, worse, out.append) == "rejected"
    assert isinstance(out[-1], ModelRejected)
    aliases = registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger) == (champion.version, None)
    figures = registry.manifest(NAME, worse.version).validation
    assert figures["folds"] == folds
    for fold in range(1, folds + 1):
        assert figures[f"fold{fold}_head_to_head"] < figures[f"fold{fold}_champion_score"]


def test_a_clearly_better_challenger_wins_over_the_folds_and_goes_to_shadow(
    tmp_path: Path,
) -> None:
    """Contrarian beats a (bootstrapped) momentum champion on every fold by the margin."""
    first = request(tmp_path, MOMENTUM, bootstrap_champion=True)
    champion = train_and_validate(first, mean_reverting(900, seed=6))
    registry = Registry(tmp_path)
    assert decide(registry, first.learning, champion, _ignore) == "promoted"
    better = train_and_validate(request(tmp_path, CONTRARIAN), mean_reverting(2400, seed=6))
    assert better.passed
    assert better.champion is not None
    assert better.challenger - better.champion >= 0.5
    compared = [
        (f.challenger, f.champion)
        for f in better.folds
        if f.challenger is not None and f.champion is not None
    ]
    assert len(compared) == len(better.folds) == 3
    assert all(mine > theirs for mine, theirs in compared)
    assert decide(registry, first.learning, better, _ignore) == "shadow"
    assert registry.aliases(NAME).challenger == better.version
    assert load_shadow(tmp_path, NAME) is not None


async def test_a_first_model_that_loses_to_flat_is_not_made_champion(tmp_path: Path) -> None:
    """--mode train's first momentum model stays a challenger; a contrarian one is promoted."""
    frames = {PAIR: mean_reverting(1500, seed=8)}
    learning = LearningSettings(promotion_margin=0.5, time_budget=60)
    summary = await run_train_cli(
        frames, learning, kind=MOMENTUM, timeframe="1h", data_dir=tmp_path
    )
    assert (summary["promoted"], summary["decision"]) == (False, "challenger")
    validation = summary["validation"]
    assert validation["baseline"] == "flat"
    assert validation["champion"] is None
    assert validation["challenger"] < validation["flat"]
    assert len(validation["folds"]) == 3
    assert all(f["score"] < f["flat"] for f in validation["folds"])
    registry = Registry(tmp_path / "models")
    aliases = registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger) == (None, summary["version"])
    # A model that beats staying flat by the margin is promoted as the first champion.
    good = await run_train_cli(frames, learning, kind=CONTRARIAN, timeframe="1h", data_dir=tmp_path)
    assert (good["promoted"], good["validation"]["passed"]) == (True, True)
    assert good["validation"]["challenger"] - good["validation"]["flat"] >= 0.5
    aliases = registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger) == (good["version"], None)


def test_a_first_model_promotion_says_it_beat_flat(tmp_path: Path) -> None:
    """The first champion's alert gives the reason it was trusted."""
    first = request(tmp_path, CONTRARIAN)
    validation = train_and_validate(first, mean_reverting(1500, seed=9))
    out: list[Event] = []
    assert decide(Registry(tmp_path), first.learning, validation, out.append) == "promoted"
    assert isinstance(out[-1], ModelPromoted)
    assert "beat staying flat" in out[-1].reason


def test_models_table_shows_each_folds_score_oldest_first() -> None:
    """`--mode models` lists a version's fold scores in fold order, a missing one as n/a."""
    validation = {"folds": 3.0, "fold1_score": 4.786, "fold3_score": -0.966, "score": 0.5}
    assert fold_scores(validation) == "+4.79 n/a -0.97"
    assert fold_scores({"score": 0.5}) == "-"  # trained before folds were recorded
