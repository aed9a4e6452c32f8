"""Trading environments for the agent, on the backtest's own fill, fee and slippage model.

`TradingEnv` (gymnasium `Env`) trades one pair's candles; `VectorTradingEnv` (gymnasium
`VectorEnv`) steps a batch of them at once for training, each on a random window of the
training paths, with same-step autoreset. Both run one numba kernel per step that fills
orders exactly as the backtest fast path does (`fast_path.run_fast`, `next_open`, `all_in`):

* the action at bar *i* (0 flat, 1 long) is decided on bar *i*'s close and filled at bar
  *i + 1*'s open, moved `slippage_bps` against the taker, taker fee on both sides;
* an entry buys `floor_lot(cash / (price x (1 + fee)))`; it is vetoed without cash for one
  lot and refused below the market's minimum notional (estimated at the close); an exit
  sells the whole position, refused below the minimum notional;
* equity is cash plus the position marked at each close.

So a policy's episode equity equals its backtest on the same candles (a test checks it
against `run_fast` and the exact Decimal replay accounting). The market rules are
`sim_market(pair, first close)`, as the replay builds them.

Reward: the change in log equity over the step, net of fees and slippage; no entry bonus
or any other term, so an episode's rewards sum to the log of its equity ratio and churning
pays its costs. An optional shaping term (`Shaping`, weight 0 by default) adds
`weight x shaping(times, equity curve)` to an episode's last reward: the scoring system's
score of the episode (`rl_agent.score_shaping`), the only shaping allowed. Part of
`self_learning`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import gymnasium
import numpy as np
import pandas as pd
from gymnasium.vector.utils import batch_space
from numba import njit

from config import SimulationSettings
from error_handler import ConfigError
from matching_engine import sim_market
from rl_policy import CLIP, FEATURE_WINDOW, FEATURES, raw_features, standardise


OBS_SIZE: Final = len(FEATURES) + 1
# An episode's (times ms, equity curve) -> a score; added x weight to its last reward.
Shaping = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True, slots=True)
class Costs:
    """A pair's fill costs and rules: taker fee, slippage, lot, minimum notional, balance."""

    fee: float
    slippage_bps: float
    lot: float
    min_notional: float
    starting_balance: float

    @classmethod
    def for_pair(
        cls, pair: str, reference_price: float, sim: SimulationSettings | None = None
    ) -> Costs:
        """Return the costs the backtest applies to `pair` (rules from its first close)."""
        sim = sim or SimulationSettings()
        market = sim_market(pair, reference_price)
        return cls(
            fee=float(sim.taker_fee),
            slippage_bps=float(sim.slippage_bps),
            lot=float(market.lot_size),
            min_notional=float(market.min_notional),
            starting_balance=float(sim.starting_balance),
        )

    @property
    def inv_lot(self) -> float:
        """Return 1/lot when it is a whole number (one exact multiply), else 0."""
        inv = 1.0 / self.lot
        return inv if inv == round(inv) else 0.0


@dataclass(frozen=True, slots=True)
class MarketPath:
    """One pair's candles after the feature warm-up: fills, marks and observations.

    Row 0 is the candle frame's row `FEATURE_WINDOW - 1`, the first with every feature.
    """

    pair: str
    ts: np.ndarray
    opens: np.ndarray
    closes: np.ndarray
    features: np.ndarray
    costs: Costs

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        mean: np.ndarray,
        std: np.ndarray,
        *,
        pair: str = "BTC/USDT",
        costs: Costs | None = None,
    ) -> MarketPath:
        """Return the path of a candle frame, features standardised by `mean`/`std`.

        `costs` default to the simulator's, with the rules from the frame's first close.
        """
        start = FEATURE_WINDOW - 1
        if len(df) < start + 2:
            raise ConfigError(f"{pair}: {len(df)} candles, need at least {start + 2}")
        feats = standardise(raw_features(df), mean, std)[start:]
        return cls(
            pair=pair,
            ts=df.index.as_unit("ms").asi8[start:].copy(),
            opens=np.ascontiguousarray(df["open"].to_numpy(dtype=np.float64)[start:]),
            closes=np.ascontiguousarray(df["close"].to_numpy(dtype=np.float64)[start:]),
            features=np.ascontiguousarray(np.nan_to_num(feats), dtype=np.float32),
            costs=costs or Costs.for_pair(pair, float(df["close"].iloc[0])),
        )

    def __len__(self) -> int:
        """Return the number of bars."""
        return len(self.closes)


@njit(cache=True, inline="always")
def _lot_qty(quote, price, fee, lot, inv_lot):  # type: ignore[no-untyped-def]
    # floor_to_lot(quote / (price x (1 + fee))), the exchange's sizing of a quote order.
    x = quote / (price * (1.0 + fee))
    if inv_lot > 0.0:
        return math.floor(x * inv_lot) / inv_lot
    return math.floor(x / lot) * lot


@njit(cache=True)
def _step(t, cash, qty, equity, actions, opens, closes, costs, rewards, fills):  # type: ignore[no-untyped-def]
    # One bar for each env k: fill the order the action implies at the next open, mark the
    # close, reward the log equity change. `costs[k]` = (fee, slip, lot, inv_lot, notional),
    # in the fast path's order of operations so the numbers are the same to the last bit.
    for k in range(t.shape[0]):
        i = t[k]
        c = closes[i]
        j = i + 1
        fee, slip, lot, inv_lot, notional = costs[k, 0], costs[k, 1], costs[k, 2], costs[k, 3], costs[k, 4]  # fmt: skip  # noqa: E501
        q = qty[k]
        if q > 0.0 and actions[k] == 0:
            if q * c >= notional:
                price = opens[j] * (1.0 - slip)
                exit_fee = price * q * fee
                cash[k] = cash[k] - (-q * price + exit_fee)
                qty[k] = 0.0
                fills[k] += 1
        elif q == 0.0 and actions[k] == 1:
            estimate = _lot_qty(cash[k], c, fee, lot, inv_lot)
            if estimate > 0.0 and estimate * c >= notional:
                price = opens[j] * (1.0 + slip)
                bought = _lot_qty(cash[k], price, fee, lot, inv_lot)
                if bought > 0.0:
                    entry_fee = price * bought * fee
                    cash[k] = cash[k] - (bought * price + entry_fee)
                    qty[k] = bought
                    fills[k] += 1
        marked = cash[k] + qty[k] * closes[j]
        rewards[k] = math.log(marked / equity[k])
        equity[k] = marked
        t[k] = j


def _spaces() -> tuple[gymnasium.spaces.Box, gymnasium.spaces.Discrete]:
    low = np.full(OBS_SIZE, -CLIP, dtype=np.float32)
    high = np.full(OBS_SIZE, CLIP, dtype=np.float32)
    low[-1], high[-1] = 0.0, 1.0
    return gymnasium.spaces.Box(low, high, dtype=np.float32), gymnasium.spaces.Discrete(2)


class VectorTradingEnv(gymnasium.vector.VectorEnv):
    """`num_envs` trading episodes stepped at once, each on a window of one of `paths`.

    Args:
        paths: the market paths to draw episodes from (one per pair or segment).
        num_envs: episodes stepped together.
        episode_bars: decisions per episode; None runs each episode over a whole path
            from its first bar (evaluation).
        seed: seeds the draw of paths and windows.
        autoreset: start a new episode in the same step as one ends (training).
        shaping: an episode's score (see module docstring), added x `shaping_weight`.
        shaping_weight: weight of the shaping term, 0 by default (pure log-equity reward).
    """

    metadata: dict[str, Any] = {  # noqa: RUF012 - gymnasium's class attribute
        "autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP
    }

    def __init__(
        self,
        paths: Sequence[MarketPath],
        num_envs: int = 8,
        *,
        episode_bars: int | None = 256,
        seed: int = 0,
        autoreset: bool = True,
        shaping: Shaping | None = None,
        shaping_weight: float = 0.0,
    ) -> None:
        if not paths:
            raise ConfigError("a trading environment needs at least one market path")
        self.paths = tuple(paths)
        self.num_envs = num_envs
        self.episode_bars = episode_bars
        self.autoreset = autoreset
        self.shaping = shaping if shaping_weight else None
        self.shaping_weight = shaping_weight
        self.single_observation_space, self.single_action_space = _spaces()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        # All paths end to end: one gather per step whichever path an env is on.
        self._opens = np.concatenate([p.opens for p in self.paths])
        self._closes = np.concatenate([p.closes for p in self.paths])
        self._ts = np.concatenate([p.ts for p in self.paths])
        self._features = np.concatenate([p.features for p in self.paths])
        self._bounds = np.cumsum([0, *(len(p) for p in self.paths)])
        self._path_costs = np.array(
            [
                (c.fee, c.slippage_bps / 1e4, c.lot, c.inv_lot, c.min_notional)
                for c in (p.costs for p in self.paths)
            ],
            dtype=np.float64,
        )
        self._rng = np.random.default_rng(seed)
        n = num_envs
        self.t = np.zeros(n, dtype=np.int64)
        self.end = np.zeros(n, dtype=np.int64)
        self.path = np.zeros(n, dtype=np.int64)
        self.cash = np.zeros(n)
        self.qty = np.zeros(n)
        self.equity = np.zeros(n)
        self.start_equity = np.zeros(n)
        self.first = np.zeros(n, dtype=np.int64)
        self.fills = np.zeros(n, dtype=np.int64)
        self.costs = np.zeros((n, 5))
        self._rewards = np.zeros(n)
        self._curves: list[list[float]] = [[] for _ in range(n)]

    # -- Episodes ------------------------------------------------------------------------

    def _start(self, envs: np.ndarray) -> None:
        for k in envs:
            p = int(self._rng.integers(len(self.paths))) if self.episode_bars else int(k)
            p %= len(self.paths)
            lo, hi = int(self._bounds[p]), int(self._bounds[p + 1])
            bars = hi - lo - 1 if self.episode_bars is None else min(self.episode_bars, hi - lo - 1)
            first = lo if self.episode_bars is None else int(self._rng.integers(lo, hi - bars))
            balance = self.paths[p].costs.starting_balance
            self.path[k], self.t[k], self.end[k] = p, first, first + bars
            self.first[k] = first
            self.cash[k] = self.equity[k] = self.start_equity[k] = balance
            self.qty[k] = 0.0
            self.fills[k] = 0
            self.costs[k] = self._path_costs[p]
            if self.shaping is not None:
                self._curves[k] = [balance]

    def _observe(self) -> np.ndarray:
        obs = np.empty((self.num_envs, OBS_SIZE), dtype=np.float32)
        obs[:, :-1] = self._features[self.t]
        obs[:, -1] = self.qty > 0.0
        return obs

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start every episode afresh; return the observations."""
        if isinstance(seed, int):
            self._rng = np.random.default_rng(seed)
        self._start(np.arange(self.num_envs))
        return self._observe(), {}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Fill each env's action at the next open, mark the close; return the step.

        Returns observations, rewards (log equity changes), terminations (always False:
        an episode ends by its time limit), truncations and info (`equity`, `fills`; for
        episodes that just ended, `final_equity` and `final_log_return`).
        """
        if (self.t >= self.end).any():
            raise ConfigError("step after an episode ended: reset first (autoreset is off)")
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        _step(
            self.t,
            self.cash,
            self.qty,
            self.equity,
            actions,
            self._opens,
            self._closes,
            self.costs,
            self._rewards,
            self.fills,
        )
        rewards = self._rewards.copy()
        done = self.t >= self.end
        info: dict[str, Any] = {"equity": self.equity.copy(), "fills": self.fills.copy()}
        if self.shaping is not None:
            rewards += self._shape(done)
        if done.any():
            info["final_equity"] = np.where(done, self.equity, np.nan)
            info["final_log_return"] = np.where(
                done, np.log(self.equity / self.start_equity), np.nan
            )
            if self.autoreset:
                self._start(np.flatnonzero(done))
        return self._observe(), rewards, np.zeros(self.num_envs, dtype=bool), done, info

    def _shape(self, done: np.ndarray) -> np.ndarray:
        assert self.shaping is not None
        bonus = np.zeros(self.num_envs)
        for k in range(self.num_envs):
            self._curves[k].append(float(self.equity[k]))
            if done[k]:
                times = self._ts[self.first[k] : self.end[k] + 1]
                bonus[k] = self.shaping_weight * self.shaping(times, np.asarray(self._curves[k]))
        return bonus


class TradingEnv(gymnasium.Env):
    """One pair's whole path as a gymnasium episode (evaluation, inspection, peers' tools).

    Observations, actions and rewards as in `VectorTradingEnv`; the episode is truncated
    at the path's last bar.
    """

    def __init__(self, path: MarketPath, *, shaping: Shaping | None = None, shaping_weight: float = 0.0) -> None:  # fmt: skip  # noqa: E501
        self._batch = VectorTradingEnv(
            [path],
            1,
            episode_bars=None,
            autoreset=False,
            shaping=shaping,
            shaping_weight=shaping_weight,
        )
        self.path = path
        self.observation_space = self._batch.single_observation_space
        self.action_space = self._batch.single_action_space

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start at the path's first bar, flat, with the starting balance."""
        super().reset(seed=seed)
        obs, info = self._batch.reset(seed=seed)
        return obs[0], info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Trade one bar; return observation, reward, terminated, truncated, info."""
        obs, rewards, terminated, truncated, info = self._batch.step(np.array([int(action)]))
        return (
            obs[0],
            float(rewards[0]),
            bool(terminated[0]),
            bool(truncated[0]),
            {key: value[0] for key, value in info.items()},
        )

    @property
    def equity(self) -> float:
        """Return the equity marked at the current bar's close."""
        return float(self._batch.equity[0])


@dataclass(frozen=True, slots=True)
class Episode:
    """A whole-path run of a policy: actions, rewards and the equity after each bar."""

    actions: np.ndarray
    rewards: np.ndarray
    equity: np.ndarray
    fills: int

    @property
    def log_return(self) -> float:
        """Return the log of final over starting equity."""
        return float(np.log(self.equity[-1] / self.equity[0]))


def run_episode(path: MarketPath, decide: Callable[[np.ndarray], int]) -> Episode:
    """Run `decide(observation) -> action` over the whole path; return the episode.

    `equity[0]` is the starting balance (the first bar's close, before any fill).
    """
    env = TradingEnv(path)
    obs, _ = env.reset()
    n = len(path) - 1
    actions = np.zeros(n, dtype=np.int8)
    rewards = np.zeros(n)
    equity = np.empty(n + 1)
    equity[0] = env.equity
    fills = 0
    for i in range(n):
        actions[i] = decide(obs)
        obs, rewards[i], _, _, info = env.step(actions[i])
        equity[i + 1] = info["equity"]
        fills = int(info["fills"])
    return Episode(actions, rewards, equity, fills)
