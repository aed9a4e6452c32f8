"""Rich renderables of a `Snapshot`: formatting, charts, the sections and `render_snapshot`.

`render_snapshot(snapshot)` returns a plain Rich renderable of the whole state, for
`--no-ui` status prints. Its sections (`section_equity`, `section_depth`, ...) are the same
renderables `dashboard.Dashboard` shows, so the two never disagree; `web_view` reuses
`depth_levels`, `pairs_of` and `unrealised_pnl`. `ui` re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from analytics import max_drawdown as max_drawdown
from models import BotState, OrderBook, PositionSide, Snapshot, TradingState


_SPARK: Final = "▁▂▃▄▅▆▇█"
_NO_STYLE: Final = Style()
_LADDER: Final = tuple(TradingState)
_LADDER_STYLE: Final = {
    TradingState.NORMAL: "bold black on green",
    TradingState.REDUCED: "bold black on yellow",
    TradingState.REDUCING: "bold black on dark_orange",
    TradingState.HALTED: "bold white on red",
    TradingState.FLATTEN: "bold white on magenta",
}
_BREAKER_STYLE: Final = {"closed": "green", "half_open": "yellow", "open": "bold red"}


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


def _day_clock(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short_day(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%m-%d %H:%M")


def _bar(fraction: float, width: int) -> str:
    filled = max(0.0, min(1.0, fraction)) * width
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def sparkline_text(values: Sequence[float], width: int, rows: int = 1) -> str:
    """Return `values` as block characters, `rows` lines high, resampled to `width` cells.

    Longer series keep the last value of each bucket (a close), so the final column is
    always the latest value. Non-finite values are dropped. The lowest value still shows
    one eighth of a cell, so the line never vanishes; a flat series sits at half height.
    """
    # A NaN or an infinity makes the sum non-finite, so a finite sum means nothing to drop
    # (one pass in C, not a test per value: the dashboard's curve has thousands of points).
    finite = values if math.isfinite(sum(values)) else [v for v in values if math.isfinite(v)]
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
        # Lines of exactly the width given: segments, not a Text to wrap.
        style = console.get_style(self.style)
        for line in sparkline_text(self.values, options.max_width, self.rows).split("\n"):
            if line:  # an empty series: only the line break, as its Text rendered
                yield Segment(line, style)
            yield Segment.line()


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
        line = self._line if label_width < options.max_width else self._wrapped_line
        for (_, cum, style), label in zip(rows, labels, strict=True):
            yield from line(console, label.rjust(label_width), _bar(cum / peak, bar_width), style)
        yield self.middle(places, options.max_width)
        for (_, _, cum), label in zip(bids, bid_labels, strict=True):
            yield from line(console, label.rjust(label_width), _bar(cum / peak, bar_width), "green")

    def middle(self, places: int, width: int) -> Text:
        """Return the line between the asks and the bids: the mid price and the spread."""
        book = self.book
        best_bid, best_ask = (None, None) if book is None else (book.best_bid, book.best_ask)
        if best_bid is not None and best_ask is not None:
            mid = (best_bid + best_ask) / 2
            spread = (best_ask - best_bid) / mid * 1e4 if mid > 0 else 0.0
            middle = f" mid {_price(mid, places)} · spread {spread:.1f} bps "
        else:
            middle = " one-sided book "
        return Text(middle.center(width, "─"), style="dim")

    @staticmethod
    def _line(console: Console, label: str, bar: str, style: str) -> RenderResult:
        # The label and its bar fit the width: the segments a Text of the two would render,
        # without the Text's wrapping.
        if bar:
            yield Segment(label, _NO_STYLE)
            yield Segment(bar, console.get_style(style))
        else:
            yield Segment(label)
        yield Segment.line()

    @staticmethod
    def _wrapped_line(console: Console, label: str, bar: str, style: str) -> RenderResult:
        yield Text(label) + Text(bar, style=style)  # narrower than a label: Rich wraps it


# -- Sections (shared by the dashboard and render_snapshot) ----------------------------------


def pairs_of(snapshot: Snapshot) -> tuple[str, ...]:
    """Return the pairs a view can select: the snapshot's pairs, else those with a book."""
    return snapshot.pairs or tuple(sorted(snapshot.order_books))


def unrealised_pnl(snapshot: Snapshot) -> Decimal:
    """Return the open positions' unrealised PnL summed."""
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
        f"  {_day_clock(snapshot.ts)} UTC",
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
        [_key("unrealised PnL"), _signed(unrealised_pnl(snapshot))],
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
            _short_day(t.exit_ts),
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
    if snapshot.ranking:
        # Best first by the skill bound; the score is reward_system's Score.total.
        lines: list[list[Cell]] = [
            [r.name, f"{r.total:.3f}", f"lcb {r.lcb:+.2f}", f"{r.trades} tr"]
            for r in snapshot.ranking[:6]
        ]
        parts += [Text("ranking", style="bold dim"), _table(None, lines, "lrrr")]
    elif snapshot.scores:
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
        model = ", ".join(f"{k}={_model_brief(v)}" for k, v in list(snapshot.model.items())[:4])
        parts.append(Text(f"model {model}", style="dim"))
    return Group(*parts)


def _model_brief(value: Any) -> str:
    # A pair's model entry (self_learning.SafePredictor.describe): the version in use and
    # the challenger in shadow, not the whole nested description.
    if not isinstance(value, Mapping):
        return str(value)
    registry = value.get("registry") or {}
    brief = str(value.get("version") or registry.get("champion") or "none")
    if registry.get("challenger"):
        brief += f" (challenger {registry['challenger']})"
    return brief


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
    trigger = risk.get("last_trigger")
    if isinstance(trigger, Mapping) and trigger.get("ts"):
        rows.append([_key("last change"), _trigger_line(trigger)])
    latched = risk.get("latched")
    if isinstance(latched, Mapping) and latched:
        rows.append([_key("latched"), Text(", ".join(map(str, latched)), style="bold red")])
    for key, value in risk.items():
        # Nested figures (limits, history) are the web view's; scalars are shown as they are.
        if key in _RISK_SHOWN or isinstance(value, Mapping | list | tuple) or value is None:
            continue
        shown = _num(value, 4) if isinstance(value, float | Decimal) else str(value)
        rows.append([_key(str(key)), shown])
    for pair, anomaly in snapshot.anomalies.items():
        if anomaly.get("paused"):
            until = anomaly.get("paused_until")
            shown = f"{anomaly.get('kind')} · entries paused" + (
                f" until {_day_clock(int(until))}" if until is not None else ""
            )
            rows.append([_key(f"anomaly {pair}"), Text(shown, style="yellow")])
    return Group(_ladder(snapshot.trading_state), _table(None, rows, "ll"))


_RISK_SHOWN: Final = frozenset({"exposure", "max_exposure", "circuit_breakers", "state"})


def _trigger_line(trigger: Mapping[str, Any]) -> Text:
    when = _short_day(int(trigger["ts"]))
    return Text.assemble(
        (f"{trigger.get('trigger')} → {trigger.get('to')}", "bold"), f" {when}: ",
        (str(trigger.get("reason", "")), "dim"),
    )  # fmt: skip


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
    if snapshot.late_streams:  # decided alone: bursts do not wait for them
        late = Text(", ".join(snapshot.late_streams), style="yellow")
        rows.append([_key("late streams"), late])
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
            box("Pairs", section_pairs(snapshot, pair)), box("Ranking", section_ranking(snapshot))
        ),
        pair_of(
            box(f"Depth {pair or ''}", section_depth(snapshot, pair, levels=5)),
            box("Strategy", section_metrics(snapshot, pair)),
        ),
        box("Model & anomalies", section_models(snapshot)),
        pair_of(box("System", section_system(snapshot)), box("Errors", section_errors(snapshot))),
    )


# -- Pairs, ranking, model and anomalies -----------------------------------------------------


def extra(snapshot: Snapshot, key: str) -> Any:
    """Return a status key other parts add to the snapshot (`ranking`, `anomalies`), or None.

    Read from the snapshot's own field when it has one, else from its `risk` dict.
    """
    value = getattr(snapshot, key, None)
    if not value:
        value = snapshot.risk.get(key, value)
    return value


def section_pairs(snapshot: Snapshot, pair: str | None = None, limit: int | None = None) -> Text:
    """Return the traded pairs with last price and change (the selected one marked)."""
    pairs = pairs_of(snapshot) or tuple(snapshot.markets)
    if not pairs:
        return Text("no pairs yet", style="dim")
    if limit is not None and len(pairs) > max(1, limit):
        at = pairs.index(pair) if pair in pairs else 0
        start = max(0, min(at - limit // 2, len(pairs) - limit))
        pairs = pairs[start : start + max(1, limit)]
    rows: list[list[Cell]] = []
    for name in pairs:
        market = snapshot.markets.get(name, {})
        last, change = market.get("last"), market.get("change")
        mark = Text("▸ " + name, style="bold cyan") if name == pair else Text("  " + name)
        rows.append(
            [mark, _price(last), _signed(change * 100, 2, "%") if change is not None else "-"]
        )
    return _table(("  pair", "last", "change"), rows, "l")


def _ranking_rows(ranking: Any) -> list[list[Cell]]:
    # Items are `models.Ranked` or their JSON form ({name, total, lcb, trades}).
    rows: list[list[Cell]] = []
    for item in ranking if isinstance(ranking, Sequence) else ():
        fields = item if isinstance(item, Mapping) else getattr(item, "__dict__", None)
        if fields is None and hasattr(item, "name"):
            fields = {k: getattr(item, k, None) for k in ("name", "total", "lcb", "trades")}
        if not isinstance(fields, Mapping):
            continue
        total, lcb = fields.get("total"), fields.get("lcb")
        rows.append(
            [
                str(fields.get("name", "?")),
                _num(total, 2) if isinstance(total, int | float) else "-",
                _num(lcb, 2) if isinstance(lcb, int | float) else "-",
                str(fields.get("trades", "-")),
            ]
        )
    return rows


def section_ranking(snapshot: Snapshot, limit: int = 8) -> RenderableType:
    """Return the strategy ranking (score, its lower confidence bound, trades), best first.

    Reads the `ranking` status key ([{name, total, lcb, trades}, ...]); before the scoring
    part provides it, the per-strategy scores stand in; "none yet" when neither exists.
    """
    rows = _ranking_rows(extra(snapshot, "ranking"))
    if rows:
        # Best first: the order is the rank.
        return _table(("strategy", "score", "lcb", "trades"), rows[: max(1, limit)], "l")
    if snapshot.scores:
        ranked = sorted(snapshot.scores.items(), key=lambda kv: -kv[1])[: max(1, limit)]
        return _table(("strategy", "score"), [[n, _num(v, 3)] for n, v in ranked], "l")
    return Text("none yet", style="dim")


def _brief(value: Any, width: int = 48) -> str:
    if isinstance(value, Mapping):
        text = " ".join(f"{k}={_brief(v, 16)}" for k, v in list(value.items())[:6])
    elif isinstance(value, float):
        text = _num(value, 4)
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def section_models(snapshot: Snapshot, limit: int = 8) -> RenderableType:
    """Return the model state (registry aliases, per-pair predictors) and open anomalies.

    Shows "none yet" for either when absent. Anomalies are the `anomalies` status key: a
    list of {pair, kind, reason, ...} or a {pair: description} mapping.
    """
    model = snapshot.model
    parts: list[RenderableType] = [Text("model", style="bold dim")]
    if model:
        rows: list[list[Cell]] = [[_key(str(k)), _brief(v)] for k, v in list(model.items())[:limit]]
        parts.append(_table(None, rows, "ll"))
    else:
        parts.append(Text("none yet", style="dim"))
    parts.append(Text("anomalies", style="bold dim"))
    anomalies = extra(snapshot, "anomalies")
    items: list[tuple[str, str]] = []
    if isinstance(anomalies, Mapping):
        items = [(str(k), _brief(v)) for k, v in anomalies.items()]
    elif isinstance(anomalies, Sequence) and not isinstance(anomalies, str):
        for item in anomalies:
            if isinstance(item, Mapping):
                rest = {k: v for k, v in item.items() if k != "pair"}
                items.append((str(item.get("pair", "-")), _brief(rest)))
            else:
                items.append(("-", _brief(item)))
    if items:
        lines: list[list[Cell]] = [[Text(p, style="yellow"), d] for p, d in items[:limit]]
        parts.append(_table(None, lines, "ll"))
    else:
        parts.append(Text("none yet", style="dim"))
    return Group(*parts)
