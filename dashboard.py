"""The Textual terminal dashboard (`Dashboard`) and its yes/no `ConfirmScreen`.

`Dashboard` runs inside the bot's own event loop (`await dashboard.run_async()`), polls
`control.snapshot()` `refresh_hz` times a second and re-renders only the panels whose inputs
changed, one per frame. Its panels are `status_view`'s sections. Keys and the quit
behaviour are described in `ui`'s docstring; `ui` re-exports these names.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial, wraps
from typing import Any, ClassVar, Final

import structlog
from rich.console import RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.strip import Strip
from textual.timer import Timer
from textual.widgets import Button, Footer, Label, Static

from config import UISettings
from models import BotState, Control, Snapshot
from status_view import (
    extra,
    pairs_of,
    section_depth,
    section_equity,
    section_errors,
    section_metrics,
    section_models,
    section_pairs,
    section_positions,
    section_ranking,
    section_risk,
    section_status,
    section_system,
    section_trades,
)


log = structlog.get_logger(__name__)

SwitchMode = Callable[[str], Awaitable[None]]
"""`await switch_mode("live" | "sim")`: rebuild the exchange side in the other mode."""

NO_KEYS_REASON: Final = (
    "live trading needs API keys: set KESTREL_EXCHANGE__API_KEY and KESTREL_EXCHANGE__API_SECRET"
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
_PANELS_PER_FRAME: Final = 1
_FRAME_S: Final = 1 / 30
_TIMER_EARLY_S: Final = 0.002  # how early a timer may wake: within it, a frame has come
_MAIN_ACTIONS: Final = frozenset(
    {"cycle_pair", "toggle_pause", "reset_risk", "toggle_mode", "quit_bot"}
)
# Grid order (4 columns): equity | positions (2) | pairs; depth | trades (2) | ranking;
# strategy | risk (2) | model & anomalies; system | errors (3).
_PANELS: Final = (
    "equity",
    "positions",
    "pairs",
    "depth",
    "trades",
    "ranking",
    "metrics",
    "risk",
    "models",
    "system",
    "errors",
)  # in grid order
_TITLES: Final = {
    "equity": "Equity & PnL",
    "pairs": "Pairs",
    "ranking": "Strategy ranking",
    "models": "Model & anomalies",
    "positions": "Open positions",
    "risk": "Risk",
    "depth": "Market depth",
    "trades": "Recent trades",
    "metrics": "Strategy",
    "system": "System",
    "errors": "Errors",
}


def _tip(snap: Snapshot) -> tuple[int, tuple[int, float] | None]:
    # The equity curve counts by (length, last point): never compared element-wise.
    curve = snap.equity_curve
    return (len(curve), curve[-1] if curve else None)


Panel = Callable[[Snapshot, str | None, int], Any]
# What each panel depends on (it is re-rendered only when this changes) and how it is
# drawn. `rows` (the panel's height) matters to the panels that cut their list to fit:
# only what fits is rendered, so a 100-position table is cut to the panel's rows.
_KEYS: Final[dict[str, Panel]] = {
    "equity": lambda snap, pair, rows: (snap.portfolio, _tip(snap)),
    "positions": lambda snap, pair, rows: (snap.portfolio.positions, snap.open_orders, rows),
    "risk": lambda snap, pair, rows: (
        snap.trading_state, snap.risk, snap.portfolio.equity, snap.portfolio.positions
    ),
    "depth": lambda snap, pair, rows: (pair, snap.order_books.get(pair) if pair else None),
    "trades": lambda snap, pair, rows: (snap.recent_trades, rows),
    "metrics": lambda snap, pair, rows: (
        pair, snap.recent_trades, _tip(snap), snap.scores, snap.ranking,
        snap.last_decisions.get(pair) if pair else None, snap.model,
    ),
    "system": lambda snap, pair, rows: (
        snap.mode, snap.state, snap.rate_limit_budget, snap.late_streams
    ),
    "pairs": lambda snap, pair, rows: (snap.pairs, snap.markets, pair, rows),
    "ranking": lambda snap, pair, rows: (extra(snap, "ranking"), snap.scores, rows),
    "models": lambda snap, pair, rows: (snap.model, extra(snap, "anomalies"), rows),
    "errors": lambda snap, pair, rows: (snap.errors, rows),
}  # fmt: skip
_BODIES: Final[dict[str, Panel]] = {
    "equity": lambda snap, pair, rows: section_equity(snap),
    # header, "+N more", orders line
    "positions": lambda snap, pair, rows: section_positions(snap, limit=rows - 3),
    "risk": lambda snap, pair, rows: section_risk(snap),
    "depth": lambda snap, pair, rows: section_depth(snap, pair),
    "trades": lambda snap, pair, rows: section_trades(snap, limit=rows - 1),
    "metrics": lambda snap, pair, rows: section_metrics(snap, pair),
    "system": lambda snap, pair, rows: section_system(snap),
    "pairs": lambda snap, pair, rows: section_pairs(snap, pair, limit=rows - 1),
    "ranking": lambda snap, pair, rows: section_ranking(snap, limit=rows - 1),
    "models": lambda snap, pair, rows: section_models(snap, limit=max(1, (rows - 2) // 2)),
    "errors": lambda snap, pair, rows: section_errors(snap, limit=rows),
}


def _panel_key(name: str, snap: Snapshot, pair: str | None, rows: int) -> Any:
    return _KEYS[name](snap, pair, rows)


def _panel_body(name: str, snap: Snapshot, pair: str | None, rows: int) -> RenderableType:
    body: RenderableType = _BODIES[name](snap, pair, rows)
    return body


def strips_free_themselves() -> None:
    """Stop Textual's `Strip` from caching itself, so a dropped strip is freed at once.

    `Strip.divide` cut only at the strip's end returns `[self]` and keeps that list in the
    strip's own cache; `crop_extend` to the strip's own span keeps the strip itself
    (textual 8.2.8, the newest). The compositor divides every line it paints, so every
    strip a panel drops was a reference cycle: left for the cyclic collector, old enough by
    then to wait for a full collection (about 14,000 objects every few seconds at 100
    pairs, 5-11 ms each). Both now return the same result without keeping it; every other
    case is Textual's own code. Idempotent.
    """
    if Strip.divide.__name__ == "divide_without_self":
        return
    divide, crop_extend = Strip.divide, Strip.crop_extend

    @wraps(divide)
    def divide_without_self(self: Strip, cuts: Iterable[int]) -> Sequence[Strip]:
        cuts = list(cuts)
        if [cut for cut in cuts if cut <= self.cell_length] == [self.cell_length]:
            return [self]
        return divide(self, cuts)

    @wraps(crop_extend)
    def crop_extend_without_self(self: Strip, start: int, end: int, style: Style | None) -> Strip:
        if start <= 0 and end == self.cell_length:  # extended by nothing, cropped to itself
            return self
        return crop_extend(self, start, end, style)

    Strip.divide = divide_without_self  # type: ignore[method-assign]
    Strip.crop_extend = crop_extend_without_self  # type: ignore[method-assign]


def _freeze_start_up_heap() -> None:
    # Once the first frame is drawn, what the dashboard built to start (styles, widgets,
    # caches) lives as long as it does: out of the cyclic GC's generations, a full
    # collection no longer walks it (it held the loop 27-140 ms at 100 pairs; under 10 ms
    # after). The daemon does the same with its own start-up heap (runner `_started`).
    # Frozen objects that become cyclic garbage wait for `on_unmount`'s unfreeze.
    gc.freeze()


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
        grid-size: 4 4; grid-columns: 1fr 1fr 1fr 1fr; grid-rows: 1fr 1fr 13 6;
        grid-gutter: 0 1;
    }
    #grid > Static { border: round $primary-darken-2; padding: 0 1; height: 100%; }
    #positions, #trades, #risk { column-span: 2; }
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
        strips_free_themselves()
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
        self._drawn_at = -math.inf  # time.monotonic() of the last panel drawn
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
        self.call_after_refresh(_freeze_start_up_heap)

    def on_unmount(self) -> None:
        """Hand the frozen heap back to the collector: the dashboard's objects may now go."""
        gc.unfreeze()  # the daemon's start-up heap too; the bot stops with its dashboard

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
        depth_title = f"Market depth {self.pair or ''}"
        if self._widgets["depth"].border_title != depth_title:  # setting it repaints the panel
            self._widgets["depth"].border_title = depth_title
        self._draw_dirty(len(_PANELS) if first else _PANELS_PER_FRAME)

    def _rows(self, name: str) -> int:
        return self._widgets[name].content_size.height or 20  # 0 before the first layout

    def _draw_dirty(self, limit: int = _PANELS_PER_FRAME) -> None:
        # Repaint cost grows with the area that changed, so at most _PANELS_PER_FRAME
        # panels are redrawn per frame and the rest follow in the next frames (30 a second):
        # the loop is held a few milliseconds at a time, never for a whole-screen repaint.
        # One, not two: at 100 pairs Textual paints a panel in 3-5 ms, and two in one frame,
        # with a collection inside it, held the loop past 10 ms. Panels that keep changing
        # take turns (a redrawn panel goes to the back of the queue). A frame is a time,
        # not a call: a tick or a key within a frame of the last panel drawn leaves the
        # next to the frame's timer, so at 30 Hz two panels are not painted in one screen
        # update (the tick's and the timer's: up to 11 ms at 100 pairs, 7-9 since).
        if self._snapshot is None:
            return
        since = time.monotonic() - self._drawn_at
        if limit <= _PANELS_PER_FRAME and since < _FRAME_S - _TIMER_EARLY_S:
            limit = 0  # this frame's panel is drawn already
        for _ in range(min(limit, len(self._dirty))):
            name = next(iter(self._dirty))
            self._keys[name] = self._dirty.pop(name)
            body = _panel_body(name, self._snapshot, self.pair, self._rows(name))
            # The grid fixes every panel's size, so no re-layout is needed.
            self._widgets[name].update(body, layout=False)
            self._drawn_at = time.monotonic()
        if self._dirty and self._drain_timer is None:
            wait = self._drawn_at + _FRAME_S - time.monotonic()
            self._drain_timer = self.set_timer(max(wait, 0.0), self._on_drain_timer)

    def _on_drain_timer(self) -> None:
        self._drain_timer = None
        self._draw_dirty()

    def _pair_label(self, pairs: Sequence[str]) -> str | None:
        if self.pair is None:
            return None
        return f"{self.pair} ({pairs.index(self.pair) + 1}/{len(pairs)})"

    def say(self, message: str) -> None:
        """Show `message` on the message line (e.g. the daemon saying a replay finished)."""
        self._say(message)

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
