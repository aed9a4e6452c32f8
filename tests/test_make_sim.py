"""`make sim`'s command as a new user meets it: the dashboard in a real terminal, and a pipe."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, eventually
from tests.test_ui_terminal import Tmux, _tmux


def sim_args() -> list[str]:
    """Return the arguments `make sim` passes to main.py (its SIM_ARGS)."""
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(r"^SIM_ARGS\s*:?=\s*(.+)$", makefile, re.MULTILINE)
    assert found is not None, "Makefile has no SIM_ARGS"
    assert "main.py $(SIM_ARGS)" in makefile
    return shlex.split(found.group(1))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_")}
    env["KESTREL_STORAGE__DATA_DIR"] = str(tmp_path / "data")
    env["KESTREL_STORAGE__LOG_DIR"] = str(tmp_path / "logs")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def test_make_sim_on_a_pipe_finishes_and_prints_the_summary(tmp_path: Path) -> None:
    """Without a terminal the replay runs flat out, logs to its file and prints the summary."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *sim_args()],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Kestrel sim summary" in proc.stdout
    trades = re.search(r"n_trades\s*│\s*(\d+)", proc.stdout)
    assert trades is not None, proc.stdout
    assert int(trades.group(1)) >= 10  # several pairs, long enough to trade
    candles = re.search(r"candles\s*│\s*(\d+)", proc.stdout)
    assert candles is not None
    assert int(candles.group(1)) == 4 * 2_184  # every candle of the four bundled pairs
    # The decisions went to the log file, not over the console.
    assert "[info" not in proc.stderr
    log = (tmp_path / "logs" / "kestrel.jsonl").read_text()
    assert '"event": "daemon_started"' in log


def test_make_sim_on_one_pipe_ends_with_the_summary(tmp_path: Path) -> None:
    """Stdout and stderr on one pipe (`make sim 2>&1 | tee`): the run's warnings (its breakers
    trip on the bundled candles) all come before the summary, which ends the output."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *sim_args()],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if "Kestrel sim summary" in line)
    logged = [i for i, line in enumerate(lines) if re.match(r"\d{4}-\d\d-\d\dT\S+Z \[", line)]
    assert len(logged) >= 3, proc.stdout  # breaker trips, each a warning
    assert max(logged) < title, "\n".join(lines[title:])
    assert lines[-1].startswith("└"), lines[-3:]


@pytest.fixture
async def tmux() -> AsyncIterator[Tmux]:
    server = Tmux(_tmux(), f"kestrel-sim-test-{os.getpid()}")
    yield server
    await server.run("kill-server", check=False)


async def test_make_sim_in_a_terminal_shows_the_dashboard_trading(
    tmux: Tmux, tmp_path: Path
) -> None:
    """On a terminal the dashboard opens on the multi-pair replay and trades appear on it;
    q stops the run, after which the summary is printed; logs stay in their file."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _env(tmp_path).items() if "KESTREL" in k)
    command = (
        f"unset COLUMNS LINES; cd {shlex.quote(str(tmp_path))} && {env} LANG=C.UTF-8 "
        f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'main.py'))} "
        f"{shlex.join(sim_args())}; echo EXITED $?; sleep 60"
    )
    await tmux.run("new-session", "-d", "-s", "ui", "-x", "160", "-y", "50", command)

    async def screen_has(*needles: str) -> bool:
        screen = await tmux.screen()
        return all(needle in screen for needle in needles)

    pairs = ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT")
    await eventually(lambda: screen_has("Equity & PnL", "Pairs", "Strategy ranking"), timeout=30)
    await eventually(lambda: screen_has(*pairs))

    async def trades_shown() -> bool:
        screen = await tmux.screen()
        return "Recent trades" in screen and "no closed trades yet" not in screen

    await eventually(trades_shown, timeout=40)

    async def counted() -> bool:
        # The strategy panel counts the closed trades too (panels redraw one per frame).
        found = re.search(r"│ trades\s+(\d+)", await tmux.screen())
        return found is not None and int(found.group(1)) >= 2

    await eventually(counted, timeout=30)
    screen = await tmux.screen()
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "make_sim_dashboard.txt").write_text(screen)
    # A closed trade row: exit time, pair, side, then prices and a signed PnL.
    row = re.search(r"\d\d-\d\d \d\d:\d\d\s+(BTC|ETH|SOL|XRP)/USDT\s+long\s+[\d.,]+\s", screen)
    assert row is not None, screen
    assert "[info" not in screen  # the console log is not over the dashboard
    assert "state running" in screen

    await tmux.run("send-keys", "-t", "ui", "q")
    await eventually(lambda: screen_has("EXITED 0"), timeout=20)
    screen = await tmux.screen()
    (artifacts / "make_sim_summary.txt").write_text(screen)
    assert "Kestrel sim summary" in screen
    assert "[info" not in screen  # nothing was logged to the terminal, before or after
    log = (tmp_path / "logs" / "kestrel.jsonl").read_text()
    assert '"event": "operator_stop"' in log
    await asyncio.sleep(0)
