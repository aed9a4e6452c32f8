"""Retraining that never promotes a worse model: train, validate, shadow, then promote.

One cycle for one model name (`<kind>-<BASE-QUOTE>-<timeframe>`):

1. **Train** a challenger in a spawned process pool (never a thread, never on the loop),
   bounded by `learning.time_budget` seconds; the worker registers it as a new version.
2. **Validate walk-forward** on candles it did not train on: `validation_folds` anchored
   folds (`model_validation`), each trained on the candles before its test segment within
   the one time budget, the newest registered as the version. Each fold's out-of-sample
   returns get the one score and the deflated Sharpe ratio (`overfitting.deflated_sharpe`,
   every version ever trained for that name counted as a trial); the champion is replayed
   on the same bars where the kind can replay a saved model. A challenger whose folds'
   returns fall below `min_deflated_sharpe`, or whose mean fold score does not beat the
   champion's by `promotion_margin`, is rejected (`ModelRejected`). A first model must beat
   staying flat the same way, or it is kept as the challenger and no champion is set.
3. **Shadow.** A validated challenger runs beside the champion on the candles that arrive
   after it was trained, both replayed on the same bars. The shadow book is persisted
   (`<models>/<name>/shadow.json`), so a restart continues it.
4. **Promote** after `shadow_bars` bars only if the challenger's score beats the champion's
   by `promotion_margin` (`ModelPromoted`); otherwise reject it. The old champion stays on
   the rollback stack (`python main.py --mode models --rollback NAME`).

The score of both tests is `promotion_score`, the one place that defines it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import structlog

from config import LearningSettings, RewardSettings
from error_handler import ConfigError, DataError, RecoverableError
from model_registry import Lineage, Manifest, ModelKind, Registry
from model_validation import (
    Aggregate,
    Champion,
    Fold,
    FoldRun,
    aggregate,
    score_folds,
    train_folds,
)
from model_validation import Scoring as Scoring
from model_validation import promotion_score as promotion_score
from models import EventSink, ModelPromoted, ModelRejected
from utils.utilities import atomic_write


log = structlog.get_logger(__name__)

SUPERVISED_KINDS: Final = ("supervised", "gbm", "mlp")
KINDS: Final = (*SUPERVISED_KINDS, "rl")
SHADOW: Final = "shadow.json"
WARM_UP_BARS: Final = 300  # history a replay needs before its first decision
_START_GRACE_S: Final = 60.0  # a spawned worker's imports, on top of the training budget


# -- Kinds and names -------------------------------------------------------------------------


def resolve_kind(name: str, settings: LearningSettings, features_dir: Path | None) -> ModelKind:
    """Return the model kind called `name` (`rl` is imported only when asked for).

    `supervised` (or `gbm`/`mlp`) is `self_learning.SupervisedKind`; `rl` (or `rl:<model>`)
    is `rl_agent.RLKind`; `package.module:Factory` calls `Factory(settings, features_dir)`.

    Raises:
        ConfigError: no such kind.
    """
    if name in SUPERVISED_KINDS:
        from self_learning import SupervisedKind

        if name != "supervised":
            settings = settings.model_copy(update={"model": name})
        return SupervisedKind(settings, features_dir=features_dir)
    module, sep, attribute = name.partition(":")
    if sep and "." in module:
        # "package.module:Factory": a kind from elsewhere (plugins, the tests' rule kinds),
        # imported by path so a spawned worker finds it too.
        import importlib

        try:
            factory = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model kind {name!r} cannot be loaded: {e}") from e
        plugin: ModelKind = factory(settings, features_dir)
        return plugin
    if name == "rl" or name.startswith("rl:"):
        try:
            import rl_agent
        except ImportError as e:
            raise ConfigError(f"the rl model kind is not available: {e}") from e
        kind: ModelKind = rl_agent.RLKind(test_fraction=settings.test_fraction)
        return kind
    raise ConfigError(f"unknown model kind {name!r}: use one of {', '.join(KINDS)}")


def model_name(kind: str, pair: str, timeframe: str) -> str:
    """Return the registry name of a kind's model for one pair and timeframe."""
    base = pair.split(":")[0].replace("/", "-")
    if kind in SUPERVISED_KINDS:
        prefix = "direction"
    elif kind == "rl" or kind.startswith("rl:"):
        prefix = "rl"
    else:  # "package.module:Factory": kinds of one module share the name
        prefix = kind.split(":")[0].rsplit(".", 1)[-1]
    return f"{prefix}-{base}-{timeframe}"


# -- Training and walk-forward validation (in a worker process) ------------------------------


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """Everything a worker needs to train, register and validate one challenger."""

    kind: str
    name: str
    pair: str
    timeframe: str
    learning: LearningSettings
    models_dir: Path
    features_dir: Path | None
    scoring: Scoring
    data_dir: Path | None = None  # load the pair's archive here when no frame is sent
    exchange: str = "bybit"


@dataclass(frozen=True, slots=True)
class Validation:
    """A challenger's walk-forward verdict, scored beside the champion on the same bars.

    `challenger` and `champion` are the two models' mean scores over the folds' bars that
    neither trained on (where the kind can replay a saved model); without such bars,
    `challenger` is the folds' mean out-of-sample score and `champion` the champion's
    recorded one. `flat` is staying flat on the folds' bars: a first model's baseline.
    """

    name: str
    version: str
    challenger: float
    champion: float | None
    champion_version: str | None
    deflated_sharpe: float
    bars: int
    trials: int
    passed: bool
    reason: str
    last_ms: int = 0  # the newest candle it saw: its shadow starts after it
    can_shadow: bool = True  # the kind can replay a saved model (see `_is_replayable`)
    flat: float = 0.0
    folds: tuple[Fold, ...] = ()

    def figures(self) -> dict[str, float]:
        """Return the numbers kept in the version's manifest (with every fold's)."""
        out = {
            "score": self.challenger,
            "deflated_sharpe": self.deflated_sharpe,
            "bars": float(self.bars),
            "trials": float(self.trials),
            "flat_score": self.flat,
            "folds": float(len(self.folds)),
            "passed": float(self.passed),  # the gate's verdict (1: passed), shown by /model
        }
        if self.champion is not None:
            out["champion_score"] = self.champion
        for fold in self.folds:
            out |= fold.figures()
        return out


def train_and_validate(request: TrainRequest, frame: pd.DataFrame | None = None) -> Validation:
    """Train a challenger walk-forward, register its newest fold, judge it (worker entry).

    `learning.validation_folds` anchored folds are trained within `learning.time_budget`
    (`model_validation.train_folds`); the newest is registered as the new version. Each
    fold is scored out of sample, beside the champion's replay on the bars neither saw;
    the verdict needs the deflated Sharpe of all folds' returns above
    `min_deflated_sharpe` and the folds' mean score above the champion's (or, for a first
    model, staying flat's) by `promotion_margin`.
    """
    from overfitting import deflated_sharpe, sharpe_per_period

    if frame is None:
        frame = _archive(request)
    frame = frame.iloc[-request.learning.train_window_candles :]
    learning = request.learning
    kind = resolve_kind(request.kind, learning, request.features_dir)
    runs = train_folds(
        kind,
        request.pair,
        frame,
        folds=learning.validation_folds,
        seed=learning.seed,
        time_budget_s=float(learning.time_budget),
    )
    registry = Registry(request.models_dir)
    champion = registry.aliases(request.name).champion
    manifest = _register(registry, request, kind, runs, frame, champion)
    returns = np.concatenate([run.returns() for run in runs])
    trials, variance = _trials(registry, request.name, returns)
    folds = score_folds(
        runs,
        request.scoring,
        trials=trials,
        trial_variance=variance,
        champion=_champion(registry, kind, request.name, champion, frame),
        replay=kind.replay if _is_replayable(kind) else None,  # type: ignore[attr-defined]
        saved=registry.path(request.name, manifest.version),
    )
    total = aggregate(folds)
    score, champion_score = _head_to_head(total, registry, request.name, champion)
    dsr = deflated_sharpe(returns, trials, variance)
    passed, reason = _judge(learning, dsr, score, champion_score, total.flat)
    validation = Validation(
        name=request.name,
        version=manifest.version,
        challenger=score,
        champion=champion_score,
        champion_version=champion,
        deflated_sharpe=dsr,
        bars=int(returns.size),
        trials=trials,
        passed=passed,
        reason=reason,
        last_ms=int(frame.index[-1].value // 1_000_000),
        can_shadow=_is_replayable(kind),
        flat=total.flat,
        folds=tuple(folds),
    )
    registry.annotate(
        request.name,
        manifest.version,
        {**validation.figures(), "sharpe_per_period": sharpe_per_period(returns)},
    )
    return validation


def _register(
    registry: Registry,
    request: TrainRequest,
    kind: ModelKind,
    runs: Sequence[FoldRun],
    frame: pd.DataFrame,
    champion: str | None,
) -> Manifest:
    # The newest fold's model becomes the new version, its lineage naming the champion.
    lineage = Lineage(
        data_start_ms=int(frame.index[0].value // 1_000_000),
        data_end_ms=runs[-1].train_end_ms,
        pairs=(request.pair,),
        timeframe=request.timeframe,
        feature_set=str(getattr(kind, "feature_set", kind.name)),
        seed=request.learning.seed,
        parent=champion,
    )
    return registry.register(request.name, kind.name, runs[-1].trained, lineage)


def _trials(registry: Registry, name: str, returns: np.ndarray) -> tuple[int, float]:
    # The deflated Sharpe's trial count (every version, this one included) and the
    # variance of their per-period Sharpe ratios (this one's from its folds' returns).
    from overfitting import sharpe_per_period

    sharpes = [
        registry.manifest(name, v).validation.get("sharpe_per_period")
        for v in registry.versions(name)
    ]
    trial_sharpes = [s for s in sharpes if s is not None] + [sharpe_per_period(returns)]
    trials = len(registry.versions(name))
    return trials, float(np.var(trial_sharpes))


def _head_to_head(
    total: Aggregate, registry: Registry, name: str, champion: str | None
) -> tuple[float, float | None]:
    # Both models' scores on the bars neither trained on when the kind replays; else the
    # folds' mean score against the champion's recorded one.
    if total.challenger is not None and total.champion is not None:
        return total.challenger, total.champion
    recorded = registry.manifest(name, champion).validation if champion else {}
    return total.score, recorded.get("score")


def _archive(request: TrainRequest) -> pd.DataFrame:
    from data_manager import CandleStore, arrays_to_frame

    if request.data_dir is None:
        raise DataError("no candles: neither a frame nor a data directory")
    store = CandleStore(request.data_dir, request.exchange)
    frame = arrays_to_frame(store.load_arrays(request.pair, request.timeframe))
    if frame.empty:
        raise DataError(f"no archived {request.timeframe} candles for {request.pair}")
    return frame


def _champion(
    registry: Registry, kind: ModelKind, name: str, version: str | None, frame: pd.DataFrame
) -> Champion | None:
    # The champion replayed on the whole window, for the folds' head-to-head.
    if version is None or not _is_replayable(kind):
        return None
    replay = kind.replay  # type: ignore[attr-defined]
    returns = replay(registry.path(name, version), frame)
    return Champion(returns, registry.manifest(name, version).lineage.data_end_ms)


def _is_replayable(kind: object) -> bool:
    # Optional beyond the ModelKind shape: `replay(directory, frame) -> pd.Series` of a
    # saved model's per-bar returns. Without it there is no head-to-head and no shadow.
    return callable(getattr(kind, "replay", None))


def _judge(
    learning: LearningSettings, dsr: float, score: float, champion: float | None, flat: float
) -> tuple[bool, str]:
    margin = learning.promotion_margin
    if not dsr >= learning.min_deflated_sharpe:
        return False, f"deflated Sharpe {dsr:.2f} below {learning.min_deflated_sharpe:.2f}"
    if champion is None and not score - flat >= margin:
        return False, (
            f"score {score:.2f} does not beat staying flat ({flat:.2f}) by {margin:.2f}"
            " out of sample"
        )
    if champion is not None and not score - champion >= margin:
        return False, (
            f"score {score:.2f} does not beat the champion's {champion:.2f} by {margin:.2f}"
            " out of sample"
        )
    return True, f"deflated Sharpe {dsr:.2f}, score {score:.2f}"


def replay_pair(
    request: TrainRequest, versions: Sequence[str], frame: pd.DataFrame
) -> list[pd.Series]:
    """Return each version's per-bar returns on `frame` (worker-process entry)."""
    kind = resolve_kind(request.kind, request.learning, None)
    if not _is_replayable(kind):
        raise DataError(f"model kind {request.kind} cannot replay a saved model")
    registry = Registry(request.models_dir)
    replay = kind.replay  # type: ignore[attr-defined]
    return [replay(registry.path(request.name, v), frame) for v in versions]


# -- Shadow book -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowBook:
    """A challenger running beside the champion on new candles (persisted as JSON)."""

    name: str
    champion: str
    challenger: str
    start_ms: int
    last_ms: int
    champion_returns: tuple[float, ...] = ()
    challenger_returns: tuple[float, ...] = ()

    @property
    def bars(self) -> int:
        """Return how many bars both models have been scored on."""
        return len(self.challenger_returns)

    def extend(self, champion: pd.Series, challenger: pd.Series, until_ms: int) -> ShadowBook:
        """Return the book with the bars in (`last_ms`, `until_ms`) both replays cover appended.

        `until_ms` is the newest candle: its bar's return needs the next close, unknown yet.
        """
        joined = pd.concat({"champion": champion, "challenger": challenger}, axis=1).dropna()
        ts = pd.DatetimeIndex(joined.index).as_unit("ms").asi8
        fresh = joined[(ts > self.last_ms) & (ts < until_ms)]
        ts = ts[(ts > self.last_ms) & (ts < until_ms)]
        if fresh.empty:
            return self
        return ShadowBook(
            name=self.name,
            champion=self.champion,
            challenger=self.challenger,
            start_ms=self.start_ms,
            last_ms=int(ts[-1]),
            champion_returns=(*self.champion_returns, *fresh["champion"].tolist()),
            challenger_returns=(*self.challenger_returns, *fresh["challenger"].tolist()),
        )


def shadow_path(models_dir: Path, name: str) -> Path:
    """Return where a model name's shadow book lives."""
    return models_dir / name / SHADOW


def load_shadow(models_dir: Path, name: str) -> ShadowBook | None:
    """Return the persisted shadow book of `name`, if one is running."""
    path = shadow_path(models_dir, name)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("shadow_unreadable", path=str(path), error=repr(e))
        return None
    raw["champion_returns"] = tuple(raw.get("champion_returns", ()))
    raw["challenger_returns"] = tuple(raw.get("challenger_returns", ()))
    return ShadowBook(**raw)


def save_shadow(models_dir: Path, book: ShadowBook | None, name: str) -> None:
    """Persist the shadow book (None ends it)."""
    path = shadow_path(models_dir, name)
    if book is None:
        path.unlink(missing_ok=True)
        return
    atomic_write(path, json.dumps(asdict(book)))


# -- The retrainer (a supervised background task of the daemon) -----------------------------


@dataclass
class RetrainPlan:
    """What the retrainer works on and how it reaches the daemon's state."""

    learning: LearningSettings
    kind: str
    timeframe: str
    scoring: Scoring
    models_dir: Path
    features_dir: Path | None
    data_dir: Path
    exchange: str
    pairs: Callable[[], Sequence[str]]
    candles: Callable[[], int]
    flush: Callable[[], Awaitable[object]]
    alert: EventSink
    frame: Callable[[str], pd.DataFrame | None] = lambda pair: None  # None: read the archive
    now_s: Callable[[], float] = time.monotonic
    poll_s: float = 5.0
    history: list[Validation] = field(default_factory=list)


class Retrainer:
    """Retrain on a schedule or after N new candles; shadow; promote on a margin.

    `step` is one supervised-loop step: it waits `poll_s`, advances any running shadow with
    the candles that arrived, and retrains each pair's model when one is due. Training and
    every replay run in a spawned process pool of one worker; the loop only awaits.
    """

    def __init__(self, plan: RetrainPlan) -> None:
        self.plan = plan
        self.registry = Registry(plan.models_dir)
        self._pool: ProcessPoolExecutor | None = None
        self._trained_at = plan.now_s()
        self._trained_candles = plan.candles()
        self._shadowed_candles = plan.candles()
        self.cycles = 0
        self.running: str | None = None  # what the worker is doing now, for views and tests

    # -- Scheduling ----------------------------------------------------------------------------

    def due(self) -> bool:
        """Return True when the schedule or the new-candle count calls for a retrain."""
        learning = self.plan.learning
        if self.plan.now_s() - self._trained_at >= learning.retrain_interval_s:
            return True
        every = learning.retrain_every_candles
        return every > 0 and self.plan.candles() - self._trained_candles >= every

    async def step(self) -> None:
        """Wait a poll, then shadow and retrain what is due (one supervised-loop step)."""
        await asyncio.sleep(self.plan.poll_s)
        candles = self.plan.candles()
        if candles > self._shadowed_candles:
            self._shadowed_candles = candles
            models = self.plan.models_dir
            shadowed = [
                p
                for p in self.plan.pairs()
                if load_shadow(models, self.request(p).name) is not None
            ]
            if shadowed:
                await self.plan.flush()
            for pair in shadowed:
                await self.advance_shadow(pair, self.plan.frame(pair))
        if self.due():
            self._trained_at, self._trained_candles = self.plan.now_s(), self.plan.candles()
            await self.plan.flush()
            for pair in list(self.plan.pairs()):
                name = self.request(pair).name
                if load_shadow(self.plan.models_dir, name) is not None:
                    log.info("retrain_deferred", name=name, reason="a shadow is running")
                    continue
                try:
                    await self.retrain(pair, self.plan.frame(pair))
                except DataError as e:
                    log.warning("retrain_skipped", pair=pair, reason=e.message)

    # -- One pair ------------------------------------------------------------------------------

    def request(self, pair: str) -> TrainRequest:
        """Return the training request of one pair's model."""
        plan = self.plan
        return TrainRequest(
            kind=plan.kind,
            name=model_name(plan.kind, pair, plan.timeframe),
            pair=pair,
            timeframe=plan.timeframe,
            learning=plan.learning,
            models_dir=plan.models_dir,
            features_dir=plan.features_dir,
            scoring=plan.scoring,
            data_dir=plan.data_dir,
            exchange=plan.exchange,
        )

    async def retrain(self, pair: str, frame: pd.DataFrame | None = None) -> tuple[Validation, str]:
        """Train and validate walk-forward; promote a first model, start a shadow, or reject.

        Returns:
            The validation and the decision (`promoted`, `shadow`, `rejected` or
            `challenger`, see `decide`).

        Raises:
            DataError: too few candles to train on.
            RecoverableError: the training ran past its time budget.
        """
        request = self.request(pair)
        budget = float(self.plan.learning.time_budget) + _START_GRACE_S
        validation: Validation = await self._run(budget, train_and_validate, request, frame)
        self.cycles += 1
        self.plan.history.append(validation)
        log.info("model_validated", **asdict(validation))
        return validation, decide(self.registry, self.plan.learning, validation, self.plan.alert)

    async def advance_shadow(self, pair: str, frame: pd.DataFrame | None = None) -> None:
        """Score champion and challenger on the new candles; decide when the period is full."""
        request = self.request(pair)
        book = load_shadow(self.plan.models_dir, request.name)
        if book is None:
            return
        aliases = self.registry.aliases(request.name)
        if (aliases.champion, aliases.challenger) != (book.champion, book.challenger):
            # The operator promoted or rolled back meanwhile: this comparison is moot.
            save_shadow(self.plan.models_dir, None, request.name)
            log.info("shadow_abandoned", name=request.name)
            return
        candles: pd.DataFrame = (
            frame if frame is not None else await asyncio.to_thread(_archive, request)
        )
        step = candles.index.to_series().diff().median()
        warm = pd.Timestamp(book.last_ms, unit="ms", tz="UTC") - step * WARM_UP_BARS
        tail = candles[candles.index >= warm]
        budget = float(self.plan.learning.time_budget) + _START_GRACE_S
        champion, challenger = await self._run(
            budget, replay_pair, request, [book.champion, book.challenger], tail
        )
        book = book.extend(champion, challenger, int(tail.index[-1].value // 1_000_000))
        if book.bars < self.plan.learning.shadow_bars:
            save_shadow(self.plan.models_dir, book, request.name)
            log.info("shadow_advanced", name=request.name, bars=book.bars)
            return
        settle_shadow(self.registry, self.plan.learning, book, self.plan.scoring, self.plan.alert)

    # -- The process pool ----------------------------------------------------------------------

    async def _run(self, budget_s: float, func: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            # spawn, not fork: forking a process that runs an event loop can deadlock it.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        future = asyncio.get_running_loop().run_in_executor(self._pool, func, *args)
        self.running = func.__name__
        try:
            return await asyncio.wait_for(future, budget_s)
        except TimeoutError:
            self.close()
            message = f"{func.__name__} ran past its {budget_s:.0f} s budget"
            raise RecoverableError(message) from None
        finally:
            self.running = None

    def close(self) -> None:
        """Stop the worker process (a running training is abandoned)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # shutdown() never stops a running call: end the worker itself (a stuck training).
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


# -- Decisions -------------------------------------------------------------------------------


def decide(
    registry: Registry, learning: LearningSettings, validation: Validation, alert: EventSink
) -> str:
    """Act on a validation: promote a first model, start a shadow, or reject; return which.

    A first model (no champion yet) is promoted only when it passed validation against
    staying flat; one that did not is registered as the challenger and the strategy stays
    neutral (no champion), with an alert, unless `bootstrap_champion` says to use it anyway.

    Returns:
        `promoted`, `shadow`, `rejected`, or `challenger` (registered as challenger, waiting
        for the operator: a first model that did not beat staying flat, or a validated one
        whose kind cannot be shadowed).
    """
    name, version = validation.name, validation.version
    if validation.champion_version is None:
        return _decide_first(registry, learning, validation, alert)
    if not validation.passed:
        alert(
            ModelRejected(
                name,
                version,
                validation.champion_version,
                validation.challenger,
                validation.champion,
                validation.reason,
            )
        )
        return "rejected"
    registry.set_challenger(name, version)
    if not validation.can_shadow:
        # Without a replay there is no shadow, so no automatic promotion: the operator
        # decides (`--mode models --promote`), with the validation figures in the manifest.
        log.warning("shadow_unavailable", name=name, challenger=version)
        return "challenger"
    book = ShadowBook(
        name=name,
        champion=str(validation.champion_version),
        challenger=version,
        start_ms=validation.last_ms,
        last_ms=validation.last_ms,
    )
    save_shadow(registry.root, book, name)
    log.info("shadow_started", name=name, challenger=version, bars=learning.shadow_bars)
    return "shadow"


def _decide_first(
    registry: Registry, learning: LearningSettings, validation: Validation, alert: EventSink
) -> str:
    name, version = validation.name, validation.version
    if validation.passed or learning.bootstrap_champion:
        # The operator is told plainly when it did not pass (bootstrap_champion is opt-in).
        reason = "first model, " + (
            f"beat staying flat: {validation.reason}"
            if validation.passed
            else f"NOT validated: {validation.reason}"
        )
        if not validation.passed:
            log.warning("model_bootstrapped_unvalidated", name=name, reason=validation.reason)
        if registry.aliases(name).challenger not in (None, version):
            registry.set_challenger(name, None)  # an earlier first model that lost to flat
        registry.promote(name, version)
        alert(ModelPromoted(name, version, None, validation.challenger, None, reason))
        return "promoted"
    registry.set_challenger(name, version)
    reason = (
        f"first model not promoted: {validation.reason}; no champion, the strategy stays neutral"
    )
    log.warning("first_model_not_promoted", name=name, version=version, reason=validation.reason)
    alert(ModelRejected(name, version, None, validation.challenger, None, reason))
    return "challenger"


def settle_shadow(
    registry: Registry,
    learning: LearningSettings,
    book: ShadowBook,
    scoring: Scoring,
    alert: EventSink,
) -> bool:
    """Promote the challenger if it beat the champion by the margin over the shadow period."""
    challenger = promotion_score(np.asarray(book.challenger_returns), scoring)
    champion = promotion_score(np.asarray(book.champion_returns), scoring)
    save_shadow(registry.root, None, book.name)
    registry.annotate(
        book.name,
        book.challenger,
        {"shadow_score": challenger, "shadow_champion_score": champion, "shadow_bars": book.bars},
    )
    margin = learning.promotion_margin
    if challenger - champion >= margin:
        registry.promote(book.name, book.challenger)
        reason = f"beat the champion by {challenger - champion:.2f} over {book.bars} bars"
        alert(
            ModelPromoted(book.name, book.challenger, book.champion, challenger, champion, reason)
        )
        return True
    registry.set_challenger(book.name, None)
    reason = (
        f"shadow score {challenger:.2f} vs champion {champion:.2f}: margin {margin:.2f} not met"
    )
    alert(ModelRejected(book.name, book.challenger, book.champion, challenger, champion, reason))
    return False


def describe(models_dir: Path) -> list[dict[str, Any]]:
    """Return every model's aliases with its shadow's progress, for the operator."""
    registry = Registry(models_dir)
    out = []
    for row in registry.describe_all():
        book = load_shadow(models_dir, row["name"])
        row["shadow_bars"] = book.bars if book is not None else None
        out.append(row)
    return out


# -- Command lines ---------------------------------------------------------------------------


def model_dirs(learning: LearningSettings, data_dir: Path) -> tuple[Path, Path]:
    """Return the registry root and the features cache directory."""
    return (
        learning.models_dir or data_dir / "models",
        learning.features_dir or data_dir / "features",
    )


async def _nothing() -> None:
    return None


async def run_train_cli(
    frames: Mapping[str, pd.DataFrame],
    learning: LearningSettings,
    *,
    kind: str,
    timeframe: str,
    data_dir: Path,
    reward: RewardSettings | None = None,
    summary_json: Path | None = None,
) -> dict[str, Any]:
    """Train one model per pair in a spawned worker, validate, decide; return the summary.

    The summary holds the first model's `model`, `version`, `promoted`, `decision` and
    `validation` (`{champion, challenger}` out-of-sample scores, with `folds`: each
    walk-forward fold's bars, score, deflated Sharpe, staying flat's score and the
    head-to-head beside the champion; `baseline` says whether a first model was judged
    against staying flat), and `models`, one entry per pair. A champion is replaced only
    through the daemon's shadow test (or `--mode models --promote`), never by this command
    alone; a first model is promoted only when it beats staying flat.
    """
    from utils.progress import progress_bar
    from utils.utilities import timeframe_to_ms

    resolve_kind(kind, learning, None)  # an unknown kind fails before any work
    models_dir, features_dir = model_dirs(learning, data_dir)
    events: list[Any] = []
    plan = RetrainPlan(
        learning=learning,
        kind=kind,
        timeframe=timeframe,
        scoring=Scoring(timeframe_to_ms(timeframe), reward or RewardSettings()),
        models_dir=models_dir,
        features_dir=features_dir,
        data_dir=data_dir,
        exchange="bybit",
        pairs=lambda: list(frames),
        candles=lambda: 0,
        flush=_nothing,
        alert=events.append,
    )
    retrainer = Retrainer(plan)
    rows: list[dict[str, Any]] = []
    try:
        with progress_bar(elapsed=True, stderr=True) as bar:
            task = bar.add_task(f"train {kind}", total=len(frames))
            for pair, frame in frames.items():
                bar.update(task, description=f"train {kind} {pair}")
                validation, decision = await retrainer.retrain(pair, frame)
                rows.append(_summary_row(pair, kind, validation, decision))
                bar.advance(task)
    finally:
        retrainer.close()
    summary: dict[str, Any] = {**rows[0], "models": rows, "registry": str(models_dir)}
    if summary_json is not None:
        atomic_write(summary_json, json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


def _summary_row(pair: str, kind: str, validation: Validation, decision: str) -> dict[str, Any]:
    return {
        "model": validation.name,
        "kind": kind,
        "pair": pair,
        "version": validation.version,
        "promoted": decision == "promoted",
        "decision": decision,
        "validation": {
            "champion": validation.champion,
            "challenger": validation.challenger,
            "champion_version": validation.champion_version,
            "deflated_sharpe": validation.deflated_sharpe,
            "bars": validation.bars,
            "trials": validation.trials,
            "passed": validation.passed,
            "reason": validation.reason,
            "baseline": "flat" if validation.champion_version is None else "champion",
            "flat": validation.flat,
            "folds": [fold.to_json() for fold in validation.folds],
        },
    }


def run_models_cli(
    models_dir: Path,
    *,
    promote: str | None = None,
    rollback: str | None = None,
    summary_json: Path | None = None,
) -> int:
    """List the registry; first promote `NAME@VERSION` or roll `NAME` back when asked.

    Raises:
        ConfigError: a malformed `--promote` argument.
        DataError: no such model or version, or nothing to roll back to.
    """
    registry = Registry(models_dir)
    action: dict[str, Any] = {}
    if promote is not None:
        name, sep, version = promote.partition("@")
        if not sep or not name or not version:
            raise ConfigError(f"--promote {promote!r}: expected NAME@VERSION")
        previous = registry.aliases(name).champion
        registry.promote(name, version)
        save_shadow(models_dir, None, name)  # a manual promotion ends any comparison
        action = {"promoted": f"{name}@{version}", "previous": previous}
    if rollback is not None:
        replaced = registry.aliases(rollback).champion
        restored = registry.rollback(rollback).champion
        save_shadow(models_dir, None, rollback)
        action = {"rolled_back": rollback, "champion": restored, "replaced": replaced}
    rows = describe(models_dir)
    _print_models(rows, action)
    if summary_json is not None:
        payload = {**action, "models": rows}
        atomic_write(summary_json, json.dumps(payload, indent=2, sort_keys=True, default=str))
    return 0


def fold_scores(validation: Mapping[str, Any]) -> str:
    """Return a version's walk-forward fold scores, oldest fold first ("-" if none).

    The challenger's when there is one (the version being judged), else the champion's.
    """
    count = int(validation.get("folds") or 0)
    scores = [validation.get(f"fold{k}_score") for k in range(1, count + 1)]
    return " ".join("n/a" if v is None else f"{v:+.2f}" for v in scores) or "-"


def _print_models(rows: Sequence[Mapping[str, Any]], action: Mapping[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Kestrel models")
    columns = ("name", "champion", "challenger", "rollback to", "versions", "score", "folds")
    for column in columns:
        table.add_column(column)
    for row in rows:
        previous = row.get("previous") or []
        score = (row.get("champion_validation") or {}).get("score")
        shown = row.get("challenger_validation") if row.get("challenger") else None
        table.add_row(
            str(row["name"]),
            str(row.get("champion") or "-"),
            str(row.get("challenger") or "-")
            + (
                f" (shadow {row['shadow_bars']} bars)" if row.get("shadow_bars") is not None else ""
            ),
            str(previous[-1] if previous else "-"),
            str(row.get("versions", 0)),
            "-" if score is None else f"{score:.2f}",
            fold_scores(shown or row.get("champion_validation") or {}),
        )
    console = Console(file=sys.stdout, width=160)
    for key, value in action.items():
        console.print(f"{key}: {value}")
    console.print(table)
