"""Round prices and quantities to a market's rules and check an order against them.

Pure functions on `models` types, shared by the live exchange, the executor and the
simulator so that all three round the same way. Everything is `Decimal`: a float tick of
0.1 is not 0.1, and an order rounded through floats can land one lot below the minimum.

Rounding direction: a quantity is always floored to the lot size (never trade more than
sized). A price rounded for a side is never worse for that side: a buy never pays more
and a sell never receives less than asked. The same rule makes stops tighter, which is
the safe direction: a sell stop below the market is rounded up (triggers sooner), a buy
stop above the market is rounded down.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

from error_handler import OrderRejected
from models import Market, MarketType, OrderIntent, OrderType, Side, TimeInForce, evolve


__all__ = ["notional", "round_price", "round_qty", "validate_intent"]

_ONE = Decimal(1)
_PRICE_NAMES = ("price", "stop price", "stop loss", "take profit")


def _quantize(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    if step <= 0:
        return value
    units = (value / step).to_integral_value(rounding=rounding)
    # Multiplying by the step keeps the step's exponent: 60000.1 with tick 0.10 -> 60000.10.
    return units * step


def round_price(market: Market, price: Decimal, side: Side | None = None) -> Decimal:
    """Return `price` on the market's tick grid.

    Args:
        market: the instrument whose `tick_size` applies.
        price: the raw price.
        side: when given, round in the direction that is never worse for that side
            (BUY rounds down, SELL rounds up); when None, round to the nearest tick.
    """
    if side is Side.BUY:
        rounding = ROUND_FLOOR
    elif side is Side.SELL:
        rounding = ROUND_CEILING
    else:
        rounding = ROUND_HALF_UP
    return _quantize(price, market.tick_size, rounding)


def round_qty(market: Market, qty: Decimal) -> Decimal:
    """Return `qty` floored to the market's lot size (never more than asked)."""
    return _quantize(qty, market.lot_size, ROUND_FLOOR)


def notional(qty: Decimal, price: Decimal, market: Market) -> Decimal:
    """Return the quote value of `qty` at `price` (contract size included)."""
    return qty * price * market.contract_size


def validate_intent(
    intent: OrderIntent, market: Market, *, last_price: Decimal | None = None
) -> OrderIntent:
    """Return `intent` rounded to the market's rules, or refuse it with the reason.

    The quantity is floored to the lot size and every price is rounded to the tick
    (see the module docstring for directions). The minimum notional is checked against
    the limit price, else the stop price, else `last_price`; a market order with none of
    them cannot be checked here and passes that one rule.

    Args:
        intent: the sized order.
        market: the instrument's rules from `load_markets`.
        last_price: the latest traded price, the reference for market orders.

    Raises:
        OrderRejected: inactive market, non-positive or missing numbers, quantity below
            the minimum (after rounding) or above the maximum, notional below the
            minimum, leverage above the maximum, or an order shape the market refuses.
    """
    if intent.pair != market.pair:
        raise _refusal(intent, f"intent is for {intent.pair}, market rules are for {market.pair}")
    if not market.active:
        raise _refusal(intent, f"market {market.pair} is not trading")
    _check_shape(intent, market)

    qty = round_qty(market, intent.qty)
    if qty < market.min_qty or qty <= 0:
        raise _refusal(
            intent,
            f"qty {intent.qty} rounds to {qty}, below the minimum {market.min_qty} "
            f"(lot size {market.lot_size})",
        )
    if market.max_qty is not None and qty > market.max_qty:
        raise _refusal(intent, f"qty {qty} above the maximum {market.max_qty}")

    price, stop, stop_loss, take_profit = _round_prices(intent, market)
    reference = price or stop or last_price
    if reference is not None and reference > 0:
        value = notional(qty, reference, market)
        if value < market.min_notional:
            raise _refusal(
                intent,
                f"notional {value.normalize():f} below the minimum {market.min_notional} "
                f"({qty} x {reference})",
            )
    return _rounded(intent, qty, price, stop, stop_loss, take_profit)


def _round_prices(
    intent: OrderIntent, market: Market
) -> tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]:
    # The limit, stop, stop-loss and take-profit prices on the tick grid (None stays None:
    # a plain market order, an entry or exit whose protection goes apart, rounds nothing).
    price = stop = stop_loss = take_profit = None
    if intent.price is not None:
        price = round_price(market, intent.price, intent.side)
        if price <= 0:
            raise _refusal(intent, f"price rounds to {price} (tick {market.tick_size})")
    if intent.stop_price is not None:
        stop = round_price(market, intent.stop_price, intent.side)
        if stop <= 0:
            raise _refusal(intent, f"stop price rounds to {stop} (tick {market.tick_size})")
    if intent.stop_loss is not None:
        stop_loss = round_price(market, intent.stop_loss, intent.side.opposite)
    if intent.take_profit is not None:
        take_profit = round_price(market, intent.take_profit, intent.side.opposite)
    return price, stop, stop_loss, take_profit


def _rounded(
    intent: OrderIntent,
    qty: Decimal,
    price: Decimal | None,
    stop: Decimal | None,
    stop_loss: Decimal | None,
    take_profit: Decimal | None,
) -> OrderIntent:
    # The intent with its rounded numbers; itself when they are already on the grid, digit
    # for digit (2.5 and 2.50 differ: the journal would show it), so no copy is made.
    if price is None and stop is None and stop_loss is None and take_profit is None:
        # No prices (a plain market order): only the quantity can have been rounded.
        if intent.qty is qty or intent.qty.compare_total(qty) == 0:
            return intent
        return evolve(intent, qty=qty)
    new = (qty, price, stop, stop_loss, take_profit)
    old = (intent.qty, intent.price, intent.stop_price, intent.stop_loss, intent.take_profit)
    if all(a is b or (a is not None and b is not None and a.compare_total(b) == 0)
           for a, b in zip(new, old, strict=True)):  # fmt: skip
        return intent
    return evolve(
        intent,
        qty=qty,
        price=price,
        stop_price=stop,
        stop_loss=stop_loss,
        take_profit=take_profit,
    )


def _refusal(intent: OrderIntent, reason: str) -> OrderRejected:
    return OrderRejected(
        f"order refused: {reason}",
        reason=reason,
        component="precision",
        pair=intent.pair,
        order_id=intent.client_order_id,
    )


def _check_shape(intent: OrderIntent, market: Market) -> None:
    # Rules that do not depend on rounding: signs, required prices, venue restrictions.
    def reject(reason: str) -> OrderRejected:
        return _refusal(intent, reason)

    if intent.qty <= 0:
        raise reject(f"qty must be positive, got {intent.qty}")
    prices = (intent.price, intent.stop_price, intent.stop_loss, intent.take_profit)
    if prices != (None, None, None, None):
        _check_signs(prices, reject)
    if intent.type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and intent.price is None:
        raise reject(f"a {intent.type} order needs a price")
    if intent.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT) and intent.stop_price is None:
        raise reject(f"a {intent.type} order needs a stop price")
    if intent.time_in_force is TimeInForce.POST_ONLY and intent.type is not OrderType.LIMIT:
        raise reject("post-only applies to limit orders only")
    if intent.leverage is not None:
        _check_leverage(intent.leverage, market, reject)
    is_spot_market = market.type is MarketType.SPOT and intent.type is OrderType.MARKET
    if is_spot_market and (intent.stop_loss or intent.take_profit):
        raise reject("spot market orders cannot carry an attached stop-loss/take-profit")


def _check_signs(
    prices: tuple[Decimal | None, ...], reject: Callable[[str], OrderRejected]
) -> None:
    for name, value in zip(_PRICE_NAMES, prices, strict=True):
        if value is not None and value <= 0:
            raise reject(f"{name} must be positive, got {value}")


def _check_leverage(
    leverage: Decimal, market: Market, reject: Callable[[str], OrderRejected]
) -> None:
    # Positive, and within the venue's cap (1 on spot: no leverage there).
    if leverage <= 0:
        raise reject(f"leverage must be positive, got {leverage}")
    cap = market.max_leverage if market.type is MarketType.LINEAR else _ONE
    if leverage > cap:
        raise reject(f"leverage {leverage} above the maximum {cap}")
