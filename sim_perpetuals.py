"""Perpetual positions in the simulated exchange: leverage, liquidation, cross margin.

Part of `trade_simulator`: `SimulatedExchange` inherits `PerpetualWatch`. It keeps each
linear position's average entry and leverage, says where the position would be liquidated
(`perpetuals`: isolated margin, or the wallet balance under cross margin), and closes it
there with an exchange-side order when a bar reaches that price (`_liquidate_if_reached`,
called by `on_candle` after the bar's orders are matched).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

import structlog

from models import (
    Candle,
    Fill,
    Liquidity,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    PositionSide,
    Side,
)
from perpetuals import (
    Liquidation,
    cross_margin,
    isolated_margin,
    liquidation,
    liquidation_reason,
)


log = structlog.get_logger("matching_engine")
ZERO = Decimal(0)
ONE = Decimal(1)


class PerpetualWatch:
    """The simulated exchange's perpetual positions (see the module docstring)."""

    # The host's state (`SimulatedExchange`), used here.
    markets: dict[str, Market]
    taker_fee: Decimal
    _positions: dict[str, Decimal]
    _orders: dict[str, Order]
    _order_ids: itertools.count[int]
    _fill_ids: itertools.count[int]

    if TYPE_CHECKING:

        def _now(self) -> int: ...

        def _cancel_reduce_only(self, pair: str) -> None: ...

    def _init_perpetuals(self, margin_mode: Literal["isolated", "cross"]) -> None:
        self.margin_mode = margin_mode
        self._cross_balance: Callable[[], Decimal] | None = None
        self._leverage: dict[str, Decimal] = {}
        self._entries: dict[str, Decimal] = {}
        self.liquidations: list[Fill] = []

    def set_cross_balance(self, balance: Callable[[], Decimal]) -> None:
        """Read the account's wallet balance from `balance` for cross-margin positions.

        Under cross margin the whole balance backs the position (Bybit's cross formula for
        one position); without a source, positions are margined as isolated.
        """
        self._cross_balance = balance

    def liquidation(self, pair: str) -> Liquidation | None:
        """Return where the position on `pair` would be liquidated, or None (not watched).

        Watched: positions on linear markets opened with a leverage, and shorts (whose
        loss is unbounded even at 1x).
        """
        position = self._positions.get(pair, ZERO)
        market = self.markets.get(pair)
        if position == 0 or market is None or market.type is not MarketType.LINEAR:
            return None
        leverage = self._leverage.get(pair)
        if leverage is None and position > 0:
            return None
        entry, qty = self._entries.get(pair, ZERO), abs(position)
        if entry <= 0:
            return None
        side = PositionSide.LONG if position > 0 else PositionSide.SHORT
        if self.margin_mode == "cross" and self._cross_balance is not None:
            margin = cross_margin(self._cross_balance(), side, entry, qty, self.taker_fee)
        else:
            margin = isolated_margin(entry, qty, leverage or ONE)
        return liquidation(side, entry, qty, margin, self.taker_fee, pair)

    def _watch_bar(self, bar: Candle, results: list[tuple[Order, Fill]]) -> None:
        # After a bar's orders are matched: liquidate a watched position the bar reached.
        liq = self.liquidation(bar.pair)
        if liq is not None:
            self._liquidate_if_reached(bar, liq, results)

    def _liquidate_if_reached(
        self, bar: Candle, liq: Liquidation, results: list[tuple[Order, Fill]]
    ) -> None:
        position = self._positions[bar.pair]
        long = position > 0
        if (long and Decimal(repr(bar.low)) > liq.price) or (
            not long and Decimal(repr(bar.high)) < liq.price
        ):
            return
        qty = abs(position)
        reason = liquidation_reason(liq)
        now = self._now()
        market = self.markets[bar.pair]
        order = Order(
            client_order_id=f"liq-{next(self._order_ids)}",
            pair=bar.pair,
            side=Side.SELL if long else Side.BUY,
            qty=qty,
            type=OrderType.MARKET,
            status=OrderStatus.FILLED,
            ts_created=bar.ts,
            ts_updated=now,
            exchange_order_id=f"sim-liq-{next(self._order_ids)}",
            filled_qty=qty,
            avg_fill_price=liq.price,
            fee=liq.fee,
            reduce_only=True,
            reason=reason,
        )
        fill = Fill(
            client_order_id=order.client_order_id,
            pair=bar.pair,
            side=order.side,
            price=liq.price,
            qty=qty,
            fee=liq.fee,
            fee_currency=market.quote,
            liquidity=Liquidity.TAKER,
            ts=now,
            fill_id=f"simfill-{next(self._fill_ids)}",
            exchange_order_id=order.exchange_order_id,
        )
        self._orders[order.client_order_id] = order
        self._positions[bar.pair] = ZERO
        self._leverage.pop(bar.pair, None)
        self._cancel_reduce_only(bar.pair)
        self.liquidations.append(fill)
        log.warning(
            "position_liquidated",
            pair=bar.pair,
            qty=str(qty),
            price=str(liq.price),
            bankruptcy=str(liq.bankruptcy),
            fee=str(liq.fee),
        )
        results.append((order, fill))

    def _note_leverage(self, intent: OrderIntent) -> None:
        # An opening order's leverage is the position's (Bybit: set per symbol).
        if intent.leverage is not None and not intent.reduce_only:
            self._leverage[intent.pair] = intent.leverage

    def _sizing(self, order: Order) -> tuple[Decimal, Side]:
        # How a quote-sized order is sized: its leverage (1: spot) and side.
        leverage = ONE if order.reduce_only else self._leverage.get(order.pair, ONE)
        return leverage, order.side

    def _track_entry(self, pair: str, signed: Decimal, price: Decimal) -> None:
        # The position's average entry (for its liquidation price): averaged when adding,
        # kept when reducing, the fill's price when opening or flipping. Called with a
        # fill's signed quantity before the position moves.
        held = self._positions.get(pair, ZERO)
        position = held + signed
        if position == 0:
            self._entries.pop(pair, None)
            self._leverage.pop(pair, None)
        elif held == 0 or (held > 0) != (position > 0):
            self._entries[pair] = price
        elif (held > 0) == (signed > 0):
            self._entries[pair] = (
                self._entries.get(pair, price) * held + price * signed
            ) / position
