"""`--mode optimize` entry: data selection, the JSON result, the printed table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from config import Settings, load_settings
from data_manager import export_csv
from error_handler import ConfigError, DataError
from parameter_optimization import run_optimize_cli
from tests.test_optimization_support import sample_frame
from utils.utilities import parse_timerange


def _settings(**optimization: Any) -> Settings:
    return load_settings(
        env_file=None,
        optimization={
            "population": 6,
            "generations": 2,
            "workers": 1,
            "method": "genetic",
            **optimization,
        },
    )


def _args(**values: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "strategy": "sma_cross",
        "pairs": "BTC/USDT",
        "timeframe": "1m",
        "data": None,
        "timerange": None,
        "summary_json": None,
    }
    base.update(values)
    return argparse.Namespace(**base)


def _written(settings: Settings, stem: str) -> list[Path]:
    return sorted((settings.storage.data_dir / "optimize").glob(f"{stem}-*.json"))


async def test_cli_writes_ranked_results_and_walk_forward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sample run writes one JSON result (and --summary-json) and prints the ranking."""
    settings = _settings()
    summary = tmp_path / "out" / "summary.json"
    code = await run_optimize_cli(_args(summary_json=summary), settings)
    assert code == 0
    (path,) = _written(settings, "sma_cross")
    assert path.read_text() == summary.read_text()
    doc = json.loads(path.read_text())
    assert (doc["strategy"], doc["pairs"], doc["timeframe"]) == ("sma_cross", ["BTC/USDT"], "1m")
    assert doc["data"]["BTC/USDT"]["candles"] == 1440
    assert doc["options"]["population"] == 6
    assert doc["stopped"] == "completed"
    board = doc["search"]["leaderboard"]
    assert doc["best"] == board[0]
    assert all(e["params"]["fast"] < e["params"]["slow"] for e in board)
    objectives = [e["objective"] for e in board if e["status"] == "ok"]
    assert objectives == sorted(objectives, reverse=True)
    windows = doc["walk_forward"]["windows"]
    assert len(windows) == 4
    for w in windows:
        assert w["rows"]["train"][1] <= w["rows"]["test"][0]
        assert w["out_of_sample"] is not None
    printed = capsys.readouterr().out
    assert "sma_cross: best" in printed
    assert "walk-forward" in printed
    assert str(path.name) in printed.replace("\n", "")


async def test_cli_starts_from_the_configured_parameters() -> None:
    """KESTREL_STRATEGY__PARAMS are a candidate of generation 0."""
    settings = load_settings(
        env_file=None,
        optimization={"population": 4, "generations": 1, "workers": 1, "method": "genetic"},
        strategy={"name": "sma_cross", "params": {"fast": 7, "slow": 33}},
    )
    args = _args(strategy=None, pairs=None, timeframe=None)
    assert await run_optimize_cli(args, settings) == 0
    (path,) = _written(settings, "sma_cross")
    doc = json.loads(path.read_text())
    tried = [e["params"] for e in doc["search"]["leaderboard"]]
    assert {"fast": 7.0, "slow": 33.0} in tried


async def test_cli_reads_a_data_file_within_the_timerange(tmp_path: Path) -> None:
    """--data and --timerange choose the candles optimised on."""
    data = export_csv(sample_frame(), tmp_path / "btc.csv")
    timerange = "20221213T0600-20221213T1800"
    start, end = parse_timerange(timerange)
    assert end is not None
    settings = _settings()
    assert await run_optimize_cli(_args(data=data, timerange=timerange), settings) == 0
    (path,) = _written(settings, "sma_cross")
    info = json.loads(path.read_text())["data"]["BTC/USDT"]
    assert info["source"] == str(data)
    assert (info["first_ts"], info["last_ts"]) == (start, end - 60_000)
    assert info["candles"] == 720


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"data": Path("x.csv"), "pairs": "BTC/USDT,ETH/USDT"}, ConfigError),
        ({"strategy": "no_such_strategy"}, ConfigError),
        ({"timerange": "2019"}, ConfigError),
        ({"timerange": "20300101-"}, DataError),
        ({"pairs": "DOGE/JPY"}, DataError),
    ],
)
async def test_cli_refuses_bad_input(values: dict[str, Any], error: type[Exception]) -> None:
    """Bad strategy, pairs, timeranges or data fail before any search, with our errors."""
    settings = _settings()
    with pytest.raises(error):
        await run_optimize_cli(_args(**values), settings)
    assert _written(settings, "sma_cross") == []


BROKEN_STRATEGY = """
from strategy import Param, Strategy


class Broken(Strategy):
    name = "broken"
    parameters = {"period": Param(10, 2, 50)}

    def populate(self, df):
        raise RuntimeError("indicator blew up")
"""


async def test_cli_exits_1_when_no_candidate_can_be_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A strategy file whose every backtest fails gives exit 1, the errors in JSON and on screen."""
    path = tmp_path / "broken_strategy.py"
    path.write_text(BROKEN_STRATEGY)
    settings = _settings()
    assert await run_optimize_cli(_args(strategy=str(path)), settings) == 1
    (written,) = _written(settings, "broken_strategy")
    doc = json.loads(written.read_text())
    assert doc["best"] is None
    assert doc["search"]["failed"] == doc["search"]["evaluated"] > 0
    assert doc["search"]["errors"] == ["RuntimeError: indicator blew up"]
    printed = capsys.readouterr().out
    assert "no feasible candidate" in printed
    assert "indicator blew up" in printed
