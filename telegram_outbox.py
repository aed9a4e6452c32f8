"""The Telegram outbox: what waits to be sent, how it is coalesced, limited, sent and spooled.

`Outbox` holds the messages per chat, interactive ones (command answers) first; identical
alerts (same coalescing key) merge into one entry with a count, and a full queue folds new
alerts into similar ones instead of dropping them. `RateLimiter` schedules Telegram's limits
(per chat, per group per minute, overall). `OutboxSender` is the one task that drains the
outbox, batching queued alerts of one chat into one message of up to 4096 characters,
honouring `RetryAfter` and backing off on network errors without dropping anything.
`spool_alerts` keeps the alerts still undelivered at stop in a JSON file (the daemon uses
data/state/telegram_outbox.json) and `restore_spooled` queues them again at the next start.

`telegram_bot.TelegramBot` owns one of each and re-exports these names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from telegram_templates import MAX_MESSAGE_CHARS, esc, plain_text, split_text
from utils.utilities import atomic_write, ms_to_datetime, redact


log = structlog.get_logger(__name__)

_SEPARATOR: Final = "\n\n"
_HELD_NOTE: Final = "\n<i>(held over from before a restart)</i>"


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


# -- Alerts held over a restart ------------------------------------------------------------


def spool_alerts(spool: Path | None, alerts: list[OutgoingMessage]) -> int:
    """Write alerts still undelivered at stop to the spool file; return how many."""
    if spool is None or not alerts:
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
        atomic_write(spool, json.dumps(rows))
    except OSError as e:
        log.warning("telegram_alerts_lost", messages=len(rows), error=str(e))
        return 0
    log.warning("telegram_alerts_held", messages=len(rows), path=str(spool))
    return len(rows)


def restore_spooled(spool: Path | None, outbox: Outbox, chat_ids: frozenset[int]) -> None:
    """Queue in `outbox` the alerts a previous run could not deliver (then forget the file).

    Alerts for chats no longer configured are left out.
    """
    if spool is None or not spool.exists():
        return
    try:
        rows = json.loads(spool.read_text(encoding="utf-8"))
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
        log.warning("telegram_held_alerts_unreadable", path=str(spool), error=str(e))
        messages = []
    spool.unlink(missing_ok=True)
    restored = 0
    for message in messages:
        if message.chat_id in chat_ids:
            outbox.put(message)
            restored += 1
    if restored:
        log.info("telegram_alerts_restored", messages=restored)


# -- Sending -------------------------------------------------------------------------------


class OutboxSender:
    """The one task that drains an `Outbox` to Telegram within Telegram's limits.

    It waits for `ready` (the bot connected), picks the chat that may be sent to soonest,
    sends one message or one batch of alerts, honours `RetryAfter` for every chat, backs off
    on network errors (`backoff(failures)` seconds) and puts what failed back at the front;
    nothing is dropped but what Telegram refuses for good. Counts go to `counters`.

    Args:
        outbox: the queue it drains.
        limiter: Telegram's sending limits.
        counters: the bot's counters (sent_messages, delivered_alerts, retry_after, ...).
        ready: set while the bot is connected.
        backoff: seconds to wait after the n-th network error in a row.
        batch: join queued alerts of one chat into one message.
    """

    def __init__(
        self,
        outbox: Outbox,
        limiter: RateLimiter,
        counters: Counter[str],
        ready: asyncio.Event,
        backoff: Callable[[int], float],
        *,
        batch: bool = True,
    ) -> None:
        self.outbox = outbox
        self._limiter = limiter
        self._counters = counters
        self._ready = ready
        self._backoff = backoff
        self._batch = batch
        self._bot: Any = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._in_flight = False
        self._paused_until = 0.0
        self._failures = 0

    def wake(self) -> None:
        """Tell the sender that something was queued."""
        self._drained.clear()
        self._wake.set()

    def poke(self) -> None:
        """Wake the sender to look at the queue again (the bot just connected)."""
        self._wake.set()

    async def flush(self, within_s: float) -> None:
        """Wait up to `within_s` seconds for the queue to empty, when connected."""
        if self._ready.is_set() and (len(self.outbox) or self._in_flight):
            self._drained.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=within_s)

    def reply(
        self,
        chat_id: int,
        text: str,
        *,
        markup: Any = None,
        edit_message_id: int | None = None,
    ) -> None:
        """Queue an interactive message (a command's answer), split to Telegram's size."""
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
            self.outbox.put(message)
        self.wake()

    def _next_chat(self, now: float) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for chat_id in self.outbox.chats():
            wait = max(self._limiter.delay(chat_id, now), self._paused_until - now)
            if best is None or wait < best[1]:
                best = (chat_id, wait)
        return best

    async def run(self, bot: Any) -> None:
        """Send through `bot` (PTB's Bot) until cancelled; starts once the bot is ready."""
        self._bot = bot
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
            batch = self.outbox.take(chat_id, batch=self._batch)
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
        bot = self._bot
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
        except asyncio.CancelledError:
            # Stopped with the batch on its way (`TelegramBot.stop`): back in the queue, so
            # it is spooled; like a timed-out send, it may then be delivered twice.
            self.outbox.requeue(batch)
            raise
        except RetryAfter as e:
            # Flood control: wait what Telegram says, for every chat, then resend the same.
            delay = _retry_after_seconds(e)
            self._paused_until = time.monotonic() + delay
            self._counters["retry_after"] += 1
            log.warning("telegram_retry_after", chat_id=chat_id, delay=delay)
            self.outbox.requeue(batch)
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
                    pending=len(self.outbox) + len(batch),
                )
            self.outbox.requeue(batch)
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
            self.outbox.requeue(batch)
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


def _retry_after_seconds(error: Any) -> float:
    # PTB 22 warns when `retry_after` is read as an int; accept either form quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
