"""The fast path's numba kernels: the all-in long loop and the equity curve it draws.

Part of `trade_simulator` (through `fast_path`, which drives them): `all_in_loop` takes the
replay's decisions under the `all_in` risk profile in one pass over the candles, in
float64, with the fill, liquidation and funding steps inlined (`inline="always"`);
`fill_curve` rebuilds the equity curve from the exact accounting's cash and quantity changes.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


__all__ = ["all_in_loop", "fill_curve", "hold_scan", "stop_atr"]


@intrinsic
def _fma(typingctx, x, y, z):  # type: ignore[no-untyped-def]
    # x * y + z rounded once (LLVM's fma): TA-Lib's ATR step is one (`stop_atr`).
    del typingctx
    signature = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        double = ir.DoubleType()
        kind = ir.FunctionType(double, [double, double, double])
        fn = cgutils.get_or_insert_function(builder.module, kind, "llvm.fma.f64")  # type: ignore[no-untyped-call]
        return builder.call(fn, args)

    return signature, codegen


@njit(cache=True)
def stop_atr(high, low, close, start, end, period):  # type: ignore[no-untyped-def]
    """Return TA-Lib's ATR(`period`) over bars [start, end] at bar `end`, bit for bit.

    The average of the first `period` true ranges, then each bar's step as this TA-Lib
    computes it: `fma(atr, (p - 1) / p, tr x (1 - (p - 1) / p))`, rounded once (the
    textbook `(atr x (p - 1) + tr) / p` differs in the last bit on most bars). The
    replay's stops read it over the last ten periods of the window (`Engine._atr`).
    """
    total = 0.0
    for k in range(start + 1, start + period + 1):
        total += _true_range(high, low, close, k)
    atr = total / period
    keep = (period - 1) / period
    add = 1.0 - keep
    for k in range(start + period + 1, end + 1):
        atr = _fma(atr, keep, _true_range(high, low, close, k) * add)  # type: ignore[call-arg]
    return atr


@njit(cache=True, inline="always")
def _true_range(high, low, close, k):  # type: ignore[no-untyped-def]
    # TA-Lib's: the greatest of the bar's range and its extremes' distances to the last close.
    greatest = high[k] - low[k]
    up = abs(close[k - 1] - high[k])
    if up > greatest:
        greatest = up
    down = abs(close[k - 1] - low[k])
    if down > greatest:
        greatest = down
    return greatest


@njit(cache=True)
def fill_curve(closes, index, values, cash0, equity):  # type: ignore[no-untyped-def]
    """Write the equity per bar into `equity` from (bar, cash after, qty after) changes."""
    cash = cash0
    qty = 0.0
    k = 0
    for i in range(closes.shape[0]):
        while k < index.shape[0] and index[k] <= i:
            cash = values[k, 0]
            qty = values[k, 1]
            k += 1
        equity[i] = cash + qty * closes[i]


@njit(cache=True)
def _lot_qty(quote, price, fee, lot, inv_lot, inv_lev):  # type: ignore[no-untyped-def]
    # floor_to_lot(quote / (price x (1 + fee))), as the exchange sizes a quote order; with
    # leverage, quote / Bybit's order cost of a long (`perpetuals.unit_cost`).
    if inv_lev == 1.0:
        x = quote / (price * (1.0 + fee))
    else:
        x = quote / (price * inv_lev + price * fee + price * (1.0 - inv_lev) * fee)
    if inv_lot > 0.0:
        return math.floor(x * inv_lot) / inv_lot
    return math.floor(x / lot) * lot


@njit(cache=True, inline="always")
def _record_trade(  # type: ignore[no-untyped-def]
    entries, exits, numbers, k, open_at, i, entry_price, price, qty, entry_fee, exit_fee, funding
):
    # One closed round trip into the trade table (row k): bars, prices, qty, fees, PnL
    # (funding received included), funding.
    entries[k] = open_at
    exits[k] = i
    numbers[k, 0] = entry_price
    numbers[k, 1] = price
    numbers[k, 2] = qty
    numbers[k, 3] = entry_fee + exit_fee
    numbers[k, 4] = (price - entry_price) * qty - entry_fee - exit_fee + funding
    numbers[k, 5] = funding
    numbers[k, 6] = 0.0


# The loop's state between bars, a tuple so the inlined helpers below compile to registers:
# (cash, qty, entry price, entry fee, fees, pending order (1 buy, -1 sell, 0 none), trades
# recorded, bar of the open entry or -1, funding received by the open position). A signal's
# verdict: the order was taken (placed, or filled at once), vetoed by risk, or refused by
# the exchange.
_TAKEN = 0
_VETOED = 1
_REFUSED = 2


@njit(cache=True, inline="always")
def _enter(state, i, price, stake, fee, lot, inv_lot, inv_lev):  # type: ignore[no-untyped-def]
    # A market buy at `price` of the stake (or the whole cash); nothing when under one lot.
    cash, _, _, _, fees, _, k, _, _ = state
    quote = cash if stake < 0.0 else min(stake, cash)
    q = _lot_qty(quote, price, fee, lot, inv_lot, inv_lev)
    if q > 0.0:
        entry_fee = price * q * fee
        return (cash - (q * price + entry_fee), q, price, entry_fee, fees + entry_fee, 0, k, i,
                0.0)  # fmt: skip
    return state


@njit(cache=True, inline="always")
def _exit(state, i, price, fee, entries, exits, numbers):  # type: ignore[no-untyped-def]
    # A market sell of the whole position at `price`, recorded as a closed trade.
    cash, qty, entry_price, entry_fee, fees, _, k, open_at, funding = state
    exit_fee = price * qty * fee
    _record_trade(entries, exits, numbers, k, open_at, i, entry_price, price, qty,
                  entry_fee, exit_fee, funding)  # fmt: skip
    return (cash - (-qty * price + exit_fee), 0.0, entry_price, entry_fee, fees + exit_fee, 0,
            k + 1, -1, 0.0)  # fmt: skip


@njit(cache=True, inline="always")
def _on_exit_signal(  # type: ignore[no-untyped-def]
    state, i, c, fill_close, slip, fee, min_notional, entries, exits, numbers
):
    # An exit signal on a long: refused below the minimum notional, else sold at the next
    # open (pending) or at once at the close. Returns the new state and the verdict.
    qty = state[1]
    if qty * c < min_notional:
        return state, _REFUSED  # the exchange refuses an exit below its minimum notional
    if not fill_close:
        return (state[0], qty, state[2], state[3], state[4], -1, state[6], state[7],
                state[8]), _TAKEN  # fmt: skip
    return _exit(state, i, c * (1.0 - slip), fee, entries, exits, numbers), _TAKEN


@njit(cache=True, inline="always")
def _on_entry_signal(  # type: ignore[no-untyped-def]
    state, i, c, fill_close, slip, stake, fee, lot, inv_lot, inv_lev, min_notional
):
    # An entry signal when flat: vetoed without cash for one lot, refused below the minimum
    # notional, else bought at the next open (pending) or at once at the close. Returns the
    # new state and the verdict.
    cash = state[0]
    quote = cash if stake < 0.0 else min(stake, cash)
    estimate = _lot_qty(quote, c, fee, lot, inv_lot, inv_lev)
    if estimate <= 0.0:
        return state, _VETOED  # risk: no cash for one lot
    if estimate * c < min_notional:
        return state, _REFUSED  # the exchange's minimum notional
    if not fill_close:
        return (cash, state[1], state[2], state[3], state[4], 1, state[6], state[7],
                state[8]), _TAKEN  # fmt: skip
    return _enter(state, i, c * (1.0 + slip), stake, fee, lot, inv_lot, inv_lev), _TAKEN


@njit(cache=True, inline="always")
def _liq_prices(entry, qty, inv_lev, tiers):  # type: ignore[no-untyped-def]
    # An isolated long's liquidation and bankruptcy prices (`perpetuals`), the maintenance
    # margin from the risk-limit tier (rows of limit, MMR, deduction) its value falls in.
    value = qty * entry
    k = 0
    while k < tiers.shape[0] - 1 and value > tiers[k, 0]:
        k += 1
    mm = max(value * tiers[k, 1] - tiers[k, 2], 0.0)
    im = value * inv_lev
    return max(entry - (im - mm) / qty, 0.0), max(entry - im / qty, 0.0)


@njit(cache=True, inline="always")
def _liquidate(state, i, liq, bust, fee, entries, exits, numbers):  # type: ignore[no-untyped-def]
    # The exchange closes the long at its liquidation price, charging the margin left above
    # bankruptcy plus the fee to close; recorded as a closed trade flagged liquidated.
    cash, qty, entry_price, entry_fee, fees, _, k, open_at, funding = state
    liq_fee = qty * (liq - bust) + qty * bust * fee
    _record_trade(entries, exits, numbers, k, open_at, i, entry_price, liq, qty,
                  entry_fee, liq_fee, funding)  # fmt: skip
    numbers[k, 6] = 1.0
    return (cash - (-qty * liq + liq_fee), 0.0, entry_price, entry_fee, fees + liq_fee, 0,
            k + 1, -1, 0.0)  # fmt: skip


@njit(cache=True, inline="always")
def _watch(state, i, low, inv_lev, tiers, watch, fee, entries, exits, numbers):  # type: ignore[no-untyped-def]
    # A leveraged long is liquidated when the bar's low reaches its liquidation price.
    # `watch`: (bar the watched position opened, its liquidation, its bankruptcy price).
    if state[1] <= 0.0:
        return state, watch
    if state[7] != watch[0]:  # a new position
        liq, bust = _liq_prices(state[2], state[1], inv_lev, tiers)
        watch = (state[7], liq, bust)
    if low <= watch[1]:
        state = _liquidate(state, i, watch[1], watch[2], fee, entries, exits, numbers)
    return state, watch


@njit(cache=True, inline="always")
def _settle_funding(state, c, rate):  # type: ignore[no-untyped-def]
    # The position pays qty x close x rate (receives when negative), at the candle's close.
    payment = state[1] * c * rate
    return (state[0] - payment, state[1], state[2], state[3], state[4], state[5], state[6],
            state[7], state[8] - payment), payment  # fmt: skip


@njit(cache=True)
def all_in_loop(  # type: ignore[no-untyped-def]
    opens,
    closes,
    enter,
    exit_,
    warm,
    fill_close,
    cash0,
    stake,
    fee,
    slip,
    lot,
    inv_lot,
    min_notional,
    funding_rates,
    with_funding,
    lows,
    inv_lev,
    tiers,
    equity,
    entries,
    exits,
    numbers,
    out,
):
    """Run the all-in long backtest over the candles; return how many trades it recorded.

    Fills `equity`, the trades' bars (`entries`, `exits`) and numbers, and `out`'s totals.
    """
    # One bar at a time, in the replay's order: fills at the open, mark, settle funding,
    # record equity, then the signal (which fills at once at the close with fill_close).
    n = closes.shape[0]
    signals = 0
    vetoes = 0
    rejections = 0
    paid = 0.0
    watch = (-1, 0.0, 0.0)  # the open position's liquidation (leverage only)
    state = (cash0, 0.0, 0.0, 0.0, 0.0, 0, 0, -1, 0.0)
    for i in range(n):
        if state[5] == 1:
            state = _enter(state, i, opens[i] * (1.0 + slip), stake, fee, lot, inv_lot, inv_lev)
        elif state[5] == -1:
            state = _exit(state, i, opens[i] * (1.0 - slip), fee, entries, exits, numbers)
        if inv_lev != 1.0:
            state, watch = _watch(state, i, lows[i], inv_lev, tiers, watch, fee, entries, exits,
                                  numbers)  # fmt: skip
        c = closes[i]
        if with_funding and state[1] > 0.0 and funding_rates[i] != 0.0:
            state, payment = _settle_funding(state, c, funding_rates[i])
            paid += payment
        equity[i] = state[0] + state[1] * c
        if i < warm:
            continue
        if state[1] > 0.0:
            if not exit_[i]:
                continue
            state, verdict = _on_exit_signal(state, i, c, fill_close, slip, fee, min_notional,
                                             entries, exits, numbers)  # fmt: skip
        elif state[5] == 0 and enter[i]:
            state, verdict = _on_entry_signal(state, i, c, fill_close, slip, stake, fee, lot,
                                              inv_lot, inv_lev, min_notional)  # fmt: skip
        else:
            continue
        signals += 1
        vetoes += verdict == _VETOED
        rejections += verdict == _REFUSED
    cash, qty, entry_price, _, fees, _, k, open_at, _ = state
    out[0] = cash + qty * closes[n - 1] if n > 0 else cash
    out[1] = fees
    out[2] = qty
    out[3] = open_at
    out[4] = entry_price if qty > 0.0 else 0.0
    out[5] = signals
    out[6] = vetoes
    out[7] = rejections
    out[8] = -paid
    return k


# Relative margins of the pass's float decisions: a value this close to a threshold (or a
# quotient this close to a tick) is left to the exact path. float64 rounding is ~1e-16.
_NEAR = 1e-10
_DAY_MS = 86_400_000


@njit(cache=True, inline="always")
def _level(k, scale):  # type: ignore[no-untyped-def]
    # The float nearest to k ticks, the tick 10**-scale (a division by an exact power of
    # ten rounds once) or 10**-scale >= 1.
    if scale > 0:
        return k / 10.0**scale
    return k * 10.0 ** (-scale)


@njit(cache=True, inline="always")
def _in_ticks(value, scale):  # type: ignore[no-untyped-def]
    # `value` / tick, rounded once.
    if scale >= 0:
        return value * 10.0**scale
    return value / 10.0 ** (-scale)


@njit(cache=True, inline="always")
def _stop_step(  # type: ignore[no-untyped-def]
    b, c, atr, armed, k_min, old, entry, risk, be_r, be_k, multiple, trailing, scale
):
    # `StopManager.manage_stop` and the engine's filter on a bar (best price `b`, close `c`):
    # (sure, armed, the new stop's tick index or -1, whether it moves). Not sure: a value
    # lies too close to a threshold or the grid for float64 to decide it.
    new_k = -1
    if trailing:
        x = _in_ticks(b - atr * multiple, scale)
        k = math.ceil(x)
        near = 1e-12 * abs(_in_ticks(b, scale)) + 1e-9
        if k - x < near or x - (k - 1) < near:
            return False, armed, new_k, False
        if k > 0 and c > _level(k, scale):  # never at or beyond the close
            new_k = k
    arm = armed
    if risk > 0.0 and not arm:  # break-even arms at be_r x the initial risk in profit
        gap = b - entry - be_r * risk
        if abs(gap) <= _NEAR * entry:
            return False, armed, new_k, False
        arm = gap >= 0.0
    if arm and be_k > 0 and c > _level(be_k, scale) and be_k > new_k:
        new_k = be_k
    if new_k < k_min:  # not above the stop it has
        return True, arm, new_k, False
    diff = _level(new_k, scale) - old
    tenth = atr / 10.0  # a move under a tenth of the ATR is not sent
    if abs(diff - tenth) <= _NEAR * max(abs(old), 1.0):
        return False, armed, new_k, False
    return True, arm, new_k, diff >= tenth


@njit(cache=True, inline="always")
def _band_step(  # type: ignore[no-untyped-def]
    value, now, peak, fast, low, high, expires, peak_floor, day_floor
):
    # Whether the breakers' verdict surely stands at this equity (`CircuitBreakers.update`):
    # (sure, a new peak, the band's floor after it). A new peak in their fast case only
    # moves the floor (to the larger of `peak_floor` and `day_floor`); otherwise the
    # equity must lie inside the band before its expiry.
    if abs(value - peak) <= _NEAR * peak:
        return False, False, low
    if value > peak:
        return fast > 0.0, True, max(peak_floor, day_floor)
    if expires >= 0 and now >= expires:
        return False, False, low
    if value <= low * (1.0 + _NEAR) or value >= high * (1.0 - _NEAR):
        return False, False, low
    return True, False, low


@njit(cache=True, inline="always")
def _drawdown_step(value, t, pf_peak, worst, out):  # type: ignore[no-untyped-def]
    # The portfolio's peak and worst drawdown (`Portfolio.record_equity`): (peak, worst),
    # their bars in `out` (3: the peak's; 4, 5: the worst's and its peak's, -2 before).
    if value > pf_peak:
        out[3] = t
        return value, worst
    dd = (pf_peak - value) / pf_peak
    if dd > worst:
        out[4] = t
        out[5] = out[3] if out[3] >= 0 else -2
        return pf_peak, dd
    return pf_peak, worst


@njit(cache=True)
def hold_scan(bars, t, rules, position, stop, breaker, equity, out):  # type: ignore[no-untyped-def]
    """Apply a held position's bars from `t` on that only trail its stop and mark it.

    A bar stops the pass (left to the exact path, `fast_standard`) when its stop may
    trigger, its exit flag is set, it may reach the take-profit, its ATR is unknown, it
    starts a new UTC day, or a threshold (`_stop_step`, `_band_step`) lies within the
    margins. Every other bar is applied: the stop's track and move, the equity, the drawdown.

    `bars`: (open times, opens, highs, lows, closes, exit flags). `rules`: (step, window,
    ATR period, ATR tail, tick scale, stop multiple, break-even R, trailing). `position`:
    (qty, cash, entry, initial risk or -1, break-even tick index or -1, the least float
    reaching the take-profit). `stop`: (trigger as a float, recorded stop, least tick index
    above it, best price, armed). `breaker`: (day, band low or -inf, high or inf, expiry or
    -1, peak, fast at a new peak, the floor's factors on the peak and the day start, day
    start, portfolio peak, worst drawdown). Writes each applied bar's equity, and `out`:
    the highest high, armed, the last move's tick index (-1: none), the portfolio peak's bar,
    the worst drawdown's bar and its peak's bar (-2: the peak from before), the breakers'
    peak bar (-1: none). Returns the first bar not applied.
    """
    ts, opens, highs, lows, closes, exits = bars
    step, window, period, tail, scale, multiple, be_r, trailing = rules
    qty, cash, entry, risk, be_k, tp_up = position
    trigger, old, k_min, best, armed = stop
    day, low, high, expires, peak, fast, low_peak, low_day, day_start, pf_peak, worst = breaker
    out[0], out[1], out[2], out[3], out[4], out[5], out[6] = -math.inf, 0, -1, -1, -1, -2, -1
    while t < closes.shape[0]:
        hi, c, now = highs[t], closes[t], ts[t] + step
        if opens[t] <= trigger or lows[t] <= trigger or exits[t] or hi >= tp_up:
            break
        length = min(t + 1, window)
        if now // _DAY_MS != day or length <= period:
            break
        atr = stop_atr(highs, lows, closes, t + 1 - min(tail, length), t, period)
        if not (atr > 0.0 and math.isfinite(atr)):
            break
        b = max(best, hi)
        sure, arm, new_k, move = _stop_step(
            b, c, atr, armed, k_min, old, entry, risk, be_r, be_k, multiple, trailing, scale
        )
        value = cash + qty * c
        new_peak, floor = False, low
        if sure:
            sure, new_peak, floor = _band_step(
                value, now, peak, fast, low, high, expires, low_peak * value, low_day * day_start
            )
        if not sure:
            break
        best, armed = b, arm  # the bar is applied
        out[0] = max(out[0], hi)
        if move:
            out[2], k_min = new_k, new_k + 1
            old = trigger = _level(new_k, scale)
        if new_peak:
            peak, low, out[6] = value, floor, t
        equity[t] = value
        pf_peak, worst = _drawdown_step(value, t, pf_peak, worst, out)
        t += 1
    out[1] = 1.0 if armed else 0.0
    return t
