"""`models.fast_init`: a frozen message's faster constructor behaves as the dataclass's own."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import models
from models import fast_init
from pipeline import DeferredOrder
from risk_guards import Resize, RiskContext


def _twins() -> tuple[type, type]:
    # The same class twice: the dataclass's constructor, and fast_init's.
    made = []
    for _ in range(2):

        @dataclass(frozen=True, slots=True)
        class Message:
            pair: str
            qty: int
            note: str = "none"
            tags: list[int] = field(default_factory=list)
            limit: int | None = None

            def __post_init__(self) -> None:
                if isinstance(self.qty, int) and self.qty < 0:
                    raise ValueError("negative qty")

        made.append(Message)
    return made[0], fast_init(made[1])


PLAIN, FAST = _twins()
_VALUES = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.none(), st.lists(st.integers()))


def _build(cls: type, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", cls(*args, **kwargs)
    except Exception as e:  # the same refusal is expected from both
        return type(e).__name__, str(e).replace(cls.__qualname__, "Message")


@given(
    args=st.lists(_VALUES, max_size=6),
    kwargs=st.dictionaries(st.sampled_from(["pair", "qty", "note", "tags", "limit", "x"]), _VALUES),
)
def test_fast_init_builds_or_refuses_exactly_as_the_dataclass_does(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    """Any call: the same fields (the very objects passed), or the same error and message."""
    want_kind, want = _build(PLAIN, args, kwargs)
    got_kind, got = _build(FAST, args, kwargs)
    assert got_kind == want_kind
    if want_kind != "ok":
        assert got == want
        return
    for f in dataclasses.fields(PLAIN):
        mine, theirs = getattr(got, f.name), getattr(want, f.name)
        if f.name == "tags" and "tags" not in kwargs and len(args) < 4:
            assert mine == theirs == []  # a fresh list from the factory
        else:
            assert mine is theirs


def test_fast_init_keeps_the_signature_and_the_frozen_contract() -> None:
    """Same parameters and defaults; assignment and deletion still raise; copies compare equal."""
    assert str(inspect.signature(FAST)) == str(inspect.signature(PLAIN))
    one, two = FAST("BTC/USDT", 1), FAST("BTC/USDT", 1)
    assert one.tags is not two.tags  # each instance its own default list
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.qty = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del one.qty
    assert copy.deepcopy(one) == one
    assert dataclasses.replace(one, qty=3).qty == 3
    assert repr(one) == repr(PLAIN("BTC/USDT", 1))
    candle = models.Candle("BTC/USDT", "1m", 60_000, 1.0, 2.0, 0.5, 1.5, 10.0)
    assert pickle.loads(pickle.dumps(candle)) == candle


def test_fast_init_leaves_other_shapes_to_the_dataclass() -> None:
    """Not frozen, not slotted, keyword-only or InitVar fields: the class comes back as it was."""

    @dataclass(slots=True)
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        scale: InitVar[int] = 1

    shapes: list[type] = [Mutable, NoSlots, KeywordOnly, WithInitVar]
    for cls in shapes:
        before = vars(cls)["__init__"]
        assert vars(fast_init(cls))["__init__"] is before


@pytest.mark.parametrize(
    "cls",
    [
        models.Candle,
        models.Signal,
        models.OrderIntent,
        models.Order,
        models.Fill,
        models.Position,
        models.Decision,
        RiskContext,
        Resize,
        DeferredOrder,
    ],
)
def test_order_path_messages_store_every_field_as_passed(cls: type) -> None:
    """Each field gets the object passed for it, positionally and by name; still frozen."""
    fields = dataclasses.fields(cls)
    assert vars(cls)["__init__"].__code__.co_filename.startswith("<fast_init")
    assert list(inspect.signature(cls).parameters) == [f.name for f in fields]
    values = [object() for _ in fields]
    for built in (cls(*values), cls(**{f.name: v for f, v in zip(fields, values, strict=True)})):
        assert all(getattr(built, f.name) is v for f, v in zip(fields, values, strict=True))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(built, fields[0].name, 1)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    required = [f for f in required if f.default_factory is dataclasses.MISSING]
    built = cls(*values[: len(required)])
    for f in fields[len(required) :]:
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(built, f.name) == f.default_factory()
        else:
            assert getattr(built, f.name) is f.default
