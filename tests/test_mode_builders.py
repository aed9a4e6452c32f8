"""The per-mode builders: frozen components, and only gateway, feed and clock differ.

Real parts throughout: the sample archive for the replay, ccxt against the loopback Bybit
emulator for paper on the live feed and for live trading (with a journal on SQLite).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from assembly import BuildContext, Components, LiveGateway, SimGateway
from config import load_settings
from market_feed import ExchangeFeed
from mode_builders import build_backtest, build_live, build_sim
from models import Event
from pipeline import Engine, PrecomputedSignals, RollingSignals
from tests.bybit_emulator import BybitEmulator
from tests.test_backtest_support import cli_args
from trade_simulator import ReplayFeed, SimulatedExchange
from utils.utilities import AuditTrail, ReplayClock


_ENV = {
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
    "KESTREL_STRATEGY__PAIRS": '["BTC/USDT"]',
}


def _context(*argv: str) -> BuildContext:
    import main

    alerts: list[Event] = []
    args = cli_args(*argv)
    return BuildContext(
        args=args,
        settings=main._apply_cli(load_settings(env_file=None), args),
        audit=AuditTrail(None, keep=True),
        alert=alerts.append,
        stop=asyncio.Event(),
    )


async def _closed(parts: Components) -> None:
    for _, close in parts.closers:
        await close()


def _field_types(parts: Components) -> dict[str, type]:
    return {f.name: type(getattr(parts, f.name)) for f in dataclasses.fields(parts)}


def _differing(a: Components, b: Components) -> set[str]:
    left, right = _field_types(a), _field_types(b)
    return {name for name in left if left[name] is not right[name]}


def _core_types(engine: Engine) -> list[type]:
    # The pipeline's own parts: the same classes whatever the mode.
    parts = (engine.strategy, engine.risk, engine.executor, engine.portfolio, engine.reward)
    return [type(engine), *(type(p) for p in parts), type(engine.data)]


@pytest.fixture
def strategy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set a small strategy on one pair (the emulator's warm-up fits it)."""
    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with a funded wallet, the settings pointed at it."""
    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)
    async with BybitEmulator(lenient_clock=True, balances={"USDT": "100000"}) as server:
        monkeypatch.setenv("KESTREL_EXCHANGE__BASE_URL", server.base_url)
        monkeypatch.setenv("KESTREL_EXCHANGE__API_KEY", server.api_key)
        monkeypatch.setenv("KESTREL_EXCHANGE__API_SECRET", server.api_secret)
        yield server


@pytest.mark.usefixtures("strategy_env")
async def test_components_are_frozen() -> None:
    """No part of an assembled run can be swapped after the builder returned it."""
    parts = await build_sim(_context("--mode", "sim", "--feed", "replay"))
    for name, value in [("engine", None), ("gateway", None), ("clock", ReplayClock(0))]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(parts, name, value)
    assert isinstance(parts.gateway, SimGateway)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.gateway.exchange = parts.gateway.exchange  # type: ignore[misc]


async def test_sim_and_live_differ_only_in_gateway_feed_and_clock(emu: BybitEmulator) -> None:
    """Field by field, a replayed sim run and a live run differ in exactly three types.

    Paper trading on the live feed differs from live in the gateway alone, and the engine's
    own parts (strategy, risk, executor, portfolio, reward, window) are the same classes.
    """
    sim = await build_sim(_context("--mode", "sim", "--feed", "replay"))
    paper = await build_sim(_context("--mode", "sim", "--feed", "live"))
    live = await build_live(_context("--mode", "live"))
    try:
        assert _differing(sim, live) == {"gateway", "feed", "clock"}
        assert _differing(paper, live) == {"gateway"}
        assert _core_types(sim.engine) == _core_types(live.engine) == _core_types(paper.engine)
        # What each of the three is, per mode.
        assert isinstance(sim.gateway, SimGateway)
        assert isinstance(paper.gateway, SimGateway)
        assert isinstance(live.gateway, LiveGateway)
        assert isinstance(sim.feed, ReplayFeed)
        assert isinstance(live.feed, ExchangeFeed)
        assert isinstance(sim.clock, ReplayClock)
        # The executor sends to the gateway the builder chose, and nowhere else.
        executor: Any = live.engine.executor
        assert executor._gateway is live.gateway.exchange
        assert isinstance(paper.engine.executor._gateway, SimulatedExchange)
        assert paper.engine.executor._gateway is paper.gateway.exchange
        # The live run closes its exchange session first, then its journal.
        assert [name for name, _ in live.closers] == ["exchange", "store"]
    finally:
        await _closed(paper)
        await _closed(live)


@pytest.mark.usefixtures("strategy_env")
async def test_a_backtest_is_a_replay_with_precomputed_signals() -> None:
    """The backtest builder replays unpaced into the simulated exchange, like sim on replay."""
    sim = await build_sim(_context("--mode", "sim", "--feed", "replay"))
    backtest = build_backtest(_context("--mode", "backtest"))
    assert _differing(sim, backtest) == set()
    assert isinstance(backtest.feed, ReplayFeed)
    assert isinstance(sim.feed, ReplayFeed)
    assert (backtest.feed.speed, backtest.feed.yield_every, sim.feed.yield_every) == (0.0, 1024, 1)
    assert isinstance(backtest.engine.signals_source, PrecomputedSignals)
    assert isinstance(sim.engine.signals_source, RollingSignals)
    assert set(backtest.timings) == {"load_s", "prepare_s"}
    assert set(backtest.frames) == {"BTC/USDT"}


async def test_a_pair_entering_the_list_is_warmed_up_and_streamed(emu: BybitEmulator) -> None:
    """On paper on the live feed, a pair added at a refresh gets its history, then candles."""
    from runner import Daemon
    from top_pairs import PairListDiff

    daemon = Daemon(cli_args("--mode", "sim", "--feed", "live"), load_settings(env_file=None))
    await daemon.build_exchange(paper=True)
    try:
        engine, feed = daemon.engine, daemon.exchange_feed
        assert engine is not None
        assert feed is not None
        assert daemon.feed is not None
        assert not len(engine.data.arrays("ETH/USDT", "1m").ts)
        candles = daemon.feed

        async def next_pair() -> str:
            # Close candles until the stream yields one.
            task = asyncio.ensure_future(anext(candles))
            for _ in range(50):
                await emu.advance(minutes=1)
                await asyncio.wait([task], timeout=0.2)
                if task.done():
                    return task.result().pair
            task.cancel()
            raise AssertionError("no candle from the stream")

        assert await next_pair() == "BTC/USDT"
        await daemon.on_pairs_changed(PairListDiff(added=("ETH/USDT",)))
        assert len(engine.data.arrays("ETH/USDT", "1m").ts) >= 30  # the warm-up history
        feed.follow(["BTC/USDT", "ETH/USDT"])
        seen = {await next_pair() for _ in range(6)}
        assert "ETH/USDT" in seen  # resubscribed after the next candle
    finally:
        await daemon.teardown()


async def test_a_resubscription_keeps_each_pairs_candles_once_and_in_order(
    emu: BybitEmulator,
) -> None:
    """Across `follow` (the old stream closed, its kline taps with it, a new one opened from
    the last candle on), a pair's candles come once each, in order, without a hole."""
    from runner import Daemon
    from tests.conftest import eventually

    daemon = Daemon(cli_args("--mode", "sim", "--feed", "live"), load_settings(env_file=None))
    await daemon.build_exchange(paper=True)
    seen: list[tuple[str, int]] = []

    async def consume() -> None:
        assert daemon.feed is not None
        async for candle in daemon.feed:
            seen.append((candle.pair, candle.ts))

    consumer = asyncio.ensure_future(consume())
    try:
        feed = daemon.exchange_feed
        assert feed is not None

        async def minutes_until(predicate: Callable[[], bool]) -> None:
            for _ in range(30):
                await emu.advance(minutes=1)
                with contextlib.suppress(AssertionError):
                    await eventually(predicate, timeout=0.3)
                    return
            raise AssertionError(f"the stream stopped at {seen[-3:]}")

        await minutes_until(lambda: len(seen) >= 3)
        feed.follow(["BTC/USDT", "ETH/USDT"])
        await minutes_until(lambda: sum(p == "ETH/USDT" for p, _ in seen) >= 3)
        await emu.advance(minutes=2)
        await eventually(lambda: sum(p == "ETH/USDT" for p, _ in seen) >= 5)
        btc = [ts for pair, ts in seen if pair == "BTC/USDT"]
        assert btc == list(range(btc[0], btc[0] + 60_000 * len(btc), 60_000))
        eth = [ts for pair, ts in seen if pair == "ETH/USDT"]
        assert eth == list(range(eth[0], eth[0] + 60_000 * len(eth), 60_000))
        assert not consumer.done()
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await daemon.teardown()


async def test_candles_on_their_way_from_the_feed_join_the_burst(
    emu: BybitEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the exchange feed, the pipeline takes one turn of the loop before it decides: the
    candles the feed task is still carrying over (it runs behind the pipeline, as after a
    read of several frames) are decided with the first, in one burst, not after it."""
    from burst import BurstDecider
    from models import Candle
    from runner import Daemon

    daemon = Daemon(cli_args("--mode", "sim", "--feed", "live"), load_settings(env_file=None))
    await daemon.build_exchange(paper=True)
    assert daemon.replay is None
    bursts: list[list[str]] = []

    async def recorded(self: BurstDecider, items: Any) -> None:
        bursts.append([candle.pair for candle, _ in items])

    monkeypatch.setattr(BurstDecider, "on_burst", recorded)
    ts = 60_000 * (emu.clock.now_ms() // 60_000)
    pairs = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]

    async def feed() -> AsyncIterator[Candle]:
        for at, pair in enumerate(pairs):
            if at == 1:  # the next frames' read: the feed's task wakes behind the pipeline
                await asyncio.sleep(0)
            yield Candle(pair, "1m", ts, 1.0, 1.0, 1.0, 1.0, 1.0)

    daemon.feed = feed()
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(daemon._feed_loop(), daemon._pipeline_loop())
    finally:
        await daemon.teardown()
    assert bursts == [pairs]


async def test_a_run_with_telegram_reports_at_start_and_alerts_until_it_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The run's operator starts the bot, posts the start-up report, routes alerts, closes it."""
    from models import ErrorRaised
    from runner import Daemon
    from tests.conftest import eventually
    from tests.fake_telegram import TOKEN, FakeTelegram
    from tests.running_daemon import PAIR, SPEED, write_sawtooth
    from tests.test_telegram_bot import CHAT, USER

    async with FakeTelegram() as api:
        for key, value in {
            "KESTREL_TELEGRAM__TOKEN": TOKEN,
            "KESTREL_TELEGRAM__CHAT_IDS": f"[{CHAT}]",
            "KESTREL_TELEGRAM__USER_IDS": f"[{USER}]",
            "KESTREL_TELEGRAM__BASE_URL": api.base_url,
        }.items():
            monkeypatch.setenv(key, value)
        data = write_sawtooth(tmp_path / "sawtooth_BTC-USDT_1m.csv")
        ctx = _context(
            "--mode", "sim", "--feed", "replay", "--data", str(data), "--pairs", PAIR,
            "--speed", str(SPEED / 10),
        )  # fmt: skip
        daemon = Daemon(ctx.args, ctx.settings)
        daemon.build_replay()
        run = asyncio.create_task(daemon.run())

        def sent(text: str) -> bool:
            return any(text in m.visible for m in api.messages_to(CHAT))

        try:
            await eventually(lambda: sent("Reconciliation"), timeout=20)
            assert not run.done()
            daemon.alert(ErrorRaised("snapshot disk full", component="snapshots"))
            await eventually(lambda: sent("snapshot disk full"), timeout=10)
        finally:
            daemon.stop.set()
            await asyncio.wait_for(run, 30)
        assert "telegram" in [name for name, _ in daemon._closers]
