"""Cross-cutting helpers: logging, time, retry, periodic work, atomic files, CPU offload.

Only what several components need lives here; anything owned by one component stays in it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import logging.handlers
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import structlog

from error_handler import CircuitBreaker, FatalError, RecoverableError


T = TypeVar("T")
log = structlog.get_logger(__name__)

# -- Logging ---------------------------------------------------------------------------------

_SECRET_KEYS: Final = re.compile(r"(secret|api_?key|token|password|passphrase|sign)", re.I)
_SECRET_VALUES: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so the redaction processor masks it wherever it appears."""
    if value and len(value) >= 4:
        _SECRET_VALUES.add(value)


def redact(value: Any) -> Any:
    """Return `value` with every registered secret replaced by `***`."""
    kind = type(value)
    if kind is float or kind is int or kind is bool or value is None:
        return value  # the common leaves first: an audit event is mostly numbers
    if isinstance(value, str):
        for secret in _SECRET_VALUES:
            if secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: ("***" if _secret_key(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


_SECRET_KEY_SEEN: dict[Any, bool] = {}  # a key's verdict, computed once (keys repeat)


def _secret_key(key: Any) -> bool:
    seen = _SECRET_KEY_SEEN.get(key)
    if seen is None:
        seen = _SECRET_KEYS.search(str(key)) is not None
        if len(_SECRET_KEY_SEEN) < 10_000:  # bounded: keys built from data are not kept
            _SECRET_KEY_SEEN[key] = seen
    return seen


def _redaction_processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if key != "event" and _SECRET_KEYS.search(key) and value not in (None, "", False):
            event[key] = "***"
        else:
            event[key] = redact(value)
    return event


def _json_file_handler(
    log_dir: Path, max_bytes: int, backups: int, pre_chain: list[Any]
) -> logging.Handler:
    """Return the rotating `kestrel.jsonl` handler (one JSON object a line, tracebacks inline)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        log_dir / "kestrel.jsonl", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=pre_chain,
        )
    )
    return handler


def _console_handler(
    json_console: bool, console_level: str | None, pre_chain: list[Any]
) -> logging.Handler:
    """Return the stderr handler: JSON or readable (coloured on a terminal), own level if set."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_console
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    handler = logging.StreamHandler(sys.stderr)
    if console_level is not None:
        handler.setLevel(console_level.upper())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=pre_chain,
        )
    )
    return handler


def setup_logging(
    log_dir: Path | None,
    *,
    level: str = "INFO",
    console: bool = True,
    json_console: bool = False,
    console_level: str | None = None,
    max_bytes: int = 20_000_000,
    backups: int = 5,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog: JSON lines to a rotating file, readable output on stderr.

    `cache_loggers` (the daemon sets it) lets each module's logger build its bound logger
    once instead of on every call, with the level fixed here so that a call below it is a
    no-op (~3 us per call before, filtered or not, on the order path). Tests leave it off:
    `structlog.testing.capture_logs` cannot see cached loggers. `console_level` raises the
    bar for the console only (the file still gets `level`).
    """
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redaction_processor,
    ]
    root = logging.getLogger()
    stop_log_listener()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    sinks: list[logging.Handler] = []
    if log_dir is not None:
        sinks.append(_json_file_handler(log_dir, max_bytes, backups, pre_chain))
    if console:
        sinks.append(_console_handler(json_console, console_level, pre_chain))
    if sinks:
        # Rendering and writing happen on a listener thread: the event loop only queues
        # the event (a formatted JSON line plus a console line cost ~0.3 ms each).
        global _listener
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        _listener = _Listener(records, *sinks, respect_handler_level=True)
        _listener.start()
        root.addHandler(_UnformattedQueueHandler(records))
    else:
        # Nowhere to write: the records are dropped. Without a handler the stdlib's last
        # resort would print each warning to stderr on the loop (~0.2 ms, over a dashboard).
        root.addHandler(logging.NullHandler())
    for noisy in ("asyncio", "ccxt", "httpx", "httpcore", "telegram", "aiohttp", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    global _min_level
    _min_level = logging.getLevelName(level.upper()) if cache_loggers else logging.NOTSET
    structlog.configure(
        # filter_by_level first: events below the level cost one check, not the whole chain.
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=(
            structlog.make_filtering_bound_logger(logging.getLevelName(level.upper()))
            if cache_loggers
            else structlog.stdlib.BoundLogger
        ),
        cache_logger_on_first_use=cache_loggers,
    )


class _UnformattedQueueHandler(logging.handlers.QueueHandler):
    """Queue the record as it is: the listener's handlers format it, off the loop thread.

    The stdlib QueueHandler formats in the emitting thread, which is the cost we move.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Return the record (its structlog event dict is rendered later), exception bound.

        `log.exception` marks the event with `exc_info=True`, meaning "the exception being
        handled now": on the listener thread nothing is being handled, so the traceback
        would be lost. It is taken here, in the emitting thread.
        """
        event = record.msg
        if isinstance(event, dict) and event.get("exc_info") is True:
            record.msg = {**event, "exc_info": sys.exc_info()}
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        """Queue the record, or hold it while its thread holds its logs (`held_logs`)."""
        if _HELD.records is not None and _HELD.thread == threading.get_ident():
            _HELD.records.append(record)
        else:
            self.queue.put_nowait(record)


@dataclass(slots=True)
class _HeldLogs:
    # The records held by `held_logs` (None: none are) and the thread holding them.
    records: list[logging.LogRecord] | None = None
    thread: int = 0


_HELD = _HeldLogs()


@contextlib.contextmanager
def held_logs() -> Iterator[None]:
    """Hold this thread's log records until the block ends, then queue them in order.

    While a burst of decisions is taken: a record wakes the listener thread, which would
    take the interpreter from the loop mid-burst to render and write it. Other threads'
    records are queued at once; nested blocks hand over at the outermost one's end.
    """
    if _HELD.records is not None:
        yield
        return
    _HELD.records, _HELD.thread = [], threading.get_ident()
    try:
        yield
    finally:
        held, _HELD.records = _HELD.records, None
        if held:
            for handler in logging.getLogger().handlers:  # the set-up's, whichever is current
                if isinstance(handler, _UnformattedQueueHandler):
                    for record in held:
                        handler.queue.put_nowait(record)


class _Flushed(logging.LogRecord):
    """A marker in the listener's queue: set once every record queued before it is written."""

    def __init__(self) -> None:
        super().__init__("kestrel.flush", logging.NOTSET, "", 0, "", None, None)
        self.done = threading.Event()


class _Listener(logging.handlers.QueueListener):
    """The listener thread that renders and writes the queued records (`flush_logs` waits on it)."""

    def handle(self, record: logging.LogRecord) -> None:
        if isinstance(record, _Flushed):
            record.done.set()  # the records before it are written: the queue is in order
            return
        super().handle(record)


_listener: _Listener | None = None
_min_level = logging.NOTSET  # below it, the cached loggers drop events (setup_logging)


def logs_at(level: int) -> bool:
    """Return whether an event at `level` is logged (always, until the daemon's set-up).

    For the order path: an event's fields are built before the logger drops it, and
    `str()` of a Decimal, an enum and the logger's lookup cost ~2 us per order.
    """
    return level >= _min_level


def flush_logs(timeout: float = 2.0) -> bool:
    """Wait until the log records queued so far are written; False if not within `timeout`.

    The listener keeps running (records logged after this are written as before). Before a
    run's summary is printed, so the console's last warnings do not come after it.
    """
    listener = _listener
    if listener is None:
        return True
    marker = _Flushed()
    listener.queue.put_nowait(marker)
    return marker.done.wait(timeout)


def stop_log_listener() -> None:
    """Flush queued log records and stop the listener thread (idempotent)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


atexit.register(stop_log_listener)


def audit_handler(
    log_dir: Path, *, max_bytes: int = 50_000_000, backups: int = 10
) -> logging.Handler:
    """Return the rotating handler of `logs/audit.jsonl` (one JSON object per line)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        log_dir / "audit.jsonl", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


# -- Time ------------------------------------------------------------------------------------

_TF_UNITS: Final[dict[str, int]] = {
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}
_TF_RE: Final = re.compile(r"^(\d+)([smhdwM])$")


def timeframe_to_ms(timeframe: str) -> int:
    """Return the length of a ccxt-style timeframe ('1m', '4h', '1d', '1w') in ms.

    Raises:
        ValueError: for an unknown timeframe (months are not fixed-length and not allowed).
    """
    match = _TF_RE.match(timeframe)
    if not match or match.group(2) == "M":
        raise ValueError(f"unsupported timeframe {timeframe!r}; use e.g. 1m, 5m, 1h, 4h, 1d")
    amount = int(match.group(1))
    if amount <= 0:
        raise ValueError(f"timeframe {timeframe!r} must be positive")
    return amount * _TF_UNITS[match.group(2)]


def floor_ts(ts_ms: int, timeframe: str) -> int:
    """Return the open time of the candle containing `ts_ms`."""
    step = timeframe_to_ms(timeframe)
    return ts_ms - ts_ms % step


def next_candle_ts(ts_ms: int, timeframe: str) -> int:
    """Return the open time of the candle after the one containing `ts_ms`."""
    return floor_ts(ts_ms, timeframe) + timeframe_to_ms(timeframe)


def ms_to_datetime(ts_ms: int) -> datetime:
    """Return a timezone-aware UTC datetime for epoch milliseconds."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime) -> int:
    """Return epoch milliseconds for a timezone-aware datetime.

    Raises:
        ValueError: for a naive datetime.
    """
    if value.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware one")
    return int(value.timestamp() * 1000)


def parse_date_ms(text: str) -> int:
    """Parse '2024-01-01', '20240101' or an ISO timestamp (UTC if no zone) to epoch ms."""
    text = text.strip()
    if re.fullmatch(r"\d{8}", text):
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if re.fullmatch(r"\d{12,}", text):
        return int(text)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return datetime_to_ms(value)


def parse_timerange(text: str) -> tuple[int | None, int | None]:
    """Parse freqtrade-style 'YYYYMMDD-YYYYMMDD' (either side may be empty) to ms bounds."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"timerange {text!r} must look like 20240101-20240301")
    return (parse_date_ms(start) if start else None, parse_date_ms(end) if end else None)


class Clock(Protocol):
    """Injected time: wall clock live, replay clock in backtests and tests."""

    def now_ms(self) -> int:
        """Return the current time in epoch ms."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class WallClock:
    """Real time."""

    def now_ms(self) -> int:
        """Return the wall time in epoch ms."""
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(seconds)


class ReplayClock:
    """Time that moves only when told: replays, backtests and tests.

    `sleep` advances the clock instantly (and yields to the loop) so code written against a
    wall clock runs at full speed in a replay.
    """

    def __init__(self, start_ms: int = 0) -> None:
        self._now = start_ms
        self.slept: list[float] = []

    def now_ms(self) -> int:
        """Return the replay time."""
        return self._now

    def set(self, ts_ms: int) -> None:
        """Move the clock to `ts_ms` (never backwards)."""
        if ts_ms < self._now:
            raise ValueError(f"replay clock cannot go back from {self._now} to {ts_ms}")
        self._now = ts_ms

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self._now += int(seconds * 1000)

    async def sleep(self, seconds: float) -> None:
        """Record, advance and yield once."""
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)


# -- Retry -----------------------------------------------------------------------------------


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Return the wait before retry number `attempt`: the one backoff rule of the codebase.

    Capped exponential backoff with full jitter (AWS "Exponential Backoff and Jitter"):
    uniform in [0, min(cap, base * 2**attempt)]. A server's `retry_after`, when given, wins.

    Args:
        attempt: how many failures in a row so far (the exponent).
        base: first backoff step in seconds; doubles per attempt.
        cap: longest backoff in seconds.
        rng: randomness for the jitter (seed it in tests).
        retry_after: the wait the server asked for, if any.

    Returns:
        The delay in seconds.
    """
    if retry_after is not None:
        return retry_after
    return rng.uniform(0, min(cap, base * 2**attempt))


async def retry_async(
    func: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    base: float = 0.5,
    cap: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, RecoverableError, float], None] | None = None,
) -> T:
    """Call `func` until it succeeds, retrying only `RecoverableError`.

    Capped exponential backoff with full jitter (AWS "Exponential Backoff and Jitter"): the
    n-th wait is uniform in [0, min(cap, base * 2**n)], unless the error carries the
    server's `retry_after`, which wins. Raises the last error when attempts run out.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    attempt = 0
    while True:
        attempt += 1
        try:
            return await func()
        except RecoverableError as e:
            if attempt >= attempts:
                raise
            delay = backoff_delay(attempt, base=base, cap=cap, rng=rng, retry_after=e.retry_after)
            if on_retry is not None:
                on_retry(attempt, e, delay)
            log.warning("retrying", attempt=attempt, delay=round(delay, 3), **e.describe())
            await sleep(delay)


# -- Tasks -----------------------------------------------------------------------------------


class SerialWorker:
    """Run blocking calls off the event loop on one thread, in the order they were awaited.

    For I/O whose order matters (the order journal: journaled before sent, acknowledged
    after), each call copies the caller's context variables (structlog's bound context).
    """

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Return `func(*args, **kwargs)`, run on the worker thread."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        call = functools.partial(context.run, func, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop the worker thread once its queued calls are done."""
        self._executor.shutdown(wait=True)


def _ignore_failure(name: str, error: BaseException) -> None:
    # supervised_loop's `on_failure` when nobody listens.
    del name, error


async def supervised_loop(
    name: str,
    step: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    breaker: CircuitBreaker | None = None,
    base: float = 0.5,
    cap: float = 30.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    on_failure: Callable[[str, BaseException], None] | None = None,
    contain_fatal: bool = False,
) -> None:
    """Run `step` until `stop` is set, surviving transient failures.

    A `RecoverableError` backs off with jitter; any other non-fatal exception is logged with
    its traceback and counted by the component's circuit breaker, which pauses the loop
    while open. `on_failure(name, error)` hears of every failure (to alert the operator).
    `CancelledError` propagates; so does `FatalError`, so the TaskGroup cancels the
    siblings and `main` runs the fail-safe, unless `contain_fatal` (background work whose
    failure must not stop trading: a full disk under the snapshots, a broken model).
    """
    rng = rng or random.Random()  # noqa: S311 - jitter
    notify = on_failure if on_failure is not None else _ignore_failure
    failures = 0
    while not stop.is_set():
        if breaker is not None and not breaker.allow():
            await sleep(min(cap, breaker.reset_after))
            continue
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, FatalError) and not contain_fatal:
                raise
            failures += 1
            if breaker is not None:
                breaker.record_failure()
            if isinstance(e, RecoverableError):
                delay = backoff_delay(
                    failures, base=base, cap=cap, rng=rng, retry_after=e.retry_after
                )
                log.warning(
                    "loop_recoverable_error", loop=name, delay=round(delay, 3), **e.describe()
                )
            else:
                delay = backoff_delay(failures, base=base, cap=cap, rng=rng)
                log.exception("loop_error", loop=name)
            notify(name, e)
            await sleep(delay)
        else:
            failures = 0
            if breaker is not None:
                breaker.record_success()


async def run_together(
    items: Iterable[T], func: Callable[[T], Awaitable[Any]], *, limit: int
) -> None:
    """Await `func(item)` for every item, at most `limit` at once, started in their order.

    Once one raises an Exception, no further item starts; the ones under way are seen
    through (none is abandoned half-done), then the first error is raised. A cancellation
    reaches every call under way, as `asyncio.gather`'s does.
    """
    gate = asyncio.Semaphore(max(1, limit))
    failed: list[Exception] = []

    async def one(item: T) -> None:
        async with gate:  # FIFO: the items start in their order
            if failed:
                return
            try:
                await func(item)
            except Exception as e:
                failed.append(e)

    await asyncio.gather(*(one(item) for item in items))
    if failed:
        raise failed[0]


async def run_periodic(
    func: Callable[[], Awaitable[None]],
    interval: float,
    stop: asyncio.Event,
    *,
    clock: Clock,
    align: bool = False,
    offset: float = 0.0,
) -> None:
    """Call `func` every `interval` seconds on a fixed schedule that does not drift.

    The next deadline is computed from the previous deadline, not from when `func` ended,
    so a slow run does not push every later run back; missed ticks are skipped, not
    bunched. With `align`, ticks land on multiples of `interval` (+ `offset`), e.g. one
    second after each candle closes (freqtrade's `_throttle`).
    """
    step_ms = int(interval * 1000)
    if step_ms <= 0:
        raise ValueError("interval must be positive")
    now = clock.now_ms()
    deadline = (now - now % step_ms + step_ms if align else now + step_ms) + int(offset * 1000)
    while not stop.is_set():
        wait = (deadline - clock.now_ms()) / 1000
        if wait > 0:
            if isinstance(clock, WallClock):
                # Wake early when asked to stop instead of sleeping the whole interval.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
            else:
                await clock.sleep(wait)
            if stop.is_set():
                return
        await func()
        now = clock.now_ms()
        deadline += step_ms
        if deadline <= now:  # skip ticks we missed instead of firing them back to back
            deadline += ((now - deadline) // step_ms + 1) * step_ms


# -- Files -----------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` so readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- CPU work off the loop -------------------------------------------------------------------

_pool: ProcessPoolExecutor | None = None


def process_pool(max_workers: int | None = None) -> Executor:
    """Return the shared process pool for CPU-heavy work (created on first use)."""
    global _pool
    if _pool is None:
        import multiprocessing

        # spawn, not fork: forking a process that runs an event loop, logging handlers and
        # BLAS threads can deadlock the child.
        _pool = ProcessPoolExecutor(
            max_workers=max_workers or max(1, (os.cpu_count() or 2) - 1),
            mp_context=multiprocessing.get_context("spawn"),
        )
    return _pool


async def run_cpu(func: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """Run a picklable CPU-bound function in a process pool without blocking the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor or process_pool(), func, *args)


def shutdown_pool() -> None:
    """Stop the shared process pool, if one was started."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def chunked(items: Iterable[T], size: int) -> Iterable[list[T]]:
    """Yield lists of at most `size` items."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_AUDIT_BATCH: Final = 1000  # events written in one call at most


def _audit_default(value: Any) -> Any:
    # orjson's fallback: a float subclass as its number (NaN and infinities become null,
    # as orjson writes them), anything else without a JSON form as its string.
    return float(value) if isinstance(value, float) else str(value)


# A queued audit event: (kind, ts, its fields) or (kind, ts, what builds them, its arguments).
_Built = tuple[str, int, Callable[..., dict[str, Any]], tuple[Any, ...]]
_Event = tuple[str, int, dict[str, Any]] | _Built


def _audit_line(kind: str, ts: int, data: Any, args: tuple[Any, ...] | None = None) -> str:
    """Return one audit event as a redacted JSON line (an unencodable one says why).

    `args`: `data` builds the fields from them (`AuditTrail.record_with`).
    """
    import orjson  # on the writer thread: not an import cost of `main.py --help`

    try:
        fields = data if args is None else data(*args)
        payload = {"kind": kind, "ts": ts, **redact(fields)}
        options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
        return orjson.dumps(payload, default=_audit_default, option=options).decode()
    except Exception as e:  # one bad event (a circular payload) must not end the trail
        return orjson.dumps({"kind": kind, "ts": ts, "unencodable": repr(e)}).decode()


class AuditTrail:
    """Append-only JSON lines of every decision (signal, verdict, order, fill) and its inputs.

    Written to `logs/audit.jsonl` with rotation, separate from the operational log. The
    event loop only queues each event; a writer thread redacts, encodes and writes it (on
    the order path this took a third of a decision's time when done inline). `close`
    drains the queue; a SIGKILL can lose the last events queued, never the trade journal,
    which is the durable record.
    """

    def __init__(self, log_dir: Path | None, *, keep: bool = False) -> None:
        self.count = 0
        # keep=True also holds events in memory (the parity audit compares two runs).
        self.events: list[dict[str, Any]] | None = [] if keep else None
        self._queue: queue.SimpleQueue[_Event | None] | None = None
        self._writer: threading.Thread | None = None
        if log_dir is not None:
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(
                target=self._write,
                args=(self._queue, audit_handler(log_dir)),
                name="kestrel-audit",
                daemon=True,
            )
            self._writer.start()
        # Events held back while a burst is decided (`held`), in order.
        self._held: list[_Event] | None = None

    def wanted(self) -> bool:
        """Return True when events are written or kept; else count one and return False.

        A backtest's trail only counts its events. A call site on the order path asks
        first (`if audit.wanted(): audit.record(...)`) and builds the event's fields (the
        strings of its Decimals, an intent's fields) only when they are used; the count
        is the same either way.
        """
        if self._queue is not None or self.events is not None:
            return True
        self.count += 1
        return False

    def record(self, kind: str, ts: int, **data: Any) -> None:
        """Queue one audit event (`data` is handed over: the caller must not mutate it)."""
        self.count += 1
        if self.events is not None:
            self.events.append({"kind": kind, "ts": ts, **data})
        if self._held is not None:
            self._held.append((kind, ts, data))
        elif self._queue is not None:
            self._queue.put((kind, ts, data))

    def record_with(
        self, kind: str, ts: int, build: Callable[..., dict[str, Any]], *args: Any
    ) -> None:
        """Queue one audit event whose fields are `build(*args)`, built by the writer.

        On the order path the fields (the strings of an intent's Decimals and enums) cost
        more than queueing the event: the writer thread builds them as it writes, after a
        burst's decisions are out (`held`). `args` must not change after the call (frozen
        models, a signal's features). Kept events (`keep`) are built at once. Counted as
        `record` counts; a backtest's trail builds nothing.
        """
        self.count += 1
        if self.events is not None:
            self.events.append({"kind": kind, "ts": ts, **build(*args)})
        if self._held is not None:
            self._held.append((kind, ts, build, args))
        elif self._queue is not None:
            self._queue.put((kind, ts, build, args))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hand the events recorded in the block to the writer when it ends, in order.

        While a burst of decisions is taken, the writer thread (woken by each event) does
        not compete with the loop for the interpreter; it writes them all just after.
        Nested blocks hand over at the outermost one's end.
        """
        if self._queue is None or self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for event in held:
                self._queue.put(event)

    @staticmethod
    def _write(
        events: queue.SimpleQueue[_Event | None],
        handler: logging.Handler,
    ) -> None:
        # Everything queued is taken at once (a burst hands over hundreds of events) and
        # written in one call: while the writer holds the interpreter the loop cannot run,
        # so each batch is encoded by orjson and the rotating handler checks its file once a
        # batch (4.5 us an event written, against 45 with json and a write per event).
        try:
            done = False
            while not done:
                event = events.get()
                if event is None:
                    return
                lines = [_audit_line(*event)]
                while len(lines) < _AUDIT_BATCH:
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        break
                    if event is None:
                        done = True
                        break
                    lines.append(_audit_line(*event))
                # The handler reports its own I/O errors (logging's handleError) and goes on.
                record = {"msg": "\n".join(lines), "levelno": logging.INFO}
                handler.emit(logging.makeLogRecord(record))
        finally:
            handler.close()

    def close(self) -> None:
        """Write every queued event, then close the file (idempotent)."""
        if self._queue is not None and self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)
            self._queue = self._writer = None
