"""The risk manager's state: the breaker ladder, per-pair pauses and the Kelly history.

Part of `risk_management`: `RiskManager` derives from `RiskState`, which holds what
moves the trading state (equity updates, closed trades, operator commands) and what the
daemon persists and restores (`dump_state` / `restore_state`). Under the `all_in` profile
the ladder stays at normal and closed trades are not accounted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from circuit_breakers import CircuitBreakers, PairPauses
from models import ClosedTrade, TradingState
from risk_guards import KellyEstimate, kelly_estimate


__all__ = ["RiskState"]


class RiskState:
    """The base of `RiskManager`: its trading state, pauses and Kelly statistics.

    `RiskManager.__init__` sets the attributes declared here.
    """

    all_in: bool
    breakers: CircuitBreakers
    pair_pauses: PairPauses
    trade_returns: deque[float]
    kelly_min_trades: int
    _closed_trades: int

    @property
    def trading_state(self) -> TradingState:
        """Return the current rung of the ladder (always normal under `all_in`)."""
        return TradingState.NORMAL if self.all_in else self.breakers.state

    def update(self, now: int, equity: Decimal) -> TradingState:
        """Feed the breakers with the latest equity (including unrealised PnL)."""
        if self.all_in:
            return TradingState.NORMAL
        return self.breakers.update(now, equity)

    @property
    def flatten_holds(self) -> bool:
        """Return True while the breakers hold a flatten that only an operator lifts."""
        return not self.all_in and self.breakers.flatten_holds

    def update_flat(
        self, times: Sequence[int], equity: Decimal, stop_on: TradingState | None = None
    ) -> int:
        """Feed an unchanged equity at each of `times`, as `update` at each; return how many.

        Stops after the first time whose state is `stop_on` (see `CircuitBreakers`).
        """
        if self.all_in:
            return len(times)
        return self.breakers.update_flat(times, equity, stop_on)

    def on_trade_closed(self, trade: ClosedTrade, now: int) -> None:
        """Account a closed round trip (or part of one): loss streak and Kelly statistics."""
        if self.all_in:
            return
        self._closed_trades += 1
        notional = trade.entry_price * trade.qty
        if notional > 0:
            self.trade_returns.append(trade.pnl / notional)
        self.breakers.on_trade_closed(trade, now)

    def set_manual(self, state: TradingState | None) -> None:
        """Force a rung (kill switch, /stopbuy, /pause) or resume with None.

        Resuming clears every latched breaker, the peak-to-trough flatten included, and
        re-bases the peak and the day's starting equity on the current equity.
        """
        self.breakers.set_manual(state)

    def clear_manual(self) -> None:
        """Lift a manual rung (/resume after /stopbuy); latched breakers stay latched."""
        self.breakers.clear_manual()

    def pause_pair(self, pair: str, reason: str, *, now: int, until: int | None) -> bool:
        """Refuse entries on `pair` until `until` (exits go on); True when newly paused."""
        return self.pair_pauses.pause(pair, reason, now=now, until=until)

    def resume_pair(self, pair: str) -> bool:
        """Lift a pair's entry pause; True when there was one."""
        return self.pair_pauses.resume(pair)

    def reset(self, *, history: bool = False) -> None:
        """Resume manually (as `set_manual(None)`); with `history`, forget the Kelly trades."""
        if history:
            self.trade_returns.clear()
        self.breakers.reset()

    def dump_state(self) -> dict[str, Any]:
        """Return the breakers and the Kelly history as a JSON-able dict, to persist."""
        return {"breakers": self.breakers.dump(), "trade_returns": list(self.trade_returns)}

    def state_key(self) -> tuple[Any, ...]:
        """Return a cheap token that changes whenever `dump_state` has news to persist."""
        return (self.breakers.state_key(), self._closed_trades)

    def restore_state(
        self, data: Mapping[str, Any], *, equity: Decimal | None = None
    ) -> TradingState:
        """Load what `dump_state` returned (at startup, before the first candle).

        `equity` re-bases the saved amounts on a fresh paper account (see
        `CircuitBreakers.restore`).
        """
        self.trade_returns.clear()
        self.trade_returns.extend(float(r) for r in data.get("trade_returns", []))
        return self.breakers.restore(data["breakers"], equity=equity)

    def kelly(self) -> KellyEstimate | None:
        """Return the Kelly statistics of recent trades, None below the minimum sample."""
        if len(self.trade_returns) < max(self.kelly_min_trades, 1):
            return None
        return kelly_estimate(list(self.trade_returns))
