"""The operator's Telegram commands: views answered at once, actions after a confirmation.

`TelegramCommands` holds PTB's handlers for `telegram_bot.TelegramBot`. Commands are answered
only in configured chats, and only to configured users when user ids are set; everything else
is ignored and logged (`authorised_only`). Views (/status, /positions, ...) render the
`Snapshot` through `telegram_templates`; commands that change what the bot does (/pause,
/resume, /stopbuy, /resetrisk, /forceexit, /mode) ask for confirmation with an inline button
and act through the `Control` only on an authorised press in the asking chat, once, before
the question expires. Answers go out through the `reply` callable (the bot's outbox).

`telegram_bot` re-exports these names.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import structlog

from error_handler import BotError
from models import Control, Snapshot
from telegram_templates import (
    esc,
    find_pair,
    fmt_number,
    fmt_price,
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
)
from utils.utilities import redact


log = structlog.get_logger(__name__)

ModeSwitch = Callable[[str], Awaitable[str]]
"""Switch the daemon to a mode ("sim" or "live"); return what happened, raise BotError to refuse."""

_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, None]])
_MODES: Final = ("sim", "live")


class Reply(Protocol):
    """Queue an answer to a chat, as an edit of `edit_message_id` when given."""

    def __call__(
        self,
        chat_id: int,
        text: str,
        *,
        markup: Any = None,
        edit_message_id: int | None = None,
    ) -> None:
        """Queue `text` for `chat_id`, with an inline keyboard when `markup` is given."""
        ...


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
    async def wrapper(self: TelegramCommands, update: Any, context: Any) -> None:
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


class TelegramCommands:
    """PTB's handlers for the operator's commands and confirmation presses.

    Args:
        control: the operator façade (pause, resume, stop_buy, force_exit, reconcile, snapshot).
        reply: queues an answer (the bot's outbox).
        chat_ids: the chats commands are answered in.
        user_ids: when not empty, the only users answered.
        counters: the bot's counters (`ignored_updates` counts here).
        mode_switch: switches between "sim" and "live" for /mode; None disables switching.
        confirm_ttl_s: how long a confirmation button stays valid.
    """

    def __init__(
        self,
        control: Control,
        reply: Reply,
        *,
        chat_ids: frozenset[int],
        user_ids: frozenset[int],
        counters: Counter[str],
        mode_switch: ModeSwitch | None = None,
        confirm_ttl_s: float = 120.0,
    ) -> None:
        self._control = control
        self._reply = reply
        self._chat_ids = chat_ids
        self._user_ids = user_ids
        self._counters = counters
        self._mode_switch = mode_switch
        self._confirm_ttl = confirm_ttl_s
        self._pending: dict[str, _Pending] = {}

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

    @authorised_only
    async def on_command(self, update: Any, context: Any) -> None:
        """Answer a command: a view at once, an action with a confirmation button."""
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

    @authorised_only
    async def on_unknown(self, update: Any, context: Any) -> None:
        """Answer a command that is not in the menu."""
        self._reply(update.effective_chat.id, "Unknown command. Send /help for the list.")

    @authorised_only
    async def on_callback(self, update: Any, context: Any) -> None:
        """Act on a confirmation press (once, in the asking chat, before it expires)."""
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

    async def on_error(self, update: object, context: Any) -> None:
        """Log an error a handler raised (PTB's error handler)."""
        log.error(
            "telegram_handler_error",
            error=type(context.error).__name__,
            message=redact(str(context.error))[:300],
        )

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
