"""Circuit breakers: the rules that watch equity and the trading-state ladder they drive.

`CircuitBreakers` holds the peak, the UTC day's starting equity and the losing streak, asks
each `BreakerRule` (`ReduceOnDrawdown`, `LossStreak`, `DailyLossLimit`, `MaxDrawdown`) for a
`Trip` on the `EquityBook`, latches the trips that must hold, and moves the trading state to
the most severe rung::

    normal -> reduced (smaller size) -> reducing (exits only) -> halted -> flatten

`risk_management.RiskManager` owns one and re-exports these names; the ladder, the rules and
how each rung resumes are described in `risk_management`'s docstring.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Final, Protocol

import structlog

from config import RiskSettings
from models import ClosedTrade, EventSink, Signal, TradingState, TradingStateChanged, Veto


log = structlog.get_logger(__name__)

DAY_MS: Final = 86_400_000
ZERO: Final = Decimal(0)
_SEVERITY: Final[dict[TradingState, int]] = {state: i for i, state in enumerate(TradingState)}
_SAFETY_MARGIN: Final = Decimal("1.000000001")
HISTORY_LIMIT: Final = 5_000  # rung changes kept for reports (a run rarely has dozens)


def _dec(value: float | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


@dataclass(frozen=True, slots=True)
class EquityBook:
    """What the breaker rules look at: equity including unrealised PnL and its history.

    `drawdown` (the fall from the peak as a fraction of it) and `day_loss` (the fall from
    the UTC day's first equity as a fraction of it) are derived once, 0 when equity is up.
    """

    now: int
    equity: Decimal
    peak_equity: Decimal
    day_start_equity: Decimal
    consecutive_losses: int = 0
    last_loss_ts: int | None = None
    drawdown: float = field(init=False, default=0.0)
    day_loss: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        # Derived once: every rule reads them on every candle.
        if self.peak_equity > self.equity:
            object.__setattr__(
                self, "drawdown", float((self.peak_equity - self.equity) / self.peak_equity)
            )
        if self.day_start_equity > self.equity:
            loss = (self.day_start_equity - self.equity) / self.day_start_equity
            object.__setattr__(self, "day_loss", float(loss))


@dataclass(frozen=True, slots=True)
class Trip:
    """A breaker that tripped: the rung it asks for, why, and when it lifts.

    A latched trip holds after its condition clears, until `until` (ms UTC) or, when
    `until` is None, a manual resume. An unlatched trip lasts while its condition holds.
    """

    rule: str
    state: TradingState
    reason: str
    numbers: dict[str, float | int | None] = field(default_factory=dict)
    latched: bool = False
    until: int | None = None


class BreakerRule(Protocol):
    """A circuit-breaker rule: look at the equity book, maybe trip."""

    @property
    def name(self) -> str:
        """Return the rule's name (the trigger reported when it trips)."""
        ...

    def check(self, book: EquityBook) -> Trip | None:
        """Return a Trip when the rule's limit is reached, else None."""
        ...


def _drawdown_trip(
    book: EquityBook, name: str, limit: float, state: TradingState, suffix: str = ""
) -> Trip | None:
    # The peak-to-trough rules differ only in their limit and rung; a flatten latches.
    dd = book.drawdown
    if dd < limit:
        return None
    return Trip(
        name,
        state,
        f"drawdown {dd:.2%} >= {limit:.2%} (peak {float(book.peak_equity):.2f},"
        f" equity {float(book.equity):.2f}){suffix}",
        {"drawdown": dd, "limit": limit},
        latched=state is TradingState.FLATTEN,
    )


@dataclass(frozen=True, slots=True)
class ReduceOnDrawdown:
    """Trade smaller while the drawdown from the peak is at or over `threshold`."""

    threshold: float
    name: str = "reduce_size"

    def check(self, book: EquityBook) -> Trip | None:
        """Return a `reduced` trip while the drawdown is at or over the threshold."""
        return _drawdown_trip(book, self.name, self.threshold, TradingState.REDUCED)


@dataclass(frozen=True, slots=True)
class MaxDrawdown:
    """Flatten everything when the peak-to-trough drawdown reaches `limit`; manual resume."""

    limit: float
    name: str = "peak_to_trough"

    def check(self, book: EquityBook) -> Trip | None:
        """Return a latched `flatten` trip at the limit."""
        return _drawdown_trip(
            book, self.name, self.limit, TradingState.FLATTEN, "; manual resume required"
        )


@dataclass(frozen=True, slots=True)
class DailyLossLimit:
    """Halt for the rest of the UTC day when the day's loss reaches `limit`."""

    limit: float
    auto_resume: bool = True
    name: str = "daily_loss"

    def check(self, book: EquityBook) -> Trip | None:
        """Return a `halted` trip latched until the next UTC day (or a manual resume)."""
        loss = book.day_loss
        if loss < self.limit:
            return None
        until = (book.now // DAY_MS + 1) * DAY_MS if self.auto_resume else None
        return Trip(
            self.name,
            TradingState.HALTED,
            f"daily loss {loss:.2%} >= {self.limit:.2%} (day start"
            f" {float(book.day_start_equity):.2f}, equity {float(book.equity):.2f})",
            {"day_loss": loss, "limit": self.limit},
            latched=True,
            until=until,
        )


@dataclass(frozen=True, slots=True)
class LossStreak:
    """Allow exits only for a cooldown after `limit` losing trades in a row."""

    limit: int
    cooldown_ms: int
    auto_resume: bool = True
    name: str = "loss_streak"

    def check(self, book: EquityBook) -> Trip | None:
        """Return a `reducing` trip latched until the cooldown ends (or a manual resume)."""
        if book.consecutive_losses < self.limit:
            return None
        last = book.last_loss_ts if book.last_loss_ts is not None else book.now
        until = last + self.cooldown_ms if self.auto_resume else None
        return Trip(
            self.name,
            TradingState.REDUCING,
            f"{book.consecutive_losses} consecutive losses >= {self.limit};"
            f" cooldown {self.cooldown_ms // 60_000} min",
            {"consecutive_losses": book.consecutive_losses, "limit": self.limit},
            latched=True,
            until=until,
        )


def default_rules(settings: RiskSettings) -> list[BreakerRule]:
    """Return the breaker rules `settings` configures, mildest first."""
    return [
        ReduceOnDrawdown(settings.reduce_size_drawdown),
        LossStreak(
            settings.max_consecutive_losses,
            settings.cooldown_minutes * 60_000,
            settings.auto_resume,
        ),
        DailyLossLimit(settings.max_daily_loss, settings.auto_resume),
        MaxDrawdown(settings.max_drawdown),
    ]


class CircuitBreakers:
    """Drawdown and loss-streak breakers on equity including unrealised PnL.

    Call `update(now, equity)` on every candle and `on_trade_closed` after each round trip;
    `state` is the resulting rung of the ladder. Each change of rung is logged once as
    `state_changed machine=trading_state`, kept in `last_trigger` (and appended to `history`,
    the run's changes oldest first) and sent to `alert` as a `TradingStateChanged` with the
    numbers that caused it.
    """

    def __init__(
        self,
        settings: RiskSettings,
        *,
        alert: EventSink | None = None,
        rules: Sequence[BreakerRule] | None = None,
    ) -> None:
        self.settings = settings
        self.rules: list[BreakerRule] = (
            list(rules) if rules is not None else default_rules(settings)
        )
        self.alert = alert
        self.state = TradingState.NORMAL
        self.peak_equity = ZERO
        self.day_start_equity = ZERO
        self.day = -1
        self.equity: Decimal | None = None
        self.now = 0
        self.consecutive_losses = 0
        self.last_loss_ts: int | None = None
        self.manual: TradingState | None = None
        self.latched: dict[str, Trip] = {}
        self.cause: Trip | None = None
        self.last_trigger: dict[str, Any] = {}
        # Every change of rung this run, oldest first (each a copy of `last_trigger`): the
        # backtest report lists the trips and shades the spans they held.
        self.history: list[dict[str, Any]] = []
        # Fast path for the per-candle call (default rules only): after each evaluation,
        # `_band` holds the equity range (low, high) and the time before which no rule can
        # change its verdict; the margin keeps clear of the rules' float rounding.
        self._fast = rules is None
        self._keep = {
            "reduce_size": (True, 1 - _dec(settings.reduce_size_drawdown)),
            "peak_to_trough": (True, 1 - _dec(settings.max_drawdown)),
            "daily_loss": (False, 1 - _dec(settings.max_daily_loss)),
        }
        self._band: tuple[Decimal | None, Decimal | None, int | None] | None = None
        self._low_peak = self._keep["reduce_size"][1] * _SAFETY_MARGIN
        self._low_day = self._keep["daily_loss"][1] * _SAFETY_MARGIN

    @property
    def cooldown_until(self) -> int | None:
        """Return when the loss-streak cooldown ends (None when none is running)."""
        for trip in self.latched.values():
            if trip.state is TradingState.REDUCING:
                return trip.until
        return None

    @property
    def resume_at(self) -> int | None:
        """Return when the current rung lifts by itself (None: manual, or nothing to lift)."""
        return self.cause.until if self.cause is not None else None

    @property
    def flatten_holds(self) -> bool:
        """Return True while a flatten only an operator lifts holds (every update says so)."""
        return self.manual is TradingState.FLATTEN or any(
            trip.state is TradingState.FLATTEN and trip.until is None
            for trip in self.latched.values()
        )

    def book(self, now: int | None = None) -> EquityBook:
        """Return the equity book the rules see."""
        return EquityBook(
            now=self.now if now is None else now,
            equity=self.equity if self.equity is not None else ZERO,
            peak_equity=self.peak_equity,
            day_start_equity=self.day_start_equity,
            consecutive_losses=self.consecutive_losses,
            last_loss_ts=self.last_loss_ts,
        )

    def update(self, now: int, equity: Decimal) -> TradingState:
        """Recompute the trading state from equity (including unrealised PnL); return it."""
        day = now // DAY_MS
        if day != self.day:
            self.day = day
            self.day_start_equity = equity
            self._band = None
        if equity > self.peak_equity:
            self.peak_equity = equity
            self._band = None
            if self._fast and self.state is TradingState.NORMAL and self.cause is None:
                # At a new peak no default rule trips: only the band moves up.
                self.equity, self.now = equity, now
                floor = max(equity * self._low_peak, self.day_start_equity * self._low_day)
                self._band = (floor, None, None)
                return self.state
        self.equity = equity
        if self._band is not None and _in_band(self._band, equity, now):
            self.now = now
            return self.state
        return self._recompute(now)

    def update_flat(
        self, times: Sequence[int], equity: Decimal, stop_on: TradingState | None = None
    ) -> int:
        """Feed the same `equity` at each of `times` (ascending), as `update` at each.

        Returns how many were fed: all, or up to and including the first whose state is
        `stop_on`. Between a full evaluation and the next day start or the band's expiry,
        an unchanged equity inside the band leaves the verdict as it is (see `update`), so
        those times only move the clock, skipped over in one step.
        """
        k, count = 0, len(times)
        while k < count:
            if self.update(times[k], equity) is stop_on:
                return k + 1
            k += 1
            band = self._band
            if band is None or k >= count:
                continue
            low, high, expires = band
            if (low is not None and equity <= low) or (high is not None and equity >= high):
                continue
            limit = (
                (self.day + 1) * DAY_MS
                if expires is None
                else min((self.day + 1) * DAY_MS, expires)
            )
            end = bisect.bisect_left(times, limit, lo=k)
            if end > k:
                self.now = times[end - 1]
                k = end
        return count

    def on_trade_closed(self, trade: ClosedTrade, now: int) -> TradingState:
        """Count the losing streak and re-evaluate at once (a streak blocks the next entry)."""
        if trade.pnl < 0:
            self.consecutive_losses += 1
            self.last_loss_ts = now
        else:
            self.consecutive_losses = 0
        return _reevaluate(self, max(now, self.now))

    def set_manual(self, state: TradingState | None) -> TradingState:
        """Force a rung (kill switch, stop-buy) or, with None, resume (see `reset`)."""
        if state is None:
            return self.reset()
        self.manual = state
        return self._recompute(self.now)

    def clear_manual(self) -> TradingState:
        """Lift the manual rung only (/resume after /stopbuy); latched breakers stay."""
        if self.manual is None:
            return self.state
        log.info("manual_rung_cleared", manual=str(self.manual))
        self.manual = None
        return self._recompute(self.now)

    def reset(self) -> TradingState:
        """Resume manually: clear the manual rung and every latch, re-base peak and day."""
        log.info(
            "circuit_breakers_reset",
            latched=sorted(self.latched),
            manual=str(self.manual) if self.manual else None,
        )
        self.manual = None
        self.latched.clear()
        self.consecutive_losses = 0
        self.last_loss_ts = None
        if self.equity is not None:
            self.peak_equity = self.equity
            self.day_start_equity = self.equity
        return self._recompute(self.now)

    # -- Persistence -------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Return what must survive a restart (a daily halt must not end with the process)."""
        return {
            "peak_equity": str(self.peak_equity),
            "day_start_equity": str(self.day_start_equity),
            "day": self.day,
            "equity": str(self.equity) if self.equity is not None else None,
            "now": self.now,
            "consecutive_losses": self.consecutive_losses,
            "last_loss_ts": self.last_loss_ts,
            "manual": str(self.manual) if self.manual is not None else None,
            "latched": [
                {
                    "rule": t.rule,
                    "state": str(t.state),
                    "reason": t.reason,
                    "numbers": dict(t.numbers),
                    "until": t.until,
                }
                for t in self.latched.values()
            ],
            "last_trigger": dict(self.last_trigger),
            "breaker_history": self.history[-20:],
        }

    def state_key(self) -> tuple[Any, ...]:
        """Return a cheap token of what `dump` keeps (the equity and clock aside).

        Two calls return equal tokens when nothing worth persisting changed in between,
        so a caller can persist on change without dumping on every candle.
        """
        return (
            self.peak_equity,
            self.day_start_equity,
            self.day,
            self.consecutive_losses,
            self.last_loss_ts,
            self.manual,
            tuple((name, trip.until) for name, trip in self.latched.items()),
            self.last_trigger.get("ts"),
            self.last_trigger.get("to"),
        )

    def restore(self, data: Mapping[str, Any], *, equity: Decimal | None = None) -> TradingState:
        """Load what `dump` returned; the rung it implies holds at once, without an alert.

        Args:
            data: what `dump` returned.
            equity: the equity of the account now, when it is not the account the state
                was saved from (a fresh paper account): the peak and the day's start are
                scaled by `equity` / the saved equity, so the drawdown and the day's loss
                carry over as fractions. None keeps them as saved (live: the same account).
        """
        self.peak_equity = Decimal(data["peak_equity"])
        self.day_start_equity = Decimal(data["day_start_equity"])
        self.day = int(data["day"])
        self.equity = Decimal(data["equity"]) if data.get("equity") is not None else None
        if equity is not None and self.equity is not None and self.equity > 0:
            scale = equity / self.equity
            self.peak_equity *= scale
            self.day_start_equity *= scale
            self.equity = equity
        self.now = int(data.get("now", 0))
        self.consecutive_losses = int(data["consecutive_losses"])
        self.last_loss_ts = data.get("last_loss_ts")
        manual = data.get("manual")
        self.manual = TradingState(manual) if manual else None
        self.latched = {
            t["rule"]: Trip(
                t["rule"],
                TradingState(t["state"]),
                t["reason"],
                dict(t.get("numbers", {})),
                latched=True,
                until=t.get("until"),
            )
            for t in data.get("latched", [])
        }
        self.last_trigger = dict(data.get("last_trigger", {}))
        # The rung changes of the run (reports and the web view read them) come back too.
        self.history = [dict(change) for change in data.get("breaker_history", ())]
        self._band = None
        self.cause = max(self._active(self.book()), key=lambda t: _SEVERITY[t.state], default=None)
        self.state = self.cause.state if self.cause is not None else TradingState.NORMAL
        log.info("risk_state_restored", state=str(self.state), latched=sorted(self.latched))
        return self.state

    def describe(self) -> dict[str, Any]:
        """Return the breakers' state for the UI and Telegram (JSON-able)."""
        book = self.book()
        tripped = {t.rule for t in self._active(book)}
        return {
            "state": str(self.state),
            "manual": str(self.manual) if self.manual is not None else None,
            "equity": float(book.equity),
            "peak_equity": float(self.peak_equity),
            "drawdown": book.drawdown,
            "day_start_equity": float(self.day_start_equity),
            "day_loss": book.day_loss,
            "consecutive_losses": self.consecutive_losses,
            "cooldown_until": self.cooldown_until,
            "resume_at": self.resume_at,
            "circuit_breakers": {
                rule.name: "open" if rule.name in tripped else "closed" for rule in self.rules
            },
            "latched": {
                name: {"state": str(t.state), "reason": t.reason, "until": t.until}
                for name, t in self.latched.items()
            },
            "limits": {
                "reduce_size_drawdown": self.settings.reduce_size_drawdown,
                "max_daily_loss": self.settings.max_daily_loss,
                "max_drawdown": self.settings.max_drawdown,
                "max_consecutive_losses": self.settings.max_consecutive_losses,
                "cooldown_minutes": self.settings.cooldown_minutes,
                "auto_resume": self.settings.auto_resume,
            },
            "last_trigger": dict(self.last_trigger),
            "breaker_history": self.history[-20:],
        }

    def _active(self, book: EquityBook, live: list[Trip] | None = None) -> list[Trip]:
        # Latched trips first, so on a tie of severity the older cause is reported.
        if live is None:
            live = [t for rule in self.rules if (t := rule.check(book)) is not None]
        trips = list(self.latched.values()) + [t for t in live if not t.latched]
        trips += [t for t in live if t.latched and t.rule not in self.latched]
        if self.manual is not None:
            trips.append(Trip("manual", self.manual, f"manual {self.manual}", latched=True))
        return trips

    def _recompute(self, now: int) -> TradingState:
        self.now = now
        for name, trip in list(self.latched.items()):
            if trip.until is not None and now >= trip.until:
                del self.latched[name]
                if trip.state is TradingState.REDUCING:
                    self.consecutive_losses = 0
                log.info("circuit_breaker_lifted", rule=name, until=trip.until, ts=now)
        book = self.book(now)
        live = [t for rule in self.rules if (t := rule.check(book)) is not None]
        for fresh in live:
            if not fresh.latched:
                continue
            held = self.latched.get(fresh.rule)
            # Keep the numbers that first tripped it; only a later lift time replaces it.
            if held is None:
                self.latched[fresh.rule] = fresh
            elif fresh.until is not None and held.until is not None and fresh.until > held.until:
                self.latched[fresh.rule] = replace(held, until=fresh.until)
        trips = self._active(book, live)
        cause = max(trips, key=lambda t: _SEVERITY[t.state], default=None)
        self._transition(now, cause, book)
        self._band = self._stable_band(live) if self._fast else None
        return self.state

    def _stable_band(self, live: list[Trip]) -> tuple[Decimal | None, Decimal | None, int | None]:
        # A rule that is not tripping stays so while equity is above its level; an unlatched
        # one that is tripping stays so while equity is below it; latched ones hold anyway.
        tripping = {t.rule for t in live}
        low: Decimal | None = None
        high: Decimal | None = None
        for name, (on_peak, keep) in self._keep.items():
            if name in self.latched:
                continue
            level = (self.peak_equity if on_peak else self.day_start_equity) * keep
            if name in tripping:
                bound = level / _SAFETY_MARGIN
                high = bound if high is None else min(high, bound)
            else:
                bound = level * _SAFETY_MARGIN
                low = bound if low is None else max(low, bound)
        untils = [t.until for t in self.latched.values() if t.until is not None]
        return low, high, min(untils) if untils else None

    def _transition(self, now: int, cause: Trip | None, book: EquityBook) -> None:
        new = cause.state if cause is not None else TradingState.NORMAL
        self.cause = cause
        if new is self.state:
            return
        old, self.state = self.state, new
        numbers: dict[str, Any] = {
            "equity": float(book.equity),
            "peak_equity": float(book.peak_equity),
            "drawdown": round(book.drawdown, 6),
            "day_start_equity": float(book.day_start_equity),
            "day_loss": round(book.day_loss, 6),
            "consecutive_losses": book.consecutive_losses,
        }
        if cause is not None:
            numbers.update(cause.numbers)
        self.last_trigger = {
            "ts": now,
            "from": str(old),
            "to": str(new),
            "trigger": cause.rule if cause is not None else "recovered",
            "reason": cause.reason if cause is not None else "every breaker closed",
            "resume_at": cause.until if cause is not None else None,
            **numbers,
        }
        self.history.append(dict(self.last_trigger))
        if len(self.history) > HISTORY_LIMIT:
            del self.history[: len(self.history) - HISTORY_LIMIT]
        escalated = _SEVERITY[new] > _SEVERITY[old]
        emit = log.warning if escalated else log.info
        emit(
            "state_changed",
            machine="trading_state",
            **{k: v for k, v in self.last_trigger.items() if k != "ts"},
        )
        if self.alert is not None:
            try:
                self.alert(_state_changed(self.last_trigger))
            except Exception:  # an alert channel failing must never stop risk control
                log.exception("alert_failed", kind="trading_state")


def _reevaluate(breakers: CircuitBreakers, now: int) -> TradingState:
    """Re-evaluate `breakers` at `now` after a closed trade; return the state.

    A full evaluation (`_recompute`) unless it would change nothing but the clock:
    default rules only, with the band of the last evaluation standing (the equity has not
    left it and no latch lifts before `now`, so no equity rule's verdict changes); the
    losing streak below its rule's limit (the settings are frozen: the default rule's),
    so that rule does not trip; the cause none or a latched trip (kept as it is); and no
    manual rung (whose trip is rebuilt at each evaluation). The same rung, cause and band
    would come out.
    """
    b = breakers
    band, equity = b._band, b.equity
    if (
        band is None
        or not b._fast
        or b.manual is not None
        or equity is None
        or b.consecutive_losses >= b.settings.max_consecutive_losses
        or (b.cause is not None and not b.cause.latched)
    ):
        return b._recompute(now)
    if _in_band(band, equity, now):
        b.now = now
        return b.state
    return b._recompute(now)


def quiet_band(
    breakers: CircuitBreakers,
) -> tuple[Decimal | None, Decimal | None, int | None, bool] | None:
    """Return the band the last evaluation left, and whether a new peak only moves it.

    (low, high, expiry, at a new peak only the floor moves): while the equity stays
    strictly inside (low, high) before the expiry within one UTC day, or makes a new peak
    in that fast case, `update` leaves every verdict standing (see `update`). None: no
    band holds (custom rules, or not evaluated since the last change).
    """
    b = breakers
    if b._band is None:
        return None
    low, high, expires = b._band
    return low, high, expires, b.state is TradingState.NORMAL and b.cause is None


def floor_factors(breakers: CircuitBreakers) -> tuple[Decimal, Decimal]:
    """Return the band floor's factors on the peak and on the day start (`update`)."""
    return breakers._low_peak, breakers._low_day


def advance_quietly(
    breakers: CircuitBreakers, now: int, equity: Decimal, peak: Decimal | None = None
) -> None:
    """Apply a run of `update` calls known to leave every verdict standing.

    The caller has checked each against `quiet_band`, within one UTC day. Takes the run's
    last `equity` and clock, and its highest equity when it set a new `peak`; the band is
    evaluated afresh on the next call (it only ever spares that evaluation).
    """
    b = breakers
    if peak is not None and peak > b.peak_equity:
        b.peak_equity = peak
    b.equity = equity
    b.now = max(b.now, now)
    b._band = None


def _in_band(
    band: tuple[Decimal | None, Decimal | None, int | None], equity: Decimal, now: int
) -> bool:
    # Whether the last evaluation's verdict still stands: equity strictly inside the
    # band and no latch lifting before `now`.
    low, high, expires = band
    return (
        (low is None or equity > low)
        and (high is None or equity < high)
        and (expires is None or now < expires)
    )


def breaker_report(
    history: Sequence[Mapping[str, Any]], end_ts: int | None
) -> dict[str, list[dict[str, Any]]]:
    """Return a run's breaker trips and the spans it spent off the normal rung.

    Args:
        history: `CircuitBreakers.history`, the changes of rung oldest first.
        end_ts: When the run ended; a span still open then ends there (None: at its start).

    Returns:
        `trips`: each escalation (a rung more severe than the one before) with its time,
        rule, reason and the numbers that tripped it (equity, peak, drawdown, day loss,
        losing streak, the rule's limit). `spans`: each stretch on a rung other than
        normal as {state, start, end, duration_ms, rule, reason}, in time order.
    """
    trips: list[dict[str, Any]] = []
    spans: list[dict[str, Any]] = []
    for i, change in enumerate(history):
        old, new = TradingState(change["from"]), TradingState(change["to"])
        if _SEVERITY[new] > _SEVERITY[old]:
            trip = {"rule": change["trigger"], **dict(change)}
            del trip["trigger"]
            trips.append(trip)
        if new is TradingState.NORMAL:
            continue
        start = int(change["ts"])
        later = history[i + 1]["ts"] if i + 1 < len(history) else end_ts
        end = max(start, int(later)) if later is not None else start
        spans.append(
            {
                "state": str(new),
                "start": start,
                "end": end,
                "duration_ms": end - start,
                "rule": change["trigger"],
                "reason": change["reason"],
            }
        )
    return {"trips": trips, "spans": spans}


def _state_changed(trigger: Mapping[str, Any]) -> TradingStateChanged:
    # `trigger` is `last_trigger`: the book's numbers, overridden by the tripping rule's own.
    return TradingStateChanged(
        ts=int(trigger["ts"]),
        from_state=TradingState(trigger["from"]),
        to_state=TradingState(trigger["to"]),
        trigger=str(trigger["trigger"]),
        reason=str(trigger["reason"]),
        resume_at=trigger["resume_at"],
        equity=float(trigger["equity"]),
        peak_equity=float(trigger["peak_equity"]),
        drawdown=float(trigger["drawdown"] or 0.0),
        day_start_equity=float(trigger["day_start_equity"]),
        day_loss=float(trigger["day_loss"] or 0.0),
        consecutive_losses=int(trigger["consecutive_losses"] or 0),
        limit=None if trigger.get("limit") is None else float(trigger["limit"]),
    )


# -- Per-pair entry pauses -------------------------------------------------------------------


class _Timed(Protocol):
    @property
    def now(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PairPause:
    """Entries on `pair` refused from `since` until `until` (ms UTC; None: until resumed)."""

    pair: str
    reason: str
    source: str
    since: int
    until: int | None


class PairPauses:
    """Pause entries pair by pair (a market-data anomaly), as an entry guard.

    Only entries pass through guards: exits and protective stops on a paused pair keep
    working. A pause ends by itself at `until`; pausing a paused pair extends it.
    """

    name = "pair_pause"

    def __init__(self) -> None:
        self._pauses: dict[str, PairPause] = {}

    def pause(
        self, pair: str, reason: str, *, now: int, until: int | None, source: str = "anomaly"
    ) -> bool:
        """Pause entries on `pair`; return True when it was not paused already."""
        current = self.active(pair, now)
        if current is not None:
            longer = None if until is None or current.until is None else max(until, current.until)
            self._pauses[pair] = replace(current, reason=reason, until=longer)
            return False
        self._pauses[pair] = PairPause(pair, reason, source, now, until)
        log.warning("pair_paused", pair=pair, reason=reason, until=until, source=source)
        return True

    def resume(self, pair: str) -> bool:
        """Lift the pause on `pair`; return True when there was one."""
        return self._pauses.pop(pair, None) is not None

    def active(self, pair: str, now: int) -> PairPause | None:
        """Return the pause in force on `pair` at `now`, if any (an expired one is dropped)."""
        pause = self._pauses.get(pair)
        if pause is not None and pause.until is not None and now >= pause.until:
            del self._pauses[pair]
            return None
        return pause

    def all_active(self, now: int) -> dict[str, PairPause]:
        """Return every pause in force at `now`, by pair."""
        return {p: pause for p in list(self._pauses) if (pause := self.active(p, now)) is not None}

    def check(self, signal: Signal, ctx: _Timed) -> Veto | None:
        """Refuse an entry on a paused pair, saying why and until when."""
        if not self._pauses:
            return None
        pause = self.active(signal.pair, ctx.now)
        if pause is None:
            return None
        return Veto(f"entries paused on {pause.pair}: {pause.reason}", pause.until, self.name)
