"""The executor's order index always knows exactly which orders are still working."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from executor_core import OrderIndex
from models import Order, OrderStatus, OrderType, Side


PAIRS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")


def _order(cid: str, status: OrderStatus) -> Order:
    pair = PAIRS[int(cid[1:]) % len(PAIRS)]  # an order keeps its pair
    return Order(cid, pair, Side.BUY, OrderType.LIMIT, Decimal(1), status, 0, 0)


_ids = st.sampled_from([f"k{i}" for i in range(6)])
_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "setdefault", "del", "pop", "update", "clear"]),
        _ids,
        st.sampled_from(list(OrderStatus)),
    ),
    max_size=40,
)


@given(_ops)
def test_working_orders_are_exactly_the_non_terminal_ones(
    ops: list[tuple[str, str, OrderStatus]],
) -> None:
    """After any mix of writes and removals, `working` equals a scan of every order, and
    `working_of` a scan of one pair's."""
    index, model = OrderIndex(), {}
    for op, cid, status in ops:
        order = _order(cid, status)
        if op == "set":
            index[cid] = order
            model[cid] = order
        elif op == "setdefault":
            assert index.setdefault(cid, order) == model.setdefault(cid, order)
        elif op == "del" and cid in model:
            del index[cid]
            del model[cid]
        elif op == "pop":
            assert index.pop(cid, None) == model.pop(cid, None)
        elif op == "update":
            index.update({cid: order})
            model.update({cid: order})
        elif op == "clear":
            index.clear()
            model.clear()
    assert dict(index) == model
    working = {k: o for k, o in model.items() if not o.status.is_terminal}
    assert index.working == working
    for pair in PAIRS:
        of_pair = {o.client_order_id: o for o in index.working_of(pair)}
        assert of_pair == {k: o for k, o in working.items() if o.pair == pair}
