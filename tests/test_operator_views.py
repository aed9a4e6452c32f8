"""What the operator's views add: pairs, ranking, model and anomalies, the engine's chart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console, RenderableType

from chart_data import chart_body
from models import ClosedTrade, PositionSide, Ranked
from status_view import render_snapshot, section_models, section_pairs, section_ranking
from tests.test_backtest_support import cli_args
from tests.test_ui_support import make_snapshot


def text(renderable: RenderableType, width: int = 100) -> str:
    """Return what `renderable` prints at `width` columns."""
    console = Console(width=width, record=True, file=None, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


MARKETS = {
    "BTC/USDT": {"last": 50_600.0, "change": 0.0123, "ts": 0.0},
    "ETH/USDT": {"last": 3_010.5, "change": -0.045, "ts": 0.0},
    "SOL/USDT": {"last": 101.25, "change": 0.0, "ts": 0.0},
}


def test_pairs_show_last_price_and_change_with_the_selection_marked() -> None:
    """Each pair has its last price and signed change; the selected pair carries the mark."""
    snap = make_snapshot(markets=MARKETS)
    shown = text(section_pairs(snap, "ETH/USDT"))
    assert "  BTC/USDT  50,600.00  +1.23%" in shown
    assert "▸ ETH/USDT   3,010.50  -4.50%" in shown
    assert "SOL/USDT" in shown
    assert "101.25" in shown
    # A short panel keeps the selected pair in view.
    window = text(section_pairs(snap, "SOL/USDT", limit=1))
    assert "SOL/USDT" in window
    assert "BTC/USDT" not in window


def test_pairs_without_prices_yet_show_dashes() -> None:
    """Before the first candle a pair has no price, shown as a dash, not a zero."""
    shown = text(section_pairs(make_snapshot(markets={}), "BTC/USDT"))
    assert "▸ BTC/USDT" in shown
    assert [line.split()[-2:] for line in shown.splitlines()[1:]] == [["-", "-"]] * 3


RANKING: list[dict[str, Any]] = [
    {"name": "trend", "total": 1.25, "lcb": 0.4, "trades": 31},
    {"name": "meanrev", "total": 0.5, "lcb": -0.2, "trades": 12},
]


@pytest.mark.parametrize("where", ["risk", "field"])
def test_ranking_shows_the_ranking_key_in_order(where: str) -> None:
    """The `ranking` status key is listed best first with score, lower bound and trades,
    whether the snapshot carries it as a field or in its risk figures."""
    snap = make_snapshot(risk={"ranking": RANKING})
    if where == "field":
        ranked = tuple(
            Ranked(r["name"], r["lcb"], 0.0, 10.0, r["total"], r["trades"]) for r in RANKING
        )
        snap = make_snapshot(ranking=ranked)
    shown = text(section_ranking(snap))
    lines = [line for line in shown.splitlines() if line.strip()]
    assert lines[0].split() == ["strategy", "score", "lcb", "trades"]
    assert lines[1].split() == ["trend", "1.25", "0.40", "31"]
    assert lines[2].split() == ["meanrev", "0.50", "-0.20", "12"]


def test_ranking_falls_back_to_scores_then_says_none_yet() -> None:
    """Without a ranking the strategy scores stand in; without either, "none yet"."""
    assert "trend" in text(section_ranking(make_snapshot()))
    assert text(section_ranking(make_snapshot(scores={}))).strip() == "none yet"


def test_model_and_anomalies_say_none_yet_until_they_exist() -> None:
    """An empty model and no anomalies read "none yet" twice."""
    shown = text(section_models(make_snapshot(model={})))
    assert shown.count("none yet") == 2


@pytest.mark.parametrize(
    "anomalies",
    [
        [{"pair": "SOL/USDT", "kind": "volume_spike", "reason": "volume 9.1 sd"}],
        {"SOL/USDT": {"kind": "volume_spike", "reason": "volume 9.1 sd"}},
    ],
)
def test_model_state_and_anomalies_are_listed(anomalies: object) -> None:
    """Model entries (aliases, versions) and each anomaly with its pair and reason show."""
    snap = make_snapshot(
        model={"champion": {"name": "direction", "version": 3}, "challenger": "v4"},
        risk={"anomalies": anomalies},
    )
    shown = text(section_models(snap))
    assert "champion" in shown
    assert "version=3" in shown
    assert "challenger" in shown
    assert "SOL/USDT" in shown
    assert "volume_spike" in shown
    assert "none yet" not in shown


def test_the_status_print_has_every_new_section() -> None:
    """`--no-ui` status prints carry pairs, ranking and model panels too."""
    shown = text(render_snapshot(make_snapshot(markets=MARKETS)), width=140)
    for title in ("Pairs", "Ranking", "Model & anomalies", "50,600.00", "+1.23%"):
        assert title in shown


async def test_the_engine_charts_what_it_traded(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a replay the engine's chart holds the window's last candles, the strategy's
    EMAs and a mark on a candle for every entry and exit inside it; the snapshot's market
    figures are the last close and its change."""
    import main
    from config import load_settings
    from runner import Daemon

    for key in ("KESTREL_RISK__PROFILE", "KESTREL_STRATEGY__NAME"):
        monkeypatch.delenv(key, raising=False)
    args = cli_args("--mode", "sim", "--feed", "replay", "--pairs", "BTC/USDT")
    daemon = Daemon(args, main._apply_cli(load_settings(env_file=None), args))
    daemon.build_replay()
    summary = (await daemon.run()).to_dict()
    engine = daemon.engine
    assert engine is not None
    assert summary["n_trades"] > 0

    chart = engine.chart("BTC/USDT", 200)
    frame = daemon.frames["BTC/USDT"]
    closes = frame["close"].to_numpy()
    assert len(chart["candles"]) == 200
    assert chart["candles"][-1][0] == engine.last_candle_ts["BTC/USDT"]
    assert chart["candles"][-1][4] == closes[-1]
    assert sorted(chart["overlays"]) == ["ema_fast", "ema_slow"]
    start = chart["candles"][0][0]
    times = {c[0] for c in chart["candles"]}
    inside = [t for t in summary["trades"] if t["exit_ts"] >= start]
    marks = chart["marks"]
    assert {m["ts"] for m in marks} <= times
    exits = [m for m in marks if m["kind"] in ("exit", "stop")]
    assert len(exits) == len(inside)
    assert [m["price"] for m in exits] == [t["exit_price"] for t in inside]

    market = engine.snapshot().markets["BTC/USDT"]
    assert market["last"] == closes[-1]
    day_ago = closes[-min(len(engine.data.arrays("BTC/USDT", "1m").close), 1441)]
    assert market["change"] == pytest.approx(closes[-1] / day_ago - 1)


def _frame(closes: list[float]) -> pd.DataFrame:
    index = pd.to_datetime([60_000 * i for i in range(len(closes))], unit="ms", utc=True)
    c = np.asarray(closes, dtype=np.float64)
    return pd.DataFrame(
        {"open": c, "high": c + 1, "low": c - 1, "close": c, "volume": np.ones(len(c))},
        index=index,
    )


def test_chart_keeps_price_scale_overlays_and_marks_on_drawn_candles() -> None:
    """Moving averages are drawn, an oscillator and the signal flags are not; a mark past the
    last candle sits on it; marks before the window are left out."""
    frame = _frame([100.0 + (i % 7) for i in range(50)])

    def populate(df: pd.DataFrame) -> pd.DataFrame:
        close = df["close"]
        return pd.DataFrame(
            {
                "enter_long": close > 103,
                "sma": close.rolling(5).mean(),
                "rsi_like": close / close.max() * 100 - 50,
            },
            index=df.index,
        )

    late = ClosedTrade("X/Y", PositionSide.LONG, 40 * 60_000, 50 * 60_000, 1.0, 2.0, 1.0, 0.0,
                       1.0, "signal")  # fmt: skip
    early = ClosedTrade("X/Y", PositionSide.LONG, 0, 60_000, 1.0, 2.0, 1.0, 0.0, 1.0, "stop")
    body = chart_body("X/Y", "1m", 60_000, frame, populate=populate, trades=[early, late],
                      position=None, limit=20)  # fmt: skip
    assert len(body["candles"]) == 20
    assert list(body["overlays"]) == ["sma"]
    assert body["overlays"]["sma"][0][0] == body["candles"][0][0]
    assert [(m["kind"], m["ts"]) for m in body["marks"]] == [
        ("entry", 40 * 60_000),
        ("exit", 49 * 60_000),
    ]


def test_chart_of_a_pair_without_candles_is_empty() -> None:
    """Before its first candle a pair's chart has no candles, overlays or marks."""
    body = chart_body("X/Y", "1m", 60_000, _frame([]), populate=None, trades=[], position=None)
    assert (body["candles"], body["overlays"], body["marks"]) == ([], {}, [])
