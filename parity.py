"""Live-versus-backtest parity audit: live decisions and fills against a backtest.

What live trading decided and filled, against what the backtester decides and fills on the
same recorded candles.

The live side is the audit trail (`logs/audit.jsonl*`: signals, risk verdicts, orders and
fills, each with its candle time); the backtest side is a replay of the candles the live
bot recorded, through the same strategy and risk objects, captured in memory. Decisions
are matched on (pair, candle time); fills through the client order id of the decision
that caused them (protective stop and take-profit orders carry that id plus `sl`/`tp`).

Each difference is reported: a decision only one side took, a different side or verdict,
and for matched fills the price difference in basis points (slippage, positive when live
did worse) and the time from decision to first fill (latency).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog


log = structlog.get_logger(__name__)
DECISION_KINDS = ("risk_approved", "veto")


def read_audit(
    log_dir: Path, since_ms: int | None = None, until_ms: int | None = None
) -> list[dict[str, Any]]:
    """Return audit events from `audit.jsonl` and its rotated files, oldest first."""
    files = sorted(
        log_dir.glob("audit.jsonl*"),
        key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
    )
    events: list[dict[str, Any]] = []
    for path in files:
        for line in _lines(path):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.warning("audit_line_skipped", path=str(path))
                continue
            ts = event.get("candle_ts", event.get("ts", 0))
            if since_ms is not None and ts < since_ms:
                continue
            if until_ms is not None and ts >= until_ms:
                continue
            events.append(event)
    return events


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line


@dataclass(frozen=True, slots=True)
class DecisionDiff:
    """A decision taken differently (or only) on one side."""

    pair: str
    candle_ts: int
    live: str | None
    backtest: str | None
    live_reason: str = ""
    backtest_reason: str = ""


@dataclass(frozen=True, slots=True)
class FillDiff:
    """Matched fills of one decision: price and timing attribution."""

    pair: str
    candle_ts: int
    leg: str
    side: str
    live_price: float
    backtest_price: float
    slippage_bps: float
    live_latency_ms: int
    backtest_latency_ms: int
    live_qty: float
    backtest_qty: float


@dataclass(slots=True)
class ParityReport:
    """Everything that differed, with summary statistics."""

    decisions_live: int = 0
    decisions_backtest: int = 0
    decisions_matched: int = 0
    decision_diffs: list[DecisionDiff] = field(default_factory=list)
    fill_diffs: list[FillDiff] = field(default_factory=list)
    unmatched_fills: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return True when every decision matched (fills may still differ in price)."""
        return not self.decision_diffs and not self.unmatched_fills

    def summary(self) -> dict[str, Any]:
        """Return counts and slippage/latency statistics."""
        slips = [f.slippage_bps for f in self.fill_diffs]
        lats = [f.live_latency_ms for f in self.fill_diffs]
        return {
            "ok": self.ok,
            "decisions_live": self.decisions_live,
            "decisions_backtest": self.decisions_backtest,
            "decisions_matched": self.decisions_matched,
            "decision_diffs": len(self.decision_diffs),
            "fills_matched": len(self.fill_diffs),
            "fills_unmatched": len(self.unmatched_fills),
            "slippage_bps_mean": statistics.fmean(slips) if slips else None,
            "slippage_bps_p50": statistics.median(slips) if slips else None,
            "slippage_bps_max": max(slips) if slips else None,
            "latency_ms_mean": statistics.fmean(lats) if lats else None,
            "latency_ms_p50": statistics.median(lats) if lats else None,
            "latency_ms_max": max(lats) if lats else None,
        }

    def to_json(self) -> dict[str, Any]:
        """Return the whole report as JSON-able data."""
        return {
            "summary": self.summary(),
            "decision_diffs": [asdict(d) for d in self.decision_diffs],
            "fill_diffs": [asdict(f) for f in self.fill_diffs],
            "unmatched_fills": self.unmatched_fills,
        }


def _decisions(events: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for e in events:
        if e.get("kind") in DECISION_KINDS and "candle_ts" in e:
            out[(e["pair"], int(e["candle_ts"]))] = e
    return out


def _verdict(event: dict[str, Any] | None) -> str | None:
    if event is None:
        return None
    if event["kind"] == "veto":
        return f"veto:{event.get('guard', '')}"
    return f"order:{event.get('side', '')}"


def _fills_by_decision(
    events: list[dict[str, Any]], decisions: dict[tuple[str, int], dict[str, Any]]
) -> tuple[dict[tuple[str, int, str], list[dict[str, Any]]], list[dict[str, Any]]]:
    by_cid = {d["client_order_id"]: key for key, d in decisions.items() if d.get("client_order_id")}
    grouped: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    unmatched = []
    for e in events:
        if e.get("kind") != "fill":
            continue
        cid = str(e.get("client_order_id", ""))
        leg, key = "order", by_cid.get(cid)
        base, _, suffix = cid.rpartition("-")
        if key is None and suffix[:2] in ("sl", "tp"):
            # Protective orders are "<entry id>-sl<n>" / "-tp<n>" (entry id maybe shortened).
            leg = "stop" if suffix.startswith("sl") else "take_profit"
            key = next((k for c, k in by_cid.items() if c.startswith(base)), None)
        if key is None:
            unmatched.append(e)
            continue
        grouped.setdefault((key[0], key[1], leg), []).append(e)
    return grouped, unmatched


def _avg(fills: list[dict[str, Any]]) -> tuple[float, float, int]:
    qty = sum(float(f["qty"]) for f in fills)
    price = sum(float(f["price"]) * float(f["qty"]) for f in fills) / qty if qty else 0.0
    return price, qty, min(int(f["ts"]) for f in fills)


def compare(live: list[dict[str, Any]], backtest: list[dict[str, Any]]) -> ParityReport:
    """Compare two audit event streams; return every difference."""
    report = ParityReport()
    live_d, bt_d = _decisions(live), _decisions(backtest)
    report.decisions_live, report.decisions_backtest = len(live_d), len(bt_d)
    for key in sorted(set(live_d) | set(bt_d)):
        a, b = live_d.get(key), bt_d.get(key)
        if _verdict(a) == _verdict(b):
            report.decisions_matched += 1
            continue
        report.decision_diffs.append(
            DecisionDiff(
                key[0],
                key[1],
                _verdict(a),
                _verdict(b),
                str(a.get("reason", "")) if a else "",
                str(b.get("reason", "")) if b else "",
            )
        )
    live_f, live_unmatched = _fills_by_decision(live, live_d)
    bt_f, _ = _fills_by_decision(backtest, bt_d)
    report.unmatched_fills = live_unmatched
    for fkey in sorted(set(live_f) & set(bt_f)):
        pair, candle_ts, leg = fkey
        lp, lq, lts = _avg(live_f[fkey])
        bp, bq, bts = _avg(bt_f[fkey])
        side = str(live_f[fkey][0].get("side", "buy"))
        sign = 1.0 if side == "buy" else -1.0
        decided_live = int(live_d[(pair, candle_ts)]["ts"])
        decided_bt = int(bt_d[(pair, candle_ts)]["ts"])
        report.fill_diffs.append(
            FillDiff(
                pair=pair,
                candle_ts=candle_ts,
                leg=leg,
                side=side,
                live_price=lp,
                backtest_price=bp,
                slippage_bps=sign * (lp - bp) / bp * 1e4 if bp else 0.0,
                live_latency_ms=lts - decided_live,
                backtest_latency_ms=bts - decided_bt,
                live_qty=lq,
                backtest_qty=bq,
            )
        )
    for fkey in sorted(set(live_f) ^ set(bt_f)):
        side_name = "live" if fkey in live_f else "backtest"
        report.unmatched_fills.append(
            {"pair": fkey[0], "candle_ts": fkey[1], "leg": fkey[2], "only": side_name}
        )
    return report


def render(report: ParityReport) -> Any:
    """Return a Rich renderable of the report."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="Parity: live vs backtest", show_header=False)
    for key, value in report.summary().items():
        summary.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    parts: list[Any] = [summary]
    if report.decision_diffs:
        table = Table(title="Decisions that differ")
        for column in ("pair", "candle_ts", "live", "backtest", "live reason", "backtest reason"):
            table.add_column(column)
        for d in report.decision_diffs[:200]:
            table.add_row(
                d.pair,
                str(d.candle_ts),
                str(d.live),
                str(d.backtest),
                d.live_reason,
                d.backtest_reason,
            )
        parts.append(table)
    if report.fill_diffs:
        table = Table(title="Fills: slippage and latency")
        for column in (
            "pair",
            "candle_ts",
            "leg",
            "side",
            "live",
            "backtest",
            "slip bps",
            "latency ms",
        ):
            table.add_column(column)
        for f in report.fill_diffs[:200]:
            table.add_row(
                f.pair,
                str(f.candle_ts),
                f.leg,
                f.side,
                f"{f.live_price:.8g}",
                f"{f.backtest_price:.8g}",
                f"{f.slippage_bps:.2f}",
                str(f.live_latency_ms),
            )
        parts.append(table)
    return Group(*parts)
