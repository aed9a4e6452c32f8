"""Position accounting: equity is conserved through any sequence of fills."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import analytics
from error_handler import InvariantError
from models import Fill, Liquidity, PositionSide, Side
from portfolio import Portfolio


def fill(n: int, side: Side, qty: str, price: str, fee: str = "0", pair: str = "BTC/USDT") -> Fill:
    return Fill(
        f"o{n}",
        pair,
        side,
        Decimal(price),
        Decimal(qty),
        Decimal(fee),
        "USDT",
        Liquidity.TAKER,
        n,
        f"f{n}",
    )


def test_round_trip_pnl_net_of_fees() -> None:
    """Buy 2 @ 100 (fee 0.2), sell 2 @ 110 (fee 0.22): pnl 19.58, cash reflects it."""
    p = Portfolio(Decimal(1000))
    assert p.apply_fill(fill(1, Side.BUY, "2", "100", "0.2")) is None
    trade = p.apply_fill(fill(2, Side.SELL, "2", "110", "0.22"))
    assert trade is not None
    assert trade.pnl == pytest.approx(19.58)
    assert trade.fee == pytest.approx(0.42)
    assert p.cash == Decimal("1019.58")
    assert p.positions() == {}


def test_partial_close_then_flip_to_short() -> None:
    """Selling more than held closes the long and opens a short with the remainder."""
    p = Portfolio(Decimal(1000))
    p.apply_fill(fill(1, Side.BUY, "1", "100"))
    first = p.apply_fill(fill(2, Side.SELL, "0.4", "105"))
    assert first is not None
    assert first.qty == pytest.approx(0.4)
    assert first.pnl == pytest.approx(2.0)
    second = p.apply_fill(fill(3, Side.SELL, "1", "110"))
    assert second is not None
    assert second.qty == pytest.approx(0.6)
    assert second.pnl == pytest.approx(6.0)
    position = p.position("BTC/USDT")
    assert position is not None
    assert position.side is PositionSide.SHORT
    assert position.qty == Decimal("0.4")
    assert position.entry_price == Decimal("110")


def test_duplicate_fill_is_counted_once() -> None:
    """The same fill id from REST and the stream changes nothing the second time."""
    p = Portfolio(Decimal(1000))
    p.apply_fill(fill(1, Side.BUY, "1", "100", "0.1"))
    p.apply_fill(fill(1, Side.BUY, "1", "100", "0.1"))
    assert p.signed_qty("BTC/USDT") == Decimal(1)
    assert p.fees == Decimal("0.1")


def test_non_positive_fill_is_an_invariant_error() -> None:
    """A zero-quantity fill is refused loudly."""
    with pytest.raises(InvariantError):
        Portfolio(Decimal(1)).apply_fill(fill(1, Side.BUY, "0", "100"))


fills_strategy = st.lists(
    st.tuples(
        st.sampled_from([Side.BUY, Side.SELL]),
        st.decimals(min_value="0.001", max_value="5", places=3),
        st.decimals(min_value="1", max_value="1000", places=2),
        st.decimals(min_value="0", max_value="1", places=4),
        st.sampled_from(["BTC/USDT", "ETH/USDT"]),
    ),
    max_size=40,
)


@settings(deadline=None)
@given(fills_strategy)
def test_equity_is_conserved(steps: list[tuple[Side, Decimal, Decimal, Decimal, str]]) -> None:
    """cash + positions at the last fill prices == start + realised PnL + unrealised - fees."""
    start = Decimal(10_000)
    p = Portfolio(start)
    last_price: dict[str, Decimal] = {}
    for n, (side, qty, price, fee, pair) in enumerate(steps):
        p.apply_fill(fill(n, side, str(qty), str(price), str(fee), pair))
        last_price[pair] = price
        for other, mark in last_price.items():
            p.mark(other, mark)
        # Equity moves only by price changes and fees: recompute it independently.
        cash_flows = start
        holdings: dict[str, Decimal] = {}
        for m, (s2, q2, p2, f2, pair2) in enumerate(steps[: n + 1]):
            signed = q2 if s2 is Side.BUY else -q2
            cash_flows -= signed * p2 + f2
            holdings[pair2] = holdings.get(pair2, Decimal(0)) + signed
            del m
        expected = cash_flows + sum(q * last_price[k] for k, q in holdings.items())
        assert p.equity() == expected
        assert p.fees == sum((s[3] for s in steps[: n + 1]), Decimal(0))
    unrealised = sum((pos.unrealised_pnl for pos in p.positions().values()), Decimal(0))
    open_entry_fees = sum((pos.fees_paid for pos in p.positions().values()), Decimal(0))
    # Realised PnL is net of the fees of closed parts; open parts still carry theirs.
    assert p.equity() - start == pytest.approx(p.realised_pnl + unrealised - open_entry_fees)


_PAIRS = ["A/USDT", "B/USDT", "C/USDT", "D/USDT"]
_price = st.decimals(min_value="0.0001", max_value="90000", places=4)
_operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("fill"),
            st.sampled_from(_PAIRS),
            st.sampled_from([Side.BUY, Side.SELL]),
            st.decimals(min_value="0.00001", max_value="50", places=5),
            _price,
        ),
        st.tuples(st.just("mark"), st.sampled_from(_PAIRS), _price),
        st.tuples(st.just("mark"), st.sampled_from(_PAIRS), _price),  # marks: most steps
        st.tuples(
            st.just("funding"),
            st.sampled_from(_PAIRS),
            _price,
            st.decimals(min_value="-0.001", max_value="0.001", places=6),
        ),
        st.tuples(st.just("dust"), st.sampled_from(_PAIRS)),
        st.tuples(st.just("restore")),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=150)
@given(_operations)
def test_equity_kept_as_marks_move_equals_summing_every_position(
    operations: list[tuple[object, ...]],
) -> None:
    """A mark moves the positions' value by its own change; after any mix of fills (adds,
    partial closes, flips), marks, funding, dust write-offs and restores, equity is exactly
    cash plus every position at its mark (entry price before the first)."""
    p = Portfolio(Decimal(10_000))
    for n, op in enumerate(operations):
        kind, pair = op[0], str(op[1]) if len(op) > 1 else ""
        if kind == "fill":
            _, _, side, qty, price = op
            p.apply_fill(fill(n, side, str(qty), str(price), pair=pair))  # type: ignore[arg-type]
        elif kind == "mark":
            p.mark(pair, op[2])  # type: ignore[arg-type]
        elif kind == "funding":
            p.apply_funding(pair, op[2], op[3])  # type: ignore[arg-type]
        elif kind == "dust":
            p.drop_dust(pair, Decimal("0.001"))
        else:
            p.restore(cash=p.cash, positions=list(p.positions().values()))
        summed = Decimal(0)
        for position in p.positions().values():
            price = position.mark_price if position.mark_price is not None else position.entry_price
            signed = position.qty if position.side is PositionSide.LONG else -position.qty
            summed += signed * price
        assert p.equity() == p.cash + summed


def test_spot_buy_fee_in_base_reduces_the_coins_held() -> None:
    """A buy whose fee is charged in the coin bought holds qty - fee, at an unchanged cost."""
    p = Portfolio(Decimal(10_000))
    buy = Fill(
        "o1",
        "BTC/USDT",
        Side.BUY,
        Decimal(20_000),
        Decimal("0.1"),
        Decimal("0.0001"),
        "BTC",
        Liquidity.TAKER,
        1,
        "f1",
    )
    p.apply_fill(buy)
    position = p.position("BTC/USDT")
    assert position is not None
    assert position.qty == Decimal("0.0999")
    assert p.cash == Decimal(10_000) - Decimal("0.1") * 20_000
    assert p.fees == Decimal("2.0000")
    p.mark("BTC/USDT", Decimal(20_000))
    assert p.equity() == Decimal(10_000) - Decimal(2)


def test_dust_below_the_market_minimum_is_written_off_at_its_value() -> None:
    """A remainder too small to sell leaves the books flat with equity unchanged."""
    p = Portfolio(Decimal(1000))
    p.apply_fill(fill(1, Side.BUY, "1.0000004", "100"))
    p.apply_fill(fill(2, Side.SELL, "1", "110"))
    p.mark("BTC/USDT", Decimal(110))
    before = p.equity()
    assert p.drop_dust("BTC/USDT", below=Decimal("0.000001")) == Decimal("0.0000004")
    assert p.positions() == {}
    assert p.equity() == before
    assert p.drop_dust("BTC/USDT", below=Decimal("0.000001")) == 0


@given(
    holding=st.sampled_from([None, Side.BUY, Side.SELL]),
    closes=st.lists(
        st.floats(min_value=1, max_value=1e6, allow_nan=False).map(lambda x: round(x, 2)),
        min_size=1,
        max_size=40,
    ),
    start=st.integers(min_value=0, max_value=3),
)
@settings(deadline=None)
def test_equity_run_equals_marking_and_recording_candle_by_candle(
    holding: Side | None, closes: list[float], start: int
) -> None:
    """record_equity_run gives the curve, peak and drawdown of the per-candle calls."""
    pair = "BTC/USDT"
    books = [Portfolio(Decimal(1000)) for _ in range(2)]
    for p in books:
        if holding is not None:
            p.apply_fill(fill(1, holding, "0.5", "900", "0.45"))
        for t in range(start):  # some history before the run
            p.record_equity(t)
    ts = [100 + 60 * i for i in range(len(closes))]
    one_call, per_candle = books
    one_call.record_equity_run(pair, ts, closes)
    for t, close in zip(ts, closes, strict=True):
        per_candle.mark(pair, Decimal(repr(close)))
        per_candle.record_equity(t)
    assert one_call.equity_curve == per_candle.equity_curve
    assert one_call.peak_equity == per_candle.peak_equity
    assert one_call.max_drawdown == per_candle.max_drawdown
    assert one_call.equity() == per_candle.equity()


@given(
    holding=st.sampled_from([None, Side.BUY, Side.SELL]),
    closes=st.lists(
        st.floats(min_value=500, max_value=1_500, allow_nan=False).map(lambda x: round(x, 2)),
        min_size=1,
        max_size=40,
    ),
)
@settings(deadline=None)
def test_running_drawdown_is_analytics_max_drawdown(
    holding: Side | None, closes: list[float]
) -> None:
    """The portfolio's running max drawdown is analytics.max_drawdown of its curve."""
    p = Portfolio(Decimal(1000))
    if holding is not None:
        p.apply_fill(fill(1, holding, "0.5", "900", "0.45"))
    p.record_equity_run("BTC/USDT", [100 + 60 * i for i in range(len(closes))], closes)
    curve = [v for _, v in p.equity_curve]
    expected = analytics.max_drawdown(curve, start=float(p.starting_cash))
    assert p.max_drawdown == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("side", "add_price", "adds"),
    [(Side.BUY, "95", 1), (Side.BUY, "105", 0), (Side.SELL, "105", 1), (Side.SELL, "95", 0)],
)
def test_closed_trade_counts_adds_at_a_loss_once(side: Side, add_price: str, adds: int) -> None:
    """Adding at a worse price than the entry is averaging down; the first close reports it."""
    p = Portfolio(Decimal(1000))
    exit_side = Side.SELL if side is Side.BUY else Side.BUY
    p.apply_fill(fill(1, side, "1", "100"))
    p.apply_fill(fill(2, side, "1", add_price))
    first = p.apply_fill(fill(3, exit_side, "1", "100"))
    second = p.apply_fill(fill(4, exit_side, "1", "100"))
    assert first is not None
    assert second is not None
    assert (first.adds_at_loss, second.adds_at_loss) == (adds, 0)


def test_closed_trade_carries_the_stop_in_force_at_entry() -> None:
    """A trailed stop does not replace the entry stop the trade reports."""
    p = Portfolio(Decimal(1000))
    p.apply_fill(fill(1, Side.BUY, "1", "100"))
    p.set_protection("BTC/USDT", stop=Decimal("95"))
    p.set_protection("BTC/USDT", stop=Decimal("99"))  # trailed up
    trade = p.apply_fill(fill(2, Side.SELL, "1", "98"))
    assert trade is not None
    assert trade.stop_price == 95.0
    p.apply_fill(fill(3, Side.BUY, "1", "100"))
    unprotected = p.apply_fill(fill(4, Side.SELL, "1", "101"))
    assert unprotected is not None
    assert unprotected.stop_price is None


@settings(deadline=None, max_examples=40)
@given(fills_strategy)
def test_positions_view_reads_as_positions(
    steps: list[tuple[Side, Decimal, Decimal, Decimal, str]],
) -> None:
    """The lazy positions view holds the same pairs and positions as `positions()`, in order,
    whether a position is read by key, by iteration or by `get`; closed pairs are absent."""
    p = Portfolio(Decimal(10_000))
    for n, (side, qty, price, fee, pair) in enumerate(steps):
        p.apply_fill(fill(n, side, str(qty), str(price), str(fee), pair))
        p.mark(pair, price + 1)
        eager, view = p.positions(), p.positions_view()
        assert list(view) == list(eager)
        assert len(view) == len(eager)
        assert view.get(pair) == eager.get(pair)
        assert dict(view.items()) == eager
        for other in ("BTC/USDT", "ETH/USDT", "SOL/USDT"):
            assert (other in view) is (other in eager)
            if other not in eager:
                with pytest.raises(KeyError):
                    view[other]


_book = st.tuples(
    st.decimals("-50", "50", places=4).filter(lambda q: q != 0),
    st.decimals("0.01", "70000", places=2),
    st.none() | st.decimals("0.01", "70000", places=2),
)


@settings(max_examples=100, deadline=None)
@given(books=st.dictionaries(st.sampled_from(["A/U", "B/U", "C/U", "D/U"]), _book, max_size=4))
def test_a_positions_view_reads_exposure_and_sides_off_the_books_as_its_positions_give_them(
    books: dict[str, tuple[Decimal, Decimal, Decimal | None]],
) -> None:
    """The view's gross notional is the sum of its positions' notionals, and its sides and
    `get` are theirs, without building them (risk reads these for every entry)."""
    from portfolio import _Open

    portfolio = Portfolio(Decimal(10_000))
    for pair, (qty, entry, mark) in books.items():
        portfolio._open[pair] = _Open(qty, entry, 0, Decimal(0), mark=mark)
    view = portfolio.positions_view()
    assert view.gross_notional() == sum((p.notional for p in portfolio.positions().values()), 0)
    assert not view._built  # nothing built so far
    for pair in books:
        assert view.side(pair) is portfolio.positions()[pair].side
    assert view.get("Z/U") is None
    for pair in books:
        assert view.get(pair) == portfolio.positions()[pair]


def test_an_infinite_mark_and_the_next_finite_one_give_the_summed_equity() -> None:
    """A mark that leaves an infinite one (bad data past the checks) does not stick: the
    positions' value is counted again, as summing them gives."""
    p = Portfolio(Decimal(1000))
    p.apply_fill(fill(1, Side.BUY, "2", "100"))
    p.apply_fill(fill(2, Side.SELL, "1", "50", pair="ETH/USDT"))
    p.mark("BTC/USDT", Decimal("Infinity"))
    assert p.equity() == Decimal("Infinity")
    p.mark("BTC/USDT", Decimal("110"))
    p.mark("ETH/USDT", Decimal("40"))
    assert p.equity() == p.cash + 2 * Decimal(110) - Decimal(40)
