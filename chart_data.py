"""The price chart of one pair for the operator's views: candles, overlays, trade marks.

Part of `pipeline` (the engine's `chart` answers with `chart_body`). Pure functions over a
candle frame, the strategy's `populate` columns and the pair's trades and position, so the
web view draws what the strategy saw, without recomputing anything itself.

The body is JSON-ready: times in ms UTC (candle open times), prices as floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd

from models import ClosedTrade, Position, PositionSide


CHART_LIMIT: Final = 500  # candles one chart request returns at most
_OVERLAYS: Final = 4  # indicator lines drawn at most
_SIGNAL_PREFIXES: Final = ("enter_", "exit_")


def _price_like(column: np.ndarray, close: np.ndarray) -> bool:
    # An indicator drawn over the candles (a moving average, a band) sits at the price's
    # scale; oscillators (RSI, a z-score) and signal flags do not.
    finite = column[np.isfinite(column)]
    if len(finite) < 2:
        return False
    ratio = float(np.median(finite)) / float(np.median(close))
    return 0.8 <= ratio <= 1.25


def overlays(
    frame: pd.DataFrame, populate: Callable[[pd.DataFrame], pd.DataFrame] | None
) -> dict[str, list[list[float]]]:
    """Return the strategy's price-scale indicator columns as {name: [[ts, value], ...]}.

    `populate` is the strategy's own; a failure there leaves the chart without overlays
    rather than without candles.
    """
    if populate is None or frame.empty:
        return {}
    try:
        columns = populate(frame)
    except Exception:  # the chart is a view: a strategy bug must not break it
        return {}
    ts = frame.index.as_unit("ms").asi8
    close = frame["close"].to_numpy(dtype=np.float64)
    out: dict[str, list[list[float]]] = {}
    for name in columns.columns:
        if len(out) >= _OVERLAYS or str(name).startswith(_SIGNAL_PREFIXES):
            continue
        if name in frame.columns or columns[name].dtype.kind not in "fi":
            continue
        values = columns[name].to_numpy(dtype=np.float64)
        if len(values) != len(ts) or not _price_like(values, close):
            continue
        keep = np.isfinite(values)
        out[str(name)] = [[int(t), float(v)] for t, v in zip(ts[keep], values[keep], strict=True)]
    return out


def trade_marks(
    trades: Sequence[ClosedTrade], position: Position | None, start_ms: int, step_ms: int
) -> list[dict[str, Any]]:
    """Return entry, exit and stop marks inside the chart, oldest first.

    Each is {ts (the candle holding it), price, kind ("entry" | "exit" | "stop"), side,
    text}. A trade's exit by its stop is a "stop" mark; the open position adds its entry.
    """
    marks: list[dict[str, Any]] = []

    def at(ts: int) -> int:
        return ts - (ts - start_ms) % step_ms if step_ms > 0 else ts

    for trade in trades:
        if trade.entry_ts >= start_ms:
            marks.append(
                {
                    "ts": at(trade.entry_ts),
                    "price": trade.entry_price,
                    "kind": "entry",
                    "side": str(trade.side),
                    "text": f"{'buy' if trade.side is PositionSide.LONG else 'sell'} "
                    f"{trade.entry_price:.6g}",
                }
            )
        if trade.exit_ts >= start_ms:
            stopped = "stop" in trade.reason
            marks.append(
                {
                    "ts": at(trade.exit_ts),
                    "price": trade.exit_price,
                    "kind": "stop" if stopped else "exit",
                    "side": str(trade.side),
                    # The reason may name the order (a stop's client id): keep what it was.
                    "text": f"{'stop' if stopped else 'exit'} {trade.pnl:+.2f}",
                }
            )
    if position is not None and position.ts_opened >= start_ms:
        marks.append(
            {
                "ts": at(position.ts_opened),
                "price": float(position.entry_price),
                "kind": "entry",
                "side": str(position.side),
                "text": f"open {float(position.entry_price):.6g}",
            }
        )
    marks.sort(key=lambda m: m["ts"])
    return marks


def chart_body(
    pair: str,
    timeframe: str,
    step_ms: int,
    frame: pd.DataFrame,
    *,
    populate: Callable[[pd.DataFrame], pd.DataFrame] | None,
    trades: Sequence[ClosedTrade],
    position: Position | None,
    limit: int = CHART_LIMIT,
) -> dict[str, Any]:
    """Return the `/api/chart` body: the last `limit` candles, overlays, marks, position.

    Overlays are computed on the whole window (indicators need their warm-up) and cut to
    the candles shown.
    """
    limit = max(1, min(limit, CHART_LIMIT))
    lines = overlays(frame, populate)
    shown = frame.iloc[-limit:]
    ts = shown.index.as_unit("ms").asi8
    values = shown[["open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
    candles = [[int(t), *map(float, row)] for t, row in zip(ts, values, strict=True)]
    start = int(ts[0]) if len(ts) else 0
    for name, points in lines.items():
        lines[name] = [p for p in points if p[0] >= start]
    open_position = None
    if position is not None:
        open_position = {
            "side": str(position.side),
            "qty": float(position.qty),
            "entry_price": float(position.entry_price),
            "stop_price": None if position.stop_price is None else float(position.stop_price),
            "take_profit": None if position.take_profit is None else float(position.take_profit),
            "unrealised_pnl": float(position.unrealised_pnl),
        }
    marks: list[dict[str, Any]] = []
    if len(ts):
        marks = trade_marks([t for t in trades if t.pair == pair], position, start, step_ms)
        # A fill inside the candle still forming belongs on the last candle drawn.
        for mark in marks:
            mark["ts"] = min(mark["ts"], int(ts[-1]))
    return {
        "pair": pair,
        "timeframe": timeframe,
        "candles": candles,
        "overlays": lines,
        "marks": marks,
        "position": open_position,
    }
