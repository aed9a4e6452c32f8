"""Retry/backoff with injected sleep, time helpers, periodic scheduling, atomic writes, tasks."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from error_handler import (
    CircuitBreaker,
    FatalError,
    OrderRejected,
    RateLimitError,
    RecoverableError,
)
from models import Side
from utils.progress import progress_bar
from utils.utilities import (
    AuditTrail,
    ReplayClock,
    atomic_write,
    backoff_delay,
    datetime_to_ms,
    floor_ts,
    ms_to_datetime,
    next_candle_ts,
    parse_date_ms,
    parse_timerange,
    redact,
    register_secret,
    retry_async,
    run_periodic,
    run_together,
    supervised_loop,
    timeframe_to_ms,
)


class Failing:
    """Fails with the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_retry_backs_off_exponentially_with_full_jitter() -> None:
    """Waits are uniform in [0, min(cap, base*2**n)] and the call finally succeeds."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    func = Failing(*(RecoverableError("net") for _ in range(5)))
    rng = random.Random(7)
    result = await retry_async(func, attempts=6, base=0.5, cap=4.0, sleep=sleep, rng=rng)
    assert result == "ok"
    assert func.calls == 6
    expected_rng = random.Random(7)
    expected = [expected_rng.uniform(0, min(4.0, 0.5 * 2**n)) for n in range(1, 6)]
    assert slept == pytest.approx(expected)
    assert all(0 <= s <= min(4.0, 0.5 * 2**n) for n, s in enumerate(slept, start=1))


@given(
    attempt=st.integers(min_value=0, max_value=40),
    base=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=0.001, max_value=120.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_delay_is_full_jitter_under_the_cap(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    """Every delay lies in [0, min(cap, base * 2**attempt)] and is the rng's uniform draw."""
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    ceiling = min(cap, base * 2**attempt)
    assert 0.0 <= delay <= ceiling
    assert delay == random.Random(seed).uniform(0, ceiling)


@given(
    attempt=st.integers(min_value=0, max_value=40),
    retry_after=st.floats(min_value=0.0, max_value=600.0),
)
def test_backoff_delay_honours_retry_after(attempt: int, retry_after: float) -> None:
    """A server's retry_after is the delay, whatever the attempt or the cap."""
    delay = backoff_delay(attempt, base=0.5, cap=1.0, rng=random.Random(1), retry_after=retry_after)
    assert delay == retry_after


async def test_retry_honours_server_retry_after() -> None:
    """A RateLimitError's retry_after is the wait, not the jittered backoff."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    func = Failing(RateLimitError("429", retry_after=3.25))
    assert await retry_async(func, attempts=3, sleep=sleep) == "ok"
    assert slept == [3.25]


async def test_retry_raises_when_attempts_run_out() -> None:
    """The last error propagates after `attempts` calls."""

    async def sleep(seconds: float) -> None:
        return None

    func = Failing(*(RecoverableError(f"n{i}") for i in range(10)))
    with pytest.raises(RecoverableError, match="n2"):
        await retry_async(func, attempts=3, sleep=sleep)
    assert func.calls == 3


@pytest.mark.parametrize("error", [OrderRejected("no"), FatalError("stop"), ValueError("bug")])
async def test_retry_never_retries_non_recoverable(error: Exception) -> None:
    """Business refusals, fatal errors and bugs are raised at once."""
    func = Failing(error)
    with pytest.raises(type(error)):
        await retry_async(func, attempts=5)
    assert func.calls == 1


@pytest.mark.parametrize(
    ("tf", "ms"),
    [
        ("1s", 1000),
        ("1m", 60_000),
        ("5m", 300_000),
        ("4h", 14_400_000),
        ("1d", 86_400_000),
        ("1w", 604_800_000),
    ],
)
def test_timeframe_to_ms(tf: str, ms: int) -> None:
    """ccxt timeframes convert to milliseconds."""
    assert timeframe_to_ms(tf) == ms


@pytest.mark.parametrize("bad", ["", "1M", "0m", "m1", "1x", "1.5h"])
def test_bad_timeframes_are_refused(bad: str) -> None:
    """Unknown or ambiguous timeframes raise ValueError."""
    with pytest.raises(ValueError):
        timeframe_to_ms(bad)


def test_candle_alignment() -> None:
    """floor_ts and next_candle_ts align to the timeframe grid."""
    ts = 1_670_889_661_234
    assert floor_ts(ts, "1m") == 1_670_889_660_000
    assert next_candle_ts(ts, "1m") == 1_670_889_720_000
    assert floor_ts(1_670_889_660_000, "1m") == 1_670_889_660_000


def test_datetime_conversions_are_utc_and_refuse_naive() -> None:
    """ms <-> datetime round-trips in UTC; naive datetimes are refused."""
    dt = ms_to_datetime(1_704_067_200_000)
    assert dt == datetime(2024, 1, 1, tzinfo=UTC)
    assert datetime_to_ms(dt) == 1_704_067_200_000
    assert (
        datetime_to_ms(datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
        == 1_704_067_200_000
    )
    with pytest.raises(ValueError):
        datetime_to_ms(datetime(2024, 1, 1))  # noqa: DTZ001 - the point of the test


def test_parse_dates_and_timeranges() -> None:
    """Dates parse in several forms as UTC; timeranges allow an open side."""
    assert parse_date_ms("2024-01-01") == 1_704_067_200_000
    assert parse_date_ms("20240101") == 1_704_067_200_000
    assert parse_date_ms("2024-01-01T00:00:00Z") == 1_704_067_200_000
    assert parse_timerange("20240101-20240102") == (1_704_067_200_000, 1_704_153_600_000)
    assert parse_timerange("20240101-") == (1_704_067_200_000, None)
    with pytest.raises(ValueError):
        parse_timerange("20240101")


async def test_periodic_does_not_drift() -> None:
    """Ticks stay on the grid even when the work takes time; missed ticks are skipped."""
    clock = ReplayClock(1_000)
    stop = asyncio.Event()
    ticks: list[int] = []

    async def work() -> None:
        ticks.append(clock.now_ms())
        clock.advance(0.3)  # the job itself takes 300 ms
        if len(ticks) == 3:
            clock.advance(2.5)  # a stall longer than two intervals
        if len(ticks) == 5:
            stop.set()

    await run_periodic(work, 1.0, stop, clock=clock, align=True)
    assert ticks == [2_000, 3_000, 4_000, 7_000, 8_000]


async def test_replay_clock_never_goes_back() -> None:
    """set() refuses to move the replay clock backwards."""
    clock = ReplayClock(10)
    clock.set(20)
    with pytest.raises(ValueError):
        clock.set(5)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    """The target holds the old or new content, and no temp file is left behind."""
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["state.json"]


def test_atomic_write_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the replace fails, the old content survives and the temp file is removed."""
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


async def test_supervised_loop_survives_errors_and_trips_breaker() -> None:
    """Recoverable and unexpected errors back off; the breaker opens; fatal escapes."""
    stop = asyncio.Event()
    clock_now = [0.0]
    breaker = CircuitBreaker("feed", threshold=3, reset_after=5, now=lambda: clock_now[0])
    outcomes: list[BaseException | None] = [
        RecoverableError("a"),
        ValueError("bug"),
        RecoverableError("b"),
        None,
        FatalError("auth"),
    ]
    slept: list[float] = []
    states: list[str] = []

    async def step() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        states.append(str(breaker.state))
        clock_now[0] += 10  # let the breaker half-open for the next probe

    with pytest.raises(FatalError):
        await supervised_loop(
            "feed", step, stop, breaker=breaker, sleep=sleep, rng=random.Random(1)
        )
    assert "open" in states
    assert breaker.state.value == "closed"  # the success in between closed it
    assert len(slept) >= 3


def test_redaction_masks_registered_secrets_and_secret_keys() -> None:
    """Registered secret values and secret-looking keys never survive redaction."""
    register_secret("s3cr3t-value-xyz")
    data = {"url": "https://x/?sign=s3cr3t-value-xyz", "api_key": "visible?", "n": 1}
    out = redact(data)
    assert "s3cr3t-value-xyz" not in repr(out)
    assert out["api_key"] == "***"
    assert out["n"] == 1


def test_audit_trail_writes_every_event_in_order_redacted_off_the_caller(tmp_path: Path) -> None:
    """Events are queued by record() and written by the writer thread; close() drains."""
    import threading

    register_secret("sk-audit-secret-123")
    audit = AuditTrail(tmp_path)
    caller = threading.current_thread()
    writers: list[threading.Thread] = []
    original = logging.handlers.RotatingFileHandler.emit

    def spy(self: logging.Handler, record: logging.LogRecord) -> None:
        writers.append(threading.current_thread())
        original(self, record)

    logging.handlers.RotatingFileHandler.emit = spy  # type: ignore[method-assign]
    try:
        for i in range(500):
            audit.record("order", i, n=i, api_key="k-1", note="sk-audit-secret-123 here")
        audit.close()
        audit.close()  # idempotent
    finally:
        logging.handlers.RotatingFileHandler.emit = original  # type: ignore[method-assign]
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["n"] for e in events] == list(range(500))
    assert {e["kind"] for e in events} == {"order"}
    assert all(e["api_key"] == "***" for e in events)
    assert "sk-audit-secret-123" not in "".join(lines)
    assert audit.count == 500
    assert writers
    assert caller not in writers  # encoded and written on the writer thread


def test_held_audit_events_reach_the_writer_when_the_block_ends_in_order(
    tmp_path: Path,
) -> None:
    """Inside `held` (nested too) nothing is written; at the end every event is, in order."""
    import time

    audit = AuditTrail(tmp_path, keep=True)
    audit.record("signal", 0, n=0)
    with audit.held():
        for i in range(1, 4):
            audit.record("order", i, n=i)
        with audit.held():
            audit.record("fill", 4, n=4)
        path = tmp_path / "audit.jsonl"
        deadline = time.monotonic() + 10
        while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the event given before the block gets written
        time.sleep(0.05)  # and anything else the writer had been given would be by now
        written = path.read_text().splitlines()
        assert [json.loads(line)["n"] for line in written] == [0]
    audit.record("fill", 5, n=5)
    audit.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["n"] for e in events] == list(range(6))
    assert audit.events is not None
    assert [e["n"] for e in audit.events] == list(range(6))  # kept in memory as recorded
    assert audit.count == 6


def test_an_unencodable_audit_event_is_noted_and_the_trail_goes_on(tmp_path: Path) -> None:
    """A circular payload cannot be JSON: it is recorded as unencodable, later events too."""
    audit = AuditTrail(tmp_path)
    loop: dict[str, object] = {}
    loop["self"] = loop
    audit.record("signal", 1, data=loop)
    audit.record("order", 2, n=7)
    audit.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["ts"]) for e in events] == [("signal", 1), ("order", 2)]
    assert "unencodable" in events[0]
    assert events[1]["n"] == 7


def test_audit_values_without_a_json_form_are_written_as_valid_json(tmp_path: Path) -> None:
    """numpy numbers stay numbers, non-finite floats become null, Decimals and the rest
    their strings; every line parses (a NaN written as `NaN` would not)."""
    import numpy as np

    class Price(float):
        pass

    audit = AuditTrail(tmp_path)
    audit.record(
        "signal",
        1,
        features={"z": np.float64(1.5), "n": np.int64(3), "gap": float("nan"), 7: "k"},
        price=Price(2.25),
        qty=Decimal("0.0010"),
        infinite=float("inf"),
        side=Side.BUY,
        path=Path("a/b"),
    )
    audit.close()
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    event = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert event["features"] == {"z": 1.5, "n": 3, "gap": None, "7": "k"}
    assert event["price"] == 2.25
    assert event["infinite"] is None
    assert event["qty"] == "0.0010"
    assert event["side"] == Side.BUY.value
    assert event["path"] == "a/b"


def test_a_burst_of_audit_events_is_written_in_batches_in_order(tmp_path: Path) -> None:
    """Events queued together reach the file in fewer writes than events, in order."""
    emitted: list[int] = []
    original = logging.handlers.RotatingFileHandler.emit

    def spy(self: logging.Handler, record: logging.LogRecord) -> None:
        emitted.append(str(record.msg).count("\n") + 1)
        original(self, record)

    logging.handlers.RotatingFileHandler.emit = spy  # type: ignore[method-assign]
    try:
        audit = AuditTrail(tmp_path)
        with audit.held():
            for i in range(2500):
                audit.record("order", i, n=i)
        audit.close()
    finally:
        logging.handlers.RotatingFileHandler.emit = original  # type: ignore[method-assign]
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(2500))
    assert sum(emitted) == 2500
    assert len(emitted) < 2500
    assert max(emitted) <= 1000


def test_log_exception_keeps_its_traceback_in_the_json_file(tmp_path: Path) -> None:
    """log.exception on the loop thread writes the traceback, rendered on the listener."""
    from utils.utilities import setup_logging, stop_log_listener

    setup_logging(tmp_path, console=False)
    try:
        try:
            raise ValueError("boom while sending")
        except ValueError:
            structlog.get_logger("kestrel.test").exception("step_failed", step="send")
    finally:
        stop_log_listener()
        setup_logging(None, console=False)
    lines = [json.loads(line) for line in (tmp_path / "kestrel.jsonl").read_text().splitlines()]
    event = next(line for line in lines if line["event"] == "step_failed")
    assert "ValueError: boom while sending" in event["exception"]
    assert "raise ValueError" in event["exception"]


def _logged_events(path: Path) -> list[str]:
    # The events of a JSON log file so far (none before its first line).
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["event"] for line in lines]


def test_flush_logs_waits_for_the_records_queued_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flush_logs` returns once what was logged before it is in the file, the listener still
    running; a listener that cannot answer in time gives False."""
    import threading
    import time

    from utils.utilities import flush_logs, setup_logging, stop_log_listener

    original = logging.handlers.RotatingFileHandler.emit
    gate = threading.Event()
    gate.set()

    def slow(self: logging.Handler, record: logging.LogRecord) -> None:
        gate.wait()
        time.sleep(0.001)  # the listener lags behind the logging thread
        original(self, record)

    monkeypatch.setattr(logging.handlers.RotatingFileHandler, "emit", slow)
    setup_logging(tmp_path, level="INFO", console=False)
    log = logging.getLogger("kestrel.test")

    def events() -> list[str]:
        return _logged_events(tmp_path / "kestrel.jsonl")

    try:
        for i in range(100):
            log.warning(f"before_{i}")
        assert flush_logs()
        assert events() == [f"before_{i}" for i in range(100)]
        log.warning("after")  # the listener still writes
        assert flush_logs()
        assert events()[-1] == "after"
        gate.clear()  # a sink that hangs: the flush gives up
        log.warning("stuck")
        started = time.monotonic()
        assert not flush_logs(timeout=0.2)
        assert time.monotonic() - started < 2
    finally:
        gate.set()
        stop_log_listener()
        setup_logging(None, console=False)
    assert events()[-1] == "stuck"
    assert flush_logs()  # no listener: nothing to wait for


@pytest.mark.parametrize("elapsed", [False, True])
def test_progress_bar_draws_description_and_count(
    capsys: pytest.CaptureFixture[str], elapsed: bool
) -> None:
    """The shared bar shows the task's description and done/total, then keeps it on screen."""
    with progress_bar(elapsed=elapsed) as bar:
        task = bar.add_task("BTC/USDT", total=3)
        bar.advance(task, 3)
    out = capsys.readouterr().out
    assert "BTC/USDT" in out
    assert "3/3" in out


def test_progress_bar_on_stderr_leaves_stdout_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """With stderr=True nothing reaches stdout (a report piped from stdout stays clean)."""
    with progress_bar(stderr=True, transient=True) as bar:
        bar.update(bar.add_task("backtest", total=None), completed=5, total=5)
    assert capsys.readouterr().out == ""


def test_a_trail_that_only_counts_counts_what_its_callers_skip_building() -> None:
    """`wanted` is False on a counting trail and counts the event; a kept trail records it."""
    counting, keeping = AuditTrail(None), AuditTrail(None, keep=True)
    for trail in (counting, keeping):
        for i in range(5):
            if trail.wanted():
                trail.record("order", i, n=i)
        trail.record("fill", 5, n=5)  # recorded directly: counted once as well
    assert counting.count == keeping.count == 6
    assert counting.events is None
    assert keeping.events is not None
    assert [e["n"] for e in keeping.events] == list(range(6))


def test_an_event_built_by_the_writer_reads_as_one_recorded_with_its_fields(
    tmp_path: Path,
) -> None:
    """`record_with`'s fields are built on the writer thread, after a held block, in order
    with `record`'s events, and written as the same line; a kept trail builds them at once,
    a counting one never; a builder that raises leaves an unencodable line, not a dead
    trail."""
    import threading

    register_secret("sk-built-secret-456")
    built_on: list[str] = []

    def fields(n: int, qty: Decimal) -> dict[str, Any]:
        built_on.append(threading.current_thread().name)
        return {"n": n, "qty": str(qty), "side": str(Side.BUY), "note": "sk-built-secret-456"}

    def broken(n: int) -> dict[str, Any]:
        raise ValueError(f"no fields for {n}")

    lazy, eager = AuditTrail(tmp_path / "lazy"), AuditTrail(tmp_path / "eager")
    with lazy.held():
        lazy.record("signal", 0, n=0)
        lazy.record_with("order", 1, fields, 1, Decimal("0.0010"))
        lazy.record_with("fill", 2, broken, 2)
        assert built_on == []  # nothing built while the block holds its events
    lazy.record("fill", 3, n=3)
    lazy.close()
    eager.record("signal", 0, n=0)
    eager.record("order", 1, **fields(1, Decimal("0.0010")))
    eager.close()
    lines = (tmp_path / "lazy" / "audit.jsonl").read_text().splitlines()
    wanted = (tmp_path / "eager" / "audit.jsonl").read_text().splitlines()
    assert lines[:2] == wanted
    assert json.loads(lines[1])["note"] == "***"
    assert json.loads(lines[2]) == {
        "kind": "fill",
        "ts": 2,
        "unencodable": "ValueError('no fields for 2')",
    }
    assert json.loads(lines[3])["n"] == 3
    assert built_on == ["kestrel-audit", "MainThread"]  # the writer's, then the eager call's
    assert lazy.count == 4
    counting, keeping = AuditTrail(None), AuditTrail(None, keep=True)
    for trail in (counting, keeping):
        trail.record_with("order", 1, fields, 1, Decimal("0.5"))
    assert counting.count == keeping.count == 1
    assert counting.events is None
    assert keeping.events == [
        {
            "kind": "order",
            "ts": 1,
            "n": 1,
            "qty": "0.5",
            "side": "buy",
            "note": "sk-built-secret-456",
        }
    ]


def test_logging_set_up_without_sinks_writes_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """No file and no console: a warning goes nowhere (not to the stdlib's last resort,
    which would print it to stderr on the loop, over a dashboard)."""
    from utils.utilities import setup_logging

    setup_logging(None, level="WARNING", console=False, cache_loggers=True)
    try:
        structlog.get_logger("kestrel.test").warning("nowhere_to_go", n=1)
        logging.getLogger("kestrel.test").warning("nor this")
    finally:
        setup_logging(None, console=False)
    out, err = capfd.readouterr()
    assert "nowhere_to_go" not in out + err
    assert "nor this" not in out + err


def test_held_log_records_reach_the_file_when_the_block_ends(tmp_path: Path) -> None:
    """Inside `held_logs` this thread's records wait (nested blocks too); another thread's
    are written meanwhile; at the end the held ones are written, in order."""
    import threading
    import time

    from utils.utilities import held_logs, setup_logging, stop_log_listener

    setup_logging(tmp_path, level="INFO", console=False)
    log = logging.getLogger("kestrel.test")

    def events() -> list[str]:
        return _logged_events(tmp_path / "kestrel.jsonl")

    try:
        with held_logs():
            log.warning("held_first")
            with held_logs():
                log.warning("held_second")
            other = threading.Thread(target=lambda: log.warning("from_another_thread"))
            other.start()
            other.join()
            deadline = time.monotonic() + 10
            while "from_another_thread" not in events() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # and a held record the listener had been given would be by now
            assert events() == ["from_another_thread"]
        log.warning("after")
    finally:
        stop_log_listener()
        setup_logging(None, console=False)
    assert events() == ["from_another_thread", "held_first", "held_second", "after"]


@given(
    durations=st.lists(st.integers(0, 3), min_size=0, max_size=12),
    limit=st.integers(1, 5),
    fails=st.one_of(st.none(), st.integers(0, 11)),
)
def test_run_together_starts_in_order_at_most_limit_at_once_and_nothing_after_a_failure(
    durations: list[int], limit: int, fails: int | None
) -> None:
    """Items start in their order, never more than `limit` run at once (and as many as
    there are, up to it), none starts after one raised, the started ones all finish, and
    the first error is raised."""
    started: list[int] = []
    finished: list[int] = []
    events: list[str] = []
    running = [0, 0]  # now, most

    async def work(i: int) -> None:
        started.append(i)
        events.append("start")
        running[0] += 1
        running[1] = max(running)
        try:
            for _ in range(durations[i]):
                await asyncio.sleep(0)
            if i == fails:
                events.append("fail")
                raise ValueError(i)
        finally:
            running[0] -= 1
            finished.append(i)

    async def go() -> None:
        await run_together(range(len(durations)), work, limit=limit)

    if fails is not None and fails < len(durations):
        with pytest.raises(ValueError, match=str(fails)):
            asyncio.run(go())
        assert fails in started
        # Nothing started once it had raised.
        assert "start" not in events[events.index("fail") :]
    else:
        asyncio.run(go())
        assert started == list(range(len(durations)))
        if durations and min(durations) > 0:  # each yields: the next ones start meanwhile
            assert running[1] == min(limit, len(durations))
    assert started == sorted(started)  # in their order
    assert sorted(finished) == sorted(started)  # every one started was seen through
    assert running[1] <= limit
