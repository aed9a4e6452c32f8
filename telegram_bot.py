"""Telegram: alerts out through a rate-limited queue, operator commands in, over one façade.

The bot is an adapter over `models.Control` and the read-only `models.Snapshot`, like the
dashboard (freqtrade's RPC layer). python-telegram-bot v22 runs in the caller's event loop:
`start()` is `initialize()` -> `start()` -> `updater.start_polling()`, and `stop()` undoes
them in reverse, with no second thread or loop.

Outgoing messages (alerts, command replies, edits) go through one `Outbox` drained by one
sender task that keeps Telegram's limits (per chat, per group per minute, overall),
honours `RetryAfter` and backs off on network errors without dropping anything. While
Telegram is unreachable alerts wait; identical ones (same coalescing key) merge into one
entry with a count, and a full queue folds new alerts into similar ones instead of dropping
them. Queued alerts of one chat are batched into one message of up to 4096 characters.

Commands are answered only in configured chats, and only to configured users when user ids
are set; everything else is ignored and logged. Commands that change what the bot does ask
for confirmation with an inline button and act only on an authorised press.

The parts live in their own modules, re-exported here: `telegram_outbox` (`Outbox`,
`RateLimiter`, `OutboxSender`, the spool of alerts held over a restart) and
`telegram_commands` (`TelegramCommands`, the handlers and their confirmations).
`TelegramBot` wires them: lifecycle, connection and alert intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from config import TelegramSettings
from error_handler import ConfigError
from models import Control
from telegram_commands import ModeSwitch as ModeSwitch
from telegram_commands import TelegramCommands as TelegramCommands
from telegram_commands import authorised_only as authorised_only
from telegram_outbox import Outbox as Outbox
from telegram_outbox import OutboxSender as OutboxSender
from telegram_outbox import OutgoingMessage as OutgoingMessage
from telegram_outbox import RateLimiter as RateLimiter
from telegram_outbox import restore_spooled as restore_spooled
from telegram_outbox import spool_alerts as spool_alerts
from telegram_templates import (
    COMMANDS,
    Alert,
    esc,
    plain_text,
    reconciliation_report,
    split_text,
    text_alert,
)
from utils.utilities import (
    Clock,
    WallClock,
    backoff_delay,
    redact,
    register_secret,
)


log = structlog.get_logger(__name__)

# Alerts raised before start() are kept up to this many (start normally follows at once).
_EARLY_LIMIT: Final = 10_000


# -- The bot ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelegramStats:
    """Counters for the dashboard and tests."""

    sent_messages: int = 0
    delivered_alerts: int = 0
    coalesced: int = 0
    folded: int = 0
    retry_after: int = 0
    network_errors: int = 0
    dropped: int = 0
    ignored_updates: int = 0
    pending: int = 0


class TelegramBot:
    """Alerts and operator commands over Telegram, driven by a `Control`.

    Args:
        settings: the telegram settings group; without a token the bot is disabled and every
            method is a no-op.
        control: the operator façade (pause, resume, stop_buy, force_exit, reconcile, snapshot).
        mode_switch: switches between "sim" and "live" for /mode; None disables /mode switching.
        clock: wall time for message timestamps (coalescing notes).
        poll_timeout: long-poll seconds for getUpdates.
        total_messages_per_second: the overall sending limit (Telegram: 30).
        group_messages_per_minute: the per-group limit (Telegram: 20).
        queue_capacity: queued alerts per chat before similar ones are folded together.
        batch_alerts: join queued alerts of one chat into one message (up to 4096 chars).
        retry_base: first backoff after a network error, seconds.
        retry_cap: longest backoff, seconds.
        confirm_ttl_s: how long a confirmation button stays valid.
        prefix: text put before every alert (e.g. "[sim]").
        rng: jitter source.
        spool: where alerts still undelivered at `stop` are kept (JSON); the next `start`
            queues them again, marked as held over, and removes the file. None: they are
            logged as undelivered.
    """

    def __init__(
        self,
        settings: TelegramSettings,
        control: Control,
        *,
        mode_switch: ModeSwitch | None = None,
        clock: Clock | None = None,
        poll_timeout: float = 10.0,
        total_messages_per_second: float = 30.0,
        group_messages_per_minute: int = 20,
        queue_capacity: int = 1000,
        batch_alerts: bool = True,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        confirm_ttl_s: float = 120.0,
        prefix: str = "",
        rng: random.Random | None = None,
        spool: Path | None = None,
    ) -> None:
        self._settings = settings
        self._spool = spool
        self._clock = clock or WallClock()
        self._poll_timeout = poll_timeout
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._prefix = prefix
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._enabled = settings.enabled
        self._chat_ids = frozenset(settings.chat_ids)
        self._user_ids = frozenset(settings.user_ids)
        self._outbox = Outbox(queue_capacity)
        self._counters: Counter[str] = Counter()
        self._early: list[Alert] = []
        self._early_lock = threading.Lock()
        self._early_overflow = 0
        self._logged_disabled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: Any = None
        self._ready = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._stopped = False
        self._is_rejected = False
        self._sender = OutboxSender(
            self._outbox,
            RateLimiter(
                settings.max_messages_per_second,
                total_messages_per_second,
                group_messages_per_minute,
            ),
            self._counters,
            self._ready,
            self._backoff,
            batch=batch_alerts,
        )
        self._commands = TelegramCommands(
            control,
            self._sender.reply,
            chat_ids=self._chat_ids,
            user_ids=self._user_ids,
            counters=self._counters,
            mode_switch=mode_switch,
            confirm_ttl_s=confirm_ttl_s,
        )
        self._sender_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        if self._enabled and settings.token is not None:
            register_secret(settings.token.get_secret_value())
        if self._enabled and settings.base_url:
            try:
                api_urls(settings.base_url)
            except ValueError as e:
                raise ConfigError(str(e), component="telegram") from e

    # -- Public API ------------------------------------------------------------------------

    @property
    def is_enabled(self) -> bool:
        """Return True when a token is configured."""
        return self._enabled

    @property
    def is_connected(self) -> bool:
        """Return True once the Bot API answered and polling runs."""
        return self._ready.is_set()

    @property
    def stats(self) -> TelegramStats:
        """Return the counters so far."""
        c = self._counters
        return TelegramStats(
            sent_messages=c["sent_messages"],
            delivered_alerts=c["delivered_alerts"],
            coalesced=c["coalesced"],
            folded=c["folded"],
            retry_after=c["retry_after"],
            network_errors=c["network_errors"],
            dropped=c["dropped"],
            ignored_updates=c["ignored_updates"],
            pending=len(self._outbox),
        )

    async def start(self) -> None:
        """Connect and start polling in the running loop; keep retrying in the background.

        Alerts queue from the moment this returns even when Telegram is unreachable.
        """
        if not self._enabled:
            self._log_disabled()
            return
        if self._loop is not None:
            return
        if not self._chat_ids:
            log.warning("telegram_no_chat_ids", hint="alerts have nowhere to go")
        self._app = self._build_application()
        with self._early_lock:  # from here on notify() hands alerts to the loop
            self._loop = asyncio.get_running_loop()
            early, self._early = self._early, []
        if self._early_overflow:
            log.warning("telegram_early_overflow", dropped=self._early_overflow)
        for alert in early:
            self._enqueue_alert(alert)
        restore_spooled(self._spool, self._outbox, self._chat_ids)
        self._sender_task = self._loop.create_task(
            self._sender.run(self._app.bot), name="telegram_sender"
        )
        self._connect_task = self._loop.create_task(self._connect_loop(), name="telegram_connect")
        # Return after the first attempt: connected, or retrying in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), timeout=15.0)

    async def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Stop polling, flush queued messages for up to `flush_timeout`, then shut down.

        The alerts still undelivered are spooled for the next start (`spool_alerts`), also
        when the caller's deadline cancels the stop first: the daemon gives each shutdown
        step 1.5 s, less than a rate-limited or slow Telegram can take to flush, and the
        process ends right after (a "trading stopped" alert must not end with it).
        """
        if self._loop is None or self._stopped:
            return
        self._stopped = True
        app = self._app
        flushed = False
        try:
            if self._connect_task is not None:
                self._connect_task.cancel()
                await asyncio.gather(self._connect_task, return_exceptions=True)
            if app.updater is not None and app.updater.running:
                with contextlib.suppress(TimeoutError):
                    # A long poll ends at once; PTB's retry sleep after a network error does not.
                    await asyncio.wait_for(app.updater.stop(), timeout=2.0)
            await self._sender.flush(flush_timeout)
            flushed = True
        finally:
            try:
                if self._sender_task is not None:
                    self._sender_task.cancel()  # a batch on its way is put back (the sender)
                    await asyncio.gather(self._sender_task, return_exceptions=True)
            finally:
                self._hold_undelivered()
                if not flushed:  # cut short: the HTTP clients are closed all the same
                    await app.bot.shutdown()
        if app.running:
            await app.stop()
        await app.shutdown()
        await app.bot.shutdown()  # closes the HTTP clients even if initialize() never finished
        self._ready.clear()
        log.info("telegram_stopped", **self._counters)

    def _hold_undelivered(self) -> None:
        # What the sender did not deliver: alerts to the spool, replies are given up.
        left = self._outbox.drain()
        held = spool_alerts(self._spool, [m for m in left if not m.interactive])
        if len(left) > held:
            log.warning("telegram_undelivered", messages=len(left) - held)
        for message in left:
            message.settle(delivered=False)

    # -- Alerts -----------------------------------------------------------------------------

    def notify(self, message: str | Alert) -> None:
        """Queue an alert for every configured chat; safe from any thread, never blocks.

        A `str` is plain text (escaped here); an `Alert` from the templates is HTML.
        """
        if not self._enabled:
            self._log_disabled()
            return
        alert = text_alert(message) if isinstance(message, str) else message
        with self._early_lock:
            loop = self._loop
            if loop is None:  # not started yet: keep it for start()
                if len(self._early) < _EARLY_LIMIT:
                    self._early.append(alert)
                else:
                    self._early_overflow += 1
                return
        if self._stopped or self._is_rejected:
            log.warning("telegram_alert_not_sent", text=plain_text(alert.text)[:200])
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._enqueue_alert(alert)
            return
        try:
            loop.call_soon_threadsafe(self._enqueue_alert, alert)
        except RuntimeError:  # the loop is closed: the daemon is exiting
            log.warning("telegram_alert_not_sent", text=plain_text(alert.text)[:200])

    async def notify_async(self, message: str | Alert) -> None:
        """Queue an alert from async code (returns at once; see `deliver` to wait)."""
        self.notify(message)

    async def deliver(self, message: str | Alert, *, timeout_s: float = 30.0) -> bool:
        """Queue an alert and wait until every chat got it; False on timeout or failure."""
        if not self._enabled or self._loop is None or self._stopped:
            if not self._enabled:
                self._log_disabled()
            return False
        alert = text_alert(message) if isinstance(message, str) else message
        waiters = self._enqueue_alert(alert, wait=True)
        if not waiters:
            return False
        try:
            results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=timeout_s)
        except TimeoutError:
            return False
        return all(results)

    async def post_startup_report(self, report: str, *, timeout_s: float = 30.0) -> bool:
        """Send the start-up reconciliation report and wait until it was delivered.

        Returns:
            True when every chat received it within `timeout_s`.
        """
        delivered = await self.deliver(reconciliation_report(report), timeout_s=timeout_s)
        log.info("telegram_startup_report", delivered=delivered)
        return delivered

    # -- Connection ------------------------------------------------------------------------

    def _build_application(self) -> Any:
        from telegram.ext import (
            ApplicationBuilder,
            CallbackQueryHandler,
            CommandHandler,
            MessageHandler,
            filters,
        )

        assert self._settings.token is not None
        builder = (
            ApplicationBuilder()
            .token(self._settings.token.get_secret_value())
            .concurrent_updates(True)
            .get_updates_read_timeout(5.0)
        )
        if self._settings.base_url:
            api_url, file_url = api_urls(self._settings.base_url)
            builder = builder.base_url(api_url).base_file_url(file_url)
        app = builder.build()
        only_new = filters.UpdateType.MESSAGE  # an edited "/forceexit" must not act twice
        for name in COMMANDS:
            app.add_handler(CommandHandler(name, self._commands.on_command, filters=only_new))
        app.add_handler(MessageHandler(filters.COMMAND & only_new, self._commands.on_unknown))
        app.add_handler(CallbackQueryHandler(self._commands.on_callback))
        app.add_error_handler(self._commands.on_error)
        return app

    async def _connect_once(self) -> None:
        from telegram import BotCommand

        app = self._app
        await app.initialize()
        if not app.running:
            await app.start()
        if not app.updater.running:
            # Commands sent while the bot was away are dropped: a stale /forceexit must not act.
            await app.updater.start_polling(
                timeout=self._poll_timeout,
                drop_pending_updates=True,
                allowed_updates=["message", "callback_query"],
                error_callback=self._on_poll_error,
            )
        try:
            await app.bot.set_my_commands([BotCommand(n, d[:256]) for n, d in COMMANDS.items()])
        except Exception as e:  # the menu is cosmetic; never block start-up
            log.warning("telegram_set_commands_failed", error=type(e).__name__)
        self._ready.set()
        self._sender.poke()
        log.info("telegram_connected", chats=len(self._chat_ids), users=len(self._user_ids))

    async def _connect_loop(self) -> None:
        from telegram.error import InvalidToken, TelegramError

        attempt = 0
        try:
            while not self._stopped:
                try:
                    await self._connect_once()
                    return
                except InvalidToken:
                    # Retrying cannot help; alerts are logged instead of queued from now on.
                    log.error("telegram_invalid_token", hint="check KESTREL_TELEGRAM__TOKEN")
                    self._is_rejected = True
                    return
                except (TelegramError, OSError) as e:
                    attempt += 1
                    self._first_attempt.set()
                    delay = self._backoff(attempt)
                    log.warning(
                        "telegram_unreachable",
                        attempt=attempt,
                        delay=round(delay, 2),
                        error=type(e).__name__,
                        message=redact(str(e))[:200],
                    )
                    await asyncio.sleep(delay)
        finally:
            self._first_attempt.set()

    def _on_poll_error(self, error: Any) -> None:
        # Called by PTB's polling retry loop; it must not raise. PTB backs off on its own.
        self._counters["poll_errors"] += 1
        if (
            self._counters["poll_errors"] in (1, 10, 100)
            or self._counters["poll_errors"] % 1000 == 0
        ):
            log.warning(
                "telegram_poll_error",
                count=self._counters["poll_errors"],
                error=type(error).__name__,
                message=redact(str(error))[:200],
            )

    def _backoff(self, attempt: int) -> float:
        # The first failure waits up to `retry_base`, doubling per failure up to `retry_cap`.
        return backoff_delay(attempt - 1, base=self._retry_base, cap=self._retry_cap, rng=self._rng)

    def _log_disabled(self) -> None:
        if not self._logged_disabled:
            self._logged_disabled = True
            log.info("telegram_disabled", reason="no token configured")

    # -- Queueing --------------------------------------------------------------------------

    def _enqueue_alert(self, alert: Alert, *, wait: bool = False) -> list[asyncio.Future[bool]]:
        # Runs on the loop thread only: every Outbox mutation happens here or in the sender.
        if self._stopped or self._is_rejected:
            log.warning("telegram_alert_not_sent", text=plain_text(alert.text)[:200])
            return []
        text = f"{esc(self._prefix)} {alert.text}" if self._prefix else alert.text
        chunks = split_text(text)
        waiters: list[asyncio.Future[bool]] = []
        loop = asyncio.get_running_loop()
        now_ms = self._clock.now_ms()
        for chat_id in sorted(self._chat_ids):
            for number, chunk in enumerate(chunks):
                key = alert.coalesce_key if len(chunks) == 1 else f"{alert.coalesce_key}#{number}"
                message = OutgoingMessage(chat_id, chunk, alert.category, key=key, ts_first=now_ms)
                if wait:
                    message.waiters.append(loop.create_future())
                    waiters.extend(message.waiters)
                outcome = self._outbox.put(message)
                if outcome != "queued":
                    self._counters[outcome] += 1
        self._sender.wake()
        return waiters


def api_urls(base_url: str) -> tuple[str, str]:
    """Return PTB's (base_url, base_file_url) for a Bot API server root.

    "http://127.0.0.1:8081" becomes "http://127.0.0.1:8081/bot" and ".../file/bot" (PTB
    appends the token); a URL already ending in "/bot" or holding "{token}" is kept.
    """
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError("telegram base_url must start with http:// or https://")
    if "{token}" in url:
        return url, url.replace("/bot{token}", "/file/bot{token}")
    if url.endswith("/bot"):
        return url, url[: -len("/bot")] + "/file/bot"
    return f"{url}/bot", f"{url}/file/bot"
