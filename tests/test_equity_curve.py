"""The packed equity curve behaves exactly like the list of (ts, value) tuples it replaces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from utils.equity_curve import EquityCurve


_values = st.floats(allow_nan=False, allow_infinity=False, width=64)
_op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 2**62), _values),
    st.tuples(st.just("set_last"), st.integers(0, 2**62), _values),
    st.tuples(st.just("flat"), st.lists(st.integers(0, 2**62), max_size=5), _values),
)


@given(st.lists(_op, max_size=40))
def test_packed_curve_matches_a_list_of_tuples(ops: list[tuple[str, object, float]]) -> None:
    """Any sequence of appends, last-point replacements and flat runs reads back identically."""
    curve, model = EquityCurve(), []
    for kind, ts, value in ops:
        if kind == "append":
            assert isinstance(ts, int)
            curve.append(ts, value)
            model.append((ts, value))
        elif kind == "set_last" and model:
            assert isinstance(ts, int)
            curve.set_last(ts, value)
            model[-1] = (ts, value)
        elif kind == "flat":
            assert isinstance(ts, list)
            curve.extend_flat(ts, value)
            model.extend((t, value) for t in ts)
    assert list(curve) == model
    assert curve == model
    assert len(curve) == len(model)
    assert curve[-3:] == model[-3:]
    assert bool(curve) == bool(model)
    if model:
        assert curve[-1] == model[-1] == (curve.last_ts, curve.last_value)
    ts, values = curve.arrays()
    assert ts.dtype == np.int64
    assert values.dtype == np.float64
    assert ts.tolist() == [t for t, _ in model]
    assert values.tolist() == [v for _, v in model]
    assert curve == EquityCurve(model)


def test_packed_curve_costs_sixteen_bytes_a_point() -> None:
    """A million points occupy about 16 MB of buffers, not the ~110 MB a tuple list needs."""
    curve = EquityCurve()
    curve.extend_flat(range(1_000_000), 1.0)
    ts, values = curve.arrays()
    assert ts.nbytes + values.nbytes == 16_000_000
    assert curve._ts.buffer_info()[1] * curve._ts.itemsize < 20_000_000


def test_views_read_the_curve_in_place_and_block_growth_while_alive() -> None:
    """`views` gives the points without a copy; the curve cannot grow until they are gone."""
    curve = EquityCurve([(60_000, 100.0), (120_000, 101.5)])
    ts, values = curve.views()
    copied_ts, copied_values = curve.arrays()
    np.testing.assert_array_equal(ts, copied_ts)
    np.testing.assert_array_equal(values, copied_values)
    curve.set_last(120_000, 99.0)  # same size: the view sees it
    assert values[-1] == 99.0
    with pytest.raises(BufferError):
        curve.append(180_000, 98.0)
    del ts, values
    curve.append(180_000, 98.0)
    assert len(curve) == 3
