"""The engine's per-candle work rehearsed between bursts, on its state as it stands.

Part of `pipeline` (`Engine` inherits it; `burst_rehearsal.KeepWarm` runs these just
before each close it expects). A burst's first candles meet their code and data cold: in
a 50-pair burst of entries, the first decision took ~140 us where the tenth took ~30, and
the first send ~70 where the tenth took ~15, even with bursts back to back. Rehearsing the
passes over all pairs (`rehearse_atr`; the kernel and anomaly passes have their own) and
one entry's decision and order (`rehearse_decision`) just before the close brings them
into the CPU's caches. Nothing is kept: a rehearsal computes what a decision would, on
copies or into caches keyed by the windows it read, and drops the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal

from data_manager import DataManager
from error_handler import OrderRejected
from models import Market, Order, OrderStatus, Side, Signal, evolve, order_from_intent
from portfolio import Portfolio
from risk_management import RiskContext, RiskManager
from utils.precision import validate_intent
from utils.utilities import Clock


class Rehearsals:
    """What `burst_rehearsal.KeepWarm` rehearses of the engine (module docstring)."""

    # The engine's state it reads (`pipeline.EngineState` sets them).
    data: DataManager
    timeframe: str
    risk: RiskManager
    portfolio: Portfolio
    clock: Clock
    last_close: dict[str, float]
    market_for: Callable[[str], Market]
    _active: set[str]
    # The engine's steps it runs (`pipeline.EngineState` defines them).
    price: Callable[[str], Decimal | None]
    _window_atr: Callable[[str, int], float | None]
    _risk_context: Callable[..., RiskContext]

    def rehearse_atr(self, pairs: Iterable[str]) -> None:
        """Compute the pairs' ATRs on their windows as they stand, keeping nothing."""
        period = self.risk.settings.atr_period
        for pair in pairs:
            end = self.data.window_end(pair, self.timeframe)
            if end is not None and end[1] > period:
                self._window_atr(pair, period)

    def rehearse_decision(self, pairs: Iterable[str]) -> Order | None:
        """Decide and shape an entry on the first traded flat pair of `pairs`, keeping nothing.

        The decision's own path on the pair's window as it stands: its risk context, the
        risk manager's sizing (`RiskManager.rehearse_entry`, which asks no guard: the
        correlation guard keeps its last check for the operator) and the order as the
        executor checks and records it (`validate_intent`, `order_from_intent`), nothing
        sent, journalled, audited or logged. The caches it fills (the pair's price as a
        Decimal, its ATR) are keyed by the window it read, as a decision's are. Returns the
        order shaped (None: no pair could take an entry), for tests.
        """
        for pair in pairs:
            if pair not in self._active or self.portfolio.has_position(pair):
                continue
            end = self.data.window_end(pair, self.timeframe)
            close = self.last_close.get(pair)
            if end is None or close is None:
                continue
            now = self.clock.now_ms()
            signal = Signal(pair, Side.BUY, 1.0, "rehearsal", end[0], close)
            intent = self.risk.rehearse_entry(signal, self._risk_context(pair, now, end[0]))
            if intent is None:
                return None
            bare = evolve(intent, stop_loss=None, take_profit=None)  # as the executor sends it
            try:
                checked = validate_intent(bare, self.market_for(pair), last_price=self.price(pair))
            except OrderRejected:
                return None
            return order_from_intent(checked, OrderStatus.NEW, now)
        return None
