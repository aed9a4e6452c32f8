"""Fault soak: 1,000 mixed calls through 5xx, timeouts, lost answers and rate-limit bursts."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from error_handler import BotError, BusinessError
from exchange import Exchange
from models import OrderIntent, OrderType, Side
from tests.bybit_emulator import (
    IP_LIMIT,
    IP_WINDOW_S,
    UID_LIMITS,
    BybitEmulator,
    exchange_settings,
    max_in_window,
)


CALLS = 1000
WORKERS = 16
PAIRS = ["BTC/USDT", "BTC/USDT:USDT", "ETH/USDT", "ETH/USDT:USDT"]
# (operation, weight): mostly market data, like a bot's traffic.
MIX = [
    ("ticker", 22),
    ("book", 12),
    ("ohlcv", 12),
    ("trades", 8),
    ("balance", 6),
    ("positions", 5),
    ("open_orders", 6),
    ("fetch_order", 4),
    ("my_trades", 3),
    ("create", 15),
    ("cancel", 7),
]


class Driver:
    """Issue the planned calls, remembering what happened to each."""

    def __init__(self, emu: BybitEmulator, ex: Exchange, rng: random.Random) -> None:
        self.emu, self.ex, self.rng = emu, ex, rng
        self.outcomes: Counter[str] = Counter()
        self.unhandled: list[BaseException] = []
        self.created: dict[str, str] = {}  # client id -> pair, for creates that returned
        self.refused: set[str] = set()  # creates refused (a business error): never placed
        self.ambiguous: dict[str, str] = {}  # creates that failed otherwise: look them up
        self.resting: list[tuple[str, str]] = []
        self.seq = 0

    def _intent(self) -> OrderIntent:
        self.seq += 1
        cid = f"soak-{self.seq}"
        if self.seq % 2:  # a spot limit buy far below the market: rests, can be cancelled
            price = (self.emu.last_price("BTCUSDT") * Decimal("0.7")).quantize(Decimal("0.01"))
            return OrderIntent(
                "BTC/USDT", Side.BUY, Decimal("0.001"), OrderType.LIMIT, cid, "soak", price=price
            )
        side = Side.BUY if self.seq % 4 else Side.SELL
        return OrderIntent("BTC/USDT:USDT", side, Decimal("0.001"), OrderType.MARKET, cid, "soak")

    async def _create(self) -> None:
        intent = self._intent()
        try:
            order = await self.ex.create_order(intent)
        except BusinessError:
            self.refused.add(intent.client_order_id)
            raise
        except BotError:
            self.ambiguous[intent.client_order_id] = intent.pair
            raise
        assert order.client_order_id == intent.client_order_id
        self.created[intent.client_order_id] = intent.pair
        if intent.type is OrderType.LIMIT:
            self.resting.append((intent.pair, intent.client_order_id))

    async def _cancel(self) -> None:
        if not self.resting:
            await self.ex.fetch_open_orders("BTC/USDT")
            return
        pair, cid = self.resting.pop(self.rng.randrange(len(self.resting)))
        await self.ex.cancel_order(pair, client_order_id=cid)

    async def _fetch_order(self) -> None:
        cid = self.rng.choice(list(self.created) or ["soak-none"])
        await self.ex.fetch_order(self.created.get(cid, "BTC/USDT"), client_order_id=cid)

    def operation(self, name: str) -> Callable[[], Awaitable[Any]]:
        pair = self.rng.choice(PAIRS)
        ops: dict[str, Callable[[], Awaitable[Any]]] = {
            "ticker": lambda: self.ex.fetch_ticker(pair),
            "book": lambda: self.ex.fetch_order_book(pair, 25),
            "ohlcv": lambda: self.ex.fetch_ohlcv(pair, "1m", limit=20),
            "trades": lambda: self.ex.fetch_trades(pair, limit=10),
            "balance": self.ex.fetch_balance,
            "positions": self.ex.fetch_positions,
            "open_orders": lambda: self.ex.fetch_open_orders(pair),
            "fetch_order": self._fetch_order,
            "my_trades": lambda: self.ex.fetch_my_trades(pair),
            "create": self._create,
            "cancel": self._cancel,
        }
        return ops[name]

    async def run(self, plan: list[str]) -> None:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(plan):
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                index, name = queue.get_nowait()
                self._bursts(index)
                try:
                    await self.operation(name)()
                    self.outcomes["ok"] += 1
                except BotError as e:  # handled: our error tree, with context
                    self.outcomes[type(e).__name__] += 1
                except Exception as e:  # anything else is a failure of the layer
                    self.unhandled.append(e)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    def _bursts(self, index: int) -> None:
        # Rate-limit bursts on top of the random faults.
        if index in (200, 600):
            self.emu.fail_next("10006", times=8, path="/v5/order/")
            self.emu.fail_next("429", times=6, path="/v5/market/")
        if index == 400:
            self.emu.fail_next("10006", times=6, path="/v5/account/")
            self.emu.fail_next("403", times=1, path="/v5/market/")


def _assert_within_published_limits(emu: BybitEmulator) -> None:
    assert max_in_window([r.t for r in emu.requests], IP_WINDOW_S) <= IP_LIMIT
    by_endpoint: dict[tuple[str, str], list[float]] = {}
    for r in emu.requests:
        if r.path in UID_LIMITS:
            by_endpoint.setdefault((r.path, r.category or "*"), []).append(r.t)
    for (path, category), times in by_endpoint.items():
        limits = UID_LIMITS[path]
        limit = limits.get(category, limits.get("*", 10))
        assert max_in_window(times, 1.0) <= limit, (path, category)
    assert not [r for r in emu.requests if r.fault in ("uid_limit", "ip_limit")]


async def test_fault_soak_no_unhandled_errors_no_duplicates_within_limits() -> None:
    """1,000 calls through 5xx, timeouts, lost answers, bursts: handled, no orphans, in limits.

    Lost answers are the faults that hurt: the exchange placed or cancelled the order, and
    the answer never arrived (held past the timeout, or truncated).
    """
    rng = random.Random(20240601)
    names, weights = zip(*MIX, strict=True)
    plan = rng.choices(names, weights=weights, k=CALLS)
    async with BybitEmulator(balances={"USDT": "1000000", "BTC": "10"}, hang_s=0.6, seed=5) as emu:
        emu.fault_rates = {"5xx": 0.08, "timeout": 0.04, "timeout_after": 0.03, "malformed": 0.03}
        exchange = Exchange(
            exchange_settings(emu, timeout_s=0.3),
            retry_attempts=6,
            retry_base_s=0.02,
            retry_cap_s=0.2,
            ip_ban_pause_s=0.3,
            rng=random.Random(1),
        )
        async with exchange:
            driver = Driver(emu, exchange, rng)
            await driver.run(plan)
            emu.clear_faults()
            # Every create whose outcome the caller could not know is settled by its id,
            # exactly as the exchange has it.
            looked_up = {
                cid: await exchange.fetch_order(pair, client_order_id=cid)
                for cid, pair in driver.ambiguous.items()
            }

        assert driver.unhandled == []
        assert sum(driver.outcomes.values()) == CALLS
        assert driver.outcomes["ok"] >= 0.97 * CALLS, driver.outcomes
        faults = Counter(r.fault for r in emu.requests)
        assert faults["5xx"] >= 40
        assert faults["timeout"] >= 20
        assert faults["timeout_after"] + faults["malformed"] >= 30
        assert faults["10006"] + faults["429"] + faults["403"] >= 20

        per_link_id = emu.orders_by_link_id()
        assert all(
            len(orders) == 1 for cid, orders in per_link_id.items() if cid.startswith("soak-")
        )
        assert set(driver.created) <= set(per_link_id)
        # No orphan: every order on the exchange was either answered to the caller or is one
        # the caller was told to look up; none was placed behind a refusal.
        soak_orders = {cid for cid in per_link_id if cid.startswith("soak-")}
        assert soak_orders <= set(driver.created) | set(driver.ambiguous)
        assert not soak_orders & driver.refused
        for cid, found in looked_up.items():
            assert (found is not None) == (cid in per_link_id), cid
        _assert_within_published_limits(emu)
