"""Champion and challenger: the registry, its aliases, validation, shadow and promotion."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import LearningSettings
from error_handler import DataError
from model_registry import Lineage, Registry
from model_training import (
    Retrainer,
    RetrainPlan,
    Scoring,
    ShadowBook,
    TrainRequest,
    decide,
    load_shadow,
    model_name,
    promotion_score,
    settle_shadow,
    train_and_validate,
)
from models import Event, ModelPromoted, ModelRejected
from tests.conftest import ROOT
from tests.model_kinds import Contrarian, Momentum, RuleModel, mean_reverting


PAIR = "BTC/USDT"
SCORING = Scoring(3_600_000)
CONTRARIAN = "tests.model_kinds:Contrarian"
MOMENTUM = "tests.model_kinds:Momentum"
NAME = model_name(CONTRARIAN, PAIR, "1h")


def learning(**overrides: float | bool) -> LearningSettings:
    values = {
        "shadow_bars": 200,
        "promotion_margin": 0.5,
        "time_budget": 60.0,
        **overrides,
    }
    return LearningSettings.model_validate(values)


def plan(tmp_path: Path, kind: str, events: list[Event], **overrides: float) -> RetrainPlan:
    async def nothing() -> None:
        return None

    return RetrainPlan(
        learning=learning(**overrides),
        kind=kind,
        timeframe="1h",
        scoring=SCORING,
        models_dir=tmp_path / "models",
        features_dir=tmp_path / "features",
        data_dir=tmp_path,
        exchange="bybit",
        pairs=lambda: [PAIR],
        candles=lambda: 0,
        flush=nothing,
        alert=events.append,
    )


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def retrainer(tmp_path: Path, events: list[Event]) -> Iterator[Retrainer]:
    worker = Retrainer(plan(tmp_path, MOMENTUM, events))
    yield worker
    worker.close()


def test_the_rule_kinds_differ_as_their_market_says() -> None:
    """On a mean-reverting market the contrarian rule earns and the momentum rule loses."""
    frame = mean_reverting(1500, seed=1)
    good = Contrarian().train({PAIR: frame}, seed=0, time_budget_s=10).validation_returns()
    bad = Momentum().train({PAIR: frame}, seed=0, time_budget_s=10).validation_returns()
    assert promotion_score(good, SCORING) > 5 > 0 > promotion_score(bad, SCORING)


# -- Registry and aliases --------------------------------------------------------------------


def _register(registry: Registry, direction: float) -> str:
    trained = RuleModel(direction, np.zeros(3), {"auc": 0.5})
    lineage = Lineage(0, 1, (PAIR,), "1h", "rule", seed=3)
    return registry.register(NAME, "rule", trained, lineage).version


def test_promote_and_rollback_walk_the_champion_stack(tmp_path: Path) -> None:
    """Each promotion stacks the old champion; rollback restores it, then the one before."""
    registry = Registry(tmp_path)
    first, second, third = (_register(registry, d) for d in (1.0, -1.0, 1.0))
    assert registry.versions(NAME) == sorted([first, second, third])
    registry.promote(NAME, first)
    registry.set_challenger(NAME, second)
    registry.promote(NAME, second)
    registry.promote(NAME, third)
    aliases = registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger, aliases.previous) == (
        third,
        None,
        (first, second),
    )
    assert registry.rollback(NAME).champion == second
    assert registry.rollback(NAME).champion == first
    with pytest.raises(DataError, match="no previous champion"):
        registry.rollback(NAME)
    manifest = registry.manifest(NAME, third)
    assert manifest.lineage.seed == 3
    assert manifest.lineage.code_version
    assert manifest.lineage.created_ms > 0
    with pytest.raises(DataError):
        registry.promote(NAME, "no-such-version")


_FLIPPER = """
import sys
from pathlib import Path
from model_registry import Registry
registry, name, a, b = Registry(Path(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
print("ready", flush=True)
while True:
    registry.promote(name, a)
    registry.promote(name, b)
"""


@pytest.mark.parametrize("delay", [0.15, 0.4])
def test_a_crash_mid_alias_write_never_loses_the_champion(tmp_path: Path, delay: float) -> None:
    """A process killed while it moves the champion leaves a readable, valid champion."""
    registry = Registry(tmp_path)
    a, b = _register(registry, 1.0), _register(registry, -1.0)
    registry.promote(NAME, a)
    child = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(tmp_path), NAME, a, b],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    aliases = registry.aliases(NAME)
    assert aliases.champion in (a, b)
    assert set(aliases.previous) <= {a, b}


# -- Validation, shadow, promotion ----------------------------------------------------------


async def test_a_worse_challenger_is_never_promoted(
    tmp_path: Path, events: list[Event], retrainer: Retrainer
) -> None:
    """A momentum challenger against a contrarian champion is rejected; nothing moves."""
    frame = mean_reverting(1500, seed=2)
    retrainer.plan.kind = CONTRARIAN
    first, decision = await retrainer.retrain(PAIR, frame)
    assert decision == "promoted"
    retrainer.plan.kind = MOMENTUM
    validation, decision = await retrainer.retrain(PAIR, mean_reverting(1700, seed=2))
    assert decision == "rejected"
    assert not validation.passed
    assert validation.champion is not None
    assert validation.challenger < validation.champion
    aliases = retrainer.registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger) == (first.version, None)
    assert load_shadow(tmp_path / "models", NAME) is None
    assert isinstance(events[-1], ModelRejected)
    assert events[-1].version == validation.version


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_worse_model_fails_walk_forward_validation(tmp_path: Path, seed: int) -> None:
    """Whatever the market's path, momentum never passes against a contrarian champion."""
    registry = Registry(tmp_path)
    frame = mean_reverting(1200, seed=seed)
    request = TrainRequest(
        kind=CONTRARIAN,
        name=NAME,
        pair=PAIR,
        timeframe="1h",
        learning=learning(),
        models_dir=tmp_path,
        features_dir=None,
        scoring=SCORING,
    )
    champion = train_and_validate(request, frame)
    registry.promote(NAME, champion.version)
    worse = train_and_validate(
        dataclasses.replace(request, kind=MOMENTUM), mean_reverting(1400, seed=seed)
    )
    assert not worse.passed
    assert worse.trials == 2
    assert registry.manifest(NAME, worse.version).validation["deflated_sharpe"] < 0.5


async def test_a_clearly_better_challenger_is_shadowed_promoted_and_rolled_back(
    tmp_path: Path, events: list[Event], retrainer: Retrainer
) -> None:
    """Contrarian beats a momentum champion in validation and in shadow (across a restart)."""
    history = mean_reverting(2400, seed=6)
    trained_on = history.iloc[:1800]
    # The losing momentum rule is made champion on purpose (bootstrap_champion opts in):
    # by default a first model that loses to staying flat is never used.
    retrainer.plan.learning = learning(bootstrap_champion=True)
    first, _ = await retrainer.retrain(PAIR, trained_on)
    assert not first.passed
    retrainer.plan.kind = CONTRARIAN
    validation, decision = await retrainer.retrain(PAIR, trained_on)
    assert decision == "shadow"
    assert validation.passed
    assert validation.champion is not None
    assert validation.challenger > validation.champion
    assert retrainer.registry.aliases(NAME).challenger == validation.version
    await retrainer.advance_shadow(PAIR, history.iloc[:1900])
    book = load_shadow(tmp_path / "models", NAME)
    assert book is not None
    assert book.bars == 99  # bars 1,800..1,898: the newest has no next close yet
    assert retrainer.registry.aliases(NAME).champion == first.version
    # A restart: a new retrainer continues the persisted book.
    restarted = Retrainer(retrainer.plan)
    try:
        await restarted.advance_shadow(PAIR, history)
    finally:
        restarted.close()
    assert load_shadow(tmp_path / "models", NAME) is None
    aliases = retrainer.registry.aliases(NAME)
    assert aliases.champion == validation.version
    assert aliases.previous == (first.version,)
    figures = retrainer.registry.manifest(NAME, validation.version).validation
    assert figures["shadow_bars"] == 599  # bars 1,800..2,398
    promoted = [e for e in events if isinstance(e, ModelPromoted)]
    assert [e.version for e in promoted] == [first.version, validation.version]
    assert promoted[-1].previous == first.version
    retrainer.registry.rollback(NAME)
    assert retrainer.registry.aliases(NAME).champion == first.version


@settings(max_examples=30, deadline=None)
@given(
    champion=st.lists(st.floats(-0.05, 0.05), min_size=20, max_size=60),
    edge=st.floats(-0.01, 0.002),
)
def test_settling_a_shadow_never_promotes_without_the_margin(
    tmp_path_factory: pytest.TempPathFactory, champion: list[float], edge: float
) -> None:
    """A shadow promotes exactly when the challenger beats the champion by the margin."""
    root = tmp_path_factory.mktemp("shadow")
    registry = Registry(root)
    old, new = _register(registry, 1.0), _register(registry, -1.0)
    registry.promote(NAME, old)
    challenger = [r + edge for r in champion]
    book = ShadowBook(NAME, old, new, 0, 0, tuple(champion), tuple(challenger))
    gained = promotion_score(np.array(challenger), SCORING) - promotion_score(
        np.array(champion), SCORING
    )
    out: list[Event] = []
    promoted = settle_shadow(registry, learning(), book, SCORING, out.append)
    assert promoted is (gained >= 0.5)
    assert registry.aliases(NAME).champion == (new if promoted else old)
    assert isinstance(out[-1], ModelPromoted if promoted else ModelRejected)


def test_a_kind_that_cannot_replay_waits_for_the_operator(tmp_path: Path) -> None:
    """Validated without a shadow, a challenger is never promoted automatically."""
    registry = Registry(tmp_path)
    request = TrainRequest(
        kind=MOMENTUM,
        name=NAME,
        pair=PAIR,
        timeframe="1h",
        learning=learning(),
        models_dir=tmp_path,
        features_dir=None,
        scoring=SCORING,
    )
    champion = train_and_validate(request, mean_reverting(1800, seed=6))
    registry.promote(NAME, champion.version)
    out: list[Event] = []
    opaque = train_and_validate(
        dataclasses.replace(request, kind="tests.model_kinds:Opaque"), mean_reverting(1800, seed=6)
    )
    assert opaque.passed
    assert not opaque.can_shadow
    assert opaque.champion == champion.challenger  # the champion's recorded score
    assert decide(registry, learning(), opaque, out.append) == "challenger"
    aliases = registry.aliases(NAME)
    assert (aliases.champion, aliases.challenger) == (champion.version, opaque.version)
    assert load_shadow(tmp_path, NAME) is None
    assert out == []


@pytest.mark.parametrize(("bootstrap", "expected"), [(True, "promoted"), (False, "challenger")])
def test_an_unvalidated_first_model_is_used_only_when_bootstrapping(
    tmp_path: Path, bootstrap: bool, expected: str
) -> None:
    """A failing first model becomes champion (flagged) only with bootstrap_champion.

    Without it (the default) the model is kept as the challenger, no champion is set (the
    strategy stays neutral) and the operator is alerted.
    """
    request = TrainRequest(
        kind=MOMENTUM,
        name=NAME,
        pair=PAIR,
        timeframe="1h",
        learning=learning(bootstrap_champion=bootstrap),
        models_dir=tmp_path,
        features_dir=None,
        scoring=SCORING,
    )
    validation = train_and_validate(request, mean_reverting(1200, seed=7))
    assert not validation.passed
    out: list[Event] = []
    assert decide(Registry(tmp_path), request.learning, validation, out.append) == expected
    aliases = Registry(tmp_path).aliases(NAME)
    if bootstrap:
        assert aliases.champion == validation.version
        assert isinstance(out[-1], ModelPromoted)
        assert "NOT validated" in out[-1].reason
    else:
        assert (aliases.champion, aliases.challenger) == (None, validation.version)
        assert isinstance(out[-1], ModelRejected)
        assert "stays neutral" in out[-1].reason
