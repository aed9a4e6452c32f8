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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import secrets
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from config import TelegramSettings
from error_handler import BotError, ConfigError
from models import Control, Snapshot
from telegram_templates import (
    COMMANDS,
    MAX_MESSAGE_CHARS,
    Alert,
    esc,
    find_pair,
    fmt_number,
    fmt_price,
    plain_text,
    reconciliation_report,
    render_balance,
    render_daily,
    render_help,
    render_model,
    render_pairs,
    render_positions,
    render_profit,
    render_risk,
    render_scores,
    render_status,
    render_why,
    split_text,
    text_alert,
)
from utils.utilities import (
    Clock,
    WallClock,
    atomic_write,
    ms_to_datetime,
    redact,
    register_secret,
)


log = structlog.get_logger(__name__)

_SEPARATOR: Final = "\n\n"
# Alerts raised before start() are kept up to this many (start normally follows at once).
_EARLY_LIMIT: Final = 10_000
_HELD_NOTE: Final = "\n<i>(held over from before a restart)</i>"

ModeSwitch = Callable[[str], Awaitable[str]]
"""Switch the daemon to a mode ("sim" or "live"); return what happened, raise BotError to refuse."""

_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, None]])


# -- Rate limits -----------------------------------------------------------------------------


class _Window:
    # At most `capacity` events in any `seconds`-long sliding window.
    def __init__(self, capacity: int, seconds: float) -> None:
        self.capacity = capacity
        self.seconds = seconds
        self.events: deque[float] = deque()

    def delay(self, now: float) -> float:
        while self.events and self.events[0] <= now - self.seconds:
            self.events.popleft()
        if len(self.events) < self.capacity:
            return 0.0
        # The capacity-th newest event decides; float rounding may leave older ones queued.
        return max(0.0, self.events[-self.capacity] + self.seconds - now)

    def record(self, now: float) -> None:
        self.events.append(now)


class RateLimiter:
    """Telegram's sending limits as a schedule: per chat, per group per minute, overall.

    Args:
        per_chat_per_second: messages per second to one chat (Telegram: about 1).
        total_per_second: messages per second over all chats (Telegram: 30).
        group_per_minute: messages per minute to one group, i.e. a negative chat id (20).
    """

    def __init__(
        self,
        per_chat_per_second: float = 1.0,
        total_per_second: float = 30.0,
        group_per_minute: int = 20,
    ) -> None:
        if per_chat_per_second <= 0 or total_per_second <= 0 or group_per_minute <= 0:
            raise ValueError("rate limits must be positive")
        self._chat_interval = 1.0 / per_chat_per_second
        total_capacity = max(1, int(total_per_second))
        self._total = _Window(total_capacity, total_capacity / total_per_second)
        self._group_per_minute = group_per_minute
        self._chats: dict[int, _Window] = {}
        self._groups: dict[int, _Window] = {}

    def delay(self, chat_id: int, now: float) -> float:
        """Return how many seconds to wait before the next message to `chat_id` may go."""
        waits = [self._total.delay(now)]
        if chat_id in self._chats:
            waits.append(self._chats[chat_id].delay(now))
        if chat_id in self._groups:
            waits.append(self._groups[chat_id].delay(now))
        return max(waits)

    def record(self, chat_id: int, now: float) -> None:
        """Count a message to `chat_id` sent at `now`."""
        self._total.record(now)
        self._chats.setdefault(chat_id, _Window(1, self._chat_interval)).record(now)
        if chat_id < 0:  # groups and channels have negative ids
            self._groups.setdefault(chat_id, _Window(self._group_per_minute, 60.0)).record(now)


# -- The outbox ------------------------------------------------------------------------------


@dataclass(eq=False)
class OutgoingMessage:
    """One queued message to one chat; alerts may absorb identical or similar ones."""

    chat_id: int
    text: str
    category: str = "info"
    key: str = ""
    interactive: bool = False
    edit_message_id: int | None = None
    reply_markup: Any = None
    count: int = 1
    ts_first: int = 0
    folded: Counter[str] = field(default_factory=Counter)
    folded_last: str = ""
    is_plain: bool = False
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)

    def render(self) -> str:
        """Return the text to send, with the coalescing count and folded alerts noted."""
        text = self.text
        if self.count > 1:
            since = ms_to_datetime(self.ts_first).strftime("%H:%M:%S")
            text += f"\n<i>(x{self.count}, first at {since} UTC)</i>"
        if self.folded:
            kinds = ", ".join(f"{esc(k)} x{n}" for k, n in sorted(self.folded.items()))
            more = sum(self.folded.values())
            note = f"\n<i>+{more} more while the queue was full ({kinds}); latest:</i>"
            with_last = f"{text}{note}\n{self.folded_last}"
            text = with_last if len(with_last) <= MAX_MESSAGE_CHARS else text + note
        return plain_text(text) if self.is_plain else text

    def absorb(self, other: OutgoingMessage) -> None:
        """Merge a newer message with the same key into this one."""
        self.count += other.count
        self.text = other.text  # similar alerts keep the latest wording
        self.folded.update(other.folded)
        self.folded_last = other.folded_last or self.folded_last
        self.waiters.extend(other.waiters)

    def fold(self, other: OutgoingMessage) -> None:
        """Record a different alert that did not fit in the queue."""
        self.folded[other.category] += other.count + sum(other.folded.values())
        self.folded_last = other.text
        self.waiters.extend(other.waiters)

    def settle(self, delivered: bool) -> None:
        """Tell everyone waiting for this message whether it went out."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(delivered)
        self.waiters.clear()


class Outbox:
    """Messages waiting to be sent, per chat: interactive ones first, alerts coalesced.

    Args:
        capacity_per_chat: queued alerts per chat before new ones are folded into similar
            queued ones (never dropped).
    """

    def __init__(self, capacity_per_chat: int = 200) -> None:
        if capacity_per_chat < 1:
            raise ValueError("capacity_per_chat must be >= 1")
        self.capacity_per_chat = capacity_per_chat
        self._alerts: dict[int, deque[OutgoingMessage]] = {}
        self._interactive: dict[int, deque[OutgoingMessage]] = {}
        self._index: dict[tuple[int, str], OutgoingMessage] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._alerts.values()) + sum(
            len(q) for q in self._interactive.values()
        )

    def chats(self) -> list[int]:
        """Return the chats with something queued."""
        chats = {c for c, q in self._interactive.items() if q}
        chats.update(c for c, q in self._alerts.items() if q)
        return sorted(chats)

    def put(self, message: OutgoingMessage) -> str:
        """Queue `message`; return "queued", "coalesced" or "folded"."""
        if message.interactive:
            self._interactive.setdefault(message.chat_id, deque()).append(message)
            return "queued"
        index_key = (message.chat_id, message.key or message.text)
        existing = self._index.get(index_key)
        if existing is not None:
            existing.absorb(message)
            return "coalesced"
        queue = self._alerts.setdefault(message.chat_id, deque())
        if len(queue) >= self.capacity_per_chat:
            similar = next((m for m in reversed(queue) if m.category == message.category), None)
            (similar or queue[-1]).fold(message)
            return "folded"
        queue.append(message)
        self._index[index_key] = message
        return "queued"

    def take(self, chat_id: int, *, batch: bool = True) -> list[OutgoingMessage]:
        """Remove and return what goes out next to `chat_id`: one message or a batch of alerts."""
        interactive = self._interactive.get(chat_id)
        if interactive:
            return [interactive.popleft()]
        queue = self._alerts.get(chat_id)
        if not queue:
            return []
        taken = [queue.popleft()]
        size = len(taken[0].render())
        while batch and queue:
            # The join must fit in one message; plain and HTML alerts do not mix.
            extra = len(_SEPARATOR) + len(queue[0].render())
            if size + extra > MAX_MESSAGE_CHARS or queue[0].is_plain != taken[0].is_plain:
                break
            taken.append(queue.popleft())
            size += extra
        for message in taken:
            self._index.pop((chat_id, message.key or message.text), None)
        return taken

    def requeue(self, messages: Sequence[OutgoingMessage]) -> None:
        """Put messages that could not be sent back at the front, in their order."""
        for message in reversed(messages):
            if message.interactive:
                self._interactive.setdefault(message.chat_id, deque()).appendleft(message)
                continue
            queue = self._alerts.setdefault(message.chat_id, deque())
            index_key = (message.chat_id, message.key or message.text)
            newer = self._index.get(index_key)
            if newer is not None:  # an identical alert arrived while this one was in flight
                message.absorb(newer)
                queue.remove(newer)
            queue.appendleft(message)
            self._index[index_key] = message

    def drain(self) -> list[OutgoingMessage]:
        """Remove and return everything queued."""
        everything = [m for q in self._interactive.values() for m in q]
        everything += [m for q in self._alerts.values() for m in q]
        self._interactive.clear()
        self._alerts.clear()
        self._index.clear()
        return everything


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


@dataclass(frozen=True, slots=True)
class _Pending:
    action: str
    arg: str
    chat_id: int
    question: str
    expires: float


def authorised_only(handler: _F) -> _F:
    """Run a handler only for configured chats (and users, if set); ignore and log the rest."""

    @functools.wraps(handler)
    async def wrapper(self: TelegramBot, update: Any, context: Any) -> None:
        chat_id, user_id = self._origin(update)
        if not self._is_authorised(chat_id, user_id):
            self._counters["ignored_updates"] += 1
            log.warning(
                "telegram_unauthorised",
                chat_id=chat_id,
                user_id=user_id,
                handler=handler.__name__,
            )
            return
        await handler(self, update, context)

    return wrapper  # type: ignore[return-value]


_MODES: Final = ("sim", "live")


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
        self._control = control
        self._mode_switch = mode_switch
        self._clock = clock or WallClock()
        self._poll_timeout = poll_timeout
        self._batch = batch_alerts
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._confirm_ttl = confirm_ttl_s
        self._prefix = prefix
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._enabled = settings.enabled
        self._chat_ids = frozenset(settings.chat_ids)
        self._user_ids = frozenset(settings.user_ids)
        self._limiter = RateLimiter(
            settings.max_messages_per_second, total_messages_per_second, group_messages_per_minute
        )
        self._outbox = Outbox(queue_capacity)
        self._counters: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._early: list[Alert] = []
        self._early_lock = threading.Lock()
        self._early_overflow = 0
        self._logged_disabled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: Any = None
        self._ready = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._in_flight = False
        self._stopped = False
        self._is_rejected = False
        self._paused_until = 0.0
        self._failures = 0
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
        self._restore_held()
        self._sender_task = self._loop.create_task(self._send_loop(), name="telegram_sender")
        self._connect_task = self._loop.create_task(self._connect_loop(), name="telegram_connect")
        # Return after the first attempt: connected, or retrying in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), timeout=15.0)

    async def stop(self, *, flush_timeout: float = 5.0) -> None:
        """Stop polling, flush queued messages for up to `flush_timeout`, then shut down."""
        if self._loop is None or self._stopped:
            return
        self._stopped = True
        app = self._app
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        if app.updater is not None and app.updater.running:
            with contextlib.suppress(TimeoutError):
                # A long poll ends at once; PTB's retry sleep after a network error does not.
                await asyncio.wait_for(app.updater.stop(), timeout=2.0)
        if self._ready.is_set() and (len(self._outbox) or self._in_flight):
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=flush_timeout)
        if self._sender_task is not None:
            self._sender_task.cancel()
            await asyncio.gather(self._sender_task, return_exceptions=True)
        left = self._outbox.drain()
        held = self._hold([m for m in left if not m.interactive])
        if len(left) > held:
            log.warning("telegram_undelivered", messages=len(left) - held)
        for message in left:
            message.settle(delivered=False)
        if app.running:
            await app.stop()
        await app.shutdown()
        await app.bot.shutdown()  # closes the HTTP clients even if initialize() never finished
        self._ready.clear()
        log.info("telegram_stopped", **self._counters)

    # -- Alerts held over a restart ----------------------------------------------------------

    def _hold(self, alerts: list[OutgoingMessage]) -> int:
        """Write alerts still undelivered at stop to the spool file; return how many."""
        if self._spool is None or not alerts:
            return 0
        rows = [
            {
                "chat_id": m.chat_id,
                "text": m.text,
                "category": m.category,
                "key": m.key,
                "count": m.count,
                "ts_first": m.ts_first,
                "folded": dict(m.folded),
                "folded_last": m.folded_last,
                "is_plain": m.is_plain,
            }
            for m in alerts
        ]
        try:
            atomic_write(self._spool, json.dumps(rows))
        except OSError as e:
            log.warning("telegram_alerts_lost", messages=len(rows), error=str(e))
            return 0
        log.warning("telegram_alerts_held", messages=len(rows), path=str(self._spool))
        return len(rows)

    def _restore_held(self) -> None:
        """Queue the alerts a previous run could not deliver (then forget the file)."""
        if self._spool is None or not self._spool.exists():
            return
        try:
            rows = json.loads(self._spool.read_text(encoding="utf-8"))
            messages = [
                OutgoingMessage(
                    chat_id=int(row["chat_id"]),
                    text=str(row["text"]) + _HELD_NOTE,
                    category=str(row["category"]),
                    key=str(row["key"]),
                    count=int(row["count"]),
                    ts_first=int(row["ts_first"]),
                    folded=Counter({str(k): int(v) for k, v in row["folded"].items()}),
                    folded_last=str(row["folded_last"]),
                    is_plain=bool(row["is_plain"]),
                )
                for row in rows
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("telegram_held_alerts_unreadable", path=str(self._spool), error=str(e))
            messages = []
        self._spool.unlink(missing_ok=True)
        restored = 0
        for message in messages:
            if message.chat_id in self._chat_ids:
                self._outbox.put(message)
                restored += 1
        if restored:
            log.info("telegram_alerts_restored", messages=restored)

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
            app.add_handler(CommandHandler(name, self._on_command, filters=only_new))
        app.add_handler(MessageHandler(filters.COMMAND & only_new, self._on_unknown))
        app.add_handler(CallbackQueryHandler(self._on_callback))
        app.add_error_handler(self._on_handler_error)
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
        self._wake.set()
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
        # Capped exponential with equal jitter: never ~0, so an outage is not hammered.
        ceiling = min(self._retry_cap, self._retry_base * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

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
        self._drained.clear()
        self._wake.set()
        return waiters

    def _reply(
        self,
        chat_id: int,
        text: str,
        *,
        markup: Any = None,
        edit_message_id: int | None = None,
    ) -> None:
        chunks = split_text(text)
        for number, chunk in enumerate(chunks):
            last = number == len(chunks) - 1
            message = OutgoingMessage(
                chat_id,
                chunk,
                "reply",
                interactive=True,
                # Only the first chunk rewrites the message; the rest follow as new ones,
                # and the keyboard goes under the last.
                edit_message_id=edit_message_id if number == 0 else None,
                reply_markup=markup if last else None,
            )
            self._outbox.put(message)
        self._drained.clear()
        self._wake.set()

    # -- Sending ---------------------------------------------------------------------------

    def _next_chat(self, now: float) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for chat_id in self._outbox.chats():
            wait = max(self._limiter.delay(chat_id, now), self._paused_until - now)
            if best is None or wait < best[1]:
                best = (chat_id, wait)
        return best

    async def _send_loop(self) -> None:
        await self._ready.wait()
        while True:
            self._wake.clear()
            choice = self._next_chat(time.monotonic())
            if choice is None:
                self._drained.set()
                await self._wake.wait()
                continue
            chat_id, wait = choice
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            batch = self._outbox.take(chat_id, batch=self._batch)
            if not batch:
                continue
            self._in_flight = True
            try:
                await self._send_batch(chat_id, batch)
            finally:
                self._in_flight = False

    async def _post(self, chat_id: int, batch: list[OutgoingMessage]) -> None:
        from telegram import LinkPreviewOptions
        from telegram.constants import ParseMode

        first = batch[0]
        text = _SEPARATOR.join(m.render() for m in batch)
        parse_mode = None if first.is_plain else ParseMode.HTML
        bot = self._app.bot
        if first.edit_message_id is not None:
            await bot.edit_message_text(
                text,
                chat_id=chat_id,
                message_id=first.edit_message_id,
                parse_mode=parse_mode,
                reply_markup=first.reply_markup,
            )
        else:
            await bot.send_message(
                chat_id,
                text,
                parse_mode=parse_mode,
                reply_markup=first.reply_markup,
                link_preview_options=LinkPreviewOptions(is_disabled=True),
            )

    async def _send_batch(self, chat_id: int, batch: list[OutgoingMessage]) -> None:
        from telegram.error import (
            BadRequest,
            Forbidden,
            NetworkError,
            RetryAfter,
            TelegramError,
        )

        self._limiter.record(chat_id, time.monotonic())
        try:
            await self._post(chat_id, batch)
        except RetryAfter as e:
            # Flood control: wait what Telegram says, for every chat, then resend the same.
            delay = _retry_after_seconds(e)
            self._paused_until = time.monotonic() + delay
            self._counters["retry_after"] += 1
            log.warning("telegram_retry_after", chat_id=chat_id, delay=delay)
            self._outbox.requeue(batch)
        except BadRequest as e:  # a NetworkError subclass in PTB: test it first
            self._handle_bad_request(chat_id, batch, e)
        except Forbidden as e:
            log.error("telegram_forbidden", chat_id=chat_id, message=redact(str(e))[:200])
            self._drop(batch)
        except NetworkError as e:  # includes TimedOut; a timed-out send may be delivered twice
            self._failures += 1
            self._counters["network_errors"] += 1
            delay = self._backoff(self._failures)
            self._paused_until = time.monotonic() + delay
            if self._failures == 1 or self._failures % 20 == 0:
                log.warning(
                    "telegram_send_failed",
                    attempt=self._failures,
                    delay=round(delay, 2),
                    error=type(e).__name__,
                    pending=len(self._outbox) + len(batch),
                )
            self._outbox.requeue(batch)
        except TelegramError as e:
            # ChatMigrated (a group became a supergroup) lands here: the new id needs config.
            log.error(
                "telegram_send_refused",
                chat_id=chat_id,
                error=type(e).__name__,
                message=redact(str(e))[:200],
                new_chat_id=getattr(e, "new_chat_id", None),
            )
            self._drop(batch)
        except Exception:  # a bug here must not kill the only sender
            log.exception("telegram_send_crashed", chat_id=chat_id)
            self._drop(batch)
        else:
            self._delivered(batch)

    def _handle_bad_request(self, chat_id: int, batch: list[OutgoingMessage], e: Exception) -> None:
        message = str(e).lower()
        if "not modified" in message:  # an edit to the same text: nothing to do
            self._delivered(batch)
        elif "parse entities" in message and not batch[0].is_plain:
            log.warning("telegram_bad_html", chat_id=chat_id, message=redact(str(e))[:200])
            for item in batch:
                item.is_plain = True
            self._outbox.requeue(batch)
        else:
            log.error("telegram_bad_request", chat_id=chat_id, message=redact(str(e))[:200])
            self._drop(batch)

    def _delivered(self, batch: list[OutgoingMessage]) -> None:
        if self._failures:
            log.info("telegram_reachable_again", failed_attempts=self._failures)
        self._failures = 0
        self._counters["sent_messages"] += 1
        self._counters["delivered_alerts"] += sum(
            m.count + sum(m.folded.values()) for m in batch if not m.interactive
        )
        for message in batch:
            message.settle(delivered=True)

    def _drop(self, batch: list[OutgoingMessage]) -> None:
        self._counters["dropped"] += len(batch)
        for message in batch:
            message.settle(delivered=False)

    # -- Authorisation ---------------------------------------------------------------------

    @staticmethod
    def _origin(update: Any) -> tuple[int | None, int | None]:
        query = update.callback_query
        if query is not None:
            message = query.message
            chat_id = message.chat.id if message is not None else None
            return chat_id, query.from_user.id
        chat = update.effective_chat
        user = update.effective_user
        return (chat.id if chat else None), (user.id if user else None)

    def _is_authorised(self, chat_id: int | None, user_id: int | None) -> bool:
        if chat_id is None or chat_id not in self._chat_ids:
            return False
        return not self._user_ids or (user_id is not None and user_id in self._user_ids)

    # -- Commands --------------------------------------------------------------------------

    @authorised_only
    async def _on_command(self, update: Any, context: Any) -> None:
        message = update.effective_message
        chat_id = message.chat.id
        name = message.text.split()[0][1:].split("@")[0].lower()
        args = [str(a) for a in (context.args or [])]
        log.info("telegram_command", command=name, chat_id=chat_id, user_id=self._origin(update)[1])
        try:
            await self._dispatch(chat_id, name, args)
        except BotError as e:
            self._reply(chat_id, f"❌ {esc(e.message)}")
        except Exception:
            log.exception("telegram_command_failed", command=name)
            self._reply(chat_id, f"❌ /{esc(name)} failed; see the logs.")

    async def _dispatch(self, chat_id: int, name: str, args: list[str]) -> None:
        views: dict[str, Callable[[Snapshot], str]] = {
            "status": render_status,
            "positions": render_positions,
            "balance": render_balance,
            "profit": render_profit,
            "pairs": render_pairs,
            "risk": render_risk,
            "score": render_scores,
            "model": render_model,
        }
        if name in views:
            self._reply(chat_id, views[name](self._control.snapshot()))
        elif name == "daily":
            days = int(args[0]) if args and args[0].isdigit() else 7
            self._reply(chat_id, render_daily(self._control.snapshot(), min(max(days, 1), 31)))
        elif name == "why":
            if not args:
                self._reply(chat_id, "Usage: /why &lt;pair&gt;, e.g. /why BTC/USDT")
            else:
                snap = self._control.snapshot()
                pair = find_pair(args[0], snap.last_decisions)
                patterns = self._control.patterns(pair) if pair is not None else []
                self._reply(chat_id, render_why(snap, args[0], patterns))
        elif name == "reconcile":
            self._reply(chat_id, "🔄 Reconciling…")
            report = await self._control.reconcile()
            self._reply(chat_id, reconciliation_report(report).text)
        elif name == "help":
            self._reply(chat_id, render_help())
        else:
            self._ask(chat_id, name, args)

    def _ask(self, chat_id: int, action: str, args: list[str]) -> None:
        question = self._question(chat_id, action, args)
        if question is None:
            return
        arg = args[0] if args else ""
        if action == "forceexit" and arg.lower() != "all":
            arg = (
                find_pair(arg, (p.pair for p in self._control.snapshot().portfolio.positions))
                or arg
            )
        elif action == "mode":
            arg = arg.lower()
        now = time.monotonic()
        for token in [t for t, p in self._pending.items() if p.expires < now]:
            del self._pending[token]
        token = secrets.token_hex(8)
        self._pending[token] = _Pending(action, arg, chat_id, question, now + self._confirm_ttl)
        self._reply(chat_id, question, markup=_confirm_keyboard(token))

    def _question(self, chat_id: int, action: str, args: list[str]) -> str | None:
        # Returns the confirmation question, or None after replying why there is none.
        snap = self._control.snapshot()
        if action == "pause":
            return "⏸ Pause trading? No new positions; exits and stops keep working."
        if action == "resume":
            return f"▶️ Resume trading? (now {esc(snap.state)}, trading {esc(snap.trading_state)})"
        if action == "stopbuy":
            return "🛑 Stop buying? Only exits will be allowed."
        if action == "resetrisk":
            latched = ", ".join(snap.risk.get("latched") or {}) or "none"
            return (
                f"🔓 Reset risk? Trading is {esc(snap.trading_state)}; latched breakers:"
                f" {esc(latched)}. They are lifted and the peak and the day's start are"
                " re-based on equity now."
            )
        if action == "forceexit":
            return self._forceexit_question(chat_id, snap, args)
        if action == "mode":
            return self._mode_question(chat_id, snap, args)
        return None

    def _forceexit_question(self, chat_id: int, snap: Snapshot, args: list[str]) -> str | None:
        positions = {p.pair: p for p in snap.portfolio.positions}
        if not args:
            self._reply(chat_id, "Usage: /forceexit &lt;pair&gt; or /forceexit all")
            return None
        if args[0].lower() == "all":
            if not positions:
                self._reply(chat_id, "No open positions.")
                return None
            return f"⚠️ Close ALL {len(positions)} positions at market?"
        pair = find_pair(args[0], positions)
        if pair is None:
            self._reply(chat_id, f"No open position on {esc(args[0])}.")
            return None
        p = positions[pair]
        return (
            f"⚠️ Close {esc(p.side)} {fmt_price(p.qty)} {esc(pair)} at market? "
            f"(uPnL {fmt_number(p.unrealised_pnl, sign=True)})"
        )

    def _mode_question(self, chat_id: int, snap: Snapshot, args: list[str]) -> str | None:
        if not args:
            switch = "" if self._mode_switch else " Switching is not available."
            self._reply(
                chat_id, f"Mode: <b>{esc(snap.mode)}</b>. Use /mode sim or /mode live.{switch}"
            )
            return None
        target = args[0].lower()
        if target not in _MODES:
            self._reply(chat_id, "Usage: /mode sim or /mode live")
            return None
        if self._mode_switch is None:
            self._reply(chat_id, "Mode switching is not available in this run.")
            return None
        if target == snap.mode:
            self._reply(chat_id, f"Already in {esc(target)} mode.")
            return None
        warning = " Real orders will be sent." if target == "live" else ""
        return f"🔁 Switch from {esc(snap.mode)} to <b>{esc(target)}</b>?{warning}"

    @authorised_only
    async def _on_unknown(self, update: Any, context: Any) -> None:
        self._reply(update.effective_chat.id, "Unknown command. Send /help for the list.")

    @authorised_only
    async def _on_callback(self, update: Any, context: Any) -> None:
        query = update.callback_query
        chat_id, message_id = query.message.chat.id, query.message.message_id
        verb, _, token = (query.data or "").partition(":")
        pending = self._pending.pop(token, None)  # one press acts once
        if pending is None or pending.chat_id != chat_id or pending.expires < time.monotonic():
            await _answer(query, "This confirmation has expired.")
            self._reply(chat_id, "⌛ Expired: send the command again.", edit_message_id=message_id)
            return
        if verb != "ok":
            await _answer(query, "Cancelled.")
            self._reply(chat_id, f"{pending.question}\n✖ Cancelled.", edit_message_id=message_id)
            return
        await _answer(query, "On it.")
        reason = f"telegram user {query.from_user.id}"
        log.info(
            "telegram_confirmed", action=pending.action, arg=pending.arg, user_id=query.from_user.id
        )
        try:
            result = await self._act(pending, reason)
        except BotError as e:
            result = f"❌ Failed: {esc(e.message)}"
        except Exception:
            log.exception("telegram_action_failed", action=pending.action)
            result = "❌ Failed; see the logs."
        self._reply(chat_id, f"{pending.question}\n{result}", edit_message_id=message_id)

    async def _act(self, pending: _Pending, reason: str) -> str:
        control = self._control
        if pending.action == "pause":
            await control.pause(reason)
            return "⏸ Paused."
        if pending.action == "resume":
            await control.resume(reason)
            return "▶️ Resumed."
        if pending.action == "stopbuy":
            await control.stop_buy(reason)
            return "🛑 Exits only."
        if pending.action == "resetrisk":
            await control.reset_risk(reason)
            return f"🔓 Risk reset: trading {esc(control.snapshot().trading_state)}."
        if pending.action == "forceexit":
            # The position may have closed (a stop, the strategy) between the question and
            # the press: the engine then sends nothing, and the answer must not say it did.
            held = [p.pair for p in control.snapshot().portfolio.positions]
            pairs = held if pending.arg.lower() == "all" else [pending.arg]
            sent = [pair for pair in pairs if pair in held]
            for pair in sent:
                await control.force_exit(pair, reason)
            gone = [pair for pair in pairs if pair not in held]
            if gone and not sent:
                return f"No open position on {esc(', '.join(gone))} any more; nothing sent."
            return f"✅ Exit sent for {esc(', '.join(sent)) or 'nothing'}."
        if pending.action == "mode" and self._mode_switch is not None:
            return f"✅ {esc(await self._mode_switch(pending.arg))}"
        raise BotError(f"unknown action {pending.action}", component="telegram")

    async def _on_handler_error(self, update: object, context: Any) -> None:
        log.error(
            "telegram_handler_error",
            error=type(context.error).__name__,
            message=redact(str(context.error))[:300],
        )


async def _answer(query: Any, text: str) -> None:
    from telegram.error import TelegramError

    try:
        await query.answer(text)
    except TelegramError as e:  # the button still works; only the toast is lost
        log.warning("telegram_answer_failed", error=type(e).__name__)


def _confirm_keyboard(token: str) -> Any:
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("✅ Confirm", callback_data=f"ok:{token}"),
                InlineKeyboardButton("✖ Cancel", callback_data=f"no:{token}"),
            ]
        ]
    )


def _retry_after_seconds(error: Any) -> float:
    # PTB 22 warns when `retry_after` is read as an int; accept either form quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


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
