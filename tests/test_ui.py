"""The dashboard headless (Textual pilot) and the Rich renderers it shares with --no-ui."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import pytest
from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

from config import UISettings
from dashboard import _FRAME_S
from models import BotState, OrderBook, Side
from tests.conftest import eventually
from tests.test_ui_support import FakeControl, make_snapshot, widget_text
from ui import (
    ConfirmScreen,
    Dashboard,
    depth_levels,
    equity_json,
    max_drawdown,
    render_snapshot,
    sparkline_text,
    to_jsonable,
)


SIZE = (160, 50)


def text_of(app: App[None], panel: str) -> str:
    return widget_text(app.query_one(f"#{panel}"))


def dashboard(pilot: Pilot[None]) -> Dashboard:
    """The dashboard the pilot drives."""
    assert isinstance(pilot.app, Dashboard)
    return pilot.app


class SwitchRecorder:
    """A `switch_mode` callable that remembers its targets."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def __call__(self, mode: str) -> None:
        self.targets.append(mode)


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
def switch() -> SwitchRecorder:
    return SwitchRecorder()


@pytest.fixture
def make_app(control: FakeControl, switch: SwitchRecorder) -> Callable[..., Dashboard]:
    def build(**kwargs: object) -> Dashboard:
        options: dict[str, object] = {"switch_mode": switch, "can_switch_live": False}
        options.update(kwargs)
        return Dashboard(control, UISettings(refresh_hz=20), **options)  # type: ignore[arg-type]

    return build


# -- Renderers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "width", "rows", "expected"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], 8, 1, "▁▂▃▄▅▆▇█"),
        ([5, 5, 5], 10, 1, "▄▄▄"),
        ([0, 1], 2, 2, " █\n▁█"),
        ([1, math.nan, 8], 5, 1, "▁█"),
        ([], 5, 1, ""),
        (list(range(100)), 10, 1, "▁▂▃▃▄▅▆▆▇█"),
    ],
)
def test_sparkline_scales_and_resamples(
    values: list[float], width: int, rows: int, expected: str
) -> None:
    """The sparkline spans low to high, resamples to the width and ends on the last value."""
    assert sparkline_text(values, width, rows) == expected


def test_depth_levels_accumulate_from_the_best_price() -> None:
    """Cumulative depth sums quantities outward from the best price, per side."""
    book = OrderBook("X/USDT", 0, bids=((10.0, 1.0), (9.0, 2.0), (8.0, 4.0)), asks=((11.0, 3.0),))
    bids, asks = depth_levels(book, 2)
    assert bids == [(10.0, 1.0, 1.0), (9.0, 2.0, 3.0)]
    assert asks == [(11.0, 3.0, 3.0)]


@pytest.mark.parametrize(
    ("values", "expected"),
    [([100, 120, 90, 130, 117], 0.25), ([1, 2, 3], 0.0), ([], 0.0)],
)
def test_max_drawdown_is_the_worst_fall_from_a_peak(values: list[float], expected: float) -> None:
    """Max drawdown is measured from the running peak."""
    assert max_drawdown(values) == pytest.approx(expected)


def test_render_snapshot_prints_the_state_as_text() -> None:
    """The --no-ui renderable carries the same numbers as the dashboard."""
    console = Console(width=150, record=True, color_system=None)
    console.print(render_snapshot(make_snapshot()))
    text = console.export_text()
    for expected in (
        "SIM",
        "10,321.45",
        "4,321.09",
        "+280.00",  # unrealised: +300 long BTC, -20 short ETH
        "50,600.00",
        "-31.20",
        "mid 50,600.00",
        "50.0%",
        "30.3% / 50%",
        "strategy:open",
        "bybit timeout",
        "83%",
    ):
        assert expected in text, expected


def test_the_system_panel_names_the_late_streams() -> None:
    """The streams the bursts no longer wait for are named in the system panel."""
    console = Console(width=150, record=True, color_system=None)
    console.print(render_snapshot(make_snapshot()))
    assert "late streams" not in console.export_text()
    console.print(render_snapshot(make_snapshot(late_streams=("SOL/USDT", "XRP/USDT"))))
    assert re.search(r"late streams\s+SOL/USDT, XRP/USDT", console.export_text())


def test_to_jsonable_keeps_decimals_exact_and_drops_non_finite() -> None:
    """Decimals become strings, NaN becomes null, enums their values, tuples lists."""
    value = {
        "d": Decimal("0.10000"),
        "f": math.inf,
        "s": Side.BUY,
        "t": (1, 2.5),
        "n": None,
        "bad": Decimal("NaN"),
    }
    assert to_jsonable(value) == {
        "d": "0.10000",
        "f": None,
        "s": "buy",
        "t": [1, 2.5],
        "n": None,
        "bad": None,
    }


def test_equity_json_downsamples_but_keeps_the_last_point() -> None:
    """A long curve is thinned to the requested points, ending on the latest value."""
    curve = tuple((i, float(i)) for i in range(100))
    body = equity_json(make_snapshot(equity_curve=curve), points=4)
    assert body["points"] == [[24, 24.0], [49, 49.0], [74, 74.0], [99, 99.0]]
    assert body["total_points"] == 100
    assert body["equity"] == "10321.45"


# -- Dashboard -------------------------------------------------------------------------------


@pytest.fixture
async def pilot(make_app: Callable[..., Dashboard]) -> AsyncIterator[Pilot[None]]:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        yield pilot


async def test_panels_show_the_snapshot_numbers(pilot: Pilot[None]) -> None:
    """Every panel shows its part of the snapshot."""
    expected = {
        "status": ["SIM", "running", "reduced", "BTC/USDT (1/3)", "22:13:20 UTC"],
        "equity": ["Equity & PnL", "10,321.45", "4,321.09", "+8.00", "+280.00", "+3.21%"],
        "positions": ["BTC/USDT", "long", "50,600.00", "+300.00", "48,500.00", "short", "-20.00"],
        "trades": ["ETH/USDT", "3,050.00", "-31.20", "SOL/USDT", "+39.20"],
        "depth": ["Market depth BTC/USDT", "50,610.00", "mid 50,600.00", "50,590.00"],
        "metrics": ["50.0%", "1.26", "trend", "0.842", "approved", "ema_cross", "lgbm"],
        "risk": ["reduced", "30.3% / 50%", "exchange:closed", "strategy:open", "0.0123"],
        "system": ["sim", "83%"],
        "errors": ["NetworkError: bybit timeout"],
    }
    for panel, needles in expected.items():
        text = text_of(pilot.app, panel)
        for needle in needles:
            assert needle in text, (panel, needle)
    assert "▁" in text_of(pilot.app, "equity")  # the sparkline is drawn
    assert "█" in text_of(pilot.app, "depth")  # and the depth bars


@pytest.mark.parametrize(
    ("keys", "pair"),
    [
        (["right"], "ETH/USDT"),
        (["right", "right"], "SOL/USDT"),
        (["right", "right", "right"], "BTC/USDT"),
        (["left"], "SOL/USDT"),
        (["tab"], "ETH/USDT"),
        (["tab", "shift+tab"], "BTC/USDT"),
    ],
)
async def test_keys_switch_the_depth_pair(pilot: Pilot[None], keys: list[str], pair: str) -> None:
    """Left/right and tab/shift+tab cycle the selected pair, wrapping around."""
    await pilot.press(*keys)
    await pilot.pause()
    assert dashboard(pilot).pair == pair
    assert f"Market depth {pair}" in text_of(pilot.app, "depth")
    assert pair in text_of(pilot.app, "status")


async def test_depth_follows_the_selected_pair(pilot: Pilot[None]) -> None:
    """Switching pair redraws the depth chart with that pair's book."""
    await pilot.press("right")
    await pilot.pause()
    depth = text_of(pilot.app, "depth")
    assert "3,010.50" in depth
    assert "50,610.00" not in depth
    await pilot.press("right")
    await pilot.pause()
    assert "one-sided book" in text_of(pilot.app, "depth")


async def test_p_pauses_and_then_resumes(pilot: Pilot[None], control: FakeControl) -> None:
    """`p` calls control.pause when running and control.resume when paused."""
    await pilot.press("p")
    await eventually(lambda: control.calls == [("pause", "dashboard")])
    await eventually(lambda: "paused" in text_of(pilot.app, "status"))
    await pilot.press("p")
    await eventually(lambda: control.calls[-1] == ("resume", "dashboard"))
    await eventually(lambda: "running" in text_of(pilot.app, "status"))
    assert len(control.calls) == 2


@pytest.mark.parametrize(("answer", "expected"), [("y", 1), ("n", 0), ("escape", 0)])
async def test_r_resets_risk_only_after_confirmation(
    pilot: Pilot[None], control: FakeControl, answer: str, expected: int
) -> None:
    """`r` asks first; only an explicit yes calls control.reset_risk, as the dashboard."""
    await pilot.press("r")
    await pilot.pause()
    assert isinstance(pilot.app.screen, ConfirmScreen)
    assert "Reset risk?" in pilot.app.screen.question
    assert control.calls == []
    await pilot.press(answer)
    await pilot.pause()
    assert not isinstance(pilot.app.screen, ConfirmScreen)
    await eventually(lambda: control.calls == [("reset_risk", "dashboard")] * expected)
    if expected:
        await eventually(lambda: "risk reset" in text_of(pilot.app, "message"))
    else:
        assert "cancelled" in text_of(pilot.app, "message")


async def test_s_refuses_live_without_keys(
    pilot: Pilot[None], control: FakeControl, switch: SwitchRecorder
) -> None:
    """Without API keys `s` explains why and neither asks nor switches."""
    await pilot.press("s")
    await pilot.pause()
    assert not isinstance(pilot.app.screen, ConfirmScreen)
    assert "API keys" in text_of(pilot.app, "message")
    assert switch.targets == []


@pytest.mark.parametrize(("answer", "expected"), [("y", ["live"]), ("n", []), ("escape", [])])
async def test_s_switches_to_live_only_after_confirmation(
    make_app: Callable[..., Dashboard], switch: SwitchRecorder, answer: str, expected: list[str]
) -> None:
    """With keys, `s` opens a confirmation; only an explicit yes switches."""
    app = make_app(can_switch_live=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "SIM to LIVE" in app.screen.question
        await pilot.press("right")  # the dashboard's keys are off while asking
        assert app.pair == "BTC/USDT"
        await pilot.press(answer)
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await eventually(lambda: switch.targets == expected)
        if expected:
            await eventually(lambda: "switched to live" in text_of(app, "message"))
        else:
            assert "cancelled" in text_of(app, "message")


async def test_s_switches_back_to_sim_without_keys(
    control: FakeControl, make_app: Callable[..., Dashboard], switch: SwitchRecorder
) -> None:
    """Going from live back to sim needs no keys, but still a confirmation."""
    control.base = make_snapshot(mode="live")
    app = make_app(can_switch_live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#yes")
        await eventually(lambda: switch.targets == ["sim"])


async def test_s_without_a_switcher_says_so(make_app: Callable[..., Dashboard]) -> None:
    """When main passes no switch_mode, `s` says mode switching is unavailable."""
    app = make_app(switch_mode=None, can_switch_live=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert "not available" in text_of(app, "message")


async def test_q_stops_the_bot_and_quits(
    make_app: Callable[..., Dashboard], control: FakeControl
) -> None:
    """`q` awaits control.stop, then the app exits."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await eventually(lambda: not app.is_running)
    assert control.calls == [("stop", "operator quit the dashboard")]


async def test_q_can_leave_the_bot_running(
    make_app: Callable[..., Dashboard], control: FakeControl
) -> None:
    """With quit_stops_bot=False, `q` only closes the dashboard."""
    app = make_app(quit_stops_bot=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await eventually(lambda: not app.is_running)
    assert control.calls == []


async def test_redraws_when_the_snapshot_changes(pilot: Pilot[None], control: FakeControl) -> None:
    """A changed snapshot reaches the screen on the next tick, without a key press."""
    portfolio = dataclasses.replace(control.base.portfolio, equity=Decimal("12345.67"))
    control.base = make_snapshot(portfolio=portfolio, errors=("RateLimitError: slow down",))
    await eventually(lambda: "12,345.67" in text_of(pilot.app, "equity"))
    await eventually(lambda: "RateLimitError" in text_of(pilot.app, "errors"))


async def test_a_failing_snapshot_is_shown_and_survived(
    pilot: Pilot[None], control: FakeControl
) -> None:
    """A snapshot that raises is reported on screen; the dashboard keeps running."""
    control.fail_snapshot = True
    await eventually(lambda: "snapshot failed: store unavailable" in text_of(pilot.app, "message"))
    assert pilot.app.is_running
    control.fail_snapshot = False
    control.base = make_snapshot(mode="live")
    await eventually(lambda: "LIVE" in text_of(pilot.app, "status"))


async def test_pairs_fall_back_to_the_books(
    make_app: Callable[..., Dashboard], control: FakeControl
) -> None:
    """With no pair list, the dashboard selects among the pairs that have a book."""
    control.base = make_snapshot(pairs=())
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.pair == "BTC/USDT"
        await pilot.press("left")
        assert app.pair == "SOL/USDT"


async def test_a_redraw_is_spread_over_frames(pilot: Pilot[None], control: FakeControl) -> None:
    """When everything changes, one panel is redrawn at once and the rest in later frames."""
    app = pilot.app
    assert isinstance(app, Dashboard)
    panels = ("equity", "positions", "depth", "trades", "metrics", "risk", "system", "errors")
    # The list panels are redrawn once more after the first layout gives their heights:
    # start a frame after the last of those.
    await eventually(lambda: not app._dirty)
    await asyncio.sleep(_FRAME_S)
    before = {name: text_of(app, name) for name in panels}
    books = {
        p: dataclasses.replace(b, bids=b.bids[:1]) for p, b in control.base.order_books.items()
    }
    control.base = make_snapshot(
        portfolio=dataclasses.replace(control.base.portfolio, positions=(), equity=Decimal(7)),
        order_books=books,
        recent_trades=control.base.recent_trades[:1],
        scores={},
        risk={},
        rate_limit_budget={},
        errors=(),
    )
    app.refresh_snapshot()
    changed = [name for name in panels if text_of(app, name) != before[name]]
    assert len(changed) == 1
    await eventually(lambda: all(text_of(app, name) != before[name] for name in panels))


async def test_long_lists_are_cut_to_the_panel(
    make_app: Callable[..., Dashboard], control: FakeControl
) -> None:
    """Thirty positions show as many as fit, then how many more there are."""
    template = control.base.portfolio.positions[0]
    positions = tuple(
        dataclasses.replace(template, pair=f"C{i:02d}/USDT", qty=Decimal(i + 1)) for i in range(30)
    )
    control.base = make_snapshot(
        portfolio=dataclasses.replace(control.base.portfolio, positions=positions)
    )
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        rows = app.query_one("#positions").content_size.height
        shown = rows - 3  # header, "+N more" and the open-orders line
        await eventually(lambda: f"+{30 - shown} more" in text_of(app, "positions"))
        text = text_of(app, "positions")
        assert "C29/USDT" in text  # largest notional first
        assert "C00/USDT" not in text


async def test_a_failing_command_is_reported(pilot: Pilot[None], control: FakeControl) -> None:
    """A command that raises is reported on the message line; the dashboard keeps going."""
    control.fail_commands = True
    await pilot.press("p")
    await eventually(lambda: "paused failed: exchange unreachable" in text_of(pilot.app, "message"))
    assert pilot.app.is_running
    assert control.state is BotState.RUNNING


@pytest.mark.parametrize(
    ("theme", "expected"), [("dark", "textual-dark"), ("light", "textual-light")]
)
async def test_the_theme_follows_the_settings(
    control: FakeControl, theme: str, expected: str
) -> None:
    """settings.theme picks Textual's dark or light theme."""
    app = Dashboard(control, UISettings(theme=theme))  # type: ignore[arg-type]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.theme == expected


@pytest.mark.parametrize(("hz", "interval"), [(0.1, 0.5), (2.0, 0.5), (4.0, 0.25), (20.0, 0.05)])
def test_redraws_at_least_twice_a_second(control: FakeControl, hz: float, interval: float) -> None:
    """The redraw interval follows refresh_hz but never exceeds half a second."""
    app = Dashboard(control, UISettings(refresh_hz=hz))
    assert app.refresh_interval == pytest.approx(interval)
