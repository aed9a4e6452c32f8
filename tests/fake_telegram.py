"""Test doubles for the Telegram seam: a loopback Bot API server and an in-memory `Control`.

`FakeTelegram` is an aiohttp server on 127.0.0.1 that answers what python-telegram-bot 22.8
sends (see WIRE.md section 5): every call is `POST /bot<TOKEN>/<method>` with a form, JSON or
empty body, and every answer is `{"ok": true, "result": ...}` or an error envelope. Tests
inject updates (commands, button presses), read what the bot sent (with arrival times from
`time.monotonic()`), and inject faults: a 429 with `retry_after`, a 5xx, a call held before
it is handled (a slow Telegram), or a server that is gone (connections refused) and later
comes back on the same port.

`FakeControl` implements `models.Control` with a fixed, hand-set state for the rendering
and confirmation-flow tests; its actions follow the engine's rules (/resume keeps a latched
breaker, a force exit on a flat pair does nothing). What the commands do to a real bot is
tested against a running replay daemon in tests/test_operator_live.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from aiohttp import web

from models import (
    BotState,
    ClosedTrade,
    Decision,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Ranked,
    Snapshot,
    TradingState,
)


TOKEN = "123456:TEST-token-for-the-fake-api"
BOT_USER: dict[str, Any] = {
    "id": 123456,
    "is_bot": True,
    "first_name": "KestrelFake",
    "username": "kestrel_bot",
}
MAX_TEXT = 4096

# Telegram's HTML mode accepts these tags and entities only; anything else is a 400
# "can't parse entities", so the fake rejects it too and a bad template fails a test.
_TAG = re.compile(
    r"<(/?)(b|strong|i|em|u|ins|s|strike|del|code|pre|tg-spoiler|blockquote)>"
    r'|<(a) href="[^"<>]*">|</(a)>'
)
_ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")


def html_problem(text: str) -> str | None:
    """Return why Telegram would refuse `text` in HTML parse mode, or None if it is valid."""
    stack: list[str] = []
    pos = 0
    for match in _TAG.finditer(text):
        if _bare_markup(text[pos : match.start()]):
            return "Unsupported start tag or unescaped character"
        closing, name = bool(match.group(1) or match.group(4)), match.group(2) or "a"
        if match.group(3):
            closing = False
        if closing:
            if not stack or stack.pop() != name:
                return f"Unexpected end tag {name}"
        else:
            stack.append(name)
        pos = match.end()
    if _bare_markup(text[pos:]):
        return "Unsupported start tag or unescaped character"
    if stack:
        return f"Can't find end tag corresponding to start tag {stack[-1]}"
    return None


def _bare_markup(chunk: str) -> bool:
    return bool(re.search(r"[<>]", chunk)) or "&" in _ENTITY.sub("", chunk)


def visible_text(html_text: str) -> str:
    """Return what a user sees for an HTML message: tags removed, entities decoded."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", html_text))


@dataclass
class Call:
    """One request the fake received."""

    method: str
    params: dict[str, Any]
    ts: float
    status: int = 200


@dataclass
class SentMessage:
    """A message the bot sent (sendMessage) or rewrote (editMessageText)."""

    chat_id: int
    text: str
    message_id: int
    ts: float
    parse_mode: str | None = None
    reply_markup: dict[str, Any] | None = None

    @property
    def visible(self) -> str:
        """Return the text as the user sees it."""
        return visible_text(self.text) if self.parse_mode == "HTML" else self.text

    def button(self, label: str) -> str:
        """Return the callback data of the inline button whose label contains `label`."""
        for row in (self.reply_markup or {}).get("inline_keyboard", []):
            for button in row:
                if label.lower() in button["text"].lower():
                    return str(button["callback_data"])
        raise AssertionError(f"no button {label!r} in {self.reply_markup!r}")


@dataclass
class _Fault:
    status: int
    retry_after: int | None
    description: str
    times: int


@dataclass
class FakeTelegram:
    """A loopback Telegram Bot API: inject updates, record messages, inject faults."""

    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    messages: list[SentMessage] = field(default_factory=list)
    edits: list[SentMessage] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    confirmed_offset: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._faults: dict[str, list[_Fault]] = {}
        self._holds: dict[str, list[float]] = {}
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None

    # -- Lifecycle -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Return the server root, the form `TelegramSettings.base_url` takes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        """Return True while the server accepts connections."""
        return self._runner is not None

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same port afterwards)."""
        self._changed = self._changed or asyncio.Condition()
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:  # the bound port is only known after start
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Close the server: pending long polls end and new connections are refused."""
        runner, self._runner = self._runner, None
        await self._wake()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- Test controls -------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: int | None = None,
        description: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` with an error instead of running it."""
        if description is None:
            description = (
                f"Too Many Requests: retry after {retry_after}"
                if status == 429
                else "Bad Gateway"
                if status >= 500
                else "Bad Request: injected"
            )
        self._faults.setdefault(method, []).append(_Fault(status, retry_after, description, times))

    def hold_next(self, method: str, seconds: float) -> None:
        """Hold the next call of `method` for `seconds` before handling it (a slow server);
        a call whose client gave up meanwhile is never handled."""
        self._holds.setdefault(method, []).append(seconds)

    def push_command(
        self, text: str, *, chat_id: int, user_id: int, chat_type: str | None = None
    ) -> int:
        """Queue a message starting with a bot command, as sent by `user_id` in `chat_id`."""
        command = text.split()[0]
        message = self._message(chat_id, user_id, chat_type)
        message["text"] = text
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self._push({"message": message})

    def push_callback(
        self,
        data: str,
        *,
        chat_id: int,
        user_id: int,
        message_id: int,
        chat_type: str | None = None,
    ) -> int:
        """Queue an inline-button press on message `message_id`."""
        message = self._message(chat_id, BOT_USER["id"], chat_type)
        message["message_id"] = message_id
        message["from"] = BOT_USER
        query = {
            "id": str(next(self._query_ids)),
            "from": {"id": user_id, "is_bot": False, "first_name": "Op"},
            "chat_instance": "-99",
            "data": data,
            "message": message,
        }
        return self._push({"callback_query": query})

    def messages_to(self, chat_id: int) -> list[SentMessage]:
        """Return the messages sent to one chat, oldest first."""
        return [m for m in self.messages if m.chat_id == chat_id]

    def calls_to(self, method: str) -> list[Call]:
        """Return the calls of one API method, oldest first."""
        return [c for c in self.calls if c.method == method]

    def is_confirmed(self, update_id: int) -> bool:
        """Return True once the bot has acknowledged `update_id` (offset moved past it)."""
        return self.confirmed_offset > update_id

    # -- Internals -----------------------------------------------------------------------------

    def _message(self, chat_id: int, user_id: int, chat_type: str | None) -> dict[str, Any]:
        kind = chat_type or ("private" if chat_id > 0 else "group")
        chat: dict[str, Any] = {"id": chat_id, "type": kind}
        if kind != "private":
            chat["title"] = "Ops"
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": "Op"},
        }

    def _push(self, payload: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        self._updates.append({"update_id": update_id, **payload})
        asyncio.get_running_loop().create_task(self._wake())
        return update_id

    async def _wake(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        if request.content_type == "application/json":
            return dict(await request.json())
        form = await request.post()
        params: dict[str, Any] = {}
        for key, value in form.items():
            text = value if isinstance(value, str) else str(value)
            if key in ("reply_markup", "allowed_updates", "entities", "link_preview_options"):
                params[key] = json.loads(text)
            else:
                params[key] = text
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        method = request.match_info["method"]
        params = await self._params(request)
        holds = self._holds.get(method)
        if holds:
            await asyncio.sleep(holds.pop(0))  # not handled (nor recorded) until then
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up: never handled
        call = Call(method, params, arrived)
        self.calls.append(call)
        if request.match_info["token"] != self.token:
            call.status = 401
            return _error(401, "Unauthorized")
        faults = self._faults.get(method)
        if faults:
            fault = faults[0]
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
            call.status = fault.status
            return _error(fault.status, fault.description, fault.retry_after)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            call.status = 404
            return _error(404, "Not Found: method not found")
        try:
            result = await handler(params, call.ts)
        except _ApiError as e:
            call.status = e.status
            return _error(e.status, e.description)
        return web.json_response({"ok": True, "result": result})

    # -- Bot API methods -----------------------------------------------------------------------

    async def _api_getMe(self, params: dict[str, Any], ts: float) -> Any:
        return BOT_USER

    async def _api_deleteWebhook(self, params: dict[str, Any], ts: float) -> Any:
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self.confirmed_offset = max(
                [self.confirmed_offset, *(u["update_id"] + 1 for u in self._updates)]
            )
            self._updates.clear()
        return True

    async def _api_setMyCommands(self, params: dict[str, Any], ts: float) -> Any:
        commands = params.get("commands", "[]")
        self.commands = json.loads(commands) if isinstance(commands, str) else list(commands)
        return True

    async def _api_getUpdates(self, params: dict[str, Any], ts: float) -> Any:
        offset = int(params.get("offset", 0) or 0)
        timeout = float(params.get("timeout", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        if offset:
            # Updates below the offset are confirmed: Telegram forgets them.
            self.confirmed_offset = max(self.confirmed_offset, offset)
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        assert self._changed is not None
        while not self._updates and self._runner is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        return self._updates[:limit]

    def _check_text(self, params: dict[str, Any]) -> str:
        text = str(params.get("text", ""))
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > MAX_TEXT:
            raise _ApiError(400, "Bad Request: message is too long")
        if params.get("parse_mode") == "HTML":
            problem = html_problem(text)
            if problem:
                raise _ApiError(400, f"Bad Request: can't parse entities: {problem}")
        return text

    async def _api_sendMessage(self, params: dict[str, Any], ts: float) -> Any:
        text = self._check_text(params)
        sent = SentMessage(
            chat_id=int(params["chat_id"]),
            text=text,
            message_id=next(self._message_ids),
            ts=ts,
            parse_mode=params.get("parse_mode"),
            reply_markup=params.get("reply_markup"),
        )
        self.messages.append(sent)
        return self._message_result(sent)

    async def _api_editMessageText(self, params: dict[str, Any], ts: float) -> Any:
        text = self._check_text(params)
        sent = SentMessage(
            chat_id=int(params["chat_id"]),
            text=text,
            message_id=int(params["message_id"]),
            ts=ts,
            parse_mode=params.get("parse_mode"),
            reply_markup=params.get("reply_markup"),
        )
        self.edits.append(sent)
        return self._message_result(sent)

    async def _api_answerCallbackQuery(self, params: dict[str, Any], ts: float) -> Any:
        self.answers.append(params)
        return True

    def _message_result(self, sent: SentMessage) -> dict[str, Any]:
        chat_type = "private" if sent.chat_id > 0 else "group"
        return {
            "message_id": sent.message_id,
            "date": int(time.time()),
            "chat": {"id": sent.chat_id, "type": chat_type},
            "from": BOT_USER,
            "text": visible_text(sent.text) if sent.parse_mode == "HTML" else sent.text,
        }


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)


# -- A Control with real state -----------------------------------------------------------------


@dataclass
class FakeControl:
    """An in-memory bot behind `models.Control`: commands change state that snapshots show."""

    mode: str = "sim"
    state: BotState = BotState.RUNNING
    trading_state: TradingState = TradingState.NORMAL
    manual: TradingState | None = None  # the operator's rung (/stopbuy), as the engine's risk
    cash: Decimal = Decimal("9000")
    positions: dict[str, Position] = field(default_factory=dict)
    trades: list[ClosedTrade] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)
    pairs: tuple[str, ...] = ("BTC/USDT", "ETH/USDT")
    scores: dict[str, float] = field(default_factory=dict)
    ranking: tuple[Ranked, ...] = ()
    risk: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    equity_curve: list[tuple[int, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reconcile_report: str = "orders: 0 adopted, 0 never sent\npositions: match"
    reasons: list[str] = field(default_factory=list)
    reconciles: int = 0
    # Candle windows per pair (real candles): /why's pattern summary is computed from them.
    candles: dict[str, Any] = field(default_factory=dict)
    now_ms: int = 1_700_000_000_000
    late_streams: tuple[str, ...] = ()  # the streams bursts no longer wait for

    def snapshot(self) -> Snapshot:
        """Return the current state."""
        positions = tuple(self.positions.values())
        equity = self.cash + sum((p.notional for p in positions), Decimal(0))
        realised = sum((Decimal(str(t.pnl)) for t in self.trades), Decimal(0))
        fees = sum((Decimal(str(t.fee)) for t in self.trades), Decimal(0))
        return Snapshot(
            ts=self.now_ms,
            mode=self.mode,
            state=self.state,
            trading_state=self.trading_state,
            portfolio=PortfolioSnapshot(
                ts=self.now_ms,
                cash=self.cash,
                equity=equity,
                positions=positions,
                realised_pnl=realised,
                fees=fees,
            ),
            pairs=self.pairs,
            recent_trades=tuple(self.trades),
            equity_curve=tuple(self.equity_curve),
            last_decisions=dict(self.decisions),
            scores=dict(self.scores),
            ranking=self.ranking,
            errors=tuple(self.errors),
            risk=dict(self.risk),
            model=dict(self.model),
            late_streams=self.late_streams,
        )

    async def pause(self, reason: str) -> None:
        """Stop opening positions."""
        self.reasons.append(reason)
        self.state = BotState.PAUSED

    async def resume(self, reason: str) -> None:
        """Trade again, as the engine does: lift the manual rung only, never a latch."""
        self.reasons.append(reason)
        self.state = BotState.RUNNING
        if self.manual is not None:
            self.manual = None
            if not self.risk.get("latched"):
                self.trading_state = TradingState.NORMAL

    async def stop_buy(self, reason: str) -> None:
        """Allow exits only (the manual `reducing` rung)."""
        self.reasons.append(reason)
        self.manual = TradingState.REDUCING
        self.trading_state = TradingState.REDUCING

    async def reset_risk(self, reason: str) -> None:
        """Lift latched breakers and the manual rung: trading is normal again."""
        self.reasons.append(reason)
        self.manual = None
        self.trading_state = TradingState.NORMAL
        self.risk = {**self.risk, "latched": {}}

    async def force_exit(self, pair: str, reason: str) -> None:
        """Close the position on `pair` at its mark price; nothing when flat, as the engine."""
        self.reasons.append(reason)
        position = self.positions.pop(pair, None)
        if position is None:
            return
        exit_price = position.mark_price or position.entry_price
        sign = 1 if position.side is PositionSide.LONG else -1
        pnl = (exit_price - position.entry_price) * position.qty * sign
        self.cash += position.qty * exit_price
        self.trades.append(
            ClosedTrade(
                pair=pair,
                side=position.side,
                entry_ts=position.ts_opened,
                exit_ts=self.now_ms,
                entry_price=float(position.entry_price),
                exit_price=float(exit_price),
                qty=float(position.qty),
                fee=0.0,
                pnl=float(pnl),
                reason=reason,
            )
        )

    def patterns(self, pair: str) -> list[dict[str, Any]]:
        """Return the patterns on the pair's latest candles, as the engine computes them."""
        from data_manager import latest_patterns

        frame = self.candles.get(pair)
        return latest_patterns(frame) if frame is not None else []

    def chart(self, pair: str, limit: int = 500) -> dict[str, Any]:
        """Return the pair's chart from its candles, as the engine builds it."""
        from chart_data import chart_body

        frame = self.candles.get(pair)
        if frame is None:
            return {"pair": pair, "candles": [], "overlays": {}, "marks": [], "position": None}
        return chart_body(pair, "1m", 60_000, frame, populate=None, trades=(), position=None)

    async def reconcile(self) -> str:
        """Return the canned reconciliation report."""
        self.reconciles += 1
        return self.reconcile_report

    async def stop(self, reason: str) -> None:
        """Move to stopping."""
        self.reasons.append(reason)
        self.state = BotState.STOPPING

    def open(self, pair: str, qty: str, entry: str, mark: str, *, short: bool = False) -> None:
        """Open a position (test set-up helper)."""
        side = PositionSide.SHORT if short else PositionSide.LONG
        self.positions[pair] = Position(
            pair=pair,
            side=side,
            qty=Decimal(qty),
            entry_price=Decimal(entry),
            ts_opened=self.now_ms - 3_600_000,
            stop_price=Decimal(entry) * Decimal("0.98"),
            mark_price=Decimal(mark),
        )
        self.cash -= Decimal(qty) * Decimal(entry)

    def mark(self, pair: str, price: str) -> None:
        """Move a position's mark price (test set-up helper)."""
        self.positions[pair] = replace(self.positions[pair], mark_price=Decimal(price))
