"""The benchmarks' backtesting.py peer runs as bench_scale and bench_replay call it.

Benchmarks are not tests and time nothing here; but their peer is a script run in a child
process, and a call that no longer matched the peer's signature (a bool where the trailing
stop's (ATR period, multiple) goes) broke `make bench` unseen until it ran.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_scale
from benchmarks.bench_backtest import candles


def test_the_backtesting_py_peer_runs_plain_and_with_its_trailing_stop(tmp_path: Path) -> None:
    """bench_scale's measured peer and its run-phase peer, plain and trailing an ATR stop,
    each run to the end and trade on the same candles."""
    data = tmp_path / "rw.parquet"
    candles(3_000).to_parquet(data)
    measured = bench_scale._peer(data)
    assert measured["rc"] == 0
    assert measured["rss_kib"] > 0
    _, plain = bench_scale._peer_run(data)
    _, trailing = bench_scale._peer_run(data, trailing=True)
    assert plain > 0
    assert trailing > 0
