"""The run summary: what a sim, live or backtest run reports when it ends, as typed values.

`RunSummary` is the `--summary-json` document as a frozen value: `Engine.summary()` and the
fast path's `BacktestResult.summary()` build one, the daemon and the backtest runner add
their bookkeeping with `dataclasses.replace` (dropped candles, timings, a restart), and
`to_dict()` writes the JSON document (`from_dict` reads one back). Readers use attributes,
never key lookups, so a renamed field fails the type check instead of reading a default.

A leaf beside `models` (it imports only `models`), so the pipeline, the simulator, the
reports and the CLI can all share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models import ClosedTrade, PositionSide


__all__ = [
    "AllocationPoint",
    "BreakerTrip",
    "OpenPosition",
    "RunSummary",
    "StrategyRef",
    "StrategySection",
    "TradingSpan",
    "trade_from_dict",
]

# A breaker trip's fixed keys; every other key is one of the numbers that tripped it.
_TRIP_KEYS = frozenset({"ts", "from", "to", "rule", "reason", "resume_at"})


@dataclass(frozen=True, slots=True)
class StrategyRef:
    """The strategy a run traded: its name, parameters and anything else it describes.

    `extra` holds the keys a strategy adds to `Strategy.describe()` beyond name and
    parameters (an RL policy's directory and whether it loaded).
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategyRef:
        """Return the reference for a `Strategy.describe()` document."""
        extra = {k: v for k, v in data.items() if k not in ("name", "params")}
        return cls(str(data.get("name", "")), dict(data.get("params", {})), extra)

    def to_dict(self) -> dict[str, Any]:
        """Return the `Strategy.describe()` document."""
        return {"name": self.name, "params": dict(self.params), **self.extra}


@dataclass(frozen=True, slots=True)
class OpenPosition:
    """A position still open when the run ended, marked at the last price seen."""

    pair: str
    side: str
    qty: float
    entry_price: float
    entry_ts: int
    mark_price: float | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpenPosition:
        """Return the position of one `open_positions` item."""
        mark = data.get("mark_price")
        return cls(
            pair=str(data["pair"]),
            side=str(data["side"]),
            qty=float(data["qty"]),
            entry_price=float(data["entry_price"]),
            entry_ts=int(data["entry_ts"]),
            mark_price=float(mark) if mark is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the `open_positions` item."""
        return {
            "pair": self.pair,
            "side": self.side,
            "qty": self.qty,
            "entry_price": self.entry_price,
            "entry_ts": self.entry_ts,
            "mark_price": self.mark_price,
        }


@dataclass(frozen=True, slots=True)
class BreakerTrip:
    """One escalation of the circuit breakers: when, by which rule, to which rung, and why.

    `numbers` are the figures that tripped it (equity, peak_equity, drawdown, day loss,
    losing streak, the rule's limit, ...): each rule records its own.
    """

    ts: int
    from_state: str
    to_state: str
    rule: str
    reason: str
    resume_at: int | None
    numbers: Mapping[str, float | int | None] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BreakerTrip:
        """Return the trip of one `breaker_report` trip."""
        return cls(
            ts=int(data["ts"]),
            from_state=str(data["from"]),
            to_state=str(data["to"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
            resume_at=data.get("resume_at"),
            numbers={k: v for k, v in data.items() if k not in _TRIP_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the `breaker_trips` item."""
        return {
            "rule": self.rule,
            "ts": self.ts,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
            "resume_at": self.resume_at,
            **self.numbers,
        }


@dataclass(frozen=True, slots=True)
class TradingSpan:
    """A stretch the circuit breakers held trading on a rung other than normal."""

    state: str
    start: int
    end: int
    duration_ms: int
    rule: str
    reason: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TradingSpan:
        """Return the span of one `breaker_report` span."""
        return cls(
            state=str(data["state"]),
            start=int(data["start"]),
            end=int(data["end"]),
            duration_ms=int(data["duration_ms"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the `trading_spans` item."""
        return {
            "state": self.state,
            "start": self.start,
            "end": self.end,
            "duration_ms": self.duration_ms,
            "rule": self.rule,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class AllocationPoint:
    """A strategy's share of the account from one rebalance on."""

    ts: int
    weight: float


@dataclass(frozen=True, slots=True)
class StrategySection:
    """One strategy's part of a multi-strategy run: its sleeve, record, score and shares."""

    name: str
    pairs: tuple[str, ...]
    tag: str
    weight: float
    sleeve_equity: float
    nav: float
    probation: bool
    n_trades: int
    realised_pnl: float
    fees: float
    win_rate: float
    open_positions: tuple[str, ...]
    score: float | None
    lcb: float | None
    allocations: tuple[AllocationPoint, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategySection:
        """Return the section of one `strategies` item."""
        return cls(
            name=str(data["name"]),
            pairs=tuple(data["pairs"]),
            tag=str(data["tag"]),
            weight=data["weight"],
            sleeve_equity=data["sleeve_equity"],
            nav=data["nav"],
            probation=bool(data["probation"]),
            n_trades=int(data["n_trades"]),
            realised_pnl=data["realised_pnl"],
            fees=data["fees"],
            win_rate=data["win_rate"],
            open_positions=tuple(data["open_positions"]),
            score=data["score"],
            lcb=data["lcb"],
            allocations=tuple(AllocationPoint(a["ts"], a["weight"]) for a in data["allocations"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the `strategies` item."""
        return {
            "name": self.name,
            "pairs": list(self.pairs),
            "tag": self.tag,
            "weight": self.weight,
            "sleeve_equity": self.sleeve_equity,
            "nav": self.nav,
            "probation": self.probation,
            "n_trades": self.n_trades,
            "realised_pnl": self.realised_pnl,
            "fees": self.fees,
            "win_rate": self.win_rate,
            "open_positions": list(self.open_positions),
            "score": self.score,
            "lcb": self.lcb,
            "allocations": [{"ts": a.ts, "weight": a.weight} for a in self.allocations],
        }


def trade_from_dict(data: Mapping[str, Any]) -> ClosedTrade:
    """Return the closed trade of one `trades` item (`ClosedTrade.as_dict`)."""
    return ClosedTrade(
        pair=str(data["pair"]),
        side=PositionSide(data.get("side", "long")),
        entry_ts=int(data["entry_ts"]),
        exit_ts=int(data["exit_ts"]),
        entry_price=float(data["entry_price"]),
        exit_price=float(data["exit_price"]),
        qty=float(data["qty"]),
        fee=float(data["fee"]),
        pnl=float(data["pnl"]),
        reason=str(data.get("reason", "")),
        strategy=str(data.get("strategy", "")),
        funding=float(data.get("funding", 0.0)),
    )


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run's summary: what traded, how the account ended, and what held trading back.

    The optional tail is run bookkeeping the engine does not know: `dropped_candles`
    (queued but unprocessed at stop; the daemon's), `timings` (a backtest's seconds by
    phase), `restart_as` (the mode the operator switched to) and `strategies` (one section
    per strategy when several trade side by side). Each is left out of the JSON when None.
    """

    mode: str
    strategy: StrategyRef
    pairs: tuple[str, ...]
    timeframe: str
    candles: int
    first_ts: int | None
    last_ts: int | None
    signals: int
    vetoes: int
    rejections: int
    starting_balance: float
    final_equity: float
    max_drawdown: float
    fees: float
    funding: float
    funding_settlements: int
    realised_pnl: float
    open_positions: tuple[OpenPosition, ...] = ()
    trades: tuple[ClosedTrade, ...] = ()
    breaker_trips: tuple[BreakerTrip, ...] = ()
    trading_spans: tuple[TradingSpan, ...] = ()
    strategies: tuple[StrategySection, ...] | None = None
    dropped_candles: int | None = None
    timings: Mapping[str, float] | None = None
    restart_as: str | None = None

    @property
    def n_trades(self) -> int:
        """Return the number of closed trades."""
        return len(self.trades)

    @property
    def total_return(self) -> float:
        """Return final equity over the starting balance, less one (0.0 without a balance)."""
        start = self.starting_balance
        return self.final_equity / start - 1 if start else 0.0

    @property
    def liquidations(self) -> int:
        """Return how many trades ended in a liquidation."""
        return sum(1 for t in self.trades if t.reason.startswith("liquidation"))

    @property
    def auto_deleverages(self) -> int:
        """Return how many trades the exchange's auto-deleveraging closed (live only)."""
        return sum(1 for t in self.trades if t.reason.startswith("adl"))

    def to_dict(self) -> dict[str, Any]:
        """Return the `--summary-json` document."""
        out: dict[str, Any] = {}
        if self.strategies is not None:
            out["strategies"] = [s.to_dict() for s in self.strategies]
        out |= {
            "mode": self.mode,
            "strategy": self.strategy.to_dict(),
            "pairs": list(self.pairs),
            "timeframe": self.timeframe,
            "candles": self.candles,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "signals": self.signals,
            "vetoes": self.vetoes,
            "rejections": self.rejections,
            "n_trades": self.n_trades,
            "starting_balance": self.starting_balance,
            "final_equity": self.final_equity,
            "total_return": self.total_return,
            "max_drawdown": self.max_drawdown,
            "fees": self.fees,
            "funding": self.funding,
            "funding_settlements": self.funding_settlements,
            "liquidations": self.liquidations,
            "auto_deleverages": self.auto_deleverages,
            "realised_pnl": self.realised_pnl,
            "open_positions": [p.to_dict() for p in self.open_positions],
            "trades": [t.as_dict() for t in self.trades],
            "breaker_trips": [t.to_dict() for t in self.breaker_trips],
            "trading_spans": [s.to_dict() for s in self.trading_spans],
        }
        if self.dropped_candles is not None:
            out["dropped_candles"] = self.dropped_candles
        if self.timings is not None:
            out["timings"] = dict(self.timings)
        if self.restart_as is not None:
            out["restart_as"] = self.restart_as
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Return the summary of a `--summary-json` document (`to_dict`'s inverse).

        The derived keys (`n_trades`, `total_return`, `liquidations`,
        `auto_deleverages`) are recomputed from
        the trades and balances, not read.
        """
        sections = data.get("strategies")
        timings = data.get("timings")
        return cls(
            mode=str(data["mode"]),
            strategy=StrategyRef.from_dict(data["strategy"]),
            pairs=tuple(data["pairs"]),
            timeframe=str(data["timeframe"]),
            candles=int(data["candles"]),
            first_ts=data["first_ts"],
            last_ts=data["last_ts"],
            signals=int(data["signals"]),
            vetoes=int(data["vetoes"]),
            rejections=int(data["rejections"]),
            starting_balance=data["starting_balance"],
            final_equity=data["final_equity"],
            max_drawdown=data["max_drawdown"],
            fees=data["fees"],
            funding=data["funding"],
            funding_settlements=int(data["funding_settlements"]),
            realised_pnl=data["realised_pnl"],
            open_positions=tuple(OpenPosition.from_dict(p) for p in data["open_positions"]),
            trades=tuple(trade_from_dict(t) for t in data["trades"]),
            breaker_trips=tuple(BreakerTrip.from_dict(t) for t in data["breaker_trips"]),
            trading_spans=tuple(TradingSpan.from_dict(s) for s in data["trading_spans"]),
            strategies=(
                None if sections is None else tuple(StrategySection.from_dict(s) for s in sections)
            ),
            dropped_candles=data.get("dropped_candles"),
            timings=None if timings is None else dict(timings),
            restart_as=data.get("restart_as"),
        )
