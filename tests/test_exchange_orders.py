"""Exchange orders: shapes on the wire, validation before sending, stops, never-duplicated sends."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from error_handler import InsufficientFundsError, OrderNotFoundError, OrderRejected
from exchange import Exchange
from models import OrderIntent, OrderStatus, OrderType, Side, TimeInForce
from tests.bybit_emulator import BybitEmulator, exchange_settings


CREATE = "/v5/order/create"


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with some BTC on the wallet for spot sells."""
    async with BybitEmulator(balances={"USDT": "100000", "BTC": "1"}, hang_s=1.0) as server:
        yield server


def _open(emu: BybitEmulator, **settings: Any) -> Exchange:
    return Exchange(
        exchange_settings(emu, **({"timeout_s": 0.5} | settings)),
        retry_attempts=4,
        retry_base_s=0.01,
        retry_cap_s=0.05,
    )


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange with short timeouts and fast retries."""
    async with _open(emu) as exchange:
        yield exchange


def _intent(pair: str = "BTC/USDT:USDT", cid: str = "cid-1", **kw: Any) -> OrderIntent:
    values: dict[str, Any] = {"side": Side.BUY, "qty": Decimal("0.01"), "type": OrderType.MARKET}
    return OrderIntent(pair=pair, client_order_id=cid, reason="test", **(values | kw))


def _orders(emu: BybitEmulator, cid: str) -> list[dict[str, Any]]:
    return emu.orders_by_link_id().get(cid, [])


async def test_linear_market_order_fills_with_client_id_on_the_wire(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A market buy is sent with orderLinkId = client id and comes back filled."""
    order = await ex.create_order(_intent())
    assert order.status is OrderStatus.FILLED
    assert (order.client_order_id, order.filled_qty, order.side) == (
        "cid-1",
        Decimal("0.01"),
        Side.BUY,
    )
    assert order.avg_fill_price == emu.last_price("BTCUSDT", "linear") + Decimal("0.1")
    assert order.fee > 0
    body = emu.requests_to(CREATE)[-1].body
    assert body == {
        "symbol": "BTCUSDT",
        "side": "Buy",
        "orderType": "Market",
        "orderLinkId": "cid-1",
        "category": "linear",
        "qty": "0.01",
    }


async def test_spot_limit_order_rests_open_and_is_rounded(emu: BybitEmulator, ex: Exchange) -> None:
    """A spot limit buy below the market rests; price and qty are rounded before sending."""
    on_tick = (emu.last_price("BTCUSDT") * Decimal("0.9")).quantize(Decimal("0.01"))
    price = on_tick + Decimal("0.004")
    order = await ex.create_order(
        _intent("BTC/USDT", "spot-1", type=OrderType.LIMIT, qty=Decimal("0.0012345"), price=price)
    )
    assert order.status is OrderStatus.OPEN
    body = emu.requests_to(CREATE)[-1].body
    assert body is not None
    assert (body["orderType"], body["timeInForce"], body["category"]) == ("Limit", "GTC", "spot")
    assert Decimal(body["qty"]) == Decimal("0.001234")
    assert Decimal(body["price"]) == on_tick  # a buy rounds down
    assert order.price == Decimal(body["price"])


async def test_post_only_rounds_like_the_wire_example(emu: BybitEmulator, ex: Exchange) -> None:
    """0.0123 @ 60000.07 post-only buy goes out as 0.012 @ 60000.0 with timeInForce PostOnly."""
    intent = _intent(
        type=OrderType.LIMIT,
        qty=Decimal("0.0123"),
        price=Decimal("10000.07"),
        time_in_force=TimeInForce.POST_ONLY,
    )
    order = await ex.create_order(intent)
    body = emu.requests_to(CREATE)[-1].body
    assert body is not None
    assert (Decimal(body["qty"]), Decimal(body["price"]), body["timeInForce"]) == (
        Decimal("0.012"),
        Decimal("10000.0"),
        "PostOnly",
    )
    assert order.time_in_force is TimeInForce.POST_ONLY
    assert order.status is OrderStatus.OPEN


@pytest.mark.parametrize(
    "intent",
    [
        _intent(
            "BTC/USDT", "tiny-1", type=OrderType.LIMIT, qty=Decimal("0.00005"), price=Decimal("100")
        ),
        _intent("BTC/USDT:USDT", "tiny-2", qty=Decimal("0.0001")),
        _intent(
            "BTC/USDT:USDT",
            "tiny-3",
            type=OrderType.LIMIT,
            qty=Decimal("0.001"),
            price=Decimal("1000"),
        ),
        _intent("BTC/USDT:USDT", "x" * 37),
        _intent("BTC/USDT:USDT", "lev", leverage=Decimal("150")),
    ],
    ids=[
        "spot-min-notional",
        "linear-min-qty",
        "linear-min-notional",
        "long-client-id",
        "leverage",
    ],
)
async def test_rule_violations_are_refused_before_sending(
    emu: BybitEmulator, ex: Exchange, intent: OrderIntent
) -> None:
    """Orders breaking market rules raise OrderRejected and never reach the exchange."""
    with pytest.raises(OrderRejected):
        await ex.create_order(intent)
    assert emu.requests_to(CREATE) == []
    assert emu.requests_to("/v5/position/set-leverage") == []


async def test_market_order_min_notional_uses_the_last_price(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A market order's notional is checked at the ticker price: 2 XRP perp is below 5 USDT."""
    assert emu.last_price("XRPUSDT", "linear") * 2 < 5
    with pytest.raises(OrderRejected, match="notional"):
        await ex.create_order(_intent("XRP/USDT:USDT", "xrp-1", qty=Decimal("2")))
    assert emu.requests_to(CREATE) == []
    assert len(emu.requests_to("/v5/market/tickers")) == 1


async def test_spot_stop_order_is_found_and_cancelled_as_a_conditional_order(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A spot stop goes out with orderFilter=StopOrder and is found/cancelled as one."""
    stop = emu.last_price("BTCUSDT") * Decimal("0.8")
    intent = _intent(
        "BTC/USDT",
        "stop-1",
        side=Side.SELL,
        type=OrderType.STOP_MARKET,
        qty=Decimal("0.001"),
        stop_price=stop,
    )
    order = await ex.create_order(intent)
    body = emu.requests_to(CREATE)[-1].body
    assert body is not None
    assert (body["orderFilter"], Decimal(body["triggerPrice"])) == (
        "StopOrder",
        stop.quantize(Decimal("0.01")),
    )
    assert (order.type, order.status) == (OrderType.STOP_MARKET, OrderStatus.OPEN)
    found = await ex.fetch_order("BTC/USDT", client_order_id="stop-1")
    assert found is not None
    assert found.exchange_order_id == order.exchange_order_id
    assert [o.client_order_id for o in await ex.fetch_open_orders("BTC/USDT")] == ["stop-1"]
    cancelled = await ex.cancel_order("BTC/USDT", client_order_id="stop-1")
    assert cancelled.status is OrderStatus.CANCELLED
    assert [r.body["orderFilter"] for r in emu.requests_to("/v5/order/cancel") if r.body] == [
        "StopOrder"
    ]


async def test_a_restarted_bot_still_finds_and_cancels_its_stop(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Without local memory of the stop, lookups fall back to StopOrder: never 'not found'."""
    stop = emu.last_price("BTCUSDT") * Decimal("0.8")
    await ex.create_order(
        _intent(
            "BTC/USDT",
            "stop-2",
            side=Side.SELL,
            type=OrderType.STOP_MARKET,
            qty=Decimal("0.001"),
            stop_price=stop,
        )
    )
    async with _open(emu) as fresh:
        found = await fresh.fetch_order("BTC/USDT", client_order_id="stop-2")
        assert found is not None
        assert found.status is OrderStatus.OPEN
        cancelled = await fresh.cancel_order("BTC/USDT", client_order_id="stop-2")
    assert cancelled.status is OrderStatus.CANCELLED
    codes = [r.ret_code for r in emu.requests_to("/v5/order/cancel")]
    assert codes == [170213, 0]  # the plain cancel misses it, the StopOrder cancel hits
    assert len(_orders(emu, "stop-2")) == 1


async def test_linear_stop_loss_order_reduce_only_with_direction(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A linear sell stop below the market carries triggerDirection 2 and reduceOnly."""
    await ex.create_order(_intent(cid="long-1"))
    stop = emu.last_price("BTCUSDT", "linear") * Decimal("0.95")
    order = await ex.create_order(
        _intent(
            cid="sl-1",
            side=Side.SELL,
            type=OrderType.STOP_MARKET,
            stop_price=stop,
            reduce_only=True,
        )
    )
    body = emu.requests_to(CREATE)[-1].body
    assert body is not None
    assert (body["triggerDirection"], body["reduceOnly"], body["orderType"]) == (2, True, "Market")
    assert order.status is OrderStatus.OPEN
    assert order.reduce_only
    fresh_lookup = await ex.fetch_order("BTC/USDT:USDT", exchange_order_id=order.exchange_order_id)
    assert order.reason == "test"  # the intent's reason rides along; the exchange has none
    assert fresh_lookup == dataclasses.replace(order, reason="")


async def test_attached_take_profit_and_stop_loss(emu: BybitEmulator, ex: Exchange) -> None:
    """A linear limit entry carries stopLoss/takeProfit rounded away from the entry's risk."""
    price = emu.last_price("BTCUSDT", "linear") * Decimal("0.99")
    await ex.create_order(
        _intent(
            cid="tpsl-1",
            type=OrderType.LIMIT,
            price=price,
            stop_loss=Decimal("9000.03"),
            take_profit=Decimal("30000.01"),
        )
    )
    body = emu.requests_to(CREATE)[-1].body
    assert body is not None
    assert (Decimal(body["stopLoss"]), Decimal(body["takeProfit"])) == (
        Decimal("9000.1"),
        Decimal("30000.1"),
    )


async def test_leverage_in_the_intent_is_set_once(emu: BybitEmulator, ex: Exchange) -> None:
    """An intent with leverage sets it before the first order and not again."""
    await ex.create_order(_intent(cid="lev-1", leverage=Decimal("3")))
    await ex.create_order(_intent(cid="lev-2", leverage=Decimal("3")))
    assert len(emu.requests_to("/v5/position/set-leverage")) == 1
    assert len(emu.requests_to(CREATE)) == 2


@pytest.mark.parametrize(
    ("fault", "sends"),
    [
        ("timeout_after", 1),  # placed, answer lost: found by client id, not resent
        ("malformed", 1),  # placed, answer unreadable: found, not resent
        ("timeout", 2),  # never reached matching: not found, resent once
        ("5xx", 2),  # gateway error before matching: not found, resent once
        ("10006", 2),  # throttled: refused, resent after the reset delay
        ("10002", 2),  # clock skew: refused, clock resynchronised, resent
    ],
)
async def test_ambiguous_failures_never_duplicate_an_order(
    emu: BybitEmulator, ex: Exchange, fault: str, sends: int
) -> None:
    """After any single failure the order exists exactly once."""
    emu.fail_next(fault, path=CREATE)
    order = await ex.create_order(_intent(cid=f"amb-{fault}"))
    assert order.client_order_id == f"amb-{fault}"
    assert order.status is OrderStatus.FILLED
    assert len(_orders(emu, f"amb-{fault}")) == 1
    assert len(emu.requests_to(CREATE)) == sends


async def test_resend_meeting_a_duplicate_client_id_returns_the_existing_order(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """If Bybit already has the client id (110072), the existing order is returned."""
    first = await ex.create_order(_intent(cid="dup-1"))
    again = await ex.create_order(_intent(cid="dup-1"))
    assert again.exchange_order_id == first.exchange_order_id
    assert [r.ret_code for r in emu.requests_to(CREATE)] == [0, 110072]
    assert len(_orders(emu, "dup-1")) == 1


async def test_insufficient_funds_is_a_refusal_not_retried(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """110007 maps to InsufficientFundsError after exactly one request."""
    emu.fail_next("insufficient", path=CREATE)
    with pytest.raises(InsufficientFundsError):
        await ex.create_order(_intent(cid="poor-1"))
    assert len(emu.requests_to(CREATE)) == 1
    too_big = _intent(
        "BTC/USDT", "poor-2", type=OrderType.LIMIT, qty=Decimal("50"), price=Decimal("20000")
    )
    with pytest.raises(InsufficientFundsError):
        await ex.create_order(too_big)
    assert emu.requests_to(CREATE)[-1].ret_code == 170131


async def test_cancel_limit_then_cancel_again_returns_the_final_state(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Cancelling twice is harmless: the second call reports the cancelled order."""
    price = emu.last_price("BTCUSDT", "linear") * Decimal("0.9")
    await ex.create_order(_intent(cid="c-1", type=OrderType.LIMIT, price=price))
    first = await ex.cancel_order("BTC/USDT:USDT", client_order_id="c-1")
    second = await ex.cancel_order("BTC/USDT:USDT", client_order_id="c-1")
    assert first.status is second.status is OrderStatus.CANCELLED
    filled = await ex.create_order(_intent(cid="c-2"))
    after = await ex.cancel_order("BTC/USDT:USDT", exchange_order_id=filled.exchange_order_id)
    assert after.status is OrderStatus.FILLED


async def test_unknown_orders(ex: Exchange) -> None:
    """An unknown id is None on lookup and OrderNotFoundError on cancel."""
    assert await ex.fetch_order("BTC/USDT", client_order_id="nope") is None
    with pytest.raises(OrderNotFoundError):
        await ex.cancel_order("BTC/USDT:USDT", client_order_id="nope")


async def test_open_closed_orders_and_fills_across_both_categories(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Open/closed listings and my trades cover spot and linear, stops included."""
    spot_price = emu.last_price("BTCUSDT") * Decimal("0.9")
    await ex.create_order(
        _intent("BTC/USDT", "o-1", type=OrderType.LIMIT, qty=Decimal("0.001"), price=spot_price)
    )
    await ex.create_order(
        _intent(
            "BTC/USDT",
            "o-2",
            side=Side.SELL,
            type=OrderType.STOP_MARKET,
            qty=Decimal("0.001"),
            stop_price=spot_price,
        )
    )
    await ex.create_order(_intent("BTC/USDT:USDT", "o-3"))
    await ex.create_order(_intent("BTC/USDT", "o-4", qty=Decimal("0.001")))
    await ex.cancel_order("BTC/USDT", client_order_id="o-1")
    assert [o.client_order_id for o in await ex.fetch_open_orders()] == ["o-2"]
    closed = {o.client_order_id: o.status for o in await ex.fetch_closed_orders()}
    assert closed == {
        "o-1": OrderStatus.CANCELLED,
        "o-3": OrderStatus.FILLED,
        "o-4": OrderStatus.FILLED,
    }
    assert [o.client_order_id for o in await ex.fetch_closed_orders("BTC/USDT:USDT")] == ["o-3"]
    fills = await ex.fetch_my_trades()
    assert {(f.client_order_id, f.pair) for f in fills} == {
        ("o-3", "BTC/USDT:USDT"),
        ("o-4", "BTC/USDT"),
    }
    spot_fill = next(f for f in fills if f.pair == "BTC/USDT")
    assert (spot_fill.fee_currency, spot_fill.qty) == ("BTC", Decimal("0.001"))
    assert [f.client_order_id for f in await ex.fetch_my_trades("BTC/USDT:USDT")] == ["o-3"]
