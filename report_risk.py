"""What the backtest report says about risk: breaker trips, halted spans, buy-and-hold.

Part of `analytics` (which imports it). `buy_and_hold` is the benchmark line drawn beside
the equity curve; `span_bands` shades the stretches the circuit breakers held trading off
the normal rung; `breaker_table_html` and `breaker_table_rich` list every trip with the
numbers that tripped it, so a flat equity curve explains itself.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from run_summary import BreakerTrip, TradingSpan
from utils.utilities import ms_to_datetime


if TYPE_CHECKING:
    from rich.table import Table

    from fast_path import BacktestResult


# Shading per rung: the more severe, the stronger.
STATE_COLOURS: Final = {
    "reduced": "#d4a72c",
    "reducing": "#e16f24",
    "halted": "#cf222e",
    "flatten": "#8250df",
}
BENCHMARK_COLOUR: Final = "#8c959f"


def _when(ts: int) -> str:
    return ms_to_datetime(int(ts)).strftime("%Y-%m-%d %H:%M")


def _duration(ms: int) -> str:
    minutes = ms // 60_000
    days, rest = divmod(minutes, 1_440)
    hours, minutes = divmod(rest, 60)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes:02d}m"


def buy_and_hold(result: BacktestResult, ts: np.ndarray) -> np.ndarray | None:
    """Return the equity of holding every pair equally from the first equity point.

    Each pair's close is taken at or before each time in `ts` (no look-ahead), divided by
    its close at the start, averaged over the pairs and scaled to the starting balance.
    None when the result carries no prices or `ts` is empty.
    """
    if not result.prices or len(ts) == 0:
        return None
    legs = []
    for price_ts, close in result.prices.values():
        price_ts = np.asarray(price_ts, dtype=np.int64)
        close = np.asarray(close, dtype=np.float64)
        if len(close) == 0:
            continue
        at = np.clip(np.searchsorted(price_ts, ts, side="right") - 1, 0, len(close) - 1)
        series = close[at]
        base = series[0]
        if not np.isfinite(base) or base <= 0:
            continue
        legs.append(series / base)
    if not legs:
        return None
    return np.asarray(result.starting_balance * np.mean(legs, axis=0), dtype=np.float64)


def span_bands(spans: Sequence[TradingSpan]) -> list[tuple[float, float, str, str]]:
    """Return each span off the normal rung as (start, end, colour, tooltip) for shading."""
    out = []
    for span in spans:
        colour = STATE_COLOURS.get(span.state, "#cf222e")
        tip = (
            f"{span.state} by {span.rule} from {_when(span.start)} for "
            f"{_duration(span.duration_ms)}: {span.reason}"
        )
        out.append((float(span.start), float(span.end), colour, tip))
    return out


def time_by_state(spans: Sequence[TradingSpan]) -> dict[str, int]:
    """Return the total milliseconds spent on each rung other than normal."""
    out: dict[str, int] = {}
    for span in spans:
        out[span.state] = out.get(span.state, 0) + span.duration_ms
    return out


def _number(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return f"{float(value):.2%}" if kind == "pct" else f"{float(value):,.2f}"


def trip_rows(trips: Sequence[BreakerTrip]) -> list[list[str]]:
    """Return one row per trip: time, rule, rung change, drawdown, day loss, streak, equity."""
    rows = []
    for t in trips:
        # The figures each rule recorded (`BreakerTrip.numbers`); a rule records its own.
        figures = t.numbers
        rows.append(
            [
                _when(t.ts),
                t.rule,
                t.to_state,
                _number(figures.get("drawdown"), "pct"),
                _number(figures.get("day_loss"), "pct"),
                str(figures.get("consecutive_losses", "-")),
                _number(figures.get("limit"), "pct" if t.rule != "loss_streak" else "num"),
                _number(figures.get("equity"), "num"),
                _number(figures.get("peak_equity"), "num"),
            ]
        )
    return rows


_TRIP_HEADER: Final = (
    "time (UTC)",
    "rule",
    "to rung",
    "drawdown",
    "day loss",
    "streak",
    "limit",
    "equity",
    "peak",
)
_LEFT: Final = frozenset(_TRIP_HEADER[:3])


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def breaker_table_html(result: BacktestResult, limit: int = 500) -> str:
    """Return the report's circuit-breaker section: trips, spans and time on each rung."""
    trips, spans = result.breaker_trips, result.trading_spans
    parts = [f'<h2 id="breakers">Circuit breakers ({len(trips)} trips)</h2>']
    if not trips and not spans:
        parts.append("<p>No breaker tripped: trading stayed on the normal rung throughout.</p>")
        return "\n".join(parts)
    totals = time_by_state(spans)
    if totals:
        said = ", ".join(f"{state} {_duration(ms)}" for state, ms in totals.items())
        parts.append(f"<p>Time off the normal rung: {html.escape(said)}.</p>")
    parts.append(_html_table(_TRIP_HEADER, trip_rows(trips[:limit])))
    span_rows = [
        [
            s.state,
            _when(s.start),
            _when(s.end),
            _duration(s.duration_ms),
            s.rule,
            s.reason,
        ]
        for s in spans[:limit]
    ]
    parts += [
        "<h3>Spans off the normal rung</h3>",
        _html_table(("rung", "from", "to", "for", "rule", "reason"), span_rows),
    ]
    return "\n".join(parts)


def breaker_table_rich(result: BacktestResult, limit: int = 20) -> Table | None:
    """Return the Rich table of breaker trips (the last `limit`), or None when none tripped."""
    from rich.table import Table

    trips, spans = result.breaker_trips, result.trading_spans
    if not trips:
        return None
    totals = time_by_state(spans)
    table = Table(title=f"Circuit breakers: {len(trips)} trips")
    for column in _TRIP_HEADER:
        table.add_column(column, justify="left" if column in _LEFT else "right", no_wrap=True)
    for row in trip_rows(trips[-limit:]):
        table.add_row(*row)
    if totals:
        table.caption = "time off normal: " + ", ".join(
            f"{state} {_duration(ms)}" for state, ms in totals.items()
        )
    return table
