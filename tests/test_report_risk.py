"""Reports that explain themselves: breaker trips, the spans they held, buy-and-hold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from circuit_breakers import breaker_report
from fast_path import BacktestResult
from report_risk import buy_and_hold, time_by_state
from run_summary import TradingSpan
from tests.test_backtest_support import run_cli


H = 3_600_000


def _change(ts: int, old: str, new: str, rule: str, **numbers: float) -> dict[str, object]:
    return {"ts": ts, "from": old, "to": new, "trigger": rule, "reason": f"{rule} tripped",
            "resume_at": None, **numbers}  # fmt: skip


def test_breaker_report_lists_escalations_and_the_spans_they_held() -> None:
    """Escalations are trips; every non-normal stretch is a span ending at the next change."""
    history = [
        _change(1 * H, "normal", "reduced", "reduce_size", drawdown=0.08, limit=0.07),
        _change(3 * H, "reduced", "flatten", "peak_to_trough", drawdown=0.16, limit=0.15),
        _change(5 * H, "flatten", "normal", "recovered"),
        _change(6 * H, "normal", "reducing", "loss_streak", consecutive_losses=4),
    ]
    report = breaker_report(history, end_ts=10 * H)
    assert [(t["rule"], t["to"], t["ts"]) for t in report["trips"]] == [
        ("reduce_size", "reduced", 1 * H),
        ("peak_to_trough", "flatten", 3 * H),
        ("loss_streak", "reducing", 6 * H),
    ]
    assert report["trips"][1]["drawdown"] == 0.16
    assert report["trips"][1]["limit"] == 0.15
    assert [(s["state"], s["start"], s["end"]) for s in report["spans"]] == [
        ("reduced", 1 * H, 3 * H),
        ("flatten", 3 * H, 5 * H),
        ("reducing", 6 * H, 10 * H),
    ]
    spans = [TradingSpan.from_dict(s) for s in report["spans"]]
    assert time_by_state(spans) == {
        "reduced": 2 * H,
        "flatten": 2 * H,
        "reducing": 4 * H,
    }


def test_buy_and_hold_averages_the_pairs_without_look_ahead() -> None:
    """Each pair's close at or before each time, rebased to 1, averaged, times the balance."""
    ts = np.array([0, 10, 20, 25], dtype=np.int64)
    prices = {
        "A": (np.array([0, 10, 20]), np.array([100.0, 110.0, 120.0])),
        "B": (np.array([0, 20]), np.array([10.0, 5.0])),
    }
    result = BacktestResult(
        strategy={}, pairs=("A", "B"), timeframe="1m", starting_balance=1_000.0,
        ts=ts, equity=np.full(4, 1_000.0), table={}, final_equity=1_000.0, fees=0.0,
        candles=4, prices=prices,
    )  # fmt: skip
    line = buy_and_hold(result, ts)
    assert line is not None
    np.testing.assert_allclose(line, [1_000.0, 1_050.0, 850.0, 850.0])


def test_a_backtest_that_trips_the_drawdown_breaker_says_so(tmp_path: Path) -> None:
    """The summary JSON lists the flatten trip and its span; the HTML report shows both."""
    report = tmp_path / "report.html"
    summary = run_cli(
        tmp_path,
        "--mode", "backtest", "--pairs", "BTC/USDT", "--timeframe", "1m",
        "--report-html", str(report),
        env={
            "KESTREL_RISK__MAX_DRAWDOWN": "0.0015",
            "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.0008",
        },
    )  # fmt: skip
    trips = summary["breaker_trips"]
    flatten = [t for t in trips if t["rule"] == "peak_to_trough"]
    assert len(flatten) == 1
    trip = flatten[0]
    assert trip["to"] == "flatten"
    assert trip["drawdown"] >= trip["limit"] == 0.0015
    assert trip["equity"] < trip["peak_equity"]
    assert summary["first_ts"] <= trip["ts"] <= summary["last_ts"]
    halted = [s for s in summary["trading_spans"] if s["state"] == "flatten"]
    assert len(halted) == 1
    # Latched until a manual resume: the span runs from the trip to the end of the run.
    assert (halted[0]["start"], halted[0]["end"]) == (trip["ts"], summary["last_ts"])
    assert not [t for t in summary["trades"] if t["entry_ts"] > trip["ts"]]

    page = report.read_text()
    section = page[page.index('id="breakers"') :]
    assert f"Circuit breakers ({len(trips)} trips)" in page
    assert "peak_to_trough" in section
    assert "manual resume required" in section
    assert "flatten" in section
    shaded = re.findall(r'<rect [^>]*class="span"><title>([^<]*)</title>', page)
    assert len(shaded) == len(summary["trading_spans"])
    assert any(t.startswith("flatten by peak_to_trough") for t in shaded)
    assert "vs buy-and-hold" in page
