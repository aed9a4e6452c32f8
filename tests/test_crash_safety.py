"""Crash safety: SIGKILL the live daemon at random moments; nothing is lost or sent twice.

The daemon trades three pairs live (real ccxt, real journal on SQLite) against the loopback
Bybit emulator, whose market moves one candle every quarter of a second; a candle that
decides entries of several pairs sends them together. Order answers are lost
after the exchange acted (a create or cancel is processed, then the answer hangs past the
client's timeout, or comes back truncated). The daemon is killed with SIGKILL at 50 random
moments — during start-up and reconciliation, between candles, in the middle of sending
orders, and right after such a lost answer — and restarted each time on the same journal.
At the end a last run reconciles and stops with SIGTERM.

The verdict is read from the exchange's own records, not from id uniqueness (the emulator
refuses a duplicate id by itself, so "one order per id" proves nothing): one entry per pair
and candle whatever its attempt, no entry filled on top of a position, no sell past flat,
never two protective stops working at once, no order unknown to the journal, every position
still protected and no entry left open after the clean stop, balances equal to the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from models import Fill, split_attempt
from tests.bybit_emulator import BybitEmulator, RecordedRequest
from tests.conftest import ROOT
from trade_store import JournalState, TradeStore


KILLS = int(os.environ.get("KESTREL_CRASH_KILLS", "50"))
# The kills' moments are drawn from this seed: another one explores other moments.
SEED = int(os.environ.get("KESTREL_CRASH_SEED", "20261202"))
MINUTE_MS = 60_000
# Three pairs, so that a candle often decides several orders at once and they go out
# together (`exchange.burst_orders_in_flight`): kills and lost answers land among orders
# under way side by side, not only one at a time. Each pair's spot minimum on the
# emulator, as on Bybit.
MIN_QTY = {
    "BTC/USDT": Decimal("0.000048"),
    "ETH/USDT": Decimal("0.00062"),
    "SOL/USDT": Decimal("0.011"),
}
PAIRS = tuple(MIN_QTY)
# Faults that lose the answer of an order request after the exchange acted on it.
LOST_ANSWERS = ("timeout_after", "malformed")
ENV = {
    "KESTREL_EXCHANGE__API_KEY": "testkey",
    "KESTREL_EXCHANGE__API_SECRET": "testsecret",
    # A hung answer is given up after 1.5 s (the emulator holds it for 3 s).
    "KESTREL_EXCHANGE__TIMEOUT_S": "1.5",
    # Trade on almost every candle so that kills land among orders; the standard risk
    # profile places a protective stop after each entry and trails it.
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
    "KESTREL_STRATEGY__PAIRS": ",".join(PAIRS),
    # The emulator's three series are all BTC's (from three venues): the correlation guard
    # would keep the bot to one of them at a time.
    "KESTREL_RISK__MAX_CORRELATION": "1",
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


async def _lost_answer(emu: BybitEmulator, since: int) -> None:
    """Return once an order request from index `since` on has had its answer lost."""
    while True:
        for rec in emu.requests[since:]:
            if rec.fault in LOST_ANSWERS and rec.path.startswith("/v5/order/"):
                return
        since = len(emu.requests)
        await asyncio.sleep(0.01)


async def _kill_while_trading(
    proc: asyncio.subprocess.Process, emu: BybitEmulator, rng: random.Random
) -> str:
    """Kill at a random moment or right after a lost answer, whichever comes first."""
    lost = asyncio.create_task(_lost_answer(emu, len(emu.requests)))
    try:
        done, _ = await asyncio.wait({lost}, timeout=rng.uniform(0.3, 4.0))
        if done and rng.random() < 0.7:
            # The answer is lost and the daemon is still waiting for it (or looking the
            # order up): kill it now, or a moment later.
            await asyncio.sleep(rng.choice([0.0, rng.uniform(0.0, 1.5)]))
            return "after_lost_answer"
        if done:
            await asyncio.sleep(rng.uniform(0.3, 2.0))
        return "random"
    finally:
        lost.cancel()


def _symbol(pair: str) -> str:
    return pair.replace("/", "")


def _held_and_protected(emu: BybitEmulator) -> bool:
    """Return whether some pair is held on the exchange with its stop working."""
    return any(
        emu.wallet.get(pair.split("/")[0], Decimal(0)) >= MIN_QTY[pair]
        and any(
            o.conditional and o.is_open and o.symbol == _symbol(pair) for o in emu.orders.values()
        )
        for pair in PAIRS
    )


def _working_intervals(emu: BybitEmulator, symbol: str) -> list[tuple[int, float, str]]:
    """Return (created, ended, link id) of every conditional order: when it could fire."""
    out = []
    for order in emu.orders.values():
        if order.symbol == symbol and order.conditional:
            ended = float("inf") if order.is_open else float(order.updated)
            out.append((order.created, ended, order.link_id))
    return sorted(out)


def _check_exchange_records(emu: BybitEmulator, pair: str) -> tuple[int, int]:
    """Assert the exchange's own records show no double decision, no overlap, nothing past flat.

    Return the pair's entries and stops on the exchange.
    """
    symbol, coin = _symbol(pair), pair.split("/")[0]
    # One entry per pair, side and candle, whatever its attempt: each entry on the exchange
    # names the decision it carries (kind, pair, candle, strategy; see models.decision_key),
    # and the candle it names had closed when the order arrived. (The emulator's market
    # jumps a minute every quarter second, so a bot catching up on a backlog rightly sends
    # several entries within one exchange minute: creation times cannot tell decisions.)
    entries = [
        o
        for o in emu.orders.values()
        if o.symbol == symbol and o.side == "Buy" and not o.conditional
    ]
    decisions: Counter[str] = Counter()
    for order in entries:
        parsed = split_attempt(order.link_id)
        assert parsed is not None, f"entry {order.link_id} does not name its decision"
        key = parsed[0]
        kind, candle_s = key[:2], int(key.split("-")[1], 16)
        assert kind == "ke", order.link_id
        assert order.created >= candle_s * 1000 + MINUTE_MS, (order.link_id, order.created)
        decisions[key] += 1
    doubled = {key: n for key, n in decisions.items() if n > 1}
    assert not doubled, f"entries decided twice on one candle: {doubled}"
    # Replay the executions in the order the exchange made them.
    held = Decimal(0)
    for execution in emu.executions:
        order = execution.order
        if order.symbol != symbol:
            continue
        if order.side == "Buy":
            assert held < MIN_QTY[pair], (
                f"entry {order.link_id} filled on top of an open position of {held}"
            )
            held += execution.qty - (execution.fee if execution.fee_coin == coin else 0)
        else:
            assert execution.qty <= held, (
                f"{order.link_id} sold {execution.qty} with {held} held: past flat"
            )
            held -= execution.qty
    # Never two protective stops working at once on the position.
    intervals = _working_intervals(emu, symbol)
    latest: tuple[float, str] = (float("-inf"), "")
    for start, end, link_id in intervals:
        assert start >= latest[0], f"stops {latest[1]} and {link_id} were working at once"
        latest = max(latest, (end, link_id))
    return len(entries), len(intervals)


def _entry_answered(request: RecordedRequest) -> bool:
    """A create of an entry that was answered in time.

    A request whose answer was lost stays open at the emulator past the client's timeout,
    beside the orders sent after it.
    """
    return request.order_kind == "entry" and not request.fault


def _decided_together(emu: BybitEmulator) -> int:
    """Return how many candles decided entries of more than one pair (sent together)."""
    pairs_of: dict[int, set[str]] = {}
    for order in emu.orders.values():
        parsed = split_attempt(order.link_id)
        if order.side == "Buy" and not order.conditional and parsed is not None:
            candle_s = int(parsed[0].split("-")[1], 16)
            pairs_of.setdefault(candle_s, set()).add(order.symbol)
    return sum(len(symbols) > 1 for symbols in pairs_of.values())


def _check_balances(
    emu: BybitEmulator, pair: str, fills: list[Fill], summary: dict[str, Any]
) -> Decimal:
    """Assert the pair's coin on the exchange is what its fills add up to, and the position.

    Return the coin held.
    """
    coin = pair.split("/")[0]
    held = emu.wallet.get(coin, Decimal(0))
    # The coins the exchange holds are exactly what the journal's fills add up to (buys
    # less fees charged in the coin, less sells) ...
    from_fills = sum(
        (
            (f.qty - (f.fee if f.fee_currency == coin else 0)) if f.side == "buy" else -f.qty
            for f in fills
            if f.pair == pair
        ),
        Decimal(0),
    )
    assert held == from_fills, (pair, held, from_fills)
    # ... and they are the bot's position, except remainders below the market's minimum
    # order, which no order can sell and the bot writes off as dust.
    position = sum(Decimal(str(p["qty"])) for p in summary["open_positions"] if p["pair"] == pair)
    assert abs(held - position) < MIN_QTY[pair], (pair, held, position)
    # After the clean stop: no entry left working, and a held position keeps exactly one
    # protective stop on the exchange (none is left behind on a flat account).
    still_open = [o for o in emu.orders.values() if o.is_open and o.symbol == _symbol(pair)]
    assert not [o for o in still_open if not o.conditional], still_open
    stops = [o for o in still_open if o.conditional]
    assert len(stops) == (1 if held >= MIN_QTY[pair] else 0), (pair, held, stops)
    return held


def _bitten(emu: BybitEmulator) -> bool:
    # Enough answers lost, some of them amends': what the test asserts after the kills.
    lost = [r for r in emu.requests if r.fault in LOST_ANSWERS]
    amends = any(r.path == "/v5/order/amend" for r in lost)
    return len(lost) >= KILLS // 5 and amends


async def _kill_many(emu: BybitEmulator, env: dict[str, str], rng: random.Random) -> Counter[str]:
    """Start and SIGKILL the daemon KILLS times; return where the kills landed.

    A slow host trades less in each life, so fewer order answers are lost: the lives go on
    (up to twice as many) until the faults have bitten (KILLS / 5 answers lost, some of
    them amends').
    """
    kills: Counter[str] = Counter()
    for n in range(2 * KILLS):
        if n >= KILLS and _bitten(emu):
            break
        proc = await _start(env)
        if n % 5 == 0:
            # Every fifth kill lands anywhere in start-up: imports, markets, warm-up,
            # reconciliation.
            await asyncio.sleep(rng.uniform(0.2, 4.0))
            kills["start-up"] += 1
        else:
            await _until_started(proc, timeout=60)
            drain = asyncio.create_task(_drain(proc))
            kills[await _kill_while_trading(proc, emu, rng)] += 1
            drain.cancel()
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return kills


async def _final_run(
    emu: BybitEmulator,
    env: dict[str, str],
    rng: random.Random,
    moving: asyncio.Event,
    summary_path: Path,
) -> None:
    """Run once more and stop with SIGTERM, while a position and its stop are held."""
    proc = await _start(env, "--summary-json", str(summary_path))
    assert await _until_started(proc, timeout=60)
    drain = asyncio.create_task(_drain(proc))
    # Trade a moment, hold the market still, let in-flight orders settle, and look; up to
    # 30 tries, then stop with whatever is held.
    for _ in range(30):
        moving.set()
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        moving.clear()
        await asyncio.sleep(1.0)
        if _held_and_protected(emu):
            break
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    drain.cancel()


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path,
) -> None:
    """After 50 SIGKILLs (some right after a lost order answer) the exchange's records hold."""
    rng = random.Random(SEED)
    # Each request 5 ms on its way there and back (a near exchange), so that orders sent
    # together are seen under way at once.
    async with BybitEmulator(
        lenient_clock=True, balances={"USDT": "10000"}, seed=7, rest_delay_s=0.005
    ) as emu:
        env = {**ENV, "KESTREL_EXCHANGE__BASE_URL": emu.base_url}
        # Lose the answer of about one order request in six, after the exchange acted.
        emu.fault_paths = ("/v5/order/create", "/v5/order/cancel", "/v5/order/amend")
        emu.fault_rates = {"timeout_after": 0.1, "malformed": 0.06}

        moving = asyncio.Event()
        moving.set()

        market_errors: list[BaseException] = []

        async def market() -> None:
            # The market must keep moving whatever happens: a failure is kept and asserted
            # on, never allowed to end the ticker silently (no candle would close again).
            while True:
                await asyncio.sleep(0.25)
                if moving.is_set():
                    try:
                        await emu.advance(minutes=1)
                    except Exception as e:
                        market_errors.append(e)

        ticker = asyncio.create_task(market())
        summary_path = tmp_path / "final.json"
        try:
            kills = await _kill_many(emu, env, rng)
            # The last run: reconcile what the kills left, trade a little without faults,
            # stop cleanly with SIGTERM.
            emu.clear_faults()
            await _final_run(emu, env, rng, moving, summary_path)
        finally:
            ticker.cancel()

        assert not market_errors, market_errors
        assert kills["random"] + kills["after_lost_answer"] >= KILLS // 2, kills
        lost = sum(r.fault in LOST_ANSWERS for r in emu.requests)
        assert lost >= KILLS // 5, f"only {lost} answers lost: the faults did not bite"
        # The trailing stop's moves (amends in place) lost answers too.
        amends = [r for r in emu.requests if r.path == "/v5/order/amend"]
        lost_amends = sum(r.fault in LOST_ANSWERS for r in amends)
        assert lost_amends > 0, f"{len(amends)} amends, none lost: the faults did not bite"
        store = TradeStore.open(
            f"sqlite:///{tmp_path / 'data' / 'kestrel.sqlite'}", bot_id="bybit-live"
        )
        try:
            journal = {o.client_order_id: o for o in store.all_orders()}
            on_exchange = emu.orders_by_link_id()
            # Enough orders that kills landed among them, or the test proves nothing.
            assert len(journal) >= KILLS, len(journal)
            assert all(len(orders) == 1 for orders in on_exchange.values())
            # No order unknown to the journal, and every journaled order is either on the
            # exchange or marked never-sent.
            assert set(on_exchange) <= set(journal), set(on_exchange) - set(journal)
            for cid, order in journal.items():
                state = store.journal_state(cid)
                if cid in on_exchange:
                    assert state is JournalState.ACKNOWLEDGED, (cid, state)
                else:
                    assert state is JournalState.NEVER_SENT, (cid, state, order.status)
            counts = {pair: _check_exchange_records(emu, pair) for pair in PAIRS}
            # Candles that decided entries of several pairs, sent together: the kills and
            # lost answers met orders under way side by side.
            together = _decided_together(emu)
            assert together >= max(1, KILLS // 10), f"{together} candles decided several entries"
            assert emu.most_in_flight("/v5/order/create", _entry_answered) >= 2
            # Every execution on the exchange is a recorded fill, exactly once.
            executions = {e.exec_id: e for e in emu.executions}
            fills = {f.fill_id: f for f in store.fills()}
            assert set(fills) == set(executions)
            for fill_id, execution in executions.items():
                assert fills[fill_id].qty == execution.qty
            summary = json.loads(summary_path.read_text())
            held = {p: _check_balances(emu, p, list(fills.values()), summary) for p in PAIRS}
            for stop in (o for o in emu.orders.values() if o.is_open and o.conditional):
                assert stop.side == "Sell"
                assert stop.qty <= emu.wallet.get(stop.symbol.removesuffix("USDT"), Decimal(0)), (
                    stop.item()
                )
                # The journal holds the trigger the exchange has, whatever answers were lost.
                journaled = journal[stop.link_id].stop_price
                assert journaled == stop.trigger_price, (stop.link_id, journaled)
            never_sent = sum(store.journal_state(c) is JournalState.NEVER_SENT for c in journal)
            print(
                f"crash test: {sum(kills.values())} kills {dict(kills)}, {lost} answers lost, "
                f"{len(amends)} amends ({lost_amends} answers lost), "
                f"{len(journal)} orders journaled, {len(on_exchange)} on the exchange, "
                f"{never_sent} never sent, {len(fills)} fills, (entries, stops) {counts}, "
                f"{together} candles with entries sent together, final holdings {held}"
            )
        finally:
            store.close()
