"""The dashboard's steady loop: dropped strips freed at once, panels painted only on change."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.visual import VisualType

from config import UISettings
from dashboard import strips_free_themselves
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
