"""The reinforcement-learning core: environment = backtest, honest reward, PPO, policy strategy.

One module-scoped training (a few tens of thousands of steps on a constructed
mean-reverting market) serves every test that needs a trained agent; the full-size
demonstrations (three seeds, every held-out path, the no-edge market) are in
benchmarks/bench_rl.py.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_manager import load_candles
from error_handler import DataError
from models import ErrorRaised, Event, Side
from rl_agent import (
    PPOConfig,
    RLKind,
    TrainedPolicy,
    fit_scaling,
    greedy,
    score_shaping,
    train_ppo,
)
from rl_env import Costs, MarketPath, TradingEnv, VectorTradingEnv, run_episode
from rl_policy import FEATURES, NumpyPolicy, RLStrategy, load_policy, raw_features
from strategy import load_strategy
from tests.conftest import ROOT
from trade_simulator import fast_backtest, run_fast


def market(seed: int, n: int, *, reversion: float, volatility: float = 0.01) -> pd.DataFrame:
    """Return hourly candles whose log price reverts to 0 at `reversion` per bar (0: a walk)."""
    rng = np.random.default_rng(seed)
    shocks = volatility * rng.standard_normal(n)
    x = np.zeros(n)
    for i in range(1, n):
        x[i] = (1.0 - reversion) * x[i - 1] + shocks[i]
    close = 100.0 * np.exp(x)
    open_ = np.r_[close[0], close[:-1]]
    index = pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC")
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) * 1.001,
            "low": np.minimum(open_, close) * 0.999,
            "close": close,
            "volume": rng.uniform(1.0, 2.0, n),
        },
        index=index,
    )


def random_policy(seed: int, frames: list[pd.DataFrame]) -> NumpyPolicy:
    """Return an untrained policy with weights large enough to trade often."""
    rng = np.random.default_rng(seed)
    sizes = (len(FEATURES) + 1, 16, 4)
    layers = tuple(
        (
            rng.normal(0, 1.0, (a, b)).astype(np.float32),
            rng.normal(0, 0.1, b).astype(np.float32),
        )
        for a, b in itertools.pairwise(sizes)
    )
    mean, std = fit_scaling(frames)
    return NumpyPolicy(layers, mean, std, {"kind": "rl", "seed": seed})


def path_of(df: pd.DataFrame) -> MarketPath:
    """Return the frame's market path scaled by its own statistics."""
    mean, std = fit_scaling([df])
    return MarketPath.from_frame(df, mean, std)


# -- Reward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_churning_scores_below_staying_flat_on_a_random_walk(seed: int) -> None:
    """On a no-edge walk, flipping every bar loses the costs and scores below staying flat."""
    path = path_of(market(seed, 1500, reversion=0.0))
    flat = run_episode(path, lambda obs: 0)
    churn = run_episode(path, lambda obs: int(obs[-1] == 0))
    assert flat.rewards.sum() == 0.0
    assert flat.fills == 0
    assert churn.fills >= len(path) - 2
    costs = path.costs
    per_fill = np.log1p(costs.fee) + costs.slippage_bps / 1e4
    assert churn.rewards.sum() < flat.rewards.sum() - 0.5 * churn.fills * per_fill
    shaping = score_shaping()
    assert shaping(path.ts, churn.equity) < shaping(path.ts, flat.equity)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_rewards_sum_to_the_log_equity_change(seed: int, switch: float) -> None:
    """Whatever the actions, an episode's rewards sum to log(final / start equity) to 1e-9."""
    path = _WALK
    rng = np.random.default_rng(seed)
    state = {"a": 0}

    def decide(obs: np.ndarray) -> int:
        if rng.random() < switch:
            state["a"] = 1 - state["a"]
        return state["a"]

    episode = run_episode(path, decide)
    assert abs(episode.rewards.sum() - np.log(episode.equity[-1] / episode.equity[0])) < 1e-9


_WALK = path_of(market(11, 600, reversion=0.0))


def test_vector_rewards_add_up_per_episode_with_autoreset() -> None:
    """In the training batch too, each finished episode's rewards sum to its log return."""
    env = VectorTradingEnv([_WALK], 4, episode_bars=50, seed=3)
    env.reset()
    rng = np.random.default_rng(0)
    totals = np.zeros(4)
    checked = 0
    for _ in range(300):
        _, rewards, _, done, info = env.step(rng.integers(0, 2, 4))
        totals += rewards
        for k in np.flatnonzero(done):
            assert abs(totals[k] - info["final_log_return"][k]) < 1e-9
            totals[k] = 0.0
            checked += 1
    assert checked >= 20


def test_score_shaping_adds_the_episode_score_to_its_last_reward_only() -> None:
    """With a shaping weight, rewards sum to the log return plus weight x the episode's score."""
    import reward_system
    from config import RewardSettings

    bars, weight = 120, 0.01
    plain = VectorTradingEnv([_WALK], 1, episode_bars=bars, seed=4)
    shaped = VectorTradingEnv(
        [_WALK], 1, episode_bars=bars, seed=4, shaping=score_shaping(), shaping_weight=weight
    )
    plain.reset()
    shaped.reset()
    first = int(shaped.t[0])
    actions = np.random.default_rng(1).integers(0, 2, bars)
    a = np.array([plain.step(actions[i : i + 1])[1][0] for i in range(bars)])
    curve = [shaped.start_equity[0]]
    b = []
    for i in range(bars):
        _, reward, _, _, info = shaped.step(actions[i : i + 1])
        b.append(reward[0])
        curve.append(info["equity"][0])  # taken before the autoreset
    expected = reward_system.score(
        (), _WALK.ts[first : first + bars + 1], np.array(curve), RewardSettings()
    )
    assert np.array_equal(a[:-1], np.array(b[:-1]))
    assert b[-1] - a[-1] == pytest.approx(weight * expected.total, abs=1e-12)
    assert expected.total != 0.0


# -- Environment = backtest ------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True])
def test_episode_equals_the_backtest_of_the_same_policy(tmp_path: Path, exact: bool) -> None:
    """The policy's episode equity is its backtest's (`run_fast`) on the same candles."""
    df = market(5, 1200, reversion=0.05)
    policy = random_policy(0, [df])
    policy.save(tmp_path / "p")
    strategy = load_strategy(f"rl:{tmp_path / 'p'}")
    backtest = run_fast(strategy, df, taker_fee=0.001, slippage_bps=2.0, exact=exact)
    path = MarketPath.from_frame(df, policy.mean, policy.std)
    episode = run_episode(path, greedy(policy))
    start = strategy.warmup - 1
    assert backtest.n_trades > 20
    assert episode.fills == 2 * backtest.n_trades + len(backtest.open_positions)
    np.testing.assert_allclose(episode.equity, backtest.equity[start:], rtol=1e-12)
    assert episode.equity[-1] == pytest.approx(backtest.final_equity, rel=1e-12)
    assert episode.log_return == pytest.approx(
        np.log(backtest.final_equity / backtest.starting_balance), abs=1e-9
    )


def test_single_env_follows_the_gymnasium_api() -> None:
    """TradingEnv passes gymnasium's environment checker."""
    from gymnasium.utils.env_checker import check_env

    env = TradingEnv(_WALK)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset()
    assert env.observation_space.contains(obs)


def test_costs_come_from_the_simulator_settings() -> None:
    """The environment's fee, slippage and lot are the backtest's for that pair and price."""
    from config import SimulationSettings

    costs = Costs.for_pair("BTC/USDT", 30_000.0, SimulationSettings(taker_fee=0.002))
    assert costs.fee == 0.002
    assert costs.slippage_bps == 2.0
    assert costs.lot == pytest.approx(1e-8)
    assert costs.min_notional == 5.0


# -- The policy as a strategy ----------------------------------------------------------------


def test_saved_policy_decides_the_same_after_loading(tmp_path: Path) -> None:
    """save then load_policy gives the same arrays and the same decisions."""
    df = market(2, 400, reversion=0.1)
    policy = random_policy(1, [df])
    policy.save(tmp_path)
    loaded = load_policy(tmp_path)
    raw = raw_features(df)[60:]
    for holding in (False, True):
        a = [policy.decide(row, holding) for row in raw]
        b = [loaded.decide(row, holding) for row in raw]
        assert a == b
    assert 0 < np.mean(a) < 1


def test_strategy_signal_is_the_policy_decision_for_the_position_held(tmp_path: Path) -> None:
    """Each candle's signal is what the policy does from the real position: enter or exit."""
    df = market(3, 300, reversion=0.1)
    policy = random_policy(2, [df])
    policy.save(tmp_path)
    strategy = RLStrategy(tmp_path)
    seen = {Side.BUY: 0, Side.SELL: 0}
    for end in range(120, 300, 3):
        window = df.iloc[:end]
        raw = raw_features(window)[-1]
        for holding in (False, True):
            signal = strategy.signal("BTC/USDT", window, holding=holding)
            action = policy.decide(raw, holding)
            if holding:
                assert (signal is not None) == (action == 0)
            else:
                assert (signal is not None) == (action == 1)
            if signal is not None:
                assert signal.side is (Side.SELL if holding else Side.BUY)
                seen[signal.side] += 1
    assert min(seen.values()) > 0


@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong_shape"])
def test_a_broken_policy_gives_no_signal_and_one_alert(tmp_path: Path, damage: str) -> None:
    """A missing or unreadable policy trades nothing, logs and alerts once, and never raises."""
    directory = tmp_path / "p"
    if damage != "missing":
        random_policy(0, [market(1, 200, reversion=0.1)]).save(directory)
    if damage == "corrupt":
        (directory / "policy.npz").write_bytes(b"not a zip")
    if damage == "wrong_shape":
        meta = json.loads((directory / "policy.json").read_text())
        meta["layers"] = 1
        (directory / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(DataError):
        load_policy(directory)
    alerts: list[Event] = []
    strategy = RLStrategy(directory, alert=alerts.append)
    df = market(1, 200, reversion=0.1)
    assert strategy.signal("BTC/USDT", df, holding=False) is None
    assert strategy.signal("BTC/USDT", df, holding=True) is None
    enter, exit_ = strategy.entries_exits(df)
    assert not enter.any()
    assert not exit_.any()
    assert len(alerts) == 1
    assert isinstance(alerts[0], ErrorRaised)


def test_rl_alone_is_the_registry_champion() -> None:
    """`rl` names data/models/rl/champion (absent here: neutral, not an error)."""
    strategy = load_strategy("rl")
    assert isinstance(strategy, RLStrategy)
    assert strategy.directory == Path("data/models/rl/champion")
    assert strategy.policy is None


def test_backtest_cli_trades_the_policy_through_risk_and_matches_the_fast_path(
    tmp_path: Path,
) -> None:
    """`--strategy rl:<dir>` backtests through risk and executor with the fast path's trades."""
    data = ROOT / "data" / "sample" / "bybit_BTC-USDT_1m.csv.gz"
    candles = load_candles(data, timeframe="1m")
    random_policy(4, [candles]).save(tmp_path / "policy")
    common = [
        "--mode",
        "backtest",
        "--strategy",
        f"rl:{tmp_path / 'policy'}",
        "--data",
        str(data),
        "--pairs",
        "BTC/USDT",
        "--timeframe",
        "1m",
        "--no-ui",
    ]
    out = tmp_path / "replay.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *common, "--summary-json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KESTREL_RISK__PROFILE": "all_in"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    replay = json.loads(out.read_text())
    fast = (
        fast_backtest(
            load_strategy(f"rl:{tmp_path / 'policy'}"),
            candles,
            pair="BTC/USDT",
            timeframe="1m",
            starting_balance=10_000.0,
            taker_fee=0.001,
            slippage_bps=2.0,
        )
        .summary()
        .to_dict()
    )
    assert replay["n_trades"] == fast["n_trades"] > 5
    assert replay["trades"] == json.loads(json.dumps(fast["trades"]))
    assert replay["signals"] > 0


# -- The agent -------------------------------------------------------------------------------

SMALL = PPOConfig(total_steps=49_152, hidden=(32, 32), learning_rate=2e-3)


@pytest.fixture(scope="module")
def trained() -> TrainedPolicy:
    """Train once on a mean-reverting market with fees; validate on its held-out tail."""
    frames = {f"P{k}/USDT": market(k, 4000, reversion=0.1) for k in range(4)}
    return RLKind(SMALL, test_fraction=0.25).train(frames, seed=3, time_budget_s=120)


def test_agent_beats_zero_and_a_random_policy_out_of_sample(trained: TrainedPolicy) -> None:
    """On every held-out path the greedy agent gains, and by 0.5 more than random actions."""
    assert trained.metrics["train_steps"] >= SMALL.total_steps * 0.9
    rng = np.random.default_rng(0)
    for episode in trained.validation:
        assert episode.log_return > 0
        assert episode.fills > 10
    for pair, path in _held_out(trained).items():
        agent = run_episode(path, greedy(trained.policy)).log_return
        randoms = [run_episode(path, lambda obs: int(rng.random() < 0.5)).log_return for _ in range(3)]  # fmt: skip  # noqa: E501
        assert agent >= np.mean(randoms) + 0.5, pair


def _held_out(trained: TrainedPolicy) -> dict[str, MarketPath]:
    kind = RLKind(SMALL, test_fraction=0.25)
    frames = {f"P{k}/USDT": market(k, 4000, reversion=0.1) for k in range(4)}
    policy = trained.policy
    return {
        pair: MarketPath.from_frame(kind.split(f)[1], policy.mean, policy.std, pair=pair)
        for pair, f in frames.items()
    }


def test_trained_policy_saves_loads_and_reports_out_of_sample_returns(
    trained: TrainedPolicy, tmp_path: Path
) -> None:
    """The registry's view: files on disk, per-bar held-out returns, metrics."""
    trained.save(tmp_path / "v1")
    loaded = load_policy(tmp_path / "v1")
    returns = trained.validation_returns()
    assert len(returns) == sum(len(e.rewards) for e in trained.validation)
    assert np.log1p(returns).sum() == pytest.approx(
        sum(e.log_return for e in trained.validation), abs=1e-9
    )
    assert trained.metrics["validation_log_return"] > 0
    meta = json.loads((tmp_path / "v1" / "policy.json").read_text())
    assert meta["metrics"]["train_steps"] == trained.metrics["train_steps"]
    for path in _held_out(trained).values():
        a = run_episode(path, greedy(loaded))
        b = run_episode(path, greedy(trained.policy))
        assert np.array_equal(a.actions, b.actions)


def test_training_is_reproducible_and_bounded_by_its_budget() -> None:
    """The same seed gives the same weights; a zero budget stops before the first update."""
    paths = [_WALK]
    config = PPOConfig(total_steps=2048, num_envs=4, rollout_steps=128, hidden=(8,))
    a = train_ppo(paths, config, seed=5)
    b = train_ppo(paths, config, seed=5)
    c = train_ppo(paths, config, seed=6)
    assert a.updates == 4
    for (wa, ba), (wb, bb) in zip(a.actor, b.actor, strict=True):
        assert np.array_equal(wa, wb)
        assert np.array_equal(ba, bb)
    assert not np.array_equal(a.actor[0][0], c.actor[0][0])
    assert train_ppo(paths, config, seed=5, time_budget_s=0.0).updates == 0


class _Exported:
    """A policy as the registry stores a trained model (save plus metrics)."""

    def __init__(self, policy: NumpyPolicy) -> None:
        self.policy = policy
        self.metrics = {"held_out_log_return": 0.0}

    def save(self, directory: Path) -> None:
        self.policy.save(directory)

    def validation_returns(self) -> np.ndarray:
        return np.zeros(3)


def test_rl_alone_trades_the_registry_champion_of_the_pair(tmp_path: Path) -> None:
    """`--strategy rl` in the daemon trades the registry's promoted RL version, not a stale path."""
    from model_registry import Lineage, Registry
    from model_training import model_name

    data = ROOT / "data" / "sample" / "bybit_BTC-USDT_1m.csv.gz"
    candles = load_candles(data, timeframe="1m")
    registry = Registry(tmp_path / "data" / "models")
    name = model_name("rl", "BTC/USDT", "1m")
    lineage = Lineage(0, 1, ("BTC/USDT",), "1m", "rl", 4)
    for seed in (4, 5):  # two versions: the champion is the promoted one
        manifest = registry.register(name, "rl", _Exported(random_policy(seed, [candles])), lineage)
        if seed == 4:
            registry.promote(name, manifest.version)
    champion = registry.alias(name, "champion")
    assert champion is not None
    env = {
        **os.environ,
        "KESTREL_RISK__PROFILE": "all_in",
        "KESTREL_STORAGE__DATA_DIR": str(tmp_path / "data"),
    }
    common = ["--mode", "backtest", "--data", str(data), "--pairs", "BTC/USDT"]
    summaries: list[dict[str, Any]] = []
    for strategy in ("rl", f"rl:{registry.path(name, champion)}"):
        out = tmp_path / f"{len(summaries)}.json"
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *common, "--strategy", strategy,
             "--timeframe", "1m", "--no-ui", "--summary-json", str(out)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        summaries.append(json.loads(out.read_text()))
    assert summaries[0]["n_trades"] > 5
    assert summaries[0]["trades"] == summaries[1]["trades"]


def test_the_rl_kind_replays_a_saved_policy_as_its_episode(tmp_path: Path) -> None:
    """RLKind.replay gives the policy's per-bar returns, compounding to its episode's result."""
    from rl_policy import FEATURE_WINDOW

    df = market(3, 600, reversion=0.9)
    policy = random_policy(8, [df])
    policy.save(tmp_path / "policy")
    returns = RLKind().replay(tmp_path / "policy", df)
    episode = run_episode(MarketPath.from_frame(df, policy.mean, policy.std), greedy(policy))
    assert len(returns) == len(df) - FEATURE_WINDOW == len(episode.rewards)
    assert returns.index.equals(df.index[FEATURE_WINDOW - 1 : -1])
    assert float(np.log1p(returns).sum()) == pytest.approx(episode.log_return, abs=1e-9)
    assert episode.fills > 0
    assert RLKind().replay(tmp_path / "policy", df.iloc[: FEATURE_WINDOW - 1]).empty
