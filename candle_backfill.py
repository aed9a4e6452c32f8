"""Backfill: page through an exchange's candle history into the Parquet archives.

A run resumes where the last one stopped and refills gaps; stretches the exchange confirms
empty are remembered beside the archive. `run_backfill_cli` is `--mode backfill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from candle_frames import _grid_offset, candles_to_arrays, normalise_arrays, report_fields
from candle_store import CandleStore, _ceil_to_grid, _subtract, missing_ranges
from error_handler import BotError, ConfigError, FatalError
from models import Candle
from perpetuals import write_funding
from utils.progress import progress_bar
from utils.utilities import (
    Clock,
    WallClock,
    parse_date_ms,
    parse_timerange,
    retry_async,
    timeframe_to_ms,
)


if TYPE_CHECKING:
    import argparse

    from config import Settings

# Events keep the logger they had before data_manager was split.
log = structlog.get_logger("data_manager")

KLINE_LIMIT: Final = 1000  # Bybit V5 /v5/market/kline returns at most 1000 rows per call


# -- Backfill --------------------------------------------------------------------------------


class CandleSource(Protocol):
    """What backfill needs from an exchange: closed candles by time (`exchange.Exchange`)."""

    async def fetch_ohlcv(
        self,
        pair: str,
        timeframe: str,
        since: int | None = None,
        limit: int | None = None,
        until: int | None = None,
    ) -> list[Candle]:
        """Return closed candles with ts >= since, oldest first, at most `limit`."""
        ...


@dataclass(frozen=True, slots=True)
class PairBackfill:
    """What backfill did for one pair."""

    pair: str
    requests: int = 0
    fetched: int = 0
    stored: int = 0
    dropped: int = 0
    gaps_found: int = 0
    empty_ranges: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BackfillReport:
    """What backfill did, per pair."""

    timeframe: str
    since_ms: int
    until_ms: int
    pairs: tuple[PairBackfill, ...]

    @property
    def stored(self) -> int:
        """Return the number of candles newly archived across pairs."""
        return sum(p.stored for p in self.pairs)

    @property
    def requests(self) -> int:
        """Return the number of exchange calls made."""
        return sum(p.requests for p in self.pairs)

    @property
    def ok(self) -> bool:
        """Return True when every pair finished without error."""
        return all(p.error is None for p in self.pairs)


@dataclass(slots=True)
class _PairJob:
    pair: str
    ranges: list[tuple[int, int]]
    archive_end: int  # one step past the last archived candle (0 if none)
    stats: dict[str, int] = field(default_factory=dict)
    buffer: list[Candle] = field(default_factory=list)
    empties: list[tuple[int, int]] = field(default_factory=list)


class _Backfill:
    """One backfill run: plans the missing ranges per pair and pages through them."""

    def __init__(
        self,
        exchange: CandleSource,
        store: CandleStore,
        timeframe: str,
        start: int,
        end: int,
        now: int,
        *,
        page_limit: int,
        flush_every: int,
        attempts: int,
        progress: Any,
    ) -> None:
        self.exchange, self.store, self.timeframe = exchange, store, timeframe
        self.step = timeframe_to_ms(timeframe)
        self.start, self.end, self.now = start, end, now
        self.page_limit, self.flush_every, self.attempts = page_limit, flush_every, attempts
        self.progress = progress

    def plan(self, pair: str) -> _PairJob:
        ts = self.store.load_ts(pair, self.timeframe)
        wanted = missing_ranges(ts, self.timeframe, self.start, self.end)
        known_empty = self.store.empty_ranges(pair, self.timeframe)
        job = _PairJob(
            pair, _subtract(wanted, known_empty), int(ts[-1]) + self.step if len(ts) else 0
        )
        # Interior gaps only: the head before the first candle and the tail after the last
        # are history not yet fetched, not holes.
        job.stats["gaps_found"] = sum(
            1 for a, b in job.ranges if len(ts) and a > ts[0] and b <= ts[-1]
        )
        return job

    async def run(self, job: _PairJob) -> PairBackfill:
        total = sum((b - a) // self.step for a, b in job.ranges)
        task = self.progress.add_task(job.pair, total=total)
        error: str | None = None
        try:
            for start, end in job.ranges:
                await self._fill_range(job, start, end, task)
        except FatalError:
            raise
        except BotError as e:
            error = f"{type(e).__name__}: {e}"
            log.error("backfill_failed", **{**e.describe(), "pair": job.pair})
        finally:
            await self._flush(job)
            self.store.add_empty_ranges(job.pair, self.timeframe, job.empties)
        span = self.store.span(job.pair, self.timeframe)
        return PairBackfill(
            job.pair,
            requests=job.stats.get("requests", 0),
            fetched=job.stats.get("fetched", 0),
            stored=job.stats.get("stored", 0),
            dropped=job.stats.get("dropped", 0),
            gaps_found=job.stats.get("gaps_found", 0),
            empty_ranges=len(job.empties),
            first_ts=span[0] if span else None,
            last_ts=span[1] if span else None,
            error=error,
        )

    async def _fill_range(self, job: _PairJob, start: int, end: int, task: Any) -> None:
        # Works with either kline semantics: "the next `limit` candles from since" (Bybit's
        # REST) and "the candles in [since, since + limit steps)" (exchange.Exchange). An
        # empty window is skipped, not taken as the end, and counts as a stretch without
        # trades only once a later candle proves the market was trading after it.
        cursor = start
        empty_from: int | None = None
        later = job.archive_end > end  # the archive already holds candles after the range
        while cursor < end:
            limit = min(self.page_limit, (end - cursor) // self.step)
            fetch = functools.partial(
                self.exchange.fetch_ohlcv, job.pair, self.timeframe, since=cursor, limit=limit
            )
            candles = await retry_async(fetch, attempts=self.attempts)
            job.stats["requests"] = job.stats.get("requests", 0) + 1
            job.stats["fetched"] = job.stats.get("fetched", 0) + len(candles)
            page = sorted((c for c in candles if cursor <= c.ts < end), key=lambda c: c.ts)
            if not page:
                if any(c.ts >= end for c in candles):
                    later = True  # the exchange skipped past the range: nothing left in it
                    break
                empty_from = cursor if empty_from is None else empty_from
                self.progress.advance(task, limit)
                cursor += limit * self.step
                continue
            hole_from = cursor if empty_from is None else empty_from
            empty_from = None
            edges = [hole_from - self.step, *(c.ts for c in page)]
            job.empties.extend(
                (a + self.step, b) for a, b in itertools.pairwise(edges) if b - a > self.step
            )
            job.buffer.extend(page)
            new_cursor = page[-1].ts + self.step
            self.progress.advance(task, (new_cursor - cursor) // self.step)
            cursor = new_cursor
            if len(job.buffer) >= self.flush_every:
                await self._flush(job)
        if cursor < end:
            self.progress.advance(task, (end - cursor) // self.step)
            empty_from = cursor if empty_from is None else empty_from
        if empty_from is not None and later:
            job.empties.append((empty_from, end))

    async def _flush(self, job: _PairJob) -> None:
        if not job.buffer:
            return
        candles, job.buffer = job.buffer, []
        closed = [c for c in candles if c.closed]
        ts, values = candles_to_arrays(closed)
        arrays, report = normalise_arrays(ts, values, timeframe=self.timeframe, now_ms=self.now)
        job.stats["dropped"] = (
            job.stats.get("dropped", 0) + report.dropped + len(candles) - len(closed)
        )
        if report.changed:
            log.warning("backfill_normalised", pair=job.pair, **report_fields(report))
        stored = await asyncio.to_thread(self.store.append, job.pair, self.timeframe, arrays)
        job.stats["stored"] = job.stats.get("stored", 0) + stored


class _NoProgress:
    def add_task(self, description: str, total: int) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        return None


async def backfill(
    exchange: CandleSource,
    store_dir: Path | str | CandleStore,
    pairs: Sequence[str],
    timeframe: str,
    since_ms: int,
    *,
    until_ms: int | None = None,
    progress: bool = True,
    exchange_name: str = "bybit",
    clock: Clock | None = None,
    page_limit: int = KLINE_LIMIT,
    flush_every: int = 200_000,
    concurrency: int = 4,
    attempts: int = 1,
) -> BackfillReport:
    """Download closed candles for `pairs` into the Parquet archives under `store_dir`.

    Fetches every grid time in [since_ms, until_ms) (until defaults to the open candle,
    which is never stored) that the archive lacks: the stretch before the first archived
    candle, gaps inside the archive and the tail after its last candle, so a rerun
    resumes where the last one stopped and refills holes. Stretches the exchange
    confirms empty (later candles exist, none there: no trades) are remembered beside
    the archive and not asked again. Candles go through `normalise_arrays` and are
    flushed every `flush_every` candles and on exit, even when cancelled. A pair whose
    calls keep failing is reported with its error; a `FatalError` stops the run.
    `exchange.Exchange` retries its own calls; `attempts` > 1 adds retries (with backoff)
    for a source that does not.
    """
    store = (
        store_dir if isinstance(store_dir, CandleStore) else CandleStore(store_dir, exchange_name)
    )
    step = timeframe_to_ms(timeframe)
    now = (clock or WallClock()).now_ms()
    end = now - (now - _grid_offset(step)) % step  # the open candle's ts: exclusive bound
    if until_ms is not None:
        end = min(end, _ceil_to_grid(until_ms, step))
    start = _ceil_to_grid(since_ms, step)
    with progress_bar() if progress else contextlib.nullcontext(_NoProgress()) as bar:
        run = _Backfill(
            exchange, store, timeframe, start, end, now,
            page_limit=page_limit, flush_every=flush_every, attempts=attempts, progress=bar,
        )  # fmt: skip
        limiter = asyncio.Semaphore(concurrency)

        async def one(pair: str) -> PairBackfill:
            async with limiter:
                return await run.run(await asyncio.to_thread(run.plan, pair))

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(pair), name=f"backfill:{pair}") for pair in pairs]
    report = BackfillReport(timeframe, start, end, tuple(t.result() for t in tasks))
    log.info(
        "backfill_done",
        timeframe=timeframe,
        pairs=len(pairs),
        stored=report.stored,
        requests=report.requests,
        ok=report.ok,
    )
    return report


async def backfill_funding(
    exchange: Any,
    store_dir: Path | str,
    pairs: Sequence[str],
    timeframe: str,
    since_ms: int,
    *,
    until_ms: int | None = None,
    exchange_name: str = "bybit",
) -> dict[str, int]:
    """Download the funding rate history of the perpetuals among `pairs`.

    Written beside their candle archives (`<pair folder>/funding.csv`, merged with what is
    there), where replays find it. Returns the number of funding times written per pair.
    """
    store = CandleStore(store_dir, exchange_name)
    written: dict[str, int] = {}
    for pair in pairs:
        if ":" not in pair:
            continue
        rows = await exchange.fetch_funding_rates(pair, since_ms, until_ms)
        path = store.path(pair, timeframe).parent / "funding.csv"
        write_funding(path, rows)
        written[pair] = len(rows)
        log.info("funding_backfilled", pair=pair, rates=len(rows), path=str(path))
    return written


async def run_backfill_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run `--mode backfill`: archive `--pairs` at `--timeframe` from `--since`.

    `--timerange` may bound the end (its right side). Perpetual pairs get their funding
    rate history too (`backfill_funding`). Returns 0 when every pair finished, 1 otherwise.

    Raises:
        ConfigError: without `--since` or with a malformed date.
    """
    pairs = settings.traded_pairs()
    timeframe = settings.strategy.timeframe
    since_text = getattr(args, "since", None)
    if not since_text:
        raise ConfigError("--mode backfill needs --since, e.g. --since 2024-01-01")
    try:
        since_ms = parse_date_ms(since_text)
        until_ms = None
        if getattr(args, "timerange", None):
            until_ms = parse_timerange(args.timerange)[1]
    except ValueError as e:
        raise ConfigError(f"backfill: {e}") from e
    from exchange import Exchange

    async with Exchange(settings.exchange) as exchange:
        report = await backfill(
            exchange,
            settings.storage.data_dir,
            pairs,
            timeframe,
            since_ms,
            until_ms=until_ms,
            exchange_name=settings.exchange.name,
        )
        await backfill_funding(
            exchange,
            settings.storage.data_dir,
            pairs,
            timeframe,
            since_ms,
            until_ms=until_ms,
            exchange_name=settings.exchange.name,
        )
    _print_backfill(report)
    return 0 if report.ok else 1


def _print_backfill(report: BackfillReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Backfill {report.timeframe}")
    for column in ("pair", "stored", "requests", "gaps", "empty", "first", "last", "error"):
        table.add_column(column)
    for p in report.pairs:
        table.add_row(
            p.pair,
            str(p.stored),
            str(p.requests),
            str(p.gaps_found),
            str(p.empty_ranges),
            _iso(p.first_ts),
            _iso(p.last_ts),
            p.error or "",
        )
    Console().print(table)


def _iso(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
