"""Suite-wide fixtures: the loopback-only network guard, isolated settings, `eventually`.

Also the Hypothesis profiles: "dev" (the default: random examples, so local runs keep
exploring) and "ci" (chosen by CI=true or HYPOTHESIS_PROFILE=ci): derandomised so a CI run
is reproducible and a red build stays red on re-run, more examples, no deadline (a shared CI
runner's timing is noise, not a finding), and the blob to reproduce any failure locally.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings


if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.running_daemon import RunningDaemon


ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

# Property tests leave max_examples to the profile unless their examples are slow (a real
# SQLite store, a whole replay): those set a smaller count of their own. Both profiles start
# from Hypothesis's defaults: it loads its own "ci" profile whenever a CI variable exists.
_DEFAULTS = settings.get_profile("default")
settings.register_profile("dev", _DEFAULTS, max_examples=200, print_blob=True)
settings.register_profile(
    "ci",
    _DEFAULTS,
    derandomize=True,
    max_examples=500,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],  # a busy runner is not a slow strategy
)
_CI = os.environ.get("CI", "").lower() in ("true", "1")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _CI else "dev"))


def _is_loopback(address: Any) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    return True  # unix sockets and the like


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any outbound connection that is not to 127.0.0.0/8 or ::1."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(address: Any) -> None:
        if not _is_loopback(address):
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {address!r}")

    def connect(self: socket.socket, address: Any) -> Any:
        guard(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    real_sock_connect = asyncio.BaseEventLoop.sock_connect

    async def sock_connect(self: Any, sock: socket.socket, address: Any) -> Any:
        guard(address)
        return await real_sock_connect(self, sock, address)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sock_connect", sock_connect)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop any KESTREL_* variable of the developer's shell and keep files in tmp_path."""
    for key in list(os.environ):
        if key.startswith("KESTREL_") and key != "KESTREL_TEST_POSTGRES_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KESTREL_STORAGE__LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)  # no stray .env is read, nothing is written into the repo


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a polling deadline, not an I/O timeout
    interval: float = 0.01,
) -> None:
    """Wait until `check()` is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def sample_dir() -> Path:
    """Return the bundled sample data directory."""
    return SAMPLE


@pytest.fixture
async def replay_daemon(tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    """Run a real replay daemon in the test's loop until it has traded; stop it in order after."""
    from tests.running_daemon import start_daemon, stop_daemon

    running = await start_daemon(tmp_path)
    yield running
    await stop_daemon(running)


@pytest.fixture(autouse=True, scope="session")
def _stop_process_pool() -> Iterator[None]:
    """Shut the shared CPU process pool down once the session ends."""
    yield
    from utils.utilities import shutdown_pool

    shutdown_pool()
