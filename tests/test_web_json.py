"""The web view's fast JSON encoder writes the same documents as `to_jsonable` + json."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import (
    Decision,
    Order,
    OrderBook,
    PortfolioSnapshot,
    Ranked,
    Side,
    Signal,
    Snapshot,
)
from tests.test_ui_support import make_snapshot
from web_view import (
    _ENCODE_SLICE_S,
    _dumps,
    _encode_in_slices,
    _encode_snapshot,
    encode_json,
    to_jsonable,
)


class _Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class _Mixed(str, enum.Enum):  # noqa: UP042 (the mixed kind is the point)
    # str() of a (str, Enum) member is "_Mixed.A", not its value: a dict key of this kind
    # must still come out as to_jsonable writes it.
    A = "a"


@dataclasses.dataclass(frozen=True)
class _Record:
    name: str
    _hidden: Any  # orjson's own dataclass form would skip this field
    value: Any


def _reference(value: Any) -> Any:
    """Return the document the web view wrote before orjson, parsed."""
    return json.loads(_dumps(to_jsonable(value)))


_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats()  # NaN and infinities included
    | st.decimals()  # NaN, sNaN and infinities included
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "é", "\u2028", '"\\'])  # a lone surrogate, escapes
    | st.sampled_from([Side.BUY, _Level.HIGH, _Mixed.A])
    | st.datetimes(timezones=st.just(UTC))
)
_KEYS = st.text(max_size=4) | st.integers(-3, 3) | st.sampled_from([_Mixed.A, _Level.LOW, None])


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=4)
        | st.dictionaries(_KEYS, children, max_size=4)
        | st.builds(_Record, st.text(max_size=4), children, children)
    )


_VALUES = st.recursive(_LEAVES, _containers, max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_VALUES)
def test_encode_json_parses_equal_to_the_reference(value: Any) -> None:
    """Any nesting of the types a snapshot holds gives the same JSON as to_jsonable + json."""
    assert json.loads(encode_json(value)) == _reference(value)


_SNAPSHOTS = st.builds(
    Snapshot,
    ts=st.integers(0, 2**62),
    mode=st.sampled_from(["sim", "live"]),
    portfolio=st.from_type(PortfolioSnapshot),
    pairs=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    recent_trades=st.lists(st.from_type(Order), max_size=2).map(tuple),
    open_orders=st.lists(st.from_type(Order), max_size=2).map(tuple),
    equity_curve=st.lists(st.tuples(st.integers(0, 2**62), st.floats()), max_size=20).map(tuple),
    last_decisions=st.dictionaries(
        st.text(max_size=8),
        st.builds(
            Decision,
            signal=st.none() | st.from_type(Signal),
            features=st.dictionaries(st.text(max_size=4), st.floats(), max_size=3),
        ),
        max_size=2,
    ),
    order_books=st.dictionaries(st.text(max_size=8), st.from_type(OrderBook), max_size=2),
    scores=st.dictionaries(st.text(max_size=4), st.floats(), max_size=3),
    errors=st.lists(st.text(max_size=8), max_size=2).map(tuple),
    rate_limit_budget=st.dictionaries(st.text(max_size=4), st.floats(), max_size=2),
    risk=st.dictionaries(st.text(max_size=6), _VALUES, max_size=3),
    model=st.dictionaries(st.text(max_size=6), _VALUES, max_size=2),
    ranking=st.lists(st.from_type(Ranked), max_size=2).map(tuple),
    anomalies=st.dictionaries(st.text(max_size=6), st.dictionaries(_KEYS, _VALUES), max_size=2),
    markets=st.dictionaries(
        st.text(max_size=6), st.dictionaries(st.text(max_size=4), st.floats()), max_size=2
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SNAPSHOTS)
def test_snapshot_body_parses_equal_to_the_reference(snapshot: Snapshot) -> None:
    """A /api/snapshot body with every field type is the Snapshot as to_jsonable writes it."""
    assert json.loads(_encode_snapshot(snapshot)) == _reference(snapshot)


def test_known_snapshot_body_and_exclusions() -> None:
    """The sample snapshot encodes as the reference; excluded fields are left out, in order."""
    snapshot = make_snapshot()
    full = json.loads(_encode_snapshot(snapshot))
    assert full == _reference(snapshot)
    assert full["portfolio"]["equity"] == "10321.45"  # Decimals stay exact strings
    assert full["state"] == "running"
    excluded = frozenset({"ts", "equity_curve", "allocation"})
    partial = json.loads(_encode_snapshot(snapshot, excluded))
    assert list(partial) == [k for k in full if k not in excluded]
    assert partial == {k: v for k, v in full.items() if k not in excluded}


def test_encode_json_writes_utf8_and_nulls_non_finite_values() -> None:
    """Non-ASCII text is UTF-8, NaN and infinite Decimals are null, datetimes their str()."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = encode_json({"pair": "é/USDT", "x": Decimal("-Infinity"), "f": float("nan"), "t": when})
    assert body == '{"pair":"é/USDT","x":null,"f":null,"t":"2026-01-02 03:04:05+00:00"}'.encode()


async def test_encoding_in_slices_lets_the_loop_run_between_long_parts() -> None:
    """A part that holds the loop past the slice budget is followed by a yield to the loop."""
    ran: list[str] = []

    def parts() -> Iterator[bytes]:
        for name in ("a", "b", "c"):
            ran.append(f"part {name}")
            time.sleep(_ENCODE_SLICE_S * 1.5)  # one part longer than a slice
            yield name.encode()

    async def other() -> None:
        while len(ran) < 6:
            ran.append("other")
            await asyncio.sleep(0)

    body, _ = await asyncio.gather(_encode_in_slices(parts()), other())
    assert body == b"abc"
    # The other task ran after each part, not only once the whole body was done.
    assert ran[:6] == ["part a", "other", "part b", "other", "part c", "other"]
