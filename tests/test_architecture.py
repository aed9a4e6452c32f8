"""Dependency direction (STYLE rule 1): main -> runner -> pipeline -> components -> leaves.

Imports are read with `ast`, lazy ones inside functions included, so a back-edge fails here
whatever line it hides on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT


LEAVES = {"models", "error_handler", "config", "utils", "run_summary"}
OURS = {p.stem for p in ROOT.glob("*.py")} | {"utils"}
# Component-to-component edges we accept, each for a stated reason. Anything else fails.
ALLOWED = {
    ("trade_executor", "portfolio"): "the executor applies fills to the portfolio it is given",
    ("trade_simulator", "strategy"): "the backtest fast path runs a strategy's populate()",
    ("analytics", "trade_simulator"): "metrics read BacktestResult (for types only)",
    ("trade_simulator", "analytics"): "BacktestResult's max drawdown is analytics' definition",
    ("reward_system", "analytics"): "the score's Sharpe and drawdown are analytics' definitions",
    ("ui", "analytics"): "the status view's max drawdown is analytics' definition",
    ("parameter_optimization", "strategy"): "the optimiser searches a strategy's parameters",
    ("parameter_optimization", "trade_simulator"): "each candidate is a fast-path backtest",
    ("parameter_optimization", "data_manager"): "its CLI entry loads candles",
    ("parameter_optimization", "analytics"): "scores use analytics' metric definitions",
    ("data_manager", "technical_indicators"): "detect_patterns delegates to the indicator library",
    ("data_manager", "exchange"): "the backfill CLI entry builds an Exchange (lazily)",
    ("top_pairs", "exchange"): "the pairs CLI entry builds an Exchange (lazily)",
    ("top_pairs", "data_manager"): "point-in-time ranking reads the candle archives",
    ("telegram_bot", "telegram_templates"): "templates are the bot's own module, split for size",
    ("runner", "parameter_optimization"): "sim/live read the approved-parameters file it writes",
    ("reward_system", "trade_simulator"): "score_backtest reads BacktestResult (for types only)",
    ("parameter_optimization", "reward_system"): "the optimiser's objective is the one score",
    # anomaly_detection (a component: candles, books and settings in, Anomaly out) needs no
    # edge: it reads only models, config and utils.
    ("pattern_recognition", "technical_indicators"): "clusters the indicator library's "
    "features, candlestick patterns and regimes",
    ("model_training", "self_learning"): "the supervised filter is a model kind (and its registry)",
    ("model_training", "rl_agent"): "the RL agent is a model kind, resolved by name lazily",
    ("model_training", "analytics"): "validation uses analytics' Sharpe and deflated Sharpe",
    ("model_training", "data_manager"): "a worker loads the pair's candle archive",
    ("model_training", "reward_system"): "the promotion test compares the one score",
    ("self_learning", "strategy"): "a trained RL policy trades as a Strategy (rl_policy)",
    ("strategy", "self_learning"): "load_strategy resolves rl:<dir> to a trained policy (lazily)",
    ("self_learning", "technical_indicators"): "the agent observes the indicator features",
    ("self_learning", "trade_simulator"): "the RL environment fills by the simulator's rules",
    ("self_learning", "reward_system"): "the agent's only reward shaping is the one score",
    ("trade_simulator", "perpetuals"): "the simulator settles funding and liquidates positions",
    ("trade_simulator", "risk_management"): "the standard fast path runs the replay's own "
    "circuit breakers (fast_standard)",
    ("data_manager", "perpetuals"): "replays read the recorded funding beside the candles",
    ("risk_management", "perpetuals"): "risk checks a stop against the liquidation price",
}
# Modules split out of a component for size: each is a part of its owner, so it has the
# owner's allowed edges, the owner and its other parts may import it, and it never imports
# the owner (the owner re-exports it).
OWNER: dict[str, str] = {
    # trade_simulator.py and parameter_optimization.py
    "matching_engine": "trade_simulator",
    "replay_feed": "trade_simulator",
    "replay_stretches": "trade_simulator",
    "fast_path": "trade_simulator",
    "fast_kernels": "trade_simulator",
    "fast_standard": "trade_simulator",
    "fast_portfolio": "trade_simulator",
    "fast_segments": "trade_simulator",
    "sim_perpetuals": "trade_simulator",
    "optimization_scoring": "parameter_optimization",
    "search_space": "parameter_optimization",
    "optimization_backends": "parameter_optimization",
    "genetic_search": "parameter_optimization",
    "walk_forward_analysis": "parameter_optimization",
    "optimization_run": "parameter_optimization",
    "optimization_cli": "parameter_optimization",
    # risk_management.py, ui.py, telegram_bot.py
    "circuit_breakers": "risk_management",
    "status_view": "ui",
    "dashboard": "ui",
    "web_view": "ui",
    "web_page": "ui",
    "telegram_outbox": "telegram_bot",
    "telegram_commands": "telegram_bot",
    # exchange.py
    "exchange_base": "exchange",
    "rate_budgets": "exchange",
    "bybit_client": "exchange",
    "bybit_converters": "exchange",
    "bybit_orders": "exchange",
    "bybit_funding": "exchange",
    "bybit_streams": "exchange",
    # trade_store.py
    "trade_schema": "trade_store",
    "trade_journal": "trade_store",
    "trade_records": "trade_store",
    # runner.py (the daemon's parts)
    "daemon_base": "runner",
    "daemon_live": "runner",
    "daemon_state": "runner",
    "daemon_operator": "runner",
    "backtest_fast": "runner",
    # trade_executor.py
    "executor_core": "trade_executor",
    "order_protection": "trade_executor",
    "order_recovery": "trade_executor",
    "order_pieces": "trade_executor",
    "order_amend": "trade_executor",
    "audit_fields": "trade_executor",  # the order path's audit events (the engine's too)
    # technical_indicators.py and data_manager.py
    "indicator_kernels": "technical_indicators",
    "indicator_base": "technical_indicators",
    "kestrel_indicators": "technical_indicators",
    "indicator_registry": "technical_indicators",
    "indicator_formulas": "technical_indicators",
    "candle_patterns": "technical_indicators",
    "feature_engine": "technical_indicators",
    "candle_frames": "data_manager",
    "candle_store": "data_manager",
    "candle_backfill": "data_manager",
    # analytics.py (the one metrics module)
    "overfitting": "analytics",
    # parameter_optimization.py: Pareto search, robustness, reports, approved parameters
    "pareto_search": "parameter_optimization",
    "sensitivity": "parameter_optimization",
    "pareto_run": "parameter_optimization",
    "approved_params": "parameter_optimization",
    "pareto_cli": "parameter_optimization",
    "optimization_report": "parameter_optimization",
    "report_risk": "analytics",
    # pipeline.py
    "chart_data": "pipeline",
    "signal_sources": "pipeline",
    "monte_carlo": "analytics",
    "risk_guards": "risk_management",
    "risk_state": "risk_management",
    # reward_system.py
    "score_penalties": "reward_system",
    # self_learning.py (the registry the supervised filter is one kind of)
    "model_registry": "self_learning",
    # self_learning.py (the reinforcement-learning core)
    "rl_policy": "self_learning",
    "rl_env": "self_learning",
    "rl_agent": "self_learning",
    # model_training.py (walk-forward folds of a challenger's validation)
    "model_validation": "model_training",
    # runner.py: one builder per mode over the shared assembly, and the exchange's feed
    "assembly": "runner",
    "mode_builders": "runner",
    "market_feed": "runner",
    "daemon_learning": "runner",
    "candle_reader": "data_manager",
    # pipeline.py (the backtest replay's quiet steps, which Engine inherits)
    "engine_quiet": "pipeline",
    "burst": "runner",  # the pipeline loop's bursts, decided together
    "burst_rehearsal": "runner",  # a burst's passes rehearsed before each close
    "batch_signals": "pipeline",  # a burst's indicators in one pass (the signal sources')
    "strategy_exact": "strategy",  # the kernels' exact near-tie decisions, in ticks
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {name for name in found if name in OURS and name != path.stem}


def _allowed(module: str, dep: str) -> bool:
    owner, dep_owner = OWNER.get(module, module), OWNER.get(dep, dep)
    if dep == owner != module:
        return False  # a part never imports its owner
    return owner == dep_owner or (owner, dep_owner) in ALLOWED


GRAPH = {p.stem: _imports(p) for p in sorted(ROOT.glob("*.py"))}
# The utils package as one node (its modules may import each other).
GRAPH["utils"] = set().union(*(_imports(p) for p in (ROOT / "utils").glob("*.py"))) - {"utils"}


def test_nothing_imports_main() -> None:
    """No module imports main."""
    assert not [m for m, deps in GRAPH.items() if "main" in deps]


def test_only_main_imports_runner_and_only_runner_imports_pipeline() -> None:
    """The wiring layers are imported from above only."""
    assert {OWNER.get(m, m) for m, deps in GRAPH.items() if "runner" in deps} <= {"main"}
    assert {OWNER.get(m, m) for m, deps in GRAPH.items() if "pipeline" in deps} <= {"runner"}


@pytest.mark.parametrize("leaf", ["models", "error_handler"])
def test_leaves_import_nothing_of_ours(leaf: str) -> None:
    """models and error_handler sit at the bottom."""
    assert GRAPH[leaf] == set()


def test_config_and_utils_stay_low() -> None:
    """config and utils depend only on the leaves."""
    assert GRAPH["config"] <= {"error_handler"}
    assert GRAPH["utils"] <= {"error_handler", "models", "config"}


WIRING = {"main", "runner", "pipeline"}  # the wiring layers (and their parts) import down


@pytest.mark.parametrize(
    "module", sorted(m for m in set(GRAPH) - LEAVES - WIRING if OWNER.get(m) not in WIRING)
)
def test_components_import_each_other_only_where_allowed(module: str) -> None:
    """A component imports leaves, or another component only on a documented edge."""
    unexpected = {dep for dep in GRAPH[module] - LEAVES if not _allowed(module, dep)}
    assert not unexpected, f"{module} imports {sorted(unexpected)}"


@pytest.mark.parametrize(("part", "owner"), sorted(OWNER.items()))
def test_split_out_parts_exist_and_never_import_their_owner(part: str, owner: str) -> None:
    """A part split out of a module is a real module and does not import back into it."""
    assert part in GRAPH
    assert owner in GRAPH
    assert owner not in GRAPH[part]


def test_the_run_summary_sits_beside_models() -> None:
    """run_summary (the typed `--summary-json`) imports only models."""
    assert GRAPH["run_summary"] <= {"models"}


# -- Sizes (STYLE: no class over 400 lines, no function over 80) ------------------------------

MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 1_000
# Production code: the flat modules and the utils package (not tests, not benchmarks).
PRODUCTION = sorted(ROOT.glob("*.py")) + sorted((ROOT / "utils").glob("*.py"))
# Over a limit while another change to the same file is in flight (none now); each is split
# once that change lands, and its line goes with it. Nothing new belongs here.
SIZE_EXEMPT: dict[str, str] = {}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _oversized(path: Path) -> dict[str, int]:
    """Return each class and function of `path` over its limit: qualified name -> lines.

    A definition's lines run from its `class`/`def` line to its last line (decorators
    aside, docstring and nested definitions included); nested ones are measured too.
    """
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, prefix)
                continue
            name = f"{prefix}.{child.name}"
            limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
            lines = (child.end_lineno or child.lineno) - child.lineno + 1
            if lines > limit:
                found[name] = lines
            visit(child, name)

    visit(ast.parse(path.read_text(encoding="utf-8")), _module_name(path))
    return found


@pytest.mark.parametrize("path", PRODUCTION, ids=_module_name)
def test_no_class_over_400_lines_and_no_function_over_80(path: Path) -> None:
    """Every production class stays within 400 lines and every function within 80."""
    over = {name: n for name, n in _oversized(path).items() if name not in SIZE_EXEMPT}
    assert not over, f"split these (lines): {over}"


def test_every_size_exemption_is_still_needed() -> None:
    """An exemption names a definition that is still over its limit (else its line goes)."""
    found: dict[str, int] = {}
    for path in PRODUCTION:
        found |= _oversized(path)
    stale = sorted(set(SIZE_EXEMPT) - set(found))
    assert not stale, f"within the limits now (or gone): drop {stale} from SIZE_EXEMPT"


@pytest.mark.parametrize("path", PRODUCTION, ids=_module_name)
def test_no_production_module_over_1000_lines(path: Path) -> None:
    """Every production module (repo root and utils/) stays within 1,000 lines."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_module_name(path)} has {lines} lines: split it"
