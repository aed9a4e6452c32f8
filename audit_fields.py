"""The fields of the order path's audit events: a signal, its approval, an order's intent.

Part of `trade_executor` (the engine's decisions use it too). Each function builds the
event's fields from frozen models, so the audit trail's writer thread can build them as it
writes (`AuditTrail.record_with`), after a burst's orders are out, instead of the event
loop building them before each order: the strings of a decision's Decimals and enums cost
more than queueing the event.
"""

from __future__ import annotations

from typing import Any

from models import OrderIntent, Signal


def signal_fields(signal: Signal) -> dict[str, Any]:
    """Return the fields of a `signal` event."""
    return {
        "pair": signal.pair,
        "candle_ts": signal.ts,
        "side": str(signal.side),
        "strength": signal.strength,
        "reason": signal.reason,
        "price": signal.price,
        "features": signal.features,
    }


def approved_fields(signal: Signal, intent: OrderIntent) -> dict[str, Any]:
    """Return the fields of a `risk_approved` event: the order risk sized for `signal`."""
    return {
        "pair": signal.pair,
        "candle_ts": signal.ts,
        "side": str(intent.side),
        "qty": str(intent.qty),
        "client_order_id": intent.client_order_id,
        "reason": intent.reason,
    }


def intent_fields(intent: OrderIntent) -> dict[str, str | None]:
    """Return an order intent as its audit events show it (every value a string)."""
    return {
        "pair": intent.pair,
        "side": str(intent.side),
        "type": str(intent.type),
        "qty": str(intent.qty),
        "price": None if intent.price is None else str(intent.price),
        "stop_price": None if intent.stop_price is None else str(intent.stop_price),
        "stop_loss": None if intent.stop_loss is None else str(intent.stop_loss),
        "take_profit": None if intent.take_profit is None else str(intent.take_profit),
        "reduce_only": str(intent.reduce_only),
        "client_order_id": intent.client_order_id,
        "reason": intent.reason,
        "quote_amount": None if intent.quote_amount is None else str(intent.quote_amount),
    }


def submitted_fields(intent: OrderIntent) -> dict[str, Any]:
    """Return the fields of an `order_submitted` event."""
    return {"intent": intent_fields(intent)}
