"""One number everywhere: /score, the status snapshot and the web view show `score()`'s total.

A real replay daemon trades a few round trips; once it has stopped, its engine (the
`models.Control` every surface reads) is frozen, and Telegram's /score, the snapshot, the
web view's JSON and the pure `reward_system.score` on the book's record are compared.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr
from rich.console import Console

from config import UISettings
from models import Ranked
from reward_system import score
from telegram_bot import TelegramBot
from tests.conftest import eventually
from tests.fake_telegram import FakeTelegram
from tests.running_daemon import RunningDaemon, start_daemon, stop_daemon
from tests.test_telegram_bot import _settings, ask
from tests.test_ui_support import make_snapshot
from ui import WebView, section_metrics


TOKEN = "web-token-5c0ffee"


@pytest.fixture
async def stopped(tmp_path: Path) -> RunningDaemon:
    """Return a replay daemon that closed at least three trades and then stopped."""
    running = await start_daemon(tmp_path, speed=1_000.0)
    try:
        await eventually(lambda: len(running.engine.portfolio.closed) >= 3, timeout=20)
    finally:
        await stop_daemon(running)
    return running


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegram]:
    """Return a running fake Bot API."""
    async with FakeTelegram() as fake:
        yield fake


async def test_score_is_the_same_number_on_every_surface(
    api: FakeTelegram, stopped: RunningDaemon
) -> None:
    """/score, the snapshot, the web JSON and score() on the record agree exactly."""
    engine = stopped.engine
    name = engine.strategy.name
    record = engine.reward.record(name)
    expected = score(
        record.trades,
        record.equity_ts,
        record.equity,
        engine.reward.settings,
        context=record.context,
    )
    assert expected.trades == len(engine.portfolio.closed) >= 3
    # The book's curve is the account's equity after each trade.
    assert record.equity[-1] == float(engine.portfolio.equity())
    snap = engine.snapshot()
    [ranked] = snap.ranking
    assert (ranked.name, ranked.total, ranked.trades) == (name, expected.total, expected.trades)
    assert ranked.lcb == expected.skill.lcb
    assert snap.scores == {name: expected.total}
    bot = TelegramBot(_settings(api), engine, poll_timeout=1.0)
    await bot.start()
    try:
        reply = (await ask(api, "/score")).visible
    finally:
        await bot.stop(flush_timeout=1.0)
    shown = re.search(rf"1\. {re.escape(name)} (-?\d+\.\d+) · lcb ([-+]\d+\.\d+)", reply)
    assert shown is not None, reply
    assert shown[1] == f"{expected.total:.3f}"
    assert shown[2] == f"{expected.skill.lcb:+.2f}"
    view = WebView(engine, UISettings(web_port=0, web_token=SecretStr(TOKEN)))
    async with (
        view,
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{view.port}/api/snapshot",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        body = await response.json()
    [row] = body["ranking"]
    assert row["total"] == expected.total
    assert body["scores"] == {name: expected.total}


def test_status_view_shows_the_ranking_best_first() -> None:
    """The metrics section lists each ranked strategy's total, bound and trades in order."""
    ranking = (
        Ranked("steady", 0.41, 1.2, 250.0, 1.234, 180),
        Ranked("lucky", -0.9, 0.6, 10.0, 3.5, 12),
    )
    console = Console(width=80, record=True)
    console.print(section_metrics(make_snapshot(ranking=ranking)))
    text = console.export_text()
    assert "1.234" in text
    assert "lcb +0.41" in text
    assert "180 tr" in text
    assert text.index("steady") < text.index("lucky")
