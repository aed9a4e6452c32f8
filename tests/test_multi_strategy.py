"""Three strategies side by side through the real daemon, capital allocated by skill.

Each strategy trades its own pair of the bundled sample (bittrex 5m ADA/BTC, ETC/BTC,
LTC/BTC); the skill ranking re-cuts their sleeves every replay day. The checks: all three
trade, every order and trade carries its strategy, the allocations follow the ranking
within floor and cap, entries are sized on the strategy's sleeve, and the account-wide
limit on open positions holds across strategies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models import AllocationChanged, Event, TradingState, TradingStateChanged
from pipeline import Engine
from telegram_templates import render_event, render_status
from tests.conftest import ROOT
from tests.test_backtest_support import cli_args
from utils.utilities import AuditTrail


SLEEVES: list[dict[str, Any]] = [
    {"name": "ema_cross", "pairs": ["ADA/BTC"]},
    {"name": "sma_cross", "params": {"fast": 5, "slow": 20}, "pairs": ["ETC/BTC"]},
    {"name": "rsi_bb", "pairs": ["LTC/BTC"]},
]
OWNER = {pair: s["name"] for s in SLEEVES for pair in s["pairs"]}
FLOOR, CAP = 0.1, 0.55
MAX_OPEN = 2


async def _run(
    monkeypatch: pytest.MonkeyPatch,
    *cli: str,
    sleeves: list[dict[str, Any]] = SLEEVES,
    alerts: list[Event] | None = None,
) -> tuple[dict[str, Any], Engine]:
    import main
    from config import load_settings
    from runner import Daemon

    for key, value in {
        "KESTREL_ALLOCATION__STRATEGIES": json.dumps(sleeves),
        "KESTREL_ALLOCATION__INTERVAL_S": "86400",
        "KESTREL_ALLOCATION__FLOOR": str(FLOOR),
        "KESTREL_ALLOCATION__CAP": str(CAP),
        "KESTREL_ALLOCATION__PROBATION_TRADES": "3",
        "KESTREL_ALLOCATION__PROBATION_DAYS": "1",
        "KESTREL_RISK__MAX_OPEN_POSITIONS": str(MAX_OPEN),
        "KESTREL_STRATEGY__TIMEFRAME": "5m",
    }.items():
        monkeypatch.setenv(key, value)
    args = cli_args(*cli, "--timeframe", "5m")
    daemon = Daemon(args, main._apply_cli(load_settings(env_file=None), args))
    daemon.audit = AuditTrail(None, keep=True)  # every decision, kept in memory
    if alerts is not None:
        daemon.notifiers.append(alerts.append)  # the alert bus, as Telegram hears it
    daemon.build_replay()
    summary = (await daemon.run()).to_dict()
    assert daemon.engine is not None
    return summary, daemon.engine


def _max_concurrent(trades: list[dict[str, Any]]) -> int:
    # The most positions open at once, from the round trips' entry and exit times.
    moves = sorted([(t["entry_ts"], 1) for t in trades] + [(t["exit_ts"], -1) for t in trades])
    held = peak = 0
    for _, step in moves:  # exits sort before entries at the same instant
        held += step
        peak = max(peak, held)
    return peak


async def test_three_strategies_trade_side_by_side_allocated_by_skill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All trade, all tagged, shares follow the ranking in [floor, cap], limits stay global."""
    alerts: list[Event] = []
    summary, engine = await _run(monkeypatch, "--mode", "backtest", alerts=alerts)
    sections = {s["name"]: s for s in summary["strategies"]}
    assert set(sections) == set(OWNER.values())
    assert all(s["n_trades"] > 0 for s in sections.values())
    # Every trade and every order names its strategy (the trade by name, the order by tag).
    assert all(t["strategy"] == OWNER[t["pair"]] for t in summary["trades"])
    assert sum(s["n_trades"] for s in sections.values()) == summary["n_trades"]
    tags = {name: s["tag"] for name, s in sections.items()}
    assert len(set(tags.values())) == 3
    orders = list(engine.executor.orders.values())
    assert {o.pair for o in orders} == set(OWNER)
    assert all(f"-{tags[OWNER[o.pair]]}_" in o.client_order_id for o in orders)
    # Allocations: once out of probation, each share is within [floor, cap] and a higher
    # lower bound never holds less.
    events = engine.sleeves.history if engine.sleeves is not None else []
    assert len(events) >= 10
    graduated = [e for e in events if not any(s.probation for s in e.sleeves)]
    assert graduated
    for event in graduated:
        assert event.feasible
        assert sum(s.after for s in event.sleeves) == pytest.approx(1.0)
        for a in event.sleeves:
            assert FLOOR - 1e-9 <= a.after <= CAP + 1e-9
            for b in event.sleeves:
                assert a.lcb is not None
                assert b.lcb is not None
                if a.lcb > b.lcb:
                    assert a.after >= b.after - 1e-9
    assert len({round(s.after, 6) for s in graduated[-1].sleeves}) > 1  # the ranking moved them
    final = sorted(graduated[-1].sleeves, key=lambda s: -s.after)
    ranking = [r.name for r in engine.reward.ranked()]
    assert [s.name for s in final] == ranking
    assert [round(s["weight"], 9) for s in summary["strategies"]] == [
        round(s.after, 9) for s in final
    ]
    # Each strategy is scored on its own sleeve, under its own name.
    assert {r.name: r.trades for r in engine.reward.ranked()} == {
        n: s["n_trades"] for n, s in sections.items()
    }
    # The account-wide cap on open positions binds across strategies.
    assert _max_concurrent(summary["trades"]) <= MAX_OPEN
    audit = engine.audit.events or []
    guards = {e.get("guard") for e in audit if e["kind"] == "veto"}
    assert "max_open_positions" in guards  # it bound: a third strategy was refused
    assert sum(e["kind"] == "allocation_changed" for e in audit) == len(events)
    snapshot = engine.snapshot()
    assert set(snapshot.allocation) == set(OWNER.values())
    assert sum(a["weight"] for a in snapshot.allocation.values()) == pytest.approx(1.0)
    assert [e for e in alerts if isinstance(e, AllocationChanged)] == events  # all alerted
    assert "Capital reallocated" in render_event(events[-1]).text
    status = render_status(snapshot)
    for name, sleeve in snapshot.allocation.items():
        assert f"sleeve {name} {sleeve['weight']:.1%}" in status


async def test_sim_decides_each_pair_with_its_own_strategy_on_the_sleeve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the rolling path (sim) each pair's decisions come from its own sleeve's strategy."""
    # One strategy twice, told apart by label: its own parameters, pairs and record.
    quick = {"name": "sma_cross", "label": "sma_quick", "params": {"fast": 3, "slow": 10}}
    sleeves = [*SLEEVES[:2], {**quick, "pairs": ["LTC/BTC"]}]
    owner = {**OWNER, "LTC/BTC": "sma_quick"}
    summary, engine = await _run(
        monkeypatch,
        "--mode",
        "sim",
        "--feed",
        "replay",
        "--timerange",
        "20180110-20180112",
        sleeves=sleeves,
    )
    decided = {pair: d for pair, d in engine.decisions.items() if d.signal is not None}
    assert set(decided) == set(owner)
    names = {"ADA/BTC": "ema_cross", "ETC/BTC": "sma_cross", "LTC/BTC": "sma_cross"}
    for pair, decision in decided.items():
        assert decision.signal is not None
        assert decision.signal.strategy == names[pair]
    entries = [
        d.intent
        for d in engine.decisions.values()
        if d.intent is not None and not d.intent.reduce_only
    ]
    assert entries
    assert all("of sleeve equity" in i.reason for i in entries)
    assert summary["trades"]
    assert all(t["strategy"] == owner[t["pair"]] for t in summary["trades"])
    assert {s["name"] for s in summary["strategies"]} == set(owner.values())


async def test_paper_trading_on_the_exchange_feed_runs_each_sleeve_on_its_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the live feed (paper fills) each pair is warmed up and decided by its own sleeve."""
    import asyncio

    from config import load_settings
    from runner import Daemon
    from tests.bybit_emulator import BybitEmulator

    sleeves = [
        {
            "name": "sma_cross",
            "label": "fast",
            "params": {"fast": 2, "slow": 3},
            "pairs": ["BTC/USDT"],
        },
        {
            "name": "sma_cross",
            "label": "slow",
            "params": {"fast": 3, "slow": 5},
            "pairs": ["ETH/USDT"],
        },
    ]
    async with BybitEmulator(lenient_clock=True) as emu:
        for key, value in {
            "KESTREL_EXCHANGE__BASE_URL": emu.base_url,
            "KESTREL_STRATEGY__WARMUP_CANDLES": "30",
            "KESTREL_ALLOCATION__STRATEGIES": json.dumps(sleeves),
        }.items():
            monkeypatch.setenv(key, value)
        daemon = Daemon(cli_args("--mode", "sim", "--feed", "live"), load_settings(env_file=None))
        await daemon.build_exchange(paper=True)
        engine = daemon.engine
        assert engine is not None
        assert engine.sleeves is not None
        assert engine.pairs == ["BTC/USDT", "ETH/USDT"]
        assert engine.sleeves.weights == {"fast": 0.5, "slow": 0.5}
        assert all(len(engine.data.arrays(p, "1m").ts) >= 30 for p in engine.pairs)
        run = asyncio.create_task(daemon.run())
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while {d.pair for d in engine.decisions.values() if d.intent} != set(engine.pairs):
                assert not run.done(), run.result()
                assert asyncio.get_running_loop().time() < deadline, "no order on every pair"
                await emu.advance(minutes=1)
                await asyncio.sleep(0.1)
        finally:
            daemon.stop.set()
            await asyncio.wait_for(run, 30)
        tags = {s.name: s.tag for s in engine.sleeves.sleeves.values()}
        owner = {"BTC/USDT": "fast", "ETH/USDT": "slow"}
        for pair, decision in engine.decisions.items():
            if decision.intent is not None:
                assert decision.intent.client_order_id.endswith(f"-{tags[owner[pair]]}_0")
        assert not [r for r in emu.requests if "/v5/order/" in r.path]  # paper: no real orders
        # A restart takes the sleeves back as stored: the probation clock keeps its start.
        started = engine.sleeves.started_ms
        await emu.advance(minutes=5)
        again = Daemon(cli_args("--mode", "sim", "--feed", "live"), load_settings(env_file=None))
        await again.build_exchange(paper=True)
        try:
            assert again.engine is not None
            assert again.engine.sleeves is not None
            assert again.engine.sleeves.started_ms == started < again.engine.clock.now_ms()
            assert again.engine.sleeves.weights == engine.sleeves.weights
        finally:
            await again.close_exchange()


async def test_an_unknown_strategy_in_a_sleeve_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sleeve naming no built-in strategy (nor a file) fails the build, naming its entry."""
    from error_handler import ConfigError

    sleeves = [SLEEVES[0], {"name": "no_such_strategy", "pairs": ["ETC/BTC"]}]
    with pytest.raises(
        ConfigError, match=r"KESTREL_ALLOCATION__STRATEGIES\[1\] \(no_such_strategy\)"
    ):
        await _run(monkeypatch, "--mode", "backtest", sleeves=sleeves)


async def test_the_drawdown_breaker_flattens_and_stops_every_strategy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One account-wide drawdown limit: once it trips, every sleeve is flat and none enters."""
    monkeypatch.setenv("KESTREL_RISK__MAX_DRAWDOWN", "0.03")
    monkeypatch.setenv("KESTREL_RISK__REDUCE_SIZE_DRAWDOWN", "0.02")
    alerts: list[Event] = []
    summary, engine = await _run(monkeypatch, "--mode", "backtest", alerts=alerts)
    assert engine.risk.trading_state is TradingState.FLATTEN
    [trip] = [
        e
        for e in alerts
        if isinstance(e, TradingStateChanged) and e.to_state is TradingState.FLATTEN
    ]
    assert trip.trigger == "peak_to_trough"
    assert all(t["entry_ts"] < trip.ts for t in summary["trades"])  # none entered after
    assert all(t["exit_ts"] <= trip.ts + 300_000 for t in summary["trades"])  # all closed
    assert not summary["open_positions"]
    assert len({t["strategy"] for t in summary["trades"]}) >= 2  # it stopped several sleeves
    assert summary["last_ts"] - trip.ts > 86_400_000  # the replay ran on, every one held flat


def test_the_backtest_report_has_a_section_per_strategy(tmp_path: Path) -> None:
    """The CLI's Rich table and HTML report list every strategy with its share and trades."""
    env = {
        **os.environ,
        "KESTREL_ALLOCATION__STRATEGIES": json.dumps(SLEEVES),
        "KESTREL_ALLOCATION__INTERVAL_S": "86400",
        "KESTREL_STRATEGY__TIMEFRAME": "5m",
        "KESTREL_STORAGE__DATA_DIR": str(tmp_path / "data"),
    }
    html_path, summary_path = tmp_path / "report.html", tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--mode", "backtest", "--timeframe", "5m",
         "--no-ui", "--report-html", str(html_path), "--summary-json", str(summary_path)],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    sections = json.loads(summary_path.read_text())["strategies"]
    assert {s["name"] for s in sections} == {s["name"] for s in SLEEVES}
    page = html_path.read_text()
    per_strategy = page[page.index("<h2>Per strategy</h2>") :]
    per_strategy = per_strategy[: per_strategy.index("</table>")]
    for section in sections:
        assert section["name"] in per_strategy
        assert f"{int(section['n_trades']):,}" in per_strategy
        assert section["name"] in result.stdout
    assert "Per strategy" in result.stdout
