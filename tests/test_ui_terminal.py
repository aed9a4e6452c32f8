"""The dashboard once through a real terminal: tmux runs it, we send keys and read the pane."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, eventually


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing in CI: .ci/browser.sh should have installed it")
        pytest.skip("tmux not installed (run .ci/browser.sh)")
    return path


class Tmux:
    """A private tmux server (its own socket) holding one session."""

    def __init__(self, binary: str, socket: str) -> None:
        self.binary = binary
        self.socket = socket

    async def run(self, *args: str, check: bool = True) -> str:
        process = await asyncio.create_subprocess_exec(
            self.binary,
            "-u",  # UTF-8, whatever the locale
            "-L",
            self.socket,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if check and process.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {err.decode(errors='replace')}")
        return out.decode(errors="replace")

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", "ui", check=False)

    async def alive(self) -> bool:
        return bool(await self.run("list-sessions", check=False))


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[Tmux]:
    server = Tmux(_tmux(), f"kestrel-ui-test-{os.getpid()}")
    yield server
    await server.run("kill-server", check=False)


async def test_dashboard_in_a_real_terminal(tmux: Tmux, tmp_path: Path) -> None:
    """In tmux the dashboard draws its panels and obeys right, p, s and q."""
    events = tmp_path / "events.log"
    events.touch()
    # Textual draws on stderr, so nothing is redirected. COLUMNS/LINES would override the
    # pane's size (pytest's environment may carry them).
    command = (
        f"unset COLUMNS LINES; cd {ROOT} && "
        f"LANG=C.UTF-8 exec {sys.executable} -m tests.test_ui_support {events}"
    )
    await tmux.run("new-session", "-d", "-s", "ui", "-x", "160", "-y", "50", command)

    async def shows(*needles: str) -> bool:
        screen = await tmux.screen()
        return all(needle in screen for needle in needles)

    await eventually(lambda: shows("Equity & PnL", "10,321.45", "BTC/USDT (1/3)"), timeout=30)
    await eventually(lambda: shows("Market depth BTC/USDT", "mid 50,600.00", "-31.20", "+300.00"))

    await tmux.run("send-keys", "-t", "ui", "Right")
    await eventually(lambda: shows("ETH/USDT (2/3)", "Market depth ETH/USDT", "3,010.50"))

    await tmux.run("send-keys", "-t", "ui", "p")
    await eventually(lambda: "pause dashboard" in events.read_text())
    await eventually(lambda: shows("state paused"))

    await tmux.run("send-keys", "-t", "ui", "s")
    await eventually(lambda: shows("cannot switch to live", "API keys"))
    assert "switch_mode" not in events.read_text()

    await tmux.run("send-keys", "-t", "ui", "q")
    await eventually(lambda: "exited" in events.read_text(), timeout=10)

    async def gone() -> bool:
        return not await tmux.alive()

    await eventually(gone)
    assert events.read_text().splitlines() == [
        "pause dashboard",
        "stop operator quit the dashboard",
        "exited",
    ]
