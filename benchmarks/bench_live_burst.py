"""A live burst over a slow link: how soon a 50-pair close's entries and stops are answered.

The daemon runs `--mode live` (real orders: the real Exchange, its rate budgets, the trade
journal, the private streams) against the loopback Bybit emulator, which delays every
REST request by `DELAY_S` there and back, as a network between a user and Bybit would (a
round trip of 100 ms is usual from Europe or America to Bybit's servers in Asia). Fifty
spot pairs move together (the emulator's extra coins share BTC's series), so one close
decides an entry on every pair; each entry is then its create, its look-up, and its
protective stop's create and look-up once it fills; the close after, where it trails the
stops, moves every one (an amend each).

Ours: the burst's orders, and then its stop moves, go out together
(`exchange.burst_orders_in_flight`, 10), started in decision order. Peer, in the same run:
one at a time (`burst_orders_in_flight=1`), each entry waiting for the previous one's four
round trips. Both are paced by the account's order budget: Bybit's 20 creates a second on
spot, of which `rate_limit_safety` (0.8) is used, so 100 creates (50 entries, 50 stops)
need at least 6.2 s.

Where the budget binds, a filled entry's protective stop goes ahead of the entries still
waiting for it (`rate_budgets`): the longest a filled entry waits for its stop, ours
against the same burst with the budget first come first served, ten and thirty orders
on their way at once (the more under way, the longer the queue at the budget).

Not a CPU figure: the host's speed hardly moves it (one run of each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.common import TRADING_ENV


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DELAY_S = 0.1
PEERS = {
    "one": "the same burst, one order at a time",
    "fifo": "the same burst, the order budget first come first served",
    "fifo30": "the same burst, the order budget first come first served",
}
LABELS = {"unprotected": "entries filled and protected"}
CREATE = "/v5/order/create"
AMEND = "/v5/order/amend"


async def _burst(pairs: int, in_flight: int) -> dict[str, tuple[int, float]]:
    """Run the live daemon until a close's entries are in, and the close after (it may
    trail their stops); return each kind's count and how long after its close the last of
    its requests was answered (s): entries, stops, moves (where that close made any), and
    the longest from an entry's answer (a market buy: filled) to its stop's ("unprotected")."""
    from config import load_settings
    from runner import Daemon
    from tests.bybit_emulator import BybitEmulator, daemon_env
    from tests.test_backtest_support import cli_args
    from utils.utilities import AuditTrail, setup_logging

    bases = [f"K{i:02d}" for i in range(pairs - 1)]
    async with BybitEmulator(
        lenient_clock=True,
        balances={"USDT": "1000000000"},
        extra_bases=bases,
        rest_delay_s=DELAY_S,
    ) as emu:
        os.environ.update(
            {
                **daemon_env(emu),
                **TRADING_ENV,
                "KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT": str(in_flight),
                "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
                "KESTREL_STRATEGY__PAIRS": ",".join(["BTC/USDT", *(f"{b}/USDT" for b in bases)]),
                "KESTREL_RISK__MAX_OPEN_POSITIONS": "100",
            }
        )
        settings = load_settings(env_file=None)
        setup_logging(settings.storage.log_dir, level="WARNING", console=False, cache_loggers=True)
        daemon = Daemon(cli_args("--mode", "live", "--log-level", "WARNING"), settings)
        daemon.audit.close()
        daemon.audit = AuditTrail(None, keep=True)
        await daemon.build_exchange(paper=False)
        run = asyncio.create_task(daemon.run())
        try:
            await _subscribed(emu, pairs)
            found: dict[str, tuple[int, float]] = {}
            for _ in range(12):
                close, new = await _close(emu)
                creates = [r for r in new if r.path == CREATE]
                kinds = {
                    "entries": [r for r in creates if r.order_kind == "entry"],
                    "stops": [r for r in creates if r.order_kind == "stop"],
                }
                if found:  # the close after the entries: it may trail their stops
                    moves = [r for r in new if r.path == AMEND]
                    if moves:
                        found["moves"] = (len(moves), max(r.answered for r in moves) - close)
                    return found
                if len(kinds["entries"]) >= pairs:
                    found = {
                        kind: (len(made), max(r.answered for r in made) - close)
                        for kind, made in kinds.items()
                    }
                    waits = _unprotected(kinds["entries"], kinds["stops"])
                    found["unprotected"] = (len(waits), max(waits, default=0.0))
                    found["unprotected_p50"] = (len(waits), float(np.median(waits or [0.0])))
            raise RuntimeError("no close decided an entry on every pair")
        finally:
            daemon.stop.set()
            await asyncio.wait_for(run, 120)


async def _subscribed(emu: Any, pairs: int) -> None:
    """Wait until every pair's candles stream (a close before would leave some behind)."""
    for _ in range(600):
        topics = {t for c in emu._conns for t in c.topics if t.startswith("kline.")}
        if len(topics) >= pairs:
            await asyncio.sleep(1.0)  # the streams' first frames taken
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the daemon did not subscribe to every pair's candles")


async def _close(emu: Any) -> tuple[float, list[Any]]:
    """Close a candle; return when, and the requests until they are quiet for 1.5 s."""
    first = len(emu.requests)
    close = time.monotonic()
    await emu.advance(minutes=1)
    while True:
        await asyncio.sleep(0.2)
        new = emu.requests[first:]
        last = max((r.answered or r.t for r in new), default=close)
        if time.monotonic() - last > 1.5 and time.monotonic() - close > 2.0:
            return close, new


def _unprotected(entries: list[Any], stops: list[Any]) -> list[float]:
    """Return, for each entry with a stop, the time from its answer to its stop's (s)."""
    stop_of = {r.params["symbol"]: r for r in stops}
    return [
        stop_of[r.params["symbol"]].answered - r.answered
        for r in entries
        if r.params["symbol"] in stop_of
    ]


def _p50(results: dict[str, dict[str, tuple[int, float]]], name: str) -> str:
    return f"{results[name]['unprotected_p50'][1]:.2f}"


def run() -> list[dict[str, Any]]:
    pairs = 20 if os.environ.get("KESTREL_BENCH_SIZE") else 50
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        results = {}
        try:
            # Ours; the same with the budgets first come first served (every request counted
            # as an entry: none goes ahead); one at a time; both budgets thirty at a time.
            for name, in_flight, fifo in (
                ("ours", 10, False),
                ("fifo", 10, True),
                ("one", 1, False),
                ("ours30", 30, False),
                ("fifo30", 30, True),
            ):
                # A store of its own: the other run's archived candles would be its history.
                for kind in ("DATA", "LOG"):
                    where = Path(tmp) / f"{kind.lower()}-{name}"
                    os.environ[f"KESTREL_STORAGE__{kind}_DIR"] = str(where)
                with (
                    mock.patch("rate_budgets._entry", return_value=True)
                    if fifo
                    else contextlib.nullcontext()
                ):
                    results[name] = asyncio.run(_burst(pairs, in_flight))
        finally:
            os.chdir(cwd)

    def row(
        kind: str, what: str, note: str, peer_of: str = "one", ours_of: str = "ours"
    ) -> dict[str, Any] | None:
        ours, peer = results[ours_of], results[peer_of]
        if kind not in ours or kind not in peer:
            return None  # that close made none in one of the runs
        (n, value), (pn, peer_value) = ours[kind], peer[kind]
        name = f"live burst over a {DELAY_S * 1000:.0f} ms link, {pairs} pairs: " + (
            what if kind == "unprotected" else f"the close -> {what} answered"
        )
        who = PEERS[peer_of]
        return {"name": name, "ours": value, "unit": "s", "peer": who,
                "peer_value": peer_value, "ratio": peer_value / value if value else None,
                "note": f"{n} {LABELS.get(kind, kind)} ({who}: {pn}); {note}"}  # fmt: skip

    rows = [
        row(
            "entries",
            "the last entry",
            "ten orders on their way at once, started in decision order "
            "(`exchange.burst_orders_in_flight`); one at a time, each entry waited for the "
            "previous one's create, look-up and stop; ratio > 1: together sooner",
        ),
        row(
            "stops",
            "the last entry's protective stop",
            f"the account's order budget bounds both: {pairs * 2} creates at 16 a second "
            f"(Bybit's 20 on spot x rate_limit_safety 0.8) take {pairs * 2 / 16:.1f} s at least",
        ),
        row(
            "moves",
            "the last stop moved",
            "the close after the entries trails the stops: an amend each (under its "
            "pair's lock), sent after the burst's orders, ten at a time or one at a time",
        ),
        *(
            row(
                "unprotected",
                f"{n} orders on their way at once, the longest a filled entry waits for its "
                "stop (its answer -> its stop's answer)",
                "where the order budget binds, a filled entry's stop takes the next slot ahead "
                "of the entries still waiting (`rate_budgets`); first come first served, it "
                f"waited behind them; median {_p50(results, ours_of)} s "
                f"(first come first served: {_p50(results, peer_of)} s); ratio > 1: protected "
                "sooner",
                peer_of=peer_of,
                ours_of=ours_of,
            )
            for n, ours_of, peer_of in ((10, "ours", "fifo"), (30, "ours30", "fifo30"))
        ),
    ]
    return [r for r in rows if r is not None]
