"""A long archive's standard-profile fast path, a segment at a time: the whole run's result."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backtest_fast import fast_engine_blockers, segment_rules
from candle_store import CandleStore
from config import Settings, load_settings
from fast_path import BacktestResult
from fast_segments import SegmentRules, run_segments
from signal_sources import replay_flags
from strategy import load_strategy
from tests.test_backtest_support import cli_args, run_cli
from tests.test_fast_standard import (
    PAIR,
    SHORT_COLUMN,
    _fast,
    _store_pairs,
    _walk,
    fast_portfolio,
)


def _rules(params: dict[str, float], **kwargs: Any) -> SegmentRules:
    rules = segment_rules(load_settings(env_file=None), load_strategy("sma_cross", params))
    return dataclasses.replace(rules, timeframe="1m", **kwargs)


def _segmented(
    frames: dict[str, pd.DataFrame],
    rows: int,
    params: dict[str, float],
    *,
    read: list[int] | None = None,
    **kwargs: Any,
) -> BacktestResult:
    # The archives handed over `rows` minutes at a time, as `archive_segments` cuts them.
    rules = _rules(params, **kwargs)
    times = {pair: frame.index.asi8 for pair, frame in frames.items()}
    first = min(int(ts[0]) for ts in times.values())
    end = max(int(ts[-1]) for ts in times.values()) + 1
    end = end if rules.end_ms is None else min(end, rules.end_ms)
    span = rows * 60_000

    def segments() -> Iterator[dict[str, pd.DataFrame]]:
        for lo in range(first, end, span):
            hi = min(lo + span, end)
            parts = {p: f[(times[p] >= lo) & (times[p] < hi)] for p, f in frames.items()}
            if read is not None:
                read.extend(len(part) for part in parts.values())
            yield {pair: part for pair, part in parts.items() if len(part)}

    kept = [(ts >= (rules.start_ms or 0)) & (ts < end) for ts in times.values()]
    carries = {pair: rules.strategy.carry() for pair in frames}  # type: ignore[attr-defined]
    return run_segments(
        rules,
        segments(),
        lambda pair, frame: replay_flags(rules.strategy, frame, carries[pair]),
        first_closes={pair: float(frame["close"].iloc[0]) for pair, frame in frames.items()},
        total=int(sum(k.sum() for k in kept)),
    )


def _assert_same(whole: BacktestResult, part: BacktestResult) -> None:
    # The whole summary; the curve to float rounding (the numba pass stops at a segment's
    # end, so a bar it would have taken is taken in Decimal: 1e-13).
    assert part.summary() == whole.summary()
    assert np.array_equal(part.ts, whole.ts)
    np.testing.assert_allclose(part.equity, whole.equity, rtol=1e-13, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1_500, 12_000),
    start=st.sampled_from([0.5, 97.0, 30_000.0]),
    sigma=st.sampled_from([0.0007, 0.002, 0.006]),
    grid=st.booleans(),
    rows=st.sampled_from([40, 299, 300, 301, 1_000, 4_096]),
    cut=st.tuples(st.none() | st.floats(0.0, 0.5), st.none() | st.floats(0.5, 1.0)),
    fill_at=st.sampled_from(["next_open", "close"]),
)
def test_segments_give_the_whole_archives_result(
    seed: int,
    n: int,
    start: float,
    sigma: float,
    grid: bool,
    rows: int,
    cut: tuple[float | None, float | None],
    fill_at: str,
) -> None:
    """Any segment length (under, at and over the data window), time range and fill rule."""
    df = _walk(n, seed, start=start, sigma=sigma, gap=0.0005, grid=grid)
    ts = df.index.asi8
    lo, hi = (None if x is None else int(ts[min(int(x * n), n - 1)]) for x in cut)
    read: list[int] = []
    params = {"fast": 10.0, "slow": 30.0}
    part = _segmented({PAIR: df}, rows, params, start_ms=lo, end_ms=hi, fill_at=fill_at, read=read)
    whole = _fast(df, "sma_cross", params, start_ms=lo, end_ms=hi, fill_at=fill_at)
    assert max(read) <= rows
    assert sum(read) == (n if hi is None else int((ts < hi).sum()))  # each row read once
    _assert_same(whole, part)


def test_a_position_held_across_many_segments_keeps_its_stop() -> None:
    """Segments shorter than a position's life: the stop trails on through every boundary."""
    df = _walk(20_000, 3, start=97.0, sigma=0.0007, gap=0.0, grid=True)
    whole = _fast(df, "sma_cross", {"fast": 10, "slow": 30})
    part = _segmented({PAIR: df}, 40, {"fast": 10.0, "slow": 30.0})
    stops = [r for r in whole.table["reason"] if str(r).startswith("stop-loss")]
    assert len(stops) > 20  # stops that trailed across segment ends
    _assert_same(whole, part)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    pairs=st.integers(2, 4),
    ragged=st.booleans(),
    rows=st.sampled_from([40, 299, 300, 301, 1_000]),
    positions=st.sampled_from(["2", "5"]),
    drawdown=st.sampled_from(["0.5", "0.03"]),
    sizing=st.sampled_from(["fixed_fractional", "kelly", "volatility_target"]),
    fill_at=st.sampled_from(["next_open", "close"]),
)
def test_segments_give_the_whole_portfolios_result(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    pairs: int,
    ragged: bool,
    rows: int,
    positions: str,
    drawdown: str,
    sizing: str,
    fill_at: str,
) -> None:
    """Several pairs on one account (one late, one with a gap): the whole run's result."""
    for key, value in {
        "KESTREL_RISK__SIZING": sizing,
        "KESTREL_SIMULATION__FILL_AT": fill_at,
        "KESTREL_RISK__MAX_DRAWDOWN": drawdown,
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.02",
        "KESTREL_RISK__MAX_OPEN_POSITIONS": positions,
        "KESTREL_RISK__MAX_POSITION_FRACTION": "0.5",
    }.items():
        monkeypatch.setenv(key, value)
    data = tmp_path_factory.mktemp("portfolio") / "data"
    names, frames = _store_pairs(data, seed, pairs, 2_000, ragged=ragged)
    frames = {pair: frames[pair] for pair in names[::-1]}  # the settings' order kept
    params = {"fast": 5.0, "slow": 20.0}
    whole = fast_portfolio(frames, params)
    part = _segmented(frames, rows, params, fill_at=fill_at)
    assert whole.n_trades > 5
    _assert_same(whole, part)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_correlation_guard_reads_the_same_returns_across_segment_boundaries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int
) -> None:
    """Correlated pairs, a correlation window longer than the data window, every entry
    resized by the exact correlation, 17-row segments: the whole run's sizes."""
    for key, value in {
        "KESTREL_RISK__CORRELATION_WINDOW": "400",  # longer than the data window (300)
        "KESTREL_RISK__MAX_CORRELATION": "0.2",  # resized by the exact correlation
        "KESTREL_RISK__MAX_OPEN_POSITIONS": "4",
        "KESTREL_RISK__MAX_DRAWDOWN": "0.9",
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.8",
        "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
        "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "1000",
        "KESTREL_RISK__MAX_POSITION_FRACTION": "1.0",  # the resized size binds
        "KESTREL_RISK__MAX_TOTAL_EXPOSURE": "5.0",
    }.items():
        monkeypatch.setenv(key, value)
    _, frames = _store_pairs(tmp_path / "data", seed, 4, 3_000, ragged=False)
    params = {"fast": 3.0, "slow": 8.0}
    whole = fast_portfolio(frames, params)
    assert whole.n_trades > 100
    _assert_same(whole, _segmented(frames, 17, params))


def _long_archive(tmp_path: Path, n: int = 6_000) -> str:
    store = CandleStore(tmp_path / "data", "bybit")
    store.append(PAIR, "1m", _walk(n, 2, start=100.0, sigma=0.003, gap=0.0, grid=True))
    return str(store.path(PAIR, "1m"))


def test_long_archives_go_to_the_replay_only_where_the_fast_path_would_hold_them(
    tmp_path: Path,
) -> None:
    """The standard profile reads them a segment at a time; all in would hold them whole."""
    path = _long_archive(tmp_path, 3_000)
    base = load_settings(env_file=None)

    def with_(**sections: dict[str, Any]) -> Settings:
        dump = base.model_dump()
        for name, values in {"storage": {"replay_segment_rows": 1_000}, **sections}.items():
            dump[name] = {**dump[name], **values}
        return Settings.model_validate(dump)

    args = cli_args("--mode", "backtest", "--data", path, "--pairs", PAIR)
    assert fast_engine_blockers(with_(), args) == []
    all_in = fast_engine_blockers(with_(risk={"profile": "all_in"}), args)
    assert any("replay_segment_rows" in r for r in all_in)
    forced = cli_args("--mode", "backtest", "--data", path, "--pairs", PAIR, "--engine", "fast")
    assert fast_engine_blockers(with_(risk={"profile": "all_in"}), forced) == []  # held whole
    timed = cli_args("--mode", "backtest", "--data", path, "--pairs", PAIR, "--duration", "5")
    assert any("--duration" in r for r in fast_engine_blockers(base, timed))
    # A strategy file's own rows: the replay reads the archive whole, and so may we.
    (tmp_path / "short_column.py").write_text(SHORT_COLUMN)
    filed = {"strategy": {"name": str(tmp_path / "short_column.py"), "params": {}}}
    assert fast_engine_blockers(with_(risk={"profile": "all_in"}, **filed), args) == []


def test_the_cli_reads_several_long_archives_a_segment_at_a_time_as_the_replay(
    tmp_path: Path,
) -> None:
    """Three pairs (one starting late, one with a gap) on one account: the replay's summary."""
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=5"]
    cli += ["--param", "slow=20", "--timeframe", "1m"]
    runs = {}
    for engine, rows in (("auto", "700"), ("replay", "700"), ("whole", "0")):
        names, _ = _store_pairs(tmp_path / engine / "data", 5, 3, 3_000, ragged=True)
        env = {
            "KESTREL_STORAGE__REPLAY_SEGMENT_ROWS": rows,
            "KESTREL_STRATEGY__PAIRS": ",".join(names[::-1]),
            "KESTREL_RISK__MAX_DRAWDOWN": "0.5",
        }
        chosen = "replay" if engine == "replay" else "auto"
        runs[engine] = run_cli(tmp_path / engine, *cli, "--engine", chosen, env=env)
    assert "prepare_s" not in runs["auto"]["timings"]  # the fast path, segmented
    assert "prepare_s" in runs["replay"]["timings"]
    for summary in runs.values():
        summary.pop("timings")
    assert runs["auto"]["n_trades"] > 30
    assert len({t["pair"] for t in runs["auto"]["trades"]}) == 3
    assert runs["auto"] == runs["replay"]
    assert runs["auto"] == runs["whole"]


@pytest.mark.parametrize("extra", [(), ("--timerange", "20240301-20240303")])
def test_the_cli_reads_a_long_archive_a_segment_at_a_time_with_the_replays_summary(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """`--engine auto` on the fast path, segmented, against the segmented replay: equal."""
    path = _long_archive(tmp_path)
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=10"]
    cli += ["--param", "slow=30", "--pairs", PAIR, "--timeframe", "1m", "--data", path, *extra]
    env = {"KESTREL_STORAGE__REPLAY_SEGMENT_ROWS": "1000"}
    runs = {}
    for engine in ("auto", "replay"):
        (tmp_path / engine).mkdir()
        runs[engine] = run_cli(tmp_path / engine, *cli, "--engine", engine, env=env)
    (tmp_path / "whole").mkdir()
    whole = run_cli(tmp_path / "whole", *cli, env={"KESTREL_STORAGE__REPLAY_SEGMENT_ROWS": "0"})
    auto, replay = runs["auto"], runs["replay"]
    assert "prepare_s" not in auto["timings"]  # the replay's own phase: not run
    assert "prepare_s" in replay["timings"]
    for summary in (auto, replay, whole):
        summary.pop("timings")
    assert auto["n_trades"] > 20
    assert auto == replay
    assert auto == whole


def test_a_refused_candle_in_a_later_segment_sends_the_run_to_the_replay(tmp_path: Path) -> None:
    """The fast path stops at the segment that holds it; the replay gives the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = CandleStore(tmp_path / "data", "bybit")
    store.append(PAIR, "1m", _walk(5_000, 4, start=100.0, sigma=0.003, gap=0.0, grid=True))
    path = store.path(PAIR, "1m")
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.loc[4_200, "high"] = frame["open"].iloc[4_200] * 0.99  # a high under the open
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).cast(table.schema), path)
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--pairs", PAIR, "--timeframe", "1m"]
    cli += ["--data", str(path)]
    env = {"KESTREL_STORAGE__REPLAY_SEGMENT_ROWS": "1000"}
    (tmp_path / "auto").mkdir()
    (tmp_path / "replay").mkdir()
    auto = run_cli(tmp_path / "auto", *cli, env=env)
    replay = run_cli(tmp_path / "replay", *cli, "--engine", "replay", env=env)
    assert "prepare_s" in auto["timings"]  # went to the replay
    auto.pop("timings")
    replay.pop("timings")
    assert auto == replay
    assert auto["candles"] == 5_000 - 1
    forced = tmp_path / "forced"
    forced.mkdir()
    with pytest.raises(AssertionError, match="--engine fast cannot run this backtest: 1 candles"):
        run_cli(forced, *cli, "--engine", "fast", env=env)  # exits 2, says why
    assert not (forced / "out.json").exists()
