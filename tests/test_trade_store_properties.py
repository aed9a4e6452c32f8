"""Property tests of the trade store: any delivery order of reports and fills, exact Decimals.

Each test opens one store per backend and gives every hypothesis example fresh client
order ids, so examples never see each other's rows (hence the suppressed
`function_scoped_fixture` health check: sharing the store across examples is intended).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import Fill, Liquidity, Order, OrderStatus, Side
from tests.test_trade_store_support import BACKENDS, PAIR, Backend, intent, make_backend, report
from trade_store import TradeStore


SHARED_STORE = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Yield an isolated store location on SQLite, then on PostgreSQL."""
    yield from make_backend(request.param, tmp_path)


@pytest.fixture
def store(backend: Backend) -> Iterator[TradeStore]:
    """Yield an open store on each backend, closed afterwards."""
    opened = backend.open()
    yield opened
    opened.close()


def _fresh_id() -> str:
    return f"cid-{uuid.uuid4().hex[:12]}"


def _decimal(mantissa: st.SearchStrategy[int]) -> st.SearchStrategy[Decimal]:
    # Up to 25 significant digits and 24 decimal places: wider than any exchange's ticks.
    return st.builds(lambda m, e: Decimal(m).scaleb(e), mantissa, st.integers(-24, 6))


POSITIVE = _decimal(st.integers(1, 10**24))
SIGNED = _decimal(st.integers(-(10**24), 10**24))


# -- Fills -----------------------------------------------------------------------------------


@SHARED_STORE
@given(data=st.data())
def test_any_interleaving_of_duplicate_fills_counts_each_once(
    store: TradeStore, data: st.DataObject
) -> None:
    """Fills delivered in any order, each any number of times, sum to the same totals."""
    units = data.draw(st.lists(st.integers(1, 500), min_size=1, max_size=8), label="units")
    prices = data.draw(
        st.lists(st.integers(1, 10**6), min_size=len(units), max_size=len(units)), label="prices"
    )
    repeats = data.draw(st.lists(st.sampled_from(range(len(units))), max_size=12), label="repeats")
    deliveries = data.draw(st.permutations([*range(len(units)), *repeats]), label="deliveries")
    cid = _fresh_id()
    store.journal(intent(cid, qty=str(Decimal(sum(units)).scaleb(-3))), ts=1)
    unique = [
        Fill(
            client_order_id=cid,
            pair=PAIR,
            side=Side.BUY,
            price=Decimal(price).scaleb(-2),
            qty=Decimal(unit).scaleb(-3),
            fee=Decimal(unit).scaleb(-6),
            fee_currency="USDT",
            liquidity=Liquidity.MAKER if i % 2 else Liquidity.TAKER,
            ts=1_000 + i,
            fill_id=f"{cid}-f{i}",
        )
        for i, (unit, price) in enumerate(zip(units, prices, strict=True))
    ]
    first_seen = [i for n, i in enumerate(deliveries) if i not in deliveries[:n]]
    accepted = [i for i in deliveries if store.record_fill(unique[i])]
    assert accepted == first_seen
    totals = store.fill_totals(cid)
    assert totals.count == len(unique)
    assert totals.qty == sum((f.qty for f in unique), Decimal(0))
    assert totals.fee == sum((f.fee for f in unique), Decimal(0))
    assert totals.notional == sum((f.qty * f.price for f in unique), Decimal(0))
    assert store.fills(cid) == unique


# -- Order reports ---------------------------------------------------------------------------


@st.composite
def order_histories(draw: st.DrawFn) -> list[Order]:
    """Draw the true life of one order of qty 10: [open], partial fills..., [terminal]."""
    steps: list[tuple[OrderStatus, int]] = []
    if draw(st.booleans()):
        steps.append((OrderStatus.OPEN, 0))
    partials = draw(st.lists(st.integers(1, 9), unique=True, max_size=4))
    steps += [(OrderStatus.PARTIALLY_FILLED, filled) for filled in sorted(partials)]
    end = draw(
        st.sampled_from([None, OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.EXPIRED])
    )
    if end is OrderStatus.FILLED:
        steps.append((end, 10))
    elif end is not None:
        steps.append((end, steps[-1][1] if steps else 0))
    if not steps:
        steps.append((OrderStatus.OPEN, 0))
    # Several reports may share one exchange millisecond.
    gaps = draw(st.lists(st.integers(0, 3), min_size=len(steps), max_size=len(steps)))
    ts, history = 100, []
    for (status, filled), gap in zip(steps, gaps, strict=True):
        ts += gap
        history.append(report("", status, ts=ts, filled=str(filled)))
    return history


@SHARED_STORE
@given(history=order_histories(), data=st.data())
def test_reports_in_any_order_end_at_the_latest_state(
    store: TradeStore, history: list[Order], data: st.DataObject
) -> None:
    """REST and stream reports delivered in any order, duplicated, settle on the last one."""
    repeats = data.draw(st.lists(st.sampled_from(history), max_size=6), label="repeats")
    deliveries = data.draw(st.permutations([*history, *repeats]), label="deliveries")
    cid = _fresh_id()
    store.journal(intent(cid), ts=1)
    for delivered in deliveries:
        store.update_order(dataclasses.replace(delivered, client_order_id=cid))
    stored = store.get_order(cid)
    last = history[-1]
    assert stored is not None
    assert (stored.status, stored.filled_qty, stored.ts_updated, stored.avg_fill_price) == (
        last.status,
        last.filled_qty,
        last.ts_updated,
        last.avg_fill_price,
    )


# -- Exact Decimals --------------------------------------------------------------------------


@SHARED_STORE
@given(
    qty=POSITIVE,
    price=POSITIVE,
    stop=POSITIVE,
    leverage=POSITIVE,
    fill_price=POSITIVE,
    fee=SIGNED,
    cash=SIGNED,
    equity=SIGNED,
)
def test_decimals_round_trip_exactly(
    store: TradeStore,
    qty: Decimal,
    price: Decimal,
    stop: Decimal,
    leverage: Decimal,
    fill_price: Decimal,
    fee: Decimal,
    cash: Decimal,
    equity: Decimal,
) -> None:
    """Every Decimal written comes back equal, with no float rounding on either backend."""
    cid = _fresh_id()
    wanted = dataclasses.replace(
        intent(cid, stop_price=stop, stop_loss=stop, take_profit=price, leverage=leverage),
        qty=qty,
        price=price,
    )
    store.journal(wanted, ts=7)
    assert store.get_intent(cid) == dataclasses.replace(wanted, ts=7)
    order = store.get_order(cid)
    assert order is not None
    assert (order.qty, order.price, order.stop_price) == (qty, price, stop)
    executed = Fill(cid, PAIR, Side.BUY, fill_price, qty, fee, "USDT", Liquidity.TAKER, 9, cid)
    assert store.record_fill(executed)
    assert store.fills(cid) == [executed]
    ts = int(uuid.uuid4().int % 10**12)
    store.add_equity(ts, cash, equity)
    assert [(p.cash, p.equity) for p in store.equity_curve(since=ts) if p.ts == ts] == [
        (cash, equity)
    ]
