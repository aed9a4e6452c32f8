"""Crash safety: SIGKILL the live daemon at random moments; nothing is lost or sent twice.

The daemon trades live (real ccxt, real journal on SQLite) against the loopback Bybit
emulator, whose market moves one candle every quarter of a second. It is killed with SIGKILL at
50 random moments — during start-up and reconciliation, between candles, in the middle of
sending orders — and restarted each time on the same journal. At the end a last run
reconciles and stops gracefully, and the journal, the emulator and the bot's positions
must agree exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tests.bybit_emulator import BybitEmulator
from tests.conftest import ROOT
from trade_store import JournalState, TradeStore


KILLS = int(os.environ.get("KESTREL_CRASH_KILLS", "50"))
ENV = {
    "KESTREL_EXCHANGE__API_KEY": "testkey",
    "KESTREL_EXCHANGE__API_SECRET": "testsecret",
    # Trade on almost every candle so that kills land among orders.
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
    "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
    "KESTREL_RISK__MAX_DRAWDOWN": "0.95",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.9",
    "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "100000",
    "KESTREL_STORAGE__SNAPSHOT_INTERVAL_S": "1",
}


async def _start(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        "--mode",
        "live",
        "--no-ui",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _until_started(
    proc: asyncio.subprocess.Process,
    timeout: float,  # noqa: ASYNC109 - how long to wait for a line, passed to asyncio.timeout
) -> bool:
    """Wait for the daemon's start line; fail with its output if it dies first."""
    assert proc.stderr is not None
    seen: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while line := await proc.stderr.readline():
                seen.append(line)
                if b"daemon_started" in line:
                    return True
    code = await proc.wait() if not seen or not seen[-1] else proc.returncode
    raise AssertionError(f"daemon did not start (exit {code}):\n" + b"".join(seen[-30:]).decode())


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    with contextlib.suppress(Exception):
        while await proc.stderr.read(65536):
            pass


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    """After 50 SIGKILLs and restarts every order exists once, in the journal and on Bybit."""
    rng = random.Random(20261125)
    async with BybitEmulator(lenient_clock=True, balances={"USDT": "10000"}) as emu:
        env = {**ENV, "KESTREL_EXCHANGE__BASE_URL": emu.base_url}

        async def market() -> None:
            while True:
                await asyncio.sleep(0.25)
                await emu.advance(minutes=1)

        ticker = asyncio.create_task(market())
        kills_in_trading = 0
        try:
            for n in range(KILLS):
                proc = await _start(env)
                if n % 5 == 0:
                    # Every fifth kill lands anywhere in start-up: imports, markets,
                    # warm-up, reconciliation.
                    await asyncio.sleep(rng.uniform(0.2, 4.0))
                else:
                    kills_in_trading += await _until_started(proc, timeout=60)
                    drain = asyncio.create_task(_drain(proc))
                    await asyncio.sleep(rng.uniform(0.3, 4.0))
                    drain.cancel()
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
            # The last run: reconcile what the kills left, trade a little, stop cleanly.
            summary_path = tmp_path / "final.json"
            proc = await _start(env, "--summary-json", str(summary_path))
            assert await _until_started(proc, timeout=60)
            drain = asyncio.create_task(_drain(proc))
            await asyncio.sleep(3.0)
            ticker.cancel()
            await asyncio.sleep(1.0)  # let in-flight orders settle before stopping
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            drain.cancel()
        finally:
            ticker.cancel()

        assert kills_in_trading >= KILLS // 2
        store = TradeStore.open(
            f"sqlite:///{tmp_path / 'data' / 'kestrel.sqlite'}", bot_id="bybit-live"
        )
        try:
            journal = {o.client_order_id: o for o in store.all_orders()}
            on_exchange = emu.orders_by_link_id()
            # Enough orders that kills landed among them, or the test proves nothing.
            assert len(journal) >= KILLS, len(journal)
            # Nothing sent twice: one exchange order per client order id.
            assert all(len(orders) == 1 for orders in on_exchange.values())
            # Nothing lost: every exchange order is in the journal, and every journaled
            # order is either on the exchange or marked never-sent.
            assert set(on_exchange) <= set(journal)
            for cid, order in journal.items():
                state = store.journal_state(cid)
                if cid in on_exchange:
                    assert state is JournalState.ACKNOWLEDGED, (cid, state)
                else:
                    assert state is JournalState.NEVER_SENT, (cid, state, order.status)
            # Every execution on the exchange is a recorded fill, exactly once.
            executions = {e.exec_id: e for e in emu.executions}
            fills = {f.fill_id: f for f in store.fills()}
            assert set(fills) == set(executions)
            for fill_id, execution in executions.items():
                assert fills[fill_id].qty == execution.qty
            # Positions match. The coins the exchange holds are exactly what the journal's
            # fills add up to (buys less fees charged in BTC, less sells) ...
            btc = emu.wallet.get("BTC", Decimal(0))
            from_fills = sum(
                (
                    (f.qty - (f.fee if f.fee_currency == "BTC" else 0))
                    if f.side == "buy"
                    else -f.qty
                    for f in fills.values()
                ),
                Decimal(0),
            )
            assert btc == from_fills, (btc, from_fills)
            # ... and they are the bot's position, except remainders below the market's
            # minimum order, which no order can sell and the bot writes off as dust.
            summary = json.loads(summary_path.read_text())
            held = sum(
                Decimal(str(p["qty"])) for p in summary["open_positions"] if p["pair"] == "BTC/USDT"
            )
            min_qty = Decimal("0.000048")  # BTCUSDT spot minimum on the emulator, as on Bybit
            assert abs(btc - held) < min_qty, (btc, held)
            never_sent = sum(store.journal_state(c) is JournalState.NEVER_SENT for c in journal)
            print(
                f"crash test: {KILLS} kills ({kills_in_trading} while trading), "
                f"{len(journal)} orders journaled, {len(on_exchange)} on the exchange, "
                f"{never_sent} never sent, {len(fills)} fills, final BTC {btc}"
            )
        finally:
            store.close()
