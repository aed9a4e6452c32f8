"""Portfolio accounting: cash, positions, round trips and the equity curve, driven by fills.

Cash accounting that works for spot and linear alike: a buy pays `qty x price + fee` out of
cash, a sell receives `qty x price - fee`, and a position is a signed quantity. Hence

    equity = cash + sum(signed_qty x mark)

changes only through price moves and fees, which the property tests check. Fills are the
only input; nothing else mutates the portfolio.
"""

from __future__ import annotations

import decimal
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import structlog

from error_handler import InvariantError
from models import (
    ClosedTrade,
    Fill,
    FundingPayment,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Side,
)
from utils.equity_curve import EquityCurve
from utils.utilities import logs_at


log = structlog.get_logger(__name__)
ZERO = Decimal(0)
# Additions and subtractions in this context never round (the positions' running value).
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


@dataclass(slots=True)
class _Open:
    """Book-keeping for one open position (mutable, private)."""

    qty: Decimal  # signed: > 0 long, < 0 short
    entry_price: Decimal
    ts_opened: int
    entry_fees: Decimal
    stop_price: Decimal | None = None
    take_profit: Decimal | None = None
    mark: Decimal | None = None
    entry_stop: Decimal | None = None  # the first stop set: the one in force at entry
    adds_at_loss: int = 0  # adds at a price worse than the average entry, not yet reported
    funding: Decimal = ZERO  # net funding received while open (negative: paid)
    liquidation: Decimal | None = None  # as the exchange reported it (live restore)


class PositionsView(Mapping[str, Position]):
    """The open positions of a portfolio by pair, each built on first read (`positions_view`).

    The pairs are those open when the view is made; a position is built as
    `Portfolio.position` would build it at the moment it is first read, then kept.
    """

    __slots__ = ("_built", "_pairs", "_portfolio")

    def __init__(self, portfolio: Portfolio) -> None:
        self._portfolio = portfolio
        self._pairs = dict.fromkeys(portfolio._open)
        self._built: dict[str, Position] = {}

    def __getitem__(self, pair: str) -> Position:
        """Return the position on `pair` (KeyError when none was open)."""
        built = self._built.get(pair)
        if built is not None:
            return built
        position = self._portfolio.position(pair) if pair in self._pairs else None
        if position is None:
            raise KeyError(pair)
        self._built[pair] = position
        return position

    def __contains__(self, pair: object) -> bool:
        """Return True when a position was open on `pair`."""
        return pair in self._pairs

    def get(self, pair: str, default: Any = None) -> Any:
        """Return the position on `pair`, or `default` (no exception raised when flat)."""
        if pair not in self._pairs:
            return default
        try:
            return self[pair]
        except KeyError:
            return default

    def gross_notional(self) -> Decimal:
        """Return what summing the view's positions' `notional` gives, without building them.

        The portfolio's gross exposure: a decision reads the view while its positions are
        the portfolio's.
        """
        return self._portfolio.exposure()

    def side(self, pair: str) -> PositionSide:
        """Return the side of the position on `pair` without building it (KeyError: none)."""
        built = self._built.get(pair)
        if built is not None:
            return built.side
        book = self._portfolio._open.get(pair) if pair in self._pairs else None
        if book is None:
            raise KeyError(pair)
        return PositionSide.LONG if book.qty > 0 else PositionSide.SHORT

    def longs(self, pairs: Sequence[str]) -> tuple[bool, ...]:
        """Return whether the position on each of `pairs` is long (`side` of each, at once)."""
        built, books = self._built, self._portfolio._open
        return tuple(
            built[p].side is PositionSide.LONG if p in built else books[p].qty > 0 for p in pairs
        )

    def __iter__(self) -> Iterator[str]:
        """Iterate over the pairs with an open position."""
        return iter(self._pairs)

    def __len__(self) -> int:
        """Return how many positions are open."""
        return len(self._pairs)


class _Valuation:
    """Equity from cash and the positions' marks, and its curve: what each candle moves.

    `Portfolio` books fills and funding into `cash` and `_open` and sets `_value` to None
    when a position changes other than by its mark.
    """

    cash: Decimal
    _open: dict[str, _Open]
    _value: Decimal | None
    _flat_cash: Decimal | None
    peak_equity: Decimal
    max_drawdown: float
    equity_curve: EquityCurve

    def equity(self) -> Decimal:
        """Return cash plus positions at their marks (entry price before the first mark)."""
        if not self._open:
            return self.cash
        value = self._value
        if value is None:
            value = ZERO
            add = _EXACT.add
            for book in self._open.values():
                price = book.mark if book.mark is not None else book.entry_price
                value = add(value, book.qty * price)
            self._value = value
        return self.cash + value

    def mark(self, pair: str, price: Decimal) -> None:
        """Set the mark price of the position on `pair` (no-op when flat)."""
        book = self._open.get(pair)
        if book is not None:
            value = self._value
            if value is not None:  # moved by this position's change, exactly
                old = book.qty * (book.mark if book.mark is not None else book.entry_price)
                try:
                    self._value = _EXACT.add(_EXACT.subtract(value, old), book.qty * price)
                except decimal.InvalidOperation:  # an infinite mark left: count it again
                    self._value = None
            book.mark = price

    def record_equity(self, ts: int) -> Decimal:
        """Append the current equity to the curve, update the drawdown; return equity.

        The drawdown is `analytics.max_drawdown`'s (the fall from the running peak, the
        starting cash the first peak, as a fraction of the peak), kept incrementally.
        """
        if not self._open and self.equity_curve and self.cash == self._flat_cash:
            # Flat and nothing changed since the last point: the same equity again (the
            # common case in backtests; skips the Decimal work).
            curve = self.equity_curve
            if curve.last_ts != ts:
                curve.append(ts, curve.last_value)
            return self.cash
        equity = self.equity()
        self._flat_cash = equity if not self._open else None
        if equity > self.peak_equity:
            self.peak_equity = equity
        elif self.peak_equity > 0 and equity < self.peak_equity:
            dd = float((self.peak_equity - equity) / self.peak_equity)
            if dd > self.max_drawdown:
                self.max_drawdown = dd
        value = float(equity)
        curve = self.equity_curve
        if curve and curve.last_ts == ts:
            curve.set_last(ts, value)
        else:
            curve.append(ts, value)
        return equity

    def record_equity_run(self, pair: str, ts: list[int], closes: list[float]) -> None:
        """Mark `pair` at each close and record the equity at each time, as one call each.

        The result is exactly that of `mark(pair, Decimal(repr(close)))` followed by
        `record_equity(t)` per candle; a flat account extends the curve in one step.
        """
        if not ts:
            return
        book = self._open.get(pair)
        if book is None:
            self._record_run_flat_pair(ts)
            return
        curve = self.equity_curve
        if len(self._open) == 1 and curve and curve.last_ts < ts[0]:
            self._record_run_sole_position(book, ts, closes)
            return
        for t, close in zip(ts, closes, strict=True):
            self.mark(pair, Decimal(repr(close)))
            self.record_equity(t)

    def _record_run_sole_position(self, book: _Open, ts: list[int], closes: list[float]) -> None:
        # The one open position: record_equity's arithmetic, inlined. The drawdown
        # is worked out only at a new trough below the peak: between troughs it is
        # smaller than at the last one, so the maximum comes out the same.
        cash, qty = self.cash, book.qty
        peak, worst = self.peak_equity, self.max_drawdown
        trough: Decimal | None = None
        append = self.equity_curve.append
        mark = book.mark
        for t, close in zip(ts, closes, strict=True):
            mark = _price_decimal(close)
            equity = cash + qty * mark
            if equity > peak:
                peak, trough = equity, None
            elif peak > 0 and equity < peak and (trough is None or equity < trough):
                trough = equity
                dd = float((peak - equity) / peak)
                if dd > worst:
                    worst = dd
            append(t, float(equity))
        book.mark = mark
        self.peak_equity, self.max_drawdown, self._flat_cash = peak, worst, None
        self._value = None

    def _record_run_flat_pair(self, ts: list[int]) -> None:
        # No position on the pair: the marks change nothing, so a flat account whose cash
        # is unchanged extends the curve with its last value in one step.
        self.record_equity(ts[0])
        if not self._open and self.cash == self._flat_cash:
            self.equity_curve.extend_flat(ts[1:], self.equity_curve.last_value)
        else:
            for t in ts[1:]:
                self.record_equity(t)


class Portfolio(_Valuation):
    """Cash, positions and realised results of one account."""

    def __init__(self, starting_cash: Decimal, *, quote: str = "USDT") -> None:
        self.starting_cash = starting_cash
        self.quote = quote
        self.cash = starting_cash
        self.fees = ZERO
        self.realised_pnl = ZERO
        self.funding = ZERO  # net funding received (negative: paid), open positions included
        self._open: dict[str, _Open] = {}
        self.closed: list[ClosedTrade] = []
        self.equity_curve = EquityCurve()
        self.peak_equity = starting_cash
        self.max_drawdown = 0.0
        self._seen_fills: set[str] = set()
        self._flat_cash: Decimal | None = None
        # The open positions at their marks (entry price before the first mark), summed
        # exactly: a mark moves it by the position's change, so a candle's equity costs
        # the same with one position or a hundred. None: counted again when next read
        # (after a fill, a funding settlement, a restore: anything but a mark).
        self._value: Decimal | None = ZERO
        # Multi-strategy: the strategy that owns each pair, named on its closed trades.
        self.owners: dict[str, str] = {}
        # Where the venue would liquidate each position (the simulated exchange's view);
        # None: the liquidation price the exchange last reported, if any.
        self.liquidation_source: Callable[[str], Decimal | None] | None = None

    # -- Queries -----------------------------------------------------------------------------

    def position(self, pair: str) -> Position | None:
        """Return the open position on `pair`, or None."""
        book = self._open.get(pair)
        if book is None:
            return None
        return Position(
            pair=pair,
            side=PositionSide.LONG if book.qty > 0 else PositionSide.SHORT,
            qty=abs(book.qty),
            entry_price=book.entry_price,
            ts_opened=book.ts_opened,
            stop_price=book.stop_price,
            take_profit=book.take_profit,
            mark_price=book.mark,
            fees_paid=book.entry_fees,
            liquidation_price=(
                self.liquidation_source(pair)
                if self.liquidation_source is not None
                else book.liquidation
            ),
        )

    def mark_of(self, pair: str) -> Decimal | None:
        """Return the mark price of `pair`'s open position (None: no mark yet, or flat).

        `position(pair).mark_price` without building the position.
        """
        book = self._open.get(pair)
        return None if book is None else book.mark

    def take_profit_of(self, pair: str) -> Decimal | None:
        """Return the take-profit set on `pair`'s open position (None: none, or flat)."""
        book = self._open.get(pair)
        return None if book is None else book.take_profit

    def positions(self) -> dict[str, Position]:
        """Return every open position by pair."""
        out = {}
        for pair in self._open:
            pos = self.position(pair)
            if pos is not None:
                out[pair] = pos
        return out

    def positions_view(self) -> PositionsView:
        """Return the open positions as a mapping that builds each one when first read.

        For one decision (`Engine._risk_context`): an exit reads its own position and an
        entry the count and the pairs, so building all of them (`positions`) would make a
        burst of decisions cost O(positions) each. Read it before the portfolio changes.
        """
        return PositionsView(self)

    def signed_qty(self, pair: str) -> Decimal:
        """Return the signed position quantity (0 when flat)."""
        book = self._open.get(pair)
        return book.qty if book else ZERO

    def wallet_balance(self) -> Decimal:
        """Return the wallet balance: cash plus positions at their entry (no unrealised PnL).

        What a derivatives account holds before unrealised PnL (Bybit's walletBalance):
        deposits, realised PnL, fees and funding; the balance behind cross-margin positions.
        """
        return self.cash + sum((b.qty * b.entry_price for b in self._open.values()), ZERO)

    def exposure(self) -> Decimal:
        """Return the gross notional of open positions."""
        if not self._open:
            return ZERO  # a burst's entries ask with nothing held: no generator to run
        return (
            sum(
                (abs(b.qty) * (b.mark if b.mark is not None else b.entry_price))
                for b in self._open.values()
            )
            or ZERO
        )

    def snapshot(self, ts: int) -> PortfolioSnapshot:
        """Return an immutable view."""
        return PortfolioSnapshot(
            ts=ts,
            cash=self.cash,
            equity=self.equity(),
            positions=tuple(self.positions().values()),
            realised_pnl=self.realised_pnl,
            fees=self.fees,
        )

    # -- Updates -----------------------------------------------------------------------------

    def apply_funding(self, pair: str, mark: Decimal, rate: Decimal) -> Decimal:
        """Settle one funding time on `pair`'s position; return what it paid (< 0: received).

        `signed qty x mark x rate` leaves cash (`perpetuals.funding_payment`): a long pays a
        positive rate, a short receives it. The position is marked at `mark`; it carries
        the amount into its closed trade's `funding` and PnL. No-op when flat.
        """
        book = self._open.get(pair)
        if book is None:
            return ZERO
        payment = book.qty * mark * rate
        self.cash -= payment
        self.funding -= payment
        book.funding -= payment
        book.mark = mark
        self._flat_cash = self._value = None
        log.debug("funding_settled", pair=pair, rate=str(rate), paid=str(payment))
        return payment

    def apply_funding_payment(self, payment: FundingPayment) -> bool:
        """Apply a funding settlement the exchange booked (live); False if seen before.

        The exchange's amount leaves cash as `apply_funding`'s does; one booked while the
        portfolio holds no position on the pair (settled just before a close the bot saw
        first) still moves cash and the funding total.
        """
        key = f"funding:{payment.payment_id}"
        if key in self._seen_fills:
            return False
        self._seen_fills.add(key)
        self.cash -= payment.amount
        self.funding -= payment.amount
        book = self._open.get(payment.pair)
        if book is not None:
            book.funding -= payment.amount
        self._flat_cash = None
        log.info(
            "funding_booked", pair=payment.pair, paid=str(payment.amount), rate=str(payment.rate)
        )
        return True

    def has_position(self, pair: str) -> bool:
        """Return True when a position is open on `pair`."""
        return pair in self._open

    def has_positions(self) -> bool:
        """Return True while any position is open (`positions()` without building them)."""
        return bool(self._open)

    def set_protection(
        self, pair: str, *, stop: Decimal | None = None, take_profit: Decimal | None = None
    ) -> None:
        """Record the stop and take-profit of the open position."""
        book = self._open.get(pair)
        if book is not None:
            if stop is not None:
                book.stop_price = stop
                if book.entry_stop is None:
                    book.entry_stop = stop
            if take_profit is not None:
                book.take_profit = take_profit

    def apply_fill(self, fill: Fill, *, reason: str = "") -> ClosedTrade | None:
        """Apply one fill; return the round trip it closed (fully or partly), if any.

        A fill id seen before is ignored, so a fill reported by both the REST answer and
        the private stream is counted once.
        """
        if fill.fill_id in self._seen_fills:
            return None
        if fill.qty <= 0 or fill.price <= 0:
            raise InvariantError(
                f"fill with non-positive qty/price: {fill.qty} @ {fill.price}",
                component="portfolio",
                pair=fill.pair,
                order_id=fill.client_order_id,
            )
        self._seen_fills.add(fill.fill_id)
        self._value = None  # the position changes: counted again when next read
        fill = _in_quote(fill)
        signed = fill.qty if fill.side is Side.BUY else -fill.qty
        self.cash -= signed * fill.price + fill.fee
        self.fees += fill.fee
        book = self._open.get(fill.pair)
        if book is None or book.qty == 0:
            self._open[fill.pair] = _Open(signed, fill.price, fill.ts, fill.fee, mark=fill.price)
            return None
        if (book.qty > 0) == (signed > 0):  # adding to the position: average the entry
            if (fill.price - book.entry_price) * signed < 0:  # worse than the entry: averaging down
                book.adds_at_loss += 1
            total = book.qty + signed
            book.entry_price = (book.entry_price * book.qty + fill.price * signed) / total
            book.qty = total
            book.entry_fees += fill.fee
            book.mark = fill.price
            return None
        return self._reduce(book, fill, signed, reason)

    def _reduce(self, book: _Open, fill: Fill, signed: Decimal, reason: str) -> ClosedTrade:
        closing = min(abs(signed), abs(book.qty))
        fraction = closing / abs(book.qty)
        entry_fee_part = book.entry_fees * fraction
        exit_fee_part = fill.fee * (closing / fill.qty)
        direction = 1 if book.qty > 0 else -1
        gross = (fill.price - book.entry_price) * closing * direction
        pnl = gross - entry_fee_part - exit_fee_part
        funding_part = ZERO
        if book.funding:
            funding_part = book.funding * fraction
            pnl += funding_part
            book.funding -= funding_part
        self.realised_pnl += pnl
        trade = ClosedTrade(
            pair=fill.pair,
            side=PositionSide.LONG if book.qty > 0 else PositionSide.SHORT,
            entry_ts=book.ts_opened,
            exit_ts=fill.ts,
            entry_price=float(book.entry_price),
            exit_price=float(fill.price),
            qty=float(closing),
            fee=float(entry_fee_part + exit_fee_part),
            pnl=float(pnl),
            reason=reason,
            stop_price=None if book.entry_stop is None else float(book.entry_stop),
            adds_at_loss=book.adds_at_loss,
            strategy=self.owners.get(fill.pair, ""),
            funding=float(funding_part),
        )
        book.adds_at_loss = 0  # reported once, on the first part that closes
        self.closed.append(trade)
        book.entry_fees -= entry_fee_part
        remaining = abs(signed) - closing
        book.qty += closing * (1 if signed > 0 else -1)
        if book.qty == 0:
            del self._open[fill.pair]
            if remaining > 0:  # the fill flipped the position: open the other side
                flip_fee = fill.fee - exit_fee_part
                new_qty = remaining if signed > 0 else -remaining
                self._open[fill.pair] = _Open(
                    new_qty, fill.price, fill.ts, flip_fee, mark=fill.price
                )
        else:
            book.mark = fill.price
        if logs_at(logging.INFO):
            log.info(
                "position_reduced",
                pair=fill.pair,
                qty=str(closing),
                pnl=round(float(pnl), 8),
                remaining=str(abs(book.qty)),
            )
        return trade

    def drop_dust(self, pair: str, below: Decimal) -> Decimal:
        """Treat a position smaller than `below` (the market's minimum) as closed.

        Fees charged in the coin and lot-size rounding leave remainders no order can sell.
        Their value at the mark moves into cash, so equity is unchanged and the pair is
        flat again (free for new entries, no exit retried forever). Returns the quantity.
        """
        book = self._open.get(pair)
        if book is None or abs(book.qty) >= below:
            return ZERO
        price = book.mark if book.mark is not None else book.entry_price
        self.cash += book.qty * price
        del self._open[pair]
        self._value = None
        log.info("dust_written_off", pair=pair, qty=str(book.qty), value=str(book.qty * price))
        return book.qty

    def restore(
        self,
        *,
        cash: Decimal,
        positions: list[Position],
        fees: Decimal = ZERO,
        realised_pnl: Decimal = ZERO,
    ) -> None:
        """Replace the state with a persisted or exchange-reported one (start-up recovery)."""
        self.cash = cash
        self.fees = fees
        self.realised_pnl = realised_pnl
        self._value = None
        self._open = {
            p.pair: _Open(
                p.qty if p.side is PositionSide.LONG else -p.qty,
                p.entry_price,
                p.ts_opened,
                p.fees_paid,
                p.stop_price,
                p.take_profit,
                p.mark_price,
                liquidation=p.liquidation_price,
            )
            for p in positions
        }


def _in_quote(fill: Fill) -> Fill:
    """Return the fill with its fee in the quote currency and the quantity actually received.

    Bybit spot charges a buy's fee in the coin bought: 0.1 BTC bought with a 0.1% fee
    delivers 0.0999 BTC. Counting the full 0.1 would make the exit sell coins the account
    does not have (Bybit refuses it). The fee's value enters the accounts at the fill price.
    """
    base = fill.pair.split("/")[0]
    if fill.fee_currency != base or fill.fee == 0:
        return fill
    quote = fill.pair.split("/")[1].split(":")[0]
    fee_value = fill.fee * fill.price
    if fill.side is Side.BUY:
        return replace(fill, qty=fill.qty - fill.fee, fee=fee_value, fee_currency=quote)
    return replace(fill, qty=fill.qty + fill.fee, fee=fee_value, fee_currency=quote)


def with_mark(position: Position, price: Decimal) -> Position:
    """Return `position` marked at `price`."""
    return replace(position, mark_price=price)


@functools.lru_cache(maxsize=1 << 16)
def _price_decimal(price: float) -> Decimal:
    # Closes repeat (prices are on a tick grid): converting each once saves most of a
    # replay's marking cost. Same value as Decimal(repr(price)).
    return Decimal(repr(price))
