"""The contracts every component speaks: frozen dataclasses and enums, nothing else.

A leaf module: it imports only the standard library, so every component may import it and
no import cycle can pass through it. Messages are immutable; derive a changed copy with
`dataclasses.replace` (or `evolve`, its result at less cost, on hot paths). Prices and
quantities that reach an order are `Decimal`; timestamps are `int` milliseconds since the
epoch, UTC, named `ts_*`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol, TypeVar


_T = TypeVar("_T")


def evolve(obj: _T, /, **changes: Any) -> _T:
    """Return a copy of the dataclass `obj` with `changes`: `dataclasses.replace`, cheaper.

    The same result (the class's constructor sees every field, its checks included), at
    about two thirds of the cost for the messages built on the order path. A class with a
    field outside its positional constructor (keyword-only, init=False, InitVar) goes
    through `dataclasses.replace` itself.
    """
    cls = type(obj)
    if cls not in _copiers:
        _copiers[cls] = _copier(cls)
    copier = _copiers[cls]
    if copier is None:
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    read, index = copier
    values = list(read(obj))
    for name, value in changes.items():
        at = index.get(name)
        if at is None:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        values[at] = value
    return cls(*values)


def fast_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass a constructor that stores its fields directly.

    The constructor `@dataclass(frozen=True)` writes calls `object.__setattr__` once per
    field (frozen classes refuse `self.x = x`); this one calls each slot's own setter,
    which skips the frozen `__setattr__` the same way, at about 60% of the cost: a message
    built on the order path (OrderIntent, Order) takes ~1 us instead of ~1.7. Everything
    else is the dataclass's: the parameters, defaults and default factories in the same
    order, `__post_init__`, and assignment after construction still raises
    `FrozenInstanceError`. A class outside that shape (not frozen or not slotted, a
    keyword-only or init=False field, an InitVar) is returned unchanged.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not (params.frozen and params.init):
        return cls
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if len(fields) != len(cls.__dataclass_fields__):  # type: ignore[attr-defined]
        return cls  # an InitVar or ClassVar pseudo-field
    setters: dict[str, Any] = {}
    for f in fields:
        slot = next((k.__dict__[f.name] for k in cls.__mro__ if f.name in k.__dict__), None)
        if f.kw_only or not f.init or not isinstance(slot, types.MemberDescriptorType):
            return cls
        setters[f.name] = slot.__set__
    names, lines = [], []
    scope: dict[str, Any] = {"_FACTORY": _FACTORY}
    for i, f in enumerate(fields):
        scope[f"_set{i}"] = setters[f.name]
        value = f.name
        if f.default is not dataclasses.MISSING:
            scope[f"_default{i}"] = f.default
            names.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_factory{i}"] = f.default_factory
            names.append(f"{f.name}=_FACTORY")
            value = f"_factory{i}() if {f.name} is _FACTORY else {f.name}"
        else:
            names.append(f.name)
        lines.append(f"    _set{i}(self, {value})")
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(names)}):\n" + "\n".join(lines or ["    pass"])
    exec(compile(source, f"<fast_init {cls.__qualname__}>", "exec"), scope)  # noqa: S102
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class _Factory:
    # A default-factory field's parameter when not passed (shown as dataclasses shows it).
    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


_Copier = tuple[Callable[[Any], tuple[Any, ...]], dict[str, int]]
_copiers: dict[type, _Copier | None] = {}


def _copier(cls: type) -> _Copier | None:
    declared = getattr(cls, "__dataclass_fields__", None)
    if declared is None:
        raise TypeError("evolve() should be called on dataclass instances")
    if not cls.__dataclass_params__.init:  # type: ignore[attr-defined]
        return None  # a constructor of its own: only keywords are sure to reach the fields
    fields = dataclasses.fields(cls)
    if len(fields) < 2 or len(fields) != len(declared):
        return None  # one field (attrgetter would not give a tuple), or an InitVar/ClassVar
    if any(not f.init or f.kw_only for f in fields):
        return None
    names = [f.name for f in fields]
    return operator.attrgetter(*names), {name: i for i, name in enumerate(names)}


# -- Enums -----------------------------------------------------------------------------------


class Side(StrEnum):
    """Order or signal direction."""

    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        """Return the other side."""
        return Side.SELL if self is Side.BUY else Side.BUY


class PositionSide(StrEnum):
    """Direction of an open position."""

    LONG = "long"
    SHORT = "short"


class OrderType(StrEnum):
    """How an order executes."""

    MARKET = "market"
    LIMIT = "limit"
    STOP_MARKET = "stop_market"
    STOP_LIMIT = "stop_limit"


class TimeInForce(StrEnum):
    """How long an order rests."""

    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"
    POST_ONLY = "PostOnly"


class OrderStatus(StrEnum):
    """States of the order state machine (see `ORDER_TRANSITIONS`)."""

    NEW = "new"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """Return True when no further transition is possible."""
        return self in _TERMINAL


_TERMINAL: frozenset[OrderStatus] = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED}
)

# Legal order transitions: (from, to). Same-state updates (more fills while partially
# filled) are legal too. Anything else is an invariant violation.
ORDER_TRANSITIONS: frozenset[tuple[OrderStatus, OrderStatus]] = frozenset(
    {
        (OrderStatus.NEW, OrderStatus.OPEN),
        (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED),
        (OrderStatus.NEW, OrderStatus.FILLED),
        (OrderStatus.NEW, OrderStatus.CANCELLED),
        (OrderStatus.NEW, OrderStatus.REJECTED),
        (OrderStatus.NEW, OrderStatus.EXPIRED),
        (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED),
        (OrderStatus.OPEN, OrderStatus.FILLED),
        (OrderStatus.OPEN, OrderStatus.CANCELLED),
        (OrderStatus.OPEN, OrderStatus.EXPIRED),
        (OrderStatus.OPEN, OrderStatus.REJECTED),
        (OrderStatus.PARTIALLY_FILLED, OrderStatus.PARTIALLY_FILLED),
        (OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED),
        (OrderStatus.PARTIALLY_FILLED, OrderStatus.CANCELLED),
        (OrderStatus.PARTIALLY_FILLED, OrderStatus.EXPIRED),
    }
)


def is_legal_transition(old: OrderStatus, new: OrderStatus) -> bool:
    """Return True if an order may move from `old` to `new`."""
    return (old == new and not old.is_terminal) or (old, new) in ORDER_TRANSITIONS


class Liquidity(StrEnum):
    """Whether a fill added (maker) or took (taker) liquidity."""

    MAKER = "maker"
    TAKER = "taker"


class FillKind(StrEnum):
    """Who made an execution: an order (ours or one placed by hand), or the exchange.

    Bybit's `execType`: `Trade` an order's, `BustTrade` the liquidation engine's (the
    position taken over at its bankruptcy price), `AdlTrade` auto-deleveraging's; anything
    else (`Funding`, `Settle`, ...) moves no position and is `OTHER`.
    """

    TRADE = "trade"
    LIQUIDATION = "liquidation"
    ADL = "adl"
    OTHER = "other"


class MarketType(StrEnum):
    """Bybit V5 categories the bot trades."""

    SPOT = "spot"
    LINEAR = "linear"


class TradingState(StrEnum):
    """The risk ladder, from normal trading to flattening everything."""

    NORMAL = "normal"
    REDUCED = "reduced"
    REDUCING = "reducing"
    HALTED = "halted"
    FLATTEN = "flatten"


class BotState(StrEnum):
    """Lifecycle of the daemon."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


# -- Market data -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candle:
    """One OHLCV bar; `ts` is the bar's open time in ms UTC."""

    pair: str
    timeframe: str
    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    closed: bool = True


@dataclass(frozen=True, slots=True)
class Ticker:
    """Best bid/ask and 24h statistics."""

    pair: str
    ts: int
    bid: float | None
    ask: float | None
    last: float | None
    base_volume_24h: float | None = None
    quote_volume_24h: float | None = None

    @property
    def mid(self) -> float | None:
        """Return the mid price, or None when a side is missing."""
        if self.bid is None or self.ask is None:
            return None
        return (self.bid + self.ask) / 2

    @property
    def spread_bps(self) -> float | None:
        """Return the bid-ask spread in basis points of mid."""
        mid = self.mid
        if mid is None or mid <= 0 or self.bid is None or self.ask is None:
            return None
        return (self.ask - self.bid) / mid * 1e4


@dataclass(frozen=True, slots=True)
class OrderBook:
    """Order book snapshot: bids sorted high to low, asks low to high, as (price, qty)."""

    pair: str
    ts: int
    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]

    @property
    def best_bid(self) -> float | None:
        """Return the best bid price."""
        return self.bids[0][0] if self.bids else None

    @property
    def best_ask(self) -> float | None:
        """Return the best ask price."""
        return self.asks[0][0] if self.asks else None


@dataclass(frozen=True, slots=True)
class Trade:
    """A public trade print."""

    pair: str
    ts: int
    price: float
    qty: float
    side: Side
    trade_id: str = ""


@dataclass(frozen=True, slots=True)
class Market:
    """Trading rules of one instrument, from `load_markets`."""

    pair: str
    symbol_id: str
    base: str
    quote: str
    type: MarketType
    tick_size: Decimal
    lot_size: Decimal
    min_qty: Decimal
    min_notional: Decimal
    max_qty: Decimal | None = None
    max_leverage: Decimal = Decimal(1)
    active: bool = True
    contract_size: Decimal = Decimal(1)


@dataclass(frozen=True, slots=True)
class Balance:
    """One currency's balance."""

    currency: str
    free: Decimal
    used: Decimal
    total: Decimal


# -- Decisions and orders --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    """What a strategy wants: enter/exit on a pair, with how sure it is and why.

    `side` BUY opens/extends a long (or closes a short); SELL the reverse. `strength` is in
    [0, 1]. `exit_only` marks a signal that may only reduce a position.
    """

    pair: str
    side: Side
    strength: float
    reason: str
    ts: int
    price: float
    strategy: str = ""
    exit_only: bool = False
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Veto:
    """A risk refusal, with why and until when (ms UTC, None for indefinite)."""

    reason: str
    until: int | None = None
    guard: str = ""


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """A sized, risk-approved order, not yet validated against market rules."""

    pair: str
    side: Side
    qty: Decimal
    type: OrderType
    client_order_id: str
    reason: str
    price: Decimal | None = None
    stop_price: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    reduce_only: bool = False
    time_in_force: TimeInForce = TimeInForce.GTC
    leverage: Decimal | None = None
    ts: int = 0
    # A market buy sized in quote currency (Bybit spot `marketUnit=quoteCoin`): the filled
    # base quantity is quote_amount / fill price. `qty` is then the estimate at signal time.
    quote_amount: Decimal | None = None


class OrderPurpose(StrEnum):
    """What an order is for, as our journal records it (never read off the exchange).

    Bybit spot reports no reduce-only flag, so a resting stop looks like any sell there:
    shutdown and reconciliation tell entries from protection by this, not by the wire.
    """

    ENTRY = "entry"
    EXIT = "exit"
    STOP = "stop"
    TAKE_PROFIT = "take_profit"


def purpose_of(intent: OrderIntent) -> OrderPurpose:
    """Return what `intent` is for: only non-reduce-only orders open or add to a position."""
    if not intent.reduce_only:
        return OrderPurpose.ENTRY
    if intent.type in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT):
        return OrderPurpose.STOP
    if intent.type is OrderType.LIMIT:
        return OrderPurpose.TAKE_PROFIT
    return OrderPurpose.EXIT


# Client order ids (Bybit `orderLinkId`: at most 36 of [A-Za-z0-9_-]) are derived from the
# decision, so a restarted bot that takes the same decision again names it the same way and
# the exchange refuses to place it twice: `<key>_<attempt>`, where the key names strategy,
# pair, candle and kind, and the attempt (persisted in the journal as the ids it holds) only
# moves on when an earlier attempt provably never reached the exchange.
CLIENT_ID_MAX = 36
ATTEMPT_SEPARATOR = "_"


def decision_key(strategy_tag: str, pair: str, candle_ts: int, kind: str) -> str:
    """Return the id stem of one decision: kind, base asset, candle (s, hex), strategy tag.

    `kind` is one letter: `e` entry, `x` strategy exit, `c` engine exit (take-profit,
    flatten), `f` operator exit.
    """
    return f"k{kind}{_id_base(pair)}-{candle_ts // 1000:x}-{strategy_tag}"


@functools.lru_cache(maxsize=4096)
def _id_base(pair: str) -> str:
    return "".join(ch for ch in pair.split("/")[0].split(":")[0] if ch.isalnum())[:6]


def strategy_tag(description: Mapping[str, Any]) -> str:
    """Return 4 hex digits naming a strategy and its parameters (its `describe()`)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2s(text.encode(), digest_size=2).hexdigest()


def with_attempt(key: str, attempt: int) -> str:
    """Return the client order id of attempt `attempt` of decision `key` (<= 36 chars)."""
    suffix = f"{ATTEMPT_SEPARATOR}{attempt:x}"
    return key[: CLIENT_ID_MAX - len(suffix)] + suffix


def split_attempt(client_order_id: str) -> tuple[str, int] | None:
    """Return (key, attempt) of a derived id, or None for an id of another scheme."""
    key, sep, attempt = client_order_id.rpartition(ATTEMPT_SEPARATOR)
    if not sep or not key or not attempt:
        return None
    try:
        return key, int(attempt, 16)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Order:
    """The exchange's (or matching engine's) view of one order."""

    client_order_id: str
    pair: str
    side: Side
    type: OrderType
    qty: Decimal
    status: OrderStatus
    ts_created: int
    ts_updated: int
    exchange_order_id: str | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    filled_qty: Decimal = Decimal(0)
    avg_fill_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    reduce_only: bool = False
    time_in_force: TimeInForce = TimeInForce.GTC
    reason: str = ""

    @property
    def remaining_qty(self) -> Decimal:
        """Return the unfilled quantity."""
        return self.qty - self.filled_qty


def order_from_intent(
    intent: OrderIntent,
    status: OrderStatus,
    now: int,
    exchange_order_id: str | None = None,
) -> Order:
    """Return the order an intent becomes, nothing filled yet: the one construction of it.

    The executor's own record (`NEW`, before the exchange has said anything: `ts_updated`
    0, so any report on the exchange's clock is newer, or a local `REJECTED`), the
    matching engine's accepted order and the exchange's fallback when its lookup fails
    (`OPEN`, with the exchange's id) all come from here.
    """
    return Order(
        client_order_id=intent.client_order_id,
        pair=intent.pair,
        side=intent.side,
        type=intent.type,
        qty=intent.qty,
        status=status,
        ts_created=now,
        ts_updated=0 if status is OrderStatus.NEW else now,
        exchange_order_id=exchange_order_id,
        price=intent.price,
        stop_price=intent.stop_price,
        reduce_only=intent.reduce_only,
        time_in_force=intent.time_in_force,
        reason=intent.reason,
    )


@dataclass(frozen=True, slots=True)
class Fill:
    """One execution against an order."""

    client_order_id: str
    pair: str
    side: Side
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_currency: str
    liquidity: Liquidity
    ts: int
    fill_id: str
    exchange_order_id: str | None = None
    kind: FillKind = FillKind.TRADE


@dataclass(frozen=True, slots=True)
class Position:
    """An open position on one pair."""

    pair: str
    side: PositionSide
    qty: Decimal
    entry_price: Decimal
    ts_opened: int
    stop_price: Decimal | None = None
    take_profit: Decimal | None = None
    mark_price: Decimal | None = None
    fees_paid: Decimal = Decimal(0)
    # Perpetuals: where the exchange liquidates the position, and its leverage.
    liquidation_price: Decimal | None = None
    leverage: Decimal | None = None

    @property
    def notional(self) -> Decimal:
        """Return |qty| x mark (or entry when no mark yet)."""
        price = self.mark_price if self.mark_price is not None else self.entry_price
        return abs(self.qty) * price

    @property
    def unrealised_pnl(self) -> Decimal:
        """Return the PnL at the mark price, before exit fees."""
        if self.mark_price is None:
            return Decimal(0)
        sign = 1 if self.side is PositionSide.LONG else -1
        return (self.mark_price - self.entry_price) * self.qty * sign


@dataclass(frozen=True, slots=True)
class FundingPayment:
    """One funding settlement on a perpetual position, as the exchange booked it.

    `amount` is what the position paid in the quote currency (negative: it received);
    `rate` the funding rate applied; `payment_id` the exchange's id (dedupes re-reports).
    """

    pair: str
    ts: int
    amount: Decimal
    rate: Decimal
    payment_id: str


@dataclass(frozen=True, slots=True)
class ClosedTrade:
    """A round trip: entry and exit of one position, for summaries and analytics.

    `stop_price` is the stop in force when the position was opened (None when unknown or
    none was set) and `adds_at_loss` counts the fills that added to the position at a
    price worse than its average entry (averaging down); the reward system's behavioural
    penalties read both.
    """

    pair: str
    side: PositionSide
    entry_ts: int
    exit_ts: int
    entry_price: float
    exit_price: float
    qty: float
    fee: float
    pnl: float
    reason: str = ""
    stop_price: float | None = None
    adds_at_loss: int = 0
    # The sleeve that traded it in a multi-strategy bot ("" when one strategy trades).
    strategy: str = ""
    # Net funding the position received while open (negative: paid); included in `pnl`.
    funding: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON form used in `--summary-json` (`strategy` when a sleeve's)."""
        tagged = {"strategy": self.strategy} if self.strategy else {}
        return {
            **tagged,
            "pair": self.pair,
            "side": str(self.side),
            "entry_ts": self.entry_ts,
            "exit_ts": self.exit_ts,
            "entry_price": self.entry_price,
            "exit_price": self.exit_price,
            "qty": self.qty,
            "fee": self.fee,
            "pnl": self.pnl,
            "reason": self.reason,
            "funding": self.funding,
        }


@dataclass(frozen=True, slots=True)
class PortfolioSnapshot:
    """Cash, positions and equity at one moment."""

    ts: int
    cash: Decimal
    equity: Decimal
    positions: tuple[Position, ...] = ()
    realised_pnl: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Decision:
    """The last decision taken on a pair, for `/why` and the audit log."""

    pair: str
    ts: int
    signal: Signal | None
    verdict: str
    intent: OrderIntent | None = None
    veto: Veto | None = None
    features: dict[str, float] = field(default_factory=dict)


# -- Events on the alert bus -----------------------------------------------------------------
# Components publish these to one `EventSink` (the daemon's `alert`), which hands them to the
# notifiers; `telegram_templates.render_event` turns each into the operator's message.


@dataclass(frozen=True, slots=True)
class TradeOpened:
    """An entry order filled: a position was opened or added to."""

    fill: Fill


@dataclass(frozen=True, slots=True)
class TradeClosed:
    """A round trip ended."""

    trade: ClosedTrade


@dataclass(frozen=True, slots=True)
class StopHit:
    """A protective stop filled and left the pair flat."""

    pair: str
    price: Decimal


@dataclass(frozen=True, slots=True)
class PositionLiquidated:
    """The exchange closed (part of) a position by an order that was not ours.

    `kind` says how: liquidation (Bybit's BustTrade), auto-deleveraging (AdlTrade), or a
    trade placed outside the bot (by hand). `fill` is the execution as booked, `pnl` the
    round trip's result after fees, and `remaining` what is still held (0: flat). `trade`
    is the round trip the close ended: the executor sends this event instead of a
    `TradeClosed` for it, so the operator gets one message.
    """

    fill: Fill
    kind: FillKind
    pnl: float
    remaining: Decimal
    trade: ClosedTrade | None = None


@dataclass(frozen=True, slots=True)
class OrderRefused:
    """An order was rejected, by market rules here or by the exchange."""

    pair: str
    reason: str


@dataclass(frozen=True, slots=True)
class TradingStateChanged:
    """The trading-state ladder moved one rung, with the numbers that moved it.

    `limit` is the tripped breaker's limit (None on recovery); `drawdown`, `day_loss` and
    `consecutive_losses` are the tripping breaker's own figures where it gave them.
    """

    ts: int
    from_state: TradingState
    to_state: TradingState
    trigger: str
    reason: str
    resume_at: int | None
    equity: float
    peak_equity: float
    drawdown: float
    day_start_equity: float
    day_loss: float
    consecutive_losses: int
    limit: float | None = None


@dataclass(frozen=True, slots=True)
class RiskReset:
    """The operator lifted the latched breakers and the manual rung."""

    by: str
    before: TradingState
    after: TradingState
    latched: tuple[str, ...] = ()


class AnomalyKind(StrEnum):
    """What kind of market-data anomaly a detector found (see `anomaly_detection`)."""

    SPIKE = "spike"
    SPIKE_REVERT = "spike_revert"
    FROZEN_FEED = "frozen_feed"
    ZERO_VOLUME = "zero_volume"
    VOLUME_BURST = "volume_burst"
    STALE_FEED = "stale_feed"
    SPREAD_BLOWOUT = "spread_blowout"


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One anomaly on a pair's market data.

    `ts` is the open time of the candle it was found on (or the book's / the check's time
    for the live-only kinds); `score` is the rule's own measure (robust sigmas, bars,
    basis points) and `detail` says it in words.
    """

    ts: int
    pair: str
    kind: AnomalyKind
    score: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AnomalyDetected:
    """An anomaly paused entries on its pair until `paused_until` (ms UTC)."""

    anomaly: Anomaly
    paused_until: int | None


@dataclass(frozen=True, slots=True)
class ErrorRaised:
    """Something failed that the operator should hear of.

    `pair` names where a trading error happened; `component` and `breaker` name a failing
    background loop and the state of its circuit breaker.
    """

    message: str
    pair: str | None = None
    component: str | None = None
    breaker: str | None = None


@dataclass(frozen=True, slots=True)
class ModelPromoted:
    """A model version became champion (after validation and shadow, or as the first)."""

    name: str
    version: str
    previous: str | None
    score: float
    champion_score: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class ModelRejected:
    """A challenger was not promoted: it failed validation or lost in shadow."""

    name: str
    version: str
    champion: str | None
    score: float
    champion_score: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class SleeveShare:
    """One strategy's capital sleeve before and after a reallocation."""

    name: str
    before: float
    after: float
    equity: float
    lcb: float | None = None
    probation: bool = False


@dataclass(frozen=True, slots=True)
class AllocationChanged:
    """The skill ranking moved capital between strategies (capital_allocation)."""

    ts: int
    sleeves: tuple[SleeveShare, ...]
    # False when the floors (scaled down to fit) or the caps could not all hold; `reserve`
    # is the share the caps left unallocated.
    feasible: bool = True
    reserve: float = 0.0


Event = (
    TradeOpened
    | TradeClosed
    | StopHit
    | PositionLiquidated
    | OrderRefused
    | TradingStateChanged
    | RiskReset
    | ErrorRaised
    | AnomalyDetected
    | ModelPromoted
    | ModelRejected
    | AllocationChanged
)
# The one alert bus: every component that publishes takes an `EventSink`.
EventSink = Callable[[Event], None]


# -- Operator façade -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ranked:
    """A strategy's place in the skill ranking (reward_system.rank), best first.

    `lcb` is the lower confidence bound of its shrunk annualised Sharpe of daily returns,
    the ranking key; `total` is its `reward_system.Score.total`, the number shown for it.
    """

    name: str
    lcb: float
    shrunk_sharpe: float
    effective_n: float
    total: float
    trades: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A read-only view of the bot, shared by the dashboard, the web view and Telegram."""

    ts: int
    mode: str
    state: BotState
    trading_state: TradingState
    portfolio: PortfolioSnapshot
    pairs: tuple[str, ...] = ()
    recent_trades: tuple[ClosedTrade, ...] = ()
    open_orders: tuple[Order, ...] = ()
    equity_curve: tuple[tuple[int, float], ...] = ()
    last_decisions: dict[str, Decision] = field(default_factory=dict)
    order_books: dict[str, OrderBook] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    rate_limit_budget: dict[str, float] = field(default_factory=dict)
    risk: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    ranking: tuple[Ranked, ...] = ()
    # Per pair: the latest anomaly and the entry pause it set (`anomaly_detection`).
    anomalies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per pair: the pattern cluster of the latest candle and its trade record
    # (`pattern_recognition`).
    patterns: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per pair: {"last": close, "change": fraction over the last 24 h (or the window held),
    # "ts": the last candle's open time}.
    markets: dict[str, dict[str, float]] = field(default_factory=dict)
    # Multi-strategy: per strategy its `weight`, `sleeve_equity` and `probation` (0/1).
    allocation: dict[str, dict[str, float]] = field(default_factory=dict)
    # Streamed pairs late for their close's bursts, not waited for (`runner.Gathered`).
    late_streams: tuple[str, ...] = ()


class Control(Protocol):
    """The operator commands every surface (Telegram, dashboard, web) goes through."""

    def snapshot(self) -> Snapshot:
        """Return the current read-only state."""
        ...

    async def pause(self, reason: str) -> None:
        """Stop opening positions; exits and stops keep working."""
        ...

    async def resume(self, reason: str) -> None:
        """Resume normal trading."""
        ...

    async def stop_buy(self, reason: str) -> None:
        """Allow exits only (the `reducing` state)."""
        ...

    async def reset_risk(self, reason: str) -> None:
        """Lift latched circuit breakers and the manual rung (audited; `reason` says who)."""
        ...

    async def force_exit(self, pair: str, reason: str) -> None:
        """Close the position on `pair` at market."""
        ...

    async def reconcile(self) -> str:
        """Reconcile with the exchange and return a human-readable report."""
        ...

    def patterns(self, pair: str) -> list[dict[str, Any]]:
        """Return the candlestick patterns on the pair's latest candles, newest first."""
        ...

    def chart(self, pair: str, limit: int = 500) -> dict[str, Any]:
        """Return the pair's price chart: candles, indicator overlays, trade marks, position."""
        ...

    async def stop(self, reason: str) -> None:
        """Shut the daemon down gracefully."""
        ...


# Every frozen message above gets the direct constructor (`fast_init`): they are built on
# every candle and order.
for _message in [v for v in list(globals().values()) if isinstance(v, type)]:
    if dataclasses.is_dataclass(_message):
        fast_init(_message)
del _message
