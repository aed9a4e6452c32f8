"""The backtest's quiet-candle short path changes nothing: same trades, orders and curve.

Each run is compared in three variants: quiet stretches applied in one call (`runs`, the
way runner wires a backtest), quiet candles one by one (`per_candle`) and every candle
through the whole pipeline (`full`), under the all_in and the standard risk profiles
(stops, take-profits, breakers), on one pair and on several.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replay_feed
from config import load_settings
from models import ClosedTrade, OrderType, PositionSide
from runner import Daemon
from tests.test_backtest_support import cli_args


VARIANTS = ("runs", "per_candle", "full")


def _args(strategy: str, *extra: str) -> argparse.Namespace:
    return cli_args(  # type: ignore[no-any-return]
        "--mode", "backtest", "--strategy", strategy, "--log-level", "WARNING", *extra
    )


async def _run(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Run one backtest variant; return what must be equal across variants."""
    daemon = Daemon(args, load_settings(env_file=None))
    daemon.build_replay()
    engine, driver = daemon.engine, daemon.driver
    assert engine is not None
    assert driver is not None
    assert driver._quiet is not None  # wired for backtests with precomputed signals
    assert driver.quiet_runs  # and unpaced replays take quiet stretches at once
    if variant != "runs":
        driver.quiet_runs = False
    if variant == "full":
        driver._quiet = None
    assert daemon.sim is not None
    amends: list[object] = []  # the stop moves the venue was asked to make
    amend_order = daemon.sim.amend_order

    async def counted(*args: Any, **kwargs: Any) -> Any:
        amends.append(kwargs["trigger_price"])
        return await amend_order(*args, **kwargs)

    daemon.sim.amend_order = counted  # type: ignore[method-assign]
    summary = (await daemon.run()).to_dict()
    return {
        "summary": summary,
        "curve": list(engine.portfolio.equity_curve),
        "orders": list(engine.executor.orders),
        "venue_orders": daemon.sim.orders(),
        "trades": list(engine.portfolio.closed),
        "stretches": driver.stretches,
        "trailed": driver.trailed,
        "amends": len(amends),
    }


async def _variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results = {variant: await _run(args, variant) for variant in VARIANTS}
    full = results["full"]
    for variant in ("runs", "per_candle"):
        result = results[variant]
        assert result["summary"] == full["summary"]  # trades, equity, candles, breakers...
        assert result["curve"] == full["curve"]  # the equity curve, point for point
        assert result["orders"] == full["orders"]  # the same orders, in the same order
        assert result["venue_orders"] == full["venue_orders"]
        assert result["trades"] == full["trades"]
    # Only the "runs" variant applies stretches, several candles at a time.
    assert results["runs"]["stretches"] > 0
    assert results["per_candle"]["stretches"] == results["full"]["stretches"] == 0
    assert results["per_candle"]["trailed"] == results["full"]["trailed"] == 0
    return results


def _tight_breakers(
    monkeypatch: pytest.MonkeyPatch, *, drawdown: str, reduce_at: str, daily: str
) -> None:
    """Set breaker limits that trip within a short run, with large positions (5% risk)."""
    monkeypatch.setenv("KESTREL_RISK__MAX_DRAWDOWN", drawdown)
    monkeypatch.setenv("KESTREL_RISK__REDUCE_SIZE_DRAWDOWN", reduce_at)
    monkeypatch.setenv("KESTREL_RISK__MAX_DAILY_LOSS", daily)
    monkeypatch.setenv("KESTREL_RISK__RISK_PER_TRADE", "0.05")
    monkeypatch.setenv("KESTREL_RISK__MAX_POSITION_FRACTION", "1.0")


def _stop_orders(result: dict[str, Any]) -> int:
    return sum(o.type is OrderType.STOP_MARKET for o in result["venue_orders"])


@pytest.mark.parametrize("strategy", ["sma_cross", "ema_cross", "rsi_bb", "breakout"])
async def test_quiet_path_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Under all_in, stretches in one call, candles one by one or the whole pipeline agree."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    monkeypatch.setenv("KESTREL_STRATEGY__NAME", strategy)
    results = await _variants(_args(strategy))
    full = results["full"]
    assert full["summary"]["n_trades"] > 0
    assert len(full["curve"]) == full["summary"]["candles"]


@pytest.mark.parametrize("strategy", ["sma_cross", "rsi_bb"])
async def test_standard_profile_with_stops_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Under the standard profile (stops that trail, take-profits, breakers) all agree."""
    monkeypatch.setenv("KESTREL_STRATEGY__NAME", strategy)
    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "0.0001")
    monkeypatch.setenv("KESTREL_SIMULATION__MAKER_FEE", "0.0001")
    results = await _variants(_args(strategy))
    full = results["full"]
    assert full["summary"]["n_trades"] > 0
    assert _stop_orders(full) > 0
    # Stops trailed: a stop-loss exit beyond the entry's stop had its stop moved (moves
    # amend the stop in place, so they no longer show as more stop orders than trades).
    assert any(_trailed(t) for t in full["trades"])
    # Held candles that only moved the stop went the short way, not through the pipeline.
    assert results["runs"]["trailed"] > full["summary"]["n_trades"]
    # Their moves went out as one amend per held stretch (the last), not one per move: fewer
    # requests to the venue, which still ends with the same orders at the same triggers
    # and times (compared above).
    assert 0 < results["runs"]["amends"] < results["per_candle"]["amends"]
    assert results["per_candle"]["amends"] == full["amends"]


def _trailed(trade: ClosedTrade) -> bool:
    if not trade.reason.startswith("stop-loss") or trade.stop_price is None:
        return False
    sign = 1 if trade.side is PositionSide.LONG else -1
    return (trade.exit_price - trade.stop_price) * sign > 0


async def test_stretches_cut_into_slices_give_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long quiet stretch applied a few candles per call (memory bound) changes nothing."""
    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "0.0001")
    monkeypatch.setenv("KESTREL_SIMULATION__MAKER_FEE", "0.0001")
    whole = await _run(_args("sma_cross"), "runs")
    monkeypatch.setattr(replay_feed, "_LONGEST", 3)
    sliced = await _run(_args("sma_cross"), "runs")
    assert sliced["stretches"] > whole["stretches"]  # the cap did cut stretches
    for key in ("summary", "curve", "orders", "venue_orders", "trades"):
        assert sliced[key] == whole[key]


def test_quiet_path_is_refused_with_an_anomaly_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch that reads every candle (anomalies in replay) keeps every candle in the pipeline."""
    monkeypatch.setenv("KESTREL_ANOMALY__ENABLED", "true")
    monkeypatch.setenv("KESTREL_ANOMALY__IN_REPLAY", "true")
    daemon = Daemon(_args("sma_cross"), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.engine is not None
    assert daemon.engine.anomaly_watch is not None
    assert daemon.driver is not None
    assert daemon.driver._quiet is None


@pytest.mark.parametrize("strategy", ["sma_cross", "rsi_bb"])
async def test_flag_mask_agrees_with_the_per_candle_lookup(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """flag_mask and entry_mask mark exactly what has_flags and has_entry report per candle."""
    from models import Candle

    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    daemon = Daemon(_args(strategy), load_settings(env_file=None))
    daemon.build_replay()
    assert daemon.driver is not None
    assert daemon.replay is not None
    signals = daemon.driver._quiet
    assert signals is not None
    single = daemon.replay.single_pair()
    assert single is not None
    pair, ts, _ = single
    probe = np.concatenate([ts, ts[:5] + 1, [ts[-1] + 10**9]])  # plus times with no candle
    mask = signals.flag_mask(pair, probe)
    expected = [signals.has_flags(Candle(pair, "1m", int(t), 1, 1, 1, 1, 1)) for t in probe]
    assert mask.tolist() == expected
    assert 0 < mask.sum() < len(ts)
    # Entries (what a flat pair acts on) are the flagged candles with an entry flag.
    entries = signals.entry_mask(pair, probe)
    assert entries.tolist() == [
        signals.has_entry(Candle(pair, "1m", int(t), 1, 1, 1, 1, 1)) for t in probe
    ]
    assert 0 < entries.sum() < mask.sum()
    assert not (entries & ~mask).any()


async def test_a_timerange_replay_in_runs_equals_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stretches follow the --timerange slice: same candles, trades and curve."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", "all_in")
    results = []
    for runs in (True, False):
        args = _args("sma_cross")
        daemon = Daemon(args, load_settings(env_file=None))
        daemon.build_replay()
        assert daemon.replay is not None
        single = daemon.replay.single_pair()
        assert single is not None
        ts = single[1]
        args.timerange = f"{int(ts[len(ts) // 4])}-{int(ts[3 * len(ts) // 4])}"  # epoch ms
        daemon = Daemon(args, load_settings(env_file=None))
        daemon.build_replay()
        assert daemon.engine is not None
        assert daemon.driver is not None
        daemon.driver.quiet_runs = runs
        summary = (await daemon.run()).to_dict()
        results.append((summary, list(daemon.engine.portfolio.equity_curve)))
    assert results[0] == results[1]
    assert results[0][0]["candles"] < len(ts) * 0.6


# -- Several pairs ---------------------------------------------------------------------------


def _walk(n: int, seed: int, vol: float, start_ms: int) -> pd.DataFrame:
    """Return `n` one-minute candles of a seeded random walk from `start_ms`."""
    rng = np.random.default_rng(seed)
    close = np.round(100 * np.exp(np.cumsum(rng.normal(0, vol, n))), 4)
    open_ = np.concatenate(([close[0]], close[:-1]))
    wiggle = np.abs(rng.normal(0, vol / 2, (2, n))) * close
    index = pd.date_range(pd.Timestamp(start_ms, unit="ms", tz="UTC"), periods=n, freq="1min")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.round(np.maximum(open_, close) + wiggle[0], 4),
            "low": np.round(np.minimum(open_, close) - wiggle[1], 4),
            "close": close,
            "volume": np.round(rng.gamma(2.0, 3.0, n), 4),
        },
        index=index.rename("ts"),
    )


def _archive(
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    walks: list[tuple[int, int, float, int]],
) -> None:
    """Write one random walk per pair (n, seed, volatility, start offset in minutes)."""
    from candle_store import CandleStore

    store = CandleStore(folder, "bybit")
    pairs = []
    for i, (n, seed, vol, offset) in enumerate(walks):
        pair = f"P{i}/USDT"
        store.append(pair, "1m", _walk(n, seed, vol, 1_700_000_040_000 + offset * 60_000))
        pairs.append(pair)
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(folder))
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", ",".join(pairs))
    monkeypatch.setenv("KESTREL_STRATEGY__WARMUP_CANDLES", "40")


def _multi_args() -> argparse.Namespace:
    return _args("sma_cross", "--timeframe", "1m", "--param", "fast=5", "--param", "slow=20")


@pytest.mark.parametrize("profile", ["standard", "all_in"])
async def test_several_pairs_equal_the_full_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, profile: str
) -> None:
    """Four pairs (one starting later): stretches across pairs give the per-candle results."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", profile)
    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "0.0001")
    monkeypatch.setenv("KESTREL_SIMULATION__MAKER_FEE", "0.0001")
    walks = [(900, 1, 2e-3, 0), (900, 2, 3e-3, 0), (700, 3, 1e-3, 150), (900, 4, 2e-3, 0)]
    _archive(monkeypatch, tmp_path, walks)
    results = await _variants(_multi_args())
    full = results["full"]
    assert full["summary"]["candles"] == sum(n for n, *_ in walks)
    assert len({t.pair for t in full["trades"]}) >= 3
    if profile == "standard":
        assert _stop_orders(full) > 0
        assert results["runs"]["trailed"] > 0  # held pairs' stops trailed the short way


async def test_breakers_trip_on_the_same_candle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A tight daily-loss limit halts and lifts on the same candles in every variant."""
    _tight_breakers(monkeypatch, drawdown="0.5", reduce_at="0.2", daily="0.005")
    _archive(monkeypatch, tmp_path, [(1800, 11, 4e-3, 0), (1800, 12, 4e-3, 0)])
    results = await _variants(_multi_args())
    trips = results["full"]["summary"]["breaker_trips"]
    # A daily halt, lifted at the next day's first candle (a quiet one), then another halt:
    # at the same times in every variant (compared above).
    assert [trip["to"] for trip in trips] == ["halted", "halted"]


async def test_a_held_flatten_voids_the_signals_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After the peak-to-trough flatten latches, signals lead nowhere in every variant."""
    _tight_breakers(monkeypatch, drawdown="0.01", reduce_at="0.004", daily="0.5")
    _archive(monkeypatch, tmp_path, [(1200, 21, 4e-3, 0), (1200, 22, 4e-3, 0)])
    results = await _variants(_multi_args())
    full = results["full"]
    trips = full["summary"]["breaker_trips"]
    assert trips[-1]["to"] == "flatten"
    flattened = trips[-1]["ts"]
    assert flattened < full["curve"][-1][0] - 600 * 60_000  # long before the end
    # Signals kept coming after it, and no order was decided on them.
    assert all(o.ts_created <= flattened + 60_000 for o in full["venue_orders"])


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    walks=st.lists(
        st.tuples(
            st.integers(200, 400),
            st.integers(0, 10_000),
            st.sampled_from([5e-4, 2e-3, 6e-3]),
            st.integers(0, 60),
        ),
        min_size=1,
        max_size=3,
    ),
    stop_atr=st.sampled_from(["0.5", "1.5", "3"]),
    take_profit_atr=st.sampled_from(["1", "4"]),
    trailing=st.booleans(),
    profile=st.sampled_from(["standard", "standard", "all_in"]),
)
async def test_random_multi_pair_runs_equal_the_per_candle_pipeline(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    walks: list[tuple[int, int, float, int]],
    stop_atr: str,
    take_profit_atr: str,
    trailing: bool,
    profile: str,
) -> None:
    """Random walks on a few pairs, random stop distances: stretches change no trade or order."""
    monkeypatch.setenv("KESTREL_RISK__PROFILE", profile)
    monkeypatch.setenv("KESTREL_RISK__STOP_ATR_MULTIPLE", stop_atr)
    monkeypatch.setenv("KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE", take_profit_atr)
    monkeypatch.setenv("KESTREL_RISK__TRAILING_STOP", str(trailing).lower())
    _archive(monkeypatch, tmp_path_factory.mktemp("walks"), walks)
    args = _multi_args()
    runs, full = await _run(args, "runs"), await _run(args, "full")
    for key in ("summary", "curve", "orders", "venue_orders", "trades"):
        assert runs[key] == full[key], key


@settings(max_examples=60, deadline=None)
@given(
    segments=st.lists(
        st.tuples(
            st.integers(9_000, 10_500),  # the equity held over the segment, in cents
            st.lists(st.integers(1, 6 * 3_600_000), min_size=1, max_size=30),  # time steps
        ),
        min_size=1,
        max_size=12,
    ),
    daily=st.sampled_from([0.005, 0.03]),
    drawdown=st.sampled_from([0.04, 0.15]),
)
def test_update_flat_equals_update_at_each_time(
    segments: list[tuple[int, list[int]]], daily: float, drawdown: float
) -> None:
    """Feeding an unchanged equity over many times at once leaves the breakers as one by one."""
    import copy
    from decimal import Decimal

    from circuit_breakers import CircuitBreakers
    from config import RiskSettings
    from models import TradingState

    risk = RiskSettings(max_daily_loss=daily, max_drawdown=drawdown, reduce_size_drawdown=0.02)
    each, flat = CircuitBreakers(risk), CircuitBreakers(risk)
    now = 1_700_000_000_000
    for cents, steps in segments:
        equity = Decimal(cents) / 100 * 100
        times = []
        for step in steps:
            now += step
            times.append(now)
        states = [each.update(t, equity) for t in times]
        probe = copy.deepcopy(flat)
        assert flat.update_flat(times, equity) == len(times)
        assert flat.state is states[-1]
        assert flat.dump() == each.dump()
        # Stopping on a state: exactly where one-by-one first reaches it.
        fed = probe.update_flat(times, equity, TradingState.HALTED)
        if TradingState.HALTED in states:
            assert fed == states.index(TradingState.HALTED) + 1
            assert probe.now == times[fed - 1]
        else:
            assert fed == len(times)


@pytest.mark.parametrize("seed", [31, 32, 33, 34, 35, 36])
async def test_a_flatten_on_a_trailing_candle_is_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int
) -> None:
    """The drawdown flatten tripped by a held position's marks acts alike in every variant."""
    _tight_breakers(monkeypatch, drawdown="0.01", reduce_at="0.004", daily="0.5")
    monkeypatch.setenv("KESTREL_RISK__STOP_ATR_MULTIPLE", "6")
    _archive(monkeypatch, tmp_path, [(1200, seed, 4e-3, 0), (1200, seed + 50, 4e-3, 0)])
    results = await _variants(_multi_args())
    assert results["full"]["summary"]["breaker_trips"][-1]["to"] == "flatten"


async def test_a_backtest_counts_the_audit_events_a_kept_trail_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backtest's trail only counts; the same run keeping its events records as many."""
    from utils.utilities import AuditTrail

    monkeypatch.setenv("KESTREL_STRATEGY__NAME", "sma_cross")
    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "0.0001")
    counts: list[int] = []
    kinds: set[str] = set()
    for keep in (False, True):
        daemon = Daemon(_args("sma_cross"), load_settings(env_file=None))
        daemon.audit = AuditTrail(None, keep=keep)
        daemon.build_replay()
        await daemon.run()
        counts.append(daemon.audit.count)
        if keep:
            assert daemon.audit.events is not None
            assert len(daemon.audit.events) == daemon.audit.count
            kinds = {e["kind"] for e in daemon.audit.events}
    assert counts[0] == counts[1] > 0
    for kind in ("signal", "risk_approved", "order_submitted", "fill", "stop_moved"):
        assert kind in kinds
    assert "trade_closed" in kinds


async def test_a_refused_amend_in_a_held_stretch_leaves_the_stop_where_the_venue_has_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A held stretch's amend the venue refuses: the next bars trail from the venue's level.

    Every amend of one pair's stop is refused (the venue keeps the old trigger), the other
    pairs' go through. Each trailed bar starts from the level the position records (the
    venue's, or the move not sent yet), never from a refused move taken as made: that
    would make the next bar's same move "already there", recorded and never sent (which
    this test caught before the driver re-read the venue's stop after each amend).
    """
    from error_handler import OrderRejected

    monkeypatch.setenv("KESTREL_SIMULATION__TAKER_FEE", "0.0001")
    monkeypatch.setenv("KESTREL_SIMULATION__MAKER_FEE", "0.0001")
    _archive(monkeypatch, tmp_path, [(900, 1, 2e-3, 0), (900, 2, 3e-3, 0), (900, 4, 2e-3, 0)])
    daemon = Daemon(_multi_args(), load_settings(env_file=None))
    daemon.build_replay()
    engine, driver, sim = daemon.engine, daemon.driver, daemon.sim
    assert engine is not None
    assert driver is not None
    assert sim is not None
    refused: list[object] = []
    amend_order = sim.amend_order

    async def refusing(pair: str, **kwargs: Any) -> Any:
        if pair == "P1/USDT":
            refused.append(kwargs["trigger_price"])
            raise OrderRejected("order not modified", pair=pair)
        return await amend_order(pair, **kwargs)

    sim.amend_order = refusing  # type: ignore[method-assign]
    starts: list[tuple[str, object, object]] = []  # (pair, the bar's level, the position's)
    on_trailing_bar = engine.on_trailing_bar

    def trailing_bar(pair: str, bar: Any, atr: Any, now: int, working: Any) -> Any:
        position = engine.portfolio.position(pair)
        assert position is not None
        assert position.stop_price is not None
        # The level the position records, on the venue's tick grid (a rule's move that an
        # amend would round to the level the stop has is recorded as the rule gave it).
        starts.append((pair, working, engine.executor.trigger_for(pair, position.stop_price)))
        return on_trailing_bar(pair, bar, atr, now, working)

    engine.on_trailing_bar = trailing_bar  # type: ignore[method-assign]
    summary = (await daemon.run()).to_dict()
    assert summary["n_trades"] > 0
    assert refused  # the refused pair's stop was moved in held stretches
    assert any(pair == "P1/USDT" for pair, _, _ in starts)
    assert [s for s in starts if s[1] != s[2]] == []
    # At most one working protective stop per pair at the end.
    working = [
        o for o in sim.orders() if o.type is OrderType.STOP_MARKET and not o.status.is_terminal
    ]
    assert len({o.pair for o in working}) == len(working)
