"""The formula language: indicators defined by a whitelisted expression, compiled from `ast`.

`register_formula` parses the expression and compiles only numbers, candle columns,
parameters, arithmetic, comparisons, a few numpy helpers and registered indicators.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from indicator_base import _COLUMN_ORDER, IndicatorError, IndicatorInfo, Output, ParamValue, _Spec
from indicator_kernels import FloatArray, _shift
from indicator_registry import _coerce, _outputs, _register, _slots, _spec


_MAX_FORMULA_CHARS: Final = 2000
_MAX_FORMULA_NODES: Final = 400
_UNARY_FUNCS: Final[dict[str, Callable[[Any], Any]]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "log": np.log,
    "exp": np.exp,
    "sign": np.sign,
}
_BINARY_FUNCS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "min": np.minimum,  # NaN-propagating: a warm-up NaN stays NaN
    "max": np.maximum,
}
_BINOPS: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
    ast.Pow: np.power,
    ast.Mod: np.mod,
}
_CMPOPS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
}

Evaluator: TypeAlias = Callable[["_Context"], Any]
Warmup: TypeAlias = Callable[[Mapping[str, Any]], int]


@dataclass(slots=True)
class _Context:
    columns: dict[str, npt.NDArray[Any]]
    params: Mapping[str, Any]


@dataclass(slots=True)
class _FormulaCompiler:
    """Turn a whitelisted expression AST into closures; anything else is refused."""

    name: str
    params: Mapping[str, ParamValue]
    columns: set[str] = field(default_factory=set)

    def fail(self, message: str) -> IndicatorError:
        return IndicatorError(f"formula {self.name}: {message}", component="technical_indicators")

    def compile(self, node: ast.AST) -> tuple[Evaluator, Warmup]:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            value = float(node.value)  # (bools are ints: True reads as 1.0)
            return (lambda _ctx: value), (lambda _p: 0)
        if isinstance(node, ast.Name):
            return self.name_node(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner, warm = self.compile(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return (lambda ctx: sign * inner(ctx)), warm
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.combine(_BINOPS[type(node.op)], node.left, node.right)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            op = _CMPOPS[type(node.ops[0])]
            return self.combine(_compare(op), node.left, node.comparators[0])
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call):
            return self.call(node.value, node.attr)
        if isinstance(node, ast.Call):
            return self.call(node, None)
        raise self.fail(f"{type(node).__name__} is not allowed")

    def name_node(self, name: str) -> tuple[Evaluator, Warmup]:
        if name in self.params:
            return (lambda ctx: ctx.params[name]), (lambda _p: 0)
        if name in _COLUMN_ORDER:
            self.columns.add(name)
            return (lambda ctx: ctx.columns[name]), (lambda _p: 0)
        raise self.fail(f"unknown name {name!r}")

    def combine(
        self, op: Callable[[Any, Any], Any], left: ast.AST, right: ast.AST
    ) -> tuple[Evaluator, Warmup]:
        lhs, lwarm = self.compile(left)
        rhs, rwarm = self.compile(right)
        return (lambda ctx: op(lhs(ctx), rhs(ctx))), (lambda p: max(lwarm(p), rwarm(p)))

    def call(self, node: ast.Call, output: str | None) -> tuple[Evaluator, Warmup]:
        if not isinstance(node.func, ast.Name):
            raise self.fail("only plain function names may be called")
        fname = node.func.id
        args = [self.compile(arg) for arg in node.args]
        if fname in _UNARY_FUNCS or fname in _BINARY_FUNCS or fname == "shift":
            if node.keywords or output is not None:
                raise self.fail(f"{fname}() takes positional arguments only")
            return self.helper(fname, args, node)
        if fname == self.name:
            raise self.fail("a formula cannot call itself")
        inner = _spec(fname)
        index = 0
        if output is not None:
            if output not in inner.info.outputs:
                raise self.fail(f"{fname} has no output {output!r}")
            index = inner.info.outputs.index(output)
        elif len(inner.info.outputs) > 1:
            raise self.fail(f"pick an output of {fname}: {', '.join(inner.info.outputs)}")
        kwargs = {kw.arg: self.keyword(kw.value) for kw in node.keywords if kw.arg}
        _coerce(inner, dict.fromkeys(kwargs, 0))
        if args and len(args) != len(inner.info.columns):
            raise self.fail(f"{fname} takes {len(inner.info.columns)} input series")
        if not args:
            self.columns.update(inner.info.columns)
        return self.indicator_call(fname, index, args, kwargs)

    def keyword(self, node: ast.AST) -> Callable[[Mapping[str, Any]], Any]:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
            return lambda _p: value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.keyword(node.operand)
            return lambda p: -inner(p)
        if isinstance(node, ast.Name) and node.id in self.params:
            key = node.id
            return lambda p: p[key]
        raise self.fail("indicator parameters must be numbers or formula parameters")

    def indicator_call(
        self,
        fname: str,
        index: int,
        args: list[tuple[Evaluator, Warmup]],
        kwargs: dict[str, Callable[[Mapping[str, Any]], Any]],
    ) -> tuple[Evaluator, Warmup]:
        def evaluate(ctx: _Context) -> Any:
            inner = _spec(fname)
            params = _coerce(inner, {k: f(ctx.params) for k, f in kwargs.items()})
            if args:
                size = len(next(iter(ctx.columns.values())))
                arrays = [_as_series(arg(ctx), size) for arg, _ in args]
            else:
                arrays = [ctx.columns[c] for c in inner.info.columns]
            return _outputs(inner.call(arrays, params))[index].astype(np.float64, copy=False)

        def warm(p: Mapping[str, Any]) -> int:
            inner = _spec(fname)
            params = {**inner.info.params, **_coerce(inner, {k: f(p) for k, f in kwargs.items()})}
            return inner.warmup_fn(params) + max((w(p) for _, w in args), default=0)

        return evaluate, warm

    def helper(
        self, fname: str, args: list[tuple[Evaluator, Warmup]], node: ast.Call
    ) -> tuple[Evaluator, Warmup]:
        if fname in _UNARY_FUNCS and len(args) == 1:
            func, (arg, warm) = _UNARY_FUNCS[fname], args[0]
            return (lambda ctx: func(arg(ctx))), warm
        if fname in _BINARY_FUNCS and len(args) == 2:
            return self.combine(_BINARY_FUNCS[fname], node.args[0], node.args[1])
        if fname == "shift" and len(args) == 2:
            periods = node.args[1]
            if not (isinstance(periods, ast.Constant) and type(periods.value) is int):
                raise self.fail("shift(x, n) needs a literal whole n")
            if periods.value < 0:
                raise self.fail("shift(x, n) with n < 0 would read the future")
            n_bars, (arg, warm) = periods.value, args[0]

            def shifted(ctx: _Context) -> Any:
                size = len(next(iter(ctx.columns.values())))
                return _shift(_as_series(arg(ctx), size).astype(np.float64), n_bars)

            return shifted, (lambda p: warm(p) + n_bars)
        raise self.fail(f"wrong number of arguments to {fname}()")


def _compare(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def compare(a: Any, b: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return np.where(np.isnan(a) | np.isnan(b), np.nan, op(a, b).astype(np.float64))

    return compare


def _as_series(value: Any, size: int) -> FloatArray:
    array = np.asarray(value, dtype=np.float64)
    return np.full(size, float(array)) if array.ndim == 0 else array


def register_formula(
    name: str,
    expression: str,
    *,
    params: Mapping[str, ParamValue] | None = None,
    description: str = "",
    replace: bool = False,
) -> IndicatorInfo:
    """Register an indicator defined by a formula over columns and registered indicators.

    The expression is parsed with `ast` and only a whitelist is compiled: numbers, the
    columns open/high/low/close/volume, formula parameters, + - * / ** %, comparisons
    (1.0/0.0, NaN in warm-up), abs/sqrt/log/exp/sign, min/max, shift(x, n >= 0), and calls
    to registered indicators with input series as positional arguments (default: their
    usual columns), numeric keyword parameters and `.output` to pick one of several.
    Nothing is ever passed to `eval`. Example::

        register_formula("ema_gap", "ema(close, timeperiod=fast) - ema(close, timeperiod=slow)",
                         params={"fast": 10, "slow": 30})

    Returns:
        The new indicator's info.

    Raises:
        IndicatorError: for a syntax error, a name or construct outside the whitelist, or a
            name already taken.
    """
    defaults = dict(params or {})
    if len(expression) > _MAX_FORMULA_CHARS:
        raise IndicatorError(f"formula {name}: too long", component="technical_indicators")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise IndicatorError(f"formula {name}: {e.msg}", component="technical_indicators") from e
    if sum(1 for _ in ast.walk(tree)) > _MAX_FORMULA_NODES:
        raise IndicatorError(f"formula {name}: too complex", component="technical_indicators")
    compiler = _FormulaCompiler(name, defaults)
    evaluate, warm = compiler.compile(tree.body)
    columns = tuple(c for c in _COLUMN_ORDER if c in compiler.columns) or ("close",)

    def call(*arrays: npt.NDArray[Any], **kwargs: Any) -> Output:
        ctx = _Context(dict(zip(columns, arrays, strict=True)), {**defaults, **kwargs})
        with np.errstate(divide="ignore", invalid="ignore"):
            return _as_series(evaluate(ctx), len(arrays[0]))

    def warmup(p: Mapping[str, Any]) -> int:
        return warm({**defaults, **p})

    info = IndicatorInfo(
        name=name,
        group="Formula",
        source="formula",
        inputs=_slots(columns),
        params=MappingProxyType(defaults),
        outputs=(name,),
        warmup=warmup(defaults),
        memory=None,
        description=description or expression,
    )
    _register(
        _Spec(info, call, warmup, frozenset(s for s, _ in info.inputs), frozenset(defaults)),
        replace,
    )
    return info
