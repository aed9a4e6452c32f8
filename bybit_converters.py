"""ccxt dicts to `models` types (part of `exchange`; nothing else may import this module).

ccxt's unified dicts and Bybit's raw `info` fields are read here and nowhere else, so they
never leave the exchange side: markets, orders, fills, positions, balances, book levels,
candles and public trades, plus the page cursor ccxt parks on a raw item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from models import (
    Balance,
    Candle,
    Fill,
    FillKind,
    FundingPayment,
    Liquidity,
    Market,
    MarketType,
    Order,
    OrderBook,
    OrderStatus,
    OrderType,
    Position,
    PositionSide,
    Side,
    Ticker,
    TimeInForce,
    Trade,
)


# Bybit orderStatus -> ours (WIRE.md: ccxt folds PartiallyFilledCanceled into "closed").
_STATUS: Final[dict[str, OrderStatus]] = {
    "Created": OrderStatus.NEW,
    "New": OrderStatus.OPEN,
    "Untriggered": OrderStatus.OPEN,
    "Triggered": OrderStatus.OPEN,
    "Active": OrderStatus.OPEN,
    "PartiallyFilled": OrderStatus.PARTIALLY_FILLED,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELLED,
    "PartiallyFilledCanceled": OrderStatus.CANCELLED,
    "Deactivated": OrderStatus.CANCELLED,
    "Rejected": OrderStatus.REJECTED,
}
_CCXT_STATUS: Final[dict[str, OrderStatus]] = {
    "open": OrderStatus.OPEN,
    "closed": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELLED,
    "rejected": OrderStatus.REJECTED,
    "expired": OrderStatus.EXPIRED,
}
_TIF: Final[dict[str, TimeInForce]] = {t.value.upper(): t for t in TimeInForce}


def _dec(value: Any) -> Decimal | None:
    # Exchange strings -> Decimal; "", None, "0" placeholders -> None.
    if value is None or value == "":
        return None
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        return None
    return out if out.is_finite() else None


def _dec0(value: Any) -> Decimal:
    return _dec(value) or Decimal(0)


def _nonzero(value: Any) -> Decimal | None:
    out = _dec(value)
    return out if out else None


def float_or_none(value: Any) -> float | None:
    """Return `value` as a float (None stays None)."""
    return None if value is None else float(value)


def market_from_ccxt(raw: dict[str, Any]) -> Market | None:
    """Return the rules of a spot or linear market; None for other kinds or missing steps."""
    if raw.get("spot"):
        kind = MarketType.SPOT
    elif raw.get("swap") and raw.get("linear"):
        kind = MarketType.LINEAR
    else:
        return None
    info = raw.get("info") or {}
    lot_filter = info.get("lotSizeFilter") or {}
    price_filter = info.get("priceFilter") or {}
    precision = raw.get("precision") or {}
    limits = raw.get("limits") or {}
    spot = kind is MarketType.SPOT
    tick = _dec(price_filter.get("tickSize")) or _dec(precision.get("price"))
    lot = _dec(lot_filter.get("basePrecision" if spot else "qtyStep")) or _dec(
        precision.get("amount")
    )
    min_notional = _dec(lot_filter.get("minOrderAmt" if spot else "minNotionalValue"))
    leverage = _dec((info.get("leverageFilter") or {}).get("maxLeverage")) if not spot else None
    if tick is None or lot is None:
        return None
    return Market(
        pair=raw["symbol"],
        symbol_id=raw["id"],
        base=raw["base"],
        quote=raw["quote"],
        type=kind,
        tick_size=tick,
        lot_size=lot,
        min_qty=_dec(lot_filter.get("minOrderQty"))
        or _dec((limits.get("amount") or {}).get("min"))
        or lot,
        min_notional=min_notional or _dec0((limits.get("cost") or {}).get("min")),
        max_qty=_dec(lot_filter.get("maxOrderQty")),
        max_leverage=leverage or Decimal(1),
        active=bool(raw.get("active", True)),
        contract_size=_dec(raw.get("contractSize")) or Decimal(1),
    )


def _order_type(info: dict[str, Any], raw: dict[str, Any]) -> OrderType:
    kind = str(info.get("orderType") or raw.get("type") or "").lower()
    stop = _nonzero(info.get("triggerPrice")) is not None
    if kind == "market":
        return OrderType.STOP_MARKET if stop else OrderType.MARKET
    return OrderType.STOP_LIMIT if stop else OrderType.LIMIT


def _order_status(info: dict[str, Any], raw: dict[str, Any], filled: Decimal) -> OrderStatus:
    status = _STATUS.get(str(info.get("orderStatus")))
    if status is None:
        status = _CCXT_STATUS.get(str(raw.get("status")), OrderStatus.NEW)
    if status is OrderStatus.OPEN and filled > 0:
        return OrderStatus.PARTIALLY_FILLED
    return status


def order_from_ccxt(raw: dict[str, Any]) -> Order:
    """Return an order from a ccxt order, Bybit's own fields first."""
    info = raw.get("info") or {}
    filled = _dec(info.get("cumExecQty")) or _dec0(raw.get("filled"))
    qty = _dec(info.get("qty")) or _dec0(raw.get("amount"))
    if info.get("marketUnit") == "quoteCoin":  # spot market buy sized in quote: report base
        qty = filled
    fee = _dec(info.get("cumExecFee"))
    if fee is None:
        fee = _dec0((raw.get("fee") or {}).get("cost"))
    created = int(raw.get("timestamp") or info.get("createdTime") or 0)
    return Order(
        client_order_id=str(info.get("orderLinkId") or raw.get("clientOrderId") or ""),
        pair=str(raw.get("symbol")),
        side=Side(str(raw.get("side") or str(info.get("side", "buy")).lower())),
        type=_order_type(info, raw),
        qty=qty,
        status=_order_status(info, raw, filled),
        ts_created=created,
        ts_updated=int(raw.get("lastUpdateTimestamp") or info.get("updatedTime") or created),
        exchange_order_id=str(raw.get("id") or info.get("orderId") or "") or None,
        price=_nonzero(info.get("price")) if "price" in info else _nonzero(raw.get("price")),
        stop_price=_nonzero(info.get("triggerPrice")) or _nonzero(raw.get("triggerPrice")),
        filled_qty=filled,
        avg_fill_price=_nonzero(info.get("avgPrice")) or _nonzero(raw.get("average")),
        fee=fee,
        reduce_only=bool(raw.get("reduceOnly") or info.get("reduceOnly")),
        time_in_force=_TIF.get(str(info.get("timeInForce") or "GTC").upper(), TimeInForce.GTC),
    )


def fill_from_ccxt(raw: dict[str, Any]) -> Fill:
    """Return one of our executions from a ccxt trade."""
    info = raw.get("info") or {}
    fee = raw.get("fee") or {}
    return Fill(
        client_order_id=str(info.get("orderLinkId") or ""),
        pair=str(raw.get("symbol")),
        side=Side(str(raw.get("side"))),
        price=_dec(info.get("execPrice")) or _dec0(raw.get("price")),
        qty=_dec(info.get("execQty")) or _dec0(raw.get("amount")),
        fee=_dec(info.get("execFee")) or _dec0(fee.get("cost")),
        fee_currency=str(fee.get("currency") or info.get("feeCurrency") or ""),
        liquidity=Liquidity.MAKER if raw.get("takerOrMaker") == "maker" else Liquidity.TAKER,
        ts=int(raw.get("timestamp") or 0),
        fill_id=str(raw.get("id") or info.get("execId")),
        exchange_order_id=str(raw.get("order") or info.get("orderId") or "") or None,
        kind=_FILL_KINDS.get(str(info.get("execType") or "Trade"), FillKind.OTHER),
    )


# Bybit's execType -> who made the execution (a missing execType is an order's trade).
_FILL_KINDS = {
    "Trade": FillKind.TRADE,
    "BustTrade": FillKind.LIQUIDATION,
    "AdlTrade": FillKind.ADL,
}


def position_from_ccxt(raw: dict[str, Any]) -> Position | None:
    """Return an open position; None when flat or one-sided data is missing."""
    info = raw.get("info") or {}
    contracts = _dec(raw.get("contracts")) or _dec(info.get("size"))
    side = raw.get("side")
    if not contracts or side not in ("long", "short"):
        return None
    size = _dec(raw.get("contractSize")) or Decimal(1)
    return Position(
        pair=str(raw.get("symbol")),
        side=PositionSide(side),
        qty=abs(contracts) * size,
        entry_price=_dec(info.get("avgPrice")) or _dec0(raw.get("entryPrice")),
        ts_opened=int(raw.get("timestamp") or info.get("createdTime") or 0),
        stop_price=_nonzero(info.get("stopLoss")),
        take_profit=_nonzero(info.get("takeProfit")),
        mark_price=_nonzero(info.get("markPrice")) or _nonzero(raw.get("markPrice")),
        liquidation_price=_nonzero(info.get("liqPrice")) or _nonzero(raw.get("liquidationPrice")),
        leverage=_nonzero(info.get("leverage")) or _nonzero(raw.get("leverage")),
    )


def funding_from_ccxt(raw: dict[str, Any], pair: str) -> FundingPayment:
    """Return a funding settlement from ccxt's `fetch_funding_history`.

    Bybit's execution list, execType Funding. What the position paid is `|execFee|` signed
    by Bybit's rule: a long (`side` Buy) pays a positive rate, a short (Sell) a negative
    one; it receives otherwise. (The recorded body in ccxt's parser, a short at rate
    -0.000761, carries execFee -0.1023 = execValue x rate, so the sign of execFee alone
    does not say who paid.)
    """
    info = raw.get("info") or {}
    rate = _dec(info.get("feeRate")) or _dec0(raw.get("rate"))
    fee = _dec(info.get("execFee"))
    magnitude = abs(fee if fee is not None else _dec0(raw.get("amount")))
    long = str(info.get("side", "Buy")) == "Buy"
    pays = (rate > 0) == long and rate != 0
    return FundingPayment(
        pair=pair,
        ts=int(raw.get("timestamp") or info.get("execTime") or 0),
        amount=magnitude if pays else -magnitude,
        rate=rate,
        payment_id=str(raw.get("id") or info.get("execId") or ""),
    )


def balances_from_ccxt(raw: dict[str, Any]) -> dict[str, Balance]:
    """Return balances by currency from a ccxt balance."""
    totals = raw.get("total") or {}
    free, used = raw.get("free") or {}, raw.get("used") or {}
    out = {}
    for currency, total in totals.items():
        if total is None:
            continue
        out[currency] = Balance(
            currency=currency,
            free=_dec0(free.get(currency)),
            used=_dec0(used.get(currency)),
            total=_dec0(total),
        )
    return out


def book_side(levels: Iterable[Sequence[Any]], depth: int) -> tuple[tuple[float, float], ...]:
    """Return the first `depth` (price, qty) levels of one side of a book."""
    return tuple((float(p), float(q)) for p, q, *_ in list(levels)[:depth])


def candle_from_row(pair: str, timeframe: str, row: Sequence[Any]) -> Candle:
    """Return a candle from a ccxt OHLCV row."""
    # Positional: a minute's close builds one per streamed pair, read behind the others.
    return Candle(
        pair,
        timeframe,
        int(row[0]),
        float(row[1]),
        float(row[2]),
        float(row[3]),
        float(row[4]),
        float(row[5] or 0),
    )


def cursor_of(items: Iterable[dict[str, Any]]) -> str | None:
    """Return Bybit's next-page cursor, if any item carries one."""
    # ccxt parks Bybit's nextPageCursor on one raw item (add_pagination_cursor_to_result).
    for item in items:
        cursor = (item.get("info") or {}).get("nextPageCursor")
        if cursor:
            return str(cursor)
    return None


def trade_from_ccxt(raw: dict[str, Any], pair: str) -> Trade:
    """Return a public trade from a ccxt trade."""
    return Trade(
        pair=pair,
        ts=int(raw.get("timestamp") or 0),
        price=float(raw["price"]),
        qty=float(raw["amount"]),
        side=Side(str(raw.get("side") or "buy")),
        trade_id=str(raw.get("id") or ""),
    )


def ticker_from_ccxt(raw: dict[str, Any], pair: str, now_ms: int) -> Ticker:
    """Return a ticker from a ccxt ticker (stamped `now_ms` when it carries no time)."""
    last = raw.get("last")
    return Ticker(
        pair=pair,
        ts=int(raw.get("timestamp") or now_ms),
        bid=float_or_none(raw.get("bid")),
        ask=float_or_none(raw.get("ask")),
        last=float_or_none(last),
        base_volume_24h=float_or_none(raw.get("baseVolume")),
        quote_volume_24h=float_or_none(raw.get("quoteVolume")),
    )


def book_from_ccxt(raw: dict[str, Any], pair: str, depth: int, now_ms: int) -> OrderBook:
    """Return the top `depth` levels of a ccxt order book (stamped `now_ms` when untimed)."""
    return OrderBook(
        pair=pair,
        ts=int(raw.get("timestamp") or now_ms),
        bids=book_side(raw.get("bids") or (), depth),
        asks=book_side(raw.get("asks") or (), depth),
    )
