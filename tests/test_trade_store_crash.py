"""Crash safety: a process killed with SIGKILL keeps every order journal() returned for.

A child Python process opens the store, journals orders and is killed with SIGKILL (no
close, no atexit, no flush); the test reopens the store as a restarting bot would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from models import OrderStatus
from tests.test_trade_store_support import BACKENDS, Backend, make_backend, report
from trade_store import JournalState


ROOT = Path(__file__).resolve().parent.parent
KILLED = -signal.SIGKILL

# The child: journal a few orders through the protocol's stages, then SIGKILL itself the
# moment the last journal() returns.
_SELF_KILL = """
import json, os, signal, sys
from decimal import Decimal
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from models import Fill, Liquidity, Order, OrderIntent, OrderStatus, OrderType, Side
from trade_store import TradeStore

args = json.loads(sys.argv[1])
store = TradeStore.open(args["url"], schema=args["schema"], bot_id="crash")

def intent(cid):
    return OrderIntent("BTC/USDT", Side.BUY, Decimal("0.5"), OrderType.LIMIT, cid, "entry",
                       price=Decimal("100.25"), stop_loss=Decimal("95"))

def order(cid, status, filled):
    return Order(cid, "BTC/USDT", Side.BUY, OrderType.LIMIT, Decimal("0.5"), status, 1, 50,
                 exchange_order_id="ex-" + cid, price=Decimal("100.25"), filled_qty=Decimal(filled))

store.journal(intent("sent-1"), 1)
store.mark_sent("sent-1")
store.journal(intent("ack-1"), 2)
store.mark_sent("ack-1")
store.acknowledge(order("ack-1", OrderStatus.OPEN, "0"))
store.journal(intent("fill-1"), 3)
store.acknowledge(order("fill-1", OrderStatus.FILLED, "0.5"))
store.record_fill(Fill("fill-1", "BTC/USDT", Side.BUY, Decimal("100.25"), Decimal("0.5"),
                       Decimal("0.01"), "USDT", Liquidity.TAKER, 60, "exec-1"))
store.journal(intent("last-1"), 4)
os.kill(os.getpid(), signal.SIGKILL)
"""

# The child: journal orders as fast as it can, printing each id once journal() returned,
# until the parent kills it at an arbitrary moment.
_JOURNAL_FOREVER = """
import json, sys
from decimal import Decimal
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from models import OrderIntent, OrderType, Side
from trade_store import TradeStore

args = json.loads(sys.argv[1])
store = TradeStore.open(args["url"], schema=args["schema"], bot_id="crash")
i = 0
while True:
    cid = f"cid-{i:06d}"
    store.journal(OrderIntent("ETH/USDT", Side.SELL, Decimal(i + 1).scaleb(-4), OrderType.MARKET,
                              cid, "loop"), i)
    print(cid, flush=True)
    i += 1
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Yield an isolated store location on SQLite, then on PostgreSQL."""
    yield from make_backend(request.param, tmp_path)


def _child(code: str, backend: Backend) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = json.dumps({"url": backend.url, "schema": backend.schema})
    return subprocess.Popen(
        [sys.executable, "-c", code, args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_orders_survive_sigkill_right_after_journal(backend: Backend) -> None:
    """Every journaled order is there after SIGKILL; recovery lists the unacknowledged."""
    child = _child(_SELF_KILL, backend)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == KILLED, stderr
    with backend.open(bot_id="crash") as store:
        orders = {o.client_order_id: o for o in store.all_orders()}
        assert sorted(orders) == ["ack-1", "fill-1", "last-1", "sent-1"]
        assert [o.client_order_id for o in store.unacknowledged()] == ["sent-1", "last-1"]
        assert store.journal_state("sent-1") is JournalState.SENT
        assert store.journal_state("last-1") is JournalState.JOURNALED
        last = store.get_intent("last-1")
        assert last is not None
        assert (last.qty, last.price, last.stop_loss) == (
            Decimal("0.5"),
            Decimal("100.25"),
            Decimal(95),
        )
        assert orders["ack-1"].status is OrderStatus.OPEN
        assert orders["fill-1"].status is OrderStatus.FILLED
        assert [(f.fill_id, f.qty) for f in store.fills()] == [("exec-1", Decimal("0.5"))]
        # Recovery: one order turns up on the exchange, the other never got there.
        store.acknowledge(report("sent-1", OrderStatus.OPEN, ts=70, qty="0.5"))
        store.mark_never_sent("last-1", "not found by client order id")
    with backend.open(bot_id="crash") as reopened:
        assert reopened.unacknowledged() == []
        assert [o.client_order_id for o in reopened.open_orders()] == ["sent-1", "ack-1"]


def test_sigkill_at_an_arbitrary_moment_loses_no_returned_journal(backend: Backend) -> None:
    """Killed mid-stream, the store holds every order whose journal() returned, intact."""
    child = _child(_JOURNAL_FOREVER, backend)
    assert child.stdout is not None
    returned: list[str] = []
    try:
        while len(returned) < 40 and (line := child.stdout.readline()):
            returned.append(line.strip())
    finally:
        child.kill()  # SIGKILL
        _, stderr = child.communicate(timeout=30)
    assert len(returned) == 40, stderr
    assert child.returncode == KILLED
    with backend.open(bot_id="crash") as store:
        stored = store.all_orders()
    ids = [o.client_order_id for o in stored]
    # Everything journal() returned for is there, and nothing beyond the next one.
    assert ids[: len(returned)] == returned
    assert ids == [f"cid-{i:06d}" for i in range(len(ids))]
    assert all(o.qty == Decimal(i + 1).scaleb(-4) for i, o in enumerate(stored))
    assert {o.status for o in stored} == {OrderStatus.NEW}
