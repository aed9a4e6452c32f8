"""Telegram message text: alert templates and command views, HTML-escaped and redacted.

Pure functions of our own types (`models`), so any component can build an alert without
touching the bot, and tests can check a view without a server. Every free-form value goes
through `esc`, which masks registered secrets (`utils.utilities.redact`) and escapes HTML.
HTML tags open and close on one line, so long texts can be split at line breaks.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, assert_never

from error_handler import BotError
from models import (
    AllocationChanged,
    Anomaly,
    AnomalyDetected,
    ClosedTrade,
    Decision,
    ErrorRaised,
    Event,
    Fill,
    FillKind,
    ModelPromoted,
    ModelRejected,
    OrderIntent,
    OrderRefused,
    Position,
    PositionLiquidated,
    RiskReset,
    Snapshot,
    StopHit,
    TradeClosed,
    TradeOpened,
    TradingState,
    TradingStateChanged,
)
from utils.utilities import ms_to_datetime, redact


MAX_MESSAGE_CHARS: Final = 4096
# Long texts are split below the hard limit so a count suffix still fits.
CHUNK_CHARS: Final = 3800


# -- Formatting helpers ----------------------------------------------------------------------


def esc(value: Any) -> str:
    """Return `value` as HTML-safe text with every registered secret masked."""
    return html.escape(str(redact(value if isinstance(value, str) else str(value))), quote=False)


def fmt_number(value: Decimal | float | int | None, places: int = 2, *, sign: bool = False) -> str:
    """Return a number with thousands separators and `places` decimals ("-" for None)."""
    if value is None:
        return "-"
    return f"{float(value):{'+' if sign else ''},.{places}f}"


def fmt_price(value: Decimal | float | None) -> str:
    """Return a price or quantity exactly, without exponent notation ("-" for None)."""
    if value is None:
        return "-"
    number = value if isinstance(value, Decimal) else Decimal(repr(float(value)))
    text = format(number.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    if isinstance(value, Decimal):
        return esc(fmt_price(value))
    return esc(value)


def _when(ts_ms: int) -> str:
    return ms_to_datetime(ts_ms).strftime("%Y-%m-%d %H:%M UTC")


def _duration(ms: int) -> str:
    seconds = max(0, ms) // 1000
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def plain_text(html_text: str) -> str:
    """Return what an HTML message looks like as plain text (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", html_text))


def split_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Split a message into chunks of at most `limit` characters at line breaks.

    HTML tags must open and close on one line for the chunks to stay valid; the templates
    here keep to that. A single line longer than `limit` is cut hard.
    """
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:limit])
            line = line[limit:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            chunks.append(current)
            current = line
        else:
            current = candidate
    if current:
        chunks.append(current)
    return chunks


def _pair_key(pair: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", pair.split(":")[0].upper())


def find_pair(query: str, pairs: Iterable[str]) -> str | None:
    """Return the pair in `pairs` that `query` names ("btc/usdt", "BTCUSDT", "BTC-USDT")."""
    candidates = list(pairs)
    for pair in candidates:
        if pair.upper() == query.upper():
            return pair
    wanted = _pair_key(query)
    matches = [pair for pair in candidates if _pair_key(pair) == wanted]
    return matches[0] if matches else None


# -- Alert templates -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """A notification ready to send: HTML text, a category, and how it coalesces.

    Alerts with the same `key` (the text when empty) merge while they wait in the queue.
    """

    text: str
    category: str = "info"
    key: str = ""

    @property
    def coalesce_key(self) -> str:
        """Return the key identical alerts share."""
        return self.key or self.text


def text_alert(text: str, *, category: str = "info") -> Alert:
    """Return an alert for free-form plain text (escaped and redacted)."""
    return Alert(esc(text), category)


def anomaly_alert(anomaly: Anomaly, paused_until: int | None) -> Alert:
    """Return the alert for a market-data anomaly and the entry pause it set on the pair."""
    until = f" until {_when(paused_until)}" if paused_until is not None else ""
    lines = [
        f"⚠️ <b>Anomaly on {esc(anomaly.pair)}</b>: {esc(anomaly.kind)} (score {anomaly.score:.1f})",
        esc(anomaly.detail),
        f"entries paused{until}; exits and stops keep working",
    ]
    return Alert("\n".join(line for line in lines if line), "anomaly")


def trade_opened(position: Position, *, reason: str = "") -> Alert:
    """Return the alert for a new position."""
    lines = [
        f"🟢 <b>Opened {esc(position.side)} {esc(position.pair)}</b>",
        f"qty {fmt_price(position.qty)} @ {fmt_price(position.entry_price)}",
    ]
    if position.stop_price is not None or position.take_profit is not None:
        lines.append(
            f"stop {fmt_price(position.stop_price)} · take-profit {fmt_price(position.take_profit)}"
        )
    if reason:
        lines.append(f"reason: {esc(reason)}")
    return Alert("\n".join(lines), "trade_opened")


def trade_closed(trade: ClosedTrade) -> Alert:
    """Return the alert for a closed round trip, with its PnL."""
    cost = trade.entry_price * trade.qty
    pnl_pct = trade.pnl / cost if cost else None
    icon = "💰" if trade.pnl > 0 else "🔻"
    lines = [
        f"{icon} <b>Closed {esc(trade.side)} {esc(trade.pair)}</b>",
        f"{fmt_price(trade.entry_price)} → {fmt_price(trade.exit_price)}"
        f" · qty {fmt_price(trade.qty)}",
        f"PnL <b>{fmt_number(trade.pnl, sign=True)}</b> ({_pct(pnl_pct)})"
        f" · fee {fmt_number(trade.fee, 4)}",
        f"held {_duration(trade.exit_ts - trade.entry_ts)}",
    ]
    if trade.reason:
        lines.append(f"reason: {esc(trade.reason)}")
    return Alert("\n".join(lines), "trade_closed")


def stop_hit(position: Position, *, fill_price: Decimal | float, pnl: Decimal | float) -> Alert:
    """Return the alert for a protective stop that filled."""
    lines = [
        f"🛑 <b>Stop hit {esc(position.side)} {esc(position.pair)}</b>",
        f"stop {fmt_price(position.stop_price)} filled @ {fmt_price(fill_price)} · "
        f"qty {fmt_price(position.qty)}",
        f"PnL <b>{fmt_number(pnl, sign=True)}</b>",
    ]
    return Alert("\n".join(lines), "stop_hit")


def order_filled(fill: Fill) -> Alert:
    """Return the alert for one execution."""
    text = (
        f"✅ <b>Filled {esc(fill.side)} {esc(fill.pair)}</b>\n"
        f"{fmt_price(fill.qty)} @ {fmt_price(fill.price)} · fee {fmt_price(fill.fee)} "
        f"{esc(fill.fee_currency)} ({esc(fill.liquidity)})"
    )
    return Alert(text, "order_filled")


def order_rejected(intent: OrderIntent, reason: str) -> Alert:
    """Return the alert for an order refused by market rules or the exchange."""
    text = (
        f"🚫 <b>Rejected {esc(intent.side)} {esc(intent.pair)}</b>\n"
        f"qty {fmt_price(intent.qty)} {esc(intent.type)}"
        + (f" @ {fmt_price(intent.price)}" if intent.price is not None else "")
        + f"\nreason: {esc(reason)}"
    )
    # Repeats of the same refusal on the same pair are one alert with a count.
    return Alert(text, "order_rejected", key=f"rejected:{intent.pair}:{intent.side}:{reason}")


def circuit_breaker(
    guard: str,
    *,
    value: float,
    limit: float,
    state: TradingState | str,
    until_ts: int | None = None,
    percent: bool = True,
    detail: str = "",
) -> Alert:
    """Return the alert for a tripped circuit breaker, with the numbers that tripped it."""
    spec = ".2%" if percent else ".6g"
    lines = [
        f"⛔ <b>Circuit breaker: {esc(guard)}</b>",
        f"value {format(value, spec)} ≥ limit {format(limit, spec)}",
        f"trading → <b>{esc(state)}</b>"
        + (f" until {_when(until_ts)}" if until_ts is not None else ""),
    ]
    if detail:
        lines.append(esc(detail))
    return Alert("\n".join(lines), "circuit_breaker")


def error_alert(error: BaseException | str, *, component: str = "") -> Alert:
    """Return the alert for an error; repeats of the same kind coalesce into one with a count."""
    kind = type(error).__name__ if isinstance(error, BaseException) else "error"
    message = error.message if isinstance(error, BotError) else str(error)
    if isinstance(error, BotError):
        component = component or (error.component or "")
    where = f" in {esc(component)}" if component else ""
    body = esc(message)[:1000]
    text = f"⚠️ <b>{esc(kind)}</b>{where}\n{body}"
    return Alert(text, "error", key=f"error:{component}:{kind}")


def daily_summary(
    day_ts: int,
    trades: Sequence[ClosedTrade],
    *,
    equity: float,
    equity_start: float | None = None,
) -> Alert:
    """Return the end-of-day summary: trades, PnL, win rate, equity change."""
    pnl = sum(t.pnl for t in trades)
    wins = sum(1 for t in trades if t.pnl > 0)
    lines = [
        f"📅 <b>Daily summary {ms_to_datetime(day_ts).date().isoformat()}</b>",
        f"trades {len(trades)} · wins {wins} · losses {len(trades) - wins}",
        f"PnL <b>{fmt_number(pnl, sign=True)}</b>"
        f" · fees {fmt_number(sum(t.fee for t in trades), 4)}",
    ]
    if equity_start:
        lines.append(
            f"equity {fmt_number(equity_start)} → {fmt_number(equity)} "
            f"({_pct((equity - equity_start) / equity_start)})"
        )
    else:
        lines.append(f"equity {fmt_number(equity)}")
    if trades:
        best = max(trades, key=lambda t: t.pnl)
        worst = min(trades, key=lambda t: t.pnl)
        lines.append(
            f"best {esc(best.pair)} {fmt_number(best.pnl, sign=True)} · "
            f"worst {esc(worst.pair)} {fmt_number(worst.pnl, sign=True)}"
        )
    return Alert("\n".join(lines), "daily_summary")


def allocation_changed(event: AllocationChanged) -> Alert:
    """Return the alert for a reallocation: each sleeve's share before and after, and why."""
    lines = ["⚖️ <b>Capital reallocated</b> (by skill ranking)"]
    for sleeve in event.sleeves:
        why = (
            "probation"
            if sleeve.probation
            else ("unranked" if sleeve.lcb is None else f"lcb {sleeve.lcb:+.2f}")
        )
        lines.append(
            f"{esc(sleeve.name)}: {sleeve.before:.1%} → <b>{sleeve.after:.1%}</b>"
            f" · sleeve {fmt_number(sleeve.equity)} · {why}"
        )
    if event.reserve > 0:
        lines.append(f"{event.reserve:.1%} unallocated: the caps hold less than the account")
    elif not event.feasible:
        lines.append("the floors could not all hold: scaled down to fit")
    return Alert("\n".join(lines), "allocation", key=f"allocation-{event.ts}")


def reconciliation_report(report: str, *, ok: bool = True) -> Alert:
    """Return the alert carrying a reconciliation report (free-form, escaped and redacted)."""
    icon = "🔄" if ok else "❗"
    return Alert(f"{icon} <b>Reconciliation</b>\n{esc(report.strip())}", "reconciliation")


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def model_promoted(event: ModelPromoted) -> Alert:
    """Return the alert for a model version that became champion."""
    lines = [
        f"🧠 <b>Model promoted</b> {esc(event.name)}",
        f"champion {esc(event.version)} (was {esc(event.previous or 'none')})",
        f"score {_score(event.score)} vs {_score(event.champion_score)} · {esc(event.reason)}",
    ]
    return Alert("\n".join(lines), "model")


def model_rejected(event: ModelRejected) -> Alert:
    """Return the alert for a challenger that was not promoted."""
    lines = [
        f"🧠 <b>Challenger rejected</b> {esc(event.name)}",
        f"{esc(event.version)} stays out; champion {esc(event.champion or 'none')}",
        f"score {_score(event.score)} vs {_score(event.champion_score)} · {esc(event.reason)}",
    ]
    return Alert("\n".join(lines), "model")


# -- Events to alerts ------------------------------------------------------------------------


def render_event(event: Event) -> Alert:
    """Return the alert the operator gets for an event from the alert bus.

    One case per event type; mypy's exhaustiveness check (`assert_never`) fails the build when
    an event type has no template here.
    """
    match event:
        case TradeClosed():
            return trade_closed(event.trade)
        case TradeOpened():
            return order_filled(event.fill)
        case TradingStateChanged():
            return circuit_breaker(
                event.trigger or event.reason or "risk",
                value=float(event.drawdown or event.day_loss or 0.0),
                limit=float(event.limit or 0.0),
                state=event.to_state,
                until_ts=event.resume_at,
                detail=event.reason,
            )
        case RiskReset():
            latched = ", ".join(event.latched) or "none"
            return text_alert(
                f"risk reset by {event.by}: {event.before} -> {event.after}"
                f" (latched before: {latched})",
                category="risk",
            )
        case ErrorRaised():
            return error_alert(event.message, component=event.pair or "")
        case OrderRefused() | StopHit() | PositionLiquidated():
            return _order_event(event)
        case AnomalyDetected():
            return anomaly_alert(event.anomaly, event.paused_until)
        case ModelPromoted() | ModelRejected():
            return _model_event(event)
        case AllocationChanged():
            return allocation_changed(event)
        case _:
            assert_never(event)


def _order_event(event: OrderRefused | StopHit | PositionLiquidated) -> Alert:
    if isinstance(event, PositionLiquidated):
        return position_liquidated(event)
    if isinstance(event, OrderRefused):
        return text_alert(f"order rejected on {event.pair}: {event.reason}", category="rejected")
    return text_alert(f"stop hit on {event.pair} at {event.price}", category="stop")


_CLOSED_BY: Final = {
    FillKind.LIQUIDATION: "liquidated",
    FillKind.ADL: "auto-deleveraged",
    FillKind.TRADE: "closed on the exchange",
    FillKind.OTHER: "closed on the exchange",
}


def position_liquidated(event: PositionLiquidated) -> Alert:
    """Return the alert for a position the exchange closed (liquidation, ADL, by hand).

    With the round trip it ended (`event.trade`), this one message also stands for the
    trade's close: the P&L as a fraction of the entry, the entry and exit prices, the
    round trip's fees (entry and exit) and how long it was held.
    """
    fill, trade = event.fill, event.trade
    rest = "position closed" if event.remaining == 0 else f"{fmt_price(event.remaining)} still held"
    share = ""
    if trade is not None and trade.entry_price * trade.qty:
        share = f" ({_pct(trade.pnl / (trade.entry_price * trade.qty))})"
    lines = [
        f"🚨 <b>{esc(fill.pair)} {_CLOSED_BY[event.kind]}</b> by the exchange",
        f"{esc(fill.side)} {fmt_price(fill.qty)} @ {fmt_price(fill.price)}"
        f" · fee {fmt_number(fill.fee, 4)} {esc(fill.fee_currency)}",
        f"P&amp;L <b>{fmt_number(event.pnl, sign=True)}</b>{share} · {rest}",
    ]
    if trade is not None:
        lines.append(
            f"{esc(trade.side)} {fmt_price(trade.qty)}: {fmt_price(trade.entry_price)} →"
            f" {fmt_price(trade.exit_price)} · fees {fmt_number(trade.fee, 4)}"
            f" · held {_duration(trade.exit_ts - trade.entry_ts)}"
        )
    return Alert("\n".join(lines), "liquidation", f"liquidation-{fill.fill_id}")


def _model_event(event: ModelPromoted | ModelRejected) -> Alert:
    return model_promoted(event) if isinstance(event, ModelPromoted) else model_rejected(event)


# -- Command views (pure functions of a snapshot) --------------------------------------------


def render_status(snap: Snapshot) -> str:
    """Return the /status reply."""
    folio = snap.portfolio
    lines = [
        f"<b>Kestrel</b> · {esc(snap.mode)} · {esc(snap.state)} · trading "
        f"{esc(snap.trading_state)}",
        f"equity <b>{fmt_number(folio.equity)}</b> · cash {fmt_number(folio.cash)}",
        f"realised {fmt_number(folio.realised_pnl, sign=True)} · fees {fmt_number(folio.fees)}",
        f"positions {len(folio.positions)} · open orders {len(snap.open_orders)} · "
        f"pairs {len(snap.pairs)}",
    ]
    for name, sleeve in snap.allocation.items():  # multi-strategy: each capital sleeve
        lines.append(
            f"sleeve {esc(name)} {sleeve['weight']:.1%} · {fmt_number(sleeve['sleeve_equity'])}"
            + (" · probation" if sleeve.get("probation") else "")
        )
    if snap.late_streams:
        lines.append(_late_line(snap))
    if snap.errors:
        lines.append(f"last error: {esc(snap.errors[-1])[:300]}")
    lines.append(f"<i>{_when(snap.ts)}</i>")
    return "\n".join(lines)


def render_positions(snap: Snapshot) -> str:
    """Return the /positions reply."""
    positions = snap.portfolio.positions
    if not positions:
        return "No open positions."
    lines = [f"<b>{len(positions)} open position{'s' if len(positions) != 1 else ''}</b>"]
    for p in sorted(positions, key=lambda p: p.pair):
        cost = p.entry_price * p.qty
        pnl_pct = float(p.unrealised_pnl / cost) if cost else None
        lines.append(
            f"<b>{esc(p.pair)}</b> {esc(p.side)} {fmt_price(p.qty)} @ {fmt_price(p.entry_price)}"
            f" → {fmt_price(p.mark_price)}"
        )
        lines.append(
            f"  uPnL {fmt_number(p.unrealised_pnl, sign=True)} ({_pct(pnl_pct)}) · stop "
            f"{fmt_price(p.stop_price)} · open {_duration(snap.ts - p.ts_opened)}"
        )
    return "\n".join(lines)


def render_balance(snap: Snapshot) -> str:
    """Return the /balance reply."""
    folio = snap.portfolio
    in_positions = sum((p.notional for p in folio.positions), Decimal(0))
    unrealised = sum((p.unrealised_pnl for p in folio.positions), Decimal(0))
    lines = [
        "<b>Balance</b>",
        f"equity <b>{fmt_number(folio.equity)}</b>",
        f"cash {fmt_number(folio.cash)} · in positions {fmt_number(in_positions)}",
        f"unrealised {fmt_number(unrealised, sign=True)} · realised "
        f"{fmt_number(folio.realised_pnl, sign=True)} · fees {fmt_number(folio.fees)}",
    ]
    if len(snap.equity_curve) >= 2:
        first, last = snap.equity_curve[0][1], snap.equity_curve[-1][1]
        change = (last - first) / first if first else None
        lines.append(f"since {_when(snap.equity_curve[0][0])}: {_pct(change)}")
    return "\n".join(lines)


def render_profit(snap: Snapshot) -> str:
    """Return the /profit reply: closed-trade statistics."""
    trades = snap.recent_trades
    if not trades:
        return (
            f"No closed trades yet. Realised {fmt_number(snap.portfolio.realised_pnl, sign=True)}."
        )
    pnls = [t.pnl for t in trades]
    wins = [x for x in pnls if x > 0]
    losses = [x for x in pnls if x <= 0]
    gross_loss = -sum(losses)
    factor = f"{sum(wins) / gross_loss:.2f}" if gross_loss > 0 else "∞"
    best = max(trades, key=lambda t: t.pnl)
    worst = min(trades, key=lambda t: t.pnl)
    return "\n".join(
        [
            "<b>Profit</b>",
            f"trades {len(trades)} · wins {len(wins)} · losses {len(losses)} · "
            f"win rate {len(wins) / len(trades):.0%}",
            f"PnL <b>{fmt_number(sum(pnls), sign=True)}</b>"
            f" · avg {fmt_number(sum(pnls) / len(pnls), sign=True)} · profit factor {factor}",
            f"fees {fmt_number(sum(t.fee for t in trades), 4)}",
            f"best {esc(best.pair)} {fmt_number(best.pnl, sign=True)} · worst {esc(worst.pair)} "
            f"{fmt_number(worst.pnl, sign=True)}",
        ]
    )


def render_daily(snap: Snapshot, days: int = 7) -> str:
    """Return the /daily reply: closed-trade PnL per UTC day, newest first."""
    day_ms = 86_400_000
    today = snap.ts - snap.ts % day_ms
    per_day: dict[int, list[ClosedTrade]] = {}
    for trade in snap.recent_trades:
        per_day.setdefault(trade.exit_ts - trade.exit_ts % day_ms, []).append(trade)
    lines = [f"<b>Daily PnL, last {days} day{'s' if days != 1 else ''}</b>"]
    for back in range(days):
        day = today - back * day_ms
        trades = per_day.get(day, [])
        date = ms_to_datetime(day).date().isoformat()
        lines.append(
            f"{date}  {fmt_number(sum(t.pnl for t in trades), sign=True)}  ({len(trades)} trades)"
        )
    return "\n".join(lines)


def render_pairs(snap: Snapshot) -> str:
    """Return the /pairs reply (● marks pairs with a position)."""
    if not snap.pairs:
        return "No pairs are traded."
    held = {p.pair for p in snap.portfolio.positions}
    marks = [f"{'●' if pair in held else '○'} {esc(pair)}" for pair in snap.pairs]
    return f"<b>{len(snap.pairs)} pairs</b>\n" + "\n".join(marks)


def render_risk(snap: Snapshot) -> str:
    """Return the /risk reply: trading state and the risk manager's numbers."""
    lines = [f"<b>Risk</b> · trading {esc(snap.trading_state)} · bot {esc(snap.state)}"]
    lines += [f"{esc(key)}: {_value(value)}" for key, value in sorted(snap.risk.items())]
    if snap.rate_limit_budget:
        budget = ", ".join(f"{esc(k)} {v:.0%}" for k, v in sorted(snap.rate_limit_budget.items()))
        lines.append(f"rate-limit budget: {budget}")
    if snap.late_streams:
        lines.append(_late_line(snap))
    return "\n".join(lines)


def _late_line(snap: Snapshot) -> str:
    pairs = ", ".join(esc(p) for p in snap.late_streams)
    return f"late streams (decided alone, not waited for): {pairs}"


def render_scores(snap: Snapshot) -> str:
    """Return the /score reply: each strategy's score, best first by its skill bound.

    The score is `reward_system`'s `Score.total`, as in the snapshot; the lower bound
    (lcb) of the shrunk annualised daily Sharpe is what the ranking orders by.
    """
    if snap.ranking:
        return "<b>Scores</b> (ranked by skill lower bound)\n" + "\n".join(
            f"{i}. {esc(r.name)} {r.total:.3f} · lcb {r.lcb:+.2f} · {r.trades} trades"
            for i, r in enumerate(snap.ranking[:20], 1)
        )
    if not snap.scores:
        return "No scores yet."
    ranked = sorted(snap.scores.items(), key=lambda kv: kv[1], reverse=True)[:20]
    return "<b>Scores</b>\n" + "\n".join(
        f"{i}. {esc(name)} {score:.4g}" for i, (name, score) in enumerate(ranked, 1)
    )


def render_model(snap: Snapshot) -> str:
    """Return the /model reply: the models in use, their registry state and metrics.

    A flat `snap.model` is one model's figures; a nested one holds a section per pair
    (`self_learning.SafePredictor.describe`) with its registry aliases.
    """
    if not snap.model:
        return "No model loaded."
    lines = ["<b>Model</b>"]
    for key, value in sorted(snap.model.items()):
        if isinstance(value, Mapping):
            lines += _model_section(str(key), value)
        else:
            lines.append(f"{esc(key)}: {_value(value)}")
    return "\n".join(lines)


_MODEL_FIGURES: Final = ("auc", "accuracy", "brier", "base_rate", "train_rows", "test_rows")


def _model_section(pair: str, info: Mapping[str, Any]) -> list[str]:
    registry = info.get("registry") or {}
    loaded = info.get("version") if info.get("loaded") else None
    lines = [f"<b>{esc(pair)}</b> · {esc(registry.get('name', info.get('name', '')))}"]
    lines.append(
        f"champion {esc(registry.get('champion') or 'none')}"
        f" · challenger {esc(registry.get('challenger') or 'none')}"
    )
    previous = registry.get("previous") or []
    lines.append(
        f"versions {_value(registry.get('versions', 0))}"
        f" · rollback to {esc(previous[-1] if previous else 'none')}"
        f" · in use {esc(loaded or 'none')}"
    )
    for alias in ("champion", "challenger"):
        figures = registry.get(f"{alias}_validation") or {}
        if figures:
            lines += _validation_lines(alias, figures)
    metrics = info.get("metrics") or {}
    figures = [f"{name} {_value(metrics[name])}" for name in _MODEL_FIGURES if name in metrics]
    if figures:
        lines.append("out of sample: " + ", ".join(figures))
    if info.get("failures"):
        lines.append(f"inference failures: {_value(info['failures'])}")
    return lines


_FOLD_KEY: Final = re.compile(r"fold(\d+)_(\w+)")
# Shown on the fold lines or as the verdict, not among the version's other figures.
_NOT_LISTED: Final = frozenset({"folds", "passed"})


def _validation_lines(alias: str, figures: Mapping[str, Any]) -> list[str]:
    # A version's walk-forward validation (`model_training.Validation.figures`): its overall
    # figures on one line with the gate's verdict, then one compact line per fold.
    folds: dict[int, dict[str, Any]] = {}
    overall: dict[str, Any] = {}
    for key, value in figures.items():
        match = _FOLD_KEY.fullmatch(key)
        if match:
            folds.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key not in _NOT_LISTED:
            overall[key] = value
    shown = ", ".join(f"{esc(k)} {_value(v)}" for k, v in sorted(overall.items()))
    passed = figures.get("passed")
    verdict = "" if passed is None else f" · gate {'passed' if passed else 'failed'}"
    lines = [f"{alias} validation: {shown}{verdict}"]
    for index, fold in sorted(folds.items()):
        lines.append(
            f"fold {index}: {_count(fold.get('bars'))} bars, score {_signed(fold.get('score'))}, "
            f"DSR {_fixed(fold.get('deflated_sharpe'))}"
            + (
                f", vs champion {_signed(fold['champion_score'])}"
                if fold.get("champion_score") is not None
                else ""
            )
        )
    return lines


def _count(value: Any) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):+.2f}"


def _fixed(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def render_why(snap: Snapshot, query: str, patterns: Sequence[Mapping[str, Any]] = ()) -> str:
    """Return the /why reply: the pair's last decision and its latest candle patterns.

    The decision: signal, features, risk verdict, order or veto. `patterns` are the
    summary items of `data_manager.latest_patterns` (newest first).
    """
    pair = find_pair(query, snap.last_decisions)
    if pair is None:
        known = ", ".join(esc(p) for p in sorted(snap.last_decisions)) or "none"
        return f"No decision recorded for {esc(query)}. Known: {known}."
    decision: Decision = snap.last_decisions[pair]
    lines = [
        f"<b>Why {esc(pair)}</b> · {_when(decision.ts)}",
        f"verdict: <b>{esc(decision.verdict)}</b>",
    ]
    signal = decision.signal
    if signal is None:
        lines.append("signal: none")
    else:
        strategy = f" [{esc(signal.strategy)}]" if signal.strategy else ""
        lines.append(
            f"signal: {esc(signal.side)} strength {signal.strength:.2f} @ {fmt_price(signal.price)}"
            f"{strategy}" + (" (exit only)" if signal.exit_only else "")
        )
        lines.append(f"reason: {esc(signal.reason)}")
    features = decision.features or (signal.features if signal else {})
    if features:
        shown = sorted(features.items())[:15]
        lines.append("features: " + ", ".join(f"{esc(k)}={v:.4g}" for k, v in shown))
    if decision.intent is not None:
        intent = decision.intent
        lines.append(
            f"order: {esc(intent.side)} {fmt_price(intent.qty)} {esc(intent.type)}"
            f" stop {fmt_price(intent.stop_loss)} tp {fmt_price(intent.take_profit)}"
        )
    if decision.veto is not None:
        veto = decision.veto
        until = f" until {_when(veto.until)}" if veto.until is not None else ""
        guard = f" [{esc(veto.guard)}]" if veto.guard else ""
        lines.append(f"veto{guard}: {esc(veto.reason)}{until}")
    anomaly = snap.anomalies.get(pair)
    if anomaly is not None:
        paused = " · entries paused" if anomaly.get("paused") else ""
        lines.append(f"anomaly: {esc(anomaly['kind'])} ({esc(anomaly['detail'])}){paused}")
    cluster = snap.patterns.get(pair)
    if cluster is not None:
        lines.append(f"pattern cluster: {esc(cluster.get('summary', ''))}")
    if patterns:
        found = [
            f"{esc(p['label'])} {_DIRECTION_MARK.get(p['direction'], '')}"
            f" ({_bars_ago(int(p['bars_ago']))})"
            for p in patterns[:8]
        ]
        more = f" +{len(patterns) - 8} more" if len(patterns) > 8 else ""
        lines.append("patterns: " + ", ".join(found) + more)
    return "\n".join(lines)


_DIRECTION_MARK: Final[dict[str, str]] = {"bullish": "▲", "bearish": "▼", "neutral": "·"}


def _bars_ago(n: int) -> str:
    return "last candle" if n == 0 else f"{n} bar{'s' if n > 1 else ''} ago"


COMMANDS: Final[dict[str, str]] = {
    "status": "bot state, equity, positions",
    "positions": "open positions with PnL",
    "balance": "cash, equity, PnL",
    "profit": "closed-trade statistics",
    "daily": "PnL per day (/daily 14)",
    "pairs": "pairs being traded",
    "risk": "risk state and limits",
    "score": "strategy scores",
    "model": "model in use",
    "why": "last decision on a pair (/why BTC/USDT)",
    "reconcile": "reconcile with the exchange",
    "pause": "stop opening positions (confirm)",
    "resume": "resume trading (confirm)",
    "stopbuy": "exits only (confirm)",
    "resetrisk": "lift latched circuit breakers (confirm, audited)",
    "forceexit": "close a position at market (/forceexit BTC/USDT|all, confirm)",
    "mode": "show or switch sim/live (/mode live, confirm)",
    "help": "this list",
}


def render_help() -> str:
    """Return the /help reply."""
    return "<b>Commands</b>\n" + "\n".join(
        f"/{name} — {esc(text)}" for name, text in COMMANDS.items()
    )
