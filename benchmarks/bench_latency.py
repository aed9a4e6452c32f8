"""Decision latency: closed candle in, order out, with 50 pairs streaming from the emulator.

The daemon runs in-process in `--mode sim --feed live` against the loopback Bybit emulator
(the real Exchange, ccxt.pro WebSocket streams, the real pipeline: data manager, strategy,
risk, executor, matching engine). Every emulator minute closes a candle on all 50 pairs at
once — a burst, the worst case for queueing. A fast sma_cross (2/3) makes most candles
decide. Latency runs from the moment the feed hands a candle over to the moment the order
has been accepted by the matching engine (`Engine.decision_latency_ms`), so a candle that
waits in the queue behind the other 49 of its burst counts that wait.

Peer: the same pipeline fed by the replay (no sockets, no queueing), measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASES = [f"K{i:02d}" for i in range(46)]  # + BTC, ETH, SOL, XRP = 50 spot pairs


def _args(mode: str) -> argparse.Namespace:
    return argparse.Namespace(
        mode=mode,
        feed=None,
        data=None,
        pairs=None,
        timeframe=None,
        strategy=None,
        param=[],
        timerange=None,
        since=None,
        duration=None,
        speed=None,
        no_ui=True,
        summary_json=None,
        print_config=False,
        log_level="WARNING",
        env_file=None,
    )


_EMULATOR = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.bybit_emulator import BybitEmulator

async def main():
    async with BybitEmulator(extra_bases={bases!r}, enforce_limits=False) as emu:
        print(emu.base_url, flush=True)
        await asyncio.sleep(4.0)  # the daemon starts, warms up and subscribes
        for _ in range({minutes}):
            await emu.advance(minutes=1)  # one candle closes on every pair at once
            await asyncio.sleep(0.35)
        await asyncio.sleep(1.0)

asyncio.run(main())
"""


async def _live(minutes: int) -> tuple[list[float], list[float]]:
    from config import load_settings
    from runner import Daemon
    from utils.utilities import setup_logging

    # The emulator runs in its own process, as a real exchange would: its work (matching,
    # encoding the pushes) must not be counted in our loop's latency.
    emulator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _EMULATOR.format(root=str(ROOT), bases=BASES, minutes=minutes),
        stdout=asyncio.subprocess.PIPE,
    )
    assert emulator.stdout is not None
    base_url = (await emulator.stdout.readline()).decode().strip()
    try:
        pairs = [f"{b}/USDT" for b in ("BTC", "ETH", "SOL", "XRP", *BASES)]
        os.environ.update(
            {
                "KESTREL_EXCHANGE__BASE_URL": base_url,
                "KESTREL_STRATEGY__NAME": "sma_cross",
                "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
                "KESTREL_STRATEGY__PAIRS": ",".join(pairs),
                "KESTREL_STRATEGY__WARMUP_CANDLES": "50",
                "KESTREL_RISK__MAX_OPEN_POSITIONS": "50",
                "KESTREL_RISK__RISK_PER_TRADE": "0.001",
                # Keep every pair trading for the whole run: breakers would halt entries.
                "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
                "KESTREL_RISK__MAX_DRAWDOWN": "0.95",
                "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.9",
                "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "100000",
            }
        )
        settings = load_settings(env_file=None)
        setup_logging(None, level="WARNING", console=False, cache_loggers=True)  # as main
        daemon = Daemon(_args("sim"), settings)
        await daemon.build_exchange(paper=True)
        run = asyncio.create_task(daemon.run())
        await emulator.wait()
        daemon.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, 30)
        assert daemon.engine is not None
        return list(daemon.engine.decision_latency_ms), list(daemon.engine.decision_service_ms)
    finally:
        if emulator.returncode is None:
            emulator.kill()
            await emulator.wait()


async def _replay() -> list[float]:
    from config import load_settings
    from runner import Daemon
    from utils.utilities import setup_logging

    os.environ.update(
        {
            "KESTREL_STRATEGY__NAME": "sma_cross",
            "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
            "KESTREL_STRATEGY__PAIRS": "BTC/USDT",
        }
    )
    os.environ.pop("KESTREL_EXCHANGE__BASE_URL", None)
    settings = load_settings(env_file=None)
    setup_logging(None, level="WARNING", console=False, cache_loggers=True)  # as main
    daemon = Daemon(_args("sim"), settings)
    daemon.build_replay()
    await daemon.run()
    assert daemon.engine is not None
    return list(daemon.engine.decision_latency_ms)


def run() -> list[dict[str, Any]]:
    size = os.environ.get("KESTREL_BENCH_SIZE")
    minutes = 10 if size else 40
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        os.environ["KESTREL_STORAGE__DATA_DIR"] = str(Path(tmp) / "data")
        os.environ["KESTREL_STORAGE__LOG_DIR"] = str(Path(tmp) / "logs")
        try:
            live, service = asyncio.run(_live(minutes))
            replay = asyncio.run(_replay())
        finally:
            os.chdir(cwd)
    lp = np.percentile(live, [50, 99]) if live else [float("nan")] * 2
    sp = np.percentile(service, [50, 99]) if service else [float("nan")] * 2
    rp = np.percentile(replay, [50, 99]) if replay else [float("nan")] * 2
    note = f"{len(live)} orders from 50 pairs x {minutes} bursts; target p99 < 5 ms"

    def row(name: str, ours: float, peer: float, note: str) -> dict[str, Any]:
        return {"name": name, "ours": float(ours), "unit": "ms", "ratio": None, "note": note,
                "peer": "same pipeline on replay", "peer_value": float(peer)}  # fmt: skip

    return [
        row("decision latency p50 (50 pairs, emulator stream)", lp[0], rp[0], note),
        row(
            "decision latency p99 (50 pairs, emulator stream)",
            lp[1],
            rp[1],
            "includes queueing behind the other candles of the same burst",
        ),
        row(
            "decision service time p50 (candle handed over -> order out)",
            sp[0],
            rp[0],
            "our code only, no queueing",
        ),
        row("decision service time p99", sp[1], rp[1], "target p99 < 5 ms"),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
