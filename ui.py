"""The operator's windows on the bot: a terminal dashboard, a Rich status print, a web view.

Three read-only views over one façade (`models.Control` + `models.Snapshot`); the only
writes are the operator commands the façade offers.

- `render_snapshot(snapshot)` returns a plain Rich renderable of the whole state, for
  `--no-ui` status prints. Its sections (`section_equity`, `section_depth`, ...) are the
  same renderables the dashboard shows, so the two never disagree.
- `Dashboard` is a Textual app run inside the bot's own event loop (`await
  dashboard.run_async()`); it polls `control.snapshot()` `refresh_hz` times a second and
  re-renders only the panels whose inputs changed, at most two per frame, so the loop is
  never held for a whole-screen repaint. Keys: left/right (or tab/shift+tab)
  switch the depth chart's pair, `p` pauses or resumes, `r` resets latched circuit
  breakers after a confirmation, `s` toggles sim/live after a
  confirmation (only when API keys are configured), `q` quits. By default `q` also asks
  the bot to stop gracefully (`control.stop`), because the dashboard is the daemon's
  foreground; pass `quit_stops_bot=False` to only close the window.
- `WebView` is an aiohttp server on 127.0.0.1 behind a token, with a JSON API of the same
  state and one page drawing live equity and depth charts on `<canvas>` (no CDN).

JSON encoding (`to_jsonable`): `Decimal` values become strings (exact, `str(Decimal)`),
`float` values stay JSON numbers (NaN and infinities become `null`), enums become their
string values, timestamps stay integer milliseconds UTC, tuples become arrays.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from functools import partial
from typing import Any, ClassVar, Final

import structlog
from aiohttp import web
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, Footer, Label, Static

from config import UISettings
from error_handler import ConfigError
from models import BotState, Control, OrderBook, PositionSide, Snapshot, TradingState
from utils.utilities import register_secret


log = structlog.get_logger(__name__)

SwitchMode = Callable[[str], Awaitable[None]]
"""`await switch_mode("live" | "sim")`: rebuild the exchange side in the other mode."""

_SPARK: Final = "▁▂▃▄▅▆▇█"
_LADDER: Final = tuple(TradingState)
_LADDER_STYLE: Final = {
    TradingState.NORMAL: "bold black on green",
    TradingState.REDUCED: "bold black on yellow",
    TradingState.REDUCING: "bold black on dark_orange",
    TradingState.HALTED: "bold white on red",
    TradingState.FLATTEN: "bold white on magenta",
}
_BREAKER_STYLE: Final = {"closed": "green", "half_open": "yellow", "open": "bold red"}
NO_KEYS_REASON: Final = (
    "live trading needs API keys: set KESTREL_EXCHANGE__API_KEY and KESTREL_EXCHANGE__API_SECRET"
)


# -- Formatting ------------------------------------------------------------------------------


def _num(value: Decimal | float | None, places: int = 2) -> str:
    if value is None:
        return "-"
    number = float(value)
    if not math.isfinite(number):
        return "-"
    return f"{number:,.{places}f}"


def _places(price: Decimal | float) -> int:
    number = abs(float(price))
    return 2 if number >= 100 else 4 if number >= 1 else 6


def _price(value: Decimal | float | None, places: int | None = None) -> str:
    if value is None:
        return "-"
    return _num(value, _places(value) if places is None else places)


def _qty(value: Decimal | float) -> str:
    number = abs(float(value))
    places = 0 if number >= 10_000 else 3 if number >= 1 else 5
    return _num(value, places)


def _signed(value: Decimal | float, places: int = 2, suffix: str = "") -> Text:
    number = float(value)
    style = "green" if number > 0 else "red" if number < 0 else ""
    return Text(f"{number:+,.{places}f}{suffix}", style=style)


def _clock(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%H:%M:%S")


def _bar(fraction: float, width: int) -> str:
    filled = max(0.0, min(1.0, fraction)) * width
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def sparkline_text(values: Sequence[float], width: int, rows: int = 1) -> str:
    """Return `values` as block characters, `rows` lines high, resampled to `width` cells.

    Longer series keep the last value of each bucket (a close), so the final column is
    always the latest value. Non-finite values are dropped. The lowest value still shows
    one eighth of a cell, so the line never vanishes; a flat series sits at half height.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite or width <= 0 or rows <= 0:
        return ""
    n = len(finite)
    if n > width:
        finite = [finite[(i + 1) * n // width - 1] for i in range(width)]
    steps = rows * len(_SPARK)
    low, high = min(finite), max(finite)
    if high == low:
        heights = [steps // 2] * len(finite)
    else:
        heights = [1 + round((v - low) / (high - low) * (steps - 1)) for v in finite]
    lines = []
    for row in range(rows - 1, -1, -1):  # top line first
        cells = (min(len(_SPARK), h - row * len(_SPARK)) for h in heights)
        lines.append("".join(_SPARK[c - 1] if c > 0 else " " for c in cells))
    return "\n".join(lines)


class Sparkline:
    """Render a series as block characters filling the width (and `rows` lines) it gets."""

    def __init__(self, values: Sequence[float], *, rows: int = 1, style: str = "cyan") -> None:
        self.values = values
        self.rows = rows
        self.style = style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(sparkline_text(self.values, options.max_width, self.rows), style=self.style)


class _WithChart:
    # A head renderable, then a sparkline taking every line left of the height it is given
    # (Textual gives a panel's height; a plain console print gets one line).
    def __init__(self, head: RenderableType, values: Sequence[float]) -> None:
        self.head = head
        self.values = values

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.head, options.update(height=None), pad=False)
        for line in lines:
            yield from line
            yield Segment.line()
        rows = max(1, options.height - len(lines)) if options.height else 1
        yield Sparkline(self.values, rows=rows)


def depth_levels(
    book: OrderBook, levels: int
) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """Return the best `levels` bids and asks as (price, qty, cumulative qty), best first."""

    def cumulate(side: Sequence[tuple[float, float]]) -> list[tuple[float, float, float]]:
        total = 0.0
        out = []
        for price, qty in side[:levels]:
            total += qty
            out.append((price, qty, total))
        return out

    return cumulate(book.bids), cumulate(book.asks)


class DepthChart:
    """Render cumulative bid/ask depth as horizontal bars: asks above the spread, bids below.

    The number of levels per side follows the height it is given (Textual passes the
    panel's height), else `levels`.
    """

    def __init__(self, book: OrderBook | None, *, levels: int = 8) -> None:
        self.book = book
        self.levels = levels

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.book is None or not (self.book.bids or self.book.asks):
            yield Text("no order book yet", style="dim")
            return
        levels = self.levels if options.height is None else max(1, (options.height - 1) // 2)
        bids, asks = depth_levels(self.book, levels)
        peak = max([c for _, _, c in bids + asks] or [1.0]) or 1.0
        places = _places(max(p for p, _, _ in bids + asks))  # one precision for the book
        rows = [(p, c, "red") for p, _, c in reversed(asks)]
        labels = [f"{_price(p, places):>12} {_qty(c):>10} " for p, c, _ in rows]
        bid_labels = [f"{_price(p, places):>12} {_qty(c):>10} " for p, _, c in bids]
        label_width = max(len(s) for s in labels + bid_labels)
        bar_width = max(1, options.max_width - label_width)
        for (_, cum, style), label in zip(rows, labels, strict=True):
            yield Text(label.rjust(label_width)) + Text(_bar(cum / peak, bar_width), style=style)
        best_bid, best_ask = self.book.best_bid, self.book.best_ask
        if best_bid is not None and best_ask is not None:
            mid = (best_bid + best_ask) / 2
            spread = (best_ask - best_bid) / mid * 1e4 if mid > 0 else 0.0
            middle = f" mid {_price(mid, places)} · spread {spread:.1f} bps "
        else:
            middle = " one-sided book "
        yield Text(middle.center(options.max_width, "─"), style="dim")
        for (_, _, cum), label in zip(bids, bid_labels, strict=True):
            yield Text(label.rjust(label_width)) + Text(_bar(cum / peak, bar_width), style="green")


# -- Sections (shared by the dashboard and render_snapshot) ----------------------------------


def pairs_of(snapshot: Snapshot) -> tuple[str, ...]:
    """Return the pairs a view can select: the snapshot's pairs, else those with a book."""
    return snapshot.pairs or tuple(sorted(snapshot.order_books))


def _unrealised(snapshot: Snapshot) -> Decimal:
    return sum((p.unrealised_pnl for p in snapshot.portfolio.positions), Decimal(0))


def section_status(snapshot: Snapshot, pair: str | None = None) -> RenderableType:
    """Return the one-line header: mode, bot state, trading state, pair and snapshot time."""
    mode_style = "bold white on red" if snapshot.mode == "live" else "bold white on blue"
    state_style = "green" if snapshot.state is BotState.RUNNING else "bold yellow"
    text = Text.assemble(
        ("KESTREL ", "bold"),
        (f" {snapshot.mode.upper()} ", mode_style),
        "  state ",
        (str(snapshot.state), state_style),
        "  trading ",
        (str(snapshot.trading_state), _LADDER_STYLE.get(snapshot.trading_state, "")),
        "  pair ",
        (pair or "-", "bold cyan"),
        f"  {_clock(snapshot.ts)} UTC",
    )
    return text


Cell = str | Text


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Cell]], align: str = "l") -> Text:
    # Fixed-width columns in a single Text, aligned per column by `align` ("l" or "r";
    # columns past its end are right-aligned). An order of magnitude cheaper to render
    # than rich.table.Table, which measures every cell on every render; the dashboard
    # redraws several times a second.
    lines = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    if header:
        lines.insert(0, [Text(h, style="dim") for h in header])
    if not lines:
        return Text()
    widths = [max(cell.cell_len for cell in column) for column in zip(*lines, strict=True)]
    out = Text(no_wrap=True, overflow="ellipsis")
    for r, line in enumerate(lines):
        if r:
            out.append("\n")
        for i, cell in enumerate(line):
            pad = " " * (widths[i] - cell.cell_len)
            if i:
                out.append("  ")
            if align[i : i + 1] == "l":
                out.append_text(cell)
                if i < len(line) - 1:
                    out.append(pad)
            else:
                out.append(pad)
                out.append_text(cell)
    return out


def _key(name: str) -> Text:
    return Text(name, style="dim")


def section_equity(snapshot: Snapshot) -> RenderableType:
    """Return equity, cash, PnL and a sparkline of the equity curve."""
    pf = snapshot.portfolio
    rows: list[list[Cell]] = [
        [_key("equity"), Text(_num(pf.equity), style="bold")],
        [_key("cash"), _num(pf.cash)],
        [_key("realised PnL"), _signed(pf.realised_pnl)],
        [_key("unrealised PnL"), _signed(_unrealised(snapshot))],
        [_key("fees"), _num(pf.fees)],
    ]
    curve = snapshot.equity_curve
    if curve:
        first = curve[0][1]
        change = float(pf.equity) - first
        pct = change / first * 100 if first else 0.0
        rows.append([_key("since start"), _signed(change) + Text(" ") + _signed(pct, 2, "%")])
    return _WithChart(_table(None, rows), [v for _, v in curve])


def section_positions(snapshot: Snapshot, limit: int | None = None) -> RenderableType:
    """Return the open positions, largest notional first, and the count of open orders.

    Args:
        snapshot: The state to show.
        limit: Show at most this many positions and say how many more there are.
    """
    positions = sorted(snapshot.portfolio.positions, key=lambda p: p.notional, reverse=True)
    if not positions:
        return Group(Text("no open positions", style="dim"), _orders_line(snapshot))
    shown = positions if limit is None else positions[: max(1, limit)]
    rows: list[list[Cell]] = [
        [
            p.pair,
            Text(str(p.side), style="green" if p.side is PositionSide.LONG else "red"),
            _qty(p.qty),
            _price(p.entry_price),
            _price(p.mark_price),
            _signed(p.unrealised_pnl),
            _price(p.stop_price),
        ]
        for p in shown
    ]
    header = ("pair", "side", "qty", "entry", "mark", "uPnL", "stop")
    parts: list[RenderableType] = [_table(header, rows, "ll")]
    if len(shown) < len(positions):
        parts.append(Text(f"+{len(positions) - len(shown)} more", style="dim"))
    parts.append(_orders_line(snapshot))
    return Group(*parts)


def _orders_line(snapshot: Snapshot) -> Text:
    return Text(f"open orders: {len(snapshot.open_orders)}", style="dim")


def section_trades(snapshot: Snapshot, limit: int = 12) -> RenderableType:
    """Return the most recent closed trades, newest first."""
    if not snapshot.recent_trades:
        return Text("no closed trades yet", style="dim")
    recent = sorted(snapshot.recent_trades, key=lambda t: t.exit_ts, reverse=True)
    rows: list[list[Cell]] = [
        [
            _clock(t.exit_ts),
            t.pair,
            str(t.side),
            _qty(t.qty),
            _price(t.entry_price),
            _price(t.exit_price),
            _signed(t.pnl),
        ]
        for t in recent[: max(1, limit)]
    ]
    return _table(("exit", "pair", "side", "qty", "entry", "exit px", "PnL"), rows, "lll")


def section_depth(snapshot: Snapshot, pair: str | None, levels: int = 8) -> RenderableType:
    """Return the cumulative depth chart of `pair`."""
    return DepthChart(snapshot.order_books.get(pair) if pair else None, levels=levels)


def max_drawdown(values: Sequence[float]) -> float:
    """Return the largest peak-to-trough fall of `values` as a fraction of the peak."""
    peak = -math.inf
    worst = 0.0
    for v in values:  # plain comparisons: this runs over the whole curve on each change
        if v > peak:
            peak = v
        elif peak > 0 and (peak - v) / peak > worst:
            worst = (peak - v) / peak
    return worst


def section_metrics(snapshot: Snapshot, pair: str | None = None) -> RenderableType:
    """Return trade statistics, strategy scores and the last decision on `pair`."""
    pnls = [t.pnl for t in snapshot.recent_trades]
    wins = [p for p in pnls if p > 0]
    losses = [p for p in pnls if p < 0]
    drawdown = max_drawdown([v for _, v in snapshot.equity_curve])
    stats: list[list[Cell]] = [
        [_key("trades"), str(len(pnls))],
        [_key("win rate"), f"{len(wins) / len(pnls) * 100:.1f}%" if pnls else "-"],
        [_key("total PnL"), _signed(sum(pnls))],
        [_key("profit factor"), f"{sum(wins) / -sum(losses):.2f}" if losses else "-"],
        [_key("max drawdown"), f"{drawdown * 100:.2f}%"],
    ]
    parts: list[RenderableType] = [_table(None, stats)]
    if snapshot.scores:
        top = max(abs(v) for v in snapshot.scores.values()) or 1.0
        ranked = sorted(snapshot.scores.items(), key=lambda kv: -kv[1])[:6]
        rows: list[list[Cell]] = [
            [name, f"{score:.3f}", Text(_bar(abs(score) / top, 10), style="cyan")]
            for name, score in ranked
        ]
        parts += [Text("scores", style="bold dim"), _table(None, rows, "lrl")]
    decision = snapshot.last_decisions.get(pair) if pair else None
    if decision is not None:
        line = Text.assemble(("last ", "dim"), (decision.pair, "cyan"), f" {decision.verdict}")
        if decision.signal is not None:
            s = decision.signal
            line.append(f" · {s.side} {s.strength:.2f} {s.reason}")
        parts.append(line)
    if snapshot.model:
        model = ", ".join(f"{k}={v}" for k, v in list(snapshot.model.items())[:4])
        parts.append(Text(f"model {model}", style="dim"))
    return Group(*parts)


def _ladder(current: TradingState) -> Text:
    text = Text()
    for i, state in enumerate(_LADDER):
        if i:
            text.append(" › ", style="dim")
        text.append(
            f" {state} " if state is current else str(state),
            style=_LADDER_STYLE[state] if state is current else "dim",
        )
    return text


def _exposure(snapshot: Snapshot) -> float:
    value = snapshot.risk.get("exposure")
    if isinstance(value, int | float | Decimal):
        return float(value)
    equity = snapshot.portfolio.equity
    notional = sum((p.notional for p in snapshot.portfolio.positions), Decimal(0))
    return float(notional / equity) if equity > 0 else 0.0


def section_risk(snapshot: Snapshot) -> RenderableType:
    """Return the trading-state ladder, exposure, circuit breakers and other risk figures.

    Reads `snapshot.risk`: `exposure` (fraction of equity; computed from positions when
    absent), `max_exposure`, `circuit_breakers` ({name: "closed" | "half_open" | "open"}),
    and shows any other key as-is.
    """
    risk = snapshot.risk
    exposure = _exposure(snapshot)
    limit = risk.get("max_exposure")
    cap = f" / {float(limit) * 100:.0f}%" if isinstance(limit, int | float | Decimal) else ""
    rows: list[list[Cell]] = [[_key("exposure"), f"{exposure * 100:.1f}%{cap}"]]
    breakers = risk.get("circuit_breakers")
    if isinstance(breakers, Mapping) and breakers:
        line = Text()
        for name, state in breakers.items():
            line.append(f"{name}:", style="dim").append(
                f"{state} ", style=_BREAKER_STYLE.get(str(state), "")
            )
        rows.append([_key("breakers"), line])
    for key, value in risk.items():
        if key not in ("exposure", "max_exposure", "circuit_breakers"):
            shown = _num(value, 4) if isinstance(value, float | Decimal) else str(value)
            rows.append([_key(str(key)), shown])
    return Group(_ladder(snapshot.trading_state), _table(None, rows, "ll"))


def section_system(snapshot: Snapshot) -> RenderableType:
    """Return the mode, bot state and the rate-limit budget (fractions shown as bars)."""
    rows: list[list[Cell]] = [
        [_key("mode"), Text(snapshot.mode, style="bold red" if snapshot.mode == "live" else "")],
        [_key("bot"), str(snapshot.state)],
    ]
    for name, value in snapshot.rate_limit_budget.items():
        if 0.0 <= value <= 1.0:
            style = "green" if value > 0.5 else "yellow" if value > 0.2 else "red"
            bar = Text(f"{value * 100:3.0f}% ") + Text(_bar(value, 10), style=style)
            rows.append([_key(f"rate {name}"), bar])
        else:
            rows.append([_key(f"rate {name}"), _num(value, 1)])
    return _table(None, rows, "ll")


def section_errors(snapshot: Snapshot, limit: int = 6) -> RenderableType:
    """Return the most recent errors, newest last."""
    if not snapshot.errors:
        return Text("no errors", style="dim green")
    return Group(
        *(Text(e, style="red", overflow="ellipsis", no_wrap=True) for e in snapshot.errors[-limit:])
    )


def render_snapshot(snapshot: Snapshot, pair: str | None = None) -> RenderableType:
    """Return the whole state as one Rich renderable, e.g. for `--no-ui` status prints.

    Args:
        snapshot: The state to show.
        pair: The pair whose depth chart and last decision to show; the first pair when None.
    """
    pair = pair or next(iter(pairs_of(snapshot)), None)

    def box(title: str, body: RenderableType) -> Panel:
        return Panel(body, title=title, title_align="left", border_style="dim")

    def pair_of(left: RenderableType, right: RenderableType) -> Table:
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(left, right)
        return grid

    return Group(
        section_status(snapshot, pair),
        pair_of(box("Equity", section_equity(snapshot)), box("Risk", section_risk(snapshot))),
        box("Positions", section_positions(snapshot, limit=10)),
        box("Recent trades", section_trades(snapshot, limit=5)),
        pair_of(
            box(f"Depth {pair or ''}", section_depth(snapshot, pair, levels=5)),
            box("Strategy", section_metrics(snapshot, pair)),
        ),
        pair_of(box("System", section_system(snapshot)), box("Errors", section_errors(snapshot))),
    )


# -- Dashboard -------------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """Ask a yes/no question; dismiss with True only on an explicit yes."""

    BINDINGS: ClassVar = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 64; height: auto; border: thick $error; background: $surface; padding: 1 2;
    }
    ConfirmScreen Horizontal { height: auto; align: center middle; margin-top: 1; }
    ConfirmScreen Button { margin: 0 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        """Lay out the question and the two buttons."""
        with Vertical():
            yield Label(self.question, id="question")
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        """Focus "No" so that a stray enter does not confirm."""
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """Answer with the pressed button."""
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        """Answer from a key."""
        self.dismiss(answer)


_MIN_HZ: Final = 2.0  # the operator sees the state at least twice a second, whatever is set
_PANELS_PER_FRAME: Final = 2
_FRAME_S: Final = 1 / 30
_MAIN_ACTIONS: Final = frozenset(
    {"cycle_pair", "toggle_pause", "reset_risk", "toggle_mode", "quit_bot"}
)
# Grid order: equity | positions (2 columns); depth | trades (2); strategy | risk | system;
# errors (3).
_PANELS: Final = ("equity", "positions", "depth", "trades", "metrics", "risk", "system", "errors")
_TITLES: Final = {
    "equity": "Equity & PnL",
    "positions": "Open positions",
    "risk": "Risk",
    "depth": "Market depth",
    "trades": "Recent trades",
    "metrics": "Strategy",
    "system": "System",
    "errors": "Errors",
}


def _panel_key(name: str, snap: Snapshot, pair: str | None, rows: int) -> Any:
    # What each panel depends on: it is re-rendered only when this changes. The equity
    # curve counts by (length, last point) so a long curve is never compared element-wise.
    # `rows` (the panel's height) matters to the panels that cut their list to fit.
    curve = snap.equity_curve
    tip = (len(curve), curve[-1] if curve else None)
    if name == "equity":
        return (snap.portfolio, tip)
    if name == "positions":
        return (snap.portfolio.positions, snap.open_orders, rows)
    if name == "risk":
        return (snap.trading_state, snap.risk, snap.portfolio.equity, snap.portfolio.positions)
    if name == "depth":
        return (pair, snap.order_books.get(pair) if pair else None)
    if name == "trades":
        return (snap.recent_trades, rows)
    if name == "metrics":
        decision = snap.last_decisions.get(pair) if pair else None
        return (pair, snap.recent_trades, tip, snap.scores, decision, snap.model)
    if name == "system":
        return (snap.mode, snap.state, snap.rate_limit_budget)
    return (snap.errors, rows)


def _panel_body(name: str, snap: Snapshot, pair: str | None, rows: int) -> RenderableType:
    # Only what fits is rendered: a 100-position table is cut to the panel's rows.
    if name == "equity":
        return section_equity(snap)
    if name == "positions":
        return section_positions(snap, limit=rows - 3)  # header, "+N more", orders line
    if name == "risk":
        return section_risk(snap)
    if name == "depth":
        return section_depth(snap, pair)
    if name == "trades":
        return section_trades(snap, limit=rows - 1)
    if name == "metrics":
        return section_metrics(snap, pair)
    if name == "system":
        return section_system(snap)
    return section_errors(snap, limit=rows)


class Dashboard(App[None]):
    """Show the bot's state in the terminal and take the operator's keys.

    Run it inside the bot's event loop with `await dashboard.run_async()` (Textual reads
    the terminal itself; no second event loop is created). Redrawing costs one
    `control.snapshot()` call per tick plus the panels whose inputs changed.

    Args:
        control: The operator façade.
        settings: `refresh_hz` (ticks per second, at least 2) and `theme`.
        can_switch_live: True when API keys are configured, so `s` may switch to live.
        switch_mode: Awaited with "live" or "sim" after the operator confirms; None hides
            the toggle's effect and `s` explains why.
        quit_stops_bot: When True (default), `q` awaits `control.stop` before exiting.
        live_blocked_reason: What `s` says when `can_switch_live` is False.
    """

    TITLE = "Kestrel"
    BINDINGS: ClassVar = [
        Binding("left", "cycle_pair(-1)", "Prev pair", priority=True),
        Binding("right", "cycle_pair(1)", "Next pair", priority=True),
        Binding("tab", "cycle_pair(1)", "Next pair", show=False, priority=True),
        Binding("shift+tab", "cycle_pair(-1)", "Prev pair", show=False, priority=True),
        Binding("p", "toggle_pause", "Pause/Resume"),
        Binding("r", "reset_risk", "Reset risk"),
        Binding("s", "toggle_mode", "Sim/Live"),
        Binding("q", "quit_bot", "Quit"),
    ]
    CSS = """
    #status { height: 1; padding: 0 1; background: $panel; }
    #message { height: 1; padding: 0 1; color: $text-muted; }
    #grid {
        grid-size: 3 4; grid-columns: 1fr 1fr 1fr; grid-rows: 1fr 1fr 12 6; grid-gutter: 0 1;
    }
    #grid > Static { border: round $primary-darken-2; padding: 0 1; height: 100%; }
    #positions, #trades { column-span: 2; }
    #errors { column-span: 3; }
    """

    def __init__(
        self,
        control: Control,
        settings: UISettings,
        *,
        can_switch_live: bool = False,
        switch_mode: SwitchMode | None = None,
        quit_stops_bot: bool = True,
        live_blocked_reason: str = NO_KEYS_REASON,
    ) -> None:
        super().__init__()
        self._control = control
        self._settings = settings
        self._can_switch_live = can_switch_live
        self._switch_mode = switch_mode
        self._quit_stops_bot = quit_stops_bot
        self._live_blocked_reason = live_blocked_reason
        self._snapshot: Snapshot | None = None
        self._keys: dict[str, Any] = {}
        self._dirty: dict[str, Any] = {}
        self._drain_timer: Timer | None = None
        self._failing = False
        # Widgets are kept by name: no DOM query per tick, and a tick that races the
        # shutdown updates a detached widget instead of failing a query.
        self._widgets = {name: Static(id=name) for name in ("status", *_PANELS, "message")}
        self.pair: str | None = None
        self.message = ""
        self.ticks = 0

    def compose(self) -> ComposeResult:
        """Lay out the status line, the panel grid, the message line and the key footer."""
        yield self._widgets["status"]
        with Grid(id="grid"):
            for name in _PANELS:
                panel = self._widgets[name]
                panel.border_title = _TITLES[name]
                yield panel
        yield self._widgets["message"]
        yield Footer()

    def on_mount(self) -> None:
        """Apply the theme, draw once and start the refresh timer."""
        self.theme = "textual-light" if self._settings.theme == "light" else "textual-dark"
        self.refresh_snapshot()
        self.set_interval(self.refresh_interval, self.refresh_snapshot)

    @property
    def refresh_interval(self) -> float:
        """Return the seconds between redraws: 1 / refresh_hz, never more than 0.5."""
        return 1 / max(self._settings.refresh_hz, _MIN_HZ)

    @property
    def snapshot(self) -> Snapshot | None:
        """Return the snapshot on screen."""
        return self._snapshot

    # -- Drawing ---------------------------------------------------------------------------

    def refresh_snapshot(self) -> None:
        """Fetch a snapshot and re-render the panels whose inputs changed."""
        self.ticks += 1
        try:
            snap = self._control.snapshot()
        except Exception as e:  # a broken snapshot must not kill the operator's window
            if not self._failing:  # log once per outage, not at refresh_hz
                log.exception("dashboard_snapshot_failed")
            self._failing = True
            self._say(f"snapshot failed: {e}", error=True)
            return
        if self._failing:
            self._failing = False
            self._say("snapshot recovered")
        first = self._snapshot is None
        self._snapshot = snap
        pairs = pairs_of(snap)
        if self.pair not in pairs:
            self.pair = pairs[0] if pairs else None
        status = section_status(snap, self._pair_label(pairs))
        self._widgets["status"].update(status, layout=False)
        for name in _PANELS:
            key = _panel_key(name, snap, self.pair, self._rows(name))
            if self._keys.get(name, self) != key:  # `self` is a sentinel no key equals
                self._dirty[name] = key
            else:
                self._dirty.pop(name, None)
        self._widgets["depth"].border_title = f"Market depth {self.pair or ''}"
        self._draw_dirty(len(_PANELS) if first else _PANELS_PER_FRAME)

    def _rows(self, name: str) -> int:
        return self._widgets[name].content_size.height or 20  # 0 before the first layout

    def _draw_dirty(self, limit: int = _PANELS_PER_FRAME) -> None:
        # Repaint cost grows with the area that changed, so at most _PANELS_PER_FRAME
        # panels are redrawn per frame and the rest follow in the next frames: the loop is
        # held a few milliseconds at a time, never for a whole-screen repaint. Panels that
        # keep changing take turns (a redrawn panel goes to the back of the queue).
        if self._snapshot is None:
            return
        for _ in range(min(limit, len(self._dirty))):
            name = next(iter(self._dirty))
            self._keys[name] = self._dirty.pop(name)
            body = _panel_body(name, self._snapshot, self.pair, self._rows(name))
            # The grid fixes every panel's size, so no re-layout is needed.
            self._widgets[name].update(body, layout=False)
        if self._dirty and self._drain_timer is None:
            self._drain_timer = self.set_timer(_FRAME_S, self._on_drain_timer)

    def _on_drain_timer(self) -> None:
        self._drain_timer = None
        self._draw_dirty()

    def _pair_label(self, pairs: Sequence[str]) -> str | None:
        if self.pair is None:
            return None
        return f"{self.pair} ({pairs.index(self.pair) + 1}/{len(pairs)})"

    def _say(self, message: str, *, error: bool = False) -> None:
        self.message = message
        text = Text(message, style="bold red" if error else "bold")
        self._widgets["message"].update(text, layout=False)

    # -- Keys ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Disable the dashboard's keys while a dialog is open."""
        return not (isinstance(self.screen, ModalScreen) and action in _MAIN_ACTIONS)

    def action_cycle_pair(self, step: int) -> None:
        """Select the next (`step` 1) or previous (-1) pair for the depth chart."""
        if self._snapshot is None:
            return
        pairs = pairs_of(self._snapshot)
        if not pairs:
            self._say("no pairs to switch between")
            return
        index = pairs.index(self.pair) if self.pair in pairs else 0
        self.pair = pairs[(index + step) % len(pairs)]
        self.refresh_snapshot()

    def action_toggle_pause(self) -> None:
        """Pause when running, resume when paused."""
        paused = self._snapshot is not None and self._snapshot.state is BotState.PAUSED
        if paused:
            self._command("resumed", lambda: self._control.resume("dashboard"))
        else:
            self._command("paused", lambda: self._control.pause("dashboard"))

    def action_reset_risk(self) -> None:
        """Lift latched circuit breakers after a confirmation (audited by the engine)."""
        snap = self._snapshot
        trading = snap.trading_state if snap is not None else "?"
        latched = ", ".join(snap.risk.get("latched") or {}) if snap is not None else ""
        question = (
            f"Reset risk? Trading is {str(trading).upper()}; latched: {latched or 'none'}."
            " Breakers are lifted; peak and day start re-based on equity now."
        )
        self.push_screen(ConfirmScreen(question), self._on_reset_risk_answer)

    def _on_reset_risk_answer(self, answer: bool | None) -> None:
        if not answer:
            self._say("risk reset cancelled")
            return
        self._command("risk reset", lambda: self._control.reset_risk("dashboard"))

    def action_toggle_mode(self) -> None:
        """Switch between sim and live after a confirmation, when allowed."""
        mode = self._snapshot.mode if self._snapshot is not None else ""
        if mode not in ("sim", "live"):
            self._say(f"mode switching works between sim and live only, not {mode!r}", error=True)
            return
        target = "sim" if mode == "live" else "live"
        if self._switch_mode is None:
            self._say("mode switching is not available in this run", error=True)
            return
        if target == "live" and not self._can_switch_live:
            self._say(f"cannot switch to live: {self._live_blocked_reason}", error=True)
            return
        warning = " Real orders will be sent." if target == "live" else ""
        question = f"Switch from {mode.upper()} to {target.upper()}?{warning}"
        self.push_screen(ConfirmScreen(question), partial(self._on_switch_answer, target))

    def _on_switch_answer(self, target: str, answer: bool | None) -> None:
        if not answer:
            self._say("mode switch cancelled")
            return
        switch_mode = self._switch_mode
        assert switch_mode is not None
        self._command(f"switched to {target}", lambda: switch_mode(target))

    def action_quit_bot(self) -> None:
        """Quit the dashboard, stopping the bot first when `quit_stops_bot` is set."""
        if not self._quit_stops_bot:
            self.exit()
            return
        self._say("stopping the bot...")
        reason = "operator quit the dashboard"
        self._command("stopping", lambda: self._control.stop(reason), exit=True)

    def _command(
        self, done: str, call: Callable[[], Awaitable[None]], *, exit: bool = False
    ) -> None:
        # Commands run as Textual workers (tasks in this same loop, owned and cancelled by
        # the app), so a slow command never holds up the redraw timer. The coroutine is
        # created inside the worker, so a worker cancelled before it starts leaves none
        # un-awaited.
        async def run() -> None:
            try:
                await call()
            except Exception as e:
                log.exception("dashboard_command_failed", command=done)
                self._say(f"{done} failed: {e}", error=True)
            else:
                log.info("dashboard_command", command=done)
                self._say(done)
            if exit:
                self.exit()

        self.run_worker(run(), name=f"command:{done}", group="commands", exit_on_error=False)


# -- Web view --------------------------------------------------------------------------------


_FIELDS: dict[type, tuple[str, ...]] = {}


def to_jsonable(value: Any) -> Any:
    """Return `value` as JSON-ready data: Decimal -> str, non-finite float -> None, see module."""
    if value is None or (isinstance(value, bool | int | str) and not isinstance(value, Enum)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        names = _FIELDS.get(cls)
        if names is None:
            names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return {name: to_jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_item(v) for v in value]
    return str(value)


def _item(value: Any) -> Any:
    # Inline the common leaves of long sequences (book levels, curve points): a snapshot
    # of 100 pairs holds tens of thousands of them.
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int or kind is str:
        return value
    if kind is tuple:
        return [_item(v) for v in value]
    return to_jsonable(value)


def depth_json(book: OrderBook, levels: int = 50) -> dict[str, Any]:
    """Return the `/api/depth` body: levels as [price, qty, cumulative qty], best first."""
    bids, asks = depth_levels(book, levels)
    best_bid, best_ask = book.best_bid, book.best_ask
    mid = (best_bid + best_ask) / 2 if best_bid is not None and best_ask is not None else None
    spread = (best_ask - best_bid) / mid * 1e4 if mid and best_ask and best_bid else None
    body: dict[str, Any] = to_jsonable(
        {
            "pair": book.pair,
            "ts": book.ts,
            "bids": [list(level) for level in bids],
            "asks": [list(level) for level in asks],
            "best_bid": best_bid,
            "best_ask": best_ask,
            "mid": mid,
            "spread_bps": spread,
        }
    )
    return body


def equity_json(snapshot: Snapshot, points: int | None = None) -> dict[str, Any]:
    """Return the `/api/equity` body; `points` keeps at most that many, always the last."""
    curve = snapshot.equity_curve
    n = len(curve)
    if points is not None and 0 < points < n:
        curve = tuple(curve[(i + 1) * n // points - 1] for i in range(points))
    pf = snapshot.portfolio
    body: dict[str, Any] = to_jsonable(
        {
            "ts": snapshot.ts,
            "equity": pf.equity,
            "cash": pf.cash,
            "realised_pnl": pf.realised_pnl,
            "unrealised_pnl": _unrealised(snapshot),
            "total_points": n,
            "points": [list(p) for p in curve],
        }
    )
    return body


_dumps = partial(json.dumps, separators=(",", ":"), allow_nan=False)


def _encode_snapshot(snapshot: Snapshot, excluded: frozenset[str] = frozenset()) -> str:
    # The `/api/snapshot` body, skipping the excluded fields instead of encoding them.
    # Each field is dumped on its own: json's C encoder holds the GIL for a whole call,
    # and one call per field keeps each hold to a few milliseconds when this runs in a
    # worker thread.
    names = [f.name for f in dataclasses.fields(snapshot) if f.name not in excluded]
    parts = (f'"{name}":{_dumps(to_jsonable(getattr(snapshot, name)))}' for name in names)
    return "{" + ",".join(parts) + "}"


class WebView:
    """Serve the bot's state as JSON and a live chart page on 127.0.0.1, behind a token.

    Every route needs the token, as `Authorization: Bearer <token>` or `?token=<token>`
    (compared in constant time); anything else gets 401. Routes:

    - `GET /` the page (equity and depth charts on canvas, polling the API each second)
    - `GET /api/snapshot[?exclude=field,field]` the whole `Snapshot`
    - `GET /api/equity[?points=N]` equity figures and the curve as [[ts, equity], ...]
    - `GET /api/depth/<pair>` cumulative depth (`BTC/USDT`, `BTC%2FUSDT` or `BTC-USDT`)
    - `GET /api/patterns/<pair>` candlestick patterns on the pair's last candles
    - `POST /api/pause`, `POST /api/resume` the operator commands
    - `POST /api/resetrisk` lifts latched circuit breakers (audited as "web view")

    The access log is off so that a token in a query string never reaches a log file.

    Args:
        control: The operator façade.
        settings: `web_host`, `web_port` (0 picks a free port) and `web_token`.
        token: Overrides `settings.web_token`.

    Raises:
        ConfigError: when no token is configured.
    """

    def __init__(self, control: Control, settings: UISettings, *, token: str | None = None):
        secret = token or (settings.web_token.get_secret_value() if settings.web_token else "")
        if not secret:
            raise ConfigError(
                "the web view needs a token: set KESTREL_UI__WEB_TOKEN", component="ui"
            )
        register_secret(secret)
        self._control = control
        self._settings = settings
        self._token = secret.encode()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """Return the bound port (after `start`)."""
        if self._port is None:
            raise RuntimeError("the web view is not started")
        return self._port

    @property
    def url(self) -> str:
        """Return the base URL, without the token."""
        return f"http://{self._settings.web_host}:{self.port}/"

    def build_app(self) -> web.Application:
        """Return the aiohttp application with its routes and the token middleware."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/equity", self._equity)
        app.router.add_get("/api/depth/{pair:.+}", self._depth)
        app.router.add_get("/api/patterns/{pair:.+}", self._patterns)
        app.router.add_post("/api/pause", self._pause)
        app.router.add_post("/api/resume", self._resume)
        app.router.add_post("/api/resetrisk", self._reset_risk)
        return app

    async def start(self) -> None:
        """Bind and start serving."""
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.web_host, self._settings.web_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("web_view_started", host=self._settings.web_host, port=self._port)

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("web_view_stopped", port=self._port)

    async def __aenter__(self) -> WebView:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- Handlers --------------------------------------------------------------------------

    def _is_authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        given = (
            header[7:].strip() if header.startswith("Bearer ") else request.query.get("token", "")
        )
        return hmac.compare_digest(given.encode(), self._token)

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._is_authorized(request):
            log.warning("web_unauthorized", path=request.path, remote=request.remote)
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE_HTML, content_type="text/html", headers={"Content-Security-Policy": _CSP}
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        snapshot = self._control.snapshot()
        excluded = frozenset(n.strip() for n in request.query.get("exclude", "").split(","))
        # A full snapshot (long equity curve, every book) takes tens of milliseconds to
        # encode; a worker thread does it, so the loop is held only for GIL slices.
        text = await asyncio.to_thread(_encode_snapshot, snapshot, excluded)
        return web.Response(text=text, content_type="application/json")

    async def _equity(self, request: web.Request) -> web.Response:
        try:
            points = int(request.query["points"]) if "points" in request.query else None
        except ValueError:
            return web.json_response({"error": "points must be an integer"}, status=400)
        snapshot = self._control.snapshot()
        text = await asyncio.to_thread(lambda: _dumps(equity_json(snapshot, points)))
        return web.Response(text=text, content_type="application/json")

    async def _depth(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        books = self._control.snapshot().order_books
        book = books.get(pair) or books.get(pair.replace("-", "/"))
        if book is None:
            return web.json_response({"error": f"no order book for {pair}"}, status=404)
        return web.json_response(depth_json(book), dumps=_dumps)

    async def _patterns(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        pairs = pairs_of(self._control.snapshot())
        known = pair if pair in pairs else pair.replace("-", "/")
        if known not in pairs:
            return web.json_response({"error": f"{pair} is not traded"}, status=404)
        return web.json_response(
            {"pair": known, "patterns": self._control.patterns(known)}, dumps=_dumps
        )

    async def _pause(self, request: web.Request) -> web.Response:
        await self._control.pause("web view")
        log.info("web_command", command="pause")
        return web.json_response({"ok": True, "state": str(self._control.snapshot().state)})

    async def _resume(self, request: web.Request) -> web.Response:
        await self._control.resume("web view")
        log.info("web_command", command="resume")
        return web.json_response({"ok": True, "state": str(self._control.snapshot().state)})

    async def _reset_risk(self, request: web.Request) -> web.Response:
        await self._control.reset_risk("web view")
        log.info("web_command", command="resetrisk")
        snapshot = self._control.snapshot()
        return web.json_response(
            {"ok": True, "state": str(snapshot.state), "trading_state": str(snapshot.trading_state)}
        )


# The page: no external resources (the machine may have no internet). The script is inline
# and allowed by its hash in the Content-Security-Policy, so nothing else can run.
_SCRIPT: Final = r"""
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
if (params.has("token")) history.replaceState(null, "", location.pathname);
const auth = {"Authorization": "Bearer " + token};
const $ = (id) => document.getElementById(id);
const GREEN = "#26a69a", RED = "#ef5350", LINE = "#4fc3f7", GRID = "#2d333b", DIM = "#8b949e";
const LIGHT = "equity_curve,order_books,recent_trades,last_decisions";
let pair = null;

async function getJSON(path) {
  const r = await fetch(path, {headers: auth, cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function command(path) {
  const r = await fetch(path, {method: "POST", headers: auth});
  $("note").textContent = r.ok ? path.slice(5) + " sent" : path + ": HTTP " + r.status;
  tick();
}
function num(v, d) {
  if (v === null || v === undefined) return "-";
  return Number(v).toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
}
function canvas(id) {
  const c = $(id), dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px DejaVu Sans, sans-serif";
  return [ctx, w, h];
}
function axisY(ctx, lo, hi, L, T, W, H, digits) {
  ctx.strokeStyle = GRID; ctx.fillStyle = DIM; ctx.lineWidth = 1; ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, y = T + H - H * i / 4;
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(L + W, y); ctx.stroke();
    ctx.fillText(num(v, digits), L - 6, y + 4);
  }
}
function utc(ts) { return new Date(ts).toISOString().slice(11, 19); }

function drawEquity(d) {
  const [ctx, w, h] = canvas("equity-chart");
  const pts = d.points.filter((p) => p[1] !== null);
  if (pts.length < 2) {
    ctx.fillStyle = DIM;
    ctx.fillText("waiting for equity data", 12, 20);
    return;
  }
  const L = 80, R = 12, T = 10, B = 22, W = w - L - R, H = h - T - B;
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (hi === lo) { lo -= 1; hi += 1; }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0] || t0 + 1;
  const x = (t) => L + (t - t0) / Math.max(1, t1 - t0) * W, y = (v) => T + (hi - v) / (hi - lo) * H;
  axisY(ctx, lo, hi, L, T, W, H, 2);
  ctx.textAlign = "left"; ctx.fillText(utc(t0) + " UTC", L, h - 6);
  ctx.textAlign = "right"; ctx.fillText(utc(t1) + " UTC", L + W, h - 6);
  ctx.beginPath(); ctx.moveTo(x(t0), T + H);
  for (const [t, v] of pts) ctx.lineTo(x(t), y(v));
  ctx.lineTo(x(t1), T + H); ctx.closePath();
  ctx.fillStyle = "rgba(79, 195, 247, 0.15)"; ctx.fill();
  ctx.beginPath();
  pts.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.strokeStyle = LINE; ctx.lineWidth = 2; ctx.stroke();
}

function drawDepth(d) {
  const [ctx, w, h] = canvas("depth-chart");
  if (!d.bids.length && !d.asks.length) {
    ctx.fillStyle = DIM;
    ctx.fillText("empty book", 12, 20);
    return;
  }
  const L = 80, R = 12, T = 10, B = 22, W = w - L - R, H = h - T - B;
  const prices = d.bids.concat(d.asks).map((l) => l[0]);
  // Pad the price range so the outermost levels show as steps, not as the chart's edge.
  const pad = Math.max((Math.max(...prices) - Math.min(...prices)) * 0.08, 1e-9);
  const lo = Math.min(...prices) - pad, hi = Math.max(...prices) + pad, span = hi - lo;
  const top = Math.max(...d.bids.concat(d.asks).map((l) => l[2])) * 1.05 || 1;
  const x = (p) => L + (p - lo) / span * W, y = (q) => T + H - q / top * H;
  axisY(ctx, 0, top, L, T, W, H, 3);
  ctx.fillStyle = DIM;
  for (let i = 0; i <= 4; i++) {
    const p = lo + span * i / 4;
    ctx.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
    ctx.fillText(num(p, p >= 100 ? 2 : 4), x(p), h - 6);
  }
  const side = (levels, colour, edge) => {
    if (!levels.length) return;
    ctx.beginPath(); ctx.moveTo(x(levels[0][0]), y(0));
    let prev = 0;
    for (const [p, , cum] of levels) {
      ctx.lineTo(x(p), y(prev));
      ctx.lineTo(x(p), y(cum));
      prev = cum;
    }
    ctx.lineTo(x(edge), y(prev)); ctx.lineTo(x(edge), y(0)); ctx.closePath();
    ctx.globalAlpha = 0.35; ctx.fillStyle = colour; ctx.fill();
    ctx.globalAlpha = 1; ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.stroke();
  };
  side(d.bids, GREEN, lo);
  side(d.asks, RED, hi);
  if (d.mid !== null) {
    ctx.setLineDash([4, 4]); ctx.strokeStyle = DIM; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(x(d.mid), T); ctx.lineTo(x(d.mid), T + H); ctx.stroke();
    ctx.setLineDash([]);
  }
  $("depth-info").textContent = d.mid === null ? "" :
    "mid " + num(d.mid, d.mid >= 100 ? 2 : 4) + " · spread " + num(d.spread_bps, 1) + " bps";
}

function showStatus(s) {
  $("mode").textContent = s.mode.toUpperCase();
  $("mode").className = "badge " + (s.mode === "live" ? "live" : "sim");
  $("state").textContent = s.state;
  $("trading").textContent = s.trading_state;
  $("equity").textContent = num(s.portfolio.equity, 2);
  const upnl = s.portfolio.positions.reduce((a, p) => a + (p.mark_price === null ? 0 :
    (p.mark_price - p.entry_price) * p.qty * (p.side === "long" ? 1 : -1)), 0);
  const pnl = Number(s.portfolio.realised_pnl) + upnl;
  $("pnl").textContent = (pnl >= 0 ? "+" : "") + num(pnl, 2);
  $("pnl").style.color = pnl >= 0 ? GREEN : RED;
  $("positions").textContent = s.portfolio.positions.length;
  $("errors").textContent = s.errors.length ? s.errors.slice(-5).join("\n") : "no errors";
  const pairs = s.pairs.length ? s.pairs : [];
  const sel = $("pair");
  if (sel.options.length !== pairs.length || pairs.some((p, i) => sel.options[i].value !== p)) {
    sel.replaceChildren(...pairs.map((p) => new Option(p, p)));
  }
  if (!pairs.includes(pair)) pair = pairs.length ? pairs[0] : null;
  sel.value = pair || "";
}

async function tick() {
  try {
    const s = await getJSON("/api/snapshot?exclude=" + LIGHT);
    showStatus(s);
    const width = Math.max(50, Math.floor($("equity-chart").clientWidth));
    const [eq, depth, found] = await Promise.all([
      getJSON("/api/equity?points=" + width),
      pair ? getJSON("/api/depth/" + encodeURIComponent(pair)).catch(() => null) : null,
      pair ? getJSON("/api/patterns/" + encodeURIComponent(pair)).catch(() => null) : null,
    ]);
    drawEquity(eq);
    if (depth) drawDepth(depth); else canvas("depth-chart");
    const marks = {bullish: "\u25b2", bearish: "\u25bc", neutral: "\u00b7"};
    $("patterns").textContent = found && found.patterns.length ? "patterns: " +
      found.patterns.map((p) => p.label + " " + (marks[p.direction] || "") + " (" +
        (p.bars_ago === 0 ? "last candle" : p.bars_ago + " ago") + ")").join(", ") : "";
    $("note").textContent = "updated " + utc(Date.now()) + " UTC";
  } catch (e) {
    $("note").textContent = String(e);
  }
}
$("pair").addEventListener("change", (e) => { pair = e.target.value; tick(); });
$("pause").addEventListener("click", () => command("/api/pause"));
$("resume").addEventListener("click", () => command("/api/resume"));
$("resetrisk").addEventListener("click", () => {
  if (confirm("Reset risk? Latched circuit breakers are lifted.")) command("/api/resetrisk");
});
tick();
setInterval(tick, 1000);
"""

PAGE_HTML: Final = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kestrel</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body { margin: 0; background: #0f1419; color: #d8dee9; font: 14px/1.4 "DejaVu Sans", sans-serif; }
header { display: flex; gap: 18px; align-items: center; padding: 10px 16px;
         background: #161b22; border-bottom: 1px solid #2d333b; }
.badge { padding: 2px 8px; border-radius: 4px; font-weight: bold; color: #fff; }
.live { background: #b71c1c; } .sim { background: #1565c0; }
.grow { flex: 1; } .dim { color: #8b949e; }
button { background: #21262d; color: #d8dee9; border: 1px solid #444c56; border-radius: 4px;
         padding: 4px 12px; cursor: pointer; }
main { padding: 12px 16px; display: grid; gap: 12px; }
section { background: #161b22; border: 1px solid #2d333b; border-radius: 6px; padding: 8px 12px; }
h2 { margin: 0 0 6px; font-size: 13px; color: #8b949e; font-weight: normal;
     text-transform: uppercase; display: flex; gap: 12px; align-items: center; }
canvas { width: 100%; height: 250px; display: block; }
select { background: #21262d; color: #d8dee9; border: 1px solid #444c56; }
pre { margin: 0; color: #ef5350; white-space: pre-wrap; }
</style></head><body>
<header><strong>Kestrel</strong><span id="mode" class="badge">-</span>
<span>state <b id="state">-</b></span><span>trading <b id="trading">-</b></span>
<span>equity <b id="equity">-</b></span><span>PnL <b id="pnl">-</b></span>
<span>positions <b id="positions">-</b></span><span class="grow"></span>
<span id="note" class="dim"></span>
<button id="pause">Pause</button><button id="resume">Resume</button>
<button id="resetrisk">Reset risk</button></header>
<main>
<section><h2>Equity</h2><canvas id="equity-chart"></canvas></section>
<section><h2>Market depth <select id="pair"></select><span id="depth-info" class="dim"></span>
</h2><canvas id="depth-chart"></canvas><div id="patterns" class="dim"></div></section>
<section><h2>Recent errors</h2><pre id="errors"></pre></section>
</main>
<script>"""
    + _SCRIPT
    + """</script>
</body></html>
"""
)

_SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP: Final = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
