"""Risk state across a restart: what the breakers dump comes back whole, and only an operator
reset lifts a latched breaker.

Unit level: `RiskManager.dump_state` -> JSON -> `restore_state` on generated histories. Engine
level: a real engine built by the daemon (sim replay); `/resume` keeps a latch, the operator
reset lifts it, audited and alerted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from config import load_settings
from models import Event, RiskReset, TradingState, Veto
from risk_management import RiskManager
from runner import Daemon
from tests.bybit_emulator import BybitEmulator, daemon_env
from tests.test_backtest_support import cli_args
from tests.test_risk_support import DAY, HOUR, MINUTE, T0, context, settings, signal, trade
from utils.utilities import AuditTrail


# An operation on the manager: a candle's equity, a closed trade's PnL, or a manual rung.
_Op = tuple[str, int, float, TradingState | None]

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("equity"),
            st.integers(1, 6 * HOUR),
            st.floats(8_000, 11_000, allow_nan=False),
            st.none(),
        ),
        st.tuples(st.just("trade"), st.integers(0, HOUR), st.floats(-50, 50), st.none()),
        st.tuples(
            st.just("manual"),
            st.integers(0, MINUTE),
            st.just(0.0),
            st.sampled_from([None, TradingState.REDUCING, TradingState.FLATTEN]),
        ),
    ),
    max_size=30,
)


def _trading_state(risk: RiskManager) -> TradingState:
    """The risk manager's trading state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return risk.trading_state


def _apply(risk: RiskManager, ops: Sequence[_Op], start: int) -> tuple[int, list[TradingState]]:
    now, states = start, []
    for kind, step, value, manual in ops:
        now += step
        if kind == "equity":
            states.append(risk.update(now, Decimal(str(round(value, 2)))))
        elif kind == "trade":
            risk.on_trade_closed(trade(value), now)
            states.append(risk.trading_state)
        elif manual is None:
            risk.breakers.clear_manual()
            states.append(risk.trading_state)
        else:
            risk.set_manual(manual)
            states.append(risk.trading_state)
    return now, states


def _manager() -> RiskManager:
    return RiskManager(settings(auto_resume=False, max_consecutive_losses=2))


@hyp_settings(max_examples=60, deadline=None)
@given(before=_ops, after=_ops)
def test_a_restored_manager_behaves_as_the_one_that_was_saved(
    before: list[_Op], after: list[_Op]
) -> None:
    """After dump -> JSON -> restore, any continuation gives the same rungs, latches, streak."""
    original = _manager()
    original.update(T0, Decimal(10_000))
    now, _ = _apply(original, before, T0)
    saved = json.loads(json.dumps(original.dump_state()))
    restored = _manager()
    assert restored.restore_state(saved) is original.trading_state
    assert restored.breakers.state_key() == original.breakers.state_key()
    assert restored.describe() == original.describe()
    _, expected = _apply(original, after, now)
    _, got = _apply(restored, after, now)
    assert got == expected
    assert restored.breakers.latched.keys() == original.breakers.latched.keys()
    assert restored.breakers.consecutive_losses == original.breakers.consecutive_losses
    assert restored.breakers.manual == original.breakers.manual


def test_state_key_moves_only_when_there_is_something_to_persist() -> None:
    """A candle inside the bands keeps the key; a new peak, a trade, a rung change move it."""
    risk = RiskManager(settings())
    risk.update(T0, Decimal(10_000))
    key = risk.state_key()
    risk.update(T0 + MINUTE, Decimal(9_990))  # below the peak, no rule near: nothing new
    assert risk.state_key() == key
    risk.update(T0 + 2 * MINUTE, Decimal(10_100))  # a new peak
    assert risk.state_key() != key
    peak_key = risk.state_key()
    risk.on_trade_closed(trade(5.0), T0 + 3 * MINUTE)  # a win on no streak: Kelly history moves
    assert risk.state_key() != peak_key
    trade_key = risk.state_key()
    risk.set_manual(TradingState.REDUCING)
    assert risk.state_key() != trade_key


def test_a_latched_drawdown_a_streak_cooldown_and_the_kill_switch_survive_a_restart() -> None:
    """Flatten, the losing streak's cooldown and a manual rung all come back after restore."""
    risk = RiskManager(settings())
    risk.update(T0, Decimal(10_000))
    for i in range(3):
        risk.on_trade_closed(trade(-10.0), T0 + i * MINUTE)
    assert risk.breakers.cooldown_until == T0 + 2 * MINUTE + HOUR
    risk.set_manual(TradingState.REDUCING)
    assert risk.update(T0 + 5 * MINUTE, Decimal(8_400)) is TradingState.FLATTEN
    after = RiskManager(settings())
    assert after.restore_state(json.loads(json.dumps(risk.dump_state()))) is TradingState.FLATTEN
    assert set(after.breakers.latched) == {"loss_streak", "daily_loss", "peak_to_trough"}
    assert after.breakers.cooldown_until == T0 + 2 * MINUTE + HOUR
    assert after.breakers.manual is TradingState.REDUCING
    assert after.breakers.consecutive_losses == 3
    refused = after.evaluate(signal(), context())
    assert isinstance(refused, Veto)
    assert refused.guard == "circuit_breaker"
    # Days later and fully recovered: the flatten holds; the cooldown and the halt lifted.
    assert after.update(T0 + 3 * DAY, Decimal(11_000)) is TradingState.FLATTEN
    assert set(after.breakers.latched) == {"peak_to_trough"}
    after.clear_manual()  # /resume lifts the manual rung only
    assert after.trading_state is TradingState.FLATTEN
    after.reset()  # the operator's reset
    assert _trading_state(after) is TradingState.NORMAL


@pytest.mark.parametrize(
    ("restart_at", "expected"),
    [
        (T0 + 20 * HOUR, TradingState.HALTED),  # same UTC day: the loss still counts
        (T0 + DAY + HOUR, TradingState.NORMAL),  # next day: a fresh day start
    ],
)
def test_a_restart_keeps_the_days_start_only_within_the_same_utc_day(
    restart_at: int, expected: TradingState
) -> None:
    """The day's start equity and loss survive a same-day restart and roll over on a new day."""
    before = RiskManager(settings(auto_resume=False))
    before.update(T0 + HOUR, Decimal(10_000))
    before.update(T0 + 2 * HOUR, Decimal(9_800))  # -2% today, under the 3% limit
    after = RiskManager(settings(auto_resume=False))
    after.restore_state(json.loads(json.dumps(before.dump_state())))
    # -3.2% from today's start: halts only if the start is still today's.
    assert after.update(restart_at, Decimal(9_680)) is expected
    day_start = after.breakers.day_start_equity
    assert day_start == (Decimal(10_000) if expected is TradingState.HALTED else Decimal(9_680))


def test_a_fresh_paper_account_keeps_the_drawdown_as_a_fraction() -> None:
    """Restored onto a new paper account, the peak and day start scale with its equity."""
    before = RiskManager(settings(max_daily_loss=0.5))
    before.update(T0, Decimal(12_000))
    before.update(T0 + HOUR, Decimal(11_400))  # 5% down from the peak and on the day
    after = RiskManager(settings(max_daily_loss=0.5))
    after.restore_state(before.dump_state(), equity=Decimal(10_000))
    book = after.breakers.book()
    assert book.drawdown == pytest.approx(0.05)
    assert book.day_loss == pytest.approx(0.05)
    assert after.update(T0 + 2 * HOUR, Decimal(9_300)) is TradingState.REDUCED  # over 7% now


# -- The engine's operator façade ------------------------------------------------------------


def _engine_daemon() -> Daemon:
    daemon = Daemon(cli_args("--mode", "sim", "--feed", "replay"), load_settings(env_file=None))
    daemon.audit.close()
    daemon.audit = AuditTrail(None, keep=True)
    daemon.build_replay()
    return daemon


async def test_resume_keeps_a_latched_breaker_and_only_the_reset_lifts_it() -> None:
    """/resume after /stopbuy lifts the manual rung; the latched flatten waits for reset_risk."""
    daemon = _engine_daemon()
    engine = daemon.engine
    assert engine is not None
    alerts: list[Event] = []
    daemon.notifiers.append(alerts.append)
    saves: list[TradingState] = []

    async def saver() -> None:
        saves.append(engine.risk.trading_state)

    engine.risk_saver = saver
    engine.risk.update(T0, Decimal(10_000))
    assert engine.risk.update(T0 + MINUTE, Decimal(8_000)) is TradingState.FLATTEN
    await engine.stop_buy("telegram user 1")
    await engine.resume("telegram user 1")
    assert engine.risk.breakers.manual is None
    assert engine.risk.trading_state is TradingState.FLATTEN
    await engine.reset_risk("telegram user 1")
    assert _trading_state(engine.risk) is TradingState.NORMAL
    assert engine.risk.breakers.peak_equity == Decimal(8_000)  # re-based on equity now
    assert saves[-1] is TradingState.NORMAL  # persisted after the reset
    assert daemon.audit.events is not None
    (record,) = [e for e in daemon.audit.events if e["kind"] == "risk_reset"]
    assert record["by"] == "telegram user 1"
    assert record["before"]["state"] == "flatten"
    assert "peak_to_trough" in record["before"]["latched"]
    assert record["after"] == "normal"
    assert any(isinstance(d, RiskReset) and d.by == "telegram user 1" for d in alerts)


# -- A restart of the live daemon on the emulator --------------------------------------------


_LIVE_ENV = {
    # Trade on almost every candle; the first entry's fee alone is past the drawdown limit.
    "KESTREL_STRATEGY__NAME": "sma_cross",
    "KESTREL_STRATEGY__PARAMS": '{"fast": 2, "slow": 3}',
    "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
    "KESTREL_STRATEGY__PAIRS": '["BTC/USDT"]',
    "KESTREL_RISK__MAX_DRAWDOWN": "0.00002",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.00001",
    "KESTREL_RISK__MAX_DAILY_LOSS": "0.9",
    "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "100000",
}


async def _live_daemon(emu: Any) -> Daemon:
    daemon = Daemon(cli_args("--mode", "live"), load_settings(env_file=None))
    daemon.audit.close()
    daemon.audit = AuditTrail(None, keep=True)
    await daemon.build_exchange(paper=False)
    return daemon


async def _run_until(daemon: Daemon, emu: Any, done: Any, *, within_s: float = 60.0) -> None:
    """Run the daemon, closing one candle at a time, until `done()`; then stop it in order."""
    run = asyncio.create_task(daemon.run())
    try:
        deadline = asyncio.get_running_loop().time() + within_s
        while not done():
            assert not run.done(), run.result()
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await emu.advance(minutes=1)
            await asyncio.sleep(0.2)
    finally:
        daemon.stop.set()
        await asyncio.wait_for(run, 30)


async def test_a_latched_drawdown_breaker_survives_a_live_restart_until_the_operator_resets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Latched, stopped, restarted on the same store: still latched, no entries; /resume
    keeps it; only the operator's reset lifts it, and that is stored for the next start."""
    async with BybitEmulator(lenient_clock=True, balances={"USDT": "100000"}) as emu:
        for name, value in {
            **_LIVE_ENV,
            **daemon_env(emu),
        }.items():
            monkeypatch.setenv(name, value)
        first = await _live_daemon(emu)
        assert first.engine is not None
        risk = first.engine.risk
        await _run_until(first, emu, lambda: "peak_to_trough" in risk.breakers.latched)

        second = await _live_daemon(emu)
        engine = second.engine
        assert engine is not None
        # Restored at build time, before any candle: latched already.
        assert engine.risk.trading_state is TradingState.FLATTEN
        assert "peak_to_trough" in engine.risk.breakers.latched
        assert second.audit.events is not None
        (restored,) = [e for e in second.audit.events if e["kind"] == "risk_state_restored"]
        assert restored["source"] == "trade_store"
        assert "peak_to_trough" in restored["latched"]

        sent = len(emu.requests_to("/v5/order/create"))
        await _run_until(second, emu, lambda: engine.candles >= 8)
        assert len(emu.requests_to("/v5/order/create")) == sent  # no entry in eight candles
        refused = engine.risk.evaluate(signal(), context())
        assert isinstance(refused, Veto)
        assert refused.guard == "circuit_breaker"
        assert engine.risk.trading_state is TradingState.FLATTEN
        await engine.resume("telegram user 7")
        assert engine.risk.trading_state is TradingState.FLATTEN  # /resume is not a reset

        third = await _live_daemon(emu)
        assert third.engine is not None
        assert third.engine.risk.trading_state is TradingState.FLATTEN
        await third.engine.reset_risk("telegram user 7")
        assert _trading_state(third.engine.risk) is TradingState.NORMAL
        (reset,) = [e for e in third.audit.events or [] if e["kind"] == "risk_reset"]
        assert reset["by"] == "telegram user 7"
        assert "peak_to_trough" in reset["before"]["latched"]
        await third.teardown()

        fourth = await _live_daemon(emu)
        assert fourth.engine is not None
        assert fourth.engine.risk.breakers.latched == {}
        assert fourth.engine.risk.trading_state is TradingState.NORMAL
        await fourth.teardown()


async def test_the_score_book_survives_a_live_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed trades are journaled with the equity after them; a restart rebuilds the same score."""
    async with BybitEmulator(lenient_clock=True, balances={"USDT": "100000"}) as emu:
        for name, value in {
            **_LIVE_ENV,
            "KESTREL_RISK__MAX_DRAWDOWN": "0.9",  # keep trading: this test wants round trips
            "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.8",
            **daemon_env(emu),
        }.items():
            monkeypatch.setenv(name, value)
        first = await _live_daemon(emu)
        assert first.engine is not None
        engine = first.engine
        await _run_until(first, emu, lambda: len(engine.portfolio.closed) >= 2, within_s=90)
        strategy = engine.strategy.name
        closed = list(engine.portfolio.closed)
        before = engine.reward.card(strategy)

        second = await _live_daemon(emu)
        assert second.engine is not None
        after = second.engine.reward.card(strategy)
        assert second.engine.reward.record(strategy).trades == tuple(closed)
        assert after.total == before.total
        assert [r.lcb for r in second.engine.reward.ranked()] == [
            r.lcb for r in engine.reward.ranked()
        ]
        await second.teardown()


async def test_the_account_equity_history_survives_a_live_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The snapshot task stores cash and equity; a restart shows them ahead of its own curve."""
    async with BybitEmulator(lenient_clock=True, balances={"USDT": "100000"}) as emu:
        for name, value in {
            **_LIVE_ENV,
            "KESTREL_STORAGE__SNAPSHOT_INTERVAL_S": "1",
            **daemon_env(emu),
        }.items():
            monkeypatch.setenv(name, value)
        first = await _live_daemon(emu)
        engine = first.engine
        assert engine is not None
        # The store closes with the run: count through the daemon's own handle meanwhile.
        journal = first.store
        assert journal is not None
        await _run_until(first, emu, lambda: len(journal.equity_curve()) >= 2)

        second = await _live_daemon(emu)
        assert second.engine is not None
        assert second.store is not None
        stored = second.store.equity_curve()
        assert len(stored) >= 2
        assert [p.ts for p in stored] == sorted({p.ts for p in stored})
        # The account's cash and equity (100,000 USDT, less fees and a small open position).
        assert all(p.cash == pytest.approx(100_000, rel=0.01) for p in stored)
        assert all(p.equity == pytest.approx(100_000, rel=0.01) for p in stored)
        shown = second.engine.snapshot().equity_curve
        history = [(p.ts, float(p.equity)) for p in stored]
        assert list(shown[: len(history)]) == history
        assert all(ts > history[-1][0] for ts, _ in shown[len(history) :])
        await second.teardown()
