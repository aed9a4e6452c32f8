"""The operator's surfaces around a run: Telegram, the terminal dashboard, the web view.

Part of `runner` (which re-exports it). Each surface drives the engine's `Control` facade;
a mode switch (the run's `switch_mode`, handed in) stops the run in order and asks `main`
to start it again in the other mode.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from assembly import Closer
from config import Settings
from models import ErrorRaised, Event, EventSink
from utils.utilities import (
    setup_logging,
)


if TYPE_CHECKING:
    from approved_params import ApprovedParams
    from dashboard import Dashboard
    from pipeline import Engine

log = structlog.get_logger(__name__)


class TelegramNotifier:
    """Turn events from the alert bus into Telegram alerts (`telegram_templates.render_event`)."""

    def __init__(self, bot: Any) -> None:
        self.bot = bot

    def __call__(self, event: Event) -> None:
        """Queue the alert for `event`."""
        import telegram_templates as t

        self.bot.notify(t.render_event(event))


class Operator:
    """Start and stop the operator surfaces of a run (see the module docstring).

    Attributes:
        dashboard: the terminal dashboard while it is shown, else None.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        stop: asyncio.Event,
        alert: EventSink,
        switch_mode: Callable[[str], Awaitable[None]],
        add_notifier: Callable[[EventSink], None],
        add_closer: Callable[[Closer], None],
        forced_params: ApprovedParams | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stop = stop
        self.alert = alert
        self.switch_mode = switch_mode
        self._add_notifier = add_notifier
        self._add_closer = add_closer
        self._forced_params = forced_params
        self.dashboard: Dashboard | None = None

    async def start_telegram(self) -> None:
        """Start the Telegram bot in this loop when a token is configured."""
        if not self.settings.telegram.enabled:
            return
        from telegram_bot import TelegramBot

        async def telegram_switch(target: str) -> str:
            # /mode, after the operator confirmed: the same orderly restart as the dashboard.
            await self.switch_mode(target)
            return f"stopping in order; restarting in {target} mode"

        bot = TelegramBot(
            self.settings.telegram,
            self.engine,
            mode_switch=telegram_switch,
            # Alerts Telegram could not take before a stop are sent after the next start.
            spool=self.settings.storage.data_dir / "state" / "telegram_outbox.json",
        )
        await bot.start()
        self._add_notifier(TelegramNotifier(bot))
        forced = self._forced_params
        if forced is not None:
            self.alert(
                ErrorRaised(
                    f"trading on parameters forced past a failed out-of-sample gate: "
                    f"{forced.params} ({forced.path})",
                    component="strategy",
                )
            )
        self._add_closer(("telegram", bot.stop))
        report = await self.engine.reconcile()
        await bot.post_startup_report(report, timeout_s=10.0)

    def ui_tasks(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        """Start the dashboard (interactive terminals only) and the web view if enabled."""
        tasks: list[asyncio.Task[Any]] = []
        ui = self.settings.ui
        if ui.web_enabled:
            tasks.append(tg.create_task(self._web(), name="web"))
        if ui.enabled and sys.stdout.isatty() and sys.stdin.isatty():
            # Textual owns the terminal: logs go to the file only, or they would tear it.
            setup_logging(
                self.settings.storage.log_dir,
                level=self.settings.logging.level,
                console=False,
                cache_loggers=True,
            )
            tasks.append(tg.create_task(self._dashboard(), name="dashboard"))
        return tasks

    async def _dashboard(self) -> None:
        from ui import Dashboard

        app = Dashboard(
            self.engine,
            self.settings.ui,
            can_switch_live=self.settings.exchange.has_keys,
            switch_mode=self.switch_mode,
            live_blocked_reason="set KESTREL_EXCHANGE__API_KEY and KESTREL_EXCHANGE__API_SECRET "
            "to trade live",
        )

        async def close_when_stopped() -> None:
            await self.stop.wait()
            app.exit()

        closer = asyncio.create_task(close_when_stopped())
        self.dashboard = app
        try:
            await app.run_async()
        finally:
            self.dashboard = None
            closer.cancel()
        self.stop.set()

    async def _web(self) -> None:
        from ui import WebView

        web = WebView(
            self.engine, self.settings.ui, reports_dir=self.settings.storage.data_dir / "reports"
        )
        await web.start()
        log.info("web_view_started", url=f"http://127.0.0.1:{web.port}/")
        try:
            await asyncio.Event().wait()
        finally:
            await web.stop()
