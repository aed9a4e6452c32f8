"""Shared fixtures and builders for the trade-store tests (SQLite and PostgreSQL).

Every test that takes `backend` runs twice: on a SQLite file in `tmp_path` and on the
PostgreSQL server named by KESTREL_TEST_POSTGRES_URL, inside a schema of its own that is
dropped afterwards, so tests sharing one server never see each other's rows. Outside CI a
missing URL skips the PostgreSQL half; with CI set it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from models import Fill, Liquidity, Order, OrderIntent, OrderStatus, OrderType, Side
from trade_store import TradeStore


POSTGRES_ENV = "KESTREL_TEST_POSTGRES_URL"
PAIR = "BTC/USDT"


def postgres_url() -> str:
    """Return the test server's URL; skip without one, but fail in CI."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {POSTGRES_ENV} is not: the PostgreSQL tests must run")
        pytest.skip(f"{POSTGRES_ENV} is not set (PostgreSQL tests skip outside CI)")
    return url


@dataclass(frozen=True)
class Backend:
    """Where a test's store lives: a URL, and the PostgreSQL schema isolating it."""

    name: str
    url: str
    schema: str | None = None

    def open(self, bot_id: str = "default", **options: Any) -> TradeStore:
        """Open a store on this backend."""
        return TradeStore.open(self.url, bot_id=bot_id, schema=self.schema, **options)


def drop_schema(url: str, schema: str) -> None:
    """Drop a test schema and everything in it."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
    finally:
        engine.dispose()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def make_backend(name: str, tmp_path: Path) -> Iterator[Backend]:
    """Yield a fresh, isolated store location on `name` ("sqlite" or "postgresql").

    Test modules wrap this in their own `backend` fixture, parametrized over `BACKENDS`.
    """
    if name == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'store' / 'kestrel.sqlite'}")
        return
    url = postgres_url()
    schema = f"kt_{uuid.uuid4().hex[:16]}"
    yield Backend("postgresql", url, schema)
    drop_schema(url, schema)


def intent(
    client_order_id: str = "cid-1", qty: str = "10", price: str | None = "100", **kw: Any
) -> OrderIntent:
    """Build a limit buy intent."""
    return OrderIntent(
        pair=kw.pop("pair", PAIR),
        side=kw.pop("side", Side.BUY),
        qty=Decimal(qty),
        type=kw.pop("type", OrderType.LIMIT),
        client_order_id=client_order_id,
        reason=kw.pop("reason", "test entry"),
        price=None if price is None else Decimal(price),
        **kw,
    )


def report(
    client_order_id: str,
    status: OrderStatus,
    *,
    ts: int,
    filled: str = "0",
    qty: str = "10",
    exchange_order_id: str | None = "ex-1",
    **kw: Any,
) -> Order:
    """Build an exchange report on a limit buy of `qty` at 100."""
    return Order(
        client_order_id=client_order_id,
        pair=kw.pop("pair", PAIR),
        side=kw.pop("side", Side.BUY),
        type=OrderType.LIMIT,
        qty=Decimal(qty),
        status=status,
        ts_created=1,
        ts_updated=ts,
        exchange_order_id=exchange_order_id,
        price=Decimal(100),
        filled_qty=Decimal(filled),
        avg_fill_price=Decimal(100) if Decimal(filled) else None,
        **kw,
    )


def fill(client_order_id: str, fill_id: str, qty: str = "1", price: str = "100", **kw: Any) -> Fill:
    """Build a taker fill of a buy."""
    return Fill(
        client_order_id=client_order_id,
        pair=kw.pop("pair", PAIR),
        side=kw.pop("side", Side.BUY),
        price=Decimal(price),
        qty=Decimal(qty),
        fee=kw.pop("fee", Decimal("0.01")),
        fee_currency="USDT",
        liquidity=kw.pop("liquidity", Liquidity.TAKER),
        ts=kw.pop("ts", 1_000),
        fill_id=fill_id,
        **kw,
    )
