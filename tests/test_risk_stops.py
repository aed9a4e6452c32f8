"""Stops: k x ATR placement, trailing that only ratchets, break-even after fees."""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal

import numpy as np
import pytest
import talib
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from engine_quiet import last_atr
from models import Position, PositionSide
from risk_management import RiskManager, break_even_price
from tests.test_risk_support import MINUTE, T0, position, settings


def _walk(
    risk: RiskManager, pos: Position, bars: list[tuple[float, float, float]], atr: float = 2.0
) -> tuple[Position, list[Decimal | None]]:
    """Feed (high, low, close) bars, applying each proposed stop as the pipeline would."""
    moves: list[Decimal | None] = []
    for i, (high, low, close) in enumerate(bars):
        new = risk.manage_stop(pos, high, low, close, atr, T0 + i * MINUTE)
        moves.append(new)
        if new is not None:
            pos = dataclasses.replace(pos, stop_price=new)
    return pos, moves


def test_trailing_stop_follows_the_high_and_never_loosens() -> None:
    """Long from 100, stop 96, ATR 2: the stop trails 4 under the best high and holds."""
    risk = RiskManager(settings(break_even_at_r=None))
    pos = position("BTC/USDT", stop="96")
    bars = [(101, 99, 100.5), (100.8, 99.5, 100), (103, 100, 102.5), (102, 98.5, 99.5)]
    pos, moves = _walk(risk, pos, bars)
    assert moves == [Decimal(97), None, Decimal(99), None]
    assert pos.stop_price == Decimal(99)


def test_a_candle_noted_without_a_move_still_counts_for_the_trail() -> None:
    """A held candle whose exit takes the stop off only notes its best price: if the position
    stays (the exit failed), the next move trails from that high, as if it had been walked."""
    risk = RiskManager(settings(break_even_at_r=None))
    pos = position("BTC/USDT", stop="96")
    pos, _ = _walk(risk, pos, [(101, 99, 100.5)])  # the track starts: stop 97
    risk.stops.note_best(pos, 104.0, 100.0)  # the exit candle: no move proposed
    assert pos.stop_price == Decimal(97)
    assert risk.manage_stop(pos, 103, 101, 102.5, 2.0, T0 + 5 * MINUTE) == Decimal(100)
    risk.stops.note_best(None, 110.0, 90.0)  # no position: nothing kept
    risk.stops.note_best(dataclasses.replace(pos, pair="ETH/USDT"), 110.0, 90.0)  # no track


def test_short_trailing_stop_follows_the_low() -> None:
    """Short from 100, stop 104, ATR 2: the stop trails 4 above the best low."""
    risk = RiskManager(settings(break_even_at_r=None), long_only=False)
    pos = position("BTC/USDT", PositionSide.SHORT, stop="104")
    _, moves = _walk(risk, pos, [(100.5, 99, 99.5), (101, 99.5, 100.5), (97, 95.5, 96)])
    assert moves == [Decimal(103), None, Decimal("99.5")]


def test_break_even_moves_the_stop_to_entry_plus_fees_after_one_r() -> None:
    """Without trailing, the stop jumps to the fee-covering break-even once the high is 1R up."""
    risk = RiskManager(settings(trailing_stop=False, break_even_at_r=1.0))
    pos = position("BTC/USDT", stop="96", fees_paid="0.1")
    bars = [(103.9, 100, 103), (104, 101, 103)]
    moves = [
        risk.manage_stop(
            pos, h, lo, c, 2.0, T0, taker_fee=Decimal("0.001"), tick_size=Decimal("0.01")
        )
        for h, lo, c in bars
    ]
    # 100.1 paid in / 0.999 kept after the exit fee = 100.2002..., rounded up to the tick
    assert moves == [None, Decimal("100.21")]


def test_break_even_price_closes_flat_after_fees() -> None:
    """Selling (or buying back) at the break-even price leaves exactly zero after both fees."""
    fee = Decimal("0.001")
    for side in PositionSide:
        pos = position(side=side, qty="2", entry="100", fees_paid="0.2")
        be = break_even_price(pos, fee)
        sign = 1 if side is PositionSide.LONG else -1
        pnl = (be - pos.entry_price) * pos.qty * sign - pos.fees_paid - be * pos.qty * fee
        assert abs(pnl) < Decimal("1e-20")


def test_break_even_assumes_a_taker_entry_fee_when_none_is_reported() -> None:
    """A position without fees_paid is charged the taker fee on entry too."""
    fee = Decimal("0.001")
    assert break_even_price(position(), fee) == break_even_price(position(fees_paid="0.1"), fee)


def test_break_even_armed_once_stays_armed_until_the_close_allows_it() -> None:
    """A spike to +2R that closes under break-even moves the stop on the next valid close."""
    risk = RiskManager(settings(trailing_stop=False, break_even_at_r=1.0))
    pos = position("BTC/USDT", stop="96", fees_paid="0.1")
    _, moves = _walk(risk, pos, [(108, 99, 100.1), (100.5, 99.8, 100.4)])
    assert moves[0] is None  # 100.2002 would sit above the 100.1 close and fill at once
    assert moves[1] == pytest.approx(Decimal("100.2002002"), abs=Decimal("1e-6"))


def test_a_trail_above_the_close_falls_back_to_break_even() -> None:
    """After a 110 high and a 101 close the 106 trail is invalid; break-even (100.2) is used."""
    risk = RiskManager(settings(break_even_at_r=1.0))
    pos = position("BTC/USDT", stop="96", fees_paid="0.1")
    new = risk.manage_stop(pos, 110, 100, 101, 2.0, T0, taker_fee=Decimal("0.001"))
    assert new is not None
    assert new == pytest.approx(Decimal("100.2002002"), abs=Decimal("1e-6"))


def test_position_without_a_stop_gets_one_at_k_atr() -> None:
    """With trailing off a stop-less long gets entry - 2 x ATR; with trailing, best - 2 x ATR."""
    plain = RiskManager(settings(trailing_stop=False))
    assert plain.manage_stop(position(), 100.5, 99, 100, 2.0, T0) == Decimal(96)
    trailing = RiskManager(settings())
    assert trailing.manage_stop(position(), 100.5, 99, 100, 2.0, T0) == Decimal("96.5")


def test_new_position_on_the_same_pair_starts_a_fresh_track() -> None:
    """The best price of a closed position does not leak into the next one on the pair."""
    risk = RiskManager(settings(break_even_at_r=None))
    risk.manage_stop(position(stop="96"), 120, 100, 119, 2.0, T0)
    fresh = position(stop="96", ts_opened=T0 + MINUTE)
    assert risk.manage_stop(fresh, 100.5, 99.5, 100, 2.0, T0 + MINUTE) == Decimal("96.5")


@hyp_settings(deadline=None)
@given(
    side=st.sampled_from(list(PositionSide)),
    steps=st.lists(
        st.tuples(
            st.floats(min_value=-3, max_value=3),
            st.floats(min_value=0, max_value=2),
            st.floats(min_value=0, max_value=2),
            st.floats(min_value=0.1, max_value=4),
        ),
        min_size=1,
        max_size=40,
    ),
    trailing=st.booleans(),
    be_r=st.sampled_from([None, 0.5, 1.0, 2.0]),
)
def test_stop_never_moves_against_the_position(
    side: PositionSide,
    steps: list[tuple[float, float, float, float]],
    trailing: bool,
    be_r: float | None,
) -> None:
    """On any price path the stop only tightens and always sits on the protective side."""
    risk = RiskManager(settings(trailing_stop=trailing, break_even_at_r=be_r), long_only=False)
    sign = 1 if side is PositionSide.LONG else -1
    pos = position("BTC/USDT", side, stop=str(100 - sign * 4), fees_paid="0.1")
    close = 100.0
    for i, (move, up, down, atr) in enumerate(steps):
        close = max(close + move, 5.0)
        high, low = close + up, max(close - down, 1.0)
        new = risk.manage_stop(pos, high, low, close, atr, T0 + i * MINUTE)
        if new is None:
            continue
        assert pos.stop_price is not None
        assert (new - pos.stop_price) * sign > 0
        assert (Decimal(str(close)) - new) * sign > 0
        pos = dataclasses.replace(pos, stop_price=new)


@hyp_settings(max_examples=60, deadline=None)
@given(
    closes=st.lists(st.floats(0.5, 2.0), min_size=1, max_size=60),
    spread=st.floats(0.0, 0.05),
    period=st.integers(2, 20),
    gap=st.booleans(),
)
def test_last_atr_is_ta_libs_last_atr(
    closes: list[float], spread: float, period: int, gap: bool
) -> None:
    """The ATR a stop reads (`engine_quiet.last_atr`, TA-Lib's function without its
    pandas adapter) is `talib.ATR`'s last value, bit for bit; None where that is NaN
    (too few bars, or a NaN bar in the window)."""
    close = np.array(closes)
    high, low = close * (1 + spread), close * (1 - spread)
    if gap:
        high[len(high) // 2] = np.nan
    want = float(talib.ATR(high, low, close, period)[-1])
    got = last_atr(high, low, close, period)
    assert got == (want if math.isfinite(want) else None)
