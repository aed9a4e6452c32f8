"""Learning inside a run: the champion models' entry filter and the retraining step.

Part of `runner` (which re-exports it). `Learning` filters entries through each pair's
champion model and runs the retrainer (shadow what is running, retrain what is due) as
one supervised background step; the retrainer's worker closes with the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from assembly import Closer
from config import Settings
from models import EventSink
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    import pandas as pd

    from model_training import Retrainer
    from pipeline import Engine


__all__ = ["Learning"]

log = structlog.get_logger(__name__)


class Learning:
    """Entry filter and retraining of a run with learning enabled.

    Attributes:
        retrainer: built at the first retraining step, else None.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        alert: EventSink,
        frames: Mapping[str, pd.DataFrame],
        add_closer: Callable[[Closer], None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.alert = alert
        self.frames = frames
        self._add_closer = add_closer
        self.retrainer: Retrainer | None = None

    def model_name(self, pair: str) -> str:
        """Return the model registry name used for a pair (same as `--mode train`)."""
        from model_training import model_name

        return model_name("supervised", pair, self.settings.strategy.timeframe)

    def enable(self) -> None:
        """Filter entries through each pair's champion model (when learning is enabled)."""
        from model_training import model_dirs
        from self_learning import ModelRegistry, SafePredictor

        models, _ = model_dirs(self.settings.learning, self.settings.storage.data_dir)
        self.engine.model_threshold = self.settings.learning.entry_threshold
        for pair in self.engine.pairs:
            registry = ModelRegistry(models, self.model_name(pair))
            self.engine.predictors[pair] = SafePredictor(registry, alert=self.alert)

    def build_retrainer(self) -> Retrainer:
        """Return the model retrainer of this run (`model_training.Retrainer`)."""
        from model_training import Retrainer, RetrainPlan, Scoring, model_dirs

        engine = self.engine
        settings = self.settings
        models, features = model_dirs(settings.learning, settings.storage.data_dir)
        timeframe = settings.strategy.timeframe
        plan = RetrainPlan(
            learning=settings.learning,
            kind=settings.learning.kind,
            timeframe=timeframe,
            scoring=Scoring(timeframe_to_ms(timeframe), settings.reward),
            models_dir=models,
            features_dir=features,
            data_dir=settings.storage.data_dir,
            exchange=settings.exchange.name,
            pairs=lambda: list(engine.pairs),
            frame=self._seen_candles,
            candles=lambda: engine.candles,
            flush=engine.data.flush,
            alert=self.alert,
            poll_s=settings.learning.retrain_check_s,
        )
        self._add_closer(("retrainer", self._close_retrainer))
        return Retrainer(plan)

    def _seen_candles(self, pair: str) -> pd.DataFrame | None:
        # A replay has no archive: train on the replayed candles up to the last one the
        # engine processed (never a candle it has not seen). None: the worker reads the
        # pair's archive itself.
        if self.engine.data.store is not None or pair not in self.frames:
            return None
        seen = self.engine.data.arrays(pair, self.settings.strategy.timeframe).ts
        if not len(seen):
            return None
        frame = self.frames[pair]
        return frame[frame.index.as_unit("ms").asi8 <= int(seen[-1])]

    async def _close_retrainer(self) -> None:
        if self.retrainer is not None:
            self.retrainer.close()

    async def retrain_once(self) -> None:
        """One step of the retrainer: shadow what is running, retrain what is due."""
        if self.retrainer is None:
            self.retrainer = self.build_retrainer()
        try:
            await self.retrainer.step()
        except asyncio.CancelledError:
            self.retrainer.close()  # the run ends: stop the worker with it
            raise
