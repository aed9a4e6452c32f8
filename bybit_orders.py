"""Order placement, lookup, cancellation and history: a part of `Exchange`.

`ExchangeOrders` is mixed into `exchange.Exchange`, which supplies the calling, market and
time methods (declared on `exchange_base.ExchangeBase`). `create_order` is never blindly
resent: after an ambiguous failure it asks for the client order id first, and the id is
reused on a resend so Bybit refuses a duplicate (110072/170141), which is answered by
looking the order up. Conditional orders are looked up and cancelled as such
(`orderFilter=StopOrder`), then in history, so a stop is never reported "not found" and
placed twice. A stop's trigger is moved in place (`amend_order`), never by cancel and
place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Final

import structlog

from bybit_converters import cursor_of, fill_from_ccxt, order_from_ccxt
from error_handler import (
    BadResponseError,
    ClockSkewError,
    ExchangeRejectedError,
    InvariantError,
    NetworkError,
    OrderNotFoundError,
    OrderRejected,
    RateLimitError,
    RecoverableError,
)
from exchange_base import ExchangeBase
from models import (
    Fill,
    Market,
    MarketType,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    order_from_intent,
)
from utils.precision import round_price, validate_intent


__all__ = ["SWEEP_OVERLAP_MS", "ExchangeOrders"]

log = structlog.get_logger("exchange")

_ORDER_PAGE: Final = 50
_MAX_PAGES: Final = 10
# A fill REST sweep reaches this far before the previous sweep's start (clock skew, and
# executions Bybit indexes a moment late); the first sweep runs this soon after start-up.
SWEEP_OVERLAP_MS: Final = 60_000
# The longest range /v5/execution/list answers in one query (startTime to endTime).
_EXECUTION_WINDOW_MS: Final = 7 * 86_400_000
_LINK_ID_MAX: Final = 36  # Bybit's orderLinkId length limit
# retCodes that mean "an order with this orderLinkId already exists" (linear / spot).
_DUPLICATE_LINK_ID: Final = ("110072", "170141")


class ExchangeOrders(ExchangeBase):
    """The order methods of `Exchange`: create, look up, cancel, list, and our executions."""

    async def create_order(self, intent: OrderIntent) -> Order:
        """Validate, round and place an order; return its state on the exchange.

        The intent is checked against the market first (precision, minimum quantity and
        notional...), so a refusal costs no request. `client_order_id` becomes Bybit's
        `orderLinkId`. After an ambiguous failure (timeout, network, 5xx, unreadable
        answer) the order is looked up by that id and resent only when Bybit has none.

        Raises:
            OrderRejected: broken market rule or exchange refusal (with the reason).
            InsufficientFundsError: not enough balance or margin.
            RecoverableError: still failing after the retries (the order may or may not
                exist; reconcile by client order id).
        """
        self._ensure_open()
        market = self.market(intent.pair)
        cid = intent.client_order_id
        if not cid or len(cid) > _LINK_ID_MAX:
            raise OrderRejected(
                f"client_order_id must be 1-{_LINK_ID_MAX} characters (Bybit orderLinkId)",
                component="exchange",
                pair=intent.pair,
                order_id=cid,
            )
        reference = None
        if intent.type is OrderType.MARKET and intent.price is None:
            reference = await self._reference_price(intent.pair)
        intent = validate_intent(intent, market, last_price=reference)
        linear = market.type is MarketType.LINEAR
        if (
            linear
            and intent.leverage is not None
            and self._leverage.get(intent.pair) != intent.leverage
        ):
            await self.set_leverage(intent.pair, intent.leverage)
        self._conditional[cid] = intent.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT)
        log.info("order_submitted", pair=intent.pair, client_order_id=cid, type=str(intent.type))
        order = await self._place(intent, self._order_args(intent, market))
        return dataclasses.replace(order, reason=intent.reason)

    async def _place(self, intent: OrderIntent, args: tuple[Any, ...]) -> Order:
        # Send, and after a failure decide between "it exists", "resend" and "give up".
        client = self._ensure_open()
        cid = intent.client_order_id
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await self._once(
                    "create_order", lambda: client.create_order(*args), intent.pair
                )
            except (RateLimitError, ClockSkewError) as e:
                # Refused before matching: resending is safe.
                if attempt >= self._attempts:
                    raise
                await self._clock.sleep(self._backoff(attempt, e))
                continue
            except (NetworkError, BadResponseError) as e:
                found = await self._lookup_after_failure(intent, e)
                if found is not None:
                    return found
                if attempt >= self._attempts:
                    raise
                await self._clock.sleep(self._backoff(attempt, e))
                log.warning("order_resent", pair=intent.pair, client_order_id=cid, attempt=attempt)
                continue
            except OrderRejected as e:
                if not any(code in str(e.__cause__) for code in _DUPLICATE_LINK_ID):
                    raise
                found = await self.fetch_order(intent.pair, client_order_id=cid)
                if found is None:
                    raise
                return found
            return await self._after_create(raw, intent)

    async def _lookup_after_failure(self, intent: OrderIntent, error: Exception) -> Order | None:
        log.warning(
            "order_outcome_unknown",
            pair=intent.pair,
            client_order_id=intent.client_order_id,
            error=type(error).__name__,
        )
        return await self.fetch_order(intent.pair, client_order_id=intent.client_order_id)

    async def _after_create(self, raw: dict[str, Any], intent: OrderIntent) -> Order:
        exchange_id = str(raw.get("id") or "") or None
        if exchange_id is not None:
            self._conditional[exchange_id] = self._conditional.get(intent.client_order_id, False)
        try:
            found = await self.fetch_order(
                intent.pair, client_order_id=intent.client_order_id, exchange_order_id=exchange_id
            )
        except RecoverableError:
            found = None  # accepted; its state will arrive by stream or the next lookup
        if found is not None:
            return found
        now = self.server_now_ms()
        return order_from_intent(intent, OrderStatus.OPEN, now, exchange_order_id=exchange_id)

    async def _reference_price(self, pair: str) -> Decimal | None:
        price = self._last_price.get(pair)
        if price is None:
            ticker = await self.fetch_ticker(pair)
            price = self._last_price.get(pair) or (
                Decimal(str(ticker.last)) if ticker.last else None
            )
        return price

    @staticmethod
    def _order_args(intent: OrderIntent, market: Market) -> tuple[Any, ...]:
        # (symbol, type, side, amount, price, params) as ccxt's create_order takes them.
        params: dict[str, Any] = {"clientOrderId": intent.client_order_id}
        limit = intent.type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
        if intent.time_in_force is TimeInForce.POST_ONLY:
            params["postOnly"] = True
        elif limit:
            params["timeInForce"] = intent.time_in_force.value
        linear = market.type is MarketType.LINEAR
        if intent.reduce_only and linear:
            params["reduceOnly"] = True
        if intent.stop_price is not None:
            params["triggerPrice"] = float(intent.stop_price)
            if linear:  # a stop buys above and sells below the market
                params["triggerDirection"] = "above" if intent.side is Side.BUY else "below"
        if intent.stop_loss is not None:
            params["stopLoss"] = float(intent.stop_loss)
        if intent.take_profit is not None:
            params["takeProfit"] = float(intent.take_profit)
        price = float(intent.price) if limit and intent.price is not None else None
        kind = "limit" if limit else "market"
        return (market.pair, kind, intent.side.value, float(intent.qty), price, params)

    def _id_params(
        self, client_order_id: str | None, exchange_order_id: str | None
    ) -> dict[str, str]:
        if exchange_order_id:
            return {"orderId": exchange_order_id}
        if client_order_id:
            return {"orderLinkId": client_order_id}
        raise InvariantError("need a client_order_id or an exchange_order_id", component="exchange")

    async def fetch_order(
        self,
        pair: str,
        *,
        client_order_id: str | None = None,
        exchange_order_id: str | None = None,
    ) -> Order | None:
        """Return the order with that id, conditional or not, open or closed; None if none.

        Looks among open orders, then open conditional orders, then history (both kinds),
        because Bybit shows stop orders only when asked with `orderFilter=StopOrder`.
        """
        client = self._ensure_open()
        ids = self._id_params(client_order_id, exchange_order_id)
        stop_first = self._conditional.get(exchange_order_id or client_order_id or "", False)
        order = (False, True) if not stop_first else (True, False)
        for history in (False, True):
            for trigger in order:
                params = dict(ids) | ({"trigger": True} if trigger else {})
                method = (
                    client.fetch_canceled_and_closed_orders if history else client.fetch_open_orders
                )
                rows = await self._call(
                    "fetch_order", functools.partial(method, pair, None, None, params), pair
                )
                if rows:
                    return order_from_ccxt(rows[0])
        return None

    async def cancel_order(
        self,
        pair: str,
        *,
        client_order_id: str | None = None,
        exchange_order_id: str | None = None,
    ) -> Order:
        """Cancel an order (a stop order as such) and return its resulting state.

        An order that is already filled or cancelled is returned as it is.

        Raises:
            OrderNotFoundError: the exchange has no order with that id.
        """
        client = self._ensure_open()
        ids = self._id_params(client_order_id, exchange_order_id)
        key = exchange_order_id or client_order_id or ""
        spot = self.market(pair).type is MarketType.SPOT
        tries = [self._conditional.get(key, False)]
        if spot:  # only spot needs orderFilter=StopOrder to reach a conditional order
            tries.append(not tries[0])
        accepted = False
        for trigger in tries:
            params = dict(ids) | ({"trigger": True} if trigger else {})
            try:
                await self._call(
                    "cancel_order",
                    functools.partial(client.cancel_order, ids.get("orderId"), pair, params),
                    pair,
                )
            except OrderNotFoundError:
                continue
            accepted = True
            log.info("order_cancel_sent", pair=pair, client_order_id=client_order_id)
            break
        found = await self.fetch_order(
            pair, client_order_id=client_order_id, exchange_order_id=exchange_order_id
        )
        if found is None:
            raise OrderNotFoundError(
                f"no order {key} on {pair}", component="exchange", pair=pair, order_id=key
            )
        if not accepted and not found.status.is_terminal:
            raise ExchangeRejectedError(
                f"cancel of open order {key} refused as not found",
                component="exchange",
                pair=pair,
                order_id=key,
            )
        return found

    async def amend_order(
        self, pair: str, *, client_order_id: str, trigger_price: Decimal
    ) -> Order:
        """Move a working conditional order's trigger in place; return the order after it.

        One `POST /v5/order/amend` (ccxt `edit_order`) with the new `triggerPrice` on the
        tick grid; the order keeps its ids, quantity and place. Setting a trigger is
        idempotent, so an ambiguous failure is simply retried. Bybit refuses an amend
        that changes nothing (as after a retry of one that worked): every refusal is
        answered by looking the order up, and one working at the asked trigger is the
        success it means.

        Raises:
            OrderNotFoundError: no such order works any more (filled, triggered, cancelled).
            ExchangeRejectedError: refused while the order works at another trigger.
            RecoverableError: no answer after the retries (either trigger may be set).
        """
        client = self._ensure_open()
        level = round_price(self.market(pair), trigger_price)
        self._conditional[client_order_id] = True  # a trigger: looked up as a stop order
        params = {"orderLinkId": client_order_id, "triggerPrice": str(level)}
        # ccxt asks for a type and a side, which Bybit's amend does not carry.
        edit = functools.partial(
            client.edit_order, None, pair, "market", "sell", None, None, params
        )
        try:
            await self._call("edit_order", edit, pair)
        except (OrderNotFoundError, OrderRejected, ExchangeRejectedError) as e:
            found = await self.fetch_order(pair, client_order_id=client_order_id)
            if found is None or found.status.is_terminal:
                raise OrderNotFoundError(
                    f"no working order {client_order_id} on {pair} to amend",
                    component="exchange",
                    pair=pair,
                    order_id=client_order_id,
                ) from e
            if found.stop_price != level:
                raise
            return found
        log.info("order_amend_sent", pair=pair, client_order_id=client_order_id, trigger=str(level))
        found = await self.fetch_order(pair, client_order_id=client_order_id)
        if found is None:
            raise OrderNotFoundError(
                f"amended order {client_order_id} not found on {pair}",
                component="exchange",
                pair=pair,
                order_id=client_order_id,
            )
        return found

    async def fetch_open_orders(self, pair: str | None = None) -> list[Order]:
        """Return open orders, conditional ones included, oldest first."""
        rows = await self._orders("fetch_open_orders", pair, None)
        return sorted(rows, key=lambda o: o.ts_created)

    async def deliver_fills(self, pair: str) -> None:
        """Nothing to hand over: Bybit's fills arrive by the private stream (and its sweeps)."""

    async def fetch_closed_orders(
        self, pair: str | None = None, since: int | None = None
    ) -> list[Order]:
        """Return finished orders (filled, cancelled, rejected), conditional ones included."""
        rows = await self._orders("fetch_canceled_and_closed_orders", pair, since)
        return sorted(rows, key=lambda o: o.ts_created)

    def _scopes(self, pair: str | None) -> list[tuple[str | None, dict[str, Any]]]:
        # (symbol, params) per category to ask; no pair means both categories.
        if pair is not None:
            self.market(pair)
            return [(pair, {})]
        return [
            (None, {"type": "spot"}),
            (None, {"type": "swap", "subType": "linear", "settleCoin": "USDT"}),
        ]

    async def _orders(self, method_name: str, pair: str | None, since: int | None) -> list[Order]:
        client = self._ensure_open()
        method = getattr(client, method_name)
        seen: dict[str, Order] = {}
        for symbol, scope in self._scopes(pair):
            for trigger in (False, True):
                params = dict(scope) | ({"trigger": True} if trigger else {})
                for raw in await self._paged(method, symbol, since, params, pair):
                    order = order_from_ccxt(raw)
                    seen[order.exchange_order_id or order.client_order_id] = order
        return list(seen.values())

    async def _paged(
        self,
        method: Callable[..., Awaitable[list[dict[str, Any]]]],
        symbol: str | None,
        since: int | None,
        params: dict[str, Any],
        pair: str | None,
    ) -> list[dict[str, Any]]:
        # Follow Bybit's nextPageCursor (bounded).
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page_params = dict(params) | ({"cursor": cursor} if cursor else {})
            rows = await self._call(
                method.__name__,
                functools.partial(method, symbol, since, _ORDER_PAGE, page_params),
                pair,
            )
            out.extend(rows)
            cursor = cursor_of(rows)
            if not cursor or len(rows) < _ORDER_PAGE:
                break
        return out

    async def fetch_my_trades(
        self, pair: str | None = None, since: int | None = None
    ) -> list[Fill]:
        """Return our executions (from `since`, else of the last seven days), oldest first.

        Bybit answers a start time with at most the seven days after it, so a `since` older
        than that is walked a week at a time up to now.
        """
        client = self._ensure_open()
        fills: dict[str, Fill] = {}
        for symbol, scope in self._scopes(pair):
            params = {k: v for k, v in scope.items() if k != "settleCoin"}
            for start, end in self._execution_windows(since):
                window = params | ({"endTime": end} if end is not None else {})
                fetch = client.fetch_my_trades
                for raw in await self._paged(fetch, symbol, start, window, pair):
                    fill = fill_from_ccxt(raw)
                    fills[fill.fill_id] = fill
        return sorted(fills.values(), key=lambda f: (f.ts, f.fill_id))

    def _execution_windows(self, since: int | None) -> list[tuple[int | None, int | None]]:
        # (startTime, endTime) pairs covering `since` to now, none longer than Bybit's week.
        now = self.server_now_ms() + SWEEP_OVERLAP_MS  # the server may run a little ahead
        if since is None or now - since <= _EXECUTION_WINDOW_MS:
            return [(since, None)]
        windows: list[tuple[int | None, int | None]] = []
        start = since
        while start <= now:
            end = min(start + _EXECUTION_WINDOW_MS - 1, now)
            windows.append((start, end))
            start = end + 1
        return windows
