"""Kestrel's one error tree, the one ccxt mapper and the circuit breaker.

The tree (every error the bot raises or catches by name)::

    BotError                        context: component, pair, order_id
    ├── RecoverableError            retried with backoff + jitter; retry_after honoured
    │   ├── NetworkError            connection reset, DNS, socket dropped
    │   │   ├── RequestTimeoutError request sent, no answer: the outcome is unknown
    │   │   └── ExchangeUnavailableError  5xx, maintenance
    │   ├── RateLimitError          429 / 403 / retCode 10006; retry_after = server's delay
    │   ├── ClockSkewError          retCode 10002: resync time, then retry
    │   ├── BadResponseError        malformed or empty body
    │   └── StaleDataError          market data older than allowed
    ├── BusinessError               a refusal: never retried, reported with its reason
    │   ├── OrderRejected           invalid order / market rules / post-only would cross
    │   │   └── InsufficientFundsError
    │   ├── OrderNotFoundError
    │   └── ExchangeRejectedError   any other exchange-side refusal
    ├── StrategyError               a strategy or model failed: neutral signal + alert
    └── FatalError                  stop trading safely, persist, notify, exit non-zero
        ├── ConfigError             invalid settings (exit status 2)
        ├── DataError               missing or corrupt data file (exit status 2)
        ├── AuthenticationError     bad or missing API keys, permission denied
        └── InvariantError          a broken internal invariant (illegal state transition...)

ccxt exceptions are translated in exactly one place, `map_ccxt_errors`, whose table picks
the most specific match and always chains the original (`raise Ours(...) from e`).
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import structlog


log = structlog.get_logger(__name__)


# -- The tree --------------------------------------------------------------------------------


class BotError(Exception):
    """Base of every Kestrel error; carries where it happened."""

    def __init__(
        self,
        message: str,
        *,
        component: str | None = None,
        pair: str | None = None,
        order_id: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.component = component
        self.pair = pair
        self.order_id = order_id
        self.context = context

    def describe(self) -> dict[str, Any]:
        """Return the error and its context as log key/values."""
        out: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        for key in ("component", "pair", "order_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.context)
        return out


class RecoverableError(BotError):
    """A transient failure: retry with backoff, reconnect, resynchronise."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class NetworkError(RecoverableError):
    """The connection failed before an answer arrived."""


class RequestTimeoutError(NetworkError):
    """The request may or may not have reached the exchange."""


class ExchangeUnavailableError(NetworkError):
    """The exchange answered 5xx or is in maintenance."""


class RateLimitError(RecoverableError):
    """Throttled by the exchange; `retry_after` is the server's delay when given."""


class ClockSkewError(RecoverableError):
    """Our timestamp is outside the exchange's receive window."""


class BadResponseError(RecoverableError):
    """The answer could not be parsed."""


class StaleDataError(RecoverableError):
    """Market data is older than allowed."""


class BusinessError(BotError):
    """A refusal that retrying cannot fix."""


class OrderRejected(BusinessError):
    """The order breaks a market rule or the exchange refused it."""


class InsufficientFundsError(OrderRejected):
    """Not enough balance or margin."""


class OrderNotFoundError(BusinessError):
    """The exchange has no order with that id."""


class ExchangeRejectedError(BusinessError):
    """Any other refusal by the exchange."""


class StrategyError(BotError):
    """A strategy or model raised; the caller substitutes a neutral signal."""


class FatalError(BotError):
    """Trading cannot continue safely."""

    exit_code: int = 1


class ConfigError(FatalError):
    """Invalid settings."""

    exit_code = 2


class DataError(FatalError):
    """A data file is missing, unreadable or has no usable rows."""

    exit_code = 2


class AuthenticationError(FatalError):
    """API keys are missing, wrong, or lack a permission."""


class InvariantError(FatalError):
    """An internal invariant broke (illegal state transition, negative quantity...)."""


# -- ccxt mapping ----------------------------------------------------------------------------

# (ccxt class name, our class), most specific first. Names, not classes, so that importing
# this module does not import ccxt (start-up time); the table is resolved on first use.
_CCXT_TABLE: Final[tuple[tuple[str, type[BotError]], ...]] = (
    ("RateLimitExceeded", RateLimitError),
    ("DDoSProtection", RateLimitError),
    ("RequestTimeout", RequestTimeoutError),
    ("OnMaintenance", ExchangeUnavailableError),
    ("ExchangeNotAvailable", ExchangeUnavailableError),
    ("InvalidNonce", ClockSkewError),
    ("NetworkError", NetworkError),
    ("NullResponse", BadResponseError),
    ("BadResponse", BadResponseError),
    ("CancelPending", RecoverableError),
    ("OperationFailed", RecoverableError),
    ("AuthenticationError", AuthenticationError),
    ("InsufficientFunds", InsufficientFundsError),
    ("OrderNotFound", OrderNotFoundError),
    ("OrderNotCached", OrderNotFoundError),
    ("InvalidOrder", OrderRejected),
    ("BadSymbol", OrderRejected),
    ("MarketClosed", ExchangeRejectedError),
    ("OperationRejected", ExchangeRejectedError),
    ("BadRequest", ExchangeRejectedError),
    ("ArgumentsRequired", InvariantError),
    ("NotSupported", InvariantError),
    ("ExchangeError", ExchangeRejectedError),
    ("BaseError", RecoverableError),
)
_resolved: list[tuple[type[BaseException], type[BotError]]] = []


def _table() -> list[tuple[type[BaseException], type[BotError]]]:
    if not _resolved:
        import ccxt

        _resolved.extend((getattr(ccxt, name), ours) for name, ours in _CCXT_TABLE)
    return _resolved


def translate_ccxt_error(error: BaseException, **context: Any) -> BotError | None:
    """Return our error for a ccxt exception (most specific match), or None if not ccxt."""
    best: tuple[type[BaseException], type[BotError]] | None = None
    for theirs, ours in _table():
        # The most derived matching ccxt class wins, wherever it sits in the table.
        if isinstance(error, theirs) and (best is None or issubclass(theirs, best[0])):
            best = (theirs, ours)
    if best is None:
        return None
    ours = best[1]
    message = f"{type(error).__name__}: {error}"
    if issubclass(ours, RecoverableError):
        return ours(message, retry_after=_retry_after(error), **context)
    return ours(message, **context)


def _retry_after(error: BaseException) -> float | None:
    # ccxt does not parse Retry-After; Bybit sends X-Bapi-Limit-Reset-Timestamp on 10006.
    # The exchange layer sets `retry_after` on the exception when it knows better.
    value = getattr(error, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


@contextlib.contextmanager
def map_ccxt_errors(**context: Any) -> Iterator[None]:
    """Translate any ccxt exception raised inside the block into our tree.

    Usage::

        with map_ccxt_errors(pair=pair, op="fetch_ohlcv"):
            raw = await self._ccxt.fetch_ohlcv(pair, timeframe, since=since, limit=limit)
    """
    try:
        yield
    except BotError:
        raise
    except Exception as e:
        ours = translate_ccxt_error(e, **context)
        if ours is None:
            raise
        raise ours from e


# -- Circuit breaker -------------------------------------------------------------------------


class BreakerState(enum.StrEnum):
    """Circuit breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stop calling a component that keeps failing; probe again after a cool-down.

    Closed: calls pass, failures are counted. After `threshold` consecutive failures it
    opens: `allow()` is False until `reset_after` seconds pass, then one probe is allowed
    (half-open); a success closes it, a failure opens it again.
    """

    def __init__(
        self,
        component: str,
        *,
        threshold: int = 5,
        reset_after: float = 30.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.threshold = threshold
        self.reset_after = reset_after
        self._now = now
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        """Return the state, moving open -> half-open once the cool-down has passed."""
        if self._state is BreakerState.OPEN and self._now() - self._opened_at >= self.reset_after:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Return the count of consecutive failures."""
        return self._failures

    def allow(self) -> bool:
        """Return True if a call may go through now."""
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        """Reset the failure count and close the breaker."""
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """Count a failure; open the breaker at the threshold or on a failed probe."""
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self._opened_at = self._now()
            if self._state is not BreakerState.OPEN:
                self._set(BreakerState.OPEN)

    def _set(self, new: BreakerState) -> None:
        log.warning(
            "state_changed",
            machine="circuit_breaker",
            component=self.component,
            **{"from": str(self._state), "to": str(new)},
            failures=self._failures,
        )
        self._state = new


# -- Fail-safe -------------------------------------------------------------------------------

FailSafeStep = tuple[str, Callable[[], Awaitable[object]]]


async def run_fail_safe(
    error: BaseException,
    steps: Sequence[FailSafeStep],
    *,
    step_timeout: float = 10.0,
) -> int:
    """Run the shutdown steps after a fatal error, each isolated, and return the exit code.

    Each step (stop intake, cancel orders, persist, notify, close sessions) runs even if an
    earlier one failed or timed out; failures are logged, never raised.
    """
    import asyncio

    details = error.describe() if isinstance(error, BotError) else {"error": repr(error)}
    log.error("fail_safe_started", **details)
    for name, step in steps:
        try:
            await asyncio.wait_for(step(), timeout=step_timeout)
            log.info("fail_safe_step_done", step=name)
        except Exception as e:
            log.exception("fail_safe_step_failed", step=name, error=repr(e))
    return error.exit_code if isinstance(error, FatalError) else 1
