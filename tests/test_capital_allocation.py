"""The allocator's invariants, its sleeve book, sleeve sizing, and the settings' checks."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capital_allocation import (
    Allocator,
    Candidate,
    Sleeve,
    fill,
    on_probation,
    skill_weights,
    target_weights,
)
from config import AllocationSettings, load_settings
from error_handler import ConfigError
from models import OrderIntent, Position, PositionSide, Ranked, Veto
from risk_management import RiskContext, RiskManager
from tests.test_risk_support import context as risk_context
from tests.test_risk_support import position as risk_position
from tests.test_risk_support import settings as risk_settings
from tests.test_risk_support import signal as risk_signal


TOL = 1e-9


@st.composite
def books(draw: st.DrawFn) -> tuple[list[Candidate], AllocationSettings]:
    """Draw strategies (skill bound, record length, age) and an allocation policy."""
    n = draw(st.integers(1, 6))
    floor = draw(st.floats(0.0, 0.25))
    cap = draw(st.floats(max(floor, 0.05), 1.0))
    policy = AllocationSettings(
        floor=floor,
        cap=cap,
        probation_share=draw(st.floats(0.0, 1.0 / n)),
        probation_trades=draw(st.integers(0, 20)),
        probation_days=draw(st.floats(0.0, 10.0)),
        epsilon=draw(st.floats(0.001, 1.0)),
    )
    lcb = st.one_of(st.none(), st.floats(-10, 10), st.sampled_from([-1.0, 0.0, 0.5]))
    candidates = [
        Candidate(
            f"s{i}",
            draw(lcb),
            draw(st.integers(0, 40)),
            draw(st.floats(0.0, 20.0)),
            floor,
            cap,
        )
        for i in range(n)
    ]
    return candidates, policy


@settings(max_examples=300, deadline=None)
@given(books())
def test_weights_sum_to_one_within_bounds_and_follow_the_ranking(
    book: tuple[list[Candidate], AllocationSettings],
) -> None:
    """Shares sum to 1 (less a cap reserve), keep floor/cap/probation, and follow the lcb."""
    candidates, policy = book
    result = target_weights(candidates, policy)
    ranked = [c for c in candidates if not on_probation(c, policy)]
    if not ranked:
        assert result is None
        return
    assert result is not None
    w = result.weights
    assert set(w) == {c.name for c in candidates}
    assert sum(w.values()) + result.reserve == pytest.approx(1.0, abs=TOL)
    assert all(v >= -TOL for v in w.values())
    for c in candidates:
        if c.name in result.probation:
            assert w[c.name] == pytest.approx(min(policy.probation_share, c.cap), abs=TOL)
        else:
            assert w[c.name] <= c.cap + TOL  # a cap is never exceeded
    rest = 1 - sum(w[c.name] for c in candidates if c.name in result.probation)
    feasible = sum(c.floor for c in ranked) <= rest + TOL <= sum(c.cap for c in ranked) + 2 * TOL
    assert result.feasible == feasible
    if feasible:
        assert result.reserve == pytest.approx(0.0, abs=TOL)
        assert all(c.floor - TOL <= w[c.name] <= c.cap + TOL for c in ranked)
    for a in ranked:
        for b in ranked:
            if (a.lcb or 0.0) > (b.lcb or 0.0):
                assert w[a.name] >= w[b.name] - TOL
            if a.lcb == b.lcb:
                assert w[a.name] == pytest.approx(w[b.name], abs=TOL)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6),
    st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.7)), min_size=6, max_size=6),
    st.floats(0.0, 1.0),
)
def test_fill_keeps_each_part_within_its_own_bounds(
    raw: list[float], bounds: list[tuple[float, float]], total: float
) -> None:
    """With per-strategy bounds, feasible fills hit the total and stay in each [floor, cap]."""
    floors = [f for f, _ in bounds[: len(raw)]]
    caps = [f + extra for f, extra in bounds[: len(raw)]]
    raw = [r + 0.01 for r in raw]
    parts, feasible = fill(raw, floors, caps, total)
    if feasible:
        assert sum(parts) == pytest.approx(total, abs=TOL)
        assert all(f - TOL <= p <= c + TOL for p, f, c in zip(parts, floors, caps, strict=True))
    elif sum(floors) > total:
        assert sum(parts) == pytest.approx(total, abs=TOL)  # floors scaled down to fit
    else:
        assert parts == caps  # the caps hold; the rest is a reserve


def test_rank_term_keeps_the_order_when_every_bound_is_negative() -> None:
    """Three losing strategies still get shares in the order of their lower bounds."""
    assert skill_weights([-3.0, -7.0, -14.0], 0.3) == pytest.approx([0.3, 0.2, 0.1])
    assert skill_weights([1.0, -2.0], 0.1) == pytest.approx([1.1, 0.05])


def test_every_strategy_on_probation_keeps_the_sleeves() -> None:
    """Until one strategy has a long enough record, no reallocation is earned."""
    policy = AllocationSettings(probation_trades=5, probation_days=0)
    fresh = [Candidate("a", 2.0, 4, 30, 0.0, 1.0), Candidate("b", None, 0, 30, 0.0, 1.0)]
    assert target_weights(fresh, policy) is None


def _position(pair: str, qty: str, entry: str, mark: str) -> Position:
    return Position(
        pair, PositionSide.LONG, Decimal(qty), Decimal(entry), 0, mark_price=Decimal(mark)
    )


def test_allocator_books_each_sleeve_and_recuts_the_account_by_the_ranking() -> None:
    """Sleeve capital moves with its own trades; a rebalance re-cuts the account equity."""
    policy = AllocationSettings(
        floor=0.1, cap=0.7, probation_trades=2, probation_days=1, interval_s=86_400
    )
    sleeves = [
        Sleeve("trend", ("A/USDT",), "t001", 0.1, 0.7, initial=0.5),
        Sleeve("revert", ("B/USDT",), "r002", 0.1, 0.7),
    ]
    book = Allocator(sleeves, policy, equity=Decimal(10_000), now_ms=0)
    assert book.weights == {"trend": 0.5, "revert": 0.5}
    assert book.owner("B/USDT") == sleeves[1]
    assert book.owner("C/USDT") is None
    # +10% on the trend sleeve's 5,000, then -5% on the grown sleeve: chained, not summed.
    assert book.on_trade_closed("trend", 500.0) == pytest.approx(5_500.0)
    assert book.on_trade_closed("trend", -275.0) == pytest.approx(5_225.0)
    positions = {"B/USDT": _position("B/USDT", "10", "100", "110")}
    equity, free, tag = book.sizing("B/USDT", positions) or (None, None, None)
    assert (equity, free, tag) == (Decimal(5_100), Decimal(4_000), "r002")
    assert not book.due(86_399_999)
    assert book.due(86_400_000)
    ranked = [Ranked("trend", 1.5, 2.0, 10, 3.0, 9), Ranked("revert", -0.5, 0.1, 10, -1.0, 9)]
    account = Decimal(10_325)  # 5,225 + 5,000 + 100 unrealised
    event = book.rebalance(86_400_000, account, positions, ranked)
    assert event is not None
    assert event.feasible
    assert event.reserve == 0
    assert [s.name for s in event.sleeves] == ["trend", "revert"]
    assert book.weights["trend"] == pytest.approx(0.7)  # capped
    assert book.weights["revert"] == pytest.approx(0.3)
    total = sum(book.sleeve_equity(name, positions) for name in book.sleeves)
    assert float(total) == pytest.approx(float(account))
    assert book.next_ms == 2 * 86_400_000
    assert book.describe(positions)["revert"]["weight"] == pytest.approx(0.3)


def test_a_restored_allocator_keeps_shares_and_schedule_and_recuts_todays_equity() -> None:
    """dump_state then restore_state: same shares, nav and times; capital from the equity now."""
    policy = AllocationSettings(floor=0.1, cap=0.8, probation_trades=1, probation_days=0)
    sleeves = [
        Sleeve("a", ("A/USDT",), "a001", 0.1, 0.8),
        Sleeve("b", ("B/USDT",), "b002", 0.1, 0.8),
    ]
    first = Allocator(sleeves, policy, equity=Decimal(1_000), now_ms=5)
    first.on_trade_closed("a", 50.0)
    ranked = [Ranked("a", 2.0, 2.0, 5, 1.0, 3), Ranked("b", 0.0, 0.1, 5, 0.0, 3)]
    assert first.rebalance(86_400_005, Decimal(1_050), {}, ranked) is not None
    saved = json.loads(json.dumps(first.dump_state()))
    second = Allocator(sleeves, policy, equity=Decimal(2_000), now_ms=999_999_999)
    assert second.state_key() != first.state_key()
    assert second.restore_state(saved, equity=Decimal(2_000), positions={})
    assert second.state_key() == first.state_key()
    assert second.started_ms == 5
    assert second.capital["a"] == Decimal(2_000) * Decimal(repr(first.weights["a"]))
    other = Allocator(sleeves[:1], policy, equity=Decimal(2_000), now_ms=7)
    assert not other.restore_state(saved, equity=Decimal(2_000), positions={})
    assert other.started_ms == 7


def _sleeves(*items: str) -> dict[str, str]:
    return {"KESTREL_ALLOCATION__STRATEGIES": "[" + ",".join(items) + "]"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            _sleeves(
                '{"name": "ema_cross", "pairs": ["A/B"]}', '{"name": "rsi_bb", "pairs": "A/B"}'
            ),
            "pair A/B already belongs to ema_cross",
        ),
        (
            _sleeves('{"name": "ema_cross", "pairs": ["A/B"], "floor": 0.5, "cap": 0.2}'),
            "strategies[0] (ema_cross): floor 0.5 > cap 0.2",
        ),
        (
            _sleeves(
                '{"name": "ema_cross", "pairs": ["A/B"], "initial": 0.7}',
                '{"name": "rsi_bb", "pairs": ["C/D"], "initial": 0.6}',
            ),
            "initial sleeves sum to 1.3 > 1",
        ),
        (
            _sleeves(
                '{"name": "ema_cross", "pairs": ["A/B"]}', '{"name": "ema_cross", "pairs": ["C/D"]}'
            ),
            "set a distinct `label`",
        ),
        (
            {
                **_sleeves('{"name": "ema_cross", "pairs": ["A/B"]}'),
                "KESTREL_PAIRS__DYNAMIC": "true",
            },
            "DYNAMIC",
        ),
        (
            {"KESTREL_ALLOCATION__FLOOR": "0.7", "KESTREL_ALLOCATION__CAP": "0.5"},
            "floor 0.7 > cap 0.5",
        ),
    ],
)
def test_inconsistent_sleeves_are_a_config_error_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """Overlapping pairs, floor > cap, sleeves over 1, duplicates and dynamic pairs fail."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(env_file=None)
    assert "KESTREL_ALLOCATION" in str(raised.value) or "KESTREL_" in str(raised.value)
    assert message in str(raised.value)


def test_sleeves_define_the_traded_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With sleeves the bot trades every sleeve's pairs; without, the strategy group's."""
    assert load_settings(env_file=None).traded_pairs() == ["BTC/USDT"]
    env = _sleeves(
        '{"name": "ema_cross", "pairs": ["A/B", "E/F"]}',
        '{"name": "ema_cross", "label": "slow", "params": {"fast": 30}, "pairs": "C/D"}',
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    loaded = load_settings(env_file=None)
    assert loaded.traded_pairs() == ["A/B", "E/F", "C/D"]
    assert [s.key for s in loaded.allocation.strategies] == ["ema_cross", "slow"]


def _sleeved(equity: str, free: str, **changes: Any) -> RiskContext:
    ctx = risk_context(**changes)
    return replace(
        ctx, sleeve_equity=Decimal(equity), sleeve_free=Decimal(free), strategy_tag="ab12"
    )


def test_an_entry_is_sized_on_the_strategys_sleeve_and_named_by_its_tag() -> None:
    """1% of a 2,500 sleeve over a 4.0 stop is 6.25, not 1% of the 10,000 account."""
    verdict = RiskManager(risk_settings()).evaluate(risk_signal(), _sleeved("2500", "2500"))
    assert isinstance(verdict, OrderIntent)
    assert verdict.qty == Decimal("6.25")
    assert "of sleeve equity 2500.00" in verdict.reason
    assert verdict.client_order_id.endswith("-ab12_0")
    whole = RiskManager(risk_settings()).evaluate(risk_signal(), risk_context())
    assert isinstance(whole, OrderIntent)
    assert whole.qty == Decimal(25)


def test_a_strategy_holds_no_more_than_its_sleeve_and_an_empty_sleeve_buys_nothing() -> None:
    """The sleeve's uninvested part caps the entry; a sleeve at zero is refused."""
    verdict = RiskManager(risk_settings()).evaluate(risk_signal(), _sleeved("2500", "300"))
    assert isinstance(verdict, OrderIntent)
    assert verdict.qty == Decimal(3)
    assert "bound by sleeve" in verdict.reason
    refused = RiskManager(risk_settings()).evaluate(risk_signal(), _sleeved("0", "0"))
    assert isinstance(refused, Veto)
    assert refused.guard == "sleeve"
    all_in = RiskManager(risk_settings(profile="all_in"))
    whole_sleeve = all_in.evaluate(risk_signal(), _sleeved("1000", "1000"))
    assert isinstance(whole_sleeve, OrderIntent)
    assert whole_sleeve.quote_amount == Decimal(1000)


def test_the_open_position_limit_counts_every_strategys_positions() -> None:
    """A sleeve with room to spare is still refused when the account is at its limit."""
    held = {p: risk_position(p) for p in ("ETH/USDT", "SOL/USDT")}
    risk = RiskManager(risk_settings(max_open_positions=2))
    verdict = risk.evaluate(risk_signal(), _sleeved("5000", "5000", positions=held))
    assert isinstance(verdict, Veto)
    assert verdict.guard == "max_open_positions"
