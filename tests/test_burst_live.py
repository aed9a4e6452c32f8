"""A live burst's orders on the emulator: sent together, in decision order, each once.

The live daemon (`--mode live`, the real Exchange, journal and streams) trades six spot
pairs that move together (the emulator's extra coins share BTC's series), so one close
decides an entry on every pair. Every REST request takes `DELAY_S` to go and come back,
as over a network: one at a time, each entry waits for the others' requests, look-ups
and stops; `exchange.burst_orders_in_flight` lets that many be on their way at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from config import load_settings
from runner import Daemon
from tests.bybit_emulator import BybitEmulator, RecordedRequest, daemon_env
from tests.test_backtest_support import cli_args
from utils.utilities import AuditTrail


DELAY_S = 0.02
# Where a test counts the requests under way at once: a round trip long enough that the
# burst starts every request it may before the first answer, even on a loaded host (at
# 20 ms a clean-clone run on two busy cores once saw 2 of 3 creates under way together).
OVERLAP_DELAY_S = 0.1
BASES = ["K00", "K01", "K02", "K03", "K04"]
PAIRS = ["BTC/USDT", *(f"{b}/USDT" for b in BASES)]
SYMBOLS = sorted(p.replace("/", "") for p in PAIRS)
CREATE = "/v5/order/create"
AMEND = "/v5/order/amend"

_ENV = {
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
    "KESTREL_STRATEGY__PAIRS": ",".join(PAIRS),
    "KESTREL_RISK__MAX_OPEN_POSITIONS": "10",
    "KESTREL_RISK__RISK_PER_TRADE": "0.001",
    "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
    "KESTREL_RISK__MAX_DRAWDOWN": "0.95",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.9",
    "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "100000",
}


def _entries(emu: BybitEmulator) -> list[Any]:
    """The emulator's buy market orders (our entries), in the order they were created."""
    orders = [o for o in emu.orders.values() if o.side == "Buy" and o.order_type == "Market"]
    return sorted((o for o in orders if not o.trigger_price), key=lambda o: o.created)


def _is_entry(request: RecordedRequest) -> bool:
    return request.order_kind == "entry"


def _entry_requests(emu: BybitEmulator) -> list[Any]:
    """The create requests of entries, in the order they left."""
    return sorted(filter(_is_entry, emu.requests_to(CREATE)), key=lambda r: r.sent)


def _stops(emu: BybitEmulator) -> Counter[str]:
    """Working stops by symbol."""
    return Counter(o.symbol for o in emu.orders.values() if o.trigger_price and o.is_open)


async def _run_until(
    daemon: Daemon,
    emu: BybitEmulator,
    done: Callable[[], bool],
    *,
    within_s: float = 60.0,
    quiet_s: float = 0.3,
) -> None:
    """Run the daemon, closing a candle at a time (the next once requests are quiet for
    `quiet_s`), until `done()`; then stop it in order."""
    run = asyncio.create_task(daemon.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        await asyncio.sleep(1.5)  # subscribed
        while not done():
            assert not run.done(), run.result()
            assert loop.time() < deadline, "condition not reached"
            await emu.advance(minutes=1)
            while not done():
                await asyncio.sleep(0.1)
                last = max((r.answered or r.t for r in emu.requests[-1:]), default=0.0)
                if time.monotonic() - last > quiet_s:
                    break
    finally:
        daemon.stop.set()
        await asyncio.wait_for(run, 30)


async def _live_daemon(emu: BybitEmulator, monkeypatch: pytest.MonkeyPatch, **env: str) -> Daemon:
    for name, value in {
        **_ENV,
        **env,
        **daemon_env(emu),
    }.items():
        monkeypatch.setenv(name, value)
    daemon = Daemon(cli_args("--mode", "live"), load_settings(env_file=None))
    daemon.audit.close()
    daemon.audit = AuditTrail(None, keep=True)
    await daemon.build_exchange(paper=False)
    return daemon


def _emulator(
    *, cash: str = "100000000", hang_s: float = 3.0, delay_s: float = DELAY_S
) -> BybitEmulator:
    """The emulator with the six pairs, `cash` USDT and a `delay_s` round trip."""
    return BybitEmulator(
        lenient_clock=True,
        balances={"USDT": cash},
        extra_bases=BASES,
        rest_delay_s=delay_s,
        hang_s=hang_s,
    )


def _protected(emu: BybitEmulator) -> bool:
    stops = _stops(emu)
    return len(_entries(emu)) >= len(PAIRS) and all(stops[s] == 1 for s in SYMBOLS)


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_a_live_bursts_entries_go_out_together_in_decision_order_each_once(
    monkeypatch: pytest.MonkeyPatch, in_flight: int
) -> None:
    """One close, six entries: at most `in_flight` creates under way at once (and that
    many), started strongest first (equal signals: by pair name), one entry and one stop
    per pair."""
    async with _emulator(delay_s=OVERLAP_DELAY_S) as emu:
        daemon = await _live_daemon(
            emu, monkeypatch, KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT=str(in_flight)
        )
        await _run_until(daemon, emu, lambda: _protected(emu))
        entries = _entries(emu)
        # One burst decided every entry (the pairs move together), each pair once.
        assert len(entries) == len(PAIRS)
        assert sorted(o.symbol for o in entries) == SYMBOLS
        assert _stops(emu) == Counter(dict.fromkeys(SYMBOLS, 1))
        sent = _entry_requests(emu)
        assert [r.params["symbol"] for r in sent] == SYMBOLS  # decision order
        assert len(sent) == len(PAIRS)  # none resent
        # The entries' creates (a stop its fill's report places may go beside them).
        assert emu.most_in_flight(CREATE, _is_entry) == in_flight
        # The burst's engine sent them all as decided: no local refusal.
        assert daemon.engine is not None
        assert daemon.engine.executor.rejections == 0


async def test_a_lost_answer_in_a_live_burst_holds_up_only_its_own_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first entry's create is carried out but its answer lost: the client gives up,
    finds the order by its client id and does not send it again, while the burst's other
    entries go out and are answered meanwhile. Every pair: one entry, one stop."""
    async with _emulator(hang_s=1.5) as emu:  # held past the client's 0.6 s
        daemon = await _live_daemon(
            emu,
            monkeypatch,
            KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT="3",
            KESTREL_EXCHANGE__TIMEOUT_S="0.6",
        )
        emu.fail_next("timeout_after", path=CREATE)  # the burst's first (nothing before)
        await _run_until(daemon, emu, lambda: _protected(emu))
        lost = [r for r in emu.requests_to(CREATE) if r.fault == "timeout_after"]
        assert len(lost) == 1
        lost_symbol = lost[0].params["symbol"]
        assert lost_symbol == SYMBOLS[0]  # the first decided
        entries = _entries(emu)
        assert sorted(o.symbol for o in entries) == SYMBOLS  # each pair once: not resent
        assert _stops(emu) == Counter(dict.fromkeys(SYMBOLS, 1))
        # The two sent beside it were answered while its client still waited (0.6 s).
        beside = [r for r in _entry_requests(emu) if r.params["symbol"] in SYMBOLS[1:3]]
        assert len(beside) == 2
        assert all(r.answered < lost[0].sent + 0.6 for r in beside)


async def test_buys_under_way_together_spend_the_cash_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cash pays for three of the six entries (each is capped at a quarter of equity):
    all six under way at once, each buy's balance check counts the buys still on their
    way, so the fourth to sixth are refused here, not sent for the exchange to refuse."""
    async with _emulator(cash="1000000") as emu:
        daemon = await _live_daemon(emu, monkeypatch, KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT="6")
        assert daemon.engine is not None
        executor = daemon.engine.executor
        await _run_until(daemon, emu, lambda: executor.rejections >= 3 and len(_stops(emu)) >= 3)
        entries = _entries(emu)
        assert [o.symbol for o in entries] == SYMBOLS[:3]  # the first three decided
        assert len(_entry_requests(emu)) == 3  # the rest never sent
        assert _stops(emu) == Counter(dict.fromkeys(SYMBOLS[:3], 1))
        assert executor.rejections == 3
        assert not executor.committed  # every buy's claim released with its answer


async def test_an_error_that_stops_trading_starts_no_further_order_of_the_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exchange refuses the API key on the burst's first create (a FatalError): the
    order sent beside it is seen through, no other entry of the burst is started, and the
    daemon stops with the error."""
    async with _emulator() as emu:
        daemon = await _live_daemon(emu, monkeypatch, KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT="2")
        emu.fail_next("auth", path=CREATE)
        run = asyncio.create_task(daemon.run())
        await asyncio.sleep(2.0)
        for _ in range(40):
            if run.done():
                break
            await emu.advance(minutes=1)
            await asyncio.sleep(0.5)
        assert run.done(), "the daemon did not stop"
        refused = [r for r in emu.requests_to(CREATE) if r.fault == "auth"]
        assert [r.params["symbol"] for r in refused] == SYMBOLS[:1]
        sent = _entry_requests(emu)
        assert [r.params["symbol"] for r in sent] == SYMBOLS[:2]  # itself and the one beside
        assert len(_entries(emu)) == 1  # that one placed; none after the error


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_a_live_bursts_stop_moves_go_out_together_and_leave_one_stop_each(
    monkeypatch: pytest.MonkeyPatch, in_flight: int
) -> None:
    """The close after the entries trails every position's stop: the amends, each under
    its pair's lock, go `in_flight` at a time, and every position keeps one working stop
    at the level its portfolio records."""
    async with _emulator(delay_s=OVERLAP_DELAY_S) as emu:
        daemon = await _live_daemon(
            emu, monkeypatch, KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT=str(in_flight)
        )
        assert daemon.engine is not None
        portfolio = daemon.engine.portfolio

        def moved() -> bool:
            amended = {r.params["symbol"] for r in emu.requests_to(AMEND) if r.answered}
            return amended == set(SYMBOLS) and _protected(emu)

        await _run_until(daemon, emu, moved)
        assert emu.most_in_flight(AMEND) == in_flight
        assert _stops(emu) == Counter(dict.fromkeys(SYMBOLS, 1))
        for pair in PAIRS:
            (stop,) = [
                o
                for o in emu.orders.values()
                if o.trigger_price and o.is_open and o.symbol == pair.replace("/", "")
            ]
            position = portfolio.position(pair)
            assert position is not None
            assert stop.trigger_price == position.stop_price


async def test_an_entrys_stop_goes_ahead_of_the_entries_still_waiting_for_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six entries under way at once against 3 spot orders a second (Bybit's 20 x 0.15):
    three go, the fourth waits for a slot, the fifth and sixth queue behind it. The first
    entries' fills ask for their stops meanwhile, and those go before the fifth and sixth
    entries: a filled position is not left unprotected behind new ones."""
    async with _emulator() as emu:
        daemon = await _live_daemon(
            emu,
            monkeypatch,
            KESTREL_EXCHANGE__BURST_ORDERS_IN_FLIGHT="6",
            KESTREL_EXCHANGE__RATE_LIMIT_SAFETY="0.15",
        )
        # The next close only once no request has gone for longer than a budget's wait.
        await _run_until(daemon, emu, lambda: _protected(emu), quiet_s=1.2)
        sent = _entry_requests(emu)
        assert [r.params["symbol"] for r in sent] == SYMBOLS  # decision order, each once
        stops = sorted(
            (r for r in emu.requests_to(CREATE) if r.order_kind == "stop"),
            key=lambda r: r.sent,
        )
        assert len(stops) == len(PAIRS)
        assert [r.sent < sent[4].sent for r in stops[:2]] == [True, True]
        assert _stops(emu) == Counter(dict.fromkeys(SYMBOLS, 1))
        assert not [r for r in emu.requests if r.ret_code == 10006]  # the budget held
