"""The daemon on the exchange feed: paper trading on the emulator's stream, feed auto fallback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.bybit_emulator import BybitEmulator
from tests.conftest import ROOT


STRATEGY = {
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 3, "slow": 8}',
}


async def _run_daemon(
    emu: BybitEmulator | None, args: list[str], env: dict[str, str], *, seconds: float
) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        *args,
        "--no-ui",
        "--duration",
        str(seconds),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(3)  # start-up: markets, warm-up candles, subscriptions
    while proc.returncode is None:
        if emu is not None:
            await emu.advance(minutes=1)  # one candle closes and is pushed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.3)
    return proc.returncode


@pytest.mark.slow
async def test_sim_with_live_feed_trades_paper_on_the_emulator_stream(tmp_path: Path) -> None:
    """--mode sim --feed live takes candles from the stream and fills on paper only."""
    async with BybitEmulator() as emu:
        env = {"KESTREL_EXCHANGE__BASE_URL": emu.base_url, **STRATEGY}
        out = tmp_path / "summary.json"
        code = await _run_daemon(
            emu, ["--mode", "sim", "--feed", "live", "--summary-json", str(out)], env, seconds=15
        )
        assert code == 0
        summary = json.loads(out.read_text())
        assert summary["candles"] >= 10
        assert summary["signals"] >= 1
        assert not [r for r in emu.requests if "/v5/order/" in r.path]  # paper: no real orders
        assert summary["n_trades"] + len(summary["open_positions"]) >= 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_feed_auto_falls_back_to_replay_when_bybit_is_unreachable(tmp_path: Path) -> None:
    """feed auto says clearly that Bybit is unreachable and replays the bundled sample."""
    env = {"KESTREL_EXCHANGE__BASE_URL": f"http://127.0.0.1:{_closed_port()}"}
    out = tmp_path / "summary.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        "--mode",
        "sim",
        "--feed",
        "auto",
        "--no-ui",
        "--summary-json",
        str(out),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    assert b"Bybit unreachable" in stderr
    assert json.loads(out.read_text())["candles"] == 1440
