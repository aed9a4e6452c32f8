"""TelegramBot against the loopback fake Bot API, through real python-telegram-bot 22.8."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import TelegramSettings
from error_handler import BotError
from models import BotState, ClosedTrade, Decision, PositionSide, Side, Signal, TradingState, Veto
from runner import SHUTDOWN_STEP_TIMEOUT
from telegram_bot import TelegramBot
from telegram_templates import COMMANDS, Alert, error_alert
from tests.conftest import eventually
from tests.fake_telegram import TOKEN, FakeControl, FakeTelegram, SentMessage


CHAT = 424242
USER = 424242
GROUP = -100777
STRANGER_CHAT = 999
STRANGER = 31337
DAY = 86_400_000

BotFactory = Callable[..., Awaitable[TelegramBot]]


def _trading_state(control: FakeControl) -> TradingState:
    """The control's trading state, read afresh through a call.

    mypy would keep the attribute narrowed by an earlier assert across the calls that change it.
    """
    return control.trading_state


def _settings(api: FakeTelegram, **overrides: Any) -> TelegramSettings:
    values: dict[str, Any] = {
        "token": TOKEN,
        "chat_ids": [CHAT],
        "user_ids": [USER],
        "base_url": api.base_url,
        "max_messages_per_second": 50.0,
    }
    values.update(overrides)
    return TelegramSettings(**values)


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegram]:
    """Return a running fake Bot API."""
    fake = FakeTelegram()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def control() -> FakeControl:
    """Return a bot state with one position, two closed trades and a recorded decision."""
    fake = FakeControl()
    fake.open("BTC/USDT", "0.01", "65000", "66000")
    now = fake.now_ms
    fake.trades += [
        ClosedTrade("ETH/USDT", PositionSide.LONG, now - 3 * 3600_000, now - 3600_000,
                    2000.0, 2100.0, 1.0, 0.5, 99.5, "take profit"),
        ClosedTrade("SOL/USDT", PositionSide.LONG, now - 2 * DAY, now - DAY - 60_000,
                    50.0, 45.0, 2.0, 0.1, -10.1, "stop"),
    ]  # fmt: skip
    fake.decisions["BTC/USDT"] = Decision(
        pair="BTC/USDT",
        ts=now,
        signal=Signal("BTC/USDT", Side.BUY, 0.72, "ema 12 crossed above ema 26", now, 65000.0,
                      strategy="ema_cross", features={"rsi_14": 61.25, "atr_14": 410.0}),
        verdict="vetoed",
        veto=Veto("exposure 98% above limit 95%", guard="max_exposure"),
    )  # fmt: skip
    fake.scores = {"ema_cross": 1.42, "rsi_revert": -0.3}
    fake.risk = {"daily_loss": 0.012, "drawdown": 0.031, "max_daily_loss": 0.03}
    fake.model = {"name": "lgbm", "version": "2024-05-01T12:00", "auc": 0.613}
    fake.equity_curve = [(now - DAY, 9000.0), (now, 9010.0)]
    return fake


@pytest.fixture
async def make_bot(api: FakeTelegram, control: FakeControl) -> AsyncIterator[BotFactory]:
    """Return a factory of started bots on the fake API, all stopped at teardown."""
    bots: list[TelegramBot] = []

    async def factory(settings: TelegramSettings | None = None, **kwargs: Any) -> TelegramBot:
        kwargs = {"poll_timeout": 1.0, "retry_base": 0.05, "retry_cap": 0.3, **kwargs}
        bot = TelegramBot(settings or _settings(api), control, **kwargs)
        bots.append(bot)
        await bot.start()
        return bot

    yield factory
    for bot in bots:
        await bot.stop(flush_timeout=1.0)


@pytest.fixture
async def bot(make_bot: BotFactory) -> TelegramBot:
    """Return a started bot for CHAT/USER with a mode switch that records its target."""
    switched: list[str] = []

    async def switch(target: str) -> str:
        if target == "live":
            raise BotError("live needs API keys", component="main")
        switched.append(target)
        return f"now in {target}"

    made = await make_bot(mode_switch=switch)
    made.switched = switched  # type: ignore[attr-defined]
    return made


async def ask(
    api: FakeTelegram, text: str, *, chat_id: int = CHAT, user_id: int = USER
) -> SentMessage:
    """Send a command and return the bot's next message to that chat."""
    before = len(api.messages_to(chat_id))
    api.push_command(text, chat_id=chat_id, user_id=user_id)
    await eventually(lambda: len(api.messages_to(chat_id)) > before)
    return api.messages_to(chat_id)[before]


async def press(
    api: FakeTelegram, prompt: SentMessage, label: str, *, user_id: int = USER
) -> SentMessage:
    """Press a button under `prompt` and return the bot's edit of that message."""
    before = len(api.edits)
    api.push_callback(
        prompt.button(label), chat_id=prompt.chat_id, user_id=user_id, message_id=prompt.message_id
    )
    await eventually(lambda: len(api.edits) > before)
    edit = api.edits[before]
    assert edit.message_id == prompt.message_id
    return edit


def _counts(messages: list[SentMessage]) -> Counter[str]:
    # How many notifications each delivered line stands for ("text (xN, first at ...)").
    seen: Counter[str] = Counter()
    for message in messages:
        lines = message.visible.split("\n")
        for index, line in enumerate(lines):
            if line.startswith("(x"):
                continue
            following = lines[index + 1] if index + 1 < len(lines) else ""
            match = re.match(r"\(x(\d+),", following)
            if line:
                seen[line] += int(match.group(1)) if match else 1
    return seen


# -- Start-up ----------------------------------------------------------------------------------


async def test_start_follows_the_ptb_call_sequence(api: FakeTelegram, bot: TelegramBot) -> None:
    """Start calls getMe, deleteWebhook (dropping stale commands), publishes the menu, polls."""
    await eventually(lambda: bool(api.calls_to("getUpdates")))
    methods = [c.method for c in api.calls]
    assert methods[:2] == ["getMe", "deleteWebhook"]
    assert api.calls_to("deleteWebhook")[0].params["drop_pending_updates"] == "true"
    assert {c["command"] for c in api.commands} == set(COMMANDS)
    assert bot.is_connected


async def test_disabled_without_token_makes_no_calls(
    api: FakeTelegram, control: FakeControl
) -> None:
    """With no token every method is a no-op and the API is never contacted."""
    bot = TelegramBot(TelegramSettings(chat_ids=[CHAT], base_url=api.base_url), control)
    await bot.start()
    bot.notify("nobody hears this")
    await bot.notify_async("nor this")
    assert await bot.post_startup_report("report", timeout_s=0.1) is False
    await bot.stop()
    assert not bot.is_enabled
    assert not bot.is_connected
    assert api.calls == []


async def test_post_startup_report_returns_after_delivery(
    api: FakeTelegram, bot: TelegramBot
) -> None:
    """The reconciliation report is on the server by the time post_startup_report returns."""
    delivered = await bot.post_startup_report("orders: 2 adopted, 1 never sent", timeout_s=5)
    assert delivered is True
    assert "orders: 2 adopted, 1 never sent" in api.messages_to(CHAT)[-1].visible


async def test_post_startup_report_times_out_while_unreachable(
    api: FakeTelegram, bot: TelegramBot
) -> None:
    """When Telegram is down the report wait ends at the timeout, and the report still goes out."""
    await api.stop()
    assert await bot.post_startup_report("positions match", timeout_s=0.3) is False
    await api.start()
    await eventually(lambda: any("positions match" in m.visible for m in api.messages))


# -- Commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/status", ["sim · running · trading normal", "equity 9,010.00", "positions 1"]),
        ("/positions", ["BTC/USDT long 0.01 @ 65000 → 66000", "uPnL +10.00 (+1.54%)"]),
        ("/balance", ["equity 9,010.00", "cash 8,350.00 · in positions 660.00", "+0.11%"]),
        ("/profit", ["trades 2 · wins 1 · losses 1 · win rate 50%", "PnL +89.40"]),
        ("/daily 3", ["2023-11-14  +99.50  (1 trades)", "2023-11-13  -10.10  (1 trades)"]),
        ("/pairs", ["● BTC/USDT", "○ ETH/USDT"]),
        ("/risk", ["trading normal", "daily_loss: 0.012", "max_daily_loss: 0.03"]),
        ("/score", ["1. ema_cross 1.42", "2. rsi_revert -0.3"]),
        ("/model", ["name: lgbm", "auc: 0.613"]),
        (
            "/why btcusdt",
            [
                "verdict: vetoed",
                "signal: buy strength 0.72 @ 65000 [ema_cross]",
                "reason: ema 12 crossed above ema 26",
                "features: atr_14=410, rsi_14=61.25",
                "veto [max_exposure]: exposure 98% above limit 95%",
            ],
        ),
        ("/why DOGE/USDT", ["No decision recorded for DOGE/USDT. Known: BTC/USDT."]),
        ("/help", [f"/{name}" for name in COMMANDS]),
        ("/frobnicate", ["Unknown command"]),
    ],
)
async def test_command_replies_render_the_snapshot(
    api: FakeTelegram, bot: TelegramBot, command: str, expected: list[str]
) -> None:
    """Each read-only command answers with the numbers of the current snapshot."""
    reply = await ask(api, command)
    assert reply.parse_mode == "HTML"
    for fragment in expected:
        assert fragment in reply.visible


@pytest.mark.parametrize("command", ["/status", "/risk"])
async def test_status_and_risk_name_the_late_streams(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl, command: str
) -> None:
    """A stream the bursts no longer wait for is named; none late, nothing is said."""
    late = "late streams (decided alone, not waited for)"
    assert late not in (await ask(api, command)).visible
    control.late_streams = ("SOL/USDT", "XRP/USDT")
    assert f"{late}: SOL/USDT, XRP/USDT" in (await ask(api, command)).visible


async def test_model_command_shows_the_registry(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl, tmp_path: Path
) -> None:
    """/model shows each pair's champion, challenger, rollback target and validation."""
    import numpy as np

    from model_registry import Lineage, Registry
    from self_learning import ModelRegistry, SafePredictor
    from tests.model_kinds import RuleModel

    registry, name = Registry(tmp_path), "direction-BTC-USDT-1h"
    lineage = Lineage(0, 1, ("BTC/USDT",), "1h", "rule", seed=1)
    for version in ("v1", "v2", "v3"):
        trained = RuleModel(1.0, np.zeros(2), {})
        registry.register(name, "rule", trained, lineage, version=version, validation={})
    registry.annotate(name, "v2", {"score": 1.25, "deflated_sharpe": 0.97})
    registry.promote(name, "v1")
    registry.promote(name, "v2")
    registry.set_challenger(name, "v3")
    control.model = {"BTC/USDT": SafePredictor(ModelRegistry(tmp_path, name)).describe()}
    reply = await ask(api, "/model")
    for fragment in (
        "BTC/USDT · direction-BTC-USDT-1h",
        "champion v2 · challenger v3",
        "versions 3 · rollback to v1",
        "champion validation: deflated_sharpe 0.97, score 1.25",
    ):
        assert fragment in reply.visible


async def test_model_command_shows_each_walk_forward_fold_on_its_own_line(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl, tmp_path: Path
) -> None:
    """/model lists a version's folds one compact line each, with the DSR and the verdict."""
    import numpy as np

    from model_registry import Lineage, Registry
    from model_training import Validation
    from model_validation import Fold
    from self_learning import ModelRegistry, SafePredictor
    from tests.model_kinds import RuleModel

    registry, name = Registry(tmp_path), "direction-ETH-USDT-1h"
    lineage = Lineage(0, 1, ("ETH/USDT",), "1h", "rule", seed=1)
    for version in ("v1", "v2"):
        trained = RuleModel(1.0, np.zeros(2), {})
        registry.register(name, "rule", trained, lineage, version=version, validation={})
    folds = (
        Fold(1, 0, 1, 3822, 4.7912, 0.9731, 0.0),
        Fold(2, 1, 2, 3820, -0.5, 0.1204, 0.0, 3000, challenger=-0.5, champion=0.25),
    )
    validation = Validation(
        name, "v2", 2.1456, 0.25, "v1", 0.8123, 7642, 3, False, "deflated Sharpe 0.81 below 0.95",
        folds=folds,
    )  # fmt: skip
    registry.annotate(name, "v2", validation.figures())
    registry.promote(name, "v1")
    registry.set_challenger(name, "v2")
    control.model = {"ETH/USDT": SafePredictor(ModelRegistry(tmp_path, name)).describe()}
    lines = (await ask(api, "/model")).visible.split("\n")
    assert "fold 1: 3,822 bars, score +4.79, DSR 0.97" in lines
    assert "fold 2: 3,820 bars, score -0.50, DSR 0.12, vs champion +0.25" in lines
    [overall] = [line for line in lines if line.startswith("challenger validation:")]
    assert "deflated_sharpe 0.8123" in overall
    assert overall.endswith(" · gate failed")
    assert "fold" not in overall  # the folds are on their own lines only
    assert lines.index(overall) + 1 == lines.index("fold 1: 3,822 bars, score +4.79, DSR 0.97")


async def test_reconcile_runs_and_reports(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/reconcile asks the control to reconcile and sends its report back."""
    control.reconcile_report = "orders: 1 adopted <cid-7>\npositions: match"
    await ask(api, "/reconcile")
    await eventually(lambda: any("adopted <cid-7>" in m.visible for m in api.messages))
    assert control.reconciles == 1


# -- Authorisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chat_id", "user_id"),
    [(STRANGER_CHAT, USER), (CHAT, STRANGER), (STRANGER_CHAT, STRANGER)],
)
async def test_strangers_are_ignored(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl, chat_id: int, user_id: int
) -> None:
    """A command from an unknown chat or an unknown user gets no answer and changes nothing."""
    update_id = api.push_command("/pause", chat_id=chat_id, user_id=user_id)
    await eventually(lambda: bot.stats.ignored_updates == 1)
    await ask(api, "/status")  # a later authorised command is answered...
    assert api.is_confirmed(update_id)
    assert api.messages_to(STRANGER_CHAT) == []
    assert len(api.messages_to(CHAT)) == 1  # ...and nothing else was sent
    assert control.state is BotState.RUNNING


async def test_any_user_of_a_configured_chat_without_user_ids(
    api: FakeTelegram, make_bot: BotFactory
) -> None:
    """Without user ids the chat id alone authorises; other chats stay ignored."""
    bot = await make_bot(_settings(api, user_ids=[], chat_ids=[CHAT, GROUP]))
    reply = await ask(api, "/pairs", chat_id=GROUP, user_id=STRANGER)
    assert "BTC/USDT" in reply.visible
    api.push_command("/pairs", chat_id=STRANGER_CHAT, user_id=USER)
    await eventually(lambda: bot.stats.ignored_updates == 1)


# -- Confirmations -----------------------------------------------------------------------------


_FLAT = (BotState.RUNNING, TradingState.NORMAL, ())


def _state(control: FakeControl) -> tuple[BotState, TradingState, tuple[str, ...]]:
    return control.state, control.trading_state, tuple(control.positions)


@pytest.mark.parametrize(
    ("command", "result", "expected_state"),
    [
        ("/pause", "Paused", (BotState.PAUSED, TradingState.NORMAL, ("BTC/USDT",))),
        ("/stopbuy", "Exits only", (BotState.RUNNING, TradingState.REDUCING, ("BTC/USDT",))),
        ("/forceexit btc-usdt", "Exit sent for BTC/USDT", _FLAT),
        ("/forceexit all", "Exit sent for BTC/USDT", _FLAT),
    ],
)  # fmt: skip
async def test_dangerous_commands_act_only_after_confirmation(
    api: FakeTelegram,
    bot: TelegramBot,
    control: FakeControl,
    command: str,
    result: str,
    expected_state: tuple[BotState, TradingState, tuple[str, ...]],
) -> None:
    """The command asks first; only the Confirm press changes state, and only once."""
    before = _state(control)
    prompt = await ask(api, command)
    assert _state(control) == before
    edit = await press(api, prompt, "Confirm")
    assert result in edit.visible
    assert _state(control) == expected_state
    assert api.answers  # the button press was acknowledged
    again = await press(api, prompt, "Confirm")  # a second press of the same button
    assert "Expired" in again.visible
    assert _state(control) == expected_state
    assert control.reasons == [f"telegram user {USER}"]


async def test_resume_asks_then_resumes(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/resume after a pause needs a confirmation too."""
    control.state = BotState.PAUSED
    prompt = await ask(api, "/resume")
    assert control.state is BotState.PAUSED
    await press(api, prompt, "Confirm")
    assert _state(control)[0] is BotState.RUNNING


async def test_resetrisk_names_the_latched_breakers_and_resets_only_on_confirm(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/resetrisk asks, naming what is latched; Confirm lifts it once, as the operator."""
    control.trading_state = TradingState.FLATTEN
    control.risk = {"latched": {"peak_to_trough": {"state": "flatten", "reason": "drawdown"}}}
    prompt = await ask(api, "/resetrisk")
    assert "peak_to_trough" in prompt.visible
    assert control.trading_state is TradingState.FLATTEN
    edit = await press(api, prompt, "Confirm")
    assert "Risk reset: trading normal" in edit.visible
    assert _trading_state(control) is TradingState.NORMAL
    assert control.reasons == [f"telegram user {USER}"]
    assert "Expired" in (await press(api, prompt, "Confirm")).visible
    assert control.reasons == [f"telegram user {USER}"]


async def test_cancel_leaves_everything_as_it_was(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """Cancel edits the prompt and does not act; the token is spent."""
    prompt = await ask(api, "/forceexit BTC/USDT")
    edit = await press(api, prompt, "Cancel")
    assert "Cancelled" in edit.visible
    assert "Expired" in (await press(api, prompt, "Confirm")).visible
    assert "BTC/USDT" in control.positions


async def test_confirmation_from_a_stranger_is_ignored(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """A stranger's press neither acts nor spends the confirmation; the operator's still works."""
    prompt = await ask(api, "/stopbuy")
    api.push_callback(
        prompt.button("Confirm"), chat_id=CHAT, user_id=STRANGER, message_id=prompt.message_id
    )
    await eventually(lambda: bot.stats.ignored_updates == 1)
    assert control.trading_state is TradingState.NORMAL
    assert api.edits == []
    await press(api, prompt, "Confirm")
    assert _state(control)[1] is TradingState.REDUCING


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/forceexit ETH/USDT", "No open position on ETH/USDT"),
        ("/forceexit", "Usage: /forceexit <pair>"),
        ("/mode", "Mode: sim"),
        ("/mode sim", "Already in sim mode"),
        ("/mode paper", "Usage: /mode sim or /mode live"),
    ],
)
async def test_refusals_need_no_confirmation(
    api: FakeTelegram, bot: TelegramBot, command: str, expected: str
) -> None:
    """Requests that cannot act are answered at once, without a button."""
    reply = await ask(api, command)
    assert expected in reply.visible
    assert reply.reply_markup is None


async def test_mode_switch_reports_success_and_refusal(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/mode asks, then runs the mode switch; a refusal from it is shown, not raised."""
    control.mode = "live"
    edit = await press(api, await ask(api, "/mode sim"), "Confirm")
    assert "now in sim" in edit.visible
    assert bot.switched == ["sim"]  # type: ignore[attr-defined]
    control.mode = "sim"
    edit = await press(api, await ask(api, "/mode live"), "Confirm")
    assert "Failed: live needs API keys" in edit.visible


async def test_mode_without_a_switch_is_unavailable(
    api: FakeTelegram, make_bot: BotFactory
) -> None:
    """Without a mode switch /mode live says so instead of asking."""
    await make_bot()
    reply = await ask(api, "/mode live")
    assert "not available" in reply.visible
    assert reply.reply_markup is None


# -- Alerts and delivery -----------------------------------------------------------------------


async def test_burst_of_200_respects_the_chat_rate_and_loses_nothing(
    api: FakeTelegram, make_bot: BotFactory
) -> None:
    """200 alerts (150 distinct, 50 repeats of one) arrive spaced by the per-chat limit."""
    rate = 60.0
    bot = await make_bot(_settings(api, max_messages_per_second=rate), batch_alerts=False)
    sent: Counter[str] = Counter()
    for i in range(200):
        text = "node lagging" if i % 4 == 3 else f"fill #{i}"
        sent[text] += 1
        bot.notify(text)
    await eventually(lambda: bot.stats.delivered_alerts >= 200, timeout=20)
    messages = api.messages_to(CHAT)
    assert _counts(messages) == sent  # every alert once; repeats only as a count
    assert 150 < len(messages) < 200  # the repeats coalesced while waiting
    # Arrival times jitter on a busy machine (one late request makes the next gap short),
    # so the limit is checked as Telegram applies it, over runs: any 20 consecutive
    # messages span at least 20 intervals, less a small allowance for that jitter.
    stamps = [m.ts for m in messages]
    interval = 1 / rate
    windows = [stamps[i + 20] - stamps[i] for i in range(len(stamps) - 20)]
    assert min(windows) >= 20 * interval * 0.85
    assert stamps[-1] - stamps[0] >= (len(stamps) - 1) * interval * 0.95
    assert bot.stats.delivered_alerts == 200


async def test_batching_joins_queued_alerts_within_the_rate(
    api: FakeTelegram, make_bot: BotFactory
) -> None:
    """At a slow chat rate queued alerts go out joined in few messages, all of them."""
    bot = await make_bot(_settings(api, max_messages_per_second=4.0))
    texts = [f"order {i} filled 0.01 @ {65000 + i}" for i in range(200)]
    for text in texts:
        bot.notify(text)
    await eventually(lambda: bot.stats.delivered_alerts == 200, timeout=10)
    messages = api.messages_to(CHAT)
    assert _counts(messages) == Counter(texts)
    assert len(messages) <= 5
    assert all(len(m.text) <= 4096 for m in messages)
    stamps = [m.ts for m in messages]
    assert all(b - a >= 0.25 * 0.8 for a, b in itertools.pairwise(stamps))


async def test_retry_after_is_honoured(api: FakeTelegram, bot: TelegramBot) -> None:
    """A 429 with retry_after=1 delays the resend by at least that long, and nothing is lost."""
    api.fail_next("sendMessage", status=429, retry_after=1)
    bot.notify("circuit breaker tripped")
    await eventually(lambda: len(api.messages_to(CHAT)) == 1, timeout=5)
    refused = api.calls_to("sendMessage")[0]
    assert refused.status == 429
    assert api.messages_to(CHAT)[0].ts - refused.ts >= 1.0
    assert api.messages_to(CHAT)[0].visible == "circuit breaker tripped"
    assert bot.stats.retry_after == 1


async def test_server_errors_are_retried(api: FakeTelegram, bot: TelegramBot) -> None:
    """Two 502 answers in a row are retried with backoff until the alert is delivered once."""
    api.fail_next("sendMessage", status=502, times=2)
    bot.notify("stop hit on BTC/USDT")
    await eventually(lambda: len(api.messages_to(CHAT)) == 1, timeout=5)
    assert [c.status for c in api.calls_to("sendMessage")] == [502, 502, 200]
    assert bot.stats.network_errors == 2


async def test_alerts_wait_and_coalesce_while_unreachable(
    api: FakeTelegram, bot: TelegramBot
) -> None:
    """With the API gone alerts queue, repeats merge with a count, and all go out on return."""
    await api.stop()
    bot.notify("opened BTC/USDT")
    for _ in range(3):
        bot.notify("exchange websocket reconnecting")
    bot.notify(error_alert(TimeoutError("fetch_ohlcv timed out after 10 s"), component="feed"))
    bot.notify(error_alert(TimeoutError("fetch_ticker timed out after 10 s"), component="feed"))
    bot.notify("closed BTC/USDT")
    await eventually(lambda: bot.stats.network_errors >= 2)
    assert api.messages == []
    await api.start()
    await eventually(lambda: bot.stats.pending == 0 and bool(api.messages), timeout=10)
    counts = _counts(api.messages_to(CHAT))
    assert counts["opened BTC/USDT"] == 1
    assert counts["exchange websocket reconnecting"] == 3
    assert counts["closed BTC/USDT"] == 1
    # Similar errors (same component and kind) merge too, keeping the latest wording.
    assert counts["fetch_ticker timed out after 10 s"] == 2
    assert counts["fetch_ohlcv timed out after 10 s"] == 0


async def test_notify_from_another_thread(api: FakeTelegram, bot: TelegramBot) -> None:
    """notify() from a worker thread is delivered without blocking that thread."""
    worker = threading.Thread(target=bot.notify, args=("retrained model v7",))
    worker.start()
    worker.join(timeout=5)  # the loop is not running meanwhile: notify must not wait on it
    assert not worker.is_alive()
    await eventually(lambda: any(m.visible == "retrained model v7" for m in api.messages))


async def test_text_is_escaped_and_secrets_redacted(api: FakeTelegram, bot: TelegramBot) -> None:
    """Free-form text reaches the user literally (HTML-safe) with the bot token masked."""
    await bot.notify_async(f"<b>not bold</b> & 1 < 2 token={TOKEN}")
    await eventually(lambda: len(api.messages_to(CHAT)) == 1)
    message = api.messages_to(CHAT)[0]
    assert message.visible == "<b>not bold</b> & 1 < 2 token=***"
    assert TOKEN not in message.text


async def test_stop_flushes_the_queue(api: FakeTelegram, make_bot: BotFactory) -> None:
    """Alerts still queued at stop are sent before the bot shuts down."""
    bot = await make_bot(_settings(api, max_messages_per_second=10.0), batch_alerts=False)
    for i in range(4):
        bot.notify(f"shutdown step {i}")
    await bot.stop(flush_timeout=5.0)
    assert [m.visible for m in api.messages_to(CHAT)] == [f"shutdown step {i}" for i in range(4)]


async def test_alerts_reach_every_configured_chat(api: FakeTelegram, make_bot: BotFactory) -> None:
    """One notify goes to each configured chat, private and group."""
    bot = await make_bot(_settings(api, chat_ids=[CHAT, GROUP]))
    assert await bot.deliver("daily summary ready", timeout_s=5)
    assert [m.visible for m in api.messages_to(CHAT)] == ["daily summary ready"]
    assert [m.visible for m in api.messages_to(GROUP)] == ["daily summary ready"]


async def test_notify_before_start_is_kept(api: FakeTelegram, control: FakeControl) -> None:
    """Alerts raised before start() are queued and sent once the bot is up."""
    bot = TelegramBot(_settings(api), control, poll_timeout=1.0)
    bot.notify("booting")
    await bot.start()
    try:
        await eventually(lambda: [m.visible for m in api.messages] == ["booting"])
    finally:
        await bot.stop(flush_timeout=1.0)


async def test_start_while_unreachable_connects_later(
    api: FakeTelegram, control: FakeControl
) -> None:
    """A bot started while Telegram is down keeps trying, then connects and sends what waited."""
    await api.stop()
    bot = TelegramBot(_settings(api), control, poll_timeout=1.0, retry_base=0.05, retry_cap=0.2)
    await bot.start()
    try:
        assert not bot.is_connected
        bot.notify("queued while offline")
        await api.start()
        await eventually(lambda: bot.is_connected, timeout=5)
        await eventually(lambda: [m.visible for m in api.messages] == ["queued while offline"])
    finally:
        await bot.stop(flush_timeout=1.0)


async def test_position_decimal_formatting_in_positions(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/positions shows a short position's quantity exactly and its PnL sign from the side."""
    control.open("ETH/USDT", "0.000125", "2000", "1900", short=True)
    reply = await ask(api, "/positions")
    assert "ETH/USDT short 0.000125 @ 2000 → 1900" in reply.visible
    assert f"uPnL {Decimal('0.0125'):+,.2f}" in reply.visible


async def test_long_reports_are_split_into_valid_messages(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """A reconciliation report longer than one message arrives whole, in several messages."""
    lines = [f"order cid-{i:04d}: adopted <filled 0.01 @ 65000>" for i in range(200)]
    control.reconcile_report = "\n".join(lines)
    api.push_command("/reconcile", chat_id=CHAT, user_id=USER)
    await eventually(lambda: "cid-0199" in "".join(m.visible for m in api.messages), timeout=10)
    text = "\n".join(m.visible for m in api.messages_to(CHAT))
    assert all(line in text for line in lines)
    assert all(len(m.text) <= 4096 for m in api.messages)


async def test_html_refused_by_telegram_is_resent_as_plain_text(
    api: FakeTelegram, bot: TelegramBot
) -> None:
    """If Telegram cannot parse an alert's HTML, the alert goes out once as plain text."""
    bot.notify(Alert("<b>breaker tripped: drawdown 15%", "circuit_breaker"))
    await eventually(lambda: bool(api.messages_to(CHAT)))
    [message] = api.messages_to(CHAT)
    assert message.parse_mode is None
    assert message.text == "breaker tripped: drawdown 15%"
    assert [c.status for c in api.calls_to("sendMessage")] == [400, 200]


async def test_prefix_marks_every_alert(api: FakeTelegram, make_bot: BotFactory) -> None:
    """A configured prefix (e.g. the mode) starts every alert, escaped like the rest."""
    bot = await make_bot(prefix="[sim<1>]")
    assert await bot.deliver("order filled", timeout_s=5)
    assert api.messages_to(CHAT)[0].visible == "[sim<1>] order filled"


async def test_why_lists_the_candlestick_patterns_of_the_latest_candles(
    api: FakeTelegram, bot: TelegramBot, control: FakeControl
) -> None:
    """/why adds the patterns found on the pair's last candles (real sample candles)."""
    from data_manager import latest_patterns, load_candles
    from tests.conftest import SAMPLE

    day = load_candles(SAMPLE / "bybit_BTC-USDT_1m.csv.gz", timeframe="1m")
    # The first window of the sample whose last candles show a pattern.
    end = next(i for i in range(60, len(day)) if latest_patterns(day.iloc[:i]))
    control.candles["BTC/USDT"] = day.iloc[:end]
    expected = latest_patterns(day.iloc[:end])
    reply = await ask(api, "/why btcusdt")
    assert "patterns: " in reply.visible
    for item in expected[:8]:
        assert item["label"] in reply.visible
    control.candles.clear()
    assert "patterns" not in (await ask(api, "/why btcusdt")).visible


@pytest.mark.parametrize("slow", ["flood control", "request in flight"])
async def test_an_alert_a_shutdown_step_cuts_short_is_held_for_the_next_start(
    api: FakeTelegram, control: FakeControl, tmp_path: Path, slow: str
) -> None:
    """The daemon gives its Telegram stop one shutdown step (1.5 s): an alert Telegram is
    slow to take within it is spooled, and the next run delivers it once."""
    spool = tmp_path / "state" / "telegram_outbox.json"
    options: dict[str, Any] = {"poll_timeout": 1.0, "retry_base": 0.05, "retry_cap": 0.3}
    first = TelegramBot(_settings(api), control, spool=spool, **options)
    await first.start()
    if slow == "flood control":
        api.fail_next("sendMessage", status=429, retry_after=4)  # the sender waits 4 s
    else:
        api.hold_next("sendMessage", 4.0)  # the send hangs past the step
    first.notify("trading stopped: boom")
    await eventually(lambda: bool(api.calls_to("sendMessage")) or slow != "flood control")
    with pytest.raises(TimeoutError):  # as the daemon runs its shutdown steps
        await asyncio.wait_for(first.stop(), timeout=SHUTDOWN_STEP_TIMEOUT)
    rows = json.loads(spool.read_text())
    assert [r["text"] for r in rows] == ["trading stopped: boom"]
    second = TelegramBot(_settings(api), control, spool=spool, **options)
    await second.start()
    try:
        await eventually(lambda: any("trading stopped: boom" in m.visible for m in api.messages))
    finally:
        await second.stop(flush_timeout=1.0)
    assert [m.visible.count("trading stopped: boom") for m in api.messages_to(CHAT)] == [1]
    assert not spool.exists()


async def test_alerts_undelivered_at_stop_are_sent_after_the_next_start(
    api: FakeTelegram, control: FakeControl, tmp_path: Path
) -> None:
    """Telegram down at stop: the alerts are spooled, and the next run delivers them once."""
    spool = tmp_path / "state" / "telegram_outbox.json"
    options: dict[str, Any] = {"poll_timeout": 1.0, "retry_base": 0.05, "retry_cap": 0.3}
    await api.stop()
    first = TelegramBot(_settings(api), control, spool=spool, **options)
    await first.start()
    first.notify("stop hit on BTC/USDT at 64000")
    first.notify("stop hit on BTC/USDT at 64000")  # coalesced: one message, x2
    first.notify("daily loss limit reached")
    await first.stop(flush_timeout=0.3)
    rows = json.loads(spool.read_text())
    assert sorted(r["text"] for r in rows) == [
        "daily loss limit reached",
        "stop hit on BTC/USDT at 64000",
    ]
    await api.start()
    second = TelegramBot(_settings(api), control, spool=spool, **options)
    await second.start()
    try:
        await eventually(
            lambda: (
                sum("held over from before a restart" in m.visible for m in api.messages) == 2
                or any("daily loss" in m.visible and "stop hit" in m.visible for m in api.messages)
            )
        )
        text = "\n".join(m.visible for m in api.messages)
        assert text.count("stop hit on BTC/USDT at 64000") == 1
        assert "x2, first at" in text  # the coalescing count survived the restart
        assert text.count("daily loss limit reached") == 1
        assert not spool.exists()
    finally:
        await second.stop(flush_timeout=1.0)
    assert not spool.exists()  # delivered: nothing held this time
