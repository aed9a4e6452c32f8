"""Shared builders for the risk tests: settings, markets, contexts, positions, trades.

No tests live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import numpy as np

from config import RiskSettings
from models import (
    ClosedTrade,
    Market,
    MarketType,
    Position,
    PositionSide,
    Side,
    Signal,
)
from risk_management import RiskContext


T0 = 1_704_067_200_000  # 2024-01-01 00:00:00 UTC, the start of a UTC day
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def settings(**changes: Any) -> RiskSettings:
    """Return risk settings with round numbers; keyword arguments replace fields."""
    base: dict[str, Any] = {
        "risk_per_trade": 0.01,
        "stop_atr_multiple": 2.0,
        "take_profit_atr_multiple": 4.0,
        "max_position_fraction": 0.25,
        "max_total_exposure": 1.0,
        "max_leverage": 1.0,
        "max_open_positions": 5,
        "max_daily_loss": 0.03,
        "max_drawdown": 0.15,
        "reduce_size_drawdown": 0.07,
        "reduced_size_factor": 0.5,
        "max_consecutive_losses": 3,
        "cooldown_minutes": 60,
    }
    base.update(changes)
    return RiskSettings(**base)


def market(
    pair: str = "BTC/USDT",
    *,
    type: MarketType = MarketType.SPOT,
    lot: str = "0.001",
    min_qty: str = "0.001",
    min_notional: str = "5",
    max_qty: str | None = None,
    max_leverage: str = "1",
) -> Market:
    """Return a market with a 0.01 tick and the given lot and limits."""
    base, quote = pair.split("/")
    return Market(
        pair=pair,
        symbol_id=base + quote.split(":")[0],
        base=base,
        quote=quote.split(":")[0],
        type=type,
        tick_size=Decimal("0.01"),
        lot_size=Decimal(lot),
        min_qty=Decimal(min_qty),
        min_notional=Decimal(min_notional),
        max_qty=Decimal(max_qty) if max_qty is not None else None,
        max_leverage=Decimal(max_leverage),
    )


def signal(pair: str = "BTC/USDT", side: Side = Side.BUY, **changes: Any) -> Signal:
    """Return an entry signal at price 100."""
    fields: dict[str, Any] = {
        "pair": pair,
        "side": side,
        "strength": 1.0,
        "reason": "test entry",
        "ts": T0,
        "price": 100.0,
    }
    fields.update(changes)
    return Signal(**fields)


def position(
    pair: str = "ETH/USDT",
    side: PositionSide = PositionSide.LONG,
    *,
    qty: str = "1",
    entry: str = "100",
    stop: str | None = None,
    mark: str | None = None,
    fees_paid: str = "0",
    ts_opened: int = T0,
) -> Position:
    """Return an open position."""
    return Position(
        pair=pair,
        side=side,
        qty=Decimal(qty),
        entry_price=Decimal(entry),
        ts_opened=ts_opened,
        stop_price=Decimal(stop) if stop is not None else None,
        mark_price=Decimal(mark) if mark is not None else None,
        fees_paid=Decimal(fees_paid),
    )


def context(
    *,
    equity: str = "10000",
    cash: str | None = None,
    price: str = "100",
    atr: float | None = 2.0,
    fee: str = "0",
    positions: Mapping[str, Position] | None = None,
    mkt: Market | None = None,
    returns: Mapping[str, np.ndarray] | None = None,
    now: int = T0,
) -> RiskContext:
    """Return a risk context (cash defaults to equity; fees default to zero)."""
    return RiskContext(
        now=now,
        equity=Decimal(equity),
        cash=Decimal(cash if cash is not None else equity),
        positions=dict(positions or {}),
        market=mkt or market(),
        price=Decimal(price),
        atr=atr,
        taker_fee=Decimal(fee),
        returns=returns,
    )


def trade(
    pnl: float, *, pair: str = "BTC/USDT", entry: float = 100.0, qty: float = 1.0
) -> ClosedTrade:
    """Return a closed long round trip with the given PnL."""
    return ClosedTrade(
        pair=pair,
        side=PositionSide.LONG,
        entry_ts=T0,
        exit_ts=T0 + HOUR,
        entry_price=entry,
        exit_price=entry + pnl / qty,
        qty=qty,
        fee=0.0,
        pnl=pnl,
    )


def correlated(rho: float, n: int = 100, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Return two return series whose sample correlation is exactly `rho`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    x = (x - x.mean()) / x.std()
    z = rng.normal(size=n)
    z -= z.mean()
    z -= (z @ x) / (x @ x) * x  # orthogonal to x, so corr(x, z) = 0
    z /= z.std()
    y = rho * x + np.sqrt(1 - rho**2) * z
    return 0.01 * x, 0.01 * y
