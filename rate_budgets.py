"""Bybit's published request limits as sliding-window rate budgets (part of `exchange`).

`RateBudget` lets at most `limit` requests through in any rolling window; `RateBudgets`
holds the budgets of one `Exchange` by class (IP, orders per category, queries, position,
account), picks the budget an endpoint spends, and pauses the one Bybit said was hit.
Sliding windows, not token buckets: Bybit counts requests in rolling windows, and a
bucket's burst can exceed the window count.

A position's protection goes before new positions: on the order budgets every request but
a new entry (a protective stop, its move or cancel, an exit, a take-profit) takes the
next free slot ahead of the entries waiting, so that in a live burst whose entries use up
the budget (Bybit's 20 spot orders a second, 16 with our margin) an entry that filled
has its stop placed before the entries queued behind it go, not after them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final


__all__ = ["RateBudget", "RateBudgets"]


class _Turns:
    """Whose turn it is to wait for a budget's next slot.

    Urgent requests first, then the others, each kind in the order it asked; the holder
    keeps its turn until `give`.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiting: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque())

    async def take(self, urgent: bool) -> None:
        if not self._held:
            self._held = True  # nobody waits while the turn is free
            return
        queue = self._waiting[0 if urgent else 1]
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()  # handed the turn just as it was cancelled: pass it on
            elif turn in queue:
                queue.remove(turn)
            raise

    def give(self) -> None:
        for queue in self._waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)  # the turn passes on, still held
                    return
        self._held = False


class RateBudget:
    """At most `limit` requests in any rolling window of `window_s` seconds.

    `acquire` waits until a slot is free and returns it, urgent requests before the
    others, each kind first come first served; `done` marks the slot's request answered.
    A request holds its slot from `acquire` until `window_s` after its answer: Bybit
    counts a request when it arrives, which is after it left and before its answer came,
    so requests sent together (a live burst's) and delayed unevenly on their way never
    arrive more than `limit` to a window. `pause` blocks the budget entirely,
    e.g. until the reset time Bybit announced after a 10006.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        window_s: float,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError(f"budget {name} needs a limit >= 1, got {limit}")
        self.name = name
        self.limit = limit
        self.window_s = window_s
        self._now = now
        self._sleep = sleep
        self._hits: deque[list[float]] = deque()  # [time the slot is counted from]
        self._paused_until = 0.0
        self._turns = _Turns()

    def _evict(self, now: float) -> None:
        while self._hits and now - self._hits[0][0] >= self.window_s:
            self._hits.popleft()

    async def acquire(self, *, urgent: bool = False) -> list[float]:
        """Wait for a free slot in the window, take it and return it (for `done`).

        `urgent`: ahead of every request not urgent still waiting (not of the one whose
        turn it already is).
        """
        await self._turns.take(urgent)
        try:
            while True:
                now = self._now()
                self._evict(now)
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                if len(self._hits) < self.limit:
                    slot = [now]
                    self._hits.append(slot)
                    return slot
                await self._sleep(self._hits[0][0] + self.window_s - now)
        finally:
            self._turns.give()

    def done(self, slot: list[float]) -> None:
        """Count `slot` from now: its request was answered (it reached Bybit before)."""
        slot[0] = max(slot[0], self._now())

    def pause(self, seconds: float) -> None:
        """Let nothing through for `seconds` (extends, never shortens, a pause)."""
        self._paused_until = max(self._paused_until, self._now() + max(seconds, 0.0))

    def remaining_fraction(self) -> float:
        """Return the share of the window still free (0 while paused)."""
        now = self._now()
        if now < self._paused_until:
            return 0.0
        self._evict(now)
        return max(0.0, 1.0 - len(self._hits) / self.limit)


# Published Bybit limits: (requests, window seconds). Queries share one budget (each
# endpoint has its own 50/s at Bybit, so sharing is the conservative side).
_PUBLISHED: Final[dict[str, tuple[int, float]]] = {
    "ip": (600, 5.0),
    "order_linear": (10, 1.0),
    "order_spot": (20, 1.0),
    "amend_spot": (10, 1.0),  # spot amends have their own, lower limit
    "query": (50, 1.0),
    "position": (10, 1.0),
    "account": (5, 1.0),
}
_ORDER_PATHS: Final = frozenset(
    {"v5/order/create", "v5/order/cancel", "v5/order/amend", "v5/order/cancel-all"}
)


def _budget_class(path: str, params: Any) -> str | None:
    # Which per-UID budget an endpoint spends; public market data spends only the IP one.
    if path.startswith("v5/market/"):
        return None
    if path in _ORDER_PATHS:
        category = params.get("category") if isinstance(params, dict) else None
        if category != "spot":
            return "order_linear"
        return "amend_spot" if path == "v5/order/amend" else "order_spot"
    if path in ("v5/position/set-leverage", "v5/position/trading-stop"):
        return "position"
    if path in ("v5/user/query-api", "v5/asset/coin/query-info", "v5/account/info"):
        return "account"
    return "query"


def _entry(path: str, params: Any) -> bool:
    # A new entry: an order create with no trigger that does not reduce a position (on
    # spot, long only here, a sell closes). Everything else on the order budgets protects
    # or closes a position and goes first (module docstring).
    if path != "v5/order/create" or not isinstance(params, dict):
        return False
    if params.get("triggerPrice") not in (None, "") or params.get("reduceOnly") in (True, "true"):
        return False
    return not (params.get("category") == "spot" and str(params.get("side")).lower() == "sell")


class RateBudgets:
    """The budgets of one `Exchange`, keyed by class, and the policy when Bybit says "slow down"."""

    def __init__(self, safety: float, ip_ban_pause_s: float) -> None:
        self.ip_ban_pause_s = ip_ban_pause_s
        self.by_class = {
            name: RateBudget(name, max(1, math.floor(limit * safety)), window)
            for name, (limit, window) in _PUBLISHED.items()
        }

    async def acquire(self, path: str, params: Any) -> list[tuple[RateBudget, list[float]]]:
        """Wait for the budget `path` spends, then for the IP budget; return the slots.

        On an order budget a new entry waits behind the other orders (module docstring).
        """
        name = _budget_class(path, params)
        slots = []
        if name is not None:
            budget = self.by_class[name]
            urgent = name.startswith(("order_", "amend_")) and not _entry(path, params)
            slots.append((budget, await budget.acquire(urgent=urgent)))
        ip = self.by_class["ip"]
        slots.append((ip, await ip.acquire()))
        return slots

    @staticmethod
    def done(slots: list[tuple[RateBudget, list[float]]]) -> None:
        """Mark the slots `acquire` returned answered (`RateBudget.done`)."""
        for budget, slot in slots:
            budget.done(slot)

    def penalise(self, path: str, params: Any, retry_after: float | None, status: int) -> None:
        """Pause the budget Bybit said was hit (all requests after an IP ban)."""
        if status == 403:  # IP ban: Bybit bans for >= 10 minutes; hammering extends it
            self.by_class["ip"].pause(retry_after or self.ip_ban_pause_s)
            return
        name = _budget_class(path, params) or "ip"
        self.by_class[name].pause(retry_after if retry_after is not None else 1.0)


# -- The ccxt client -------------------------------------------------------------------------

_client_class: type | None = None
