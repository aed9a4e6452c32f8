"""What a run keeps on disk: the state snapshot, the performance record, the risk state.

Part of `runner` (which re-exports it). `RunState` is one of a run's components (every
builder makes one): the risk state (breakers, peak, day start, losing streak, manual rung)
and the capital sleeves are written whenever they change and read back before trading
resumes; the state snapshot and the performance record are written periodically.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from config import Settings
from error_handler import (
    DataError,
)
from pipeline import CURVE_POINTS
from utils.utilities import (
    AuditTrail,
    atomic_write,
)


if TYPE_CHECKING:
    from pipeline import Engine
    from trade_store import TradeStore


log = structlog.get_logger(__name__)


class RunState:
    """Persist and restore a run's state (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        audit: AuditTrail,
        *,
        rate_limit_budget: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.mode = engine.mode
        self.audit = audit
        self._rate_limit_budget = rate_limit_budget
        # Risk state persistence (live and paper on the exchange feed; replays have none).
        self._risk_store: TradeStore | None = None
        self._risk_key: tuple[Any, ...] | None = None
        self._risk_lock = asyncio.Lock()
        self._allocation_key: tuple[Any, ...] | None = None

    def _risk_state_path(self) -> Path:
        return self.settings.storage.data_dir / "state" / f"{self.mode}-risk.json"

    async def _restore_score_books(self, store: TradeStore) -> None:
        """Rebuild the score's per-strategy books from the journal's closed trades (live).

        Each trade goes in with the equity recorded after it, so `/score`, the ranking
        and the allocation see the same record after a restart as before it.
        """
        engine = self.engine
        history = await asyncio.to_thread(store.trade_history)
        for trade, equity_after in history:
            engine.reward.on_trade_closed(
                trade.strategy or engine.strategy.name, trade, equity=equity_after
            )
        if history:
            log.info("score_books_restored", trades=len(history))

    async def restore_risk_state(self, store: TradeStore | None = None) -> None:
        """Load the saved risk state before trading resumes; persist it on every change.

        Live keeps it in the trade store (`risk`), paper trading on the exchange feed in
        `data/state/<mode>-risk.json`; a paper account starts afresh, so its peak and day
        start are scaled to it. Replays (sim on archives, backtests) neither load nor save:
        each replays history from its start.

        Raises:
            DataError: the saved state cannot be read (trading must not start without it).
        """
        risk = self.engine.risk
        self._risk_store = store
        where = "trade_store" if store is not None else str(self._risk_state_path())
        try:
            saved = await asyncio.to_thread(self._read_risk_state)
            if saved is not None:
                fresh = self.engine.portfolio.equity() if store is None else None
                risk.restore_state(saved, equity=fresh)
        except (ValueError, KeyError, TypeError, ArithmeticError) as e:
            raise DataError(
                f"the saved risk state ({where}) is unreadable: {e!r}; check it, then remove"
                " it to start with fresh breakers",
                component="risk",
            ) from e
        self._risk_key = risk.state_key()
        self.engine.risk_saver = self._persist_risk_state
        await self._restore_allocation(store)
        if store is not None:
            await self._restore_score_books(store)
            await self._restore_equity_history(store)
        if saved is not None:
            breakers = risk.breakers
            self.audit.record(
                "risk_state_restored",
                self.engine.clock.now_ms(),
                source=where,
                state=str(risk.trading_state),
                latched=sorted(breakers.latched),
                manual=str(breakers.manual) if breakers.manual is not None else None,
                peak_equity=str(breakers.peak_equity),
                day_start_equity=str(breakers.day_start_equity),
                consecutive_losses=breakers.consecutive_losses,
            )

    def _allocation_path(self) -> Path:
        return self.settings.storage.data_dir / "state" / f"{self.mode}-allocation.json"

    async def _restore_allocation(self, store: TradeStore | None) -> None:
        # Multi-strategy: the capital sleeves as last stored (trade store live, a file on
        # paper), so a restart neither resets the shares nor the probation clock.
        engine = self.engine
        if engine.sleeves is None:
            return
        sleeves = engine.sleeves
        path = self._allocation_path()

        def read() -> Any:
            if store is not None:
                return store.get_state("allocation")
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

        saved = await asyncio.to_thread(read)
        positions = engine.portfolio.positions()
        equity = engine.portfolio.equity()
        try:
            restored = saved is not None and sleeves.restore_state(
                saved, equity=equity, positions=positions
            )
        except (ValueError, KeyError, TypeError) as e:
            log.warning("allocation_unreadable", error=repr(e))  # the configured sleeves stand
            restored = False
        if restored:
            self.audit.record(
                "allocation_restored", engine.clock.now_ms(), weights=dict(sleeves.weights)
            )
        self._allocation_key = sleeves.state_key()

    async def _persist_allocation(self) -> None:
        engine = self.engine
        if engine.sleeves is None:
            return
        key = engine.sleeves.state_key()
        if key == self._allocation_key:
            return
        data = engine.sleeves.dump_state()
        store, path = self._risk_store, self._allocation_path()

        def write() -> None:
            if store is not None:
                store.set_state("allocation", data)
            else:
                atomic_write(path, json.dumps(data, indent=2))

        try:
            await asyncio.to_thread(write)
        except Exception:
            log.exception("allocation_persist_failed")
            return
        self._allocation_key = key

    def _read_risk_state(self) -> Any:
        if self._risk_store is not None:
            return self._risk_store.get_state("risk")
        path = self._risk_state_path()
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    async def _persist_risk_state(self) -> None:
        """Store the risk state if it changed since it was last stored (a cheap no-op if not).

        A failed write is logged and retried at the next change check; trading goes on
        with the state in memory.
        """
        engine = self.engine
        await self._persist_allocation()
        if self._risk_key is None or engine.risk.state_key() == self._risk_key:
            return
        async with self._risk_lock:  # one write at a time: the last one stored is the newest
            key = engine.risk.state_key()
            if key == self._risk_key:
                return
            data = engine.risk.dump_state()
            try:
                await asyncio.to_thread(self._write_risk_state, data)
            except Exception:
                log.exception("risk_state_persist_failed")
                return
            self._risk_key = key

    def _write_risk_state(self, data: dict[str, Any]) -> None:
        if self._risk_store is not None:
            self._risk_store.set_state("risk", data)
        else:
            atomic_write(self._risk_state_path(), json.dumps(data, indent=2))

    async def snapshot_once(self) -> None:
        """Wait one snapshot interval, then persist and record the performance snapshot."""
        await asyncio.sleep(self.settings.storage.snapshot_interval_s)
        await self.persist()
        await self._record_equity()
        self.record_performance()

    async def _record_equity(self) -> None:
        """Record the account's cash and equity in the trade store (live), off the event loop.

        One point per snapshot interval: the equity history the views show again after a
        restart (`_restore_equity_history`). Paper and replay runs keep no store.
        """
        store, engine = self._risk_store, self.engine
        if store is None:
            return
        portfolio = engine.portfolio
        now, cash, equity = engine.clock.now_ms(), portfolio.cash, portfolio.equity()
        await asyncio.to_thread(store.add_equity, now, cash, equity)

    async def _restore_equity_history(self, store: TradeStore) -> None:
        # The equity recorded before this start, ahead of this run's curve in the views.
        points = await asyncio.to_thread(store.equity_curve, last=CURVE_POINTS)
        self.engine.equity_history = tuple((p.ts, float(p.equity)) for p in points)
        if points:
            log.info("equity_history_restored", points=len(points), since=points[0].ts)

    def record_performance(self) -> None:
        """Write the periodic performance snapshot to the audit trail (JSON lines, rotated)."""
        engine = self.engine
        latencies = sorted(engine.decision_latency_ms)

        def pct(q: float) -> float | None:
            return round(latencies[int(q * (len(latencies) - 1))], 3) if latencies else None

        self.audit.record(
            "performance",
            engine.clock.now_ms(),
            equity=float(engine.portfolio.equity()),
            cash=float(engine.portfolio.cash),
            exposure=float(engine.portfolio.exposure()),
            positions=len(engine.portfolio.positions()),
            open_orders=len(engine.executor.open_orders()),
            max_drawdown=engine.portfolio.max_drawdown,
            trading_state=str(engine.risk.trading_state),
            candles=engine.candles,
            decision_latency_ms_p50=pct(0.5),
            decision_latency_ms_p99=pct(0.99),
            rate_limit_budget=self._rate_limit_budget(),
        )

    async def persist(self) -> None:
        """Write the state snapshot, the risk state and the sleeves; archive new candles."""
        await asyncio.to_thread(self.persist_state)
        await self._persist_risk_state()
        stored = await self.engine.data.flush()
        if stored:
            log.info("candles_archived", candles=stored)

    def persist_state(self) -> Path:
        """Write the portfolio, open orders and risk state atomically; return the path."""
        engine = self.engine
        path = self.settings.storage.data_dir / "state" / f"{self.mode}.json"
        state = {
            "ts": engine.clock.now_ms(),
            "mode": engine.mode,
            "candles": engine.candles,
            "cash": str(engine.portfolio.cash),
            "equity": str(engine.portfolio.equity()),
            "positions": [
                {
                    "pair": p.pair,
                    "side": str(p.side),
                    "qty": str(p.qty),
                    "entry_price": str(p.entry_price),
                    "ts_opened": p.ts_opened,
                }
                for p in engine.portfolio.positions().values()
            ],
            "open_orders": [
                {"client_order_id": o.client_order_id, "pair": o.pair, "status": str(o.status)}
                for o in engine.executor.open_orders()
            ],
            "trading_state": str(engine.risk.trading_state),
            "n_trades": len(engine.portfolio.closed),
        }
        atomic_write(path, json.dumps(state, indent=2))
        log.info("state_flushed", path=str(path), candles=engine.candles)
        return path
