"""The fast path takes the replay's decisions: same trades, same accounting, same curve."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from error_handler import ConfigError
from models import Candle, MarketType
from strategy import load_strategy
from tests.test_backtest_support import (
    MINUTE,
    PARITY_ENV,
    frame,
    random_walk,
    replay_in_process,
    run_cli,
    sample_frame,
)
from trade_simulator import (
    BacktestResult,
    PairSchedule,
    fast_backtest,
    fast_path_blockers,
    result_from_summary,
    run_fast,
    sim_market,
)
from utils.utilities import parse_timerange


PAIR = "BTC/USDT"
TRADE_KEYS = (
    "pair",
    "side",
    "entry_ts",
    "exit_ts",
    "entry_price",
    "exit_price",
    "qty",
    "fee",
    "pnl",
)


def _set_env(monkeypatch: pytest.MonkeyPatch, extra: dict[str, str] | None = None) -> None:
    for key, value in {**PARITY_ENV, **(extra or {})}.items():
        monkeypatch.setenv(key, value)


def _fast(name: str, params: dict[str, float], **kwargs: Any) -> BacktestResult:
    df = sample_frame()
    return run_fast(
        load_strategy(name, params),
        df,
        pair=PAIR,
        timeframe="1m",
        starting_balance=10_000,
        taker_fee=0.001,
        maker_fee=0.001,
        market=sim_market(PAIR, float(df["close"].iloc[0])),
        **kwargs,
    )


def _rows(trades: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(t[k] for k in TRADE_KEYS) for t in trades]


def test_fast_path_equals_the_cli_replay_bit_for_bit(tmp_path: Path) -> None:
    """sma_cross 10/30, all_in, on the sample: the CLI backtest and run_fast(exact) agree."""
    summary = run_cli(
        tmp_path,
        "--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=10",
        "--param", "slow=30", "--pairs", PAIR, "--timeframe", "1m",
        env=PARITY_ENV,
    )  # fmt: skip
    df = sample_frame()
    fast = fast_backtest(
        load_strategy("sma_cross", {"fast": 10, "slow": 30}),
        df,
        pair=PAIR,
        timeframe="1m",
        starting_balance=10_000,
        taker_fee=0.001,
        slippage_bps=0,
    )
    assert summary["n_trades"] == fast.n_trades == 32
    assert _rows(summary["trades"]) == _rows(fast.summary().to_dict()["trades"])
    ours = fast.summary().to_dict()
    # The whole document matches; the drawdown is taken on the float curve (to 1e-12).
    assert ours.pop("max_drawdown") == pytest.approx(summary.pop("max_drawdown"), rel=1e-12)
    assert summary.pop("dropped_candles") == 0
    assert set(summary.pop("timings")) >= {"load_s", "run_s", "total_s"}  # the CLI's own
    assert ours == summary


@pytest.mark.parametrize(
    ("name", "params", "extra"),
    [
        ("ema_cross", {}, {"KESTREL_SIMULATION__LATENCY_MS": "30000"}),
        ("rsi_bb", {}, {"KESTREL_SIMULATION__SLIPPAGE_BPS": "3"}),
        ("breakout", {"period": 30, "exit_period": 15}, {"KESTREL_SIMULATION__FILL_AT": "close"}),
        ("sma_cross", {"fast": 5, "slow": 20}, {"KESTREL_SIMULATION__TAKER_FEE": "0.00055"}),
    ],
)
async def test_fast_path_equals_the_replay_for_every_strategy_and_fill_model(
    monkeypatch: pytest.MonkeyPatch, name: str, params: dict[str, float], extra: dict[str, str]
) -> None:
    """Each built-in, with slippage, fill at close or another fee: trades and curve agree."""
    _set_env(monkeypatch, extra)
    cli = ["--mode", "backtest", "--strategy", name, "--pairs", PAIR, "--timeframe", "1m"]
    for key, value in params.items():
        cli += ["--param", f"{key}={value}"]
    summary, curve = await replay_in_process(*cli)
    options: dict[str, Any] = {
        "slippage_bps": float(extra.get("KESTREL_SIMULATION__SLIPPAGE_BPS", 0)),
        "fill_at": extra.get("KESTREL_SIMULATION__FILL_AT", "next_open"),
        "taker_fee": float(extra.get("KESTREL_SIMULATION__TAKER_FEE", 0.001)),
    }
    df = sample_frame()
    strategy = load_strategy(name, params)
    exact = run_fast(strategy, df, pair=PAIR, exact=True, **options)
    fast = run_fast(strategy, df, pair=PAIR, **options)
    assert summary["n_trades"] > 0
    assert _rows(summary["trades"]) == _rows(exact.summary().to_dict()["trades"])
    for key in ("final_equity", "fees", "realised_pnl", "signals", "vetoes", "rejections"):
        assert exact.summary().to_dict()[key] == summary[key], key
    # The float path: the same trades; prices with slippage, and PnL, to float rounding.
    replay_trades = summary["trades"]
    for key in ("entry_ts", "exit_ts", "qty"):
        assert [t[key] for t in replay_trades] == fast.table[key].tolist(), key
    for key in ("entry_price", "exit_price"):
        np.testing.assert_allclose(fast.table[key], [t[key] for t in replay_trades], rtol=1e-15)
    np.testing.assert_allclose(fast.table["pnl"], [t["pnl"] for t in replay_trades], rtol=1e-9)
    assert fast.final_equity == pytest.approx(summary["final_equity"], rel=1e-12)
    ts, values = np.array(curve).T
    assert np.array_equal(ts.astype(np.int64), exact.ts)
    np.testing.assert_allclose(exact.equity, values, rtol=1e-13)
    np.testing.assert_allclose(fast.equity, values, rtol=1e-12)


async def test_timerange_simulates_the_range_with_signals_from_the_whole_archive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--timerange: the fast path with start/end gives the replay's trades on that range."""
    _set_env(monkeypatch)
    df = sample_frame()
    start = int(df.index[300].value // 1_000_000)
    end = int(df.index[1100].value // 1_000_000)
    # parse_timerange takes dates; pass epoch ms (12+ digits), which it accepts too.
    timerange = f"{start}-{end}"
    assert parse_timerange(timerange) == (start, end)
    summary, _ = await replay_in_process(
        "--mode", "backtest", "--strategy", "sma_cross", "--pairs", PAIR, "--timeframe", "1m",
        "--timerange", timerange,
    )  # fmt: skip
    fast = run_fast(
        load_strategy("sma_cross"), df, pair=PAIR, start_ms=start, end_ms=end, exact=True
    )
    assert summary["candles"] == fast.candles == 800
    assert _rows(summary["trades"]) == _rows(fast.summary().to_dict()["trades"])
    assert summary["final_equity"] == fast.final_equity


def test_fast_path_trades_on_a_constructed_series_match_hand_computation() -> None:
    """Two crossings: qty, fees and PnL computed by hand from the fill rules."""
    closes = [100.0] * 6 + [90.0, 80.0, 90.0, 110.0, 120.0, 120.0, 100.0, 80.0, 70.0, 70.0]
    df = frame(closes)
    strategy = load_strategy("sma_cross", {"fast": 2, "slow": 5})
    enter, exit_ = strategy.entries_exits(df)
    i_in = int(np.flatnonzero(enter)[0])
    i_out = int(np.flatnonzero(exit_ & (np.arange(len(df)) > i_in))[0])
    result = run_fast(
        strategy, df, pair="X/USDT", starting_balance=1_000, taker_fee=0.01, exact=True
    )
    ((trade),) = result.trades
    opens = df["open"].to_numpy()
    p_in, p_out = Decimal(repr(float(opens[i_in + 1]))), Decimal(repr(float(opens[i_out + 1])))
    lot = sim_market("X/USDT", 100.0).lot_size
    qty = (Decimal(1000) / (p_in * Decimal("1.01")) / lot).to_integral_value("ROUND_FLOOR") * lot
    fee = p_in * qty * Decimal("0.01") + p_out * qty * Decimal("0.01")
    assert trade.entry_ts == int(df.index[i_in + 1].value // 1_000_000)
    assert trade.exit_ts == int(df.index[i_out + 1].value // 1_000_000)
    assert (trade.entry_price, trade.exit_price) == (float(p_in), float(p_out))
    assert trade.qty == float(qty)
    assert trade.fee == float(fee)
    assert trade.pnl == float((p_out - p_in) * qty - fee)
    assert result.final_equity == float(Decimal(1000) + (p_out - p_in) * qty - fee)


def test_stake_mode_spends_at_most_the_stake() -> None:
    """With all_in=False each entry buys with the stake (capped by cash)."""
    df = random_walk(3_000, seed=5)
    result = run_fast(
        load_strategy("sma_cross", {"fast": 5, "slow": 20}), df, all_in=False, stake=250.0
    )
    assert result.n_trades > 5
    notional = result.table["qty"] * result.table["entry_price"] * 1.001
    assert np.all(notional <= 250.0 + 1e-9)
    assert np.all(notional > 249.0)
    with pytest.raises(ConfigError):
        run_fast(load_strategy("sma_cross"), df, all_in=False)


def test_signals_before_the_warmup_are_ignored() -> None:
    """An entry flag on row 0 (before warmup) never trades."""
    df = random_walk(200, seed=2)
    strategy = load_strategy("sma_cross", {"fast": 5, "slow": 20})
    enter = np.zeros(len(df), dtype=bool)
    exit_ = np.zeros(len(df), dtype=bool)
    enter[0] = True
    assert run_fast(strategy, df, signals=(enter, exit_)).n_trades == 0
    enter[strategy.warmup - 1] = True
    exit_[strategy.warmup + 5] = True
    assert run_fast(strategy, df, signals=(enter, exit_)).n_trades == 1


def test_float_and_exact_accounting_agree() -> None:
    """On a long random walk the float loop and the Decimal accounting give the same trades."""
    df = random_walk(20_000, seed=11, start=25_000.0)
    strategy = load_strategy("sma_cross", {"fast": 7, "slow": 25})
    fast = run_fast(strategy, df, slippage_bps=2)
    exact = run_fast(strategy, df, slippage_bps=2, exact=True)
    assert fast.n_trades == exact.n_trades > 100
    for key in ("entry_ts", "exit_ts", "qty"):
        assert np.array_equal(fast.table[key], exact.table[key]), key
    np.testing.assert_allclose(fast.table["entry_price"], exact.table["entry_price"], rtol=1e-15)
    np.testing.assert_allclose(fast.table["pnl"], exact.table["pnl"], rtol=1e-9, atol=1e-9)
    assert fast.final_equity == pytest.approx(exact.final_equity, rel=1e-12)


def test_result_round_trips_through_the_replay_summary() -> None:
    """result_from_summary rebuilds the same trades and curve from a summary document."""
    fast = _fast("sma_cross", {"fast": 10, "slow": 30}, exact=True)
    curve = list(zip(fast.ts.tolist(), fast.equity.tolist(), strict=True))
    rebuilt = result_from_summary(fast.summary(), curve)
    assert rebuilt.trades == fast.trades
    assert np.array_equal(rebuilt.equity, fast.equity)
    assert rebuilt.summary().final_equity == fast.final_equity


# -- Dynamic pairs ---------------------------------------------------------------------------


class _Target:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def set_pairs(self, pairs: list[str]) -> None:
        self.calls.append(pairs)


def test_pair_schedule_asks_once_per_boundary_and_never_for_the_future() -> None:
    """pairs_at is called with refresh boundaries <= the candle close, once each."""
    asked: list[int] = []

    def pairs_at(ts: int) -> list[str]:
        asked.append(ts)
        return ["A/USDT"] if (ts // (60 * MINUTE)) % 2 == 0 else ["B/USDT", "A/USDT"]

    schedule = PairSchedule(pairs_at, refresh_ms=60 * MINUTE)
    target = _Target()
    t0 = 1_700_002_800_000  # an hour boundary
    for k in range(150):
        candle = Candle("A/USDT", "1m", t0 + k * MINUTE, 1, 1, 1, 1, 1)
        schedule.apply(target, candle, MINUTE)
        assert max(asked) <= candle.ts + MINUTE
    boundaries = list(asked)
    assert boundaries == sorted(set(boundaries))
    assert boundaries == [t0, t0 + 60 * MINUTE, t0 + 120 * MINUTE]
    assert [len(c) for c in target.calls] == [2, 1, 2]  # t0 is an odd hour: two pairs
    assert sorted(schedule.universe(t0, t0 + 3 * 60 * MINUTE)) == ["A/USDT", "B/USDT"]


async def test_dynamic_pairs_in_a_multi_pair_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries happen only on pairs listed at the time; a dropped pair still exits."""
    _set_env(monkeypatch, {"KESTREL_RISK__MAX_OPEN_POSITIONS": "5"})
    import main
    from config import load_settings
    from runner import Daemon

    pairs = ["ETH/BTC", "LTC/BTC", "XMR/BTC"]
    args = main.build_parser().parse_args(
        ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=5", "--param",
         "slow=20", "--pairs", ",".join(pairs), "--timeframe", "5m", "--no-ui"]
    )  # fmt: skip
    settings = main._apply_cli(load_settings(env_file=None), args)
    daemon = Daemon(args, settings)
    daemon.build_replay()
    engine, driver = daemon.engine, daemon.driver
    assert engine is not None
    assert driver is not None
    assert daemon.feed is not None
    day = 86_400_000

    def pairs_at(ts: int) -> list[str]:
        return [pairs[(ts // day) % 3]]  # one pair a day, in turn

    schedule = PairSchedule(pairs_at, refresh_ms=day)
    async for candle in daemon.feed:
        schedule.apply(engine, candle, engine.step)
        await driver.on_candle(candle)
    trades = engine.portfolio.closed
    assert len(trades) > 10
    for trade in trades:
        assert trade.pair in pairs_at(trade.entry_ts - engine.step)  # listed at the decision
    assert any(trade.pair not in pairs_at(trade.exit_ts - engine.step) for trade in trades)
    assert {t.pair for t in trades} == set(pairs)


def test_linear_markets_keep_their_own_rules() -> None:
    """sim_market for a linear pair allows leverage; spot does not (rules the fast path uses)."""
    assert sim_market("BTC/USDT:USDT", 17_000.0, MarketType.LINEAR).max_leverage == Decimal(10)
    assert sim_market("BTC/USDT", 17_000.0).max_leverage == Decimal(1)


# -- Replay feed -----------------------------------------------------------------------------


async def test_replay_feed_labels_each_pair_and_keeps_time_order() -> None:
    """Two pairs interleave in (ts, pair) order, each candle with its own pair and prices."""
    from trade_simulator import ReplayFeed
    from utils.utilities import ReplayClock

    a = frame([1.0, 2.0, 3.0])
    b = frame([10.0, 20.0, 30.0])
    clock = ReplayClock(0)
    seen: list[tuple[str, float, int]] = []
    async for candle in ReplayFeed({"B/USDT": b, "A/USDT": a}, "1m", clock):
        seen.append((candle.pair, candle.close, clock.now_ms() - candle.ts))
    assert [(p, c) for p, c, _ in seen] == [
        ("A/USDT", 1.0), ("B/USDT", 10.0), ("A/USDT", 2.0),
        ("B/USDT", 20.0), ("A/USDT", 3.0), ("B/USDT", 30.0),
    ]  # fmt: skip
    assert {lag for _, _, lag in seen} == {MINUTE}  # the clock is at each candle's close


async def test_replay_feed_reports_progress_and_can_yield_less_often() -> None:
    """progress(done, total) is called every N candles and at the end; yield_every works."""
    from trade_simulator import ReplayFeed
    from utils.utilities import ReplayClock

    calls: list[tuple[int, int]] = []
    feed = ReplayFeed(
        {"A/USDT": random_walk(25)},
        "1m",
        ReplayClock(0),
        progress=lambda done, total: calls.append((done, total)),
        progress_every=10,
        yield_every=8,
    )
    count = sum([1 async for _ in feed])
    assert count == 25
    assert calls == [(10, 25), (20, 25), (25, 25)]


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_fast_path_reads_any_index_unit(unit: str) -> None:
    """Second, milli, micro and nanosecond indexes give the same trades and close times."""
    df = sample_frame()
    start = int(df.index[100].value // 1_000_000) + 1  # mid-candle: the next candle is first
    reference = run_fast(load_strategy("sma_cross"), df, start_ms=start)
    other = df.copy()
    other.index = other.index.as_unit(unit)
    result = run_fast(load_strategy("sma_cross"), other, start_ms=start)
    assert result.candles == len(df) - 101
    assert np.array_equal(result.ts, reference.ts)
    assert result.trades == reference.trades


@pytest.mark.parametrize(
    ("overrides", "blocked"),
    [
        ({}, False),
        ({"risk_profile": "standard"}, False),  # its own: fast_standard.standard_blockers
        ({"pairs": ["BTC/USDT", "ETH/USDT"]}, True),
        ({"dynamic_pairs": True}, True),
        ({"slippage_model": "volatility"}, True),
        ({"latency_ms": 59_999}, False),
        ({"latency_ms": 60_000}, True),
    ],
)
def test_fast_path_blockers_name_what_only_the_replay_models(
    overrides: dict[str, Any], blocked: bool
) -> None:
    """One fixed pair, fixed slippage and sub-candle latency: the fast path may stand in."""
    options: dict[str, Any] = {
        "risk_profile": "all_in",
        "pairs": [PAIR],
        "timeframe": "1m",
        "slippage_model": "fixed",
        "latency_ms": 0,
        **overrides,
    }
    reasons = fast_path_blockers(**options)
    assert bool(reasons) is blocked
