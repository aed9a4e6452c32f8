"""Shared fakes for the UI tests: a hand-written Control, a known Snapshot, a tmux demo.

No tests live here. Run as a script (`python -m tests.test_ui_support EVENTS_FILE`) it
starts the Dashboard on the real terminal with a FakeControl that appends every command
to EVENTS_FILE, for the tmux test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from textual.geometry import Region
from textual.widget import Widget

from models import (
    BotState,
    ClosedTrade,
    Decision,
    OrderBook,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Side,
    Signal,
    Snapshot,
    TradingState,
)


T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC


def make_snapshot(**changes: object) -> Snapshot:
    """Return a snapshot with known numbers; keyword arguments replace fields."""
    positions = (
        Position(
            pair="BTC/USDT",
            side=PositionSide.LONG,
            qty=Decimal("0.5"),
            entry_price=Decimal("50000"),
            ts_opened=T0 - 3_600_000,
            stop_price=Decimal("48500"),
            mark_price=Decimal("50600"),
        ),
        Position(
            pair="ETH/USDT",
            side=PositionSide.SHORT,
            qty=Decimal("2"),
            entry_price=Decimal("3000"),
            ts_opened=T0 - 1_800_000,
            mark_price=Decimal("3010"),
        ),
    )
    books = {
        "BTC/USDT": OrderBook(
            pair="BTC/USDT",
            ts=T0,
            bids=((50599.0, 1.0), (50598.0, 2.0), (50590.0, 3.0)),
            asks=((50601.0, 0.5), (50602.0, 1.5), (50610.0, 4.0)),
        ),
        "ETH/USDT": OrderBook(
            pair="ETH/USDT",
            ts=T0,
            bids=((3009.5, 10.0), (3009.0, 5.0)),
            asks=((3010.5, 7.0), (3011.0, 20.0)),
        ),
        "SOL/USDT": OrderBook(pair="SOL/USDT", ts=T0, bids=((101.25, 40.0),), asks=()),
    }
    trades = (
        ClosedTrade(
            "SOL/USDT",
            PositionSide.LONG,
            T0 - 900_000,
            T0 - 600_000,
            100.0,
            104.0,
            10.0,
            0.8,
            39.2,
            "take_profit",
        ),
        ClosedTrade(
            "ETH/USDT",
            PositionSide.LONG,
            T0 - 700_000,
            T0 - 300_000,
            3050.0,
            3020.0,
            1.0,
            1.2,
            -31.2,
            "stop",
        ),
    )
    curve = tuple((T0 - (60 - i) * 60_000, 10_000.0 + 5.0 * i + (i % 7) * 3.0) for i in range(60))
    signal = Signal("BTC/USDT", Side.BUY, 0.72, "ema_cross", T0 - 60_000, 50590.0, "trend")
    base = Snapshot(
        ts=T0,
        mode="sim",
        state=BotState.RUNNING,
        trading_state=TradingState.REDUCED,
        portfolio=PortfolioSnapshot(
            ts=T0,
            cash=Decimal("4321.09"),
            equity=Decimal("10321.45"),
            positions=positions,
            realised_pnl=Decimal("8.00"),
            fees=Decimal("2.00"),
        ),
        pairs=("BTC/USDT", "ETH/USDT", "SOL/USDT"),
        recent_trades=trades,
        equity_curve=curve,
        last_decisions={"BTC/USDT": Decision("BTC/USDT", T0 - 60_000, signal, "approved")},
        order_books=books,
        scores={"trend": 0.842, "meanrev": -0.125},
        errors=("NetworkError: bybit timeout (fetch_ohlcv BTC/USDT)",),
        rate_limit_budget={"rest": 0.83},
        risk={
            "exposure": 0.3035,
            "max_exposure": 0.5,
            "circuit_breakers": {"exchange": "closed", "strategy": "open"},
            "daily_loss": 0.0123,
        },
        model={"name": "lgbm", "version": 3},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class FakeControl:
    """An in-memory Control: commands change real state and are recorded in `calls`."""

    def __init__(self, snapshot: Snapshot | None = None, events: Path | None = None) -> None:
        self.base = snapshot or make_snapshot()
        self.state = self.base.state
        self.calls: list[tuple[str, ...]] = []
        self.snapshot_calls = 0
        self.events = events
        self.fail_snapshot = False
        self.fail_commands = False
        self.found_patterns: dict[str, list[dict[str, Any]]] = {}
        self.charts: dict[str, dict[str, Any]] = {}

    def snapshot(self) -> Snapshot:
        """Return the base snapshot with the current bot state."""
        self.snapshot_calls += 1
        if self.fail_snapshot:
            raise RuntimeError("store unavailable")
        return dataclasses.replace(self.base, state=self.state)

    def _record(self, *call: str) -> None:
        if self.fail_commands:
            raise ConnectionError("exchange unreachable")
        self.calls.append(call)
        if self.events is not None:
            with self.events.open("a", encoding="utf-8") as f:
                f.write(" ".join(call) + "\n")

    async def pause(self, reason: str) -> None:
        """Pause."""
        self._record("pause", reason)
        self.state = BotState.PAUSED

    async def resume(self, reason: str) -> None:
        """Resume."""
        self._record("resume", reason)
        self.state = BotState.RUNNING

    async def stop_buy(self, reason: str) -> None:
        """Record stop_buy."""
        self._record("stop_buy", reason)

    async def reset_risk(self, reason: str) -> None:
        """Record reset_risk."""
        self._record("reset_risk", reason)

    async def force_exit(self, pair: str, reason: str) -> None:
        """Record force_exit."""
        self._record("force_exit", pair, reason)

    def patterns(self, pair: str) -> list[dict[str, Any]]:
        """Return the patterns set for `pair` by the test (none by default)."""
        return self.found_patterns.get(pair, [])

    def chart(self, pair: str, limit: int = 500) -> dict[str, Any]:
        """Return the chart set for `pair` by the test (no candles by default)."""
        empty = {"pair": pair, "timeframe": "1m", "candles": [], "overlays": {}, "marks": []}
        return self.charts.get(pair, {**empty, "position": None})

    async def reconcile(self) -> str:
        """Record reconcile."""
        self._record("reconcile")
        return "nothing to reconcile"

    async def stop(self, reason: str) -> None:
        """Stop."""
        self._record("stop", reason)
        self.state = BotState.STOPPING


def sample_chart(pair: str = "BTC/USDT", limit: int = 300) -> dict[str, Any]:
    """Return a real chart body: the bundled BTC/USDT 1m sample, ema_cross's EMAs, and
    two round trips (one exited by signal, one by its stop) plus an open position, all
    inside the last `limit` candles."""
    from chart_data import chart_body
    from strategy import load_strategy
    from tests.test_backtest_support import sample_frame

    frame = sample_frame()
    ts = frame.index.as_unit("ms").asi8
    close = frame["close"].to_numpy()

    def trade(entry: int, exit: int, reason: str) -> ClosedTrade:
        pnl = (close[exit] - close[entry]) * 0.1
        entry_price, exit_price = float(close[entry]), float(close[exit])
        times = int(ts[entry]), int(ts[exit])
        return ClosedTrade(pair, PositionSide.LONG, *times, entry_price, exit_price, 0.1, 0.0,
                           pnl, reason)  # fmt: skip

    n = len(frame)
    position = Position(
        pair=pair,
        side=PositionSide.LONG,
        qty=Decimal("0.1"),
        entry_price=Decimal(str(close[n - 40])),
        ts_opened=int(ts[n - 40]),
        stop_price=Decimal(str(round(close[n - 40] * 0.99, 2))),
        mark_price=Decimal(str(close[-1])),
    )
    return chart_body(
        pair, "1m", 60_000, frame,
        populate=load_strategy("ema_cross", {}).populate,
        trades=[trade(n - 250, n - 200, "signal"), trade(n - 150, n - 120, "stop")],
        position=position, limit=limit,
    )  # fmt: skip


def widget_text(widget: Widget) -> str:
    """Return what `widget` shows on screen (border and title included), as plain text."""
    width, height = widget.outer_size
    return "\n".join(strip.text for strip in widget.render_lines(Region(0, 0, width, height)))


async def _demo(events: Path) -> None:
    from config import UISettings
    from ui import Dashboard

    async def switch_mode(mode: str) -> None:
        control._record("switch_mode", mode)

    control = FakeControl(events=events)
    app = Dashboard(
        control, UISettings(refresh_hz=10), can_switch_live=False, switch_mode=switch_mode
    )
    await app.run_async()
    control._record("exited")


if __name__ == "__main__":
    asyncio.run(_demo(Path(sys.argv[1])))
