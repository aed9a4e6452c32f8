"""The burst gather on the exchange's feed, end to end: a lagging stream on the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import pytest

import main
from burst import YOUNG_BETWEEN_BURSTS, BurstDecider
from config import load_settings
from runner import Daemon
from tests.bybit_emulator import MINUTE_MS, BybitEmulator
from tests.test_backtest_support import cli_args


WINDOW_S = 0.15


@pytest.mark.slow
async def test_a_lagging_stream_is_waited_for_once_and_again_once_it_is_on_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the emulator's stream, SOL's klines come 0.5 s after each close: the first close's
    burst waits the window for it, then SOL is decided on its own at every close and no
    burst waits for it; once its klines come within the window, the next close's burst
    holds all three pairs again. The status views name SOL as late while it is. While the
    daemon runs, the young generation is collected after its bursts (burst.py), not at
    CPython's threshold; the threshold is back once it has stopped. The closes come a second
    apart, and the daemon rehearses its bursts' passes before those it can foresee."""
    bursts: list[tuple[int, list[str], float]] = []  # close, pairs, waited from first in
    thresholds: set[int] = set()  # the young generation's, at each burst
    paced: set[bool] = set()  # whether each burst collects it after
    original = BurstDecider.on_burst

    async def on_burst(self: BurstDecider, items: Any) -> None:
        first = min(received for _, received in items)
        bursts.append(
            (items[0][0].ts, sorted(c.pair for c, _ in items), time.perf_counter() - first)
        )
        thresholds.add(gc.get_threshold()[0])
        paced.add(self.paced)
        await original(self, items)

    monkeypatch.setattr(BurstDecider, "on_burst", on_burst)
    threshold = gc.get_threshold()
    async with BybitEmulator() as emu:
        # Just past a minute: its clock runs with the wall clock, and a minute turning during
        # the test would close a candle the test did not ask for.
        await emu.advance(MINUTE_MS - emu.clock.now_ms() % MINUTE_MS + 500)
        monkeypatch.setenv("KESTREL_EXCHANGE__BASE_URL", emu.base_url)
        monkeypatch.setenv("KESTREL_EXCHANGE__BURST_GATHER_MS", str(WINDOW_S * 1000))
        monkeypatch.setenv("KESTREL_STRATEGY__NAME", "sma_cross")
        monkeypatch.setenv("KESTREL_STRATEGY__PARAMS", '{"fast": 2, "slow": 3}')
        monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", "BTC/USDT,ETH/USDT,SOL/USDT")
        monkeypatch.setenv("KESTREL_STRATEGY__WARMUP_CANDLES", "10")
        parsed = cli_args("--mode", "sim", "--feed", "live", "--log-level", "WARNING")
        daemon = Daemon(parsed, main._apply_cli(load_settings(env_file=None), parsed))
        await daemon.build_exchange(paper=True)
        run = asyncio.create_task(daemon.run())
        try:
            await asyncio.sleep(3)  # start-up: markets, warm-up candles, subscriptions
            lagging: list[int] = []  # the closes pushed with SOL 0.5 s late
            shown: list[tuple[str, ...]] = []  # the late streams the snapshot names
            for lag in (0.5, 0.5, 0.5, 0.03, 0.03):
                emu.kline_lag_s["SOLUSDT"] = lag
                await emu.advance(minutes=1)
                now = emu.clock.now_ms()
                lagging.append(now - now % 60_000 - 60_000)
                await asyncio.sleep(1.0)
                assert daemon.engine is not None
                shown.append(daemon.engine.snapshot().late_streams)
        finally:
            daemon.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run, 30)
    by_close = {ts: [(pairs, waited) for t, pairs, waited in bursts if t == ts] for ts in lagging}
    both, sol = ["BTC/USDT", "ETH/USDT"], ["SOL/USDT"]
    first, *late, back, whole = (by_close[ts] for ts in lagging)
    # The first close: the window waited out for SOL, then SOL alone, at once.
    assert [pairs for pairs, _ in first] == [both, sol]
    assert first[0][1] >= WINDOW_S * 0.9
    assert first[1][1] < WINDOW_S * 0.5
    # SOL late again: nobody waits for it; its candle is decided on its own, at once.
    for close in (*late, back):
        assert [pairs for pairs, _ in close] == [both, sol]
        assert all(waited < WINDOW_S * 0.5 for _, waited in close)
    # SOL came within the window at the close before: waited for again, one burst.
    assert [pairs for pairs, _ in whole] == [sorted([*both, *sol])]
    assert whole[0][1] < WINDOW_S
    assert shown == [("SOL/USDT",)] * 3 + [()] * 2
    assert thresholds == {YOUNG_BETWEEN_BURSTS}
    assert paced == {True}
    # Closes a second apart: from the third on, the next is foreseen and its burst's passes
    # rehearsed just before it (burst_rehearsal), three a round (signals, anomalies, ATRs).
    assert daemon.keep_warm is not None
    assert daemon.keep_warm.rehearsals >= 3
    assert gc.get_threshold() == threshold
