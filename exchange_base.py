"""What the parts of `Exchange` share: its lifecycle states and the host it mixes into.

`Exchange` (exchange.py) is one class built from parts: its own REST and lifecycle code,
the order methods (`bybit_orders.ExchangeOrders`) and the streams
(`bybit_streams.ExchangeStreams`). `ExchangeBase` declares, for the type checker only,
the state and methods those parts use and `Exchange` provides; at run time it is empty.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar


if TYPE_CHECKING:
    from error_handler import RecoverableError
    from models import Balance, Candle, Fill, Market, Order, OrderBook, Position, Ticker
    from utils.utilities import Clock


__all__ = ["ClientState", "ExchangeBase"]

T = TypeVar("T")


class ClientState(enum.Enum):
    """Lifecycle of an `Exchange` (httpx's guard): it opens once and closes once."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class ExchangeBase:
    """The host side of `Exchange`'s parts: declared here, implemented by `Exchange`."""

    state: ClientState
    _clock: Clock
    _attempts: int
    _last_price: dict[str, Decimal]
    _conditional: dict[str, bool]  # client or exchange id -> is a stop order
    _leverage: dict[str, Decimal]

    if TYPE_CHECKING:

        def _ensure_open(self) -> Any: ...

        async def _once(self, op: str, call: Callable[[], Awaitable[T]], pair: str | None) -> T: ...

        async def _call(
            self, op: str, call: Callable[[], Awaitable[T]], pair: str | None = None
        ) -> T: ...

        def _backoff(self, attempt: int, error: RecoverableError) -> float: ...

        def market(self, pair: str) -> Market:
            """Return the rules of `pair`."""

        def server_now_ms(self) -> int:
            """Return the estimated server time."""

        async def fetch_server_time(self) -> int:
            """Return Bybit's server time in epoch ms."""

        async def fetch_ticker(self, pair: str) -> Ticker:
            """Return the ticker of `pair`."""

        async def set_leverage(self, pair: str, leverage: Decimal | int | float) -> None:
            """Set the leverage of a linear market."""

        async def fetch_balance(self) -> dict[str, Balance]:
            """Return the balances by currency."""

        async def fetch_positions(self, pairs: Sequence[str] | None = None) -> list[Position]:
            """Return the open linear positions."""

        async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
            """Return open orders."""

        async def fetch_my_trades(
            self, pair: str | None = None, since: int | None = None
        ) -> list[Fill]:
            """Return our executions."""

        async def _fetch_closed(
            self,
            pair: str,
            timeframe: str,
            since: int | None,
            limit: int | None,
            until: int | None,
            *,
            now_ms: int,
        ) -> list[Candle]: ...

        def _ticker(self, raw: dict[str, Any], pair: str | None = None) -> Ticker: ...

        def _book(self, raw: dict[str, Any], pair: str, depth: int) -> OrderBook: ...
