"""Hand-written fakes for the data tests: an in-memory exchange and a fixed clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_manager import frame_to_candles, index_ms, load_candles
from error_handler import BotError, NetworkError
from models import Candle
from utils.utilities import timeframe_to_ms


@dataclass
class FixedClock:
    """A clock that says what it is told."""

    now: int

    def now_ms(self) -> int:
        """Return the set time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Advance instantly."""
        self.now += int(seconds * 1000)


@dataclass
class FakeExchange:
    """Serve candles from frames with Bybit's kline semantics: `limit` rows from `since` on.

    With `windowed`, answer like `exchange.Exchange` instead: only the candles inside
    [since, since + limit steps). Only candles closed at `now` are served, unless `serve_open`.
    `fail_after` makes every call after that many raise `error`; `extra` rows are mixed
    into every answer (duplicates, rows before `since`) to check they are not stored twice.
    """

    frames: dict[str, pd.DataFrame]
    timeframe: str
    now: int
    serve_open: bool = False
    windowed: bool = False
    fail_after: int | None = None
    error: BotError = field(default_factory=lambda: NetworkError("connection reset"))
    extra: list[Candle] = field(default_factory=list)
    calls: list[tuple[str, int | None, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._candles = {
            pair: frame_to_candles(frame, pair, self.timeframe)
            for pair, frame in self.frames.items()
        }
        self._ts = {pair: index_ms(frame) for pair, frame in self.frames.items()}

    async def fetch_ohlcv(
        self,
        pair: str,
        timeframe: str,
        since: int | None = None,
        limit: int | None = None,
        until: int | None = None,
    ) -> list[Candle]:
        """Return up to `limit` candles with ts >= since, oldest first."""
        assert timeframe == self.timeframe
        self.calls.append((pair, since, limit))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise self.error
        ts = self._ts[pair]
        first = int(np.searchsorted(ts, since or 0))
        step = timeframe_to_ms(timeframe)
        if self.windowed:
            stop = int(np.searchsorted(ts, (since or 0) + (limit or 200) * step))
            rows = self._candles[pair][first:stop]
        else:
            rows = self._candles[pair][first : first + (limit or 200)]
        if not self.serve_open:
            rows = [c for c in rows if c.ts + step <= self.now]
        return [*self.extra, *rows]


def sample_frame(sample_dir: Path, name: str, timeframe: str) -> pd.DataFrame:
    """Return a bundled sample file as a normalised frame."""
    return load_candles(sample_dir / name, timeframe=timeframe)


def end_of(frame: pd.DataFrame, timeframe: str) -> int:
    """Return the close time of the frame's last candle."""
    step = timeframe_to_ms(timeframe)
    return int(index_ms(frame)[-1]) + step
