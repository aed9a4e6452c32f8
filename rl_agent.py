"""The reinforcement-learning agent: PPO on Keras 3, trained on the backtest's own fills.

Proximal policy optimisation as in CleanRL's `ppo.py` and keras.io's PPO example: a batch
of environments (`rl_env.VectorTradingEnv`) is rolled out with the current policy, then
advantages are estimated by GAE and the clipped surrogate objective, a value loss and an
entropy bonus are minimised for a few epochs of shuffled minibatches (`tf.GradientTape`
inside one `tf.function`). Actor and critic are separate small `tanh` networks, each with
one head per position held (the actor a pair of flat/long logits, the critic a value).

Rollouts run the actor and critic as numpy forward passes of the current weights (a Keras
call per environment step would cost far more than the step). Training is seeded and
reproducible (Keras' seed, TensorFlow's op determinism, numpy generators for the episode
draws, action samples and minibatch shuffles) and bounded by a time budget. TensorFlow is
imported only when training starts; trading uses the exported numpy policy (`rl_policy`).

`RLKind` is the model kind the registry trains: `train(frames, seed=, time_budget_s=)`
splits each pair's candles chronologically, trains on the older part and runs the greedy
policy over the newer part it never saw, through the same environment (= the backtest).
Part of `self_learning`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import pandas as pd
import structlog

from config import RewardSettings, SimulationSettings
from error_handler import ConfigError, DataError
from rl_env import (
    OBS_SIZE,
    Costs,
    Episode,
    MarketPath,
    Shaping,
    VectorTradingEnv,
    run_episode,
)
from rl_policy import (
    ACTOR_OUTPUTS,
    FEATURE_WINDOW,
    LONG,
    NumpyPolicy,
    load_policy,
    position_logits,
    raw_features,
)


__all__ = ["PPOConfig", "RLKind", "TrainedPolicy", "load_policy", "train_ppo"]

log = structlog.get_logger(__name__)

Layers = tuple[tuple[np.ndarray, np.ndarray], ...]
Progress = Callable[[int, int], None]
_MIN_STD: Final = 1e-8


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """PPO's hyper-parameters (CleanRL's defaults for discrete actions, scaled down)."""

    total_steps: int = 200_000
    num_envs: int = 8
    rollout_steps: int = 256
    episode_bars: int = 256
    hidden: tuple[int, ...] = (32, 32)
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    epochs: int = 4
    minibatches: int = 4
    max_grad_norm: float = 0.5
    shaping_weight: float = 0.0

    @property
    def batch_size(self) -> int:
        """Return the transitions per update."""
        return self.num_envs * self.rollout_steps


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """What a PPO run produced: the actor's layers and how training went."""

    actor: Layers
    steps: int
    updates: int
    seconds: float
    episode_log_returns: tuple[float, ...] = field(default_factory=tuple)


# -- Networks (TensorFlow only in here) -----------------------------------------------------


def _networks(config: PPOConfig, seed: int) -> tuple[Any, Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)

    def mlp(out: int, gain: float) -> Any:
        layers: list[Any] = [keras.Input(shape=(OBS_SIZE,))]
        layers += [
            keras.layers.Dense(
                width, activation="tanh", kernel_initializer=keras.initializers.Orthogonal(2**0.5)
            )
            for width in config.hidden
        ]
        layers.append(
            keras.layers.Dense(out, kernel_initializer=keras.initializers.Orthogonal(gain))
        )
        return keras.Sequential(layers)

    optimizer = keras.optimizers.Adam(
        config.learning_rate, epsilon=1e-5, global_clipnorm=config.max_grad_norm
    )
    return mlp(ACTOR_OUTPUTS, 0.01), mlp(2, 1.0), optimizer


def _update_fn(actor: Any, critic: Any, optimizer: Any, config: PPOConfig) -> Any:
    import tensorflow as tf

    variables = actor.trainable_variables + critic.trainable_variables

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def update(obs: Any, actions: Any, old_logp: Any, advantages: Any, returns: Any) -> Any:
        advantages = (advantages - tf.reduce_mean(advantages)) / (
            tf.math.reduce_std(advantages) + 1e-8
        )
        with tf.GradientTape() as tape:
            heads = tf.reshape(actor(obs, training=True), (-1, 2, 2))
            held = tf.cast(obs[:, -1] > 0.5, tf.int32)
            log_probs = tf.nn.log_softmax(tf.gather(heads, held, batch_dims=1))
            logp = tf.gather(log_probs, actions, batch_dims=1)
            ratio = tf.exp(logp - old_logp)
            clipped = tf.clip_by_value(ratio, 1.0 - config.clip, 1.0 + config.clip)
            policy_loss = tf.reduce_mean(tf.maximum(-advantages * ratio, -advantages * clipped))
            entropy = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=1))
            values = tf.gather(critic(obs, training=True), held, batch_dims=1)
            value_loss = 0.5 * tf.reduce_mean(tf.square(values - returns))
            loss = policy_loss - config.entropy_coef * entropy + config.value_coef * value_loss
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        approx_kl = tf.reduce_mean((ratio - 1.0) - (logp - old_logp))
        return policy_loss, value_loss, entropy, approx_kl

    return update


def _layers(model: Any) -> Layers:
    weights = model.get_weights()
    return tuple(
        (np.asarray(weights[k], dtype=np.float32), np.asarray(weights[k + 1], dtype=np.float32))
        for k in range(0, len(weights), 2)
    )


def _forward(layers: Layers, obs: np.ndarray) -> np.ndarray:
    h = obs
    for k, (weights, bias) in enumerate(layers):
        h = h @ weights + bias
        if k < len(layers) - 1:
            h = np.tanh(h)
    return h


def _value(critic: Layers, obs: np.ndarray) -> np.ndarray:
    # The critic has one value head per position held, as the actor has one logit pair.
    out = _forward(critic, obs)
    value: np.ndarray = out[np.arange(len(out)), (obs[:, -1] > 0.5).astype(np.intp)]
    return value


# -- PPO -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Rollout:
    obs: np.ndarray
    actions: np.ndarray
    logp: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, steps: int, envs: int) -> _Rollout:
        return cls(
            np.zeros((steps, envs, OBS_SIZE), dtype=np.float32),
            np.zeros((steps, envs), dtype=np.int32),
            np.zeros((steps, envs), dtype=np.float32),
            np.zeros((steps, envs), dtype=np.float32),
            np.zeros((steps, envs), dtype=np.float32),
            np.zeros((steps, envs), dtype=np.float32),
        )


def _gae(batch: _Rollout, next_value: np.ndarray, config: PPOConfig) -> np.ndarray:
    # Generalised advantage estimation; `dones[t]` ends the episode after step t (the
    # episode's time limit: its next state is a fresh episode, so nothing bootstraps).
    advantages = np.zeros_like(batch.rewards)
    last = np.zeros(batch.rewards.shape[1], dtype=np.float32)
    for t in reversed(range(batch.rewards.shape[0])):
        following = next_value if t == batch.rewards.shape[0] - 1 else batch.values[t + 1]
        alive = 1.0 - batch.dones[t]
        delta = batch.rewards[t] + config.gamma * following * alive - batch.values[t]
        last = delta + config.gamma * config.gae_lambda * alive * last
        advantages[t] = last
    return advantages


def _collect(
    env: VectorTradingEnv,
    obs: np.ndarray,
    actor: Layers,
    critic: Layers,
    rng: np.random.Generator,
    batch: _Rollout,
    finished: list[float],
) -> np.ndarray:
    # Roll the batch out with the current networks as numpy; return the next observations.
    for t in range(batch.rewards.shape[0]):
        logits = position_logits(_forward(actor, obs), obs)
        gap = logits[:, LONG] - logits[:, 1 - LONG]
        p_long = 1.0 / (1.0 + np.exp(-gap))
        actions = (rng.random(len(obs)) < p_long).astype(np.int32)
        chosen = np.where(actions == LONG, logits[:, LONG], logits[:, 1 - LONG])
        batch.obs[t] = obs
        batch.actions[t] = actions
        batch.logp[t] = chosen - np.logaddexp(logits[:, 0], logits[:, 1])
        batch.values[t] = _value(critic, obs)
        obs, rewards, _, done, info = env.step(actions)
        batch.rewards[t] = rewards
        batch.dones[t] = done
        if done.any():
            finished.extend(info["final_log_return"][done].tolist())
    return obs


def train_ppo(
    paths: Sequence[MarketPath],
    config: PPOConfig,
    *,
    seed: int,
    time_budget_s: float = float("inf"),
    shaping: Shaping | None = None,
    progress: Progress | None = None,
) -> TrainingRun:
    """Train a policy by PPO on episodes drawn from `paths`; return the actor's layers.

    The reward is the log equity change; with `config.shaping_weight` set, an episode's
    last reward also gets weight x `shaping` (by default `score_shaping()`, the score).

    Stops after `config.total_steps` environment steps or, between updates, once
    `time_budget_s` has passed. `progress(steps_done, total_steps)` is called per update.
    """
    started = time.perf_counter()
    if config.shaping_weight and shaping is None:
        shaping = score_shaping()
    actor, critic, optimizer = _networks(config, seed)
    update = _update_fn(actor, critic, optimizer, config)
    env = VectorTradingEnv(
        paths,
        config.num_envs,
        episode_bars=config.episode_bars,
        seed=seed,
        shaping=shaping,
        shaping_weight=config.shaping_weight,
    )
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    updates = max(config.total_steps // config.batch_size, 1)
    batch = _Rollout.empty(config.rollout_steps, config.num_envs)
    minibatch = config.batch_size // config.minibatches
    finished: list[float] = []
    done_updates = 0
    for k in range(updates):
        if time.perf_counter() - started > time_budget_s:
            break
        if config.anneal_lr:
            optimizer.learning_rate.assign(config.learning_rate * (1.0 - k / updates))
        critic_layers = _layers(critic)
        obs = _collect(env, obs, _layers(actor), critic_layers, rng, batch, finished)
        advantages = _gae(batch, _value(critic_layers, obs), config)
        flat = (
            batch.obs.reshape(-1, OBS_SIZE),
            batch.actions.reshape(-1),
            batch.logp.reshape(-1),
            advantages.reshape(-1),
            (advantages + batch.values).reshape(-1),
        )
        for _ in range(config.epochs):
            order = rng.permutation(config.batch_size)
            for lo in range(0, config.batch_size, minibatch):
                rows = order[lo : lo + minibatch]
                update(*(part[rows] for part in flat))
        done_updates = k + 1
        if progress is not None:
            progress(done_updates * config.batch_size, updates * config.batch_size)
    seconds = time.perf_counter() - started
    log.info(
        "rl_trained",
        steps=done_updates * config.batch_size,
        updates=done_updates,
        seconds=round(seconds, 2),
    )
    return TrainingRun(
        _layers(actor),
        done_updates * config.batch_size,
        done_updates,
        seconds,
        tuple(finished),
    )


# -- The registry's model kind ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainedPolicy:
    """A trained policy with its out-of-sample episodes (one per held-out pair path)."""

    policy: NumpyPolicy
    validation: tuple[Episode, ...]
    metrics: dict[str, float]

    def save(self, directory: Path) -> None:
        """Write the policy (`policy.npz`, `policy.json` with the metrics) to `directory`."""
        NumpyPolicy(
            self.policy.layers,
            self.policy.mean,
            self.policy.std,
            {**self.policy.meta, "metrics": self.metrics},
        ).save(directory)

    def validation_returns(self) -> np.ndarray:
        """Return the per-bar simple returns of the policy on the held-out data, in order."""
        if not self.validation:
            return np.zeros(0)
        returns: np.ndarray = np.expm1(np.concatenate([e.rewards for e in self.validation]))
        return returns


def score_shaping(settings: RewardSettings | None = None) -> Shaping:
    """Return the shaping term: `reward_system.score` of an episode's equity curve.

    The episode has no closed-trade list here, so the trade factors (profit factor, win
    rate) contribute 0; the curve's Sharpe, Sortino, drawdown and consistency count.
    """
    import reward_system

    weights = settings or RewardSettings()

    def shaping(times: np.ndarray, equity: np.ndarray) -> float:
        return float(reward_system.score((), times, equity, weights).total)

    return shaping


def fit_scaling(frames: Sequence[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Return the features' mean and deviation over the (training) frames' valid rows."""
    raw = np.concatenate([raw_features(df)[FEATURE_WINDOW - 1 :] for df in frames])
    raw = raw[np.isfinite(raw).all(axis=1)]
    if len(raw) < 2:
        raise DataError("too few candles to scale the features")
    return raw.mean(axis=0), np.maximum(raw.std(axis=0), _MIN_STD)


def greedy(policy: NumpyPolicy) -> Callable[[np.ndarray], int]:
    """Return `observation -> action` taking the policy's most likely action."""

    def decide(obs: np.ndarray) -> int:
        logits = policy.logits(obs.reshape(1, -1))
        return int(logits[0, LONG] > logits[0, 1 - LONG])

    return decide


class RLKind:
    """The PPO agent as a model kind of the registry (trains, validates out of sample).

    Args:
        config: PPO's hyper-parameters.
        test_fraction: the newest share of each pair's candles held out for validation.
        simulation: fees, slippage and starting balance (the backtest's settings).
    """

    name: ClassVar[str] = "rl"

    def __init__(
        self,
        config: PPOConfig | None = None,
        *,
        test_fraction: float = 0.25,
        simulation: SimulationSettings | None = None,
    ) -> None:
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction {test_fraction} must be in (0, 1)")
        self.config = config or PPOConfig()
        self.test_fraction = test_fraction
        self.simulation = simulation or SimulationSettings()

    def split(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return (train, test) frames: the test's decisions start after the last train bar.

        The test frame carries the feature window's history before its first decision
        (past candles only: no label or reward of it was trained on).
        """
        n_test = int(len(frame) * self.test_fraction)
        cut = len(frame) - n_test
        if cut < FEATURE_WINDOW + 2 or n_test < 2:
            raise DataError(f"{len(frame)} candles are too few to train and validate")
        return frame.iloc[:cut], frame.iloc[cut - FEATURE_WINDOW :]

    def train(
        self, frames: Mapping[str, pd.DataFrame], *, seed: int, time_budget_s: float
    ) -> TrainedPolicy:
        """Train on the older part of every pair's candles; validate on the newer part."""
        splits = {pair: self.split(frame) for pair, frame in frames.items()}
        if not splits:
            raise DataError("no candles to train on")
        mean, std = fit_scaling([train for train, _ in splits.values()])

        def path(frame: pd.DataFrame, pair: str) -> MarketPath:
            # Market rules from the pair's first close, as the backtest of its archive.
            first = float(frames[pair]["close"].iloc[0])
            costs = Costs.for_pair(pair, first, self.simulation)
            return MarketPath.from_frame(frame, mean, std, pair=pair, costs=costs)

        train_paths = [path(train, pair) for pair, (train, _) in splits.items()]
        run = train_ppo(train_paths, self.config, seed=seed, time_budget_s=time_budget_s)
        meta = {"kind": self.name, "seed": seed, "config": asdict(self.config)}
        policy = NumpyPolicy(run.actor, mean, std, meta)
        episodes = tuple(
            run_episode(path(test, pair), greedy(policy)) for pair, (_, test) in splits.items()
        )
        return TrainedPolicy(policy, episodes, _metrics(run, episodes))

    def replay(self, directory: Path, frame: pd.DataFrame) -> pd.Series:
        """Return a saved policy's per-bar simple returns on `frame` (validation, shadowing).

        The policy trades `frame` greedily with the backtest's fills, fees and slippage (the
        market rules scaled to its first close, as `Costs.for_pair`); the first
        `FEATURE_WINDOW - 1` candles are the features' history. Each return is indexed by
        the bar whose close decided it (the position held from that close to the next), as
        the supervised filter's are, so the registry lines a champion and a challenger up
        on the same bars.
        """
        policy = load_policy(directory)
        if len(frame) < FEATURE_WINDOW + 1:
            return pd.Series(dtype=np.float64)
        costs = Costs.for_pair("BTC/USDT", float(frame["close"].iloc[0]), self.simulation)
        path = MarketPath.from_frame(frame, policy.mean, policy.std, costs=costs)
        episode = run_episode(path, greedy(policy))
        index = frame.index[FEATURE_WINDOW - 1 : -1]
        return pd.Series(np.expm1(episode.rewards), index=index, dtype=np.float64)


def _metrics(run: TrainingRun, episodes: Sequence[Episode]) -> dict[str, float]:
    bars = sum(len(e.rewards) for e in episodes)
    returns = [e.log_return for e in episodes]
    return {
        "train_steps": float(run.steps),
        "train_seconds": run.seconds,
        "validation_bars": float(bars),
        "validation_log_return": float(np.mean(returns)) if returns else 0.0,
        "validation_worst_log_return": float(np.min(returns)) if returns else 0.0,
        "validation_fills_per_1000_bars": 1000.0 * sum(e.fills for e in episodes) / max(bars, 1),
        "validation_exposure": float(
            np.mean(np.concatenate([e.actions for e in episodes])) if bars else 0.0
        ),
    }
