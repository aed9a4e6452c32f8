"""Settings: environment variables (prefix `KESTREL_`, nested with `__`), `.env`, defaults.

Loaded once at start, validated, frozen. Each component receives only its own group::

    KESTREL_EXCHANGE__API_KEY=...        -> settings.exchange.api_key (SecretStr)
    KESTREL_RISK__MAX_DAILY_LOSS=0.03    -> settings.risk.max_daily_loss
    KESTREL_TELEGRAM__CHAT_IDS=[1,2]     -> settings.telegram.chat_ids (JSON or "1,2")

`load_settings()` turns pydantic's errors into a `ConfigError` that names each bad
environment variable and why; `main` prints it and exits with status 2.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from error_handler import ConfigError


ENV_PREFIX = "KESTREL_"
ENV_DELIMITER = "__"


def _split_list(value: Any) -> Any:
    # Accept JSON lists, "a,b,c" and single values from the environment.
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, int | float):
        return [value]
    return value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
IntList = Annotated[list[int], NoDecode, BeforeValidator(_split_list)]

_OFF = frozenset({"", "none", "null", "off"})


def _off_is_none(value: Any) -> Any:
    # An optional rule switched off from the environment or .env, where every value is
    # text: "none", "null", "off" or nothing at all (any case) is None.
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return None
    return value


# A number whose rule can be switched off (None): `KESTREL_..=none`.
OptionalNumber = Annotated[float | None, BeforeValidator(_off_is_none)]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExchangeSettings(_Group):
    """Bybit connection."""

    name: Literal["bybit"] = "bybit"
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    testnet: bool = True
    allow_mainnet: bool = Field(
        default=False, description="explicit opt-in required when testnet is false"
    )
    market_type: Literal["spot", "linear"] = "spot"
    base_url: str | None = Field(
        default=None, description="http://127.0.0.1:PORT points REST and WebSockets at one server"
    )
    timeout_s: float = Field(default=10.0, gt=0)
    recv_window_ms: int = Field(default=5000, gt=0, le=60000)
    max_clock_skew_ms: int = Field(default=1000, gt=0)
    rate_limit_safety: float = Field(
        default=0.8, gt=0, le=1, description="fraction of Bybit's published limits we use"
    )
    fill_poll_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="live: also fetch our executions over REST this often (a safety net "
        "for fills the private stream missed)",
    )

    burst_gather_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="a closed candle waits at most this long for the other streamed pairs' "
        "candles of its close, so that they are decided together, strongest first (0: decide "
        "what has arrived); a pair that misses the window is not waited for again until a "
        "candle of it comes within it (the status views name it meanwhile)",
    )
    burst_rehearse_ms: float = Field(
        default=3.0,
        ge=0,
        le=1000,
        description="how long before a close's first candle is expected (learnt from the "
        "last closes) a burst's passes over all pairs are rehearsed on their windows as they "
        "stand, keeping nothing, so that the burst meets its code and data in warm CPU caches; "
        "from then until the burst (at most 10 ms past the expected moment) the event loop "
        "is polled, not slept, so the close's first frame finds the core running (0: never)",
    )
    burst_orders_in_flight: int = Field(
        default=10,
        ge=1,
        le=50,
        description="live trading: how many of a burst's orders are on their way to the "
        "exchange at once, started in decision order (1: one at a time). Each entry takes its "
        "request, its look-up and its protective stop's: over a 100 ms link, a 50-entry burst "
        "had its last entry answered after 31.3 s one at a time, 6.1 s ten at a time; the "
        "account's order budget (rate_limit_safety of Bybit's 10-20 a second) paces them",
    )
    funding_poll_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="live perpetuals: fetch the funding Bybit booked on our positions this often",
    )

    @model_validator(mode="after")
    def _mainnet_opt_in(self) -> ExchangeSettings:
        if not self.testnet and not self.allow_mainnet and self.base_url is None:
            raise ValueError(
                "mainnet needs an explicit opt-in: set KESTREL_EXCHANGE__ALLOW_MAINNET=true "
                "(or keep KESTREL_EXCHANGE__TESTNET=true)"
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return self

    @property
    def has_keys(self) -> bool:
        """Return True when both API key and secret are set."""
        return bool(
            self.api_key
            and self.api_secret
            and self.api_key.get_secret_value()
            and self.api_secret.get_secret_value()
        )


class RiskSettings(_Group):
    """Position sizing, exposure limits and circuit breakers."""

    profile: Literal["standard", "all_in"] = Field(
        default="standard",
        description="all_in: whole equity per position, no stops, no breakers (parity reference)",
    )
    sizing: Literal["fixed_fractional", "volatility_target", "kelly"] = "fixed_fractional"
    risk_per_trade: float = Field(default=0.01, gt=0, le=0.2)
    target_volatility: float = Field(default=0.02, gt=0, le=1)
    kelly_cap: float = Field(default=0.25, gt=0, le=1)
    max_position_fraction: float = Field(default=0.25, gt=0, le=10)
    max_total_exposure: float = Field(default=1.0, gt=0, le=10)
    max_leverage: float = Field(default=1.0, ge=1, le=100)
    liquidation_buffer: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="perpetuals: the stop must lie this fraction of the entry-to-liquidation "
        "distance inside the liquidation price (0: anywhere before it)",
    )
    max_open_positions: int = Field(default=5, ge=1)
    stop_atr_multiple: float = Field(default=2.0, gt=0)
    take_profit_atr_multiple: OptionalNumber = Field(
        default=4.0, gt=0, description="none: no managed take-profit"
    )
    trailing_stop: bool = True
    break_even_at_r: OptionalNumber = Field(
        default=1.0, gt=0, description="none: the stop never moves to break-even"
    )
    atr_period: int = Field(default=14, ge=2)
    max_correlation: float = Field(default=0.8, gt=0, le=1)
    correlation_window: int = Field(default=100, ge=10)
    max_daily_loss: float = Field(default=0.03, gt=0, lt=1)
    max_drawdown: float = Field(default=0.15, gt=0, lt=1)
    reduce_size_drawdown: float = Field(default=0.07, gt=0, lt=1)
    reduced_size_factor: float = Field(default=0.5, gt=0, le=1)
    max_consecutive_losses: int = Field(default=5, ge=1)
    cooldown_minutes: int = Field(default=60, ge=0)
    auto_resume: bool = Field(default=True, description="resume after cooldown / new day")

    @model_validator(mode="after")
    def _ladder_order(self) -> RiskSettings:
        if self.reduce_size_drawdown >= self.max_drawdown:
            raise ValueError("reduce_size_drawdown must be below max_drawdown")
        return self


class SimulationSettings(_Group):
    """Paper trading and backtests."""

    starting_balance: float = Field(default=10_000.0, gt=0)
    quote_currency: str = "USDT"
    maker_fee: float = Field(default=0.001, ge=-0.01, le=0.05)
    taker_fee: float = Field(default=0.001, ge=0, le=0.05)
    slippage_bps: float = Field(default=2.0, ge=0, le=1000)
    slippage_model: Literal["fixed", "volatility", "book"] = "fixed"
    fill_at: Literal["next_open", "close"] = "next_open"
    feed: Literal["live", "replay", "auto"] = "auto"
    replay_speed: float = Field(
        default=0.0, ge=0, description="candles per second; 0 = as fast as possible"
    )
    latency_ms: int = Field(default=0, ge=0)
    funding: bool = Field(
        default=True,
        description="replays settle the recorded funding of perpetual positions (--funding "
        "FILE, or the funding file beside the candles)",
    )
    margin_mode: Literal["isolated", "cross"] = Field(
        default="isolated",
        description="perpetual margin: isolated (each position's own margin) or cross (the "
        "balance backs every position); sets liquidation prices in sim and risk",
    )


class StrategySettings(_Group):
    """Which strategy trades and on what."""

    name: str = "ema_cross"
    params: dict[str, float] = Field(default_factory=dict)
    timeframe: str = "1m"
    pairs: StrList = Field(default_factory=lambda: ["BTC/USDT"])
    long_only: bool = True
    warmup_candles: int = Field(default=300, ge=1)
    pattern_filter: bool = Field(
        default=False,
        description="refuse entries in pattern clusters whose past trades lost (pattern model)",
    )
    pattern_model: Path | None = Field(
        default=None, description="the fitted pattern model (JSON) the filter reads"
    )
    pattern_min_trades: int = Field(default=20, ge=1, description="trades before a verdict")


class SleeveSettings(_Group):
    """One strategy of a multi-strategy bot: its parameters, its pairs and its capital bounds.

    `label` names the sleeve (its record, its orders' tag and its place in the ranking;
    the strategy's name by default, so one strategy may run twice with other parameters).
    `initial` is its share before the first reallocation; `floor` and `cap` override the
    allocation group's bounds for it.
    """

    name: str
    params: dict[str, float] = Field(default_factory=dict)
    pairs: StrList = Field(min_length=1)
    label: str | None = None
    initial: float | None = Field(default=None, gt=0, le=1)
    floor: float | None = Field(default=None, ge=0, le=1)
    cap: float | None = Field(default=None, gt=0, le=1)

    @property
    def key(self) -> str:
        """Return the sleeve's name in records, rankings and allocations."""
        return self.label or self.name


class AllocationSettings(_Group):
    """Several strategies at once, capital allocated between them by measured skill.

    Empty `strategies` (the default): the one strategy of the `strategy` group trades its
    pairs with the whole account. Otherwise each sleeve trades its own pairs; its entries
    are sized on its share of the account equity, and every `interval_s` the shares follow
    the skill ranking (the lower confidence bound of each sleeve's shrunk Sharpe), each kept
    within [floor, cap]; a sleeve with fewer than `probation_trades` trades or younger than
    `probation_days` holds `probation_share`. Risk limits stay account-wide. Every sleeve
    trades the `strategy` group's timeframe and direction (`long_only`).
    """

    strategies: list[SleeveSettings] = Field(
        default_factory=list,
        description='JSON list: [{"name": "ema_cross", "pairs": ["BTC/USDT"], "params": {}}]',
    )
    interval_s: int = Field(default=86_400, ge=60, description="reallocate this often")
    floor: float = Field(default=0.05, ge=0, le=1, description="least share of a ranked sleeve")
    cap: float = Field(default=0.6, gt=0, le=1, description="largest share of any sleeve")
    probation_share: float = Field(
        default=0.05, ge=0, le=1, description="the fixed share of a strategy on probation"
    )
    probation_trades: int = Field(default=10, ge=0, description="on probation below this")
    probation_days: float = Field(default=7.0, ge=0, description="on probation younger than this")
    epsilon: float = Field(
        default=0.05,
        gt=0,
        description="added to max(lcb, 0) x rank (best 1, worst 1/n): order kept below zero",
    )

    @model_validator(mode="after")
    def _coherent(self) -> AllocationSettings:
        if self.floor > self.cap:
            raise ValueError(f"strategies: floor {self.floor} > cap {self.cap}")
        keys: dict[str, int] = {}
        owner: dict[str, str] = {}
        for i, sleeve in enumerate(self.strategies):
            where = f"strategies[{i}] ({sleeve.key})"
            if sleeve.key in keys:
                raise ValueError(
                    f"{where}: label {sleeve.key!r} already names strategies[{keys[sleeve.key]}]"
                    " (set a distinct `label`)"
                )
            keys[sleeve.key] = i
            floor, cap = self.bounds(sleeve)
            if floor > cap:
                raise ValueError(f"{where}: floor {floor} > cap {cap}")
            for pair in sleeve.pairs:
                if pair in owner:
                    raise ValueError(
                        f"{where}: pair {pair} already belongs to {owner[pair]}; one position"
                        " per pair belongs to exactly one strategy"
                    )
                owner[pair] = sleeve.key
        initial = sum(s.initial or 0.0 for s in self.strategies)
        if initial > 1 + 1e-9:
            raise ValueError(f"strategies: initial sleeves sum to {initial:g} > 1")
        floors = sum(self.bounds(s)[0] for s in self.strategies)
        if floors > 1 + 1e-9:
            raise ValueError(f"strategies: floors sum to {floors:g} > 1")
        if self.strategies and self.probation_share * len(self.strategies) > 1 + 1e-9:
            raise ValueError(
                f"probation_share {self.probation_share} x {len(self.strategies)} strategies > 1"
            )
        return self

    def bounds(self, sleeve: SleeveSettings) -> tuple[float, float]:
        """Return the (floor, cap) of `sleeve`: its own, else the group's."""
        floor = self.floor if sleeve.floor is None else sleeve.floor
        cap = self.cap if sleeve.cap is None else sleeve.cap
        return floor, cap


class PairsSettings(_Group):
    """Dynamic pair list (top_pairs)."""

    dynamic: bool = False
    quote: str = "USDT"
    count: int = Field(default=10, ge=1, le=200)
    min_quote_volume: float = Field(default=1_000_000.0, ge=0)
    max_spread_bps: float = Field(default=20.0, gt=0)
    ttl_s: int = Field(default=1800, ge=10)
    fallback: StrList = Field(default_factory=lambda: ["BTC/USDT", "ETH/USDT", "SOL/USDT"])
    exclude_leveraged: bool = True
    exclude_stablecoins: bool = True


class RewardSettings(_Group):
    """How strategies and agents are scored."""

    # Factor weights of the score's total (reward_system.score).
    sharpe_weight: float = Field(default=1.0, description="x annualised Sharpe of daily returns")
    sortino_weight: float = Field(default=0.5, description="x annualised Sortino, capped at 10")
    drawdown_weight: float = Field(default=2.0, description="x windowed max drawdown (fraction)")
    profit_factor_weight: float = Field(default=0.5, description="x ln(profit factor), +-ln 10")
    win_rate_weight: float = Field(default=0.5, description="x (win rate - 0.5) x 2")
    consistency_weight: float = Field(default=0.5, description="x (positive-day share - 0.5) x 2")
    # Behavioural penalties, each subtracted as weight x value.
    overtrading_weight: float = Field(default=1.0, ge=0)
    stop_overrun_weight: float = Field(default=1.0, ge=0)
    averaging_down_weight: float = Field(default=1.0, ge=0)
    revenge_weight: float = Field(default=1.0, ge=0)
    breach_weight: float = Field(default=0.25, ge=0, description="per (time-weighted) breach")
    fee_share_tolerance: float = Field(
        default=0.5, ge=0, le=1, description="fees may take this share of the gross edge"
    )
    stop_slippage: float = Field(
        default=0.002, ge=0, description="exit past the stop by more than this is an overrun"
    )
    revenge_window_min: float = Field(
        default=60.0, ge=0, description="an entry this soon after a breaker trip is revenge"
    )
    # Time weighting, drawdown window and the skill ranking.
    half_life_days: float = Field(default=90.0, gt=0, description="exponential weight half-life")
    drawdown_window_days: float = Field(default=90.0, gt=0)
    prior_strength_days: float = Field(
        default=30.0, gt=0, description="shrinkage toward a zero Sharpe, in days of evidence"
    )
    confidence_z: float = Field(default=1.645, ge=0, description="ranking lower bound: mean - z sd")
    window_trades: int = Field(default=2_000, ge=1, description="trades kept per strategy")


class LearningSettings(_Group):
    """Self-learning models."""

    enabled: bool = Field(default=False, description="filter entries with the current model")
    model: Literal["gbm", "mlp"] = Field(
        default="gbm", description="gbm: scikit-learn gradient boosting; mlp: TensorFlow/Keras"
    )
    retrain_interval_s: int = Field(default=6 * 3600, ge=60)
    min_samples: int = Field(default=500, ge=10)
    horizon_candles: int = Field(default=5, ge=1, description="label: return over N candles")
    min_edge_bps: float = Field(
        default=10.0, ge=0, description="a label is 'up' only above this return (covers fees)"
    )
    entry_threshold: float = Field(
        default=0.55, gt=0, lt=1, description="entries need P(up) at least this"
    )
    test_fraction: float = Field(default=0.25, gt=0, lt=0.9)
    seed: int = 7
    kind: str = Field(default="supervised", description="model kind retrained by the daemon")
    time_budget: float = Field(default=600.0, gt=0, description="seconds one training may take")
    retrain_every_candles: int = Field(
        default=0, ge=0, description="also retrain after this many new candles (0: schedule only)"
    )
    min_deflated_sharpe: float = Field(
        default=0.95, ge=0, le=1, description="a challenger's out-of-sample deflated Sharpe floor"
    )
    promotion_margin: float = Field(
        default=0.25,
        ge=0,
        description="score a challenger must beat the champion by (walk-forward, then in shadow)",
    )
    shadow_bars: int = Field(default=500, ge=1, description="bars a challenger runs in shadow")
    train_window_candles: int = Field(
        default=200_000, ge=100, description="a retrain uses at most the newest N candles"
    )
    retrain_check_s: float = Field(
        default=5.0, gt=0, description="how often the retrainer looks at the schedule and shadows"
    )
    validation_folds: int = Field(
        default=3, ge=1, le=10, description="anchored walk-forward folds a challenger is scored on"
    )
    bootstrap_champion: bool = Field(
        default=False,
        description="unsafe: a first model becomes champion even when it loses to staying flat",
    )
    models_dir: Path | None = Field(default=None, description="registry root (<data_dir>/models)")
    features_dir: Path | None = Field(
        default=None, description="training-dataset cache (<data_dir>/features)"
    )


class AnomalySettings(_Group):
    """Market-data anomaly rules; an anomaly pauses entries on its pair for a while."""

    enabled: bool = Field(default=True, description="watch live feeds (sim --feed live, live)")
    in_replay: bool = Field(
        default=False, description="also in backtests and sim replays (the two stay equal)"
    )
    window: int = Field(default=100, ge=10, description="bars in the robust median/MAD scale")
    spike_z: float = Field(default=20.0, gt=0, description="one-bar return, robust sigmas")
    revert_z: float = Field(
        default=3.0, gt=0, description="a close this far out and back: spike-and-revert"
    )
    frozen_bars: int = Field(default=3, ge=1, description="flat or repeated bars: frozen feed")
    zero_volume_bars: int = Field(default=1, ge=1)
    volume_burst_z: float = Field(default=6.0, gt=0, description="log volume, robust sigmas")
    stale_bars: float = Field(default=3.0, gt=0, description="feed older than this: stale")
    spread_max_bps: float = Field(default=100.0, gt=0, description="spread blow-out, absolute")
    spread_ratio: float = Field(
        default=10.0, gt=1, description="spread blow-out, times its running average"
    )
    pause_bars: int = Field(default=3, ge=1, description="entries paused this many bars")


class UISettings(_Group):
    """Terminal dashboard and local web view."""

    enabled: bool = True
    refresh_hz: float = Field(default=4.0, gt=0, le=30)
    theme: Literal["dark", "light"] = "dark"
    web_enabled: bool = False
    web_host: Literal["127.0.0.1"] = "127.0.0.1"
    web_port: int = Field(default=8765, ge=0, le=65535)
    web_token: SecretStr | None = None


class OptimizationSettings(_Group):
    """Parameter search limits."""

    population: int = Field(default=32, ge=2)
    generations: int = Field(default=10, ge=1)
    workers: int = Field(default=0, ge=0, description="0 = one per core less one")
    time_budget_s: int = Field(default=600, ge=1)
    scheduler: str | None = Field(default=None, description="tcp://host:port of a Dask cluster")
    objective: Literal["sharpe", "sortino", "calmar", "return", "score"] = Field(
        default="sharpe", description="genetic method's objective (nsga2 ranks by the score)"
    )
    seed: int = 42
    method: Literal["nsga2", "genetic"] = Field(
        default="nsga2", description="nsga2: Pareto front + walk-forward gate; genetic: one score"
    )
    windows: int = Field(default=4, ge=0, description="walk-forward folds (0 = none)")
    anchored: bool = Field(default=False, description="anchored instead of rolling train windows")
    gate_min_oos: float = Field(default=0.0, description="approve when mean OOS score > this")
    gate_min_efficiency: float = Field(default=0.5, description="and walk-forward efficiency >=")
    gate_min_dsr: float = Field(default=0.95, ge=0, le=1, description="and deflated Sharpe >=")
    gate_max_pbo: float = Field(default=0.5, ge=0, le=1, description="and PBO <= this")
    sensitivity: bool = Field(default=True, description="Morris, curves, heatmaps, plateau")


class TelegramSettings(_Group):
    """Telegram alerts and commands; disabled when no token is set."""

    token: SecretStr | None = None
    chat_ids: IntList = Field(default_factory=list)
    user_ids: IntList = Field(default_factory=list)
    base_url: str | None = Field(default=None, description="Bot API base, e.g. for a test server")
    max_messages_per_second: float = Field(default=1.0, gt=0)

    @property
    def enabled(self) -> bool:
        """Return True when a token is configured."""
        return bool(self.token and self.token.get_secret_value())


class StorageSettings(_Group):
    """Where data, state and logs live."""

    data_dir: Path = Path("data")
    log_dir: Path = Path("logs")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/kestrel.sqlite"
    )
    sample_dir: Path = Path(__file__).resolve().parent / "data" / "sample"
    snapshot_interval_s: int = Field(default=60, ge=1)
    read_chunk_rows: int = Field(
        default=131_072, ge=1, description="rows read at a time from candle files and archives"
    )
    replay_segment_rows: int = Field(
        default=1_048_576,
        ge=0,
        description=(
            "a backtest over longer archives (ours) replays them this many candles per pair"
            " at a time, so memory does not grow with the span; 0 holds the whole archive"
        ),
    )

    @property
    def effective_database_url(self) -> str:
        """Return the database URL, defaulting to SQLite in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'kestrel.sqlite'}"


class LoggingSettings(_Group):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_console: bool = False


class Settings(BaseSettings):
    """Every setting of the bot, grouped per component."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    exchange: ExchangeSettings = Field(default_factory=ExchangeSettings)
    risk: RiskSettings = Field(default_factory=RiskSettings)
    simulation: SimulationSettings = Field(default_factory=SimulationSettings)
    strategy: StrategySettings = Field(default_factory=StrategySettings)
    pairs: PairsSettings = Field(default_factory=PairsSettings)
    allocation: AllocationSettings = Field(default_factory=AllocationSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    anomaly: AnomalySettings = Field(default_factory=AnomalySettings)
    ui: UISettings = Field(default_factory=UISettings)
    optimization: OptimizationSettings = Field(default_factory=OptimizationSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _sleeves_fit(self) -> Settings:
        if self.allocation.strategies and self.pairs.dynamic:
            raise ValueError(
                "KESTREL_ALLOCATION__STRATEGIES fixes each strategy's pairs: it cannot be"
                " combined with KESTREL_PAIRS__DYNAMIC=true"
            )
        return self

    def traded_pairs(self) -> list[str]:
        """Return the pairs the bot trades: every sleeve's, else the strategy group's."""
        if self.allocation.strategies:
            return [pair for sleeve in self.allocation.strategies for pair in sleeve.pairs]
        return list(self.strategy.pairs)


def env_name(loc: tuple[int | str, ...]) -> str:
    """Return the environment variable for a pydantic error location."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_DELIMITER.join(p.upper() for p in parts)


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Build and validate the settings.

    Raises:
        ConfigError: listing every invalid variable and why.
    """
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            name = env_name(loc) if loc else ENV_PREFIX + "*"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}")
        raise ConfigError(
            "invalid settings:\n  " + "\n  ".join(problems), component="config"
        ) from e
    except (ValueError, OSError) as e:  # e.g. malformed JSON in a list variable
        raise ConfigError(f"invalid settings: {e}", component="config") from e


def masked(settings: Settings) -> dict[str, Any]:
    """Return the settings as plain data with every secret masked."""

    def walk(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "***" if value.get_secret_value() else ""
        if isinstance(value, BaseModel):
            return {name: walk(getattr(value, name)) for name in type(value).model_fields}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Decimal):
            return str(value)
        return value

    result = walk(settings)
    assert isinstance(result, dict)
    return result


def describe_settings() -> list[tuple[str, str, str]]:
    """Return (env var, default, description) for every setting, for docs and --help."""
    rows: list[tuple[str, str, str]] = []
    for group_name, group_field in Settings.model_fields.items():
        group_cls = group_field.annotation
        if not (isinstance(group_cls, type) and issubclass(group_cls, BaseModel)):
            continue
        for name, field in group_cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            rows.append(
                (
                    env_name((group_name, name)),
                    "" if default is None else str(default),
                    field.description or "",
                )
            )
    return rows
