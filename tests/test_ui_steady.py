"""The dashboard's steady loop: dropped strips freed at once, panels painted only on change,
and the faster renderers drawing exactly what Rich's Text drew."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import math
import time
from collections.abc import Callable
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.visual import VisualType
from textual.widgets import Static

from config import UISettings
from dashboard import _FRAME_S, _TIMER_EARLY_S, strips_free_themselves
from models import OrderBook, Snapshot
from status_view import (
    DepthChart,
    Sparkline,
    _bar,
    _places,
    _price,
    _qty,
    depth_levels,
    sparkline_text,
)
from tests.test_ui_support import FakeControl
from ui import Dashboard


SIZE = (160, 50)
_WORDS = st.text(alphabet="ab █▌─", min_size=0, max_size=6)
_STYLES = st.sampled_from([None, Style(), Style(color="red"), Style(bold=True)])


def _strips() -> st.SearchStrategy[Strip]:
    return st.lists(st.tuples(_WORDS, _STYLES), max_size=5).map(
        lambda parts: Strip([Segment(text, style) for text, style in parts])
    )


def test_a_strip_divided_at_its_end_or_cropped_to_itself_is_freed_at_once() -> None:
    """Textual's own code keeps such a strip in its cache: a cycle only the collector frees."""
    strips_free_themselves()
    gc.collect()
    gc.disable()
    try:
        strip = Strip([Segment("price "), Segment("100.5", Style(color="green"))])
        assert list(strip.divide([strip.cell_length])) == [strip]
        assert strip.crop_extend(0, strip.cell_length, None) is strip
        del strip
        assert gc.collect() == 0  # nothing was left for the collector
    finally:
        gc.enable()


@settings(max_examples=200, deadline=None)
@given(
    strip=_strips(),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    spans=st.lists(st.tuples(st.integers(-3, 40), st.integers(0, 40)), max_size=4),
    style=_STYLES,
)
def test_dividing_and_crop_extending_give_textuals_own_results(
    strip: Strip, cuts: list[int], spans: list[tuple[int, int]], style: Style | None
) -> None:
    """Only what is cached changes: every division and crop equals Textual's."""
    strips_free_themselves()
    divide: Callable[..., list[Strip]] = Strip.divide.__wrapped__  # type: ignore[attr-defined]
    crop_extend: Callable[..., Strip] = Strip.crop_extend.__wrapped__  # type: ignore[attr-defined]
    ends = [*sorted(set(cuts)), strip.cell_length]
    fresh = Strip(list(strip))  # Textual's own call on a copy with empty caches
    assert list(strip.divide(ends)) == list(divide(fresh, ends))
    assert list(strip.divide([strip.cell_length])) == list(divide(fresh, [strip.cell_length]))
    whole = [(0, strip.cell_length), (-2, strip.cell_length)]
    for start, end in [*whole, *spans]:
        assert strip.crop_extend(start, end, style) == crop_extend(fresh, start, end, style)


async def test_a_running_dashboard_leaves_no_strip_to_the_collector() -> None:
    """Panels redrawn tick after tick drop their strips without making cyclic garbage."""
    control = FakeControl()
    app = Dashboard(control, UISettings(refresh_hz=20))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept for us to look at
        try:
            for tick in range(12):
                equity = Decimal(10_000 + tick)
                curve = (*control.base.equity_curve, (control.base.ts + tick, float(equity)))
                control.base = dataclasses.replace(
                    control.base,
                    portfolio=dataclasses.replace(control.base.portfolio, equity=equity),
                    equity_curve=curve,
                )
                await asyncio.sleep(0.06)
            gc.collect()
            found = [o for o in gc.garbage if isinstance(o, Strip)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert app.ticks >= 10
        assert found == []


async def test_an_unchanged_depth_panel_is_not_repainted() -> None:
    """Its title is set only when the pair changes: setting it repaints the whole panel."""
    control = FakeControl()
    app = Dashboard(control, UISettings(refresh_hz=20))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        depth = app.query_one("#depth")
        painted = 0
        render = depth.render

        def counted() -> VisualType:
            nonlocal painted
            painted += 1
            return render()

        depth.render = counted  # type: ignore[method-assign]
        ticks = app.ticks
        for tick in range(6):  # the equity changes, the depth book does not
            portfolio = dataclasses.replace(control.base.portfolio, equity=Decimal(tick))
            control.base = dataclasses.replace(control.base, portfolio=portfolio)
            await asyncio.sleep(0.06)
        assert app.ticks >= ticks + 4
        assert painted == 0
        await pilot.press("right")  # another pair: a new title and a new book, painted
        await pilot.pause()
        assert painted >= 1


_VALUES = st.lists(
    st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(-1e6, 1e6),
        st.sampled_from([1e308, 1.5e308]),  # finite, but their sum is not
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(values=_VALUES, width=st.integers(0, 30), rows=st.integers(0, 4))
def test_the_sparkline_drops_exactly_the_non_finite_values(
    values: list[float], width: int, rows: int
) -> None:
    """Whatever the series holds, the line is that of its finite values."""
    finite = [v for v in values if math.isfinite(v)]
    assert sparkline_text(values, width, rows) == sparkline_text(finite, width, rows)


class _TextDepth(DepthChart):
    # The chart as it was drawn before the segments: one Text per level, wrapped by Rich.
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        assert self.book is not None
        levels = self.levels if options.height is None else max(1, (options.height - 1) // 2)
        bids, asks = depth_levels(self.book, levels)
        peak = max([c for _, _, c in bids + asks] or [1.0]) or 1.0
        places = _places(max(p for p, _, _ in bids + asks))
        rows = [(p, c, "red") for p, _, c in reversed(asks)]
        labels = [f"{_price(p, places):>12} {_qty(c):>10} " for p, c, _ in rows]
        bid_labels = [f"{_price(p, places):>12} {_qty(c):>10} " for p, _, c in bids]
        label_width = max(len(s) for s in labels + bid_labels)
        bar_width = max(1, options.max_width - label_width)
        for (_, cum, style), label in zip(rows, labels, strict=True):
            yield Text(label.rjust(label_width)) + Text(_bar(cum / peak, bar_width), style=style)
        yield self.middle(places, options.max_width)  # unchanged: one Text before and since
        for (_, _, cum), label in zip(bids, bid_labels, strict=True):
            yield Text(label.rjust(label_width)) + Text(_bar(cum / peak, bar_width), style="green")


_SIDES = st.lists(st.tuples(st.floats(0.01, 1e5), st.floats(0.0, 1e4)), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    bids=_SIDES,
    asks=_SIDES,
    width=st.integers(1, 90),
    height=st.one_of(st.none(), st.integers(1, 25)),
)
def test_the_depth_chart_draws_what_a_text_per_level_drew(
    bids: list[tuple[float, float]],
    asks: list[tuple[float, float]],
    width: int,
    height: int | None,
) -> None:
    """Levels drawn as segments render the same lines, styles included, at any size."""
    book = OrderBook("X/USDT", 0, tuple(sorted(bids, reverse=True)), tuple(sorted(asks)))
    if not (book.bids or book.asks):
        return
    console = Console(width=width, file=None, color_system="truecolor", legacy_windows=False)
    options = console.options.update(width=width, height=height)
    ours = console.render_lines(DepthChart(book), options)
    theirs = console.render_lines(_TextDepth(book), options)
    assert ours == theirs


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3), max_size=80), width=st.integers(1, 50))
def test_the_sparkline_draws_what_its_text_drew(values: list[float], width: int) -> None:
    """Rows as segments render the same lines as the Text of the same characters."""
    console = Console(width=width, color_system="truecolor")
    for rows in (1, 3):
        options = console.options.update(width=width, height=rows)
        text = Text(sparkline_text(values, width, rows), style="cyan")
        assert console.render_lines(Sparkline(values, rows=rows), options) == (
            console.render_lines(text, options)
        )


class _EverChanging(FakeControl):
    """Every snapshot moves the equity and the marks: every such panel is dirty each tick."""

    def snapshot(self) -> Snapshot:
        snap = super().snapshot()
        step = Decimal(self.snapshot_calls)
        positions = tuple(
            dataclasses.replace(p, mark_price=(p.mark_price or p.entry_price) + step)
            for p in snap.portfolio.positions
        )
        portfolio = dataclasses.replace(
            snap.portfolio, equity=snap.portfolio.equity + step, positions=positions
        )
        return dataclasses.replace(snap, portfolio=portfolio)


def _record_draws(widget: Static, drawn: list[tuple[float, str]]) -> None:
    update = widget.update

    def recorded(content: VisualType = "", *, layout: bool = True) -> None:
        drawn.append((time.monotonic(), str(widget.id)))
        update(content, layout=layout)

    widget.update = recorded  # type: ignore[method-assign]


async def test_ticks_faster_than_the_frames_still_draw_one_panel_a_frame() -> None:
    """At the fastest refresh a panel is drawn, then the next a frame later, never sooner."""
    control = _EverChanging()
    app = Dashboard(control, UISettings(refresh_hz=30))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        drawn: list[tuple[float, str]] = []
        for name in ("equity", "positions", "risk"):
            _record_draws(app.query_one(f"#{name}", Static), drawn)
        await asyncio.sleep(0.6)
    assert {name for _, name in drawn} == {"equity", "positions", "risk"}
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(drawn)]
    assert len(gaps) >= 5
    assert min(gaps) >= _FRAME_S - _TIMER_EARLY_S
