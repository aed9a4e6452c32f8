"""The typed run summary: the values readers use are the document the CLI writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from run_summary import BreakerTrip, RunSummary, StrategyRef, StrategySection, TradingSpan
from tests.test_backtest_support import cli_args, run_cli


# A drawdown breaker that trips on the sample, so trips and spans are in the document too.
BREAKER_ENV = {
    "KESTREL_RISK__MAX_DRAWDOWN": "0.0015",
    "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.0008",
}
CLI = ("--mode", "backtest", "--pairs", "BTC/USDT", "--timeframe", "1m")


def _json(document: dict[str, Any]) -> str:
    # As main.write_summary serialises it.
    return json.dumps(document, indent=2, default=str, sort_keys=True)


async def test_the_typed_summary_is_the_json_the_cli_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay backtest's RunSummary serialises to the CLI's file and reads back from it."""
    import main
    from config import load_settings
    from runner import run_backtest

    (tmp_path / "cli").mkdir()
    written = run_cli(tmp_path / "cli", *CLI, env=BREAKER_ENV)
    for key, value in BREAKER_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(tmp_path / "logs"))
    args = cli_args(*CLI)
    typed = await run_backtest(args, main._apply_cli(load_settings(env_file=None), args))

    ours = json.loads(_json(typed.to_dict()))
    # The phase timings are wall-clock seconds: the same phases, not the same numbers.
    assert set(ours.pop("timings")) == set(written.pop("timings"))
    assert ours == written
    assert typed.breaker_trips
    assert typed.trading_spans
    assert typed.trades
    # Read back from the file, the summary writes the file byte for byte.
    written_text = (tmp_path / "cli" / "out.json").read_text()
    assert _json(RunSummary.from_dict(json.loads(written_text)).to_dict()) == written_text
    # Attribute access reads what the document says.
    assert typed.n_trades == written["n_trades"] == len(written["trades"])
    assert typed.total_return == written["total_return"]
    assert typed.breaker_trips[0].to_state == written["breaker_trips"][0]["to"]
    assert typed.trading_spans[-1].end == written["trading_spans"][-1]["end"]
    assert typed.dropped_candles == written["dropped_candles"] == 0


def test_the_optional_sections_appear_only_when_set() -> None:
    """Strategies, timings, dropped candles and a restart are keys only when the run has them."""
    bare = RunSummary(
        mode="sim", strategy=StrategyRef("rl", {}, {"policy": "p", "loaded": True}),
        pairs=("A/USDT",), timeframe="1m", candles=3, first_ts=None, last_ts=None, signals=0,
        vetoes=0, rejections=0, starting_balance=0.0, final_equity=0.0, max_drawdown=0.0,
        fees=0.0, funding=0.0, funding_settlements=0, realised_pnl=0,
    )  # fmt: skip
    document = bare.to_dict()
    assert not {"strategies", "timings", "dropped_candles", "restart_as"} & set(document)
    assert document["strategy"] == {"name": "rl", "params": {}, "policy": "p", "loaded": True}
    assert document["total_return"] == 0.0  # no balance: no division
    section = StrategySection(
        name="ema_cross", pairs=("A/USDT",), tag="e", weight=0.5, sleeve_equity=50.0, nav=1.0,
        probation=True, n_trades=0, realised_pnl=0, fees=0, win_rate=0.0, open_positions=(),
        score=None, lcb=None,
    )  # fmt: skip
    trip = BreakerTrip(1, "normal", "reduced", "reduce_size", "why", None, {"limit": 0.07})
    span = TradingSpan("reduced", 1, 5, 4, "reduce_size", "why")
    full = dataclasses.replace(
        bare, first_ts=1, last_ts=5, starting_balance=100.0, final_equity=110.0,
        realised_pnl=10.0, breaker_trips=(trip,), trading_spans=(span,), strategies=(section,),
        timings={"run_s": 1.5}, dropped_candles=2, restart_as="live",
    )  # fmt: skip
    document = full.to_dict()
    assert document["strategies"][0]["realised_pnl"] == 0
    assert document["restart_as"] == "live"
    assert document["breaker_trips"] == [
        {"rule": "reduce_size", "ts": 1, "from": "normal", "to": "reduced", "reason": "why",
         "resume_at": None, "limit": 0.07}
    ]  # fmt: skip
    assert document["total_return"] == pytest.approx(0.1)
    assert RunSummary.from_dict(json.loads(_json(document))) == full
